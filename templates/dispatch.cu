// dispatch.cu — moving tokens between the token layout [tokens, dim] and the
// padded expert layout [experts, capacity, dim]: dispatch and combine
// (gates applied when combining, Tutel's "post-score") and their backward,
// dropping claims beyond a capacity, and strided block copies (packing chunks
// for the all-to-all). Semantics: runtime/cpu_ops.h and backend.h.
//
// Each kernel makes one pass over the tokens, a block a token (blocks stride
// over the tokens), 16-byte loads and stores when dim % 4 == 0 and the
// pointers are aligned. Token-side outputs (dx, y) are gathers, written once
// in choice order as the cpu sums them. Expert-side outputs (buf, dbuf) are
// scatters of whole rows: the kept claims fill their slots, and the caller
// zeroes the others first: with the claim counts, only the slots past each
// expert's kept claims (zero_tails), else the whole buffer (cuMemsetD8Async);
// two claims on one slot (which gate_locations never makes) would race.
//
// Launch (runtime/backend_cuda.c): dispatch, dispatch_bwd, combine and
// combine_bwd: a block a token (at most 2^20 blocks, striding beyond), 32 to
// 256 threads (about a row of float4s); drop_beyond: 1-D grid-stride;
// copy_blocks: blockIdx.x over a block's elements, blockIdx.y striding over
// the blocks.

// ---------------------------------------------------------------- kernels

// moert_slot (the offset of a claim's slot) is in common.cuh, shared with bf16.cu.

// buf[e, c, :] = x[t, :] for every kept claim (t, j) on (e, c); the caller has
// zeroed buf.
extern "C" __global__ void moert_k_dispatch(const float *x, const int *idx, const int *loc,
                                            float *buf, long long tokens, long long top_k,
                                            long long experts, long long capacity,
                                            long long dim) {
  bool v4 = dim % 4 == 0 && moert_aligned16(x) && moert_aligned16(buf);
  long long w = v4 ? dim / 4 : dim;
  for (long long t = blockIdx.x; t < tokens; t += gridDim.x) {
    const float *xt = x + t * dim;
    for (long long j = 0; j < top_k; j++) {
      long long at = moert_slot(idx, loc, t * top_k + j, experts, capacity, dim);
      if (at < 0) continue;
      float *slot = buf + at;
      for (long long i = threadIdx.x; i < w; i += blockDim.x) {
        if (v4) ((float4 *)slot)[i] = ((const float4 *)xt)[i];
        else slot[i] = xt[i];
      }
    }
  }
}

// dx[t, :] = sum over the kept choices j of dbuf[idx, loc, :] (written).
extern "C" __global__ void moert_k_dispatch_bwd(const float *dbuf, const int *idx,
                                                const int *loc, float *dx, long long tokens,
                                                long long top_k, long long experts,
                                                long long capacity, long long dim) {
  bool v4 = dim % 4 == 0 && moert_aligned16(dbuf) && moert_aligned16(dx);
  long long w = v4 ? dim / 4 : dim;
  for (long long t = blockIdx.x; t < tokens; t += gridDim.x) {
    float *d = dx + t * dim;
    for (long long i = threadIdx.x; i < w; i += blockDim.x) {
      float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      for (long long j = 0; j < top_k; j++) {
        long long at = moert_slot(idx, loc, t * top_k + j, experts, capacity, dim);
        if (at < 0) continue;
        if (v4) {
          float4 v = ((const float4 *)(dbuf + at))[i];
          acc.x += v.x;
          acc.y += v.y;
          acc.z += v.z;
          acc.w += v.w;
        } else {
          acc.x += dbuf[at + i];
        }
      }
      if (v4) ((float4 *)d)[i] = acc;
      else d[i] = acc.x;
    }
  }
}

// y[t, :] = sum over the kept choices j of gate[t*k + j] * buf[idx, loc, :];
// 0 for a token with no kept choice.
extern "C" __global__ void moert_k_combine(const float *buf, const int *idx, const int *loc,
                                           const float *gate, float *y, long long tokens,
                                           long long top_k, long long experts,
                                           long long capacity, long long dim) {
  bool v4 = dim % 4 == 0 && moert_aligned16(buf) && moert_aligned16(y);
  long long w = v4 ? dim / 4 : dim;
  for (long long t = blockIdx.x; t < tokens; t += gridDim.x) {
    float *yt = y + t * dim;
    for (long long i = threadIdx.x; i < w; i += blockDim.x) {
      float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      for (long long j = 0; j < top_k; j++) {
        long long tj = t * top_k + j;
        long long at = moert_slot(idx, loc, tj, experts, capacity, dim);
        if (at < 0) continue;
        float g = gate[tj];
        if (v4) {
          float4 v = ((const float4 *)(buf + at))[i];
          acc.x += g * v.x;
          acc.y += g * v.y;
          acc.z += g * v.z;
          acc.w += g * v.w;
        } else {
          acc.x += g * buf[at + i];
        }
      }
      if (v4) ((float4 *)yt)[i] = acc;
      else yt[i] = acc.x;
    }
  }
}

