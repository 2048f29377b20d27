/* backend_cpu.c — the cpu backend: host memory and cpu_ops.c. */
#include "backend.h"
#include "rng.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifdef MOERT_HAVE_CBLAS
#include <cblas.h>
#endif

static moert_backend cpu_backend;

static void watch(const void *dst, size_t bytes) {
  for (int i = 0; i < 2; i++)
    if (cpu_backend.watch_lo[i] && (const char *)dst < (const char *)cpu_backend.watch_hi[i] &&
        (const char *)dst + bytes > (const char *)cpu_backend.watch_lo[i])
      cpu_backend.watched_bytes += (int64_t)bytes;
}

static bool cpu_alloc(moert_backend *b, size_t n, void **out, moert_status *st) {
  b->allocs++;
  /* 64-byte alignment for vector loads; calloc for zeroed pages */
  size_t rounded = (n + 63) / 64 * 64;
  void *p = aligned_alloc(64, rounded ? rounded : 64);
  if (!p) return MOERT_FAIL(st, "out of host memory: could not allocate %zu bytes", n);
  memset(p, 0, rounded ? rounded : 64);
  *out = p;
  return true;
}

static void cpu_free(moert_backend *b, void *p) {
  (void)b;
  free(p);
}

static bool cpu_upload(moert_backend *b, void *dst, const void *src, size_t n, moert_status *st) {
  (void)b;
  (void)st;
  watch(dst, n);
  if (n) memmove(dst, src, n);
  return true;
}

static bool cpu_download(moert_backend *b, void *dst, const void *src, size_t n, moert_status *st) {
  (void)b;
  (void)st;
  if (n) memmove(dst, src, n);
  return true;
}

static void cpu_zero(void *p, size_t bytes) { memset(p, 0, bytes); }
static void cpu_copy(float *dst, const float *src, int64_t n) {
  watch(dst, (size_t)n * sizeof *dst);
  memcpy(dst, src, (size_t)n * sizeof *dst);
}
static void cpu_add(float *y, const float *a, const float *b, int64_t n) {
  for (int64_t i = 0; i < n; i++) y[i] = a[i] + b[i];
}
static void cpu_axpy(float *y, const float *x, float alpha, int64_t n) {
  for (int64_t i = 0; i < n; i++) y[i] += alpha * x[i];
}
static double cpu_dot(const float *a, const float *b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; i++) s += (double)a[i] * b[i];
  return s;
}

static void cpu_copy_blocks(float *dst, int64_t dst_stride, const float *src, int64_t src_stride,
                            int64_t nblocks, int64_t block, bool add) {
  for (int64_t i = 0; i < nblocks; i++) {
    float *d = dst + i * dst_stride;
    watch(d, sizeof(float) * (size_t)block);
    const float *x = src + i * src_stride;
    if (add)
      for (int64_t k = 0; k < block; k++) d[k] += x[k];
    else
      memmove(d, x, sizeof(float) * (size_t)block);
  }
}
static void cpu_xent_to(const float *logits, const int32_t *target, float *dlogits, int64_t rows,
                        int64_t vocab, float scale, float smoothing, double *out) {
  *out = moert_cpu_xent(logits, target, dlogits, rows, vocab, scale, smoothing);
}

static void cpu_mse_to(const float *yhat, const float *y, float *dyhat, int64_t n, float scale,
                       double *out) {
  *out = moert_cpu_mse(yhat, y, dyhat, n, scale);
}

static void cpu_aux_loss_to(const float *score_sum, const float *top1_count, float *dscore_coef,
                            int64_t experts, double global_tokens, float *out) {
  *out = moert_cpu_aux_loss(score_sum, top1_count, dscore_coef, experts, global_tokens);
}

static void cpu_scale_by_exp(float *y, const float *x, int64_t n, const float *log_scale, double max_log) {
  double t = *log_scale;
  float s = (float)exp(t >= max_log ? max_log : t);
  for (int64_t i = 0; i < n; i++) y[i] = x[i] * s;
}

static void cpu_add_dot_unclamped(float *acc, const float *a, const float *b, int64_t n, const float *log_scale,
                                  double max_log) {
  if ((double)*log_scale >= max_log) return;
  *acc += (float)cpu_dot(a, b, n);
}

