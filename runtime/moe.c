/* moe.c — MoE layers on the executor; see moe.h.
 *
 * Layout (every variant): this rank's tokens are dispatched into SRC
 * [E, C, M], expert-major, C the padded capacity; the experts' outputs come
 * back into SRCY [E, C, M] and are combined. What a variant changes is who
 * computes which rows of SRC with which parameters:
 *  r = 0   every rank gathers all E experts whole (GW) and computes its own
 *          SRC; no token moves. Expert gradients are reduce-scattered back.
 *  S = 1   (E >= W) rank g owns experts [g El, (g+1) El): chunk i of every
 *          expert's slots goes to its owner (all-to-all), comes back done.
 *  S > 1   (E < W) rank g = e S + j holds slice j of expert e. With r | S,
 *          P = S / r: rank j has H-slice class c = j / P (it all-gathers the
 *          P base slices of class c, so it holds H / r) and token chunk
 *          q = j % P (slots [q C/P, (q+1) C/P) of expert e from every
 *          source). Each source sends chunk q to the r ranks (one per class)
 *          and sums their r partial outputs; fc2's bias is added by class 0.
 * d > 1 cuts each source's slots into d chunks: the all-to-all of chunk i+1
 * is in flight while chunk i's experts compute (nonblocking collectives). */
#include "moe.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "layer_exec.h"
#include "rng.h"
#include "testing.h"

#define COSINE_MAX_LOG_SCALE 4.605170185988091 /* log(1 / 0.01), as Tutel */
#define COSINE_PROJ MOERT_COSINE_PROJ
#define STREAM_NOISE 0x6e6f697365ull

/* The parameter in slot s of MoE layer l (moe.h's MOERT_MOE_SLOTS): its
 * fp32 master, its gradient, and as the experts compute with it (the bf16
 * copy on a bf16 expert path, else the master). */
#define LI_(e, l) ((int)((l) - (e)->m->layers))
#define P_(e, l, s) P(e, LI_(e, l), MOERT_MOE_##s)
#define G_(e, l, s) G(e, LI_(e, l), MOERT_MOE_##s)
#define PT_(e, l, s) ((e)->xdt == MOERT_BF16 ? PL(e, LI_(e, l), MOERT_MOE_##s) : (void *)P_(e, l, s))
/* Element `off` of an expert-path tensor p (type g->dt). */
#define AT(g, p, off) ((void *)((char *)(p) + (int64_t)(off) * (g)->es))

/* Timing. A layer's time (layer_ms, what the selector compares) is two
 * pairs of the backend's marks, forward and backward, resolved at the end of
 * the step (step.c): on a device, the time the stream spent on the layer, and
 * nothing waits for it here. The trace's spans (trace.h) are mark pairs too,
 * and NVTX ranges. */
static int open_span(moert_exec *e, const char *name) { return moert_trace_open(e->opts.trace, e->b, name); }
static void close_span(moert_exec *e, int mark, const char *name, const char *cat, int tid) {
  moert_trace_close(e->opts.trace, e->b, mark, name, cat, tid, e->step);
}
/* The trace's thread of parameter gathers and scatters: their own on the
 * cpu; on a device the compute stream, where the collectives are enqueued
 * (or staged). */
static int gather_tid(const moert_exec *e) {
  return e->b == moert_backend_cpu() ? MOERT_TID_GATHER : MOERT_TID_COMPUTE;
}

/* --- sub-communicators --- */

static moert_comm *subcomm(moert_exec *e, int64_t shards, int64_t r) {
  for (int i = 0; i < e->moe.nsubcomms; i++)
    if (e->moe.subcomms[i].shards == shards && e->moe.subcomms[i].r == r) return e->moe.subcomms[i].comm;
  return NULL;
}

static bool make_subcomm(moert_exec *e, int64_t shards, int64_t r, moert_status *st) {
  if (subcomm(e, shards, r)) return true;
  if (e->moe.nsubcomms == (int)(sizeof e->moe.subcomms / sizeof e->moe.subcomms[0]))
    return MOERT_FAIL(st, "too many distinct expert groupings (limit is 16)");
  int rank = e->comm->rank;
  int64_t ex = rank / shards, j = rank % shards;
  int color, key;
  if (r == 0) { /* the expert group */
    color = (int)ex;
    key = (int)j;
  } else { /* the class of H-slice c: P = S / r ranks, keyed by token chunk */
    int64_t P = shards / r;
    color = (int)(ex * r + j / P);
    key = (int)(j % P);
  }
  moert_comm *c;
  MOERT_TRY(st, e->comm->split(e->comm, color, key, &c, st));
  e->moe.subcomms[e->moe.nsubcomms].shards = shards;
  e->moe.subcomms[e->moe.nsubcomms].r = r;
  e->moe.subcomms[e->moe.nsubcomms].comm = c;
  e->moe.nsubcomms++;
  return true;
}

bool moert_moe_bf16_fits(const moert_model *m, const moert_plan *plan) {
  if (m->dim % 2) return false;
  for (int li = 0; li < m->nlayers; li++)
    if (m->layers[li].kind == MOERT_L_MOE && plan->layers[li].hidden_local % 2) return false;
  return true;
}

bool moert_moe_setup(moert_exec *e, moert_status *st) {
  for (int li = 0; li < e->m->nlayers; li++) {
    if (e->m->layers[li].kind != MOERT_L_MOE) continue;
    const moert_layer_plan *lp = &e->plan->layers[li];
    if (lp->shards == 1) continue;
    MOERT_TRY(st, make_subcomm(e, lp->shards, 0, st));
    for (int v = 0; v < lp->nvariants; v++) {
      int r = lp->variants[v].r;
      if (r >= 1 && r < lp->shards) MOERT_TRY(st, make_subcomm(e, lp->shards, r, st));
    }
  }
  return true;
}

void moert_moe_teardown(moert_exec *e) {
  for (int i = e->moe.nsubcomms - 1; i >= 0; i--)
    if (e->moe.subcomms[i].comm != e->comm) e->moe.subcomms[i].comm->destroy(e->moe.subcomms[i].comm);
  e->moe.nsubcomms = 0;
}

/* --- the expert FFN on [n, rows, M] (n experts, rows each) --- */

typedef struct expert_params {
  const void *w1, *b1, *w2, *b2; /* [n, M, H1x], [n, H1x], [n, Hx, M], [n, M] (type dt); b NULL: none */
  /* their gradients (fp32): the weights' written by the first chunk's GEMM
   * (beta 0) and accumulated by later chunks, the biases accumulated into
   * zeroed buffers; db NULL: not wanted */
  float *dw1, *db1, *dw2, *db2;
  int64_t n, hx;                 /* experts, hidden width here (H / r) */
} expert_params;

/* count GEMMs of the expert path: op(A) [m, k] and op(B) [k, n] of type ab,
 * C [m, n] of type ct, every operand packed (ld = its columns) and batched
 * contiguously; bias (type ct, one row of n per GEMM) added when not NULL,
 * then act, aux (NULL: not wanted) receiving the pre-activation: one batched
 * GEMM with its epilogue (cpu_ops_typed.h's moert_gemm). */
static void gemm_t(moert_backend *b, bool ta, bool tb, int64_t m, int64_t n, int64_t k, int64_t count,
                   moert_dt ab, const void *a_, const void *b_, float beta, moert_dt ct, void *c,
                   const void *bias, moert_epi act, void *aux) {
  moert_gemm g = {.trans_a = ta, .trans_b = tb, .m = m, .n = n, .k = k, .count = count, .alpha = 1,
                  .beta = beta, .a = a_, .b = b_, .ab_type = ab, .lda = ta ? m : k, .stride_a = m * k,
                  .ldb = tb ? k : n, .stride_b = k * n, .c = c, .c_type = ct, .ldc = n, .stride_c = m * n,
                  .bias = bias, .stride_bias = n, .act = act, .aux = aux};
  b->gemm_ex(&g);
}

