/* moe.h — a MoE layer on the executor: gating, the capacity shared by all
 * variants, and every parallelism variant of docs/DESIGN.md (r = 0 data
 * parallel, r | S expert/model parallel with S/r token chunks, d pipeline
 * chunks whose all-to-all overlaps the expert FFN, linear or 2dh
 * all-to-all). All variants read and write the same buffers and parameters;
 * a switch is the choice of another code path, nothing else. */
#ifndef MOERT_MOE_H
#define MOERT_MOE_H

#include "exec.h"

/* A MoE layer's parameter slots (layer.h), in order: the cosine gate's or
 * the softmax and sigmoid gates' (with the sigmoid gate's bias, which is
 * frozen: the balancing, not gradients, moves it), then the experts' (the
 * biases when `bias`), then the shared experts' (`shared_experts` > 0: one
 * dense FFN of shared_experts * hidden, replicated). */
#define MOERT_MOE_SLOTS(X)                                                      \
  X(GATE_PROJ_W, "gate_proj_w") X(GATE_PROJ_B, "gate_proj_b")                   \
  X(GATE_SIM, "gate_sim") X(GATE_TEMP, "gate_temp") /* cosine */                \
  X(GATE_W, "gate_w")                               /* softmax, sigmoid */      \
  X(GATE_BIAS, "gate_bias")                         /* sigmoid */               \
  X(FC1_W, "fc1_w") X(FC1_B, "fc1_b") X(FC2_W, "fc2_w") X(FC2_B, "fc2_b")       \
  X(SHARED_FC1_W, "shared_fc1_w") X(SHARED_FC1_B, "shared_fc1_b")               \
  X(SHARED_FC2_W, "shared_fc2_w") X(SHARED_FC2_B, "shared_fc2_b")
typedef enum {
#define X(n, s) MOERT_MOE_##n,
  MOERT_MOE_SLOTS(X)
#undef X
  MOERT_MOE__SLOTS
} moert_moe_slot;

/* A token's gate slots ([T, slots] idx, loc, topv, gate): its top_k
 * choices, or with expert choice one for each expert (loc -1 where the
 * expert did not take the token). */
static inline int64_t moert_moe_slots_per_token(const moert_layer *l) {
  return l->routing == MOERT_ROUTE_EXPERT_CHOICE ? l->experts : l->top_k;
}

/* The sub-communicators the layers' variants need (expert groups, H-slice
 * classes), made once, collectively, in layer order. */
bool moert_moe_setup(moert_exec *e, moert_status *st);
/* Whether every MoE layer's expert path can be stored as bf16: each
 * collective over it moves whole floats, so M and every H / S must be even.
 * Otherwise the model computes its experts in fp32 (said in the header). */
bool moert_moe_bf16_fits(const moert_model *m, const moert_plan *plan);
void moert_moe_teardown(moert_exec *e);
/* Forward of MoE layer li on input x (e->rows tokens), with the variant in
 * e->variant[li] (chosen by pick(li, bucket) once the capacity is known);
 * output in the layer's OUT buffer. */
bool moert_moe_fwd(moert_exec *e, int li, const float *x, int64_t step, moert_status *st);
/* The statistics of the last forward that stayed on the device, read once
 * at the step's end: each MoE layer's claim counts (e->load, e->routed,
 * e->dropped against the capacity it kept) and its aux loss (the weighted
 * sum into e->aux). */
bool moert_moe_read_stats(moert_exec *e, moert_status *st);
/* DeepSeek-V3's loss-free balancing, after a training step's update: each
 * layer with bias_update > 0 moves its gate's bias by bias_update *
 * sign(mean load - load_e), the loads (the last forward's claims) summed
 * over ranks, so the bias is the same on every rank and at every world size. */
bool moert_moe_balance(moert_exec *e, moert_status *st);
/* The sigmoid gate's bias of MoE layer li (E floats) into host memory
 * `out`; a layer without one (softmax, cosine) fills it with zeros. */
bool moert_moe_gate_bias(moert_exec *e, int li, float *out, moert_status *st);
/* Backward: reads e->dcur (d output), writes e->dnext (d input), adds the
 * parameter gradients. */
bool moert_moe_bwd(moert_exec *e, int li, moert_status *st);

#endif
