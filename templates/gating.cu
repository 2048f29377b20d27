// gating.cu — the MoE gate after the gate GEMM: softmax and top-k, combine
// weights, capacity locations, the batch-prioritized order, load statistics
// and the aux loss, and the gate's backward. Semantics: runtime/cpu_ops.h;
// exactly the cpu ops' choices: scores computed in double and rounded as the
// cpu rounds them, ties to the lower expert index, NaN after every number,
// all choice-0 claims (in token or priority order) before all choice-1 ones.
//
// Specialization (common.cuh, compiler/emit_cuda.c): the kernels that a
// model's kernels.cu specializes are `template <...> moert_X_impl`s over
// their dims (0: a runtime argument), wrapped by the generic moert_k_X.
//
// Launch (runtime/backend_cuda.c):
// - gate_topk: a warp a token, blockDim (32, 8); no shared memory.
// - gate_normalize(_bwd): a thread a token, 256 threads, 1-D grid-stride.
// - gate_priority_order: gate_priority_rank, a thread a token, 256 threads,
//   grid (ceil(tokens/256), chunks of the tokens compared against), each
//   token counting the tokens ranked before it (O(tokens^2) comparisons,
//   exact; the counts in a zeroed int array of the scratch), then
//   gate_priority_scatter, 1-D.
// - gate_locations: one block (512 threads) an expert, scanning the claims in
//   order (ballot and popc within warps, warp totals in shared memory).
// - gate_stats: column-chunk partials (blockDim (32, 8)) finished by
//   moert_k_colsum_add; aux_loss: one block of 256.
// - gate_scores_bwd: blockIdx.x over experts, blockIdx.y over tokens.
// - softmax_bwd: a row kernel (common.cuh's conventions).

// ---------------------------------------------------------------- kernels

// The floor of the sum of the top-k scores when they are normalized.
#define MOERT_GATE_SUM_FLOOR 1e-9

// With E known and at most this many experts, a lane of gate_topk keeps its
// E/32 scores in registers.
#define MOERT_GATE_REG_EXPERTS 512

// scores = softmax(logits + noise) per row (noise may be null), then the
// top_k best scores in ranking order: idx[t*k + j], topv[t*k + j].
// E, K: the experts and top_k when known at compile time, else 0.
template <int E, int K>
__device__ __forceinline__ void moert_gate_topk_impl(const float *logits, const float *noise,
                                                     float *scores, int *idx, float *topv,
                                                     long long tokens, long long experts_arg,
                                                     long long top_k_arg) {
  const long long experts = E > 0 ? E : experts_arg, top_k = K > 0 ? K : top_k_arg;
  constexpr bool REG = E > 0 && E <= MOERT_GATE_REG_EXPERTS;
  constexpr int NE = REG ? (E + 31) / 32 : 1;
  // expert e = lane + 32 q of this lane's slot q
  const int slots = REG ? NE : (int)((experts + 31) / 32);
  int lane = threadIdx.x;
  for (long long t = (long long)blockIdx.x * blockDim.y + threadIdx.y; t < tokens;
       t += (long long)gridDim.x * blockDim.y) {
    const float *l = logits + t * experts, *nz = noise ? noise + t * experts : 0;
    float *s = scores + t * experts;
    float sv[NE]; // REG: this lane's scores
    double mx = -(double)MOERT_INF;
#pragma unroll
    for (int q = 0; q < slots; q++) {
      long long e = lane + 32ll * q;
      if (e >= experts) break;
      double v = (double)l[e] + (nz ? (double)nz[e] : 0.0);
      mx = v > mx ? v : mx;
    }
    mx = moert_warp_max_d(mx);
    // As the cpu: the score is (float)((float)p / sum), sum of the unrounded p.
    double sum = 0.0;
#pragma unroll
    for (int q = 0; q < slots; q++) {
      long long e = lane + 32ll * q;
      if (e >= experts) break;
      double p = exp((double)l[e] + (nz ? (double)nz[e] : 0.0) - mx);
      if constexpr (REG) sv[q] = (float)p;
      else s[e] = (float)p;
      sum += p;
    }
    sum = moert_warp_sum_d(sum);
#pragma unroll
    for (int q = 0; q < slots; q++) {
      long long e = lane + 32ll * q;
      if (e >= experts) break;
      if constexpr (REG) {
        sv[q] = (float)((double)sv[q] / sum);
        s[e] = sv[q];
      } else {
        s[e] = (float)((double)s[e] / sum);
      }
    }
    // Choice j: the best, in ranking order, of the experts ranked after
    // choice j-1. Each lane reads back only the scores it wrote.
    long long prev = -1;
    float sprev = 0.0f;
#pragma unroll
    for (long long j = 0; j < top_k; j++) {
      long long best = -1;
      float sb = 0.0f;
#pragma unroll
      for (int q = 0; q < slots; q++) {
        long long e = lane + 32ll * q;
        if (e >= experts) break;
        float se;
        if constexpr (REG) se = sv[q];
        else se = s[e];
        if (prev >= 0 && !moert_ranks_before(sprev, prev, se, e)) continue;
        if (best < 0 || moert_ranks_before(se, e, sb, best)) {
          best = e;
          sb = se;
        }
      }
      // A total order: every lane ends with the same best.
      for (int o = 16; o > 0; o >>= 1) {
        long long ob = __shfl_xor_sync(MOERT_FULL_MASK, best, o);
        float os = __shfl_xor_sync(MOERT_FULL_MASK, sb, o);
        if (ob >= 0 && (best < 0 || moert_ranks_before(os, ob, sb, best))) {
          best = ob;
          sb = os;
        }
      }
      if (lane == 0) {
        idx[t * top_k + j] = (int)best;
        topv[t * top_k + j] = best >= 0 ? sb : 0.0f;
      }
      prev = best;
      sprev = sb;
    }
  }
}