/* A weight gradient dW = X^T dY (fp32, beta as gemm_t's) over count experts
 * of k rows, and, when db is not NULL, the bias gradient: dY's column sums,
 * in the GEMM's epilogue where beta is 0 (the step's first chunk, before
 * which db is zero: written equals accumulated), else added by a kernel. */
static void wgrad_t(moert_backend *b, int64_t m, int64_t n, int64_t k, int64_t count, moert_dt dt, const void *x,
                    const void *dy, float beta, float *dw, float *db) {
  if (db && beta != 0) b->bias_grad_t(dt, db, dy, count, k, n);
  moert_gemm g = {.trans_a = true, .m = m, .n = n, .k = k, .count = count, .alpha = 1, .beta = beta, .a = x,
                  .b = dy, .ab_type = dt, .lda = m, .stride_a = m * k, .ldb = n, .stride_b = k * n, .c = dw,
                  .c_type = MOERT_F32, .ldc = n, .stride_c = m * n, .bias_grad = beta == 0 ? db : NULL};
  b->gemm_ex(&g);
}

/* fc1's epilogue and what the backward differentiates the activation at:
 * relu and gelu run in fc1's epilogue. relu writes EA alone and the
 * backward takes relu' at EA (relu(h) > 0 iff h > 0, so the same values as
 * at EH); gelu writes EA and the pre-activation into EH (aux). silu, swiglu:
 * fc1 writes EH, their kernel EA. */
static moert_epi fc1_epilogue(const moert_layer *l) {
  return l->act == MOERT_ACT_RELU ? MOERT_EPI_RELU : l->act == MOERT_ACT_GELU ? MOERT_EPI_GELU : MOERT_EPI_NONE;
}

static void experts_fwd(moert_backend *b, moert_dt dt, const moert_layer *l, const expert_params *p,
                        int64_t M, int64_t rows, const void *x, void *eh, void *ea, void *y) {
  bool swiglu = l->act == MOERT_ACT_SWIGLU;
  int64_t hx = p->hx, h1 = swiglu ? 2 * hx : hx, n = p->n;
  moert_epi epi = fc1_epilogue(l);
  if (rows == 0) return;
  if (epi != MOERT_EPI_NONE) {
    gemm_t(b, false, false, rows, h1, M, n, dt, x, p->w1, 0, dt, ea, p->b1, epi, epi == MOERT_EPI_GELU ? eh : NULL);
  } else {
    gemm_t(b, false, false, rows, h1, M, n, dt, x, p->w1, 0, dt, eh, p->b1, MOERT_EPI_NONE, NULL);
    if (swiglu) b->swiglu_fwd_t(dt, eh, ea, n * rows, hx);
    else b->act_fwd_t(dt, (moert_act)l->act, eh, ea, n * rows * hx);
  }
  gemm_t(b, false, false, rows, M, hx, n, dt, ea, p->w2, 0, dt, y, p->b2, MOERT_EPI_NONE, NULL);
}

/* dy -> dx (written); parameter gradients accumulate. dea and deh are scratch. */
/* The experts' backward over `rows` rows each. beta 0: the weight gradients
 * are written (the first chunk of a step), 1: added to. */
static void experts_bwd(moert_backend *b, moert_dt dt, const moert_layer *l, const expert_params *p,
                        int64_t M, int64_t rows, const void *x, const void *eh, const void *ea,
                        const void *dy, void *dea, void *deh, void *dx, float beta) {
  bool swiglu = l->act == MOERT_ACT_SWIGLU;
  int64_t hx = p->hx, h1 = swiglu ? 2 * hx : hx, n = p->n;
  if (rows == 0) {
    if (beta == 0) { /* no rows: zero gradients, written all the same */
      b->zero(p->dw1, sizeof(float) * (size_t)(n * M * h1));
      b->zero(p->dw2, sizeof(float) * (size_t)(n * hx * M));
    }
    return;
  }
  wgrad_t(b, hx, M, rows, n, dt, ea, dy, beta, p->dw2, p->db2);
  gemm_t(b, false, true, rows, hx, M, n, dt, dy, p->w2, 0, dt, dea, NULL, MOERT_EPI_NONE, NULL);
  if (swiglu) b->swiglu_bwd_t(dt, eh, dea, deh, n * rows, hx);
  else b->act_bwd_t(dt, (moert_act)l->act, fc1_epilogue(l) == MOERT_EPI_RELU ? ea : eh, dea, deh, n * rows * hx);
  wgrad_t(b, M, h1, rows, n, dt, x, deh, beta, p->dw1, p->db1);
  gemm_t(b, false, true, rows, M, h1, n, dt, deh, p->w1, 0, dt, dx, NULL, MOERT_EPI_NONE, NULL);
}

/* --- which parameters a variant computes with --- */

typedef struct layer_geom {
  int64_t E, K, M, H, H1, S, El, Hl, halves;
  moert_dt dt;   /* the expert path's storage type */
  int64_t es;    /* its bytes per element */
} layer_geom;

static layer_geom geom(const moert_exec *e, int li) {
  const moert_layer *l = &e->m->layers[li];
  const moert_layer_plan *lp = &e->plan->layers[li];
  layer_geom g;
  g.E = l->experts;
  g.K = moert_moe_slots_per_token(l); /* top_k, or every expert's slot (expert choice) */
  g.M = e->m->dim;
  g.H = l->hidden;
  g.halves = l->act == MOERT_ACT_SWIGLU ? 2 : 1;
  g.H1 = g.halves * g.H;
  g.S = lp->shards;
  g.El = lp->experts_local;
  g.Hl = lp->hidden_local;
  g.dt = e->xdt;
  g.es = moert_dt_size(e->xdt);
  return g;
}

/* Offsets of the gathered fc1_w, fc1_b, fc2_w, fc2_b in GW for n experts of
 * width hx. */
static void gw_layout(const layer_geom *g, const moert_layer *l, int64_t n, int64_t hx, int64_t off[4]) {
  int64_t h1 = g->halves * hx;
  off[0] = 0;
  off[1] = off[0] + n * g->M * h1;
  off[2] = off[1] + (l->bias ? n * h1 : 0);
  off[3] = off[2] + n * hx * g->M;
}

/* Columns of P slices [P, rows, halves * h] -> [rows, halves * P * h] (or
 * back when inverse), keeping swiglu's two halves apart. */
static void join_slices(moert_backend *b, moert_dt dt, void *dst, const void *src, int64_t P, int64_t rows,
                        int64_t h, int64_t halves, bool inverse) {
  int64_t es = moert_dt_size(dt);
  for (int64_t p = 0; p < P; p++)
    for (int64_t half = 0; half < halves; half++) {
      char *sl = (char *)src + (p * rows * halves * h + half * h) * es;
      char *jn = (char *)dst + (half * P * h + p * h) * es;
      if (inverse)
        b->copy_blocks_t(dt, sl, halves * h, jn, halves * P * h, rows, h, false);
      else
        b->copy_blocks_t(dt, jn, halves * P * h, sl, halves * h, rows, h, false);
    }
}

/* all_gather of n elements of the expert path's type (n even for bf16). */
static bool gather_t(moert_comm *c, const layer_geom *g, const void *send, void *recv, int64_t n,
                     moert_status *st) {
  return c->all_gather_f32(c, send, recv, n * g->es / (int64_t)sizeof(float), st);
}

