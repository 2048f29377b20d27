/* test_routers.c — the cpu reference of today's routers (cpu_ops.h's
 * moert_cpu_gate_io fields: sigmoid, bias, groups, route_scale, expert
 * choice, z and entropy sums): selections on inputs whose answer is known by
 * hand, statistics against their formulas, and the backward against central
 * differences of the forward on fresh random inputs (float forward, so the
 * differences use a wide step on logits whose choices stay put). */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_ops.h"

static int failures;

#define CHECK(cond, ...)                 \
  do {                                   \
    if (!(cond)) {                       \
      printf("FAIL: " __VA_ARGS__);      \
      printf("\n");                      \
      failures++;                        \
    }                                    \
  } while (0)

static uint64_t rng_s = 7;
static double urand(void) { /* splitmix64, [0, 1) */
  uint64_t z = (rng_s += 0x9e3779b97f4a7c15u);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
  return (double)((z ^ (z >> 31)) >> 11) * 0x1.0p-53;
}

/* Buffers of one gate call, [T, E] and [T, K]. */
typedef struct gate_bufs {
  int64_t T, E, K;
  float *logits, *noise, *scores, *topv, *gate, *bias, *ssum, *top1, *coef, aux, z, ent;
  int32_t *idx, *loc, *order, *counts;
} gate_bufs;

static gate_bufs bufs(int64_t T, int64_t E, int64_t K) {
  gate_bufs b = {.T = T, .E = E, .K = K};
  b.logits = calloc((size_t)(T * E), sizeof(float));
  b.noise = calloc((size_t)(T * E), sizeof(float));
  b.scores = calloc((size_t)(T * E), sizeof(float));
  b.topv = calloc((size_t)(T * K), sizeof(float));
  b.gate = calloc((size_t)(T * K), sizeof(float));
  b.bias = calloc((size_t)E, sizeof(float));
  b.ssum = calloc((size_t)E, sizeof(float));
  b.top1 = calloc((size_t)E, sizeof(float));
  b.coef = calloc((size_t)E, sizeof(float));
  b.idx = calloc((size_t)(T * K), sizeof(int32_t));
  b.loc = calloc((size_t)(T * K), sizeof(int32_t));
  b.order = calloc((size_t)T, sizeof(int32_t));
  b.counts = calloc((size_t)E, sizeof(int32_t));
  return b;
}

static void free_bufs(gate_bufs *b) {
  free(b->logits), free(b->noise), free(b->scores), free(b->topv), free(b->gate), free(b->bias);
  free(b->ssum), free(b->top1), free(b->coef), free(b->idx), free(b->loc), free(b->order), free(b->counts);
}

/* The router's options. */
typedef struct router {
  bool sigmoid, use_bias, noise, aux, normalize;
  int64_t groups, top_groups, ec;
  float route_scale, z_weight;
} router;

static moert_cpu_gate_io io_of(gate_bufs *b, const router *r) {
  return (moert_cpu_gate_io){.logits = b->logits, .noise = r->noise ? b->noise : NULL, .scores = b->scores,
                             .idx = b->idx, .loc = b->loc, .topv = b->topv, .gate = b->gate,
                             .order = r->ec > 0 ? b->order : NULL, .counts = b->counts, .score_sum = b->ssum,
                             .top1_count = b->top1, .dscore_coef = b->coef, .aux_out = r->aux ? &b->aux : NULL,
                             .global_tokens = (double)b->T, .normalize = r->normalize, .sigmoid = r->sigmoid,
                             .bias = r->use_bias ? b->bias : NULL, .groups = r->groups, .top_groups = r->top_groups,
                             .route_scale = r->route_scale, .ec_capacity = r->ec, .z_sum = &b->z,
                             .entropy_sum = &b->ent};
}

/* --- selections known by hand --- */

