/* step.c — the executor: forward, loss, backward and update; see exec.h.
 * Layers run in the order of the model description; the backward pass walks
 * them in reverse with two [T, M] gradient buffers (the gradient of the
 * current layer's output, and of its input) and one skip-path buffer per
 * level of residual nesting. */
#include "exec.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "layer.h"
#include "layer_exec.h"
#include "moe.h"
#include "rng.h"

/* A graph segment (moert_exec_segment) seen; its graph's id is its index
 * in e->graphs.segs. */
struct moert_segment {
  moert_seg_key key;
  bool ran;      /* once, by fn itself */
  bool captured; /* its graph exists */
  bool eager;    /* its capture failed: fn runs itself */
};

static bool init_params(moert_exec *e, moert_status *st) {
  const moert_model *m = e->m;
  int64_t n = e->plan->param_elems;
  float *host = malloc(sizeof(float) * (size_t)(n ? n : 1));
  if (!host) return MOERT_FAIL(st, "out of memory initializing %lld parameters", (long long)n);
  memset(host, 0, sizeof(float) * (size_t)(n ? n : 1));
  for (int i = 0; i < m->nparams; i++) {
    const moert_param *g = &m->params[i];
    const moert_param_plan *pp = &e->plan->params[i];
    float *p = host + pp->offset;
    for (int64_t k = 0; k < pp->count; k++) {
      uint64_t gi = moert_global_index(g, pp, k);
      float s = (float)g->scale;
      switch (g->init) {
      case MOERT_INIT_ZEROS: p[k] = 0; break;
      case MOERT_INIT_ONES: p[k] = 1; break;
      case MOERT_INIT_CONST: p[k] = s; break;
      case MOERT_INIT_UNIFORM: p[k] = (2 * moert_rand_uniform(e->seed, (uint64_t)i, gi) - 1) * s; break;
      case MOERT_INIT_NORMAL: p[k] = moert_rand_normal(e->seed, (uint64_t)i, gi) * s; break;
      }
    }
  }
  bool ok = e->b->upload(e->b, e->params, host, sizeof(float) * (size_t)n, st);
  free(host);
  return ok ? true : MOERT_UP(st);
}

static int by_offset(const void *a, const void *b) {
  const int64_t *x = a, *y = b;
  return (x[0] > y[0]) - (x[0] < y[0]);
}

/* e->zero_runs: the gradients a step zeroes, merged where adjacent. */
static bool plan_zeroing(moert_exec *e, moert_status *st) {
  const moert_model *m = e->m;
  int64_t (*r)[2] = calloc((size_t)m->nparams + 1, sizeof *r);
  if (!r) return MOERT_FAIL(st, "out of memory");
  /* the gradients the backward writes whole (beta 0) before anything adds to them */
  bool *written = calloc((size_t)m->nparams + 1, sizeof *written);
  if (!written) {
    free(r);
    return MOERT_FAIL(st, "out of memory");
  }
  for (int li = 0; li < m->nlayers; li++) {
    const moert_layer_ops *ops = moert_layer_ops_of(m->layers[li].kind);
    for (int s = 0; s < ops->nslots; s++) {
      int i = e->plan->layers[li].slot[s];
      if (i >= 0 && ops->grad_written) written[i] = ops->grad_written(&m->layers[li], s);
    }
  }
  int n = 0;
  for (int i = 0; i < m->nparams; i++) {
    const moert_param_plan *pp = &e->plan->params[i];
    if (pp->count > 0 && !written[i]) {
      r[n][0] = pp->offset;
      r[n][1] = pp->count;
      n++;
    }
  }
  free(written);
  qsort(r, (size_t)n, sizeof *r, by_offset);
  int k = 0;
  for (int i = 0; i < n; i++) {
    if (k > 0 && r[k - 1][0] + r[k - 1][1] == r[i][0]) r[k - 1][1] += r[i][1];
    else {
      r[k][0] = r[i][0];
      r[k][1] = r[i][1];
      k++;
    }
  }
  e->zero_runs = r;
  e->nzero_runs = k;
  return true;
}

static bool zero_runs(moert_exec *e, void *ctx, moert_status *st) {
  (void)ctx, (void)st;
  for (int i = 0; i < e->nzero_runs; i++)
    e->b->zero(e->grads + e->zero_runs[i][0], sizeof(float) * (size_t)e->zero_runs[i][1]);
  return true;
}

/* The gradients a step adds to, zeroed (a graph: the same ranges each step). */
static bool zero_grads(moert_exec *e, moert_status *st) {
  moert_seg_key k = {.li = -1, .kind = MOERT_SEG_ZERO, .variant = -1};
  return moert_exec_segment(e, &k, zero_runs, NULL, st) ? true : MOERT_UP(st);
}

int64_t moert_exec_bytes(const moert_plan *plan, bool training) {
  int64_t TM = plan->tokens * plan->model->dim;
  int64_t elems = plan->param_elems + plan->act_elems + plan->int_elems + plan->scratch_elems + TM;
  if (training) elems += plan->param_elems + plan->state_elems + (2 + (int64_t)plan->max_res_depth) * TM;
  /* a bf16 model's bf16 copy of the parameters (when its experts run in bf16) */
  if (plan->model->dtype == MOERT_DT_BF16) elems += (plan->param_elems + 1) / 2;
  return elems * (int64_t)sizeof(float);
}

