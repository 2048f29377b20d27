// emu_device.h — the CUDA device dialect of templates/ as host C++, so that
// the stand-in NVRTC (fake_nvrtc.c) can compile a kernels.cu with the host's
// C++ compiler into a shared object that the stand-in driver (fake_cuda.c)
// loads and launches. The compiler includes this file first (-include).
//
// What a launch is here: the blocks of the grid run one after another; the
// threads of a block are fibers on one host thread, each run until it
// reaches a barrier (__syncthreads, or a warp collective such as
// __shfl_xor_sync, which is two barriers of its warp). A warp barrier opens
// when every live thread of the warp has reached it, a block barrier when
// every live thread of the block has; a thread that waits at one while the
// others wait at another, or have ended, is the divergence CUDA leaves
// undefined, and fails the launch. __shared__ variables are static: one copy,
// which the block running at the time owns; so is the dynamic shared memory
// (moert_emu_dyn_smem). Atomics are plain read-modify-writes (only one fiber
// runs at a time). The warp-level matrix instructions common.cuh wraps (mma,
// ldmatrix) are warp collectives computed by their PTX fragment layouts;
// cp.async copies at once.
//
// The module's interface to the stand-in driver (at the end of this file):
// moert_emu_kernel (a kernel's body by name), moert_emu_params (the sizes of
// its parameters, for a launch captured into a CUDA graph, whose argument
// values are copied at the capture) and moert_emu_launch.
//
// What it is not: a model of timing, of the memory model between blocks that
// run at once on a GPU (here they never do), or of floating-point contraction
// (no FMA unless the code asks for one). It checks what the kernels compute.
#ifndef MOERT_EMU_DEVICE_H
#define MOERT_EMU_DEVICE_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <type_traits>
#include <utility>

#ifdef MOERT_EMU_SCAN  /* fake_nvrtc.c's first pass finds the kernels by this word */
#define __global__ __moert_emu_global__
#else
#define __global__
#endif
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict
#define __launch_bounds__(...)
// templates/common.cuh takes the emulated forms of the warp-level matrix
// instructions (moert_emu_mma_*) under this
#define MOERT_EMU 1

struct uint3 {
  unsigned x, y, z;
};
typedef uint3 dim3;
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }

// min and max as CUDA's overloads (the same type on both sides)
#define MOERT_EMU_MINMAX(T)                                                                    \
  inline T min(T a, T b) { return b < a ? b : a; }                                             \
  inline T max(T a, T b) { return a < b ? b : a; }
MOERT_EMU_MINMAX(int)
MOERT_EMU_MINMAX(unsigned)
MOERT_EMU_MINMAX(long)
MOERT_EMU_MINMAX(unsigned long)
MOERT_EMU_MINMAX(long long)
MOERT_EMU_MINMAX(unsigned long long)
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
#undef MOERT_EMU_MINMAX

// bit casts and the rounding-explicit arithmetic (no contraction here anyway)
template <class To, class From> inline To moert_emu_bits(From v) {
  static_assert(sizeof(To) == sizeof(From), "a bit cast keeps the size");
  To r;
  memcpy(&r, &v, sizeof r);
  return r;
}
inline float __int_as_float(int v) { return moert_emu_bits<float>(v); }
inline float __uint_as_float(unsigned v) { return moert_emu_bits<float>(v); }
inline unsigned __float_as_uint(float f) { return moert_emu_bits<unsigned>(f); }
inline int __float_as_int(float f) { return moert_emu_bits<int>(f); }
inline long long __double_as_longlong(double d) { return moert_emu_bits<long long>(d); }
inline double __longlong_as_double(long long v) { return moert_emu_bits<double>(v); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v ? __builtin_clz((unsigned)v) : 32; }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline float __fmul_rn(float a, float b) {
  volatile float r = a * b;
  return r;
}
inline float __fadd_rn(float a, float b) {
  volatile float r = a + b;
  return r;
}
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }

