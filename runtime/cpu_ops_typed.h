/* cpu_ops_typed.h — the ops of the expert path in a storage type, apart from
 * cpu_ops.h (which the unit tests twin in double). */
#ifndef MOERT_CPU_OPS_TYPED_H
#define MOERT_CPU_OPS_TYPED_H

#include "cpu_ops.h"

/* --- the expert path in a storage type (fp32, or bf16 on a device) ---
 *
 * With a bf16 model on the GPU, the tensors of the expert path (the
 * dispatched tokens, the experts' hidden and output rows, their gradients,
 * the exchanged blocks, the experts' weights as computed with) are stored as
 * bf16; gating, the layer's input and output, parameter gradients, master
 * weights and optimizer state stay fp32. These ops take such tensors as
 * `void *` with their type. On the cpu, bf16 tensors are rounded to bf16
 * where they are stored and computed with in fp32 (an emulation, for tests of
 * the executor; it allocates temporaries); fp32 calls the ops above. */

typedef enum { MOERT_F32, MOERT_BF16 } moert_dt;

/* Bytes per element. */
static inline int moert_dt_size(moert_dt t) { return t == MOERT_BF16 ? 2 : 4; }
/* bf16 <-> fp32: round to nearest even, NaN stays NaN. */
static inline uint16_t moert_f32_to_bf16(float f) {
  union { float f; uint32_t u; } v = {f};
  if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u);
  return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}
static inline float moert_bf16_to_f32(uint16_t h) {
  union { uint32_t u; float f; } v = {(uint32_t)h << 16};
  return v.f;
}

/* dst (type dt) = src (type st), n elements. */
void moert_cpu_convert(void *dst, moert_dt dt, const void *src, moert_dt st, int64_t n);

/* The activation a GEMM's epilogue applies (moert_gemm.act): none, or relu
 * or gelu as moert_cpu_act_fwd computes them (gelu in the tanh form, the
 * form of cuBLASLt's GELU epilogues, which the cuda backend uses for bf16
 * results). silu and swiglu have no epilogue: their kernels run after the
 * GEMM. */
typedef enum { MOERT_EPI_NONE, MOERT_EPI_RELU, MOERT_EPI_GELU } moert_epi;

/* count GEMMs, each operand in its own type, accumulated in fp32 (A and B
 * share a type):
 *   pre_i = alpha op(A_i) op(B_i) + beta C_i + bias_i   (bias_i broadcast over rows)
 *   C_i   = act(pre_i)
 *   aux_i = pre_i                                       (when aux is not NULL)
 *   bias_grad_i[j] = sum over k of op(B_i)[k, j]        (when bias_grad is not NULL)
 * all in fp32, each result rounded once to its type where it is stored.
 * bias (NULL: none) is in C's type, bias_i = bias + i * stride_bias; aux is
 * in C's type with C's layout (ldc, stride_c). The backward of gelu needs
 * aux; that of relu can use C, since relu(h) > 0 iff h > 0 (the executor
 * does). bias_grad (fp32, [count, n], written) is the column sums of op(B):
 * in a weight-gradient GEMM dW = X^T dY, the bias gradient dY's rows sum to
 * (cuBLASLt's BGRADA epilogue); it needs C fp32, no bias, aux or act, and B
 * packed and not transposed (ldb = n, stride_b = k n). A zeroed descriptor's
 * epilogue is none. */
typedef struct moert_gemm {
  bool trans_a, trans_b;
  int64_t m, n, k, count;
  float alpha, beta;
  const void *a, *b;
  moert_dt ab_type;
  int64_t lda, stride_a, ldb, stride_b;
  void *c;
  moert_dt c_type;
  int64_t ldc, stride_c;
  const void *bias;
  int64_t stride_bias;
  moert_epi act;
  void *aux;
  float *bias_grad;
} moert_gemm;
void moert_cpu_gemm_ex(const moert_gemm *g);

/* The ops of the expert path, with their tensors of type dt (see above):
 * y[z] += bias[z] over count blocks [rows, cols] (bias [count, cols]);
 * dbias[z] (fp32) accumulates the column sums of dy[z]. */
void moert_cpu_bias_add_t(moert_dt dt, void *y, const void *bias, int64_t count, int64_t rows,
                          int64_t cols);
void moert_cpu_bias_grad_t(moert_dt dt, float *dbias, const void *dy, int64_t count, int64_t rows,
                           int64_t cols);
void moert_cpu_act_fwd_t(moert_dt dt, moert_act act, const void *h, void *a, int64_t n);
void moert_cpu_act_bwd_t(moert_dt dt, moert_act act, const void *h, const void *da, void *dh,
                         int64_t n);
void moert_cpu_swiglu_fwd_t(moert_dt dt, const void *h, void *a, int64_t rows, int64_t hid);
void moert_cpu_swiglu_bwd_t(moert_dt dt, const void *h, const void *da, void *dh, int64_t rows,
                            int64_t hid);
/* dispatch and combine with buf/dbuf of type dt; x, dx, y, dy, gate fp32.
 * dispatch_t and combine_bwd_t write every slot of buf/dbuf: the kept claims'
 * rows, zeros elsewhere. counts (NULL: not known) are the claims on each
 * expert, whose kept ones fill its slots [0, min(counts[e], keep)) (as
 * gate_locations and drop_beyond number them), so that a device zeroes only
 * the slots past them instead of the whole buffer; the cpu zeroes it all. */
void moert_cpu_dispatch_t(moert_dt dt, const float *x, const int32_t *idx, const int32_t *loc,
                          const int32_t *counts, int64_t keep, void *buf, int64_t tokens,
                          int64_t top_k, int64_t experts, int64_t capacity, int64_t dim);
void moert_cpu_dispatch_bwd_t(moert_dt dt, const void *dbuf, const int32_t *idx,
                              const int32_t *loc, float *dx, int64_t tokens, int64_t top_k,
                              int64_t experts, int64_t capacity, int64_t dim);
void moert_cpu_combine_t(moert_dt dt, const void *buf, const int32_t *idx, const int32_t *loc,
                         const float *gate, float *y, int64_t tokens, int64_t top_k,
                         int64_t experts, int64_t capacity, int64_t dim);
void moert_cpu_combine_bwd_t(moert_dt dt, const float *dy, const void *buf, const int32_t *idx,
                             const int32_t *loc, const int32_t *counts, int64_t keep,
                             const float *gate, void *dbuf, float *dgate, int64_t tokens,
                             int64_t top_k, int64_t experts, int64_t capacity, int64_t dim);

/* attention (cpu_ops.h) with qkv, o, dout and dqkv of type dt; lse and
 * scratch fp32. bf16: the inputs as stored, computed in fp32, each output
 * rounded once where it is stored. */
void moert_cpu_rope_t(moert_dt dt, void *qkv, int64_t tokens, int64_t seq, int64_t pos0, int64_t heads,
                      int64_t kv_heads, int64_t head_dim, double base, bool inverse);
void moert_cpu_attn_fwd_t(moert_dt dt, const void *qkv, void *o, float *lse, int64_t nseq, int64_t seq,
                          int64_t heads, int64_t kv_heads, int64_t head_dim, bool causal);
void moert_cpu_attn_bwd_t(moert_dt dt, const void *qkv, const void *o, const float *lse, const void *dout,
                          void *dqkv, float *scratch, int64_t nseq, int64_t seq, int64_t heads,
                          int64_t kv_heads, int64_t head_dim, bool causal);
void moert_cpu_attn_decode_t(moert_dt dt, const void *q, const void *cache, void *o, int64_t len, int64_t heads,
                             int64_t kv_heads, int64_t head_dim);

#endif
