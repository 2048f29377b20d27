/* test_attn_gpu.c — the cuda backend's attention ops (templates/attention.cu)
 * against the cpu reference (label gpu; built for the emulated stack too,
 * label emu). Every op runs on both backends on the same fresh random inputs
 * (never zeros), outputs starting as random garbage on both sides:
 *   rope     forward at pos0 0 and one token at a later position, then the
 *            inverse on the gpu's result (it must give the input back)
 *   fwd      o and lse
 *   bwd      dqkv from the same qkv, o, lse and dout (the cpu's forward)
 *   decode   one token against a cache of len rows, against the cpu's decode
 *            and the last row of the cpu's causal forward
 * over causal and not, MHA (H = KV), GQA (H = 8, KV = 2), MQA (KV = 1), head
 * dims 8, 40, 64, 128, 256, seq not a multiple of any tile (77), several
 * sequences, fp32 and bf16. Compared by the norm-relative error ||gpu - cpu||
 * / ||cpu||: fp32 1e-5 (fp32 sums against the cpu's double ones), bf16 a few
 * 1e-3 (P and dS rounded to bf16 as the tensor cores' operands, and each
 * output rounded once). Then again with device pointers one element past
 * 16-byte alignment (MHA, GQA, MQA): the kernels' paths without 16-byte
 * pieces (cp.async). Last, graph: all four captured into one CUDA graph
 * (nothing in them may synchronize or allocate), launched twice on fresh
 * inputs.
 *
 * test_attn_gpu [SUITE] [--big]: SUITE one of rope, fwd32, bwd32, fwd16,
 * bwd16, decode, graph (all when absent); the shapes are small enough for the
 * emulated stack unless --big (the real GPU: seq 300 to 1029, more heads).
 * First of all, moert_backend_cuda_mma_check: the tensor cores' fragment
 * layouts that the bf16 kernels assume, on their own.
 * Skips (77) where no GPU is found. MOEC_TEST_SEED sets the seed. */
#include "backend.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static moert_backend *cpu, *gpu;
static int checks, failures;
static bool big;

