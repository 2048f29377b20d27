/* comm_nccl.c — comm.h over NCCL, on device buffers of the cuda backend.
 *
 * Nothing NCCL or CUDA is linked: libnccl.so.2 is opened with dlopen and
 * called through pointers typed from nccl.h (with cuda_lib.h's helpers), the
 * driver (libcuda.so.1) through cuda_lib.h's table, the one the cuda backend
 * uses, so one binary runs on machines without NCCL (moert_nccl_available()
 * is then false). Without nccl.h at build time the file compiles to a
 * create that says so.
 *
 * Bootstrap (collective over the host comm, self or mpi): every rank checks
 * alone what it can (NCCL loads, the cuda backend's context is current, the
 * PCI bus id of its GPU); the ranks agree by an all-reduce, so all fail
 * alike, with no rank left waiting. Rank 0 gathers (host name, bus id) of
 * every rank: two ranks on one GPU is an error that says to use --comm mpi
 * (NCCL does not support it). Rank 0 makes the unique id and broadcasts it
 * over the host comm, then every rank calls ncclCommInitRank. A host comm of
 * one rank (moert_comm_self) needs no MPI.
 *
 * Streams. The float collectives are enqueued on the backend's compute
 * stream (moert_backend_cuda_stream) and return: they are ordered with the
 * kernels before and after them, and the host waits only where it downloads.
 * all_to_all_start records an event on the compute stream, makes the comm's
 * side stream wait for it, enqueues the exchange there and records a done
 * event; wait makes the compute stream wait for that event. So the
 * all-to-all of chunk i+1 runs while chunk i's experts compute (Tutel's
 * overlap), and nothing blocks the host. When the comm's `marks` is set
 * (tracing), start also makes the backend's timing marks on the side stream
 * around the exchange (req_marks), so the trace shows it on that stream.
 * The requests and their events are a pool made at create
 * (MOERT_NCCL_MAX_INFLIGHT); a step allocates nothing
 * (the 2DH scratch excepted: device memory grown at first use, as comm_mpi.c
 * grows its host scratch). NCCL runs one communicator's operations in the
 * order they are issued whatever their streams; the executor waits for every
 * nonblocking all-to-all before it calls another comm's collectives, which
 * NCCL requires of communicators that share a GPU.
 *
 * All-to-all. LINEAR is one group of ncclSend/ncclRecv, one pair per peer,
 * itself included (nccl-tests' alltoall). 2DH (Tutel's two-dimensional
 * hierarchical all-to-all), N nodes of L ranks, blocks of n floats, as in
 * comm_mpi.c: send [N][L] -> scratch [L][N] (2-D device copies); a group
 * exchange among the L ranks of my node, N*n floats per peer, into recv;
 * recv [L][N] -> scratch [N][L]; a group exchange among the N ranks of my
 * local index, L*n floats per peer, into recv, which is then in rank order.
 * The exchanges are point-to-point calls on this comm (no sub-communicator).
 * Every float is copied, never added: bitwise LINEAR's result.
 *
 * Errors. Every NCCL and driver call is checked; a failure records the call's
 * name and NCCL's message (ncclGetErrorString, and ncclGetLastError's detail).
 * Errors NCCL finds later, while the GPU runs (a peer that died), are polled
 * with ncclCommGetAsyncError at each collective (the host ones included) and
 * wait. After a failure, destroy aborts the communicator (ncclCommAbort)
 * instead of waiting for it.
 *
 * The watchdog (comm.h's moert_watch, --timeout). The host waits for the
 * collectives where it waits for the backend's stream (a download): with a
 * timeout, at more than one rank, the comm installs a waiter there
 * (moert_backend_cuda_set_waiter), which polls ncclCommGetAsyncError and the
 * time waited. An async error, or a wait past the timeout, aborts the
 * communicator (ncclCommAbort: its kernels stop) and the host comm's roll
 * call names the ranks that do not answer, as comm_mpi.c's own timeout; the
 * message names the last collective enqueued. */
#include "comm.h"

#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"

#ifndef MOERT_HAVE_NCCL_HEADERS

/* Built without nccl.h (or cuda.h): no nccl comm, said plainly. */
bool moert_nccl_available(void) { return false; }

bool moert_comm_nccl_create(moert_comm *host, moert_backend *b, moert_comm **out, moert_status *st) {
  (void)host, (void)b;
  *out = NULL;
  return MOERT_FAIL(st, "this build of moec has no nccl comm (nccl.h or the CUDA headers were not "
                        "found when it was built); run with --comm mpi");
}

bool moert_comm_nccl_fits(moert_comm *host, moert_backend *b, bool *fits, moert_status *st) {
  (void)host, (void)b, (void)st;
  *fits = false;
  return true;
}

void *moert_nccl_symbol(const char *name) {
  (void)name;
  return NULL;
}

const char *moert_nccl_strerror(int result) {
  (void)result;
  return "this build of moec has no NCCL (nccl.h was not found when it was built)";
}

#else

#include <nccl.h>

#include "cuda_lib.h"

/* Nonblocking all-to-alls in flight on one comm at a time: the executor has
 * at most 2 * 8 (pipeline depth 8, both directions). */
#define MOERT_NCCL_MAX_INFLIGHT 32

/* ------------------------------------------------------------ libraries */

