/* calibrate.h — `./model --calibrate FILE`: measures, on the backend the
 * binary runs on (cpu or cuda), what the cost model (cost.h) needs of the
 * device: the expert path's GEMM throughput at the model's shapes over a
 * few token counts, the bandwidth of the gate, dispatch, combine,
 * activation and copy kernels, the fixed cost of one op; and, under mpirun
 * with several ranks on one node, the all-to-all's alpha and beta. Rank 0
 * writes the calibration JSON (docs/PLAN.md, "Calibration"). */
#ifndef MOERT_CALIBRATE_H
#define MOERT_CALIBRATE_H

#include "model.h"
#include "run.h"

/* Measures as above with the run's backend and comm choices (o->backend,
 * o->comm, o->tokens, the kernel cache) and writes path atomically.
 * Returns the exit status (0; 1 after a failure, said on stderr). */
int moert_calibrate(const moert_model *m, const moert_run_opts *o, const char *path, int *argc, char ***argv,
                    const char *argv0);

#endif
