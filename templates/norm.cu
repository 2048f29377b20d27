// norm.cu — layernorm and rmsnorm forward and backward, and the L2
// normalizations of the cosine gate (rows of the projection, columns of the
// similarity matrix). Semantics: runtime/cpu_ops.h. Row statistics are
// summed in double (as the cpu ops); forward outputs in fp32, the backward's
// dx in double (its terms cancel), rounded once.
//
// Specialization (common.cuh, compiler/emit_cuda.c): the kernels that a
// model's kernels.cu specializes are `template <...> moert_X_impl`s over
// their dims (0: a runtime argument), wrapped by the generic moert_k_X.
//
// Launch (runtime/backend_cuda.c): row kernels as common.cuh says, a row
// group of 32 to 1024 threads (about dim/8, a power of two), up to 8 rows a
// block. Parameter gradients (dg, db) and column norms: column-chunk partial
// kernels of blockDim (32, 8) over (column tiles, row chunks), finished by
// moert_k_colsum_add or the _finish kernels below (one thread a column).
// Column pointers (x, dy of the _part kernels) are offset to the first column
// of the slab by the caller; ld is the row stride, w the slab's width.

// ---------------------------------------------------------------- kernels

// y = (x - mean) * rstd * g + b per row; mean[rows], rstd[rows] saved.
template <int D>
__device__ __forceinline__ void
moert_layernorm_fwd_impl(const float *x, const float *g, const float *b, float *y, float *mean,
                         float *rstd, long long rows, long long dim_arg, float eps) {
  typedef moert_row<D> R;
  if constexpr (R::CACHE) {
    if (blockDim.x != R::G) {
      moert_layernorm_fwd_impl<0>(x, g, b, y, mean, rstd, rows, dim_arg, eps);
      return;
    }
  }
  const long long dim = D > 0 ? D : dim_arg;
  __shared__ double sh[MOERT_MAX_ROWS * MOERT_MAX_WARPS];
  for (long long base = (long long)blockIdx.x * blockDim.y; base < rows;
       base += (long long)gridDim.x * blockDim.y) {
    long long r = base + threadIdx.y;
    bool live = r < rows; // every thread iterates alike: group sums synchronize
    const float *xr = x + r * dim;
    float xv[R::PER]; // CACHE: this thread's elements of the row
#define MOERT_X(q, i) (R::CACHE ? xv[q] : xr[i])
    double s = 0.0;
    if (live)
      moert_row_each<D>(dim, [&](int q, long long i) {
        float v = xr[i];
        if constexpr (R::CACHE) xv[q] = v;
        s += v;
      });
    double mu = moert_group_sum_d(s, sh) / (double)dim;
    double v = 0.0; // two passes: no cancellation
    if (live)
      moert_row_each<D>(dim, [&](int q, long long i) {
        double d = MOERT_X(q, i) - mu;
        v += d * d;
      });
    double rs = 1.0 / sqrt(moert_group_sum_d(v, sh) / (double)dim + (double)eps);
    if (live) {
      float *yr = y + r * dim;
      float muf = (float)mu, rsf = (float)rs;
      moert_row_each<D>(dim, [&](int q, long long i) {
        yr[i] = (MOERT_X(q, i) - muf) * rsf * g[i] + b[i];
      });
      if (threadIdx.x == 0) {
        mean[r] = muf;
        rstd[r] = rsf;
      }
    }
#undef MOERT_X
  }
}

extern "C" __global__ void moert_k_layernorm_fwd(const float *x, const float *g, const float *b,
                                                 float *y, float *mean, float *rstd,
                                                 long long rows, long long dim, float eps) {
  moert_layernorm_fwd_impl<0>(x, g, b, y, mean, rstd, rows, dim, eps);
}

// dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = dy g.
template <int D>
__device__ __forceinline__ void
moert_layernorm_bwd_dx_impl(const float *x, const float *g, const float *mean, const float *rstd,
                            const float *dy, float *dx, long long rows, long long dim_arg) {
  typedef moert_row<D> R;
  if constexpr (R::CACHE) {
    if (blockDim.x != R::G) {
      moert_layernorm_bwd_dx_impl<0>(x, g, mean, rstd, dy, dx, rows, dim_arg);
      return;
    }
  }
  const long long dim = D > 0 ? D : dim_arg;
  __shared__ double sh[MOERT_MAX_ROWS * MOERT_MAX_WARPS];
  for (long long base = (long long)blockIdx.x * blockDim.y; base < rows;
       base += (long long)gridDim.x * blockDim.y) {
    long long r = base + threadIdx.y;
    bool live = r < rows; // every thread iterates alike: group sums synchronize
    const float *xr = x + r * dim, *dyr = dy + r * dim;
    double mu = live ? mean[r] : 0.0, rs = live ? rstd[r] : 0.0;
    double xhv[R::PER], dxhv[R::PER]; // CACHE: xhat, dxhat of this thread's elements
    double s1 = 0.0, s2 = 0.0;
    if (live)
      moert_row_each<D>(dim, [&](int q, long long i) {
        double xh = (xr[i] - mu) * rs, dxh = (double)dyr[i] * g[i];
        if constexpr (R::CACHE) xhv[q] = xh, dxhv[q] = dxh;
        s1 += dxh;
        s2 += dxh * xh;
      });
    s1 = moert_group_sum_d(s1, sh) / (double)dim;
    s2 = moert_group_sum_d(s2, sh) / (double)dim;
    if (live) { // in double: the terms cancel where dim is small
      float *dxr = dx + r * dim;
      moert_row_each<D>(dim, [&](int q, long long i) {
        double xh, dxh;
        if constexpr (R::CACHE) xh = xhv[q], dxh = dxhv[q];
        else xh = (xr[i] - mu) * rs, dxh = (double)dyr[i] * g[i];
        dxr[i] = (float)(rs * (dxh - s1 - xh * s2));
      });
    }
  }
}

extern "C" __global__ void moert_k_layernorm_bwd_dx(const float *x, const float *g,
                                                    const float *mean, const float *rstd,
                                                    const float *dy, float *dx, long long rows,
                                                    long long dim) {
  moert_layernorm_bwd_dx_impl<0>(x, g, mean, rstd, dy, dx, rows, dim);
}

// Partials of dg (sum_r dy xhat) and db (sum_r dy).
extern "C" __global__ void moert_k_layernorm_bwd_part(const float *x, const float *mean,
                                                      const float *rstd, const float *dy,
                                                      long long rows, long long ld, long long w,
                                                      long long rpc, double *part_g,
                                                      double *part_b) {
  moert_colsum_part<2>(
      [&](long long r, long long c, double *acc) {
        double d = dy[r * ld + c];
        acc[0] += d * (((double)x[r * ld + c] - (double)mean[r]) * (double)rstd[r]);
        acc[1] += d;
      },
      rows, w, rpc, part_g, part_b);
}

// y = x * rstd * g, rstd = 1/sqrt(mean(x^2) + eps); rstd[rows] saved.
template <int D>
__device__ __forceinline__ void moert_rmsnorm_fwd_impl(const float *x, const float *g, float *y,
                                                       float *rstd, long long rows,
                                                       long long dim_arg, float eps) {
  typedef moert_row<D> R;
  if constexpr (R::CACHE) {
    if (blockDim.x != R::G) {
      moert_rmsnorm_fwd_impl<0>(x, g, y, rstd, rows, dim_arg, eps);
      return;
    }
  }
  const long long dim = D > 0 ? D : dim_arg;
  __shared__ double sh[MOERT_MAX_ROWS * MOERT_MAX_WARPS];
  for (long long base = (long long)blockIdx.x * blockDim.y; base < rows;
       base += (long long)gridDim.x * blockDim.y) {
    long long r = base + threadIdx.y;
    bool live = r < rows; // every thread iterates alike: group sums synchronize
    const float *xr = x + r * dim;
    float xv[R::PER]; // CACHE: this thread's elements of the row
    double ss = 0.0;
    if (live)
      moert_row_each<D>(dim, [&](int q, long long i) {
        float v = xr[i];
        if constexpr (R::CACHE) xv[q] = v;
        ss += (double)v * v;
      });
    double rs = 1.0 / sqrt(moert_group_sum_d(ss, sh) / (double)dim + (double)eps);
    if (live) {
      float *yr = y + r * dim;
      float rsf = (float)rs;
      moert_row_each<D>(dim, [&](int q, long long i) {
        yr[i] = (R::CACHE ? xv[q] : xr[i]) * rsf * g[i];
      });
      if (threadIdx.x == 0) rstd[r] = rsf;
    }
  }
}

extern "C" __global__ void moert_k_rmsnorm_fwd(const float *x, const float *g, float *y,
                                               float *rstd, long long rows, long long dim,
                                               float eps) {
  moert_rmsnorm_fwd_impl<0>(x, g, y, rstd, rows, dim, eps);
}

