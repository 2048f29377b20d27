/* exec.h — running a planned model: forward, loss, backward and update on a
 * backend, with collectives on a comm. One executor per process; every
 * buffer is allocated when it is created (the plan's pools) and nothing is
 * allocated inside a step. */
#ifndef MOERT_EXEC_H
#define MOERT_EXEC_H

#include <stdbool.h>
#include <stdint.h>

#include "backend.h"
#include "comm.h"
#include "data.h"
#include "placement.h"
#include "trace.h"

typedef struct moert_step_stats {
  double loss;        /* task loss, mean over all global tokens */
  double aux_loss;    /* weighted sum of the MoE aux losses */
  double z_loss;      /* weighted sum of the MoE router z-losses (added to the objective as aux_loss) */
  double grad_norm;   /* before clipping */
  double lr;
  double dropped;     /* fraction of routed (token, choice) claims dropped */
  double flops;       /* model FLOPs of the step, all ranks */
  double update_ms;   /* the optimizer's update (timing marks: on a device, its time on the GPU) */
  bool skipped;       /* the loss or the gradient norm was not finite: no update was applied */
} moert_step_stats;

/* Chooses the variant of MoE layer li for this step, once its padded
 * capacity is known (the same on every rank); returns an index into the
 * layer plan's variants. */
typedef int (*moert_pick_fn)(void *ctx, int li, int64_t capacity, int64_t step);

typedef struct moert_subcomm {
  int64_t shards, r;  /* (S, 0): the expert group; (S, r): the H-slice class of r */
  moert_comm *comm;
} moert_subcomm;

/* The executor's state. The fields up to `opts` are step.c's (made at
 * create, written by the step), but for the timing marks of MoE layers
 * (layer_marks), which moe.c makes, and wlow_fresh, which whoever writes
 * the parameters clears (a checkpoint load). The groups after it say whose
 * they are. */
