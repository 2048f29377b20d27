/* ckpt_dir.c — checkpoint directories, the protocol checkpoint.h describes: a
 * new checkpoint is written into a fresh sibling DIR.tmp-XXXXXX, its manifest
 * last, then swapped in place of DIR by two renames (the old one aside to
 * DIR.moec-old-XXXXXX, which a marker in the new one names); recovery finishes
 * a swap that a crash interrupted, touching only what such a marker names; verify checks a directory against its manifest; the
 * reader hands out files only after checking their bytes against it. */
#define _POSIX_C_SOURCE 200809L
#include "ckpt_impl.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

/* dir without trailing slashes (malloc'd), or NULL with a failure recorded. */
static char *norm_dir(const char *dir, moert_status *st) {
  if (!dir || !dir[0]) {
    MOERT_FAIL(st, "no checkpoint directory given");
    return NULL;
  }
  size_t n = strlen(dir);
  while (n > 1 && dir[n - 1] == '/') n--;
  char *d = malloc(n + 1);
  if (!d) {
    MOERT_FAIL(st, "out of memory");
    return NULL;
  }
  memcpy(d, dir, n);
  d[n] = '\0';
  if (strcmp(d, "/") == 0 || strcmp(d, ".") == 0 || strcmp(d, "..") == 0 ||
      (n >= 3 && strcmp(d + n - 3, "/..") == 0) || (n >= 2 && strcmp(d + n - 2, "/.") == 0)) {
    MOERT_FAIL(st, "`%s` cannot be a checkpoint directory (give it a name of its own)", dir);
    free(d);
    return NULL;
  }
  return d;
}

/* The parent of a normalized dir (malloc'd) and a pointer to its last component. */
static char *parent_of(const char *d, const char **base) {
  const char *slash = strrchr(d, '/');
  *base = slash ? slash + 1 : d;
  if (!slash) return strdup(".");
  size_t n = slash == d ? 1 : (size_t)(slash - d);
  char *p = malloc(n + 1);
  if (!p) return NULL;
  memcpy(p, d, n);
  p[n] = '\0';
  return p;
}

/* 1 if path exists, 0 if not, -1 on another error (errno set). */
static int exists(const char *path, bool *is_dir) {
  struct stat sb;
  if (lstat(path, &sb) != 0) return errno == ENOENT ? 0 : -1;
  if (is_dir) {
    *is_dir = S_ISDIR(sb.st_mode);
    if (S_ISLNK(sb.st_mode)) {
      struct stat tb;
      *is_dir = stat(path, &tb) == 0 && S_ISDIR(tb.st_mode);
    }
  }
  return 1;
}

static bool verify_dir(const char *d, moert_status *st) {
  bool is_dir = false;
  int e = exists(d, &is_dir);
  if (e < 0) return MOERT_FAIL(st, "cannot look at `%s`: %s", d, strerror(errno));
  if (e == 0) return MOERT_FAIL(st, "checkpoint `%s` does not exist", d);
  if (!is_dir) return MOERT_FAIL(st, "checkpoint `%s` is not a directory", d);
  moert_ckpt_manifest m;
  MOERT_TRY(st, moert_ckpt_manifest_load(d, &m, st));
  for (int i = 0; i < m.nfiles; i++)
    if (!moert_ckpt_manifest_check_file(d, &m.files[i], st)) {
      moert_ckpt_manifest_free(&m);
      return MOERT_UP(st);
    }
  moert_ckpt_manifest_free(&m);
  return true;
}

/* The previous checkpoint is moved aside under a name no user picks,
 * DIR.moec-old-XXXXXX (XXXXXX: the writer's DIR.tmp-XXXXXX suffix), and only
 * after the new directory holds a marker file, REPLACES_MARKER, that names it.
 * A directory beside DIR is taken for moec's leftover only when such a marker
 * (in DIR, or in a DIR.tmp-* that moec made) names it: a user's DIR.old, or
 * anything else, is never moved, overwritten or removed. */
