/* cost.c — the cost model of a plan; see cost.h and docs/PLAN.md. */
#include "cost.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

const char *const moert_cost_term_names[MOERT_COST__COUNT] = {
#define X(k, s) s,
    MOERT_COST_TERMS(X)
#undef X
};
static const char *const gemm_names[MOERT_GEMM__COUNT] = {
#define X(k, s) s,
    MOERT_GEMM_KINDS(X)
#undef X
};
static const char *const kernel_names[MOERT_K__COUNT] = {
#define X(k, s) s,
    MOERT_KERNELS(X)
#undef X
};

/* The calibration's format name and version (docs/PLAN.md). */
#define CALIB_FORMAT "moec-calibration"
#define CALIB_VERSION 1

/* --- the calibration file --- */

static bool num_field(json_t *o, const char *key, const char *where, const char *in, double lo, double *out,
                      moert_status *st) {
  json_t *v = json_object_get(o, key);
  if (!v || !json_is_number(v))
    return MOERT_FAIL(st, "%s: %s needs the number `%s`%s; write the file again with `./model --calibrate FILE`",
                      where, in, key, v ? " (it is not a number)" : "");
  double x = json_number_value(v);
  if (!(x >= lo) || !isfinite(x))
    return MOERT_FAIL(st, "%s: %s `%s` is %g, which is not a measurement (it must be at least %g); "
                      "write the file again with `./model --calibrate FILE`", where, in, key, x, lo);
  *out = x;
  return true;
}

static void str_field(json_t *o, const char *key, char *dst, size_t n) {
  json_t *v = json_object_get(o, key);
  snprintf(dst, n, "%s", v && json_is_string(v) ? json_string_value(v) : "");
}

bool moert_calib_parse(const char *text, const char *where, moert_calib *c, moert_status *st) {
  memset(c, 0, sizeof *c);
  json_error_t err;
  json_t *root = json_loads(text, JSON_REJECT_DUPLICATES, &err);
  if (!root)
    return MOERT_FAIL(st, "%s:%d:%d: not a calibration (bad JSON: %s); write it with `./model --calibrate FILE` "
                      "on the machine to predict for", where, err.line, err.column, err.text);
  bool ok = false;
  json_t *fmt = json_object_get(root, "format"), *ver = json_object_get(root, "version");
  if (!json_is_object(root) || !fmt || !json_is_string(fmt) || strcmp(json_string_value(fmt), CALIB_FORMAT) != 0) {
    MOERT_FAIL(st, "%s: not a calibration (no \"format\": \"" CALIB_FORMAT "\"); write one with "
               "`./model --calibrate FILE`", where);
    goto out;
  }
  if (!ver || !json_is_integer(ver) || json_integer_value(ver) != CALIB_VERSION) {
    MOERT_FAIL(st, "%s: calibration version %s, and this moec reads version %d; measure again with this "
               "moec's `./model --calibrate FILE`", where, ver && json_is_integer(ver) ? "other than 1" : "missing",
               CALIB_VERSION);
    goto out;
  }
  str_field(root, "device", c->device, sizeof c->device);
  str_field(root, "backend", c->backend, sizeof c->backend);
  snprintf(c->source, sizeof c->source, "%s", where);
  double es, launch;
  if (!num_field(root, "dtype_bytes", where, "the calibration", 2, &es, st)) goto out;
  if (es != 2 && es != 4) {
    MOERT_FAIL(st, "%s: `dtype_bytes` is %g; it is 2 (bf16) or 4 (fp32)", where, es);
    goto out;
  }
  c->dtype_bytes = (int)es;
  if (!num_field(root, "launch_s", where, "the calibration", 0, &launch, st)) goto out;
  c->launch_s = launch;
  json_t *g = json_object_get(root, "gemm");
  if (!g || !json_is_array(g) || json_array_size(g) == 0) {
    MOERT_FAIL(st, "%s: the calibration has no `gemm` measurements (an array of {\"kind\", \"flops\", "
               "\"flops_per_s\"}); write it again with `./model --calibrate FILE`", where);
    goto out;
  }
  if (json_array_size(g) > MOERT_CALIB_MAX_POINTS) {
    MOERT_FAIL(st, "%s: %zu GEMM measurements (limit is %d)", where, json_array_size(g), MOERT_CALIB_MAX_POINTS);
    goto out;
  }
  bool have[MOERT_GEMM__COUNT] = {0};
  for (size_t i = 0; i < json_array_size(g); i++) {
    json_t *p = json_array_get(g, i);
    char in[64];
    snprintf(in, sizeof in, "gemm[%zu]", i);
    json_t *k = json_is_object(p) ? json_object_get(p, "kind") : NULL;
    int kind = -1;
    for (int j = 0; k && json_is_string(k) && j < MOERT_GEMM__COUNT; j++)
      if (strcmp(json_string_value(k), gemm_names[j]) == 0) kind = j;
    if (kind < 0) {
      MOERT_FAIL(st, "%s: %s needs `kind`: \"nn\", \"tn\" or \"nt\"", where, in);
      goto out;
    }
    moert_gemm_point *pt = &c->points[c->npoints++];
    pt->kind = (moert_gemm_kind)kind;
    if (!num_field(p, "flops", where, in, 1, &pt->flops, st) ||
        !num_field(p, "flops_per_s", where, in, 1, &pt->flops_per_s, st))
      goto out;
    have[kind] = true;
  }
  for (int j = 0; j < MOERT_GEMM__COUNT; j++)
    if (!have[j]) {
      MOERT_FAIL(st, "%s: no GEMM of kind \"%s\" was measured; write it again with `./model --calibrate FILE`",
                 where, gemm_names[j]);
      goto out;
    }
  json_t *bw = json_object_get(root, "bandwidth");
  if (!bw || !json_is_object(bw)) {
    MOERT_FAIL(st, "%s: the calibration has no `bandwidth` object (bytes per second of each kernel)", where);
    goto out;
  }
  for (int k = 0; k < MOERT_K__COUNT; k++)
    if (!num_field(bw, kernel_names[k], where, "bandwidth", 1, &c->bw[k], st)) goto out;
  json_t *a = json_object_get(root, "a2a");
  if (a && !json_is_null(a)) {
    double ranks;
    if (!json_is_object(a)) {
      MOERT_FAIL(st, "%s: `a2a` is an object {\"ranks\", \"alpha_s\", \"beta_bytes_per_s\"} or null", where);
      goto out;
    }
    if (!num_field(a, "ranks", where, "a2a", 2, &ranks, st) || !num_field(a, "alpha_s", where, "a2a", 0, &c->a2a_alpha_s, st) ||
        !num_field(a, "beta_bytes_per_s", where, "a2a", 1, &c->a2a_beta, st))
      goto out;
    c->a2a_ranks = (int)ranks;
    c->has_a2a = true;
  }
  ok = true;
out:
  json_decref(root);
  return ok;
}

