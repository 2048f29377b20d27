// common.cuh — the preamble of every moec kernel file: the helpers the op
// families share (warp, row-group and block reductions, 16-byte vector
// access, the ranking order of gate scores). The runtime compiles it with
// NVRTC followed by the .cu files of templates/ (runtime/backend_cuda.c);
// each .cu file also compiles alone after it (tests/gpu/test_nvrtc.c).
//
// NVRTC has no standard headers: nothing is included, integers are `int` and
// `long long`, and the math functions are NVRTC's built-ins.
//
// Launch conventions, which runtime/backend_cuda.c follows:
// - element-wise kernels: a 1-D grid-stride loop over the elements (over
//   float4s when every pointer is 16-byte aligned, then the tail);
// - row kernels: blockDim.x threads (a "row group", a multiple of 32, at most
//   1024) share one row; blockDim.y rows per block; a block walks rows
//   blockIdx.x*blockDim.y + threadIdx.y, stepping by gridDim.x*blockDim.y,
//   with the same trip count for every thread, so group reductions may use
//   __syncthreads;
// - column reductions: blockDim (32, 8); blockIdx.x a tile of 32 columns,
//   blockIdx.y a chunk of rows; one double per (chunk, column) in a partial
//   array, summed in chunk order by a finishing kernel: deterministic, and
//   sums in double as the cpu ops do.

#define MOERT_INF (__int_as_float(0x7f800000))
#define MOERT_INT32_MAX 2147483647
#define MOERT_FULL_MASK 0xffffffffu
// The largest row group and the most warps a block may have.
#define MOERT_MAX_WARPS 32
// The most rows a block of a row kernel holds (blockDim.y), and the shape of
// a column-reduction block.
#define MOERT_MAX_ROWS 8
#define MOERT_COL_TILE 32
#define MOERT_COL_ROWS 8

typedef unsigned long long moert_uptr;

__device__ __forceinline__ bool moert_aligned16(const void *p) {
  return ((moert_uptr)p & 15ull) == 0;
}

__device__ __forceinline__ float moert_warp_sum_f(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(MOERT_FULL_MASK, v, o);
  return v;
}

__device__ __forceinline__ double moert_warp_sum_d(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(MOERT_FULL_MASK, v, o);
  return v;
}

// NaN-ignoring maximum: NaN never wins (as `if (v > mx) mx = v`).
__device__ __forceinline__ double moert_warp_max_d(double v) {
  for (int o = 16; o > 0; o >>= 1) {
    double w = __shfl_xor_sync(MOERT_FULL_MASK, v, o);
    v = w > v ? w : v;
  }
  return v;
}

__device__ __forceinline__ float moert_warp_max_f(float v) {
  for (int o = 16; o > 0; o >>= 1) {
    float w = __shfl_xor_sync(MOERT_FULL_MASK, v, o);
    v = w > v ? w : v;
  }
  return v;
}

// The sum of v over the threads of this thread's row group (threadIdx.y),
// returned to every thread of the group. Every thread of the block must
// call it (it may synchronize). sh: MOERT_MAX_WARPS doubles per row of the
// block. The order of the additions is fixed: the result is deterministic.
__device__ double moert_group_sum_d(double v, double *sh) {
  v = moert_warp_sum_d(v);
  if (blockDim.x == 32) return v;
  int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  double *row = sh + threadIdx.y * MOERT_MAX_WARPS;
  __syncthreads(); // the previous call's readers are done with sh
  if (lane == 0) row[w] = v;
  __syncthreads();
  v = lane < nw ? row[lane] : 0.0;
  return moert_warp_sum_d(v);
}

// The NaN-ignoring maximum of v over the row group; as moert_group_sum_d.
__device__ double moert_group_max_d(double v, double *sh) {
  v = moert_warp_max_d(v);
  if (blockDim.x == 32) return v;
  int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  double *row = sh + threadIdx.y * MOERT_MAX_WARPS;
  __syncthreads();
  if (lane == 0) row[w] = v;
  __syncthreads();
  v = lane < nw ? row[lane] : -(double)MOERT_INF;
  return moert_warp_max_d(v);
}

