/* data.c — training data; see data.h. */
#include "data.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_ops.h"
#include "rng.h"

/* Streams of the counter-based generator (rng.h), one per use. */
enum { STREAM_X = 101, STREAM_EVAL_X = 102, STREAM_TEACHER1 = 103, STREAM_TEACHER2 = 104,
       STREAM_TOKENS = 105, STREAM_SUCC = 106, STREAM_EVAL_TOKENS = 107, STREAM_WINDOWS = 108 };

/* Where the synthetic training stream's windows start: [0, 2^40), far more
 * positions than any run reads. */
#define SYNTH_SPAN ((int64_t)1 << 40)

/* Synthetic streams have no end; the eval stream is another stream. */
struct moert_data {
  int64_t vocab, dim, context, global;
  int64_t seq;          /* 0: no windows, consecutive positions */
  uint64_t seed;
  unsigned char *bytes; /* NULL: synthetic */
  int64_t nbytes, ntrain;
  float *w1, *w2;       /* teacher, [M, 4M] and [4M, M] */
  float *hidden;        /* [chunk, 4M] scratch of the teacher */
};

enum { TEACHER_CHUNK = 256 };

bool moert_data_open(moert_data **out, const char *path, int64_t vocab, int64_t dim,
                     int64_t context, int64_t global, uint64_t seed, moert_status *st) {
  return moert_data_open_seq(out, path, vocab, dim, context, 0, global, seed, st);
}

bool moert_data_open_seq(moert_data **out, const char *path, int64_t vocab, int64_t dim, int64_t context,
                         int64_t seq, int64_t global, uint64_t seed, moert_status *st) {
  *out = NULL;
  if (seq < 0 || (seq > 0 && (!vocab || global % seq != 0)))
    return MOERT_FAIL(st, "a step's %lld tokens are not a whole number of sequences of %lld; "
                      "use a number of tokens per rank that is a multiple of %lld",
                      (long long)global, (long long)seq, (long long)seq);
  moert_data *d = calloc(1, sizeof *d);
  if (!d) return MOERT_FAIL(st, "out of memory");
  d->vocab = vocab;
  d->dim = dim;
  d->context = context;
  d->global = global;
  d->seq = seq;
  d->seed = seed;
  if (path) {
    if (vocab != 256) {
      free(d);
      return MOERT_FAIL(st, "data file %s is read as bytes, which needs vocab = 256 (the model has %lld)",
                        path, (long long)vocab);
    }
    FILE *f = fopen(path, "rb");
    if (!f) {
      int e = errno;
      free(d);
      return MOERT_FAIL(st, "cannot open the data file %s: %s; give another with --data PATH", path,
                        strerror(e));
    }
    if (fseek(f, 0, SEEK_END) != 0 || ftell(f) < 0) {
      fclose(f);
      free(d);
      return MOERT_FAIL(st, "cannot read the data file %s: it is not a regular file", path);
    }
    long n = ftell(f);
    rewind(f);
    /* training needs one global batch plus the window, and the held-out tail
     * (a tenth, at least one batch) as much again */
    int64_t need = 2 * (global + 1);
    if (n < need) {
      fclose(f);
      free(d);
      return MOERT_FAIL(st, "the data file %s has %ld bytes; a step of %lld tokens needs at least %lld "
                        "(one batch to train on and one held out); use a larger file or fewer tokens",
                        path, n, (long long)global, (long long)need);
    }
    d->bytes = malloc((size_t)n);
    if (!d->bytes || fread(d->bytes, 1, (size_t)n, f) != (size_t)n) {
      fclose(f);
      free(d->bytes);
      free(d);
      return MOERT_FAIL(st, "cannot read the data file %s", path);
    }
    fclose(f);
    d->nbytes = n;
    int64_t tail = n / 10 > global + 1 ? n / 10 : global + 1;
    d->ntrain = n - tail;
  } else if (!vocab) {
    int64_t h = 4 * dim;
    d->w1 = malloc(sizeof(float) * (size_t)(dim * h));
    d->w2 = malloc(sizeof(float) * (size_t)(h * dim));
    d->hidden = malloc(sizeof(float) * (size_t)(TEACHER_CHUNK * h));
    if (!d->w1 || !d->w2 || !d->hidden) {
      moert_data_close(d);
      return MOERT_FAIL(st, "out of memory for the teacher network");
    }
    moert_fill_normal(d->w1, dim * h, seed, STREAM_TEACHER1, 0, 0.0f, (float)(1 / sqrt((double)dim)));
    moert_fill_normal(d->w2, h * dim, seed, STREAM_TEACHER2, 0, 0.0f, (float)(1 / sqrt((double)h)));
  }
  *out = d;
  return true;
}

void moert_data_close(moert_data *d) {
  if (!d) return;
  free(d->bytes);
  free(d->w1);
  free(d->w2);
  free(d->hidden);
  free(d);
}

const unsigned char *moert_data_bytes(const moert_data *d, int64_t *n) {
  *n = d->nbytes;
  return d->bytes;
}

static uint32_t rand_u32(uint64_t seed, uint64_t stream, uint64_t index) {
  return (uint32_t)(moert_rand_uniform(seed, stream, index) * 16777216.0f);
}

