/* ckpt_impl.h — what the pieces of the checkpoint module share; checkpoint.h is
 * its API, this is not for the runtime's other modules. The pieces, one concern
 * each:
 *   ckpt_json.c         JSON text out (moec's exact layout) and in (jansson, with
 *                       moec's messages), and the small text helpers of messages
 *   ckpt_file.c         files: atomic writes hashed with xxh64 (libxxhash), whole
 *                       reads, directory syncs and removal
 *   ckpt_safetensors.c  the safetensors format: writer, and the validating reader
 *   ckpt_manifest.c     MANIFEST.json: its text, its reading, checking a file
 *   ckpt_dir.c          checkpoint directories: recovery, verify, writer, reader */
#ifndef MOERT_CKPT_IMPL_H
#define MOERT_CKPT_IMPL_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "checkpoint.h"

/* ---- ckpt_json.c ---- */

/* A growing NUL-terminated string. A failed allocation sets oom; appends after it
 * do nothing, so a writer checks oom once at the end. Free p. */
typedef struct moert_sbuf {
  char *p;
  size_t len, cap;
  bool oom;
} moert_sbuf;

void moert_sb_putn(moert_sbuf *b, const char *s, size_t n);
void moert_sb_puts(moert_sbuf *b, const char *s);
/* For short formatted pieces (numbers): at most 127 bytes at a time. */
void moert_sb_printf(moert_sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends s as a JSON string: `"` and `\` escaped with a backslash, bytes below 0x20
 * as \u00xx, everything else as it is. This exact form is part of the on-disk format
 * (the bytes, hence the hashes, of every file written so far). */
void moert_sb_json_str(moert_sbuf *b, const char *s);

/* True if s is valid UTF-8 (no surrogates, nothing above U+10FFFF, no overlong forms). */
bool moert_ckpt_utf8_valid(const char *s);

/* A name for a message: control bytes escaped as \xNN, cut to about 60 bytes at a
 * character boundary, "..." where cut. */
typedef struct moert_ckpt_shown {
  char s[96];
} moert_ckpt_shown;
moert_ckpt_shown moert_ckpt_show(const char *name);

/* A name that occurs twice among names[0..n), or NULL; sorts the array. */
const char *moert_ckpt_find_duplicate(const char **names, int n);

/* A key that appears twice in one object of a JSON text (jansson refuses the text;
 * the caller says what the key means there). */
typedef struct moert_json_dup {
  int depth;     /* objects and arrays around the key: 1 in the top-level object */
  json_t *outer; /* depth > 1: the key (a JSON string) of the top-level member that holds it */
  json_t *key;   /* the duplicate key, decoded (a JSON string) */
  size_t at;     /* byte offset of the second occurrence in the text */
} moert_json_dup;

/* Parses text[0..len) as one JSON value of any type with jansson, refusing
 * duplicate keys and \u0000 in strings. Returns a new reference, or NULL:
 *   - bad JSON: records "WHAT is not valid JSON: WHY at byte N" (N counted from the
 *     start of text) and returns NULL;
 *   - a duplicate key: with dup, fills it (release it with moert_json_dup_clear)
 *     and returns NULL with st untouched; without, records a generic message. */
json_t *moert_ckpt_json_load(const void *text, size_t len, const char *what, moert_json_dup *dup,
                             moert_status *st);
void moert_json_dup_clear(moert_json_dup *d);
/* The decoded text of a moert_json_dup key ("" for NULL). */
const char *moert_json_dup_text(const json_t *s);

/* What v is, for "must be X, found Y": "an object", "a string", "a number", ... */
const char *moert_ckpt_json_kind(const json_t *v);
/* A number value as text for messages ("-3", "2.5"); other values give their kind. */
void moert_ckpt_json_num(const json_t *v, char *buf, size_t cap);

/* ---- ckpt_file.c ---- */

/* Limit on a checkpoint file name's length (NAME_MAX of common file systems). */
#define MOERT_CKPT_NAME_MAX 255

/* A plain file name: letters, digits, '.', '_', '-', not starting with '.',
 * at most MOERT_CKPT_NAME_MAX bytes. */
bool moert_ckpt_valid_name(const char *name);
/* "a/b" (malloc'd; NULL when out of memory). */
char *moert_ckpt_path_join(const char *a, const char *b);
/* a followed by b (malloc'd; NULL when out of memory). */
char *moert_ckpt_str_cat(const char *a, const char *b);
void moert_ckpt_store_le64(unsigned char *p, uint64_t v);
uint64_t moert_ckpt_load_le64(const unsigned char *p);

/* One piece of a file written from several buffers. */
typedef struct moert_ckpt_part {
  const void *p;
  size_t n;
} moert_ckpt_part;

/* Writes parts[0..nparts) to dir/name atomically (dir/name.tmp, fsync, rename over
 * dir/name, fsync dir); size and hash (each may be NULL) receive the bytes written
 * and their xxh64 (seed 0). Fails for a name that moert_ckpt_valid_name refuses. */
bool moert_ckpt_atomic_write(const char *dir, const char *name, const moert_ckpt_part *parts,
                             int nparts, uint64_t *size, uint64_t *hash, moert_status *st);
/* fsync of a directory, so a rename or a new entry in it is durable (EINVAL and
 * ENOTSUP, file systems that cannot, are no failure). */
bool moert_ckpt_fsync_dir(const char *dir, moert_status *st);
/* Opens a regular file for reading, its size in *size. On failure returns -1 with
 * *err = errno, or EISDIR for anything that is not a regular file. */
int moert_ckpt_open_regular(const char *path, uint64_t *size, int *err);
/* Reads until n bytes or the end of the file; *got receives the count. */
bool moert_ckpt_read_exact(int fd, void *buf, size_t n, size_t *got, const char *path,
                           moert_status *st);
/* xxh64 (seed 0) and byte count of what remains of fd, read in chunks. */
bool moert_ckpt_hash_fd(int fd, const char *path, uint64_t *total, uint64_t *hash,
                        moert_status *st);
/* Reads a whole regular file of at most max bytes into a malloc'd buffer (one byte
 * more is allocated, so the caller may NUL-terminate it). */
bool moert_ckpt_read_whole(const char *path, uint64_t max, unsigned char **out, size_t *len,
                           moert_status *st);
/* Removes a directory's regular files and symbolic links, then the directory; a path
 * that is itself a symbolic link is unlinked, not followed. Subdirectories are never
 * entered: a directory holding one stays (returns false). True if path is gone. */
bool moert_ckpt_remove_flat_dir(const char *path);

/* ---- ckpt_safetensors.c ---- */

/* Validates tensors[0..n) and meta[0..nmeta) for writing (as moert_st_serialize
 * does) and appends the header JSON, padded with spaces to a multiple of 8, to hdr. */
bool moert_st_header(const moert_st_tensor *t, int n, const moert_kv *meta, int nmeta,
                     moert_sbuf *hdr, moert_status *st);
/* moert_st_create on a malloc'd buffer whose ownership passes to the file (freed on
 * failure too). */
bool moert_st_create_owned(unsigned char *buf, size_t len, const char *origin, moert_st_file **out,
                           moert_status *st);

/* ---- ckpt_manifest.c ---- */

#define MOERT_CKPT_MANIFEST "MANIFEST.json"

/* One file listed in a manifest. */
typedef struct moert_ckpt_mfile {
  const char *name;
  uint64_t size, hash; /* bytes and xxh64 (seed 0) */
} moert_ckpt_mfile;

/* A parsed MANIFEST.json. Names, keys and values point into root. */
typedef struct moert_ckpt_manifest {
  json_t *root;
  int64_t step;
  moert_kv *meta; /* in file order */
  int nmeta;
  moert_ckpt_mfile *files; /* in file order */
  int nfiles;
} moert_ckpt_manifest;

/* Reads and validates dir/MANIFEST.json (a missing one gets its own message). On
 * success m is filled; release it with moert_ckpt_manifest_free. */
bool moert_ckpt_manifest_load(const char *dir, moert_ckpt_manifest *m, moert_status *st);
void moert_ckpt_manifest_free(moert_ckpt_manifest *m);
/* Appends the text of a manifest to out (a layout of its own: one line per file,
 * which tools grep; checkpoint.h shows it). The caller checks out->oom. */
void moert_ckpt_manifest_format(int64_t step, const moert_kv *meta, int nmeta,
                                const moert_ckpt_mfile *files, int nfiles, moert_sbuf *out);
/* Checks that dir/f->name exists with the listed size and xxh64. */
bool moert_ckpt_manifest_check_file(const char *dir, const moert_ckpt_mfile *f, moert_status *st);

#endif
