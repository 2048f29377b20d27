#!/usr/bin/env python3
"""kernel_profile.py — where a MoE layer's step goes on the GPU, kernel by
kernel: Nsight Compute (ncu, with --clock-control none, as the device's
METHOD.md asks) measures every kernel of a short run of one-layer specs
(bench/gpu/layer_bench.py spec: bf16, SGD, synthetic tokens through an
embedding and a small softmax head, so no teacher network runs), each
kernel's time and DRAM bytes; this groups them by what they do (the expert
GEMMs, the gate, dispatch and combine, activations and biases, the
optimizer, the rest) and prints, per configuration, the categories' time a
step and their achieved bandwidth, and the kernels that take the most time.
It answers issue 18's "where the time goes": the gate's share of the layer,
dispatch and combine against the copy bandwidth, the GEMMs' share.

  kernel_profile.py run [--moec build/compiler/moec] [--configs issue18 | "T,M,H,E,k,f[,act] ..."]
                        [--steps 2] [--ncu ncu] [--copy-gbps GBPS] [--out DIR]
  kernel_profile.py parse CSV [--steps N] [--copy-gbps GBPS] [--title TEXT]
      the tables of one ncu CSV (`ncu --csv --page raw --print-units base`)

Every kernel of the run is measured (CUDA graphs off: MOEC_CUDA_GRAPHS=0),
and the totals are divided by the steps: the kernels of a step are the same
at every step of these fixed specs. ncu serializes and replays kernels, so
the times are of each kernel alone, without the overlap of a real step.
"""
import argparse
import csv
import io
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum")

# moec's kernels (templates/*.cu, moert_k_NAME) by what they do; the first
# pattern that matches NAME wins
CATEGORIES = [
    ("gate", r"^(gate_|aux_loss|l2norm_|scale_by_exp|add_dot_unclamped)"),
    ("dispatch and combine", r"^(dispatch|combine|drop_beyond|zero_tails|copy_blocks)"),
    ("activation and bias", r"^(act_|swiglu_|bias_|colsum|scale_rows)"),
    ("optimizer and norm", r"^(adamw|sgd|norm_split|clip_factor|sumsq|dot$|scale$|axpy|add$)"),
    ("embedding, head, data", r"^(embed_|xent|mse|fill_normal|cvt_)"),
    ("norms", r"^(layernorm|rmsnorm)"),
]
UNITS = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3, "ns": 1e-6, "us": 1e-3, "ms": 1.0,
         "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}


def category(kernel):
    """What a kernel does, by its name: moec's own by moert_k_NAME; any other
    (cuBLAS, cuBLASLt) is a GEMM."""
    m = re.match(r"moert_k_(\w+)", kernel)
    if not m:
        return "GEMMs (cuBLAS, cuBLASLt)"
    name = m.group(1)
    for cat, pat in CATEGORIES:
        if re.search(pat, name):
            return cat
    return "other moec kernels"


def number(s):
    return float(s.replace(",", ""))


def parse_csv(text):
    """[(kernel name, ms, bytes read, bytes written)] of an ncu raw CSV (the
    header line starts with "ID"; a units line may follow; ncu's own lines
    before the header are skipped)."""
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        raise ValueError("no ncu CSV header (a line starting with \"ID\") in the input")
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    head = rows[0]
    try:
        kcol = next(i for i, h in enumerate(head) if h in ("Kernel Name", "Function Name"))
        mcols = [head.index(m) for m in METRICS]
    except (StopIteration, ValueError):
        raise ValueError("the CSV lacks the kernel name or one of %s: columns %s" % (", ".join(METRICS), head))
    scale = [1e-6, 1.0, 1.0]  # base units: ns, bytes
    out = []
    for r in rows[1:]:
        if len(r) <= max([kcol] + mcols):
            continue
        try:
            vals = [number(r[c]) for c in mcols]
        except ValueError:  # the units line
            scale = [UNITS.get(r[c].strip(), s) for c, s in zip(mcols, scale)]
            continue
        out.append((r[kcol], vals[0] * scale[0], vals[1] * scale[1], vals[2] * scale[2]))
    if not out:
        raise ValueError("the CSV has no kernel rows")
    return out


