/* test_comm.c — runtime/comm_mpi.c under mpirun, in nccl-tests' verifiable
 * style: every rank fills its send buffer with values that are a function of
 * (seed, rank, index), computes what it must receive from the same function,
 * and counts its wrong elements; the counts are summed over ranks with MPI
 * itself (not the comm under test), and rank 0 prints one row per check.
 *
 * Each collective runs at several sizes (0, 1, uneven ones) twice: with the
 * default largest count per MPI call and with a tiny one (the test hook of
 * comm_mpi_impl.h), so the passes that carry more than 2^28 elements per peer
 * run on small buffers. The all-to-all runs LINEAR and 2DH; 2DH must also be
 * bitwise LINEAR's result. Then: three nonblocking all-to-alls in flight,
 * splits (halves, reversed, across nodes, uneven), the pure topology check on
 * layouts one machine cannot make, and argument errors.
 *
 * The same checks run on the nccl comm (--nccl): each rank on a GPU of its
 * own, the cuda backend, the nccl comm bootstrapped over the mpi comm. Its
 * float collectives take device memory, so the checks reach it through a
 * view (below) that uploads their host buffers, calls it and downloads the
 * results; in-place calls stay in place on the device. The mpi comm's hooks
 * (largest count, scratch and request counts) are skipped there. Then an
 * nccl comm over moert_comm_self() on every rank (the bootstrap without
 * MPI). --nccl skips (exit 77, every rank) without a GPU, without libnccl,
 * or with more ranks on a node than it has GPUs. --nccl-shared puts every
 * rank on GPU 0 and checks that the nccl comm refuses (two ranks on one GPU)
 * on every rank with the message (exit 0 when it does).
 *
 * Usage: mpirun -np N test_comm [--big] [--nccl | --nccl-shared]
 * (MOEC_LOCAL_SIZE picks the nodes). --big adds one all-to-all of more than
 * 2^31 bytes per rank (slow: 4 GiB a rank). Exit 0 when every count is 0, 1
 * otherwise. Any failed call prints and calls moert_comm_abort, so no rank
 * waits forever. */
#include <inttypes.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend.h"
#include "comm.h"
#include "comm_mpi_impl.h"

static moert_comm *g_comm;
static bool g_nccl;           /* the comm under test is the nccl comm (through a view) */
static const char *g_name = "mpi";
static moert_status g_st;
static int g_rank;
static int64_t g_total_wrong;
static int g_rows;

