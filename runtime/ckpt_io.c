/* ckpt_io.c — model checkpoints; see ckpt_io.h.
 * Tensors are saved whole, under their global names and shapes, whatever the
 * world size: rank 0 gathers every rank's buffer and puts each slice in its
 * place (placement.c's global index); on load every rank reads the file and
 * takes its own slice. So a checkpoint written at 4 ranks resumes at 2. */
#include "ckpt_io.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "checkpoint.h"
#include "flags.h"

#define MODEL_FILE "model.safetensors"
#define OPTIM_FILE "optimizer.safetensors"

static bool exists(const char *path) {
  struct stat sb;
  return stat(path, &sb) == 0;
}

static bool same_model(const moert_ckpt_reader *r, const moert_model *m, const char *dir,
                       moert_status *st) {
  const char *name = moert_ckpt_meta_get(r, "model");
  if (!name || strcmp(name, m->name) != 0)
    return MOERT_FAIL(st, "the checkpoint in %s is of model `%s`, not `%s`; give another --checkpoint DIR",
                      dir, name ? name : "(unnamed)", m->name);
  return true;
}

bool moert_ckpt_check(const char *dir, const moert_model *m, bool resume, bool overwrite,
                      int64_t *step, moert_status *st) {
  *step = 0;
  MOERT_TRY(st, moert_ckpt_recover(dir, st)); /* a swap a crash interrupted */
  if (!resume && !exists(dir)) return true;
  moert_ckpt_reader *r;
  if (!moert_ckpt_reader_create(dir, &r, st)) {
    if (resume) return MOERT_UP(st);
    moert_status inner = *st;
    *st = (moert_status){0};
    return MOERT_FAIL(st, "%s exists but is not a valid checkpoint (%s); it is left untouched: move it "
                      "away or give another --checkpoint DIR", dir, inner.msg);
  }
  bool ok = same_model(r, m, dir, st);
  *step = moert_ckpt_step(r);
  moert_ckpt_reader_destroy(r);
  if (ok && !resume && !overwrite)
    ok = MOERT_FAIL(st, "%s holds a checkpoint at step %" PRId64 ", which this run would replace; "
                    "continue it with --resume, or start over with --overwrite", dir, *step);
  return ok ? true : MOERT_UP(st);
}

static int64_t global_count(const moert_param *g) {
  int64_t n = 1;
  for (int d = 0; d < g->ndim; d++) n *= g->shape[d];
  return n;
}

/* Rank 0: the whole tensors from every rank's buffer (bufs[r], each
 * param_elems floats); *out is one allocation holding them all, tensor i at
 * (*at)[i]. */
static bool assemble(const moert_exec *e, float *const *bufs, float **out, int64_t **at, moert_status *st) {
  const moert_model *m = e->m;
  int W = e->comm->world;
  *at = calloc((size_t)m->nparams + 1, sizeof **at);
  int64_t total = 0;
  for (int i = 0; i < m->nparams && *at; i++) {
    (*at)[i] = total;
    total += global_count(&m->params[i]);
  }
  *out = malloc(sizeof(float) * (size_t)(total ? total : 1));
  if (!*at || !*out) return MOERT_FAIL(st, "out of memory assembling a checkpoint");
  for (int r = 0; r < W; r++) {
    moert_plan *p = NULL;
    if (r == e->comm->rank) {
      p = e->plan;
    } else if (!moert_plan_create_nodes(m, W, r, e->plan->tokens, true, e->comm->nodes, &p, st)) {
      return MOERT_UP(st);
    }
    for (int i = 0; i < m->nparams; i++) {
      const moert_param *g = &m->params[i];
      if (g->place == MOERT_PLACE_REPLICATED && r != 0) continue;
      const moert_param_plan *pp = &p->params[i];
      float *dst = *out + (*at)[i];
      const float *src = bufs[r] + pp->offset;
      for (int64_t k = 0; k < pp->count; k++) dst[moert_global_index(g, pp, k)] = src[k];
    }
    if (p != e->plan) moert_plan_destroy(p);
  }
  return true;
}

/* The device buffer dev (param_elems floats, laid out as the parameters) of
 * every rank, as whole tensors on rank 0. */
