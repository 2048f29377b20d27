/* ckpt_check.c — the checkpoint reader's fuzz property (ckpt_check.h): an
 * input becomes bytes in memory or files in a scratch checkpoint directory,
 * the reader runs on them, and what it accepts is read whole. */
#define _POSIX_C_SOURCE 200809L
#include "ckpt_check.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "checkpoint.h"
#include "ckpt_impl.h"

static char g_scratch[4096]; /* the mkdtemp directory */
static char g_dir[4200];     /* the checkpoint directory of one input, inside it */
static unsigned char *g_model, *g_opt;
static size_t g_model_len, g_opt_len;
static char g_msg[sizeof ((moert_status *)0)->msg];
/* every byte read is summed here, so reading it cannot be optimized away */
static volatile unsigned g_sink;

static const char OPT_NAME[] = "opt.bin", MODEL_NAME[] = "model.safetensors";

bool moec_ckpt_fuzz_init(const char *dir) {
  const char *tmp = dir ? dir : getenv("TMPDIR");
  snprintf(g_scratch, sizeof g_scratch, "%s/moec-ckpt-fuzz-XXXXXX", tmp && *tmp ? tmp : "/tmp");
  if (!mkdtemp(g_scratch)) {
    fprintf(stderr, "ckpt fuzz: cannot make a scratch directory %s: %s\n", g_scratch, strerror(errno));
    return false;
  }
  snprintf(g_dir, sizeof g_dir, "%s/ck", g_scratch);
  /* the data files: two small tensors, and raw bytes */
  static const float w[6] = {1, -2, 3.5f, 0, 1e-3f, -7};
  static const uint16_t h[4] = {0x3c00, 0xbc00, 0x7c00, 0x0001};
  moert_st_tensor t[2] = {
      {.name = "layer.w", .dtype = MOERT_ST_F32, .ndim = 2, .shape = {2, 3}, .data = w, .nbytes = sizeof w},
      {.name = "layer.b", .dtype = MOERT_ST_BF16, .ndim = 1, .shape = {4}, .data = h, .nbytes = sizeof h},
  };
  moert_kv meta[1] = {{"model", "fuzz"}};
  moert_status st = {0};
  void *buf = NULL;
  if (!moert_st_serialize(t, 2, meta, 1, &buf, &g_model_len, &st)) {
    fprintf(stderr, "ckpt fuzz: %s\n", st.msg);
    return false;
  }
  g_model = buf;
  g_opt_len = 64;
  g_opt = malloc(g_opt_len);
  if (!g_opt) return false;
  for (size_t i = 0; i < g_opt_len; i++) g_opt[i] = (unsigned char)(i * 37 + 11);
  return true;
}

void moec_ckpt_fuzz_data(const unsigned char **model, size_t *model_len, const unsigned char **opt,
                         size_t *opt_len) {
  *model = g_model;
  *model_len = g_model_len;
  *opt = g_opt;
  *opt_len = g_opt_len;
}

void moec_ckpt_fuzz_cleanup(void) {
  moert_ckpt_remove_flat_dir(g_dir);
  rmdir(g_scratch);
  free(g_model);
  free(g_opt);
  g_model = g_opt = NULL;
}

const char *moec_ckpt_fuzz_message(void) { return g_msg; }

const char *moec_ckpt_fuzz_scratch(void) { return g_scratch; }

static void violated(char mode, const char *what, const char *msg) {
  fprintf(stderr, "ckpt fuzz: property violated on an input of mode '%c': %s\n  message: \"%s\"\n", mode, what,
          msg);
  abort();
}

static void write_bytes(const char *name, const void *p, size_t n) {
  char *path = moert_ckpt_path_join(g_dir, name);
  FILE *f = path ? fopen(path, "wb") : NULL;
  if (!f || (n && fwrite(p, 1, n, f) != n) || fclose(f) != 0) {
    fprintf(stderr, "ckpt fuzz: cannot write %s: %s\n", path ? path : name, strerror(errno));
    abort();
  }
  free(path);
}

static void touch(const void *p, size_t n) {
  const unsigned char *b = p;
  unsigned s = 0;
  for (size_t i = 0; i < n; i++) s += b[i];
  g_sink += s;
}

