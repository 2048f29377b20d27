/* trace.c — Chrome trace events; see trace.h. */
#include "trace.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef MOERT_HAVE_NVTX
#include <nvtx3/nvToolsExt.h>
#endif

typedef struct event {
  char name[48];
  const char *cat;
  int tid;
  double t0, t1;
  int64_t step;
} event;

/* A span of the step not yet timed: two marks of the backend. */
typedef struct pending {
  char name[48];
  const char *cat;
  int tid, m0, m1;
  int64_t step;
} pending;

struct moert_trace {
  char *path;
  event *ev;
  int64_t n, cap, dropped;
  pending *pend;      /* [MOERT_TRACE_STEP_SPANS] this step's spans */
  int npend, nmarks;  /* spans kept, marks reserved by them this step */
  bool device;        /* timed by a device's events (the thread names say streams) */
  bool live;          /* counted in live_traces */
};

/* Live traces: NVTX is on while there is one. */
static int live_traces;

/* What crosses ranks: a fixed-size record (the category as a small code). */
typedef struct wire {
  char name[48];
  char cat[16];
  int32_t tid, pad;
  double t0, t1;
  int64_t step;
} wire;

bool moert_trace_create(const char *path, int64_t max_events, moert_trace **out, moert_status *st) {
  *out = NULL;
  moert_trace *t = calloc(1, sizeof *t);
  if (t) {
    t->path = strdup(path);
    t->cap = max_events > 0 ? max_events : 1;
    t->ev = calloc((size_t)t->cap, sizeof *t->ev);
    t->pend = calloc(MOERT_TRACE_STEP_SPANS, sizeof *t->pend);
  }
  if (!t || !t->path || !t->ev || !t->pend) {
    moert_trace_destroy(t);
    return MOERT_FAIL(st, "out of memory for the trace (%lld events)", (long long)max_events);
  }
  /* fail now, not after the run, if the file cannot be written */
  FILE *f = fopen(path, "a");
  if (!f) {
    int e = errno;
    moert_trace_destroy(t);
    return MOERT_FAIL(st, "cannot write the trace file %s: %s", path, strerror(e));
  }
  fclose(f);
  live_traces++;
  t->live = true;
  *out = t;
  return true;
}

double moert_trace_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec * 1e-3;
}

void moert_trace_span(moert_trace *t, const char *name, const char *cat, int tid, double t0, double t1,
                      int64_t step) {
  if (!t) return;
  if (t->n == t->cap) {
    t->dropped++;
    return;
  }
  event *e = &t->ev[t->n++];
  snprintf(e->name, sizeof e->name, "%s", name);
  e->cat = cat;
  e->tid = tid;
  e->t0 = t0;
  e->t1 = t1;
  e->step = step;
}

/* --- spans of marks --- */

static void keep(moert_trace *t, int m0, int m1, const char *name, const char *cat, int tid, int64_t step) {
  if (m0 < 0 || m1 < 0 || t->npend == MOERT_TRACE_STEP_SPANS) {
    t->dropped++;
    return;
  }
  pending *p = &t->pend[t->npend++];
  snprintf(p->name, sizeof p->name, "%s", name);
  p->cat = cat;
  p->tid = tid;
  p->m0 = m0;
  p->m1 = m1;
  p->step = step;
}

int moert_trace_mark(moert_trace *t, moert_backend *b) {
  if (!t || t->nmarks >= 2 * MOERT_TRACE_STEP_SPANS) return -1;
  t->nmarks++;
  return b->mark(b, NULL);
}

int moert_trace_open(moert_trace *t, moert_backend *b, const char *name) {
  moert_nvtx_push(name);
  if (!t || t->nmarks + 2 > 2 * MOERT_TRACE_STEP_SPANS) return -1;
  t->nmarks += 2; /* this one and the close's */
  return b->mark(b, NULL);
}

void moert_trace_close(moert_trace *t, moert_backend *b, int m0, const char *name, const char *cat, int tid,
                       int64_t step) {
  moert_nvtx_pop();
  if (!t) return;
  keep(t, m0, m0 >= 0 ? b->mark(b, NULL) : -1, name, cat, tid, step);
}

void moert_trace_marks(moert_trace *t, int m0, int m1, const char *name, const char *cat, int tid,
                       int64_t step) {
  if (t) keep(t, m0, m1, name, cat, tid, step);
}

bool moert_trace_resolve(moert_trace *t, moert_backend *b, int origin, double anchor_us, moert_status *st) {
  if (!t) return true;
  t->device = strcmp(b->name, "cpu") != 0;
  bool ok = true;
  for (int i = 0; i < t->npend && ok; i++) {
    const pending *p = &t->pend[i];
    double a = NAN, z = NAN;
    ok = b->mark_ms(b, origin, p->m0, &a, st) && b->mark_ms(b, origin, p->m1, &z, st);
    if (ok && !isnan(a) && !isnan(z))
      moert_trace_span(t, p->name, p->cat, p->tid, anchor_us + 1e3 * a, anchor_us + 1e3 * z, p->step);
    else if (ok)
      t->dropped++;
  }
  t->npend = 0;
  t->nmarks = 0;
  return ok ? true : MOERT_UP(st);
}

