/* test_variants.c — every variant of a MoE layer computes the same function
 * (docs/DESIGN.md, "What must hold"): run under mpirun at several world sizes, on
 * specs with E above, equal to and below the world size. For each spec, the
 * objective (loss + aux) and the whole gradient of one forward and backward
 * with every MoE layer forced to each candidate are compared with candidate 0:
 * ||a - b|| / ||b|| over all ranks < 1e-5. The parameters are identical for
 * every variant (one layout), so the gradient buffers compare element by
 * element.
 *
 * A bug every variant shares (the aux loss's statistics, the gradient sum over
 * ranks, a capacity) cannot show between them: on the specs whose function
 * does not depend on how the batch is split (dropless, or a fixed capacity no
 * expert reaches), each variant is also compared with the single-rank cpu
 * reference: the same model, planned for one rank, on the whole global batch
 * (comm_self), its gradient read at each local element's global index. At
 * one rank that reference runs on comm_self while the variants run on the
 * mpi comm's world of one. Spec f has attention layers: whole sequences on
 * every rank, so it is the same function at every world size too. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "exec.h"
#include "front.h"
#include "lower.h"

typedef struct vspec {
  const char *text;
  bool invariant; /* the same function at every world size: compared with the single-rank reference */
} vspec;

static const vspec specs[] = {
    /* E = 8: above every world size tested (S = 1) */
    {"model a { dim = 16; tokens = 24; dtype = fp32; residual { rmsnorm; moe e { experts = 8; hidden = 32; "
     "top_k = 2; aux_loss = 0.1; } } } parallel { adaptive_r = auto; overlap_degree = 1, 2, 4; "
     "all_to_all = linear, 2dh; } train { steps = 1; seed = 5; }",
     false},
    /* E = 2: below 4 ranks (S = 2), swiglu, dropless, no bias */
    {"model b { dim = 16; tokens = 20; dtype = fp32; moe e { experts = 2; hidden = 32; top_k = 2; "
     "capacity_factor = 0; activation = swiglu; bias = false; } } parallel { adaptive_r = auto; "
     "overlap_degree = 1, 2; all_to_all = linear, 2dh; } train { steps = 1; seed = 6; }",
     true},
    /* E = 1: one expert split over every rank (S = W), gelu, bias, capped capacity, cosine gate */
    {"model c { dim = 16; tokens = 16; dtype = fp32; residual { layernorm; moe e { experts = 1; hidden = 64; "
     "top_k = 1; capacity_factor = -0.8; activation = gelu; gate = cosine; } } } parallel { "
     "adaptive_r = auto; overlap_degree = 1, 2; } train { steps = 1; seed = 7; }",
     false},
    /* two MoE layers, E = 4, silu, batch-prioritized with gate noise */
    {"model d { dim = 16; tokens = 32; dtype = fp32; repeat 2 { residual { rmsnorm; moe e { experts = 4; "
     "hidden = 16; top_k = 2; activation = silu; batch_prioritized = true; gate_noise = 0.5; } } } } "
     "parallel { adaptive_r = auto; overlap_degree = 1, 2; } train { steps = 1; seed = 8; }",
     false},
    /* E = 8, a fixed capacity no expert reaches (f = 4: C >= 2 T), the aux loss
     * at a weight where it matters, a cosine gate, two MoE layers */
    {"model e { dim = 16; tokens = 24; dtype = fp32; repeat 2 { residual { layernorm; moe e { experts = 8; "
     "hidden = 32; top_k = 2; capacity_factor = 4; gate = cosine; activation = gelu; aux_loss = 0.5; } } } } "
     "parallel { adaptive_r = auto; overlap_degree = 1, 2; all_to_all = linear, 2dh; } "
     "train { steps = 1; seed = 9; }",
     true},
    /* a byte model over sequences of 6 (whole sequences on every rank):
     * attention (GQA 4/2, RoPE, bias) and dropless experts, twice */
    {"model f { dim = 16; tokens = 24; vocab = 32; context = 2; seq = 6; dtype = fp32; repeat 2 { residual { "
     "rmsnorm; attention a { heads = 4; kv_heads = 2; head_dim = 8; bias = true; } } residual { rmsnorm; moe e { "
     "experts = 4; hidden = 16; top_k = 2; capacity_factor = 0; activation = gelu; aux_loss = 0.1; } } } } "
     "parallel { adaptive_r = auto; overlap_degree = 1, 2; all_to_all = linear, 2dh; } train { steps = 1; seed = 10; }",
     true},
    /* today's routers: a DeepSeek-V3-like layer (sigmoid gate with its bias
     * and balancing, groups, a shared expert, route_scale, the z-loss),
     * dropless, E = 8 */
    {"model g { dim = 16; tokens = 24; dtype = fp32; residual { rmsnorm; moe e { experts = 8; hidden = 16; "
     "top_k = 2; gate = sigmoid; bias_update = 0.01; groups = 4; top_groups = 2; shared_experts = 1; "
     "capacity_factor = 0; route_scale = 2.5; z_loss = 0.1; activation = swiglu; bias = false; } } } "
     "parallel { adaptive_r = auto; overlap_degree = 1, 2; all_to_all = linear, 2dh; } train { steps = 1; seed = 11; }",
     true},
    /* expert choice (C per source rank: not the same function at another
     * world size), with a shared expert and the z-loss; E = 2 (S = 2 at 4 ranks) */
    {"model h { dim = 16; tokens = 24; dtype = fp32; residual { layernorm; moe e { experts = 2; hidden = 32; "
     "top_k = 1; routing = expert_choice; capacity_factor = 1.0; shared_experts = 2; z_loss = 0.05; "
     "activation = gelu; } } } parallel { adaptive_r = auto; overlap_degree = 1, 2; } train { steps = 1; seed = 12; }",
     false},
};

