/* checkpoint.c — safetensors writer and validating reader, atomic files and
 * checkpoint directories (files hashed with libxxhash's XXH64); see checkpoint.h
 * for the on-disk scheme.
 *
 * The JSON of a safetensors header and of MANIFEST.json is read by a small pull
 * parser (no document tree): the reader asks for the value it expects next, so a
 * hostile header cannot make it allocate more than a constant times its own size,
 * nesting is bounded, and every failure names the byte where it happened. */
#define _POSIX_C_SOURCE 200809L
#include "checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

static uint64_t load_le64(const unsigned char *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
  return v;
}

/* ======================================================================== */
/* Small helpers: string building, UTF-8, quoting names in messages         */
/* ======================================================================== */

typedef struct sbuf {
  char *p;
  size_t len, cap;
  bool oom;
} sbuf;

static void sb_putn(sbuf *b, const char *s, size_t n) {
  if (b->oom) return;
  if (n > SIZE_MAX - b->len - 1) {
    b->oom = true;
    return;
  }
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n + 1) {
      if (cap > SIZE_MAX / 2) {
        b->oom = true;
        return;
      }
      cap *= 2;
    }
    char *q = realloc(b->p, cap);
    if (!q) {
      b->oom = true;
      return;
    }
    b->p = q;
    b->cap = cap;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
}

static void sb_puts(sbuf *b, const char *s) { sb_putn(b, s, strlen(s)); }

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...) {
  char tmp[128];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
  va_end(ap);
  if (n < 0 || (size_t)n >= sizeof tmp) {
    b->oom = true; /* only used for numbers; never happens */
    return;
  }
  sb_putn(b, tmp, (size_t)n);
}

/* s as a JSON string: quotes, backslashes and control characters escaped. */
static void sb_json_str(sbuf *b, const char *s) {
  sb_putn(b, "\"", 1);
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    if (*p == '"' || *p == '\\') {
      char e[2] = {'\\', (char)*p};
      sb_putn(b, e, 2);
    } else if (*p < 0x20) {
      sb_printf(b, "\\u%04x", *p);
    } else {
      sb_putn(b, (const char *)p, 1);
    }
  }
  sb_putn(b, "\"", 1);
}

/* Length of the valid UTF-8 sequence at s (1 to 4), or 0 if none is there. */
static size_t utf8_seq(const unsigned char *s, size_t avail) {
  unsigned char c = s[0];
  if (c < 0x80) return 1;
  size_t n;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F; /* no UTF-16 surrogates */
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F; /* nothing above U+10FFFF */
  } else {
    return 0;
  }
  if (avail < n) return 0;
  if (s[1] < lo || s[1] > hi) return 0;
  for (size_t i = 2; i < n; i++)
    if (s[i] < 0x80 || s[i] > 0xBF) return 0;
  return n;
}

static bool utf8_valid(const char *s) {
  const unsigned char *p = (const unsigned char *)s;
  size_t n = strlen(s);
  for (size_t i = 0; i < n;) {
    size_t k = utf8_seq(p + i, n - i);
    if (!k) return false;
    i += k;
  }
  return true;
}

/* A name for a message: control bytes escaped, cut to about 60 bytes. */
typedef struct shown {
  char s[96];
} shown;

static shown show(const char *name) {
  shown out;
  size_t o = 0;
  const unsigned char *p = (const unsigned char *)name;
  for (; *p && o < 60; p++) {
    if (*p < 0x20 || *p == 0x7f) {
      o += (size_t)snprintf(out.s + o, sizeof out.s - o, "\\x%02x", *p);
    } else {
      out.s[o++] = (char)*p;
    }
  }
  if (*p) {
    while (o > 0 && ((unsigned char)out.s[o - 1] & 0xC0) == 0x80) o--; /* whole characters */
    if (o > 0 && (unsigned char)out.s[o - 1] >= 0xC0) o--;
    memcpy(out.s + o, "...", 4);
  } else {
    out.s[o] = '\0';
  }
  return out;
}

static char *str_dup(const char *s) {
  size_t n = strlen(s) + 1;
  char *d = malloc(n);
  if (d) memcpy(d, s, n);
  return d;
}

/* "a/b" from a and b (malloc'd; NULL when out of memory). */
static char *path_join(const char *a, const char *b) {
  size_t na = strlen(a), nb = strlen(b);
  char *p = malloc(na + nb + 2);
  if (!p) return NULL;
  memcpy(p, a, na);
  p[na] = '/';
  memcpy(p + na + 1, b, nb + 1);
  return p;
}

static char *str_cat(const char *a, const char *b) {
  size_t na = strlen(a), nb = strlen(b);
  char *p = malloc(na + nb + 1);
  if (!p) return NULL;
  memcpy(p, a, na);
  memcpy(p + na, b, nb + 1);
  return p;
}

/* ======================================================================== */
/* Pull JSON parser                                                         */
/* ======================================================================== */

/* Nesting allowed in values that are skipped (unknown manifest fields). */
#define JSON_MAX_DEPTH 64

typedef struct jp {
  const unsigned char *s;
  size_t len, pos;
  char *pool; /* decoded strings; len + 1 bytes always suffice (see jp_string) */
  size_t pool_used;
  const char *what; /* "ORIGIN: header" or "DIR/MANIFEST.json" for messages */
  moert_status *st;
} jp;

