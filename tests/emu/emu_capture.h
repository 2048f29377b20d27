/* emu_capture.h — how the stand-ins that take a stream but run on the host
 * (the cuBLAS and cuBLASLt stand-ins through fake_blas.c, and fake_nccl.c)
 * take part in the stream capture of the stand-in driver (fake_cuda.c).
 *
 * They find the driver in the process: libcuda.so.1 is looked up with
 * dlopen(RTLD_NOLOAD), so it is used only when something else loaded it (the
 * cuda backend, or a test); without it, or with a libcuda.so.1 that lacks the
 * emulation's export below, every call runs when it is made, as before. With
 * it, a call on a stream that cuStreamIsCapturing says is capturing (or whose
 * capture was invalidated, or the legacy stream while a capture forbids its
 * use) does not run: its arguments are copied into a heap block that
 * moec_emu_launch_host_func_owned records into the capture as a host node,
 * which runs the call at each replay of the graph and frees the block when
 * the graph (and every executable made from it) is destroyed. The driver
 * refuses the node where CUDA would refuse the work (an invalidated capture,
 * the legacy stream), and the stand-in then fails the call. */
#ifndef MOEC_EMU_CAPTURE_H
#define MOEC_EMU_CAPTURE_H

#include <cuda.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>

/* The emulation's private export of fake_cuda.c: cuLaunchHostFunc(stream, fn,
 * data), where the host node owns data. Outside capture, fn(data) runs at the
 * call and then free_fn(data) (if free_fn is not NULL); in capture, fn(data)
 * runs at each replay and free_fn(data) when the graph's last holder (the
 * graph or an executable graph made from it) is destroyed, or when the capture
 * fails. On an error nothing ran and data stays the caller's. */
CUresult moec_emu_launch_host_func_owned(CUstream hStream, CUhostFn fn, void *data, void (*free_fn)(void *));

typedef struct emu_cuda_fns {
  CUresult (*is_capturing)(CUstream, CUstreamCaptureStatus *);
  CUresult (*launch_owned)(CUstream, CUhostFn, void *, void (*)(void *));
  CUresult (*error_string)(CUresult, const char **);
} emu_cuda_fns;

/* The stand-in driver's functions when it is loaded in the process, else
 * NULL. Looked up again at each call until found, then kept (the handle keeps
 * the library loaded). */
static inline const emu_cuda_fns *emu_cuda(void) {
  static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
  static emu_cuda_fns fns;
  static bool found;
  pthread_mutex_lock(&mu);
  if (!found) {
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (h) {
      *(void **)&fns.is_capturing = dlsym(h, "cuStreamIsCapturing");
      *(void **)&fns.launch_owned = dlsym(h, "moec_emu_launch_host_func_owned");
      *(void **)&fns.error_string = dlsym(h, "cuGetErrorString");
      found = fns.is_capturing && fns.launch_owned && fns.error_string;
      if (!found) dlclose(h);
    }
  }
  pthread_mutex_unlock(&mu);
  return found ? &fns : NULL;
}

/* Whether work on stream must go to cu->launch_owned rather than run now: the
 * stream captures, its capture was invalidated, or the query fails (the
 * legacy stream while a capture forbids its use); launch_owned then records
 * it or says why not. */
static inline bool emu_cuda_defers(const emu_cuda_fns *cu, CUstream stream) {
  CUstreamCaptureStatus st = CU_STREAM_CAPTURE_STATUS_NONE;
  return cu->is_capturing(stream, &st) != CUDA_SUCCESS || st != CU_STREAM_CAPTURE_STATUS_NONE;
}

/* r's name, for messages. */
static inline const char *emu_cuda_error(const emu_cuda_fns *cu, CUresult r) {
  const char *s = NULL;
  return cu->error_string(r, &s) == CUDA_SUCCESS && s ? s : "unknown CUresult";
}

#endif
