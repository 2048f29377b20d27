/* fake_nccl.c — a stand-in for libnccl.so.2 over MPI, for the CPU emulation
 * of the CUDA stack (tests/emu): what runtime/comm_nccl.c and
 * bench/gpu/a2a_bench.c call, with NCCL's prototypes (nccl.h) and semantics,
 * on "device" buffers that are host memory (the stand-in libcuda's).
 *
 * What it is. Every process is one rank (one GPU per process, as comm_nccl.c
 * requires); a communicator is an MPI communicator of its ranks in NCCL rank
 * order. A call returns when its work is done (the stream only decides
 * whether it is captured, below), so there are no asynchronous errors but
 * those of a replayed graph and of a group that gave up waiting for its
 * peers (MOEC_EMU_NCCL_PEER_TIMEOUT, below run_ops) (ncclCommGetAsyncError). Sends,
 * receives and collectives inside ncclGroupStart/End are queued and all
 * started at the outermost ncclGroupEnd (nonblocking MPI, in call order), then
 * completed together, so no pattern of sends and receives within a group
 * deadlocks; outside a group each call is a group of its own. A send to
 * oneself is paired with the group's receive from oneself (in order) and
 * copied. A communicator of one rank needs no MPI (comm_nccl.c makes one over
 * moert_comm_self, with or without MPI_Init).
 *
 * Stream capture (emu_capture.h). When the stand-in libcuda.so.1 is loaded
 * and the stream of a group's calls (or of a call outside a group) is
 * capturing, the outermost ncclGroupEnd checks the group (the pairing of
 * sends and receives to oneself) and records it, a private copy of its
 * queued calls, as a host node on that stream instead of running it: each
 * replay of the graph runs its MPI operations again, on the buffers as they
 * are then; a failure at a replay is printed and kept as the async error of
 * the group's communicators (ncclCommGetAsyncError); a graph must not run
 * after one of its communicators is destroyed, as with NCCL. A captured
 * group must put all its calls on one stream (else ncclInvalidUsage); a node
 * the driver refuses (an invalidated capture) fails ncclGroupEnd with
 * ncclUnhandledCudaError.
 *
 * What it is not. No GPU, no overlap with anything, no speed. Reductions on
 * the integer types, ncclFloat32 and ncclFloat64 with ncclSum, ncclProd,
 * ncclMax and ncclMin; the 16- and 8-bit float types are moved (send, receive,
 * all-gather) but not reduced, and ncclAvg and ops made by ncclRedOpCreate*
 * are refused with ncclInvalidArgument. At most INT_MAX elements per call and
 * peer (MPI counts are int). Calls from one thread. Only the functions
 * below exist.
 *
 * Creating a communicator (ncclCommInitRank). The unique id holds the
 * MPI_COMM_WORLD rank of the process that made it (its maker) and the maker's
 * count of ids. Assumption: the maker is itself a member, and every member is
 * a process of MPI_COMM_WORLD; comm_nccl.c keeps it (rank 0 of the host comm
 * makes the id, broadcasts it, and every rank of the host comm calls
 * ncclCommInitRank). Then the members meet without the rest of the world:
 * each sends (nranks, rank) to the maker, which checks that they agree (one
 * nranks, every rank once) and answers every member with the verdict and the
 * world rank of each NCCL rank; the members make their communicator with
 * MPI_Comm_create_group, which is collective over them alone. So any subset of
 * the world may create a communicator while others create theirs. A
 * disagreement fails on every member with ncclInvalidUsage; a member that
 * never calls (or a maker that is not a member) leaves the others waiting, as
 * NCCL does. The meeting uses MPI_COMM_WORLD with tags from RDV_TAG_BASE up,
 * which the program must not use for its own messages there. */
#include <cuda.h>
#include <limits.h>
#include <mpi.h>
#include <nccl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "emu_capture.h"

struct ncclComm {
  MPI_Comm mpi; /* the ranks in NCCL order; MPI_COMM_NULL for one rank made without MPI */
  int rank, nranks;
  ncclResult_t async_error; /* of a replayed graph */
};

/* ------------------------------------------------------------ errors */

static char last_error[512];

static ncclResult_t fail(ncclResult_t r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static ncclResult_t fail(ncclResult_t r, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(last_error, sizeof last_error, fmt, ap);
  va_end(ap);
  return r;
}

/* An MPI failure: the call's name and MPI's text. */
static ncclResult_t mpi_fail(int code, const char *call) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) snprintf(text, sizeof text, "MPI error %d", code);
  return fail(ncclSystemError, "%.*s failed: %s", (int)strcspn(call, "("), call, text);
}

