/* cuda_graphs.c — what the cuda backend records on its stream besides ops:
 * the timing marks and CUDA graphs (backend.h's mark, mark_ms, marks_reset
 * and graph_begin, graph_end, graph_launch).
 *
 * Timing: marks are events from a pool of MOERT_MAX_MARKS made at create,
 * recorded on the stream (or another of its context) and timed once the
 * step is done, so nothing synchronizes to measure.
 *
 * Graphs: a segment of a step is captured from the stream and instantiated
 * as graph `id`, then launched in place of its ops; optional (the driver's
 * graph functions, cuda_lib.h's CU_GRAPH_FUNCS). The events and graphs are
 * this file's; the stream and the sticky status the backend's (b->impl). */
#include "backend.h"

#ifdef MOERT_HAVE_CUDA_HEADERS

#include <math.h>
#include <string.h>

#include "backend_cuda_impl.h"

/* The marks' events, made at setup, nmarks of them recorded since the last
 * marks_reset; the graphs (graph_end's) by the caller's id; a capture open. */
static struct {
  CUevent events[MOERT_MAX_MARKS];
  int nevents, nmarks;
  CUgraphExec graphs[MOERT_MAX_GRAPHS];
  bool capturing;
} T;

/* ------------------------------------------------------------ timing marks */

static int cuda_mark(moert_backend *b, void *stream) {
  cuda_state *s = b->impl;
  if (!cuda_healthy(s) || T.nmarks == T.nevents) return -1;
  CUstream on = stream ? (CUstream)stream : s->stream;
  if (!CUOK(&s->err, cuEventRecord, (T.events[T.nmarks], on))) return -1;
  return T.nmarks++;
}

static bool cuda_mark_ms(moert_backend *b, int from, int to, double *ms, moert_status *st) {
  *ms = NAN;
  MOERT_TRY(st, cuda_report(b->impl, st));
  if (from < 0 || to < 0 || from >= T.nmarks || to >= T.nmarks) return true;
  /* cuEventElapsedTime needs both reached; what waits is the host, once a step */
  CUTRY(st, cuEventSynchronize, (T.events[from]));
  CUTRY(st, cuEventSynchronize, (T.events[to]));
  float f = 0;
  CUTRY(st, cuEventElapsedTime, (&f, T.events[from], T.events[to]));
  *ms = f;
  return true;
}

static void cuda_marks_reset(moert_backend *b) {
  (void)b;
  T.nmarks = 0;
}

/* ------------------------------------------------------------ CUDA graphs */

/* Captured from the stream in THREAD_LOCAL mode: a call of this thread that
 * may not be captured (one that waits for the device, or allocates) fails,
 * and so does the capture; other threads (NCCL's) are not disturbed. */
static bool cuda_graph_begin(moert_backend *b, moert_status *st) {
  cuda_state *s = b->impl;
  MOERT_TRY(st, cuda_report(s, st));
  if (T.capturing) return MOERT_FAIL(st, "a CUDA graph capture is open already");
  CUTRY(st, cuStreamBeginCapture, (s->stream, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  T.capturing = true;
  return true;
}

static bool cuda_graph_end(moert_backend *b, int id, moert_status *st) {
  cuda_state *s = b->impl;
  CUgraph graph = NULL;
  CUresult rc = moert_cu.cuStreamEndCapture(s->stream, &graph);
  T.capturing = false;
  bool ok = true;
  if (s->err.failed) { /* an op refused while capturing: nothing ran, the device is fine */
    ok = MOERT_FAIL(st, "%s (at %s)", s->err.msg, s->err.trace);
    memset(&s->err, 0, sizeof s->err);
  } else if (rc != CUDA_SUCCESS) {
    ok = moert_cu_check(rc, "cuStreamEndCapture", __FILE__, __LINE__, st);
  }
  CUgraphExec exec = NULL;
  if (ok && id >= 0 && id < MOERT_MAX_GRAPHS) ok = CUOK(st, cuGraphInstantiate, (&exec, graph, 0));
  else if (ok) ok = MOERT_FAIL(st, "CUDA graph id %d is not below %d", id, MOERT_MAX_GRAPHS);
  if (graph) moert_cu.cuGraphDestroy(graph);
  if (!ok) return MOERT_UP(st);
  if (T.graphs[id]) moert_cu.cuGraphExecDestroy(T.graphs[id]);
  T.graphs[id] = exec;
  return true;
}

static bool cuda_graph_launch(moert_backend *b, int id, moert_status *st) {
  cuda_state *s = b->impl;
  if (id < 0 || id >= MOERT_MAX_GRAPHS || !T.graphs[id]) return MOERT_FAIL(st, "no CUDA graph %d", id);
  MOERT_TRY(st, cuda_report(s, st));
  CUTRY(st, cuGraphLaunch, (T.graphs[id], s->stream));
  return true;
}

/* ------------------------------------------------------------ setup */

bool moert_cuda_marks_setup(moert_status *st) {
  for (; T.nevents < MOERT_MAX_MARKS; T.nevents++)
    CUTRY(st, cuEventCreate, (&T.events[T.nevents], CU_EVENT_DEFAULT));
  return true;
}

void moert_cuda_graphs_ops(moert_backend *b) {
  b->mark = cuda_mark;
  b->mark_ms = cuda_mark_ms;
  b->marks_reset = cuda_marks_reset;
  b->graph_begin = moert_cu.graphs ? cuda_graph_begin : NULL;
  b->graph_end = moert_cu.graphs ? cuda_graph_end : NULL;
  b->graph_launch = moert_cu.graphs ? cuda_graph_launch : NULL;
}

void moert_cuda_graphs_release(void) {
  for (int i = 0; i < MOERT_MAX_GRAPHS; i++)
    if (T.graphs[i]) moert_cu.cuGraphExecDestroy(T.graphs[i]);
  for (int i = 0; i < T.nevents; i++) moert_cu.cuEventDestroy(T.events[i]);
  memset(&T, 0, sizeof T);
}

#endif /* MOERT_HAVE_CUDA_HEADERS */
