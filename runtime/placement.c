/* placement.c — plans of a model at a world size; see placement.h. */
#include "placement.h"

#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "layer.h"

const char *const moert_layer_kind_names[MOERT_L__COUNT] = {
#define X(k, s) s,
    MOERT_LAYER_KINDS(X)
#undef X
};
const char *const moert_act_names[] = {"relu", "gelu", "silu", "swiglu", "tanh"};
const char *const moert_gate_names[] = {"softmax", "cosine", "sigmoid"};
const char *const moert_routing_names[] = {"token_choice", "expert_choice"};
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

static int64_t align_up(int64_t n) { return (n + MOERT_ALIGN - 1) / MOERT_ALIGN * MOERT_ALIGN; }

static int64_t take(int64_t *top, int64_t n) {
  int64_t at = *top;
  *top += align_up(n);
  return at;
}

void moert_plan_f(moert_plan_ctx *c, moert_fbuf b, int64_t n) { c->lp->f[b] = take(c->ftop, n); }
void moert_plan_i(moert_plan_ctx *c, moert_ibuf b, int64_t n) { c->lp->i[b] = take(c->itop, n); }
void moert_plan_s(moert_plan_ctx *c, moert_sbuf b, int64_t n) { c->lp->s[b] = take(c->stop, n); }

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

  const int64_t T = tokens;
  /* every activation of this rank within MOERT_MAX_ACT_ELEMS (compiler/sema.c, the same rule) */
  int64_t row = moert_layer_widest_row(m), act;
  if (T > MOERT_MAX_TOKENS || __builtin_mul_overflow(T, row, &act) || act > MOERT_MAX_ACT_ELEMS) {
    moert_plan_destroy(p);
    if (T > MOERT_MAX_TOKENS)
      return MOERT_FAIL(st, "%" PRId64 " tokens per rank (limit is %d: token indices are 32-bit)", T,
                        MOERT_MAX_TOKENS);
    return MOERT_FAIL(st, "%" PRId64 " tokens per rank make an activation of more than 2^40 elements (%" PRId64
                      " per token); give fewer tokens per rank (--tokens) or run on more ranks", T, row);
  }
  if (!moert_layer_resolve_slots(m, p, st)) {
    moert_plan_destroy(p);
    return false;
  }

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
   * contiguous all-reduce; then the experts'; then the frozen ones (whole on
   * every rank), past what the optimizer and the gradient norm cover */
  for (int pass = 0; pass < 3; pass++) {
    for (int i = 0; i < m->nparams; i++) {
      const moert_param *g = &m->params[i];
      int want = g->frozen ? 2 : g->place == MOERT_PLACE_REPLICATED ? 0 : 1;
      if (want == pass) p->params[i].offset = take(&ptop, p->params[i].count);
    }
    if (pass == 0) p->repl_elems = ptop;
    if (pass == 1) p->trained_elems = ptop;
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
    const moert_layer_ops *ops = moert_layer_ops_of(l->kind);
    moert_plan_ctx c = {.m = m, .l = l, .lp = lp, .p = p, .T = T, .world = world, .nodes = nodes,
                        .training = training, .ftop = &ftop, .itop = &itop, .stop = &stop, .depth = &depth};
    if (ops->plan && !ops->plan(&c, st)) {
      moert_plan_destroy(p);
      return false;
    }
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

void moert_json_str(FILE *out, const char *s) {
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

static int64_t scratch_bytes_of(const moert_plan *p) {
  return (p->scratch_elems + (int64_t)(2 + p->max_res_depth) * p->tokens * p->model->dim) * 4;
}

int64_t moert_plan_memory_bytes(const moert_plan *p, bool training) {
  return p->param_elems * 4 * (training ? 2 : 1) + p->state_elems * 4 + (p->act_elems + p->int_elems) * 4 +
         scratch_bytes_of(p);
}

void moert_plan_print(const moert_plan *p, FILE *out, bool json) { moert_plan_print_with(p, out, json, NULL, NULL); }

void moert_plan_print_with(const moert_plan *p, FILE *out, bool json, moert_plan_more more, void *ctx) {
  const moert_model *m = p->model;
  int64_t state_bytes = p->state_elems * 4, param_bytes = p->param_elems * 4;
  int64_t act_bytes = (p->act_elems + p->int_elems) * 4;
  int64_t scratch_bytes = scratch_bytes_of(p);
  if (json) {
    fputs("{\n  \"model\": ", out);
    moert_json_str(out, m->name);
    fprintf(out, ",\n  \"world\": %d,\n  \"rank\": %d,\n  \"tokens_per_rank\": %" PRId64
                 ",\n  \"dim\": %" PRId64 ",\n  \"dtype\": \"%s\",\n",
            p->world, p->rank, p->tokens, m->dim, m->dtype == MOERT_DT_BF16 ? "bf16" : "fp32");
    if (m->seq) fprintf(out, "  \"seq\": %" PRId64 ",\n", m->seq); /* only where set: older plans stay */
    if (m->vocab)
      fprintf(out, "  \"vocab\": %" PRId64 ",\n  \"context\": %" PRId64 ",\n", m->vocab, m->context);
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
      moert_json_str(out, l->name);
      fprintf(out, ", \"kind\": \"%s\", \"params\": %" PRId64 ", \"local_params\": %" PRId64
                   ", \"flops_fwd\": %.0f, \"flops_bwd\": %.0f, \"act_bytes\": %" PRId64,
              moert_layer_kind_names[l->kind], layer_param_count_global(m, li), lp->params,
              lp->flops_fwd, lp->flops_bwd, lp->act_bytes);
      const moert_layer_ops *ops = moert_layer_ops_of(l->kind);
      if (ops->plan_json) ops->plan_json(p, li, out);
      fputs(", \"tensors\": [", out);
      bool first = true;
      for (int i = l->param_first; i < l->param_first + l->nparams; i++) {
        const moert_param_plan *pp = &p->params[i];
        fprintf(out, "%s{\"name\": ", first ? "" : ", ");
        moert_json_str(out, m->params[i].name);
        fputs(", \"shape\": [", out);
        for (int d = 0; d < pp->ndim; d++) fprintf(out, "%s%" PRId64, d ? ", " : "", pp->shape[d]);
        fprintf(out, "], \"offset\": %" PRId64 "}", pp->offset);
        first = false;
      }
      fprintf(out, "]}%s\n", li + 1 < m->nlayers ? "," : "");
    }
    fputs(more ? "  ],\n" : "  ]\n", out);
    if (more) more(ctx, out, true);
    fputs("}\n", out);
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
    const moert_layer_ops *ops = moert_layer_ops_of(l->kind);
    if (ops->plan_shape) ops->plan_shape(p, li, shape, sizeof shape);
    else snprintf(shape, sizeof shape, "[%" PRId64 ", %" PRId64 "]", p->tokens, m->dim);
    fprintf(out, "%-24.24s %-10s %-28s %12s %12s %12s\n", l->name, moert_layer_kind_names[l->kind],
            shape, human(b1, sizeof b1, (double)lp->params, ""),
            human(b2, sizeof b2, lp->flops_fwd, ""), human(b3, sizeof b3, (double)lp->act_bytes, "B"));
  }
  for (int li = 0; li < m->nlayers; li++) {
    const moert_layer *l = &m->layers[li];
    const moert_layer_plan *lp = &p->layers[li];
    if (lp->nvariants == 0) continue; /* a MoE layer's candidates */
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
  if (more) more(ctx, out, false);
}
