/* backend_cuda.c — the cuda backend (fp32): the ops of cpu_ops.h as kernels
 * of templates/ compiled at start by NVRTC, GEMMs through cuBLAS, the
 * expert path's GEMMs (gemm_ex) through cuBLASLt with their epilogues. This
 * file holds the backend's table, its setup and the op launchers; the rest
 * is beside it, the files sharing backend_cuda_impl.h:
 *   cuda_lib.c     the driver, NVRTC, cuBLAS and cuBLASLt opened with dlopen
 *   cuda_nvrtc.c   the kernels compiled by NVRTC, and their disk cache
 *   cuda_blas.c    the GEMMs: cuBLAS, and cuBLASLt's plans and epilogues
 *   cuda_graphs.c  the timing marks (events) and CUDA graphs
 *
 * Nothing CUDA is linked: one binary runs with or without a GPU
 * (moert_cuda_available() is then false, quietly). Without the CUDA headers
 * at build time the file compiles to stubs that say so.
 *
 * Kernels: every kernel is looked up at create (cuda_nvrtc.c). The source is
 * the model's kernels.cu when the driver has one (moec emits it: the
 * templates, then kernels specialized on the layers' dims,
 * compiler/emit_cuda.c), else the templates alone. The ops of
 * runtime/kernel_specs.def launch moert_k_<op>__<key>, the key formatted
 * from the launch's dims, when the module has it (looked up once per
 * (kernel, dims) and memoized), else the generic moert_k_<op>.
 *
 * Execution: one stream. The ops of the table return nothing, so a failed
 * launch or cuBLAS call is recorded in a sticky status, later ops are skipped,
 * and the next upload or download (which synchronize) reports it. Values the
 * cpu ops return (losses, sums of squares, dots) are reduced on the device
 * into a scratch buffer and downloaded.
 *
 * The ops of the table take no backend argument: there is one cuda backend
 * per process at a time (a second create fails until the first is destroyed). */
#include "backend.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#ifndef MOERT_HAVE_CUDA_HEADERS

/* Built without cuda.h: no cuda backend, said plainly. */
bool moert_backend_cuda_create(moert_backend **out, int device, const char *cache_dir,
                               bool use_cache, const char *kernels_src, moert_status *st) {
  (void)device, (void)cache_dir, (void)use_cache, (void)kernels_src;
  *out = NULL;
  return MOERT_FAIL(st, "this build of moec has no cuda backend (the CUDA headers were not "
                        "found when it was built); run with --backend cpu");
}
void moert_backend_cuda_destroy(moert_backend *b) { (void)b; }
bool moert_backend_cuda_cache_hit(const moert_backend *b) {
  (void)b;
  return false;
}
bool moert_backend_cuda_mma_check(moert_backend *b, moert_status *st) {
  (void)b;
  return MOERT_FAIL(st, "this build of moec has no cuda backend");
}
const char *moert_backend_cuda_cache_path(const moert_backend *b) {
  (void)b;
  return NULL;
}
void *moert_backend_cuda_stream(const moert_backend *b) {
  (void)b;
  return NULL;
}
void moert_backend_cuda_set_waiter(moert_backend *b, moert_cuda_waiter fn, void *ctx) {
  (void)b, (void)fn, (void)ctx;
}

int moert_backend_cuda_specialized(const moert_backend *b) {
  (void)b;
  return 0;
}
float moert_backend_cuda_aux_loss(const float *score_sum, const float *top1_count,
                                  float *dscore_coef, int64_t experts, double global_tokens) {
  (void)score_sum, (void)top1_count, (void)dscore_coef, (void)experts, (void)global_tokens;
  return NAN;
}

#else

#include "backend_cuda_impl.h"
#include "model.h" /* MOERT_MAX_HEAD_DIM */

/* ------------------------------------------------------------ kernels */

/* The key formats of the specialized kernels (kernel_specs.def), by kernel;
 * NULL for the kernels that have none. */
static const char *const spec_keys[K_COUNT] = {
#define SPEC(op, key) [K_##op] = key,
#include "kernel_specs.def"
#undef SPEC
};

/* The device scratch: partial sums of the reductions (one double per block
 * or per (row chunk, column)) and, at its end, the scalars they reduce to:
 * slot 0 a sum's, 1 the aux loss of moert_backend_cuda_aux_loss, 2 the
 * gate's done-counter (gating.cu's gate_locations). Its size bounds the row
 * chunks of column reductions, not the shapes. */
enum { SCRATCH_BYTES = 8 << 20, SCALAR_SLOTS = 16 };
#define SCRATCH_DOUBLES ((int64_t)(SCRATCH_BYTES / sizeof(double)) - SCALAR_SLOTS)
/* Blocks of the reductions to a scalar (partials summed by one block). */
enum { MAX_PARTS = 1024 };
/* Grid limits: x strides beyond this, y and z at most 65535. */
enum { MAX_GRID_X = 1 << 20, MAX_GRID_Y = 65535 };
/* gating.cu's MOERT_GATE_MAX_GROUPS (a warp's group scores live in shared
 * memory) and MOERT_GATE_PART_EXTRA (the partials' columns past the
 * experts: the z and entropy sums); tests/gpu/kernel_names.sh checks that
 * they agree. */
enum { MOERT_GATE_MAX_GROUPS = 256, MOERT_GATE_PART_EXTRA = 2 };

static cuda_state G;

/* The table's GEMM slots (the X-macro in create names each op cuda_<op>):
 * cuda_blas.c's. */
static __typeof__(moert_cuda_gemm) *const cuda_gemm = moert_cuda_gemm;
static __typeof__(moert_cuda_gemm_batched) *const cuda_gemm_batched = moert_cuda_gemm_batched;
static __typeof__(moert_cuda_gemm_ex) *const cuda_gemm_ex = moert_cuda_gemm_ex;

/* The sticky status: false (and the op does nothing) once something failed. */
static bool healthy(void) { return cuda_healthy(&G); }

#define ARGS(...) ((void *[]){__VA_ARGS__})

static void launch(int k, uint64_t gx, uint64_t gy, unsigned bx, unsigned by, void **args) {
  if (!healthy()) return;
  moert_cu_check(moert_cu.cuLaunchKernel(G.fn[k], (unsigned)gx, (unsigned)gy, 1, bx, by, 1, 0, G.stream,
                                         args, NULL),
                 moert_cuda_kernel_names[k], __FILE__, __LINE__, &G.err);
}

/* Kernel k's specialization for dims (a, b) (b unused by one-dim keys), or
 * the generic kernel; looked up once, then memoized. */
static CUfunction pick(int k, long long a, long long b) {
  if (!spec_keys[k] || !G.own_src) return G.fn[k];
  for (int i = 0; i < G.nspecs; i++)
    if (G.specs[i].k == k && G.specs[i].a == a && G.specs[i].b == b)
      return G.specs[i].fn ? G.specs[i].fn : G.fn[k];
  char key[64], name[160];
  snprintf(key, sizeof key, spec_keys[k], a, b);
  snprintf(name, sizeof name, "%s__%s", moert_cuda_kernel_names[k], key);
  CUfunction f = NULL;
  if (moert_cu.cuModuleGetFunction(&f, G.mod, name) != CUDA_SUCCESS) f = NULL;
  if (G.nspecs < MAX_SPEC_LOOKUPS) G.specs[G.nspecs++] = (spec_fn){k, a, b, f};
  return f ? f : G.fn[k];
}

/* launch() of kernel k's specialization for dims (a, b) when there is one. */
static void launch_spec(int k, long long a, long long b, uint64_t gx, uint64_t gy, unsigned bx,
                        unsigned by, void **args) {
  if (!healthy()) return;
  moert_cu_check(moert_cu.cuLaunchKernel(pick(k, a, b), (unsigned)gx, (unsigned)gy, 1, bx, by, 1, 0,
                                         G.stream, args, NULL),
                 moert_cuda_kernel_names[k], __FILE__, __LINE__, &G.err);
}

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
static int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : x > hi ? hi : x; }

/* Blocks of a 1-D grid-stride kernel over n items, per_block a block. */
static uint64_t grid_for(int64_t n, int64_t per_block) {
  return (uint64_t)clamp64(cdiv(n, per_block), 1, (int64_t)G.sm_count * 32);
}

/* Threads for a row of `width` items (float4s or floats): 32 to 256. */
static unsigned threads_for(int64_t width) {
  return (unsigned)clamp64(cdiv(width, 32) * 32, 32, 256);
}

/* Row kernels: a group of 32..1024 threads a row (about dim/8 elements a
 * thread), rows * group = 256 threads a block when the group is smaller. */
static void row_shape(int64_t dim, unsigned *bx, unsigned *by) {
  unsigned g = 32;
  while (g < 1024 && (int64_t)g * 8 < dim) g *= 2;
  *bx = g;
  *by = g >= 256 ? 1 : 256 / g;
}

static uint64_t row_grid(int64_t rows, unsigned by, int64_t cap) {
  return (uint64_t)clamp64(cdiv(rows, by), 1, cap);
}

static double *scratch_d(int64_t i) { return (double *)(uintptr_t)(G.scratch + (CUdeviceptr)i * 8); }
static double *scalar_slot(int i) { return scratch_d(SCRATCH_DOUBLES + i); }

/* The wait for the stream with a waiter (moert_backend_cuda_set_waiter):
 * cuStreamQuery spun for WAIT_SPIN_S, then polled between sleeps that double
 * from 20 us to WAIT_SLEEP_MAX_NS (what a wait past the spin may lose once
 * the stream is done: a step reads back once or twice). */