#define MPI_TRY(call)                                                                          \
  do {                                                                                         \
    int rc_ = (call);                                                                          \
    if (rc_ != MPI_SUCCESS) return mpi_fail(rc_, #call);                                       \
  } while (0)

const char *ncclGetErrorString(ncclResult_t result) {
  switch (result) {
  case ncclSuccess: return "no error";
  case ncclUnhandledCudaError: return "unhandled cuda error";
  case ncclSystemError: return "unhandled system error (in the stand-in: an MPI call failed)";
  case ncclInternalError: return "internal error";
  case ncclInvalidArgument: return "invalid argument";
  case ncclInvalidUsage: return "invalid usage";
  case ncclRemoteError: return "remote process exited or there was a network error";
  case ncclInProgress: return "NCCL operation in progress";
  default: return "unknown result code";
  }
}

const char *ncclGetLastError(ncclComm_t comm) {
  (void)comm;
  return last_error;
}

ncclResult_t ncclGetVersion(int *version) {
  if (!version) return fail(ncclInvalidArgument, "ncclGetVersion: version is NULL");
  *version = NCCL_VERSION_CODE;
  return ncclSuccess;
}

/* ------------------------------------------------------------ types and ops */

/* The MPI type of t and its size; *reducible: the stand-in can reduce it. */
static bool type_of(ncclDataType_t t, MPI_Datatype *mt, size_t *size, bool *reducible) {
  *reducible = true;
  switch (t) {
  case ncclInt8: *mt = MPI_INT8_T, *size = 1; return true;
  case ncclUint8: *mt = MPI_UINT8_T, *size = 1; return true;
  case ncclInt32: *mt = MPI_INT32_T, *size = 4; return true;
  case ncclUint32: *mt = MPI_UINT32_T, *size = 4; return true;
  case ncclInt64: *mt = MPI_INT64_T, *size = 8; return true;
  case ncclUint64: *mt = MPI_UINT64_T, *size = 8; return true;
  case ncclFloat32: *mt = MPI_FLOAT, *size = 4; return true;
  case ncclFloat64: *mt = MPI_DOUBLE, *size = 8; return true;
  default: break;
  }
  *reducible = false;
  switch (t) {
  case ncclFloat16:
  case ncclBfloat16: *mt = MPI_UINT16_T, *size = 2; return true;
  case ncclFloat8e4m3:
  case ncclFloat8e5m2: *mt = MPI_UINT8_T, *size = 1; return true;
  default: return false;
  }
}

static bool op_of(ncclRedOp_t op, MPI_Op *mop) {
  switch (op) {
  case ncclSum: *mop = MPI_SUM; return true;
  case ncclProd: *mop = MPI_PROD; return true;
  case ncclMax: *mop = MPI_MAX; return true;
  case ncclMin: *mop = MPI_MIN; return true;
  default: return false;
  }
}

/* ------------------------------------------------------------ communicators */

/* The unique id's content. */
typedef struct emu_id {
  char magic[16]; /* ID_MAGIC: made by this library */
  int maker;      /* MPI_COMM_WORLD rank of the maker; -1: made without MPI */
  int serial;     /* the maker's count of ids before this one */
} emu_id;
_Static_assert(sizeof(emu_id) <= sizeof(ncclUniqueId), "the stand-in's id must fit ncclUniqueId");
static const char ID_MAGIC[16] = "moec-emu-nccl";

/* The meeting of the members of id serial s on MPI_COMM_WORLD: joins (member
 * to maker) on tag RDV_TAG_BASE + 3 * (s % RDV_IDS), the answers one above,
 * MPI_Comm_create_group two above. An id's tags come back after RDV_IDS ids
 * of one maker; MPI guarantees tags up to 32767. */
#define RDV_TAG_BASE 16384
#define RDV_IDS 5000

/* Whether MPI can be called: initialized and not finalized. */
static bool mpi_up(void) {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  if (init) MPI_Finalized(&fin);
  return init && !fin;
}

ncclResult_t ncclGetUniqueId(ncclUniqueId *uniqueId) {
  static int serial;
  if (!uniqueId) return fail(ncclInvalidArgument, "ncclGetUniqueId: uniqueId is NULL");
  emu_id id = {.maker = -1, .serial = serial++};
  memcpy(id.magic, ID_MAGIC, sizeof id.magic);
  if (mpi_up()) MPI_TRY(MPI_Comm_rank(MPI_COMM_WORLD, &id.maker));
  memset(uniqueId, 0, sizeof *uniqueId);
  memcpy(uniqueId->internal, &id, sizeof id);
  return ncclSuccess;
}

/* What a member sends the maker, and the maker's verdict. */
typedef struct rdv_join {
  int nranks, rank;
} rdv_join;
typedef struct rdv_verdict {
  char error[256]; /* empty: the members agree, the world ranks follow */
} rdv_verdict;

/* The maker's side: receives the nranks - 1 joins, checks them and answers
 * every member; world[r] is the MPI_COMM_WORLD rank of NCCL rank r. */
static ncclResult_t rdv_collect(int tag, int nranks, int rank, int me, int *world, rdv_verdict *v) {
  int *from = malloc(sizeof *from * (size_t)nranks);
  if (!from) return fail(ncclSystemError, "ncclCommInitRank: out of memory");
  for (int r = 0; r < nranks; r++) world[r] = -1;
  world[rank] = me;
  memset(v, 0, sizeof *v);
  for (int k = 0; k < nranks - 1; k++) {
    rdv_join j;
    MPI_Status s;
    int rc = MPI_Recv(&j, 2, MPI_INT, MPI_ANY_SOURCE, tag, MPI_COMM_WORLD, &s);
    if (rc != MPI_SUCCESS) {
      free(from);
      return mpi_fail(rc, "MPI_Recv");
    }
    from[k] = s.MPI_SOURCE;
    if (v->error[0]) continue;
    if (j.nranks != nranks)
      snprintf(v->error, sizeof v->error, "MPI ranks %d and %d gave one id different nranks (%d and %d)", me,
               s.MPI_SOURCE, nranks, j.nranks);
    else if (world[j.rank] >= 0)
      snprintf(v->error, sizeof v->error, "MPI ranks %d and %d both asked to be NCCL rank %d of one id",
               world[j.rank], s.MPI_SOURCE, j.rank);
    else
      world[j.rank] = s.MPI_SOURCE;
  }
  for (int k = 0; k < nranks - 1; k++) {
    int rc = MPI_Send(v, (int)sizeof *v, MPI_CHAR, from[k], tag + 1, MPI_COMM_WORLD);
    if (rc == MPI_SUCCESS && !v->error[0]) rc = MPI_Send(world, nranks, MPI_INT, from[k], tag + 1, MPI_COMM_WORLD);
    if (rc != MPI_SUCCESS) {
      free(from);
      return mpi_fail(rc, "MPI_Send");
    }
  }
  free(from);
  return ncclSuccess;
}

/* The MPI communicator of the members of id (see the file comment). */
static ncclResult_t rendezvous(const emu_id *id, int nranks, int rank, MPI_Comm *out) {
  int me, size;
  MPI_TRY(MPI_Comm_rank(MPI_COMM_WORLD, &me));
  MPI_TRY(MPI_Comm_size(MPI_COMM_WORLD, &size));
  if (nranks > size)
    return fail(ncclInvalidUsage, "ncclCommInitRank: %d ranks, but MPI_COMM_WORLD has only %d processes (the "
                                  "stand-in runs one rank per process)", nranks, size);
  if (id->maker < 0 || id->maker >= size)
    return fail(ncclInvalidUsage, "ncclCommInitRank: the id of %d ranks was made %s", nranks,
                id->maker < 0 ? "before MPI_Init (the stand-in then makes communicators of one rank only)"
                              : "by a process of another MPI_COMM_WORLD");
  const int tag = RDV_TAG_BASE + 3 * (id->serial % RDV_IDS);
  int *world = malloc(sizeof *world * (size_t)nranks);
  if (!world) return fail(ncclSystemError, "ncclCommInitRank: out of memory");
  rdv_verdict v;
  ncclResult_t r = ncclSuccess;
  if (me == id->maker) {
    r = rdv_collect(tag, nranks, rank, me, world, &v);
  } else {
    rdv_join j = {nranks, rank};
    int rc = MPI_Send(&j, 2, MPI_INT, id->maker, tag, MPI_COMM_WORLD);
    if (rc == MPI_SUCCESS)
      rc = MPI_Recv(&v, (int)sizeof v, MPI_CHAR, id->maker, tag + 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    if (rc == MPI_SUCCESS && !v.error[0])
      rc = MPI_Recv(world, nranks, MPI_INT, id->maker, tag + 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) r = mpi_fail(rc, "MPI_Send/MPI_Recv (the meeting of ncclCommInitRank)");
  }
  if (r == ncclSuccess && v.error[0])
    r = fail(ncclInvalidUsage, "ncclCommInitRank: the ranks of one id disagree: %s", v.error);
  if (r == ncclSuccess) {
    MPI_Group wg = MPI_GROUP_NULL, g = MPI_GROUP_NULL;
    int rc = MPI_Comm_group(MPI_COMM_WORLD, &wg);
    if (rc == MPI_SUCCESS) rc = MPI_Group_incl(wg, nranks, world, &g);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_create_group(MPI_COMM_WORLD, g, tag + 2, out);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_set_errhandler(*out, MPI_ERRORS_RETURN);
    if (rc != MPI_SUCCESS) r = mpi_fail(rc, "MPI_Comm_create_group");
    if (g != MPI_GROUP_NULL) MPI_Group_free(&g);
    if (wg != MPI_GROUP_NULL) MPI_Group_free(&wg);
  }
  free(world);
  return r;
}

static ncclResult_t comm_new(MPI_Comm mpi, int rank, int nranks, ncclComm_t *out) {
  ncclComm_t c = malloc(sizeof *c);
  if (!c) {
    if (mpi != MPI_COMM_NULL) MPI_Comm_free(&mpi);
    return fail(ncclSystemError, "out of memory for a communicator");
  }
  *c = (struct ncclComm){.mpi = mpi, .rank = rank, .nranks = nranks};
  *out = c;
  return ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId commId, int rank) {
  emu_id id;
  memcpy(&id, commId.internal, sizeof id);
  if (!comm) return fail(ncclInvalidArgument, "ncclCommInitRank: comm is NULL");
  *comm = NULL;
  if (memcmp(id.magic, ID_MAGIC, sizeof id.magic) != 0)
    return fail(ncclInvalidArgument, "ncclCommInitRank: the id was not made by ncclGetUniqueId of this library");
  if (nranks < 1 || rank < 0 || rank >= nranks)
    return fail(ncclInvalidArgument, "ncclCommInitRank: rank %d of %d ranks", rank, nranks);
  if (nranks == 1) return comm_new(MPI_COMM_NULL, 0, 1, comm);
  if (!mpi_up())
    return fail(ncclInvalidUsage, "ncclCommInitRank: the stand-in runs over MPI: a communicator of %d ranks "
                                  "needs MPI_Init first", nranks);
  MPI_Comm mpi = MPI_COMM_NULL;
  ncclResult_t r = rendezvous(&id, nranks, rank, &mpi);
  return r != ncclSuccess ? r : comm_new(mpi, rank, nranks, comm);
}

/* Collective over comm, as MPI_Comm_split: ranks of one color, ordered by
 * key then by rank in comm. A bad color still takes part (as no color), so
 * that the other ranks do not wait. */
ncclResult_t ncclCommSplit(ncclComm_t comm, int color, int key, ncclComm_t *newcomm, ncclConfig_t *config) {
  (void)config;
  if (!comm || !newcomm) return fail(ncclInvalidArgument, "ncclCommSplit: comm or newcomm is NULL");
  *newcomm = NULL;
  bool bad = color < 0 && color != NCCL_SPLIT_NOCOLOR;
  bool none = color < 0;
  MPI_Comm mpi = MPI_COMM_NULL;
  if (comm->mpi != MPI_COMM_NULL) {
    MPI_TRY(MPI_Comm_split(comm->mpi, none ? MPI_UNDEFINED : color, key, &mpi));
    if (mpi != MPI_COMM_NULL) MPI_TRY(MPI_Comm_set_errhandler(mpi, MPI_ERRORS_RETURN));
  }
  if (bad)
    return fail(ncclInvalidArgument, "ncclCommSplit: color %d (colors are 0 or more, or NCCL_SPLIT_NOCOLOR)", color);
  if (none) return ncclSuccess;
  if (comm->mpi == MPI_COMM_NULL) return comm_new(MPI_COMM_NULL, 0, 1, newcomm);
  int rank, nranks;
  MPI_TRY(MPI_Comm_rank(mpi, &rank));
  MPI_TRY(MPI_Comm_size(mpi, &nranks));
  return comm_new(mpi, rank, nranks, newcomm);
}

ncclResult_t ncclCommCount(const ncclComm_t comm, int *count) {
  if (!comm || !count) return fail(ncclInvalidArgument, "ncclCommCount: comm or count is NULL");
  *count = comm->nranks;
  return ncclSuccess;
}

ncclResult_t ncclCommUserRank(const ncclComm_t comm, int *rank) {
  if (!comm || !rank) return fail(ncclInvalidArgument, "ncclCommUserRank: comm or rank is NULL");
  *rank = comm->rank;
  return ncclSuccess;
}

/* Every operation returns done: only a replayed graph, or a group that gave
 * up on its peers (MOEC_EMU_NCCL_PEER_TIMEOUT), fails later. */
ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *asyncError) {
  if (!comm || !asyncError) return fail(ncclInvalidArgument, "ncclCommGetAsyncError: comm or asyncError is NULL");
  *asyncError = comm->async_error;
  return ncclSuccess;
}

/* ------------------------------------------------------------ groups */

typedef enum { OP_SEND, OP_RECV, OP_ALL_REDUCE, OP_REDUCE_SCATTER, OP_ALL_GATHER } op_kind;

/* One queued call. count: of the message (send, recv), of the result
 * (all-reduce), of each rank's block (reduce-scatter, all-gather). */
typedef struct queued {
  op_kind kind;
  ncclComm_t comm;
  const void *send;
  void *recv;
  size_t count, size; /* size: of an element */
  MPI_Datatype type;
  MPI_Op red;
  int peer;           /* send, recv */
  cudaStream_t stream;
  bool paired;        /* send to or receive from oneself: copied */
  void *tmp;          /* in-place reduce-scatter: the result until the group completes */
} queued;

/* nccl.h declares them with () for C++: the prototypes */
ncclResult_t ncclGroupStart(void);
ncclResult_t ncclGroupEnd(void);

static struct {
  queued *ops;
  int n, cap;
  int depth; /* of nested ncclGroupStart */
} grp;

/* The queue's storage, at dlclose or exit. */
__attribute__((destructor)) static void grp_release(void) { free(grp.ops); }

ncclResult_t ncclGroupStart(void) {
  grp.depth++;
  return ncclSuccess;
}

/* Pairs each receive from oneself with the next send to oneself on its comm
 * and copies (when copy is true); every one must have its partner, of the
 * same size. */
static ncclResult_t pair_self(queued *ops, int n, bool copy) {
  for (int i = 0; i < n; i++) {
    queued *rv = &ops[i];
    if (rv->kind != OP_RECV || rv->peer != rv->comm->rank) continue;
    queued *sd = NULL;
    for (int j = 0; j < n && !sd; j++)
      if (ops[j].kind == OP_SEND && ops[j].comm == rv->comm && ops[j].peer == rv->comm->rank && !ops[j].paired)
        sd = &ops[j];
    if (!sd) return fail(ncclInvalidUsage, "ncclRecv from itself (rank %d) with no ncclSend to itself in the group",
                         rv->peer);
    if (sd->count * sd->size != rv->count * rv->size)
      return fail(ncclInvalidUsage, "rank %d sends itself %zu bytes but receives %zu", rv->peer,
                  sd->count * sd->size, rv->count * rv->size);
    if (copy && rv->count > 0) memmove(rv->recv, sd->send, rv->count * rv->size);
    sd->paired = rv->paired = true;
  }
  for (int i = 0; i < n; i++)
    if (ops[i].kind == OP_SEND && ops[i].peer == ops[i].comm->rank && !ops[i].paired)
      return fail(ncclInvalidUsage, "ncclSend to itself (rank %d) with no ncclRecv from itself in the group",
                  ops[i].peer);
  return ncclSuccess;
}

/* Starts o (*req stays MPI_REQUEST_NULL when o is done at once). */
static ncclResult_t start(queued *o, MPI_Request *req) {
  const ncclComm_t c = o->comm;
  const int n = (int)o->count;
  const size_t bytes = o->count * o->size;
  if (o->paired) return ncclSuccess;
  switch (o->kind) {
  case OP_SEND: MPI_TRY(MPI_Isend(o->send, n, o->type, o->peer, 0, c->mpi, req)); return ncclSuccess;
  case OP_RECV: MPI_TRY(MPI_Irecv(o->recv, n, o->type, o->peer, 0, c->mpi, req)); return ncclSuccess;
  default: break;
  }
  if (c->nranks == 1) { /* every collective of one rank is a copy */
    if (bytes > 0 && o->send != o->recv) memmove(o->recv, o->send, bytes);
    return ncclSuccess;
  }
  switch (o->kind) {
  case OP_ALL_REDUCE:
    MPI_TRY(MPI_Iallreduce(o->send == o->recv ? MPI_IN_PLACE : o->send, o->recv, n, o->type, o->red, c->mpi, req));
    break;
  case OP_ALL_GATHER: /* in place: send is this rank's block of recv */
    if (o->send == (char *)o->recv + (size_t)c->rank * bytes)
      MPI_TRY(MPI_Iallgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, o->recv, n, o->type, c->mpi, req));
    else
      MPI_TRY(MPI_Iallgather(o->send, n, o->type, o->recv, n, o->type, c->mpi, req));
    break;
  default: /* OP_REDUCE_SCATTER; in place: recv is this rank's block of send, which MPI cannot alias */
    if (o->recv == (const char *)o->send + (size_t)c->rank * bytes) {
      if (!(o->tmp = malloc(bytes ? bytes : 1))) return fail(ncclSystemError, "ncclReduceScatter: out of memory");
      MPI_TRY(MPI_Ireduce_scatter_block(o->send, o->tmp, n, o->type, o->red, c->mpi, req));
    } else {
      MPI_TRY(MPI_Ireduce_scatter_block(o->send, o->recv, n, o->type, o->red, c->mpi, req));
    }
    break;
  }
  return ncclSuccess;
}

