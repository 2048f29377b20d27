/* test_cpu_ops.c — unit tests of runtime/cpu_ops.c, the cpu backend's ops.
 *
 * Three builds of the same source are linked here (tests/unit/twin.cmake):
 *   moert_cpu_*  the library as built (GEMMs through CBLAS when found),
 *   moert_blk_*  the same in float without CBLAS (the blocked GEMM),
 *   moert_f64_*  the same with float made double.
 * The gradient checks (llm.c's check_tensor, ggml's test-backend-ops): a
 * table of cases, each a forward and the backward ops that differentiate it
 * (cpu_ops_cases.inc). For each case, on fresh random inputs, with a random R
 * and L = sum(out * R): the analytic gradient of the double build is checked
 * against central differences of its forward; then the float builds' outputs
 * and gradients against the double build's. Gradients the ops accumulate
 * start from random values, gradients they write start as NaN, so "=" for
 * "+=" (and the reverse) is caught. Then exact tests of routing on small hand
 * computed cases, forward values against closed forms, the GEMMs against a
 * double reference on odd shapes, and the optimizers against a double
 * reference. Attention: its gradient cases (rope, attention with and
 * without rope, causal or not, mha, gqa, mqa), then its forward against a
 * plain reference (a mask or kv head wrong in both directions passes the
 * gradient checks), RoPE's properties, the decode op against the forward and
 * the bf16 forms against the fp32 ops. A failure prints the first mismatches
 * and the largest difference; the exit status is the number of failed checks
 * (capped). */
#include "cpu_ops.h"
#include "cpu_ops_typed.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moert_blk_ops.h"
#include "moert_f64_ops.h"

/* --- checking --- */

static int failures;

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fail(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("FAIL: ", stdout);
  vprintf(fmt, ap);
  fputc('\n', stdout);
  va_end(ap);
  failures++;
}

static void *xalloc(int64_t n, size_t size) {
  void *p = calloc(n > 0 ? (size_t)n : 1, size);
  if (!p) {
    fprintf(stderr, "test_cpu_ops: out of memory\n");
    exit(2);
  }
  return p;
}

enum { SHOW_MISMATCHES = 5 };

/* got ≈ want elementwise: |got - want| <= atol + rtol * (|want| + rms(want)),
 * an error relative to the element, floored at the vector's size so values
 * that cancel to near zero do not demand more than the data holds. NaN
 * never passes. On failure prints the first mismatches, the largest
 * difference and the norm-relative error ||got - want|| / ||want||. */
static bool check_close(const char *what, const double *got, const double *want, int64_t n,
                        double rtol, double atol) {
  double ss = 0, dd = 0;
  for (int64_t i = 0; i < n; i++) ss += want[i] * want[i];
  double rms = n > 0 ? sqrt(ss / (double)n) : 0;
  int64_t bad = 0, worst = -1;
  double worst_diff = 0;
  for (int64_t i = 0; i < n; i++) {
    double diff = fabs(got[i] - want[i]);
    dd += (got[i] - want[i]) * (got[i] - want[i]);
    bool ok = diff <= atol + rtol * (fabs(want[i]) + rms);
    if (!ok && (worst < 0 || !(diff <= worst_diff))) {
      worst = i;
      worst_diff = diff;
    }
    if (ok) continue;
    if (bad == 0)
      printf("FAIL: %s: got vs want (rtol %.1e, atol %.1e, rms %.3e):\n", what, rtol, atol, rms);
    if (bad < SHOW_MISMATCHES)
      printf("  [%lld] got %.9g want %.9g diff %.3e\n", (long long)i, got[i], want[i], diff);
    bad++;
  }
  if (bad == 0) return true;
  printf("  %lld of %lld mismatch; largest difference %.3e at [%lld]; ||got-want||/||want|| = "
         "%.3e\n",
         (long long)bad, (long long)n, worst_diff, (long long)worst, sqrt(dd / (ss > 0 ? ss : 1)));
  failures++;
  return false;
}

static bool check_f32(const char *what, const float *got, const double *want, int64_t n,
                      double rtol, double atol) {
  double *g = xalloc(n, sizeof *g);
  for (int64_t i = 0; i < n; i++) g[i] = got[i];
  bool ok = check_close(what, g, want, n, rtol, atol);
  free(g);
  return ok;
}

static bool check_i32(const char *what, const int32_t *got, const int32_t *want, int64_t n) {
  int64_t bad = 0;
  for (int64_t i = 0; i < n; i++) {
    if (got[i] == want[i]) continue;
    if (bad == 0) printf("FAIL: %s:\n", what);
    if (bad < SHOW_MISMATCHES) printf("  [%lld] got %d want %d\n", (long long)i, got[i], want[i]);
    bad++;
  }
  if (bad == 0) return true;
  printf("  %lld of %lld differ\n", (long long)bad, (long long)n);
  failures++;
  return false;
}

/* --- random numbers: splitmix64, seeded per test --- */

typedef struct {
  uint64_t s;
} rng;

static uint64_t rng_next(rng *r) {
  uint64_t z = (r->s += 0x9e3779b97f4a7c15u);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
  return z ^ (z >> 31);
}

/* Uniform in [lo, hi), rounded to float so every build sees the same value. */
static double rng_range(rng *r, double lo, double hi) {
  return (float)(lo + (hi - lo) * ((double)(rng_next(r) >> 11) * 0x1.0p-53));
}

/* Never zero, never all equal: +-[0.1, 1.1). */
static double rng_nonzero(rng *r) {
  double v = rng_range(r, 0.1, 1.1);
  return rng_next(r) & 1 ? v : -v;
}

static int64_t rng_int(rng *r, int64_t n) { return (int64_t)(rng_next(r) % (uint64_t)n); }

/* --- the gradient-check cases --- */

enum { GC_MAXIN = 6, GC_NDIM = 12, GC_EXTRA = 32, GC_EXTRA_COUNTS = 16 };

typedef struct gc_case gc_case;
typedef void gc_fwd64(const gc_case *, double *const *, double *);
typedef void gc_bwd64(const gc_case *, double *const *, const double *, double *const *);
typedef void gc_fwd32(const gc_case *, float *const *, float *);
typedef void gc_bwd32(const gc_case *, float *const *, const float *, float *const *);

struct gc_case {
  const char *name;
  int nin;                /* differentiable inputs */
  int64_t in_n[GC_MAXIN]; /* their sizes */
  bool in_acc[GC_MAXIN];  /* the backward accumulates into this gradient */
  int64_t out_n;
  int64_t d[GC_NDIM];     /* shapes and modes: see each case */
  double p[4];            /* scalar parameters */
  double extra[GC_EXTRA]; /* fixed real data (other ranks' gate statistics) */
  int32_t *i0, *i1;       /* integer inputs, made by setup */
  void (*setup)(gc_case *, rng *, double *const *in); /* inputs beyond rng_nonzero */
  gc_fwd64 *fwd64;
  gc_bwd64 *bwd64;
  gc_fwd32 *fwd32, *fwdblk;
  gc_bwd32 *bwd32, *bwdblk;
};

/* Set by a case's forward when a finite-difference step changed a discrete
 * choice (the top-k selection): the check is then void and fails. */
static bool gc_selection_changed;

#define real double
#define OP(name) moert_f64_##name
#define FN(name) name##_f64
#include "cpu_ops_cases.inc"
#undef real
#undef OP
#undef FN
#define real float
#define OP(name) moert_cpu_##name
#define FN(name) name##_f32
#include "cpu_ops_cases.inc"
#undef OP
#undef FN
#define OP(name) moert_blk_##name
#define FN(name) name##_blk
#include "cpu_ops_cases.inc"
#undef real
#undef OP
#undef FN

#define CASE_FNS(x)                                                                                \
  .fwd64 = x##_fwd_f64, .bwd64 = x##_bwd_f64, .fwd32 = x##_fwd_f32, .bwd32 = x##_bwd_f32,          \
  .fwdblk = x##_fwd_blk, .bwdblk = x##_bwd_blk

/* Central differences in double: step and tolerances. The double build's
 * truncation error is ~h^2 and its rounding ~1e-16 |L| / h, both far below
 * 1e-6; a wrong sign, a missing term or a factor of 2 is an error of order 1. */
#define FD_STEP 1e-5
#define FD_RTOL 1e-6
#define FD_ATOL 1e-9
/* Float builds against the double build: float rounding through a few ops. */
#define F32_RTOL 1e-4
#define F32_ATOL 1e-6

static void nan_fill(double *x, int64_t n) {
  for (int64_t i = 0; i < n; i++) x[i] = NAN;
}

static double loss_of(const double *out, const double *r, int64_t n) {
  double l = 0;
  for (int64_t i = 0; i < n; i++) l += out[i] * r[i];
  return l;
}

/* Runs a float build of the case on the same inputs; compares its output
 * and gradients with the double build's. */
static void gc_check_float(const gc_case *c, const char *build, gc_fwd32 *fwd, gc_bwd32 *bwd,
                           double *const *in, const double *r, const double *out64,
                           double *const *grad64, double *const *base) {
  float *fin[GC_MAXIN], *fdin[GC_MAXIN];
  float *fout = xalloc(c->out_n, sizeof *fout), *fr = xalloc(c->out_n, sizeof *fr);
  double tol = F32_RTOL;
  char what[160];
  for (int i = 0; i < c->nin; i++) {
    fin[i] = xalloc(c->in_n[i], sizeof(float));
    fdin[i] = xalloc(c->in_n[i], sizeof(float));
    for (int64_t j = 0; j < c->in_n[i]; j++) {
      fin[i][j] = (float)in[i][j];
      fdin[i][j] = c->in_acc[i] ? (float)base[i][j] : NAN;
    }
  }
  for (int64_t j = 0; j < c->out_n; j++) fr[j] = (float)r[j];
  for (int64_t j = 0; j < c->out_n; j++) fout[j] = NAN;
  fwd(c, fin, fout);
  snprintf(what, sizeof what, "%s: %s forward vs f64", c->name, build);
  check_f32(what, fout, out64, c->out_n, tol, F32_ATOL);
  bwd(c, fin, fr, fdin);
  for (int i = 0; i < c->nin; i++) {
    double *g = xalloc(c->in_n[i], sizeof *g);
    for (int64_t j = 0; j < c->in_n[i]; j++)
      g[j] = (double)fdin[i][j] - (c->in_acc[i] ? (double)(float)base[i][j] : 0);
    snprintf(what, sizeof what, "%s: %s d/d in[%d] vs f64", c->name, build, i);
    check_close(what, g, grad64[i], c->in_n[i], tol, F32_ATOL);
    free(g);
    free(fin[i]);
    free(fdin[i]);
  }
  free(fout);
  free(fr);
}

static void gc_run(gc_case *c, uint64_t seed) {
  rng r = {seed};
  double *in[GC_MAXIN], *grad[GC_MAXIN], *base[GC_MAXIN];
  for (int i = 0; i < c->nin; i++) {
    in[i] = xalloc(c->in_n[i], sizeof(double));
    grad[i] = xalloc(c->in_n[i], sizeof(double));
    base[i] = xalloc(c->in_n[i], sizeof(double));
    for (int64_t j = 0; j < c->in_n[i]; j++) in[i][j] = rng_nonzero(&r);
  }
  if (c->setup) c->setup(c, &r, in);
  for (int i = 0; i < c->nin; i++)
    for (int64_t j = 0; j < c->in_n[i]; j++) {
      if (in[i][j] != (float)in[i][j]) {
        fail("%s: test bug: input %d[%lld] is not a float", c->name, i, (long long)j);
        return;
      }
      /* Written gradients start as NaN, accumulated ones from a value. */
      base[i][j] = c->in_acc[i] ? rng_nonzero(&r) : NAN;
      grad[i][j] = base[i][j];
    }
  double *rr = xalloc(c->out_n, sizeof *rr), *out = xalloc(c->out_n, sizeof *out);
  for (int64_t j = 0; j < c->out_n; j++) rr[j] = rng_nonzero(&r);

  gc_selection_changed = false;
  nan_fill(out, c->out_n); /* forward outputs are written in full */
  c->fwd64(c, in, out);
  c->bwd64(c, in, rr, grad);
  for (int i = 0; i < c->nin; i++)
    if (c->in_acc[i])
      for (int64_t j = 0; j < c->in_n[i]; j++) grad[i][j] -= base[i][j];

  double *tmp = xalloc(c->out_n, sizeof *tmp);
  char what[160];
  for (int i = 0; i < c->nin; i++) {
    double *num = xalloc(c->in_n[i], sizeof *num);
    for (int64_t j = 0; j < c->in_n[i]; j++) {
      double x = in[i][j], h = FD_STEP * (fabs(x) > 1 ? fabs(x) : 1);
      in[i][j] = x + h;
      nan_fill(tmp, c->out_n);
      c->fwd64(c, in, tmp);
      double lp = loss_of(tmp, rr, c->out_n);
      in[i][j] = x - h;
      nan_fill(tmp, c->out_n);
      c->fwd64(c, in, tmp);
      double lm = loss_of(tmp, rr, c->out_n);
      in[i][j] = x;
      num[j] = (lp - lm) / (2 * h);
    }
    snprintf(what, sizeof what, "%s: d/d in[%d], analytic vs central differences", c->name, i);
    check_close(what, grad[i], num, c->in_n[i], FD_RTOL, FD_ATOL);
    free(num);
  }
  if (gc_selection_changed)
    fail("%s: a finite-difference step changed the top-k selection; the check is void", c->name);
  free(tmp);

  gc_check_float(c, "f32", c->fwd32, c->bwd32, in, rr, out, grad, base);
  gc_check_float(c, "blk", c->fwdblk, c->bwdblk, in, rr, out, grad, base);

  for (int i = 0; i < c->nin; i++) {
    free(in[i]);
    free(grad[i]);
    free(base[i]);
  }
  free(rr);
  free(out);
  free(c->i0);
  free(c->i1);
  c->i0 = c->i1 = NULL;
}

