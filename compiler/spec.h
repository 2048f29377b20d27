/* spec.h — a checked .moe spec with every default filled in: what sema makes
 * of the syntax tree, and what the printer, the summary and lowering
 * (lower.c) read. All memory comes from the compilation's arena. */
#ifndef MOEC_SPEC_H
#define MOEC_SPEC_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "ast.h"
#include "diag.h"


typedef enum {
#define DTYPE(k, s) MOEC_DTYPE_##k,
#include "spec.def"
#undef DTYPE
  MOEC_DTYPE__COUNT
} moec_dtype;
typedef enum {
#define ACT(k, s) MOEC_ACT_##k,
#include "spec.def"
#undef ACT
  MOEC_ACT__COUNT
} moec_act;
typedef enum {
#define GATE(k, s) MOEC_GATE_##k,
#include "spec.def"
#undef GATE
  MOEC_GATE__COUNT
} moec_gate;
typedef enum {
#define ROUTING(k, s) MOEC_ROUTING_##k,
#include "spec.def"
#undef ROUTING
  MOEC_ROUTING__COUNT
} moec_routing;
typedef enum {
#define A2A(k, s) MOEC_A2A_##k,
#include "spec.def"
#undef A2A
  MOEC_A2A__COUNT
} moec_a2a;
typedef enum {
#define SELECT(k, s) MOEC_SELECT_##k,
#include "spec.def"
#undef SELECT
  MOEC_SELECT__COUNT
} moec_select;
typedef enum {
#define OPTIM(k, s) MOEC_OPTIM_##k,
#include "spec.def"
#undef OPTIM
  MOEC_OPTIM__COUNT
} moec_optim;
typedef enum {
#define SCHED(k, s) MOEC_SCHED_##k,
#include "spec.def"
#undef SCHED
  MOEC_SCHED__COUNT
} moec_sched;
typedef enum {
#define LAYER(k, s, f) MOEC_LAYER_##k,
#include "spec.def"
#undef LAYER
  MOEC_LAYER__COUNT
} moec_layer_kind;

extern const char *const moec_dtype_names[MOEC_DTYPE__COUNT];
extern const char *const moec_act_names[MOEC_ACT__COUNT];
extern const char *const moec_gate_names[MOEC_GATE__COUNT];
extern const char *const moec_routing_names[MOEC_ROUTING__COUNT];
extern const char *const moec_a2a_names[MOEC_A2A__COUNT];
extern const char *const moec_select_names[MOEC_SELECT__COUNT];
extern const char *const moec_optim_names[MOEC_OPTIM__COUNT];
extern const char *const moec_sched_names[MOEC_SCHED__COUNT];
extern const char *const moec_layer_names[MOEC_LAYER__COUNT];

/* Limits, each with its reason. */
#define MOEC_MAX_REPEAT 4096          /* docs/LANGUAGE.md */
#define MOEC_MAX_CONTEXT 64           /* docs/LANGUAGE.md */
#define MOEC_MAX_PARAM_BYTES ((int64_t)1 << 40) /* docs/LANGUAGE.md: 1 TiB of weights */
/* Layers after `repeat` is expanded: every later stage holds per-layer data,
 * and no model we know of has more than a few thousand. */
#define MOEC_MAX_LAYERS ((int64_t)1 << 20)
/* Tokens per rank per step: claims, slots and counts are int32 on every
 * backend (runtime/model.h's MOERT_MAX_TOKENS, the same). */
#define MOEC_MAX_TOKENS 2147483647
/* Elements of one activation buffer of a rank (runtime/model.h's
 * MOERT_MAX_ACT_ELEMS, the same): 4 TiB of fp32. */
#define MOEC_MAX_ACT_ELEMS ((int64_t)1 << 40)
/* Experts per MoE layer: gating kernels keep per-expert counters in shared
 * memory, and the largest published MoE models use a few hundred. */
#define MOEC_MAX_EXPERTS 4096
/* Expert groups a layer may have (group-limited routing; the GPU gate keeps a
 * token's group scores in shared memory: templates/gating.cu). */
#define MOEC_MAX_GROUPS 256
/* Attention heads of one layer: the row widths (heads + 2 kv_heads) *
 * head_dim stay far from overflow, and the largest published models use a
 * few hundred. */
#define MOEC_MAX_HEADS 4096
/* The widest attention head (runtime/model.h's MOERT_MAX_HEAD_DIM, the same:
 * the kernels keep a head's row in registers). Head widths are multiples of
 * MOEC_HEAD_DIM_ALIGN: the kernels load a head's row 8 elements at a time. */
#define MOEC_MAX_HEAD_DIM 256
#define MOEC_HEAD_DIM_ALIGN 8
/* The cosine gate's projection width, as Tutel's CosineTopKGate. */
#define MOEC_COSINE_PROJ 256
/* `auto` in the adaptive_r list (0 and every divisor of S, at its place). */
#define MOEC_R_AUTO (-1)
/* Candidate values of the parallel lists. */
#define MOEC_MAX_CANDIDATES 16

