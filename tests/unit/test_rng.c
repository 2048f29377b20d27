/* test_rng.c — runtime/rng: Philox4x32-10 known answers, bulk fills equal to the
 * scalar draws at any offset (the world-size independence property), and the
 * moments of the uniform and normal draws over 10^6 samples. */
#include "rng.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../check.h"

/* Random123's tests/kat_vectors, the three "philox4x32 10" lines
 * (columns: ctr[4], key[2], expected out[4]). */
static const struct {
  uint32_t ctr[4], key[2], out[4];
} kat[] = {
    {{0x00000000, 0x00000000, 0x00000000, 0x00000000},
     {0x00000000, 0x00000000},
     {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
    {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
     {0xffffffff, 0xffffffff},
     {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
    {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
     {0xa4093822, 0x299f31d0},
     {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
};

static void test_known_answers(void) {
  for (size_t i = 0; i < sizeof kat / sizeof kat[0]; i++) {
    uint32_t out[4];
    moert_philox4x32(kat[i].key, kat[i].ctr, out);
    CHECK(memcmp(out, kat[i].out, sizeof out) == 0,
          "philox4x32-10 vector %zu: got %08x %08x %08x %08x, want %08x %08x %08x %08x", i, out[0],
          out[1], out[2], out[3], kat[i].out[0], kat[i].out[1], kat[i].out[2], kat[i].out[3]);
  }
}

/* The documented mapping of (seed, stream, index) onto key and counter. */
static void test_mapping(void) {
  const uint64_t seed = 0x299f31d0a4093822ull, stream = 0x85a308d3243f6a88ull,
                 index = 0x0370734413198a2eull;
  const uint32_t key[2] = {0xa4093822, 0x299f31d0};
  const uint32_t ctr[4] = {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344};
  uint32_t out[4];
  moert_philox4x32(key, ctr, out);
  CHECK(out[0] == 0xd16cfe09, "mapping: philox of the pi vector");
  float u = moert_rand_uniform(seed, stream, index);
  CHECK(u == (float)(out[0] >> 8) * 0x1p-24f, "mapping: uniform is top 24 bits of out[0], got %.9g",
        u);
}

static void test_bulk_equals_scalar(void) {
  const uint64_t firsts[] = {0, 1, 7, 12345, (1ull << 32) - 3, (1ull << 40) + 7, UINT64_MAX - 5};
  enum { N = 1000 };
  static float buf[N];
  for (size_t f = 0; f < sizeof firsts / sizeof firsts[0]; f++) {
    uint64_t first = firsts[f];
    int bad = 0;
    moert_fill_uniform(buf, N, 42, 3, first, 0.0f, 1.0f);
    for (int i = 0; i < N; i++)
      if (buf[i] != moert_rand_uniform(42, 3, first + (uint64_t)i)) bad++;
    CHECK(bad == 0, "fill_uniform at first_index %llu: %d elements differ from the scalar draw",
          (unsigned long long)first, bad);
    bad = 0;
    moert_fill_normal(buf, N, 42, 3, first, 0.0f, 1.0f);
    for (int i = 0; i < N; i++)
      if (buf[i] != moert_rand_normal(42, 3, first + (uint64_t)i)) bad++;
    CHECK(bad == 0, "fill_normal at first_index %llu: %d elements differ from the scalar draw",
          (unsigned long long)first, bad);
    bad = 0;
    moert_fill_uniform(buf, N, 9, 1, first, -0.25f, 0.75f);
    for (int i = 0; i < N; i++) {
      float want = -0.25f + 1.0f * moert_rand_uniform(9, 1, first + (uint64_t)i);
      if (buf[i] != want || buf[i] < -0.25f || buf[i] >= 0.75f) bad++;
    }
    CHECK(bad == 0, "fill_uniform(lo=-0.25, hi=0.75) at %llu: %d elements wrong",
          (unsigned long long)first, bad);
    bad = 0;
    moert_fill_normal(buf, N, 9, 1, first, 2.0f, 0.5f);
    for (int i = 0; i < N; i++)
      if (buf[i] != 2.0f + 0.5f * moert_rand_normal(9, 1, first + (uint64_t)i)) bad++;
    CHECK(bad == 0, "fill_normal(mean=2, std=0.5) at %llu: %d elements wrong",
          (unsigned long long)first, bad);
  }

  /* A tensor split over W "ranks", each filling its slice from its global offset,
   * equals the tensor filled at once, for every W. */
  static float whole[N], parts[N];
  moert_fill_normal(whole, N, 7, 11, 500, 0.0f, 0.02f);
  for (int w = 1; w <= 8; w++) {
    for (int r = 0; r < w; r++) {
      int64_t lo = (int64_t)N * r / w, hi = (int64_t)N * (r + 1) / w;
      moert_fill_normal(parts + lo, hi - lo, 7, 11, 500 + (uint64_t)lo, 0.0f, 0.02f);
    }
    CHECK(memcmp(whole, parts, sizeof whole) == 0, "fill split over %d slices differs", w);
  }
  /* n <= 0 writes nothing. */
  buf[0] = 123.0f;
  moert_fill_uniform(buf, 0, 1, 1, 1, 0.0f, 1.0f);
  moert_fill_normal(buf, -5, 1, 1, 1, 0.0f, 1.0f);
  CHECK(buf[0] == 123.0f, "a fill of n <= 0 wrote");
}

/* Sample moments over 10^6 draws; tolerances are about 5 standard errors. */
static void test_uniform_moments(void) {
  const int n = 1000000;
  double s1 = 0, s2 = 0, lag = 0, prev = 0;
  int out_of_range = 0;
  enum { BINS = 256 };
  static int hist[BINS];
  for (int i = 0; i < n; i++) {
    float u = moert_rand_uniform(2024, 0, (uint64_t)i);
    if (!(u >= 0.0f && u < 1.0f)) out_of_range++;
    double x = u;
    s1 += x;
    s2 += x * x;
    if (i > 0) lag += (x - 0.5) * (prev - 0.5);
    prev = x;
    int b = (int)(u * BINS);
    if (b >= 0 && b < BINS) hist[b]++;
  }
  double mean = s1 / n, var = s2 / n - mean * mean, corr = lag / (n - 1) * 12.0;
  CHECK(out_of_range == 0, "uniform: %d draws outside [0, 1)", out_of_range);
  CHECK(fabs(mean - 0.5) < 1.5e-3, "uniform mean %.6f, want 0.5 +- 1.5e-3", mean);
  CHECK(fabs(var - 1.0 / 12) < 4e-4, "uniform variance %.6f, want %.6f +- 4e-4", var, 1.0 / 12);
  CHECK(fabs(corr) < 5e-3, "uniform lag-1 correlation %.5f, want 0 +- 5e-3", corr);
  /* Chi-square over 256 equal bins: 255 degrees of freedom, mean 255, sd 22.6. */
  double chi2 = 0, expect = (double)n / BINS;
  for (int b = 0; b < BINS; b++) chi2 += (hist[b] - expect) * (hist[b] - expect) / expect;
  CHECK(chi2 < 255 + 6 * 22.6, "uniform chi-square over %d bins %.1f, want < %.1f", BINS, chi2,
        255 + 6 * 22.6);
}

static void test_normal_moments(void) {
  const int n = 1000000;
  double s1 = 0, s2 = 0, s3 = 0, s4 = 0;
  int not_finite = 0;
  for (int i = 0; i < n; i++) {
    float z = moert_rand_normal(2024, 5, (uint64_t)i);
    if (!isfinite(z)) not_finite++;
    double x = z;
    s1 += x;
    s2 += x * x;
    s3 += x * x * x;
    s4 += x * x * x * x;
  }
  double mean = s1 / n, var = s2 / n - mean * mean;
  double m3 = s3 / n - 3 * mean * s2 / n + 2 * mean * mean * mean;
  double m4 = s4 / n - 4 * mean * s3 / n + 6 * mean * mean * s2 / n - 3 * mean * mean * mean * mean;
  double skew = m3 / pow(var, 1.5), kurt = m4 / (var * var);
  CHECK(not_finite == 0, "normal: %d draws not finite", not_finite);
  CHECK(fabs(mean) < 5e-3, "normal mean %.6f, want 0 +- 5e-3", mean);
  CHECK(fabs(var - 1) < 7e-3, "normal variance %.6f, want 1 +- 7e-3", var);
  CHECK(fabs(skew) < 1.3e-2, "normal skewness %.5f, want 0 +- 1.3e-2", skew);
  CHECK(fabs(kurt - 3) < 2.5e-2, "normal kurtosis %.5f, want 3 +- 2.5e-2", kurt);
}

static void test_streams_and_seeds_differ(void) {
  const int n = 100000;
  int same_stream = 0, same_seed = 0, same_index = 0;
  for (int i = 0; i < n; i++) {
    float a = moert_rand_uniform(1, 0, (uint64_t)i);
    if (a == moert_rand_uniform(1, 1, (uint64_t)i)) same_stream++;
    if (a == moert_rand_uniform(2, 0, (uint64_t)i)) same_seed++;
    if (a == moert_rand_uniform(1, 0, (uint64_t)i + 1)) same_index++;
  }
  /* Two independent 24-bit draws agree with probability 2^-24: expect ~0.006. */
  CHECK(same_stream <= 2, "streams 0 and 1 agree at %d of %d indices", same_stream, n);
  CHECK(same_seed <= 2, "seeds 1 and 2 agree at %d of %d indices", same_seed, n);
  CHECK(same_index <= 2, "neighbouring indices agree %d of %d times", same_index, n);
  /* Determinism: the same arguments give the same bits. */
  CHECK(moert_rand_normal(5, 6, 7) == moert_rand_normal(5, 6, 7), "normal is not a pure function");
  /* A high stream word or high index word changes the draw. */
  CHECK(moert_rand_uniform(1, 1ull << 32, 0) != moert_rand_uniform(1, 0, 0),
        "stream high word ignored");
  CHECK(moert_rand_uniform(1, 0, 1ull << 32) != moert_rand_uniform(1, 0, 0),
        "index high word ignored");
  CHECK(moert_rand_uniform(1ull << 32, 0, 0) != moert_rand_uniform(0, 0, 0),
        "seed high word ignored");
}

int main(void) {
  test_known_answers();
  test_mapping();
  test_bulk_equals_scalar();
  test_uniform_moments();
  test_normal_moments();
  test_streams_and_seeds_differ();
  printf("test_rng: %d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
