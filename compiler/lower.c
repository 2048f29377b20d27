/* lower.c — spec to model description; see lower.h. */
#include "lower.h"

#include <inttypes.h>
#include <math.h>
#include <string.h>

#include "layer.h"
#include "names.h"

typedef struct lowering {
  moec_arena *a;
  moec_diags *d;
  const moec_spec *s;
  moert_layer *layers;
  int nlayers, cap_layers;
  moert_param *params;
  int nparams, cap_params;
  int counters[MOERT_L__COUNT]; /* for the names of unnamed layers */
  int nmoe;
  moec_names names;             /* expanded layer names, to catch collisions */
} lowering;

_Static_assert((int)MOEC_DTYPE_BF16 == (int)MOERT_DT_BF16 && (int)MOEC_DTYPE_FP32 == (int)MOERT_DT_FP32,
               "spec.def and model.h disagree on dtypes");
_Static_assert((int)MOEC_ACT_RELU == (int)MOERT_ACT_RELU && (int)MOEC_ACT_GELU == (int)MOERT_ACT_GELU &&
                   (int)MOEC_ACT_SILU == (int)MOERT_ACT_SILU && (int)MOEC_ACT_SWIGLU == (int)MOERT_ACT_SWIGLU,
               "spec.def and model.h disagree on activations");
_Static_assert((int)MOEC_GATE_SOFTMAX == (int)MOERT_GATE_SOFTMAX && (int)MOEC_GATE_COSINE == (int)MOERT_GATE_COSINE &&
                   (int)MOEC_GATE_SIGMOID == (int)MOERT_GATE_SIGMOID,
               "spec.def and model.h disagree on gate kinds");
_Static_assert((int)MOEC_ROUTING_TOKEN_CHOICE == (int)MOERT_ROUTE_TOKEN_CHOICE &&
                   (int)MOEC_ROUTING_EXPERT_CHOICE == (int)MOERT_ROUTE_EXPERT_CHOICE,
               "spec.def and model.h disagree on routing");
_Static_assert(MOEC_MAX_HEAD_DIM == MOERT_MAX_HEAD_DIM, "spec.h and model.h disagree on the widest head");
_Static_assert(MOEC_COSINE_PROJ == MOERT_COSINE_PROJ, "spec.h and model.h disagree on the cosine projection");
_Static_assert(MOEC_MAX_TOKENS == MOERT_MAX_TOKENS && MOEC_MAX_ACT_ELEMS == MOERT_MAX_ACT_ELEMS,
               "spec.h and model.h disagree on the size limits");
_Static_assert((int)MOEC_OPTIM_ADAM == (int)MOERT_OPT_ADAM, "optimizers");
_Static_assert((int)MOEC_SCHED_COSINE == (int)MOERT_SCHED_COSINE, "schedules");
_Static_assert((int)MOEC_A2A_2DH == (int)MOERT_A2A_2DH, "all-to-all algorithms");
_Static_assert((int)MOEC_SELECT_FIXED == (int)MOERT_SELECT_FIXED, "select modes");
_Static_assert((int)MOEC_SELECT_PREDICTED == (int)MOERT_SELECT_PREDICTED, "select modes");

static bool claim_name(lowering *L, const char *name, moec_loc loc) {
  const moec_loc *other = moec_names_add(&L->names, name, loc);
  if (!other) return true;
  moec_error(L->d, loc, "once `repeat` is expanded, this layer is named `%s`, a name another "
             "layer already has; rename one of them", name);
  moec_note(L->d, *other, "the other `%s` is here", name);
  return false;
}

static moert_layer *add_layer(lowering *L, moert_layer_kind kind, const char *name) {
  if (L->nlayers == L->cap_layers) {
    int cap = L->cap_layers ? L->cap_layers * 2 : 64;
    moert_layer *t = MOEC_NEW_ARRAY(L->a, moert_layer, cap);
    if (L->nlayers) memcpy(t, L->layers, sizeof *t * (size_t)L->nlayers);
    L->layers = t;
    L->cap_layers = cap;
  }
  moert_layer *l = &L->layers[L->nlayers++];
  l->kind = kind;
  l->name = name ? name
                 : moec_arena_printf(L->a, "%s_%d", moert_layer_kind_names[kind], L->counters[kind]);
  L->counters[kind]++;
  l->param_first = L->nparams;
  return l;
}

