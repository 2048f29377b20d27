// bf16.cu — the expert path stored as bf16 (runtime/cpu_ops_typed.h):
// conversion, dispatch and combine between fp32 tokens and bf16 expert
// buffers, activations, bias and strided block copies on bf16 tensors. The
// arithmetic is fp32: loads widen, stores round to nearest even (the cpu's
// moert_f32_to_bf16). bf16 is carried as its 16 bits (unsigned short), so no
// CUDA header is needed.
//
// Launch (runtime/backend_cuda.c): convert, act, swiglu: 1-D grid-stride;
// dispatch, dispatch_bwd, combine, combine_bwd: a block a token, as the fp32
// kernels of dispatch.cu, 8 bf16 (16 bytes) at a time when dim % 8 == 0 and
// the pointers are aligned; bias_add: blockIdx.y over rows of all blocks;
// bias_grad: column partials in double finished by moert_k_colsum_add;
// copy_blocks: as the fp32 one. moert_bf16 and its conversions are in
// common.cuh (the optimizers of optim.cu write bf16 copies too).


// ---------------------------------------------------------------- kernels

// dst = src converted: dir 0 fp32 -> bf16, 1 bf16 -> fp32.
extern "C" __global__ void moert_k_cvt_f2bf(moert_bf16 *dst, const float *src, long long n) {
  for (long long i = moert_gtid(); i < n; i += moert_gstride()) dst[i] = moert_f2bf(src[i]);
}
extern "C" __global__ void moert_k_cvt_bf2f(float *dst, const moert_bf16 *src, long long n) {
  for (long long i = moert_gtid(); i < n; i += moert_gstride()) dst[i] = moert_bf2f(src[i]);
}

