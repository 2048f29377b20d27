/* calibrate.c — `./model --calibrate FILE`; see calibrate.h. Every time is
 * the backend's marks around repeated calls after one unmeasured call (on
 * cuda CUDA events on the stream; on the cpu the host's clock), so it is
 * what the executor's spans would see. */
#define _POSIX_C_SOURCE 200809L
#include "calibrate.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "comm.h"
#include "cost.h"
#include "placement.h"

/* Measurements stop growing once one call takes this long (the cpu is slow,
 * and a calibration should take a minute, not an hour). */
#define CALL_LIMIT_S 0.25
/* Each timing repeats its op until at least this much time is covered. */
#define TIMING_S 0.02
/* Elements of the largest buffer: 256 M (1 GB of fp32) on a GPU, 32 M on the cpu. */
#define MAX_ELEMS_GPU (256ll << 20)
#define MAX_ELEMS_CPU (32ll << 20)
/* The largest all-to-all a rank sends in all: 64 MiB on a GPU (NVLink's
 * bandwidth shows only in the tens of MiB), 4 MiB on the cpu. */
#define A2A_BYTES_GPU (64ll << 20)
#define A2A_BYTES_CPU (4ll << 20)

typedef struct cal {
  moert_backend *b;
  moert_comm *comm;
  moert_dt dt;
  int es;
  moert_calib out;
  moert_status *st;
} cal;

typedef void (*op_fn)(cal *c, void *ctx);

/* Seconds of one call of fn: the fastest of 3 timings of repeated calls
 * (a shared machine's other work only ever adds time), after one unmeasured
 * call; -1 on failure. */
static double time_op(cal *c, op_fn fn, void *ctx) {
  moert_backend *b = c->b;
  b->marks_reset(b);
  fn(c, ctx); /* warm-up */
  int m0 = b->mark(b, NULL);
  fn(c, ctx);
  int m1 = b->mark(b, NULL);
  double ms;
  if (!b->mark_ms(b, m0, m1, &ms, c->st) || isnan(ms)) return -1;
  int reps = ms > 0 ? (int)(TIMING_S * 1e3 / ms) : 100;
  if (reps < 1) reps = 1;
  if (reps > 200) reps = 200;
  double best = ms / 1e3;
  for (int trial = 0; trial < 3; trial++) {
    b->marks_reset(b);
    m0 = b->mark(b, NULL);
    for (int i = 0; i < reps; i++) fn(c, ctx);
    m1 = b->mark(b, NULL);
    if (!b->mark_ms(b, m0, m1, &ms, c->st) || isnan(ms)) return -1;
    if (ms / 1e3 / reps < best) best = ms / 1e3 / reps;
  }
  return best;
}

/* --- GEMMs --- */

typedef struct gemm_ctx {
  moert_gemm_kind kind;
  int64_t m, n, k, count;
  void *a, *bb, *cc;
} gemm_ctx;

static void run_gemm(cal *c, void *p) {
  gemm_ctx *g = p;
  bool ta = g->kind == MOERT_GEMM_TN, tb = g->kind == MOERT_GEMM_NT;
  /* weight gradients are fp32 (the masters'), the rest of the path's type */
  moert_dt ct = g->kind == MOERT_GEMM_TN ? MOERT_F32 : c->dt;
  moert_gemm x = {.trans_a = ta, .trans_b = tb, .m = g->m, .n = g->n, .k = g->k, .count = g->count, .alpha = 1,
                  .beta = 0, .a = g->a, .b = g->bb, .ab_type = c->dt, .lda = ta ? g->m : g->k,
                  .stride_a = g->m * g->k, .ldb = tb ? g->k : g->n, .stride_b = g->k * g->n, .c = g->cc,
                  .c_type = ct, .ldc = g->n, .stride_c = g->m * g->n, .act = MOERT_EPI_NONE};
  c->b->gemm_ex(&x);
}

