/* test_emu.c — the emulated driver and NVRTC themselves (label emu): a CUDA
 * source compiled by the emulated NVRTC and launched by the emulated driver
 * computes what CUDA defines: block and warp reductions across barriers,
 * every shuffle and the ballot, kernels that macros define, 2-D and 3-D
 * grids; a divergent barrier fails its launch with a message instead of
 * hanging; a compile error comes back as NVRTC's log; fresh memory reads as
 * NaN; events made without timing have no elapsed time; a copy outside an
 * allocation is refused. Stream capture and CUDA graphs: a captured sequence
 * of copies, memsets and launches does nothing at the capture and replays
 * on the memory of each launch, its kernel arguments copied by value; a fork
 * onto another stream and its join are captured; an unjoined fork, an end on
 * the wrong stream or thread, the unsafe calls (by capture mode and thread),
 * a wait on an event from outside or from another capture, the legacy
 * stream, a captured event used, each fail as CUDA fails and (but the thread)
 * invalidate the capture; external event records time each replay while
 * plain ones have no time; host functions run at each replay, own their data
 * and may not call CUDA; a graph launched in a capture runs as a child; an
 * executable graph outlives its graph. Linked against the stand-ins
 * directly. */
#include <cuda.h>
#include <math.h>
#include <nvrtc.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "emu_capture.h" /* moec_emu_launch_host_func_owned */

#include "../check.h"

static const char *src =
    "#define MOERT_KERNEL_PAIR(name, op) \\\n"
    "  extern \"C\" __global__ void name(const int *x, int *y, int n) { \\\n"
    "    int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) y[i] = x[i] op 3; }\n"
    "MOERT_KERNEL_PAIR(k_add3, +)\n"
    "MOERT_KERNEL_PAIR(k_mul3, *)\n"
    "// block sum of x over 2-D blocks, per block: warp shuffles, then shared memory\n"
    "extern \"C\" __global__ void k_block_sum(const double *x, double *out) {\n"
    "  __shared__ double sh[32];\n"
    "  int tid = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;\n"
    "  int b = blockIdx.y * gridDim.x + blockIdx.x;\n"
    "  double v = x[b * nt + tid];\n"
    "  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);\n"
    "  if ((tid & 31) == 0) sh[tid >> 5] = v;\n"
    "  __syncthreads();\n"
    "  if (tid == 0) { double s = 0; for (int w = 0; w < (nt + 31) / 32; w++) s += sh[w]; out[b] = s; }\n"
    "}\n"
    "// per lane: inclusive prefix sum by __shfl_up_sync, lane 5's value by __shfl_sync,\n"
    "// width-8 xor partner, ballot of odd lanes, popc\n"
    "extern \"C\" __global__ void k_warp(int *scan, int *bcast, int *xor8, unsigned *ballot, int *pop) {\n"
    "  int lane = threadIdx.x & 31, t = threadIdx.x, v = t + 1;\n"
    "  for (int d = 1; d < 32; d <<= 1) { int u = __shfl_up_sync(0xffffffffu, v, d); if (lane >= d) v += u; }\n"
    "  scan[t] = v;\n"
    "  bcast[t] = __shfl_sync(0xffffffffu, t * 10, 5);\n"
    "  xor8[t] = __shfl_xor_sync(0xffffffffu, t, 9, 8);\n"
    "  ballot[t] = __ballot_sync(0xffffffffu, lane & 1);\n"
    "  pop[t] = __popc(ballot[t]);\n"
    "}\n"
    "// a 3-D grid: each thread writes its global coordinates\n"
    "extern \"C\" __global__ void k_coords(int *out) {\n"
    "  int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y * blockDim.y + threadIdx.y;\n"
    "  int z = blockIdx.z * blockDim.z + threadIdx.z;\n"
    "  int w = gridDim.x * blockDim.x, h = gridDim.y * blockDim.y;\n"
    "  out[(z * h + y) * w + x] = x + 100 * y + 10000 * z;\n"
    "}\n"
    "// arguments of several sizes, a struct among them: y = p.a x + p.b + c + p.tag[1]\n"
    "struct emu_p { float a; int pad; double b; char tag[3]; };\n"
    "extern \"C\" __global__ void k_affine(const float *x, float *y, int n, emu_p p, float c) {\n"
    "  int i = blockIdx.x * blockDim.x + threadIdx.x;\n"
    "  if (i < n) y[i] = (float)(p.a * x[i] + p.b + c + p.tag[1]);\n"
    "}\n"
    "// divergent: only half the block reaches __syncthreads\n"
    "extern \"C\" __global__ void k_divergent(int *out) {\n"
    "  if (threadIdx.x < 16) { float s = __shfl_xor_sync(0xffffffffu, 1.0f, 1); out[threadIdx.x] = (int)s; }\n"
    "  else __syncthreads();\n"
    "}\n";

#define CU(call) CHECK((call) == CUDA_SUCCESS, "%s", #call)

static CUfunction fn(CUmodule m, const char *name) {
  CUfunction f = NULL;
  CHECK(cuModuleGetFunction(&f, m, name) == CUDA_SUCCESS, "no kernel %s", name);
  return f;
}

/* ------------------------------------------------------------ stream capture */

