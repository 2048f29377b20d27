/* model.h — a lowered model: what the compiler hands the runtime.
 * `moec` lowers a checked spec into this description (compiler/lower.c) and
 * writes it into the generated driver as static data (compiler/emit_c.c); the
 * runtime plans buffers for the world size it finds (placement.c) and runs
 * it. The same placement code serves `moec plan`, so the plan a user reads is
 * the plan that runs. Pure data: no pointers to anything but constant arrays
 * and strings, so it can be emitted as a C initializer. */
#ifndef MOERT_MODEL_H
#define MOERT_MODEL_H

#include <stddef.h>
#include <stdint.h>

/* Layer kinds after lowering: repeats are expanded, residual blocks become
 * BEGIN/END markers, the embedding, head and losses are explicit. */
#define MOERT_LAYER_KINDS(X)                                                   \
  X(EMBED, "embed")         /* tokens -> sum of `context` embeddings */        \
  X(LAYERNORM, "layernorm")                                                    \
  X(RMSNORM, "rmsnorm")                                                        \
  X(FFN, "ffn")             /* dense M -> H -> M */                            \
  X(ATTENTION, "attention") /* self-attention within each sequence */          \
  X(MOE, "moe")                                                                \
  X(RES_BEGIN, "residual")  /* remember x */                                   \
  X(RES_END, "end")         /* x + f(x) */                                     \
  X(HEAD_XENT, "head")      /* logits = x W, cross-entropy on next token */    \
  X(MSE, "mse")             /* mean squared error against the teacher */

typedef enum {
#define X(k, s) MOERT_L_##k,
  MOERT_LAYER_KINDS(X)
#undef X
  MOERT_L__COUNT
} moert_layer_kind;

/* The same order as compiler/spec.def (the compiler checks this). */
typedef enum { MOERT_DT_BF16, MOERT_DT_FP32 } moert_dtype;
typedef enum { MOERT_GATE_SOFTMAX, MOERT_GATE_COSINE, MOERT_GATE_SIGMOID } moert_gate;
/* Who chooses: each token its top_k experts, or each expert its C tokens. */
typedef enum { MOERT_ROUTE_TOKEN_CHOICE, MOERT_ROUTE_EXPERT_CHOICE } moert_routing;
/* A layer's activation. tanh: not a layer's (the language has none); the
 * synthetic regression data's teacher, computed on a device (data.h). */
typedef enum { MOERT_ACT_RELU, MOERT_ACT_GELU, MOERT_ACT_SILU, MOERT_ACT_SWIGLU, MOERT_ACT_TANH } moert_act;
typedef enum { MOERT_OPT_SGD, MOERT_OPT_ADAM } moert_optim;
typedef enum { MOERT_SCHED_CONSTANT, MOERT_SCHED_COSINE } moert_sched;
typedef enum { MOERT_A2A_LINEAR, MOERT_A2A_2DH } moert_a2a_algo;
typedef enum { MOERT_SELECT_AUTO, MOERT_SELECT_FIXED, MOERT_SELECT_PREDICTED } moert_select_mode;

/* How a parameter is initialized, from the counter-based generator keyed by
 * (seed, parameter index, element's global index): identical at every world
 * size, whatever slice a rank holds. */
typedef enum {
  MOERT_INIT_ZEROS,
  MOERT_INIT_ONES,
  MOERT_INIT_UNIFORM, /* U(-scale, scale) */
  MOERT_INIT_NORMAL,  /* N(0, scale^2) */
  MOERT_INIT_CONST,   /* every element = scale */
} moert_init;

/* How a parameter is laid out over ranks (placement.c). */
typedef enum {
  MOERT_PLACE_REPLICATED, /* whole on every rank; gradients all-reduced */
  MOERT_PLACE_EXPERT_IN,  /* [E, M, Hx]: experts over ranks, sharded along the last dim */
  MOERT_PLACE_EXPERT_BIAS,/* [E, Hx]: as EXPERT_IN */
  MOERT_PLACE_EXPERT_OUT, /* [E, H, M]: experts over ranks, sharded along the middle dim */
  MOERT_PLACE_EXPERT_REP, /* [E, M]: experts over ranks, whole on each shard (fc2 bias) */
} moert_place;

#define MOERT_MAX_DIMS 3
/* Tokens per rank per step: claims, slots and counts are int32 on every
 * backend (compiler/spec.h's MOEC_MAX_TOKENS, the same). */