typedef struct forced {
  int v;
} forced;

static int pick(void *ctx, int li, int64_t capacity, int64_t step) {
  (void)li, (void)capacity, (void)step;
  return ((forced *)ctx)->v;
}

static void die(moert_comm *c, const char *what, const moert_status *st) {
  fprintf(stderr, "rank %d: FAIL: %s: %s\n", c->rank, what, st ? st->msg : "");
  moert_comm_abort(c, 1);
}

/* The single-rank reference: m planned for one rank with the whole global
 * batch of `world` ranks, its objective and gradient (malloc'ed, the plan's
 * layout; *rp is its plan). */
static float *single_rank(moert_comm *c, const moert_model *m, int world, double *obj, moert_plan **rp) {
  moert_status st = {0};
  moert_plan *p;
  moert_data *data;
  moert_exec *e;
  if (!moert_plan_create(m, 1, 0, m->tokens * world, true, &p, &st) ||
      !moert_data_open_seq(&data, NULL, m->vocab, m->dim, m->context, m->seq, m->tokens * world, 3, &st) ||
      !moert_exec_create(&e, m, p, moert_backend_cpu(), moert_comm_self(), true, 3, &st))
    die(c, "the single-rank reference", &st);
  e->opts.total_steps = 1;
  if (!moert_exec_objective(e, data, 1, true, obj, &st)) die(c, "the single-rank reference", &st);
  float *g = malloc(sizeof(float) * (size_t)p->param_elems);
  memcpy(g, e->grads, sizeof(float) * (size_t)p->param_elems);
  moert_exec_destroy(e);
  moert_data_close(data);
  *rp = p;
  return g;
}

/* ||a - b||^2 and ||b||^2 over this rank's gradient elements: a this rank's
 * gradient in plan p, b the single-rank reference's (plan rp) at each
 * element's global index. */
static void against_single(const moert_model *m, const moert_plan *p, const float *a, const moert_plan *rp,
                           const float *b, double sums[2]) {
  for (int i = 0; i < m->nparams; i++) {
    const moert_param_plan *pp = &p->params[i], *rpp = &rp->params[i];
    for (int64_t k = 0; k < pp->count; k++) {
      double want = b[rpp->offset + (int64_t)moert_global_index(&m->params[i], pp, k)];
      double diff = (double)a[pp->offset + k] - want;
      sums[0] += diff * diff;
      sums[1] += want * want;
    }
  }
}

