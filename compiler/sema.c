/* sema.c — checks a parsed .moe file against every rule of docs/LANGUAGE.md
 * and builds the spec with every default filled in (spec.h).
 * Every violation is one diagnostic at the offending token; checking goes on
 * after an error so one run reports them all (up to MOEC_MAX_ERRORS). A block
 * with a syntax error inside gets no missing-key errors, and statements parsed
 * while the parser was resynchronizing are skipped (no cascades). */
#include "spec.h"

#include <inttypes.h>
#include <math.h>
#include <string.h>

#include "names.h"
#include "parse.h"

const char *const moec_dtype_names[] = {
#define DTYPE(k, s) s,
#include "spec.def"
#undef DTYPE
};
const char *const moec_act_names[] = {
#define ACT(k, s) s,
#include "spec.def"
#undef ACT
};
const char *const moec_gate_names[] = {
#define GATE(k, s) s,
#include "spec.def"
#undef GATE
};
const char *const moec_routing_names[] = {
#define ROUTING(k, s) s,
#include "spec.def"
#undef ROUTING
};
const char *const moec_a2a_names[] = {
#define A2A(k, s) s,
#include "spec.def"
#undef A2A
};
const char *const moec_select_names[] = {
#define SELECT(k, s) s,
#include "spec.def"
#undef SELECT
};
const char *const moec_optim_names[] = {
#define OPTIM(k, s) s,
#include "spec.def"
#undef OPTIM
};
const char *const moec_sched_names[] = {
#define SCHED(k, s) s,
#include "spec.def"
#undef SCHED
};
const char *const moec_layer_names[] = {
#define LAYER(k, s, f) s,
#include "spec.def"
#undef LAYER
};
static const char *const bool_names[] = {
#define BOOLEAN(k, s) s,
#include "spec.def"
#undef BOOLEAN
};

typedef enum { FORM_BARE, FORM_NAMED, FORM_BODY, FORM_COUNTED } layer_form;
static const layer_form layer_forms[] = {
#define LAYER(k, s, f) FORM_##f,
#include "spec.def"
#undef LAYER
};

typedef enum {
#define SECTION(k, s) SEC_##k,
#include "spec.def"
#undef SECTION
  SEC__COUNT
} section;
static const char *const section_names[] = {
#define SECTION(k, s) s,
#include "spec.def"
#undef SECTION
};

/* Blocks that hold keys. */
typedef enum { BLK_MODEL, BLK_MOE, BLK_FFN, BLK_ATTENTION, BLK_PARALLEL, BLK_TRAIN, BLK__COUNT } block;
static const char *const block_names[BLK__COUNT] = {"model", "moe", "ffn", "attention", "parallel", "train"};

typedef enum {
  T_INT, T_NUM, T_BOOL, T_STRING, T_DATA, T_RLIST, T_DLIST, T_A2ALIST,
  T_ENUM_DTYPE, T_ENUM_GATE, T_ENUM_ACT, T_ENUM_ROUTING, T_ENUM_SELECT, T_ENUM_OPTIM, T_ENUM_SCHED
} key_type;

typedef enum {
#define KEY(b, n, t) KEY_##b##_##n,
#include "keys.def"
#undef KEY
  KEY__COUNT
} key_id;

static const struct {
  block blk;
  const char *name;
  key_type type;
} keys[KEY__COUNT] = {
#define KEY(b, n, t) {BLK_##b, #n, T_##t},
#include "keys.def"
#undef KEY
};

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))


typedef struct sema {
  moec_arena *a;
  moec_diags *d;
  moec_spec *spec;
  bool syntax_errors;  /* the parser reported something: skip whole-file checks */
  moec_names names;    /* layer names, unique as written */
  const moec_stmt *seen[KEY__COUNT]; /* keys given in the block being checked */
  bool misspelt[KEY__COUNT];         /* suggested for an unknown key, or written without
                                        a value: not reported "missing" too */
} sema;

/* --- small helpers --- */

static const char *q(sema *S, const char *s) { return moec_quote(S->a, s, strlen(s)); }

static const char *src_text(sema *S, moec_loc l) {
  return moec_quote(S->a, l.src->text + l.start, l.end - l.start);
}

/* "relu, gelu, silu or swiglu" */
static const char *alternatives(sema *S, const char *const *names, size_t n) {
  const char *out = "";
  for (size_t i = 0; i < n; i++)
    out = moec_arena_printf(S->a, "%s%s`%s`", out, i == 0 ? "" : i + 1 == n ? " or " : ", ",
                            names[i]);
  return out;
}

static const char *did_you_mean(sema *S, const char *word, const char *const *names, size_t n) {
  const char *s = moec_suggest(word, names, n);
  return s ? moec_arena_printf(S->a, "; did you mean `%s`?", s) : "";
}

/* --- layer names: unique over the whole spec --- */

static void define_name(sema *S, const char *name, moec_loc loc) {
  const moec_loc *first = moec_names_add(&S->names, name, loc);
  if (!first) return;
  moec_error(S->d, loc, "layer name `%s` is defined twice; each layer needs its own name", q(S, name));
  moec_note(S->d, *first, "`%s` was first defined here", q(S, name));
}

/* --- values --- */

/* "an integer", "a name": what a value is, for "must be X, not Y" messages.
 * A decimal is "a decimal": "must be an integer, not a number `64.5`" would
 * read as if 64.5 were not a number. */
static const char *kind_desc(const moec_value *v) {
  return v->kind == MOEC_VAL_NUM ? "a decimal" : moec_value_kind_desc[v->kind];
}

static bool one_value(sema *S, const moec_stmt *it) {
  if (it->nvalues > 1) {
    moec_error(S->d, it->values->next->loc, "`%s` takes one value, not a list", it->word);
    return false;
  }
  return true;
}

static bool want_int(sema *S, const moec_stmt *it, int64_t *out) {
  if (!one_value(S, it)) return false;
  const moec_value *v = it->values;
  if (v->kind != MOEC_VAL_INT) {
    moec_error(S->d, v->loc, "`%s` must be an integer, not %s `%s`", it->word,
               kind_desc(v), src_text(S, v->loc));
    return false;
  }
  *out = v->i;
  return true;
}

static bool want_num(sema *S, const moec_stmt *it, double *out) {
  if (!one_value(S, it)) return false;
  const moec_value *v = it->values;
  if (v->kind != MOEC_VAL_INT && v->kind != MOEC_VAL_NUM) {
    moec_error(S->d, v->loc, "`%s` must be a number, not %s `%s`", it->word,
               kind_desc(v), src_text(S, v->loc));
    return false;
  }
  *out = v->d;
  return true;
}

/* One name among names[0..n): its index, or -1 after an error. */
static int match_name(sema *S, const moec_stmt *it, const moec_value *v, const char *const *names,
                      size_t n) {
  const char *alts = alternatives(S, names, n);
  if (v->kind != MOEC_VAL_IDENT) {
    moec_error(S->d, v->loc, "`%s` must be %s, not %s `%s`", it->word, alts,
               kind_desc(v), src_text(S, v->loc));
    return -1;
  }
  for (size_t i = 0; i < n; i++)
    if (strcmp(v->s, names[i]) == 0) return (int)i;
  moec_error(S->d, v->loc, "`%s` must be %s, not `%s`%s", it->word, alts, src_text(S, v->loc),
             did_you_mean(S, v->s, names, n));
  return -1;
}

