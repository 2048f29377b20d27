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
  const moert_layer *l = &p->model->layers[li];
  fprintf(out, ", \"hidden\": %lld, \"activation\": \"%s\"", (long long)l->hidden, moert_act_names[l->act]);
}

static bool ffn_grad_written(const moert_layer *l, int s) {
  (void)l;
  return s == FC1_W || s == FC2_W; /* their GEMMs run with beta 0 */
}

#ifndef MOERT_LAYER_DESCRIBE_ONLY
void moert_ffn_fwd(moert_backend *b, const moert_ffn_args *a, const float *x, float *out, float beta) {
  int64_t T = a->T, M = a->M, H = a->H, H1 = a->act == MOERT_ACT_SWIGLU ? 2 * H : H;
  if (a->dt == MOERT_BF16) { /* bf16 operands, fp32 in and out: x rounded, H and A kept as bf16 */
    const moert_dt B16 = MOERT_BF16;
    b->convert(a->xb, B16, x, MOERT_F32, T * M);
    moert_gemm1(b, false, false, T, H1, M, B16, a->xb, a->w1, 0, B16, a->h, a->b1);
    if (a->act == MOERT_ACT_SWIGLU) b->swiglu_fwd_t(B16, a->h, a->a, T, H);
    else b->act_fwd_t(B16, a->act, a->h, a->a, T * H);
    moert_gemm1(b, false, false, T, M, H, B16, a->a, a->w2, beta, MOERT_F32, out, a->b2);
    return;
  }
  float *h = a->h, *act = a->a;
  b->gemm(false, false, T, H1, M, 1, x, M, a->w1, H1, 0, h, H1);
  if (a->b1) b->bias_add(h, a->b1, T, H1);
  if (a->act == MOERT_ACT_SWIGLU) b->swiglu_fwd(h, act, T, H);
  else b->act_fwd(a->act, h, act, T * H);
  b->gemm(false, false, T, M, H, 1, act, H, a->w2, M, beta, out, M);
  if (a->b2) b->bias_add(out, a->b2, T, M);
}

void moert_ffn_bwd(moert_backend *b, const moert_ffn_args *a, const float *x, const float *dy, float *dx,
                   float beta) {
  int64_t T = a->T, M = a->M, H = a->H, H1 = a->act == MOERT_ACT_SWIGLU ? 2 * H : H;
  if (a->db2) b->bias_grad(a->db2, dy, T, M);
  if (a->dt == MOERT_BF16) { /* as the forward: bf16 operands, fp32 gradients out */
    const moert_dt B16 = MOERT_BF16;
    b->convert(a->dyb, B16, dy, MOERT_F32, T * M);
    moert_gemm1(b, true, false, H, M, T, B16, a->a, a->dyb, 0, MOERT_F32, a->dw2, NULL);
    moert_gemm1(b, false, true, T, H, M, B16, a->dyb, a->w2, 0, B16, a->da, NULL);
    if (a->act == MOERT_ACT_SWIGLU) b->swiglu_bwd_t(B16, a->h, a->da, a->dh, T, H);
    else b->act_bwd_t(B16, a->act, a->h, a->da, a->dh, T * H);
    if (a->db1) b->bias_grad_t(B16, a->db1, a->dh, 1, T, H1);
    b->convert(a->xb, B16, x, MOERT_F32, T * M);
    moert_gemm1(b, true, false, M, H1, T, B16, a->xb, a->dh, 0, MOERT_F32, a->dw1, NULL);
    moert_gemm1(b, false, true, T, M, H1, B16, a->dh, a->w1, beta, MOERT_F32, dx, NULL);
    return;
  }
  float *h = a->h, *act = a->a, *da = a->da, *dh = a->dh;
  b->gemm(true, false, H, M, T, 1, act, H, dy, M, 0, a->dw2, M);
  b->gemm(false, true, T, H, M, 1, dy, M, a->w2, M, 0, da, H);
  if (a->act == MOERT_ACT_SWIGLU) b->swiglu_bwd(h, da, dh, T, H);
  else b->act_bwd(a->act, h, da, dh, T * H);
  if (a->db1) b->bias_grad(a->db1, dh, T, H1);
  b->gemm(true, false, M, H1, T, 1, x, M, dh, H1, 0, a->dw1, H1);
  b->gemm(false, true, T, M, H1, 1, dh, H1, a->w1, H1, beta, dx, M);
}

/* The layer's parameters and buffers as moert_ffn_fwd/bwd take them. */
static moert_ffn_args ffn_args(moert_exec *e, int li) {
  const moert_layer *l = &e->m->layers[li];
  bool low = e->xdt == MOERT_BF16;
  moert_ffn_args a = {.T = e->rows, .M = e->m->dim, .H = l->hidden, .act = l->act, .dt = e->xdt,
                      .w1 = low ? PL(e, li, FC1_W) : (void *)P(e, li, FC1_W),
                      .b1 = low ? PL(e, li, FC1_B) : (void *)P(e, li, FC1_B),
                      .w2 = low ? PL(e, li, FC2_W) : (void *)P(e, li, FC2_W), .b2 = P(e, li, FC2_B),
                      .dw1 = G(e, li, FC1_W), .db1 = G(e, li, FC1_B), .dw2 = G(e, li, FC2_W),
                      .db2 = G(e, li, FC2_B), .h = F(e, li, H), .a = F(e, li, A), .da = S(e, li, DA),
                      .dh = S(e, li, DH)};
  if (low) a.xb = S(e, li, XB), a.dyb = S(e, li, DYB);
  return a;
}

static bool ffn_fwd(moert_exec *e, int li, int64_t step, bool want_grad, moert_status *st) {
  (void)step, (void)want_grad, (void)st;
  moert_ffn_args a = ffn_args(e, li);
  moert_ffn_fwd(e->b, &a, e->xin[li], F(e, li, OUT), 0);
  return true;
}

static bool ffn_bwd(moert_exec *e, int li, moert_status *st) {
  (void)st;
  moert_ffn_args a = ffn_args(e, li);
  moert_ffn_bwd(e->b, &a, e->xin[li], e->dcur, e->dnext, 0);
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
