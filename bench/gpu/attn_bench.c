/* attn_bench.c — the core of attention on the cuda backend: attn_fwd_t and
 * attn_bwd_t (templates/attention.cu; the projections excluded), bf16 or
 * fp32, one JSON row per shape, for bench/gpu/attn_bench.py to set beside
 * PyTorch's scaled_dot_product_attention.
 *
 * usage: attn_bench [--configs B,S,H,D[,KV] ...] [--dtype bf16|fp32] [--causal 0|1]
 *                   [--iters N] [--warmup N] [--json FILE]
 *   B sequences (the batch) of S tokens, H query heads of D, KV key/value heads
 *   (default H). Default configs: seq 1024 and 4096 at head dims 64 and 128,
 *   16384 tokens and 2048 query dims in all (B = 16384 / S, H = 2048 / D),
 *   causal, bf16.
 *
 * Timing: the backend's timing marks (CUDA events on its stream). After
 * `warmup` calls of each, `iters` rounds: each times one forward and one
 * backward apart; reported: the median of the rounds, in ms, and the model
 * FLOP/s (4 S^2 H D B for the forward, 2.5x that for the backward, half of
 * each when causal: FlashAttention's count). Inputs are random (never zero);
 * the backward runs from the forward's o and lse.
 *
 * Exit: 0 done, 1 a failure (no GPU: the backend's message), 2 a usage error. */
#include "backend.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct config {
  int64_t B, S, H, D, KV;
} config;

enum { MAX_CONFIGS = 64 };

static void usage(void) {
  fprintf(stderr, "usage: attn_bench [--configs B,S,H,D[,KV] ...] [--dtype bf16|fp32] [--causal 0|1] "
                  "[--iters N] [--warmup N] [--json FILE]\n");
  exit(2);
}

