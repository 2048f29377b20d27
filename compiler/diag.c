/* diag.c — diagnostics; see diag.h. */
#include "diag.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Echoed source lines are cut to a window around the caret: a 10 MB line must
 * not reach the terminal. */
#define ECHO_WINDOW 120

void moec_diags_init(moec_diags *d, moec_arena *arena) {
  memset(d, 0, sizeof *d);
  d->arena = arena;
}

static void add(moec_diags *d, moec_severity sev, moec_loc loc, bool whole,
                const char *fmt, va_list ap) {
  if (d->stopped) return;
  /* Warnings are capped like errors: a machine-made file can hold millions,
   * and each one echoes its line. Notes go with what they annotate. */
  if (sev == MOEC_SEV_NOTE && d->dropping) return;
  d->dropping = false;
  if (sev == MOEC_SEV_WARNING && d->nwarnings >= MOEC_MAX_ERRORS) {
    d->nwarnings++;
    d->dropping = true;
    if (d->nwarnings == MOEC_MAX_ERRORS + 1) {
      moec_diag *x = MOEC_NEW(d->arena, moec_diag);
      x->sev = MOEC_SEV_NOTE;
      x->loc.src = loc.src;
      x->whole_file = true;
      x->msg = moec_arena_printf(d->arena, "further warnings are not shown (limit is %d)",
                                 MOEC_MAX_ERRORS);
      if (d->tail) d->tail->next = x; else d->head = x;
      d->tail = x;
    }
    return;
  }
  if (sev == MOEC_SEV_ERROR && d->nerrors == MOEC_MAX_ERRORS) {
    d->stopped = true;
    moec_diag *x = MOEC_NEW(d->arena, moec_diag);
    x->sev = MOEC_SEV_ERROR;
    x->loc.src = loc.src;
    x->whole_file = true;
    x->msg = moec_arena_printf(d->arena, "too many errors (limit is %d); stopping now",
                               MOEC_MAX_ERRORS);
    if (d->tail) d->tail->next = x; else d->head = x;
    d->tail = x;
    return;
  }
  va_list cp;
  va_copy(cp, ap);
  int n = vsnprintf(NULL, 0, fmt, cp);
  va_end(cp);
  char *msg = moec_arena_alloc(d->arena, (size_t)(n < 0 ? 0 : n) + 1);
  vsnprintf(msg, (size_t)(n < 0 ? 0 : n) + 1, fmt, ap);
  moec_diag *x = MOEC_NEW(d->arena, moec_diag);
  x->sev = sev;
  x->loc = loc;
  x->whole_file = whole;
  x->msg = msg;
  if (d->tail) d->tail->next = x; else d->head = x;
  d->tail = x;
  if (sev == MOEC_SEV_ERROR) d->nerrors++;
  if (sev == MOEC_SEV_WARNING) d->nwarnings++;
}

#define DEFINE_ADD(fn, sev)                                           \
  void fn(moec_diags *d, moec_loc loc, const char *fmt, ...) {        \
    va_list ap;                                                       \
    va_start(ap, fmt);                                                \
    add(d, sev, loc, false, fmt, ap);                                 \
    va_end(ap);                                                       \
  }
DEFINE_ADD(moec_error, MOEC_SEV_ERROR)
DEFINE_ADD(moec_warning, MOEC_SEV_WARNING)
DEFINE_ADD(moec_note, MOEC_SEV_NOTE)

void moec_error_at_byte(moec_diags *d, moec_loc loc, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  add(d, MOEC_SEV_ERROR, loc, false, fmt, ap);
  va_end(ap);
  if (d->tail && d->tail->loc.src == loc.src) d->tail->no_snippet = true;
}

void moec_file_error(moec_diags *d, const moec_source *src, const char *fmt, ...) {
  moec_loc loc = {src, 0, 0};
  va_list ap;
  va_start(ap, fmt);
  add(d, MOEC_SEV_ERROR, loc, true, fmt, ap);
  va_end(ap);
}

static void build_lines(moec_source *src) {
  if (src->line_starts) return;
  size_t n = 1;
  for (size_t i = 0; i < src->len; i++) n += src->text[i] == '\n';
  src->line_starts = MOEC_NEW_ARRAY(src->arena, size_t, n);
  size_t k = 0;
  src->line_starts[k++] = 0;
  for (size_t i = 0; i < src->len; i++)
    if (src->text[i] == '\n') src->line_starts[k++] = i + 1;
  src->nlines = n;
}

/* Number of bytes in the UTF-8 sequence starting at p (1 for ASCII or for any
 * byte that does not start a valid sequence: such bytes are shown escaped, one
 * at a time). As strict as the loader (source.c): overlong forms, surrogates
 * and code points past U+10FFFF are not valid, so they are never echoed raw. */