/* --- setups: inputs the default (+-[0.1, 1.1)) does not fit --- */

/* relu: keep away from the kink at 0. */
static void setup_relu(gc_case *c, rng *r, double *const *in) {
  for (int64_t j = 0; j < c->in_n[0]; j++)
    if (fabs(in[0][j]) < 0.2) in[0][j] = rng_next(r) & 1 ? 0.5 : -0.5;
}

/* Wider range for the smooth activations: the tails matter. */
static void setup_wide(gc_case *c, rng *r, double *const *in) {
  for (int64_t j = 0; j < c->in_n[0]; j++) in[0][j] = rng_range(r, -4, 4);
}

/* gate_normalize: positive top-k scores. */
static void setup_topv(gc_case *c, rng *r, double *const *in) {
  for (int64_t j = 0; j < c->in_n[0]; j++) in[0][j] = rng_range(r, 0.05, 1);
}

/* Other ranks' statistics: score sums, top-1 counts, their token count. */
static void setup_other_ranks(gc_case *c, rng *r, int64_t experts) {
  double tokens = 0;
  for (int64_t e = 0; e < experts; e++) {
    c->extra[e] = rng_range(r, 0.5, 3);
    c->extra[GC_EXTRA_COUNTS + e] = (double)rng_int(r, 4);
    tokens += c->extra[GC_EXTRA_COUNTS + e];
  }
  c->p[1] = tokens;
}

/* k distinct random experts per token into idx. */
static int32_t *random_choices(rng *r, int64_t tokens, int64_t experts, int64_t top_k) {
  int32_t *idx = xalloc(tokens * top_k, sizeof *idx);
  for (int64_t t = 0; t < tokens; t++)
    for (int64_t j = 0; j < top_k; j++) {
      bool again;
      do {
        idx[t * top_k + j] = (int32_t)rng_int(r, experts);
        again = false;
        for (int64_t i = 0; i < j; i++) again |= idx[t * top_k + i] == idx[t * top_k + j];
      } while (again);
    }
  return idx;
}

/* gate_scores: d = {tokens, experts, top_k}; positive scores. */
static void setup_gate_scores(gc_case *c, rng *r, double *const *in) {
  setup_topv(c, r, in);
  c->i0 = random_choices(r, c->d[0], c->d[1], c->d[2]);
  setup_other_ranks(c, r, c->d[1]);
}

/* Logits whose experts' scores are at least ~0.2 apart in every row: a
 * permutation of steps of 0.5, jittered by 0.1, plus noise within 0.05. */
static void separated_logits(rng *r, double *logits, double *noise, int64_t tokens,
                             int64_t experts) {
  for (int64_t t = 0; t < tokens; t++) {
    double *l = logits + t * experts;
    for (int64_t e = 0; e < experts; e++) l[e] = (double)e;
    for (int64_t e = experts - 1; e > 0; e--) {
      int64_t o = rng_int(r, e + 1);
      double tmp = l[e];
      l[e] = l[o];
      l[o] = tmp;
    }
    for (int64_t e = 0; e < experts; e++) {
      l[e] = (float)(0.5 * l[e] - 1 + rng_range(r, -0.1, 0.1));
      if (noise) noise[t * experts + e] = rng_range(r, -0.05, 0.05);
    }
  }
}

/* gating: d = {tokens, experts, top_k, normalize}; i0 = the selection. */
static void setup_gating(gc_case *c, rng *r, double *const *in) {
  int64_t T = c->d[0], E = c->d[1], k = c->d[2];
  separated_logits(r, in[0], in[1], T, E);
  setup_other_ranks(c, r, E);
  double *scores = xalloc(T * E, sizeof *scores), *topv = xalloc(T * k, sizeof *topv);
  c->i0 = xalloc(T * k, sizeof *c->i0);
  moert_f64_gate_topk(in[0], in[1], scores, c->i0, topv, T, E, k);
  free(scores);
  free(topv);
}

/* dispatch/combine: d = {tokens, top_k, experts, capacity, dim}; random
 * choices, their locations; the capacity must drop some and pad some. */
static void setup_routing(gc_case *c, rng *r, double *const *in) {
  int64_t T = c->d[0], k = c->d[1], E = c->d[2], C = c->d[3];
  (void)in;
  int32_t *counts = xalloc(E, sizeof *counts);
  c->i0 = random_choices(r, T, E, k);
  c->i1 = xalloc(T * k, sizeof *c->i1);
  moert_cpu_gate_locations(c->i0, NULL, c->i1, counts, T, E, k);
  int64_t dropped = 0, padded = 0;
  for (int64_t e = 0; e < E; e++) {
    dropped += counts[e] > C ? counts[e] - C : 0;
    padded += counts[e] < C ? C - counts[e] : 0;
  }
  if (!dropped || !padded)
    fail("%s: test bug: the routing drops %lld and pads %lld slots; want both", c->name,
         (long long)dropped, (long long)padded);
  free(counts);
}

/* embed: d = {tokens, context, vocab, dim}; windows with -1 and repeats. */
static void setup_embed(gc_case *c, rng *r, double *const *in) {
  int64_t n = c->d[0] * c->d[1];
  (void)in;
  c->i0 = xalloc(n, sizeof *c->i0);
  for (int64_t i = 0; i < n; i++) c->i0[i] = (int32_t)rng_int(r, c->d[2] + 1) - 1;
  c->i0[0] = -1;
  c->i0[c->d[1]] = c->i0[2 * c->d[1]] = 2; /* token 1 and 2 share a word at position 0 */
}

/* xent: d = {rows, vocab}; logits in +-3; the last row's target is -1. */
static void setup_xent(gc_case *c, rng *r, double *const *in) {
  for (int64_t j = 0; j < c->in_n[0]; j++) in[0][j] = rng_range(r, -3, 3);
  c->i0 = xalloc(c->d[0], sizeof *c->i0);
  for (int64_t t = 0; t < c->d[0]; t++) c->i0[t] = (int32_t)rng_int(r, c->d[1]);
  c->i0[c->d[0] - 1] = -1;
}

/* moe: d = {tokens, model, hidden, experts, top_k, capacity, act}. Small
 * weights; the gate's inputs redrawn until every token's scores are well
 * apart (so no step changes the selection); i0 = the selection. */
static void setup_moe(gc_case *c, rng *r, double *const *in) {
  int64_t T = c->d[0], M = c->d[1], E = c->d[3], k = c->d[4];
  for (int i = 2; i < 6; i++)
    for (int64_t j = 0; j < c->in_n[i]; j++) in[i][j] = (float)(0.5 * in[i][j]);
  double *logits = xalloc(T * E, sizeof *logits), *scores = xalloc(T * E, sizeof *scores);
  double *topv = xalloc(T * k, sizeof *topv);
  c->i0 = xalloc(T * k, sizeof *c->i0);
  for (int attempt = 0;; attempt++) {
    if (attempt == 1000) {
      fail("%s: test bug: no separated gate logits found", c->name);
      break;
    }
    for (int64_t j = 0; j < c->in_n[1]; j++) in[1][j] = rng_nonzero(r);
    moert_f64_gemm(false, false, T, E, M, 1, in[0], M, in[1], E, 0, logits, E);
    double gap = INFINITY;
    for (int64_t t = 0; t < T; t++)
      for (int64_t a = 0; a < E; a++)
        for (int64_t b = a + 1; b < E; b++) {
          double g = fabs(logits[t * E + a] - logits[t * E + b]);
          if (g < gap) gap = g;
        }
    if (gap > 0.02) break;
  }
  moert_f64_gate_topk(logits, NULL, scores, c->i0, topv, T, E, k);
  free(logits);
  free(scores);
  free(topv);
}

/* --- the table --- */

static void gemm_case(gc_case *c, const char *name, int64_t m, int64_t n, int64_t k, bool ta,
                      bool tb, double alpha, double beta, int64_t pad) {
  int64_t lda = (ta ? m : k) + pad, ldb = (tb ? k : n) + pad, ldc = n + pad;
  *c = (gc_case){.name = name,
                 .nin = 3,
                 .d = {m, n, k, lda, ldb, ldc, ta, tb},
                 .p = {alpha, beta},
                 CASE_FNS(gemm)};
  c->in_n[0] = (ta ? k : m) * lda;
  c->in_n[1] = (tb ? n : k) * ldb;
  c->in_n[2] = c->out_n = m * ldc;
}

static void gemm_batched_case(gc_case *c, const char *name, bool ta, bool tb) {
  int64_t m = 3, n = 5, k = 4, count = 3, pad = 1;
  int64_t lda = (ta ? m : k) + pad, ldb = (tb ? k : n) + pad, ldc = n + pad;
  int64_t sa = (ta ? k : m) * lda + 2, sb = (tb ? n : k) * ldb + 3, sc = m * ldc + 1;
  *c = (gc_case){.name = name,
                 .nin = 3,
                 .d = {m, n, k, lda, ldb, ldc, ta, tb, count, sa, sb, sc},
                 .p = {1.5, 0.5},
                 CASE_FNS(gemm_batched)};
  c->in_n[0] = count * sa;
  c->in_n[1] = count * sb;
  c->in_n[2] = c->out_n = count * sc;
}

/* Attention (cpu_ops_cases.inc): nseq sequences of seq tokens, H query heads
 * reading KV key/value heads of D; rope: RoPE (base 10000) before the
 * attention, as the layer runs it. */
static void attn_case(gc_case *c, const char *name, int64_t nseq, int64_t seq, int64_t H, int64_t KV,
                      int64_t D, bool causal, bool rope) {
  *c = (gc_case){.name = name, .nin = 1, .d = {nseq, seq, H, KV, D, causal, rope}, .p = {10000},
                 CASE_FNS(attn)};
  c->in_n[0] = nseq * seq * (H + 2 * KV) * D;
  c->out_n = nseq * seq * H * D;
}

/* RoPE alone at positions pos0 + t % seq (inverse: the backward rotation). */
static void rope_case(gc_case *c, const char *name, int64_t nseq, int64_t seq, int64_t pos0, int64_t H,
                      int64_t KV, int64_t D, double base, bool inverse) {
  *c = (gc_case){.name = name, .nin = 1, .d = {nseq, seq, H, KV, D, 0, 1, pos0, inverse}, .p = {base},
                 CASE_FNS(rope)};
  c->in_n[0] = c->out_n = nseq * seq * (H + 2 * KV) * D;
}

/* attn_decode of the last of len rows (cpu_ops_cases.inc's decode). */
static void decode_case(gc_case *c, const char *name, int64_t len, int64_t H, int64_t KV, int64_t D) {
  *c = (gc_case){.name = name, .nin = 1, .d = {len, H, KV, D}, CASE_FNS(decode)};
  c->in_n[0] = len * (H + 2 * KV) * D;
  c->out_n = H * D;
}

