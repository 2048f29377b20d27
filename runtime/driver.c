/* driver.c — moert_main: the command line of a moec-built binary. Its
 * flags become a run's options (run.h), checked here; moert_run does the rest. */
#include "moert.h"

#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "calibrate.h"
#include "comm.h"
#include "flags.h"
#include "run.h"
#include "select.h"

#define FLAGS(X)                                                                                   \
  X(STEPS, "steps", 1, "N", "train (or run) until step N in all; with --resume, the total")        \
  X(BACKEND, "backend", 1, "cpu|cuda", "where the steps run (default: cuda when a GPU is found)")   \
  X(KCACHE, "kernel-cache", 1, "DIR", "cache compiled GPU kernels in DIR (default $XDG_CACHE_HOME/moec)") \
  X(NO_KCACHE, "no-kernel-cache", 0, "", "compile the GPU kernels at every start")                   \
  X(METRICS, "metrics", 1, "FILE", "write one JSON object per step to FILE (JSON lines)")          \
  X(DATA, "data", 1, "PATH", "read the training text from PATH instead of the spec's bytes(...)")  \
  X(SEED, "seed", 1, "N", "seed of initialization, data and noise (default: the spec's)")          \
  X(LOG_EVERY, "log-every", 1, "N", "print a table row every N steps")                             \
  X(TOKENS, "tokens", 1, "N", "tokens per rank per step (default: the spec's)")                    \
  X(EVAL_EVERY, "eval-every", 1, "N", "evaluate on held-out data every N steps (0: never)")        \
  X(CHECKPOINT, "checkpoint", 1, "DIR", "save checkpoints into DIR")                               \
  X(CKPT_EVERY, "checkpoint-every", 1, "N", "save every N steps (0: only at the end)")             \
  X(ON_NAN, "on-nan", 1, "stop|skip", "at a non-finite loss or gradient norm: stop (default; status 1) or skip that step's update") \
  X(RESUME, "resume", 0, "", "continue from the checkpoint in DIR (--checkpoint or the spec's)")   \
  X(OVERWRITE, "overwrite", 0, "", "start over, replacing the checkpoint in DIR (without it, a run refuses to)") \
  X(GENERATE, "generate", 1, "N", "after training, sample N bytes of text (byte models)")          \
  X(PROMPT, "prompt", 1, "TEXT", "the text that sampling continues (default: a line of the data)") \
  X(COMM, "comm", 1, "nccl|mpi|self", "how ranks talk (default under mpirun: nccl with cuda and a GPU per rank, else mpi; else self)") \
  X(VARIANT, "variant", 1, "V", "force V (r=R,d=D,a2a=linear|2dh, or LAYER:V, or cycle); repeatable") \
  X(TRACE, "trace", 1, "FILE.json", "write a Chrome trace (chrome://tracing, Perfetto) of every op of every rank") \
  X(ROUTING_TRACE, "routing-trace", 1, "FILE", "write each MoE layer's expert load, drops and gate entropy per step to FILE (JSON lines)") \
  X(CALIBRATE, "calibrate", 1, "FILE", "measure this device (and the all-to-all under mpirun) for `moec plan --gpu FILE`; no training") \
  X(TIMEOUT, "timeout", 1, "SECONDS", "end the job when one wait for a collective lasts longer (default 600; 0: never)") \
  X(QUIET, "quiet", 0, "", "print only errors")                                                    \
  X(HELP, "help", 0, "", "print this help and exit")

MOERT_FLAGS(FLAGS)

/* --variant may be given this many times (one per MoE layer, say). */
#define MAX_FORCED 64
/* --timeout at most: a year (any longer is "never", which 0 says). */
#define MAX_TIMEOUT_S 31536000
/* Bytes --generate samples at most: one forward pass each, on one rank. */
#define MAX_GENERATE (1 << 20)

/* What a flag's value must be, for its usage error. */
static const char *wanted(int flag) {
  switch (flag) {
  case FLAG_BACKEND: return "cpu or cuda";
  case FLAG_COMM: return "nccl, mpi or self";
  case FLAG_ON_NAN: return "stop or skip";
  case FLAG_STEPS: return "a whole number from 1 to 4611686018427387903";
  case FLAG_LOG_EVERY: return "a whole number of 1 or more";
  case FLAG_TOKENS: return "a whole number from 1 to 2147483647, the limit of 32-bit token indices";
  case FLAG_GENERATE: return "a whole number from 0 to 1048576";
  case FLAG_VARIANT: return "r=R,d=D,a2a=linear or 2dh, that after LAYER:, or cycle";
  case FLAG_TIMEOUT: return "whole seconds from 0 (no limit) to 31536000, a year";
  default: return "a whole number of 0 or more";
  }
}

static void usage(const moert_model *m, const char *argv0, FILE *out) {
  fprintf(out, "usage: %s [options]\n\n%s model `%s`, built by moec from %s.\n\noptions:\n", argv0,
          m->train.has_train ? "Trains the" : "Runs forward steps of the", m->name, m->spec_file);
  moert_flags_print(out, flag_info, FLAG__COUNT, 24);
  fprintf(out, "\nExit status: 0 success, 1 a failure while running, 2 a usage error, %d a collective did not\n"
          "complete within --timeout (a rank stopped or hung; the job ends), 143 or 130 stopped by\n"
          "SIGTERM or SIGINT after a step (and a checkpoint, when one is configured).\n", MOERT_EXIT_TIMEOUT);
}

/* Whether a launcher (mpirun, srun) started this process as a rank other
 * than 0. The flags are checked before MPI starts, alike on every rank, so
 * only rank 0 says what is wrong with them: one message for the job. */
