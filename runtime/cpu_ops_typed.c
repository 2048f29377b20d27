/* cpu_ops_typed.c — the expert-path ops of cpu_ops_typed.h on the cpu. fp32
 * tensors go straight to the fp32 ops of cpu_ops.c. bf16 tensors are widened
 * into fp32 temporaries, computed with by the same fp32 ops, and rounded back
 * where they are stored: an emulation of the GPU's bf16 storage (fp32
 * arithmetic, bf16 tensors), used to test the executor's bf16 addressing
 * without a GPU. It allocates (the fp32 path does not). */
#include "cpu_ops_typed.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void *must_alloc(int64_t n) {
  void *p = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
  if (!p) {
    fprintf(stderr, "moec: out of host memory in the cpu's bf16 emulation (%lld floats)\n",
            (long long)n);
    abort();
  }
  return p;
}

void moert_cpu_convert(void *dst, moert_dt dt, const void *src, moert_dt st, int64_t n) {
  if (dt == st) {
    memmove(dst, src, (size_t)n * (size_t)moert_dt_size(dt));
  } else if (dt == MOERT_BF16) {
    const float *s = src;
    uint16_t *d = dst;
    for (int64_t i = 0; i < n; i++) d[i] = moert_f32_to_bf16(s[i]);
  } else {
    const uint16_t *s = src;
    float *d = dst;
    for (int64_t i = 0; i < n; i++) d[i] = moert_bf16_to_f32(s[i]);
  }
}

/* An fp32 view of n elements of p: p itself, or a widened copy. */
static float *widen(const void *p, moert_dt t, int64_t n) {
  if (t == MOERT_F32 || !p) return (float *)p;
  float *w = must_alloc(n);
  moert_cpu_convert(w, MOERT_F32, p, t, n);
  return w;
}

/* Stores the fp32 view w of p back (rounded) and frees it. */
static void narrow(void *p, moert_dt t, float *w, int64_t n) {
  if (t == MOERT_F32 || !p) return;
  moert_cpu_convert(p, t, w, MOERT_F32, n);
  free(w);
}

/* Frees a view that was only read. */
static void drop(const void *p, float *w) {
  if (w != p) free(w);
}

/* Elements a [rows, cols] operand with row stride ld spans. */
static int64_t span_of(int64_t rows, int64_t cols, int64_t ld) {
  return rows > 0 ? (rows - 1) * ld + cols : 0;
}

void moert_cpu_gemm_ex(const moert_gemm *g) {
  int64_t ar = g->trans_a ? g->k : g->m, ac = g->trans_a ? g->m : g->k;
  int64_t br = g->trans_b ? g->n : g->k, bc = g->trans_b ? g->k : g->n;
  int64_t na = span_of(ar, ac, g->lda), nb = span_of(br, bc, g->ldb), nc = span_of(g->m, g->n, g->ldc);
  int64_t es = moert_dt_size(g->ab_type), cs = moert_dt_size(g->c_type);
  for (int64_t i = 0; i < g->count; i++) {
    const char *ai = (const char *)g->a + i * g->stride_a * es;
    const char *bi = (const char *)g->b + i * g->stride_b * es;
    char *ci = (char *)g->c + i * g->stride_c * cs;
    float *a = widen(ai, g->ab_type, na), *b = widen(bi, g->ab_type, nb);
    float *c = widen(ci, g->c_type, nc);
    moert_cpu_gemm(g->trans_a, g->trans_b, g->m, g->n, g->k, g->alpha, a, g->lda, b, g->ldb, g->beta,
                   c, g->ldc);
    if (g->bias) {
      float *bias = widen((const char *)g->bias + i * g->stride_bias * cs, g->c_type, g->n);
      for (int64_t r = 0; r < g->m; r++)
        for (int64_t j = 0; j < g->n; j++) c[r * g->ldc + j] += bias[j];
      drop((const char *)g->bias + i * g->stride_bias * cs, bias);
    }
    if (g->aux) { /* the pre-activation, rounded once */
      char *xi = (char *)g->aux + i * g->stride_c * cs;
      for (int64_t r = 0; r < g->m; r++)
        moert_cpu_convert(xi + r * g->ldc * cs, g->c_type, c + r * g->ldc, MOERT_F32, g->n);
    }
    if (g->act != MOERT_EPI_NONE) {
      moert_act act = g->act == MOERT_EPI_RELU ? MOERT_ACT_RELU : MOERT_ACT_GELU;
      for (int64_t r = 0; r < g->m; r++) moert_cpu_act_fwd(act, c + r * g->ldc, c + r * g->ldc, g->n);
    }
    if (g->bias_grad) /* the column sums of op(B) */
      for (int64_t j = 0; j < g->n; j++) {
        double sum = 0;
        for (int64_t r = 0; r < g->k; r++) sum += b[g->trans_b ? j * g->ldb + r : r * g->ldb + j];
        g->bias_grad[i * g->n + j] = (float)sum;
      }
    drop(ai, a);
    drop(bi, b);
    narrow(ci, g->c_type, c, nc);
  }
}