/* MOEC_EMU_NCCL_PEER_TIMEOUT=S (seconds; unset or 0: none): how long a
 * group waits for its peers before it gives up, as NCCL does when it loses a
 * peer's connection: the call returns (NCCL's calls return once enqueued),
 * the group's communicators get ncclRemoteError as their async error
 * (ncclCommGetAsyncError) and last_error says which rank and why. What was
 * started stays in flight (MPI cannot cancel a collective): its buffers may
 * still change, and the communicator is only good for ncclCommAbort, as
 * NCCL's after such an error. For comm_nccl.c's watchdog tests (a rank that
 * stops while the others wait for it). */
static double peer_timeout(void) {
  static double t = -1;
  if (t < 0) {
    const char *e = getenv("MOEC_EMU_NCCL_PEER_TIMEOUT");
    t = e ? atof(e) : 0;
    if (!(t > 0)) t = 0;
  }
  return t;
}

static double seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* MPI_Waitall of n requests, or, under MOEC_EMU_NCCL_PEER_TIMEOUT, polled
 * until the timeout; *lost: it passed (the requests are left in flight). */
static int wait_peers(int n, MPI_Request *reqs, bool *lost) {
  *lost = false;
  const double limit = peer_timeout();
  if (limit <= 0) return MPI_Waitall(n, reqs, MPI_STATUSES_IGNORE);
  const double t0 = seconds();
  for (;;) {
    int done = 0, rc = MPI_Testall(n, reqs, &done, MPI_STATUSES_IGNORE);
    if (rc != MPI_SUCCESS || done) return rc;
    if (seconds() - t0 > limit) {
      *lost = true;
      return MPI_SUCCESS;
    }
    nanosleep(&(struct timespec){0, 1000000L}, NULL);
  }
}

