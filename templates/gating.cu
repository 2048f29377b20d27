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
// Launch (runtime/backend_cuda.c): the gate after its GEMM is two kernels
// (four with the priority order), its backward one.
// - gate_topk: a warp a token, blockDim (32, 8), a grid the scratch holds
//   the column-sum partials of (no shared memory).
// - gate_priority_order: gate_priority_rank, a thread a token, 256 threads,
//   grid (ceil(tokens/256), chunks of the tokens compared against), each
//   token counting the tokens ranked before it (O(tokens^2) comparisons,
//   exact; the counts in a zeroed int array of the scratch), then
//   gate_priority_scatter, 1-D.
// - gate_locations: one block (512 threads) an expert, scanning the claims in
//   order, MOERT_GATE_LOC_V a thread (their counts scanned within warps, warp
//   totals in shared memory), then
//   summing the expert's partials; at one rank its last block computes the
//   aux loss (else aux_loss does, one block of 256, after the all-reduce).
// - gate_bwd: a warp a token, blockDim (32, 8).

// ---------------------------------------------------------------- kernels

// The floor of the sum of the top-k scores when they are normalized.
#define MOERT_GATE_SUM_FLOOR 1e-9

// Claims a thread of gate_locations takes at a time.
#define MOERT_GATE_LOC_V 4

// With E known and at most this many experts, a lane of gate_topk keeps its
// E/32 scores in registers.
#define MOERT_GATE_REG_EXPERTS 512

// The gate's first kernel: scores = softmax(logits + noise) per row (noise
// may be null), the top_k best scores in ranking order (idx[t*k + j],
// topv[t*k + j]), the combine weights gate[t*k + j] (topv, or topv over
// max(sum_j topv, 1e-9) when normalize), and, when part is not null, this
// block's column sums of the scores over its tokens: part[blockIdx.x *
// experts + e], finished by gate_locations (the load statistics).
// E, K: the experts and top_k when known at compile time, else 0.
template <int E, int K>
__device__ __forceinline__ void moert_gate_topk_impl(const float *logits, const float *noise,
                                                     float *scores, int *idx, float *topv,
                                                     float *gate, int normalize, double *part,
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
    float vr[K > 0 ? K : 1]; // K: the chosen scores, for the weights
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
      float v = best >= 0 ? sb : 0.0f;
      if constexpr (K > 0) vr[j] = v;
      if (lane == 0) {
        idx[t * top_k + j] = (int)best;
        topv[t * top_k + j] = v;
      }
      prev = best;
      sprev = sb;
    }
    // The weights, as moert_cpu_gate_normalize; without K, lane 0 reads back
    // the topv it wrote.
    if (lane == 0) {
      const float *v = topv + t * top_k;
#define MOERT_V(j) (K > 0 ? vr[K > 0 ? (j) : 0] : v[j])
      double d = 1.0;
      if (normalize) {
        double sv2 = 0.0;
#pragma unroll
        for (long long j = 0; j < top_k; j++) sv2 += MOERT_V(j);
        d = sv2 > MOERT_GATE_SUM_FLOOR ? sv2 : MOERT_GATE_SUM_FLOOR;
      }
#pragma unroll
      for (long long j = 0; j < top_k; j++) gate[t * top_k + j] = (float)(MOERT_V(j) / d);
#undef MOERT_V
    }
  }
  if (!part) return; // the same in every thread
  // This block's column sums, in token order, of the scores its warps wrote
  // (visible to the block after the barrier).
  __syncthreads();
  int tid = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;
  for (long long e = tid; e < experts; e += nt) {
    double acc = 0.0;
    for (long long t0 = (long long)blockIdx.x * blockDim.y; t0 < tokens;
         t0 += (long long)gridDim.x * blockDim.y)
      for (long long t = t0; t < t0 + blockDim.y && t < tokens; t++) acc += scores[t * experts + e];
    part[(long long)blockIdx.x * experts + e] = acc;
  }
}

