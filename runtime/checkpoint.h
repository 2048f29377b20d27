/* checkpoint.h — checkpoint files: safetensors, and atomic, verified checkpoint
 * directories (docs/DESIGN.md, "Checkpoints": no checkpoint on disk is ever left
 * half written). Everything reports failure through moert_status; nothing exits
 * or prints. The code: ckpt_safetensors.c, ckpt_manifest.c, ckpt_dir.c, with
 * ckpt_json.c and ckpt_file.c beneath them (ckpt_impl.h says what each holds);
 * JSON is read with jansson, files are hashed with libxxhash.
 *
 * A checkpoint is a directory DIR holding data files (safetensors or raw bytes) and
 * DIR/MANIFEST.json, which lists every file with its size and xxh64 (XXH64, seed 0,
 * as 16 lowercase hex digits), the training step and the caller's key/value metadata,
 * in this layout (one line per file), ended by the xxh64 of every byte before its
 * last member:
 *   {
 *     "format": "moec-checkpoint",
 *     "version": 2,
 *     "step": 100,
 *     "metadata": {
 *       "spec": "tiny.moe"
 *     },
 *     "files": [
 *       {"name": "model.safetensors", "size": 4096, "xxh64": "0123456789abcdef"}
 *     ],
 *     "manifest_xxh64": "fedcba9876543210"
 *   }
 * A directory verifies only if its manifest parses, its own hash matches (an edited
 * step, metadata value or file entry is refused) and every listed file exists with
 * the listed size and hash. Version 1, written before, has no hash of its own and is
 * still read.
 *
 * How a checkpoint is written, so that a crash at any point leaves either the old
 * checkpoint or the new one, never a mix and never a directory that verifies with
 * half-written files:
 *   1. writer_create: recover DIR (below); if DIR exists and does not verify, refuse
 *      unless the caller passed MOERT_CKPT_OVERWRITE_INVALID; remove stale siblings
 *      DIR.tmp-* left by writers that died (only those holding the marker file
 *      .moec-tmp); make a fresh sibling DIR.tmp-XXXXXX with that marker in it.
 *   2. add_file / add_safetensors: each file is written as NAME.tmp in the fresh
 *      directory, fsynced, renamed to NAME, and the directory fsynced.
 *   3. commit: MANIFEST.json is written last, the same atomic way. Then, if DIR
 *      exists, a marker file .moec-replaces naming DIR.moec-old-XXXXXX goes into
 *      the fresh directory (fsynced), DIR is renamed to DIR.moec-old-XXXXXX;
 *      DIR.tmp-XXXXXX is renamed to DIR, the parent fsynced, DIR.moec-old-XXXXXX
 *      removed (its regular files, then the directory), the marker unlinked.
 *      (rename(2) cannot replace a non-empty directory, hence the two renames.)
 * Recovery (moert_ckpt_recover; run by verify, by the reader and by the writer)
 * touches only a directory that a marker written by moec names, never a
 * user's DIR.old or anything else beside DIR:
 *   - DIR missing, and a DIR.tmp-X whose marker names an existing
 *     DIR.moec-old-X: a crash between the two renames; that previous checkpoint
 *     is renamed back to DIR.
 *   - DIR present, its marker naming an existing DIR.moec-old-X: a crash before
 *     the old one was removed; it is removed if DIR verifies, else both are left
 *     for a person to look at.
 *   - DIR.tmp-* are never read; only a writer removes them (a reader might otherwise
 *     remove the directory of a writer at work).
 * One writer per DIR at a time. A reader that runs during a writer's commit may make
 * that commit fail (cleanly: the old checkpoint stays), never corrupt it.
 *
 * safetensors (the format of Hugging Face's `safetensors`): an 8-byte little-endian
 * header length N, N bytes of JSON header
 *   {"__metadata__":{"format":"pt",...},"NAME":{"dtype":"F32","shape":[2,3],
 *    "data_offsets":[BEGIN,END]},...}
 * padded with spaces to a multiple of 8, then the tensor bytes (little-endian),
 * packed without gaps; offsets are relative to the end of the header. The reader
 * validates hostile input fully and says what is wrong and where. */
#ifndef MOERT_CHECKPOINT_H
#define MOERT_CHECKPOINT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "status.h"