#define NCCL_FUNCS(X)                                                                          \
  X(ncclGetVersion) X(ncclGetUniqueId) X(ncclCommInitRank) X(ncclCommDestroy) X(ncclCommAbort)  \
  X(ncclCommGetAsyncError) X(ncclCommCount) X(ncclCommUserRank) X(ncclGetErrorString)          \
  X(ncclAllReduce) X(ncclAllGather) X(ncclReduceScatter) X(ncclSend) X(ncclRecv)               \
  X(ncclGroupStart) X(ncclGroupEnd)
/* Looked up, used when present: ncclCommSplit (NCCL 2.18), ncclGetLastError (2.13). */
#define NCCL_OPTIONAL(X) X(ncclCommSplit) X(ncclGetLastError)

static struct {
  void *lib;
  int version; /* the loaded library's NCCL_VERSION_CODE */
  NCCL_FUNCS(MOERT_DL_DECLARE)
  NCCL_OPTIONAL(MOERT_DL_DECLARE)
} nc;

/* Opens NCCL once; *missing names what was not found. */
static bool load_nccl(const char **missing) {
  static int state; /* 0 not tried, 1 loaded, -1 failed */
  static const char *why;
  if (state) {
    *missing = why;
    return state > 0;
  }
  static const char *const names[] = {"libnccl.so.2", "libnccl.so", "/usr/local/cuda/lib/libnccl.so.2",
                                      "/usr/local/cuda/lib64/libnccl.so.2"};
  bool ok = (nc.lib = moert_dl_open_first(names, 4)) != NULL;
  *missing = "libnccl.so.2";
  __typeof__(nc) *tbl = &nc;
  if (ok) {
    NCCL_FUNCS(MOERT_DL_REQUIRE)
    NCCL_OPTIONAL(MOERT_DL_OPTIONAL)
  }
  if (ok && nc.ncclGetVersion(&nc.version) != ncclSuccess) {
    ok = false;
    *missing = "ncclGetVersion";
  }
  why = *missing;
  state = ok ? 1 : -1;
  return ok;
}

bool moert_nccl_available(void) {
  const char *missing;
  return load_nccl(&missing);
}

/* ------------------------------------------------------------ error checks */

/* NCCL's text for a result, with ncclGetLastError's detail when it has one.
 * One buffer: comms are used from one thread. */
static const char *nccl_errstr(ncclResult_t r) {
  static char buf[768];
  const char *s = nc.ncclGetErrorString ? nc.ncclGetErrorString(r) : NULL;
  const char *last = nc.ncclGetLastError ? nc.ncclGetLastError(NULL) : NULL;
  if (last && *last)
    snprintf(buf, sizeof buf, "%s: %s (NCCL_DEBUG=WARN prints NCCL's log)", s ? s : "NCCL error", last);
  else
    snprintf(buf, sizeof buf, "%s (NCCL error %d; NCCL_DEBUG=WARN prints NCCL's log)",
             s ? s : "unknown", (int)r);
  return buf;
}

MOERT_CHECK_GEN(nccl_check, ncclResult_t, ncclSuccess, nccl_errstr)

void *moert_nccl_symbol(const char *name) {
  const char *missing;
  return load_nccl(&missing) ? dlsym(nc.lib, name) : NULL;
}

const char *moert_nccl_strerror(int result) { return nccl_errstr((ncclResult_t)result); }

/* NCOK(st, ncclSend, (args)): calls the loaded function; on failure records
 * "ncclSend failed: <NCCL's message>" and is false. */
#define NCOK(st, fn, args) nccl_check(nc.fn args, #fn, __FILE__, __LINE__, (st))
/* CUOK (the driver's calls): cuda_lib.h's. */

/* ------------------------------------------------------------ the comm */

struct moert_req {
  bool busy;
  CUevent ready;         /* on the compute stream at start: the inputs are written */
  CUevent done;          /* on the side stream after the exchange */
  int mark0, mark1;      /* the backend's timing marks around it on the side stream (-1: none) */
  CUdeviceptr scratch;   /* 2DH: scratch_cap bytes, grown at first use */
  size_t scratch_cap;
};

typedef struct nccl_comm {
  moert_comm pub;
  moert_comm *host;      /* the same ranks, host buffers (self or mpi) */
  bool owns_host;        /* a split's host child: destroyed with this comm */
  moert_backend *b;
  ncclComm_t comm;
  CUstream compute;      /* the backend's stream (not ours) */
  CUstream side;         /* ours: the nonblocking all-to-alls */
  bool failed;           /* an NCCL call failed: destroy aborts */
  const char *last;      /* the last collective enqueued (for the watchdog's message) */
  bool waiter;           /* this comm's watchdog waits for the backend's stream */
  CUdeviceptr scratch;   /* the blocking 2DH's, scratch_cap bytes */
  size_t scratch_cap;
  moert_req reqs[MOERT_NCCL_MAX_INFLIGHT];
  int nreqs;             /* of reqs with their events made */
} nccl_comm;

static nccl_comm *K_(const moert_comm *c) { return (nccl_comm *)c->impl; }
static bool two_level(const moert_comm *c) { return c->nodes > 1 && c->local_size > 1; }

/* Records an NCCL failure of k (so destroy aborts) and passes it up. */
static bool comm_failed(nccl_comm *k, moert_status *st) {
  k->failed = true;
  return MOERT_UP(st);
}

/* The watchdog found k stuck (why NULL: waited past the timeout) or failed
 * (why: NCCL's error): the communicator is aborted (ncclCommAbort stops its
 * kernels), and the host comm's roll call names the ranks that do not answer
 * (comm.h's timed_out); false. */