static int run_gradient_checks(void) {
  gc_case cases[64];
  int n = 0;
  gemm_case(&cases[n++], "gemm nn", 5, 7, 3, false, false, 1, 0, 0);
  gemm_case(&cases[n++], "gemm nt", 4, 3, 6, false, true, 0.75, 1, 2);
  gemm_case(&cases[n++], "gemm tn", 7, 2, 5, true, false, -1.25, 0.5, 1);
  gemm_case(&cases[n++], "gemm tt", 3, 6, 4, true, true, 2, -0.5, 3);
  gemm_batched_case(&cases[n++], "gemm_batched nn", false, false);
  gemm_batched_case(&cases[n++], "gemm_batched tt", true, true);
  gemm_batched_case(&cases[n++], "gemm_batched nt", false, true);
  gemm_batched_case(&cases[n++], "gemm_batched tn", true, false);
  // clang-format off
  cases[n++] = (gc_case){.name = "bias", .nin = 2, .in_n = {5 * 7, 7}, .in_acc = {false, true},
                         .out_n = 5 * 7, .d = {5, 7}, CASE_FNS(bias)};
  cases[n++] = (gc_case){.name = "bias wide", .nin = 2, .in_n = {3 * 130, 130},
                         .in_acc = {false, true}, .out_n = 3 * 130, .d = {3, 130}, CASE_FNS(bias)};
  cases[n++] = (gc_case){.name = "relu", .nin = 1, .in_n = {40}, .out_n = 40,
                         .d = {40, MOERT_ACT_RELU}, .setup = setup_relu, CASE_FNS(act)};
  cases[n++] = (gc_case){.name = "gelu", .nin = 1, .in_n = {40}, .out_n = 40,
                         .d = {40, MOERT_ACT_GELU}, .setup = setup_wide, CASE_FNS(act)};
  cases[n++] = (gc_case){.name = "silu", .nin = 1, .in_n = {40}, .out_n = 40,
                         .d = {40, MOERT_ACT_SILU}, .setup = setup_wide, CASE_FNS(act)};
  cases[n++] = (gc_case){.name = "swiglu", .nin = 1, .in_n = {3 * 2 * 5}, .out_n = 3 * 5,
                         .d = {3, 5}, .setup = setup_wide, CASE_FNS(swiglu)};
  cases[n++] = (gc_case){.name = "layernorm", .nin = 3, .in_n = {4 * 9, 9, 9},
                         .in_acc = {false, true, true}, .out_n = 4 * 9, .d = {4, 9},
                         .p = {1e-5}, CASE_FNS(layernorm)};
  cases[n++] = (gc_case){.name = "layernorm wide", .nin = 3, .in_n = {2 * 70, 70, 70},
                         .in_acc = {false, true, true}, .out_n = 2 * 70, .d = {2, 70},
                         .p = {1e-5}, CASE_FNS(layernorm)};
  cases[n++] = (gc_case){.name = "rmsnorm", .nin = 2, .in_n = {4 * 9, 9}, .in_acc = {false, true},
                         .out_n = 4 * 9, .d = {4, 9}, .p = {1e-6}, CASE_FNS(rmsnorm)};
  cases[n++] = (gc_case){.name = "rmsnorm wide", .nin = 2, .in_n = {2 * 70, 70},
                         .in_acc = {false, true}, .out_n = 2 * 70, .d = {2, 70}, .p = {1e-6},
                         CASE_FNS(rmsnorm)};
  cases[n++] = (gc_case){.name = "l2norm rows", .nin = 1, .in_n = {4 * 6}, .out_n = 4 * 6,
                         .d = {4, 6}, CASE_FNS(l2rows)};
  cases[n++] = (gc_case){.name = "l2norm cols", .nin = 1, .in_n = {6 * 4}, .out_n = 6 * 4,
                         .d = {6, 4}, CASE_FNS(l2cols)};
  cases[n++] = (gc_case){.name = "l2norm cols wide", .nin = 1, .in_n = {3 * 67}, .out_n = 3 * 67,
                         .d = {3, 67}, CASE_FNS(l2cols)};
  cases[n++] = (gc_case){.name = "softmax", .nin = 2, .in_n = {4 * 5, 4 * 5}, .out_n = 4 * 5,
                         .d = {4, 5}, CASE_FNS(softmax)};
  cases[n++] = (gc_case){.name = "gate_normalize on", .nin = 1, .in_n = {5 * 3}, .out_n = 5 * 3,
                         .d = {5, 3, true}, .setup = setup_topv, CASE_FNS(normalize)};
  cases[n++] = (gc_case){.name = "gate_normalize off", .nin = 1, .in_n = {5 * 3}, .out_n = 5 * 3,
                         .d = {5, 3, false}, .setup = setup_topv, CASE_FNS(normalize)};
  cases[n++] = (gc_case){.name = "gate_scores_bwd + aux loss", .nin = 1, .in_n = {6 * 5},
                         .in_acc = {true}, .out_n = 6 * 2 + 1, .d = {6, 5, 2},
                         .setup = setup_gate_scores, CASE_FNS(gate_scores)};
  cases[n++] = (gc_case){.name = "gating k=1", .nin = 2, .in_n = {6 * 4, 6 * 4},
                         .out_n = 6 * 1 + 1, .d = {6, 4, 1, false}, .setup = setup_gating,
                         CASE_FNS(gating)};
  cases[n++] = (gc_case){.name = "gating k=2 normalized", .nin = 2, .in_n = {6 * 5, 6 * 5},
                         .out_n = 6 * 2 + 1, .d = {6, 5, 2, true}, .setup = setup_gating,
                         CASE_FNS(gating)};
  cases[n++] = (gc_case){.name = "gating k=3", .nin = 2, .in_n = {5 * 6, 5 * 6},
                         .out_n = 5 * 3 + 1, .d = {5, 6, 3, false}, .setup = setup_gating,
                         CASE_FNS(gating)};
  /* 20 claims on 5 experts of capacity 4: an uneven draw drops and pads */
  cases[n++] = (gc_case){.name = "dispatch", .nin = 1, .in_n = {10 * 3}, .out_n = 5 * 4 * 3,
                         .d = {10, 2, 5, 4, 3}, .setup = setup_routing, CASE_FNS(dispatch)};
  cases[n++] = (gc_case){.name = "combine", .nin = 2, .in_n = {5 * 4 * 3, 10 * 2},
                         .out_n = 10 * 3, .d = {10, 2, 5, 4, 3}, .setup = setup_routing,
                         CASE_FNS(combine)};
  /* gelu, not relu: relu's kinks would need the inputs kept off zero
   * through a GEMM. */
  cases[n++] = (gc_case){.name = "moe layer gelu", .nin = 6,
                         .in_n = {6 * 4, 4 * 3, 3 * 4 * 5, 3 * 5, 3 * 5 * 4, 3 * 4},
                         .out_n = 6 * 4, .d = {6, 4, 5, 3, 2, 3, MOERT_ACT_GELU},
                         .setup = setup_moe, CASE_FNS(moe)};
  cases[n++] = (gc_case){.name = "moe layer swiglu", .nin = 6,
                         .in_n = {6 * 4, 4 * 3, 3 * 4 * 10, 3 * 10, 3 * 5 * 4, 3 * 4},
                         .out_n = 6 * 4, .d = {6, 4, 5, 3, 2, 3, MOERT_ACT_SWIGLU},
                         .setup = setup_moe, CASE_FNS(moe)};
  cases[n++] = (gc_case){.name = "embed", .nin = 1, .in_n = {3 * 4 * 2}, .in_acc = {true},
                         .out_n = 6 * 2, .d = {6, 3, 4, 2}, .setup = setup_embed,
                         CASE_FNS(embed)};
  cases[n++] = (gc_case){.name = "xent", .nin = 1, .in_n = {5 * 7}, .out_n = 1, .d = {5, 7},
                         .setup = setup_xent, CASE_FNS(xent)};
  cases[n++] = (gc_case){.name = "xent label smoothing 0.2", .nin = 1, .in_n = {5 * 7}, .out_n = 1,
                         .d = {5, 7}, .p = {0.2}, .setup = setup_xent, CASE_FNS(xent)};
  cases[n++] = (gc_case){.name = "mse", .nin = 2, .in_n = {9, 9}, .out_n = 1, .d = {9},
                         CASE_FNS(mse)};
  // clang-format on
  /* attention: causal and not; multi-head, grouped-query (H 4, KV 2) and
   * multi-query (KV 1); D 8 and 16; 2 or 3 sequences of 5 to 7 */
  attn_case(&cases[n++], "attn mha causal D8", 2, 7, 2, 2, 8, true, false);
  attn_case(&cases[n++], "attn mha D16", 2, 7, 2, 2, 16, false, false);
  attn_case(&cases[n++], "attn gqa 4/2 causal D16", 2, 7, 4, 2, 16, true, false);
  attn_case(&cases[n++], "attn gqa 4/2 D8", 3, 5, 4, 2, 8, false, false);
  attn_case(&cases[n++], "attn mqa 4/1 causal D8", 2, 7, 4, 1, 8, true, false);
  attn_case(&cases[n++], "attn mqa 4/1 D16", 2, 6, 4, 1, 16, false, false);
  attn_case(&cases[n++], "attn + rope gqa 4/2 causal D8", 2, 7, 4, 2, 8, true, true);
  attn_case(&cases[n++], "attn + rope mqa 3/1 D16", 2, 7, 3, 1, 16, false, true);
  rope_case(&cases[n++], "rope gqa 4/2 D8", 2, 7, 0, 4, 2, 8, 10000, false);
  rope_case(&cases[n++], "rope inverse at pos0 5, D16 base 100", 2, 7, 5, 2, 1, 16, 100, true);
  decode_case(&cases[n++], "attn_decode gqa 4/2 D8, 7 rows", 7, 4, 2, 8);
  decode_case(&cases[n++], "attn_decode mqa 4/1 D16, 6 rows", 6, 4, 1, 16);
  decode_case(&cases[n++], "attn_decode mha D8, 1 row", 1, 2, 2, 8);

  int before = failures;
  for (int i = 0; i < n; i++) {
    int f = failures;
    gc_run(&cases[i], 0x5eed0000u + (uint64_t)i);
    printf("%-4s gradient check: %s\n", failures == f ? "ok" : "FAIL", cases[i].name);
  }
  return failures - before;
}

/* --- GEMM against a double reference: odd shapes, padded strides, every
 * transpose, both implementations --- */

/* C[i, j] = alpha sum_p op(A)[i, p] op(B)[p, j] + beta C[i, j], in double. */
static void gemm_ref(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha,
                     const float *a, int64_t lda, const float *b, int64_t ldb, double beta,
                     double *c, int64_t ldc) {
  for (int64_t i = 0; i < m; i++)
    for (int64_t j = 0; j < n; j++) {
      double s = 0;
      for (int64_t p = 0; p < k; p++)
        s +=
            (double)(ta ? a[p * lda + i] : a[i * lda + p]) * (tb ? b[j * ldb + p] : b[p * ldb + j]);
      c[i * ldc + j] = alpha * s + (beta == 0 ? 0 : beta * c[i * ldc + j]);
    }
}

#define GEMM_PAD_SENTINEL 777.0

static void test_gemm_shapes(void) {
  static const int64_t shapes[][3] = {{1, 1, 1},      {3, 5, 7},      {17, 33, 9},
                                      {64, 64, 64},   {37, 129, 131}, {67, 131, 97},
                                      {130, 257, 33}, {5, 300, 2},    {33, 1, 260}};
  static const double betas[] = {0, 1, -0.5};
  rng r = {0x6e44};
  int cases = 0, before = failures;
  for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++)
    for (int tr = 0; tr < 4; tr++) {
      bool ta = tr & 1, tb = tr & 2;
      int64_t m = shapes[s][0], n = shapes[s][1], k = shapes[s][2];
      int64_t lda = (ta ? m : k) + rng_int(&r, 4), ldb = (tb ? k : n) + rng_int(&r, 4);
      int64_t ldc = n + rng_int(&r, 4);
      int64_t na = (ta ? k : m) * lda, nb = (tb ? n : k) * ldb, nc = m * ldc;
      double alpha = rng_nonzero(&r) * 2, beta = betas[cases % 3];
      float *a = xalloc(na, sizeof *a), *b = xalloc(nb, sizeof *b);
      float *c32 = xalloc(nc, sizeof *c32), *cblk = xalloc(nc, sizeof *cblk);
      double *c64 = xalloc(nc, sizeof *c64), *ref = xalloc(nc, sizeof *ref);
      double *a64 = xalloc(na, sizeof *a64), *b64 = xalloc(nb, sizeof *b64);
      for (int64_t i = 0; i < na; i++) a64[i] = a[i] = (float)rng_nonzero(&r);
      for (int64_t i = 0; i < nb; i++) b64[i] = b[i] = (float)rng_nonzero(&r);
      for (int64_t i = 0; i < nc; i++) {
        bool pad = i % ldc >= n;
        /* beta = 0: C is not read, so NaN there must not come through */
        double v = pad ? GEMM_PAD_SENTINEL : beta == 0 ? NAN : rng_nonzero(&r);
        c32[i] = cblk[i] = (float)v;
        c64[i] = ref[i] = v;
      }
      gemm_ref(ta, tb, m, n, k, (float)alpha, a, lda, b, ldb, (float)beta, ref, ldc);
      moert_cpu_gemm(ta, tb, m, n, k, (float)alpha, a, lda, b, ldb, (float)beta, c32, ldc);
      moert_blk_gemm(ta, tb, m, n, k, (float)alpha, a, lda, b, ldb, (float)beta, cblk, ldc);
      moert_f64_gemm(ta, tb, m, n, k, (float)alpha, a64, lda, b64, ldb, (float)beta, c64, ldc);
      char what[128];
      snprintf(what, sizeof what, "gemm %lldx%lldx%lld ta=%d tb=%d beta=%g: library", (long long)m,
               (long long)n, (long long)k, ta, tb, beta);
      check_f32(what, c32, ref, nc, 1e-5, 1e-6);
      snprintf(what, sizeof what, "gemm %lldx%lldx%lld ta=%d tb=%d beta=%g: blocked", (long long)m,
               (long long)n, (long long)k, ta, tb, beta);
      check_f32(what, cblk, ref, nc, 1e-5, 1e-6);
      snprintf(what, sizeof what, "gemm %lldx%lldx%lld ta=%d tb=%d beta=%g: double", (long long)m,
               (long long)n, (long long)k, ta, tb, beta);
      check_close(what, c64, ref, nc, 1e-12, 1e-12);
      double *lib = xalloc(nc, sizeof *lib);
      for (int64_t i = 0; i < nc; i++) lib[i] = c32[i];
      snprintf(what, sizeof what, "gemm %lldx%lldx%lld ta=%d tb=%d: blocked vs library",
               (long long)m, (long long)n, (long long)k, ta, tb);
      check_f32(what, cblk, lib, nc, 1e-5, 1e-6);
      free(lib);
      free(a);
      free(b);
      free(c32);
      free(cblk);
      free(c64);
      free(ref);
      free(a64);
      free(b64);
      cases++;
    }
  printf("%-4s gemm: %d shapes x transposes, library and blocked vs double\n",
         failures == before ? "ok" : "FAIL", cases);
}