/* The parameters of the layer just added: its kind's present slots, in
 * slot order (runtime/layer.h), each named `LAYER.SLOT`. */
static void add_params(lowering *L) {
  moert_layer *l = &L->layers[L->nlayers - 1];
  const moert_layer_ops *ops = moert_layer_ops_of(l->kind);
  moert_model dims = {.dim = L->s->dim, .vocab = L->s->vocab, .context = L->s->context, .seq = L->s->seq};
  for (int s = 0; s < ops->nslots; s++) {
    moert_param want;
    if (!ops->slot(&dims, l, s, &want)) continue;
    if (L->nparams == L->cap_params) {
      int cap = L->cap_params ? L->cap_params * 2 : 64;
      moert_param *t = MOEC_NEW_ARRAY(L->a, moert_param, cap);
      if (L->nparams) memcpy(t, L->params, sizeof *t * (size_t)L->nparams);
      L->params = t;
      L->cap_params = cap;
    }
    moert_param *p = &L->params[L->nparams++];
    *p = want;
    p->name = moec_arena_printf(L->a, "%s.%s", l->name, ops->slots[s]);
    p->layer = L->nlayers - 1;
    l->nparams++;
  }
}

static void lower_list(lowering *L, const moec_layer *l, const char *suffix);

/* The layer's fields from the spec, then its parameters (add_params). */
static void lower_one(lowering *L, const moec_layer *l, const char *suffix) {
  switch (l->kind) {
  case MOEC_LAYER_LAYERNORM:
    add_layer(L, MOERT_L_LAYERNORM, NULL);
    add_params(L);
    break;
  case MOEC_LAYER_RMSNORM:
    add_layer(L, MOERT_L_RMSNORM, NULL);
    add_params(L);
    break;
  case MOEC_LAYER_FFN: {
    const char *name = moec_arena_printf(L->a, "%s%s", l->name, suffix);
    claim_name(L, name, l->loc);
    moert_layer *x = add_layer(L, MOERT_L_FFN, name);
    x->hidden = l->ffn.hidden;
    x->act = (moert_act)l->ffn.act;
    x->bias = 1;
    add_params(L);
    break;
  }
  case MOEC_LAYER_ATTENTION: {
    const moec_attention *at = &l->attn;
    const char *name = moec_arena_printf(L->a, "%s%s", l->name, suffix);
    claim_name(L, name, l->loc);
    moert_layer *x = add_layer(L, MOERT_L_ATTENTION, name);
    x->heads = at->heads;
    x->kv_heads = at->kv_heads;
    x->head_dim = at->head_dim;
    x->causal = at->causal;
    x->rope = at->rope;
    x->bias = at->bias;
    add_params(L);
    break;
  }
  case MOEC_LAYER_MOE: {
    const moec_moe *e = &l->moe;
    const char *name = moec_arena_printf(L->a, "%s%s", l->name, suffix);
    claim_name(L, name, l->loc);
    moert_layer *x = add_layer(L, MOERT_L_MOE, name);
    x->hidden = e->hidden;
    x->act = (moert_act)e->act;
    x->experts = e->experts;
    x->top_k = e->top_k;
    x->capacity_factor = e->capacity_factor;
    x->gate = (moert_gate)e->gate;
    x->aux_loss = e->aux_loss;
    x->bias = e->bias;
    x->normalize_gate = e->normalize_gate;
    x->batch_prioritized = e->batch_prioritized;
    x->gate_noise = e->gate_noise;
    x->route_scale = e->route_scale;
    x->bias_update = e->bias_update;
    x->groups = e->groups;
    x->top_groups = e->top_groups;
    x->z_loss = e->z_loss;
    x->shared_experts = e->shared_experts;
    x->routing = (moert_routing)e->routing;
    x->moe_index = L->nmoe++;
    add_params(L);
    break;
  }
  case MOEC_LAYER_RESIDUAL:
    add_layer(L, MOERT_L_RES_BEGIN, NULL);
    add_params(L);
    lower_list(L, l->body, suffix);
    add_layer(L, MOERT_L_RES_END, NULL);
    add_params(L);
    break;
  case MOEC_LAYER_REPEAT:
    for (int64_t i = 0; i < l->count; i++)
      lower_list(L, l->body, moec_arena_printf(L->a, "%s_%lld", suffix, (long long)i));
    break;
  case MOEC_LAYER__COUNT: break;
  }
}