static bool comm_hung(nccl_comm *k, const char *why, double waited, moert_status *st) {
  char what[64];
  snprintf(what, sizeof what, "%s (NCCL, on the GPU)", k->last ? k->last : "a collective");
  char whybuf[600];
  if (why) snprintf(whybuf, sizeof whybuf, "%s", why); /* nccl_errstr's buffer is reused */
  k->failed = true;
  if (k->comm) nc.ncclCommAbort(k->comm);
  k->comm = NULL;
  moert_comm *h = k->host;
  if (h->timed_out) return h->timed_out(h, what, waited, why ? whybuf : NULL, st);
  if (k->pub.watch) k->pub.watch->fired = true;
  if (why) return MOERT_FAIL(st, "%s failed: %s", what, whybuf);
  return MOERT_FAIL(st, "%s did not complete in %.0f s (--timeout)", what, waited);
}

/* An error NCCL found while the GPU ran an earlier operation, before op. */
static bool check_async(nccl_comm *k, const char *op, moert_status *st) {
  ncclResult_t r = ncclSuccess;
  if (!k->comm) return MOERT_FAIL(st, "%s: the nccl comm was aborted after an earlier failure", op);
  if (!NCOK(st, ncclCommGetAsyncError, (k->comm, &r))) return comm_failed(k, st);
  if (r != ncclSuccess && r != ncclInProgress) {
    char why[700];
    snprintf(why, sizeof why, "NCCL reported an error (found before %s): %s", op,
             nccl_errstr(r));
    return comm_hung(k, why, 0, st);
  }
  k->last = op;
  return true;
}

/* The backend's waiter (moert_backend_cuda_set_waiter) while the host waits
 * for the stream that runs k's collectives: NCCL's async error, and the
 * watch's timeout. */
static bool stream_waiter(void *ctx, double waited, moert_status *st) {
  nccl_comm *k = ctx;
  const moert_watch *w = k->pub.watch;
  MOERT_TRY(st, check_async(k, k->last ? k->last : "a collective", st));
  if (w && w->timeout > 0 && waited >= w->timeout) return comm_hung(k, NULL, waited, st);
  return true;
}

static bool check_count(const char *op, int64_t n, int64_t blocks, moert_status *st) {
  if (n < 0) return MOERT_FAIL(st, "%s: negative count %lld", op, (long long)n);
  if (blocks > 0 && n > INT64_MAX / (int64_t)sizeof(float) / blocks)
    return MOERT_FAIL(st, "%s: %lld ranks times %lld elements is more than memory can address", op,
                      (long long)blocks, (long long)n);
  return true;
}

/* Device memory of at least need bytes in *p. Growing frees the old buffer
 * after both streams are idle (the GPU may still read it). */
static bool grow_dev(nccl_comm *k, CUdeviceptr *p, size_t *cap, size_t need, moert_status *st) {
  if (need <= *cap) return true;
  if (*p) {
    if (!CUOK(st, cuStreamSynchronize, (k->compute)) || !CUOK(st, cuStreamSynchronize, (k->side)))
      return MOERT_UP(st);
    moert_cu.cuMemFree(*p);
    *p = 0;
    *cap = 0;
  }
  CUresult rc = moert_cu.cuMemAlloc(p, need);
  if (rc != CUDA_SUCCESS) {
    *p = 0;
    return MOERT_FAIL(st, "out of GPU memory for the 2DH all-to-all's scratch (%zu bytes): "
                          "cuMemAlloc: %s", need, moert_cu_errstr(rc));
  }
  *cap = need;
  return true;
}

/* ---- all-to-all ----------------------------------------------------------- */

/* Blocks of n floats: src is [A][B], dst [B][A] (dst block (b, a) = src block
 * (a, b)), as 2-D copies on stream s, one per row of the shorter side. */
static bool transpose_blocks(float *dst, const float *src, int A, int B, int64_t n, CUstream s,
                             moert_status *st) {
  const size_t blk = (size_t)n * sizeof(float);
  /* a pitch must fit the driver's limit (CU_DEVICE_ATTRIBUTE_MAX_PITCH, 2^31 - 1 on
   * current GPUs); beyond it, one copy per block */
  const size_t most = (size_t)(A > B ? A : B) * blk;
  if (most > (size_t)INT_MAX) {
    for (int a = 0; a < A; a++)
      for (int b = 0; b < B; b++)
        if (!CUOK(st, cuMemcpyDtoDAsync, (DPTR(dst + ((size_t)b * A + a) * n),
                                          DPTR(src + ((size_t)a * B + b) * n), blk, s)))
          return false;
    return true;
  }
  CUDA_MEMCPY2D m;
  memset(&m, 0, sizeof m);
  m.srcMemoryType = CU_MEMORYTYPE_DEVICE;
  m.dstMemoryType = CU_MEMORYTYPE_DEVICE;
  m.WidthInBytes = blk;
  if (A <= B) { /* row a: src blocks (a, 0..B) contiguous -> dst blocks (0..B, a), pitch A */
    m.srcPitch = blk;
    m.dstPitch = (size_t)A * blk;
    m.Height = (size_t)B;
    for (int a = 0; a < A; a++) {
      m.srcDevice = DPTR(src + (size_t)a * B * n);
      m.dstDevice = DPTR(dst + (size_t)a * n);
      if (!CUOK(st, cuMemcpy2DAsync, (&m, s))) return false;
    }
  } else { /* column b: src blocks (0..A, b), pitch B -> dst blocks (b, 0..A) contiguous */
    m.srcPitch = (size_t)B * blk;
    m.dstPitch = blk;
    m.Height = (size_t)A;
    for (int b = 0; b < B; b++) {
      m.srcDevice = DPTR(src + (size_t)b * n);
      m.dstDevice = DPTR(dst + (size_t)b * A * n);
      if (!CUOK(st, cuMemcpy2DAsync, (&m, s))) return false;
    }
  }
  return true;
}

