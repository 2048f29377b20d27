/* test_checkpoint.c — runtime/checkpoint: the xxHash64 that manifests use (libxxhash's
 * XXH64, seed 0) against reference vectors; safetensors
 * round trips of every dtype; each kind of hostile header failing with a clear
 * message; thousands of random mutations of a valid file (no crash, and whatever
 * parses is consistent); checkpoint directories: commit, overwrite, damaged files
 * caught by verify, and simulated crashes that must leave the previous checkpoint
 * readable.
 *
 *   test_checkpoint [SCRATCH_DIR]          the tests (SCRATCH_DIR: where to write;
 *                                          default a fresh directory under $TMPDIR)
 *   test_checkpoint --write-crosscheck DIR writes DIR/c_numpy.safetensors and
 *                                          DIR/c_all.safetensors for check_safetensors.py
 *   test_checkpoint --read-crosscheck FILE checks a file that check_safetensors.py wrote */
#define _XOPEN_SOURCE 700 /* nftw */
#include "checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <xxhash.h>

#include "../check.h"

/* A call that must succeed; on failure prints the status. */
#define OK(call)                                                                                   \
  do {                                                                                             \
    moert_status st_ = {0};                                                                        \
    moert_status *st = &st_;                                                                       \
    bool ok_ = (call);                                                                             \
    CHECK(ok_, "%s failed: %s [%s]", #call, st_.msg, st_.trace);                                   \
  } while (0)

/* A call that must fail with a message containing `want`. */
#define FAILS(want, call)                                                                          \
  do {                                                                                             \
    moert_status st_ = {0};                                                                        \
    moert_status *st = &st_;                                                                       \
    bool ok_ = (call);                                                                             \
    CHECK(!ok_ && st_.failed && strstr(st_.msg, (want)) != NULL,                                   \
          "%s: want a failure mentioning \"%s\", got %s: \"%s\"", #call, (want),                   \
          ok_ ? "success" : "failure", st_.msg);                                                   \
  } while (0)

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void) { /* xorshift64*: the mutations are the same every run */
  g_rng ^= g_rng >> 12;
  g_rng ^= g_rng << 25;
  g_rng ^= g_rng >> 27;
  return g_rng * 0x2545F4914F6CDD1Dull;
}

/* ------------------------------------------------------------------------ */
/* xxHash64                                                                 */
/* ------------------------------------------------------------------------ */

/* Manifests written so far hold XXH64 with seed 0; the library must give the same
 * values, in one shot and streamed (the writer hashes a file piece by piece). */
static void test_xxh64(void) {
  /* The sanity check of xxHash's own test program (xxhsum): a 101-byte buffer
   * from a multiplicative generator, seeds 0 and PRIME32_1. */
  enum { SANITY = 101 };
  unsigned char buf[SANITY];
  const uint32_t prime = 2654435761u;
  uint32_t gen = prime;
  for (int i = 0; i < SANITY; i++) {
    buf[i] = (unsigned char)(gen >> 24);
    gen *= gen;
  }
  static const struct {
    size_t len;
    uint64_t seed, want;
  } v[] = {
      {0, 0, 0xEF46DB3751D8E999ull},      {0, 2654435761u, 0xAC75FDA2929B17EFull},
      {1, 0, 0x4FCE394CC88952D8ull},      {1, 2654435761u, 0x739840CB819FA723ull},
      {14, 0, 0xCFFA8DB881BC3A3Dull},     {14, 2654435761u, 0x5B9611585EFCC9CBull},
      {SANITY, 0, 0x0EAB543384F878ADull}, {SANITY, 2654435761u, 0xCAA65939306F1E21ull},
  };
  for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
    uint64_t h = XXH64(v[i].len ? buf : NULL, v[i].len, v[i].seed);
    CHECK(h == v[i].want,
          "xxh64(sanity[0..%zu), seed %" PRIu64 ") = %016" PRIx64 ", want %016" PRIx64, v[i].len,
          v[i].seed, h, v[i].want);
  }
  static const struct {
    const char *s;
    uint64_t want;
  } t[] = {
      {"a", 0xD24EC4F1A98C6E5Bull},
      {"abc", 0x44BC2CF5AD770999ull},
      {"Nobody inspects the spammish repetition", 0xFBCEA83C8A378BF1ull},
  };
  for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
    uint64_t h = XXH64(t[i].s, strlen(t[i].s), 0);
    CHECK(h == t[i].want, "xxh64(\"%s\") = %016" PRIx64 ", want %016" PRIx64, t[i].s, h, t[i].want);
  }
  /* Streaming equals one-shot for every length up to 300 and random splits. */
  unsigned char big[300];
  for (int i = 0; i < 300; i++) big[i] = (unsigned char)rnd();
  int bad = 0;
  XXH64_state_t *s = XXH64_createState();
  CHECK(s != NULL, "XXH64_createState failed");
  for (size_t len = 0; s && len <= 300; len++) {
    for (int trial = 0; trial < 4; trial++) {
      XXH64_reset(s, 7);
      size_t at = 0;
      while (at < len) {
        size_t k = (size_t)(rnd() % 70);
        if (k > len - at) k = len - at;
        XXH64_update(s, big + at, k);
        at += k;
      }
      if (XXH64_digest(s) != XXH64(big, len, 7)) bad++;
    }
  }
  XXH64_freeState(s);
  CHECK(bad == 0, "streaming xxh64 differs from one-shot in %d cases", bad);
}

/* ------------------------------------------------------------------------ */
/* safetensors                                                              */
/* ------------------------------------------------------------------------ */

/* Tensors of every dtype with recognizable contents. */
typedef struct sample {
  float f32[6];
  uint16_t bf16[4];
  int32_t i32[3];
  int64_t i64[4];
  uint16_t f16[4];
  double f64[2];
  int8_t i8[3];
  int16_t i16[2];
  uint8_t u8[5];
  uint16_t u16[2];
  uint32_t u32[2];
  uint64_t u64[2];
  uint8_t boolean[3];
  float scalar;
  moert_st_tensor t[16];
  int n;
} sample;

static void sample_fill(sample *s, bool with_bf16) {
  memset(s, 0, sizeof *s);
  for (int i = 0; i < 6; i++) s->f32[i] = (float)i * 0.25f - 1.0f;
  /* bf16 is the top half of an fp32: 1.0, -2.5, 0.15625, 3.0e38-ish */
  static const uint16_t bf[4] = {0x3F80, 0xC020, 0x3E20, 0x7F61};
  memcpy(s->bf16, bf, sizeof bf);
  for (int i = 0; i < 3; i++) s->i32[i] = i * 1000 - 7;
  for (int i = 0; i < 4; i++) s->i64[i] = (int64_t)(i - 2) * ((int64_t)1 << 40) + i;
  static const uint16_t h[4] = {0x3C00, 0xC000, 0x3800, 0x7BFF}; /* 1, -2, 0.5, 65504 */
  memcpy(s->f16, h, sizeof h);
  s->f64[0] = 3.141592653589793;
  s->f64[1] = -1e300;
  s->i8[0] = -128, s->i8[1] = 0, s->i8[2] = 127;
  s->i16[0] = -32768, s->i16[1] = 12345;
  for (int i = 0; i < 5; i++) s->u8[i] = (uint8_t)(i * 50);
  s->u16[0] = 65535, s->u16[1] = 1;
  s->u32[0] = 4000000000u, s->u32[1] = 3;
  s->u64[0] = UINT64_MAX, s->u64[1] = 42;
  s->boolean[0] = 1, s->boolean[1] = 0, s->boolean[2] = 1;
  s->scalar = 2.5f;
#define T(nm, dt, field, nd, ...)                                                                  \
  s->t[s->n++] = (moert_st_tensor){.name = nm,                                                     \
                                   .dtype = dt,                                                    \
                                   .ndim = nd,                                                     \
                                   .shape = {__VA_ARGS__},                                         \
                                   .data = &s->field,                                              \
                                   .nbytes = sizeof s->field}
  T("layer.0.f32", MOERT_ST_F32, f32, 2, 2, 3);
  if (with_bf16) T("bf16", MOERT_ST_BF16, bf16, 1, 4);
  T("i32", MOERT_ST_I32, i32, 1, 3);
  T("i64", MOERT_ST_I64, i64, 2, 2, 2);
  T("f16", MOERT_ST_F16, f16, 3, 1, 2, 2);
  T("f64", MOERT_ST_F64, f64, 1, 2);
  T("i8", MOERT_ST_I8, i8, 1, 3);
  T("i16", MOERT_ST_I16, i16, 1, 2);
  T("u8", MOERT_ST_U8, u8, 1, 5);
  T("u16", MOERT_ST_U16, u16, 1, 2);
  T("u32", MOERT_ST_U32, u32, 1, 2);
  T("u64", MOERT_ST_U64, u64, 1, 2);
  T("bool", MOERT_ST_BOOL, boolean, 1, 3);
  T("scalar", MOERT_ST_F32, scalar, 0, 0);
#undef T
  s->t[s->n++] = (moert_st_tensor){.name = "empty",
                                   .dtype = MOERT_ST_F32,
                                   .ndim = 2,
                                   .shape = {0, 5},
                                   .data = NULL,
                                   .nbytes = 0};
}

