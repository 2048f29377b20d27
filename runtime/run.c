/* run.c — a run of a moec-built model (run.h): the comm and backend its
 * options ask for, the header, the training (or inference) loop with the
 * selector, evaluation, checkpoints, the table and the metrics file, and text
 * sampling. moert_main (driver.c) is the command line over it. */
#include "run.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "checkpoint.h"
#include "ckpt_io.h"
#include "comm.h"
#include "data.h"
#include "moe.h"
#include "placement.h"
#include "rng.h"
#include "select.h"
#include "testing.h"

void moert_run_defaults(const moert_model *m, moert_run_opts *o) {
  *o = (moert_run_opts){0};
  o->timeout = MOERT_DEFAULT_TIMEOUT_S;
  o->steps = m->train.steps;
  o->seed = m->train.seed;
  o->log_every = m->train.log_every;
  o->tokens = m->tokens;
  o->eval_every = m->train.eval_every;
  o->ckpt_every = m->train.checkpoint_every;
  o->backend = NULL; /* cuda when a GPU is found */
  o->data = m->train.data_path;
  o->checkpoint = m->train.checkpoint;
}

/* A bad environment setting, as the command line's usage errors (status 2). */
static int usage_error(const char *argv0, const char *msg, const char *arg) {
  fprintf(stderr, "%s: ", argv0);
  fprintf(stderr, msg, arg);
  fprintf(stderr, "\nTry '%s --help' for more information.\n", argv0);
  return 2;
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void json_num(FILE *f, double v) {
  if (isfinite(v)) fprintf(f, "%.17g", v); /* reads back exactly */
  else fputs("null", f);
}

static void human(char *buf, size_t n, double v, const char *unit) {
  const char *pre[] = {"", "k", "M", "G", "T"};
  int k = 0;
  while (v >= 1000 && k < 4) {
    v /= 1000;
    k++;
  }
  snprintf(buf, n, k ? "%.2f %s%s" : "%.0f %s%s", v, pre[k], unit);
}

static void print_header(const moert_model *m, const moert_plan *p, moert_dt xdt, const moert_run_opts *o,
                         const moert_backend *b, const moert_comm *c, FILE *out) {
  int nmoe = 0, nlayers = 0;
  for (int i = 0; i < m->nlayers; i++) {
    moert_layer_kind k = m->layers[i].kind;
    nmoe += k == MOERT_L_MOE;
    nlayers += k == MOERT_L_MOE || k == MOERT_L_FFN || k == MOERT_L_LAYERNORM || k == MOERT_L_RMSNORM;
  }
  char pb[32], mb[32];
  human(pb, sizeof pb, (double)p->global_params, "");
  human(mb, sizeof mb, (double)moert_exec_bytes(p, m->train.has_train), "B");
  fprintf(out, "model %s (%s): %s parameters, %d layers (%d moe)%s\n", m->name, m->spec_file, pb,
          nlayers, nmoe, m->vocab ? ", byte-level language model" : ", regression on a teacher MLP");
  const char *prec = xdt == MOERT_BF16 ? "bf16 experts, dense FFNs and head; fp32 gating, norms, embeddings, masters"
                    : m->dtype == MOERT_DT_BF16 && strcmp(b->name, "cpu") ? "fp32: M or H / S is odd"
                                                                         : "fp32";
  const bool device = strcmp(b->name, "cpu") != 0, nccl = strcmp(c->name, "nccl") == 0;
  fprintf(out, "backend %s (%s%s), comm %s%s, %d rank%s, %" PRId64 " tokens per rank, %s on this rank\n",
          b->name, prec, o->backend ? "" : device ? "; a GPU was found" : "; no GPU found", c->name,
          nccl ? " (GPU memory, a GPU per rank)" : device && c->world > 1 ? " (staged through host memory)" : "",
          c->world, c->world == 1 ? "" : "s", p->tokens, mb);
  if (m->train.has_train) {
    const moert_train *t = &m->train;
    fprintf(out, "training to step %" PRId64 ": %s, lr %g%s%s, %s\n", o->steps,
            t->optimizer == MOERT_OPT_ADAM ? "adamw" : "sgd", t->lr,
            t->schedule == MOERT_SCHED_COSINE ? " (cosine)" : "", t->warmup ? " with warm-up" : "",
            o->data ? o->data : "synthetic data");
  } else {
    fprintf(out, "inference: %" PRId64 " forward steps\n", o->steps);
  }
  for (int i = 0, shown = 0; i < m->nlayers; i++) {
    if (m->layers[i].kind != MOERT_L_MOE) continue;
    const moert_layer_plan *lp = &p->layers[i];
    if (shown++ == 4) {
      fputs("  (more MoE layers: the same candidates where their shapes agree)\n", out);
      break;
    }
    fprintf(out, "  moe %s: E %" PRId64 ", S %" PRId64 ", candidates:", m->layers[i].name,
            m->layers[i].experts, lp->shards);
    for (int v = 0; v < lp->nvariants; v++) fprintf(out, " %s", lp->variants[v].name);
    if (lp->dropped[0]) fprintf(out, "; not here: %s", lp->dropped);
    fputc('\n', out);
  }
  char how[160];
  if (o->nvariants == 1 && strcmp(o->variants[0], "cycle") == 0)
    snprintf(how, sizeof how, "cycled through every candidate, one a step (--variant cycle)");
  else if (o->nvariants > 0)
    snprintf(how, sizeof how, "forced by --variant %s%s", o->variants[0], o->nvariants > 1 ? " and more" : "");
  else
    snprintf(how, sizeof how, "%s", m->parallel.select == MOERT_SELECT_FIXED ? "fixed (the spec's first candidate)"
                                    : m->parallel.select == MOERT_SELECT_PREDICTED ? "predicted by the cost model, not measured"
                                                                                   : "chosen each step by measured time");
  fprintf(out, "variants: %s (r = expert split, d = pipeline depth, L/H = linear/2dh all-to-all)\n", how);
}

/* Skipped steps (--on-nan skip) said on stderr; the metrics count them all. */
#define MAX_SKIP_WARNINGS 10

/* The table's head: z_loss only for a model with a router z-loss (so the
 * tables of others stay as they were), MFU (model FLOPs utilization) only when
 * a peak is known. The rows' format (the loop) follows the same columns. */
static void print_table_head(FILE *out, bool z_loss, bool mfu) {
  fprintf(out, "   step       loss        aux%s        lr  grad_norm      tok/s  TFLOP/s%s    ms/step  dropped  "
          "variants\n", z_loss ? "     z_loss" : "", mfu ? "    MFU" : "");
}

/* Whether some MoE layer of m has a router z-loss: the metrics' z_loss key
 * and the table's column are there only then. */
static bool has_z_loss(const moert_model *m) {
  for (int i = 0; i < m->nlayers; i++)
    if (m->layers[i].kind == MOERT_L_MOE && m->layers[i].z_loss > 0) return true;
  return false;
}

/* Dense bf16 tensor-core peaks per GPU, TFLOP/s (the vendor's data sheets,
 * without sparsity): MFU's denominator. The first entry whose name is in
 * the device's name and whose compute capability major agrees wins, so the
 * more specific names come first. */
static const struct {
  const char *name;
  int cc_major;
  double tflops;
} GPU_PEAKS[] = {
    {"H100 PCIe", 9, 756.0}, {"H100 NVL", 9, 835.5}, {"H100", 9, 989.4},
    {"H200 NVL", 9, 835.5},  {"H200", 9, 989.4},     {"A100", 8, 312.0},
};

/* The peak MFU is measured against, per GPU (per rank on the cpu), in
 * TFLOP/s: MOEC_PEAK_TFLOPS when set, else the table's entry for the cuda
 * backend's GPU; 0 when none is known (no MFU). *what says where it came
 * from, for the header (an unknown GPU: why there is no MFU). False when
 * MOEC_PEAK_TFLOPS is not a positive number. */
static bool peak_tflops(const moert_backend *b, double *peak, char *what, size_t n) {
  *peak = 0;
  what[0] = 0;
  const char *env = getenv("MOEC_PEAK_TFLOPS");
  if (env && *env) {
    char *end;
    errno = 0;
    double v = strtod(env, &end);
    if (errno || end == env || *end || !(v > 0) || !isfinite(v)) return false;
    *peak = v;
    snprintf(what, n, "peak %g TFLOP/s per %s, from MOEC_PEAK_TFLOPS", v,
             b == moert_backend_cpu() ? "rank" : "GPU");
    return true;
  }
  const char *name = moert_backend_cuda_device_name(b);
  int major = 0, minor = 0;
  if (!name || !moert_backend_cuda_compute_capability(b, &major, &minor)) return true; /* the cpu */
  for (size_t i = 0; i < sizeof GPU_PEAKS / sizeof GPU_PEAKS[0]; i++)
    if (strstr(name, GPU_PEAKS[i].name) && major == GPU_PEAKS[i].cc_major) {
      *peak = GPU_PEAKS[i].tflops;
      snprintf(what, n, "peak %g TFLOP/s dense bf16 per GPU (%s, sm_%d%d)", *peak, name, major, minor);
      return true;
    }
  snprintf(what, n, "no MFU column: no dense bf16 peak is known for %s (sm_%d%d); set MOEC_PEAK_TFLOPS "
           "(TFLOP/s per GPU)", name, major, minor);
  return true;
}

/* The device's free and total bytes: the cuda backend's, or the test
 * hook's (testing.h) on any backend. False: unknown. */
static bool device_memory(const moert_backend *b, double *free_b, double *total_b) {
  const moert_test_hooks *hooks = moert_testing();
  if (hooks->device_memory) {
    *free_b = hooks->device_free;
    *total_b = hooks->device_total;
    return true;
  }
  size_t f = 0, t = 0;
  if (!moert_backend_cuda_mem_info(b, &f, &t)) return false;
  *free_b = (double)f;
  *total_b = (double)t;
  return true;
}

/* Before any pool is allocated: each rank's planned bytes against its
 * device's free memory. When some rank's do not fit, every rank fails alike
 * (*agreed: no abort needed) and *reporter is the first rank short of
 * memory, the one that prints its message; the others record a short one. */
static bool check_memory(const moert_plan *p, bool training, const moert_backend *b, moert_comm *comm,
                         bool *agreed, int *reporter, moert_status *st) {
  double fr = 0, tot = 0;
  bool known = device_memory(b, &fr, &tot);
  double need = (double)moert_exec_bytes(p, training);
  int W = comm->world;
  double *v = calloc((size_t)W, sizeof *v);
  if (!v) return MOERT_FAIL(st, "out of memory");
  v[comm->rank] = known && need > fr ? 1 : 0;
  if (W > 1 && !comm->all_reduce_f64(comm, v, W, MOERT_RED_SUM, st)) {
    free(v);
    return MOERT_UP(st);
  }
  int first = -1;
  for (int r = 0; r < W && first < 0; r++)
    if (v[r] > 0) first = r;
  free(v);
  if (first < 0) return true;
  *agreed = true;
  *reporter = first;
  if (first != comm->rank && !(known && need > fr))
    return MOERT_FAIL(st, MOERT_OOM_PREFIX " on rank %d (its message says why)", first);
  return moert_exec_oom(p, training, moert_backend_cuda_device_name(b), fr, tot, st);
}

/* A check that every rank makes at the same point of the run (a setting,
 * the checkpoint directory, the metrics file): ok is this rank's result,
 * its message in st when false. When some rank failed, every rank fails
 * alike (*agreed: the run ends with status 1 on every rank, no abort), and
 * the first rank that failed (rank 0 for what every rank sees) prints its
 * message, once, before any rank exits; the others record a short one.
 * False with *agreed unset: the collective itself failed. */
static bool agree(moert_comm *comm, bool ok, const char *argv0, bool *agreed, moert_status *st);

/* The signal (SIGTERM, SIGINT) that asked the run to stop, 0 while none came.
 * A flag for the handler is necessarily process-wide; the run resets it when
 * it installs the handlers and reads it once per step. */
static volatile sig_atomic_t stop_signal;

static const int stop_signals[2] = {SIGTERM, SIGINT};

/* The first SIGTERM or SIGINT: noted, and both (those this handler catches)
 * set back to their default action, so that a second one ends the process at
 * once. sigaction is async-signal-safe. */
static void on_stop_signal(int sig) {
  struct sigaction dfl = {.sa_handler = SIG_DFL}, cur;
  stop_signal = sig;
  for (int i = 0; i < 2; i++)
    if (sigaction(stop_signals[i], NULL, &cur) == 0 && cur.sa_handler == on_stop_signal)
      sigaction(stop_signals[i], &dfl, NULL);
}

/* Catches SIGTERM and SIGINT for the steps; OLD receives what was there. A
 * signal that was ignored stays ignored (a shell's background job ignores
 * SIGINT: whoever started it asked for that). */
static void stop_signals_catch(struct sigaction old[2]) {
  struct sigaction sa = {.sa_handler = on_stop_signal, .sa_flags = SA_RESTART};
  sigemptyset(&sa.sa_mask);
  stop_signal = 0;
  for (int i = 0; i < 2; i++)
    if (sigaction(stop_signals[i], NULL, &old[i]) == 0 && old[i].sa_handler != SIG_IGN)
      sigaction(stop_signals[i], &sa, NULL);
}

static void stop_signals_restore(const struct sigaction old[2]) {
  for (int i = 0; i < 2; i++) sigaction(stop_signals[i], &old[i], NULL);
}

/* A resumed run's JSON-lines file of steps (the metrics, the routing trace:
 * every line begins `{"step": N`): keeps the lines of steps up to the
 * checkpoint's step START, and cuts the file at the byte after them, so the
 * steps that follow are appended once each. Lines past START, an earlier
 * resume's marker at START (the resume writes its own) and a torn last line
 * go. A cut loses nothing a crash could: what stays is never rewritten. F is
 * open for reading and appending ("a+"); WHAT names the file in a failure
 * ("metrics file"). */
static bool jsonl_cut(FILE *f, const char *what, const char *path, int64_t start, moert_status *st) {
  char *line = NULL;
  size_t cap = 0;
  ssize_t n;
  off_t keep = 0;
  rewind(f);
  while ((n = getline(&line, &cap, f)) > 0) {
    long long step;
    int used = 0;
    if (line[n - 1] != '\n' || sscanf(line, "{\"step\": %lld%n", &step, &used) != 1 || used == 0) break;
    if (step > start || (step == start && strstr(line, "\"resumed\": true"))) break;
    keep += (off_t)n;
  }
  free(line);
  if (ferror(f) || fflush(f) != 0 || ftruncate(fileno(f), keep) != 0)
    return MOERT_FAIL(st, "cannot rewrite the %s %s: %s", what, path, strerror(errno));
  return true;
}

/* What a step's metrics add for the variants: what the switch cost, and the
 * selector's table when a layer finished exploring. */
typedef struct step_extra {
  int64_t switch_bytes, switch_allocs;
  const moert_selector *explored; /* NULL: nothing new */
} step_extra;

/* "r1d2L r0": the variant of each MoE layer, short. */
static void variants_short(const moert_model *m, const moert_plan *p, const moert_exec *e, char *buf,
                           size_t n) {
  size_t k = 0;
  buf[0] = 0;
  for (int li = 0; li < m->nlayers && k + 12 < n; li++) {
    if (m->layers[li].kind != MOERT_L_MOE) continue;
    const moert_variant *v = &p->layers[li].variants[e->moe.variant[li]];
    k += (size_t)snprintf(buf + k, n - k, "%sr%dd%d%s", k ? " " : "", v->r, v->d,
                          v->r == 0 || p->world == 1 ? "" : v->a2a == MOERT_A2A_2DH ? "H" : "L");
  }
}

/* Writes the step's metrics line; expert load per MoE layer, summed over ranks. */
static void write_metrics(FILE *f, const moert_model *m, const moert_exec *e, int64_t step,
                          const moert_step_stats *s, double ms, double tps, double tflops, double mfu,
                          const double *load, const double *layer_ms, double eval_loss, bool has_eval,
                          const step_extra *x) {
  fprintf(f, "{\"step\": %" PRId64 ", \"loss\": ", step);
  json_num(f, s->loss);
  fputs(", \"aux_loss\": ", f);
  json_num(f, s->aux_loss);
  if (has_z_loss(m)) {
    fputs(", \"z_loss\": ", f);
    json_num(f, s->z_loss);
  }
  fputs(", \"lr\": ", f);
  json_num(f, s->lr);
  fputs(", \"grad_norm\": ", f);
  json_num(f, s->grad_norm);
  if (e->training) /* steps whose update was skipped (--on-nan skip), so far */
    fprintf(f, ", \"skipped\": %" PRId64, e->skipped);
  fputs(", \"ms\": ", f);
  json_num(f, ms);
  fputs(", \"tokens_per_s\": ", f);
  json_num(f, tps);
  fputs(", \"tflops\": ", f);
  json_num(f, tflops);
  if (mfu >= 0) { /* only when a peak is known */
    fputs(", \"mfu\": ", f);
    json_num(f, mfu);
  }
  fputs(", \"dropped\": ", f);
  json_num(f, s->dropped);
  fputs(", \"expert_load\": {", f);
  const double *lp = load;
  bool first = true;
  for (int i = 0; i < m->nlayers; i++) {
    const moert_layer *l = &m->layers[i];
    if (l->kind != MOERT_L_MOE) continue;
    fprintf(f, "%s\"%s\": [", first ? "" : ", ", l->name);
    for (int64_t j = 0; j < l->experts; j++) fprintf(f, "%s%.0f", j ? ", " : "", lp[j]);
    fputc(']', f);
    lp += l->experts;
    first = false;
  }
  fputs("}, \"variants\": {", f);
  first = true;
  for (int i = 0; i < m->nlayers; i++) {
    if (m->layers[i].kind != MOERT_L_MOE) continue;
    fprintf(f, "%s\"%s\": \"%s\"", first ? "" : ", ", m->layers[i].name,
            e->plan->layers[i].variants[e->moe.variant[i]].name);
    first = false;
  }
  fputs("}, \"layer_ms\": {", f);
  first = true;
  for (int i = 0; i < m->nlayers; i++) {
    if (m->layers[i].kind != MOERT_L_MOE) continue;
    fprintf(f, "%s\"%s\": ", first ? "" : ", ", m->layers[i].name);
    json_num(f, layer_ms[i]);
    first = false;
  }
  fputs("}, \"update_ms\": ", f);
  json_num(f, s->update_ms);
  fprintf(f, ", \"switch_bytes\": %" PRId64 ", \"switch_allocs\": %" PRId64, x->switch_bytes, x->switch_allocs);
  if (x->explored) {
    fputs(", \"selector\": {", f);
    first = true;
    for (int i = 0; i < m->nlayers; i++) {
      if (m->layers[i].kind != MOERT_L_MOE) continue;
      if (!first) fputs(", ", f);
      moert_selector_json(x->explored, i, e->moe.capacity[i], f);
      first = false;
    }
    fputc('}', f);
  }
  if (has_eval) {
    fputs(", \"eval_loss\": ", f);
    json_num(f, eval_loss);
  }
  fputs("}\n", f);
  fflush(f);
}

/* The routing trace's numbers per MoE layer, summed over ranks by one
 * all-reduce a step: claims routed, claims dropped, the gate's entropy summed
 * over tokens (exec.h's e->moe.layer_routed, layer_dropped, entropy). */
enum { ROUTING_ROUTED, ROUTING_DROPPED, ROUTING_ENTROPY, ROUTING__SUMS };

/* Writes the step's lines of the routing trace (--routing-trace), one per MoE
 * layer, and flushes them: load is the E global claim counts of each MoE layer
 * in layer order (the metrics' expert_load), sums ROUTING__SUMS per MoE layer
 * over all ranks, tokens all ranks' tokens of the step; bias has room for the
 * largest E floats (the sigmoid gates' bias, read from the backend before
 * the line is begun, so a failure leaves no half line). */
static bool write_routing(FILE *f, moert_exec *e, int64_t step, const double *load, const double *sums,
                          double tokens, float *bias, moert_status *st) {
  const moert_model *m = e->m;
  for (int li = 0; li < m->nlayers; li++) {
    const moert_layer *l = &m->layers[li];
    if (l->kind != MOERT_L_MOE) continue;
    const bool sigmoid = l->gate == MOERT_GATE_SIGMOID;
    if (sigmoid) MOERT_TRY(st, moert_moe_gate_bias(e, li, bias, st));
    fprintf(f, "{\"step\": %" PRId64 ", \"layer\": \"%s\", \"load\": [", step, l->name);
    for (int64_t j = 0; j < l->experts; j++) fprintf(f, "%s%.0f", j ? ", " : "", load[j]);
    const double routed = sums[ROUTING_ROUTED], dropped = sums[ROUTING_DROPPED];
    fputs("], \"dropped\": ", f);
    json_num(f, routed > 0 ? dropped / routed : 0);
    fputs(", \"entropy\": ", f); /* nats per token */
    json_num(f, tokens > 0 ? sums[ROUTING_ENTROPY] / tokens : 0);
    if (sigmoid) {
      fputs(", \"bias\": [", f);
      for (int64_t j = 0; j < l->experts; j++) {
        if (j) fputs(", ", f);
        if (isfinite(bias[j])) fprintf(f, "%.9g", (double)bias[j]); /* a float reads back exactly */
        else fputs("null", f);
      }
      fputc(']', f);
    }
    fputs("}\n", f);
    load += l->experts;
    sums += ROUTING__SUMS;
  }
  fflush(f); /* each step on disk as it ends: a kill loses none */
  return true;
}

/* Sample n bytes after a prompt, temperature 0.8, from the generator, onto
 * out (NULL: nothing printed). Every rank runs it: the forwards of a model
 * with experts on several ranks are collective; rank 0's pick is every
 * rank's. */
static bool sample_text(moert_exec *e, moert_data *d, const char *prompt, int64_t n, uint64_t seed,
                        FILE *out, moert_status *st) {
  const moert_model *m = e->m;
  int64_t ctx = m->context, V = m->vocab;
  char fallback[64] = "";
  if (!prompt) {
    int64_t nb;
    const unsigned char *bytes = moert_data_bytes(d, &nb);
    /* the start of a line in the held-out tail */
    int64_t p = nb - nb / 10;
    while (p < nb - 1 && bytes[p - 1] != '\n') p++;
    int64_t k = 0;
    while (k < 40 && p + k < nb && bytes[p + k] != '\n') {
      fallback[k] = (char)bytes[p + k];
      k++;
    }
    /* end after a whole word, so the model starts the next one */
    while (k > 1 && fallback[k - 1] != ' ') k--;
    fallback[k] = 0;
    prompt = fallback;
  }
  int64_t plen = (int64_t)strlen(prompt);
  for (int64_t i = 0; i < plen; i++) /* the embedding's rows: a byte past them would be read out of bounds */
    if ((unsigned char)prompt[i] >= V)
      return MOERT_FAIL(st, "--prompt: byte %lld of the prompt is %d, outside the model's vocabulary of %lld",
                        (long long)i, (unsigned char)prompt[i], (long long)V);
  int32_t *hist = malloc(sizeof(int32_t) * (size_t)(plen + n + 1));
  int32_t *win = malloc(sizeof(int32_t) * (size_t)ctx);
  float *logits = malloc(sizeof(float) * (size_t)V);
  if (!hist || !win || !logits) {
    free(hist);
    free(win);
    free(logits);
    return MOERT_FAIL(st, "out of memory");
  }
  for (int64_t i = 0; i < plen; i++) hist[i] = (unsigned char)prompt[i];
  int64_t len = plen;
  if (out) fprintf(out, "\nsample (prompt in brackets):\n[%s]", prompt);
  /* One token's forward per byte (moert_exec_decode), attention layers
   * keeping their keys and values in a cache: the prompt's bytes but its
   * last go through it one by one, then the loop below runs the newest byte
   * (the prompt's last, then each one made) and samples from its logits. An
   * empty prompt: a token of an empty window at position 0. */
  bool ok = moert_exec_decode_begin(e, st);
  for (int64_t i = 1; i < plen && ok; i++) {
    for (int64_t c = 0; c < ctx; c++) win[c] = i - 1 - c >= 0 ? hist[i - 1 - c] : -1;
    ok = moert_exec_decode(e, win, logits, st);
  }
  for (int64_t s = 0; s < n && ok; s++) {
    for (int64_t c = 0; c < ctx; c++) win[c] = len - 1 - c >= 0 ? hist[len - 1 - c] : -1;
    if (!moert_exec_decode(e, win, logits, st)) {
      ok = false;
      break;
    }
    double mx = -INFINITY, sum = 0;
    for (int64_t v = 0; v < V; v++) mx = logits[v] > mx ? logits[v] : mx;
    for (int64_t v = 0; v < V; v++) sum += exp((logits[v] - mx) / 0.8);
    double u = moert_rand_uniform(seed, 0x73616d70ull, (uint64_t)s) * sum, acc = 0;
    int64_t pick = V - 1;
    for (int64_t v = 0; v < V; v++) {
      acc += exp((logits[v] - mx) / 0.8);
      if (acc >= u) {
        pick = v;
        break;
      }
    }
    if (e->comm->world > 1) { /* rank 0's, should the ranks' logits differ in a last bit */
      double agreed = e->comm->rank == 0 ? (double)pick : 0;
      if (!e->comm->all_reduce_f64(e->comm, &agreed, 1, MOERT_RED_SUM, st)) {
        ok = false;
        break;
      }
      pick = (int64_t)agreed;
    }
    hist[len++] = (int32_t)pick;
    if (out) fputc(pick == '\n' || (pick >= 32 && pick < 127) ? (int)pick : '?', out);
  }
  if (out) fputs("\n", out);
  free(hist);
  free(win);
  free(logits);
  return ok ? true : MOERT_UP(st);
}

static int fail(const char *argv0, const moert_status *st) {
  fprintf(stderr, "%s: error: %s\n", argv0, st->msg);
  if (getenv("MOEC_TRACE")) fprintf(stderr, "%s: trace: %s\n", argv0, st->trace);
  return 1;
}

static bool agree(moert_comm *comm, bool ok, const char *argv0, bool *agreed, moert_status *st) {
  int W = comm->world, first = ok ? -1 : comm->rank;
  if (W > 1) {
    double *v = calloc((size_t)W, sizeof *v);
    moert_status cst = {0};
    if (!v) return ok ? MOERT_FAIL(st, "out of memory") : false;
    v[comm->rank] = ok ? 0 : 1;
    if (!comm->all_reduce_f64(comm, v, W, MOERT_RED_SUM, &cst)) {
      free(v);
      if (ok) *st = cst;
      return false;
    }
    first = -1;
    for (int r = 0; r < W && first < 0; r++)
      if (v[r] > 0) first = r;
    free(v);
  }
  if (first < 0) return true;
  *agreed = true;
  if (first == comm->rank) fail(argv0, st);
  else if (ok) MOERT_FAIL(st, "rank %d stopped the run (its message says why)", first);
  fflush(stderr);
  moert_status bst = {0};
  if (W > 1) comm->barrier(comm, &bst); /* said before any rank exits (mpirun kills the rest then) */
  return false;
}

/* The step's non-finite values in words: "the loss is NaN and the gradient
 * norm is infinite". */
static void nonfinite_what(const moert_step_stats *s, char *buf, size_t n) {
  const char *loss = isnan(s->loss) ? "NaN" : isinf(s->loss) ? "infinite" : NULL;
  const char *norm = isnan(s->grad_norm) ? "NaN" : isinf(s->grad_norm) ? "infinite" : NULL;
  if (loss && norm) snprintf(buf, n, "the loss is %s and the gradient norm is %s", loss, norm);
  else if (loss) snprintf(buf, n, "the loss is %s", loss);
  else snprintf(buf, n, "the gradient norm is %s (the loss is %g)", norm ? norm : "?", s->loss);
}

/* Where the non-finite values of a skipped step began (a collective), in
 * words: "the output of layer `experts_0` went non-finite first (in forward
 * order)". */
static bool nonfinite_where(moert_exec *e, char *buf, size_t n, moert_status *st) {
  int li = -1;
  bool in_grad = false;
  MOERT_TRY(st, moert_exec_find_nonfinite(e, &li, &in_grad, st));
  if (li < 0)
    snprintf(buf, n, "every layer's output and parameter gradient is finite: the loss layer's own "
             "arithmetic overflowed");
  else if (!in_grad)
    snprintf(buf, n, "the output of layer `%s` went non-finite first (in forward order)", e->m->layers[li].name);
  else
    snprintf(buf, n, "every layer's output is finite; the parameter gradient of layer `%s` went non-finite "
             "first (in backward order)", e->m->layers[li].name);
  return true;
}

int moert_run(const moert_model *m, const moert_run_opts *opts, int *argc, char ***argv, const char *argv0) {
  const moert_run_opts o = *opts;
  const bool want_nccl = o.comm && strcmp(o.comm, "nccl") == 0;
  moert_status st = {0};
  moert_comm *comm = moert_comm_self();
  /* the host comm: mpi under mpirun (or when asked), else self; the nccl
   * comm is made over it once the cuda backend runs */
  bool use_mpi = o.comm && !want_nccl ? strcmp(o.comm, "mpi") == 0 : moert_comm_under_mpirun();
  if (use_mpi && !moert_comm_mpi_create(argc, argv, &comm, &st)) return fail(argv0, &st);
  moert_comm *host_comm = comm;
  /* the collectives' watchdog (--timeout): every comm made over this one takes it */
  moert_watch watch = {.timeout = o.timeout};
  if (comm != moert_comm_self()) comm->watch = &watch;
  const moert_test_hooks *hooks = moert_testing();
  bool want_cuda = o.backend ? strcmp(o.backend, "cuda") == 0 : moert_cuda_available();
  if ((o.backend || want_nccl) && !moert_cuda_available()) {
    if (o.backend && want_cuda)
      MOERT_FAIL(&st, "--backend cuda: no usable NVIDIA GPU was found (no libcuda.so.1, or no device); run "
                 "with --backend cpu");
    else if (want_nccl)
      MOERT_FAIL(&st, "--comm nccl: no usable NVIDIA GPU was found (no libcuda.so.1, or no device); run "
                 "with --comm mpi (or --comm self on one rank)");
    if (st.failed) { /* every rank finds the same: rank 0 says it */
      bool say = comm->rank == 0;
      if (comm != moert_comm_self()) moert_comm_mpi_finalize(comm);
      return say ? fail(argv0, &st) : 1;
    }
  }
  moert_backend *b = moert_backend_cpu();
  if (want_cuda) {
    /* one GPU per rank of a machine, round robin (several ranks may share
     * one): by the rank on the machine, not on the node that MOEC_LOCAL_SIZE
     * simulates, so 2 simulated nodes of 2 on 4 GPUs take GPUs 0-3 */
    int gpus = moert_cuda_device_count();
    int device = gpus > 0 ? comm->host_rank % gpus : 0;
    bool ok = moert_backend_cuda_create(&b, device, o.kernel_cache, !o.no_kernel_cache, m->kernels_cu, &st);
    /* nccl by default where it can run: several ranks, every one with a GPU
     * of its own (by PCI bus id, so ranks that MOEC_LOCAL_SIZE puts on other
     * nodes of one machine count too) and NCCL; all ranks choose alike */
    bool nccl = want_nccl;
    if (ok && !o.comm && host_comm->world > 1)
      ok = moert_comm_nccl_fits(host_comm, b, &nccl, &st);
    if (ok && !(nccl ? moert_comm_nccl_create(host_comm, b, &comm, &st)
                     : moert_comm_staged_create(host_comm, b, &comm, &st))) {
      moert_backend_cuda_destroy(b);
      ok = false;
    }
    if (!ok) {
      if (host_comm->world > 1) { /* the other ranks may have started: stop them all */
        fprintf(stderr, "%s: rank %d: error: %s\n", argv0, host_comm->rank, st.msg);
        fflush(stderr);
        moert_comm_abort(host_comm, 1);
      }
      if (host_comm != moert_comm_self()) moert_comm_mpi_finalize(host_comm);
      return fail(argv0, &st);
    }
  }
  moert_backend_cpu_share_cores(comm->local_size);
  double peak = 0;
  char peak_what[320];
  if (!peak_tflops(b, &peak, peak_what, sizeof peak_what)) {
    if (comm != host_comm) comm->destroy(comm);
    if (b != moert_backend_cpu()) moert_backend_cuda_destroy(b);
    bool say = host_comm->rank == 0; /* every rank reads the same environment */
    if (host_comm != moert_comm_self()) moert_comm_mpi_finalize(host_comm);
    return say ? usage_error(argv0, "bad value '%s' for MOEC_PEAK_TFLOPS (TFLOP/s per GPU, a number above 0)",
                             getenv("MOEC_PEAK_TFLOPS"))
               : 2;
  }
  /* MFU's denominator: one peak per GPU; ranks that share a GPU share its peak */
  double accelerators = comm->world;
  if (b != moert_backend_cpu()) {
    int gpus = moert_cuda_device_count();
    if (gpus > 0 && gpus < comm->local_size) accelerators = (double)comm->nodes * gpus;
  }
  bool training = m->train.has_train;
  /* every rank failed a check alike (agree, check_memory): the first failing
   * rank said why, and no rank aborts */
  bool agreed = false;
  int oom_reporter = 0, my_rank = comm->rank;
  FILE *metrics = NULL, *routing = NULL;
  moert_plan *plan = NULL;
  moert_data *data = NULL;
  moert_exec *e = NULL;
  moert_selector *sel = NULL;
  moert_trace *trace = NULL;
  moert_ckpt_lock *ckpt_lock = NULL;
  double *times = NULL;
  double *load = NULL; /* the step's expert load, summed over ranks (E per MoE layer) */
  double *routing_sums = NULL; /* ROUTING__SUMS per MoE layer (--routing-trace) */
  float *routing_bias = NULL;
  int *prev = NULL;
  int rc = 1;
  struct sigaction old_actions[2];
  bool catching = false;
  int stop_sig = 0;         /* the signal every rank agreed to stop for */
  int64_t stopped_at = 0;   /* the last step finished then */

  /* The checks of the settings, the data, the checkpoint directory and the
   * metrics file: every rank reaches each agree, so a failure that every
   * rank sees is said once and ends every rank without an abort. */
  moert_pick_mode mode = m->parallel.select == MOERT_SELECT_FIXED ? MOERT_PICK_FIXED : MOERT_PICK_AUTO;
  int64_t start = 0, ckpt_step = 0;
  /* one run per checkpoint directory: rank 0, which writes it, holds it; the
   * others wait at the agreement (a failed rank 0 stops them) */
  bool ok = true;
  if (m->seq && o.tokens % m->seq != 0) /* --tokens: the spec's own value is checked by moec */
    ok = MOERT_FAIL(&st, "%lld tokens per rank are not a whole number of sequences of %lld (the spec's `seq`); "
                    "use --tokens with a multiple of %lld", (long long)o.tokens, (long long)m->seq,
                    (long long)m->seq);
  ok = ok && moert_plan_create_nodes(m, comm->world, comm->rank, o.tokens, training, comm->nodes, &plan, &st) &&
       moert_selector_create(plan, mode, m->parallel.explore_steps, o.variants, o.nvariants, &sel, &st) &&
       moert_selector_use_prediction(sel, comm->local_size, training, &st) &&
       moert_data_open_seq(&data, o.data, m->vocab, m->dim, m->context, m->seq, o.tokens * comm->world,
                           (uint64_t)o.seed, &st) &&
       !(training && o.checkpoint && comm->rank == 0 && !moert_ckpt_lock_create(o.checkpoint, &ckpt_lock, &st));
  if (!agree(comm, ok, argv0, &agreed, &st)) goto out;
  ok = !(training && o.checkpoint && !moert_ckpt_check(o.checkpoint, m, o.resume, o.overwrite, &ckpt_step, &st));
  if (ok && o.resume) start = ckpt_step;
  if (ok && o.resume && start >= o.steps)
    ok = MOERT_FAIL(&st, "the checkpoint in %s is at step %" PRId64 ", and --steps %" PRId64
                    " is the total to reach; give a larger --steps",
                    o.checkpoint, start, o.steps);
  if (ok && o.metrics && comm->rank == 0) {
    /* a resume keeps what the file says up to the checkpoint (metrics_cut) */
    metrics = fopen(o.metrics, o.resume ? "a+" : "w");
    if (!metrics) ok = MOERT_FAIL(&st, "cannot write the metrics file %s: %s", o.metrics, strerror(errno));
  }
  if (ok && o.routing_trace && comm->rank == 0) { /* kept and cut on a resume, as the metrics */
    routing = fopen(o.routing_trace, o.resume ? "a+" : "w");
    if (!routing)
      ok = MOERT_FAIL(&st, "cannot write the routing trace %s: %s", o.routing_trace, strerror(errno));
  }
  if (!agree(comm, ok, argv0, &agreed, &st)) goto out;
  if (!check_memory(plan, training, b, comm, &agreed, &oom_reporter, &st)) {
    if (agreed) { /* one rank says why, before any rank exits (mpirun kills the rest then) */
      moert_status bst = {0};
      if (oom_reporter == my_rank) fail(argv0, &st);
      fflush(stderr);
      comm->barrier(comm, &bst);
    }
    goto out;
  }
  if (!moert_exec_create(&e, m, plan, b, comm, training, (uint64_t)o.seed, &st)) goto out;
  if (!moert_exec_use_data(e, data, &st)) goto out;
  e->opts.total_steps = o.steps;
  e->opts.pick = moert_selector_pick;
  e->opts.pick_ctx = sel;
  /* a trace of at most ~200 events per layer and step (48 MB at 1M events) */
  if (o.trace && !moert_trace_create(o.trace, 1 << 20, &trace, &st)) goto out;
  e->opts.trace = trace;
  e->opts.routing_stats = o.routing_trace != NULL; /* every rank: the entropies are summed over ranks */
  const char *resume_note = NULL;
  /* every rank loads the same checkpoint (a damaged one fails them all alike) */
  ok = !(o.resume && !moert_ckpt_load(o.checkpoint, e, &start, &resume_note, &st));
  if (!agree(comm, ok, argv0, &agreed, &st)) goto out;
  int64_t last_saved = o.resume ? start : -1; /* the step of the checkpoint on disk; -1: none of this run */
  if (resume_note && comm->rank == 0) fprintf(stderr, "%s: note: %s\n", argv0, resume_note);
  if (o.resume && metrics && !jsonl_cut(metrics, "metrics file", o.metrics, start, &st)) goto out;
  if (o.resume && routing && !jsonl_cut(routing, "routing trace", o.routing_trace, start, &st)) goto out;
  /* each MoE layer's time, the step's, and the stop signal (below) */
  times = calloc((size_t)m->nlayers + 2, sizeof *times);
  prev = calloc((size_t)m->nlayers + 1, sizeof *prev);
  /* the step's load is copied out of e->moe.load before it is summed over
   * ranks: an evaluation's forward, later in the step, writes its own there */
  int64_t nload = 0, max_experts = 1;
  for (int i = 0; i < m->nlayers; i++)
    if (m->layers[i].kind == MOERT_L_MOE) {
      nload += m->layers[i].experts;
      if (m->layers[i].experts > max_experts) max_experts = m->layers[i].experts;
    }
  load = calloc((size_t)nload + 1, sizeof *load);
  if (o.routing_trace) {
    routing_sums = calloc((size_t)ROUTING__SUMS * ((size_t)m->nlayers + 1), sizeof *routing_sums);
    routing_bias = calloc((size_t)max_experts, sizeof *routing_bias);
  }
  if (!times || !prev || !load || (o.routing_trace && (!routing_sums || !routing_bias))) {
    MOERT_FAIL(&st, "out of memory");
    goto out;
  }
  /* no variant may move a parameter or its optimizer state: watch them */
  b->watch_lo[0] = e->params;
  b->watch_hi[0] = e->params + plan->param_elems;
  b->watch_lo[1] = e->state;
  b->watch_hi[1] = e->state ? e->state + plan->state_elems : NULL;

  FILE *out = o.quiet || comm->rank ? NULL : stdout;
  if (out) print_header(m, plan, e->xdt, &o, b, comm, out);
  if (out && peak_what[0]) fprintf(out, "MFU: %s\n", peak_what);
  if (out && b != moert_backend_cpu())
    fprintf(out, "kernels: %s (%s)\n", moert_backend_cuda_cache_hit(b) ? "from the cache" : "compiled by NVRTC",
            moert_backend_cuda_cache_path(b) ? moert_backend_cuda_cache_path(b) : "no cache");
  if (out && b != moert_backend_cpu())
    fprintf(out, "CUDA graphs: %s%s%s\n",
            e->graphs.off ? "none (" : trace ? "none while tracing (every op is timed)"
                                     : "one per layer, variant and capacity, captured at its second step "
                                       "(MOEC_CUDA_GRAPHS=0: none)",
            e->graphs.off ? e->graphs.off : "", e->graphs.off ? ")" : "");
  if (o.resume) {
    /* the model as loaded, on the held-out batch: equal to the loss at the
     * checkpoint's step, whatever the world size then and now */
    double resumed_loss = NAN;
    if (o.eval_every > 0 && !moert_exec_eval(e, data, start, true, &resumed_loss, &st)) goto out;
    if (out) {
      fprintf(out, "resumed from %s at step %" PRId64, o.checkpoint, start);
      if (o.eval_every > 0) fprintf(out, "; held-out loss %.6f", resumed_loss);
      fputc('\n', out);
    }
    if (metrics && o.eval_every > 0) {
      fprintf(metrics, "{\"step\": %" PRId64 ", \"resumed\": true, \"eval_loss\": ", start);
      json_num(metrics, resumed_loss);
      fputs("}\n", metrics);
    }
  }
  const bool z_cols = has_z_loss(m); /* the table's z_loss column */
  if (out) print_table_head(out, z_cols, peak > 0);

  double t_all = now(), first_loss = NAN, last_loss = NAN;
  /* SIGTERM or SIGINT (a scheduler, Ctrl-C) ends the run after the step at
   * which every rank has heard of it, with a checkpoint when one is configured */
  stop_signals_catch(old_actions);
  catching = true;
  for (int64_t step = start + 1; step <= o.steps; step++) {
    watch.step = step;
    if (hooks->stop_step == step && hooks->stop_rank == comm->rank) raise(SIGSTOP);
    if (hooks->sleep_step == step)
      nanosleep(&(struct timespec){(time_t)hooks->sleep_s, (long)(fmod(hooks->sleep_s, 1) * 1e9)}, NULL);
    double t0 = now();
    int64_t allocs0 = b->allocs, watched0 = b->watched_bytes;
    moert_step_stats s = {0};
    if (training) {
      if (!moert_exec_train_step(e, data, step, &s, &st)) goto out;
    } else {
      if (!moert_exec_eval(e, data, step, false, &s.loss, &st)) goto out;
      s.flops = plan->flops_fwd * comm->world;
      s.dropped = e->moe.routed > 0 ? e->moe.dropped / e->moe.routed : 0;
    }
    double ms = (now() - t0) * 1e3;
    /* every rank must see the same times, so every rank picks alike; the
     * same all-reduce tells every rank whether a signal reached any of them
     * (the highest signal number wins), so all stop after the same step */
    memcpy(times, e->layer_ms, sizeof *times * (size_t)m->nlayers);
    times[m->nlayers] = ms;
    times[m->nlayers + 1] = stop_signal;
    if (!comm->all_reduce_f64(comm, times, m->nlayers + 2, MOERT_RED_MAX, &st)) goto out;
    ms = times[m->nlayers];
    stop_sig = (int)times[m->nlayers + 1];
    if (e->moe.load_summed) { /* the step's balancing summed them over ranks already (on every rank alike) */
      memcpy(load, e->moe.load_sum, sizeof *load * (size_t)nload);
    } else {
      memcpy(load, e->moe.load, sizeof *load * (size_t)nload);
      if (!comm->all_reduce_f64(comm, load, nload, MOERT_RED_SUM, &st)) goto out;
    }
    int nsums = 0; /* the routing trace's sums: every rank takes part, rank 0 writes */
    for (int li = 0; o.routing_trace && li < m->nlayers; li++) {
      if (m->layers[li].kind != MOERT_L_MOE) continue;
      routing_sums[nsums + ROUTING_ROUTED] = e->moe.layer_routed[li];
      routing_sums[nsums + ROUTING_DROPPED] = e->moe.layer_dropped[li];
      routing_sums[nsums + ROUTING_ENTROPY] = e->moe.entropy[li];
      nsums += ROUTING__SUMS;
    }
    if (nsums && !comm->all_reduce_f64(comm, routing_sums, nsums, MOERT_RED_SUM, &st)) goto out;
    bool switched = false, explored = false;
    for (int li = 0; li < m->nlayers; li++) {
      if (m->layers[li].kind != MOERT_L_MOE) continue;
      switched |= step > start + 1 && prev[li] != e->moe.variant[li];
      prev[li] = e->moe.variant[li];
      explored |= moert_selector_record(sel, li, e->moe.capacity[li], e->moe.variant[li], times[li]);
    }
    /* a non-finite loss or gradient norm: the executor applied no update;
     * every rank sees the same global values, so all decide alike */
    char why[512] = "";
    if (!training && !isfinite(s.loss)) {
      ok = MOERT_FAIL(&st, "the loss is %s at step %" PRId64 " (inference: the weights or the data hold "
                      "non-finite values)", isnan(s.loss) ? "NaN" : "infinite", step);
      agree(comm, ok, argv0, &agreed, &st);
      goto out;
    }
    if (s.skipped) {
      char what[128], where[320];
      nonfinite_what(&s, what, sizeof what);
      if (!nonfinite_where(e, where, sizeof where, &st)) goto out;
      snprintf(why, sizeof why, "step %" PRId64 ": %s; %s", step, what, where);
    }
    double eval_loss = NAN;
    bool has_eval = training && o.eval_every > 0 && (step % o.eval_every == 0 || step == o.steps);
    if (has_eval && !moert_exec_eval(e, data, step, true, &eval_loss, &st)) goto out;
    double tps = (double)o.tokens * comm->world / (ms / 1e3);
    if (isnan(first_loss)) first_loss = s.loss;
    if (!s.skipped) last_loss = s.loss;
    step_extra x = {switched ? b->watched_bytes - watched0 : 0, switched ? b->allocs - allocs0 : 0,
                    explored ? sel : NULL};
    double tflops = s.flops / (ms / 1e3) / 1e12;
    double mfu = peak > 0 ? tflops / (peak * accelerators) : -1;
    if (metrics) { /* each step on disk as it ends: a kill loses none */
      write_metrics(metrics, m, e, step, &s, ms, tps, tflops, mfu, load, times, eval_loss, has_eval, &x);
      fflush(metrics);
    }
    if (routing &&
        !write_routing(routing, e, step, load, routing_sums, (double)o.tokens * comm->world, routing_bias, &st))
      goto out;
    if (s.skipped && o.on_nan == MOERT_ON_NAN_STOP) {
      char kept[400];
      if (!o.checkpoint)
        snprintf(kept, sizeof kept, "no checkpoint is configured");
      else if (last_saved < 0)
        snprintf(kept, sizeof kept, "no checkpoint was saved by this run (%s is as it was)", o.checkpoint);
      else
        snprintf(kept, sizeof kept, "the checkpoint in %s stays at step %" PRId64 ", the last one saved",
                 o.checkpoint, last_saved);
      ok = MOERT_FAIL(&st, "training diverged at %s. Its update was not applied and the run stops (--on-nan "
                      "stop); %s. Lower the learning rate (lr = %g), add warm-up, set `clip` in the train "
                      "block, or pass --on-nan skip to go on without such steps",
                      why, kept, m->train.lr);
      agree(comm, ok, argv0, &agreed, &st);
      goto out;
    }
    if (s.skipped && comm->rank == 0 && !o.quiet && e->skipped <= MAX_SKIP_WARNINGS) {
      fprintf(stderr, "%s: warning: %s. Its update was skipped (--on-nan skip; %" PRId64 " skipped so far)%s\n",
              argv0, why, e->skipped,
              e->skipped == MAX_SKIP_WARNINGS ? "; later skipped steps are counted in the metrics only" : "");
      fflush(stderr);
    }
    if (o.on_step) o.on_step(o.on_step_ctx, step, &s, eval_loss);
    if (out && (step % o.log_every == 0 || step == o.steps || step == start + 1)) {
      char vbuf[64];
      variants_short(m, plan, e, vbuf, sizeof vbuf);
      char mfu_col[16] = "", z_col[24] = "";
      if (peak > 0) snprintf(mfu_col, sizeof mfu_col, " %5.1f%%", 100 * mfu);
      if (z_cols) snprintf(z_col, sizeof z_col, " %10.4f", s.z_loss);
      fprintf(out, "%7" PRId64 " %10.4f %10.4f%s %9.2e %10.4f %10.0f %8.3f%s %10.2f %7.2f%%  %s\n", step, s.loss,
              s.aux_loss, z_col, s.lr, s.grad_norm, tps, tflops, mfu_col, ms, 100 * s.dropped, vbuf);
      if (has_eval) fprintf(out, "%7s eval loss %.4f\n", "", eval_loss);
      fflush(out);
    }
    bool save = training && o.checkpoint &&
                ((o.ckpt_every > 0 && step % o.ckpt_every == 0) || step == o.steps);
    if (save && !moert_ckpt_save(o.checkpoint, e, step, &st)) goto out;
    if (save) last_saved = step;
    if (stop_sig && step < o.steps) { /* at the last step the run is done anyway */
      if (training && o.checkpoint && !save && !moert_ckpt_save(o.checkpoint, e, step, &st)) goto out;
      stopped_at = step;
      break;
    }
  }
  /* after the steps a signal ends the process as it would have before */
  stop_signals_restore(old_actions);
  catching = false;
  if (!stopped_at) stop_sig = 0;
  if (stop_sig && comm->rank == 0) { /* said even with --quiet: the run ends early */
    printf("stopped by %s after step %" PRId64 "; ", stop_sig == SIGINT ? "SIGINT" : "SIGTERM", stopped_at);
    if (training && o.checkpoint) printf("checkpoint saved in %s (resume with --resume)\n", o.checkpoint);
    else if (training) printf("no checkpoint saved (none is configured: --checkpoint DIR)\n");
    else printf("inference, nothing to save\n");
    fflush(stdout);
  } else if (out && !stop_sig) {
    fprintf(out, "%s %" PRId64 " steps in %.2f s; loss %.4f -> %.4f", training ? "trained" : "ran",
            o.steps - start, now() - t_all, first_loss, last_loss);
    if (e->skipped) fprintf(out, "; %" PRId64 " step%s skipped (non-finite loss or gradient norm)", e->skipped,
                            e->skipped == 1 ? "" : "s");
    fputc('\n', out);
    if (o.checkpoint && training) fprintf(out, "checkpoint: %s (step %" PRId64 ")\n", o.checkpoint, o.steps);
    if (!e->graphs.off && !trace)
      fprintf(out, "CUDA graphs: %" PRId64 " captured, %" PRId64 " launched, %" PRId64 " parts ran without one\n",
              e->graphs.captures, e->graphs.launches, e->graphs.fallbacks);
  }
  if (trace && !moert_trace_write(trace, comm, &st)) goto out;
  if (trace && out) fprintf(out, "trace: %s (open in chrome://tracing or ui.perfetto.dev)\n", o.trace);
  if (o.generate && !stop_sig &&
      !sample_text(e, data, o.prompt, o.generate, (uint64_t)o.seed, comm->rank ? NULL : out ? out : stdout, &st))
    goto out;
  rc = 0;
out:
  if (catching) stop_signals_restore(old_actions);
  if (metrics) fclose(metrics);
  if (routing) fclose(routing);
  if (rc && comm->world > 1 && !agreed) {
    /* the other ranks may be waiting in a collective: stop them all */
    fprintf(stderr, "%s: rank %d: error: %s\n", argv0, comm->rank, st.msg);
    fflush(stderr);
    moert_comm_abort(host_comm, watch.fired ? MOERT_EXIT_TIMEOUT : 1);
  }
  free(times);
  free(prev);
  free(load);
  free(routing_sums);
  free(routing_bias);
  moert_exec_destroy(e);
  moert_selector_destroy(sel);
  moert_trace_destroy(trace);
  moert_data_close(data);
  moert_plan_destroy(plan);
  moert_ckpt_lock_destroy(ckpt_lock);
  if (comm != host_comm) comm->destroy(comm);
  if (b != moert_backend_cpu()) moert_backend_cuda_destroy(b);
  if (host_comm != moert_comm_self()) moert_comm_mpi_finalize(host_comm);
  /* every rank failed the memory check alike: one of them says why */
  if (rc && agreed) return 1;
  if (rc) return fail(argv0, &st);
  return stop_sig ? 128 + stop_sig : 0; /* a shell's status for a signal's end */
}
