/* head.c — the language-model head (layer.h): logits = x w over the
 * vocabulary and the cross-entropy of the next token (mean over all global
 * tokens); its forward leaves d logits for the backward. In a bf16 model the
 * GEMMs take bf16 operands; the logits stay fp32. */
#include "layer.h"

#include <math.h>

#ifndef MOERT_LAYER_DESCRIBE_ONLY
#include "layer_exec.h"
#endif

enum { W };
static const char *const slots[] = {"w"};

static bool head_slot(const moert_model *m, const moert_layer *l, int s, moert_param *p) {
  (void)l, (void)s;
  *p = (moert_param){.ndim = 2, .shape = {m->dim, m->vocab}, .init = MOERT_INIT_UNIFORM,
                     .scale = 1 / sqrt((double)m->dim), .place = MOERT_PLACE_REPLICATED};
  return true;
}

static bool head_plan(moert_plan_ctx *c, moert_status *st) {
  (void)st;
  int64_t T = c->T, M = c->m->dim, V = c->m->vocab;
  moert_plan_f(c, MOERT_F_HLOGITS, T * V);
  moert_plan_i(c, MOERT_I_TOKENS, T);
  moert_plan_s(c, MOERT_S_DLOGITS, T * V);
  if (c->m->dtype == MOERT_DT_BF16) { /* the GEMMs' bf16 operands; the logits stay fp32 */
    moert_plan_s(c, MOERT_S_XB, (T * M + 1) / 2);
    moert_plan_s(c, MOERT_S_DLB, (T * V + 1) / 2);
  }
  c->lp->flops_fwd = 2.0 * T * M * V;
  return true;
}

static int64_t head_row(const moert_model *m, const moert_layer *l) {
  (void)l;
  return m->vocab > m->dim ? m->vocab : m->dim;
}

static int head_specs(const moert_model *m, const moert_layer *l, moert_spec_use *u) {
  (void)l;
  u[0] = (moert_spec_use){MOERT_SPEC_xent, m->vocab, 0};
  return 1;
}

static void head_describe(const moert_model *m, const moert_layer *l, char *buf, size_t n) {
  (void)l;
  snprintf(buf, n, "V = %lld, M = %lld", (long long)m->vocab, (long long)m->dim);
}

static void head_shape(const moert_plan *p, int li, char *buf, size_t n) {
  (void)li;
  snprintf(buf, n, "[%lld, %lld]", (long long)p->tokens, (long long)p->model->vocab);
}

static bool head_grad_written(const moert_layer *l, int s) {
  (void)l, (void)s;
  return true; /* its GEMM runs with beta 0 */
}

#ifndef MOERT_LAYER_DESCRIBE_ONLY
static bool head_fwd(moert_exec *e, int li, int64_t step, bool want_grad, moert_status *st) {
  (void)step, (void)st;
  moert_backend *b = e->b;
  const moert_model *m = e->m;
  const float *cur = e->xin[li];
  int64_t T = e->rows, M = m->dim;
  double norm = 1.0 / ((double)T * e->comm->world); /* mean over all global tokens */
  if (e->xdt == MOERT_BF16) { /* bf16 operands (the input rounded, the bf16 weights), fp32 logits */
    b->convert(S(e, li, XB), MOERT_BF16, cur, MOERT_F32, T * M);
    moert_gemm1(b, false, false, T, m->vocab, M, MOERT_BF16, S(e, li, XB), PL(e, li, W), 0, MOERT_F32,
                F(e, li, HLOGITS), NULL);
  } else {
    b->gemm(false, false, T, m->vocab, M, 1, cur, M, P(e, li, W), m->vocab, 0, F(e, li, HLOGITS), m->vocab);
  }
  /* training follows the smoothed targets; the loss reported stays the plain
   * cross-entropy (xent returns it whatever the smoothing), so runs compare */
  float smoothing = want_grad ? (float)m->train.label_smoothing : 0.0f;
  b->xent_to(F(e, li, HLOGITS), I(e, li, TOKENS), want_grad ? S(e, li, DLOGITS) : NULL, T, m->vocab,
             (float)norm, smoothing, e->dloss);
  return true;
}

static bool head_bwd(moert_exec *e, int li, moert_status *st) {
  (void)st;
  moert_backend *b = e->b;
  const moert_model *m = e->m;
  const float *x = e->xin[li];
  int64_t T = e->rows, M = m->dim, V = m->vocab;
  if (e->xdt == MOERT_BF16) { /* as the forward: bf16 operands, fp32 gradients out */
    const moert_dt B16 = MOERT_BF16;
    b->convert(S(e, li, DLB), B16, S(e, li, DLOGITS), MOERT_F32, T * V);
    b->convert(S(e, li, XB), B16, x, MOERT_F32, T * M); /* the scratch is not kept from the forward */
    moert_gemm1(b, true, false, M, V, T, B16, S(e, li, XB), S(e, li, DLB), 0, MOERT_F32, G(e, li, W), NULL);
    moert_gemm1(b, false, true, T, M, V, B16, S(e, li, DLB), PL(e, li, W), 0, MOERT_F32, e->dcur, NULL);
    return true;
  }
  b->gemm(true, false, M, V, T, 1, x, M, S(e, li, DLOGITS), V, 0, G(e, li, W), V);
  b->gemm(false, true, T, M, V, 1, S(e, li, DLOGITS), V, P(e, li, W), V, 0, e->dcur, M);
  return true;
}
#else
#define head_fwd NULL
#define head_bwd NULL
#endif

const moert_layer_ops MOERT_LAYER_OPS(HEAD_XENT) = {
    .name = "head",
    .nslots = 1,
    .slots = slots,
    .slot = head_slot,
    .plan = head_plan,
    .row = head_row,
    .specs = head_specs,
    .describe = head_describe,
    .plan_shape = head_shape,
    .fwd = head_fwd,
    .bwd = head_bwd,
    .grad_written = head_grad_written,
};
