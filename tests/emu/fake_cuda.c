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
 * - Streams run every operation at the call (unless they capture, below), so
 *   an asynchronous call is done when it returns; events take the host's
 *   clock when recorded.
 * - Modules are the images of the emulated NVRTC (fake_image.h): shared
 *   objects, loaded with dlopen; a kernel launch runs its grid at the call
 *   (emu_device.h). A launch that fails prints why on stderr. A module has
 *   one CUfunction per kernel asked for, freed by cuModuleUnload.
 * - Stream capture and CUDA graphs (below).
 * It checks what a program computes and which calls it makes in which
 * order on one stream; it does not model concurrency between streams.
 *
 * Stream capture. cuStreamBeginCapture puts a stream in capture: what is
 * enqueued on it then is recorded as the nodes of a graph instead of run —
 * kernel launches (the values of their arguments copied at the call, their
 * sizes from the module, emu_device.h's moert_emu_params), cuMemsetD8Async,
 * cuMemcpy{HtoD,DtoH,DtoD,2D}Async (the pointers: the data is read when the
 * graph runs), cuEventRecordWithFlags(CU_EVENT_RECORD_EXTERNAL) (a node that
 * timestamps the event at each run), cuStreamWaitEvent(CU_EVENT_WAIT_EXTERNAL)
 * (a node; nothing to wait for here), cuLaunchHostFunc (a host node; outside
 * capture it runs at the call), cuGraphLaunch (the graph as a child). A plain
 * cuEventRecord in capture is no node: the event takes the stream's place in
 * the capture, and a stream that waits on it joins the capture (a stream not
 * capturing) or depends on it (a stream of the same capture); the capture
 * remembers every node's dependencies so that cuStreamEndCapture can check
 * the joins. cuGraphInstantiate shares the nodes with the graph (counted
 * references: an executable graph outlives its graph); cuGraphLaunch runs
 * them in capture order, an order their dependencies allow, at the call.
 * What the other stand-ins do on a capturing stream (cuBLAS, cuBLASLt, NCCL)
 * becomes a host node through moec_emu_launch_host_func_owned
 * (emu_capture.h), this library's one private export.
 *
 * The rules it enforces, after the driver API's documentation (cuda.h) and
 * the CUDA programming guide's rules of stream capture ("Cross-stream
 * Dependencies and Events", "Prohibited and Unhandled Operations"); where
 * they are silent, what CUDA is reported to do or the choice made is noted:
 * - Capture begins on a stream that is not capturing (else
 *   CUDA_ERROR_ILLEGAL_STATE: a choice), never on the legacy stream
 *   (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED); the per-thread default stream is
 *   not emulated for capture (CUDA_ERROR_NOT_SUPPORTED).
 * - "Potentially unsafe" calls — cuMemAlloc, cuMemFree, cuMemsetD8,
 *   cuModuleLoadData, cuModuleUnload, cuStreamSynchronize, cuStreamQuery, cuEventSynchronize
 *   — fail with CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and invalidate the
 *   capture(s) that forbid them: those of the calling thread not begun in
 *   RELAXED mode, and, while the thread's mode (cuThreadExchangeStreamCapture-
 *   Mode, default GLOBAL) is GLOBAL, those of other threads begun in GLOBAL
 *   mode; nothing is forbidden to a thread in RELAXED mode. Which calls are
 *   unsafe CUDA does not list; these are the ones the runtime makes.
 * - cuStreamSynchronize on a capturing stream fails so in every mode, and
 *   cuEventSynchronize or cuEventElapsedTime on an event recorded in a
 *   capture still going on fails with CUDA_ERROR_CAPTURED_EVENT; both
 *   invalidate the capture. On an event whose last record was a plain one in
 *   a capture now ended, both fail with CUDA_ERROR_INVALID_VALUE (it has no
 *   time, and a replay does not time it: only external records do; the code
 *   is the one users report of CUDA, NVIDIA/warp#983, not documented).
 * - Work on the legacy (NULL) stream while a stream created without
 *   CU_STREAM_NON_BLOCKING captures in the context: CUDA_ERROR_STREAM_CAPTURE_-
 *   IMPLICIT, and that capture is invalidated (cuStreamIsCapturing on the
 *   legacy stream says CUDA_ERROR_STREAM_CAPTURE_IMPLICIT without it).
 * - cuStreamWaitEvent, the stream capturing: on an event recorded in the same
 *   capture, a dependency; in another capture going on,
 *   CUDA_ERROR_STREAM_CAPTURE_MERGE, both invalidated; on an event recorded
 *   outside a capture (or in one now ended), CUDA_ERROR_STREAM_CAPTURE_-
 *   ISOLATION, the capture invalidated (as NVIDIA/cccl#8674 reports); on an
 *   event never recorded, nothing (an empty event: a no-op, as outside
 *   capture). The stream not capturing: on an event of a capture going on,
 *   the stream joins it (of an invalidated one: CUDA_ERROR_INVALID_VALUE, as
 *   ROCm/rocm-systems#11589 reports CUDA does).
 *   CU_EVENT_WAIT_EXTERNAL and CU_EVENT_RECORD_EXTERNAL outside capture:
 *   CUDA_ERROR_INVALID_VALUE (the documentation: "invalid outside of stream
 *   capture").
 * - Work on a stream of an invalidated capture: CUDA_ERROR_STREAM_CAPTURE_-
 *   INVALIDATED.
 * - cuStreamEndCapture on a stream not capturing: CUDA_ERROR_ILLEGAL_STATE (a
 *   choice); on a stream that joined, not the origin:
 *   CUDA_ERROR_STREAM_CAPTURE_UNMATCHED, and the capture is invalidated (a
 *   choice); from another thread, the capture not RELAXED:
 *   CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD (the capture goes on). Else the
 *   capture ends — every stream of it leaves capture — with a NULL graph and
 *   CUDA_ERROR_STREAM_CAPTURE_INVALIDATED if it was invalidated,
 *   CUDA_ERROR_STREAM_CAPTURE_UNJOINED if a stream that joined has a node the
 *   origin's last dependencies do not reach (its work after its last join
 *   back), else the graph.
 * - cuStreamDestroy of a capturing stream: CUDA_ERROR_STREAM_CAPTURE_-
 *   UNSUPPORTED, the capture invalidated, the stream kept (a choice).
 * - A host function may not call the driver: such calls fail with
 *   CUDA_ERROR_NOT_PERMITTED (which CUDA allows, not requires).
 * A failure of these rules is printed on stderr where it invalidates a
 * capture, and so is a node that fails in a graph launch (the launch stops
 * there). cuStreamGetCaptureInfo answers the status and the id only. */
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

#include "emu_capture.h"
#include "fake_image.h"

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static bool inited;
static _Thread_local CUcontext current;
static _Thread_local int in_host_fn; /* > 0 while a host function runs on this thread */
static _Thread_local CUstreamCaptureMode thread_mode = CU_STREAM_CAPTURE_MODE_GLOBAL;

struct capture;
struct CUctx_st {
  CUdevice dev;
  int refs;
};
struct CUstream_st {
  unsigned flags;
  CUcontext ctx;
  struct capture *cap; /* the capture it takes part in, or NULL */
  int *deps;           /* in capture: the nodes its next node depends on */
  size_t ndeps, cap_deps;
};
enum { EV_EMPTY, EV_TIMED, EV_CAPTURED };
struct CUevent_st {
  unsigned flags;
  int state;       /* EV_EMPTY: never recorded */
  double ms;       /* EV_TIMED: when */
  uint64_t cap_id; /* EV_CAPTURED: the capture of its last record */
  int *deps;       /* EV_CAPTURED: the stream's dependencies at the record */
  size_t ndeps;
  struct CUevent_st *prev, *next; /* the live events */
};
struct CUfunc_st;
struct CUmod_st {
  void *so;
  void *(*kernel)(const char *);
  int (*launch)(void *, void **, const unsigned *, const unsigned *, char *, size_t);
  int (*params)(void *, size_t *, int);
  struct CUfunc_st *funcs; /* its functions: one per kernel asked for, freed with it */
};
struct CUfunc_st {
  CUmodule mod;
  void *body;
  char name[256];
  int max_dynamic_smem; /* cuFuncSetAttribute's; 0: the default 48 KB */
  struct CUfunc_st *next;
};

/* The dynamic shared memory a launch may ask for: emu_device.h's buffer
 * (an H100's 227 KB), and 48 KB unless cuFuncSetAttribute allowed more. */
enum { EMU_DYN_SMEM_MAX = 227 * 1024, EMU_DYN_SMEM_DEFAULT = 48 * 1024 };

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

static const struct {
  CUresult e;
  const char *name, *text;
} errors[] = {
#define E(e, text) {e, #e, text}
    E(CUDA_SUCCESS, "no error"),
    E(CUDA_ERROR_INVALID_VALUE, "invalid argument"),
    E(CUDA_ERROR_OUT_OF_MEMORY, "out of memory"),
    E(CUDA_ERROR_NOT_INITIALIZED, "initialization error"),
    E(CUDA_ERROR_NO_DEVICE, "no CUDA-capable device is detected"),
    E(CUDA_ERROR_INVALID_DEVICE, "invalid device ordinal"),
    E(CUDA_ERROR_INVALID_IMAGE, "device kernel image is invalid"),
    E(CUDA_ERROR_INVALID_CONTEXT, "invalid device context"),
    E(CUDA_ERROR_INVALID_HANDLE, "invalid resource handle"),
    E(CUDA_ERROR_ILLEGAL_STATE, "the operation cannot be performed in the present state"),
    E(CUDA_ERROR_NOT_FOUND, "named symbol not found"),
    E(CUDA_ERROR_NOT_READY, "device not ready"),
    E(CUDA_ERROR_LAUNCH_FAILED, "unspecified launch failure"),
    E(CUDA_ERROR_NOT_PERMITTED, "operation not permitted"),
    E(CUDA_ERROR_NOT_SUPPORTED, "operation not supported"),
    E(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "operation not permitted when stream is capturing"),
    E(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "operation failed due to a previous error during capture"),
    E(CUDA_ERROR_STREAM_CAPTURE_MERGE, "operation would result in a merge of separate capture sequences"),
    E(CUDA_ERROR_STREAM_CAPTURE_UNMATCHED, "capture was not ended in the same stream as it began"),
    E(CUDA_ERROR_STREAM_CAPTURE_UNJOINED, "capturing stream has unjoined work"),
    E(CUDA_ERROR_STREAM_CAPTURE_ISOLATION, "dependency created on uncaptured work in another stream"),
    E(CUDA_ERROR_STREAM_CAPTURE_IMPLICIT, "operation would make the legacy stream depend on a capturing blocking stream"),
    E(CUDA_ERROR_CAPTURED_EVENT, "operation not permitted on an event last recorded in a capturing stream"),
    E(CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD, "attempt to terminate a thread-local capture sequence from another thread"),
#undef E
};

static const char *error_name(CUresult e) {
  for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++)
    if (errors[i].e == e) return errors[i].name;
  return "CUDA_ERROR (not one the emulation returns)";
}

CUresult cuGetErrorString(CUresult e, const char **s) {
  if (!s) return CUDA_ERROR_INVALID_VALUE;
  for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++)
    if (errors[i].e == e) {
      *s = errors[i].text;
      return CUDA_SUCCESS;
    }
  *s = NULL;
  return CUDA_ERROR_INVALID_VALUE;
}

CUresult cuGetErrorName(CUresult e, const char **s) {
  if (!s) return CUDA_ERROR_INVALID_VALUE;
  for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++)
    if (errors[i].e == e) {
      *s = errors[i].name;
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

static CUresult not_permitted(const char *fn) {
  fprintf(stderr, "moec emu: %s called from a host function (cuLaunchHostFunc): a host function may not call the "
                  "CUDA API (CUDA_ERROR_NOT_PERMITTED)\n", fn);
  return CUDA_ERROR_NOT_PERMITTED;
}

/* Every call that works on the device needs a current context, and none may
 * come from a host function. */
#define NEED_CONTEXT()                                                                         \
  do {                                                                                         \
    if (in_host_fn) return not_permitted(__func__);                                            \
    if (!current) return CUDA_ERROR_INVALID_CONTEXT;                                           \
  } while (0)

/* ------------------------------------------------------------ graphs and captures: the state */

typedef enum { N_KERNEL, N_MEMSET, N_COPY, N_COPY2D, N_EVENT_RECORD, N_EVENT_WAIT, N_HOST, N_GRAPH } node_kind;
static const char *const node_names[] = {"kernel launch",       "memset",       "memcpy",        "2-D memcpy",
                                         "event record (external)", "event wait (external)", "host function",
                                         "child graph"};
typedef enum { HTOD, DTOH, DTOD } copy_dir;

struct gbody;

/* One node of a graph. */
typedef struct node {
  node_kind kind;
  union {
    struct {
      void *body;
      int (*launch)(void *, void **, const unsigned *, const unsigned *, char *, size_t);
      unsigned grid[3], block[3];
      void **params; /* one block: the pointers, then the values they point at */
      char *name;
    } k;
    struct {
      CUdeviceptr dst;
      unsigned char value;
      size_t n;
    } set;
    struct {
      copy_dir dir;
      void *dst;
      const void *src;
      size_t n;
    } copy;
    CUDA_MEMCPY2D copy2d;
    CUevent event;
    struct {
      CUhostFn fn;
      void *data;
      void (*free_fn)(void *);
    } host;
    struct gbody *graph;
  } u;
} node;

/* The nodes of a graph in capture order, which is an order their
 * dependencies allow; shared (counted) by the graph and the executable
 * graphs made from it, never changed after the capture. */
typedef struct gbody {
  int refs;
  node *nodes;
  size_t n, cap;
} gbody;

struct CUgraph_st {
  gbody *b;
};
struct CUgraphExec_st {
  gbody *b;
};

/* A capture going on: begun on origin, joined by the other members. */
typedef struct capture {
  uint64_t id;
  CUstream origin;
  CUstreamCaptureMode mode;
  pthread_t thread; /* that began it */
  bool invalid;
  gbody *b; /* the nodes so far */
  struct preds {
    int *p; /* the nodes node i depends on */
    size_t n;
  } *preds;
  size_t cap_preds;
  CUstream *members; /* origin first */
  size_t nmembers, cap_members;
  struct capture *next;
} capture;

static capture *captures; /* going on (begun, not ended) */
static uint64_t capture_serial;
static struct CUevent_st *events; /* live */

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec * 1e3 + (double)t.tv_nsec * 1e-6;
}

static bool legacy(CUstream s) { return !s || s == CU_STREAM_LEGACY; }
static bool special(CUstream s) { return legacy(s) || s == CU_STREAM_PER_THREAD; }

/* The rest of this section: the lock held. */

static capture *capture_of(uint64_t id) {
  for (capture *c = captures; c; c = c->next)
    if (c->id == id) return c;
  return NULL;
}

/* Invalidates c, for call's failure with why (printed the first time). */
static void invalidate(capture *c, const char *call, CUresult why) {
  if (!c->invalid)
    fprintf(stderr, "moec emu: stream capture %llu is invalidated by %s (%s): its cuStreamEndCapture will fail "
                    "with CUDA_ERROR_STREAM_CAPTURE_INVALIDATED\n",
            (unsigned long long)c->id, call, error_name(why));
  c->invalid = true;
}

/* An unsafe call (see the file comment): CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
 * when a capture forbids it to this thread, each such capture invalidated. */
static CUresult unsafe_call(const char *call) {
  CUresult r = CUDA_SUCCESS;
  if (thread_mode == CU_STREAM_CAPTURE_MODE_RELAXED) return r;
  for (capture *c = captures; c; c = c->next) {
    bool mine = pthread_equal(c->thread, pthread_self());
    if ((mine && c->mode != CU_STREAM_CAPTURE_MODE_RELAXED) ||
        (!mine && thread_mode == CU_STREAM_CAPTURE_MODE_GLOBAL && c->mode == CU_STREAM_CAPTURE_MODE_GLOBAL)) {
      invalidate(c, call, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
      r = CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    }
  }
  return r;
}

/* The captures the legacy stream would depend on: with a blocking member in
 * this thread's context. */
static bool blocks_legacy(const capture *c) {
  for (size_t i = 0; i < c->nmembers; i++)
    if (!(c->members[i]->flags & CU_STREAM_NON_BLOCKING) && c->members[i]->ctx == current) return true;
  return false;
}

/* A use of the legacy stream: CUDA_ERROR_STREAM_CAPTURE_IMPLICIT while
 * captures it would depend on go on, each invalidated. */
static CUresult legacy_use(const char *call) {
  CUresult r = CUDA_SUCCESS;
  for (capture *c = captures; c; c = c->next)
    if (blocks_legacy(c)) {
      invalidate(c, call, CUDA_ERROR_STREAM_CAPTURE_IMPLICIT);
      r = CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
    }
  return r;
}

/* Where work enqueued on s goes: *c NULL (run it now) or s's capture; an
 * error when s may take no work now. */
static CUresult route(CUstream s, const char *call, capture **c) {
  *c = NULL;
  if (legacy(s)) return legacy_use(call);
  if (s == CU_STREAM_PER_THREAD || !s->cap) return CUDA_SUCCESS;
  if (s->cap->invalid) return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
  *c = s->cap;
  return CUDA_SUCCESS;
}

static bool has(const int *set, size_t n, int x) {
  for (size_t i = 0; i < n; i++)
    if (set[i] == x) return true;
  return false;
}

/* s's dependencies become deps (replace) or take them in too. */
static bool deps_set(CUstream s, const int *deps, size_t n, bool replace) {
  if (replace) s->ndeps = 0;
  for (size_t i = 0; i < n; i++) {
    if (has(s->deps, s->ndeps, deps[i])) continue;
    if (s->ndeps == s->cap_deps) {
      size_t cap = s->cap_deps * 2 + 4;
      int *d = realloc(s->deps, cap * sizeof *d);
      if (!d) return false;
      s->deps = d, s->cap_deps = cap;
    }
    s->deps[s->ndeps++] = deps[i];
  }
  return true;
}

/* n, copied into c's graph after what s enqueued before (its dependencies:
 * s's); false (n not taken) when out of memory. */
static bool add_node(capture *c, CUstream s, const node *n) {
  gbody *b = c->b;
  if (b->n == b->cap) {
    size_t cap = b->cap * 2 + 16;
    node *nn = realloc(b->nodes, cap * sizeof *nn);
    if (!nn) return false;
    b->nodes = nn, b->cap = cap;
  }
  if (b->n == c->cap_preds) {
    size_t cap = c->cap_preds * 2 + 16;
    struct preds *np = realloc(c->preds, cap * sizeof *np);
    if (!np) return false;
    c->preds = np, c->cap_preds = cap;
  }
  if (!s->cap_deps) {
    if (!(s->deps = malloc(4 * sizeof *s->deps))) return false;
    s->cap_deps = 4;
  }
  int *p = NULL;
  if (s->ndeps && !(p = malloc(s->ndeps * sizeof *p))) return false;
  if (s->ndeps) memcpy(p, s->deps, s->ndeps * sizeof *p);
  c->preds[b->n] = (struct preds){p, s->ndeps};
  s->deps[0] = (int)b->n, s->ndeps = 1;
  b->nodes[b->n++] = *n;
  return true;
}

/* s (not capturing) joins c, depending on deps. */
static bool join(capture *c, CUstream s, const int *deps, size_t n) {
  if (c->nmembers == c->cap_members) {
    size_t cap = c->cap_members * 2 + 4;
    CUstream *m = realloc(c->members, cap * sizeof *m);
    if (!m) return false;
    c->members = m, c->cap_members = cap;
  }
  if (!deps_set(s, deps, n, true)) return false;
  c->members[c->nmembers++] = s;
  s->cap = c;
  return true;
}

/* Ends c: its streams leave capture, it leaves the list. Its graph stays. */
static void capture_end(capture *c) {
  for (size_t i = 0; i < c->nmembers; i++) {
    CUstream s = c->members[i];
    s->cap = NULL;
    free(s->deps);
    s->deps = NULL, s->ndeps = s->cap_deps = 0;
  }
  for (capture **p = &captures; *p; p = &(*p)->next)
    if (*p == c) {
      *p = c->next;
      break;
    }
  for (size_t i = 0; i < c->b->n; i++) free(c->preds[i].p);
  free(c->preds);
  free(c->members);
  free(c);
}

/* A stream of c (not its origin) whose work the origin's dependencies do not
 * reach, or NULL. */
static CUstream unjoined(const capture *c, int *node_out) {
  size_t n = c->b->n;
  bool *reached = calloc(n ? n : 1, sizeof *reached);
  int *stack = malloc((n ? n : 1) * sizeof *stack);
  CUstream bad = NULL;
  if (!reached || !stack) {
    free(reached), free(stack);
    return NULL; /* out of memory: no check */
  }
  size_t top = 0;
  for (size_t i = 0; i < c->origin->ndeps; i++) {
    reached[c->origin->deps[i]] = true;
    stack[top++] = c->origin->deps[i];
  }
  while (top) {
    int x = stack[--top];
    for (size_t i = 0; i < c->preds[x].n; i++) {
      int p = c->preds[x].p[i];
      if (!reached[p]) reached[p] = true, stack[top++] = p;
    }
  }
  for (size_t m = 1; m < c->nmembers && !bad; m++)
    for (size_t i = 0; i < c->members[m]->ndeps && !bad; i++)
      if (!reached[c->members[m]->deps[i]]) bad = c->members[m], *node_out = c->members[m]->deps[i];
  free(reached), free(stack);
  return bad;
}

/* ------------------------------------------------------------ graphs: their nodes */

/* Frees what n holds; its host data only when owned is true. Without the lock. */
static void body_unref(gbody *b);
static void node_release(node *n, bool owned) {
  switch (n->kind) {
  case N_KERNEL:
    free(n->u.k.params);
    free(n->u.k.name);
    break;
  case N_HOST:
    if (owned && n->u.host.free_fn) n->u.host.free_fn(n->u.host.data);
    break;
  case N_GRAPH: body_unref(n->u.graph); break;
  default: break;
  }
}

static void body_unref(gbody *b) {
  if (!b) return;
  pthread_mutex_lock(&lock);
  int left = --b->refs;
  pthread_mutex_unlock(&lock);
  if (left) return;
  for (size_t i = 0; i < b->n; i++) node_release(&b->nodes[i], true);
  free(b->nodes);
  free(b);
}

static void run_host(CUhostFn fn, void *data) {
  in_host_fn++;
  fn(data);
  in_host_fn--;
}

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
  CUresult r = unsafe_call("cuMemAlloc");
  if (r != CUDA_SUCCESS) {
    pthread_mutex_unlock(&lock);
    return r;
  }
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
  CUresult r = unsafe_call("cuMemFree");
  if (r != CUDA_SUCCESS) {
    pthread_mutex_unlock(&lock);
    return r;
  }
  r = CUDA_ERROR_INVALID_VALUE;
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
  pthread_mutex_lock(&lock);
  CUresult r = unsafe_call("cuMemsetD8");
  pthread_mutex_unlock(&lock);
  if (r != CUDA_SUCCESS) return r;
  if (!device_range(d, n)) return CUDA_ERROR_INVALID_VALUE;
  memset((void *)(uintptr_t)d, v, n);
  return CUDA_SUCCESS;
}

/* Records n (filled but for what capture adds) on s when s captures: true
 * with *r the result when it did or when s takes no work now, false (run it
 * now) when s is not capturing. */
static bool captured(CUstream s, const char *call, const node *n, CUresult *r) {
  pthread_mutex_lock(&lock);
  capture *c;
  *r = route(s, call, &c);
  if (*r == CUDA_SUCCESS && c && !add_node(c, s, n)) *r = CUDA_ERROR_OUT_OF_MEMORY;
  pthread_mutex_unlock(&lock);
  return *r != CUDA_SUCCESS || c;
}

CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUstream s) {
  NEED_CONTEXT();
  if (!device_range(d, n)) return CUDA_ERROR_INVALID_VALUE;
  node nd = {.kind = N_MEMSET, .u.set = {d, v, n}};
  CUresult r;
  if (captured(s, "cuMemsetD8Async", &nd, &r)) return r;
  memset((void *)(uintptr_t)d, v, n);
  return CUDA_SUCCESS;
}

