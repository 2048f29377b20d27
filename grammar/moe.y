/* moe.y — the grammar of the .moe language (docs/LANGUAGE.md has it in EBNF).
 * Generic on purpose: a file is a list of statements; a statement is an item
 * (`key = v, v;`), a bare word (`layernorm;`) or a block (`word [NAME|INT] {`).
 * Which words are valid where is checked by compiler/sema.c, which can then
 * name the block, the key and the nearest valid spelling. Actions are one-line
 * calls to the builders at the end of this file. */
%define api.pure full
%locations
%define api.location.type {moec_span}
%define parse.error custom
%expect 0
%parse-param {moec_parse_ctx *ctx} {void *scanner}
%lex-param {void *scanner}

%code requires {
#include "parse.h"
/* The union members keep their third word the same width (GCC 12 -O2 miscompiled
 * a bool and an int overlapping in it; see compiler/CMakeLists.txt). */
typedef struct moec_num { int64_t i; double d; int64_t is_int; } moec_num;
}

%code {
#include <string.h>
int yylex(YYSTYPE *lval, YYLTYPE *lloc, void *scanner);
static void yyerror(YYLTYPE *loc, moec_parse_ctx *ctx, void *scanner, const char *msg);
static moec_stmt *mk_item(moec_parse_ctx *ctx, moec_str key, YYLTYPE kl, moec_value_list v, YYLTYPE all);
static moec_stmt *mk_bare(moec_parse_ctx *ctx, moec_str w, YYLTYPE wl, YYLTYPE all);
static moec_stmt *mk_block(moec_parse_ctx *ctx, moec_str w, YYLTYPE wl, YYLTYPE lb,
                           moec_stmt_list body, YYLTYPE rb, YYLTYPE all);
static moec_stmt *with_name(moec_parse_ctx *ctx, moec_stmt *b, moec_str name, YYLTYPE nl);
static moec_stmt *with_count(moec_parse_ctx *ctx, moec_stmt *b, moec_num n, YYLTYPE nl);
static moec_stmt_list append_stmt(moec_stmt_list l, moec_stmt *s);
static moec_value_list append_value(moec_value_list l, moec_value *v);
static moec_value *mk_num(moec_parse_ctx *ctx, moec_num n, YYLTYPE l);
static moec_value *mk_str(moec_parse_ctx *ctx, moec_value_kind k, moec_str s, YYLTYPE l);
static moec_value *mk_call(moec_parse_ctx *ctx, moec_str f, moec_value_list args, YYLTYPE l);
static void no_statements(moec_parse_ctx *ctx);
#define YYLLOC_DEFAULT(Cur, Rhs, N)                       \
  do {                                                    \
    if (N) {                                              \
      (Cur).start = YYRHSLOC(Rhs, 1).start;               \
      (Cur).end = YYRHSLOC(Rhs, N).end;                   \
    } else {                                              \
      (Cur).start = (Cur).end = YYRHSLOC(Rhs, 0).end;     \
    }                                                     \
  } while (0)
}

%union {
  moec_str str;
  moec_num num;
  moec_stmt *stmt;
  moec_stmt_list stmts;
  moec_value *value;
  moec_value_list values;
}

%token <str> T_IDENT "name" T_STRING "string"
%token <num> T_NUMBER "number"
%token T_INVALID "invalid token"
%type <stmt> stmt
%type <stmts> stmts
%type <value> value
%type <values> values

%%

file: stmts                         { ctx->result = $1.head; if (!$1.head && !$1.error) no_statements(ctx); }
    ;

stmts: %empty                       { $$ = (moec_stmt_list){0}; }
     | stmts stmt                   { $$ = append_stmt($1, $2); }
     | stmts error                  { $$ = $1; $$.error = true; }
     | stmts error ';'              { $$ = $1; $$.error = true; yyerrok; }
     | stmts error '{' stmts '}'    { $$ = $1; $$.error = true; yyerrok; } /* skip the block of a broken header */
     ;

