/* ast.h — the syntax tree of a .moe file, as written.
 * The grammar is generic: every statement is an item (`key = values;`), a bare
 * word (`layernorm;`) or a block (`word [NAME|INT] { ... }`). Keywords are
 * identifiers in a known position, so which words are valid where is sema's
 * business; that keeps the grammar conflict-free and lets sema say "unknown
 * layer `mo`; did you mean `moe`?". Every node carries its source location. */
#ifndef MOEC_AST_H
#define MOEC_AST_H

#include <stdbool.h>
#include <stdint.h>

#include "arena.h"
#include "diag.h"

typedef enum {
#define STMT(k, n) MOEC_STMT_##k,
#include "ast.def"
#undef STMT
  MOEC_STMT__COUNT
} moec_stmt_kind;

typedef enum {
#define VALUE(k, n, d) MOEC_VAL_##k,
#include "ast.def"
#undef VALUE
  MOEC_VAL__COUNT
} moec_value_kind;

extern const char *const moec_stmt_kind_names[MOEC_STMT__COUNT];
extern const char *const moec_value_kind_names[MOEC_VAL__COUNT];
/* "an integer", "a string": for messages. */
extern const char *const moec_value_kind_desc[MOEC_VAL__COUNT];

typedef struct moec_value {
  moec_value_kind kind;
  moec_loc loc;
  int64_t i;               /* INT */
  double d;                /* INT and NUM (an INT's value as a double too) */
  const char *s;           /* IDENT, STRING (unescaped), CALL (callee) */
  size_t slen;
  struct moec_value *args; /* CALL: arguments */
  struct moec_value *next;
} moec_value;

typedef struct moec_stmt {
  moec_stmt_kind kind;
  moec_loc loc;        /* the whole statement */
  const char *word;    /* key, bare word or block keyword */
  moec_loc word_loc;
  moec_value *values;  /* ITEM */
  int nvalues;
  /* BLOCK */
  const char *name;    /* `moe NAME {`: NULL if none */
  moec_loc name_loc;
  bool has_count;      /* `repeat N {` */
  bool count_is_int;   /* false: written as a decimal */
  int64_t count;
  moec_loc count_loc;
  moec_loc lbrace;
  struct moec_stmt *body;
  bool body_error;     /* a syntax error inside: skip its missing-key checks */
  bool suspect;        /* parsed while recovering from a syntax error: sema
                          skips it, so one mistake gives one message */
  struct moec_stmt *next;
} moec_stmt;

/* Prints the tree for debugging (`moec check --dump-ast`). */
void moec_ast_dump(const moec_stmt *list, FILE *out);

#endif