static size_t utf8_len(const unsigned char *p, size_t avail) {
  unsigned c = p[0];
  size_t n = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 1;
  if (n == 1 || n > avail) return 1;
  for (size_t i = 1; i < n; i++)
    if ((p[i] & 0xC0) != 0x80) return 1;
  unsigned c1 = p[1];
  if (c == 0xE0 && c1 < 0xA0) return 1; /* overlong */
  if (c == 0xED && c1 >= 0xA0) return 1; /* surrogate */
  if (c == 0xF0 && c1 < 0x90) return 1; /* overlong */
  if (c == 0xF4 && c1 >= 0x90) return 1; /* past U+10FFFF */
  return n;
}

void moec_source_linecol(moec_source *src, size_t off, size_t *line, size_t *col) {
  build_lines(src);
  size_t lo = 0, hi = src->nlines;
  while (hi - lo > 1) {
    size_t mid = lo + (hi - lo) / 2;
    if (src->line_starts[mid] <= off) lo = mid; else hi = mid;
  }
  *line = lo + 1;
  size_t c = 1;
  const unsigned char *t = (const unsigned char *)src->text;
  for (size_t i = src->line_starts[lo]; i < off && i < src->len;) {
    i += utf8_len(t + i, src->len - i);
    c++;
  }
  *col = c;
}

/* Width on screen of the character at p as echoed: escaped bytes take 4. */
static int echo_char(const unsigned char *p, size_t avail, size_t *adv, char *out) {
  size_t n = utf8_len(p, avail);
  *adv = n;
  if (n == 1 && (p[0] < 0x20 || p[0] == 0x7f || p[0] >= 0x80) && p[0] != '\t') {
    snprintf(out, 5, "\\x%02x", p[0]);
    return 4;
  }
  memcpy(out, p, n);
  out[n] = 0;
  return 1;
}

static void print_snippet(FILE *out, moec_source *src, size_t start, size_t end) {
  size_t line, col;
  moec_source_linecol(src, start, &line, &col);
  size_t ls = src->line_starts[line - 1];
  size_t le = ls;
  while (le < src->len && src->text[le] != '\n') le++;
  if (end > le) end = le;
  if (end <= start) end = start + 1; /* at least a caret (also at end of line) */

  /* Window: start a bit before the caret on very long lines. */
  const unsigned char *t = (const unsigned char *)src->text;
  size_t from = ls;
  size_t line_chars = 0;
  for (size_t i = ls; i < le && line_chars <= ECHO_WINDOW; line_chars++) i += utf8_len(t + i, src->len - i);
  if (line_chars > ECHO_WINDOW && col > ECHO_WINDOW / 2) {
    size_t skip = col - ECHO_WINDOW / 2;
    for (size_t i = 0; i < skip && from < start; i++) from += utf8_len(t + from, src->len - from);
  }
  bool cut_left = from > ls;
  size_t shown = 0;

  /* the gutter is 5 wide, wider for a line number past 99999 */
  int gutter = snprintf(NULL, 0, "%zu", line);
  if (gutter < 5) gutter = 5;
  fprintf(out, "%*zu | %s", gutter, line, cut_left ? "..." : "");
  /* caret line is built beside the echo */
  size_t cap = (size_t)ECHO_WINDOW * 4 + 16;
  char *caret = malloc(cap);
  if (!caret) abort();
  size_t ck = 0;
  if (cut_left) { memcpy(caret, "   ", 3); ck = 3; }
  bool cut_right = false;
  size_t i = from;
  for (; i < le; ) {
    if (shown >= ECHO_WINDOW) { cut_right = true; break; }
    char buf[8];
    size_t adv;
    int w = echo_char(t + i, src->len - i, &adv, buf);
    fputs(buf, out);
    char mark = ' ';
    if (i >= start && i < end) mark = i == start ? '^' : '~';
    if (t[i] == '\t' && mark == ' ') mark = '\t';
    for (int k = 0; k < w && ck + 1 < cap; k++) caret[ck++] = (k == 0 || mark != '^') ? mark : '~';
    i += adv;
    shown++;
  }
  if (cut_right) fputs("...", out);
  if (start >= le && ck + 1 < cap) caret[ck++] = '^'; /* error at end of line or file */
  while (ck > 0 && caret[ck - 1] == ' ') ck--;
  caret[ck] = 0;
  fprintf(out, "\n%*s | %s\n", gutter, "", caret);
  free(caret);
}

/* A diagnostic with the notes that follow it, for sorting. */
typedef struct group {
  const moec_diag *first;
  size_t key, seq;
} group;

static int by_position(const void *a, const void *b) {
  const group *x = a, *y = b;
  if (x->key != y->key) return x->key < y->key ? -1 : 1;
  return x->seq < y->seq ? -1 : x->seq > y->seq;
}