stmt: T_IDENT '=' values ';'                 { $$ = mk_item(ctx, $1, @1, $3, @$); }
    | T_IDENT ';'                            { $$ = mk_bare(ctx, $1, @1, @$); }
    | T_IDENT '{' stmts '}'                  { $$ = mk_block(ctx, $1, @1, @2, $3, @4, @$); }
    | T_IDENT T_IDENT '{' stmts '}'          { $$ = with_name(ctx, mk_block(ctx, $1, @1, @3, $4, @5, @$), $2, @2); }
    | T_IDENT T_NUMBER '{' stmts '}'         { $$ = with_count(ctx, mk_block(ctx, $1, @1, @3, $4, @5, @$), $2, @2); }
    ;

values: value                       { $$ = append_value((moec_value_list){0}, $1); }
      | values ',' value            { $$ = append_value($1, $3); }
      ;

value: T_NUMBER                     { $$ = mk_num(ctx, $1, @1); }
     | T_IDENT                      { $$ = mk_str(ctx, MOEC_VAL_IDENT, $1, @1); }
     | T_STRING                     { $$ = mk_str(ctx, MOEC_VAL_STRING, $1, @1); }
     | T_IDENT '(' values ')'       { $$ = mk_call(ctx, $1, $3, @$); }
     ;

%%

moec_loc moec_parse_loc(const moec_parse_ctx *ctx, moec_span sp) {
  moec_loc l = {ctx->src, sp.start, sp.end};
  return l;
}

static moec_loc L(const moec_parse_ctx *ctx, YYLTYPE sp) { return moec_parse_loc(ctx, sp); }

/* A statement that starts at the token of a syntax error in mid-line (`moe x
 * y {`) is what is left of a broken statement: what sema would say about it
 * is a cascade. One that starts on the next line (a `;` forgotten at the end
 * of the line before) is a statement like any other. */
static bool is_suspect(const moec_parse_ctx *ctx, size_t tok) {
  /* inside a block without its `{`, or after its `}` closed the enclosing
   * block early, up to the `}` left over */
  if (ctx->lbrace_missing_depth >= 0 || ctx->owed_rbraces > 0) return true;
  return ctx->error_tok && ctx->error_mid_line && tok + 1 == ctx->error_tok;
}

static moec_stmt *new_stmt(moec_parse_ctx *ctx, moec_stmt_kind k, moec_str w, YYLTYPE wl,
                           YYLTYPE all) {
  moec_stmt *s = MOEC_NEW(ctx->arena, moec_stmt);
  s->kind = k;
  s->word = w.s;
  s->word_loc = L(ctx, wl);
  s->loc = L(ctx, all);
  s->suspect = is_suspect(ctx, w.tok);
  return s;
}

static moec_stmt *mk_item(moec_parse_ctx *ctx, moec_str key, YYLTYPE kl, moec_value_list v,
                          YYLTYPE all) {
  moec_stmt *s = new_stmt(ctx, MOEC_STMT_ITEM, key, kl, all);
  s->values = v.head;
  s->nvalues = v.n;
  return s;
}

static moec_stmt *mk_bare(moec_parse_ctx *ctx, moec_str w, YYLTYPE wl, YYLTYPE all) {
  return new_stmt(ctx, MOEC_STMT_BARE, w, wl, all);
}

static moec_stmt *mk_block(moec_parse_ctx *ctx, moec_str w, YYLTYPE wl, YYLTYPE lb,
                           moec_stmt_list body, YYLTYPE rb, YYLTYPE all) {
  moec_stmt *s = new_stmt(ctx, MOEC_STMT_BLOCK, w, wl, all);
  s->lbrace = L(ctx, lb);
  s->body = body.head;
  /* a `}` the lexer supplied at the end of the file: the block never closed */
  s->body_error = body.error || rb.start == rb.end;
  return s;
}

static moec_stmt *with_name(moec_parse_ctx *ctx, moec_stmt *b, moec_str name, YYLTYPE nl) {
  b->name = name.s;
  b->name_loc = L(ctx, nl);
  return b;
}

static moec_stmt *with_count(moec_parse_ctx *ctx, moec_stmt *b, moec_num n, YYLTYPE nl) {
  b->has_count = true;
  b->count_loc = L(ctx, nl);
  /* a decimal count is sema's to report, and only where a count belongs */
  b->count_is_int = n.is_int != 0;
  b->count = n.is_int ? n.i : 1;
  return b;
}

