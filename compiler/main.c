/* main.c — the `moec` command line.
 *   moec check [--print|--summary] FILE...
 *   moec plan [--json] [--ranks W] [--ranks-per-node G] [--gpu FILE] [--net SPEC] FILE
 *   moec emit FILE [--cuda] [-o DIR]
 *   moec build FILE [-o BIN] [--keep] [--gpu FILE]
 * Exit status: 0 success, 1 an error in a spec, 2 a usage error. */
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "build.h"
#include "cost.h"
#include "emit_c.h"
#include "emit_cuda.h"
#include "front.h"
#include "lower.h"
#include "placement.h"

#ifndef MOEC_VERSION
#define MOEC_VERSION "0.0.0"
#endif

enum {
#define OPT(id, l, s, a, m, h) OPT_##id,
#include "options.def"
#undef OPT
  OPT__COUNT
};

static const struct option long_opts[] = {
#define OPT(id, l, s, a, m, h) {l, a ? required_argument : no_argument, NULL, 1000 + OPT_##id},
#include "options.def"
#undef OPT
    {NULL, 0, NULL, 0},
};

static const struct {
  char shortc;
  int has_arg;
  const char *name, *metavar, *help;
} opt_info[] = {
#define OPT(id, l, s, a, m, h) {s, a, l, m, h},
#include "options.def"
#undef OPT
};

static void usage(FILE *out) {
  fputs("usage: moec check [options] FILE...   check .moe specs (- reads standard input)\n"
        "       moec plan [--json] [--ranks W] FILE   print the plan: shapes, FLOPs, memory, predicted times\n"
        "       moec emit FILE [-o DIR]          print (or write into DIR) the generated C driver\n"
        "       moec emit FILE --cuda            print the model's CUDA kernels (kernels.cu)\n"
        "       moec build FILE [-o BIN]         compile FILE into an executable that trains it\n"
        "       moec --help | --version\n"
        "\n"
        "options:\n",
        out);
  for (int i = 0; i < OPT__COUNT; i++) {
    char left[80];
    if (opt_info[i].shortc)
      snprintf(left, sizeof left, "-%c, --%s%s%s", opt_info[i].shortc, opt_info[i].name,
               *opt_info[i].metavar ? " " : "", opt_info[i].metavar);
    else
      snprintf(left, sizeof left, "    --%s%s%s", opt_info[i].name,
               *opt_info[i].metavar ? " " : "", opt_info[i].metavar);
    fprintf(out, "  %-22s %s\n", left, opt_info[i].help);
  }
  fputs("\nDiagnostics are FILE:LINE:COL: error: MESSAGE, as gcc's. The language is in\n"
        "docs/LANGUAGE.md.\n",
        out);
}

static int usage_error(const char *fmt, const char *arg) {
  fputs("moec: ", stderr);
  fprintf(stderr, fmt, arg);
  fputs("\nTry 'moec --help' for more information.\n", stderr);
  return 2;
}

typedef struct opts {
  bool print, summary, dump_ast, werror, nowarn, json, keep, cuda;
  const char *output, *gpu, *net;
  int64_t ranks, ranks_per_node;
} opts;

/* The default calibration (data/calibration/embed.cmake): the H100's where
 * it is committed, else the CPU's. */
extern const unsigned char moec_default_calibration[];
extern const char moec_default_calibration_name[];

/* The calibration --gpu names, or the default; 1 after printing why not. */
static int load_calibration(const opts *o, moert_calib *c, char **text) {
  moert_status st = {0};
  *text = NULL;
  if (o->gpu) {
    if (!moert_calib_load(o->gpu, c, text, &st)) {
      fprintf(stderr, "moec: error: %s\n", st.msg);
      return 1;
    }
    return 0;
  }
  char where[160];
  snprintf(where, sizeof where, "built in: %s%s", moec_default_calibration_name,
           strstr(moec_default_calibration_name, "cpu.json") ? " (this CI machine's CPU, not a GPU; give --gpu FILE)" : "");
  if (!moert_calib_parse((const char *)moec_default_calibration, where, c, &st)) {
    fprintf(stderr, "moec: error: %s\n", st.msg);
    return 1;
  }
  size_t n = strlen((const char *)moec_default_calibration) + 1;
  if (!(*text = malloc(n))) return 1;
  memcpy(*text, moec_default_calibration, n);
  snprintf(c->source, sizeof c->source, "%s", where);
  return 0;
}

typedef struct predict_ctx {
  const moert_plan *plan;
  const moert_calib *calib;
  const moert_net *net;
  bool training, json; /* json: the JSON carries the prediction (asked for with --gpu or --net) */
} predict_ctx;

static void print_prediction(void *ctx, FILE *out, bool json) {
  const predict_ctx *pc = ctx;
  moert_cost_print(pc->plan, pc->calib, pc->net, pc->training, out, json);
}