bool moert_exec_oom(const moert_plan *plan, bool training, const char *device, double free_bytes,
                    double total_bytes, moert_status *st) {
  if (st->failed && strncmp(st->msg, MOERT_OOM_PREFIX, strlen(MOERT_OOM_PREFIX)) != 0) return false;
  const moert_model *m = plan->model;
  double gb = 1e9, f = sizeof(float);
  double need = (double)moert_exec_bytes(plan, training);
  double par = (double)plan->param_elems * f, grads = training ? par : 0,
         state = training ? (double)plan->state_elems * f : 0;
  double act = (double)(plan->act_elems + plan->int_elems) * f, scratch = (double)plan->scratch_elems * f;
  double tok = need - par - grads - state - act - scratch;
  /* everything but the parameters grows with the tokens, about linearly */
  double fixed = par + grads + state, per_token = (need - fixed) / (double)plan->tokens;
  int64_t fit = free_bytes > fixed && per_token > 0 ? (int64_t)((free_bytes - fixed) / per_token * 0.9) : 0;
  char tokens_hint[96];
  if (fit > 0 && fit < plan->tokens)
    snprintf(tokens_hint, sizeof tokens_hint, "now %lld; about %lld might fit", (long long)plan->tokens,
             (long long)fit);
  else
    snprintf(tokens_hint, sizeof tokens_hint, "now %lld", (long long)plan->tokens);
  char b[8][24];
  double v[8] = {need, par, grads, state, act, scratch, tok, free_bytes};
  for (int i = 0; i < 8; i++) {
    double x = v[i] < 0 ? 0 : v[i];
    if (x >= 0.1 * gb || x == 0) snprintf(b[i], sizeof b[i], "%.2f GB", x / gb);
    else snprintf(b[i], sizeof b[i], "%.2f MB", x / 1e6);
  }
  char msg[sizeof st->msg];
  snprintf(msg, sizeof msg,
           MOERT_OOM_PREFIX " on rank %d: the plan needs %s on this rank (parameters %s, gradients %s, "
           "optimizer state %s, saved activations %s, scratch %s, token buffers %s) and the GPU%s%s%s "
           "has %s free of %.2f GB. To fit: fewer tokens per rank (--tokens N; %s), more ranks (mpirun "
           "-np N splits the experts and the tokens), smaller `experts` or `hidden` in the spec%s",
           plan->rank, b[0], b[1], b[2], b[3], b[4], b[5], b[6], device ? " (" : "", device ? device : "",
           device ? ")" : "", b[7], total_bytes / gb, tokens_hint,
           m->dtype == MOERT_DT_FP32 ? ", or `dtype = bf16`" : "");
  if (!st->failed) return MOERT_FAIL(st, "%s", msg);
  memcpy(st->msg, msg, sizeof msg);
  return MOERT_UP(st);
}

/* A failed pool allocation: a backend's out-of-memory message becomes
 * moert_exec_oom's, with the device's memory after the pools were freed. */
static bool oom(const moert_plan *plan, bool training, const moert_backend *b, moert_status *st) {
  size_t free_b = 0, total_b = 0;
  if (strncmp(st->msg, MOERT_OOM_PREFIX, strlen(MOERT_OOM_PREFIX)) != 0 ||
      !moert_backend_cuda_mem_info(b, &free_b, &total_b))
    return MOERT_UP(st);
  return moert_exec_oom(plan, training, moert_backend_cuda_device_name(b), (double)free_b,
                        (double)total_b, st);
}

