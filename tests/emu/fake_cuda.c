/* fake_cuda.c — libcuda.so.1 for the CPU emulation of the CUDA stack
 * (tests/emu): the driver API calls the runtime makes, on the host.
 *
 * - Devices: $MOEC_EMU_GPUS of them (default 1), compute capability 9.0,
 *   $MOEC_EMU_SMS multiprocessors (default 4: grids sized by it stay small),
 *   $MOEC_EMU_MEM_MB of memory each (default 16384); a PCI bus id per device.
 * - Memory is host memory: a device pointer is a host address. cuMemAlloc
 *   fills what it returns with 0xff bytes (NaN as float and bf16, -1 as an
 *   integer), as if the memory held garbage, so a read of memory nothing
 *   wrote shows; it fails with CUDA_ERROR_OUT_OF_MEMORY past the budget.
 * - Streams run every operation at the call, so an asynchronous call is done
 *   when it returns; events take the host's clock when recorded.
 * - Modules are the images of the emulated NVRTC (fake_image.h): shared
 *   objects, loaded with dlopen; a kernel launch runs its grid at the call
 *   (emu_device.h). A launch that fails prints why on stderr.
 * It checks what a program computes and which calls it makes in which
 * order on one stream; it does not model concurrency between streams. */
#define _GNU_SOURCE
#include <cuda.h>

#include <dlfcn.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fake_image.h"

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static bool inited;
static _Thread_local CUcontext current;

struct CUctx_st {
  CUdevice dev;
  int refs;
};
struct CUstream_st {
  int unused;
};
struct CUevent_st {
  unsigned flags;
  bool recorded;
  double ms;
};
struct CUmod_st {
  void *so;
  void *(*kernel)(const char *);
  int (*launch)(void *, void **, const unsigned *, const unsigned *, char *, size_t);
};
struct CUfunc_st {
  CUmodule mod;
  void *body;
  char name[256];
};

static int env_int(const char *name, int dflt, int lo, int hi) {
  const char *s = getenv(name);
  if (!s || !*s) return dflt;
  char *end;
  long v = strtol(s, &end, 10);
  return *end || v < lo || v > hi ? dflt : (int)v;
}

static int ngpus(void) { return env_int("MOEC_EMU_GPUS", 1, 1, 64); }
static size_t mem_budget(void) { return (size_t)env_int("MOEC_EMU_MEM_MB", 16384, 1, 1 << 24) << 20; }

/* ------------------------------------------------------------ errors */

CUresult cuGetErrorString(CUresult e, const char **s) {
  static const struct {
    CUresult e;
    const char *s;
  } names[] = {
      {CUDA_SUCCESS, "no error"},
      {CUDA_ERROR_INVALID_VALUE, "invalid argument"},
      {CUDA_ERROR_OUT_OF_MEMORY, "out of memory"},
      {CUDA_ERROR_NOT_INITIALIZED, "initialization error"},
      {CUDA_ERROR_NO_DEVICE, "no CUDA-capable device is detected"},
      {CUDA_ERROR_INVALID_DEVICE, "invalid device ordinal"},
      {CUDA_ERROR_INVALID_IMAGE, "device kernel image is invalid"},
      {CUDA_ERROR_INVALID_CONTEXT, "invalid device context"},
      {CUDA_ERROR_INVALID_HANDLE, "invalid resource handle"},
      {CUDA_ERROR_NOT_FOUND, "named symbol not found"},
      {CUDA_ERROR_NOT_READY, "device not ready"},
      {CUDA_ERROR_LAUNCH_FAILED, "unspecified launch failure"},
      {CUDA_ERROR_NOT_SUPPORTED, "operation not supported"},
  };
  if (!s) return CUDA_ERROR_INVALID_VALUE;
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
    if (names[i].e == e) {
      *s = names[i].s;
      return CUDA_SUCCESS;
    }
  *s = NULL;
  return CUDA_ERROR_INVALID_VALUE;
}

/* ------------------------------------------------------------ devices, contexts */

CUresult cuInit(unsigned flags) {
  if (flags) return CUDA_ERROR_INVALID_VALUE;
  inited = true;
  return CUDA_SUCCESS;
}

