/* comm_mpi.c — comm.h over MPI, on host buffers.
 *
 * Every call checks MPI's result code (MPICHECK, from status.h's generator;
 * the comms use MPI_ERRORS_RETURN, so a failure comes back as a code) and
 * records MPI_Error_string's text.
 *
 * Topology. The world comm's node of each rank comes from
 * MPI_Comm_split_type(MPI_COMM_TYPE_SHARED), or from MOEC_LOCAL_SIZE=L (ranks
 * [0, L) are node 0, ...). Every rank all-gathers what it sees, so that all
 * ranks decide alike: L must divide the world size, the shared-memory groups
 * must be equal and node-major (rank = node * L + local). When they are not,
 * every rank fails with the same message, MPI is finalized and the caller can
 * exit cleanly. A comm from split recomputes its topology from the parent's
 * node of each member; when those are not equal node-major groups (a color
 * that takes 3 ranks of one node and 1 of another, a key that interleaves
 * nodes), the child is flat: every rank a node of its own (local_size 1), so
 * 2DH is LINEAR there.
 *
 * Large counts. MPI counts are int. A call that would move more than
 * max_count elements (MOERT_MPI_MAX_COUNT) per peer goes in passes of at most
 * max_count: the all-to-all and all-gather's pass k moves elements [k*max,
 * (k+1)*max) of every block at once, as one element of a datatype of that
 * many floats resized to the block's extent; reductions and broadcasts go
 * chunk by chunk; a long reduce-scatter is one MPI_Reduce per root and chunk.
 *
 * 2DH (Tutel's two-dimensional hierarchical all-to-all), N nodes of L ranks,
 * rank (m, l) = m * L + l, blocks of n floats:
 *   1. local transform: send [N][L] -> scratch [L][N], the N blocks bound for
 *      local index l (one per node) side by side;
 *   2. all-to-all inside the node (node_comm), N*n floats per peer: recv
 *      [L][N] = from local peer l', its blocks for (m, my local index);
 *   3. layout transform: recv [L][N] -> scratch [N][L];
 *   4. all-to-all across nodes among the ranks of my local index
 *      (cross_comm), L*n floats per peer: recv [N][L], block (m', l') from
 *      rank (m', l'), which is rank order: the final transform is the
 *      identity, so none is run. Every float is copied, never added: bitwise
 *      LINEAR's result.
 * With N = 1 or L = 1 one of the all-to-alls is among one rank, so 2DH is the
 * one all-to-all of LINEAR. The scratch (world * n floats) is the comm's,
 * allocated at first use and grown when n grows.
 *
 * Nonblocking. all_to_all_start starts MPI_Ialltoall (one per pass) for
 * LINEAR; for 2DH it runs the local transform and starts the intra-node
 * all-to-all, and wait completes it, then runs the layout transform and the
 * inter-node all-to-all (blocking). Each request has its own scratch, so any
 * number may be in flight; requests are kept for reuse after wait, so a
 * steady loop allocates nothing. As for every collective, all ranks start and
 * wait in the same order.
 *
 * The watchdog (comm.h's moert_watch, --timeout). Every collective is the
 * nonblocking MPI call, finished by one wait (finish): without a watch, or
 * with timeout 0, MPI_Waitall, as the blocking call would; with one, a spin
 * of MPI_Testall (yielding the core, as Open MPI's own wait does with
 * mpi_yield_when_idle) for SPIN_S (0.1 s), then MPI_Testall between sleeps that grow
 * from SLEEP_MIN_NS to SLEEP_MAX_NS, so a stopped peer costs the waiting
 * ranks almost no CPU. Past the timeout, a roll call on a duplicate of the
 * world comm made for it (`roll`, its tags of its own): a ping to every other
 * rank, which answers with what it waits in and at which step while it polls
 * a wait of its own (and while it holds a roll call of its own); the ranks
 * that do not answer in min(timeout, MOERT_ROLL_CALL_S) are named. */
#include "comm.h"

#include <limits.h>
#include <mpi.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "comm_mpi_impl.h"

/* MPI's text for a result code. One buffer: MPI calls come from one thread
 * (MPI_THREAD_FUNNELED). */
const char *moert_mpi_strerror(int code) {
  static char buf[MPI_MAX_ERROR_STRING + 32];
  int len = 0;
  if (MPI_Error_string(code, buf, &len) != MPI_SUCCESS || len <= 0)
    snprintf(buf, sizeof buf, "MPI error %d", code);
  return buf;
}

MOERT_CHECK_GEN(mpi_check, int, MPI_SUCCESS, moert_mpi_strerror)
#define MPIOK(st, call) mpi_check((call), #call, __FILE__, __LINE__, (st))
#define MPICHECK(st, call)                \
  do {                                    \
    if (!MPIOK(st, call)) return false;   \
  } while (0)

struct moert_req {
  moert_req *next_free; /* in the comm's list of idle requests */
  moert_req *next_all;  /* every request of the comm, freed by destroy */
  MPI_Request *mr;      /* the MPI requests in flight: nmr of cap */
  int nmr, cap;
  bool tdh;             /* a 2DH all-to-all: wait runs its second half */
  float *recv;
  int64_t n;
  float *scratch;       /* world * n floats for 2DH, grown on demand */
  size_t scratch_cap;
};

/* A roll call's answer: where the answering rank waits. */
typedef struct roll_answer {
  int64_t step;  /* its watch's step */
  char what[40]; /* the collective it waits in */
} roll_answer;

/* The world's roll-call channel, shared by the comms split from it. */
typedef struct roll_state {
  MPI_Comm comm;     /* a duplicate of the world comm, for roll calls only */
  int rank, world;
  roll_answer *out;  /* the answer sent to each asker (alive until the send is done) */
} roll_state;

typedef struct mpi_impl {
  MPI_Comm comm;
  roll_state *roll;    /* the world's (owned by the world comm: owns_roll) */
  bool owns_roll;
  MPI_Comm node_comm;  /* the ranks of my node, by local rank (2DH; else NULL) */
  MPI_Comm cross_comm; /* the ranks of my local index, by node (2DH; else NULL) */
  bool owns_mpi;       /* the world comm of a process whose MPI we started */
  int64_t max_count;   /* the most elements per peer of one MPI call */
  float *scratch;      /* the blocking 2DH's: scratch_cap floats */
  size_t scratch_cap;
  moert_req *free_reqs, *all_reqs;
  int nreqs;
} mpi_impl;

