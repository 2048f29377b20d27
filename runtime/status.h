/* status.h — how runtime code reports failure (nccl-tests' TESTCHECK, ggml's
 * CUDA_CHECK_GEN). Library code never exits: it records what failed, where,
 * and returns false; each caller that passes the failure up adds a trace line.
 * Only main()s print the status and exit. */
#ifndef MOERT_STATUS_H
#define MOERT_STATUS_H

#include <stdbool.h>
#include <string.h> /* strcspn, for MOERT_CHECK_GEN */

typedef struct moert_status {
  bool failed;
  char msg[1024];   /* what went wrong and what to do, for the user */
  char trace[1024]; /* file:line of each frame that passed it up */
} moert_status;

/* Records a failure (first one wins) and returns false. */
bool moert_fail_at(moert_status *st, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Appends "file:line" to the trace; returns false (for `return MOERT_UP(st)`). */
bool moert_trace_at(moert_status *st, const char *file, int line);

#define MOERT_FAIL(st, ...) moert_fail_at((st), __FILE__, __LINE__, __VA_ARGS__)
#define MOERT_UP(st) moert_trace_at((st), __FILE__, __LINE__)
/* Evaluates a bool call; on failure adds a trace line and returns false. */
#define MOERT_TRY(st, call)                                                  \
  do {                                                                       \
    if (!(call)) return moert_trace_at((st), __FILE__, __LINE__);            \
  } while (0)

/* The one generator of error checks for foreign result codes (ggml's
 * CUDA_CHECK_GEN): defines `static bool name(type code, const char *call,
 * const char *file, int line, moert_status *st)`, true when code is
 * `success`, else it records "<function> failed: <strerr(code)>" (the name of
 * the function called, from the text of the call) at file:line and
 * is false. Each library wraps it in its macros, e.g. comm_mpi.c's
 *   MOERT_CHECK_GEN(mpi_check, int, MPI_SUCCESS, mpi_strerror)
 *   #define MPIOK(st, call) mpi_check((call), #call, __FILE__, __LINE__, (st))
 *   #define MPICHECK(st, call) do { if (!MPIOK(st, call)) return false; } while (0) */
#define MOERT_CHECK_GEN(name, type, success, strerr) static MOERT_CHECK_FN(name, type, success, strerr)
/* The same function with external linkage, for a check that several files
 * share (cuda_lib.c's, declared in cuda_lib.h). */
#define MOERT_CHECK_FN(name, type, success, strerr)                                    \
  bool name(type code, const char *call, const char *file, int line,                   \
            moert_status *st) {                                                        \
    if (code == (success)) return true;                                                \
    return moert_fail_at(st, file, line, "%.*s failed: %s", (int)strcspn(call, "("),  \
                         call, strerr(code));                                          \
  }

#endif