/* One point of the GEMM curve; false on failure. *took: seconds of a call. */
static bool gemm_point(cal *c, gemm_ctx *g, double *took) {
  double s = time_op(c, run_gemm, g);
  if (s < 0) return false;
  *took = s;
  if (c->out.npoints == MOERT_CALIB_MAX_POINTS || s <= 0) return true;
  moert_gemm_point *p = &c->out.points[c->out.npoints++];
  p->kind = g->kind;
  p->flops = 2.0 * (double)g->m * (double)g->n * (double)g->k * (double)g->count;
  p->flops_per_s = p->flops / s;
  return true;
}

/* The expert GEMMs of a layer of width M, hidden h (fc1: h1 columns) over
 * rows = 16, 64, ... up to max_rows; and the gate's (T x M x E). */
static bool measure_gemms(cal *c, int64_t M, int64_t h, int64_t h1, int64_t max_rows, int64_t T, int64_t E,
                          void *a, void *bb, void *cc) {
  for (int64_t rows = 16; rows <= max_rows; rows *= 4) {
    gemm_ctx shapes[] = {
        {MOERT_GEMM_NN, rows, h1, M, 1, a, bb, cc}, {MOERT_GEMM_NN, rows, M, h, 1, a, bb, cc},
        {MOERT_GEMM_TN, h, M, rows, 1, a, bb, cc},  {MOERT_GEMM_TN, M, h1, rows, 1, a, bb, cc},
        {MOERT_GEMM_NT, rows, h, M, 1, a, bb, cc},  {MOERT_GEMM_NT, rows, M, h1, 1, a, bb, cc},
    };
    double slowest = 0;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
      double s;
      MOERT_TRY(c->st, gemm_point(c, &shapes[i], &s));
      if (s > slowest) slowest = s;
    }
    if (slowest > CALL_LIMIT_S) break;
  }
  gemm_ctx gate[] = {{MOERT_GEMM_NN, T, E, M, 1, a, bb, cc},
                     {MOERT_GEMM_TN, M, E, T, 1, a, bb, cc},
                     {MOERT_GEMM_NT, T, M, E, 1, a, bb, cc}};
  for (size_t i = 0; i < sizeof gate / sizeof gate[0]; i++) {
    double s;
    MOERT_TRY(c->st, gemm_point(c, &gate[i], &s));
  }
  return true;
}

/* --- memory-bound kernels --- */

typedef struct kern_ctx {
  moert_kernel_kind kind;
  const moert_layer *l;
  int64_t T, K, E, C, M, n, hid;
  float *x, *y, *logits, *scores, *topv, *gate, *ssum, *top1, *dcoef, *dgate, *dlogits;
  int32_t *idx, *loc, *counts;
  void *buf, *dbuf, *h, *a;
} kern_ctx;

static void run_kernel(cal *c, void *p) {
  kern_ctx *k = p;
  moert_backend *b = c->b;
  switch (k->kind) {
  case MOERT_K_GATE: {
    moert_cpu_gate_io io = {.logits = k->logits, .scores = k->scores, .idx = k->idx, .loc = k->loc, .topv = k->topv,
                            .gate = k->gate, .counts = k->counts, .score_sum = k->ssum, .top1_count = k->top1,
                            .dscore_coef = k->dcoef, .global_tokens = (double)k->T, .normalize = k->l->normalize_gate};
    b->gate_fwd(&io, k->T, k->E, k->K);
    break;
  }
  case MOERT_K_GATE_BWD:
  {
    moert_cpu_gate_bwd_io io = {.scores = k->scores, .idx = k->idx, .topv = k->topv, .dgate = k->dgate,
                                .dlogits = k->dlogits, .normalize = k->l->normalize_gate};
    b->gate_bwd(&io, k->T, k->E, k->K);
    break;
  }
  case MOERT_K_DISPATCH:
    b->dispatch_t(c->dt, k->x, k->idx, k->loc, k->counts, k->C, k->buf, k->T, k->K, k->E, k->C, k->M);
    break;
  case MOERT_K_COMBINE: b->combine_t(c->dt, k->buf, k->idx, k->loc, k->gate, k->y, k->T, k->K, k->E, k->C, k->M); break;
  case MOERT_K_DISPATCH_BWD:
    b->dispatch_bwd_t(c->dt, k->dbuf, k->idx, k->loc, k->y, k->T, k->K, k->E, k->C, k->M);
    break;
  case MOERT_K_COMBINE_BWD:
    b->combine_bwd_t(c->dt, k->x, k->buf, k->idx, k->loc, k->counts, k->C, k->gate, k->dbuf, k->dgate, k->T, k->K, k->E,
                     k->C, k->M);
    break;
  case MOERT_K_ACT:
    if (k->l->act == MOERT_ACT_SWIGLU) b->swiglu_fwd_t(c->dt, k->h, k->a, k->n, k->hid);
    else b->act_fwd_t(c->dt, (moert_act)k->l->act, k->h, k->a, k->n * k->hid);
    break;
  case MOERT_K_COPY: b->copy_blocks_t(c->dt, k->a, k->hid, k->h, k->hid, k->n, k->hid, false); break;
  default: break;
  }
}

