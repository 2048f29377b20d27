/* a2a_bench.c — all-to-all bandwidth: our comm's all-to-all (LINEAR and 2DH,
 * runtime/comm.h) against the library's own, in one process, on buffers of
 * the same size, timed the same way; one markdown row per size.
 *
 * Run it under mpirun, one process per rank (one GPU per rank with nccl):
 *   mpirun -np 8 build/bench/a2a_bench --backend cuda --comm nccl
 *   mpirun -np 8 -x MOEC_LOCAL_SIZE=4 build/bench/a2a_bench --backend cuda --comm nccl
 *       (2DH too: 2 simulated nodes of 4 GPUs; every rank still gets a GPU of
 *       its own, chosen by its rank among the processes of its host)
 *   mpirun --oversubscribe -np 4 -x MOEC_LOCAL_SIZE=2 build/bench/a2a_bench --backend cpu --comm mpi
 * or `cmake --build build --target bench-gpu-a2a` (every GPU of the machine).
 * NVLink multicast (NVLS) is forbidden on the GPU machines (it can take the
 * host's GPUs out of service): the bench sets NCCL_NVLS_ENABLE=0 in its own
 * environment before anything can load NCCL, unless the variable is set
 * already, and its header says which.
 *
 * Sizes as nccl-tests' alltoall_perf: SIZE is the bytes of each rank's whole
 * send buffer, `world` blocks of SIZE/world bytes of float32, block j for
 * rank j; algbw = SIZE / time, busbw = algbw * (world - 1) / world, in GB/s
 * of 1e9 bytes. From --min to --max, times --factor; a size that is not
 * `world` blocks of whole floats is skipped with a note.
 *
 * What runs, per size:
 *   ours    the comm's all_to_all_f32 with LINEAR, and 2DH where the comm has
 *           several nodes of several ranks (MOEC_LOCAL_SIZE=n simulates nodes
 *           of n ranks); buffers from the backend (GPU memory on cuda);
 *   ref     --comm nccl: one group of ncclSend/ncclRecv to every rank, itself
 *           included, as nccl-tests' alltoall does, on an NCCL communicator of
 *           its own (unique id from rank 0 broadcast over MPI), enqueued on the
 *           stream our comm uses (the cuda backend's), on the same buffers;
 *           libnccl.so.2 opened with dlopen as comm_nccl.c does (the same
 *           library: dlopen of one name gives one handle).
 *           --comm mpi: MPI_Alltoall over MPI_COMM_WORLD on host buffers (the
 *           same buffers with --backend cpu; host buffers of the same size with
 *           --backend cuda, where ours is the mpi comm staged through the host).
 * Before the timing, one call of each is checked: send block j of rank r holds
 * a pattern of (r, j, index) (integers below 2^24 + 1, so exact in float32,
 * never 0), recv is zeroed first, and recv block j must be what rank j sent
 * here. Any wrong element: every rank says where its first is, exit 1.
 *
 * Timing: `warmup` calls of each, then `repeats` rounds, each timing `iters`
 * back-to-back calls of the reference, LINEAR and 2DH in turn (so drift hits
 * all alike), from a barrier. On cuda with nccl: the backend's timing marks
 * (CUDA events on its stream) around the calls; else the host's clock
 * (MPI_Wtime; the staged comm and MPI return when done). Per round: the mean
 * per call, the max over ranks; reported: the median over rounds.
 *
 * Failures. Setup (the backend, the comms, the buffers) is agreed by every
 * rank through a nonblocking all-reduce with a deadline: all ranks exit 1
 * alike with the lowest failing rank's message (the runtime's own words), and
 * a rank stuck elsewhere (inside NCCL's init) makes the others stop the job
 * rather than wait. A call that fails while the ranks exchange data stops
 * every rank at once (MPI_Abort): the others may be waiting in it forever.
 * Exit: 0 done, 1 a failure or a wrong result, 2 a usage error. */
#define _GNU_SOURCE /* dladdr */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend.h"
#include "comm.h"
#include "flags.h"

#ifdef MOERT_HAVE_NCCL_HEADERS
#include <dlfcn.h>
#include <nccl.h>
#endif

/* How long a rank waits for the others to agree on setup before it stops the
 * job: longer than NCCL's init of 8 GPUs (seconds), short of CTest's timeout. */
#define AGREE_TIMEOUT_S 60.0
/* The pattern's seed: any constant; rank r's block for j is keyed by (r, j). */
#define PATTERN_SEED 0x6132615f62656e63ull

/* ------------------------------------------------------------ options */

#define FLAGS(X)                                                                                   \
  X(BACKEND, "backend", 1, "cuda|cpu", "where the buffers live (default: cuda with --comm nccl, cpu with --comm mpi;\n" \
    "                             neither given: cuda and nccl when every rank sees a GPU, else cpu and mpi)") \
  X(COMM, "comm", 1, "nccl|mpi", "ours is the nccl comm (reference: ncclSend/ncclRecv) or the mpi comm\n" \
    "                             (reference: MPI_Alltoall)")                                      \
  X(MIN, "min", 1, "BYTES", "the smallest size: bytes of each rank's send buffer (default 1M;\n"  \
    "                             suffixes K, M, G are powers of 1024)")                            \
  X(MAX, "max", 1, "BYTES", "the largest size (default 1G)")                                      \
  X(FACTOR, "factor", 1, "N", "each size is N times the last (default 2)")                       \
  X(ITERS, "iters", 1, "N", "calls timed back to back in one measurement (default 20)")           \
  X(WARMUP, "warmup", 1, "N", "calls of each before the timing (default 5)")                     \
  X(REPEATS, "repeats", 1, "N", "measurements per size and algorithm; the median is reported (default 5)") \
  X(ALGO, "algo", 1, "linear|2dh|both", "our algorithms to time (default both; 2dh needs several nodes\n" \
    "                             of several ranks: MOEC_LOCAL_SIZE)")                              \
  X(JSON, "json", 1, "FILE", "also write the header and the rows as JSON to FILE")                \
  X(NO_CHECK, "no-check", 0, "", "skip the check of each size's results (for quick looks only)")  \
  X(HELP, "help", 0, "", "print this help and exit")

MOERT_FLAGS(FLAGS)

enum { ALGO_LINEAR = 1, ALGO_2DH = 2 };

typedef struct options {
  const char *backend, *comm, *json; /* NULL: not given */
  int64_t min, max, factor, iters, warmup, repeats;
  int algos;                         /* ALGO_* bits */
  bool check, help;
} options;

