/* arena.c — chunked bump allocation; see arena.h. */
#include "arena.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Chunks are at least this big; larger requests get a chunk of their own. */
#define ARENA_CHUNK_BYTES (64u * 1024u)
#define ARENA_ALIGN 16u

typedef struct chunk {
  struct chunk *next;
  size_t size, used;
  _Alignas(16) unsigned char data[];
} chunk;

struct moec_arena {
  chunk *head;
};

static void *xmalloc(size_t n) {
  void *p = malloc(n);
  if (!p) {
    fprintf(stderr, "moec: fatal error: out of memory (asked for %zu bytes)\n", n);
    abort();
  }
  return p;
}

moec_arena *moec_arena_create(void) {
  moec_arena *a = xmalloc(sizeof *a);
  a->head = NULL;
  return a;
}

void moec_arena_destroy(moec_arena *a) {
  if (!a) return;
  for (chunk *c = a->head, *next; c; c = next) {
    next = c->next;
    free(c);
  }
  free(a);
}

void *moec_arena_alloc(moec_arena *a, size_t n) {
  size_t need = (n + ARENA_ALIGN - 1) & ~(size_t)(ARENA_ALIGN - 1);
  if (need < n) { /* overflow */
    fprintf(stderr, "moec: fatal error: out of memory (asked for %zu bytes)\n", n);
    abort();
  }
  chunk *c = a->head;
  if (!c || c->size - c->used < need) {
    size_t size = need > ARENA_CHUNK_BYTES ? need : ARENA_CHUNK_BYTES;
    c = xmalloc(sizeof *c + size);
    c->size = size;
    c->used = 0;
    /* A big private chunk goes behind the current one so the current one's free
     * space is not lost. */
    if (a->head && size > ARENA_CHUNK_BYTES) {
      c->next = a->head->next;
      a->head->next = c;
    } else {
      c->next = a->head;
      a->head = c;
    }
  }
  void *p = c->data + c->used;
  c->used += need;
  memset(p, 0, n);
  return p;
}

char *moec_arena_strndup(moec_arena *a, const char *s, size_t n) {
  char *p = moec_arena_alloc(a, n + 1);
  memcpy(p, s, n);
  p[n] = 0;
  return p;
}

char *moec_arena_strdup(moec_arena *a, const char *s) {
  return moec_arena_strndup(a, s, strlen(s));
}

char *moec_arena_printf(moec_arena *a, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(NULL, 0, fmt, ap);
  va_end(ap);
  if (n < 0) n = 0;
  char *p = moec_arena_alloc(a, (size_t)n + 1);
  va_start(ap, fmt);
  vsnprintf(p, (size_t)n + 1, fmt, ap);
  va_end(ap);
  return p;
}