// The sum of v over every thread of the block (1-D or 2-D), valid in thread
// 0. Every thread must call it. sh: MOERT_MAX_WARPS doubles.
__device__ double moert_block_sum_d(double v, double *sh) {
  int tid = threadIdx.y * blockDim.x + threadIdx.x;
  int nthreads = blockDim.x * blockDim.y;
  v = moert_warp_sum_d(v);
  __syncthreads();
  if ((tid & 31) == 0) sh[tid >> 5] = v;
  __syncthreads();
  if (tid < 32) {
    v = tid < (nthreads + 31) / 32 ? sh[tid] : 0.0;
    v = moert_warp_sum_d(v);
  }
  return v;
}

// True when score sa of index a ranks before score sb of index b: the larger
// first, equal scores by the lower index, NaN after every number (as the cpu
// ops' ranks_before).
__device__ __forceinline__ bool moert_ranks_before(float sa, long long a, float sb, long long b) {
  bool na = isnan(sa), nb = isnan(sb);
  if (na != nb) return nb;
  if (!na && sa != sb) return sa > sb;
  return a < b;
}

// A key whose unsigned order is the ranking order above for the score part:
// larger scores give smaller keys, -0 and +0 are one key, NaN the largest.
__device__ __forceinline__ unsigned moert_rank_key(float s) {
  if (isnan(s)) return 0xffffffffu;
  if (s == 0.0f) s = 0.0f;
  unsigned u = __float_as_uint(s);
  unsigned asc = (u & 0x80000000u) ? ~u : (u | 0x80000000u); // ascending order of floats
  return ~asc;
}

__device__ __forceinline__ long long moert_min64(long long a, long long b) { return a < b ? a : b; }