static void usage(FILE *out) {
  fputs("usage: mpirun -np W a2a_bench [options]\n"
        "All-to-all bus bandwidth of our comm (LINEAR, 2DH) against the library's own\n"
        "(nccl-tests' alltoall_perf semantics), one row per size.\n\n",
        out);
  moert_flags_print(out, flag_info, FLAG__COUNT, 26);
  fputs("\nExit status: 0 done, 1 a failure or a wrong result, 2 a usage error.\n", out);
}


/* Bytes: a whole number with an optional K, M or G (powers of 1024), 1 or more. */
static bool parse_size(const char *s, int64_t *out) {
  char *end;
  errno = 0;
  long long v = strtoll(s, &end, 10);
  if (errno || end == s || v < 1 || (*s < '0' || *s > '9')) return false;
  int shift = 0;
  switch (*end) {
  case '\0': break;
  case 'k': case 'K': shift = 10; end++; break;
  case 'm': case 'M': shift = 20; end++; break;
  case 'g': case 'G': shift = 30; end++; break;
  default: return false;
  }
  if (*end || v > (INT64_MAX >> 20) >> shift) return false; /* room to multiply by --factor */
  *out = (int64_t)v << shift;
  return true;
}

/* Fills o from argv; false with msg (for rank 0 to print) on a usage error. */
static bool parse_options(int argc, char **argv, options *o, char *msg, size_t cap) {
  *o = (options){.min = (int64_t)1 << 20, .max = (int64_t)1 << 30, .factor = 2, .iters = 20,
                 .warmup = 5, .repeats = 5, .algos = ALGO_LINEAR | ALGO_2DH, .check = true};
  opterr = 0;
  optind = 1;
  int c;
  /* ":" first: a missing value comes back as ':', an unknown option as '?' */
  while ((c = getopt_long(argc, argv, ":h", long_opts, NULL)) != -1) {
    if (c == 'h') c = MOERT_FLAG_BASE + FLAG_HELP;
    if (c == ':') {
      snprintf(msg, cap, "option '%s' needs a value", argv[optind - 1]);
      return false;
    }
    if (c == '?') {
      snprintf(msg, cap, "unknown option '%s'", argv[optind - 1]);
      return false;
    }
    c -= MOERT_FLAG_BASE;
    const char *a = optarg, *want = NULL;
    switch (c) {
    case FLAG_BACKEND:
      o->backend = a;
      if (strcmp(a, "cuda") && strcmp(a, "cpu")) want = "cuda or cpu";
      break;
    case FLAG_COMM:
      o->comm = a;
      if (strcmp(a, "nccl") && strcmp(a, "mpi")) want = "nccl or mpi";
      break;
    case FLAG_MIN:
      if (!parse_size(a, &o->min)) want = "bytes, 1 or more, with an optional K, M or G";
      break;
    case FLAG_MAX:
      if (!parse_size(a, &o->max)) want = "bytes, 1 or more, with an optional K, M or G";
      break;
    case FLAG_FACTOR:
      if (!moert_parse_int(a, 2, 1024, &o->factor)) want = "a whole number from 2 to 1024";
      break;
    case FLAG_ITERS:
      if (!moert_parse_int(a, 1, 1000000, &o->iters)) want = "a whole number from 1 to 1000000";
      break;
    case FLAG_WARMUP:
      if (!moert_parse_int(a, 0, 1000000, &o->warmup)) want = "a whole number from 0 to 1000000";
      break;
    case FLAG_REPEATS:
      if (!moert_parse_int(a, 1, 1000, &o->repeats)) want = "a whole number from 1 to 1000";
      break;
    case FLAG_ALGO:
      o->algos = !strcmp(a, "linear") ? ALGO_LINEAR
                 : !strcmp(a, "2dh")  ? ALGO_2DH
                 : !strcmp(a, "both") ? ALGO_LINEAR | ALGO_2DH
                                      : 0;
      if (!o->algos) want = "linear, 2dh or both";
      break;
    case FLAG_JSON: o->json = a; break;
    case FLAG_NO_CHECK: o->check = false; break;
    case FLAG_HELP: o->help = true; return true;
    default: snprintf(msg, cap, "unknown option '%s'", argv[optind - 1]); return false;
    }
    if (want) {
      snprintf(msg, cap, "bad value '%s' for --%s (%s)", a, flag_info[c].name, want);
      return false;
    }
  }
  if (optind < argc) {
    snprintf(msg, cap, "unexpected argument '%s'", argv[optind]);
    return false;
  }
  if (o->min > o->max) {
    snprintf(msg, cap, "--min (%" PRId64 " bytes) is more than --max (%" PRId64 " bytes)", o->min, o->max);
    return false;
  }
  if (o->comm && o->backend && !strcmp(o->comm, "nccl") && !strcmp(o->backend, "cpu")) {
    snprintf(msg, cap, "--comm nccl needs --backend cuda (NCCL moves GPU memory); with --backend cpu "
                       "use --comm mpi");
    return false;
  }
  return true;
}

/* ------------------------------------------------------------ ranks and agreement */

static int g_rank, g_world;
static moert_comm *g_host; /* the mpi comm, for moert_comm_abort */

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Stops every rank now: a failure in the middle of an exchange, where the
 * other ranks may wait for this one forever. */
static void die(const char *what, const moert_status *st) {
  fprintf(stderr, "a2a_bench: rank %d: error: %s: %s\n", g_rank, what, st->msg);
  if (getenv("MOEC_TRACE")) fprintf(stderr, "a2a_bench: rank %d: trace: %s\n", g_rank, st->trace);
  moert_comm_abort(g_host, 1);
}

/* Whether every rank is ok: collective over MPI_COMM_WORLD. *first: the
 * lowest rank that is not (-1 when all are). Nonblocking with a deadline, so
 * that a rank stuck elsewhere (inside NCCL's init, say) cannot hang the
 * others: past AGREE_TIMEOUT_S the job is stopped. */