static bool jp_syntax(jp *p, size_t at, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static bool jp_syntax(jp *p, size_t at, const char *fmt, ...) {
  char msg[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  return MOERT_FAIL(p->st, "%s is not valid JSON: %s at byte %zu", p->what, msg, at);
}

static void jp_ws(jp *p) {
  while (p->pos < p->len) {
    unsigned char c = p->s[p->pos];
    if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
    p->pos++;
  }
}

/* The next byte after white space, or -1 at the end. */
static int jp_peek(jp *p) {
  jp_ws(p);
  return p->pos < p->len ? p->s[p->pos] : -1;
}

/* What a value starting with c is, for "expected X, found Y" messages. */
static const char *jp_kind(int c) {
  switch (c) {
  case '{': return "an object";
  case '[': return "an array";
  case '"': return "a string";
  case 't':
  case 'f': return "a boolean";
  case 'n': return "null";
  case -1: return "the end of the text";
  default: return (c == '-' || (c >= '0' && c <= '9')) ? "a number" : "something that is not JSON";
  }
}

/* A byte for a message: `x`, or \xNN. */
static const char *jp_char(int c, char buf[8]) {
  if (c < 0) return "the end of the text";
  if (c >= 0x21 && c < 0x7f)
    snprintf(buf, 8, "`%c`", c);
  else
    snprintf(buf, 8, "\\x%02x", (unsigned)(c & 0xff));
  return buf;
}

/* Before a "must be X, found Y" message: if c cannot start a JSON value at all,
 * the text is broken rather than of the wrong type; records that and returns true. */
static bool jp_not_a_value(jp *p, int c) {
  char b[8];
  if (c == '{' || c == '[' || c == '"' || c == '-' || (c >= '0' && c <= '9') || c == 't' ||
      c == 'f' || c == 'n')
    return false;
  jp_syntax(p, p->pos, "expected a value, found %s", jp_char(c, b));
  return true;
}

static bool jp_expect(jp *p, int ch, const char *context) {
  char b1[8], b2[8];
  int c = jp_peek(p);
  if (c != ch)
    return jp_syntax(p, p->pos, "expected %s %s, found %s", jp_char(ch, b1), context,
                     jp_char(c, b2));
  p->pos++;
  return true;
}

static int hexval(unsigned char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

static bool jp_hex4(jp *p, unsigned *out) {
  if (p->len - p->pos < 4) return jp_syntax(p, p->pos, "\\u needs four hex digits");
  unsigned v = 0;
  for (int i = 0; i < 4; i++) {
    int h = hexval(p->s[p->pos + (size_t)i]);
    if (h < 0) return jp_syntax(p, p->pos, "\\u needs four hex digits");
    v = v << 4 | (unsigned)h;
  }
  p->pos += 4;
  *out = v;
  return true;
}

/* Reads a string at the current position (after white space), decoded into the
 * pool as a NUL-terminated UTF-8 string. Each string takes at most (its encoded
 * length - 1) pool bytes with its NUL, so the pool never needs more than len + 1. */
static bool jp_string(jp *p, const char **out) {
  char b[8];
  int c0 = jp_peek(p);
  if (c0 != '"') return jp_syntax(p, p->pos, "expected a string, found %s", jp_char(c0, b));
  size_t start = p->pos++;
  char *dst = p->pool + p->pool_used;
  size_t n = 0;
  for (;;) {
    if (p->pos >= p->len) return jp_syntax(p, start, "the string that starts here is not closed");
    unsigned char c = p->s[p->pos];
    if (c == '"') {
      p->pos++;
      break;
    }
    if (c < 0x20)
      return jp_syntax(p, p->pos, "raw control byte 0x%02x in a string (JSON needs it escaped)", c);
    if (c != '\\') {
      size_t k = utf8_seq(p->s + p->pos, p->len - p->pos);
      if (!k) return jp_syntax(p, p->pos, "invalid UTF-8 in a string");
      memcpy(dst + n, p->s + p->pos, k);
      n += k;
      p->pos += k;
      continue;
    }
    size_t esc = p->pos++;
    if (p->pos >= p->len) return jp_syntax(p, start, "the string that starts here is not closed");
    unsigned char e = p->s[p->pos++];
    unsigned cp;
    switch (e) {
    case '"': dst[n++] = '"'; continue;
    case '\\': dst[n++] = '\\'; continue;
    case '/': dst[n++] = '/'; continue;
    case 'b': dst[n++] = '\b'; continue;
    case 'f': dst[n++] = '\f'; continue;
    case 'n': dst[n++] = '\n'; continue;
    case 'r': dst[n++] = '\r'; continue;
    case 't': dst[n++] = '\t'; continue;
    case 'u':
      if (!jp_hex4(p, &cp)) return false;
      break;
    default:
      return jp_syntax(p, esc, "unknown escape \\%c in a string", e >= 0x21 && e < 0x7f ? e : '?');
    }
    if (cp >= 0xDC00 && cp <= 0xDFFF) return jp_syntax(p, esc, "lone low surrogate \\u%04x", cp);
    if (cp >= 0xD800 && cp <= 0xDBFF) {
      unsigned lo;
      if (p->len - p->pos < 2 || p->s[p->pos] != '\\' || p->s[p->pos + 1] != 'u')
        return jp_syntax(p, esc, "high surrogate \\u%04x not followed by a low one", cp);
      p->pos += 2;
      if (!jp_hex4(p, &lo)) return false;
      if (lo < 0xDC00 || lo > 0xDFFF)
        return jp_syntax(p, esc, "high surrogate \\u%04x not followed by a low one", cp);
      cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
    }
    if (cp == 0) return jp_syntax(p, esc, "\\u0000 in a string (moec's names cannot hold NUL)");
    if (cp < 0x80) {
      dst[n++] = (char)cp;
    } else if (cp < 0x800) {
      dst[n++] = (char)(0xC0 | cp >> 6);
      dst[n++] = (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      dst[n++] = (char)(0xE0 | cp >> 12);
      dst[n++] = (char)(0x80 | (cp >> 6 & 0x3F));
      dst[n++] = (char)(0x80 | (cp & 0x3F));
    } else {
      dst[n++] = (char)(0xF0 | cp >> 18);
      dst[n++] = (char)(0x80 | (cp >> 12 & 0x3F));
      dst[n++] = (char)(0x80 | (cp >> 6 & 0x3F));
      dst[n++] = (char)(0x80 | (cp & 0x3F));
    }
  }
  dst[n] = '\0';
  p->pool_used += n + 1;
  *out = dst;
  return true;
}

typedef struct jnum {
  bool integer;   /* no fraction, no exponent */
  bool negative;  /* a leading '-' */
  bool overflow;  /* the integer part does not fit 64 bits */
  uint64_t mag;   /* |value| when integer and !overflow */
  size_t at, len; /* the text */
} jnum;

/* Reads a number with JSON's exact grammar. */
static bool jp_number(jp *p, jnum *out) {
  jp_ws(p);
  memset(out, 0, sizeof *out);
  out->at = p->pos;
  out->integer = true;
  size_t i = p->pos;
  if (i < p->len && p->s[i] == '-') {
    out->negative = true;
    i++;
  }
  if (i >= p->len || p->s[i] < '0' || p->s[i] > '9')
    return jp_syntax(p, p->pos, "expected a number");
  if (p->s[i] == '0') {
    i++;
  } else {
    while (i < p->len && p->s[i] >= '0' && p->s[i] <= '9') {
      unsigned d = p->s[i] - '0';
      if (out->mag > (UINT64_MAX - d) / 10) out->overflow = true;
      out->mag = out->mag * 10 + d;
      i++;
    }
  }
  if (i < p->len && p->s[i] == '.') {
    out->integer = false;
    i++;
    if (i >= p->len || p->s[i] < '0' || p->s[i] > '9')
      return jp_syntax(p, i, "expected a digit after `.`");
    while (i < p->len && p->s[i] >= '0' && p->s[i] <= '9') i++;
  }
  if (i < p->len && (p->s[i] == 'e' || p->s[i] == 'E')) {
    out->integer = false;
    i++;
    if (i < p->len && (p->s[i] == '+' || p->s[i] == '-')) i++;
    if (i >= p->len || p->s[i] < '0' || p->s[i] > '9')
      return jp_syntax(p, i, "expected a digit in the exponent");
    while (i < p->len && p->s[i] >= '0' && p->s[i] <= '9') i++;
  }
  out->len = i - out->at;
  p->pos = i;
  return true;
}

static bool jp_literal(jp *p, const char *word) {
  size_t n = strlen(word);
  if (p->len - p->pos < n || memcmp(p->s + p->pos, word, n) != 0)
    return jp_syntax(p, p->pos, "expected a value");
  p->pos += n;
  return true;
}

/* Object and array iteration. Call with *first = true; each call either sets
 * *end (the closing bracket was consumed) or positions at the next member's
 * value (after its key and ':') or the next element. */
static bool jp_member(jp *p, bool *first, bool *end, const char **key) {
  char b[8];
  int c = jp_peek(p);
  *end = false;
  if (c == '}' && *first) {
    p->pos++;
    *end = true;
    return true;
  }
  if (!*first) {
    if (c == '}') {
      p->pos++;
      *end = true;
      return true;
    }
    if (c != ',')
      return jp_syntax(p, p->pos, "expected `,` or `}` in an object, found %s", jp_char(c, b));
    p->pos++;
    c = jp_peek(p);
  }
  *first = false;
  if (c != '"')
    return jp_syntax(p, p->pos, "expected a string key in an object, found %s", jp_char(c, b));
  if (!jp_string(p, key)) return false;
  return jp_expect(p, ':', "after an object key");
}

static bool jp_element(jp *p, bool *first, bool *end) {
  char b[8];
  int c = jp_peek(p);
  *end = false;
  if (c == ']') {
    p->pos++;
    *end = true;
    return true;
  }
  if (!*first) {
    if (c != ',')
      return jp_syntax(p, p->pos, "expected `,` or `]` in an array, found %s", jp_char(c, b));
    p->pos++;
    if (jp_peek(p) == ']') return jp_syntax(p, p->pos, "expected a value after `,`");
  }
  *first = false;
  return true;
}

/* Reads and discards any value, nested at most JSON_MAX_DEPTH deep. */
static bool jp_skip(jp *p, int depth) {
  char b[8];
  if (depth > JSON_MAX_DEPTH)
    return jp_syntax(p, p->pos, "values nested deeper than %d", JSON_MAX_DEPTH);
  int c = jp_peek(p);
  const char *ignored;
  bool first = true, end = false;
  jnum num;
  switch (c) {
  case '{':
    p->pos++;
    for (;;) {
      if (!jp_member(p, &first, &end, &ignored)) return false;
      if (end) return true;
      if (!jp_skip(p, depth + 1)) return false;
    }
  case '[':
    p->pos++;
    for (;;) {
      if (!jp_element(p, &first, &end)) return false;
      if (end) return true;
      if (!jp_skip(p, depth + 1)) return false;
    }
  case '"': return jp_string(p, &ignored);
  case 't': return jp_literal(p, "true");
  case 'f': return jp_literal(p, "false");
  case 'n': return jp_literal(p, "null");
  default:
    if (c == '-' || (c >= '0' && c <= '9')) return jp_number(p, &num);
    return jp_syntax(p, p->pos, "expected a value, found %s", jp_char(c, b));
  }
}

/* After the top-level value: only white space may follow. */
static bool jp_finish(jp *p) {
  char b[8];
  int c = jp_peek(p);
  if (c != -1)
    return jp_syntax(p, p->pos, "unexpected %s after the top-level object", jp_char(c, b));
  return true;
}

/* ======================================================================== */
/* safetensors                                                              */
/* ======================================================================== */

static const struct {
  const char *name;
  size_t size;
} dtypes[MOERT_ST_NDTYPES] = {
    [MOERT_ST_F64] = {"F64", 8},   [MOERT_ST_F32] = {"F32", 4}, [MOERT_ST_F16] = {"F16", 2},
    [MOERT_ST_BF16] = {"BF16", 2}, [MOERT_ST_I64] = {"I64", 8}, [MOERT_ST_I32] = {"I32", 4},
    [MOERT_ST_I16] = {"I16", 2},   [MOERT_ST_I8] = {"I8", 1},   [MOERT_ST_U64] = {"U64", 8},
    [MOERT_ST_U32] = {"U32", 4},   [MOERT_ST_U16] = {"U16", 2}, [MOERT_ST_U8] = {"U8", 1},
    [MOERT_ST_BOOL] = {"BOOL", 1},
};

const char *moert_st_dtype_name(moert_st_dtype dt) {
  return (unsigned)dt < MOERT_ST_NDTYPES ? dtypes[dt].name : "?";
}

size_t moert_st_dtype_size(moert_st_dtype dt) {
  return (unsigned)dt < MOERT_ST_NDTYPES ? dtypes[dt].size : 0;
}

/* "[4, 5]" */
static void fmt_shape(char *buf, size_t cap, const int64_t *shape, int ndim) {
  size_t o = (size_t)snprintf(buf, cap, "[");
  for (int i = 0; i < ndim && o < cap; i++)
    o += (size_t)snprintf(buf + o, cap - o, "%s%" PRId64, i ? ", " : "", shape[i]);
  if (o < cap) snprintf(buf + o, cap - o, "]");
}

/* Bytes a tensor of this shape and dtype needs; false if that overflows. */
static bool shape_bytes(const int64_t *shape, int ndim, moert_st_dtype dt, uint64_t *out) {
  uint64_t n = moert_st_dtype_size(dt);
  bool zero = false, over = false;
  for (int i = 0; i < ndim; i++) {
    uint64_t d = (uint64_t)shape[i];
    if (d == 0)
      zero = true;
    else if (n > UINT64_MAX / d)
      over = true;
    else
      n *= d;
  }
  if (zero) n = 0;
  *out = n;
  return zero || !over;
}

static int cmp_str_ptr(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Finds a name that occurs twice among names[0..n) (sorts the array). */
static const char *find_duplicate(const char **names, int n) {
  if (n < 2) return NULL;
  qsort(names, (size_t)n, sizeof *names, cmp_str_ptr);
  for (int i = 1; i < n; i++)
    if (strcmp(names[i - 1], names[i]) == 0) return names[i];
  return NULL;
}

/* Validates tensors and metadata for writing and builds the padded header. */
static bool st_header(const moert_st_tensor *t, int n, const moert_kv *meta, int nmeta, sbuf *hdr,
                      moert_status *st) {
  if (n < 0 || nmeta < 0 || (n > 0 && !t) || (nmeta > 0 && !meta))
    return MOERT_FAIL(st, "cannot write safetensors: invalid tensor or metadata count (%d, %d)", n,
                      nmeta);
  const char **names = malloc(sizeof *names * (size_t)(n > nmeta ? n : nmeta) + 1);
  if (!names) return MOERT_FAIL(st, "cannot write safetensors: out of memory");
  bool ok = false;
  const char *format = "pt";
  for (int i = 0; i < nmeta; i++) {
    if (!meta[i].key || !meta[i].value || !utf8_valid(meta[i].key) || !utf8_valid(meta[i].value)) {
      MOERT_FAIL(st, "cannot write safetensors: metadata entry %d is NULL or not UTF-8", i);
      goto done;
    }
    names[i] = meta[i].key;
  }
  const char *dup = find_duplicate(names, nmeta);
  if (dup) {
    MOERT_FAIL(st, "cannot write safetensors: metadata key `%s` given twice", show(dup).s);
    goto done;
  }
  for (int i = 0; i < n; i++) {
    const moert_st_tensor *x = &t[i];
    if (!x->name || !x->name[0] || !utf8_valid(x->name) || strcmp(x->name, "__metadata__") == 0) {
      MOERT_FAIL(st,
                 "cannot write safetensors: tensor %d has no name, a name that is not UTF-8, "
                 "or the reserved name `__metadata__`",
                 i);
      goto done;
    }
    if ((unsigned)x->dtype >= MOERT_ST_NDTYPES) {
      MOERT_FAIL(st, "cannot write safetensors: tensor `%s` has an invalid dtype (%d)",
                 show(x->name).s, (int)x->dtype);
      goto done;
    }
    if (x->ndim < 0 || x->ndim > MOERT_ST_MAX_DIMS) {
      MOERT_FAIL(st, "cannot write safetensors: tensor `%s` has %d dimensions (limit is %d)",
                 show(x->name).s, x->ndim, MOERT_ST_MAX_DIMS);
      goto done;
    }
    for (int d = 0; d < x->ndim; d++)
      if (x->shape[d] < 0) {
        MOERT_FAIL(st, "cannot write safetensors: tensor `%s` has a negative dimension %" PRId64,
                   show(x->name).s, x->shape[d]);
        goto done;
      }
    uint64_t need;
    char shp[160];
    fmt_shape(shp, sizeof shp, x->shape, x->ndim);
    if (!shape_bytes(x->shape, x->ndim, x->dtype, &need) || need != x->nbytes) {
      MOERT_FAIL(st,
                 "cannot write safetensors: tensor `%s` has %zu bytes of data but its shape %s of "
                 "%s needs %" PRIu64,
                 show(x->name).s, x->nbytes, shp, moert_st_dtype_name(x->dtype), need);
      goto done;
    }
    if (x->nbytes > 0 && !x->data) {
      MOERT_FAIL(st, "cannot write safetensors: tensor `%s` has no data", show(x->name).s);
      goto done;
    }
    names[i] = x->name;
  }
  dup = find_duplicate(names, n);
  if (dup) {
    MOERT_FAIL(st, "cannot write safetensors: two tensors are called `%s`", show(dup).s);
    goto done;
  }
  for (int i = 0; i < nmeta; i++)
    if (strcmp(meta[i].key, "format") == 0) format = meta[i].value;

  sb_puts(hdr, "{\"__metadata__\":{\"format\":");
  sb_json_str(hdr, format);
  for (int i = 0; i < nmeta; i++) {
    if (strcmp(meta[i].key, "format") == 0) continue;
    sb_putn(hdr, ",", 1);
    sb_json_str(hdr, meta[i].key);
    sb_putn(hdr, ":", 1);
    sb_json_str(hdr, meta[i].value);
  }
  sb_putn(hdr, "}", 1);
  uint64_t off = 0;
  for (int i = 0; i < n; i++) {
    sb_putn(hdr, ",", 1);
    sb_json_str(hdr, t[i].name);
    sb_printf(hdr, ":{\"dtype\":\"%s\",\"shape\":[", moert_st_dtype_name(t[i].dtype));
    for (int d = 0; d < t[i].ndim; d++) sb_printf(hdr, d ? ",%" PRId64 : "%" PRId64, t[i].shape[d]);
    sb_printf(hdr, "],\"data_offsets\":[%" PRIu64 ",%" PRIu64 "]}", off, off + t[i].nbytes);
    off += t[i].nbytes;
  }
  sb_putn(hdr, "}", 1);
  while (!hdr->oom && hdr->len % 8 != 0) sb_putn(hdr, " ", 1);
  if (hdr->oom) {
    MOERT_FAIL(st, "cannot write safetensors: out of memory building the header");
    goto done;
  }
  if (hdr->len > MOERT_ST_MAX_HEADER) {
    MOERT_FAIL(st, "cannot write safetensors: the header would be %zu bytes (limit is %u)",
               hdr->len, MOERT_ST_MAX_HEADER);
    goto done;
  }
  ok = true;
done:
  free(names);
  return ok;
}

static void store_le64(unsigned char *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

bool moert_st_serialize(const moert_st_tensor *tensors, int n, const moert_kv *meta, int nmeta,
                        void **out, size_t *out_len, moert_status *st) {
  sbuf hdr = {0};
  if (!st_header(tensors, n, meta, nmeta, &hdr, st)) {
    free(hdr.p);
    return MOERT_UP(st);
  }
  size_t total = 8 + hdr.len;
  for (int i = 0; i < n; i++) {
    if (tensors[i].nbytes > SIZE_MAX - total) {
      free(hdr.p);
      return MOERT_FAIL(st, "cannot write safetensors: the tensors do not fit in memory");
    }
    total += tensors[i].nbytes;
  }
  unsigned char *buf = malloc(total);
  if (!buf) {
    free(hdr.p);
    return MOERT_FAIL(st, "cannot write safetensors: out of memory for %zu bytes", total);
  }
  store_le64(buf, hdr.len);
  memcpy(buf + 8, hdr.p, hdr.len);
  size_t o = 8 + hdr.len;
  for (int i = 0; i < n; i++) {
    if (tensors[i].nbytes) memcpy(buf + o, tensors[i].data, tensors[i].nbytes);
    o += tensors[i].nbytes;
  }
  free(hdr.p);
  *out = buf;
  *out_len = total;
  return true;
}

struct moert_st_file {
  unsigned char *buf; /* the whole file, owned */
  size_t len;
  char *pool;         /* decoded names and metadata */
  moert_st_tensor *t; /* in data order */
  int n;
  const moert_st_tensor **by_name; /* sorted by name, for find */
  moert_kv *meta;
  int nmeta;
};

/* One tensor entry as parsed, before the offsets are checked together. */
typedef struct st_entry {
  uint64_t begin, end;
  int index; /* in header order */
} st_entry;

static int cmp_entry(const void *a, const void *b) {
  const st_entry *x = a, *y = b;
  if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
  if (x->end != y->end) return x->end < y->end ? -1 : 1;
  return x->index - y->index;
}

static int cmp_tensor_name(const void *a, const void *b) {
  return strcmp((*(const moert_st_tensor *const *)a)->name,
                (*(const moert_st_tensor *const *)b)->name);
}

/* A non-negative integer value for field `field` of tensor `name`. */
static bool st_uint(jp *p, const char *name, const char *field, uint64_t *out) {
  int c = jp_peek(p);
  if (c != '-' && !(c >= '0' && c <= '9')) {
    if (jp_not_a_value(p, c)) return false;
    return MOERT_FAIL(p->st,
                      "%s: tensor `%s`: %s must hold non-negative integers, found %s at byte %zu",
                      p->what, show(name).s, field, jp_kind(c), p->pos);
  }
  jnum num;
  if (!jp_number(p, &num)) return false;
  if (!num.integer || num.negative || num.overflow || num.mag > (uint64_t)INT64_MAX)
    return MOERT_FAIL(
        p->st,
        "%s: tensor `%s`: %s must hold non-negative integers below 2^63, found `%.*s` at byte %zu",
        p->what, show(name).s, field, num.len > 40 ? 40 : (int)num.len, (const char *)p->s + num.at,
        num.at);
  *out = num.mag;
  return true;
}

/* An array of non-negative integers, at most `max` of them. */
static bool st_uint_array(jp *p, const char *name, const char *field, uint64_t *vals, int max,
                          int *count) {
  int c = jp_peek(p);
  if (c != '[') {
    if (jp_not_a_value(p, c)) return false;
    return MOERT_FAIL(p->st, "%s: tensor `%s`: %s must be an array, found %s at byte %zu", p->what,
                      show(name).s, field, jp_kind(c), p->pos);
  }
  p->pos++;
  bool first = true, end = false;
  int n = 0;
  for (;;) {
    if (!jp_element(p, &first, &end)) return false;
    if (end) break;
    if (n == max)
      return MOERT_FAIL(p->st, "%s: tensor `%s`: %s has more than %d entries", p->what,
                        show(name).s, field, max);
    if (!st_uint(p, name, field, &vals[n])) return false;
    n++;
  }
  *count = n;
  return true;
}

static bool st_dtype_of(const char *s, moert_st_dtype *out) {
  for (int i = 0; i < MOERT_ST_NDTYPES; i++)
    if (strcmp(s, dtypes[i].name) == 0) {
      *out = (moert_st_dtype)i;
      return true;
    }
  return false;
}

/* The object describing tensor `name`. */
static bool st_tensor_entry(jp *p, const char *name, moert_st_tensor *t, st_entry *e) {
  int c = jp_peek(p);
  if (c != '{') {
    if (jp_not_a_value(p, c)) return false;
    return MOERT_FAIL(p->st, "%s: tensor `%s` must be described by an object, found %s at byte %zu",
                      p->what, show(name).s, jp_kind(c), p->pos);
  }
  p->pos++;
  bool first = true, end = false, has_dtype = false, has_shape = false, has_offsets = false;
  const char *key;
  for (;;) {
    if (!jp_member(p, &first, &end, &key)) return false;
    if (end) break;
    if (strcmp(key, "dtype") == 0) {
      if (has_dtype)
        return MOERT_FAIL(p->st, "%s: tensor `%s` has `dtype` twice", p->what, show(name).s);
      has_dtype = true;
      c = jp_peek(p);
      if (c != '"') {
        if (jp_not_a_value(p, c)) return false;
        return MOERT_FAIL(p->st, "%s: tensor `%s`: dtype must be a string, found %s at byte %zu",
                          p->what, show(name).s, jp_kind(c), p->pos);
      }
      const char *dt;
      if (!jp_string(p, &dt)) return false;
      if (!st_dtype_of(dt, &t->dtype))
        return MOERT_FAIL(p->st,
                          "%s: tensor `%s` has unknown dtype `%s` (moec reads F64, F32, F16, BF16, "
                          "I64, I32, I16, I8, U64, U32, U16, U8, BOOL)",
                          p->what, show(name).s, show(dt).s);
    } else if (strcmp(key, "shape") == 0) {
      if (has_shape)
        return MOERT_FAIL(p->st, "%s: tensor `%s` has `shape` twice", p->what, show(name).s);
      has_shape = true;
      uint64_t dims[MOERT_ST_MAX_DIMS];
      if (!st_uint_array(p, name, "shape", dims, MOERT_ST_MAX_DIMS, &t->ndim)) return false;
      for (int i = 0; i < t->ndim; i++) t->shape[i] = (int64_t)dims[i];
    } else if (strcmp(key, "data_offsets") == 0) {
      if (has_offsets)
        return MOERT_FAIL(p->st, "%s: tensor `%s` has `data_offsets` twice", p->what, show(name).s);
      has_offsets = true;
      uint64_t off[2];
      int k = 0;
      if (!st_uint_array(p, name, "data_offsets", off, 2, &k)) return false;
      if (k != 2)
        return MOERT_FAIL(p->st,
                          "%s: tensor `%s`: data_offsets must be [begin, end], found %d entr%s",
                          p->what, show(name).s, k, k == 1 ? "y" : "ies");
      e->begin = off[0];
      e->end = off[1];
    } else {
      return MOERT_FAIL(
          p->st, "%s: tensor `%s` has unknown field `%s` (expected dtype, shape, data_offsets)",
          p->what, show(name).s, show(key).s);
    }
  }
  const char *missing = !has_dtype     ? "dtype"
                        : !has_shape   ? "shape"
                        : !has_offsets ? "data_offsets"
                                       : NULL;
  if (missing)
    return MOERT_FAIL(p->st, "%s: tensor `%s` has no `%s`", p->what, show(name).s, missing);
  return true;
}

static bool st_metadata(jp *p, sbuf *kvs, int *nmeta) {
  int c = jp_peek(p);
  if (c == 'n') return jp_literal(p, "null");
  if (c != '{') {
    if (jp_not_a_value(p, c)) return false;
    return MOERT_FAIL(p->st, "%s: __metadata__ must be an object of strings, found %s at byte %zu",
                      p->what, jp_kind(c), p->pos);
  }
  p->pos++;
  bool first = true, end = false;
  for (;;) {
    moert_kv kv;
    if (!jp_member(p, &first, &end, &kv.key)) return false;
    if (end) return true;
    c = jp_peek(p);
    if (c != '"') {
      if (jp_not_a_value(p, c)) return false;
      return MOERT_FAIL(p->st,
                        "%s: __metadata__ value for `%s` must be a string, found %s at byte %zu",
                        p->what, show(kv.key).s, jp_kind(c), p->pos);
    }
    if (!jp_string(p, &kv.value)) return false;
    sb_putn(kvs, (const char *)&kv, sizeof kv);
    if (kvs->oom) return MOERT_FAIL(p->st, "%s: out of memory", p->what);
    (*nmeta)++;
  }
}

void moert_st_destroy(moert_st_file *f) {
  if (!f) return;
  free(f->buf);
  free(f->pool);
  free(f->t);
  free(f->by_name);
  free(f->meta);
  free(f);
}

/* Parses f->buf[0..f->len); fills the rest of f. */
static bool st_parse(moert_st_file *f, const char *origin, moert_status *st) {
  char what[512];
  if (f->len < 8)
    return MOERT_FAIL(st,
                      "%s: %zu bytes is too short for a safetensors file (it starts with an 8-byte "
                      "header length)",
                      origin, f->len);
  uint64_t hlen = load_le64(f->buf);
  if (hlen > MOERT_ST_MAX_HEADER)
    return MOERT_FAIL(st,
                      "%s: header length %" PRIu64
                      " is absurd (limit is %u bytes): not a safetensors "
                      "file, or a damaged one",
                      origin, hlen, MOERT_ST_MAX_HEADER);
  if (hlen > f->len - 8)
    return MOERT_FAIL(st,
                      "%s: header length %" PRIu64
                      " runs past the end of the file (%zu bytes follow "
                      "the length field): the file is truncated or not safetensors",
                      origin, hlen, f->len - 8);
  const unsigned char *data = f->buf + 8 + hlen;
  uint64_t data_len = f->len - 8 - hlen;
  snprintf(what, sizeof what, "%s: header", origin);

  f->pool = malloc(hlen + 1);
  if (!f->pool)
    return MOERT_FAIL(st, "%s: out of memory for a %" PRIu64 "-byte header", origin, hlen);
  jp p = {.s = f->buf + 8, .len = hlen, .pool = f->pool, .what = what, .st = st};
  sbuf tensors = {0}, entries = {0}, kvs = {0};
  bool ok = false, seen_meta = false;
  int n = 0, nmeta = 0;

  int c = jp_peek(&p);
  if (c != '{') {
    if (c == -1)
      MOERT_FAIL(st, "%s: the header is empty (it must be a JSON object)", origin);
    else if (!jp_not_a_value(&p, c))
      MOERT_FAIL(st, "%s: the header must be a JSON object, found %s at byte %zu", origin,
                 jp_kind(c), p.pos);
    goto done;
  }
  p.pos++;
  bool first = true, end = false;
  for (;;) {
    const char *key;
    if (!jp_member(&p, &first, &end, &key)) goto done;
    if (end) break;
    if (strcmp(key, "__metadata__") == 0) {
      if (seen_meta) {
        MOERT_FAIL(st, "%s: __metadata__ appears twice", what);
        goto done;
      }
      seen_meta = true;
      if (!st_metadata(&p, &kvs, &nmeta)) goto done;
      continue;
    }
    if (!key[0]) {
      MOERT_FAIL(st, "%s: a tensor has an empty name (before byte %zu)", what, p.pos);
      goto done;
    }
    moert_st_tensor t = {.name = key};
    st_entry e = {.index = n};
    if (!st_tensor_entry(&p, key, &t, &e)) goto done;
    sb_putn(&tensors, (const char *)&t, sizeof t);
    sb_putn(&entries, (const char *)&e, sizeof e);
    if (tensors.oom || entries.oom) {
      MOERT_FAIL(st, "%s: out of memory", what);
      goto done;
    }
    n++;
  }
  if (!jp_finish(&p)) goto done;

  moert_st_tensor *tv = (moert_st_tensor *)tensors.p;
  st_entry *ev = (st_entry *)entries.p;
  /* Each tensor on its own: begin <= end, the span its shape needs, inside the data. */
  for (int i = 0; i < n; i++) {
    const moert_st_tensor *t = &tv[i];
    char shp[160];
    uint64_t need;
    if (ev[i].begin > ev[i].end) {
      MOERT_FAIL(st,
                 "%s: tensor `%s` has data_offsets [%" PRIu64 ", %" PRIu64
                 "]: the end is before the beginning",
                 origin, show(t->name).s, ev[i].begin, ev[i].end);
      goto done;
    }
    fmt_shape(shp, sizeof shp, t->shape, t->ndim);
    if (!shape_bytes(t->shape, t->ndim, t->dtype, &need)) {
      MOERT_FAIL(st, "%s: tensor `%s` has shape %s of %s, which is too large", origin,
                 show(t->name).s, shp, moert_st_dtype_name(t->dtype));
      goto done;
    }
    if (need != ev[i].end - ev[i].begin) {
      MOERT_FAIL(st,
                 "%s: tensor `%s` has data_offsets [%" PRIu64 ", %" PRIu64
                 "] but its shape %s of %s needs %" PRIu64 " bytes",
                 origin, show(t->name).s, ev[i].begin, ev[i].end, shp,
                 moert_st_dtype_name(t->dtype), need);
      goto done;
    }
    if (ev[i].end > data_len) {
      MOERT_FAIL(st,
                 "%s: tensor `%s` has data_offsets [%" PRIu64 ", %" PRIu64
                 "] but the file holds only %" PRIu64 " bytes of tensor data (truncated?)",
                 origin, show(t->name).s, ev[i].begin, ev[i].end, data_len);
      goto done;
    }
  }
  /* Together: sorted by offset, they tile [0, data_len) exactly. */
  if (n > 0) qsort(ev, (size_t)n, sizeof *ev, cmp_entry);
  uint64_t at = 0;
  for (int i = 0; i < n; i++) {
    const char *name = tv[ev[i].index].name;
    if (ev[i].begin > at) {
      if (i == 0)
        MOERT_FAIL(st,
                   "%s: bytes [0, %" PRIu64
                   ") of the tensor data belong to no tensor (the first, `%s`, starts at %" PRIu64
                   ")",
                   origin, ev[i].begin, show(name).s, ev[i].begin);
      else
        MOERT_FAIL(st,
                   "%s: bytes [%" PRIu64 ", %" PRIu64
                   ") of the tensor data, between tensors `%s` and `%s`, belong to no tensor",
                   origin, at, ev[i].begin, show(tv[ev[i - 1].index].name).s, show(name).s);
      goto done;
    }
    if (ev[i].begin < at) {
      const st_entry *q = &ev[i - 1];
      MOERT_FAIL(st,
                 "%s: tensors `%s` [%" PRIu64 ", %" PRIu64 "] and `%s` [%" PRIu64 ", %" PRIu64
                 "] overlap",
                 origin, show(tv[q->index].name).s, q->begin, q->end, show(name).s, ev[i].begin,
                 ev[i].end);
      goto done;
    }
    at = ev[i].end;
  }
  if (at != data_len) {
    MOERT_FAIL(st,
               "%s: the last %" PRIu64
               " bytes of the file belong to no tensor (the tensors cover %" PRIu64 " of %" PRIu64
               " bytes of data)",
               origin, data_len - at, at, data_len);
    goto done;
  }
  /* Names are unique (compared after decoding escapes). */
  f->t = malloc(sizeof *f->t * (size_t)n + 1);
  f->by_name = malloc(sizeof *f->by_name * (size_t)n + 1);
  if (!f->t || !f->by_name) {
    MOERT_FAIL(st, "%s: out of memory", origin);
    goto done;
  }
  for (int i = 0; i < n; i++) {
    f->t[i] = tv[ev[i].index];
    f->t[i].data = data + ev[i].begin;
    f->t[i].nbytes = (size_t)(ev[i].end - ev[i].begin);
    f->by_name[i] = &f->t[i];
  }
  if (n > 1) qsort(f->by_name, (size_t)n, sizeof *f->by_name, cmp_tensor_name);
  for (int i = 1; i < n; i++)
    if (strcmp(f->by_name[i - 1]->name, f->by_name[i]->name) == 0) {
      MOERT_FAIL(st, "%s: tensor `%s` appears twice in the header", origin,
                 show(f->by_name[i]->name).s);
      goto done;
    }
  f->n = n;
  const char *dup;
  const char **keys = malloc(sizeof *keys * (size_t)nmeta + 1);
  if (!keys) {
    MOERT_FAIL(st, "%s: out of memory", origin);
    goto done;
  }
  for (int i = 0; i < nmeta; i++) keys[i] = ((moert_kv *)kvs.p)[i].key;
  dup = find_duplicate(keys, nmeta);
  free(keys);
  if (dup) {
    MOERT_FAIL(st, "%s: __metadata__ has the key `%s` twice", origin, show(dup).s);
    goto done;
  }
  f->meta = (moert_kv *)kvs.p;
  kvs.p = NULL;
  f->nmeta = nmeta;
  ok = true;
done:
  free(tensors.p);
  free(entries.p);
  free(kvs.p);
  return ok;
}

/* Takes ownership of buf (malloc'd) in every case. */
static bool st_create_owned(unsigned char *buf, size_t len, const char *origin, moert_st_file **out,
                            moert_status *st) {
  moert_st_file *f = calloc(1, sizeof *f);
  if (!f) {
    free(buf);
    return MOERT_FAIL(st, "%s: out of memory", origin);
  }
  f->buf = buf;
  f->len = len;
  if (!st_parse(f, origin, st)) {
    moert_st_destroy(f);
    return MOERT_UP(st);
  }
  *out = f;
  return true;
}

bool moert_st_create(const void *buf, size_t len, const char *origin, moert_st_file **out,
                     moert_status *st) {
  if (!origin) origin = "safetensors data";
  unsigned char *copy = malloc(len ? len : 1);
  if (!copy) return MOERT_FAIL(st, "%s: out of memory for %zu bytes", origin, len);
  if (len) memcpy(copy, buf, len);
  MOERT_TRY(st, st_create_owned(copy, len, origin, out, st));
  return true;
}

int moert_st_count(const moert_st_file *f) { return f->n; }

const moert_st_tensor *moert_st_tensor_at(const moert_st_file *f, int i) {
  return i >= 0 && i < f->n ? &f->t[i] : NULL;
}

const moert_st_tensor *moert_st_find(const moert_st_file *f, const char *name) {
  if (!name || f->n == 0) return NULL;
  moert_st_tensor key = {.name = name};
  const moert_st_tensor *kp = &key;
  const moert_st_tensor **hit =
      bsearch(&kp, f->by_name, (size_t)f->n, sizeof *f->by_name, cmp_tensor_name);
  return hit ? *hit : NULL;
}

int moert_st_meta_count(const moert_st_file *f) { return f->nmeta; }

moert_kv moert_st_meta_at(const moert_st_file *f, int i) {
  moert_kv none = {NULL, NULL};
  return i >= 0 && i < f->nmeta ? f->meta[i] : none;
}

const char *moert_st_meta_get(const moert_st_file *f, const char *key) {
  for (int i = 0; i < f->nmeta; i++)
    if (strcmp(f->meta[i].key, key) == 0) return f->meta[i].value;
  return NULL;
}

/* ======================================================================== */
/* Files                                                                    */
/* ======================================================================== */

/* Limit on MANIFEST.json (a few bytes per file; this is far beyond any checkpoint). */
#define MANIFEST_MAX_BYTES (64u << 20)
#define MANIFEST_NAME "MANIFEST.json"
#define HASH_CHUNK (1u << 20)

typedef struct part {
  const void *p;
  size_t n;
} part;

static bool valid_file_name(const char *name) {
  size_t n = strlen(name);
  if (n == 0 || n > 255 || name[0] == '.') return false;
  for (size_t i = 0; i < n; i++) {
    char c = name[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
          c == '_' || c == '-'))
      return false;
  }
  return true;
}

static bool write_all(int fd, const void *buf, size_t n, const char *path, moert_status *st) {
  const char *p = buf;
  while (n > 0) {
    ssize_t k = write(fd, p, n);
    if (k < 0) {
      if (errno == EINTR) continue;
      return MOERT_FAIL(st, "cannot write `%s`: %s", path, strerror(errno));
    }
    p += k;
    n -= (size_t)k;
  }
  return true;
}

/* fsync of a directory, so a rename or a new entry in it is durable. Some file
 * systems cannot fsync a directory (EINVAL); that is not an error. */
static bool fsync_dir(const char *dir, moert_status *st) {
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    return MOERT_FAIL(st, "cannot open directory `%s` to sync it: %s", dir, strerror(errno));
  int rc = fsync(fd);
  int err = errno;
  close(fd);
  if (rc != 0 && err != EINVAL && err != ENOTSUP)
    return MOERT_FAIL(st, "cannot sync directory `%s`: %s", dir, strerror(err));
  return true;
}

/* dir/name.tmp <- parts, fsync, rename to dir/name, fsync dir. Returns the size and
 * the xxh64 of what was written. */
static bool atomic_write(const char *dir, const char *name, const part *parts, int nparts,
                         uint64_t *size, uint64_t *hash, moert_status *st) {
  if (!valid_file_name(name))
    return MOERT_FAIL(
        st,
        "cannot write `%s` in `%s`: a checkpoint file name is letters, digits, `.`, `_` "
        "and `-`, not starting with `.`",
        show(name).s, dir);
  char *final = path_join(dir, name);
  char *tmp = final ? str_cat(final, ".tmp") : NULL;
  if (!tmp) {
    free(final);
    return MOERT_FAIL(st, "out of memory");
  }
  bool ok = false;
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) {
    MOERT_FAIL(st, "cannot create `%s`: %s", tmp, strerror(errno));
    goto out;
  }
  XXH64_state_t *hs = XXH64_createState();
  if (!hs) {
    MOERT_FAIL(st, "out of memory");
    close(fd);
    unlink(tmp);
    goto out;
  }
  XXH64_reset(hs, 0);
  uint64_t total = 0;
  for (int i = 0; i < nparts; i++) {
    if (parts[i].n == 0) continue; /* p may be NULL */
    if (!write_all(fd, parts[i].p, parts[i].n, tmp, st)) {
      XXH64_freeState(hs);
      close(fd);
      unlink(tmp);
      goto out;
    }
    XXH64_update(hs, parts[i].p, parts[i].n);
    total += parts[i].n;
  }
  uint64_t digest = XXH64_digest(hs);
  XXH64_freeState(hs);
  if (fsync(fd) != 0) {
    MOERT_FAIL(st, "cannot sync `%s`: %s", tmp, strerror(errno));
    close(fd);
    unlink(tmp);
    goto out;
  }
  if (close(fd) != 0) {
    MOERT_FAIL(st, "cannot close `%s`: %s", tmp, strerror(errno));
    unlink(tmp);
    goto out;
  }
  if (rename(tmp, final) != 0) {
    MOERT_FAIL(st, "cannot rename `%s` to `%s`: %s", tmp, final, strerror(errno));
    unlink(tmp);
    goto out;
  }
  if (!fsync_dir(dir, st)) goto out;
  if (size) *size = total;
  if (hash) *hash = digest;
  ok = true;
out:
  free(tmp);
  free(final);
  return ok;
}

bool moert_ckpt_write_file(const char *dir, const char *name, const void *data, size_t len,
                           moert_status *st) {
  part pt = {data, len};
  MOERT_TRY(st, atomic_write(dir, name, &pt, 1, NULL, NULL, st));
  return true;
}

/* Opens a regular file for reading; *size from fstat. what/shown name the file in
 * messages ("checkpoint `d`: `model.safetensors`"). ENOENT reported by the caller. */
static int open_regular(const char *path, uint64_t *size, int *err) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    *err = errno;
    return -1;
  }
  struct stat sb;
  if (fstat(fd, &sb) != 0) {
    *err = errno;
    close(fd);
    return -1;
  }
  if (!S_ISREG(sb.st_mode)) {
    *err = EISDIR; /* reported as "not a regular file" */
    close(fd);
    return -1;
  }
  *size = (uint64_t)sb.st_size;
  return fd;
}

static bool read_exact(int fd, void *buf, size_t n, size_t *got, const char *path,
                       moert_status *st) {
  char *p = buf;
  size_t done = 0;
  while (done < n) {
    ssize_t k = read(fd, p + done, n - done);
    if (k < 0) {
      if (errno == EINTR) continue;
      return MOERT_FAIL(st, "cannot read `%s`: %s", path, strerror(errno));
    }
    if (k == 0) break;
    done += (size_t)k;
  }
  *got = done;
  return true;
}

/* Reads a whole regular file of at most max bytes into a malloc'd buffer. */
static bool read_whole(const char *path, uint64_t max, unsigned char **out, size_t *len,
                       moert_status *st) {
  uint64_t size;
  int err = 0;
  int fd = open_regular(path, &size, &err);
  if (fd < 0) {
    if (err == EISDIR) return MOERT_FAIL(st, "`%s` is not a regular file", path);
    return MOERT_FAIL(st, "cannot open `%s`: %s", path, strerror(err));
  }
  if (size > max || size > SIZE_MAX - 1) {
    close(fd);
    return MOERT_FAIL(st, "`%s` is %" PRIu64 " bytes, over the limit of %" PRIu64, path, size, max);
  }
  unsigned char *buf = malloc((size_t)size + 1);
  if (!buf) {
    close(fd);
    return MOERT_FAIL(st, "out of memory for `%s` (%" PRIu64 " bytes)", path, size);
  }
  size_t got = 0;
  bool ok = read_exact(fd, buf, (size_t)size + 1, &got, path, st);
  close(fd);
  if (ok && got != size) ok = MOERT_FAIL(st, "`%s` changed size while it was read", path);
  if (!ok) {
    free(buf);
    return MOERT_UP(st);
  }
  *out = buf;
  *len = got;
  return true;
}

bool moert_st_create_from_path(const char *path, moert_st_file **out, moert_status *st) {
  unsigned char *buf;
  size_t len;
  MOERT_TRY(st, read_whole(path, UINT64_MAX, &buf, &len, st));
  MOERT_TRY(st, st_create_owned(buf, len, path, out, st));
  return true;
}

/* Removes a directory's regular files and symbolic links, then the directory; a
 * path that is itself a symbolic link is unlinked, not followed. Subdirectories are
 * never entered: a directory holding one stays (returns false). */
static bool remove_flat_dir(const char *path) {
  struct stat lb;
  if (lstat(path, &lb) != 0) return errno == ENOENT;
  if (S_ISLNK(lb.st_mode)) return unlink(path) == 0; /* never empty what a link points to */
  DIR *d = opendir(path);
  if (!d) return errno == ENOENT;
  struct dirent *ent;
  while ((ent = readdir(d)) != NULL) {
    if (strcmp(ent->d_name, ".") == 0 || strcmp(ent->d_name, "..") == 0) continue;
    struct stat sb;
    if (fstatat(dirfd(d), ent->d_name, &sb, AT_SYMLINK_NOFOLLOW) != 0) continue;
    if (S_ISREG(sb.st_mode) || S_ISLNK(sb.st_mode)) unlinkat(dirfd(d), ent->d_name, 0);
  }
  closedir(d);
  return rmdir(path) == 0;
}

/* ======================================================================== */
/* Manifest                                                                 */
/* ======================================================================== */

typedef struct mfile {
  const char *name;
  uint64_t size, hash;
} mfile;

typedef struct manifest {
  char *text; /* the file, owned */
  char *pool; /* decoded strings, owned */
  int64_t step;
  moert_kv *meta;
  int nmeta;
  mfile *files;
  int nfiles;
} manifest;

static void manifest_free(manifest *m) {
  free(m->text);
  free(m->pool);
  free(m->meta);
  free(m->files);
  memset(m, 0, sizeof *m);
}

static bool parse_hex64(const char *s, uint64_t *out) {
  if (strlen(s) != 16) return false;
  uint64_t v = 0;
  for (int i = 0; i < 16; i++) {
    int h = hexval((unsigned char)s[i]);
    if (h < 0) return false;
    v = v << 4 | (uint64_t)h;
  }
  *out = v;
  return true;
}

static bool m_int(jp *p, const char *field, bool allow_negative, int64_t *sval, uint64_t *uval) {
  int c = jp_peek(p);
  if (c != '-' && !(c >= '0' && c <= '9')) {
    if (jp_not_a_value(p, c)) return false;
    return MOERT_FAIL(p->st, "%s: `%s` must be an integer, found %s at byte %zu", p->what, field,
                      jp_kind(c), p->pos);
  }
  jnum num;
  if (!jp_number(p, &num)) return false;
  bool ok = num.integer && !num.overflow && (allow_negative || !num.negative);
  if (ok && sval) {
    if (num.negative ? num.mag > (uint64_t)INT64_MAX + 1 : num.mag > (uint64_t)INT64_MAX)
      ok = false;
    else
      *sval = num.negative ? (int64_t)(0 - num.mag) : (int64_t)num.mag;
  }
  if (ok && uval) *uval = num.mag;
  if (!ok)
    return MOERT_FAIL(p->st,
                      "%s: `%s` must be %s integer that fits 64 bits, found `%.*s` at byte %zu",
                      p->what, field, allow_negative ? "an" : "a non-negative",
                      num.len > 40 ? 40 : (int)num.len, (const char *)p->s + num.at, num.at);
  return true;
}

static bool m_file_entry(jp *p, mfile *f) {
  int c = jp_peek(p);
  if (c != '{') {
    if (jp_not_a_value(p, c)) return false;
    return MOERT_FAIL(p->st, "%s: each entry of `files` must be an object, found %s at byte %zu",
                      p->what, jp_kind(c), p->pos);
  }
  size_t at = p->pos++;
  bool first = true, end = false, has_name = false, has_size = false, has_hash = false;
  const char *key;
  for (;;) {
    if (!jp_member(p, &first, &end, &key)) return false;
    if (end) break;
    if (strcmp(key, "name") == 0 && !has_name) {
      has_name = true;
      c = jp_peek(p);
      if (c != '"') {
        if (jp_not_a_value(p, c)) return false;
        return MOERT_FAIL(p->st, "%s: a file's `name` must be a string, found %s at byte %zu",
                          p->what, jp_kind(c), p->pos);
      }
      if (!jp_string(p, &f->name)) return false;
      if (!valid_file_name(f->name) || strcmp(f->name, MANIFEST_NAME) == 0)
        return MOERT_FAIL(
            p->st,
            "%s: `%s` is not a valid checkpoint file name (letters, digits, `.`, `_`, "
            "`-`; no `/`; not MANIFEST.json)",
            p->what, show(f->name).s);
    } else if (strcmp(key, "size") == 0 && !has_size) {
      has_size = true;
      if (!m_int(p, "size", false, NULL, &f->size)) return false;
    } else if (strcmp(key, "xxh64") == 0 && !has_hash) {
      has_hash = true;
      c = jp_peek(p);
      const char *hex = NULL;
      if (c != '"' || !jp_string(p, &hex) || !parse_hex64(hex, &f->hash)) {
        if (p->st->failed) return false;
        if (jp_not_a_value(p, c)) return false;
        return MOERT_FAIL(p->st,
                          "%s: a file's `xxh64` must be a string of 16 hex digits, found %s%s%s",
                          p->what, hex ? "`" : jp_kind(c), hex ? show(hex).s : "", hex ? "`" : "");
      }
    } else if (strcmp(key, "name") == 0 || strcmp(key, "size") == 0 || strcmp(key, "xxh64") == 0) {
      return MOERT_FAIL(p->st, "%s: a file entry has `%s` twice (at byte %zu)", p->what, key,
                        p->pos);
    } else if (!jp_skip(p, 2)) {
      return false;
    }
  }
  if (!has_name || !has_size || !has_hash)
    return MOERT_FAIL(p->st, "%s: the file entry at byte %zu has no `%s`", p->what, at,
                      !has_name   ? "name"
                      : !has_size ? "size"
                                  : "xxh64");
  return true;
}

/* Parses dir/MANIFEST.json. A missing manifest gets its own message. */
static bool manifest_load(const char *dir, manifest *m, moert_status *st) {
  memset(m, 0, sizeof *m);
  char *path = path_join(dir, MANIFEST_NAME);
  if (!path) return MOERT_FAIL(st, "out of memory");
  struct stat sb;
  if (stat(path, &sb) != 0 && errno == ENOENT) {
    MOERT_FAIL(st,
               "checkpoint `%s` has no MANIFEST.json: it was never committed (a crash while it was "
               "written?) or it is not a moec checkpoint",
               dir);
    free(path);
    return false;
  }
  unsigned char *text;
  size_t len;
  if (!read_whole(path, MANIFEST_MAX_BYTES, &text, &len, st)) {
    free(path);
    return MOERT_UP(st);
  }
  m->text = (char *)text;
  m->pool = malloc(len + 1);
  sbuf files = {0}, kvs = {0};
  bool ok = false, has_format = false, has_version = false, has_step = false, has_files = false,
       has_meta = false;
  jp p = {.s = text, .len = len, .pool = m->pool, .what = path, .st = st};
  if (!m->pool) {
    MOERT_FAIL(st, "out of memory");
    goto done;
  }
  int c = jp_peek(&p);
  if (c != '{') {
    if (jp_not_a_value(&p, c)) goto done;
    MOERT_FAIL(st, "%s: must be a JSON object, found %s", path, jp_kind(c));
    goto done;
  }
  p.pos++;
  bool first = true, end = false;
  for (;;) {
    const char *key;
    if (!jp_member(&p, &first, &end, &key)) goto done;
    if (end) break;
    bool *seen = strcmp(key, "format") == 0     ? &has_format
                 : strcmp(key, "version") == 0  ? &has_version
                 : strcmp(key, "step") == 0     ? &has_step
                 : strcmp(key, "files") == 0    ? &has_files
                 : strcmp(key, "metadata") == 0 ? &has_meta
                                                : NULL;
    if (seen && *seen) {
      MOERT_FAIL(st, "%s: `%s` appears twice", path, key);
      goto done;
    }
    if (seen) *seen = true;
    if (strcmp(key, "format") == 0) {
      const char *fmt = NULL;
      c = jp_peek(&p);
      if (c != '"' || !jp_string(&p, &fmt) || strcmp(fmt, "moec-checkpoint") != 0) {
        if (!st->failed)
          MOERT_FAIL(st, "%s: `format` is not \"moec-checkpoint\": not a moec checkpoint manifest",
                     path);
        goto done;
      }
    } else if (strcmp(key, "version") == 0) {
      int64_t v;
      if (!m_int(&p, "version", false, &v, NULL)) goto done;
      if (v != 1) {
        MOERT_FAIL(st, "%s: version %" PRId64 " (this moec reads version 1)", path, v);
        goto done;
      }
    } else if (strcmp(key, "step") == 0) {
      if (!m_int(&p, "step", true, &m->step, NULL)) goto done;
    } else if (strcmp(key, "metadata") == 0) {
      c = jp_peek(&p);
      if (c != '{') {
        if (jp_not_a_value(&p, c)) goto done;
        MOERT_FAIL(st, "%s: `metadata` must be an object of strings, found %s", path, jp_kind(c));
        goto done;
      }
      p.pos++;
      bool mfirst = true, mend = false;
      for (;;) {
        moert_kv kv;
        if (!jp_member(&p, &mfirst, &mend, &kv.key)) goto done;
        if (mend) break;
        c = jp_peek(&p);
        if (c != '"') {
          if (jp_not_a_value(&p, c)) goto done;
          MOERT_FAIL(st, "%s: metadata value for `%s` must be a string, found %s", path,
                     show(kv.key).s, jp_kind(c));
          goto done;
        }
        if (!jp_string(&p, &kv.value)) goto done;
        sb_putn(&kvs, (const char *)&kv, sizeof kv);
        m->nmeta++;
      }
    } else if (strcmp(key, "files") == 0) {
      c = jp_peek(&p);
      if (c != '[') {
        if (jp_not_a_value(&p, c)) goto done;
        MOERT_FAIL(st, "%s: `files` must be an array, found %s", path, jp_kind(c));
        goto done;
      }
      p.pos++;
      bool ffirst = true, fend = false;
      for (;;) {
        if (!jp_element(&p, &ffirst, &fend)) goto done;
        if (fend) break;
        mfile f = {0};
        if (!m_file_entry(&p, &f)) goto done;
        sb_putn(&files, (const char *)&f, sizeof f);
        m->nfiles++;
      }
    } else if (!jp_skip(&p, 1)) {
      goto done;
    }
    if (files.oom || kvs.oom) {
      MOERT_FAIL(st, "%s: out of memory", path);
      goto done;
    }
  }
  if (!jp_finish(&p)) goto done;
  if (!has_format || !has_version || !has_step || !has_files) {
    MOERT_FAIL(st, "%s: no `%s`", path,
               !has_format    ? "format"
               : !has_version ? "version"
               : !has_step    ? "step"
                              : "files");
    goto done;
  }
  m->files = (mfile *)files.p;
  m->meta = (moert_kv *)kvs.p;
  files.p = kvs.p = NULL;
  {
    int nn = m->nfiles > m->nmeta ? m->nfiles : m->nmeta;
    const char **names = malloc(sizeof *names * (size_t)nn + 1);
    if (!names) {
      MOERT_FAIL(st, "out of memory");
      goto done;
    }
    for (int i = 0; i < m->nfiles; i++) names[i] = m->files[i].name;
    const char *dup = find_duplicate(names, m->nfiles);
    if (dup) {
      free(names);
      MOERT_FAIL(st, "%s: the file `%s` is listed twice", path, show(dup).s);
      goto done;
    }
    for (int i = 0; i < m->nmeta; i++) names[i] = m->meta[i].key;
    dup = find_duplicate(names, m->nmeta);
    free(names);
    if (dup) {
      MOERT_FAIL(st, "%s: the metadata key `%s` appears twice", path, show(dup).s);
      goto done;
    }
  }
  ok = true;
done:
  free(files.p);
  free(kvs.p);
  free(path);
  if (!ok) {
    manifest_free(m);
    return MOERT_UP(st);
  }
  return true;
}

/* Checks one listed file: exists, size, hash. */
static bool check_file(const char *dir, const mfile *f, moert_status *st) {
  char *path = path_join(dir, f->name);
  if (!path) return MOERT_FAIL(st, "out of memory");
  uint64_t size;
  int err = 0;
  int fd = open_regular(path, &size, &err);
  bool ok = false;
  if (fd < 0) {
    if (err == ENOENT)
      MOERT_FAIL(st, "checkpoint `%s` is damaged: `%s` is listed in MANIFEST.json but missing", dir,
                 f->name);
    else if (err == EISDIR)
      MOERT_FAIL(st, "checkpoint `%s` is damaged: `%s` is not a regular file", dir, f->name);
    else
      MOERT_FAIL(st, "checkpoint `%s`: cannot open `%s`: %s", dir, f->name, strerror(err));
    goto out;
  }
  if (size != f->size) {
    MOERT_FAIL(st,
               "checkpoint `%s` is damaged: `%s` is %" PRIu64
               " bytes but MANIFEST.json lists %" PRIu64 " (truncated or replaced)",
               dir, f->name, size, f->size);
    close(fd);
    goto out;
  }
  unsigned char *buf = malloc(HASH_CHUNK);
  if (!buf) {
    close(fd);
    MOERT_FAIL(st, "out of memory");
    goto out;
  }
  XXH64_state_t *hs = XXH64_createState();
  if (!hs) {
    free(buf);
    close(fd);
    MOERT_FAIL(st, "out of memory");
    goto out;
  }
  XXH64_reset(hs, 0);
  uint64_t total = 0;
  for (;;) {
    size_t got = 0;
    if (!read_exact(fd, buf, HASH_CHUNK, &got, path, st)) break;
    XXH64_update(hs, buf, got);
    total += got;
    if (got < HASH_CHUNK) break;
  }
  uint64_t h = XXH64_digest(hs);
  XXH64_freeState(hs);
  free(buf);
  close(fd);
  if (st->failed) goto out;
  if (total != f->size) {
    MOERT_FAIL(st, "checkpoint `%s`: `%s` changed size while it was read", dir, f->name);
    goto out;
  }
  if (h != f->hash) {
    MOERT_FAIL(st,
               "checkpoint `%s` is damaged: `%s` has xxh64 %016" PRIx64
               " but MANIFEST.json lists %016" PRIx64
               " (its bytes changed after the checkpoint was written)",
               dir, f->name, h, f->hash);
    goto out;
  }
  ok = true;
out:
  free(path);
  return ok;
}

/* ======================================================================== */
/* Checkpoint directories                                                   */
/* ======================================================================== */

/* dir without trailing slashes (malloc'd), or NULL with a failure recorded. */
static char *norm_dir(const char *dir, moert_status *st) {
  if (!dir || !dir[0]) {
    MOERT_FAIL(st, "no checkpoint directory given");
    return NULL;
  }
  size_t n = strlen(dir);
  while (n > 1 && dir[n - 1] == '/') n--;
  char *d = malloc(n + 1);
  if (!d) {
    MOERT_FAIL(st, "out of memory");
    return NULL;
  }
  memcpy(d, dir, n);
  d[n] = '\0';
  if (strcmp(d, "/") == 0 || strcmp(d, ".") == 0 || strcmp(d, "..") == 0 ||
      (n >= 3 && strcmp(d + n - 3, "/..") == 0) || (n >= 2 && strcmp(d + n - 2, "/.") == 0)) {
    MOERT_FAIL(st, "`%s` cannot be a checkpoint directory (give it a name of its own)", dir);
    free(d);
    return NULL;
  }
  return d;
}

/* The parent of a normalized dir (malloc'd) and a pointer to its last component. */
static char *parent_of(const char *d, const char **base) {
  const char *slash = strrchr(d, '/');
  *base = slash ? slash + 1 : d;
  if (!slash) return str_dup(".");
  size_t n = slash == d ? 1 : (size_t)(slash - d);
  char *p = malloc(n + 1);
  if (!p) return NULL;
  memcpy(p, d, n);
  p[n] = '\0';
  return p;
}

/* 1 if path exists, 0 if not, -1 on another error (errno set). */
static int exists(const char *path, bool *is_dir) {
  struct stat sb;
  if (lstat(path, &sb) != 0) return errno == ENOENT ? 0 : -1;
  if (is_dir) {
    *is_dir = S_ISDIR(sb.st_mode);
    if (S_ISLNK(sb.st_mode)) {
      struct stat tb;
      *is_dir = stat(path, &tb) == 0 && S_ISDIR(tb.st_mode);
    }
  }
  return 1;
}

static bool verify_dir(const char *d, moert_status *st) {
  bool is_dir = false;
  int e = exists(d, &is_dir);
  if (e < 0) return MOERT_FAIL(st, "cannot look at `%s`: %s", d, strerror(errno));
  if (e == 0) return MOERT_FAIL(st, "checkpoint `%s` does not exist", d);
  if (!is_dir) return MOERT_FAIL(st, "checkpoint `%s` is not a directory", d);
  manifest m;
  MOERT_TRY(st, manifest_load(d, &m, st));
  for (int i = 0; i < m.nfiles; i++)
    if (!check_file(d, &m.files[i], st)) {
      manifest_free(&m);
      return MOERT_UP(st);
    }
  manifest_free(&m);
  return true;
}

static bool recover_norm(const char *d, moert_status *st) {
  char *old = str_cat(d, ".old");
  const char *base;
  char *parent = parent_of(d, &base);
  bool ok = false;
  if (!old || !parent) {
    MOERT_FAIL(st, "out of memory");
    goto out;
  }
  int have_dir = exists(d, NULL), have_old = exists(old, NULL);
  if (have_dir < 0 || have_old < 0) {
    MOERT_FAIL(st, "cannot look at `%s`: %s", have_dir < 0 ? d : old, strerror(errno));
    goto out;
  }
  if (have_old && !have_dir) {
    /* A crash between "rename dir -> dir.old" and "rename new -> dir". */
    if (rename(old, d) != 0) {
      MOERT_FAIL(
          st,
          "checkpoint `%s` is missing and `%s` holds the previous one, but it cannot be moved "
          "back: %s",
          d, old, strerror(errno));
      goto out;
    }
    if (!fsync_dir(parent, st)) goto out;
  } else if (have_old && have_dir) {
    /* A crash before dir.old was removed: remove it only if dir is good. */
    moert_status quiet = {0};
    if (verify_dir(d, &quiet) && remove_flat_dir(old)) fsync_dir(parent, &quiet);
  }
  ok = true;
out:
  free(old);
  free(parent);
  return ok;
}

bool moert_ckpt_recover(const char *dir, moert_status *st) {
  char *d = norm_dir(dir, st);
  if (!d) return MOERT_UP(st);
  bool ok = recover_norm(d, st);
  free(d);
  return ok ? true : MOERT_UP(st);
}

bool moert_ckpt_verify(const char *dir, moert_status *st) {
  char *d = norm_dir(dir, st);
  if (!d) return MOERT_UP(st);
  bool ok = recover_norm(d, st) && verify_dir(d, st);
  free(d);
  return ok ? true : MOERT_UP(st);
}

struct moert_ckpt_writer {
  char *dir;    /* normalized target */
  char *parent; /* its parent directory */
  char *tmp;    /* DIR.tmp-XXXXXX, where files go until commit */
  mfile *files;
  int nfiles, cap;
  bool committed;
};

void moert_ckpt_writer_destroy(moert_ckpt_writer *w) {
  if (!w) return;
  if (!w->committed && w->tmp) remove_flat_dir(w->tmp);
  for (int i = 0; i < w->nfiles; i++) free((char *)w->files[i].name);
  free(w->files);
  free(w->dir);
  free(w->parent);
  free(w->tmp);
  free(w);
}

/* Removes DIR.tmp-* siblings: temporary directories of writers that died. */
static void remove_stale_tmp(const char *parent, const char *base) {
  DIR *dp = opendir(parent);
  if (!dp) return;
  size_t nb = strlen(base);
  struct dirent *ent;
  while ((ent = readdir(dp)) != NULL) {
    if (strncmp(ent->d_name, base, nb) != 0 || strncmp(ent->d_name + nb, ".tmp-", 5) != 0) continue;
    struct stat sb;
    if (fstatat(dirfd(dp), ent->d_name, &sb, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISDIR(sb.st_mode))
      continue;
    char *path = path_join(parent, ent->d_name);
    if (path) remove_flat_dir(path);
    free(path);
  }
  closedir(dp);
}

/* Makes a fresh DIR.tmp-XXXXXX with mode 0777 less the umask, as any directory
 * the user makes (mkdtemp's 0700 would stay on the committed checkpoint). */
static char *make_tmp_dir(const char *d, moert_status *st) {
  static const char digits[] = "abcdefghijklmnopqrstuvwxyz0123456789";
  for (int attempt = 0; attempt < 100; attempt++) {
    struct timespec ts = {0};
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t seed[4] = {(uint64_t)getpid(), (uint64_t)ts.tv_sec, (uint64_t)ts.tv_nsec,
                        (uint64_t)attempt};
    uint64_t x = XXH64(seed, sizeof seed, (uint64_t)(uintptr_t)d);
    char suffix[7];
    for (int i = 0; i < 6; i++, x /= 36) suffix[i] = digits[x % 36];
    suffix[6] = '\0';
    char *p = malloc(strlen(d) + sizeof ".tmp-" + 6);
    if (!p) {
      MOERT_FAIL(st, "out of memory");
      return NULL;
    }
    sprintf(p, "%s.tmp-%s", d, suffix);
    if (mkdir(p, 0777) == 0) return p;
    int err = errno;
    free(p);
    if (err != EEXIST) {
      MOERT_FAIL(st, "cannot create a directory beside `%s` to write the checkpoint into: %s", d,
                 strerror(err));
      return NULL;
    }
  }
  MOERT_FAIL(st, "cannot find a free name for a directory beside `%s`", d);
  return NULL;
}

bool moert_ckpt_writer_create(const char *dir, unsigned flags, moert_ckpt_writer **out,
                              moert_status *st) {
  moert_ckpt_writer *w = calloc(1, sizeof *w);
  if (!w) return MOERT_FAIL(st, "out of memory");
  const char *base;
  w->dir = norm_dir(dir, st);
  if (!w->dir) goto fail;
  w->parent = parent_of(w->dir, &base);
  if (!w->parent) {
    MOERT_FAIL(st, "out of memory");
    goto fail;
  }
  bool parent_is_dir = false;
  if (exists(w->parent, &parent_is_dir) != 1 || !parent_is_dir) {
    MOERT_FAIL(st, "cannot write checkpoint `%s`: its parent directory `%s` does not exist", w->dir,
               w->parent);
    goto fail;
  }
  if (!recover_norm(w->dir, st)) goto fail;
  bool is_dir = false;
  int e = exists(w->dir, &is_dir);
  if (e < 0) {
    MOERT_FAIL(st, "cannot look at `%s`: %s", w->dir, strerror(errno));
    goto fail;
  }
  if (e == 1 && !is_dir) {
    MOERT_FAIL(st,
               "cannot write checkpoint `%s`: a file of that name exists and is not a directory",
               w->dir);
    goto fail;
  }
  if (e == 1 && !(flags & MOERT_CKPT_OVERWRITE_INVALID)) {
    moert_status why = {0};
    if (!verify_dir(w->dir, &why)) {
      MOERT_FAIL(
          st,
          "refusing to overwrite `%s`: it is not a valid checkpoint (%s); move it away, or ask "
          "to overwrite it (MOERT_CKPT_OVERWRITE_INVALID)",
          w->dir, why.msg);
      goto fail;
    }
  }
  remove_stale_tmp(w->parent, base);
  w->tmp = make_tmp_dir(w->dir, st);
  if (!w->tmp) goto fail;
  *out = w;
  return true;
fail:
  moert_ckpt_writer_destroy(w);
  return MOERT_UP(st);
}

/* Checks a name for add_*, writes the parts and records the file. */
static bool writer_add(moert_ckpt_writer *w, const char *name, const part *parts, int nparts,
                       moert_status *st) {
  if (w->committed) return MOERT_FAIL(st, "checkpoint `%s`: a file was added after commit", w->dir);
  if (!name || !valid_file_name(name) || strcmp(name, MANIFEST_NAME) == 0 ||
      (strlen(name) >= 4 && strcmp(name + strlen(name) - 4, ".tmp") == 0))
    return MOERT_FAIL(
        st,
        "checkpoint `%s`: `%s` is not a valid file name (letters, digits, `.`, `_`, `-`; "
        "not starting with `.`; not ending in .tmp; not MANIFEST.json)",
        w->dir, name ? show(name).s : "(null)");
  for (int i = 0; i < w->nfiles; i++)
    if (strcmp(w->files[i].name, name) == 0)
      return MOERT_FAIL(st, "checkpoint `%s`: the file `%s` was added twice", w->dir, name);
  if (w->nfiles == w->cap) {
    int cap = w->cap ? 2 * w->cap : 8;
    mfile *nf = realloc(w->files, sizeof *nf * (size_t)cap);
    if (!nf) return MOERT_FAIL(st, "out of memory");
    w->files = nf;
    w->cap = cap;
  }
  mfile f = {str_dup(name), 0, 0};
  if (!f.name) return MOERT_FAIL(st, "out of memory");
  if (!atomic_write(w->tmp, name, parts, nparts, &f.size, &f.hash, st)) {
    free((char *)f.name);
    return MOERT_UP(st);
  }
  w->files[w->nfiles++] = f;
  return true;
}

bool moert_ckpt_add_file(moert_ckpt_writer *w, const char *name, const void *data, size_t len,
                         moert_status *st) {
  part pt = {data, len};
  MOERT_TRY(st, writer_add(w, name, &pt, 1, st));
  return true;
}

bool moert_ckpt_add_safetensors(moert_ckpt_writer *w, const char *name,
                                const moert_st_tensor *tensors, int n, const moert_kv *meta,
                                int nmeta, moert_status *st) {
  sbuf hdr = {0};
  if (!st_header(tensors, n, meta, nmeta, &hdr, st)) {
    free(hdr.p);
    return MOERT_UP(st);
  }
  part *parts = malloc(sizeof *parts * ((size_t)n + 2));
  if (!parts) {
    free(hdr.p);
    return MOERT_FAIL(st, "out of memory");
  }
  unsigned char lenbuf[8];
  store_le64(lenbuf, hdr.len);
  parts[0] = (part){lenbuf, 8};
  parts[1] = (part){hdr.p, hdr.len};
  for (int i = 0; i < n; i++) parts[i + 2] = (part){tensors[i].data, tensors[i].nbytes};
  bool ok = writer_add(w, name, parts, n + 2, st);
  free(parts);
  free(hdr.p);
  return ok ? true : MOERT_UP(st);
}

bool moert_ckpt_commit(moert_ckpt_writer *w, int64_t step, const moert_kv *meta, int nmeta,
                       moert_status *st) {
  if (w->committed) return MOERT_FAIL(st, "checkpoint `%s` was already committed", w->dir);
  if (nmeta < 0 || (nmeta > 0 && !meta))
    return MOERT_FAIL(st, "checkpoint `%s`: invalid metadata", w->dir);
  for (int i = 0; i < nmeta; i++) {
    if (!meta[i].key || !meta[i].value || !utf8_valid(meta[i].key) || !utf8_valid(meta[i].value))
      return MOERT_FAIL(st, "checkpoint `%s`: metadata entry %d is NULL or not UTF-8", w->dir, i);
    for (int j = 0; j < i; j++)
      if (strcmp(meta[i].key, meta[j].key) == 0)
        return MOERT_FAIL(st, "checkpoint `%s`: metadata key `%s` given twice", w->dir,
                          show(meta[i].key).s);
  }
  sbuf m = {0};
  sb_printf(&m,
            "{\n  \"format\": \"moec-checkpoint\",\n  \"version\": 1,\n  \"step\": %" PRId64 ",\n",
            step);
  sb_puts(&m, "  \"metadata\": {");
  for (int i = 0; i < nmeta; i++) {
    sb_puts(&m, i ? ",\n    " : "\n    ");
    sb_json_str(&m, meta[i].key);
    sb_puts(&m, ": ");
    sb_json_str(&m, meta[i].value);
  }
  sb_puts(&m, nmeta ? "\n  },\n  \"files\": [" : "},\n  \"files\": [");
  for (int i = 0; i < w->nfiles; i++) {
    sb_puts(&m, i ? ",\n    {\"name\": " : "\n    {\"name\": ");
    sb_json_str(&m, w->files[i].name);
    sb_printf(&m, ", \"size\": %" PRIu64 ", \"xxh64\": \"%016" PRIx64 "\"}", w->files[i].size,
              w->files[i].hash);
  }
  sb_puts(&m, w->nfiles ? "\n  ]\n}\n" : "]\n}\n");
  if (m.oom) {
    free(m.p);
    return MOERT_FAIL(st, "out of memory writing the manifest of `%s`", w->dir);
  }
  part pt = {m.p, m.len};
  bool ok = atomic_write(w->tmp, MANIFEST_NAME, &pt, 1, NULL, NULL, st);
  free(m.p);
  if (!ok) return MOERT_UP(st);

  /* The swap. Before it: dir holds the old checkpoint (or nothing). */
  char *old = str_cat(w->dir, ".old");
  if (!old) return MOERT_FAIL(st, "out of memory");
  ok = false;
  int have_dir = exists(w->dir, NULL);
  if (have_dir < 0) {
    MOERT_FAIL(st, "cannot look at `%s`: %s", w->dir, strerror(errno));
    goto out;
  }
  if (have_dir) {
    if (exists(old, NULL) != 0 && !remove_flat_dir(old)) {
      MOERT_FAIL(st, "cannot replace checkpoint `%s`: `%s` is in the way and cannot be removed",
                 w->dir, old);
      goto out;
    }
    if (rename(w->dir, old) != 0) {
      MOERT_FAIL(st, "cannot move the previous checkpoint `%s` aside to `%s`: %s", w->dir, old,
                 strerror(errno));
      goto out;
    }
  }
  if (rename(w->tmp, w->dir) != 0) {
    int err = errno;
    if (have_dir) rename(old, w->dir); /* put the old one back */
    MOERT_FAIL(st, "cannot move the new checkpoint `%s` to `%s`: %s", w->tmp, w->dir,
               strerror(err));
    goto out;
  }
  w->committed = true;
  if (!fsync_dir(w->parent, st)) goto out;
  /* The new checkpoint is in place; failing to remove the old one is no failure
   * (recovery removes it later). */
  if (have_dir && remove_flat_dir(old)) {
    moert_status quiet = {0};
    fsync_dir(w->parent, &quiet);
  }
  ok = true;
out:
  free(old);
  return ok ? true : MOERT_UP(st);
}

struct moert_ckpt_reader {
  char *dir;
  manifest m;
};

bool moert_ckpt_reader_create(const char *dir, moert_ckpt_reader **out, moert_status *st) {
  moert_ckpt_reader *r = calloc(1, sizeof *r);
  if (!r) return MOERT_FAIL(st, "out of memory");
  r->dir = norm_dir(dir, st);
  if (!r->dir || !recover_norm(r->dir, st) || !verify_dir(r->dir, st) ||
      !manifest_load(r->dir, &r->m, st)) {
    moert_ckpt_reader_destroy(r);
    return MOERT_UP(st);
  }
  *out = r;
  return true;
}

void moert_ckpt_reader_destroy(moert_ckpt_reader *r) {
  if (!r) return;
  manifest_free(&r->m);
  free(r->dir);
  free(r);
}

int64_t moert_ckpt_step(const moert_ckpt_reader *r) { return r->m.step; }

const char *moert_ckpt_meta_get(const moert_ckpt_reader *r, const char *key) {
  for (int i = 0; i < r->m.nmeta; i++)
    if (strcmp(r->m.meta[i].key, key) == 0) return r->m.meta[i].value;
  return NULL;
}

int moert_ckpt_meta_count(const moert_ckpt_reader *r) { return r->m.nmeta; }

moert_kv moert_ckpt_meta_at(const moert_ckpt_reader *r, int i) {
  moert_kv none = {NULL, NULL};
  return i >= 0 && i < r->m.nmeta ? r->m.meta[i] : none;
}

int moert_ckpt_file_count(const moert_ckpt_reader *r) { return r->m.nfiles; }

const char *moert_ckpt_file_name(const moert_ckpt_reader *r, int i) {
  return i >= 0 && i < r->m.nfiles ? r->m.files[i].name : NULL;
}

bool moert_ckpt_read_file(const moert_ckpt_reader *r, const char *name, void **data, size_t *len,
                          moert_status *st) {
  const mfile *f = NULL;
  for (int i = 0; i < r->m.nfiles && name; i++)
    if (strcmp(r->m.files[i].name, name) == 0) f = &r->m.files[i];
  if (!f)
    return MOERT_FAIL(st, "checkpoint `%s` has no file `%s`", r->dir,
                      name ? show(name).s : "(null)");
  char *path = path_join(r->dir, name);
  if (!path) return MOERT_FAIL(st, "out of memory");
  uint64_t size;
  int err = 0;
  int fd = open_regular(path, &size, &err);
  if (fd < 0) {
    free(path);
    if (err == ENOENT)
      return MOERT_FAIL(st,
                        "checkpoint `%s` is damaged: `%s` is listed in MANIFEST.json but missing",
                        r->dir, name);
    if (err == EISDIR)
      return MOERT_FAIL(st, "checkpoint `%s` is damaged: `%s` is not a regular file", r->dir, name);
    return MOERT_FAIL(st, "checkpoint `%s`: cannot open `%s`: %s", r->dir, name, strerror(err));
  }
  if (size != f->size || size > SIZE_MAX - 1) {
    close(fd);
    free(path);
    return MOERT_FAIL(st,
                      "checkpoint `%s` is damaged: `%s` is %" PRIu64
                      " bytes but MANIFEST.json lists %" PRIu64 " (truncated or replaced)",
                      r->dir, name, size, f->size);
  }
  unsigned char *buf = malloc((size_t)size + 1);
  if (!buf) {
    close(fd);
    free(path);
    return MOERT_FAIL(st, "out of memory for `%s` of checkpoint `%s` (%" PRIu64 " bytes)", name,
                      r->dir, size);
  }
  size_t n = 0;
  bool ok = read_exact(fd, buf, (size_t)size + 1, &n, path, st);
  close(fd);
  free(path);
  if (!ok || n != size) {
    free(buf);
    if (!ok) return MOERT_UP(st);
    return MOERT_FAIL(st, "checkpoint `%s`: `%s` changed size while it was read", r->dir, name);
  }
  uint64_t h = XXH64(buf, n, 0);
  if (h != f->hash) {
    free(buf);
    return MOERT_FAIL(st,
                      "checkpoint `%s` is damaged: `%s` has xxh64 %016" PRIx64
                      " but MANIFEST.json lists %016" PRIx64,
                      r->dir, name, h, f->hash);
  }
  *data = buf;
  *len = n;
  return true;
}

bool moert_ckpt_read_safetensors(const moert_ckpt_reader *r, const char *name, moert_st_file **out,
                                 moert_status *st) {
  void *buf;
  size_t n;
  MOERT_TRY(st, moert_ckpt_read_file(r, name, &buf, &n, st));
  char *origin = path_join(r->dir, name);
  if (!origin) {
    free(buf);
    return MOERT_FAIL(st, "out of memory");
  }
  bool ok = st_create_owned(buf, n, origin, out, st);
  free(origin);
  return ok ? true : MOERT_UP(st);
}