typedef struct moert_exec {
  const moert_model *m;
  moert_plan *plan;
  moert_backend *b;
  moert_comm *comm;
  bool training;
  uint64_t seed;
  /* pools */
  float *params, *grads, *state, *act, *scratch;
  /* The expert path's storage type: bf16 for a bf16 model on a backend
   * that keeps it in bf16 (then wlow holds the parameters as bf16, rounded
   * from the fp32 masters), else fp32. The optimizer writes wlow in the same
   * pass as the update; a forward rounds it from the masters only when
   * wlow_fresh is false: after create and a checkpoint load, and wherever
   * else params are written (a caller that writes them clears it). */
  moert_dt xdt;
  void *wlow;
  bool wlow_fresh;
  /* On a device, the synthetic regression data's teacher (moert_exec_use_data):
   * its weights and a scratch of teacher_rows rows; NULL: targets come from
   * the host. */
  float *teacher_w1, *teacher_w2, *teacher_h;
  int64_t teacher_rows, teacher_hidden;
  int32_t *iact;
  float *input;       /* [T, M] model input (regression) */
  float *dcur, *dnext;/* [T, M] gradient of the current layer's output / input */
  float **skip;       /* [max_res_depth] skip-path gradients, [T, M] each */
  const float **xin;  /* [nlayers] input of each layer in the last forward */
  const float **stack;/* residual inputs during forward */
  /* The ranges of the gradient buffer a step zeroes (offset, count in
   * floats; merged, by offset): every parameter's but those the backward
   * writes whole before adding to them (weights of dense FFNs, the head and
   * the experts: their first GEMM runs with beta 0). */
  int64_t (*zero_runs)[2];
  int nzero_runs;
  /* Values of the last forward left in backend memory, read at the step's
   * end (moert_moe_read_stats, step.c): the loss sum and each MoE layer's
   * aux loss, [nlayers] (aux_h: their host copy, made at create). */
  double *dloss;
  float *daux, *aux_h;
  /* The gradient norm on the device (step.c's grad_norm): sums of squares
   * [nparams + 1], the expert part as two floats [2], the norm [1] and the
   * clipping factor [1] the optimizer scales the gradients by. */
  double *dnorm_part, *dnorm;
  float *dhilo, *dclip;
  int64_t rows;       /* tokens of the current forward (<= plan tokens) */
  double *layer_ms;   /* [nlayers] each MoE layer's time in the last step (fwd + bwd) */
  /* Timing marks of the backend (backend.h), resolved once at the end of a
   * step: its first mark, the wall clock (moert_trace_now) when it was made,
   * and each MoE layer's forward and backward begin and end (-1: none). */
  int mark0;
  double anchor_us;
  int *layer_marks;   /* [4 nlayers] */
  /* A held-out evaluation or sampling: each MoE layer runs the variant of its
   * last forward and asks pick nothing (the selector's cycle and exploration
   * belong to the steps; an evaluation must not take a step's turn) */
  bool repeat_variants;
  int64_t step;             /* the step being run, for the trace */
  /* Steps whose loss or gradient norm was not finite: their update was not
   * applied, and the optimizer's own step count (AdamW's bias correction) is
   * the step less these. Saved in and restored from checkpoints. */
  int64_t skipped;
  /* The step, where the backend's ops read it (the gate noise of a graph). */
  int64_t *dstep;
  /* dcur and dnext as each step begins (a step's swaps then give every layer
   * the same buffers each step, which a graph's pointers need). */
  float *dbuf[2];
  /* [nlayers]: each residual end's skip input in the forward, and each
   * residual layer's skip gradient buffer in the backward (set before the
   * layer's work, which reads them) */
  const float **res_in;
  float **res_grad;
  /* Set by the caller (run.c, tests) after create and before the steps; the
   * executor only reads them. */
  struct {
    int64_t total_steps;    /* of the run, for the learning-rate schedule */
    moert_pick_fn pick;     /* chooses each MoE layer's variant; NULL: the first candidate */
    void *pick_ctx;
    moert_trace *trace;     /* NULL: no trace */
    bool routing_stats;     /* the gates take their entropy (a routing trace is kept) */
  } opts;
  /* What the MoE layers did in the last forward: written by moe.c alone
   * (step.c allocates the arrays), read by the step, the run and tests. */
  struct {
    int64_t *capacity;      /* [nlayers] the padded C each MoE layer used */
    int64_t *keep;          /* [nlayers] the claims each kept per expert (<= C) */
    int *variant;           /* [nlayers] the variant each ran */
    double *load;           /* per MoE layer, E claim counts of this rank's tokens */
    double *load_sum;       /* the same summed over ranks, when load_summed: the */
    bool load_summed;       /* balancing summed them this step (no second sum) */
    double routed, dropped; /* claims routed and dropped, all MoE layers */
    double aux;             /* the weighted sum of their aux losses */
    double z;               /* the weighted sum of their router z-losses */
    /* [nlayers], per MoE layer, this rank's: claims routed and dropped, and
     * the sum over its tokens of the gate's entropy (nats; of the softmax
     * scores, or of the sigmoid scores normalized over the experts) */
    double *layer_routed, *layer_dropped, *entropy;
    moert_subcomm subcomms[16]; /* the expert groups and H-slice classes (moert_moe_setup) */
    int nsubcomms;
  } moe;
  /* Generation with a cache (moert_exec_decode), step.c's: each layer's
   * decode state in backend memory ([nlayers], NULL where its kind keeps
   * none; layer.h's decode_state), the position of the next token, and
   * whether the forward running is a decode. */
  struct {
    void **state;
    int64_t pos;
    bool on;
  } dec;
  /* CUDA graphs (moert_exec_segment), step.c's alone: why they are off
   * (NULL: on where no trace is kept): MOEC_CUDA_GRAPHS=0, a backend without
   * them, or a comm whose collectives cannot be captured. The segments seen,
   * and counts for the run's summary. */
  struct {
    const char *off;
    struct moert_segment *segs;
    int nsegs;
    int64_t captures, launches, fallbacks;
  } graphs;
} moert_exec;

/* A stretch of a step's device work (a layer's forward or backward, in one
 * variant and at one capacity; li -1: the zeroing of the gradients, or their
 * sum over ranks and norm), for CUDA graphs. Equal keys enqueue the same work
 * with the same arguments at every step. */
typedef struct moert_seg_key {
  int32_t li, kind, variant;
  int32_t flags; /* what else changes the work: want_grad (dense layers), gate noise (MoE layers) */
  int64_t capacity, rows;
} moert_seg_key;
enum { MOERT_SEG_FWD, MOERT_SEG_BWD, MOERT_SEG_GATE, MOERT_SEG_ZERO, MOERT_SEG_NORM };

/* Runs fn(e, ctx, st), which only enqueues device work (it must not read the
 * device back, allocate, or change host state that later steps need), as a
 * CUDA graph where graphs are on: the first run of a key runs fn itself
 * (NCCL connects, cuBLAS picks algorithms, the first timing is of the work
 * itself), the second captures it into a graph and launches that, later runs
 * only launch it. A capture that fails (an op that cannot be captured) says
 * so once on stderr and that key runs fn itself from then on. */
typedef bool (*moert_seg_fn)(moert_exec *e, void *ctx, moert_status *st);
bool moert_exec_segment(moert_exec *e, const moert_seg_key *key, moert_seg_fn fn, void *ctx, moert_status *st);

/* Bytes the executor allocates on this rank: the plan's pools (parameters;
 * gradients and optimizer state when training; saved activations; scratch)
 * and its [T, M] token buffers. What the header calls "on this rank". */
