/* fake_cublas.c — libcublas.so.13 of the CPU emulation (tests/emu): the
 * functions the cuda backend looks up (CUBLAS_FUNCS in runtime/cuda_lib.h),
 * with cuBLAS's semantics on host memory (a "device" pointer of the emulation
 * is a host pointer): column-major, op(A) op(B), leading dimensions, strided
 * batches, C not read when beta is 0; fp32 and bf16 operands, fp32 products.
 * It is not: fast; reduced precision (the math mode is kept, but TF32 is never
 * used: every product is fp32, accumulated in fp32); asynchronous (each call
 * has finished when it returns). Anything else cuBLAS offers is absent, and
 * an argument outside what is here is refused with
 * CUBLAS_STATUS_INVALID_VALUE or CUBLAS_STATUS_NOT_SUPPORTED.
 *
 * Stream capture: when the handle's stream is capturing (emu_capture.h), a
 * GEMM is checked, then recorded rather than run: its pointers and the
 * values of alpha and beta (host pointers, read at the call as in host
 * pointer mode) are copied into a host node that runs it at each replay, on
 * the memory as it is then.
 *
 * The functions are defined under the names the code calls (cublasCreate...):
 * cublas_v2.h's macros turn them into the exported symbols (cublasCreate_v2),
 * the names the backend looks up through the same header. */
#include <cublas_v2.h>
#include <stdio.h>
#include <stdlib.h>

#include "fake_blas.h"

struct cublasContext {
  cudaStream_t stream;
  cublasMath_t math;
};

cublasStatus_t cublasCreate(cublasHandle_t *handle) {
  if (!handle) return CUBLAS_STATUS_INVALID_VALUE;
  *handle = calloc(1, sizeof **handle);
  return *handle ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_ALLOC_FAILED;
}

cublasStatus_t cublasDestroy(cublasHandle_t handle) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  free(handle);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t streamId) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->stream = streamId;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  switch ((int)mode & ~CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION) {
  case CUBLAS_DEFAULT_MATH:
  case CUBLAS_TENSOR_OP_MATH:
  case CUBLAS_PEDANTIC_MATH:
  case CUBLAS_TF32_TENSOR_OP_MATH:
  case CUBLAS_FP32_EMULATED_BF16X9_MATH:
  case CUBLAS_FP64_EMULATED_FIXEDPOINT_MATH: handle->math = mode; return CUBLAS_STATUS_SUCCESS;
  default: return CUBLAS_STATUS_INVALID_VALUE;
  }
}

const char *cublasGetStatusString(cublasStatus_t status) {
  switch (status) {
#define NAME(s) case s: return #s;
    NAME(CUBLAS_STATUS_SUCCESS)
    NAME(CUBLAS_STATUS_NOT_INITIALIZED)
    NAME(CUBLAS_STATUS_ALLOC_FAILED)
    NAME(CUBLAS_STATUS_INVALID_VALUE)
    NAME(CUBLAS_STATUS_ARCH_MISMATCH)
    NAME(CUBLAS_STATUS_MAPPING_ERROR)
    NAME(CUBLAS_STATUS_EXECUTION_FAILED)
    NAME(CUBLAS_STATUS_INTERNAL_ERROR)
    NAME(CUBLAS_STATUS_NOT_SUPPORTED)
    NAME(CUBLAS_STATUS_LICENSE_ERROR)
#undef NAME
  }
  return "CUBLAS_STATUS_UNKNOWN";
}

/* A GEMM recorded in a capture, at a replay. */
static void replay(void *g) {
  if (emu_blas_gemm(g, NULL, NULL) != CUBLAS_STATUS_SUCCESS)
    fprintf(stderr, "moec emu: a cuBLAS GEMM in a graph failed at its replay: out of host memory\n");
}

/* Checks g (filled from a call's arguments, but for its transposes and
 * scalars) as cuBLAS does and runs it, or records it on a capturing stream. */
