/* norm.c — the layernorm and rmsnorm layer kinds (layer.h): y = (x - mean)
 * rstd g + b, and y = x rstd g, over each token's dim; templates/norm.cu. */
#include "layer.h"

#ifndef MOERT_LAYER_DESCRIBE_ONLY
#include "layer_exec.h"
#endif

enum { LN_WEIGHT, LN_BIAS };
static const char *const ln_slots[] = {"weight", "bias"};

static bool norm_slot(const moert_model *m, const moert_layer *l, int s, moert_param *p) {
  (void)l;
  *p = (moert_param){.ndim = 1, .shape = {m->dim}, .init = s == LN_WEIGHT ? MOERT_INIT_ONES : MOERT_INIT_ZEROS,
                     .place = MOERT_PLACE_REPLICATED};
  return true;
}

static bool ln_plan(moert_plan_ctx *c, moert_status *st) {
  (void)st;
  moert_plan_f(c, MOERT_F_OUT, c->T * c->m->dim);
  moert_plan_f(c, MOERT_F_MEAN, c->T);
  moert_plan_f(c, MOERT_F_RSTD, c->T);
  return true;
}

static bool rms_plan(moert_plan_ctx *c, moert_status *st) {
  (void)st;
  moert_plan_f(c, MOERT_F_OUT, c->T * c->m->dim);
  moert_plan_f(c, MOERT_F_RSTD, c->T);
  return true;
}

static int ln_specs(const moert_model *m, const moert_layer *l, moert_spec_use *u) {
  (void)l;
  u[0] = (moert_spec_use){MOERT_SPEC_layernorm_fwd, m->dim, 0};
  u[1] = (moert_spec_use){MOERT_SPEC_layernorm_bwd_dx, m->dim, 0};
  return 2;
}

static int rms_specs(const moert_model *m, const moert_layer *l, moert_spec_use *u) {
  (void)l;
  u[0] = (moert_spec_use){MOERT_SPEC_rmsnorm_fwd, m->dim, 0};
  u[1] = (moert_spec_use){MOERT_SPEC_rmsnorm_bwd_dx, m->dim, 0};
  return 2;
}

static void norm_describe(const moert_model *m, const moert_layer *l, char *buf, size_t n) {
  (void)l;
  snprintf(buf, n, "M = %lld", (long long)m->dim);
}

#ifndef MOERT_LAYER_DESCRIBE_ONLY
static bool ln_fwd(moert_exec *e, int li, int64_t step, bool want_grad, moert_status *st) {
  (void)step, (void)want_grad, (void)st;
  e->b->layernorm_fwd(e->xin[li], P(e, li, LN_WEIGHT), P(e, li, LN_BIAS), F(e, li, OUT), F(e, li, MEAN),
                      F(e, li, RSTD), e->rows, e->m->dim, MOERT_LN_EPS);
  return true;
}

static bool ln_bwd(moert_exec *e, int li, moert_status *st) {
  (void)st;
  e->b->layernorm_bwd(e->xin[li], P(e, li, LN_WEIGHT), F(e, li, MEAN), F(e, li, RSTD), e->dcur, e->dnext,
                      G(e, li, LN_WEIGHT), G(e, li, LN_BIAS), e->rows, e->m->dim);
  return true;
}

static bool rms_fwd(moert_exec *e, int li, int64_t step, bool want_grad, moert_status *st) {
  (void)step, (void)want_grad, (void)st;
  e->b->rmsnorm_fwd(e->xin[li], P(e, li, LN_WEIGHT), F(e, li, OUT), F(e, li, RSTD), e->rows, e->m->dim,
                    MOERT_RMS_EPS);
  return true;
}

static bool rms_bwd(moert_exec *e, int li, moert_status *st) {
  (void)st;
  e->b->rmsnorm_bwd(e->xin[li], P(e, li, LN_WEIGHT), F(e, li, RSTD), e->dcur, e->dnext, G(e, li, LN_WEIGHT),
                    e->rows, e->m->dim);
  return true;
}
#else
#define ln_fwd NULL
#define ln_bwd NULL
#define rms_fwd NULL
#define rms_bwd NULL
#endif

const moert_layer_ops MOERT_LAYER_OPS(LAYERNORM) = {
    .name = "layernorm",
    .flags = MOERT_LF_OUTPUT | MOERT_LF_SWAP | MOERT_LF_COMPUTE,
    .nslots = 2,
    .slots = ln_slots,
    .slot = norm_slot,
    .plan = ln_plan,
    .specs = ln_specs,
    .describe = norm_describe,
    .fwd = ln_fwd,
    .bwd = ln_bwd,
};

const moert_layer_ops MOERT_LAYER_OPS(RMSNORM) = {
    .name = "rmsnorm",
    .flags = MOERT_LF_OUTPUT | MOERT_LF_SWAP | MOERT_LF_COMPUTE,
    .nslots = 1,
    .slots = ln_slots,
    .slot = norm_slot,
    .plan = rms_plan,
    .specs = rms_specs,
    .describe = norm_describe,
    .fwd = rms_fwd,
    .bwd = rms_bwd,
};
