/* layer.h — a layer kind, described in one place. Each kind of model.h's
 * MOERT_LAYER_KINDS has one descriptor (runtime/layers/<kind>.c): its
 * parameters as named slots (shape, placement, init), its buffers and FLOPs
 * in the plan, the kernels kernels.cu specializes for it, its forward and
 * backward on the executor, and which gradients its backward writes whole.
 * The compiler's lowering (compiler/lower.c), the plan (placement.c), the
 * executor (step.c), the printers and emit_cuda.c read the descriptor; none
 * of them keeps a list of kinds.
 *
 * Parameters are addressed by slot, never by position: a layer's parameters
 * are its present slots in slot order (lower.c makes them so), the plan
 * resolves each slot to its parameter once (moert_layer_plan.slot) and
 * checks the model's names and shapes against the descriptor, so a model
 * whose parameters disagree with the runtime's slots is refused with a
 * message instead of read wrong.
 *
 * The descriptors are compiled twice: into the runtime, whole, and into the
 * compiler with MOERT_LAYER_DESCRIBE_ONLY, without the executor's part
 * (exec, NULL there), so moec links no executor. */
#ifndef MOERT_LAYER_H
#define MOERT_LAYER_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "model.h"
#include "placement.h"
#include "status.h"

/* The kernels that kernels.cu specializes (kernel_specs.def). */
typedef enum {
#define SPEC(op, key) MOERT_SPEC_##op,
#include "kernel_specs.def"
#undef SPEC
  MOERT_SPEC__COUNT
} moert_spec_id;

/* One specialization a layer needs: the spec and its constants (b unused by
 * one-constant keys). */
typedef struct moert_spec_use {
  moert_spec_id spec;
  long long a, b;
} moert_spec_use;

/* The most specializations a layer has. */
#define MOERT_MAX_LAYER_SPECS 12

/* What a kind's plan function plans into: the layer's plan (buffer offsets,
 * FLOPs; MoE: variants and capacity), through moert_plan_f/i/s. */
typedef struct moert_plan_ctx {
  const moert_model *m;
  const moert_layer *l;
  moert_layer_plan *lp;
  moert_plan *p;
  int64_t T;       /* tokens per rank */
  int world, nodes;
  bool training;
  int64_t *ftop, *itop, *stop;
  int *depth;      /* residual nesting at this layer */
} moert_plan_ctx;

/* Plans a saved float buffer, int32 buffer or scratch buffer of n elements
 * for the layer (placement.c). */
void moert_plan_f(moert_plan_ctx *c, moert_fbuf b, int64_t n);
void moert_plan_i(moert_plan_ctx *c, moert_ibuf b, int64_t n);
void moert_plan_s(moert_plan_ctx *c, moert_sbuf b, int64_t n);

struct moert_exec;

/* Flags of a kind. */
enum {
  MOERT_LF_OUTPUT = 1 << 0,     /* its OUT buffer is the next layer's input */
  MOERT_LF_SWAP = 1 << 1,       /* its backward writes d input into dnext (then swapped into dcur) */
  MOERT_LF_NO_BWD = 1 << 2,     /* no backward work (a loss: its forward wrote dcur) */
  MOERT_LF_RES_OPEN = 1 << 3,   /* opens a residual block: its input is the skip path */
  MOERT_LF_RES_CLOSE = 1 << 4,  /* closes one: adds the skip path */
  MOERT_LF_COMPUTE = 1 << 5,    /* a layer of the model's own (the header counts them) */
  MOERT_LF_OWN_SEGMENTS = 1 << 6, /* runs its own graph segments (MoE: per variant and capacity) */
  MOERT_LF_UNTRACED_FWD = 1 << 7, /* no span of its own in the forward */
  MOERT_LF_UNTRACED_BWD = 1 << 8, /* nor in the backward */
};

