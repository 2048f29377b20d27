/* parse.h — source loading and the flex/bison front end (grammar/moe.l, moe.y). */
#ifndef MOEC_PARSE_H
#define MOEC_PARSE_H

#include <stdbool.h>
#include <stddef.h>

#include "ast.h"
#include "diag.h"

/* Blocks nest at most this deep: deeper specs are machine-made mistakes, and
 * a bound keeps every recursive pass of the compiler within its stack. */
#define MOEC_MAX_DEPTH 256
/* A spec larger than this is not a spec (64 MiB). */
#define MOEC_MAX_SOURCE_BYTES ((size_t)64 << 20)

/* Reads path ("-" for standard input) into arena memory. A file that is
 * missing, unreadable, a directory, too large, empty, or not UTF-8 text (a NUL
 * byte or an invalid sequence) gets one diagnostic, and NULL is returned. */
moec_source *moec_source_load(moec_arena *a, moec_diags *d, const char *path);
/* A source over an in-memory buffer (copied); same checks as the loader. */
moec_source *moec_source_from_buffer(moec_arena *a, moec_diags *d, const char *name,
                                     const char *buf, size_t len);

/* Parses src into its top-level statements. Syntax errors are added to d; the
 * tree returned holds what could be parsed around them. *complete is false
 * when parsing had to stop (nesting limit, error limit): the tree is partial
 * and must not be checked further. */
moec_stmt *moec_parse(moec_arena *a, moec_diags *d, moec_source *src, bool *complete);

/* --- used by the generated lexer and parser only --- */

typedef struct moec_span {
  size_t start, end;
} moec_span;

typedef struct moec_str {
  const char *s;
  size_t len;
  size_t tok; /* index of the token in the file, for error recovery */
} moec_str;

/* Every member of the parser's value union is three 8-byte words, the third
 * a plain integer: GCC 12's SRA at -O2 mis-copied the union when a bool and
 * an int overlapped there (compiler/CMakeLists.txt also turns it off). */
typedef struct moec_stmt_list {
  moec_stmt *head, *tail;
  int64_t error;
} moec_stmt_list;

typedef struct moec_value_list {
  moec_value *head, *tail;
  int64_t n;
} moec_value_list;

typedef struct moec_open_block {
  size_t lbrace;           /* offset of the `{` */
  size_t word, word_len;   /* the statement's first word: `moe`, `residual` */
} moec_open_block;

typedef struct moec_parse_ctx {
  moec_arena *arena;
  moec_diags *diags;
  moec_source *src;
  moec_stmt *result;
  bool fatal;             /* stop: nesting limit reached; no tree is returned */
  bool eof_reported;      /* the unclosed-block error was given */
  size_t ntokens;         /* tokens returned so far */
  size_t error_tok;       /* token index of the last syntax error, +1 (0: none) */
  bool error_mid_line;    /* that token is on the line of the token before it */
  /* `moe e experts = 4; ... }`: a block's `{` forgotten. Until the `}` meant
   * to close it (the one lexed at this depth), statements are suspect, and
   * the `}` it leaves over at the end is not reported again. -1: none. */
  int lbrace_missing_depth;
  int owed_rbraces;       /* `}` left over by forgotten `{`, not to report */
  size_t last_start, last_end;     /* the token lexed last (the lookahead) */
  size_t before_start, before_end; /* the token before it */
  /* lexer state */
  size_t offset;          /* byte offset of the next token */
  bool at_stmt_start;
  size_t stmt_word, stmt_word_len;
  int depth;
  moec_open_block open[MOEC_MAX_DEPTH + 1];
} moec_parse_ctx;

moec_loc moec_parse_loc(const moec_parse_ctx *ctx, moec_span sp);

#endif
