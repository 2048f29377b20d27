/* ckpt_file.c — the file operations of checkpoints: plain names, atomic writes
 * (NAME.tmp, fsync, rename, fsync of the directory) that hash what they write with
 * xxHash64 (libxxhash), whole reads with limits, hashing a file in chunks, and the
 * removal of a flat directory. Every failure is a message naming the path. */
#define _POSIX_C_SOURCE 200809L
#include "ckpt_impl.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

/* Bytes read at a time when a file is hashed. */
#define HASH_CHUNK (1u << 20)

bool moert_ckpt_valid_name(const char *name) {
  size_t n = strlen(name);
  if (n == 0 || n > MOERT_CKPT_NAME_MAX || name[0] == '.') return false;
  for (size_t i = 0; i < n; i++) {
    char c = name[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
          c == '_' || c == '-'))
      return false;
  }
  return true;
}

char *moert_ckpt_path_join(const char *a, const char *b) {
  size_t na = strlen(a), nb = strlen(b);
  char *p = malloc(na + nb + 2);
  if (!p) return NULL;
  memcpy(p, a, na);
  p[na] = '/';
  memcpy(p + na + 1, b, nb + 1);
  return p;
}

char *moert_ckpt_str_cat(const char *a, const char *b) {
  size_t na = strlen(a), nb = strlen(b);
  char *p = malloc(na + nb + 1);
  if (!p) return NULL;
  memcpy(p, a, na);
  memcpy(p + na, b, nb + 1);
  return p;
}

void moert_ckpt_store_le64(unsigned char *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

uint64_t moert_ckpt_load_le64(const unsigned char *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
  return v;
}

static bool write_all(int fd, const void *buf, size_t n, const char *path, moert_status *st) {
  const char *p = buf;
  while (n > 0) {
    ssize_t k = write(fd, p, n);
    if (k < 0) {
      if (errno == EINTR) continue;
      return MOERT_FAIL(st, "cannot write `%s`: %s", path, strerror(errno));
    }
    p += k;
    n -= (size_t)k;
  }
  return true;
}

bool moert_ckpt_fsync_dir(const char *dir, moert_status *st) {
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    return MOERT_FAIL(st, "cannot open directory `%s` to sync it: %s", dir, strerror(errno));
  int rc = fsync(fd);
  int err = errno;
  close(fd);
  if (rc != 0 && err != EINVAL && err != ENOTSUP)
    return MOERT_FAIL(st, "cannot sync directory `%s`: %s", dir, strerror(err));
  return true;
}

/* Writes the parts to fd, hashing them; on failure records it (fd stays open). */
static bool write_parts(int fd, const moert_ckpt_part *parts, int nparts, const char *path,
                        uint64_t *total, uint64_t *hash, moert_status *st) {
  XXH64_state_t *hs = XXH64_createState();
  if (!hs) return MOERT_FAIL(st, "out of memory");
  XXH64_reset(hs, 0);
  *total = 0;
  bool ok = true;
  for (int i = 0; ok && i < nparts; i++) {
    if (parts[i].n == 0) continue; /* p may be NULL */
    ok = write_all(fd, parts[i].p, parts[i].n, path, st);
    XXH64_update(hs, parts[i].p, parts[i].n);
    *total += parts[i].n;
  }
  *hash = XXH64_digest(hs);
  XXH64_freeState(hs);
  return ok;
}

bool moert_ckpt_atomic_write(const char *dir, const char *name, const moert_ckpt_part *parts,
                             int nparts, uint64_t *size, uint64_t *hash, moert_status *st) {
  if (!moert_ckpt_valid_name(name))
    return MOERT_FAIL(
        st,
        "cannot write `%s` in `%s`: a checkpoint file name is letters, digits, `.`, `_` "
        "and `-`, not starting with `.`",
        moert_ckpt_show(name).s, dir);
  char *final = moert_ckpt_path_join(dir, name);
  char *tmp = final ? moert_ckpt_str_cat(final, ".tmp") : NULL;
  if (!tmp) {
    free(final);
    return MOERT_FAIL(st, "out of memory");
  }
  bool ok = false;
  uint64_t total = 0, h = 0;
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) {
    MOERT_FAIL(st, "cannot create `%s`: %s", tmp, strerror(errno));
    goto out;
  }
  if (!write_parts(fd, parts, nparts, tmp, &total, &h, st)) {
    close(fd);
    unlink(tmp);
    goto out;
  }
  if (fsync(fd) != 0) {
    MOERT_FAIL(st, "cannot sync `%s`: %s", tmp, strerror(errno));
    close(fd);
    unlink(tmp);
    goto out;
  }
  if (close(fd) != 0) {
    MOERT_FAIL(st, "cannot close `%s`: %s", tmp, strerror(errno));
    unlink(tmp);
    goto out;
  }
  if (rename(tmp, final) != 0) {
    MOERT_FAIL(st, "cannot rename `%s` to `%s`: %s", tmp, final, strerror(errno));
    unlink(tmp);
    goto out;
  }
  if (!moert_ckpt_fsync_dir(dir, st)) goto out;
  if (size) *size = total;
  if (hash) *hash = h;
  ok = true;
out:
  free(tmp);
  free(final);
  return ok ? true : MOERT_UP(st);
}