/* `moec plan`: the plan at W ranks, G a node, and its prediction. */
static int plan_cmd(const moert_model *m, const char *path, const opts *o) {
  moert_status st = {0};
  int world = (int)(o->ranks ? o->ranks : 1), G = world;
  /* the nodes, as the runtime sees them: MOEC_LOCAL_SIZE ranks per node,
   * unless --ranks-per-node says */
  const char *ls = getenv("MOEC_LOCAL_SIZE");
  if (ls && atoi(ls) > 0 && world % atoi(ls) == 0) G = atoi(ls);
  if (o->ranks_per_node) {
    if (world % o->ranks_per_node) {
      fprintf(stderr, "moec: error: --ranks-per-node %lld does not divide --ranks %d; give a number of ranks "
                      "that is a whole number of nodes\n", (long long)o->ranks_per_node, world);
      return 2;
    }
    G = (int)o->ranks_per_node;
  }
  moert_calib calib;
  char *text;
  if (load_calibration(o, &calib, &text)) return 1;
  free(text);
  moert_net net;
  moert_net_defaults(&net);
  net.ranks_per_node = G;
  if (o->net && !moert_net_parse(o->net, &calib, &net, &st)) {
    fprintf(stderr, "moec: error: %s\n", st.msg);
    return 2;
  }
  moert_plan *p;
  if (!moert_plan_create_nodes(m, world, 0, m->tokens, m->train.has_train, world / G, &p, &st)) {
    fprintf(stderr, "%s: error: %s\n", path, st.msg);
    return 1;
  }
  predict_ctx pc = {p, &calib, &net, m->train.has_train, o->gpu || o->net};
  /* the JSON carries the prediction when asked for, so the plan's goldens
   * do not change with the committed calibration */
  moert_plan_print_with(p, stdout, o->json, !o->json || pc.json ? print_prediction : NULL, &pc);
  moert_plan_destroy(p);
  return 0;
}

static void print_diags(const moec_diags *d, const opts *o) {
  if (!o->nowarn || d->nerrors) {
    if (o->nowarn) {
      /* errors and their notes only */
      moec_diags only = *d;
      moec_diag *keep = NULL, **tail = &keep;
      bool last_kept = false;
      for (moec_diag *x = d->head; x; x = x->next) {
        bool k = x->sev == MOEC_SEV_ERROR || (x->sev == MOEC_SEV_NOTE && last_kept);
        if (x->sev != MOEC_SEV_NOTE) last_kept = k;
        if (!k) continue;
        moec_diag *c = MOEC_NEW(d->arena, moec_diag);
        *c = *x;
        c->next = NULL;
        *tail = c;
        tail = &c->next;
      }
      only.head = keep;
      moec_diags_print(&only, stderr);
    } else {
      moec_diags_print(d, stderr);
    }
  }
}

static int check_file(const char *path, const opts *o, bool many) {
  moec_arena *a = moec_arena_create();
  moec_diags d;
  moec_diags_init(&d, a);
  const moec_stmt *ast = NULL;
  moec_spec *s = moec_front_file(a, &d, path, o->dump_ast ? &ast : NULL);
  /* lowering expands `repeat`, where generated names can collide */
  if (s && !moec_lower(a, &d, s, path)) s = NULL;
  print_diags(&d, o);
  if (o->dump_ast) moec_ast_dump(ast, stdout);
  bool failed = !s || (o->werror && d.nwarnings);
  if (!failed) {
    if (o->print) moec_spec_print(s, stdout);
    if (o->summary) {
      if (many) printf("%s:\n", path);
      moec_spec_summary(s, stdout);
    }
  }
  if (failed && o->werror && s && d.nwarnings)
    fprintf(stderr, "moec: warnings are errors (--Werror)\n");
  moec_arena_destroy(a);
  return failed ? 1 : 0;
}

/* plan, emit, build: check and lower the spec, then the command's work. */
static int compile_cmd(const char *cmd, const char *path, const opts *o) {
  moec_arena *a = moec_arena_create();
  moec_diags d;
  moec_diags_init(&d, a);
  moec_spec *s = moec_front_file(a, &d, path, NULL);
  moert_model *m = s ? moec_lower(a, &d, s, path) : NULL;
  print_diags(&d, o);
  int rc = 0;
  if (!m || (o->werror && d.nwarnings)) {
    rc = 1;
  } else if (strcmp(cmd, "plan") == 0) {
    rc = plan_cmd(m, path, o);
  } else if (strcmp(cmd, "emit") == 0) {
    if (o->output) rc = moec_emit_dir(m, path, o->output); /* model.c and kernels.cu */
    else if (o->cuda) moec_emit_cuda(m, path, stdout);
    else moec_emit_c(m, path, stdout);
  } else {
    /* the binary predicts with the calibration it carries (select = predicted) */
    moert_calib calib;
    char *text = NULL;
    bool none = o->gpu && strcmp(o->gpu, "none") == 0; /* --gpu none: a binary without one */
    if (!none) rc = load_calibration(o, &calib, &text);
    if (none) {
      rc = moec_build(m, path, o->output, o->keep);
    } else if (!rc) {
      m->calibration = text;
      m->calibration_source = calib.source;
      rc = moec_build(m, path, o->output, o->keep);
    }
    free(text);
  }
  moec_arena_destroy(a);
  return rc;
}

