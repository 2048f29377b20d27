/* residual.c — the two ends of a residual block (layer.h): the beginning
 * remembers its input (the skip path) and, backward, adds the skip path's
 * gradient; the end adds the skip input to the block's output and, backward,
 * hands its gradient to the skip path too. The executor keeps the stack of
 * open blocks (MOERT_LF_RES_OPEN, MOERT_LF_RES_CLOSE). */
#include "layer.h"

#ifndef MOERT_LAYER_DESCRIBE_ONLY
#include "layer_exec.h"
#endif

static bool begin_plan(moert_plan_ctx *c, moert_status *st) {
  (void)st;
  if (++*c->depth > c->p->max_res_depth) c->p->max_res_depth = *c->depth;
  return true;
}

static bool end_plan(moert_plan_ctx *c, moert_status *st) {
  (void)st;
  --*c->depth;
  moert_plan_f(c, MOERT_F_OUT, c->T * c->m->dim);
  return true;
}

static void describe(const moert_model *m, const moert_layer *l, char *buf, size_t n) {
  (void)l;
  snprintf(buf, n, "M = %lld", (long long)m->dim);
}

static void begin_shape(const moert_plan *p, int li, char *buf, size_t n) {
  (void)p, (void)li;
  snprintf(buf, n, "(skip)");
}

#ifndef MOERT_LAYER_DESCRIBE_ONLY
static bool begin_bwd(moert_exec *e, int li, moert_status *st) {
  (void)st;
  e->b->axpy(e->dcur, e->res_grad[li], 1, e->rows * e->m->dim);
  return true;
}

static bool end_fwd(moert_exec *e, int li, int64_t step, bool want_grad, moert_status *st) {
  (void)step, (void)want_grad, (void)st;
  e->b->add(F(e, li, OUT), e->res_in[li], e->xin[li], e->rows * e->m->dim);
  return true;
}

static bool end_bwd(moert_exec *e, int li, moert_status *st) {
  (void)st;
  e->b->copy(e->res_grad[li], e->dcur, e->rows * e->m->dim);
  return true;
}
#else
#define begin_bwd NULL
#define end_fwd NULL
#define end_bwd NULL
#endif

const moert_layer_ops MOERT_LAYER_OPS(RES_BEGIN) = {
    .name = "residual",
    .flags = MOERT_LF_RES_OPEN | MOERT_LF_UNTRACED_FWD | MOERT_LF_UNTRACED_BWD,
    .plan = begin_plan,
    .describe = describe,
    .plan_shape = begin_shape,
    .bwd = begin_bwd,
};

const moert_layer_ops MOERT_LAYER_OPS(RES_END) = {
    .name = "end",
    .flags = MOERT_LF_RES_CLOSE | MOERT_LF_OUTPUT,
    .plan = end_plan,
    .describe = describe,
    .fwd = end_fwd,
    .bwd = end_bwd,
};
