/* test_data.c — runtime/data's token loader with sequences (seq), on a bytes
 * file and on the synthetic stream:
 *  - a step's windows are the same whatever ranks ask for them: the batch read
 *    whole (world 1), by halves and quarters (worlds 2 and 4) and by uneven
 *    pieces that cut windows apart;
 *  - each window is seq + 1 consecutive tokens of the file's training part (of
 *    the held-out tail for evaluation), at a random place that changes with
 *    the step and from window to window; evaluation's windows are fixed and
 *    evenly spaced over the tail, the first at its start;
 *  - the n-gram look-back (context) stops at the window's start;
 *  - without seq, the loader is today's: consecutive positions from the
 *    file's start, step after step;
 *  - a batch that is not a whole number of sequences is refused. */
#include "data.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../check.h"

enum { S = 16, C = 3, G = 8 * S, NBYTES = 20000 };

static unsigned char file[NBYTES];

/* The file's bytes: an LCG's high bits, so any 17 in a row occur once. */
static void write_file(const char *path) {
  uint32_t x = 12345;
  for (int i = 0; i < NBYTES; i++) {
    x = x * 1664525u + 1013904223u;
    file[i] = (unsigned char)(x >> 24);
  }
  FILE *f = fopen(path, "wb");
  CHECK(f && fwrite(file, 1, NBYTES, f) == NBYTES && fclose(f) == 0, "cannot write %s", path);
}

/* Where in the file the window of inputs win[..0] (S of them) and its last
 * target lie: the offset of its first input, or -1. */
static int64_t find_window(const int32_t *win, const int32_t *next) {
  for (int64_t s = 0; s + S < NBYTES; s++) {
    bool ok = true;
    for (int64_t i = 0; i < S && ok; i++) ok = file[s + i] == win[i * C];
    if (ok && file[s + S] == next[S - 1]) return s;
  }
  return -1;
}

/* The whole batch of a step through pieces [cuts[k], cuts[k+1]). */
static void read_split(const moert_data *d, int64_t step, bool eval, const int64_t *cuts, int ncuts,
                       int32_t *win, int32_t *next) {
  for (int k = 0; k + 1 < ncuts; k++)
    moert_data_tokens(d, step, eval, cuts[k], cuts[k + 1] - cuts[k], win + cuts[k] * C, next + cuts[k]);
}

/* The windows of a step are the same at every split of the batch. */
static void check_splits(const moert_data *d, const char *what) {
  static int32_t w1[G * C], n1[G], w2[G * C], n2[G];
  const int64_t world1[] = {0, G}, world2[] = {0, G / 2, G}, world4[] = {0, G / 4, G / 2, 3 * G / 4, G},
                uneven[] = {0, 5, 21, 22, 60, 100, G};
  const struct { const int64_t *cuts; int n; const char *name; } splits[] = {
      {world2, 3, "2 ranks"}, {world4, 5, "4 ranks"}, {uneven, 7, "uneven pieces"}};
  for (int e = 0; e < 2; e++)
    for (int64_t step = 1; step <= 3; step++) {
      read_split(d, step, e, world1, 2, w1, n1);
      for (size_t k = 0; k < sizeof splits / sizeof splits[0]; k++) {
        memset(w2, 0x55, sizeof w2);
        read_split(d, step, e, splits[k].cuts, splits[k].n, w2, n2);
        CHECK(memcmp(w1, w2, sizeof w1) == 0 && memcmp(n1, n2, sizeof n1) == 0,
              "%s: step %lld%s: the batch read by %s differs from the batch read whole", what,
              (long long)step, e ? " (eval)" : "", splits[k].name);
      }
    }
}

/* Inside each window: targets are the next inputs, and the look-back holds
 * the window's earlier tokens, -1 before its start. */
static void check_lookback(const int32_t *win, const int32_t *next, const char *what) {
  int bad = 0;
  for (int64_t t = 0; t < G; t++) {
    int64_t i = t % S;
    if (i + 1 < S && next[t] != win[(t + 1) * C]) bad++;
    for (int64_t c = 0; c < C; c++) {
      int32_t want = i - c < 0 ? -1 : win[(t - c) * C];
      if (win[t * C + c] != want) bad++;
    }
  }
  CHECK(bad == 0, "%s: %d look-back or target tokens are wrong (the look-back must stop at the window's start)",
        what, bad);
}

