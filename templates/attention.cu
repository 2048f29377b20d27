// attention.cu — RoPE, attention forward and backward, and generation's
// decode, in the way FlashAttention-2 computes attention: a block per
// (query tile, head, sequence), the key and value tiles streamed through
// shared memory, the softmax online in registers; nothing of size
// [seq, seq] is ever stored. Semantics: runtime/cpu_ops.h (qkv rows
// [(H + 2 KV) D], o rows [H D], lse [nseq, H, seq]; query head h reads
// key/value head h / (H / KV)).
//
// Two paths, by the storage type:
// - bf16 (moert_bf16 qkv, o, dout, dqkv): the products on the tensor cores,
//   mma.m16n8k16 bf16 x bf16 -> fp32 (common.cuh's moert_mma_bf16), 4 warps
//   of 16 rows (the forward: 2 m-tiles of 16 a warp below head dim 256); the
//   streamed tile's fragments read from shared memory by ldmatrix (x4,
//   transposed where the product runs along the tile's rows: P V, dS K),
//   the other operand's from registers (or ldmatrix). The softmax in fp32;
//   P (and dS in the backward) rounded to bf16 as the mma's operand, every
//   output rounded once where it is stored. Tiles come in by cp.async, the
//   next of one in flight while the other is used.
// - fp32: plain fp32 FMA, 8 lanes a row (each holding the elements
//   d = lane + 8 i of the row's vectors, D being a multiple of 8), the dot
//   products summed over the 8 lanes by shuffles.
//
// The backward: delta = rowsum(dO * O) first (into the scratch, laid out as
// lse); then dQ by a pass over the key tiles per query tile (as the forward,
// recomputing P from lse: no atomics, deterministic), and dK, dV by a pass
// over the query tiles (of every query head of the group) per key tile.
//
// Head dims: any multiple of 8 up to 256. Each kernel is instantiated for a
// largest head dim DM of 64, 128 and 256 (register arrays are sized by DM;
// the dims beyond D are zeros): D = 64 and 128 are the fast paths, the
// others run the instantiation of the next DM up.
//
// Launch (runtime/backend_cuda.c): bf16 kernels 128 threads, fp32 kernels
// 256, grids (tiles, heads, sequences). The bf16 forward's shared memory is
// dynamic (Q waits there; 70 KB at head dim 128, which cuFuncSetAttribute
// allows at the backend's start), the others' static, under 48 KB.

#define MOERT_LOG2E 1.4426950408889634
#define MOERT_LN2 0.6931471805599453f

// ---------------------------------------------------------------- helpers

template <class T> __device__ __forceinline__ float moert_ldf(const T *p, long long i);
template <> __device__ __forceinline__ float moert_ldf<float>(const float *p, long long i) { return p[i]; }
template <> __device__ __forceinline__ float moert_ldf<moert_bf16>(const moert_bf16 *p, long long i) {
  return moert_bf2f(p[i]);
}
template <class T> __device__ __forceinline__ void moert_stf(T *p, long long i, float v);
template <> __device__ __forceinline__ void moert_stf<float>(float *p, long long i, float v) { p[i] = v; }
template <> __device__ __forceinline__ void moert_stf<moert_bf16>(moert_bf16 *p, long long i, float v) {
  p[i] = moert_f2bf(v);
}

// The sum over the 8 lanes of this lane's row group (lanes 8k..8k+7).
__device__ __forceinline__ float moert_sum8(float v) {
  v += __shfl_xor_sync(MOERT_FULL_MASK, v, 1);
  v += __shfl_xor_sync(MOERT_FULL_MASK, v, 2);
  v += __shfl_xor_sync(MOERT_FULL_MASK, v, 4);
  return v;
}

// Two bf16 in a 32-bit register, the first in the low half (the order of
// an mma fragment's elements).
__device__ __forceinline__ unsigned moert_pack_bf(moert_bf16 lo, moert_bf16 hi) {
  return (unsigned)lo | ((unsigned)hi << 16);
}
__device__ __forceinline__ unsigned moert_pack_f(float lo, float hi) {
  return moert_pack_bf(moert_f2bf(lo), moert_f2bf(hi));
}

// The shapes of the bf16 kernels for a largest head dim DM.
template <int DM> struct moert_attn_shape {
  static constexpr int BM = 64;                  // query rows a block: 16 a warp
  static constexpr int BN = DM > 128 ? 32 : 64;  // key rows a tile (forward, dQ)
  static constexpr int BQ = DM > 64 ? 32 : 64;   // query rows a tile (dK, dV): registers allowing
  static constexpr int LD = DM + 8;              // shared row stride: 4 banks apart
};

// Rows [r0, r0 + R) of a [rows, ld] bf16 matrix (src at the first row's
// column 0, D columns read) into shared dst [R][LD], zeros beyond `rows` and
// beyond D (up to DM). Where every address allows it, 16-byte pieces by
// cp.async: the caller commits the group and waits for it (then a barrier)
// before reading; the other pieces are stored at once.
template <int R, int DM, int LD>
__device__ __forceinline__ void moert_tile_bf16(moert_bf16 *dst, const moert_bf16 *src, long long ld,
                                                long long r0, long long rows, int D, bool vec) {
  constexpr int PIECES = R * DM / 8;
  for (int p = threadIdx.x; p < PIECES; p += blockDim.x) {
    int r = p / (DM / 8), c = (p % (DM / 8)) * 8;
    long long gr = r0 + r;
    moert_bf16 *d = dst + r * LD + c;
    if (gr < rows && c < D) {
      const moert_bf16 *s = src + gr * ld + c;
      if (vec) {
        moert_cp_async16(d, s);
      } else {
        for (int e = 0; e < 8; e++) d[e] = s[e];
      }
    } else {
      *(uint4 *)d = make_uint4(0, 0, 0, 0);
    }
  }
}

// The same for fp32 into dst [R][DM].
template <int R, int DM>
__device__ __forceinline__ void moert_tile_f32(float *dst, const float *src, long long ld, long long r0,
                                               long long rows, int D) {
  constexpr int N = R * DM;
  for (int p = threadIdx.x; p < N; p += blockDim.x) {
    int r = p / DM, c = p % DM;
    long long gr = r0 + r;
    dst[p] = gr < rows && c < D ? src[gr * ld + c] : 0.0f;
  }
}

// A 16 x 16 A-fragment of rows ra, rb (= ra + 8) at columns [c, c + 16) of
// a global bf16 matrix (row pointers pa, pb; null for a row beyond the
// matrix), zeros at columns >= D.
__device__ __forceinline__ void moert_frag_a_global(unsigned *a, const moert_bf16 *pa, const moert_bf16 *pb,
                                                    int c, int D) {
  int tq = threadIdx.x & 3;
  int c0 = c + 2 * tq, c1 = c0 + 8;
  moert_bf16 z = 0;
  a[0] = pa && c0 < D ? moert_pack_bf(pa[c0], pa[c0 + 1]) : moert_pack_bf(z, z);
  a[1] = pb && c0 < D ? moert_pack_bf(pb[c0], pb[c0 + 1]) : moert_pack_bf(z, z);
  a[2] = pa && c1 < D ? moert_pack_bf(pa[c1], pa[c1 + 1]) : moert_pack_bf(z, z);
  a[3] = pb && c1 < D ? moert_pack_bf(pb[c1], pb[c1 + 1]) : moert_pack_bf(z, z);
}

// B-fragments of X^T where X is shared [n][LD] (row n, column k; k
// contiguous), x at (n0, k0): b[0..1] for the k-step [k0, k0 + 16) and
// b[2..3] for [k0 + 16, k0 + 32) of the n-tile [n0, n0 + 8). One ldmatrix.
template <int LD>
__device__ __forceinline__ void moert_frag_bt2(unsigned *b, const moert_bf16 *x) {
  int lane = threadIdx.x & 31;
  moert_ldsm_x4(b, x + (lane & 7) * LD + (lane >> 3) * 8);
}