static bool want_enum(sema *S, const moec_stmt *it, const char *const *names, size_t n, int *out) {
  if (!one_value(S, it)) return false;
  int k = match_name(S, it, it->values, names, n);
  if (k < 0) return false;
  *out = k;
  return true;
}

static bool want_string(sema *S, const moec_stmt *it, const char **out) {
  if (!one_value(S, it)) return false;
  const moec_value *v = it->values;
  if (v->kind != MOEC_VAL_STRING) {
    moec_error(S->d, v->loc, "`%s` must be a string in double quotes, not %s `%s`", it->word,
               kind_desc(v), src_text(S, v->loc));
    return false;
  }
  if (v->slen == 0 || memchr(v->s, 0, v->slen)) {
    moec_error(S->d, v->loc, "`%s` must not be empty", it->word);
    return false;
  }
  *out = v->s;
  return true;
}

static void positive(sema *S, const moec_stmt *it, int64_t v) {
  if (v <= 0)
    moec_error(S->d, it->values->loc, "`%s` must be positive, not %" PRId64, it->word, v);
}

static void nonneg_i(sema *S, const moec_stmt *it, int64_t v) {
  if (v < 0)
    moec_error(S->d, it->values->loc, "`%s` must not be negative, not %" PRId64, it->word, v);
}

static void positive_d(sema *S, const moec_stmt *it, double v) {
  if (v <= 0)
    moec_error(S->d, it->values->loc, "`%s` must be positive, not %s", it->word,
               src_text(S, it->values->loc));
}

static void nonneg_d(sema *S, const moec_stmt *it, double v) {
  if (v < 0)
    moec_error(S->d, it->values->loc, "`%s` must not be negative, not %s", it->word,
               src_text(S, it->values->loc));
}

/* Reads key k of the block just collected: *present says whether it was given. */
#define GIVEN(k) (S->seen[KEY_##k])

static void get_int(sema *S, key_id k, int64_t *out, int64_t dflt, void (*rule)(sema *, const moec_stmt *, int64_t)) {
  *out = dflt;
  const moec_stmt *it = S->seen[k];
  if (it && want_int(S, it, out) && rule) rule(S, it, *out);
}

static void get_num(sema *S, key_id k, double *out, double dflt, void (*rule)(sema *, const moec_stmt *, double)) {
  *out = dflt;
  const moec_stmt *it = S->seen[k];
  if (it && want_num(S, it, out) && rule) rule(S, it, *out);
}

static int get_enum(sema *S, key_id k, const char *const *names, size_t n, int dflt) {
  int v = dflt;
  const moec_stmt *it = S->seen[k];
  if (it) want_enum(S, it, names, n, &v);
  return v;
}

static bool get_bool(sema *S, key_id k, bool dflt) {
  return get_enum(S, k, bool_names, 2, dflt) != 0;
}

static void require(sema *S, const moec_stmt *blk, key_id k, bool body_error) {
  if (S->seen[k] || S->misspelt[k] || body_error) return;
  moec_loc at = blk->name ? blk->name_loc : blk->word_loc;
  if (blk->name)
    moec_error(S->d, at, "the `%s` block `%s` is missing `%s = ...;`", blk->word, q(S, blk->name),
               keys[k].name);
  else
    moec_error(S->d, at, "the `%s` block is missing `%s = ...;`", blk->word, keys[k].name);
}

/* --- collecting the keys of one block --- */

static void reject_nested(sema *S, const moec_stmt *st, block b) {
  if (st->kind == MOEC_STMT_BARE) {
    /* `bias;`: a key without its value? */
    for (int k = 0; k < KEY__COUNT; k++)
      if (keys[k].blk == b && strcmp(keys[k].name, st->word) == 0) {
        moec_error(S->d, st->word_loc, "`%s` needs a value: `%s = ...;`", st->word, st->word);
        S->misspelt[k] = true; /* meant to be given: not "missing" too */
        return;
      }
  }
  moec_error(S->d, st->word_loc,
             "the `%s` block holds only `key = value;` items; `%s` cannot go here",
             block_names[b], q(S, st->word));
}

/* Records item st of block b in S->seen; reports unknown and repeated keys. */
static void collect_item(sema *S, const moec_stmt *st, block b) {
  const char *names[KEY__COUNT];
  size_t n = 0;
  for (int k = 0; k < KEY__COUNT; k++) {
    if (keys[k].blk != b) continue;
    if (strcmp(keys[k].name, st->word) == 0) {
      if (S->seen[k]) {
        moec_error(S->d, st->word_loc, "`%s` is given twice in the `%s` block", st->word,
                   block_names[b]);
        moec_note(S->d, S->seen[k]->word_loc, "`%s` was first given here", st->word);
      } else {
        S->seen[k] = st;
      }
      return;
    }
    names[n++] = keys[k].name;
  }
  const char *sug = moec_suggest(st->word, names, n);
  if (sug) {
    for (int k = 0; k < KEY__COUNT; k++)
      if (keys[k].blk == b && strcmp(keys[k].name, sug) == 0) S->misspelt[k] = true;
    moec_error(S->d, st->word_loc, "unknown key `%s` in the `%s` block; did you mean `%s`?",
               q(S, st->word), block_names[b], sug);
    return;
  }
  for (int k = 0; k < KEY__COUNT; k++)
    if (strcmp(keys[k].name, st->word) == 0) {
      moec_error(S->d, st->word_loc, "`%s` is a key of the `%s` block, not of the `%s` block",
                 st->word, block_names[keys[k].blk], block_names[b]);
      return;
    }
  moec_error(S->d, st->word_loc, "unknown key `%s` in the `%s` block; its keys are %s",
             q(S, st->word), block_names[b], alternatives(S, names, n));
}

static void collect_keys_only(sema *S, const moec_stmt *body, block b) {
  memset(S->seen, 0, sizeof S->seen);
  memset(S->misspelt, 0, sizeof S->misspelt);
  for (const moec_stmt *st = body; st; st = st->next) {
    if (st->suspect) continue;
    if (st->kind == MOEC_STMT_ITEM) collect_item(S, st, b);
    else reject_nested(S, st, b);
  }
}

/* --- parameters --- */

static int64_t sat_add(int64_t a, int64_t b) {
  int64_t r;
  return __builtin_add_overflow(a, b, &r) ? INT64_MAX : r;
}
static int64_t sat_mul(int64_t a, int64_t b) {
  int64_t r;
  return __builtin_mul_overflow(a, b, &r) ? INT64_MAX : r;
}

int moec_dtype_bytes(moec_dtype t) { return t == MOEC_DTYPE_BF16 ? 2 : 4; }

static int64_t ffn_params(int64_t m, int64_t h, moec_act act, bool bias) {
  int64_t h1 = act == MOEC_ACT_SWIGLU ? sat_mul(2, h) : h;
  int64_t p = sat_add(sat_mul(m, h1), sat_mul(h, m));
  if (bias) p = sat_add(p, sat_add(h1, m));
  return p;
}