static void test_selection(void) {
  int before = failures;
  /* sigmoid + bias: scores order e0 > e1 > e2 > e3; a bias lifts e3 first */
  gate_bufs b = bufs(1, 4, 2);
  float l[] = {2, 1, 0, -1}, bias[] = {0, 0, 0, 0.9f};
  memcpy(b.logits, l, sizeof l);
  memcpy(b.bias, bias, sizeof bias);
  router r = {.sigmoid = true, .use_bias = true, .normalize = true, .groups = 1, .top_groups = 1, .route_scale = 2};
  moert_cpu_gate_io io = io_of(&b, &r);
  moert_cpu_gate_fwd(&io, 1, 4, 2);
  CHECK(b.idx[0] == 3 && b.idx[1] == 0, "sigmoid + bias: chose %d %d, want 3 0", b.idx[0], b.idx[1]);
  double s3 = 1 / (1 + exp(1.0)), s0 = 1 / (1 + exp(-2.0));
  CHECK(fabs(b.scores[3] - s3) < 1e-6 && fabs(b.topv[0] - s3) < 1e-6, "sigmoid: topv is the score, not score+bias");
  CHECK(fabs(b.gate[0] - 2 * s3 / (s3 + s0)) < 1e-6 && fabs(b.gate[1] - 2 * s0 / (s3 + s0)) < 1e-6,
        "sigmoid: normalized weights times route_scale (%g %g)", b.gate[0], b.gate[1]);
  free_bufs(&b);

  /* groups: 3 groups of 2; group scores (two best) 0.9+0.05, 0.6+0.5, 0.8+0.25;
   * top_groups 2 keeps groups 1 and 2, not the best expert's: top-2 among
   * {2, 3, 4, 5} is 4, 2 */
  b = bufs(1, 6, 2);
  float sc[] = {0.9f, 0.05f, 0.6f, 0.5f, 0.8f, 0.25f};
  for (int e = 0; e < 6; e++) b.logits[e] = (float)log(sc[e] / (1 - sc[e])); /* sigmoid^-1 */
  r = (router){.sigmoid = true, .normalize = true, .groups = 3, .top_groups = 2, .route_scale = 1};
  io = io_of(&b, &r);
  moert_cpu_gate_fwd(&io, 1, 6, 2);
  CHECK(b.idx[0] == 4 && b.idx[1] == 2, "groups: chose %d %d, want 4 2 (group 0 ranks last)", b.idx[0], b.idx[1]);
  r.top_groups = 3;
  io = io_of(&b, &r);
  moert_cpu_gate_fwd(&io, 1, 6, 2);
  CHECK(b.idx[0] == 0 && b.idx[1] == 4, "groups, all kept: chose %d %d, want 0 4", b.idx[0], b.idx[1]);
  free_bufs(&b);

  /* expert choice: 4 tokens, 2 experts, C = 2; a tie goes to the lower token */
  b = bufs(4, 2, 2);
  float el[] = {3, 0, 1, 1, 1, 1, 0, 3}; /* e0's column: 3 1 1 0 -> tokens 0 and 1 (1 ties 2) */
  memcpy(b.logits, el, sizeof el);
  r = (router){.ec = 2, .route_scale = 1, .groups = 1, .top_groups = 1};
  io = io_of(&b, &r);
  moert_cpu_gate_fwd(&io, 4, 2, 2);
  /* softmax rows: t0 (3,0), t1 (1,1), t2 (1,1), t3 (0,3): e0 ranks t0, t1, t2, t3; e1 ranks t3, t1, t2, t0 */
  int32_t want_loc[] = {0, -1, 1, 1, -1, -1, -1, 0};
  for (int i = 0; i < 8; i++)
    CHECK(b.loc[i] == want_loc[i] && b.idx[i] == i % 2, "expert choice: slot %d: loc %d idx %d, want %d %d", i,
          b.loc[i], b.idx[i], want_loc[i], i % 2);
  CHECK(b.counts[0] == 2 && b.counts[1] == 2, "expert choice: counts %d %d", b.counts[0], b.counts[1]);
  CHECK(b.gate[0] == b.scores[0] && b.gate[3] == b.scores[3], "expert choice: gate = score (no normalizing)");
  CHECK(b.top1[0] == 3 && b.top1[1] == 1, "expert choice: top-1 counts by best score (t1, t2 tie to e0): %g %g",
        b.top1[0], b.top1[1]);
  r.ec = 9; /* C >= T: every token to every expert */
  io = io_of(&b, &r);
  moert_cpu_gate_fwd(&io, 4, 2, 2);
  CHECK(b.counts[0] == 4 && b.loc[6] == 3 && b.loc[7] == 0, "expert choice, C > T: counts %d, locs %d %d",
        b.counts[0], b.loc[6], b.loc[7]);
  free_bufs(&b);
  printf("%-4s routers: sigmoid + bias, groups, expert choice selections\n", failures == before ? "ok" : "FAIL");
}

/* --- statistics against their formulas --- */