#define OLD_INFIX ".moec-old-"
#define REPLACES_MARKER ".moec-replaces"

/* The leftover that the marker in directory dir names, as a path beside d
 * (malloc'd), or NULL where there is no marker or it names nothing of d's. */
static char *marked_old(const char *dir, const char *parent, const char *base) {
  char *mk = moert_ckpt_path_join(dir, REPLACES_MARKER);
  if (!mk) return NULL;
  int fd = open(mk, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  free(mk);
  if (fd < 0) return NULL;
  char buf[4096];
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 1 || buf[n - 1] != '\n') return NULL;
  buf[n - 1] = '\0';
  size_t nb = strlen(base), ni = strlen(OLD_INFIX);
  if (strncmp(buf, base, nb) != 0 || strncmp(buf + nb, OLD_INFIX, ni) != 0 ||
      strchr(buf, '/') != NULL || buf[nb + ni] == '\0')
    return NULL;
  return moert_ckpt_path_join(parent, buf);
}

/* Writes marker file into dir (durably) naming old's last component. */
static bool write_marker(const char *dir, const char *old, moert_status *st) {
  const char *slash = strrchr(old, '/');
  const char *name = slash ? slash + 1 : old;
  char *mk = moert_ckpt_path_join(dir, REPLACES_MARKER);
  if (!mk) return MOERT_FAIL(st, "out of memory");
  bool ok = false;
  int fd = open(mk, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0666);
  if (fd < 0) {
    MOERT_FAIL(st, "cannot create `%s`: %s", mk, strerror(errno));
    goto out;
  }
  size_t n = strlen(name);
  ok = write(fd, name, n) == (ssize_t)n && write(fd, "\n", 1) == 1 && fsync(fd) == 0;
  if (!ok) MOERT_FAIL(st, "cannot write `%s`: %s", mk, strerror(errno));
  close(fd);
  ok = ok && moert_ckpt_fsync_dir(dir, st);
out:
  free(mk);
  return ok;
}

/* Removes d's marker (and the leftover it names, if any) once d is in place. */
static void drop_marker(const char *d, const char *parent) {
  char *mk = moert_ckpt_path_join(d, REPLACES_MARKER);
  if (mk) unlink(mk);
  free(mk);
  moert_status quiet = {0};
  moert_ckpt_fsync_dir(d, &quiet);
  moert_ckpt_fsync_dir(parent, &quiet);
}

static bool recover_norm(const char *d, moert_status *st) {
  const char *base;
  char *parent = parent_of(d, &base);
  if (!parent) return MOERT_FAIL(st, "out of memory");
  bool ok = false;
  int have_dir = exists(d, NULL);
  if (have_dir < 0) {
    MOERT_FAIL(st, "cannot look at `%s`: %s", d, strerror(errno));
    goto out;
  }
  if (have_dir) {
    /* A crash after the swap, before DIR.moec-old-* was removed: remove it
     * only if DIR is good. */
    char *old = marked_old(d, parent, base);
    if (old) {
      moert_status quiet = {0};
      if (exists(old, NULL) == 0 || (verify_dir(d, &quiet) && moert_ckpt_remove_flat_dir(old)))
        drop_marker(d, parent);
    }
    free(old);
    ok = true;
    goto out;
  }
  /* No DIR: a crash between "rename DIR -> DIR.moec-old-X" and "rename
   * DIR.tmp-X -> DIR"; DIR.tmp-X's marker names the previous checkpoint. */
  DIR *dp = opendir(parent);
  if (!dp) { /* no parent: nothing to recover */
    ok = true;
    goto out;
  }
  size_t nb = strlen(base);
  struct dirent *ent;
  char *old = NULL;
  while (!old && (ent = readdir(dp)) != NULL) {
    if (strncmp(ent->d_name, base, nb) != 0 || strncmp(ent->d_name + nb, ".tmp-", 5) != 0) continue;
    char *tmp = moert_ckpt_path_join(parent, ent->d_name);
    old = tmp ? marked_old(tmp, parent, base) : NULL;
    if (old && exists(old, NULL) != 1) {
      free(old);
      old = NULL;
    }
    free(tmp);
  }
  closedir(dp);
  if (old && rename(old, d) != 0) {
    MOERT_FAIL(st,
               "checkpoint `%s` is missing and `%s` holds the previous one, but it cannot be "
               "moved back: %s",
               d, old, strerror(errno));
    free(old);
    goto out;
  }
  ok = !old || moert_ckpt_fsync_dir(parent, st);
  free(old);
out:
  free(parent);
  return ok;
}

