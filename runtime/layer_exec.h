/* layer_exec.h — what a layer's executor code (runtime/layers/, step.c,
 * moe.c) shares: its parameters by slot, its buffers by name, and one packed
 * GEMM of typed operands. Private to the runtime. */
#ifndef MOERT_LAYER_EXEC_H
#define MOERT_LAYER_EXEC_H

#include "exec.h"

/* Norm epsilons (PyTorch's LayerNorm default; T5/LLaMA's RMSNorm). */
#define MOERT_LN_EPS 1e-5f
#define MOERT_RMS_EPS 1e-6f

/* The parameter in slot s of layer li: its index, its fp32 master, its
 * gradient, its bf16 copy (e->wlow; a bf16 model). */
#define SLOT(e, li, s) ((e)->plan->params[(e)->plan->layers[li].slot[s]])
#define P(e, li, s) ((e)->params + SLOT(e, li, s).offset)
#define G(e, li, s) ((e)->grads + SLOT(e, li, s).offset)
#define PL(e, li, s) ((void *)((uint16_t *)(e)->wlow + SLOT(e, li, s).offset))
/* The layer's saved float, int32 and scratch buffers (placement.h). */
#define F(e, li, name) ((e)->act + (e)->plan->layers[li].f[MOERT_F_##name])
#define I(e, li, name) ((e)->iact + (e)->plan->layers[li].i[MOERT_I_##name])
#define S(e, li, name) ((e)->scratch + (e)->plan->layers[li].s[MOERT_S_##name])

/* One packed GEMM of typed operands (see moert_gemm): C [m, n] = op(A) op(B)
 * (+ beta C) (+ bias). */
static inline void moert_gemm1(moert_backend *b, bool ta, bool tb, int64_t m, int64_t n, int64_t k, moert_dt ab,
                               const void *a_, const void *b_, float beta, moert_dt ct, void *c, const void *bias) {
  moert_gemm g = {.trans_a = ta, .trans_b = tb, .m = m, .n = n, .k = k, .count = 1, .alpha = 1, .beta = beta,
                  .a = a_, .b = b_, .ab_type = ab, .lda = ta ? m : k, .stride_a = m * k, .ldb = tb ? k : n,
                  .stride_b = k * n, .c = c, .c_type = ct, .ldc = n, .stride_c = m * n, .bias = bias,
                  .stride_bias = n};
  b->gemm_ex(&g);
}

/* A dense FFN x -> act(x w1 + b1) w2 + b2 on T rows (M -> H -> M; swiglu:
 * w1 is M -> 2H, its two halves gated): the ffn layer's, and a MoE layer's
 * shared experts'. dt BF16: the GEMMs take bf16 operands (w1, b1 and w2 are
 * then the bf16 copies, x and dy are rounded into xb and dyb) with fp32 out;
 * F32: everything fp32. Biases may be NULL (none). out and dx are written
 * (beta 0) or added to (beta 1); the weights' gradients are written, the
 * biases' accumulate. */
typedef struct moert_ffn_args {
  int64_t T, M, H;
  moert_act act;
  moert_dt dt;
  const void *w1, *b1, *w2;
  const float *b2;
  float *dw1, *db1, *dw2, *db2;
  void *h, *a;     /* [T, H1], [T, H] of dt: kept from the forward for the backward */
  void *da, *dh;   /* [T, H], [T, H1] of dt: the backward's scratch */
  void *xb, *dyb;  /* [T, M] bf16 (dt BF16 only) */
} moert_ffn_args;
void moert_ffn_fwd(moert_backend *b, const moert_ffn_args *a, const float *x, float *out, float beta);
void moert_ffn_bwd(moert_backend *b, const moert_ffn_args *a, const float *x, const float *dy, float *dx,
                   float beta);

#endif
