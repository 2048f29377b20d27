/* cpu_ops.h — the ops of the cpu backend: fp32, row-major, single-threaded
 * (GEMMs through CBLAS when the build found it). The numerical reference of
 * moec: every GPU op is compared against these.
 *
 * Conventions. Shapes are given as dimensions in the argument list; a tensor
 * [R, C] is R rows of C contiguous floats. Forward ops write their outputs
 * (=). Backward ops write the gradient of their input (=) unless the comment
 * says "accumulates" (+=): parameter gradients always accumulate, so one
 * parameter used several times (or over several micro-batches) sums up.
 * Nothing allocates; scratch, where needed, is passed in.
 *
 * MoE routing follows Tutel: top-k on (noisy) softmax scores; capacity
 * locations by a running count per expert, all first choices before all
 * second choices; gates applied when combining ("post-score"); the GShard
 * load-balancing loss on the top-1 choice. */
#ifndef MOERT_CPU_OPS_H
#define MOERT_CPU_OPS_H

#include <stdbool.h>
#include <stdint.h>

#include "model.h" /* moert_act */


/* --- dense --- */

/* C = alpha * op(A) @ op(B) + beta * C, op(X) = X or X^T; op(A) is [m, k],
 * op(B) is [k, n], C is [m, n]; lda/ldb/ldc are row strides as stored. */
void moert_cpu_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                    const float *a, int64_t lda, const float *b, int64_t ldb, float beta,
                    float *c, int64_t ldc);
/* count GEMMs as above, the i-th on a + i*stride_a, b + i*stride_b, c + i*stride_c. */
void moert_cpu_gemm_batched(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                            float alpha, const float *a, int64_t lda, int64_t stride_a,
                            const float *b, int64_t ldb, int64_t stride_b, float beta, float *c,
                            int64_t ldc, int64_t stride_c, int64_t count);
/* y[r, :] += bias, y is [rows, cols]. */
void moert_cpu_bias_add(float *y, const float *bias, int64_t rows, int64_t cols);
/* Accumulates dbias[c] += sum_r dy[r, c]. */
void moert_cpu_bias_grad(float *dbias, const float *dy, int64_t rows, int64_t cols);

/* a = act(h) elementwise, act in relu, gelu (tanh form), silu, tanh; n elements. */
void moert_cpu_act_fwd(moert_act act, const float *h, float *a, int64_t n);
/* dh = da * act'(h). */
void moert_cpu_act_bwd(moert_act act, const float *h, const float *da, float *dh, int64_t n);
/* swiglu: h is [rows, 2*hid]; a[r, j] = silu(h[r, j]) * h[r, hid + j], a is [rows, hid]. */
void moert_cpu_swiglu_fwd(const float *h, float *a, int64_t rows, int64_t hid);
/* dh [rows, 2*hid] from da [rows, hid]. */
void moert_cpu_swiglu_bwd(const float *h, const float *da, float *dh, int64_t rows, int64_t hid);

/* --- norms (eps: layernorm 1e-5, rmsnorm 1e-6, passed by the caller) --- */

/* y = (x - mean) * rstd * g + b per row; saves mean[rows], rstd[rows]. */
void moert_cpu_layernorm_fwd(const float *x, const float *g, const float *b, float *y, float *mean,
                             float *rstd, int64_t rows, int64_t dim, float eps);
/* dx written; dg, db accumulate. */
void moert_cpu_layernorm_bwd(const float *x, const float *g, const float *mean, const float *rstd,
                             const float *dy, float *dx, float *dg, float *db, int64_t rows,
                             int64_t dim);
/* y = x * rstd * g, rstd = 1/sqrt(mean(x^2) + eps); saves rstd[rows]. */
void moert_cpu_rmsnorm_fwd(const float *x, const float *g, float *y, float *rstd, int64_t rows,
                           int64_t dim, float eps);
/* dx written; dg accumulates. */
void moert_cpu_rmsnorm_bwd(const float *x, const float *g, const float *rstd, const float *dy,
                           float *dx, float *dg, int64_t rows, int64_t dim);

/* --- gating --- */

