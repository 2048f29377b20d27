/* test_ops_gpu.c — the cuda backend against the cpu backend (label gpu;
 * ggml's test-backend-ops, llm.c's check_tensor). Every op of the backend
 * table and every memory helper runs on both backends on the same fresh
 * random inputs (never zeros), over several shapes (odd sizes, one-element
 * edges, E and k variety, capacities that drop claims, the batch-prioritized
 * order; today's routers: sigmoid, bias, groups, route scale, expert
 * choice, the z and entropy sums), all of it twice: with 16-byte aligned
 * device pointers and with pointers one float off (the kernels' scalar
 * paths). Outputs start as random garbage on both sides, so an op that skips
 * an element or writes where it should accumulate is caught. Floats are
 * compared by the norm-relative error ||gpu - cpu|| / ||cpu|| (fp32 ops:
 * 1e-5; copies: exact), integers exactly; a failure prints the first
 * mismatches and the largest difference.
 * Then the kernel cache: a second create hits, a corrupted entry is
 * recompiled with a warning, an unwritable directory is only warned about;
 * and a failing op is reported by the next download.
 *
 * test_ops_gpu KERNELS_CU: the specialized kernels instead. The backend
 * compiles KERNELS_CU, the kernels.cu `moec emit --cuda` printed for
 * tests/gpu/spec_ops.moe, and the ops with that spec's dims (the rows
 * varying) run on it against the cpu, aligned and not; every
 * specialization the file defines must have been launched.
 *
 * Skips (exit 77) where no GPU is found. MOEC_TEST_SEED sets the seed. */
#include "backend.h"

#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static moert_backend *cpu, *gpu;
static int checks, failures;

/* --- random inputs --- */

static uint64_t rng_state;