// The A-fragment of the 16 x 16 block of shared X [row][LD] (k contiguous)
// at x. One ldmatrix.
template <int LD>
__device__ __forceinline__ void moert_frag_a2(unsigned *a, const moert_bf16 *x) {
  int lane = threadIdx.x & 31;
  moert_ldsm_x4(a, x + (((lane >> 3) & 1) * 8 + (lane & 7)) * LD + (lane >> 4) * 8);
}

// B-fragments of X where X is shared [k][LD] (row k, column n), x at (k0,
// n0): b[0..1] for the n-tile [n0, n0 + 8) and b[2..3] for [n0 + 8, n0 + 16)
// of the k-step [k0, k0 + 16). One ldmatrix, transposed.
template <int LD>
__device__ __forceinline__ void moert_frag_b2(unsigned *b, const moert_bf16 *x) {
  int lane = threadIdx.x & 31;
  moert_ldsm_x4_trans(b, x + (((lane >> 3) & 1) * 8 + (lane & 7)) * LD + (lane >> 4) * 8);
}

// The A-fragment of the 16 x 16 block [., 16 kk, 16 kk + 16) of a 16 x N
// accumulator c[N / 8][4] (rows of this warp), rounded to bf16: the
// accumulator's fragments are the operand's (FlashAttention-2's P V).
__device__ __forceinline__ void moert_frag_from_acc(unsigned *a, const float *c0, const float *c1) {
  a[0] = moert_pack_f(c0[0], c0[1]);
  a[1] = moert_pack_f(c0[2], c0[3]);
  a[2] = moert_pack_f(c1[0], c1[1]);
  a[3] = moert_pack_f(c1[2], c1[3]);
}

// ---------------------------------------------------------------- RoPE

// A thread per (token, pair i): the angle once, applied to every query and
// key head of the token, in double as the cpu op.
template <class T>
__device__ __forceinline__ void moert_rope_impl(T *qkv, long long tokens, long long seq, long long pos0,
                                                int H, int KV, int D, double base, int inverse) {
  const int half = D / 2;
  const long long W = (long long)(H + 2 * KV) * D, n = tokens * half;
  for (long long e = moert_gtid(); e < n; e += moert_gstride()) {
    long long t = e / half;
    int i = (int)(e % half);
    double pos = (double)(pos0 + t % seq);
    double ang = pos * pow(base, -2.0 * (double)i / (double)D);
    double c = (float)cos(ang), s = (float)sin(ang);
    if (inverse) s = -s;
    T *x = qkv + t * W + i;
    for (int h = 0; h < H + KV; h++, x += D) {
      double a = moert_ldf(x, 0), b = moert_ldf(x, half);
      moert_stf(x, 0, (float)(a * c - b * s));
      moert_stf(x, half, (float)(a * s + b * c));
    }
  }
}

extern "C" __global__ void moert_k_rope_f32(float *qkv, long long tokens, long long seq, long long pos0, int H,
                                            int KV, int D, double base, int inverse) {
  moert_rope_impl<float>(qkv, tokens, seq, pos0, H, KV, D, base, inverse);
}
extern "C" __global__ void moert_k_rope_bf16(moert_bf16 *qkv, long long tokens, long long seq, long long pos0,
                                             int H, int KV, int D, double base, int inverse) {
  moert_rope_impl<moert_bf16>(qkv, tokens, seq, pos0, H, KV, D, base, inverse);
}

// ---------------------------------------------------------------- forward, bf16

// The forward's shapes: MT m-tiles of 16 query rows a warp (4 warps), so
// that each K or V fragment read from shared memory feeds MT products; with
// MT > 1 Q waits in shared memory (its fragments by ldmatrix) instead of
// registers. Its shared memory is dynamic: (Q rows + 2 BN) LD bf16 —
// runtime/backend_cuda.c's attn_fwd_smem says the same.
template <int DM> struct moert_attn_fwd_shape {
  static constexpr int MT = DM > 128 ? 1 : 2;
  static constexpr int BM = 64 * MT, BN = moert_attn_shape<DM>::BN, LD = moert_attn_shape<DM>::LD;
  static constexpr bool QSMEM = MT > 1;
  static constexpr int QROWS = QSMEM ? BM : 0;
  static constexpr int SMEM_BYTES = (QROWS + 2 * BN) * LD * 2;
};