/* Elements the ACT and COPY measurements move (read + written). */
static double moved(const kern_ctx *k) {
  if (k->kind == MOERT_K_COPY) return 2.0 * k->n * k->hid;
  return (k->l->act == MOERT_ACT_SWIGLU ? 3.0 : 2.0) * k->n * k->hid;
}

/* --- all-to-all --- */

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* The least-squares slope and intercept of ys over xs. */
static void fit_line(const double *xs, const double *ys, int n, double *slope, double *icept) {
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (int i = 0; i < n; i++) {
    sx += xs[i];
    sy += ys[i];
    sxx += xs[i] * xs[i];
    sxy += xs[i] * ys[i];
  }
  *slope = (n * sxy - sx * sy) / (n * sxx - sx * sx);
  *icept = (sy - *slope * sx) / n;
}

/* alpha and beta of the linear all-to-all among this comm's ranks: t =
 * (W - 1) alpha + bytes (W - 1) / W / beta, least squares over sizes from
 * 1 KiB a peer to A2A_BYTES_* a rank (the machine's, not the model's: at small sizes the
 * latency and the noise of a busy machine hide the bandwidth). Each size keeps
 * the best of its repeats; a fit whose slope is not positive is measured again
 * with twice the repeats, three times at most, before it is an error. */
static bool measure_a2a(cal *c, float *send, float *recv, int64_t max_n) {
  moert_comm *comm = c->comm;
  moert_backend *b = c->b;
  int W = comm->world;
  double xs[16], ys[16], slope = 0, icept = 0;
  for (int round = 0, reps = 5; round < 3; round++, reps *= 2) {
    int npts = 0;
    for (int64_t n = 256; n <= max_n && npts < 16; n *= 4) {
      double best = INFINITY;
      for (int rep = 0; rep < reps; rep++) {
        MOERT_TRY(c->st, comm->barrier(comm, c->st));
        double t0 = now_s();
        MOERT_TRY(c->st, comm->all_to_all_f32(comm, send, recv, n, MOERT_A2A_LINEAR, c->st));
        float probe;
        MOERT_TRY(c->st, b->download(b, &probe, recv, sizeof probe, c->st)); /* the device has finished */
        double t = now_s() - t0;
        MOERT_TRY(c->st, comm->all_reduce_f64(comm, &t, 1, MOERT_RED_MAX, c->st));
        if (t < best) best = t;
      }
      double bytes = 4.0 * (double)n * W;
      xs[npts] = bytes * (W - 1) / W;
      ys[npts] = best;
      npts++;
    }
    fit_line(xs, ys, npts, &slope, &icept);
    if (slope > 0) break; /* the same on every rank: the times are all-reduced */
  }
  if (!(slope > 0)) return MOERT_FAIL(c->st, "the all-to-all times do not grow with size (slope %g, three "
                                      "tries): too noisy to fit; calibrate again on a quieter machine", slope);
  c->out.has_a2a = true;
  c->out.a2a_ranks = W;
  c->out.a2a_beta = 1 / slope;
  c->out.a2a_alpha_s = icept > 0 ? icept / (W - 1) : 0;
  return true;
}

/* --- the whole --- */