int64_t moec_layer_params(const moec_spec *s, const moec_layer *l) {
  int64_t m = s->dim;
  switch (l->kind) {
  case MOEC_LAYER_MOE: {
    const moec_moe *e = &l->moe;
    int64_t gate = e->gate == MOEC_GATE_COSINE
                       ? sat_add(sat_add(sat_mul(m, MOEC_COSINE_PROJ), MOEC_COSINE_PROJ),
                                 sat_add(sat_mul(MOEC_COSINE_PROJ, e->experts), 1))
                       : sat_mul(m, e->experts);
    if (e->gate == MOEC_GATE_SIGMOID) gate = sat_add(gate, e->experts); /* gate_bias */
    int64_t p = sat_add(gate, sat_mul(e->experts, ffn_params(m, e->hidden, e->act, e->bias)));
    if (e->shared_experts > 0) /* one dense FFN of shared_experts * hidden */
      p = sat_add(p, ffn_params(m, sat_mul(e->shared_experts, e->hidden), e->act, e->bias));
    return p;
  }
  case MOEC_LAYER_FFN: return ffn_params(m, l->ffn.hidden, l->ffn.act, true);
  case MOEC_LAYER_ATTENTION: { /* runtime/layers/attention.c's slots */
    const moec_attention *at = &l->attn;
    int64_t qkv = sat_mul(sat_add(at->heads, sat_mul(2, at->kv_heads)), at->head_dim);
    int64_t o = sat_mul(at->heads, at->head_dim);
    int64_t p = sat_add(sat_mul(m, qkv), sat_mul(o, m));
    return at->bias ? sat_add(p, sat_add(qkv, m)) : p;
  }
  case MOEC_LAYER_LAYERNORM: return sat_mul(2, m);
  case MOEC_LAYER_RMSNORM: return m;
  case MOEC_LAYER_RESIDUAL:
  case MOEC_LAYER_REPEAT: {
    int64_t p = 0;
    for (const moec_layer *c = l->body; c; c = c->next) p = sat_add(p, moec_layer_params(s, c));
    return l->kind == MOEC_LAYER_REPEAT ? sat_mul(p, l->count) : p;
  }
  case MOEC_LAYER__COUNT: break;
  }
  return 0;
}

static int64_t io_params(const moec_spec *s) {
  if (!s->vocab) return 0;
  return sat_add(sat_mul(sat_mul(s->context, s->vocab), s->dim), sat_mul(s->dim, s->vocab));
}

int64_t moec_spec_params(const moec_spec *s) {
  int64_t p = io_params(s);
  for (const moec_layer *l = s->layers; l; l = l->next) p = sat_add(p, moec_layer_params(s, l));
  return p;
}

/* Leaf layers (moe, ffn, norms) after expanding repeats. */
static int64_t leaf_count(const moec_layer *l) {
  if (l->kind != MOEC_LAYER_RESIDUAL && l->kind != MOEC_LAYER_REPEAT) return 1;
  int64_t n = 0;
  for (const moec_layer *c = l->body; c; c = c->next) n = sat_add(n, leaf_count(c));
  return l->kind == MOEC_LAYER_REPEAT ? sat_mul(n, l->count) : n;
}

/* Finds, in expansion order, the leaf layer at which the running parameter
 * count first exceeds *budget; reports it and returns true. */
static bool find_param_crossing(sema *S, const moec_layer *list, int64_t *budget) {
  for (const moec_layer *l = list; l; l = l->next) {
    int64_t p = moec_layer_params(S->spec, l);
    if (p <= *budget) {
      *budget -= p;
      continue;
    }
    if (l->kind == MOEC_LAYER_RESIDUAL || l->kind == MOEC_LAYER_REPEAT) {
      if (l->kind == MOEC_LAYER_REPEAT) {
        int64_t once = 0;
        for (const moec_layer *c = l->body; c; c = c->next)
          once = sat_add(once, moec_layer_params(S->spec, c));
        if (once > 0) *budget -= (*budget / once) * once; /* whole copies that fit */
      }
      if (find_param_crossing(S, l->body, budget)) return true;
    }
    int64_t bytes = moec_dtype_bytes(S->spec->dtype);
    moec_error(S->d, l->loc,
               "the model's parameters pass %" PRId64 " bytes (2^40) at this layer, at %d bytes "
               "per %s parameter; make the model smaller",
               MOEC_MAX_PARAM_BYTES, (int)bytes, moec_dtype_names[S->spec->dtype]);
    return true;
  }
  return false;
}

/* --- layers --- */

static moec_layer *check_layers(sema *S, const moec_stmt *body, const char *parent);

/* The rules of today's routers (docs/LANGUAGE.md, "Routing of today's
 * models"): the sigmoid gate's balancing, group-limited routing and expert
 * choice. Each is reported at the value that breaks it, and only when the
 * values it relates are valid themselves (their own errors are reported
 * already). */
static void check_routing(sema *S, moec_moe *e) {
  bool ec = e->routing == MOEC_ROUTING_EXPERT_CHOICE;
  const moec_stmt *it;
  if ((it = GIVEN(MOE_bias_update)) && e->bias_update > 0) {
    if (ec)
      moec_error(S->d, it->values->loc,
                 "`bias_update = %s` balances token choice (it steers the experts tokens pick), "
                 "but this layer has `routing = expert_choice`, where every expert takes the same "
                 "number of tokens; remove `bias_update`",
                 src_text(S, it->values->loc));
    else if (e->gate != MOEC_GATE_SIGMOID)
      moec_error(S->d, it->values->loc,
                 "`bias_update = %s` moves the bias of a `sigmoid` gate, but this layer's gate is "
                 "`%s`; set `gate = sigmoid` or remove `bias_update`",
                 src_text(S, it->values->loc), moec_gate_names[e->gate]);
  }
  bool groups_ok = e->groups > 0, top_groups_ok = e->top_groups > 0;
  if ((it = GIVEN(MOE_groups)) && ec && e->groups > 1) {
    moec_error(S->d, it->values->loc,
               "`groups = %" PRId64 "` limits the groups each token routes to, a rule of token "
               "choice, but this layer has `routing = expert_choice`; remove `groups` and "
               "`top_groups`, or use `routing = token_choice`",
               e->groups);
    groups_ok = false;
  } else if (it && groups_ok && e->groups > MOEC_MAX_GROUPS) {
    moec_error(S->d, it->values->loc,
               "too many expert groups: %" PRId64 " (limit is %d); group the experts more coarsely",
               e->groups, MOEC_MAX_GROUPS);
    groups_ok = false;
  } else if (it && groups_ok && GIVEN(MOE_experts) && e->experts > 0 && e->experts % e->groups) {
    moec_error(S->d, it->values->loc,
               "`groups` (%" PRId64 ") must divide `experts` (%" PRId64 "): each group holds the "
               "same number of experts; choose a divisor of %" PRId64,
               e->groups, e->experts, e->experts);
    groups_ok = false;
  }
  if ((it = GIVEN(MOE_top_groups)) && groups_ok && top_groups_ok && e->top_groups > e->groups) {
    moec_error(S->d, it->values->loc,
               "`top_groups` is %" PRId64 " but the layer has only %" PRId64 " group%s; "
               "top_groups must be at most `groups`",
               e->top_groups, e->groups, e->groups == 1 ? "" : "s");
    top_groups_ok = false;
  }
  if (groups_ok && top_groups_ok && e->groups > 1 && GIVEN(MOE_top_k) && GIVEN(MOE_experts) &&
      e->experts > 0 && e->top_k > 0 && e->top_k <= e->experts &&
      e->top_k > e->top_groups * (e->experts / e->groups))
    moec_error(S->d, GIVEN(MOE_top_k)->values->loc,
               "`top_k` is %" PRId64 " but a token routes within %" PRId64 " of the %" PRId64
               " groups, which hold only %" PRId64 " experts (`top_groups` * `experts` / "
               "`groups`); lower `top_k` or raise `top_groups`",
               e->top_k, e->top_groups, e->groups, e->top_groups * (e->experts / e->groups));
  if (!ec) return;
  if ((it = GIVEN(MOE_capacity_factor)) && e->capacity_factor <= 0)
    moec_error(S->d, it->values->loc,
               "`capacity_factor = %s` (%s) cannot go with `routing = expert_choice`: each expert "
               "takes C tokens of each source rank, and C comes from a fixed factor; use a "
               "`capacity_factor` above 0, such as 1.0",
               src_text(S, it->values->loc), e->capacity_factor == 0 ? "dropless" : "dynamic");
  if ((it = GIVEN(MOE_batch_prioritized)) && e->batch_prioritized)
    moec_error(S->d, it->values->loc,
               "`batch_prioritized = true` means nothing with `routing = expert_choice`: each "
               "expert takes its best-scored tokens, whatever their order; remove it");
  if ((it = GIVEN(MOE_normalize_gate)) && e->normalize_gate)
    moec_warning(S->d, it->values->loc,
                 "`normalize_gate = true` has no effect with `routing = expert_choice`: expert "
                 "choice does not normalize its combine weights (a token's weights are its scores "
                 "for the experts that took it); remove it");
  e->normalize_gate = false;
  if ((it = GIVEN(MOE_aux_loss)) && e->aux_loss > 0)
    moec_warning(S->d, it->values->loc,
                 "`aux_loss = %s` with `routing = expert_choice`: each expert takes the same "
                 "number of tokens, so the load is balanced already; remove it (it defaults to 0 "
                 "here) or set it to 0",
                 src_text(S, it->values->loc));
}

