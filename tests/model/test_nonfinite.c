/* test_nonfinite.c — a step whose loss or gradient norm is not finite, in the
 * executor (exec.h), on the cpu: tiny.moe with a NaN put into one expert's
 * weights. Its update is not applied (the parameters and the AdamW state stay
 * as they were, to the bit), it is counted (e->skipped), and
 * moert_exec_find_nonfinite names the MoE layer whose output went NaN first,
 * not the layers before it; with every output finite it names the first layer
 * in backward order with a NaN gradient (the later of two), and -1 when
 * nothing is NaN. The next step, with good weights, updates again. A
 * skipped step leaves AdamW's step count where it was: after a skipped step
 * 1, step 2 is AdamW's first update, whose bias correction makes every
 * element move by lr (with step count 2 it would move by about 0.74 lr). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "data.h"
#include "exec.h"
#include "front.h"
#include "lower.h"

/* The index of the first parameter of layer `name` (-1: none). */
static int param_of(const moert_model *m, const char *name) {
  for (int i = 0; i < m->nparams; i++)
    if (strcmp(m->layers[m->params[i].layer].name, name) == 0) return i;
  return -1;
}

static int layer_index(const moert_model *m, const char *name) {
  for (int li = 0; li < m->nlayers; li++)
    if (strcmp(m->layers[li].name, name) == 0) return li;
  return -1;
}

