#!/usr/bin/env python3
"""layer_bench.py — the helper of layer_bench.sh: writes the one-layer specs,
reads the runs' metrics and headers, and prints the markdown table.

  spec T M H E k f DTYPE OPTIMIZER ACTIVATION STEPS [KEY=VALUE...]
                                                      the spec, on stdout; KEY=VALUE (multigpu.py):
                                                      parallel=ITEMS (the parallel block's items instead
                                                      of one fixed variant), vocab=V (a token embedding
                                                      and softmax head on synthetic tokens instead of
                                                      the teacher), by=WHO (the header's author),
                                                      moe=ITEMS (more items of the moe block, e.g.
                                                      "gate = sigmoid; groups = 8;": router_bench.sh)
  plan PLAN.json                                      "flops_per_step bytes" of moec plan --json
  dtype RUN.log                                       the dtype the binary says it computes in
  row CONFIG DTYPE_ASKED RUN.log METRICS WARM PLAN ACTIVATION
                                                      one JSON line: our figures for the config
  time CMD...                                         wall seconds of one run of CMD (its output to /dev/null)
  table OURS.jsonl TORCH.json|- STARTUP.txt           the markdown table (TORCH "-": none)
"""
import json, re, statistics, subprocess, sys, time


def useful_flops(T, M, H, k, act):
    # fwd + bwd GEMM FLOPs of the experts on the T*k routed tokens: 2 GEMMs
    # forward, 4 backward, 2*M*H each per token; swiglu's fc1 is twice as wide
    per = 18 if act == "swiglu" else 12
    return per * T * k * M * H


def parse_config(c):
    v = c.split(",")
    return int(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4]), float(v[5])


def cmd_spec(a):
    T, M, H, E, k = (int(x) for x in a[:5])
    f, dtype, opt, act, steps = a[5], a[6], a[7], a[8], int(a[9])
    kv = dict(x.split("=", 1) for x in a[10:])
    unknown = set(kv) - {"parallel", "vocab", "by", "moe"}
    if unknown:
        sys.exit(f"spec: unknown KEY=VALUE {sorted(unknown)}")
    name = f"layer_T{T}_M{M}_H{H}_E{E}_k{k}_" + ("dropless" if float(f) == 0 else "f" + f.replace(".", "p"))
    vocab = int(kv.get("vocab", 0))
    more = " " + kv["moe"].strip() if kv.get("moe", "").strip() else ""
    what = (f"synthetic tokens\n# (vocab {vocab}: an embedding and a softmax head, no teacher)" if vocab
            else "regression on\n# the teacher")
    print(f"""# {kv.get("by", "layer_bench.sh")}: one MoE layer (T={T}, M={M}, H={H}, E={E}, k={k}, f={f}), {what};\
 written by bench/gpu/layer_bench.py, do not edit.
model {name} {{
  dim = {M};
  tokens = {T};""" + (f"\n  vocab = {vocab};" if vocab else "") + f"""
  dtype = {dtype};
  moe layer {{ experts = {E}; hidden = {H}; top_k = {k}; capacity_factor = {f}; activation = {act};{more} }}
}}""")
    if "parallel" in kv:
        print(f"parallel {{ {kv['parallel']} }}")
    else:
        print("""# one variant (r = 1, d = 1: at one rank, no communication), no exploration
parallel { adaptive_r = 1; overlap_degree = 1; select = fixed; }""")
    print(f"train {{ steps = {steps}; optimizer = {opt}; lr = 1e-4; seed = 1; log_every = {steps}; }}")


def cmd_plan(a):
    p = json.load(open(a[0]))
    f = p["flops_per_step"]
    print("%.0f %d" % (f["forward"] + f["backward"], sum(p["memory_bytes"].values())))


def run_dtype(log):
    for line in open(log):
        m = re.match(r"backend (\w+) \((\w+)", line)
        if m:
            return m[2]
    return "?"


def row_figures(config, asked, log, metrics, warm, plan, act):
    """Our figures for one run of CONFIG (a dict): the medians over the steps
    after WARM of the metrics file METRICS, with the plan's FLOPs and the
    dtype the run's LOG says it computed in."""
    T, M, H, E, k, f = parse_config(config)
    rows = [json.loads(l) for l in open(metrics) if l.strip()]
    rows = [r for r in rows if "ms" in r and r["step"] > warm]
    if not rows:
        sys.exit(f"{metrics}: no step after the first {warm}")
    # forward + backward of the MoE layer, and the optimizer's update (each
    # synchronized at its ends on a device): what torch_ref.py's layer step does
    layer = [sum(v for v in r["layer_ms"].values() if v is not None) + r.get("update_ms", 0.0) for r in rows]
    step = [r["ms"] for r in rows]
    p = json.load(open(plan))
    model_flops = p["flops_per_step"]["forward"] + p["flops_per_step"]["backward"]
    useful = useful_flops(T, M, H, k, act)
    lm, sm = statistics.median(layer), statistics.median(step)
    out = {"config": config, "T": T, "M": M, "H": H, "E": E, "k": k, "f": f, "activation": act,
           "dtype_asked": asked, "dtype": run_dtype(log), "steps": len(rows),
           "layer_ms": lm, "layer_ms_min": min(layer), "layer_ms_max": max(layer),
           "step_ms": sm, "useful_tflops": useful / (lm / 1e3) / 1e12,
           "model_tflops_step": model_flops / (sm / 1e3) / 1e12,
           "dropped": statistics.median(r["dropped"] for r in rows)}
    mfu = [r["mfu"] for r in rows if r.get("mfu") is not None]
    if mfu:
        out["mfu_step"] = statistics.median(mfu)
    return out