// 8 bf16 <-> 8 floats.
__device__ __forceinline__ void moert_unpack8(uint4 v, float *f) {
  unsigned w[4] = {v.x, v.y, v.z, v.w};
  for (int i = 0; i < 4; i++) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ uint4 moert_pack8(const float *f) {
  unsigned w[4];
  for (int i = 0; i < 4; i++)
    w[i] = (unsigned)moert_f2bf(f[2 * i]) | ((unsigned)moert_f2bf(f[2 * i + 1]) << 16);
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// buf[e, c, :] = bf16(x[t, :]) for every kept claim; the caller zeroed buf.
extern "C" __global__ void moert_k_dispatch_bf16(const float *x, const int *idx, const int *loc,
                                                 moert_bf16 *buf, long long tokens,
                                                 long long top_k, long long experts,
                                                 long long capacity, long long dim) {
  bool v8 = dim % 8 == 0 && moert_aligned16(x) && moert_aligned16(buf);
  long long w = v8 ? dim / 8 : dim;
  for (long long t = blockIdx.x; t < tokens; t += gridDim.x) {
    const float *xt = x + t * dim;
    for (long long j = 0; j < top_k; j++) {
      long long at = moert_slot(idx, loc, t * top_k + j, experts, capacity, dim);
      if (at < 0) continue;
      moert_bf16 *slot = buf + at;
      for (long long i = threadIdx.x; i < w; i += blockDim.x) {
        if (v8) {
          float4 a = ((const float4 *)xt)[2 * i], b = ((const float4 *)xt)[2 * i + 1];
          float f[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
          ((uint4 *)slot)[i] = moert_pack8(f);
        } else {
          slot[i] = moert_f2bf(xt[i]);
        }
      }
    }
  }
}

// dx[t, :] = sum over kept choices of dbuf[idx, loc, :] (fp32, written).
extern "C" __global__ void moert_k_dispatch_bwd_bf16(const moert_bf16 *dbuf, const int *idx,
                                                     const int *loc, float *dx, long long tokens,
                                                     long long top_k, long long experts,
                                                     long long capacity, long long dim) {
  bool v8 = dim % 8 == 0 && moert_aligned16(dbuf) && moert_aligned16(dx);
  long long w = v8 ? dim / 8 : dim;
  for (long long t = blockIdx.x; t < tokens; t += gridDim.x) {
    float *d = dx + t * dim;
    for (long long i = threadIdx.x; i < w; i += blockDim.x) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, v[8];
      for (long long j = 0; j < top_k; j++) {
        long long at = moert_slot(idx, loc, t * top_k + j, experts, capacity, dim);
        if (at < 0) continue;
        if (v8) {
          moert_unpack8(((const uint4 *)(dbuf + at))[i], v);
          for (int q = 0; q < 8; q++) acc[q] += v[q];
        } else {
          acc[0] += moert_bf2f(dbuf[at + i]);
        }
      }
      if (v8) {
        ((float4 *)d)[2 * i] = make_float4(acc[0], acc[1], acc[2], acc[3]);
        ((float4 *)d)[2 * i + 1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
      } else {
        d[i] = acc[0];
      }
    }
  }
}

// y[t, :] = sum over kept choices of gate * buf[idx, loc, :] (fp32).
extern "C" __global__ void moert_k_combine_bf16(const moert_bf16 *buf, const int *idx,
                                                const int *loc, const float *gate, float *y,
                                                long long tokens, long long top_k,
                                                long long experts, long long capacity,
                                                long long dim) {
  bool v8 = dim % 8 == 0 && moert_aligned16(buf) && moert_aligned16(y);
  long long w = v8 ? dim / 8 : dim;
  for (long long t = blockIdx.x; t < tokens; t += gridDim.x) {
    float *yt = y + t * dim;
    for (long long i = threadIdx.x; i < w; i += blockDim.x) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, v[8];
      for (long long j = 0; j < top_k; j++) {
        long long tj = t * top_k + j;
        long long at = moert_slot(idx, loc, tj, experts, capacity, dim);
        if (at < 0) continue;
        float g = gate[tj];
        if (v8) {
          moert_unpack8(((const uint4 *)(buf + at))[i], v);
          for (int q = 0; q < 8; q++) acc[q] += g * v[q];
        } else {
          acc[0] += g * moert_bf2f(buf[at + i]);
        }
      }
      if (v8) {
        ((float4 *)yt)[2 * i] = make_float4(acc[0], acc[1], acc[2], acc[3]);
        ((float4 *)yt)[2 * i + 1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
      } else {
        yt[i] = acc[0];
      }
    }
  }
}

// dbuf[e, c, :] = bf16(gate * dy[t, :]) for kept slots (the caller zeroed
// dbuf); dgate[t*k + j] = <dy[t], buf[idx, loc]> for kept choices, else 0.
extern "C" __global__ void moert_k_combine_bwd_bf16(const float *dy, const moert_bf16 *buf,
                                                    const int *idx, const int *loc,
                                                    const float *gate, moert_bf16 *dbuf,
                                                    float *dgate, long long tokens,
                                                    long long top_k, long long experts,
                                                    long long capacity, long long dim) {
  __shared__ double sh[MOERT_MAX_WARPS];
  bool v8 = dim % 8 == 0 && moert_aligned16(dy) && moert_aligned16(buf) && moert_aligned16(dbuf);
  long long w = v8 ? dim / 8 : dim;
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
        if (v8) {
          float4 a = ((const float4 *)dyt)[2 * i], b = ((const float4 *)dyt)[2 * i + 1];
          float d[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w}, v[8], o[8];
          moert_unpack8(((const uint4 *)(buf + at))[i], v);
          float s = 0.0f;
          for (int q = 0; q < 8; q++) {
            o[q] = g * d[q];
            s += d[q] * v[q];
          }
          ((uint4 *)(dbuf + at))[i] = moert_pack8(o);
          dot += (double)s;
        } else {
          dbuf[at + i] = moert_f2bf(g * dyt[i]);
          dot += (double)dyt[i] * moert_bf2f(buf[at + i]);
        }
      }
      dot = moert_block_sum_d(dot, sh);
      if (threadIdx.x == 0) dgate[tj] = (float)dot;
    }
  }
}

// a = act(h) on bf16.
template <int A> __device__ void moert_act_fwd_bf16(const moert_bf16 *h, moert_bf16 *a, long long n) {
  for (long long i = moert_gtid(); i < n; i += moert_gstride()) a[i] = moert_f2bf(moert_act<A>(moert_bf2f(h[i])));
}
template <int A>
__device__ void moert_act_bwd_bf16(const moert_bf16 *h, const moert_bf16 *da, moert_bf16 *dh, long long n) {
  for (long long i = moert_gtid(); i < n; i += moert_gstride())
    dh[i] = moert_f2bf(moert_act_grad<A>(moert_bf2f(h[i]), moert_bf2f(da[i])));
}
#define MOERT_ACT_BF16(name, A)                                                                   \
  extern "C" __global__ void moert_k_act_fwd_##name##_bf16(const moert_bf16 *h, moert_bf16 *a,   \
                                                           long long n) {                        \
    moert_act_fwd_bf16<A>(h, a, n);                                                              \
  }                                                                                              \
  extern "C" __global__ void moert_k_act_bwd_##name##_bf16(                                      \
      const moert_bf16 *h, const moert_bf16 *da, moert_bf16 *dh, long long n) {                  \
    moert_act_bwd_bf16<A>(h, da, dh, n);                                                         \
  }
