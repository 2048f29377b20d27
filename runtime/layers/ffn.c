/* ffn.c — the dense FFN layer kind (layer.h): x -> act(x fc1_w + fc1_b)
 * fc2_w + fc2_b, M -> H -> M (swiglu: fc1 is M -> 2H, its two halves gated).
 * In a bf16 model the GEMMs take bf16 operands with fp32 in and out. */
#include "layer.h"

#include <math.h>

#ifndef MOERT_LAYER_DESCRIBE_ONLY
#include "layer_exec.h"
#endif

enum { FC1_W, FC1_B, FC2_W, FC2_B };
static const char *const slots[] = {"fc1_w", "fc1_b", "fc2_w", "fc2_b"};

static int64_t h1_of(const moert_layer *l) { return l->act == MOERT_ACT_SWIGLU ? 2 * l->hidden : l->hidden; }

static bool ffn_slot(const moert_model *m, const moert_layer *l, int s, moert_param *p) {
  int64_t M = m->dim, H = l->hidden, H1 = h1_of(l);
  *p = (moert_param){.init = MOERT_INIT_UNIFORM, .place = MOERT_PLACE_REPLICATED};
  p->scale = 1 / sqrt((double)(s == FC1_W || s == FC1_B ? M : H));
  switch (s) {
  case FC1_W: p->ndim = 2, p->shape[0] = M, p->shape[1] = H1; break;
  case FC1_B: p->ndim = 1, p->shape[0] = H1; break;
  case FC2_W: p->ndim = 2, p->shape[0] = H, p->shape[1] = M; break;
  default: p->ndim = 1, p->shape[0] = M; break;
  }
  return true;
}

static bool ffn_plan(moert_plan_ctx *c, moert_status *st) {
  (void)st;
  int64_t T = c->T, M = c->m->dim, H = c->l->hidden, H1 = h1_of(c->l);
  moert_plan_f(c, MOERT_F_H, T * H1);
  moert_plan_f(c, MOERT_F_A, T * H);
  moert_plan_f(c, MOERT_F_OUT, T * M);
  moert_plan_s(c, MOERT_S_DA, T * H);
  moert_plan_s(c, MOERT_S_DH, T * H1);
  if (c->m->dtype == MOERT_DT_BF16) { /* bf16 copies, half a float each */
    moert_plan_s(c, MOERT_S_XB, (T * M + 1) / 2);
    moert_plan_s(c, MOERT_S_DYB, (T * M + 1) / 2);
  }
  c->lp->flops_fwd = 2.0 * T * M * H1 + 2.0 * T * H * M;
  return true;
}

static int64_t ffn_row(const moert_model *m, const moert_layer *l) {
  return h1_of(l) > m->dim ? h1_of(l) : m->dim;
}

static void ffn_describe(const moert_model *m, const moert_layer *l, char *buf, size_t n) {
  snprintf(buf, n, "M = %lld, H = %lld", (long long)m->dim, (long long)l->hidden);
}

static void ffn_json(const moert_plan *p, int li, FILE *out) {
  fprintf(out, ", \"hidden\": %lld", (long long)p->model->layers[li].hidden);
}

static bool ffn_grad_written(const moert_layer *l, int s) {
  (void)l;
  return s == FC1_W || s == FC2_W; /* their GEMMs run with beta 0 */
}

#ifndef MOERT_LAYER_DESCRIBE_ONLY
static bool ffn_fwd(moert_exec *e, int li, int64_t step, bool want_grad, moert_status *st) {
  (void)step, (void)want_grad, (void)st;
  moert_backend *b = e->b;
  const moert_layer *l = &e->m->layers[li];
  const float *cur = e->xin[li];
  int64_t T = e->rows, M = e->m->dim, H = l->hidden, H1 = h1_of(l);
  if (e->xdt == MOERT_BF16) { /* bf16 operands, fp32 in and out: x rounded, H and A kept as bf16 */
    const moert_dt B16 = MOERT_BF16;
    b->convert(S(e, li, XB), B16, cur, MOERT_F32, T * M);
    moert_gemm1(b, false, false, T, H1, M, B16, S(e, li, XB), PL(e, li, FC1_W), 0, B16, F(e, li, H),
                PL(e, li, FC1_B));
    if (l->act == MOERT_ACT_SWIGLU) b->swiglu_fwd_t(B16, F(e, li, H), F(e, li, A), T, H);
    else b->act_fwd_t(B16, l->act, F(e, li, H), F(e, li, A), T * H);
    moert_gemm1(b, false, false, T, M, H, B16, F(e, li, A), PL(e, li, FC2_W), 0, MOERT_F32, F(e, li, OUT),
                P(e, li, FC2_B));
    return true;
  }
  b->gemm(false, false, T, H1, M, 1, cur, M, P(e, li, FC1_W), H1, 0, F(e, li, H), H1);
  b->bias_add(F(e, li, H), P(e, li, FC1_B), T, H1);
  if (l->act == MOERT_ACT_SWIGLU) b->swiglu_fwd(F(e, li, H), F(e, li, A), T, H);
  else b->act_fwd(l->act, F(e, li, H), F(e, li, A), T * H);
  b->gemm(false, false, T, M, H, 1, F(e, li, A), H, P(e, li, FC2_W), M, 0, F(e, li, OUT), M);
  b->bias_add(F(e, li, OUT), P(e, li, FC2_B), T, M);
  return true;
}