extern "C" __global__ void moert_k_gate_topk(const float *logits, const float *noise,
                                             float *scores, int *idx, float *topv,
                                             long long tokens, long long experts,
                                             long long top_k) {
  moert_gate_topk_impl<0, 0>(logits, noise, scores, idx, topv, tokens, experts, top_k);
}

// gate = topv, or topv / max(sum_j topv, 1e-9) per token when normalize.
// K: top_k when known at compile time (the choices in registers), else 0.
template <int K>
__device__ __forceinline__ void moert_gate_normalize_impl(const float *topv, float *gate,
                                                          long long tokens, long long top_k_arg,
                                                          int normalize) {
  const long long top_k = K > 0 ? K : top_k_arg;
  for (long long t = moert_gtid(); t < tokens; t += moert_gstride()) {
    const float *v = topv + t * top_k;
    float *g = gate + t * top_k;
    float vr[K > 0 ? K : 1];
    if constexpr (K > 0) {
#pragma unroll
      for (int j = 0; j < K; j++) vr[j] = v[j];
    }
    double d = 1.0;
    if (normalize) {
      double s = 0.0;
#pragma unroll
      for (long long j = 0; j < top_k; j++) s += K > 0 ? vr[j] : v[j];
      d = s > MOERT_GATE_SUM_FLOOR ? s : MOERT_GATE_SUM_FLOOR;
    }
#pragma unroll
    for (long long j = 0; j < top_k; j++) g[j] = (float)((K > 0 ? vr[j] : v[j]) / d);
  }
}

extern "C" __global__ void moert_k_gate_normalize(const float *topv, float *gate,
                                                  long long tokens, long long top_k,
                                                  int normalize) {
  moert_gate_normalize_impl<0>(topv, gate, tokens, top_k, normalize);
}