int main(int argc, char **argv) {
  moert_status st = {0};
  moert_comm *c = moert_comm_self();
  if (moert_comm_under_mpirun() && !moert_comm_mpi_create(&argc, &argv, &c, &st)) {
    fprintf(stderr, "FAIL: %s\n", st.msg);
    return 1;
  }
  /* the staging comm of device backends, tested here over host memory */
  moert_comm *world = c;
  if (getenv("MOEC_TEST_STAGED_COMM") && !moert_comm_staged_create(world, moert_backend_cpu(), &c, &st)) {
    fprintf(stderr, "FAIL: %s\n", st.msg);
    return 1;
  }
  int fails = 0, cases = 0;
  for (size_t si = 0; si < sizeof specs / sizeof specs[0]; si++) {
    moec_arena *a = moec_arena_create();
    moec_diags d;
    moec_diags_init(&d, a);
    moec_spec *s = moec_front_buffer(a, &d, "spec", specs[si].text, strlen(specs[si].text));
    moert_model *m = s ? moec_lower(a, &d, s, "spec") : NULL;
    if (!m) {
      moec_diags_print(&d, stderr);
      die(c, "spec", NULL);
    }
    moert_plan *p;
    moert_data *data;
    moert_exec *e;
    forced f = {0};
    if (!moert_plan_create_nodes(m, c->world, c->rank, m->tokens, true, c->nodes, &p, &st) ||
        !moert_data_open_seq(&data, NULL, m->vocab, m->dim, m->context, m->seq, m->tokens * c->world, 3, &st) ||
        !moert_exec_create(&e, m, p, moert_backend_cpu(), c, true, 3, &st))
      die(c, m->name, &st);
    e->opts.total_steps = 1;
    e->opts.pick = pick;
    e->opts.pick_ctx = &f;
    int nv = 1 << 30, li0 = -1;
    for (int li = 0; li < m->nlayers; li++)
      if (m->layers[li].kind == MOERT_L_MOE) {
        if (p->layers[li].nvariants < nv) nv = p->layers[li].nvariants;
        if (li0 < 0) li0 = li;
      }
    int64_t n = p->param_elems;
    float *ref = malloc(sizeof(float) * (size_t)(n ? n : 1));
    double ref_obj = 0, one_obj = 0;
    moert_plan *one_plan = NULL;
    float *one = specs[si].invariant ? single_rank(c, m, c->world, &one_obj, &one_plan) : NULL;
    for (int v = 0; v < nv; v++) {
      f.v = v;
      double obj;
      if (!moert_exec_objective(e, data, 1, true, &obj, &st)) die(c, p->layers[li0].variants[v].name, &st);
      if (one) { /* against the single-rank reference */
        double sums[2] = {0, 0};
        against_single(m, p, e->grads, one_plan, one, sums);
        if (!c->all_reduce_f64(c, sums, 2, MOERT_RED_SUM, &st)) die(c, "all-reduce", &st);
        double grad_rel = sqrt(sums[0]) / (sqrt(sums[1]) + 1e-30);
        double obj_rel = fabs(obj - one_obj) / fabs(one_obj);
        bool good = grad_rel < 1e-5 && obj_rel < 1e-5 && sums[1] > 0;
        cases++;
        fails += !good;
        if (c->rank == 0)
          printf("W=%d %-6s %-22s vs %-22s objective %.8f  rel %.1e  gradient rel %.1e  %s\n", c->world, m->name,
                 p->layers[li0].variants[v].name, "one rank, whole batch", obj, obj_rel, grad_rel,
                 good ? "ok" : "FAIL");
      }
      if (v == 0) {
        memcpy(ref, e->grads, sizeof(float) * (size_t)n);
        ref_obj = obj;
        continue;
      }
      double sums[2] = {0, 0}; /* ||a - b||^2, ||b||^2 over this rank's gradients */
      for (int64_t k = 0; k < n; k++) {
        double diff = (double)e->grads[k] - ref[k];
        sums[0] += diff * diff;
        sums[1] += (double)ref[k] * ref[k];
      }
      if (!c->all_reduce_f64(c, sums, 2, MOERT_RED_SUM, &st)) die(c, "all-reduce", &st);
      double grad_rel = sqrt(sums[0]) / (sqrt(sums[1]) + 1e-30);
      double obj_rel = fabs(obj - ref_obj) / fabs(ref_obj);
      bool good = grad_rel < 1e-5 && obj_rel < 1e-5 && sums[1] > 0;
      cases++;
      fails += !good;
      if (c->rank == 0)
        printf("W=%d %-6s %-22s vs %-22s objective %.8f  rel %.1e  gradient rel %.1e  %s\n", c->world,
               m->name, p->layers[li0].variants[v].name, p->layers[li0].variants[0].name, obj, obj_rel,
               grad_rel, good ? "ok" : "FAIL");
    }
    free(one);
    moert_plan_destroy(one_plan);
    if (c->rank == 0 && nv == 1)
      printf("W=%d %-6s one variant at this world size (%s)\n", c->world, m->name, p->layers[li0].variants[0].name);
    free(ref);
    moert_exec_destroy(e);
    moert_data_close(data);
    moert_plan_destroy(p);
    moec_arena_destroy(a);
  }
  if (c->rank == 0) printf("%d passed, %d failed\n", cases - fails, fails);
  if (c != world) c->destroy(c);
  if (world != moert_comm_self()) moert_comm_mpi_finalize(world);
  return fails ? 1 : 0;
}
