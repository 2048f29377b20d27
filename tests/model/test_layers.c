/* test_layers.c — finite-difference gradient checks of whole models: every
 * layer kind and every option, run by the real executor (runtime/step.c) on
 * specs compiled by the real front end. For each spec: the objective (task
 * loss + weighted aux losses) and its gradient by the backward pass, then
 * central differences on a sample of elements of every parameter tensor.
 * Perturbations that change a routing decision (an expert choice or a slot)
 * make the objective jump and are skipped; each case must keep most of its
 * samples. Every sampled element must match (bounds below): a wrong sign, a
 * missing term or a wrong factor fails the check, down to the aux loss's
 * term at its default weight of 0.01. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "exec.h"
#include "front.h"
#include "lower.h"
#include "moe.h"

typedef struct gcase {
  const char *name, *spec;
} gcase;

#define HEAD(body) "model m { dim = 8; tokens = 24; dtype = fp32; " body " } train { steps = 1; seed = 7; }"
#define VOCAB(body) "model m { dim = 8; tokens = 24; vocab = 16; context = 3; dtype = fp32; " body " } train { steps = 1; seed = 3; }"
/* byte models over sequences of 6 (4 per batch): attention needs them */
#define SEQ(body) "model m { dim = 8; tokens = 24; vocab = 16; context = 2; seq = 6; dtype = fp32; " body " } train { steps = 1; seed = 3; }"