typedef struct mpi_comm {
  moert_comm pub;
  mpi_impl im;
} mpi_comm;

static mpi_impl *impl_of(const moert_comm *c) { return (mpi_impl *)c->impl; }
static bool two_level(const moert_comm *c) { return c->nodes > 1 && c->local_size > 1; }

/* ---- helpers ---------------------------------------------------------- */

/* n >= 0, and `blocks` blocks of n elements of `size` bytes are addressable
 * (by int64_t; size_t is as wide on the 64-bit hosts moec runs on). */
static bool check_count(const char *op, int64_t n, int64_t blocks, int64_t size, moert_status *st) {
  if (n < 0) return MOERT_FAIL(st, "%s: negative count %lld", op, (long long)n);
  if (blocks > 0 && n > INT64_MAX / size / blocks)
    return MOERT_FAIL(st, "%s: %lld ranks times %lld elements is more than memory can address", op,
                      (long long)blocks, (long long)n);
  return true;
}

static bool check_root(const moert_comm *c, const char *op, int root, moert_status *st) {
  if (root < 0 || root >= c->world)
    return MOERT_FAIL(st, "%s: root %d is not a rank of this comm (0 to %d)", op, root, c->world - 1);
  return true;
}

static bool mpi_op(moert_red op, MPI_Op *out, moert_status *st) {
  switch (op) {
  case MOERT_RED_SUM: *out = MPI_SUM; return true;
  case MOERT_RED_MAX: *out = MPI_MAX; return true;
  }
  return MOERT_FAIL(st, "all_reduce: unknown reduction %d", (int)op);
}

/* buf holds at least need floats (its contents are not kept). */
static bool grow(float **buf, size_t *cap, size_t need, moert_status *st) {
  if (need <= *cap) return true;
  free(*buf);
  *cap = 0;
  *buf = malloc(need * sizeof(float));
  if (!*buf)
    return MOERT_FAIL(st, "out of memory: %zu bytes of scratch for the 2DH all-to-all",
                      need * sizeof(float));
  *cap = need;
  return true;
}

/* A committed datatype of len elements of base whose extent is stride
 * elements, so that block i of a collective starts at element i * stride. */
static bool strided_type(MPI_Datatype base, int64_t len, int64_t stride, MPI_Datatype *out,
                         moert_status *st) {
  MPI_Aint lb, ext;
  MPI_Datatype contig;
  MPICHECK(st, MPI_Type_get_extent(base, &lb, &ext));
  MPICHECK(st, MPI_Type_contiguous((int)len, base, &contig));
  bool ok = MPIOK(st, MPI_Type_create_resized(contig, 0, (MPI_Aint)stride * ext, out));
  MPI_Type_free(&contig);
  if (!ok) return false;
  if (!MPIOK(st, MPI_Type_commit(out))) {
    MPI_Type_free(out);
    return false;
  }
  return true;
}

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* ---- the watchdog ------------------------------------------------------- */

/* The first part of a watched wait spins, as MPI's own wait does (a
 * collective of ranks that are all there takes microseconds, and its rounds
 * progress only while its ranks call MPI: a rank that sleeps holds the
 * others up); after it, a wait that is long already sleeps between tests,
 * the sleep doubling from SLEEP_MIN_NS to SLEEP_MAX_NS (what a wait past the
 * spin may lose, at most, per round of the collective). */
#define SPIN_S 0.1
#define SLEEP_MIN_NS 20000L
#define SLEEP_MAX_NS 200000L
/* Tags on the roll comm: a ping, and its answer. */
#define TAG_PING 1
#define TAG_HERE 2

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void nap(long ns) {
  struct timespec ts = {0, ns};
  nanosleep(&ts, NULL);
}

/* Answers every ping waiting on the roll comm: where this process waits. */
static void answer_pings(roll_state *rs, const moert_watch *w) {
  for (;;) {
    int flag = 0;
    MPI_Status s;
    if (MPI_Iprobe(MPI_ANY_SOURCE, TAG_PING, rs->comm, &flag, &s) != MPI_SUCCESS || !flag) return;
    char ping;
    if (MPI_Recv(&ping, 1, MPI_BYTE, s.MPI_SOURCE, TAG_PING, rs->comm, MPI_STATUS_IGNORE) != MPI_SUCCESS)
      return;
    roll_answer *a = &rs->out[s.MPI_SOURCE];
    a->step = w->step;
    snprintf(a->what, sizeof a->what, "%s", w->waiting ? w->waiting : "no collective");
    MPI_Request r;
    if (MPI_Isend(a, (int)sizeof *a, MPI_BYTE, s.MPI_SOURCE, TAG_HERE, rs->comm, &r) == MPI_SUCCESS)
      MPI_Request_free(&r); /* a small message: it goes out on its own */
  }
}

/* Appends "0, 1, 4" (ranks r with pick[r] == want) to buf; their number. */
static int list_ranks(char *buf, size_t n, const bool *pick, bool want, int world) {
  int count = 0;
  size_t k = strlen(buf);
  for (int r = 0; r < world; r++) {
    if (pick[r] != want) continue;
    if (count == 16) { /* the message has a size */
      if (k < n) snprintf(buf + k, n - k, " and more");
      count++;
      break;
    }
    if (k < n) k += (size_t)snprintf(buf + k, n - k, "%s%d", count ? ", " : "", r);
    count++;
  }
  return count;
}

/* comm.h's timed_out: the roll call, the message, and the wait of the ranks
 * other than the lowest that answered (it ends the job for all). */
