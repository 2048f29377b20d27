/* cuda_lib.h — the CUDA libraries, opened with dlopen (cuda_lib.c). Nothing
 * CUDA is linked: the driver (libcuda.so.1), NVRTC, cuBLAS and cuBLASLt are
 * tables of function pointers typed from the libraries' headers, each
 * filled once on first use, so one binary runs with or without a GPU. Here
 * too: the first-found-name helper and the lookup macros the tables are
 * filled with (comm_nccl.c fills NCCL's with them), the error checks of the
 * libraries' result codes (status.h's generator) and the macros that call
 * through the tables and check (CUOK, CUTRY, NVRTCOK, CUBLASOK).
 *
 * For the cuda backend (backend_cuda.c and its cuda_*.c) and comm_nccl.c.
 * What is declared follows the headers the build found: the driver's part
 * with cuda.h (MOERT_HAVE_CUDA_HEADERS, or comm_nccl.c's
 * MOERT_HAVE_NCCL_HEADERS: MOERT_HAVE_CUDA_DRIVER is then defined), NVRTC's
 * and cuBLAS's with MOERT_HAVE_CUDA_HEADERS, cuBLASLt's where cublasLt.h is
 * too (MOERT_HAVE_CUBLASLT). */
#ifndef MOERT_CUDA_LIB_H
#define MOERT_CUDA_LIB_H

#include <dlfcn.h>
#include <stdbool.h>
#include <stdint.h>

#include "status.h"

/* A name as a string after macro expansion: the symbol a header's version
 * macros give a function (cuMemAlloc -> "cuMemAlloc_v2"), the one to look up. */
#define MOERT_STR_(x) #x
#define MOERT_XSTR(x) MOERT_STR_(x)

/* A table's member for function f, typed from its header's declaration. */
#define MOERT_DL_DECLARE(f) __typeof__(f) *f;
/* Fill a table from its library by an X-macro list of names, in a scope
 * with `tbl` (the table; its library in tbl->lib), `bool ok` and `const
 * char **missing`. REQUIRE looks f up while ok; when f is absent, ok becomes
 * false and *missing names it. OPTIONAL leaves tbl->f NULL when absent. */
#define MOERT_DL_REQUIRE(f)                                                                    \
  if (ok && !(tbl->f = (__typeof__(tbl->f))dlsym(tbl->lib, MOERT_XSTR(f)))) {                  \
    ok = false;                                                                                \
    *missing = MOERT_XSTR(f);                                                                  \
  }
#define MOERT_DL_OPTIONAL(f) tbl->f = (__typeof__(tbl->f))dlsym(tbl->lib, MOERT_XSTR(f));

/* The first of names that dlopen finds (RTLD_NOW | RTLD_LOCAL); NULL when
 * none. */
void *moert_dl_open_first(const char *const *names, int n);

#if defined(MOERT_HAVE_CUDA_HEADERS) || defined(MOERT_HAVE_NCCL_HEADERS)
#define MOERT_HAVE_CUDA_DRIVER 1
#include <cuda.h>

/* The driver's functions the cuda backend and comm_nccl.c call. */
#define CU_FUNCS(X)                                                                            \
  X(cuInit) X(cuDriverGetVersion) X(cuDeviceGetCount) X(cuDeviceGet) X(cuDeviceGetAttribute)   \
  X(cuDeviceGetName) X(cuDeviceGetPCIBusId) X(cuDevicePrimaryCtxRetain)                        \
  X(cuDevicePrimaryCtxRelease) X(cuCtxSetCurrent) X(cuCtxGetCurrent) X(cuCtxGetDevice)        \
  X(cuStreamCreate) X(cuStreamDestroy) X(cuStreamSynchronize) X(cuStreamQuery) X(cuStreamWaitEvent) \
  X(cuMemAlloc) X(cuMemFree) X(cuMemsetD8) X(cuMemsetD8Async) X(cuMemcpyHtoDAsync)             \
  X(cuMemcpyDtoHAsync) X(cuMemcpyDtoDAsync) X(cuMemcpy2DAsync) X(cuModuleLoadData)            \
  X(cuModuleUnload) X(cuModuleGetFunction) X(cuLaunchKernel) X(cuGetErrorString)              \
  X(cuEventCreate) X(cuEventRecord) X(cuEventElapsedTime) X(cuEventSynchronize)               \
  X(cuEventDestroy) X(cuFuncSetAttribute)

/* CUDA graphs: optional (without them a step runs its ops one by one). */
#define CU_GRAPH_FUNCS(X)                                                                      \
  X(cuStreamBeginCapture) X(cuStreamEndCapture) X(cuGraphInstantiate) X(cuGraphLaunch)        \
  X(cuGraphExecDestroy) X(cuGraphDestroy)

typedef struct moert_cu_lib {
  void *lib;
  CU_FUNCS(MOERT_DL_DECLARE)
  CU_GRAPH_FUNCS(MOERT_DL_DECLARE)
  bool graphs; /* every CU_GRAPH_FUNCS found */
} moert_cu_lib;

/* The driver, once moert_cu_load has succeeded. */
extern moert_cu_lib moert_cu;

/* Opens the driver and looks up every CU_FUNCS (and the graph functions,
 * optional) on the first call; later calls answer the same. False when it
 * cannot, *missing then naming what was not found (the library or the first
 * absent function). Does not initialize the driver (cuInit). */