static void die(const char *what, const moert_status *st) {
  fprintf(stderr, "attn_bench: %s: %s\n  at %s\n", what, st->msg, st->trace);
  exit(1);
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static uint64_t rng = 0x5eed;
static float frand(void) { /* splitmix64, uniform in [-1, 1), never 0 */
  uint64_t z = (rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  float v = (float)((double)(z >> 11) * 0x1p-52 - 1.0);
  return v == 0 ? 0.5f : v;
}

/* n random elements of type dt in fresh device memory. */
static void *random_buffer(moert_backend *b, moert_dt dt, int64_t n) {
  size_t es = (size_t)moert_dt_size(dt), bytes = es * (size_t)n;
  void *d, *h = malloc(bytes ? bytes : 1);
  moert_status st = {0};
  if (!h || !b->alloc(b, bytes, &d, &st)) die("alloc", &st);
  for (int64_t i = 0; i < n; i++) {
    float v = frand();
    if (dt == MOERT_BF16) ((uint16_t *)h)[i] = moert_f32_to_bf16(v);
    else ((float *)h)[i] = v;
  }
  if (!b->upload(b, d, h, bytes, &st)) die("upload", &st);
  free(h);
  return d;
}

/* ms between two marks, the device waited for. */
static double elapsed(moert_backend *b, int from, int to) {
  double ms;
  moert_status st = {0};
  if (!b->mark_ms(b, from, to, &ms, &st)) die("timing", &st);
  return ms;
}

int main(int argc, char **argv) {
  config cfg[MAX_CONFIGS];
  int n = 0, iters = 20, warmup = 3, causal = 1;
  moert_dt dt = MOERT_BF16;
  const char *json = NULL;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--configs")) {
      while (v && v[0] != '-' && n < MAX_CONFIGS) {
        long long B, S, H, D, KV = 0;
        int got = sscanf(v, "%lld,%lld,%lld,%lld,%lld", &B, &S, &H, &D, &KV);
        if (got < 4 || B < 1 || S < 1 || H < 1 || D < 8) usage();
        cfg[n++] = (config){B, S, H, D, got == 5 ? KV : H};
        v = ++i + 1 < argc ? argv[i + 1] : NULL;
      }
      continue;
    }
    if (!v) usage();
    if (!strcmp(a, "--dtype")) {
      if (!strcmp(v, "bf16")) dt = MOERT_BF16;
      else if (!strcmp(v, "fp32")) dt = MOERT_F32;
      else usage();
    } else if (!strcmp(a, "--causal")) causal = atoi(v) != 0;
    else if (!strcmp(a, "--iters")) iters = atoi(v);
    else if (!strcmp(a, "--warmup")) warmup = atoi(v);
    else if (!strcmp(a, "--json")) json = v;
    else usage();
    i++;
  }
  if (iters < 1 || warmup < 0) usage();
  if (!n) {
    static const int64_t seqs[] = {1024, 4096}, dims[] = {64, 128};
    for (int s = 0; s < 2; s++)
      for (int d = 0; d < 2; d++)
        cfg[n++] = (config){16384 / seqs[s], seqs[s], 2048 / dims[d], dims[d], 2048 / dims[d]};
  }
  moert_backend *b;
  moert_status st = {0};
  if (!moert_backend_cuda_create(&b, 0, NULL, true, NULL, &st)) die("the cuda backend", &st);
  const char *gpu_name = moert_backend_cuda_device_name(b);
  FILE *out = json ? fopen(json, "w") : NULL;
  if (json && !out) {
    perror(json);
    return 1;
  }
  if (out) fprintf(out, "{\"device\": \"%s\", \"dtype\": \"%s\", \"causal\": %s, \"rows\": [\n",
                   gpu_name ? gpu_name : "?", dt == MOERT_BF16 ? "bf16" : "fp32", causal ? "true" : "false");
  printf("| B | S | H | KV | D | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s |\n|---|---|---|---|---|---|---|---|---|\n");
  double *fw = malloc(sizeof(double) * (size_t)iters), *bw = malloc(sizeof(double) * (size_t)iters);
  if (!fw || !bw) return 1;
  for (int c = 0; c < n; c++) {
    config k = cfg[c];
    int64_t T = k.B * k.S, W = (k.H + 2 * k.KV) * k.D;
    void *qkv = random_buffer(b, dt, T * W), *o = random_buffer(b, dt, T * k.H * k.D);
    void *dout = random_buffer(b, dt, T * k.H * k.D), *dqkv = random_buffer(b, dt, T * W);
    float *lse = random_buffer(b, MOERT_F32, T * k.H);
    float *scratch = random_buffer(b, MOERT_F32, moert_cpu_attn_scratch(T, k.H, k.KV, k.D));
    for (int i = 0; i < warmup; i++) {
      b->attn_fwd_t(dt, qkv, o, lse, k.B, k.S, k.H, k.KV, k.D, causal);
      b->attn_bwd_t(dt, qkv, o, lse, dout, dqkv, scratch, k.B, k.S, k.H, k.KV, k.D, causal);
    }
    for (int i = 0; i < iters; i++) {
      b->marks_reset(b);
      int m0 = b->mark(b, NULL);
      b->attn_fwd_t(dt, qkv, o, lse, k.B, k.S, k.H, k.KV, k.D, causal);
      int m1 = b->mark(b, NULL);
      b->attn_bwd_t(dt, qkv, o, lse, dout, dqkv, scratch, k.B, k.S, k.H, k.KV, k.D, causal);
      int m2 = b->mark(b, NULL);
      fw[i] = elapsed(b, m0, m1);
      bw[i] = elapsed(b, m1, m2);
    }
    qsort(fw, (size_t)iters, sizeof *fw, cmp_double);
    qsort(bw, (size_t)iters, sizeof *bw, cmp_double);
    double f = fw[iters / 2], g = bw[iters / 2];
    double flops = 4.0 * (double)k.S * (double)k.S * (double)(k.H * k.D) * (double)k.B * (causal ? 0.5 : 1.0);
    printf("| %" PRId64 " | %" PRId64 " | %" PRId64 " | %" PRId64 " | %" PRId64 " | %.3f | %.1f | %.3f | %.1f |\n", k.B,
           k.S, k.H, k.KV, k.D, f, flops / f * 1e-9, g, 2.5 * flops / g * 1e-9);
    if (out)
      fprintf(out,
              "  {\"batch\": %" PRId64 ", \"seq\": %" PRId64 ", \"heads\": %" PRId64 ", \"kv_heads\": %" PRId64
              ", \"head_dim\": %" PRId64 ", \"fwd_ms\": %.6f, \"bwd_ms\": %.6f, \"fwd_flops\": %.6g}%s\n",
              k.B, k.S, k.H, k.KV, k.D, f, g, flops, c + 1 < n ? "," : "");
    void *bufs[] = {qkv, o, dout, dqkv, lse, scratch};
    for (int i = 0; i < 6; i++) b->free(b, bufs[i]);
    fflush(stdout);
  }
  if (out) {
    fprintf(out, "]}\n");
    fclose(out);
  }
  free(fw), free(bw);
  moert_backend_cuda_destroy(b);
  return 0;
}
