/* data.h — the training data, as docs/LANGUAGE.md defines it, made so that the
 * global batch of a step does not depend on the world size: token g of the
 * step's W*T global tokens is the same whatever rank holds it.
 *  - synthetic, no vocab: inputs N(0, 1) keyed by (seed, global position),
 *    targets from a fixed random teacher, tanh(x W1) W2, W1 [M, 4M], W2 [4M, M].
 *  - synthetic, vocab: a token stream where every even position is random and
 *    every odd one follows from its predecessor (a fixed random successor
 *    with probability 0.9): learnable, from a window of context >= 1.
 *  - bytes(path): the file's bytes; its last tenth (at least one global batch)
 *    is held out for evaluation.
 * Without sequences (seq 0) a step reads consecutive positions of the stream,
 * step after step. With seq S, a step's batch is G / S windows of S + 1
 * consecutive tokens (S inputs, each followed by its target); window j of a
 * step starts at a random offset drawn from (seed, step, j), j the window's
 * global index, so ranks splitting the batch at any world size read the same
 * windows; evaluation reads fixed windows evenly spaced over the held-out
 * tail (the synthetic eval stream: its first G / S windows). The n-gram
 * look-back stops at a window's start: an earlier position is -1, as one
 * before the file's start. */
#ifndef MOERT_DATA_H
#define MOERT_DATA_H

#include <stdbool.h>
#include <stdint.h>

#include "status.h"

typedef struct moert_data moert_data;

/* Opens the data. path NULL: synthetic. global_tokens = W * T. Fails with a
 * clear message (missing file, too small for one batch and its held-out
 * tail, vocab other than 256 for bytes). */
bool moert_data_open(moert_data **out, const char *path, int64_t vocab, int64_t dim,
                     int64_t context, int64_t global_tokens, uint64_t seed, moert_status *st);
/* The same, with sequences of seq tokens (0: none, as moert_data_open; else
 * a vocab model's, and global_tokens a multiple of seq, or it fails). */
bool moert_data_open_seq(moert_data **out, const char *path, int64_t vocab, int64_t dim, int64_t context,
                         int64_t seq, int64_t global_tokens, uint64_t seed, moert_status *st);
void moert_data_close(moert_data *d);

/* The tokens of a vocab model for global positions [first, first + n) of the
 * step's batch (eval: the held-out batch): win[t*context + c] = token at
 * position p_t - c (-1 before the start, or before its window's with seq),
 * next[t] = the token to predict. */
void moert_data_tokens(const moert_data *d, int64_t step, bool eval, int64_t first, int64_t n,
                       int32_t *win, int32_t *next);
/* Inputs and teacher targets of a vocab-free model, [n, dim] each. */
void moert_data_regression(const moert_data *d, int64_t step, bool eval, int64_t first, int64_t n,
                           float *x, float *y);
/* The same inputs alone, and the teacher that makes the targets from them
 * (w1 [dim, hidden], w2 [hidden, dim], hidden = 4 dim; NULL for a vocab
 * model): y = tanh(x w1) w2, so a device can compute the targets itself. */
void moert_data_inputs(const moert_data *d, int64_t step, bool eval, int64_t first, int64_t n, float *x);
/* Where those inputs come from: x[i] = N(0, 1) of rng.h's (seed, stream,
 * index + i), so a device can draw them itself (backend fill_normal). */
void moert_data_inputs_key(const moert_data *d, int64_t step, bool eval, int64_t first, uint64_t *seed,
                           uint64_t *stream, uint64_t *index);
void moert_data_teacher(const moert_data *d, const float **w1, const float **w2, int64_t *hidden);
/* Bytes of the file (NULL for synthetic) and their count: for sampling text. */
const unsigned char *moert_data_bytes(const moert_data *d, int64_t *n);

#endif
