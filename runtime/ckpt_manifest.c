/* ckpt_manifest.c — MANIFEST.json, the last file of a checkpoint (checkpoint.h
 * shows it): its text, written in a fixed layout (one line per file: tools and
 * tests read it with grep and sed) and ended by the xxh64 of every byte before
 * that last member, so that an edited step, metadata or file list is found;
 * its reading, through jansson, with every field checked and unknown ones
 * skipped (a later version may add some), version 1 (no hash of its own) still
 * read; and the check of one listed file against its size and xxh64. */
#define _POSIX_C_SOURCE 200809L
#include "ckpt_impl.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

/* Limit on MANIFEST.json (a few bytes per file; this is far beyond any checkpoint). */
#define MANIFEST_MAX_BYTES (64u << 20)

/* The version written: 2 ends with the manifest's own hash (SELF_KEY); 1,
 * read still, has none. */
#define MANIFEST_VERSION 2
/* The last member of a version-2 manifest, whose value is the xxh64 (seed 0)
 * of every byte of the file before it: the file ends with SELF_HEAD, 16 hex
 * digits, SELF_END. */
#define SELF_KEY "manifest_xxh64"
#define SELF_HEAD ",\n  \"" SELF_KEY "\": \""
#define SELF_END "\"\n}\n"
#define SELF_TAIL_LEN (sizeof SELF_HEAD - 1 + 16 + sizeof SELF_END - 1)

void moert_ckpt_manifest_format(int64_t step, const moert_kv *meta, int nmeta,
                                const moert_ckpt_mfile *files, int nfiles, moert_sbuf *m) {
  size_t start = m->len;
  moert_sb_printf(
      m, "{\n  \"format\": \"moec-checkpoint\",\n  \"version\": %d,\n  \"step\": %" PRId64 ",\n",
      MANIFEST_VERSION, step);
  moert_sb_puts(m, "  \"metadata\": {");
  for (int i = 0; i < nmeta; i++) {
    moert_sb_puts(m, i ? ",\n    " : "\n    ");
    moert_sb_json_str(m, meta[i].key);
    moert_sb_puts(m, ": ");
    moert_sb_json_str(m, meta[i].value);
  }
  moert_sb_puts(m, nmeta ? "\n  },\n  \"files\": [" : "},\n  \"files\": [");
  for (int i = 0; i < nfiles; i++) {
    moert_sb_puts(m, i ? ",\n    {\"name\": " : "\n    {\"name\": ");
    moert_sb_json_str(m, files[i].name);
    moert_sb_printf(m, ", \"size\": %" PRIu64 ", \"xxh64\": \"%016" PRIx64 "\"}", files[i].size,
                    files[i].hash);
  }
  moert_sb_puts(m, nfiles ? "\n  ]" : "]");
  if (m->oom) return;
  moert_sb_printf(m, SELF_HEAD "%016" PRIx64 SELF_END, (uint64_t)XXH64(m->p + start, m->len - start, 0));
}

void moert_ckpt_manifest_free(moert_ckpt_manifest *m) {
  json_decref(m->root);
  free(m->meta);
  free(m->files);
  memset(m, 0, sizeof *m);
}

static bool parse_hex64(const char *s, uint64_t *out) {
  if (strlen(s) != 16) return false;
  uint64_t v = 0;
  for (int i = 0; i < 16; i++) {
    char c = s[i];
    int h = c >= '0' && c <= '9'   ? c - '0'
            : c >= 'a' && c <= 'f' ? c - 'a' + 10
            : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                   : -1;
    if (h < 0) return false;
    v = v << 4 | (uint64_t)h;
  }
  *out = v;
  return true;
}

/* An integer field (non-negative unless allow_negative). */
static bool m_int(const json_t *v, const char *path, const char *field, bool allow_negative,
                  int64_t *out, moert_status *st) {
  if (!json_is_number(v))
    return MOERT_FAIL(st, "%s: `%s` must be an integer, found %s", path, field,
                      moert_ckpt_json_kind(v));
  if (!json_is_integer(v) || (!allow_negative && json_integer_value(v) < 0)) {
    char num[64];
    moert_ckpt_json_num(v, num, sizeof num);
    return MOERT_FAIL(st, "%s: `%s` must be %s integer that fits 64 bits, found `%s`", path, field,
                      allow_negative ? "an" : "a non-negative", num);
  }
  *out = json_integer_value(v);
  return true;
}

