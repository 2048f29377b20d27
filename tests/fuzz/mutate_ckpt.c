/* mutate_ckpt.c — a deterministic mutation fuzzer for the checkpoint reader
 * (safetensors, MANIFEST.json and their JSON, runtime/ckpt_*.c) that runs
 * anywhere (gcc or clang, no libFuzzer): the CTest fuzz.checkpoint.
 *
 *   mutate_ckpt [-n ITERS] [--seed S] [--timeout SECONDS] [--min-rejected N]
 *               [--min-accepted N] [--replay I] [--dir DIR]
 *
 * The seeds are made here, by the checkpoint writer itself: safetensors files
 * of several tensor sets (dtypes, a scalar, an empty tensor, metadata with
 * escapes and UTF-8), and the MANIFEST.json of real checkpoints that
 * moert_ckpt_writer commits (and a version-1 one, still read), as inputs of
 * ckpt_check.h's modes 'S', 'D' and 'M'. Every seed runs unmutated first (each
 * must be accepted), then ITERS mutants (default 5000). Mutant I is made from
 * a PRNG seeded by (S, I) alone, so `--replay I` rebuilds it, writes it to
 * stdout and runs it. Each input goes through moec_ckpt_fuzz_one, in this
 * process; the build compiles this file and the checkpoint code with
 * -fsanitize=address,undefined -fno-sanitize-recover=all, so a memory error,
 * UB, a leak (LeakSanitizer at exit), an abort, a rejection without a
 * message or an input that runs past --timeout (default 10 s) fails the run;
 * the input is then saved as ./mutate-ckpt-crash.bin and the replay command
 * printed. The run also fails (exit 1) when fewer than --min-rejected mutants
 * were rejected or fewer than --min-accepted accepted, counting only mutants
 * that differ from their seed, so a mutator that stopped changing its seeds,
 * or a reader that refuses (or takes) everything, cannot pass.
 *
 * Mutations: bit flips, odd bytes, deleted, duplicated and truncated ranges,
 * JSON and safetensors tokens inserted (keys, dtypes, huge and negative
 * numbers, bad escapes and UTF-8), numbers moved by -8 to 8 or replaced by
 * odd ones (offsets, shapes, sizes, the step), the 8-byte header length
 * overwritten, the mode swapped between 'S' and 'D'. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "checkpoint.h"
#include "ckpt_check.h"

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MUT_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define MUT_ASAN 1
#endif
#ifdef MUT_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

#define CRASH_FILE "mutate-ckpt-crash.bin"
/* A mutant grows to at most this many bytes (the seeds are a few hundred). */
#define MAX_LEN (1 << 16)
/* Seeds at most. */
#define MAX_SEEDS 16

typedef struct bytes {
  unsigned char *p;
  size_t len;
} bytes;

static bytes g_seeds[MAX_SEEDS];
static int g_nseeds;
static const unsigned char *g_cur;
static size_t g_cur_len;
static char g_label[128];
static unsigned g_timeout = 10;

static void say(const char *s) {
  size_t n = strlen(s);
  while (n > 0) {
    ssize_t w = write(2, s, n);
    if (w <= 0) return;
    s += w;
    n -= (size_t)w;
  }
}

/* Saves the input being run and says how to get it again; async-signal
 * safe, as it runs from signal handlers and the sanitizers' death callback. */
static void save_current(void) {
  if (!g_cur) return;
  int fd = open(CRASH_FILE, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd >= 0) {
    size_t off = 0;
    while (off < g_cur_len) {
      ssize_t w = write(fd, g_cur + off, g_cur_len - off);
      if (w <= 0) break;
      off += (size_t)w;
    }
    close(fd);
  }
  say("mutate_ckpt: FAILED on ");
  say(g_label);
  say("\nmutate_ckpt: the input is saved as " CRASH_FILE " (in the working directory); rebuild it with "
      "mutate_ckpt --seed S --replay I\n");
  g_cur = NULL;
}

static void on_signal(int sig) {
  if (sig == SIGALRM) say("mutate_ckpt: HANG: the input ran past the --timeout\n");
  save_current();
  signal(SIGABRT, SIG_DFL);
  abort();
}

