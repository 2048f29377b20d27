/* emit_cuda.c — writes kernels.cu; see emit_cuda.h.
 *
 * kernels.cu is the templates of templates/ (embedded into moec by
 * templates/embed.cmake, as into the runtime), common.cuh first and each
 * file after a #line directive naming it, exactly as the cuda backend
 * assembles them, followed by a generated section: for each distinct set of
 * a layer's constants, a comment naming the layers that share it and
 * extern "C" wrappers moert_k_<op>__<key> that instantiate the template
 * implementation moert_<op>_impl<...> with them (the generic moert_k_<op>
 * instantiates it with 0s: runtime dims). The wrappers take the generic
 * kernel's arguments, read here from the template's own text, so the
 * backend launches either with the same arguments.
 *
 * The contract with runtime/backend_cuda.c is the name: runtime/
 * kernel_specs.def lists the ops and the printf format of their keys; at a
 * launch the backend formats the key from the op's runtime dims and uses
 * moert_k_<op>__<key> when the module has it (memoized), else the generic
 * kernel. No table travels with the source: a kernels.cu that specializes
 * nothing, or other dims, is merely slower. */
#include "emit_cuda.h"

#include <ctype.h>
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "layer.h"

/* The embedded templates (the runtime's moert_templates.c). */
extern const char *const moert_template_names[];
extern const char *const moert_template_texts[];
extern const int moert_template_count;

static const struct {
  const char *op, *key;
} specs[] = {
#define SPEC(op, key) {#op, key},
#include "kernel_specs.def"
#undef SPEC
};

enum { MAX_LAYER_SPECS = MOERT_MAX_LAYER_SPECS };
typedef moert_spec_use use;

static void die(const char *msg, const char *what) {
  fprintf(stderr, "moec: internal error: %s%s\n", msg, what);
  abort();
}

static void *xmalloc(size_t n) {
  void *p = malloc(n ? n : 1);
  if (!p) die("out of memory", "");
  return p;
}

static int nconsts(int sp) {
  int n = 0;
  for (const char *k = specs[sp].key; *k; k++) n += *k == '%';
  return n;
}

static void key_of(const use *u, char *buf, size_t n) {
  char key[64];
  snprintf(key, sizeof key, specs[u->spec].key, u->a, u->b);
  snprintf(buf, n, "moert_k_%s__%s", specs[u->spec].op, key);
}

static bool fits(long long v) { return v > 0 && v <= INT_MAX; }

/* The specializations of layer l, in launch order (its kind's descriptor);
 * their number. */
static int layer_uses(const moert_model *m, const moert_layer *l, use *u) {
  const moert_layer_ops *ops = moert_layer_ops_of(l->kind);
  int n = ops->specs ? ops->specs(m, l, u) : 0;
  /* constants that do not fit a template's int stay runtime arguments */
  int k = 0;
  for (int i = 0; i < n; i++)
    if (fits(u[i].a) && (nconsts(u[i].spec) < 2 || fits(u[i].b))) u[k++] = u[i];
  return k;
}

static const char *dtype_name(const moert_model *m) {
  return m->dtype == MOERT_DT_BF16 ? "bf16" : "fp32";
}

/* "layer 3: moe `moe_ffn` (E = 8, k = 2, M = 512, H = 2048, dtype bf16)" */
static void describe(FILE *out, const moert_model *m, int i) {
  const moert_layer *l = &m->layers[i];
  char dims[160];
  moert_layer_ops_of(l->kind)->describe(m, l, dims, sizeof dims);
  fprintf(out, "// layer %d: %s `%s` (%s, ", i, moert_layer_kind_names[l->kind], l->name, dims);
  fprintf(out, "dtype %s)\n", dtype_name(m));
}

/* The parameter list of `extern "C" __global__ void moert_k_<op>(...)` in
 * the templates, whitespace collapsed, into buf. */