/* Cosine gate pieces (Tutel's CosineTopKGate): rows of x_proj and columns of
 * the similarity matrix are L2-normalized, y = x / max(||x||, 1e-12). */
void moert_cpu_l2norm_rows_fwd(const float *x, float *y, float *norm, int64_t rows, int64_t cols);
void moert_cpu_l2norm_rows_bwd(const float *x, const float *norm, const float *dy, float *dx,
                               int64_t rows, int64_t cols);
void moert_cpu_l2norm_cols_fwd(const float *x, float *y, float *norm, int64_t rows, int64_t cols);
void moert_cpu_l2norm_cols_bwd(const float *x, const float *norm, const float *dy, float *dx,
                               int64_t rows, int64_t cols);

/* scores = softmax(logits + noise) over each row of [tokens, experts];
 * noise may be NULL. Then the top_k largest scores of each row, in
 * descending order (ties: the lower expert index first): idx[t*k + j] and
 * their scores topv[t*k + j]. */
void moert_cpu_gate_topk(const float *logits, const float *noise, float *scores, int32_t *idx,
                         float *topv, int64_t tokens, int64_t experts, int64_t top_k);
/* Combine weights: gate = topv, or topv / max(sum_j topv, 1e-9) per token
 * when normalize. */
void moert_cpu_gate_normalize(const float *topv, float *gate, int64_t tokens, int64_t top_k,
                              bool normalize);
/* dtopv from dgate (the inverse of the above). */
void moert_cpu_gate_normalize_bwd(const float *topv, const float *dgate, float *dtopv,
                                  int64_t tokens, int64_t top_k, bool normalize);
/* Slot of each (token, choice) in its expert's buffer, before any capacity
 * is applied: the running count of earlier claims on that expert, counting
 * all choice-0 claims of all tokens, then all choice-1 claims, and so on.
 * Tokens are visited in order, or, when order is not NULL, in the order
 * order[0..tokens) (batch-prioritized routing: tokens sorted by their top
 * score, descending; see moert_cpu_gate_priority_order). counts[e] receives
 * the total number of claims on expert e (all choices). */
void moert_cpu_gate_locations(const int32_t *idx, const int32_t *order, int32_t *loc,
                              int32_t *counts, int64_t tokens, int64_t experts, int64_t top_k);
/* order = token indices sorted by topv[t*k + 0] descending, stable. */
void moert_cpu_gate_priority_order(const float *topv, int32_t *order, int64_t tokens,
                                   int64_t top_k);
/* Load statistics for the GShard loss, accumulated: score_sum[e] += sum_t
 * scores[t, e]; top1_count[e] += #{t : idx[t*k] == e}. */
void moert_cpu_gate_stats(const float *scores, const int32_t *idx, float *score_sum,
                          float *top1_count, int64_t tokens, int64_t experts, int64_t top_k);
/* GShard aux loss from global statistics over global_tokens tokens:
 * me = score_sum / N, ce = top1_count / N, loss = E * sum_e me_e * ce_e.
 * Returns the loss; dscore_coef[e] = d loss / d scores[t, e] for every
 * token t (the same for all tokens) = E * ce_e / N. */
float moert_cpu_aux_loss(const float *score_sum, const float *top1_count, float *dscore_coef,
                         int64_t experts, double global_tokens);
/* dscores[t, e] accumulates: dtopv scattered to their experts, plus
 * weight * dscore_coef[e] for every token when dscore_coef is not NULL. */
void moert_cpu_gate_scores_bwd(const int32_t *idx, const float *dtopv, const float *dscore_coef,
                               float weight, float *dscores, int64_t tokens, int64_t experts,
                               int64_t top_k);
/* dlogits = softmax backward of scores: s * (ds - sum(ds * s)) per row. */
void moert_cpu_softmax_bwd(const float *scores, const float *dscores, float *dlogits, int64_t rows,
                           int64_t cols);

