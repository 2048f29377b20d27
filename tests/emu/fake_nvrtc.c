/* fake_nvrtc.c — libnvrtc.so.13 for the CPU emulation of the CUDA stack
 * (tests/emu): nvrtcCompileProgram compiles the CUDA source with the host's
 * C++ compiler, emu_device.h included first, into a shared object, and the
 * "CUBIN" (or "PTX") it returns is that object behind a magic header, which
 * the stand-in driver (fake_cuda.c) loads. Each `extern "C" __global__ void
 * NAME(` of the source is registered under its name.
 *
 * The compiler: $MOEC_EMU_CXX, else the one CMake found (MOEC_EMU_CXX at
 * build time). Options: -D/--define-macro are passed on, the others (the
 * architecture, -lineinfo, ...) are accepted and ignored. It reports NVRTC
 * version 99.N, so a kernel cache never mixes its images with real ones; N is
 * a hash of emu_device.h (1 to 999), so a cache never hands the driver an
 * image made with another version of it either. */
#define _GNU_SOURCE
#include <nvrtc.h>

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <spawn.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fake_image.h"

extern char **environ;

struct _nvrtcProgram {
  char *src, *name;
  char *log;
  unsigned char *image;
  size_t image_size;
};

const char *nvrtcGetErrorString(nvrtcResult r) {
  switch (r) {
  case NVRTC_SUCCESS: return "NVRTC_SUCCESS";
  case NVRTC_ERROR_OUT_OF_MEMORY: return "NVRTC_ERROR_OUT_OF_MEMORY";
  case NVRTC_ERROR_PROGRAM_CREATION_FAILURE: return "NVRTC_ERROR_PROGRAM_CREATION_FAILURE";
  case NVRTC_ERROR_INVALID_INPUT: return "NVRTC_ERROR_INVALID_INPUT";
  case NVRTC_ERROR_INVALID_PROGRAM: return "NVRTC_ERROR_INVALID_PROGRAM";
  case NVRTC_ERROR_INVALID_OPTION: return "NVRTC_ERROR_INVALID_OPTION";
  case NVRTC_ERROR_COMPILATION: return "NVRTC_ERROR_COMPILATION";
  case NVRTC_ERROR_INTERNAL_ERROR: return "NVRTC_ERROR_INTERNAL_ERROR";
  default: return "NVRTC_ERROR (emulated: not one the stand-in returns)";
  }
}

nvrtcResult nvrtcVersion(int *major, int *minor) {
  if (!major || !minor) return NVRTC_ERROR_INVALID_INPUT;
  /* FNV-1a of emu_device.h: its version, for the kernel cache's key */
  uint64_t h = 1469598103934665603ull;
  FILE *f = fopen(MOEC_EMU_DEVICE_H, "rb");
  if (!f) return NVRTC_ERROR_INTERNAL_ERROR;
  for (int c; (c = fgetc(f)) != EOF;) h = (h ^ (uint64_t)c) * 1099511628211ull;
  fclose(f);
  *major = 99;
  *minor = 1 + (int)(h % 999);
  return NVRTC_SUCCESS;
}

static const int archs[] = {80, 90};

nvrtcResult nvrtcGetNumSupportedArchs(int *n) {
  if (!n) return NVRTC_ERROR_INVALID_INPUT;
  *n = (int)(sizeof archs / sizeof archs[0]);
  return NVRTC_SUCCESS;
}

nvrtcResult nvrtcGetSupportedArchs(int *out) {
  if (!out) return NVRTC_ERROR_INVALID_INPUT;
  memcpy(out, archs, sizeof archs);
  return NVRTC_SUCCESS;
}

nvrtcResult nvrtcCreateProgram(nvrtcProgram *prog, const char *src, const char *name, int nheaders,
                               const char *const *headers, const char *const *include_names) {
  (void)headers;
  (void)include_names;
  if (!prog || !src) return NVRTC_ERROR_INVALID_INPUT;
  if (nheaders > 0) return NVRTC_ERROR_INVALID_INPUT; /* the runtime passes none */
  struct _nvrtcProgram *p = calloc(1, sizeof *p);
  if (!p || !(p->src = strdup(src)) || !(p->name = strdup(name ? name : "default_program"))) {
    if (p) free(p->src);
    free(p);
    return NVRTC_ERROR_OUT_OF_MEMORY;
  }
  *prog = p;
  return NVRTC_SUCCESS;
}

nvrtcResult nvrtcDestroyProgram(nvrtcProgram *prog) {
  if (!prog || !*prog) return NVRTC_ERROR_INVALID_PROGRAM;
  struct _nvrtcProgram *p = *prog;
  free(p->src);
  free(p->name);
  free(p->log);
  free(p->image);
  free(p);
  *prog = NULL;
  return NVRTC_SUCCESS;
}

