/* diag.h — source files, locations and diagnostics, printed like gcc's:
 *   FILE:LINE:COL: error: MESSAGE
 *       3 |   topk = 2;
 *         |   ^~~~
 * Locations are byte offsets into a source; line and column are computed only
 * when printing (jq's locfile). Diagnostics are collected in order; after
 * MOEC_MAX_ERRORS errors the list is closed and `stopped` is set so the stages
 * stop early (Wren's compiler). */
#ifndef MOEC_DIAG_H
#define MOEC_DIAG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "arena.h"

/* A user gets at most this many errors per file: past it, later errors are
 * almost always cascades of the first ones. */
#define MOEC_MAX_ERRORS 20

typedef struct moec_source {
  const char *name; /* as given on the command line; "<stdin>" for - */
  const char *text; /* the bytes, NUL-terminated (two NULs: flex wants them) */
  size_t len;
  moec_arena *arena;   /* where line_starts is built */
  size_t *line_starts; /* built on first use */
  size_t nlines;
} moec_source;

typedef struct moec_loc {
  const moec_source *src; /* NULL: no location (a whole-file or tool error) */
  size_t start, end;      /* byte offsets, [start, end) */
} moec_loc;

typedef enum { MOEC_SEV_ERROR, MOEC_SEV_WARNING, MOEC_SEV_NOTE } moec_severity;

typedef struct moec_diag {
  moec_severity sev;
  moec_loc loc;
  bool whole_file; /* print FILE: with no line and column */
  bool no_snippet; /* do not echo the line (it is binary) */
  const char *msg;
  struct moec_diag *next;
} moec_diag;

typedef struct moec_diags {
  moec_arena *arena;
  moec_diag *head, *tail;
  int nerrors, nwarnings;
  bool stopped; /* MOEC_MAX_ERRORS reached: stages stop */
  bool dropping;/* the last warning was over the limit: drop its notes too */
} moec_diags;

/* Starts an empty list whose messages live in arena. */
void moec_diags_init(moec_diags *d, moec_arena *arena);
/* Adds an error, warning or note at loc. After MOEC_MAX_ERRORS errors further
 * errors (and their notes) are dropped and d->stopped is set. */
void moec_error(moec_diags *d, moec_loc loc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void moec_warning(moec_diags *d, moec_loc loc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void moec_note(moec_diags *d, moec_loc loc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* An error at a byte of a file that is not text: no line is echoed. */
void moec_error_at_byte(moec_diags *d, moec_loc loc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* An error about a whole file (unreadable, empty, binary): "FILE: error: ...". */
void moec_file_error(moec_diags *d, const moec_source *src, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Prints every diagnostic to out in the order added. */
void moec_diags_print(const moec_diags *d, FILE *out);

/* 1-based line and column (in characters) of byte offset off. */
void moec_source_linecol(moec_source *src, size_t off, size_t *line, size_t *col);

/* A token's text for a message: non-printable bytes escaped as \xNN and
 * anything past 40 characters cut to "...". Arena memory. */
const char *moec_quote(moec_arena *a, const char *s, size_t n);

/* The valid name nearest to word (edit distance, a swap of two neighbouring
 * letters counting as one edit, at most a third of its length, and at least 1
 * edit allowed), or NULL: for "did you mean". */
const char *moec_suggest(const char *word, const char *const *names, size_t n);

#endif