/* r = 0: every expert whole into GW. */
static bool gather_all(moert_exec *e, int li, const layer_geom *g, moert_status *st) {
  const moert_layer *l = &e->m->layers[li];
  moert_backend *b = e->b;
  moert_comm *c = e->comm;
  void *gw = F(e, li, GW), *tmp = S(e, li, DGW);
  int64_t off[4];
  gw_layout(g, l, g->E, g->H, off);
  int64_t h1l = g->halves * g->Hl;
  if (g->S == 1) {
    MOERT_TRY(st, gather_t(c, g, PT_(e, l, FC1_W), AT(g, gw, off[0]), g->El * g->M * g->H1, st));
    if (l->bias) MOERT_TRY(st, gather_t(c, g, PT_(e, l, FC1_B), AT(g, gw, off[1]), g->El * g->H1, st));
    MOERT_TRY(st, gather_t(c, g, PT_(e, l, FC2_W), AT(g, gw, off[2]), g->El * g->H * g->M, st));
    if (l->bias) MOERT_TRY(st, gather_t(c, g, PT_(e, l, FC2_B), AT(g, gw, off[3]), g->El * g->M, st));
    return true;
  }
  /* S > 1: W slices of width Hl; join each expert's S slices */
  MOERT_TRY(st, gather_t(c, g, PT_(e, l, FC1_W), tmp, g->M * h1l, st));
  for (int64_t x = 0; x < g->E; x++)
    join_slices(b, g->dt, AT(g, gw, off[0] + x * g->M * g->H1), AT(g, tmp, x * g->S * g->M * h1l), g->S, g->M,
                g->Hl, g->halves, false);
  if (l->bias) {
    MOERT_TRY(st, gather_t(c, g, PT_(e, l, FC1_B), tmp, h1l, st));
    for (int64_t x = 0; x < g->E; x++)
      join_slices(b, g->dt, AT(g, gw, off[1] + x * g->H1), AT(g, tmp, x * g->S * h1l), g->S, 1, g->Hl, g->halves,
                  false);
  }
  /* fc2_w slices are row blocks: [W, Hl, M] is already [E, H, M] */
  MOERT_TRY(st, gather_t(c, g, PT_(e, l, FC2_W), AT(g, gw, off[2]), g->Hl * g->M, st));
  if (l->bias) { /* replicated in each group: take slice 0's */
    MOERT_TRY(st, gather_t(c, g, PT_(e, l, FC2_B), tmp, g->M, st));
    b->copy_blocks_t(g->dt, AT(g, gw, off[3]), g->M, tmp, g->S * g->M, g->E, g->M, false);
  }
  return true;
}

/* r = 0, backward: the gathered gradients back to their owners (summed over
 * ranks): the weights' written into the local gradients (which the step does
 * not zero: layers/moe.c's grad_written), the biases' added. */
static bool scatter_all(moert_exec *e, int li, const layer_geom *g, moert_status *st) {
  const moert_layer *l = &e->m->layers[li];
  moert_backend *b = e->b;
  moert_comm *c = e->comm;
  float *dgw = S(e, li, DGW), *tmp = S(e, li, GT2);
  int64_t off[4];
  gw_layout(g, l, g->E, g->H, off);
  int64_t h1l = g->halves * g->Hl;
  if (g->S == 1) {
    int64_t n[4] = {g->El * g->M * g->H1, g->El * g->H1, g->El * g->H * g->M, g->El * g->M};
    int k[4] = {MOERT_MOE_FC1_W, MOERT_MOE_FC1_B, MOERT_MOE_FC2_W, MOERT_MOE_FC2_B};
    for (int i = 0; i < 4; i++) {
      if ((i == 1 || i == 3) && !l->bias) continue;
      MOERT_TRY(st, c->reduce_scatter_f32(c, dgw + off[i], tmp, n[i], st));
      if (i == 0 || i == 2) b->copy(G(e, li, k[i]), tmp, n[i]); /* the weights' are not zeroed */
      else b->axpy(G(e, li, k[i]), tmp, 1, n[i]);
    }
    return true;
  }
  /* S > 1: split each expert's gradient into its S slices, rank-major */
  float *slices = S(e, li, GT1), *mine = S(e, li, GT2);
  for (int64_t x = 0; x < g->E; x++)
    join_slices(b, MOERT_F32, dgw + off[0] + x * g->M * g->H1, slices + x * g->S * g->M * h1l, g->S, g->M, g->Hl,
                g->halves, true);
  MOERT_TRY(st, c->reduce_scatter_f32(c, slices, mine, g->M * h1l, st));
  b->copy(G_(e, l, FC1_W), mine, g->M * h1l);
  if (l->bias) {
    for (int64_t x = 0; x < g->E; x++)
      join_slices(b, MOERT_F32, dgw + off[1] + x * g->H1, slices + x * g->S * h1l, g->S, 1, g->Hl, g->halves, true);
    MOERT_TRY(st, c->reduce_scatter_f32(c, slices, mine, h1l, st));
    b->axpy(G_(e, l, FC1_B), mine, 1, h1l);
  }
  MOERT_TRY(st, c->reduce_scatter_f32(c, dgw + off[2], mine, g->Hl * g->M, st));
  b->copy(G_(e, l, FC2_W), mine, g->Hl * g->M);
  if (l->bias) { /* every rank of expert x's group gets the whole sum */
    for (int64_t j = 0; j < g->S; j++)
      b->copy_blocks(slices + j * g->M, g->S * g->M, dgw + off[3], g->M, g->E, g->M, false);
    MOERT_TRY(st, c->reduce_scatter_f32(c, slices, mine, g->M, st));
    b->axpy(G_(e, l, FC2_B), mine, 1, g->M);
  }
  return true;
}

/* S > 1, 1 <= r < S: the P base slices of this rank's class into GW. */
static bool gather_class(moert_exec *e, int li, const layer_geom *g, int r, moert_status *st) {
  const moert_layer *l = &e->m->layers[li];
  moert_comm *c = subcomm(e, g->S, r);
  int64_t P = g->S / r, h1l = g->halves * g->Hl;
  void *gw = F(e, li, GW), *tmp = S(e, li, DGW);
  int64_t off[4];
  gw_layout(g, l, 1, g->H / r, off);
  MOERT_TRY(st, gather_t(c, g, PT_(e, l, FC1_W), tmp, g->M * h1l, st));
  join_slices(e->b, g->dt, AT(g, gw, off[0]), tmp, P, g->M, g->Hl, g->halves, false);
  if (l->bias) {
    MOERT_TRY(st, gather_t(c, g, PT_(e, l, FC1_B), tmp, h1l, st));
    join_slices(e->b, g->dt, AT(g, gw, off[1]), tmp, P, 1, g->Hl, g->halves, false);
  }
  MOERT_TRY(st, gather_t(c, g, PT_(e, l, FC2_W), AT(g, gw, off[2]), g->Hl * g->M, st));
  return true;
}

static bool scatter_class(moert_exec *e, int li, const layer_geom *g, int r, moert_status *st) {
  const moert_layer *l = &e->m->layers[li];
  moert_backend *b = e->b;
  moert_comm *c = subcomm(e, g->S, r);
  int64_t P = g->S / r, h1l = g->halves * g->Hl;
  float *dgw = S(e, li, DGW), *slices = S(e, li, GT1), *mine = S(e, li, GT2);
  int64_t off[4];
  gw_layout(g, l, 1, g->H / r, off);
  join_slices(b, MOERT_F32, dgw + off[0], slices, P, g->M, g->Hl, g->halves, true);
  MOERT_TRY(st, c->reduce_scatter_f32(c, slices, mine, g->M * h1l, st));
  b->copy(G_(e, l, FC1_W), mine, g->M * h1l);
  if (l->bias) {
    join_slices(b, MOERT_F32, dgw + off[1], slices, P, 1, g->Hl, g->halves, true);
    MOERT_TRY(st, c->reduce_scatter_f32(c, slices, mine, h1l, st));
    b->axpy(G_(e, l, FC1_B), mine, 1, h1l);
  }
  MOERT_TRY(st, c->reduce_scatter_f32(c, dgw + off[2], mine, g->Hl * g->M, st));
  b->copy(G_(e, l, FC2_W), mine, g->Hl * g->M);
  return true;
}