__device__ __forceinline__ long long moert_gtid() {
  return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long long moert_gstride() {
  return (long long)gridDim.x * blockDim.x;
}

// ---- bf16 as its 16 bits (bf16.cu, optim.cu): widened exactly, rounded to
// nearest even (the cpu's moert_f32_to_bf16), NaN kept quiet
typedef unsigned short moert_bf16;

__device__ __forceinline__ float moert_bf2f(moert_bf16 h) {
  return __uint_as_float((unsigned)h << 16);
}
__device__ __forceinline__ moert_bf16 moert_f2bf(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (moert_bf16)((u >> 16) | 0x40u);
  return (moert_bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// ---- the tensor cores (attention.cu): one warp-wide matrix product
// D = A B + C of shape m16n8k16, A and B bf16, C and D fp32, in the
// fragments of the PTX ISA's mma.m16n8k16 (with g = lane / 4, t = lane % 4):
// a[0..3] two bf16 each (low half first): A(g, 2t..2t+1), A(g+8, 2t..),
// A(g, 2t+8..), A(g+8, 2t+8..); b[0..1]: B(2t..2t+1, g), B(2t+8..2t+9, g);
// c[0..3]: C(g, 2t), C(g, 2t+1), C(g+8, 2t), C(g+8, 2t+1). Every lane of
// the warp must call it together (it is .sync.aligned). c is accumulated in
// place. The emulated stack (tests/emu/emu_device.h, MOERT_EMU) computes the
// same from the same fragments.
__device__ __forceinline__ void moert_mma_bf16(float *c, const unsigned *a, const unsigned *b) {
#ifdef MOERT_EMU
  moert_emu_mma_m16n8k16_bf16(c, a, b);
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
               "{%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Four 8 x 8 matrices of 16-bit elements from shared memory, a warp-wide
// ldmatrix.m8n8.x4: lane l gives the address of row l % 8 of matrix l / 8
// (16 bytes, 16-byte aligned); r[i] receives matrix i's elements (l / 4,
// 2 (l % 4)) and (l / 4, 2 (l % 4) + 1), the first in the low half: an mma
// fragment. _trans: the matrices transposed, r[i] = elements (2 (l % 4), l / 4)
// and (2 (l % 4) + 1, l / 4). Every lane of the warp calls it together.
__device__ __forceinline__ void moert_ldsm_x4(unsigned *r, const void *row) {
#ifdef MOERT_EMU
  moert_emu_ldmatrix_x4(r, row, false);
#else
  unsigned a = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#endif
}
__device__ __forceinline__ void moert_ldsm_x4_trans(unsigned *r, const void *row) {
#ifdef MOERT_EMU
  moert_emu_ldmatrix_x4(r, row, true);
#else
  unsigned a = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#endif
}

// 16 bytes global -> shared without the registers (cp.async, sm_80+; both
// addresses 16-byte aligned), in flight until this thread's
// moert_cp_async_wait<N> leaves at most N of its committed groups pending;
// other threads see the data after a barrier that follows the wait. The
// emulated stack copies at once.
__device__ __forceinline__ void moert_cp_async16(void *smem, const void *gmem) {
#ifdef MOERT_EMU
  memcpy(smem, gmem, 16);
#else
  unsigned a = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(a), "l"(gmem) : "memory");
#endif
}
// Closes this thread's group of cp.asyncs issued since the last commit.
__device__ __forceinline__ void moert_cp_async_commit() {
#ifndef MOERT_EMU
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N> __device__ __forceinline__ void moert_cp_async_wait() {
#ifndef MOERT_EMU
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// The block's dynamic shared memory (the launch's sharedMemBytes; above
// 48 KB only once cuFuncSetAttribute allowed the kernel as much), 16-byte
// aligned.
__device__ __forceinline__ void *moert_dyn_smem() {
#ifdef MOERT_EMU
  return moert_emu_dyn_smem();
#else
  extern __shared__ uint4 moert_dsmem[];
  return moert_dsmem;
#endif
}

// ---- activations (act.cu, bf16.cu): fp32 math
#define MOERT_GELU_K 0.7978845608028654f // sqrt(2/pi)
#define MOERT_GELU_C 0.044715f

enum { MOERT_RELU = 0, MOERT_GELU = 1, MOERT_SILU = 2, MOERT_TANH = 4 };

// sigmoid(z) and sigmoid(-z) = 1 - sigmoid(z), each without cancellation.
__device__ __forceinline__ void moert_sigmoid2(float z, float *s, float *sm) {
  float e = expf(-fabsf(z)), p = 1.0f / (1.0f + e);
  *s = z >= 0.0f ? p : e * p;
  *sm = z >= 0.0f ? e * p : p;
}

template <int A> __device__ __forceinline__ float moert_act(float x) {
  if (A == MOERT_RELU) return x > 0.0f ? x : 0.0f;
  if (A == MOERT_TANH) return tanhf(x);
  float s, sm;
  if (A == MOERT_GELU) { // 0.5 x (1 + tanh(u)) = x sigmoid(2u)
    moert_sigmoid2(2.0f * MOERT_GELU_K * (x + MOERT_GELU_C * x * x * x), &s, &sm);
    return x * s;
  }
  moert_sigmoid2(x, &s, &sm);
  return x * s;
}

// da * act'(x).
template <int A> __device__ __forceinline__ float moert_act_grad(float x, float da) {
  if (A == MOERT_RELU) return x > 0.0f ? da : 0.0f;
  if (A == MOERT_TANH) {
    float t = tanhf(x);
    return da * (1.0f - t * t);
  }
  float s, sm;
  if (A == MOERT_GELU) { // 0.5 (1 + t) + 0.5 x (1 - t^2) K (1 + 3 C x^2), t = tanh(u)
    moert_sigmoid2(2.0f * MOERT_GELU_K * (x + MOERT_GELU_C * x * x * x), &s, &sm);
    return da * (s + 2.0f * x * s * sm * MOERT_GELU_K * (1.0f + 3.0f * MOERT_GELU_C * x * x));
  }
  moert_sigmoid2(x, &s, &sm); // silu' = s (1 + x (1 - s))
  return da * (s + x * s * sm);
}

__device__ __forceinline__ float moert_silu(float x) { return moert_act<MOERT_SILU>(x); }

// ---- token slots (dispatch.cu, bf16.cu)
// The offset of claim tj's slot in [experts, capacity, dim], or -1 when the
// claim was dropped (loc >= capacity) or names no expert.
__device__ __forceinline__ long long moert_slot(const int *idx, const int *loc, long long tj,
                                                long long experts, long long capacity,
                                                long long dim) {
  long long e = idx[tj], c = loc[tj];
  if (e < 0 || e >= experts || c < 0 || c >= capacity) return -1;
  return (e * capacity + c) * dim;
}

// Column-chunk sums (see the conventions above): for the columns c of [0, w)
// of this block's tile and the rows of its chunk [blockIdx.y*rpc, +rpc),
// term(r, c, acc) adds each row's N terms to acc[0..N); the sums over the
// chunk go to part[i][blockIdx.y*w + c]. blockDim must be
// (MOERT_COL_TILE, MOERT_COL_ROWS).
template <int N, class F>
__device__ void moert_colsum_part(const F &term, long long rows, long long w, long long rpc,
                                  double *part0, double *part1) {
  __shared__ double sh[N][MOERT_COL_ROWS][MOERT_COL_TILE + 1];
  long long c = (long long)blockIdx.x * MOERT_COL_TILE + threadIdx.x;
  long long r0 = (long long)blockIdx.y * rpc, r1 = moert_min64(rows, r0 + rpc);
  double acc[N];
  for (int i = 0; i < N; i++) acc[i] = 0.0;
  if (c < w)
    for (long long r = r0 + threadIdx.y; r < r1; r += MOERT_COL_ROWS) term(r, c, acc);
  for (int i = 0; i < N; i++) sh[i][threadIdx.y][threadIdx.x] = acc[i];
  __syncthreads();
  if (threadIdx.y == 0 && c < w)
    for (int i = 0; i < N; i++) {
      double s = 0.0;
      for (int y = 0; y < MOERT_COL_ROWS; y++) s += sh[i][y][threadIdx.x];
      (i == 0 ? part0 : part1)[blockIdx.y * w + c] = s;
    }
}

// The sum over the nchunk chunks of column c, in chunk order.
__device__ __forceinline__ double moert_colsum_total(const double *part, long long nchunk,
                                                     long long w, long long c) {
  double s = 0.0;
  for (long long k = 0; k < nchunk; k++) s += part[k * w + c];
  return s;
}

// ------------------------------------------------- kernels shared by the ops

// out[c] = out[c] + (sum of column c of part), for c in [0, w): the
// accumulating parameter gradients and load statistics. 1-D, any block.
extern "C" __global__ void moert_k_colsum_add(float *out, const double *part, long long nchunk,
                                              long long w) {
  for (long long c = moert_gtid(); c < w; c += moert_gstride())
    out[c] = (float)((double)out[c] + moert_colsum_total(part, nchunk, w, c));
}

// out[0] = the sum of part[0..n), in a fixed order: the last step of every
// reduction to a scalar (losses, sums of squares, dots). One block of 1024.
extern "C" __global__ void moert_k_reduce_sum(const double *part, long long n, double *out) {
  __shared__ double sh[MOERT_MAX_WARPS];
  double s = 0.0;
  for (long long i = threadIdx.x; i < n; i += blockDim.x) s += part[i];
  s = moert_block_sum_d(s, sh);
  if (threadIdx.x == 0) out[0] = s;
}

// ------------------------------------------------- compile-time shapes
// The kernels of gating.cu, norm.cu and loss.cu are C++ templates over the
// model's constants (`template <int D> __device__ void moert_X_impl`): the
// generic extern "C" kernel moert_k_X instantiates them with 0 ("a runtime
// argument"), and kernels.cu, as moec emits it for a model
// (compiler/emit_cuda.c), adds moert_k_X__<key> instantiated with the
// layer's dims, which runtime/backend_cuda.c launches when the dims match.

// The row group backend_cuda.c's row_shape gives a row of d elements: 32 to
// 1024 threads, about d/8.
__host__ __device__ constexpr int moert_row_group(long long d) {
  int g = 32;
  while (g < 1024 && (long long)g * 8 < d) g *= 2;
  return g;
}

// A row kernel over rows of D elements (D == 0: unknown until the launch).
// With D known and small enough, each thread holds its PER elements of the
// row in registers between passes (CACHE), when the block has the row group
// moert_row_group(D) (launches of another shape take the generic path).
#define MOERT_ROW_CACHE_MAX 8
template <int D> struct moert_row {
  static constexpr int G = moert_row_group(D);
  static constexpr bool CACHE = D > 0 && (D + G - 1) / G <= MOERT_ROW_CACHE_MAX;
  static constexpr int PER = CACHE ? (D + G - 1) / G : 1; // elements a thread holds
};

// f(q, i) for the elements i of the row that this thread handles, in order
// (i = threadIdx.x + q*blockDim.x); q is a constant when the row is cached.
template <int D, class F>
__device__ __forceinline__ void moert_row_each(long long dim, const F &f) {
  if constexpr (moert_row<D>::CACHE) {
#pragma unroll
    for (int q = 0; q < moert_row<D>::PER; q++) {
      long long i = threadIdx.x + (long long)q * moert_row<D>::G;
      if (i < D) f(q, i);
    }
  } else {
    for (long long i = threadIdx.x; i < dim; i += blockDim.x) f(0, i);
  }
}
