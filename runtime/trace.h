/* trace.h — Chrome trace events (chrome://tracing, Perfetto) of a run: every
 * layer's forward and backward and the phases of every MoE layer (gate,
 * dispatch, each chunk's all-to-all while in flight, each chunk's experts,
 * combine), on every rank: pid = rank, tid = what ran (0 compute, 1 token
 * all-to-all, 2 parameter gathers), so overlap is visible. Times are the
 * host's monotonic clock in microseconds (on a device backend, after the
 * work is known done). Events are kept in memory, reserved up front, and
 * written by rank 0 at the end. */
#ifndef MOERT_TRACE_H
#define MOERT_TRACE_H

#include <stdbool.h>
#include <stdint.h>

#include "comm.h"
#include "status.h"

enum { MOERT_TID_COMPUTE = 0, MOERT_TID_A2A = 1, MOERT_TID_GATHER = 2 };

typedef struct moert_trace moert_trace;

/* Starts a trace to be written to path at the end. max_events bounds memory
 * (events past it are counted and dropped). */
bool moert_trace_create(const char *path, int64_t max_events, moert_trace **out, moert_status *st);
/* Microseconds on the trace's clock. */
double moert_trace_now(void);
/* One complete event [t0, t1) named name (copied, up to 47 bytes) of category
 * cat (a string literal), on thread tid, with the step it belongs to. */
void moert_trace_span(moert_trace *t, const char *name, const char *cat, int tid, double t0, double t1,
                      int64_t step);
/* Gathers every rank's events to rank 0, which writes the file atomically
 * (tmp + rename). Collective. Frees nothing; destroy does. */
bool moert_trace_write(moert_trace *t, moert_comm *c, moert_status *st);
void moert_trace_destroy(moert_trace *t);

#endif
