// act.cu — activations of the FFNs: relu, gelu (tanh form), silu forward and
// backward, element-wise; swiglu forward and backward over [rows, 2*hid].
// Semantics: runtime/cpu_ops.h (moert_cpu_act_fwd, _act_bwd, _swiglu_fwd,
// _swiglu_bwd). fp32 math; gelu and silu through one logistic function of a
// stable form, so no 1 + tanh cancels.
//
// Launch (runtime/backend_cuda.c): act kernels 1-D grid-stride, 256 threads,
// float4 when h, a (and da, dh) are 16-byte aligned; swiglu kernels 256
// threads, blockIdx.x over the columns (float4 when hid % 4 == 0 and the
// pointers are aligned), blockIdx.y striding over the rows.

// ---------------------------------------------------------------- kernels

// The activation functions (moert_act, moert_act_grad) are in common.cuh:
// the bf16 kernels of bf16.cu use them too.


template <int A> __device__ void moert_act_fwd(const float *h, float *a, long long n) {
  long long i0 = moert_gtid(), step = moert_gstride();
  long long n4 = moert_aligned16(h) && moert_aligned16(a) ? n / 4 : 0;
  const float4 *h4 = (const float4 *)h;
  float4 *a4 = (float4 *)a;
  for (long long i = i0; i < n4; i += step) {
    float4 v = h4[i];
    v.x = moert_act<A>(v.x);
    v.y = moert_act<A>(v.y);
    v.z = moert_act<A>(v.z);
    v.w = moert_act<A>(v.w);
    a4[i] = v;
  }
  for (long long i = n4 * 4 + i0; i < n; i += step) a[i] = moert_act<A>(h[i]);
}

template <int A>
__device__ void moert_act_bwd(const float *h, const float *da, float *dh, long long n) {
  long long i0 = moert_gtid(), step = moert_gstride();
  long long n4 =
      moert_aligned16(h) && moert_aligned16(da) && moert_aligned16(dh) ? n / 4 : 0;
  const float4 *h4 = (const float4 *)h, *da4 = (const float4 *)da;
  float4 *dh4 = (float4 *)dh;
  for (long long i = i0; i < n4; i += step) {
    float4 x = h4[i], d = da4[i], r;
    r.x = moert_act_grad<A>(x.x, d.x);
    r.y = moert_act_grad<A>(x.y, d.y);
    r.z = moert_act_grad<A>(x.z, d.z);
    r.w = moert_act_grad<A>(x.w, d.w);
    dh4[i] = r;
  }
  for (long long i = n4 * 4 + i0; i < n; i += step) dh[i] = moert_act_grad<A>(h[i], da[i]);
}

extern "C" __global__ void moert_k_act_fwd_relu(const float *h, float *a, long long n) {
  moert_act_fwd<MOERT_RELU>(h, a, n);
}
extern "C" __global__ void moert_k_act_fwd_gelu(const float *h, float *a, long long n) {
  moert_act_fwd<MOERT_GELU>(h, a, n);
}
extern "C" __global__ void moert_k_act_fwd_silu(const float *h, float *a, long long n) {
  moert_act_fwd<MOERT_SILU>(h, a, n);
}
extern "C" __global__ void moert_k_act_fwd_tanh(const float *h, float *a, long long n) {
  moert_act_fwd<MOERT_TANH>(h, a, n);
}
extern "C" __global__ void moert_k_act_bwd_tanh(const float *h, const float *da, float *dh,
                                                long long n) {
  moert_act_bwd<MOERT_TANH>(h, da, dh, n);
}
extern "C" __global__ void moert_k_act_bwd_relu(const float *h, const float *da, float *dh,
                                                long long n) {
  moert_act_bwd<MOERT_RELU>(h, da, dh, n);
}
extern "C" __global__ void moert_k_act_bwd_gelu(const float *h, const float *da, float *dh,
                                                long long n) {
  moert_act_bwd<MOERT_GELU>(h, da, dh, n);
}
extern "C" __global__ void moert_k_act_bwd_silu(const float *h, const float *da, float *dh,
                                                long long n) {
  moert_act_bwd<MOERT_SILU>(h, da, dh, n);
}

// a[r, j] = silu(h[r, j]) * h[r, hid + j]; h is [rows, 2*hid], a [rows, hid].
extern "C" __global__ void moert_k_swiglu_fwd(const float *h, float *a, long long rows,
                                              long long hid) {
  bool v4 = hid % 4 == 0 && moert_aligned16(h) && moert_aligned16(a);
  long long w = v4 ? hid / 4 : hid;
  for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
    const float *gate = h + r * 2 * hid, *up = gate + hid;
    float *out = a + r * hid;
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < w;
         j += (long long)gridDim.x * blockDim.x) {
      if (v4) {
        float4 g = ((const float4 *)gate)[j], u = ((const float4 *)up)[j], o;
        o.x = moert_silu(g.x) * u.x;
        o.y = moert_silu(g.y) * u.y;
        o.z = moert_silu(g.z) * u.z;
        o.w = moert_silu(g.w) * u.w;
        ((float4 *)out)[j] = o;
      } else {
        out[j] = moert_silu(gate[j]) * up[j];
      }
    }
  }
}

__device__ __forceinline__ void moert_swiglu_grad1(float g, float u, float d, float *dg,
                                                   float *du) {
  *dg = moert_act_grad<MOERT_SILU>(g, d * u);
  *du = d * moert_silu(g);
}

// dh [rows, 2*hid] (written) from da [rows, hid].
extern "C" __global__ void moert_k_swiglu_bwd(const float *h, const float *da, float *dh,
                                              long long rows, long long hid) {
  bool v4 = hid % 4 == 0 && moert_aligned16(h) && moert_aligned16(da) && moert_aligned16(dh);
  long long w = v4 ? hid / 4 : hid;
  for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
    const float *gate = h + r * 2 * hid, *up = gate + hid, *d = da + r * hid;
    float *dgate = dh + r * 2 * hid, *dup = dgate + hid;
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < w;
         j += (long long)gridDim.x * blockDim.x) {
      if (v4) {
        float4 g = ((const float4 *)gate)[j], u = ((const float4 *)up)[j];
        float4 dd = ((const float4 *)d)[j], og, ou;
        moert_swiglu_grad1(g.x, u.x, dd.x, &og.x, &ou.x);
        moert_swiglu_grad1(g.y, u.y, dd.y, &og.y, &ou.y);
        moert_swiglu_grad1(g.z, u.z, dd.z, &og.z, &ou.z);
        moert_swiglu_grad1(g.w, u.w, dd.w, &og.w, &ou.w);
        ((float4 *)dgate)[j] = og;
        ((float4 *)dup)[j] = ou;
      } else {
        moert_swiglu_grad1(gate[j], up[j], d[j], &dgate[j], &dup[j]);
      }
    }
  }
}