static void test_gemm_edges(void) {
  int before = failures;
  float a[6] = {NAN, NAN, NAN, NAN, NAN, NAN}, b[6] = {1, 2, 3, 4, 5, 6};
  float c[4] = {1, 2, 3, 4};
  /* k = 0: C = beta C, A and B not read (NULL) */
  moert_cpu_gemm(false, false, 2, 2, 0, 1, NULL, 1, NULL, 2, 0.5, c, 2);
  check_f32("gemm k=0", c, (double[]){0.5, 1, 1.5, 2}, 4, 0, 0);
  moert_blk_gemm(false, false, 2, 2, 0, 1, NULL, 1, NULL, 2, 2, c, 2);
  check_f32("gemm k=0 (blocked)", c, (double[]){1, 2, 3, 4}, 4, 0, 0);
  /* alpha = 0: A is not read (NaN there must not come through) */
  moert_cpu_gemm(false, false, 2, 2, 3, 0, a, 3, b, 2, -1, c, 2);
  check_f32("gemm alpha=0", c, (double[]){-1, -2, -3, -4}, 4, 0, 0);
  /* m = 0 or n = 0: nothing is touched */
  moert_cpu_gemm(false, false, 0, 2, 3, 1, NULL, 3, NULL, 2, 0, NULL, 2);
  moert_cpu_gemm(true, true, 2, 0, 3, 1, NULL, 3, NULL, 2, 0, NULL, 2);
  /* batched, count 0 */
  moert_cpu_gemm_batched(false, false, 2, 2, 2, 1, NULL, 2, 4, NULL, 2, 4, 0, NULL, 2, 4, 0);
  /* a hand case: [1 2; 3 4] @ [5 6; 7 8] = [19 22; 43 50] */
  float x[4] = {1, 2, 3, 4}, y[4] = {5, 6, 7, 8}, z[4];
  moert_cpu_gemm(false, false, 2, 2, 2, 1, x, 2, y, 2, 0, z, 2);
  check_f32("gemm 2x2", z, (double[]){19, 22, 43, 50}, 4, 0, 0);
  moert_blk_gemm(true, true, 2, 2, 2, 1, x, 2, y, 2, 0, z, 2); /* x^T y^T = (y x)^T */
  check_f32("gemm 2x2 tt (blocked)", z, (double[]){23, 31, 34, 46}, 4, 0, 0);
  printf("%-4s gemm edges: k=0, alpha=0, empty, 2x2\n", failures == before ? "ok" : "FAIL");
}

static void test_gemm_batched(void) {
  int before = failures;
  rng r = {0xba7c};
  int64_t m = 9, n = 13, k = 7, count = 4;
  bool ta = true, tb = false;
  int64_t lda = m + 1, ldb = n + 2, ldc = n + 3;
  int64_t sa = k * lda + 5, sb = k * ldb + 1, sc = m * ldc + 2;
  float *a = xalloc(count * sa, sizeof *a), *b = xalloc(count * sb, sizeof *b);
  float *c = xalloc(count * sc, sizeof *c);
  double *ref = xalloc(count * sc, sizeof *ref);
  for (int64_t i = 0; i < count * sa; i++) a[i] = (float)rng_nonzero(&r);
  for (int64_t i = 0; i < count * sb; i++) b[i] = (float)rng_nonzero(&r);
  for (int64_t i = 0; i < count * sc; i++) ref[i] = c[i] = (float)rng_nonzero(&r);
  for (int64_t i = 0; i < count; i++)
    gemm_ref(ta, tb, m, n, k, 0.5, a + i * sa, lda, b + i * sb, ldb, 2, ref + i * sc, ldc);
  moert_cpu_gemm_batched(ta, tb, m, n, k, 0.5, a, lda, sa, b, ldb, sb, 2, c, ldc, sc, count);
  check_f32("gemm_batched vs double", c, ref, count * sc, 1e-5, 1e-6);
  free(a);
  free(b);
  free(c);
  free(ref);
  printf("%-4s gemm_batched: strided with gaps\n", failures == before ? "ok" : "FAIL");
}

/* moert_cpu_gemm_ex's epilogue (cpu_ops_typed.h), the numerical reference
 * of the cuda backend's cuBLASLt epilogues: C = act(alpha op(A) op(B) +
 * beta C + bias), aux = the pre-activation, against a double reference, with
 * gaps between rows and batches left untouched; fp32, then bf16 (each result
 * rounded once: within one bf16 step of the double reference). And relu's
 * backward at C equals it at aux, bit for bit (the executor takes it at C). */
static void test_gemm_epilogue(void) {
  int before = failures;
  rng r = {0xe915};
  int64_t m = 9, n = 13, k = 7, count = 3;
  for (int dt = 0; dt < 2; dt++) {
    bool bf = dt == 1;
    for (int act = 0; act < 3; act++)
      for (int t = 0; t < 4; t++) {
        bool ta = t & 1, tb = t & 2, packed = bf; /* bf16: packed C, as the executor's */
        int64_t lda = (ta ? m : k) + 1, ldb = (tb ? k : n) + 2, ldc = packed ? n : n + 3;
        int64_t sa = (ta ? k : m) * lda + 5, sb = (tb ? n : k) * ldb + 1, sc = m * ldc + (packed ? 0 : 2);
        int64_t sbias = n + 1;
        double alpha = 0.5, beta = t == 3 ? 0 : 0.75;
        float *a = xalloc(count * sa, sizeof *a), *b = xalloc(count * sb, sizeof *b);
        float *c = xalloc(count * sc, sizeof *c), *x = xalloc(count * sc, sizeof *x);
        float *bias = xalloc(count * sbias, sizeof *bias);
        double *pre = xalloc(count * sc, sizeof *pre), *want = xalloc(count * sc, sizeof *want);
        double *wantx = xalloc(count * sc, sizeof *wantx);
        /* bf16 data: values bf16 holds exactly, so the reference sees what the op sees */
#define VAL(v) (bf ? moert_bf16_to_f32(moert_f32_to_bf16((float)(v))) : (float)(v))
        for (int64_t i = 0; i < count * sa; i++) a[i] = VAL(rng_nonzero(&r));
        for (int64_t i = 0; i < count * sb; i++) b[i] = VAL(rng_nonzero(&r));
        for (int64_t i = 0; i < count * sbias; i++) bias[i] = VAL(rng_nonzero(&r));
        for (int64_t i = 0; i < count * sc; i++) {
          want[i] = pre[i] = c[i] = VAL(rng_nonzero(&r));
          wantx[i] = x[i] = VAL(GEMM_PAD_SENTINEL);
        }
#undef VAL
        for (int64_t z = 0; z < count; z++) {
          gemm_ref(ta, tb, m, n, k, alpha, a + z * sa, lda, b + z * sb, ldb, beta, pre + z * sc, ldc);
          for (int64_t i = 0; i < m; i++) {
            double *row = pre + z * sc + i * ldc;
            for (int64_t j = 0; j < n; j++) row[j] += bias[z * sbias + j];
            if (act) moert_f64_act_fwd(act == MOERT_EPI_RELU ? MOERT_ACT_RELU : MOERT_ACT_GELU, row,
                                       want + z * sc + i * ldc, n);
            else memcpy(want + z * sc + i * ldc, row, sizeof(double) * (size_t)n);
            memcpy(wantx + z * sc + i * ldc, row, sizeof(double) * (size_t)n);
          }
        }
        /* the op's operands in their type: bf16 copies of the same values */
        moert_dt ty = bf ? MOERT_BF16 : MOERT_F32;
        int64_t na = count * sa, nb = count * sb, nc = count * sc, nbias = count * sbias;
        void *ao = a, *bo = b, *co = c, *xo = x, *biaso = bias;
        if (bf) {
          ao = xalloc(na, 2), bo = xalloc(nb, 2), co = xalloc(nc, 2), xo = xalloc(nc, 2), biaso = xalloc(nbias, 2);
          moert_cpu_convert(ao, ty, a, MOERT_F32, na);
          moert_cpu_convert(bo, ty, b, MOERT_F32, nb);
          moert_cpu_convert(co, ty, c, MOERT_F32, nc);
          moert_cpu_convert(xo, ty, x, MOERT_F32, nc);
          moert_cpu_convert(biaso, ty, bias, MOERT_F32, nbias);
        }
        moert_gemm g = {.trans_a = ta, .trans_b = tb, .m = m, .n = n, .k = k, .count = count,
                        .alpha = (float)alpha, .beta = (float)beta, .a = ao, .b = bo, .ab_type = ty,
                        .lda = lda, .stride_a = sa, .ldb = ldb, .stride_b = sb, .c = co, .c_type = ty,
                        .ldc = ldc, .stride_c = sc, .bias = biaso, .stride_bias = sbias,
                        .act = (moert_epi)act, .aux = xo};
        moert_cpu_gemm_ex(&g);
        if (bf) {
          moert_cpu_convert(c, MOERT_F32, co, ty, nc);
          moert_cpu_convert(x, MOERT_F32, xo, ty, nc);
        }
        char what[96];
        double rtol = bf ? 1.0 / 256 : 1e-5, atol = bf ? 0 : 1e-6;
        snprintf(what, sizeof what, "gemm_ex %s%s%s%s: C", bf ? "bf16" : "fp32", ta ? " A^T" : "", tb ? " B^T" : "",
                 (const char *[]){"", " +bias", " +bias relu", " +bias gelu"}[act + 1]);
        check_f32(what, c, want, nc, rtol, atol);
        snprintf(what + strlen(what) - 1, sizeof what - strlen(what) + 1, "aux");
        check_f32(what, x, wantx, nc, rtol, atol);
        if (act == MOERT_EPI_RELU) { /* relu' at C is relu' at the pre-activation */
          float *da = xalloc(nc, sizeof *da), *d1 = xalloc(nc, sizeof *d1), *d2 = xalloc(nc, sizeof *d2);
          for (int64_t i = 0; i < nc; i++) da[i] = (float)rng_nonzero(&r);
          moert_cpu_act_bwd(MOERT_ACT_RELU, c, da, d1, nc);
          moert_cpu_act_bwd(MOERT_ACT_RELU, x, da, d2, nc);
          int64_t differ = 0; /* over the rows (the gaps hold different garbage) */
          for (int64_t z = 0; z < count; z++)
            for (int64_t i = 0; i < m; i++)
              differ += memcmp(d1 + z * sc + i * ldc, d2 + z * sc + i * ldc, sizeof(float) * (size_t)n) != 0;
          if (differ) fail("%s: relu backward at C differs from at aux in %lld rows", what, (long long)differ);
          free(da), free(d1), free(d2);
        }
        if (bf) free(ao), free(bo), free(co), free(xo), free(biaso);
        free(a), free(b), free(c), free(x), free(bias), free(pre), free(want), free(wantx);
      }
  }
  /* without aux nor bias, the epilogue alone: relu of alpha A B */
  float a1[] = {1, -2}, b1[] = {3, 4}, c1[4] = {9, 9, 9, 9};
  moert_gemm g1 = {.m = 2, .n = 2, .k = 1, .count = 1, .alpha = 1, .a = a1, .b = b1, .ab_type = MOERT_F32,
                   .lda = 1, .ldb = 2, .c = c1, .c_type = MOERT_F32, .ldc = 2, .act = MOERT_EPI_RELU};
  moert_cpu_gemm_ex(&g1);
  check_f32("gemm_ex relu, no bias, no aux", c1, (double[]){3, 4, 0, 0}, 4, 0, 0);
  printf("%-4s gemm_ex epilogues: bias, relu, gelu, aux; fp32 and bf16\n", failures == before ? "ok" : "FAIL");
}

/* --- forward values against closed forms (the gradient checks only show
 * that a backward matches its forward) --- */