// dtopv from dgate: dv_i = dg_i / s - sum_j dg_j v_j / s^2. K as above.
template <int K>
__device__ __forceinline__ void moert_gate_normalize_bwd_impl(const float *topv,
                                                              const float *dgate, float *dtopv,
                                                              long long tokens,
                                                              long long top_k_arg,
                                                              int normalize) {
  const long long top_k = K > 0 ? K : top_k_arg;
  for (long long t = moert_gtid(); t < tokens; t += moert_gstride()) {
    const float *v = topv + t * top_k, *dg = dgate + t * top_k;
    float *dv = dtopv + t * top_k;
    float dgr[K > 0 ? K : 1];
    if constexpr (K > 0) {
#pragma unroll
      for (int j = 0; j < K; j++) dgr[j] = dg[j];
    }
#define MOERT_DG(j) (K > 0 ? dgr[j] : dg[j])
    double s = 0.0, dot = 0.0;
    if (normalize) {
#pragma unroll
      for (long long j = 0; j < top_k; j++) {
        s += v[j];
        dot += (double)MOERT_DG(j) * v[j];
      }
    }
    if (!normalize) {
#pragma unroll
      for (long long j = 0; j < top_k; j++) dv[j] = MOERT_DG(j);
    } else if (s > MOERT_GATE_SUM_FLOOR) {
#pragma unroll
      for (long long j = 0; j < top_k; j++) dv[j] = (float)(MOERT_DG(j) / s - dot / (s * s));
    } else {
#pragma unroll
      for (long long j = 0; j < top_k; j++) dv[j] = (float)(MOERT_DG(j) / MOERT_GATE_SUM_FLOOR);
    }
#undef MOERT_DG
  }
}

extern "C" __global__ void moert_k_gate_normalize_bwd(const float *topv, const float *dgate,
                                                      float *dtopv, long long tokens,
                                                      long long top_k, int normalize) {
  moert_gate_normalize_bwd_impl<0>(topv, dgate, dtopv, tokens, top_k, normalize);
}

// The batch-prioritized order (the tokens sorted by topv[t*k] descending,
// stable) in two kernels: token t's position is the number of tokens ranked
// before it. First, rank[t] += the count among the tokens of this block's
// chunk (blockIdx.y of gridDim.y chunks, tiles of 256 keys in shared
// memory); rank is zeroed by the caller. blockDim.x == 256.
extern "C" __global__ void moert_k_gate_priority_rank(const float *topv, int *rank,
                                                      long long tokens, long long top_k) {
  __shared__ unsigned long long tile[256];
  long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  unsigned long long key =
      t < tokens ? (unsigned long long)moert_rank_key(topv[t * top_k]) << 32 | (unsigned long long)t
                 : ~0ull;
  long long per = (tokens + gridDim.y - 1) / gridDim.y;
  long long u0 = (long long)blockIdx.y * per, u1 = moert_min64(tokens, u0 + per);
  int count = 0;
  for (long long base = u0; base < u1; base += blockDim.x) {
    long long u = base + threadIdx.x;
    __syncthreads();
    tile[threadIdx.x] = u < u1 ? (unsigned long long)moert_rank_key(topv[u * top_k]) << 32 |
                                     (unsigned long long)u
                               : ~0ull;
    __syncthreads();
    int m = (int)moert_min64(blockDim.x, u1 - base);
    for (int i = 0; i < m; i++) count += tile[i] < key;
  }
  if (t < tokens && count) atomicAdd(rank + t, count); // integer sums: exact in any order
}

// Then order[rank[t]] = t.
extern "C" __global__ void moert_k_gate_priority_scatter(const int *rank, int *order,
                                                         long long tokens) {
  for (long long t = moert_gtid(); t < tokens; t += moert_gstride()) order[rank[t]] = (int)t;
}

