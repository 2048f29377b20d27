/* backend.h — one interface for the devices a step runs on (ggml's
 * ggml_backend_i): memory and the fused ops, as a table of functions.
 * The ops have exactly the signatures of cpu_ops.h; on a device backend their
 * pointers are device addresses, which the host never dereferences. The host
 * reads device memory only through `download`: a step's loss, statistics and
 * gradient norm at its end (the `_to` ops leave them in device memory), and
 * mid-step a dropless or dynamic capacity.
 * Implementations: cpu (backend_cpu.c, the numerical reference). */
#ifndef MOERT_BACKEND_H
#define MOERT_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cpu_ops.h"
#include "cpu_ops_typed.h"
#include "status.h"

/* The ops of cpu_ops.h a backend provides, by name. */
#define MOERT_BACKEND_OPS(X)                                                                   \
  X(gemm) X(gemm_batched) X(bias_add) X(bias_grad) X(act_fwd) X(act_bwd) X(swiglu_fwd)         \
  X(swiglu_bwd) X(layernorm_fwd) X(layernorm_bwd) X(rmsnorm_fwd) X(rmsnorm_bwd)                \
  X(l2norm_rows_fwd) X(l2norm_rows_bwd) X(l2norm_cols_fwd) X(l2norm_cols_bwd) X(gate_fwd)      \
  X(gate_bwd) X(dispatch) X(dispatch_bwd) X(combine)                                           \
  X(combine_bwd) X(embed_fwd) X(embed_bwd) X(xent) X(mse) X(sumsq) X(scale) X(adamw) X(sgd) \
  X(sumsq_to) X(norm_split) X(clip_factor)

/* The ops of cpu_ops_typed.h (the expert path in a storage type). */
#define MOERT_BACKEND_TYPED_OPS(X)                                                             \
  X(convert) X(gemm_ex) X(bias_add_t) X(bias_grad_t) X(act_fwd_t) X(act_bwd_t) X(swiglu_fwd_t) \
  X(swiglu_bwd_t) X(dispatch_t) X(dispatch_bwd_t) X(combine_t) X(combine_bwd_t)

/* The attention ops (cpu_ops.h, cpu_ops_typed.h): the cpu's, and the cuda
 * backend's (templates/attention.cu; fp32 and bf16, head dims a multiple of
 * 8 up to MOERT_MAX_HEAD_DIM). */
#define MOERT_BACKEND_ATTN_OPS(X) \
  X(rope) X(attn_fwd) X(attn_bwd) X(attn_decode) X(rope_t) X(attn_fwd_t) X(attn_bwd_t) X(attn_decode_t)

typedef struct moert_backend moert_backend;

/* Timing marks a backend keeps per step (cuda_graphs.c: CUDA events, all
 * made at create). Untraced, a step makes 2 + 4 per MoE layer; traced, about
 * 2 per span, some 150 per MoE layer at pipeline depth 8, of which the trace
 * takes at most 3/4 (trace.h). Marks past the limit are -1: not timed, and
 * nothing is allocated mid-step. */
enum { MOERT_MAX_MARKS = 16384 };
/* The most graphs a backend keeps (graph_end). */
enum { MOERT_MAX_GRAPHS = 512 };