void moec_diags_print(const moec_diags *d, FILE *out) {
  static const char *const names[] = {"error", "warning", "note"};
  /* Printed in source order (the order a reader meets them), each error or
   * warning followed by its notes; whole-file messages last. */
  size_t n = 0;
  for (const moec_diag *x = d->head; x; x = x->next) n++; /* at most one group each */
  if (n == 0) return; /* (qsort and malloc want a non-empty array) */
  group *g = malloc(n * sizeof *g);
  if (!g) abort();
  size_t k = 0;
  for (const moec_diag *x = d->head; x; x = x->next) {
    if (x->sev == MOEC_SEV_NOTE && k > 0) continue;
    g[k].first = x;
    g[k].key = x->whole_file || !x->loc.src ? SIZE_MAX : x->loc.start;
    g[k].seq = k;
    k++;
  }
  qsort(g, k, sizeof *g, by_position);
  for (size_t i = 0; i < k; i++)
  for (const moec_diag *x = g[i].first; x && (x == g[i].first || x->sev == MOEC_SEV_NOTE); x = x->next) {
    moec_source *src = (moec_source *)x->loc.src;
    if (!src) {
      fprintf(out, "moec: %s: %s\n", names[x->sev], x->msg);
    } else if (x->whole_file) {
      fprintf(out, "%s: %s: %s\n", src->name, names[x->sev], x->msg);
    } else {
      size_t line, col;
      moec_source_linecol(src, x->loc.start, &line, &col);
      fprintf(out, "%s:%zu:%zu: %s: %s\n", src->name, line, col, names[x->sev], x->msg);
      if (!x->no_snippet) print_snippet(out, src, x->loc.start, x->loc.end);
    }
  }
  free(g);
}

const char *moec_quote(moec_arena *a, const char *s, size_t n) {
  enum { MAXCHARS = 40 };
  char *out = moec_arena_alloc(a, MAXCHARS * 4 + 8);
  size_t k = 0, chars = 0;
  const unsigned char *p = (const unsigned char *)s;
  for (size_t i = 0; i < n;) {
    if (chars == MAXCHARS) { memcpy(out + k, "...", 4); return out; }
    char buf[8];
    size_t adv;
    echo_char(p + i, n - i, &adv, buf);
    if (p[i] == '\t') strcpy(buf, "\\t");
    size_t bl = strlen(buf);
    memcpy(out + k, buf, bl);
    k += bl;
    i += adv;
    chars++;
  }
  out[k] = 0;
  return out;
}

/* Edit distance with adjacent transpositions (optimal string alignment):
 * `trian` is one edit from `train`, as a typist would count it. */
static size_t edit_distance(const char *a, const char *b) {
  size_t la = strlen(a), lb = strlen(b);
  if (la > 64 || lb > 64) return SIZE_MAX;
  size_t rows[3][65]; /* rows i-2, i-1 and i, used in rotation */
  size_t *pp = rows[0], *prev = rows[1], *cur = rows[2];
  for (size_t j = 0; j <= lb; j++) prev[j] = j;
  for (size_t i = 1; i <= la; i++) {
    cur[0] = i;
    for (size_t j = 1; j <= lb; j++) {
      size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      size_t v = prev[j - 1] + cost;
      if (prev[j] + 1 < v) v = prev[j] + 1;
      if (cur[j - 1] + 1 < v) v = cur[j - 1] + 1;
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] && pp[j - 2] + 1 < v)
        v = pp[j - 2] + 1;
      cur[j] = v;
    }
    size_t *t = pp;
    pp = prev;
    prev = cur;
    cur = t;
  }
  return prev[lb];
}

static void lower_copy(char *dst, const char *src, size_t cap) {
  size_t i = 0;
  for (; src[i] && i + 1 < cap; i++) dst[i] = (char)(src[i] >= 'A' && src[i] <= 'Z' ? src[i] + 32 : src[i]);
  dst[i] = 0;
}

const char *moec_suggest(const char *word, const char *const *names, size_t n) {
  size_t len = strlen(word);
  size_t limit = len / 3 > 1 ? len / 3 : 1;
  const char *best = NULL;
  size_t bestd = SIZE_MAX;
  /* Case does not count: `SGD` is one step from `sgd`, not three. */
  char lw[80], ln[80];
  if (len >= sizeof lw) return NULL;
  lower_copy(lw, word, sizeof lw);
  for (size_t i = 0; i < n; i++) {
    lower_copy(ln, names[i], sizeof ln);
    size_t dist = strcmp(word, names[i]) == 0 ? 0 : strcmp(lw, ln) == 0 ? 1 : edit_distance(lw, ln);
    if (dist <= limit && dist < bestd) { best = names[i]; bestd = dist; }
  }
  return best;
}