static bool gather_whole(moert_exec *e, const float *dev, float **whole, int64_t **at, moert_status *st) {
  int W = e->comm->world, me = e->comm->rank;
  int64_t n = e->plan->param_elems;
  size_t bytes = sizeof(float) * (size_t)(n ? n : 1);
  float *mine = malloc(bytes), *all = me == 0 ? malloc(bytes * (size_t)W) : NULL;
  float **bufs = calloc((size_t)W, sizeof *bufs);
  bool ok = mine && bufs && (me != 0 || all);
  if (!ok) MOERT_FAIL(st, "out of memory saving a checkpoint");
  ok = ok && e->b->download(e->b, mine, dev, sizeof(float) * (size_t)n, st);
  ok = ok && e->comm->gather(e->comm, mine, all, (int64_t)bytes, 0, st);
  if (ok && me == 0) {
    for (int r = 0; r < W; r++) bufs[r] = all + (size_t)r * (bytes / sizeof(float));
    ok = assemble(e, bufs, whole, at, st);
  }
  free(mine);
  free(all);
  free(bufs);
  return ok ? true : MOERT_UP(st);
}

static bool write_all(moert_exec *e, const char *dir, int64_t step, moert_status *st) {
  const moert_model *m = e->m;
  bool adam = m->train.optimizer == MOERT_OPT_ADAM;
  float *wp = NULL, *wm = NULL, *wv = NULL;
  int64_t *at = NULL, *at2 = NULL, *at3 = NULL;
  bool ok = gather_whole(e, e->params, &wp, &at, st);
  if (ok && adam)
    ok = gather_whole(e, e->state, &wm, &at2, st) &&
         gather_whole(e, e->state + e->plan->param_elems, &wv, &at3, st);
  moert_ckpt_writer *w = NULL;
  moert_st_tensor *t = NULL;
  char **names = NULL;
  if (ok && e->comm->rank == 0) {
    int n = m->nparams, nt = adam ? 3 * n : n;
    t = calloc((size_t)nt + 1, sizeof *t);
    names = calloc((size_t)nt + 1, sizeof *names);
    ok = t && names;
    if (!ok) MOERT_FAIL(st, "out of memory");
    for (int i = 0; ok && i < nt; i++) {
      const moert_param *g = &m->params[i % n];
      const char *suffix = i < n ? "" : i < 2 * n ? ".exp_avg" : ".exp_avg_sq";
      size_t len = strlen(g->name) + strlen(suffix) + 1;
      names[i] = malloc(len);
      if (!names[i]) {
        ok = MOERT_FAIL(st, "out of memory");
        break;
      }
      snprintf(names[i], len, "%s%s", g->name, suffix);
      t[i].name = names[i];
      t[i].dtype = MOERT_ST_F32;
      t[i].ndim = g->ndim;
      for (int d = 0; d < g->ndim; d++) t[i].shape[d] = g->shape[d];
      t[i].data = i < n ? wp + at[i] : i < 2 * n ? wm + at2[i - n] : wv + at3[i - 2 * n];
      t[i].nbytes = sizeof(float) * (size_t)global_count(g);
    }
    char stepbuf[32], toks[32], world[16], skipped[32];
    snprintf(stepbuf, sizeof stepbuf, "%" PRId64, step);
    snprintf(skipped, sizeof skipped, "%" PRId64, e->skipped);
    snprintf(toks, sizeof toks, "%" PRId64, e->plan->tokens);
    snprintf(world, sizeof world, "%d", e->comm->world);
    moert_kv meta[] = {{"model", m->name}, {"spec", m->spec_file}, {"step", stepbuf},
                       {"tokens_per_rank", toks}, {"world", world},
                       {"optimizer", adam ? "adamw" : "sgd"}, {"skipped_steps", skipped}};
    ok = ok && moert_ckpt_writer_create(dir, 0, &w, st) &&
         moert_ckpt_add_safetensors(w, MODEL_FILE, t, n, meta, 2, st) &&
         (!adam || moert_ckpt_add_safetensors(w, OPTIM_FILE, t + n, 2 * n, NULL, 0, st)) &&
         moert_ckpt_commit(w, step, meta, (int)(sizeof meta / sizeof meta[0]), st);
    moert_ckpt_writer_destroy(w);
    for (int i = 0; names && i < nt; i++) free(names[i]);
  }
  free(names);
  free(t);
  free(wp);
  free(wm);
  free(wv);
  free(at);
  free(at2);
  free(at3);
  return ok;
}

/* Whether every rank succeeded (a failed rank's message stays in its st). */
static bool all_ok(moert_comm *c, bool ok, const char *what, moert_status *st) {
  double bad = ok ? 0 : 1;
  moert_status cst = {0};
  if (!c->all_reduce_f64(c, &bad, 1, MOERT_RED_MAX, &cst)) return ok ? MOERT_FAIL(st, "%s", cst.msg) : false;
  if (bad > 0 && ok) return MOERT_FAIL(st, "another rank failed %s", what);
  return ok;
}

bool moert_ckpt_save(const char *dir, moert_exec *e, int64_t step, moert_status *st) {
  bool ok = write_all(e, dir, step, st);
  return all_ok(e->comm, ok, "to save the checkpoint", st) ? true : MOERT_UP(st);
}

