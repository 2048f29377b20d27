#!/usr/bin/env python3
"""cost_validate.py — the cost model (runtime/cost.c) against measurement, on
this machine: the tables of bench/RESULTS.md, "The cost model".

  bench/cost_validate.py [--moec build/compiler/moec] [--spec bench/cost_cpu.moe]
                         [--backend cpu|cuda] [--np 2,4] [--steps 8] [--out DIR]
                         [--configs "T,M,H,E,k,f[,act] ..." | --configs issue18]

1. Calibrates: `./model --calibrate` at 1 rank, and under mpirun at each
   --np (the all-to-all's alpha and beta there, GEMM rates with the cores
   shared as the run shares them).
2. Compute terms at one rank: `--trace` of a few steps, the spans of each
   category (experts, gate, dispatch + combine) summed over the MoE layers
   per step, median over the steps after the first two, against the terms
   `moec plan --json --gpu CAL` predicts.
3. Ranking at each --np: every candidate forced (--variant) for --steps
   steps, its MoE layers' measured time (the metrics' layer_ms, max over
   ranks; fastest of the steps after the first two), against the predicted
   totals (the network: `nvlink=measured,alpha_intra=measured`, and
   overlap=0 on the cpu, where compute and the all-to-all share cores).
4. With --configs: step 2 for each configuration's one-layer spec (written by
   bench/gpu/layer_bench.py spec, bf16, SGD; issue18: the performance issue's
   seven), predicted from the calibration of step 1, with the sum of the
   three terms and whether it is within 15%.
Prints markdown. Needs mpirun for --np > 1 (Open MPI: run as root with
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1).
"""
import argparse
import json
import os
import subprocess
import sys

CATS = {"experts": ["experts"], "gate": ["gate"], "dispatch_combine": ["dispatch", "combine"]}