/* Runs the n calls of ops (of one group). */
static ncclResult_t run_ops(queued *ops, int n) {
  ncclResult_t r = ncclSuccess;
  MPI_Request *reqs = malloc(sizeof *reqs * (size_t)(n ? n : 1));
  if (!reqs) r = fail(ncclSystemError, "ncclGroupEnd: out of memory");
  if (r == ncclSuccess) r = pair_self(ops, n, true);
  int started = 0, posted = 0; /* posted: calls of MPI's (none on a comm without MPI) */
  for (; r == ncclSuccess && started < n; started++) {
    reqs[started] = MPI_REQUEST_NULL;
    r = start(&ops[started], &reqs[started]);
    if (r != ncclSuccess) reqs[started] = MPI_REQUEST_NULL;
    posted += reqs[started] != MPI_REQUEST_NULL;
  }
  /* what was started is completed, even after a failure: MPI writes into the buffers until then */
  bool lost = false;
  if (posted > 0) {
    int rc = wait_peers(started, reqs, &lost);
    if (rc != MPI_SUCCESS && r == ncclSuccess) r = mpi_fail(rc, "MPI_Waitall");
  }
  if (lost) { /* MPI may still write into the buffers: tmp stays (leaked on purpose) */
    int me = 0;
    if (mpi_up()) MPI_Comm_rank(MPI_COMM_WORLD, &me);
    snprintf(last_error, sizeof last_error, "emu: a group of rank %d waited more than %g s for its peers "
             "(MOEC_EMU_NCCL_PEER_TIMEOUT): a peer's connection is lost", me, peer_timeout());
    for (int i = 0; i < n; i++)
      if (ops[i].comm->async_error == ncclSuccess) ops[i].comm->async_error = ncclRemoteError;
    free(reqs);
    return ncclSuccess;
  }
  for (int i = 0; i < n; i++) {
    queued *o = &ops[i];
    if (o->tmp && r == ncclSuccess) memcpy(o->recv, o->tmp, o->count * o->size);
    free(o->tmp);
    o->tmp = NULL;
  }
  free(reqs);
  return r;
}

