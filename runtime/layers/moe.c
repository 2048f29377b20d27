/* moe.c (layers) — the MoE layer kind (layer.h): the gate (softmax or
 * cosine), the capacity and the experts, whose parallelism variants
 * (runtime/moe.c runs them) all share one layout of parameters and buffers.
 * Here: its slots, its plan (the candidates at this world size, the padded
 * capacity every candidate can use, each candidate's bytes, FLOPs and
 * memory), its kernels and its printers. */
#include "layer.h"

#include <math.h>
#include <string.h>

#include "moe.h"

#define COSINE_PROJ MOERT_COSINE_PROJ

static const char *const slots[] = {
#define X(n, s) s,
    MOERT_MOE_SLOTS(X)
#undef X
};
_Static_assert(MOERT_MOE__SLOTS <= MOERT_MAX_SLOTS, "model.h's MOERT_MAX_SLOTS is below the MoE layer's slots");

static bool moe_slot(const moert_model *m, const moert_layer *l, int s, moert_param *p) {
  int64_t M = m->dim, E = l->experts, H = l->hidden, H1 = l->act == MOERT_ACT_SWIGLU ? 2 * H : H;
  bool cosine = l->gate == MOERT_GATE_COSINE;
  *p = (moert_param){.init = MOERT_INIT_UNIFORM, .scale = 1 / sqrt((double)M), .place = MOERT_PLACE_REPLICATED};
  switch (s) {
  case MOERT_MOE_GATE_PROJ_W:
    p->ndim = 2, p->shape[0] = M, p->shape[1] = COSINE_PROJ;
    return cosine;
  case MOERT_MOE_GATE_PROJ_B:
    p->ndim = 1, p->shape[0] = COSINE_PROJ;
    return cosine;
  case MOERT_MOE_GATE_SIM:
    p->ndim = 2, p->shape[0] = COSINE_PROJ, p->shape[1] = E;
    p->init = MOERT_INIT_NORMAL, p->scale = 0.01;
    return cosine;
  case MOERT_MOE_GATE_TEMP: /* Tutel: temperature = log(1 / 0.5), clamped at log(1 / 0.01) when used */
    p->ndim = 1, p->shape[0] = 1;
    p->init = MOERT_INIT_CONST, p->scale = log(2.0);
    return cosine;
  case MOERT_MOE_GATE_W:
    p->ndim = 2, p->shape[0] = M, p->shape[1] = E;
    return !cosine;
  case MOERT_MOE_GATE_BIAS: /* starts at 0; moved by the balancing alone */
    p->ndim = 1, p->shape[0] = E;
    p->init = MOERT_INIT_ZEROS, p->scale = 0, p->frozen = 1;
    return l->gate == MOERT_GATE_SIGMOID;
  case MOERT_MOE_FC1_W:
    p->ndim = 3, p->shape[0] = E, p->shape[1] = M, p->shape[2] = H1;
    p->place = MOERT_PLACE_EXPERT_IN, p->swiglu_halves = l->act == MOERT_ACT_SWIGLU;
    return true;
  case MOERT_MOE_FC1_B:
    p->ndim = 2, p->shape[0] = E, p->shape[1] = H1;
    p->place = MOERT_PLACE_EXPERT_BIAS, p->swiglu_halves = l->act == MOERT_ACT_SWIGLU;
    return l->bias;
  case MOERT_MOE_FC2_W:
    p->ndim = 3, p->shape[0] = E, p->shape[1] = H, p->shape[2] = M;
    p->scale = 1 / sqrt((double)H), p->place = MOERT_PLACE_EXPERT_OUT;
    return true;
  case MOERT_MOE_FC2_B:
    p->ndim = 2, p->shape[0] = E, p->shape[1] = M;
    p->scale = 1 / sqrt((double)H), p->place = MOERT_PLACE_EXPERT_REP;
    return l->bias;
  case MOERT_MOE_SHARED_FC1_W: /* as a dense FFN's, of hidden shared_experts * H */
    p->ndim = 2, p->shape[0] = M, p->shape[1] = l->shared_experts * H1;
    return l->shared_experts > 0;
  case MOERT_MOE_SHARED_FC1_B:
    p->ndim = 1, p->shape[0] = l->shared_experts * H1;
    return l->shared_experts > 0 && l->bias;
  case MOERT_MOE_SHARED_FC2_W:
    p->ndim = 2, p->shape[0] = l->shared_experts * H, p->shape[1] = M;
    p->scale = 1 / sqrt((double)(l->shared_experts * H));
    return l->shared_experts > 0;
  case MOERT_MOE_SHARED_FC2_B:
    p->ndim = 1, p->shape[0] = M;
    p->scale = 1 / sqrt((double)(l->shared_experts * H));
    return l->shared_experts > 0 && l->bias;
  default: return false;
  }
}

