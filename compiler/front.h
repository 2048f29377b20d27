/* front.h — the whole front end in one call: load, parse, check. */
#ifndef MOEC_FRONT_H
#define MOEC_FRONT_H

#include "spec.h"

/* Loads path ("-": standard input), parses and checks it. Diagnostics go to d;
 * returns the checked spec, or NULL if there was any error. If ast is not
 * NULL it receives the syntax tree (for --dump-ast). */
moec_spec *moec_front_file(moec_arena *a, moec_diags *d, const char *path, const moec_stmt **ast);
/* The same over a buffer (the fuzzer's entry point). */
moec_spec *moec_front_buffer(moec_arena *a, moec_diags *d, const char *name, const char *buf,
                             size_t len);

#endif