// dx = rstd dy g - x rstd^3 mean(dy g x).
template <int D>
__device__ __forceinline__ void
moert_rmsnorm_bwd_dx_impl(const float *x, const float *g, const float *rstd, const float *dy,
                          float *dx, long long rows, long long dim_arg) {
  typedef moert_row<D> R;
  if constexpr (R::CACHE) {
    if (blockDim.x != R::G) {
      moert_rmsnorm_bwd_dx_impl<0>(x, g, rstd, dy, dx, rows, dim_arg);
      return;
    }
  }
  const long long dim = D > 0 ? D : dim_arg;
  __shared__ double sh[MOERT_MAX_ROWS * MOERT_MAX_WARPS];
  for (long long base = (long long)blockIdx.x * blockDim.y; base < rows;
       base += (long long)gridDim.x * blockDim.y) {
    long long r = base + threadIdx.y;
    bool live = r < rows; // every thread iterates alike: group sums synchronize
    const float *xr = x + r * dim, *dyr = dy + r * dim;
    float xv[R::PER], dyv[R::PER]; // CACHE: this thread's elements of x, dy
    double s = 0.0;
    if (live)
      moert_row_each<D>(dim, [&](int q, long long i) {
        float a = xr[i], d = dyr[i];
        if constexpr (R::CACHE) xv[q] = a, dyv[q] = d;
        s += (double)d * g[i] * a;
      });
    s = moert_group_sum_d(s, sh);
    if (live) { // in double: the terms cancel where dim is small
      double rs = rstd[r], c = rs * rs * rs * s / (double)dim;
      float *dxr = dx + r * dim;
      moert_row_each<D>(dim, [&](int q, long long i) {
        float a, d;
        if constexpr (R::CACHE) a = xv[q], d = dyv[q];
        else a = xr[i], d = dyr[i];
        dxr[i] = (float)(rs * d * g[i] - a * c);
      });
    }
  }
}

extern "C" __global__ void moert_k_rmsnorm_bwd_dx(const float *x, const float *g,
                                                  const float *rstd, const float *dy, float *dx,
                                                  long long rows, long long dim) {
  moert_rmsnorm_bwd_dx_impl<0>(x, g, rstd, dy, dx, rows, dim);
}

// Partials of dg (sum_r dy x rstd).
extern "C" __global__ void moert_k_rmsnorm_bwd_part(const float *x, const float *rstd,
                                                    const float *dy, long long rows, long long ld,
                                                    long long w, long long rpc, double *part_g) {
  moert_colsum_part<1>(
      [&](long long r, long long c, double *acc) {
        acc[0] += (double)dy[r * ld + c] * x[r * ld + c] * (double)rstd[r];
      },
      rows, w, rpc, part_g, (double *)0);
}

// The floor of the L2 norm (Tutel's F.normalize eps).
#define MOERT_L2_FLOOR 1e-12

// y = x / max(||x||, 1e-12) per row; norm[rows] = ||x||.
template <int D>
__device__ __forceinline__ void moert_l2norm_rows_fwd_impl(const float *x, float *y, float *norm,
                                                           long long rows, long long cols_arg) {
  typedef moert_row<D> R;
  if constexpr (R::CACHE) {
    if (blockDim.x != R::G) {
      moert_l2norm_rows_fwd_impl<0>(x, y, norm, rows, cols_arg);
      return;
    }
  }
  const long long cols = D > 0 ? D : cols_arg;
  __shared__ double sh[MOERT_MAX_ROWS * MOERT_MAX_WARPS];
  for (long long base = (long long)blockIdx.x * blockDim.y; base < rows;
       base += (long long)gridDim.x * blockDim.y) {
    long long r = base + threadIdx.y;
    bool live = r < rows; // every thread iterates alike: group sums synchronize
    const float *xr = x + r * cols;
    float xv[R::PER]; // CACHE: this thread's elements of the row
    double ss = 0.0;
    if (live)
      moert_row_each<D>(cols, [&](int q, long long i) {
        float v = xr[i];
        if constexpr (R::CACHE) xv[q] = v;
        ss += (double)v * v;
      });
    double n = sqrt(moert_group_sum_d(ss, sh)), d = n > MOERT_L2_FLOOR ? n : MOERT_L2_FLOOR;
    if (live) {
      float *yr = y + r * cols;
      double inv = 1.0 / d;
      moert_row_each<D>(cols, [&](int q, long long i) {
        yr[i] = (float)((R::CACHE ? xv[q] : xr[i]) * inv);
      });
      if (threadIdx.x == 0) norm[r] = (float)n;
    }
  }
}

extern "C" __global__ void moert_k_l2norm_rows_fwd(const float *x, float *y, float *norm,
                                                   long long rows, long long cols) {
  moert_l2norm_rows_fwd_impl<0>(x, y, norm, rows, cols);
}