static void check_moe(sema *S, const moec_stmt *st, moec_layer *l) {
  collect_keys_only(S, st->body, BLK_MOE);
  moec_moe *e = &l->moe;
  get_int(S, KEY_MOE_experts, &e->experts, 1, positive);
  get_int(S, KEY_MOE_hidden, &e->hidden, 1, positive);
  get_int(S, KEY_MOE_top_k, &e->top_k, 1, positive);
  get_num(S, KEY_MOE_capacity_factor, &e->capacity_factor, 1.0, NULL);
  e->gate = (moec_gate)get_enum(S, KEY_MOE_gate, moec_gate_names, MOEC_GATE__COUNT, MOEC_GATE_SOFTMAX);
  e->act = (moec_act)get_enum(S, KEY_MOE_activation, moec_act_names, MOEC_ACT__COUNT, MOEC_ACT_RELU);
  e->routing = (moec_routing)get_enum(S, KEY_MOE_routing, moec_routing_names, MOEC_ROUTING__COUNT,
                                      MOEC_ROUTING_TOKEN_CHOICE);
  /* the sigmoid gate balances with its bias, expert choice by construction */
  bool balanced = e->gate == MOEC_GATE_SIGMOID || e->routing == MOEC_ROUTING_EXPERT_CHOICE;
  get_num(S, KEY_MOE_aux_loss, &e->aux_loss, balanced ? 0.0 : 0.01, nonneg_d);
  e->bias = get_bool(S, KEY_MOE_bias, true);
  e->batch_prioritized = get_bool(S, KEY_MOE_batch_prioritized, false);
  get_num(S, KEY_MOE_gate_noise, &e->gate_noise, 0.0, nonneg_d);
  e->normalize_gate = get_bool(S, KEY_MOE_normalize_gate, e->top_k > 1);
  get_num(S, KEY_MOE_route_scale, &e->route_scale, 1.0, positive_d);
  get_num(S, KEY_MOE_bias_update, &e->bias_update, 0.0, nonneg_d);
  get_int(S, KEY_MOE_groups, &e->groups, 1, positive);
  get_int(S, KEY_MOE_top_groups, &e->top_groups, 1, positive);
  get_num(S, KEY_MOE_z_loss, &e->z_loss, 0.0, nonneg_d);
  get_int(S, KEY_MOE_shared_experts, &e->shared_experts, 0, nonneg_i);
  require(S, st, KEY_MOE_experts, st->body_error);
  require(S, st, KEY_MOE_hidden, st->body_error);
  require(S, st, KEY_MOE_top_k, st->body_error);
  if (GIVEN(MOE_experts) && e->experts > MOEC_MAX_EXPERTS)
    moec_error(S->d, GIVEN(MOE_experts)->values->loc,
               "too many experts: %" PRId64 " (limit is %d)", e->experts, MOEC_MAX_EXPERTS);
  if (GIVEN(MOE_shared_experts) && e->shared_experts > MOEC_MAX_EXPERTS)
    moec_error(S->d, GIVEN(MOE_shared_experts)->values->loc,
               "too many shared experts: %" PRId64 " (limit is %d)", e->shared_experts,
               MOEC_MAX_EXPERTS);
  if (GIVEN(MOE_top_k) && GIVEN(MOE_experts) && e->experts > 0 && e->top_k > e->experts)
    moec_error(S->d, GIVEN(MOE_top_k)->values->loc,
               "`top_k` is %" PRId64 " but the layer has only %" PRId64
               " experts; top_k must be at most `experts`",
               e->top_k, e->experts);
  check_routing(S, e);
  if (GIVEN(MOE_capacity_factor) && e->capacity_factor > 0 && e->capacity_factor < 1 &&
      e->top_k == 1 && e->routing == MOEC_ROUTING_TOKEN_CHOICE)
    moec_warning(S->d, GIVEN(MOE_capacity_factor)->values->loc,
                 "`capacity_factor` below 1 with `top_k = 1` drops tokens even when the load is "
                 "perfectly balanced; use 1.0 or more, or 0 for dropless");
  if (GIVEN(MOE_hidden) && e->hidden > 0 && e->hidden % 64)
    moec_warning(S->d, GIVEN(MOE_hidden)->values->loc,
                 "`hidden = %" PRId64 "` is not a multiple of 64; the expert GEMMs will run "
                 "below the GPU's speed",
                 e->hidden);
  /* the model's parameter count, checked next, counts no shared experts
   * already reported */
  if (e->shared_experts < 0 || e->shared_experts > MOEC_MAX_EXPERTS) e->shared_experts = 0;
}

static void check_ffn(sema *S, const moec_stmt *st, moec_layer *l) {
  collect_keys_only(S, st->body, BLK_FFN);
  get_int(S, KEY_FFN_hidden, &l->ffn.hidden, 1, positive);
  l->ffn.act = (moec_act)get_enum(S, KEY_FFN_activation, moec_act_names, MOEC_ACT__COUNT, MOEC_ACT_RELU);
  require(S, st, KEY_FFN_hidden, st->body_error);
  if (GIVEN(FFN_hidden) && l->ffn.hidden > 0 && l->ffn.hidden % 64)
    moec_warning(S->d, GIVEN(FFN_hidden)->values->loc,
                 "`hidden = %" PRId64 "` is not a multiple of 64; the GEMMs will run below the "
                 "GPU's speed",
                 l->ffn.hidden);
}

/* The keys of one `attention` layer; the rules that need `dim` (the default
 * head_dim) wait for the model's keys (finish_attention). */