/* ---- safetensors ---- */

/* Limits. A header larger than this is refused as absurd (the same limit as the
 * reference implementation's MAX_HEADER_SIZE). */
#define MOERT_ST_MAX_HEADER 100000000u
/* Dimensions of one tensor (moec's tensors have at most 4). */
#define MOERT_ST_MAX_DIMS 8

typedef enum moert_st_dtype {
  MOERT_ST_F64,
  MOERT_ST_F32,
  MOERT_ST_F16,
  MOERT_ST_BF16,
  MOERT_ST_I64,
  MOERT_ST_I32,
  MOERT_ST_I16,
  MOERT_ST_I8,
  MOERT_ST_U64,
  MOERT_ST_U32,
  MOERT_ST_U16,
  MOERT_ST_U8,
  MOERT_ST_BOOL,
  MOERT_ST_NDTYPES
} moert_st_dtype;

/* "F32", "BF16", ...; "?" for a value out of range. */
const char *moert_st_dtype_name(moert_st_dtype dt);
/* Bytes per element; 0 for a value out of range. */
size_t moert_st_dtype_size(moert_st_dtype dt);

/* One tensor. For writing, the caller fills it and owns every pointer. For reading,
 * every pointer points into the moert_st_file it came from and lives as long as it;
 * data may be unaligned (copy it out with memcpy). */
typedef struct moert_st_tensor {
  const char *name; /* non-empty UTF-8, unique in the file, not "__metadata__" */
  moert_st_dtype dtype;
  int ndim;                         /* 0 (a scalar) to MOERT_ST_MAX_DIMS */
  int64_t shape[MOERT_ST_MAX_DIMS]; /* each >= 0 */
  const void *data;                 /* little-endian elements, row-major */
  size_t nbytes;                    /* product(shape) * dtype size */
} moert_st_tensor;

/* A key/value string pair (safetensors' __metadata__, the manifest's metadata). */
typedef struct moert_kv {
  const char *key;
  const char *value;
} moert_kv;

/* Serializes tensors[0..n) in that order, with metadata {"format":"pt"} plus
 * meta[0..nmeta) (a "format" key there replaces "pt"), into a malloc'd buffer the
 * caller frees. Fails on an invalid tensor (name, dtype, shape, nbytes) or a
 * duplicate name or key. */
bool moert_st_serialize(const moert_st_tensor *tensors, int n, const moert_kv *meta, int nmeta,
                        void **out, size_t *out_len, moert_status *st);

/* A parsed, validated safetensors file. */
typedef struct moert_st_file moert_st_file;

/* Parses and validates a copy of buf[0..len). `origin` names the bytes in messages
 * (a path; NULL for "safetensors data"). On success *out is a new file to destroy. */
bool moert_st_create(const void *buf, size_t len, const char *origin, moert_st_file **out,
                     moert_status *st);
/* Reads the file at path and parses it as moert_st_create does. */
bool moert_st_create_from_path(const char *path, moert_st_file **out, moert_status *st);
void moert_st_destroy(moert_st_file *f);

/* Tensors in the order of their data (increasing offsets). */
int moert_st_count(const moert_st_file *f);
const moert_st_tensor *moert_st_tensor_at(const moert_st_file *f, int i);
/* The tensor called name, or NULL. */
const moert_st_tensor *moert_st_find(const moert_st_file *f, const char *name);
/* __metadata__ entries, in file order; and the value for key, or NULL. */
int moert_st_meta_count(const moert_st_file *f);
moert_kv moert_st_meta_at(const moert_st_file *f, int i);
const char *moert_st_meta_get(const moert_st_file *f, const char *key);

/* ---- atomic files and checkpoint directories ---- */

/* Writes data[0..len) to dir/name atomically: dir/name.tmp, fsync, rename over
 * dir/name, fsync dir. name is a plain file name (letters, digits, '.', '_', '-';
 * not starting with '.'). A crash leaves dir/name either old or new, never partial. */
bool moert_ckpt_write_file(const char *dir, const char *name, const void *data, size_t len,
                           moert_status *st);

/* A process's hold on checkpoint directory dir, so that one run at a time
 * writes it (two would break each other's temporary directories). */