/* A call that must return want (its name and the result's on failure). */
#define EXPECT(want, call) expect_rc((call), (want), #call, __LINE__)
static void expect_rc(CUresult got, CUresult want, const char *call, int line) {
  if (got == want) return;
  const char *g = NULL, *w = NULL;
  cuGetErrorName(got, &g);
  cuGetErrorName(want, &w);
  g_fail++;
  fprintf(stderr, "%s:%d: FAIL: %s: %s (%d), want %s\n", __FILE__, line, call, g ? g : "?", (int)got, w ? w : "?");
}

static CUstreamCaptureStatus capture_status(CUstream s) {
  CUstreamCaptureStatus st = (CUstreamCaptureStatus)-1;
  EXPECT(CUDA_SUCCESS, cuStreamIsCapturing(s, &st));
  return st;
}

/* Ends the capture on s, which must fail with want and give no graph. */
static void end_fails(CUstream s, CUresult want) {
  CUgraph g = (CUgraph)&g;
  EXPECT(want, cuStreamEndCapture(s, &g));
  CHECK(g == NULL, "a failed cuStreamEndCapture gave a graph");
  CHECK(capture_status(s) == CU_STREAM_CAPTURE_STATUS_NONE, "the stream still captures after a failed end");
}

/* Ends the capture on s and instantiates it; the graph itself is destroyed
 * at once (the executable outlives it). */
static CUgraphExec end_exec(CUstream s) {
  CUgraph g = NULL;
  CUgraphExec x = NULL;
  EXPECT(CUDA_SUCCESS, cuStreamEndCapture(s, &g));
  if (!g) return NULL;
  EXPECT(CUDA_SUCCESS, cuGraphInstantiate(&x, g, 0));
  EXPECT(CUDA_SUCCESS, cuGraphDestroy(g));
  return x;
}

/* Captures y = p.a x + p.b + c + p.tag[1] on s with the arguments in this
 * frame, which is gone when the graph runs. */
struct emu_p {
  float a;
  int pad;
  double b;
  char tag[3];
};
static void capture_affine(CUfunction f, CUstream s, CUdeviceptr x, CUdeviceptr y, int n) {
  struct emu_p p = {2.5f, 0, -1.25, {0, 7, 0}};
  float c = 0.5f;
  void *args[] = {&x, &y, &n, &p, &c};
  EXPECT(CUDA_SUCCESS, cuLaunchKernel(f, (unsigned)(n + 63) / 64, 1, 1, 64, 1, 1, 0, s, args, NULL));
}

/* Writes over the stack where capture_affine's frame was. */
static int scribble(int depth) {
  volatile char junk[4096];
  memset((char *)junk, 0x5a, sizeof junk);
  return depth ? scribble(depth - 1) + junk[depth] : junk[0];
}

static int host_runs, host_frees;
static CUresult host_cuda_rc;
static void host_count(void *p) { (*(int *)p)++; }
static void host_free(void *p) {
  host_frees++;
  free(p);
}
static void host_calls_cuda(void *p) { host_cuda_rc = cuMemsetD8Async((CUdeviceptr)(uintptr_t)p, 0, 4, NULL); }

