/* test_capacity.c — which claims a MoE layer keeps, checked against an
 * independent count. For each spec, one forward on the cpu backend through the
 * real executor; then, from the gate scores the layer computed, this test
 * works out on its own (docs/LANGUAGE.md, "Capacity"):
 *   - each token's top_k experts (scores descending, the lower index first
 *     on a tie), against the layer's choices;
 *   - the capacity C: k * floor(f * ceil(T / E)) for f > 0; the largest
 *     claim count, capped at k * floor(|f| * ceil(T / E)) for f < 0, and
 *     uncapped for f = 0;
 *   - every claim's slot: claims are taken choice by choice (all first
 *     choices, then all second ones), in token order, or by descending top-1
 *     score with batch_prioritized; the first C claims of an expert are kept;
 *   - the dispatched buffer [E, C, M]: each kept claim's token row in its
 *     slot, zeros elsewhere;
 *   - the dropped count the step reports.
 * A capacity one short, a slot order that differs, a claim kept past C or a
 * wrong dropped count fails the spec. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "exec.h"
#include "front.h"
#include "lower.h"
#include "moe.h"

typedef struct ccase {
  const char *name, *spec;
} ccase;

#define SPEC(tokens, moe) \
  "model m { dim = 8; tokens = " #tokens "; dtype = fp32; residual { rmsnorm; moe e { hidden = 8; " moe " } } } " \
  "train { steps = 1; seed = 11; }"

static const ccase cases[] = {
    {"top1_f0.5", SPEC(30, "experts = 4; top_k = 1; capacity_factor = 0.5;")},
    {"top2_f1", SPEC(24, "experts = 8; top_k = 2; capacity_factor = 1.0;")},
    {"top2_f0.9_bp", SPEC(30, "experts = 4; top_k = 2; capacity_factor = 0.9; batch_prioritized = true;")},
    {"top3_f0.75_bp", SPEC(40, "experts = 8; top_k = 3; capacity_factor = 0.75; batch_prioritized = true;")},
    {"top1_f1_cosine", SPEC(33, "experts = 4; top_k = 1; capacity_factor = 1.0; gate = cosine;")},
    {"top2_dynamic_0.5", SPEC(32, "experts = 4; top_k = 2; capacity_factor = -0.5;")},
    {"top2_dropless", SPEC(32, "experts = 4; top_k = 2; capacity_factor = 0;")},
    {"top1_dropless_e2", SPEC(31, "experts = 2; top_k = 1; capacity_factor = 0;")},
    {"top1_dropless_e3", SPEC(29, "experts = 3; top_k = 1; capacity_factor = 0;")},
};

/* Layers whose last expert alone has the most claims (a capacity that
 * overlooks the last expert shows only there). */
static int last_busiest;

/* Whether token a's top-1 score ranks before b's (descending, then index). */
static const float *prio_scores;
static int prio_k;
static int by_priority(const void *pa, const void *pb) {
  int a = *(const int *)pa, b = *(const int *)pb;
  float sa = prio_scores[a * prio_k], sb = prio_scores[b * prio_k];
  if (sa != sb) return sa > sb ? -1 : 1;
  return a - b;
}