bool moert_ckpt_write_file(const char *dir, const char *name, const void *data, size_t len,
                           moert_status *st) {
  moert_ckpt_part pt = {data, len};
  MOERT_TRY(st, moert_ckpt_atomic_write(dir, name, &pt, 1, NULL, NULL, st));
  return true;
}

int moert_ckpt_open_regular(const char *path, uint64_t *size, int *err) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    *err = errno;
    return -1;
  }
  struct stat sb;
  if (fstat(fd, &sb) != 0) {
    *err = errno;
    close(fd);
    return -1;
  }
  if (!S_ISREG(sb.st_mode)) {
    *err = EISDIR; /* reported as "not a regular file" */
    close(fd);
    return -1;
  }
  *size = (uint64_t)sb.st_size;
  return fd;
}

bool moert_ckpt_read_exact(int fd, void *buf, size_t n, size_t *got, const char *path,
                           moert_status *st) {
  char *p = buf;
  size_t done = 0;
  while (done < n) {
    ssize_t k = read(fd, p + done, n - done);
    if (k < 0) {
      if (errno == EINTR) continue;
      return MOERT_FAIL(st, "cannot read `%s`: %s", path, strerror(errno));
    }
    if (k == 0) break;
    done += (size_t)k;
  }
  *got = done;
  return true;
}

bool moert_ckpt_hash_fd(int fd, const char *path, uint64_t *total, uint64_t *hash,
                        moert_status *st) {
  unsigned char *buf = malloc(HASH_CHUNK);
  XXH64_state_t *hs = XXH64_createState();
  if (!buf || !hs) {
    free(buf);
    XXH64_freeState(hs);
    return MOERT_FAIL(st, "out of memory");
  }
  XXH64_reset(hs, 0);
  *total = 0;
  bool ok = true;
  for (;;) {
    size_t got = 0;
    if (!(ok = moert_ckpt_read_exact(fd, buf, HASH_CHUNK, &got, path, st))) break;
    XXH64_update(hs, buf, got);
    *total += got;
    if (got < HASH_CHUNK) break;
  }
  *hash = XXH64_digest(hs);
  XXH64_freeState(hs);
  free(buf);
  return ok ? true : MOERT_UP(st);
}

bool moert_ckpt_read_whole(const char *path, uint64_t max, unsigned char **out, size_t *len,
                           moert_status *st) {
  uint64_t size;
  int err = 0;
  int fd = moert_ckpt_open_regular(path, &size, &err);
  if (fd < 0) {
    if (err == EISDIR) return MOERT_FAIL(st, "`%s` is not a regular file", path);
    return MOERT_FAIL(st, "cannot open `%s`: %s", path, strerror(err));
  }
  if (size > max || size > SIZE_MAX - 1) {
    close(fd);
    return MOERT_FAIL(st, "`%s` is %" PRIu64 " bytes, over the limit of %" PRIu64, path, size, max);
  }
  unsigned char *buf = malloc((size_t)size + 1);
  if (!buf) {
    close(fd);
    return MOERT_FAIL(st, "out of memory for `%s` (%" PRIu64 " bytes)", path, size);
  }
  size_t got = 0;
  bool ok = moert_ckpt_read_exact(fd, buf, (size_t)size + 1, &got, path, st);
  close(fd);
  if (ok && got != size) ok = MOERT_FAIL(st, "`%s` changed size while it was read", path);
  if (!ok) {
    free(buf);
    return MOERT_UP(st);
  }
  *out = buf;
  *len = got;
  return true;
}

bool moert_ckpt_remove_flat_dir(const char *path) {
  struct stat lb;
  if (lstat(path, &lb) != 0) return errno == ENOENT;
  if (S_ISLNK(lb.st_mode)) return unlink(path) == 0; /* never empty what a link points to */
  DIR *d = opendir(path);
  if (!d) return errno == ENOENT;
  struct dirent *ent;
  while ((ent = readdir(d)) != NULL) {
    if (strcmp(ent->d_name, ".") == 0 || strcmp(ent->d_name, "..") == 0) continue;
    struct stat sb;
    if (fstatat(dirfd(d), ent->d_name, &sb, AT_SYMLINK_NOFOLLOW) != 0) continue;
    if (S_ISREG(sb.st_mode) || S_ISLNK(sb.st_mode)) unlinkat(dirfd(d), ent->d_name, 0);
  }
  closedir(d);
  return rmdir(path) == 0;
}