/* Another thread's capture, in mode, beside this thread's unsafe call. */
typedef struct {
  CUcontext ctx;
  CUstreamCaptureMode mode;
  pthread_barrier_t *bar;
  CUresult end;
} other_capture;
static void *other_thread(void *arg) {
  other_capture *o = arg;
  CUstream s;
  cuCtxSetCurrent(o->ctx);
  EXPECT(CUDA_SUCCESS, cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
  EXPECT(CUDA_SUCCESS, cuStreamBeginCapture(s, o->mode));
  pthread_barrier_wait(o->bar); /* the main thread calls now */
  pthread_barrier_wait(o->bar);
  CUgraph g = NULL;
  o->end = cuStreamEndCapture(s, &g);
  if (g) cuGraphDestroy(g);
  cuStreamDestroy(s);
  return NULL;
}
/* cuMemAlloc on this thread while another captures in mode: its result, and
 * that of the other's cuStreamEndCapture (*end). */
static CUresult alloc_beside(CUcontext ctx, CUstreamCaptureMode mode, CUresult *end) {
  pthread_barrier_t bar;
  pthread_barrier_init(&bar, NULL, 2);
  other_capture o = {ctx, mode, &bar, CUDA_SUCCESS};
  pthread_t t;
  pthread_create(&t, NULL, other_thread, &o);
  pthread_barrier_wait(&bar);
  CUdeviceptr d = 0;
  CUresult r = cuMemAlloc(&d, 64);
  if (r == CUDA_SUCCESS) cuMemFree(d);
  pthread_barrier_wait(&bar);
  pthread_join(t, NULL);
  pthread_barrier_destroy(&bar);
  *end = o.end;
  return r;
}

/* A capture begun on this thread (not RELAXED) ends from another. */
typedef struct {
  CUcontext ctx;
  CUstream s;
  CUresult r;
} ender;
static void *end_elsewhere(void *arg) {
  ender *e = arg;
  cuCtxSetCurrent(e->ctx);
  CUgraph g = NULL;
  e->r = cuStreamEndCapture(e->s, &g);
  if (g) cuGraphDestroy(g);
  return NULL;
}

static void test_capture(CUmodule mod, CUcontext ctx) {
  enum { N = 300, ROWS = 10, COLS = 30 };
  CUfunction mul3 = fn(mod, "k_mul3"), add3 = fn(mod, "k_add3"), affine = fn(mod, "k_affine");
  CUstream s1, s2;
  CU(cuStreamCreate(&s1, CU_STREAM_DEFAULT));
  CU(cuStreamCreate(&s2, CU_STREAM_DEFAULT));
  CUdeviceptr dx, dy, dz, dw, fx, fy;
  CU(cuMemAlloc(&dx, N * 4));
  CU(cuMemAlloc(&dy, N * 4));
  CU(cuMemAlloc(&dz, N * 4));
  CU(cuMemAlloc(&dw, N * 4));
  CU(cuMemAlloc(&fx, N * 4));
  CU(cuMemAlloc(&fy, N * 4));
  static int hin[N], hout[N], hout2[N], h2d[ROWS][2 * COLS];
  static float fin[N], fout[N];
  int bad;

  /* copies, memsets and launches: nothing at the capture, then each replay
   * on the memory of its launch; arguments by value */
  CU(cuMemsetD8(dy, 0x11, N * 4));
  memset(hout, 0xee, sizeof hout);
  memset(h2d, 0xee, sizeof h2d);
  CU(cuStreamBeginCapture(s1, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  CHECK(capture_status(s1) == CU_STREAM_CAPTURE_STATUS_ACTIVE, "s1 does not capture");
  CHECK(capture_status(s2) == CU_STREAM_CAPTURE_STATUS_NONE, "s2 captures");
  CU(cuMemcpyHtoDAsync(dx, hin, sizeof hin, s1));
  CU(cuMemcpyHtoDAsync(fx, fin, sizeof fin, s1));
  int n = N;
  CUdeviceptr a0 = dx, a1 = dy;
  void *args[] = {&a0, &a1, &n};
  CU(cuLaunchKernel(mul3, (N + 127) / 128, 1, 1, 128, 1, 1, 0, s1, args, NULL)); /* y = 3 x */
  n = 1, a0 = dw, a1 = dw; /* after the call: the graph keeps what it was given */
  CU(cuMemsetD8Async(dz, 0x22, N * 4, s1));
  CU(cuMemcpyDtoDAsync(dz, dy, N * 4, s1)); /* z = y */
  CU(cuMemsetD8Async(dw, 0, N * 4, s1));
  CUdeviceptr b0 = dz, b1 = dw;
  int m = N;
  void *args2[] = {&b0, &b1, &m};
  CU(cuLaunchKernel(add3, (N + 63) / 64, 1, 1, 64, 1, 1, 0, s1, args2, NULL)); /* w = z + 3 */
  m = 0;
  CU(cuMemcpyDtoHAsync(hout, dw, sizeof hout, s1));
  CUDA_MEMCPY2D c2 = {.srcMemoryType = CU_MEMORYTYPE_DEVICE, .srcDevice = dw, .srcPitch = COLS * 4,
                      .dstMemoryType = CU_MEMORYTYPE_HOST, .dstHost = h2d, .dstPitch = sizeof h2d[0],
                      .dstXInBytes = COLS * 4, .WidthInBytes = COLS * 4, .Height = ROWS};
  CU(cuMemcpy2DAsync(&c2, s1)); /* w's rows into the right halves of h2d's */
  c2.Height = 0;
  CU(cuMemsetD8Async(dw + 4, 0x01, 4, s1)); /* then w[1] = 0x01010101 */
  int hset[2] = {-1, -1};
  CU(cuMemcpyDtoHAsync(hset, dw, sizeof hset, s1));
  capture_affine(affine, s1, fx, fy, N);
  scribble(8);
  CU(cuMemcpyDtoHAsync(fout, fy, sizeof fout, s1));
  CUgraphExec seq = end_exec(s1);
  CHECK(capture_status(s1) == CU_STREAM_CAPTURE_STATUS_NONE, "s1 still captures");
  int untouched[N];
  CU(cuMemcpyDtoHAsync(untouched, dy, sizeof untouched, NULL));
  CHECK(untouched[0] == 0x11111111 && untouched[N - 1] == 0x11111111 && hout[0] == (int)0xeeeeeeee &&
            h2d[0][COLS] == (int)0xeeeeeeee && hset[1] == -1 && fout[0] == 0,
        "captured work ran at the capture");
  for (int rep = 0; rep < 2 && seq; rep++) {
    for (int i = 0; i < N; i++) hin[i] = (i * 7 + rep * 1000) % 501 - 250, fin[i] = (float)(i % 17) * (rep + 1);
    CU(cuGraphLaunch(seq, s1));
    CU(cuStreamSynchronize(s1));
    bad = 0;
    for (int i = 0; i < N; i++) bad += hout[i] != hin[i] * 3 + 3;
    CHECK(bad == 0, "replay %d: %d of w = 3 x + 3 wrong (hout[1] %d, want %d)", rep, bad, hout[1], hin[1] * 3 + 3);
    bad = 0;
    for (int r = 0; r < ROWS; r++)
      for (int c = 0; c < COLS; c++)
        bad += h2d[r][COLS + c] != hin[r * COLS + c] * 3 + 3 || h2d[r][c] != (int)0xeeeeeeee;
    CHECK(bad == 0, "replay %d: the 2-D copy: %d wrong", rep, bad);
    CHECK(hset[0] == hin[0] * 3 + 3 && hset[1] == 0x01010101, "replay %d: the memset: w[0..1] = %d %#x", rep, hset[0],
          (unsigned)hset[1]);
    bad = 0;
    for (int i = 0; i < N; i++) bad += fout[i] != (float)(2.5f * fin[i] + -1.25 + 0.5f + 7);
    CHECK(bad == 0, "replay %d: the struct argument: %d wrong (fout[3] %g, want %g)", rep, bad, fout[3],
          (float)(2.5f * fin[3] + -1.25 + 0.5f + 7));
  }
  if (seq) CU(cuGraphExecDestroy(seq));

  /* a fork onto s2 and its join, captured and replayed */
  CUevent fork, join, outside, never, e0, e1, ei, mark;
  CU(cuEventCreate(&fork, CU_EVENT_DISABLE_TIMING));
  CU(cuEventCreate(&join, CU_EVENT_DISABLE_TIMING));
  CU(cuEventCreate(&outside, CU_EVENT_DEFAULT));
  CU(cuEventCreate(&never, CU_EVENT_DEFAULT));
  CU(cuStreamBeginCapture(s1, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  CU(cuMemcpyHtoDAsync(dx, hin, sizeof hin, s1));
  CU(cuEventRecord(fork, s1));
  CU(cuStreamWaitEvent(s2, fork, 0));
  CHECK(capture_status(s2) == CU_STREAM_CAPTURE_STATUS_ACTIVE, "s2 did not join the capture");
  n = N;
  a0 = dx, a1 = dy;
  CU(cuLaunchKernel(mul3, (N + 127) / 128, 1, 1, 128, 1, 1, 0, s2, args, NULL)); /* s2: y = 3 x */
  b0 = dx, b1 = dz, m = N;
  CU(cuLaunchKernel(add3, (N + 127) / 128, 1, 1, 128, 1, 1, 0, s1, args2, NULL)); /* s1: z = x + 3 */
  CU(cuEventRecord(join, s2));
  CU(cuStreamWaitEvent(s1, join, 0));
  b0 = dy, b1 = dw;
  CU(cuLaunchKernel(add3, (N + 127) / 128, 1, 1, 128, 1, 1, 0, s1, args2, NULL)); /* w = y + 3 */
  CU(cuMemcpyDtoHAsync(hout, dw, sizeof hout, s1));
  CU(cuMemcpyDtoHAsync(hout2, dz, sizeof hout2, s1));
  CUgraphExec forked = end_exec(s1);
  CHECK(capture_status(s2) == CU_STREAM_CAPTURE_STATUS_NONE, "s2 still captures after the end");
  for (int rep = 0; rep < 2 && forked; rep++) {
    for (int i = 0; i < N; i++) hin[i] = i * (rep + 2) - 100;
    CU(cuGraphLaunch(forked, s1));
    bad = 0;
    for (int i = 0; i < N; i++) bad += hout[i] != hin[i] * 3 + 3 || hout2[i] != hin[i] + 3;
    CHECK(bad == 0, "fork and join, replay %d: %d wrong", rep, bad);
  }
  if (forked) CU(cuGraphExecDestroy(forked));

  /* a fork that does nothing needs no join */
  CU(cuStreamBeginCapture(s1, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  CU(cuMemsetD8Async(dz, 0, 4, s1));
  CU(cuEventRecord(fork, s1));
  CU(cuStreamWaitEvent(s2, fork, 0));
  CUgraphExec idle = end_exec(s1);
  if (idle) CU(cuGraphExecDestroy(idle));

  printf("(stream capture failure messages are expected next)\n");
  fflush(stdout);
  /* an unjoined fork */
  CU(cuStreamBeginCapture(s1, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  CU(cuEventRecord(fork, s1));
  CU(cuStreamWaitEvent(s2, fork, 0));
  CU(cuMemsetD8Async(dz, 0, 4, s2));
  CU(cuEventRecord(join, s2));
  CU(cuStreamWaitEvent(s1, join, 0));
  CU(cuMemsetD8Async(dz, 1, 4, s2)); /* after the join */
  end_fails(s1, CUDA_ERROR_STREAM_CAPTURE_UNJOINED);
  CHECK(capture_status(s2) == CU_STREAM_CAPTURE_STATUS_NONE, "s2 still captures after an unjoined end");
  CU(cuMemsetD8Async(dz, 0x33, 4, s2)); /* the stream works again, now */
  CU(cuMemcpyDtoHAsync(hout, dz, 4, NULL));
  CHECK(hout[0] == 0x33333333, "s2 after the failed capture: %#x", (unsigned)hout[0]);

  /* the end on a stream that joined, not the origin */
  CU(cuStreamBeginCapture(s1, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  CU(cuEventRecord(fork, s1));
  CU(cuStreamWaitEvent(s2, fork, 0));
  CUgraph g = NULL;
  EXPECT(CUDA_ERROR_STREAM_CAPTURE_UNMATCHED, cuStreamEndCapture(s2, &g));
  EXPECT(CUDA_ERROR_ILLEGAL_STATE, cuStreamBeginCapture(s2, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  end_fails(s1, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
  EXPECT(CUDA_ERROR_ILLEGAL_STATE, cuStreamEndCapture(s1, &g));

  /* unsafe calls invalidate the capture; work on its streams then fails */
  CU(cuStreamBeginCapture(s1, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  CUdeviceptr tmp = 0;
  EXPECT(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, cuMemAlloc(&tmp, 64));
  CHECK(capture_status(s1) == CU_STREAM_CAPTURE_STATUS_INVALIDATED, "cuMemAlloc did not invalidate the capture");
  EXPECT(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, cuMemsetD8Async(dz, 0, 4, s1));
  end_fails(s1, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
  CU(cuStreamBeginCapture(s1, CU_STREAM_CAPTURE_MODE_GLOBAL));
  EXPECT(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, cuStreamSynchronize(s1));
  end_fails(s1, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
  CU(cuStreamBeginCapture(s1, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  EXPECT(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, cuStreamSynchronize(s2)); /* another stream: still unsafe */
  end_fails(s1, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
  CU(cuStreamBeginCapture(s1, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  EXPECT(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, cuMemsetD8(dz, 0, 4));
  end_fails(s1, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
  CU(cuStreamBeginCapture(s1, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  EXPECT(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, cuMemFree(dz));
  end_fails(s1, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
  /* RELAXED: the unsafe calls are allowed, the capturing stream's synchronization is not */
  CU(cuStreamBeginCapture(s1, CU_STREAM_CAPTURE_MODE_RELAXED));
  EXPECT(CUDA_SUCCESS, cuMemAlloc(&tmp, 64));
  EXPECT(CUDA_SUCCESS, cuMemFree(tmp));
  CHECK(capture_status(s1) == CU_STREAM_CAPTURE_STATUS_ACTIVE, "RELAXED: cuMemAlloc invalidated the capture");
  EXPECT(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, cuStreamSynchronize(s1));
  end_fails(s1, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
  /* this thread in RELAXED mode, the capture not */
  CU(cuStreamBeginCapture(s1, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_RELAXED;
  CU(cuThreadExchangeStreamCaptureMode(&mode));
  CHECK(mode == CU_STREAM_CAPTURE_MODE_GLOBAL, "the thread's mode was %d, not GLOBAL", (int)mode);
  EXPECT(CUDA_SUCCESS, cuMemAlloc(&tmp, 64));
  EXPECT(CUDA_SUCCESS, cuMemFree(tmp));
  CU(cuThreadExchangeStreamCaptureMode(&mode));
  CU(cuMemsetD8Async(dz, 0, 4, s1));
  CUgraphExec relaxed = end_exec(s1);
  if (relaxed) CU(cuGraphExecDestroy(relaxed));
  /* another thread's capture: a GLOBAL one forbids this thread's unsafe calls, a THREAD_LOCAL one not */
  CUresult other_end;
  EXPECT(CUDA_SUCCESS, alloc_beside(ctx, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL, &other_end));
  EXPECT(CUDA_SUCCESS, other_end);
  EXPECT(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, alloc_beside(ctx, CU_STREAM_CAPTURE_MODE_GLOBAL, &other_end));
  EXPECT(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, other_end);
  /* ended from another thread */
  CU(cuStreamBeginCapture(s1, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  ender en = {ctx, s1, CUDA_SUCCESS};
  pthread_t t;
  pthread_create(&t, NULL, end_elsewhere, &en);
  pthread_join(t, NULL);
  EXPECT(CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD, en.r);
  CHECK(capture_status(s1) == CU_STREAM_CAPTURE_STATUS_ACTIVE, "an end from another thread ended the capture");
  CUgraphExec empty = end_exec(s1);
  if (empty) CU(cuGraphExecDestroy(empty));

  /* waits: on an event recorded outside the capture, of another capture,
   * never recorded; the legacy stream */
  CU(cuEventRecord(outside, s2));
  CU(cuStreamBeginCapture(s1, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  EXPECT(CUDA_ERROR_STREAM_CAPTURE_ISOLATION, cuStreamWaitEvent(s1, outside, 0));
  end_fails(s1, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
  CU(cuStreamBeginCapture(s1, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  CU(cuStreamBeginCapture(s2, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  CU(cuEventRecord(fork, s2));
  EXPECT(CUDA_ERROR_STREAM_CAPTURE_MERGE, cuStreamWaitEvent(s1, fork, 0));
  end_fails(s1, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
  end_fails(s2, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
  CU(cuStreamBeginCapture(s1, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  EXPECT(CUDA_SUCCESS, cuStreamWaitEvent(s1, never, 0));
  EXPECT(CUDA_SUCCESS, cuStreamWaitEvent(s1, outside, CU_EVENT_WAIT_EXTERNAL));
  CUstreamCaptureStatus st;
  EXPECT(CUDA_ERROR_STREAM_CAPTURE_IMPLICIT, cuStreamIsCapturing(NULL, &st));
  CHECK(capture_status(s1) == CU_STREAM_CAPTURE_STATUS_ACTIVE, "cuStreamIsCapturing(NULL) invalidated");
  EXPECT(CUDA_ERROR_STREAM_CAPTURE_IMPLICIT, cuMemsetD8Async(dz, 0, 4, NULL));
  end_fails(s1, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
  EXPECT(CUDA_ERROR_INVALID_VALUE, cuStreamWaitEvent(s1, outside, CU_EVENT_WAIT_EXTERNAL)); /* not capturing */

  /* events: external records time each replay; plain ones in a capture have no time */
  CU(cuEventCreate(&e0, CU_EVENT_DEFAULT));
  CU(cuEventCreate(&e1, CU_EVENT_DEFAULT));
  CU(cuEventCreate(&ei, CU_EVENT_DEFAULT));
  CU(cuEventCreate(&mark, CU_EVENT_DEFAULT));
  EXPECT(CUDA_ERROR_INVALID_VALUE, cuEventRecordWithFlags(e0, s1, CU_EVENT_RECORD_EXTERNAL)); /* not capturing */
  CU(cuEventRecord(ei, s1)); /* timed now; the capture's plain record takes that away */
  CU(cuStreamBeginCapture(s1, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  CU(cuEventRecordWithFlags(e0, s1, CU_EVENT_RECORD_EXTERNAL));
  a0 = dx, a1 = dy, n = N;
  CU(cuLaunchKernel(mul3, (N + 127) / 128, 1, 1, 128, 1, 1, 0, s1, args, NULL));
  CU(cuEventRecord(ei, s1));
  CU(cuLaunchKernel(mul3, (N + 127) / 128, 1, 1, 128, 1, 1, 0, s1, args, NULL));
  CU(cuEventRecordWithFlags(e1, s1, CU_EVENT_RECORD_EXTERNAL));
  CUgraphExec timed = end_exec(s1);
  float ms = -1, ms2 = -1;
  EXPECT(CUDA_ERROR_INVALID_HANDLE, cuEventElapsedTime(&ms, e0, e1)); /* not run yet */
  if (timed) {
    CU(cuGraphLaunch(timed, s1));
    CU(cuEventSynchronize(e1));
    CU(cuEventElapsedTime(&ms, e0, e1));
    CHECK(ms > 0, "external records around two launches: %g ms", ms);
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuEventElapsedTime(&ms2, ei, e1)); /* a plain record in a capture */
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuEventSynchronize(ei));
    CU(cuEventRecord(mark, s1));
    CU(cuGraphLaunch(timed, s1));
    CU(cuEventElapsedTime(&ms2, mark, e0));
    CHECK(ms2 >= 0, "the second replay did not time e0 again: %g ms after the mark", ms2);
    CU(cuEventElapsedTime(&ms2, e0, e1));
    CHECK(ms2 > 0, "second replay: %g ms", ms2);
    CU(cuGraphExecDestroy(timed));
  }
  /* a captured event, used while its capture goes on */
  CU(cuStreamBeginCapture(s1, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  CU(cuEventRecord(ei, s1));
  EXPECT(CUDA_ERROR_CAPTURED_EVENT, cuEventElapsedTime(&ms, mark, ei));
  end_fails(s1, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
  CU(cuStreamBeginCapture(s1, CU_STREAM_CAPTURE_MODE_RELAXED));
  CU(cuEventRecord(ei, s1));
  EXPECT(CUDA_ERROR_CAPTURED_EVENT, cuEventSynchronize(ei));
  end_fails(s1, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);

  /* host functions: at the call outside capture, at each replay in a graph,
   * their data freed with the graph's last holder; no CUDA calls in them */
  host_runs = host_frees = 0;
  CU(cuLaunchHostFunc(s1, host_count, &host_runs));
  CHECK(host_runs == 1, "cuLaunchHostFunc outside capture ran %d times", host_runs);
  CU(cuStreamBeginCapture(s1, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  CU(cuLaunchHostFunc(s1, host_count, &host_runs));
  int *owned = malloc(sizeof *owned);
  *owned = 0;
  CU(moec_emu_launch_host_func_owned(s1, host_count, owned, host_free));
  CUgraphExec hosts = end_exec(s1);
  CHECK(host_runs == 1 && *owned == 0, "host functions ran at the capture");
  if (hosts) {
    CU(cuGraphLaunch(hosts, s1));
    CU(cuGraphLaunch(hosts, s1));
    CHECK(host_runs == 3 && *owned == 2, "two replays ran the host functions %d and %d times", host_runs - 1,
          *owned);
    CHECK(host_frees == 0, "a host function's data freed while its graph lives");
    CU(cuGraphExecDestroy(hosts));
  }
  CHECK(host_frees == 1, "the owned data freed %d times with its graph", host_frees);
  host_cuda_rc = CUDA_SUCCESS;
  CU(cuLaunchHostFunc(s1, host_calls_cuda, (void *)(uintptr_t)dz));
  EXPECT(CUDA_ERROR_NOT_PERMITTED, host_cuda_rc);

  /* a graph launched in a capture: a child, run at each replay of its parent
   * (after its own executable is gone) */
  CU(cuStreamBeginCapture(s1, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  a0 = dx, a1 = dy, n = N;
  CU(cuLaunchKernel(mul3, (N + 127) / 128, 1, 1, 128, 1, 1, 0, s1, args, NULL));
  CUgraphExec child = end_exec(s1);
  CU(cuStreamBeginCapture(s1, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  CU(cuMemcpyHtoDAsync(dx, hin, sizeof hin, s1));
  if (child) CU(cuGraphLaunch(child, s1));
  CU(cuMemcpyDtoHAsync(hout, dy, sizeof hout, s1));
  CUgraphExec parent = end_exec(s1);
  if (child) CU(cuGraphExecDestroy(child));
  for (int rep = 0; rep < 2 && parent; rep++) {
    for (int i = 0; i < N; i++) hin[i] = i - rep * 77;
    CU(cuGraphLaunch(parent, s1));
    bad = 0;
    for (int i = 0; i < N; i++) bad += hout[i] != hin[i] * 3;
    CHECK(bad == 0, "a child graph, replay %d: %d wrong", rep, bad);
  }
  if (parent) CU(cuGraphExecDestroy(parent));

  /* a capturing stream is not destroyed */
  CU(cuStreamBeginCapture(s2, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  EXPECT(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, cuStreamDestroy(s2));
  end_fails(s2, CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);

  CUevent evs[] = {fork, join, outside, never, e0, e1, ei, mark};
  for (size_t i = 0; i < sizeof evs / sizeof evs[0]; i++) CU(cuEventDestroy(evs[i]));
  CU(cuStreamDestroy(s1));
  CU(cuStreamDestroy(s2));
}

int main(void) {
  CU(cuInit(0));
  CUdevice dev;
  CUcontext ctx;
  CU(cuDeviceGet(&dev, 0));
  CU(cuDevicePrimaryCtxRetain(&ctx, dev));
  CU(cuCtxSetCurrent(ctx));

  /* compile */
  nvrtcProgram prog;
  CHECK(nvrtcCreateProgram(&prog, src, "t.cu", 0, NULL, NULL) == NVRTC_SUCCESS, "create");
  const char *opts[] = {"--gpu-architecture=sm_90", "-lineinfo"};
  nvrtcResult rc = nvrtcCompileProgram(prog, 2, opts);
  size_t logn = 0;
  nvrtcGetProgramLogSize(prog, &logn);
  char *log = malloc(logn);
  nvrtcGetProgramLog(prog, log);
  CHECK(rc == NVRTC_SUCCESS, "compile: %s", log);
  free(log);
  size_t n = 0;
  nvrtcGetCUBINSize(prog, &n);
  char *image = malloc(n);
  nvrtcGetCUBIN(prog, image);
  nvrtcDestroyProgram(&prog);
  CUmodule mod = NULL;
  CU(cuModuleLoadData(&mod, image));
  free(image);
  if (!mod) return 1;
  CUfunction dummy;
  CHECK(cuModuleGetFunction(&dummy, mod, "k_absent") == CUDA_ERROR_NOT_FOUND, "an absent kernel");

  /* macro-defined kernels, a 1-D grid with a partial last block */
  enum { N = 1000 };
  int hx[N], hy[N];
  for (int i = 0; i < N; i++) hx[i] = rand() % 1000 - 500;
  CUdeviceptr dx, dy;
  CU(cuMemAlloc(&dx, sizeof hx));
  CU(cuMemAlloc(&dy, sizeof hy));
  CU(cuMemcpyHtoDAsync(dx, hx, sizeof hx, NULL));
  int nn = N;
  void *args[] = {&dx, &dy, &nn};
  CU(cuLaunchKernel(fn(mod, "k_mul3"), (N + 127) / 128, 1, 1, 128, 1, 1, 0, NULL, args, NULL));
  CU(cuMemcpyDtoHAsync(hy, dy, sizeof hy, NULL));
  int bad = 0;
  for (int i = 0; i < N; i++) bad += hy[i] != hx[i] * 3;
  CHECK(bad == 0, "k_mul3: %d wrong", bad);
  CU(cuLaunchKernel(fn(mod, "k_add3"), (N + 127) / 128, 1, 1, 128, 1, 1, 0, NULL, args, NULL));
  CU(cuMemcpyDtoHAsync(hy, dy, sizeof hy, NULL));
  bad = 0;
  for (int i = 0; i < N; i++) bad += hy[i] != hx[i] + 3;
  CHECK(bad == 0, "k_add3: %d wrong", bad);

  /* block sums: blocks of (32, 8), (64, 4) and (1024, 1), a 3x2 grid */
  unsigned shapes[3][2] = {{32, 8}, {64, 4}, {1024, 1}};
  for (int s = 0; s < 3; s++) {
    int nt = (int)(shapes[s][0] * shapes[s][1]), nb = 6;
    double *x = malloc(sizeof *x * (size_t)(nt * nb)), out[6], want[6] = {0};
    for (int i = 0; i < nt * nb; i++) {
      x[i] = (double)(rand() % 2001 - 1000) / 8;
      want[i / nt] += x[i];
    }
    CUdeviceptr d, o;
    CU(cuMemAlloc(&d, sizeof *x * (size_t)(nt * nb)));
    CU(cuMemAlloc(&o, sizeof out));
    CU(cuMemcpyHtoDAsync(d, x, sizeof *x * (size_t)(nt * nb), NULL));
    void *a[] = {&d, &o};
    CU(cuLaunchKernel(fn(mod, "k_block_sum"), 3, 2, 1, shapes[s][0], shapes[s][1], 1, 0, NULL, a, NULL));
    CU(cuMemcpyDtoHAsync(out, o, sizeof out, NULL));
    for (int b = 0; b < nb; b++)
      CHECK(out[b] == want[b], "block sum (%u,%u) block %d: %g, want %g", shapes[s][0], shapes[s][1], b,
            out[b], want[b]);
    free(x);
    CU(cuMemFree(d));
    CU(cuMemFree(o));
  }

  /* warp collectives over 2 warps */
  CUdeviceptr w[5];
  for (int i = 0; i < 5; i++) CU(cuMemAlloc(&w[i], 64 * 4));
  void *wa[] = {&w[0], &w[1], &w[2], &w[3], &w[4]};
  CU(cuLaunchKernel(fn(mod, "k_warp"), 1, 1, 1, 64, 1, 1, 0, NULL, wa, NULL));
  int scan[64], bc[64], x8[64], pop[64];
  unsigned ballot[64];
  CU(cuMemcpyDtoHAsync(scan, w[0], sizeof scan, NULL));
  CU(cuMemcpyDtoHAsync(bc, w[1], sizeof bc, NULL));
  CU(cuMemcpyDtoHAsync(x8, w[2], sizeof x8, NULL));
  CU(cuMemcpyDtoHAsync(ballot, w[3], sizeof ballot, NULL));
  CU(cuMemcpyDtoHAsync(pop, w[4], sizeof pop, NULL));
  for (int t = 0; t < 64; t++) {
    int lane = t & 31, base = t - lane, want = 0;
    for (int j = 0; j <= lane; j++) want += base + j + 1;
    CHECK(scan[t] == want, "scan[%d] = %d, want %d", t, scan[t], want);
    CHECK(bc[t] == (base + 5) * 10, "shfl[%d] = %d", t, bc[t]);
    /* xor 9 with width 8: CUDA reads lane ^ 9 when it is in this segment of
     * 8 lanes or an earlier one, and a later one gives the thread its own value */
    int partner = lane ^ 9;
    int want8 = base + (partner < (lane & ~7) + 8 ? partner : lane);
    CHECK(x8[t] == want8, "xor8[%d] = %d, want %d", t, x8[t], want8);
    CHECK(ballot[t] == 0xaaaaaaaau, "ballot[%d] = %08x", t, ballot[t]);
    CHECK(pop[t] == 16, "popc[%d] = %d", t, pop[t]);
  }

  /* a 3-D grid of 3-D blocks */
  enum { GX = 3, GY = 2, GZ = 2, BX = 8, BY = 4, BZ = 2, W = GX * BX, H = GY * BY, D = GZ * BZ };
  static int coords[D * H * W];
  CUdeviceptr dc;
  CU(cuMemAlloc(&dc, sizeof coords));
  void *ca[] = {&dc};
  CU(cuLaunchKernel(fn(mod, "k_coords"), GX, GY, GZ, BX, BY, BZ, 0, NULL, ca, NULL));
  CU(cuMemcpyDtoHAsync(coords, dc, sizeof coords, NULL));
  bad = 0;
  for (int z = 0; z < D; z++)
    for (int y = 0; y < H; y++)
      for (int x = 0; x < W; x++) bad += coords[(z * H + y) * W + x] != x + 100 * y + 10000 * z;
  CHECK(bad == 0, "3-D grid: %d wrong", bad);

  /* fresh memory reads as NaN (floats) */
  CUdeviceptr fresh;
  float f[4];
  CU(cuMemAlloc(&fresh, sizeof f));
  CU(cuMemcpyDtoHAsync(f, fresh, sizeof f, NULL));
  CHECK(isnan(f[0]) && isnan(f[3]), "fresh memory is not NaN: %g", f[0]);

  /* a copy past an allocation's end is refused */
  CHECK(cuMemcpyDtoHAsync(f, fresh, sizeof f + 4, NULL) != CUDA_SUCCESS, "a copy past the end");

  /* events without timing have no elapsed time; timed ones do */
  CUevent e0, e1, e2;
  CU(cuEventCreate(&e0, CU_EVENT_DISABLE_TIMING));
  CU(cuEventCreate(&e1, CU_EVENT_DEFAULT));
  CU(cuEventCreate(&e2, CU_EVENT_DEFAULT));
  CU(cuEventRecord(e0, NULL));
  CU(cuEventRecord(e1, NULL));
  float ms = -1;
  CHECK(cuEventElapsedTime(&ms, e1, e2) != CUDA_SUCCESS, "an event never recorded has a time");
  CU(cuEventRecord(e2, NULL));
  CHECK(cuEventElapsedTime(&ms, e0, e2) != CUDA_SUCCESS, "an untimed event has a time");
  CU(cuEventElapsedTime(&ms, e1, e2));
  CHECK(ms >= 0, "elapsed %g ms", ms);

  test_capture(mod, ctx);

  /* a divergent barrier fails the launch (no hang), and says so (the module
   * is done after it) */
  CUdeviceptr dd;
  CU(cuMemAlloc(&dd, 32 * 4));
  void *da[] = {&dd};
  printf("(a launch failure message is expected next)\n");
  fflush(stdout);
  CHECK(cuLaunchKernel(fn(mod, "k_divergent"), 1, 1, 1, 32, 1, 1, 0, NULL, da, NULL) == CUDA_ERROR_LAUNCH_FAILED,
        "a divergent barrier launched");

  /* a compile error comes back in the log */
  CHECK(nvrtcCreateProgram(&prog, "extern \"C\" __global__ void k(int *x) { x[0] = undefined_name; }", "bad.cu",
                           0, NULL, NULL) == NVRTC_SUCCESS,
        "create");
  CHECK(nvrtcCompileProgram(prog, 0, NULL) == NVRTC_ERROR_COMPILATION, "a broken source compiled");
  nvrtcGetProgramLogSize(prog, &logn);
  log = malloc(logn);
  nvrtcGetProgramLog(prog, log);
  CHECK(strstr(log, "undefined_name") != NULL, "the log does not name the error: %s", log);
  free(log);
  nvrtcDestroyProgram(&prog);

  CU(cuModuleUnload(mod));
  CU(cuDevicePrimaryCtxRelease(dev));

  printf("test_emu: %d passed, %d failed\n", g_pass, g_fail);
  return g_fail != 0;
}