static const gcase cases[] = {
    {"layernorm", HEAD("layernorm;")},
    {"rmsnorm", HEAD("rmsnorm;")},
    /* a norm's input gradient matters only with parameters before it */
    {"ffn_layernorm", HEAD("ffn f { hidden = 8; activation = gelu; } layernorm;")},
    {"ffn_rmsnorm", HEAD("ffn f { hidden = 8; activation = silu; } rmsnorm;")},
    {"ffn_relu", HEAD("ffn f { hidden = 16; activation = relu; }")},
    {"ffn_gelu", HEAD("ffn f { hidden = 16; activation = gelu; }")},
    {"ffn_silu", HEAD("ffn f { hidden = 16; activation = silu; }")},
    {"ffn_swiglu", HEAD("ffn f { hidden = 16; activation = swiglu; }")},
    {"residual_nested_relu", HEAD("residual { rmsnorm; residual { layernorm; ffn f { hidden = 8; } } ffn g { hidden = 8; activation = gelu; } }")},
    {"repeat", HEAD("repeat 2 { residual { rmsnorm; ffn f { hidden = 8; activation = silu; } } }")},
    {"moe_softmax_top2", HEAD("moe e { experts = 4; hidden = 16; top_k = 2; activation = gelu; aux_loss = 1.0; }")},
    {"moe_relu", HEAD("moe e { experts = 4; hidden = 16; top_k = 2; aux_loss = 1.0; }")},
    {"moe_top1_drop", HEAD("moe e { experts = 4; hidden = 16; top_k = 1; capacity_factor = 0.5; activation = silu; aux_loss = 1.0; }")},
    {"moe_cosine", HEAD("moe e { experts = 4; hidden = 16; top_k = 2; gate = cosine; activation = gelu; aux_loss = 0.5; }")},
    {"moe_swiglu_nobias_dropless", HEAD("moe e { experts = 4; hidden = 16; top_k = 2; capacity_factor = 0; activation = swiglu; bias = false; normalize_gate = false; }")},
    {"moe_dynamic_bp_noise", HEAD("moe e { experts = 4; hidden = 16; top_k = 2; capacity_factor = -0.75; activation = silu; batch_prioritized = true; gate_noise = 1.0; aux_loss = 1.0; }")},
    {"moe_top3_of_8", HEAD("residual { layernorm; moe e { experts = 8; hidden = 8; top_k = 3; capacity_factor = 1.5; activation = gelu; } }")},
    /* today's routers (issue 16) */
    {"moe_sigmoid_bias_scale", HEAD("moe e { experts = 4; hidden = 16; top_k = 2; gate = sigmoid; bias_update = 0.01; route_scale = 2.5; aux_loss = 0.5; activation = gelu; }")},
    {"moe_sigmoid_unnormalized", HEAD("moe e { experts = 4; hidden = 16; top_k = 2; gate = sigmoid; normalize_gate = false; activation = silu; }")},
    {"moe_groups_zloss", HEAD("moe e { experts = 8; hidden = 8; top_k = 2; groups = 4; top_groups = 2; z_loss = 0.1; activation = gelu; gate_noise = 1.0; }")},
    {"moe_shared_swiglu", HEAD("moe e { experts = 4; hidden = 8; top_k = 2; shared_experts = 2; activation = swiglu; bias = false; }")},
    {"moe_shared_gelu_bias", HEAD("moe e { experts = 4; hidden = 8; top_k = 1; shared_experts = 1; activation = gelu; capacity_factor = 0.5; }")},
    {"moe_expert_choice", HEAD("moe e { experts = 4; hidden = 8; top_k = 2; routing = expert_choice; z_loss = 0.1; activation = gelu; }")},
    {"moe_ec_sigmoid_shared", HEAD("moe e { experts = 4; hidden = 8; top_k = 1; routing = expert_choice; gate = sigmoid; route_scale = 2.0; shared_experts = 1; activation = silu; aux_loss = 0.5; }")},
    {"moe_deepseek_v3_like", HEAD("residual { rmsnorm; moe e { experts = 8; hidden = 8; top_k = 2; gate = sigmoid; bias_update = 0.001; groups = 4; top_groups = 2; shared_experts = 1; capacity_factor = 0; activation = swiglu; bias = false; route_scale = 2.5; z_loss = 0.01; } }")},
    {"lm_embed_head", VOCAB("residual { rmsnorm; moe e { experts = 4; hidden = 8; top_k = 2; activation = gelu; aux_loss = 0.5; } }")},
    /* attention: every option; head_dim 8 != dim / heads throughout (dim 8) */
    {"attn_causal_rope_mha", SEQ("attention a { heads = 2; head_dim = 8; }")},
    {"attn_bidirectional_norope", SEQ("attention a { heads = 2; head_dim = 8; causal = false; rope = 0; }")},
    {"attn_bidirectional_rope", SEQ("attention a { heads = 1; head_dim = 16; causal = false; rope = 100; }")},
    {"attn_bias_gqa", SEQ("attention a { heads = 4; kv_heads = 2; head_dim = 8; bias = true; }")},
    {"attn_mqa_norope_bias", SEQ("attention a { heads = 4; kv_heads = 1; head_dim = 8; rope = 0; bias = true; }")},
    {"attn_residual_rmsnorm_moe", SEQ("residual { rmsnorm; attention a { heads = 2; kv_heads = 1; head_dim = 8; } } "
                                      "residual { rmsnorm; moe e { experts = 4; hidden = 8; top_k = 2; activation = gelu; aux_loss = 0.5; } }")},
    {"attn_twice_ffn", SEQ("repeat 2 { residual { layernorm; attention a { heads = 2; kv_heads = 2; head_dim = 8; bias = true; } } } "
                           "ffn f { hidden = 8; activation = silu; }")},
};

/* A checksum of every MoE layer's routing (choices and slots). */
static unsigned long routing(const moert_exec *e) {
  unsigned long h = 1469598103934665603ul;
  for (int li = 0; li < e->m->nlayers; li++) {
    const moert_layer *l = &e->m->layers[li];
    if (l->kind != MOERT_L_MOE) continue;
    const moert_layer_plan *lp = &e->plan->layers[li];
    int64_t n = e->rows * moert_moe_slots_per_token(l);
    const int32_t *idx = e->iact + lp->i[MOERT_I_IDX], *loc = e->iact + lp->i[MOERT_I_LOC];
    for (int64_t i = 0; i < n; i++) {
      int32_t kept = loc[i] < e->moe.capacity[li] ? loc[i] : -1;
      h = (h ^ (unsigned long)(idx[i] * 131 + kept)) * 1099511628211ul;
    }
    h = (h ^ (unsigned long)e->moe.capacity[li]) * 1099511628211ul;
  }
  return h;
}