static moec_stmt_list append_stmt(moec_stmt_list l, moec_stmt *s) {
  if (l.tail) l.tail->next = s; else l.head = s;
  l.tail = s;
  return l;
}

static moec_value_list append_value(moec_value_list l, moec_value *v) {
  if (l.tail) l.tail->next = v; else l.head = v;
  l.tail = v;
  l.n++;
  return l;
}

static moec_value *mk_num(moec_parse_ctx *ctx, moec_num n, YYLTYPE l) {
  moec_value *v = MOEC_NEW(ctx->arena, moec_value);
  v->kind = n.is_int ? MOEC_VAL_INT : MOEC_VAL_NUM;
  v->loc = L(ctx, l);
  v->i = n.i;
  v->d = n.d;
  return v;
}

static moec_value *mk_str(moec_parse_ctx *ctx, moec_value_kind k, moec_str s, YYLTYPE l) {
  moec_value *v = MOEC_NEW(ctx->arena, moec_value);
  v->kind = k;
  v->loc = L(ctx, l);
  v->s = s.s;
  v->slen = s.len;
  return v;
}

static moec_value *mk_call(moec_parse_ctx *ctx, moec_str f, moec_value_list args, YYLTYPE l) {
  moec_value *v = mk_str(ctx, MOEC_VAL_CALL, f, l);
  v->args = args.head;
  return v;
}

/* A file of nothing but comments and blank lines: one message about the file,
 * not a caret under an empty line. */
static void no_statements(moec_parse_ctx *ctx) {
  if (ctx->diags->nerrors == 0)
    moec_file_error(ctx->diags, ctx->src, "no `model` block; a spec starts with `model NAME { ... }`");
}

/* --- syntax errors --- */

/* Words that open a block (`moe NAME {`, `repeat N {`, `train {`) or stand
 * alone as a layer (`layernorm;`): after one of them and a second word, the
 * grammar wants `{`; after any other word, a key, the `=` was forgotten. */
static bool is_block_word(const char *s, size_t n) {
  static const char *const words[] = {
#define LAYER(k, w, f) w,
#define SECTION(k, w) w,
#include "spec.def"
#undef LAYER
#undef SECTION
  };
  for (size_t i = 0; i < sizeof words / sizeof words[0]; i++)
    if (strlen(words[i]) == n && memcmp(words[i], s, n) == 0) return true;
  return false;
}

/* `dim 64;`: a statement whose first word is a key and whose second token
 * stands where its `=` should be. Reports it and returns true. */
static bool missing_equals(moec_parse_ctx *ctx);

/* `moe e experts = 4; ... }`: a block's header followed by a key (a name,
 * then `=` or `;`) means its `{` was forgotten. The error is reported as
 * usual; this marks the statements up to the block's `}` as suspect, so
 * they are not checked as keys of the enclosing block, and the `}` left
 * over at the end is not reported as unmatched. */
static void lbrace_forgotten(moec_parse_ctx *ctx, YYLTYPE look) {
  const char *t = ctx->src->text;
  size_t i = look.end;
  while (i < ctx->src->len && (t[i] == ' ' || t[i] == '\t')) i++;
  if (i < ctx->src->len && (t[i] == '=' || t[i] == ';') && ctx->lbrace_missing_depth < 0)
    ctx->lbrace_missing_depth = ctx->depth;
}

static bool missing_equals(moec_parse_ctx *ctx) {
  const char *t = ctx->src->text;
  size_t w = ctx->stmt_word, wend = w + ctx->stmt_word_len;
  if (!ctx->stmt_word_len || wend > ctx->before_start || is_block_word(t + w, ctx->stmt_word_len))
    return false;
  for (size_t i = wend; i < ctx->before_start; i++) /* the two tokens are neighbours */
    if (t[i] != ' ' && t[i] != '\t' && t[i] != '\r' && t[i] != '\n') return false;
  moec_span at = {ctx->before_start, ctx->before_end};
  moec_error(ctx->diags, moec_parse_loc(ctx, at), "expected `=` between `%s` and `%s`",
             moec_quote(ctx->arena, t + w, ctx->stmt_word_len),
             moec_quote(ctx->arena, t + ctx->before_start, ctx->before_end - ctx->before_start));
  return true;
}