// Block (query tile blockIdx.x of BM, head blockIdx.y, sequence
// blockIdx.z), 4 warps of MT x 16 query rows; per key tile S = Q K^T on the
// tensor cores, masked, the online softmax, O += P V.
template <int DM>
__device__ __forceinline__ void moert_attn_fwd_bf16_impl(const moert_bf16 *qkv, moert_bf16 *o, float *lse,
                                                         long long seq, int H, int KV, int D, int causal) {
  typedef moert_attn_fwd_shape<DM> S;
  constexpr int MT = S::MT, BM = S::BM, BN = S::BN, LD = S::LD;
  moert_bf16 *Qs = (moert_bf16 *)moert_dyn_smem(), *Ks = Qs + S::QROWS * LD, *Vs = Ks + BN * LD;
  const int h = blockIdx.y, s = blockIdx.z, g = h / (H / KV);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gr = lane >> 2, tq = lane & 3;
  // causal: the last query tiles (the most keys) first
  const long long qt = causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const long long W = (long long)(H + 2 * KV) * D, q0 = qt * BM, w0 = q0 + warp * 16 * MT; // the warp's rows
  const moert_bf16 *rows = qkv + (long long)s * seq * W;
  const bool vec = moert_aligned16(qkv) && (W % 8) == 0;
  const float sl2 = (float)(MOERT_LOG2E / sqrt((double)D));

  unsigned qf[S::QSMEM ? 1 : DM / 16][4]; // Q's fragments when in registers (MT = 1)
  if constexpr (!S::QSMEM) {
    const long long r0 = w0 + gr, r1 = r0 + 8;
#pragma unroll
    for (int kk = 0; kk < DM / 16; kk++)
      moert_frag_a_global(qf[kk], r0 < seq ? rows + r0 * W + h * D : 0, r1 < seq ? rows + r1 * W + h * D : 0,
                          kk * 16, D);
  }
  float acc[MT][DM / 8][4], m[MT][2], l[MT][2];
#pragma unroll
  for (int t = 0; t < MT; t++) {
#pragma unroll
    for (int n = 0; n < DM / 8; n++) acc[t][n][0] = acc[t][n][1] = acc[t][n][2] = acc[t][n][3] = 0.0f;
    m[t][0] = m[t][1] = -MOERT_INF;
    l[t][0] = l[t][1] = 0.0f;
  }

  // K and V tiles in flight while the other is used: K(t+1) loads during
  // P V(t), V(t+1) during the next Q K^T (cp.async groups [Q] K0, V0, K1, ...)
  const long long kend = causal ? moert_min64(seq, q0 + BM) : seq;
  const moert_bf16 *ksrc = rows + (H + g) * D, *vsrc = rows + (H + KV + g) * D;
  if constexpr (S::QSMEM) moert_tile_bf16<S::QROWS, DM, LD>(Qs, rows + h * D, W, q0, seq, D, vec);
  moert_tile_bf16<BN, DM, LD>(Ks, ksrc, W, 0, seq, D, vec);
  moert_cp_async_commit();
  moert_tile_bf16<BN, DM, LD>(Vs, vsrc, W, 0, seq, D, vec);
  moert_cp_async_commit();
  for (long long k0 = 0; k0 < kend; k0 += BN) {
    const bool more = k0 + BN < kend;
    moert_cp_async_wait<1>(); // K(t) (and Q) here, V(t) may be in flight
    __syncthreads();
    float sc[MT][BN / 8][4];
#pragma unroll
    for (int t = 0; t < MT; t++)
#pragma unroll
      for (int j = 0; j < BN / 8; j++) sc[t][j][0] = sc[t][j][1] = sc[t][j][2] = sc[t][j][3] = 0.0f;
#pragma unroll
    for (int k2 = 0; k2 < DM / 32; k2++)
      if (k2 * 32 < D) {
        const bool two = k2 * 32 + 16 < D;
        unsigned a[MT][2][4]; // the k-steps 2 k2, 2 k2 + 1 of each m-tile
#pragma unroll
        for (int t = 0; t < MT; t++)
#pragma unroll
          for (int e = 0; e < 2; e++) {
            if constexpr (S::QSMEM)
              moert_frag_a2<LD>(a[t][e], Qs + (warp * MT + t) * 16 * LD + k2 * 32 + e * 16);
            else
              for (int i = 0; i < 4; i++) a[t][e][i] = qf[2 * k2 + e][i];
          }
#pragma unroll
        for (int j = 0; j < BN / 8; j++) {
          unsigned b[4];
          moert_frag_bt2<LD>(b, Ks + j * 8 * LD + k2 * 32);
#pragma unroll
          for (int t = 0; t < MT; t++) {
            moert_mma_bf16(sc[t][j], a[t][0], b);
            if (two) moert_mma_bf16(sc[t][j], a[t][1], b + 2);
          }
        }
      }
    // per m-tile: scaled to log2 units, masked (edge: the tile has keys beyond
    // the sequence or after one of the m-tile's rows); the rows' maxima over
    // the 4 lanes of a row; the online softmax's update
#pragma unroll
    for (int t = 0; t < MT; t++) {
      const long long r0 = w0 + t * 16 + gr, r1 = r0 + 8;
      const bool edge = k0 + BN > seq || (causal && k0 + BN - 1 > w0 + t * 16);
      float x0 = -MOERT_INF, x1 = -MOERT_INF;
#pragma unroll
      for (int j = 0; j < BN / 8; j++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
          long long kc = k0 + j * 8 + 2 * tq + (i & 1), r = i < 2 ? r0 : r1;
          float v = sc[t][j][i] * sl2;
          if (edge && (kc >= seq || (causal && kc > r))) v = -MOERT_INF;
          sc[t][j][i] = v;
          if (i < 2) x0 = fmaxf(x0, v);
          else x1 = fmaxf(x1, v);
        }
      x0 = fmaxf(x0, __shfl_xor_sync(MOERT_FULL_MASK, x0, 1));
      x0 = fmaxf(x0, __shfl_xor_sync(MOERT_FULL_MASK, x0, 2));
      x1 = fmaxf(x1, __shfl_xor_sync(MOERT_FULL_MASK, x1, 1));
      x1 = fmaxf(x1, __shfl_xor_sync(MOERT_FULL_MASK, x1, 2));
      float n0 = fmaxf(m[t][0], x0), n1 = fmaxf(m[t][1], x1);
      float b0 = n0 == -MOERT_INF ? 0.0f : n0, b1 = n1 == -MOERT_INF ? 0.0f : n1; // rows with no key yet
      float a0 = exp2f(m[t][0] - b0), a1 = exp2f(m[t][1] - b1);
      m[t][0] = n0, m[t][1] = n1;
      float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
      for (int j = 0; j < BN / 8; j++) {
        sc[t][j][0] = exp2f(sc[t][j][0] - b0), sc[t][j][1] = exp2f(sc[t][j][1] - b0);
        sc[t][j][2] = exp2f(sc[t][j][2] - b1), sc[t][j][3] = exp2f(sc[t][j][3] - b1);
        s0 += sc[t][j][0] + sc[t][j][1];
        s1 += sc[t][j][2] + sc[t][j][3];
      }
      l[t][0] = l[t][0] * a0 + s0, l[t][1] = l[t][1] * a1 + s1;
#pragma unroll
      for (int n = 0; n < DM / 8; n++)
        acc[t][n][0] *= a0, acc[t][n][1] *= a0, acc[t][n][2] *= a1, acc[t][n][3] *= a1;
    }
    __syncthreads(); // every warp is done with K(t)
    if (more) moert_tile_bf16<BN, DM, LD>(Ks, ksrc, W, k0 + BN, seq, D, vec);
    moert_cp_async_commit();
    moert_cp_async_wait<1>(); // V(t) here
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BN / 16; kk++) {
      unsigned a[MT][4];
#pragma unroll
      for (int t = 0; t < MT; t++) moert_frag_from_acc(a[t], sc[t][2 * kk], sc[t][2 * kk + 1]);
#pragma unroll
      for (int n2 = 0; n2 < DM / 16; n2++)
        if (n2 * 16 < D) {
          unsigned b[4];
          moert_frag_b2<LD>(b, Vs + kk * 16 * LD + n2 * 16);
#pragma unroll
          for (int t = 0; t < MT; t++) {
            moert_mma_bf16(acc[t][2 * n2], a[t], b);
            if (n2 * 16 + 8 < D) moert_mma_bf16(acc[t][2 * n2 + 1], a[t], b + 2);
          }
        }
    }
    __syncthreads(); // every warp is done with V(t)
    if (more) moert_tile_bf16<BN, DM, LD>(Vs, vsrc, W, k0 + BN, seq, D, vec);
    moert_cp_async_commit();
  }
  const long long HD = (long long)H * D;
#pragma unroll
  for (int t = 0; t < MT; t++) {
    const long long r0 = w0 + t * 16 + gr, r1 = r0 + 8;
    float l0 = l[t][0], l1 = l[t][1];
    l0 += __shfl_xor_sync(MOERT_FULL_MASK, l0, 1);
    l0 += __shfl_xor_sync(MOERT_FULL_MASK, l0, 2);
    l1 += __shfl_xor_sync(MOERT_FULL_MASK, l1, 1);
    l1 += __shfl_xor_sync(MOERT_FULL_MASK, l1, 2);
    float i0 = 1.0f / l0, i1 = 1.0f / l1;
#pragma unroll
    for (int n = 0; n < DM / 8; n++)
      if (n * 8 < D) {
        int c = n * 8 + 2 * tq;
        if (r0 < seq) {
          moert_bf16 *p = o + ((long long)s * seq + r0) * HD + h * D + c;
          p[0] = moert_f2bf(acc[t][n][0] * i0), p[1] = moert_f2bf(acc[t][n][1] * i0);
        }
        if (r1 < seq) {
          moert_bf16 *p = o + ((long long)s * seq + r1) * HD + h * D + c;
          p[0] = moert_f2bf(acc[t][n][2] * i1), p[1] = moert_f2bf(acc[t][n][3] * i1);
        }
      }
    if (tq == 0) {
      float *L = lse + ((long long)s * H + h) * seq;
      if (r0 < seq) L[r0] = m[t][0] * MOERT_LN2 + logf(l0);
      if (r1 < seq) L[r1] = m[t][1] * MOERT_LN2 + logf(l1);
    }
  }
}

// ---------------------------------------------------------------- backward dQ, bf16