/* The synthetic stream's token at position p >= 0. */
static int32_t synth_token(const moert_data *d, uint64_t stream, int64_t p) {
  uint32_t v = (uint32_t)d->vocab;
  if (p % 2 == 0) return (int32_t)(rand_u32(d->seed, stream, (uint64_t)p) % v);
  int32_t prev = (int32_t)(rand_u32(d->seed, stream, (uint64_t)(p - 1)) % v);
  if (moert_rand_uniform(d->seed, stream + 1000, (uint64_t)p) < 0.9f)
    return (int32_t)(rand_u32(d->seed, STREAM_SUCC, (uint64_t)prev) % v); /* the successor */
  return (int32_t)(rand_u32(d->seed, stream + 2000, (uint64_t)p) % v);
}

static int32_t token_at(const moert_data *d, bool eval, int64_t p) {
  if (d->bytes) return d->bytes[p];
  return synth_token(d, eval ? STREAM_EVAL_TOKENS : STREAM_TOKENS, p);
}

/* The stream position where window j (global index) of a step starts: its
 * S + 1 tokens lie in the training part, or in the held-out tail. */
static int64_t window_start(const moert_data *d, int64_t step, bool eval, int64_t j) {
  int64_t S = d->seq, nw = d->global / S;
  if (d->bytes && eval) { /* evenly spaced over the tail, first at its start, last at its end */
    int64_t room = d->nbytes - d->ntrain - (S + 1);
    return d->ntrain + (nw > 1 ? j * (room / (nw - 1)) : 0);
  }
  if (eval) return j * S; /* the synthetic eval stream, from its start */
  int64_t span = d->bytes ? d->ntrain - S : SYNTH_SPAN; /* starts in [0, span) */
  uint64_t r = moert_rand_u64(d->seed, STREAM_WINDOWS, (uint64_t)(step - 1) * (uint64_t)nw + (uint64_t)j);
  return (int64_t)(r % (uint64_t)span);
}

/* With seq: the windows that hold [first, first + n). */
static void window_tokens(const moert_data *d, int64_t step, bool eval, int64_t first, int64_t n,
                          int32_t *win, int32_t *next) {
  int64_t S = d->seq;
  for (int64_t t = 0; t < n;) {
    int64_t g = first + t, j = g / S, i = g % S;
    int64_t start = window_start(d, step, eval, j);
    for (; i < S && t < n; i++, t++) {
      for (int64_t c = 0; c < d->context; c++)
        win[t * d->context + c] = i - c < 0 ? -1 : token_at(d, eval, start + i - c);
      next[t] = token_at(d, eval, start + i + 1);
    }
  }
}

void moert_data_tokens(const moert_data *d, int64_t step, bool eval, int64_t first, int64_t n,
                       int32_t *win, int32_t *next) {
  if (d->seq) {
    window_tokens(d, step, eval, first, n, win, next);
    return;
  }
  int64_t base;
  if (d->bytes) {
    /* consecutive steps read consecutive windows of the training part */
    int64_t span = d->ntrain - d->global - 1;
    base = eval ? d->ntrain : span > 0 ? ((step - 1) * d->global) % span : 0;
  } else {
    base = eval ? 0 : (step - 1) * d->global;
  }
  for (int64_t t = 0; t < n; t++) {
    int64_t p = base + first + t;
    for (int64_t c = 0; c < d->context; c++) {
      int64_t q = p - c;
      bool before = d->bytes ? q < (eval ? d->ntrain : 0) : q < 0;
      win[t * d->context + c] = before ? -1 : token_at(d, eval, q);
    }
    next[t] = token_at(d, eval, p + 1);
  }
}

void moert_data_inputs_key(const moert_data *d, int64_t step, bool eval, int64_t first, uint64_t *seed,
                           uint64_t *stream, uint64_t *index) {
  uint64_t pos = eval ? 0 : (uint64_t)(step - 1) * (uint64_t)d->global;
  *seed = d->seed;
  *stream = eval ? STREAM_EVAL_X : STREAM_X;
  *index = (pos + (uint64_t)first) * (uint64_t)d->dim;
}

void moert_data_inputs(const moert_data *d, int64_t step, bool eval, int64_t first, int64_t n, float *x) {
  uint64_t seed, stream, index;
  moert_data_inputs_key(d, step, eval, first, &seed, &stream, &index);
  moert_fill_normal(x, n * d->dim, seed, stream, index, 0.0f, 1.0f);
}

void moert_data_teacher(const moert_data *d, const float **w1, const float **w2, int64_t *hidden) {
  *w1 = d->w1;
  *w2 = d->w2;
  *hidden = 4 * d->dim;
}

void moert_data_regression(const moert_data *d, int64_t step, bool eval, int64_t first, int64_t n,
                           float *x, float *y) {
  int64_t m = d->dim, h = 4 * m;
  moert_data_inputs(d, step, eval, first, n, x);
  for (int64_t r = 0; r < n; r += TEACHER_CHUNK) {
    int64_t rows = n - r < TEACHER_CHUNK ? n - r : TEACHER_CHUNK;
    moert_cpu_gemm(false, false, rows, h, m, 1.0f, x + r * m, m, d->w1, h, 0.0f, d->hidden, h);
    for (int64_t i = 0; i < rows * h; i++) d->hidden[i] = tanhf(d->hidden[i]);
    moert_cpu_gemm(false, false, rows, m, h, 1.0f, d->hidden, h, d->w2, m, 0.0f, y + r * m, m);
  }
}