#define MOERT_MAX_TOKENS 2147483647
/* Elements of one activation buffer of a rank ([tokens, dim], [tokens,
 * vocab], [tokens, hidden], ...): 4 TiB of fp32, past any device, and far
 * from int64's overflow in the plan's sums. */
#define MOERT_MAX_ACT_ELEMS ((int64_t)1 << 40)
/* The widest attention head (the language's limit; the kernels' too). */
#define MOERT_MAX_HEAD_DIM 256
/* The most parameter slots a layer kind has (runtime/layer.h). */
#define MOERT_MAX_SLOTS 16

/* The width of the cosine gate's projection (runtime/moe.c): a row width of
 * its kernels, which kernels.cu specializes. */
#define MOERT_COSINE_PROJ 256

typedef struct moert_param {
  const char *name;       /* "layer.what": the checkpoint's tensor name */
  int ndim;
  int64_t shape[MOERT_MAX_DIMS]; /* global shape */
  moert_init init;
  double scale;
  moert_place place;
  int layer;              /* index into moert_model.layers */
  int swiglu_halves;      /* EXPERT_IN/BIAS of swiglu fc1: the last dim is two halves of H */
  int frozen;             /* not trained (a sigmoid gate's bias): no gradient, no optimizer step */
} moert_param;

typedef struct moert_layer {
  moert_layer_kind kind;
  const char *name;       /* expanded name: `experts__0`, `rmsnorm_3` */
  int param_first, nparams;
  /* FFN, MOE */
  int64_t hidden;
  moert_act act;
  /* MOE */
  int64_t experts, top_k;
  double capacity_factor;
  moert_gate gate;
  double aux_loss;
  int bias, normalize_gate, batch_prioritized;
  double gate_noise;
  int moe_index;          /* 0, 1, ... over the MoE layers */
  /* today's routers (docs/LANGUAGE.md): the combine weights' factor [1];
   * the sigmoid gate's loss-free balancing step [0: off]; group-limited
   * routing [1, 1]; the router z-loss's weight [0]; always-on experts [0];
   * token or expert choice */
  double route_scale, bias_update;
  int64_t groups, top_groups;
  double z_loss;
  int64_t shared_experts;
  moert_routing routing;
  /* ATTENTION (bias above: its projections' biases) */
  int64_t heads, kv_heads, head_dim;
  int causal;
  double rope;            /* RoPE base; 0: no positions */
} moert_layer;

typedef struct moert_parallel {
  int r_auto;
  int nr;
  const int64_t *r;       /* candidates in order; -1 stands for `auto` */
  int ndegrees;
  const int64_t *degrees;
  int na2a;
  const int *a2a;         /* moert_a2a_algo */
  moert_select_mode select;
  int64_t explore_steps;
} moert_parallel;

typedef struct moert_train {
  int has_train;
  int64_t steps, seed;
  moert_optim optimizer;
  double lr, beta1, beta2, eps, weight_decay;
  int64_t warmup;
  moert_sched schedule;
  double clip;
  const char *data_path;  /* NULL: synthetic */
  int64_t eval_every;
  const char *checkpoint; /* NULL: none */
  int64_t checkpoint_every, log_every;
  double label_smoothing; /* the head's training targets; 0: none */
} moert_train;

typedef struct moert_model {
  const char *name;
  const char *spec_file;  /* as given to moec, for the header */
  int64_t dim, tokens, vocab, context;
  int64_t seq;            /* sequence length; 0: no sequences (no attention) */
  moert_dtype dtype;
  int nlayers;
  const moert_layer *layers;
  int nparams;
  const moert_param *params;
  int nmoe;
  moert_parallel parallel;
  moert_train train;
  /* kernels.cu as moec emitted it for this model (compiler/emit_cuda.c): the
   * templates and kernels specialized on the layers' dims, compiled by the
   * cuda backend; NULL: the runtime's own templates, unspecialized. */
  const char *kernels_cu;
  /* the device calibration `moec build --gpu` embedded (runtime/cost.h's
   * JSON) and where it came from; NULL: none (select = predicted fails) */
  const char *calibration, *calibration_source;
} moert_model;

extern const char *const moert_layer_kind_names[MOERT_L__COUNT];
/* The spellings of moert_act, moert_gate and moert_routing (the plan's JSON). */
extern const char *const moert_act_names[], *const moert_gate_names[], *const moert_routing_names[];

#endif