/* Entry i of `files`. */
static bool m_file_entry(const json_t *v, int i, const char *path, moert_ckpt_mfile *f,
                         moert_status *st) {
  if (!json_is_object(v))
    return MOERT_FAIL(st, "%s: each entry of `files` must be an object, found %s", path,
                      moert_ckpt_json_kind(v));
  bool has_name = false, has_size = false, has_hash = false;
  const char *key;
  const json_t *x;
  json_object_foreach((json_t *)v, key, x) {
    if (strcmp(key, "name") == 0) {
      has_name = true;
      if (!json_is_string(x))
        return MOERT_FAIL(st, "%s: a file's `name` must be a string, found %s", path,
                          moert_ckpt_json_kind(x));
      f->name = json_string_value(x);
      if (!moert_ckpt_valid_name(f->name) || strcmp(f->name, MOERT_CKPT_MANIFEST) == 0)
        return MOERT_FAIL(st,
                          "%s: `%s` is not a valid checkpoint file name (letters, digits, `.`, "
                          "`_`, `-`; no `/`; not MANIFEST.json)",
                          path, moert_ckpt_show(f->name).s);
    } else if (strcmp(key, "size") == 0) {
      has_size = true;
      int64_t size;
      MOERT_TRY(st, m_int(x, path, "size", false, &size, st));
      f->size = (uint64_t)size;
    } else if (strcmp(key, "xxh64") == 0) {
      has_hash = true;
      const char *hex = json_string_value(x); /* NULL for a non-string */
      if (!hex || !parse_hex64(hex, &f->hash))
        return MOERT_FAIL(
            st, "%s: a file's `xxh64` must be a string of 16 hex digits, found %s%s%s", path,
            hex ? "`" : moert_ckpt_json_kind(x), hex ? moert_ckpt_show(hex).s : "", hex ? "`" : "");
    }
  }
  if (!has_name || !has_size || !has_hash)
    return MOERT_FAIL(st, "%s: entry %d of `files` has no `%s`", path, i + 1,
                      !has_name   ? "name"
                      : !has_size ? "size"
                                  : "xxh64");
  return true;
}

/* A key twice in one object of the manifest, said for what it is there. */
static bool m_duplicate(const moert_json_dup *d, const char *path, moert_status *st) {
  moert_ckpt_shown key = moert_ckpt_show(moert_json_dup_text(d->key));
  const char *outer = moert_json_dup_text(d->outer);
  if (d->depth == 1) return MOERT_FAIL(st, "%s: `%s` appears twice", path, key.s);
  if (d->depth == 2 && strcmp(outer, "metadata") == 0)
    return MOERT_FAIL(st, "%s: the metadata key `%s` appears twice", path, key.s);
  if (d->depth == 3 && strcmp(outer, "files") == 0)
    return MOERT_FAIL(st, "%s: a file entry has `%s` twice (at byte %zu)", path, key.s, d->at);
  return MOERT_FAIL(st, "%s: the key `%s` appears twice in one object (at byte %zu)", path, key.s,
                    d->at);
}