bool moert_ckpt_recover(const char *dir, moert_status *st) {
  char *d = norm_dir(dir, st);
  if (!d) return MOERT_UP(st);
  bool ok = recover_norm(d, st);
  free(d);
  return ok ? true : MOERT_UP(st);
}

bool moert_ckpt_verify(const char *dir, moert_status *st) {
  char *d = norm_dir(dir, st);
  if (!d) return MOERT_UP(st);
  bool ok = recover_norm(d, st) && verify_dir(d, st);
  free(d);
  return ok ? true : MOERT_UP(st);
}

/* The lock file beside DIR: a name that no user picks (see moert_ckpt_lock_create). */
#define LOCK_SUFFIX ".moec-lock"

struct moert_ckpt_lock {
  char *path; /* DIR.moec-lock */
  int fd;     /* open, flock'ed */
};

/* Whether the parent of normalized d can take a checkpoint: exists, is a
 * directory and is writable. */
static bool check_writable(const char *d, moert_status *st) {
  const char *base;
  char *parent = parent_of(d, &base);
  if (!parent) return MOERT_FAIL(st, "out of memory");
  struct stat sb;
  bool ok = false;
  if (stat(parent, &sb) != 0) {
    if (errno == ENOENT)
      MOERT_FAIL(st,
                 "cannot save checkpoints in `%s`: its parent directory `%s` does not exist; "
                 "create it, or choose another checkpoint directory",
                 d, parent);
    else
      MOERT_FAIL(st,
                 "cannot save checkpoints in `%s`: its parent directory `%s` cannot be used (%s); "
                 "choose another checkpoint directory",
                 d, parent, strerror(errno));
  } else if (!S_ISDIR(sb.st_mode)) {
    MOERT_FAIL(st,
               "cannot save checkpoints in `%s`: `%s` is not a directory; choose another "
               "checkpoint directory",
               d, parent);
  } else if (access(parent, W_OK | X_OK) != 0) {
    MOERT_FAIL(st,
               "cannot save checkpoints in `%s`: its parent directory `%s` is not writable (%s); "
               "make it writable, or choose another checkpoint directory",
               d, parent, strerror(errno));
  } else {
    ok = true;
  }
  free(parent);
  return ok;
}

