/* comm_staged.c — a host comm (self, mpi) used with device buffers: the float
 * collectives download their input, run on host buffers and upload the
 * result; the rest (host values) pass straight through. A world of one rank
 * stages nothing: its float collectives are device copies or nothing, so
 * nothing waits for the device (and a CUDA graph can capture them). See
 * comm.h. */
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "comm.h"

typedef struct staged {
  moert_comm *inner;
  moert_backend *b;
  float *h1, *h2; /* host staging, grown */
  size_t cap1, cap2;
} staged;

static staged *S_(moert_comm *c) { return (staged *)c->impl; }

static bool grow(float **p, size_t *cap, int64_t n, moert_status *st) {
  size_t need = sizeof(float) * (size_t)(n > 0 ? n : 1);
  if (need <= *cap) return true;
  float *q = realloc(*p, need);
  if (!q) return MOERT_FAIL(st, "out of host memory staging a collective (%zu bytes)", need);
  *p = q;
  *cap = need;
  return true;
}

static bool down(staged *s, float *h, const float *d, int64_t n, moert_status *st) {
  return n <= 0 || s->b->download(s->b, h, d, sizeof(float) * (size_t)n, st);
}
static bool up(staged *s, float *d, const float *h, int64_t n, moert_status *st) {
  return n <= 0 || s->b->upload(s->b, d, h, sizeof(float) * (size_t)n, st);
}

static bool st_f64(moert_comm *c, double *x, int64_t n, moert_red op, moert_status *st) {
  return S_(c)->inner->all_reduce_f64(S_(c)->inner, x, n, op, st);
}
static bool st_i64(moert_comm *c, int64_t *x, int64_t n, moert_red op, moert_status *st) {
  return S_(c)->inner->all_reduce_i64(S_(c)->inner, x, n, op, st);
}
/* One rank: recv = send, on the device. */
static void solo_copy(staged *s, float *recv, const float *send, int64_t n) {
  if (recv != send && n > 0) s->b->copy(recv, send, n);
}

static bool st_f32(moert_comm *c, float *x, int64_t n, moert_red op, moert_status *st) {
  staged *s = S_(c);
  if (c->world == 1) return true;
  MOERT_TRY(st, grow(&s->h1, &s->cap1, n, st) && down(s, s->h1, x, n, st));
  MOERT_TRY(st, s->inner->all_reduce_f32(s->inner, s->h1, n, op, st));
  MOERT_TRY(st, up(s, x, s->h1, n, st));
  return true;
}
static bool st_all_gather(moert_comm *c, const float *send, float *recv, int64_t n, moert_status *st) {
  staged *s = S_(c);
  if (c->world == 1) return solo_copy(s, recv, send, n), true;
  int64_t w = s->inner->world;
  MOERT_TRY(st, grow(&s->h1, &s->cap1, n, st) && grow(&s->h2, &s->cap2, w * n, st));
  MOERT_TRY(st, down(s, s->h1, send, n, st));
  MOERT_TRY(st, s->inner->all_gather_f32(s->inner, s->h1, s->h2, n, st));
  MOERT_TRY(st, up(s, recv, s->h2, w * n, st));
  return true;
}
static bool st_reduce_scatter(moert_comm *c, const float *send, float *recv, int64_t n, moert_status *st) {
  staged *s = S_(c);
  if (c->world == 1) return solo_copy(s, recv, send, n), true;
  int64_t w = s->inner->world;
  MOERT_TRY(st, grow(&s->h1, &s->cap1, w * n, st) && grow(&s->h2, &s->cap2, n, st));
  MOERT_TRY(st, down(s, s->h1, send, w * n, st));
  MOERT_TRY(st, s->inner->reduce_scatter_f32(s->inner, s->h1, s->h2, n, st));
  MOERT_TRY(st, up(s, recv, s->h2, n, st));
  return true;
}
static bool st_a2a(moert_comm *c, const float *send, float *recv, int64_t n, moert_a2a_algo algo,
                   moert_status *st) {
  staged *s = S_(c);
  if (c->world == 1) return solo_copy(s, recv, send, n), true;
  int64_t total = s->inner->world * n;
  MOERT_TRY(st, grow(&s->h1, &s->cap1, total, st) && grow(&s->h2, &s->cap2, total, st));
  MOERT_TRY(st, down(s, s->h1, send, total, st));
  MOERT_TRY(st, s->inner->all_to_all_f32(s->inner, s->h1, s->h2, n, algo, st));
  MOERT_TRY(st, up(s, recv, s->h2, total, st));
  return true;
}
static bool st_a2av(moert_comm *c, const float *send, const int64_t *sc, const int64_t *sd, float *recv,
                    const int64_t *rc, const int64_t *rd, moert_status *st) {
  staged *s = S_(c);
  if (c->world == 1) {
    if (sc[0] != rc[0]) return MOERT_FAIL(st, "all_to_allv on one rank: %lld floats sent, %lld received",
                                          (long long)sc[0], (long long)rc[0]);
    return solo_copy(s, recv + rd[0], send + sd[0], sc[0]), true;
  }
  int64_t sn = 0, rn = 0;
  for (int r = 0; r < s->inner->world; r++) {
    if (sd[r] + sc[r] > sn) sn = sd[r] + sc[r];
    if (rd[r] + rc[r] > rn) rn = rd[r] + rc[r];
  }
  MOERT_TRY(st, grow(&s->h1, &s->cap1, sn, st) && grow(&s->h2, &s->cap2, rn, st));
  MOERT_TRY(st, down(s, s->h1, send, sn, st) && down(s, s->h2, recv, rn, st));
  MOERT_TRY(st, s->inner->all_to_allv_f32(s->inner, s->h1, sc, sd, s->h2, rc, rd, st));
  MOERT_TRY(st, up(s, recv, s->h2, rn, st));
  return true;
}
static bool st_a2a_start(moert_comm *c, const float *send, float *recv, int64_t n, moert_a2a_algo algo,
                         moert_req **req, moert_status *st) {
  *req = NULL;
  return st_a2a(c, send, recv, n, algo, st);
}
static bool st_wait(moert_comm *c, moert_req *req, moert_status *st) {
  (void)c, (void)req, (void)st;
  return true;
}
static bool st_broadcast(moert_comm *c, void *buf, int64_t bytes, int root, moert_status *st) {
  return S_(c)->inner->broadcast(S_(c)->inner, buf, bytes, root, st);
}
static bool st_gather(moert_comm *c, const void *send, void *recv, int64_t bytes, int root, moert_status *st) {
  return S_(c)->inner->gather(S_(c)->inner, send, recv, bytes, root, st);
}
static bool st_barrier(moert_comm *c, moert_status *st) { return S_(c)->inner->barrier(S_(c)->inner, st); }