struct moert_backend {
  const char *name;
  /* memory: n bytes, zeroed; never fails silently */
  bool (*alloc)(moert_backend *b, size_t n, void **out, moert_status *st);
  void (*free)(moert_backend *b, void *p);
  bool (*upload)(moert_backend *b, void *dst, const void *src, size_t n, moert_status *st);
  bool (*download)(moert_backend *b, void *dst, const void *src, size_t n, moert_status *st);
  /* elementwise helpers over n floats */
  void (*zero)(void *p, size_t bytes);
  void (*copy)(float *dst, const float *src, int64_t n);
  void (*add)(float *y, const float *a, const float *b, int64_t n);  /* y = a + b */
  void (*axpy)(float *y, const float *x, float alpha, int64_t n);    /* y += alpha x */
  double (*dot)(const float *a, const float *b, int64_t n);
  /* nblocks blocks of `block` floats: dst + i*dst_stride = (or +=, when add)
   * src + i*src_stride. Packs and transposes token chunks. */
  void (*copy_blocks)(float *dst, int64_t dst_stride, const float *src, int64_t src_stride,
                      int64_t nblocks, int64_t block, bool add);
  /* loc[i] >= keep becomes INT32_MAX: those claims are dropped whatever the
   * padded capacity the buffers use. */
  void (*drop_beyond)(int32_t *loc, int64_t n, int64_t keep);
  /* out[i] = mean + std N(0, 1) of (seed, stream, first + i): rng.h's
   * moert_fill_normal, drawn where the data lives (inputs, gate noise) */
  void (*fill_normal)(float *out, int64_t n, uint64_t seed, uint64_t stream, uint64_t first, float mean,
                      float std);
  /* fill_normal from index (*step - 1) * per_step + offset, *step read where
   * it lives when the op runs (a graph's gate noise follows the step) */
  void (*fill_normal_step)(float *out, int64_t n, uint64_t seed, uint64_t stream, const int64_t *step,
                           uint64_t per_step, uint64_t offset, float mean, float std);
  /* Sums left where the data lives: xent, mse and moert_cpu_aux_loss with
   * the value stored at *out (backend memory) instead of returned, so the
   * host need not wait for it mid-step; the executor reads such values once,
   * at the step's end (the gradients they write are as the plain ops'). */
  void (*xent_to)(const float *logits, const int32_t *target, float *dlogits, int64_t rows,
                  int64_t vocab, float scale, float smoothing, double *out);
  void (*mse_to)(const float *yhat, const float *y, float *dyhat, int64_t n, float scale, double *out);
  void (*aux_loss_to)(const float *score_sum, const float *top1_count, float *dscore_coef,
                      int64_t experts, double global_tokens, float *out);
  /* The cosine gate's temperature read where it lives: with t = *log_scale
   * clamped to max_log, y = x * (float)exp(t) over n (the logits from the raw
   * similarities; d raw from d logits); add_dot_unclamped adds (float) sum
   * a * b to *acc unless t was clamped (its gradient). */
  void (*scale_by_exp)(float *y, const float *x, int64_t n, const float *log_scale, double max_log);
  void (*add_dot_unclamped)(float *acc, const float *a, const float *b, int64_t n, const float *log_scale,
                            double max_log);
  /* copy_blocks over elements of type dt (offsets and strides in elements) */
  void (*copy_blocks_t)(moert_dt dt, void *dst, int64_t dst_stride, const void *src,
                        int64_t src_stride, int64_t nblocks, int64_t block, bool add);
  /* Timing without synchronizing. A mark is a point on a stream, timed when
   * the stream reaches it: mark() records one now on `stream` (NULL: the
   * backend's own; on cuda another CUstream of its context, such as a comm's
   * side stream) and returns its id, or -1 when the step's MOERT_MAX_MARKS
   * are spent or an op failed (that point is then not timed). mark_ms() sets
   * *ms to the milliseconds from mark `from` to mark `to`, waiting until the
   * device has reached both (NAN when either is -1); false only when the
   * device failed. marks_reset() forgets every mark: at the start of a step,
   * once the last step's were read. cpu: the host's monotonic clock at the
   * call; cuda: cuEventRecord of events from a pool made at create, timed by
   * cuEventElapsedTime. */
  int (*mark)(moert_backend *b, void *stream);
  bool (*mark_ms)(moert_backend *b, int from, int to, double *ms, moert_status *st);
  void (*marks_reset)(moert_backend *b);
  /* CUDA graphs (NULL where the backend has none, as on the cpu): between
   * graph_begin and graph_end the backend's ops are recorded (captured from
   * its stream, with what a comm enqueues there), not run; graph_end makes
   * them graph `id` (0 <= id < MOERT_MAX_GRAPHS, the caller's numbering; an
   * id in use is replaced), graph_launch runs graph `id` on the stream. An op
   * that cannot be captured (one that waits for the device, or allocates)
   * makes graph_end fail with the reason; nothing is then kept of the
   * capture, the backend is usable, and the caller runs the ops itself. A
   * graph reads the memory its ops name as it is when launched: pointers and
   * every other argument are fixed when it is captured. */
  bool (*graph_begin)(moert_backend *b, moert_status *st);
  bool (*graph_end)(moert_backend *b, int id, moert_status *st);
  bool (*graph_launch)(moert_backend *b, int id, moert_status *st);
  /* Whether the expert path of a bf16 model runs in bf16 here (the cuda
   * backend; the cpu only when asked to emulate it, for tests). */
  bool bf16;
  /* the fused ops */
#define X(op) __typeof__(moert_cpu_##op) *op;
  MOERT_BACKEND_OPS(X)
  MOERT_BACKEND_TYPED_OPS(X)
  MOERT_BACKEND_ATTN_OPS(X)
#undef X
  /* Counters for the zero-cost-switch claim: allocations made, and bytes
   * that copy, copy_blocks or upload wrote into a watched range (the
   * parameters and optimizer state, which no variant may move). */
  int64_t allocs, watched_bytes;
  const void *watch_lo[2], *watch_hi[2];
  void *impl;
};

