/* source.c — reading a spec into memory, with the checks that apply to the
 * file as a whole: it exists and is a regular file or a stream, it fits, it is
 * not empty, and it is UTF-8 text without NUL bytes. Each failure is one
 * diagnostic, so a binary file gets one message, not twenty. */
#include "parse.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char *const START_HINT = "a spec starts with `model NAME { ... }`";

/* Offset of the first NUL byte or invalid UTF-8 sequence, or len if none.
 * Overlong encodings, surrogates and code points past U+10FFFF are invalid. */
static size_t first_bad_byte(const unsigned char *s, size_t len, bool *is_nul) {
  for (size_t i = 0; i < len;) {
    unsigned c = s[i];
    if (c == 0) { *is_nul = true; return i; }
    if (c < 0x80) { i++; continue; }
    size_t n;
    unsigned cp;
    if (c >= 0xC2 && c <= 0xDF) { n = 2; cp = c & 0x1F; }
    else if (c >= 0xE0 && c <= 0xEF) { n = 3; cp = c & 0x0F; }
    else if (c >= 0xF0 && c <= 0xF4) { n = 4; cp = c & 0x07; }
    else { *is_nul = false; return i; }
    if (i + n > len) { *is_nul = false; return i; }
    for (size_t k = 1; k < n; k++) {
      if ((s[i + k] & 0xC0) != 0x80) { *is_nul = false; return i; }
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF)) {
      *is_nul = false;
      return i;
    }
    i += n;
  }
  return len;
}

static moec_source *check(moec_arena *a, moec_diags *d, moec_source *src) {
  if (src->len == 0) {
    moec_file_error(d, src, "empty file; %s", START_HINT);
    return NULL;
  }
  bool is_nul = false;
  size_t bad = first_bad_byte((const unsigned char *)src->text, src->len, &is_nul);
  if (bad < src->len) {
    moec_loc at = {src, bad, bad + 1};
    if (is_nul)
      moec_error_at_byte(d, at, "NUL byte in spec; this looks like a binary file, not a .moe spec");
    else
      moec_error(d, at, "invalid UTF-8 byte `\\x%02x`; a spec must be UTF-8 text",
                 (unsigned char)src->text[bad]);
    return NULL;
  }
  (void)a;
  return src;
}

moec_source *moec_source_from_buffer(moec_arena *a, moec_diags *d, const char *name,
                                     const char *buf, size_t len) {
  moec_source *src = MOEC_NEW(a, moec_source);
  src->arena = a;
  src->name = moec_arena_strdup(a, name);
  if (len > MOEC_MAX_SOURCE_BYTES) {
    moec_file_error(d, src, "file too large (%zu bytes; limit is %zu)", len,
                    MOEC_MAX_SOURCE_BYTES);
    return NULL;
  }
  char *text = moec_arena_alloc(a, len + 2); /* two NULs for flex */
  memcpy(text, buf, len);
  src->text = text;
  src->len = len;
  return check(a, d, src);
}

moec_source *moec_source_load(moec_arena *a, moec_diags *d, const char *path) {
  bool is_stdin = strcmp(path, "-") == 0;
  moec_source *src = MOEC_NEW(a, moec_source);
  src->arena = a;
  src->name = is_stdin ? "<stdin>" : moec_arena_strdup(a, path);
  FILE *f = is_stdin ? stdin : fopen(path, "rb");
  if (!f) {
    moec_file_error(d, src, "cannot open: %s", strerror(errno));
    return NULL;
  }
  struct stat st;
  if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode)) {
    moec_file_error(d, src, "is a directory; give the path of a .moe file");
    if (!is_stdin) fclose(f);
    return NULL;
  }
  /* Read in chunks: stdin has no size, and a file may change while read. */
  size_t cap = 1 << 16, len = 0;
  char *buf = malloc(cap + 2);
  bool too_big = false, failed = false;
  int err = 0;
  while (buf) {
    if (len == cap) {
      if (cap > MOEC_MAX_SOURCE_BYTES) { too_big = true; break; }
      cap *= 2;
      char *nb = realloc(buf, cap + 2);
      if (!nb) { free(buf); buf = NULL; break; }
      buf = nb;
    }
    size_t got = fread(buf + len, 1, cap - len, f);
    len += got;
    if (got == 0) {
      if (ferror(f)) { failed = true; err = errno; }
      break;
    }
  }
  if (!is_stdin) fclose(f);
  if (!buf) {
    moec_file_error(d, src, "out of memory reading the file");
    return NULL;
  }
  if (failed) {
    moec_file_error(d, src, "cannot read: %s", strerror(err ? err : EIO));
    free(buf);
    return NULL;
  }
  if (too_big || len > MOEC_MAX_SOURCE_BYTES) {
    moec_file_error(d, src, "file too large (limit is %zu bytes)", MOEC_MAX_SOURCE_BYTES);
    free(buf);
    return NULL;
  }
  char *text = moec_arena_alloc(a, len + 2);
  memcpy(text, buf, len);
  free(buf);
  src->text = text;
  src->len = len;
  return check(a, d, src);
}