/* An all-to-all among the G ranks base + j * stride (j = 0..G), blocks of blk
 * floats: block j of send to rank base + j * stride, block j of recv from it;
 * one NCCL group on stream s. This rank's own block is a send and receive to
 * itself inside the group (as nccl-tests' alltoall), so NCCL copies it while
 * the other blocks move; a device copy after the group would add its time:
 * half the exchange at two ranks. */
static bool group_a2a(nccl_comm *k, const float *send, float *recv, size_t blk, int base, int stride,
                      int G, CUstream s, moert_status *st) {
  if (!NCOK(st, ncclGroupStart, ())) return comm_failed(k, st);
  bool ok = true;
  for (int j = 0; j < G && ok; j++) {
    int peer = base + j * stride;
    ok = NCOK(st, ncclSend, (send + (size_t)j * blk, blk, ncclFloat32, peer, k->comm, s)) &&
         NCOK(st, ncclRecv, (recv + (size_t)j * blk, blk, ncclFloat32, peer, k->comm, s));
  }
  bool ended = NCOK(st, ncclGroupEnd, ()); /* closes the group even after a failure */
  if (!ok || !ended) return comm_failed(k, st);
  return true;
}

/* The all-to-all of blocks of n floats (n > 0) on stream s; 2DH (with two
 * levels) uses scratch, world * n floats. */
static bool a2a_on(nccl_comm *k, const float *send, float *recv, int64_t n, bool tdh,
                   CUdeviceptr scratch, CUstream s, moert_status *st) {
  const moert_comm *c = &k->pub;
  if (!tdh) return group_a2a(k, send, recv, (size_t)n, 0, 1, c->world, s, st) || MOERT_UP(st);
  const int N = c->nodes, L = c->local_size;
  float *tmp = (float *)(uintptr_t)scratch;
  MOERT_TRY(st, transpose_blocks(tmp, send, N, L, n, s, st));                           /* [N][L] -> [L][N] */
  MOERT_TRY(st, group_a2a(k, tmp, recv, (size_t)N * n, c->node * L, 1, L, s, st));    /* inside the node */
  MOERT_TRY(st, transpose_blocks(tmp, recv, L, N, n, s, st));                           /* [L][N] -> [N][L] */
  MOERT_TRY(st, group_a2a(k, tmp, recv, (size_t)L * n, c->local_rank, L, N, s, st));  /* across nodes */
  return true;
}

static bool check_a2a(const moert_comm *c, int64_t n, moert_a2a_algo algo, moert_status *st) {
  if (!check_count("all_to_all", n, c->world, st)) return false;
  if (algo != MOERT_A2A_LINEAR && algo != MOERT_A2A_2DH)
    return MOERT_FAIL(st, "all_to_all: unknown algorithm %d", (int)algo);
  return true;
}

static bool nccl_a2a(moert_comm *c, const float *send, float *recv, int64_t n, moert_a2a_algo algo,
                     moert_status *st) {
  nccl_comm *k = K_(c);
  MOERT_TRY(st, check_a2a(c, n, algo, st));
  if (n == 0) return true;
  MOERT_TRY(st, check_async(k, "all_to_all", st));
  bool tdh = algo == MOERT_A2A_2DH && two_level(c);
  if (tdh)
    MOERT_TRY(st, grow_dev(k, &k->scratch, &k->scratch_cap, (size_t)c->world * (size_t)n * sizeof(float), st));
  MOERT_TRY(st, a2a_on(k, send, recv, n, tdh, k->scratch, k->compute, st));
  return true;
}

static bool nccl_a2a_start(moert_comm *c, const float *send, float *recv, int64_t n,
                           moert_a2a_algo algo, moert_req **req, moert_status *st) {
  nccl_comm *k = K_(c);
  *req = NULL;
  MOERT_TRY(st, check_a2a(c, n, algo, st));
  if (n == 0) return true; /* nothing in flight: wait(NULL) */
  MOERT_TRY(st, check_async(k, "all_to_all_start", st));
  moert_req *rq = NULL;
  for (int i = 0; i < k->nreqs && !rq; i++)
    if (!k->reqs[i].busy) rq = &k->reqs[i];
  if (!rq)
    return MOERT_FAIL(st, "all_to_all_start: too many nonblocking all-to-alls in flight on one nccl "
                          "comm (limit is %d); wait for some first", k->nreqs);
  bool tdh = algo == MOERT_A2A_2DH && two_level(c);
  if (tdh)
    MOERT_TRY(st, grow_dev(k, &rq->scratch, &rq->scratch_cap, (size_t)c->world * (size_t)n * sizeof(float), st));
  /* the side stream starts when what the compute stream has enqueued (the
   * writes of send, the last reads of recv) is done */
  if (!CUOK(st, cuEventRecord, (rq->ready, k->compute)) ||
      !CUOK(st, cuStreamWaitEvent, (k->side, rq->ready, 0)))
    return MOERT_UP(st);
  bool timed = c->marks && k->b->mark;
  rq->mark0 = timed ? k->b->mark(k->b, k->side) : -1;
  MOERT_TRY(st, a2a_on(k, send, recv, n, tdh, rq->scratch, k->side, st));
  rq->mark1 = timed ? k->b->mark(k->b, k->side) : -1;
  if (!CUOK(st, cuEventRecord, (rq->done, k->side))) return MOERT_UP(st);
  rq->busy = true;
  *req = rq;
  return true;
}