static const moert_kv sample_meta[] = {{"moec", "test"}, {"quote\"back\\slash", "new\nline\x01"}};

/* Every tensor of s is in f with the same dtype, shape and bytes. */
static void check_same(const sample *s, const moert_st_file *f, const char *what) {
  CHECK(moert_st_count(f) == s->n, "%s: %d tensors, want %d", what, moert_st_count(f), s->n);
  for (int i = 0; i < s->n; i++) {
    const moert_st_tensor *want = &s->t[i], *got = moert_st_find(f, want->name);
    CHECK(got != NULL, "%s: tensor %s missing", what, want->name);
    if (!got) continue;
    bool same = got->dtype == want->dtype && got->ndim == want->ndim &&
                got->nbytes == want->nbytes &&
                (want->nbytes == 0 || memcmp(got->data, want->data, want->nbytes) == 0);
    for (int d = 0; d < want->ndim; d++) same = same && got->shape[d] == want->shape[d];
    CHECK(same, "%s: tensor %s differs after the round trip", what, want->name);
  }
  CHECK(moert_st_find(f, "nope") == NULL, "%s: found a tensor that is not there", what);
}

static void test_safetensors_roundtrip(void) {
  sample s;
  sample_fill(&s, true);
  void *buf = NULL;
  size_t len = 0;
  OK(moert_st_serialize(s.t, s.n, sample_meta, 2, &buf, &len, st));
  if (!buf) return;
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; i--) hlen = hlen << 8 | ((unsigned char *)buf)[i];
  CHECK(hlen % 8 == 0, "header length %" PRIu64 " is not a multiple of 8", hlen);
  CHECK(memcmp((char *)buf + 8, "{\"__metadata__\":{\"format\":\"pt\"", 30) == 0,
        "header does not start with the metadata");
  moert_st_file *f = NULL;
  OK(moert_st_create(buf, len, "roundtrip", &f, st));
  if (f) {
    check_same(&s, f, "serialize");
    const char *fmt = moert_st_meta_get(f, "format");
    CHECK(fmt && strcmp(fmt, "pt") == 0, "format metadata is %s", fmt ? fmt : "(none)");
    const char *v = moert_st_meta_get(f, "quote\"back\\slash");
    CHECK(v && strcmp(v, "new\nline\x01") == 0, "escaped metadata did not round-trip");
    CHECK(moert_st_meta_count(f) == 3, "%d metadata entries, want 3", moert_st_meta_count(f));
    /* Tensors come back in data order, which is the order written. */
    for (int i = 0; i < s.n; i++)
      CHECK(strcmp(moert_st_tensor_at(f, i)->name, s.t[i].name) == 0, "tensor %d out of order", i);
    moert_st_destroy(f);
  }
  free(buf);

  /* Names that need escaping, and a caller's "format". */
  float x[2] = {1, 2};
  moert_st_tensor odd[] = {
      {.name = "a\"b\\c/d", .dtype = MOERT_ST_F32, .ndim = 1, .shape = {1}, .data = x, .nbytes = 4},
      {.name = "\xc3\xbcnic\xc3\xb8"
               "de\t\x7f",
       .dtype = MOERT_ST_F32,
       .ndim = 1,
       .shape = {1},
       .data = x + 1,
       .nbytes = 4},
  };
  moert_kv fmt = {"format", "moec"};
  OK(moert_st_serialize(odd, 2, &fmt, 1, &buf, &len, st));
  f = NULL;
  OK(moert_st_create(buf, len, NULL, &f, st));
  if (f) {
    CHECK(moert_st_find(f, "a\"b\\c/d") && moert_st_find(f, "\xc3\xbcnic\xc3\xb8"
                                                            "de\t\x7f"),
          "escaped names lost");
    const char *v = moert_st_meta_get(f, "format");
    CHECK(v && strcmp(v, "moec") == 0 && moert_st_meta_count(f) == 1,
          "caller's format not used once");
    moert_st_destroy(f);
  }
  free(buf);

  /* An empty file (no tensors) is valid. */
  OK(moert_st_serialize(NULL, 0, NULL, 0, &buf, &len, st));
  f = NULL;
  OK(moert_st_create(buf, len, "empty", &f, st));
  if (f) CHECK(moert_st_count(f) == 0, "an empty file has tensors");
  moert_st_destroy(f);
  free(buf);

  /* The writer refuses invalid tensors. */
  moert_st_tensor bad = {
      .name = "w", .dtype = MOERT_ST_F32, .ndim = 1, .shape = {4}, .data = x, .nbytes = 8};
  FAILS("needs 16", moert_st_serialize(&bad, 1, NULL, 0, &buf, &len, st));
  moert_st_tensor dup[2] = {
      {.name = "w", .dtype = MOERT_ST_F32, .ndim = 1, .shape = {1}, .data = x, .nbytes = 4},
      {.name = "w", .dtype = MOERT_ST_F32, .ndim = 1, .shape = {1}, .data = x, .nbytes = 4}};
  FAILS("two tensors are called `w`", moert_st_serialize(dup, 2, NULL, 0, &buf, &len, st));
  dup[1].name = "__metadata__";
  FAILS("reserved", moert_st_serialize(dup, 2, NULL, 0, &buf, &len, st));
  dup[1].name = "bad\xff";
  FAILS("not UTF-8", moert_st_serialize(dup, 2, NULL, 0, &buf, &len, st));
  dup[1].name = "ok";
  dup[1].shape[0] = -1;
  FAILS("negative", moert_st_serialize(dup, 2, NULL, 0, &buf, &len, st));
  dup[1].shape[0] = 1;
  dup[1].dtype = (moert_st_dtype)99;
  FAILS("invalid dtype", moert_st_serialize(dup, 2, NULL, 0, &buf, &len, st));
  moert_kv twice[2] = {{"k", "1"}, {"k", "2"}};
  FAILS("given twice", moert_st_serialize(NULL, 0, twice, 2, &buf, &len, st));
}

/* A file from the header text header[0..h) and data_len zero bytes of tensor data. */
static unsigned char *mkfile_n(const char *header, size_t h, size_t data_len, size_t *len) {
  unsigned char *b = calloc(1, 8 + h + data_len + 1);
  for (int i = 0; i < 8; i++) b[i] = (unsigned char)((uint64_t)h >> (8 * i));
  memcpy(b + 8, header, h);
  *len = 8 + h + data_len;
  return b;
}

