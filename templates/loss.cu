// loss.cu — the embedding of the input windows and its backward, the losses
// (cross-entropy over the vocabulary, squared error) with their gradients,
// and the full reductions the optimizer and the selector need (sum of
// squares, dot). Semantics: runtime/cpu_ops.h and backend.h.
//
// Every value that the cpu ops return as a double is reduced on the device:
// each block writes the double sum of its share to part[blockIdx.x], and
// common.cuh's moert_k_reduce_sum adds the parts in order into a device
// scalar, which the backend downloads. Fixed grids make the sums
// deterministic; sums are in double, as on the cpu.
//
// Specialization (common.cuh, compiler/emit_cuda.c): the kernels that a
// model's kernels.cu specializes are `template <...> moert_X_impl`s over
// their dims (0: a runtime argument), wrapped by the generic moert_k_X.
//
// Launch (runtime/backend_cuda.c): embed_fwd, embed_bwd: a block a token;
// xent: a row kernel (common.cuh), at most 1024 blocks striding over the rows;
// mse, sumsq, dot: 256 threads, at most 1024 blocks, grid-stride, float4 when
// the pointers are aligned.

// ---------------------------------------------------------------- kernels

// x[t, :] = sum over c < context of table[c, win[t*context + c], :]; window
// entries outside [0, vocab) (-1: before the text) are skipped.
extern "C" __global__ void moert_k_embed_fwd(const float *table, const int *win, float *x,
                                             long long tokens, long long context,
                                             long long vocab, long long dim) {
  bool v4 = dim % 4 == 0 && moert_aligned16(table) && moert_aligned16(x);
  long long w = v4 ? dim / 4 : dim;
  for (long long t = blockIdx.x; t < tokens; t += gridDim.x) {
    float *xt = x + t * dim;
    for (long long i = threadIdx.x; i < w; i += blockDim.x) {
      float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      for (long long c = 0; c < context; c++) {
        long long wd = win[t * context + c];
        if (wd < 0 || wd >= vocab) continue;
        const float *row = table + (c * vocab + wd) * dim;
        if (v4) {
          float4 v = ((const float4 *)row)[i];
          acc.x += v.x;
          acc.y += v.y;
          acc.z += v.z;
          acc.w += v.w;
        } else {
          acc.x += row[i];
        }
      }
      if (v4) ((float4 *)xt)[i] = acc;
      else xt[i] = acc.x;
    }
  }
}

// dtable[c, win[t*context + c], :] += dx[t, :] (atomic: tokens share words, so
// the order of the additions, and the last bits, vary from run to run; used
// where vocab * context is too large for embed_bwd_rows).
extern "C" __global__ void moert_k_embed_bwd(const float *dx, const int *win, float *dtable,
                                             long long tokens, long long context,
                                             long long vocab, long long dim) {
  for (long long t = blockIdx.x; t < tokens; t += gridDim.x) {
    const float *dxt = dx + t * dim;
    for (long long c = 0; c < context; c++) {
      long long wd = win[t * context + c];
      if (wd < 0 || wd >= vocab) continue;
      float *row = dtable + (c * vocab + wd) * dim;
      for (long long i = threadIdx.x; i < dim; i += blockDim.x) atomicAdd(row + i, dxt[i]);
    }
  }
}