/* The members of the manifest's top-level object, in file order. */
static bool m_members(moert_ckpt_manifest *m, const char *path, int64_t *version, bool *has_self,
                      moert_status *st) {
  bool has_format = false, has_version = false, has_step = false, has_files = false;
  const char *key;
  const json_t *v;
  json_object_foreach(m->root, key, v) {
    if (strcmp(key, "format") == 0) {
      has_format = true;
      const char *fmt = json_string_value(v);
      if (!fmt || strcmp(fmt, "moec-checkpoint") != 0)
        return MOERT_FAIL(
            st, "%s: `format` is not \"moec-checkpoint\": not a moec checkpoint manifest", path);
    } else if (strcmp(key, "version") == 0) {
      has_version = true;
      MOERT_TRY(st, m_int(v, path, "version", false, version, st));
      if (*version < 1 || *version > MANIFEST_VERSION)
        return MOERT_FAIL(st, "%s: version %" PRId64 " (this moec reads versions 1 to %d)", path, *version,
                          MANIFEST_VERSION);
    } else if (strcmp(key, SELF_KEY) == 0) {
      *has_self = true; /* its value is checked against the text (self_check) */
    } else if (strcmp(key, "step") == 0) {
      has_step = true;
      MOERT_TRY(st, m_int(v, path, "step", true, &m->step, st));
    } else if (strcmp(key, "metadata") == 0) {
      if (!json_is_object(v))
        return MOERT_FAIL(st, "%s: `metadata` must be an object of strings, found %s", path,
                          moert_ckpt_json_kind(v));
      m->meta = malloc(sizeof *m->meta * json_object_size(v) + 1);
      if (!m->meta) return MOERT_FAIL(st, "%s: out of memory", path);
      const char *k;
      const json_t *x;
      json_object_foreach((json_t *)v, k, x) {
        if (!json_is_string(x))
          return MOERT_FAIL(st, "%s: metadata value for `%s` must be a string, found %s", path,
                            moert_ckpt_show(k).s, moert_ckpt_json_kind(x));
        m->meta[m->nmeta++] = (moert_kv){k, json_string_value(x)};
      }
    } else if (strcmp(key, "files") == 0) {
      has_files = true;
      if (!json_is_array(v))
        return MOERT_FAIL(st, "%s: `files` must be an array, found %s", path,
                          moert_ckpt_json_kind(v));
      m->files = calloc(json_array_size(v) + 1, sizeof *m->files);
      if (!m->files) return MOERT_FAIL(st, "%s: out of memory", path);
      size_t i;
      const json_t *x;
      json_array_foreach(v, i, x) {
        MOERT_TRY(st, m_file_entry(x, (int)i, path, &m->files[i], st));
        m->nfiles++;
      }
    }
  }
  if (!has_format || !has_version || !has_step || !has_files)
    return MOERT_FAIL(st, "%s: no `%s`", path,
                      !has_format    ? "format"
                      : !has_version ? "version"
                      : !has_step    ? "step"
                                     : "files");
  return true;
}

/* A version-2 manifest's own hash: the text ends with SELF_HEAD, 16 hex
 * digits and SELF_END (where moec writes it), and they are the xxh64 of every
 * byte before. */
static bool self_check(const unsigned char *text, size_t len, const char *path, moert_status *st) {
  size_t head = sizeof SELF_HEAD - 1;
  const char *tail = (const char *)text + len - (len >= SELF_TAIL_LEN ? SELF_TAIL_LEN : 0);
  char hex[17];
  uint64_t listed = 0;
  if (len >= SELF_TAIL_LEN) {
    memcpy(hex, tail + head, 16);
    hex[16] = 0;
  }
  if (len < SELF_TAIL_LEN || memcmp(tail, SELF_HEAD, head) != 0 || !parse_hex64(hex, &listed) ||
      memcmp(tail + head + 16, SELF_END, sizeof SELF_END - 1) != 0)
    return MOERT_FAIL(st, "%s: `" SELF_KEY "` is not the last line, where moec writes it: the manifest was "
                      "edited after it was written; restore the checkpoint from a copy, or start over with "
                      "--overwrite", path);
  uint64_t h = XXH64(text, len - SELF_TAIL_LEN, 0);
  if (h != listed)
    return MOERT_FAIL(st, "%s is damaged: its text has xxh64 %016" PRIx64 " but its `" SELF_KEY "` says %016" PRIx64
                      " (its step, metadata or file list changed after it was written); restore the "
                      "checkpoint from a copy, or start over with --overwrite", path, h, listed);
  return true;
}