bool moert_exec_create(moert_exec **out, const moert_model *m, moert_plan *plan, moert_backend *b,
                       moert_comm *comm, bool training, uint64_t seed, moert_status *st) {
  *out = NULL;
  if (b != moert_backend_cpu() && !comm->device_buffers)
    return MOERT_FAIL(st, "the %s backend's executor was given the %s comm, whose collectives take host memory: "
                      "wrap it with moert_comm_staged_create (as runtime/run.c does), or use nccl",
                      b->name, comm->name);
  moert_exec *e = calloc(1, sizeof *e);
  if (!e) return MOERT_FAIL(st, "out of memory");
  e->m = m;
  e->plan = plan;
  e->b = b;
  e->comm = comm;
  e->training = training;
  e->seed = seed;
  e->xin = calloc((size_t)m->nlayers + 1, sizeof *e->xin);
  e->stack = calloc((size_t)plan->max_res_depth + 1, sizeof *e->stack);
  e->skip = calloc((size_t)plan->max_res_depth + 1, sizeof *e->skip);
  e->moe.capacity = calloc((size_t)m->nlayers + 1, sizeof *e->moe.capacity);
  e->moe.keep = calloc((size_t)m->nlayers + 1, sizeof *e->moe.keep);
  e->aux_h = calloc((size_t)m->nlayers + 1, sizeof *e->aux_h);
  e->moe.variant = calloc((size_t)m->nlayers + 1, sizeof *e->moe.variant);
  e->moe.layer_routed = calloc((size_t)m->nlayers + 1, sizeof *e->moe.layer_routed);
  e->moe.layer_dropped = calloc((size_t)m->nlayers + 1, sizeof *e->moe.layer_dropped);
  e->moe.entropy = calloc((size_t)m->nlayers + 1, sizeof *e->moe.entropy);
  e->layer_ms = calloc((size_t)m->nlayers + 1, sizeof *e->layer_ms);
  e->layer_marks = calloc(4 * (size_t)m->nlayers + 1, sizeof *e->layer_marks);
  e->res_in = calloc((size_t)m->nlayers + 1, sizeof *e->res_in);
  e->res_grad = calloc((size_t)m->nlayers + 1, sizeof *e->res_grad);
  int64_t loads = 0;
  for (int i = 0; i < m->nlayers; i++)
    if (m->layers[i].kind == MOERT_L_MOE) loads += m->layers[i].experts;
  e->moe.load = calloc((size_t)loads + 1, sizeof *e->moe.load);
  e->moe.load_sum = calloc((size_t)loads + 1, sizeof *e->moe.load_sum);
  if (!e->xin || !e->stack || !e->skip || !e->moe.capacity || !e->moe.keep || !e->aux_h || !e->moe.load ||
      !e->moe.load_sum || !e->moe.variant ||
      !e->moe.layer_routed || !e->moe.layer_dropped || !e->moe.entropy ||
      !e->layer_ms || !e->layer_marks || !e->res_in || !e->res_grad) {
    moert_exec_destroy(e);
    return MOERT_FAIL(st, "out of memory");
  }
  int64_t TM = plan->tokens * m->dim;
  size_t f = sizeof(float);
#define ALLOC(ptr, n)                                                                  \
  if (!b->alloc(b, (size_t)(n) * f + f, (void **)&(ptr), st)) {                        \
    moert_exec_destroy(e);                                                             \
    return oom(plan, training, b, st);                                                 \
  }
  ALLOC(e->params, plan->param_elems);
  e->xdt = m->dtype == MOERT_DT_BF16 && b->bf16 && moert_moe_bf16_fits(m, plan) ? MOERT_BF16 : MOERT_F32;
  if (e->xdt == MOERT_BF16) ALLOC(e->wlow, (plan->param_elems + 1) / 2);
  ALLOC(e->act, plan->act_elems);
  ALLOC(e->iact, plan->int_elems);
  ALLOC(e->input, TM);
  ALLOC(e->scratch, plan->scratch_elems); /* MoE layers use it in the forward pass too */
  ALLOC(e->dloss, 2);
  ALLOC(e->daux, m->nlayers);
  if (training) {
    ALLOC(e->dnorm_part, 2 * ((size_t)m->nparams + 1));
    ALLOC(e->dnorm, 2);
    ALLOC(e->dhilo, 2);
    ALLOC(e->dclip, 1);
  }
  if (training) {
    ALLOC(e->grads, plan->param_elems);
    ALLOC(e->state, plan->state_elems);
    ALLOC(e->dcur, TM);
    ALLOC(e->dnext, TM);
    e->dbuf[0] = e->dcur;
    e->dbuf[1] = e->dnext;
    for (int i = 0; i < plan->max_res_depth; i++) ALLOC(e->skip[i], TM);
    ALLOC(e->dstep, 2);
  }
#undef ALLOC
  const char *graphs = getenv("MOEC_CUDA_GRAPHS");
  e->graphs.off = graphs && strcmp(graphs, "0") == 0 ? "MOEC_CUDA_GRAPHS=0"
                  : !b->graph_begin ? "the CUDA driver cannot capture streams"
                  : !comm->capturable ? "the comm stages through host memory; --comm nccl can be captured"
                                      : NULL;
  if (!e->graphs.off && !(e->graphs.segs = calloc(MOERT_MAX_GRAPHS, sizeof *e->graphs.segs))) {
    moert_exec_destroy(e);
    return MOERT_FAIL(st, "out of memory");
  }
  if (!init_params(e, st) || !plan_zeroing(e, st) || !moert_moe_setup(e, st)) {
    moert_exec_destroy(e);
    return MOERT_UP(st);
  }
  *out = e;
  return true;
}

void moert_exec_destroy(moert_exec *e) {
  if (!e) return;
  moert_moe_teardown(e);
  moert_backend *b = e->b;
  b->free(b, e->params);
  b->free(b, e->wlow);
  b->free(b, e->grads);
  b->free(b, e->state);
  b->free(b, e->act);
  b->free(b, e->scratch);
  b->free(b, e->iact);
  b->free(b, e->input);
  b->free(b, e->dcur);
  b->free(b, e->dloss);
  b->free(b, e->daux);
  b->free(b, e->dnorm_part);
  b->free(b, e->dnorm);
  b->free(b, e->dhilo);
  b->free(b, e->dclip);
  b->free(b, e->dnext);
  b->free(b, e->dstep);
  if (e->skip)
    for (int i = 0; i < e->plan->max_res_depth; i++) b->free(b, e->skip[i]);
  free(e->skip);
  free(e->xin);
  free(e->stack);
  free(e->moe.capacity);
  free(e->moe.keep);
  free(e->aux_h);
  free(e->zero_runs);
  free(e->moe.load);
  free(e->moe.load_sum);
  free(e->moe.variant);
  free(e->moe.layer_routed);
  free(e->moe.layer_dropped);
  free(e->moe.entropy);
  free(e->layer_ms);
  free(e->layer_marks);
  free(e->res_in);
  free(e->res_grad);
  free(e->graphs.segs);
  if (e->dec.state)
    for (int i = 0; i < e->m->nlayers; i++) b->free(b, e->dec.state[i]);
  free(e->dec.state);
  b->free(b, e->teacher_w1);
  b->free(b, e->teacher_w2);
  b->free(b, e->teacher_h);
  free(e);
}

bool moert_exec_use_data(moert_exec *e, const moert_data *d, moert_status *st) {
  moert_backend *b = e->b;
  const float *w1, *w2;
  int64_t H;
  moert_data_teacher(d, &w1, &w2, &H);
  if (b == moert_backend_cpu() || e->m->vocab || !w1 || e->teacher_w1) return true;
  int64_t M = e->m->dim;
  e->teacher_rows = e->plan->tokens < 4096 ? e->plan->tokens : 4096;
  size_t wb = sizeof(float) * (size_t)(M * H);
  bool ok = b->alloc(b, wb, (void **)&e->teacher_w1, st) && b->alloc(b, wb, (void **)&e->teacher_w2, st) &&
            b->alloc(b, sizeof(float) * (size_t)(e->teacher_rows * H), (void **)&e->teacher_h, st) &&
            b->upload(b, e->teacher_w1, w1, wb, st) && b->upload(b, e->teacher_w2, w2, wb, st);
  e->teacher_hidden = H;
  return ok || MOERT_UP(st);
}

