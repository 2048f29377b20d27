/* test_run.c — a run driven through its API (runtime/run.h), without the
 * command line: the tiny example on the cpu, its steps seen by the step hook.
 * Two runs of the same options give the same losses to the bit; a run saved
 * at step 4 and resumed to step 8 gives the uninterrupted run's losses of
 * steps 5 to 8 to the bit; a resume past the requested steps fails with
 * status 1 and a message, and calls the hook for no step. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "front.h"
#include "lower.h"
#include "run.h"

typedef struct seen {
  int n;
  int64_t steps[16];
  double loss[16];
} seen;

static void hook(void *ctx, int64_t step, const moert_step_stats *s, double eval_loss) {
  (void)eval_loss;
  seen *v = ctx;
  if (v->n < 16) {
    v->steps[v->n] = step;
    v->loss[v->n++] = s->loss;
  }
}

static int run(const moert_model *m, int64_t steps, const char *ckpt, bool resume, seen *v) {
  moert_run_opts o;
  moert_run_defaults(m, &o);
  o.steps = steps;
  o.backend = "cpu";
  o.comm = "self";
  o.quiet = true;
  o.eval_every = 0;
  o.checkpoint = ckpt;
  o.resume = resume;
  o.on_step = hook;
  o.on_step_ctx = v;
  int argc = 1;
  char *args[] = {"test_run", NULL}, **argv = args;
  return moert_run(m, &o, &argc, &argv, "test_run");
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: test_run SPEC WORKDIR\n");
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
  char ckpt[4096];
  snprintf(ckpt, sizeof ckpt, "%s/ck", argv[2]);
  seen a1 = {0}, a2 = {0}, b1 = {0}, b2 = {0}, bad = {0};
  CHECK(run(m, 8, NULL, false, &a1) == 0, "a run of 8 steps");
  CHECK(a1.n == 8 && a1.steps[0] == 1 && a1.steps[7] == 8, "the hook saw steps 1 to 8 (%d calls)", a1.n);
  for (int i = 0; i < a1.n; i++) CHECK(isfinite(a1.loss[i]), "step %d's loss is %g", i + 1, a1.loss[i]);
  CHECK(a1.loss[7] < a1.loss[0], "the loss went from %g to %g", a1.loss[0], a1.loss[7]);
  CHECK(run(m, 8, NULL, false, &a2) == 0, "a second run");
  CHECK(a2.n == 8 && memcmp(a1.loss, a2.loss, sizeof a1.loss) == 0, "two runs give the same losses");
  CHECK(run(m, 4, ckpt, false, &b1) == 0, "a run to step 4 with a checkpoint");
  CHECK(run(m, 8, ckpt, true, &b2) == 0, "resumed to step 8");
  CHECK(b2.n == 4 && b2.steps[0] == 5, "the resumed run saw steps 5 to 8 (%d calls, first %lld)", b2.n,
        (long long)b2.steps[0]);
  for (int i = 0; i < 4 && i < b2.n; i++)
    CHECK(b2.loss[i] == a1.loss[4 + i], "step %d: resumed %.17g, uninterrupted %.17g", 5 + i, b2.loss[i],
          a1.loss[4 + i]);
  fprintf(stderr, "(a failure follows, on purpose:)\n");
  CHECK(run(m, 8, ckpt, true, &bad) == 1 && bad.n == 0, "resuming at step 8 to step 8 fails (%d steps)", bad.n);
  moec_arena_destroy(a);
  printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
