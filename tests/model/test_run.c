/* test_run.c — a run driven through its API (runtime/run.h), without the
 * command line: the tiny example on the cpu, its steps seen by the step hook.
 * Two runs of the same options give the same losses to the bit; a run saved
 * at step 4 and resumed to step 8 gives the uninterrupted run's losses of
 * steps 5 to 8 to the bit; a resume past the requested steps fails with
 * status 1 and a message, and calls the hook for no step. A SIGTERM or
 * SIGINT raised in the hook (after the step's all-reduce, where the ranks
 * agree to stop) ends the run after the next step with 128 + the signal, a
 * checkpoint there that resumes bit for bit, the default action set for a
 * second signal, and the caller's handlers back afterwards; one agreed on at
 * the last step changes nothing; an ignored SIGINT stays ignored. The
 * metrics' z_loss key and the table's z_loss column appear only for a model
 * with a router z-loss, right after aux_loss and aux. */
#include <fcntl.h>
#include <math.h>
#include <signal.h>
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
  int64_t raise_at; /* the step at which the hook raises sig (0: none) */
  int sig;
  bool default_after; /* after the raise, sig's action was the default */
} seen;

static void hook(void *ctx, int64_t step, const moert_step_stats *s, double eval_loss) {
  (void)eval_loss;
  seen *v = ctx;
  if (v->n < 16) {
    v->steps[v->n] = step;
    v->loss[v->n++] = s->loss;
  }
  if (step == v->raise_at) {
    raise(v->sig);
    struct sigaction cur;
    v->default_after = sigaction(v->sig, NULL, &cur) == 0 && cur.sa_handler == SIG_DFL;
  }
}

static void sentinel(int sig) { (void)sig; }

/* A run of `steps` steps whose table (stdout) goes to the file `table` and
 * whose metrics go to `metrics`. Returns the run's status. */