double moert_lr_at(const moert_train *t, int64_t step, int64_t steps) {
  double lr = t->lr;
  if (t->warmup > 0 && step <= t->warmup) return lr * (double)step / (double)t->warmup;
  if (t->schedule == MOERT_SCHED_COSINE && steps > t->warmup) {
    double progress = (double)(step - t->warmup) / (double)(steps - t->warmup);
    if (progress > 1) progress = 1;
    /* from lr down to 10% of lr at the last step */
    return lr * (0.1 + 0.9 * 0.5 * (1 + cos(M_PI * progress)));
  }
  return lr;
}

/* --- CUDA graphs --- */

bool moert_exec_segment(moert_exec *e, const moert_seg_key *key, moert_seg_fn fn, void *ctx, moert_status *st) {
  moert_backend *b = e->b;
  if (e->graphs.off || e->opts.trace) return fn(e, ctx, st);
  struct moert_segment *s = NULL;
  for (int i = 0; i < e->graphs.nsegs && !s; i++) /* keys have no padding: memcmp compares them */
    if (memcmp(&e->graphs.segs[i].key, key, sizeof *key) == 0) s = &e->graphs.segs[i];
  if (!s) {
    if (e->graphs.nsegs == MOERT_MAX_GRAPHS) return fn(e, ctx, st); /* past the table, the rest run themselves */
    s = &e->graphs.segs[e->graphs.nsegs++];
    *s = (struct moert_segment){.key = *key};
  }
  int id = (int)(s - e->graphs.segs);
  if (s->captured) {
    e->graphs.launches++;
    return b->graph_launch(b, id, st) ? true : MOERT_UP(st);
  }
  if (s->eager || !s->ran) {
    s->ran = true;
    return fn(e, ctx, st);
  }
  MOERT_TRY(st, b->graph_begin(b, st));
  moert_status fst = {0}; /* fn's own failure: a real one, or a refusal to be captured */
  bool ok = fn(e, ctx, &fst);
  moert_status why = {0};
  bool made = b->graph_end(b, id, &why);
  if (!ok && made) { /* the capture worked, fn did not: a real failure */
    *st = fst;
    return MOERT_UP(st);
  }
  if (!made) { /* nothing ran: run fn itself (a real failure shows again there) */
    if (!ok && !why.failed) why = fst;
    s->eager = true;
    if (e->graphs.fallbacks++ == 0 && e->comm->rank == 0)
      fprintf(stderr, "warning: %s%s cannot be a CUDA graph and runs without one: %s\n",
              key->li >= 0 ? "a part of layer " : key->kind == MOERT_SEG_ZERO ? "the zeroing of the gradients"
                                                                                : "the gradient norm",
              key->li >= 0 ? e->m->layers[key->li].name : "", why.msg);
    return fn(e, ctx, st);
  }
  s->captured = true;
  e->graphs.captures++;
  e->graphs.launches++;
  return b->graph_launch(b, id, st) ? true : MOERT_UP(st);
}

/* --- timing --- */

/* The start of a step's timing: forgets the last step's marks and makes this
 * step's first, the origin of the others. */
static void timing_begin(moert_exec *e) {
  moert_backend *b = e->b;
  b->marks_reset(b);
  for (int i = 0; i < 4 * e->m->nlayers; i++) e->layer_marks[i] = -1;
  e->comm->marks = e->opts.trace != NULL; /* a comm's own stream marked only for the trace */
  e->anchor_us = moert_trace_now();
  e->mark0 = b->mark(b, NULL);
}

/* The end of a step's timing, once its work is enqueued: every MoE layer's
 * layer_ms (forward + backward) and the trace's spans from their marks. On a
 * device this waits for the marks to be reached, after read_values has
 * waited for the step's work (and, mid-step, only dropless and dynamic
 * capacities read anything back). */
static bool timing_end(moert_exec *e, moert_status *st) {
  moert_backend *b = e->b;
  for (int li = 0; li < e->m->nlayers; li++) {
    if (e->m->layers[li].kind != MOERT_L_MOE) continue;
    const int *lm = e->layer_marks + 4 * li;
    double fwd = NAN, bwd = 0;
    MOERT_TRY(st, b->mark_ms(b, lm[0], lm[1], &fwd, st));
    if (lm[2] >= 0) MOERT_TRY(st, b->mark_ms(b, lm[2], lm[3], &bwd, st));
    e->layer_ms[li] = fwd + bwd;
  }
  return moert_trace_resolve(e->opts.trace, b, e->mark0, e->anchor_us, st) ? true : MOERT_UP(st);
}

/* A layer's span (trace event and NVTX range): named by the layer; the NVTX
 * range of its backward says so. */
static int open_layer(moert_exec *e, const moert_layer *l, bool bwd) {
  if (bwd && moert_nvtx_on()) {
    char name[80];
    snprintf(name, sizeof name, "%s bwd", l->name);
    return moert_trace_open(e->opts.trace, e->b, name);
  }
  return moert_trace_open(e->opts.trace, e->b, l->name);
}

/* --- forward --- */

/* A layer's forward work, as a graph segment's function (the kind's
 * forward enqueues device work only; MoE layers run their own segments). */
typedef struct fwd_ctx {
  int li;
  int64_t step;
  bool want_grad;
} fwd_ctx;

static bool layer_fwd(moert_exec *e, void *ctx, moert_status *st) {
  const fwd_ctx *c = ctx;
  return moert_layer_ops_of(e->m->layers[c->li].kind)->fwd(e, c->li, c->step, c->want_grad, st);
}

/* The forward pass on e->input (regression) or the windows in the EMBED
 * layer's WIN buffer. Its loss stays in e->dloss (and the MoE layers' aux
 * losses and counts on the device) until read_values; when training, d loss
 * / d output is left in dcur. */
