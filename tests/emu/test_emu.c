/* test_emu.c — the emulated driver and NVRTC themselves (label emu): a CUDA
 * source compiled by the emulated NVRTC and launched by the emulated driver
 * computes what CUDA defines: block and warp reductions across barriers,
 * every shuffle and the ballot, kernels that macros define, 2-D and 3-D
 * grids; a divergent barrier fails its launch with a message instead of
 * hanging; a compile error comes back as NVRTC's log; fresh memory reads as
 * NaN; events made without timing have no elapsed time; a copy outside an
 * allocation is refused. Linked against the stand-ins directly. */
#include <cuda.h>
#include <math.h>
#include <nvrtc.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;
#define CHECK(cond, ...)                                                                       \
  do {                                                                                         \
    if (!(cond)) {                                                                             \
      failures++;                                                                              \
      printf("FAIL %s:%d: ", __FILE__, __LINE__);                                              \
      printf(__VA_ARGS__);                                                                     \
      printf("\n");                                                                            \
    }                                                                                          \
  } while (0)

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

  /* a divergent barrier fails the launch (no hang), and says so */
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

  if (failures) printf("%d failure(s)\n", failures);
  else printf("ok: the emulated driver and NVRTC\n");
  return failures != 0;
}