// loc[t*k + j]: the running count of earlier claims on expert idx[t*k + j],
// all choice-0 claims (tokens in order, or in order[]) before all choice-1
// claims; -1 for a claim on no expert. counts[e]: all claims on e. One block
// an expert (blocks stride over the experts); blockDim.x a multiple of 32.
// K: top_k when known at compile time, else 0.
template <int K>
__device__ __forceinline__ void moert_gate_locations_impl(const int *idx, const int *order,
                                                          int *loc, int *counts,
                                                          long long tokens, long long experts,
                                                          long long top_k_arg) {
  const long long top_k = K > 0 ? K : top_k_arg;
  __shared__ int warp_total[MOERT_MAX_WARPS];
  int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (long long e = blockIdx.x; e < experts; e += gridDim.x) {
    long long base = 0; // claims on e so far: the same in every thread
    for (long long j = 0; j < top_k; j++)
      for (long long i0 = 0; i0 < tokens; i0 += blockDim.x) {
        long long i = i0 + threadIdx.x, tj = 0;
        int ce = -1;
        if (i < tokens) {
          long long t = order ? (long long)order[i] : i;
          tj = t * top_k + j;
          ce = idx[tj];
        }
        bool mine = i < tokens && ce == e;
        unsigned bal = __ballot_sync(MOERT_FULL_MASK, mine);
        if (lane == 0) warp_total[w] = __popc(bal);
        __syncthreads();
        // inclusive scan of the warp totals across the lanes of every warp
        int scan = lane < nw ? warp_total[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
          int v = __shfl_up_sync(MOERT_FULL_MASK, scan, o);
          if (lane >= o) scan += v;
        }
        int before = __shfl_sync(MOERT_FULL_MASK, scan, (w + 31) & 31); // warps < w
        int total = __shfl_sync(MOERT_FULL_MASK, scan, nw - 1);
        if (w == 0) before = 0;
        if (mine) loc[tj] = (int)(base + before + __popc(bal & ((1u << lane) - 1u)));
        if (e == 0 && i < tokens && (ce < 0 || ce >= experts)) loc[tj] = -1;
        base += total;
        __syncthreads(); // warp_total is rewritten next
      }
    if (threadIdx.x == 0) counts[e] = (int)base;
  }
}

extern "C" __global__ void moert_k_gate_locations(const int *idx, const int *order, int *loc,
                                                  int *counts, long long tokens,
                                                  long long experts, long long top_k) {
  moert_gate_locations_impl<0>(idx, order, loc, counts, tokens, experts, top_k);
}

// Partials of the load statistics over the slab of experts [c0, c0 + w)
// (scores offset to c0 by the caller, ld = experts): the column sums of the
// scores, and the number of tokens whose first choice is each expert.
// E, K: the experts (= ld) and top_k when known at compile time, else 0.
template <int E, int K>
__device__ __forceinline__ void moert_gate_stats_part_impl(const float *scores, const int *idx,
                                                           long long rows, long long ld_arg,
                                                           long long w, long long rpc,
                                                           long long c0, long long top_k_arg,
                                                           double *part_sum,
                                                           double *part_count) {
  const long long ld = E > 0 ? E : ld_arg, top_k = K > 0 ? K : top_k_arg;
  moert_colsum_part<2>(
      [&](long long r, long long c, double *acc) {
        acc[0] += scores[r * ld + c];
        acc[1] += (long long)idx[r * top_k] == c0 + c ? 1.0 : 0.0;
      },
      rows, w, rpc, part_sum, part_count);
}

extern "C" __global__ void moert_k_gate_stats_part(const float *scores, const int *idx,
                                                   long long rows, long long ld, long long w,
                                                   long long rpc, long long c0, long long top_k,
                                                   double *part_sum, double *part_count) {
  moert_gate_stats_part_impl<0, 0>(scores, idx, rows, ld, w, rpc, c0, top_k, part_sum,
                                   part_count);
}

// The GShard aux loss from global statistics (moert_cpu_aux_loss): *loss =
// E sum_e me_e ce_e; dscore_coef[e] = E ce_e / N when not null. One block.
extern "C" __global__ void moert_k_aux_loss(const float *score_sum, const float *top1_count,
                                            float *dscore_coef, long long experts,
                                            double global_tokens, float *loss) {
  __shared__ double sh[MOERT_MAX_WARPS];
  double n = global_tokens > 0 ? global_tokens : 1.0, acc = 0.0;
  for (long long e = threadIdx.x; e < experts; e += blockDim.x) {
    double me = score_sum[e] / n, ce = top1_count[e] / n;
    acc += me * ce;
    if (dscore_coef) dscore_coef[e] = (float)((double)experts * ce / n);
  }
  acc = moert_block_sum_d(acc, sh);
  if (threadIdx.x == 0) *loss = (float)((double)experts * acc);
}