/* The whole file at path, NUL-terminated (NULL when unreadable). */
static char *slurp(const char *path, size_t *size) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  char *buf = NULL;
  size_t n = 0, cap = 0;
  for (;;) {
    if (n + 65536 + 1 > cap) {
      cap = (n + 65536 + 1) * 2;
      char *nb = realloc(buf, cap);
      if (!nb) {
        free(buf);
        fclose(f);
        return NULL;
      }
      buf = nb;
    }
    size_t r = fread(buf + n, 1, 65536, f);
    n += r;
    if (r < 65536) break;
  }
  fclose(f);
  buf[n] = 0;
  if (size) *size = n;
  return buf;
}

static bool is_ident(int c) { return isalnum(c) || c == '_'; }

/* src followed by a MOERT_EMU_KERNEL(NAME) line per kernel that pre (src
 * preprocessed with MOERT_EMU_SCAN) defines. */
static char *with_registrations(const char *src, const char *pre) {
  static const char pat[] = "__moert_emu_global__ void ";
  size_t n = strlen(src), cap = n + 4096, len = 0;
  char *out = malloc(cap);
  if (!out) return NULL;
  memcpy(out, src, n);
  len = n;
  len += (size_t)snprintf(out + len, cap - len, "\n// registered by the emulated NVRTC\n");
  for (const char *p = strstr(pre, pat); p; p = strstr(p + 1, pat)) {
    const char *a = p + sizeof pat - 1;
    while (*a == ' ') a++;
    const char *b = a;
    while (is_ident((unsigned char)*b)) b++;
    const char *c = b;
    while (*c == ' ') c++;
    if (b == a || *c != '(') continue;
    /* once per name */
    char line[320];
    int w = snprintf(line, sizeof line, "MOERT_EMU_KERNEL(%.*s)\n", (int)(b - a), a);
    if (w < 0 || (size_t)w >= sizeof line) continue;
    out[len] = 0;
    if (strstr(out + n, line)) continue;
    if (len + (size_t)w + 1 > cap) {
      cap = (len + (size_t)w + 1) * 2;
      char *nb = realloc(out, cap);
      if (!nb) {
        free(out);
        return NULL;
      }
      out = nb;
    }
    memcpy(out + len, line, (size_t)w);
    len += (size_t)w;
  }
  out[len] = 0;
  return out;
}

static bool write_file(const char *path, const char *text) {
  FILE *f = fopen(path, "w");
  if (!f) return false;
  bool ok = fputs(text, f) >= 0;
  return (fclose(f) == 0) && ok;
}

static void set_log(struct _nvrtcProgram *p, const char *fmt, const char *a, const char *b) {
  free(p->log);
  size_t n = strlen(fmt) + strlen(a) + strlen(b) + 1;
  if ((p->log = malloc(n))) snprintf(p->log, n, fmt, a, b);
}

/* Runs argv (the compiler), its output into log_path; 0 when it succeeded,
 * else an NVRTC result and the program's log says why. */
static nvrtcResult run(struct _nvrtcProgram *p, const char *const *argv, const char *log_path) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, log_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  pid_t pid;
  int err = posix_spawnp(&pid, argv[0], &fa, NULL, (char *const *)argv, environ);
  posix_spawn_file_actions_destroy(&fa);
  if (err) {
    set_log(p, "emulated NVRTC: cannot run the C++ compiler %s: %s\n", argv[0], strerror(err));
    return NVRTC_ERROR_INTERNAL_ERROR;
  }
  int status = 0;
  if (waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0) return NVRTC_SUCCESS;
  char *log = slurp(log_path, NULL);
  set_log(p, "%s%s", log ? log : "", log ? "" : "emulated NVRTC: the C++ compiler failed\n");
  free(log);
  return NVRTC_ERROR_COMPILATION;
}

