/* ckpt_io.h — a model's checkpoint: weights in DIR/model.safetensors under
 * their global names and shapes (what PyTorch's safetensors loader reads),
 * AdamW state in DIR/optimizer.safetensors (NAME.exp_avg, NAME.exp_avg_sq),
 * the step and the model's identity in the manifest (checkpoint.h: atomic,
 * hashed, never half written). */
#ifndef MOERT_CKPT_IO_H
#define MOERT_CKPT_IO_H

#include <stdbool.h>
#include <stdint.h>

#include "exec.h"

/* Before a run: when resume, dir must hold a valid checkpoint of this model
 * (its step in *step); otherwise, if dir exists, it must be a valid
 * checkpoint (never something else), and it is refused unless overwrite (the
 * run would replace it). */
bool moert_ckpt_check(const char *dir, const moert_model *m, bool resume, bool overwrite,
                      int64_t *step, moert_status *st);
/* Saves the executor's parameters and optimizer state at step. */
bool moert_ckpt_save(const char *dir, moert_exec *e, int64_t step, moert_status *st);
/* Loads them back; *step receives the checkpoint's step. A checkpoint of
 * another optimizer loads its weights: *note then says what became of the
 * optimizer state (AdamW's moments dropped by SGD, or started from zero by
 * AdamW), else it is NULL. */
bool moert_ckpt_load(const char *dir, moert_exec *e, int64_t *step, const char **note, moert_status *st);

#endif