/* Sets element k of parameter i's gradient (grad) or value to v on the device. */
static bool poke(moert_exec *e, int i, bool grad, int64_t k, float v, moert_status *st) {
  float *base = grad ? e->grads : e->params;
  return e->b->upload(e->b, base + e->plan->params[i].offset + k, &v, sizeof v, st);
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: test_nonfinite tiny.moe\n");
    return 2;
  }
  moec_arena *a = moec_arena_create();
  moec_diags d;
  moec_diags_init(&d, a);
  moec_spec *s = moec_front_file(a, &d, argv[1], NULL);
  moert_model *m = s ? moec_lower(a, &d, s, argv[1]) : NULL;
  if (!m) {
    moec_diags_print(&d, stderr);
    return 1;
  }
  moert_status st = {0};
  moert_plan *p = NULL;
  moert_data *data = NULL;
  moert_exec *e = NULL;
  float *before = NULL, *after = NULL;
  if (!moert_plan_create(m, 1, 0, m->tokens, true, &p, &st) ||
      !moert_data_open(&data, NULL, m->vocab, m->dim, m->context, m->tokens, 7, &st) ||
      !moert_exec_create(&e, m, p, moert_backend_cpu(), moert_comm_self(), true, 7, &st)) {
    fprintf(stderr, "FAIL: %s\n", st.msg);
    return 1;
  }
  e->opts.total_steps = 8;
  int l0 = layer_index(m, "experts_0"), l1 = layer_index(m, "experts_1");
  int w1 = param_of(m, "experts_1"), n0 = param_of(m, "rmsnorm_0");
  CHECK(l0 >= 0 && l1 > l0 && w1 >= 0 && n0 >= 0, "tiny has no layers experts_0, experts_1, rmsnorm_0");
  if (g_fail) return 1;
  size_t np = (size_t)p->param_elems, ns = (size_t)p->state_elems;
  before = malloc(sizeof(float) * (np + ns));
  after = malloc(sizeof(float) * (np + ns));
  moert_step_stats ss = {0};
  bool ok = before && after && moert_exec_train_step(e, data, 1, &ss, &st);
  CHECK(ok && !ss.skipped && isfinite(ss.loss) && e->skipped == 0, "step 1: %s", ok ? "skipped" : st.msg);

  /* a NaN in the first weight of experts_1 (expert 0 serves some tokens) */
  ok = ok && poke(e, w1, false, 0, NAN, &st) && e->b->download(e->b, before, e->params, sizeof(float) * np, &st) &&
       e->b->download(e->b, before + np, e->state, sizeof(float) * ns, &st);
  ok = ok && moert_exec_train_step(e, data, 2, &ss, &st);
  CHECK(ok && ss.skipped && e->skipped == 1, "step 2 with a NaN weight: %s", ok ? "not skipped" : st.msg);
  ok = ok && e->b->download(e->b, after, e->params, sizeof(float) * np, &st) &&
       e->b->download(e->b, after + np, e->state, sizeof(float) * ns, &st);
  CHECK(ok && memcmp(before, after, sizeof(float) * (np + ns)) == 0,
        "a skipped step changed the parameters or the optimizer state");
  int li = -2;
  bool in_grad = true;
  ok = ok && moert_exec_find_nonfinite(e, &li, &in_grad, &st);
  CHECK(ok && li == l1 && !in_grad, "the first non-finite output: layer %d (%s), want %d (experts_1's output)", li,
        in_grad ? "gradient" : "output", l1);

  /* the weight back: step 3 updates again */
  ok = ok && poke(e, w1, false, 0, 0.01f, &st) && moert_exec_train_step(e, data, 3, &ss, &st);
  CHECK(ok && !ss.skipped && e->skipped == 1, "step 3 after the repair: %s", ok ? "skipped" : st.msg);
  ok = ok && e->b->download(e->b, after, e->params, sizeof(float) * np, &st);
  CHECK(ok && memcmp(before + p->params[n0].offset, after + p->params[n0].offset,
                     sizeof(float) * (size_t)p->params[n0].count) != 0,
        "step 3 did not update rmsnorm_0");
  ok = ok && moert_exec_find_nonfinite(e, &li, &in_grad, &st);
  CHECK(ok && li == -1, "nothing is NaN after step 3, yet layer %d is named", li);

  /* every output finite: NaN gradients in rmsnorm_0 and experts_1; the
   * backward reaches experts_1 first */
  ok = ok && poke(e, n0, true, 0, NAN, &st) && moert_exec_find_nonfinite(e, &li, &in_grad, &st);
  CHECK(ok && li == layer_index(m, "rmsnorm_0") && in_grad, "a NaN gradient of rmsnorm_0: layer %d (%s)", li,
        in_grad ? "gradient" : "output");
  ok = ok && poke(e, w1, true, 3, INFINITY, &st) && moert_exec_find_nonfinite(e, &li, &in_grad, &st);
  CHECK(ok && li == l1 && in_grad, "NaN gradients of rmsnorm_0 and experts_1: layer %d (%s), want %d", li,
        in_grad ? "gradient" : "output", l1);
  CHECK(ok, "%s", st.msg);

  /* a fresh executor whose step 1 is skipped: step 2 is AdamW's first update */
  moert_exec *e2 = NULL;
  int r0 = param_of(m, "experts_0");
  size_t n_r0 = (size_t)p->params[r0].count;
  float keep = 0, *w0 = malloc(sizeof(float) * n_r0), *w2 = malloc(sizeof(float) * n_r0);
  ok = w0 && w2 && moert_exec_create(&e2, m, p, moert_backend_cpu(), moert_comm_self(), true, 7, &st);
  if (ok) e2->opts.total_steps = 8;
  ok = ok && e2->b->download(e2->b, &keep, e2->params + p->params[w1].offset, sizeof keep, &st) &&
       poke(e2, w1, false, 0, NAN, &st) && moert_exec_train_step(e2, data, 1, &ss, &st);
  CHECK(ok && ss.skipped && e2->skipped == 1, "a fresh step 1 with a NaN weight: %s", ok ? "not skipped" : st.msg);
  ok = ok && poke(e2, w1, false, 0, keep, &st) &&
       e2->b->download(e2->b, w0, e2->params + p->params[r0].offset, sizeof(float) * n_r0, &st) &&
       moert_exec_train_step(e2, data, 2, &ss, &st) &&
       e2->b->download(e2->b, w2, e2->params + p->params[r0].offset, sizeof(float) * n_r0, &st);
  CHECK(ok && !ss.skipped, "step 2 after the repair: %s", ok ? "skipped" : st.msg);
  size_t moved = 0, by_lr = 0;
  for (size_t k = 0; ok && k < n_r0; k++) {
    double r = fabs((double)w2[k] - w0[k]) / ss.lr;
    moved += r > 0.5;
    by_lr += r > 0.98 && r < 1.02;
  }
  CHECK(ok && moved > n_r0 / 2 && by_lr > moved * 9 / 10,
        "after a skipped step 1, step 2 moved %zu of %zu elements of experts_0 by lr (of %zu that moved): not "
        "AdamW's first update (its step count advanced at the skip?)", by_lr, n_r0, moved);
  moert_exec_destroy(e2);
  free(w0);
  free(w2);

  free(before);
  free(after);
  moert_exec_destroy(e);
  moert_data_close(data);
  moert_plan_destroy(p);
  moec_arena_destroy(a);
  printf("test_nonfinite: %d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