static bool forward(moert_exec *e, int64_t step, bool want_grad, moert_status *st) {
  moert_backend *b = e->b;
  const moert_model *m = e->m;
  const float *cur = e->input;
  int depth = 0;
  if (e->dbuf[0]) { /* every step's layers get the same gradient buffers */
    e->dcur = e->dbuf[0];
    e->dnext = e->dbuf[1];
  }
  b->zero(e->dloss, sizeof *e->dloss); /* a model without a loss layer: 0 */
  if (e->dstep) MOERT_TRY(st, b->upload(b, e->dstep, &step, sizeof step, st));
  /* the experts compute with bf16 copies of this step's parameters: the
   * last update wrote them, else they are made here */
  if (e->xdt == MOERT_BF16 && !e->wlow_fresh) {
    b->convert(e->wlow, MOERT_BF16, e->params, MOERT_F32, e->plan->param_elems);
    e->wlow_fresh = true;
  }
  for (int li = 0; li < m->nlayers; li++) {
    const moert_layer *l = &m->layers[li];
    const moert_layer_ops *ops = moert_layer_ops_of(l->kind);
    e->xin[li] = cur;
    bool traced = !(ops->flags & MOERT_LF_UNTRACED_FWD);
    int span = traced ? open_layer(e, l, false) : -1;
    if (ops->flags & MOERT_LF_RES_OPEN) e->stack[depth++] = cur;
    if (ops->flags & MOERT_LF_RES_CLOSE) e->res_in[li] = e->stack[--depth];
    if (e->dec.on && ops->decode) {
      MOERT_TRY(st, ops->decode(e, li, e->dec.pos, st));
    } else if (ops->fwd && (ops->flags & MOERT_LF_OWN_SEGMENTS)) {
      MOERT_TRY(st, ops->fwd(e, li, step, want_grad, st));
    } else if (ops->fwd) {
      fwd_ctx c = {li, step, want_grad};
      moert_seg_key k = {.li = li, .kind = MOERT_SEG_FWD, .variant = -1, .flags = want_grad, .rows = e->rows};
      MOERT_TRY(st, moert_exec_segment(e, &k, layer_fwd, &c, st));
    }
    if (ops->flags & MOERT_LF_OUTPUT) cur = F(e, li, OUT);
    if (traced) moert_trace_close(e->opts.trace, b, span, l->name, "forward", MOERT_TID_COMPUTE, e->step);
  }
  return true;
}

/* The values of the last forward that stayed on the device: its loss sum
 * (into *loss_sum) and the MoE layers' statistics. Called once a step,
 * after the backward is queued: on a device the first read waits for the
 * step's work so far, and nothing before it did (at a fixed capacity). */
static bool read_values(moert_exec *e, double *loss_sum, moert_status *st) {
  double v = 0;
  MOERT_TRY(st, e->b->download(e->b, &v, e->dloss, sizeof v, st));
  /* a regression loss's sum is over every element (it has a TARGET buffer):
   * per token, the mean over dim */
  const moert_model *m = e->m;
  *loss_sum = m->nlayers > 0 && e->plan->layers[m->nlayers - 1].f[MOERT_F_TARGET] >= 0 ? v / m->dim : v;
  return moert_moe_read_stats(e, st) ? true : MOERT_UP(st);
}

/* --- backward --- */

static void swap(moert_exec *e) {
  float *t = e->dcur;
  e->dcur = e->dnext;
  e->dnext = t;
}

/* A layer's backward work, as a graph segment's function: d output in
 * e->dcur, d input into e->dnext (the caller swaps them after), a residual
 * layer's skip gradient in e->res_grad[li]; enqueues device work only. */
static bool layer_bwd(moert_exec *e, void *ctx, moert_status *st) {
  int li = *(const int *)ctx;
  return moert_layer_ops_of(e->m->layers[li].kind)->bwd(e, li, st);
}

static bool backward(moert_exec *e, moert_status *st) {
  moert_backend *b = e->b;
  const moert_model *m = e->m;
  int depth = 0;
  for (int li = m->nlayers - 1; li >= 0; li--) {
    const moert_layer *l = &m->layers[li];
    const moert_layer_ops *ops = moert_layer_ops_of(l->kind);
    bool traced = !(ops->flags & MOERT_LF_UNTRACED_BWD);
    int span = traced ? open_layer(e, l, true) : -1;
    if (ops->flags & MOERT_LF_RES_CLOSE) e->res_grad[li] = e->skip[depth++];
    if (ops->flags & MOERT_LF_RES_OPEN) e->res_grad[li] = e->skip[--depth];
    if (ops->bwd && !(ops->flags & MOERT_LF_NO_BWD)) {
      if (ops->flags & MOERT_LF_OWN_SEGMENTS) {
        MOERT_TRY(st, ops->bwd(e, li, st));
      } else {
        moert_seg_key k = {.li = li, .kind = MOERT_SEG_BWD, .variant = -1, .flags = 1, .rows = e->rows};
        MOERT_TRY(st, moert_exec_segment(e, &k, layer_bwd, &li, st));
      }
    }
    if (ops->flags & MOERT_LF_SWAP) swap(e);
    if (traced) moert_trace_close(e->opts.trace, b, span, l->name, "backward", MOERT_TID_COMPUTE, e->step);
  }
  return true;
}

/* The replicated parameters' gradients summed over ranks (one all-reduce:
 * they come first in the buffer); expert gradients stay with their owners. */
static bool reduce_grads(moert_exec *e, moert_status *st) {
  if (e->comm->world == 1) return true;
  return e->comm->all_reduce_f32(e->comm, e->grads, e->plan->repl_elems, MOERT_RED_SUM, st) ? true : MOERT_UP(st);
}

