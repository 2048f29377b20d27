/* build.h — from a lowered model to files: the generated C driver written into
 * a directory (`moec emit -o DIR`), or compiled and linked with libmoert into
 * an executable (`moec build`). */
#ifndef MOEC_BUILD_H
#define MOEC_BUILD_H

#include <stdbool.h>

#include "model.h"

/* Writes DIR/model.c and DIR/kernels.cu (each atomically, through a
 * temporary file and a rename, kernels.cu first; DIR is created if missing).
 * Returns 0, or 1 after printing an error. */
int moec_emit_dir(const moert_model *m, const char *spec_path, const char *dir);
/* Compiles m into the executable `output` (default: the spec's base name
 * without .moe, in the current directory). The binary appears only when the
 * whole build succeeded. keep: also write the driver to OUTPUT.c.
 * Returns 0, or 1 after printing an error. */
int moec_build(const moert_model *m, const char *spec_path, const char *output, bool keep);

#endif
