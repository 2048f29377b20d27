/* lower.h — a checked spec becomes the runtime's model description
 * (runtime/model.h): repeats expanded and names suffixed, residual blocks as
 * BEGIN/END markers, the embedding, head and loss made explicit, and every
 * parameter listed with its global shape, initializer and placement. */
#ifndef MOEC_LOWER_H
#define MOEC_LOWER_H

#include "model.h"
#include "spec.h"

/* Lowers s; memory from a. Names that collide once repeats are expanded
 * (`a_0` beside `repeat 2 { ... a ... }`) are errors in d; NULL then. */
moert_model *moec_lower(moec_arena *a, moec_diags *d, const moec_spec *s, const char *spec_file);

#endif
