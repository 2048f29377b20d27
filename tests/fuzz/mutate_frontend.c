/* mutate_frontend.c — a deterministic mutation fuzzer for the front end that
 * runs anywhere (gcc or clang, no libFuzzer): the CTest fuzz.mutation.
 *
 *   mutate_frontend [-n ITERS] [--seed S] [--max-len BYTES] [--timeout SECONDS]
 *                   [--min-clean N] [--min-errors N]
 *                   [--regressions DIR] [--replay I] [--dict] SEED...
 *
 * Every file of --regressions DIR runs first, unmutated; then every SEED (a
 * file, or a folder whose files are read in name order), unmutated; then ITERS
 * mutants (default 5000). Mutant I is made from a PRNG seeded by (S, I) alone,
 * so `--replay I` (same seeds, same S) rebuilds it, writes it to stdout and
 * checks it. Each input goes through moec_fuzz_check (fuzz_check.h), in this
 * process. The build compiles this file and the whole front end with
 * -fsanitize=address,undefined -fno-sanitize-recover=all, so a memory error,
 * UB, a leak (LeakSanitizer at exit), a broken property or an input that runs
 * longer than --timeout (default 10 s) fails the run; the input being checked
 * is then saved as ./mutate-crash.moe and the replay command is printed.
 * The run also fails (exit 1) when fewer than --min-clean mutants checked
 * clean or fewer than --min-errors had errors (both 0 by default), counting
 * only mutants that differ from their seed: a check that passes on every input
 * proves little if the mutator has stopped making inputs the front end accepts
 * (or rejects), or stopped changing its seeds at all.
 * --dict prints the tokens the mutator inserts as a libFuzzer dictionary.
 *
 * Mutations: bit flips, odd bytes, insert/delete/duplicate ranges, truncation,
 * splicing two seeds, line swaps, tokens of the language (keywords from
 * keys.def and spec.def, punctuation, bad numbers, bad UTF-8), values replaced
 * by others of the key's type (or of a wrong type), statements deleted, items
 * and layers inserted at statement boundaries, deep `{`, `residual {`,
 * `repeat N {` and `f(` nesting, long names and many repeated statements. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "fuzz_check.h"
#include "spec.h"

#if defined(__SANITIZE_ADDRESS__)
#define MUT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MUT_ASAN 1
#endif
#endif
#ifdef MUT_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

#define DEFAULT_ITERS 5000
/* Mutants are cut to this size: big enough for every limit of the language
 * that a mutant can reach (nesting, error count), small enough to stay fast. */
#define DEFAULT_MAX_LEN (64u * 1024u)
/* An input that takes longer than this is a hang (the front end is linear). */
#define DEFAULT_TIMEOUT_S 10
#define CRASH_FILE "mutate-crash.moe"

/* --- the token pools (also the --dict output) --- */

typedef struct tok {
  const char *s;
  size_t n; /* tokens may hold NUL bytes */
} tok;
#define T(lit) {lit, sizeof(lit) - 1}
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

/* Every word of the language, from the X-macro lists the compiler uses, plus
 * the two words of `data` that sema.c spells out. */
static const char *const words[] = {
#define KEY(b, n, t) #n,
#include "keys.def"
#undef KEY
#define DTYPE(k, s) s,
#define ACT(k, s) s,
#define GATE(k, s) s,
#define A2A(k, s) s,
#define SELECT(k, s) s,
#define OPTIM(k, s) s,
#define SCHED(k, s) s,
#define BOOLEAN(k, s) s,
#define LAYER(k, s, f) s,
#define SECTION(k, s) s,
#include "spec.def"
#undef DTYPE
#undef ACT
#undef GATE
#undef A2A
#undef SELECT
#undef OPTIM
#undef SCHED
#undef BOOLEAN
#undef LAYER
#undef SECTION
    "synthetic", "bytes",
};

static const char *const bool_words[] = {
#define BOOLEAN(k, s) s,
#include "spec.def"
#undef BOOLEAN
};

/* Keys with their keys.def type, to make values that fit (or not). */
static const struct {
  const char *name, *type;
} key_types[] = {
#define KEY(b, n, t) {#n, #t},
#include "keys.def"
#undef KEY
};

static const tok syntax[] = {
    T("{"), T("}"), T(";"), T("="), T(","), T("("), T(")"), T("\""), T("#"), T("\n"),
    T(" "), T("\t"), T("\r"), T("\\"), T("@"), T("-"), T("."), T("$"), T("\x7f"), T("{{{{"),
    T("}}}}"), T(";;"), T("= ="), T("\r\n"), T("\v"), T("\f"),
};

static const tok odd_bytes[] = {
    T("\x00"), T("\xff"), T("\x80"), T("\xc3\xa9"), T("\xe2\x82\xac"), T("\xf0\x9f\x98\x80"),
    T("\xed\xa0\x80"), T("\xc0\x80"), T("\xf4\x90\x80\x80"), T("\xe0\x80\x80"), T("\xc3"),
    T("\xe2\x82"), T("\xc2\x85"), T("\xe2\x80\xae"), T("\xef\xbb\xbf"), T("\x01"), T("\x1b[31m"),
};