static bool nccl_wait(moert_comm *c, moert_req *rq, moert_status *st) {
  nccl_comm *k = K_(c);
  if (!rq) return true;
  if (rq < k->reqs || rq >= k->reqs + k->nreqs || !rq->busy)
    return MOERT_FAIL(st, "wait: not an all-to-all in flight on this comm");
  rq->busy = false;
  /* the compute stream goes on once the exchange is done; the host does not wait */
  if (!CUOK(st, cuStreamWaitEvent, (k->compute, rq->done, 0))) return MOERT_UP(st);
  MOERT_TRY(st, check_async(k, "all_to_all (nonblocking)", st));
  return true;
}

static void nccl_req_marks(moert_comm *c, const moert_req *rq, int *begin, int *end) {
  (void)c;
  *begin = rq && rq->busy ? rq->mark0 : -1;
  *end = rq && rq->busy ? rq->mark1 : -1;
}

static bool nccl_a2av(moert_comm *c, const float *send, const int64_t *scount, const int64_t *sdispl,
                      float *recv, const int64_t *rcount, const int64_t *rdispl, moert_status *st) {
  nccl_comm *k = K_(c);
  const int W = c->world, me = c->rank;
  for (int r = 0; r < W; r++)
    if (scount[r] < 0 || rcount[r] < 0 || scount[r] > INT_MAX || rcount[r] > INT_MAX ||
        sdispl[r] < 0 || rdispl[r] < 0)
      return MOERT_FAIL(st, "all_to_allv: counts must be 0 to %d floats and displacements 0 or more "
                            "(rank %d: send %lld at %lld, receive %lld at %lld)", INT_MAX, r,
                        (long long)scount[r], (long long)sdispl[r], (long long)rcount[r],
                        (long long)rdispl[r]);
  if (scount[me] != rcount[me])
    return MOERT_FAIL(st, "all_to_allv: sending %lld floats to itself but receiving %lld",
                      (long long)scount[me], (long long)rcount[me]);
  MOERT_TRY(st, check_async(k, "all_to_allv", st));
  if (!NCOK(st, ncclGroupStart, ())) return comm_failed(k, st);
  bool ok = true;
  for (int r = 0; r < W && ok; r++) {
    if (r == me) continue;
    /* a zero count on one side is a zero count on the other (comm.h's contract) */
    if (scount[r] > 0)
      ok = NCOK(st, ncclSend, (send + sdispl[r], (size_t)scount[r], ncclFloat32, r, k->comm, k->compute));
    if (ok && rcount[r] > 0)
      ok = NCOK(st, ncclRecv, (recv + rdispl[r], (size_t)rcount[r], ncclFloat32, r, k->comm, k->compute));
  }
  bool ended = NCOK(st, ncclGroupEnd, ());
  if (!ok || !ended) return comm_failed(k, st);
  if (scount[me] > 0 &&
      !CUOK(st, cuMemcpyDtoDAsync, (DPTR(recv + rdispl[me]), DPTR(send + sdispl[me]),
                                    (size_t)scount[me] * sizeof(float), k->compute)))
    return MOERT_UP(st);
  return true;
}

/* ---- reductions and gathers on device memory ------------------------------ */

static bool nccl_all_reduce_f32(moert_comm *c, float *x, int64_t n, moert_red op, moert_status *st) {
  nccl_comm *k = K_(c);
  MOERT_TRY(st, check_count("all_reduce", n, 1, st));
  ncclRedOp_t nop;
  switch (op) {
  case MOERT_RED_SUM: nop = ncclSum; break;
  case MOERT_RED_MAX: nop = ncclMax; break;
  default: return MOERT_FAIL(st, "all_reduce: unknown reduction %d", (int)op);
  }
  if (n == 0) return true;
  MOERT_TRY(st, check_async(k, "all_reduce", st));
  if (!NCOK(st, ncclAllReduce, (x, x, (size_t)n, ncclFloat32, nop, k->comm, k->compute)))
    return comm_failed(k, st);
  return true;
}

/* send == recv + rank * n is in place (NCCL's own rule). */
static bool nccl_all_gather(moert_comm *c, const float *send, float *recv, int64_t n,
                            moert_status *st) {
  nccl_comm *k = K_(c);
  MOERT_TRY(st, check_count("all_gather", n, c->world, st));
  if (n == 0) return true;
  MOERT_TRY(st, check_async(k, "all_gather", st));
  if (!NCOK(st, ncclAllGather, (send, recv, (size_t)n, ncclFloat32, k->comm, k->compute)))
    return comm_failed(k, st);
  return true;
}

/* send == recv is in place as comm_mpi.c (and MPI) define it: the result is
 * the first n floats. NCCL's in place is recv == send + rank * n, so the
 * result is reduced there and moved to the front. */
