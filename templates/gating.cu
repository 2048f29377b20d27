// gating.cu — the MoE gate after the gate GEMM: softmax and top-k, combine
// weights, capacity locations, the batch-prioritized order, load statistics
// and the aux loss, and the gate's backward. Semantics: runtime/cpu_ops.h;
// exactly the cpu ops' choices: scores computed in double and rounded as the
// cpu rounds them, ties to the lower expert index, NaN after every number,
// all choice-0 claims (in token or priority order) before all choice-1 ones.
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

// scores = softmax(logits + noise) per row (noise may be null), then the
// top_k best scores in ranking order: idx[t*k + j], topv[t*k + j].
extern "C" __global__ void moert_k_gate_topk(const float *logits, const float *noise,
                                             float *scores, int *idx, float *topv,
                                             long long tokens, long long experts,
                                             long long top_k) {
  int lane = threadIdx.x;
  for (long long t = (long long)blockIdx.x * blockDim.y + threadIdx.y; t < tokens;
       t += (long long)gridDim.x * blockDim.y) {
    const float *l = logits + t * experts, *nz = noise ? noise + t * experts : 0;
    float *s = scores + t * experts;
    double mx = -(double)MOERT_INF;
    for (long long e = lane; e < experts; e += 32) {
      double v = (double)l[e] + (nz ? (double)nz[e] : 0.0);
      mx = v > mx ? v : mx;
    }
    mx = moert_warp_max_d(mx);
    // As the cpu: the score is (float)((float)p / sum), sum of the unrounded p.
    double sum = 0.0;
    for (long long e = lane; e < experts; e += 32) {
      double p = exp((double)l[e] + (nz ? (double)nz[e] : 0.0) - mx);
      s[e] = (float)p;
      sum += p;
    }
    sum = moert_warp_sum_d(sum);
    for (long long e = lane; e < experts; e += 32) s[e] = (float)((double)s[e] / sum);
    // Choice j: the best, in ranking order, of the experts ranked after
    // choice j-1. Each lane reads back only the scores it wrote.
    long long prev = -1;
    float sprev = 0.0f;
    for (long long j = 0; j < top_k; j++) {
      long long best = -1;
      float sb = 0.0f;
      for (long long e = lane; e < experts; e += 32) {
        float se = s[e];
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

// gate = topv, or topv / max(sum_j topv, 1e-9) per token when normalize.
extern "C" __global__ void moert_k_gate_normalize(const float *topv, float *gate,
                                                  long long tokens, long long top_k,
                                                  int normalize) {
  for (long long t = moert_gtid(); t < tokens; t += moert_gstride()) {
    const float *v = topv + t * top_k;
    float *g = gate + t * top_k;
    double d = 1.0;
    if (normalize) {
      double s = 0.0;
      for (long long j = 0; j < top_k; j++) s += v[j];
      d = s > MOERT_GATE_SUM_FLOOR ? s : MOERT_GATE_SUM_FLOOR;
    }
    for (long long j = 0; j < top_k; j++) g[j] = (float)(v[j] / d);
  }
}

// dtopv from dgate: dv_i = dg_i / s - sum_j dg_j v_j / s^2.
extern "C" __global__ void moert_k_gate_normalize_bwd(const float *topv, const float *dgate,
                                                      float *dtopv, long long tokens,
                                                      long long top_k, int normalize) {
  for (long long t = moert_gtid(); t < tokens; t += moert_gstride()) {
    const float *v = topv + t * top_k, *dg = dgate + t * top_k;
    float *dv = dtopv + t * top_k;
    double s = 0.0, dot = 0.0;
    if (normalize)
      for (long long j = 0; j < top_k; j++) {
        s += v[j];
        dot += (double)dg[j] * v[j];
      }
    if (!normalize) {
      for (long long j = 0; j < top_k; j++) dv[j] = dg[j];
    } else if (s > MOERT_GATE_SUM_FLOOR) {
      for (long long j = 0; j < top_k; j++) dv[j] = (float)(dg[j] / s - dot / (s * s));
    } else {
      for (long long j = 0; j < top_k; j++) dv[j] = (float)(dg[j] / MOERT_GATE_SUM_FLOOR);
    }
  }
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
extern "C" __global__ void moert_k_gate_locations(const int *idx, const int *order, int *loc,
                                                  int *counts, long long tokens,
                                                  long long experts, long long top_k) {
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

// Partials of the load statistics over the slab of experts [c0, c0 + w)
// (scores offset to c0 by the caller, ld = experts): the column sums of the
// scores, and the number of tokens whose first choice is each expert.
extern "C" __global__ void moert_k_gate_stats_part(const float *scores, const int *idx,
                                                   long long rows, long long ld, long long w,
                                                   long long rpc, long long c0, long long top_k,
                                                   double *part_sum, double *part_count) {
  moert_colsum_part<2>(
      [&](long long r, long long c, double *acc) {
        acc[0] += scores[r * ld + c];
        acc[1] += (long long)idx[r * top_k] == c0 + c ? 1.0 : 0.0;
      },
      rows, w, rpc, part_sum, part_count);
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
extern "C" __global__ void moert_k_gate_scores_bwd(const int *idx, const float *dtopv,
                                                   const float *dscore_coef, float weight,
                                                   float *dscores, long long tokens,
                                                   long long experts, long long top_k) {
  for (long long t = blockIdx.y; t < tokens; t += gridDim.y)
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < experts;
         e += (long long)gridDim.x * blockDim.x) {
      float d = dscores[t * experts + e];
      if (dscore_coef) d = (float)((double)d + (double)weight * dscore_coef[e]);
      if (dtopv)
        for (long long j = 0; j < top_k; j++)
          if ((long long)idx[t * top_k + j] == e) d += dtopv[t * top_k + j];
      dscores[t * experts + e] = d;
    }
}

// dlogits = s * (ds - sum(ds * s)) per row.
extern "C" __global__ void moert_k_softmax_bwd(const float *scores, const float *dscores,
                                               float *dlogits, long long rows, long long cols) {
  __shared__ double sh[MOERT_MAX_ROWS * MOERT_MAX_WARPS];
  for (long long base = (long long)blockIdx.x * blockDim.y; base < rows;
       base += (long long)gridDim.x * blockDim.y) {
    long long r = base + threadIdx.y;
    bool live = r < rows; // every thread iterates alike: group sums synchronize
    const float *s = scores + r * cols, *ds = dscores + r * cols;
    double dot = 0.0;
    if (live)
      for (long long c = threadIdx.x; c < cols; c += blockDim.x) dot += (double)ds[c] * s[c];
    dot = moert_group_sum_d(dot, sh);
    if (live) {
      float *dl = dlogits + r * cols;
      for (long long c = threadIdx.x; c < cols; c += blockDim.x)
        dl[c] = (float)((double)s[c] * ((double)ds[c] - dot));
    }
  }
}