static void test_bytes(const char *path) {
  moert_status st = {0};
  moert_data *d = NULL;
  if (!moert_data_open_seq(&d, path, 256, 8, C, S, G, 7, &st)) {
    CHECK(false, "open with seq: %s", st.msg);
    return;
  }
  check_splits(d, "bytes");
  int64_t ntrain = NBYTES - NBYTES / 10;
  static int32_t win[G * C], next[G];
  int64_t starts[3][G / S];
  for (int64_t step = 1; step <= 2; step++) {
    moert_data_tokens(d, step, false, 0, G, win, next);
    check_lookback(win, next, "bytes, training");
    int adjacent = 0;
    for (int64_t j = 0; j < G / S; j++) {
      int64_t s = find_window(win + j * S * C, next + j * S);
      starts[step][j] = s;
      CHECK(s >= 0 && s + S < ntrain, "step %lld window %lld: not %d + 1 bytes of the training part "
            "(found at %lld; the training part ends at %lld)", (long long)step, (long long)j, S,
            (long long)s, (long long)ntrain);
      if (j > 0 && s == starts[step][j - 1] + S) adjacent++;
    }
    CHECK(adjacent < G / S - 1, "step %lld: the windows follow one another; they must start at random places",
          (long long)step);
  }
  CHECK(memcmp(starts[1], starts[2], sizeof starts[1]) != 0, "steps 1 and 2 read the same windows");
  /* evaluation: the tail, evenly spaced, the same at every step */
  int64_t prev = -1, gap = -1;
  for (int64_t step = 1; step <= 2; step++) {
    moert_data_tokens(d, step * 7, true, 0, G, win, next);
    check_lookback(win, next, "bytes, eval");
    for (int64_t j = 0; j < G / S; j++) {
      int64_t s = find_window(win + j * S * C, next + j * S);
      if (step == 1) starts[0][j] = s;
      CHECK(s == starts[0][j], "eval window %lld moves between steps: %lld, then %lld", (long long)j,
            (long long)starts[0][j], (long long)s);
      CHECK(s >= ntrain && s + S < NBYTES, "eval window %lld at %lld is not in the held-out tail [%lld, %d)",
            (long long)j, (long long)s, (long long)ntrain, NBYTES);
      if (j == 0) CHECK(s == ntrain, "the first eval window starts at %lld, not at the tail's start %lld",
                        (long long)s, (long long)ntrain);
      if (j == 1) gap = s - prev;
      if (j > 1) CHECK(s - prev == gap, "eval windows are not evenly spaced: %lld after %lld, gap %lld",
                       (long long)s, (long long)prev, (long long)gap);
      prev = s;
    }
  }
  CHECK(gap > S, "eval windows should spread over the tail (gap %lld)", (long long)gap);
  moert_data_close(d);

  /* without seq: consecutive positions from the start, step after step */
  if (!moert_data_open(&d, path, 256, 8, C, G, 7, &st)) {
    CHECK(false, "open without seq: %s", st.msg);
    return;
  }
  int bad = 0;
  for (int64_t step = 1; step <= 2; step++) {
    moert_data_tokens(d, step, false, 0, G, win, next);
    for (int64_t t = 0; t < G; t++) {
      int64_t p = (step - 1) * G + t;
      if (next[t] != file[p + 1]) bad++;
      for (int64_t c = 0; c < C; c++)
        if (win[t * C + c] != (p - c < 0 ? -1 : file[p - c])) bad++;
    }
  }
  CHECK(bad == 0, "without seq, %d tokens are not the file's consecutive bytes", bad);
  moert_data_close(d);
}

static void test_synthetic(void) {
  moert_status st = {0};
  moert_data *d = NULL;
  if (!moert_data_open_seq(&d, NULL, 50, 8, C, S, G, 3, &st)) {
    CHECK(false, "open synthetic with seq: %s", st.msg);
    return;
  }
  check_splits(d, "synthetic");
  static int32_t win[G * C], next[G], win2[G * C];
  moert_data_tokens(d, 1, false, 0, G, win, next);
  check_lookback(win, next, "synthetic, training");
  moert_data_tokens(d, 2, false, 0, G, win2, next);
  CHECK(memcmp(win, win2, sizeof win) != 0, "synthetic: steps 1 and 2 read the same windows");
  moert_data_tokens(d, 1, true, 0, G, win, next);
  check_lookback(win, next, "synthetic, eval");
  moert_data_tokens(d, 5, true, 0, G, win2, next);
  CHECK(memcmp(win, win2, sizeof win) == 0, "synthetic: the eval windows change with the step");
  moert_data_close(d);
}

static void test_refused(void) {
  moert_status st = {0};
  moert_data *d = NULL;
  bool ok = moert_data_open_seq(&d, NULL, 50, 8, 1, S, G + 4, 3, &st);
  CHECK(!ok && !d && strstr(st.msg, "not a whole number of sequences of 16"),
        "a batch of %d tokens with seq %d: opened=%d, message \"%s\"", G + 4, S, ok, st.msg);
  moert_data_close(d);
}

int main(int argc, char **argv) {
  const char *dir = argc > 1 ? argv[1] : ".";
  char path[4096];
  snprintf(path, sizeof path, "%s/test_data.bin", dir);
  write_file(path);
  test_bytes(path);
  test_synthetic();
  test_refused();
  remove(path);
  printf("test_data: %d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