static void test_forward_values(void) {
  int before = failures;
  {
    float h[] = {-1, 2, 1, -1, -2, -50, 50, -10};
    float a[8];
    moert_cpu_act_fwd(MOERT_ACT_RELU, h, a, 2);
    check_f32("relu", a, (double[]){0, 2}, 2, 0, 0);
    moert_cpu_act_fwd(MOERT_ACT_GELU, h + 2, a, 2);
    check_f32("gelu (tanh form)", a, (double[]){0.8411919906082768, -0.15880800939172324}, 2, 1e-6,
              0);
    moert_cpu_act_fwd(MOERT_ACT_SILU, h + 2, a, 6);
    check_f32("silu", a,
              (double[]){0.7310585786300049, -0.2689414213699951, -0.23840584404423515,
                         -50 / (1 + exp(50.0)), 50 / (1 + exp(-50.0)), -10 / (1 + exp(10.0))},
              6, 1e-6, 0);
    float dh[2], da[2] = {1, 1};
    moert_cpu_act_bwd(MOERT_ACT_RELU, h, da, dh, 2);
    check_f32("relu'", dh, (double[]){0, 1}, 2, 0, 0);
    float hs[] = {1, 2}, as[1];
    moert_cpu_swiglu_fwd(hs, as, 1, 1);
    check_f32("swiglu", as, (double[]){2 * 0.7310585786300049}, 1, 1e-6, 0);
  }
  {
    /* offset 1e4: a one-pass E[x^2] - E[x]^2 in float would lose it all */
    float x[] = {1, 2, 3, 10001, 10002, 10003}, g[] = {2, 2, 2}, b[] = {1, 1, 1};
    float y[6], mean[2], rstd[2];
    double s = 1.224744871391589; /* 1 / sqrt(2/3) */
    moert_cpu_layernorm_fwd(x, g, b, y, mean, rstd, 2, 3, 0);
    check_f32("layernorm y", y, (double[]){1 - 2 * s, 1, 1 + 2 * s, 1 - 2 * s, 1, 1 + 2 * s}, 6,
              1e-6, 0);
    check_f32("layernorm mean", mean, (double[]){2, 10002}, 2, 0, 0);
    check_f32("layernorm rstd", rstd, (double[]){s, s}, 2, 1e-6, 0);
    float xr[] = {3, 4}, gr[] = {1, 2}, yr[2], rr[1];
    moert_cpu_rmsnorm_fwd(xr, gr, yr, rr, 1, 2, 0);
    check_f32("rmsnorm y", yr, (double[]){3 / sqrt(12.5), 8 / sqrt(12.5)}, 2, 1e-6, 0);
    check_f32("rmsnorm rstd", rr, (double[]){1 / sqrt(12.5)}, 1, 1e-6, 0);
  }
  {
    float x[] = {3, 4, 0, 0}, y[4], norm[2], dy[] = {1, 1, 1, -1}, dx[4];
    moert_cpu_l2norm_rows_fwd(x, y, norm, 2, 2);
    check_f32("l2norm rows y (a zero row stays 0)", y, (double[]){0.6, 0.8, 0, 0}, 4, 1e-7, 0);
    check_f32("l2norm rows norm", norm, (double[]){5, 0}, 2, 0, 0);
    moert_cpu_l2norm_rows_bwd(x, norm, dy, dx, 2, 2);
    /* row 0: (dy - y <dy, y>) / n; row 1 (below the floor): dy / 1e-12 */
    check_f32("l2norm rows dx", dx,
              (double[]){(1 - 0.6 * 1.4) / 5, (1 - 0.8 * 1.4) / 5, 1e12, -1e12}, 4, 1e-6, 0);
    float xc[] = {3, 0, 4, 0}, yc[4], nc[2], dyc[] = {1, 1, 1, -1}, dxc[4];
    moert_cpu_l2norm_cols_fwd(xc, yc, nc, 2, 2);
    check_f32("l2norm cols y (a zero column stays 0)", yc, (double[]){0.6, 0, 0.8, 0}, 4, 1e-7, 0);
    check_f32("l2norm cols norm", nc, (double[]){5, 0}, 2, 0, 0);
    moert_cpu_l2norm_cols_bwd(xc, nc, dyc, dxc, 2, 2);
    check_f32("l2norm cols dx", dxc,
              (double[]){(1 - 0.6 * 1.4) / 5, 1e12, (1 - 0.8 * 1.4) / 5, -1e12}, 4, 1e-6, 0);
  }
  {
    float s[] = {0.25, 0.75}, ds[] = {1, 3}, dl[2];
    moert_cpu_softmax_bwd(s, ds, dl, 1, 2); /* sum ds s = 2.5 */
    check_f32("softmax_bwd", dl, (double[]){0.25 * -1.5, 0.75 * 0.5}, 2, 1e-7, 0);
  }
  printf("%-4s forward values: activations, norms, l2norm floor, softmax_bwd\n",
         failures == before ? "ok" : "FAIL");
}

/* --- routing: exact, on hand-computed cases --- */

static void test_topk(void) {
  int before = failures;
  float scores[16], topv[16];
  int32_t idx[16];
  {
    const float l[] = {1, 3, 3, 2};
    moert_cpu_gate_topk(l, NULL, scores, idx, topv, 1, 4, 2);
    check_i32("topk: a tie goes to the lower index", idx, (int32_t[]){1, 2}, 2);
    if (topv[0] != topv[1]) fail("topk: equal logits gave unequal scores %g %g", topv[0], topv[1]);
    moert_cpu_gate_topk(l, NULL, scores, idx, topv, 1, 4, 4);
    check_i32("topk: k = E sorts", idx, (int32_t[]){1, 2, 3, 0}, 4);
    check_f32("topk: topv are the chosen scores", topv,
              (double[]){scores[1], scores[2], scores[3], scores[0]}, 4, 0, 0);
  }
  {
    const float l[] = {0.5, 2, -1, 2, 7, 0, 0, 0, 0, 0, -1, -2, -3, -4, 5};
    moert_cpu_gate_topk(l, NULL, scores, idx, topv, 3, 5, 3);
    check_i32("topk: 3 tokens, descending, ties low first", idx,
              (int32_t[]){4, 1, 3, 0, 1, 2, 4, 0, 1}, 9);
    check_f32("topk: equal logits, equal scores", scores + 5, (double[]){0.2, 0.2, 0.2, 0.2, 0.2},
              5, 1e-7, 0);
  }
  {
    const float l[] = {0, 1.0986122886681098f}; /* ln 3 */
    moert_cpu_gate_topk(l, NULL, scores, idx, topv, 1, 2, 1);
    check_f32("topk: softmax values", scores, (double[]){0.25, 0.75}, 2, 1e-7, 0);
    check_i32("topk: top-1", idx, (int32_t[]){1}, 1);
  }
  {
    const float l[] = {0, 0, 0, 1, 0}, noise[] = {0, 1, 0, 0, 2};
    moert_cpu_gate_topk(l, noise, scores, idx, topv, 1, 3, 1);
    check_i32("topk: noise decides", idx, (int32_t[]){1}, 1);
    double e = exp(1.0);
    check_f32("topk: softmax of logits + noise", scores,
              (double[]){1 / (e + 2), e / (e + 2), 1 / (e + 2)}, 3, 1e-6, 0);
    moert_cpu_gate_topk(l + 3, noise + 3, scores, idx, topv, 1, 2, 1);
    check_i32("topk: noise overturns the logits", idx, (int32_t[]){1}, 1);
  }
  {
    const float l[] = {1000, 0, -1000};
    moert_cpu_gate_topk(l, NULL, scores, idx, topv, 1, 3, 3);
    check_f32("topk: large logits (max subtracted)", scores, (double[]){1, 0, 0}, 3, 0, 1e-30);
    check_i32("topk: large logits", idx, (int32_t[]){0, 1, 2}, 3);
  }
  {
    const float l[] = {NAN, 1, 2, 0};
    moert_cpu_gate_topk(l, NULL, scores, idx, topv, 1, 4, 4);
    bool seen[4] = {0}, ok = true;
    for (int j = 0; j < 4; j++) {
      ok &= idx[j] >= 0 && idx[j] < 4 && !seen[idx[j] & 3];
      if (idx[j] >= 0 && idx[j] < 4) seen[idx[j]] = true;
    }
    if (!ok)
      fail("topk: a NaN logit gave indices %d %d %d %d, not a permutation", idx[0], idx[1], idx[2],
           idx[3]);
  }
  printf("%-4s gate_topk: ties, order, noise, softmax values, large logits, NaN\n",
         failures == before ? "ok" : "FAIL");
}

static void test_locations(void) {
  int before = failures;
  /* 4 tokens, 3 experts, k = 2 */
  const int32_t idx[] = {0, 1, 1, 0, 0, 2, 0, 1};
  int32_t loc[8], counts[3];
  moert_cpu_gate_locations(idx, NULL, loc, counts, 4, 3, 2);
  /* choice 0: t0->e0:0 t1->e1:0 t2->e0:1 t3->e0:2; then choice 1:
   * t0->e1:1 t1->e0:3 t2->e2:0 t3->e1:2 */
  check_i32("locations: all choice-0 claims before choice-1", loc,
            (int32_t[]){0, 1, 0, 3, 1, 0, 2, 2}, 8);
  check_i32("locations: counts", counts, (int32_t[]){4, 3, 1}, 3);
  const int32_t order[] = {2, 0, 3, 1};
  moert_cpu_gate_locations(idx, order, loc, counts, 4, 3, 2);
  /* choice 0 in order 2,0,3,1: t2->e0:0 t0->e0:1 t3->e0:2 t1->e1:0; choice 1:
   * t2->e2:0 t0->e1:1 t3->e1:2 t1->e0:3 */
  check_i32("locations: in priority order", loc, (int32_t[]){1, 1, 0, 3, 0, 0, 2, 2}, 8);
  check_i32("locations: counts (ordered)", counts, (int32_t[]){4, 3, 1}, 3);
  printf("%-4s gate_locations: choice-major counting, priority order\n",
         failures == before ? "ok" : "FAIL");
}

static void test_priority_order(void) {
  int before = failures;
  /* topv[t*k + 0] decides; ties keep token order */
  const float topv[] = {0.5f, 0.1f, 0.9f, 0.05f, 0.5f, 0.2f, 0.7f, 0.1f, 0.9f, 0.0f};
  int32_t order[5];
  moert_cpu_gate_priority_order(topv, order, 5, 2);
  check_i32("priority order: by top score, stable", order, (int32_t[]){1, 4, 3, 0, 2}, 5);
  /* many ties, against an insertion sort */
  enum { T = 517 };
  rng r = {0x0bde};
  float *v = xalloc(T, sizeof *v);
  int32_t *got = xalloc(T, sizeof *got), *want = xalloc(T, sizeof *want);
  for (int t = 0; t < T; t++) v[t] = (float)(rng_int(&r, 7) * 0.125);
  v[3] = v[100] = NAN;          /* NaN ranks last */
  for (int t = 0; t < T; t++) { /* t ranks before an earlier token only by a larger value */
    int i = t;
    while (i > 0 && !isnan(v[t]) && (isnan(v[want[i - 1]]) || v[t] > v[want[i - 1]])) {
      want[i] = want[i - 1];
      i--;
    }
    want[i] = t;
  }
  moert_cpu_gate_priority_order(v, got, T, 1);
  check_i32("priority order: 517 tokens, 7 values and NaN", got, want, T);
  free(v);
  free(got);
  free(want);
  printf("%-4s gate_priority_order: descending, stable, NaN last\n",
         failures == before ? "ok" : "FAIL");
}

/* Batch-prioritized routing end to end: 4 tokens, 1 expert, capacity 2. */
static void test_priority_capacity(void) {
  int before = failures;
  float topv[4] = {0.2f, 0.9f, 0.5f, 0.7f};
  int32_t idx[4] = {0, 0, 0, 0}, order[4], loc[4], counts[1];
  moert_cpu_gate_priority_order(topv, order, 4, 1);
  check_i32("priority routing: order", order, (int32_t[]){1, 3, 2, 0}, 4);
  moert_cpu_gate_locations(idx, order, loc, counts, 4, 1, 1);
  check_i32("priority routing: loc", loc, (int32_t[]){3, 0, 2, 1}, 4);
  float x[] = {1, 2, 3, 4, 5, 6, 7, 8}, buf[4], gate[4] = {1, 1, 1, 1}, y[8];
  for (int i = 0; i < 4; i++) buf[i] = NAN;
  moert_cpu_dispatch(x, idx, loc, buf, 4, 1, 1, 2, 2);
  check_f32("priority routing: the two best tokens are kept", buf, (double[]){3, 4, 7, 8}, 4, 0, 0);
  for (int i = 0; i < 8; i++) y[i] = NAN;
  moert_cpu_combine(buf, idx, loc, gate, y, 4, 1, 1, 2, 2);
  check_f32("priority routing: dropped tokens get 0", y, (double[]){0, 0, 3, 4, 0, 0, 7, 8}, 8, 0,
            0);
  printf("%-4s batch-prioritized routing with capacity drops\n",
         failures == before ? "ok" : "FAIL");
}