// dx = dy / n - x <dy, x> / n^3 (dy / 1e-12 where the norm was floored).
template <int D>
__device__ __forceinline__ void moert_l2norm_rows_bwd_impl(const float *x, const float *norm,
                                                           const float *dy, float *dx,
                                                           long long rows, long long cols_arg) {
  typedef moert_row<D> R;
  if constexpr (R::CACHE) {
    if (blockDim.x != R::G) {
      moert_l2norm_rows_bwd_impl<0>(x, norm, dy, dx, rows, cols_arg);
      return;
    }
  }
  const long long cols = D > 0 ? D : cols_arg;
  __shared__ double sh[MOERT_MAX_ROWS * MOERT_MAX_WARPS];
  for (long long base = (long long)blockIdx.x * blockDim.y; base < rows;
       base += (long long)gridDim.x * blockDim.y) {
    long long r = base + threadIdx.y;
    bool live = r < rows; // every thread iterates alike: group sums synchronize
    const float *xr = x + r * cols, *dyr = dy + r * cols;
    float xv[R::PER], dyv[R::PER]; // CACHE: this thread's elements of x, dy
    double dot = 0.0;
    if (live)
      moert_row_each<D>(cols, [&](int q, long long i) {
        float a = xr[i], d = dyr[i];
        if constexpr (R::CACHE) xv[q] = a, dyv[q] = d;
        dot += (double)d * a;
      });
    dot = moert_group_sum_d(dot, sh);
    if (live) {
      float *dxr = dx + r * cols;
      double n = norm[r];
      if (!(n > MOERT_L2_FLOOR)) {
        moert_row_each<D>(cols, [&](int q, long long i) {
          dxr[i] = (float)((R::CACHE ? dyv[q] : dyr[i]) / MOERT_L2_FLOOR);
        });
      } else {
        double inv = 1.0 / n, k = dot / (n * n * n);
        moert_row_each<D>(cols, [&](int q, long long i) {
          float a, d;
          if constexpr (R::CACHE) a = xv[q], d = dyv[q];
          else a = xr[i], d = dyr[i];
          dxr[i] = (float)(d * inv - a * k);
        });
      }
    }
  }
}

extern "C" __global__ void moert_k_l2norm_rows_bwd(const float *x, const float *norm,
                                                   const float *dy, float *dx, long long rows,
                                                   long long cols) {
  moert_l2norm_rows_bwd_impl<0>(x, norm, dy, dx, rows, cols);
}

// Partials of the column sums of x^2 (l2norm_cols_fwd) or of dy x
// (l2norm_cols_bwd, when dy is not null).
extern "C" __global__ void moert_k_l2norm_cols_part(const float *x, const float *dy,
                                                    long long rows, long long ld, long long w,
                                                    long long rpc, double *part) {
  moert_colsum_part<1>(
      [&](long long r, long long c, double *acc) {
        double v = x[r * ld + c];
        acc[0] += (dy ? (double)dy[r * ld + c] : v) * v;
      },
      rows, w, rpc, part, (double *)0);
}

// Forward: norm[c] = sqrt(sum x^2), scale[c] = 1 / max(norm, 1e-12), shift[c]
// = 0. Backward (fwd == 0): with n = norm[c] and dot the column's sum of
// dy x, scale[c] = 1 / max(n, 1e-12), shift[c] = dot / n^3 (0 where the norm
// was floored). One thread a column.
extern "C" __global__ void moert_k_l2norm_cols_finish(const double *part, long long nchunk,
                                                      long long cols, float *norm, int fwd,
                                                      double *scale, double *shift) {
  for (long long c = moert_gtid(); c < cols; c += moert_gstride()) {
    double s = moert_colsum_total(part, nchunk, cols, c);
    double n = fwd ? sqrt(s) : (double)norm[c];
    bool live = n > MOERT_L2_FLOOR;
    if (fwd) norm[c] = (float)n;
    scale[c] = 1.0 / (live ? n : MOERT_L2_FLOOR);
    shift[c] = fwd || !live ? 0.0 : s / (n * n * n);
  }
}

// out[r, c] = in[r, c] * scale[c] - x[r, c] * shift[c]: y = x scale
// (forward, in = x), dx = dy scale - x shift (backward, in = dy).
extern "C" __global__ void moert_k_l2norm_cols_apply(const float *in, const float *x,
                                                     const double *scale, const double *shift,
                                                     float *out, long long rows, long long cols) {
  for (long long r = blockIdx.y; r < rows; r += gridDim.y)
    for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c < cols;
         c += (long long)gridDim.x * blockDim.x) {
      long long i = r * cols + c;
      out[i] = (float)((double)in[i] * scale[c] - (double)x[i] * shift[c]);
    }
}