static uint64_t splitmix(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static void *xmalloc(size_t n) {
  void *p = malloc(n ? n : 1);
  if (!p) {
    fputs("mutate_ckpt: out of memory\n", stderr);
    exit(2);
  }
  return p;
}

/* Adds mode + payload as a seed. */
static void add_seed(char mode, const void *p, size_t n) {
  if (g_nseeds == MAX_SEEDS) return;
  bytes *s = &g_seeds[g_nseeds++];
  s->p = xmalloc(n + 1);
  s->p[0] = (unsigned char)mode;
  memcpy(s->p + 1, p, n);
  s->len = n + 1;
}

static bool read_all(const char *path, bytes *out) {
  FILE *f = fopen(path, "rb");
  if (!f) return false;
  out->p = xmalloc(MAX_LEN);
  out->len = fread(out->p, 1, MAX_LEN, f);
  fclose(f);
  return true;
}

/* The seeds: safetensors files as 'S' and 'D', manifests of committed
 * checkpoints as 'M'. */
static bool make_seeds(const char *scratch) {
  static const float w[24] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, -1, -2, -3, -4, -5, -6, 0.5f, 0.25f, 1e-30f, 3e38f, 0, -0.0f};
  static const int64_t i64[3] = {-1, 0, INT64_MAX};
  static const uint8_t u8[5] = {0, 1, 127, 128, 255};
  static const uint16_t half[2] = {0x3c00, 0xfc00};
  const moert_st_tensor sets[3][4] = {
      {{.name = "experts_0.w1", .dtype = MOERT_ST_F32, .ndim = 3, .shape = {2, 3, 4}, .data = w, .nbytes = sizeof w}},
      {{.name = "s", .dtype = MOERT_ST_I64, .ndim = 0, .data = i64, .nbytes = 8},
       {.name = "empty", .dtype = MOERT_ST_F16, .ndim = 2, .shape = {0, 5}, .data = half, .nbytes = 0},
       {.name = "bytes", .dtype = MOERT_ST_U8, .ndim = 1, .shape = {5}, .data = u8, .nbytes = sizeof u8},
       {.name = "h", .dtype = MOERT_ST_BF16, .ndim = 2, .shape = {1, 2}, .data = half, .nbytes = sizeof half}},
      {{.name = "n\xc3\xa4me \"q\"", .dtype = MOERT_ST_F32, .ndim = 1, .shape = {6}, .data = w, .nbytes = 24},
       {.name = "tail", .dtype = MOERT_ST_I64, .ndim = 1, .shape = {3}, .data = i64, .nbytes = sizeof i64}},
  };
  const int counts[3] = {1, 4, 2};
  const moert_kv meta[2] = {{"spec", "tiny.moe"}, {"note", "tab\there \\ \xe2\x82\xac"}};
  for (int k = 0; k < 3; k++) {
    moert_status st = {0};
    void *buf = NULL;
    size_t len = 0;
    if (!moert_st_serialize(sets[k], counts[k], meta, k, &buf, &len, &st)) {
      fprintf(stderr, "mutate_ckpt: a seed does not serialize: %s\n", st.msg);
      return false;
    }
    add_seed(k == 1 ? 'D' : 'S', buf, len);
    add_seed(k == 1 ? 'S' : 'D', buf, len);
    free(buf);
  }
  /* real checkpoints of the checker's data files, committed by the writer */
  const unsigned char *model, *opt;
  size_t model_len, opt_len;
  moec_ckpt_fuzz_data(&model, &model_len, &opt, &opt_len);
  for (int k = 0; k < 2; k++) {
    char dir[4200];
    snprintf(dir, sizeof dir, "%s/seed%d", scratch, k);
    moert_status st = {0};
    moert_ckpt_writer *wr = NULL;
    bool ok = moert_ckpt_writer_create(dir, 0, &wr, &st) &&
              moert_ckpt_add_file(wr, "model.safetensors", model, model_len, &st) &&
              (k == 0 || moert_ckpt_add_file(wr, "opt.bin", opt, opt_len, &st)) &&
              moert_ckpt_commit(wr, 7 + 1000 * k, meta, k + 1, &st);
    moert_ckpt_writer_destroy(wr);
    char path[4300];
    snprintf(path, sizeof path, "%s/MANIFEST.json", dir);
    bytes m = {0};
    if (!ok || !read_all(path, &m)) {
      fprintf(stderr, "mutate_ckpt: a seed checkpoint cannot be written in %s: %s\n", dir, st.msg);
      return false;
    }
    add_seed('M', m.p, m.len);
    free(m.p);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    unlink(path);
    snprintf(path, sizeof path, "%s/opt.bin", dir);
    unlink(path);
    snprintf(path, sizeof path, "%s/MANIFEST.json", dir);
    unlink(path);
    rmdir(dir);
  }
  /* a version-1 manifest (no hash of its own), as checkpoints before had */
  {
    char v1[512];
    unsigned long long hm = 0, ho = 0;
    /* the hashes the writer listed: taken from the seed just made */
    const char *seed = (const char *)g_seeds[g_nseeds - 1].p;
    const char *a = strstr(seed, "\"model.safetensors\""), *b = strstr(seed, "\"opt.bin\"");
    if (!a || !b || sscanf(strstr(a, "\"xxh64\": \"") + 10, "%16llx", &hm) != 1 ||
        sscanf(strstr(b, "\"xxh64\": \"") + 10, "%16llx", &ho) != 1) {
      fputs("mutate_ckpt: the seed manifest has no file hashes\n", stderr);
      return false;
    }
    int n = snprintf(v1, sizeof v1,
                     "{\"format\": \"moec-checkpoint\", \"version\": 1, \"step\": 3, \"metadata\": {\"k\": \"v\"},\n"
                     " \"files\": [{\"name\": \"model.safetensors\", \"size\": %zu, \"xxh64\": \"%016llx\"},\n"
                     "  {\"name\": \"opt.bin\", \"size\": %zu, \"xxh64\": \"%016llx\"}]}\n",
                     model_len, hm, opt_len, ho);
    add_seed('M', v1, (size_t)n);
  }
  return true;
}