/* The global gradient norm and the clipping factor, left on the device
 * (read at the step's end; the optimizer scales by the factor): replicated
 * gradients (the same everywhere) once, expert gradients summed over their
 * owners; fc2's bias, copied on every rank of an expert's group, counted by
 * slice 0 only. Sums of squares in double into dnorm_part (0: the replicated
 * gradients; then one a run of adjacent counted gradients); the expert part
 * crosses ranks as two floats (hi, lo) through the float all-reduce, on the
 * stream with nccl: about 1e-7 of it at more than one rank, exact at one. */
static bool grad_norm(moert_exec *e, double clip, moert_status *st) {
  const moert_model *m = e->m;
  moert_backend *b = e->b;
  double *part = e->dnorm_part;
  b->sumsq_to(e->grads, e->plan->repl_elems, part);
  int k = 1;
  int64_t run = 0, len = 0; /* the run of counted gradients not yet summed */
  for (int i = 0; i < m->nparams; i++) {
    const moert_param *g = &m->params[i];
    if (g->place == MOERT_PLACE_REPLICATED) continue;
    const moert_param_plan *pp = &e->plan->params[i];
    const moert_layer_plan *lp = &e->plan->layers[g->layer];
    if (g->place == MOERT_PLACE_EXPERT_REP && lp->shards > 1 && e->comm->rank % lp->shards != 0) continue;
    if (len > 0 && run + len != pp->offset) {
      b->sumsq_to(e->grads + run, len, part + k++);
      len = 0;
    }
    if (len == 0) run = pp->offset;
    len += pp->count;
  }
  if (len > 0) b->sumsq_to(e->grads + run, len, part + k++);
  b->norm_split(part + 1, k - 1, e->dhilo);
  if (e->comm->world > 1) MOERT_TRY(st, e->comm->all_reduce_f32(e->comm, e->dhilo, 2, MOERT_RED_SUM, st));
  b->clip_factor(part, 1, e->dhilo, clip, e->dnorm, e->dclip);
  return true;
}

/* The gradients summed over ranks, their norm and the clipping factor: the
 * same work each step (a graph). ctx: the clipping threshold (double). */
static bool reduce_and_norm(moert_exec *e, void *ctx, moert_status *st) {
  return reduce_grads(e, st) && grad_norm(e, *(const double *)ctx, st) ? true : MOERT_UP(st);
}

/* --- steps --- */

/* The layer that reads the token windows (the embedding), or -1. */
static int embed_layer(const moert_exec *e) {
  for (int li = 0; li < e->m->nlayers; li++)
    if (e->plan->layers[li].i[MOERT_I_WIN] >= 0) return li;
  return -1;
}

/* Loads the batch of `step` (eval: the held-out batch) into the buffers. */
static bool load_batch(moert_exec *e, moert_data *d, int64_t step, bool eval, moert_status *st) {
  const moert_model *m = e->m;
  int64_t T = e->rows, first = (int64_t)e->comm->rank * e->plan->tokens;
  moert_backend *b = e->b;
  if (m->vocab) {
    int li = embed_layer(e), head = m->nlayers - 1;
    int32_t *win = malloc(sizeof(int32_t) * (size_t)(T * m->context));
    int32_t *next = malloc(sizeof(int32_t) * (size_t)T);
    if (!win || !next) {
      free(win);
      free(next);
      return MOERT_FAIL(st, "out of memory");
    }
    moert_data_tokens(d, step, eval, first, T, win, next);
    bool ok = b->upload(b, I(e, li, WIN), win, sizeof(int32_t) * (size_t)(T * m->context), st) &&
              b->upload(b, I(e, head, TOKENS), next, sizeof(int32_t) * (size_t)T, st);
    free(win);
    free(next);
    return ok ? true : MOERT_UP(st);
  }
  int64_t n = T * m->dim;
  if (e->teacher_w1) { /* inputs and targets on the device: y = tanh(x w1) w2, a chunk of rows at a time */
    uint64_t seed, stream, index;
    moert_data_inputs_key(d, step, eval, first, &seed, &stream, &index);
    b->fill_normal(e->input, n, seed, stream, index, 0.0f, 1.0f);
    float *y_dev = F(e, m->nlayers - 1, TARGET);
    int64_t H = e->teacher_hidden, M = m->dim;
    for (int64_t r = 0; r < T; r += e->teacher_rows) {
      int64_t rows = T - r < e->teacher_rows ? T - r : e->teacher_rows;
      b->gemm(false, false, rows, H, M, 1, e->input + r * M, M, e->teacher_w1, H, 0, e->teacher_h, H);
      b->act_fwd(MOERT_ACT_TANH, e->teacher_h, e->teacher_h, rows * H);
      b->gemm(false, false, rows, M, H, 1, e->teacher_h, H, e->teacher_w2, M, 0, y_dev + r * M, M);
    }
    return true;
  }
  float *x = malloc(sizeof(float) * (size_t)n), *y = malloc(sizeof(float) * (size_t)n);
  if (!x || !y) {
    free(x);
    free(y);
    return MOERT_FAIL(st, "out of memory");
  }
  moert_data_regression(d, step, eval, first, T, x, y);
  bool ok = b->upload(b, e->input, x, sizeof(float) * (size_t)n, st) &&
            b->upload(b, F(e, m->nlayers - 1, TARGET), y, sizeof(float) * (size_t)n, st);
  free(x);
  free(y);
  return ok ? true : MOERT_UP(st);
}