/* A 1-D copy's checks (dst, src: device pointers as dir says). */
static bool copy_ok(copy_dir dir, void *dst, const void *src, size_t n) {
  if (!n) return true;
  bool dev_dst = dir != DTOH, dev_src = dir != HTOD;
  if (!dst || !src) return false;
  return (!dev_dst || device_range((CUdeviceptr)(uintptr_t)dst, n)) &&
         (!dev_src || device_range((CUdeviceptr)(uintptr_t)src, n));
}

static CUresult copy_async(const char *call, copy_dir dir, void *dst, const void *src, size_t n, CUstream s) {
  NEED_CONTEXT();
  if (!copy_ok(dir, dst, src, n)) return CUDA_ERROR_INVALID_VALUE;
  node nd = {.kind = N_COPY, .u.copy = {dir, dst, src, n}};
  CUresult r;
  if (captured(s, call, &nd, &r)) return r;
  if (n) memmove(dst, src, n);
  return CUDA_SUCCESS;
}

CUresult cuMemcpyHtoDAsync(CUdeviceptr dst, const void *src, size_t n, CUstream s) {
  return copy_async("cuMemcpyHtoDAsync", HTOD, (void *)(uintptr_t)dst, src, n, s);
}

CUresult cuMemcpyDtoHAsync(void *dst, CUdeviceptr src, size_t n, CUstream s) {
  return copy_async("cuMemcpyDtoHAsync", DTOH, dst, (const void *)(uintptr_t)src, n, s);
}

