/* rng.c — Philox4x32-10 and the uniform and normal draws built on it; see rng.h.
 * Written from the paper's definition: a Feistel-like network of R = 10 rounds, each
 * round two 32x32->64 multiplications whose high halves are xored with the other
 * words and a round key; the key is bumped by the Weyl constants between rounds. */
#include "rng.h"

#include <math.h>

/* Multipliers and Weyl increments of Philox4x32 (SC'11, section 4.2). */
#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u /* golden ratio */
#define PHILOX_W1 0xBB67AE85u /* sqrt(3) - 1 */
#define PHILOX_ROUNDS 10

void moert_philox4x32(const uint32_t key[2], const uint32_t ctr[4], uint32_t out[4]) {
  uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
  uint32_t k0 = key[0], k1 = key[1];
  for (int r = 0; r < PHILOX_ROUNDS; r++) {
    if (r > 0) {
      k0 += PHILOX_W0;
      k1 += PHILOX_W1;
    }
    uint64_t p0 = (uint64_t)PHILOX_M0 * c0;
    uint64_t p1 = (uint64_t)PHILOX_M1 * c2;
    uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
    uint32_t n1 = (uint32_t)p1;
    uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
    uint32_t n3 = (uint32_t)p0;
    c0 = n0;
    c1 = n1;
    c2 = n2;
    c3 = n3;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

static void draw(uint64_t seed, uint64_t stream, uint64_t index, uint32_t out[4]) {
  const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
  const uint32_t ctr[4] = {(uint32_t)stream, (uint32_t)(stream >> 32), (uint32_t)index,
                           (uint32_t)(index >> 32)};
  moert_philox4x32(key, ctr, out);
}

uint64_t moert_rand_u64(uint64_t seed, uint64_t stream, uint64_t index) {
  uint32_t w[4];
  draw(seed, stream, index, w);
  return (uint64_t)w[1] << 32 | w[0];
}

float moert_rand_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
  uint32_t w[4];
  draw(seed, stream, index, w);
  return (float)(w[0] >> 8) * 0x1p-24f; /* exact: a 24-bit integer times a power of 2 */
}

float moert_rand_normal(uint64_t seed, uint64_t stream, uint64_t index) {
  uint32_t w[4];
  draw(seed, stream, index, w);
  uint64_t a = ((uint64_t)w[1] << 32 | w[0]) >> 11;
  uint64_t b = ((uint64_t)w[3] << 32 | w[2]) >> 11;
  double u1 = (double)(a + 1) * 0x1p-53; /* (0, 1]: log(u1) is finite */
  double u2 = (double)b * 0x1p-53;       /* [0, 1) */
  double r = sqrt(-2.0 * log(u1));
  return (float)(r * cos(6.283185307179586476925286766559 * u2));
}

void moert_fill_uniform(float *out, int64_t n, uint64_t seed, uint64_t stream, uint64_t first_index,
                        float lo, float hi) {
  const float span = hi - lo;
  const float below_hi = nextafterf(hi, lo);
  for (int64_t i = 0; i < n; i++) {
    float v = lo + span * moert_rand_uniform(seed, stream, first_index + (uint64_t)i);
    if (lo < hi && v >= hi) v = below_hi;
    out[i] = v;
  }
}

void moert_fill_normal(float *out, int64_t n, uint64_t seed, uint64_t stream, uint64_t first_index,
                       float mean, float std) {
  for (int64_t i = 0; i < n; i++)
    out[i] = mean + std * moert_rand_normal(seed, stream, first_index + (uint64_t)i);
}