static int run_case(const gcase *c) {
  moec_arena *a = moec_arena_create();
  moec_diags d;
  moec_diags_init(&d, a);
  moec_spec *s = moec_front_buffer(a, &d, c->name, c->spec, strlen(c->spec));
  moert_model *m = s ? moec_lower(a, &d, s, c->name) : NULL;
  if (!m) {
    moec_diags_print(&d, stderr);
    fprintf(stderr, "FAIL %s: the spec does not compile\n", c->name);
    moec_arena_destroy(a);
    return 1;
  }
  moert_status st = {0};
  moert_plan *p = NULL;
  moert_data *data = NULL;
  moert_exec *e = NULL;
  int fails = 1;
  if (!moert_plan_create(m, 1, 0, m->tokens, true, &p, &st) ||
      !moert_data_open_seq(&data, NULL, m->vocab, m->dim, m->context, m->seq, m->tokens, 7, &st) ||
      !moert_exec_create(&e, m, p, moert_backend_cpu(), moert_comm_self(), true, 7, &st)) {
    fprintf(stderr, "FAIL %s: %s\n", c->name, st.msg);
    goto out;
  }
  e->opts.total_steps = 1;
  double f0;
  if (!moert_exec_objective(e, data, 1, true, &f0, &st)) {
    fprintf(stderr, "FAIL %s: %s\n", c->name, st.msg);
    goto out;
  }
  unsigned long r0 = routing(e);
  float *grad = malloc(sizeof(float) * (size_t)p->param_elems);
  memcpy(grad, e->grads, sizeof(float) * (size_t)p->param_elems);
  /* The same gradient again, bitwise: a step zeroes only the gradients its
   * backward does not write whole (step.c's zero_runs), so one it forgot
   * would hold the sum of both evaluations here. */
  double f1;
  if (!moert_exec_objective(e, data, 1, true, &f1, &st)) {
    fprintf(stderr, "FAIL %s: %s\n", c->name, st.msg);
    free(grad);
    goto out;
  }
  for (int i = 0; i < m->nparams; i++) {
    const moert_param_plan *pp = &p->params[i];
    int64_t bad = 0;
    for (int64_t j = pp->offset; j < pp->offset + pp->count; j++) bad += e->grads[j] != grad[j];
    if (bad || f1 != f0) {
      fprintf(stderr, "FAIL %s: a second evaluation of the gradient differs: %s, %lld of %lld elements%s\n",
              c->name, m->params[i].name, (long long)bad, (long long)pp->count,
              f1 != f0 ? " (and the objective)" : "");
      free(grad);
      goto out;
    }
  }
  /* Each sampled element must match its central difference within
   * TOL_ABS + TOL_REL |analytic|. The bounds come from the errors of a
   * correct build (TEST_LAYERS_DUMP=1 prints every element): the largest was
   * 5e-6 absolute, at |analytic| 0.09 and 5e-4 alike, from the fp32 objective's
   * rounding over 2 eps; the bounds are 4x that and more. A dropped term of
   * the default aux-loss weight 0.01 moves gate gradients by 1e-4 to 1e-3.
   * relu's kink can sit inside an interval: an element whose differences at
   * eps and eps / 2 disagree (the objective is not smooth there) is skipped,
   * like one whose routing changes, but a kink near an interval's end moves
   * both little: relu's cases get 5x the bounds (their worst element, 1e-4,
   * sits at 0.2 of that). */
  const double relu = strstr(c->name, "relu") ? 5 : 1;
  const double TOL_ABS = 2e-5 * relu, TOL_REL = 2e-3 * relu;
  const float eps = 1e-2f;
  double num2 = 0, den2 = 0, worst = 0;
  int checked = 0, skipped = 0, kinks = 0, bad = 0, worst_param = -1;
  unsigned seed = 12345;
  for (int i = 0; i < m->nparams; i++) {
    const moert_param_plan *pp = &p->params[i];
    int samples = pp->count < 32 ? (int)pp->count : 32;
    for (int k = 0; k < samples; k++) {
      seed = seed * 1103515245u + 12345u;
      int64_t at = pp->offset + (pp->count <= samples ? k : (int64_t)((seed >> 8) % (unsigned)pp->count));
      double fd[2];
      bool rerouted = false;
      for (int h = 0; h < 2; h++) {
        float keep = e->params[at], step = h ? eps / 2 : eps;
        double fp, fm;
        e->params[at] = keep + step;
        bool ok = moert_exec_objective(e, data, 1, false, &fp, &st);
        rerouted |= routing(e) != r0;
        e->params[at] = keep - step;
        ok = ok && moert_exec_objective(e, data, 1, false, &fm, &st);
        rerouted |= routing(e) != r0;
        e->params[at] = keep;
        if (!ok) {
          fprintf(stderr, "FAIL %s: %s\n", c->name, st.msg);
          free(grad);
          goto out;
        }
        fd[h] = (fp - fm) / (2.0 * step);
      }
      if (rerouted) {
        skipped++;
        continue;
      }
      if (fabs(fd[0] - fd[1]) > (TOL_ABS + TOL_REL * fabs(fd[0])) / relu) {
        kinks++;
        continue;
      }
      double an = grad[at], diff = fabs(fd[0] - an);
      if (getenv("TEST_LAYERS_DUMP"))
        fprintf(stderr, "  %s: %s[%lld]: analytic %.6g, finite difference %.6g, |difference| %.2e\n", c->name,
                m->params[i].name, (long long)(at - pp->offset), an, fd[0], diff);
      num2 += diff * diff;
      den2 += an * an;
      double rel = diff / (TOL_ABS / TOL_REL + fabs(an));
      if (rel > worst) {
        worst = rel;
        worst_param = i;
      }
      if (diff > TOL_ABS + TOL_REL * fabs(an)) {
        if (bad++ < 8)
          fprintf(stderr, "  FAIL %s: %s[%lld]: analytic %.6g, finite difference %.6g (bound %.2e)\n", c->name,
                  m->params[i].name, (long long)(at - pp->offset), an, fd[0], TOL_ABS + TOL_REL * fabs(an));
      }
      checked++;
    }
  }
  free(grad);
  double rel = sqrt(num2) / (sqrt(den2) + 1e-12);
  int tried = checked + skipped + kinks;
  bool good = bad == 0 && checked >= 3 * tried / 5 && den2 > 0;
  printf("%-28s objective %.5f  %3d checked, %2d rerouted, %2d at kinks  |fd-an|/|an| = %.2e  worst element "
         "%.2f of its bound (%s)  %s\n",
         c->name, f0, checked, skipped, kinks, rel, worst / TOL_REL,
         worst_param >= 0 ? m->params[worst_param].name : "-", good ? "ok" : "FAIL");
  fails = good ? 0 : 1;
out:
  moert_exec_destroy(e);
  moert_data_close(data);
  moert_plan_destroy(p);
  moec_arena_destroy(a);
  return fails;
}