static const char *describe(moec_parse_ctx *ctx, yysymbol_kind_t t, YYLTYPE l) {
  const char *text = ctx->src->text + l.start;
  size_t n = l.end - l.start;
  switch (t) {
  case YYSYMBOL_YYEOF: return "end of file";
  case YYSYMBOL_T_IDENT: return moec_arena_printf(ctx->arena, "name `%s`", moec_quote(ctx->arena, text, n));
  case YYSYMBOL_T_NUMBER: return moec_arena_printf(ctx->arena, "number `%s`", moec_quote(ctx->arena, text, n));
  case YYSYMBOL_T_STRING: return moec_arena_printf(ctx->arena, "string %s", moec_quote(ctx->arena, text, n));
  default: return moec_arena_printf(ctx->arena, "`%s`", moec_quote(ctx->arena, text, n));
  }
}

static const char *expected_name(yysymbol_kind_t t) {
  switch (t) {
  case YYSYMBOL_YYEOF: return "end of file";
  case YYSYMBOL_T_IDENT: return "a name";
  case YYSYMBOL_T_NUMBER: return "a number";
  case YYSYMBOL_T_STRING: return "a string";
  default: return NULL;
  }
}

static int yyreport_syntax_error(const yypcontext_t *yyctx, moec_parse_ctx *ctx, void *scanner) {
  (void)scanner;
  yysymbol_kind_t look = yypcontext_token(yyctx);
  YYLTYPE ll = *yypcontext_location(yyctx);
  ctx->error_tok = ctx->ntokens; /* the lookahead is the last token lexed */
  ctx->error_mid_line = memchr(ctx->src->text + ctx->before_end, '\n',
                               ll.start > ctx->before_end ? ll.start - ctx->before_end : 0) == NULL;
  if (look == YYSYMBOL_T_INVALID || ctx->fatal) return 0; /* reported by the lexer */

  if (look == YYSYMBOL_YYEOF && ctx->depth > 0) {
    moec_open_block *b = &ctx->open[ctx->depth - 1];
    const char *w = b->word_len ? moec_quote(ctx->arena, ctx->src->text + b->word, b->word_len) : "";
    moec_span at = {ll.start, ll.start};
    moec_error(ctx->diags, moec_parse_loc(ctx, at), "expected `}` at end of file");
    moec_span lb = {b->lbrace, b->lbrace + 1};
    moec_note(ctx->diags, moec_parse_loc(ctx, lb), "the `%s` block opened here is not closed", w);
    ctx->depth = 0;
    return 0;
  }

  yysymbol_kind_t exp[16];
  int n = yypcontext_expected_tokens(yyctx, exp, 16);
  bool at_top = false;
  for (int i = 0; i < n; i++) at_top |= exp[i] == YYSYMBOL_YYEOF;
  if (at_top && strcmp(yysymbol_name(look), "'}'") == 0) {
    if (ctx->owed_rbraces > 0) { /* left over by a forgotten `{`, already reported */
      ctx->owed_rbraces--;
      return 0;
    }
    moec_error(ctx->diags, moec_parse_loc(ctx, ll), "unmatched `}`; no block is open here");
    return 0;
  }
  if (strcmp(yysymbol_name(look), "';'") == 0 && ctx->before_end > ctx->before_start) {
    char prev = ctx->src->text[ctx->before_start];
    if (prev == '}' || prev == ';') {
      moec_error(ctx->diags, moec_parse_loc(ctx, ll), "unexpected `;`; %s",
                 prev == '}' ? "a block ends at its `}` and takes no `;`" : "remove the extra `;`");
      return 0;
    }
  }
  /* only `{` can come next: the statement so far is `WORD NAME` or `WORD INT` */
  if (n == 1 && strcmp(yysymbol_name(exp[0]), "'{'") == 0) {
    if (missing_equals(ctx)) return 0;
    if (look == YYSYMBOL_T_IDENT) lbrace_forgotten(ctx, ll);
  }
  const char *names[16];
  int k = 0;
  bool want_semi = false, have_value = false, value_pos = false;
  /* a string can stand only where a value can: there, name, number and
   * string are "a value"; after a block's word they are a name or a count */
  for (int i = 0; i < n; i++) value_pos |= exp[i] == YYSYMBOL_T_STRING;
  for (int i = 0; i < n; i++) {
    yysymbol_kind_t t = exp[i];
    if (strcmp(yysymbol_name(t), "';'") == 0) want_semi = true;
    /* "expected end of file or a name": the end is no help to the reader */
    if (t == YYSYMBOL_YYEOF && n > 1) continue;
    bool is_value = value_pos && (t == YYSYMBOL_T_NUMBER || t == YYSYMBOL_T_STRING);
    if (is_value) {
      if (!have_value) names[k++] = "a value";
      have_value = true;
      continue;
    }
    const char *name = expected_name(t);
    if (!name) {
      const char *raw = yysymbol_name(t); /* "'='" */
      name = moec_arena_printf(ctx->arena, "`%.*s`", (int)strlen(raw) - 2, raw + 1);
    }
    names[k++] = name;
  }
  /* a name also counts as a value where a value may stand */
  if (have_value)
    for (int i = 0; i < k; i++)
      if (strcmp(names[i], "a name") == 0) {
        memmove(&names[i], &names[i + 1], sizeof names[0] * (size_t)(k - i - 1));
        k--;
        break;
      }
  char buf[512];
  size_t len = 0;
  buf[0] = 0;
  for (int i = 0; i < k && len < sizeof buf - 64; i++)
    len += (size_t)snprintf(buf + len, sizeof buf - len, "%s%s",
                            i == 0 ? "" : i == k - 1 ? " or " : ", ", names[i]);

  /* A `;` forgotten at the end of a line: point just after the token before,
   * as gcc does, rather than at the start of the next line. */
  if (want_semi && ctx->before_end < ll.start) {
    bool newline = false;
    for (size_t i = ctx->before_end; i < ll.start; i++) newline |= ctx->src->text[i] == '\n';
    if (newline) {
      moec_span at = {ctx->before_end, ctx->before_end};
      moec_error(ctx->diags, moec_parse_loc(ctx, at), "expected %s after `%s`", buf,
                 moec_quote(ctx->arena, ctx->src->text + ctx->before_start,
                            ctx->before_end - ctx->before_start));
      return 0;
    }
  }
  moec_error(ctx->diags, moec_parse_loc(ctx, ll), "expected %s before %s", buf,
             describe(ctx, look, ll));
  return 0;
}