/* --- NVTX --- */

bool moert_nvtx_on(void) {
#ifdef MOERT_HAVE_NVTX
  static int env = -1;
  if (env < 0) {
    const char *v = getenv("MOEC_NVTX");
    env = v && strcmp(v, "1") == 0;
  }
  return env || live_traces > 0;
#else
  return false;
#endif
}

void moert_nvtx_push(const char *name) {
#ifdef MOERT_HAVE_NVTX
  if (moert_nvtx_on()) nvtxRangePushA(name);
#else
  (void)name;
#endif
}

void moert_nvtx_pop(void) {
#ifdef MOERT_HAVE_NVTX
  if (moert_nvtx_on()) nvtxRangePop();
#endif
}

/* --- the file --- */

static void json_str(FILE *f, const char *s) {
  fputc('"', f);
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
    else if (c < 0x20) fprintf(f, "\\u%04x", c);
    else fputc(c, f);
  }
  fputc('"', f);
}

static const char *const thread_names[2][3] = {
    {"compute", "token all-to-all", "parameter gather"},
    {"compute stream", "comm stream (all-to-all)", "parameter gather"}};

bool moert_trace_write(moert_trace *t, moert_comm *c, moert_status *st) {
  int W = c->world, me = c->rank;
  /* every rank sends its count, then max-count records (padded) */
  int64_t n = t->n, most = n;
  MOERT_TRY(st, c->all_reduce_i64(c, &most, 1, MOERT_RED_MAX, st));
  wire *mine = calloc((size_t)(most ? most : 1), sizeof *mine);
  wire *all = me == 0 ? calloc((size_t)W * (size_t)(most ? most : 1), sizeof *all) : NULL;
  int64_t *counts = calloc((size_t)W, sizeof *counts);
  if (!mine || !counts || (me == 0 && !all)) {
    free(mine), free(all), free(counts);
    return MOERT_FAIL(st, "out of memory writing the trace");
  }
  for (int64_t i = 0; i < n; i++) {
    memcpy(mine[i].name, t->ev[i].name, sizeof mine[i].name);
    snprintf(mine[i].cat, sizeof mine[i].cat, "%s", t->ev[i].cat);
    mine[i].tid = t->ev[i].tid;
    mine[i].t0 = t->ev[i].t0;
    mine[i].t1 = t->ev[i].t1;
    mine[i].step = t->ev[i].step;
  }
  bool ok = c->gather(c, &n, counts, sizeof n, 0, st) &&
            c->gather(c, mine, all, (int64_t)sizeof *mine * (most ? most : 1), 0, st);
  if (ok && me == 0) {
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", t->path);
    FILE *f = fopen(tmp, "w");
    if (!f) {
      ok = MOERT_FAIL(st, "cannot write the trace file %s: %s", tmp, strerror(errno));
    } else {
      double base = 1e300;
      for (int r = 0; r < W; r++)
        for (int64_t i = 0; i < counts[r]; i++)
          if (all[(size_t)r * (size_t)(most ? most : 1) + (size_t)i].t0 < base)
            base = all[(size_t)r * (size_t)(most ? most : 1) + (size_t)i].t0;
      fputs("{\"displayTimeUnit\": \"ms\", \"traceEvents\": [\n", f);
      bool first = true;
      for (int r = 0; r < W; r++) {
        fprintf(f, "%s{\"ph\": \"M\", \"name\": \"process_name\", \"pid\": %d, \"args\": {\"name\": \"rank %d\"}}",
                first ? "" : ",\n", r, r);
        first = false;
        for (int k = 0; k < 3; k++)
          fprintf(f, ",\n{\"ph\": \"M\", \"name\": \"thread_name\", \"pid\": %d, \"tid\": %d, \"args\": {\"name\": \"%s\"}}",
                  r, k, thread_names[t->device][k]);
        for (int64_t i = 0; i < counts[r]; i++) {
          const wire *w = &all[(size_t)r * (size_t)(most ? most : 1) + (size_t)i];
          fputs(",\n{\"ph\": \"X\", \"name\": ", f);
          json_str(f, w->name);
          fputs(", \"cat\": ", f);
          json_str(f, w->cat);
          fprintf(f, ", \"pid\": %d, \"tid\": %d, \"ts\": %.3f, \"dur\": %.3f, \"args\": {\"step\": %lld}}", r,
                  w->tid, w->t0 - base, w->t1 - w->t0, (long long)w->step);
        }
      }
      fprintf(f, "\n], \"otherData\": {\"dropped_events\": %lld, \"clock\": \"%s\"}}\n", (long long)t->dropped,
              t->device ? "device (CUDA events), anchored to the wall clock each step" : "host");
      bool bad = ferror(f) != 0;
      bad |= fclose(f) != 0;
      if (bad || rename(tmp, t->path) != 0) {
        remove(tmp);
        ok = MOERT_FAIL(st, "cannot write the trace file %s", t->path);
      }
    }
  }
  free(mine);
  free(all);
  free(counts);
  return ok ? true : MOERT_UP(st);
}

void moert_trace_destroy(moert_trace *t) {
  if (!t) return;
  free(t->path);
  free(t->ev);
  free(t->pend);
  if (t->live) live_traces--;
  free(t);
}
