/* test_slots.c — the compiler and the runtime agree on every layer's
 * parameters (runtime/layer.h): for specs with every layer kind and every
 * option that changes a layer's parameters, each layer's parameters are its
 * kind's present slots in order, named `LAYER.SLOT`, of the slot's shape, and
 * the plan resolves each slot to that parameter. Then models that disagree
 * (two parameters swapped, a shape changed, a parameter missing, a name
 * changed) must be refused by the plan with a message naming the layer,
 * never planned and read wrong. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "front.h"
#include "layer.h"
#include "lower.h"

static const char *const specs[] = {
    "model a { dim = 8; tokens = 16; vocab = 16; context = 2; residual { layernorm; ffn f { hidden = 16; "
    "activation = swiglu; } } residual { rmsnorm; moe e { experts = 4; hidden = 8; top_k = 2; } } }",
    "model b { dim = 8; tokens = 16; moe e { experts = 4; hidden = 8; top_k = 1; gate = cosine; bias = false; } "
    "ffn g { hidden = 8; } }",
    "model c { dim = 8; tokens = 16; repeat 2 { moe e { experts = 2; hidden = 8; top_k = 2; activation = swiglu; "
    "gate = cosine; } } }",
};

static int fails;
#define CHECK(cond, ...)                   \
  do {                                     \
    if (!(cond)) {                         \
      fprintf(stderr, "FAIL: " __VA_ARGS__); \
      fputc('\n', stderr);                 \
      fails++;                             \
    }                                      \
  } while (0)

/* The plan of m must be refused with a message that names layer `layer`. */
static void refused(const moert_model *m, const char *what, const char *layer) {
  moert_status st = {0};
  moert_plan *p = NULL;
  bool ok = moert_plan_create(m, 1, 0, m->tokens, true, &p, &st);
  char want[96];
  snprintf(want, sizeof want, "layer `%s`", layer);
  CHECK(!ok && strstr(st.msg, want) && strstr(st.msg, "rebuild the model"), "%s: %s (%s)", what,
        ok ? "planned" : "refused without naming the layer", st.msg);
  if (!ok) printf("ok: %s: %s\n", what, st.msg);
  moert_plan_destroy(p);
}

static void one(const char *text) {
  moec_arena *a = moec_arena_create();
  moec_diags d;
  moec_diags_init(&d, a);
  moec_spec *s = moec_front_buffer(a, &d, "spec", text, strlen(text));
  moert_model *m = s ? moec_lower(a, &d, s, "spec") : NULL;
  if (!m) {
    moec_diags_print(&d, stderr);
    CHECK(false, "the spec does not compile: %s", text);
    moec_arena_destroy(a);
    return;
  }
  moert_status st = {0};
  moert_plan *p = NULL;
  if (!moert_plan_create(m, 1, 0, m->tokens, true, &p, &st)) {
    CHECK(false, "%s: %s", m->name, st.msg);
    moec_arena_destroy(a);
    return;
  }
  int moe = -1, seen = 0;
  for (int li = 0; li < m->nlayers; li++) {
    const moert_layer *l = &m->layers[li];
    const moert_layer_ops *ops = moert_layer_ops_of(l->kind);
    int n = 0;
    for (int k = 0; k < ops->nslots; k++) {
      moert_param want;
      bool has = ops->slot(m, l, k, &want);
      int i = p->layers[li].slot[k];
      CHECK(has == (i >= 0), "%s: layer %s slot %s: %s", m->name, l->name, ops->slots[k],
            has ? "not resolved" : "resolved but absent");
      if (!has || i < 0) continue;
      char name[96];
      snprintf(name, sizeof name, "%s.%s", l->name, ops->slots[k]);
      CHECK(i == l->param_first + n, "%s: %s is parameter %d, its slot's order says %d", m->name, name, i,
            l->param_first + n);
      CHECK(strcmp(m->params[i].name, name) == 0, "%s: slot %s holds %s", m->name, name, m->params[i].name);
      bool shape = m->params[i].ndim == want.ndim;
      for (int dd = 0; shape && dd < want.ndim; dd++) shape = m->params[i].shape[dd] == want.shape[dd];
      CHECK(shape, "%s: %s has another shape than its slot", m->name, name);
      n++;
      seen++;
    }
    CHECK(n == l->nparams, "%s: layer %s has %d parameters, %d slots", m->name, l->name, l->nparams, n);
    if (l->kind == MOERT_L_MOE && moe < 0) moe = li;
  }
  printf("ok: %s: %d parameters in their slots\n", m->name, seen);
  moert_plan_destroy(p);

  /* models that disagree with the runtime */
  const moert_layer *l = &m->layers[moe];
  moert_param *params = malloc(sizeof *params * (size_t)m->nparams);
  moert_layer *layers = malloc(sizeof *layers * (size_t)m->nlayers);
  moert_model bad = *m;
  bad.params = params;
  bad.layers = layers;
  int f1 = l->param_first + l->nparams - (l->bias ? 4 : 2), f2 = f1 + (l->bias ? 2 : 1); /* fc1_w, fc2_w */
#define RESET() (memcpy(params, m->params, sizeof *params * (size_t)m->nparams), \
                 memcpy(layers, m->layers, sizeof *layers * (size_t)m->nlayers))
  RESET();
  params[f1] = m->params[f2];
  params[f2] = m->params[f1];
  refused(&bad, "fc1_w and fc2_w swapped", l->name);
  RESET();
  params[f1].shape[1] += 1;
  refused(&bad, "a shape changed", l->name);
  RESET();
  params[f1].name = "e.fc1";
  refused(&bad, "a name changed", l->name);
  RESET();
  params[f2].init = MOERT_INIT_ZEROS;
  refused(&bad, "an initializer changed", l->name);
  RESET();
  layers[moe].nparams--;
  refused(&bad, "a parameter missing", l->name);
  free(params);
  free(layers);
  moec_arena_destroy(a);
}

int main(void) {
  for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) one(specs[i]);
  printf("%d failed\n", fails);
  return fails ? 1 : 0;
}
