// gating.cu — the MoE gate after the gate GEMM: softmax or sigmoid scores
// and top-k (on scores + bias, group-limited) or expert choice, combine
// weights, capacity locations, the batch-prioritized order, load statistics
// (the z and entropy sums too) and the aux loss, and the gate's backward.
// Semantics: runtime/cpu_ops.h (moert_cpu_gate_io, moert_cpu_gate_bwd_io);
// exactly the cpu ops' choices: scores computed in double and rounded as the
// cpu rounds them, selection keys score + bias in fp32 as the cpu's, ties to
// the lower expert (group, token) index, NaN after every number, all
// choice-0 claims (in token or priority order) before all choice-1 ones.
//
// Specialization (common.cuh, compiler/emit_cuda.c): the kernels that a
// model's kernels.cu specializes are `template <...> moert_X_impl`s over
// their dims (0: a runtime argument), wrapped by the generic moert_k_X.
//
// Launch (runtime/backend_cuda.c): the gate after its GEMM is two kernels
// (four with the priority order), its backward one.
// - gate_topk: a warp a token, blockDim (32, 8), a grid the scratch holds
//   the partials of (10 KiB of static shared memory: the warps' group scores).
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
// - gate_ec (expert choice, in gate_locations' place): one block (512
//   threads) an expert, a radix select of its column then ranks by counting
//   among the taken tokens; its lists in the scratch.
// - gate_bwd: a warp a token, blockDim (32, 8).

// ---------------------------------------------------------------- kernels

// The floor of the sum of the top-k scores when they are normalized, and of
// the sum of a token's sigmoid scores when the statistics normalize them.
#define MOERT_GATE_SUM_FLOOR 1e-9

// Claims a thread of gate_locations takes at a time.
#define MOERT_GATE_LOC_V 4

// With E known and at most this many experts, a lane of gate_topk keeps its
// E/32 scores in registers.
#define MOERT_GATE_REG_EXPERTS 512

// The largest top_k that gate_topk and gate_bwd unroll when it is known at
// compile time; a larger K (expert choice's top_k = experts) is taken as a
// runtime value, so that a specialization does not unroll hundreds of
// choices.
#define MOERT_GATE_UNROLL_K 16

// The most expert groups of group-limited routing: a warp of gate_topk keeps
// a token's group scores and kept flags in shared memory (5 bytes a group
// and warp: 10 KiB a block of 8 warps). runtime/backend_cuda.c refuses more.
#define MOERT_GATE_MAX_GROUPS 256

// The columns of gate_topk's per-block partials past the experts' score
// sums: the z-loss's sum of lse^2 and the entropy's sum.
#define MOERT_GATE_PART_EXTRA 2

// True when the value a ranks before b, as moert_ranks_before ignoring the
// indices (equal values are interchangeable): larger first, NaN last.
__device__ __forceinline__ bool moert_value_before(float a, float b) {
  return !isnan(a) && (isnan(b) || a > b);
}

// The best two values (n of them, 0 to 2) of a set, merged with another's.
__device__ __forceinline__ void moert_top2_merge(float &a1, float &a2, int &na, float b1, float b2,
                                                 int nb) {
  if (nb == 0) return;
  if (na == 0) {
    a1 = b1, a2 = b2, na = nb;
    return;
  }
  if (moert_value_before(b1, a1)) {
    a2 = nb == 2 && moert_value_before(b2, a1) ? b2 : a1;
    a1 = b1;
  } else if (na < 2 || moert_value_before(b1, a2)) {
    a2 = b1;
  }
  na = na + nb < 2 ? na + nb : 2;
}

