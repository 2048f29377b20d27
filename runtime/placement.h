/* placement.h — the plan of a model at a world size: which slice of every
 * parameter a rank holds, and the offset of every buffer a step uses. Pure C
 * (no CUDA, no MPI): `moec plan --ranks W` and the runtime run this same code,
 * so the plan a user reads is the plan that runs.
 *
 * Memory is a few pools, each one allocation carved by offsets (llm.c's
 * malloc_and_point_parameters): parameters, gradients and optimizer state in
 * flat fp32 buffers with the same offsets; saved activations (floats and
 * int32s); backward scratch, reused by every layer. Nothing is allocated
 * inside a step. Offsets are in elements, aligned to MOERT_ALIGN. */
#ifndef MOERT_PLACEMENT_H
#define MOERT_PLACEMENT_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "model.h"
#include "status.h"

/* Every buffer starts on a multiple of this many elements (256 bytes of
 * fp32): the GPU's 16-byte vector loads and cuBLASLt want aligned operands. */
#define MOERT_ALIGN 64

/* Saved float buffers of a layer (forward results the backward pass reads). */
#define MOERT_FBUFS(X)                                                          \
  X(OUT)      /* [T, M] the layer's output (RES_BEGIN: none, it is its input) */ \
  X(MEAN) X(RSTD)                          /* norms: [T] */                     \
  X(H) X(A)                                /* ffn: [T, H1], [T, H] */           \
  X(LOGITS) X(SCORES) X(NOISE)             /* moe gate: [T, E] */               \
  X(PROJ) X(PROJN) X(PROJNORM) X(SIMN) X(SIMNORM) X(RAW) /* cosine gate */      \
  X(TOPV) X(GATE)                          /* [T, k] (expert choice: [T, E]) */ \
  X(RSTAT)                                 /* moe router sums [2]: z, entropy */ \
  X(SRC) X(SRCY)  /* [E, C, M] this rank's tokens per expert, and their outputs */ \
  X(EX) X(EH) X(EA) /* expert side: the rows this rank computes, [rows, M|H1|H] */ \
  X(GW)           /* expert parameters gathered for variants with r < S */       \
  X(SSUM) X(TOP1) X(DCOEF)                 /* load statistics [E] */            \
  X(TARGET)                                /* mse: [T, M] teacher output */     \
  X(HLOGITS)                               /* head: [T, V] */                   \
  X(QKV) X(AO) X(LSE)  /* attention: [T, (H + 2 KV) D] after RoPE, [T, H D], [T, H] */
/* Saved int32 buffers. */
#define MOERT_IBUFS(X) X(IDX) X(LOC) X(ORDER) X(COUNTS) X(WIN) X(TOKENS)
/* Backward scratch of a layer (offsets into the shared scratch pool). */
/* Scratch of a layer (offsets into the shared scratch pool, used within one
 * layer's forward or backward): token exchange in transit (XS, XR: to the
 * experts; YS, YR: back), gradients, expert outputs. */
#define MOERT_SBUFS(X)                                                                         \
  X(DX) X(DH) X(DA) X(DLOGITS) X(DGATE) X(DPROJN) X(DPROJ) X(DSIMN) X(DSIM) \
  X(DRAW) X(XS) X(XR) X(YS) X(YR) X(EY) X(DSRCY) X(DSRC) X(DEX) X(DEH) X(DEA) X(DGW) X(GT1) X(GT2)       \
  X(XB) X(DYB) /* ffn of a bf16 model: its input and output gradient as bf16, [T, M]; XB the head's input */ \
  X(DLB)       /* the head of a bf16 model: d logits as bf16, [T, vocab] */ \
  X(DQKV) X(DAO) X(ASCR) /* attention: d qkv, d attention output, the core's scratch */

typedef enum {
#define X(n) MOERT_F_##n,
  MOERT_FBUFS(X)
#undef X
  MOERT_F__COUNT
} moert_fbuf;
typedef enum {
#define X(n) MOERT_I_##n,
  MOERT_IBUFS(X)
#undef X
  MOERT_I__COUNT
} moert_ibuf;
typedef enum {
#define X(n) MOERT_S_##n,
  MOERT_SBUFS(X)
#undef X
  MOERT_S__COUNT
} moert_sbuf;

/* A way to run a MoE layer (docs/DESIGN.md, "Parallelism, as Tutel defines it"):
 * r = 0 data parallel (experts gathered whole, tokens stay), r >= 1 experts
 * split over r ranks along H with tokens in S/r chunks; d pipeline chunks;
 * the all-to-all algorithm. Every variant uses the same parameter layout. */
typedef struct moert_variant {
  int r, d;
  moert_a2a_algo a2a;
  char name[40];            /* "r=1,d=2,a2a=linear" */
  double send_bytes;        /* tokens and parameters this rank sends per step (fwd + bwd) */
  double flops;             /* expert FLOPs this rank executes per step (fwd + bwd, padded) */
  int64_t mem_bytes;        /* this variant's buffers on this rank */
} moert_variant;

#define MOERT_MAX_VARIANTS 64

