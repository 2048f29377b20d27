/* comm_self.c — the comm of a run with one rank: reductions are identities,
 * the data-moving collectives copy send to recv. */
#include "comm.h"

#include <stdlib.h>
#include <string.h>

static bool self_f64(moert_comm *c, double *x, int64_t n, moert_red op, moert_status *st) {
  (void)c, (void)x, (void)n, (void)op, (void)st;
  return true;
}
static bool self_f32(moert_comm *c, float *x, int64_t n, moert_red op, moert_status *st) {
  (void)c, (void)x, (void)n, (void)op, (void)st;
  return true;
}
static bool self_i64(moert_comm *c, int64_t *x, int64_t n, moert_red op, moert_status *st) {
  (void)c, (void)x, (void)n, (void)op, (void)st;
  return true;
}
static bool self_copy(moert_comm *c, const float *send, float *recv, int64_t n, moert_status *st) {
  (void)c, (void)st;
  if (send != recv && n > 0) memmove(recv, send, sizeof(float) * (size_t)n);
  return true;
}
static bool self_broadcast(moert_comm *c, void *buf, int64_t bytes, int root, moert_status *st) {
  (void)c, (void)buf, (void)bytes, (void)root, (void)st;
  return true;
}
static bool self_gather(moert_comm *c, const void *send, void *recv, int64_t bytes, int root,
                        moert_status *st) {
  (void)c, (void)root, (void)st;
  if (send != recv && bytes > 0) memmove(recv, send, (size_t)bytes);
  return true;
}
static bool self_a2a(moert_comm *c, const float *send, float *recv, int64_t n, moert_a2a_algo algo,
                     moert_status *st) {
  (void)algo;
  return self_copy(c, send, recv, n, st);
}
static bool self_a2av(moert_comm *c, const float *send, const int64_t *scount, const int64_t *sdispl,
                      float *recv, const int64_t *rcount, const int64_t *rdispl, moert_status *st) {
  (void)c;
  if (scount[0] != rcount[0])
    return MOERT_FAIL(st, "all_to_allv: sending %lld floats to itself but receiving %lld",
                      (long long)scount[0], (long long)rcount[0]);
  if (scount[0] > 0) memmove(recv + rdispl[0], send + sdispl[0], sizeof(float) * (size_t)scount[0]);
  return true;
}
static bool self_a2a_start(moert_comm *c, const float *send, float *recv, int64_t n,
                           moert_a2a_algo algo, moert_req **req, moert_status *st) {
  *req = NULL;
  return self_a2a(c, send, recv, n, algo, st);
}
static bool self_wait(moert_comm *c, moert_req *req, moert_status *st) {
  (void)c, (void)req, (void)st;
  return true;
}
static bool self_split(moert_comm *c, int color, int key, moert_comm **out, moert_status *st) {
  (void)color, (void)key, (void)st;
  *out = c;
  return true;
}
static bool self_barrier(moert_comm *c, moert_status *st) {
  (void)c, (void)st;
  return true;
}
static void self_destroy(moert_comm *c) { (void)c; }

static moert_comm self_comm = {
    .name = "self",
    .world = 1,
    .rank = 0,
    .nodes = 1,
    .node = 0,
    .local_size = 1,
    .host_size = 1,
    .local_rank = 0,
    .all_reduce_f64 = self_f64,
    .all_reduce_f32 = self_f32,
    .all_reduce_i64 = self_i64,
    .all_gather_f32 = self_copy,
    .reduce_scatter_f32 = self_copy,
    .broadcast = self_broadcast,
    .gather = self_gather,
    .all_to_all_f32 = self_a2a,
    .all_to_allv_f32 = self_a2av,
    .all_to_all_start = self_a2a_start,
    .wait = self_wait,
    .split = self_split,
    .barrier = self_barrier,
    .destroy = self_destroy,
};

moert_comm *moert_comm_self(void) { return &self_comm; }