static void lower_list(lowering *L, const moec_layer *l, const char *suffix) {
  for (; l; l = l->next) lower_one(L, l, suffix);
}

moert_model *moec_lower(moec_arena *a, moec_diags *d, const moec_spec *s, const char *spec_file) {
  lowering *L = MOEC_NEW(a, lowering);
  L->a = a;
  L->d = d;
  L->s = s;
  moec_names_init(&L->names, a);
  int errors = d->nerrors;
  if (s->vocab) {
    add_layer(L, MOERT_L_EMBED, "embed");
    add_params(L);
  }
  lower_list(L, s->layers, "");
  if (s->vocab) {
    add_layer(L, MOERT_L_HEAD_XENT, "head");
    add_params(L);
  } else {
    add_layer(L, MOERT_L_MSE, "mse");
    add_params(L);
  }
  if (d->nerrors > errors) return NULL;

  moert_model *md = MOEC_NEW(a, moert_model);
  md->name = s->name;
  md->spec_file = spec_file;
  md->dim = s->dim;
  md->tokens = s->tokens;
  md->vocab = s->vocab;
  md->context = s->vocab ? s->context : 0;
  md->seq = s->vocab ? s->seq : 0;
  md->dtype = (moert_dtype)s->dtype;
  md->nlayers = L->nlayers;
  md->layers = L->layers;
  md->nparams = L->nparams;
  md->params = L->params;
  md->nmoe = L->nmoe;

  const moec_parallel *p = &s->parallel;
  moert_parallel *mp = &md->parallel;
  mp->r_auto = p->r_auto;
  mp->nr = p->nr;
  int64_t *r = MOEC_NEW_ARRAY(a, int64_t, p->nr + 1);
  memcpy(r, p->r, sizeof *r * (size_t)p->nr);
  mp->r = r;
  mp->ndegrees = p->ndegrees;
  int64_t *deg = MOEC_NEW_ARRAY(a, int64_t, p->ndegrees + 1);
  memcpy(deg, p->degrees, sizeof *deg * (size_t)p->ndegrees);
  mp->degrees = deg;
  mp->na2a = p->na2a;
  int *a2a = MOEC_NEW_ARRAY(a, int, p->na2a + 1);
  for (int i = 0; i < p->na2a; i++) a2a[i] = (int)p->a2a[i];
  mp->a2a = a2a;
  mp->select = (moert_select_mode)p->select;
  mp->explore_steps = p->explore_steps;

  moert_train *t = &md->train;
  const moec_train *st = &s->train;
  t->has_train = s->has_train;
  if (s->has_train) {
    t->steps = st->steps;
    t->seed = st->seed;
    t->optimizer = (moert_optim)st->optimizer;
    t->lr = st->lr;
    t->beta1 = st->beta1;
    t->beta2 = st->beta2;
    t->eps = st->eps;
    t->weight_decay = st->weight_decay;
    t->warmup = st->warmup;
    t->schedule = (moert_sched)st->schedule;
    t->clip = st->clip;
    t->data_path = st->data == MOEC_DATA_BYTES ? st->data_path : NULL;
    t->eval_every = st->eval_every;
    t->checkpoint = st->checkpoint;
    t->checkpoint_every = st->checkpoint_every;
    t->log_every = st->log_every;
    t->label_smoothing = s->vocab ? st->label_smoothing : 0;
  } else {
    t->steps = 10; /* an inference binary times this many forward steps by default */
    t->seed = 1;
    t->log_every = 1;
  }
  /* every activation of a rank within MOEC_MAX_ACT_ELEMS: the plan's rule
   * (placement.c), from the same descriptors, reported at `tokens` */
  int64_t row = moert_layer_widest_row(md), act;
  bool over = __builtin_mul_overflow(s->tokens, row, &act);
  if (s->tokens_loc.src && (over || act > MOEC_MAX_ACT_ELEMS)) {
    moec_error(d, s->tokens_loc,
               "`tokens` = %" PRId64 " makes an activation of %s elements on each rank (%" PRId64
               " per token; limit is 2^40); use fewer tokens per rank, or more ranks",
               s->tokens, over ? "more than 2^63" : moec_arena_printf(a, "%" PRId64, act), row);
    return NULL;
  }
  return md;
}