static void cpu_copy_blocks_t(moert_dt dt, void *dst, int64_t dst_stride, const void *src,
                              int64_t src_stride, int64_t nblocks, int64_t block, bool add) {
  if (dt == MOERT_F32) {
    cpu_copy_blocks(dst, dst_stride, src, src_stride, nblocks, block, add);
    return;
  }
  for (int64_t i = 0; i < nblocks; i++) {
    uint16_t *d = (uint16_t *)dst + i * dst_stride;
    const uint16_t *x = (const uint16_t *)src + i * src_stride;
    watch(d, sizeof(uint16_t) * (size_t)block);
    if (add)
      for (int64_t k = 0; k < block; k++)
        d[k] = moert_f32_to_bf16(moert_bf16_to_f32(d[k]) + moert_bf16_to_f32(x[k]));
    else
      memmove(d, x, sizeof(uint16_t) * (size_t)block);
  }
}
static void cpu_drop_beyond(int32_t *loc, int64_t n, int64_t keep) {
  for (int64_t i = 0; i < n; i++)
    if (loc[i] >= keep) loc[i] = INT32_MAX;
}

/* Timing marks: the host clock when each was made (the ops run as they are
 * called, so that is when the stream "reaches" it). */
static struct {
  double ms[MOERT_MAX_MARKS];
  int n;
} marks;

static int cpu_mark(moert_backend *b, void *stream) {
  (void)b, (void)stream;
  if (marks.n == MOERT_MAX_MARKS) return -1;
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  marks.ms[marks.n] = (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
  return marks.n++;
}

static bool cpu_mark_ms(moert_backend *b, int from, int to, double *ms, moert_status *st) {
  (void)b, (void)st;
  bool ok = from >= 0 && from < marks.n && to >= 0 && to < marks.n;
  *ms = ok ? marks.ms[to] - marks.ms[from] : NAN;
  return true;
}

static void cpu_marks_reset(moert_backend *b) {
  (void)b;
  marks.n = 0;
}

static void cpu_fill_normal_step(float *out, int64_t n, uint64_t seed, uint64_t stream, const int64_t *step,
                                 uint64_t per_step, uint64_t offset, float mean, float std) {
  moert_fill_normal(out, n, seed, stream, (uint64_t)(*step - 1) * per_step + offset, mean, std);
}

static moert_backend cpu_backend = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_upload,
    .download = cpu_download,
    .zero = cpu_zero,
    .copy = cpu_copy,
    .add = cpu_add,
    .axpy = cpu_axpy,
    .dot = cpu_dot,
    .copy_blocks = cpu_copy_blocks,
    .drop_beyond = cpu_drop_beyond,
    .copy_blocks_t = cpu_copy_blocks_t,
    .fill_normal = moert_fill_normal,
    .fill_normal_step = cpu_fill_normal_step,
    .xent_to = cpu_xent_to,
    .mse_to = cpu_mse_to,
    .aux_loss_to = cpu_aux_loss_to,
    .scale_by_exp = cpu_scale_by_exp,
    .add_dot_unclamped = cpu_add_dot_unclamped,
    .mark = cpu_mark,
    .mark_ms = cpu_mark_ms,
    .marks_reset = cpu_marks_reset,
#define X(op) .op = moert_cpu_##op,
    MOERT_BACKEND_OPS(X)
    MOERT_BACKEND_TYPED_OPS(X)
    MOERT_BACKEND_ATTN_OPS(X)
#undef X
};

moert_backend *moert_backend_cpu(void) {
  const char *e = getenv("MOEC_CPU_BF16");
  cpu_backend.bf16 = e && strcmp(e, "1") == 0;
  return &cpu_backend;
}

void moert_backend_cpu_share_cores(int ranks_here) {
#ifdef MOERT_HAVE_CBLAS
  /* OpenBLAS starts a thread per core in every process; ranks sharing a host
   * would oversubscribe it. OPENBLAS_NUM_THREADS, when set, wins. */
  if (ranks_here > 1 && !getenv("OPENBLAS_NUM_THREADS")) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    int n = cores > 0 ? (int)(cores / ranks_here) : 1;
    openblas_set_num_threads(n > 0 ? n : 1);
  }
#else
  (void)ranks_here;
#endif
}