/* The parameters variant v computes with on this rank. */
static expert_params params_for(moert_exec *e, int li, const layer_geom *g, const moert_variant *v) {
  const moert_layer *l = &e->m->layers[li];
  expert_params p = {0};
  bool gathered = v->r == 0 || v->r < g->S;
  if (!gathered) { /* own experts (S = 1) or own slice (r = S) */
    p.n = g->El;
    p.hx = g->Hl;
    p.w1 = PT_(e, l, FC1_W);
    p.w2 = PT_(e, l, FC2_W);
    p.dw1 = G_(e, l, FC1_W);
    p.dw2 = G_(e, l, FC2_W);
    if (l->bias) {
      p.b1 = PT_(e, l, FC1_B);
      p.db1 = G_(e, l, FC1_B);
    }
  } else {
    p.n = v->r == 0 ? g->E : 1;
    p.hx = v->r == 0 ? g->H : g->H / v->r;
    int64_t off[4];
    gw_layout(g, l, p.n, p.hx, off);
    void *gw = F(e, li, GW);
    float *dgw = S(e, li, DGW);
    p.w1 = AT(g, gw, off[0]);
    p.w2 = AT(g, gw, off[2]);
    p.dw1 = dgw + off[0];
    p.dw2 = dgw + off[2];
    if (l->bias) {
      p.b1 = AT(g, gw, off[1]);
      p.db1 = dgw + off[1];
    }
  }
  if (l->bias) {
    if (v->r == 0) {
      int64_t off[4];
      gw_layout(g, l, g->E, g->H, off);
      p.b2 = AT(g, F(e, li, GW), off[3]);
      p.db2 = S(e, li, DGW) + off[3];
    } else if (g->S == 1 || (e->comm->rank % g->S) / (g->S / v->r) == 0) {
      /* fc2's bias is added once: by class 0 when partial outputs are summed */
      p.b2 = PT_(e, l, FC2_B);
      p.db2 = G_(e, l, FC2_B);
    }
  }
  return p;
}

/* --- the token exchange of variants with r >= 1 --- */

typedef struct exchange {
  int64_t W, C, d, P, Cq, Cx, n;  /* n: experts here (El or 1); Cx slots per chunk */
  int64_t block;                   /* floats per rank per chunk */
  int64_t chunk;                   /* floats per chunk, all ranks */
} exchange;

static exchange exchange_for(const moert_exec *e, const layer_geom *g, const moert_variant *v, int64_t C) {
  exchange x;
  x.W = e->comm->world;
  x.C = C;
  x.d = v->d;
  x.P = g->S == 1 ? 1 : g->S / v->r;
  x.Cq = C / x.P;
  x.Cx = x.Cq / x.d;
  x.n = g->S == 1 ? g->El : 1;
  x.block = x.n * x.Cx * g->M;
  x.chunk = x.W * x.block;
  return x;
}

/* Chunk i of src [E, C, M] into the send layout [W, n, Cx, M]. */
static void pack(moert_backend *b, const exchange *x, const layer_geom *g, int64_t i, const void *src,
                 void *dst) {
  int64_t M = g->M;
  if (g->S == 1) {
    b->copy_blocks_t(g->dt, dst, x->Cx * M, AT(g, src, i * x->Cx * M), x->C * M, g->E, x->Cx * M, false);
    return;
  }
  for (int64_t r = 0; r < x->W; r++) {
    int64_t ex = r / g->S, q = (r % g->S) % x->P;
    b->copy_blocks_t(g->dt, AT(g, dst, r * x->block), 0, AT(g, src, (ex * x->C + q * x->Cq + i * x->Cx) * M), 0, 1,
                     x->block, false);
  }
}

/* The inverse of pack, summing what several ranks (the r classes) return. */
static void unpack_sum(moert_backend *b, const exchange *x, const layer_geom *g, int64_t i, const void *src,
                       void *dst) {
  int64_t M = g->M;
  if (g->S == 1) {
    b->copy_blocks_t(g->dt, AT(g, dst, i * x->Cx * M), x->C * M, src, x->Cx * M, g->E, x->Cx * M, false);
    return;
  }
  for (int64_t r = 0; r < x->W; r++) {
    int64_t ex = r / g->S, q = (r % g->S) % x->P;
    b->copy_blocks_t(g->dt, AT(g, dst, (ex * x->C + q * x->Cq + i * x->Cx) * M), 0, AT(g, src, r * x->block), 0, 1,
                     x->block, true);
  }
}

/* Received [W, n, Cx, M] <-> expert-major [n, W Cx, M]. */
static void to_experts(moert_backend *b, const exchange *x, const layer_geom *g, const void *src, void *dst,
                       bool back) {
  int64_t M = g->M;
  for (int64_t r = 0; r < x->W; r++) {
    if (back)
      b->copy_blocks_t(g->dt, AT(g, dst, r * x->block), x->Cx * M, AT(g, src, r * x->Cx * M), x->W * x->Cx * M, x->n,
                       x->Cx * M, false);
    else
      b->copy_blocks_t(g->dt, AT(g, dst, r * x->Cx * M), x->W * x->Cx * M, AT(g, src, r * x->block), x->Cx * M, x->n,
                       x->Cx * M, false);
  }
}

/* One pass of the pipelined exchange: for each chunk, pack `in` and send it
 * to the experts, run `work` on what arrives, send the result back, and sum
 * it into `out`. The all-to-all of chunk i+1 is in flight while chunk i
 * works. */
typedef struct pass_ctx {
  moert_exec *e;
  int li;
  const layer_geom *g;
  const moert_variant *v;
  const exchange *x;
  expert_params p;
  bool backward;
  /* device work with no part in the exchange (the shared experts), run
   * while the first all-to-all is in flight; NULL: none */
  void (*overlap)(moert_exec *e, int li);
} pass_ctx;

static void work_chunk(pass_ctx *c, int64_t i, const void *rows_in, void *rows_out) {
  moert_exec *e = c->e;
  int li = c->li;
  const moert_layer *l = &e->m->layers[li];
  const layer_geom *g = c->g;
  const exchange *x = c->x;
  int64_t rows = x->W * x->Cx, h1 = g->halves * c->p.hx;
  void *ex = AT(g, F(e, li, EX), i * x->chunk);
  void *eh = AT(g, F(e, li, EH), i * x->n * rows * h1);
  void *ea = AT(g, F(e, li, EA), i * x->n * rows * c->p.hx);
  if (!c->backward) {
    to_experts(e->b, x, g, rows_in, ex, false);
    void *ey = AT(g, S(e, li, EY), i * x->chunk);
    experts_fwd(e->b, g->dt, l, &c->p, g->M, rows, ex, eh, ea, ey);
    to_experts(e->b, x, g, ey, rows_out, true);
  } else {
    void *dey = AT(g, S(e, li, EY), i * x->chunk), *dex = AT(g, S(e, li, DEX), i * x->chunk);
    to_experts(e->b, x, g, rows_in, dey, false);
    experts_bwd(e->b, g->dt, l, &c->p, g->M, rows, ex, eh, ea, dey, S(e, li, DEA), S(e, li, DEH), dex,
                i == 0 ? 0.0f : 1.0f);
    to_experts(e->b, x, g, dex, rows_out, true);
  }
}

/* An all-to-all's span in the trace: on the comm's own stream when it has
 * one (the nccl comm marks it there, req_marks), else on the compute stream
 * from before its start to after its wait. */
typedef struct a2a_span {
  int m0, m1;
  bool own;  /* the comm's marks */
  bool none; /* nothing was in flight (no exchange, no span) */
} a2a_span;

/* Before all_to_all_start: the compute stream's mark when the comm has no
 * stream of its own. */
static int a2a_before(moert_exec *e) {
  return e->opts.trace && !e->comm->req_marks ? moert_trace_mark(e->opts.trace, e->b) : -1;
}