extern "C" __global__ void moert_k_gate_topk(const float *logits, const float *noise,
                                             float *scores, int *idx, float *topv, float *gate,
                                             int normalize, double *part, long long tokens,
                                             long long experts, long long top_k) {
  moert_gate_topk_impl<0, 0>(logits, noise, scores, idx, topv, gate, normalize, part, tokens,
                             experts, top_k);
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

// The aux loss of moert_cpu_aux_loss from global statistics, by the block
// that calls it (every thread): *loss = E sum_e me_e ce_e; dscore_coef[e] = E
// ce_e / N when not null. The statistics are read past the L1 cache: other
// blocks of the grid may have written them.
__device__ void moert_aux_loss_block(const float *score_sum, const float *top1_count,
                                     float *dscore_coef, long long experts,
                                     double global_tokens, float *loss) {
  __shared__ double sh[MOERT_MAX_WARPS];
  const volatile float *ss = score_sum, *tc = top1_count;
  double n = global_tokens > 0 ? global_tokens : 1.0, acc = 0.0;
  int tid = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;
  for (long long e = tid; e < experts; e += nt) {
    double me = ss[e] / n, ce = tc[e] / n;
    acc += me * ce;
    if (dscore_coef) dscore_coef[e] = (float)((double)experts * ce / n);
  }
  acc = moert_block_sum_d(acc, sh);
  if (tid == 0) *loss = (float)((double)experts * acc);
}

// The gate's second kernel. loc[t*k + j]: the running count of earlier
// claims on expert idx[t*k + j], all choice-0 claims (tokens in order, or in
// order[]) before all choice-1 claims; -1 for a claim on no expert.
// counts[e]: all claims on e. When score_sum is not null, the load
// statistics of moert_cpu_gate_stats, written: score_sum[e] = the sum of
// gate_topk's nparts partials, top1_count[e] = the choice-0 claims on e. When
// loss is not null too (the statistics are global: one rank), the last block
// to finish (counted in *done, which it resets to 0) computes the aux loss
// from them. One block an expert (blocks stride over the experts);
// blockDim.x a multiple of 32. K: top_k when known at compile time, else 0.
template <int K>
__device__ __forceinline__ void moert_gate_locations_impl(
    const int *idx, const int *order, int *loc, int *counts, const double *part,
    long long nparts, float *score_sum, float *top1_count, float *dscore_coef,
    double global_tokens, float *loss, unsigned *done, long long tokens, long long experts,
    long long top_k_arg) {
  const long long top_k = K > 0 ? K : top_k_arg;
  __shared__ int warp_total[MOERT_MAX_WARPS];
  __shared__ double sh[MOERT_MAX_WARPS];
  __shared__ bool last;
  int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (long long e = blockIdx.x; e < experts; e += gridDim.x) {
    long long base = 0, first = 0; // claims on e so far, choice-0 claims: alike in every thread
    for (long long j = 0; j < top_k; j++) {
      // MOERT_GATE_LOC_V consecutive claims a thread, loaded together
      for (long long i0 = 0; i0 < tokens; i0 += (long long)blockDim.x * MOERT_GATE_LOC_V) {
        long long tj[MOERT_GATE_LOC_V];
        int ce[MOERT_GATE_LOC_V], n = 0;
        unsigned live = 0;
#pragma unroll
        for (int v = 0; v < MOERT_GATE_LOC_V; v++) {
          long long i = i0 + (long long)threadIdx.x * MOERT_GATE_LOC_V + v;
          tj[v] = 0;
          ce[v] = -1;
          if (i < tokens) {
            long long t = order ? (long long)order[i] : i;
            tj[v] = t * top_k + j;
            ce[v] = idx[tj[v]];
            live |= 1u << v;
            n += ce[v] == e;
          }
        }
        // this thread's claims on e and those of the lanes before it
        int incl = n;
        for (int o = 1; o < 32; o <<= 1) {
          int x = __shfl_up_sync(MOERT_FULL_MASK, incl, o);
          if (lane >= o) incl += x;
        }
        if (lane == 31) warp_total[w] = incl;
        __syncthreads();
        // inclusive scan of the warp totals across the lanes of every warp
        int scan = lane < nw ? warp_total[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
          int x = __shfl_up_sync(MOERT_FULL_MASK, scan, o);
          if (lane >= o) scan += x;
        }
        int before = __shfl_sync(MOERT_FULL_MASK, scan, (w + 31) & 31); // warps < w
        int total = __shfl_sync(MOERT_FULL_MASK, scan, nw - 1);
        if (w == 0) before = 0;
        long long r = base + before + incl - n;
#pragma unroll
        for (int v = 0; v < MOERT_GATE_LOC_V; v++) {
          if (!(live >> v & 1u)) continue;
          if (ce[v] == e) loc[tj[v]] = (int)r++;
          if (e == 0 && (ce[v] < 0 || ce[v] >= experts)) loc[tj[v]] = -1;
        }
        base += total;
        __syncthreads(); // warp_total is rewritten next
      }
      if (j == 0) first = base;
    }
    if (threadIdx.x == 0) counts[e] = (int)base;
    if (score_sum) {
      double acc = 0.0;
      for (long long i = threadIdx.x; i < nparts; i += blockDim.x) acc += part[i * experts + e];
      acc = moert_block_sum_d(acc, sh);
      if (threadIdx.x == 0) {
        score_sum[e] = (float)acc;
        top1_count[e] = (float)(double)first;
      }
    }
  }
  if (!loss) return; // the same in every thread
  // The last block: every block fenced its statistics before counting
  // itself, so that block reads them all.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  moert_aux_loss_block(score_sum, top1_count, dscore_coef, experts, global_tokens, loss);
  if (threadIdx.x == 0) *done = 0u; // for the next launch
}

extern "C" __global__ void moert_k_gate_locations(const int *idx, const int *order, int *loc,
                                                  int *counts, const double *part,
                                                  long long nparts, float *score_sum,
                                                  float *top1_count, float *dscore_coef,
                                                  double global_tokens, float *loss,
                                                  unsigned *done, long long tokens,
                                                  long long experts, long long top_k) {
  moert_gate_locations_impl<0>(idx, order, loc, counts, part, nparts, score_sum, top1_count,
                               dscore_coef, global_tokens, loss, done, tokens, experts, top_k);
}

// The aux loss alone (the statistics summed over ranks first): one block.
extern "C" __global__ void moert_k_aux_loss(const float *score_sum, const float *top1_count,
                                            float *dscore_coef, long long experts,
                                            double global_tokens, float *loss) {
  moert_aux_loss_block(score_sum, top1_count, dscore_coef, experts, global_tokens, loss);
}

// The gate's backward in one kernel (moert_cpu_gate_bwd), a warp a token:
// dtopv from dgate through the weights' normalization; dscores[e] = weight *
// dscore_coef[e] (when not null) plus the dtopv of the choices of e, in
// choice order; dlogits = s * (ds - sum(ds * s)).
// E, K: the experts and top_k when known at compile time, else 0.
template <int E, int K>
__device__ __forceinline__ void moert_gate_bwd_impl(const float *scores, const int *idx,
                                                    const float *topv, const float *dgate,
                                                    const float *dscore_coef, float weight,
                                                    float *dlogits, long long tokens,
                                                    long long experts_arg, long long top_k_arg,
                                                    int normalize) {
  const long long experts = E > 0 ? E : experts_arg, top_k = K > 0 ? K : top_k_arg;
  constexpr bool REG = E > 0 && E <= MOERT_GATE_REG_EXPERTS;
  constexpr int NE = REG ? (E + 31) / 32 : 1;
  const int slots = REG ? NE : (int)((experts + 31) / 32);
  int lane = threadIdx.x;
  for (long long t = (long long)blockIdx.x * blockDim.y + threadIdx.y; t < tokens;
       t += (long long)gridDim.x * blockDim.y) {
    const float *v = topv + t * top_k, *dg = dgate + t * top_k, *s = scores + t * experts;
    const int *ix = idx + t * top_k;
    float *dl = dlogits + t * experts;
    // the normalization's sums, as moert_cpu_gate_normalize_bwd (every lane)
    double vs = 0.0, vdot = 0.0;
    if (normalize) {
#pragma unroll
      for (long long j = 0; j < top_k; j++) {
        vs += v[j];
        vdot += (double)dg[j] * v[j];
      }
    }
    float dsv[NE], sv[NE]; // REG: this lane's dscores and scores
    double dot = 0.0;
#pragma unroll
    for (int q = 0; q < slots; q++) {
      long long e = lane + 32ll * q;
      if (e >= experts) break;
      float d = 0.0f;
      if (dscore_coef) d = (float)((double)d + (double)weight * dscore_coef[e]);
#pragma unroll
      for (long long j = 0; j < top_k; j++)
        if ((long long)ix[j] == e) {
          float dv;
          if (!normalize) dv = dg[j];
          else if (vs > MOERT_GATE_SUM_FLOOR) dv = (float)(dg[j] / vs - vdot / (vs * vs));
          else dv = (float)(dg[j] / MOERT_GATE_SUM_FLOOR);
          d += dv;
        }
      float se = s[e];
      if constexpr (REG) {
        dsv[q] = d;
        sv[q] = se;
      } else {
        dl[e] = d; // read back by this lane only
      }
      dot += (double)d * se;
    }
    dot = moert_warp_sum_d(dot);
#pragma unroll
    for (int q = 0; q < slots; q++) {
      long long e = lane + 32ll * q;
      if (e >= experts) break;
      float d, se;
      if constexpr (REG) d = dsv[q], se = sv[q];
      else d = dl[e], se = s[e];
      dl[e] = (float)((double)se * ((double)d - dot));
    }
  }
}

extern "C" __global__ void moert_k_gate_bwd(const float *scores, const int *idx,
                                            const float *topv, const float *dgate,
                                            const float *dscore_coef, float weight,
                                            float *dlogits, long long tokens, long long experts,
                                            long long top_k, int normalize) {
  moert_gate_bwd_impl<0, 0>(scores, idx, topv, dgate, dscore_coef, weight, dlogits, tokens,
                            experts, top_k, normalize);
}