def cmd_row(a):
    print(json.dumps(row_figures(a[0], a[1], a[2], a[3], int(a[4]), a[5], a[6])))


def cmd_time(a):
    t0 = time.perf_counter()
    r = subprocess.run(a, stdout=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"{' '.join(a)} exited {r.returncode}")
    print(f"{dt:.3f}")


def span_medians(trace, warm, names):
    """For each span name, the median over the steps after WARM of its summed
    duration a step on rank 0 of the Chrome trace TRACE, in ms (0 for a name
    no step has; an error when none of the names is there)."""
    t = json.load(open(trace))
    per = {n: {} for n in names}
    for e in t["traceEvents"]:
        if e.get("ph") != "X" or e.get("pid", 0) != 0 or e.get("name") not in per:
            continue
        st = e.get("args", {}).get("step", 0)
        if st > warm:
            d = per[e["name"]]
            d[st] = d.get(st, 0.0) + e["dur"] / 1e3
    if not any(per.values()):
        sys.exit(f"{trace}: none of the spans {names} after step {warm}")
    return [statistics.median(per[n].values()) if per[n] else 0.0 for n in names]


def cmd_trace_spans(a):
    """trace_spans TRACE WARM NAME...: span_medians, on one line."""
    print(" ".join("%.4f" % x for x in span_medians(a[0], int(a[1]), a[2:])))


def fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def cmd_table(a):
    ours = [json.loads(l) for l in open(a[0]) if l.strip()]
    ref = json.load(open(a[1])) if a[1] != "-" else None
    startup = open(a[2]).read().split() if len(a) > 2 else []
    peaks = (ref or {}).get("gemm_peak_tflops_by_dtype", {})
    torch_ms = {}
    for r in (ref or {}).get("layers", []):
        torch_ms[(r["T"], r["M"], r["H"], r["E"], r["k"], float(r["f"]), r.get("dtype", "bf16"))] = r["torch_ms"]
    if ref:
        print(f"Device: {ref['device']}; PyTorch {ref['torch']}. GEMM peak (8192^3, measured in this run): " +
              ", ".join(f"{d} {v:.1f} TFLOP/s" for d, v in peaks.items()) +
              f"; copy bandwidth {ref['copy_gbps']:.0f} GB/s.")
        print()
    asked = {o["dtype_asked"] for o in ours}
    ran = {o["dtype"] for o in ours}
    if asked != ran:
        print(f"Note: asked for {', '.join(sorted(asked))}, the runtime computed in {', '.join(sorted(ran))} "
              "(its header says so): the rows are labeled with what ran.")
        print()
    extra_bf16 = any(o["dtype"] != "bf16" for o in ours) and any(k[-1] == "bf16" for k in torch_ms)
    head = ("| config (T, M, H, E, k, f) | dtype | moec layer ms | moec step ms | moec TFLOP/s | of the GEMM peak (its dtype) "
            "| PyTorch ms | PyTorch ms / moec ms |")
    sep = "|---|---|---:|---:|---:|---:|---:|---:|"
    if extra_bf16:
        head += " PyTorch bf16 ms |"
        sep += "---:|"
    print(head)
    print(sep)
    for o in ours:
        key = (o["T"], o["M"], o["H"], o["E"], o["k"], float(o["f"]))
        tm = torch_ms.get(key + (o["dtype"],))
        peak = peaks.get(o["dtype"])
        f = "0 (dropless)" if float(o["f"]) == 0 else str(o["f"])
        of_peak = "-" if not peak else "%.1f%%" % (100 * o["useful_tflops"] / peak)
        ratio = "-" if tm is None else "%.2f" % (tm / o["layer_ms"])
        line = (f"| {o['T']}, {o['M']}, {o['H']}, {o['E']}, {o['k']}, {f} | {o['dtype']} | **{fmt(o['layer_ms'])}** "
                f"| {fmt(o['step_ms'], 1)} | {fmt(o['useful_tflops'], 1)} | {of_peak} | {fmt(tm)} | {ratio} |")
        if extra_bf16:
            line += f" {fmt(torch_ms.get(key + ('bf16',)))} |"
        print(line)
    print()
    o = ours[0]
    print(f"moec: median over steps > warm-up ({o['steps']} steps a config) of the MoE layer's time "
          "(forward + backward + SGD update, from the metrics' layer_ms and update_ms: CUDA events at the ends "
          "of each, read at the end of the step); step ms is the whole step, which also includes the regression data (drawn "
          "and made by the teacher MLP on the GPU, in fp32) and the loss. TFLOP/s = 12 T k M H (18 for swiglu) / layer time; "
          "PyTorch: bench/gpu/torch_ref.py's plain layer in the same dtype, median of 20 steps.")
    if len(startup) >= 2:
        print()
        print(f"NVRTC start, whole process of `--steps 1` on a small spec (median of the runs): "
              f"cold (empty --kernel-cache) **{float(startup[0]):.2f} s**, warm (from the cache) "
              f"**{float(startup[1]):.2f} s** (cold runs {startup[2] if len(startup) > 2 else '?'}, "
              f"warm runs {startup[3] if len(startup) > 3 else '?'}).")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    {"spec": cmd_spec, "plan": cmd_plan, "trace_spans": cmd_trace_spans, "row": cmd_row, "time": cmd_time, "table": cmd_table,
     "dtype": lambda a: print(run_dtype(a[0]))}[cmd](args)


if __name__ == "__main__":
    main()