typedef struct moert_layer_ops {
  const char *name;              /* the kind's name in the plan and trace */
  unsigned flags;
  /* Parameter slots: names in slot order ("fc1_w": the tensor `LAYER.fc1_w`). */
  int nslots;
  const char *const *slots;
  /* Fills p (ndim, shape, init, scale, place, swiglu_halves) for slot s of
   * layer l of a model of dims m (dim, vocab, context: all that is read);
   * false when l has no such slot (a bias turned off, the other gate). */
  bool (*slot)(const moert_model *m, const moert_layer *l, int s, moert_param *p);
  /* Buffers, scratch and FLOPs of the layer; false with a message in st
   * when the world size does not fit it. NULL: none. */
  bool (*plan)(moert_plan_ctx *c, moert_status *st);
  /* The widest of its activations, in elements per token (MOERT_MAX_ACT_ELEMS
   * bounds tokens times this). NULL: dim. */
  int64_t (*row)(const moert_model *m, const moert_layer *l);
  /* The kernels.cu specializations it launches, in launch order; their
   * number (at most MOERT_MAX_LAYER_SPECS). NULL: none. */
  int (*specs)(const moert_model *m, const moert_layer *l, moert_spec_use *u);
  /* Its dims for a person ("E = 8, k = 2, M = 512, H = 2048, gate softmax")
   * into buf. */
  void (*describe)(const moert_model *m, const moert_layer *l, char *buf, size_t n);
  /* The plan's printers: the "output / experts" column, and JSON fields
   * after the common ones (", \"hidden\": 64"). NULL: [T, M], none. */
  void (*plan_shape)(const moert_plan *p, int li, char *buf, size_t n);
  void (*plan_json)(const moert_plan *p, int li, FILE *out);
  /* The executor's part (NULL in the compiler). forward: reads e->xin[li]
   * (a residual end also e->res_in[li]), writes its buffers; backward: reads
   * e->dcur, writes e->dnext (MOERT_LF_SWAP) and adds or writes its
   * gradients. Without MOERT_LF_OWN_SEGMENTS both only enqueue device work
   * (a graph segment each). */
  bool (*fwd)(struct moert_exec *e, int li, int64_t step, bool want_grad, moert_status *st);
  bool (*bwd)(struct moert_exec *e, int li, moert_status *st);
  /* Whether the backward writes slot s's gradient whole (beta 0) before
   * anything adds to it (the step does not zero those). NULL: none. */
  bool (*grad_written)(const moert_layer *l, int s);
  /* Generation one token at a time (moert_exec_decode), for a kind whose
   * output at a token depends on the tokens before it (attention); NULL
   * for both: its forward on the token's row alone serves. decode_state:
   * the elements (of the executor's storage type e->xdt) the layer keeps
   * between tokens, a key/value cache; moert_exec_decode_begin allocates
   * them once and zeroes them at each start, at e->dec.state[li]. decode:
   * the layer's forward of the token at position pos (0, 1, ... from the
   * start) on its one row e->xin[li] (e->rows is 1), reading and updating
   * that state, its output where fwd leaves it; enqueues device work only
   * (the position changes its arguments at every token: never a graph). */
  int64_t (*decode_state)(const moert_model *m, const moert_layer *l);
  bool (*decode)(struct moert_exec *e, int li, int64_t pos, moert_status *st);
} moert_layer_ops;

/* The compiler's copies (MOERT_LAYER_DESCRIBE_ONLY) have names of their
 * own, so a program that links both the compiler's library and the
 * runtime's (the tests) runs the runtime's. */
#ifdef MOERT_LAYER_DESCRIBE_ONLY
#define MOERT_LAYER_OPS(k) moert_layer_##k##__describe
#define moert_layer_ops_of moert_layer_ops_of__describe
#define moert_layer_resolve_slots moert_layer_resolve_slots__describe
#define moert_layer_widest_row moert_layer_widest_row__describe
#else
#define MOERT_LAYER_OPS(k) moert_layer_##k
#endif

/* The descriptor of a kind. */
const moert_layer_ops *moert_layer_ops_of(moert_layer_kind kind);

/* Resolves every layer's slots to parameter indices (lp->slot, -1 where the
 * layer has no such slot) and checks the model against the descriptors:
 * each layer's parameters are its present slots in order, named
 * `LAYER.SLOT`, of the descriptor's shape, init and placement. A model that
 * disagrees is refused, naming the first difference. */
bool moert_layer_resolve_slots(const moert_model *m, moert_plan *p, moert_status *st);

/* The widest activation of m's layers, in elements per token (each kind's
 * row, at least dim): tokens times this is bounded by MOERT_MAX_ACT_ELEMS,
 * which the compiler's lowering and the plan both check with it. */
int64_t moert_layer_widest_row(const moert_model *m);

/* The kinds, each kind's descriptor (runtime/layers/). */
#define X(k, s) extern const moert_layer_ops MOERT_LAYER_OPS(k);
MOERT_LAYER_KINDS(X)
#undef X

#endif