bool moert_calib_load(const char *path, moert_calib *c, char **text, moert_status *st) {
  if (text) *text = NULL;
  FILE *f = fopen(path, "rb");
  if (!f)
    return MOERT_FAIL(st, "cannot read the calibration %s: %s; give a file that `./model --calibrate FILE` wrote",
                      path, strerror(errno));
  char *buf = NULL;
  size_t n = 0, cap = 0;
  for (;;) {
    if (n + 4096 + 1 > cap) {
      if (cap > (64u << 20)) { /* a calibration is a few kB */
        free(buf);
        fclose(f);
        return MOERT_FAIL(st, "%s: more than 64 MB; this is not a calibration", path);
      }
      cap = cap ? 2 * cap : 8192;
      char *b = realloc(buf, cap);
      if (!b) {
        free(buf);
        fclose(f);
        return MOERT_FAIL(st, "out of memory reading %s", path);
      }
      buf = b;
    }
    size_t k = fread(buf + n, 1, cap - n - 1, f);
    n += k;
    if (k == 0) break;
  }
  bool rd = !ferror(f);
  fclose(f);
  if (!rd) {
    free(buf);
    return MOERT_FAIL(st, "cannot read the calibration %s", path);
  }
  buf[n] = 0;
  if (strlen(buf) != n) {
    free(buf);
    return MOERT_FAIL(st, "%s: a NUL byte: not a calibration (a JSON file `./model --calibrate FILE` writes)", path);
  }
  bool ok = moert_calib_parse(buf, path, c, st);
  if (ok && text) *text = buf;
  else free(buf);
  return ok;
}

static void json_s(FILE *out, const char *s) { moert_json_str(out, s); }

