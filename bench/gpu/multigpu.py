#!/usr/bin/env python3
"""multigpu.py — the helper of multigpu.sh: the candidates and time estimates of
its runs, the statistics of their metrics and traces, and the markdown report.

  candidates PLAN.json NODES           the variants a run at the plan's world size has on
                                       NODES nodes (1: the plan's; 2: each r >= 1 also as 2dh)
  estimate PLAN.json BACKEND NODES     estimated ms of one step, the mean over those variants
  report OUT                           OUT/report.md from OUT/runs.jsonl, OUT/budget.tsv and
                                       OUT/machine.txt, and the files the runs wrote
  check OUT                            exit 1 unless the report has every section and every
                                       run ran (bench.multigpu_cpu)

Every run of multigpu.sh is a line of OUT/runs.jsonl: {"phase", "id", "w", "rc", "secs",
"est", "log", "metrics", "trace", "env", ...} plus what its phase needs (E, nodes, d,
example, ...); rc "dry" or "skipped" when it did not run. Step times are medians over
steps after the warm-up; every statistic says how many steps it took.
"""
import json
import os
import re
import statistics
import sys

# --- the plan ------------------------------------------------------------------------------


def plan_moe(path):
    p = json.load(open(path))
    for layer in p["layers"]:
        if layer.get("kind") == "moe":
            return p, layer
    sys.exit(f"{path}: no MoE layer")


def candidates(path, nodes):
    """The candidates of the plan's first MoE layer on `nodes` nodes, in the
    runtime's order (placement.c: r, then d, then the algorithms as listed)."""
    _, layer = plan_moe(path)
    out = []
    for v in layer["variants"]:
        out.append(v)
        if nodes > 1 and v["r"] >= 1 and v["a2a"] == "linear":
            w = dict(v, a2a="2dh", name=v["name"].replace("a2a=linear", "a2a=2dh"))
            out.append(w)
    return out


# Rough rates for the estimates (the plan of a lease, not a measurement):
# bf16 expert GEMMs at 350 TFLOP/s, all-to-all and gathers at 80 GB/s a rank,
# 6 ms a step of everything else on an H100; the cpu backend at 5 GFLOP/s and
# 2 GB/s through shared memory.
RATES = {"cuda": (350e12, 80e9, 6.0), "cpu": (5e9, 2e9, 2.0)}


def estimate(path, backend, nodes):
    flops, bw, rest = RATES[backend]
    vs = candidates(path, nodes)
    ms = [1e3 * v["flops"] / flops + 1e3 * v["send_bytes"] / bw + rest for v in vs]
    return sum(ms) / len(ms)


# --- metrics and traces ---------------------------------------------------------------------


def metrics_rows(path):
    rows = []
    if path and os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line:
                r = json.loads(line)
                if "ms" in r:
                    rows.append(r)
    return rows


def first_variant(r):
    v = r.get("variants") or {}
    return next(iter(v.values()), None)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def step_split(rows):
    """Medians of a group of steps: the step, the MoE layer (fwd + bwd), the update, the rest."""
    ms = [r["ms"] for r in rows]
    layer = [sum(v for v in r["layer_ms"].values() if v is not None) for r in rows]
    upd = [r.get("update_ms") or 0.0 for r in rows]
    return {"n": len(rows), "ms": med(ms), "layer_ms": med(layer), "update_ms": med(upd),
            "rest_ms": med([a - b - c for a, b, c in zip(ms, layer, upd)]),
            "ms_min": min(ms), "ms_max": max(ms)}


def union(iv):
    out = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def length(u):
    return sum(b - a for a, b in u)


def meet(u, v):
    """The length of the intersection of two unions of intervals."""
    i = j = 0
    tot = 0.0
    while i < len(u) and j < len(v):
        a, b = max(u[i][0], v[j][0]), min(u[i][1], v[j][1])
        if b > a:
            tot += b - a
        if u[i][1] < v[j][1]:
            i += 1
        else:
            j += 1
    return tot


COMPUTE_CATS = ("gate", "dispatch", "experts", "combine", "gather")