typedef struct moec_moe {
  int64_t experts, hidden, top_k;
  double capacity_factor; /* > 0 fixed, 0 dropless, < 0 dynamic capped at |f| */
  moec_gate gate;
  moec_act act;
  double aux_loss;        /* weight of the GShard load-balancing loss */
  bool bias, normalize_gate, batch_prioritized;
  double gate_noise;
  /* today's routers (docs/LANGUAGE.md) */
  double route_scale;     /* the combine weights' factor */
  double bias_update;     /* the sigmoid gate's loss-free balancing step; 0: off */
  int64_t groups, top_groups; /* group-limited routing; 1, 1: off */
  double z_loss;          /* weight of the router z-loss */
  int64_t shared_experts; /* always-on experts: one dense FFN of shared_experts * hidden */
  moec_routing routing;
} moec_moe;

typedef struct moec_ffn {
  int64_t hidden;
  moec_act act;
} moec_ffn;

typedef struct moec_attention {
  int64_t heads, kv_heads, head_dim;
  bool head_dim_given;       /* false: dim / heads, set once `dim` is known */
  moec_loc heads_loc;        /* the `heads` value, for the default head_dim's rules */
  bool causal;
  double rope;               /* RoPE base; 0: no positions */
  bool bias;
} moec_attention;

typedef struct moec_layer {
  moec_layer_kind kind;
  const char *name;          /* MOE, FFN, ATTENTION: the name as written */
  moec_loc loc;              /* the layer's keyword */
  moec_moe moe;
  moec_ffn ffn;
  moec_attention attn;       /* ATTENTION */
  int64_t count;             /* REPEAT */
  struct moec_layer *body;   /* RESIDUAL, REPEAT */
  struct moec_layer *next;
} moec_layer;

typedef enum { MOEC_DATA_SYNTHETIC, MOEC_DATA_BYTES } moec_data_kind;

typedef struct moec_parallel {
  bool r_auto;                          /* `auto` listed */
  int64_t r[MOEC_MAX_CANDIDATES];       /* as written, in order; MOEC_R_AUTO for `auto`
                                           (the order matters: `select = fixed` takes the first) */
  int nr;
  int64_t degrees[MOEC_MAX_CANDIDATES];
  int ndegrees;
  moec_a2a a2a[MOEC_A2A__COUNT];
  int na2a;
  moec_select select;
  int64_t explore_steps;
} moec_parallel;

typedef struct moec_train {
  int64_t steps, seed;
  moec_optim optimizer;
  double lr, beta1, beta2, eps, weight_decay;
  int64_t warmup;
  moec_sched schedule;
  double clip;
  moec_data_kind data;
  const char *data_path;   /* MOEC_DATA_BYTES */
  int64_t eval_every;
  const char *checkpoint;  /* NULL: none */
  int64_t checkpoint_every, log_every;
  double label_smoothing;  /* the head's training targets; 0: none */
} moec_train;

typedef struct moec_spec {
  const char *name;
  moec_loc loc;
  int64_t dim, tokens;
  moec_loc tokens_loc;       /* the `tokens` value, for the whole-model size rules */
  moec_dtype dtype;
  int64_t vocab;   /* 0: no vocabulary (MSE against the teacher) */
  int64_t context;
  int64_t seq;     /* sequence length; 0: none (no attention) */
  moec_layer *layers;
  moec_parallel parallel;
  bool has_train;  /* false: an inference-only binary */
  moec_train train;
  moec_loc train_data_loc; /* the `data` item, for whole-model diagnostics */
  moec_loc smoothing_loc;  /* the `label_smoothing` value, likewise */
} moec_spec;

/* Checks a parsed file against every rule of docs/LANGUAGE.md, adding a
 * diagnostic for each violation, and returns the spec with every default
 * filled in; NULL when there was an error. */
moec_spec *moec_sema(moec_arena *a, moec_diags *d, const moec_stmt *file);

/* Parameters of one layer with everything inside it (a repeat's copies
 * included), saturating at INT64_MAX. */
int64_t moec_layer_params(const moec_spec *s, const moec_layer *l);
/* Parameters of the whole model: embedding and head included. */
int64_t moec_spec_params(const moec_spec *s);
/* Bytes per parameter of the spec's dtype. */
int moec_dtype_bytes(moec_dtype t);

/* Writes the spec in normal form, every default written out; the output is
 * itself a valid spec that prints to the same text. */
void moec_spec_print(const moec_spec *s, FILE *out);
/* The shortest decimal that reads back as the same double, always with a
 * `.` or an exponent (so it reads back as a number, not an integer). n >= 32. */
void moec_format_double(char *buf, size_t n, double v);
/* One paragraph about the model: layers, parameters, experts. */
void moec_spec_summary(const moec_spec *s, FILE *out);

#endif
