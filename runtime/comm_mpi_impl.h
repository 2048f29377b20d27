/* comm_mpi_impl.h — what tests see of comm_mpi.c's insides: the pure check of
 * a run's topology (so layouts that one machine cannot produce are tested
 * too) and hooks on an mpi comm. Not for the runtime's other modules. */
#ifndef MOERT_COMM_MPI_IMPL_H
#define MOERT_COMM_MPI_IMPL_H

#include <stdbool.h>
#include <stdint.h>

#include "comm.h"
#include "status.h"

/* The largest count (elements of the call's datatype) one MPI call moves per
 * peer by default: 2^28, so that no message reaches 2 GiB even for 8-byte
 * types (MPI counts are int, and several Open MPI transports misbehave at
 * 2 GiB). Longer blocks go in passes (comm_mpi.c, "Large counts"). */
#define MOERT_MPI_MAX_COUNT ((int64_t)1 << 28)

/* What each rank reports at start; all ranks all-gather it and decide alike. */
typedef struct moert_mpi_rankinfo {
  int env_local; /* MOEC_LOCAL_SIZE: 0 unset, -1 not a whole number >= 1, else its value */
  int shm_first; /* the lowest world rank of its shared-memory group */
  int shm_size;  /* ranks in its shared-memory group */
  int shm_rank;  /* its index in that group (ordered by world rank) */
} moert_mpi_rankinfo;

/* Ranks per node of a world of `world` ranks from every rank's info (and
 * env_text, this rank's MOEC_LOCAL_SIZE as written, for messages): the
 * variable when set (it must divide world), else the shared-memory groups,
 * which must all have the same size and be node-major (rank = node * L +
 * local). Fails with the message every rank prints alike. */
bool moert_comm_mpi_topology(int world, const moert_mpi_rankinfo *info, const char *env_text,
                             int *local_size, moert_status *st);

/* Test hook: the largest count per MPI call on c (0: MOERT_MPI_MAX_COUNT), so
 * the splitting of large counts runs on small buffers. Collective in spirit:
 * set the same value on every rank. */
void moert_comm_mpi_set_max_count(moert_comm *c, int64_t max_count);
/* Bytes of c's scratch for the blocking 2DH all-to-all (0 until first used). */
int64_t moert_comm_mpi_scratch_bytes(const moert_comm *c);
/* Nonblocking requests c has allocated (in flight or kept for reuse). */
int moert_comm_mpi_req_count(const moert_comm *c);

#endif
