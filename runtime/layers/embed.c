/* embed.c — the embedding layer kind (layer.h): each token's vector is the
 * sum of `context` embeddings, one table per look-back position. */
#include "layer.h"

#include <math.h>

#ifndef MOERT_LAYER_DESCRIBE_ONLY
#include "layer_exec.h"
#endif

enum { TABLE };
static const char *const slots[] = {"table"};

static bool embed_slot(const moert_model *m, const moert_layer *l, int s, moert_param *p) {
  (void)l, (void)s;
  /* each of the `context` tables N(0, 1/context): the sum has unit variance */
  *p = (moert_param){.ndim = 3, .shape = {m->context, m->vocab, m->dim}, .init = MOERT_INIT_NORMAL,
                     .scale = 1 / sqrt((double)m->context), .place = MOERT_PLACE_REPLICATED};
  return true;
}

static bool embed_plan(moert_plan_ctx *c, moert_status *st) {
  (void)st;
  moert_plan_f(c, MOERT_F_OUT, c->T * c->m->dim);
  moert_plan_i(c, MOERT_I_WIN, c->T * c->m->context);
  return true;
}

static void embed_describe(const moert_model *m, const moert_layer *l, char *buf, size_t n) {
  (void)l;
  snprintf(buf, n, "M = %lld", (long long)m->dim);
}

#ifndef MOERT_LAYER_DESCRIBE_ONLY
static bool embed_fwd(moert_exec *e, int li, int64_t step, bool want_grad, moert_status *st) {
  (void)step, (void)want_grad, (void)st;
  const moert_model *m = e->m;
  e->b->embed_fwd(P(e, li, TABLE), I(e, li, WIN), F(e, li, OUT), e->rows, m->context, m->vocab, m->dim);
  return true;
}

static bool embed_bwd(moert_exec *e, int li, moert_status *st) {
  (void)st;
  const moert_model *m = e->m;
  e->b->embed_bwd(e->dcur, I(e, li, WIN), G(e, li, TABLE), e->rows, m->context, m->vocab, m->dim);
  return true;
}
#else
#define embed_fwd NULL
#define embed_bwd NULL
#endif

const moert_layer_ops MOERT_LAYER_OPS(EMBED) = {
    .name = "embed",
    .flags = MOERT_LF_OUTPUT,
    .nslots = 1,
    .slots = slots,
    .slot = embed_slot,
    .plan = embed_plan,
    .describe = embed_describe,
    .fwd = embed_fwd,
    .bwd = embed_bwd,
};
