/* print.c — the normal form of a spec (`moec check --print`) and its summary.
 * The normal form writes every key with its value, defaults included, in the
 * order of keys.def; `repeat` stays a repeat. It is valid input, and printing
 * it again gives the same text. */
#include "spec.h"

#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

void moec_format_double(char *buf, size_t n, double v) {
  for (int prec = 1; prec <= 17; prec++) {
    snprintf(buf, n, "%.*g", prec, v);
    if (strtod(buf, NULL) == v) break;
  }
  if (!strpbrk(buf, ".eEn") && strlen(buf) + 3 <= n) strcat(buf, ".0");
}

static void put_num(FILE *out, double v) {
  char buf[40];
  moec_format_double(buf, sizeof buf, v);
  fputs(buf, out);
}

static void put_string(FILE *out, const char *s) {
  fputc('"', out);
  for (; *s; s++) {
    if (*s == '"' || *s == '\\') fputc('\\', out);
    fputc(*s, out);
  }
  fputc('"', out);
}

static void indent(FILE *out, int depth) {
  for (int i = 0; i < depth; i++) fputs("  ", out);
}

static void put_layers(const moec_layer *l, int depth, FILE *out) {
  for (; l; l = l->next) {
    indent(out, depth);
    switch (l->kind) {
    case MOEC_LAYER_MOE: {
      const moec_moe *e = &l->moe;
      fprintf(out, "moe %s {\n", l->name);
      indent(out, depth + 1); fprintf(out, "experts = %" PRId64 ";\n", e->experts);
      indent(out, depth + 1); fprintf(out, "hidden = %" PRId64 ";\n", e->hidden);
      indent(out, depth + 1); fprintf(out, "top_k = %" PRId64 ";\n", e->top_k);
      indent(out, depth + 1); fputs("capacity_factor = ", out); put_num(out, e->capacity_factor); fputs(";\n", out);
      indent(out, depth + 1); fprintf(out, "gate = %s;\n", moec_gate_names[e->gate]);
      indent(out, depth + 1); fprintf(out, "activation = %s;\n", moec_act_names[e->act]);
      indent(out, depth + 1); fputs("aux_loss = ", out); put_num(out, e->aux_loss); fputs(";\n", out);
      indent(out, depth + 1); fprintf(out, "bias = %s;\n", e->bias ? "true" : "false");
      indent(out, depth + 1); fprintf(out, "normalize_gate = %s;\n", e->normalize_gate ? "true" : "false");
      indent(out, depth + 1); fprintf(out, "batch_prioritized = %s;\n", e->batch_prioritized ? "true" : "false");
      indent(out, depth + 1); fputs("gate_noise = ", out); put_num(out, e->gate_noise); fputs(";\n", out);
      indent(out, depth + 1); fputs("route_scale = ", out); put_num(out, e->route_scale); fputs(";\n", out);
      indent(out, depth + 1); fputs("bias_update = ", out); put_num(out, e->bias_update); fputs(";\n", out);
      indent(out, depth + 1); fprintf(out, "groups = %" PRId64 ";\n", e->groups);
      indent(out, depth + 1); fprintf(out, "top_groups = %" PRId64 ";\n", e->top_groups);
      indent(out, depth + 1); fputs("z_loss = ", out); put_num(out, e->z_loss); fputs(";\n", out);
      indent(out, depth + 1); fprintf(out, "shared_experts = %" PRId64 ";\n", e->shared_experts);
      indent(out, depth + 1); fprintf(out, "routing = %s;\n", moec_routing_names[e->routing]);
      indent(out, depth); fputs("}\n", out);
      break;
    }
    case MOEC_LAYER_FFN:
      fprintf(out, "ffn %s {\n", l->name);
      indent(out, depth + 1); fprintf(out, "hidden = %" PRId64 ";\n", l->ffn.hidden);
      indent(out, depth + 1); fprintf(out, "activation = %s;\n", moec_act_names[l->ffn.act]);
      indent(out, depth); fputs("}\n", out);
      break;
    case MOEC_LAYER_ATTENTION: {
      const moec_attention *at = &l->attn;
      fprintf(out, "attention %s {\n", l->name);
      indent(out, depth + 1); fprintf(out, "heads = %" PRId64 ";\n", at->heads);
      indent(out, depth + 1); fprintf(out, "kv_heads = %" PRId64 ";\n", at->kv_heads);
      indent(out, depth + 1); fprintf(out, "head_dim = %" PRId64 ";\n", at->head_dim);
      indent(out, depth + 1); fprintf(out, "causal = %s;\n", at->causal ? "true" : "false");
      indent(out, depth + 1); fputs("rope = ", out); put_num(out, at->rope); fputs(";\n", out);
      indent(out, depth + 1); fprintf(out, "bias = %s;\n", at->bias ? "true" : "false");
      indent(out, depth); fputs("}\n", out);
      break;
    }
    case MOEC_LAYER_LAYERNORM:
    case MOEC_LAYER_RMSNORM:
      fprintf(out, "%s;\n", moec_layer_names[l->kind]);
      break;
    case MOEC_LAYER_RESIDUAL:
    case MOEC_LAYER_REPEAT:
      if (l->kind == MOEC_LAYER_REPEAT) fprintf(out, "repeat %" PRId64 " {\n", l->count);
      else fputs("residual {\n", out);
      put_layers(l->body, depth + 1, out);
      indent(out, depth);
      fputs("}\n", out);
      break;
    case MOEC_LAYER__COUNT: break;
    }
  }
}