def trace_terms(path, first_step, variant_of_step):
    """Per variant (of the step, from the metrics), medians over (rank, step) of the
    MoE phases' times in ms (runtime/trace.c's categories): the all-to-all (the union
    of its spans, tid 1), the experts, the parameter gathers and gradient
    reduce-scatters (r < S), gate + dispatch + combine; how much of the all-to-all
    overlaps the experts, and how much overlaps no compute at all (exposed)."""
    t = json.load(open(path))
    by = {}
    for e in t["traceEvents"]:
        if e.get("ph") != "X" or e["args"]["step"] < first_step:
            continue
        by.setdefault((e["pid"], e["args"]["step"]), []).append(e)
    per = {}
    for (pid, step), ev in by.items():
        v = variant_of_step.get(step)
        if v is None:
            continue
        span = lambda cats: union([(e["ts"], e["ts"] + e["dur"]) for e in ev if e["cat"] in cats])
        a2a, ex, comp = span(("all-to-all",)), span(("experts",)), span(COMPUTE_CATS)
        s = {"a2a": length(a2a), "experts": length(ex), "gather": length(span(("gather",))),
             "gdc": length(span(("gate", "dispatch", "combine"))),
             "a2a_over_experts": meet(a2a, ex), "a2a_exposed": length(a2a) - meet(a2a, comp)}
        per.setdefault(v, []).append(s)
    out = {}
    for v, ss in per.items():
        o = {k: med([s[k] for s in ss]) / 1e3 for k in ss[0]}
        a2a_total = sum(s["a2a"] for s in ss)
        o["overlap"] = sum(s["a2a_over_experts"] for s in ss) / a2a_total if a2a_total > 0 else None
        o["samples"] = len(ss)
        out[v] = o
    return out


def cycle_stats(run):
    """Per variant of a --variant cycle run: the split of its steps after the warm-up,
    and the trace's terms where the run was traced."""
    rows = [r for r in metrics_rows(run.get("metrics")) if r["step"] > run["warm_steps"]]
    groups = {}
    for r in rows:
        groups.setdefault(first_variant(r), []).append(r)
    out = {v: step_split(g) for v, g in groups.items()}
    if run.get("trace") and os.path.exists(run["trace"]):
        steps = {r["step"]: first_variant(r) for r in rows}
        for v, terms in trace_terms(run["trace"], run["warm_steps"] + 1, steps).items():
            out.setdefault(v, {})["terms"] = terms
    return out


def auto_stats(run):
    """A select = auto run: the selector's table when it finished exploring, then the
    steps after it (past auto_warm more): their split and the variants they ran."""
    rows = metrics_rows(run.get("metrics"))
    done = next((r for r in rows if "selector" in r), None)
    if done is None:
        return {"error": "the selector never finished exploring (no \"selector\" in the metrics)"}
    table = next(iter(done["selector"].values()))
    after = [r for r in rows if r["step"] > done["step"] + run["auto_warm"]]
    if not after:
        return {"error": f"no step after the exploration (ended at step {done['step']})", "table": table}
    ran = sorted({first_variant(r) for r in after})
    return dict(step_split(after), explored_at=done["step"], chosen=table["chosen"], ran=ran, table=table)


# --- the report -------------------------------------------------------------------------------


def fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def human_bytes(b):
    for unit, d in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= d:
            return f"{b / d:.1f} {unit}"
    return f"{b:.0f} B"


def human_bin(b):
    """A message size as a2a_bench sweeps them (powers of two): KiB, MiB, GiB."""
    for unit, d in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= d:
            return f"{b / d:g} {unit}"
    return f"{b} B"


def failed(runs):
    return [r for r in runs if r["rc"] not in (0, "0")]


def run_note(r):
    if r["rc"] in ("skipped", "failed"):
        return f"`{r['id']}` {'not run' if r['rc'] == 'skipped' else 'failed'}: {r.get('why', '')}"
    if r["rc"] == "dry":
        return None
    tail = ""
    if r.get("log") and os.path.exists(r["log"]):
        lines = [l.rstrip() for l in open(r["log"], errors="replace") if l.strip()]
        tail = " / ".join(lines[-3:])[:400]
    what = "timed out (a hang?)" if str(r["rc"]) in ("124", "137") else f"exit {r['rc']}"
    return f"`{r['id']}` failed ({what}, {r['secs']} s): {tail}"


def notes(runs):
    return [n for n in (run_note(r) for r in failed(runs)) if n]