// As the forward's block: per key tile S = Q K^T, P = exp(S - lse), dP =
// dO V^T, dS = P (dP - delta), dQ += dS K; dq = scale dQ written at the end.
template <int DM>
__device__ __forceinline__ void moert_attn_bwd_dq_bf16_impl(const moert_bf16 *qkv, const float *lse,
                                                            const float *delta, const moert_bf16 *dout,
                                                            moert_bf16 *dqkv, long long seq, int H, int KV,
                                                            int D, int causal) {
  typedef moert_attn_shape<DM> S;
  constexpr int BM = S::BM, BN = S::BN, LD = S::LD;
  __shared__ uint4 k_raw[BN * LD / 8], v_raw[BN * LD / 8];
  moert_bf16 *Ks = (moert_bf16 *)k_raw, *Vs = (moert_bf16 *)v_raw;
  const int h = blockIdx.y, s = blockIdx.z, g = h / (H / KV);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gr = lane >> 2, tq = lane & 3;
  const long long qt = causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x; // the longest first
  const long long W = (long long)(H + 2 * KV) * D, HD = (long long)H * D, q0 = qt * BM;
  const moert_bf16 *rows = qkv + (long long)s * seq * W, *drows = dout + (long long)s * seq * HD;
  const bool vec = moert_aligned16(qkv) && (W % 8) == 0;
  const long long r0 = q0 + warp * 16 + gr, r1 = r0 + 8;
  const double scale = 1.0 / sqrt((double)D);
  const float sl2 = (float)(MOERT_LOG2E * scale);

  unsigned qf[DM / 16][4], df[DM / 16][4];
#pragma unroll
  for (int kk = 0; kk < DM / 16; kk++) {
    moert_frag_a_global(qf[kk], r0 < seq ? rows + r0 * W + h * D : 0, r1 < seq ? rows + r1 * W + h * D : 0,
                        kk * 16, D);
    moert_frag_a_global(df[kk], r0 < seq ? drows + r0 * HD + h * D : 0, r1 < seq ? drows + r1 * HD + h * D : 0,
                        kk * 16, D);
  }
  const float *L = lse + ((long long)s * H + h) * seq, *De = delta + ((long long)s * H + h) * seq;
  // lse in log2 units; +inf beyond the sequence (P = 0 there)
  const float e0 = r0 < seq ? L[r0] * (float)MOERT_LOG2E : MOERT_INF;
  const float e1 = r1 < seq ? L[r1] * (float)MOERT_LOG2E : MOERT_INF;
  const float d0 = r0 < seq ? De[r0] : 0.0f, d1 = r1 < seq ? De[r1] : 0.0f;
  float acc[DM / 8][4];
#pragma unroll
  for (int n = 0; n < DM / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

  // V and K tiles in flight while the other is used (cp.async groups V0 K0
  // V1 K1 ...): dP = dO V^T first, then S = Q K^T and dQ += dS K; V(t+1)
  // loads during dS K, K(t+1) during the next dO V^T.
  const long long kend = causal ? moert_min64(seq, q0 + BM) : seq;
  const moert_bf16 *ksrc = rows + (H + g) * D, *vsrc = rows + (H + KV + g) * D;
  moert_tile_bf16<BN, DM, LD>(Vs, vsrc, W, 0, seq, D, vec);
  moert_cp_async_commit();
  moert_tile_bf16<BN, DM, LD>(Ks, ksrc, W, 0, seq, D, vec);
  moert_cp_async_commit();
  for (long long k0 = 0; k0 < kend; k0 += BN) {
    const bool more = k0 + BN < kend;
    moert_cp_async_wait<1>(); // V(t) here, K(t) may be in flight
    __syncthreads();
    float p[BN / 8][4], dp[BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; j++) {
#pragma unroll
      for (int i = 0; i < 4; i++) p[j][i] = dp[j][i] = 0.0f;
#pragma unroll
      for (int k2 = 0; k2 < DM / 32; k2++)
        if (k2 * 32 < D) {
          unsigned b[4];
          moert_frag_bt2<LD>(b, Vs + j * 8 * LD + k2 * 32);
          moert_mma_bf16(dp[j], df[2 * k2], b);
          if (k2 * 32 + 16 < D) moert_mma_bf16(dp[j], df[2 * k2 + 1], b + 2);
        }
    }
    moert_cp_async_wait<0>(); // K(t) here
    __syncthreads();
    const bool edge = k0 + BN > seq || (causal && k0 + BN - 1 > q0 + warp * 16); // a tile to mask
    if (more) moert_tile_bf16<BN, DM, LD>(Vs, vsrc, W, k0 + BN, seq, D, vec); // every warp is done with V(t)
    moert_cp_async_commit();
#pragma unroll
    for (int j = 0; j < BN / 8; j++) {
#pragma unroll
      for (int k2 = 0; k2 < DM / 32; k2++)
        if (k2 * 32 < D) {
          unsigned b[4];
          moert_frag_bt2<LD>(b, Ks + j * 8 * LD + k2 * 32);
          moert_mma_bf16(p[j], qf[2 * k2], b);
          if (k2 * 32 + 16 < D) moert_mma_bf16(p[j], qf[2 * k2 + 1], b + 2);
        }
#pragma unroll
      for (int i = 0; i < 4; i++) {
        long long kc = k0 + j * 8 + 2 * tq + (i & 1), r = i < 2 ? r0 : r1;
        float pv = exp2f(p[j][i] * sl2 - (i < 2 ? e0 : e1));
        if (edge && (kc >= seq || (causal && kc > r))) pv = 0.0f;
        dp[j][i] = pv * (dp[j][i] - (i < 2 ? d0 : d1)); // dS
      }
    }
#pragma unroll
    for (int kk = 0; kk < BN / 16; kk++) {
      unsigned a[4];
      moert_frag_from_acc(a, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
      for (int n2 = 0; n2 < DM / 16; n2++)
        if (n2 * 16 < D) {
          unsigned b[4];
          moert_frag_b2<LD>(b, Ks + kk * 16 * LD + n2 * 16);
          moert_mma_bf16(acc[2 * n2], a, b);
          if (n2 * 16 + 8 < D) moert_mma_bf16(acc[2 * n2 + 1], a, b + 2);
        }
    }
    __syncthreads(); // every warp is done with K(t)
    if (more) moert_tile_bf16<BN, DM, LD>(Ks, ksrc, W, k0 + BN, seq, D, vec);
    moert_cp_async_commit();
  }
  const float sc = (float)scale;
#pragma unroll
  for (int n = 0; n < DM / 8; n++)
    if (n * 8 < D) {
      int c = n * 8 + 2 * tq;
      if (r0 < seq) {
        moert_bf16 *q = dqkv + ((long long)s * seq + r0) * W + h * D + c;
        q[0] = moert_f2bf(acc[n][0] * sc), q[1] = moert_f2bf(acc[n][1] * sc);
      }
      if (r1 < seq) {
        moert_bf16 *q = dqkv + ((long long)s * seq + r1) * W + h * D + c;
        q[0] = moert_f2bf(acc[n][2] * sc), q[1] = moert_f2bf(acc[n][3] * sc);
      }
    }
}

// ---------------------------------------------------------------- backward dK dV, bf16

// Block (key tile blockIdx.x of 64, key/value head blockIdx.y, sequence
// blockIdx.z), 4 warps of 16 key rows; K and V fragments in registers. Over
// the query heads of the group and their query tiles (from the tile's first
// key on when causal): S^T = K Q^T, P^T, dP^T = V dO^T, dS^T, then dV +=
// P^T dO and dK += dS^T Q. dk = scale dK and dv written at the end.
template <int DM>
__device__ __forceinline__ void moert_attn_bwd_dkdv_bf16_impl(const moert_bf16 *qkv, const float *lse,
                                                              const float *delta, const moert_bf16 *dout,
                                                              moert_bf16 *dqkv, long long seq, int H, int KV,
                                                              int D, int causal) {
  typedef moert_attn_shape<DM> S;
  constexpr int BK = S::BM, BQ = S::BQ, LD = S::LD;
  __shared__ uint4 q_raw[BQ * LD / 8], d_raw[BQ * LD / 8];
  __shared__ float lse_s[BQ], del_s[BQ];
  moert_bf16 *Qs = (moert_bf16 *)q_raw, *Ds = (moert_bf16 *)d_raw;
  const int g = blockIdx.y, s = blockIdx.z, group = H / KV;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gr = lane >> 2, tq = lane & 3;
  const long long W = (long long)(H + 2 * KV) * D, HD = (long long)H * D, k0 = (long long)blockIdx.x * BK;
  const moert_bf16 *rows = qkv + (long long)s * seq * W, *drows = dout + (long long)s * seq * HD;
  const bool vec = moert_aligned16(qkv) && moert_aligned16(dout) && (W % 8) == 0 && (HD % 8) == 0;
  const long long r0 = k0 + warp * 16 + gr, r1 = r0 + 8; // this thread's key rows
  const double scale = 1.0 / sqrt((double)D);
  const float sl2 = (float)(MOERT_LOG2E * scale);

  unsigned kf[DM / 16][4], vf[DM / 16][4];
#pragma unroll
  for (int kk = 0; kk < DM / 16; kk++) {
    moert_frag_a_global(kf[kk], r0 < seq ? rows + r0 * W + (H + g) * D : 0,
                        r1 < seq ? rows + r1 * W + (H + g) * D : 0, kk * 16, D);
    moert_frag_a_global(vf[kk], r0 < seq ? rows + r0 * W + (H + KV + g) * D : 0,
                        r1 < seq ? rows + r1 * W + (H + KV + g) * D : 0, kk * 16, D);
  }
  float dk[DM / 8][4], dv[DM / 8][4];
#pragma unroll
  for (int n = 0; n < DM / 8; n++)
#pragma unroll
    for (int i = 0; i < 4; i++) dk[n][i] = dv[n][i] = 0.0f;

  // dO and Q tiles (with delta and lse) in flight while the other is used
  // (cp.async groups dO0 Q0 dO1 Q1 ...), over the (head, query tile) pairs
  // in order: dP^T = V dO^T first, then S^T = K Q^T, dV += P^T dO (dO(t+1)
  // loads during dK += dS^T Q), dK (Q(t+1) loads during the next V dO^T).
  const long long qstart = causal ? k0 / BQ * BQ : 0; // < seq: k0 is
  const int hend = (g + 1) * group;
  auto load_do = [&](int hh, long long qq) {
    moert_tile_bf16<BQ, DM, LD>(Ds, drows + hh * D, HD, qq, seq, D, vec);
    const float *De = delta + ((long long)s * H + hh) * seq;
    for (int i = threadIdx.x; i < BQ; i += blockDim.x) del_s[i] = qq + i < seq ? De[qq + i] : 0.0f;
  };
  auto load_q = [&](int hh, long long qq) { // lse in log2 units; +inf beyond the sequence (P = 0)
    moert_tile_bf16<BQ, DM, LD>(Qs, rows + hh * D, W, qq, seq, D, vec);
    const float *L = lse + ((long long)s * H + hh) * seq;
    for (int i = threadIdx.x; i < BQ; i += blockDim.x)
      lse_s[i] = qq + i < seq ? L[qq + i] * (float)MOERT_LOG2E : MOERT_INF;
  };
  load_do(g * group, qstart);
  moert_cp_async_commit();
  load_q(g * group, qstart);
  moert_cp_async_commit();
  for (int h = g * group; h < hend;) {
    for (long long q0 = qstart; q0 < seq; q0 += BQ) {
      const long long nq = q0 + BQ < seq ? q0 + BQ : qstart;
      const int nh = q0 + BQ < seq ? h : h + 1;
      const bool more = nh < hend;
      moert_cp_async_wait<1>(); // dO(t) here, Q(t) may be in flight
      __syncthreads();
      float p[BQ / 8][4], ds[BQ / 8][4];
#pragma unroll
      for (int j = 0; j < BQ / 8; j++) {
#pragma unroll
        for (int i = 0; i < 4; i++) p[j][i] = ds[j][i] = 0.0f;
#pragma unroll
        for (int k2 = 0; k2 < DM / 32; k2++)
          if (k2 * 32 < D) {
            unsigned b[4];
            moert_frag_bt2<LD>(b, Ds + j * 8 * LD + k2 * 32);
            moert_mma_bf16(ds[j], vf[2 * k2], b);
            if (k2 * 32 + 16 < D) moert_mma_bf16(ds[j], vf[2 * k2 + 1], b + 2);
          }
      }
      moert_cp_async_wait<0>(); // Q(t) here
      __syncthreads();
      // a tile to mask: the warp has keys beyond the sequence, or after one
      // of the tile's queries (queries beyond the sequence have P = 0 by lse)
      const bool edge = k0 + warp * 16 + 15 >= seq || (causal && k0 + warp * 16 + 15 > q0);
#pragma unroll
      for (int j = 0; j < BQ / 8; j++) {
#pragma unroll
        for (int k2 = 0; k2 < DM / 32; k2++)
          if (k2 * 32 < D) {
            unsigned b[4];
            moert_frag_bt2<LD>(b, Qs + j * 8 * LD + k2 * 32);
            moert_mma_bf16(p[j], kf[2 * k2], b);
            if (k2 * 32 + 16 < D) moert_mma_bf16(p[j], kf[2 * k2 + 1], b + 2);
          }
#pragma unroll
        for (int i = 0; i < 4; i++) {
          int qc = j * 8 + 2 * tq + (i & 1);
          long long r = i < 2 ? r0 : r1;
          float pv = exp2f(p[j][i] * sl2 - lse_s[qc]);
          if (edge && (r >= seq || (causal && r > q0 + qc))) pv = 0.0f;
          p[j][i] = pv;
          ds[j][i] = pv * (ds[j][i] - del_s[qc]);
        }
      }
#pragma unroll
      for (int kk = 0; kk < BQ / 16; kk++) {
        unsigned ap[4];
        moert_frag_from_acc(ap, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
        for (int n2 = 0; n2 < DM / 16; n2++)
          if (n2 * 16 < D) {
            unsigned b[4];
            moert_frag_b2<LD>(b, Ds + kk * 16 * LD + n2 * 16);
            moert_mma_bf16(dv[2 * n2], ap, b);
            if (n2 * 16 + 8 < D) moert_mma_bf16(dv[2 * n2 + 1], ap, b + 2);
          }
      }
      __syncthreads(); // every warp is done with dO(t) and delta
      if (more) load_do(nh, nq);
      moert_cp_async_commit();
#pragma unroll
      for (int kk = 0; kk < BQ / 16; kk++) {
        unsigned as[4];
        moert_frag_from_acc(as, ds[2 * kk], ds[2 * kk + 1]);
#pragma unroll
        for (int n2 = 0; n2 < DM / 16; n2++)
          if (n2 * 16 < D) {
            unsigned b[4];
            moert_frag_b2<LD>(b, Qs + kk * 16 * LD + n2 * 16);
            moert_mma_bf16(dk[2 * n2], as, b);
            if (n2 * 16 + 8 < D) moert_mma_bf16(dk[2 * n2 + 1], as, b + 2);
          }
      }
      __syncthreads(); // every warp is done with Q(t) and lse
      if (more) load_q(nh, nq);
      moert_cp_async_commit();
      h = nh;
    }
  }
  const float sc = (float)scale;
#pragma unroll
  for (int n = 0; n < DM / 8; n++)
    if (n * 8 < D) {
      int c = n * 8 + 2 * tq;
      if (r0 < seq) {
        moert_bf16 *k = dqkv + ((long long)s * seq + r0) * W + (H + g) * D + c, *v = k + (long long)KV * D;
        k[0] = moert_f2bf(dk[n][0] * sc), k[1] = moert_f2bf(dk[n][1] * sc);
        v[0] = moert_f2bf(dv[n][0]), v[1] = moert_f2bf(dv[n][1]);
      }
      if (r1 < seq) {
        moert_bf16 *k = dqkv + ((long long)s * seq + r1) * W + (H + g) * D + c, *v = k + (long long)KV * D;
        k[0] = moert_f2bf(dk[n][2] * sc), k[1] = moert_f2bf(dk[n][3] * sc);
        v[0] = moert_f2bf(dv[n][2]), v[1] = moert_f2bf(dv[n][3]);
      }
    }
}

// ---------------------------------------------------------------- fp32

// The fp32 kernels: 256 threads, 32 rows of 8 lanes; tiles of
// 4096 / DM rows (16 KB) in shared memory.
template <int DM> struct moert_attn_f32_shape {
  static constexpr int ROWS = 32;        // rows a block (one per 8 lanes)
  static constexpr int TILE = 4096 / DM; // rows a streamed tile
  static constexpr int PER = DM / 8;     // elements a lane holds of a row
};

// Lane l8's elements l8 + 8 i of a row (zeros at i >= D / 8 or a dead row).
template <int DM, class T>
__device__ __forceinline__ void moert_row8_load(float *x, const T *row, bool live, int D) {
  int l8 = threadIdx.x & 7;
#pragma unroll
  for (int i = 0; i < DM / 8; i++) x[i] = live && i * 8 < D ? moert_ldf(row, l8 + 8 * i) : 0.0f;
}
template <int DM, class T>
__device__ __forceinline__ void moert_row8_store(T *row, const float *x, float mul, int D) {
  int l8 = threadIdx.x & 7;
#pragma unroll
  for (int i = 0; i < DM / 8; i++)
    if (i * 8 < D) moert_stf(row, l8 + 8 * i, x[i] * mul);
}
// x . (shared row r), summed over the row group.
template <int DM>
__device__ __forceinline__ float moert_row8_dot(const float *x, const float *r) {
  int l8 = threadIdx.x & 7;
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < DM / 8; i++) s += x[i] * r[l8 + 8 * i];
  return moert_sum8(s);
}

// Forward: a row group per query; key/value tiles streamed.
template <int DM>
__device__ __forceinline__ void moert_attn_fwd_f32_impl(const float *qkv, float *o, float *lse, long long seq,
                                                        int H, int KV, int D, int causal) {
  typedef moert_attn_f32_shape<DM> S;
  constexpr int BN = S::TILE, PER = S::PER;
  __shared__ float Ks[BN * DM], Vs[BN * DM];
  const int h = blockIdx.y, s = blockIdx.z, g = h / (H / KV), l8 = threadIdx.x & 7;
  const long long W = (long long)(H + 2 * KV) * D, q0 = (long long)blockIdx.x * S::ROWS;
  const long long r = q0 + (threadIdx.x >> 3);
  const bool live = r < seq;
  const float *rows = qkv + (long long)s * seq * W;
  const float scale = (float)(1.0 / sqrt((double)D));
  float q[PER], acc[PER];
  moert_row8_load<DM>(q, rows + r * W + h * D, live, D);
#pragma unroll
  for (int i = 0; i < PER; i++) acc[i] = 0.0f;
  float m = -MOERT_INF, l = 0.0f;
  const long long kend = causal ? moert_min64(seq, q0 + S::ROWS) : seq;
  for (long long k0 = 0; k0 < kend; k0 += BN) {
    __syncthreads();
    moert_tile_f32<BN, DM>(Ks, rows + (H + g) * D, W, k0, seq, D);
    moert_tile_f32<BN, DM>(Vs, rows + (H + KV + g) * D, W, k0, seq, D);
    __syncthreads();
    float sc[BN], mx = -MOERT_INF;
#pragma unroll
    for (int j = 0; j < BN; j++) {
      float v = moert_row8_dot<DM>(q, Ks + j * DM) * scale;
      long long kc = k0 + j;
      if (kc >= seq || (causal && kc > r)) v = -MOERT_INF;
      sc[j] = v;
      mx = fmaxf(mx, v);
    }
    float nm = fmaxf(m, mx), b = nm == -MOERT_INF ? 0.0f : nm, a = expf(m - b);
    m = nm;
    l *= a;
#pragma unroll
    for (int i = 0; i < PER; i++) acc[i] *= a;
#pragma unroll
    for (int j = 0; j < BN; j++) {
      float p = expf(sc[j] - b);
      l += p;
#pragma unroll
      for (int i = 0; i < PER; i++) acc[i] += p * Vs[j * DM + l8 + 8 * i];
    }
  }
  if (live) {
    moert_row8_store<DM>(o + ((long long)s * seq + r) * H * D + h * D, acc, 1.0f / l, D);
    if (l8 == 0) lse[((long long)s * H + h) * seq + r] = m + logf(l);
  }
}

// dQ: a row group per query; key/value tiles streamed.
template <int DM>
__device__ __forceinline__ void moert_attn_bwd_dq_f32_impl(const float *qkv, const float *lse, const float *delta,
                                                           const float *dout, float *dqkv, long long seq, int H,
                                                           int KV, int D, int causal) {
  typedef moert_attn_f32_shape<DM> S;
  constexpr int BN = S::TILE, PER = S::PER;
  __shared__ float Ks[BN * DM], Vs[BN * DM];
  const int h = blockIdx.y, s = blockIdx.z, g = h / (H / KV), l8 = threadIdx.x & 7;
  const long long W = (long long)(H + 2 * KV) * D, HD = (long long)H * D, q0 = (long long)blockIdx.x * S::ROWS;
  const long long r = q0 + (threadIdx.x >> 3);
  const bool live = r < seq;
  const float *rows = qkv + (long long)s * seq * W;
  const float scale = (float)(1.0 / sqrt((double)D));
  float q[PER], d[PER], acc[PER];
  moert_row8_load<DM>(q, rows + r * W + h * D, live, D);
  moert_row8_load<DM>(d, dout + ((long long)s * seq + r) * HD + h * D, live, D);
#pragma unroll
  for (int i = 0; i < PER; i++) acc[i] = 0.0f;
  const long long li = ((long long)s * H + h) * seq + r;
  const float L = live ? lse[li] : MOERT_INF, De = live ? delta[li] : 0.0f;
  const long long kend = causal ? moert_min64(seq, q0 + S::ROWS) : seq;
  for (long long k0 = 0; k0 < kend; k0 += BN) {
    __syncthreads();
    moert_tile_f32<BN, DM>(Ks, rows + (H + g) * D, W, k0, seq, D);
    moert_tile_f32<BN, DM>(Vs, rows + (H + KV + g) * D, W, k0, seq, D);
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < BN; j++) {
      float p = expf(moert_row8_dot<DM>(q, Ks + j * DM) * scale - L);
      float dp = moert_row8_dot<DM>(d, Vs + j * DM);
      long long kc = k0 + j;
      if (kc >= seq || (causal && kc > r)) p = 0.0f;
      float ds = p * (dp - De);
#pragma unroll
      for (int i = 0; i < PER; i++) acc[i] += ds * Ks[j * DM + l8 + 8 * i];
    }
  }
  if (live) moert_row8_store<DM>(dqkv + ((long long)s * seq + r) * W + h * D, acc, scale, D);
}

// dK, dV: a row group per key; over the group's query heads, query tiles
// (with their lse and delta) streamed.
template <int DM>
__device__ __forceinline__ void moert_attn_bwd_dkdv_f32_impl(const float *qkv, const float *lse,
                                                             const float *delta, const float *dout, float *dqkv,
                                                             long long seq, int H, int KV, int D, int causal) {
  typedef moert_attn_f32_shape<DM> S;
  constexpr int BQ = S::TILE, PER = S::PER;
  __shared__ float Qs[BQ * DM], Ds[BQ * DM], Ls[BQ], Es[BQ];
  const int g = blockIdx.y, s = blockIdx.z, group = H / KV, l8 = threadIdx.x & 7;
  const long long W = (long long)(H + 2 * KV) * D, HD = (long long)H * D, k0 = (long long)blockIdx.x * S::ROWS;
  const long long r = k0 + (threadIdx.x >> 3);
  const bool live = r < seq;
  const float *rows = qkv + (long long)s * seq * W;
  const float scale = (float)(1.0 / sqrt((double)D));
  float k[PER], v[PER], dk[PER], dv[PER];
  moert_row8_load<DM>(k, rows + r * W + (H + g) * D, live, D);
  moert_row8_load<DM>(v, rows + r * W + (H + KV + g) * D, live, D);
#pragma unroll
  for (int i = 0; i < PER; i++) dk[i] = dv[i] = 0.0f;
  const long long qstart = causal ? k0 / BQ * BQ : 0;
  for (int h = g * group; h < (g + 1) * group; h++) {
    const float *L = lse + ((long long)s * H + h) * seq, *De = delta + ((long long)s * H + h) * seq;
    for (long long q0 = qstart; q0 < seq; q0 += BQ) {
      __syncthreads();
      moert_tile_f32<BQ, DM>(Qs, rows + h * D, W, q0, seq, D);
      moert_tile_f32<BQ, DM>(Ds, dout + (long long)s * seq * HD + h * D, HD, q0, seq, D);
      for (int i = threadIdx.x; i < BQ; i += blockDim.x) {
        bool ok = q0 + i < seq;
        Ls[i] = ok ? L[q0 + i] : MOERT_INF;
        Es[i] = ok ? De[q0 + i] : 0.0f;
      }
      __syncthreads();
#pragma unroll 4
      for (int j = 0; j < BQ; j++) {
        float p = expf(moert_row8_dot<DM>(k, Qs + j * DM) * scale - Ls[j]);
        float dp = moert_row8_dot<DM>(v, Ds + j * DM);
        if (!live || (causal && r > q0 + j)) p = 0.0f;
        float ds = p * (dp - Es[j]);
#pragma unroll
        for (int i = 0; i < PER; i++) {
          dv[i] += p * Ds[j * DM + l8 + 8 * i];
          dk[i] += ds * Qs[j * DM + l8 + 8 * i];
        }
      }
    }
  }
  if (live) {
    float *row = dqkv + ((long long)s * seq + r) * W;
    moert_row8_store<DM>(row + (H + g) * D, dk, scale, D);
    moert_row8_store<DM>(row + (H + KV + g) * D, dv, 1.0f, D);
  }
}

// ---------------------------------------------------------------- delta, decode

// delta[(s H + h) seq + i] = sum(dO * O) of token s seq + i, head h: a warp
// a (token, head), fp32 sums.
template <class T>
__device__ __forceinline__ void moert_attn_delta_impl(const T *o, const T *dout, float *delta, long long nseq,
                                                      long long seq, int H, int D) {
  const long long n = nseq * seq * H;
  const int lane = threadIdx.x & 31;
  const long long warps = moert_gstride() >> 5;
  for (long long w = moert_gtid() >> 5; w < n; w += warps) {
    long long t = w / H;
    int h = (int)(w % H);
    const T *a = o + w * D, *b = dout + w * D; // [t][h][D] is row w of [T H, D]
    float sum = 0.0f;
    for (int d = lane; d < D; d += 32) sum += moert_ldf(a, d) * moert_ldf(b, d);
    sum = moert_warp_sum_f(sum);
    if (lane == 0) delta[((t / seq) * H + h) * seq + t % seq] = sum;
  }
}

extern "C" __global__ void moert_k_attn_delta_f32(const float *o, const float *dout, float *delta, long long nseq,
                                                  long long seq, int H, int D) {
  moert_attn_delta_impl<float>(o, dout, delta, nseq, seq, H, D);
}
extern "C" __global__ void moert_k_attn_delta_bf16(const moert_bf16 *o, const moert_bf16 *dout, float *delta,
                                                   long long nseq, long long seq, int H, int D) {
  moert_attn_delta_impl<moert_bf16>(o, dout, delta, nseq, seq, H, D);
}

// Decode: a block of 256 a (query head blockIdx.x, chunk blockIdx.y of
// `chunk` cached rows); its 32 row groups take the chunk's rows j = group +
// 32 i, each with its own online softmax, then the groups' (max, sum, o)
// are combined through shared memory. One chunk (gridDim.y 1): o written.
// Several (flash-decoding: long caches over more blocks than heads): the
// chunk's max, sum and unnormalized o, D + 2 floats at part + (h chunks +
// c) (D + 2), for moert_k_attn_decode_combine.
#define MOERT_DECODE_GROUPS 32
template <class T>
__device__ __forceinline__ void moert_attn_decode_impl(const T *q, const T *cache, T *o, long long len, int H,
                                                       int KV, int D, long long chunk, float *part) {
  constexpr int DM = 256, PER = DM / 8;
  __shared__ float Om[MOERT_DECODE_GROUPS * DM], Mm[MOERT_DECODE_GROUPS], Lm[MOERT_DECODE_GROUPS];
  const int h = blockIdx.x, g = h / (H / KV), grp = threadIdx.x >> 3, l8 = threadIdx.x & 7;
  const long long W = (long long)(H + 2 * KV) * D;
  const float scale = (float)(1.0 / sqrt((double)D));
  float x[PER], acc[PER], m = -MOERT_INF, l = 0.0f;
  moert_row8_load<DM>(x, q + (long long)h * D, true, D);
#pragma unroll
  for (int i = 0; i < PER; i++) acc[i] = 0.0f;
  const long long j1 = moert_min64(len, ((long long)blockIdx.y + 1) * chunk);
  for (long long j0 = blockIdx.y * chunk; j0 < j1; j0 += MOERT_DECODE_GROUPS) { // one trip count in every lane
    long long j = j0 + grp;
    bool live = j < j1;
    const T *k = cache + j * W + (long long)(H + g) * D, *v = cache + j * W + (long long)(H + KV + g) * D;
    float sd = 0.0f;
#pragma unroll
    for (int i = 0; i < PER; i++)
      if (live && i * 8 < D) sd += x[i] * moert_ldf(k, l8 + 8 * i);
    float sc = moert_sum8(sd) * scale;
    if (live) {
      float nm = fmaxf(m, sc), a = expf(m - nm), p = expf(sc - nm);
      m = nm;
      l = l * a + p;
#pragma unroll
      for (int i = 0; i < PER; i++)
        if (i * 8 < D) acc[i] = acc[i] * a + p * moert_ldf(v, l8 + 8 * i);
    }
  }
#pragma unroll
  for (int i = 0; i < PER; i++) Om[grp * DM + l8 + 8 * i] = acc[i];
  if (l8 == 0) Mm[grp] = m, Lm[grp] = l;
  __syncthreads();
  float M = -MOERT_INF;
  for (int i = 0; i < MOERT_DECODE_GROUPS; i++) M = fmaxf(M, Mm[i]);
  float sum = 0.0f;
  for (int i = 0; i < MOERT_DECODE_GROUPS; i++) sum += Mm[i] == -MOERT_INF ? 0.0f : Lm[i] * expf(Mm[i] - M);
  float *pp = part + ((long long)h * gridDim.y + blockIdx.y) * (D + 2);
  if (gridDim.y > 1 && threadIdx.x == 0) pp[0] = M, pp[1] = sum;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float v = 0.0f;
    for (int i = 0; i < MOERT_DECODE_GROUPS; i++)
      if (Mm[i] != -MOERT_INF) v += Om[i * DM + d] * expf(Mm[i] - M);
    if (gridDim.y > 1) pp[2 + d] = v;
    else moert_stf(o, (long long)h * D + d, v / sum);
  }
}

