/* mse.c — the regression loss (layer.h): per token, the mean over dim of
 * the squared error against the teacher's output (the TARGET buffer, which
 * the data loader fills); the mean over all global tokens. Its forward
 * writes d loss / d input into dcur: there is no backward. */
#include "layer.h"

#ifndef MOERT_LAYER_DESCRIBE_ONLY
#include "layer_exec.h"
#endif

static bool mse_plan(moert_plan_ctx *c, moert_status *st) {
  (void)st;
  moert_plan_f(c, MOERT_F_TARGET, c->T * c->m->dim);
  return true;
}

static void mse_describe(const moert_model *m, const moert_layer *l, char *buf, size_t n) {
  (void)l;
  snprintf(buf, n, "M = %lld", (long long)m->dim);
}

#ifndef MOERT_LAYER_DESCRIBE_ONLY
static bool mse_fwd(moert_exec *e, int li, int64_t step, bool want_grad, moert_status *st) {
  (void)step, (void)st;
  int64_t T = e->rows, M = e->m->dim;
  double norm = 1.0 / ((double)T * e->comm->world); /* mean over all global tokens */
  e->b->mse_to(e->xin[li], F(e, li, TARGET), want_grad ? e->dcur : NULL, T * M, (float)(norm / M), e->dloss);
  return true;
}
#else
#define mse_fwd NULL
#endif

const moert_layer_ops MOERT_LAYER_OPS(MSE) = {
    .name = "mse",
    .flags = MOERT_LF_NO_BWD | MOERT_LF_UNTRACED_BWD,
    .plan = mse_plan,
    .describe = mse_describe,
    .fwd = mse_fwd,
};