static void device_name(const moert_backend *b, int cores, char *out, size_t n) {
  if (b != moert_backend_cpu()) {
    const char *name = moert_backend_cuda_device_name(b);
    snprintf(out, n, "%s", name ? name : "a CUDA GPU");
    return;
  }
  char model[128] = "unknown CPU", line[256];
  FILE *f = fopen("/proc/cpuinfo", "r");
  while (f && fgets(line, sizeof line, f)) {
    char *colon = strchr(line, ':');
    if (strncmp(line, "model name", 10) == 0 && colon) {
      snprintf(model, sizeof model, "%s", colon + 2);
      model[strcspn(model, "\n")] = 0;
      break;
    }
  }
  if (f) fclose(f);
  snprintf(out, n, "cpu: %s, %d core%s a rank", model, cores, cores == 1 ? "" : "s");
}

#define ALLOC_(ptr, bytes)                                                                   \
  do {                                                                                       \
    void *p_;                                                                                \
    if (!b->alloc(b, (size_t)(bytes), &p_, st)) goto out;                                    \
    (ptr) = p_;                                                                              \
    bufs[nbufs++] = p_;                                                                      \
  } while (0)

static bool calibrate_on(const moert_model *m, const moert_run_opts *o, cal *c, moert_status *st) {
  moert_backend *b = c->b;
  bool ok = false;
  void *bufs[32];
  int nbufs = 0;
  moert_plan *plan = NULL;
  int64_t T = o->tokens;
  bool gpu = b != moert_backend_cpu();
  int64_t max_elems = gpu ? MAX_ELEMS_GPU : MAX_ELEMS_CPU;
  if (!moert_plan_create(m, 1, 0, T, m->train.has_train, &plan, st)) goto out;
  int64_t M = m->dim, H = 0, H1 = 0, E = 0, K = 0, C = 0, max_rows = 0;
  int li_first = -1;
  for (int li = 0; li < m->nlayers; li++) {
    const moert_layer *l = &m->layers[li];
    if (l->kind != MOERT_L_MOE) continue;
    int64_t h1 = l->act == MOERT_ACT_SWIGLU ? 2 * l->hidden : l->hidden, cap = moert_cost_capacity(plan, li);
    if (li_first < 0) li_first = li;
    if (h1 > H1) H1 = h1, H = l->hidden;
    if (l->experts > E) E = l->experts;
    if (l->top_k > K) K = l->top_k;
    if (cap > C) C = cap;
    if (l->experts * cap > max_rows) max_rows = l->experts * cap;
  }
  if (li_first < 0) {
    MOERT_FAIL(st, "--calibrate measures the shapes of a model's MoE layers, and `%s` has none; calibrate "
               "with a model that has one", m->name);
    goto out;
  }
  const moert_layer *l = &m->layers[li_first];
  int64_t wide = H1 > M ? H1 : M;
  max_rows *= 4; /* larger worlds send an expert more rows (S = 1: W C of each) */
  while (max_rows * wide > max_elems && max_rows > 16) max_rows /= 2;
  int64_t gemm_elems = max_rows * wide;
  if (M * H1 > gemm_elems) gemm_elems = M * H1;
  if (T * (E > M ? E : M) > gemm_elems) gemm_elems = T * (E > M ? E : M);
  void *ga, *gb, *gc;
  ALLOC_(ga, 4 * gemm_elems);
  ALLOC_(gb, 4 * gemm_elems);
  ALLOC_(gc, 4 * gemm_elems);
  /* values of the right type, as the path computes on (speed aside, NaNs) */
  b->fill_normal(ga, gemm_elems, 1, 1, 0, 0, 1);
  b->fill_normal(gb, gemm_elems, 1, 2, 0, 0, 1);
  if (c->dt == MOERT_BF16) {
    b->convert(gc, MOERT_BF16, ga, MOERT_F32, gemm_elems);
    b->copy_blocks_t(MOERT_BF16, ga, 0, gc, 0, 1, gemm_elems, false);
    b->convert(gc, MOERT_BF16, gb, MOERT_F32, gemm_elems);
    b->copy_blocks_t(MOERT_BF16, gb, 0, gc, 0, 1, gemm_elems, false);
  }
  /* the GEMM curve at every MoE layer's shape (a model made for
   * calibrating may hold several: bench/calib_gpu.moe) */
  for (int li = 0; li < m->nlayers; li++) {
    const moert_layer *x = &m->layers[li];
    if (x->kind != MOERT_L_MOE) continue;
    int64_t h1 = x->act == MOERT_ACT_SWIGLU ? 2 * x->hidden : x->hidden, seen = 0;
    for (int lj = 0; lj < li; lj++) {
      const moert_layer *y = &m->layers[lj];
      seen |= y->kind == MOERT_L_MOE && y->hidden == x->hidden && y->act == x->act && y->experts == x->experts;
    }
    if (seen) continue;
    int64_t rows = 4 * x->experts * moert_cost_capacity(plan, li), w = h1 > M ? h1 : M;
    while (rows * w > gemm_elems && rows > 16) rows /= 2;
    if (!measure_gemms(c, M, x->hidden, h1, rows, T, x->experts, ga, gb, gc)) goto out;
  }

  /* the gate, dispatch and combine at the model's T, E, k and C */
  kern_ctx k = {.l = l, .T = T, .K = K, .E = E, .C = C, .M = M};
  int64_t ecm = E * C * M;
  ALLOC_(k.x, 4 * T * M);
  ALLOC_(k.y, 4 * T * M);
  ALLOC_(k.logits, 4 * T * E);
  ALLOC_(k.scores, 4 * T * E);
  ALLOC_(k.dlogits, 4 * T * E);
  ALLOC_(k.topv, 4 * T * K);
  ALLOC_(k.gate, 4 * T * K);
  ALLOC_(k.dgate, 4 * T * K);
  ALLOC_(k.idx, 4 * T * K);
  ALLOC_(k.loc, 4 * T * K);
  ALLOC_(k.counts, 4 * E);
  ALLOC_(k.ssum, 4 * E);
  ALLOC_(k.top1, 4 * E);
  ALLOC_(k.dcoef, 4 * E);
  ALLOC_(k.buf, 4 * ecm);
  ALLOC_(k.dbuf, 4 * ecm);
  b->fill_normal(k.x, T * M, 1, 3, 0, 0, 1);
  b->fill_normal(k.logits, T * E, 1, 4, 0, 0, 1);
  b->fill_normal(k.dgate, T * K, 1, 5, 0, 0, 1);
  k.kind = MOERT_K_GATE;
  run_kernel(c, &k); /* idx and loc, as the gate makes them; claims past C dropped */
  b->drop_beyond(k.loc, T * K, C);
  for (int kind = 0; kind < MOERT_K__COUNT; kind++) {
    double bytes;
    k.kind = (moert_kernel_kind)kind;
    if (kind == MOERT_K_ACT || kind == MOERT_K_COPY) {
      /* the hidden rows of a chunk of the experts' input: [rows, H] */
      k.hid = kind == MOERT_K_ACT ? H : M;
      k.n = max_rows;
      k.h = ga;
      k.a = gc;
      bytes = c->es * moved(&k);
    } else {
      bytes = moert_cost_kernel_bytes((moert_kernel_kind)kind, T, K, E, C, M, c->es, 0);
    }
    double s = time_op(c, run_kernel, &k);
    if (s < 0) goto out;
    c->out.bw[kind] = bytes / (s > 1e-9 ? s : 1e-9);
  }
  /* the fixed cost of one op: a copy of one element */
  k.kind = MOERT_K_COPY;
  k.n = 1;
  k.hid = 1;
  double launch = time_op(c, run_kernel, &k);
  if (launch < 0) goto out;
  c->out.launch_s = launch;

  if (c->comm->world > 1 && c->comm->nodes == 1) {
    int64_t n = (gpu ? A2A_BYTES_GPU : A2A_BYTES_CPU) / 4 / c->comm->world; /* floats to each peer */
    void *sa, *sr;
    ALLOC_(sa, 4 * n * c->comm->world);
    ALLOC_(sr, 4 * n * c->comm->world);
    b->zero(sa, 4 * n * c->comm->world); /* the values do not matter to the time; defined bytes do */
    if (!measure_a2a(c, sa, sr, n)) goto out;
  }
  ok = true;
out:
  for (int i = nbufs - 1; i >= 0; i--) b->free(b, bufs[i]);
  moert_plan_destroy(plan);
  return ok;
}
#undef ALLOC_

