/* ckpt_json.c — the JSON of checkpoint files (safetensors headers, MANIFEST.json).
 *
 * Out: a growing string and moec's own string escaping, so the bytes written stay
 * exactly those of every checkpoint written so far. In: jansson (its integers are
 * 64-bit, which safetensors offsets need), with duplicate keys and \u0000 refused,
 * and its failures told in moec's words: what was expected, what was found, at
 * which byte. The meaning of the values (types, ranges, names) is checked by the
 * callers on jansson's tree. */
#define _POSIX_C_SOURCE 200809L
#include "ckpt_impl.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ======================================================================== */
/* Text out                                                                 */
/* ======================================================================== */

void moert_sb_putn(moert_sbuf *b, const char *s, size_t n) {
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

void moert_sb_puts(moert_sbuf *b, const char *s) { moert_sb_putn(b, s, strlen(s)); }

void moert_sb_printf(moert_sbuf *b, const char *fmt, ...) {
  char tmp[128];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
  va_end(ap);
  if (n < 0 || (size_t)n >= sizeof tmp) {
    b->oom = true; /* only used for numbers; never happens */
    return;
  }
  moert_sb_putn(b, tmp, (size_t)n);
}

void moert_sb_json_str(moert_sbuf *b, const char *s) {
  moert_sb_putn(b, "\"", 1);
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    if (*p == '"' || *p == '\\') {
      char e[2] = {'\\', (char)*p};
      moert_sb_putn(b, e, 2);
    } else if (*p < 0x20) {
      moert_sb_printf(b, "\\u%04x", *p);
    } else {
      moert_sb_putn(b, (const char *)p, 1);
    }
  }
  moert_sb_putn(b, "\"", 1);
}

/* ======================================================================== */
/* Text for messages                                                        */
/* ======================================================================== */

/* jansson's own check (json_string refuses what its reader would refuse), so what
 * the writer accepts is exactly what the reader reads back. */
bool moert_ckpt_utf8_valid(const char *s) {
  json_t *j = json_string(s);
  json_decref(j);
  return j != NULL;
}