static void test_stats(void) {
  int before = failures;
  int64_t T = 5, E = 4, K = 2;
  gate_bufs b = bufs(T, E, K);
  for (int64_t i = 0; i < T * E; i++) b.logits[i] = (float)(4 * urand() - 2), b.noise[i] = (float)(0.2 * urand());
  for (int sig = 0; sig < 2; sig++) {
    router r = {.sigmoid = sig, .noise = true, .aux = true, .normalize = true, .groups = 2, .top_groups = 1,
                .route_scale = 1};
    moert_cpu_gate_io io = io_of(&b, &r);
    moert_cpu_gate_fwd(&io, T, E, K);
    double z = 0, ent = 0, ssum[4] = {0};
    for (int64_t t = 0; t < T; t++) {
      double v[4], mx = -1e30, sum = 0, p[4], norm = 0;
      for (int e = 0; e < E; e++) v[e] = (double)b.logits[t * E + e] + b.noise[t * E + e], mx = fmax(mx, v[e]);
      for (int e = 0; e < E; e++) sum += exp(v[e] - mx);
      z += (mx + log(sum)) * (mx + log(sum));
      for (int e = 0; e < E; e++) p[e] = sig ? 1 / (1 + exp(-v[e])) : exp(v[e] - mx) / sum, norm += p[e];
      for (int e = 0; e < E; e++) {
        p[e] /= norm;
        ssum[e] += p[e];
        ent -= p[e] * log(p[e]);
      }
      CHECK(b.idx[t * K] / 2 == b.idx[t * K + 1] / 2, "groups 2, top_groups 1: token %lld's choices in one group",
            (long long)t);
    }
    CHECK(fabs(b.z - z) < 1e-5 * z, "%s: z_sum %g, want %g", sig ? "sigmoid" : "softmax", b.z, z);
    CHECK(fabs(b.ent - ent) < 1e-5 * ent, "%s: entropy_sum %g, want %g", sig ? "sigmoid" : "softmax", b.ent, ent);
    for (int e = 0; e < E; e++)
      CHECK(fabs(b.ssum[e] - ssum[e]) < 1e-5, "%s: score_sum[%d] %g, want %g (normalized scores)",
            sig ? "sigmoid" : "softmax", e, b.ssum[e], ssum[e]);
  }
  free_bufs(&b);
  printf("%-4s routers: z and entropy sums, normalized score sums\n", failures == before ? "ok" : "FAIL");
}

/* --- the backward against central differences --- */

/* The objective: sum r . gate (kept slots) + aux weight * aux + z_weight * z / T. */
static double objective(gate_bufs *b, const router *r, const float *rr, float aux_w, bool *same,
                        const int32_t *want_idx, const int32_t *want_loc, const float *want_top1) {
  moert_cpu_gate_io io = io_of(b, r);
  moert_cpu_gate_fwd(&io, b->T, b->E, b->K);
  double L = 0;
  for (int64_t e = 0; want_top1 && e < b->E; e++) /* the aux loss's top-1 counts are choices too */
    if (b->top1[e] != want_top1[e]) *same = false;
  for (int64_t i = 0; i < b->T * b->K; i++) {
    if (want_idx && (b->idx[i] != want_idx[i] || b->loc[i] != want_loc[i])) *same = false;
    if (b->loc[i] >= 0) L += (double)rr[i] * b->gate[i];
  }
  if (r->aux) L += aux_w * b->aux;
  return L + r->z_weight * b->z / (double)b->T;
}