nvrtcResult nvrtcCompileProgram(nvrtcProgram prog, int nopts, const char *const *opts) {
  if (!prog) return NVRTC_ERROR_INVALID_PROGRAM;
  struct _nvrtcProgram *p = prog;
  free(p->image);
  p->image = NULL;
  p->image_size = 0;
  /* cxx -std=c++17 -O1 ... -include emu_device.h [-D...] -x c++ SRC -o OUT, after
   * the same with -E -DMOERT_EMU_SCAN (the kernels' names) */
  const char *cxx = getenv("MOEC_EMU_CXX");
  const char *argv[64 + 24];
  int argc = 0;
  argv[argc++] = cxx && *cxx ? cxx : MOEC_EMU_CXX;
  static const char *const fixed[] = {"-std=c++17", "-O1", "-fPIC", "-w", "-fno-strict-aliasing",
                                      "-ffp-contract=off", "-include", MOEC_EMU_DEVICE_H};
  for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++) argv[argc++] = fixed[i];
  char defs[64][512];
  int ndefs = 0;
  for (int i = 0; i < nopts; i++) {
    if (!opts || !opts[i]) return NVRTC_ERROR_INVALID_OPTION;
    const char *d = !strncmp(opts[i], "-D", 2) ? opts[i] + 2
                    : !strncmp(opts[i], "--define-macro=", 15) ? opts[i] + 15
                                                                : NULL;
    if (!d) continue; /* the architecture, -lineinfo, ...: nothing to do here */
    if (ndefs == 64 || strlen(d) + 3 > sizeof defs[0]) return NVRTC_ERROR_INVALID_OPTION;
    snprintf(defs[ndefs], sizeof defs[0], "-D%s", d);
    argv[argc++] = defs[ndefs++];
  }
  const char *tmp = getenv("TMPDIR");
  char dir[4096], src_path[4200], pre_path[4200], so_path[4200], log_path[4200];
  snprintf(dir, sizeof dir, "%s/moec-emu-nvrtc-XXXXXX", tmp && *tmp ? tmp : "/tmp");
  if (!mkdtemp(dir)) {
    set_log(p, "emulated NVRTC: cannot make a temporary folder in %s: %s\n", dir, strerror(errno));
    return NVRTC_ERROR_INTERNAL_ERROR;
  }
  snprintf(src_path, sizeof src_path, "%s/kernels.cu", dir);
  snprintf(pre_path, sizeof pre_path, "%s/kernels.ii", dir);
  snprintf(so_path, sizeof so_path, "%s/kernels.so", dir);
  snprintf(log_path, sizeof log_path, "%s/log", dir);
  nvrtcResult rc = NVRTC_SUCCESS;
  if (!write_file(src_path, p->src)) {
    set_log(p, "emulated NVRTC: cannot write %s%s\n", src_path, "");
    rc = NVRTC_ERROR_INTERNAL_ERROR;
  }
  int common = argc;
  if (rc == NVRTC_SUCCESS) { /* the first pass */
    const char *const more[] = {"-E", "-DMOERT_EMU_SCAN", "-x", "c++", src_path, "-o", pre_path, NULL};
    memcpy(argv + common, more, sizeof more);
    rc = run(p, argv, log_path);
  }
  char *pre = rc == NVRTC_SUCCESS ? slurp(pre_path, NULL) : NULL;
  char *full = pre ? with_registrations(p->src, pre) : NULL;
  if (rc == NVRTC_SUCCESS && (!full || !write_file(src_path, full))) {
    set_log(p, "emulated NVRTC: cannot write %s%s\n", src_path, full ? "" : " (out of memory)");
    rc = NVRTC_ERROR_INTERNAL_ERROR;
  }
  free(pre);
  free(full);
  if (rc == NVRTC_SUCCESS) { /* the shared object */
    const char *const more[] = {"-shared", "-x", "c++", src_path, "-o", so_path, NULL};
    memcpy(argv + common, more, sizeof more);
    rc = run(p, argv, log_path);
  }
  if (rc == NVRTC_SUCCESS) {
    size_t n = 0;
    char *so = slurp(so_path, &n);
    if (so && (p->image = malloc(MOEC_EMU_IMAGE_HEAD + n))) {
      moec_emu_image_head(p->image, n);
      memcpy(p->image + MOEC_EMU_IMAGE_HEAD, so, n);
      p->image_size = MOEC_EMU_IMAGE_HEAD + n;
      set_log(p, "%s%s", "", "");
    } else {
      set_log(p, "emulated NVRTC: cannot read %s%s\n", so_path, "");
      rc = NVRTC_ERROR_INTERNAL_ERROR;
    }
    free(so);
  }
  unlink(src_path);
  unlink(pre_path);
  unlink(so_path);
  unlink(log_path);
  rmdir(dir);
  return rc;
}

nvrtcResult nvrtcGetProgramLogSize(nvrtcProgram prog, size_t *n) {
  if (!prog || !n) return NVRTC_ERROR_INVALID_INPUT;
  *n = (prog->log ? strlen(prog->log) : 0) + 1;
  return NVRTC_SUCCESS;
}

nvrtcResult nvrtcGetProgramLog(nvrtcProgram prog, char *log) {
  if (!prog || !log) return NVRTC_ERROR_INVALID_INPUT;
  strcpy(log, prog->log ? prog->log : "");
  return NVRTC_SUCCESS;
}

static nvrtcResult image_size(nvrtcProgram prog, size_t *n) {
  if (!prog || !n) return NVRTC_ERROR_INVALID_INPUT;
  if (!prog->image) return NVRTC_ERROR_INVALID_PROGRAM;
  *n = prog->image_size;
  return NVRTC_SUCCESS;
}

static nvrtcResult image_copy(nvrtcProgram prog, char *out) {
  if (!prog || !out) return NVRTC_ERROR_INVALID_INPUT;
  if (!prog->image) return NVRTC_ERROR_INVALID_PROGRAM;
  memcpy(out, prog->image, prog->image_size);
  return NVRTC_SUCCESS;
}

nvrtcResult nvrtcGetCUBINSize(nvrtcProgram prog, size_t *n) { return image_size(prog, n); }
nvrtcResult nvrtcGetCUBIN(nvrtcProgram prog, char *out) { return image_copy(prog, out); }
nvrtcResult nvrtcGetPTXSize(nvrtcProgram prog, size_t *n) { return image_size(prog, n); }
nvrtcResult nvrtcGetPTX(nvrtcProgram prog, char *out) { return image_copy(prog, out); }