static void check_attention(sema *S, const moec_stmt *st, moec_layer *l) {
  collect_keys_only(S, st->body, BLK_ATTENTION);
  moec_attention *at = &l->attn;
  /* heads_loc stays unset unless `heads` is valid: the rules that follow
   * from it (kv_heads divides it, the default head_dim) then stay quiet */
  const moec_stmt *h = GIVEN(ATTENTION_heads);
  get_int(S, KEY_ATTENTION_heads, &at->heads, 1, positive);
  bool read = h && h->nvalues == 1 && h->values->kind == MOEC_VAL_INT;
  if (read && at->heads > MOEC_MAX_HEADS)
    moec_error(S->d, h->values->loc, "too many heads: %" PRId64 " (limit is %d)", at->heads,
               MOEC_MAX_HEADS);
  else if (read && at->heads > 0)
    at->heads_loc = h->values->loc;
  if (!at->heads_loc.src) at->heads = 1;
  get_int(S, KEY_ATTENTION_kv_heads, &at->kv_heads, at->heads, positive);
  if (at->kv_heads <= 0) at->kv_heads = at->heads;
  get_int(S, KEY_ATTENTION_head_dim, &at->head_dim, 0, positive);
  at->head_dim_given = GIVEN(ATTENTION_head_dim) != NULL;
  at->causal = get_bool(S, KEY_ATTENTION_causal, true);
  get_num(S, KEY_ATTENTION_rope, &at->rope, 10000.0, nonneg_d);
  at->bias = get_bool(S, KEY_ATTENTION_bias, false);
  require(S, st, KEY_ATTENTION_heads, st->body_error);
  if (GIVEN(ATTENTION_kv_heads) && at->heads_loc.src && at->kv_heads > 0 && at->heads % at->kv_heads)
    moec_error(S->d, GIVEN(ATTENTION_kv_heads)->values->loc,
               "`kv_heads` (%" PRId64 ") must divide `heads` (%" PRId64 "): each key/value head "
               "serves the same number of query heads",
               at->kv_heads, at->heads);
  if (at->heads % at->kv_heads) at->kv_heads = at->heads;
  if (at->head_dim_given && at->head_dim > 0 &&
      (at->head_dim % MOEC_HEAD_DIM_ALIGN || at->head_dim > MOEC_MAX_HEAD_DIM))
    moec_error(S->d, GIVEN(ATTENTION_head_dim)->values->loc,
               "`head_dim` must be a multiple of %d and at most %d, not %" PRId64,
               MOEC_HEAD_DIM_ALIGN, MOEC_MAX_HEAD_DIM, at->head_dim);
  if (at->head_dim_given && (at->head_dim <= 0 || at->head_dim % MOEC_HEAD_DIM_ALIGN ||
                             at->head_dim > MOEC_MAX_HEAD_DIM))
    at->head_dim = MOEC_HEAD_DIM_ALIGN;
}

/* The default head_dim (dim / heads) of every attention layer in the list,
 * once `dim` is known; reported at `heads` (or at the layer when `heads` was
 * not given: its missing key was reported already). Returns whether the list
 * holds an attention layer. */
static bool finish_attention(sema *S, moec_layer *l, bool dim_ok) {
  bool any = false;
  for (; l; l = l->next) {
    if (l->kind == MOEC_LAYER_RESIDUAL || l->kind == MOEC_LAYER_REPEAT) {
      any |= finish_attention(S, l->body, dim_ok);
      continue;
    }
    if (l->kind != MOEC_LAYER_ATTENTION) continue;
    any = true;
    moec_attention *at = &l->attn;
    if (at->head_dim_given) continue;
    int64_t m = S->spec->dim;
    at->head_dim = m / at->heads;
    if (!dim_ok || !at->heads_loc.src) {
      if (at->head_dim <= 0) at->head_dim = MOEC_HEAD_DIM_ALIGN;
      continue;
    }
    if (m % at->heads)
      moec_error(S->d, at->heads_loc,
                 "`head_dim` defaults to `dim` / `heads`, but %" PRId64 " / %" PRId64 " is not whole; "
                 "choose `heads` that divides `dim`, or give `head_dim = ...;`",
                 m, at->heads);
    else if (at->head_dim % MOEC_HEAD_DIM_ALIGN || at->head_dim > MOEC_MAX_HEAD_DIM)
      moec_error(S->d, at->heads_loc,
                 "`head_dim` defaults to `dim` / `heads` = %" PRId64 ", but it must be a multiple of "
                 "%d and at most %d; change `heads`, or give `head_dim = ...;`",
                 at->head_dim, MOEC_HEAD_DIM_ALIGN, MOEC_MAX_HEAD_DIM);
    if (at->head_dim <= 0 || at->head_dim % MOEC_HEAD_DIM_ALIGN || at->head_dim > MOEC_MAX_HEAD_DIM)
      at->head_dim = MOEC_HEAD_DIM_ALIGN;
  }
  return any;
}

/* One statement inside `model`, `residual` or `repeat` (the parent's keyword)
 * as a layer; NULL if it is not one (after a diagnostic). */
static moec_layer *check_layer(sema *S, const moec_stmt *st, const char *parent) {
  int kind = -1;
  for (int k = 0; k < MOEC_LAYER__COUNT; k++)
    if (strcmp(moec_layer_names[k], st->word) == 0) kind = k;
  if (kind < 0) {
    if (st->kind == MOEC_STMT_ITEM) {
      moec_error(S->d, st->word_loc,
                 "the `%s` block holds layers only; `%s = ...;` cannot go here",
                 parent, q(S, st->word));
      return NULL;
    }
    for (int k = 0; k < SEC__COUNT; k++)
      if (strcmp(section_names[k], st->word) == 0) {
        /* most often the `}` of the model was forgotten above it */
        moec_error(S->d, st->word_loc,
                   "a `%s` block cannot go inside the `%s` block; is a `}` missing before it?",
                   section_names[k], parent);
        return NULL;
      }
    moec_error(S->d, st->word_loc, "unknown layer `%s`%s", q(S, st->word),
               did_you_mean(S, st->word, moec_layer_names, MOEC_LAYER__COUNT));
    if (!moec_suggest(st->word, moec_layer_names, MOEC_LAYER__COUNT))
      moec_note(S->d, st->word_loc, "the layers are %s",
                alternatives(S, moec_layer_names, MOEC_LAYER__COUNT));
    return NULL;
  }
  const char *kw = moec_layer_names[kind];
  layer_form form = layer_forms[kind];
  if (st->kind == MOEC_STMT_ITEM) {
    moec_error(S->d, st->word_loc, "`%s` is a layer, not a key; write %s", kw,
               form == FORM_BARE ? moec_arena_printf(S->a, "`%s;`", kw)
               : form == FORM_NAMED ? moec_arena_printf(S->a, "`%s NAME { ... }`", kw)
               : form == FORM_COUNTED ? "`repeat N { ... }`" : "`residual { ... }`");
    return NULL;
  }
  if (form == FORM_BARE && st->kind != MOEC_STMT_BARE) {
    moec_error(S->d, st->word_loc, "`%s` takes no name or block; write `%s;`", kw, kw);
    return NULL;
  }
  if (form != FORM_BARE && st->kind == MOEC_STMT_BARE) {
    moec_error(S->d, st->word_loc, "`%s` needs a block: %s", kw,
               form == FORM_NAMED ? moec_arena_printf(S->a, "`%s NAME { ... }`", kw)
               : form == FORM_COUNTED ? "`repeat N { ... }`" : "`residual { ... }`");
    return NULL;
  }
  if (form == FORM_NAMED && !st->name) {
    moec_error(S->d, st->has_count ? st->count_loc : st->word_loc,
               "`%s` needs a name: `%s NAME { ... }`", kw, kw);
    return NULL;
  }
  if (form == FORM_COUNTED && !st->has_count) {
    moec_error(S->d, st->name ? st->name_loc : st->word_loc, "`repeat` needs a count: `repeat N { ... }`");
    return NULL;
  }
  if (form == FORM_COUNTED && !st->count_is_int) {
    moec_error(S->d, st->count_loc, "the count of `repeat` must be an integer, not `%s`",
               src_text(S, st->count_loc));
    return NULL;
  }
  if (form == FORM_BODY && (st->name || st->has_count)) {
    moec_error(S->d, st->name ? st->name_loc : st->count_loc, "`%s` takes no name or count", kw);
    return NULL;
  }

  moec_layer *l = MOEC_NEW(S->a, moec_layer);
  l->kind = (moec_layer_kind)kind;
  l->loc = st->word_loc;
  switch (l->kind) {
  case MOEC_LAYER_MOE:
    l->name = st->name;
    define_name(S, st->name, st->name_loc);
    check_moe(S, st, l);
    break;
  case MOEC_LAYER_FFN:
    l->name = st->name;
    define_name(S, st->name, st->name_loc);
    check_ffn(S, st, l);
    break;
  case MOEC_LAYER_ATTENTION:
    l->name = st->name;
    define_name(S, st->name, st->name_loc);
    check_attention(S, st, l);
    break;
  case MOEC_LAYER_REPEAT:
    l->count = st->count;
    if (st->count <= 0)
      moec_error(S->d, st->count_loc, "the `repeat` count must be positive, not %" PRId64, st->count);
    else if (st->count > MOEC_MAX_REPEAT)
      moec_error(S->d, st->count_loc, "the `repeat` count is %" PRId64 " (limit is %d)", st->count,
                 MOEC_MAX_REPEAT);
    if (st->count <= 0 || st->count > MOEC_MAX_REPEAT) l->count = 1;
    /* fallthrough */
  case MOEC_LAYER_RESIDUAL:
    l->body = check_layers(S, st->body, kw);
    if (!l->body && !st->body_error && !st->body) /* not when what it held was reported */
      moec_error(S->d, st->word_loc, "the `%s` block is empty; it needs at least one layer", kw);
    break;
  default: break;
  }
  return l;
}

