/* backend_cuda_impl.h — what the cuda backend's files share: backend_cuda.c
 * (the table and the op launchers), cuda_nvrtc.c (the kernels: NVRTC and
 * the disk cache), cuda_blas.c (the GEMMs: cuBLAS and the cuBLASLt planner)
 * and cuda_graphs.c (CUDA graphs and the timing marks). The backend's state,
 * the list of its kernels, and the entry points the files call in each
 * other. Not for the runtime's other modules; only with the CUDA headers
 * (MOERT_HAVE_CUDA_HEADERS). */
#ifndef MOERT_BACKEND_CUDA_IMPL_H
#define MOERT_BACKEND_CUDA_IMPL_H

#include <stdbool.h>
#include <stdint.h>

#include "backend.h"
#include "cuda_lib.h"

/* Every kernel of templates/, by its name after moert_k_. */
#define KERNELS(X)                                                                               \
  X(colsum_add) X(reduce_sum) X(act_fwd_relu) X(act_fwd_gelu) X(act_fwd_silu) X(act_fwd_tanh) X(act_bwd_tanh) X(act_bwd_relu)    \
  X(act_bwd_gelu) X(act_bwd_silu) X(swiglu_fwd) X(swiglu_bwd) X(layernorm_fwd)                   \
  X(layernorm_bwd_dx) X(layernorm_bwd_part) X(rmsnorm_fwd) X(rmsnorm_bwd_dx)                     \
  X(rmsnorm_bwd_part) X(l2norm_rows_fwd) X(l2norm_rows_bwd) X(l2norm_cols_part)                  \
  X(l2norm_cols_finish) X(l2norm_cols_apply) X(gate_topk) X(gate_priority_rank)                 \
  X(gate_priority_scatter) X(gate_locations) X(gate_ec) X(aux_loss) X(gate_bwd) X(dispatch)      \
  X(dispatch_bwd) X(combine) X(combine_bwd) X(drop_beyond) X(zero_tails) X(copy_blocks)         \
  X(embed_fwd) X(embed_bwd) X(embed_bwd_rows) X(xent) X(mse) X(dot) X(adamw) X(sgd) X(norm_split) X(clip_factor)   \
  X(scale_by_exp) X(add_dot_unclamped) X(scale) X(add) X(axpy) X(bias_add)                       \
  X(bias_grad_part) X(scale_rows) X(cvt_f2bf) X(cvt_bf2f) X(dispatch_bf16) X(dispatch_bwd_bf16)     \
  X(combine_bf16) X(combine_bwd_bf16) X(act_fwd_relu_bf16) X(act_fwd_gelu_bf16)                  \
  X(act_fwd_silu_bf16) X(act_bwd_relu_bf16) X(act_bwd_gelu_bf16) X(act_bwd_silu_bf16)           \
  X(swiglu_fwd_bf16) X(swiglu_bwd_bf16) X(bias_add_bf16) X(bias_grad_part_bf16)                  \
  X(copy_blocks_bf16) X(fill_normal) X(fill_normal_step) X(rope_f32) X(rope_bf16)                \
  X(attn_delta_f32) X(attn_delta_bf16) X(attn_decode_f32) X(attn_decode_bf16) X(mma_check)       \
  X(attn_decode_combine_f32) X(attn_decode_combine_bf16)       \
  ATTN_KERNELS(X, 64) ATTN_KERNELS(X, 128) ATTN_KERNELS(X, 256)