static const char *const TOKENS[] = {
    "\"data_offsets\"", "\"dtype\"", "\"shape\"", "\"__metadata__\"", "\"F32\"", "\"BF16\"", "\"I64\"",
    "\"F8_E4M3\"", "\"BOOL\"", "[0,0]", "[0,4294967296]", "[]", "{}", "[[[[[[[[[[", "]]]]]", "-1", "0",
    "18446744073709551615", "9223372036854775807", "-9223372036854775808", "1e400", "1.5", "null", "true",
    "\"\\u0000\"", "\"\\ud800\"", "\"\\uDBFF\\uDFFF\"", "\"\\x\"", "\"version\": 2", "\"version\": 1",
    "\"step\": ", "\"files\"", "\"manifest_xxh64\"", "\"xxh64\"", "\"size\"", "\"name\"", "\"../x\"",
    "\"MANIFEST.json\"", "\".hidden\"", "\"opt.bin\"", "\"model.safetensors\"", "\xc3\x28", "\xf4\x90\x80\x80",
    "\xed\xa0\x80", "\xc0\xaf", ",", ":", "\"", "\\", "{", "}", "[", "]", "\n", " ", "\t", "\x01",
};
static const unsigned char ODD[] = {0, 1, 0x1f, 0x7f, 0x80, 0xc3, 0xff, '"', '\\', '{', '}', '[', ']', ',',
                                    ':', '0', '9', '-', 'e', '.', ' ', '\n', 'u'};

/* Inserts s[0..n) at byte at of m (capped at MAX_LEN). */
static void insert(bytes *m, size_t at, const void *s, size_t n) {
  if (m->len + n > MAX_LEN) return;
  memmove(m->p + at + n, m->p + at, m->len - at);
  memcpy(m->p + at, s, n);
  m->len += n;
}

