/* arena.h — one bump allocator per compilation (jq's jv_alloc, ggml's context).
 * Everything the compiler makes (source text, strings, AST, spec, model) comes from
 * one arena and is freed at once by moec_arena_destroy. Out of memory aborts with
 * a message, so callers never check for NULL. */
#ifndef MOEC_ARENA_H
#define MOEC_ARENA_H

#include <stddef.h>

typedef struct moec_arena moec_arena;

/* Creates an empty arena; never returns NULL. */
moec_arena *moec_arena_create(void);
/* Frees the arena and everything allocated from it. NULL is a no-op. */
void moec_arena_destroy(moec_arena *a);
/* Returns n zeroed bytes aligned for any type. Aborts on out of memory. */
void *moec_arena_alloc(moec_arena *a, size_t n);
/* Returns a NUL-terminated copy of s[0..n). */
char *moec_arena_strndup(moec_arena *a, const char *s, size_t n);
/* Returns a NUL-terminated copy of s. */
char *moec_arena_strdup(moec_arena *a, const char *s);
/* printf into arena memory. */
char *moec_arena_printf(moec_arena *a, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#define MOEC_NEW(a, T) ((T *)moec_arena_alloc((a), sizeof(T)))
#define MOEC_NEW_ARRAY(a, T, n) ((T *)moec_arena_alloc((a), sizeof(T) * (size_t)(n)))

#endif