// Decode's chunks combined: o of head blockIdx.x from its nchunk partials.
template <class T>
__device__ __forceinline__ void moert_attn_decode_combine_impl(const float *part, T *o, int nchunk, int D) {
  const float *pp = part + (long long)blockIdx.x * nchunk * (D + 2);
  float M = -MOERT_INF, sum = 0.0f;
  for (int c = 0; c < nchunk; c++) M = fmaxf(M, pp[c * (D + 2)]);
  for (int c = 0; c < nchunk; c++) sum += pp[c * (D + 2) + 1] * expf(pp[c * (D + 2)] - M);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float v = 0.0f;
    for (int c = 0; c < nchunk; c++) v += pp[c * (D + 2) + 2 + d] * expf(pp[c * (D + 2)] - M);
    moert_stf(o, (long long)blockIdx.x * D + d, v / sum);
  }
}

extern "C" __global__ void moert_k_attn_decode_combine_f32(const float *part, float *o, int nchunk, int D) {
  moert_attn_decode_combine_impl<float>(part, o, nchunk, D);
}
extern "C" __global__ void moert_k_attn_decode_combine_bf16(const float *part, moert_bf16 *o, int nchunk, int D) {
  moert_attn_decode_combine_impl<moert_bf16>(part, o, nchunk, D);
}