static cublasStatus_t run(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, const float *alpha,
                          const float *beta, emu_gemm *g) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!emu_blas_trans(transa, &g->trans_a) || !emu_blas_trans(transb, &g->trans_b) || g->m < 0 || g->n < 0 ||
      g->k < 0 || g->count < 0 || !alpha || !beta || g->a.ld < emu_blas_max1(g->trans_a ? g->k : g->m) ||
      g->b.ld < emu_blas_max1(g->trans_b ? g->n : g->k) || g->ldd < emu_blas_max1(g->m))
    return CUBLAS_STATUS_INVALID_VALUE;
  g->alpha = *alpha, g->beta = *beta;
  if (!emu_blas_capturing(handle->stream)) return emu_blas_gemm(g, NULL, NULL);
  emu_gemm *copy = malloc(sizeof *copy);
  if (!copy) return CUBLAS_STATUS_ALLOC_FAILED;
  *copy = *g;
  return emu_blas_record(handle->stream, replay, copy, "a cuBLAS GEMM");
}

cublasStatus_t cublasSgemm(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                           int k, const float *alpha, const float *A, int lda, const float *B, int ldb,
                           const float *beta, float *C, int ldc) {
  emu_gemm g = {.m = m, .n = n, .k = k, .count = 1, .d = C, .ldd = ldc};
  g.a = (emu_mat){A, CUDA_R_32F, lda, 0};
  g.b = (emu_mat){B, CUDA_R_32F, ldb, 0};
  g.c = (emu_mat){C, CUDA_R_32F, ldc, 0};
  return run(handle, transa, transb, alpha, beta, &g);
}

cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                         int m, int n, int k, const float *alpha, const float *A, int lda,
                                         long long int strideA, const float *B, int ldb, long long int strideB,
                                         const float *beta, float *C, int ldc, long long int strideC, int batchCount) {
  emu_gemm g = {.m = m, .n = n, .k = k, .count = batchCount, .d = C, .ldd = ldc, .stride_d = strideC};
  g.a = (emu_mat){A, CUDA_R_32F, lda, strideA};
  g.b = (emu_mat){B, CUDA_R_32F, ldb, strideB};
  g.c = (emu_mat){C, CUDA_R_32F, ldc, strideC};
  return run(handle, transa, transb, alpha, beta, &g);
}

/* The types cublasGemmStridedBatchedEx takes here: fp32 compute (alpha and
 * beta fp32) on fp32 operands into fp32, or on bf16 ones into bf16 or fp32. */
static bool ex_types_ok(cudaDataType a, cudaDataType b, cudaDataType c, cublasComputeType_t compute) {
  if (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_PEDANTIC) return false;
  if (a != b) return false;
  if (a == CUDA_R_32F) return c == CUDA_R_32F;
  return a == CUDA_R_16BF && (c == CUDA_R_16BF || c == CUDA_R_32F);
}

static bool algo_ok(cublasGemmAlgo_t algo) {
  return (algo >= CUBLAS_GEMM_DEFAULT && algo <= CUBLAS_GEMM_ALGO23) ||
         (algo >= CUBLAS_GEMM_DEFAULT_TENSOR_OP && algo <= CUBLAS_GEMM_ALGO15_TENSOR_OP) ||
         algo == CUBLAS_GEMM_AUTOTUNE;
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                          int m, int n, int k, const void *alpha, const void *A, cudaDataType Atype,
                                          int lda, long long int strideA, const void *B, cudaDataType Btype, int ldb,
                                          long long int strideB, const void *beta, void *C, cudaDataType Ctype, int ldc,
                                          long long int strideC, int batchCount, cublasComputeType_t computeType,
                                          cublasGemmAlgo_t algo) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!algo_ok(algo)) return CUBLAS_STATUS_INVALID_VALUE;
  if (!ex_types_ok(Atype, Btype, Ctype, computeType)) return CUBLAS_STATUS_NOT_SUPPORTED;
  emu_gemm g = {.m = m, .n = n, .k = k, .count = batchCount, .d = C, .ldd = ldc, .stride_d = strideC};
  g.a = (emu_mat){A, Atype, lda, strideA};
  g.b = (emu_mat){B, Btype, ldb, strideB};
  g.c = (emu_mat){C, Ctype, ldc, strideC};
  return run(handle, transa, transb, alpha, beta, &g);
}