static moec_layer *check_layers(sema *S, const moec_stmt *body, const char *parent) {
  moec_layer *head = NULL, *tail = NULL;
  for (const moec_stmt *st = body; st; st = st->next) {
    if (st->suspect) continue;
    moec_layer *l = check_layer(S, st, parent);
    if (!l) continue;
    if (tail) tail->next = l; else head = l;
    tail = l;
  }
  return head;
}

/* --- the sections --- */

static void check_model(sema *S, const moec_stmt *st) {
  moec_spec *s = S->spec;
  s->name = st->name;
  s->loc = st->name_loc;
  /* layers first (they reuse S->seen), then the model's own keys */
  moec_layer *head = NULL, *tail = NULL;
  const moec_stmt *items[KEY__COUNT] = {0};
  bool misspelt[KEY__COUNT] = {0};
  bool tried_layers = false; /* a statement meant as a layer, even a wrong one */
  for (const moec_stmt *x = st->body; x; x = x->next) {
    if (x->suspect) continue;
    if (x->kind == MOEC_STMT_ITEM) {
      bool is_layer = false;
      for (int k = 0; k < MOEC_LAYER__COUNT; k++) is_layer |= strcmp(moec_layer_names[k], x->word) == 0;
      if (!is_layer) {
        memcpy(S->seen, items, sizeof items);
        memcpy(S->misspelt, misspelt, sizeof misspelt);
        collect_item(S, x, BLK_MODEL);
        memcpy(items, S->seen, sizeof items);
        memcpy(misspelt, S->misspelt, sizeof misspelt);
        continue;
      }
    }
    if (x->kind == MOEC_STMT_BARE) {
      int key = -1;
      for (int k = 0; k < KEY__COUNT; k++)
        if (keys[k].blk == BLK_MODEL && strcmp(keys[k].name, x->word) == 0) key = k;
      if (key >= 0) {
        moec_error(S->d, x->word_loc, "`%s` needs a value: `%s = ...;`", x->word, x->word);
        misspelt[key] = true; /* meant to be given: not "missing" too */
        continue;
      }
    }
    tried_layers = true;
    moec_layer *l = check_layer(S, x, "model");
    if (!l) continue;
    if (tail) tail->next = l; else head = l;
    tail = l;
  }
  s->layers = head;
  memcpy(S->seen, items, sizeof items);
  memcpy(S->misspelt, misspelt, sizeof misspelt);
  get_int(S, KEY_MODEL_dim, &s->dim, 2, positive);
  get_int(S, KEY_MODEL_tokens, &s->tokens, 1, positive);
  if (GIVEN(MODEL_tokens)) {
    s->tokens_loc = GIVEN(MODEL_tokens)->values->loc;
    if (s->tokens > MOEC_MAX_TOKENS) {
      moec_error(S->d, s->tokens_loc, "`tokens` is %" PRId64 " (limit is %d: token indices are 32-bit)",
                 s->tokens, MOEC_MAX_TOKENS);
      s->tokens = 1;
    }
  }
  s->dtype = (moec_dtype)get_enum(S, KEY_MODEL_dtype, moec_dtype_names, MOEC_DTYPE__COUNT, MOEC_DTYPE_BF16);
  get_int(S, KEY_MODEL_vocab, &s->vocab, 0, positive);
  get_int(S, KEY_MODEL_context, &s->context, 1, positive);
  require(S, st, KEY_MODEL_dim, st->body_error);
  require(S, st, KEY_MODEL_tokens, st->body_error);
  if (GIVEN(MODEL_dim) && s->dim > 0 && s->dim % 2)
    moec_error(S->d, GIVEN(MODEL_dim)->values->loc,
               "`dim` must be even, not %" PRId64 " (kernels move activations in pairs)", s->dim);
  if (GIVEN(MODEL_context) && !GIVEN(MODEL_vocab) && !S->misspelt[KEY_MODEL_vocab])
    moec_error(S->d, GIVEN(MODEL_context)->word_loc,
               "`context` needs `vocab`: it is the window of token embeddings");
  else if (GIVEN(MODEL_context) && s->context > MOEC_MAX_CONTEXT)
    moec_error(S->d, GIVEN(MODEL_context)->values->loc,
               "`context` is %" PRId64 " (limit is %d)", s->context, MOEC_MAX_CONTEXT);
  get_int(S, KEY_MODEL_seq, &s->seq, 0, positive);
  if (GIVEN(MODEL_seq) && !GIVEN(MODEL_vocab) && !S->misspelt[KEY_MODEL_vocab])
    moec_error(S->d, GIVEN(MODEL_seq)->word_loc,
               "`seq` needs `vocab`: it cuts the token stream into sequences");
  else if (GIVEN(MODEL_seq) && s->seq > 0 && GIVEN(MODEL_tokens) && s->tokens > 0 && s->tokens % s->seq)
    moec_error(S->d, s->tokens_loc,
               "`tokens` (%" PRId64 ") must be a whole number of sequences of `seq` = %" PRId64
               "; make `tokens` a multiple of %" PRId64,
               s->tokens, s->seq, s->seq);
  bool dim_ok = GIVEN(MODEL_dim) && s->dim > 0 && s->dim % 2 == 0;
  if (s->dim <= 0) s->dim = 2;
  if (s->vocab < 0) s->vocab = 0;
  if (s->context <= 0 || s->context > MOEC_MAX_CONTEXT) s->context = 1;
  if (s->seq < 0) s->seq = 0;
  if (finish_attention(S, s->layers, dim_ok) && !GIVEN(MODEL_seq) && !S->misspelt[KEY_MODEL_seq] &&
      !st->body_error) {
    moec_error(S->d, st->name_loc,
               "the model has attention, so the `model` block `%s` is missing `seq = ...;` "
               "(the length of the sequences attention sees)", q(S, st->name));
  }
  if (!tried_layers && !st->body_error)
    moec_warning(S->d, st->name_loc, "the model has no layers; add `moe`, `ffn` or other layers");
}