// --- threads as fibers -------------------------------------------------------
namespace moert_emu {

enum { READY, AT_WARP, AT_BLOCK, DONE };
enum { MAX_THREADS = 1024, STACK_BYTES = 256 << 10 };

struct fiber {
  void *sp;  // its saved stack pointer (x86-64), or its context
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
  uint3 idx;
  int state, lane, warp;
  void *stack;
};

struct launch_state {
  fiber *fibers[MAX_THREADS];
  int nfibers;          // made so far (kept for later launches)
  int nthreads;         // in the running block
  fiber *cur;           // the fiber running now
  void *sched_sp;       // the scheduler's saved stack pointer
#if !defined(__x86_64__)
  ucontext_t sched_uc;
#endif
  void (*body)(void **);
  void **params;
  unsigned long long slots[MAX_THREADS / 32][32];  // warp exchange
  bool broken;          // divergence seen: the launch fails
  char why[256];
};
static launch_state S;

#if defined(__x86_64__)
// Switching stacks: saves the callee-saved registers, the SSE and x87
// control words and the stack pointer in *from, then restores them from to.
// Neither setjmp/longjmp nor swapcontext: a sanitizer intercepts those and
// would treat each switch as leaving the thread's stack (slow, and warned of).
extern "C" void moert_emu_switch(void **from, void *to);
asm(".text\n"
    ".local moert_emu_switch\n"
    ".type moert_emu_switch, @function\n"
    "moert_emu_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size moert_emu_switch, .-moert_emu_switch\n");
#endif

inline void switch_to_sched(fiber *f) {
#if defined(__x86_64__)
  moert_emu_switch(&f->sp, S.sched_sp);
#else
  swapcontext(&f->uc, &S.sched_uc);
#endif
}

inline void yield_at(int state) {
  fiber *f = S.cur;
  f->state = state;
  switch_to_sched(f);
}

static void fiber_main() {
  for (;;) {  // resumed by the scheduler: run one thread of a block, then park
    S.body(S.params);
    yield_at(DONE);
  }
}

// A fiber with its own stack (a guard page below it) that, resumed the first
// time, enters fiber_main.
static fiber *make_fiber() {
  fiber *f = (fiber *)calloc(1, sizeof(fiber));
  if (!f) return nullptr;
  size_t page = 4096, n = STACK_BYTES + page;
  void *mem = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) {
    free(f);
    return nullptr;
  }
  mprotect(mem, page, PROT_NONE);
  f->stack = mem;
#if defined(__x86_64__)
  // the frame moert_emu_switch pops: control words, six registers, then
  // fiber_main as the return address, above it a null one (16-byte aligned
  // as after a call)
  uint64_t *top = (uint64_t *)((char *)mem + n);
  uint64_t *sp = top - 9;
  unsigned cw[2];
  asm volatile("stmxcsr %0\n fnstcw %1" : "=m"(cw[0]), "=m"(cw[1]));
  memcpy(sp, cw, 8);
  for (int i = 1; i <= 6; i++) sp[i] = 0;
  sp[7] = (uint64_t)(uintptr_t)&fiber_main;
  sp[8] = 0;
  f->sp = sp;
#else
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = (char *)mem + page;
  f->uc.uc_stack.ss_size = STACK_BYTES;
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, fiber_main, 0);
#endif
  return f;
}

inline void resume(fiber *f) {
  S.cur = f;
  f->state = READY;
#if defined(__x86_64__)
  moert_emu_switch(&S.sched_sp, f->sp);
#else
  swapcontext(&S.sched_uc, &f->uc);
#endif
}

}  // namespace moert_emu

static uint3 blockIdx;
static dim3 blockDim, gridDim;
static const int warpSize = 32;
#define threadIdx (moert_emu::S.cur->idx)

inline void __syncthreads() { moert_emu::yield_at(moert_emu::AT_BLOCK); }
inline void __syncwarp(unsigned = 0xffffffffu) { moert_emu::yield_at(moert_emu::AT_WARP); }
inline void __threadfence() {}
inline void __threadfence_block() {}

namespace moert_emu {
// The value of lane src of this warp (this thread's own where src is out of
// its segment of width lanes), every live lane of the warp taking part.
template <class T> inline T exchange(T v, int src) {
  fiber *f = S.cur;
  unsigned long long *slot = S.slots[f->warp];
  static_assert(sizeof(T) <= 8, "a warp exchange moves at most 8 bytes");
  memcpy(&slot[f->lane], &v, sizeof v);
  yield_at(AT_WARP);
  T r;
  memcpy(&r, &slot[src], sizeof r);
  yield_at(AT_WARP);
  return r;
}
// CUDA's rule for xor and down: a source in a later segment of width lanes
// gives this thread its own value (an earlier one is read).
inline int segment_src(int lane, int src, int width) {
  return src < (lane & ~(width - 1)) + width ? src : lane;
}
}  // namespace moert_emu