static a2a_span a2a_started(moert_exec *e, const moert_req *rq, int before) {
  /* a comm without a stream of its own (staged, mpi) may finish at start
   * (no request): its span is still the compute stream's, start to wait */
  bool own = e->comm->req_marks != NULL;
  a2a_span s = {before, -1, own, own && rq == NULL};
  if (e->opts.trace && s.own && rq) e->comm->req_marks(e->comm, rq, &s.m0, &s.m1);
  return s;
}

/* After the wait: the span, named name, kept for the end of the step. */
static void a2a_waited(moert_exec *e, a2a_span *s, const char *name) {
  if (!e->opts.trace || s->none) return;
  if (!s->own && s->m0 >= 0) s->m1 = moert_trace_mark(e->opts.trace, e->b);
  moert_trace_marks(e->opts.trace, s->m0, s->m1, name, "all-to-all", MOERT_TID_A2A, e->step);
}

static bool exchange_pass(pass_ctx *c, const void *in, void *out, moert_status *st) {
  moert_exec *e = c->e;
  int li = c->li;
  const exchange *x = c->x;
  const layer_geom *g = c->g;
  moert_comm *comm = e->comm;
  moert_a2a_algo algo = c->v->a2a;
  void *xs = S(e, li, XS), *xr = S(e, li, XR), *ys = S(e, li, YS), *yr = S(e, li, YR);
  /* the all-to-all moves bytes: a block of bf16 is half as many floats (M is even then) */
  int64_t nf = x->block * g->es / (int64_t)sizeof(float);
  moert_req *to[8] = {0}, *back[8] = {0};
  a2a_span s_to[8], s_back[8];
  bool named = e->opts.trace || moert_nvtx_on();
  const char *dir = c->backward ? "bwd " : "";
  char name[48] = "";
  for (int64_t i = 0; i < x->d; i++) {
    pack(e->b, x, g, i, in, AT(g, xs, i * x->chunk));
    int before = a2a_before(e);
    MOERT_TRY(st, comm->all_to_all_start(comm, AT(g, xs, i * x->chunk), AT(g, xr, i * x->chunk), nf, algo, &to[i], st));
    s_to[i] = a2a_started(e, to[i], before);
  }
  if (c->overlap) c->overlap(e, li);
  for (int64_t i = 0; i < x->d; i++) {
    MOERT_TRY(st, comm->wait(comm, to[i], st));
    if (e->opts.trace) {
      snprintf(name, sizeof name, "%sa2a to experts %lld/%lld", dir, (long long)i + 1, (long long)x->d);
      a2a_waited(e, &s_to[i], name);
    }
    if (named) snprintf(name, sizeof name, "%sexperts %lld/%lld", dir, (long long)i + 1, (long long)x->d);
    int span = open_span(e, name);
    work_chunk(c, i, AT(g, xr, i * x->chunk), AT(g, ys, i * x->chunk));
    close_span(e, span, name, "experts", MOERT_TID_COMPUTE);
    int before = a2a_before(e);
    MOERT_TRY(st, comm->all_to_all_start(comm, AT(g, ys, i * x->chunk), AT(g, yr, i * x->chunk), nf, algo, &back[i], st));
    s_back[i] = a2a_started(e, back[i], before);
  }
  e->b->zero(out, (size_t)(g->es * g->E * x->C * g->M));
  for (int64_t i = 0; i < x->d; i++) {
    MOERT_TRY(st, comm->wait(comm, back[i], st));
    if (e->opts.trace) {
      snprintf(name, sizeof name, "%sa2a back %lld/%lld", dir, (long long)i + 1, (long long)x->d);
      a2a_waited(e, &s_back[i], name);
    }
    unpack_sum(e->b, x, g, i, AT(g, yr, i * x->chunk), out);
  }
  return true;
}

/* --- the shared experts: one dense FFN of shared_experts * H, on every token --- */