void moert_calib_write(const moert_calib *c, FILE *out) {
  fprintf(out, "{\n  \"format\": \"" CALIB_FORMAT "\",\n  \"version\": %d,\n  \"device\": ", CALIB_VERSION);
  json_s(out, c->device);
  fputs(",\n  \"backend\": ", out);
  json_s(out, c->backend);
  fprintf(out, ",\n  \"dtype_bytes\": %d,\n  \"launch_s\": %.6g,\n  \"gemm\": [\n", c->dtype_bytes, c->launch_s);
  for (int i = 0; i < c->npoints; i++)
    fprintf(out, "    {\"kind\": \"%s\", \"flops\": %.6g, \"flops_per_s\": %.6g}%s\n", gemm_names[c->points[i].kind],
            c->points[i].flops, c->points[i].flops_per_s, i + 1 < c->npoints ? "," : "");
  fputs("  ],\n  \"bandwidth\": {", out);
  for (int k = 0; k < MOERT_K__COUNT; k++) fprintf(out, "%s\"%s\": %.6g", k ? ", " : "", kernel_names[k], c->bw[k]);
  fputs("},\n  \"a2a\": ", out);
  if (c->has_a2a)
    fprintf(out, "{\"ranks\": %d, \"alpha_s\": %.6g, \"beta_bytes_per_s\": %.6g}", c->a2a_ranks, c->a2a_alpha_s,
            c->a2a_beta);
  else
    fputs("null", out);
  fputs("\n}\n", out);
}

/* The mean throughput of the points of kind k measured at exactly `flops`
 * (several shapes may have one size). */
static double rate_at(const moert_calib *c, moert_gemm_kind k, double flops) {
  double sum = 0;
  int n = 0;
  for (int i = 0; i < c->npoints; i++)
    if (c->points[i].kind == k && c->points[i].flops == flops) {
      sum += c->points[i].flops_per_s;
      n++;
    }
  return sum / n;
}

double moert_calib_gemm_s(const moert_calib *c, moert_gemm_kind k, double flops) {
  if (flops <= 0) return 0;
  /* the nearest measured sizes below and above, by log flops */
  double lo = 0, hi = 0;
  for (int i = 0; i < c->npoints; i++) {
    const moert_gemm_point *p = &c->points[i];
    if (p->kind != k) continue;
    if (p->flops <= flops && (!lo || p->flops > lo)) lo = p->flops;
    if (p->flops >= flops && (!hi || p->flops < hi)) hi = p->flops;
  }
  double thr;
  if (!lo) thr = rate_at(c, k, hi);
  else if (!hi || hi == lo) thr = rate_at(c, k, lo);
  else {
    double f = (log(flops) - log(lo)) / (log(hi) - log(lo));
    thr = rate_at(c, k, lo) + f * (rate_at(c, k, hi) - rate_at(c, k, lo));
  }
  return c->launch_s + flops / thr;
}

/* --- the network --- */

void moert_net_defaults(moert_net *n) {
  n->nvlink = 450e9;          /* NVLink 4 on H100 SXM: 900 GB/s bidirectional per GPU */
  n->ib = 8 * 400e9 / 8;      /* 8 ConnectX-7 NDR NICs, 400 Gb/s each, per node */
  n->alpha_intra = 3e-6;
  n->alpha_inter = 10e-6;
  n->overlap = 1;
  n->ranks_per_node = 8;
}

/* A number with an optional "Nx" factor and a unit of the table; *out in
 * base units (bytes per second, seconds). */
static bool parse_quantity(const char *s, bool rate, double *out) {
  char *end;
  double factor = 1;
  const char *x = strchr(s, 'x');
  if (x) {
    factor = strtod(s, &end);
    if (end != x || !(factor > 0)) return false;
    s = x + 1;
  }
  double v = strtod(s, &end);
  if (end == s || !(v >= 0) || !isfinite(v)) return false;
  static const struct {
    const char *unit;
    double scale;
    bool rate;
  } units[] = {{"B/s", 1, true},    {"KB/s", 1e3, true},   {"MB/s", 1e6, true},  {"GB/s", 1e9, true},
               {"TB/s", 1e12, true}, {"b/s", 0.125, true}, {"Kb/s", 125, true},  {"Mb/s", 1.25e5, true},
               {"Gb/s", 1.25e8, true}, {"Tb/s", 1.25e11, true}, {"s", 1, false}, {"ms", 1e-3, false},
               {"us", 1e-6, false}, {"ns", 1e-9, false}};
  if (!*end && !rate) { /* a bare number: a fraction (overlap) */
    *out = v * factor;
    return true;
  }
  for (size_t i = 0; i < sizeof units / sizeof units[0]; i++)
    if (units[i].rate == rate && strcmp(end, units[i].unit) == 0) {
      *out = v * units[i].scale * factor;
      return true;
    }
  return false;
}