bool moert_exec_eval(moert_exec *e, moert_data *d, int64_t step, bool eval, double *loss,
                     moert_status *st) {
  e->rows = e->plan->tokens;
  MOERT_TRY(st, load_batch(e, d, step, eval, st));
  timing_begin(e);
  double sum = 0;
  bool was = e->training;
  e->training = false; /* no gate noise */
  e->repeat_variants = eval;
  bool ok = forward(e, eval ? 0 : step, false, st) && read_values(e, &sum, st);
  e->training = was;
  e->repeat_variants = false;
  if (!ok) return MOERT_UP(st);
  MOERT_TRY(st, timing_end(e, st));
  MOERT_TRY(st, e->comm->all_reduce_f64(e->comm, &sum, 1, MOERT_RED_SUM, st));
  *loss = sum / ((double)e->rows * e->comm->world);
  return true;
}

/* The forward of n windows without a loss (the head's targets 0), no gate
 * noise, each MoE layer in its last variant; a decode (moert_exec_decode)
 * when e->dec.on. The logits [n, vocab] into out (host). */
static bool logits_of(moert_exec *e, const int32_t *win, int64_t n, float *out, moert_status *st) {
  const moert_model *m = e->m;
  if (!m->vocab || n > e->plan->tokens) return MOERT_FAIL(st, "no vocabulary, or too many windows");
  e->rows = n;
  int li = embed_layer(e), head = m->nlayers - 1;
  MOERT_TRY(st, e->b->upload(e->b, I(e, li, WIN), win, sizeof(int32_t) * (size_t)(n * m->context), st));
  int32_t *zeros = calloc((size_t)n, sizeof *zeros);
  if (!zeros) return MOERT_FAIL(st, "out of memory");
  bool ok = e->b->upload(e->b, I(e, head, TOKENS), zeros, sizeof(int32_t) * (size_t)n, st);
  free(zeros);
  if (!ok) return MOERT_UP(st);
  bool was = e->training;
  e->training = false;
  e->repeat_variants = true;
  timing_begin(e);
  ok = forward(e, 0, false, st) && timing_end(e, st);
  e->training = was;
  e->repeat_variants = false;
  e->rows = e->plan->tokens;
  if (!ok) return MOERT_UP(st);
  MOERT_TRY(st, e->b->download(e->b, out, F(e, head, HLOGITS), sizeof(float) * (size_t)(n * m->vocab), st));
  return true;
}

bool moert_exec_logits(moert_exec *e, const int32_t *win, int64_t n, float *out, moert_status *st) {
  return logits_of(e, win, n, out, st) ? true : MOERT_UP(st);
}

bool moert_exec_decode_begin(moert_exec *e, moert_status *st) {
  const moert_model *m = e->m;
  moert_backend *b = e->b;
  if (!e->dec.state && !(e->dec.state = calloc((size_t)m->nlayers + 1, sizeof *e->dec.state)))
    return MOERT_FAIL(st, "out of memory");
  for (int li = 0; li < m->nlayers; li++) {
    const moert_layer_ops *ops = moert_layer_ops_of(m->layers[li].kind);
    if (!ops->decode_state) continue;
    size_t bytes = (size_t)ops->decode_state(m, &m->layers[li]) * (size_t)moert_dt_size(e->xdt);
    if (!e->dec.state[li]) MOERT_TRY(st, b->alloc(b, bytes, &e->dec.state[li], st)); /* zeroed */
    else b->zero(e->dec.state[li], bytes);
  }
  e->dec.pos = 0;
  return true;
}

bool moert_exec_decode(moert_exec *e, const int32_t *win, float *out, moert_status *st) {
  if (!e->dec.state) return MOERT_FAIL(st, "moert_exec_decode before moert_exec_decode_begin");
  e->dec.on = true;
  bool ok = logits_of(e, win, 1, out, st);
  e->dec.on = false;
  e->dec.pos++;
  return ok ? true : MOERT_UP(st);
}

bool moert_exec_objective(moert_exec *e, moert_data *d, int64_t step, bool want_grad,
                          double *objective, moert_status *st) {
  e->rows = e->plan->tokens;
  MOERT_TRY(st, load_batch(e, d, step, false, st));
  if (want_grad) MOERT_TRY(st, zero_grads(e, st));
  double sum = 0;
  timing_begin(e);
  MOERT_TRY(st, forward(e, step, want_grad, st));
  if (want_grad) MOERT_TRY(st, backward(e, st) && reduce_grads(e, st));
  MOERT_TRY(st, read_values(e, &sum, st));
  MOERT_TRY(st, timing_end(e, st));
  double stats[3] = {sum, e->moe.aux, e->moe.z}; /* aux: the same on every rank; z: each rank's share */
  MOERT_TRY(st, e->comm->all_reduce_f64(e->comm, stats, 3, MOERT_RED_SUM, st));
  *objective = stats[0] / ((double)e->rows * e->comm->world) + stats[1] / e->comm->world + stats[2];
  return true;
}