static bool mpi_timed_out(moert_comm *c, const char *what, double waited, const char *why,
                          moert_status *st) {
  roll_state *rs = impl_of(c)->roll;
  moert_watch *w = c->watch;
  static const char ping = 1;
  const int W = rs->world, me = rs->rank;
  if (w) {
    w->fired = true;
    w->waiting = what;
  }
  const double timeout = w && w->timeout > 0 ? w->timeout : MOERT_ROLL_CALL_S;
  const double window = timeout < MOERT_ROLL_CALL_S ? timeout : MOERT_ROLL_CALL_S;
  roll_answer *in = calloc((size_t)W, sizeof *in);
  MPI_Request *rr = calloc((size_t)W, sizeof *rr);
  bool *here = calloc((size_t)W, sizeof *here);
  if (!in || !rr || !here) {
    free(in), free(rr), free(here);
    return MOERT_FAIL(st, "%s did not complete (and no memory is left for a roll call)", what);
  }
  for (int r = 0; r < W; r++) {
    rr[r] = MPI_REQUEST_NULL;
    if (r == me) continue;
    MPI_Request sr;
    MPI_Irecv(&in[r], (int)sizeof in[r], MPI_BYTE, r, TAG_HERE, rs->comm, &rr[r]);
    if (MPI_Isend(&ping, 1, MPI_BYTE, r, TAG_PING, rs->comm, &sr) == MPI_SUCCESS) MPI_Request_free(&sr);
  }
  here[me] = true;
  int answered = 1;
  const double t0 = now_s();
  while (answered < W && now_s() - t0 < window) {
    for (int r = 0; r < W; r++) {
      int flag = 0;
      if (r == me || here[r] || MPI_Test(&rr[r], &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS || !flag) continue;
      here[r] = true;
      answered++;
    }
    answer_pings(rs, &(moert_watch){.step = w ? w->step : 0, .waiting = what});
    nap(1000000L);
  }
  for (int r = 0; r < W; r++)
    if (!here[r] && rr[r] != MPI_REQUEST_NULL) {
      MPI_Cancel(&rr[r]);
      MPI_Request_free(&rr[r]);
    }
  char at[48] = "";
  if (w && w->step > 0) snprintf(at, sizeof at, " at step %lld", (long long)w->step);
  else snprintf(at, sizeof at, " before the first step");
  char absent[400] = "", alive[400] = "";
  const int nabsent = list_ranks(absent, sizeof absent, here, false, W);
  list_ranks(alive, sizeof alive, here, true, W);
  /* where the others wait, when they all say one thing: "all_reduce at step 5" */
  char where[96] = "";
  bool same = true;
  for (int r = 0; r < W; r++)
    if (here[r] && r != me && (in[r].step != (w ? w->step : 0) || strncmp(in[r].what, what, sizeof in[r].what)))
      same = false;
  if (same) snprintf(where, sizeof where, ", each waiting in %s%s", what, at);
  /* the cause last: the message has a size, and NCCL's text is long */
  char head[200], cause[640] = "";
  if (why) snprintf(head, sizeof head, "%s%s failed", what, at);
  else snprintf(head, sizeof head, "%s%s did not complete in %.0f s (--timeout %g)", what, at, waited, timeout);
  if (why) snprintf(cause, sizeof cause, ". The failure: %s", why);
  if (nabsent)
    MOERT_FAIL(st, "%s: rank%s %s did not answer a roll call in %.0f s (stopped, hung or dead, or busy outside "
               "the collectives for that long); rank%s %s answered%s. The job ends (exit status %d); "
               "--timeout sets the limit (0: none)%s",
               head, nabsent > 1 ? "s" : "", absent, window, answered > 1 ? "s" : "", alive, where,
               MOERT_EXIT_TIMEOUT, cause);
  else
    MOERT_FAIL(st, "%s, yet every rank answered a roll call%s (a collective that the ranks called in "
               "different orders, or a slow network). The job ends (exit status %d); --timeout sets the "
               "limit (0: none)%s",
               head, where, MOERT_EXIT_TIMEOUT, cause);
  /* the lowest rank that answered says it for all and ends the job; the others
   * answer on meanwhile, then end it themselves if it did not */
  int lowest = 0;
  while (!here[lowest]) lowest++;
  if (lowest != me) {
    const double t1 = now_s();
    while (now_s() - t1 < window) {
      answer_pings(rs, &(moert_watch){.step = w ? w->step : 0, .waiting = what});
      nap(1000000L);
    }
  }
  free(in), free(rr), free(here);
  return false;
}

/* Finishes n started MPI requests of collective `what` on c: MPI_Waitall,
 * or under c's watch the spin, the polls and, past the timeout, the roll call
 * (the top of the file). */
static bool finish(moert_comm *c, int n, MPI_Request *r, const char *what, moert_status *st) {
  moert_watch *w = c->watch;
  if (!w || !(w->timeout > 0)) {
    if (!MPIOK(st, MPI_Waitall(n, r, MPI_STATUSES_IGNORE))) return MOERT_UP(st);
    return true;
  }
  const double t0 = now_s();
  long sleep_ns = SLEEP_MIN_NS;
  int done = 0;
  for (;;) {
    if (!MPIOK(st, MPI_Testall(n, r, &done, MPI_STATUSES_IGNORE))) return MOERT_UP(st);
    if (done) break;
    const double t = now_s();
    if (t - t0 < SPIN_S) {
      sched_yield();
      continue;
    }
    w->waiting = what;
    answer_pings(impl_of(c)->roll, w);
    if (t - t0 >= w->timeout) return mpi_timed_out(c, what, t - t0, NULL, st);
    nap(sleep_ns);
    sleep_ns = sleep_ns * 2 < SLEEP_MAX_NS ? sleep_ns * 2 : SLEEP_MAX_NS;
  }
  w->waiting = NULL;
  return true;
}

/* One nonblocking MPI call `call`, which fills the request *rq, finished. */
#define NB(st, c, what, call, rq) (MPIOK(st, call) && finish((c), 1, (rq), (what), (st)))

/* ---- nonblocking requests ---------------------------------------------- */

static bool req_get(mpi_impl *im, moert_req **out, moert_status *st) {
  moert_req *rq = im->free_reqs;
  if (rq) {
    im->free_reqs = rq->next_free;
  } else {
    rq = calloc(1, sizeof *rq);
    if (!rq) return MOERT_FAIL(st, "out of memory for a nonblocking all-to-all");
    rq->next_all = im->all_reqs;
    im->all_reqs = rq;
    im->nreqs++;
  }
  rq->next_free = NULL;
  rq->nmr = 0;
  rq->tdh = false;
  rq->recv = NULL;
  rq->n = 0;
  *out = rq;
  return true;
}

static void req_put(mpi_impl *im, moert_req *rq) {
  rq->nmr = 0;
  rq->next_free = im->free_reqs;
  im->free_reqs = rq;
}

/* Room for k more MPI requests in rq. */
static bool req_reserve(moert_req *rq, int64_t k, moert_status *st) {
  if (rq->nmr + k <= rq->cap) return true;
  if (k > INT_MAX / 2 - rq->nmr) return MOERT_FAIL(st, "too many passes in one nonblocking all-to-all");
  int cap = (int)(rq->nmr + k) * 2;
  MPI_Request *mr = realloc(rq->mr, (size_t)cap * sizeof *mr);
  if (!mr) return MOERT_FAIL(st, "out of memory for a nonblocking all-to-all");
  rq->mr = mr;
  rq->cap = cap;
  return true;
}

/* ---- all-to-all ---------------------------------------------------------- */

/* All-to-all over comm of blocks of n floats (block i of send to rank i,
 * block i of recv from rank i), in passes of at most max_count floats per
 * block ("Large counts"). With rq, the calls are started and their requests
 * appended to rq; without, they complete here. */
static bool a2a(moert_comm *c, MPI_Comm comm, const float *send, float *recv, int64_t n,
                moert_req *rq, moert_status *st) {
  const mpi_impl *im = impl_of(c);
  if (n == 0) return true;
  if (n <= im->max_count) {
    if (!rq) {
      MPI_Request r;
      return NB(st, c, "all_to_all",
                MPI_Ialltoall(send, (int)n, MPI_FLOAT, recv, (int)n, MPI_FLOAT, comm, &r), &r);
    }
    if (!req_reserve(rq, 1, st)) return false;
    MPICHECK(st, MPI_Ialltoall(send, (int)n, MPI_FLOAT, recv, (int)n, MPI_FLOAT, comm,
                               &rq->mr[rq->nmr]));
    rq->nmr++;
    return true;
  }
  if (rq && !req_reserve(rq, (n + im->max_count - 1) / im->max_count, st)) return false;
  for (int64_t off = 0; off < n; off += im->max_count) {
    MPI_Datatype t;
    MPI_Request r;
    if (!strided_type(MPI_FLOAT, min64(im->max_count, n - off), n, &t, st)) return false;
    bool ok = MPIOK(st, MPI_Ialltoall(send + off, 1, t, recv + off, 1, t, comm, rq ? &rq->mr[rq->nmr] : &r));
    MPI_Type_free(&t); /* a started call keeps what it needs of t */
    if (!ok) return false;
    if (rq) rq->nmr++;
    else if (!finish(c, 1, &r, "all_to_all", st)) return MOERT_UP(st);
  }
  return true;
}

/* 2DH steps 1 and 2 (see the top of the file): send -> scratch [L][N] ->
 * intra-node all-to-all -> recv [L][N]; started into rq when rq is given. */
static bool tdh_first(moert_comm *c, const float *send, float *recv, float *scratch,
                      int64_t n, moert_req *rq, moert_status *st) {
  const int N = c->nodes, L = c->local_size;
  const size_t bytes = (size_t)n * sizeof(float);
  for (int l = 0; l < L; l++)
    for (int m = 0; m < N; m++)
      memcpy(scratch + ((size_t)l * N + m) * n, send + ((size_t)m * L + l) * n, bytes);
  return a2a(c, impl_of(c)->node_comm, scratch, recv, (int64_t)N * n, rq, st);
}

/* 2DH steps 3 and 4: recv [L][N] -> scratch [N][L] -> inter-node all-to-all
 * -> recv, block r from rank r. */
static bool tdh_second(moert_comm *c, float *recv, float *scratch, int64_t n,
                       moert_status *st) {
  const int N = c->nodes, L = c->local_size;
  const size_t bytes = (size_t)n * sizeof(float);
  for (int m = 0; m < N; m++)
    for (int l = 0; l < L; l++)
      memcpy(scratch + ((size_t)m * L + l) * n, recv + ((size_t)l * N + m) * n, bytes);
  return a2a(c, impl_of(c)->cross_comm, scratch, recv, (int64_t)L * n, NULL, st);
}

static bool check_a2a(const moert_comm *c, int64_t n, moert_a2a_algo algo, moert_status *st) {
  if (!check_count("all_to_all", n, c->world, sizeof(float), st)) return false;
  if (algo != MOERT_A2A_LINEAR && algo != MOERT_A2A_2DH)
    return MOERT_FAIL(st, "all_to_all: unknown algorithm %d", (int)algo);
  return true;
}

static bool mpi_a2a(moert_comm *c, const float *send, float *recv, int64_t n, moert_a2a_algo algo,
                    moert_status *st) {
  mpi_impl *im = impl_of(c);
  MOERT_TRY(st, check_a2a(c, n, algo, st));
  if (n == 0) return true;
  if (algo == MOERT_A2A_LINEAR || !two_level(c)) {
    MOERT_TRY(st, a2a(c, im->comm, send, recv, n, NULL, st));
    return true;
  }
  MOERT_TRY(st, grow(&im->scratch, &im->scratch_cap, (size_t)c->world * (size_t)n, st));
  MOERT_TRY(st, tdh_first(c, send, recv, im->scratch, n, NULL, st));
  MOERT_TRY(st, tdh_second(c, recv, im->scratch, n, st));
  return true;
}

static bool mpi_a2a_start(moert_comm *c, const float *send, float *recv, int64_t n,
                          moert_a2a_algo algo, moert_req **req, moert_status *st) {
  mpi_impl *im = impl_of(c);
  *req = NULL;
  MOERT_TRY(st, check_a2a(c, n, algo, st));
  if (n == 0) return true; /* nothing in flight: wait(NULL) */
  moert_req *rq = NULL;
  MOERT_TRY(st, req_get(im, &rq, st));
  bool ok;
  if (algo == MOERT_A2A_LINEAR || !two_level(c)) {
    ok = a2a(c, im->comm, send, recv, n, rq, st);
  } else {
    rq->tdh = true;
    rq->recv = recv;
    rq->n = n;
    ok = grow(&rq->scratch, &rq->scratch_cap, (size_t)c->world * (size_t)n, st) &&
         tdh_first(c, send, recv, rq->scratch, n, rq, st);
  }
  if (!ok) {
    /* What was started cannot be taken back; the caller aborts the run. */
    req_put(im, rq);
    return MOERT_UP(st);
  }
  *req = rq;
  return true;
}

static bool mpi_a2av(moert_comm *c, const float *send, const int64_t *scount, const int64_t *sdispl,
                     float *recv, const int64_t *rcount, const int64_t *rdispl, moert_status *st) {
  mpi_impl *im = impl_of(c);
  int W = c->world;
  int *v = malloc(sizeof(int) * 4 * (size_t)W);
  if (!v) return MOERT_FAIL(st, "all_to_allv: out of memory");
  bool ok = true;
  for (int r = 0; r < W && ok; r++) {
    if (scount[r] < 0 || rcount[r] < 0 || scount[r] > INT_MAX || rcount[r] > INT_MAX || sdispl[r] < 0 ||
        rdispl[r] < 0 || sdispl[r] > INT_MAX || rdispl[r] > INT_MAX)
      ok = MOERT_FAIL(st, "all_to_allv: counts and displacements must be 0 to %d floats (rank %d: "
                      "send %lld at %lld, receive %lld at %lld)", INT_MAX, r, (long long)scount[r],
                      (long long)sdispl[r], (long long)rcount[r], (long long)rdispl[r]);
    v[r] = (int)scount[r];
    v[W + r] = (int)sdispl[r];
    v[2 * W + r] = (int)rcount[r];
    v[3 * W + r] = (int)rdispl[r];
  }
  MPI_Request r;
  ok = ok && NB(st, c, "all_to_allv",
                MPI_Ialltoallv(send, v, v + W, MPI_FLOAT, recv, v + 2 * W, v + 3 * W, MPI_FLOAT, im->comm, &r), &r);
  free(v);
  return ok ? true : MOERT_UP(st);
}

static bool mpi_wait(moert_comm *c, moert_req *rq, moert_status *st) {
  if (!rq) return true;
  bool ok = rq->nmr == 0 || finish(c, rq->nmr, rq->mr, "all_to_all (nonblocking)", st);
  rq->nmr = 0;
  if (ok && rq->tdh) ok = tdh_second(c, rq->recv, rq->scratch, rq->n, st);
  req_put(impl_of(c), rq);
  return ok ? true : MOERT_UP(st);
}

/* ---- the other collectives ---------------------------------------------- */

static bool all_reduce(moert_comm *c, void *x, int64_t n, MPI_Datatype type, int size, moert_red op,
                       moert_status *st) {
  mpi_impl *im = impl_of(c);
  MPI_Op mop = MPI_SUM;
  MOERT_TRY(st, check_count("all_reduce", n, 1, size, st));
  MOERT_TRY(st, mpi_op(op, &mop, st));
  MPI_Request r;
  for (int64_t off = 0; off < n; off += im->max_count)
    if (!NB(st, c, "all_reduce", MPI_Iallreduce(MPI_IN_PLACE, (char *)x + off * size,
                                                (int)min64(im->max_count, n - off), type, mop, im->comm, &r), &r))
      return MOERT_UP(st);
  return true;
}

static bool mpi_all_reduce_f64(moert_comm *c, double *x, int64_t n, moert_red op, moert_status *st) {
  return all_reduce(c, x, n, MPI_DOUBLE, sizeof *x, op, st);
}
static bool mpi_all_reduce_f32(moert_comm *c, float *x, int64_t n, moert_red op, moert_status *st) {
  return all_reduce(c, x, n, MPI_FLOAT, sizeof *x, op, st);
}
static bool mpi_all_reduce_i64(moert_comm *c, int64_t *x, int64_t n, moert_red op, moert_status *st) {
  return all_reduce(c, x, n, MPI_INT64_T, sizeof *x, op, st);
}

/* send == recv + rank * n (this rank's block of recv) is in place. */
static bool mpi_all_gather(moert_comm *c, const float *send, float *recv, int64_t n,
                           moert_status *st) {
  mpi_impl *im = impl_of(c);
  MOERT_TRY(st, check_count("all_gather", n, c->world, sizeof(float), st));
  if (n == 0) return true;
  bool in_place = send == recv + (size_t)c->rank * n;
  if (n <= im->max_count) {
    MPI_Request r;
    if (!NB(st, c, "all_gather", MPI_Iallgather(in_place ? MPI_IN_PLACE : send, (int)n, MPI_FLOAT, recv, (int)n,
                                                MPI_FLOAT, im->comm, &r), &r))
      return MOERT_UP(st);
    return true;
  }
  for (int64_t off = 0; off < n; off += im->max_count) {
    int64_t len = min64(im->max_count, n - off);
    MPI_Datatype t;
    MOERT_TRY(st, strided_type(MPI_FLOAT, len, n, &t, st));
    MPI_Request r;
    bool ok = MPIOK(st, MPI_Iallgather(in_place ? MPI_IN_PLACE : send + off, (int)len, MPI_FLOAT,
                                       recv + off, 1, t, im->comm, &r));
    MPI_Type_free(&t);
    if (!ok || !finish(c, 1, &r, "all_gather", st)) return MOERT_UP(st);
  }
  return true;
}

/* send == recv is in place (recv then holds world * n; the result is its
 * first n), as MPI_IN_PLACE means for MPI_Reduce_scatter_block. */
static bool mpi_reduce_scatter(moert_comm *c, const float *send, float *recv, int64_t n,
                               moert_status *st) {
  mpi_impl *im = impl_of(c);
  MOERT_TRY(st, check_count("reduce_scatter", n, c->world, sizeof(float), st));
  if (n == 0) return true;
  bool in_place = send == recv;
  if (n <= im->max_count) {
    MPI_Request r;
    if (!NB(st, c, "reduce_scatter", MPI_Ireduce_scatter_block(in_place ? MPI_IN_PLACE : send, recv, (int)n,
                                                               MPI_FLOAT, MPI_SUM, im->comm, &r), &r))
      return MOERT_UP(st);
    return true;
  }
  /* Root 0 first: in place, a root r > 0 overwrites its block 0, which only
   * the reduction to root 0 reads. */
  for (int r = 0; r < c->world; r++)
    for (int64_t off = 0; off < n; off += im->max_count) {
      const float *s = send + (size_t)r * n + off;
      if (r == c->rank && in_place && r == 0) s = MPI_IN_PLACE;
      MPI_Request q;
      if (!NB(st, c, "reduce_scatter", MPI_Ireduce(s, r == c->rank ? recv + off : NULL,
                                                   (int)min64(im->max_count, n - off), MPI_FLOAT, MPI_SUM, r,
                                                   im->comm, &q), &q))
        return MOERT_UP(st);
    }
  return true;
}

static bool mpi_broadcast(moert_comm *c, void *buf, int64_t bytes, int root, moert_status *st) {
  mpi_impl *im = impl_of(c);
  MOERT_TRY(st, check_count("broadcast", bytes, 1, 1, st));
  MOERT_TRY(st, check_root(c, "broadcast", root, st));
  MPI_Request r;
  for (int64_t off = 0; off < bytes; off += im->max_count)
    if (!NB(st, c, "broadcast", MPI_Ibcast((char *)buf + off, (int)min64(im->max_count, bytes - off), MPI_BYTE,
                                           root, im->comm, &r), &r))
      return MOERT_UP(st);
  return true;
}

/* At the root, send == recv + root * bytes is in place. */
static bool mpi_gather(moert_comm *c, const void *send, void *recv, int64_t bytes, int root,
                       moert_status *st) {
  mpi_impl *im = impl_of(c);
  MOERT_TRY(st, check_count("gather", bytes, c->world, 1, st));
  MOERT_TRY(st, check_root(c, "gather", root, st));
  if (bytes == 0) return true;
  const bool at_root = c->rank == root;
  const bool in_place = at_root && send == (const char *)recv + (size_t)root * bytes;
  if (bytes <= im->max_count) {
    MPI_Request r;
    if (!NB(st, c, "gather", MPI_Igather(in_place ? MPI_IN_PLACE : send, (int)bytes, MPI_BYTE,
                                         at_root ? recv : NULL, (int)bytes, MPI_BYTE, root, im->comm, &r), &r))
      return MOERT_UP(st);
    return true;
  }
  for (int64_t off = 0; off < bytes; off += im->max_count) {
    int64_t len = min64(im->max_count, bytes - off);
    MPI_Datatype t;
    MOERT_TRY(st, strided_type(MPI_BYTE, len, bytes, &t, st));
    MPI_Request r;
    bool ok = MPIOK(st, MPI_Igather(in_place ? MPI_IN_PLACE : (const char *)send + off, (int)len,
                                    MPI_BYTE, at_root ? (char *)recv + off : NULL, 1, t, root,
                                    im->comm, &r));
    MPI_Type_free(&t);
    if (!ok || !finish(c, 1, &r, "gather", st)) return MOERT_UP(st);
  }
  return true;
}

static bool mpi_barrier(moert_comm *c, moert_status *st) {
  MPI_Request r;
  if (!NB(st, c, "barrier", MPI_Ibarrier(impl_of(c)->comm, &r), &r)) return MOERT_UP(st);
  return true;
}

/* ---- comms: creation, split, destroy ------------------------------------ */

static bool mpi_split(moert_comm *c, int color, int key, moert_comm **out, moert_status *st);
static void mpi_destroy(moert_comm *c);

static mpi_comm *comm_new(void) {
  mpi_comm *mc = calloc(1, sizeof *mc);
  if (!mc) return NULL;
  mc->im.comm = mc->im.node_comm = mc->im.cross_comm = MPI_COMM_NULL;
  mc->im.max_count = MOERT_MPI_MAX_COUNT;
  moert_comm *c = &mc->pub;
  c->name = "mpi";
  c->all_reduce_f64 = mpi_all_reduce_f64;
  c->all_reduce_f32 = mpi_all_reduce_f32;
  c->all_reduce_i64 = mpi_all_reduce_i64;
  c->all_gather_f32 = mpi_all_gather;
  c->reduce_scatter_f32 = mpi_reduce_scatter;
  c->broadcast = mpi_broadcast;
  c->gather = mpi_gather;
  c->all_to_all_f32 = mpi_a2a;
  c->all_to_all_start = mpi_a2a_start;
  c->all_to_allv_f32 = mpi_a2av;
  c->wait = mpi_wait;
  c->split = mpi_split;
  c->barrier = mpi_barrier;
  c->timed_out = mpi_timed_out;
  c->destroy = mpi_destroy;
  c->impl = &mc->im;
  return mc;
}

/* Fills c's topology from its local size L (dividing c->world; node-major)
 * and makes the sub-comms of 2DH. Collective over c. */
static bool set_topology(moert_comm *c, int L, moert_status *st) {
  mpi_impl *im = impl_of(c);
  c->local_size = L;
  c->nodes = c->world / L;
  c->node = c->rank / L;
  c->local_rank = c->rank % L;
  c->host_rank = c->local_rank; /* the world comm's: set by world_setup */
  c->host_size = L;
  if (!two_level(c)) return true;
  MPICHECK(st, MPI_Comm_split(im->comm, c->node, c->local_rank, &im->node_comm));
  MPICHECK(st, MPI_Comm_split(im->comm, c->local_rank, c->node, &im->cross_comm));
  return true;
}

/* Divisors of w as "1, 2, 4" (cut short when long). */
static void divisors(int w, char *buf, size_t n) {
  size_t k = 0;
  buf[0] = 0;
  for (int d = 1; d <= w && k + 16 < n; d++)
    if (w % d == 0) k += (size_t)snprintf(buf + k, n - k, "%s%d", k ? ", " : "", d);
  if (k + 16 >= n) snprintf(buf + k, n - k, ", ...");
}

/* A rankinfo.env_local for messages: "4", "unset", "not a number". */
static void env_words(int v, char *buf, size_t n) {
  if (v > 0) snprintf(buf, n, "%d", v);
  else snprintf(buf, n, "%s", v == 0 ? "unset" : "not a whole number");
}

bool moert_comm_mpi_topology(int world, const moert_mpi_rankinfo *info, const char *env_text,
                             int *local_size, moert_status *st) {
  *local_size = 0;
  const int env = info[0].env_local;
  for (int r = 1; r < world; r++)
    if (info[r].env_local != env) {
      char a[32], b[32];
      env_words(env, a, sizeof a);
      env_words(info[r].env_local, b, sizeof b);
      return MOERT_FAIL(st, "MOEC_LOCAL_SIZE differs between ranks (rank 0: %s, rank %d: %s); give "
                            "every rank the same value (Open MPI: mpirun -x MOEC_LOCAL_SIZE)",
                        a, r, b);
    }
  if (env < 0)
    return MOERT_FAIL(st, "MOEC_LOCAL_SIZE=%s is not a whole number of 1 or more; it is the number "
                          "of ranks per node",
                      env_text ? env_text : "?");
  if (env > 0) {
    if (world % env != 0) {
      char ds[128];
      divisors(world, ds, sizeof ds);
      return MOERT_FAIL(st, "MOEC_LOCAL_SIZE=%d does not divide the world size %d: it is the number "
                            "of ranks per node, one of %s",
                        env, world, ds);
    }
    *local_size = env;
    return true;
  }
  const int L = info[0].shm_size;
  for (int r = 0; r < world; r++)
    if (info[r].shm_size != L)
      return MOERT_FAIL(st, "the nodes have different numbers of ranks (%d on the node of rank 0, "
                            "%d on the node of rank %d); moec needs the same number on every node: "
                            "launch as many ranks per node on every node (Open MPI: mpirun "
                            "--map-by ppr:N:node), or set MOEC_LOCAL_SIZE",
                        L, info[r].shm_size, r);
  /* Groups are contiguous iff each rank's group starts where node-major
   * says; the first rank that breaks it names the node it is missing from. */
  for (int r = 0; r < world; r++)
    if (info[r].shm_first != r - r % L || info[r].shm_rank != r % L)
      return MOERT_FAIL(st, "the ranks are not numbered node-major: rank %d is not on the node of "
                            "rank %d, while with %d ranks per node ranks %d to %d should share one; "
                            "launch them filling one node after another (Open MPI: mpirun "
                            "--map-by slot or core, the default, not --map-by node), or set "
                            "MOEC_LOCAL_SIZE",
                        r, r - r % L, L, r - r % L, r - r % L + L - 1);
  *local_size = L;
  return true;
}

/* MOEC_LOCAL_SIZE as moert_mpi_rankinfo.env_local. */
static int env_local_size(const char *s) {
  if (!s || !*s) return 0;
  long v = 0;
  for (const char *p = s; *p; p++) {
    if (*p < '0' || *p > '9') return -1;
    v = v * 10 + (*p - '0');
    if (v > INT_MAX) return -1;
  }
  return v >= 1 ? (int)v : -1;
}

bool moert_comm_under_mpirun(void) {
  static const char *const vars[] = {
      "OMPI_COMM_WORLD_SIZE", /* Open MPI's mpirun */
      "PMIX_RANK",            /* PMIx: Open MPI 5's prterun, srun --mpi=pmix */
      "PMI_SIZE", "PMI_RANK", /* PMI-1/2: MPICH's and Intel MPI's hydra, srun --mpi=pmi2 */
      "MPI_LOCALNRANKS",      /* MPICH's hydra */
      "MV2_COMM_WORLD_SIZE",  /* MVAPICH2 */
  };
  for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
    const char *v = getenv(vars[i]);
    if (v && *v) return true;
  }
  /* srun of several tasks (a batch script's own shell is not a step of several) */
  const char *s = getenv("SLURM_STEP_NUM_TASKS");
  return s && atoi(s) > 1;
}