CUresult cuDriverGetVersion(int *v) {
  if (!v) return CUDA_ERROR_INVALID_VALUE;
  *v = 13000;
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetCount(int *n) {
  if (!inited) return CUDA_ERROR_NOT_INITIALIZED;
  if (!n) return CUDA_ERROR_INVALID_VALUE;
  *n = ngpus();
  return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice *d, int ordinal) {
  if (!inited) return CUDA_ERROR_NOT_INITIALIZED;
  if (!d) return CUDA_ERROR_INVALID_VALUE;
  if (ordinal < 0 || ordinal >= ngpus()) return CUDA_ERROR_INVALID_DEVICE;
  *d = ordinal;
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice dev) {
  if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
  if (dev < 0 || dev >= ngpus()) return CUDA_ERROR_INVALID_DEVICE;
  snprintf(name, (size_t)len, "moec CPU emulation of a GPU (tests/emu)");
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetAttribute(int *v, CUdevice_attribute a, CUdevice dev) {
  if (!v) return CUDA_ERROR_INVALID_VALUE;
  if (dev < 0 || dev >= ngpus()) return CUDA_ERROR_INVALID_DEVICE;
  switch (a) {
  case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *v = 9; break;
  case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *v = 0; break;
  case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *v = env_int("MOEC_EMU_SMS", 4, 1, 1024); break;
  case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = 1024; break;
  case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *v = 32; break;
  case CU_DEVICE_ATTRIBUTE_PCI_BUS_ID: *v = 16 + dev; break;
  case CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID: *v = 0; break;
  case CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID: *v = 0; break;
  default: return CUDA_ERROR_INVALID_VALUE; /* not emulated: say so rather than guess */
  }
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetPCIBusId(char *id, int len, CUdevice dev) {
  if (!id || len <= 0) return CUDA_ERROR_INVALID_VALUE;
  if (dev < 0 || dev >= ngpus()) return CUDA_ERROR_INVALID_DEVICE;
  snprintf(id, (size_t)len, "00000000:%02X:00.0", 16 + dev);
  return CUDA_SUCCESS;
}

static struct CUctx_st contexts[64];

CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice dev) {
  if (!inited) return CUDA_ERROR_NOT_INITIALIZED;
  if (!ctx) return CUDA_ERROR_INVALID_VALUE;
  if (dev < 0 || dev >= ngpus()) return CUDA_ERROR_INVALID_DEVICE;
  pthread_mutex_lock(&lock);
  contexts[dev].dev = dev;
  contexts[dev].refs++;
  pthread_mutex_unlock(&lock);
  *ctx = &contexts[dev];
  return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease(CUdevice dev) {
  if (dev < 0 || dev >= ngpus()) return CUDA_ERROR_INVALID_DEVICE;
  pthread_mutex_lock(&lock);
  bool ok = contexts[dev].refs > 0;
  if (ok) contexts[dev].refs--;
  pthread_mutex_unlock(&lock);
  return ok ? CUDA_SUCCESS : CUDA_ERROR_INVALID_CONTEXT;
}

CUresult cuCtxSetCurrent(CUcontext ctx) {
  if (ctx && (ctx < contexts || ctx >= contexts + 64 || ctx->refs <= 0)) return CUDA_ERROR_INVALID_CONTEXT;
  current = ctx;
  return CUDA_SUCCESS;
}

CUresult cuCtxGetCurrent(CUcontext *ctx) {
  if (!ctx) return CUDA_ERROR_INVALID_VALUE;
  *ctx = current;
  return CUDA_SUCCESS;
}

CUresult cuCtxGetDevice(CUdevice *dev) {
  if (!dev) return CUDA_ERROR_INVALID_VALUE;
  if (!current) return CUDA_ERROR_INVALID_CONTEXT;
  *dev = current->dev;
  return CUDA_SUCCESS;
}

/* Every call that works on the device needs a current context. */
#define NEED_CONTEXT()                                                                         \
  do {                                                                                         \
    if (!current) return CUDA_ERROR_INVALID_CONTEXT;                                           \
  } while (0)

/* ------------------------------------------------------------ memory */

static struct block {
  void *p;
  size_t n;
} *blocks;
static size_t nblocks, cap_blocks, in_use;

/* The allocation that holds [p, p + n), or NULL. */
static struct block *find(const void *p, size_t n) {
  for (size_t i = 0; i < nblocks; i++) {
    const char *a = blocks[i].p;
    if ((const char *)p >= a && (const char *)p + n <= a + blocks[i].n) return &blocks[i];
  }
  return NULL;
}

/* Device memory [p, p + n) must lie inside one allocation. */
static bool device_range(CUdeviceptr p, size_t n) {
  if (!n) return true;
  pthread_mutex_lock(&lock);
  bool ok = find((const void *)(uintptr_t)p, n) != NULL;
  pthread_mutex_unlock(&lock);
  if (!ok)
    fprintf(stderr, "moec emu: %zu bytes at device address 0x%llx lie outside every allocation\n", n,
            (unsigned long long)p);
  return ok;
}

CUresult cuMemGetInfo(size_t *free_bytes, size_t *total) {
  NEED_CONTEXT();
  if (!free_bytes || !total) return CUDA_ERROR_INVALID_VALUE;
  pthread_mutex_lock(&lock);
  *total = mem_budget();
  *free_bytes = in_use < *total ? *total - in_use : 0;
  pthread_mutex_unlock(&lock);
  return CUDA_SUCCESS;
}

CUresult cuMemAlloc(CUdeviceptr *out, size_t n) {
  NEED_CONTEXT();
  if (!out || !n) return CUDA_ERROR_INVALID_VALUE;
  pthread_mutex_lock(&lock);
  void *p = NULL;
  if (nblocks == cap_blocks) {
    size_t cap = cap_blocks * 2 + 64;
    struct block *nb = realloc(blocks, cap * sizeof *nb);
    if (nb) blocks = nb, cap_blocks = cap;
  }
  bool ok = nblocks < cap_blocks && n <= mem_budget() - in_use && posix_memalign(&p, 256, n) == 0;
  if (ok) {
    memset(p, env_int("MOEC_EMU_FILL", 0xff, 0, 255), n);
    blocks[nblocks++] = (struct block){p, n};
    in_use += n;
    *out = (CUdeviceptr)(uintptr_t)p;
  }
  pthread_mutex_unlock(&lock);
  return ok ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

CUresult cuMemFree(CUdeviceptr d) {
  NEED_CONTEXT();
  pthread_mutex_lock(&lock);
  CUresult r = CUDA_ERROR_INVALID_VALUE;
  for (size_t i = 0; i < nblocks; i++)
    if (blocks[i].p == (void *)(uintptr_t)d) {
      free(blocks[i].p);
      in_use -= blocks[i].n;
      blocks[i] = blocks[--nblocks];
      r = CUDA_SUCCESS;
      break;
    }
  pthread_mutex_unlock(&lock);
  return r;
}

CUresult cuMemsetD8(CUdeviceptr d, unsigned char v, size_t n) {
  NEED_CONTEXT();
  if (!device_range(d, n)) return CUDA_ERROR_INVALID_VALUE;
  memset((void *)(uintptr_t)d, v, n);
  return CUDA_SUCCESS;
}

CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUstream s) {
  (void)s;
  return cuMemsetD8(d, v, n);
}

CUresult cuMemcpyHtoDAsync(CUdeviceptr dst, const void *src, size_t n, CUstream s) {
  (void)s;
  NEED_CONTEXT();
  if (n && (!src || !device_range(dst, n))) return CUDA_ERROR_INVALID_VALUE;
  memcpy((void *)(uintptr_t)dst, src, n);
  return CUDA_SUCCESS;
}

CUresult cuMemcpyDtoHAsync(void *dst, CUdeviceptr src, size_t n, CUstream s) {
  (void)s;
  NEED_CONTEXT();
  if (n && (!dst || !device_range(src, n))) return CUDA_ERROR_INVALID_VALUE;
  memcpy(dst, (const void *)(uintptr_t)src, n);
  return CUDA_SUCCESS;
}

CUresult cuMemcpyDtoDAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
  (void)s;
  NEED_CONTEXT();
  if (!device_range(dst, n) || !device_range(src, n)) return CUDA_ERROR_INVALID_VALUE;
  memmove((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n);
  return CUDA_SUCCESS;
}

/* The first byte of one side of a 2-D copy; NULL for arrays (not emulated). */
static char *side(CUmemorytype t, const void *host, CUdeviceptr dev, size_t x, size_t y, size_t pitch,
                  size_t width, size_t height, bool *ok) {
  char *base;
  if (t == CU_MEMORYTYPE_HOST) base = (char *)host;
  else if (t == CU_MEMORYTYPE_DEVICE || t == CU_MEMORYTYPE_UNIFIED) base = (char *)(uintptr_t)dev;
  else return *ok = false, NULL;
  char *first = base + y * pitch + x;
  if (t != CU_MEMORYTYPE_HOST && height && !device_range((CUdeviceptr)(uintptr_t)first, (height - 1) * pitch + width))
    *ok = false;
  return first;
}

CUresult cuMemcpy2DAsync(const CUDA_MEMCPY2D *c, CUstream s) {
  (void)s;
  NEED_CONTEXT();
  if (!c) return CUDA_ERROR_INVALID_VALUE;
  if (c->Height > 1 && (c->srcPitch < c->WidthInBytes || c->dstPitch < c->WidthInBytes))
    return CUDA_ERROR_INVALID_VALUE;
  bool ok = true;
  const char *src = side(c->srcMemoryType, c->srcHost, c->srcDevice, c->srcXInBytes, c->srcY, c->srcPitch,
                         c->WidthInBytes, c->Height, &ok);
  char *dst = side(c->dstMemoryType, c->dstHost, c->dstDevice, c->dstXInBytes, c->dstY, c->dstPitch,
                   c->WidthInBytes, c->Height, &ok);
  if (!ok) return CUDA_ERROR_INVALID_VALUE;
  for (size_t r = 0; r < c->Height; r++) memmove(dst + r * c->dstPitch, src + r * c->srcPitch, c->WidthInBytes);
  return CUDA_SUCCESS;
}

/* ------------------------------------------------------------ streams, events */

CUresult cuStreamCreate(CUstream *s, unsigned flags) {
  (void)flags;
  NEED_CONTEXT();
  if (!s) return CUDA_ERROR_INVALID_VALUE;
  return (*s = calloc(1, sizeof **s)) ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

CUresult cuStreamDestroy(CUstream s) {
  if (!s) return CUDA_ERROR_INVALID_HANDLE;
  free(s);
  return CUDA_SUCCESS;
}

CUresult cuStreamSynchronize(CUstream s) {
  (void)s;
  NEED_CONTEXT();
  return CUDA_SUCCESS;
}

CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned flags) {
  (void)s;
  NEED_CONTEXT();
  return e && !flags ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec * 1e3 + (double)t.tv_nsec * 1e-6;
}

CUresult cuEventCreate(CUevent *e, unsigned flags) {
  NEED_CONTEXT();
  if (!e) return CUDA_ERROR_INVALID_VALUE;
  if (!(*e = calloc(1, sizeof **e))) return CUDA_ERROR_OUT_OF_MEMORY;
  (*e)->flags = flags;
  return CUDA_SUCCESS;
}

CUresult cuEventRecord(CUevent e, CUstream s) {
  (void)s;
  NEED_CONTEXT();
  if (!e) return CUDA_ERROR_INVALID_HANDLE;
  e->recorded = true;
  e->ms = now_ms();
  return CUDA_SUCCESS;
}

CUresult cuEventSynchronize(CUevent e) { return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE; }

CUresult cuEventElapsedTime(float *ms, CUevent a, CUevent b) {
  if (!ms || !a || !b) return CUDA_ERROR_INVALID_HANDLE;
  /* as the driver: events made without timing, or never recorded, have no time */
  if ((a->flags | b->flags) & CU_EVENT_DISABLE_TIMING) return CUDA_ERROR_INVALID_HANDLE;
  if (!a->recorded || !b->recorded) return CUDA_ERROR_INVALID_HANDLE;
  *ms = (float)(b->ms - a->ms);
  return CUDA_SUCCESS;
}

CUresult cuEventDestroy(CUevent e) {
  if (!e) return CUDA_ERROR_INVALID_HANDLE;
  free(e);
  return CUDA_SUCCESS;
}

/* ------------------------------------------------------------ modules, launches */

CUresult cuModuleLoadData(CUmodule *out, const void *image) {
  NEED_CONTEXT();
  if (!out || !image) return CUDA_ERROR_INVALID_VALUE;
  size_t n = moec_emu_image_size(image);
  if (!n) {
    fprintf(stderr, "moec emu: a module image that the emulated NVRTC did not make (a real cubin or PTX?)\n");
    return CUDA_ERROR_INVALID_IMAGE;
  }
  const char *tmp = getenv("TMPDIR");
  char path[4096];
  snprintf(path, sizeof path, "%s/moec-emu-module-XXXXXX", tmp && *tmp ? tmp : "/tmp");
  int fd = mkstemp(path);
  if (fd < 0) return CUDA_ERROR_OUT_OF_MEMORY;
  const unsigned char *so = (const unsigned char *)image + MOEC_EMU_IMAGE_HEAD;
  size_t done = 0;
  while (done < n) {
    ssize_t w = write(fd, so + done, n - done);
    if (w <= 0) break;
    done += (size_t)w;
  }
  close(fd);
  void *h = done == n ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : NULL;
  if (!h && done == n) fprintf(stderr, "moec emu: cannot load a module: %s\n", dlerror());
  unlink(path);
  if (!h) return CUDA_ERROR_INVALID_IMAGE;
  CUmodule m = calloc(1, sizeof *m);
  if (!m) {
    dlclose(h);
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
  m->so = h;
  *(void **)&m->kernel = dlsym(h, "moert_emu_kernel");
  *(void **)&m->launch = dlsym(h, "moert_emu_launch");
  if (!m->kernel || !m->launch) {
    dlclose(h);
    free(m);
    return CUDA_ERROR_INVALID_IMAGE;
  }
  *out = m;
  return CUDA_SUCCESS;
}

CUresult cuModuleUnload(CUmodule m) {
  if (!m) return CUDA_ERROR_INVALID_HANDLE;
  /* the module's fibers live on (their stacks are its own state): keep it loaded */
  free(m);
  return CUDA_SUCCESS;
}

CUresult cuModuleGetFunction(CUfunction *f, CUmodule m, const char *name) {
  if (!f || !m || !name) return CUDA_ERROR_INVALID_VALUE;
  void *body = m->kernel(name);
  if (!body) return CUDA_ERROR_NOT_FOUND;
  CUfunction fn = calloc(1, sizeof *fn);
  if (!fn) return CUDA_ERROR_OUT_OF_MEMORY;
  fn->mod = m;
  fn->body = body;
  snprintf(fn->name, sizeof fn->name, "%s", name);
  *f = fn;
  return CUDA_SUCCESS;
}

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shared, CUstream s, void **params, void **extra) {
  (void)s;
  NEED_CONTEXT();
  if (!f) return CUDA_ERROR_INVALID_HANDLE;
  if (extra || shared) {
    fprintf(stderr, "moec emu: %s: `extra` parameters and dynamic shared memory are not emulated\n", f->name);
    return CUDA_ERROR_NOT_SUPPORTED;
  }
  const unsigned g[3] = {gx, gy, gz}, b[3] = {bx, by, bz};
  char why[512] = "";
  pthread_mutex_lock(&lock);
  int rc = f->mod->launch(f->body, params, g, b, why, sizeof why);
  pthread_mutex_unlock(&lock);
  if (rc) {
    fprintf(stderr, "moec emu: the launch of %s failed: %s\n", f->name, why);
    return CUDA_ERROR_LAUNCH_FAILED;
  }
  return CUDA_SUCCESS;
}