/* attention.cu's kernels instantiated for the largest head dim DM. */
#define ATTN_KERNELS(X, DM)                                                                      \
  X(attn_fwd_bf16_d##DM) X(attn_bwd_dq_bf16_d##DM) X(attn_bwd_dkdv_bf16_d##DM)                   \
  X(attn_fwd_f32_d##DM) X(attn_bwd_dq_f32_d##DM) X(attn_bwd_dkdv_f32_d##DM)

enum {
#define X(k) K_##k,
  KERNELS(X)
#undef X
      K_COUNT
};

/* "moert_k_<name>" of every kernel, by K_ (cuda_nvrtc.c). */
extern const char *const moert_cuda_kernel_names[K_COUNT];

/* Specializations looked up per process: (kernel, dims) pairs a model
 * launches, a handful a layer. Beyond this the generic kernels run. */
enum { MAX_SPEC_LOOKUPS = 256 };

/* A looked-up specialization: fn NULL when the module has none. */
typedef struct spec_fn {
  int k;
  long long a, b;
  CUfunction fn;
} spec_fn;

/* The cuda backend (one per process: backend_cuda.c's). What only one file
 * needs stays in that file: cuda_blas.c's handles and plans, cuda_graphs.c's
 * events and graphs. */
typedef struct cuda_state {
  moert_backend b;
  bool live;
  moert_status err; /* sticky: the first failure of an op, reported by the next sync */
  CUdevice dev;
  CUcontext ctx;
  CUstream stream;
  CUmodule mod;
  CUfunction fn[K_COUNT];
  CUdeviceptr scratch;
  int sm_count, cc_major, cc_minor;
  bool cache_hit;
  char cache_path[4096];
  bool own_src;             /* compiled a kernels.cu: look specializations up */
  int nspecs;
  spec_fn specs[MAX_SPEC_LOOKUPS];
  moert_cuda_waiter waiter; /* NULL: waits block in the driver */
  void *waiter_ctx;
} cuda_state;

/* The sticky status: false (and an op does nothing) once something failed,
 * or when s is not a live backend. */
static inline bool cuda_healthy(const cuda_state *s) { return s && s->live && !s->err.failed; }

/* Passes the sticky status on to st: false when an op failed earlier. */
static inline bool cuda_report(const cuda_state *s, moert_status *st) {
  if (!s->err.failed) return true;
  return MOERT_FAIL(st, "%s (cuda backend, at %s)", s->err.msg, s->err.trace);
}

/* --- cuda_nvrtc.c */

/* Kernels for s's device (s->cc_major, cc_minor): kernels_src (a model's
 * kernels.cu; NULL: the embedded templates) from the cache when it holds a
 * good entry, else compiled by NVRTC (and cached, when use_cache, in
 * cache_dir or the default one). Loads s->mod and every kernel into s->fn;
 * sets s->own_src, s->cache_path and s->cache_hit. */
bool moert_cuda_kernels_load(cuda_state *s, const char *cache_dir, bool use_cache,
                             const char *kernels_src, moert_status *st);

/* --- cuda_blas.c: the GEMM ops of the table (cpu_ops.h's gemm and
 * gemm_batched, cpu_ops_typed.h's gemm_ex) on s's stream */

/* cuBLAS's handle on s->stream, and cuBLASLt's when it loads (quietly none
 * without it); false only when cuBLAS fails. From then on the GEMMs record
 * their failures in s->err and run their epilogue kernels through s->b's
 * ops (bias_add_t, act_fwd_t, convert, copy_blocks_t). */
bool moert_cuda_blas_setup(cuda_state *s, moert_status *st);
/* Frees what setup made (whatever part of it was made). */
void moert_cuda_blas_release(void);
void moert_cuda_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                     const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c,
                     int64_t ldc);
void moert_cuda_gemm_batched(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                             float alpha, const float *a, int64_t lda, int64_t stride_a,
                             const float *b, int64_t ldb, int64_t stride_b, float beta, float *c,
                             int64_t ldc, int64_t stride_c, int64_t count);
void moert_cuda_gemm_ex(const moert_gemm *g);

/* --- backend_cuda.c */

/* The rows of C (m x n, leading dimension ldc) times beta, a kernel: a GEMM
 * that reads neither A nor B. */
void moert_cuda_scale_rows(float *c, int64_t m, int64_t n, int64_t ldc, float beta);

/* --- cuda_graphs.c */

/* The timing marks' events, all made now (a step creates none). */
bool moert_cuda_marks_setup(moert_status *st);
/* Sets b's timing marks and, where the driver has them, its CUDA graphs
 * (mark, mark_ms, marks_reset; graph_begin, graph_end, graph_launch), which
 * run on b->impl's stream and report its sticky status. */
void moert_cuda_graphs_ops(moert_backend *b);
/* Destroys the graphs and the events. */
void moert_cuda_graphs_release(void);

#endif