/* --- the bf16 executor path (argument bf16; run with MOEC_CPU_BF16=1) ---
 * Finite differences need fp32, so a bf16 model (activations of its dense,
 * attention and expert paths stored as bf16, emulated on the cpu) is checked
 * against the same model in fp32: its spec with dtype = bf16 has the same
 * parameters, so the objective and each parameter's gradient must agree
 * within bf16's error. */

/* The objective and the gradient (in parameter order, malloc'ed into *grad,
 * *n floats) of spec `text` on the cpu; *xdt the executor's storage type. */
static bool objective_of(const char *name, const char *text, double *obj, float **grad, int64_t *n, moert_dt *xdt) {
  moec_arena *a = moec_arena_create();
  moec_diags d;
  moec_diags_init(&d, a);
  moec_spec *s = moec_front_buffer(a, &d, name, text, strlen(text));
  moert_model *m = s ? moec_lower(a, &d, s, name) : NULL;
  moert_status st = {0};
  moert_plan *p = NULL;
  moert_data *data = NULL;
  moert_exec *e = NULL;
  bool ok = m && moert_plan_create(m, 1, 0, m->tokens, true, &p, &st) &&
            moert_data_open_seq(&data, NULL, m->vocab, m->dim, m->context, m->seq, m->tokens, 7, &st) &&
            moert_exec_create(&e, m, p, moert_backend_cpu(), moert_comm_self(), true, 7, &st);
  if (ok) {
    e->opts.total_steps = 1;
    ok = moert_exec_objective(e, data, 1, true, obj, &st);
  }
  if (ok) {
    *xdt = e->xdt;
    *n = 0; /* the parameters' elements, without the plan's padding between them */
    for (int i = 0; i < m->nparams; i++) *n += p->params[i].count;
    *grad = malloc(sizeof(float) * (size_t)(*n ? *n : 1));
    for (int64_t i = 0, k = 0; i < m->nparams; k += p->params[i].count, i++)
      memcpy(*grad + k, e->grads + p->params[i].offset, sizeof(float) * (size_t)p->params[i].count);
  } else {
    if (!m) moec_diags_print(&d, stderr);
    fprintf(stderr, "FAIL %s: %s\n", name, m ? st.msg : "the spec does not compile");
  }
  moert_exec_destroy(e);
  moert_data_close(data);
  moert_plan_destroy(p);
  moec_arena_destroy(a);
  return ok;
}

