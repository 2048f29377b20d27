/* trace.h — Chrome trace events (chrome://tracing, Perfetto) of a run: every
 * layer's forward and backward, the phases of every MoE layer (gate,
 * dispatch, parameter gathers, each chunk's all-to-all, each chunk's
 * experts, combine, and their backward) and the optimizer, on every rank:
 * pid = rank, tid = where it ran. On the cpu backend: 0 compute, 1 token
 * all-to-all (from its start to its wait), 2 parameter gathers; on the cuda
 * backend, a tid per stream: 0 the compute stream (the gathers included),
 * 1 the comm's stream (the nccl comm's all-to-alls; with a host comm, from
 * start to wait as on the cpu).
 *
 * A span is two timing marks of the backend (backend.h), kept until the end
 * of the step, when moert_trace_resolve turns them into times: on the cuda
 * backend CUDA events (when the stream ran the work, not when the host
 * launched it), on the cpu the host's clock. Times are microseconds from the
 * step's first mark, plus the wall clock when the host made it (the step's
 * anchor), so ranks line up to within the hosts' clock skew. Events are kept
 * in memory, reserved up front, and written by rank 0 at the end.
 *
 * With a trace, or with MOEC_NVTX=1 in the environment, the spans opened on
 * the host (layers, MoE phases, the optimizer) are NVTX ranges too, for
 * Nsight Systems (nsys profile); in a build without the NVTX3 headers they
 * are nothing. */
#ifndef MOERT_TRACE_H
#define MOERT_TRACE_H

#include <stdbool.h>
#include <stdint.h>

#include "backend.h"
#include "comm.h"
#include "status.h"

enum { MOERT_TID_COMPUTE = 0, MOERT_TID_A2A = 1, MOERT_TID_GATHER = 2 };

/* Spans a trace keeps per step until resolved: its own marks (open, close,
 * moert_trace_mark) take at most 3/4 of the backend's, the rest left for the
 * layer times the selector needs and the nccl comm's marks (two an
 * all-to-all). Spans past it are dropped and counted (the file's
 * otherData.dropped_events). */
enum { MOERT_TRACE_STEP_SPANS = MOERT_MAX_MARKS * 3 / 8 };

typedef struct moert_trace moert_trace;

/* Starts a trace to be written to path at the end. max_events bounds memory
 * (events past it are counted and dropped). */
bool moert_trace_create(const char *path, int64_t max_events, moert_trace **out, moert_status *st);
/* Microseconds on the trace's clock: the wall clock (CLOCK_REALTIME), the
 * anchor of every step. */
double moert_trace_now(void);
/* One complete event [t0, t1) (microseconds) named name (copied, up to 47
 * bytes) of category cat (a string literal), on thread tid, with the step it
 * belongs to. */
void moert_trace_span(moert_trace *t, const char *name, const char *cat, int tid, double t0, double t1,
                      int64_t step);

/* Opens a span: the NVTX range `name` when NVTX is on, and, with a trace t
 * (NULL: none), a mark on b's stream. Returns the mark, -1 when none was
 * made (no trace, or the step's spans are spent). Spans nest: close them in
 * the reverse order. */
int moert_trace_open(moert_trace *t, moert_backend *b, const char *name);
/* Closes the span opened as mark m0: pops the NVTX range; with a trace and
 * m0 >= 0, makes a mark and keeps the pair, to be resolved at the end of the
 * step as an event name (copied) of category cat on thread tid. */
void moert_trace_close(moert_trace *t, moert_backend *b, int m0, const char *name, const char *cat, int tid,
                       int64_t step);
/* A mark on b's stream counted against the step's spans (-1 without a trace
 * or past them): for a span whose ends moert_trace_marks will pair. */
int moert_trace_mark(moert_trace *t, moert_backend *b);
/* Keeps the span between marks m0 and m1 made elsewhere (on a comm's stream,
 * or by moert_trace_mark); either -1: dropped and counted. */
void moert_trace_marks(moert_trace *t, int m0, int m1, const char *name, const char *cat, int tid,
                       int64_t step);
/* The end of a step: every kept span becomes an event timed from mark
 * `origin` (the step's first), which the host made at anchor_us (its
 * moert_trace_now). Waits for the device to reach the marks. NULL t: nothing. */
bool moert_trace_resolve(moert_trace *t, moert_backend *b, int origin, double anchor_us, moert_status *st);

/* Gathers every rank's events to rank 0, which writes the file atomically
 * (tmp + rename). Collective. Frees nothing; destroy does. */
bool moert_trace_write(moert_trace *t, moert_comm *c, moert_status *st);
void moert_trace_destroy(moert_trace *t);

/* Whether spans are NVTX ranges: a build with the NVTX3 headers, and a live
 * trace or MOEC_NVTX=1. */
bool moert_nvtx_on(void);
/* An NVTX range of the calling thread (nvtxRangePushA / nvtxRangePop) when
 * NVTX is on; nothing otherwise. */
void moert_nvtx_push(const char *name);
void moert_nvtx_pop(void);

#endif