static void test_dispatch_combine(void) {
  int before = failures;
  /* T = 4, k = 2, E = 3, C = 2, dim = 2 */
  const int32_t idx[] = {0, 1, 0, 1, 1, 0, 0, 1};
  int32_t loc[8], counts[3];
  moert_cpu_gate_locations(idx, NULL, loc, counts, 4, 3, 2);
  check_i32("dispatch case: loc", loc, (int32_t[]){0, 1, 1, 2, 0, 3, 2, 3}, 8);
  /* kept (loc < 2): (t0,0)->e0s0 (t0,1)->e1s1 (t1,0)->e0s1 (t2,0)->e1s0;
   * dropped: (t1,1) (t2,1) (t3,0) (t3,1); expert 2 is all padding */
  const float x[] = {1, 2, 3, 4, 5, 6, 7, 8};
  float buf[12];
  for (int i = 0; i < 12; i++) buf[i] = NAN;
  moert_cpu_dispatch(x, idx, loc, buf, 4, 2, 3, 2, 2);
  check_f32("dispatch: kept slots filled, the rest zero", buf,
            (double[]){1, 2, 3, 4, 5, 6, 1, 2, 0, 0, 0, 0}, 12, 0, 0);
  const float eb[] = {1, -1, 2, -2, 11, -11, 12, -12, 21, -21, 22, -22};
  const float gate[] = {0.5f, 0.25f, 0.75f, 0.125f, 1, 0.5f, 0.5f, 0.5f};
  float y[8];
  for (int i = 0; i < 8; i++) y[i] = NAN;
  moert_cpu_combine(eb, idx, loc, gate, y, 4, 2, 3, 2, 2);
  check_f32("combine: gate-weighted kept slots; a token with none gets 0", y,
            (double[]){3.5, -3.5, 1.5, -1.5, 11, -11, 0, 0}, 8, 0, 0);
  const float dy[] = {1, 2, 3, 4, 5, 6, 7, 8};
  float dbuf[12], dgate[8];
  for (int i = 0; i < 12; i++) dbuf[i] = NAN;
  for (int i = 0; i < 8; i++) dgate[i] = NAN;
  moert_cpu_combine_bwd(dy, eb, idx, loc, gate, dbuf, dgate, 4, 2, 3, 2, 2);
  check_f32("combine_bwd: dbuf", dbuf, (double[]){0.5, 1, 2.25, 3, 5, 6, 0.25, 0.5, 0, 0, 0, 0}, 12,
            0, 0);
  check_f32("combine_bwd: dgate (0 for dropped)", dgate, (double[]){-1, -12, -2, 0, -11, 0, 0, 0},
            8, 0, 0);
  float dx[8];
  for (int i = 0; i < 8; i++) dx[i] = NAN;
  moert_cpu_dispatch_bwd(eb, idx, loc, dx, 4, 2, 3, 2, 2);
  check_f32("dispatch_bwd: sum of kept slots", dx, (double[]){13, -13, 2, -2, 11, -11, 0, 0}, 8, 0,
            0);
  printf("%-4s dispatch/combine: capacity drops, padding, dropped tokens\n",
         failures == before ? "ok" : "FAIL");
}

static void test_gate_stats_aux(void) {
  int before = failures;
  const float scores[] = {0.5f, 0.3f, 0.2f, 0.1f, 0.6f, 0.3f, 0.2f, 0.2f, 0.6f};
  const int32_t idx[] = {0, 1, 0, 2, 2, 1}; /* choice 0: e0 e0 e2; choice 1: e1 e2 e1 */
  float ssum[3] = {1, 1, 1}, cnt[3] = {2, 0, 0};
  moert_cpu_gate_stats(scores, idx, ssum, cnt, 3, 3, 2);
  check_f32("gate_stats: score sums accumulate", ssum, (double[]){1.8, 2.1, 2.1}, 3, 1e-7, 0);
  check_f32("gate_stats: top-1 counts accumulate (choice 0 only)", cnt, (double[]){4, 0, 1}, 3, 0,
            0);
  float coef[2];
  float balanced = moert_cpu_aux_loss((float[]){3, 1}, (float[]){2, 2}, coef, 2, 4);
  check_f32("aux loss: E sum me ce", &balanced, (double[]){1}, 1, 1e-7, 0);
  check_f32("aux loss: coef = E ce / N", coef, (double[]){0.25, 0.25}, 2, 1e-7, 0);
  float skewed = moert_cpu_aux_loss((float[]){4, 0}, (float[]){4, 0}, coef, 2, 4);
  check_f32("aux loss: all on one expert = E", &skewed, (double[]){2}, 1, 1e-7, 0);
  check_f32("aux loss: coef (skewed)", coef, (double[]){0.5, 0}, 2, 1e-7, 0);
  float nocoef = moert_cpu_aux_loss((float[]){3, 1}, (float[]){2, 2}, NULL, 2, 4);
  check_f32("aux loss: coef may be NULL", &nocoef, (double[]){1}, 1, 1e-7, 0);

  const int32_t sidx[] = {2, 0, 1, 2};
  const float dtopv[] = {1, 2, 3, 4}, scoef[] = {0.1f, 0.2f, 0.3f};
  float ds[6];
  for (int i = 0; i < 6; i++) ds[i] = 100;
  moert_cpu_gate_scores_bwd(sidx, dtopv, scoef, 10, ds, 2, 3, 2);
  check_f32("gate_scores_bwd: scatter + weight coef, accumulated", ds,
            (double[]){103, 102, 104, 101, 105, 107}, 6, 1e-7, 0);
  moert_cpu_gate_scores_bwd(sidx, dtopv, NULL, 10, ds, 2, 3, 2);
  check_f32("gate_scores_bwd: no coef", ds, (double[]){105, 102, 105, 101, 108, 111}, 6, 1e-7, 0);

  const float tv[] = {0.5f, 0.25f, 0, 0};
  float g[4], dtv[4];
  moert_cpu_gate_normalize(tv, g, 2, 2, true);
  check_f32("gate_normalize: by the sum; a zero sum stays finite", g,
            (double[]){2.0 / 3, 1.0 / 3, 0, 0}, 4, 1e-7, 0);
  moert_cpu_gate_normalize(tv, g, 2, 2, false);
  check_f32("gate_normalize off: a copy", g, (double[]){0.5, 0.25, 0, 0}, 4, 0, 0);
  moert_cpu_gate_normalize_bwd(tv, (float[]){1, 0, 1, 1}, dtv, 2, 2, true);
  /* s = 0.75: dv_i = dg_i / s - (sum dg v) / s^2 = dg_i/0.75 - 0.5/0.5625; zero sum: dg / 1e-9 */
  check_f32("gate_normalize_bwd", dtv, (double[]){1 / 0.75 - 0.5 / 0.5625, -0.5 / 0.5625, 1e9, 1e9},
            4, 1e-6, 0);
  printf("%-4s gate_stats, aux loss, gate_scores_bwd, gate_normalize: exact\n",
         failures == before ? "ok" : "FAIL");
}

/* --- embedding, losses --- */

static void test_embed_losses(void) {
  int before = failures;
  /* context 2, vocab 3, dim 2: table[c][v] = (10c + v + 1) * (1, -1) */
  float table[12];
  for (int c = 0; c < 2; c++)
    for (int v = 0; v < 3; v++) {
      table[(c * 3 + v) * 2] = (float)(10 * c + v + 1);
      table[(c * 3 + v) * 2 + 1] = (float)-(10 * c + v + 1);
    }
  const int32_t win[] = {0, 2, -1, 1, -1, -1, 2, 2};
  float x[8];
  for (int i = 0; i < 8; i++) x[i] = NAN;
  moert_cpu_embed_fwd(table, win, x, 4, 2, 3, 2);
  check_f32("embed: sum over the window, -1 skipped", x,
            (double[]){14, -14, 12, -12, 0, 0, 16, -16}, 8, 0, 0);
  const float dx[] = {1, 2, 3, 4, 5, 6, 7, 8};
  float dt[12];
  for (int i = 0; i < 12; i++) dt[i] = 0.5f;
  moert_cpu_embed_bwd(dx, win, dt, 4, 2, 3, 2);
  check_f32("embed_bwd: accumulated, repeats summed", dt,
            (double[]){1.5, 2.5, 0.5, 0.5, 7.5, 8.5, 0.5, 0.5, 3.5, 4.5, 8.5, 10.5}, 12, 0, 0);

  const float logits[] = {0, 0, 0, 1000, 0, -1000, 5, 6, 7};
  const int32_t tgt[] = {0, 1, -1};
  float dl[9];
  for (int i = 0; i < 9; i++) dl[i] = NAN;
  double loss = moert_cpu_xent(logits, tgt, dl, 3, 3, 0.5f, 0);
  double want = log(3.0) + 1000;
  if (!(fabs(loss - want) <= 1e-9 * want))
    fail("xent: loss %.12g, want %.12g (ln 3 + 1000; the -1 row ignored)", loss, want);
  check_f32("xent: dlogits = scale (softmax - onehot); ignored row 0", dl,
            (double[]){0.5 * (1.0 / 3 - 1), 0.5 / 3, 0.5 / 3, 0.5, -0.5, 0, 0, 0, 0}, 9, 1e-7, 0);
  double loss2 = moert_cpu_xent(logits, tgt, NULL, 3, 3, 1, 0);
  if (loss2 != loss) fail("xent: loss without dlogits %.12g != %.12g", loss2, loss);
  /* smoothing 0.3 over 3 words: the target 0.7 + 0.1, the others 0.1; the
   * loss returned stays the plain cross-entropy */
  for (int i = 0; i < 9; i++) dl[i] = NAN;
  double loss3 = moert_cpu_xent(logits, tgt, dl, 3, 3, 0.5f, 0.3f);
  if (loss3 != loss) fail("xent: the loss with smoothing %.12g != the plain one %.12g", loss3, loss);
  check_f32("xent: dlogits = scale (softmax - ((1 - eps) onehot + eps / V)); ignored row 0", dl,
            (double[]){0.5 * (1.0 / 3 - 0.8), 0.5 * (1.0 / 3 - 0.1), 0.5 * (1.0 / 3 - 0.1), 0.5 * (1 - 0.1),
                       0.5 * (0 - 0.8), 0.5 * (0 - 0.1), 0, 0, 0},
            9, 1e-7, 0);

  const float yhat[] = {1, 2, 3}, yy[] = {0, 4, 3};
  float dyh[3];
  double m = moert_cpu_mse(yhat, yy, dyh, 3, 0.5f);
  if (m != 5) fail("mse: %g, want 5", m);
  check_f32("mse: dyhat = scale 2 (yhat - y)", dyh, (double[]){1, -2, 0}, 3, 0, 0);
  printf("%-4s embed, xent, mse: exact\n", failures == before ? "ok" : "FAIL");
}

/* --- optimizers against a double reference --- */

static void test_optimizers(void) {
  int before = failures;
  enum { N = 37, STEPS = 5 };
  rng r = {0x0971};
  float p[N], m[N], v[N], g[N], ps[N];
  uint16_t low[N], lows[N];
  double rp[N], rm[N], rv[N], rps[N];
  const float lr = 0.01f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, wd = 0.1f;
  for (int i = 0; i < N; i++) {
    rp[i] = p[i] = (float)rng_nonzero(&r);
    rps[i] = ps[i] = p[i];
    m[i] = v[i] = 0;
    rm[i] = rv[i] = 0;
  }
  for (int step = 1; step <= STEPS; step++) {
    for (int i = 0; i < N; i++) g[i] = (float)(rng_nonzero(&r) * (i % 5 == 0 ? 1e-3 : 1));
    /* the bf16 copy written in the same pass on odd steps (the last one is odd) */
    /* the gradient scaled by gscale (clipping) on even steps */
    const float gs = 0.37f, *gsp = step % 2 ? NULL : &gs;
    moert_cpu_adamw(p, g, m, v, N, lr, b1, b2, eps, wd, step, gsp, step % 2 ? low : NULL);
    moert_cpu_sgd(ps, g, N, lr, wd, gsp, step % 2 ? lows : NULL);
    if (gsp)
      for (int i = 0; i < N; i++) g[i] *= gs; /* the reference's gradient: as the scale op would make it */
    for (int i = 0; i < N; i++) {
      rm[i] = b1 * rm[i] + (1 - (double)b1) * g[i];
      rv[i] = b2 * rv[i] + (1 - (double)b2) * g[i] * g[i];
      double mhat = rm[i] / (1 - pow(b1, step)), vhat = rv[i] / (1 - pow(b2, step));
      rp[i] -= lr * (mhat / (sqrt(vhat) + eps) + wd * rp[i]);
      rps[i] -= lr * (g[i] + wd * rps[i]);
    }
  }
  check_f32("adamw: p after 5 steps", p, rp, N, 1e-5, 0);
  check_f32("adamw: m", m, rm, N, 1e-5, 0);
  check_f32("adamw: v", v, rv, N, 1e-5, 0);
  check_f32("sgd: p after 5 steps", ps, rps, N, 1e-6, 0);
  for (int i = 0; i < N; i++) {
    float lp = moert_bf16_to_f32(low[i]), ls = moert_bf16_to_f32(lows[i]);
    if (low[i] != moert_f32_to_bf16(p[i]) || !(fabs(lp - p[i]) <= 0x1p-8 * fabs(p[i])))
      fail("adamw's bf16 copy [%d]: %g (0x%04x) of %g", i, lp, low[i], p[i]);
    if (lows[i] != moert_f32_to_bf16(ps[i]) || !(fabs(ls - ps[i]) <= 0x1p-8 * fabs(ps[i])))
      fail("sgd's bf16 copy [%d]: %g (0x%04x) of %g", i, ls, lows[i], ps[i]);
  }

  /* the norm left on the device: parts, two floats, the clipping factor */
  {
    double part[3] = {0.1, 2.0, 1e-9}, norm = 0;
    float hilo[2], factor = 0;
    moert_cpu_sumsq_to((const float[]){3, 4}, 2, &part[0]); /* 25 */
    moert_cpu_norm_split(part + 1, 2, hilo);
    double own = (double)hilo[0] + hilo[1];
    if (!(fabs(own - (2.0 + 1e-9)) <= 1e-15) || hilo[1] == 0)
      fail("norm_split: %.17g + %.17g, want 2.000000001", (double)hilo[0], (double)hilo[1]);
    moert_cpu_clip_factor(part, 1, hilo, 1.0, &norm, &factor);
    double want = sqrt(25 + 2.0 + 1e-9);
    if (!(fabs(norm - want) <= 1e-14 * want) || factor != (float)(1.0 / want))
      fail("clip_factor: norm %.17g factor %.9g, want %.17g and %.9g", norm, (double)factor, want, 1.0 / want);
    moert_cpu_clip_factor(part, 1, hilo, 0, &norm, &factor);
    if (factor != 1) fail("clip_factor without a clip: %g, want 1", (double)factor);
    moert_cpu_clip_factor(part, 1, hilo, 100, &norm, &factor);
    if (factor != 1) fail("clip_factor under the clip: %g, want 1", (double)factor);
  }
  float x[] = {1, -2, 3};
  if (moert_cpu_sumsq(x, 3) != 14) fail("sumsq: %g, want 14", moert_cpu_sumsq(x, 3));
  moert_cpu_scale(x, 3, 0.5f);
  check_f32("scale", x, (double[]){0.5, -1, 1.5}, 3, 0, 0);
  enum { BIG = 1 << 20 };
  float *big = xalloc(BIG, sizeof *big);
  for (int i = 0; i < BIG; i++) big[i] = 0.1f;
  double want = (double)BIG * (double)0.1f * (double)0.1f, got = moert_cpu_sumsq(big, BIG);
  if (!(fabs(got - want) <= 1e-10 * want))
    fail("sumsq of 2^20 x 0.1: %.15g, want %.15g", got, want);
  free(big);
  printf("%-4s adamw, sgd vs double, gscale, their bf16 copies; sumsq, the norm on the device, scale\n", failures == before ? "ok" : "FAIL");
}

