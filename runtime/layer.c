/* layer.c — the layer kinds' descriptors by kind, and the check that a
 * model's parameters are its layers' slots; see layer.h. */
#include "layer.h"

#include <string.h>

static const moert_layer_ops *const kinds[MOERT_L__COUNT] = {
#define X(k, s) &MOERT_LAYER_OPS(k),
    MOERT_LAYER_KINDS(X)
#undef X
};

const moert_layer_ops *moert_layer_ops_of(moert_layer_kind kind) { return kinds[kind]; }

static void shape_str(const moert_param *p, char *buf, size_t n) {
  size_t at = (size_t)snprintf(buf, n, "[");
  for (int d = 0; d < p->ndim && at < n; d++)
    at += (size_t)snprintf(buf + at, n - at, "%s%lld", d ? ", " : "", (long long)p->shape[d]);
  if (at < n) snprintf(buf + at, n - at, "]");
}

/* Whether parameter have (the model's) is slot `want` of layer l as the
 * descriptor says; the first difference into why. */
static bool same_param(const moert_param *have, const moert_param *want, const char *name, char *why, size_t n) {
  char a[96], b[96];
  const char *dot = strrchr(have->name, '.');
  if (!dot || strcmp(dot + 1, name) != 0) {
    snprintf(why, n, "its parameter `%s` stands where this runtime has slot `%s`", have->name, name);
    return false;
  }
  bool shape = have->ndim == want->ndim;
  for (int d = 0; shape && d < want->ndim; d++) shape = have->shape[d] == want->shape[d];
  if (!shape) {
    shape_str(have, a, sizeof a);
    shape_str(want, b, sizeof b);
    snprintf(why, n, "`%s` is %s, this runtime's slot is %s", have->name, a, b);
    return false;
  }
  if (have->place != want->place || have->init != want->init || have->scale != want->scale ||
      have->swiglu_halves != want->swiglu_halves) {
    snprintf(why, n, "`%s` differs from this runtime's slot in its placement or initialization", have->name);
    return false;
  }
  return true;
}

bool moert_layer_resolve_slots(const moert_model *m, moert_plan *p, moert_status *st) {
  for (int li = 0; li < m->nlayers; li++) {
    const moert_layer *l = &m->layers[li];
    const moert_layer_ops *ops = moert_layer_ops_of(l->kind);
    moert_layer_plan *lp = &p->layers[li];
    char why[256] = "";
    int n = 0;
    for (int s = 0; s < MOERT_MAX_SLOTS; s++) lp->slot[s] = -1;
    for (int s = 0; s < ops->nslots; s++) {
      moert_param want;
      if (!ops->slot(m, l, s, &want)) continue;
      int i = l->param_first + n++;
      if (n > l->nparams) {
        snprintf(why, sizeof why, "it has %d parameters, this runtime's slots need more (`%s`)", l->nparams,
                 ops->slots[s]);
        break;
      }
      if (!same_param(&m->params[i], &want, ops->slots[s], why, sizeof why)) break;
      lp->slot[s] = i;
    }
    if (!why[0] && n != l->nparams)
      snprintf(why, sizeof why, "it has %d parameters, this runtime's slots %d", l->nparams, n);
    if (why[0])
      return MOERT_FAIL(st,
                        "layer `%s` (%s) does not match this runtime's description of its kind: %s; "
                        "rebuild the model with the moec of this runtime",
                        l->name, ops->name, why);
  }
  return true;
}

int64_t moert_layer_widest_row(const moert_model *m) {
  int64_t row = m->dim;
  for (int li = 0; li < m->nlayers; li++) {
    const moert_layer_ops *ops = moert_layer_ops_of(m->layers[li].kind);
    int64_t r = ops->row ? ops->row(m, &m->layers[li]) : m->dim;
    if (r > row) row = r;
  }
  return row;
}