// The gate's first kernel, a warp a token (moert_cpu_gate_fwd up to the
// locations): scores = softmax(logits + noise), or sigmoid(logits + noise)
// when sigmoid (noise may be null). Token choice (ec == 0): the top_k best
// experts in ranking order of their selection keys, the score plus bias[e]
// in fp32 (bias may be null), within the top_groups best groups when groups
// > 1 (a group's score: the sum of its two best keys, or its one; groups of
// experts / groups experts, the experts past groups of them never chosen):
// idx[t*k + j] and the scores topv[t*k + j]; the combine weights gate[t*k +
// j] = topv (or topv over max(sum_j topv, 1e-9) when normalize) times
// route_scale (0: 1). Expert choice (ec != 0, top_k == experts): idx = e,
// topv = the score, gate = topv * route_scale, and top1[t] = the token's
// best-scored expert (gate_ec's). When part is not null, this block's
// partial sums over its tokens: part[blockIdx.x * pw + e] of the scores
// (normalized over the experts when sigmoid: norm[t] keeps each token's
// floored sum of them), then, when z != 0, of lse(logits + noise)^2 at column
// experts, and, when ent != 0, of the entropies (nats) at experts + 1; all
// finished by gate_locations or gate_ec. blockDim (32, 8).
// E, K: the experts and top_k when known at compile time, else 0.
template <int E, int K>
__device__ __forceinline__ void moert_gate_topk_impl(
    const float *logits, const float *noise, const float *bias, float *scores, int *idx,
    float *topv, float *gate, int normalize, int sigmoid, long long groups, long long top_groups,
    float route_scale, int ec, int *top1, double *norm, double *part, long long pw, int z, int ent,
    long long tokens, long long experts_arg, long long top_k_arg) {
  constexpr int KU = K <= MOERT_GATE_UNROLL_K ? K : 0;
  const long long experts = E > 0 ? E : experts_arg, top_k = KU > 0 ? KU : top_k_arg;
  constexpr bool REG = E > 0 && E <= MOERT_GATE_REG_EXPERTS;
  constexpr int NE = REG ? (E + 31) / 32 : 1;
  __shared__ float group_score[MOERT_MAX_ROWS][MOERT_GATE_MAX_GROUPS];
  __shared__ unsigned char group_kept[MOERT_MAX_ROWS][MOERT_GATE_MAX_GROUPS];
  __shared__ double extra[MOERT_GATE_PART_EXTRA][MOERT_MAX_ROWS];
  // expert e = lane + 32 q of this lane's slot q
  const int slots = REG ? NE : (int)((experts + 31) / 32);
  const float rs = route_scale == 0.0f ? 1.0f : route_scale;
  const long long gsize = groups > 1 ? experts / groups : experts;
  int lane = threadIdx.x, w = threadIdx.y;
  double zacc = 0.0, hacc = 0.0; // this warp's sums over its tokens (alike in every lane)
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
    // softmax as the cpu: the score is (float)((float)p / sum), sum of the
    // unrounded p; the same sum gives the logsumexp
    double sum = 0.0;
    if (!sigmoid || z) {
#pragma unroll
      for (int q = 0; q < slots; q++) {
        long long e = lane + 32ll * q;
        if (e >= experts) break;
        double p = exp((double)l[e] + (nz ? (double)nz[e] : 0.0) - mx);
        if (!sigmoid) {
          if constexpr (REG) sv[q] = (float)p;
          else s[e] = (float)p;
        }
        sum += p;
      }
      sum = moert_warp_sum_d(sum);
    }
    if (z) {
      double lse = mx + log(sum);
      zacc += lse * lse;
    }
    double ssum = 0.0; // sigmoid: the scores' sum
#pragma unroll
    for (int q = 0; q < slots; q++) {
      long long e = lane + 32ll * q;
      if (e >= experts) break;
      float se;
      if (sigmoid) se = (float)(1.0 / (1.0 + exp(-((double)l[e] + (nz ? (double)nz[e] : 0.0)))));
      else if constexpr (REG) se = (float)((double)sv[q] / sum);
      else se = (float)((double)s[e] / sum);
      if constexpr (REG) sv[q] = se;
      s[e] = se;
      ssum += se;
    }
    // the statistics' normalization (1 for softmax scores) and the entropy
    double nrm = 1.0;
    if (sigmoid) {
      ssum = moert_warp_sum_d(ssum);
      nrm = ssum > MOERT_GATE_SUM_FLOOR ? ssum : MOERT_GATE_SUM_FLOOR;
      if (norm && lane == 0) norm[t] = nrm;
    }
    if (ent) {
      double h = 0.0;
#pragma unroll
      for (int q = 0; q < slots; q++) {
        long long e = lane + 32ll * q;
        if (e >= experts) break;
        float se;
        if constexpr (REG) se = sv[q];
        else se = s[e];
        double p = se / nrm;
        if (p > 0) h -= p * log(p);
      }
      hacc += moert_warp_sum_d(h);
    }
    if (ec) {
      // expert choice: every slot is its expert's; the best-scored expert
      long long best = -1;
      float sb = 0.0f;
#pragma unroll
      for (int q = 0; q < slots; q++) {
        long long e = lane + 32ll * q;
        if (e >= experts) break;
        float se;
        if constexpr (REG) se = sv[q];
        else se = s[e];
        idx[t * experts + e] = (int)e;
        topv[t * experts + e] = se;
        gate[t * experts + e] = se * rs;
        if (best < 0 || moert_ranks_before(se, e, sb, best)) best = e, sb = se;
      }
      for (int o = 16; o > 0; o >>= 1) {
        long long ob = __shfl_xor_sync(MOERT_FULL_MASK, best, o);
        float os = __shfl_xor_sync(MOERT_FULL_MASK, sb, o);
        if (ob >= 0 && (best < 0 || moert_ranks_before(os, ob, sb, best))) best = ob, sb = os;
      }
      if (lane == 0) top1[t] = (int)best;
      continue; // uniform in the warp
    }
    // The selection keys: the score plus the bias (fp32), as the cpu's.
#define MOERT_KEY(e, se) (bias ? (se) + bias[e] : (se))
    if (groups > 1) {
      // group q's score, the sum of its two best keys (its one), in every
      // lane; then each group's rank among the groups (ties: the lower)
      __syncwarp(); // the last token's readers of the warp's rows are done
      for (long long q = 0; q < groups; q++) {
        long long g0 = q * gsize;
        float a1 = 0.0f, a2 = 0.0f;
        int na = 0;
        for (long long e = g0 + (((lane - g0) % 32) + 32) % 32; e < g0 + gsize; e += 32) {
          float k = MOERT_KEY(e, s[e]); // s: this lane's own writes
          moert_top2_merge(a1, a2, na, k, 0.0f, 1);
        }
        for (int o = 16; o > 0; o >>= 1) {
          float b1 = __shfl_xor_sync(MOERT_FULL_MASK, a1, o);
          float b2 = __shfl_xor_sync(MOERT_FULL_MASK, a2, o);
          int nb = __shfl_xor_sync(MOERT_FULL_MASK, na, o);
          moert_top2_merge(a1, a2, na, b1, b2, nb);
        }
        if (lane == 0) group_score[w][q] = na == 2 ? a1 + a2 : a1;
      }
      __syncwarp();
      for (long long q = lane; q < groups; q += 32) {
        float gq = group_score[w][q];
        long long r = 0;
        for (long long p = 0; p < groups; p++) r += moert_ranks_before(group_score[w][p], p, gq, q);
        group_kept[w][q] = r < top_groups;
      }
      __syncwarp();
    }
    // Choice j: the best, in ranking order of the keys, of the allowed
    // experts ranked after choice j-1.
    long long prev = -1;
    float kprev = 0.0f;
    float vr[KU > 0 ? KU : 1]; // KU: the chosen scores, for the weights
#pragma unroll
    for (long long j = 0; j < top_k; j++) {
      long long best = -1;
      float kb = 0.0f, sb = 0.0f;
#pragma unroll
      for (int q = 0; q < slots; q++) {
        long long e = lane + 32ll * q;
        if (e >= experts) break;
        if (groups > 1 && (e >= groups * gsize || !group_kept[w][e / gsize])) continue;
        float se;
        if constexpr (REG) se = sv[q];
        else se = s[e];
        float ke = MOERT_KEY(e, se);
        if (prev >= 0 && !moert_ranks_before(kprev, prev, ke, e)) continue;
        if (best < 0 || moert_ranks_before(ke, e, kb, best)) {
          best = e;
          kb = ke;
          sb = se;
        }
      }
      // A total order: every lane ends with the same best.
      for (int o = 16; o > 0; o >>= 1) {
        long long ob = __shfl_xor_sync(MOERT_FULL_MASK, best, o);
        float ok = __shfl_xor_sync(MOERT_FULL_MASK, kb, o);
        float os = bias ? __shfl_xor_sync(MOERT_FULL_MASK, sb, o) : ok;
        if (ob >= 0 && (best < 0 || moert_ranks_before(ok, ob, kb, best))) {
          best = ob;
          kb = ok;
          sb = os;
        }
      }
#undef MOERT_KEY
      float v = best >= 0 ? sb : 0.0f;
      if constexpr (KU > 0) vr[j] = v;
      if (lane == 0) {
        idx[t * top_k + j] = (int)best;
        topv[t * top_k + j] = v;
      }
      prev = best;
      kprev = kb;
    }
    // The weights, as moert_cpu_gate_normalize and the route scale after it;
    // without KU, lane 0 reads back the topv it wrote.
    if (lane == 0) {
      const float *v = topv + t * top_k;
#define MOERT_V(j) (KU > 0 ? vr[KU > 0 ? (j) : 0] : v[j])
      double d = 1.0;
      if (normalize) {
        double sv2 = 0.0;
#pragma unroll
        for (long long j = 0; j < top_k; j++) sv2 += MOERT_V(j);
        d = sv2 > MOERT_GATE_SUM_FLOOR ? sv2 : MOERT_GATE_SUM_FLOOR;
      }
#pragma unroll
      for (long long j = 0; j < top_k; j++) {
        float gj = (float)(MOERT_V(j) / d);
        gate[t * top_k + j] = rs == 1.0f ? gj : gj * rs;
      }
#undef MOERT_V
    }
  }
  if (!part) return; // the same in every thread
  // This block's column sums, in token order, of the scores its warps wrote
  // (visible to the block after the barrier), and of the warps' z and
  // entropy sums in warp order.
  if (lane == 0) extra[0][w] = zacc, extra[1][w] = hacc;
  __syncthreads();
  int tid = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;
  for (long long e = tid; e < experts; e += nt) {
    double acc = 0.0;
    for (long long t0 = (long long)blockIdx.x * blockDim.y; t0 < tokens;
         t0 += (long long)gridDim.x * blockDim.y)
      for (long long t = t0; t < t0 + blockDim.y && t < tokens; t++)
        acc += sigmoid ? scores[t * experts + e] / norm[t] : (double)scores[t * experts + e];
    part[(long long)blockIdx.x * pw + e] = acc;
  }
  if (tid < MOERT_GATE_PART_EXTRA && experts + tid < pw) {
    double acc = 0.0;
    for (unsigned y = 0; y < blockDim.y; y++) acc += extra[tid][y];
    part[(long long)blockIdx.x * pw + experts + tid] = acc;
  }
}