static bool nccl_reduce_scatter(moert_comm *c, const float *send, float *recv, int64_t n,
                                moert_status *st) {
  nccl_comm *k = K_(c);
  MOERT_TRY(st, check_count("reduce_scatter", n, c->world, st));
  if (n == 0) return true;
  MOERT_TRY(st, check_async(k, "reduce_scatter", st));
  const bool moved = send == recv && c->rank > 0;
  float *to = moved ? recv + (size_t)c->rank * n : recv;
  if (!NCOK(st, ncclReduceScatter, (send, to, (size_t)n, ncclFloat32, ncclSum, k->comm, k->compute)))
    return comm_failed(k, st);
  if (moved && !CUOK(st, cuMemcpyDtoDAsync, (DPTR(recv), DPTR(to), (size_t)n * sizeof(float), k->compute)))
    return MOERT_UP(st);
  return true;
}

/* ---- host values: the host comm ----------------------------------------- */

static bool nccl_all_reduce_f64(moert_comm *c, double *x, int64_t n, moert_red op, moert_status *st) {
  moert_comm *h = K_(c)->host;
  MOERT_TRY(st, check_async(K_(c), "all_reduce (host)", st));
  return h->all_reduce_f64(h, x, n, op, st) || MOERT_UP(st);
}
static bool nccl_all_reduce_i64(moert_comm *c, int64_t *x, int64_t n, moert_red op, moert_status *st) {
  moert_comm *h = K_(c)->host;
  MOERT_TRY(st, check_async(K_(c), "all_reduce (host)", st));
  return h->all_reduce_i64(h, x, n, op, st) || MOERT_UP(st);
}
static bool nccl_broadcast(moert_comm *c, void *buf, int64_t bytes, int root, moert_status *st) {
  moert_comm *h = K_(c)->host;
  if (root < 0 || root >= c->world) /* self ignores root: say it here */
    return MOERT_FAIL(st, "broadcast: root %d is not a rank of this comm (0 to %d)", root, c->world - 1);
  MOERT_TRY(st, check_async(K_(c), "broadcast (host)", st));
  return h->broadcast(h, buf, bytes, root, st) || MOERT_UP(st);
}
static bool nccl_gather(moert_comm *c, const void *send, void *recv, int64_t bytes, int root,
                        moert_status *st) {
  moert_comm *h = K_(c)->host;
  if (root < 0 || root >= c->world)
    return MOERT_FAIL(st, "gather: root %d is not a rank of this comm (0 to %d)", root, c->world - 1);
  MOERT_TRY(st, check_async(K_(c), "gather (host)", st));
  return h->gather(h, send, recv, bytes, root, st) || MOERT_UP(st);
}
/* The ranks meet on the host; the GPU work enqueued before goes on. */
static bool nccl_barrier(moert_comm *c, moert_status *st) {
  moert_comm *h = K_(c)->host;
  MOERT_TRY(st, check_async(K_(c), "barrier (host)", st));
  return h->barrier(h, st) || MOERT_UP(st);
}

/* ---- creation, split, destroy ------------------------------------------- */

static bool nccl_split(moert_comm *c, int color, int key, moert_comm **out, moert_status *st);
static void nccl_destroy(moert_comm *c);

static bool nccl_timed_out(moert_comm *c, const char *what, double waited, const char *why, moert_status *st) {
  moert_comm *h = K_(c)->host;
  return h->timed_out(h, what, waited, why, st);
}

/* A comm around host (owned when owns_host) with no NCCL communicator yet. */
static nccl_comm *comm_new(moert_comm *host, bool owns_host, moert_backend *b) {
  nccl_comm *k = calloc(1, sizeof *k);
  if (!k) return NULL;
  k->host = host;
  k->owns_host = owns_host;
  k->b = b;
  k->compute = (CUstream)moert_backend_cuda_stream(b);
  moert_comm *c = &k->pub;
  *c = (moert_comm){
      .name = "nccl", .device_buffers = true, .world = host->world, .rank = host->rank, .nodes = host->nodes,
      .node = host->node, .local_size = host->local_size, .local_rank = host->local_rank,
      .host_rank = host->host_rank, .host_size = host->host_size,
      .all_reduce_f64 = nccl_all_reduce_f64, .all_reduce_f32 = nccl_all_reduce_f32,
      .all_reduce_i64 = nccl_all_reduce_i64, .all_gather_f32 = nccl_all_gather,
      .reduce_scatter_f32 = nccl_reduce_scatter, .broadcast = nccl_broadcast, .gather = nccl_gather,
      .all_to_all_f32 = nccl_a2a, .all_to_allv_f32 = nccl_a2av, .all_to_all_start = nccl_a2a_start,
      .wait = nccl_wait, .req_marks = nccl_req_marks, .split = nccl_split, .barrier = nccl_barrier, .destroy = nccl_destroy,
      .capturable = true, .watch = host->watch, .timed_out = host->timed_out ? nccl_timed_out : NULL,
      .impl = k};
  return k;
}

/* The side stream and the request pool: this rank alone. */
static bool make_streams(nccl_comm *k, moert_status *st) {
  if (!CUOK(st, cuStreamCreate, (&k->side, CU_STREAM_NON_BLOCKING))) return MOERT_UP(st);
  for (int i = 0; i < MOERT_NCCL_MAX_INFLIGHT; i++) {
    moert_req *rq = &k->reqs[i];
    if (!CUOK(st, cuEventCreate, (&rq->ready, CU_EVENT_DISABLE_TIMING))) return MOERT_UP(st);
    if (!CUOK(st, cuEventCreate, (&rq->done, CU_EVENT_DISABLE_TIMING))) {
      moert_cu.cuEventDestroy(rq->ready);
      rq->ready = NULL;
      return MOERT_UP(st);
    }
    k->nreqs++;
  }
  return true;
}