/* This rank's slice of every tensor named NAME+suffix of f into dev. */
static bool restore(moert_exec *e, const moert_st_file *f, const char *file, const char *suffix,
                    float *dev, moert_status *st) {
  const moert_model *m = e->m;
  int64_t n = e->plan->param_elems;
  float *host = calloc((size_t)(n ? n : 1), sizeof *host);
  if (!host) return MOERT_FAIL(st, "out of memory loading a checkpoint");
  bool ok = true;
  for (int i = 0; i < m->nparams && ok; i++) {
    const moert_param *g = &m->params[i];
    const moert_param_plan *pp = &e->plan->params[i];
    char name[512];
    snprintf(name, sizeof name, "%s%s", g->name, suffix);
    const moert_st_tensor *t = moert_st_find(f, name);
    if (!t) {
      ok = MOERT_FAIL(st, "%s has no tensor `%s`: the checkpoint is of another model", file, name);
      break;
    }
    bool shape_ok = t->dtype == MOERT_ST_F32 && t->ndim == g->ndim;
    for (int d = 0; shape_ok && d < g->ndim; d++) shape_ok = t->shape[d] == g->shape[d];
    if (!shape_ok || t->nbytes != sizeof(float) * (size_t)global_count(g)) {
      ok = MOERT_FAIL(st, "%s: tensor `%s` has another dtype or shape than the model's; the checkpoint "
                      "is of another version of the model", file, name);
      break;
    }
    const unsigned char *src = t->data; /* may be unaligned */
    for (int64_t k = 0; k < pp->count; k++)
      memcpy(host + pp->offset + k, src + sizeof(float) * moert_global_index(g, pp, k), sizeof(float));
  }
  ok = ok && e->b->upload(e->b, dev, host, sizeof(float) * (size_t)n, st);
  free(host);
  return ok ? true : MOERT_UP(st);
}

static bool read_all(const char *dir, moert_exec *e, int64_t *step, const char **note, moert_status *st) {
  const moert_model *m = e->m;
  moert_ckpt_reader *r;
  MOERT_TRY(st, moert_ckpt_reader_create(dir, &r, st));
  bool ok = same_model(r, m, dir, st);
  *step = moert_ckpt_step(r);
  /* steps whose update was skipped (--on-nan skip): the optimizer's step
   * count is the step less these (absent: none, a checkpoint from before) */
  const char *skipped = moert_ckpt_meta_get(r, "skipped_steps");
  e->skipped = 0;
  if (ok && skipped && (!moert_parse_int(skipped, 0, *step, &e->skipped)))
    ok = MOERT_FAIL(st, "%s/MANIFEST.json: metadata `skipped_steps` must be a whole number from 0 to the step "
                    "(%" PRId64 "), found `%.40s`", dir, *step, skipped);
  /* the optimizer it was trained with: another one's state is dropped, or starts anew, and said */
  const char *opt = moert_ckpt_meta_get(r, "optimizer");
  bool ckpt_adam = opt && strcmp(opt, "adamw") == 0, adam = m->train.optimizer == MOERT_OPT_ADAM;
  *note = NULL;
  if (ckpt_adam && !adam)
    *note = "the checkpoint's AdamW moments are dropped: this model trains with SGD";
  else if (!ckpt_adam && adam && opt)
    *note = "AdamW's moments start from zero: the checkpoint was trained with SGD";
  moert_st_file *f = NULL;
  char path[4200];
  snprintf(path, sizeof path, "%s/%s", dir, MODEL_FILE);
  ok = ok && moert_ckpt_read_safetensors(r, MODEL_FILE, &f, st) && restore(e, f, path, "", e->params, st);
  e->wlow_fresh = false; /* the bf16 copy is made from the restored masters */
  moert_st_destroy(f);
  f = NULL;
  if (ok && adam && (ckpt_adam || !opt)) {
    snprintf(path, sizeof path, "%s/%s", dir, OPTIM_FILE);
    ok = moert_ckpt_read_safetensors(r, OPTIM_FILE, &f, st) &&
         restore(e, f, path, ".exp_avg", e->state, st) &&
         restore(e, f, path, ".exp_avg_sq", e->state + e->plan->param_elems, st);
    moert_st_destroy(f);
  }
  moert_ckpt_reader_destroy(r);
  return ok;
}

bool moert_ckpt_load(const char *dir, moert_exec *e, int64_t *step, const char **note, moert_status *st) {
  bool ok = read_all(dir, e, step, note, st);
  return all_ok(e->comm, ok, "to load the checkpoint", st) ? true : MOERT_UP(st);
}