static int run_logged(const moert_model *m, int64_t steps, const char *metrics, const char *table) {
  moert_run_opts o;
  moert_run_defaults(m, &o);
  o.steps = steps;
  o.backend = "cpu";
  o.comm = "self";
  o.eval_every = 0;
  o.log_every = 1;
  o.metrics = metrics;
  int argc = 1;
  char *args[] = {"test_run", NULL}, **argv = args;
  fflush(stdout);
  int saved = dup(1), fd = open(table, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (saved < 0 || fd < 0) return -1;
  dup2(fd, 1);
  close(fd);
  int rc = moert_run(m, &o, &argc, &argv, "test_run");
  fflush(stdout);
  dup2(saved, 1);
  close(saved);
  return rc;
}

/* The file's text (at most n - 1 bytes), "" when it cannot be read. */
static void slurp(const char *path, char *buf, size_t n) {
  FILE *f = fopen(path, "r");
  size_t k = f ? fread(buf, 1, n - 1, f) : 0;
  buf[k] = 0;
  if (f) fclose(f);
}

/* Whitespace-separated fields of the table's first row (the line after the
 * one that begins with "   step"); -1: no row. */
static int first_row_fields(const char *table) {
  const char *h = strstr(table, "   step ");
  const char *row = h ? strchr(h, '\n') : NULL;
  if (!row) return -1;
  int n = 0;
  for (const char *c = row + 1; *c && *c != '\n'; c++)
    if (*c != ' ' && (c == row + 1 || c[-1] == ' ')) n++;
  return n;
}

/* The metrics' z_loss key and the table's column: only for a model with a
 * router z-loss (tables and metrics of other models stay as they were), and
 * then right after aux_loss and aux. */
static void check_z_loss(const moert_model *m, const char *dir) {
  static char text[1 << 16];
  char mpath[4096], tpath[4096];
  snprintf(mpath, sizeof mpath, "%s/z.jsonl", dir);
  snprintf(tpath, sizeof tpath, "%s/z.txt", dir);
  int nmoe = 0;
  for (int i = 0; i < m->nlayers; i++) nmoe += m->layers[i].kind == MOERT_L_MOE;
  CHECK(run_logged(m, 2, mpath, tpath) == 0, "a run without a z-loss");
  slurp(mpath, text, sizeof text);
  CHECK(strstr(text, "\"aux_loss\": ") && !strstr(text, "z_loss"), "a model without a z-loss has z_loss in "
        "its metrics: %.160s", text);
  slurp(tpath, text, sizeof text);
  CHECK(strstr(text, "   step       loss        aux        lr  grad_norm") && !strstr(text, "z_loss"),
        "the table of a model without a z-loss changed: %.400s", text);
  CHECK(first_row_fields(text) == 9 + nmoe, "a row of the table has %d fields, not %d", first_row_fields(text),
        9 + nmoe);

  moert_layer *ls = malloc(sizeof *ls * (size_t)m->nlayers);
  memcpy(ls, m->layers, sizeof *ls * (size_t)m->nlayers);
  for (int i = 0; i < m->nlayers; i++)
    if (ls[i].kind == MOERT_L_MOE) { /* one layer with a z-loss is enough */
      ls[i].z_loss = 1e-3;
      break;
    }
  moert_model mz = *m;
  mz.layers = ls;
  CHECK(run_logged(&mz, 2, mpath, tpath) == 0, "a run with a z-loss");
  slurp(mpath, text, sizeof text);
  int lines = 0;
  for (const char *c = text; (c = strstr(c, "\"aux_loss\": ")) != NULL; c++) {
    const char *comma = strchr(c, ','), *next = comma ? strchr(comma + 1, ',') : NULL;
    CHECK(comma && strncmp(comma, ", \"z_loss\": ", 12) == 0 && next && strncmp(next, ", \"lr\": ", 8) == 0,
          "metrics line %d: z_loss does not follow aux_loss (before lr): %.80s", lines + 1, c);
    lines++;
  }
  CHECK(lines == 2, "%d metrics lines with aux_loss, not 2", lines);
  slurp(tpath, text, sizeof text);
  CHECK(strstr(text, "   step       loss        aux     z_loss        lr  grad_norm") != NULL,
        "the table has no z_loss column after aux: %.400s", text);
  CHECK(first_row_fields(text) == 10 + nmoe, "a row of the table with z_loss has %d fields, not %d",
        first_row_fields(text), 10 + nmoe);
  free(ls);
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

  /* SIGTERM at the end of step 3, so the run stops after step 4, with a
   * checkpoint; the caller's own handler around the run */
  char ck2[4096];
  snprintf(ck2, sizeof ck2, "%s/ck2", argv[2]);
  struct sigaction mine = {.sa_handler = sentinel}, cur;
  sigemptyset(&mine.sa_mask);
  sigaction(SIGTERM, &mine, NULL);
  seen t = {.raise_at = 3, .sig = SIGTERM}, t2 = {0};
  int rc = run(m, 8, ck2, false, &t);
  CHECK(rc == 128 + SIGTERM, "SIGTERM at step 3: status %d, not %d", rc, 128 + SIGTERM);
  CHECK(t.n == 4, "SIGTERM at step 3: the hook saw %d steps, not 4", t.n);
  CHECK(t.default_after, "after the first SIGTERM a second one does not end the process at once");
  CHECK(sigaction(SIGTERM, NULL, &cur) == 0 && cur.sa_handler == sentinel, "the caller's SIGTERM handler is not back");
  CHECK(run(m, 8, ck2, true, &t2) == 0, "resumed after SIGTERM");
  CHECK(t2.n == 4 && t2.steps[0] == 5, "resumed after SIGTERM: steps %lld.., %d of them (not 5.., 4)",
        (long long)t2.steps[0], t2.n);
  for (int i = 0; i < 4 && i < t2.n; i++)
    CHECK(t2.loss[i] == a1.loss[4 + i], "step %d after SIGTERM: resumed %.17g, uninterrupted %.17g", 5 + i,
          t2.loss[i], a1.loss[4 + i]);
  signal(SIGTERM, SIG_DFL);
  /* a signal agreed on at the last step: the run is done, and says so */
  seen late = {.raise_at = 7, .sig = SIGTERM};
  rc = run(m, 8, NULL, false, &late);
  CHECK(rc == 0 && late.n == 8, "SIGTERM agreed on at the last step: status %d after %d steps", rc, late.n);
  /* SIGINT without a checkpoint; then an ignored SIGINT changes nothing */
  seen i1 = {.raise_at = 2, .sig = SIGINT}, i2 = {.raise_at = 2, .sig = SIGINT};
  rc = run(m, 8, NULL, false, &i1);
  CHECK(rc == 128 + SIGINT && i1.n == 3, "SIGINT at step 2: status %d after %d steps", rc, i1.n);
  signal(SIGINT, SIG_IGN);
  rc = run(m, 8, NULL, false, &i2);
  CHECK(rc == 0 && i2.n == 8, "an ignored SIGINT: status %d after %d steps", rc, i2.n);
  CHECK(sigaction(SIGINT, NULL, &cur) == 0 && cur.sa_handler == SIG_IGN, "SIGINT is no longer ignored");
  signal(SIGINT, SIG_DFL);
  check_z_loss(m, argv[2]);
  moec_arena_destroy(a);
  printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