/* Every tensor's name, shape and bytes and every metadata entry of f. */
static void walk_st(const moert_st_file *f) {
  for (int i = 0; i < moert_st_count(f); i++) {
    const moert_st_tensor *t = moert_st_tensor_at(f, i);
    size_t elems = 1;
    for (int d = 0; d < t->ndim; d++) elems *= (size_t)t->shape[d];
    if (elems * moert_st_dtype_size(t->dtype) != t->nbytes)
      violated('S', "an accepted tensor's nbytes is not its shape times its dtype's size", t->name);
    if (moert_st_find(f, t->name) != t) violated('S', "moert_st_find does not find an accepted tensor", t->name);
    touch(t->name, strlen(t->name));
    touch(t->data, t->nbytes);
  }
  for (int i = 0; i < moert_st_meta_count(f); i++) {
    moert_kv kv = moert_st_meta_at(f, i);
    touch(kv.key, strlen(kv.key));
    touch(kv.value, strlen(kv.value));
  }
}

/* The checkpoint directory g_dir through the reader, and every listed file. */
static bool read_dir(moert_status *st) {
  moert_ckpt_reader *r = NULL;
  MOERT_TRY(st, moert_ckpt_reader_create(g_dir, &r, st));
  g_sink += (unsigned)moert_ckpt_step(r);
  for (int i = 0; i < moert_ckpt_meta_count(r); i++) {
    moert_kv kv = moert_ckpt_meta_at(r, i);
    touch(kv.key, strlen(kv.key));
    touch(kv.value, strlen(kv.value));
  }
  bool ok = true;
  for (int i = 0; i < moert_ckpt_file_count(r) && ok; i++) {
    const char *name = moert_ckpt_file_name(r, i);
    size_t n = strlen(name);
    if (n > 12 && strcmp(name + n - 12, ".safetensors") == 0) {
      moert_st_file *f = NULL;
      ok = moert_ckpt_read_safetensors(r, name, &f, st);
      if (ok) walk_st(f);
      moert_st_destroy(f);
    } else {
      void *data = NULL;
      size_t len = 0;
      ok = moert_ckpt_read_file(r, name, &data, &len, st);
      if (ok) touch(data, len);
      free(data);
    }
  }
  moert_ckpt_reader_destroy(r);
  return ok;
}

/* A fresh, empty g_dir. */
static void fresh_dir(void) {
  struct stat sb;
  if (lstat(g_dir, &sb) == 0 && !moert_ckpt_remove_flat_dir(g_dir)) {
    fprintf(stderr, "ckpt fuzz: cannot empty %s\n", g_dir);
    abort();
  }
  if (mkdir(g_dir, 0755) != 0) {
    fprintf(stderr, "ckpt fuzz: cannot make %s: %s\n", g_dir, strerror(errno));
    abort();
  }
}

int moec_ckpt_fuzz_one(const uint8_t *data, size_t size) {
  char mode = size ? (char)data[0] : 'S';
  const uint8_t *p = size ? data + 1 : data;
  size_t n = size ? size - 1 : 0;
  moert_status st = {0};
  bool ok;
  g_msg[0] = 0;
  if (mode == 'M' || mode == 'D') {
    fresh_dir();
    if (mode == 'M') {
      write_bytes(MODEL_NAME, g_model, g_model_len);
      write_bytes(OPT_NAME, g_opt, g_opt_len);
      write_bytes(MOERT_CKPT_MANIFEST, p, n);
    } else {
      write_bytes(MODEL_NAME, p, n);
      moert_ckpt_mfile f = {MODEL_NAME, n, XXH64(p, n, 0)};
      moert_kv meta[1] = {{"spec", "fuzz.moe"}};
      moert_sbuf m = {0};
      moert_ckpt_manifest_format(3, meta, 1, &f, 1, &m);
      if (m.oom) abort();
      write_bytes(MOERT_CKPT_MANIFEST, m.p, m.len);
      free(m.p);
    }
    ok = read_dir(&st);
  } else {
    mode = 'S';
    moert_st_file *f = NULL;
    ok = moert_st_create(p, n, "fuzz.safetensors", &f, &st);
    if (ok) walk_st(f);
    moert_st_destroy(f);
  }
  if (ok && st.failed) violated(mode, "accepted, with a failure recorded", st.msg);
  if (ok) return 1;
  if (!st.failed || !st.msg[0]) violated(mode, "rejected without a message", st.msg);
  for (const unsigned char *c = (const unsigned char *)st.msg; *c; c++)
    if (*c < 0x20 || *c == 0x7f) violated(mode, "a control byte in the message (names must be escaped)", st.msg);
  memcpy(g_msg, st.msg, sizeof g_msg);
  return 0;
}
