/* test_decode.c — generation with a key/value cache (exec.h's
 * moert_exec_decode) against the whole-sequence forward (moert_exec_logits),
 * on the cpu backend's executor. For each model: a random byte history of a
 * few sequences; the logits of decoding it one token at a time must equal, at
 * every position p < seq, row p of the forward over the windows of positions
 * 0..seq-1 (RoPE at positions 0, 1, ...; MoE layers dropless, as one token
 * is). Past seq, the cache is a ring of the last seq tokens: for a model with
 * one attention layer that is row seq-1 of the forward over the windows of
 * p-seq+1..p (exact: RoPE's scores depend on relative positions only); with
 * several attention layers it is a sliding window, checked to be finite and
 * the same on a second run (decode_begin empties the cache). A model with a
 * bidirectional layer is refused. The specs go through the real front end.
 * Argument `bf16`: the bf16 executor path (run with MOEC_CPU_BF16=1), to
 * bf16's tolerance. Argument `cuda`: the cuda backend (skipped, 77, without
 * a GPU), fp32 then bf16, each also against the cpu's fp32 decode. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "exec.h"
#include "front.h"
#include "lower.h"

typedef struct dcase {
  const char *name, *spec;
} dcase;

#define LM(seq, body) "model m { dim = 16; tokens = 32; vocab = 40; context = 2; seq = " seq "; dtype = DT; " body " } train { steps = 1; seed = 5; }"
#define DROPLESS "moe e { experts = 4; hidden = 16; top_k = 2; capacity_factor = 0; activation = gelu; }"

static const dcase cases[] = {
    /* 2 attention layers (GQA 4/2, RoPE of two bases, a bias, head_dim != dim / heads) and a MoE layer, pre-norm residuals */
    {"two_attention_moe_rope_gqa",
     LM("8", "residual { rmsnorm; attention a0 { heads = 4; kv_heads = 2; head_dim = 8; bias = true; } } "
             "residual { rmsnorm; " DROPLESS " } "
             "residual { rmsnorm; attention a1 { heads = 4; kv_heads = 2; head_dim = 16; rope = 100; } }")},
    /* one attention layer (MQA, RoPE): past seq, the window's forward exactly */
    {"one_attention_mqa_window",
     LM("8", "residual { rmsnorm; attention a0 { heads = 4; kv_heads = 1; head_dim = 8; } } residual { layernorm; " DROPLESS " }")},
    /* one attention layer without positions: the ring's order does not matter at all */
    {"one_attention_no_rope", LM("4", "residual { rmsnorm; attention a0 { heads = 2; rope = 0; } } " DROPLESS)},
};

static bool bf16_mode;
/* The backend the cases run on: the cpu, or (argument cuda) the GPU's, and
 * the comm of its executors (one rank: self, staged through the host for the
 * GPU's memory, as runtime/run.c makes it). */
static moert_backend *backend;
static moert_comm *comm;

/* The spec with DT made fp32 or bf16. */
static char *spec_text(const char *spec) {
  const char *dt = bf16_mode ? "bf16" : "fp32", *at = strstr(spec, "DT");
  char *out = malloc(strlen(spec) + 8);
  sprintf(out, "%.*s%s%s", (int)(at - spec), spec, dt, at + 2);
  return out;
}

/* The embedding window of the token at p of h: h[p], h[p-1], ... (-1 before 0). */
static void window(const int32_t *h, int64_t p, int64_t context, int32_t *w) {
  for (int64_t c = 0; c < context; c++) w[c] = p - c >= 0 ? h[p - c] : -1;
}

/* got ≈ want over n logits: |got - want| <= tol (|want| + rms(want)). */
static bool close_logits(const char *what, const float *got, const float *want, int64_t n, double tol) {
  double ss = 0, worst = 0;
  for (int64_t i = 0; i < n; i++) ss += (double)want[i] * want[i];
  double rms = sqrt(ss / (double)n);
  int64_t bad = 0, at = -1;
  for (int64_t i = 0; i < n; i++) {
    double d = fabs((double)got[i] - want[i]), r = d / (fabs(want[i]) + rms);
    if (!(r <= tol)) bad++;
    if (!(r <= worst)) worst = r, at = i;
  }
  if (bad)
    printf("  FAIL %s: %lld of %lld logits differ; worst [%lld] %.7g vs %.7g (%.2e of the bound's scale)\n", what,
           (long long)bad, (long long)n, (long long)at, (double)got[at], (double)want[at], worst);
  return bad == 0;
}