CUresult cuMemcpyDtoDAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
  return copy_async("cuMemcpyDtoDAsync", DTOD, (void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n, s);
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

/* Checks c, and runs it when run is true. */
static CUresult copy2d(const CUDA_MEMCPY2D *c, bool run) {
  if (c->Height > 1 && (c->srcPitch < c->WidthInBytes || c->dstPitch < c->WidthInBytes))
    return CUDA_ERROR_INVALID_VALUE;
  bool ok = true;
  const char *src = side(c->srcMemoryType, c->srcHost, c->srcDevice, c->srcXInBytes, c->srcY, c->srcPitch,
                         c->WidthInBytes, c->Height, &ok);
  char *dst = side(c->dstMemoryType, c->dstHost, c->dstDevice, c->dstXInBytes, c->dstY, c->dstPitch,
                   c->WidthInBytes, c->Height, &ok);
  if (!ok) return CUDA_ERROR_INVALID_VALUE;
  if (run)
    for (size_t r = 0; r < c->Height; r++) memmove(dst + r * c->dstPitch, src + r * c->srcPitch, c->WidthInBytes);
  return CUDA_SUCCESS;
}

CUresult cuMemcpy2DAsync(const CUDA_MEMCPY2D *c, CUstream s) {
  NEED_CONTEXT();
  if (!c) return CUDA_ERROR_INVALID_VALUE;
  CUresult r = copy2d(c, false);
  if (r != CUDA_SUCCESS) return r;
  node nd = {.kind = N_COPY2D, .u.copy2d = *c};
  if (captured(s, "cuMemcpy2DAsync", &nd, &r)) return r;
  return copy2d(c, true);
}

/* ------------------------------------------------------------ streams */

CUresult cuStreamCreate(CUstream *s, unsigned flags) {
  NEED_CONTEXT();
  if (!s) return CUDA_ERROR_INVALID_VALUE;
  if (!(*s = calloc(1, sizeof **s))) return CUDA_ERROR_OUT_OF_MEMORY;
  (*s)->flags = flags;
  (*s)->ctx = current;
  return CUDA_SUCCESS;
}

CUresult cuStreamDestroy(CUstream s) {
  if (special(s)) return CUDA_ERROR_INVALID_HANDLE;
  pthread_mutex_lock(&lock);
  capture *c = s->cap;
  if (c) invalidate(c, "cuStreamDestroy of a stream in the capture", CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
  pthread_mutex_unlock(&lock);
  if (c) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED; /* kept: the capture still names it */
  free(s);
  return CUDA_SUCCESS;
}

CUresult cuStreamSynchronize(CUstream s) {
  NEED_CONTEXT();
  pthread_mutex_lock(&lock);
  CUresult r = CUDA_SUCCESS;
  if (!special(s) && s->cap) {
    invalidate(s->cap, "cuStreamSynchronize of a capturing stream", CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    r = CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  }
  if (r == CUDA_SUCCESS) r = unsafe_call("cuStreamSynchronize");
  if (r == CUDA_SUCCESS && legacy(s)) r = legacy_use("cuStreamSynchronize of the legacy stream");
  pthread_mutex_unlock(&lock);
  return r;
}

/* Work runs when it is launched: a stream is always done. As
 * cuStreamSynchronize, illegal on a capturing stream (CUDA's query is, in the
 * global and thread-local capture modes). */
CUresult cuStreamQuery(CUstream s) {
  NEED_CONTEXT();
  pthread_mutex_lock(&lock);
  CUresult r = CUDA_SUCCESS;
  if (!special(s) && s->cap) {
    invalidate(s->cap, "cuStreamQuery of a capturing stream", CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    r = CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  }
  if (r == CUDA_SUCCESS) r = unsafe_call("cuStreamQuery");
  if (r == CUDA_SUCCESS && legacy(s)) r = legacy_use("cuStreamQuery of the legacy stream");
  pthread_mutex_unlock(&lock);
  return r;
}

CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned flags) {
  NEED_CONTEXT();
  if (!e || (flags & ~(unsigned)CU_EVENT_WAIT_EXTERNAL)) return CUDA_ERROR_INVALID_VALUE;
  pthread_mutex_lock(&lock);
  capture *c;
  CUresult r = route(s, "cuStreamWaitEvent", &c);
  capture *ec = e->state == EV_CAPTURED ? capture_of(e->cap_id) : NULL;
  if (r != CUDA_SUCCESS) {
  } else if (!c) {
    if (flags & CU_EVENT_WAIT_EXTERNAL) r = CUDA_ERROR_INVALID_VALUE; /* only in capture */
    else if (ec && ec->invalid) r = CUDA_ERROR_INVALID_VALUE;
    else if (ec && special(s)) {
      invalidate(ec, "cuStreamWaitEvent of a special stream on a captured event", CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
      r = CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    } else if (ec && !join(ec, s, e->deps, e->ndeps)) {
      r = CUDA_ERROR_OUT_OF_MEMORY;
    } /* else: run now, and there is nothing to wait for */
  } else if (flags & CU_EVENT_WAIT_EXTERNAL) {
    node nd = {.kind = N_EVENT_WAIT, .u.event = e};
    if (!add_node(c, s, &nd)) r = CUDA_ERROR_OUT_OF_MEMORY;
  } else if (ec == c) {
    if (!deps_set(s, e->deps, e->ndeps, false)) r = CUDA_ERROR_OUT_OF_MEMORY;
  } else if (ec) {
    invalidate(c, "cuStreamWaitEvent on an event of another capture", CUDA_ERROR_STREAM_CAPTURE_MERGE);
    invalidate(ec, "cuStreamWaitEvent of a stream of another capture", CUDA_ERROR_STREAM_CAPTURE_MERGE);
    r = CUDA_ERROR_STREAM_CAPTURE_MERGE;
  } else if (e->state != EV_EMPTY) {
    invalidate(c, "cuStreamWaitEvent on an event recorded outside the capture", CUDA_ERROR_STREAM_CAPTURE_ISOLATION);
    r = CUDA_ERROR_STREAM_CAPTURE_ISOLATION;
  } /* else: an event never recorded is empty, and waiting on it a no-op */
  pthread_mutex_unlock(&lock);
  return r;
}

CUresult cuStreamBeginCapture(CUstream s, CUstreamCaptureMode mode) {
  NEED_CONTEXT();
  if (legacy(s)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  if (s == CU_STREAM_PER_THREAD) {
    fprintf(stderr, "moec emu: capture of the per-thread default stream is not emulated\n");
    return CUDA_ERROR_NOT_SUPPORTED;
  }
  if (mode != CU_STREAM_CAPTURE_MODE_GLOBAL && mode != CU_STREAM_CAPTURE_MODE_THREAD_LOCAL &&
      mode != CU_STREAM_CAPTURE_MODE_RELAXED)
    return CUDA_ERROR_INVALID_VALUE;
  capture *c = calloc(1, sizeof *c);
  gbody *b = calloc(1, sizeof *b);
  CUstream *m = malloc(4 * sizeof *m);
  if (!c || !b || !m) {
    free(c), free(b), free(m);
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
  pthread_mutex_lock(&lock);
  if (s->cap) {
    pthread_mutex_unlock(&lock);
    free(c), free(b), free(m);
    return CUDA_ERROR_ILLEGAL_STATE;
  }
  b->refs = 1;
  *c = (capture){.id = ++capture_serial, .origin = s, .mode = mode, .thread = pthread_self(), .b = b,
                 .members = m, .nmembers = 1, .cap_members = 4, .next = captures};
  m[0] = s;
  captures = c;
  s->cap = c;
  s->ndeps = 0;
  pthread_mutex_unlock(&lock);
  return CUDA_SUCCESS;
}

CUresult cuStreamEndCapture(CUstream s, CUgraph *out) {
  NEED_CONTEXT();
  if (!out) return CUDA_ERROR_INVALID_VALUE;
  *out = NULL;
  if (special(s)) return CUDA_ERROR_ILLEGAL_STATE;
  CUgraph g = malloc(sizeof *g);
  if (!g) return CUDA_ERROR_OUT_OF_MEMORY;
  pthread_mutex_lock(&lock);
  capture *c = s->cap;
  CUresult r = CUDA_SUCCESS;
  gbody *b = NULL;
  int bad_node = -1;
  CUstream bad = NULL;
  if (!c) {
    r = CUDA_ERROR_ILLEGAL_STATE;
  } else if (c->origin != s) {
    invalidate(c, "cuStreamEndCapture on a stream that joined the capture, not its origin",
               CUDA_ERROR_STREAM_CAPTURE_UNMATCHED);
    r = CUDA_ERROR_STREAM_CAPTURE_UNMATCHED;
  } else if (c->mode != CU_STREAM_CAPTURE_MODE_RELAXED && !pthread_equal(c->thread, pthread_self())) {
    r = CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD;
  } else {
    b = c->b;
    if (c->invalid) r = CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
    else if ((bad = unjoined(c, &bad_node))) r = CUDA_ERROR_STREAM_CAPTURE_UNJOINED;
    if (r == CUDA_ERROR_STREAM_CAPTURE_UNJOINED)
      fprintf(stderr, "moec emu: cuStreamEndCapture of capture %llu: a stream that joined it has work (node %d, "
                      "a %s) that never joined back into the origin stream: CUDA_ERROR_STREAM_CAPTURE_UNJOINED\n",
              (unsigned long long)c->id, bad_node, node_names[b->nodes[bad_node].kind]);
    capture_end(c);
  }
  pthread_mutex_unlock(&lock);
  if (r != CUDA_SUCCESS) {
    free(g);
    body_unref(b);
    return r;
  }
  g->b = b;
  *out = g;
  return CUDA_SUCCESS;
}

CUresult cuStreamIsCapturing(CUstream s, CUstreamCaptureStatus *status) {
  if (!status) return CUDA_ERROR_INVALID_VALUE;
  CUresult r = CUDA_SUCCESS;
  pthread_mutex_lock(&lock);
  *status = CU_STREAM_CAPTURE_STATUS_NONE;
  if (legacy(s)) {
    for (capture *c = captures; c; c = c->next)
      if (blocks_legacy(c)) r = CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
  } else if (s != CU_STREAM_PER_THREAD && s->cap) {
    *status = s->cap->invalid ? CU_STREAM_CAPTURE_STATUS_INVALIDATED : CU_STREAM_CAPTURE_STATUS_ACTIVE;
  }
  pthread_mutex_unlock(&lock);
  return r;
}

/* The status and the id; the graph, its dependencies and their edges are not
 * emulated (CUDA_ERROR_NOT_SUPPORTED when asked for). */
CUresult cuStreamGetCaptureInfo(CUstream s, CUstreamCaptureStatus *status, cuuint64_t *id, CUgraph *graph,
                                const CUgraphNode **deps, const CUgraphEdgeData **edges, size_t *ndeps) {
  if (graph || deps || edges || ndeps) {
    fprintf(stderr, "moec emu: cuStreamGetCaptureInfo: only the status and the id are emulated\n");
    return CUDA_ERROR_NOT_SUPPORTED;
  }
  CUresult r = cuStreamIsCapturing(s, status);
  if (r == CUDA_SUCCESS && id && *status != CU_STREAM_CAPTURE_STATUS_NONE) {
    pthread_mutex_lock(&lock);
    *id = s->cap ? s->cap->id : 0;
    pthread_mutex_unlock(&lock);
  }
  return r;
}

CUresult cuThreadExchangeStreamCaptureMode(CUstreamCaptureMode *mode) {
  if (!mode || (*mode != CU_STREAM_CAPTURE_MODE_GLOBAL && *mode != CU_STREAM_CAPTURE_MODE_THREAD_LOCAL &&
                *mode != CU_STREAM_CAPTURE_MODE_RELAXED))
    return CUDA_ERROR_INVALID_VALUE;
  CUstreamCaptureMode old = thread_mode;
  thread_mode = *mode;
  *mode = old;
  return CUDA_SUCCESS;
}

/* ------------------------------------------------------------ events */

CUresult cuEventCreate(CUevent *e, unsigned flags) {
  NEED_CONTEXT();
  if (!e) return CUDA_ERROR_INVALID_VALUE;
  if (!(*e = calloc(1, sizeof **e))) return CUDA_ERROR_OUT_OF_MEMORY;
  (*e)->flags = flags;
  pthread_mutex_lock(&lock);
  (*e)->next = events;
  if (events) events->prev = *e;
  events = *e;
  pthread_mutex_unlock(&lock);
  return CUDA_SUCCESS;
}

/* e records the time now. The lock held. */
static void event_time(CUevent e) {
  e->state = EV_TIMED;
  e->ms = now_ms();
  free(e->deps);
  e->deps = NULL, e->ndeps = 0;
}

CUresult cuEventRecordWithFlags(CUevent e, CUstream s, unsigned flags) {
  NEED_CONTEXT();
  if (!e) return CUDA_ERROR_INVALID_HANDLE;
  if (flags & ~(unsigned)CU_EVENT_RECORD_EXTERNAL) return CUDA_ERROR_INVALID_VALUE;
  pthread_mutex_lock(&lock);
  capture *c;
  CUresult r = route(s, "cuEventRecord", &c);
  if (r != CUDA_SUCCESS) {
  } else if (!c) {
    if (flags & CU_EVENT_RECORD_EXTERNAL) r = CUDA_ERROR_INVALID_VALUE; /* only in capture */
    else event_time(e);
  } else if (flags & CU_EVENT_RECORD_EXTERNAL) {
    node nd = {.kind = N_EVENT_RECORD, .u.event = e};
    if (!add_node(c, s, &nd)) r = CUDA_ERROR_OUT_OF_MEMORY;
  } else { /* the event takes the stream's place in the capture */
    int *d = s->ndeps ? malloc(s->ndeps * sizeof *d) : NULL;
    if (s->ndeps && !d) {
      r = CUDA_ERROR_OUT_OF_MEMORY;
    } else {
      if (s->ndeps) memcpy(d, s->deps, s->ndeps * sizeof *d);
      free(e->deps);
      e->deps = d, e->ndeps = s->ndeps;
      e->state = EV_CAPTURED, e->cap_id = c->id;
    }
  }
  pthread_mutex_unlock(&lock);
  return r;
}

CUresult cuEventRecord(CUevent e, CUstream s) { return cuEventRecordWithFlags(e, s, CU_EVENT_RECORD_DEFAULT); }

CUresult cuEventSynchronize(CUevent e) {
  if (in_host_fn) return not_permitted(__func__);
  if (!e) return CUDA_ERROR_INVALID_HANDLE;
  pthread_mutex_lock(&lock);
  capture *ec = e->state == EV_CAPTURED ? capture_of(e->cap_id) : NULL;
  CUresult r = CUDA_SUCCESS;
  if (ec) {
    invalidate(ec, "cuEventSynchronize of an event recorded in the capture", CUDA_ERROR_CAPTURED_EVENT);
    r = CUDA_ERROR_CAPTURED_EVENT;
  } else {
    r = unsafe_call("cuEventSynchronize");
  }
  if (r == CUDA_SUCCESS && e->state == EV_CAPTURED) r = CUDA_ERROR_INVALID_VALUE; /* of an ended capture */
  pthread_mutex_unlock(&lock);
  return r;
}

CUresult cuEventElapsedTime(float *ms, CUevent a, CUevent b) {
  if (in_host_fn) return not_permitted(__func__);
  if (!ms || !a || !b) return CUDA_ERROR_INVALID_HANDLE;
  pthread_mutex_lock(&lock);
  CUresult r = CUDA_SUCCESS;
  CUevent ab[2] = {a, b};
  for (int i = 0; i < 2; i++) {
    capture *ec = ab[i]->state == EV_CAPTURED ? capture_of(ab[i]->cap_id) : NULL;
    if (ec) {
      invalidate(ec, "cuEventElapsedTime of an event recorded in the capture", CUDA_ERROR_CAPTURED_EVENT);
      r = CUDA_ERROR_CAPTURED_EVENT;
    }
  }
  /* as the driver: events made without timing, or never recorded, have no
   * time; nor have those last recorded by a plain record in an ended capture */
  if (r == CUDA_SUCCESS && (a->state == EV_CAPTURED || b->state == EV_CAPTURED)) r = CUDA_ERROR_INVALID_VALUE;
  if (r == CUDA_SUCCESS &&
      (((a->flags | b->flags) & CU_EVENT_DISABLE_TIMING) || a->state != EV_TIMED || b->state != EV_TIMED))
    r = CUDA_ERROR_INVALID_HANDLE;
  if (r == CUDA_SUCCESS) *ms = (float)(b->ms - a->ms);
  pthread_mutex_unlock(&lock);
  return r;
}

CUresult cuEventDestroy(CUevent e) {
  if (!e) return CUDA_ERROR_INVALID_HANDLE;
  pthread_mutex_lock(&lock);
  if (e->prev) e->prev->next = e->next;
  else events = e->next;
  if (e->next) e->next->prev = e->prev;
  pthread_mutex_unlock(&lock);
  free(e->deps);
  free(e);
  return CUDA_SUCCESS;
}

/* ------------------------------------------------------------ modules, launches */

CUresult cuModuleLoadData(CUmodule *out, const void *image) {
  NEED_CONTEXT();
  if (!out || !image) return CUDA_ERROR_INVALID_VALUE;
  pthread_mutex_lock(&lock);
  CUresult r = unsafe_call("cuModuleLoadData");
  pthread_mutex_unlock(&lock);
  if (r != CUDA_SUCCESS) return r;
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
  *(void **)&m->params = dlsym(h, "moert_emu_params");
  if (!m->kernel || !m->launch || !m->params) {
    if (m->kernel && m->launch)
      fprintf(stderr, "moec emu: a module made with an older emu_device.h (no moert_emu_params): clear the "
                      "kernel cache\n");
    dlclose(h);
    free(m);
    return CUDA_ERROR_INVALID_IMAGE;
  }
  *out = m;
  return CUDA_SUCCESS;
}

CUresult cuModuleUnload(CUmodule m) {
  if (in_host_fn) return not_permitted(__func__);
  if (!m) return CUDA_ERROR_INVALID_HANDLE;
  pthread_mutex_lock(&lock);
  CUresult r = unsafe_call("cuModuleUnload");
  pthread_mutex_unlock(&lock);
  if (r != CUDA_SUCCESS) return r;
  /* the module's fibers live on (their stacks are its own state), and so do
   * the graphs that launch its kernels: keep it loaded; its functions go */
  for (CUfunction f = m->funcs, next; f; f = next) {
    next = f->next;
    free(f);
  }
  free(m);
  return CUDA_SUCCESS;
}

CUresult cuModuleGetFunction(CUfunction *f, CUmodule m, const char *name) {
  if (!f || !m || !name) return CUDA_ERROR_INVALID_VALUE;
  void *body = m->kernel(name);
  if (!body) return CUDA_ERROR_NOT_FOUND;
  pthread_mutex_lock(&lock);
  CUfunction fn = m->funcs;
  while (fn && fn->body != body) fn = fn->next;
  if (!fn && (fn = calloc(1, sizeof *fn))) {
    fn->mod = m;
    fn->body = body;
    snprintf(fn->name, sizeof fn->name, "%s", name);
    fn->next = m->funcs;
    m->funcs = fn;
  }
  pthread_mutex_unlock(&lock);
  if (!fn) return CUDA_ERROR_OUT_OF_MEMORY;
  *f = fn;
  return CUDA_SUCCESS;
}

/* Runs a kernel's grid now. */
static CUresult run_kernel(int (*launch)(void *, void **, const unsigned *, const unsigned *, char *, size_t),
                           void *body, void **params, const unsigned g[3], const unsigned b[3], const char *name) {
  char why[512] = "";
  pthread_mutex_lock(&lock);
  int rc = launch(body, params, g, b, why, sizeof why);
  pthread_mutex_unlock(&lock);
  if (rc) {
    fprintf(stderr, "moec emu: the launch of %s failed: %s\n", name, why);
    return CUDA_ERROR_LAUNCH_FAILED;
  }
  return CUDA_SUCCESS;
}

/* A launch of f as a node: its parameters' values copied (their sizes from
 * the module); false with *r when it cannot be. */
static bool kernel_node(CUfunction f, void **params, const unsigned g[3], const unsigned b[3], node *nd, CUresult *r) {
  enum { MAX_PARAMS = 512 };
  size_t sizes[MAX_PARAMS];
  int n = f->mod->params(f->body, sizes, MAX_PARAMS);
  long long nthreads = (long long)b[0] * b[1] * b[2];
  *r = CUDA_ERROR_INVALID_VALUE;
  if (n < 0 || n > MAX_PARAMS) {
    fprintf(stderr, "moec emu: %s: the module does not know the kernel's parameters\n", f->name);
    return false;
  }
  if (n > 0 && !params) return false;
  if (nthreads < 1 || nthreads > 1024 || !g[0] || !g[1] || !g[2]) {
    fprintf(stderr, "moec emu: %s: bad launch shape: grid (%u,%u,%u), block (%u,%u,%u)\n", f->name, g[0], g[1],
            g[2], b[0], b[1], b[2]);
    return false;
  }
  size_t off = ((size_t)n * sizeof(void *) + 15) & ~(size_t)15, total = off;
  for (int i = 0; i < n; i++) total += (sizes[i] + 15) & ~(size_t)15;
  char *block = malloc(total ? total : 1);
  char *name = strdup(f->name);
  if (!block || !name) {
    free(block), free(name);
    *r = CUDA_ERROR_OUT_OF_MEMORY;
    return false;
  }
  void **p = (void **)block;
  for (int i = 0; i < n; i++) {
    p[i] = block + off;
    memcpy(p[i], params[i], sizes[i]);
    off += (sizes[i] + 15) & ~(size_t)15;
  }
  *nd = (node){.kind = N_KERNEL};
  nd->u.k.body = f->body, nd->u.k.launch = f->mod->launch, nd->u.k.params = p, nd->u.k.name = name;
  memcpy(nd->u.k.grid, g, sizeof nd->u.k.grid);
  memcpy(nd->u.k.block, b, sizeof nd->u.k.block);
  *r = CUDA_SUCCESS;
  return true;
}

CUresult cuFuncSetAttribute(CUfunction f, CUfunction_attribute a, int v) {
  if (!f) return CUDA_ERROR_INVALID_HANDLE;
  if (a == CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) {
    if (v < 0 || v > EMU_DYN_SMEM_MAX) return CUDA_ERROR_INVALID_VALUE;
    f->max_dynamic_smem = v;
    return CUDA_SUCCESS;
  }
  return a == CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT ? CUDA_SUCCESS : CUDA_ERROR_NOT_SUPPORTED;
}

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shared, CUstream s, void **params, void **extra) {
  NEED_CONTEXT();
  if (!f) return CUDA_ERROR_INVALID_HANDLE;
  if (extra) {
    fprintf(stderr, "moec emu: %s: `extra` parameters are not emulated\n", f->name);
    return CUDA_ERROR_NOT_SUPPORTED;
  }
  if (shared > (unsigned)(f->max_dynamic_smem > EMU_DYN_SMEM_DEFAULT ? f->max_dynamic_smem : EMU_DYN_SMEM_DEFAULT)) {
    fprintf(stderr, "moec emu: %s: %u bytes of dynamic shared memory, more than the kernel is allowed (%d; "
            "cuFuncSetAttribute raises it up to %d)\n", f->name, shared,
            f->max_dynamic_smem > EMU_DYN_SMEM_DEFAULT ? f->max_dynamic_smem : EMU_DYN_SMEM_DEFAULT, EMU_DYN_SMEM_MAX);
    return CUDA_ERROR_INVALID_VALUE;
  }
  const unsigned g[3] = {gx, gy, gz}, b[3] = {bx, by, bz};
  pthread_mutex_lock(&lock);
  capture *c;
  CUresult r = route(s, "cuLaunchKernel", &c);
  node nd;
  if (r == CUDA_SUCCESS && c && kernel_node(f, params, g, b, &nd, &r) && !add_node(c, s, &nd)) {
    node_release(&nd, false);
    r = CUDA_ERROR_OUT_OF_MEMORY;
  }
  pthread_mutex_unlock(&lock);
  if (r != CUDA_SUCCESS || c) return r;
  return run_kernel(f->mod->launch, f->body, params, g, b, f->name);
}

CUresult moec_emu_launch_host_func_owned(CUstream s, CUhostFn fn, void *data, void (*free_fn)(void *)) {
  NEED_CONTEXT();
  if (!fn) return CUDA_ERROR_INVALID_VALUE;
  node nd = {.kind = N_HOST, .u.host = {fn, data, free_fn}};
  CUresult r;
  if (captured(s, "cuLaunchHostFunc", &nd, &r)) return r;
  run_host(fn, data);
  if (free_fn) free_fn(data);
  return CUDA_SUCCESS;
}

CUresult cuLaunchHostFunc(CUstream s, CUhostFn fn, void *data) {
  return moec_emu_launch_host_func_owned(s, fn, data, NULL);
}

/* ------------------------------------------------------------ graphs */

CUresult cuGraphInstantiate(CUgraphExec *out, CUgraph g, unsigned long long flags) {
  if (in_host_fn) return not_permitted(__func__);
  if (!out || !g) return CUDA_ERROR_INVALID_VALUE;
  /* what they ask for means nothing here (no memory nodes, no upload, no priorities) */
  const unsigned long long known = CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH |
                                   CUDA_GRAPH_INSTANTIATE_FLAG_UPLOAD |
                                   CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY;
  if (flags & ~known) return CUDA_ERROR_INVALID_VALUE;
  CUgraphExec x = malloc(sizeof *x);
  if (!x) return CUDA_ERROR_OUT_OF_MEMORY;
  pthread_mutex_lock(&lock);
  g->b->refs++;
  pthread_mutex_unlock(&lock);
  x->b = g->b;
  *out = x;
  return CUDA_SUCCESS;
}

static bool event_alive(CUevent e) {
  for (CUevent x = events; x; x = x->next)
    if (x == e) return true;
  return false;
}

/* Runs b's nodes in order; the first failure stops it. */
static CUresult body_run(const gbody *b) {
  for (size_t i = 0; i < b->n; i++) {
    const node *n = &b->nodes[i];
    CUresult r = CUDA_SUCCESS;
    switch (n->kind) {
    case N_KERNEL:
      r = run_kernel(n->u.k.launch, n->u.k.body, n->u.k.params, n->u.k.grid, n->u.k.block, n->u.k.name);
      break;
    case N_MEMSET:
      if (!device_range(n->u.set.dst, n->u.set.n)) r = CUDA_ERROR_INVALID_VALUE;
      else memset((void *)(uintptr_t)n->u.set.dst, n->u.set.value, n->u.set.n);
      break;
    case N_COPY:
      if (!copy_ok(n->u.copy.dir, n->u.copy.dst, n->u.copy.src, n->u.copy.n)) r = CUDA_ERROR_INVALID_VALUE;
      else if (n->u.copy.n) memmove(n->u.copy.dst, n->u.copy.src, n->u.copy.n);
      break;
    case N_COPY2D: r = copy2d(&n->u.copy2d, true); break;
    case N_EVENT_RECORD:
      pthread_mutex_lock(&lock);
      if (event_alive(n->u.event)) event_time(n->u.event);
      else r = CUDA_ERROR_INVALID_HANDLE;
      pthread_mutex_unlock(&lock);
      break;
    case N_EVENT_WAIT: break; /* what it waits for has run (one thing at a time) */
    case N_HOST: run_host(n->u.host.fn, n->u.host.data); break;
    case N_GRAPH: r = body_run(n->u.graph); break;
    }
    if (r != CUDA_SUCCESS) {
      fprintf(stderr, "moec emu: a graph launch stopped at node %zu of %zu (a %s): %s%s\n", i, b->n,
              node_names[n->kind], error_name(r),
              n->kind == N_EVENT_RECORD ? " (its event was destroyed)" : "");
      return r;
    }
  }
  return CUDA_SUCCESS;
}

CUresult cuGraphLaunch(CUgraphExec x, CUstream s) {
  NEED_CONTEXT();
  if (!x) return CUDA_ERROR_INVALID_VALUE;
  pthread_mutex_lock(&lock);
  capture *c;
  CUresult r = route(s, "cuGraphLaunch", &c);
  if (r == CUDA_SUCCESS && c) {
    node nd = {.kind = N_GRAPH, .u.graph = x->b};
    if (add_node(c, s, &nd)) x->b->refs++;
    else r = CUDA_ERROR_OUT_OF_MEMORY;
  } else if (r == CUDA_SUCCESS) {
    x->b->refs++; /* kept while it runs */
  }
  pthread_mutex_unlock(&lock);
  if (r != CUDA_SUCCESS || c) return r;
  r = body_run(x->b);
  body_unref(x->b);
  return r;
}

CUresult cuGraphExecDestroy(CUgraphExec x) {
  if (!x) return CUDA_ERROR_INVALID_VALUE;
  body_unref(x->b);
  free(x);
  return CUDA_SUCCESS;
}

CUresult cuGraphDestroy(CUgraph g) {
  if (!g) return CUDA_ERROR_INVALID_VALUE;
  body_unref(g->b);
  free(g);
  return CUDA_SUCCESS;
}