/* The cpu backend: a static table, nothing to free. Its `bf16` is false
 * unless the environment sets MOEC_CPU_BF16=1: then bf16 models keep their
 * expert path in bf16 as on the GPU (emulated; for tests). */
moert_backend *moert_backend_cpu(void);
/* Splits the host's cores among the ranks_here ranks that share it (BLAS
 * threads per rank). */
void moert_backend_cpu_share_cores(int ranks_here);

/* --- the cuda backend (backend_cuda.c and its cuda_*.c): the ops as
 * kernels of templates/ compiled by NVRTC at start, GEMMs through cuBLAS, the
 * expert GEMMs through cuBLASLt where it loads; nothing CUDA linked --- */

/* True when the CUDA driver loads and sees a GPU; false, and nothing said,
 * on a machine without one (or a build without the CUDA headers). */
bool moert_cuda_available(void);
/* GPUs the driver sees (0 without one). */
int moert_cuda_device_count(void);
/* The cuda backend on GPU `device`: loads the driver, NVRTC and cuBLAS
 * (dlopen), compiles the kernels for the device, or takes them from the
 * cache in cache_dir (NULL: $XDG_CACHE_HOME/moec, else ~/.cache/moec) when
 * use_cache; a corrupt cache entry is recompiled with a warning on stderr,
 * an unwritable cache directory warned about and done without. One per
 * process at a time; the table is owned by the library until destroy. An op
 * that fails is recorded and reported by the next upload, download or alloc
 * (the ops return nothing); later ops are skipped. kernels_src: the source
 * to compile, a model's kernels.cu (moert_model.kernels_cu: the templates
 * and kernels specialized on its dims, launched where the dims match); NULL:
 * the embedded templates. The caller keeps it; create copies what it needs. */
bool moert_backend_cuda_create(moert_backend **out, int device, const char *cache_dir,
                               bool use_cache, const char *kernels_src, moert_status *st);
void moert_backend_cuda_destroy(moert_backend *b);
/* Whether create took the kernels from the cache, and the cache entry's path
 * (NULL without a cache): for tests. */
bool moert_backend_cuda_cache_hit(const moert_backend *b);
const char *moert_backend_cuda_cache_path(const moert_backend *b);
/* The CUstream the backend's ops run on, in order (NULL when b is not the
 * live cuda backend): a device comm enqueues its collectives there, so they
 * are ordered with the kernels without a host synchronization. */
void *moert_backend_cuda_stream(const moert_backend *b);
/* Called while the host waits for the cuda backend's stream (a download, an
 * upload), at each poll after a first spin, with the seconds waited so far:
 * false ends the wait, which fails with the message fn records in st. */