typedef struct moert_param_plan {
  int ndim;
  int64_t shape[MOERT_MAX_DIMS]; /* local shape on this rank */
  int64_t offset;                /* into the parameter, gradient and state buffers */
  int64_t count;                 /* local elements */
  /* the slice of the global tensor held here (experts only): experts
   * [e_first, e_first + e_count), and along H the columns [h_first, h_first +
   * h_count) of each half (two halves for swiglu's fc1) */
  int64_t e_first, e_count, h_first, h_count;
} moert_param_plan;

typedef struct moert_layer_plan {
  int slot[MOERT_MAX_SLOTS]; /* the parameter (index) in each slot of the kind (layer.h), -1: none */
  int64_t f[MOERT_F__COUNT]; /* offsets, -1 if the layer has no such buffer */
  int64_t i[MOERT_I__COUNT];
  int64_t s[MOERT_S__COUNT];
  int64_t capacity_bound;    /* MOE: the largest capacity C the buffers hold (padded) */
  int64_t experts_local;     /* MOE: experts (or expert slices) on this rank */
  int64_t shards;            /* MOE: S, ranks per expert (1 when E >= W) */
  int64_t hidden_local;      /* MOE: H / S */
  int64_t align;             /* MOE: C is padded to a multiple of this (all candidates fit) */
  int nvariants;             /* MOE: the candidates at this world size, in the spec's order */
  moert_variant variants[MOERT_MAX_VARIANTS];
  char dropped[256];         /* MOE: candidates the spec lists that do not exist here, and why */
  double flops_fwd;          /* model FLOPs of the forward pass on this rank */
  double flops_bwd;
  int64_t act_bytes;         /* saved activations, as planned (fp32 on the cpu) */
  int64_t params;            /* local parameter elements */
} moert_layer_plan;

typedef struct moert_plan {
  const moert_model *model;
  int world, rank;
  int64_t tokens;            /* per rank */
  moert_param_plan *params;  /* [model->nparams] */
  moert_layer_plan *layers;  /* [model->nlayers] */
  int64_t param_elems;       /* size of the parameter (= gradient) buffer */
  int64_t repl_elems;        /* the replicated parameters come first: [0, repl_elems) */
  int64_t trained_elems;     /* then the experts'; the frozen ones (replicated) after: [trained_elems, param_elems) */
  int64_t state_elems;       /* optimizer state: 2x params for adam, 0 for sgd */
  int64_t act_elems;         /* saved float activations */
  int64_t int_elems;         /* saved int32 activations */
  int64_t scratch_elems;     /* backward scratch */
  int max_res_depth;         /* residual nesting: skip-gradient buffers needed */
  int64_t global_params;     /* parameters of the whole model */
  double flops_fwd, flops_bwd;
} moert_plan;

/* Plans model for `world` ranks as seen from `rank`, with `tokens` tokens per
 * rank (the spec's, unless the run overrides it). Fails, with a message that
 * names the fix, when the world size does not fit the model (E and W must
 * divide one another; hidden divisible by the shard count). The plan is
 * malloc'ed; moert_plan_destroy frees it. */
bool moert_plan_create(const moert_model *model, int world, int rank, int64_t tokens,
                       bool training, moert_plan **out, moert_status *st);
/* The same, knowing how many nodes the ranks are on (2dh needs several). */
bool moert_plan_create_nodes(const moert_model *model, int world, int rank, int64_t tokens,
                             bool training, int nodes, moert_plan **out, moert_status *st);
void moert_plan_destroy(moert_plan *p);

/* Capacity C of a MoE layer for the per-rank token count and the largest
 * claim count (dropless and dynamic modes; ignored for fixed), as Tutel:
 * the slots that keep tokens. The buffers use C rounded up to the layer's
 * alignment (moert_round_up). */
int64_t moert_capacity(const moert_layer *l, int64_t tokens, int64_t max_claims);
int64_t moert_round_up(int64_t n, int64_t align);
/* Index in the global tensor of element k of this rank's slice of param g. */
uint64_t moert_global_index(const moert_param *g, const moert_param_plan *pp, int64_t k);
/* The variant of layer plan lp called name ("r=1,d=2,a2a=linear"), or -1. */
int moert_variant_find(const moert_layer_plan *lp, const char *name);

/* s as a JSON string, quoted and escaped, to out (the plan's printers). */
void moert_json_str(FILE *out, const char *s);
/* Prints the plan for a person (json = false) or as the stable JSON
 * documented in docs/PLAN.md. */
void moert_plan_print(const moert_plan *p, FILE *out, bool json);
/* The same, with more: called at the end (JSON: after "layers", for more
 * top-level keys, the first of which it writes after a comma already
 * written; text: after the totals). */
typedef void (*moert_plan_more)(void *ctx, FILE *out, bool json);
void moert_plan_print_with(const moert_plan *p, FILE *out, bool json, moert_plan_more more, void *ctx);
/* Bytes of this rank's pools: parameters, gradients (training), optimizer
 * state, saved activations and scratch (what moert_plan_print totals). */
int64_t moert_plan_memory_bytes(const moert_plan *p, bool training);

extern const char *const moert_fbuf_names[MOERT_F__COUNT];
extern const char *const moert_ibuf_names[MOERT_I__COUNT];

#endif
