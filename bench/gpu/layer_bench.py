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
  preset NAME                                         its configurations, one line (PRESETS: issue18)
  plan PLAN.json                                      "flops_per_step bytes" of moec plan --json
  dtype RUN.log                                       the dtype the binary says it computes in
  row CONFIG DTYPE_ASKED RUN.log METRICS WARM PLAN ACTIVATION
                                                      one JSON line: our figures for the config
  time CMD...                                         wall seconds of one run of CMD (its output to /dev/null)
  table OURS.jsonl TORCH.json|- STARTUP.txt [OPTIMIZER]
                                                      the markdown table (TORCH "-": none); issue 18's
                                                      columns when TORCH has grouped rows (torch_ref.py
                                                      --grouped), for OPTIMIZER (default sgd)
  roofline T M H E k ACT OPT PEAK_TFLOPS COPY_GBPS    issue 18's roofline of one config, JSON
"""
import json, re, statistics, subprocess, sys, time


# named lists of configurations (T,M,H,E,k,f[,activation]; f = 0: dropless):
# issue 18's seven, swiglu experts for the two fine-grained ones
PRESETS = {"issue18": ["16384,2048,2048,8,2,1.0,relu", "8192,4096,8192,8,2,1.25,relu",
                       "4096,1024,4096,64,2,1.0,relu", "2048,4096,1024,32,8,1.0,relu",
                       "16384,2048,2048,8,2,0,relu", "8192,2048,768,128,8,0,swiglu",
                       "4096,2048,1408,64,6,0,swiglu"]}


def useful_flops(T, M, H, k, act):
    # fwd + bwd GEMM FLOPs of the experts on the T*k routed tokens: 2 GEMMs
    # forward, 4 backward, 2*M*H each per token; swiglu's fc1 is twice as wide
    per = 18 if act == "swiglu" else 12
    return per * T * k * M * H


def expert_params(M, H, E, act):
    """P: the experts' weights (fc1 M -> H, or M -> 2H for swiglu; fc2 H -> M)."""
    return E * M * H * (3 if act == "swiglu" else 2)


# bytes an expert parameter moves a step in moec's scheme (issue 18): the bf16
# weights read by the forward and the input-gradient GEMMs (2 + 2), the fp32
# weight gradient written once (4), the optimizer reading master and gradient
# and writing master and bf16 copy (4 + 4 + 4 + 2); AdamW reads and writes its
# two fp32 moments (16 more)
PARAM_BYTES = {"sgd": 22, "adam": 38}


def activation_bytes(T, M, H, k, act):
    """The activations' bytes a step, bf16, each tensor written once and read
    once (2 + 2 bytes an element): on the T k routed rows, forward the gathered
    input (M), fc1's output (H1 = H, 2H for swiglu), the activation (H), fc2's
    output (M), backward their gradients (M, H, H1, M); on the T tokens, the
    layer's input, output, output gradient and input gradient (4 M).
    4 (T k (4 M + 2 H1 + 2 H) + 4 T M)."""
    H1 = 2 * H if act == "swiglu" else H
    return 4 * (T * k * (4 * M + 2 * H1 + 2 * H) + 4 * T * M)


def roofline(T, M, H, E, k, act, opt, peak_tflops, copy_gbps):
    """Issue 18's roofline of one layer step (forward + backward + optimizer):
    max(useful FLOPs at the measured GEMM peak, bytes at the measured copy
    bandwidth), bytes = PARAM_BYTES[opt] P + activation_bytes. A dict of ms and
    its parts."""
    flops = useful_flops(T, M, H, k, act)
    P = expert_params(M, H, E, act)
    pbytes = PARAM_BYTES[opt] * P
    abytes = activation_bytes(T, M, H, k, act)
    flop_ms = flops / (peak_tflops * 1e12) * 1e3
    byte_ms = (pbytes + abytes) / (copy_gbps * 1e9) * 1e3
    return {"ms": max(flop_ms, byte_ms), "flop_ms": flop_ms, "byte_ms": byte_ms, "flops": flops,
            "params": P, "param_bytes": pbytes, "activation_bytes": abytes,
            "bound": "FLOPs" if flop_ms >= byte_ms else "bytes"}


def parse_config(c):
    """T, M, H, E, k, f of "T,M,H,E,k,f[,activation]"."""
    v = c.split(",")
    return int(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4]), float(v[5])


def config_act(c, default):
    """The activation a config names (its 7th field), else default."""
    v = c.split(",")
    return v[6] if len(v) > 6 else default


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