static int run_bf16_case(const gcase *c) {
  const char *at = strstr(c->spec, "dtype = fp32");
  char *text = malloc(strlen(c->spec) + 1);
  sprintf(text, "%.*sdtype = bf16%s", (int)(at - c->spec), c->spec, at + strlen("dtype = fp32"));
  double f32 = 0, b16 = 0;
  float *g32 = NULL, *g16 = NULL;
  int64_t n32 = 0, n16 = 0;
  moert_dt x32, x16;
  bool ok = objective_of(c->name, c->spec, &f32, &g32, &n32, &x32) && objective_of(c->name, text, &b16, &g16, &n16, &x16);
  free(text);
  int fails = !ok;
  if (ok) {
    double dd = 0, ss = 0;
    for (int64_t i = 0; i < n32 && n16 == n32; i++) {
      double diff = (double)g16[i] - g32[i];
      dd += diff * diff;
      ss += (double)g32[i] * g32[i];
    }
    if (getenv("TEST_LAYERS_DUMP")) {
      for (int64_t i = 0; i < n32 && n16 == n32; i++)
        if (fabs((double)g16[i] - g32[i]) > 0.05 * fabs(g32[i]) + 1e-4)
          fprintf(stderr, "  %s: gradient [%lld] bf16 %.6g fp32 %.6g\n", c->name, (long long)i, g16[i], g32[i]);
    }
    double grel = sqrt(dd / (ss > 0 ? ss : 1)), orel = fabs(b16 - f32) / fabs(f32);
    /* bf16 keeps 8 bits: about 4e-3 per stored value, a few such roundings deep */
    bool good = x16 == MOERT_BF16 && x32 == MOERT_F32 && n16 == n32 && ss > 0 && orel < 1e-3 && grel < 2e-2 && dd > 0;
    printf("%-28s bf16 vs fp32: objective %.5f vs %.5f (rel %.1e), gradient rel %.2e%s  %s\n", c->name, b16, f32,
           orel, grel, x16 != MOERT_BF16 ? " (not bf16: MOEC_CPU_BF16=1 unset?)" : dd == 0 ? " (identical: not bf16)" : "",
           good ? "ok" : "FAIL");
    fails = !good;
  }
  free(g32);
  free(g16);
  return fails;
}

int main(int argc, char **argv) {
  bool bf16 = argc > 1 && strcmp(argv[1], "bf16") == 0;
  int fails = 0, n = 0;
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    if (bf16 && strncmp(cases[i].name, "attn", 4) != 0 && strncmp(cases[i].name, "lm_", 3) != 0) continue;
    fails += bf16 ? run_bf16_case(&cases[i]) : run_case(&cases[i]);
    n++;
  }
  printf("%d passed, %d failed\n", n - fails, fails);
  return fails ? 1 : 0;
}