int main(int argc, char **argv) {
  opts o = {0};
  /* "-": non-options come back in order as code 1, so the subcommand and the
   * files may stand anywhere among the options. */
  char shorts[2 * OPT__COUNT + 2];
  size_t k = 0;
  shorts[k++] = '-';
  for (int i = 0; i < OPT__COUNT; i++)
    if (opt_info[i].shortc) {
      shorts[k++] = opt_info[i].shortc;
      if (opt_info[i].has_arg) shorts[k++] = ':';
    }
  shorts[k] = 0;
  opterr = 0;
  const char *cmd = NULL;
  int nfiles = 0;
  const char **files = calloc((size_t)argc + 1, sizeof *files);
  if (!files) return 1;
  int rc = 0;
  int c;
  while ((c = getopt_long(argc, argv, shorts, long_opts, NULL)) != -1) {
    if (c == 1) { /* the subcommand first, then files */
      if (!cmd) cmd = optarg;
      else files[nfiles++] = optarg;
      continue;
    }
    int id = -1;
    if (c >= 1000) id = c - 1000;
    for (int i = 0; i < OPT__COUNT && id < 0; i++)
      if (opt_info[i].shortc && opt_info[i].shortc == c) id = i;
    if (id < 0) {
      char shortname[3] = {'-', (char)optopt, 0};
      rc = usage_error("unknown option '%s'", optopt ? shortname : argv[optind - 1]);
      goto out;
    }
    switch (id) {
    case OPT_HELP: usage(stdout); goto out;
    case OPT_VERSION: printf("moec %s\n", MOEC_VERSION); goto out;
    case OPT_PRINT: o.print = true; break;
    case OPT_SUMMARY: o.summary = true; break;
    case OPT_DUMP_AST: o.dump_ast = true; break;
    case OPT_WERROR: o.werror = true; break;
    case OPT_NOWARN: o.nowarn = true; break;
    case OPT_OUTPUT: o.output = optarg; break;
    case OPT_JSON: o.json = true; break;
    case OPT_KEEP: o.keep = true; break;
    case OPT_CUDA: o.cuda = true; break;
    case OPT_GPU: o.gpu = optarg; break;
    case OPT_NET: o.net = optarg; break;
    case OPT_RANKS_PER_NODE: {
      char *end;
      long long v = strtoll(optarg, &end, 10);
      if (end == optarg || *end || v < 1 || v > 1 << 20) {
        rc = usage_error("bad value '%s' for --ranks-per-node (a whole number from 1 to 1048576)", optarg);
        goto out;
      }
      o.ranks_per_node = v;
      break;
    }
    case OPT_RANKS: {
      char *end;
      long long v = strtoll(optarg, &end, 10);
      if (end == optarg || *end || v < 1 || v > 1 << 20) {
        rc = usage_error("bad value '%s' for --ranks (a whole number from 1 to 1048576)", optarg);
        goto out;
      }
      o.ranks = v;
      break;
    }
    }
  }
  for (; optind < argc; optind++) { /* after `--` */
    if (!cmd) cmd = argv[optind];
    else files[nfiles++] = argv[optind];
  }
  if (!cmd) {
    usage(stderr);
    rc = 2;
    goto out;
  }
  bool is_check = strcmp(cmd, "check") == 0;
  if (!is_check && strcmp(cmd, "plan") && strcmp(cmd, "emit") && strcmp(cmd, "build")) {
    rc = usage_error("unknown command '%s'; the commands are: check, plan, emit, build", cmd);
    goto out;
  }
  if (nfiles == 0) {
    rc = usage_error("%s: no input files", cmd);
    goto out;
  }
  if (!is_check) {
    if (nfiles > 1) {
      rc = usage_error("%s: one spec at a time", cmd);
      goto out;
    }
    rc = compile_cmd(cmd, files[0], &o);
    goto out;
  }
  if (o.print && nfiles > 1) {
    rc = usage_error("%s: --print takes one file", "check");
    goto out;
  }
  for (int i = 0; i < nfiles; i++)
    if (check_file(files[i], &o, nfiles > 1)) rc = 1;
out:
  free(files);
  return rc;
}