/* The world comm's state past MPI_Init: dup, topology, sub-comms. consistent
 * tells whether the failure is one all ranks share (then MPI can finalize). */
static bool world_setup(mpi_comm *mc, bool *consistent, moert_status *st) {
  moert_comm *c = &mc->pub;
  mpi_impl *im = &mc->im;
  *consistent = false;
  MPICHECK(st, MPI_Comm_dup(MPI_COMM_WORLD, &im->comm));
  MPICHECK(st, MPI_Comm_set_errhandler(im->comm, MPI_ERRORS_RETURN));
  MPICHECK(st, MPI_Comm_size(im->comm, &c->world));
  MPICHECK(st, MPI_Comm_rank(im->comm, &c->rank));
  roll_state *rs = im->roll = calloc(1, sizeof *rs);
  if (!rs) return MOERT_FAIL(st, "out of memory for the mpi comm");
  im->owns_roll = true;
  rs->comm = MPI_COMM_NULL;
  if (!(rs->out = calloc((size_t)c->world, sizeof *rs->out)))
    return MOERT_FAIL(st, "out of memory for the mpi comm");
  rs->rank = c->rank;
  rs->world = c->world;
  MPICHECK(st, MPI_Comm_dup(im->comm, &rs->comm));

  MPI_Comm shm;
  MPICHECK(st, MPI_Comm_split_type(im->comm, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL, &shm));
  moert_mpi_rankinfo mine = {0};
  const char *env = getenv("MOEC_LOCAL_SIZE");
  mine.env_local = env_local_size(env);
  bool ok = MPIOK(st, MPI_Comm_size(shm, &mine.shm_size)) &&
            MPIOK(st, MPI_Comm_rank(shm, &mine.shm_rank)) &&
            MPIOK(st, MPI_Allreduce(&c->rank, &mine.shm_first, 1, MPI_INT, MPI_MIN, shm));
  MPI_Comm_free(&shm);
  if (!ok) return false;

  moert_mpi_rankinfo *all = malloc((size_t)c->world * sizeof *all);
  if (!all) return MOERT_FAIL(st, "out of memory for the topology of %d ranks", c->world);
  ok = MPIOK(st, MPI_Allgather(&mine, 4, MPI_INT, all, 4, MPI_INT, im->comm));
  int L = 0;
  if (ok && !moert_comm_mpi_topology(c->world, all, env, &L, st)) {
    *consistent = true;
    ok = false;
  }
  free(all);
  if (!ok || !set_topology(c, L, st)) return false;
  c->host_rank = mine.shm_rank;
  c->host_size = mine.shm_size;
  return true;
}