/* Whether any rank of host failed (mine: !ok); collective. When another did,
 * st says so. */
static bool all_ok(moert_comm *host, bool ok, moert_status *st) {
  int64_t bad = ok ? -1 : host->rank;
  moert_status hs = {0};
  if (!host->all_reduce_i64(host, &bad, 1, MOERT_RED_MAX, &hs))
    return ok ? MOERT_FAIL(st, "%s", hs.msg) : false;
  if (bad < 0) return true;
  if (ok)
    return MOERT_FAIL(st, "rank %lld could not set up its nccl comm (its message says why)",
                      (long long)bad);
  return false;
}

/* A new NCCL communicator over the ranks of host: rank 0 makes the unique id,
 * broadcast over host. Collective over host; all ranks fail alike when rank 0
 * cannot make the id. */
static bool init_by_id(nccl_comm *k, moert_status *st) {
  moert_comm *host = k->host;
  struct {
    int64_t ok; /* on rank 0: the id was made */
    ncclUniqueId id;
  } boot;
  memset(&boot, 0, sizeof boot);
  if (host->rank == 0) boot.ok = NCOK(st, ncclGetUniqueId, (&boot.id));
  moert_status hs = {0};
  if (!host->broadcast(host, &boot, (int64_t)sizeof boot, 0, &hs))
    return host->rank == 0 && !boot.ok ? MOERT_UP(st) : MOERT_FAIL(st, "%s", hs.msg);
  if (!boot.ok)
    return host->rank == 0 ? MOERT_UP(st)
                           : MOERT_FAIL(st, "rank 0 could not make NCCL's unique id (its message says why)");
  ncclResult_t r = nc.ncclCommInitRank(&k->comm, host->world, boot.id, host->rank);
  if (r != ncclSuccess) {
    k->comm = NULL;
    return MOERT_FAIL(st, "ncclCommInitRank failed: %s; NCCL could not start on these %d ranks "
                          "(NCCL_DEBUG=INFO shows why); --comm mpi runs without NCCL",
                      nccl_errstr(r), host->world);
  }
  return true;
}

/* What each rank says of its GPU, gathered by rank 0. */
typedef struct gpu_id {
  char host[64];
  char bus[32];
} gpu_id;

/* The first two ranks of host on one GPU (pair -1, -1: none) and that GPU,
 * alike on every rank: rank 0 gathers every rank's and broadcasts the answer. */
static bool shared_gpu(moert_comm *host, const gpu_id *mine, int64_t pair[2], gpu_id *which,
                       moert_status *st) {
  const int W = host->world;
  gpu_id *all = host->rank == 0 ? calloc((size_t)W, sizeof *all) : NULL;
  bool have = host->rank != 0 || all;
  if (!have) MOERT_FAIL(st, "out of memory for the GPUs of %d ranks", W);
  if (!all_ok(host, have, st)) {
    free(all);
    return MOERT_UP(st);
  }
  struct {
    int64_t a, b;
    gpu_id gpu;
  } verdict;
  memset(&verdict, 0, sizeof verdict);
  verdict.a = verdict.b = -1;
  moert_status hs = {0};
  if (!host->gather(host, mine, all, (int64_t)sizeof *mine, 0, &hs)) {
    free(all);
    return MOERT_FAIL(st, "%s", hs.msg);
  }
  for (int a = 0; all && a < W && verdict.a < 0; a++)
    for (int b = a + 1; b < W && verdict.a < 0; b++)
      if (!strcmp(all[a].host, all[b].host) && !strcmp(all[a].bus, all[b].bus)) {
        verdict.a = a;
        verdict.b = b;
        verdict.gpu = all[a];
      }
  free(all);
  if (!host->broadcast(host, &verdict, (int64_t)sizeof verdict, 0, &hs)) return MOERT_FAIL(st, "%s", hs.msg);
  pair[0] = verdict.a;
  pair[1] = verdict.b;
  *which = verdict.gpu;
  return true;
}

/* Fails on every rank alike when two ranks of host run on one GPU. */
static bool check_gpus(moert_comm *host, const gpu_id *mine, moert_status *st) {
  int64_t pair[2];
  gpu_id gpu;
  MOERT_TRY(st, shared_gpu(host, mine, pair, &gpu, st));
  if (pair[0] >= 0)
    return MOERT_FAIL(st, "ranks %lld and %lld share one GPU (PCI %s on %s): NCCL needs a GPU of its "
                          "own for every rank; start at most as many ranks per node as it has GPUs, "
                          "or run with --comm mpi, which lets ranks share a GPU",
                      (long long)pair[0], (long long)pair[1], gpu.bus, gpu.host);
  return true;
}

/* This rank's checks alone: NCCL and the driver load, b is the live cuda
 * backend, its context is current; fills the GPU's identity. */