static bool ffn_bwd(moert_exec *e, int li, moert_status *st) {
  (void)st;
  moert_backend *b = e->b;
  const moert_layer *l = &e->m->layers[li];
  const float *x = e->xin[li];
  int64_t T = e->rows, M = e->m->dim, H = l->hidden, H1 = h1_of(l);
  if (e->xdt == MOERT_BF16) { /* as the forward: bf16 operands, fp32 gradients out */
    const moert_dt B16 = MOERT_BF16;
    b->bias_grad(G(e, li, FC2_B), e->dcur, T, M);
    b->convert(S(e, li, DYB), B16, e->dcur, MOERT_F32, T * M);
    moert_gemm1(b, true, false, H, M, T, B16, F(e, li, A), S(e, li, DYB), 0, MOERT_F32, G(e, li, FC2_W), NULL);
    moert_gemm1(b, false, true, T, H, M, B16, S(e, li, DYB), PL(e, li, FC2_W), 0, B16, S(e, li, DA), NULL);
    if (l->act == MOERT_ACT_SWIGLU) b->swiglu_bwd_t(B16, F(e, li, H), S(e, li, DA), S(e, li, DH), T, H);
    else b->act_bwd_t(B16, l->act, F(e, li, H), S(e, li, DA), S(e, li, DH), T * H);
    b->bias_grad_t(B16, G(e, li, FC1_B), S(e, li, DH), 1, T, H1);
    b->convert(S(e, li, XB), B16, x, MOERT_F32, T * M);
    moert_gemm1(b, true, false, M, H1, T, B16, S(e, li, XB), S(e, li, DH), 0, MOERT_F32, G(e, li, FC1_W), NULL);
    moert_gemm1(b, false, true, T, M, H1, B16, S(e, li, DH), PL(e, li, FC1_W), 0, MOERT_F32, e->dnext, NULL);
    return true;
  }
  b->bias_grad(G(e, li, FC2_B), e->dcur, T, M);
  b->gemm(true, false, H, M, T, 1, F(e, li, A), H, e->dcur, M, 0, G(e, li, FC2_W), M);
  b->gemm(false, true, T, H, M, 1, e->dcur, M, P(e, li, FC2_W), M, 0, S(e, li, DA), H);
  if (l->act == MOERT_ACT_SWIGLU) b->swiglu_bwd(F(e, li, H), S(e, li, DA), S(e, li, DH), T, H);
  else b->act_bwd(l->act, F(e, li, H), S(e, li, DA), S(e, li, DH), T * H);
  b->bias_grad(G(e, li, FC1_B), S(e, li, DH), T, H1);
  b->gemm(true, false, M, H1, T, 1, x, M, S(e, li, DH), H1, 0, G(e, li, FC1_W), H1);
  b->gemm(false, true, T, M, H1, 1, S(e, li, DH), H1, P(e, li, FC1_W), H1, 0, e->dnext, M);
  return true;
}
#else
#define ffn_fwd NULL
#define ffn_bwd NULL
#endif

const moert_layer_ops MOERT_LAYER_OPS(FFN) = {
    .name = "ffn",
    .flags = MOERT_LF_OUTPUT | MOERT_LF_SWAP | MOERT_LF_COMPUTE,
    .nslots = 4,
    .slots = slots,
    .slot = ffn_slot,
    .plan = ffn_plan,
    .row = ffn_row,
    .describe = ffn_describe,
    .plan_json = ffn_json,
    .fwd = ffn_fwd,
    .bwd = ffn_bwd,
    .grad_written = ffn_grad_written,
};
