/* fuzz_check.c — the property of fuzz_check.h: the front end on any bytes,
 * diagnostics printed into memory, and the print round trip of clean specs. */
#include "fuzz_check.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "front.h"

/* What a failure report shows of each text: enough to see the problem, not
 * megabytes of a huge mutant. */
#define DUMP_LIMIT 8192

/* A FILE* that writes into a growing buffer (open_memstream), so printing code
 * runs for real and its output can be checked. */
typedef struct memout {
  char *buf;
  size_t len;
  FILE *f;
} memout;

static void mem_open(memout *m) {
  m->buf = NULL;
  m->len = 0;
  m->f = open_memstream(&m->buf, &m->len);
  if (!m->f) {
    perror("fuzz: open_memstream");
    abort();
  }
}

/* Closes the stream; m->buf and m->len then hold the text (free m->buf). */
static void mem_close(memout *m) {
  if (fclose(m->f) != 0) {
    perror("fuzz: fclose(memstream)");
    abort();
  }
  m->f = NULL;
}

/* Everything a failure report shows. */
typedef struct report {
  const uint8_t *input;
  size_t input_len;
  const char *diags, *printed, *reprinted, *rediags;
  size_t diags_len, printed_len, reprinted_len, rediags_len;
} report;

static void dump(const char *title, const void *p, size_t n) {
  if (!p) return;
  const unsigned char *s = p;
  fprintf(stderr, "---- %s (%zu bytes%s) ----\n", title, n, n > DUMP_LIMIT ? ", cut" : "");
  for (size_t i = 0; i < n && i < DUMP_LIMIT; i++) {
    unsigned c = s[i];
    if (c == '\n' || (c >= 0x20 && c < 0x7f && c != '\\')) fputc((int)c, stderr);
    else fprintf(stderr, "\\x%02x", c);
  }
  fputs("\n----\n", stderr);
}

static _Noreturn void fail(const report *r, const char *what) {
  fprintf(stderr, "fuzz: PROPERTY VIOLATED: %s\n", what);
  dump("input (non-printable bytes and \\ as \\xNN)", r->input, r->input_len);
  dump("diagnostics on the input", r->diags, r->diags_len);
  dump("normal form (moec_spec_print)", r->printed, r->printed_len);
  dump("diagnostics on the normal form", r->rediags, r->rediags_len);
  dump("normal form printed again", r->reprinted, r->reprinted_len);
  fflush(stderr);
  abort();
}

/* Offset of the first byte that is not part of valid UTF-8 (strict: no
 * overlong forms, surrogates or code points past U+10FFFF), or n. */
