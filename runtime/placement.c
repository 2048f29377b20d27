/* placement.c — plans of a model at a world size; see placement.h. */
#include "placement.h"

#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

const char *const moert_layer_kind_names[MOERT_L__COUNT] = {
#define X(k, s) s,
    MOERT_LAYER_KINDS(X)
#undef X
};
const char *const moert_fbuf_names[MOERT_F__COUNT] = {
#define X(n) #n,
    MOERT_FBUFS(X)
#undef X
};
const char *const moert_ibuf_names[MOERT_I__COUNT] = {
#define X(n) #n,
    MOERT_IBUFS(X)
#undef X
};

/* The cosine gate's projection width, as Tutel's (and compiler/spec.h). */
#define COSINE_PROJ 256

static int64_t align_up(int64_t n) { return (n + MOERT_ALIGN - 1) / MOERT_ALIGN * MOERT_ALIGN; }

static int64_t take(int64_t *top, int64_t n) {
  int64_t at = *top;
  *top += align_up(n);
  return at;
}

int64_t moert_capacity(const moert_layer *l, int64_t tokens, int64_t max_claims) {
  int64_t spe = (tokens + l->experts - 1) / l->experts;
  double f = l->capacity_factor;
  int64_t c;
  if (f > 0) {
    c = l->top_k * (int64_t)floor(f * (double)spe);
  } else {
    c = max_claims;
    if (f < 0) {
      int64_t cap = l->top_k * (int64_t)floor(-f * (double)spe);
      if (c > cap) c = cap;
    }
  }
  return c < 1 ? 1 : c;
}

int64_t moert_round_up(int64_t n, int64_t align) { return (n + align - 1) / align * align; }