static int check_layer(const char *name, moert_exec *e, int li, int64_t *dropped) {
  const moert_layer *l = &e->m->layers[li];
  const moert_layer_plan *lp = &e->plan->layers[li];
  int64_t T = e->rows, E = l->experts, K = l->top_k, M = e->m->dim;
  const float *scores = e->act + lp->f[MOERT_F_SCORES], *topv = e->act + lp->f[MOERT_F_TOPV];
  const int32_t *idx = e->iact + lp->i[MOERT_I_IDX], *loc = e->iact + lp->i[MOERT_I_LOC];
  int fails = 0;
#define BAD(...)                                                  \
  do {                                                            \
    if (fails++ < 8) {                                            \
      fprintf(stderr, "  FAIL %s layer %s: ", name, l->name);     \
      fprintf(stderr, __VA_ARGS__);                               \
      fputc('\n', stderr);                                        \
    }                                                             \
  } while (0)
  /* the choices: the top_k scores of each token */
  for (int64_t t = 0; t < T; t++) {
    bool taken[4096] = {false};
    for (int64_t j = 0; j < K; j++) {
      int64_t best = -1;
      for (int64_t x = 0; x < E; x++)
        if (!taken[x] && (best < 0 || scores[t * E + x] > scores[t * E + best])) best = x;
      taken[best] = true;
      if (idx[t * K + j] != best) BAD("token %lld choice %lld is expert %d, its scores say %lld", (long long)t,
                                      (long long)j, idx[t * K + j], (long long)best);
    }
  }
  /* the order claims are taken in, and the claims of each expert */
  int *order = malloc(sizeof(int) * (size_t)T);
  for (int64_t t = 0; t < T; t++) order[t] = (int)t;
  if (l->batch_prioritized) {
    prio_scores = topv;
    prio_k = (int)K;
    qsort(order, (size_t)T, sizeof(int), by_priority);
  }
  int64_t *count = calloc((size_t)E, sizeof(int64_t)), *want_loc = malloc(sizeof(int64_t) * (size_t)(T * K));
  for (int64_t j = 0; j < K; j++)
    for (int64_t i = 0; i < T; i++) {
      int64_t tj = order[i] * K + j;
      want_loc[tj] = count[idx[tj]]++;
    }
  int64_t most = 0, busiest = 0;
  for (int64_t x = 0; x < E; x++)
    if (count[x] > most) most = count[x], busiest = x;
  if (busiest == E - 1) last_busiest++;
  double f = l->capacity_factor;
  int64_t spe = (T + E - 1) / E, C;
  if (f > 0) C = K * (int64_t)floor(f * (double)spe);
  else {
    C = most;
    if (f < 0 && C > K * (int64_t)floor(-f * (double)spe)) C = K * (int64_t)floor(-f * (double)spe);
  }
  if (C < 1) C = 1;
  if (e->moe.keep[li] != C) BAD("keeps %lld claims per expert, the capacity is %lld", (long long)e->moe.keep[li], (long long)C);
  int64_t Cp = e->moe.capacity[li];
  if (Cp < C) BAD("buffers of %lld slots per expert hold fewer than the capacity %lld", (long long)Cp, (long long)C);
  /* every claim in its slot, or dropped */
  for (int64_t tj = 0; tj < T * K; tj++) {
    bool keep = want_loc[tj] < C;
    bool kept = loc[tj] >= 0 && loc[tj] < Cp;
    if (keep != kept || (keep && loc[tj] != want_loc[tj]))
      BAD("token %lld choice %lld (expert %d): slot %d, expected %s %lld", (long long)(tj / K), (long long)(tj % K),
          idx[tj], loc[tj], keep ? "slot" : "a drop past capacity", (long long)(keep ? want_loc[tj] : C));
    *dropped += !keep;
  }
  /* the dispatched tokens: each kept claim's row in its slot, zeros elsewhere */
  const float *src = e->act + lp->f[MOERT_F_SRC], *x = e->xin[li];
  float *want = calloc((size_t)(E * Cp * M), sizeof(float));
  for (int64_t tj = 0; tj < T * K; tj++)
    if (want_loc[tj] < C && want_loc[tj] < Cp) memcpy(want + (idx[tj] * Cp + want_loc[tj]) * M, x + (tj / K) * M, sizeof(float) * (size_t)M);
  int64_t wrong = 0;
  for (int64_t i = 0; i < E * Cp * M; i++) wrong += src[i] != want[i];
  if (wrong) BAD("%lld of %lld elements of the dispatched buffer differ from the kept tokens", (long long)wrong,
                 (long long)(E * Cp * M));
  printf("%-18s layer %-10s T %3lld E %2lld k %lld  capacity %3lld (padded %3lld)  claims per expert at most %3lld "
         "(expert %lld)  %s\n",
         name, l->name, (long long)T, (long long)E, (long long)K, (long long)C, (long long)Cp, (long long)most,
         (long long)busiest, fails ? "FAIL" : "ok");
  free(want);
  free(want_loc);
  free(count);
  free(order);
  return fails;
#undef BAD
}

static int run_case(const ccase *c) {
  moec_arena *a = moec_arena_create();
  moec_diags d;
  moec_diags_init(&d, a);
  moec_spec *s = moec_front_buffer(a, &d, c->name, c->spec, strlen(c->spec));
  moert_model *m = s ? moec_lower(a, &d, s, c->name) : NULL;
  if (!m) {
    moec_diags_print(&d, stderr);
    fprintf(stderr, "FAIL %s: the spec does not compile\n", c->name);
    moec_arena_destroy(a);
    return 1;
  }
  moert_status st = {0};
  moert_plan *p = NULL;
  moert_data *data = NULL;
  moert_exec *e = NULL;
  int fails = 1;
  double obj;
  if (!moert_plan_create(m, 1, 0, m->tokens, true, &p, &st) ||
      !moert_data_open(&data, NULL, m->vocab, m->dim, m->context, m->tokens, 5, &st) ||
      !moert_exec_create(&e, m, p, moert_backend_cpu(), moert_comm_self(), true, 5, &st) ||
      !moert_exec_objective(e, data, 1, false, &obj, &st) || !moert_moe_read_stats(e, &st)) {
    fprintf(stderr, "FAIL %s: %s\n", c->name, st.msg);
    goto out;
  }
  fails = 0;
  int64_t dropped = 0, claims = 0;
  for (int li = 0; li < m->nlayers; li++)
    if (m->layers[li].kind == MOERT_L_MOE) {
      fails += check_layer(c->name, e, li, &dropped);
      claims += e->rows * m->layers[li].top_k;
    }
  if (e->moe.dropped != (double)dropped || e->moe.routed != (double)claims) {
    fprintf(stderr, "  FAIL %s: the step reports %.0f of %.0f claims dropped; %lld of %lld were\n", c->name,
            e->moe.dropped, e->moe.routed, (long long)dropped, (long long)claims);
    fails++;
  }
  bool drops_expected = strstr(c->name, "dropless") == NULL;
  if ((dropped > 0) != drops_expected) {
    fprintf(stderr, "  FAIL %s: %lld claims dropped; the case is meant to %s\n", c->name, (long long)dropped,
            drops_expected ? "drop some (a weaker test otherwise)" : "drop none");
    fails++;
  }
out:
  moert_exec_destroy(e);
  moert_data_close(data);
  moert_plan_destroy(p);
  moec_arena_destroy(a);
  return fails ? 1 : 0;
}

int main(void) {
  int fails = 0;
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) fails += run_case(&cases[i]);
  if (last_busiest < 2) {
    fprintf(stderr, "FAIL: in %d layers the last expert alone has the most claims; the cases need 2 or more\n",
            last_busiest);
    fails++;
  }
  printf("%d passed, %d failed\n", (int)(sizeof cases / sizeof cases[0]) - fails, fails);
  return fails ? 1 : 0;
}