extern "C" __global__ void moert_k_gate_topk(const float *logits, const float *noise,
                                             const float *bias, float *scores, int *idx,
                                             float *topv, float *gate, int normalize, int sigmoid,
                                             long long groups, long long top_groups,
                                             float route_scale, int ec, int *top1, double *norm,
                                             double *part, long long pw, int z, int ent,
                                             long long tokens, long long experts, long long top_k) {
  moert_gate_topk_impl<0, 0>(logits, noise, bias, scores, idx, topv, gate, normalize, sigmoid,
                             groups, top_groups, route_scale, ec, top1, norm, part, pw, z, ent,
                             tokens, experts, top_k);
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

// The statistics' end, by every block of gate_locations or gate_ec after its
// experts (every thread calls it): block 0 writes *z_sum and *entropy_sum
// (each when not null) from the nparts partials' columns experts and
// experts + 1 (pw a row); when loss is not null (the statistics are global:
// one rank), the last block to finish (counted in *done, which it resets to
// 0) computes the aux loss. Every block fenced its statistics before
// counting itself, so the last one reads them all.
__device__ void moert_gate_stats_end(const double *part, long long nparts, long long pw,
                                     float *z_sum, float *entropy_sum, const float *score_sum,
                                     const float *top1_count, float *dscore_coef,
                                     double global_tokens, float *loss, unsigned *done,
                                     long long experts) {
  __shared__ double sh[MOERT_MAX_WARPS];
  __shared__ bool last;
  int tid = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;
  if (blockIdx.x == 0) {
    float *out[MOERT_GATE_PART_EXTRA] = {z_sum, entropy_sum};
    for (int c = 0; c < MOERT_GATE_PART_EXTRA; c++) {
      if (!out[c]) continue; // the same in every thread
      double acc = 0.0;
      for (long long i = tid; i < nparts; i += nt) acc += part[i * pw + experts + c];
      acc = moert_block_sum_d(acc, sh);
      if (tid == 0) *out[c] = (float)acc;
    }
  }
  if (!loss) return; // the same in every thread
  __threadfence();
  __syncthreads();
  if (tid == 0) last = atomicAdd(done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  moert_aux_loss_block(score_sum, top1_count, dscore_coef, experts, global_tokens, loss);
  if (tid == 0) *done = 0u; // for the next launch
}

// The gate's second kernel. loc[t*k + j]: the running count of earlier
// claims on expert idx[t*k + j], all choice-0 claims (tokens in order, or in
// order[]) before all choice-1 claims; -1 for a claim on no expert.
// counts[e]: all claims on e. When score_sum is not null, the load
// statistics, written: score_sum[e] = the sum of gate_topk's nparts
// partials (rows of pw), top1_count[e] = the choice-0 claims on e; then
// moert_gate_stats_end (the z and entropy sums, the aux loss). One block an
// expert (blocks stride over the experts); blockDim.x a multiple of 32. K:
// top_k when known at compile time, else 0.
template <int K>
__device__ __forceinline__ void moert_gate_locations_impl(
    const int *idx, const int *order, int *loc, int *counts, const double *part,
    long long nparts, long long pw, float *score_sum, float *top1_count, float *dscore_coef,
    double global_tokens, float *loss, unsigned *done, float *z_sum, float *entropy_sum,
    long long tokens, long long experts, long long top_k_arg) {
  const long long top_k = K > 0 ? K : top_k_arg;
  __shared__ int warp_total[MOERT_MAX_WARPS];
  __shared__ double sh[MOERT_MAX_WARPS];
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
      for (long long i = threadIdx.x; i < nparts; i += blockDim.x) acc += part[i * pw + e];
      acc = moert_block_sum_d(acc, sh);
      if (threadIdx.x == 0) {
        score_sum[e] = (float)acc;
        top1_count[e] = (float)(double)first;
      }
    }
  }
  if (!score_sum) return; // the same in every thread
  moert_gate_stats_end(part, nparts, pw, z_sum, entropy_sum, score_sum, top1_count, dscore_coef,
                       global_tokens, loss, done, experts);
}