static uint64_t next_u64(void) { /* splitmix64 */
  uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static double urand(void) { return (double)(next_u64() >> 11) * 0x1p-53; }
static int64_t irand(int64_t n) { return (int64_t)(next_u64() % (uint64_t)n); }

/* Uniform in [lo, hi), never exactly zero. */
static float frand(float lo, float hi) {
  float v = (float)(lo + (hi - lo) * urand());
  return v == 0 ? 0.25f * (hi - lo) + lo + 1e-3f : v;
}

/* --- buffers: a host copy (the cpu's) and a device copy (the gpu's) --- */

typedef struct fbuf {
  float *h, *d;
  int64_t n;
} fbuf;
typedef struct ibuf {
  int32_t *h, *d;
  int64_t n;
} ibuf;

enum { MAX_ALLOCS = 96 };
static void *host_allocs[MAX_ALLOCS], *dev_allocs[MAX_ALLOCS];
static int nhost, ndev;
static bool misalign; /* device pointers one float past 16-byte alignment */

static void die(const char *what, const moert_status *st) {
  printf("FATAL: %s: %s\n  at %s\n", what, st->msg, st->trace);
  exit(1);
}

static void *host_alloc(size_t bytes) {
  void *p = calloc(bytes ? bytes : 1, 1);
  if (!p || nhost == MAX_ALLOCS) {
    printf("FATAL: out of host memory or test allocations\n");
    exit(1);
  }
  return host_allocs[nhost++] = p;
}

static void *dev_alloc(size_t bytes) {
  moert_status st = {0};
  void *p;
  if (ndev == MAX_ALLOCS) exit(1);
  if (!gpu->alloc(gpu, bytes + 16, &p, &st)) die("alloc", &st);
  dev_allocs[ndev++] = p;
  return (char *)p + (misalign ? 4 : 0);
}

/* One double of device memory, 8-byte aligned even in the misaligned pass
 * (the executor's scalars are aligned allocations). */
static double *dev_scalar(void) {
  return (double *)((uintptr_t)dev_alloc(sizeof(double)) & ~(uintptr_t)7);
}

static void upload(void *d, const void *h, size_t bytes) {
  moert_status st = {0};
  if (!gpu->upload(gpu, d, h, bytes, &st)) die("upload", &st);
}

static void download(void *h, const void *d, size_t bytes) {
  moert_status st = {0};
  if (!gpu->download(gpu, h, d, bytes, &st)) die("download", &st);
}

/* n random floats in [lo, hi) on both sides. */
static fbuf fb(int64_t n, float lo, float hi) {
  fbuf b = {host_alloc(sizeof(float) * (size_t)n), dev_alloc(sizeof(float) * (size_t)n), n};
  for (int64_t i = 0; i < n; i++) b.h[i] = frand(lo, hi);
  upload(b.d, b.h, sizeof(float) * (size_t)n);
  return b;
}
static fbuf garbage(int64_t n) { return fb(n, -7, 7); }

/* A buffer holding src's values (an output of the cpu used as an input). */
static fbuf fb_of(const float *src, int64_t n) {
  fbuf b = {host_alloc(sizeof(float) * (size_t)n), dev_alloc(sizeof(float) * (size_t)n), n};
  memcpy(b.h, src, sizeof(float) * (size_t)n);
  upload(b.d, b.h, sizeof(float) * (size_t)n);
  return b;
}

/* n ints in [lo, hi) on both sides. */
static ibuf ib(int64_t n, int64_t lo, int64_t hi) {
  ibuf b = {host_alloc(sizeof(int32_t) * (size_t)n), dev_alloc(sizeof(int32_t) * (size_t)n), n};
  for (int64_t i = 0; i < n; i++) b.h[i] = (int32_t)(lo + irand(hi - lo));
  upload(b.d, b.h, sizeof(int32_t) * (size_t)n);
  return b;
}
static void sync_i(ibuf b) { upload(b.d, b.h, sizeof(int32_t) * (size_t)b.n); }
static void sync_f(fbuf b) { upload(b.d, b.h, sizeof(float) * (size_t)b.n); }

/* --- cases and checks --- */

static char case_name[256];
static double case_worst; /* the largest relative error of the case's checks */
static int case_failures;

static void begin(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void begin(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(case_name, sizeof case_name, fmt, ap);
  va_end(ap);
  case_worst = 0;
  case_failures = 0;
}

static void end(void) {
  moert_status st = {0};
  /* a last synchronizing call: an op that failed is reported here */
  float probe;
  if (ndev && !gpu->download(gpu, &probe, dev_allocs[0], sizeof probe, &st))
    die(case_name, &st);
  if (!case_failures)
    printf("ok   %s%s (max rel err %.2e)\n", case_name, misalign ? " [unaligned]" : "", case_worst);
  for (int i = 0; i < nhost; i++) free(host_allocs[i]);
  for (int i = 0; i < ndev; i++) gpu->free(gpu, dev_allocs[i]);
  nhost = ndev = 0;
}

static void fail_header(const char *what) {
  if (!case_failures) printf("FAIL %s%s\n", case_name, misalign ? " [unaligned]" : "");
  printf("  %s:\n", what);
  case_failures++;
  failures++;
}

enum { SHOW = 5 };

/* The gpu's b.d against the cpu's b.h: ||d - h|| / ||h|| <= tol (tol 0:
 * bitwise equal); NaN must match NaN. */
/* check_f's absolute floor: a difference of at most this norm passes whatever
 * the relative error (outputs that are zero but for rounding, e.g. the
 * gradient of x / ||x|| with one column). 0: none. */
static double abs_floor;

static void check_f(const char *what, fbuf b, double tol) {
  checks++;
  float *got = malloc(sizeof(float) * (size_t)(b.n ? b.n : 1));
  download(got, b.d, sizeof(float) * (size_t)b.n);
  double dd = 0, ww = 0, worst = -1;
  int64_t worst_i = -1, nan_bad = 0;
  for (int64_t i = 0; i < b.n; i++) {
    double w = b.h[i], g = got[i];
    if (isnan(w) || isnan(g)) {
      nan_bad += isnan(w) != isnan(g);
      continue;
    }
    dd += (g - w) * (g - w);
    ww += w * w;
    if (fabs(g - w) > worst) worst = fabs(g - w), worst_i = i;
  }
  double rel = ww > 0 ? sqrt(dd / ww) : sqrt(dd);
  bool ok = nan_bad == 0 && (tol == 0 ? dd == 0 : rel <= tol || sqrt(dd) <= abs_floor);
  if (rel > case_worst) case_worst = rel;
  if (!ok) {
    fail_header(what);
    printf("    rel err %.3e (tol %.1e), %lld NaN mismatches, %lld elements\n", rel, tol,
           (long long)nan_bad, (long long)b.n);
    double rms = b.n ? sqrt(ww / (double)b.n) : 0;
    int shown = 0;
    for (int64_t i = 0; i < b.n && shown < SHOW; i++) {
      double w = b.h[i], g = got[i];
      bool bad = isnan(w) != isnan(g) ||
                 (!isnan(w) && fabs(g - w) > (tol > 0 ? tol : 0) * (fabs(w) + rms));
      if (bad) {
        printf("    [%lld] gpu %.9g cpu %.9g diff %.3e\n", (long long)i, g, w, fabs(g - w));
        shown++;
      }
    }
    if (worst_i >= 0)
      printf("    largest diff at [%lld]: gpu %.9g cpu %.9g diff %.3e\n", (long long)worst_i,
             got[worst_i], b.h[worst_i], worst);
  }
  free(got);
}

static void check_i(const char *what, ibuf b) {
  checks++;
  int32_t *got = malloc(sizeof(int32_t) * (size_t)(b.n ? b.n : 1));
  download(got, b.d, sizeof(int32_t) * (size_t)b.n);
  int64_t bad = 0;
  for (int64_t i = 0; i < b.n; i++) bad += got[i] != b.h[i];
  if (bad) {
    fail_header(what);
    printf("    %lld of %lld differ\n", (long long)bad, (long long)b.n);
    int shown = 0;
    for (int64_t i = 0; i < b.n && shown < SHOW; i++)
      if (got[i] != b.h[i]) {
        printf("    [%lld] gpu %d cpu %d\n", (long long)i, got[i], b.h[i]);
        shown++;
      }
  }
  free(got);
}

static void check_scalar(const char *what, double got, double want, double tol) {
  checks++;
  double rel = fabs(got - want) / (fabs(want) > 0 ? fabs(want) : 1);
  if (rel > case_worst) case_worst = rel;
  if (!(rel <= tol)) {
    fail_header(what);
    printf("    gpu %.17g cpu %.17g rel err %.3e (tol %.1e)\n", got, want, rel, tol);
  }
}

/* fp32 ops; GEMMs (no TF32) as fp32 */
#define TOL 1e-5
#define TOL_SCORES 1e-6

/* --- memory helpers --- */

static void t_memory(int64_t n) {
  begin("memory n=%lld", (long long)n);
  moert_status st = {0};
  int64_t allocs = gpu->allocs;
  void *z;
  if (!gpu->alloc(gpu, sizeof(float) * (size_t)n, &z, &st)) die("alloc", &st);
  dev_allocs[ndev++] = z;
  checks++;
  if (gpu->allocs != allocs + 1) fail_header("alloc counts its allocations");
  float *back = host_alloc(sizeof(float) * (size_t)n);
  download(back, z, sizeof(float) * (size_t)n);
  for (int64_t i = 0; i < n; i++)
    if (back[i] != 0) {
      fail_header("alloc zeroes");
      break;
    }
  fbuf a = fb(n, -1, 1), b = fb(n, -1, 1), y = garbage(n);
  check_f("upload/download round trip", a, 0);
  /* zero: a range in the middle, in bytes */
  int64_t z0 = n / 3, zn = n - n / 3 - n / 5;
  cpu->zero(a.h + z0, sizeof(float) * (size_t)zn);
  gpu->zero(a.d + z0, sizeof(float) * (size_t)zn);
  check_f("zero", a, 0);
  cpu->copy(y.h + 1, b.h, n - 1);
  gpu->copy(y.d + 1, b.d, n - 1);
  check_f("copy", y, 0);
  cpu->add(y.h, a.h, b.h, n);
  gpu->add(y.d, a.d, b.d, n);
  check_f("add", y, 0);
  cpu->axpy(y.h, b.h, -0.375f, n);
  gpu->axpy(y.d, b.d, -0.375f, n);
  check_f("axpy", y, 1e-6);
  check_scalar("dot", gpu->dot(a.d, b.d, n), cpu->dot(a.h, b.h, n), 1e-9);
  end();
}

/* Timing marks (backend.h) on both backends: a span of work has a positive
 * time; an unmade mark (-1) gives NAN; the pool runs out into -1 and a reset
 * gives it back. */
static void t_marks(void) {
  begin("timing marks");
  moert_backend *bk[2] = {cpu, gpu};
  for (int k = 0; k < 2; k++) {
    moert_backend *b = bk[k];
    moert_status st = {0};
    b->marks_reset(b);
    fbuf x = fb(1 << 20, -1, 1), y = garbage(1 << 20);
    int m0 = b->mark(b, NULL);
    for (int i = 0; i < 20; i++) b->axpy(k ? y.d : y.h, k ? x.d : x.h, 0.5f, x.n);
    int m1 = b->mark(b, NULL);
    double ms = NAN, none = 0;
    checks++;
    if (m0 != 0 || m1 != 1 || !b->mark_ms(b, m0, m1, &ms, &st) || !(ms > 0 && ms < 1e4)) {
      fail_header("a span of work");
      printf("    %s: marks %d %d, %.6g ms (%s)\n", b->name, m0, m1, ms, st.msg);
    }
    checks++;
    if (!b->mark_ms(b, -1, m1, &none, &st) || !isnan(none)) fail_header("mark -1 is NAN");
    int last = m1;
    for (int i = 2; i < MOERT_MAX_MARKS; i++) last = b->mark(b, NULL);
    checks++;
    if (last != MOERT_MAX_MARKS - 1 || b->mark(b, NULL) != -1) {
      fail_header("the pool runs out into -1");
      printf("    %s: the last mark %d\n", b->name, last);
    }
    b->marks_reset(b);
    checks++;
    if (b->mark(b, NULL) != 0) fail_header("reset gives the pool back");
    b->marks_reset(b);
  }
  end();
}

static void t_copy_blocks(int64_t nblocks, int64_t block, int64_t dst_stride, int64_t src_stride,
                          bool add) {
  begin("copy_blocks nblocks=%lld block=%lld strides dst %lld src %lld add=%d",
        (long long)nblocks, (long long)block, (long long)dst_stride, (long long)src_stride, add);
  int64_t nd = (nblocks - 1) * dst_stride + block, ns = (nblocks - 1) * src_stride + block;
  fbuf dst = garbage(nd + 3), src = fb(ns, -1, 1);
  /* the watched-bytes counter, on a window of dst */
  for (int i = 0; i < 2; i++) {
    cpu->watch_lo[i] = gpu->watch_lo[i] = NULL;
    cpu->watch_hi[i] = gpu->watch_hi[i] = NULL;
  }
  int64_t wc = cpu->watched_bytes, wg = gpu->watched_bytes;
  cpu->watch_lo[0] = dst.h + nd / 2, cpu->watch_hi[0] = dst.h + nd / 2 + 1;
  gpu->watch_lo[0] = dst.d + nd / 2, gpu->watch_hi[0] = dst.d + nd / 2 + 1;
  cpu->copy_blocks(dst.h, dst_stride, src.h, src_stride, nblocks, block, add);
  gpu->copy_blocks(dst.d, dst_stride, src.d, src_stride, nblocks, block, add);
  checks++;
  if (cpu->watched_bytes - wc != gpu->watched_bytes - wg) {
    fail_header("watched bytes");
    printf("    gpu %lld cpu %lld\n", (long long)(gpu->watched_bytes - wg),
           (long long)(cpu->watched_bytes - wc));
  }
  cpu->watch_lo[0] = cpu->watch_hi[0] = gpu->watch_lo[0] = gpu->watch_hi[0] = NULL;
  check_f("dst", dst, 0);
  end();
}

static void t_drop_beyond(int64_t n, int64_t keep) {
  begin("drop_beyond n=%lld keep=%lld", (long long)n, (long long)keep);
  ibuf loc = ib(n, -1, 2 * keep + 2);
  cpu->drop_beyond(loc.h, n, keep);
  gpu->drop_beyond(loc.d, n, keep);
  check_i("loc", loc);
  end();
}

/* --- dense --- */

static void t_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, float beta,
                   int64_t pad) {
  begin("gemm ta=%d tb=%d m=%lld n=%lld k=%lld alpha=%g beta=%g pad=%lld", ta, tb, (long long)m,
        (long long)n, (long long)k, alpha, beta, (long long)pad);
  int64_t ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
  int64_t lda = ac + pad, ldb = bc + pad, ldc = n + pad;
  fbuf a = fb(ar * lda, -1, 1), b = fb(br * ldb, -1, 1), c = garbage(m * ldc);
  cpu->gemm(ta, tb, m, n, k, alpha, a.h, lda, b.h, ldb, beta, c.h, ldc);
  gpu->gemm(ta, tb, m, n, k, alpha, a.d, lda, b.d, ldb, beta, c.d, ldc);
  check_f("c", c, TOL);
  end();
}

static void t_gemm_batched(bool ta, bool tb, int64_t m, int64_t n, int64_t k, int64_t count,
                           float beta) {
  begin("gemm_batched ta=%d tb=%d m=%lld n=%lld k=%lld count=%lld beta=%g", ta, tb, (long long)m,
        (long long)n, (long long)k, (long long)count, beta);
  int64_t ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
  int64_t lda = ac + 1, ldb = bc, ldc = n + 2;
  int64_t sa = ar * lda + 5, sb = br * ldb, sc = m * ldc + 3; /* gaps between matrices */
  fbuf a = fb(sa * count, -1, 1), b = fb(sb * count, -1, 1), c = garbage(sc * count);
  cpu->gemm_batched(ta, tb, m, n, k, 0.5f, a.h, lda, sa, b.h, ldb, sb, beta, c.h, ldc, sc, count);
  gpu->gemm_batched(ta, tb, m, n, k, 0.5f, a.d, lda, sa, b.d, ldb, sb, beta, c.d, ldc, sc, count);
  check_f("c", c, TOL);
  end();
}

static void t_bias(int64_t rows, int64_t cols) {
  begin("bias_add, bias_grad rows=%lld cols=%lld", (long long)rows, (long long)cols);
  fbuf y = fb(rows * cols, -1, 1), bias = fb(cols, -1, 1), db = fb(cols, -1, 1),
       dy = fb(rows * cols, -1, 1);
  cpu->bias_add(y.h, bias.h, rows, cols);
  gpu->bias_add(y.d, bias.d, rows, cols);
  check_f("y", y, 0);
  cpu->bias_grad(db.h, dy.h, rows, cols);
  gpu->bias_grad(db.d, dy.d, rows, cols);
  check_f("dbias (accumulated)", db, TOL);
  end();
}

static const char *const act_names[] = {"relu", "gelu", "silu"};

static void t_act(moert_act act, int64_t n) {
  begin("act_fwd, act_bwd %s n=%lld", act_names[act], (long long)n);
  fbuf h = fb(n, -6, 6), a = garbage(n), da = fb(n, -1, 1), dh = garbage(n);
  cpu->act_fwd(act, h.h, a.h, n);
  gpu->act_fwd(act, h.d, a.d, n);
  check_f("a", a, TOL);
  cpu->act_bwd(act, h.h, da.h, dh.h, n);
  gpu->act_bwd(act, h.d, da.d, dh.d, n);
  check_f("dh", dh, TOL);
  end();
}

static void t_swiglu(int64_t rows, int64_t hid) {
  begin("swiglu_fwd, swiglu_bwd rows=%lld hid=%lld", (long long)rows, (long long)hid);
  fbuf h = fb(rows * 2 * hid, -5, 5), a = garbage(rows * hid), da = fb(rows * hid, -1, 1),
       dh = garbage(rows * 2 * hid);
  cpu->swiglu_fwd(h.h, a.h, rows, hid);
  gpu->swiglu_fwd(h.d, a.d, rows, hid);
  check_f("a", a, TOL);
  cpu->swiglu_bwd(h.h, da.h, dh.h, rows, hid);
  gpu->swiglu_bwd(h.d, da.d, dh.d, rows, hid);
  check_f("dh", dh, TOL);
  end();
}

/* --- norms --- */

static void t_layernorm(int64_t rows, int64_t dim) {
  begin("layernorm_fwd, layernorm_bwd rows=%lld dim=%lld", (long long)rows, (long long)dim);
  fbuf x = fb(rows * dim, 1, 4), g = fb(dim, 0.5f, 1.5f), b = fb(dim, -1, 1);
  fbuf y = garbage(rows * dim), mean = garbage(rows), rstd = garbage(rows);
  cpu->layernorm_fwd(x.h, g.h, b.h, y.h, mean.h, rstd.h, rows, dim, 1e-5f);
  gpu->layernorm_fwd(x.d, g.d, b.d, y.d, mean.d, rstd.d, rows, dim, 1e-5f);
  check_f("y", y, TOL);
  check_f("mean", mean, TOL);
  check_f("rstd", rstd, TOL);
  fbuf m2 = fb_of(mean.h, rows), r2 = fb_of(rstd.h, rows);
  fbuf dy = fb(rows * dim, -1, 1), dx = garbage(rows * dim), dg = fb(dim, -1, 1),
       db = fb(dim, -1, 1);
  cpu->layernorm_bwd(x.h, g.h, m2.h, r2.h, dy.h, dx.h, dg.h, db.h, rows, dim);
  gpu->layernorm_bwd(x.d, g.d, m2.d, r2.d, dy.d, dx.d, dg.d, db.d, rows, dim);
  check_f("dx", dx, TOL);
  check_f("dg (accumulated)", dg, TOL);
  check_f("db (accumulated)", db, TOL);
  end();
}

static void t_rmsnorm(int64_t rows, int64_t dim) {
  begin("rmsnorm_fwd, rmsnorm_bwd rows=%lld dim=%lld", (long long)rows, (long long)dim);
  fbuf x = fb(rows * dim, -2, 2), g = fb(dim, 0.5f, 1.5f);
  fbuf y = garbage(rows * dim), rstd = garbage(rows);
  cpu->rmsnorm_fwd(x.h, g.h, y.h, rstd.h, rows, dim, 1e-6f);
  gpu->rmsnorm_fwd(x.d, g.d, y.d, rstd.d, rows, dim, 1e-6f);
  check_f("y", y, TOL);
  check_f("rstd", rstd, TOL);
  fbuf r2 = fb_of(rstd.h, rows);
  fbuf dy = fb(rows * dim, -1, 1), dx = garbage(rows * dim), dg = fb(dim, -1, 1);
  cpu->rmsnorm_bwd(x.h, g.h, r2.h, dy.h, dx.h, dg.h, rows, dim);
  gpu->rmsnorm_bwd(x.d, g.d, r2.d, dy.d, dx.d, dg.d, rows, dim);
  check_f("dx", dx, TOL);
  check_f("dg (accumulated)", dg, TOL);
  end();
}

/* tiny: the first row (or column) below the norm's floor. */
static void t_l2norm_rows(int64_t rows, int64_t cols, bool tiny) {
  begin("l2norm_rows_fwd, _bwd rows=%lld cols=%lld%s", (long long)rows, (long long)cols,
        tiny ? " (a row under the floor)" : "");
  fbuf x = fb(rows * cols, -1, 1), y = garbage(rows * cols), norm = garbage(rows);
  if (tiny) {
    for (int64_t c = 0; c < cols; c++) x.h[c] *= 1e-14f;
    sync_f(x);
  }
  cpu->l2norm_rows_fwd(x.h, y.h, norm.h, rows, cols);
  gpu->l2norm_rows_fwd(x.d, y.d, norm.d, rows, cols);
  check_f("y", y, TOL);
  check_f("norm", norm, TOL);
  fbuf n2 = fb_of(norm.h, rows), dy = fb(rows * cols, -1, 1), dx = garbage(rows * cols);
  cpu->l2norm_rows_bwd(x.h, n2.h, dy.h, dx.h, rows, cols);
  gpu->l2norm_rows_bwd(x.d, n2.d, dy.d, dx.d, rows, cols);
  abs_floor = cols == 1 ? 1e-12 : 0; /* one column: dx is 0 but for rounding */
  check_f("dx", dx, TOL);
  abs_floor = 0;
  end();
}

static void t_l2norm_cols(int64_t rows, int64_t cols, bool tiny) {
  begin("l2norm_cols_fwd, _bwd rows=%lld cols=%lld%s", (long long)rows, (long long)cols,
        tiny ? " (a column under the floor)" : "");
  fbuf x = fb(rows * cols, -1, 1), y = garbage(rows * cols), norm = garbage(cols);
  if (tiny) {
    for (int64_t r = 0; r < rows; r++) x.h[r * cols] *= 1e-14f;
    sync_f(x);
  }
  cpu->l2norm_cols_fwd(x.h, y.h, norm.h, rows, cols);
  gpu->l2norm_cols_fwd(x.d, y.d, norm.d, rows, cols);
  check_f("y", y, TOL);
  check_f("norm", norm, TOL);
  fbuf n2 = fb_of(norm.h, cols), dy = fb(rows * cols, -1, 1), dx = garbage(rows * cols);
  cpu->l2norm_cols_bwd(x.h, n2.h, dy.h, dx.h, rows, cols);
  gpu->l2norm_cols_bwd(x.d, n2.d, dy.d, dx.d, rows, cols);
  check_f("dx", dx, TOL);
  end();
}

/* --- gating --- */

/* The gate after its logits (gate_fwd: two kernels on the GPU) against the
 * cpu's pieces. */
enum {
  G_NOISE = 1,     /* noise added to the logits */
  G_TIES = 2,      /* logits from {0, 0.5, 1}: equal scores in rows and across tokens */
  G_NAN = 4,       /* a few rows with a NaN logit: NaN scores, ranked last */
  G_ORDER = 8,     /* batch-prioritized: the priority order, locations in it */
  G_NORMALIZE = 16, /* the weights normalized */
  G_AUX = 32,      /* the aux loss too (one rank) */
};

static void t_gate_fwd(int64_t T, int64_t E, int64_t K, int flags) {
  begin("gate_fwd T=%lld E=%lld k=%lld%s%s%s%s%s%s", (long long)T, (long long)E, (long long)K,
        flags & G_NOISE ? " noise" : "", flags & G_TIES ? " ties" : "", flags & G_NAN ? " NaN" : "",
        flags & G_ORDER ? " priority order" : "", flags & G_NORMALIZE ? " normalized" : "",
        flags & G_AUX ? " aux loss" : "");
  fbuf logits = fb(T * E, -4, 4), nz = flags & G_NOISE ? fb(T * E, -0.5f, 0.5f) : (fbuf){0};
  if (flags & G_TIES)
    for (int64_t i = 0; i < T * E; i++) logits.h[i] = (float)irand(3) * 0.5f;
  if (flags & G_NAN)
    for (int64_t t = 3; t < T; t += 7) logits.h[t * E + irand(E)] = NAN;
  if (flags & (G_TIES | G_NAN)) sync_f(logits);
  fbuf scores = garbage(T * E), topv = garbage(T * K), gate = garbage(T * K), ssum = garbage(E),
       top1 = garbage(E), coef = garbage(E), aux = garbage(1);
  ibuf idx = ib(T * K, -5, 5), loc = ib(T * K, -9, 9), counts = ib(E, -9, 9),
       order = flags & G_ORDER ? ib(T, -3, 3) : (ibuf){0};
  moert_cpu_gate_io h = {.logits = logits.h, .noise = nz.h, .scores = scores.h, .idx = idx.h,
                         .loc = loc.h, .topv = topv.h, .gate = gate.h, .order = order.h,
                         .counts = counts.h, .score_sum = ssum.h, .top1_count = top1.h,
                         .dscore_coef = coef.h, .aux_out = flags & G_AUX ? aux.h : NULL,
                         .global_tokens = (double)T, .normalize = flags & G_NORMALIZE};
  moert_cpu_gate_io d = {.logits = logits.d, .noise = nz.d, .scores = scores.d, .idx = idx.d,
                         .loc = loc.d, .topv = topv.d, .gate = gate.d, .order = order.d,
                         .counts = counts.d, .score_sum = ssum.d, .top1_count = top1.d,
                         .dscore_coef = coef.d, .aux_out = flags & G_AUX ? aux.d : NULL,
                         .global_tokens = (double)T, .normalize = flags & G_NORMALIZE};
  cpu->gate_fwd(&h, T, E, K);
  /* first on other logits: what the GPU keeps between launches (the aux
   * loss's done-counter) must not carry over */
  fbuf other = fb(T * E, -4, 4);
  d.logits = other.d;
  gpu->gate_fwd(&d, T, E, K);
  d.logits = logits.d;
  gpu->gate_fwd(&d, T, E, K);
  check_f("scores", scores, TOL_SCORES);
  check_i("idx", idx);
  check_f("topv", topv, TOL_SCORES);
  check_f("gate", gate, TOL);
  if (flags & G_ORDER) check_i("order", order);
  check_i("loc", loc);
  check_i("counts", counts);
  check_f("score_sum (written)", ssum, TOL);
  check_f("top1_count (written)", top1, 0);
  if (flags & G_AUX) {
    check_f("aux loss", aux, 1e-6);
    check_f("dscore_coef", coef, TOL);
  }
  end();
}

/* Claims on experts in [0, E), with a few on no expert (-1, E). */
static ibuf claims(int64_t T, int64_t K, int64_t E) {
  ibuf idx = ib(T * K, 0, E);
  for (int64_t i = 0; i < T * K; i++)
    if (irand(17) == 0) idx.h[i] = irand(2) ? -1 : (int32_t)E;
  sync_i(idx);
  return idx;
}

static void t_aux_loss(int64_t E, bool coef) {
  begin("aux_loss (cuda's own) E=%lld%s", (long long)E, coef ? "" : " no coefficients");
  fbuf ssum = fb(E, 0, 50), top1 = fb(E, 0, 1), dcoef = garbage(E);
  for (int64_t e = 0; e < E; e++) top1.h[e] = (float)irand(100);
  sync_f(top1);
  float want = moert_cpu_aux_loss(ssum.h, top1.h, coef ? dcoef.h : NULL, E, 1000.0);
  float got = moert_backend_cuda_aux_loss(ssum.d, top1.d, coef ? dcoef.d : NULL, E, 1000.0);
  check_scalar("loss", got, want, 1e-6);
  check_f("dscore_coef", dcoef, TOL);
  /* the table's aux_loss_to: the loss left in device memory */
  float *out = dev_alloc(sizeof(float)), got_to = NAN;
  fbuf dcoef2 = garbage(E);
  float want_to = moert_cpu_aux_loss(ssum.h, top1.h, coef ? dcoef2.h : NULL, E, 1000.0), cpu_to = NAN;
  cpu->aux_loss_to(ssum.h, top1.h, NULL, E, 1000.0, &cpu_to);
  gpu->aux_loss_to(ssum.d, top1.d, coef ? dcoef2.d : NULL, E, 1000.0, out);
  download(&got_to, out, sizeof got_to);
  check_scalar("loss (aux_loss_to)", got_to, want_to, 1e-6);
  check_scalar("loss (the cpu's aux_loss_to)", cpu_to, want_to, 0);
  check_f("dscore_coef (aux_loss_to)", dcoef2, TOL);
  end();
}

/* The gate's backward (gate_bwd: one kernel on the GPU) against the cpu's
 * pieces: claims on no expert among idx; tiny: top-k sums under the floor. */
static void t_gate_bwd(int64_t T, int64_t E, int64_t K, bool coef, bool normalize, bool tiny) {
  begin("gate_bwd T=%lld E=%lld k=%lld%s%s%s", (long long)T, (long long)E, (long long)K,
        coef ? " coef" : "", normalize ? " normalized" : "", tiny ? " (sums under the floor)" : "");
  ibuf idx = claims(T, K, E);
  fbuf scores = fb(T * E, 0, 1), topv = fb(T * K, 0.01f, 1), dgate = fb(T * K, -1, 1),
       c = coef ? fb(E, -1, 1) : (fbuf){0}, dl = garbage(T * E);
  if (tiny) {
    for (int64_t i = 0; i < T * K; i++) topv.h[i] *= 1e-12f;
    sync_f(topv);
  }
  moert_cpu_gate_bwd_io hio = {.scores = scores.h, .idx = idx.h, .topv = topv.h, .dgate = dgate.h,
                               .dscore_coef = c.h, .weight = 0.01f, .dlogits = dl.h, .normalize = normalize};
  moert_cpu_gate_bwd_io dio = {.scores = scores.d, .idx = idx.d, .topv = topv.d, .dgate = dgate.d,
                               .dscore_coef = c.d, .weight = 0.01f, .dlogits = dl.d, .normalize = normalize};
  cpu->gate_bwd(&hio, T, E, K);
  gpu->gate_bwd(&dio, T, E, K);
  check_f("dlogits", dl, TOL);
  /* the cpu's op is its pieces, to the bit */
  float *dt = host_alloc(sizeof(float) * (size_t)(T * K)), *ds = host_alloc(sizeof(float) * (size_t)(T * E)),
        *want = host_alloc(sizeof(float) * (size_t)(T * E));
  moert_cpu_gate_normalize_bwd(topv.h, dgate.h, dt, T, K, normalize);
  memset(ds, 0, sizeof(float) * (size_t)(T * E));
  moert_cpu_gate_scores_bwd(idx.h, dt, c.h, 0.01f, ds, T, E, K);
  moert_cpu_softmax_bwd(scores.h, ds, want, T, E);
  checks++;
  if (memcmp(want, dl.h, sizeof(float) * (size_t)(T * E)) != 0) {
    fail_header("the cpu's gate_bwd differs from its pieces");
  }
  end();
}

/* Today's routers (moert_cpu_gate_io's fields past the Tutel gate) on both
 * backends: a router's settings, each off when zero. */
typedef struct router {
  bool sigmoid, bias, z, entropy;
  int64_t groups, top_groups;
  float route_scale;
  int64_t ec; /* expert choice's capacity */
} router;

enum { R_TIES = 1, R_NOISE = 2, R_NORMALIZE = 4, R_AUX = 8, R_ORDER = 16 };

static int router_name(char *buf, size_t n, router r) {
  return snprintf(buf, n, "%s%s%s%s", r.sigmoid ? " sigmoid" : " softmax", r.bias ? " bias" : "",
                  r.z ? " z" : "", r.entropy ? " entropy" : "");
}

/* The forward: selections exact, floats to TOL; the z and entropy sums (and
 * the aux loss) as scalars. R_TIES: logits (and biases) from a few values,
 * so that keys, group scores and an expert's tokens tie. */
static void t_router_fwd(int64_t T, int64_t E, int64_t K, router r, int flags) {
  char what[96];
  router_name(what, sizeof what, r);
  begin("router fwd T=%lld E=%lld k=%lld%s groups=%lld/%lld scale=%g ec=%lld%s%s%s%s%s", (long long)T,
        (long long)E, (long long)K, what, (long long)r.groups, (long long)r.top_groups, r.route_scale,
        (long long)r.ec, flags & R_TIES ? " ties" : "", flags & R_NOISE ? " noise" : "",
        flags & R_NORMALIZE ? " normalized" : "", flags & R_AUX ? " aux" : "",
        flags & R_ORDER ? " priority order" : "");
  fbuf logits = fb(T * E, -4, 4), nz = flags & R_NOISE ? fb(T * E, -0.5f, 0.5f) : (fbuf){0},
       bias = r.bias ? fb(E, -0.3f, 0.3f) : (fbuf){0};
  if (flags & R_TIES) {
    for (int64_t i = 0; i < T * E; i++) logits.h[i] = (float)irand(3) * 0.5f;
    for (int64_t e = 0; r.bias && e < E; e++) bias.h[e] = (float)irand(2) * 0.25f;
    sync_f(logits);
    if (r.bias) sync_f(bias);
  }
  fbuf scores = garbage(T * E), topv = garbage(T * K), gate = garbage(T * K), ssum = garbage(E),
       top1 = garbage(E), coef = garbage(E), aux = garbage(1), zs = garbage(1), ent = garbage(1);
  ibuf idx = ib(T * K, -5, 5), loc = ib(T * K, -9, 9), counts = ib(E, -9, 9),
       order = flags & R_ORDER || r.ec ? ib(T, -3, 3) : (ibuf){0};
  moert_cpu_gate_io h = {.logits = logits.h, .noise = nz.h, .scores = scores.h, .idx = idx.h, .loc = loc.h,
                         .topv = topv.h, .gate = gate.h, .order = order.h, .counts = counts.h,
                         .score_sum = ssum.h, .top1_count = top1.h, .dscore_coef = coef.h,
                         .aux_out = flags & R_AUX ? aux.h : NULL, .global_tokens = (double)T,
                         .normalize = flags & R_NORMALIZE, .sigmoid = r.sigmoid, .bias = bias.h,
                         .groups = r.groups, .top_groups = r.top_groups, .route_scale = r.route_scale,
                         .ec_capacity = r.ec, .z_sum = r.z ? zs.h : NULL, .entropy_sum = r.entropy ? ent.h : NULL};
  moert_cpu_gate_io d = {.logits = logits.d, .noise = nz.d, .scores = scores.d, .idx = idx.d, .loc = loc.d,
                         .topv = topv.d, .gate = gate.d, .order = r.ec ? NULL : order.d, .counts = counts.d,
                         .score_sum = ssum.d, .top1_count = top1.d, .dscore_coef = coef.d,
                         .aux_out = flags & R_AUX ? aux.d : NULL, .global_tokens = (double)T,
                         .normalize = flags & R_NORMALIZE, .sigmoid = r.sigmoid, .bias = bias.d,
                         .groups = r.groups, .top_groups = r.top_groups, .route_scale = r.route_scale,
                         .ec_capacity = r.ec, .z_sum = r.z ? zs.d : NULL, .entropy_sum = r.entropy ? ent.d : NULL};
  cpu->gate_fwd(&h, T, E, K);
  /* first on other logits: nothing may carry over between launches */
  fbuf other = fb(T * E, -4, 4);
  d.logits = other.d;
  gpu->gate_fwd(&d, T, E, K);
  d.logits = logits.d;
  gpu->gate_fwd(&d, T, E, K);
  check_f("scores", scores, TOL_SCORES);
  check_i("idx", idx);
  check_f("topv", topv, TOL_SCORES);
  check_f("gate", gate, TOL);
  if (flags & R_ORDER && !r.ec) check_i("order", order);
  check_i("loc", loc);
  check_i("counts", counts);
  check_f("score_sum (written)", ssum, TOL);
  check_f("top1_count (written)", top1, 0);
  float got;
  if (r.z) {
    download(&got, zs.d, sizeof got);
    check_scalar("z_sum", got, zs.h[0], TOL);
  }
  if (r.entropy) {
    download(&got, ent.d, sizeof got);
    check_scalar("entropy_sum", got, ent.h[0], TOL);
  }
  if (flags & R_AUX) {
    check_f("aux loss", aux, 1e-6);
    check_f("dscore_coef", coef, TOL);
  }
  end();
}

/* The backward of a router: scores in (0, 1) (a sigmoid's, or rows that a
 * softmax could not make, which the op takes alike), the z-loss from logits
 * and noise. */
static void t_router_bwd(int64_t T, int64_t E, int64_t K, router r, bool coef, bool normalize,
                         float z_weight) {
  char what[96];
  router_name(what, sizeof what, r);
  begin("router bwd T=%lld E=%lld k=%lld%s scale=%g ec=%lld%s%s z_weight=%g", (long long)T, (long long)E,
        (long long)K, what, r.route_scale, (long long)r.ec, coef ? " coef" : "", normalize ? " normalized" : "",
        z_weight);
  ibuf idx = claims(T, K, E);
  fbuf scores = fb(T * E, 0, 1), topv = fb(T * K, 0.01f, 1), dgate = fb(T * K, -1, 1),
       c = coef ? fb(E, -1, 1) : (fbuf){0}, dl = garbage(T * E), logits = fb(T * E, -4, 4),
       nz = fb(T * E, -0.5f, 0.5f);
  moert_cpu_gate_bwd_io hio = {.scores = scores.h, .idx = idx.h, .topv = topv.h, .dgate = dgate.h,
                               .dscore_coef = c.h, .weight = 0.01f, .logits = logits.h, .noise = nz.h,
                               .z_weight = z_weight, .global_tokens = 3.0 * (double)T, .dlogits = dl.h,
                               .normalize = normalize, .sigmoid = r.sigmoid, .route_scale = r.route_scale,
                               .ec_capacity = r.ec};
  moert_cpu_gate_bwd_io dio = {.scores = scores.d, .idx = idx.d, .topv = topv.d, .dgate = dgate.d,
                               .dscore_coef = c.d, .weight = 0.01f, .logits = logits.d, .noise = nz.d,
                               .z_weight = z_weight, .global_tokens = 3.0 * (double)T, .dlogits = dl.d,
                               .normalize = normalize, .sigmoid = r.sigmoid, .route_scale = r.route_scale,
                               .ec_capacity = r.ec};
  cpu->gate_bwd(&hio, T, E, K);
  gpu->gate_bwd(&dio, T, E, K);
  check_f("dlogits", dl, TOL);
  end();
}

static void run_routers(void) {
  typedef struct {
    int64_t T, E, K;
    router r;
    int flags;
  } fwd_case;
  static const fwd_case fwd[] = {
      {37, 8, 2, {.sigmoid = true}, R_NORMALIZE | R_AUX},
      {300, 13, 3, {.sigmoid = true, .bias = true}, R_NORMALIZE | R_ORDER | R_AUX},
      {257, 8, 2, {.sigmoid = true, .bias = true}, R_TIES | R_NORMALIZE},
      {300, 64, 4, {.bias = true, .route_scale = 2.5f}, R_NOISE | R_AUX},
      {300, 64, 4, {.sigmoid = true, .bias = true, .groups = 8, .top_groups = 3, .route_scale = 2.5f},
       R_NORMALIZE | R_AUX},
      {257, 16, 2, {.sigmoid = true, .bias = true, .groups = 4, .top_groups = 2}, R_TIES | R_ORDER},
      {100, 8, 3, {.groups = 8, .top_groups = 3}, R_NOISE}, /* one expert a group */
      {100, 13, 2, {.groups = 4, .top_groups = 1}, 0},     /* expert 12 in no group */
      {300, 40, 2, {.z = true, .entropy = true}, R_NOISE | R_NORMALIZE | R_AUX},
      {300, 40, 2, {.sigmoid = true, .z = true, .entropy = true, .route_scale = 0.5f}, R_NOISE},
      {1, 1, 1, {.z = true, .entropy = true}, 0},
      /* expert choice: C < T, C >= T, ties in every column */
      {200, 16, 16, {.ec = 25, .route_scale = 2, .z = true, .entropy = true}, R_AUX},
      {200, 16, 16, {.sigmoid = true, .ec = 30}, R_NOISE | R_AUX},
      {70, 8, 8, {.ec = 100}, R_TIES},
      {300, 6, 6, {.sigmoid = true, .ec = 77}, R_TIES | R_AUX},
      {1, 3, 3, {.ec = 1}, 0},
      /* more taken tokens than gate_ec has threads, and tiles of keys */
      {700, 4, 4, {.sigmoid = true, .ec = 600}, R_NOISE},
      {700, 3, 3, {.ec = 650}, R_TIES | R_AUX},
  };
  for (size_t i = 0; i < sizeof fwd / sizeof fwd[0]; i++)
    t_router_fwd(fwd[i].T, fwd[i].E, fwd[i].K, fwd[i].r, fwd[i].flags);
  t_router_bwd(300, 13, 3, (router){.sigmoid = true}, true, true, 0);
  t_router_bwd(300, 13, 3, (router){.sigmoid = true, .route_scale = 2.5f}, false, false, 0);
  t_router_bwd(257, 64, 4, (router){.route_scale = 2.5f}, true, true, 0);
  t_router_bwd(257, 64, 4, (router){.route_scale = 0.5f}, true, true, 0.01f);
  t_router_bwd(200, 40, 2, (router){.sigmoid = true, .route_scale = 1.5f}, true, true, 0.1f);
  t_router_bwd(200, 16, 16, (router){.ec = 25, .route_scale = 2}, true, true, 0.01f);
  t_router_bwd(200, 16, 16, (router){.sigmoid = true, .ec = 25}, true, false, 0.01f);
}

/* --- dispatch and combine --- */

/* Routing as the executor makes it: claims, locations (in token or priority
 * order), a capacity C that drops some, and drop_beyond(keep) dropping more. */
static void t_dispatch_combine(int64_t T, int64_t K, int64_t E, int64_t C, int64_t keep,
                               int64_t M, bool ordered) {
  begin("dispatch, combine, _bwd T=%lld k=%lld E=%lld C=%lld keep=%lld M=%lld%s", (long long)T,
        (long long)K, (long long)E, (long long)C, (long long)keep, (long long)M,
        ordered ? " priority order" : "");
  ibuf idx = claims(T, K, E), loc = ib(T * K, 0, 1), counts = ib(E, 0, 1), order = {0};
  if (ordered) {
    fbuf topv = fb(T * K, 0, 1);
    order = ib(T, 0, 1);
    moert_cpu_gate_priority_order(topv.h, order.h, T, K);
  }
  moert_cpu_gate_locations(idx.h, order.h, loc.h, counts.h, T, E, K);
  cpu->drop_beyond(loc.h, T * K, keep);
  sync_i(loc);
  int64_t kept = 0;
  for (int64_t i = 0; i < T * K; i++) kept += idx.h[i] >= 0 && idx.h[i] < E && loc.h[i] < C;
  printf("     (%lld of %lld claims kept)\n", (long long)kept, (long long)(T * K));
  fbuf x = fb(T * M, -1, 1), buf = garbage(E * C * M);
  cpu->dispatch(x.h, idx.h, loc.h, buf.h, T, K, E, C, M);
  gpu->dispatch(x.d, idx.d, loc.d, buf.d, T, K, E, C, M);
  check_f("buf (dispatch)", buf, 0);
  fbuf dbuf = fb(E * C * M, -1, 1), dx = garbage(T * M);
  cpu->dispatch_bwd(dbuf.h, idx.h, loc.h, dx.h, T, K, E, C, M);
  gpu->dispatch_bwd(dbuf.d, idx.d, loc.d, dx.d, T, K, E, C, M);
  check_f("dx (dispatch_bwd)", dx, 0);
  fbuf ebuf = fb(E * C * M, -1, 1), gate = fb(T * K, 0, 1), y = garbage(T * M);
  cpu->combine(ebuf.h, idx.h, loc.h, gate.h, y.h, T, K, E, C, M);
  gpu->combine(ebuf.d, idx.d, loc.d, gate.d, y.d, T, K, E, C, M);
  check_f("y (combine)", y, TOL);
  fbuf dy = fb(T * M, -1, 1), dbuf2 = garbage(E * C * M), dgate = garbage(T * K);
  cpu->combine_bwd(dy.h, ebuf.h, idx.h, loc.h, gate.h, dbuf2.h, dgate.h, T, K, E, C, M);
  gpu->combine_bwd(dy.d, ebuf.d, idx.d, loc.d, gate.d, dbuf2.d, dgate.d, T, K, E, C, M);
  check_f("dbuf (combine_bwd)", dbuf2, TOL);
  check_f("dgate (combine_bwd)", dgate, TOL);
  end();
}

/* --- embedding, losses --- */

static void t_embed(int64_t T, int64_t context, int64_t vocab, int64_t M) {
  begin("embed_fwd, embed_bwd T=%lld context=%lld vocab=%lld M=%lld", (long long)T,
        (long long)context, (long long)vocab, (long long)M);
  fbuf table = fb(context * vocab * M, -1, 1), x = garbage(T * M);
  ibuf win = ib(T * context, -1, vocab + 1); /* -1 and vocab: skipped */
  cpu->embed_fwd(table.h, win.h, x.h, T, context, vocab, M);
  gpu->embed_fwd(table.d, win.d, x.d, T, context, vocab, M);
  check_f("x", x, TOL);
  fbuf dx = fb(T * M, -1, 1), dtable = fb(context * vocab * M, -1, 1);
  cpu->embed_bwd(dx.h, win.h, dtable.h, T, context, vocab, M);
  gpu->embed_bwd(dx.d, win.d, dtable.d, T, context, vocab, M);
  /* up to 65536 rows, each row's additions in the cpu's order: the same bits
   * (so runs repeat to the bit); beyond, atomics in any order */
  bool rows = context * vocab <= 65536;
  check_f(rows ? "dtable (accumulated, to the bit)" : "dtable (accumulated, atomics)", dtable, rows ? 0 : TOL);
  end();
}

/* smoothing: label smoothing of the dlogits (the loss stays the plain one) */
static void t_xent(int64_t rows, int64_t vocab, bool grad, float smoothing) {
  begin("xent rows=%lld vocab=%lld%s smoothing=%g", (long long)rows, (long long)vocab,
        grad ? " with dlogits" : "", smoothing);
  fbuf logits = fb(rows * vocab, -6, 6), dl = garbage(rows * vocab);
  ibuf target = ib(rows, 0, vocab);
  for (int64_t r = 0; r < rows; r += 5) target.h[r] = r % 10 ? -1 : (int32_t)vocab; /* ignored */
  sync_i(target);
  float scale = 1.0f / (float)rows;
  double want = cpu->xent(logits.h, target.h, grad ? dl.h : NULL, rows, vocab, scale, smoothing);
  double got = gpu->xent(logits.d, target.d, grad ? dl.d : NULL, rows, vocab, scale, smoothing);
  check_scalar("loss", got, want, 1e-6);
  check_f("dlogits", dl, TOL);
  /* xent_to: the same sum left in device memory, the same dlogits */
  double *out = dev_scalar(), got_to = NAN;
  fbuf dl2 = garbage(rows * vocab);
  double want_to = cpu->xent(logits.h, target.h, grad ? dl2.h : NULL, rows, vocab, scale, smoothing);
  gpu->xent_to(logits.d, target.d, grad ? dl2.d : NULL, rows, vocab, scale, smoothing, out);
  download(&got_to, out, sizeof got_to);
  check_scalar("loss (xent_to)", got_to, want_to, 1e-6);
  check_f("dlogits (xent_to)", dl2, TOL);
  end();
}

static void t_mse(int64_t n, bool grad) {
  begin("mse n=%lld%s", (long long)n, grad ? " with dyhat" : "");
  fbuf yhat = fb(n, -1, 1), y = fb(n, -1, 1), d = garbage(n);
  double want = cpu->mse(yhat.h, y.h, grad ? d.h : NULL, n, 0.125f);
  double got = gpu->mse(yhat.d, y.d, grad ? d.d : NULL, n, 0.125f);
  check_scalar("sum", got, want, 1e-9);
  check_f("dyhat", d, TOL);
  double *out = dev_scalar(), got_to = NAN;
  fbuf d2 = garbage(n);
  double want_to = cpu->mse(yhat.h, y.h, grad ? d2.h : NULL, n, 0.125f);
  gpu->mse_to(yhat.d, y.d, grad ? d2.d : NULL, n, 0.125f, out);
  download(&got_to, out, sizeof got_to);
  check_scalar("sum (mse_to)", got_to, want_to, 1e-9);
  check_f("dyhat (mse_to)", d2, TOL);
  end();
}

/* --- optimizers --- */

/* The optimizer's bf16 copy on the gpu is its own updated p rounded (bitwise),
 * and the cpu's is the cpu's p rounded. */
static void check_low(const char *what, fbuf p, const uint16_t *low_d, const uint16_t *low_h) {
  checks++;
  float *pg = malloc(sizeof(float) * (size_t)(p.n ? p.n : 1));
  uint16_t *lg = malloc(sizeof(uint16_t) * (size_t)(p.n ? p.n : 1));
  download(pg, p.d, sizeof(float) * (size_t)p.n);
  download(lg, low_d, sizeof(uint16_t) * (size_t)p.n);
  int64_t bad = 0, first = -1;
  for (int64_t i = 0; i < p.n; i++)
    if (lg[i] != moert_f32_to_bf16(pg[i]) || low_h[i] != moert_f32_to_bf16(p.h[i])) {
      bad++;
      if (first < 0) first = i;
    }
  if (bad) {
    fail_header(what);
    printf("    %lld of %lld differ; first [%lld]: gpu p %.9g copy 0x%04x, cpu p %.9g copy 0x%04x\n",
           (long long)bad, (long long)p.n, (long long)first, pg[first], lg[first], p.h[first], low_h[first]);
  }
  free(pg);
  free(lg);
}

static void t_optim(int64_t n) {
  begin("sumsq, scale, adamw, sgd n=%lld", (long long)n);
  fbuf x = fb(n, -1, 1);
  check_scalar("sumsq", gpu->sumsq(x.d, n), cpu->sumsq(x.h, n), 1e-9);
  cpu->scale(x.h, n, 0.37f);
  gpu->scale(x.d, n, 0.37f);
  check_f("scale", x, 0);
  fbuf p = fb(n, -1, 1), g = fb(n, -1, 1), m = fb(n, -0.1f, 0.1f), v = fb(n, 0, 0.01f);
  /* the bf16 copy written in the same pass (step 7 and sgd), not at step 1 */
  uint16_t *low = dev_alloc(sizeof(uint16_t) * (size_t)n), *lh = host_alloc(sizeof(uint16_t) * (size_t)n);
  /* the gradient scaled by a factor in device memory (clipping) at step 7 and in sgd */
  const float gs = 0.37f;
  float *gs_d = dev_alloc(sizeof(float));
  upload(gs_d, &gs, sizeof gs);
  for (int64_t step = 1; step <= 7; step += 6) {
    cpu->adamw(p.h, g.h, m.h, v.h, n, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, step, step > 1 ? &gs : NULL,
               step > 1 ? lh : NULL);
    gpu->adamw(p.d, g.d, m.d, v.d, n, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, step, step > 1 ? gs_d : NULL,
               step > 1 ? low : NULL);
  }
  check_f("adamw p", p, TOL);
  check_f("adamw m", m, TOL);
  check_f("adamw v", v, TOL);
  check_low("adamw's bf16 copy", p, low, lh);
  cpu->sgd(p.h, g.h, n, 0.1f, 0.01f, &gs, lh);
  gpu->sgd(p.d, g.d, n, 0.1f, 0.01f, gs_d, low);
  check_f("sgd p", p, TOL);
  check_low("sgd's bf16 copy", p, low, lh);
  end();
}

/* The cosine gate's temperature read on the device: scale_by_exp and
 * add_dot_unclamped, below the clamp and above it. */
static void t_cosine_temp(int64_t n, bool clamped) {
  begin("scale_by_exp, add_dot_unclamped n=%lld%s", (long long)n, clamped ? " clamped" : "");
  const double max_log = 4.605170185988091;
  fbuf x = fb(n, -1, 1), y = garbage(n), a = fb(n, -1, 1), ls = fb(1, 0, 0), acc = fb(1, -1, 1);
  ls.h[0] = clamped ? 5.5f : 2.5f;
  sync_f(ls);
  cpu->scale_by_exp(y.h, x.h, n, ls.h, max_log);
  gpu->scale_by_exp(y.d, x.d, n, ls.d, max_log);
  check_f("y = x exp(t)", y, 1e-6);
  cpu->add_dot_unclamped(acc.h, a.h, x.h, n, ls.h, max_log);
  gpu->add_dot_unclamped(acc.d, a.d, x.d, n, ls.d, max_log);
  check_f(clamped ? "acc (unchanged: clamped)" : "acc += sum(a x)", acc, 1e-6);
  end();
}

/* The gradient norm left on the device: sumsq_to, norm_split, clip_factor. */
static void t_norm(int64_t n) {
  begin("sumsq_to, norm_split, clip_factor n=%lld", (long long)n);
  fbuf x = fb(n, -1, 1), y = fb(n, -3, 3);
  /* three parts in one device array (8-byte aligned in the misaligned pass too) */
  double part_h[3], *parts = (double *)((uintptr_t)dev_alloc(4 * sizeof(double)) & ~(uintptr_t)7);
  cpu->sumsq_to(x.h, n, &part_h[0]);
  cpu->sumsq_to(y.h, n, &part_h[1]);
  cpu->sumsq_to(x.h, n / 2, &part_h[2]);
  gpu->sumsq_to(x.d, n, parts);
  gpu->sumsq_to(y.d, n, parts + 1);
  gpu->sumsq_to(x.d, n / 2, parts + 2);
  double got[3];
  download(got, parts, sizeof got);
  for (int i = 0; i < 3; i++) check_scalar("sumsq_to", got[i], part_h[i], 1e-9);
  float hilo_h[2], *hilo_d = dev_alloc(2 * sizeof(float)), hilo_g[2];
  cpu->norm_split(part_h + 1, 2, hilo_h);
  gpu->norm_split(parts + 1, 2, hilo_d);
  download(hilo_g, hilo_d, sizeof hilo_g);
  check_scalar("norm_split", (double)hilo_g[0] + hilo_g[1], (double)hilo_h[0] + hilo_h[1], 1e-12);
  for (int c = 0; c < 3; c++) {
    double clip = c == 0 ? 0 : c == 1 ? 1.0 : 1e9, norm_h, norm_g, *norm_d = dev_scalar();
    float fac_h, fac_g, *fac_d = dev_alloc(sizeof(float));
    cpu->clip_factor(part_h, 1, hilo_h, clip, &norm_h, &fac_h);
    gpu->clip_factor(parts, 1, hilo_d, clip, norm_d, fac_d);
    download(&norm_g, norm_d, sizeof norm_g);
    download(&fac_g, fac_d, sizeof fac_g);
    check_scalar("clip_factor: the norm", norm_g, norm_h, 1e-9);
    check_scalar("clip_factor: the factor", fac_g, fac_h, 1e-6);
  }
  end();
}


/* --- the expert path in bf16 (cpu_ops_typed.h): the gpu against the cpu's
 * emulation, which rounds to bf16 at the same points; the two differ only by
 * the order of fp32 sums, so a rounding step now and then (tolerance 1e-2,
 * conversions and copies exact). --- */

#define TOLB 1e-2

typedef struct hbuf {
  uint16_t *h;
  void *d;
  int64_t n;
} hbuf;

/* n random bf16 values in [lo, hi) on both sides. */
static hbuf hb(int64_t n, float lo, float hi) {
  hbuf b = {host_alloc(2 * (size_t)n), dev_alloc(2 * (size_t)n), n};
  for (int64_t i = 0; i < n; i++) b.h[i] = moert_f32_to_bf16(frand(lo, hi));
  upload(b.d, b.h, 2 * (size_t)n);
  return b;
}

/* The gpu's bf16 b.d against the cpu's b.h, widened (the gpu's convert is
 * checked exactly by t_convert first). */
static void check_h(const char *what, hbuf b, double tol) {
  fbuf w = {host_alloc(sizeof(float) * (size_t)b.n), dev_alloc(sizeof(float) * (size_t)b.n), b.n};
  moert_cpu_convert(w.h, MOERT_F32, b.h, MOERT_BF16, b.n);
  gpu->convert(w.d, MOERT_F32, b.d, MOERT_BF16, b.n);
  check_f(what, w, tol);
}

static void t_convert(int64_t n) {
  begin("convert fp32 <-> bf16 n=%lld", (long long)n);
  fbuf x = fb(n, -100, 100);
  x.h[0] = 1.00390625f; /* a tie: rounds to even */
  if (n > 2) x.h[1] = NAN, x.h[2] = -0.0f;
  sync_f(x);
  hbuf y = hb(n, -1, 1);
  moert_cpu_convert(y.h, MOERT_BF16, x.h, MOERT_F32, n);
  gpu->convert(y.d, MOERT_BF16, x.d, MOERT_F32, n);
  uint16_t *got = host_alloc(2 * (size_t)n);
  download(got, y.d, 2 * (size_t)n);
  checks++;
  if (memcmp(got, y.h, 2 * (size_t)n) != 0) {
    fail_header("bf16 bits (convert fp32 -> bf16)");
    for (int64_t i = 0, shown = 0; i < n && shown < SHOW; i++)
      if (got[i] != y.h[i]) printf("    [%lld] gpu %04x cpu %04x\n", (long long)i, got[i], y.h[i]), shown++;
  }
  fbuf z = garbage(n);
  moert_cpu_convert(z.h, MOERT_F32, y.h, MOERT_BF16, n);
  gpu->convert(z.d, MOERT_F32, y.d, MOERT_BF16, n);
  check_f("fp32 (convert bf16 -> fp32)", z, 0);
  end();
}

static void t_gemm_bf16(bool ta, bool tb, int64_t m, int64_t n, int64_t k, int64_t count, bool c_f32,
                        bool bias, float beta) {
  begin("gemm_ex bf16%s%s %lldx%lldx%lld x%lld -> %s%s beta=%g", ta ? " A^T" : "", tb ? " B^T" : "",
        (long long)m, (long long)n, (long long)k, (long long)count, c_f32 ? "fp32" : "bf16",
        bias ? " +bias" : "", beta);
  hbuf a = hb(count * m * k, -1, 1), b = hb(count * k * n, -1, 1);
  moert_gemm g = {.trans_a = ta, .trans_b = tb, .m = m, .n = n, .k = k, .count = count, .alpha = 1,
                  .beta = beta, .ab_type = MOERT_BF16, .lda = ta ? m : k, .stride_a = m * k,
                  .ldb = tb ? k : n, .stride_b = k * n, .ldc = n, .stride_c = m * n, .stride_bias = n};
  moert_gemm h = g;
  g.a = a.d, g.b = b.d, h.a = a.h, h.b = b.h;
  if (c_f32) {
    fbuf c = fb(count * m * n, -1, 1);
    g.c = c.d, h.c = c.h, g.c_type = h.c_type = MOERT_F32;
    fbuf bs = fb(count * n, -1, 1);
    if (bias) g.bias = bs.d, h.bias = bs.h;
    moert_cpu_gemm_ex(&h);
    gpu->gemm_ex(&g);
    check_f("C (fp32)", c, 1e-5);
  } else {
    hbuf c = hb(count * m * n, -1, 1);
    g.c = c.d, h.c = c.h, g.c_type = h.c_type = MOERT_BF16;
    hbuf bs = hb(count * n, -1, 1);
    if (bias) g.bias = bs.d, h.bias = bs.h;
    moert_cpu_gemm_ex(&h);
    gpu->gemm_ex(&g);
    check_h("C (bf16)", c, TOLB);
  }
  end();
}

/* --- gemm_ex with its epilogue (bias, relu or gelu, aux), fp32 and bf16,
 * through cuBLASLt and through cuBLAS with kernels, against the cpu's
 * moert_cpu_gemm_ex (fp32 1e-5, bf16 results 1e-2). --- */

/* A buffer of type t on both sides (fp32 or bf16). */
typedef struct tbuf {
  void *h, *d;
  int64_t n;
  moert_dt t;
} tbuf;

static tbuf tb(moert_dt t, int64_t n, float lo, float hi) {
  if (t == MOERT_F32) {
    fbuf f = fb(n, lo, hi);
    return (tbuf){f.h, f.d, n, t};
  }
  hbuf h = hb(n, lo, hi);
  return (tbuf){h.h, h.d, n, t};
}

static void check_t(const char *what, tbuf b, double tol) {
  if (b.t == MOERT_F32) check_f(what, (fbuf){b.h, b.d, b.n}, tol);
  else check_h(what, (hbuf){b.h, b.d, b.n}, tol);
}

static const char *const epi_names[] = {"", " relu", " gelu"};

/* h on the cpu and g on the GPU; the case's name says which library ran g.
 * True when it was cuBLASLt; *plans: the cuBLASLt plans made so far. */
static bool gemm_both(moert_gemm *h, moert_gemm *g, int64_t *lt_after, int *plans) {
  int64_t lt0, blas0, blas1;
  int plans0;
  moert_backend_cuda_gemm_counts(gpu, &lt0, &blas0, &plans0);
  moert_cpu_gemm_ex(h);
  gpu->gemm_ex(g);
  moert_backend_cuda_gemm_counts(gpu, lt_after, &blas1, plans);
  bool ran_lt = *lt_after > lt0;
  size_t len = strlen(case_name);
  snprintf(case_name + len, sizeof case_name - len, " on %s", ran_lt ? "cuBLASLt" : "cuBLAS");
  return ran_lt;
}

/* One gemm_ex with an epilogue, on cuBLASLt (lt) or cuBLAS. want_lt: the
 * aligned pass must have run it on cuBLASLt (when it loaded). */
static void t_gemm_epi(moert_dt ab, moert_dt ct, bool ta, bool tb_, int64_t m, int64_t n, int64_t k,
                       int64_t count, bool bias, moert_epi act, bool aux, float beta, bool lt, bool want_lt) {
  bool on = moert_backend_cuda_set_cublaslt(gpu, lt);
  begin("gemm_ex %s%s%s %lldx%lldx%lld x%lld -> %s%s%s%s beta=%g", ab == MOERT_BF16 ? "bf16" : "fp32",
        ta ? " A^T" : "", tb_ ? " B^T" : "", (long long)m, (long long)n, (long long)k, (long long)count,
        ct == MOERT_BF16 ? "bf16" : "fp32", bias ? " +bias" : "", epi_names[act], aux ? " +aux" : "", beta);
  tbuf a = tb(ab, count * m * k, -1, 1), b = tb(ab, count * k * n, -1, 1), c = tb(ct, count * m * n, -1, 1);
  tbuf bs = tb(ct, count * n, -1, 1), x = tb(ct, count * m * n, -7, 7);
  moert_gemm g = {.trans_a = ta, .trans_b = tb_, .m = m, .n = n, .k = k, .count = count, .alpha = 1,
                  .beta = beta, .ab_type = ab, .lda = ta ? m : k, .stride_a = m * k, .ldb = tb_ ? k : n,
                  .stride_b = k * n, .c_type = ct, .ldc = n, .stride_c = m * n, .stride_bias = n, .act = act};
  moert_gemm h = g;
  g.a = a.d, g.b = b.d, g.c = c.d, h.a = a.h, h.b = b.h, h.c = c.h;
  if (bias) g.bias = bs.d, h.bias = bs.h;
  if (aux) g.aux = x.d, h.aux = x.h;
  int64_t lt1;
  int plans1;
  bool ran_lt = gemm_both(&h, &g, &lt1, &plans1);
  double tol = ct == MOERT_F32 ? 1e-5 : TOLB;
  check_t("C", c, tol);
  if (aux) check_t("aux (the pre-activation)", x, tol);
  checks++;
  if (want_lt && on && !misalign && !ran_lt) fail_header("ran on cuBLAS: cuBLASLt has no algorithm for it");
  if (ran_lt && beta == 0) { /* a second call of the shape reuses its plan */
    gpu->gemm_ex(&g);
    int64_t lt2, blas2;
    int plans2;
    moert_backend_cuda_gemm_counts(gpu, &lt2, &blas2, &plans2);
    checks++;
    if (plans2 != plans1 || lt2 != lt1 + 1) fail_header("the second call of a shape made a plan");
    check_t("C, again", c, tol);
  }
  end();
  moert_backend_cuda_set_cublaslt(gpu, true);
}

/* A weight-gradient gemm_ex with the bias gradient (the column sums of B,
 * written over values already there), fp32 C, against the cpu's. The
 * emulation's cuBLASLt has the BGRADA epilogue, so there it must run on
 * cuBLASLt; on a GPU the case's name says which ran (no algorithm for it: the
 * GEMM on cuBLASLt without it, and a kernel's sums). */
static void t_gemm_bgrad(moert_dt ab, bool ta, int64_t m, int64_t n, int64_t k, int64_t count, float beta, bool lt) {
  bool on = moert_backend_cuda_set_cublaslt(gpu, lt);
  begin("gemm_ex %s%s %lldx%lldx%lld x%lld -> fp32 +bias_grad beta=%g", ab == MOERT_BF16 ? "bf16" : "fp32",
        ta ? " A^T" : "", (long long)m, (long long)n, (long long)k, (long long)count, beta);
  tbuf a = tb(ab, count * m * k, -1, 1), b = tb(ab, count * k * n, -1, 1), c = tb(MOERT_F32, count * m * n, -1, 1);
  fbuf db = fb(count * n, -7, 7);
  moert_gemm g = {.trans_a = ta, .m = m, .n = n, .k = k, .count = count, .alpha = 1, .beta = beta, .ab_type = ab,
                  .lda = ta ? m : k, .stride_a = m * k, .ldb = n, .stride_b = k * n, .c_type = MOERT_F32, .ldc = n,
                  .stride_c = m * n};
  moert_gemm h = g;
  g.a = a.d, g.b = b.d, g.c = c.d, g.bias_grad = db.d, h.a = a.h, h.b = b.h, h.c = c.h, h.bias_grad = db.h;
  int64_t lt1;
  int plans1;
  bool ran_lt = gemm_both(&h, &g, &lt1, &plans1);
  check_t("C", c, 1e-5);
  check_f("bias_grad", db, 1e-5);
  checks++;
  if (on && !misalign && !ran_lt && getenv("MOEC_EMU_GPUS"))
    fail_header("ran on cuBLAS: the emulation's cuBLASLt has the BGRADA epilogue");
  end();
  moert_backend_cuda_set_cublaslt(gpu, true);
}

static void run_gemm_epi(void) {
  static const moert_dt types[3][2] = {{MOERT_F32, MOERT_F32}, {MOERT_BF16, MOERT_BF16}, {MOERT_BF16, MOERT_F32}};
  for (int lt = 1; lt >= 0; lt--)
    for (int t = 0; t < 3; t++) {
      moert_dt ab = types[t][0], ct = types[t][1];
      bool bf = ab == MOERT_BF16; /* the expert path's GEMMs: they must have cuBLASLt's algorithms */
      for (int act = 0; act < 3; act++) {
        /* fc1 of 3 experts: bias and act, with aux for gelu; then without bias */
        t_gemm_epi(ab, ct, false, false, 64, 96, 128, 3, true, (moert_epi)act, act == MOERT_EPI_GELU, 0, lt, bf);
        t_gemm_epi(ab, ct, false, false, 64, 96, 128, 3, false, (moert_epi)act, false, 0, lt, bf);
        /* odd sizes: aux's ld not a multiple of 8 (cuBLAS and kernels) */
        t_gemm_epi(ab, ct, false, false, 37, 50, 23, 2, true, (moert_epi)act, act != MOERT_EPI_NONE, 0, lt, false);
        /* beta and transposes with an epilogue */
        t_gemm_epi(ab, ct, true, false, 48, 64, 200, 4, true, (moert_epi)act, act == MOERT_EPI_GELU, 0.5f, lt, false);
        t_gemm_epi(ab, ct, false, true, 200, 48, 64, 4, true, (moert_epi)act, act == MOERT_EPI_GELU, 0, lt, false);
        t_gemm_epi(ab, ct, true, true, 24, 40, 16, 2, true, (moert_epi)act, act == MOERT_EPI_GELU, 1, lt, false);
      }
      /* one GEMM, and the plain ones of the backward (fp32 C accumulates) */
      t_gemm_epi(ab, ct, false, false, 256, 512, 256, 1, true, MOERT_EPI_GELU, true, 0, lt, bf);
      t_gemm_epi(ab, ct, true, false, 48, 64, 200, 4, false, MOERT_EPI_NONE, false, 1, lt, false);
      t_gemm_epi(ab, ct, false, true, 200, 48, 64, 4, false, MOERT_EPI_NONE, false, 0, lt, false);
      /* the weight gradients with their biases' (fp32 C): experts, one GEMM, odd sizes */
      if (t != 1) {
        t_gemm_bgrad(ab, true, 96, 64, 128, 3, 0, lt);
        t_gemm_bgrad(ab, true, 64, 256, 512, 1, 0, lt);
        t_gemm_bgrad(ab, true, 37, 50, 23, 2, 0, lt);
      }
    }
}

static void t_act_bf16(int64_t rows, int64_t hid) {
  begin("activations, swiglu, bias in bf16 rows=%lld hid=%lld", (long long)rows, (long long)hid);
  int64_t n = rows * hid;
  for (int a = 0; a < 3; a++) {
    hbuf h = hb(n, -4, 4), y = hb(n, -1, 1), da = hb(n, -1, 1), dh = hb(n, -1, 1);
    moert_cpu_act_fwd_t(MOERT_BF16, (moert_act)a, h.h, y.h, n);
    gpu->act_fwd_t(MOERT_BF16, (moert_act)a, h.d, y.d, n);
    check_h(act_names[a], y, TOLB);
    moert_cpu_act_bwd_t(MOERT_BF16, (moert_act)a, h.h, da.h, dh.h, n);
    gpu->act_bwd_t(MOERT_BF16, (moert_act)a, h.d, da.d, dh.d, n);
    check_h(act_names[a], dh, TOLB);
  }
  hbuf h = hb(2 * n, -4, 4), y = hb(n, -1, 1), da = hb(n, -1, 1), dh = hb(2 * n, -1, 1);
  moert_cpu_swiglu_fwd_t(MOERT_BF16, h.h, y.h, rows, hid);
  gpu->swiglu_fwd_t(MOERT_BF16, h.d, y.d, rows, hid);
  check_h("swiglu", y, TOLB);
  moert_cpu_swiglu_bwd_t(MOERT_BF16, h.h, da.h, dh.h, rows, hid);
  gpu->swiglu_bwd_t(MOERT_BF16, h.d, da.d, dh.d, rows, hid);
  check_h("swiglu_bwd", dh, TOLB);
  int64_t count = 3;
  hbuf yb = hb(count * n, -1, 1), bias = hb(count * hid, -1, 1);
  moert_cpu_bias_add_t(MOERT_BF16, yb.h, bias.h, count, rows, hid);
  gpu->bias_add_t(MOERT_BF16, yb.d, bias.d, count, rows, hid);
  check_h("bias_add_t", yb, TOLB);
  fbuf db = fb(count * hid, -1, 1);
  moert_cpu_bias_grad_t(MOERT_BF16, db.h, yb.h, count, rows, hid);
  gpu->bias_grad_t(MOERT_BF16, db.d, yb.d, count, rows, hid);
  check_f("bias_grad_t (fp32 from bf16)", db, 1e-5);
  end();
}

static void t_dispatch_bf16(int64_t T, int64_t K, int64_t E, int64_t C, int64_t keep, int64_t M) {
  begin("dispatch, combine, _bwd in bf16 T=%lld k=%lld E=%lld C=%lld keep=%lld M=%lld", (long long)T,
        (long long)K, (long long)E, (long long)C, (long long)keep, (long long)M);
  ibuf idx = claims(T, K, E), loc = ib(T * K, 0, 1), counts = ib(E, 0, 1);
  moert_cpu_gate_locations(idx.h, NULL, loc.h, counts.h, T, E, K);
  cpu->drop_beyond(loc.h, T * K, keep);
  sync_i(loc);
  sync_i(counts);
  fbuf x = fb(T * M, -1, 1);
  /* the buffers start full of values: the slots no claim fills must come out zero, the
   * device zeroing only those past each expert's kept claims (counts), or all (NULL) */
  hbuf buf = hb(E * C * M, -7, 7);
  moert_cpu_dispatch_t(MOERT_BF16, x.h, idx.h, loc.h, counts.h, keep, buf.h, T, K, E, C, M);
  gpu->dispatch_t(MOERT_BF16, x.d, idx.d, loc.d, counts.d, keep, buf.d, T, K, E, C, M);
  check_h("buf (dispatch_t, zeroing past the kept claims)", buf, 0);
  hbuf buf0 = hb(E * C * M, -7, 7);
  moert_cpu_dispatch_t(MOERT_BF16, x.h, idx.h, loc.h, NULL, 0, buf0.h, T, K, E, C, M);
  gpu->dispatch_t(MOERT_BF16, x.d, idx.d, loc.d, NULL, 0, buf0.d, T, K, E, C, M);
  check_h("buf (dispatch_t, zeroing all)", buf0, 0);
  fbuf buf32 = fb(E * C * M, -7, 7); /* the fp32 storage type: the same zeroing */
  moert_cpu_dispatch_t(MOERT_F32, x.h, idx.h, loc.h, counts.h, keep, buf32.h, T, K, E, C, M);
  gpu->dispatch_t(MOERT_F32, x.d, idx.d, loc.d, counts.d, keep, buf32.d, T, K, E, C, M);
  check_f("buf (dispatch_t, fp32)", buf32, 0);
  hbuf dbuf = hb(E * C * M, -1, 1);
  fbuf dx = garbage(T * M);
  moert_cpu_dispatch_bwd_t(MOERT_BF16, dbuf.h, idx.h, loc.h, dx.h, T, K, E, C, M);
  gpu->dispatch_bwd_t(MOERT_BF16, dbuf.d, idx.d, loc.d, dx.d, T, K, E, C, M);
  check_f("dx (dispatch_bwd_t)", dx, 1e-6);
  fbuf gate = fb(T * K, 0, 1), y = garbage(T * M);
  moert_cpu_combine_t(MOERT_BF16, dbuf.h, idx.h, loc.h, gate.h, y.h, T, K, E, C, M);
  gpu->combine_t(MOERT_BF16, dbuf.d, idx.d, loc.d, gate.d, y.d, T, K, E, C, M);
  check_f("y (combine_t)", y, 1e-6);
  fbuf dy = fb(T * M, -1, 1), dgate = garbage(T * K);
  hbuf dbuf2 = hb(E * C * M, -7, 7);
  moert_cpu_combine_bwd_t(MOERT_BF16, dy.h, dbuf.h, idx.h, loc.h, counts.h, keep, gate.h, dbuf2.h, dgate.h, T, K, E,
                          C, M);
  gpu->combine_bwd_t(MOERT_BF16, dy.d, dbuf.d, idx.d, loc.d, counts.d, keep, gate.d, dbuf2.d, dgate.d, T, K, E, C, M);
  check_h("dbuf (combine_bwd_t)", dbuf2, 0);
  check_f("dgate (combine_bwd_t)", dgate, 1e-5);
  /* strided block copies of bf16, plain and summed */
  int64_t nb = 5, block = M * 2, sstr = block + 8, dstr = block + 16;
  hbuf src = hb(nb * sstr, -1, 1), dst = hb(nb * dstr, -1, 1);
  cpu->copy_blocks_t(MOERT_BF16, dst.h, dstr, src.h, sstr, nb, block, false);
  gpu->copy_blocks_t(MOERT_BF16, dst.d, dstr, src.d, sstr, nb, block, false);
  check_h("copy_blocks_t", dst, 0);
  cpu->copy_blocks_t(MOERT_BF16, dst.h, dstr, src.h, sstr, nb, block, true);
  gpu->copy_blocks_t(MOERT_BF16, dst.d, dstr, src.d, sstr, nb, block, true);
  check_h("copy_blocks_t (add)", dst, 0);
  end();
}

static void t_fill_normal(int64_t n, uint64_t first) {
  begin("fill_normal n=%lld first=%llu", (long long)n, (unsigned long long)first);
  fbuf x = garbage(n);
  cpu->fill_normal(x.h, n, 42, 101, first, 0.5f, 2.0f);
  gpu->fill_normal(x.d, n, 42, 101, first, 0.5f, 2.0f);
  check_f("normal draws (Philox, Box-Muller in double)", x, 1e-7);
  end();
}

/* the gate noise's draws with the step in device memory: as fill_normal
 * from the step's index, on both sides */
static void t_fill_normal_step(int64_t n, int64_t step, uint64_t per_step, uint64_t offset) {
  begin("fill_normal_step n=%lld step=%lld", (long long)n, (long long)step);
  fbuf x = garbage(n), y = garbage(n);
  int64_t *dstep = (int64_t *)dev_scalar();
  upload(dstep, &step, sizeof step);
  uint64_t first = (uint64_t)(step - 1) * per_step + offset;
  cpu->fill_normal(x.h, n, 7, 3, first, 0.0f, 0.25f);
  gpu->fill_normal_step(x.d, n, 7, 3, dstep, per_step, offset, 0.0f, 0.25f);
  check_f("normal draws at (step - 1) * per_step + offset", x, 1e-7);
  cpu->fill_normal_step(y.h, n, 7, 3, &step, per_step, offset, 0.0f, 0.25f);
  gpu->fill_normal(y.d, n, 7, 3, first, 0.0f, 0.25f);
  check_f("the cpu's fill_normal_step", y, 0);
  end();
}

static void run_typed(void) {
  t_fill_normal(1, 0);
  t_fill_normal(100003, 0xfffffff0ull); /* the counter's low word wraps */
  t_fill_normal_step(1000, 3, 4096, 512);
  t_fill_normal_step(777, 1, 100, 0);
  t_convert(1);
  t_convert(100003);
  t_gemm_bf16(false, false, 64, 96, 128, 3, false, true, 0);
  t_gemm_bf16(false, false, 37, 50, 23, 2, false, false, 0);
  t_gemm_bf16(true, false, 48, 64, 200, 4, true, false, 1);   /* weight gradients */
  t_gemm_bf16(false, true, 200, 48, 64, 4, false, false, 0);  /* input gradients */
  t_gemm_bf16(false, false, 256, 512, 256, 2, true, true, 0.5f);
  run_gemm_epi();
  t_act_bf16(1, 2);
  t_act_bf16(37, 66);
  t_act_bf16(64, 1024);
  t_dispatch_bf16(37, 2, 4, 16, 16, 8);
  t_dispatch_bf16(37, 2, 4, 12, 9, 6);
  t_dispatch_bf16(500, 2, 8, 100, 90, 136);
  t_dispatch_bf16(256, 1, 64, 8, 6, 256);
}

static void run_all(void) {
  /* memory */
  t_memory(1);
  t_memory(1001);
  t_marks();
  t_copy_blocks(7, 13, 20, 17, false);
  t_copy_blocks(7, 13, 20, 17, true);
  t_copy_blocks(5, 64, 128, 96, false);
  t_copy_blocks(5, 64, 128, 96, true);
  t_copy_blocks(1, 333, 0, 0, false);
  t_drop_beyond(1000, 37);
  /* dense */
  for (int ta = 0; ta < 2; ta++)
    for (int tb = 0; tb < 2; tb++) {
      t_gemm(ta, tb, 37, 29, 53, 1, 0, 0);
      t_gemm(ta, tb, 64, 128, 96, 0.5f, 1, 3);
      t_gemm(ta, tb, 1, 1, 1, 1, 0.25f, 0);
      t_gemm_batched(ta, tb, 17, 33, 9, 3, 0);
      t_gemm_batched(ta, tb, 16, 32, 64, 4, 1);
    }
  t_gemm(false, false, 5, 300, 7, 1, 0.5f, 1);
  t_gemm(false, true, 12, 7, 0, 1, 0.5f, 2); /* k = 0: C = beta C */
  t_gemm(true, false, 12, 7, 5, 0, 0, 2);    /* alpha = 0, beta = 0: zeros */
  for (int i = 0; i < 5; i++) {
    static const int64_t shapes[5][2] = {{1, 1}, {37, 3}, {1000, 64}, {129, 129}, {3000, 1000}};
    t_bias(shapes[i][0], shapes[i][1]);
  }
  for (int a = 0; a < 3; a++) {
    t_act((moert_act)a, 1);
    t_act((moert_act)a, 7);
    t_act((moert_act)a, 4099);
  }
  t_swiglu(3, 5);
  t_swiglu(64, 128);
  t_swiglu(17, 33);
  /* norms */
  static const int64_t norm_shapes[][2] = {{1, 1}, {7, 5}, {130, 64}, {33, 257}, {9, 1500}, {4, 4096}};
  for (int i = 0; i < 6; i++) {
    t_layernorm(norm_shapes[i][0], norm_shapes[i][1]);
    t_rmsnorm(norm_shapes[i][0], norm_shapes[i][1]);
    t_l2norm_rows(norm_shapes[i][0], norm_shapes[i][1], false);
  }
  t_l2norm_rows(9, 31, true);
  t_l2norm_cols(256, 8, false);
  t_l2norm_cols(256, 13, true);
  t_l2norm_cols(3, 1, false); /* one row would make dx exactly 0: noise on both sides */
  t_l2norm_cols(100, 300, false);
  /* gating */
  static const int64_t gate_shapes[][3] = {{1, 1, 1}, {37, 2, 1}, {37, 2, 2}, {257, 8, 2},
                                           {1000, 13, 3}, {1000, 64, 2}, {300, 100, 4}};
  for (int i = 0; i < 7; i++) {
    int64_t T = gate_shapes[i][0], E = gate_shapes[i][1], K = gate_shapes[i][2];
    t_gate_fwd(T, E, K, 0);
    t_gate_fwd(T, E, K, G_NOISE | G_NORMALIZE | G_AUX);
    t_gate_fwd(T, E, K, G_TIES | G_ORDER | G_AUX);
    t_gate_fwd(T, E, K, G_NAN | G_ORDER | G_NORMALIZE);
    t_gate_bwd(T, E, K, true, true, false);
    t_gate_bwd(T, E, K, false, true, false);
    t_gate_bwd(T, E, K, true, false, false);
    t_gate_bwd(T, E, K, true, true, true);
    t_aux_loss(E, true);
    t_aux_loss(E, false);
  }
  /* E above the registers' 512: the scores in memory */
  t_gate_fwd(5000, 2048, 2, G_ORDER | G_NORMALIZE | G_AUX);
  t_gate_bwd(600, 2048, 2, true, true, false);
  t_gate_fwd(4099, 8, 1, G_TIES | G_ORDER | G_AUX);
  run_routers();
  /* dispatch, combine */
  t_dispatch_combine(1, 1, 1, 1, 1, 1, false);
  t_dispatch_combine(37, 2, 4, 16, 16, 3, false);
  t_dispatch_combine(37, 2, 4, 12, 9, 64, true);    /* drops */
  t_dispatch_combine(500, 2, 8, 100, 90, 130, false);
  t_dispatch_combine(1000, 4, 13, 200, 200, 64, true);
  t_dispatch_combine(256, 1, 64, 8, 6, 256, false); /* many drops */
  /* embedding, losses */
  t_embed(37, 1, 50, 5);
  t_embed(300, 3, 50, 64);
  t_embed(40, 2, 7, 2100);      /* rows wider than a block's 2048 elements at a time */
  t_embed(50, 2, 40000, 3);     /* 80000 rows: the atomic kernel */
  for (int g = 0; g < 2; g++) {
    t_xent(1, 2, g, 0);
    t_xent(37, 50, g, 0);
    t_xent(300, 1000, g, 0);
    t_xent(64, 5000, g, 0);
    t_xent(1, 2, g, 0.5f);
    t_xent(37, 50, g, 0.1f);
    t_xent(300, 1000, g, 0.25f);
    t_mse(1, g);
    t_mse(10007, g);
  }
  /* optimizers */
  t_optim(1);
  t_optim(7);
  t_optim(100003);
  t_norm(1);
  t_norm(100003);
  t_cosine_temp(1, false);
  t_cosine_temp(4099, false);
  t_cosine_temp(4099, true);
  run_typed();
}

/* An op that fails (a GEMM beyond cuBLAS's 32-bit sizes) is reported by the
 * next download, with what failed. Leaves the backend failed. */
static void t_sticky_error(void) {
  begin("a failed op is reported by the next download");
  fbuf c = garbage(4);
  gpu->gemm(false, false, (int64_t)1 << 32, 1, 1, 1, c.d, 1, c.d, 1, 0, c.d, 1);
  moert_status st = {0};
  float v;
  bool ok = gpu->download(gpu, &v, c.d, sizeof v, &st);
  checks++;
  if (ok || !strstr(st.msg, "GEMM")) {
    fail_header("sticky error");
    printf("    download %s; message: %s\n", ok ? "succeeded" : "failed", st.msg);
  } else {
    printf("ok   %s: \"%s\"\n", case_name, st.msg);
  }
  for (int i = 0; i < nhost; i++) free(host_allocs[i]);
  for (int i = 0; i < ndev; i++) gpu->free(gpu, dev_allocs[i]);
  nhost = ndev = 0;
}

/* --- the kernel cache --- */

/* Creates the backend on dir, with stderr captured into err (cap bytes). */
static bool create_captured(const char *dir, char *err, size_t cap, moert_status *st) {
  char path[] = "/tmp/moec-stderr-XXXXXX";
  int fd = mkstemp(path);
  fflush(stderr);
  int saved = dup(2);
  dup2(fd, 2);
  bool ok = moert_backend_cuda_create(&gpu, 0, dir, true, NULL, st);
  fflush(stderr);
  dup2(saved, 2);
  close(saved);
  ssize_t n = pread(fd, err, cap - 1, 0);
  while (n > 0 && err[n - 1] == '\n') n--;
  err[n > 0 ? n : 0] = 0;
  close(fd);
  unlink(path);
  return ok;
}

static void cache_case(const char *what, const char *dir, bool want_hit, const char *want_warning) {
  begin("kernel cache: %s", what);
  char err[2048];
  moert_status st = {0};
  checks++;
  if (!create_captured(dir, err, sizeof err, &st)) {
    fail_header("create");
    printf("    %s\n    at %s\n    stderr: %s\n", st.msg, st.trace, err);
    gpu = NULL;
    return;
  }
  bool hit = moert_backend_cuda_cache_hit(gpu);
  if (hit != want_hit || (want_warning && !strstr(err, want_warning)) || (!want_warning && err[0])) {
    fail_header("cache");
    printf("    hit %d (want %d); stderr: \"%s\" (want %s)\n", hit, want_hit, err,
           want_warning ? want_warning : "nothing");
  }
  /* the kernels work */
  fbuf x = fb(5, -1, 1);
  cpu->scale(x.h, 5, 3);
  gpu->scale(x.d, 5, 3);
  check_f("scale after create", x, 0);
  if (!case_failures) printf("ok   %s%s%s\n", case_name, err[0] ? ": " : "", err);
  for (int i = 0; i < nhost; i++) free(host_allocs[i]);
  for (int i = 0; i < ndev; i++) gpu->free(gpu, dev_allocs[i]);
  nhost = ndev = 0;
  moert_backend_cuda_destroy(gpu);
  gpu = NULL;
}

static void overwrite(const char *path, const char *bytes, size_t n) {
  FILE *f = fopen(path, "wb");
  if (!f || fwrite(bytes, 1, n, f) != n || fclose(f) != 0) printf("FATAL: cannot write %s\n", path);
}

static void t_cache(void) {
  char dir[] = "/tmp/moec-kcache-XXXXXX";
  if (!mkdtemp(dir)) {
    perror("mkdtemp");
    exit(1);
  }
  char sub[64], path[4200] = "";
  snprintf(sub, sizeof sub, "%s/nested/dir", dir); /* created on demand */
  cache_case("a fresh directory misses", sub, false, NULL);
  moert_status st = {0};
  if (moert_backend_cuda_create(&gpu, 0, sub, true, NULL, &st)) {
    snprintf(path, sizeof path, "%s", moert_backend_cuda_cache_path(gpu));
    moert_backend_cuda_destroy(gpu);
  }
  printf("     cache entry %s\n", path);
  cache_case("the second create hits", sub, true, NULL);
  overwrite(path, "garbage, not a cubin\n", 21);
  cache_case("a corrupted entry is recompiled", sub, false, "corrupt");
  cache_case("and rewritten", sub, true, NULL);
  /* the header intact, the image truncated */
  FILE *f = fopen(path, "r+b");
  if (f) {
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    if (ftruncate(fileno(f), n / 2) != 0) perror("ftruncate");
    fclose(f);
  }
  cache_case("a truncated entry is recompiled", sub, false, "corrupt");
  /* a flipped byte in the image */
  f = fopen(path, "r+b");
  if (f) {
    fseek(f, -7, SEEK_END);
    int c = fgetc(f);
    fseek(f, -7, SEEK_END);
    fputc(c ^ 0x5a, f);
    fclose(f);
  }
  cache_case("a flipped byte is recompiled", sub, false, "corrupt");
  cache_case("an unwritable directory warns", "/proc/moec-cannot-be-here", false, "warning");
  unlink(path);
  rmdir(sub);
  snprintf(sub, sizeof sub, "%s/nested", dir);
  rmdir(sub);
  rmdir(dir);
}

/* The ops that tests/gpu/spec_ops.moe specializes, at its dims: dim 100, a
 * vocabulary of 300, the cosine projection's 256, (E, k) of its MoE layers. */
static void run_specialized(void) {
  static const int64_t rows[] = {1, 37, 300};
  static const int64_t ek[][2] = {{13, 3}, {64, 2}, {600, 4}};
  for (int i = 0; i < 3; i++) {
    int64_t r = rows[i];
    t_layernorm(r, 100);
    t_rmsnorm(r, 100);
    t_l2norm_rows(r, 256, false);
    t_xent(r, 300, true, 0);
    t_xent(r, 300, false, 0);
    t_xent(r, 300, true, 0.1f);
    for (int j = 0; j < 3; j++) {
      int64_t E = ek[j][0], K = ek[j][1];
      t_gate_fwd(r, E, K, 0);
      t_gate_fwd(r, E, K, G_NOISE | G_NORMALIZE | G_AUX);
      t_gate_fwd(r, E, K, G_TIES | G_ORDER | G_AUX);
      t_gate_bwd(r, E, K, true, true, false);
      t_gate_bwd(r, E, K, false, false, false);
      /* today's routers on the specialized kernels with the scores in
       * registers (E = 600's path is the generic kernels'): 4 groups of E /
       * 4 (E = 13: one expert left out); at 37 rows only (the emulation is
       * slow) */
      if (r != 37 || E > 512) continue;
      t_router_fwd(r, E, K, (router){.sigmoid = true, .bias = true, .groups = 4, .top_groups = 2,
                                     .route_scale = 2.5f, .z = true, .entropy = true},
                   R_NORMALIZE | R_AUX);
      t_router_fwd(r, E, K, (router){.bias = true, .z = true}, R_TIES | R_NOISE | R_ORDER);
      t_router_bwd(r, E, K, (router){.sigmoid = true, .route_scale = 2.5f}, true, true, 0.01f);
    }
  }
  t_l2norm_rows(9, 256, true);
}

/* The specializations src defines (moert_k_<op>__<key>). */
static int count_specialized(const char *src) {
  static const char pat[] = "__global__ void moert_k_";
  int n = 0;
  for (const char *p = strstr(src, pat); p; p = strstr(p, pat)) {
    p += sizeof pat - 1;
    const char *e = p;
    while (*e == '_' || isalnum((unsigned char)*e)) e++;
    for (const char *q = p; q + 1 < e; q++)
      if (q[0] == '_' && q[1] == '_') {
        n++;
        break;
      }
    p = e;
  }
  return n;
}

static int specialized_main(const char *path) {
  FILE *f = fopen(path, "rb");
  char *src = NULL;
  long n = -1;
  if (f && fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) > 0 && fseek(f, 0, SEEK_SET) == 0 &&
      (src = malloc((size_t)n + 1)) && fread(src, 1, (size_t)n, f) == (size_t)n) {
    src[n] = 0;
  } else {
    printf("FATAL: cannot read %s\n", path);
    return 1;
  }
  fclose(f);
  char dir[] = "/tmp/moec-kcache-XXXXXX";
  if (!mkdtemp(dir)) {
    perror("mkdtemp");
    return 1;
  }
  moert_status st = {0};
  if (!moert_backend_cuda_create(&gpu, 0, dir, true, src, &st)) die("moert_backend_cuda_create", &st);
  for (int pass = 0; pass < 2; pass++) {
    misalign = pass == 1;
    run_specialized();
  }
  int want = count_specialized(src), got = moert_backend_cuda_specialized(gpu);
  checks++;
  if (got != want || want == 0) {
    printf("FAIL the ops launched %d of the %d specialized kernels of %s\n", got, want, path);
    failures++;
  } else {
    printf("ok   the ops launched all %d specialized kernels of %s\n", got, path);
  }
  char cache[4200];
  snprintf(cache, sizeof cache, "%s", moert_backend_cuda_cache_path(gpu));
  moert_backend_cuda_destroy(gpu);
  unlink(cache);
  rmdir(dir);
  free(src);
  printf("%d checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}

int main(int argc, char **argv) {
  if (!moert_cuda_available()) {
    printf("SKIP: no CUDA GPU here (libcuda.so.1 did not load, or it sees no device): the cuda "
           "backend's op tests need one\n");
    return 77;
  }
  const char *seed = getenv("MOEC_TEST_SEED");
  rng_state = seed ? strtoull(seed, NULL, 0) : 20240611;
  printf("seed %llu (MOEC_TEST_SEED)\n", (unsigned long long)rng_state);
  cpu = moert_backend_cpu();
  if (argc > 1) return specialized_main(argv[1]);
  char dir[] = "/tmp/moec-kcache-XXXXXX";
  if (!mkdtemp(dir)) {
    perror("mkdtemp");
    return 1;
  }
  moert_status st = {0};
  if (!moert_backend_cuda_create(&gpu, 0, dir, true, NULL, &st)) die("moert_backend_cuda_create", &st);
  for (int pass = 0; pass < 2; pass++) {
    misalign = pass == 1;
    run_all();
  }
  misalign = false;
  t_sticky_error();
  char path[4200];
  snprintf(path, sizeof path, "%s", moert_backend_cuda_cache_path(gpu));
  moert_backend_cuda_destroy(gpu);
  unlink(path);
  rmdir(dir);
  t_cache();
  printf("%d checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}