// dbuf[e, c, :] = gate * dy[t, :] for the kept slots (the caller has zeroed
// dbuf); dgate[t*k + j] = <dy[t], buf[idx, loc]> for kept choices, else 0.
extern "C" __global__ void moert_k_combine_bwd(const float *dy, const float *buf,
                                               const int *idx, const int *loc,
                                               const float *gate, float *dbuf, float *dgate,
                                               long long tokens, long long top_k,
                                               long long experts, long long capacity,
                                               long long dim) {
  __shared__ double sh[MOERT_MAX_WARPS];
  bool v4 = dim % 4 == 0 && moert_aligned16(dy) && moert_aligned16(buf) && moert_aligned16(dbuf);
  long long w = v4 ? dim / 4 : dim;
  for (long long t = blockIdx.x; t < tokens; t += gridDim.x) {
    const float *dyt = dy + t * dim;
    for (long long j = 0; j < top_k; j++) { // the same branches in the whole block
      long long tj = t * top_k + j;
      long long at = moert_slot(idx, loc, tj, experts, capacity, dim);
      if (at < 0) {
        if (threadIdx.x == 0) dgate[tj] = 0.0f;
        continue;
      }
      float g = gate[tj];
      double dot = 0.0;
      for (long long i = threadIdx.x; i < w; i += blockDim.x) {
        if (v4) {
          float4 d = ((const float4 *)dyt)[i], b = ((const float4 *)(buf + at))[i], o;
          o.x = g * d.x;
          o.y = g * d.y;
          o.z = g * d.z;
          o.w = g * d.w;
          ((float4 *)(dbuf + at))[i] = o;
          dot += (double)d.x * b.x + (double)d.y * b.y + (double)d.z * b.z + (double)d.w * b.w;
        } else {
          dbuf[at + i] = g * dyt[i];
          dot += (double)dyt[i] * buf[at + i];
        }
      }
      dot = moert_block_sum_d(dot, sh);
      if (threadIdx.x == 0) dgate[tj] = (float)dot;
    }
  }
}

// The slots past each expert's kept claims, [min(counts[e], keep), capacity)
// of buf [experts, capacity, row_bytes bytes], set to zero: the kept claims
// fill [0, min(counts[e], keep)) (gate_locations numbers an expert's claims
// from 0, drop_beyond drops those from keep on), which dispatch and
// combine_bwd write. 16-byte stores where the tail allows.
extern "C" __global__ void moert_k_zero_tails(unsigned char *buf, const int *counts, long long keep,
                                              long long experts, long long capacity,
                                              long long row_bytes) {
  for (long long e = blockIdx.y; e < experts; e += gridDim.y) {
    long long c = counts[e];
    c = c < 0 ? 0 : c > keep ? keep : c;
    c = c > capacity ? capacity : c;
    unsigned char *p = buf + (e * capacity + c) * row_bytes;
    long long n = (capacity - c) * row_bytes;
    long long i0 = (long long)blockIdx.x * blockDim.x + threadIdx.x, step = (long long)gridDim.x * blockDim.x;
    if (((unsigned long long)p & 15) == 0 && n % 16 == 0) {
      for (long long i = i0; i < n / 16; i += step) ((uint4 *)p)[i] = make_uint4(0, 0, 0, 0);
    } else {
      for (long long i = i0; i < n; i += step) p[i] = 0;
    }
  }
}

// loc[i] >= keep becomes INT32_MAX (dropped whatever the padded capacity).
extern "C" __global__ void moert_k_drop_beyond(int *loc, long long n, long long keep) {
  for (long long i = moert_gtid(); i < n; i += moert_gstride())
    if ((long long)loc[i] >= keep) loc[i] = MOERT_INT32_MAX;
}

// nblocks blocks of `block` floats: dst + b*dst_stride = (or +=, when add)
// src + b*src_stride. Blocks must not overlap their sources.
extern "C" __global__ void moert_k_copy_blocks(float *dst, long long dst_stride, const float *src,
                                               long long src_stride, long long nblocks,
                                               long long block, int add) {
  bool v4 = block % 4 == 0 && dst_stride % 4 == 0 && src_stride % 4 == 0 &&
            moert_aligned16(dst) && moert_aligned16(src);
  long long w = v4 ? block / 4 : block;
  for (long long b = blockIdx.y; b < nblocks; b += gridDim.y) {
    float *d = dst + b * dst_stride;
    const float *s = src + b * src_stride;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < w;
         i += (long long)gridDim.x * blockDim.x) {
      if (v4) {
        float4 v = ((const float4 *)s)[i];
        if (add) {
          float4 o = ((float4 *)d)[i];
          v.x += o.x;
          v.y += o.y;
          v.z += o.z;
          v.w += o.w;
        }
        ((float4 *)d)[i] = v;
      } else {
        d[i] = add ? d[i] + s[i] : s[i];
      }
    }
  }
}