#define SLOT_OR_NULL(e, l, s, lowp) \
  ((l)->bias ? ((lowp) ? PL(e, LI_(e, l), MOERT_MOE_##s) : (void *)P_(e, l, s)) : NULL)

static moert_ffn_args shared_args(moert_exec *e, int li) {
  const moert_layer *l = &e->m->layers[li];
  bool low = e->xdt == MOERT_BF16;
  moert_ffn_args a = {.T = e->rows, .M = e->m->dim, .H = l->shared_experts * l->hidden, .act = l->act,
                      .dt = e->xdt, .w1 = PT_(e, l, SHARED_FC1_W), .b1 = SLOT_OR_NULL(e, l, SHARED_FC1_B, low),
                      .w2 = PT_(e, l, SHARED_FC2_W), .b2 = SLOT_OR_NULL(e, l, SHARED_FC2_B, false),
                      .h = F(e, li, H), .a = F(e, li, A)};
  if (e->training) {
    a.dw1 = G_(e, l, SHARED_FC1_W), a.dw2 = G_(e, l, SHARED_FC2_W);
    a.db1 = l->bias ? G_(e, l, SHARED_FC1_B) : NULL, a.db2 = l->bias ? G_(e, l, SHARED_FC2_B) : NULL;
    a.da = S(e, li, DA), a.dh = S(e, li, DH);
  }
  if (low) a.xb = S(e, li, XB), a.dyb = S(e, li, DYB);
  return a;
}

/* Forward into DX (scratch, [T, M]), added to the output after the combine:
 * the GEMMs run while the routed tokens are in their all-to-all. */
static void shared_fwd(moert_exec *e, int li) {
  moert_ffn_args a = shared_args(e, li);
  int span = open_span(e, "shared experts");
  moert_ffn_fwd(e->b, &a, e->xin[li], S(e, li, DX), 0);
  close_span(e, span, "shared experts", "experts", MOERT_TID_COMPUTE);
}

/* Backward: the weights' gradients, and d input into DX (added to the
 * dispatch's after it). */
static void shared_bwd(moert_exec *e, int li) {
  moert_ffn_args a = shared_args(e, li);
  int span = open_span(e, "bwd shared experts");
  moert_ffn_bwd(e->b, &a, e->xin[li], e->dcur, S(e, li, DX), 0);
  close_span(e, span, "bwd shared experts", "experts", MOERT_TID_COMPUTE);
}

/* --- the layer --- */

/* Whether this forward adds noise to the gate's logits. */
static bool gate_noise(const moert_exec *e, const moert_layer *l, int64_t step) {
  return l->gate_noise > 0 && e->training && step > 0;
}

/* The gate, queued: nothing here waits for the device. */
static void gate_fwd(moert_exec *e, int li, const moert_layer *l, const layer_geom *g, const float *x,
                     int64_t step, int64_t keep) {
  moert_backend *b = e->b;
  int64_t T = e->rows, M = g->M, E = g->E, K = g->K;
  if (l->gate == MOERT_GATE_COSINE) {
    b->gemm(false, false, T, COSINE_PROJ, M, 1, x, M, P_(e, l, GATE_PROJ_W), COSINE_PROJ, 0, F(e, li, PROJ), COSINE_PROJ);
    b->bias_add(F(e, li, PROJ), P_(e, l, GATE_PROJ_B), T, COSINE_PROJ);
    b->l2norm_rows_fwd(F(e, li, PROJ), F(e, li, PROJN), F(e, li, PROJNORM), T, COSINE_PROJ);
    b->l2norm_cols_fwd(P_(e, l, GATE_SIM), F(e, li, SIMN), F(e, li, SIMNORM), COSINE_PROJ, E);
    b->gemm(false, false, T, E, COSINE_PROJ, 1, F(e, li, PROJN), COSINE_PROJ, F(e, li, SIMN), E, 0, F(e, li, RAW), E);
    /* logits = raw * exp(temperature), clamped as Tutel; read on the device */
    b->scale_by_exp(F(e, li, LOGITS), F(e, li, RAW), T * E, P_(e, l, GATE_TEMP), COSINE_MAX_LOG_SCALE);
  } else {
    b->gemm(false, false, T, E, M, 1, x, M, P_(e, l, GATE_W), E, 0, F(e, li, LOGITS), E);
  }
  const float *noise = NULL;
  if (gate_noise(e, l, step)) {
    /* Tutel: logits + gate_noise * N(0, 1) / E, keyed by the token's global
     * position (the same at every world size): index ((step - 1) * world +
     * rank) * tokens * E on, the step read on the device (e->dstep) */
    uint64_t per_rank = (uint64_t)e->plan->tokens * (uint64_t)E;
    b->fill_normal_step(F(e, li, NOISE), T * E, e->seed, STREAM_NOISE + (uint64_t)l->moe_index, e->dstep,
                        per_rank * (uint64_t)e->comm->world, per_rank * (uint64_t)e->comm->rank, 0.0f,
                        (float)(l->gate_noise / (double)E));
    noise = F(e, li, NOISE);
  }
  /* the rest in one op (two kernels on the GPU); at one rank it also takes
   * the aux loss, whose statistics need no sum over ranks first */
  bool aux_here = l->aux_loss > 0 && e->comm->world == 1;
  bool ec = l->routing == MOERT_ROUTE_EXPERT_CHOICE, sigmoid = l->gate == MOERT_GATE_SIGMOID;
  moert_cpu_gate_io io = {.logits = F(e, li, LOGITS),
                          .noise = noise,
                          .scores = F(e, li, SCORES),
                          .idx = I(e, li, IDX),
                          .loc = I(e, li, LOC),
                          .topv = F(e, li, TOPV),
                          .gate = F(e, li, GATE),
                          .order = l->batch_prioritized || ec ? I(e, li, ORDER) : NULL,
                          .counts = I(e, li, COUNTS),
                          .score_sum = F(e, li, SSUM),
                          .top1_count = F(e, li, TOP1),
                          .dscore_coef = F(e, li, DCOEF),
                          .aux_out = aux_here ? e->daux + li : NULL,
                          .global_tokens = (double)e->rows,
                          .normalize = l->normalize_gate,
                          .sigmoid = sigmoid,
                          .bias = sigmoid ? P_(e, l, GATE_BIAS) : NULL,
                          .groups = l->groups,
                          .top_groups = l->top_groups,
                          .route_scale = (float)l->route_scale,
                          .ec_capacity = ec ? keep : 0,
                          .z_sum = l->z_loss > 0 || e->opts.routing_stats ? F(e, li, RSTAT) : NULL,
                          .entropy_sum = e->opts.routing_stats ? F(e, li, RSTAT) + 1 : NULL};
  b->gate_fwd(&io, T, E, K);
}

/* The capacity of this step, the same on every rank: the claims kept per
 * expert (*keep) and the padded C (*C) the buffers use. A fixed capacity
 * (capacity_factor > 0) needs nothing from the device; dropless and dynamic
 * capacity read the claim counts back (after the gate): the layer's one
 * host synchronization. */
static bool capacity(moert_exec *e, int li, const moert_layer *l, const layer_geom *g, int64_t *keep,
                     int64_t *C, moert_status *st) {
  moert_backend *b = e->b;
  const moert_layer_plan *lp = &e->plan->layers[li];
  int64_t E = g->E, T = e->rows;
  int64_t maxc = 0;
  if (l->capacity_factor <= 0) {
    int32_t counts[4096];
    MOERT_TRY(st, b->download(b, counts, I(e, li, COUNTS), sizeof(int32_t) * (size_t)E, st));
    for (int64_t j = 0; j < E; j++)
      if (counts[j] > maxc) maxc = counts[j];
    MOERT_TRY(st, e->comm->all_reduce_i64(e->comm, &maxc, 1, MOERT_RED_MAX, st));
  }
  int64_t k = moert_capacity(l, T, maxc);
  /* the tokens kept are decided before padding, so every variant keeps the same */
  int64_t Cp = moert_round_up(k, lp->align);
  if (Cp > lp->capacity_bound) {
    k = lp->capacity_bound / lp->align * lp->align;
    Cp = k;
  }
  *keep = k;
  *C = Cp;
  return true;
}

/* GShard's aux loss from global load statistics (gate_fwd's), and the
 * coefficients of its gradient for the backward, on the device: over
 * several ranks, the statistics summed by the float all-reduce (on the
 * comm's stream with nccl) and the loss taken from them; at one rank
 * gate_fwd took it. The loss is left in e->daux[li] for
 * moert_moe_read_stats. */
static bool aux_loss(moert_exec *e, int li, const layer_geom *g, moert_status *st) {
  int64_t E = g->E;
  if (e->comm->world == 1) return true;
  MOERT_TRY(st, e->comm->all_reduce_f32(e->comm, F(e, li, SSUM), E, MOERT_RED_SUM, st));
  MOERT_TRY(st, e->comm->all_reduce_f32(e->comm, F(e, li, TOP1), E, MOERT_RED_SUM, st));
  e->b->aux_loss_to(F(e, li, SSUM), F(e, li, TOP1), F(e, li, DCOEF), E, (double)e->rows * e->comm->world,
                    e->daux + li);
  return true;
}

bool moert_moe_read_stats(moert_exec *e, moert_status *st) {
  const moert_model *m = e->m;
  moert_backend *b = e->b;
  e->moe.aux = e->moe.z = 0;
  e->moe.routed = e->moe.dropped = 0;
  double *load = e->moe.load;
  e->moe.load_summed = false; /* this forward's loads, not yet summed over ranks */
  bool any_aux = false;
  for (int li = 0; li < m->nlayers; li++) {
    const moert_layer *l = &m->layers[li];
    if (l->kind != MOERT_L_MOE) continue;
    int64_t E = l->experts, keep = e->moe.keep[li];
    int32_t counts[4096];
    MOERT_TRY(st, b->download(b, counts, I(e, li, COUNTS), sizeof(int32_t) * (size_t)E, st));
    double routed = 0, dropped = 0;
    for (int64_t j = 0; j < E; j++) {
      load[j] = counts[j];
      routed += counts[j];
      dropped += counts[j] > keep ? (double)(counts[j] - keep) : 0;
    }
    e->moe.layer_routed[li] = routed;
    e->moe.layer_dropped[li] = dropped;
    e->moe.routed += routed;
    e->moe.dropped += dropped;
    load += E;
    any_aux = any_aux || l->aux_loss > 0;
    float rs[2] = {0, 0}; /* z and entropy sums of this rank's tokens */
    if (l->z_loss > 0 || e->opts.routing_stats)
      MOERT_TRY(st, b->download(b, rs, F(e, li, RSTAT), sizeof rs, st));
    /* this rank's share of the weighted global mean (the step sums the shares) */
    if (l->z_loss > 0) e->moe.z += l->z_loss * rs[0] / ((double)e->rows * e->comm->world);
    e->moe.entropy[li] = e->opts.routing_stats ? rs[1] : 0;
  }
  if (!any_aux) return true;
  MOERT_TRY(st, b->download(b, e->aux_h, e->daux, sizeof(float) * (size_t)m->nlayers, st));
  for (int li = 0; li < m->nlayers; li++)
    if (m->layers[li].kind == MOERT_L_MOE && m->layers[li].aux_loss > 0) e->moe.aux += m->layers[li].aux_loss * e->aux_h[li];
  return true;
}

bool moert_moe_balance(moert_exec *e, moert_status *st) {
  const moert_model *m = e->m;
  int64_t nload = 0;
  bool any = false;
  for (int li = 0; li < m->nlayers; li++)
    if (m->layers[li].kind == MOERT_L_MOE) {
      nload += m->layers[li].experts;
      any |= m->layers[li].bias_update > 0;
    }
  if (!any) return true;
  /* every layer's loads summed over ranks in one all-reduce, kept for the
   * step's metrics (load_sum) */
  double *global = e->moe.load_sum;
  memcpy(global, e->moe.load, sizeof *global * (size_t)nload);
  bool ok = e->comm->all_reduce_f64(e->comm, global, nload, MOERT_RED_SUM, st);
  e->moe.load_summed = ok;
  const double *load = global;
  for (int li = 0; ok && li < m->nlayers; li++) {
    const moert_layer *l = &m->layers[li];
    if (l->kind != MOERT_L_MOE) continue;
    int64_t E = l->experts;
    if (l->bias_update > 0) {
      float delta[4096];
      double mean = 0;
      for (int64_t j = 0; j < E; j++) mean += load[j];
      mean /= (double)E;
      for (int64_t j = 0; j < E; j++) /* b_e += u sign(mean - load_e) */
        delta[j] = (float)(l->bias_update * ((mean > load[j]) - (mean < load[j])));
      float *dev = S(e, li, DLOGITS); /* free at the step's end */
      ok = e->b->upload(e->b, dev, delta, sizeof(float) * (size_t)E, st);
      if (ok) e->b->add(P_(e, l, GATE_BIAS), P_(e, l, GATE_BIAS), dev, E);
    }
    load += E;
  }
  return ok || MOERT_UP(st);
}

bool moert_moe_gate_bias(moert_exec *e, int li, float *out, moert_status *st) {
  const moert_layer *l = &e->m->layers[li];
  if (l->gate != MOERT_GATE_SIGMOID) {
    memset(out, 0, sizeof(float) * (size_t)l->experts);
    return true;
  }
  return e->b->download(e->b, out, P_(e, l, GATE_BIAS), sizeof(float) * (size_t)l->experts, st);
}

/* A MoE layer's forward or backward once its variant and capacity are
 * known: device work only (a graph segment, step.c). with_gate: the forward
 * runs the gate too (a fixed capacity: nothing is read back between). */
typedef struct moe_ctx {
  int li, vi;
  int64_t C, keep, step;
  const float *x;
  bool with_gate;
} moe_ctx;

/* The gate alone (dropless and dynamic capacity read its counts back). */
static bool moe_gate(moert_exec *e, void *ctx, moert_status *st) {
  (void)st;
  const moe_ctx *c = ctx;
  layer_geom g = geom(e, c->li);
  gate_fwd(e, c->li, &e->m->layers[c->li], &g, c->x, c->step, 0);
  return true;
}

static bool moe_fwd(moert_exec *e, void *ctx, moert_status *st) {
  const moe_ctx *c = ctx;
  int li = c->li;
  const moert_layer *l = &e->m->layers[li];
  const moert_variant *v = &e->plan->layers[li].variants[c->vi];
  layer_geom g = geom(e, li);
  moert_backend *b = e->b;
  int64_t T = e->rows, M = g.M, E = g.E, K = g.K, C = c->C;
  const float *x = c->x;
  int span = open_span(e, "gate and capacity");
  if (c->with_gate) { /* a fixed capacity: keep is the same at every step */
    gate_fwd(e, li, l, &g, x, c->step, c->keep);
    b->drop_beyond(I(e, li, LOC), T * K, c->keep); /* whatever the padded C, claims past keep are dropped */
  }
  if (l->aux_loss > 0) MOERT_TRY(st, aux_loss(e, li, &g, st));
  close_span(e, span, "gate and capacity", "gate", MOERT_TID_COMPUTE);

  span = open_span(e, "dispatch");
  /* the slots past min(count, keep) are zeroed. A graph of C replays the keep it
   * was captured with, which is safe: a fixed keep never changes; dropless never
   * has count > keep; a dynamic keep below the cap has count <= keep, and at
   * the cap no captured keep is larger (a smaller one only zeroes slots that
   * the dispatch then fills). The same holds for combine_bwd_t. */
  b->dispatch_t(g.dt, x, I(e, li, IDX), I(e, li, LOC), I(e, li, COUNTS), c->keep, F(e, li, SRC), T, K, E, C, M);
  close_span(e, span, "dispatch", "dispatch", MOERT_TID_COMPUTE);
  if (v->r == 0 || v->r < g.S) {
    span = open_span(e, "gather experts");
    if (v->r == 0) MOERT_TRY(st, gather_all(e, li, &g, st));
    else MOERT_TRY(st, gather_class(e, li, &g, v->r, st));
    close_span(e, span, "gather experts", "gather", gather_tid(e));
  }
  expert_params p = params_for(e, li, &g, v);
  bool shared = l->shared_experts > 0;
  if (v->r == 0 || e->comm->world == 1) { /* the tokens stay here */
    if (shared) shared_fwd(e, li);
    span = open_span(e, "experts");
    experts_fwd(b, g.dt, l, &p, M, C, F(e, li, SRC), F(e, li, EH), F(e, li, EA), F(e, li, SRCY));
    close_span(e, span, "experts", "experts", MOERT_TID_COMPUTE);
  } else {
    exchange xg = exchange_for(e, &g, v, C);
    pass_ctx pc = {e, li, &g, v, &xg, p, false, shared ? shared_fwd : NULL};
    MOERT_TRY(st, exchange_pass(&pc, F(e, li, SRC), F(e, li, SRCY), st));
  }
  span = open_span(e, "combine");
  b->combine_t(g.dt, F(e, li, SRCY), I(e, li, IDX), I(e, li, LOC), F(e, li, GATE), F(e, li, OUT), T, K, E, C, M);
  if (shared) b->add(F(e, li, OUT), F(e, li, OUT), S(e, li, DX), T * M);
  close_span(e, span, "combine", "combine", MOERT_TID_COMPUTE);
  return true;
}

bool moert_moe_fwd(moert_exec *e, int li, const float *x, int64_t step, moert_status *st) {
  int *lm = e->layer_marks + 4 * li;
  lm[0] = e->b->mark(e->b, NULL);
  const moert_layer *l = &e->m->layers[li];
  const moert_layer_plan *lp = &e->plan->layers[li];
  layer_geom g = geom(e, li);
  moe_ctx c = {.li = li, .step = step, .x = x, .with_gate = l->capacity_factor > 0};
  /* a key's work is the same at every step: the noise (on or off) and the
   * rows are part of it, the step's draws come from e->dstep */
  int noise = gate_noise(e, l, step);
  if (!c.with_gate) { /* the counts decide C: the gate first, then the one read */
    moert_seg_key k = {.li = li, .kind = MOERT_SEG_GATE, .variant = -1, .flags = noise, .rows = e->rows};
    int span = open_span(e, "gate");
    MOERT_TRY(st, moert_exec_segment(e, &k, moe_gate, &c, st));
    close_span(e, span, "gate", "gate", MOERT_TID_COMPUTE);
  }
  MOERT_TRY(st, capacity(e, li, l, &g, &c.keep, &c.C, st));
  /* dropless and dynamic: keep changes from step to step under one padded C,
   * so its drop runs here, outside the graph of C */
  if (!c.with_gate) e->b->drop_beyond(I(e, li, LOC), e->rows * g.K, c.keep);
  e->moe.keep[li] = c.keep;
  e->moe.capacity[li] = c.C;
  int vi = e->repeat_variants ? e->moe.variant[li] : e->opts.pick ? e->opts.pick(e->opts.pick_ctx, li, c.C, step) : 0;
  if (vi < 0 || vi >= lp->nvariants) vi = 0;
  e->moe.variant[li] = c.vi = vi;
  moert_seg_key k = {.li = li, .kind = MOERT_SEG_FWD, .variant = vi, .flags = noise, .capacity = c.C,
                     .rows = e->rows};
  MOERT_TRY(st, moert_exec_segment(e, &k, moe_fwd, &c, st));
  const char *slow = moert_testing()->slow_variant;
  if (slow && strcmp(slow, lp->variants[vi].name) == 0) usleep(30000);
  lm[1] = e->b->mark(e->b, NULL);
  return true;
}

static bool moe_bwd(moert_exec *e, void *ctx, moert_status *st) {
  int li = ((const moe_ctx *)ctx)->li;
  const moert_layer *l = &e->m->layers[li];
  const moert_layer_plan *lp = &e->plan->layers[li];
  layer_geom g = geom(e, li);
  moert_backend *b = e->b;
  int64_t T = e->rows, M = g.M, E = g.E, K = g.K, C = e->moe.capacity[li];
  const moert_variant *v = &lp->variants[e->moe.variant[li]];
  const float *x = e->xin[li];
  int span = open_span(e, "bwd combine");
  b->combine_bwd_t(g.dt, e->dcur, F(e, li, SRCY), I(e, li, IDX), I(e, li, LOC), I(e, li, COUNTS), e->moe.keep[li],
                   F(e, li, GATE), S(e, li, DSRCY), S(e, li, DGATE), T, K, E, C, M);
  close_span(e, span, "bwd combine", "combine", MOERT_TID_COMPUTE);
  bool gathered = v->r == 0 || v->r < g.S;
  if (gathered && lp->s[MOERT_S_DGW] >= 0 && l->bias) {
    /* the gathered biases' gradients accumulate; the weights' are written */
    expert_params p0 = params_for(e, li, &g, v);
    int64_t off[4];
    gw_layout(&g, l, p0.n, p0.hx, off);
    b->zero(S(e, li, DGW) + off[1], sizeof(float) * (size_t)(off[2] - off[1]));
    b->zero(S(e, li, DGW) + off[3], sizeof(float) * (size_t)(p0.n * M));
  }
  expert_params p = params_for(e, li, &g, v);
  bool shared = l->shared_experts > 0;
  if (v->r == 0 || e->comm->world == 1) {
    if (shared) shared_bwd(e, li);
    span = open_span(e, "bwd experts");
    experts_bwd(b, g.dt, l, &p, M, C, F(e, li, SRC), F(e, li, EH), F(e, li, EA), S(e, li, DSRCY), S(e, li, DEA),
                S(e, li, DEH), S(e, li, DSRC), 0.0f);
    close_span(e, span, "bwd experts", "experts", MOERT_TID_COMPUTE);
    if (v->r == 0) {
      span = open_span(e, "bwd scatter experts");
      MOERT_TRY(st, scatter_all(e, li, &g, st));
      close_span(e, span, "bwd scatter experts", "gather", gather_tid(e));
    }
  } else {
    exchange xg = exchange_for(e, &g, v, C);
    pass_ctx c = {e, li, &g, v, &xg, p, true, shared ? shared_bwd : NULL};
    MOERT_TRY(st, exchange_pass(&c, S(e, li, DSRCY), S(e, li, DSRC), st));
    if (v->r < g.S || (g.S > 1 && l->bias)) {
      span = open_span(e, "bwd scatter experts");
      if (v->r < g.S) MOERT_TRY(st, scatter_class(e, li, &g, v->r, st));
      if (g.S > 1 && l->bias) { /* fc2's bias: one sum over the expert's group */
        moert_comm *grp = subcomm(e, g.S, 0);
        MOERT_TRY(st, grp->all_reduce_f32(grp, G_(e, l, FC2_B), M, MOERT_RED_SUM, st));
      }
      close_span(e, span, "bwd scatter experts", "gather", gather_tid(e));
    }
  }
  span = open_span(e, "bwd dispatch");
  b->dispatch_bwd_t(g.dt, S(e, li, DSRC), I(e, li, IDX), I(e, li, LOC), e->dnext, T, K, E, C, M);
  if (shared) b->add(e->dnext, e->dnext, S(e, li, DX), T * M);
  close_span(e, span, "bwd dispatch", "dispatch", MOERT_TID_COMPUTE);

  /* the gate */
  span = open_span(e, "bwd gate");
  moert_cpu_gate_bwd_io gio = {.scores = F(e, li, SCORES), .idx = I(e, li, IDX), .topv = F(e, li, TOPV),
                               .dgate = S(e, li, DGATE), .dscore_coef = l->aux_loss > 0 ? F(e, li, DCOEF) : NULL,
                               .weight = (float)l->aux_loss, .dlogits = S(e, li, DLOGITS),
                               .normalize = l->normalize_gate, .sigmoid = l->gate == MOERT_GATE_SIGMOID,
                               .route_scale = (float)l->route_scale,
                               .ec_capacity = l->routing == MOERT_ROUTE_EXPERT_CHOICE ? e->moe.keep[li] : 0};
  if (l->z_loss > 0) { /* the noise the forward added: a training step's (step > 0) */
    gio.logits = F(e, li, LOGITS);
    gio.noise = l->gate_noise > 0 ? F(e, li, NOISE) : NULL;
    gio.z_weight = (float)l->z_loss;
    gio.global_tokens = (double)e->rows * e->comm->world;
  }
  b->gate_bwd(&gio, T, E, K);
  if (l->gate == MOERT_GATE_COSINE) {
    /* logits = raw * exp(temp): d temp = sum(dlogits * logits) unless clamped */
    b->add_dot_unclamped(G_(e, l, GATE_TEMP), S(e, li, DLOGITS), F(e, li, LOGITS), T * E, P_(e, l, GATE_TEMP),
                         COSINE_MAX_LOG_SCALE);
    b->scale_by_exp(S(e, li, DRAW), S(e, li, DLOGITS), T * E, P_(e, l, GATE_TEMP), COSINE_MAX_LOG_SCALE);
    b->gemm(false, true, T, COSINE_PROJ, E, 1, S(e, li, DRAW), E, F(e, li, SIMN), E, 0, S(e, li, DPROJN), COSINE_PROJ);
    b->gemm(true, false, COSINE_PROJ, E, T, 1, F(e, li, PROJN), COSINE_PROJ, S(e, li, DRAW), E, 0, S(e, li, DSIMN), E);
    b->l2norm_cols_bwd(P_(e, l, GATE_SIM), F(e, li, SIMNORM), S(e, li, DSIMN), S(e, li, DSIM), COSINE_PROJ, E);
    b->axpy(G_(e, l, GATE_SIM), S(e, li, DSIM), 1, COSINE_PROJ * E);
    b->l2norm_rows_bwd(F(e, li, PROJ), F(e, li, PROJNORM), S(e, li, DPROJN), S(e, li, DPROJ), T, COSINE_PROJ);
    b->bias_grad(G_(e, l, GATE_PROJ_B), S(e, li, DPROJ), T, COSINE_PROJ);
    b->gemm(true, false, M, COSINE_PROJ, T, 1, x, M, S(e, li, DPROJ), COSINE_PROJ, 1, G_(e, l, GATE_PROJ_W), COSINE_PROJ);
    b->gemm(false, true, T, M, COSINE_PROJ, 1, S(e, li, DPROJ), COSINE_PROJ, P_(e, l, GATE_PROJ_W), COSINE_PROJ, 1, e->dnext, M);
  } else {
    b->gemm(true, false, M, E, T, 1, x, M, S(e, li, DLOGITS), E, 1, G_(e, l, GATE_W), E);
    b->gemm(false, true, T, M, E, 1, S(e, li, DLOGITS), E, P_(e, l, GATE_W), E, 1, e->dnext, M);
  }
  close_span(e, span, "bwd gate", "gate", MOERT_TID_COMPUTE);
  return true;
}

bool moert_moe_bwd(moert_exec *e, int li, moert_status *st) {
  int *lm = e->layer_marks + 4 * li;
  lm[2] = e->b->mark(e->b, NULL);
  moe_ctx c = {.li = li};
  moert_seg_key k = {.li = li, .kind = MOERT_SEG_BWD, .variant = e->moe.variant[li], .flags = 1,
                     .capacity = e->moe.capacity[li], .rows = e->rows};
  MOERT_TRY(st, moert_exec_segment(e, &k, moe_bwd, &c, st));
  lm[3] = e->b->mark(e->b, NULL);
  return true;
}