/* A call of the comm that must succeed: else print and stop every rank. */
#define TRY(call)                                                                    \
  do {                                                                               \
    if (!(call)) {                                                                   \
      fprintf(stderr, "rank %d: %s:%d: %s failed: %s [%s]\n", g_rank, __FILE__,      \
              __LINE__, #call, g_st.msg, g_st.trace);                                \
      moert_comm_abort(g_comm, 1);                                                   \
    }                                                                                \
  } while (0)

static void *xmalloc(size_t n) {
  void *p = malloc(n ? n : 1);
  if (!p) {
    fprintf(stderr, "rank %d: out of memory (%zu bytes)\n", g_rank, n);
    moert_comm_abort(g_comm, 1);
  }
  return p;
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* ---- the nccl comm seen with host buffers -------------------------------- */

/* A comm over a device comm (nccl) whose float collectives take host
 * buffers: each call uploads its inputs (and recv's old contents, so that an
 * element the comm fails to write keeps its poison), runs the device comm and
 * downloads recv. In place stays in place (all_gather's send inside recv,
 * reduce_scatter's send == recv). The host-value collectives pass through. */
typedef struct view_req {
  moert_req *inner;
  float *dsend, *drecv, *hrecv;
  size_t bytes;
} view_req;
enum { VIEW_REQS = 8 };
typedef struct view {
  moert_comm pub;
  moert_comm *inner;
  moert_backend *b;
  view_req reqs[VIEW_REQS];
} view;

static view *V_(moert_comm *c) { return (view *)c->impl; }

static float *dev_in(view *v, const void *h, size_t bytes) {
  void *d = NULL;
  if (!v->b->alloc(v->b, bytes ? bytes : 4, &d, &g_st) || (bytes && !v->b->upload(v->b, d, h, bytes, &g_st))) {
    fprintf(stderr, "rank %d: the view's upload failed: %s\n", g_rank, g_st.msg);
    moert_comm_abort(g_comm, 1);
  }
  return d;
}
static bool dev_out(view *v, void *h, const float *d, size_t bytes) {
  return !bytes || v->b->download(v->b, h, d, bytes, &g_st);
}
static void dev_free(view *v, float *d) {
  if (d) v->b->free(v->b, d);
}

static bool view_f32(moert_comm *c, float *x, int64_t n, moert_red op, moert_status *st) {
  view *v = V_(c);
  if (n < 0) return v->inner->all_reduce_f32(v->inner, x, n, op, st);
  size_t bytes = (size_t)n * sizeof(float);
  float *d = dev_in(v, x, bytes);
  bool ok = v->inner->all_reduce_f32(v->inner, d, n, op, st) && dev_out(v, x, d, bytes);
  dev_free(v, d);
  return ok;
}
static bool view_all_gather(moert_comm *c, const float *send, float *recv, int64_t n, moert_status *st) {
  view *v = V_(c);
  if (n < 0) return v->inner->all_gather_f32(v->inner, send, recv, n, st);
  size_t bytes = (size_t)n * sizeof(float), all = bytes * (size_t)c->world;
  float *drecv = dev_in(v, recv, all);
  bool in_place = send == recv + (size_t)c->rank * n;
  float *dsend = in_place ? drecv + (size_t)c->rank * n : dev_in(v, send, bytes);
  bool ok = v->inner->all_gather_f32(v->inner, dsend, drecv, n, st) && dev_out(v, recv, drecv, all);
  if (!in_place) dev_free(v, dsend);
  dev_free(v, drecv);
  return ok;
}
static bool view_reduce_scatter(moert_comm *c, const float *send, float *recv, int64_t n, moert_status *st) {
  view *v = V_(c);
  if (n < 0) return v->inner->reduce_scatter_f32(v->inner, send, recv, n, st);
  size_t bytes = (size_t)n * sizeof(float), all = bytes * (size_t)c->world;
  float *dsend = dev_in(v, send, all);
  float *drecv = send == recv ? dsend : dev_in(v, recv, bytes);
  bool ok = v->inner->reduce_scatter_f32(v->inner, dsend, drecv, n, st) && dev_out(v, recv, drecv, bytes);
  if (drecv != dsend) dev_free(v, drecv);
  dev_free(v, dsend);
  return ok;
}
static bool view_a2a(moert_comm *c, const float *send, float *recv, int64_t n, moert_a2a_algo algo,
                     moert_status *st) {
  view *v = V_(c);
  if (n < 0 || (algo != MOERT_A2A_LINEAR && algo != MOERT_A2A_2DH)) /* refused, untouched */
    return v->inner->all_to_all_f32(v->inner, send, recv, n, algo, st);
  size_t all = (size_t)n * sizeof(float) * (size_t)c->world;
  float *dsend = dev_in(v, send, all), *drecv = dev_in(v, recv, all);
  bool ok = v->inner->all_to_all_f32(v->inner, dsend, drecv, n, algo, st) && dev_out(v, recv, drecv, all);
  dev_free(v, dsend);
  dev_free(v, drecv);
  return ok;
}
static bool view_a2av(moert_comm *c, const float *send, const int64_t *sc, const int64_t *sd, float *recv,
                      const int64_t *rc, const int64_t *rd, moert_status *st) {
  view *v = V_(c);
  int64_t sn = 0, rn = 0;
  for (int r = 0; r < c->world; r++) {
    if (sc[r] < 0 || rc[r] < 0 || sd[r] < 0 || rd[r] < 0) /* refused by the comm, untouched */
      return v->inner->all_to_allv_f32(v->inner, send, sc, sd, recv, rc, rd, st);
    if (sd[r] + sc[r] > sn) sn = sd[r] + sc[r];
    if (rd[r] + rc[r] > rn) rn = rd[r] + rc[r];
  }
  float *dsend = dev_in(v, send, (size_t)sn * sizeof(float)), *drecv = dev_in(v, recv, (size_t)rn * sizeof(float));
  bool ok = v->inner->all_to_allv_f32(v->inner, dsend, sc, sd, drecv, rc, rd, st) &&
            dev_out(v, recv, drecv, (size_t)rn * sizeof(float));
  dev_free(v, dsend);
  dev_free(v, drecv);
  return ok;
}
static bool view_start(moert_comm *c, const float *send, float *recv, int64_t n, moert_a2a_algo algo,
                       moert_req **req, moert_status *st) {
  view *v = V_(c);
  *req = NULL;
  if (n < 0 || (algo != MOERT_A2A_LINEAR && algo != MOERT_A2A_2DH))
    return v->inner->all_to_all_start(v->inner, send, recv, n, algo, req, st);
  view_req *vr = NULL;
  for (int i = 0; i < VIEW_REQS && !vr; i++)
    if (!v->reqs[i].dsend) vr = &v->reqs[i];
  if (!vr) return MOERT_FAIL(st, "the test's view: too many all-to-alls in flight");
  size_t all = (size_t)n * sizeof(float) * (size_t)c->world;
  vr->dsend = dev_in(v, send, all);
  vr->drecv = dev_in(v, recv, all);
  vr->hrecv = recv;
  vr->bytes = all;
  if (!v->inner->all_to_all_start(v->inner, vr->dsend, vr->drecv, n, algo, &vr->inner, st) || !vr->inner) {
    bool failed = st->failed;
    dev_free(v, vr->dsend);
    dev_free(v, vr->drecv);
    memset(vr, 0, sizeof *vr);
    return !failed; /* n = 0: nothing in flight, like the comm's own NULL */
  }
  *req = (moert_req *)vr;
  return true;
}
static bool view_wait(moert_comm *c, moert_req *req, moert_status *st) {
  view *v = V_(c);
  if (!req) return v->inner->wait(v->inner, NULL, st);
  view_req *vr = (view_req *)req;
  bool ok = v->inner->wait(v->inner, vr->inner, st) && dev_out(v, vr->hrecv, vr->drecv, vr->bytes);
  dev_free(v, vr->dsend);
  dev_free(v, vr->drecv);
  memset(vr, 0, sizeof *vr);
  return ok;
}
static bool view_f64(moert_comm *c, double *x, int64_t n, moert_red op, moert_status *st) {
  return V_(c)->inner->all_reduce_f64(V_(c)->inner, x, n, op, st);
}
static bool view_i64(moert_comm *c, int64_t *x, int64_t n, moert_red op, moert_status *st) {
  return V_(c)->inner->all_reduce_i64(V_(c)->inner, x, n, op, st);
}
static bool view_broadcast(moert_comm *c, void *buf, int64_t bytes, int root, moert_status *st) {
  return V_(c)->inner->broadcast(V_(c)->inner, buf, bytes, root, st);
}
static bool view_gather(moert_comm *c, const void *send, void *recv, int64_t bytes, int root, moert_status *st) {
  return V_(c)->inner->gather(V_(c)->inner, send, recv, bytes, root, st);
}
static bool view_barrier(moert_comm *c, moert_status *st) { return V_(c)->inner->barrier(V_(c)->inner, st); }
static moert_comm *view_create(moert_comm *inner, moert_backend *b);
static bool view_split(moert_comm *c, int color, int key, moert_comm **out, moert_status *st) {
  moert_comm *child;
  *out = NULL;
  if (!V_(c)->inner->split(V_(c)->inner, color, key, &child, st)) return false;
  *out = view_create(child, V_(c)->b);
  return true;
}
/* Destroys the view and the device comm it wraps. */
static void view_destroy(moert_comm *c) {
  V_(c)->inner->destroy(V_(c)->inner);
  free(V_(c));
}
static moert_comm *view_create(moert_comm *inner, moert_backend *b) {
  view *v = calloc(1, sizeof *v);
  if (!v) {
    fprintf(stderr, "rank %d: out of memory\n", g_rank);
    moert_comm_abort(g_comm, 1);
  }
  v->inner = inner;
  v->b = b;
  v->pub = (moert_comm){
      .name = inner->name, .world = inner->world, .rank = inner->rank, .nodes = inner->nodes,
      .node = inner->node, .local_size = inner->local_size, .local_rank = inner->local_rank,
      .host_rank = inner->host_rank, .host_size = inner->host_size,
      .all_reduce_f64 = view_f64, .all_reduce_f32 = view_f32, .all_reduce_i64 = view_i64,
      .all_gather_f32 = view_all_gather, .reduce_scatter_f32 = view_reduce_scatter,
      .broadcast = view_broadcast, .gather = view_gather, .all_to_all_f32 = view_a2a,
      .all_to_allv_f32 = view_a2av, .all_to_all_start = view_start, .wait = view_wait,
      .split = view_split, .barrier = view_barrier, .destroy = view_destroy, .impl = v};
  return &v->pub;
}

/* The mpi comm's test hooks, where the comm is the mpi comm. */
static void set_max_count(moert_comm *c, int64_t max_count) {
  if (!g_nccl) moert_comm_mpi_set_max_count(c, max_count);
}

/* ---- the values: functions of (seed, rank, index) ------------------------ */

static uint32_t mix(uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  uint64_t h = 0x9e3779b97f4a7c15ull ^ a;
  h = (h ^ b) * 0xbf58476d1ce4e5b9ull;
  h = (h ^ (h >> 31) ^ c) * 0x94d049bb133111ebull;
  h = (h ^ (h >> 29) ^ d) * 0xbf58476d1ce4e5b9ull;
  return (uint32_t)(h ^ (h >> 32));
}

/* Whole numbers in [-1000, 1000]: sums over ranks are exact in any order. */
static float val_f32(uint32_t seed, int rank, int64_t i) {
  return (float)((int)(mix(seed, (uint32_t)rank, (uint32_t)i, (uint32_t)(i >> 32)) % 2001) - 1000);
}
/* Multiples of 2^-10 below 2^10: exact sums too. */
static double val_f64(uint32_t seed, int rank, int64_t i) {
  return (double)((int)(mix(seed, (uint32_t)rank, (uint32_t)i, 7) % 2097152) - 1048576) / 1024.0;
}
/* Up to 2^52 in magnitude, so that 64 bits matter. */
static int64_t val_i64(uint32_t seed, int rank, int64_t i) {
  int64_t v = ((int64_t)mix(seed, (uint32_t)rank, (uint32_t)i, 11) << 20) ^ (int64_t)(i & 0xfffff);
  return (i & 1) ? -v : v;
}
/* Element i of the block that rank src sends to rank dst: 24 bits, exact in
 * a float, different for nearly every (src, dst, i). */
static float val_a2a(uint32_t seed, int src, int dst, int64_t i) {
  return (float)(mix(seed, (uint32_t)src, (uint32_t)dst, (uint32_t)i) & 0xffffff);
}
static uint8_t val_byte(uint32_t seed, int rank, int64_t i) {
  return (uint8_t)mix(seed, (uint32_t)rank, (uint32_t)i, 13);
}

/* ---- rows ------------------------------------------------------------------ */

/* Sums this rank's wrong count over all ranks (MPI itself) and prints the row. */
static void report(const char *op, const char *detail, int64_t n, int64_t wrong, double t0) {
  double us = (now() - t0) * 1e6;
  long long local = wrong, total = 0;
  if (MPI_Allreduce(&local, &total, 1, MPI_LONG_LONG, MPI_SUM, MPI_COMM_WORLD) != MPI_SUCCESS) {
    fprintf(stderr, "rank %d: MPI_Allreduce of the wrong counts failed\n", g_rank);
    moert_comm_abort(g_comm, 1);
  }
  g_total_wrong += total;
  g_rows++;
  if (g_rank == 0)
    printf("%-16s %-36s %9" PRId64 " %8lld %10.0f%s\n", op, detail, n, total, us,
           total ? "  <-- WRONG" : "");
}

/* Counts a mismatch; prints the first few of each check. */
static int64_t g_shown;
static void mismatch(int64_t *wrong, const char *what, int64_t i, double got, double want) {
  if ((*wrong)++ == 0) g_shown = 0;
  if (g_shown++ < 3)
    fprintf(stderr, "rank %d: %s: element %" PRId64 ": got %.17g, want %.17g\n", g_rank, what, i,
            got, want);
}

/* ---- the checks ------------------------------------------------------------ */

static void check_all_reduce(moert_comm *c, int64_t n, uint32_t seed, const char *tag) {
  static const struct {
    moert_red op;
    const char *name;
  } ops[] = {{MOERT_RED_SUM, "sum"}, {MOERT_RED_MAX, "max"}};
  char detail[64];
  for (int o = 0; o < 2; o++) {
    double t0 = now();
    int64_t wrong = 0;
    float *x = xmalloc((size_t)n * sizeof *x);
    for (int64_t i = 0; i < n; i++) x[i] = val_f32(seed, c->rank, i);
    TRY(c->all_reduce_f32(c, x, n, ops[o].op, &g_st));
    for (int64_t i = 0; i < n; i++) {
      float want = val_f32(seed, 0, i);
      for (int r = 1; r < c->world; r++) {
        float v = val_f32(seed, r, i);
        want = ops[o].op == MOERT_RED_SUM ? want + v : (v > want ? v : want);
      }
      if (x[i] != want) mismatch(&wrong, "all_reduce_f32", i, x[i], want);
    }
    free(x);
    snprintf(detail, sizeof detail, "f32 %s %s", ops[o].name, tag);
    report("all_reduce", detail, n, wrong, t0);

    t0 = now();
    wrong = 0;
    double *d = xmalloc((size_t)n * sizeof *d);
    for (int64_t i = 0; i < n; i++) d[i] = val_f64(seed, c->rank, i);
    TRY(c->all_reduce_f64(c, d, n, ops[o].op, &g_st));
    for (int64_t i = 0; i < n; i++) {
      double want = val_f64(seed, 0, i);
      for (int r = 1; r < c->world; r++) {
        double v = val_f64(seed, r, i);
        want = ops[o].op == MOERT_RED_SUM ? want + v : (v > want ? v : want);
      }
      if (d[i] != want) mismatch(&wrong, "all_reduce_f64", i, d[i], want);
    }
    free(d);
    snprintf(detail, sizeof detail, "f64 %s %s", ops[o].name, tag);
    report("all_reduce", detail, n, wrong, t0);

    t0 = now();
    wrong = 0;
    int64_t *k = xmalloc((size_t)n * sizeof *k);
    for (int64_t i = 0; i < n; i++) k[i] = val_i64(seed, c->rank, i);
    TRY(c->all_reduce_i64(c, k, n, ops[o].op, &g_st));
    for (int64_t i = 0; i < n; i++) {
      int64_t want = val_i64(seed, 0, i);
      for (int r = 1; r < c->world; r++) {
        int64_t v = val_i64(seed, r, i);
        want = ops[o].op == MOERT_RED_SUM ? want + v : (v > want ? v : want);
      }
      if (k[i] != want) mismatch(&wrong, "all_reduce_i64", i, (double)k[i], (double)want);
    }
    free(k);
    snprintf(detail, sizeof detail, "i64 %s %s", ops[o].name, tag);
    report("all_reduce", detail, n, wrong, t0);
  }
}

static void check_all_gather(moert_comm *c, int64_t n, uint32_t seed, const char *tag) {
  const int w = c->world;
  char detail[64];
  for (int in_place = 0; in_place < 2; in_place++) {
    double t0 = now();
    int64_t wrong = 0;
    float *send = xmalloc((size_t)n * sizeof *send);
    float *recv = xmalloc((size_t)w * (size_t)n * sizeof *recv);
    for (int64_t i = 0; i < (int64_t)w * n; i++) recv[i] = -1.0f;
    float *mine = in_place ? recv + (size_t)c->rank * n : send;
    for (int64_t i = 0; i < n; i++) mine[i] = val_f32(seed, c->rank, i);
    TRY(c->all_gather_f32(c, mine, recv, n, &g_st));
    for (int r = 0; r < w; r++)
      for (int64_t i = 0; i < n; i++)
        if (recv[(size_t)r * n + i] != val_f32(seed, r, i))
          mismatch(&wrong, "all_gather", (int64_t)r * n + i, recv[(size_t)r * n + i],
                   val_f32(seed, r, i));
    free(send);
    free(recv);
    snprintf(detail, sizeof detail, "%s%s", in_place ? "in place " : "", tag);
    report("all_gather", detail, n, wrong, t0);
  }
}

static void check_reduce_scatter(moert_comm *c, int64_t n, uint32_t seed, const char *tag) {
  const int w = c->world;
  char detail[64];
  for (int in_place = 0; in_place < 2; in_place++) {
    double t0 = now();
    int64_t wrong = 0;
    float *send = xmalloc((size_t)w * (size_t)n * sizeof *send);
    float *recv = in_place ? send : xmalloc((size_t)n * sizeof *recv);
    /* element j of this rank's send: val_f32(seed, rank, j) */
    for (int64_t j = 0; j < (int64_t)w * n; j++) send[j] = val_f32(seed, c->rank, j);
    TRY(c->reduce_scatter_f32(c, send, recv, n, &g_st));
    for (int64_t i = 0; i < n; i++) {
      int64_t j = (int64_t)c->rank * n + i;
      float want = 0;
      for (int r = 0; r < w; r++) want += val_f32(seed, r, j);
      if (recv[i] != want) mismatch(&wrong, "reduce_scatter", i, recv[i], want);
    }
    if (!in_place) free(recv);
    free(send);
    snprintf(detail, sizeof detail, "%s%s", in_place ? "in place " : "", tag);
    report("reduce_scatter", detail, n, wrong, t0);
  }
}

static void check_broadcast_gather(moert_comm *c, int64_t n, uint32_t seed, const char *tag) {
  const int w = c->world;
  const int64_t bytes = n * 4 + (n ? 3 : 0); /* not a multiple of anything */
  char detail[64];
  double t0 = now();
  int64_t wrong = 0;
  uint8_t *buf = xmalloc((size_t)bytes);
  for (int root = 0; root < w; root++) {
    for (int64_t i = 0; i < bytes; i++) buf[i] = val_byte(seed, c->rank, i);
    TRY(c->broadcast(c, buf, bytes, root, &g_st));
    for (int64_t i = 0; i < bytes; i++)
      if (buf[i] != val_byte(seed, root, i)) mismatch(&wrong, "broadcast", i, buf[i], val_byte(seed, root, i));
  }
  free(buf);
  snprintf(detail, sizeof detail, "every root, bytes %s", tag);
  report("broadcast", detail, bytes, wrong, t0);

  for (int in_place = 0; in_place < 2; in_place++) {
    t0 = now();
    wrong = 0;
    uint8_t *send = xmalloc((size_t)bytes);
    uint8_t *recv = xmalloc((size_t)w * (size_t)bytes);
    for (int root = 0; root < w; root++) {
      memset(recv, 0xAB, (size_t)w * (size_t)bytes);
      uint8_t *mine = in_place && c->rank == root ? recv + (size_t)root * bytes : send;
      for (int64_t i = 0; i < bytes; i++) mine[i] = val_byte(seed, c->rank, i);
      TRY(c->gather(c, mine, c->rank == root ? recv : NULL, bytes, root, &g_st));
      if (c->rank != root) continue;
      for (int r = 0; r < w; r++)
        for (int64_t i = 0; i < bytes; i++)
          if (recv[(size_t)r * bytes + i] != val_byte(seed, r, i))
            mismatch(&wrong, "gather", (int64_t)r * bytes + i, recv[(size_t)r * bytes + i],
                     val_byte(seed, r, i));
    }
    free(send);
    free(recv);
    snprintf(detail, sizeof detail, "every root, bytes%s %s", in_place ? ", in place" : "", tag);
    report("gather", detail, bytes, wrong, t0);
  }
}

static void fill_a2a(const moert_comm *c, float *send, int64_t n, uint32_t seed) {
  for (int d = 0; d < c->world; d++)
    for (int64_t i = 0; i < n; i++) send[(size_t)d * n + i] = val_a2a(seed, c->rank, d, i);
}

/* Wrong elements of recv: block r must be what rank r sent this rank. */
static int64_t verify_a2a(const moert_comm *c, const float *recv, int64_t n, uint32_t seed,
                          const char *what) {
  int64_t wrong = 0;
  for (int r = 0; r < c->world; r++)
    for (int64_t i = 0; i < n; i++) {
      float want = val_a2a(seed, r, c->rank, i);
      if (recv[(size_t)r * n + i] != want) mismatch(&wrong, what, (int64_t)r * n + i, recv[(size_t)r * n + i], want);
    }
  return wrong;
}

static void check_a2a(moert_comm *c, int64_t n, uint32_t seed, const char *tag) {
  const size_t total = (size_t)c->world * (size_t)n;
  char detail[64];
  float *send = xmalloc(total * sizeof *send);
  float *lin = xmalloc(total * sizeof *lin);
  float *tdh = xmalloc(total * sizeof *tdh);
  fill_a2a(c, send, n, seed);
  for (size_t i = 0; i < total; i++) lin[i] = tdh[i] = -1.0f;

  double t0 = now();
  TRY(c->all_to_all_f32(c, send, lin, n, MOERT_A2A_LINEAR, &g_st));
  snprintf(detail, sizeof detail, "linear %s", tag);
  report("all_to_all", detail, n, verify_a2a(c, lin, n, seed, "all_to_all linear"), t0);

  t0 = now();
  TRY(c->all_to_all_f32(c, send, tdh, n, MOERT_A2A_2DH, &g_st));
  int64_t wrong = verify_a2a(c, tdh, n, seed, "all_to_all 2dh");
  snprintf(detail, sizeof detail, "2dh %dx%d %s", c->nodes, c->local_size, tag);
  report("all_to_all", detail, n, wrong, t0);

  t0 = now();
  wrong = total && memcmp(lin, tdh, total * sizeof *lin) != 0;
  /* The scratch is the comm's, world * n floats at least, only for 2 levels. */
  int64_t scratch = g_nccl ? 0 : moert_comm_mpi_scratch_bytes(c);
  bool two = c->nodes > 1 && c->local_size > 1;
  if (!g_nccl && (two ? scratch < (int64_t)(total * sizeof(float)) : scratch != 0)) {
    fprintf(stderr, "rank %d: 2dh scratch is %" PRId64 " bytes after n = %" PRId64 "\n", g_rank,
            scratch, n);
    wrong++;
  }
  snprintf(detail, sizeof detail, "2dh == linear, bitwise %s", tag);
  report("all_to_all", detail, n, wrong, t0);
  free(send);
  free(lin);
  free(tdh);
}

/* Three all-to-alls in flight at once (linear, 2dh, 2dh), waited for out of
 * order, twice: the second round reuses the first's requests. */
static void check_nonblocking(moert_comm *c, uint32_t seed, int64_t max_count, const char *tag) {
  static const int64_t ns[3] = {37, 5, 101};
  static const moert_a2a_algo algos[3] = {MOERT_A2A_LINEAR, MOERT_A2A_2DH, MOERT_A2A_2DH};
  static const int order[3] = {1, 2, 0};
  set_max_count(c, max_count);
  for (int round = 0; round < 2; round++) {
    double t0 = now();
    int64_t wrong = 0;
    float *send[3], *recv[3];
    moert_req *req[3];
    for (int k = 0; k < 3; k++) {
      size_t total = (size_t)c->world * (size_t)ns[k];
      send[k] = xmalloc(total * sizeof(float));
      recv[k] = xmalloc(total * sizeof(float));
      fill_a2a(c, send[k], ns[k], seed + (uint32_t)k);
      for (size_t i = 0; i < total; i++) recv[k][i] = -1.0f;
      TRY(c->all_to_all_start(c, send[k], recv[k], ns[k], algos[k], &req[k], &g_st));
    }
    for (int j = 0; j < 3; j++) {
      int k = order[j];
      TRY(c->wait(c, req[k], &g_st));
      wrong += verify_a2a(c, recv[k], ns[k], seed + (uint32_t)k, "nonblocking all_to_all");
    }
    for (int k = 0; k < 3; k++) {
      free(send[k]);
      free(recv[k]);
    }
    if (!g_nccl && moert_comm_mpi_req_count(c) != 3) {
      fprintf(stderr, "rank %d: %d requests allocated after round %d, want 3\n", g_rank,
              moert_comm_mpi_req_count(c), round);
      wrong++;
    }
    char detail[64];
    snprintf(detail, sizeof detail, "3 in flight%s %s", round ? ", reused" : "", tag);
    report("a2a start/wait", detail, 143, wrong, t0);
  }
  set_max_count(c, 0);
  /* n = 0: nothing in flight, and wait(NULL) is fine */
  double t0 = now();
  moert_req *r0 = (moert_req *)&r0;
  TRY(c->all_to_all_start(c, NULL, NULL, 0, MOERT_A2A_2DH, &r0, &g_st));
  int64_t wrong = r0 != NULL;
  TRY(c->wait(c, r0, &g_st));
  report("a2a start/wait", "n = 0", 0, wrong, t0);
}

/* The uneven all-to-all (test_alltoallv.c's values): rank s sends rank d
 * count(s, d) floats (0 for some pairs), with gaps between the blocks on both
 * sides; the gaps of recv must keep their poison. */
static int64_t v_count(int s, int d, int scale) { return ((s * 7 + d * 3) % 5 + (s == d)) * scale; }
static float v_value(int s, int d, int64_t i) { return (float)(s * 1000 + d * 10) + (float)i * 0.5f; }

static void check_a2av(moert_comm *c, int scale) {
  const int W = c->world, me = c->rank;
  double t0 = now();
  int64_t *sc = xmalloc(4 * (size_t)W * sizeof *sc), *sd = sc + W, *rc = sc + 2 * W, *rd = sc + 3 * W;
  int64_t stot = 0, rtot = 0;
  for (int r = 0; r < W; r++) {
    sc[r] = v_count(me, r, scale);
    sd[r] = stot;
    stot += sc[r] + 2;
    rc[r] = v_count(r, me, scale);
    rd[r] = rtot;
    rtot += rc[r] + 3;
  }
  float *send = xmalloc(sizeof(float) * (size_t)stot), *recv = xmalloc(sizeof(float) * (size_t)rtot);
  for (int64_t i = 0; i < stot; i++) send[i] = -1;
  for (int64_t i = 0; i < rtot; i++) recv[i] = -7;
  for (int r = 0; r < W; r++)
    for (int64_t i = 0; i < sc[r]; i++) send[sd[r] + i] = v_value(me, r, i);
  TRY(c->all_to_allv_f32(c, send, sc, sd, recv, rc, rd, &g_st));
  int64_t wrong = 0;
  for (int r = 0; r < W; r++) {
    for (int64_t i = 0; i < rc[r]; i++)
      if (recv[rd[r] + i] != v_value(r, me, i)) mismatch(&wrong, "all_to_allv", rd[r] + i, recv[rd[r] + i], v_value(r, me, i));
    for (int64_t i = rd[r] + rc[r]; i < rd[r] + rc[r] + 3; i++)
      if (recv[i] != -7) mismatch(&wrong, "all_to_allv gap", i, recv[i], -7);
  }
  free(send);
  free(recv);
  free(sc);
  char detail[64];
  snprintf(detail, sizeof detail, "uneven, gaps, counts x%d", scale);
  report("all_to_allv", detail, rtot, wrong, t0);
}

static void check_sizes(moert_comm *c, int64_t max_count, const int64_t *sizes, int nsizes,
                        const char *tag) {
  set_max_count(c, max_count);
  for (int s = 0; s < nsizes; s++) {
    uint32_t seed = 1000u * (uint32_t)s + (uint32_t)max_count;
    check_all_reduce(c, sizes[s], seed, tag);
    check_all_gather(c, sizes[s], seed + 1, tag);
    check_reduce_scatter(c, sizes[s], seed + 2, tag);
    check_broadcast_gather(c, sizes[s], seed + 3, tag);
    check_a2a(c, sizes[s], seed + 4, tag);
  }
  set_max_count(c, 0);
}

/* The topology a child of split must have: its members' parent nodes in
 * equal node-major runs, else flat. Written apart from comm_mpi.c's rule:
 * count the members of each parent node and check that they are contiguous. */
static int expected_child_local(const int *node_of, int w) {
  int L = -1;
  for (int i = 0; i < w;) {
    int j = i;
    while (j < w && node_of[j] == node_of[i]) j++;
    for (int k = j; k < w; k++)
      if (node_of[k] == node_of[i]) return 1; /* the node comes back later */
    if (L >= 0 && j - i != L) return 1;
    L = j - i;
    i = j;
  }
  return L < 1 ? 1 : L;
}

static void check_split(moert_comm *c, const char *name, int color, int key, uint32_t seed) {
  double t0 = now();
  int64_t wrong = 0;
  moert_comm *k;
  TRY(c->split(c, color, key, &k, &g_st));
  /* who is in it, in which order: from MPI on the world comm */
  int *colors = xmalloc((size_t)c->world * sizeof *colors);
  int *keys = xmalloc((size_t)c->world * sizeof *keys);
  MPI_Allgather(&color, 1, MPI_INT, colors, 1, MPI_INT, MPI_COMM_WORLD);
  MPI_Allgather(&key, 1, MPI_INT, keys, 1, MPI_INT, MPI_COMM_WORLD);
  int members = 0, before = 0;
  int *node_of = xmalloc((size_t)c->world * sizeof *node_of);
  int *member = xmalloc((size_t)c->world * sizeof *member);
  for (int r = 0; r < c->world; r++) {
    if (colors[r] != color) continue;
    if (keys[r] < key || (keys[r] == key && r < c->rank)) before++;
    member[members++] = r;
  }
  /* members sorted by (key, rank) */
  for (int i = 1; i < members; i++)
    for (int j = i; j > 0 && (keys[member[j]] < keys[member[j - 1]] ||
                              (keys[member[j]] == keys[member[j - 1]] && member[j] < member[j - 1]));
         j--) {
      int t = member[j];
      member[j] = member[j - 1];
      member[j - 1] = t;
    }
  const int L = c->local_size;
  for (int i = 0; i < members; i++) node_of[i] = member[i] / L; /* parent node-major */
  int want_local = expected_child_local(node_of, members);
  if (k->world != members || k->rank != before || k->local_size != want_local ||
      k->nodes * k->local_size != k->world || k->node != k->rank / want_local ||
      k->local_rank != k->rank % want_local || strcmp(k->name, g_name) != 0) {
    fprintf(stderr,
            "rank %d: split %s: world %d rank %d nodes %d node %d local %d/%d; want world %d "
            "rank %d local size %d\n",
            g_rank, name, k->world, k->rank, k->nodes, k->node, k->local_rank, k->local_size,
            members, before, want_local);
    wrong++;
  }
  /* an all-reduce inside: the sum of the parent ranks + 1 of the members */
  int64_t x[2] = {c->rank + 1, -(c->rank + 1)}, want = 0;
  for (int i = 0; i < members; i++) want += member[i] + 1;
  TRY(k->all_reduce_i64(k, x, 2, MOERT_RED_SUM, &g_st));
  if (x[0] != want || x[1] != -want) mismatch(&wrong, "split all_reduce", 0, (double)x[0], (double)want);
  /* and a 2dh all-to-all inside, against the values */
  int64_t n = 9;
  float *send = xmalloc((size_t)k->world * (size_t)n * sizeof *send);
  float *recv = xmalloc((size_t)k->world * (size_t)n * sizeof *recv);
  fill_a2a(k, send, n, seed);
  TRY(k->all_to_all_f32(k, send, recv, n, MOERT_A2A_2DH, &g_st));
  wrong += verify_a2a(k, recv, n, seed, "split all_to_all 2dh");
  free(send);
  free(recv);
  free(colors);
  free(keys);
  free(node_of);
  free(member);
  char detail[64];
  snprintf(detail, sizeof detail, "%s: %d ranks, %dx%d", name, k->world, k->nodes, k->local_size);
  k->destroy(k);
  report("split", detail, members, wrong, t0);
}

static void check_splits(moert_comm *c) {
  const int w = c->world, r = c->rank, half = (w + 1) / 2;
  check_split(c, "halves", r < half ? 0 : 1, r, 71);
  check_split(c, "halves, reversed", r < half ? 0 : 1, -r, 72);
  check_split(c, "by local rank", c->local_rank, c->node, 73);
  check_split(c, "by node", c->node, c->local_rank, 74);
  check_split(c, "all but the last", r == w - 1 && w > 1 ? 1 : 0, r, 75);
  check_split(c, "even, odd", r % 2, r, 76);
  /* a split of a split */
  double t0 = now();
  int64_t wrong = 0;
  moert_comm *a, *b;
  TRY(c->split(c, 0, w - r, &a, &g_st)); /* the world reversed */
  TRY(a->split(a, a->rank % 2, a->rank, &b, &g_st));
  int64_t x = r, want = 0;
  for (int q = 0; q < w; q++)
    if ((w - 1 - q) % 2 == a->rank % 2) want += q;
  TRY(b->all_reduce_i64(b, &x, 1, MOERT_RED_SUM, &g_st));
  if (x != want) mismatch(&wrong, "split of a split", 0, (double)x, (double)want);
  b->destroy(b);
  a->destroy(a);
  report("split", "of a split (reversed, odd/even)", w, wrong, t0);
}

/* ---- the pure topology check (layouts one machine cannot make) ----------- */

static int64_t topo_case(const char *name, int world, const moert_mpi_rankinfo *info,
                         const char *env_text, int want_local, const char *want_msg) {
  moert_status st = {0};
  int L = -7;
  bool ok = moert_comm_mpi_topology(world, info, env_text, &L, &st);
  bool good = want_msg ? !ok && strstr(st.msg, want_msg) != NULL : ok && L == want_local;
  if (!good && g_rank == 0)
    fprintf(stderr, "topology %s: ok %d, local %d, message \"%s\"; want %s%s\n", name, ok, L,
            st.msg, want_msg ? "a failure with " : "success", want_msg ? want_msg : "");
  return !good;
}

static void check_topology_rules(void) {
  double t0 = now();
  int64_t wrong = 0;
  moert_mpi_rankinfo a[8];
  /* 2 nodes of 4, node-major */
  for (int r = 0; r < 8; r++) a[r] = (moert_mpi_rankinfo){0, r / 4 * 4, 4, r % 4};
  wrong += topo_case("node-major", 8, a, NULL, 4, NULL);
  /* the same, overridden by MOEC_LOCAL_SIZE=2 */
  for (int r = 0; r < 8; r++) a[r].env_local = 2;
  wrong += topo_case("MOEC_LOCAL_SIZE=2", 8, a, "2", 2, NULL);
  for (int r = 0; r < 8; r++) a[r].env_local = 3;
  wrong += topo_case("MOEC_LOCAL_SIZE=3", 8, a, "3", 0,
                     "MOEC_LOCAL_SIZE=3 does not divide the world size 8: it is the number of ranks "
                     "per node, one of 1, 2, 4, 8");
  for (int r = 0; r < 8; r++) a[r].env_local = 16;
  wrong += topo_case("MOEC_LOCAL_SIZE=16", 8, a, "16", 0, "does not divide the world size 8");
  for (int r = 0; r < 8; r++) a[r].env_local = -1;
  wrong += topo_case("MOEC_LOCAL_SIZE=x", 8, a, "two", 0, "MOEC_LOCAL_SIZE=two is not a whole number");
  a[5].env_local = 2;
  wrong += topo_case("MOEC_LOCAL_SIZE differs", 8, a, "two", 0,
                     "MOEC_LOCAL_SIZE differs between ranks (rank 0: not a whole number, rank 5: 2)");
  /* round robin over 2 nodes (mpirun --map-by node): rank r on node r % 2 */
  for (int r = 0; r < 8; r++) a[r] = (moert_mpi_rankinfo){0, r % 2, 4, r / 2};
  wrong += topo_case("round robin", 8, a, NULL, 0, "not numbered node-major: rank 1 is not on the node of rank 0");
  /* 3 ranks on one node, 1 on another */
  for (int r = 0; r < 4; r++) a[r] = (moert_mpi_rankinfo){0, r < 3 ? 0 : 3, r < 3 ? 3 : 1, r < 3 ? r : 0};
  wrong += topo_case("3 + 1", 4, a, NULL, 0, "different numbers of ranks (3 on the node of rank 0, 1 on the node of rank 3)");
  /* ... which MOEC_LOCAL_SIZE may override */
  for (int r = 0; r < 4; r++) a[r].env_local = 1;
  wrong += topo_case("3 + 1, MOEC_LOCAL_SIZE=1", 4, a, "1", 1, NULL);
  /* one rank */
  a[0] = (moert_mpi_rankinfo){0, 0, 1, 0};
  wrong += topo_case("one rank", 1, a, NULL, 1, NULL);
  report("topology rules", "10 layouts", 10, g_rank == 0 ? wrong : 0, t0);
}

/* Arguments refused on every rank before any MPI call: no rank waits. */
static void check_arg_errors(moert_comm *c) {
  double t0 = now();
  int64_t wrong = 0;
  float x[4] = {0};
  moert_comm *k = NULL;
  moert_req *rq = NULL;
  struct {
    const char *name, *want;
    bool ok;
    moert_status st;
  } cases[6];
  memset(cases, 0, sizeof cases);
  cases[0].name = "split color -1";
  cases[0].want = "color -1 is negative";
  cases[0].ok = c->split(c, -1, 0, &k, &cases[0].st);
  cases[1].name = "broadcast root = world";
  cases[1].want = "is not a rank of this comm";
  cases[1].ok = c->broadcast(c, x, 4, c->world, &cases[1].st);
  cases[2].name = "all_to_all n = -1";
  cases[2].want = "negative count -1";
  cases[2].ok = c->all_to_all_f32(c, x, x, -1, MOERT_A2A_LINEAR, &cases[2].st);
  cases[3].name = "all_to_all algo 9";
  cases[3].want = "unknown algorithm 9";
  cases[3].ok = c->all_to_all_start(c, x, x, 1, (moert_a2a_algo)9, &rq, &cases[3].st);
  cases[4].name = "all_reduce op 5";
  cases[4].want = "unknown reduction 5";
  cases[4].ok = c->all_reduce_f32(c, x, 1, (moert_red)5, &cases[4].st);
  cases[5].name = "gather root -1";
  cases[5].want = "root -1 is not a rank";
  cases[5].ok = c->gather(c, x, x, 4, -1, &cases[5].st);
  for (int i = 0; i < 6; i++)
    if (cases[i].ok || !strstr(cases[i].st.msg, cases[i].want)) {
      fprintf(stderr, "rank %d: %s: ok %d, message \"%s\"; want a failure with \"%s\"\n", g_rank,
              cases[i].name, cases[i].ok, cases[i].st.msg, cases[i].want);
      wrong++;
    }
  if (k || rq) wrong++;
  report("argument errors", "6 refused calls", 6, wrong, t0);
}

/* More than 2^31 bytes per rank: 2^28 + 3 floats per block, so the blocks go
 * in two passes of the default largest count. */
static void check_big(moert_comm *c) {
  const int64_t n = ((int64_t)1 << 28) + 3;
  const size_t total = (size_t)c->world * (size_t)n;
  double t0 = now();
  float *send = xmalloc(total * sizeof *send), *recv = xmalloc(total * sizeof *recv);
  for (int d = 0; d < c->world; d++)
    for (int64_t i = 0; i < n; i++) send[(size_t)d * n + i] = (float)((c->rank * 31 + d * 7 + i) & 0xffffff);
  double t1 = now();
  TRY(c->all_to_all_f32(c, send, recv, n, MOERT_A2A_LINEAR, &g_st));
  if (g_rank == 0)
    printf("(the call itself: %.2f s, %.2f GB/s per rank)\n", now() - t1,
           (double)total * 4e-9 / (now() - t1));
  int64_t wrong = 0;
  for (int r = 0; r < c->world; r++)
    for (int64_t i = 0; i < n; i++) {
      float want = (float)((r * 31 + c->rank * 7 + i) & 0xffffff);
      if (recv[(size_t)r * n + i] != want) mismatch(&wrong, "big all_to_all", i, recv[(size_t)r * n + i], want);
    }
  free(send);
  free(recv);
  report("all_to_all", "linear, > 2^31 bytes per rank", n, wrong, t0);
}

/* --nccl-shared: every rank on GPU 0; the nccl comm must refuse on every
 * rank, with the message, when there are two or more. */
static int nccl_shared(moert_comm *host, moert_backend *b) {
  moert_comm *k = NULL;
  moert_status st = {0};
  bool made = moert_comm_nccl_create(host, b, &k, &st);
  bool good = host->world == 1 ? made : !made && strstr(st.msg, "share one GPU") && strstr(st.msg, "--comm mpi");
  fprintf(stderr, "rank %d: %s%s\n", host->rank, made ? "made an nccl comm" : "refused: ", made ? "" : st.msg);
  if (made) k->destroy(k);
  long long bad = !good, total = 0;
  MPI_Allreduce(&bad, &total, 1, MPI_LONG_LONG, MPI_SUM, MPI_COMM_WORLD);
  if (host->rank == 0)
    printf("test_comm --nccl-shared: %d ranks on one GPU: %s\n", host->world,
           total ? "FAIL (a rank did not refuse with the message)" : "every rank refused, ok");
  return total ? 1 : 0;
}

/* An nccl comm over moert_comm_self() (no MPI in the bootstrap), on every
 * rank: a world of one whose collectives copy. */
static void check_nccl_self(moert_backend *b) {
  double t0 = now();
  int64_t wrong = 0;
  moert_comm *k = NULL;
  TRY(moert_comm_nccl_create(moert_comm_self(), b, &k, &g_st));
  moert_comm *c = view_create(k, b);
  if (c->world != 1 || c->rank != 0 || strcmp(c->name, "nccl") != 0) wrong++;
  float x[5] = {1, 2, 3, 4, 5}, y[5] = {0};
  TRY(c->all_reduce_f32(c, x, 5, MOERT_RED_SUM, &g_st));
  TRY(c->all_to_all_f32(c, x, y, 5, MOERT_A2A_2DH, &g_st));
  for (int i = 0; i < 5; i++)
    if (x[i] != (float)(i + 1) || y[i] != x[i]) mismatch(&wrong, "nccl over self", i, y[i], (double)i + 1);
  moert_comm *half;
  TRY(c->split(c, 0, 0, &half, &g_st));
  TRY(half->all_gather_f32(half, x, y, 5, &g_st));
  for (int i = 0; i < 5; i++)
    if (y[i] != x[i]) mismatch(&wrong, "nccl over self, split", i, y[i], x[i]);
  half->destroy(half);
  c->destroy(c);
  report("nccl over self", "bootstrap without MPI, split", 5, wrong, t0);
}

int main(int argc, char **argv) {
  bool big = false, shared = false, watched = false;
  for (int i = 1; i < argc; i++) {
    big |= strcmp(argv[i], "--big") == 0;
    watched |= strcmp(argv[i], "--watch") == 0;
    g_nccl |= strcmp(argv[i], "--nccl") == 0;
    shared |= strcmp(argv[i], "--nccl-shared") == 0;
  }
  if (!moert_comm_under_mpirun()) fprintf(stderr, "test_comm: note: not started by mpirun; one rank\n");
  if (!moert_comm_mpi_create(&argc, &argv, &g_comm, &g_st)) {
    fprintf(stderr, "test_comm: %s [%s]\n", g_st.msg, g_st.trace);
    moert_comm_abort(NULL, 1);
  }
  moert_comm *c = g_comm;
  g_rank = c->rank;
  /* --watch: under the watchdog (--timeout's), whose waits poll: the same results */
  static moert_watch watch = {.timeout = 100};
  if (watched) c->watch = &watch;
  moert_backend *gpu = NULL;
  if (g_nccl || shared) {
    /* every rank skips alike: a GPU each (or GPU 0 for all), and NCCL */
    const char *why = !moert_cuda_available()  ? "no GPU found"
                      : !moert_nccl_available() ? "libnccl.so.2 could not be loaded"
                      : !shared && c->host_size > moert_cuda_device_count()
                          ? "fewer GPUs than ranks on this machine (the nccl comm needs one GPU per rank)"
                          : NULL;
    int skip = why != NULL, any = 0;
    MPI_Allreduce(&skip, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (any) {
      if (why) fprintf(stderr, "rank %d: SKIP: %s\n", g_rank, why);
      moert_comm_mpi_finalize(c);
      return 77;
    }
    TRY(moert_backend_cuda_create(&gpu, shared ? 0 : c->host_rank, NULL, true, NULL, &g_st));
    if (shared) {
      int rc = nccl_shared(c, gpu);
      moert_backend_cuda_destroy(gpu);
      moert_comm_mpi_finalize(c);
      return rc;
    }
    moert_comm *k;
    TRY(moert_comm_nccl_create(c, gpu, &k, &g_st));
    c = view_create(k, gpu);
    g_name = "nccl";
  }
  double t_all = now();
  if (g_rank == 0) {
    printf("test_comm: %s comm, %d ranks, %d node%s of %d (MOEC_LOCAL_SIZE=%s)\n", g_name, c->world,
           c->nodes, c->nodes == 1 ? "" : "s", c->local_size,
           getenv("MOEC_LOCAL_SIZE") && *getenv("MOEC_LOCAL_SIZE") ? getenv("MOEC_LOCAL_SIZE")
                                                                   : "unset");
    printf("%-16s %-36s %9s %8s %10s\n", "op", "detail", "n", "wrong", "time_us");
  }
  /* the comm's own view of the world, against MPI's */
  int mw, mr;
  MPI_Comm_size(MPI_COMM_WORLD, &mw);
  MPI_Comm_rank(MPI_COMM_WORLD, &mr);
  const char *env = getenv("MOEC_LOCAL_SIZE");
  int want_local = env && *env ? atoi(env) : mw; /* one machine: one node */
  report("world", "size, rank, topology", mw,
         c->world != mw || c->rank != mr || c->local_size != want_local ||
             c->nodes != mw / want_local || c->node != mr / want_local ||
             c->local_rank != mr % want_local || strcmp(c->name, g_name) != 0,
         now());
  /* the machine's ranks whatever the simulated nodes: all of them here (the
   * GPU a rank takes is host_rank % GPUs) */
  report("world", "host rank and size (the machine's, not the simulated node's)", mw,
         c->host_size != mw || c->host_rank != mr, now());

  static const int64_t sizes[] = {0, 1, 7, 1000, 4099};
  check_sizes(c, 0, sizes, 5, "");
  static const int64_t small[] = {1, 5, 13, 101};
  check_sizes(c, 5, small, 4, "(passes of 5)");
  check_nonblocking(c, 500, 0, "");
  check_nonblocking(c, 600, 5, "(passes of 5)");
  check_a2av(c, 1);
  check_a2av(c, 1000);
  check_splits(c);
  check_topology_rules();
  check_arg_errors(c);
  if (big) check_big(c);
  if (gpu) check_nccl_self(gpu);
  double t0 = now();
  TRY(c->barrier(c, &g_st));
  report("barrier", "", 0, 0, t0);

  if (g_rank == 0)
    printf("test_comm: %d checks, %" PRId64 " wrong elements, %.2f s: %s\n", g_rows, g_total_wrong,
           now() - t_all, g_total_wrong ? "FAIL" : "ok");
  int rc = g_total_wrong ? 1 : 0;
  if (gpu) {
    c->destroy(c); /* the view and the nccl comm */
    moert_backend_cuda_destroy(gpu);
  }
  moert_comm_mpi_finalize(g_comm);
  return rc;
}
