/* select.c — the per-step variant selector; see select.h. */
#include "select.h"

#include <stdlib.h>
#include <string.h>

#include "cost.h"

typedef struct bucket {
  int64_t cap;                         /* power of two */
  int samples[MOERT_MAX_VARIANTS];
  double total_ms[MOERT_MAX_VARIANTS];
  int chosen;                          /* -1 while exploring */
  int next;                            /* exploration cursor */
  /* with a prediction: the candidates in predicted order, and their
   * predicted ms at the capacity that made the bucket */
  int order[MOERT_MAX_VARIANTS];
  double pred_ms[MOERT_MAX_VARIANTS];
} bucket;

typedef struct layer_sel {
  bool is_moe;
  int forced;                          /* -1: none */
  int cycle;                           /* cycle mode: the variant of the last step */
  bucket *buckets;
  int nbuckets, cap;
} layer_sel;

struct moert_selector {
  const moert_plan *plan;
  moert_pick_mode mode;
  int64_t explore;
  layer_sel *layers;
  bool predict;                        /* moert_selector_use_prediction gave a model */
  bool training;
  moert_calib calib;
  moert_net net;
};

static int64_t bucket_of(int64_t c) {
  int64_t b = 1;
  while (b < c) b <<= 1;
  return b;
}

/* The layer name of a "LAYER:variant" value, or NULL. */
static const char *split_layer(const char *value, char *layer, size_t n) {
  const char *colon = strchr(value, ':');
  if (!colon) return NULL;
  size_t k = (size_t)(colon - value) < n - 1 ? (size_t)(colon - value) : n - 1;
  memcpy(layer, value, k);
  layer[k] = 0;
  return colon + 1;
}

/* Whether s is a whole number with no sign, leading zeros aside; *end after it. */
static bool digits(const char *s, const char **end) {
  const char *p = s;
  while (*p >= '0' && *p <= '9') p++;
  *end = p;
  return p > s && p - s < 10;
}

bool moert_variant_well_formed(const char *value) {
  if (strcmp(value, "cycle") == 0) return true;
  const char *colon = strchr(value, ':'), *v = colon ? colon + 1 : value;
  if (colon && colon == value) return false; /* ":r=..." names no layer */
  const char *p = v, *e;
  if (strncmp(p, "r=", 2) != 0 || !digits(p + 2, &e)) return false;
  p = e;
  if (strncmp(p, ",d=", 3) != 0 || !digits(p + 3, &e)) return false;
  p = e;
  if (strncmp(p, ",a2a=", 5) != 0) return false;
  p += 5;
  return strcmp(p, "linear") == 0 || strcmp(p, "2dh") == 0;
}

bool moert_selector_create(const moert_plan *plan, moert_pick_mode mode, int64_t explore_steps,
                           const char *const *forced, int nforced, moert_selector **out,
                           moert_status *st) {
  *out = NULL;
  const moert_model *m = plan->model;
  moert_selector *s = calloc(1, sizeof *s);
  if (!s || !(s->layers = calloc((size_t)m->nlayers + 1, sizeof *s->layers))) {
    free(s);
    return MOERT_FAIL(st, "out of memory");
  }
  s->plan = plan;
  s->mode = mode;
  s->explore = explore_steps > 0 ? explore_steps : 1;
  for (int li = 0; li < m->nlayers; li++) {
    s->layers[li].is_moe = m->layers[li].kind == MOERT_L_MOE;
    s->layers[li].forced = -1;
    s->layers[li].cycle = -1;
  }
  for (int f = 0; f < nforced; f++) {
    const char *value = forced[f];
    if (strcmp(value, "cycle") == 0) {
      s->mode = MOERT_PICK_CYCLE;
      continue;
    }
    char layer[128];
    const char *variant = split_layer(value, layer, sizeof layer);
    bool found_layer = false, found = false;
    for (int li = 0; li < m->nlayers; li++) {
      if (!s->layers[li].is_moe) continue;
      if (variant && strcmp(m->layers[li].name, layer) != 0) continue;
      found_layer = true;
      int v = moert_variant_find(&plan->layers[li], variant ? variant : value);
      if (v >= 0) {
        s->layers[li].forced = v;
        found = true;
      }
    }
    if (variant && !found_layer) {
      moert_selector_destroy(s);
      return MOERT_FAIL(st, "--variant %s: the model has no MoE layer called `%s`", value, layer);
    }
    if (!found) {
      char have[512] = "";
      for (int li = 0; li < m->nlayers && strlen(have) < 400; li++) {
        if (!s->layers[li].is_moe || (variant && strcmp(m->layers[li].name, layer) != 0)) continue;
        for (int v = 0; v < plan->layers[li].nvariants; v++) {
          const char *name = plan->layers[li].variants[v].name;
          if (!strstr(have, name)) {
            size_t n = strlen(have);
            snprintf(have + n, sizeof have - n, "%s%s", n ? " " : "", name);
          }
        }
      }
      moert_selector_destroy(s);
      return MOERT_FAIL(st, "--variant %s: no MoE layer%s has that variant at %d rank%s; the candidates "
                        "are: %s", value, variant ? " of that name" : "", plan->world,
                        plan->world == 1 ? "" : "s", have);
    }
  }
  *out = s;
  return true;
}

