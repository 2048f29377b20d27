/* sgemm_ref.c — the machine's own reference for bench/cpu_bench.sh: how many
 * GFLOP/s OpenBLAS's cblas_sgemm reaches here, on square fp32 matrices.
 *
 *   cc -O2 -o sgemm_ref bench/sgemm_ref.c -lopenblas
 *   ./sgemm_ref [N [RUNS]]     (default N = 2048, RUNS = 9)
 *
 * C = A B with A, B, C of N x N floats, one untimed call then RUNS timed ones;
 * prints one line: "sgemm N RUNS median_gflops min_gflops max_gflops threads",
 * then OpenBLAS's configuration (version, kernel) on a second line.
 * The number of threads is OpenBLAS's own (OPENBLAS_NUM_THREADS when set). */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <cblas.h>

/* OpenBLAS's own, not in every cblas.h (netlib's has neither) */
int openblas_get_num_threads(void);
char *openblas_get_config(void);

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 2048;
  int runs = argc > 2 ? atoi(argv[2]) : 9;
  if (n < 1 || runs < 1 || runs > 1000) {
    fprintf(stderr, "usage: %s [N [RUNS]]\n", argv[0]);
    return 2;
  }
  size_t nn = (size_t)n * (size_t)n;
  float *a = malloc(nn * sizeof *a), *b = malloc(nn * sizeof *b), *c = malloc(nn * sizeof *c);
  double *g = malloc((size_t)runs * sizeof *g);
  if (!a || !b || !c || !g) {
    fprintf(stderr, "%s: out of memory\n", argv[0]);
    return 1;
  }
  unsigned s = 12345;
  for (size_t i = 0; i < nn; i++) {
    s = s * 1103515245u + 12345u;
    a[i] = (float)((s >> 8) & 0xffff) / 65536.0f - 0.5f;
    s = s * 1103515245u + 12345u;
    b[i] = (float)((s >> 8) & 0xffff) / 65536.0f - 0.5f;
    c[i] = 0;
  }
  double flops = 2.0 * n * n * n;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
  for (int r = 0; r < runs; r++) {
    double t0 = now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
    g[r] = flops / (now() - t0) / 1e9;
  }
  qsort(g, (size_t)runs, sizeof *g, cmp);
  double med = runs % 2 ? g[runs / 2] : 0.5 * (g[runs / 2 - 1] + g[runs / 2]);
  /* c[0] printed so the calls cannot be optimized away */
  printf("sgemm %d %d %.1f %.1f %.1f %d (c[0] %.3g)\n", n, runs, med, g[0], g[runs - 1],
         openblas_get_num_threads(), (double)c[0]);
  printf("%s\n", openblas_get_config());
  free(a);
  free(b);
  free(c);
  free(g);
  return 0;
}