// The same sums, deterministic: a block a row of dtable (a key c * vocab + w,
// blocks striding over the keys) adds the dx of the tokens whose window holds
// w at c, in token order, to the row as it was: the cpu's order of
// additions, so the same bits at every run (and with CUDA graphs or without).
// Each block reads every token's window at c (tiles of 256 tokens: each
// thread tests one, thread 0 lists the hits in order) and the hits' dx rows,
// EMBED_R elements a thread at a time. Launch: 256 threads; for vocab *
// context keys up to 65536 (backend_cuda.c; beyond, the atomic kernel).
#define EMBED_R 8
extern "C" __global__ void moert_k_embed_bwd_rows(const float *dx, const int *win, float *dtable,
                                                  long long tokens, long long context,
                                                  long long vocab, long long dim) {
  __shared__ int hit[256], list[256];
  __shared__ int nlist;
  long long keys = context * vocab;
  for (long long key = blockIdx.x; key < keys; key += gridDim.x) {
    long long c = key / vocab, w = key % vocab;
    float *row = dtable + key * dim;
    for (long long i0 = 0; i0 < dim; i0 += (long long)blockDim.x * EMBED_R) {
      float acc[EMBED_R];
      for (int r = 0; r < EMBED_R; r++) {
        long long i = i0 + (long long)r * blockDim.x + threadIdx.x;
        acc[r] = i < dim ? row[i] : 0.0f;
      }
      bool any = false;
      for (long long t0 = 0; t0 < tokens; t0 += blockDim.x) {
        long long t = t0 + threadIdx.x;
        hit[threadIdx.x] = t < tokens && (long long)win[t * context + c] == w;
        __syncthreads();
        if (threadIdx.x == 0) {
          int n = 0;
          for (int j = 0; j < (int)blockDim.x; j++)
            if (hit[j]) list[n++] = j;
          nlist = n;
        }
        __syncthreads();
        for (int m = 0; m < nlist; m++) {
          const float *dxt = dx + (t0 + list[m]) * dim;
          for (int r = 0; r < EMBED_R; r++) {
            long long i = i0 + (long long)r * blockDim.x + threadIdx.x;
            if (i < dim) acc[r] += dxt[i];
          }
        }
        any = any || nlist > 0;
        __syncthreads();
      }
      if (any)
        for (int r = 0; r < EMBED_R; r++) {
          long long i = i0 + (long long)r * blockDim.x + threadIdx.x;
          if (i < dim) row[i] = acc[r];
        }
    }
  }
}

// Cross-entropy: part[blockIdx.x] = the sum over this block's rows of
// -log softmax(logits)[target] (rows whose target is outside [0, vocab)
// count 0), the plain cross-entropy whatever the smoothing; dlogits, when not
// null, = scale * (softmax - ((1 - smoothing) onehot + smoothing / vocab)),
// the gradient of the label-smoothed objective, 0 on the ignored rows.
// V: the vocabulary (the row width) when known at compile time, else 0.
template <int V>
__device__ __forceinline__ void moert_xent_impl(const float *logits, const int *target,
                                                float *dlogits, long long rows,
                                                long long vocab_arg, float scale, float smoothing,
                                                double *part) {
  typedef moert_row<V> R;
  if constexpr (R::CACHE) {
    if (blockDim.x != R::G) {
      moert_xent_impl<0>(logits, target, dlogits, rows, vocab_arg, scale, smoothing, part);
      return;
    }
  }
  const long long vocab = V > 0 ? V : vocab_arg;
  // the smoothed target: on + spread at the target, spread elsewhere (as the cpu, in double)
  const float on = (float)(1.0 - (double)smoothing), spread = (float)((double)smoothing / (double)vocab);
  __shared__ double sh[MOERT_MAX_ROWS * MOERT_MAX_WARPS];
  double total = 0.0; // the losses of this thread's rows (kept by the group's thread 0)
  for (long long base = (long long)blockIdx.x * blockDim.y; base < rows;
       base += (long long)gridDim.x * blockDim.y) {
    long long r = base + threadIdx.y;
    bool live = r < rows; // every thread iterates alike: group sums synchronize
    const float *l = logits + r * vocab;
    long long tgt = live ? (long long)target[r] : -1;
    bool valid = tgt >= 0 && tgt < vocab;
    float lv[R::PER]; // CACHE: this thread's logits, then their exp(l - max)
    double mx = -(double)MOERT_INF;
    if (live)
      moert_row_each<V>(vocab, [&](int q, long long v) {
        float x = l[v];
        if constexpr (R::CACHE) lv[q] = x;
        mx = x > mx ? x : mx;
      });
    mx = moert_group_max_d(mx, sh);
    float mxf = (float)mx; // a logit: exact
    double sum = 0.0;
    if (live)
      moert_row_each<V>(vocab, [&](int q, long long v) {
        float ex = expf((R::CACHE ? lv[q] : l[v]) - mxf);
        if constexpr (R::CACHE) lv[q] = ex;
        sum += ex;
      });
    sum = moert_group_sum_d(sum, sh);
    if (valid && threadIdx.x == 0) total += mx + log(sum) - (double)l[tgt];
    if (live && dlogits) {
      float *d = dlogits + r * vocab;
      float inv = (float)(1.0 / sum);
      moert_row_each<V>(vocab, [&](int q, long long v) {
        float ex = R::CACHE ? lv[q] : expf(l[v] - mxf);
        d[v] = valid ? scale * (ex * inv - (v == tgt ? on + spread : spread)) : 0.0f;
      });
    }
  }
  total = moert_block_sum_d(total, sh);
  if (threadIdx.x == 0 && threadIdx.y == 0) part[blockIdx.x] = total;
}

