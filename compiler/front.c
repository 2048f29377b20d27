/* front.c — load, parse, check; see front.h. */
#include "front.h"

#include "parse.h"

static moec_spec *run(moec_arena *a, moec_diags *d, moec_source *src, const moec_stmt **ast) {
  if (!src) return NULL;
  bool complete;
  moec_stmt *file = moec_parse(a, d, src, &complete);
  if (ast) *ast = file;
  if (!complete) return NULL; /* a partial tree would only add cascades */
  if (!file) {
    moec_loc at = {src, src->len, src->len};
    if (d->nerrors == 0)
      moec_error(d, at, "no `model` block; a spec starts with `model NAME { ... }`");
    return NULL;
  }
  return moec_sema(a, d, file);
}

moec_spec *moec_front_file(moec_arena *a, moec_diags *d, const char *path, const moec_stmt **ast) {
  return run(a, d, moec_source_load(a, d, path), ast);
}

moec_spec *moec_front_buffer(moec_arena *a, moec_diags *d, const char *name, const char *buf,
                             size_t len) {
  return run(a, d, moec_source_from_buffer(a, d, name, buf, len), NULL);
}
