/* cost.h — the cost model of a plan (docs/PLAN.md, "The cost model"): for
 * every MoE layer and variant, the predicted time of its forward and
 * backward, split into terms (expert GEMMs, gate, dispatch and combine, the
 * exchange's layout copies, all-to-all with its intra- and inter-node
 * phases, what pipelining degree d overlaps, parameter gathers, the
 * replicated gradients' all-reduce), from the plan's per-variant shapes,
 * a calibration of the device (measured by `./model --calibrate`, read
 * here) and network constants (alpha-beta per phase). Pure C and jansson,
 * like placement.c: `moec plan` and the runtime's selector run this same
 * code. */
#ifndef MOERT_COST_H
#define MOERT_COST_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "placement.h"
#include "status.h"

/* GEMM kinds a calibration measures (the expert path's: forward NN, the
 * weight gradients TN, the input gradients NT). */
#define MOERT_GEMM_KINDS(X) X(NN, "nn") X(TN, "tn") X(NT, "nt")
typedef enum {
#define X(k, s) MOERT_GEMM_##k,
  MOERT_GEMM_KINDS(X)
#undef X
  MOERT_GEMM__COUNT
} moert_gemm_kind;

/* Memory-bound kernels a calibration measures, by the bytes
 * moert_cost_kernel_bytes says each one moves. */
#define MOERT_KERNELS(X)                                                      \
  X(GATE, "gate")               /* gate_fwd: softmax, top-k, locations */    \
  X(GATE_BWD, "gate_bwd")                                                     \
  X(DISPATCH, "dispatch")       /* tokens into [E, C, M] */                  \
  X(COMBINE, "combine")         /* [E, C, M] back to tokens, gate-weighted */ \
  X(DISPATCH_BWD, "dispatch_bwd")                                             \
  X(COMBINE_BWD, "combine_bwd")                                               \
  X(ACT, "act")                 /* the activation of the hidden rows */      \
  X(COPY, "copy")               /* copy_blocks: the exchange's layouts */
typedef enum {
#define X(k, s) MOERT_K_##k,
  MOERT_KERNELS(X)
#undef X
  MOERT_K__COUNT
} moert_kernel_kind;

/* At most this many measured GEMM points: a few token counts of a few
 * models' shapes is some dozens. */
#define MOERT_CALIB_MAX_POINTS 256

typedef struct moert_gemm_point {
  moert_gemm_kind kind;
  double flops;       /* 2 m n k count: the size of one call */
  double flops_per_s; /* measured */
} moert_gemm_point;

/* A device's calibration (the JSON of docs/PLAN.md, "Calibration"). */
typedef struct moert_calib {
  char device[160];     /* what was measured: "NVIDIA H100 80GB HBM3", "cpu: 2 cores ..." */
  char backend[16];     /* "cpu", "cuda" */
  char source[200];     /* where it was read from (a path, or "built in: ...") */
  int dtype_bytes;      /* the expert path's element size when measured: 4 fp32, 2 bf16 */
  int npoints;
  moert_gemm_point points[MOERT_CALIB_MAX_POINTS];
  double bw[MOERT_K__COUNT]; /* bytes per second */
  double launch_s;      /* the fixed cost of one kernel or op */
  bool has_a2a;         /* all-to-all measured among ranks of one node */
  int a2a_ranks;
  double a2a_alpha_s, a2a_beta; /* seconds per message, bytes per second */
} moert_calib;

/* Parses a calibration's JSON text; `where` names it in messages. Fails
 * with what is wrong, where, and what to do. */
bool moert_calib_parse(const char *text, const char *where, moert_calib *c, moert_status *st);
/* Reads and parses the file at path; text (NULL: not wanted) gets its
 * contents, malloc'ed, for the caller to free. */
bool moert_calib_load(const char *path, moert_calib *c, char **text, moert_status *st);
/* Writes c as that JSON (what `--calibrate` writes; moert_calib_parse reads it). */
void moert_calib_write(const moert_calib *c, FILE *out);
/* Seconds of one GEMM call of `flops` (2 m n k count) of kind k: the
 * throughput interpolated (piecewise linear in log flops, flat beyond the
 * ends) between the measured points of that kind, plus the launch cost. */
double moert_calib_gemm_s(const moert_calib *c, moert_gemm_kind k, double flops);

/* The network (docs/PLAN.md, "Network constants"): bytes per second and
 * seconds per message. */