// dscores[t, e] accumulates weight * dscore_coef[e] (when not null), then the
// dtopv of the choices of t on e, in choice order.
// E, K: the experts and top_k when known at compile time, else 0.
template <int E, int K>
__device__ __forceinline__ void moert_gate_scores_bwd_impl(const int *idx, const float *dtopv,
                                                           const float *dscore_coef,
                                                           float weight, float *dscores,
                                                           long long tokens,
                                                           long long experts_arg,
                                                           long long top_k_arg) {
  const long long experts = E > 0 ? E : experts_arg, top_k = K > 0 ? K : top_k_arg;
  for (long long t = blockIdx.y; t < tokens; t += gridDim.y)
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < experts;
         e += (long long)gridDim.x * blockDim.x) {
      float d = dscores[t * experts + e];
      if (dscore_coef) d = (float)((double)d + (double)weight * dscore_coef[e]);
      if (dtopv) {
#pragma unroll
        for (long long j = 0; j < top_k; j++)
          if ((long long)idx[t * top_k + j] == e) d += dtopv[t * top_k + j];
      }
      dscores[t * experts + e] = d;
    }
}

extern "C" __global__ void moert_k_gate_scores_bwd(const int *idx, const float *dtopv,
                                                   const float *dscore_coef, float weight,
                                                   float *dscores, long long tokens,
                                                   long long experts, long long top_k) {
  moert_gate_scores_bwd_impl<0, 0>(idx, dtopv, dscore_coef, weight, dscores, tokens, experts,
                                   top_k);
}

// dlogits = s * (ds - sum(ds * s)) per row. D: the row width (the experts)
// when known at compile time, else 0.
template <int D>
__device__ __forceinline__ void moert_softmax_bwd_impl(const float *scores, const float *dscores,
                                                       float *dlogits, long long rows,
                                                       long long cols_arg) {
  typedef moert_row<D> R;
  if constexpr (R::CACHE) {
    if (blockDim.x != R::G) {
      moert_softmax_bwd_impl<0>(scores, dscores, dlogits, rows, cols_arg);
      return;
    }
  }
  const long long cols = D > 0 ? D : cols_arg;
  __shared__ double sh[MOERT_MAX_ROWS * MOERT_MAX_WARPS];
  for (long long base = (long long)blockIdx.x * blockDim.y; base < rows;
       base += (long long)gridDim.x * blockDim.y) {
    long long r = base + threadIdx.y;
    bool live = r < rows; // every thread iterates alike: group sums synchronize
    const float *s = scores + r * cols, *ds = dscores + r * cols;
    float sv[R::PER], dsv[R::PER]; // CACHE: this thread's elements
    double dot = 0.0;
    if (live)
      moert_row_each<D>(cols, [&](int q, long long c) {
        float a = s[c], b = ds[c];
        if constexpr (R::CACHE) sv[q] = a, dsv[q] = b;
        dot += (double)b * a;
      });
    dot = moert_group_sum_d(dot, sh);
    if (live) {
      float *dl = dlogits + r * cols;
      moert_row_each<D>(cols, [&](int q, long long c) {
        float a, b;
        if constexpr (R::CACHE) a = sv[q], b = dsv[q];
        else a = s[c], b = ds[c];
        dl[c] = (float)((double)a * ((double)b - dot));
      });
    }
  }
}

extern "C" __global__ void moert_k_softmax_bwd(const float *scores, const float *dscores,
                                               float *dlogits, long long rows, long long cols) {
  moert_softmax_bwd_impl<0>(scores, dscores, dlogits, rows, cols);
}
