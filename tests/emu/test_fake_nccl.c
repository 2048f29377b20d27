/* test_fake_nccl.c — the NCCL stand-in (fake_nccl.c) under mpirun, opened as
 * comm_nccl.c opens NCCL (dlopen, dlsym by name). It checks communicators
 * (the world in a reversed rank order, two concurrent subsets, splits into
 * halves and into nodes of MOEC_LOCAL_SIZE ranks, one rank alone), groups of
 * sends and receives (the all-to-all of comm_nccl.c, LINEAR and 2DH, each
 * rank sending to itself, with blocks too large for MPI to buffer, so a send
 * that waited for its receive would hang), the collectives on random data in
 * and out of place, alone and in one group, and misuse that must fail with
 * NCCL's result on every rank instead of hanging. Values are known from
 * (seed, rank, index), integers so that any order of summation is exact; each
 * rank counts its wrong elements and the counts are summed over ranks. With
 * the stand-in libcuda.so.1 loaded: an all-reduce and a send/receive group
 * captured on a stream move nothing at the capture and run at each replay on
 * the data of the moment; a captured group on two streams is refused. With
 * --no-mpi (no mpirun, no MPI_Init): communicators of one rank only. */
#include <cuda.h>
#include <dlfcn.h>
#include <mpi.h>
#include <nccl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NCCL_FUNCS(X)                                                                          \
  X(ncclGetVersion) X(ncclGetUniqueId) X(ncclCommInitRank) X(ncclCommSplit) X(ncclCommCount)    \
  X(ncclCommUserRank) X(ncclCommDestroy) X(ncclCommAbort) X(ncclCommGetAsyncError)              \
  X(ncclGetErrorString) X(ncclGetLastError) X(ncclGroupStart) X(ncclGroupEnd) X(ncclSend)       \
  X(ncclRecv) X(ncclAllReduce) X(ncclReduceScatter) X(ncclAllGather)

#define DECLARE(f) __typeof__(f) *f;
static struct {
  NCCL_FUNCS(DECLARE)
} nc;
#undef DECLARE

static int g_rank, g_world = 1, g_failed;
static bool g_mpi; /* under MPI; else (--no-mpi) one process that never calls MPI_Init */

static void stop(void) {
  if (g_mpi) MPI_Abort(MPI_COMM_WORLD, 1);
  exit(1);
}

/* NC(ncclSend(...)): calls the loaded function; a failure stops every rank. */
#define NC(call) nc_ok(nc.call, #call, __LINE__)
static void nc_ok(ncclResult_t r, const char *call, int line) {
  if (r == ncclSuccess) return;
  fprintf(stderr, "rank %d: line %d: %s: %s: %s\n", g_rank, line, call, nc.ncclGetErrorString(r),
          nc.ncclGetLastError(NULL));
  stop();
}

