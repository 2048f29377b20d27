/* build.c — emitting into a directory and building an executable; see build.h.
 * The C compiler is `cc` (or $MOEC_CC). The runtime is found next to the moec
 * binary when installed (PREFIX/bin/moec, PREFIX/include/moec,
 * PREFIX/lib/moec/libmoert.a), else in the build tree moec was built in. */
#include "build.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "emit_c.h"
#include "emit_cuda.h"

#ifndef MOEC_RUNTIME_INCLUDE
#error "MOEC_RUNTIME_INCLUDE must name the runtime's header directory"
#endif
#ifndef MOEC_RUNTIME_LIB
#error "MOEC_RUNTIME_LIB must name libmoert.a"
#endif
#ifndef MOEC_LINK_LIBS
#define MOEC_LINK_LIBS ""
#endif

/* buf = a + b; false when it does not fit. */
static bool join(char *buf, size_t n, const char *a, const char *b) {
  int k = snprintf(buf, n, "%s%s", a, b);
  return k >= 0 && (size_t)k < n;
}

static int errorf(const char *fmt, const char *a, const char *b) {
  fputs("moec: error: ", stderr);
  fprintf(stderr, fmt, a, b);
  fputc('\n', stderr);
  return 1;
}

/* Writes path's temporary file tmp (path.tmp.PID): the driver, or kernels.cu
 * when cuda. Nothing is left behind on failure. */
static int write_tmp(const moert_model *m, const char *spec_path, const char *path, bool cuda,
                     char *tmp, size_t n) {
  char suffix[32];
  snprintf(suffix, sizeof suffix, ".tmp.%ld", (long)getpid());
  if (!join(tmp, n, path, suffix)) return errorf("path too long: %s%s", path, "");
  FILE *f = fopen(tmp, "w");
  if (!f) return errorf("cannot write %s: %s", path, strerror(errno));
  if (cuda) moec_emit_cuda(m, spec_path, f);
  else moec_emit_c(m, spec_path, f);
  bool bad = ferror(f) != 0;
  bad |= fclose(f) != 0;
  if (bad) {
    int e = errno;
    unlink(tmp);
    return errorf("cannot write %s: %s", path, strerror(e ? e : EIO));
  }
  return 0;
}

/* Moves tmp onto path; removes tmp when it cannot. */
static int commit(const char *tmp, const char *path) {
  if (rename(tmp, path) == 0) return 0;
  int e = errno;
  unlink(tmp);
  return errorf("cannot write %s: %s", path, strerror(e));
}

/* Writes the driver to path through a temporary file and a rename. */
static int write_driver(const moert_model *m, const char *spec_path, const char *path) {
  char tmp[PATH_MAX];
  if (write_tmp(m, spec_path, path, false, tmp, sizeof tmp)) return 1;
  return commit(tmp, path);
}

int moec_emit_dir(const moert_model *m, const char *spec_path, const char *dir) {
  if (mkdir(dir, 0777) != 0 && errno != EEXIST) return errorf("cannot create %s: %s", dir, strerror(errno));
  struct stat st;
  if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) return errorf("%s is not a directory%s", dir, "");
  char driver[PATH_MAX], kernels[PATH_MAX], tmp_driver[PATH_MAX], tmp_kernels[PATH_MAX];
  if (!join(driver, sizeof driver, dir, "/model.c") || !join(kernels, sizeof kernels, dir, "/kernels.cu"))
    return errorf("path too long: %s%s", dir, "");
  /* both written before either is renamed: a failure leaves the old files */
  if (write_tmp(m, spec_path, kernels, true, tmp_kernels, sizeof tmp_kernels)) return 1;
  if (write_tmp(m, spec_path, driver, false, tmp_driver, sizeof tmp_driver)) {
    unlink(tmp_kernels);
    return 1;
  }
  if (commit(tmp_kernels, kernels)) {
    unlink(tmp_driver);
    return 1;
  }
  return commit(tmp_driver, driver);
}

/* The runtime's include directory and library: installed beside this moec,
 * or the build tree's. */
static void find_runtime(char *inc, char *lib, size_t n) {
  char exe[PATH_MAX];
  ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (len > 0) {
    exe[len] = 0;
    char *slash = strrchr(exe, '/');
    if (slash) {
      *slash = 0;
      if (join(lib, n, exe, "/../lib/moec/libmoert.a") && join(inc, n, exe, "/../include/moec") &&
          access(lib, R_OK) == 0 && access(inc, R_OK) == 0)
        return;
    }
  }
  snprintf(inc, n, "%s", MOEC_RUNTIME_INCLUDE);
  snprintf(lib, n, "%s", MOEC_RUNTIME_LIB);
}