void moert_cpu_bias_add_t(moert_dt dt, void *y, const void *bias, int64_t count, int64_t rows,
                          int64_t cols) {
  float *yw = widen(y, dt, count * rows * cols), *bw = widen(bias, dt, count * cols);
  for (int64_t z = 0; z < count; z++) moert_cpu_bias_add(yw + z * rows * cols, bw + z * cols, rows, cols);
  drop(bias, bw);
  narrow(y, dt, yw, count * rows * cols);
}

void moert_cpu_bias_grad_t(moert_dt dt, float *dbias, const void *dy, int64_t count, int64_t rows,
                           int64_t cols) {
  float *w = widen(dy, dt, count * rows * cols);
  for (int64_t z = 0; z < count; z++) moert_cpu_bias_grad(dbias + z * cols, w + z * rows * cols, rows, cols);
  drop(dy, w);
}

void moert_cpu_act_fwd_t(moert_dt dt, moert_act act, const void *h, void *a, int64_t n) {
  float *hw = widen(h, dt, n), *aw = widen(a, dt, n);
  moert_cpu_act_fwd(act, hw, aw, n);
  drop(h, hw);
  narrow(a, dt, aw, n);
}

void moert_cpu_act_bwd_t(moert_dt dt, moert_act act, const void *h, const void *da, void *dh,
                         int64_t n) {
  float *hw = widen(h, dt, n), *daw = widen(da, dt, n), *dhw = widen(dh, dt, n);
  moert_cpu_act_bwd(act, hw, daw, dhw, n);
  drop(h, hw);
  drop(da, daw);
  narrow(dh, dt, dhw, n);
}

void moert_cpu_swiglu_fwd_t(moert_dt dt, const void *h, void *a, int64_t rows, int64_t hid) {
  float *hw = widen(h, dt, 2 * rows * hid), *aw = widen(a, dt, rows * hid);
  moert_cpu_swiglu_fwd(hw, aw, rows, hid);
  drop(h, hw);
  narrow(a, dt, aw, rows * hid);
}

void moert_cpu_swiglu_bwd_t(moert_dt dt, const void *h, const void *da, void *dh, int64_t rows,
                            int64_t hid) {
  float *hw = widen(h, dt, 2 * rows * hid), *daw = widen(da, dt, rows * hid);
  float *dhw = widen(dh, dt, 2 * rows * hid);
  moert_cpu_swiglu_bwd(hw, daw, dhw, rows, hid);
  drop(h, hw);
  drop(da, daw);
  narrow(dh, dt, dhw, 2 * rows * hid);
}

void moert_cpu_dispatch_t(moert_dt dt, const float *x, const int32_t *idx, const int32_t *loc,
                          const int32_t *counts, int64_t keep, void *buf, int64_t tokens,
                          int64_t top_k, int64_t experts, int64_t capacity, int64_t dim) {
  (void)counts, (void)keep; /* the whole buffer is written */
  int64_t n = experts * capacity * dim;
  float *w = dt == MOERT_F32 ? buf : must_alloc(n);
  moert_cpu_dispatch(x, idx, loc, w, tokens, top_k, experts, capacity, dim);
  narrow(buf, dt, w, n);
}

void moert_cpu_dispatch_bwd_t(moert_dt dt, const void *dbuf, const int32_t *idx,
                              const int32_t *loc, float *dx, int64_t tokens, int64_t top_k,
                              int64_t experts, int64_t capacity, int64_t dim) {
  float *w = widen(dbuf, dt, experts * capacity * dim);
  moert_cpu_dispatch_bwd(w, idx, loc, dx, tokens, top_k, experts, capacity, dim);
  drop(dbuf, w);
}