/* A group recorded in a capture: its calls as queued (none paired yet). */
typedef struct recorded {
  int n;
  queued ops[];
} recorded;

/* A recorded group, at a replay of its graph: runs a copy of its calls. */
static void replay(void *data) {
  const recorded *g = data;
  queued *ops = malloc(sizeof *ops * (size_t)(g->n ? g->n : 1));
  ncclResult_t r = ops ? ncclSuccess : fail(ncclSystemError, "a replayed group: out of memory");
  if (ops) {
    memcpy(ops, g->ops, sizeof *ops * (size_t)g->n);
    r = run_ops(ops, g->n);
  }
  if (r != ncclSuccess) {
    fprintf(stderr, "moec emu: an NCCL group in a CUDA graph failed at its replay: %s\n", last_error);
    for (int i = 0; i < g->n; i++)
      if (g->ops[i].comm->async_error == ncclSuccess) g->ops[i].comm->async_error = r;
  }
  free(ops);
}

/* Records the queued group into its stream's capture (see the file comment). */
static ncclResult_t record_group(const emu_cuda_fns *cu) {
  for (int i = 1; i < grp.n; i++)
    if (grp.ops[i].stream != grp.ops[0].stream)
      return fail(ncclInvalidUsage, "ncclGroupEnd: a group on a capturing stream puts its calls on more than one "
                                    "stream (the stand-in records a group on one stream only)");
  recorded *g = malloc(sizeof *g + sizeof *g->ops * (size_t)grp.n);
  if (!g) return fail(ncclSystemError, "ncclGroupEnd: out of memory for a captured group");
  g->n = grp.n;
  memcpy(g->ops, grp.ops, sizeof *g->ops * (size_t)grp.n);
  ncclResult_t r = pair_self(g->ops, g->n, false); /* its checks now, as ncclGroupEnd's */
  for (int i = 0; i < g->n; i++) g->ops[i].paired = false;
  CUresult cr = r == ncclSuccess ? cu->launch_owned((CUstream)grp.ops[0].stream, replay, g, free) : CUDA_SUCCESS;
  if (cr != CUDA_SUCCESS)
    r = fail(ncclUnhandledCudaError, "ncclGroupEnd on a capturing stream: the driver refused its node: %s",
             emu_cuda_error(cu, cr));
  if (r != ncclSuccess) free(g);
  return r;
}