bool moert_comm_mpi_create(int *argc, char ***argv, moert_comm **out, moert_status *st) {
  *out = NULL;
  int inited = 0, finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return MOERT_FAIL(st, "MPI was finalized in this process already; it cannot start again");
  MPI_Initialized(&inited);
  bool owns = false;
  if (!inited) {
    int provided = MPI_THREAD_SINGLE;
    int rc = MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
    if (rc != MPI_SUCCESS)
      return MOERT_FAIL(st, "MPI could not start (MPI_Init_thread: %s); check the MPI installation "
                            "(ompi_info) and the launch (mpirun -np N ...)",
                        moert_mpi_strerror(rc));
    owns = true;
    if (provided < MPI_THREAD_FUNNELED) {
      MPI_Finalize();
      return MOERT_FAIL(st, "this MPI offers only thread level %d, below MPI_THREAD_FUNNELED, which "
                            "moec needs",
                        provided);
    }
  }
  /* Failures come back as codes: on the errors of no comm too (MPI 3 raises
   * them on MPI_COMM_WORLD, MPI 4 on MPI_COMM_SELF). */
  MPICHECK(st, MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  MPICHECK(st, MPI_Comm_set_errhandler(MPI_COMM_SELF, MPI_ERRORS_RETURN));
  mpi_comm *mc = comm_new();
  if (!mc) return MOERT_FAIL(st, "out of memory for the mpi comm");
  mc->im.owns_mpi = owns;
  bool consistent;
  if (!world_setup(mc, &consistent, st)) {
    mpi_destroy(&mc->pub);
    /* Every rank failed alike (a bad MOEC_LOCAL_SIZE): finalize, so that the
     * caller can print and exit cleanly. Otherwise some ranks may be inside a
     * collective: the caller must abort (moert_comm_abort). */
    if (consistent && owns) MPI_Finalize();
    return MOERT_UP(st);
  }
  *out = &mc->pub;
  return true;
}

static bool mpi_split(moert_comm *c, int color, int key, moert_comm **out, moert_status *st) {
  mpi_impl *im = impl_of(c);
  *out = NULL;
  if (color < 0) return MOERT_FAIL(st, "split: color %d is negative (colors are 0 or more)", color);
  mpi_comm *mc = comm_new();
  if (!mc) return MOERT_FAIL(st, "out of memory for a comm of split");
  moert_comm *k = &mc->pub;
  mc->im.max_count = im->max_count;
  mc->im.roll = im->roll;
  k->watch = c->watch;
  int *node_of = NULL;
  bool ok = MPIOK(st, MPI_Comm_split(im->comm, color, key, &mc->im.comm)) &&
            MPIOK(st, MPI_Comm_set_errhandler(mc->im.comm, MPI_ERRORS_RETURN)) &&
            MPIOK(st, MPI_Comm_size(mc->im.comm, &k->world)) &&
            MPIOK(st, MPI_Comm_rank(mc->im.comm, &k->rank));
  if (ok && !(node_of = malloc((size_t)k->world * sizeof *node_of)))
    ok = MOERT_FAIL(st, "out of memory for a comm of split");
  ok = ok && MPIOK(st, MPI_Allgather(&c->node, 1, MPI_INT, node_of, 1, MPI_INT, mc->im.comm));
  if (ok) {
    /* Equal runs of one parent node each, every parent node in one run:
     * node-major with L ranks per node; else flat (L = 1). */
    const int w = k->world;
    int L = 0;
    while (L < w && node_of[L] == node_of[0]) L++;
    bool regular = w % L == 0;
    for (int b = 0; regular && b < w; b += L) {
      for (int i = b; regular && i < b + L; i++) regular = node_of[i] == node_of[b];
      for (int p = 0; regular && p < b; p += L) regular = node_of[p] != node_of[b];
    }
    ok = set_topology(k, regular ? L : 1, st);
  }
  free(node_of);
  if (!ok) {
    mpi_destroy(k);
    return MOERT_UP(st);
  }
  *out = k;
  return true;
}

static void free_comm(MPI_Comm *comm) {
  if (*comm != MPI_COMM_NULL) MPI_Comm_free(comm);
}

static void mpi_destroy(moert_comm *c) {
  if (!c) return;
  mpi_impl *im = impl_of(c);
  for (moert_req *rq = im->all_reqs, *next; rq; rq = next) {
    next = rq->next_all;
    free(rq->mr);
    free(rq->scratch);
    free(rq);
  }
  free(im->scratch);
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (im->owns_roll) {
    if (!finalized) free_comm(&im->roll->comm);
    free(im->roll->out);
    free(im->roll);
  }
  if (!finalized) {
    free_comm(&im->cross_comm);
    free_comm(&im->node_comm);
    free_comm(&im->comm);
  }
  free((mpi_comm *)c);
}

void moert_comm_mpi_finalize(moert_comm *c) {
  bool owns = c ? impl_of(c)->owns_mpi : true;
  mpi_destroy(c);
  int inited = 0, finalized = 0;
  MPI_Initialized(&inited);
  MPI_Finalized(&finalized);
  if (owns && inited && !finalized) MPI_Finalize();
}

void moert_comm_abort(moert_comm *c, int code) {
  (void)c; /* every rank stops, whatever comm failed */
  fflush(stdout);
  fflush(stderr);
  int inited = 0, finalized = 0;
  MPI_Initialized(&inited);
  MPI_Finalized(&finalized);
  if (inited && !finalized) MPI_Abort(MPI_COMM_WORLD, code);
  exit(code); /* no MPI running (or MPI_Abort came back): only this process */
}

/* ---- test hooks (comm_mpi_impl.h) ---------------------------------------- */

void moert_comm_mpi_set_max_count(moert_comm *c, int64_t max_count) {
  impl_of(c)->max_count = max_count > 0 ? min64(max_count, INT_MAX) : MOERT_MPI_MAX_COUNT;
}

int64_t moert_comm_mpi_scratch_bytes(const moert_comm *c) {
  return (int64_t)(impl_of(c)->scratch_cap * sizeof(float));
}

int moert_comm_mpi_req_count(const moert_comm *c) { return impl_of(c)->nreqs; }