static bool agree(bool ok, const char *step, int *first) {
  int mine = ok ? 0 : g_world - g_rank, all = 0, done = 0;
  MPI_Request rq;
  if (MPI_Iallreduce(&mine, &all, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD, &rq) != MPI_SUCCESS) {
    fprintf(stderr, "a2a_bench: rank %d: MPI_Iallreduce failed while agreeing on %s\n", g_rank, step);
    moert_comm_abort(g_host, 1);
  }
  const double t0 = now_s();
  const struct timespec nap = {0, 200000};
  while (MPI_Test(&rq, &done, MPI_STATUS_IGNORE) == MPI_SUCCESS && !done) {
    if (now_s() - t0 > AGREE_TIMEOUT_S) {
      fprintf(stderr, "a2a_bench: rank %d: %s: the other ranks did not answer within %.0f s (one is "
                      "stuck, inside NCCL's init or a GPU wait?); stopping every rank\n",
              g_rank, step, AGREE_TIMEOUT_S);
      moert_comm_abort(g_host, 1);
    }
    nanosleep(&nap, NULL);
  }
  if (!done) {
    fprintf(stderr, "a2a_bench: rank %d: MPI_Test failed while agreeing on %s\n", g_rank, step);
    moert_comm_abort(g_host, 1);
  }
  *first = all ? g_world - all : -1;
  return all == 0;
}

/* agree(), and the lowest failing rank prints its message. */
static bool agree_st(bool ok, const char *step, const moert_status *st) {
  int first;
  if (agree(ok, step, &first)) return true;
  if (first == g_rank) {
    fprintf(stderr, "a2a_bench: rank %d: error: %s: %s\n", g_rank, step, st->msg);
    if (getenv("MOEC_TRACE")) fprintf(stderr, "a2a_bench: rank %d: trace: %s\n", g_rank, st->trace);
  }
  return false;
}

MOERT_CHECK_GEN(mpi_check, int, MPI_SUCCESS, moert_mpi_strerror)
#define MPIOK(st, call) mpi_check((call), #call, __FILE__, __LINE__, (st))

/* ------------------------------------------------------------ the NCCL reference */

/* An NCCL communicator of its own over MPI_COMM_WORLD, and the all-to-all as
 * nccl-tests' alltoall runs it. */
typedef struct ref_nccl ref_nccl;

#ifdef MOERT_HAVE_NCCL_HEADERS

#define STR_(x) #x
#define XSTR(x) STR_(x)
#define REF_NCCL_FUNCS(X)                                                                      \
  X(ncclGetVersion) X(ncclGetUniqueId) X(ncclCommInitRank) X(ncclCommDestroy) X(ncclCommAbort)  \
  X(ncclCommGetAsyncError) X(ncclSend) X(ncclRecv) X(ncclGroupStart) X(ncclGroupEnd)

/* The functions of the library the runtime's nccl comm loaded (one library,
 * one handle: moert_nccl_symbol) */
#define DECLARE(f) __typeof__(f) *f;
static struct {
  bool loaded;
  REF_NCCL_FUNCS(DECLARE)
} nc;
#undef DECLARE

struct ref_nccl {
  ncclComm_t comm;
  cudaStream_t stream; /* the cuda backend's: ours enqueues there too */
  bool failed;         /* a call failed: destroy aborts */
};

/* the runtime's text for an NCCL result (with ncclGetLastError's detail) */
static const char *nccl_errstr(ncclResult_t r) { return moert_nccl_strerror((int)r); }
MOERT_CHECK_GEN(nccl_check, ncclResult_t, ncclSuccess, nccl_errstr)
#define NCOK(st, fn, args) nccl_check(nc.fn args, #fn, __FILE__, __LINE__, (st))

/* The reference's functions from the library the runtime's nccl comm loads. */
static bool ref_nccl_load(moert_status *st) {
  if (nc.loaded) return true;
  if (!moert_nccl_available())
    return MOERT_FAIL(st, "NCCL could not be loaded (libnccl.so.2, with every function the nccl comm "
                          "calls); install NCCL or add its folder to LD_LIBRARY_PATH, or run with --comm mpi");
#define LOOKUP(f)                                                                              \
  if (!(nc.f = (__typeof__(nc.f))moert_nccl_symbol(XSTR(f))))                                   \
    return MOERT_FAIL(st, "the NCCL library has no %s (too old? the reference needs NCCL 2.7 or later)", XSTR(f));
  REF_NCCL_FUNCS(LOOKUP)
#undef LOOKUP
  nc.loaded = true;
  return true;
}

/* "NCCL 2.28.9 (/path/libnccl.so.2)": the loaded library's version and file. */
static void ref_nccl_describe(char *out, size_t cap) {
  int v = 0;
  if (!nc.loaded || nc.ncclGetVersion(&v) != ncclSuccess) {
    snprintf(out, cap, "NCCL (version unknown)");
    return;
  }
  /* NCCL_VERSION_CODE: X*1000+Y*100+Z before 2.9, X*10000+Y*100+Z since */
  int major = v >= 10000 ? v / 10000 : v / 1000, minor = v >= 10000 ? v % 10000 / 100 : v % 1000 / 100;
  Dl_info info;
  const char *file = dladdr((void *)nc.ncclSend, &info) && info.dli_fname ? info.dli_fname : "?";
  snprintf(out, cap, "NCCL %d.%d.%d (%s; built with nccl.h %d.%d.%d)", major, minor, v % 100, file,
           NCCL_MAJOR, NCCL_MINOR, NCCL_PATCH);
}

/* Collective over MPI_COMM_WORLD (every rank has loaded NCCL): rank 0 makes
 * the unique id and broadcasts it, every rank joins. The caller agrees on
 * the result (ncclCommInitRank may fail on one rank only). */
static bool ref_nccl_create(moert_backend *b, ref_nccl **out, moert_status *st) {
  *out = NULL;
  struct {
    int ok; /* on rank 0: the id was made */
    ncclUniqueId id;
  } boot;
  memset(&boot, 0, sizeof boot);
  if (g_rank == 0) boot.ok = NCOK(st, ncclGetUniqueId, (&boot.id));
  if (!MPIOK(st, MPI_Bcast(&boot, (int)sizeof boot, MPI_BYTE, 0, MPI_COMM_WORLD))) return false;
  if (!boot.ok)
    return g_rank == 0 ? MOERT_UP(st) : MOERT_FAIL(st, "rank 0 could not make NCCL's unique id");
  ref_nccl *r = calloc(1, sizeof *r);
  if (!r) return MOERT_FAIL(st, "out of memory");
  r->stream = (cudaStream_t)moert_backend_cuda_stream(b);
  ncclResult_t rc = nc.ncclCommInitRank(&r->comm, g_world, boot.id, g_rank);
  if (rc != ncclSuccess) {
    free(r);
    return MOERT_FAIL(st, "ncclCommInitRank failed for the reference's communicator: %s (NCCL_DEBUG=INFO "
                          "shows why)", nccl_errstr(rc));
  }
  *out = r;
  return true;
}