void moec_spec_print(const moec_spec *s, FILE *out) {
  fprintf(out, "model %s {\n", s->name);
  fprintf(out, "  dim = %" PRId64 ";\n", s->dim);
  fprintf(out, "  tokens = %" PRId64 ";\n", s->tokens);
  fprintf(out, "  dtype = %s;\n", moec_dtype_names[s->dtype]);
  if (s->vocab) {
    fprintf(out, "  vocab = %" PRId64 ";\n", s->vocab);
    fprintf(out, "  context = %" PRId64 ";\n", s->context);
    if (s->seq) fprintf(out, "  seq = %" PRId64 ";\n", s->seq);
  }
  put_layers(s->layers, 1, out);
  fputs("}\n", out);

  const moec_parallel *p = &s->parallel;
  fputs("parallel {\n  adaptive_r = ", out);
  const char *sep = "";
  for (int i = 0; i < p->nr; i++, sep = ", ") {
    if (p->r[i] == MOEC_R_AUTO) fprintf(out, "%sauto", sep);
    else fprintf(out, "%s%" PRId64, sep, p->r[i]);
  }
  fputs(";\n  overlap_degree = ", out);
  for (int i = 0; i < p->ndegrees; i++) fprintf(out, "%s%" PRId64, i ? ", " : "", p->degrees[i]);
  fputs(";\n  all_to_all = ", out);
  for (int i = 0; i < p->na2a; i++) fprintf(out, "%s%s", i ? ", " : "", moec_a2a_names[p->a2a[i]]);
  fprintf(out, ";\n  select = %s;\n", moec_select_names[p->select]);
  fprintf(out, "  explore_steps = %" PRId64 ";\n}\n", p->explore_steps);

  if (!s->has_train) return;
  const moec_train *t = &s->train;
  fputs("train {\n", out);
  fprintf(out, "  steps = %" PRId64 ";\n", t->steps);
  fprintf(out, "  seed = %" PRId64 ";\n", t->seed);
  fprintf(out, "  optimizer = %s;\n", moec_optim_names[t->optimizer]);
  fputs("  lr = ", out); put_num(out, t->lr); fputs(";\n", out);
  fputs("  beta1 = ", out); put_num(out, t->beta1); fputs(";\n", out);
  fputs("  beta2 = ", out); put_num(out, t->beta2); fputs(";\n", out);
  fputs("  eps = ", out); put_num(out, t->eps); fputs(";\n", out);
  fputs("  weight_decay = ", out); put_num(out, t->weight_decay); fputs(";\n", out);
  fprintf(out, "  warmup = %" PRId64 ";\n", t->warmup);
  fprintf(out, "  schedule = %s;\n", moec_sched_names[t->schedule]);
  fputs("  clip = ", out); put_num(out, t->clip); fputs(";\n", out);
  if (t->data == MOEC_DATA_BYTES) {
    fputs("  data = bytes(", out);
    put_string(out, t->data_path);
    fputs(");\n", out);
  } else {
    fputs("  data = synthetic;\n", out);
  }
  fprintf(out, "  eval_every = %" PRId64 ";\n", t->eval_every);
  if (t->checkpoint) {
    fputs("  checkpoint = ", out);
    put_string(out, t->checkpoint);
    fputs(";\n", out);
  }
  fprintf(out, "  checkpoint_every = %" PRId64 ";\n", t->checkpoint_every);
  fprintf(out, "  log_every = %" PRId64 ";\n", t->log_every);
  fputs("  label_smoothing = ", out); put_num(out, t->label_smoothing); fputs(";\n", out);
  fputs("}\n", out);
}