static uint64_t rng_state;
static uint64_t next_u64(void) { /* splitmix64 */
  uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
/* Uniform in [lo, hi), never exactly zero. */
static float frand(float lo, float hi) {
  float v = (float)(lo + (hi - lo) * ((double)(next_u64() >> 11) * 0x1p-53));
  return v == 0 ? 0.25f * (hi - lo) + lo + 1e-3f : v;
}

static void die(const char *what, const moert_status *st) {
  printf("FATAL: %s: %s\n  at %s\n", what, st->msg, st->trace);
  exit(1);
}

/* A tensor of n elements of type dt: the host copy (the cpu's) and the
 * device copy (the gpu's). */
typedef struct tbuf {
  moert_dt dt;
  void *h, *d;
  int64_t n;
  void *base; /* the allocation d is in */
} tbuf;

/* Device pointers one element past 16-byte alignment: the kernels' paths
 * without 16-byte pieces. */
static bool misalign;

enum { MAX_BUFS = 32 };
static tbuf bufs[MAX_BUFS];
static int nbufs;

static size_t tbytes(moert_dt dt, int64_t n) { return (size_t)moert_dt_size(dt) * (size_t)(n > 0 ? n : 1); }

static float tget(moert_dt dt, const void *p, int64_t i) {
  return dt == MOERT_BF16 ? moert_bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static void tset(moert_dt dt, void *p, int64_t i, float v) {
  if (dt == MOERT_BF16) ((uint16_t *)p)[i] = moert_f32_to_bf16(v);
  else ((float *)p)[i] = v;
}

static void upload(tbuf b) {
  moert_status st = {0};
  if (!gpu->upload(gpu, b.d, b.h, tbytes(b.dt, b.n), &st)) die("upload", &st);
}

/* n random elements in [lo, hi) on both sides. */
static tbuf tb(moert_dt dt, int64_t n, float lo, float hi) {
  if (nbufs == MAX_BUFS) exit(1);
  tbuf b = {dt, calloc(1, tbytes(dt, n)), NULL, n, NULL};
  moert_status st = {0};
  if (!b.h || !gpu->alloc(gpu, tbytes(dt, n) + 16, &b.base, &st)) die("alloc", &st);
  b.d = (char *)b.base + (misalign ? moert_dt_size(dt) : 0);
  for (int64_t i = 0; i < n; i++) tset(dt, b.h, i, frand(lo, hi));
  upload(b);
  return bufs[nbufs++] = b;
}
static tbuf garbage(moert_dt dt, int64_t n) { return tb(dt, n, -7, 7); }

/* A copy of src's host values, on both sides. */
static tbuf tb_of(tbuf src) {
  tbuf b = tb(src.dt, src.n, 1, 2);
  memcpy(b.h, src.h, tbytes(src.dt, src.n));
  upload(b);
  return b;
}

static char case_name[256];
static double case_worst;
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
  float probe;
  if (nbufs && !gpu->download(gpu, &probe, bufs[0].d, sizeof probe, &st)) die(case_name, &st);
  if (!case_failures) printf("ok   %s%s (max rel err %.2e)\n", case_name, misalign ? " [unaligned]" : "", case_worst);
  fflush(stdout);
  for (int i = 0; i < nbufs; i++) {
    free(bufs[i].h);
    gpu->free(gpu, bufs[i].base);
  }
  nbufs = 0;
}

/* The values at [off, off + n) of `got` (host, type dt) against `want`'s
 * host copy at [woff, ...): ||got - want|| / ||want|| <= tol; NaN fails. */
static void compare(const char *what, moert_dt dt, const void *got, int64_t off, tbuf want, int64_t woff,
                    int64_t n, double tol) {
  checks++;
  double dd = 0, ww = 0, worst = -1;
  int64_t worst_i = -1, nans = 0;
  for (int64_t i = 0; i < n; i++) {
    double g = tget(dt, got, off + i), w = tget(want.dt, want.h, woff + i);
    if (isnan(g) || isnan(w)) {
      nans++;
      continue;
    }
    dd += (g - w) * (g - w);
    ww += w * w;
    if (fabs(g - w) > worst) worst = fabs(g - w), worst_i = i;
  }
  double rel = ww > 0 ? sqrt(dd / ww) : sqrt(dd);
  if (rel > case_worst) case_worst = rel;
  if (nans == 0 && rel <= tol) return;
  if (!case_failures) printf("FAIL %s%s\n", case_name, misalign ? " [unaligned]" : "");
  case_failures++;
  failures++;
  printf("  %s: rel err %.3e (tol %.1e), %lld NaN, %lld elements\n", what, rel, tol, (long long)nans,
         (long long)n);
  int shown = 0;
  double rms = n ? sqrt(ww / (double)n) : 0;
  for (int64_t i = 0; i < n && shown < 5; i++) {
    double g = tget(dt, got, off + i), w = tget(want.dt, want.h, woff + i);
    if (isnan(g) || isnan(w) || fabs(g - w) > 3 * tol * (fabs(w) + rms)) {
      printf("    [%lld] gpu %.7g cpu %.7g\n", (long long)i, g, w);
      shown++;
    }
  }
  if (worst_i >= 0)
    printf("    largest diff at [%lld]: gpu %.7g cpu %.7g\n", (long long)worst_i, tget(dt, got, off + worst_i),
           tget(want.dt, want.h, woff + worst_i));
}

/* b's device copy against its host copy (the cpu's result). */
static void check(const char *what, tbuf b, double tol) {
  void *got = malloc(tbytes(b.dt, b.n));
  moert_status st = {0};
  if (!got || !gpu->download(gpu, got, b.d, tbytes(b.dt, b.n), &st)) die("download", &st);
  compare(what, b.dt, got, 0, b, 0, b.n, tol);
  free(got);
}

static const char *dt_name(moert_dt dt) { return dt == MOERT_BF16 ? "bf16" : "fp32"; }
static double tol_of(moert_dt dt, double fp32, double bf16) { return dt == MOERT_BF16 ? bf16 : fp32; }

/* --- the cases --- */

typedef struct shape {
  int64_t nseq, seq, H, KV, D;
} shape;

static void t_rope(moert_dt dt, shape s) {
  int64_t T = s.nseq * s.seq, W = (s.H + 2 * s.KV) * s.D;
  begin("rope %s T=%lld seq=%lld H=%lld KV=%lld D=%lld", dt_name(dt), (long long)T, (long long)s.seq,
        (long long)s.H, (long long)s.KV, (long long)s.D);
  tbuf x = tb(dt, T * W, -2, 2), orig = tb_of(x);
  cpu->rope_t(dt, x.h, T, s.seq, 0, s.H, s.KV, s.D, 10000.0, false);
  gpu->rope_t(dt, x.d, T, s.seq, 0, s.H, s.KV, s.D, 10000.0, false);
  check("rope", x, tol_of(dt, 1e-6, 1e-3));
  gpu->rope_t(dt, x.d, T, s.seq, 0, s.H, s.KV, s.D, 10000.0, true); /* back to the input */
  void *got = malloc(tbytes(dt, x.n));
  moert_status st = {0};
  if (!got || !gpu->download(gpu, got, x.d, tbytes(dt, x.n), &st)) die("download", &st);
  compare("rope then inverse", dt, got, 0, orig, 0, x.n, tol_of(dt, 1e-6, 1e-2));
  free(got);
  /* generation: one token at position 1000 + 17 */
  tbuf one = tb(dt, W, -2, 2);
  cpu->rope_t(dt, one.h, 1, 1, 1017, s.H, s.KV, s.D, 500000.0, false);
  gpu->rope_t(dt, one.d, 1, 1, 1017, s.H, s.KV, s.D, 500000.0, false);
  check("rope of one token at 1017", one, tol_of(dt, 1e-6, 1e-3));
  end();
}

static void t_fwd(moert_dt dt, shape s, bool causal) {
  int64_t T = s.nseq * s.seq, W = (s.H + 2 * s.KV) * s.D;
  begin("attn_fwd %s nseq=%lld seq=%lld H=%lld KV=%lld D=%lld%s", dt_name(dt), (long long)s.nseq,
        (long long)s.seq, (long long)s.H, (long long)s.KV, (long long)s.D, causal ? " causal" : "");
  tbuf qkv = tb(dt, T * W, -2, 2), o = garbage(dt, T * s.H * s.D), lse = garbage(MOERT_F32, T * s.H);
  cpu->attn_fwd_t(dt, qkv.h, o.h, lse.h, s.nseq, s.seq, s.H, s.KV, s.D, causal);
  gpu->attn_fwd_t(dt, qkv.d, o.d, lse.d, s.nseq, s.seq, s.H, s.KV, s.D, causal);
  check("o", o, tol_of(dt, 1e-5, 6e-3));
  check("lse", lse, tol_of(dt, 1e-6, 1e-5));
  end();
}

static void t_bwd(moert_dt dt, shape s, bool causal) {
  int64_t T = s.nseq * s.seq, W = (s.H + 2 * s.KV) * s.D;
  begin("attn_bwd %s nseq=%lld seq=%lld H=%lld KV=%lld D=%lld%s", dt_name(dt), (long long)s.nseq,
        (long long)s.seq, (long long)s.H, (long long)s.KV, (long long)s.D, causal ? " causal" : "");
  tbuf qkv = tb(dt, T * W, -2, 2), o = garbage(dt, T * s.H * s.D), lse = garbage(MOERT_F32, T * s.H);
  cpu->attn_fwd_t(dt, qkv.h, o.h, lse.h, s.nseq, s.seq, s.H, s.KV, s.D, causal);
  upload(o), upload(lse); /* both backwards from the cpu's forward */
  tbuf dout = tb(dt, T * s.H * s.D, -1, 1), dqkv = garbage(dt, T * W);
  int64_t ns = moert_cpu_attn_scratch(T, s.H, s.KV, s.D);
  tbuf scr = garbage(MOERT_F32, ns), scr_g = garbage(MOERT_F32, ns);
  cpu->attn_bwd_t(dt, qkv.h, o.h, lse.h, dout.h, dqkv.h, scr.h, s.nseq, s.seq, s.H, s.KV, s.D, causal);
  gpu->attn_bwd_t(dt, qkv.d, o.d, lse.d, dout.d, dqkv.d, scr_g.d, s.nseq, s.seq, s.H, s.KV, s.D, causal);
  /* dQ, dK and dV apart: each has its own scale */
  void *got = malloc(tbytes(dt, T * W));
  moert_status st = {0};
  if (!got || !gpu->download(gpu, got, dqkv.d, tbytes(dt, T * W), &st)) die("download", &st);
  static const char *const part[3] = {"dq", "dk", "dv"};
  int64_t lo[3] = {0, s.H * s.D, (s.H + s.KV) * s.D}, w[3] = {s.H * s.D, s.KV * s.D, s.KV * s.D};
  double tol = tol_of(dt, 1e-5, 1e-2);
  for (int p = 0; p < 3; p++) {
    /* the part's columns of every row, gathered */
    tbuf g = {dt, malloc(tbytes(dt, T * w[p])), NULL, T * w[p], NULL};
    tbuf c = {dt, malloc(tbytes(dt, T * w[p])), NULL, T * w[p], NULL};
    if (!g.h || !c.h) exit(1);
    size_t es = (size_t)moert_dt_size(dt);
    for (int64_t t = 0; t < T; t++) {
      memcpy((char *)g.h + es * (size_t)(t * w[p]), (char *)got + es * (size_t)(t * W + lo[p]), es * (size_t)w[p]);
      memcpy((char *)c.h + es * (size_t)(t * w[p]), (char *)dqkv.h + es * (size_t)(t * W + lo[p]), es * (size_t)w[p]);
    }
    compare(part[p], dt, g.h, 0, c, 0, T * w[p], tol);
    free(g.h), free(c.h);
  }
  free(got);
  end();
}

static void t_decode(moert_dt dt, int64_t len, int64_t H, int64_t KV, int64_t D) {
  int64_t W = (H + 2 * KV) * D;
  begin("attn_decode %s len=%lld H=%lld KV=%lld D=%lld", dt_name(dt), (long long)len, (long long)H, (long long)KV,
        (long long)D);
  tbuf qkv = tb(dt, len * W, -2, 2), o = garbage(dt, len * H * D), lse = garbage(MOERT_F32, len * H);
  cpu->attn_fwd_t(dt, qkv.h, o.h, lse.h, 1, len, H, KV, D, true);
  tbuf od = garbage(dt, H * D), odc = tb_of(od);
  const void *q_h = (const char *)qkv.h + (size_t)moert_dt_size(dt) * (size_t)((len - 1) * W);
  const void *q_d = (const char *)qkv.d + (size_t)moert_dt_size(dt) * (size_t)((len - 1) * W);
  cpu->attn_decode_t(dt, q_h, qkv.h, odc.h, len, H, KV, D);
  gpu->attn_decode_t(dt, q_d, qkv.d, od.d, len, H, KV, D);
  void *got = malloc(tbytes(dt, H * D));
  moert_status st = {0};
  if (!got || !gpu->download(gpu, got, od.d, tbytes(dt, H * D), &st)) die("download", &st);
  compare("decode vs the cpu's decode", dt, got, 0, odc, 0, H * D, tol_of(dt, 1e-5, 6e-3));
  compare("decode vs the causal forward's last row", dt, got, 0, o, (len - 1) * H * D, H * D,
          tol_of(dt, 1e-5, 6e-3));
  free(got);
  end();
}

/* CUDA graphs capture every op of a step: RoPE, the forward, the backward
 * and decode recorded into one graph (none may synchronize or allocate),
 * then launched twice on fresh inputs (uploaded in place, as a step's),
 * each result against the cpu's. */
static void t_graph(moert_dt dt) {
  const int64_t nseq = 2, seq = 45, H = 4, KV = 2, D = 64, T = nseq * seq, W = (H + 2 * KV) * D;
  begin("graph of rope, attn_fwd, attn_bwd, attn_decode %s", dt_name(dt));
  if (!gpu->graph_begin) {
    printf("ok   %s: skipped (the driver cannot capture streams)\n", case_name);
    return;
  }
  int64_t ns = moert_cpu_attn_scratch(T, H, KV, D);
  tbuf qkv = tb(dt, T * W, -2, 2), o = garbage(dt, T * H * D), lse = garbage(MOERT_F32, T * H);
  tbuf dout = tb(dt, T * H * D, -1, 1), dqkv = garbage(dt, T * W), scr = garbage(MOERT_F32, ns);
  tbuf od = garbage(dt, H * D);
  const void *q_d = (const char *)qkv.d + (size_t)moert_dt_size(dt) * (size_t)((seq - 1) * W);
  moert_status st = {0};
  checks++;
  bool ok = gpu->graph_begin(gpu, &st);
  if (ok) {
    gpu->rope_t(dt, qkv.d, T, seq, 0, H, KV, D, 10000.0, false);
    gpu->attn_fwd_t(dt, qkv.d, o.d, lse.d, nseq, seq, H, KV, D, true);
    gpu->attn_bwd_t(dt, qkv.d, o.d, lse.d, dout.d, dqkv.d, scr.d, nseq, seq, H, KV, D, true);
    gpu->attn_decode_t(dt, q_d, qkv.d, od.d, seq, H, KV, D);
    ok = gpu->graph_end(gpu, 0, &st);
  }
  if (!ok) {
    printf("FAIL %s: the capture: %s\n", case_name, st.msg);
    failures++;
    end();
    return;
  }
  for (int round = 0; round < 2; round++) {
    for (int64_t i = 0; i < qkv.n; i++) tset(dt, qkv.h, i, frand(-2, 2));
    for (int64_t i = 0; i < dout.n; i++) tset(dt, dout.h, i, frand(-1, 1));
    upload(qkv), upload(dout);
    if (!gpu->graph_launch(gpu, 0, &st)) die("graph_launch", &st);
    cpu->rope_t(dt, qkv.h, T, seq, 0, H, KV, D, 10000.0, false);
    cpu->attn_fwd_t(dt, qkv.h, o.h, lse.h, nseq, seq, H, KV, D, true);
    cpu->attn_bwd_t(dt, qkv.h, o.h, lse.h, dout.h, dqkv.h, scr.h, nseq, seq, H, KV, D, true);
    cpu->attn_decode_t(dt, (const char *)qkv.h + (size_t)moert_dt_size(dt) * (size_t)((seq - 1) * W), qkv.h, od.h,
                       seq, H, KV, D);
    check("qkv after rope", qkv, tol_of(dt, 1e-6, 1e-3));
    check("o", o, tol_of(dt, 1e-5, 6e-3));
    check("lse", lse, tol_of(dt, 1e-6, 1e-5));
    check("dqkv", dqkv, tol_of(dt, 1e-5, 1e-2));
    check("decode", od, tol_of(dt, 1e-5, 6e-3));
  }
  end();
}

/* --- the suites --- */

static const shape small_shapes[] = {
    {2, 77, 4, 4, 64},  /* MHA, two sequences, seq no multiple of a tile */
    {1, 77, 8, 2, 64},  /* GQA */
    {2, 40, 4, 1, 128}, /* MQA */
    {1, 77, 2, 1, 8},   /* the smallest head */
    {1, 45, 2, 2, 40},  /* a head dim of the generic path */
    {1, 37, 2, 1, 256}, /* the widest head */
};
/* the real GPU's: many tiles, every path; the cpu's reference (double,
 * O(seq^2 H D)) keeps the whole run at a few minutes */
static const shape big_shapes[] = {
    {3, 300, 8, 8, 64}, {2, 1029, 8, 2, 64}, {2, 300, 8, 1, 128}, {1, 1029, 8, 2, 128},
    {2, 300, 4, 2, 8},  {1, 333, 4, 2, 40},  {1, 300, 4, 1, 256}, {1, 520, 4, 4, 256},
};

static void suite(const char *name, void (*each)(moert_dt, shape, bool), moert_dt dt, bool both_masks) {
  const shape *sh = big ? big_shapes : small_shapes;
  int n = big ? (int)(sizeof big_shapes / sizeof *big_shapes) : (int)(sizeof small_shapes / sizeof *small_shapes);
  if (misalign) n = 3; /* the unaligned pass: MHA, GQA, MQA */
  (void)name;
  for (int i = 0; i < n; i++) {
    each(dt, sh[i], true);
    if (both_masks || i < 2) each(dt, sh[i], false);
  }
}

static void rope_each(moert_dt dt, shape s, bool causal) {
  if (causal) t_rope(dt, s);
}

static bool want(const char *only, const char *name) { return !only || !strcmp(only, name); }

int main(int argc, char **argv) {
  const char *only = NULL;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--big")) big = true;
    else only = argv[i];
  }
  static const char *const names[] = {"rope", "fwd32", "bwd32", "fwd16", "bwd16", "decode", "graph"};
  bool known = !only;
  for (int i = 0; i < 7; i++) known |= only && !strcmp(only, names[i]);
  if (!known) {
    printf("usage: test_attn_gpu [rope|fwd32|bwd32|fwd16|bwd16|decode|graph] [--big]\n");
    return 2;
  }
  if (!moert_cuda_available()) {
    printf("SKIP: no CUDA GPU here (libcuda.so.1 did not load, or it sees no device): the cuda "
           "backend's attention tests need one\n");
    return 77;
  }
  const char *seed = getenv("MOEC_TEST_SEED");
  rng_state = seed ? strtoull(seed, NULL, 0) : 20261207;
  printf("seed %llu (MOEC_TEST_SEED)\n", (unsigned long long)rng_state);
  cpu = moert_backend_cpu();
  moert_status st = {0};
  /* the default kernel cache: the emulated stack's compile is the slow part */
  if (!moert_backend_cuda_create(&gpu, 0, NULL, true, NULL, &st)) die("moert_backend_cuda_create", &st);
  /* the fragment layouts apart from attention first: a failure there names the instruction */
  checks++;
  if (moert_backend_cuda_mma_check(gpu, &st)) {
    printf("ok   the tensor cores' fragment layouts (mma.m16n8k16, ldmatrix, ldmatrix.trans)\n");
  } else {
    printf("FAIL the tensor cores' fragment layouts: %s\n", st.msg);
    failures++;
    st = (moert_status){0};
  }
  for (int pass = 0; pass < 2; pass++) { /* aligned, then one element off (the first shapes) */
    misalign = pass == 1;
    if (want(only, "rope")) {
      suite("rope", rope_each, MOERT_F32, true);
      suite("rope", rope_each, MOERT_BF16, true);
    }
    if (want(only, "fwd32")) suite("fwd32", t_fwd, MOERT_F32, true);
    if (want(only, "bwd32")) suite("bwd32", t_bwd, MOERT_F32, false);
    if (want(only, "fwd16")) suite("fwd16", t_fwd, MOERT_BF16, true);
    if (want(only, "bwd16")) suite("bwd16", t_bwd, MOERT_BF16, false);
    if (want(only, "decode")) {
      int64_t len = big ? 1029 : 77;
      for (int d = 0; d < 2; d++) {
        moert_dt dt = d ? MOERT_BF16 : MOERT_F32;
        t_decode(dt, len, 8, 2, 64);
        t_decode(dt, len, 4, 4, 128);
        t_decode(dt, 5, 4, 1, 256);
        t_decode(dt, len, 2, 1, 8);
      }
    }
  }
  misalign = false;
  if (want(only, "graph")) {
    t_graph(MOERT_F32);
    t_graph(MOERT_BF16);
  }
  moert_backend_cuda_destroy(gpu);
  printf("%d checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}
