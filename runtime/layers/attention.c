/* attention.c — the attention layer kind (layer.h): multi-head self-attention
 * within each sequence of `seq` tokens. x [T, M] -> qkv = x qkv_w (+ qkv_b),
 * [T, (H + 2 KV) D]; RoPE on its query and key heads; o = softmax(Q K^T /
 * sqrt(D)) V per head, [T, H D] (cpu_ops.h's attention ops: causal, grouped-
 * query); y = o out_w (+ out_b), [T, M]. Data parallel: the parameters are
 * replicated and their gradients all-reduced like the other dense layers'.
 * In a bf16 model qkv and o are stored as bf16 and the GEMMs take bf16
 * operands, as the FFN's. */
#include "layer.h"

#include <math.h>

#include "cpu_ops.h" /* moert_cpu_attn_scratch */

#ifndef MOERT_LAYER_DESCRIBE_ONLY
#include "layer_exec.h"
#endif

enum { QKV_W, QKV_B, OUT_W, OUT_B };
static const char *const slots[] = {"qkv_w", "qkv_b", "out_w", "out_b"};

/* The width of a qkv row, and of an o row. */
static int64_t qkv_width(const moert_layer *l) { return (l->heads + 2 * l->kv_heads) * l->head_dim; }
static int64_t o_width(const moert_layer *l) { return l->heads * l->head_dim; }

static bool attn_slot(const moert_model *m, const moert_layer *l, int s, moert_param *p) {
  int64_t M = m->dim, W = qkv_width(l), HD = o_width(l);
  if ((s == QKV_B || s == OUT_B) && !l->bias) return false;
  *p = (moert_param){.init = MOERT_INIT_UNIFORM, .place = MOERT_PLACE_REPLICATED};
  p->scale = 1 / sqrt((double)(s == QKV_W || s == QKV_B ? M : HD)); /* PyTorch's Linear: 1/sqrt(fan_in) */
  switch (s) {
  case QKV_W: p->ndim = 2, p->shape[0] = M, p->shape[1] = W; break;
  case QKV_B: p->ndim = 1, p->shape[0] = W; break;
  case OUT_W: p->ndim = 2, p->shape[0] = HD, p->shape[1] = M; break;
  default: p->ndim = 1, p->shape[0] = M; break;
  }
  return true;
}

static bool attn_plan(moert_plan_ctx *c, moert_status *st) {
  const moert_layer *l = c->l;
  int64_t T = c->T, M = c->m->dim, S = c->m->seq, W = qkv_width(l), HD = o_width(l);
  if (S <= 0 || T % S != 0) {
    return MOERT_FAIL(st, "attention layer `%s`: %lld tokens per rank are not a whole number of sequences of %lld",
                      l->name, (long long)T, (long long)S);
  }
  moert_plan_f(c, MOERT_F_QKV, T * W);
  moert_plan_f(c, MOERT_F_AO, T * HD);
  moert_plan_f(c, MOERT_F_LSE, T * l->heads);
  moert_plan_f(c, MOERT_F_OUT, T * M);
  moert_plan_s(c, MOERT_S_DQKV, T * W);
  moert_plan_s(c, MOERT_S_DAO, T * HD);
  moert_plan_s(c, MOERT_S_ASCR, moert_cpu_attn_scratch(T, l->heads, l->kv_heads, l->head_dim));
  if (c->m->dtype == MOERT_DT_BF16) { /* bf16 copies, half a float each */
    moert_plan_s(c, MOERT_S_XB, (T * M + 1) / 2);
    moert_plan_s(c, MOERT_S_DYB, (T * M + 1) / 2);
  }
  /* the projections, and Q K^T and P V (half of each when causal) */
  double core = 4.0 * (double)T * (double)S * (double)HD;
  c->lp->flops_fwd = 2.0 * T * M * W + 2.0 * T * HD * M + (l->causal ? core / 2 : core);
  return true;
}

static int64_t attn_row(const moert_model *m, const moert_layer *l) {
  int64_t w = qkv_width(l);
  return w > m->dim ? w : m->dim;
}

static void attn_describe(const moert_model *m, const moert_layer *l, char *buf, size_t n) {
  char rope[48] = "no positions";
  if (l->rope > 0) snprintf(rope, sizeof rope, "rope %g", l->rope);
  snprintf(buf, n, "heads = %lld, kv_heads = %lld, D = %lld, seq = %lld, %s, %s", (long long)l->heads,
           (long long)l->kv_heads, (long long)l->head_dim, (long long)m->seq, l->causal ? "causal" : "bidirectional",
           rope);
}

static void attn_json(const moert_plan *p, int li, FILE *out) {
  const moert_layer *l = &p->model->layers[li];
  fprintf(out, ", \"heads\": %lld, \"kv_heads\": %lld, \"head_dim\": %lld, \"causal\": %s, \"rope\": %.17g"
               ", \"bias\": %s",
          (long long)l->heads, (long long)l->kv_heads, (long long)l->head_dim, l->causal ? "true" : "false", l->rope,
          l->bias ? "true" : "false");
}