/* nccl-tests' alltoall: one group, a send and a receive of block j with every
 * rank j (itself included), on the stream. */
static bool ref_nccl_a2a(ref_nccl *r, const float *send, float *recv, int64_t n, moert_status *st) {
  if (!NCOK(st, ncclGroupStart, ())) {
    r->failed = true;
    return false;
  }
  bool ok = true;
  for (int j = 0; j < g_world && ok; j++)
    ok = NCOK(st, ncclSend, (send + (size_t)j * (size_t)n, (size_t)n, ncclFloat32, j, r->comm, r->stream)) &&
         NCOK(st, ncclRecv, (recv + (size_t)j * (size_t)n, (size_t)n, ncclFloat32, j, r->comm, r->stream));
  bool ended = NCOK(st, ncclGroupEnd, ()); /* closes the group even after a failure */
  if (!ok || !ended) r->failed = true;
  return ok && ended;
}

/* An error NCCL found while the GPU ran the reference (a peer that died). */
static bool ref_nccl_async(ref_nccl *r, moert_status *st) {
  ncclResult_t a = ncclSuccess;
  if (!NCOK(st, ncclCommGetAsyncError, (r->comm, &a))) return false;
  if (a != ncclSuccess && a != ncclInProgress) {
    r->failed = true;
    return MOERT_FAIL(st, "NCCL reported an error from the reference's all-to-all: %s", nccl_errstr(a));
  }
  return true;
}

/* The stream must be idle (the caller synchronizes it) unless r failed. */
static void ref_nccl_destroy(ref_nccl *r) {
  if (!r) return;
  if (r->failed || nc.ncclCommDestroy(r->comm) != ncclSuccess) nc.ncclCommAbort(r->comm);
  free(r);
}

#else /* no nccl.h: no reference (and no nccl comm in the runtime either) */

static void ref_nccl_describe(char *out, size_t cap) { snprintf(out, cap, "NCCL (not built in)"); }
static bool ref_nccl_load(moert_status *st) {
  return MOERT_FAIL(st, "this build has no NCCL reference (nccl.h was not found when it was built); "
                        "run with --comm mpi");
}
static bool ref_nccl_create(moert_backend *b, ref_nccl **out, moert_status *st) {
  (void)b;
  *out = NULL;
  return ref_nccl_load(st);
}
static bool ref_nccl_a2a(ref_nccl *r, const float *send, float *recv, int64_t n, moert_status *st) {
  (void)r, (void)send, (void)recv, (void)n;
  return MOERT_FAIL(st, "no NCCL reference in this build");
}
static bool ref_nccl_async(ref_nccl *r, moert_status *st) {
  (void)r, (void)st;
  return true;
}
static void ref_nccl_destroy(ref_nccl *r) { (void)r; }

#endif /* MOERT_HAVE_NCCL_HEADERS */

/* ------------------------------------------------------------ the bench */

typedef enum { RUN_REF, RUN_LINEAR, RUN_2DH, RUN__COUNT } run_kind;
static const char *const run_names[RUN__COUNT] = {"reference", "ours (linear)", "ours (2dh)"};

typedef struct bench {
  options o;
  bool nccl;             /* --comm nccl: ours the nccl comm, the reference NCCL's */
  bool events;           /* timed by the backend's marks (CUDA events on its stream) */
  bool runs[RUN__COUNT]; /* which are measured */
  moert_backend *b;
  moert_comm *ours;      /* the host comm, the staged comm over it, or the nccl comm */
  ref_nccl *ref;
  int gpu;               /* the device of this rank (-1: cpu) */
  float *send, *recv;    /* ours: b's memory, `cap` bytes each */
  float *hsend, *hrecv;  /* host memory, `cap` bytes each, when b is the cuda backend */
  float *rsend, *rrecv;  /* the reference's: send/recv, or hsend/hrecv (mpi on cuda) */
  bool ref_on_device;    /* rsend/rrecv are GPU memory */
  int64_t cap;
} bench;

/* The value of element i of the block that rank `from` sends to rank `to`:
 * an integer in [1, 2^24], exact in float32, never 0 (recv is zeroed first). */
static uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}
static uint64_t block_key(int from, int to) {
  return mix64(PATTERN_SEED ^ ((uint64_t)(uint32_t)from << 32 | (uint32_t)to));
}
static float pattern(uint64_t key, int64_t i) {
  return (float)(1 + (mix64(key + (uint64_t)i * 0x9e3779b97f4a7c15ull) & 0xffffff));
}

static void fill_send(float *send, int64_t n) {
  for (int j = 0; j < g_world; j++) {
    uint64_t key = block_key(g_rank, j);
    float *blk = send + (size_t)j * (size_t)n;
    for (int64_t i = 0; i < n; i++) blk[i] = pattern(key, i);
  }
}

/* Wrong elements of recv (world blocks of n); the first one's place and values. */
static int64_t verify(const float *recv, int64_t n, int *bad_from, int64_t *bad_i, float *got, float *want) {
  int64_t wrong = 0;
  for (int j = 0; j < g_world; j++) {
    uint64_t key = block_key(j, g_rank);
    const float *blk = recv + (size_t)j * (size_t)n;
    for (int64_t i = 0; i < n; i++) {
      float w = pattern(key, i);
      if (blk[i] != w) {
        if (!wrong++) {
          *bad_from = j;
          *bad_i = i;
          *got = blk[i];
          *want = w;
        }
      }
    }
  }
  return wrong;
}

/* One all-to-all of blocks of n floats. */
static bool run_once(bench *B, run_kind k, int64_t n, moert_status *st) {
  switch (k) {
  case RUN_REF:
    if (B->nccl) return ref_nccl_a2a(B->ref, B->rsend, B->rrecv, n, st);
    return MPIOK(st, MPI_Alltoall(B->rsend, (int)n, MPI_FLOAT, B->rrecv, (int)n, MPI_FLOAT, MPI_COMM_WORLD));
  case RUN_LINEAR:
    return B->ours->all_to_all_f32(B->ours, B->send, B->recv, n, MOERT_A2A_LINEAR, st);
  case RUN_2DH:
    return B->ours->all_to_all_f32(B->ours, B->send, B->recv, n, MOERT_A2A_2DH, st);
  default: return MOERT_FAIL(st, "unknown run %d", (int)k);
  }
}

/* Waits until the backend's stream has run all it was given (and reports an
 * op that failed there): a download of one float synchronizes it. */