static void listed_twice(sema *S, const moec_stmt *it, const moec_value *v) {
  moec_warning(S->d, v->loc, "`%s` is listed twice in `%s`; the repeat is ignored",
               src_text(S, v->loc), it->word);
}

static void check_parallel(sema *S, const moec_stmt *st) {
  moec_parallel *p = &S->spec->parallel;
  collect_keys_only(S, st->body, BLK_PARALLEL);
  const moec_stmt *it;
  if ((it = GIVEN(PARALLEL_adaptive_r))) {
    p->r_auto = false;
    p->nr = 0;
    for (const moec_value *v = it->values; v; v = v->next) {
      if (v->kind == MOEC_VAL_IDENT && strcmp(v->s, "auto") == 0) {
        if (p->r_auto) {
          listed_twice(S, it, v);
          continue;
        }
        p->r_auto = true;
        if (p->nr < MOEC_MAX_CANDIDATES) p->r[p->nr++] = MOEC_R_AUTO; /* keeps its place */
        continue;
      }
      if (v->kind != MOEC_VAL_INT || v->i < 0) {
        moec_error(S->d, v->loc, "`adaptive_r` values must be `auto` or integers of 0 or more, not `%s`",
                   src_text(S, v->loc));
        continue;
      }
      bool dup = false;
      for (int i = 0; i < p->nr; i++) dup |= p->r[i] == v->i;
      if (dup) { listed_twice(S, it, v); continue; }
      if (p->nr == MOEC_MAX_CANDIDATES) {
        moec_error(S->d, v->loc, "too many `adaptive_r` values (limit is %d)", MOEC_MAX_CANDIDATES);
        break;
      }
      p->r[p->nr++] = v->i;
    }
  }
  if ((it = GIVEN(PARALLEL_overlap_degree))) {
    p->ndegrees = 0;
    for (const moec_value *v = it->values; v; v = v->next) {
      if (v->kind != MOEC_VAL_INT || (v->i != 1 && v->i != 2 && v->i != 4 && v->i != 8)) {
        moec_error(S->d, v->loc, "`overlap_degree` values must be 1, 2, 4 or 8, not `%s`",
                   src_text(S, v->loc));
        continue;
      }
      bool dup = false;
      for (int i = 0; i < p->ndegrees; i++) dup |= p->degrees[i] == v->i;
      if (dup) { listed_twice(S, it, v); continue; }
      p->degrees[p->ndegrees++] = v->i;
    }
  }
  if ((it = GIVEN(PARALLEL_all_to_all))) {
    p->na2a = 0;
    for (const moec_value *v = it->values; v; v = v->next) {
      int k = match_name(S, it, v, moec_a2a_names, MOEC_A2A__COUNT);
      if (k < 0) continue;
      bool dup = false;
      for (int i = 0; i < p->na2a; i++) dup |= p->a2a[i] == (moec_a2a)k;
      if (dup) { listed_twice(S, it, v); continue; }
      p->a2a[p->na2a++] = (moec_a2a)k;
    }
  }
  p->select = (moec_select)get_enum(S, KEY_PARALLEL_select, moec_select_names, MOEC_SELECT__COUNT, p->select);
  get_int(S, KEY_PARALLEL_explore_steps, &p->explore_steps, 3, positive);
}

static void check_data(sema *S, const moec_stmt *it, moec_train *t) {
  if (!one_value(S, it)) return;
  const moec_value *v = it->values;
  if (v->kind == MOEC_VAL_IDENT && strcmp(v->s, "synthetic") == 0) {
    t->data = MOEC_DATA_SYNTHETIC;
    return;
  }
  if (v->kind == MOEC_VAL_CALL && strcmp(v->s, "bytes") == 0) {
    if (!v->args || v->args->next || v->args->kind != MOEC_VAL_STRING) {
      moec_error(S->d, v->loc, "`bytes` takes one file path in double quotes: `bytes(\"path\")`");
      return;
    }
    if (v->args->slen == 0 || memchr(v->args->s, 0, v->args->slen)) {
      moec_error(S->d, v->args->loc, "the path of `bytes(...)` must not be empty");
      return;
    }
    t->data = MOEC_DATA_BYTES;
    t->data_path = v->args->s;
    return;
  }
  static const char *const forms[] = {"synthetic", "bytes"};
  const char *word = v->kind == MOEC_VAL_IDENT || v->kind == MOEC_VAL_CALL ? v->s : "";
  moec_error(S->d, v->loc, "`data` must be `synthetic` or `bytes(\"path\")`, not `%s`%s",
             src_text(S, v->loc), did_you_mean(S, word, forms, 2));
}

static void unit_interval(sema *S, const moec_stmt *it, double v) {
  if (v < 0 || v >= 1)
    moec_error(S->d, it->values->loc, "`%s` must be at least 0 and below 1, not %s", it->word,
               src_text(S, it->values->loc));
}

static void check_train(sema *S, const moec_stmt *st) {
  moec_train *t = &S->spec->train;
  S->spec->has_train = true;
  collect_keys_only(S, st->body, BLK_TRAIN);
  get_int(S, KEY_TRAIN_steps, &t->steps, 100, positive);
  get_int(S, KEY_TRAIN_seed, &t->seed, 1, nonneg_i);
  t->optimizer = (moec_optim)get_enum(S, KEY_TRAIN_optimizer, moec_optim_names, MOEC_OPTIM__COUNT, MOEC_OPTIM_ADAM);
  get_num(S, KEY_TRAIN_lr, &t->lr, 1e-3, nonneg_d);
  get_num(S, KEY_TRAIN_beta1, &t->beta1, 0.9, unit_interval);
  get_num(S, KEY_TRAIN_beta2, &t->beta2, 0.999, unit_interval);
  get_num(S, KEY_TRAIN_eps, &t->eps, 1e-8, positive_d);
  get_num(S, KEY_TRAIN_weight_decay, &t->weight_decay, 0, nonneg_d);
  get_int(S, KEY_TRAIN_warmup, &t->warmup, 0, nonneg_i);
  t->schedule = (moec_sched)get_enum(S, KEY_TRAIN_schedule, moec_sched_names, MOEC_SCHED__COUNT, MOEC_SCHED_CONSTANT);
  get_num(S, KEY_TRAIN_clip, &t->clip, 0, nonneg_d);
  t->data = MOEC_DATA_SYNTHETIC;
  if (GIVEN(TRAIN_data)) check_data(S, GIVEN(TRAIN_data), t);
  get_int(S, KEY_TRAIN_eval_every, &t->eval_every, 0, nonneg_i);
  if (GIVEN(TRAIN_checkpoint)) want_string(S, GIVEN(TRAIN_checkpoint), &t->checkpoint);
  get_int(S, KEY_TRAIN_checkpoint_every, &t->checkpoint_every, 0, nonneg_i);
  get_int(S, KEY_TRAIN_log_every, &t->log_every, 10, positive);
  get_num(S, KEY_TRAIN_label_smoothing, &t->label_smoothing, 0, unit_interval);
  if (GIVEN(TRAIN_label_smoothing)) S->spec->smoothing_loc = GIVEN(TRAIN_label_smoothing)->values->loc;
  if (t->label_smoothing < 0 || t->label_smoothing >= 1) t->label_smoothing = 0;
  if (GIVEN(TRAIN_checkpoint_every) && t->checkpoint_every > 0 && !GIVEN(TRAIN_checkpoint))
    moec_warning(S->d, GIVEN(TRAIN_checkpoint_every)->word_loc,
                 "`checkpoint_every` without `checkpoint` saves nothing unless the binary is run "
                 "with --checkpoint DIR");
  if (GIVEN(TRAIN_warmup) && t->steps > 0 && t->warmup >= t->steps)
    moec_warning(S->d, GIVEN(TRAIN_warmup)->values->loc,
                 "`warmup` (%" PRId64 ") covers every one of the %" PRId64 " steps; the learning "
                 "rate never reaches `lr`",
                 t->warmup, t->steps);
  S->spec->train_data_loc = GIVEN(TRAIN_data) ? GIVEN(TRAIN_data)->loc : st->word_loc;
}

