/* names.c — sets of names; see names.h. */
#include "names.h"

#include <stdint.h>
#include <string.h>

struct moec_name_slot {
  const char *name;
  moec_loc loc;
};

static uint64_t hash_str(const char *s) {
  uint64_t h = 1469598103934665603ull; /* FNV-1a */
  for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
  return h;
}

void moec_names_init(moec_names *set, moec_arena *a) {
  memset(set, 0, sizeof *set);
  set->arena = a;
}

const moec_loc *moec_names_add(moec_names *set, const char *name, moec_loc loc) {
  if (set->len * 2 >= set->cap) { /* at most half full */
    size_t cap = set->cap ? set->cap * 2 : 64;
    struct moec_name_slot *t = MOEC_NEW_ARRAY(set->arena, struct moec_name_slot, cap);
    for (size_t i = 0; i < set->cap; i++) {
      if (!set->slots[i].name) continue;
      size_t j = hash_str(set->slots[i].name) & (cap - 1);
      while (t[j].name) j = (j + 1) & (cap - 1);
      t[j] = set->slots[i];
    }
    set->slots = t;
    set->cap = cap;
  }
  size_t j = hash_str(name) & (set->cap - 1);
  for (; set->slots[j].name; j = (j + 1) & (set->cap - 1))
    if (strcmp(set->slots[j].name, name) == 0) return &set->slots[j].loc;
  set->slots[j].name = name;
  set->slots[j].loc = loc;
  set->len++;
  return NULL;
}