static bool sync_device(bench *B, moert_status *st) {
  float x;
  return !B->events || B->b->download(B->b, &x, B->recv, sizeof x, st);
}

/* Sends the pattern for blocks of n floats: host memory, then the device. */
static bool fill(bench *B, int64_t n, moert_status *st) {
  const size_t bytes = (size_t)g_world * (size_t)n * sizeof(float);
  fill_send(B->hsend ? B->hsend : B->send, n);
  if (B->hsend) MOERT_TRY(st, B->b->upload(B->b, B->send, B->hsend, bytes, st));
  return true;
}

/* One call of run k on the pattern, checked: *wrong elements here. */
static bool check_run(bench *B, run_kind k, int64_t n, int64_t *wrong, moert_status *st) {
  const size_t bytes = (size_t)g_world * (size_t)n * sizeof(float);
  const bool on_device = k == RUN_REF ? B->ref_on_device : B->hsend != NULL;
  float *recv = k == RUN_REF ? B->rrecv : B->recv;
  if (on_device)
    B->b->zero(recv, bytes); /* on the stream, before the exchange */
  else
    memset(recv, 0, bytes);
  MOERT_TRY(st, run_once(B, k, n, st));
  const float *view = recv;
  if (on_device) {
    MOERT_TRY(st, B->b->download(B->b, B->hrecv, recv, bytes, st));
    view = B->hrecv;
  }
  if (k == RUN_REF && B->nccl) MOERT_TRY(st, ref_nccl_async(B->ref, st));
  int from = -1;
  int64_t at = -1;
  float got = 0, want = 0;
  *wrong = verify(view, n, &from, &at, &got, &want);
  if (*wrong)
    fprintf(stderr, "a2a_bench: rank %d: %s, blocks of %" PRId64 " floats: %" PRId64 " wrong of %" PRId64
                    "; the first: block %d (from rank %d) element %" PRId64 " is %.0f, want %.0f (0: never "
                    "written)\n",
            g_rank, run_names[k], n, *wrong, (int64_t)g_world * n, from, from, at, (double)got, (double)want);
  return true;
}