void moert_cpu_combine_t(moert_dt dt, const void *buf, const int32_t *idx, const int32_t *loc,
                         const float *gate, float *y, int64_t tokens, int64_t top_k,
                         int64_t experts, int64_t capacity, int64_t dim) {
  float *w = widen(buf, dt, experts * capacity * dim);
  moert_cpu_combine(w, idx, loc, gate, y, tokens, top_k, experts, capacity, dim);
  drop(buf, w);
}

void moert_cpu_combine_bwd_t(moert_dt dt, const float *dy, const void *buf, const int32_t *idx,
                             const int32_t *loc, const int32_t *counts, int64_t keep,
                             const float *gate, void *dbuf, float *dgate, int64_t tokens,
                             int64_t top_k, int64_t experts, int64_t capacity, int64_t dim) {
  (void)counts, (void)keep; /* the whole buffer is written */
  int64_t n = experts * capacity * dim;
  float *w = widen(buf, dt, n), *dw = dt == MOERT_F32 ? dbuf : must_alloc(n);
  moert_cpu_combine_bwd(dy, w, idx, loc, gate, dw, dgate, tokens, top_k, experts, capacity, dim);
  drop(buf, w);
  narrow(dbuf, dt, dw, n);
}

void moert_cpu_rope_t(moert_dt dt, void *qkv, int64_t tokens, int64_t seq, int64_t pos0, int64_t heads,
                      int64_t kv_heads, int64_t head_dim, double base, bool inverse) {
  int64_t n = tokens * (heads + 2 * kv_heads) * head_dim;
  float *w = widen(qkv, dt, n);
  moert_cpu_rope(w, tokens, seq, pos0, heads, kv_heads, head_dim, base, inverse);
  narrow(qkv, dt, w, n);
}

void moert_cpu_attn_fwd_t(moert_dt dt, const void *qkv, void *o, float *lse, int64_t nseq, int64_t seq,
                          int64_t heads, int64_t kv_heads, int64_t head_dim, bool causal) {
  int64_t T = nseq * seq, W = (heads + 2 * kv_heads) * head_dim;
  float *qw = widen(qkv, dt, T * W), *ow = dt == MOERT_F32 ? o : must_alloc(T * heads * head_dim); /* written */
  moert_cpu_attn_fwd(qw, ow, lse, nseq, seq, heads, kv_heads, head_dim, causal);
  drop(qkv, qw);
  narrow(o, dt, ow, T * heads * head_dim);
}

void moert_cpu_attn_bwd_t(moert_dt dt, const void *qkv, const void *o, const float *lse, const void *dout,
                          void *dqkv, float *scratch, int64_t nseq, int64_t seq, int64_t heads,
                          int64_t kv_heads, int64_t head_dim, bool causal) {
  int64_t T = nseq * seq, W = (heads + 2 * kv_heads) * head_dim, HD = heads * head_dim;
  float *qw = widen(qkv, dt, T * W), *ow = widen(o, dt, T * HD), *dow = widen(dout, dt, T * HD);
  float *dw = dt == MOERT_F32 ? dqkv : must_alloc(T * W); /* written whole */
  moert_cpu_attn_bwd(qw, ow, lse, dow, dw, scratch, nseq, seq, heads, kv_heads, head_dim, causal);
  drop(qkv, qw);
  drop(o, ow);
  drop(dout, dow);
  narrow(dqkv, dt, dw, T * W);
}

void moert_cpu_attn_decode_t(moert_dt dt, const void *q, const void *cache, void *o, int64_t len, int64_t heads,
                             int64_t kv_heads, int64_t head_dim) {
  int64_t W = (heads + 2 * kv_heads) * head_dim, HD = heads * head_dim;
  float *qw = widen(q, dt, W), *cw = widen(cache, dt, len * W), *ow = dt == MOERT_F32 ? o : must_alloc(HD);
  moert_cpu_attn_decode(qw, cw, ow, len, heads, kv_heads, head_dim);
  drop(q, qw);
  drop(cache, cw);
  narrow(o, dt, ow, HD);
}