def section_tests(runs, out):
    lines = ["## Correctness: `ctest -L multigpu`", ""]
    for r in runs:
        if r["rc"] in ("dry", "skipped"):
            continue
        lines.append(f"Command: `{r['cmd']}` ({r['secs']} s).")
        lines.append("")
        log = open(r["log"], errors="replace").read() if os.path.exists(r["log"]) else ""
        # every test's own output (SKIP messages, the comparisons) is in ctest's LastTest.log
        last = os.path.join(out, "tests", "LastTest.log")
        full = open(last, errors="replace").read() if os.path.exists(last) else log
        res = re.findall(r"Test +#\d+: (\S+) \.+[ *]*(Passed|\*\*\*Failed|\*\*\*Skipped|Not Run|\*\*\*Timeout)"
                         r"[^\n]*?([\d.]+) sec", log)
        if res:
            lines += ["| test | result | s |", "|---|---|---:|"]
            for name, what, secs in res:
                lines.append(f"| {name} | {what.strip('*')} | {secs} |")
            lines.append("")
        skipped = re.findall(r"SKIP: [^\n]*", full)
        if skipped:
            lines.append("Skip messages: " + "; ".join(sorted(set(skipped))[:6]))
            lines.append("")
        oks = re.findall(r"^(ok: [^\n]*|[^\n]*worst relative difference[^\n]*|[^\n]*relative difference [^\n]*tolerance[^\n]*)$",
                         full, re.M)
        if oks:
            lines.append("<details><summary>the comparisons the tests printed</summary>")
            lines.append("")
            lines += ["    " + o for o in oks]
            lines.append("</details>")
            lines.append("")
        summary = re.findall(r"\d+% tests passed[^\n]*", log)
        lines.append(f"Result: {summary[-1] if summary else 'no summary (see the log)'}.")
        lines.append("")
    return lines


def find_rows(obj):
    """The list of per-size records in an a2a_bench JSON, wherever it is."""
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        return obj
    if isinstance(obj, dict):
        for v in obj.values():
            rows = find_rows(v)
            if rows:
                return rows
    return None


SIZE_KEYS = ("bytes", "size", "size_bytes", "msg_bytes", "message_bytes", "total_bytes")