static bool attn_grad_written(const moert_layer *l, int s) {
  (void)l;
  return s == QKV_W || s == OUT_W; /* their GEMMs run with beta 0 */
}

#ifndef MOERT_LAYER_DESCRIBE_ONLY
/* The input projection of `rows` tokens at positions pos0 + t % seq: QKV =
 * x qkv_w (+ qkv_b), RoPE on its query and key heads (bf16 operands and
 * qkv in a bf16 model). */
static void qkv_in(moert_exec *e, int li, int64_t rows, int64_t seq, int64_t pos0) {
  moert_backend *b = e->b;
  const moert_layer *l = &e->m->layers[li];
  const float *x = e->xin[li];
  int64_t M = e->m->dim, W = qkv_width(l), H = l->heads, KV = l->kv_heads, D = l->head_dim;
  if (e->xdt == MOERT_BF16) {
    b->convert(S(e, li, XB), MOERT_BF16, x, MOERT_F32, rows * M);
    moert_gemm1(b, false, false, rows, W, M, MOERT_BF16, S(e, li, XB), PL(e, li, QKV_W), 0, MOERT_BF16,
                F(e, li, QKV), l->bias ? PL(e, li, QKV_B) : NULL);
    if (l->rope > 0) b->rope_t(MOERT_BF16, F(e, li, QKV), rows, seq, pos0, H, KV, D, l->rope, false);
    return;
  }
  b->gemm(false, false, rows, W, M, 1, x, M, P(e, li, QKV_W), W, 0, F(e, li, QKV), W);
  if (l->bias) b->bias_add(F(e, li, QKV), P(e, li, QKV_B), rows, W);
  if (l->rope > 0) b->rope(F(e, li, QKV), rows, seq, pos0, H, KV, D, l->rope, false);
}

/* The output projection of `rows` tokens: OUT = o out_w (+ out_b), fp32. */
static void out_proj(moert_exec *e, int li, int64_t rows) {
  moert_backend *b = e->b;
  const moert_layer *l = &e->m->layers[li];
  int64_t M = e->m->dim, HD = o_width(l);
  if (e->xdt == MOERT_BF16) {
    moert_gemm1(b, false, false, rows, M, HD, MOERT_BF16, F(e, li, AO), PL(e, li, OUT_W), 0, MOERT_F32,
                F(e, li, OUT), l->bias ? P(e, li, OUT_B) : NULL);
    return;
  }
  b->gemm(false, false, rows, M, HD, 1, F(e, li, AO), HD, P(e, li, OUT_W), M, 0, F(e, li, OUT), M);
  if (l->bias) b->bias_add(F(e, li, OUT), P(e, li, OUT_B), rows, M);
}

static bool attn_fwd(moert_exec *e, int li, int64_t step, bool want_grad, moert_status *st) {
  (void)step, (void)want_grad;
  moert_backend *b = e->b;
  const moert_layer *l = &e->m->layers[li];
  int64_t T = e->rows, S = e->m->seq, H = l->heads, KV = l->kv_heads, D = l->head_dim;
  if (T % S != 0) /* the plan checks the batch; a caller's rows (logits of a few windows) too */
    return MOERT_FAIL(st, "attention layer `%s`: %lld rows are not whole sequences of %lld (generation runs one "
                      "token at a time through moert_exec_decode)", l->name, (long long)T, (long long)S);
  qkv_in(e, li, T, S, 0);
  if (e->xdt == MOERT_BF16) /* bf16 qkv and o; fp32 in and out */
    b->attn_fwd_t(MOERT_BF16, F(e, li, QKV), F(e, li, AO), F(e, li, LSE), T / S, S, H, KV, D, l->causal);
  else
    b->attn_fwd(F(e, li, QKV), F(e, li, AO), F(e, li, LSE), T / S, S, H, KV, D, l->causal);
  out_proj(e, li, T);
  return true;
}

