/* moert.h — the public API of libmoert, the runtime that moec-built binaries
 * link. A generated driver holds its model as static data (model.h) and calls
 * moert_main; everything else (flags, backends, the training loop, metrics,
 * checkpoints) lives here. */
#ifndef MOERT_H
#define MOERT_H

#include "model.h"

/* Runs the model with the binary's command line (--help lists the flags).
 * Returns the process exit status: 0 success, 1 a failure at run time (with
 * a message on stderr), 2 a usage error. */
int moert_main(const moert_model *model, int argc, char **argv);

#endif