static void yyerror(YYLTYPE *loc, moec_parse_ctx *ctx, void *scanner, const char *msg) {
  (void)scanner;
  /* Only bison's own failures come here ("memory exhausted"); the nesting
   * limit in the lexer keeps the stack far below its bound. */
  moec_error(ctx->diags, moec_parse_loc(ctx, *loc), "parser failure: %s", msg);
}

/* --- the driver --- */

typedef void *yyscan_t;
int yylex_init_extra(moec_parse_ctx *extra, yyscan_t *scanner);
int yylex_destroy(yyscan_t scanner);
struct yy_buffer_state *yy_scan_buffer(char *base, size_t size, yyscan_t scanner);

moec_stmt *moec_parse(moec_arena *a, moec_diags *d, moec_source *src, bool *complete) {
  moec_parse_ctx *ctx = MOEC_NEW(a, moec_parse_ctx);
  ctx->arena = a;
  ctx->diags = d;
  ctx->src = src;
  ctx->at_stmt_start = true;
  ctx->lbrace_missing_depth = -1;
  yyscan_t scanner;
  if (yylex_init_extra(ctx, &scanner)) {
    moec_file_error(d, src, "cannot start the lexer (out of memory)");
    *complete = false;
    return NULL;
  }
  /* flex scans in place and writes NULs into its buffer as it goes, so it gets
   * its own copy, ending in the two NULs yy_scan_buffer wants; diagnostics echo
   * the untouched source. */
  char *buf = moec_arena_alloc(a, src->len + 2);
  memcpy(buf, src->text, src->len);
  yy_scan_buffer(buf, src->len + 2, scanner);
  int rc = yyparse(ctx, scanner);
  yylex_destroy(scanner);
  *complete = rc == 0 && !ctx->fatal && !d->stopped;
  return ctx->result;
}