static size_t utf8_bad(const unsigned char *s, size_t n) {
  for (size_t i = 0; i < n;) {
    unsigned c = s[i];
    if (c < 0x80) { i++; continue; }
    size_t k;
    unsigned cp;
    if (c >= 0xC2 && c <= 0xDF) { k = 2; cp = c & 0x1F; }
    else if (c >= 0xE0 && c <= 0xEF) { k = 3; cp = c & 0x0F; }
    else if (c >= 0xF0 && c <= 0xF4) { k = 4; cp = c & 0x07; }
    else return i;
    if (i + k > n) return i;
    for (size_t j = 1; j < k; j++) {
      if ((s[i + j] & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (s[i + j] & 0x3F);
    }
    if ((k == 3 && cp < 0x800) || (k == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF))
      return i;
    i += k;
  }
  return n;
}

/* Printed diagnostics: text for a terminal, every odd byte escaped. */
static void check_diag_text(const report *r, const char *text, size_t n) {
  static char msg[160];
  const unsigned char *s = (const unsigned char *)text;
  for (size_t i = 0; i < n; i++)
    if ((s[i] < 0x20 && s[i] != '\n' && s[i] != '\t') || s[i] == 0x7f) {
      snprintf(msg, sizeof msg, "raw control byte \\x%02x at offset %zu of the printed diagnostics",
               s[i], i);
      fail(r, msg);
    }
  size_t bad = utf8_bad(s, n);
  if (bad < n) {
    snprintf(msg, sizeof msg, "invalid UTF-8 byte \\x%02x at offset %zu of the printed diagnostics",
             s[bad], bad);
    fail(r, msg);
  }
}

/* The list itself: counts within the limit, locations inside the source. */
static void check_diag_list(const report *r, const moec_diags *d, size_t src_len) {
  static char msg[200];
  if (d->nerrors > MOEC_MAX_ERRORS) {
    snprintf(msg, sizeof msg, "%d errors reported (limit is %d)", d->nerrors, MOEC_MAX_ERRORS);
    fail(r, msg);
  }
  int errors = 0;
  for (const moec_diag *x = d->head; x; x = x->next) {
    if (!x->msg) fail(r, "a diagnostic without a message");
    errors += x->sev == MOEC_SEV_ERROR;
    if (!x->loc.src) continue;
    if (x->loc.src->len != src_len || x->loc.start > x->loc.end || x->loc.end > src_len) {
      snprintf(msg, sizeof msg, "diagnostic \"%.80s\" at bytes [%zu, %zu) of a %zu-byte source",
               x->msg, x->loc.start, x->loc.end, src_len);
      fail(r, msg);
    }
  }
  /* the "too many errors" line is listed but not counted */
  if (errors != d->nerrors + (d->stopped ? 1 : 0)) {
    snprintf(msg, sizeof msg, "%d errors listed but nerrors is %d%s", errors, d->nerrors,
             d->stopped ? " (and the limit was reached)" : "");
    fail(r, msg);
  }
}

moec_fuzz_result moec_fuzz_check(const uint8_t *data, size_t size) {
  report r = {.input = data, .input_len = size};
  moec_fuzz_result res = {0};

  moec_arena *a = moec_arena_create();
  moec_diags d;
  moec_diags_init(&d, a);
  moec_spec *s = moec_front_buffer(a, &d, "fuzz.moe", (const char *)data, size);
  memout dm;
  mem_open(&dm);
  moec_diags_print(&d, dm.f);
  mem_close(&dm);
  r.diags = dm.buf;
  r.diags_len = dm.len;
  res.nerrors = d.nerrors;
  res.nwarnings = d.nwarnings;

  check_diag_list(&r, &d, size);
  check_diag_text(&r, dm.buf, dm.len);
  if (!s && d.nerrors == 0) fail(&r, "no spec returned, but no error reported");
  if (s && d.nerrors > 0) fail(&r, "a spec returned despite errors");

  if (s) {
    memout p1, sum1;
    mem_open(&p1);
    moec_spec_print(s, p1.f);
    mem_close(&p1);
    mem_open(&sum1);
    moec_spec_summary(s, sum1.f);
    mem_close(&sum1);
    r.printed = p1.buf;
    r.printed_len = p1.len;

    moec_arena *a2 = moec_arena_create();
    moec_diags d2;
    moec_diags_init(&d2, a2);
    moec_spec *s2 = moec_front_buffer(a2, &d2, "normal.moe", p1.buf, p1.len);
    memout dm2;
    mem_open(&dm2);
    moec_diags_print(&d2, dm2.f);
    mem_close(&dm2);
    r.rediags = dm2.buf;
    r.rediags_len = dm2.len;
    check_diag_list(&r, &d2, p1.len);
    if (!s2) fail(&r, "the normal form of a clean spec does not check clean");
    if (d2.nwarnings > d.nwarnings) fail(&r, "the normal form has more warnings than the input");

    memout p2, sum2;
    mem_open(&p2);
    moec_spec_print(s2, p2.f);
    mem_close(&p2);
    r.reprinted = p2.buf;
    r.reprinted_len = p2.len;
    if (p2.len != p1.len || memcmp(p1.buf, p2.buf, p1.len) != 0)
      fail(&r, "the normal form prints differently the second time");
    mem_open(&sum2);
    moec_spec_summary(s2, sum2.f);
    mem_close(&sum2);
    if (sum2.len != sum1.len || memcmp(sum1.buf, sum2.buf, sum1.len) != 0) {
      dump("summary of the input", sum1.buf, sum1.len);
      dump("summary of the normal form", sum2.buf, sum2.len);
      fail(&r, "the normal form has a different summary");
    }
    res.clean = true;

    free(sum2.buf);
    free(p2.buf);
    free(dm2.buf);
    moec_arena_destroy(a2);
    free(sum1.buf);
    free(p1.buf);
  }
  free(dm.buf);
  moec_arena_destroy(a);
  return res;
}