/* --- attention: forward values against a plain reference, RoPE's
 * properties, the decode op against the forward, the bf16 forms (the
 * gradient checks show only that a backward matches its forward: a wrong
 * mask or kv head in both would pass them) --- */

/* o and lse of attention written plainly in double from the float qkv: for
 * each sequence s, query head h and position i, the scores of query
 * (s, i, h) against the keys of kv head h / (H / KV) at positions 0..i
 * (causal) or 0..seq-1, softmax, the weighted sum of their values. */
static void attn_ref(const float *qkv, double *o, double *lse, int64_t nseq, int64_t seq, int64_t H,
                     int64_t KV, int64_t D, bool causal) {
  int64_t W = (H + 2 * KV) * D;
  double *sc = xalloc(seq, sizeof *sc);
  for (int64_t s = 0; s < nseq; s++)
    for (int64_t i = 0; i < seq; i++)
      for (int64_t h = 0; h < H; h++) {
        int64_t g = h / (H / KV), n = causal ? i + 1 : seq;
        const float *q = qkv + (s * seq + i) * W + h * D;
        double mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j < n; j++) {
          const float *k = qkv + (s * seq + j) * W + (H + g) * D;
          double x = 0;
          for (int64_t d = 0; d < D; d++) x += (double)q[d] * k[d];
          sc[j] = x / sqrt((double)D);
          if (sc[j] > mx) mx = sc[j];
        }
        for (int64_t j = 0; j < n; j++) sum += exp(sc[j] - mx);
        double *orow = o + (s * seq + i) * H * D + h * D;
        for (int64_t d = 0; d < D; d++) orow[d] = 0;
        for (int64_t j = 0; j < n; j++) {
          const float *v = qkv + (s * seq + j) * W + (H + KV + g) * D;
          for (int64_t d = 0; d < D; d++) orow[d] += exp(sc[j] - mx) / sum * v[d];
        }
        lse[(s * H + h) * seq + i] = mx + log(sum);
      }
  free(sc);
}

static float *random_floats(rng *r, int64_t n) {
  float *x = xalloc(n, sizeof *x);
  for (int64_t i = 0; i < n; i++) x[i] = (float)rng_range(r, -1.5, 1.5);
  return x;
}

static void test_attn_values(void) {
  int before = failures;
  static const struct { int64_t nseq, seq, H, KV, D; bool causal; } cs[] = {
      {2, 7, 2, 2, 8, true}, {2, 7, 4, 2, 16, true}, {3, 5, 4, 2, 8, false}, {2, 7, 4, 1, 8, true},
      {1, 9, 6, 3, 16, false}, {2, 1, 2, 1, 8, true}};
  rng r = {0xa77e};
  for (size_t k = 0; k < sizeof cs / sizeof *cs; k++) {
    int64_t nseq = cs[k].nseq, seq = cs[k].seq, H = cs[k].H, KV = cs[k].KV, D = cs[k].D, T = nseq * seq;
    int64_t W = (H + 2 * KV) * D;
    float *qkv = random_floats(&r, T * W), *o = xalloc(T * H * D, sizeof *o), *lse = xalloc(T * H, sizeof *lse);
    double *wo = xalloc(T * H * D, sizeof *wo), *wl = xalloc(T * H, sizeof *wl);
    for (int64_t i = 0; i < T * H * D; i++) o[i] = NAN;
    for (int64_t i = 0; i < T * H; i++) lse[i] = NAN;
    attn_ref(qkv, wo, wl, nseq, seq, H, KV, D, cs[k].causal);
    moert_cpu_attn_fwd(qkv, o, lse, nseq, seq, H, KV, D, cs[k].causal);
    char what[128];
    for (int part = 0; part < 2; part++) {
      snprintf(what, sizeof what, "attn_fwd %lldx%lld H %lld KV %lld D %lld%s: %s vs the plain reference",
               (long long)nseq, (long long)seq, (long long)H, (long long)KV, (long long)D,
               cs[k].causal ? " causal" : "", part ? "lse" : "o");
      if (part) check_f32(what, lse, wl, T * H, 1e-6, 1e-7);
      else check_f32(what, o, wo, T * H * D, 1e-6, 1e-7);
    }
    free(qkv), free(o), free(lse), free(wo), free(wl);
  }
  /* a hand case: one sequence of 2, one head of D 2, causal; q0 = (1, 0),
   * k0 = (1, 0), k1 = (0, 2), v0 = (1, 2), v1 = (3, 4), q1 = (0, 1). Row 0
   * sees itself only: o0 = v0, lse0 = 1/sqrt 2. Row 1: scores 0 and 2/sqrt 2. */
  {
    float qkv[] = {1, 0, 1, 0, 1, 2, 0, 1, 0, 2, 3, 4}, o[4], lse[2];
    double s = sqrt(2.0), p1 = exp(s) / (1 + exp(s));
    moert_cpu_attn_fwd(qkv, o, lse, 1, 2, 1, 1, 2, true);
    check_f32("attn_fwd hand case: o", o, (double[]){1, 2, 1 + 2 * p1, 2 + 2 * p1}, 4, 1e-6, 0);
    check_f32("attn_fwd hand case: lse", lse, (double[]){1 / s, log(1 + exp(s))}, 2, 1e-6, 0);
  }
  printf("%-4s attn_fwd: o and lse vs a plain reference (causal and not, mha, gqa, mqa), a hand case\n",
         failures == before ? "ok" : "FAIL");
}

static void test_rope_values(void) {
  int before = failures;
  {
    /* H 1, KV 1, D 4, base 100: pairs (0, 2) at frequency 1, (1, 3) at
     * 100^(-1/2) = 0.1; token 1 of a sequence at pos0 1 is at position 2 */
    float qkv[2 * 12];
    for (int i = 0; i < 24; i++) qkv[i] = (float)(i % 12 + 1);
    moert_cpu_rope(qkv, 2, 2, 1, 1, 1, 4, 100, false);
    double w[12];
    for (int head = 0; head < 2; head++) { /* the query head and the key head */
      double a = 4 * head + 1, b = 4 * head + 2, c = 4 * head + 3, d = 4 * head + 4;
      w[4 * head + 0] = a * cos(2.0) - c * sin(2.0);
      w[4 * head + 2] = a * sin(2.0) + c * cos(2.0);
      w[4 * head + 1] = b * cos(0.2) - d * sin(0.2);
      w[4 * head + 3] = b * sin(0.2) + d * cos(0.2);
    }
    for (int i = 8; i < 12; i++) w[i] = i + 1; /* the value head is not rotated */
    check_f32("rope hand case: position 2 of D 4, base 100", qkv + 12, w, 12, 1e-6, 0);
  }
  rng r = {0x7095};
  int64_t nseq = 2, seq = 7, H = 4, KV = 2, D = 16, T = nseq * seq, W = (H + 2 * KV) * D;
  float *x = random_floats(&r, T * W), *y = xalloc(T * W, sizeof *y), *one = xalloc(W, sizeof *one);
  double *want = xalloc(T * W, sizeof *want);
  for (int64_t i = 0; i < T * W; i++) want[i] = x[i];
  memcpy(y, x, sizeof(float) * (size_t)(T * W));
  moert_cpu_rope(y, T, seq, 0, H, KV, D, 10000, false);
  /* value heads untouched, bit for bit; positions restart in each sequence */
  int64_t moved = 0, vdiff = 0, restart = 0;
  for (int64_t t = 0; t < T; t++)
    for (int64_t j = 0; j < W; j++) {
      vdiff += j >= (H + KV) * D && y[t * W + j] != x[t * W + j];
      moved += j < (H + KV) * D && t % seq > 0 && y[t * W + j] != x[t * W + j];
    }
  {
    float *z = xalloc(T * W, sizeof *z);
    memcpy(z, x, sizeof(float) * (size_t)(T * W));
    memcpy(z + seq * W, x, sizeof(float) * (size_t)(seq * W)); /* sequence 1 = sequence 0 */
    moert_cpu_rope(z, T, seq, 0, H, KV, D, 10000, false);
    restart = memcmp(z, z + seq * W, sizeof(float) * (size_t)(seq * W)) != 0;
    free(z);
  }
  if (vdiff) fail("rope: %lld value-head elements changed", (long long)vdiff);
  if (moved < (T - nseq) * (H + KV) * D / 2) fail("rope: only %lld query/key elements moved", (long long)moved);
  if (restart) fail("rope: the positions do not restart in each sequence");
  /* position 0 is not rotated; the inverse undoes it */
  check_f32("rope: position 0 unrotated", y, want, W, 0, 0);
  moert_cpu_rope(y, T, seq, 0, H, KV, D, 10000, true);
  check_f32("rope: the inverse undoes it", y, want, T * W, 1e-6, 1e-7);
  /* one token at pos0 = p (generation) is the row at position p of a whole
   * sequence, bit for bit; and rope at pos0 p over a sequence = rope of
   * positions p..p+seq-1 token by token */
  memcpy(y, x, sizeof(float) * (size_t)(T * W));
  moert_cpu_rope(y, T, seq, 0, H, KV, D, 10000, false);
  int64_t differ = 0;
  for (int64_t t = 0; t < T; t++) {
    memcpy(one, x + t * W, sizeof(float) * (size_t)W);
    moert_cpu_rope(one, 1, 1, t % seq, H, KV, D, 10000, false);
    differ += memcmp(one, y + t * W, sizeof(float) * (size_t)W) != 0;
  }
  if (differ) fail("rope: %lld single tokens at pos0 = p differ from row p of the sequence", (long long)differ);
  memcpy(y, x, sizeof(float) * (size_t)(seq * W));
  moert_cpu_rope(y, seq, seq, 40, H, KV, D, 10000, false);
  differ = 0;
  for (int64_t t = 0; t < seq; t++) {
    memcpy(one, x + t * W, sizeof(float) * (size_t)W);
    moert_cpu_rope(one, 1, 1, 40 + t, H, KV, D, 10000, false);
    differ += memcmp(one, y + t * W, sizeof(float) * (size_t)W) != 0;
  }
  if (differ) fail("rope: %lld tokens of a sequence at pos0 40 differ from single tokens at 40 + t", (long long)differ);
  free(x), free(y), free(one), free(want);
  printf("%-4s rope: a hand case, value heads kept, per-sequence positions, inverse, one token at pos0 = p\n",
         failures == before ? "ok" : "FAIL");
}

/* Generation's decode op against the forward: over a causal sequence whose
 * rows were rotated one token at a time at their index (as generation does),
 * attn_decode of row i's query against rows 0..i equals row i of attn_fwd
 * (rotated as a whole sequence); the cache's rows in a ring's order (rotated
 * by any amount) give the same; the float, blocked and double builds agree;
 * and a window whose positions are all shifted (a ring past seq tokens, its
 * rows rotated at their absolute positions) gives the same as at 0..i: RoPE's
 * scores depend on relative positions only. */
