/* names.h — a set of names with the location that defined each (open
 * addressing, arena memory): layer names must be unique, as written (sema)
 * and once `repeat` is expanded (lower). */
#ifndef MOEC_NAMES_H
#define MOEC_NAMES_H

#include "diag.h"

typedef struct moec_names {
  moec_arena *arena;
  struct moec_name_slot *slots;
  size_t cap, len;
} moec_names;

/* An empty set using arena a. */
void moec_names_init(moec_names *set, moec_arena *a);
/* Adds name (not copied: it must live as long as the set) defined at loc.
 * When it is there already, returns the location of its first definition
 * (and adds nothing); else NULL. */
const moec_loc *moec_names_add(moec_names *set, const char *name, moec_loc loc);

#endif