extern "C" __global__ void moert_k_gate_locations(const int *idx, const int *order, int *loc,
                                                  int *counts, const double *part,
                                                  long long nparts, long long pw, float *score_sum,
                                                  float *top1_count, float *dscore_coef,
                                                  double global_tokens, float *loss,
                                                  unsigned *done, float *z_sum, float *entropy_sum,
                                                  long long tokens, long long experts,
                                                  long long top_k) {
  moert_gate_locations_impl<0>(idx, order, loc, counts, part, nparts, pw, score_sum, top1_count,
                               dscore_coef, global_tokens, loss, done, z_sum, entropy_sum, tokens,
                               experts, top_k);
}

// Expert choice's second kernel (gate_locations' in its place), one block
// an expert (blocks stride over the experts), blockDim.x a multiple of 32:
// expert e takes the c = min(capacity, tokens) tokens of highest score
// (ranking order: ties to the lower token, NaN last), loc[t*experts + e] =
// the token's rank among them, -1 for the others; counts[e] = c. Then, when
// score_sum is not null, the statistics as gate_locations' but top1_count[e]
// = #{t : top1[t] == e} (gate_topk's best-scored experts).
//
// Selection: a token's 64-bit key, moert_rank_key(score) above the token's
// index, is unique and orders as the ranking. A radix select on the key, a
// byte a pass from the top, finds the byte prefix the c-th key shares with
// no key outside the c best: a pass histograms the next byte of the keys
// under the prefix so far (shared atomics: integer counts, exact in any
// order) and keeps the byte holding the c-th, stopping as soon as that byte's
// keys are all taken (typically after 2 or 3 passes of distinct scores; 8 at
// most). The taken tokens are gathered in list (this block's c ints of the
// scratch: list + blockIdx.x * c, in any order), and each one's rank is the
// number of taken keys below its own, counted over tiles of keys in shared
// memory. Cost an expert: O(tokens) a pass, plus O(c^2 / blockDim.x) for
// the ranks.
extern "C" __global__ void moert_k_gate_ec(const float *scores, const int *top1, int *loc,
                                           int *counts, long long capacity, int *list,
                                           const double *part, long long nparts, long long pw,
                                           float *score_sum, float *top1_count,
                                           float *dscore_coef, double global_tokens, float *loss,
                                           unsigned *done, float *z_sum, float *entropy_sum,
                                           long long tokens, long long experts) {
  __shared__ int hist[256];
  __shared__ unsigned long long tile[256];
  __shared__ int taken;
  __shared__ long long pick_below, pick_count;
  __shared__ int pick_byte;
  __shared__ double sh[MOERT_MAX_WARPS];
  const long long c = capacity < tokens ? capacity : tokens;
  int *mine = list + (long long)blockIdx.x * c;
  int tid = threadIdx.x, lane = tid & 31;
#define MOERT_EC_KEY(t)                                                                           \
  ((unsigned long long)moert_rank_key(scores[(t) * experts + e]) << 32 | (unsigned long long)(t))
  for (long long e = blockIdx.x; e < experts; e += gridDim.x) {
    // the taken keys: those whose top 64 - shift bits are <= prefix
    unsigned long long prefix = ~0ull;
    int shift = 0;
    if (c < tokens) {
      long long need = c; // keys still to take among those under the prefix
      prefix = 0;
      for (shift = 56; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (long long t = tid; t < tokens; t += blockDim.x) {
          unsigned long long k = MOERT_EC_KEY(t);
          if (shift == 56 || (k >> (shift + 8)) == prefix) atomicAdd(&hist[(int)(k >> shift) & 255], 1);
        }
        __syncthreads();
        // the byte whose keys hold the need-th: a warp scans the 256 counts,
        // 8 a lane
        if (tid < 32) {
          long long n = 0;
          for (int i = 0; i < 8; i++) n += hist[lane * 8 + i];
          long long incl = n;
          for (int o = 1; o < 32; o <<= 1) {
            long long x = __shfl_up_sync(MOERT_FULL_MASK, incl, o);
            if (lane >= o) incl += x;
          }
          long long below = incl - n;
          if (below < need && need <= incl)
            for (int i = 0; i < 8; i++) {
              int h = hist[lane * 8 + i];
              if (need <= below + h) {
                pick_byte = lane * 8 + i;
                pick_below = below;
                pick_count = h;
                break;
              }
              below += h;
            }
        }
        __syncthreads();
        need -= pick_below;
        prefix = prefix << 8 | (unsigned long long)pick_byte;
        if (need == pick_count) break; // the same in every thread
      }
    }
    // gather the taken tokens, the others' slots -1, the top-1 counts
    if (tid == 0) taken = 0;
    __syncthreads();
    long long n1 = 0;
    for (long long t = tid; t < tokens; t += blockDim.x) {
      n1 += top1[t] == e;
      if (c < tokens && (MOERT_EC_KEY(t) >> shift) > prefix) loc[t * experts + e] = -1;
      else if (int at = atomicAdd(&taken, 1); at < c) mine[at] = (int)t; // c of them
    }
    __syncthreads();
    // each taken token's rank: the taken keys below its own
    for (long long i0 = 0; i0 < c; i0 += blockDim.x) {
      long long i = i0 + tid, t = i < c ? mine[i] : 0;
      unsigned long long k = i < c ? MOERT_EC_KEY(t) : 0;
      long long r = 0;
      for (long long b = 0; b < c; b += 256) {
        __syncthreads();
        for (int x = tid; x < 256; x += blockDim.x)
          tile[x] = b + x < c ? MOERT_EC_KEY((long long)mine[b + x]) : ~0ull;
        __syncthreads();
        for (int x = 0; x < 256; x++) r += tile[x] < k;
      }
      if (i < c) loc[t * experts + e] = (int)r;
    }
    if (tid == 0) counts[e] = (int)c;
    if (score_sum) {
      double acc = 0.0;
      for (long long i = tid; i < nparts; i += blockDim.x) acc += part[i * pw + e];
      acc = moert_block_sum_d(acc, sh);
      double cnt = moert_block_sum_d((double)n1, sh);
      if (tid == 0) {
        score_sum[e] = (float)acc;
        top1_count[e] = (float)cnt;
      }
    }
    __syncthreads(); // hist, tile, taken and the picks are rewritten next
  }
#undef MOERT_EC_KEY
  if (!score_sum) return; // the same in every thread
  moert_gate_stats_end(part, nparts, pw, z_sum, entropy_sum, score_sum, top1_count, dscore_coef,
                       global_tokens, loss, done, experts);
}