static unsigned char *mkfile(const char *header, size_t data_len, size_t *len) {
  return mkfile_n(header, strlen(header), data_len, len);
}

static bool parse_text(const char *header, size_t data_len, moert_status *st) {
  size_t len;
  unsigned char *b = mkfile(header, data_len, &len);
  moert_st_file *f = NULL;
  bool ok = moert_st_create(b, len, "ckpt/model.safetensors", &f, st);
  moert_st_destroy(f);
  free(b);
  return ok;
}

#define F32(n, b, e) "{\"dtype\":\"F32\",\"shape\":[" #n "],\"data_offsets\":[" #b "," #e "]}"

static void test_safetensors_hostile(void) {
  unsigned char raw[64] = {0};
  moert_st_file *f = NULL;
  /* The length field. */
  FAILS("too short", moert_st_create(raw, 5, "x", &f, st));
  raw[5] = 1; /* 2^40 */
  FAILS("absurd", moert_st_create(raw, 64, "x", &f, st));
  memset(raw, 0, 8);
  raw[0] = 100;
  FAILS("runs past the end", moert_st_create(raw, 64, "x", &f, st));
  raw[0] = 0;
  FAILS("the header is empty", moert_st_create(raw, 8, "x", &f, st));

  /* Not JSON. */
  FAILS("not valid JSON", parse_text("{\"a\":", 0, st));
  FAILS("expected `:` after an object key", parse_text("{\"a\" 1}", 0, st));
  FAILS("expected `,` or `}`", parse_text("{\"__metadata__\":{} \"b\":1}", 0, st));
  FAILS("after the top-level object", parse_text("{} x", 0, st));
  FAILS("after the top-level object", parse_text("{}{}", 0, st));
  FAILS("not closed", parse_text("{\"abc", 0, st));
  FAILS("raw control byte", parse_text("{\"a\x01\":1}", 0, st));
  FAILS("invalid UTF-8", parse_text("{\"a\xc3\x28\":1}", 0, st));
  FAILS("invalid UTF-8", parse_text("{\"\xed\xa0\x80\":1}", 0, st)); /* an encoded surrogate */
  FAILS("lone low surrogate", parse_text("{\"\\udc00\":1}", 0, st));
  FAILS("not followed by a low one", parse_text("{\"\\ud800x\":1}", 0, st));
  FAILS("four hex digits", parse_text("{\"\\u12\":1}", 0, st));
  FAILS("unknown escape", parse_text("{\"\\q\":1}", 0, st));
  FAILS("a string key", parse_text("{\"a\":" F32(0, 0, 0) ",}", 0, st));
  FAILS("a string key", parse_text("{a:1}", 0, st));
  FAILS("must be a JSON object", parse_text("[1,2]", 0, st));
  FAILS("must be a JSON object", parse_text("\"str\"", 0, st));
  FAILS("at byte 5", parse_text("{\"a\" 1}", 0, st));
  { /* a raw NUL byte after a number (jansson on its own would skip it) */
    static const char h[] = "{\"x\":{\"dtype\":\"F32\",\"shape\":[1\0],\"data_offsets\":[0,4]}}";
    size_t len;
    unsigned char *b = mkfile_n(h, sizeof h - 1, 4, &len);
    FAILS("a NUL byte at byte 30", moert_st_create(b, len, "x", &f, st));
    free(b);
  }

  /* Wrong types and fields. */
  FAILS("dtype must be a string",
        parse_text("{\"x\":{\"dtype\":4,\"shape\":[],\"data_offsets\":[0,4]}}", 4, st));
  FAILS("shape must be an array",
        parse_text("{\"x\":{\"dtype\":\"F32\",\"shape\":\"4\",\"data_offsets\":[0,4]}}", 4, st));
  FAILS("non-negative integers", parse_text("{\"x\":" F32(-1, 0, 4) "}", 4, st));
  FAILS("non-negative integers", parse_text("{\"x\":" F32(2.5, 0, 10) "}", 10, st));
  FAILS("non-negative integers", parse_text("{\"x\":" F32(1e1, 0, 40) "}", 40, st));
  FAILS("non-negative integers", parse_text("{\"x\":" F32("4", 0, 16) "}", 16, st));
  FAILS("below 2^63", parse_text("{\"x\":" F32(4, 0, 99999999999999999999) "}", 16, st));
  FAILS("data_offsets has more than 2 entries",
        parse_text("{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", 8, st));
  FAILS("data_offsets must be [begin, end], found 1 entry",
        parse_text("{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4, st));
  FAILS("must be described by an object", parse_text("{\"x\":[1,2]}", 0, st));
  FAILS("__metadata__ must be an object", parse_text("{\"__metadata__\":[]}", 0, st));
  FAILS("value for `k` must be a string", parse_text("{\"__metadata__\":{\"k\":1}}", 0, st));
  FAILS("value for `k` must be a string",
        parse_text("{\"__metadata__\":{\"k\":{\"deep\":\"x\"}}}", 0, st));
  FAILS("unknown dtype `F8_E4M3`",
        parse_text("{\"x\":{\"dtype\":\"F8_E4M3\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, st));
  FAILS("has no `shape`", parse_text("{\"x\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, st));
  FAILS("has no `dtype`", parse_text("{\"x\":{}}", 0, st));
  FAILS("has `dtype` twice",
        parse_text(
            "{\"x\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
            st));
  FAILS("unknown field `extra`",
        parse_text("{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"extra\":1}}",
                   4, st));
  FAILS(
      "more than 8 entries",
      parse_text("{\"x\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}",
                 4, st));
  FAILS("empty name", parse_text("{\"\":" F32(1, 0, 4) "}", 4, st));
  FAILS("cannot hold NUL", parse_text("{\"a\\u0000b\":" F32(1, 0, 4) "}", 4, st));
  FAILS(
      "too large",
      parse_text(
          "{\"x\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],\"data_offsets\":[0,0]}}",
          0, st));

  /* Offsets. */
  FAILS("tensor `x` has data_offsets [0, 12] but its shape [4] of F32 needs 16 bytes",
        parse_text("{\"x\":" F32(4, 0, 12) "}", 12, st));
  FAILS("the end is before the beginning", parse_text("{\"x\":" F32(0, 8, 4) "}", 8, st));
  FAILS("holds only 8 bytes", parse_text("{\"x\":" F32(4, 0, 16) "}", 8, st));
  FAILS("overlap", parse_text("{\"a\":" F32(4, 0, 16) ",\"b\":" F32(4, 8, 24) "}", 24, st));
  FAILS("between tensors `a` and `b`, belong to no tensor",
        parse_text("{\"a\":" F32(4, 0, 16) ",\"b\":" F32(4, 20, 36) "}", 36, st));
  FAILS("bytes [0, 4) of the tensor data belong to no tensor",
        parse_text("{\"a\":" F32(4, 4, 20) "}", 20, st));
  FAILS("the last 4 bytes", parse_text("{\"a\":" F32(4, 0, 16) "}", 20, st));
  FAILS("the last 4 bytes", parse_text("{}", 4, st));
  FAILS("tensor `a` appears twice",
        parse_text("{\"a\":" F32(4, 0, 16) ",\"a\":" F32(4, 16, 32) "}", 32, st));
  FAILS("tensor `a` appears twice",
        parse_text("{\"a\":" F32(4, 0, 16) ",\"\\u0061\":" F32(4, 16, 32) "}", 32, st));
  FAILS("__metadata__ appears twice",
        parse_text("{\"__metadata__\":{},\"__metadata__\":{}}", 0, st));
  FAILS("has the key `k` twice", parse_text("{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}", 0, st));

  /* Valid but unusual: entries not in data order (as Python writes them), zero-size
   * tensors sharing an offset, white space everywhere, null metadata. */
  moert_status st0 = {0};
  size_t len;
  unsigned char *b =
      mkfile(" {\n\t\"b\" : " F32(2, 16, 24) ", \"a\":" F32(4, 0, 16) ", \"z\":" F32(
                 0, 16, 16) ", \"y\":" F32(0, 16, 16) ", \"__metadata__\": null }   ",
             24, &len);
  for (int i = 0; i < 24; i++) b[len - 24 + (size_t)i] = (unsigned char)i;
  bool ok = moert_st_create(b, len, "unusual", &f, &st0);
  CHECK(ok, "a valid file with entries out of data order failed: %s", st0.msg);
  if (ok) {
    const moert_st_tensor *a = moert_st_find(f, "a"), *bt = moert_st_find(f, "b");
    CHECK(a && bt && ((const unsigned char *)a->data)[0] == 0 &&
              ((const unsigned char *)bt->data)[0] == 16,
          "data pointers wrong for entries out of order");
    CHECK(strcmp(moert_st_tensor_at(f, 0)->name, "a") == 0, "tensors not in data order");
    moert_st_destroy(f);
  }
  free(b);
}

/* Random mutations of a valid file: the reader fails cleanly or returns tensors
 * that are consistent; under ASan/UBSan, no report. */
static void test_safetensors_mutations(void) {
  sample s;
  sample_fill(&s, true);
  void *orig;
  size_t olen;
  OK(moert_st_serialize(s.t, s.n, sample_meta, 2, &orig, &olen, st));
  if (!orig) return;
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; i--) hlen = hlen << 8 | ((unsigned char *)orig)[i];
  static const char alphabet[] = "{}[]\",:0123456789-+.eE \\u\"aFI3BOL_tfn\x00\xff\xc3";
  unsigned char *buf = malloc(olen + 64);
  int parsed = 0, failed = 0, inconsistent = 0, no_message = 0;
  const int rounds = 6000;
  for (int r = 0; r < rounds; r++) {
    memcpy(buf, orig, olen);
    size_t len = olen;
    int nmut = 1 + (int)(rnd() % 3);
    for (int m = 0; m < nmut; m++) {
      size_t hdr_end = 8 + (size_t)hlen < len ? 8 + (size_t)hlen : len;
      switch (rnd() % 7) {
      case 0:
        if (len) buf[rnd() % len] ^= (unsigned char)(1u << (rnd() % 8));
        break; /* bit anywhere */
      case 1:  /* JSON-ish byte in the header */
        if (hdr_end > 8)
          buf[8 + rnd() % (hdr_end - 8)] = (unsigned char)alphabet[rnd() % (sizeof alphabet - 1)];
        break;
      case 2: len = (size_t)(rnd() % (len + 1)); break; /* truncate */
      case 3: {                                         /* delete a header byte */
        if (hdr_end <= 9) break;
        size_t at = 8 + rnd() % (hdr_end - 8);
        memmove(buf + at, buf + at + 1, len - at - 1);
        len--;
        break;
      }
      case 4: { /* insert a byte */
        if (hdr_end <= 8 || len >= olen + 60) break;
        size_t at = 8 + rnd() % (hdr_end - 8);
        memmove(buf + at + 1, buf + at, len - at);
        buf[at] = (unsigned char)alphabet[rnd() % (sizeof alphabet - 1)];
        len++;
        break;
      }
      case 5: buf[rnd() % 8] = (unsigned char)rnd(); break; /* the length field */
      case 6: {                                             /* a digit in the header */
        if (hdr_end <= 8) break;
        size_t at = 8 + rnd() % (hdr_end - 8);
        if (buf[at] >= '0' && buf[at] <= '9') buf[at] = (unsigned char)('0' + rnd() % 10);
        break;
      }
      }
    }
    moert_st_file *f = NULL;
    moert_status st = {0};
    if (moert_st_create(buf, len, "mutant", &f, &st)) {
      parsed++;
      uint64_t covered = 0;
      for (int i = 0; i < moert_st_count(f); i++) {
        const moert_st_tensor *t = moert_st_tensor_at(f, i);
        uint64_t need = moert_st_dtype_size(t->dtype);
        for (int d = 0; d < t->ndim; d++) need *= (uint64_t)t->shape[d];
        if (need != t->nbytes || !t->name[0] || moert_st_find(f, t->name) != t) inconsistent++;
        /* Touch every byte so ASan sees any read outside the copy. */
        const unsigned char *p = t->data;
        unsigned sum = 0;
        for (size_t k = 0; k < t->nbytes; k++) sum += p[k];
        (void)sum;
        covered += t->nbytes;
      }
      if (covered > len) inconsistent++;
      moert_st_destroy(f);
    } else {
      failed++;
      if (!st.failed || !st.msg[0] || strncmp(st.msg, "mutant", 6) != 0) no_message++;
    }
  }
  CHECK(inconsistent == 0, "mutations: %d parsed files were inconsistent", inconsistent);
  CHECK(no_message == 0, "mutations: %d failures without a message naming the file", no_message);
  CHECK(failed > rounds / 2, "mutations: only %d of %d failed; the mutator is too gentle", failed,
        rounds);
  printf("safetensors mutations: %d parsed, %d rejected\n", parsed, failed);
  free(buf);
  free(orig);
}

/* ------------------------------------------------------------------------ */
/* Checkpoint directories                                                   */
/* ------------------------------------------------------------------------ */

static char g_root[4096];

static char *path(const char *rel) { /* a path under the scratch root; static storage, 4 slots */
  static char slots[4][4600];
  static int next;
  char *p = slots[next++ % 4];
  snprintf(p, sizeof slots[0], "%s/%s", g_root, rel);
  return p;
}

static int rm_entry(const char *fpath, const struct stat *sb, int flag, struct FTW *ftw) {
  (void)sb, (void)flag, (void)ftw;
  return remove(fpath);
}

static void rm_rf(const char *p) { nftw(p, rm_entry, 16, FTW_DEPTH | FTW_PHYS); }

static bool file_exists(const char *p) {
  struct stat sb;
  return lstat(p, &sb) == 0;
}

/* Count of entries in the root whose name starts with prefix. */
static int count_prefix(const char *prefix) {
  DIR *d = opendir(g_root);
  int n = 0;
  struct dirent *e;
  while (d && (e = readdir(d)) != NULL)
    if (strncmp(e->d_name, prefix, strlen(prefix)) == 0) n++;
  if (d) closedir(d);
  return n;
}

static bool write_text(const char *p, const char *text) {
  FILE *f = fopen(p, "wb");
  if (!f) return false;
  fputs(text, f);
  return fclose(f) == 0;
}

/* A checkpoint at rel with a model file, an optimizer file and step `step`; opt.bin's
 * bytes are the step repeated; extra adds a file only this version has. */
static bool write_ckpt(const char *rel, int64_t step, bool extra, unsigned flags,
                       moert_status *st) {
  sample s;
  sample_fill(&s, true);
  int64_t opt[64];
  for (int i = 0; i < 64; i++) opt[i] = step;
  char stepbuf[32];
  snprintf(stepbuf, sizeof stepbuf, "%" PRId64, step);
  moert_kv meta[2] = {{"spec", "tiny.moe"}, {"step_text", stepbuf}};
  moert_ckpt_writer *w = NULL;
  bool ok = moert_ckpt_writer_create(path(rel), flags, &w, st) &&
            moert_ckpt_add_safetensors(w, "model.safetensors", s.t, s.n, sample_meta, 2, st) &&
            moert_ckpt_add_file(w, "opt.bin", opt, sizeof opt, st) &&
            (!extra || moert_ckpt_add_file(w, "extra.bin", "x", 1, st)) &&
            moert_ckpt_commit(w, step, meta, 2, st);
  moert_ckpt_writer_destroy(w);
  return ok;
}

/* Reads the checkpoint at rel and checks it is version `step`, whole. */
static bool read_ckpt(const char *rel, int64_t step, moert_status *st) {
  moert_ckpt_reader *r = NULL;
  if (!moert_ckpt_reader_create(path(rel), &r, st)) return false;
  bool ok = true;
  if (moert_ckpt_step(r) != step)
    ok = MOERT_FAIL(st, "step %" PRId64 ", want %" PRId64, moert_ckpt_step(r), step);
  const char *spec = moert_ckpt_meta_get(r, "spec");
  if (ok && (!spec || strcmp(spec, "tiny.moe") != 0)) ok = MOERT_FAIL(st, "metadata lost");
  void *data = NULL;
  size_t len = 0;
  if (ok && moert_ckpt_read_file(r, "opt.bin", &data, &len, st)) {
    const int64_t *v = data;
    if (len != 64 * sizeof(int64_t)) ok = MOERT_FAIL(st, "opt.bin has %zu bytes", len);
    for (int i = 0; ok && i < 64; i++)
      if (v[i] != step)
        ok = MOERT_FAIL(st, "opt.bin holds a value of step %" PRId64 " in step %" PRId64, v[i],
                        step);
    free(data);
  } else {
    ok = false;
  }
  moert_st_file *f = NULL;
  if (ok && moert_ckpt_read_safetensors(r, "model.safetensors", &f, st)) {
    sample s;
    sample_fill(&s, true);
    int before = g_fail;
    check_same(&s, f, "checkpoint");
    if (g_fail != before) ok = MOERT_FAIL(st, "model.safetensors differs");
    moert_st_destroy(f);
  } else {
    ok = false;
  }
  moert_ckpt_reader_destroy(r);
  return ok;
}

static void flip_byte(const char *p, long at) {
  FILE *f = fopen(p, "r+b");
  if (!f) return;
  fseek(f, at, SEEK_SET);
  int c = fgetc(f);
  fseek(f, at, SEEK_SET);
  fputc(c ^ 0x20, f);
  fclose(f);
}

static void test_atomic_file(void) {
  OK(moert_ckpt_write_file(g_root, "plain.bin", "hello", 5, st));
  OK(moert_ckpt_write_file(g_root, "plain.bin", "bye", 3, st));
  struct stat sb;
  CHECK(stat(path("plain.bin"), &sb) == 0 && sb.st_size == 3,
        "write_file did not replace the file");
  CHECK(!file_exists(path("plain.bin.tmp")), "write_file left its .tmp");
  FAILS("file name", moert_ckpt_write_file(g_root, "../escape", "x", 1, st));
  FAILS("file name", moert_ckpt_write_file(g_root, ".hidden", "x", 1, st));
  FAILS("cannot create", moert_ckpt_write_file(path("no/such/dir"), "x", "x", 1, st));
}

static void test_checkpoint_dirs(void) {
  /* Write, verify, read. */
  OK(write_ckpt("ck", 100, true, 0, st));
  OK(moert_ckpt_verify(path("ck"), st));
  OK(moert_ckpt_verify(path("ck/"), st)); /* trailing slash */
  OK(read_ckpt("ck", 100, st));
  CHECK(count_prefix("ck.") == 0, "a commit left ck.tmp-* or ck.old behind");
  CHECK(file_exists(path("ck/extra.bin")), "extra.bin missing");

  /* Overwrite in place: the new version, and nothing of the old one. */
  OK(write_ckpt("ck", 200, false, 0, st));
  OK(read_ckpt("ck", 200, st));
  CHECK(!file_exists(path("ck/extra.bin")),
        "a file of the previous checkpoint survived the overwrite");
  CHECK(count_prefix("ck.") == 0, "the overwrite left ck.tmp-* or ck.old behind");

  /* A file truncated, a byte flipped, a file gone: verify and the reader say which. */
  OK(write_ckpt("dmg", 1, false, 0, st));
  CHECK(truncate(path("dmg/opt.bin"), 511) == 0, "cannot truncate: %s", strerror(errno));
  FAILS("`opt.bin` is 511 bytes but MANIFEST.json lists 512", moert_ckpt_verify(path("dmg"), st));
  moert_ckpt_reader *r = NULL;
  FAILS("opt.bin", moert_ckpt_reader_create(path("dmg"), &r, st));
  OK(write_ckpt("dmg", 2, false, MOERT_CKPT_OVERWRITE_INVALID, st));
  flip_byte(path("dmg/model.safetensors"), 300);
  FAILS("`model.safetensors` has xxh64", moert_ckpt_verify(path("dmg"), st));
  OK(write_ckpt("dmg", 3, false, MOERT_CKPT_OVERWRITE_INVALID, st));
  /* Damage after the reader verified: read_file checks the bytes it returns. */
  r = NULL;
  OK(moert_ckpt_reader_create(path("dmg"), &r, st));
  if (r) {
    flip_byte(path("dmg/opt.bin"), 0);
    void *data = NULL;
    size_t len;
    FAILS("`opt.bin` has xxh64", moert_ckpt_read_file(r, "opt.bin", &data, &len, st));
    FAILS("has no file `nope`", moert_ckpt_read_file(r, "nope", &data, &len, st));
    moert_ckpt_reader_destroy(r);
  }
  unlink(path("dmg/opt.bin"));
  FAILS("`opt.bin` is listed in MANIFEST.json but missing", moert_ckpt_verify(path("dmg"), st));

  /* A damaged checkpoint is not overwritten unless the caller asks. */
  FAILS("refusing to overwrite", write_ckpt("dmg", 4, false, 0, st));
  OK(write_ckpt("dmg", 4, false, MOERT_CKPT_OVERWRITE_INVALID, st));
  OK(read_ckpt("dmg", 4, st));

  /* Not checkpoints. */
  FAILS("does not exist", moert_ckpt_verify(path("nothing"), st));
  mkdir(path("nomanifest"), 0755);
  write_text(path("nomanifest/model.safetensors"), "junk");
  FAILS("has no MANIFEST.json", moert_ckpt_verify(path("nomanifest"), st));
  FAILS("refusing to overwrite", write_ckpt("nomanifest", 1, false, 0, st));
  write_text(path("afile"), "x");
  FAILS("not a directory", moert_ckpt_verify(path("afile"), st));
  FAILS("not a directory", write_ckpt("afile", 1, false, MOERT_CKPT_OVERWRITE_INVALID, st));
  FAILS("parent directory", write_ckpt("no/parent", 1, false, 0, st));
  FAILS("cannot be a checkpoint directory", moert_ckpt_verify("/", st));
  FAILS("no checkpoint directory", moert_ckpt_verify("", st));

  /* Writer misuse. */
  moert_ckpt_writer *w = NULL;
  OK(moert_ckpt_writer_create(path("misuse"), 0, &w, st));
  if (w) {
    FAILS("not a valid file name", moert_ckpt_add_file(w, "MANIFEST.json", "x", 1, st));
    FAILS("not a valid file name", moert_ckpt_add_file(w, "a/b", "x", 1, st));
    FAILS("not a valid file name", moert_ckpt_add_file(w, "x.tmp", "x", 1, st));
    OK(moert_ckpt_add_file(w, "a.bin", "x", 1, st));
    FAILS("added twice", moert_ckpt_add_file(w, "a.bin", "x", 1, st));
    moert_kv twice[2] = {{"k", "1"}, {"k", "2"}};
    FAILS("given twice", moert_ckpt_commit(w, 1, twice, 2, st));
    moert_ckpt_writer_destroy(w); /* never committed: leaves nothing */
  }
  CHECK(!file_exists(path("misuse")) && count_prefix("misuse.") == 0,
        "an abandoned writer left files");

  /* The committed directory has the usual mode (the umask's), not mkdtemp's 0700. */
  mode_t mask = umask(022);
  OK(write_ckpt("modes", 1, false, 0, st));
  struct stat sb;
  CHECK(stat(path("modes"), &sb) == 0 && (sb.st_mode & 0777) == 0755, "checkpoint mode %o, want 755",
        (unsigned)(sb.st_mode & 0777));
  CHECK(stat(path("modes/opt.bin"), &sb) == 0 && (sb.st_mode & 0777) == 0644,
        "checkpoint file mode %o, want 644", (unsigned)(sb.st_mode & 0777));
  umask(mask);

  /* A checkpoint reached through a symbolic link: the link is replaced by the new
   * directory, and what it pointed to is left alone. */
  OK(write_ckpt("real", 1, false, 0, st));
  CHECK(symlink("real", path("link")) == 0, "symlink: %s", strerror(errno));
  OK(read_ckpt("link", 1, st));
  OK(write_ckpt("link", 2, false, 0, st));
  OK(read_ckpt("link", 2, st));
  OK(read_ckpt("real", 1, st));
  CHECK(count_prefix("link.") == 0, "replacing a linked checkpoint left link.old or link.tmp-*");

  /* An empty checkpoint and a negative step are fine. */
  w = NULL;
  OK(moert_ckpt_writer_create(path("emptyck"), 0, &w, st));
  if (w) OK(moert_ckpt_commit(w, -5, NULL, 0, st));
  moert_ckpt_writer_destroy(w);
  r = NULL;
  OK(moert_ckpt_reader_create(path("emptyck"), &r, st));
  if (r)
    CHECK(moert_ckpt_step(r) == -5 && moert_ckpt_file_count(r) == 0,
          "empty checkpoint read back wrong");
  moert_ckpt_reader_destroy(r);
}

/* The manifest's own hash (version 2): an edited step, metadata value or file
 * entry is refused, naming the manifest; the text as written loads. */
static void test_manifest_self_hash(void) {
  OK(write_ckpt("sh", 5, false, 0, st));
  char good[4096];
  FILE *fp = fopen(path("sh/MANIFEST.json"), "rb");
  size_t n = fp ? fread(good, 1, sizeof good - 1, fp) : 0;
  if (fp) fclose(fp);
  good[n] = '\0';
  CHECK(strstr(good, "\"version\": 2,") != NULL, "the manifest is not version 2: %s", good);
  OK(read_ckpt("sh", 5, st));
  static const struct {
    const char *from, *to, *want;
  } edits[] = {
      {"\"step\": 5,", "\"step\": 7,", "MANIFEST.json is damaged: its text has xxh64"},
      {"\"step\": 5,", "\"step\": 5 ,", "MANIFEST.json is damaged"},
      {"\"tiny.moe\"", "\"tinx.moe\"", "(its step, metadata or file list changed after it was written)"},
      {"\"opt.bin\", \"size\": 512", "\"opt.bin\", \"size\": 512 ", "restore the checkpoint from a copy"},
      {"\"manifest_xxh64\"", "\"manifest_xxh64\" ", "is not the last line, where moec writes it"},
      {"\"manifest_xxh64\"", "\"manifest_xxh65\"", "no `manifest_xxh64`"},
  };
  for (size_t i = 0; i < sizeof edits / sizeof edits[0]; i++) {
    char text[4200];
    const char *at = strstr(good, edits[i].from);
    CHECK(at != NULL, "`%s` is not in the manifest", edits[i].from);
    if (!at) continue;
    snprintf(text, sizeof text, "%.*s%s%s", (int)(at - good), good, edits[i].to, at + strlen(edits[i].from));
    write_text(path("sh/MANIFEST.json"), text);
    FAILS(edits[i].want, moert_ckpt_verify(path("sh"), st));
    FAILS("sh/MANIFEST.json", read_ckpt("sh", 5, st));
  }
  write_text(path("sh/MANIFEST.json"), good);
  OK(read_ckpt("sh", 5, st));
}

/* Hand-written manifests that are wrong in one way each. */
static void test_manifest_hostile(void) {
  OK(write_ckpt("mf", 1, false, 0, st));
  char good[4096];
  FILE *fp = fopen(path("mf/MANIFEST.json"), "rb");
  size_t n = fp ? fread(good, 1, sizeof good - 1, fp) : 0;
  if (fp) fclose(fp);
  good[n] = '\0';
  OK(moert_ckpt_verify(path("mf"), st));
  uint64_t opt_hash = 0;
  {
    int64_t opt[64];
    for (int i = 0; i < 64; i++) opt[i] = 1;
    opt_hash = XXH64(opt, sizeof opt, 0);
  }
  char text[1024];
  static const struct {
    const char *files; /* the "files" value, %s gets opt.bin's hash */
    const char *head;  /* what comes before "files" */
    const char *want;
  } cases[] = {
      {"[{\"name\":\"../../etc/passwd\",\"size\":1,\"xxh64\":\"%s\"}]", NULL,
       "not a valid checkpoint file name"},
      {"[{\"name\":\"MANIFEST.json\",\"size\":1,\"xxh64\":\"%s\"}]", NULL,
       "not a valid checkpoint file name"},
      {"[{\"name\":\"opt.bin\",\"size\":512,\"xxh64\":\"xyz%s\"}]", NULL, "16 hex digits"},
      {"[{\"name\":\"opt.bin\",\"size\":-512,\"xxh64\":\"%s\"}]", NULL, "non-negative integer"},
      {"[{\"name\":\"opt.bin\",\"size\":512}]%.0s", NULL, "has no `xxh64`"},
      {"[{\"name\":\"opt.bin\",\"size\":512,\"xxh64\":\"%s\"},{\"name\":\"opt.bin\",\"size\":512,"
       "\"xxh64\":\"0000000000000000\"}]",
       NULL, "listed twice"},
      {"[{\"name\":\"opt.bin\",\"size\":512,\"size\":512,\"xxh64\":\"%s\"}]", NULL, "twice"},
      {"{}%.0s", NULL, "`files` must be an array"},
      {"[%.0s]", "{\"format\":\"moec-checkpoint\",\"version\":3,\"step\":1,", "version 3 (this moec reads versions 1 to 2)"},
      {"[%.0s]", "{\"format\":\"other\",\"version\":1,\"step\":1,",
       "not a moec checkpoint manifest"},
      {"[%.0s]", "{\"format\":\"moec-checkpoint\",\"version\":1,", "no `step`"},
      {"[%.0s]", "{\"format\":\"moec-checkpoint\",\"version\":1,\"step\":1.5,",
       "must be an integer"},
      {"[%.0s]", "{\"format\":\"moec-checkpoint\",\"version\":1,\"step\":1,\"step\":2,",
       "appears twice"},
      {"[%.0s]", "{\"format\":\"moec-checkpoint\",\"version\":1,\"step\":1,\"metadata\":{\"a\":1},",
       "must be a string"},
      {"[%.0s] junk", "{\"format\":\"moec-checkpoint\",\"version\":1,\"step\":1,",
       "not valid JSON"},
      {"[%.0s", "{\"format\":\"moec-checkpoint\",\"version\":1,\"step\":1,", "not valid JSON"},
  };
  char hex[17];
  snprintf(hex, sizeof hex, "%016" PRIx64, opt_hash);
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    char files[512];
    snprintf(files, sizeof files, cases[i].files, hex);
    snprintf(text, sizeof text, "%s\"files\":%s}",
             cases[i].head ? cases[i].head
                           : "{\"format\":\"moec-checkpoint\",\"version\":1,\"step\":1,",
             files);
    write_text(path("mf/MANIFEST.json"), text);
    FAILS(cases[i].want, moert_ckpt_verify(path("mf"), st));
  }
  /* Unknown fields are skipped (a later version may add some). */
  snprintf(text, sizeof text,
           "{\"format\":\"moec-checkpoint\",\"version\":1,\"future\":[{\"x\":[1,2,{}]}],\"step\":7,"
           "\"files\":[{\"name\":\"opt.bin\",\"size\":512,\"xxh64\":\"%s\",\"note\":null}]}",
           hex);
  write_text(path("mf/MANIFEST.json"), text);
  OK(moert_ckpt_verify(path("mf"), st));

  /* Random mutations of the manifest: verify passes or fails, never crashes. */
  size_t glen = strlen(good);
  int failed = 0, passed = 0, no_message = 0;
  for (int r = 0; r < 400; r++) {
    char m[4096];
    memcpy(m, good, glen + 1);
    size_t len = glen;
    for (int k = 0; k < 2; k++) {
      switch (rnd() % 3) {
      case 0:
        if (len) m[rnd() % len] = "{}[]\",:0123456789 -.ex\\"[rnd() % 24];
        break;
      case 1:
        if (len) m[rnd() % len] ^= (char)(1 << (rnd() % 8));
        break;
      case 2: len = (size_t)(rnd() % (len + 1)); break;
      }
    }
    FILE *out = fopen(path("mf/MANIFEST.json"), "wb");
    if (out) {
      fwrite(m, 1, len, out);
      fclose(out);
    }
    moert_status st = {0};
    if (moert_ckpt_verify(path("mf"), &st)) {
      passed++;
    } else {
      failed++;
      if (!st.msg[0]) no_message++;
    }
  }
  CHECK(no_message == 0, "manifest mutations: %d failures without a message", no_message);
  CHECK(failed > 200, "manifest mutations: only %d of 400 failed", failed);
}

/* Crashes at each point of a write: the previous checkpoint stays readable. */
static void test_crashes(void) {
  OK(write_ckpt("cr", 1, false, 0, st));

  /* A writer that dies after writing files, before its manifest. */
  fflush(NULL);
  pid_t pid = fork();
  if (pid == 0) {
    moert_status st = {0};
    moert_ckpt_writer *w = NULL;
    int64_t opt[64] = {0};
    if (moert_ckpt_writer_create(path("cr"), 0, &w, &st))
      moert_ckpt_add_file(w, "opt.bin", opt, sizeof opt, &st);
    _exit(0); /* no commit, no destroy: its ck.tmp-* stays */
  }
  int status = 0;
  waitpid(pid, &status, 0);
  CHECK(count_prefix("cr.tmp-") == 1, "the dead writer left %d temporary directories, want 1",
        count_prefix("cr.tmp-"));
  OK(moert_ckpt_verify(path("cr"), st));
  OK(read_ckpt("cr", 1, st));
  /* The next writer removes the leftover and commits. */
  OK(write_ckpt("cr", 2, false, 0, st));
  OK(read_ckpt("cr", 2, st));
  CHECK(count_prefix("cr.") == 0, "the leftover temporary directory was not removed");

  /* A writer that dies after its manifest, before the swap: a complete cr.tmp-*
   * is there but never read. */
  OK(write_ckpt("stage", 3, false, 0, st));
  rename(path("stage"), path("cr.tmp-AAAAAA"));
  OK(read_ckpt("cr", 2, st));

  /* Dead between "rename cr -> cr.moec-old-AAAAAA" and "rename cr.tmp-AAAAAA ->
   * cr": the complete cr.tmp-AAAAAA's marker names the previous checkpoint, and
   * recovery puts it back. */
  CHECK(write_text(path("cr.tmp-AAAAAA/.moec-replaces"), "cr.moec-old-AAAAAA\n"), "marker");
  rename(path("cr"), path("cr.moec-old-AAAAAA"));
  OK(moert_ckpt_verify(path("cr"), st));
  OK(read_ckpt("cr", 2, st));
  CHECK(!file_exists(path("cr.moec-old-AAAAAA")), "recovery left cr.moec-old-AAAAAA");
  rename(path("cr"), path("cr.moec-old-AAAAAA"));
  OK(read_ckpt("cr", 2, st)); /* the reader recovers on its own */

  /* Dead after the swap, before cr.moec-old-BBBBBB was removed: the new one
   * stands, and its marker goes with the leftover. */
  rm_rf(path("cr.tmp-AAAAAA"));
  OK(write_ckpt("stage", 3, false, 0, st));
  CHECK(write_text(path("stage/.moec-replaces"), "cr.moec-old-BBBBBB\n"), "marker");
  rename(path("cr"), path("cr.moec-old-BBBBBB"));
  rename(path("stage"), path("cr"));
  OK(moert_ckpt_verify(path("cr"), st));
  CHECK(!file_exists(path("cr.moec-old-BBBBBB")), "recovery did not remove the leftover after a finished swap");
  CHECK(!file_exists(path("cr/.moec-replaces")), "recovery left the marker");
  OK(read_ckpt("cr", 3, st));

  /* Both there and the new one damaged: nothing is removed, verify says why. */
  OK(write_ckpt("stage", 4, false, 0, st));
  CHECK(write_text(path("stage/.moec-replaces"), "cr.moec-old-CCCCCC\n"), "marker");
  rename(path("cr"), path("cr.moec-old-CCCCCC"));
  rename(path("stage"), path("cr"));
  flip_byte(path("cr/opt.bin"), 3);
  FAILS("damaged", moert_ckpt_verify(path("cr"), st));
  CHECK(file_exists(path("cr.moec-old-CCCCCC/MANIFEST.json")), "recovery removed the leftover while cr is damaged");
  /* with cr gone, no marker names the leftover: it is left for a person */
  rm_rf(path("cr"));
  FAILS("does not exist", moert_ckpt_verify(path("cr"), st));
  CHECK(file_exists(path("cr.moec-old-CCCCCC/MANIFEST.json")), "an unnamed leftover was touched");
  rename(path("cr.moec-old-CCCCCC"), path("cr"));
  OK(read_ckpt("cr", 3, st));

  /* A user's directories beside a checkpoint are never moved, overwritten or
   * removed, whatever their names (issue 17). */
  OK(write_ckpt("s4", 1, false, 0, st)); /* results of a user beside it */
  mkdir(path("s4.old"), 0777);
  CHECK(write_text(path("s4.old/results.csv"), "data\n"), "results.csv");
  OK(write_ckpt("s4", 2, false, 0, st));
  OK(write_ckpt("s4", 3, false, 0, st));
  CHECK(file_exists(path("s4.old/results.csv")), "a user's s4.old was removed");
  OK(write_ckpt("s1", 1, false, 0, st)); /* a user's backup: mv s1 s1.old */
  rename(path("s1"), path("s1.old"));
  OK(write_ckpt("s1", 2, false, 0, st));
  OK(read_ckpt("s1.old", 1, st));
  OK(read_ckpt("s1", 2, st));
  OK(write_ckpt("s3.old", 1, false, 0, st)); /* no s3, a user's s3.old */
  FAILS("does not exist", moert_ckpt_verify(path("s3"), st));
  OK(read_ckpt("s3.old", 1, st));
  OK(write_ckpt("s3", 2, false, 0, st));
  OK(read_ckpt("s3.old", 1, st));
  /* a DIR.tmp-* that moec did not make (no .moec-tmp in it) is not removed, and
   * a committed checkpoint keeps none of moec's markers */
  mkdir(path("s4.tmp-USER00"), 0777);
  CHECK(write_text(path("s4.tmp-USER00/notes.txt"), "mine\n"), "notes.txt");
  OK(write_ckpt("s4", 4, false, 0, st));
  CHECK(file_exists(path("s4.tmp-USER00/notes.txt")), "a user's s4.tmp-USER00 was removed");
  CHECK(!file_exists(path("s4/.moec-tmp")) && !file_exists(path("s4/.moec-replaces")),
        "a marker was left in the committed checkpoint");
  /* a look-alike without moec's marker, or with a marker naming another */
  OK(write_ckpt("s5.moec-old-XXXXXX", 1, false, 0, st));
  FAILS("does not exist", moert_ckpt_verify(path("s5"), st));
  OK(write_ckpt("s5", 2, false, 0, st));
  CHECK(write_text(path("s5/.moec-replaces"), "s6.moec-old-XXXXXX\n"), "marker");
  OK(moert_ckpt_verify(path("s5"), st));
  OK(read_ckpt("s5.moec-old-XXXXXX", 1, st));

  /* A crash inside write_file leaves NAME.tmp beside an intact NAME; a stray file
   * in a checkpoint does not matter to verify. */
  write_text(path("cr/opt.bin.tmp"), "partial");
  OK(moert_ckpt_verify(path("cr"), st));
  OK(write_ckpt("cr", 5, false, 0, st));
  OK(read_ckpt("cr", 5, st));
  CHECK(!file_exists(path("cr/opt.bin.tmp")), "a stray .tmp survived a commit");
}

/* One holder of a checkpoint directory at a time; a location that cannot be
 * written is refused before anything is saved (issue 17). */
static void test_lock(void) {
  moert_ckpt_lock *l = NULL, *l2 = NULL;
  OK(moert_ckpt_lock_create(path("lk"), &l, st));
  CHECK(file_exists(path("lk.moec-lock")), "no lock file beside lk");
  char want[64];
  snprintf(want, sizeof want, "is in use by another run (pid %ld,", (long)getpid());
  /* flock(2) locks belong to an open file: a second open in this process conflicts */
  FAILS(want, moert_ckpt_lock_create(path("lk/"), &l2, st));
  moert_ckpt_lock_destroy(l);
  CHECK(!file_exists(path("lk.moec-lock")), "the lock file outlived its lock");
  CHECK(write_text(path("lk.moec-lock"), "99999\n"), "stale lock file");
  l = NULL;
  OK(moert_ckpt_lock_create(path("lk"), &l, st)); /* nobody holds it: taken over */
  moert_ckpt_lock_destroy(l);
  FAILS("its parent directory", moert_ckpt_lock_create(path("nodir/lk"), &l2, st));
  CHECK(!file_exists(path("nodir")), "a refused lock created its parent");
  CHECK(write_text(path("afile"), "x"), "afile");
  FAILS("is not a directory", moert_ckpt_lock_create(path("afile/lk"), &l2, st));
}

/* ------------------------------------------------------------------------ */
/* Cross-check with Python's safetensors (check_safetensors.py)             */
/* ------------------------------------------------------------------------ */

static int write_crosscheck(const char *dir) {
  int rc = 0;
  for (int all = 0; all < 2; all++) {
    sample s;
    sample_fill(&s, all == 1);
    void *buf;
    size_t len;
    moert_status st = {0};
    moert_kv meta[1] = {{"writer", "moec"}};
    if (!moert_st_serialize(s.t, s.n, meta, 1, &buf, &len, &st)) {
      fprintf(stderr, "serialize: %s\n", st.msg);
      return 1;
    }
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", dir, all ? "c_all.safetensors" : "c_numpy.safetensors");
    FILE *f = fopen(p, "wb");
    if (!f || fwrite(buf, 1, len, f) != len || fclose(f) != 0) {
      fprintf(stderr, "cannot write %s\n", p);
      rc = 1;
    }
    free(buf);
  }
  return rc;
}

/* The file check_safetensors.py writes with safetensors.numpy.save_file:
 * "a": float32 [[0, 0.5, 1], [1.5, 2, 2.5]], "b": int64 [-3, 2^40], "c": uint8
 * [0..9], "d": float16 [1, -2], "e": int32 shape [0, 3], metadata
 * {"format": "np", "writer": "python"}. */
static int read_crosscheck(const char *file) {
  moert_st_file *f = NULL;
  moert_status st = {0};
  if (!moert_st_create_from_path(file, &f, &st)) {
    fprintf(stderr, "%s\n", st.msg);
    return 1;
  }
  int bad = 0;
  const moert_st_tensor *a = moert_st_find(f, "a"), *b = moert_st_find(f, "b"),
                        *c = moert_st_find(f, "c"), *d = moert_st_find(f, "d"),
                        *e = moert_st_find(f, "e");
  float av[6];
  int64_t bv[2];
  uint16_t dv[2];
  if (!a || a->dtype != MOERT_ST_F32 || a->ndim != 2 || a->shape[0] != 2 || a->shape[1] != 3) {
    bad++;
  } else {
    memcpy(av, a->data, sizeof av);
    for (int i = 0; i < 6; i++) bad += av[i] != 0.5f * (float)i;
  }
  if (!b || b->dtype != MOERT_ST_I64 || b->ndim != 1 || b->shape[0] != 2) {
    bad++;
  } else {
    memcpy(bv, b->data, sizeof bv);
    bad += bv[0] != -3 || bv[1] != (int64_t)1 << 40;
  }
  if (!c || c->dtype != MOERT_ST_U8 || c->nbytes != 10) {
    bad++;
  } else {
    for (int i = 0; i < 10; i++) bad += ((const uint8_t *)c->data)[i] != i;
  }
  if (!d || d->dtype != MOERT_ST_F16 || d->nbytes != 4) {
    bad++;
  } else {
    memcpy(dv, d->data, sizeof dv);
    bad += dv[0] != 0x3C00 || dv[1] != 0xC000;
  }
  if (!e || e->dtype != MOERT_ST_I32 || e->ndim != 2 || e->shape[0] != 0 || e->shape[1] != 3 ||
      e->nbytes != 0)
    bad++;
  const char *w = moert_st_meta_get(f, "writer");
  if (!w || strcmp(w, "python") != 0) bad++;
  if (moert_st_count(f) != 5) bad++;
  moert_st_destroy(f);
  if (bad)
    fprintf(stderr, "%s: %d values differ from what check_safetensors.py wrote\n", file, bad);
  else
    printf("%s: read by moec, all values as written\n", file);
  return bad ? 1 : 0;
}

int main(int argc, char **argv) {
  if (argc == 3 && strcmp(argv[1], "--write-crosscheck") == 0) return write_crosscheck(argv[2]);
  if (argc == 3 && strcmp(argv[1], "--read-crosscheck") == 0) return read_crosscheck(argv[2]);

  test_xxh64();
  test_safetensors_roundtrip();
  test_safetensors_hostile();
  test_safetensors_mutations();

  if (argc == 2) {
    mkdir(argv[1], 0755);
    snprintf(g_root, sizeof g_root, "%s/ckpt-test-XXXXXX", argv[1]);
  } else {
    const char *tmp = getenv("TMPDIR");
    snprintf(g_root, sizeof g_root, "%s/moec-ckpt-test-XXXXXX", tmp && tmp[0] ? tmp : "/tmp");
  }
  if (mkdtemp(g_root)) {
    test_atomic_file();
    test_checkpoint_dirs();
    test_manifest_hostile();
    test_manifest_self_hash();
    test_crashes();
    test_lock();
    rm_rf(g_root);
  } else {
    CHECK(false, "cannot make a scratch directory %s: %s", g_root, strerror(errno));
  }
  printf("test_checkpoint: %d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
