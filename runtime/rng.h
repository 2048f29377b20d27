/* rng.h — the counter-based random generator behind every random number in moec:
 * parameter init, gate noise, synthetic data (docs/DESIGN.md, "World-size independence").
 *
 * Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as
 * 1, 2, 3", SC'11) is a keyed bijection of a 128-bit counter: the value at an index
 * is a pure function of (seed, stream, index), with no state to carry. A rank that
 * holds a slice of a tensor fills it from the slice's global offset and gets exactly
 * the numbers a single rank would, so a model is identical at every world size.
 *
 * Mapping used everywhere (the CUDA templates must use the same one):
 *   key = { seed & 0xffffffff, seed >> 32 }
 *   ctr = { stream & 0xffffffff, stream >> 32, index & 0xffffffff, index >> 32 }
 * One Philox call per index; the four output words are used as below.
 * Floating-point results are rounded as written, never contracted into FMAs (rng.c
 * is built with -ffp-contract=off; a CUDA port needs --fmad=false or __fmul_rn and
 * __fadd_rn to return the same floats). */
#ifndef MOERT_RNG_H
#define MOERT_RNG_H

#include <stdint.h>

/* One Philox4x32-10 block: out = philox(key, ctr). out may not alias the inputs. */
void moert_philox4x32(const uint32_t key[2], const uint32_t ctr[4], uint32_t out[4]);

/* 64 random bits of (seed, stream, index): the first two words of its block. */
uint64_t moert_rand_u64(uint64_t seed, uint64_t stream, uint64_t index);
/* Uniform in [0, 1): the top 24 bits of out[0], times 2^-24 (every float of the
 * form k * 2^-24 equally likely; 1.0 is never returned). */
float moert_rand_uniform(uint64_t seed, uint64_t stream, uint64_t index);

/* Standard normal by Box-Muller from one Philox call: u1 in (0, 1] from the top 53
 * bits of (out[1]:out[0]), u2 in [0, 1) from (out[3]:out[2]),
 * z = sqrt(-2 ln u1) * cos(2 pi u2), computed in double and rounded to float. */
float moert_rand_normal(uint64_t seed, uint64_t stream, uint64_t index);

/* out[i] = lo + (hi - lo) * moert_rand_uniform(seed, stream, first_index + i), in
 * float, for 0 <= i < n (n <= 0 writes nothing). For lo < hi, a result that rounds
 * up to hi is replaced by the largest float below hi, so out[i] is in [lo, hi). */
void moert_fill_uniform(float *out, int64_t n, uint64_t seed, uint64_t stream, uint64_t first_index,
                        float lo, float hi);

/* out[i] = mean + std * moert_rand_normal(seed, stream, first_index + i), in float,
 * for 0 <= i < n (n <= 0 writes nothing). */
void moert_fill_normal(float *out, int64_t n, uint64_t seed, uint64_t stream, uint64_t first_index,
                       float mean, float std);

#endif