static int64_t gcd64(int64_t a, int64_t b) {
  while (b) {
    int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

uint64_t moert_global_index(const moert_param *g, const moert_param_plan *pp, int64_t k) {
  if (g->place == MOERT_PLACE_REPLICATED) return (uint64_t)k;
  int64_t H = g->shape[g->place == MOERT_PLACE_EXPERT_OUT ? 1 : g->ndim - 1];
  if (g->swiglu_halves) H /= 2;
  int64_t inner = pp->count / pp->e_count; /* elements of one local expert */
  int64_t e = pp->e_first + k / inner, r = k % inner;
  int64_t gper = 1;
  for (int d = 1; d < g->ndim; d++) gper *= g->shape[d];
  switch (g->place) {
  case MOERT_PLACE_EXPERT_IN:
  case MOERT_PLACE_EXPERT_BIAS: {
    int64_t lcols = pp->shape[g->ndim - 1], gcols = g->shape[g->ndim - 1];
    int64_t row = r / lcols, col = r % lcols;
    int64_t half = g->swiglu_halves ? col / pp->h_count : 0;
    int64_t gcol = half * H + pp->h_first + col % pp->h_count;
    return (uint64_t)(e * gper + row * gcols + gcol);
  }
  case MOERT_PLACE_EXPERT_OUT: {
    int64_t mdim = g->shape[2];
    int64_t row = r / mdim, col = r % mdim;
    return (uint64_t)(e * gper + (pp->h_first + row) * mdim + col);
  }
  default: return (uint64_t)(e * gper + r);
  }
}

int moert_variant_find(const moert_layer_plan *lp, const char *name) {
  for (int i = 0; i < lp->nvariants; i++)
    if (strcmp(lp->variants[i].name, name) == 0) return i;
  return -1;
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

bool moert_plan_create(const moert_model *m, int world, int rank, int64_t tokens, bool training,
                       moert_plan **out, moert_status *st) {
  return moert_plan_create_nodes(m, world, rank, tokens, training, 1, out, st);
}

bool moert_plan_create_nodes(const moert_model *m, int world, int rank, int64_t tokens,
                             bool training, int nodes, moert_plan **out, moert_status *st) {
  *out = NULL;
  if (world < 1 || rank < 0 || rank >= world)
    return MOERT_FAIL(st, "bad world size %d or rank %d", world, rank);
  if (tokens < 1) return MOERT_FAIL(st, "tokens per rank must be positive, not %" PRId64, tokens);
  moert_plan *p = calloc(1, sizeof *p);
  if (p) {
    p->params = calloc((size_t)m->nparams + 1, sizeof *p->params);
    p->layers = calloc((size_t)m->nlayers + 1, sizeof *p->layers);
  }
  if (!p || !p->params || !p->layers) {
    moert_plan_destroy(p);
    return MOERT_FAIL(st, "out of memory making the plan");
  }
  p->model = m;
  p->world = world;
  p->rank = rank;
  p->tokens = tokens;

  const int64_t T = tokens, M = m->dim;

  /* the parameters: slices and offsets */
  int64_t ptop = 0;
  for (int i = 0; i < m->nparams; i++) {
    const moert_param *g = &m->params[i];
    const moert_layer *l = &m->layers[g->layer];
    moert_param_plan *pp = &p->params[i];
    int64_t global = 1;
    for (int d = 0; d < g->ndim; d++) global *= g->shape[d];
    p->global_params += global;
    pp->ndim = g->ndim;
    memcpy(pp->shape, g->shape, sizeof pp->shape);
    if (g->place != MOERT_PLACE_REPLICATED) {
      int64_t E = l->experts, H = l->hidden;
      if (E % world && world % E) {
        moert_plan_destroy(p);
        return MOERT_FAIL(st,
                          "MoE layer `%s` has %" PRId64 " experts, and %d ranks cannot share them: "
                          "run on a number of ranks that divides %" PRId64 " or that %" PRId64
                          " divides",
                          l->name, E, world, E, E);
      }
      int64_t S = E >= world ? 1 : world / E;
      if (H % S) {
        moert_plan_destroy(p);
        return MOERT_FAIL(st,
                          "`hidden` (%" PRId64 ") of MoE layer `%s` is not divisible by the shard "
                          "count S = %" PRId64 " (each of its %" PRId64 " experts is split over %d / %" PRId64
                          " ranks); run on a world size where S divides %" PRId64
                          ", or make hidden a multiple of %" PRId64,
                          H, l->name, S, E, world, E, H, S);
      }
      pp->e_count = E >= world ? E / world : 1;
      pp->e_first = E >= world ? rank * pp->e_count : rank / S;
      pp->h_count = H / S;
      pp->h_first = (rank % S) * pp->h_count;
      int halves = g->swiglu_halves ? 2 : 1;
      pp->shape[0] = pp->e_count;
      switch (g->place) {
      case MOERT_PLACE_EXPERT_IN: pp->shape[2] = halves * pp->h_count; break;
      case MOERT_PLACE_EXPERT_BIAS: pp->shape[1] = halves * pp->h_count; break;
      case MOERT_PLACE_EXPERT_OUT: pp->shape[1] = pp->h_count; break;
      default: break;
      }
    }
    pp->count = 1;
    for (int d = 0; d < pp->ndim; d++) pp->count *= pp->shape[d];
    p->layers[g->layer].params += pp->count;
  }
  /* offsets: the replicated parameters first, so their gradients are one
   * contiguous all-reduce; then the experts' */
  for (int pass = 0; pass < 2; pass++) {
    for (int i = 0; i < m->nparams; i++)
      if ((m->params[i].place == MOERT_PLACE_REPLICATED) == (pass == 0))
        p->params[i].offset = take(&ptop, p->params[i].count);
    if (pass == 0) p->repl_elems = ptop;
  }
  p->param_elems = ptop;
  p->state_elems = m->train.has_train && m->train.optimizer == MOERT_OPT_ADAM ? 2 * ptop : 0;

  /* activations, int32s and scratch, layer by layer */
  int64_t ftop = 0, itop = 0, smax = 0;
  int depth = 0;
  for (int li = 0; li < m->nlayers; li++) {
    const moert_layer *l = &m->layers[li];
    moert_layer_plan *lp = &p->layers[li];
    for (int k = 0; k < MOERT_F__COUNT; k++) lp->f[k] = -1;
    for (int k = 0; k < MOERT_I__COUNT; k++) lp->i[k] = -1;
    for (int k = 0; k < MOERT_S__COUNT; k++) lp->s[k] = -1;
    int64_t f0 = ftop, i0 = itop, stop = 0;
#define F(name, n) (lp->f[MOERT_F_##name] = take(&ftop, (n)))
#define I(name, n) (lp->i[MOERT_I_##name] = take(&itop, (n)))
#define S(name, n) (lp->s[MOERT_S_##name] = take(&stop, (n)))
    switch (l->kind) {
    case MOERT_L_EMBED:
      F(OUT, T * M);
      I(WIN, T * m->context);
      break;
    case MOERT_L_LAYERNORM:
      F(OUT, T * M);
      F(MEAN, T);
      F(RSTD, T);
      break;
    case MOERT_L_RMSNORM:
      F(OUT, T * M);
      F(RSTD, T);
      break;
    case MOERT_L_FFN: {
      int64_t H = l->hidden, H1 = l->act == MOERT_ACT_SWIGLU ? 2 * H : H;
      F(H, T * H1);
      F(A, T * H);
      F(OUT, T * M);
      S(DA, T * H);
      S(DH, T * H1);
      if (m->dtype == MOERT_DT_BF16) { /* bf16 copies, half a float each */
        S(XB, (T * M + 1) / 2);
        S(DYB, (T * M + 1) / 2);
      }
      lp->flops_fwd = 2.0 * T * M * H1 + 2.0 * T * H * M;
      break;
    }
    case MOERT_L_MOE: {
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
      F(LOGITS, T * E);
      F(SCORES, T * E);
      if (l->gate_noise > 0) F(NOISE, T * E);
      if (l->gate == MOERT_GATE_COSINE) {
        F(PROJ, T * COSINE_PROJ);
        F(PROJN, T * COSINE_PROJ);
        F(PROJNORM, T);
        F(SIMN, COSINE_PROJ * E);
        F(SIMNORM, E);
        F(RAW, T * E);
        S(DRAW, T * E);
        S(DPROJN, T * COSINE_PROJ);
        S(DPROJ, T * COSINE_PROJ);
        S(DSIMN, COSINE_PROJ * E);
        S(DSIM, COSINE_PROJ * E);
      }
      F(TOPV, T * K);
      F(GATE, T * K);
      I(IDX, T * K);
      I(LOC, T * K);
      if (l->batch_prioritized) I(ORDER, T);
      I(COUNTS, E);
      F(SRC, E * Cb * M);
      F(SRCY, E * Cb * M);
      F(EX, X);
      F(EH, E * Cb * H1);  /* the same for every variant: rows * (H1 / r) */
      F(EA, E * Cb * H);
      if (gather) F(GW, gather);
      F(SSUM, E);
      F(TOP1, E);
      F(DCOEF, E);
      F(OUT, T * M);
      S(DGATE, T * K);
      S(DLOGITS, T * E);
      S(XS, X);
      S(XR, X);
      S(YS, X);
      S(YR, X);
      S(EY, X);
      S(DSRCY, E * Cb * M);
      S(DSRC, E * Cb * M);
      S(DEX, X);
      S(DEH, E * Cb * H1);
      S(DEA, E * Cb * H);
      if (gather) {
        S(DGW, gather);
        S(GT1, gather); /* gradients on their way back to their owners */
        S(GT2, gather);
      }
      double gate = l->gate == MOERT_GATE_COSINE ? 2.0 * T * M * COSINE_PROJ + 2.0 * T * COSINE_PROJ * E
                                                 : 2.0 * T * M * E;
      lp->flops_fwd = gate + (double)T * K * (2.0 * M * H1 + 2.0 * H * M);
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
      break;
    }
    case MOERT_L_RES_BEGIN:
      depth++;
      if (depth > p->max_res_depth) p->max_res_depth = depth;
      break;
    case MOERT_L_RES_END:
      depth--;
      F(OUT, T * M);
      break;
    case MOERT_L_HEAD_XENT:
      F(HLOGITS, T * m->vocab);
      I(TOKENS, T);
      S(DLOGITS, T * m->vocab);
      if (m->dtype == MOERT_DT_BF16) { /* the GEMMs' bf16 operands; the logits stay fp32 */
        S(XB, (T * M + 1) / 2);
        S(DLB, (T * m->vocab + 1) / 2);
      }
      lp->flops_fwd = 2.0 * T * M * m->vocab;
      break;
    case MOERT_L_MSE:
      F(TARGET, T * M);
      break;
    case MOERT_L__COUNT: break;
    }
#undef F
#undef I
#undef S
    lp->flops_bwd = 2 * lp->flops_fwd;
    lp->act_bytes = (ftop - f0) * 4 + (itop - i0) * 4;
    if (stop > smax) smax = stop;
    p->flops_fwd += lp->flops_fwd;
    p->flops_bwd += lp->flops_bwd;
  }
  p->act_elems = ftop;
  p->int_elems = itop;
  p->scratch_elems = smax;
  *out = p;
  return true;
}

void moert_plan_destroy(moert_plan *p) {
  if (!p) return;
  free(p->params);
  free(p->layers);
  free(p);
}

/* --- printing --- */

static const char *human(char *buf, size_t n, double v, const char *unit) {
  const char *pre[] = {"", "k", "M", "G", "T", "P"};
  int k = 0;
  while (fabs(v) >= 1000 && k < 5) {
    v /= 1000;
    k++;
  }
  snprintf(buf, n, k ? "%.2f %s%s" : "%.0f %s%s", v, pre[k], unit);
  return buf;
}

static void json_str(FILE *out, const char *s) {
  fputc('"', out);
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\') fprintf(out, "\\%c", c);
    else if (c < 0x20) fprintf(out, "\\u%04x", c);
    else fputc(c, out);
  }
  fputc('"', out);
}

static int64_t layer_param_count_global(const moert_model *m, int li) {
  int64_t n = 0;
  const moert_layer *l = &m->layers[li];
  for (int i = l->param_first; i < l->param_first + l->nparams; i++) {
    int64_t c = 1;
    for (int d = 0; d < m->params[i].ndim; d++) c *= m->params[i].shape[d];
    n += c;
  }
  return n;
}

void moert_plan_print(const moert_plan *p, FILE *out, bool json) {
  const moert_model *m = p->model;
  int64_t state_bytes = p->state_elems * 4, param_bytes = p->param_elems * 4;
  int64_t act_bytes = (p->act_elems + p->int_elems) * 4;
  int64_t scratch_bytes = (p->scratch_elems + (int64_t)(2 + p->max_res_depth) * p->tokens * m->dim) * 4;
  if (json) {
    fputs("{\n  \"model\": ", out);
    json_str(out, m->name);
    fprintf(out, ",\n  \"world\": %d,\n  \"rank\": %d,\n  \"tokens_per_rank\": %" PRId64
                 ",\n  \"dim\": %" PRId64 ",\n  \"dtype\": \"%s\",\n",
            p->world, p->rank, p->tokens, m->dim, m->dtype == MOERT_DT_BF16 ? "bf16" : "fp32");
    fprintf(out, "  \"params\": {\"global\": %" PRId64 ", \"local\": %" PRId64 "},\n", p->global_params,
            p->param_elems);
    fprintf(out, "  \"memory_bytes\": {\"params\": %" PRId64 ", \"grads\": %" PRId64
                 ", \"optimizer\": %" PRId64 ", \"activations\": %" PRId64 ", \"scratch\": %" PRId64
                 "},\n",
            param_bytes, m->train.has_train ? param_bytes : 0, state_bytes, act_bytes, scratch_bytes);
    fprintf(out, "  \"flops_per_step\": {\"forward\": %.0f, \"backward\": %.0f},\n", p->flops_fwd,
            m->train.has_train ? p->flops_bwd : 0.0);
    fputs("  \"layers\": [\n", out);
    for (int li = 0; li < m->nlayers; li++) {
      const moert_layer *l = &m->layers[li];
      const moert_layer_plan *lp = &p->layers[li];
      fputs("    {\"name\": ", out);
      json_str(out, l->name);
      fprintf(out, ", \"kind\": \"%s\", \"params\": %" PRId64 ", \"local_params\": %" PRId64
                   ", \"flops_fwd\": %.0f, \"flops_bwd\": %.0f, \"act_bytes\": %" PRId64,
              moert_layer_kind_names[l->kind], layer_param_count_global(m, li), lp->params,
              lp->flops_fwd, lp->flops_bwd, lp->act_bytes);
      if (l->kind == MOERT_L_MOE) {
        fprintf(out, ", \"experts\": %" PRId64 ", \"top_k\": %" PRId64 ", \"hidden\": %" PRId64
                     ", \"experts_local\": %" PRId64 ", \"shards\": %" PRId64
                     ", \"capacity_bound\": %" PRId64 ", \"capacity_align\": %" PRId64,
                l->experts, l->top_k, l->hidden, lp->experts_local, lp->shards, lp->capacity_bound,
                lp->align);
        fputs(", \"variants\": [", out);
        for (int v = 0; v < lp->nvariants; v++) {
          const moert_variant *vv = &lp->variants[v];
          fprintf(out, "%s{\"name\": \"%s\", \"r\": %d, \"d\": %d, \"a2a\": \"%s\", \"send_bytes\": %.0f, "
                       "\"flops\": %.0f, \"mem_bytes\": %" PRId64 "}",
                  v ? ", " : "", vv->name, vv->r, vv->d, vv->a2a == MOERT_A2A_2DH ? "2dh" : "linear",
                  vv->send_bytes, vv->flops, vv->mem_bytes);
        }
        fputs("], \"dropped\": ", out);
        json_str(out, lp->dropped);
      }
      if (l->kind == MOERT_L_FFN) fprintf(out, ", \"hidden\": %" PRId64, l->hidden);
      fputs(", \"tensors\": [", out);
      bool first = true;
      for (int i = l->param_first; i < l->param_first + l->nparams; i++) {
        const moert_param_plan *pp = &p->params[i];
        fprintf(out, "%s{\"name\": ", first ? "" : ", ");
        json_str(out, m->params[i].name);
        fputs(", \"shape\": [", out);
        for (int d = 0; d < pp->ndim; d++) fprintf(out, "%s%" PRId64, d ? ", " : "", pp->shape[d]);
        fprintf(out, "], \"offset\": %" PRId64 "}", pp->offset);
        first = false;
      }
      fprintf(out, "]}%s\n", li + 1 < m->nlayers ? "," : "");
    }
    fputs("  ]\n}\n", out);
    return;
  }
  char b1[32], b2[32], b3[32];
  fprintf(out, "plan of %s at %d rank%s (rank %d), %" PRId64 " tokens per rank, dim %" PRId64 ", %s\n\n",
          m->name, p->world, p->world == 1 ? "" : "s", p->rank, p->tokens, m->dim,
          m->dtype == MOERT_DT_BF16 ? "bf16" : "fp32");
  fprintf(out, "%-24s %-10s %-28s %12s %12s %12s\n", "layer", "kind", "output / experts", "params",
          "fwd FLOPs", "saved act");
  for (int li = 0; li < m->nlayers; li++) {
    const moert_layer *l = &m->layers[li];
    const moert_layer_plan *lp = &p->layers[li];
    char shape[64];
    if (l->kind == MOERT_L_MOE)
      snprintf(shape, sizeof shape, "E %" PRId64 " (%" PRId64 " here) k %" PRId64 " C<=%" PRId64,
               l->experts, lp->experts_local, l->top_k, lp->capacity_bound);
    else if (l->kind == MOERT_L_HEAD_XENT)
      snprintf(shape, sizeof shape, "[%" PRId64 ", %" PRId64 "]", p->tokens, m->vocab);
    else if (l->kind == MOERT_L_RES_BEGIN)
      snprintf(shape, sizeof shape, "(skip)");
    else
      snprintf(shape, sizeof shape, "[%" PRId64 ", %" PRId64 "]", p->tokens, m->dim);
    fprintf(out, "%-24.24s %-10s %-28s %12s %12s %12s\n", l->name, moert_layer_kind_names[l->kind],
            shape, human(b1, sizeof b1, (double)lp->params, ""),
            human(b2, sizeof b2, lp->flops_fwd, ""), human(b3, sizeof b3, (double)lp->act_bytes, "B"));
  }
  for (int li = 0; li < m->nlayers; li++) {
    const moert_layer *l = &m->layers[li];
    const moert_layer_plan *lp = &p->layers[li];
    if (l->kind != MOERT_L_MOE) continue;
    fprintf(out, "\nmoe %s at %d rank%s: S = %" PRId64 " (ranks per expert), C padded to a multiple of %" PRId64 "\n",
            l->name, p->world, p->world == 1 ? "" : "s", lp->shards, lp->align);
    fprintf(out, "  %-22s %14s %14s %14s\n", "variant", "sent/step", "expert FLOPs", "memory");
    for (int v = 0; v < lp->nvariants; v++) {
      const moert_variant *vv = &lp->variants[v];
      fprintf(out, "  %-22s %14s %14s %14s\n", vv->name, human(b1, sizeof b1, vv->send_bytes, "B"),
              human(b2, sizeof b2, vv->flops, ""), human(b3, sizeof b3, (double)vv->mem_bytes, "B"));
    }
    if (lp->dropped[0]) fprintf(out, "  not at this world size: %s\n", lp->dropped);
  }
  fprintf(out, "\nparameters: %s (%s on this rank)\n", human(b1, sizeof b1, (double)p->global_params, ""),
          human(b2, sizeof b2, (double)p->param_elems, ""));
  fprintf(out, "FLOPs per step on this rank: forward %s, backward %s\n",
          human(b1, sizeof b1, p->flops_fwd, ""),
          human(b2, sizeof b2, m->train.has_train ? p->flops_bwd : 0, ""));
  fprintf(out, "memory on this rank (fp32 on the cpu backend): params %s, grads %s, optimizer %s, "
               "activations %s, scratch %s\n",
          human(b1, sizeof b1, (double)param_bytes, "B"),
          human(b2, sizeof b2, m->train.has_train ? (double)param_bytes : 0, "B"),
          human(b3, sizeof b3, (double)state_bytes, "B"),
          human((char[32]){0}, 32, (double)act_bytes, "B"),
          human((char[32]){0}, 32, (double)scratch_bytes, "B"));
}
