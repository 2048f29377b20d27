/* run.h — a run of a moec-built model: the training (or inference) loop that
 * the binaries' command line (driver.c's moert_main) drives, callable without
 * it (tests, other front ends). A run sets up the comm (mpi under mpirun,
 * nccl where every rank has a GPU), the backend, the plan, the data and the
 * executor, resumes from a checkpoint when asked, runs its steps with the
 * variant selector, evaluates, saves checkpoints, writes the table and the
 * metrics file, and tears everything down. */
#ifndef MOERT_RUN_H
#define MOERT_RUN_H

#include <stdbool.h>
#include <stdint.h>

#include "exec.h"
#include "model.h"

/* Called after every step with its statistics and held-out loss (NaN where
 * none was taken). */
typedef void (*moert_step_hook)(void *ctx, int64_t step, const moert_step_stats *s, double eval_loss);

/* What a training run does at a step whose loss or global gradient norm is
 * not finite (--on-nan). Either way that step's update is not applied. */
typedef enum moert_on_nan {
  MOERT_ON_NAN_STOP, /* end the run (status 1) after that step's metrics line; no checkpoint of it */
  MOERT_ON_NAN_SKIP, /* go on from the weights before it; the metrics count the skipped steps */
} moert_on_nan;

/* What a run does; the binaries' flags (docs/RUNNING.md) set these. */
typedef struct moert_run_opts {
  int64_t steps;       /* the last step (with resume: the total) */
  int64_t seed, log_every, tokens, eval_every, ckpt_every;
  int64_t generate;    /* bytes of text to sample after training (byte models) */
  const char *backend; /* "cpu", "cuda"; NULL: cuda where a GPU is found */
  const char *comm;    /* "nccl", "mpi", "self"; NULL: as docs/RUNNING.md says */
  const char *metrics, *data, *checkpoint, *prompt, *trace, *kernel_cache;
  const char *routing_trace; /* JSON lines of each MoE layer's routing per step (rank 0 writes); NULL: none */
  bool no_kernel_cache, resume;
  bool overwrite;      /* replace a valid checkpoint in checkpoint without resuming it */
  bool quiet;          /* print only errors */
  moert_on_nan on_nan; /* default stop */
  double timeout;      /* seconds one wait for a collective may last (comm.h's watchdog); 0: no limit */
  const char *const *variants; /* --variant values */
  int nvariants;
  moert_step_hook on_step;     /* NULL: none */
  void *on_step_ctx;
} moert_run_opts;

/* --timeout's default: ten minutes, longer than any healthy collective wait
 * (a first step's NVRTC compile on a peer, a checkpoint written by rank 0). */
#define MOERT_DEFAULT_TIMEOUT_S 600

/* The options of a run as the spec sets them (its train block, its tokens). */
void moert_run_defaults(const moert_model *m, moert_run_opts *o);

/* Runs model m as o says. argc and argv are main's (MPI_Init may read and
 * change them). Returns the exit status: 0, 1 after a failure (said on
 * stderr, prefixed by argv0; under mpirun every rank stops), 2 for a bad
 * setting in the environment, 128 + the signal after SIGTERM or SIGINT
 * stopped it (every rank after the same step, a checkpoint saved there when
 * one is configured, a line on rank 0's stdout; its handlers are caught only
 * during the steps and put back after). The options are checked by the caller
 * (driver.c says which combinations are usage errors). */
int moert_run(const moert_model *m, const moert_run_opts *o, int *argc, char ***argv, const char *argv0);

#endif
