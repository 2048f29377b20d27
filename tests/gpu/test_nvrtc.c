/* test_nvrtc.c — the kernel templates compile, on any machine (no GPU needed):
 * NVRTC, loaded by backend_cuda.c as the cuda backend loads it, compiles the
 * embedded templates for sm_90 and sm_80 (and PTX for compute_80), and every
 * kernel the backend looks up is in the cubin; then each template file alone
 * after common.cuh; then a broken source must fail with NVRTC's first lines
 * in the message and the whole log in a file whose path the message names.
 * Skips (exit 77) where libnvrtc cannot be loaded.
 *
 * test_nvrtc FILE...: each FILE is a kernels.cu that `moec emit --cuda`
 * printed; each must compile for sm_90 with every generic kernel and every
 * specialization it defines (moert_k_<op>__<key>) in the cubin. */
#include "backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int failures;

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void compile(const char *arch, int only) {
  moert_status st = {0};
  double t0 = now();
  bool ok = moert_cuda_compile_check(arch, only, &st);
  const char *what = only < 0 ? "all templates" : moert_cuda_template_name(only);
  if (ok) {
    printf("ok   %-14s %-12s %.2f s\n", what, arch, now() - t0);
  } else {
    printf("FAIL %-14s %-12s\n%s\n  at %s\n", what, arch, st.msg, st.trace);
    failures++;
  }
}

/* A source with an error on its third line: the message must quote NVRTC's
 * diagnostic and name a log file that holds it. */
static void broken_source(void) {
  const char *src = "extern \"C\" __global__ void moert_k_broken(float *x) {\n"
                    "  x[0] = 1.0f;\n"
                    "  x[1] = undeclared_name;\n"
                    "}\n";
  char dir[] = "/tmp/moec-nvrtc-XXXXXX";
  if (!mkdtemp(dir)) {
    perror("mkdtemp");
    failures++;
    return;
  }
  moert_status st = {0};
  bool ok = moert_cuda_compile_source(src, "sm_90", dir, &st);
  const char *log = strstr(st.msg, "the whole log: ");
  char path[1100] = "";
  if (log) {
    snprintf(path, sizeof path, "%s", log + strlen("the whole log: "));
    path[strcspn(path, "\n")] = 0;
  }
  char text[4096] = "";
  FILE *f = path[0] ? fopen(path, "r") : NULL;
  if (f) {
    size_t n = fread(text, 1, sizeof text - 1, f);
    text[n] = 0;
    fclose(f);
  }
  if (ok || !strstr(st.msg, "undeclared_name") || !strstr(st.msg, "sm_90") || !f ||
      !strstr(text, "undeclared_name")) {
    printf("FAIL broken source: compiled %s; message:\n%s\n  log %s: %s\n", ok ? "yes" : "no",
           st.msg, path[0] ? path : "(none named)", f ? "read" : "missing");
    failures++;
  } else {
    printf("ok   broken source fails with NVRTC's log:\n     %s\n",
           strchr(st.msg, '\n') ? strchr(st.msg, '\n') + 1 : st.msg);
  }
  if (path[0]) unlink(path);
  rmdir(dir);
}

/* The whole of file path; NULL (after a message) when it cannot be read. */
static char *slurp(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    perror(path);
    return NULL;
  }
  size_t cap = 1 << 16, n = 0;
  char *buf = malloc(cap);
  for (size_t k; buf && (k = fread(buf + n, 1, cap - n - 1, f)) > 0;) {
    n += k;
    if (n + 1 == cap) {
      char *bigger = realloc(buf, cap *= 2);
      if (!bigger) free(buf);
      buf = bigger;
    }
  }
  if (!buf || ferror(f)) {
    fprintf(stderr, "%s: cannot read\n", path);
    free(buf);
    buf = NULL;
  } else {
    buf[n] = 0;
  }
  fclose(f);
  return buf;
}

static void compile_file(const char *path) {
  char *src = slurp(path);
  if (!src) {
    failures++;
    return;
  }
  moert_status st = {0};
  int nspec = 0;
  double t0 = now();
  /* PTX for compute_90: NVRTC's front end and optimizer on every
   * specialization, every kernel by name; ptxas (three quarters of the time)
   * runs on the templates in gpu.nvrtc (sm_90), and on a model's own
   * kernels.cu where a GPU compiles it */
  if (moert_cuda_compile_check_source(src, "compute_90", &nspec, &st)) {
    printf("ok   %s compute_90 %.2f s, %d specialized kernels\n", path, now() - t0, nspec);
  } else {
    printf("FAIL %s compute_90\n%s\n  at %s\n", path, st.msg, st.trace);
    failures++;
  }
  free(src);
}

int main(int argc, char **argv) {
  if (!moert_nvrtc_available()) {
    printf("SKIP: libnvrtc (libnvrtc.so.13 or .12) could not be loaded; the kernel templates "
           "were not compiled\n");
    return 77;
  }
  if (argc > 1) {
    for (int i = 1; i < argc; i++) compile_file(argv[i]);
    printf("%s\n", failures ? "FAILED" : "every kernels.cu compiles");
    return failures ? 1 : 0;
  }
  int n = moert_cuda_template_count();
  printf("%d templates:", n);
  for (int i = 0; i < n; i++) printf(" %s", moert_cuda_template_name(i));
  printf("\n");
  /* the whole for Hopper's machine code, and Ampere's front end (its ptxas
   * would repeat sm_90's minus the Hopper paths: a fifth of CI's NVRTC time) */
  compile("sm_90", -1);
  compile("compute_80", -1);
  for (int i = 1; i < n; i++) compile("sm_90", i);
  broken_source();
  printf("%s\n", failures ? "FAILED" : "all templates compile");
  return failures ? 1 : 0;
}