static bool attn_bwd(moert_exec *e, int li, moert_status *st) {
  (void)st;
  moert_backend *b = e->b;
  const moert_layer *l = &e->m->layers[li];
  const float *x = e->xin[li];
  int64_t T = e->rows, M = e->m->dim, S = e->m->seq, W = qkv_width(l), HD = o_width(l);
  int64_t H = l->heads, KV = l->kv_heads, D = l->head_dim;
  if (e->xdt == MOERT_BF16) { /* as the forward: bf16 operands, fp32 gradients out */
    const moert_dt B16 = MOERT_BF16;
    if (l->bias) b->bias_grad(G(e, li, OUT_B), e->dcur, T, M);
    b->convert(S(e, li, DYB), B16, e->dcur, MOERT_F32, T * M);
    moert_gemm1(b, true, false, HD, M, T, B16, F(e, li, AO), S(e, li, DYB), 0, MOERT_F32, G(e, li, OUT_W), NULL);
    moert_gemm1(b, false, true, T, HD, M, B16, S(e, li, DYB), PL(e, li, OUT_W), 0, B16, S(e, li, DAO), NULL);
    b->attn_bwd_t(B16, F(e, li, QKV), F(e, li, AO), F(e, li, LSE), S(e, li, DAO), S(e, li, DQKV),
                  S(e, li, ASCR), T / S, S, H, KV, D, l->causal);
    if (l->rope > 0) b->rope_t(B16, S(e, li, DQKV), T, S, 0, H, KV, D, l->rope, true);
    if (l->bias) b->bias_grad_t(B16, G(e, li, QKV_B), S(e, li, DQKV), 1, T, W);
    b->convert(S(e, li, XB), B16, x, MOERT_F32, T * M);
    moert_gemm1(b, true, false, M, W, T, B16, S(e, li, XB), S(e, li, DQKV), 0, MOERT_F32, G(e, li, QKV_W), NULL);
    moert_gemm1(b, false, true, T, M, W, B16, S(e, li, DQKV), PL(e, li, QKV_W), 0, MOERT_F32, e->dnext, NULL);
    return true;
  }
  if (l->bias) b->bias_grad(G(e, li, OUT_B), e->dcur, T, M);
  b->gemm(true, false, HD, M, T, 1, F(e, li, AO), HD, e->dcur, M, 0, G(e, li, OUT_W), M);
  b->gemm(false, true, T, HD, M, 1, e->dcur, M, P(e, li, OUT_W), M, 0, S(e, li, DAO), HD);
  b->attn_bwd(F(e, li, QKV), F(e, li, AO), F(e, li, LSE), S(e, li, DAO), S(e, li, DQKV), S(e, li, ASCR), T / S, S,
              H, KV, D, l->causal);
  if (l->rope > 0) b->rope(S(e, li, DQKV), T, S, 0, H, KV, D, l->rope, true);
  if (l->bias) b->bias_grad(G(e, li, QKV_B), S(e, li, DQKV), T, W);
  b->gemm(true, false, M, W, T, 1, x, M, S(e, li, DQKV), W, 0, G(e, li, QKV_W), W);
  b->gemm(false, true, T, M, W, 1, S(e, li, DQKV), W, P(e, li, QKV_W), W, 0, e->dnext, M);
  return true;
}

/* Generation's key/value cache: the qkv rows of the last seq tokens, a ring
 * (token p in row p % seq), in the storage type; only their key and value
 * heads are read. */
static int64_t attn_decode_state(const moert_model *m, const moert_layer *l) { return m->seq * qkv_width(l); }

/* One token at position pos: its qkv row (row 0 of QKV), rotated at pos,
 * into the ring; its query against the ring's min(pos + 1, seq) rows (row 0
 * of AO); the output projection (row 0 of OUT), as the forward's. */
static bool attn_decode(moert_exec *e, int li, int64_t pos, moert_status *st) {
  moert_backend *b = e->b;
  const moert_layer *l = &e->m->layers[li];
  if (!l->causal)
    return MOERT_FAIL(st, "attention layer `%s` is bidirectional (causal = false): its tokens see later ones, "
                      "which generation has not made yet; only a causal model generates text", l->name);
  int64_t S = e->m->seq, W = qkv_width(l), H = l->heads, KV = l->kv_heads, D = l->head_dim;
  int64_t len = pos + 1 < S ? pos + 1 : S;
  void *slot = (char *)e->dec.state[li] + (size_t)((pos % S) * W) * (size_t)moert_dt_size(e->xdt);
  qkv_in(e, li, 1, 1, pos);
  b->copy_blocks_t(e->xdt, slot, W, F(e, li, QKV), W, 1, W, false);
  if (e->xdt == MOERT_BF16)
    b->attn_decode_t(MOERT_BF16, F(e, li, QKV), e->dec.state[li], F(e, li, AO), len, H, KV, D);
  else
    b->attn_decode(F(e, li, QKV), e->dec.state[li], F(e, li, AO), len, H, KV, D);
  out_proj(e, li, 1);
  return true;
}
#else
#define attn_fwd NULL
#define attn_bwd NULL
#define attn_decode_state NULL
#define attn_decode NULL
#endif

const moert_layer_ops MOERT_LAYER_OPS(ATTENTION) = {
    .name = "attention",
    .flags = MOERT_LF_OUTPUT | MOERT_LF_SWAP | MOERT_LF_COMPUTE,
    .nslots = 4,
    .slots = slots,
    .slot = attn_slot,
    .plan = attn_plan,
    .row = attn_row,
    .describe = attn_describe,
    .plan_json = attn_json,
    .fwd = attn_fwd,
    .bwd = attn_bwd,
    .grad_written = attn_grad_written,
    .decode_state = attn_decode_state,
    .decode = attn_decode,
};