bool moert_exec_train_step(moert_exec *e, moert_data *d, int64_t step, moert_step_stats *out,
                           moert_status *st) {
  const moert_model *m = e->m;
  const moert_train *t = &m->train;
  moert_backend *b = e->b;
  e->rows = e->plan->tokens;
  e->step = step;
  timing_begin(e);
  int span = moert_trace_open(e->opts.trace, b, "batch");
  MOERT_TRY(st, load_batch(e, d, step, false, st));
  MOERT_TRY(st, zero_grads(e, st));
  moert_trace_close(e->opts.trace, b, span, "batch", "data", MOERT_TID_COMPUTE, step);
  MOERT_TRY(st, forward(e, step, true, st));
  MOERT_TRY(st, backward(e, st));
  double clip_at = t->clip;
  moert_seg_key kn = {.li = -1, .kind = MOERT_SEG_NORM, .variant = -1};
  MOERT_TRY(st, moert_exec_segment(e, &kn, reduce_and_norm, &clip_at, st));
  double lr = moert_lr_at(t, step, e->opts.total_steps);
  out->lr = lr;
  /* The step's values, read before the update so that a non-finite loss or
   * gradient norm never reaches the parameters or the optimizer state: the
   * first read waits for the device (nothing before it did, at a fixed
   * capacity). The loss is summed over ranks and the norm is global, so
   * every rank decides alike (NaN and infinity survive a sum). */
  double sum = 0;
  MOERT_TRY(st, read_values(e, &sum, st));
  MOERT_TRY(st, b->download(b, &out->grad_norm, e->dnorm, sizeof out->grad_norm, st));
  double stats[5] = {sum, e->moe.aux, e->moe.routed, e->moe.dropped, e->moe.z};
  MOERT_TRY(st, e->comm->all_reduce_f64(e->comm, stats, 5, MOERT_RED_SUM, st));
  out->loss = stats[0] / ((double)e->rows * e->comm->world);
  out->aux_loss = stats[1] / e->comm->world; /* the same on every rank */
  out->z_loss = stats[4];                    /* each rank's share of the global mean */
  out->dropped = stats[2] > 0 ? stats[3] / stats[2] : 0;
  out->flops = (e->plan->flops_fwd + e->plan->flops_bwd) * e->comm->world;
  out->skipped = !isfinite(out->loss) || !isfinite(out->grad_norm);
  if (out->skipped) { /* no update: the parameters (and their bf16 copies) stay */
    e->skipped++;
    out->update_ms = 0;
    MOERT_TRY(st, timing_end(e, st));
    return true;
  }
  int64_t n = e->plan->trained_elems; /* the frozen parameters after them are not the optimizer's */
  /* the update's time alone, from marks around it (on a device, its time on
   * the GPU; nothing waits for it here) */
  int u0 = b->mark(b, NULL);
  moert_nvtx_push("optimizer");
  uint16_t *low = e->xdt == MOERT_BF16 ? e->wlow : NULL; /* rounded in the same pass */
  const float *clip = t->clip > 0 ? e->dclip : NULL;      /* grad_norm's factor */
  /* the optimizer's step count: skipped steps did not advance it */
  int64_t opt_step = step - e->skipped;
  if (t->optimizer == MOERT_OPT_ADAM)
    b->adamw(e->params, e->grads, e->state, e->state + e->plan->param_elems, n, (float)lr, (float)t->beta1,
             (float)t->beta2, (float)t->eps, (float)t->weight_decay, opt_step, clip, low);
  else
    b->sgd(e->params, e->grads, n, (float)lr, (float)t->weight_decay, clip, low);
  e->wlow_fresh = low != NULL;
  MOERT_TRY(st, moert_moe_balance(e, st)); /* the sigmoid gates' biases, from this step's loads */
  moert_nvtx_pop();
  int u1 = b->mark(b, NULL);
  moert_trace_marks(e->opts.trace, u0, u1, "optimizer", "update", MOERT_TID_COMPUTE, step);
  MOERT_TRY(st, timing_end(e, st));
  MOERT_TRY(st, b->mark_ms(b, u0, u1, &out->update_ms, st));
  return true;
}

/* The first of n floats at dev that is not finite, or -1; a host copy. */
static int64_t first_nonfinite(moert_backend *b, const float *dev, int64_t n, float *host, moert_status *st) {
  if (!b->download(b, host, dev, sizeof(float) * (size_t)n, st)) return -2;
  for (int64_t i = 0; i < n; i++)
    if (!isfinite(host[i])) return i;
  return -1;
}

bool moert_exec_find_nonfinite(moert_exec *e, int *layer, bool *in_grad, moert_status *st) {
  const moert_model *m = e->m;
  const moert_plan *p = e->plan;
  moert_backend *b = e->b;
  int L = m->nlayers;
  /* the largest buffer looked at: a layer's output [rows, dim], or a layer's gradients */
  int64_t most = e->rows * m->dim;
  for (int i = 0; i < m->nparams; i++)
    if (p->params[i].count > most) most = p->params[i].count;
  float *host = malloc(sizeof(float) * (size_t)(most > 0 ? most : 1));
  if (!host) return MOERT_FAIL(st, "out of memory");
  /* this rank's find as a rank in [0, 2L]: 2L - li for layer li's output
   * (outputs outrank gradients), L - k for the k-th layer in backward order
   * with a bad gradient, 0 for none; the highest over ranks wins (the comm
   * reduces by max) */
  double found = 0;
  for (int li = 0; li < L && found == 0; li++) {
    if (!(moert_layer_ops_of(m->layers[li].kind)->flags & MOERT_LF_OUTPUT) || p->layers[li].f[MOERT_F_OUT] < 0)
      continue;
    int64_t at = first_nonfinite(b, F(e, li, OUT), e->rows * m->dim, host, st);
    if (at == -2) goto fail;
    if (at >= 0) found = 2.0 * L - li;
  }
  for (int k = 0; k < L && found == 0 && e->grads; k++) {
    int li = L - 1 - k;
    for (int i = 0; i < m->nparams && found == 0; i++) {
      if (m->params[i].layer != li || p->params[i].count == 0) continue;
      int64_t at = first_nonfinite(b, e->grads + p->params[i].offset, p->params[i].count, host, st);
      if (at == -2) goto fail;
      if (at >= 0) found = (double)L - k;
    }
  }
  free(host);
  MOERT_TRY(st, e->comm->all_reduce_f64(e->comm, &found, 1, MOERT_RED_MAX, st));
  int f = (int)found;
  *in_grad = f > 0 && f <= L;
  *layer = f > L ? 2 * L - f : f > 0 ? f - 1 : -1;
  return true;
fail:
  free(host);
  return MOERT_UP(st);
}