bool moert_net_parse(const char *spec, const moert_calib *c, moert_net *n, moert_status *st) {
  char buf[512];
  if (strlen(spec) >= sizeof buf) return MOERT_FAIL(st, "--net: too long (limit is %zu bytes)", sizeof buf - 1);
  snprintf(buf, sizeof buf, "%s", spec);
  char *save = NULL;
  for (char *item = strtok_r(buf, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
    char *eq = strchr(item, '=');
    if (!eq)
      return MOERT_FAIL(st, "--net: `%s` is not KEY=VALUE; the keys are nvlink, ib, alpha_intra, alpha_inter, "
                        "overlap (e.g. \"nvlink=450GB/s,ib=8x400Gb/s,alpha_intra=3us,alpha_inter=10us\")", item);
    *eq = 0;
    const char *key = item, *val = eq + 1;
    double *dst = NULL;
    bool rate = false;
    if (strcmp(key, "nvlink") == 0) dst = &n->nvlink, rate = true;
    else if (strcmp(key, "ib") == 0) dst = &n->ib, rate = true;
    else if (strcmp(key, "alpha_intra") == 0) dst = &n->alpha_intra;
    else if (strcmp(key, "alpha_inter") == 0) dst = &n->alpha_inter;
    else if (strcmp(key, "overlap") == 0) dst = &n->overlap;
    else
      return MOERT_FAIL(st, "--net: unknown key `%s`; the keys are nvlink, ib, alpha_intra, alpha_inter, overlap",
                        key);
    if (strcmp(val, "measured") == 0 && (dst == &n->nvlink || dst == &n->alpha_intra)) {
      if (!c || !c->has_a2a)
        return MOERT_FAIL(st, "--net %s=measured: the calibration%s%s has no all-to-all measurement; calibrate "
                          "under mpirun with several ranks (`mpirun -np 2 ./model --calibrate FILE`)",
                          key, c ? " " : "", c ? c->source : "");
      *dst = dst == &n->nvlink ? c->a2a_beta : c->a2a_alpha_s;
      continue;
    }
    double v;
    bool is_overlap = dst == &n->overlap;
    if (!parse_quantity(val, rate, &v) || (is_overlap && (v < 0 || v > 1)) || (rate && !(v > 0)) ||
        (!rate && !is_overlap && strchr(val, 's') == NULL))
      return MOERT_FAIL(st, "--net: bad value `%s` for %s (%s)", val, key,
                        rate ? "a bandwidth such as 450GB/s or 8x400Gb/s, above 0"
                        : is_overlap ? "a fraction from 0 to 1"
                                     : "a time such as 3us or 10us");
    *dst = v;
  }
  return true;
}

/* --- the model --- */

double moert_cost_kernel_bytes(moert_kernel_kind k, int64_t T, int64_t K, int64_t E, int64_t C, int64_t M, int es,
                               double n) {
  double t = (double)T, tk = (double)T * K, ecm = (double)E * C * M;
  switch (k) {
  case MOERT_K_GATE: return 12.0 * t * E;     /* logits in, scores out, their top-k read again */
  case MOERT_K_GATE_BWD: return 8.0 * t * E;  /* scores in, d logits out */
  case MOERT_K_DISPATCH: return 4.0 * tk * M + es * ecm;        /* tokens read per claim, [E, C, M] written */
  case MOERT_K_COMBINE: return es * tk * M + 4.0 * t * M;       /* claimed slots read, tokens written */
  case MOERT_K_DISPATCH_BWD: return es * tk * M + 4.0 * t * M;  /* d slots read per claim, d tokens written */
  case MOERT_K_COMBINE_BWD: return 4.0 * t * M + es * tk * M + es * ecm; /* d out and slots read, d slots written */
  case MOERT_K_ACT:
  case MOERT_K_COPY: return es * n;
  default: return 0;
  }
}

static double kernel_s(const moert_calib *c, moert_kernel_kind k, double bytes) {
  return bytes > 0 ? c->launch_s + bytes / c->bw[k] : 0;
}

double moert_cost_a2a(moert_a2a_algo algo, double bytes, int W, const moert_net *n, double *intra, double *inter) {
  *intra = *inter = 0;
  if (W <= 1) return 0;
  int G = n->ranks_per_node < W ? n->ranks_per_node : W;
  if (G < 1) G = 1;
  int N = (W + G - 1) / G;
  double ib_gpu = n->ib / G;
  if (algo == MOERT_A2A_LINEAR || N == 1) {
    *intra = G > 1 ? (G - 1) * n->alpha_intra + bytes * (G - 1) / W / n->nvlink : 0;
    *inter = N > 1 ? (W - G) * n->alpha_inter + bytes * (W - G) / W / ib_gpu : 0;
    return *intra > *inter ? *intra : *inter; /* the two kinds of message are in flight at once */
  }
  *intra = (G - 1) * n->alpha_intra + bytes * (G - 1) / G / n->nvlink;
  *inter = (N - 1) * n->alpha_inter + bytes * (N - 1) / N / ib_gpu;
  return *intra + *inter;
}

double moert_cost_ring(double bytes, int g, const moert_net *n) {
  if (g <= 1) return 0;
  bool inside = g <= n->ranks_per_node;
  double bw = inside ? n->nvlink : n->ib / n->ranks_per_node;
  double alpha = inside ? n->alpha_intra : n->alpha_inter;
  return (g - 1) * alpha + bytes * (g - 1) / g / bw;
}

int64_t moert_cost_capacity(const moert_plan *p, int li) {
  const moert_layer *l = &p->model->layers[li];
  const moert_layer_plan *lp = &p->layers[li];
  int64_t T = p->tokens, spe = (T + l->experts - 1) / l->experts;
  int64_t C = l->capacity_factor > 0 ? moert_capacity(l, T, 0) : moert_capacity(l, T, l->top_k * spe);
  C = moert_round_up(C, lp->align);
  return C < lp->capacity_bound ? C : lp->capacity_bound;
}

/* The expert FFN over n experts of `rows` rows each, width h (h1 for fc1's
 * output): forward or backward, GEMMs and activation. */
static double experts_s(const moert_calib *c, const moert_layer *l, int es, double n, double rows, double M,
                        double h, double h1, bool backward) {
  if (rows <= 0) return 0;
  double fc1 = 2 * rows * M * h1 * n, fc2 = 2 * rows * h * M * n;
  /* relu and gelu run in fc1's epilogue: free in cuBLASLt's, a pass over
   * the rows on the cpu */
  bool fused = (l->act == MOERT_ACT_RELU || l->act == MOERT_ACT_GELU) && strcmp(c->backend, "cuda") == 0;
  /* the biases' gradients read the output gradients once more */
  double bias = l->bias && backward ? kernel_s(c, MOERT_K_ACT, es * n * rows * (h1 + M)) : 0;
  if (!backward)
    return moert_calib_gemm_s(c, MOERT_GEMM_NN, fc1) + moert_calib_gemm_s(c, MOERT_GEMM_NN, fc2) +
           (fused ? 0 : kernel_s(c, MOERT_K_ACT, es * n * rows * (h1 + h)));
  return moert_calib_gemm_s(c, MOERT_GEMM_TN, fc2) + moert_calib_gemm_s(c, MOERT_GEMM_NT, fc2) +
         kernel_s(c, MOERT_K_ACT, es * n * rows * (2 * h1 + h)) + moert_calib_gemm_s(c, MOERT_GEMM_TN, fc1) +
         moert_calib_gemm_s(c, MOERT_GEMM_NT, fc1) + bias;
}

void moert_cost_variant(const moert_plan *p, int li, int vi, int64_t C, const moert_calib *c, const moert_net *n,
                        bool training, moert_cost *out) {
  const moert_model *m = p->model;
  const moert_layer *l = &m->layers[li];
  const moert_layer_plan *lp = &p->layers[li];
  const moert_variant *v = &lp->variants[vi];
  memset(out, 0, sizeof *out);
  if (C <= 0) C = moert_cost_capacity(p, li);
  out->capacity = C;
  int W = p->world;
  int es = m->dtype == MOERT_DT_BF16 && c->dtype_bytes == 2 ? 2 : 4;
  double T = (double)p->tokens, M = (double)m->dim, E = (double)l->experts;
  double H = (double)l->hidden, halves = l->act == MOERT_ACT_SWIGLU ? 2 : 1, H1 = halves * H;
  int64_t S = lp->shards;
  double *t = out->t;

  /* the gate: its GEMMs (the cosine gate's projection and similarity) and kernels */
  double P = MOERT_COSINE_PROJ;
  bool cosine = l->gate == MOERT_GATE_COSINE;
  double g1 = cosine ? 2 * T * M * P : 2 * T * M * E, g2 = cosine ? 2 * T * P * E : 0;
  t[MOERT_COST_GATE] = moert_calib_gemm_s(c, MOERT_GEMM_NN, g1) + moert_calib_gemm_s(c, MOERT_GEMM_NN, g2) +
                       kernel_s(c, MOERT_K_GATE, moert_cost_kernel_bytes(MOERT_K_GATE, p->tokens, l->top_k,
                                                                         l->experts, C, m->dim, es, 0));
  int64_t Ti = p->tokens, Ki = l->top_k, Ei = l->experts, Mi = m->dim;
  t[MOERT_COST_DISPATCH] = kernel_s(c, MOERT_K_DISPATCH, moert_cost_kernel_bytes(MOERT_K_DISPATCH, Ti, Ki, Ei, C, Mi, es, 0)) +
                           kernel_s(c, MOERT_K_COMBINE, moert_cost_kernel_bytes(MOERT_K_COMBINE, Ti, Ki, Ei, C, Mi, es, 0));
  if (training) {
    t[MOERT_COST_GATE] += kernel_s(c, MOERT_K_GATE_BWD, moert_cost_kernel_bytes(MOERT_K_GATE_BWD, Ti, Ki, Ei, C, Mi, es, 0)) +
                          moert_calib_gemm_s(c, MOERT_GEMM_TN, g1) + moert_calib_gemm_s(c, MOERT_GEMM_NT, g1) +
                          moert_calib_gemm_s(c, MOERT_GEMM_TN, g2) + moert_calib_gemm_s(c, MOERT_GEMM_NT, g2);
    t[MOERT_COST_DISPATCH] +=
        kernel_s(c, MOERT_K_COMBINE_BWD, moert_cost_kernel_bytes(MOERT_K_COMBINE_BWD, Ti, Ki, Ei, C, Mi, es, 0)) +
        kernel_s(c, MOERT_K_DISPATCH_BWD, moert_cost_kernel_bytes(MOERT_K_DISPATCH_BWD, Ti, Ki, Ei, C, Mi, es, 0));
  }

  /* the replicated gradients of this layer (the gate's), summed over ranks */
  if (training && W > 1) {
    double repl = 0;
    for (int i = l->param_first; i < l->param_first + l->nparams; i++)
      if (m->params[i].place == MOERT_PLACE_REPLICATED) repl += (double)p->params[i].count;
    t[MOERT_COST_ALLREDUCE] = 2 * moert_cost_ring(4 * repl, W, n);
  }

  /* expert parameters gathered (r = 0: all of them over the world; r < S:
   * the P base slices of a class), their gradients reduce-scattered back */
  int r = v->r;
  if (r == 0 || r < S) {
    double bias = l->bias ? H1 + M : 0;
    double elems = r == 0 ? E * (M * H1 + H * M + bias) : (M * H1 + H * M + (l->bias ? H1 : 0)) / r;
    int group = r == 0 ? W : (int)(S / r);
    if (group > 1)
      t[MOERT_COST_GATHER] = moert_cost_ring(es * elems, group, n) + (training ? moert_cost_ring(4 * elems, group, n) : 0);
    else /* a group of one copies: the parameters in, their gradients out */
      t[MOERT_COST_GATHER] = kernel_s(c, MOERT_K_COPY, 2 * es * elems) + (training ? kernel_s(c, MOERT_K_COPY, 8 * elems) : 0);
  }

  if (r == 0 || W == 1) { /* the tokens stay: every expert (r = 0) or the local ones, whole */
    double ne = r == 0 ? E : (double)lp->experts_local;
    t[MOERT_COST_EXPERTS] = experts_s(c, l, es, ne, (double)C, M, H, H1, false) +
                            (training ? experts_s(c, l, es, ne, (double)C, M, H, H1, true) : 0);
  } else {
    /* d chunks of every source's slots, each sent to the experts, computed
     * and sent back (moe.c's exchange_pass) */
    int64_t Pq = S == 1 ? 1 : S / r, d = v->d;
    double Cx = (double)(C / Pq / d), ne = S == 1 ? (double)lp->experts_local : 1;
    double rows = W * Cx, h = H / r, h1 = halves * h;
    double bytes = es * W * ne * Cx * M; /* one chunk's all-to-all, per rank */
    double intra, inter, a2a = moert_cost_a2a(v->a2a, bytes, W, n, &intra, &inter);
    /* pack, the received rows to expert-major and back, the sum of what
     * returns: 9 copies of a chunk, in 2 + 2 W copy ops (4 W when S > 1) */
    double copy_ops = S == 1 ? 2 + 2.0 * W : 4.0 * W;
    double layout = 9 * bytes / c->bw[MOERT_K_COPY] + copy_ops * c->launch_s;
    if (v->a2a == MOERT_A2A_2DH) layout += 2 * kernel_s(c, MOERT_K_COPY, 2 * bytes) * 2; /* 2dh's transforms, there and back */
    int passes = training ? 2 : 1;
    for (int pass = 0; pass < passes; pass++) {
      double x = d * experts_s(c, l, es, ne, rows, M, h, h1, pass == 1);
      double a = 2.0 * d * a2a;
      t[MOERT_COST_EXPERTS] += x;
      t[MOERT_COST_A2A] += a;
      t[MOERT_COST_LAYOUT] += d * layout + kernel_s(c, MOERT_K_COPY, es * E * C * M); /* the output zeroed */
      out->a2a_intra += 2.0 * d * intra;
      out->a2a_inter += 2.0 * d * inter;
      /* chunk i's experts run while chunk i+1's all-to-all is in flight */
      t[MOERT_COST_OVERLAP] -= n->overlap * (a < x ? a : x) * (double)(d - 1) / (double)d;
    }
  }
  for (int k = 0; k < MOERT_COST__COUNT; k++) out->total += t[k];
}

void moert_cost_order(const moert_plan *p, int li, int64_t C, const moert_calib *c, const moert_net *n,
                      bool training, int *order, moert_cost *cost) {
  const moert_layer_plan *lp = &p->layers[li];
  double tot[MOERT_MAX_VARIANTS];
  for (int v = 0; v < lp->nvariants; v++) {
    moert_cost k;
    moert_cost_variant(p, li, v, C, c, n, training, &k);
    if (cost) cost[v] = k;
    tot[v] = k.total;
    order[v] = v;
  }
  /* insertion sort, stable: ties keep the spec's order */
  for (int i = 1; i < lp->nvariants; i++)
    for (int j = i; j > 0 && tot[order[j]] < tot[order[j - 1]]; j--) {
      int x = order[j];
      order[j] = order[j - 1];
      order[j - 1] = x;
    }
}

/* --- printing --- */

static int64_t ns(double s) { return (int64_t)llround(s * 1e9); }

static const char *ms(char *buf, size_t n, double s) {
  snprintf(buf, n, "%.3f", s * 1e3);
  return buf;
}

/* The term in which the best variant gains most over the runner-up. */
static int dominant(const moert_cost *best, const moert_cost *next) {
  int k = 0;
  double most = -INFINITY;
  for (int i = 0; i < MOERT_COST__COUNT; i++)
    if (next->t[i] - best->t[i] > most) {
      most = next->t[i] - best->t[i];
      k = i;
    }
  return k;
}

void moert_cost_print(const moert_plan *p, const moert_calib *c, const moert_net *n, bool training, FILE *out,
                      bool json) {
  const moert_model *m = p->model;
  int W = p->world, G = n->ranks_per_node < W ? n->ranks_per_node : W;
  int64_t mem = moert_plan_memory_bytes(p, training);
  char b1[32], b2[32];
  if (json) {
    fputs("  \"prediction\": {\n    \"calibration\": {\"device\": ", out);
    moert_json_str(out, c->device);
    fputs(", \"backend\": ", out);
    moert_json_str(out, c->backend);
    fputs(", \"source\": ", out);
    moert_json_str(out, c->source);
    fprintf(out, "},\n    \"network\": {\"nvlink_bytes_per_s\": %.0f, \"ib_bytes_per_s\": %.0f, \"alpha_intra_ns\": %"
                 PRId64 ", \"alpha_inter_ns\": %" PRId64 ", \"overlap\": %g, \"ranks_per_node\": %d},\n",
            n->nvlink, n->ib, ns(n->alpha_intra), ns(n->alpha_inter), n->overlap, n->ranks_per_node);
    fprintf(out, "    \"memory_per_rank\": %" PRId64 ",\n    \"layers\": [", mem);
  } else {
    fprintf(out, "\nprediction of a step (forward%s), per MoE layer, in ms\n", training ? " and backward" : "");
    fprintf(out, "  calibration: %s (%s backend), from %s\n", c->device, c->backend, c->source);
    fprintf(out, "  network: NVLink %.0f GB/s a GPU, InfiniBand %.0f GB/s a node, alpha %.3g us inside a node, "
                 "%.3g us across; %d rank%s a node (%d node%s); overlap %g\n",
            n->nvlink / 1e9, n->ib / 1e9, n->alpha_intra * 1e6, n->alpha_inter * 1e6, n->ranks_per_node,
            n->ranks_per_node == 1 ? "" : "s", (W + G - 1) / G, (W + G - 1) / G == 1 ? "" : "s", n->overlap);
    fprintf(out, "  memory per rank: %.2f MB (every variant: the pools are planned for the largest)\n", mem / 1e6);
    if (m->dtype == MOERT_DT_BF16 && c->dtype_bytes != 2)
      fputs("  note: a bf16 model predicted with an fp32 calibration (its experts as they run there: fp32)\n", out);
    if (m->dtype != MOERT_DT_BF16 && c->dtype_bytes == 2)
      fputs("  note: an fp32 model predicted with a bf16 calibration: its GEMM rates are bf16's, too fast\n", out);
  }
  bool first = true;
  for (int li = 0; li < m->nlayers; li++) {
    const moert_layer_plan *lp = &p->layers[li];
    if (m->layers[li].kind != MOERT_L_MOE) continue;
    int order[MOERT_MAX_VARIANTS];
    moert_cost cost[MOERT_MAX_VARIANTS];
    moert_cost_order(p, li, 0, c, n, training, order, cost);
    const moert_cost *best = &cost[order[0]];
    int dom = -1;
    double gain = 0;
    if (lp->nvariants > 1) {
      dom = dominant(best, &cost[order[1]]);
      gain = cost[order[1]].t[dom] - best->t[dom];
    }
    if (json) {
      fprintf(out, "%s\n      {\"name\": ", first ? "" : ",");
      moert_json_str(out, m->layers[li].name);
      fprintf(out, ", \"capacity\": %" PRId64 ", \"best\": \"%s\", \"dominant\": ", best->capacity,
              lp->variants[order[0]].name);
      if (dom >= 0)
        fprintf(out, "{\"term\": \"%s\", \"vs\": \"%s\", \"gain_ns\": %" PRId64 "}", moert_cost_term_names[dom],
                lp->variants[order[1]].name, ns(gain));
      else
        fputs("null", out);
      fputs(", \"variants\": [", out);
      for (int v = 0; v < lp->nvariants; v++) {
        const moert_cost *k = &cost[v];
        fprintf(out, "%s\n        {\"name\": \"%s\", \"total_ns\": %" PRId64, v ? "," : "", lp->variants[v].name,
                ns(k->total));
        for (int t = 0; t < MOERT_COST__COUNT; t++)
          fprintf(out, ", \"%s_ns\": %" PRId64, moert_cost_term_names[t], ns(k->t[t]));
        fprintf(out, ", \"a2a_intra_ns\": %" PRId64 ", \"a2a_inter_ns\": %" PRId64 ", \"mem_bytes\": %" PRId64 "}",
                ns(k->a2a_intra), ns(k->a2a_inter), lp->variants[v].mem_bytes);
      }
      fputs("]}", out);
    } else {
      fprintf(out, "\n  moe %s: C = %" PRId64 " (%s)\n", m->layers[li].name, best->capacity,
              m->layers[li].capacity_factor > 0 ? "fixed" : "assumed: balanced routing");
      fprintf(out, "    %-20s %9s %9s %8s %9s %8s %9s %15s %9s %8s %9s %10s\n", "variant", "total", "experts", "gate",
              "disp+comb", "layout", "a2a", "(intra/inter)", "overlap", "gather", "allreduce", "own mem");
      for (int i = 0; i < lp->nvariants; i++) {
        int v = order[i];
        const double *t = cost[v].t;
        char ph[40];
        snprintf(ph, sizeof ph, "%.3f/%.3f", cost[v].a2a_intra * 1e3, cost[v].a2a_inter * 1e3);
        fprintf(out, "    %-20s %9.3f %9.3f %8.3f %9.3f %8.3f %9.3f %15s %9.3f %8.3f %9.3f %8.2fMB\n",
                lp->variants[v].name, cost[v].total * 1e3, t[MOERT_COST_EXPERTS] * 1e3, t[MOERT_COST_GATE] * 1e3,
                t[MOERT_COST_DISPATCH] * 1e3, t[MOERT_COST_LAYOUT] * 1e3, t[MOERT_COST_A2A] * 1e3, ph,
                t[MOERT_COST_OVERLAP] * 1e3, t[MOERT_COST_GATHER] * 1e3, t[MOERT_COST_ALLREDUCE] * 1e3,
                (double)lp->variants[v].mem_bytes / 1e6);
      }
      if (dom >= 0)
        fprintf(out, "    best: %s (%s ms); its lead over %s (%s ms) is mostly %s: %s ms less\n",
                lp->variants[order[0]].name, ms(b1, sizeof b1, best->total), lp->variants[order[1]].name,
                ms(b2, sizeof b2, cost[order[1]].total), moert_cost_term_names[dom],
                ms((char[32]){0}, 32, gain));
      else
        fprintf(out, "    best: %s (%s ms), the only candidate\n", lp->variants[order[0]].name,
                ms(b1, sizeof b1, best->total));
    }
    first = false;
  }
  if (json) fputs("\n    ]\n  }\n", out);
}