/* The gate after its logits, as one op (a device runs it as two kernels):
 * gate_topk; gate_normalize of topv into gate; when order is not NULL, the
 * batch-prioritized order (gate_priority_order) into it, which
 * gate_locations then follows; the load statistics of gate_stats, written
 * (not accumulated); and when aux_out is not NULL (the statistics are then
 * global already: one rank), moert_cpu_aux_loss of them over global_tokens
 * into *aux_out (where the data lives) and dscore_coef.
 *
 * Today's routers (docs/LANGUAGE.md), each off when its fields are zero:
 *  sigmoid      scores = sigmoid(logits + noise) (else softmax); the aux
 *               statistics then use the scores normalized over the experts
 *  bias         [experts]: choices are made on scores + bias; topv, the
 *               combine weights and the statistics use the scores alone
 *  groups       > 1: the experts in `groups` equal groups; a token ranks
 *               the groups by the sum of its two best (biased) scores in
 *               each (ties: the lower group), keeps the top_groups best and
 *               takes its top_k within them
 *  route_scale  the combine weights are gate_normalize's times this (0 is
 *               taken as 1)
 *  ec_capacity  > 0: expert choice. top_k must equal experts: slot (t, e)
 *               is expert e's (idx = e); each expert takes the
 *               min(ec_capacity, tokens) tokens of highest score (ties: the
 *               lower token; the bias is not used: it is the same down an
 *               expert's column) at loc = its rank among them, the rest get
 *               loc = -1; topv = the score, gate = topv * route_scale (no
 *               normalizing), counts = the tokens taken; order is the cpu's
 *               scratch ([tokens], required there; a device ignores it);
 *               top1_count counts each token's best-scored expert
 *  z_sum        [1] or NULL: written with the sum over tokens of
 *               logsumexp(logits + noise)^2 (ST-MoE's router z-loss)
 *  entropy_sum  [1] or NULL: written with the sum over tokens of the
 *               entropy (nats) of the softmax scores, or of the sigmoid
 *               scores normalized over the experts */
typedef struct moert_cpu_gate_io {
  const float *logits, *noise; /* [tokens, experts]; noise may be NULL */
  float *scores;               /* [tokens, experts] */
  int32_t *idx, *loc;          /* [tokens, top_k] */
  float *topv, *gate;          /* [tokens, top_k] */
  int32_t *order;              /* [tokens] or NULL */
  int32_t *counts;             /* [experts] */
  float *score_sum, *top1_count, *dscore_coef; /* [experts] */
  float *aux_out;              /* NULL: no aux loss here */
  double global_tokens;
  bool normalize;
  bool sigmoid;
  const float *bias;
  int64_t groups, top_groups;
  float route_scale;
  int64_t ec_capacity;
  float *z_sum, *entropy_sum;
} moert_cpu_gate_io;
void moert_cpu_gate_fwd(const moert_cpu_gate_io *g, int64_t tokens, int64_t experts, int64_t top_k);
/* The gate's backward after combine_bwd, as one op: dlogits (written) =
 * the activation's backward (softmax, or sigmoid: s (1 - s)) of the scores'
 * gradient, which is the sum of
 *  - the combine weights': route_scale times what gate_normalize_bwd makes
 *    of dgate (expert choice: route_scale * dgate, no normalizing), on the
 *    chosen experts' scores;
 *  - the aux loss's, weight * dscore_coef when not NULL (through the
 *    normalizing over the experts with a sigmoid gate);
 * plus, when z_weight > 0, the z-loss's: z_weight * 2 lse softmax(logits +
 * noise) / global_tokens, lse = logsumexp(logits + noise). */
typedef struct moert_cpu_gate_bwd_io {
  const float *scores;         /* [tokens, experts] */
  const int32_t *idx;          /* [tokens, top_k] */
  const float *topv, *dgate;   /* [tokens, top_k] */
  const float *dscore_coef;    /* [experts] or NULL */
  float weight;                /* the aux loss's */
  const float *logits, *noise; /* the z-loss's input (noise may be NULL) */
  float z_weight;              /* 0: no z-loss */
  double global_tokens;
  float *dlogits;              /* [tokens, experts] */
  bool normalize, sigmoid;
  float route_scale;           /* 0 is taken as 1 */
  int64_t ec_capacity;         /* > 0: expert choice (top_k == experts) */
} moert_cpu_gate_bwd_io;
void moert_cpu_gate_bwd(const moert_cpu_gate_bwd_io *g, int64_t tokens, int64_t experts, int64_t top_k);