static const char *const ints[] = {
    "0", "1", "2", "3", "4", "7", "8", "16", "63", "64", "65", "128", "255", "256", "257",
    "1024", "4095", "4096", "4097", "65536", "1048576", "1048577", "2147483647", "2147483648",
    "4294967296", "1099511627776", "9223372036854775807", "9223372036854775808",
    "-9223372036854775808", "-9223372036854775809", "99999999999999999999", "-1", "-0", "00",
    "007", "-64",
};

static const char *const nums[] = {
    "0.0", "-0.0", "0.5", "1.0", "1.25", "-1.25", "-1", "0.999", "1e-3", "3e-4", "1e-8", "1e999",
    "-1e999", "1e-999", "4.9e-324", "2.2250738585072014e-308", "1.7976931348623157e308",
    "1e308", "0.1", "0.30000000000000004", "123456789012345678901234567890.5", ".5", "5.",
    "-.5", "1E5", "1e+5", "100.0", "2.5e-5", "1.2.3", "3e", "64x", "1_024", "0x10", "1e",
    "- 1", "--1", "1e-", "9007199254740993.0",
};

static const tok phrases[] = {
    T("repeat 4096"), T("repeat 4097 { rmsnorm; }"), T("repeat 0 { rmsnorm; }"),
    T("repeat 1.5 { rmsnorm; }"), T("bytes(\"data.txt\")"), T("bytes()"), T("bytes(\"\")"),
    T("bytes(\"a\", \"b\")"), T("\"unterminated\n"), T("\"a\\\"b\\\\c\""), T("\"bad\\q\""),
    T("\"\\"), T("# comment"), T("model m {"), T("a(a(a(a("), T("))))"), T("x = ;"), T("x = 1"),
    T("residual {"), T("moe e {"), T("ffn f {"), T("parallel {"), T("train {"), T("}\n}\n}"),
    T("dim = 64;"), T("tokens = 64;"), T("vocab = 256;"), T("context = 64;"),
    T("data = bytes(\"x\");"), T("checkpoint = \"ckpt\";"), T("adaptive_r = auto, auto;"),
    T("overlap_degree = 8, 8;"), T("all_to_all = 2dh, 2dh;"), T("capacity_factor = 0.5;"),
};

/* --- a deterministic PRNG (splitmix64) --- */

typedef struct rng {
  uint64_t s;
} rng;

static uint64_t next(rng *r) {
  uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/* Uniform in [0, n); n > 0. */
static size_t below(rng *r, size_t n) { return (size_t)(next(r) % n); }
static bool chance(rng *r, unsigned percent) { return below(r, 100) < percent; }

/* --- growable byte buffers --- */

typedef struct bytes {
  uint8_t *p;
  size_t len, cap;
} bytes;

static void *xrealloc(void *p, size_t n) {
  void *q = realloc(p, n ? n : 1);
  if (!q) {
    fprintf(stderr, "mutate_frontend: out of memory (%zu bytes)\n", n);
    exit(2);
  }
  return q;
}

static void b_reserve(bytes *b, size_t n) {
  if (n <= b->cap) return;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < n) cap *= 2;
  b->p = xrealloc(b->p, cap);
  b->cap = cap;
}

/* Buffers are never NULL (b_reserve(b, 1) first), so `b->p + i` is always
 * defined, even when empty. */
static void b_insert(bytes *b, size_t at, const void *s, size_t n) {
  if (n == 0) return;
  b_reserve(b, b->len + n);
  memmove(b->p + at + n, b->p + at, b->len - at);
  memcpy(b->p + at, s, n);
  b->len += n;
}

static void b_erase(bytes *b, size_t at, size_t n) {
  memmove(b->p + at, b->p + at + n, b->len - at - n);
  b->len -= n;
}

static void b_set(bytes *b, const void *s, size_t n) {
  b->len = 0;
  b_insert(b, 0, s, n);
}

static void b_puts(bytes *b, const char *s) { b_insert(b, b->len, s, strlen(s)); }