static void st_destroy(moert_comm *c) {
  if (!c) return;
  staged *s = S_(c);
  free(s->h1);
  free(s->h2);
  free(s);
  free(c);
}

static bool wrap(moert_comm *inner, moert_backend *b, bool owns_inner, moert_comm **out, moert_status *st);

static bool st_timed_out(moert_comm *c, const char *what, double waited, const char *why, moert_status *st) {
  moert_comm *in = S_(c)->inner;
  return in->timed_out(in, what, waited, why, st);
}

static bool st_split(moert_comm *c, int color, int key, moert_comm **out, moert_status *st) {
  moert_comm *child;
  MOERT_TRY(st, S_(c)->inner->split(S_(c)->inner, color, key, &child, st));
  return wrap(child, S_(c)->b, child != S_(c)->inner, out, st) ? true : MOERT_UP(st);
}

/* A staged split owns its inner child: destroying it destroys both. */
static void st_destroy_owner(moert_comm *c) {
  moert_comm *inner = S_(c)->inner;
  st_destroy(c);
  inner->destroy(inner);
}

static bool wrap(moert_comm *inner, moert_backend *b, bool owns_inner, moert_comm **out, moert_status *st) {
  moert_comm *c = calloc(1, sizeof *c);
  staged *s = calloc(1, sizeof *s);
  if (!c || !s) {
    free(c);
    free(s);
    return MOERT_FAIL(st, "out of memory");
  }
  s->inner = inner;
  s->b = b;
  *c = (moert_comm){
      .name = inner->name, .device_buffers = true, .world = inner->world, .rank = inner->rank, .nodes = inner->nodes,
      .node = inner->node, .local_size = inner->local_size, .local_rank = inner->local_rank,
      .host_rank = inner->host_rank, .host_size = inner->host_size,
      .all_reduce_f64 = st_f64, .all_reduce_f32 = st_f32, .all_reduce_i64 = st_i64,
      .all_gather_f32 = st_all_gather, .reduce_scatter_f32 = st_reduce_scatter, .broadcast = st_broadcast,
      .gather = st_gather, .all_to_all_f32 = st_a2a, .all_to_allv_f32 = st_a2av,
      .all_to_all_start = st_a2a_start, .wait = st_wait, .split = st_split, .barrier = st_barrier,
      .capturable = inner->world == 1, .watch = inner->watch,
      .timed_out = inner->timed_out ? st_timed_out : NULL,
      .destroy = owns_inner ? st_destroy_owner : st_destroy, .impl = s};
  *out = c;
  return true;
}

bool moert_comm_staged_create(moert_comm *inner, moert_backend *b, moert_comm **out, moert_status *st) {
  return wrap(inner, b, false, out, st);
}