bool moert_ckpt_lock_create(const char *dir, moert_ckpt_lock **out, moert_status *st) {
  char *d = norm_dir(dir, st);
  if (!d) return MOERT_UP(st);
  moert_ckpt_lock *l = NULL;
  char *path = NULL;
  if (!check_writable(d, st)) goto fail;
  path = moert_ckpt_str_cat(d, LOCK_SUFFIX);
  l = calloc(1, sizeof *l);
  if (!path || !l) {
    MOERT_FAIL(st, "out of memory");
    goto fail;
  }
  /* A holder removes the file before it lets go: a lock won on a file that is
   * no longer at path is worth nothing, so try again. */
  for (int attempt = 0; attempt < 100; attempt++) {
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0666);
    if (fd < 0) {
      MOERT_FAIL(st,
                 "cannot create the lock file `%s` of checkpoint `%s`: %s; choose another "
                 "checkpoint directory",
                 path, d, strerror(errno));
      goto fail;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
      int err = errno;
      char pid[32] = {0};
      ssize_t n = err == EWOULDBLOCK ? pread(fd, pid, sizeof pid - 1, 0) : 0;
      close(fd);
      if (err != EWOULDBLOCK) {
        MOERT_FAIL(st, "cannot lock `%s`: %s", path, strerror(err));
        goto fail;
      }
      pid[n > 0 ? n : 0] = '\0';
      pid[strcspn(pid, "\n")] = '\0';
      MOERT_FAIL(st,
                 "checkpoint `%s` is in use by another run (pid %s, which holds `%s`); wait "
                 "for it to end, or choose another checkpoint directory",
                 d, pid[0] ? pid : "unknown", path);
      goto fail;
    }
    struct stat a, b;
    if (fstat(fd, &a) != 0 || stat(path, &b) != 0 || a.st_dev != b.st_dev || a.st_ino != b.st_ino) {
      close(fd);
      continue;
    }
    char pid[32];
    int n = snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
    if (ftruncate(fd, 0) != 0 || pwrite(fd, pid, (size_t)n, 0) != n) {
      MOERT_FAIL(st, "cannot write the lock file `%s`: %s", path, strerror(errno));
      close(fd);
      goto fail;
    }
    l->fd = fd;
    l->path = path;
    free(d);
    *out = l;
    return true;
  }
  MOERT_FAIL(st, "cannot lock `%s`: it keeps being removed", path);
fail:
  free(l);
  free(path);
  free(d);
  return MOERT_UP(st);
}

void moert_ckpt_lock_destroy(moert_ckpt_lock *l) {
  if (!l) return;
  unlink(l->path); /* while still held: see moert_ckpt_lock_create */
  close(l->fd);
  free(l->path);
  free(l);
}

struct moert_ckpt_writer {
  char *dir;    /* normalized target */
  char *parent; /* its parent directory */
  char *tmp;    /* DIR.tmp-XXXXXX, where files go until commit */
  moert_ckpt_mfile *files;
  int nfiles, cap;
  bool committed;
};

void moert_ckpt_writer_destroy(moert_ckpt_writer *w) {
  if (!w) return;
  if (!w->committed && w->tmp) moert_ckpt_remove_flat_dir(w->tmp);
  for (int i = 0; i < w->nfiles; i++) free((char *)w->files[i].name);
  free(w->files);
  free(w->dir);
  free(w->parent);
  free(w->tmp);
  free(w);
}

/* The file in every DIR.tmp-XXXXXX that moec makes: only a directory holding
 * it is removed as a dead writer's leftover (a user's look-alike never is). */
#define TMP_MARKER ".moec-tmp"