typedef struct moert_ckpt_lock moert_ckpt_lock;

/* Checks that dir can be written (its parent exists, is a directory and is
 * writable), then takes an exclusive flock(2) on DIR.moec-lock beside it
 * (created if missing; it holds the holder's pid). Fails at once, with a
 * message naming the holder's pid, while another process holds it. A lock file
 * that nobody holds (its process died) is taken over. Release it with
 * moert_ckpt_lock_destroy (which removes the file); exiting releases it too. */
bool moert_ckpt_lock_create(const char *dir, moert_ckpt_lock **out, moert_status *st);
/* Releases and frees l; NULL is ignored. */
void moert_ckpt_lock_destroy(moert_ckpt_lock *l);

/* Finishes an interrupted commit of dir, as described at the top of this file. */
bool moert_ckpt_recover(const char *dir, moert_status *st);

/* Recovers dir, then checks that dir/MANIFEST.json parses and that every file it
 * lists exists with the listed size and xxh64. Fails with a message that names the
 * file and what is wrong. */
bool moert_ckpt_verify(const char *dir, moert_status *st);

/* Writing a checkpoint: create, add files, commit, destroy. */
typedef struct moert_ckpt_writer moert_ckpt_writer;

enum {
  /* Replace dir even when it exists and is not a valid checkpoint (its regular files
   * are deleted). Without it, writer_create refuses such a dir. */
  MOERT_CKPT_OVERWRITE_INVALID = 1 << 0,
};

/* Starts a checkpoint to be committed at dir (whose parent must exist). Nothing
 * at dir changes until commit. */
bool moert_ckpt_writer_create(const char *dir, unsigned flags, moert_ckpt_writer **out,
                              moert_status *st);
/* Adds a file of raw bytes (a plain file name as for moert_ckpt_write_file, not
 * MANIFEST.json, each name once). */
bool moert_ckpt_add_file(moert_ckpt_writer *w, const char *name, const void *data, size_t len,
                         moert_status *st);
/* Adds a safetensors file of tensors[0..n) with metadata meta[0..nmeta), streamed to
 * disk (no copy of the tensor data is made). */
bool moert_ckpt_add_safetensors(moert_ckpt_writer *w, const char *name,
                                const moert_st_tensor *tensors, int n, const moert_kv *meta,
                                int nmeta, moert_status *st);
/* Writes the manifest (step, meta[0..nmeta) with unique keys) and swaps the new
 * checkpoint in place of dir. After a failure the old checkpoint (if any) is still
 * at dir; call destroy either way. */
bool moert_ckpt_commit(moert_ckpt_writer *w, int64_t step, const moert_kv *meta, int nmeta,
                       moert_status *st);
/* Frees the writer; if it was not committed, removes its temporary directory. */
void moert_ckpt_writer_destroy(moert_ckpt_writer *w);

/* Reading a checkpoint: create (recovers and verifies), read files, destroy. */
typedef struct moert_ckpt_reader moert_ckpt_reader;

bool moert_ckpt_reader_create(const char *dir, moert_ckpt_reader **out, moert_status *st);
void moert_ckpt_reader_destroy(moert_ckpt_reader *r);
int64_t moert_ckpt_step(const moert_ckpt_reader *r);
/* Manifest metadata value for key, or NULL. */
const char *moert_ckpt_meta_get(const moert_ckpt_reader *r, const char *key);
int moert_ckpt_meta_count(const moert_ckpt_reader *r);
moert_kv moert_ckpt_meta_at(const moert_ckpt_reader *r, int i);
/* Files listed in the manifest, in its order. */
int moert_ckpt_file_count(const moert_ckpt_reader *r);
const char *moert_ckpt_file_name(const moert_ckpt_reader *r, int i);
/* Reads a listed file into a malloc'd buffer (*data; free() it), checking size and
 * xxh64 of the bytes read against the manifest. */
bool moert_ckpt_read_file(const moert_ckpt_reader *r, const char *name, void **data, size_t *len,
                          moert_status *st);
/* Reads a listed file as read_file does and parses it as safetensors. */
bool moert_ckpt_read_safetensors(const moert_ckpt_reader *r, const char *name, moert_st_file **out,
                                 moert_status *st);

#endif