static bool other_rank(void) {
  static const char *const vars[] = {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK",
                                     "SLURM_PROCID"};
  for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
    const char *v = getenv(vars[i]);
    if (v && *v) return strcmp(v, "0") != 0;
  }
  return false;
}

static int usage_error(const char *argv0, const char *msg, const char *arg) {
  if (other_rank()) return 2;
  fprintf(stderr, "%s: ", argv0);
  fprintf(stderr, msg, arg);
  fprintf(stderr, "\nTry '%s --help' for more information.\n", argv0);
  return 2;
}


int moert_main(const moert_model *m, int argc, char **argv) {
  const char *argv0 = argc > 0 ? argv[0] : "model";
  moert_run_opts o;
  moert_run_defaults(m, &o);
  const char *variants[MAX_FORCED];
  const char *calibrate = NULL;
  opterr = 0;
  int c;
  /* ":" first: a missing value comes back as ':', an unknown option as '?' */
  while ((c = getopt_long(argc, argv, ":", long_opts, NULL)) != -1) {
    if (c == ':')
      return usage_error(argv0, "option '%s' needs a value", argv[optind - 1]);
    if (c == '?') return usage_error(argv0, "unknown option '%s'", argv[optind - 1]);
    c -= MOERT_FLAG_BASE;
    const char *a = optarg;
    bool ok = true;
    switch (c) {
    case FLAG_STEPS: ok = moert_parse_int(a, 1, INT64_MAX / 2, &o.steps); break;
    case FLAG_SEED: ok = moert_parse_int(a, 0, INT64_MAX, &o.seed); break;
    case FLAG_LOG_EVERY: ok = moert_parse_int(a, 1, INT64_MAX, &o.log_every); break;
    case FLAG_TOKENS: ok = moert_parse_int(a, 1, MOERT_MAX_TOKENS, &o.tokens); break;
    case FLAG_EVAL_EVERY: ok = moert_parse_int(a, 0, INT64_MAX, &o.eval_every); break;
    case FLAG_CKPT_EVERY: ok = moert_parse_int(a, 0, INT64_MAX, &o.ckpt_every); break;
    case FLAG_GENERATE: ok = moert_parse_int(a, 0, MAX_GENERATE, &o.generate); break;
    case FLAG_TIMEOUT: {
      int64_t t = 0;
      ok = moert_parse_int(a, 0, MAX_TIMEOUT_S, &t);
      o.timeout = (double)t;
      break;
    }
    case FLAG_BACKEND: o.backend = a; ok = !strcmp(a, "cpu") || !strcmp(a, "cuda"); break;
    case FLAG_METRICS: o.metrics = a; break;
    case FLAG_ON_NAN:
      o.on_nan = strcmp(a, "skip") == 0 ? MOERT_ON_NAN_SKIP : MOERT_ON_NAN_STOP;
      ok = !strcmp(a, "skip") || !strcmp(a, "stop");
      break;
    case FLAG_DATA: o.data = a; break;
    case FLAG_CHECKPOINT: o.checkpoint = a; break;
    case FLAG_PROMPT: o.prompt = a; break;
    case FLAG_KCACHE: o.kernel_cache = a; break;
    case FLAG_NO_KCACHE: o.no_kernel_cache = true; break;
    case FLAG_TRACE: o.trace = a; break;
    case FLAG_ROUTING_TRACE: o.routing_trace = a; break;
    case FLAG_COMM: o.comm = a; ok = !strcmp(a, "mpi") || !strcmp(a, "self") || !strcmp(a, "nccl"); break;
    case FLAG_VARIANT:
      if (o.nvariants == MAX_FORCED) return usage_error(argv0, "%s", "too many --variant options (limit is 64)");
      variants[o.nvariants++] = a;
      ok = moert_variant_well_formed(a);
      break;
    case FLAG_RESUME: o.resume = true; break;
    case FLAG_OVERWRITE: o.overwrite = true; break;
    case FLAG_QUIET: o.quiet = true; break;
    case FLAG_CALIBRATE: calibrate = a; break;
    case FLAG_HELP: usage(m, argv0, stdout); return 0;
    default: return usage_error(argv0, "unknown option '%s'", argv[optind - 1]);
    }
    if (!ok) {
      char msg[200];
      snprintf(msg, sizeof msg, "bad value '%%s' for --%s (%s)", flag_info[c].name, wanted(c));
      return usage_error(argv0, msg, a);
    }
  }
  if (optind < argc) return usage_error(argv0, "unexpected argument '%s'", argv[optind]);
  if (m->vocab == 0 && o.generate) return usage_error(argv0, "%s", "--generate needs a model with a vocabulary");
  if (o.resume && !o.checkpoint)
    return usage_error(argv0, "%s", "--resume needs a checkpoint directory: --checkpoint DIR");
  if (o.resume && o.overwrite)
    return usage_error(argv0, "%s", "--resume and --overwrite exclude each other: continue the checkpoint, or replace it");
  if (!m->train.has_train && o.resume)
    return usage_error(argv0, "%s", "--resume needs a model with a train block");
  if (o.metrics && o.routing_trace && strcmp(o.metrics, o.routing_trace) == 0)
    return usage_error(argv0, "%s", "--metrics and --routing-trace name the same file: give each its own");
  const bool want_nccl = o.comm && strcmp(o.comm, "nccl") == 0;
  if (want_nccl && o.backend && strcmp(o.backend, "cpu") == 0)
    return usage_error(argv0, "%s", "--comm nccl needs the cuda backend (NCCL moves GPU memory); with "
                                    "--backend cpu use --comm mpi");
  o.variants = variants;
  if (calibrate) return moert_calibrate(m, &o, calibrate, &argc, &argv, argv0);
  return moert_run(m, &o, &argc, &argv, argv0);
}