extern "C" __global__ void moert_k_attn_decode_f32(const float *q, const float *cache, float *o, long long len,
                                                   int H, int KV, int D, long long chunk, float *part) {
  moert_attn_decode_impl<float>(q, cache, o, len, H, KV, D, chunk, part);
}
extern "C" __global__ void moert_k_attn_decode_bf16(const moert_bf16 *q, const moert_bf16 *cache, moert_bf16 *o,
                                                    long long len, int H, int KV, int D, long long chunk,
                                                    float *part) {
  moert_attn_decode_impl<moert_bf16>(q, cache, o, len, H, KV, D, chunk, part);
}

// ---------------------------------------------------------------- the fragment layouts' check

// One warp: C = A B (A [16][16], B [16][8], row-major bf16) three ways, each
// written to out[i] [16][8] through the accumulator's layout: 0, A's and B's
// fragments loaded from global memory by the documented layout; 1, A by
// ldmatrix and B by ldmatrix.trans from shared B [k][n]; 2, A by ldmatrix
// and B by ldmatrix from shared B^T [n][k]. The host compares each with its
// own product (runtime/backend_cuda.c's moert_backend_cuda_mma_check): the
// PTX layouts moert_mma_bf16 and moert_ldsm_x4 assume, checked on the GPU
// apart from attention.
extern "C" __global__ void moert_k_mma_check(const moert_bf16 *a, const moert_bf16 *b, float *out) {
  __shared__ uint4 as_raw[16 * 24 / 8], bs_raw[16 * 16 / 8], bt_raw[8 * 40 / 8];
  moert_bf16 *As = (moert_bf16 *)as_raw, *Bs = (moert_bf16 *)bs_raw, *Bt = (moert_bf16 *)bt_raw;
  const int lane = threadIdx.x & 31, gr = lane >> 2, tq = lane & 3;
  for (int i = lane; i < 16 * 24; i += 32) As[i] = i % 24 < 16 ? a[i / 24 * 16 + i % 24] : 0;
  for (int i = lane; i < 16 * 16; i += 32) Bs[i] = i % 16 < 8 ? b[i / 16 * 8 + i % 16] : 0;
  for (int i = lane; i < 8 * 40; i += 32) Bt[i] = i % 40 < 16 ? b[(i % 40) * 8 + i / 40] : 0;
  __syncwarp();
  unsigned fa[3][4], fb[3][4];
  moert_frag_a_global(fa[0], a + gr * 16, a + (gr + 8) * 16, 0, 16);
  fb[0][0] = moert_pack_bf(b[2 * tq * 8 + gr], b[(2 * tq + 1) * 8 + gr]);
  fb[0][1] = moert_pack_bf(b[(2 * tq + 8) * 8 + gr], b[(2 * tq + 9) * 8 + gr]);
  moert_frag_a2<24>(fa[1], As);
  moert_frag_b2<16>(fb[1], Bs);
  moert_frag_a2<24>(fa[2], As);
  moert_frag_bt2<40>(fb[2], Bt);
  for (int w = 0; w < 3; w++) {
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    moert_mma_bf16(c, fa[w], fb[w]);
    float *o = out + w * 128;
    o[gr * 8 + 2 * tq] = c[0], o[gr * 8 + 2 * tq + 1] = c[1];
    o[(gr + 8) * 8 + 2 * tq] = c[2], o[(gr + 8) * 8 + 2 * tq + 1] = c[3];
  }
}