def section_a2a(runs, out):
    lines = ["## All-to-all: bus bandwidth against NCCL's own (a2a_bench)", ""]
    if not runs:
        return lines + ["Not run.", ""]
    for r in runs:
        if r["rc"] == "skipped":
            lines += [f"Skipped: {r.get('why', '')}", ""]
            continue
        lines.append(f"### W = {r['w']}" + (f", two nodes of {r['local']} (MOEC_LOCAL_SIZE, 2dh)"
                                             if r.get("local") else ""))
        lines.append("")
        lines.append(f"Command: `{r['cmd']}` ({r['secs']} s)")
        lines.append("")
        if r["rc"] == "dry":
            continue
        try:
            data = json.load(open(r["json"]))
        except (OSError, ValueError) as e:
            lines += [f"No JSON to read ({e}).", ""]
            continue
        if isinstance(data, dict):
            meta = {k: v for k, v in data.items() if isinstance(v, (str, int, float, bool))}
            if meta:
                lines += ["; ".join(f"{k}: {v}" for k, v in meta.items()), ""]
        rows = find_rows(data)
        if not rows:
            lines += ["The JSON holds no list of per-size records; it is in logs.tar.gz as it came.", ""]
            continue
        keys = [k for k in rows[0] if k not in SIZE_KEYS]
        size = next((k for k in SIZE_KEYS if k in rows[0]), None)
        head = ([size] if size else []) + keys
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for x in rows:
            cells = [human_bin(x[size])] if size else []
            cells += [fmt(x[k]) if isinstance(x.get(k), float) else "-" if x.get(k) is None else str(x[k])
                      for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def section_adaptive(runs, out):
    lines = ["## Adaptive parallelism: every variant, and select = auto", ""]
    meta = next((r for r in runs if r.get("layer")), None)
    if meta:
        lines += [f"One MoE layer, {meta['layer']} (T tokens **per rank**: `tokens` of a spec is per rank, so "
                  "the global batch is W T and every rank does the work of the one-GPU benchmark; "
                  "bf16, SGD; a synthetic-token embedding and softmax head (vocab 256) instead of the "
                  "regression teacher, whose fp32 GEMMs would add ~22 ms a step that no variant changes). "
                  f"Variant runs: `--variant cycle`, the first {meta['warm_cycles']} cycles not measured, "
                  f"then {meta['cycles']} steps of each variant; medians. Auto: `select = auto` "
                  f"(a warm-up run of each candidate, then explore_steps {meta['explore']}), the median of "
                  f"{meta['auto_steps']} steps after its "
                  f"exploration and {meta['auto_warm']} more. Two nodes: MOEC_LOCAL_SIZE = W/2 on this "
                  "one host (2dh runs as across nodes, over the same NVLink). Times from the metrics "
                  "(`ms` the step, `layer_ms` the MoE layer's forward + backward by CUDA events, "
                  "`update_ms` SGD); the all-to-all, experts and gather terms from the run's trace "
                  "(medians over ranks and steps; the all-to-all from the comm stream's events). "
                  "Sent/step: `moec plan`'s bytes a rank sends (tokens, gathers and gradient scatters).", ""]
    keys = sorted({(r["w"], r["E"]) for r in runs if "E" in r})
    summary = []
    for w, E in keys:
        rs = [r for r in runs if r.get("w") == w and r.get("E") == E]
        plan = next((r["plan"] for r in rs if r.get("plan")), None)
        sent = {}
        S = None
        if plan and os.path.exists(plan):
            _, layer = plan_moe(plan)
            S = layer["shards"]
            for v in candidates(plan, 2):
                sent[v["name"]] = v["send_bytes"]
        lines.append(f"### W = {w}, E = {E} (S = {S}: {'E < W, each expert split over S ranks' if E < w else 'E >= W, whole experts'})")
        lines.append("")
        variants = {}
        for r in rs:
            if r.get("kind") == "cycle" and r["rc"] in (0, "0"):
                for v, s in cycle_stats(r).items():
                    variants[(v, r["nodes"])] = s
        if variants:
            lines += ["| variant | nodes | steps | step ms | MoE layer ms | update ms | rest ms | a2a ms | "
                      "experts ms | gather ms | gate+dispatch+combine ms | a2a exposed ms | sent/step |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            best = min((s["ms"], v) for (v, n), s in variants.items() if s.get("ms") is not None and n == 1) \
                if any(n == 1 for _, n in variants) else None
            best_any = min((s["ms"], v, n) for (v, n), s in variants.items() if s.get("ms") is not None)
            for (v, n), s in sorted(variants.items(), key=lambda kv: (kv[0][1], kv[1].get("ms") or 1e30)):
                t = s.get("terms") or {}
                mark = "**" if best and v == best[1] and n == 1 else ""
                lines.append(f"| {mark}{v}{mark} | {n} | {s.get('n', 0)} | {mark}{fmt(s.get('ms'))}{mark} | "
                             f"{fmt(s.get('layer_ms'))} | {fmt(s.get('update_ms'))} | {fmt(s.get('rest_ms'))} | "
                             f"{fmt(t.get('a2a'))} | {fmt(t.get('experts'))} | {fmt(t.get('gather'))} | "
                             f"{fmt(t.get('gdc'))} | {fmt(t.get('a2a_exposed'))} | "
                             f"{human_bytes(sent[v]) if v in sent else '-'} |")
            lines.append("")
            few = [f"{v} ({n} node{'s' if n > 1 else ''}): {s.get('n', 0)}" for (v, n), s in variants.items()
                   if s.get("n", 0) < meta["cycles"]] if meta else []
            if few:
                lines += [f"Fewer than {meta['cycles']} measured steps: " + ", ".join(few), ""]
        else:
            best = best_any = None
        auto = next((r for r in rs if r.get("kind") == "auto" and r["rc"] in (0, "0")), None)
        a = auto_stats(auto) if auto else None
        if a and "error" not in a:
            lines.append(f"Auto: explored until step {a['explored_at']}, chose **{a['chosen']}** (ran "
                         f"{', '.join(a['ran'])} after it); median step **{fmt(a['ms'])} ms**, MoE layer "
                         f"{fmt(a['layer_ms'])} ms over {a['n']} steps. The selector's table (mean layer ms "
                         "of its exploration steps): " +
                         ", ".join(f"{k} {fmt(v)}" for k, v in sorted(a["table"]["ms"].items(), key=lambda kv: kv[1])))
            lines.append("")
        elif a:
            lines += [f"Auto: {a['error']}", ""]
        row = {"w": w, "E": E, "S": S}
        if best:
            bs = variants[(best[1], 1)]
            row.update(best=best[1], best_ms=bs["ms"], best_layer=bs["layer_ms"])
        if best_any:
            row.update(best_any=f"{best_any[1]} ({best_any[2]} node{'s' if best_any[2] > 1 else ''})",
                       best_any_ms=best_any[0])
        if a and "error" not in a:
            row.update(auto=a["chosen"], auto_ms=a["ms"], auto_layer=a["layer_ms"])
        summary.append(row)
    if summary:
        lines += ["### Summary", "",
                  "| W | E | S | best variant (one node) | its step ms | auto's choice | auto step ms | "
                  "auto / best (step) | auto / best (MoE layer) | within 3% | best with 2dh emulated |",
                  "|---:|---:|---:|---|---:|---|---:|---:|---:|---|---|"]
        for s in summary:
            r1 = s["auto_ms"] / s["best_ms"] if "auto_ms" in s and "best_ms" in s else None
            r2 = s["auto_layer"] / s["best_layer"] if "auto_layer" in s and "best_layer" in s else None
            ok = "-" if r1 is None else ("yes" if r1 <= 1.03 else "**no**")
            lines.append(f"| {s['w']} | {s['E']} | {s['S']} | {s.get('best', '-')} | {fmt(s.get('best_ms'))} | "
                         f"{s.get('auto', '-')} | {fmt(s.get('auto_ms'))} | {fmt(r1, 3)} | {fmt(r2, 3)} | {ok} | "
                         f"{s.get('best_any', '-')} {fmt(s.get('best_any_ms'))} |")
        lines += ["", "Auto's steps come from a run of their own, the best variant's from the cycle run: "
                  "the ratio includes the spread between two runs of one binary. Why the best variant "
                  "changes: compare, row by row, the all-to-all and gather terms (communication; "
                  "sent/step from the plan) against the experts term (compute, the same FLOPs in every "
                  "variant of a configuration). *Note for RESULTS.md: write it from these terms.*", ""]
    return lines


def section_overlap(runs, out):
    lines = ["## Overlap: d = 1, 2, 4", ""]
    meta = next((r for r in runs if r.get("config")), None)
    if meta:
        lines += [f"One MoE layer {meta['config']} (T per rank), W = {meta['w']}, variant r = 1 with d forced "
                  f"(`--variant r=1,d=D,a2a=linear`), {meta['steps']} steps, the first {meta['warm_steps']} "
                  "not measured, medians; each run traced (`--trace`): the all-to-all and experts terms "
                  "and their overlap come from the trace (union of the all-to-all spans on tid 1, the "
                  "comm stream, against the experts spans on tid 0; medians over ranks and steps).", ""]
    rows = []
    for r in sorted((r for r in runs if r.get("d")), key=lambda r: r["d"]):
        if r["rc"] not in (0, "0"):
            continue
        c = cycle_stats(r)
        if not c:
            continue
        v, s = next(iter(c.items()))
        rows.append((r["d"], s, r))
    if rows:
        lines += ["| d | steps | step ms | MoE layer ms | a2a ms | experts ms | max(a2a, experts) | "
                  "gate+dispatch+combine ms | a2a overlapping experts | a2a exposed ms |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for d, s, r in rows:
            t = s.get("terms") or {}
            mx = max(t["a2a"], t["experts"]) if t.get("a2a") is not None and t.get("experts") is not None else None
            ov = t.get("overlap")
            lines.append(f"| {d} | {s['n']} | {fmt(s['ms'])} | {fmt(s['layer_ms'])} | {fmt(t.get('a2a'))} | "
                         f"{fmt(t.get('experts'))} | {fmt(mx)} | {fmt(t.get('gdc'))} | "
                         f"{'-' if ov is None else f'{100 * ov:.0f}%'} | {fmt(t.get('a2a_exposed'))} |")
        lines.append("")
        d1 = next((s for d, s, _ in rows if d == 1), None)
        if d1 and d1.get("terms"):
            t = d1["terms"]
            ideal = d1["layer_ms"] - t["a2a"] - t["experts"] + max(t["a2a"], t["experts"])
            can = d1["layer_ms"] - ideal
            said = (" ".join(f"d = {d}: {fmt(s['layer_ms'])} ms, {100 * (d1['layer_ms'] - s['layer_ms']) / can:.0f}% "
                             "of that saving." for d, s, _ in rows if d > 1)
                    if can > 0.05 * d1["layer_ms"] else "There is little to save by overlapping here.")
            lines.append(f"At d = 1 the layer is {fmt(d1['layer_ms'])} ms with {fmt(t['a2a'])} ms of all-to-all "
                         f"and {fmt(t['experts'])} ms of experts in series; overlapped perfectly, it would be "
                         f"{fmt(ideal)} ms (the rest, {fmt(d1['layer_ms'] - t['a2a'] - t['experts'])} ms, "
                         f"plus max(a2a, experts)). " + said)
            ratio = t["a2a"] / t["experts"] if t["experts"] else None
            if ratio is not None and not 0.5 <= ratio <= 2:
                lines.append(f"The all-to-all is {fmt(ratio)}x the experts here: not the similar times the "
                             "issue asks for; pick another `--overlap-config` (more H for more compute, "
                             "more M for more bytes).")
            lines.append("")
        tr = next((r for _, _, r in rows if r["d"] == 2 and r.get("trace")), None)
        if tr:
            lines += [f"The d = 2 trace: `{os.path.basename(tr['trace'])}` (chrome://tracing or "
                      "ui.perfetto.dev; pid = rank, tid 0 compute stream, tid 1 comm stream).", ""]
    return lines


def run_dtype(log):
    """The experts' dtype a run's header names: bf16 or fp32."""
    if log and os.path.exists(log):
        for line in open(log, errors="replace"):
            m = re.match(r"backend \w+ \((\w+)", line)
            if m:
                return "bf16" if m[1] == "bf16" else "fp32"
    return "?"


def loss_compare(a, b, first, last):
    la = [r["loss"] for r in metrics_rows(a)]
    lb = [r["loss"] for r in metrics_rows(b)]
    n = min(len(la), len(lb))
    if n == 0:
        return None
    rel = [abs(x - y) / abs(y) for x, y in zip(la[:n], lb[:n])]
    f = min(first, n)
    worst = max(range(f), key=lambda i: rel[i])
    ma = statistics.mean(la[n - min(last, n):n])
    mb = statistics.mean(lb[n - min(last, n):n])
    ev = lambda p: [r["eval_loss"] for r in metrics_rows(p) if "eval_loss" in r]
    return {"steps": n, "first": f, "worst": rel[worst], "worst_step": worst + 1, "last": min(last, n),
            "mean_a": ma, "mean_b": mb, "mean_rel": abs(ma - mb) / abs(mb), "loss_a": la[:n], "loss_b": lb[:n],
            "eval_a": ev(a), "eval_b": ev(b)}


# tolerances of the verdicts: fp32 as dist.invariance (1e-4) for the first
# steps and 1e-3 for the late mean; bf16 as gpu.bf16 (1e-2, 5e-2)
BYTES_TOL = {"fp32": (1e-4, 1e-3), "bf16": (1e-2, 5e-2)}


def section_bytes(runs, out):
    lines = ["## Training the byte-level example: W GPUs against one, the same global batch (dropless)", ""]
    for ex in sorted({r["example"] for r in runs if r.get("example")}):
        rs = [r for r in runs if r.get("example") == ex]
        one = next((r for r in rs if r["w"] == 1), None)
        many = next((r for r in rs if r["w"] > 1), None)
        if not one or not many:
            continue
        dtype = run_dtype(one.get("log"))
        lines.append(f"### {ex} ({dtype} experts), W = {many['w']} vs 1")
        lines.append("")
        lines.append(f"`capacity_factor = 0` (dropless), checkpoints off; {one.get('steps')} steps; global batch "
                     f"{one.get('tokens')} tokens: `--tokens {one.get('tokens')}` at W = 1, "
                     f"`--tokens {many.get('tokens')}` a rank at W = {many['w']}. Commands: `{one['cmd']}`; `{many['cmd']}`.")
        lines.append("")
        if one["rc"] not in (0, "0") or many["rc"] not in (0, "0"):
            continue
        c = loss_compare(many["metrics"], one["metrics"], 20, 20)
        if not c:
            lines += ["No steps to compare.", ""]
            continue
        tol = BYTES_TOL.get(dtype, BYTES_TOL["bf16"])
        ok = c["worst"] <= tol[0] and c["mean_rel"] <= tol[1]
        lines.append(f"First {c['first']} steps: worst relative difference **{c['worst']:.2e}** (step "
                     f"{c['worst_step']}); mean of the last {c['last']} losses: {c['mean_b']:.5f} (W = 1) and "
                     f"{c['mean_a']:.5f} (W = {many['w']}), relative difference **{c['mean_rel']:.2e}**. "
                     f"Within {tol[0]:g} / {tol[1]:g} ({dtype}): **{'yes' if ok else 'no'}**.")
        if c["eval_a"] and c["eval_b"]:
            lines.append(f"Held-out loss at the end: {c['eval_b'][-1]:.5f} (W = 1), {c['eval_a'][-1]:.5f} "
                         f"(W = {many['w']}).")
        lines.append("")
        pick = sorted({0, 1, 2, 4, 9, 19, 49, 99, 199, 499, c["steps"] - 1} & set(range(c["steps"])))
        lines += ["| step | loss W = 1 | loss W = %d | relative difference |" % many["w"], "|---:|---:|---:|---:|"]
        for i in pick:
            lines.append(f"| {i + 1} | {c['loss_b'][i]:.5f} | {c['loss_a'][i]:.5f} | "
                         f"{abs(c['loss_a'][i] - c['loss_b'][i]) / abs(c['loss_b'][i]):.1e} |")
        lines.append("")
    return lines


SECTIONS = [("tests", section_tests), ("a2a", section_a2a), ("adaptive", section_adaptive),
            ("overlap", section_overlap), ("bytes", section_bytes)]


def report(out):
    runs = [json.loads(l) for l in open(os.path.join(out, "runs.jsonl"))] \
        if os.path.exists(os.path.join(out, "runs.jsonl")) else []
    lines = ["# moec on several GPUs: the multi-GPU issue's measurements", ""]
    mach = os.path.join(out, "machine.txt")
    if os.path.exists(mach):
        lines += [l.rstrip() for l in open(mach)] + [""]
    budget = []
    if os.path.exists(os.path.join(out, "budget.tsv")):
        budget = [l.rstrip("\n").split("\t") for l in open(os.path.join(out, "budget.tsv")) if l.strip()]
    done = {b[0] for b in budget}
    for name, fn in SECTIONS:
        rs = [r for r in runs if r["phase"] == name]
        if not rs and name not in done:
            continue
        lines += fn(rs, out)
        ns = notes(rs)
        if ns:
            lines += ["Failures and runs not made:", ""] + [f"- {n}" for n in ns] + [""]
    if budget:
        lines += ["## Time", "", "| phase | estimated s | used s | runs | result |", "|---|---:|---:|---:|---|"]
        for b in budget:
            lines.append("| " + " | ".join(b) + " |")
        lines.append("")
    open(os.path.join(out, "report.md"), "w").write("\n".join(lines))


def check(out):
    """For bench.multigpu_cpu: the report has every section, each with its figures, and
    every run the script made ran (a2a may be skipped where a2a_bench is not built)."""
    text = open(os.path.join(out, "report.md")).read()
    want = ["## Correctness: `ctest -L multigpu`", "| multigpu.variants_np2 |",
            "## All-to-all", "## Adaptive parallelism", "### Summary", "auto / best (step)",
            "## Overlap: d = 1, 2, 4", "| 4 |", "a2a overlapping experts",
            "## Training the byte-level example", "relative difference **", "## Time"]
    missing = [w for w in want if w not in text]
    runs = [json.loads(l) for l in open(os.path.join(out, "runs.jsonl"))]
    bad = [r["id"] for r in runs if r["rc"] not in (0, "0") and not (r["phase"] == "a2a" and r["rc"] == "skipped")]
    summary = text.split("### Summary", 1)[-1].split("\n\n", 2)[1] if "### Summary" in text else ""
    rows = [l for l in summary.splitlines() if re.match(r"\| \d", l)]
    if missing or bad or not rows or any("| - |" in l for l in rows):
        sys.exit(f"report {out}/report.md: missing {missing}; failed runs {bad}; summary rows {rows}")
    print(f"ok: {out}/report.md has every section; {len(runs)} runs; {len(rows)} adaptive summary rows")


def main():
    cmd, a = sys.argv[1], sys.argv[2:]
    if cmd == "candidates":
        print(" ".join(v["name"] for v in candidates(a[0], int(a[1]))))
    elif cmd == "estimate":
        print(f"{estimate(a[0], a[1], int(a[2])):.1f}")
    elif cmd == "report":
        report(a[0])
    elif cmd == "check":
        check(a[0])
    else:
        sys.exit(f"multigpu.py: unknown command {cmd}")


if __name__ == "__main__":
    main()