/* Mutant i of run seed into m (m->p holds MAX_LEN bytes). */
static void make_mutant(uint64_t seed, long i, bytes *m, int *from) {
  uint64_t r = seed * 0x100000001b3ull ^ (uint64_t)i * 0x9e3779b97f4a7c15ull;
  int s = (int)(splitmix(&r) % (uint64_t)g_nseeds);
  *from = s;
  memcpy(m->p, g_seeds[s].p, g_seeds[s].len);
  m->len = g_seeds[s].len;
  int ops = 1 + (int)(splitmix(&r) % 3);
  for (int k = 0; k < ops; k++) {
    size_t pay = m->len - 1; /* the payload after the mode byte */
    size_t at = 1 + (pay ? splitmix(&r) % pay : 0);
    switch (splitmix(&r) % 11) {
    case 0:
      if (pay) m->p[at] ^= (unsigned char)(1u << (splitmix(&r) % 8));
      break;
    case 1:
      if (pay) m->p[at] = ODD[splitmix(&r) % sizeof ODD];
      break;
    case 2: { /* delete a range */
      size_t n = pay ? 1 + splitmix(&r) % (splitmix(&r) % 2 ? 4 : 64) : 0;
      if (at + n > m->len) n = m->len - at;
      memmove(m->p + at, m->p + at + n, m->len - at - n);
      m->len -= n;
      break;
    }
    case 3: { /* duplicate a range elsewhere */
      size_t from_at = 1 + (pay ? splitmix(&r) % pay : 0), n = 1 + splitmix(&r) % 32;
      if (from_at + n > m->len) n = m->len - from_at;
      unsigned char tmp[32];
      memcpy(tmp, m->p + from_at, n);
      insert(m, at, tmp, n);
      break;
    }
    case 4: /* truncate */
      m->len = 1 + (pay ? splitmix(&r) % pay : 0);
      break;
    case 5:
    case 6: { /* a token */
      const char *t = TOKENS[splitmix(&r) % (sizeof TOKENS / sizeof TOKENS[0])];
      if (splitmix(&r) % 2 && pay) { /* over a token-sized piece */
        size_t n = strlen(t);
        if (at + n > m->len) n = m->len - at;
        memmove(m->p + at, m->p + at + n, m->len - at - n);
        m->len -= n;
      }
      insert(m, at, t, strlen(t));
      break;
    }
    case 7: { /* the safetensors header length: odd values */
      if (m->len < 9) break;
      uint64_t len = 0;
      for (int b = 0; b < 8; b++) len |= (uint64_t)m->p[1 + b] << (8 * b);
      const uint64_t cands[] = {0, 1, 2, len - 1, len + 1, len + 8, (uint64_t)m->len - 9, (uint64_t)m->len,
                                (uint64_t)m->len - 5, 100000001, UINT64_MAX, (uint64_t)1 << 63, 8 * (len / 8)};
      uint64_t v = cands[splitmix(&r) % (sizeof cands / sizeof cands[0])];
      for (int b = 0; b < 8; b++) m->p[1 + b] = (unsigned char)(v >> (8 * b));
      break;
    }
    case 9:
    case 10: { /* a number near `at` moved by a little, or replaced by an odd one */
      size_t d = at;
      while (d < m->len && !(m->p[d] >= '0' && m->p[d] <= '9')) d++;
      if (d == m->len) break;
      size_t e = d;
      unsigned long long v = 0;
      while (e < m->len && m->p[e] >= '0' && m->p[e] <= '9' && e - d < 19) v = v * 10 + (m->p[e++] - '0');
      static const unsigned long long odd[] = {0, 1, 7, 8, 4294967295ull, 4294967296ull, 9223372036854775807ull,
                                               18446744073709551615ull};
      long long delta = (long long)(splitmix(&r) % 17) - 8;
      unsigned long long nv = splitmix(&r) % 3 ? v + (unsigned long long)delta : odd[splitmix(&r) % 8];
      char num[24];
      int n = snprintf(num, sizeof num, "%llu", nv);
      memmove(m->p + d, m->p + e, m->len - e);
      m->len -= e - d;
      insert(m, d, num, (size_t)n);
      break;
    }
    case 8: /* the mode: safetensors in memory or through the directory */
      if (m->p[0] == 'S' || m->p[0] == 'D') m->p[0] = m->p[0] == 'S' ? 'D' : 'S';
      break;
    }
  }
}

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int run_one(const unsigned char *p, size_t n) {
  g_cur = p;
  g_cur_len = n;
  alarm(g_timeout);
  int res = moec_ckpt_fuzz_one(p, n);
  alarm(0);
  g_cur = NULL;
  return res;
}

static void usage(void) {
  fputs("usage: mutate_ckpt [-n ITERS] [--seed S] [--timeout SECONDS] [--min-rejected N] [--min-accepted N]\n"
        "                   [--replay I] [--dir DIR]\n",
        stderr);
  exit(2);
}