static void signature(const char *op, char *buf, size_t n) {
  char pat[128];
  snprintf(pat, sizeof pat, "__global__ void moert_k_%s(", op);
  for (int t = 0; t < moert_template_count; t++) {
    const char *p = strstr(moert_template_texts[t], pat);
    if (!p) continue;
    p += strlen(pat);
    size_t k = 0;
    bool space = false;
    for (; *p && *p != ')'; p++) {
      bool ws = *p == ' ' || *p == '\n' || *p == '\t' || *p == '\r';
      if (ws) {
        space = k > 0;
        continue;
      }
      if (space && k + 1 < n) buf[k++] = ' ';
      space = false;
      if (k + 1 < n) buf[k++] = *p;
    }
    if (*p != ')' || k + 1 >= n) die("a malformed template signature: moert_k_", op);
    buf[k] = 0;
    return;
  }
  die("the embedded templates have no kernel moert_k_", op);
}

/* "a, b, c" from "const float *a, float *b, long long c" */
static void arg_names(const char *params, char *buf, size_t n) {
  size_t k = 0;
  const char *p = params;
  while (*p) {
    const char *end = strchr(p, ',');
    if (!end) end = p + strlen(p);
    const char *s = end;
    while (s > p && (isalnum((unsigned char)s[-1]) || s[-1] == '_')) s--;
    k += (size_t)snprintf(buf + k, k < n ? n - k : 0, "%s%.*s", p == params ? "" : ", ",
                          (int)(end - s), s);
    p = *end ? end + 1 : end;
    while (*p == ' ') p++;
  }
  if (k >= n) die("a template signature too long", "");
}

/* "head(p1, p2, ...) {", wrapped before 100 columns. */
static void wrapped(FILE *out, const char *head, const char *params) {
  int col = fprintf(out, "%s(", head);
  const char *p = params;
  bool first = true;
  while (*p) {
    const char *end = strchr(p, ',');
    int len = end ? (int)(end - p) : (int)strlen(p);
    if (!first && col + len + 2 > 98) {
      fputs(",\n    ", out);
      col = 4;
    } else if (!first) {
      fputs(", ", out);
      col += 2;
    }
    col += fprintf(out, "%.*s", len, p);
    first = false;
    p += len;
    if (*p == ',') p++;
    while (*p == ' ') p++;
  }
  fputs(") {\n", out);
}

static void emit_use(FILE *out, const use *u) {
  char name[160], params[2048], args[1024], head[256];
  key_of(u, name, sizeof name);
  signature(specs[u->spec].op, params, sizeof params);
  arg_names(params, args, sizeof args);
  snprintf(head, sizeof head, "extern \"C\" __global__ void %s", name);
  wrapped(out, head, params);
  if (nconsts(u->spec) == 2)
    fprintf(out, "  moert_%s_impl<%lld, %lld>(%s);\n}\n", specs[u->spec].op, u->a, u->b, args);
  else
    fprintf(out, "  moert_%s_impl<%lld>(%s);\n}\n", specs[u->spec].op, u->a, args);
}

/* Two layers share a section when they specialize the same kernels. */
static bool same_uses(const use *a, int na, const use *b, int nb) {
  if (na != nb) return false;
  for (int i = 0; i < na; i++)
    if (a[i].spec != b[i].spec || a[i].a != b[i].a || a[i].b != b[i].b) return false;
  return true;
}

/* s with every byte that could end a // comment replaced. */
static void comment_text(FILE *out, const char *s) {
  for (; *s; s++) fputc((unsigned char)*s < 0x20 || *s == 0x7f ? '?' : *s, out);
}

