/* trace.c — Chrome trace events; see trace.h. */
#include "trace.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct event {
  char name[48];
  const char *cat;
  int tid;
  double t0, t1;
  int64_t step;
} event;

struct moert_trace {
  char *path;
  event *ev;
  int64_t n, cap, dropped;
};

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
  }
  if (!t || !t->path || !t->ev) {
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
  *out = t;
  return true;
}

double moert_trace_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
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

static const char *const thread_names[] = {"compute", "token all-to-all", "parameter gather"};

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
                  r, k, thread_names[k]);
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
      fprintf(f, "\n], \"otherData\": {\"dropped_events\": %lld}}\n", (long long)t->dropped);
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
  free(t);
}