def issue18_table(ours, ref, opt):
    """Issue 18's table: moec against the grouped-GEMM layer in moec's scheme
    and in pure bf16, the loop layer, the useful TFLOP/s as a share of the
    measured peak, and the roofline, for the optimizer opt."""
    peak = ref["gemm_peak_tflops_by_dtype"].get("bf16", ref["gemm_peak_tflops"])
    bw = ref["copy_gbps"]
    key = lambda r: (r["T"], r["M"], r["H"], r["E"], r["k"], float(r["f"]), r.get("activation", "relu"))
    grouped = {key(g) + (g["scheme"],): g for g in ref.get("grouped", []) if g.get("optimizer", "sgd") == opt}
    loop = {key(r): r["torch_ms"] for r in ref.get("layers", [])
            if r.get("optimizer", "sgd") == opt and r.get("dtype", "bf16") == "bf16"}
    print("| config (T, M, H, E, k, f, act) | dtype | moec ms | grouped-GEMM ref, moec scheme, ms | ref / moec "
          "| pure-bf16 ms | bf16 / moec | loop ms | loop / moec | moec TFLOP/s | of the peak | roofline ms (bound) "
          "| moec / roofline |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    kernels, modes, notes = set(), [], []

    def cell(g, ms):
        if g is None or "best_ms" not in g:
            return "-", "-"
        kernels.add(g["kernel"])
        lab = g["best_mode"] + ("" if g["kernel"] == "torch._grouped_mm" else ", loop fallback")
        if isinstance(g.get("compile"), str):
            notes.append(f"{g['scheme']} {g['T']},{g['M']},{g['H']},{g['E']},{g['k']}: compile {g['compile']}")
        return f"{g['best_ms']:.2f} ({lab})", f"{g['best_ms'] / ms:.2f}"

    for o in ours:
        act = o.get("activation", "relu")
        k = (o["T"], o["M"], o["H"], o["E"], o["k"], float(o["f"]), act)
        ms = o["layer_ms"]
        g_m, r_m = cell(grouped.get(k + ("moec",)), ms)
        g_b, r_b = cell(grouped.get(k + ("bf16",)), ms)
        lm = loop.get(k)
        rl = roofline(o["T"], o["M"], o["H"], o["E"], o["k"], act, opt, peak, bw)
        f = "0 (dropless)" if float(o["f"]) == 0 else str(o["f"])
        print(f"| {o['T']}, {o['M']}, {o['H']}, {o['E']}, {o['k']}, {f}, {act} | {o['dtype']} | **{ms:.2f}** "
              f"| {g_m} | {r_m} | {g_b} | {r_b} | {fmt(lm)} | {'-' if lm is None else '%.2f' % (lm / ms)} "
              f"| {o['useful_tflops']:.1f} | {100 * o['useful_tflops'] / peak:.1f}% | {rl['ms']:.2f} ({rl['bound']}) "
              f"| {ms / rl['ms']:.2f} |")
    print()
    print(f"Optimizer {opt}. moec: median of the layer's forward + backward + update ms (as in the default table). "
          "Grouped-GEMM ref: bench/gpu/grouped_ref.py (fp32 top-k gate, tokens sorted by expert, "
          "torch._grouped_mm for both expert GEMMs, the weighted index_add_ scatter; capacity drops before the "
          "GEMMs), forward + backward + optimizer step (torch.optim, fused where available), the faster of eager "
          "and torch.compile (in brackets); moec scheme: fp32 masters and gradients, bf16 copies for the GEMMs; "
          "pure bf16: bf16 parameters and gradients. Loop: torch_ref.py's per-expert loop layer, bf16. "
          "Ratios above 1: moec faster. Useful FLOPs 12 T k M H (18 for swiglu). Roofline: max(useful FLOPs at "
          f"the measured peak {peak:.1f} TFLOP/s, bytes at the measured copy bandwidth {bw:.0f} GB/s), "
          f"bytes = {PARAM_BYTES[opt]} P (P expert parameters) + 4 (T k (4 M + 2 H1 + 2 H) + 4 T M) "
          "(H1 = H, 2H for swiglu).")
    if kernels - {"torch._grouped_mm"}:
        why = {g.get("why_not_grouped") for g in grouped.values() if g.get("why_not_grouped")}
        print()
        print("**Not grouped-GEMM:** cells marked loop fallback ran a per-expert loop over the sorted layout, "
              "because torch._grouped_mm did not run here" + (f" ({'; '.join(sorted(why))})" if why else "") + ".")
    for n in sorted(set(notes)):
        print(f"- {n}")


def cmd_table(a):
    ours = [json.loads(l) for l in open(a[0]) if l.strip()]
    ref = json.load(open(a[1])) if a[1] != "-" else None
    startup = open(a[2]).read().split() if len(a) > 2 else []
    opt = a[3] if len(a) > 3 else "sgd"
    if ref and ref.get("grouped"):
        print(f"Device: {ref['device']}; PyTorch {ref['torch']}. GEMM peak ({ref.get('gemm_n', 8192)}^3, "
              "measured in this run): " +
              ", ".join(f"{d} {v:.1f} TFLOP/s" for d, v in ref["gemm_peak_tflops_by_dtype"].items()) +
              f"; copy bandwidth {ref['copy_gbps']:.0f} GB/s.")
        print()
        issue18_table(ours, ref, opt)
        return
    peaks = (ref or {}).get("gemm_peak_tflops_by_dtype", {})
    torch_ms = {}
    for r in (ref or {}).get("layers", []):
        if r.get("optimizer", "sgd") != opt:
            continue
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
    {"preset": lambda a: print(" ".join(PRESETS[a[0]])),
     "roofline": lambda a: print(json.dumps(roofline(*(int(x) for x in a[:5]), a[5], a[6], float(a[7]),
                                                     float(a[8])))),
     "spec": cmd_spec, "plan": cmd_plan, "trace_spans": cmd_trace_spans, "row": cmd_row, "time": cmd_time, "table": cmd_table,
     "dtype": lambda a: print(run_dtype(a[0]))}[cmd](args)


if __name__ == "__main__":
    main()