typedef struct tally {
  int64_t layers[MOEC_LAYER__COUNT];
  int64_t experts;         /* over all MoE layers */
  int64_t min_e, max_e;
} tally;

static void count(const moec_layer *l, int64_t mult, tally *t) {
  for (; l; l = l->next) {
    int64_t m = mult;
    if (l->kind == MOEC_LAYER_REPEAT) m = mult * l->count;
    if (l->kind == MOEC_LAYER_REPEAT || l->kind == MOEC_LAYER_RESIDUAL) {
      t->layers[l->kind] += mult;
      count(l->body, m, t);
      continue;
    }
    t->layers[l->kind] += mult;
    if (l->kind == MOEC_LAYER_MOE) {
      t->experts += mult * l->moe.experts;
      if (!t->min_e || l->moe.experts < t->min_e) t->min_e = l->moe.experts;
      if (l->moe.experts > t->max_e) t->max_e = l->moe.experts;
    }
  }
}

static void human(char *buf, size_t n, double v) {
  if (v >= 1e12) snprintf(buf, n, "%.2fT", v / 1e12);
  else if (v >= 1e9) snprintf(buf, n, "%.2fG", v / 1e9);
  else if (v >= 1e6) snprintf(buf, n, "%.2fM", v / 1e6);
  else if (v >= 1e3) snprintf(buf, n, "%.1fk", v / 1e3);
  else snprintf(buf, n, "%.0f", v);
}

void moec_spec_summary(const moec_spec *s, FILE *out) {
  tally t = {0};
  count(s->layers, 1, &t);
  int64_t leaves = t.layers[MOEC_LAYER_MOE] + t.layers[MOEC_LAYER_FFN] + t.layers[MOEC_LAYER_ATTENTION] +
                   t.layers[MOEC_LAYER_LAYERNORM] + t.layers[MOEC_LAYER_RMSNORM];
  int64_t params = moec_spec_params(s);
  char pbuf[32], bbuf[32];
  human(pbuf, sizeof pbuf, (double)params);
  human(bbuf, sizeof bbuf, (double)params * moec_dtype_bytes(s->dtype));
  fprintf(out, "model %s: dim %" PRId64 ", %" PRId64 " tokens per rank, %s\n", s->name, s->dim,
          s->tokens, moec_dtype_names[s->dtype]);
  char attn[48] = ""; /* only where there is attention: older summaries stay as they were */
  if (t.layers[MOEC_LAYER_ATTENTION])
    snprintf(attn, sizeof attn, ", %" PRId64 " attention", t.layers[MOEC_LAYER_ATTENTION]);
  fprintf(out, "  layers: %" PRId64 " (%" PRId64 " moe, %" PRId64 " ffn%s, %" PRId64
          " norm) in %" PRId64 " residual blocks\n",
          leaves, t.layers[MOEC_LAYER_MOE], t.layers[MOEC_LAYER_FFN], attn,
          t.layers[MOEC_LAYER_LAYERNORM] + t.layers[MOEC_LAYER_RMSNORM],
          t.layers[MOEC_LAYER_RESIDUAL]);
  fprintf(out, "  parameters: %s (%" PRId64 "), %sB as %s\n", pbuf, params, bbuf,
          moec_dtype_names[s->dtype]);
  if (t.layers[MOEC_LAYER_MOE] && t.min_e == t.max_e)
    fprintf(out, "  experts: %" PRId64 " in all, %" PRId64 " per moe layer\n", t.experts, t.min_e);
  else if (t.layers[MOEC_LAYER_MOE])
    fprintf(out, "  experts: %" PRId64 " in all, %" PRId64 " to %" PRId64 " per moe layer\n",
            t.experts, t.min_e, t.max_e);
  char seq[48] = "";
  if (s->seq) snprintf(seq, sizeof seq, ", sequences of %" PRId64, s->seq);
  if (s->vocab)
    fprintf(out, "  vocabulary: %" PRId64 " tokens, context %" PRId64 "%s\n", s->vocab, s->context, seq);
  if (s->has_train)
    fprintf(out, "  training: %" PRId64 " steps of %s, lr %g, %s data\n", s->train.steps,
            moec_optim_names[s->train.optimizer], s->train.lr,
            s->train.data == MOEC_DATA_BYTES ? "byte" : "synthetic");
  else
    fputs("  inference only (no train block)\n", out);
}
