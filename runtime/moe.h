/* moe.h — a MoE layer on the executor: gating, the capacity shared by all
 * variants, and every parallelism variant of docs/DESIGN.md (r = 0 data
 * parallel, r | S expert/model parallel with S/r token chunks, d pipeline
 * chunks whose all-to-all overlaps the expert FFN, linear or 2dh
 * all-to-all). All variants read and write the same buffers and parameters;
 * a switch is the choice of another code path, nothing else. */
#ifndef MOERT_MOE_H
#define MOERT_MOE_H

#include "exec.h"

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
/* Whether the backward writes the gradient of the layer's parameter k (its
 * index among the layer's) whole before anything is added to it, in every
 * variant: the expert weights (fc1_w, fc2_w), whose first GEMM runs with
 * beta 0; the step does not zero those. */
bool moert_moe_grad_written(const moert_layer *l, int k);
/* The statistics of the last forward that stayed on the device, read once
 * at the step's end: each MoE layer's claim counts (e->load, e->routed,
 * e->dropped against the capacity it kept) and its aux loss (the weighted
 * sum into e->aux). */
bool moert_moe_read_stats(moert_exec *e, moert_status *st);
/* Backward: reads e->dcur (d output), writes e->dnext (d input), adds the
 * parameter gradients. */
bool moert_moe_bwd(moert_exec *e, int li, moert_status *st);

#endif