/* Runs the queued calls, or records them when their stream is capturing, and
 * empties the queue. */
static ncclResult_t run_group(void) {
  const emu_cuda_fns *cu = grp.n ? emu_cuda() : NULL;
  bool defer = false;
  for (int i = 0; cu && i < grp.n && !defer; i++) defer = emu_cuda_defers(cu, (CUstream)grp.ops[i].stream);
  ncclResult_t r = defer ? record_group(cu) : run_ops(grp.ops, grp.n);
  grp.n = 0;
  return r;
}

ncclResult_t ncclGroupEnd(void) {
  if (grp.depth == 0) return fail(ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart");
  return --grp.depth ? ncclSuccess : run_group();
}

/* Queues o (after its checks), and runs it at once outside a group. */
static ncclResult_t enqueue(const char *fn, queued o, ncclDataType_t type, ncclRedOp_t red, bool reduces) {
  bool reducible;
  if (!o.comm) return fail(ncclInvalidArgument, "%s: comm is NULL", fn);
  if (!type_of(type, &o.type, &o.size, &reducible))
    return fail(ncclInvalidArgument, "%s: unknown datatype %d", fn, (int)type);
  if (reduces && !op_of(red, &o.red))
    return fail(ncclInvalidArgument, "%s: reduction op %d is not one the stand-in has (ncclSum, ncclProd, ncclMax, "
                                     "ncclMin)", fn, (int)red);
  if (reduces && !reducible)
    return fail(ncclInvalidArgument, "%s: the stand-in does not reduce datatype %d (16- and 8-bit floats are "
                                     "only moved)", fn, (int)type);
  if (o.count > INT_MAX)
    return fail(ncclInvalidArgument, "%s: count %zu is more than the stand-in's limit, INT_MAX", fn, o.count);
  if (o.count > 0 && ((o.kind != OP_RECV && !o.send) || (o.kind != OP_SEND && !o.recv)))
    return fail(ncclInvalidArgument, "%s: a buffer is NULL", fn);
  if ((o.kind == OP_SEND || o.kind == OP_RECV) && (o.peer < 0 || o.peer >= o.comm->nranks))
    return fail(ncclInvalidArgument, "%s: peer %d is not a rank of the communicator (0 to %d)", fn, o.peer,
                o.comm->nranks - 1);
  if (grp.n == grp.cap) {
    int cap = grp.cap ? 2 * grp.cap : 64;
    queued *ops = realloc(grp.ops, sizeof *ops * (size_t)cap);
    if (!ops) return fail(ncclSystemError, "%s: out of memory for the group's calls", fn);
    grp.ops = ops;
    grp.cap = cap;
  }
  grp.ops[grp.n++] = o;
  return grp.depth ? ncclSuccess : run_group();
}

/* Removes comm's queued calls; how many there were. */
static int forget_ops(ncclComm_t comm) {
  int kept = 0, n = grp.n;
  for (int i = 0; i < grp.n; i++)
    if (grp.ops[i].comm != comm) grp.ops[kept++] = grp.ops[i];
  grp.n = kept;
  return n - kept;
}

/* ------------------------------------------------------------ operations */

ncclResult_t ncclSend(const void *sendbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
  return enqueue("ncclSend",
                 (queued){.kind = OP_SEND, .comm = comm, .send = sendbuff, .count = count, .peer = peer,
                          .stream = stream},
                 datatype, ncclSum, false);
}

ncclResult_t ncclRecv(void *recvbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
  return enqueue("ncclRecv",
                 (queued){.kind = OP_RECV, .comm = comm, .recv = recvbuff, .count = count, .peer = peer,
                          .stream = stream},
                 datatype, ncclSum, false);
}

ncclResult_t ncclAllReduce(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype,
                           ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
  return enqueue("ncclAllReduce",
                 (queued){.kind = OP_ALL_REDUCE, .comm = comm, .send = sendbuff, .recv = recvbuff, .count = count,
                          .stream = stream},
                 datatype, op, true);
}

ncclResult_t ncclReduceScatter(const void *sendbuff, void *recvbuff, size_t recvcount, ncclDataType_t datatype,
                               ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
  return enqueue("ncclReduceScatter",
                 (queued){.kind = OP_REDUCE_SCATTER, .comm = comm, .send = sendbuff, .recv = recvbuff,
                          .count = recvcount, .stream = stream},
                 datatype, op, true);
}

ncclResult_t ncclAllGather(const void *sendbuff, void *recvbuff, size_t sendcount, ncclDataType_t datatype,
                           ncclComm_t comm, cudaStream_t stream) {
  return enqueue("ncclAllGather",
                 (queued){.kind = OP_ALL_GATHER, .comm = comm, .send = sendbuff, .recv = recvbuff, .count = sendcount,
                          .stream = stream},
                 datatype, ncclSum, false);
}

/* ------------------------------------------------------------ destroy */

static void comm_free(ncclComm_t comm) {
  if (comm->mpi != MPI_COMM_NULL && mpi_up()) MPI_Comm_free(&comm->mpi);
  free(comm);
}

/* Calls of comm still queued in an open group are dropped and make destroy
 * fail (they would run on a freed communicator); abort drops them silently. */
ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  if (!comm) return fail(ncclInvalidArgument, "ncclCommDestroy: comm is NULL");
  int dropped = forget_ops(comm);
  comm_free(comm);
  if (dropped)
    return fail(ncclInvalidUsage, "ncclCommDestroy inside a group that has %d calls on the communicator (dropped)",
                dropped);
  return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) {
  if (!comm) return fail(ncclInvalidArgument, "ncclCommAbort: comm is NULL");
  forget_ops(comm);
  comm_free(comm);
  return ncclSuccess;
}