static void b_printf(bytes *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void b_printf(bytes *b, const char *fmt, ...) {
  char buf[256];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (n > 0) b_insert(b, b->len, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
}

/* --- inputs --- */

typedef struct input {
  char *name;
  bytes data;
} input;

typedef struct inputs {
  input *v;
  size_t n, cap;
} inputs;

static bool read_file(const char *path, bytes *out) {
  FILE *f = fopen(path, "rb");
  if (!f) return false;
  uint8_t buf[65536];
  size_t got;
  while ((got = fread(buf, 1, sizeof buf, f)) > 0) b_insert(out, out->len, buf, got);
  bool ok = !ferror(f);
  fclose(f);
  return ok;
}

static void add_file(inputs *in, const char *path) {
  if (in->n == in->cap) {
    in->cap = in->cap ? in->cap * 2 : 16;
    in->v = xrealloc(in->v, in->cap * sizeof *in->v);
  }
  input *x = &in->v[in->n];
  memset(x, 0, sizeof *x);
  b_reserve(&x->data, 1);
  if (!read_file(path, &x->data)) {
    fprintf(stderr, "mutate_frontend: cannot read %s: %s\n", path, strerror(errno));
    exit(2);
  }
  x->name = xrealloc(NULL, strlen(path) + 1);
  strcpy(x->name, path);
  in->n++;
}

static int by_name(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

/* A file, or every file of a folder (not those starting with `.`) in name
 * order, so the run does not depend on the order readdir gives. */
static void add_path(inputs *in, const char *path) {
  struct stat st;
  if (stat(path, &st) != 0) {
    fprintf(stderr, "mutate_frontend: %s: %s\n", path, strerror(errno));
    exit(2);
  }
  if (!S_ISDIR(st.st_mode)) {
    add_file(in, path);
    return;
  }
  DIR *dir = opendir(path);
  if (!dir) {
    fprintf(stderr, "mutate_frontend: cannot open %s: %s\n", path, strerror(errno));
    exit(2);
  }
  char **names = NULL;
  size_t n = 0;
  struct dirent *e;
  while ((e = readdir(dir))) {
    if (e->d_name[0] == '.') continue;
    size_t len = strlen(path) + strlen(e->d_name) + 2;
    char *full = xrealloc(NULL, len);
    snprintf(full, len, "%s/%s", path, e->d_name);
    struct stat fst;
    if (stat(full, &fst) != 0 || !S_ISREG(fst.st_mode)) {
      free(full);
      continue;
    }
    names = xrealloc(names, (n + 1) * sizeof *names);
    names[n++] = full;
  }
  closedir(dir);
  if (n) qsort(names, n, sizeof *names, by_name);
  for (size_t i = 0; i < n; i++) {
    add_file(in, names[i]);
    free(names[i]);
  }
  free(names);
}

static void free_inputs(inputs *in) {
  for (size_t i = 0; i < in->n; i++) {
    free(in->v[i].name);
    free(in->v[i].data.p);
  }
  free(in->v);
}

/* --- mutations --- */

static bool is_word(uint8_t c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}
static bool is_num_char(uint8_t c) {
  return (c >= '0' && c <= '9') || c == '.' || c == '-' || c == '+' || c == 'e' || c == 'E';
}

/* Offset just after a random statement boundary (`;`, `{` or `}`), or a
 * random offset if there is none. */
static size_t boundary(rng *r, const bytes *b) {
  size_t n = 0;
  for (size_t i = 0; i < b->len; i++) n += b->p[i] == ';' || b->p[i] == '{' || b->p[i] == '}';
  if (n == 0) return below(r, b->len + 1);
  size_t k = below(r, n);
  for (size_t i = 0; i < b->len; i++)
    if ((b->p[i] == ';' || b->p[i] == '{' || b->p[i] == '}') && k-- == 0) return i + 1;
  return b->len;
}

/* A random occurrence of byte c: its offset, or SIZE_MAX. */
static size_t find_nth(rng *r, const bytes *b, uint8_t c) {
  size_t n = 0;
  for (size_t i = 0; i < b->len; i++) n += b->p[i] == c;
  if (n == 0) return SIZE_MAX;
  size_t k = below(r, n);
  for (size_t i = 0; i < b->len; i++)
    if (b->p[i] == c && k-- == 0) return i;
  return SIZE_MAX;
}

static const char *pick(rng *r, const char *const *v, size_t n) { return v[below(r, n)]; }

/* A value for a key of keys.def type `type`: usually one that fits, sometimes
 * an odd one, sometimes one of another type. */
static void gen_value(rng *r, const char *type, bytes *out) {
  if (chance(r, 15)) {
    switch (below(r, 5)) {
    case 0: b_puts(out, pick(r, ints, COUNT(ints))); break;
    case 1: b_puts(out, pick(r, nums, COUNT(nums))); break;
    case 2: b_puts(out, pick(r, words, COUNT(words))); break;
    case 3: b_puts(out, "\"s\""); break;
    default: b_puts(out, "1, 2"); break;
    }
    return;
  }
  static const char *const small[] = {"1", "2", "4", "8", "64", "128", "256", "512", "1024"};
  static const char *const fine[] = {"0", "0.5", "1.0", "1e-3", "3e-4", "0.9", "1.25", "-1.25",
                                     "0.999", "2.5e-5", "1e-320", "0.1", "7"};
  if (strcmp(type, "INT") == 0) {
    b_puts(out, chance(r, 80) ? pick(r, small, COUNT(small)) : pick(r, ints, COUNT(ints)));
  } else if (strcmp(type, "NUM") == 0) {
    b_puts(out, chance(r, 70) ? pick(r, fine, COUNT(fine)) : pick(r, nums, COUNT(nums)));
  } else if (strcmp(type, "BOOL") == 0) {
    b_puts(out, pick(r, bool_words, COUNT(bool_words)));
  } else if (strcmp(type, "STRING") == 0) {
    b_puts(out, chance(r, 80) ? "\"ckpt\"" : "\"a \\\"b\\\" \\\\ \xc3\xa9\t\"");
  } else if (strcmp(type, "DATA") == 0) {
    b_puts(out, chance(r, 50) ? "synthetic" : "bytes(\"data/x.txt\")");
  } else if (strcmp(type, "RLIST") == 0) {
    b_puts(out, chance(r, 50) ? "auto" : "auto, 1, 2");
    for (size_t k = below(r, 4); k > 0; k--) b_printf(out, ", %zu", below(r, 20));
  } else if (strcmp(type, "DLIST") == 0) {
    static const char *const d[] = {"1", "2", "4", "8"};
    b_puts(out, pick(r, d, COUNT(d)));
    for (size_t k = below(r, 4); k > 0; k--) b_printf(out, ", %s", pick(r, d, COUNT(d)));
  } else if (strcmp(type, "A2ALIST") == 0) {
    b_puts(out, moec_a2a_names[below(r, MOEC_A2A__COUNT)]);
    if (chance(r, 50)) b_printf(out, ", %s", moec_a2a_names[below(r, MOEC_A2A__COUNT)]);
  } else if (strcmp(type, "ENUM_DTYPE") == 0) {
    b_puts(out, moec_dtype_names[below(r, MOEC_DTYPE__COUNT)]);
  } else if (strcmp(type, "ENUM_GATE") == 0) {
    b_puts(out, moec_gate_names[below(r, MOEC_GATE__COUNT)]);
  } else if (strcmp(type, "ENUM_ACT") == 0) {
    b_puts(out, moec_act_names[below(r, MOEC_ACT__COUNT)]);
  } else if (strcmp(type, "ENUM_SELECT") == 0) {
    b_puts(out, moec_select_names[below(r, MOEC_SELECT__COUNT)]);
  } else if (strcmp(type, "ENUM_OPTIM") == 0) {
    b_puts(out, moec_optim_names[below(r, MOEC_OPTIM__COUNT)]);
  } else if (strcmp(type, "ENUM_SCHED") == 0) {
    b_puts(out, moec_sched_names[below(r, MOEC_SCHED__COUNT)]);
  } else {
    b_puts(out, pick(r, words, COUNT(words)));
  }
}

static const char *key_type(const uint8_t *s, size_t n) {
  for (size_t k = 0; k < COUNT(key_types); k++)
    if (strlen(key_types[k].name) == n && memcmp(key_types[k].name, s, n) == 0)
      return key_types[k].type;
  return "";
}

/* A layer, mostly valid, possibly nested. */
static void gen_layer(rng *r, bytes *out, int depth) {
  static const char *const experts[] = {"1", "2", "4", "8", "16", "64", "4096", "4097", "0"};
  static const char *const hidden[] = {"64", "128", "256", "1024", "100", "1", "0"};
  switch (depth > 3 ? below(r, 4) : below(r, 6)) {
  case 0: b_puts(out, "rmsnorm;"); break;
  case 1: b_puts(out, "layernorm;"); break;
  case 2:
    b_printf(out, "moe m%zu { experts = %s; hidden = %s; top_k = %zu;%s }", below(r, 1000),
             pick(r, experts, COUNT(experts)), pick(r, hidden, COUNT(hidden)), 1 + below(r, 2),
             chance(r, 30) ? " gate = cosine; activation = swiglu;" : "");
    break;
  case 3:
    b_printf(out, "ffn f%zu { hidden = %s; activation = %s; }", below(r, 1000),
             pick(r, hidden, COUNT(hidden)), moec_act_names[below(r, MOEC_ACT__COUNT)]);
    break;
  case 4:
    b_puts(out, "residual { ");
    gen_layer(r, out, depth + 1);
    b_puts(out, " }");
    break;
  default: {
    static const char *const counts[] = {"1", "2", "3", "16", "4096", "4097", "0", "-1"};
    b_printf(out, "repeat %s { ", pick(r, counts, COUNT(counts)));
    gen_layer(r, out, depth + 1);
    b_puts(out, " }");
    break;
  }
  }
}

typedef enum {
  M_BITFLIP, M_BYTE, M_INSERT_RANDOM, M_DELETE, M_DUPLICATE, M_TRUNCATE, M_SPLICE, M_LINES,
  M_SYNTAX, M_ODD_BYTES, M_WORD, M_PHRASE, M_NUMBER, M_VALUE, M_DELETE_STMT, M_ITEM, M_LAYER,
  M_NESTING, M_LONG_NAME, M_MANY, M__COUNT
} mutation;

/* How often each mutation is picked: the token-aware ones most, so many
 * mutants still check clean and reach the printer. */
static const unsigned weights[M__COUNT] = {
    [M_BITFLIP] = 3, [M_BYTE] = 3, [M_INSERT_RANDOM] = 2, [M_DELETE] = 3, [M_DUPLICATE] = 3,
    [M_TRUNCATE] = 1, [M_SPLICE] = 2, [M_LINES] = 3, [M_SYNTAX] = 4, [M_ODD_BYTES] = 2,
    [M_WORD] = 4, [M_PHRASE] = 3, [M_NUMBER] = 8, [M_VALUE] = 16, [M_DELETE_STMT] = 5,
    [M_ITEM] = 6, [M_LAYER] = 6, [M_NESTING] = 2, [M_LONG_NAME] = 1, [M_MANY] = 1,
};

static mutation pick_mutation(rng *r) {
  unsigned total = 0;
  for (int m = 0; m < M__COUNT; m++) total += weights[m];
  unsigned x = (unsigned)below(r, total);
  for (int m = 0; m < M__COUNT; m++) {
    if (x < weights[m]) return (mutation)m;
    x -= weights[m];
  }
  return M_BITFLIP;
}

static void mutate_once(rng *r, bytes *b, const inputs *seeds, bytes *tmp) {
  size_t at = below(r, b->len + 1);
  tmp->len = 0;
  switch (pick_mutation(r)) {
  case M_BITFLIP:
    if (b->len) b->p[below(r, b->len)] ^= (uint8_t)(1u << below(r, 8));
    break;
  case M_BYTE:
    if (b->len) {
      static const uint8_t odd[] = {0, 0xff, 0x7f, 0x80, '\n', '"', '{', '}', ';', '=', '\\', ' '};
      b->p[below(r, b->len)] = chance(r, 50) ? odd[below(r, sizeof odd)] : (uint8_t)next(r);
    }
    break;
  case M_INSERT_RANDOM:
    for (size_t k = 1 + below(r, 8); k > 0; k--) {
      uint8_t c = chance(r, 70) ? (uint8_t)(0x20 + below(r, 0x5f)) : (uint8_t)next(r);
      b_insert(b, at, &c, 1);
    }
    break;
  case M_DELETE:
    if (b->len) {
      size_t n = 1 + below(r, chance(r, 90) ? 16 : b->len);
      if (at + n > b->len) n = b->len - at;
      b_erase(b, at, n);
    }
    break;
  case M_DUPLICATE:
    if (b->len) {
      size_t from = below(r, b->len);
      size_t n = 1 + below(r, chance(r, 80) ? 64 : b->len - from);
      if (from + n > b->len) n = b->len - from;
      b_set(tmp, b->p + from, n);
      b_insert(b, below(r, b->len + 1), tmp->p, tmp->len);
    }
    break;
  case M_TRUNCATE:
    b->len = at;
    break;
  case M_SPLICE: {
    const bytes *o = &seeds->v[below(r, seeds->n)].data;
    size_t from = below(r, o->len + 1);
    b->len = at;
    b_insert(b, at, o->p + from, o->len - from);
    break;
  }
  case M_LINES: {
    /* delete, duplicate or move one line */
    size_t s = at;
    while (s > 0 && b->p[s - 1] != '\n') s--;
    size_t e = at;
    while (e < b->len && b->p[e] != '\n') e++;
    if (e < b->len) e++;
    b_set(tmp, b->p + s, e - s);
    size_t op = below(r, 3);
    if (op != 1) b_erase(b, s, e - s);
    if (op != 0) {
      size_t to = below(r, b->len + 1);
      while (to > 0 && b->p[to - 1] != '\n') to--;
      b_insert(b, to, tmp->p, tmp->len);
    }
    break;
  }
  case M_SYNTAX: {
    const tok *t = &syntax[below(r, COUNT(syntax))];
    b_insert(b, at, t->s, t->n);
    break;
  }
  case M_ODD_BYTES: {
    const tok *t = &odd_bytes[below(r, COUNT(odd_bytes))];
    b_insert(b, at, t->s, t->n);
    break;
  }
  case M_WORD:
  case M_NUMBER: {
    /* replace the word or number at a random offset, or insert one there */
    bool num = false;
    const char *w = NULL;
    switch (below(r, 3)) {
    case 0: w = pick(r, words, COUNT(words)); break;
    case 1: w = pick(r, ints, COUNT(ints)); num = true; break;
    default: w = pick(r, nums, COUNT(nums)); num = true; break;
    }
    size_t s = at, e = at;
    bool (*in)(uint8_t) = num ? is_num_char : is_word;
    if (num && chance(r, 80)) {
      /* aim at a number already there */
      size_t d = below(r, b->len + 1);
      for (size_t k = 0; k < b->len; k++) {
        size_t i = (d + k) % b->len;
        if (b->p[i] >= '0' && b->p[i] <= '9') { s = e = i; break; }
      }
    }
    while (s > 0 && in(b->p[s - 1])) s--;
    while (e < b->len && in(b->p[e])) e++;
    b_erase(b, s, e - s);
    if (s == e && chance(r, 50)) {
      b_set(tmp, " ", 1);
      b_insert(tmp, 1, w, strlen(w));
      b_insert(tmp, tmp->len, " ", 1);
      b_insert(b, s, tmp->p, tmp->len);
    } else {
      b_insert(b, s, w, strlen(w));
    }
    break;
  }
  case M_PHRASE: {
    const tok *t = &phrases[below(r, COUNT(phrases))];
    b_insert(b, boundary(r, b), t->s, t->n);
    break;
  }
  case M_VALUE: {
    /* `key = ...;`: a new value for the key, by its type */
    size_t eq = find_nth(r, b, '=');
    if (eq == SIZE_MAX) break;
    size_t ke = eq;
    while (ke > 0 && (b->p[ke - 1] == ' ' || b->p[ke - 1] == '\t')) ke--;
    size_t ks = ke;
    while (ks > 0 && is_word(b->p[ks - 1])) ks--;
    size_t vs = eq + 1, ve = vs;
    while (ve < b->len && b->p[ve] != ';' && b->p[ve] != '\n' && b->p[ve] != '}') ve++;
    b_set(tmp, " ", 1);
    gen_value(r, key_type(b->p + ks, ke - ks), tmp);
    b_erase(b, vs, ve - vs);
    b_insert(b, vs, tmp->p, tmp->len);
    break;
  }
  case M_DELETE_STMT: {
    size_t semi = find_nth(r, b, ';');
    if (semi == SIZE_MAX) break;
    size_t s = semi;
    while (s > 0 && b->p[s - 1] != ';' && b->p[s - 1] != '{' && b->p[s - 1] != '}') s--;
    b_erase(b, s, semi + 1 - s);
    break;
  }
  case M_ITEM: {
    size_t k = below(r, COUNT(key_types));
    b_printf(tmp, " %s = ", key_types[k].name);
    gen_value(r, key_types[k].type, tmp);
    b_puts(tmp, ";");
    b_insert(b, boundary(r, b), tmp->p, tmp->len);
    break;
  }
  case M_LAYER:
    b_puts(tmp, " ");
    gen_layer(r, tmp, 0);
    b_insert(b, boundary(r, b), tmp->p, tmp->len);
    break;
  case M_NESTING: {
    static const tok open[] = {T("{"), T("residual { "), T("repeat 2 { "), T("f("), T("x = f("),
                               T("moe e { "), T("residual {\n")};
    static const size_t depths[] = {8, 64, 255, 256, 257, 300, 1000, 5000};
    size_t depth = chance(r, 50) ? 1 + below(r, 300) : depths[below(r, COUNT(depths))];
    size_t k = below(r, COUNT(open));
    bool paren = open[k].s[open[k].n - 1] == '(';
    for (size_t i = 0; i < depth; i++) b_insert(tmp, tmp->len, open[k].s, open[k].n);
    if (chance(r, 70)) {
      b_puts(tmp, paren ? "1" : k == 2 || k == 1 || k == 6 ? " rmsnorm; " : " dim = 2; ");
      for (size_t i = 0; i < depth; i++) b_puts(tmp, paren ? ")" : "}");
      if (paren) b_puts(tmp, k == 4 ? ";" : "");
    }
    b_insert(b, boundary(r, b), tmp->p, tmp->len);
    break;
  }
  case M_LONG_NAME: {
    size_t n = 1 + below(r, chance(r, 80) ? 100 : 20000);
    b_reserve(tmp, n);
    for (size_t i = 0; i < n; i++) tmp->p[i] = (uint8_t)('a' + below(r, 26));
    tmp->len = n;
    size_t s = at, e = at;
    while (s > 0 && is_word(b->p[s - 1])) s--;
    while (e < b->len && is_word(b->p[e])) e++;
    b_erase(b, s, e - s);
    b_insert(b, s, tmp->p, tmp->len);
    break;
  }
  case M_MANY: {
    /* the same statement many times: error limit, warnings, long lists */
    static const tok stmts[] = {T("x = 1;"), T("dim = 2;"), T("rmsnorm;"), T("1, "),
                                T("auto, "), T("2dh, "), T("@"), T("\n"), T("}"), T("{")};
    const tok *t = &stmts[below(r, COUNT(stmts))];
    for (size_t i = 5 + below(r, 3000); i > 0; i--) b_insert(tmp, tmp->len, t->s, t->n);
    b_insert(b, t->s[0] == '1' || t->s[0] == 'a' || t->s[0] == '2' ? at : boundary(r, b), tmp->p,
             tmp->len);
    break;
  }
  case M__COUNT: break;
  }
}

/* Mutant number i: depends only on (seed, i) and the seeds. Returns the seed
 * it was made from. */
static const bytes *make_mutant(uint64_t seed, long i, const inputs *seeds, bytes *out,
                                bytes *tmp, size_t max_len) {
  rng r = {seed * 0xD1B54A32D192ED03ull + (uint64_t)i};
  next(&r);
  const bytes *base = &seeds->v[below(&r, seeds->n)].data;
  b_set(out, base->p, base->len);
  size_t n = chance(&r, 70) ? 1 + below(&r, 3) : 1 + below(&r, 16);
  for (size_t k = 0; k < n; k++) {
    mutate_once(&r, out, seeds, tmp);
    if (out->len > max_len) out->len = max_len;
  }
  return base;
}

/* --- the run, and what is left behind when it dies --- */

static const uint8_t *g_cur;
static size_t g_cur_len;
static char g_label[256];
static unsigned g_timeout;

static void say(const char *s) {
  size_t n = strlen(s);
  while (n > 0) {
    ssize_t w = write(2, s, n);
    if (w <= 0) return;
    s += w;
    n -= (size_t)w;
  }
}

/* Saves the input being checked and says how to get it again; async-signal
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
  say("mutate_frontend: FAILED on ");
  say(g_label);
  say("\nmutate_frontend: the input is saved as " CRASH_FILE " (in the working directory)\n");
  g_cur = NULL;
}

static void on_signal(int sig) {
  if (sig == SIGALRM) say("mutate_frontend: HANG: the input ran past the --timeout\n");
  save_current();
  signal(SIGABRT, SIG_DFL);
  abort();
}

typedef struct tally {
  long inputs, clean, with_errors, errors, warnings;
  double slowest_ms;
  char slowest[256];
} tally;

/* The mutants alone, for --min-clean and --min-errors. */
typedef struct mutant_tally {
  long clean;      /* differ from their seed and checked clean */
  long errors;     /* differ from their seed and had errors */
  long unchanged;  /* came out byte for byte as their seed */
} mutant_tally;

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static moec_fuzz_result run_one(const uint8_t *p, size_t n, tally *t) {
  g_cur = p;
  g_cur_len = n;
  alarm(g_timeout);
  double t0 = now_ms();
  moec_fuzz_result res = moec_fuzz_check(p, n);
  double ms = now_ms() - t0;
  alarm(0);
  g_cur = NULL;
  t->inputs++;
  t->clean += res.clean;
  t->with_errors += res.nerrors > 0;
  t->errors += res.nerrors;
  t->warnings += res.nwarnings;
  if (ms > t->slowest_ms) {
    t->slowest_ms = ms;
    snprintf(t->slowest, sizeof t->slowest, "%s", g_label);
  }
  return res;
}

/* Sanitizer defaults for runs by hand (the environment still wins): abort
 * after a report, so the SIGABRT handler saves the input also where UBSan is
 * a runtime of its own with its own death callbacks (gcc's libubsan). */
const char *__asan_default_options(void);
const char *__ubsan_default_options(void);
const char *__asan_default_options(void) { return "abort_on_error=1:detect_leaks=1"; }
const char *__ubsan_default_options(void) {
  return "abort_on_error=1:halt_on_error=1:print_stacktrace=1";
}

static void print_dict(void) {
  printf("# moe.dict — tokens of the .moe language for libFuzzer (-dict=).\n"
         "# Generated by mutate_frontend --dict from keys.def and spec.def. Do not edit.\n");
  for (size_t i = 0; i < COUNT(words); i++) printf("\"%s\"\n", words[i]);
  const tok *pools[] = {syntax, odd_bytes, phrases};
  const size_t sizes[] = {COUNT(syntax), COUNT(odd_bytes), COUNT(phrases)};
  for (size_t p = 0; p < 3; p++)
    for (size_t i = 0; i < sizes[p]; i++) {
      putchar('"');
      for (size_t k = 0; k < pools[p][i].n; k++) {
        unsigned c = (unsigned char)pools[p][i].s[k];
        if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') putchar((int)c);
        else printf("\\x%02x", c);
      }
      puts("\"");
    }
  for (size_t i = 0; i < COUNT(ints); i++) printf("\"%s\"\n", ints[i]);
  for (size_t i = 0; i < COUNT(nums); i++) printf("\"%s\"\n", nums[i]);
}

static void usage(void) {
  fputs("usage: mutate_frontend [-n ITERS] [--seed S] [--max-len BYTES] [--timeout SECONDS]\n"
        "                       [--min-clean N] [--min-errors N]\n"
        "                       [--regressions DIR] [--replay I] [--dict] SEED...\n",
        stderr);
  exit(2);
}

static long num_arg(int argc, char **argv, int *i) {
  if (*i + 1 >= argc) usage();
  char *end;
  errno = 0;
  long v = strtol(argv[++*i], &end, 10);
  if (errno || *end || v < 0) {
    fprintf(stderr, "mutate_frontend: %s wants a number of 0 or more, not '%s'\n", argv[*i - 1],
            argv[*i]);
    exit(2);
  }
  return v;
}

int main(int argc, char **argv) {
  long iters = DEFAULT_ITERS, replay = -1, min_clean = 0, min_errors = 0;
  uint64_t seed = 1;
  size_t max_len = DEFAULT_MAX_LEN;
  g_timeout = DEFAULT_TIMEOUT_S;
  inputs regressions = {0}, seeds = {0};
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (strcmp(a, "-n") == 0 || strcmp(a, "--iters") == 0) iters = num_arg(argc, argv, &i);
    else if (strcmp(a, "--seed") == 0) seed = (uint64_t)num_arg(argc, argv, &i);
    else if (strcmp(a, "--max-len") == 0) max_len = (size_t)num_arg(argc, argv, &i);
    else if (strcmp(a, "--timeout") == 0) g_timeout = (unsigned)num_arg(argc, argv, &i);
    else if (strcmp(a, "--replay") == 0) replay = num_arg(argc, argv, &i);
    else if (strcmp(a, "--min-clean") == 0) min_clean = num_arg(argc, argv, &i);
    else if (strcmp(a, "--min-errors") == 0) min_errors = num_arg(argc, argv, &i);
    else if (strcmp(a, "--regressions") == 0) {
      if (i + 1 >= argc) usage();
      add_path(&regressions, argv[++i]);
    } else if (strcmp(a, "--dict") == 0) {
      print_dict();
      return 0;
    } else if (a[0] == '-' && a[1]) usage();
    else add_path(&seeds, a);
  }
  if (seeds.n == 0) {
    fputs("mutate_frontend: no seed files\n", stderr);
    usage();
  }

  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigaction(SIGALRM, &sa, NULL);
  sigaction(SIGABRT, &sa, NULL);
#ifdef MUT_ASAN
  __sanitizer_set_death_callback(save_current);
#endif

  bytes mutant = {0}, tmp = {0};
  b_reserve(&mutant, 1);
  b_reserve(&tmp, 1);
  tally t = {0};
  mutant_tally mt = {0};
  int rc = 0;
  double t0 = now_ms();
  if (replay >= 0) {
    make_mutant(seed, replay, &seeds, &mutant, &tmp, max_len);
    fwrite(mutant.p, 1, mutant.len, stdout);
    fflush(stdout);
    snprintf(g_label, sizeof g_label, "mutant %ld", replay);
    run_one(mutant.p, mutant.len, &t);
    fprintf(stderr, "mutate_frontend: mutant %ld: %s\n", replay,
            t.clean ? "checks clean and round-trips" : "has errors, as it should");
  } else {
    for (size_t i = 0; i < regressions.n; i++) {
      snprintf(g_label, sizeof g_label, "regression %s", regressions.v[i].name);
      run_one(regressions.v[i].data.p, regressions.v[i].data.len, &t);
    }
    for (size_t i = 0; i < seeds.n; i++) {
      snprintf(g_label, sizeof g_label, "seed %s", seeds.v[i].name);
      run_one(seeds.v[i].data.p, seeds.v[i].data.len, &t);
    }
    for (long i = 0; i < iters; i++) {
      const bytes *base = make_mutant(seed, i, &seeds, &mutant, &tmp, max_len);
      snprintf(g_label, sizeof g_label,
               "mutant %ld (rebuild it: mutate_frontend --seed %llu --replay %ld SEED...)", i,
               (unsigned long long)seed, i);
      moec_fuzz_result res = run_one(mutant.p, mutant.len, &t);
      if (mutant.len == base->len && memcmp(mutant.p, base->p, mutant.len) == 0)
        mt.unchanged++;
      else if (res.clean)
        mt.clean++;
      else if (res.nerrors > 0)
        mt.errors++;
    }
    printf("mutate_frontend: %zu regressions, %zu seeds and %ld mutants (seed %llu): "
           "%ld checked clean and round-tripped, %ld had errors; %ld errors and %ld warnings "
           "in total; slowest %.1f ms (%s); %.1f s\n",
           regressions.n, seeds.n, iters, (unsigned long long)seed, t.clean, t.with_errors,
           t.errors, t.warnings, t.slowest_ms, t.slowest, (now_ms() - t0) / 1e3);
    printf("mutate_frontend: of the mutants, %ld changed their seed and checked clean, %ld changed "
           "it and had errors, %ld came out as their seed\n",
           mt.clean, mt.errors, mt.unchanged);
    fflush(stdout); /* the summary before a failure's reason */
    if (mt.clean < min_clean) {
      fprintf(stderr,
              "mutate_frontend: FAILED: only %ld mutants checked clean (--min-clean %ld): the "
              "mutator no longer makes specs the front end accepts, or the front end rejects "
              "what it should accept\n",
              mt.clean, min_clean);
      rc = 1;
    }
    if (mt.errors < min_errors) {
      fprintf(stderr,
              "mutate_frontend: FAILED: only %ld mutants had errors (--min-errors %ld): the "
              "mutator no longer breaks its seeds, or the front end accepts what it should "
              "reject\n",
              mt.errors, min_errors);
      rc = 1;
    }
  }
  free(mutant.p);
  free(tmp.p);
  free_inputs(&regressions);
  free_inputs(&seeds);
  return rc;
}