static void gradient_case(const char *name, router r, int64_t T, int64_t E, int64_t K) {
  int before = failures;
  gate_bufs b = bufs(T, E, K);
  /* logits well apart: each token's levels are a permutation of steps of 0.6 */
  for (int64_t t = 0; t < T; t++) {
    for (int64_t e = 0; e < E; e++) b.logits[t * E + e] = (float)e;
    for (int64_t e = E - 1; e > 0; e--) {
      int64_t o = (int64_t)(urand() * (double)(e + 1));
      float tmp = b.logits[t * E + e];
      b.logits[t * E + e] = b.logits[t * E + o], b.logits[t * E + o] = tmp;
    }
    for (int64_t e = 0; e < E; e++) {
      b.logits[t * E + e] = (float)(0.6 * b.logits[t * E + e] - 0.3 * (double)E + 0.1 * urand());
      b.noise[t * E + e] = (float)(0.05 * urand());
    }
  }
  if (r.ec > 0) /* expert choice ranks tokens: each expert's column a permutation of steps of 0.6 instead */
    for (int64_t e = 0; e < E; e++) {
      for (int64_t t = 0; t < T; t++) b.logits[t * E + e] = (float)t;
      for (int64_t t = T - 1; t > 0; t--) {
        int64_t o = (int64_t)(urand() * (double)(t + 1));
        float tmp = b.logits[t * E + e];
        b.logits[t * E + e] = b.logits[o * E + e], b.logits[o * E + e] = tmp;
      }
      for (int64_t t = 0; t < T; t++) b.logits[t * E + e] = (float)(0.6 * b.logits[t * E + e] - 0.3 * (double)T + 0.1 * urand());
    }
  for (int64_t e = 0; e < E; e++) b.bias[e] = (float)(0.02 * urand());
  float *rr = malloc(sizeof(float) * (size_t)(T * K)), aux_w = 0.3f;
  for (int64_t i = 0; i < T * K; i++) rr[i] = (float)(2 * urand() - 1);
  bool same = true;
  objective(&b, &r, rr, aux_w, &same, NULL, NULL, NULL);
  float *top10 = malloc(sizeof(float) * (size_t)E);
  memcpy(top10, b.top1, sizeof(float) * (size_t)E);
  int32_t *idx0 = malloc(sizeof(int32_t) * (size_t)(T * K)), *loc0 = malloc(sizeof(int32_t) * (size_t)(T * K));
  memcpy(idx0, b.idx, sizeof(int32_t) * (size_t)(T * K));
  memcpy(loc0, b.loc, sizeof(int32_t) * (size_t)(T * K));
  /* the analytic gradient: dgate = rr on kept slots (combine_bwd's), the aux coefficients of the forward */
  float *dgate = malloc(sizeof(float) * (size_t)(T * K)), *dl = malloc(sizeof(float) * (size_t)(T * E));
  for (int64_t i = 0; i < T * K; i++) dgate[i] = b.loc[i] >= 0 ? rr[i] : 0;
  moert_cpu_gate_bwd_io g = {.scores = b.scores, .idx = b.idx, .topv = b.topv, .dgate = dgate,
                             .dscore_coef = r.aux ? b.coef : NULL, .weight = aux_w, .logits = b.logits,
                             .noise = r.noise ? b.noise : NULL, .z_weight = r.z_weight, .global_tokens = (double)T,
                             .dlogits = dl, .normalize = r.normalize, .sigmoid = r.sigmoid,
                             .route_scale = r.route_scale, .ec_capacity = r.ec};
  moert_cpu_gate_bwd(&g, T, E, K);
  float *dl_keep = malloc(sizeof(float) * (size_t)(T * E));
  memcpy(dl_keep, dl, sizeof(float) * (size_t)(T * E));
  int skipped = 0;
  double worst = 0;
  for (int64_t i = 0; i < T * E; i++) {
    float x = b.logits[i];
    const float h = 2e-3f;
    bool sp = true, sm = true;
    b.logits[i] = x + h;
    double lp = objective(&b, &r, rr, aux_w, &sp, idx0, loc0, top10);
    b.logits[i] = x - h;
    double lm = objective(&b, &r, rr, aux_w, &sm, idx0, loc0, top10);
    b.logits[i] = x;
    if (!sp || !sm) { /* the step changed a choice: this coordinate says nothing */
      skipped++;
      continue;
    }
    double num = (lp - lm) / (2 * (double)h), err = fabs(num - dl_keep[i]) / (2e-3 + 1e-2 * fabs(num));
    if (err > worst) worst = err;
    CHECK(err <= 1, "%s: d/d logits[%lld] = %g, central differences %g", name, (long long)i, dl_keep[i], num);
  }
  CHECK(skipped <= T * E / 10, "%s: %d of %lld coordinates changed a choice under the step", name, skipped,
        (long long)(T * E));
  printf("%-4s routers backward: %s (worst error %.2f of the tolerance)\n", failures == before ? "ok" : "FAIL", name,
         worst);
  free(rr), free(top10), free(idx0), free(loc0), free(dgate), free(dl), free(dl_keep);
  free_bufs(&b);
}

int main(void) {
  test_selection();
  test_stats();
  router base = {.normalize = true, .groups = 1, .top_groups = 1, .route_scale = 1};
  router r = base;
  r.z_weight = 0.5f, r.aux = true, r.noise = true;
  gradient_case("softmax, aux, z-loss, noise", r, 6, 5, 2);
  r = base;
  r.sigmoid = true;
  gradient_case("sigmoid, normalized", r, 6, 5, 2);
  r.use_bias = true, r.route_scale = 2.5f, r.aux = true;
  gradient_case("sigmoid, bias, route_scale, aux", r, 6, 6, 2);
  r.groups = 3, r.top_groups = 2, r.z_weight = 0.2f, r.normalize = false;
  gradient_case("sigmoid, groups, z-loss, unnormalized", r, 6, 6, 3);
  r = base;
  r.ec = 3, r.route_scale = 1.5f, r.z_weight = 0.1f;
  gradient_case("expert choice, softmax", r, 8, 4, 4);
  r.sigmoid = true, r.aux = true;
  gradient_case("expert choice, sigmoid, aux", r, 8, 4, 4);
  if (failures) {
    printf("test_routers: %d checks FAILED\n", failures);
    return 1;
  }
  printf("test_routers: all checks passed\n");
  return 0;
}