moec_spec *moec_sema(moec_arena *a, moec_diags *d, const moec_stmt *file) {
  sema *S = MOEC_NEW(a, sema);
  S->a = a;
  S->d = d;
  S->syntax_errors = d->nerrors > 0;
  moec_names_init(&S->names, a);
  moec_spec *s = S->spec = MOEC_NEW(a, moec_spec);
  /* the parallel block's defaults (docs/LANGUAGE.md) */
  s->parallel.r_auto = true;
  s->parallel.r[0] = MOEC_R_AUTO;
  s->parallel.nr = 1;
  s->parallel.degrees[0] = 1;
  s->parallel.degrees[1] = 2;
  s->parallel.degrees[2] = 4;
  s->parallel.ndegrees = 3;
  s->parallel.a2a[0] = MOEC_A2A_LINEAR;
  s->parallel.a2a[1] = MOEC_A2A_2DH;
  s->parallel.na2a = 2;
  s->parallel.select = MOEC_SELECT_AUTO;
  s->parallel.explore_steps = 3;

  const moec_stmt *sections[SEC__COUNT] = {0};
  bool first = true;
  const moec_stmt *before_model = NULL; /* a `parallel` or `train` block before `model` */
  for (const moec_stmt *st = file; st; st = st->next, first = false) {
    if (st->suspect) continue;
    int sec = -1;
    for (int k = 0; k < SEC__COUNT; k++)
      if (strcmp(section_names[k], st->word) == 0) sec = k;
    if (sec < 0 || st->kind != MOEC_STMT_BLOCK) {
      if (st->kind == MOEC_STMT_ITEM)
        moec_error(d, st->word_loc, "`%s = ...;` is outside any block; keys go inside `model`, "
                   "`parallel` or `train`", q(S, st->word));
      else if (sec >= 0)
        moec_error(d, st->word_loc, "`%s` needs a block: `%s%s { ... }`", section_names[sec],
                   section_names[sec], sec == SEC_MODEL ? " NAME" : "");
      else if (moec_suggest(st->word, section_names, SEC__COUNT))
        moec_error(d, st->word_loc, "unknown block `%s`%s", q(S, st->word),
                   did_you_mean(S, st->word, section_names, SEC__COUNT));
      else
        moec_error(d, st->word_loc, "unknown block `%s`; the blocks are %s", q(S, st->word),
                   alternatives(S, section_names, SEC__COUNT));
      if (sec < 0 && first && st->kind != MOEC_STMT_ITEM &&
          !moec_suggest(st->word, section_names, SEC__COUNT))
        moec_note(d, st->word_loc, "a spec starts with `model NAME { ... }`");
      continue;
    }
    if (sections[sec]) {
      moec_error(d, st->word_loc, "a second `%s` block; a spec has at most one", section_names[sec]);
      moec_note(d, sections[sec]->word_loc, "the first `%s` block is here", section_names[sec]);
      continue;
    }
    sections[sec] = st;
    if (sec != SEC_MODEL && !sections[SEC_MODEL] && !before_model) before_model = st;
    if (sec == SEC_MODEL && before_model) {
      moec_error(d, st->word_loc, "the `model` block must come first, before `parallel` and `train`");
      moec_note(d, before_model->word_loc, "the `%s` block before it is here", before_model->word);
    }
    if (sec == SEC_MODEL && !st->name) {
      moec_error(d, st->has_count ? st->count_loc : st->word_loc,
                 "the model needs a name: `model NAME { ... }`");
      continue;
    }
    if (sec != SEC_MODEL && (st->name || st->has_count)) {
      moec_error(d, st->name ? st->name_loc : st->count_loc, "`%s` takes no name",
                 section_names[sec]);
      continue;
    }
    switch (sec) {
    case SEC_MODEL: check_model(S, st); break;
    case SEC_PARALLEL: check_parallel(S, st); break;
    case SEC_TRAIN: check_train(S, st); break;
    }
  }
  if (!sections[SEC_MODEL] && !S->syntax_errors && d->nerrors == 0) {
    moec_loc at = {NULL, 0, 0};
    if (file) at = file->word_loc;
    if (at.src) moec_error(d, at, "no `model` block; a spec starts with `model NAME { ... }`");
  }
  if (!sections[SEC_MODEL]) return d->nerrors ? NULL : NULL;

  /* whole-model rules */
  if (s->has_train && s->train.data == MOEC_DATA_BYTES && s->vocab != 256)
    moec_error(d, s->train_data_loc,
               "`data = bytes(...)` reads bytes, so it needs `vocab = 256`%s",
               s->vocab ? moec_arena_printf(a, ", not `vocab = %" PRId64 "`", s->vocab)
                        : " in the model block");
  if (s->has_train && s->train.label_smoothing > 0 && !s->vocab)
    moec_warning(d, s->smoothing_loc,
                 "`label_smoothing` has no effect without `vocab`: the model's loss is the MSE "
                 "against the teacher, not a cross-entropy");
  /* reported at the top-level layer that takes the count past the limit */
  int64_t leaves = 0, total = 0;
  const moec_layer *past = NULL;
  for (const moec_layer *l = s->layers; l; l = l->next) {
    leaves = sat_add(leaves, leaf_count(l));
    if (leaves > MOEC_MAX_LAYERS && !past) past = l;
    total = leaves;
  }
  if (past)
    moec_error(d, past->loc, "too many layers once `repeat` is expanded: %s (limit is %" PRId64 ")",
               total == INT64_MAX ? "more than 2^63" : moec_arena_printf(a, "%" PRId64, total),
               MOEC_MAX_LAYERS);
  int64_t budget = MOEC_MAX_PARAM_BYTES / moec_dtype_bytes(s->dtype) - io_params(s);
  if (budget < 0) {
    moec_error(d, s->loc, "the embedding and head alone pass %" PRId64 " bytes (2^40); make "
               "`vocab` or `dim` smaller", MOEC_MAX_PARAM_BYTES);
  } else {
    find_param_crossing(S, s->layers, &budget);
  }
  return d->nerrors ? NULL : s;
}