/* Seconds per call of `iters` back-to-back calls of run k, the max over ranks. */
static bool time_run(bench *B, run_kind k, int64_t n, double *sec, moert_status *st) {
  double t = 0;
  if (B->events) {
    /* the stream idle and every rank here: the first mark is where all begin */
    MOERT_TRY(st, sync_device(B, st));
    if (!MPIOK(st, MPI_Barrier(MPI_COMM_WORLD))) return false;
    moert_backend *b = B->b;
    b->marks_reset(b);
    int m0 = b->mark(b, NULL);
    for (int64_t i = 0; i < B->o.iters; i++) MOERT_TRY(st, run_once(B, k, n, st));
    int m1 = b->mark(b, NULL);
    double ms = NAN;
    MOERT_TRY(st, b->mark_ms(b, m0, m1, &ms, st));
    b->marks_reset(b);
    if (m0 < 0 || m1 < 0 || !(ms >= 0))
      return MOERT_FAIL(st, "the backend made no timing mark (marks %d and %d, %.3f ms)", m0, m1, ms);
    t = ms * 1e-3 / (double)B->o.iters;
  } else {
    if (!MPIOK(st, MPI_Barrier(MPI_COMM_WORLD))) return false;
    double t0 = MPI_Wtime();
    for (int64_t i = 0; i < B->o.iters; i++) MOERT_TRY(st, run_once(B, k, n, st));
    t = (MPI_Wtime() - t0) / (double)B->o.iters;
  }
  if (k == RUN_REF && B->nccl) MOERT_TRY(st, ref_nccl_async(B->ref, st));
  return MPIOK(st, MPI_Allreduce(&t, sec, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD));
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static double median(double *v, int64_t n) {
  qsort(v, (size_t)n, sizeof *v, cmp_double);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* ------------------------------------------------------------ output */

typedef struct row {
  int64_t size, block;   /* bytes: each rank's send buffer, one block */
  double sec[RUN__COUNT]; /* median seconds per call (NAN: not measured) */
} row;

static double algbw(int64_t size, double sec) { return (double)size / sec / 1e9; }
static double busbw(int64_t size, double sec) {
  return algbw(size, sec) * (double)(g_world - 1) / (double)g_world;
}
/* Ours against the reference: the ratio of bus bandwidths, which is the ratio
 * of times (defined at one rank too, where busbw is 0). */
static double pct(const row *r, run_kind k) { return 100.0 * r->sec[RUN_REF] / r->sec[k]; }

static void print_row(const bench *B, const row *r) {
  printf("| %" PRId64 " | %" PRId64 " | %.1f | %.2f | %.2f", r->size, r->block, r->sec[RUN_REF] * 1e6,
         algbw(r->size, r->sec[RUN_REF]), busbw(r->size, r->sec[RUN_REF]));
  for (int k = RUN_LINEAR; k < RUN__COUNT; k++) {
    if (!B->runs[k]) continue;
    printf(" | %.1f | %.2f | %.1f", r->sec[k] * 1e6, busbw(r->size, r->sec[k]), pct(r, k));
  }
  printf(" |\n");
  fflush(stdout);
}

static void print_table_head(const bench *B) {
  printf("| size B | block B | ref us | ref algbw GB/s | ref busbw GB/s");
  if (B->runs[RUN_LINEAR]) printf(" | linear us | linear busbw GB/s | linear/ref %%");
  if (B->runs[RUN_2DH]) printf(" | 2dh us | 2dh busbw GB/s | 2dh/ref %%");
  printf(" |\n|---:|---:|---:|---:|---:");
  for (int k = RUN_LINEAR; k < RUN__COUNT; k++)
    if (B->runs[k]) printf("|---:|---:|---:");
  printf("|\n");
}

/* `, "key": "value"` (null when value is NULL). */
static void json_str(FILE *f, const char *key, const char *value) {
  fprintf(f, ", \"%s\": ", key);
  if (!value) {
    fputs("null", f);
    return;
  }
  fputc('"', f);
  for (; *value; value++) {
    unsigned char c = (unsigned char)*value;
    if (c == '"' || c == '\\')
      fprintf(f, "\\%c", c);
    else if (c < 0x20)
      fprintf(f, "\\u%04x", c);
    else
      fputc(c, f);
  }
  fputc('"', f);
}

/* `, "<key><suffix>": v` (null when v is not finite). */
static void json_num(FILE *f, const char *key, const char *suffix, double v) {
  fprintf(f, ", \"%s%s\": ", key, suffix);
  if (isfinite(v))
    fprintf(f, "%.6g", v);
  else
    fputs("null", f);
}

typedef struct header {
  const char *comm, *backend, *device, *nccl, *nvls, *reference, *timing;
  int nodes, local_size;
} header;

static bool write_json(FILE *f, const bench *B, const header *h, const row *rows, int nrows,
                       const int64_t *skipped, const char *const *why, int nskipped) {
  fprintf(f, "{\"bench\": \"a2a_bench\", \"world\": %d, \"nodes\": %d, \"local_size\": %d", g_world,
          h->nodes, h->local_size);
  json_str(f, "comm", h->comm);
  json_str(f, "backend", h->backend);
  json_str(f, "device", h->device);
  json_str(f, "nccl", h->nccl);
  json_str(f, "nccl_nvls_enable", h->nvls);
  json_str(f, "reference", h->reference);
  json_str(f, "timing", h->timing);
  fprintf(f, ", \"iters\": %" PRId64 ", \"warmup\": %" PRId64 ", \"repeats\": %" PRId64
             ", \"checked\": %s, \"min\": %" PRId64 ", \"max\": %" PRId64 ", \"factor\": %" PRId64
             ", \"rows\": [",
          B->o.iters, B->o.warmup, B->o.repeats, B->o.check ? "true" : "false", B->o.min, B->o.max,
          B->o.factor);
  static const char *const keys[RUN__COUNT] = {"ref", "linear", "2dh"};
  for (int i = 0; i < nrows; i++) {
    const row *r = &rows[i];
    fprintf(f, "%s\n  {\"size\": %" PRId64 ", \"block\": %" PRId64, i ? "," : "", r->size, r->block);
    for (int k = 0; k < RUN__COUNT; k++) {
      bool m = B->runs[k];
      json_num(f, keys[k], "_us", m ? r->sec[k] * 1e6 : NAN);
      json_num(f, keys[k], "_algbw", m ? algbw(r->size, r->sec[k]) : NAN);
      json_num(f, keys[k], "_busbw", m ? busbw(r->size, r->sec[k]) : NAN);
      if (k != RUN_REF) json_num(f, keys[k], "_pct", m ? pct(r, (run_kind)k) : NAN);
    }
    fputc('}', f);
  }
  fputs("],\n \"skipped\": [", f);
  for (int i = 0; i < nskipped; i++) {
    fprintf(f, "%s{\"size\": %" PRId64, i ? ", " : "", skipped[i]);
    json_str(f, "why", why[i]);
    fputc('}', f);
  }
  fputs("]}\n", f);
  return !ferror(f);
}

/* ------------------------------------------------------------ setup */

/* This rank's index among the processes of its host (MPI's shared-memory
 * split, whatever MOEC_LOCAL_SIZE simulates): its GPU. */
static bool host_local_rank(int *local, moert_status *st) {
  MPI_Comm shm;
  if (!MPIOK(st, MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, g_rank, MPI_INFO_NULL, &shm)))
    return false;
  bool ok = MPIOK(st, MPI_Comm_rank(shm, local));
  MPI_Comm_free(&shm);
  return ok;
}

/* Bytes as "1.07 GB" for messages. */
static const char *gb(double bytes, char *buf, size_t cap) {
  snprintf(buf, cap, "%.2f GB", bytes / 1e9);
  return buf;
}

/* The backend, our comm, the reference and the buffers, agreed by every rank
 * (false: every rank fails alike, the lowest failing rank has said why). */
static bool setup(bench *B, int64_t cap) {
  moert_status st = {0};
  bool cuda = !strcmp(B->o.backend, "cuda");
  B->gpu = -1;
  B->b = moert_backend_cpu();
  B->ours = g_host;
  if (cuda) {
    bool ok = moert_cuda_available();
    if (!ok)
      MOERT_FAIL(&st, "%s: no usable NVIDIA GPU was found (no libcuda.so.1, or no device); run with "
                      "--backend cpu --comm mpi",
                 B->nccl ? "--comm nccl" : "--backend cuda");
    if (!agree_st(ok, "finding a GPU", &st)) return false;
    int local = 0, gpus = moert_cuda_device_count();
    ok = host_local_rank(&local, &st);
    if (ok) {
      /* one GPU per process of a host, round robin (nccl refuses two ranks on one) */
      B->gpu = gpus > 0 ? local % gpus : 0;
      ok = moert_backend_cuda_create(&B->b, B->gpu, NULL, true, NULL, &st);
      if (!ok) B->b = moert_backend_cpu();
    }
    if (!agree_st(ok, "creating the cuda backend", &st)) return false;
  }
  if (B->nccl) {
    /* collective; fails on every rank alike where it can (no NCCL, shared GPUs) */
    bool ok = moert_comm_nccl_create(g_host, B->b, &B->ours, &st);
    if (!ok) B->ours = g_host;
    if (!agree_st(ok, "creating the nccl comm", &st)) return false;
    ok = ref_nccl_load(&st);
    if (!agree_st(ok, "loading NCCL for the reference", &st)) return false;
    ok = ref_nccl_create(B->b, &B->ref, &st);
    if (!agree_st(ok, "creating the reference's NCCL communicator", &st)) return false;
  } else if (cuda) {
    bool ok = moert_comm_staged_create(g_host, B->b, &B->ours, &st);
    if (!ok) B->ours = g_host;
    if (!agree_st(ok, "creating the staged mpi comm", &st)) return false;
  }

  /* the buffers, once, at the largest size */
  char a[32], c[32];
  bool ok = B->b->alloc(B->b, (size_t)cap, (void **)&B->send, &st) &&
            B->b->alloc(B->b, (size_t)cap, (void **)&B->recv, &st);
  if (!ok) {
    moert_status more = {0};
    MOERT_FAIL(&more, "%s; the bench needs %s of %s memory for --max %" PRId64 " (a send and a receive "
                      "buffer of it)%s%s; give a smaller --max",
               st.msg, gb(2.0 * (double)cap, a, sizeof a), cuda ? "GPU" : "host", cap,
               B->runs[RUN_2DH] ? ", and 2DH's scratch takes another " : "",
               B->runs[RUN_2DH] ? gb((double)cap, c, sizeof c) : "");
    st = more;
  }
  if (ok && cuda) {
    /* zeroed (lazily, by the kernel): MPI_Alltoall reads hsend under --no-check too */
    B->hsend = calloc(1, (size_t)cap);
    B->hrecv = calloc(1, (size_t)cap);
    if (!B->hsend || !B->hrecv)
      ok = MOERT_FAIL(&st, "out of host memory: the bench needs %s of host memory for --max %" PRId64
                           " (copies of the send and receive buffers, for the check%s); give a smaller --max",
                      gb(2.0 * (double)cap, a, sizeof a), cap, B->nccl ? "" : " and MPI_Alltoall");
  }
  if (!agree_st(ok, "allocating the buffers", &st)) return false;
  B->cap = cap;
  B->ref_on_device = B->nccl;
  B->rsend = B->nccl || !cuda ? B->send : B->hsend;
  B->rrecv = B->nccl || !cuda ? B->recv : B->hrecv;
  return true;
}

/* Frees what setup made; on a clean stop the GPU is idle first. */
static void teardown(bench *B) {
  const bool cuda = B->b && B->b != moert_backend_cpu();
  if (cuda && B->recv) {
    moert_status st = {0};
    sync_device(B, &st); /* the reference's communicator goes only once its work is done */
  }
  ref_nccl_destroy(B->ref);
  if (B->ours && B->ours != g_host) B->ours->destroy(B->ours);
  if (B->send) B->b->free(B->b, B->send);
  if (B->recv) B->b->free(B->b, B->recv);
  free(B->hsend);
  free(B->hrecv);
  if (cuda) moert_backend_cuda_destroy(B->b);
}

/* ------------------------------------------------------------ main */

/* One size: check each run, then time them; false (every rank alike) when a
 * result was wrong. A failing call stops every rank. */
static bool measure(bench *B, int64_t size, row *r) {
  moert_status st = {0};
  const int64_t n = size / g_world / (int64_t)sizeof(float);
  r->size = size;
  r->block = size / g_world;
  for (int k = 0; k < RUN__COUNT; k++) r->sec[k] = NAN;
  if (B->o.check) {
    if (!fill(B, n, &st)) die("writing the send buffer", &st);
    int64_t wrong_here = 0, wrong_all = 0;
    for (int k = 0; k < RUN__COUNT; k++) {
      int64_t w = 0;
      if (B->runs[k] && !check_run(B, (run_kind)k, n, &w, &st)) die(run_names[k], &st);
      wrong_here += w;
    }
    if (!MPIOK(&st, MPI_Allreduce(&wrong_here, &wrong_all, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD)))
      die("summing the wrong elements", &st);
    if (wrong_all) {
      if (g_rank == 0)
        fprintf(stderr, "a2a_bench: error: wrong results at size %" PRId64 " bytes (%" PRId64
                        " wrong elements over all ranks; each rank's first is above)\n",
                size, wrong_all);
      return false;
    }
  }
  for (int k = 0; k < RUN__COUNT; k++)
    for (int64_t i = 0; B->runs[k] && i < B->o.warmup; i++)
      if (!run_once(B, (run_kind)k, n, &st)) die(run_names[k], &st);
  double *t[RUN__COUNT];
  for (int k = 0; k < RUN__COUNT; k++) {
    t[k] = malloc((size_t)B->o.repeats * sizeof(double));
    if (!t[k]) {
      MOERT_FAIL(&st, "out of memory");
      die("timing", &st);
    }
  }
  for (int64_t rep = 0; rep < B->o.repeats; rep++)
    for (int k = 0; k < RUN__COUNT; k++)
      if (B->runs[k] && !time_run(B, (run_kind)k, n, &t[k][rep], &st)) die(run_names[k], &st);
  for (int k = 0; k < RUN__COUNT; k++) {
    if (B->runs[k]) r->sec[k] = median(t[k], B->o.repeats);
    free(t[k]);
  }
  return true;
}

int main(int argc, char **argv) {
  /* before anything can load NCCL: NVLink multicast stays off (the GPU
   * machines forbid it), unless the user chose */
  const char *nvls_env = getenv("NCCL_NVLS_ENABLE");
  const bool nvls_ours = !nvls_env || !*nvls_env;
  if (nvls_ours) setenv("NCCL_NVLS_ENABLE", "0", 1);
  char nvls[96];
  snprintf(nvls, sizeof nvls, "%s", getenv("NCCL_NVLS_ENABLE"));

  bench B;
  memset(&B, 0, sizeof B);
  char msg[512] = "";
  bool parsed = parse_options(argc, argv, &B.o, msg, sizeof msg);

  moert_status st = {0};
  if (!moert_comm_mpi_create(&argc, &argv, &g_host, &st)) {
    fprintf(stderr, "a2a_bench: error: %s\n", st.msg);
    moert_comm_abort(NULL, 1);
  }
  g_rank = g_host->rank;
  g_world = g_host->world;
  int rc = 0;
  if (!parsed || B.o.help) {
    if (g_rank == 0) {
      if (!parsed) fprintf(stderr, "a2a_bench: %s\n", msg);
      usage(parsed ? stdout : stderr);
    }
    moert_comm_mpi_finalize(g_host);
    return parsed ? 0 : 2;
  }

  /* the defaults: cuda and nccl where every rank sees a GPU, else cpu and mpi */
  if (!B.o.backend && !B.o.comm) {
    int gpu = moert_cuda_available() ? 1 : 0, all = 0;
    MPI_Allreduce(&gpu, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    B.o.backend = all ? "cuda" : "cpu";
  }
  if (!B.o.comm) B.o.comm = !strcmp(B.o.backend, "cuda") ? "nccl" : "mpi";
  if (!B.o.backend) B.o.backend = !strcmp(B.o.comm, "nccl") ? "cuda" : "cpu";
  B.nccl = !strcmp(B.o.comm, "nccl");
  B.events = B.nccl;

  /* 2DH differs from LINEAR only over several nodes of several ranks */
  const bool two_level = g_host->nodes > 1 && g_host->local_size > 1;
  B.runs[RUN_REF] = true;
  B.runs[RUN_LINEAR] = (B.o.algos & ALGO_LINEAR) != 0;
  B.runs[RUN_2DH] = (B.o.algos & ALGO_2DH) && two_level;
  if (B.o.algos == ALGO_2DH && !two_level) {
    if (g_rank == 0)
      fprintf(stderr, "a2a_bench: --algo 2dh needs several nodes of several ranks; here %d node%s of %d "
                      "(MOEC_LOCAL_SIZE=n simulates nodes of n ranks)\n",
              g_host->nodes, g_host->nodes == 1 ? "" : "s", g_host->local_size);
    moert_comm_mpi_finalize(g_host);
    return 2;
  }

  /* the sizes: whole floats per block, and MPI's int counts for its reference */
  /* at most 44 sizes: --max is below 2^43 bytes (parse_size), --min 1 or more, --factor 2 or more */
  int64_t sizes[64], skipped[64], cap = 0;
  const char *why[64];
  int nsizes = 0, nskipped = 0;
  for (int64_t s = B.o.min; s <= B.o.max && nsizes + nskipped < 64; s *= B.o.factor) {
    const int64_t blk = (int64_t)g_world * (int64_t)sizeof(float);
    if (s % blk) {
      why[nskipped] = "not world blocks of whole floats";
      skipped[nskipped++] = s;
    } else if (!B.nccl && s / blk > INT32_MAX) {
      why[nskipped] = "blocks of more than 2^31-1 floats: beyond one MPI_Alltoall call";
      skipped[nskipped++] = s;
    } else {
      sizes[nsizes++] = s;
      if (s > cap) cap = s;
    }
    if (s > INT64_MAX / B.o.factor) break;
  }
  if (nsizes == 0) {
    if (g_rank == 0)
      fprintf(stderr, "a2a_bench: no size from --min %" PRId64 " to --max %" PRId64 " is %d blocks of "
                      "whole floats (a multiple of %d bytes)\n",
              B.o.min, B.o.max, g_world, 4 * g_world);
    moert_comm_mpi_finalize(g_host);
    return 2;
  }

  FILE *json = NULL;
  if (B.o.json && g_rank == 0) {
    json = fopen(B.o.json, "w");
    if (!json) MOERT_FAIL(&st, "cannot write %s: %s", B.o.json, strerror(errno));
  }
  if (!agree_st(!B.o.json || g_rank != 0 || json, "opening the JSON file", &st) || !setup(&B, cap)) {
    teardown(&B);
    if (json) fclose(json);
    moert_comm_mpi_finalize(g_host);
    return 1;
  }

  /* the header */
  char device[320] = "", ncclv[400] = "", reference[160], timing[200];
  int *gpus = g_rank == 0 ? calloc((size_t)g_world, sizeof *gpus) : NULL;
  MPI_Gather(&B.gpu, 1, MPI_INT, gpus, 1, MPI_INT, 0, MPI_COMM_WORLD);
  if (B.b != moert_backend_cpu()) {
    const char *name = moert_backend_cuda_device_name(B.b);
    int n = snprintf(device, sizeof device, "%s (rank 0); GPU of each rank:", name ? name : "?");
    for (int r = 0; gpus && r < g_world && n < (int)sizeof device - 8; r++)
      n += snprintf(device + n, sizeof device - (size_t)n, " %d", gpus[r]);
  }
  free(gpus);
  if (B.nccl) ref_nccl_describe(ncclv, sizeof ncclv);
  snprintf(reference, sizeof reference, "%s",
           B.nccl ? "one group of ncclSend/ncclRecv with every rank, itself included, on an NCCL "
                    "communicator of its own, on our stream, same buffers"
                  : B.b != moert_backend_cpu() ? "MPI_Alltoall on host buffers of the same size"
                                               : "MPI_Alltoall on the same buffers");
  snprintf(timing, sizeof timing, "%s around %" PRId64 " back-to-back calls; the mean per call, the max "
                                  "over ranks; the median of %" PRId64 " such; warmup: %" PRId64 " calls of each",
           B.events ? "CUDA events on the stream" : "MPI_Wtime from a barrier", B.o.iters, B.o.repeats,
           B.o.warmup);
  header h = {.comm = B.o.comm, .backend = B.o.backend, .device = *device ? device : NULL,
              .nccl = B.nccl ? ncclv : NULL, .nvls = B.nccl ? nvls : NULL, .reference = reference,
              .timing = timing, .nodes = g_host->nodes, .local_size = g_host->local_size};
  if (g_rank == 0) {
    const char *ls = getenv("MOEC_LOCAL_SIZE");
    printf("# a2a_bench: all-to-all, ours against %s\n\n", B.nccl ? "NCCL's own" : "MPI_Alltoall");
    printf("- ranks: %d = %d node%s x %d (MOEC_LOCAL_SIZE=%s); comm %s%s; backend %s\n", g_world,
           g_host->nodes, g_host->nodes == 1 ? "" : "s", g_host->local_size, ls && *ls ? ls : "unset",
           B.o.comm, !B.nccl && B.b != moert_backend_cpu() ? " (staged through host memory)" : "",
           B.o.backend);
    if (*device) printf("- GPU: %s\n", device);
    if (B.nccl)
      printf("- %s; NCCL_NVLS_ENABLE=%s (%s)\n", ncclv, nvls,
             nvls_ours ? "set by a2a_bench: NVLink multicast is forbidden on the GPU machines"
                       : "from the environment");
    printf("- reference: %s\n", reference);
    printf("- timing: %s\n", timing);
    printf("- SIZE: bytes of each rank's send buffer (%d blocks); algbw = SIZE/time, busbw = algbw * "
           "(W-1)/W, GB/s = 1e9 B/s; ours/ref = ref time / our time (the busbw ratio)\n", g_world);
    printf("- results %s\n", B.o.check ? "checked at every size before the timing" : "not checked (--no-check)");
    if ((B.o.algos & ALGO_2DH) && !two_level)
      printf("- 2dh: not measured: %d node%s of %d ranks (it is LINEAR there; MOEC_LOCAL_SIZE=n simulates "
             "nodes of n ranks)\n", g_host->nodes, g_host->nodes == 1 ? "" : "s", g_host->local_size);
    for (int i = 0; i < nskipped; i++)
      printf("- skipped: %" PRId64 " bytes: %s (%d ranks)\n", skipped[i], why[i], g_world);
    printf("\n");
    print_table_head(&B);
    fflush(stdout);
  }

  row rows[64];
  int nrows = 0;
  for (int i = 0; i < nsizes; i++) {
    if (!measure(&B, sizes[i], &rows[nrows])) {
      rc = 1;
      break;
    }
    if (g_rank == 0) print_row(&B, &rows[nrows]);
    nrows++;
  }
  if (json) {
    bool ok = write_json(json, &B, &h, rows, nrows, skipped, why, nskipped);
    ok = fclose(json) == 0 && ok;
    if (!ok) {
      fprintf(stderr, "a2a_bench: error: cannot write %s: %s\n", B.o.json, strerror(errno));
      rc = 1;
    }
  }
  teardown(&B);
  moert_comm_mpi_finalize(g_host);
  return rc;
}