// The aux loss alone (the statistics summed over ranks first): one block.
extern "C" __global__ void moert_k_aux_loss(const float *score_sum, const float *top1_count,
                                            float *dscore_coef, long long experts,
                                            double global_tokens, float *loss) {
  moert_aux_loss_block(score_sum, top1_count, dscore_coef, experts, global_tokens, loss);
}

// The gate's backward in one kernel (moert_cpu_gate_bwd), a warp a token:
// the scores' gradient ds[e] = the aux term (weight * dscore_coef[e] when
// not null; with a sigmoid gate through the normalizing p = s / max(sum s,
// 1e-9): (weight * dscore_coef[e] - sum_e' weight * dscore_coef[e'] p_e') /
// norm) plus the combine weights' term: token choice, dtopv of route_scale *
// dgate through the weights' normalization, added for each choice of e in
// choice order; expert choice (ec != 0, top_k == experts), route_scale *
// dgate[t*experts + e]. Then dlogits = s (ds - sum(ds s)), or ds s (1 - s)
// with a sigmoid gate; plus, when z_weight > 0, the z-loss's 2 z_weight lse
// softmax(logits + noise) / global_tokens.
// E, K: the experts and top_k when known at compile time, else 0.
template <int E, int K>
__device__ __forceinline__ void moert_gate_bwd_impl(
    const float *scores, const int *idx, const float *topv, const float *dgate,
    const float *dscore_coef, float weight, const float *logits, const float *noise,
    float z_weight, double global_tokens, float *dlogits, long long tokens, long long experts_arg,
    long long top_k_arg, int normalize, int sigmoid, float route_scale, int ec) {
  constexpr int KU = K <= MOERT_GATE_UNROLL_K ? K : 0;
  const long long experts = E > 0 ? E : experts_arg, top_k = KU > 0 ? KU : top_k_arg;
  constexpr bool REG = E > 0 && E <= MOERT_GATE_REG_EXPERTS;
  constexpr int NE = REG ? (E + 31) / 32 : 1;
  const int slots = REG ? NE : (int)((experts + 31) / 32);
  const float rs = route_scale == 0.0f ? 1.0f : route_scale;
  if (ec) normalize = 0;
  int lane = threadIdx.x;
  for (long long t = (long long)blockIdx.x * blockDim.y + threadIdx.y; t < tokens;
       t += (long long)gridDim.x * blockDim.y) {
    const float *v = topv + t * top_k, *dg = dgate + t * top_k, *s = scores + t * experts;
    const int *ix = idx + t * top_k;
    float *dl = dlogits + t * experts;
    // the normalization's sums, as moert_cpu_gate_normalize_bwd of
    // route_scale * dgate (every lane)
    double vs = 0.0, vdot = 0.0;
    if (normalize) {
#pragma unroll
      for (long long j = 0; j < top_k; j++) {
        vs += v[j];
        vdot += (double)(rs * dg[j]) * v[j];
      }
    }
    // a sigmoid gate's aux term: the scores' floored sum and sum_e c_e p_e
    double snorm = 1.0, cdot = 0.0;
    if (dscore_coef && sigmoid) {
      double ss = 0.0;
#pragma unroll
      for (int q = 0; q < slots; q++) {
        long long e = lane + 32ll * q;
        if (e >= experts) break;
        ss += s[e];
      }
      ss = moert_warp_sum_d(ss);
      snorm = ss > MOERT_GATE_SUM_FLOOR ? ss : MOERT_GATE_SUM_FLOOR;
#pragma unroll
      for (int q = 0; q < slots; q++) {
        long long e = lane + 32ll * q;
        if (e >= experts) break;
        cdot += (double)weight * dscore_coef[e] * (s[e] / snorm);
      }
      cdot = moert_warp_sum_d(cdot);
    }
    float dsv[NE], sv[NE]; // REG: this lane's dscores and scores
    double dot = 0.0;
#pragma unroll
    for (int q = 0; q < slots; q++) {
      long long e = lane + 32ll * q;
      if (e >= experts) break;
      float d = 0.0f;
      if (dscore_coef) {
        if (sigmoid) d = (float)(((double)weight * dscore_coef[e] - cdot) / snorm);
        else d = (float)((double)d + (double)weight * dscore_coef[e]);
      }
      if (ec) {
        d += rs * dgate[t * experts + e];
      } else {
#pragma unroll
        for (long long j = 0; j < top_k; j++)
          if ((long long)ix[j] == e) {
            float dgj = rs * dg[j], dv;
            if (!normalize) dv = dgj;
            else if (vs > MOERT_GATE_SUM_FLOOR) dv = (float)(dgj / vs - vdot / (vs * vs));
            else dv = (float)(dgj / MOERT_GATE_SUM_FLOOR);
            d += dv;
          }
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
    if (!sigmoid) dot = moert_warp_sum_d(dot);
    // the z-loss's logsumexp
    double lse = 0.0, zk = 0.0;
    if (z_weight > 0.0f) {
      const float *l = logits + t * experts, *nz = noise ? noise + t * experts : 0;
      double mx = -(double)MOERT_INF, sum = 0.0;
#pragma unroll
      for (int q = 0; q < slots; q++) {
        long long e = lane + 32ll * q;
        if (e >= experts) break;
        double x = (double)l[e] + (nz ? (double)nz[e] : 0.0);
        mx = x > mx ? x : mx;
      }
      mx = moert_warp_max_d(mx);
#pragma unroll
      for (int q = 0; q < slots; q++) {
        long long e = lane + 32ll * q;
        if (e >= experts) break;
        sum += exp((double)l[e] + (nz ? (double)nz[e] : 0.0) - mx);
      }
      sum = moert_warp_sum_d(sum);
      lse = mx + log(sum);
      zk = 2.0 * (double)z_weight * lse / global_tokens;
    }
#pragma unroll
    for (int q = 0; q < slots; q++) {
      long long e = lane + 32ll * q;
      if (e >= experts) break;
      float d, se;
      if constexpr (REG) d = dsv[q], se = sv[q];
      else d = dl[e], se = s[e];
      float r = sigmoid ? (float)((double)d * se * (1.0 - (double)se))
                        : (float)((double)se * ((double)d - dot));
      if (z_weight > 0.0f) {
        const float *l = logits + t * experts, *nz = noise ? noise + t * experts : 0;
        r = (float)(r + zk * exp((double)l[e] + (nz ? (double)nz[e] : 0.0) - lse));
      }
      dl[e] = r;
    }
  }
}

extern "C" __global__ void moert_k_gate_bwd(const float *scores, const int *idx,
                                            const float *topv, const float *dgate,
                                            const float *dscore_coef, float weight,
                                            const float *logits, const float *noise,
                                            float z_weight, double global_tokens, float *dlogits,
                                            long long tokens, long long experts, long long top_k,
                                            int normalize, int sigmoid, float route_scale,
                                            int ec) {
  moert_gate_bwd_impl<0, 0>(scores, idx, topv, dgate, dscore_coef, weight, logits, noise,
                            z_weight, global_tokens, dlogits, tokens, experts, top_k, normalize,
                            sigmoid, route_scale, ec);
}