def run(cmd, env=None, **kw):
    e = dict(os.environ)
    e.update(env or {})
    r = subprocess.run(cmd, env=e, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit("failed (%d): %s\n%s%s" % (r.returncode, " ".join(cmd), r.stdout[-2000:], r.stderr[-2000:]))
    return r.stdout


def mpirun(np_, argv):
    return ["mpirun", "--oversubscribe", "-np", str(np_)] + argv if np_ > 1 else argv


def plan(a, cal, world, net, spec=None):
    cmd = [a.moec, "plan", "--json", "--gpu", cal, "--ranks", str(world), spec or a.spec]
    if net:
        cmd += ["--net", net]
    return json.loads(run(cmd))


def least_after(values, skip=2):
    """The fastest step after the first `skip`: a shared machine's other
    work only ever adds time (the calibration takes its fastest too)."""
    v = values[skip:] if len(values) > skip else values
    return min(v)


def compute_terms(a, model, cal, out, spec=None, tag="1"):
    trace = os.path.join(out, "trace%s.json" % tag)
    p = plan(a, cal, 1, None, spec)["prediction"]
    # the variant that runs the experts whole, with no gather (r = 1 at one rank)
    v = "r=1,d=1,a2a=linear"
    run([model, "--backend", a.backend, "--steps", str(a.steps), "--trace", trace, "--variant", v, "--quiet"])
    ev = json.load(open(trace))["traceEvents"]
    per = {}  # term -> step -> us
    for e in ev:
        if e.get("ph") != "X":
            continue
        for term, cats in CATS.items():
            if e.get("cat") in cats:
                s = e["args"]["step"]
                per.setdefault(term, {}).setdefault(s, 0.0)
                per[term][s] += e["dur"]
    rows = []
    for term in CATS:
        pred = sum(next(x for x in l["variants"] if x["name"] == v)[term + "_ns"] for l in p["layers"]) / 1e6
        steps = sorted(per.get(term, {}))
        meas = least_after([per[term][s] for s in steps]) / 1e3 if steps else float("nan")
        rows.append((term, pred, meas))
    return rows


LAYER_BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu", "layer_bench.py")


def configs_table(a, cal, out):
    """Step 4: each configuration's compute terms, predicted and measured."""
    cs = a.configs.split()
    if len(cs) == 1 and "," not in cs[0]:
        cs = run([sys.executable, LAYER_BENCH, "preset", cs[0]]).split()
    print("\nCompute terms of one MoE layer per configuration (T, M, H, E, k, f, activation; bf16, SGD), one "
          "rank, ms per step; the prediction from the calibration above\n")
    print("| config | experts pred / meas | gate pred / meas | dispatch+combine pred / meas | sum pred / meas "
          "| sum error |\n|---|---|---|---|---|---|")
    ok = 0
    for i, c in enumerate(cs):
        f = c.split(",")
        act = f[6] if len(f) > 6 else "relu"
        spec = os.path.join(out, "config%d.moe" % i)
        with open(spec, "w") as fh:
            fh.write(run([sys.executable, LAYER_BENCH, "spec"] + f[:6] + ["bf16", "sgd", act, str(a.steps)]))
        model = os.path.join(out, "config%d" % i)
        run([a.moec, "build", spec, "-o", model])
        rows = compute_terms(a, model, cal, out, spec, "_config%d" % i)
        ps, ms = sum(r[1] for r in rows), sum(r[2] for r in rows)
        err = (ps - ms) / ms
        ok += abs(err) <= 0.15
        print("| %s | %s | %.0f%% |" % (c, " | ".join("%.3f / %.3f" % (r[1], r[2]) for r in rows + [("sum", ps, ms)]),
                                        100 * err))
    print("\nwithin 15%%: %d of %d configurations" % (ok, len(cs)))


def ranking(a, model, np_, out):
    cal = os.path.join(out, "cal_np%d.json" % np_)
    run(mpirun(np_, [model, "--backend", a.backend, "--calibrate", cal, "--quiet"]))
    net = "nvlink=measured,alpha_intra=measured" + (",overlap=0" if a.backend == "cpu" else "")
    p = plan(a, cal, np_, net)
    moe = [l["name"] for l in p["prediction"]["layers"]]
    names = [v["name"] for v in p["prediction"]["layers"][0]["variants"]]
    pred = {n: sum(next(v for v in l["variants"] if v["name"] == n)["total_ns"] for l in p["prediction"]["layers"])
            / 1e6 for n in names}
    meas = {}
    for n in names:
        mf = os.path.join(out, "m_np%d_%s.jsonl" % (np_, n.replace(",", "_").replace("=", "")))
        run(mpirun(np_, [model, "--backend", a.backend, "--steps", str(a.steps), "--variant", n, "--metrics", mf,
                         "--quiet"]))
        steps = [json.loads(x) for x in open(mf)]
        meas[n] = least_after([sum(s["layer_ms"][l] for l in moe) for s in steps])
    return cal, names, pred, meas


def kendall(names, pred, meas):
    agree = total = 0
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            x, y = names[i], names[j]
            total += 1
            agree += (pred[x] - pred[y]) * (meas[x] - meas[y]) > 0
    return agree, total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moec", default="build/compiler/moec")
    ap.add_argument("--spec", default="bench/cost_cpu.moe")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--np", default="2,4")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default="/tmp/moec_cost_validate")
    ap.add_argument("--configs", default="", help="T,M,H,E,k,f[,act] ... or a layer_bench.py preset (issue18)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    model = os.path.join(a.out, "model")
    run([a.moec, "build", a.spec, "-o", model])
    cal1 = os.path.join(a.out, "cal_np1.json")
    run([model, "--backend", a.backend, "--calibrate", cal1, "--quiet"])
    device = json.load(open(cal1))["device"]
    print("### %s, %s backend (%s)\n" % (os.path.basename(a.spec), a.backend, device))
    print("Compute terms at one rank, ms per step (all MoE layers; measured: the trace's spans, fastest of steps 3-%d)\n"
          % a.steps)
    print("| term | predicted | measured | error |\n|---|---|---|---|")
    for term, pred, meas in compute_terms(a, model, cal1, a.out):
        print("| %s | %.3f | %.3f | %+.0f%% |" % (term, pred, meas, 100 * (pred - meas) / meas))
    if a.configs:
        configs_table(a, cal1, a.out)
    for np_ in [int(x) for x in a.np.split(",") if x]:
        cal, names, pred, meas = ranking(a, model, np_, a.out)
        ag, tot = kendall(names, pred, meas)
        bp, bm = min(names, key=pred.get), min(names, key=meas.get)
        print("\nRanking at %d ranks (calibrated there: %s), MoE layers' ms per step\n" % (np_, os.path.basename(cal)))
        print("| variant | predicted | rank | measured | rank |\n|---|---|---|---|---|")
        rp = {n: i + 1 for i, n in enumerate(sorted(names, key=pred.get))}
        rm = {n: i + 1 for i, n in enumerate(sorted(names, key=meas.get))}
        for n in sorted(names, key=pred.get):
            print("| %s | %.3f | %d | %.3f | %d |" % (n, pred[n], rp[n], meas[n], rm[n]))
        print("\npairs ordered alike: %d of %d; predicted best %s runs in %.3f ms, the measured best %s in %.3f ms"
              " (%.0f%% slower)" % (ag, tot, bp, meas[bp], bm, meas[bm], 100 * (meas[bp] / meas[bm] - 1)))


if __name__ == "__main__":
    main()