typedef bool (*moert_cuda_waiter)(void *ctx, double waited, moert_status *st);
/* Installs fn (NULL: none; the waits then block in cuStreamSynchronize). The
 * nccl comm's watchdog (comm.h's moert_watch): its collectives run on the
 * stream, so the host waits for them there. No-op when b is not the live
 * cuda backend. */
void moert_backend_cuda_set_waiter(moert_backend *b, moert_cuda_waiter fn, void *ctx);
/* How many specialized kernels (moert_k_<op>__<key>) the ops launched so far
 * found in the module: for tests and the run's header. */
int moert_backend_cuda_specialized(const moert_backend *b);
/* Whether gemm_ex runs through cuBLASLt (bias and relu/gelu in its
 * epilogue), after asking for it to be on or off: on only where cuBLASLt
 * loaded at create (not with MOEC_CUBLASLT=0 in the environment); off, it
 * runs on cuBLAS with the epilogue by kernels. For tests and benchmarks. */
bool moert_backend_cuda_set_cublaslt(moert_backend *b, bool on);
/* gemm_ex calls run so far through cuBLASLt and through cuBLAS (no
 * cuBLASLt, no algorithm for the shape, an epilogue it lacks, or its plan
 * table full), and the cuBLASLt plans made (a plan is made on the first call
 * of a GEMM shape, alignment and epilogue; later calls reuse it). */
void moert_backend_cuda_gemm_counts(const moert_backend *b, int64_t *lt, int64_t *blas, int *plans);
/* moert_cpu_aux_loss on the device (device pointers; the loss comes back to
 * the host): aux_loss_to's kernel, waited for, for tests. */
float moert_backend_cuda_aux_loss(const float *score_sum, const float *top1_count,
                                  float *dscore_coef, int64_t experts, double global_tokens);

/* The tensor cores' fragment layouts the bf16 attention kernels assume
 * (mma.m16n8k16 and ldmatrix, as the PTX ISA documents them), checked on b's
 * GPU apart from attention: a 16x16 by 16x8 product of small integers done
 * three ways (fragments loaded by the documented layout, by ldmatrix with
 * .trans, by ldmatrix) must equal the host's exactly. False, with which way
 * differs and where, when one does. For tests. */
bool moert_backend_cuda_mma_check(moert_backend *b, moert_status *st);

/* For tests without a GPU: whether NVRTC loads; the embedded templates
 * (common.cuh first); compiling them for arch ("sm_90", "compute_80"), all
 * (only < 0: and every kernel the backend uses must be in the result) or
 * common.cuh and template `only`; compiling any source (a failure's message
 * holds the first lines of NVRTC's log and the path of the whole log, saved
 * in log_dir, else in $TMPDIR or /tmp). */
bool moert_nvrtc_available(void);
int moert_cuda_template_count(void);
const char *moert_cuda_template_name(int i);
bool moert_cuda_compile_check(const char *arch, int only, moert_status *st);
bool moert_cuda_compile_source(const char *src, const char *arch, const char *log_dir,
                               moert_status *st);
/* Compiles src (a model's kernels.cu) for arch and checks, for a cubin, that
 * every kernel the backend looks up and every specialization src defines
 * (moert_k_<op>__<key>) is in it; *nspecialized: how many of the latter. */
bool moert_cuda_compile_check_source(const char *src, const char *arch, int *nspecialized,
                                     moert_status *st);

/* Facts about the cuda backend's GPU, for the driver (MFU, memory); b must
 * be the cuda backend, else NULL / false. The device's name ("NVIDIA H100
 * 80GB HBM3"), owned by the library; its compute capability; the bytes
 * free and in all on it now (cuMemGetInfo). */
const char *moert_backend_cuda_device_name(const moert_backend *b);
bool moert_backend_cuda_compute_capability(const moert_backend *b, int *major, int *minor);
bool moert_backend_cuda_mem_info(const moert_backend *b, size_t *free_bytes, size_t *total_bytes);

#endif