/* The logits of decoding h[0..L) on the cpu in fp32, into out [L, vocab]. */
static bool cpu_decode(const dcase *c, const int32_t *h, int64_t L, float *out) {
  bool was = bf16_mode;
  bf16_mode = false;
  char *text = spec_text(c->spec);
  bf16_mode = was;
  moec_arena *a = moec_arena_create();
  moec_diags d;
  moec_diags_init(&d, a);
  moec_spec *s = moec_front_buffer(a, &d, c->name, text, strlen(text));
  moert_model *m = s ? moec_lower(a, &d, s, c->name) : NULL;
  free(text);
  moert_status st = {0};
  moert_plan *p = NULL;
  moert_exec *e = NULL;
  int32_t *win = malloc(sizeof *win * (size_t)(m ? m->context : 1));
  bool ok = m && moert_plan_create(m, 1, 0, m->tokens, false, &p, &st) &&
            moert_exec_create(&e, m, p, moert_backend_cpu(), moert_comm_self(), false, 11, &st) &&
            moert_exec_decode_begin(e, &st);
  for (int64_t i = 0; i < L && ok; i++) {
    window(h, i, m->context, win);
    ok = moert_exec_decode(e, win, out + i * m->vocab, &st);
  }
  if (!ok) printf("FAIL %s: the cpu's decode: %s\n", c->name, m ? st.msg : "the spec does not compile");
  free(win);
  moert_exec_destroy(e);
  moert_plan_destroy(p);
  moec_arena_destroy(a);
  return ok;
}

static int run_case(const dcase *c) {
  moec_arena *a = moec_arena_create();
  moec_diags d;
  moec_diags_init(&d, a);
  char *text = spec_text(c->spec);
  moec_spec *s = moec_front_buffer(a, &d, c->name, text, strlen(text));
  moert_model *m = s ? moec_lower(a, &d, s, c->name) : NULL;
  free(text);
  if (!m) {
    moec_diags_print(&d, stderr);
    printf("FAIL %s: the spec does not compile\n", c->name);
    moec_arena_destroy(a);
    return 1;
  }
  int nattn = 0;
  for (int li = 0; li < m->nlayers; li++) nattn += m->layers[li].kind == MOERT_L_ATTENTION;
  moert_status st = {0};
  moert_plan *p = NULL;
  moert_exec *e = NULL;
  int64_t S = m->seq, V = m->vocab, C = m->context, L = 2 * S + 5;
  double tol = bf16_mode ? 3e-2 : backend == moert_backend_cpu() ? 2e-5 : 1e-4;
  int32_t *h = malloc(sizeof *h * (size_t)L), *win = malloc(sizeof *win * (size_t)(S * C));
  float *dec = malloc(sizeof *dec * (size_t)(L * V)), *ref = malloc(sizeof *ref * (size_t)(S * V));
  float *again = malloc(sizeof *again * (size_t)V);
  int fails = 0;
  if (!moert_plan_create(m, 1, 0, m->tokens, false, &p, &st) ||
      !moert_exec_create(&e, m, p, backend, comm, false, 11, &st)) {
    printf("FAIL %s: %s\n", c->name, st.msg);
    fails = 1;
    goto out;
  }
  if (bf16_mode && e->xdt != MOERT_BF16) {
    printf("FAIL %s: the executor does not run bf16 (MOEC_CPU_BF16=1 unset?)\n", c->name);
    fails = 1;
    goto out;
  }
  unsigned r = 99;
  for (int64_t i = 0; i < L; i++) h[i] = (int32_t)((r = r * 1103515245u + 12345u) >> 16) % (int32_t)V;
  /* one token at a time, through the whole history */
  if (!moert_exec_decode_begin(e, &st)) goto failed;
  for (int64_t i = 0; i < L; i++) {
    window(h, i, C, win);
    if (!moert_exec_decode(e, win, dec + i * V, &st)) goto failed;
  }
  for (int64_t i = 0; i < L * V; i++)
    if (!isfinite(dec[i])) {
      printf("  FAIL %s: logit %lld of the decode is %g\n", c->name, (long long)i, (double)dec[i]);
      fails++;
      break;
    }
  /* the first seq positions: the forward over the sequence's windows */
  for (int64_t i = 0; i < S; i++) window(h, i, C, win + i * C);
  if (!moert_exec_logits(e, win, S, ref, &st)) goto failed;
  char what[160];
  for (int64_t i = 0; i < S; i++) {
    snprintf(what, sizeof what, "%s: position %lld, decode vs the sequence's forward", c->name, (long long)i);
    fails += !close_logits(what, dec + i * V, ref + i * V, V, tol);
  }
  /* past seq, one attention layer: the last row of the window's forward */
  int64_t windows = 0;
  for (int64_t i = S; i < L && nattn == 1; i++, windows++) {
    for (int64_t j = 0; j < S; j++) window(h, i - S + 1 + j, C, win + j * C);
    if (!moert_exec_logits(e, win, S, ref, &st)) goto failed;
    snprintf(what, sizeof what, "%s: position %lld (the ring), decode vs the last seq tokens' forward", c->name,
             (long long)i);
    fails += !close_logits(what, dec + i * V, ref + (S - 1) * V, V, tol);
  }
  /* a second run from the start: the cache emptied, the same logits, bit for bit */
  if (!moert_exec_decode_begin(e, &st)) goto failed;
  for (int64_t i = 0; i < S + 2; i++) {
    window(h, i, C, win);
    if (!moert_exec_decode(e, win, again, &st)) goto failed;
    if (memcmp(again, dec + i * V, sizeof *again * (size_t)V) != 0) {
      printf("  FAIL %s: a second decode from the start differs at position %lld\n", c->name, (long long)i);
      fails++;
      break;
    }
  }
  /* the forward on rows that are not whole sequences is refused, not run wrong */
  if (moert_exec_logits(e, win, 1, ref, &st) || !strstr(st.msg, "not whole sequences")) {
    printf("  FAIL %s: the logits of 1 window (seq %lld) were not refused: %s\n", c->name, (long long)S, st.msg);
    fails++;
  }
  st = (moert_status){0};
  /* on a device: the same decode on the cpu in fp32 (the model's parameters
   * are the same: they come from the seed) */
  if (backend != moert_backend_cpu()) {
    float *cpu = malloc(sizeof *cpu * (size_t)(L * V));
    if (!cpu_decode(c, h, L, cpu)) fails++;
    for (int64_t i = 0; i < L && !fails; i++) {
      snprintf(what, sizeof what, "%s: position %lld, %s decode vs the cpu's", c->name, (long long)i, backend->name);
      fails += !close_logits(what, dec + i * V, cpu + i * V, V, bf16_mode ? 3e-2 : 1e-4);
    }
    free(cpu);
  }
  printf("%-4s %s: %lld tokens decoded one at a time = the forward at the first %lld positions%s%s%s\n",
         fails ? "FAIL" : "ok", c->name, (long long)L, (long long)S,
         windows ? " and the last seq tokens' forward after them" : "", bf16_mode ? " (bf16)" : "",
         backend == moert_backend_cpu() ? "" : ", and the cpu's decode");
  goto out;
failed:
  printf("FAIL %s: %s\n", c->name, st.msg);
  fails++;
out:
  moert_exec_destroy(e);
  moert_plan_destroy(p);
  moec_arena_destroy(a);
  free(h), free(win), free(dec), free(ref), free(again);
  return fails ? 1 : 0;
}

