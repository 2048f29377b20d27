/* comm.h — collectives between the ranks of a run, as a table of functions
 * (nccl-tests' and Tutel's set): all-to-all (linear or 2D-hierarchical,
 * blocking or not), all-gather, reduce-scatter, all-reduce, broadcast,
 * gather, and sub-groups. Implementations: `self` (one rank, no MPI), `mpi`
 * (host buffers; several ranks may share one GPU) and `nccl` (comm_nccl.c:
 * device buffers of the cuda backend, one GPU per rank). Buffers are host
 * memory for self and mpi; the executor passes backend memory to the float
 * collectives (f32 reductions, all-gather, reduce-scatter, all-to-all) and
 * host memory to the rest, so with a device backend and a host comm it wraps
 * the comm in a staging comm (moert_comm_staged_create); the nccl comm takes
 * device memory itself. All ranks of a comm call its collectives in the same
 * order.
 *
 * Ranks are numbered node-major: rank = node * local_size + local_rank. The
 * node of a rank comes from MPI's shared-memory split, or from the
 * environment variable MOEC_LOCAL_SIZE=n (ranks [0, n) are node 0, [n, 2n)
 * node 1, ...), so tests can simulate several nodes on one machine;
 * host_rank is where a rank really is. */
#ifndef MOERT_COMM_H
#define MOERT_COMM_H

#include <stdbool.h>
#include <stdint.h>

#include "model.h"
#include "status.h"

typedef enum { MOERT_RED_SUM, MOERT_RED_MAX } moert_red;

/* The exit status of a job that a collective's watchdog ended (--timeout). */
#define MOERT_EXIT_TIMEOUT 3
/* Seconds a roll call (below) waits for the answers, at most. */
#define MOERT_ROLL_CALL_S 10.0

/* The collectives' watchdog (--timeout), one per process, shared by a comm
 * and every comm made over it or from it (split, staged, nccl): when one
 * wait for a collective lasts past `timeout`, the comm holds a roll call
 * (every other rank is asked, on a communicator of its own, to answer within
 * min(timeout, MOERT_ROLL_CALL_S) seconds; a rank answers while it waits in
 * a collective of its own), the collective fails with a message that names
 * it, the step and the ranks that did not answer, and `fired` is set: the
 * caller ends the job with MOERT_EXIT_TIMEOUT. Only the lowest rank that
 * answered returns at once (it says why, for all); the others answer on for
 * a while, so that its abort ends them, then fail alike. */
typedef struct moert_watch {
  double timeout;      /* seconds one wait may last; 0: no limit (no watchdog) */
  int64_t step;        /* the step running, for the message (0: before the steps) */
  const char *waiting; /* the collective this process waits in (NULL: none), for roll calls */
  bool fired;          /* a collective timed out (or its comm failed on the GPU) */
} moert_watch;

typedef struct moert_comm moert_comm;
/* A nonblocking collective in flight; finished (and freed) by wait. */
typedef struct moert_req moert_req;

struct moert_comm {
  const char *name;          /* "self", "mpi", "nccl" */
  /* the float collectives take the backend's memory (the staging comm over a
   * host one, and nccl): what a device backend's executor needs */
  bool device_buffers;
  int world, rank;
  int nodes, node, local_size, local_rank;
  /* This rank's index among the ranks on its machine, and their number, from
   * MPI's shared-memory split whatever MOEC_LOCAL_SIZE says: the GPU a rank
   * takes (ranks that MOEC_LOCAL_SIZE puts on other nodes of one machine
   * still need GPUs of their own). Those of the comm a split made are its
   * local_rank and local_size. */
  int host_rank, host_size;