moert_ckpt_shown moert_ckpt_show(const char *name) {
  moert_ckpt_shown out;
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

static int cmp_str_ptr(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

const char *moert_ckpt_find_duplicate(const char **names, int n) {
  if (n < 2) return NULL;
  qsort(names, (size_t)n, sizeof *names, cmp_str_ptr);
  for (int i = 1; i < n; i++)
    if (strcmp(names[i - 1], names[i]) == 0) return names[i];
  return NULL;
}

const char *moert_ckpt_json_kind(const json_t *v) {
  switch (json_typeof(v)) {
  case JSON_OBJECT: return "an object";
  case JSON_ARRAY: return "an array";
  case JSON_STRING: return "a string";
  case JSON_INTEGER:
  case JSON_REAL: return "a number";
  case JSON_TRUE:
  case JSON_FALSE: return "a boolean";
  case JSON_NULL: return "null";
  }
  return "something that is not JSON";
}

void moert_ckpt_json_num(const json_t *v, char *buf, size_t cap) {
  if (json_is_integer(v)) {
    snprintf(buf, cap, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
  } else if (json_is_real(v)) { /* as a real even when whole: 1e1 is `10.0`, not `10` */
    int k = snprintf(buf, cap, "%.17g", json_real_value(v));
    if (k > 0 && (size_t)k + 2 < cap && !strpbrk(buf, ".eEn")) strcat(buf, ".0");
  } else {
    snprintf(buf, cap, "%s", moert_ckpt_json_kind(v));
  }
}

/* ======================================================================== */
/* Text in: jansson, and its failures in moec's words                       */
/* ======================================================================== */

/* The JSON text of the token jansson stopped at, from its message ("... near 'TOK'");
 * NULL when the message names none (the end of the text, or a token longer than
 * jansson quotes). */
static const char *near_token(const char *text, char *buf, size_t cap) {
  const char *n = strstr(text, " near '");
  if (!n) return NULL;
  n += 7;
  size_t len = strlen(n);
  if (len == 0 || n[len - 1] != '\'' || len - 1 >= cap) return NULL;
  memcpy(buf, n, len - 1);
  buf[len - 1] = '\0';
  return buf;
}

/* "`TOK`" for a message, or "the end of the text". */
static void found_text(const char *tok, char *buf, size_t cap) {
  if (tok)
    snprintf(buf, cap, "`%s`", moert_ckpt_show(tok).s);
  else
    snprintf(buf, cap, "the end of the text");
}

/* Why jansson refused text[0..len) (its message e), in moec's words, and the byte
 * where it happened. jansson's messages are stable since its 2.0; one this table
 * does not know is passed on as it is. */
static void describe(const json_error_t *e, const unsigned char *text, size_t len, char *why,
                     size_t cap, size_t *at) {
  char tokbuf[32], found[112];
  const char *tok = near_token(e->text, tokbuf, sizeof tokbuf);
  size_t pos = e->position < 0 ? 0 : (size_t)e->position;
  if (pos > len) pos = len;
  /* jansson's position is after the token it stopped at; ours, its start. */
  *at = tok && strlen(tok) <= pos ? pos - strlen(tok) : pos;
  found_text(tok, found, sizeof found);
  const char *m = e->text;
  unsigned cp = 0, cp2 = 0;
#define STARTS(s) (strncmp(m, s, sizeof s - 1) == 0)
  if (STARTS("':' expected")) {
    snprintf(why, cap, "expected `:` after an object key, found %s", found);
  } else if (STARTS("'}' expected")) {
    snprintf(why, cap, "expected `,` or `}` in an object, found %s", found);
  } else if (STARTS("']' expected")) {
    snprintf(why, cap, "expected `,` or `]` in an array, found %s", found);
  } else if (STARTS("string or '}' expected")) {
    snprintf(why, cap, "expected a string key in an object, found %s", found);
  } else if (STARTS("end of file expected")) {
    snprintf(why, cap, "unexpected %s after the top-level object", found);
  } else if (STARTS("invalid token") || STARTS("unexpected token")) {
    snprintf(why, cap, "expected a value, found %s", found);
  } else if (STARTS("premature end of input")) { /* only inside a string */
    snprintf(why, cap, "the string that starts here is not closed");
  } else if (STARTS("unexpected newline")) {
    *at = pos;
    snprintf(why, cap, "raw control byte 0x0a in a string (JSON needs it escaped)");
  } else if (sscanf(m, "control character 0x%x", &cp) == 1) {
    *at = pos;
    snprintf(why, cap, "raw control byte 0x%02x in a string (JSON needs it escaped)", cp);
  } else if (STARTS("invalid escape")) {
    /* jansson stopped after the byte that broke the escape; find its backslash. */
    size_t b = pos;
    while (b > 0 && pos - b < 6 && text[b - 1] != '\\') b--;
    if (b > 0 && text[b - 1] == '\\') b--;
    *at = b;
    if (b + 1 < len && text[b] == '\\' && text[b + 1] == 'u')
      snprintf(why, cap, "\\u needs four hex digits");
    else
      snprintf(why, cap, "unknown escape \\%c in a string",
               b + 1 < len && text[b + 1] >= 0x21 && text[b + 1] < 0x7f ? text[b + 1] : '?');
  } else if (sscanf(m, "invalid Unicode '\\u%4x\\u%4x'", &cp, &cp2) >= 1) {
    if (cp >= 0xDC00 && cp <= 0xDFFF)
      snprintf(why, cap, "lone low surrogate \\u%04x", cp);
    else
      snprintf(why, cap, "high surrogate \\u%04x not followed by a low one", cp);
  } else if (STARTS("unable to decode byte")) {
    *at = pos;
    snprintf(why, cap, "invalid UTF-8");
  } else if (STARTS("\\u0000 is not allowed") || STARTS("NUL byte in object key")) {
    snprintf(why, cap, "\\u0000 in a string (moec's names cannot hold NUL)");
  } else if (STARTS("too big integer") || STARTS("too big negative integer")) {
    snprintf(why, cap, "the integer %s does not fit 64 bits (integers here are below 2^63)", found);
  } else if (STARTS("real number overflow")) {
    snprintf(why, cap, "the number %s is too large", found);
  } else if (STARTS("maximum parsing depth reached")) {
    snprintf(why, cap, "values nested too deep (jansson's limit is 2048)");
  } else {
    snprintf(why, cap, "%s", m);
  }
#undef STARTS
}

/* The decoded value of the JSON string text[b..e) (a new reference, or NULL). */
static json_t *decode_string(const unsigned char *text, size_t b, size_t e) {
  json_t *s = json_loadb((const char *)text + b, e - b, JSON_DECODE_ANY, NULL);
  if (s && !json_is_string(s)) {
    json_decref(s);
    s = NULL;
  }
  return s;
}

/* Context of a duplicate key that jansson reports at pos (just after the key's
 * closing quote): text[0..pos) is JSON jansson has accepted, so a scan that only
 * follows strings and brackets finds where the key sits. */
static void dup_context(const unsigned char *text, size_t pos, moert_json_dup *d) {
  int depth = 0;
  size_t outer_b = 0, outer_e = 0, key_b = 0, key_e = 0;
  for (size_t i = 0; i < pos; i++) {
    unsigned char c = text[i];
    if (c == '{' || c == '[') {
      depth++;
    } else if (c == '}' || c == ']') {
      depth--;
    } else if (c == '"') {
      size_t b = i++;
      while (i < pos && text[i] != '"') i += text[i] == '\\' ? 2 : 1;
      key_b = b, key_e = i + 1;
      size_t k = i + 1;
      while (k < pos && (text[k] == ' ' || text[k] == '\t' || text[k] == '\n' || text[k] == '\r'))
        k++;
      if (depth == 1 && k < pos && text[k] == ':') outer_b = key_b, outer_e = key_e;
    }
  }
  d->depth = depth;
  d->at = key_b;
  d->key = key_e > key_b ? decode_string(text, key_b, key_e) : NULL;
  d->outer = depth > 1 && outer_e > outer_b ? decode_string(text, outer_b, outer_e) : NULL;
}

json_t *moert_ckpt_json_load(const void *text, size_t len, const char *what, moert_json_dup *dup,
                             moert_status *st) {
  const unsigned char *t = text;
  /* No JSON text holds a raw NUL byte (in a string it must be escaped); jansson
   * would skip one that follows a number, so they are refused here. */
  const unsigned char *nul = memchr(t, 0, len);
  if (nul) {
    MOERT_FAIL(st, "%s is not valid JSON: a NUL byte at byte %zu (JSON text cannot hold one)", what,
               (size_t)(nul - t));
    return NULL;
  }
  json_error_t e;
  json_t *v = json_loadb(text, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &e);
  if (v) return v;
  if (json_error_code(&e) == json_error_out_of_memory) {
    MOERT_FAIL(st, "%s: out of memory", what);
    return NULL;
  }
  if (json_error_code(&e) == json_error_duplicate_key) {
    moert_json_dup d = {0};
    dup_context(t, e.position < 0 ? 0 : (size_t)e.position, &d);
    if (dup) {
      *dup = d;
      return NULL;
    }
    MOERT_FAIL(st, "%s: the key `%s` appears twice in one object (at byte %zu)", what,
               moert_ckpt_show(moert_json_dup_text(d.key)).s, d.at);
    moert_json_dup_clear(&d);
    return NULL;
  }
  char why[256];
  size_t at = 0;
  describe(&e, t, len, why, sizeof why, &at);
  MOERT_FAIL(st, "%s is not valid JSON: %s at byte %zu", what, why, at);
  return NULL;
}

void moert_json_dup_clear(moert_json_dup *d) {
  json_decref(d->key);
  json_decref(d->outer);
  memset(d, 0, sizeof *d);
}

const char *moert_json_dup_text(const json_t *s) {
  const char *v = s ? json_string_value(s) : NULL;
  return v ? v : "";
}