bool moert_cu_load(const char **missing);
/* The driver's text for r (cuGetErrorString), never NULL. */
const char *moert_cu_errstr(CUresult r);
/* status.h's check for CUresult: true on CUDA_SUCCESS, else records
 * "<function> failed: <why>" at file:line in st and is false. */
bool moert_cu_check(CUresult code, const char *call, const char *file, int line, moert_status *st);

/* CUOK(st, cuMemAlloc, (&p, n)): calls the loaded function; on failure
 * records "cuMemAlloc failed: <why>" here and is false. CUTRY returns false. */
#define CUOK(st, fn, args) moert_cu_check(moert_cu.fn args, #fn, __FILE__, __LINE__, (st))
#define CUTRY(st, fn, args)                                                                    \
  do {                                                                                         \
    if (!CUOK(st, fn, args)) return false;                                                     \
  } while (0)

/* A device address held in a pointer, as the driver takes it. */
#define DPTR(p) ((CUdeviceptr)(uintptr_t)(p))
#endif /* MOERT_HAVE_CUDA_HEADERS || MOERT_HAVE_NCCL_HEADERS */

#ifdef MOERT_HAVE_CUDA_HEADERS
#include <cublas_v2.h>
#include <nvrtc.h>
/* cuBLASLt (the expert GEMMs with their epilogues) when its header is there;
 * without it, or without its library at run time, gemm_ex runs on cuBLAS. */
#if defined(__has_include)
#if __has_include(<cublasLt.h>)
#include <cublasLt.h>
#define MOERT_HAVE_CUBLASLT 1
#endif
#endif

#define NVRTC_FUNCS(X)                                                                         \
  X(nvrtcVersion) X(nvrtcGetNumSupportedArchs) X(nvrtcGetSupportedArchs) X(nvrtcCreateProgram) \
  X(nvrtcDestroyProgram) X(nvrtcCompileProgram) X(nvrtcGetProgramLogSize)                      \
  X(nvrtcGetProgramLog) X(nvrtcGetCUBINSize) X(nvrtcGetCUBIN) X(nvrtcGetPTXSize)               \
  X(nvrtcGetPTX) X(nvrtcGetErrorString)

#define CUBLAS_FUNCS(X)                                                                        \
  X(cublasCreate) X(cublasDestroy) X(cublasSetStream) X(cublasSetMathMode) X(cublasSgemm)      \
  X(cublasSgemmStridedBatched) X(cublasGemmStridedBatchedEx) X(cublasGetStatusString)

typedef struct moert_nvrtc_lib {
  void *lib;
  int major, minor; /* nvrtcVersion's */
  NVRTC_FUNCS(MOERT_DL_DECLARE)
} moert_nvrtc_lib;

typedef struct moert_cublas_lib {
  void *lib;
  CUBLAS_FUNCS(MOERT_DL_DECLARE)
} moert_cublas_lib;

/* NVRTC and cuBLAS, once their loads have succeeded. */
extern moert_nvrtc_lib moert_nvrtc;
extern moert_cublas_lib moert_cublas;

/* Open NVRTC (and ask its version) or cuBLAS on the first call, as
 * moert_cu_load does the driver. */
bool moert_nvrtc_load(const char **missing);
bool moert_cublas_load(const char **missing);

/* The libraries' texts for a result, never NULL, and status.h's checks of
 * their results (as moert_cu_check). */
const char *moert_nvrtc_errstr(nvrtcResult r);
const char *moert_cublas_errstr(cublasStatus_t r);
bool moert_nvrtc_check(nvrtcResult code, const char *call, const char *file, int line,
                       moert_status *st);
bool moert_cublas_check(cublasStatus_t code, const char *call, const char *file, int line,
                        moert_status *st);

/* NVRTCOK, CUBLASOK: CUOK for NVRTC's and cuBLAS's functions. */
#define NVRTCOK(st, fn, args) moert_nvrtc_check(moert_nvrtc.fn args, #fn, __FILE__, __LINE__, (st))
#define CUBLASOK(st, fn, args) moert_cublas_check(moert_cublas.fn args, #fn, __FILE__, __LINE__, (st))

#ifdef MOERT_HAVE_CUBLASLT
#define CUBLASLT_FUNCS(X)                                                                      \
  X(cublasLtCreate) X(cublasLtDestroy) X(cublasLtMatmulDescCreate) X(cublasLtMatmulDescDestroy) \
  X(cublasLtMatmulDescSetAttribute) X(cublasLtMatrixLayoutCreate) X(cublasLtMatrixLayoutDestroy) \
  X(cublasLtMatrixLayoutSetAttribute) X(cublasLtMatmulPreferenceCreate)                         \
  X(cublasLtMatmulPreferenceDestroy) X(cublasLtMatmulPreferenceSetAttribute)                    \
  X(cublasLtMatmulAlgoGetHeuristic) X(cublasLtMatmul)

typedef struct moert_cublaslt_lib {
  void *lib;
  CUBLASLT_FUNCS(MOERT_DL_DECLARE)
} moert_cublaslt_lib;

/* cuBLASLt, once moert_cublaslt_load has succeeded. */
extern moert_cublaslt_lib moert_cublaslt;

/* Opens cuBLASLt on the first call; optional (gemm_ex falls back to cuBLAS
 * without it), so false says nothing more. */
bool moert_cublaslt_load(void);
#endif /* MOERT_HAVE_CUBLASLT */
#endif /* MOERT_HAVE_CUDA_HEADERS */

#endif