  /* in place, over n elements */
  bool (*all_reduce_f64)(moert_comm *c, double *x, int64_t n, moert_red op, moert_status *st);
  bool (*all_reduce_f32)(moert_comm *c, float *x, int64_t n, moert_red op, moert_status *st);
  bool (*all_reduce_i64)(moert_comm *c, int64_t *x, int64_t n, moert_red op, moert_status *st);
  /* recv[r * n .. (r+1) * n) = send of rank r; recv holds world * n */
  bool (*all_gather_f32)(moert_comm *c, const float *send, float *recv, int64_t n, moert_status *st);
  /* send holds world * n; recv (n) = the sum over ranks of their block `rank` */
  bool (*reduce_scatter_f32)(moert_comm *c, const float *send, float *recv, int64_t n,
                             moert_status *st);
  bool (*broadcast)(moert_comm *c, void *buf, int64_t bytes, int root, moert_status *st);
  /* root's recv[r * bytes ..) = send of rank r (recv ignored elsewhere) */
  bool (*gather)(moert_comm *c, const void *send, void *recv, int64_t bytes, int root,
                 moert_status *st);
  /* send holds world blocks of n floats, block r for rank r; recv gets world
   * blocks, block r from rank r. algo 2DH: inside each node first, then
   * across nodes, with the layout transforms between; its result is bitwise
   * that of LINEAR. send and recv do not overlap. */
  bool (*all_to_all_f32)(moert_comm *c, const float *send, float *recv, int64_t n,
                         moert_a2a_algo algo, moert_status *st);
  /* Uneven all-to-all: to rank r go scount[r] floats from send + sdispl[r];
   * from rank r come rcount[r] floats into recv + rdispl[r] (counts in
   * floats; each at most INT_MAX). */
  bool (*all_to_allv_f32)(moert_comm *c, const float *send, const int64_t *scount,
                          const int64_t *sdispl, float *recv, const int64_t *rcount,
                          const int64_t *rdispl, moert_status *st);
  /* The same, started now and finished by wait; send and recv must stay
   * untouched until then. Several may be in flight. */
  bool (*all_to_all_start)(moert_comm *c, const float *send, float *recv, int64_t n,
                           moert_a2a_algo algo, moert_req **req, moert_status *st);
  bool (*wait)(moert_comm *c, moert_req *req, moert_status *st);
  /* Optional (NULL: the comm has no stream of its own). When `marks` is set
   * (the executor sets it when tracing), all_to_all_start makes two timing
   * marks of the backend (backend.h) on the comm's own stream: where the
   * exchange begins to run there and where it ends; req_marks gives them
   * (-1 when not made), between start and wait. */
  void (*req_marks)(moert_comm *c, const moert_req *req, int *begin, int *end);
  bool marks;
  /* A comm of the ranks that pass the same color, ordered by key (MPI_Comm_split);
   * its topology is recomputed. Destroy it before its parent. */
  bool (*split)(moert_comm *c, int color, int key, moert_comm **out, moert_status *st);
  bool (*barrier)(moert_comm *c, moert_status *st);
  /* Whether the float collectives only enqueue work on the backend's stream
   * (nothing waits for the device, nothing moves through the host), so a
   * CUDA graph can capture them: nccl, and a staged comm of one rank. */
  bool capturable;
  /* The watchdog (NULL: waits have no limit); a comm made over or from c
   * takes c's. Set it on the host comm before making the others. */
  moert_watch *watch;
  /* Optional (NULL: a world of one, nobody to call): a collective `what` of
   * c, or of a comm over it, waited `waited` seconds past the watch's
   * timeout, or failed for `why` (NULL: it timed out). Holds the roll call
   * over every rank of the job, records the message in st, sets the watch's
   * fired, and returns false (the caller ends the job). */
  bool (*timed_out)(moert_comm *c, const char *what, double waited, const char *why, moert_status *st);
  void (*destroy)(moert_comm *c);
  void *impl;
};

/* A comm over `inner` (host buffers) whose float collectives take backend
 * memory of b, copied through host buffers it keeps (grown as needed, freed
 * by destroy, which does not destroy inner). Nonblocking all-to-alls finish
 * at start (staging needs the data). */
typedef struct moert_backend moert_backend;
bool moert_comm_staged_create(moert_comm *inner, moert_backend *b, moert_comm **out, moert_status *st);

/* The nccl comm (comm_nccl.c) over the ranks of `host` (self or mpi, host
 * buffers), on the cuda backend b: libnccl.so.2 is opened with dlopen. The
 * float collectives take device memory of b and are enqueued on b's stream
 * (moert_backend_cuda_stream), in order with its kernels and without a host
 * synchronization (a download of b waits for them); the nonblocking
 * all-to-all runs on a stream of the comm, ordered by events (wait makes b's
 * stream wait for it). The f64/i64 all-reduces, broadcast, gather and barrier
 * take host memory and go to host. Collective over host: bootstraps NCCL's
 * unique id over it, and fails on every rank alike when two ranks share a GPU
 * (NCCL needs one GPU per rank) or a rank cannot load NCCL. The comm keeps
 * host and b (destroy neither; destroy it first). With host =
 * moert_comm_self() no MPI is needed. */
bool moert_comm_nccl_create(moert_comm *host, moert_backend *b, moert_comm **out, moert_status *st);
/* Whether the nccl comm can run over host on b, alike on every rank
 * (collective over host): every rank has NCCL, the cuda backend and a GPU of
 * its own (no two ranks on one host with one PCI bus id). False is no
 * failure; st is for the host comm's. For choosing the default comm. */
bool moert_comm_nccl_fits(moert_comm *host, moert_backend *b, bool *fits, moert_status *st);
/* Whether libnccl.so.2 loads with every function the nccl comm calls (false,
 * quietly, in a build without nccl.h). Touches no GPU. */
bool moert_nccl_available(void);
/* For code that calls NCCL itself (bench/gpu/a2a_bench.c's reference): a
 * function of the library the nccl comm loaded (NULL when NCCL does not load
 * or lacks it), and NCCL's text for a result code with its last error's
 * detail. */
void *moert_nccl_symbol(const char *name);
const char *moert_nccl_strerror(int result);

/* A world of one rank: collectives copy or do nothing. Static; destroy is a no-op. */
moert_comm *moert_comm_self(void);
/* Whether this process was started by mpirun (Open MPI, MPICH or Slurm's
 * environment variables), so that MPI should be initialized. */
bool moert_comm_under_mpirun(void);
/* MPI_Init (thread level FUNNELED) and the world comm with its topology.
 * Fails with a clear message when MPI cannot start. moert_comm_mpi_finalize
 * destroys it and calls MPI_Finalize. */
bool moert_comm_mpi_create(int *argc, char ***argv, moert_comm **out, moert_status *st);
void moert_comm_mpi_finalize(moert_comm *c);
/* MPI's text for a result code (one buffer: MPI is called from one thread). */
const char *moert_mpi_strerror(int code);
/* Stops every rank now (a failure on one rank must not leave the others
 * waiting in a collective forever): MPI_Abort with the exit code. */
void moert_comm_abort(moert_comm *c, int code);

#endif
