/* test_alltoallv.c — the uneven all-to-all of comm.h, verifiable as
 * nccl-tests' are: rank s sends rank d count(s, d) floats whose values are a
 * function of (s, d, i), with counts that differ for every pair (zero for
 * some), at displacements with gaps between blocks. Every rank counts the
 * elements it got wrong (and any write outside its blocks); the counts are
 * summed over ranks. */
#include <stdio.h>
#include <stdlib.h>

#include "comm.h"

static int64_t count(int s, int d) { return (s * 7 + d * 3) % 5 + (s == d); }
static float value(int s, int d, int64_t i) { return (float)(s * 1000 + d * 10) + (float)i * 0.5f; }

int main(int argc, char **argv) {
  moert_status st = {0};
  moert_comm *c = moert_comm_self();
  if (moert_comm_under_mpirun() && !moert_comm_mpi_create(&argc, &argv, &c, &st)) {
    fprintf(stderr, "FAIL: %s\n", st.msg);
    return 1;
  }
  int W = c->world, me = c->rank;
  int64_t *sc = calloc((size_t)W, sizeof *sc), *sd = calloc((size_t)W, sizeof *sd);
  int64_t *rc = calloc((size_t)W, sizeof *rc), *rd = calloc((size_t)W, sizeof *rd);
  int64_t stot = 0, rtot = 0;
  for (int r = 0; r < W; r++) {
    sc[r] = count(me, r);
    sd[r] = stot;
    stot += sc[r] + 2; /* a gap of 2 after every block */
    rc[r] = count(r, me);
    rd[r] = rtot;
    rtot += rc[r] + 3;
  }
  float *send = malloc(sizeof(float) * (size_t)(stot + 1)), *recv = malloc(sizeof(float) * (size_t)(rtot + 1));
  for (int64_t i = 0; i <= stot; i++) send[i] = -1;
  for (int64_t i = 0; i <= rtot; i++) recv[i] = -7; /* poison: every gap must stay -7 */
  for (int r = 0; r < W; r++)
    for (int64_t i = 0; i < sc[r]; i++) send[sd[r] + i] = value(me, r, i);
  if (!c->all_to_allv_f32(c, send, sc, sd, recv, rc, rd, &st)) {
    fprintf(stderr, "rank %d: FAIL: %s\n", me, st.msg);
    moert_comm_abort(c, 1);
  }
  int64_t wrong[1] = {0};
  for (int r = 0; r < W; r++) {
    for (int64_t i = 0; i < rc[r]; i++) wrong[0] += recv[rd[r] + i] != value(r, me, i);
    for (int64_t i = rd[r] + rc[r]; i < rd[r] + rc[r] + 3 && i <= rtot; i++) wrong[0] += recv[i] != -7;
  }
  if (!c->all_reduce_i64(c, wrong, 1, MOERT_RED_SUM, &st)) moert_comm_abort(c, 1);
  if (me == 0) printf("all_to_allv at %d ranks, uneven counts: %lld wrong elements\n%d passed, %d failed\n", W,
                      (long long)wrong[0], wrong[0] == 0, wrong[0] != 0);
  free(send), free(recv), free(sc), free(sd), free(rc), free(rd);
  if (c != moert_comm_self()) moert_comm_mpi_finalize(c);
  return wrong[0] ? 1 : 0;
}
