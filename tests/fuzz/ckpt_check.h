/* ckpt_check.h — the property the checkpoint reader's fuzzers check, written
 * once for the deterministic mutation loop (mutate_ckpt.c, the CTest
 * fuzz.checkpoint) and the libFuzzer target (fuzz_ckpt.c).
 *
 * An input is one mode byte and a payload:
 *   'S'  the payload is a safetensors file, parsed in memory (moert_st_create);
 *   'M'  the payload is MANIFEST.json, read from a checkpoint directory that
 *        also holds the data files of moec_ckpt_fuzz_data (the reader, then
 *        every listed file through it);
 *   'D'  the payload is model.safetensors, written into a checkpoint directory
 *        with a manifest that lists it under its true size and xxh64, so the
 *        bytes get past the hashes to the reader's safetensors parser.
 * Any other mode byte is read as 'S'. Whatever the bytes: the reader accepts
 * them (and every tensor's and file's bytes are read, so ASan sees any
 * overread) or rejects them with a message (printable text, no control
 * bytes); never a crash, an abort or a leak (under the sanitizers). A
 * violation prints the input's mode and the message and aborts. */
#ifndef MOEC_CKPT_CHECK_H
#define MOEC_CKPT_CHECK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Makes the scratch directory (a fresh mkdtemp under dir, or under $TMPDIR
 * or /tmp when dir is NULL) and the data files. False, with a message on
 * stderr, when it cannot. */
bool moec_ckpt_fuzz_init(const char *dir);
/* The data files an 'M' input's manifest is read beside: model.safetensors
 * and opt.bin, as bytes (owned by the checker). */
void moec_ckpt_fuzz_data(const unsigned char **model, size_t *model_len, const unsigned char **opt,
                         size_t *opt_len);
/* Runs one input: 1 when the reader accepted it, 0 when it was rejected with
 * a message; aborts on a violated property. */
int moec_ckpt_fuzz_one(const uint8_t *data, size_t size);
/* The last rejection's message ("" after an acceptance). */
const char *moec_ckpt_fuzz_message(void);
/* The scratch directory (for a caller's own files; empty them before cleanup). */
const char *moec_ckpt_fuzz_scratch(void);
/* Removes the scratch directory and frees the data files. */
void moec_ckpt_fuzz_cleanup(void);

#endif