template <class T> inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  int lane = moert_emu::S.cur->lane;
  return moert_emu::exchange(v, moert_emu::segment_src(lane, lane ^ mask, width));
}
template <class T> inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
  int lane = moert_emu::S.cur->lane;
  return moert_emu::exchange(v, (lane & ~(width - 1)) + (src & (width - 1)));
}
template <class T> inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  int lane = moert_emu::S.cur->lane;
  int src = (lane & (width - 1)) >= (int)delta ? lane - (int)delta : lane;
  return moert_emu::exchange(v, src);
}
template <class T> inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  int lane = moert_emu::S.cur->lane;
  return moert_emu::exchange(v, moert_emu::segment_src(lane, lane + (int)delta, width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  moert_emu::fiber *f = moert_emu::S.cur;
  unsigned long long *slot = moert_emu::S.slots[f->warp];
  slot[f->lane] = pred != 0;
  moert_emu::yield_at(moert_emu::AT_WARP);
  unsigned r = 0;
  int base = f->warp * 32;
  for (int l = 0; l < 32 && base + l < moert_emu::S.nthreads; l++)
    if ((mask >> l & 1u) && moert_emu::S.fibers[base + l]->state != moert_emu::DONE && slot[l])
      r |= 1u << l;
  moert_emu::yield_at(moert_emu::AT_WARP);
  return r;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 as the PTX ISA lays
// out its fragments (groupID g = lane >> 2, threadID_in_group t = lane % 4;
// a register's first element in its low 16 bits):
//   A (16 x 16, row): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..2t+1],
//                     a[2] = A[g][2t+8..2t+9], a[3] = A[g+8][2t+8..2t+9]
//   B (16 x 8, col):  b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]
//   C, D (16 x 8):    c[0] = C[g][2t], c[1] = C[g][2t+1], c[2] = C[g+8][2t],
//                     c[3] = C[g+8][2t+1]
// Each lane posts its fragments, the warp meets, each lane computes its own
// four elements of D = A B + C (products exact, summed in fp32 in k order),
// the warp meets again (the posts may then be overwritten). c += A B.
namespace moert_emu {
struct mma_post {
  unsigned a[4], b[2];
};
static mma_post mma_posts[MAX_THREADS / 32][32];
inline float bf16_at(unsigned reg, int hi) { return __uint_as_float((hi ? reg >> 16 : reg & 0xffffu) << 16); }
}  // namespace moert_emu

inline void moert_emu_mma_m16n8k16_bf16(float *c, const unsigned *a, const unsigned *b) {
  using namespace moert_emu;
  fiber *f = S.cur;
  mma_post *w = mma_posts[f->warp];
  memcpy(w[f->lane].a, a, sizeof w[f->lane].a);
  memcpy(w[f->lane].b, b, sizeof w[f->lane].b);
  yield_at(AT_WARP);
  int g = f->lane >> 2, t = f->lane & 3;
  float d[4];
  for (int i = 0; i < 4; i++) {
    int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    float acc = c[i];
    for (int k = 0; k < 16; k++) {
      // A[row][k]: lane (row % 8) * 4 + (k % 8) / 2, register (row >= 8) + 2 (k >= 8)
      float av = bf16_at(w[(row & 7) * 4 + (k & 7) / 2].a[(row >= 8) + 2 * (k >= 8)], k & 1);
      // B[k][col]: lane col * 4 + (k % 8) / 2, register k >= 8
      float bv = bf16_at(w[col * 4 + (k & 7) / 2].b[k >= 8], k & 1);
      acc += av * bv;
    }
    d[i] = acc;
  }
  yield_at(AT_WARP);
  for (int i = 0; i < 4; i++) c[i] = d[i];
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l posts the address
// of row l % 8 of matrix l / 8; the warp meets; lane l takes of matrix i the
// elements (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1) (trans: (2 (l % 4),
// l / 4) and (2 (l % 4) + 1, l / 4)), the first in the low half of r[i]; the
// warp meets again.
namespace moert_emu {
static const void *ldsm_rows[MAX_THREADS / 32][32];
}  // namespace moert_emu

inline void moert_emu_ldmatrix_x4(unsigned *r, const void *row, bool trans) {
  using namespace moert_emu;
  fiber *f = S.cur;
  const void **rows = ldsm_rows[f->warp];
  rows[f->lane] = row;
  yield_at(AT_WARP);
  int g = f->lane >> 2, t = f->lane & 3;
  unsigned out[4];
  for (int i = 0; i < 4; i++) {
    uint16_t e[2];
    for (int h = 0; h < 2; h++) {
      int rr = trans ? 2 * t + h : g, cc = trans ? g : 2 * t + h;
      memcpy(&e[h], (const char *)rows[8 * i + rr] + 2 * cc, 2);
    }
    out[i] = (unsigned)e[0] | ((unsigned)e[1] << 16);
  }
  yield_at(AT_WARP);
  for (int i = 0; i < 4; i++) r[i] = out[i];
}

// Dynamic shared memory: one buffer of the most a kernel may ask for
// (fake_cuda.c's launch refuses more, and more than 48 KB where
// cuFuncSetAttribute did not allow it), owned by the block running.
#define MOERT_EMU_DYN_SMEM (227 * 1024)
namespace moert_emu {
alignas(16) static unsigned char dyn_smem[MOERT_EMU_DYN_SMEM];
}  // namespace moert_emu
inline void *moert_emu_dyn_smem() { return moert_emu::dyn_smem; }

template <class T> inline T atomicAdd(T *p, T v) {
  T old = *p;
  *p = old + v;
  return old;
}
template <class T> inline T atomicMax(T *p, T v) {
  T old = *p;
  if (old < v) *p = v;
  return old;
}
template <class T> inline T atomicMin(T *p, T v) {
  T old = *p;
  if (v < old) *p = v;
  return old;
}
template <class T> inline T atomicExch(T *p, T v) {
  T old = *p;
  *p = v;
  return old;
}
template <class T> inline T atomicCAS(T *p, T cmp, T v) {
  T old = *p;
  if (old == cmp) *p = v;
  return old;
}

namespace moert_emu {

// Runs the threads of the block now in blockIdx to their end; false (and
// S.why) when they diverge on a barrier.
static bool run_block(int nthreads) {
  S.nthreads = nthreads;
  for (int i = 0; i < nthreads; i++) {
    fiber *f = S.fibers[i];
    f->idx.x = (unsigned)i % blockDim.x;
    f->idx.y = (unsigned)i / blockDim.x % blockDim.y;
    f->idx.z = (unsigned)i / (blockDim.x * blockDim.y);
    f->lane = i & 31;
    f->warp = i >> 5;
    f->state = READY;
  }
  for (;;) {
    for (int i = 0; i < nthreads; i++)
      if (S.fibers[i]->state == READY) resume(S.fibers[i]);
    // every thread now waits at a barrier or has ended: open what can open
    bool opened = false, any_block = false, any_warp = false;
    for (int w = 0; w * 32 < nthreads; w++) {
      int n = 0, waiting = 0;
      for (int i = w * 32; i < nthreads && i < w * 32 + 32; i++) {
        int s = S.fibers[i]->state;
        if (s == DONE) continue;
        n++;
        waiting += s == AT_WARP;
        any_block |= s == AT_BLOCK;
      }
      if (waiting && waiting == n) {
        for (int i = w * 32; i < nthreads && i < w * 32 + 32; i++)
          if (S.fibers[i]->state == AT_WARP) S.fibers[i]->state = READY;
        opened = true;
      }
      any_warp |= waiting > 0;
    }
    if (opened) continue;
    if (any_warp) {
      snprintf(S.why, sizeof S.why,
               "block (%u,%u,%u): a warp collective that not every live thread of its warp reaches "
               "(some wait at __syncthreads or have returned)",
               blockIdx.x, blockIdx.y, blockIdx.z);
      return false;
    }
    if (!any_block) return true;  // all ended
    for (int i = 0; i < nthreads; i++)
      if (S.fibers[i]->state == AT_BLOCK) S.fibers[i]->state = READY;
  }
}

// Launches body over the grid; 0, or 1 with the reason in why.
static int launch(void (*body)(void **), void **params, const unsigned g[3], const unsigned b[3],
                  char *why, size_t cap) {
  long long nthreads = (long long)b[0] * b[1] * b[2];
  if (nthreads < 1 || nthreads > MAX_THREADS || !g[0] || !g[1] || !g[2]) {
    snprintf(why, cap, "bad launch shape: grid (%u,%u,%u), block (%u,%u,%u)", g[0], g[1], g[2], b[0],
             b[1], b[2]);
    return 1;
  }
  if (S.broken) {
    snprintf(why, cap, "an earlier launch of this module diverged: %s", S.why);
    return 1;
  }
  while (S.nfibers < nthreads) {
    fiber *f = make_fiber();
    if (!f) {
      snprintf(why, cap, "out of host memory for the threads of a block");
      return 1;
    }
    S.fibers[S.nfibers++] = f;
  }
  S.body = body;
  S.params = params;
  gridDim = dim3{g[0], g[1], g[2]};
  blockDim = dim3{b[0], b[1], b[2]};
  for (unsigned z = 0; z < g[2]; z++)
    for (unsigned y = 0; y < g[1]; y++)
      for (unsigned x = 0; x < g[0]; x++) {
        blockIdx = uint3{x, y, z};
        if (!run_block((int)nthreads)) {
          S.broken = true;  // fibers stay parked mid-kernel: this module is done
          snprintf(why, cap, "%s", S.why);
          return 1;
        }
      }
  return 0;
}

// Each kernel: a body that reads its arguments from cuLaunchKernel's
// kernelParams (one pointer per parameter) and calls the kernel; and the
// size of each parameter, which a launch captured into a graph copies.
template <class T> struct kernel_fn;
template <class... A> struct kernel_fn<void (*)(A...)> {
  template <void (*F)(A...), size_t... I> static void call(void **p, std::index_sequence<I...>) {
    F(*static_cast<std::remove_reference_t<A> *>(p[I])...);
  }
  template <void (*F)(A...)> static void body(void **p) { call<F>(p, std::index_sequence_for<A...>{}); }
  // The number of parameters; the first cap of their sizes into sizes.
  static int sizes(size_t *sizes, int cap) {
    const size_t s[] = {sizeof(std::remove_reference_t<A>)..., 0};
    const int n = (int)sizeof...(A);
    for (int i = 0; i < n && i < cap; i++) sizes[i] = s[i];
    return n;
  }
};

struct entry {
  const char *name;
  void (*body)(void **);
  int (*sizes)(size_t *, int);
};
static entry table[512];
static int ntable;
struct reg {
  reg(const char *name, void (*body)(void **), int (*sizes)(size_t *, int)) {
    if (ntable < (int)(sizeof table / sizeof table[0])) table[ntable++] = entry{name, body, sizes};
  }
};

}  // namespace moert_emu

// The module's interface to the stand-in driver (fake_cuda.c).
extern "C" __attribute__((visibility("default"))) void *moert_emu_kernel(const char *name) {
  for (int i = 0; i < moert_emu::ntable; i++)
    if (!strcmp(moert_emu::table[i].name, name)) return (void *)moert_emu::table[i].body;
  return nullptr;
}
// The number of parameters of the kernel body (moert_emu_kernel's), the first
// cap of their sizes in bytes into sizes; -1 for a body not of this module.
extern "C" __attribute__((visibility("default"))) int moert_emu_params(void *body, size_t *sizes, int cap) {
  for (int i = 0; i < moert_emu::ntable; i++)
    if ((void *)moert_emu::table[i].body == body) return moert_emu::table[i].sizes(sizes, cap);
  return -1;
}
extern "C" __attribute__((visibility("default"))) int moert_emu_launch(void *body, void **params,
                                                                       const unsigned grid[3],
                                                                       const unsigned block[3],
                                                                       char *why, size_t cap) {
  return moert_emu::launch((void (*)(void **))body, params, grid, block, why, cap);
}

// fake_nvrtc.c appends one of these per `extern "C" __global__ void NAME(` of the
// preprocessed source (macros may define kernels).
#define MOERT_EMU_KERNEL(f)                                                                    \
  static moert_emu::reg moert_emu_reg_##f(#f, &moert_emu::kernel_fn<decltype(&f)>::template body<&f>,    \
                                          &moert_emu::kernel_fn<decltype(&f)>::sizes);

#endif
