/* cuda_lib.c — the CUDA libraries by dlopen (cuda_lib.h): the driver, NVRTC,
 * cuBLAS and cuBLASLt, each opened once, from the first of its usual names
 * that dlopen finds, and its table filled by name; the error checks of their
 * result codes; and whether the driver sees a GPU (backend.h's
 * moert_cuda_available), asked without creating a backend.
 *
 * A loader remembers its outcome: a library that failed to load is not
 * tried again, and every later call names the same missing piece. Without
 * the CUDA headers at build time the file holds the dlopen helper and
 * backend.h's stubs that say there is no GPU. */
#include "cuda_lib.h"

#include "backend.h"

void *moert_dl_open_first(const char *const *names, int n) {
  for (int i = 0; i < n; i++) {
    void *h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (h) return h;
  }
  return NULL;
}

#ifdef MOERT_HAVE_CUDA_DRIVER

moert_cu_lib moert_cu;

bool moert_cu_load(const char **missing) {
  static int state; /* 0 not tried, 1 loaded, -1 failed */
  static const char *why;
  if (state) {
    *missing = why;
    return state > 0;
  }
  static const char *const names[] = {"libcuda.so.1", "libcuda.so"};
  bool ok = (moert_cu.lib = moert_dl_open_first(names, 2)) != NULL;
  *missing = "libcuda.so.1";
  moert_cu_lib *tbl = &moert_cu;
  if (ok) {
    CU_FUNCS(MOERT_DL_REQUIRE)
  }
  if (ok) {
    moert_cu.graphs = true;
#define LOOKUP_GRAPH(f) MOERT_DL_OPTIONAL(f) moert_cu.graphs = moert_cu.graphs && moert_cu.f != NULL;
    CU_GRAPH_FUNCS(LOOKUP_GRAPH)
#undef LOOKUP_GRAPH
  }
  why = *missing;
  state = ok ? 1 : -1;
  return ok;
}

const char *moert_cu_errstr(CUresult r) {
  const char *s = NULL;
  if (moert_cu.cuGetErrorString && moert_cu.cuGetErrorString(r, &s) == CUDA_SUCCESS && s) return s;
  return "unknown CUDA driver error";
}

MOERT_CHECK_FN(moert_cu_check, CUresult, CUDA_SUCCESS, moert_cu_errstr)

#endif /* MOERT_HAVE_CUDA_DRIVER */

#ifndef MOERT_HAVE_CUDA_HEADERS

/* Built without the CUDA headers: no cuda backend, so no GPU to see. */
bool moert_cuda_available(void) { return false; }
int moert_cuda_device_count(void) { return 0; }
bool moert_nvrtc_available(void) { return false; }

#else

moert_nvrtc_lib moert_nvrtc;
moert_cublas_lib moert_cublas;

bool moert_nvrtc_load(const char **missing) {
  static int state;
  static const char *why;
  if (state) {
    *missing = why;
    return state > 0;
  }
  static const char *const names[] = {
      "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so", "/usr/local/cuda/lib64/libnvrtc.so.13",
      "/usr/local/cuda/lib64/libnvrtc.so.12", "/usr/local/cuda/lib64/libnvrtc.so"};
  bool ok = (moert_nvrtc.lib = moert_dl_open_first(names, 6)) != NULL;
  *missing = "libnvrtc.so.13 (or .12)";
  moert_nvrtc_lib *tbl = &moert_nvrtc;
  if (ok) {
    NVRTC_FUNCS(MOERT_DL_REQUIRE)
  }
  if (ok && moert_nvrtc.nvrtcVersion(&moert_nvrtc.major, &moert_nvrtc.minor) != NVRTC_SUCCESS) ok = false;
  why = *missing;
  state = ok ? 1 : -1;
  return ok;
}

bool moert_cublas_load(const char **missing) {
  static int state;
  static const char *why;
  if (state) {
    *missing = why;
    return state > 0;
  }
  static const char *const names[] = {"libcublas.so.13", "libcublas.so.12", "libcublas.so",
                                      "/usr/local/cuda/lib64/libcublas.so.13",
                                      "/usr/local/cuda/lib64/libcublas.so.12",
                                      "/usr/local/cuda/lib64/libcublas.so"};
  bool ok = (moert_cublas.lib = moert_dl_open_first(names, 6)) != NULL;
  *missing = "libcublas.so.13 (or .12)";
  moert_cublas_lib *tbl = &moert_cublas;
  if (ok) {
    CUBLAS_FUNCS(MOERT_DL_REQUIRE)
  }
  why = *missing;
  state = ok ? 1 : -1;
  return ok;
}

#ifdef MOERT_HAVE_CUBLASLT
moert_cublaslt_lib moert_cublaslt;

bool moert_cublaslt_load(void) {
  static int state;
  if (state) return state > 0;
  static const char *const names[] = {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so",
                                      "/usr/local/cuda/lib64/libcublasLt.so.13",
                                      "/usr/local/cuda/lib64/libcublasLt.so.12",
                                      "/usr/local/cuda/lib64/libcublasLt.so"};
  bool ok = (moert_cublaslt.lib = moert_dl_open_first(names, 6)) != NULL;
  const char *missing_name = NULL, **missing = &missing_name;
  moert_cublaslt_lib *tbl = &moert_cublaslt;
  if (ok) {
    CUBLASLT_FUNCS(MOERT_DL_REQUIRE)
  }
  (void)missing_name;
  state = ok ? 1 : -1;
  return ok;
}
#endif

const char *moert_nvrtc_errstr(nvrtcResult r) {
  const char *s = moert_nvrtc.nvrtcGetErrorString ? moert_nvrtc.nvrtcGetErrorString(r) : NULL;
  return s ? s : "unknown NVRTC error";
}

const char *moert_cublas_errstr(cublasStatus_t r) {
  const char *s = moert_cublas.cublasGetStatusString ? moert_cublas.cublasGetStatusString(r) : NULL;
  return s ? s : "unknown cuBLAS error";
}

MOERT_CHECK_FN(moert_nvrtc_check, nvrtcResult, NVRTC_SUCCESS, moert_nvrtc_errstr)
MOERT_CHECK_FN(moert_cublas_check, cublasStatus_t, CUBLAS_STATUS_SUCCESS, moert_cublas_errstr)

/* ------------------------------------------------------------ availability */

bool moert_nvrtc_available(void) {
  const char *missing;
  return moert_nvrtc_load(&missing);
}

int moert_cuda_device_count(void) {
  int n = 0;
  return moert_cuda_available() && moert_cu.cuDeviceGetCount(&n) == CUDA_SUCCESS ? n : 0;
}

bool moert_cuda_available(void) {
  static int state; /* 0 not asked, 1 yes, -1 no */
  if (state) return state > 0;
  const char *missing;
  int n = 0;
  bool ok = moert_cu_load(&missing) && moert_cu.cuInit(0) == CUDA_SUCCESS &&
            moert_cu.cuDeviceGetCount(&n) == CUDA_SUCCESS && n > 0;
  state = ok ? 1 : -1;
  return ok;
}

#endif /* MOERT_HAVE_CUDA_HEADERS */