/* --- dispatch and combine over the padded [experts, capacity, dim] layout --- */

/* buf[e, c, :] = x[t, :] for every (t, j) with idx = e and loc = c < capacity;
 * every other slot of buf is set to 0. */
void moert_cpu_dispatch(const float *x, const int32_t *idx, const int32_t *loc, float *buf,
                        int64_t tokens, int64_t top_k, int64_t experts, int64_t capacity,
                        int64_t dim);
/* dx[t, :] = sum over kept choices j of dbuf[idx, loc, :] (written). */
void moert_cpu_dispatch_bwd(const float *dbuf, const int32_t *idx, const int32_t *loc, float *dx,
                            int64_t tokens, int64_t top_k, int64_t experts, int64_t capacity,
                            int64_t dim);
/* y[t, :] = sum over kept choices j of gate[t*k+j] * buf[idx, loc, :]; a
 * token with no kept choice gets 0. */
void moert_cpu_combine(const float *buf, const int32_t *idx, const int32_t *loc,
                       const float *gate, float *y, int64_t tokens, int64_t top_k,
                       int64_t experts, int64_t capacity, int64_t dim);
/* dbuf[e, c, :] = gate * dy[t, :] for kept slots, 0 elsewhere (written);
 * dgate[t*k + j] = <dy[t], buf[idx, loc]> for kept choices, 0 for dropped. */
void moert_cpu_combine_bwd(const float *dy, const float *buf, const int32_t *idx,
                           const int32_t *loc, const float *gate, float *dbuf, float *dgate,
                           int64_t tokens, int64_t top_k, int64_t experts, int64_t capacity,
                           int64_t dim);

/* --- embedding, losses --- */

/* x[t, :] = sum_{c < context} table[c, win[t*context + c], :]; win entries
 * of -1 are skipped. table is [context, vocab, dim]. */
void moert_cpu_embed_fwd(const float *table, const int32_t *win, float *x, int64_t tokens,
                         int64_t context, int64_t vocab, int64_t dim);
/* dtable accumulates. */
void moert_cpu_embed_bwd(const float *dx, const int32_t *win, float *dtable, int64_t tokens,
                         int64_t context, int64_t vocab, int64_t dim);
/* Sum over rows of -log softmax(logits)[target] (the plain cross-entropy,
 * whatever the smoothing); when dlogits is not NULL it is written with
 * scale * (softmax - ((1 - smoothing) onehot + smoothing / vocab)), the
 * gradient of the label-smoothed objective (1 - smoothing) (-log p[target])
 * + smoothing * mean over v of (-log p[v]). logits is [rows, vocab]; a row
 * whose target is outside [0, vocab) counts 0 and gets dlogits 0. */
double moert_cpu_xent(const float *logits, const int32_t *target, float *dlogits, int64_t rows,
                      int64_t vocab, float scale, float smoothing);
/* Sum of (yhat - y)^2; when dyhat is not NULL it is written with
 * scale * 2 * (yhat - y). */
double moert_cpu_mse(const float *yhat, const float *y, float *dyhat, int64_t n, float scale);

/* --- attention (runtime/layers/attention.c) ---
 *
 * A qkv row [(H + 2 KV) D] holds a token's H query heads, then its KV key
 * heads, then its KV value heads, D floats each; an o row [H D] the output
 * of its H query heads. The T = nseq * seq tokens are nseq sequences of seq:
 * token t is at position t % seq of sequence t / seq, and attends only within
 * it. Query head h reads key/value head h / (H / KV) (grouped-query
 * attention; KV = 1: multi-query). Scores are scaled by 1 / sqrt(D). */

/* Rotary position embeddings, in place, on the query and key heads of qkv
 * (the value heads untouched): in each head, the pair (i, i + D/2) for
 * i < D/2 is rotated by the angle pos * base^(-2i / D), pos = pos0 + t % seq
 * (the angle computed in double, its cos and sin rounded to float);
 * `inverse` rotates by minus the angle, which is the rotation's backward
 * too. Training passes pos0 = 0; generation one token (tokens = seq = 1) at
 * its position pos0. */