typedef struct moert_net {
  double nvlink;        /* per GPU, per direction, inside a node */
  double ib;            /* per node, per direction, across nodes */
  double alpha_intra, alpha_inter;
  double overlap;       /* fraction of the shorter of a2a and compute that d chunks can hide (0..1) */
  int ranks_per_node;
} moert_net;

/* H100 SXM defaults (docs/PLAN.md gives the sources), 8 ranks a node. */
void moert_net_defaults(moert_net *n);
/* Applies "key=value,..." (nvlink=450GB/s, ib=8x400Gb/s, alpha_intra=3us,
 * alpha_inter=10us, overlap=1) to n; nvlink=measured and alpha_intra=measured
 * take calibration c's all-to-all fit (c NULL or without one: an error).
 * Units: B/s, KB/s, MB/s, GB/s, b/s, Kb/s, Mb/s, Gb/s, "Nx" multiplies
 * (decimal prefixes); s, ms, us, ns. */
bool moert_net_parse(const char *spec, const moert_calib *c, moert_net *n, moert_status *st);

/* Terms of a variant's predicted time, seconds per step (forward, and
 * backward when training). They add up to the total; OVERLAP is what
 * pipelining hides (negative or zero). */
#define MOERT_COST_TERMS(X)                                                   \
  X(EXPERTS, "experts")           /* expert GEMMs and activation */          \
  X(GATE, "gate")                 /* the gate's GEMMs and kernels */         \
  X(DISPATCH, "dispatch_combine") /* dispatch and combine, fwd and bwd */    \
  X(LAYOUT, "layout")             /* the exchange's packing copies */        \
  X(A2A, "a2a")                   /* the token all-to-alls */                \
  X(OVERLAP, "overlap")           /* hidden by d chunks in flight */         \
  X(GATHER, "param_gather")       /* expert parameters gathered, grads scattered */ \
  X(ALLREDUCE, "grad_allreduce")  /* the layer's replicated gradients */
typedef enum {
#define X(k, s) MOERT_COST_##k,
  MOERT_COST_TERMS(X)
#undef X
  MOERT_COST__COUNT
} moert_cost_term;
extern const char *const moert_cost_term_names[MOERT_COST__COUNT];

typedef struct moert_cost {
  double t[MOERT_COST__COUNT];
  double total;
  double a2a_intra, a2a_inter; /* the all-to-alls' phases (their parts of A2A) */
  int64_t capacity;            /* the C predicted with */
} moert_cost;

/* One all-to-all in which every rank sends `bytes` in all (its own block
 * included) to W ranks, G a node: linear (every peer directly; its intra-
 * and inter-node messages run at once, so it takes the longer) or 2dh
 * (inside the node, then across, one after the other; its layout copies not
 * included). *intra and *inter get the phases' times; returns the total. */
double moert_cost_a2a(moert_a2a_algo algo, double bytes, int world, const moert_net *n, double *intra,
                      double *inter);
/* A ring all-gather (or reduce-scatter) of `bytes` in all over a group of g
 * consecutive ranks; all-reduce is twice that. */
double moert_cost_ring(double bytes, int g, const moert_net *n);
/* Bytes kernel k moves for a MoE layer of T tokens, top-k K, E experts,
 * capacity C, width M, expert element size es (`n` elements for ACT and
 * COPY, whose T, K, E, C are unused). The calibration's bandwidths are these
 * bytes over measured seconds, so shapes it measured predict exactly. */
double moert_cost_kernel_bytes(moert_kernel_kind k, int64_t T, int64_t K, int64_t E, int64_t C, int64_t M,
                               int es, double n);

/* The capacity the prediction assumes for layer li: a fixed capacity as
 * it runs; dropless or dynamic, balanced routing (k ceil(T/E)); padded to
 * the layer's alignment, at most the bound. */
int64_t moert_cost_capacity(const moert_plan *p, int li);
/* Predicts variant v of MoE layer li at capacity C (0: moert_cost_capacity). */
void moert_cost_variant(const moert_plan *p, int li, int v, int64_t C, const moert_calib *c, const moert_net *n,
                        bool training, moert_cost *out);
/* The layer's variants sorted by predicted time (fastest first) into order
 * [nvariants], their costs into cost (may be NULL). */
void moert_cost_order(const moert_plan *p, int li, int64_t C, const moert_calib *c, const moert_net *n,
                      bool training, int *order, moert_cost *cost);

/* Prints every MoE layer's prediction (json: the "prediction" object of
 * docs/PLAN.md, times in integer nanoseconds). */
void moert_cost_print(const moert_plan *p, const moert_calib *c, const moert_net *n, bool training, FILE *out,
                      bool json);

#endif