static bool local_setup(moert_backend *b, gpu_id *me, moert_status *st) {
  const char *missing = NULL;
  if (!b || strcmp(b->name, "cuda") != 0 || !moert_backend_cuda_stream(b))
    return MOERT_FAIL(st, "the nccl comm needs the cuda backend (it moves GPU memory); with "
                          "--backend cpu use --comm mpi");
  if (!load_nccl(&missing))
    return MOERT_FAIL(st, "NCCL could not be loaded (%s missing); install NCCL or add its folder to "
                          "LD_LIBRARY_PATH, or run with --comm mpi",
                      missing);
  if (!moert_cu_load(&missing))
    return MOERT_FAIL(st, "the CUDA driver could not be loaded (%s missing)", missing);
  CUcontext ctx = NULL;
  CUdevice dev = 0;
  if (!CUOK(st, cuCtxGetCurrent, (&ctx))) return MOERT_UP(st);
  if (!ctx) return MOERT_FAIL(st, "the nccl comm: no CUDA context is current (create the cuda backend first)");
  if (!CUOK(st, cuCtxGetDevice, (&dev)) ||
      !CUOK(st, cuDeviceGetPCIBusId, (me->bus, (int)sizeof me->bus, dev)))
    return MOERT_UP(st);
  if (gethostname(me->host, sizeof me->host - 1) != 0) snprintf(me->host, sizeof me->host, "?");
  return true;
}

bool moert_comm_nccl_create(moert_comm *host, moert_backend *b, moert_comm **out, moert_status *st) {
  *out = NULL;
  gpu_id me;
  memset(&me, 0, sizeof me);
  bool ok = local_setup(b, &me, st);
  MOERT_TRY(st, all_ok(host, ok, st));
  MOERT_TRY(st, check_gpus(host, &me, st));
  nccl_comm *k = comm_new(host, false, b);
  if (!k) return MOERT_FAIL(st, "out of memory for the nccl comm");
  ok = init_by_id(k, st) && make_streams(k, st);
  if (!ok) {
    nccl_destroy(&k->pub);
    return MOERT_UP(st);
  }
  /* the collectives run on the backend's stream: the host waits for them there */
  if (k->pub.watch && k->pub.watch->timeout > 0 && host->world > 1) {
    moert_backend_cuda_set_waiter(b, stream_waiter, k);
    k->waiter = true;
  }
  *out = &k->pub;
  return true;
}

bool moert_comm_nccl_fits(moert_comm *host, moert_backend *b, bool *fits, moert_status *st) {
  *fits = false;
  gpu_id me;
  memset(&me, 0, sizeof me);
  moert_status quiet = {0};
  int64_t cannot = local_setup(b, &me, &quiet) ? 0 : 1;
  MOERT_TRY(st, host->all_reduce_i64(host, &cannot, 1, MOERT_RED_MAX, st));
  if (cannot) return true;
  int64_t pair[2];
  gpu_id gpu;
  MOERT_TRY(st, shared_gpu(host, &me, pair, &gpu, st));
  *fits = pair[0] < 0;
  return true;
}

static bool nccl_split(moert_comm *c, int color, int key, moert_comm **out, moert_status *st) {
  nccl_comm *k = K_(c);
  *out = NULL;
  if (color < 0) return MOERT_FAIL(st, "split: color %d is negative (colors are 0 or more)", color);
  moert_comm *hchild = NULL;
  MOERT_TRY(st, k->host->split(k->host, color, key, &hchild, st));
  nccl_comm *child = comm_new(hchild, hchild != k->host, k->b);
  if (!child) {
    if (hchild != k->host) hchild->destroy(hchild);
    return MOERT_FAIL(st, "out of memory for a comm of split");
  }
  bool ok;
  if (nc.ncclCommSplit) {
    /* collective over the parent; NCCL orders the members by key, then by
     * parent rank, as MPI does: the ranks agree with the host child's */
    ok = NCOK(st, ncclCommSplit, (k->comm, color, key, &child->comm, NULL));
    if (!ok) {
      child->comm = NULL;
      k->failed = true;
    }
    int r = -1, n = -1;
    if (ok) ok = NCOK(st, ncclCommUserRank, (child->comm, &r)) && NCOK(st, ncclCommCount, (child->comm, &n));
    if (ok && (r != hchild->rank || n != hchild->world))
      ok = MOERT_FAIL(st, "split: NCCL's sub-communicator has this rank as %d of %d, the host comm's as "
                          "%d of %d", r, n, hchild->rank, hchild->world);
  } else {
    ok = init_by_id(child, st); /* collective over the child's ranks only */
  }
  ok = ok && make_streams(child, st);
  if (!ok) {
    nccl_destroy(&child->pub);
    return MOERT_UP(st);
  }
  *out = &child->pub;
  return true;
}

static void nccl_destroy(moert_comm *c) {
  if (!c) return;
  nccl_comm *k = K_(c);
  if (k->waiter) moert_backend_cuda_set_waiter(k->b, NULL, NULL);
  if (k->comm) {
    if (k->failed) {
      nc.ncclCommAbort(k->comm);
    } else {
      /* the GPU finishes what was enqueued before the communicator goes */
      if (k->compute) moert_cu.cuStreamSynchronize(k->compute);
      if (k->side) moert_cu.cuStreamSynchronize(k->side);
      if (nc.ncclCommDestroy(k->comm) != ncclSuccess) nc.ncclCommAbort(k->comm);
    }
  } else if (k->side) {
    moert_cu.cuStreamSynchronize(k->side);
  }
  for (int i = 0; i < k->nreqs; i++) {
    moert_cu.cuEventDestroy(k->reqs[i].ready);
    moert_cu.cuEventDestroy(k->reqs[i].done);
    if (k->reqs[i].scratch) moert_cu.cuMemFree(k->reqs[i].scratch);
  }
  if (k->scratch) moert_cu.cuMemFree(k->scratch);
  if (k->side) moert_cu.cuStreamDestroy(k->side);
  if (k->owns_host) k->host->destroy(k->host);
  free(k);
}

#endif /* MOERT_HAVE_NCCL_HEADERS */