/* One line per check on rank 0, from the wrong elements of every rank. */
static void report(const char *what, int64_t wrong) {
  int64_t total = wrong;
  if (g_mpi) MPI_Allreduce(&wrong, &total, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  if (g_rank == 0) printf("%-52s %s (%lld wrong)\n", what, total ? "FAIL" : "ok", (long long)total);
  g_failed += total != 0;
}

/* A call that must fail with want; its message must say something. */
static int64_t expect(ncclResult_t got, ncclResult_t want, const char *what) {
  const char *msg = nc.ncclGetLastError(NULL);
  if (got == want && msg && *msg) return 0;
  fprintf(stderr, "rank %d: %s: result %d (want %d), message '%s'\n", g_rank, what, (int)got, (int)want,
          msg ? msg : "(null)");
  return 1;
}

/* ---- values ----------------------------------------------------------------- */

/* An integer in [-8, 8] from (seed, rank, i). */
static double val(int seed, int rank, size_t i) {
  uint64_t x = (uint64_t)seed * 0x9E3779B97F4A7C15u ^ (uint64_t)rank << 40 ^ (uint64_t)i;
  x ^= x >> 31;
  x *= 0xBF58476D1CE4E5B9u;
  x ^= x >> 29;
  return (double)(x % 17) - 8;
}

typedef struct tcase {
  ncclDataType_t type;
  ncclRedOp_t op;
  size_t size;
  const char *name;
} tcase;

static double get(const void *b, ncclDataType_t t, size_t i) {
  switch (t) {
  case ncclFloat32: return ((const float *)b)[i];
  case ncclFloat64: return ((const double *)b)[i];
  case ncclInt32: return ((const int32_t *)b)[i];
  default: return (double)((const int64_t *)b)[i];
  }
}

static void put(void *b, ncclDataType_t t, size_t i, double v) {
  switch (t) {
  case ncclFloat32: ((float *)b)[i] = (float)v; break;
  case ncclFloat64: ((double *)b)[i] = v; break;
  case ncclInt32: ((int32_t *)b)[i] = (int32_t)v; break;
  default: ((int64_t *)b)[i] = (int64_t)v; break;
  }
}

/* The reduction over ranks 0..n of val(seed, q, i). */
static double folded(ncclRedOp_t op, int seed, int n, size_t i) {
  double a = val(seed, 0, i);
  for (int q = 1; q < n; q++) {
    double b = val(seed, q, i);
    a = op == ncclSum ? a + b : op == ncclProd ? a * b : op == ncclMax ? (a > b ? a : b) : (a < b ? a : b);
  }
  return a;
}

static void fill(void *b, ncclDataType_t t, size_t n, int seed, int rank) {
  for (size_t i = 0; i < n; i++) put(b, t, i, val(seed, rank, i));
}

static void poison(void *b, ncclDataType_t t, size_t n) {
  for (size_t i = 0; i < n; i++) put(b, t, i, -99);
}

/* ---- communicators ------------------------------------------------------------ */

/* A communicator over the processes of mpi, NCCL rank rank of nranks; mpi's
 * rank 0 makes the id and broadcasts it, as comm_nccl.c's init_by_id. */
static ncclComm_t init_over(MPI_Comm mpi, int nranks, int rank) {
  int me;
  MPI_Comm_rank(mpi, &me);
  ncclUniqueId id;
  if (me == 0) NC(ncclGetUniqueId(&id));
  MPI_Bcast(&id, (int)sizeof id, MPI_BYTE, 0, mpi);
  ncclComm_t c = NULL;
  NC(ncclCommInitRank(&c, nranks, id, rank));
  return c;
}

/* Whether c has this rank as rank of n. */
static int64_t shape_wrong(ncclComm_t c, int rank, int n) {
  int r = -1, k = -1;
  NC(ncclCommUserRank(c, &r));
  NC(ncclCommCount(c, &k));
  if (r == rank && k == n) return 0;
  fprintf(stderr, "rank %d: a communicator has it as rank %d of %d, not %d of %d\n", g_rank, r, k, rank, n);
  return 1;
}

/* ---- collectives ---------------------------------------------------------------- */

/* All-reduce, reduce-scatter and all-gather of count elements per rank on c,
 * out of place and in place (NCCL's: recvbuff == sendbuff; recvbuff ==
 * sendbuff + rank * count; sendbuff == recvbuff + rank * count). */
static int64_t collectives_wrong(ncclComm_t c, tcase tc, size_t count, int seed) {
  int r, n;
  NC(ncclCommUserRank(c, &r));
  NC(ncclCommCount(c, &n));
  const size_t all = (size_t)n * count, sz = tc.size;
  char *send = malloc(all * sz + 1), *recv = malloc(all * sz + 1);
  int64_t wrong = 0;

  fill(send, tc.type, count, seed, r);
  poison(recv, tc.type, count);
  NC(ncclAllReduce(send, recv, count, tc.type, tc.op, c, NULL));
  for (size_t i = 0; i < count; i++)
    wrong += (get(recv, tc.type, i) != folded(tc.op, seed, n, i)) + (get(send, tc.type, i) != val(seed, r, i));
  NC(ncclAllReduce(send, send, count, tc.type, tc.op, c, NULL));
  for (size_t i = 0; i < count; i++) wrong += get(send, tc.type, i) != folded(tc.op, seed, n, i);

  fill(send, tc.type, all, seed + 1, r);
  poison(recv, tc.type, count);
  NC(ncclReduceScatter(send, recv, count, tc.type, tc.op, c, NULL));
  for (size_t i = 0; i < count; i++) wrong += get(recv, tc.type, i) != folded(tc.op, seed + 1, n, r * count + i);
  char *mine = send + (size_t)r * count * sz;
  NC(ncclReduceScatter(send, mine, count, tc.type, tc.op, c, NULL));
  for (size_t i = 0; i < count; i++) wrong += get(mine, tc.type, i) != folded(tc.op, seed + 1, n, r * count + i);

  fill(send, tc.type, count, seed + 2, r);
  poison(recv, tc.type, all);
  NC(ncclAllGather(send, recv, count, tc.type, c, NULL));
  for (int q = 0; q < n; q++)
    for (size_t i = 0; i < count; i++) wrong += get(recv, tc.type, q * count + i) != val(seed + 2, q, i);
  poison(recv, tc.type, all);
  mine = recv + (size_t)r * count * sz;
  fill(mine, tc.type, count, seed + 3, r);
  NC(ncclAllGather(mine, recv, count, tc.type, c, NULL));
  for (int q = 0; q < n; q++)
    for (size_t i = 0; i < count; i++) wrong += get(recv, tc.type, q * count + i) != val(seed + 3, q, i);
  free(send);
  free(recv);
  return wrong;
}

static const tcase CASES[] = {
    {ncclFloat32, ncclSum, 4, "float sum"}, {ncclFloat32, ncclMax, 4, "float max"},
    {ncclFloat64, ncclMin, 8, "double min"}, {ncclInt32, ncclProd, 4, "int32 prod"},
    {ncclInt64, ncclSum, 8, "int64 sum"},
};

static void check_collectives(ncclComm_t c, const char *on) {
  static const size_t counts[] = {0, 1, 1000, 70000};
  for (size_t k = 0; k < sizeof CASES / sizeof CASES[0]; k++) {
    int64_t wrong = 0;
    for (size_t j = 0; j < sizeof counts / sizeof counts[0]; j++)
      wrong += collectives_wrong(c, CASES[k], counts[j], (int)(10 * k + j));
    char what[96];
    snprintf(what, sizeof what, "collectives, %s, %s", CASES[k].name, on);
    report(what, wrong);
  }
}

/* ---- sends and receives --------------------------------------------------------- */

static float a2a_value(int from, int to, size_t i) { return (float)val(from * 64 + to, from, i); }

/* One group among the G ranks base + j * stride: block j of send to each,
 * block j of recv from each, itself included (comm_nccl.c's group_a2a); the
 * receives first when recv_first. */
static void group_a2a(ncclComm_t c, const float *send, float *recv, size_t blk, int base, int stride, int G,
                      int recv_first) {
  NC(ncclGroupStart());
  for (int j = 0; j < G; j++) {
    int peer = base + j * stride;
    if (recv_first) NC(ncclRecv(recv + j * blk, blk, ncclFloat32, peer, c, NULL));
    NC(ncclSend(send + j * blk, blk, ncclFloat32, peer, c, NULL));
    if (!recv_first) NC(ncclRecv(recv + j * blk, blk, ncclFloat32, peer, c, NULL));
  }
  NC(ncclGroupEnd());
}

/* Blocks of n floats: src [A][B] -> dst [B][A]. */
static void transpose_blocks(float *dst, const float *src, int A, int B, size_t n) {
  for (int a = 0; a < A; a++)
    for (int b = 0; b < B; b++) memcpy(dst + ((size_t)b * A + a) * n, src + ((size_t)a * B + b) * n, n * sizeof *dst);
}

/* The all-to-all of blocks of n floats on c, LINEAR (one group) or 2DH over
 * nodes of L ranks (comm_nccl.c's a2a_on); recv must be every rank's block
 * for this one, in rank order. */
static int64_t a2a_wrong(ncclComm_t c, size_t n, int L, int recv_first) {
  int r, W;
  NC(ncclCommUserRank(c, &r));
  NC(ncclCommCount(c, &W));
  float *send = malloc(W * n * sizeof *send), *recv = malloc(W * n * sizeof *recv);
  float *tmp = malloc(W * n * sizeof *tmp);
  for (int q = 0; q < W; q++)
    for (size_t i = 0; i < n; i++) send[q * n + i] = a2a_value(r, q, i), recv[q * n + i] = -99;
  if (L <= 1) {
    group_a2a(c, send, recv, n, 0, 1, W, recv_first);
  } else {
    const int N = W / L, node = r / L, local = r % L;
    transpose_blocks(tmp, send, N, L, n);
    group_a2a(c, tmp, recv, N * n, node * L, 1, L, recv_first);
    transpose_blocks(tmp, recv, L, N, n);
    group_a2a(c, tmp, recv, L * n, local, L, N, recv_first);
  }
  int64_t wrong = 0;
  for (int q = 0; q < W; q++)
    for (size_t i = 0; i < n; i++) wrong += recv[q * n + i] != a2a_value(q, r, i);
  free(send);
  free(recv);
  free(tmp);
  return wrong;
}

/* Pairs (0, 1), (2, 3), ...: single sends and receives outside a group, each
 * its own group; the even rank sends first, the odd one receives first. */
static int64_t pairs_wrong(ncclComm_t c, size_t n) {
  int r, W;
  NC(ncclCommUserRank(c, &r));
  NC(ncclCommCount(c, &W));
  int peer = r ^ 1;
  if (peer >= W) return 0;
  float *send = malloc(n * sizeof *send), *recv = malloc(n * sizeof *recv);
  for (size_t i = 0; i < n; i++) send[i] = a2a_value(r, peer, i), recv[i] = -99;
  if (r % 2 == 0) NC(ncclSend(send, n, ncclFloat32, peer, c, NULL));
  NC(ncclRecv(recv, n, ncclFloat32, peer, c, NULL));
  if (r % 2 == 1) NC(ncclSend(send, n, ncclFloat32, peer, c, NULL));
  int64_t wrong = 0;
  for (size_t i = 0; i < n; i++) wrong += recv[i] != a2a_value(peer, r, i);
  free(send);
  free(recv);
  return wrong;
}

/* One group, nested two deep, on world (ranks in MPI order) and half (the
 * ranks base.. of this half, keys reversed): an all-reduce in place, sends
 * and receives to itself (two of each, paired in order) and around a ring,
 * an all-gather and a reduce-scatter in place on half. Nothing runs before
 * the outer end: the receive from itself is still poison after the inner
 * one. */
static int64_t mixed_group_wrong(ncclComm_t world, ncclComm_t half, int base) {
  const size_t n = 5000;
  int hr, hn;
  NC(ncclCommUserRank(half, &hr));
  NC(ncclCommCount(half, &hn));
  float *a = malloc(n * sizeof *a), *out = malloc(n * sizeof *out), *ring = malloc(n * sizeof *ring);
  float *self = malloc(n * sizeof *self), *gat = malloc(hn * n * sizeof *gat), *rs = malloc(hn * n * sizeof *rs);
  for (size_t i = 0; i < n; i++)
    a[i] = (float)val(71, g_rank, i), out[i] = (float)val(73, g_rank, i), ring[i] = self[i] = -99;
  for (size_t i = 0; i < hn * n; i++) rs[i] = (float)val(72, hr, i), gat[i] = -99;
  const int next = (g_rank + 1) % g_world, prev = (g_rank + g_world - 1) % g_world;
  int64_t wrong = 0;
  NC(ncclGroupStart());
  NC(ncclAllReduce(a, a, n, ncclFloat32, ncclSum, world, NULL));
  NC(ncclGroupStart());
  NC(ncclSend(out, n / 2, ncclFloat32, g_rank, world, NULL));
  NC(ncclRecv(self, n / 2, ncclFloat32, g_rank, world, NULL));
  NC(ncclRecv(self + n / 2, n / 2, ncclFloat32, g_rank, world, NULL));
  NC(ncclSend(out + n / 2, n / 2, ncclFloat32, g_rank, world, NULL));
  NC(ncclRecv(ring, n, ncclFloat32, prev, world, NULL)); /* at one rank, from itself: after the two above */
  NC(ncclSend(out, n, ncclFloat32, next, world, NULL));
  NC(ncclGroupEnd());
  wrong += self[0] != -99;
  NC(ncclAllGather(out, gat, n, ncclFloat32, half, NULL));
  NC(ncclReduceScatter(rs, rs + hr * n, n, ncclFloat32, ncclMax, half, NULL));
  NC(ncclGroupEnd());
  for (size_t i = 0; i < n; i++) {
    wrong += a[i] != (float)folded(ncclSum, 71, g_world, i);
    wrong += ring[i] != (float)val(73, prev, i);
    wrong += self[i] != (float)val(73, g_rank, i);
    wrong += rs[hr * n + i] != (float)folded(ncclMax, 72, hn, hr * n + i);
    for (int q = 0; q < hn; q++) wrong += gat[q * n + i] != (float)val(73, base + hn - 1 - q, i);
  }
  free(a), free(out), free(ring), free(self), free(gat), free(rs);
  return wrong;
}

/* ---- misuse ------------------------------------------------------------------- */

static int64_t misuse_wrong(ncclComm_t world, ncclComm_t alone) {
  float x[4] = {0};
  int64_t wrong = 0;
  wrong += expect(nc.ncclGroupEnd(), ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart");
  wrong += expect(nc.ncclAllReduce(x, x, 4, (ncclDataType_t)99, ncclSum, world, NULL), ncclInvalidArgument,
                  "an unknown datatype");
  wrong += expect(nc.ncclAllReduce(x, x, 4, ncclFloat32, (ncclRedOp_t)99, world, NULL), ncclInvalidArgument,
                  "an unknown reduction op");
  wrong += expect(nc.ncclAllReduce(x, x, 4, ncclFloat32, ncclAvg, world, NULL), ncclInvalidArgument, "ncclAvg");
  wrong += expect(nc.ncclAllReduce(x, x, 4, ncclBfloat16, ncclSum, world, NULL), ncclInvalidArgument,
                  "a bf16 reduction");
  wrong += expect(nc.ncclSend(x, 4, ncclFloat32, g_world, world, NULL), ncclInvalidArgument, "a peer out of range");
  /* a group of one rank alone: nothing waits for it */
  NC(ncclGroupStart());
  NC(ncclSend(x, 4, ncclFloat32, 0, alone, NULL));
  wrong += expect(nc.ncclGroupEnd(), ncclInvalidUsage, "a send to itself without its receive");
  NC(ncclGroupStart());
  NC(ncclSend(x, 4, ncclFloat32, 0, alone, NULL));
  NC(ncclRecv(x, 2, ncclFloat32, 0, alone, NULL));
  wrong += expect(nc.ncclGroupEnd(), ncclInvalidUsage, "a send to itself of another size than its receive");
  ncclUniqueId id;
  ncclComm_t gone = NULL, sub = NULL;
  NC(ncclGetUniqueId(&id));
  NC(ncclCommInitRank(&gone, 1, id, 0));
  NC(ncclGroupStart());
  NC(ncclSend(x, 4, ncclFloat32, 0, gone, NULL));
  wrong += expect(nc.ncclCommDestroy(gone), ncclInvalidUsage, "ncclCommDestroy with its calls in an open group");
  NC(ncclGroupEnd()); /* the dropped send no longer needs its receive */
  wrong += expect(nc.ncclCommSplit(world, -5, 0, &sub, NULL), ncclInvalidArgument, "a negative color") + (sub != NULL);
  /* the meeting of ncclCommInitRank: every member fails alike */
  if (g_world > 2) { /* at 2, a member of nranks 1 would need no meeting */
    if (g_rank == 0) NC(ncclGetUniqueId(&id));
    MPI_Bcast(&id, (int)sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD);
    ncclComm_t c = NULL;
    wrong += expect(nc.ncclCommInitRank(&c, g_world, id, g_rank / 2), ncclInvalidUsage, "two ranks alike");
    wrong += c != NULL;
    if (g_rank == 0) NC(ncclGetUniqueId(&id));
    MPI_Bcast(&id, (int)sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD);
    const int last = g_rank == g_world - 1;
    wrong += expect(nc.ncclCommInitRank(&c, last ? g_world - 1 : g_world, id, last ? 0 : g_rank),
                    ncclInvalidUsage, "different nranks");
  }
  return wrong;
}

/* ---- stream capture ----------------------------------------------------------- */

#define STR_(x) #x
#define XSTR(x) STR_(x) /* a symbol after cuda.h's macros (cuStreamBeginCapture_v2) */
#define CUDA_FUNCS(X)                                                                          \
  X(cuInit) X(cuDeviceGet) X(cuDevicePrimaryCtxRetain) X(cuDevicePrimaryCtxRelease)             \
  X(cuCtxSetCurrent) X(cuStreamCreate) X(cuStreamDestroy) X(cuStreamBeginCapture)               \
  X(cuStreamEndCapture) X(cuGraphInstantiate) X(cuGraphLaunch) X(cuGraphExecDestroy)            \
  X(cuGraphDestroy)

#define DECLARE(f) __typeof__(f) *f;
static struct {
  CUDA_FUNCS(DECLARE)
} cu;
#undef DECLARE

static CUstream g_stream, g_stream2;
static CUdevice g_dev;

/* CU(call): calls the loaded driver function; a failure stops every rank. */
#define CU(call) cu_ok(cu.call, #call, __LINE__)
static void cu_ok(CUresult r, const char *call, int line) {
  if (r == CUDA_SUCCESS) return;
  fprintf(stderr, "rank %d: line %d: %s: CUresult %d\n", g_rank, line, call, (int)r);
  stop();
}

/* The stand-in driver (which the NCCL stand-in finds loaded), a context and
 * two streams. */
static void cuda_up(void) {
  void *lib = dlopen(MOEC_EMU_CUDA, RTLD_NOW | RTLD_LOCAL);
  const char *missing = lib ? NULL : dlerror();
#define LOOKUP(f) \
  if (!missing && !(cu.f = (__typeof__(cu.f))dlsym(lib, XSTR(f)))) missing = XSTR(f);
  CUDA_FUNCS(LOOKUP)
#undef LOOKUP
  if (missing) {
    fprintf(stderr, "rank %d: %s: %s missing\n", g_rank, MOEC_EMU_CUDA, missing);
    stop();
  }
  CUcontext ctx;
  CU(cuInit(0));
  CU(cuDeviceGet(&g_dev, 0));
  CU(cuDevicePrimaryCtxRetain(&ctx, g_dev));
  CU(cuCtxSetCurrent(ctx));
  CU(cuStreamCreate(&g_stream, CU_STREAM_DEFAULT));
  CU(cuStreamCreate(&g_stream2, CU_STREAM_DEFAULT));
}

static void cuda_down(void) {
  CU(cuStreamDestroy(g_stream));
  CU(cuStreamDestroy(g_stream2));
  CU(cuDevicePrimaryCtxRelease(g_dev));
}

/* Ends the capture on g_stream into an executable graph. */
static CUgraphExec end_exec(void) {
  CUgraph g = NULL;
  CUgraphExec x = NULL;
  CU(cuStreamEndCapture(g_stream, &g));
  CU(cuGraphInstantiate(&x, g, 0));
  CU(cuGraphDestroy(g));
  return x;
}

/* On c: an all-reduce and a group of a send to the next rank and a receive
 * from the previous one (to and from itself on one rank), each captured on a
 * stream — nothing moves at the capture — and replayed twice on new data. */
static int64_t capture_wrong(ncclComm_t c) {
  enum { N = 5000 };
  int r, W;
  NC(ncclCommUserRank(c, &r));
  NC(ncclCommCount(c, &W));
  float *send = malloc(N * sizeof *send), *recv = malloc(N * sizeof *recv), *in = malloc(N * sizeof *in),
        *out = malloc(N * sizeof *out);
  int64_t wrong = 0;
  poison(recv, ncclFloat32, N);
  poison(out, ncclFloat32, N);
  CU(cuStreamBeginCapture(g_stream, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  NC(ncclAllReduce(send, recv, N, ncclFloat32, ncclSum, c, g_stream));
  CUgraphExec reduce = end_exec();
  const int next = (r + 1) % W, prev = (r + W - 1) % W;
  CU(cuStreamBeginCapture(g_stream, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  NC(ncclGroupStart());
  NC(ncclRecv(out, N, ncclFloat32, prev, c, g_stream));
  NC(ncclSend(in, N, ncclFloat32, next, c, g_stream));
  NC(ncclGroupEnd());
  CUgraphExec ring = end_exec();
  for (size_t i = 0; i < N; i++) wrong += (recv[i] != -99) + (out[i] != -99); /* nothing ran at the capture */
  for (int rep = 0; rep < 2; rep++) {
    fill(send, ncclFloat32, N, 90 + rep, r);
    fill(in, ncclFloat32, N, 95 + rep, r);
    CU(cuGraphLaunch(reduce, g_stream));
    CU(cuGraphLaunch(ring, g_stream));
    for (size_t i = 0; i < N; i++)
      wrong += (recv[i] != (float)folded(ncclSum, 90 + rep, W, i)) + (out[i] != (float)val(95 + rep, prev, i));
  }
  CU(cuGraphExecDestroy(reduce));
  CU(cuGraphExecDestroy(ring));
  ncclResult_t async = ncclInternalError;
  NC(ncclCommGetAsyncError(c, &async));
  wrong += async != ncclSuccess;
  /* a captured group on two streams is refused (on every rank: no one waits) */
  CU(cuStreamBeginCapture(g_stream, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  NC(ncclGroupStart());
  NC(ncclRecv(out, N, ncclFloat32, prev, c, g_stream));
  NC(ncclSend(in, N, ncclFloat32, next, c, g_stream2));
  wrong += expect(nc.ncclGroupEnd(), ncclInvalidUsage, "a captured group on two streams");
  CU(cuGraphExecDestroy(end_exec()));
  free(send), free(recv), free(in), free(out);
  return wrong;
}

/* Communicators of several ranks: the world twice (NCCL ranks reversed and
 * not), the even and the odd ranks at once, and splits of the world; the
 * exchanges and collectives on them. alone: this rank's communicator of one. */
static void world_checks(ncclComm_t alone, int L) {
  /* the world with NCCL ranks reversed: rank order is NCCL's, not MPI's */
  ncclComm_t rev = init_over(MPI_COMM_WORLD, g_world, g_world - 1 - g_rank);
  ncclComm_t world = init_over(MPI_COMM_WORLD, g_world, g_rank);
  report("world, NCCL ranks reversed", shape_wrong(rev, g_world - 1 - g_rank, g_world));
  MPI_Comm parity;
  MPI_Comm_split(MPI_COMM_WORLD, g_rank % 2, g_rank, &parity);
  ncclComm_t sub = init_over(parity, (g_world + 1 - g_rank % 2) / 2, g_rank / 2);
  MPI_Comm_free(&parity);
  report("even and odd ranks, at once", shape_wrong(sub, g_rank / 2, (g_world + 1 - g_rank % 2) / 2));

  /* splits: halves (key reversing the order), nodes, across nodes, no color */
  const int H = g_world / 2 > 0 ? g_world / 2 : 1, base = g_rank / H * H;
  const int hn = g_world - base < H ? g_world - base : H;
  ncclComm_t half, node, cross, most;
  NC(ncclCommSplit(world, g_rank / H, -g_rank, &half, NULL));
  int64_t wrong = shape_wrong(half, hn - 1 - (g_rank - base), hn);
  NC(ncclCommSplit(world, g_rank / L, g_rank % L, &node, NULL));
  NC(ncclCommSplit(world, g_rank % L, g_rank / L, &cross, NULL));
  wrong += shape_wrong(node, g_rank % L, L) + shape_wrong(cross, g_rank / L, g_world / L);
  NC(ncclCommSplit(world, g_rank == 0 ? NCCL_SPLIT_NOCOLOR : 7, 0, &most, NULL));
  wrong += g_rank == 0 ? most != NULL : shape_wrong(most, g_rank - 1, g_world - 1);
  report("ncclCommSplit: halves, nodes, across, no color", wrong);

  report("all-to-all, LINEAR, 1 float", a2a_wrong(world, 1, 1, 0));
  report("all-to-all, LINEAR, 2^16 floats, ranks reversed", a2a_wrong(rev, 1 << 16, 1, 0));
  report("all-to-all, LINEAR, 2^16 floats, receives first", a2a_wrong(world, 1 << 16, 1, 1));
  report("all-to-all, 2DH, 2^15 floats", a2a_wrong(world, 1 << 15, L, 0));
  report("single sends and receives, pairs, 2^16 floats", pairs_wrong(world, 1 << 16));
  report("a group of collectives, sends and receives", mixed_group_wrong(world, half, base));

  check_collectives(world, "world");
  check_collectives(rev, "world reversed");
  report("collectives on the even and odd ranks, nodes, across",
         collectives_wrong(sub, CASES[0], 999, 3) + collectives_wrong(node, CASES[1], 999, 4) +
             collectives_wrong(cross, CASES[2], 999, 5));
  report("misuse fails with NCCL's result", misuse_wrong(world, alone));
  report("captured all-reduce and send/recv group, replayed", capture_wrong(world));

  ncclResult_t async = ncclInternalError;
  NC(ncclCommGetAsyncError(world, &async));
  report("no asynchronous error", async != ncclSuccess);
  NC(ncclCommAbort(rev));
  ncclComm_t comms[] = {world, sub, half, node, cross, most};
  for (size_t i = 0; i < sizeof comms / sizeof comms[0]; i++)
    if (comms[i]) NC(ncclCommDestroy(comms[i]));
}

int main(int argc, char **argv) {
  g_mpi = !(argc > 1 && strcmp(argv[1], "--no-mpi") == 0);
  if (g_mpi) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_world);
  }
  void *lib = dlopen(MOEC_EMU_NCCL, RTLD_NOW | RTLD_LOCAL);
  const char *missing = lib ? NULL : dlerror();
#define LOOKUP(f) \
  if (!missing && !(nc.f = (__typeof__(nc.f))dlsym(lib, #f))) missing = #f;
  NCCL_FUNCS(LOOKUP)
#undef LOOKUP
  if (missing) {
    fprintf(stderr, "rank %d: %s: %s missing\n", g_rank, MOEC_EMU_NCCL, missing);
    stop();
  }
  const char *env = getenv("MOEC_LOCAL_SIZE");
  int L = env && atoi(env) > 0 ? atoi(env) : 2;
  if (g_world % L) L = 1;
  if (g_rank == 0)
    printf("test_fake_nccl: %d ranks%s, nodes of %d, %s\n", g_world, g_mpi ? "" : " (no MPI)", L, MOEC_EMU_NCCL);

  int version = 0;
  NC(ncclGetVersion(&version));
  report("ncclGetVersion is nccl.h's", version != NCCL_VERSION_CODE);

  /* a communicator of one rank, on every rank: no MPI in it */
  ncclUniqueId own;
  NC(ncclGetUniqueId(&own));
  ncclComm_t alone = NULL, alone2 = NULL;
  NC(ncclCommInitRank(&alone, 1, own, 0));
  NC(ncclCommSplit(alone, 0, 0, &alone2, NULL));
  report("one rank alone, and its split", shape_wrong(alone, 0, 1) + shape_wrong(alone2, 0, 1));
  report("all-to-all on one rank alone", a2a_wrong(alone, 100, 1, 0));
  report("collectives on one rank alone",
         collectives_wrong(alone, CASES[0], 999, 6) + collectives_wrong(alone2, CASES[4], 999, 7));
  cuda_up();
  report("captured all-reduce and send/recv group, one rank", capture_wrong(alone));

  if (g_mpi) {
    world_checks(alone, L);
  } else {
    ncclComm_t two = NULL;
    report("2 ranks without MPI fail", expect(nc.ncclCommInitRank(&two, 2, own, 0), ncclInvalidUsage, "2 ranks") +
                                           (two != NULL));
    report("misuse fails with NCCL's result", misuse_wrong(alone, alone));
  }
  NC(ncclCommDestroy(alone));
  NC(ncclCommDestroy(alone2));
  cuda_down();
  if (g_rank == 0) printf("%s\n", g_failed ? "FAIL" : "all passed");
  dlclose(lib);
  if (g_mpi) MPI_Finalize();
  return g_failed ? 1 : 0;
}