static bool write_file(const char *path, const moert_calib *c, moert_status *st) {
  char tmp[4096];
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  FILE *f = fopen(tmp, "w");
  if (!f) return MOERT_FAIL(st, "cannot write %s: %s", tmp, strerror(errno));
  moert_calib_write(c, f);
  if (fclose(f) != 0) return MOERT_FAIL(st, "cannot write %s: %s", tmp, strerror(errno));
  if (rename(tmp, path) != 0) return MOERT_FAIL(st, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
  return true;
}

int moert_calibrate(const moert_model *m, const moert_run_opts *o, const char *path, int *argc, char ***argv,
                    const char *argv0) {
  moert_status st = {0};
  moert_comm *comm = moert_comm_self(), *host = comm;
  bool want_nccl = o->comm && strcmp(o->comm, "nccl") == 0;
  bool use_mpi = o->comm && !want_nccl ? strcmp(o->comm, "mpi") == 0 : moert_comm_under_mpirun();
  moert_backend *b = moert_backend_cpu();
  int rc = 1;
  if (use_mpi && !moert_comm_mpi_create(argc, argv, &comm, &st)) goto fail;
  host = comm;
  bool want_cuda = o->backend ? strcmp(o->backend, "cuda") == 0 : moert_cuda_available();
  if (want_cuda) {
    int gpus = moert_cuda_device_count();
    if (gpus < 1) {
      MOERT_FAIL(&st, "--backend cuda: no usable NVIDIA GPU was found; run with --backend cpu");
      goto fail;
    }
    if (!moert_backend_cuda_create(&b, host->host_rank % gpus, o->kernel_cache, !o->no_kernel_cache, m->kernels_cu,
                                   &st))
      goto fail;
    bool nccl = want_nccl;
    if (!o->comm && host->world > 1 && !moert_comm_nccl_fits(host, b, &nccl, &st)) goto fail;
    if (host->world > 1 && !(nccl ? moert_comm_nccl_create(host, b, &comm, &st)
                                  : moert_comm_staged_create(host, b, &comm, &st)))
      goto fail;
  }
  moert_backend_cpu_share_cores(comm->local_size);
  cal c = {.b = b, .comm = comm, .st = &st};
  c.dt = m->dtype == MOERT_DT_BF16 && b->bf16 ? MOERT_BF16 : MOERT_F32;
  c.es = moert_dt_size(c.dt);
  c.out.dtype_bytes = c.es;
  snprintf(c.out.backend, sizeof c.out.backend, "%s", b == moert_backend_cpu() ? "cpu" : "cuda");
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  int per_rank = (int)(cores > comm->local_size ? cores / comm->local_size : 1);
  device_name(b, per_rank, c.out.device, sizeof c.out.device);
  if (comm->world > 1 && comm->nodes > 1 && comm->rank == 0)
    fprintf(stderr, "%s: note: the ranks are on %d nodes; the all-to-all is measured only inside one node\n",
            argv0, comm->nodes);
  if (!calibrate_on(m, o, &c, &st)) goto fail;
  if (comm->rank == 0) {
    if (!write_file(path, &c.out, &st)) goto fail;
    if (!o->quiet)
      printf("calibration of %s (%s backend, %s expert path) written to %s: %d GEMM points%s\n", c.out.device,
             c.out.backend, c.es == 2 ? "bf16" : "fp32", path, c.out.npoints,
             c.out.has_a2a ? ", all-to-all alpha and beta" : "");
  }
  rc = 0;
  goto done;
fail:
  fprintf(stderr, "%s: error: %s\n", argv0, st.msg);
  if (getenv("MOEC_TRACE")) fprintf(stderr, "%s: trace: %s\n", argv0, st.trace);
  if (host->world > 1) {
    fflush(stderr);
    moert_comm_abort(host, 1);
  }
done:
  if (comm != host) comm->destroy(comm);
  if (b != moert_backend_cpu()) moert_backend_cuda_destroy(b);
  if (host != moert_comm_self()) moert_comm_mpi_finalize(host);
  return rc;
}