MOERT_ACT_BF16(relu, MOERT_RELU)
MOERT_ACT_BF16(gelu, MOERT_GELU)
MOERT_ACT_BF16(silu, MOERT_SILU)

// swiglu over h [rows, 2*hid] -> a [rows, hid]; n = rows * hid.
extern "C" __global__ void moert_k_swiglu_fwd_bf16(const moert_bf16 *h, moert_bf16 *a, long long rows,
                                                   long long hid) {
  long long n = rows * hid;
  for (long long i = moert_gtid(); i < n; i += moert_gstride()) {
    long long r = i / hid, j = i - r * hid;
    const moert_bf16 *hr = h + r * 2 * hid;
    a[i] = moert_f2bf(moert_silu(moert_bf2f(hr[j])) * moert_bf2f(hr[hid + j]));
  }
}
// dh [rows, 2*hid] from da [rows, hid]: d gate = da * up * silu'(gate),
// d up = da * silu(gate).
extern "C" __global__ void moert_k_swiglu_bwd_bf16(const moert_bf16 *h, const moert_bf16 *da,
                                                   moert_bf16 *dh, long long rows, long long hid) {
  long long n = rows * hid;
  for (long long i = moert_gtid(); i < n; i += moert_gstride()) {
    long long r = i / hid, j = i - r * hid;
    const moert_bf16 *hr = h + r * 2 * hid;
    moert_bf16 *dr = dh + r * 2 * hid;
    float g = moert_bf2f(hr[j]), u = moert_bf2f(hr[hid + j]), d = moert_bf2f(da[i]);
    dr[j] = moert_f2bf(moert_act_grad<MOERT_SILU>(g, d * u));
    dr[hid + j] = moert_f2bf(d * moert_silu(g));
  }
}

// y[z] += bias[z] over count blocks of [rows, cols]: row q of all blocks is
// blockIdx.y (striding), block z = q / rows.
extern "C" __global__ void moert_k_bias_add_bf16(moert_bf16 *y, const moert_bf16 *bias, long long count,
                                                 long long rows, long long cols) {
  for (long long q = blockIdx.y; q < count * rows; q += gridDim.y) {
    moert_bf16 *yr = y + q * cols;
    const moert_bf16 *b = bias + (q / rows) * cols;
    for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c < cols;
         c += (long long)gridDim.x * blockDim.x)
      yr[c] = moert_f2bf(moert_bf2f(yr[c]) + moert_bf2f(b[c]));
  }
}

// Column partials of a bf16 [rows, w] block with row stride ld (as
// moert_k_bias_grad_part), for the bias gradient.
extern "C" __global__ void moert_k_bias_grad_part_bf16(const moert_bf16 *dy, long long rows, long long ld,
                                                       long long w, long long rpc, double *part) {
  moert_colsum_part<1>([&](long long r, long long c, double *acc) { acc[0] += moert_bf2f(dy[r * ld + c]); },
                       rows, w, rpc, part, (double *)0);
}

// As moert_k_copy_blocks over bf16 elements (add: summed in fp32, rounded).
extern "C" __global__ void moert_k_copy_blocks_bf16(moert_bf16 *dst, long long dst_stride,
                                                    const moert_bf16 *src, long long src_stride,
                                                    long long nblocks, long long block, int add) {
  bool v8 = block % 8 == 0 && dst_stride % 8 == 0 && src_stride % 8 == 0 && moert_aligned16(dst) &&
            moert_aligned16(src);
  long long w = v8 ? block / 8 : block;
  for (long long b = blockIdx.y; b < nblocks; b += gridDim.y) {
    moert_bf16 *d = dst + b * dst_stride;
    const moert_bf16 *s = src + b * src_stride;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < w;
         i += (long long)gridDim.x * blockDim.x) {
      if (v8) {
        uint4 v = ((const uint4 *)s)[i];
        if (add) {
          float a[8], o[8];
          moert_unpack8(v, a);
          moert_unpack8(((const uint4 *)d)[i], o);
          for (int q = 0; q < 8; q++) a[q] += o[q];
          v = moert_pack8(a);
        }
        ((uint4 *)d)[i] = v;
      } else {
        d[i] = add ? moert_f2bf(moert_bf2f(d[i]) + moert_bf2f(s[i])) : s[i];
      }
    }
  }
}
