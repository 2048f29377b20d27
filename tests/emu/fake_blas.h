/* fake_blas.h — the GEMM both BLAS stand-ins (fake_cublas.c, fake_cublaslt.c)
 * run on the host: cuBLAS's column-major, strided-batched product, in fp32
 * through OpenBLAS, bf16 operands widened to fp32 temporaries and results
 * rounded once to their type (nearest even); and how a GEMM on a capturing
 * stream is recorded instead (emu_capture.h). Linked into each stand-in with
 * hidden visibility: nothing here is exported. */
#ifndef MOEC_EMU_FAKE_BLAS_H
#define MOEC_EMU_FAKE_BLAS_H

#include <cublas_api.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* An input: batch z's matrix starts at p + z * stride (in elements); column
 * j of it at + j * ld. */
typedef struct {
  const void *p;
  cudaDataType type; /* CUDA_R_32F or CUDA_R_16BF */
  int64_t ld, stride;
} emu_mat;

/* count products D_z = alpha op(A_z) op(B_z) + beta C_z of m x n (op(A) is
 * m x k, op(B) k x n). D has C's type; it may be C. C is not read when beta
 * is 0, nor A and B when k is 0 or alpha is 0. The caller has checked the
 * arguments: sizes and leading dimensions fit an int, A and B share a type. */
typedef struct {
  bool trans_a, trans_b;
  int64_t m, n, k, count;
  float alpha, beta;
  emu_mat a, b, c;
  void *d;
  int64_t ldd, stride_d;
} emu_gemm;

/* What an epilogue does to batch z's result, m x n in fp32 (ld m), before it
 * is stored to D. */
typedef void emu_epilogue(const void *ctx, int64_t z, float *acc, int64_t m, int64_t n);

/* Runs g, epi (NULL: none) on each batch's result; CUBLAS_STATUS_SUCCESS, or
 * CUBLAS_STATUS_ALLOC_FAILED when a temporary cannot be allocated. */
cublasStatus_t emu_blas_gemm(const emu_gemm *g, emu_epilogue *epi, const void *ctx);

/* op (a cublasOperation_t) as a transpose flag: a real matrix's conjugate
 * transpose is its transpose. False for a value cuBLAS does not take. */
bool emu_blas_trans(int32_t op, bool *trans);
/* max(x, 1): the least leading dimension of x rows. */
static inline int64_t emu_blas_max1(int64_t x) { return x > 1 ? x : 1; }

/* Bytes per element of type t (CUDA_R_32F or CUDA_R_16BF). */
size_t emu_blas_size(cudaDataType t);
/* Element i of p (type t) as fp32. */
float emu_blas_get(const void *p, cudaDataType t, int64_t i);
/* Stores src (rows x cols, fp32, ld rows) to dst (type t, leading dimension
 * ld), each element rounded once; what lies between dst's columns is left. */
void emu_blas_store(void *dst, cudaDataType t, int64_t ld, const float *src, int64_t rows, int64_t cols);

/* Stream capture (emu_capture.h). Whether a call on stream must be recorded
 * rather than run now: the stand-in driver is loaded and says the stream
 * captures (or cannot take work now). */
bool emu_blas_capturing(cudaStream_t stream);
/* Records fn(data) into stream's capture: a host node that runs it at each
 * replay and frees data (malloc'd by the caller) when the graph goes.
 * CUBLAS_STATUS_SUCCESS, or CUBLAS_STATUS_EXECUTION_FAILED when the driver
 * refuses (why on stderr, after what; data freed). */
cublasStatus_t emu_blas_record(cudaStream_t stream, void (*fn)(void *), void *data, const char *what);

#endif
