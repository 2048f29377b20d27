/* ast.c — name tables and the debug dump of the syntax tree. */
#include "ast.h"

#include <inttypes.h>

const char *const moec_stmt_kind_names[MOEC_STMT__COUNT] = {
#define STMT(k, n) n,
#include "ast.def"
#undef STMT
};
const char *const moec_value_kind_names[MOEC_VAL__COUNT] = {
#define VALUE(k, n, d) n,
#include "ast.def"
#undef VALUE
};
const char *const moec_value_kind_desc[MOEC_VAL__COUNT] = {
#define VALUE(k, n, d) d,
#include "ast.def"
#undef VALUE
};

static void dump_values(const moec_value *v, FILE *out) {
  for (; v; v = v->next) {
    fprintf(out, " %s:", moec_value_kind_names[v->kind]);
    switch (v->kind) {
    case MOEC_VAL_INT: fprintf(out, "%" PRId64, v->i); break;
    case MOEC_VAL_NUM: fprintf(out, "%.17g", v->d); break;
    case MOEC_VAL_IDENT: case MOEC_VAL_STRING: fprintf(out, "\"%s\"", v->s); break;
    case MOEC_VAL_CALL:
      fprintf(out, "%s(", v->s);
      dump_values(v->args, out);
      fprintf(out, " )");
      break;
    case MOEC_VAL__COUNT: break;
    }
  }
}

static void dump(const moec_stmt *s, int depth, FILE *out) {
  for (; s; s = s->next) {
    fprintf(out, "%*s%s %s", depth * 2, "", moec_stmt_kind_names[s->kind], s->word);
    if (s->name) fprintf(out, " name=%s", s->name);
    if (s->has_count) fprintf(out, " count=%" PRId64, s->count);
    if (s->suspect) fprintf(out, " (suspect)");
    if (s->body_error) fprintf(out, " (error inside)");
    if (s->kind == MOEC_STMT_ITEM) dump_values(s->values, out);
    fputc('\n', out);
    if (s->kind == MOEC_STMT_BLOCK) dump(s->body, depth + 1, out);
  }
}

void moec_ast_dump(const moec_stmt *list, FILE *out) { dump(list, 0, out); }