static void emit_section(FILE *out, const moert_model *m, const char *source_name) {
  int n = m->nlayers > 0 ? m->nlayers : 0;
  size_t cap = (size_t)n + 1;
  use *u = xmalloc(sizeof *u * cap * MAX_LAYER_SPECS);
  int *nu = xmalloc(sizeof *nu * cap);
  for (int i = 0; i < n; i++) nu[i] = layer_uses(m, &m->layers[i], u + i * MAX_LAYER_SPECS);

  fputs("// ========================================================================\n"
        "// Kernels specialized for the model `",
        out);
  comment_text(out, m->name);
  fputs("` (", out);
  comment_text(out, source_name);
  fputs(").\n"
        "// Each section names the layers whose constants it holds; its kernels are\n"
        "// the generic ones of the templates above with those constants compiled in\n"
        "// (template arguments of moert_<op>_impl), under the generic kernel's name\n"
        "// with a key: moert_k_<op>__<key> (runtime/kernel_specs.def). The cuda\n"
        "// backend launches one where the op's dims are its key, the generic kernel\n"
        "// elsewhere. The capacity C and the world's shape (W, S, r, d) stay kernel\n"
        "// arguments: one kernels.cu serves every world size. The cuda backend\n"
        "// computes in fp32; the dtype is the spec's.\n",
        out);
  bool any_plain = false;
  for (int i = 0; i < n; i++)
    if (!nu[i]) {
      if (!any_plain) fputs("//\n// Layers the generic kernels serve alone:\n", out);
      any_plain = true;
      describe(out, m, i);
    }
  /* the kernels already written, by name */
  char **done = xmalloc(sizeof *done * cap * MAX_LAYER_SPECS);
  int ndone = 0;
  for (int i = 0; i < n; i++) {
    const use *ui = u + i * MAX_LAYER_SPECS;
    if (!nu[i]) continue;
    bool seen = false;
    for (int j = 0; j < i && !seen; j++)
      seen = same_uses(u + j * MAX_LAYER_SPECS, nu[j], ui, nu[i]);
    if (seen) continue; /* in the section of its first layer */
    fputs("\n// ------------------------------------------------------------------------\n", out);
    for (int j = i; j < n; j++)
      if (same_uses(u + j * MAX_LAYER_SPECS, nu[j], ui, nu[i])) describe(out, m, j);
    for (int k = 0; k < nu[i]; k++) {
      char name[160];
      key_of(&ui[k], name, sizeof name);
      bool dup = false;
      for (int d = 0; d < ndone && !dup; d++) dup = strcmp(done[d], name) == 0;
      if (dup) {
        fprintf(out, "// %s: above, in an earlier section\n", name);
        continue;
      }
      done[ndone++] = strdup(name);
      if (!done[ndone - 1]) die("out of memory", "");
      emit_use(out, &ui[k]);
    }
  }
  if (ndone == 0) fputs("\n// (no layer has kernels to specialize)\n", out);
  for (int d = 0; d < ndone; d++) free(done[d]);
  free(done);
  free(nu);
  free(u);
}

void moec_emit_cuda(const moert_model *m, const char *source_name, FILE *out) {
  char *text = moec_emit_cuda_string(m, source_name);
  fputs(text, out);
  free(text);
}

char *moec_emit_cuda_string(const moert_model *m, const char *source_name) {
  char *buf = NULL;
  size_t size = 0;
  FILE *out = open_memstream(&buf, &size);
  if (!out) die("out of memory", "");
  fputs("// Generated by moec from ", out);
  comment_text(out, source_name);
  fputs(". Do not edit.\n"
        "// kernels.cu: the CUDA kernels of the model `",
        out);
  comment_text(out, m->name);
  fputs("`, compiled by NVRTC when the binary\n"
        "// starts on a GPU (runtime/backend_cuda.c). First moec's kernel templates,\n"
        "// each after a #line directive naming it (templates/ in moec's source), then\n"
        "// the kernels specialized for this model's layers (the end of this file).\n",
        out);
  for (int i = 0; i < moert_template_count; i++) {
    fprintf(out, "#line 1 \"%s\"\n", moert_template_names[i]);
    fputs(moert_template_texts[i], out);
    fputc('\n', out); /* as the backend's assemble() */
  }
  /* back to this file's own line numbers */
  fflush(out);
  long lines = 0;
  for (size_t i = 0; i < size; i++) lines += buf[i] == '\n';
  fprintf(out, "#line %ld \"kernels.cu\"\n", lines + 2);
  emit_section(out, m, source_name);
  if (ferror(out) || fclose(out) != 0) die("out of memory", "");
  return buf;
}