static int64_t gcd64(int64_t a, int64_t b) {
  while (b) {
    int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

/* The candidates of MoE layer l at this world size, in the order the spec
 * lists them (`auto` expanding in place to 0 and every divisor of S);
 * variants that differ in nothing are listed once (d and the algorithm mean
 * nothing when r = 0 or W = 1; 2dh needs several nodes). */
static void enumerate_variants(const moert_model *m, moert_layer_plan *lp, int world, int nodes) {
  const moert_parallel *par = &m->parallel;
  int64_t S = lp->shards;
  int64_t rs[MOERT_MAX_VARIANTS];
  int nr = 0;
  char *dropped = lp->dropped;
  size_t dlen = sizeof lp->dropped;
  dropped[0] = 0;
  for (int i = 0; i < par->nr; i++) {
    int64_t want[MOERT_MAX_VARIANTS];
    int nw = 0;
    if (par->r[i] < 0) {
      want[nw++] = 0;
      for (int64_t d = 1; d <= S && nw < MOERT_MAX_VARIANTS; d++)
        if (S % d == 0) want[nw++] = d;
    } else if (par->r[i] == 0 || (S % par->r[i] == 0 && par->r[i] <= S)) {
      want[nw++] = par->r[i];
    } else {
      size_t n = strlen(dropped);
      snprintf(dropped + n, dlen - n, "%sadaptive_r = %lld (not 0 or a divisor of S = %lld)",
               n ? "; " : "", (long long)par->r[i], (long long)S);
    }
    for (int k = 0; k < nw; k++) {
      bool dup = false;
      for (int j = 0; j < nr; j++) dup |= rs[j] == want[k];
      if (!dup && nr < MOERT_MAX_VARIANTS) rs[nr++] = want[k];
    }
  }
  int ndeg = par->ndegrees ? par->ndegrees : 1;
  int na2a = par->na2a ? par->na2a : 1;
  bool has_2dh_only = true;
  for (int a = 0; a < par->na2a; a++) has_2dh_only &= par->a2a[a] == MOERT_A2A_2DH;
  lp->nvariants = 0;
  for (int i = 0; i < nr; i++)
    for (int j = 0; j < ndeg; j++)
      for (int a = 0; a < na2a; a++) {
        moert_variant v = {0};
        v.r = (int)rs[i];
        v.d = par->ndegrees ? (int)par->degrees[j] : 1;
        v.a2a = par->na2a ? (moert_a2a_algo)par->a2a[a] : MOERT_A2A_LINEAR;
        bool moves_tokens = v.r > 0 && world > 1;
        if (!moves_tokens) {
          v.d = 1;
          v.a2a = MOERT_A2A_LINEAR;
        }
        /* 2dh on one node is linear with extra copies: only when it is all
         * the spec allows (forced) */
        if (moves_tokens && v.a2a == MOERT_A2A_2DH && nodes == 1 && !has_2dh_only) continue;
        snprintf(v.name, sizeof v.name, "r=%d,d=%d,a2a=%s", v.r, v.d,
                 v.a2a == MOERT_A2A_2DH ? "2dh" : "linear");
        bool dup = false;
        for (int k = 0; k < lp->nvariants; k++) dup |= strcmp(lp->variants[k].name, v.name) == 0;
        if (!dup && lp->nvariants < MOERT_MAX_VARIANTS) lp->variants[lp->nvariants++] = v;
      }
  if (nodes == 1 && world > 1 && !has_2dh_only) {
    bool listed = false;
    for (int a = 0; a < par->na2a; a++) listed |= par->a2a[a] == MOERT_A2A_2DH;
    if (listed) {
      size_t n = strlen(dropped);
      snprintf(dropped + n, dlen - n, "%sall_to_all = 2dh (one node)", n ? "; " : "");
    }
  }
  if (lp->nvariants == 0) { /* nothing the spec lists exists here: plain expert parallelism */
    moert_variant v = {.r = 1, .d = 1, .a2a = MOERT_A2A_LINEAR};
    snprintf(v.name, sizeof v.name, "r=1,d=1,a2a=linear");
    lp->variants[lp->nvariants++] = v;
  }
}

static int64_t capacity_bound(const moert_layer *l, int64_t tokens) {
  /* A token claims an expert at most once, so no source sends more than
   * `tokens` rows to one expert. */
  if (l->capacity_factor > 0) return moert_capacity(l, tokens, 0);
  int64_t c = moert_capacity(l, tokens, tokens);
  return c;
}


#define F_(name, n) moert_plan_f(c, MOERT_F_##name, (n))
#define I_(name, n) moert_plan_i(c, MOERT_I_##name, (n))
#define S_(name, n) moert_plan_s(c, MOERT_S_##name, (n))
static bool moe_plan(moert_plan_ctx *c, moert_status *st) {
  (void)st;
  const moert_model *m = c->m;
  const moert_layer *l = c->l;
  moert_layer_plan *lp = c->lp;
  int64_t T = c->T, M = m->dim;
  int world = c->world, nodes = c->nodes;
  bool training = c->training;
  int64_t E = l->experts, K = l->top_k, H = l->hidden;
  int64_t S = E >= world ? 1 : world / E;
  int64_t El = E >= world ? E / world : 1, Hl = H / S;
  int halves = l->act == MOERT_ACT_SWIGLU ? 2 : 1;
  int64_t H1 = halves * H;
  lp->experts_local = El;
  lp->shards = S;
  lp->hidden_local = Hl;
  enumerate_variants(m, lp, world, nodes);
  /* every variant must see the same C: pad it to a multiple of each
   * candidate's chunking (d pipeline chunks of S/r token chunks) */
  int64_t align = 1, rmax = 1, gather = 0;
  for (int v = 0; v < lp->nvariants; v++) {
    const moert_variant *vv = &lp->variants[v];
    int64_t bias = l->bias ? H1 + M : 0;
    if (vv->r == 0) {
      gather = E * (M * H1 + H * M + bias) > gather ? E * (M * H1 + H * M + bias) : gather;
      continue;
    }
    int64_t P = S / vv->r, unit = vv->d * P;
    align = align / gcd64(align, unit) * unit;
    if (vv->r > rmax) rmax = vv->r;
    if (vv->r < S) {
      int64_t g = M * H1 / vv->r + (H / vv->r) * M + (l->bias ? H1 / vv->r + M : 0);
      if (g > gather) gather = g;
    }
  }
  lp->align = align;
  int64_t Cb = moert_round_up(capacity_bound(l, T), align);
  lp->capacity_bound = Cb;
  /* token rows in transit, and on the expert side; one rank computes on
   * its dispatch buffer directly */
  int64_t X = world == 1 ? 0 : E * rmax * Cb * M;
  F_(LOGITS, T * E);
  F_(SCORES, T * E);
  if (l->gate_noise > 0) F_(NOISE, T * E);
  if (l->gate == MOERT_GATE_COSINE) {
    F_(PROJ, T * COSINE_PROJ);
    F_(PROJN, T * COSINE_PROJ);
    F_(PROJNORM, T);
    F_(SIMN, COSINE_PROJ * E);
    F_(SIMNORM, E);
    F_(RAW, T * E);
    S_(DRAW, T * E);
    S_(DPROJN, T * COSINE_PROJ);
    S_(DPROJ, T * COSINE_PROJ);
    S_(DSIMN, COSINE_PROJ * E);
    S_(DSIM, COSINE_PROJ * E);
  }
  /* a token's slots: its top_k choices, or (expert choice) one an expert */
  int64_t Ks = moert_moe_slots_per_token(l);
  F_(TOPV, T * Ks);
  F_(GATE, T * Ks);
  I_(IDX, T * Ks);
  I_(LOC, T * Ks);
  F_(RSTAT, 2);
  if (l->batch_prioritized || l->routing == MOERT_ROUTE_EXPERT_CHOICE) I_(ORDER, T);
  if (l->shared_experts > 0) { /* one dense FFN of shared_experts * H (layer_exec.h's moert_ffn_*) */
    int64_t nH = l->shared_experts * H;
    F_(H, T * halves * nH);
    F_(A, T * nH);
    S_(DH, T * halves * nH);
    S_(DA, T * nH);
    S_(DX, T * M); /* their output, then their input's gradient, added after the combine / dispatch */
    if (m->dtype == MOERT_DT_BF16) {
      S_(XB, (T * M + 1) / 2);
      S_(DYB, (T * M + 1) / 2);
    }
  }
  I_(COUNTS, E);
  F_(SRC, E * Cb * M);
  F_(SRCY, E * Cb * M);
  F_(EX, X);
  F_(EH, E * Cb * H1);  /* the same for every variant: rows * (H1 / r) */
  F_(EA, E * Cb * H);
  if (gather) F_(GW, gather);
  F_(SSUM, E);
  F_(TOP1, E);
  F_(DCOEF, E);
  F_(OUT, T * M);
  S_(DGATE, T * Ks);
  S_(DLOGITS, T * E);
  S_(XS, X);
  S_(XR, X);
  S_(YS, X);
  S_(YR, X);
  S_(EY, X);
  S_(DSRCY, E * Cb * M);
  S_(DSRC, E * Cb * M);
  S_(DEX, X);
  S_(DEH, E * Cb * H1);
  S_(DEA, E * Cb * H);
  if (gather) {
    S_(DGW, gather);
    S_(GT1, gather); /* gradients on their way back to their owners */
    S_(GT2, gather);
  }
  double gate = l->gate == MOERT_GATE_COSINE ? 2.0 * T * M * COSINE_PROJ + 2.0 * T * COSINE_PROJ * E
                                             : 2.0 * T * M * E;
  lp->flops_fwd = gate + (double)T * K * (2.0 * M * H1 + 2.0 * H * M) +
                  (double)T * l->shared_experts * (2.0 * M * H1 + 2.0 * H * M);
  /* per variant: what it sends and computes on this rank per step */
  double others = world > 1 ? (double)(world - 1) / world : 0;
  for (int v = 0; v < lp->nvariants; v++) {
    moert_variant *vv = &lp->variants[v];
    int64_t r = vv->r;
    /* rows of expert input this rank computes: r = 0 its own tokens for
     * every expert; S = 1 all sources' tokens for its El experts; S > 1
     * one chunk (C r / S slots) from every source for its expert */
    double rows = r == 0 ? (double)E * Cb : S == 1 ? (double)El * world * Cb : (double)world * Cb * r / S;
    double h1 = r == 0 ? (double)H1 : (double)H1 / r, h = r == 0 ? (double)H : (double)H / r;
    /* forward, and backward (twice the forward) when training */
    vv->flops = (training ? 3 : 1) * (2.0 * rows * M * h1 + 2.0 * rows * h * M);
    double gathered = 0; /* parameter elements gathered from other ranks */
    if (r == 0) gathered = (double)E * (M * H1 + H * M + (l->bias ? H1 + M : 0));
    else if (r < S) gathered = (M * (double)H1 + (double)H * M + (l->bias ? (double)H1 : 0)) / r;
    double group = r == 0 ? world : r < S ? (double)(S / r) : 1;
    double gathered_out = group > 1 ? gathered * 4 * (group - 1) / group : 0;
    /* tokens: to the experts and back, forward and backward; parameters:
     * gathered forward, their gradients reduce-scattered backward */
    double tokens_out = r == 0 ? 0 : (double)E * Cb * M * (S == 1 ? 1.0 : (double)r) * 4 * others;
    vv->send_bytes = 4 * tokens_out + 2 * gathered_out;
    vv->mem_bytes = (int64_t)((r == 0 ? 0 : 5 * rows * M * 4) + (r < S || r == 0 ? 2 * gathered * 4 : 0));
  }
  return true;
}
#undef F_
#undef I_
#undef S_

/* The gate's scores, the hidden rows, and the dispatch buffer [E, C, M] with C
 * up to k ceil(|f|) tokens per expert (compiler/sema.c's widest_row, the same). */
static int64_t moe_row(const moert_model *m, const moert_layer *l) {
  int64_t h1 = l->act == MOERT_ACT_SWIGLU ? 2 * l->hidden : l->hidden, r = h1 > m->dim ? h1 : m->dim;
  double f = fabs(l->capacity_factor);
  int64_t per = f > 1 ? (int64_t)ceil(f) : 1, x;
  if (__builtin_mul_overflow(l->top_k * per, r, &x)) x = INT64_MAX;
  if (l->experts > x) x = l->experts;
  if (l->gate == MOERT_GATE_COSINE && COSINE_PROJ > x) x = COSINE_PROJ;
  return x;
}

static int moe_specs(const moert_model *m, const moert_layer *l, moert_spec_use *u) {
  (void)m;
  int n = 0;
  if (l->gate == MOERT_GATE_COSINE) {
    u[n++] = (moert_spec_use){MOERT_SPEC_l2norm_rows_fwd, MOERT_COSINE_PROJ, 0};
    u[n++] = (moert_spec_use){MOERT_SPEC_l2norm_rows_bwd, MOERT_COSINE_PROJ, 0};
  }
  int64_t k = moert_moe_slots_per_token(l); /* the gate launches with expert choice's E slots a token */
  u[n++] = (moert_spec_use){MOERT_SPEC_gate_topk, l->experts, k};
  if (l->routing != MOERT_ROUTE_EXPERT_CHOICE) /* expert choice runs gate_ec instead */
    u[n++] = (moert_spec_use){MOERT_SPEC_gate_locations, k, 0};
  u[n++] = (moert_spec_use){MOERT_SPEC_gate_bwd, l->experts, k};
  return n;
}

static void moe_describe(const moert_model *m, const moert_layer *l, char *buf, size_t n) {
  int k = snprintf(buf, n, "E = %lld, k = %lld, M = %lld, H = %lld, gate %s", (long long)l->experts,
                   (long long)l->top_k, (long long)m->dim, (long long)l->hidden, moert_gate_names[l->gate]);
  /* today's routers, where set */
  if (l->routing == MOERT_ROUTE_EXPERT_CHOICE && k > 0 && (size_t)k < n)
    k += snprintf(buf + k, n - (size_t)k, ", expert choice");
  if (l->groups > 1 && k > 0 && (size_t)k < n)
    k += snprintf(buf + k, n - (size_t)k, ", %lld of %lld groups", (long long)l->top_groups, (long long)l->groups);
  if (l->bias_update > 0 && k > 0 && (size_t)k < n)
    k += snprintf(buf + k, n - (size_t)k, ", bias balancing %g", l->bias_update);
  if (l->shared_experts > 0 && k > 0 && (size_t)k < n)
    k += snprintf(buf + k, n - (size_t)k, ", %lld shared", (long long)l->shared_experts);
  if (l->z_loss > 0 && k > 0 && (size_t)k < n) snprintf(buf + k, n - (size_t)k, ", z-loss %g", l->z_loss);
}

static void moe_shape(const moert_plan *p, int li, char *buf, size_t n) {
  const moert_layer *l = &p->model->layers[li];
  const moert_layer_plan *lp = &p->layers[li];
  snprintf(buf, n, "E %lld (%lld here) k %lld C<=%lld", (long long)l->experts, (long long)lp->experts_local,
           (long long)l->top_k, (long long)lp->capacity_bound);
}

static void moe_json(const moert_plan *p, int li, FILE *out) {
  const moert_layer *l = &p->model->layers[li];
  const moert_layer_plan *lp = &p->layers[li];
  fprintf(out, ", \"experts\": %lld, \"top_k\": %lld, \"hidden\": %lld, \"experts_local\": %lld, \"shards\": %lld"
               ", \"capacity_bound\": %lld, \"capacity_align\": %lld",
          (long long)l->experts, (long long)l->top_k, (long long)l->hidden, (long long)lp->experts_local,
          (long long)lp->shards, (long long)lp->capacity_bound, (long long)lp->align);
  /* the layer's function, as the spec says it (what a twin of the model needs) */
  fprintf(out, ", \"gate\": \"%s\", \"activation\": \"%s\", \"routing\": \"%s\", \"capacity_factor\": %.17g"
               ", \"aux_loss\": %.17g, \"bias\": %s, \"normalize_gate\": %s, \"batch_prioritized\": %s"
               ", \"gate_noise\": %.17g, \"route_scale\": %.17g, \"bias_update\": %.17g, \"groups\": %lld"
               ", \"top_groups\": %lld, \"z_loss\": %.17g, \"shared_experts\": %lld",
          moert_gate_names[l->gate], moert_act_names[l->act], moert_routing_names[l->routing], l->capacity_factor,
          l->aux_loss, l->bias ? "true" : "false", l->normalize_gate ? "true" : "false",
          l->batch_prioritized ? "true" : "false", l->gate_noise, l->route_scale, l->bias_update,
          (long long)l->groups, (long long)l->top_groups, l->z_loss, (long long)l->shared_experts);
  fputs(", \"variants\": [", out);
  for (int v = 0; v < lp->nvariants; v++) {
    const moert_variant *vv = &lp->variants[v];
    fprintf(out, "%s{\"name\": \"%s\", \"r\": %d, \"d\": %d, \"a2a\": \"%s\", \"send_bytes\": %.0f, "
                 "\"flops\": %.0f, \"mem_bytes\": %lld}",
            v ? ", " : "", vv->name, vv->r, vv->d, vv->a2a == MOERT_A2A_2DH ? "2dh" : "linear", vv->send_bytes,
            vv->flops, (long long)vv->mem_bytes);
  }
  fputs("], \"dropped\": ", out);
  moert_json_str(out, lp->dropped);
}

static bool moe_grad_written(const moert_layer *l, int s) {
  (void)l;
  /* their first GEMM runs with beta 0, in every variant; the shared experts' GEMMs too */
  return s == MOERT_MOE_FC1_W || s == MOERT_MOE_FC2_W || s == MOERT_MOE_SHARED_FC1_W || s == MOERT_MOE_SHARED_FC2_W;
}

#ifndef MOERT_LAYER_DESCRIBE_ONLY
static bool moe_fwd(moert_exec *e, int li, int64_t step, bool want_grad, moert_status *st) {
  (void)want_grad;
  return moert_moe_fwd(e, li, e->xin[li], step, st);
}
#define moe_bwd moert_moe_bwd
#else
#define moe_fwd NULL
#define moe_bwd NULL
#endif

const moert_layer_ops MOERT_LAYER_OPS(MOE) = {
    .name = "moe",
    .flags = MOERT_LF_OUTPUT | MOERT_LF_SWAP | MOERT_LF_COMPUTE | MOERT_LF_OWN_SEGMENTS,
    .nslots = MOERT_MOE__SLOTS,
    .slots = slots,
    .slot = moe_slot,
    .plan = moe_plan,
    .row = moe_row,
    .specs = moe_specs,
    .describe = moe_describe,
    .plan_shape = moe_shape,
    .plan_json = moe_json,
    .fwd = moe_fwd,
    .bwd = moe_bwd,
    .grad_written = moe_grad_written,
};