/* Removes DIR.tmp-* siblings: temporary directories of writers that died. */
static void remove_stale_tmp(const char *parent, const char *base) {
  DIR *dp = opendir(parent);
  if (!dp) return;
  size_t nb = strlen(base);
  struct dirent *ent;
  while ((ent = readdir(dp)) != NULL) {
    if (strncmp(ent->d_name, base, nb) != 0 || strncmp(ent->d_name + nb, ".tmp-", 5) != 0) continue;
    struct stat sb;
    if (fstatat(dirfd(dp), ent->d_name, &sb, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISDIR(sb.st_mode))
      continue;
    char *path = moert_ckpt_path_join(parent, ent->d_name);
    char *mk = path ? moert_ckpt_path_join(path, TMP_MARKER) : NULL;
    if (mk && lstat(mk, &sb) == 0 && S_ISREG(sb.st_mode)) moert_ckpt_remove_flat_dir(path);
    free(mk);
    free(path);
  }
  closedir(dp);
}

/* Makes a fresh DIR.tmp-XXXXXX with mode 0777 less the umask, as any directory
 * the user makes (mkdtemp's 0700 would stay on the committed checkpoint). */
static char *make_tmp_dir(const char *d, moert_status *st) {
  static const char digits[] = "abcdefghijklmnopqrstuvwxyz0123456789";
  for (int attempt = 0; attempt < 100; attempt++) {
    struct timespec ts = {0};
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t seed[4] = {(uint64_t)getpid(), (uint64_t)ts.tv_sec, (uint64_t)ts.tv_nsec,
                        (uint64_t)attempt};
    uint64_t x = XXH64(seed, sizeof seed, (uint64_t)(uintptr_t)d);
    char suffix[7];
    for (int i = 0; i < 6; i++, x /= 36) suffix[i] = digits[x % 36];
    suffix[6] = '\0';
    char *p = malloc(strlen(d) + sizeof ".tmp-" + 6);
    if (!p) {
      MOERT_FAIL(st, "out of memory");
      return NULL;
    }
    sprintf(p, "%s.tmp-%s", d, suffix);
    if (mkdir(p, 0777) == 0) {
      char *mk = moert_ckpt_path_join(p, TMP_MARKER);
      int fd = mk ? open(mk, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666) : -1;
      int err = errno;
      free(mk);
      if (fd >= 0) {
        close(fd);
        return p;
      }
      rmdir(p);
      MOERT_FAIL(st, "cannot write in `%s`, made to write the checkpoint into: %s", p,
                 strerror(err));
      free(p);
      return NULL;
    }
    int err = errno;
    free(p);
    if (err != EEXIST) {
      MOERT_FAIL(st, "cannot create a directory beside `%s` to write the checkpoint into: %s", d,
                 strerror(err));
      return NULL;
    }
  }
  MOERT_FAIL(st, "cannot find a free name for a directory beside `%s`", d);
  return NULL;
}

bool moert_ckpt_writer_create(const char *dir, unsigned flags, moert_ckpt_writer **out,
                              moert_status *st) {
  moert_ckpt_writer *w = calloc(1, sizeof *w);
  if (!w) return MOERT_FAIL(st, "out of memory");
  const char *base;
  w->dir = norm_dir(dir, st);
  if (!w->dir) goto fail;
  w->parent = parent_of(w->dir, &base);
  if (!w->parent) {
    MOERT_FAIL(st, "out of memory");
    goto fail;
  }
  bool parent_is_dir = false;
  if (exists(w->parent, &parent_is_dir) != 1 || !parent_is_dir) {
    MOERT_FAIL(st, "cannot write checkpoint `%s`: its parent directory `%s` does not exist", w->dir,
               w->parent);
    goto fail;
  }
  if (!recover_norm(w->dir, st)) goto fail;
  bool is_dir = false;
  int e = exists(w->dir, &is_dir);
  if (e < 0) {
    MOERT_FAIL(st, "cannot look at `%s`: %s", w->dir, strerror(errno));
    goto fail;
  }
  if (e == 1 && !is_dir) {
    MOERT_FAIL(st,
               "cannot write checkpoint `%s`: a file of that name exists and is not a directory",
               w->dir);
    goto fail;
  }
  if (e == 1 && !(flags & MOERT_CKPT_OVERWRITE_INVALID)) {
    moert_status why = {0};
    if (!verify_dir(w->dir, &why)) {
      MOERT_FAIL(
          st,
          "refusing to overwrite `%s`: it is not a valid checkpoint (%s); move it away, or ask "
          "to overwrite it (MOERT_CKPT_OVERWRITE_INVALID)",
          w->dir, why.msg);
      goto fail;
    }
  }
  remove_stale_tmp(w->parent, base);
  w->tmp = make_tmp_dir(w->dir, st);
  if (!w->tmp) goto fail;
  *out = w;
  return true;
fail:
  moert_ckpt_writer_destroy(w);
  return MOERT_UP(st);
}

/* Checks a name for add_*, writes the parts and records the file. */
static bool writer_add(moert_ckpt_writer *w, const char *name, const moert_ckpt_part *parts,
                       int nparts, moert_status *st) {
  if (w->committed) return MOERT_FAIL(st, "checkpoint `%s`: a file was added after commit", w->dir);
  if (!name || !moert_ckpt_valid_name(name) || strcmp(name, MOERT_CKPT_MANIFEST) == 0 ||
      (strlen(name) >= 4 && strcmp(name + strlen(name) - 4, ".tmp") == 0))
    return MOERT_FAIL(
        st,
        "checkpoint `%s`: `%s` is not a valid file name (letters, digits, `.`, `_`, `-`; "
        "not starting with `.`; not ending in .tmp; not MANIFEST.json)",
        w->dir, name ? moert_ckpt_show(name).s : "(null)");
  for (int i = 0; i < w->nfiles; i++)
    if (strcmp(w->files[i].name, name) == 0)
      return MOERT_FAIL(st, "checkpoint `%s`: the file `%s` was added twice", w->dir, name);
  if (w->nfiles == w->cap) {
    int cap = w->cap ? 2 * w->cap : 8;
    moert_ckpt_mfile *nf = realloc(w->files, sizeof *nf * (size_t)cap);
    if (!nf) return MOERT_FAIL(st, "out of memory");
    w->files = nf;
    w->cap = cap;
  }
  moert_ckpt_mfile f = {strdup(name), 0, 0};
  if (!f.name) return MOERT_FAIL(st, "out of memory");
  if (!moert_ckpt_atomic_write(w->tmp, name, parts, nparts, &f.size, &f.hash, st)) {
    free((char *)f.name);
    return MOERT_UP(st);
  }
  w->files[w->nfiles++] = f;
  return true;
}

bool moert_ckpt_add_file(moert_ckpt_writer *w, const char *name, const void *data, size_t len,
                         moert_status *st) {
  moert_ckpt_part pt = {data, len};
  MOERT_TRY(st, writer_add(w, name, &pt, 1, st));
  return true;
}

bool moert_ckpt_add_safetensors(moert_ckpt_writer *w, const char *name,
                                const moert_st_tensor *tensors, int n, const moert_kv *meta,
                                int nmeta, moert_status *st) {
  moert_sbuf hdr = {0};
  if (!moert_st_header(tensors, n, meta, nmeta, &hdr, st)) {
    free(hdr.p);
    return MOERT_UP(st);
  }
  moert_ckpt_part *parts = malloc(sizeof *parts * ((size_t)n + 2));
  if (!parts) {
    free(hdr.p);
    return MOERT_FAIL(st, "out of memory");
  }
  unsigned char lenbuf[8];
  moert_ckpt_store_le64(lenbuf, hdr.len);
  parts[0] = (moert_ckpt_part){lenbuf, 8};
  parts[1] = (moert_ckpt_part){hdr.p, hdr.len};
  for (int i = 0; i < n; i++) parts[i + 2] = (moert_ckpt_part){tensors[i].data, tensors[i].nbytes};
  bool ok = writer_add(w, name, parts, n + 2, st);
  free(parts);
  free(hdr.p);
  return ok ? true : MOERT_UP(st);
}

bool moert_ckpt_commit(moert_ckpt_writer *w, int64_t step, const moert_kv *meta, int nmeta,
                       moert_status *st) {
  if (w->committed) return MOERT_FAIL(st, "checkpoint `%s` was already committed", w->dir);
  if (nmeta < 0 || (nmeta > 0 && !meta))
    return MOERT_FAIL(st, "checkpoint `%s`: invalid metadata", w->dir);
  for (int i = 0; i < nmeta; i++) {
    if (!meta[i].key || !meta[i].value || !moert_ckpt_utf8_valid(meta[i].key) ||
        !moert_ckpt_utf8_valid(meta[i].value))
      return MOERT_FAIL(st, "checkpoint `%s`: metadata entry %d is NULL or not UTF-8", w->dir, i);
    for (int j = 0; j < i; j++)
      if (strcmp(meta[i].key, meta[j].key) == 0)
        return MOERT_FAIL(st, "checkpoint `%s`: metadata key `%s` given twice", w->dir,
                          moert_ckpt_show(meta[i].key).s);
  }
  moert_sbuf m = {0};
  moert_ckpt_manifest_format(step, meta, nmeta, w->files, w->nfiles, &m);
  if (m.oom) {
    free(m.p);
    return MOERT_FAIL(st, "out of memory writing the manifest of `%s`", w->dir);
  }
  moert_ckpt_part pt = {m.p, m.len};
  bool ok = moert_ckpt_atomic_write(w->tmp, MOERT_CKPT_MANIFEST, &pt, 1, NULL, NULL, st);
  free(m.p);
  if (!ok) return MOERT_UP(st);

  /* The swap. Before it: dir holds the old checkpoint (or nothing). The old one
   * goes aside to DIR.moec-old-XXXXXX, named first by a marker in the new one
   * (see REPLACES_MARKER), so that recovery knows it for moec's. */
  char *old = malloc(strlen(w->dir) + sizeof OLD_INFIX + 6);
  if (!old) return MOERT_FAIL(st, "out of memory");
  sprintf(old, "%s%s%s", w->dir, OLD_INFIX, w->tmp + strlen(w->dir) + strlen(".tmp-"));
  ok = false;
  int have_dir = exists(w->dir, NULL);
  if (have_dir < 0) {
    MOERT_FAIL(st, "cannot look at `%s`: %s", w->dir, strerror(errno));
    goto out;
  }
  if (have_dir) {
    if (exists(old, NULL) != 0) {
      MOERT_FAIL(st, "cannot replace checkpoint `%s`: `%s` is in the way; move it away", w->dir,
                 old);
      goto out;
    }
    if (!write_marker(w->tmp, old, st)) goto out;
    if (rename(w->dir, old) != 0) {
      MOERT_FAIL(st, "cannot move the previous checkpoint `%s` aside to `%s`: %s", w->dir, old,
                 strerror(errno));
      goto out;
    }
  }
  if (rename(w->tmp, w->dir) != 0) {
    int err = errno;
    if (have_dir) rename(old, w->dir); /* put the old one back */
    MOERT_FAIL(st, "cannot move the new checkpoint `%s` to `%s`: %s", w->tmp, w->dir,
               strerror(err));
    goto out;
  }
  w->committed = true;
  if (!moert_ckpt_fsync_dir(w->parent, st)) goto out;
  /* The new checkpoint is in place; failing to remove the old one is no failure
   * (recovery removes it later, its marker still naming it). A stray marker
   * left by a crash here is harmless: readers look only at listed files. */
  char *tmk = moert_ckpt_path_join(w->dir, TMP_MARKER);
  if (tmk) unlink(tmk);
  free(tmk);
  if (have_dir && moert_ckpt_remove_flat_dir(old))
    drop_marker(w->dir, w->parent);
  else if (!have_dir) {
    moert_status quiet = {0};
    moert_ckpt_fsync_dir(w->dir, &quiet);
  }
  ok = true;
out:
  free(old);
  return ok ? true : MOERT_UP(st);
}

struct moert_ckpt_reader {
  char *dir;
  moert_ckpt_manifest m;
};

bool moert_ckpt_reader_create(const char *dir, moert_ckpt_reader **out, moert_status *st) {
  moert_ckpt_reader *r = calloc(1, sizeof *r);
  if (!r) return MOERT_FAIL(st, "out of memory");
  r->dir = norm_dir(dir, st);
  if (!r->dir || !recover_norm(r->dir, st) || !verify_dir(r->dir, st) ||
      !moert_ckpt_manifest_load(r->dir, &r->m, st)) {
    moert_ckpt_reader_destroy(r);
    return MOERT_UP(st);
  }
  *out = r;
  return true;
}

void moert_ckpt_reader_destroy(moert_ckpt_reader *r) {
  if (!r) return;
  moert_ckpt_manifest_free(&r->m);
  free(r->dir);
  free(r);
}

int64_t moert_ckpt_step(const moert_ckpt_reader *r) { return r->m.step; }

const char *moert_ckpt_meta_get(const moert_ckpt_reader *r, const char *key) {
  for (int i = 0; i < r->m.nmeta; i++)
    if (strcmp(r->m.meta[i].key, key) == 0) return r->m.meta[i].value;
  return NULL;
}

int moert_ckpt_meta_count(const moert_ckpt_reader *r) { return r->m.nmeta; }

moert_kv moert_ckpt_meta_at(const moert_ckpt_reader *r, int i) {
  moert_kv none = {NULL, NULL};
  return i >= 0 && i < r->m.nmeta ? r->m.meta[i] : none;
}

int moert_ckpt_file_count(const moert_ckpt_reader *r) { return r->m.nfiles; }

const char *moert_ckpt_file_name(const moert_ckpt_reader *r, int i) {
  return i >= 0 && i < r->m.nfiles ? r->m.files[i].name : NULL;
}

bool moert_ckpt_read_file(const moert_ckpt_reader *r, const char *name, void **data, size_t *len,
                          moert_status *st) {
  const moert_ckpt_mfile *f = NULL;
  for (int i = 0; i < r->m.nfiles && name; i++)
    if (strcmp(r->m.files[i].name, name) == 0) f = &r->m.files[i];
  if (!f)
    return MOERT_FAIL(st, "checkpoint `%s` has no file `%s`", r->dir,
                      name ? moert_ckpt_show(name).s : "(null)");
  char *path = moert_ckpt_path_join(r->dir, name);
  if (!path) return MOERT_FAIL(st, "out of memory");
  uint64_t size;
  int err = 0;
  int fd = moert_ckpt_open_regular(path, &size, &err);
  if (fd < 0) {
    free(path);
    if (err == ENOENT)
      return MOERT_FAIL(st,
                        "checkpoint `%s` is damaged: `%s` is listed in MANIFEST.json but missing",
                        r->dir, name);
    if (err == EISDIR)
      return MOERT_FAIL(st, "checkpoint `%s` is damaged: `%s` is not a regular file", r->dir, name);
    return MOERT_FAIL(st, "checkpoint `%s`: cannot open `%s`: %s", r->dir, name, strerror(err));
  }
  if (size != f->size || size > SIZE_MAX - 1) {
    close(fd);
    free(path);
    return MOERT_FAIL(st,
                      "checkpoint `%s` is damaged: `%s` is %" PRIu64
                      " bytes but MANIFEST.json lists %" PRIu64 " (truncated or replaced)",
                      r->dir, name, size, f->size);
  }
  unsigned char *buf = malloc((size_t)size + 1);
  if (!buf) {
    close(fd);
    free(path);
    return MOERT_FAIL(st, "out of memory for `%s` of checkpoint `%s` (%" PRIu64 " bytes)", name,
                      r->dir, size);
  }
  size_t n = 0;
  bool ok = moert_ckpt_read_exact(fd, buf, (size_t)size + 1, &n, path, st);
  close(fd);
  free(path);
  if (!ok || n != size) {
    free(buf);
    if (!ok) return MOERT_UP(st);
    return MOERT_FAIL(st, "checkpoint `%s`: `%s` changed size while it was read", r->dir, name);
  }
  uint64_t h = XXH64(buf, n, 0);
  if (h != f->hash) {
    free(buf);
    return MOERT_FAIL(st,
                      "checkpoint `%s` is damaged: `%s` has xxh64 %016" PRIx64
                      " but MANIFEST.json lists %016" PRIx64,
                      r->dir, name, h, f->hash);
  }
  *data = buf;
  *len = n;
  return true;
}

bool moert_ckpt_read_safetensors(const moert_ckpt_reader *r, const char *name, moert_st_file **out,
                                 moert_status *st) {
  void *buf;
  size_t n;
  MOERT_TRY(st, moert_ckpt_read_file(r, name, &buf, &n, st));
  char *origin = moert_ckpt_path_join(r->dir, name);
  if (!origin) {
    free(buf);
    return MOERT_FAIL(st, "out of memory");
  }
  bool ok = moert_st_create_owned(buf, n, origin, out, st);
  free(origin);
  return ok ? true : MOERT_UP(st);
}