#define WAIT_SPIN_S 2e-3
#define WAIT_SLEEP_MAX_NS 100000L

/* Waits until the stream's work is done (cuStreamSynchronize, or polled
 * under the waiter, which may end the wait). */
static bool sync_stream(moert_status *st) {
  if (!G.waiter) return CUOK(st, cuStreamSynchronize, (G.stream));
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  const double t0 = (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
  long ns = 20000;
  for (;;) {
    CUresult r = moert_cu.cuStreamQuery(G.stream);
    if (r == CUDA_SUCCESS) return true;
    if (r != CUDA_ERROR_NOT_READY) return MOERT_FAIL(st, "cuStreamQuery failed: %s", moert_cu_errstr(r));
    clock_gettime(CLOCK_MONOTONIC, &ts);
    const double waited = (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec - t0;
    if (waited < WAIT_SPIN_S) continue;
    if (!G.waiter(G.waiter_ctx, waited, st)) return MOERT_UP(st);
    nanosleep(&(struct timespec){0, ns}, NULL);
    ns = ns * 2 < WAIT_SLEEP_MAX_NS ? ns * 2 : WAIT_SLEEP_MAX_NS;
  }
}

/* Downloads n bytes of device memory after the stream's work; false (with
 * the sticky status set) on failure. */
static bool fetch(void *dst, const void *src, size_t n) {
  if (!healthy()) return false;
  return CUOK(&G.err, cuMemcpyDtoHAsync, (dst, DPTR(src), n, G.stream)) && sync_stream(&G.err);
}

/* part[0..nparts) -> one double in scalar slot 0, downloaded; NAN when
 * something failed. */
static double reduce_parts(uint64_t nparts) {
  double *out = scalar_slot(0), *part = scratch_d(0);
  long long n = (long long)nparts;
  launch(K_reduce_sum, 1, 1, 1024, 1, ARGS(&part, &n, &out));
  double v;
  return fetch(&v, out, sizeof v) ? v : NAN;
}

/* Column reductions: rows x [c0, c0 + w) slabs whose partials fit the
 * scratch, narr arrays of them. */
typedef struct col_plan {
  int64_t w, rpc, nchunk; /* slab width, rows per chunk, chunks */
} col_plan;

static col_plan plan_cols(int64_t rows, int64_t cols, int narr) {
  col_plan p;
  p.w = clamp64(cols, 1, SCRATCH_DOUBLES / narr);
  int64_t tiles = cdiv(p.w, 32);
  int64_t want = cdiv((int64_t)G.sm_count * 4, tiles);    /* about 4 blocks an SM */
  int64_t most = clamp64(cdiv(rows, 64), 1, MAX_GRID_Y);  /* 64 rows a chunk at least */
  int64_t fit = clamp64(SCRATCH_DOUBLES / (p.w * narr), 1, MAX_GRID_Y);
  int64_t n = clamp64(want, 1, most < fit ? most : fit);
  p.rpc = rows > 0 ? cdiv(rows, n) : 1;
  p.nchunk = rows > 0 ? cdiv(rows, p.rpc) : 1;
  return p;
}

static void colsum_add(float *out, const double *part, const col_plan *p, int64_t w) {
  long long nchunk = (long long)p->nchunk, ww = (long long)w;
  launch(K_colsum_add, grid_for(w, 256), 1, 256, 1, ARGS(&out, &part, &nchunk, &ww));
}

/* ------------------------------------------------------------ memory */

static void watch(const void *dst, size_t bytes) {
  for (int i = 0; i < 2; i++)
    if (G.b.watch_lo[i] && (const char *)dst < (const char *)G.b.watch_hi[i] &&
        (const char *)dst + bytes > (const char *)G.b.watch_lo[i])
      G.b.watched_bytes += (int64_t)bytes;
}

/* Passes the sticky status on to st: false when an op failed earlier. */
static bool report(moert_status *st) { return cuda_report(&G, st); }

static bool cuda_alloc(moert_backend *b, size_t n, void **out, moert_status *st) {
  MOERT_TRY(st, report(st));
  b->allocs++;
  CUdeviceptr p = 0;
  size_t rounded = (n + 255) / 256 * 256;
  if (!rounded) rounded = 256;
  CUresult rc = moert_cu.cuMemAlloc(&p, rounded);
  if (rc == CUDA_ERROR_OUT_OF_MEMORY) { /* the words the executor looks for: MOERT_OOM_PREFIX */
    size_t free_b = 0, total_b = 0;
    moert_backend_cuda_mem_info(b, &free_b, &total_b);
    return MOERT_FAIL(st, "out of GPU memory: allocating %.2f GB failed; the GPU has %.2f GB free of %.2f GB",
                      (double)n / 1e9, (double)free_b / 1e9, (double)total_b / 1e9);
  }
  if (rc != CUDA_SUCCESS)
    return MOERT_FAIL(st, "cuMemAlloc failed: %s (%zu bytes)", moert_cu_errstr(rc), n);
  if (!CUOK(st, cuMemsetD8, (p, 0, rounded))) {
    moert_cu.cuMemFree(p);
    return MOERT_UP(st);
  }
  *out = (void *)(uintptr_t)p;
  return true;
}

static void cuda_free(moert_backend *b, void *p) {
  (void)b;
  if (p && G.live) moert_cu.cuMemFree(DPTR(p));
}

static bool cuda_upload(moert_backend *b, void *dst, const void *src, size_t n,
                        moert_status *st) {
  (void)b;
  MOERT_TRY(st, report(st));
  watch(dst, n);
  if (!n) return true;
  /* Synchronous for the host: src may be reused at once. */
  CUTRY(st, cuMemcpyHtoDAsync, (DPTR(dst), src, n, G.stream));
  MOERT_TRY(st, sync_stream(st));
  return true;
}

static bool cuda_download(moert_backend *b, void *dst, const void *src, size_t n,
                          moert_status *st) {
  (void)b;
  MOERT_TRY(st, report(st));
  if (!n) return true;
  CUTRY(st, cuMemcpyDtoHAsync, (dst, DPTR(src), n, G.stream));
  MOERT_TRY(st, sync_stream(st));
  return true;
}

static void cuda_zero(void *p, size_t bytes) {
  if (healthy() && bytes) CUOK(&G.err, cuMemsetD8Async, (DPTR(p), 0, bytes, G.stream));
}

static void cuda_copy(float *dst, const float *src, int64_t n) {
  watch(dst, (size_t)n * sizeof *dst);
  if (healthy() && n > 0)
    CUOK(&G.err, cuMemcpyDtoDAsync, (DPTR(dst), DPTR(src), (size_t)n * sizeof *dst, G.stream));
}

static void cuda_add(float *y, const float *a, const float *b, int64_t n) {
  if (n <= 0) return;
  launch(K_add, grid_for(n, 1024), 1, 256, 1, ARGS(&y, &a, &b, &n));
}

static void cuda_axpy(float *y, const float *x, float alpha, int64_t n) {
  if (n <= 0) return;
  launch(K_axpy, grid_for(n, 1024), 1, 256, 1, ARGS(&y, &x, &alpha, &n));
}

/* sum a*b in double, on the device. */
static double dot_dev(const float *a, const float *b, int64_t n) {
  if (n <= 0) return 0;
  uint64_t grid = (uint64_t)clamp64(cdiv(n, 1024), 1, MAX_PARTS);
  double *part = scratch_d(0);
  launch(K_dot, grid, 1, 256, 1, ARGS(&a, &b, &n, &part));
  return reduce_parts(grid);
}

static double cuda_dot(const float *a, const float *b, int64_t n) { return dot_dev(a, b, n); }

static void cuda_copy_blocks(float *dst, int64_t dst_stride, const float *src, int64_t src_stride,
                             int64_t nblocks, int64_t block, bool add) {
  for (int64_t i = 0; i < nblocks && (G.b.watch_lo[0] || G.b.watch_lo[1]); i++)
    watch(dst + i * dst_stride, sizeof(float) * (size_t)block);
  if (nblocks <= 0 || block <= 0) return;
  int a = add;
  launch(K_copy_blocks, grid_for(cdiv(block, 4), 256), (uint64_t)clamp64(nblocks, 1, MAX_GRID_Y),
         256, 1, ARGS(&dst, &dst_stride, &src, &src_stride, &nblocks, &block, &a));
}

static void cuda_drop_beyond(int32_t *loc, int64_t n, int64_t keep) {
  if (n <= 0) return;
  launch(K_drop_beyond, grid_for(n, 256), 1, 256, 1, ARGS(&loc, &n, &keep));
}

/* ------------------------------------------------------------ dense (the GEMMs: cuda_blas.c) */

void moert_cuda_scale_rows(float *c, int64_t m, int64_t n, int64_t ldc, float beta) {
  if (beta == 1) return;
  launch(K_scale_rows, grid_for(n, 256), (uint64_t)clamp64(m, 1, MAX_GRID_Y), 256, 1,
         ARGS(&c, &m, &n, &ldc, &beta));
}

static void cuda_bias_add(float *y, const float *bias, int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) return;
  launch(K_bias_add, grid_for(cdiv(cols, 4), 256), (uint64_t)clamp64(rows, 1, MAX_GRID_Y), 256, 1,
         ARGS(&y, &bias, &rows, &cols));
}

static void cuda_bias_grad(float *dbias, const float *dy, int64_t rows, int64_t cols) {
  if (cols <= 0) return;
  col_plan p = plan_cols(rows, cols, 1);
  double *part = scratch_d(0);
  for (int64_t c0 = 0; c0 < cols; c0 += p.w) {
    long long w = (long long)(cols - c0 < p.w ? cols - c0 : p.w);
    const float *x = dy + c0;
    launch(K_bias_grad_part, (uint64_t)cdiv(w, 32), (uint64_t)p.nchunk, 32, 8,
           ARGS(&x, &rows, &cols, &w, &p.rpc, &part));
    colsum_add(dbias + c0, part, &p, w);
  }
}

static void cuda_act_fwd(moert_act act, const float *h, float *a, int64_t n) {
  if (n <= 0) return;
  int k = act == MOERT_ACT_RELU ? K_act_fwd_relu : act == MOERT_ACT_GELU ? K_act_fwd_gelu
                                  : act == MOERT_ACT_TANH ? K_act_fwd_tanh : K_act_fwd_silu;
  launch(k, grid_for(n, 1024), 1, 256, 1, ARGS(&h, &a, &n));
}

static void cuda_act_bwd(moert_act act, const float *h, const float *da, float *dh, int64_t n) {
  if (n <= 0) return;
  int k = act == MOERT_ACT_RELU ? K_act_bwd_relu : act == MOERT_ACT_GELU ? K_act_bwd_gelu
                                  : act == MOERT_ACT_TANH ? K_act_bwd_tanh : K_act_bwd_silu;
  launch(k, grid_for(n, 1024), 1, 256, 1, ARGS(&h, &da, &dh, &n));
}

static void cuda_swiglu_fwd(const float *h, float *a, int64_t rows, int64_t hid) {
  if (rows <= 0 || hid <= 0) return;
  launch(K_swiglu_fwd, grid_for(cdiv(hid, 4), 256), (uint64_t)clamp64(rows, 1, MAX_GRID_Y), 256, 1,
         ARGS(&h, &a, &rows, &hid));
}

static void cuda_swiglu_bwd(const float *h, const float *da, float *dh, int64_t rows,
                            int64_t hid) {
  if (rows <= 0 || hid <= 0) return;
  launch(K_swiglu_bwd, grid_for(cdiv(hid, 4), 256), (uint64_t)clamp64(rows, 1, MAX_GRID_Y), 256, 1,
         ARGS(&h, &da, &dh, &rows, &hid));
}

/* ------------------------------------------------------------ norms */

static void cuda_layernorm_fwd(const float *x, const float *g, const float *b, float *y,
                               float *mean, float *rstd, int64_t rows, int64_t dim, float eps) {
  if (rows <= 0) return;
  unsigned bx, by;
  row_shape(dim, &bx, &by);
  launch_spec(K_layernorm_fwd, dim, 0, row_grid(rows, by, MAX_GRID_X), 1, bx, by,
         ARGS(&x, &g, &b, &y, &mean, &rstd, &rows, &dim, &eps));
}

static void cuda_layernorm_bwd(const float *x, const float *g, const float *mean,
                               const float *rstd, const float *dy, float *dx, float *dg,
                               float *db, int64_t rows, int64_t dim) {
  if (rows <= 0 || dim <= 0) return;
  unsigned bx, by;
  row_shape(dim, &bx, &by);
  launch_spec(K_layernorm_bwd_dx, dim, 0, row_grid(rows, by, MAX_GRID_X), 1, bx, by,
         ARGS(&x, &g, &mean, &rstd, &dy, &dx, &rows, &dim));
  col_plan p = plan_cols(rows, dim, 2);
  for (int64_t c0 = 0; c0 < dim; c0 += p.w) {
    long long w = (long long)(dim - c0 < p.w ? dim - c0 : p.w);
    const float *xs = x + c0, *dys = dy + c0;
    double *pg = scratch_d(0), *pb = scratch_d(p.nchunk * w);
    launch(K_layernorm_bwd_part, (uint64_t)cdiv(w, 32), (uint64_t)p.nchunk, 32, 8,
           ARGS(&xs, &mean, &rstd, &dys, &rows, &dim, &w, &p.rpc, &pg, &pb));
    colsum_add(dg + c0, pg, &p, w);
    colsum_add(db + c0, pb, &p, w);
  }
}

static void cuda_rmsnorm_fwd(const float *x, const float *g, float *y, float *rstd, int64_t rows,
                             int64_t dim, float eps) {
  if (rows <= 0) return;
  unsigned bx, by;
  row_shape(dim, &bx, &by);
  launch_spec(K_rmsnorm_fwd, dim, 0, row_grid(rows, by, MAX_GRID_X), 1, bx, by,
         ARGS(&x, &g, &y, &rstd, &rows, &dim, &eps));
}

static void cuda_rmsnorm_bwd(const float *x, const float *g, const float *rstd, const float *dy,
                             float *dx, float *dg, int64_t rows, int64_t dim) {
  if (rows <= 0 || dim <= 0) return;
  unsigned bx, by;
  row_shape(dim, &bx, &by);
  launch_spec(K_rmsnorm_bwd_dx, dim, 0, row_grid(rows, by, MAX_GRID_X), 1, bx, by,
         ARGS(&x, &g, &rstd, &dy, &dx, &rows, &dim));
  col_plan p = plan_cols(rows, dim, 1);
  for (int64_t c0 = 0; c0 < dim; c0 += p.w) {
    long long w = (long long)(dim - c0 < p.w ? dim - c0 : p.w);
    const float *xs = x + c0, *dys = dy + c0;
    double *pg = scratch_d(0);
    launch(K_rmsnorm_bwd_part, (uint64_t)cdiv(w, 32), (uint64_t)p.nchunk, 32, 8,
           ARGS(&xs, &rstd, &dys, &rows, &dim, &w, &p.rpc, &pg));
    colsum_add(dg + c0, pg, &p, w);
  }
}

static void cuda_l2norm_rows_fwd(const float *x, float *y, float *norm, int64_t rows,
                                 int64_t cols) {
  if (rows <= 0) return;
  unsigned bx, by;
  row_shape(cols, &bx, &by);
  launch_spec(K_l2norm_rows_fwd, cols, 0, row_grid(rows, by, MAX_GRID_X), 1, bx, by,
         ARGS(&x, &y, &norm, &rows, &cols));
}

static void cuda_l2norm_rows_bwd(const float *x, const float *norm, const float *dy, float *dx,
                                 int64_t rows, int64_t cols) {
  if (rows <= 0) return;
  unsigned bx, by;
  row_shape(cols, &bx, &by);
  launch_spec(K_l2norm_rows_bwd, cols, 0, row_grid(rows, by, MAX_GRID_X), 1, bx, by,
         ARGS(&x, &norm, &dy, &dx, &rows, &cols));
}

/* Column norms: partial sums (of x^2, or of dy x when dy is not null), the
 * per-column scale and shift, then out = in * scale - x * shift. The
 * partials of all columns and the scale and shift live in the scratch. */
static void l2norm_cols(const float *x, const float *dy, float *norm, float *out, int64_t rows,
                        int64_t cols) {
  if (cols <= 0 || !healthy()) return;
  col_plan p = plan_cols(rows, cols, 1);
  if (p.w < cols || (p.nchunk + 2) * cols > SCRATCH_DOUBLES) {
    MOERT_FAIL(&G.err, "l2norm over %" PRId64 " columns exceeds the cuda backend's scratch", cols);
    return;
  }
  double *part = scratch_d(0), *scale = scratch_d(p.nchunk * cols),
         *shift = scratch_d((p.nchunk + 1) * cols);
  long long w = (long long)cols, nchunk = (long long)p.nchunk;
  int fwd = dy == NULL;
  launch(K_l2norm_cols_part, (uint64_t)cdiv(w, 32), (uint64_t)p.nchunk, 32, 8,
         ARGS(&x, &dy, &rows, &cols, &w, &p.rpc, &part));
  launch(K_l2norm_cols_finish, grid_for(cols, 256), 1, 256, 1,
         ARGS(&part, &nchunk, &w, &norm, &fwd, &scale, &shift));
  if (rows <= 0) return;
  const float *in = fwd ? x : dy;
  launch(K_l2norm_cols_apply, grid_for(cols, 256), (uint64_t)clamp64(rows, 1, MAX_GRID_Y), 256, 1,
         ARGS(&in, &x, &scale, &shift, &out, &rows, &cols));
}

static void cuda_l2norm_cols_fwd(const float *x, float *y, float *norm, int64_t rows,
                                 int64_t cols) {
  l2norm_cols(x, NULL, norm, y, rows, cols);
}

static void cuda_l2norm_cols_bwd(const float *x, const float *norm, const float *dy, float *dx,
                                 int64_t rows, int64_t cols) {
  l2norm_cols(x, dy, (float *)norm, dx, rows, cols); /* the backward only reads norm */
}

/* ------------------------------------------------------------ gating */

/* The batch-prioritized order from topv: the counts of tokens ranked
 * before each, in the first ints of the scratch (cuda_gate_fwd keeps its
 * partials past them). */
static void gate_priority_order(const float *topv, int32_t *order, int64_t tokens, int64_t top_k) {
  int32_t *rank = (int32_t *)scratch_d(0);
  cuda_zero(rank, sizeof(int32_t) * (size_t)tokens);
  /* chunks of the compared tokens: about 4 blocks an SM, 256 keys a chunk at least */
  int64_t blocks = cdiv(tokens, 256);
  int64_t chunks = clamp64(cdiv((int64_t)G.sm_count * 4, blocks), 1, cdiv(tokens, 256));
  launch(K_gate_priority_rank, (uint64_t)blocks, (uint64_t)clamp64(chunks, 1, MAX_GRID_Y), 256, 1,
         ARGS(&topv, &rank, &tokens, &top_k));
  launch(K_gate_priority_scatter, grid_for(tokens, 256), 1, 256, 1, ARGS(&rank, &order, &tokens));
}

/* Two kernels (gating.cu): gate_topk, whose blocks leave their partial sums
 * (the scores' columns, the z and entropy sums) at the scratch's end, and
 * gate_locations, or gate_ec with expert choice, which finishes them (and
 * the aux loss at one rank, its done-counter in a scalar slot); the
 * priority order's two between them when asked (token choice). The scratch
 * from its start: the priority ranks (token choice) or the best-scored
 * experts (expert choice), an int a token; a sigmoid gate's per-token score
 * sums, a double a token; expert choice's lists of taken tokens, min(C,
 * tokens) ints a gate_ec block; the partials, experts + 2 doubles a
 * gate_topk block. */
static void cuda_gate_fwd(const moert_cpu_gate_io *g, int64_t tokens, int64_t experts, int64_t top_k) {
  if (experts <= 0 || !healthy()) return;
  bool ec = g->ec_capacity > 0, grouped = g->groups > 1;
  if (grouped && g->groups > MOERT_GATE_MAX_GROUPS) {
    MOERT_FAIL(&G.err, "group-limited routing over %" PRId64 " groups exceeds the cuda gate's limit (%d)",
               g->groups, MOERT_GATE_MAX_GROUPS);
    return;
  }
  if (ec && top_k != experts) {
    MOERT_FAIL(&G.err, "expert choice takes top_k = experts (%" PRId64 "), not %" PRId64, experts, top_k);
    return;
  }
  int64_t cap = ec ? (g->ec_capacity < tokens ? g->ec_capacity : tokens) : 0;
  int64_t ints = (g->order && !ec) || ec ? cdiv(tokens, 2) : 0, norms = g->sigmoid ? tokens : 0;
  int64_t pw = experts + MOERT_GATE_PART_EXTRA, room = SCRATCH_DOUBLES - ints - norms;
  /* gate_ec's blocks: as many as their lists leave half the room for */
  int64_t ec_blocks = ec ? clamp64(experts, 1, MAX_GRID_X) : 0;
  if (ec && cap > 0 && ec_blocks > room / 2 / cdiv(cap, 2)) ec_blocks = room / 2 / cdiv(cap, 2);
  room -= ec ? ec_blocks * cdiv(cap, 2) : 0;
  int64_t blocks = clamp64(cdiv(tokens, 8), 1, (int64_t)G.sm_count * 8);
  if (blocks > room / pw) blocks = room / pw;
  if (blocks < 1 || (ec && ec_blocks < 1)) {
    MOERT_FAIL(&G.err,
               "a gate of %" PRId64 " tokens and %" PRId64 " experts%s exceeds the cuda backend's scratch "
               "(%" PRId64 " doubles); use fewer tokens per rank",
               tokens, experts, ec ? " with expert choice" : g->order ? " in priority order" : "",
               (int64_t)SCRATCH_DOUBLES);
    return;
  }
  int32_t *top1 = ec ? (int32_t *)scratch_d(0) : NULL;
  double *norm = g->sigmoid ? scratch_d(ints) : NULL;
  int32_t *list = ec ? (int32_t *)scratch_d(ints + norms) : NULL;
  double *part = scratch_d(SCRATCH_DOUBLES - blocks * pw);
  long long nparts = tokens > 0 ? (long long)blocks : 0, pwl = (long long)pw;
  long long groups = grouped ? (long long)g->groups : 1, top_groups = (long long)g->top_groups;
  moert_cpu_gate_io a = *g; /* the kernels' arguments point into a copy */
  int nz = a.normalize, sg = a.sigmoid, eci = ec, zi = a.z_sum != NULL, hi = a.entropy_sum != NULL;
  if (tokens > 0)
    launch_spec(K_gate_topk, experts, top_k, (uint64_t)blocks, 1, 32, 8,
                ARGS(&a.logits, &a.noise, &a.bias, &a.scores, &a.idx, &a.topv, &a.gate, &nz, &sg, &groups,
                     &top_groups, &a.route_scale, &eci, &top1, &norm, &part, &pwl, &zi, &hi, &tokens,
                     &experts, &top_k));
  unsigned *done = (unsigned *)scalar_slot(2);
  if (ec) {
    long long capl = (long long)cap;
    launch(K_gate_ec, (uint64_t)ec_blocks, 1, 512, 1,
           ARGS(&a.scores, &top1, &a.loc, &a.counts, &capl, &list, &part, &nparts, &pwl, &a.score_sum,
                &a.top1_count, &a.dscore_coef, &a.global_tokens, &a.aux_out, &done, &a.z_sum, &a.entropy_sum,
                &tokens, &experts));
    return;
  }
  if (a.order && tokens > 0) gate_priority_order(a.topv, a.order, tokens, top_k);
  launch_spec(K_gate_locations, top_k, 0, (uint64_t)clamp64(experts, 1, MAX_GRID_X), 1, 512, 1,
              ARGS(&a.idx, &a.order, &a.loc, &a.counts, &part, &nparts, &pwl, &a.score_sum, &a.top1_count,
                   &a.dscore_coef, &a.global_tokens, &a.aux_out, &done, &a.z_sum, &a.entropy_sum, &tokens,
                   &experts, &top_k));
}

static void cuda_gate_bwd(const moert_cpu_gate_bwd_io *g, int64_t tokens, int64_t experts, int64_t top_k) {
  if (tokens <= 0 || experts <= 0) return;
  moert_cpu_gate_bwd_io a = *g; /* the kernel's arguments point into a copy */
  int nz = a.normalize, sg = a.sigmoid, ec = a.ec_capacity > 0;
  launch_spec(K_gate_bwd, experts, top_k, row_grid(tokens, 8, MAX_GRID_X), 1, 32, 8,
              ARGS(&a.scores, &a.idx, &a.topv, &a.dgate, &a.dscore_coef, &a.weight, &a.logits, &a.noise,
                   &a.z_weight, &a.global_tokens, &a.dlogits, &tokens, &experts, &top_k, &nz, &sg,
                   &a.route_scale, &ec));
}

static void cuda_aux_loss_to(const float *score_sum, const float *top1_count, float *dscore_coef,
                             int64_t experts, double global_tokens, float *out) {
  launch(K_aux_loss, 1, 1, 256, 1,
         ARGS(&score_sum, &top1_count, &dscore_coef, &experts, &global_tokens, &out));
}

float moert_backend_cuda_aux_loss(const float *score_sum, const float *top1_count,
                                  float *dscore_coef, int64_t experts, double global_tokens) {
  float *out = (float *)scalar_slot(1), v;
  cuda_aux_loss_to(score_sum, top1_count, dscore_coef, experts, global_tokens, out);
  return fetch(&v, out, sizeof v) ? v : NAN;
}

/* ------------------------------------------------------------ dispatch, combine */

/* Token-major kernels: a block a token, threads for a row of float4s. */
static void token_launch(int k, int64_t tokens, int64_t dim, void **args) {
  if (tokens <= 0) return;
  launch(k, (uint64_t)clamp64(tokens, 1, MAX_GRID_X), 1, threads_for(cdiv(dim, 4)), 1, args);
}

static void cuda_dispatch(const float *x, const int32_t *idx, const int32_t *loc, float *buf,
                          int64_t tokens, int64_t top_k, int64_t experts, int64_t capacity,
                          int64_t dim) {
  cuda_zero(buf, sizeof(float) * (size_t)(experts * capacity * dim));
  token_launch(K_dispatch, tokens, dim,
               ARGS(&x, &idx, &loc, &buf, &tokens, &top_k, &experts, &capacity, &dim));
}

static void cuda_dispatch_bwd(const float *dbuf, const int32_t *idx, const int32_t *loc,
                              float *dx, int64_t tokens, int64_t top_k, int64_t experts,
                              int64_t capacity, int64_t dim) {
  token_launch(K_dispatch_bwd, tokens, dim,
               ARGS(&dbuf, &idx, &loc, &dx, &tokens, &top_k, &experts, &capacity, &dim));
}

static void cuda_combine(const float *buf, const int32_t *idx, const int32_t *loc,
                         const float *gate, float *y, int64_t tokens, int64_t top_k,
                         int64_t experts, int64_t capacity, int64_t dim) {
  token_launch(K_combine, tokens, dim,
               ARGS(&buf, &idx, &loc, &gate, &y, &tokens, &top_k, &experts, &capacity, &dim));
}

static void cuda_combine_bwd(const float *dy, const float *buf, const int32_t *idx,
                             const int32_t *loc, const float *gate, float *dbuf, float *dgate,
                             int64_t tokens, int64_t top_k, int64_t experts, int64_t capacity,
                             int64_t dim) {
  cuda_zero(dbuf, sizeof(float) * (size_t)(experts * capacity * dim));
  token_launch(K_combine_bwd, tokens, dim,
               ARGS(&dy, &buf, &idx, &loc, &gate, &dbuf, &dgate, &tokens, &top_k, &experts,
                    &capacity, &dim));
}

/* ------------------------------------------------------------ the expert path, typed */

static void cuda_convert(void *dst, moert_dt dt, const void *src, moert_dt st, int64_t n) {
  if (n <= 0) return;
  if (dt == st) {
    watch(dst, (size_t)n * (size_t)moert_dt_size(dt));
    if (healthy())
      CUOK(&G.err, cuMemcpyDtoDAsync, (DPTR(dst), DPTR(src), (size_t)n * (size_t)moert_dt_size(dt), G.stream));
    return;
  }
  launch(dt == MOERT_BF16 ? K_cvt_f2bf : K_cvt_bf2f, grid_for(n, 1024), 1, 256, 1, ARGS(&dst, &src, &n));
}

static void cuda_fill_normal(float *out, int64_t n, uint64_t seed, uint64_t stream, uint64_t first, float mean,
                             float std) {
  if (n <= 0) return;
  watch(out, sizeof(float) * (size_t)n);
  launch(K_fill_normal, grid_for(n, 1024), 1, 256, 1, ARGS(&out, &n, &seed, &stream, &first, &mean, &std));
}

static void cuda_fill_normal_step(float *out, int64_t n, uint64_t seed, uint64_t stream, const int64_t *step,
                                  uint64_t per_step, uint64_t offset, float mean, float std) {
  if (n <= 0) return;
  watch(out, sizeof(float) * (size_t)n);
  launch(K_fill_normal_step, grid_for(n, 1024), 1, 256, 1,
         ARGS(&out, &n, &seed, &stream, &step, &per_step, &offset, &mean, &std));
}

static void cuda_bias_add_t(moert_dt dt, void *y, const void *bias, int64_t count, int64_t rows,
                            int64_t cols) {
  if (count <= 0 || rows <= 0 || cols <= 0) return;
  if (dt == MOERT_F32) {
    for (int64_t z = 0; z < count; z++)
      cuda_bias_add((float *)y + z * rows * cols, (const float *)bias + z * cols, rows, cols);
    return;
  }
  launch(K_bias_add_bf16, grid_for(cols, 256), (uint64_t)clamp64(count * rows, 1, MAX_GRID_Y), 256, 1,
         ARGS(&y, &bias, &count, &rows, &cols));
}

static void cuda_bias_grad_t(moert_dt dt, float *dbias, const void *dy, int64_t count, int64_t rows,
                             int64_t cols) {
  if (cols <= 0) return;
  if (dt == MOERT_F32) {
    for (int64_t z = 0; z < count; z++)
      cuda_bias_grad(dbias + z * cols, (const float *)dy + z * rows * cols, rows, cols);
    return;
  }
  col_plan p = plan_cols(rows, cols, 1);
  double *part = scratch_d(0);
  for (int64_t z = 0; z < count; z++)
    for (int64_t c0 = 0; c0 < cols; c0 += p.w) {
      long long w = (long long)(cols - c0 < p.w ? cols - c0 : p.w);
      const uint16_t *x = (const uint16_t *)dy + z * rows * cols + c0;
      launch(K_bias_grad_part_bf16, (uint64_t)cdiv(w, 32), (uint64_t)p.nchunk, 32, 8,
             ARGS(&x, &rows, &cols, &w, &p.rpc, &part));
      colsum_add(dbias + z * cols + c0, part, &p, w);
    }
}

static void cuda_act_fwd_t(moert_dt dt, moert_act act, const void *h, void *a, int64_t n) {
  if (dt == MOERT_F32) {
    cuda_act_fwd(act, h, a, n);
    return;
  }
  if (n <= 0) return;
  int k = act == MOERT_ACT_RELU ? K_act_fwd_relu_bf16 : act == MOERT_ACT_GELU ? K_act_fwd_gelu_bf16
                                                                              : K_act_fwd_silu_bf16;
  launch(k, grid_for(n, 1024), 1, 256, 1, ARGS(&h, &a, &n));
}

static void cuda_act_bwd_t(moert_dt dt, moert_act act, const void *h, const void *da, void *dh, int64_t n) {
  if (dt == MOERT_F32) {
    cuda_act_bwd(act, h, da, dh, n);
    return;
  }
  if (n <= 0) return;
  int k = act == MOERT_ACT_RELU ? K_act_bwd_relu_bf16 : act == MOERT_ACT_GELU ? K_act_bwd_gelu_bf16
                                                                              : K_act_bwd_silu_bf16;
  launch(k, grid_for(n, 1024), 1, 256, 1, ARGS(&h, &da, &dh, &n));
}

static void cuda_swiglu_fwd_t(moert_dt dt, const void *h, void *a, int64_t rows, int64_t hid) {
  if (dt == MOERT_F32) {
    cuda_swiglu_fwd(h, a, rows, hid);
    return;
  }
  if (rows <= 0 || hid <= 0) return;
  launch(K_swiglu_fwd_bf16, grid_for(rows * hid, 1024), 1, 256, 1, ARGS(&h, &a, &rows, &hid));
}

static void cuda_swiglu_bwd_t(moert_dt dt, const void *h, const void *da, void *dh, int64_t rows,
                              int64_t hid) {
  if (dt == MOERT_F32) {
    cuda_swiglu_bwd(h, da, dh, rows, hid);
    return;
  }
  if (rows <= 0 || hid <= 0) return;
  launch(K_swiglu_bwd_bf16, grid_for(rows * hid, 1024), 1, 256, 1, ARGS(&h, &da, &dh, &rows, &hid));
}

/* bf16 token kernels: threads for a row of 8-element groups. */
static void token_launch8(int k, int64_t tokens, int64_t dim, void **args) {
  if (tokens <= 0) return;
  launch(k, (uint64_t)clamp64(tokens, 1, MAX_GRID_X), 1, threads_for(cdiv(dim, 8)), 1, args);
}

/* The expert-side buffer's slots that no kept claim fills: with the claim
 * counts, the slots past each expert's kept claims (a kernel), else all of
 * them (a memset before the scatter). */
static void zero_unfilled(void *buf, const int32_t *counts, int64_t keep, int64_t experts, int64_t capacity,
                          int64_t row_bytes) {
  if (!counts) {
    cuda_zero(buf, (size_t)(experts * capacity * row_bytes));
    return;
  }
  uint64_t gx = (uint64_t)clamp64(cdiv(capacity * row_bytes, 16 * 256 * 4), 1, 64);
  launch(K_zero_tails, gx, (uint64_t)clamp64(experts, 1, 65535), 256, 1,
         ARGS(&buf, &counts, &keep, &experts, &capacity, &row_bytes));
}

static void cuda_dispatch_t(moert_dt dt, const float *x, const int32_t *idx, const int32_t *loc,
                            const int32_t *counts, int64_t keep, void *buf, int64_t tokens, int64_t top_k,
                            int64_t experts, int64_t capacity, int64_t dim) {
  zero_unfilled(buf, counts, keep, experts, capacity, dim * (dt == MOERT_F32 ? 4 : 2));
  if (dt == MOERT_F32) {
    token_launch(K_dispatch, tokens, dim, ARGS(&x, &idx, &loc, &buf, &tokens, &top_k, &experts, &capacity, &dim));
    return;
  }
  token_launch8(K_dispatch_bf16, tokens, dim, ARGS(&x, &idx, &loc, &buf, &tokens, &top_k, &experts, &capacity, &dim));
}

static void cuda_dispatch_bwd_t(moert_dt dt, const void *dbuf, const int32_t *idx, const int32_t *loc, float *dx,
                                int64_t tokens, int64_t top_k, int64_t experts, int64_t capacity, int64_t dim) {
  if (dt == MOERT_F32) {
    cuda_dispatch_bwd(dbuf, idx, loc, dx, tokens, top_k, experts, capacity, dim);
    return;
  }
  token_launch8(K_dispatch_bwd_bf16, tokens, dim,
                ARGS(&dbuf, &idx, &loc, &dx, &tokens, &top_k, &experts, &capacity, &dim));
}

static void cuda_combine_t(moert_dt dt, const void *buf, const int32_t *idx, const int32_t *loc, const float *gate,
                           float *y, int64_t tokens, int64_t top_k, int64_t experts, int64_t capacity, int64_t dim) {
  if (dt == MOERT_F32) {
    cuda_combine(buf, idx, loc, gate, y, tokens, top_k, experts, capacity, dim);
    return;
  }
  token_launch8(K_combine_bf16, tokens, dim,
                ARGS(&buf, &idx, &loc, &gate, &y, &tokens, &top_k, &experts, &capacity, &dim));
}

static void cuda_combine_bwd_t(moert_dt dt, const float *dy, const void *buf, const int32_t *idx,
                               const int32_t *loc, const int32_t *counts, int64_t keep, const float *gate,
                               void *dbuf, float *dgate, int64_t tokens, int64_t top_k, int64_t experts,
                               int64_t capacity, int64_t dim) {
  zero_unfilled(dbuf, counts, keep, experts, capacity, dim * (dt == MOERT_F32 ? 4 : 2));
  if (dt == MOERT_F32) {
    token_launch(K_combine_bwd, tokens, dim,
                 ARGS(&dy, &buf, &idx, &loc, &gate, &dbuf, &dgate, &tokens, &top_k, &experts, &capacity, &dim));
    return;
  }
  token_launch8(K_combine_bwd_bf16, tokens, dim,
                ARGS(&dy, &buf, &idx, &loc, &gate, &dbuf, &dgate, &tokens, &top_k, &experts, &capacity, &dim));
}

static void cuda_copy_blocks_t(moert_dt dt, void *dst, int64_t dst_stride, const void *src, int64_t src_stride,
                               int64_t nblocks, int64_t block, bool add) {
  if (dt == MOERT_F32) {
    cuda_copy_blocks(dst, dst_stride, src, src_stride, nblocks, block, add);
    return;
  }
  for (int64_t i = 0; i < nblocks && (G.b.watch_lo[0] || G.b.watch_lo[1]); i++)
    watch((uint16_t *)dst + i * dst_stride, 2 * (size_t)block);
  if (nblocks <= 0 || block <= 0) return;
  int a = add;
  launch(K_copy_blocks_bf16, grid_for(cdiv(block, 8), 256), (uint64_t)clamp64(nblocks, 1, MAX_GRID_Y), 256, 1,
         ARGS(&dst, &dst_stride, &src, &src_stride, &nblocks, &block, &a));
}

/* ------------------------------------------------------------ attention (attention.cu) */

/* A grid of (gx, gy, gz) blocks of bx threads, with smem bytes of dynamic
 * shared memory. */
static void launch3(int k, uint64_t gx, uint64_t gy, uint64_t gz, unsigned bx, unsigned smem, void **args) {
  if (!healthy()) return;
  moert_cu_check(moert_cu.cuLaunchKernel(G.fn[k], (unsigned)gx, (unsigned)gy, (unsigned)gz, bx, 1, 1, smem,
                                         G.stream, args, NULL),
                 moert_cuda_kernel_names[k], __FILE__, __LINE__, &G.err);
}

/* The kernels of a pass by the largest head dim they are instantiated for
 * (64, 128, 256): the fast paths at D = 64 and 128, the next one up for the
 * other multiples of 8. */
enum { ATTN_FWD, ATTN_DQ, ATTN_DKDV, ATTN_PASSES };
static const int attn_kernels[2][ATTN_PASSES][3] = {
    {{K_attn_fwd_f32_d64, K_attn_fwd_f32_d128, K_attn_fwd_f32_d256},
     {K_attn_bwd_dq_f32_d64, K_attn_bwd_dq_f32_d128, K_attn_bwd_dq_f32_d256},
     {K_attn_bwd_dkdv_f32_d64, K_attn_bwd_dkdv_f32_d128, K_attn_bwd_dkdv_f32_d256}},
    {{K_attn_fwd_bf16_d64, K_attn_fwd_bf16_d128, K_attn_fwd_bf16_d256},
     {K_attn_bwd_dq_bf16_d64, K_attn_bwd_dq_bf16_d128, K_attn_bwd_dq_bf16_d256},
     {K_attn_bwd_dkdv_bf16_d64, K_attn_bwd_dkdv_bf16_d128, K_attn_bwd_dkdv_bf16_d256}},
};
/* Rows a block of those kernels takes (queries, or keys for dK dV), and its
 * threads: the bf16 kernels 4 warps of 16 rows, the fp32 ones 32 rows of 8
 * lanes (attention.cu). */
static const int attn_rows[2] = {32, 64}, attn_threads[2] = {256, 128};

static int attn_kernel(moert_dt dt, int pass, int64_t head_dim) {
  return attn_kernels[dt == MOERT_BF16][pass][head_dim <= 64 ? 0 : head_dim <= 128 ? 1 : 2];
}

/* The bf16 forward's query rows a block and dynamic shared memory, by its
 * largest head dim 64, 128, 256: attention.cu's moert_attn_fwd_shape (MT
 * m-tiles of 16 rows a warp, Q in shared memory when MT > 1, key tiles of
 * BN rows, rows of DM + 8 bf16): (MT > 1 ? 64 MT : 0) + 2 BN rows. */
static const int attn_fwd_rows[3] = {128, 128, 64};
static const unsigned attn_fwd_smem[3] = {(128 + 2 * 64) * (64 + 8) * 2, (128 + 2 * 64) * (128 + 8) * 2,
                                          (2 * 32) * (256 + 8) * 2};

/* Allows the bf16 forwards their dynamic shared memory past 48 KB. */
static bool attn_setup(moert_status *st) {
  for (int i = 0; i < 3; i++)
    CUTRY(st, cuFuncSetAttribute,
          (G.fn[attn_kernels[1][ATTN_FWD][i]], CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, (int)attn_fwd_smem[i]));
  return true;
}

/* False (recorded in the sticky status) for shapes the kernels do not take. */
static bool attn_shape_ok(const char *op, moert_dt dt, int64_t nseq, int64_t heads, int64_t kv_heads,
                          int64_t head_dim) {
  if (!healthy()) return false;
  if (dt != MOERT_F32 && dt != MOERT_BF16)
    return MOERT_FAIL(&G.err, "%s: the cuda backend's attention takes fp32 or bf16", op);
  if (head_dim <= 0 || head_dim % 8 || head_dim > MOERT_MAX_HEAD_DIM)
    return MOERT_FAIL(&G.err, "%s: head_dim %" PRId64 " is not a multiple of 8 up to %d", op, head_dim,
                      MOERT_MAX_HEAD_DIM);
  if (kv_heads <= 0 || heads % kv_heads || heads > MAX_GRID_Y)
    return MOERT_FAIL(&G.err, "%s: %" PRId64 " heads over %" PRId64 " key/value heads", op, heads, kv_heads);
  if (nseq > MAX_GRID_Y)
    return MOERT_FAIL(&G.err, "%s: %" PRId64 " sequences a call (limit is %d)", op, nseq, (int)MAX_GRID_Y);
  return true;
}

static void cuda_rope_t(moert_dt dt, void *qkv, int64_t tokens, int64_t seq, int64_t pos0, int64_t heads,
                        int64_t kv_heads, int64_t head_dim, double base, bool inverse) {
  if (tokens <= 0 || seq <= 0 || !attn_shape_ok("rope", dt, 1, heads, kv_heads, head_dim)) return;
  long long t = tokens, s = seq, p0 = pos0;
  int H = (int)heads, KV = (int)kv_heads, D = (int)head_dim, inv = inverse;
  launch(dt == MOERT_BF16 ? K_rope_bf16 : K_rope_f32, grid_for(tokens * (head_dim / 2), 256), 1, 256, 1,
         ARGS(&qkv, &t, &s, &p0, &H, &KV, &D, &base, &inv));
}

static void cuda_rope(float *qkv, int64_t tokens, int64_t seq, int64_t pos0, int64_t heads, int64_t kv_heads,
                      int64_t head_dim, double base, bool inverse) {
  cuda_rope_t(MOERT_F32, qkv, tokens, seq, pos0, heads, kv_heads, head_dim, base, inverse);
}

static void cuda_attn_fwd_t(moert_dt dt, const void *qkv, void *o, float *lse, int64_t nseq, int64_t seq,
                            int64_t heads, int64_t kv_heads, int64_t head_dim, bool causal) {
  if (nseq <= 0 || seq <= 0 || !attn_shape_ok("attn_fwd", dt, nseq, heads, kv_heads, head_dim)) return;
  int bf = dt == MOERT_BF16, H = (int)heads, KV = (int)kv_heads, D = (int)head_dim, c = causal;
  int dm = head_dim <= 64 ? 0 : head_dim <= 128 ? 1 : 2;
  long long s = seq;
  launch3(attn_kernel(dt, ATTN_FWD, head_dim), (uint64_t)cdiv(seq, bf ? attn_fwd_rows[dm] : attn_rows[0]),
          (uint64_t)heads, (uint64_t)nseq, (unsigned)attn_threads[bf], bf ? attn_fwd_smem[dm] : 0,
          ARGS(&qkv, &o, &lse, &s, &H, &KV, &D, &c));
}

static void cuda_attn_fwd(const float *qkv, float *o, float *lse, int64_t nseq, int64_t seq, int64_t heads,
                          int64_t kv_heads, int64_t head_dim, bool causal) {
  cuda_attn_fwd_t(MOERT_F32, qkv, o, lse, nseq, seq, heads, kv_heads, head_dim, causal);
}

/* delta = rowsum(dO * O) into the scratch's first T H floats (laid out as
 * lse), then dQ per query tile and dK, dV per key tile: the two write
 * disjoint parts of dqkv, together all of it. */
static void cuda_attn_bwd_t(moert_dt dt, const void *qkv, const void *o, const float *lse, const void *dout,
                            void *dqkv, float *scratch, int64_t nseq, int64_t seq, int64_t heads,
                            int64_t kv_heads, int64_t head_dim, bool causal) {
  if (nseq <= 0 || seq <= 0 || !attn_shape_ok("attn_bwd", dt, nseq, heads, kv_heads, head_dim)) return;
  int bf = dt == MOERT_BF16, H = (int)heads, KV = (int)kv_heads, D = (int)head_dim, c = causal;
  long long ns = nseq, s = seq;
  float *delta = scratch;
  launch(bf ? K_attn_delta_bf16 : K_attn_delta_f32, grid_for(nseq * seq * heads, 8), 1, 256, 1,
         ARGS(&o, &dout, &delta, &ns, &s, &H, &D));
  uint64_t tiles = (uint64_t)cdiv(seq, attn_rows[bf]);
  launch3(attn_kernel(dt, ATTN_DQ, head_dim), tiles, (uint64_t)heads, (uint64_t)nseq, (unsigned)attn_threads[bf], 0,
          ARGS(&qkv, &lse, &delta, &dout, &dqkv, &s, &H, &KV, &D, &c));
  launch3(attn_kernel(dt, ATTN_DKDV, head_dim), tiles, (uint64_t)kv_heads, (uint64_t)nseq,
          (unsigned)attn_threads[bf], 0, ARGS(&qkv, &lse, &delta, &dout, &dqkv, &s, &H, &KV, &D, &c));
}

static void cuda_attn_bwd(const float *qkv, const float *o, const float *lse, const float *dout, float *dqkv,
                          float *scratch, int64_t nseq, int64_t seq, int64_t heads, int64_t kv_heads,
                          int64_t head_dim, bool causal) {
  cuda_attn_bwd_t(MOERT_F32, qkv, o, lse, dout, dqkv, scratch, nseq, seq, heads, kv_heads, head_dim, causal);
}

/* Decode's rows a block at least when a cache is split over more blocks
 * than heads (flash-decoding). */
enum { DECODE_MIN_CHUNK = 64 };

/* One block a head when that fills the GPU (or the cache is short), else
 * each head's cache in chunks over about two blocks an SM, the chunks'
 * partials (D + 2 floats each, in the scratch) combined by a second kernel. */
static void cuda_attn_decode_t(moert_dt dt, const void *q, const void *cache, void *o, int64_t len, int64_t heads,
                               int64_t kv_heads, int64_t head_dim) {
  if (len <= 0 || !attn_shape_ok("attn_decode", dt, 1, heads, kv_heads, head_dim)) return;
  int H = (int)heads, KV = (int)kv_heads, D = (int)head_dim, bf = dt == MOERT_BF16;
  int64_t most = clamp64(SCRATCH_DOUBLES * 2 / (heads * (head_dim + 2)), 1, MAX_GRID_Y);
  int64_t split = clamp64(cdiv(2 * (int64_t)G.sm_count, heads), 1, cdiv(len, DECODE_MIN_CHUNK));
  split = split < most ? split : most;
  long long n = len, chunk = cdiv(len, split);
  int nchunk = (int)cdiv(len, chunk); /* every chunk holds rows */
  float *part = (float *)scratch_d(0);
  launch(bf ? K_attn_decode_bf16 : K_attn_decode_f32, (uint64_t)heads, (uint64_t)nchunk, 256, 1,
         ARGS(&q, &cache, &o, &n, &H, &KV, &D, &chunk, &part));
  if (nchunk > 1)
    launch(bf ? K_attn_decode_combine_bf16 : K_attn_decode_combine_f32, (uint64_t)heads, 1, 256, 1,
           ARGS(&part, &o, &nchunk, &D));
}

static void cuda_attn_decode(const float *q, const float *cache, float *o, int64_t len, int64_t heads,
                             int64_t kv_heads, int64_t head_dim) {
  cuda_attn_decode_t(MOERT_F32, q, cache, o, len, heads, kv_heads, head_dim);
}

/* ------------------------------------------------------------ embedding, losses */

static void cuda_embed_fwd(const float *table, const int32_t *win, float *x, int64_t tokens,
                           int64_t context, int64_t vocab, int64_t dim) {
  token_launch(K_embed_fwd, tokens, dim,
               ARGS(&table, &win, &x, &tokens, &context, &vocab, &dim));
}

/* The embedding's gradient: a block a row of the table, the tokens' additions
 * in order (the same bits at every run) up to EMBED_ROWS_MAX rows; beyond, a
 * block a token with atomics (each row's additions in any order). */
enum { EMBED_ROWS_MAX = 1 << 16 };
static void cuda_embed_bwd(const float *dx, const int32_t *win, float *dtable, int64_t tokens,
                           int64_t context, int64_t vocab, int64_t dim) {
  if (tokens <= 0) return;
  if (context * vocab <= EMBED_ROWS_MAX) {
    launch(K_embed_bwd_rows, (uint64_t)clamp64(context * vocab, 1, MAX_GRID_X), 1, 256, 1,
           ARGS(&dx, &win, &dtable, &tokens, &context, &vocab, &dim));
    return;
  }
  launch(K_embed_bwd, (uint64_t)clamp64(tokens, 1, MAX_GRID_X), 1, threads_for(dim), 1,
         ARGS(&dx, &win, &dtable, &tokens, &context, &vocab, &dim));
}

/* The partial sums of xent (and its dlogits), reduced into *out on the
 * device. */
static void xent_parts(const float *logits, const int32_t *target, float *dlogits, int64_t rows,
                       int64_t vocab, float scale, float smoothing, double *out) {
  unsigned bx, by;
  row_shape(vocab, &bx, &by);
  uint64_t grid = row_grid(rows, by, MAX_PARTS);
  double *part = scratch_d(0);
  long long n = (long long)grid;
  launch_spec(K_xent, vocab, 0, grid, 1, bx, by,
              ARGS(&logits, &target, &dlogits, &rows, &vocab, &scale, &smoothing, &part));
  launch(K_reduce_sum, 1, 1, 1024, 1, ARGS(&part, &n, &out));
}

static double cuda_xent(const float *logits, const int32_t *target, float *dlogits, int64_t rows,
                        int64_t vocab, float scale, float smoothing) {
  if (rows <= 0) return 0;
  double *out = scalar_slot(0), v;
  xent_parts(logits, target, dlogits, rows, vocab, scale, smoothing, out);
  return fetch(&v, out, sizeof v) ? v : NAN;
}

static void cuda_xent_to(const float *logits, const int32_t *target, float *dlogits, int64_t rows,
                         int64_t vocab, float scale, float smoothing, double *out) {
  if (rows <= 0) {
    cuda_zero(out, sizeof *out);
    return;
  }
  xent_parts(logits, target, dlogits, rows, vocab, scale, smoothing, out);
}

static void mse_parts(const float *yhat, const float *y, float *dyhat, int64_t n, float scale,
                      double *out) {
  uint64_t grid = (uint64_t)clamp64(cdiv(n, 1024), 1, MAX_PARTS);
  double *part = scratch_d(0);
  long long np = (long long)grid;
  launch(K_mse, grid, 1, 256, 1, ARGS(&yhat, &y, &dyhat, &n, &scale, &part));
  launch(K_reduce_sum, 1, 1, 1024, 1, ARGS(&part, &np, &out));
}

static double cuda_mse(const float *yhat, const float *y, float *dyhat, int64_t n, float scale) {
  if (n <= 0) return 0;
  double *out = scalar_slot(0), v;
  mse_parts(yhat, y, dyhat, n, scale, out);
  return fetch(&v, out, sizeof v) ? v : NAN;
}

static void cuda_mse_to(const float *yhat, const float *y, float *dyhat, int64_t n, float scale,
                        double *out) {
  if (n <= 0) {
    cuda_zero(out, sizeof *out);
    return;
  }
  mse_parts(yhat, y, dyhat, n, scale, out);
}

/* ------------------------------------------------------------ optimizers */

static double cuda_sumsq(const float *x, int64_t n) { return dot_dev(x, x, n); }

static void cuda_scale(float *x, int64_t n, float s) {
  if (n <= 0) return;
  launch(K_scale, grid_for(n, 1024), 1, 256, 1, ARGS(&x, &n, &s));
}

static void cuda_adamw(float *p, const float *g, float *m, float *v, int64_t n, float lr,
                       float b1, float b2, float eps, float wd, int64_t step, const float *gscale,
                       uint16_t *low) {
  if (n <= 0) return;
  double t = (double)(step >= 1 ? step : 1);
  float bc1 = (float)(1 - pow(b1, t)), bc2 = (float)(1 - pow(b2, t));
  launch(K_adamw, grid_for(n, 1024), 1, 256, 1,
         ARGS(&p, &g, &m, &v, &n, &lr, &b1, &b2, &eps, &wd, &bc1, &bc2, &gscale, &low));
}

static void cuda_sgd(float *p, const float *g, int64_t n, float lr, float wd, const float *gscale,
                     uint16_t *low) {
  if (n <= 0) return;
  launch(K_sgd, grid_for(n, 1024), 1, 256, 1, ARGS(&p, &g, &n, &lr, &wd, &gscale, &low));
}

/* sumsq of x into *out on the device: dot's partials, reduced in order. */
static void cuda_sumsq_to(const float *x, int64_t n, double *out) {
  if (n <= 0) {
    cuda_zero(out, sizeof *out);
    return;
  }
  uint64_t grid = (uint64_t)clamp64(cdiv(n, 1024), 1, MAX_PARTS);
  double *part = scratch_d(0);
  long long np = (long long)grid;
  launch(K_dot, grid, 1, 256, 1, ARGS(&x, &x, &n, &part));
  launch(K_reduce_sum, 1, 1, 1024, 1, ARGS(&part, &np, &out));
}

static void cuda_scale_by_exp(float *y, const float *x, int64_t n, const float *log_scale, double max_log) {
  if (n <= 0) return;
  launch(K_scale_by_exp, grid_for(n, 1024), 1, 256, 1, ARGS(&y, &x, &n, &log_scale, &max_log));
}

static void cuda_add_dot_unclamped(float *acc, const float *a, const float *b, int64_t n,
                                   const float *log_scale, double max_log) {
  uint64_t grid = (uint64_t)clamp64(cdiv(n, 1024), 1, MAX_PARTS);
  double *part = scratch_d(0);
  long long np = n > 0 ? (long long)grid : 0; /* no parts: a sum of 0 */
  if (n > 0) launch(K_dot, grid, 1, 256, 1, ARGS(&a, &b, &n, &part));
  launch(K_add_dot_unclamped, 1, 1, 1024, 1, ARGS(&part, &np, &log_scale, &max_log, &acc));
}

static void cuda_norm_split(const double *part, int64_t n, float *hilo) {
  long long nn = (long long)n;
  launch(K_norm_split, 1, 1, 32, 1, ARGS(&part, &nn, &hilo));
}

static void cuda_clip_factor(const double *part, int64_t n, const float *hilo, double clip, double *norm,
                             float *factor) {
  long long nn = (long long)n;
  launch(K_clip_factor, 1, 1, 32, 1, ARGS(&part, &nn, &hilo, &clip, &norm, &factor));
}

/* ------------------------------------------------------------ the backend */

static void release(void) {
  if (G.stream) moert_cu.cuStreamSynchronize(G.stream);
  moert_cuda_graphs_release();
  moert_cuda_blas_release();
  if (G.scratch) moert_cu.cuMemFree(G.scratch);
  if (G.mod) moert_cu.cuModuleUnload(G.mod);
  if (G.stream) moert_cu.cuStreamDestroy(G.stream);
  if (G.ctx) moert_cu.cuDevicePrimaryCtxRelease(G.dev);
  memset(&G, 0, sizeof G);
}

static bool setup(int device, const char *cache_dir, bool use_cache, const char *kernels_src,
                  moert_status *st) {
  const char *missing = NULL;
  if (!moert_cu_load(&missing))
    return MOERT_FAIL(st, "no CUDA driver: %s could not be loaded (is there an NVIDIA GPU and "
                          "driver?); run with --backend cpu", missing);
  if (!moert_nvrtc_load(&missing))
    return MOERT_FAIL(st, "NVRTC could not be loaded (%s); install the CUDA toolkit's runtime "
                          "compiler or add its lib64 folder to LD_LIBRARY_PATH", missing);
  if (!moert_cublas_load(&missing))
    return MOERT_FAIL(st, "cuBLAS could not be loaded (%s); install the CUDA toolkit's cuBLAS or "
                          "add its lib64 folder to LD_LIBRARY_PATH", missing);
  int n = 0;
  CUTRY(st, cuInit, (0));
  CUTRY(st, cuDeviceGetCount, (&n));
  if (device < 0 || device >= n)
    return MOERT_FAIL(st, "no CUDA device %d: this machine has %d", device, n);
  CUTRY(st, cuDeviceGet, (&G.dev, device));
  CUTRY(st, cuDeviceGetAttribute,
        (&G.cc_major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, G.dev));
  CUTRY(st, cuDeviceGetAttribute,
        (&G.cc_minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, G.dev));
  CUTRY(st, cuDeviceGetAttribute, (&G.sm_count, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, G.dev));
  CUTRY(st, cuDevicePrimaryCtxRetain, (&G.ctx, G.dev));
  CUTRY(st, cuCtxSetCurrent, (G.ctx));
  /* A blocking stream: ordered with the legacy default stream too. */
  CUTRY(st, cuStreamCreate, (&G.stream, CU_STREAM_DEFAULT));
  CUTRY(st, cuMemAlloc, (&G.scratch, SCRATCH_BYTES));
  /* zeroed: the scalar slots hold counters that kernels leave at 0 (gate_fwd's) */
  CUTRY(st, cuMemsetD8, (G.scratch, 0, SCRATCH_BYTES));
  /* the timing marks' events, all made now: a step creates none */
  MOERT_TRY(st, moert_cuda_marks_setup(st));
  MOERT_TRY(st, moert_cuda_kernels_load(&G, cache_dir, use_cache, kernels_src, st));
  MOERT_TRY(st, attn_setup(st));
  MOERT_TRY(st, moert_cuda_blas_setup(&G, st));
  return true;
}

bool moert_backend_cuda_create(moert_backend **out, int device, const char *cache_dir,
                               bool use_cache, const char *kernels_src, moert_status *st) {
  *out = NULL;
  if (G.live)
    return MOERT_FAIL(st, "a cuda backend exists already (one per process; destroy it first)");
  memset(&G, 0, sizeof G);
  if (!setup(device, cache_dir, use_cache, kernels_src, st)) {
    release();
    return MOERT_UP(st);
  }
  G.live = true;
  G.b = (moert_backend){
      .name = "cuda",
      .alloc = cuda_alloc,
      .free = cuda_free,
      .upload = cuda_upload,
      .download = cuda_download,
      .zero = cuda_zero,
      .copy = cuda_copy,
      .add = cuda_add,
      .axpy = cuda_axpy,
      .dot = cuda_dot,
      .copy_blocks = cuda_copy_blocks,
      .drop_beyond = cuda_drop_beyond,
      .copy_blocks_t = cuda_copy_blocks_t,
      .fill_normal = cuda_fill_normal,
      .fill_normal_step = cuda_fill_normal_step,
      .xent_to = cuda_xent_to,
      .mse_to = cuda_mse_to,
      .aux_loss_to = cuda_aux_loss_to,
      .scale_by_exp = cuda_scale_by_exp,
      .add_dot_unclamped = cuda_add_dot_unclamped,
      .bf16 = true,
#define X(op) .op = cuda_##op,
      MOERT_BACKEND_OPS(X)
      MOERT_BACKEND_TYPED_OPS(X)
      MOERT_BACKEND_ATTN_OPS(X)
#undef X
          .impl = &G,
  };
  moert_cuda_graphs_ops(&G.b); /* mark, mark_ms, marks_reset; graph_* where the driver has them */
  *out = &G.b;
  return true;
}

void moert_backend_cuda_destroy(moert_backend *b) {
  if (b && b == &G.b && G.live) release();
}

bool moert_backend_cuda_cache_hit(const moert_backend *b) {
  return b && b == &G.b && G.live && G.cache_hit;
}

bool moert_backend_cuda_mma_check(moert_backend *b, moert_status *st) {
  if (!b || b != &G.b || !G.live) return MOERT_FAIL(st, "not the live cuda backend");
  uint16_t a[16 * 16], bm[16 * 8];
  float want[16 * 8], got[3 * 16 * 8];
  for (int i = 0; i < 16; i++)
    for (int k = 0; k < 16; k++) a[i * 16 + k] = moert_f32_to_bf16((float)((i * 3 + k * 5) % 7 - 3));
  for (int k = 0; k < 16; k++)
    for (int n = 0; n < 8; n++) bm[k * 8 + n] = moert_f32_to_bf16((float)((k * 2 + n * 3 + k * n) % 5 - 2));
  for (int i = 0; i < 16; i++)
    for (int n = 0; n < 8; n++) {
      float c = 0;
      for (int k = 0; k < 16; k++) c += moert_bf16_to_f32(a[i * 16 + k]) * moert_bf16_to_f32(bm[k * 8 + n]);
      want[i * 8 + n] = c;
    }
  void *da = NULL, *db = NULL, *dc = NULL;
  bool ok = b->alloc(b, sizeof a, &da, st) && b->alloc(b, sizeof bm, &db, st) && b->alloc(b, sizeof got, &dc, st) &&
            b->upload(b, da, a, sizeof a, st) && b->upload(b, db, bm, sizeof bm, st);
  if (ok) {
    launch(K_mma_check, 1, 1, 32, 1, ARGS(&da, &db, &dc));
    ok = b->download(b, got, dc, sizeof got, st);
  }
  static const char *const how[3] = {"fragments loaded by the documented layout", "ldmatrix and ldmatrix.trans",
                                     "ldmatrix (B^T)"};
  for (int w = 0; ok && w < 3; w++)
    for (int i = 0; ok && i < 16 * 8; i++)
      if (got[w * 128 + i] != want[i])
        ok = MOERT_FAIL(st, "mma.m16n8k16 with %s: C[%d][%d] is %g, not %g", how[w], i / 8, i % 8,
                        (double)got[w * 128 + i], (double)want[i]);
  b->free(b, da), b->free(b, db), b->free(b, dc);
  return ok;
}

const char *moert_backend_cuda_cache_path(const moert_backend *b) {
  return b && b == &G.b && G.live && G.cache_path[0] ? G.cache_path : NULL;
}

void *moert_backend_cuda_stream(const moert_backend *b) {
  return b && b == &G.b && G.live ? (void *)G.stream : NULL;
}

void moert_backend_cuda_set_waiter(moert_backend *b, moert_cuda_waiter fn, void *ctx) {
  if (!b || b != &G.b || !G.live) return;
  G.waiter = fn;
  G.waiter_ctx = fn ? ctx : NULL;
}

int moert_backend_cuda_specialized(const moert_backend *b) {
  int n = 0;
  if (b && b == &G.b && G.live)
    for (int i = 0; i < G.nspecs; i++) n += G.specs[i].fn != NULL;
  return n;
}

#endif /* MOERT_HAVE_CUDA_HEADERS */

/* ------------------------------------------------------------ device facts (driver: MFU, memory) */

#ifndef MOERT_HAVE_CUDA_HEADERS

const char *moert_backend_cuda_device_name(const moert_backend *b) {
  (void)b;
  return NULL;
}
bool moert_backend_cuda_compute_capability(const moert_backend *b, int *major, int *minor) {
  (void)b;
  *major = *minor = 0;
  return false;
}
bool moert_backend_cuda_mem_info(const moert_backend *b, size_t *free_bytes, size_t *total_bytes) {
  (void)b;
  *free_bytes = *total_bytes = 0;
  return false;
}

#else

const char *moert_backend_cuda_device_name(const moert_backend *b) {
  static char name[256];
  if (!b || b != &G.b || !G.live) return NULL;
  if (moert_cu.cuDeviceGetName(name, (int)sizeof name - 1, G.dev) != CUDA_SUCCESS) return NULL;
  return name[0] ? name : NULL;
}

bool moert_backend_cuda_compute_capability(const moert_backend *b, int *major, int *minor) {
  bool live = b && b == &G.b && G.live;
  *major = live ? G.cc_major : 0;
  *minor = live ? G.cc_minor : 0;
  return live;
}

bool moert_backend_cuda_mem_info(const moert_backend *b, size_t *free_bytes, size_t *total_bytes) {
  /* looked up here rather than in CU_FUNCS: the one user, at start */
  static __typeof__(cuMemGetInfo) *get_info;
  *free_bytes = *total_bytes = 0;
  if (!b || b != &G.b || !G.live) return false;
  if (!get_info)
    get_info = (__typeof__(cuMemGetInfo) *)dlsym(moert_cu.lib, MOERT_XSTR(cuMemGetInfo));
  return get_info && get_info(free_bytes, total_bytes) == CUDA_SUCCESS;
}

#endif /* MOERT_HAVE_CUDA_HEADERS */