/* A bidirectional attention layer cannot generate: refused at its first token. */
static int refuses_bidirectional(void) {
  dcase c = {"bidirectional", LM("4", "residual { rmsnorm; attention a0 { heads = 2; kv_heads = 1; causal = false; } }")};
  moec_arena *a = moec_arena_create();
  moec_diags d;
  moec_diags_init(&d, a);
  char *text = spec_text(c.spec);
  moert_model *m = moec_lower(a, &d, moec_front_buffer(a, &d, c.name, text, strlen(text)), c.name);
  free(text);
  if (!m) {
    moec_diags_print(&d, stderr);
    printf("FAIL %s: the spec does not compile\n", c.name);
    moec_arena_destroy(a);
    return 1;
  }
  moert_status st = {0};
  moert_plan *p = NULL;
  moert_exec *e = NULL;
  int32_t win[2] = {1, -1};
  float *logits = malloc(sizeof(float) * (size_t)m->vocab);
  bool ok = moert_plan_create(m, 1, 0, m->tokens, false, &p, &st) &&
            moert_exec_create(&e, m, p, backend, comm, false, 11, &st) &&
            moert_exec_decode_begin(e, &st) && moert_exec_decode(e, win, logits, &st);
  int fail = ok || !strstr(st.msg, "bidirectional");
  printf("%-4s a bidirectional model's decode is refused: %s\n", fail ? "FAIL" : "ok", ok ? "(it ran)" : st.msg);
  moert_exec_destroy(e);
  moert_plan_destroy(p);
  moec_arena_destroy(a);
  free(logits);
  return fail;
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0); /* each case's line out before a crash in the next */
  const char *mode = argc > 1 ? argv[1] : "";
  bool cuda = strcmp(mode, "cuda") == 0;
  bf16_mode = strcmp(mode, "bf16") == 0;
  backend = moert_backend_cpu();
  comm = moert_comm_self();
  if (cuda) {
    moert_status st = {0};
    if (!moert_cuda_available()) {
      printf("SKIP: no GPU (the cuda backend's decode needs one)\n");
      return 77;
    }
    if (!moert_backend_cuda_create(&backend, 0, NULL, true, NULL, &st) ||
        !moert_comm_staged_create(moert_comm_self(), backend, &comm, &st)) {
      printf("FAIL: the cuda backend: %s\n", st.msg);
      return 1;
    }
  }
  int fails = 0, n = 0, ncases = (int)(sizeof cases / sizeof cases[0]);
  for (int pass = 0; pass < (cuda ? 2 : 1); pass++) { /* cuda: fp32, then bf16 */
    if (cuda) bf16_mode = pass == 1;
    for (int i = 0; i < ncases; i++, n++) fails += run_case(&cases[i]);
    fails += refuses_bidirectional();
    n++;
  }
  if (cuda) {
    comm->destroy(comm);
    moert_backend_cuda_destroy(backend);
  }
  printf("%d passed, %d failed\n", n - fails, fails);
  return fails ? 1 : 0;
}