int64_t moert_exec_bytes(const moert_plan *plan, bool training);

/* The words that begin a backend's message when an allocation finds the
 * device full (backend_cuda.c's cuda_alloc). */
#define MOERT_OOM_PREFIX "out of GPU memory"

/* Records the out-of-memory failure of this rank: what the plan needs here
 * (and of what), what the device (device: its name, or NULL) has free and in
 * all, and what to change to fit. When st already holds a backend's failure
 * that begins with MOERT_OOM_PREFIX, its message is replaced by this one
 * (the trace kept); another earlier failure is left alone. Returns false. */
bool moert_exec_oom(const moert_plan *plan, bool training, const char *device, double free_bytes,
                    double total_bytes, moert_status *st);

/* Allocates every pool of the plan and initializes the parameters from the
 * seed (identical at every world size). A backend's out-of-memory failure
 * comes back as moert_exec_oom's message. */
bool moert_exec_create(moert_exec **out, const moert_model *m, moert_plan *plan, moert_backend *b,
                       moert_comm *comm, bool training, uint64_t seed, moert_status *st);
void moert_exec_destroy(moert_exec *e);
/* Before the first step: on a device backend, a regression model's targets
 * are computed there (the teacher's weights uploaded once) rather than on the
 * host, whose GEMMs would take far longer than the step. Nothing elsewhere. */
bool moert_exec_use_data(moert_exec *e, const moert_data *d, moert_status *st);

/* One training step on the batch of `step` (1-based): forward, loss,
 * backward, gradient norm and clipping, optimizer update. The loss and the
 * global gradient norm (the same on every rank) are read before the update:
 * when either is not finite the update is not applied (parameters, optimizer
 * state and bf16 copies stay as they were), out->skipped is set and
 * e->skipped counts it; the caller decides whether the run goes on. */
bool moert_exec_train_step(moert_exec *e, moert_data *d, int64_t step, moert_step_stats *out,
                           moert_status *st);
/* Forward only: the loss of a batch (eval: the held-out batch; for an
 * inference binary, the step's batch). */
bool moert_exec_eval(moert_exec *e, moert_data *d, int64_t step, bool eval, double *loss,
                     moert_status *st);
/* Logits of the next token after each of `n` windows (n <= tokens), for
 * sampling text: out is [n, vocab] on the host. */
bool moert_exec_logits(moert_exec *e, const int32_t *win, int64_t n, float *out, moert_status *st);
/* Generation one token at a time, each step costing one token's forward:
 * decode_begin allocates the layers' decode state (attention: a key/value
 * cache of `seq` rows per layer) on the backend once, and at every call
 * empties it and sets the position to 0. decode then runs the forward of one
 * token, its embedding window win[context] (as moert_exec_logits takes
 * them), at the next position, and writes the logits of the token after it
 * into out [vocab] (host). Each attention layer attends to its cached rows
 * of the tokens so far, the token's own included, each rotated by RoPE at its
 * position (0, 1, ...). The cache is a ring of the last `seq` tokens: up to
 * seq tokens, the logits are those of a whole-sequence forward at that
 * position (moert_exec_logits on the sequence's windows, where its MoE
 * layers drop no claim: one token never overflows); past seq, each
 * attention layer sees the last seq tokens' rows, at their positions relative
 * to each other (RoPE's scores depend on nothing else): for one attention
 * layer, the logits of the last row of a forward over the window of those seq
 * tokens; with several, the cached rows of a deeper layer are those computed
 * when each token was the newest (a sliding window, not a re-run over it). */
bool moert_exec_decode_begin(moert_exec *e, moert_status *st);
bool moert_exec_decode(moert_exec *e, const int32_t *win, float *out, moert_status *st);
/* Forward and backward on the batch of `step` without an update: *objective
 * is the task loss plus the weighted aux losses (what the gradients are of),
 * the gradients are in e->grads. For gradient checks. */
bool moert_exec_objective(moert_exec *e, moert_data *d, int64_t step, bool want_grad,
                          double *objective, moert_status *st);
/* The learning rate of a step (warm-up and schedule). */
/* After a step that out->skipped: where the non-finite values started, the
 * same on every rank (a collective: every rank calls it). *layer receives
 * the first layer, in forward order, whose saved output holds a non-finite
 * value on some rank; when every output is finite, the first layer in
 * backward order with a non-finite parameter gradient, and *in_grad is set;
 * -1 when neither (the loss layer's own arithmetic). Downloads the buffers
 * one layer at a time through the backend. */
bool moert_exec_find_nonfinite(moert_exec *e, int *layer, bool *in_grad, moert_status *st);
double moert_lr_at(const moert_train *t, int64_t step, int64_t steps);

#endif