extern "C" __global__ void moert_k_xent(const float *logits, const int *target, float *dlogits,
                                        long long rows, long long vocab, float scale,
                                        float smoothing, double *part) {
  moert_xent_impl<0>(logits, target, dlogits, rows, vocab, scale, smoothing, part);
}

// Squared error: part[blockIdx.x] = this block's share of sum (yhat - y)^2;
// dyhat, when not null, = scale * 2 * (yhat - y).
extern "C" __global__ void moert_k_mse(const float *yhat, const float *y, float *dyhat,
                                       long long n, float scale, double *part) {
  __shared__ double sh[MOERT_MAX_WARPS];
  double acc = 0.0;
  long long i0 = moert_gtid(), step = moert_gstride();
  bool v4 = moert_aligned16(yhat) && moert_aligned16(y) && (!dyhat || moert_aligned16(dyhat));
  long long n4 = v4 ? n / 4 : 0;
  for (long long i = i0; i < n4; i += step) {
    float4 a = ((const float4 *)yhat)[i], b = ((const float4 *)y)[i];
    double d0 = (double)a.x - b.x, d1 = (double)a.y - b.y, d2 = (double)a.z - b.z,
           d3 = (double)a.w - b.w;
    acc += d0 * d0 + d1 * d1 + d2 * d2 + d3 * d3;
    if (dyhat)
      ((float4 *)dyhat)[i] = make_float4((float)(scale * 2 * d0), (float)(scale * 2 * d1),
                                         (float)(scale * 2 * d2), (float)(scale * 2 * d3));
  }
  for (long long i = n4 * 4 + i0; i < n; i += step) {
    double d = (double)yhat[i] - y[i];
    acc += d * d;
    if (dyhat) dyhat[i] = (float)(scale * 2 * d);
  }
  acc = moert_block_sum_d(acc, sh);
  if (threadIdx.x == 0) part[blockIdx.x] = acc;
}

// part[blockIdx.x] = this block's share of sum a*b (b == a: the sum of squares).
extern "C" __global__ void moert_k_dot(const float *a, const float *b, long long n,
                                       double *part) {
  __shared__ double sh[MOERT_MAX_WARPS];
  double acc = 0.0;
  long long i0 = moert_gtid(), step = moert_gstride();
  long long n4 = moert_aligned16(a) && moert_aligned16(b) ? n / 4 : 0;
  for (long long i = i0; i < n4; i += step) {
    float4 u = ((const float4 *)a)[i], v = ((const float4 *)b)[i];
    acc += (double)u.x * v.x + (double)u.y * v.y + (double)u.z * v.z + (double)u.w * v.w;
  }
  for (long long i = n4 * 4 + i0; i < n; i += step) acc += (double)a[i] * b[i];
  acc = moert_block_sum_d(acc, sh);
  if (threadIdx.x == 0) part[blockIdx.x] = acc;
}