/* Runs argv, waits; 0 when it exited 0. */
static int run(char *const argv[]) {
  pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    execvp(argv[0], argv);
    fprintf(stderr, "moec: error: cannot run the C compiler `%s`: %s; install gcc or set MOEC_CC\n",
            argv[0], strerror(errno));
    _exit(127);
  }
  int status;
  while (waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

int moec_build(const moert_model *m, const char *spec_path, const char *output, bool keep) {
  char out[PATH_MAX];
  if (output) {
    snprintf(out, sizeof out, "%s", output);
  } else {
    const char *base = strrchr(spec_path, '/');
    base = base ? base + 1 : spec_path;
    if (strcmp(spec_path, "-") == 0) base = m->name;
    snprintf(out, sizeof out, "%s", base);
    size_t n = strlen(out);
    if (n > 4 && strcmp(out + n - 4, ".moe") == 0) out[n - 4] = 0;
    else if (strcmp(out, base) == 0 && strcmp(spec_path, "-") != 0)
      return errorf("the spec %s has no .moe extension, so the binary would overwrite it; name "
                    "the binary with -o BIN%s", spec_path, "");
  }
  /* the binary's directory must exist and take files, before anything is compiled */
  char dir[PATH_MAX];
  snprintf(dir, sizeof dir, "%s", out);
  char *slash = strrchr(dir, '/');
  if (slash) *(slash == dir ? slash + 1 : slash) = 0;
  else snprintf(dir, sizeof dir, ".");
  struct stat sb;
  if (stat(dir, &sb) != 0)
    return errorf("cannot write %s: the directory %s does not exist; create it or choose another -o",
                  out, dir);
  if (!S_ISDIR(sb.st_mode)) return errorf("cannot write %s: %s is not a directory", out, dir);
  if (access(dir, W_OK) != 0)
    return errorf("cannot write %s: the directory %s is not writable", out, dir);
  char tmpdir[PATH_MAX];
  const char *t = getenv("TMPDIR");
  snprintf(tmpdir, sizeof tmpdir, "%s/moec-build-XXXXXX", t && *t ? t : "/tmp");
  if (!mkdtemp(tmpdir)) return errorf("cannot create a temporary directory in %s: %s", t && *t ? t : "/tmp", strerror(errno));
  char driver[PATH_MAX], tmpbin[PATH_MAX], suffix[32];
  snprintf(suffix, sizeof suffix, ".tmp.%ld", (long)getpid());
  if (!join(driver, sizeof driver, tmpdir, "/model.c") || !join(tmpbin, sizeof tmpbin, out, suffix)) {
    rmdir(tmpdir);
    return errorf("path too long: %s%s", out, "");
  }
  int rc = write_driver(m, spec_path, driver);
  if (rc == 0) {
    char inc[PATH_MAX], lib[PATH_MAX], incflag[PATH_MAX + 2];
    find_runtime(inc, lib, sizeof inc);
    snprintf(incflag, sizeof incflag, "-I%s", inc);
    const char *cc = getenv("MOEC_CC");
    char libs[] = MOEC_LINK_LIBS;
    char *argv[64];
    int k = 0;
    argv[k++] = (char *)(cc && *cc ? cc : "cc");
    argv[k++] = "-O2";
    argv[k++] = "-std=gnu11";
    argv[k++] = incflag;
    argv[k++] = "-o";
    argv[k++] = tmpbin;
    argv[k++] = driver;
    argv[k++] = lib;
    for (char *tok = strtok(libs, ";"); tok && k < 62; tok = strtok(NULL, ";"))
      if (*tok) argv[k++] = tok;
    argv[k] = NULL;
    int r = run(argv);
    if (r != 0) {
      unlink(tmpbin);
      fprintf(stderr, "moec: error: the C compiler failed (status %d) building %s from %s; the "
                      "command was:\n ",
              r, out, spec_path);
      for (int i = 0; i < k; i++) fprintf(stderr, " %s", argv[i]);
      fputc('\n', stderr);
      rc = 1;
    } else if (rename(tmpbin, out) != 0) {
      int e = errno;
      unlink(tmpbin);
      rc = errorf("cannot write %s: %s", out, strerror(e));
    }
  }
  if (rc == 0 && keep) {
    char kept[PATH_MAX];
    rc = join(kept, sizeof kept, out, ".c") ? write_driver(m, spec_path, kept)
                                             : errorf("path too long: %s%s", out, ".c");
  }
  unlink(driver);
  rmdir(tmpdir);
  return rc;
}