bool moert_ckpt_manifest_load(const char *dir, moert_ckpt_manifest *m, moert_status *st) {
  memset(m, 0, sizeof *m);
  char *path = moert_ckpt_path_join(dir, MOERT_CKPT_MANIFEST);
  if (!path) return MOERT_FAIL(st, "out of memory");
  struct stat sb;
  if (stat(path, &sb) != 0 && errno == ENOENT) {
    MOERT_FAIL(st,
               "checkpoint `%s` has no MANIFEST.json: it was never committed (a crash while it was "
               "written?) or it is not a moec checkpoint",
               dir);
    free(path);
    return false;
  }
  unsigned char *text = NULL;
  size_t len;
  bool ok = false;
  if (!moert_ckpt_read_whole(path, MANIFEST_MAX_BYTES, &text, &len, st)) goto done;
  moert_json_dup dup = {0};
  m->root = moert_ckpt_json_load(text, len, path, &dup, st);
  if (!m->root) {
    if (dup.key) m_duplicate(&dup, path, st);
    moert_json_dup_clear(&dup);
    goto done;
  }
  if (!json_is_object(m->root)) {
    MOERT_FAIL(st, "%s: must be a JSON object, found %s", path, moert_ckpt_json_kind(m->root));
    goto done;
  }
  int64_t version = 0;
  bool has_self = false;
  if (!m_members(m, path, &version, &has_self, st)) goto done;
  if (version >= 2 && !has_self) {
    MOERT_FAIL(st, "%s: no `" SELF_KEY "` (a version-%" PRId64 " manifest ends with its own hash): the "
               "manifest was edited after it was written; restore the checkpoint from a copy, or start over "
               "with --overwrite", path, version);
    goto done;
  }
  if (version >= 2 && !self_check(text, len, path, st)) goto done;
  const char **names = malloc(sizeof *names * (size_t)m->nfiles + 1);
  if (!names) {
    MOERT_FAIL(st, "out of memory");
    goto done;
  }
  for (int i = 0; i < m->nfiles; i++) names[i] = m->files[i].name;
  const char *dup_name = moert_ckpt_find_duplicate(names, m->nfiles);
  if (dup_name)
    MOERT_FAIL(st, "%s: the file `%s` is listed twice", path, moert_ckpt_show(dup_name).s);
  free(names);
  ok = !dup_name;
done:
  free(text);
  free(path);
  if (!ok) {
    moert_ckpt_manifest_free(m);
    return MOERT_UP(st);
  }
  return true;
}

bool moert_ckpt_manifest_check_file(const char *dir, const moert_ckpt_mfile *f, moert_status *st) {
  char *path = moert_ckpt_path_join(dir, f->name);
  if (!path) return MOERT_FAIL(st, "out of memory");
  uint64_t size;
  int err = 0;
  int fd = moert_ckpt_open_regular(path, &size, &err);
  bool ok = false;
  if (fd < 0) {
    if (err == ENOENT)
      MOERT_FAIL(st, "checkpoint `%s` is damaged: `%s` is listed in MANIFEST.json but missing", dir,
                 f->name);
    else if (err == EISDIR)
      MOERT_FAIL(st, "checkpoint `%s` is damaged: `%s` is not a regular file", dir, f->name);
    else
      MOERT_FAIL(st, "checkpoint `%s`: cannot open `%s`: %s", dir, f->name, strerror(err));
    goto out;
  }
  if (size != f->size) {
    MOERT_FAIL(st,
               "checkpoint `%s` is damaged: `%s` is %" PRIu64
               " bytes but MANIFEST.json lists %" PRIu64 " (truncated or replaced)",
               dir, f->name, size, f->size);
    close(fd);
    goto out;
  }
  uint64_t total = 0, h = 0;
  bool read_ok = moert_ckpt_hash_fd(fd, path, &total, &h, st);
  close(fd);
  if (!read_ok) goto out;
  if (total != f->size) {
    MOERT_FAIL(st, "checkpoint `%s`: `%s` changed size while it was read", dir, f->name);
    goto out;
  }
  if (h != f->hash) {
    MOERT_FAIL(st,
               "checkpoint `%s` is damaged: `%s` has xxh64 %016" PRIx64
               " but MANIFEST.json lists %016" PRIx64
               " (its bytes changed after the checkpoint was written)",
               dir, f->name, h, f->hash);
    goto out;
  }
  ok = true;
out:
  free(path);
  return ok ? true : MOERT_UP(st);
}