static long num(const char *s) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || end == s || *end || v < 0) usage();
  return v;
}

int main(int argc, char **argv) {
  long iters = 5000, min_rejected = 0, min_accepted = 0, replay = -1;
  uint64_t seed = 1;
  const char *dir = NULL;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (i + 1 >= argc) usage();
    const char *v = argv[++i];
    if (!strcmp(a, "-n")) iters = num(v);
    else if (!strcmp(a, "--seed")) seed = (uint64_t)num(v);
    else if (!strcmp(a, "--timeout")) g_timeout = (unsigned)num(v);
    else if (!strcmp(a, "--min-rejected")) min_rejected = num(v);
    else if (!strcmp(a, "--min-accepted")) min_accepted = num(v);
    else if (!strcmp(a, "--replay")) replay = num(v);
    else if (!strcmp(a, "--dir")) dir = v;
    else usage();
  }
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigaction(SIGALRM, &sa, NULL);
  sigaction(SIGABRT, &sa, NULL);
#ifdef MUT_ASAN
  __sanitizer_set_death_callback(save_current);
#endif
  if (!moec_ckpt_fuzz_init(dir)) return 2;
  int rc = 0;
  if (!make_seeds(moec_ckpt_fuzz_scratch())) {
    moec_ckpt_fuzz_cleanup();
    return 2;
  }
  bytes m = {xmalloc(MAX_LEN), 0};
  double t0 = now_ms();
  if (replay >= 0) {
    int from;
    make_mutant(seed, replay, &m, &from);
    fwrite(m.p, 1, m.len, stdout);
    fflush(stdout);
    snprintf(g_label, sizeof g_label, "mutant %ld", replay);
    int res = run_one(m.p, m.len);
    fprintf(stderr, "mutate_ckpt: mutant %ld (of seed %d): %s%s\n", replay, from,
            res ? "accepted" : "rejected: ", moec_ckpt_fuzz_message());
  } else {
    for (int s = 0; s < g_nseeds; s++) {
      snprintf(g_label, sizeof g_label, "seed %d (unmutated)", s);
      if (!run_one(g_seeds[s].p, g_seeds[s].len)) {
        fprintf(stderr, "mutate_ckpt: seed %d (mode %c) is rejected: %s\n", s, g_seeds[s].p[0],
                moec_ckpt_fuzz_message());
        rc = 1;
      }
    }
    long accepted = 0, rejected = 0, unchanged = 0, by_mode[3][2] = {{0}};
    for (long i = 0; i < iters; i++) {
      int from;
      make_mutant(seed, i, &m, &from);
      snprintf(g_label, sizeof g_label, "mutant %ld (--seed %" PRIu64 " --replay %ld)", i, seed, i);
      int res = run_one(m.p, m.len);
      if (m.len == g_seeds[from].len && memcmp(m.p, g_seeds[from].p, m.len) == 0) {
        unchanged++;
        continue;
      }
      accepted += res;
      rejected += !res;
      int mode = m.p[0] == 'M' ? 2 : m.p[0] == 'D' ? 1 : 0;
      by_mode[mode][res]++;
    }
    printf("mutate_ckpt: %d seeds and %ld mutants (seed %" PRIu64 ") in %.1f s: %ld accepted, %ld rejected "
           "with a message, %ld unchanged; by mode S %ld/%ld, D %ld/%ld, M %ld/%ld (accepted/rejected)\n",
           g_nseeds, iters, seed, (now_ms() - t0) / 1e3, accepted, rejected, unchanged, by_mode[0][1],
           by_mode[0][0], by_mode[1][1], by_mode[1][0], by_mode[2][1], by_mode[2][0]);
    if (rejected < min_rejected) {
      printf("mutate_ckpt: FAILED: only %ld mutants rejected, fewer than --min-rejected %ld\n", rejected,
             min_rejected);
      rc = 1;
    }
    if (accepted < min_accepted) {
      printf("mutate_ckpt: FAILED: only %ld mutants accepted, fewer than --min-accepted %ld\n", accepted,
             min_accepted);
      rc = 1;
    }
  }
  free(m.p);
  for (int s = 0; s < g_nseeds; s++) free(g_seeds[s].p);
  moec_ckpt_fuzz_cleanup();
  return rc;
}