static void test_attn_decode(void) {
  int before = failures;
  static const struct { int64_t H, KV, D; } cs[] = {{4, 2, 8}, {4, 1, 16}, {2, 2, 16}};
  rng r = {0xdec0};
  for (size_t k = 0; k < sizeof cs / sizeof *cs; k++) {
    int64_t seq = 7, H = cs[k].H, KV = cs[k].KV, D = cs[k].D, W = (H + 2 * KV) * D, HD = H * D;
    float *x = random_floats(&r, seq * W), *full = xalloc(seq * W, sizeof *full);
    float *cache = xalloc(seq * W, sizeof *cache), *ring = xalloc(seq * W, sizeof *ring);
    float *shifted = xalloc(seq * W, sizeof *shifted);
    float *o = xalloc(seq * HD, sizeof *o), *lse = xalloc(seq * H, sizeof *lse), *od = xalloc(HD, sizeof *od);
    float *ob = xalloc(HD, sizeof *ob);
    double *want = xalloc(HD, sizeof *want), *cache64 = xalloc(seq * W, sizeof *cache64);
    double *od64 = xalloc(HD, sizeof *od64);
    memcpy(full, x, sizeof(float) * (size_t)(seq * W));
    moert_cpu_rope(full, seq, seq, 0, H, KV, D, 10000, false);
    moert_cpu_attn_fwd(full, o, lse, 1, seq, H, KV, D, true);
    for (int64_t i = 0; i < seq; i++) {
      memcpy(cache + i * W, x + i * W, sizeof(float) * (size_t)W);
      moert_cpu_rope(cache + i * W, 1, 1, i, H, KV, D, 10000, false);
      memcpy(shifted + i * W, x + i * W, sizeof(float) * (size_t)W);
      moert_cpu_rope(shifted + i * W, 1, 1, 1000 + i, H, KV, D, 10000, false);
    }
    char what[128];
    for (int64_t i = 0; i < seq; i++) {
      int64_t len = i + 1;
      for (int64_t d = 0; d < HD; d++) want[d] = o[i * HD + d];
      for (int64_t d = 0; d < HD; d++) od[d] = NAN;
      moert_cpu_attn_decode(cache + i * W, cache, od, len, H, KV, D);
      snprintf(what, sizeof what, "attn_decode H %lld KV %lld D %lld: row %lld vs attn_fwd", (long long)H,
               (long long)KV, (long long)D, (long long)i);
      check_f32(what, od, want, HD, 1e-6, 1e-7);
      for (int64_t sh = 1; sh < len; sh++) { /* ring order: the oldest row at sh */
        for (int64_t j = 0; j < len; j++)
          memcpy(ring + (j + sh) % len * W, cache + j * W, sizeof(float) * (size_t)W);
        moert_cpu_attn_decode(cache + i * W, ring, od, len, H, KV, D);
        snprintf(what, sizeof what, "attn_decode H %lld KV %lld D %lld: row %lld, cache rotated by %lld", (long long)H,
                 (long long)KV, (long long)D, (long long)i, (long long)sh);
        check_f32(what, od, want, HD, 1e-6, 1e-7);
      }
      moert_cpu_attn_decode(shifted + i * W, shifted, od, len, H, KV, D);
      snprintf(what, sizeof what, "attn_decode H %lld KV %lld D %lld: row %lld at positions 1000 on", (long long)H,
               (long long)KV, (long long)D, (long long)i);
      check_f32(what, od, want, HD, 1e-5, 1e-6);
      /* the builds: float and blocked against the double twin */
      for (int64_t j = 0; j < len * W; j++) cache64[j] = cache[j];
      moert_f64_attn_decode(cache64 + i * W, cache64, od64, len, H, KV, D);
      moert_cpu_attn_decode(cache + i * W, cache, od, len, H, KV, D);
      moert_blk_attn_decode(cache + i * W, cache, ob, len, H, KV, D);
      snprintf(what, sizeof what, "attn_decode H %lld KV %lld D %lld row %lld: f32 vs f64", (long long)H,
               (long long)KV, (long long)D, (long long)i);
      check_f32(what, od, od64, HD, F32_RTOL, F32_ATOL);
      snprintf(what, sizeof what, "attn_decode H %lld KV %lld D %lld row %lld: blk vs f64", (long long)H,
               (long long)KV, (long long)D, (long long)i);
      check_f32(what, ob, od64, HD, F32_RTOL, F32_ATOL);
    }
    free(x), free(full), free(cache), free(ring), free(shifted), free(o), free(lse), free(od), free(ob);
    free(want), free(cache64), free(od64);
  }
  printf("%-4s attn_decode: = causal attn_fwd row by row, any ring order, shifted positions; f32, blk vs f64\n",
         failures == before ? "ok" : "FAIL");
}

/* The bf16 forms (cpu_ops_typed.c) are the fp32 ops on the bf16 values,
 * each output rounded once to bf16, bit for bit; fp32 through them is the
 * fp32 op itself. */
static uint16_t *to_bf16(const float *x, int64_t n) {
  uint16_t *b = xalloc(n, sizeof *b);
  moert_cpu_convert(b, MOERT_BF16, x, MOERT_F32, n);
  return b;
}

static void check_bf16(const char *what, const uint16_t *got, const float *fp32, int64_t n) {
  int64_t bad = 0;
  for (int64_t i = 0; i < n; i++) {
    uint16_t want = moert_f32_to_bf16(fp32[i]);
    if (got[i] == want) continue;
    if (bad++ < SHOW_MISMATCHES)
      printf("FAIL: %s: [%lld] got 0x%04x want 0x%04x (%g)\n", what, (long long)i, got[i], want, (double)fp32[i]);
  }
  if (bad) {
    printf("  %lld of %lld differ\n", (long long)bad, (long long)n);
    failures++;
  }
}

static void test_attn_typed(void) {
  int before = failures;
  rng r = {0xbf16};
  int64_t nseq = 2, seq = 6, H = 4, KV = 2, D = 8, T = nseq * seq, W = (H + 2 * KV) * D, HD = H * D;
  /* values bf16 holds: the fp32 op sees what the bf16 one sees */
  float *qkv = random_floats(&r, T * W), *dout = random_floats(&r, T * HD);
  for (int64_t i = 0; i < T * W; i++) qkv[i] = moert_bf16_to_f32(moert_f32_to_bf16(qkv[i]));
  for (int64_t i = 0; i < T * HD; i++) dout[i] = moert_bf16_to_f32(moert_f32_to_bf16(dout[i]));
  int64_t nscr = moert_cpu_attn_scratch(T, H, KV, D);
  float *rq = xalloc(T * W, sizeof *rq), *o = xalloc(T * HD, sizeof *o), *lse = xalloc(T * H, sizeof *lse);
  float *dq = xalloc(T * W, sizeof *dq), *scr = xalloc(nscr, sizeof *scr), *od = xalloc(HD, sizeof *od);
  float *lse_b = xalloc(T * H, sizeof *lse_b);
  /* fp32: rope, forward, backward, inverse rope, decode of the last row */
  memcpy(rq, qkv, sizeof(float) * (size_t)(T * W));
  moert_cpu_rope(rq, T, seq, 0, H, KV, D, 10000, false);
  uint16_t *bq = to_bf16(qkv, T * W);
  moert_cpu_rope_t(MOERT_BF16, bq, T, seq, 0, H, KV, D, 10000, false);
  check_bf16("rope_t bf16", bq, rq, T * W);
  /* from here the fp32 ops take the bf16 rotation as their input */
  moert_cpu_convert(rq, MOERT_F32, bq, MOERT_BF16, T * W);
  moert_cpu_attn_fwd(rq, o, lse, nseq, seq, H, KV, D, true);
  uint16_t *bo = xalloc(T * HD, sizeof *bo);
  moert_cpu_attn_fwd_t(MOERT_BF16, bq, bo, lse_b, nseq, seq, H, KV, D, true);
  check_bf16("attn_fwd_t bf16: o", bo, o, T * HD);
  {
    double *l = xalloc(T * H, sizeof *l);
    for (int64_t i = 0; i < T * H; i++) l[i] = lse[i];
    check_f32("attn_fwd_t bf16: lse (fp32, the op's own)", lse_b, l, T * H, 0, 0);
    free(l);
  }
  moert_cpu_convert(o, MOERT_F32, bo, MOERT_BF16, T * HD); /* the stored o is what the backward reads */
  moert_cpu_attn_bwd(rq, o, lse, dout, dq, scr, nseq, seq, H, KV, D, true);
  uint16_t *bd = to_bf16(dout, T * HD), *bdq = xalloc(T * W, sizeof *bdq);
  moert_cpu_attn_bwd_t(MOERT_BF16, bq, bo, lse, bd, bdq, scr, nseq, seq, H, KV, D, true);
  check_bf16("attn_bwd_t bf16: dqkv", bdq, dq, T * W);
  moert_cpu_convert(dq, MOERT_F32, bdq, MOERT_BF16, T * W);
  moert_cpu_rope(dq, T, seq, 0, H, KV, D, 10000, true);
  moert_cpu_rope_t(MOERT_BF16, bdq, T, seq, 0, H, KV, D, 10000, true);
  check_bf16("rope_t bf16 inverse", bdq, dq, T * W);
  { /* one token at its position (generation) */
    float row[64];
    uint16_t brow[64];
    memcpy(row, qkv + 3 * W, sizeof(float) * (size_t)W);
    moert_cpu_convert(brow, MOERT_BF16, row, MOERT_F32, W);
    moert_cpu_rope(row, 1, 1, 9, H, KV, D, 10000, false);
    moert_cpu_rope_t(MOERT_BF16, brow, 1, 1, 9, H, KV, D, 10000, false);
    check_bf16("rope_t bf16, one token at pos0 9", brow, row, W);
  }
  moert_cpu_attn_decode(rq + (seq - 1) * W, rq, od, seq, H, KV, D);
  uint16_t *bod = xalloc(HD, sizeof *bod);
  moert_cpu_attn_decode_t(MOERT_BF16, bq + (seq - 1) * W, bq, bod, seq, H, KV, D);
  check_bf16("attn_decode_t bf16", bod, od, HD);
  /* fp32 through the typed forms: the ops themselves, bit for bit */
  float *fo = xalloc(T * HD, sizeof *fo), *fl = xalloc(T * H, sizeof *fl), *fdq = xalloc(T * W, sizeof *fdq);
  float *fod = xalloc(HD, sizeof *fod), *fq = xalloc(T * W, sizeof *fq);
  memcpy(fq, qkv, sizeof(float) * (size_t)(T * W));
  moert_cpu_rope_t(MOERT_F32, fq, T, seq, 0, H, KV, D, 10000, false);
  memcpy(rq, qkv, sizeof(float) * (size_t)(T * W));
  moert_cpu_rope(rq, T, seq, 0, H, KV, D, 10000, false);
  moert_cpu_attn_fwd(rq, o, lse, nseq, seq, H, KV, D, false);
  moert_cpu_attn_fwd_t(MOERT_F32, fq, fo, fl, nseq, seq, H, KV, D, false);
  moert_cpu_attn_bwd(rq, o, lse, dout, dq, scr, nseq, seq, H, KV, D, false);
  moert_cpu_attn_bwd_t(MOERT_F32, fq, fo, fl, dout, fdq, scr, nseq, seq, H, KV, D, false);
  moert_cpu_attn_decode(rq, rq, od, 3, H, KV, D);
  moert_cpu_attn_decode_t(MOERT_F32, fq, fq, fod, 3, H, KV, D);
  if (memcmp(fq, rq, sizeof(float) * (size_t)(T * W)) || memcmp(fo, o, sizeof(float) * (size_t)(T * HD)) ||
      memcmp(fl, lse, sizeof(float) * (size_t)(T * H)) || memcmp(fdq, dq, sizeof(float) * (size_t)(T * W)) ||
      memcmp(fod, od, sizeof(float) * (size_t)HD))
    fail("attention's typed forms in fp32 differ from the fp32 ops");
  free(qkv), free(dout), free(rq), free(o), free(lse), free(dq), free(scr), free(od), free(lse_b);
  free(bq), free(bo), free(bd), free(bdq), free(bod), free(fo), free(fl), free(fdq), free(fod), free(fq);
  printf("%-4s attention's bf16 forms = the fp32 ops on bf16 values, rounded once; fp32 forms = the ops\n",
         failures == before ? "ok" : "FAIL");
}

int main(void) {
  run_gradient_checks();
  test_gemm_shapes();
  test_gemm_edges();
  test_gemm_batched();
  test_gemm_epilogue();
  test_forward_values();
  test_topk();
  test_locations();
  test_priority_order();
  test_priority_capacity();
  test_dispatch_combine();
  test_gate_stats_aux();
  test_embed_losses();
  test_optimizers();
  test_attn_values();
  test_rope_values();
  test_attn_decode();
  test_attn_typed();
  if (failures) {
    printf("test_cpu_ops: %d checks FAILED\n", failures);
    return 1;
  }
  printf("test_cpu_ops: all checks passed\n");
  return 0;
}