void moert_selector_destroy(moert_selector *s) {
  if (!s) return;
  for (int li = 0; s->layers && li < s->plan->model->nlayers; li++) free(s->layers[li].buckets);
  free(s->layers);
  free(s);
}

static bucket *find_bucket(moert_selector *s, int li, int64_t capacity, bool make) {
  layer_sel *l = &s->layers[li];
  int64_t cap = bucket_of(capacity);
  for (int i = 0; i < l->nbuckets; i++)
    if (l->buckets[i].cap == cap) return &l->buckets[i];
  if (!make) return NULL;
  if (l->nbuckets == l->cap) {
    int n = l->cap ? 2 * l->cap : 4;
    bucket *b = realloc(l->buckets, sizeof *b * (size_t)n);
    if (!b) return NULL;
    l->buckets = b;
    l->cap = n;
  }
  bucket *b = &l->buckets[l->nbuckets++];
  memset(b, 0, sizeof *b);
  b->cap = cap;
  b->chosen = -1;
  const moert_layer_plan *lp = &s->plan->layers[li];
  for (int v = 0; v < lp->nvariants; v++) b->order[v] = v;
  if (s->predict) {
    moert_cost cost[MOERT_MAX_VARIANTS];
    moert_cost_order(s->plan, li, capacity, &s->calib, &s->net, s->training, b->order, cost);
    for (int v = 0; v < lp->nvariants; v++) b->pred_ms[v] = cost[v].total * 1e3;
    if (s->mode == MOERT_PICK_PREDICTED) b->chosen = b->order[0];
  }
  return b;
}

bool moert_selector_use_prediction(moert_selector *s, int ranks_per_node, bool training, moert_status *st) {
  const moert_model *m = s->plan->model;
  bool wanted = m->parallel.select == MOERT_SELECT_PREDICTED;
  bool forced = s->mode == MOERT_PICK_CYCLE;
  for (int li = 0; li < m->nlayers; li++) forced |= s->layers[li].forced >= 0;
  if (forced || m->parallel.select == MOERT_SELECT_FIXED) return true;
  if (!m->calibration) {
    if (wanted)
      return MOERT_FAIL(st, "`select = predicted` needs a calibration in the binary, and this one was built "
                        "without (moec build --gpu none, or a driver from moec emit); build it with `moec build --gpu FILE` (a file of "
                        "`./model --calibrate FILE`), or without --gpu for the committed one");
    return true;
  }
  moert_status cst = {0};
  if (!moert_calib_parse(m->calibration, m->calibration_source ? m->calibration_source : "the built-in calibration",
                         &s->calib, &cst))
    return MOERT_FAIL(st, "the calibration built into this binary: %s", cst.msg);
  moert_net_defaults(&s->net);
  s->net.ranks_per_node = ranks_per_node > 0 ? ranks_per_node : 1;
  const char *net = getenv("MOEC_NET");
  if (net && !moert_net_parse(net, &s->calib, &s->net, st)) return MOERT_UP(st);
  s->predict = true;
  s->training = training;
  if (wanted) s->mode = MOERT_PICK_PREDICTED;
  return true;
}

/* The candidate a bucket explores now: in rounds over the spec's order, or,
 * with a prediction, each candidate's runs one after another in predicted
 * order (a warm-up, then explore_steps measured). */