def tables(kernels, steps, copy_gbps=None, title=""):
    """The markdown of one run: categories, then the kernels by time."""
    cats, names = {}, {}
    for name, ms, rd, wr in kernels:
        c = category(name)
        for d, key in ((cats, c), (names, name)):
            t = d.setdefault(key, [0, 0.0, 0.0, 0.0])
            t[0] += 1
            t[1] += ms
            t[2] += rd + wr
            if d is names:
                t[3] = c
    total = sum(t[1] for t in cats.values())
    bw = "GB/s" + (" (of the copy bandwidth)" if copy_gbps else "")

    def gbps(t):
        g = t[2] / (t[1] * 1e-3) / 1e9 if t[1] > 0 else 0.0
        return "%.0f" % g + (" (%.0f%%)" % (100 * g / copy_gbps) if copy_gbps else "")

    out = []
    if title:
        out += ["#### " + title, ""]
    out += ["| what | kernels a step | ms a step | share | DRAM bytes a step | %s |" % bw,
            "|---|---:|---:|---:|---:|---:|"]
    for c, t in sorted(cats.items(), key=lambda kv: -kv[1][1]):
        out.append("| %s | %g | %.3f | %.1f%% | %.1f MB | %s |" % (
            c, t[0] / steps, t[1] / steps, 100 * t[1] / total, t[2] / steps / 1e6, gbps(t)))
    out.append("| all kernels | %g | **%.3f** | 100%% | %.1f MB | %s |" % (
        sum(t[0] for t in cats.values()) / steps, total / steps, sum(t[2] for t in cats.values()) / steps / 1e6,
        gbps([0, total, sum(t[2] for t in cats.values())])))
    out += ["", "| kernel | what | calls a step | ms a step | %s |" % bw, "|---|---|---:|---:|---:|"]
    for n, t in sorted(names.items(), key=lambda kv: -kv[1][1])[:12]:
        short = n if len(n) <= 70 else n[:67] + "..."
        out.append("| `%s` | %s | %g | %.3f | %s |" % (short.replace("|", "/"), t[3], t[0] / steps,
                                                         t[1] / steps, gbps(t)))
    return "\n".join(out) + "\n"


def cmd_parse(a):
    with open(a.csv) as f:
        text = f.read()
    sys.stdout.write(tables(parse_csv(text), a.steps, a.copy_gbps, a.title))
    return 0


def cmd_run(a):
    os.makedirs(a.out, exist_ok=True)
    cs = a.configs.split()
    if len(cs) == 1 and "," not in cs[0]:
        cs = subprocess.run([sys.executable, os.path.join(HERE, "layer_bench.py"), "preset", cs[0]], check=True,
                            capture_output=True, text=True).stdout.split()
    env = dict(os.environ, MOEC_CUDA_GRAPHS="0")
    print("# Kernel profile (ncu --clock-control none; each kernel alone, CUDA graphs off; %d steps a "
          "configuration, totals divided by them)\n" % a.steps)
    failed = 0
    for i, c in enumerate(cs):
        f = c.split(",")
        act = f[6] if len(f) > 6 else "relu"
        spec, binary = os.path.join(a.out, "p%d.moe" % i), os.path.join(a.out, "p%d" % i)
        with open(spec, "w") as fh:
            fh.write(subprocess.run([sys.executable, os.path.join(HERE, "layer_bench.py"), "spec"] + f[:6] +
                                    ["bf16", "sgd", act, str(a.steps), "vocab=256", "by=kernel_profile.py"],
                                    check=True, capture_output=True, text=True).stdout)
        subprocess.run([a.moec, "build", spec, "-o", binary], check=True, capture_output=True)
        cmd = [a.ncu, "--clock-control", "none", "--metrics", ",".join(METRICS), "--csv", "--page", "raw",
               "--print-units", "base", binary, "--backend", "cuda", "--steps", str(a.steps), "--kernel-cache",
               os.path.join(a.out, "kc"), "--quiet"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        with open(os.path.join(a.out, "p%d.csv" % i), "w") as fh:
            fh.write(r.stdout)
        title = "(T, M, H, E, k, f, act) = (%s)" % c
        try:
            if r.returncode:
                raise ValueError("ncu exited %d: %s" % (r.returncode, (r.stderr or r.stdout)[-400:]))
            sys.stdout.write(tables(parse_csv(r.stdout), a.steps, a.copy_gbps, title) + "\n")
        except ValueError as e:
            failed = 1
            print("#### %s\n\nfailed: %s\n" % (title, e))
        sys.stdout.flush()
    return failed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--moec", default="build/compiler/moec")
    r.add_argument("--configs", default="issue18")
    r.add_argument("--steps", type=int, default=2)
    r.add_argument("--ncu", default="ncu")
    r.add_argument("--copy-gbps", type=float)
    r.add_argument("--out", default="/tmp/moec-kernel-profile")
    p = sub.add_parser("parse")
    p.add_argument("csv")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--copy-gbps", type=float)
    p.add_argument("--title", default="")
    a = ap.parse_args()
    try:
        return cmd_run(a) if a.cmd == "run" else cmd_parse(a)
    except (ValueError, OSError, subprocess.CalledProcessError) as e:
        print("kernel_profile.py: %s" % e, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