// ---------------------------------------------------------------- the kernels by DM

// FWD_BLOCKS: the forward's blocks an SM must hold (its register cap).
#define MOERT_ATTN_KERNELS(DM, FWD_BLOCKS)                                                                     \
  extern "C" __global__ void __launch_bounds__(128, FWD_BLOCKS)                                               \
      moert_k_attn_fwd_bf16_d##DM(const moert_bf16 *qkv, moert_bf16 *o, float *lse, long long seq, int H,      \
                                  int KV, int D, int causal) {                                                 \
    moert_attn_fwd_bf16_impl<DM>(qkv, o, lse, seq, H, KV, D, causal);                                          \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(128)                                                           \
      moert_k_attn_bwd_dq_bf16_d##DM(const moert_bf16 *qkv, const float *lse, const float *delta,              \
                                     const moert_bf16 *dout, moert_bf16 *dqkv, long long seq, int H, int KV,   \
                                     int D, int causal) {                                                      \
    moert_attn_bwd_dq_bf16_impl<DM>(qkv, lse, delta, dout, dqkv, seq, H, KV, D, causal);                       \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(128)                                                           \
      moert_k_attn_bwd_dkdv_bf16_d##DM(const moert_bf16 *qkv, const float *lse, const float *delta,            \
                                       const moert_bf16 *dout, moert_bf16 *dqkv, long long seq, int H, int KV, \
                                       int D, int causal) {                                                    \
    moert_attn_bwd_dkdv_bf16_impl<DM>(qkv, lse, delta, dout, dqkv, seq, H, KV, D, causal);                     \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(256)                                                           \
      moert_k_attn_fwd_f32_d##DM(const float *qkv, float *o, float *lse, long long seq, int H, int KV, int D,  \
                                 int causal) {                                                                 \
    moert_attn_fwd_f32_impl<DM>(qkv, o, lse, seq, H, KV, D, causal);                                           \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(256)                                                           \
      moert_k_attn_bwd_dq_f32_d##DM(const float *qkv, const float *lse, const float *delta, const float *dout, \
                                    float *dqkv, long long seq, int H, int KV, int D, int causal) {            \
    moert_attn_bwd_dq_f32_impl<DM>(qkv, lse, delta, dout, dqkv, seq, H, KV, D, causal);                        \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(256)                                                           \
      moert_k_attn_bwd_dkdv_f32_d##DM(const float *qkv, const float *lse, const float *delta,                  \
                                      const float *dout, float *dqkv, long long seq, int H, int KV, int D,     \
                                      int causal) {                                                            \
    moert_attn_bwd_dkdv_f32_impl<DM>(qkv, lse, delta, dout, dqkv, seq, H, KV, D, causal);                      \
  }

MOERT_ATTN_KERNELS(64, 2)
MOERT_ATTN_KERNELS(128, 2)
MOERT_ATTN_KERNELS(256, 2)