static int exploring(const moert_selector *s, const bucket *b, int nv) {
  if (!s->predict) return b->next % nv;
  int64_t pos = b->next / (s->explore + 1);
  return b->order[pos < nv ? pos : nv - 1];
}

int moert_selector_pick(void *ctx, int li, int64_t capacity, int64_t step) {
  moert_selector *s = ctx;
  layer_sel *l = &s->layers[li];
  int nv = s->plan->layers[li].nvariants;
  (void)step;
  if (l->forced >= 0) return l->forced;
  if (s->mode == MOERT_PICK_FIXED || nv == 1) return 0;
  if (s->mode == MOERT_PICK_CYCLE) {
    l->cycle = (l->cycle + 1) % nv;
    return l->cycle;
  }
  bucket *b = find_bucket(s, li, capacity, true);
  if (!b) return 0;
  if (b->chosen >= 0) return b->chosen;
  return exploring(s, b, nv);
}

bool moert_selector_record(moert_selector *s, int li, int64_t capacity, int variant, double ms) {
  layer_sel *l = &s->layers[li];
  int nv = s->plan->layers[li].nvariants;
  if (s->mode != MOERT_PICK_AUTO || l->forced >= 0 || nv == 1) return false;
  bucket *b = find_bucket(s, li, capacity, true);
  if (!b || b->chosen >= 0 || variant != exploring(s, b, nv)) return false;
  if (s->predict) {
    /* a candidate's first run is its warm-up; after its explore_steps
     * measured runs, the next candidate in predicted order, unless it is
     * predicted MOERT_PRUNE times slower than the best measured so far */
    int64_t pos = b->next / (s->explore + 1), within = b->next % (s->explore + 1);
    b->next++;
    if (within == 0) return false;
    b->samples[variant]++;
    b->total_ms[variant] += ms;
    if (within < s->explore) return false;
    int best = b->order[0];
    for (int64_t i = 1; i <= pos; i++) {
      int v = b->order[i];
      if (b->total_ms[v] / b->samples[v] < b->total_ms[best] / b->samples[best]) best = v;
    }
    if (pos + 1 < nv && b->pred_ms[b->order[pos + 1]] <= MOERT_PRUNE * b->pred_ms[best]) return false;
    b->chosen = best;
    return true;
  }
  /* the first round is a warm-up, not recorded: a candidate's first run
   * pays once for what later runs reuse (NCCL's lazily made connections,
   * GEMM heuristics, cold caches), and one such outlier in a mean of
   * explore_steps would steer the choice */
  if (b->next++ < nv) return false;
  b->samples[variant]++;
  b->total_ms[variant] += ms;
  if (b->next < nv * (s->explore + 1)) return false;
  int best = 0;
  for (int v = 1; v < nv; v++)
    if (b->total_ms[v] / b->samples[v] < b->total_ms[best] / b->samples[best]) best = v;
  b->chosen = best;
  return true;
}

void moert_selector_json(const moert_selector *s, int li, int64_t capacity, FILE *out) {
  const moert_layer_plan *lp = &s->plan->layers[li];
  bucket *b = find_bucket((moert_selector *)s, li, capacity, false);
  fprintf(out, "\"%s\": {\"bucket\": %lld, \"chosen\": ", s->plan->model->layers[li].name,
          (long long)(b ? b->cap : capacity));
  if (b && b->chosen >= 0) fprintf(out, "\"%s\"", lp->variants[b->chosen].name);
  else fputs("null", out);
  fputs(", \"ms\": {", out);
  for (int v = 0; b && v < lp->nvariants; v++)
    fprintf(out, "%s\"%s\": %.6g", v ? ", " : "", lp->variants[v].name,
            b->samples[v] ? b->total_ms[v] / b->samples[v] : 0.0);
  fputc('}', out);
  if (s->predict && b) { /* what the cost model predicted, and the order it explored in */
    fputs(", \"predicted_ms\": {", out);
    for (int v = 0; v < lp->nvariants; v++)
      fprintf(out, "%s\"%s\": %.6g", v ? ", " : "", lp->variants[v].name, b->pred_ms[v]);
    fputc('}', out);
  }
  fputc('}', out);
}
