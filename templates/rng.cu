// rng.cu — the normal draws of runtime/rng.c on the device: Philox4x32-10
// keyed by (seed, stream, index), two 53-bit uniforms, Box-Muller in double.
// The same numbers as moert_fill_normal (to the last bit where the device's
// double log and cos round as the host's do), so a batch drawn here is the
// batch the cpu draws. Semantics: runtime/rng.h.
//
// Launch (runtime/backend_cuda.c): 1-D grid-stride, 256 threads.

__device__ __forceinline__ void moert_philox(unsigned k0, unsigned k1, unsigned c[4]) {
  for (int r = 0; r < 10; r++) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    unsigned long long p0 = 0xD2511F53ull * c[0], p1 = 0xCD9E8D57ull * c[2];
    unsigned n0 = (unsigned)(p1 >> 32) ^ c[1] ^ k0, n1 = (unsigned)p1;
    unsigned n2 = (unsigned)(p0 >> 32) ^ c[3] ^ k1, n3 = (unsigned)p0;
    c[0] = n0;
    c[1] = n1;
    c[2] = n2;
    c[3] = n3;
  }
}

// out[i] = mean + std * N(0, 1) of (seed, stream, first + i).
__device__ void moert_fill_normal_impl(float *out, long long n, unsigned long long seed,
                                       unsigned long long stream, unsigned long long first, float mean,
                                       float std) {
  for (long long i = moert_gtid(); i < n; i += moert_gstride()) {
    unsigned long long index = first + (unsigned long long)i;
    unsigned c[4] = {(unsigned)stream, (unsigned)(stream >> 32), (unsigned)index, (unsigned)(index >> 32)};
    moert_philox((unsigned)seed, (unsigned)(seed >> 32), c);
    unsigned long long a = (((unsigned long long)c[1] << 32) | c[0]) >> 11;
    unsigned long long b = (((unsigned long long)c[3] << 32) | c[2]) >> 11;
    double u1 = (double)(a + 1) * 0x1p-53, u2 = (double)b * 0x1p-53;
    double r = sqrt(-2.0 * log(u1));
    float z = (float)(r * cos(6.283185307179586476925286766559 * u2));
    out[i] = __fadd_rn(mean, __fmul_rn(std, z)); // no fma: the host rounds twice
  }
}

extern "C" __global__ void moert_k_fill_normal(float *out, long long n, unsigned long long seed,
                                               unsigned long long stream, unsigned long long first,
                                               float mean, float std) {
  moert_fill_normal_impl(out, n, seed, stream, first, mean, std);
}

// The same from index (*step - 1) * per_step + offset: a step's draws with the
// step read from device memory, so a CUDA graph replays them for each step.
extern "C" __global__ void moert_k_fill_normal_step(float *out, long long n, unsigned long long seed,
                                                    unsigned long long stream, const long long *step,
                                                    unsigned long long per_step, unsigned long long offset,
                                                    float mean, float std) {
  moert_fill_normal_impl(out, n, seed, stream, (unsigned long long)(*step - 1) * per_step + offset, mean, std);
}