void moert_cpu_rope(float *qkv, int64_t tokens, int64_t seq, int64_t pos0, int64_t heads, int64_t kv_heads,
                    int64_t head_dim, double base, bool inverse);
/* o = softmax(Q K^T / sqrt(D)) V per sequence and query head; causal: query
 * i sees keys j <= i. lse [nseq, H, seq] (= [T, H] when seq is whole, and
 * laid out as [sequence][head][position]): the natural log-sum-exp of each
 * query's scaled scores, which the backward recomputes the softmax from. */
void moert_cpu_attn_fwd(const float *qkv, float *o, float *lse, int64_t nseq, int64_t seq, int64_t heads,
                        int64_t kv_heads, int64_t head_dim, bool causal);
/* The backward from dout [T, H D]: dqkv written whole (=): dQ, and dK and dV
 * summed over the query heads that share them. qkv, o and lse are the
 * forward's; scratch holds moert_cpu_attn_scratch(T, H, KV, D) floats (the
 * backend's to use: the cpu keeps each query's sum(dO * O) there). */
void moert_cpu_attn_bwd(const float *qkv, const float *o, const float *lse, const float *dout, float *dqkv,
                        float *scratch, int64_t nseq, int64_t seq, int64_t heads, int64_t kv_heads,
                        int64_t head_dim, bool causal);
/* Generation's attention of one token against the cached rows of the tokens
 * before it and its own (a key/value cache): q is the token's qkv row (its
 * query heads read), cache holds len qkv rows (their key and value heads
 * read, RoPE applied at their positions), in any order (a ring); o [H D] =
 * softmax over all len rows, no mask. */
void moert_cpu_attn_decode(const float *q, const float *cache, float *o, int64_t len, int64_t heads,
                           int64_t kv_heads, int64_t head_dim);
/* The scratch of attn_bwd, in floats: a float per query and head, and an
 * fp32 [T, (H + 2 KV) D] for a device that accumulates dqkv in fp32. */
static inline int64_t moert_cpu_attn_scratch(int64_t tokens, int64_t heads, int64_t kv_heads, int64_t head_dim) {
  return tokens * heads + tokens * (heads + 2 * kv_heads) * head_dim;
}

/* --- optimizers over flat buffers --- */

/* Sum of squares in double. */
double moert_cpu_sumsq(const float *x, int64_t n);
/* x *= s. */
void moert_cpu_scale(float *x, int64_t n, float s);
/* AdamW (decoupled weight decay), step >= 1 (bias correction):
 * m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr * (mhat / (sqrt(vhat) + eps) + wd * p).
 * gscale, when not NULL: the gradient is g * *gscale, rounded to float (the
 * clipping factor of clip_factor, read where the gradients live: clipping
 * takes no pass of its own and no value back to the host).
 * low, when not NULL: n bf16 values (uint16_t bits) that receive the updated
 * p rounded to nearest even, in the same pass: the bf16 copy of the weights
 * a bf16 expert path computes with (exec.h's wlow), so no separate
 * conversion reads the masters again before the next forward. */
void moert_cpu_adamw(float *p, const float *g, float *m, float *v, int64_t n, float lr, float b1,
                     float b2, float eps, float wd, int64_t step, const float *gscale, uint16_t *low);
/* SGD: p -= lr * (g + wd * p); gscale and low as for adamw. */
void moert_cpu_sgd(float *p, const float *g, int64_t n, float lr, float wd, const float *gscale,
                   uint16_t *low);

/* The gradient norm without reading back: sums of squares into parts, then
 * *out = sumsq(x[0..n)) (in double). */
void moert_cpu_sumsq_to(const float *x, int64_t n, double *out);
/* The sum s of part[0..n) as two floats: hilo[0] = (float)s, hilo[1] =
 * (float)(s - hilo[0]); what the float all-reduce can sum over ranks. */
void moert_cpu_norm_split(const double *part, int64_t n, float *hilo);
/* *norm = sqrt(sum of part[0..n) + hilo[0] + hilo[1]); *factor = clip /
 * *norm when clip > 0 and *norm > clip, else 1. */
void moert_cpu_clip_factor(const double *part, int64_t n, const float *hilo, double clip, double *norm,
                           float *factor);

#endif
