#!/usr/bin/env python3
"""router_bench.py — the helper of router_bench.sh: the variants of a config's
layer (one per router option of LANGUAGE.md's "Routing of today's models"),
one result line per variant from its runs, and the markdown table. The specs,
the metrics' medians and the trace's spans are layer_bench.py's (imported).

  config CONFIG                  the config as layer_bench.py's T,M,H,E,k,f and the activation,
                                 on one line ("T,M,H,E,k,f ACT"); CONFIG is T,M,H,E,k[,f[,act]]
                                 (f default 1.0, act default relu); exit 2 when malformed
  variants CONFIG                one line per variant, "ID|OPTION|MOE ITEMS" (the base first, its
                                 repeat last); a line "note|TEXT" for an option this config cannot have
  row ID OPTION CONFIG DTYPE WARM STEM
                                 one JSON line from STEM.log, STEM.jsonl (untraced), STEM.trace.jsonl,
                                 STEM.trace.json (traced) and STEM.plan.json
  failed ID OPTION CONFIG WHY    one JSON line for a variant that did not build or run
  table ROWS.jsonl NOTES         the markdown tables, one per config, with the notes ("CONFIG|TEXT" lines)
  check TABLE.md CONFIG...       the test of the script (bench.router_bench_cpu): every variant of each
                                 CONFIG has its row, with a layer ms, a ratio to the base and a gate share
"""
import json, os, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.dont_write_bytecode = True  # no __pycache__ left in the source tree by the import
import layer_bench  # noqa: E402

ACTIVATIONS = ("relu", "gelu", "silu", "swiglu")
# the trace's spans of the gate (runtime/moe.c): forward "gate" (dropless and
# dynamic capacity, before the counts are read) and "gate and capacity" (the
# gate at a fixed capacity, and the aux loss), backward "bwd gate" (the gate
# kernels and the two GEMMs of d x and d W)
GATE_FWD = ("gate", "gate and capacity")
GATE_BWD = ("bwd gate",)
# the options (LANGUAGE.md's values for today's models: DeepSeek-V3's bias step
# and route scale, ST-MoE's z-loss weight)
BIAS_UPDATE, Z_LOSS, ROUTE_SCALE = "0.001", "0.001", "2.5"


def parse(c):
    """(T, M, H, E, k, f as written, activation) of T,M,H,E,k[,f[,act]]."""
    v = c.split(",")
    if not 5 <= len(v) <= 7:
        raise ValueError(f"a config is T,M,H,E,k[,f[,activation]], not {c}")
    f = v[5] if len(v) > 5 else "1.0"
    act = v[6] if len(v) > 6 else "relu"
    if act not in ACTIVATIONS:
        raise ValueError(f"{c}: the activation is one of {', '.join(ACTIVATIONS)}, not {act}")
    T, M, H, E, k, _ = layer_bench.parse_config(",".join(v[:5] + [f]))
    if min(T, M, H, E, k) <= 0 or k > E:
        raise ValueError(f"{c}: T, M, H, E, k must be positive and k <= E")
    return T, M, H, E, k, f, act


def groups_for(E, k):
    """(groups, top_groups) for group-limited routing: DeepSeek-V3's 8 and 4
    where 8 divides E, else the largest divisor of E up to 8 and half of it,
    raised until top_k experts can be reached; None when E has no divisor
    from 2 to 8."""
    g = next((d for d in range(8, 1, -1) if E % d == 0), None)
    if g is None:
        return None
    tg = max(1, g // 2)
    while k > tg * (E // g):
        tg += 1
    return g, tg


def variants(c):
    T, M, H, E, k, f, act = parse(c)
    out = [("base", "softmax gate, token choice (the base)", "")]
    out.append(("sigmoid", "`gate = sigmoid`", "gate = sigmoid;"))
    out.append(("bias", f"`gate = sigmoid; bias_update = {BIAS_UPDATE}`",
                f"gate = sigmoid; bias_update = {BIAS_UPDATE};"))
    notes = []
    gt = groups_for(E, k)
    if gt:
        g = f"groups = {gt[0]}; top_groups = {gt[1]};"
        out.append(("groups", f"`{g[:-1]}`", g))
        if gt != (8, 4):
            notes.append(f"E = {E}: groups = {gt[0]}, top_groups = {gt[1]} in place of DeepSeek-V3's 8 and 4 "
                         "(groups must divide the experts)")
        if gt[0] == E:
            notes.append(f"E = {E}: the groups are single experts, so `groups` measures the cost of the group "
                         f"step (a token's experts among its {gt[1]} best)")
    else:
        g = ""
        notes.append(f"E = {E}: no `groups` from 2 to 8 divides the experts; group-limited routing skipped")
    out.append(("zloss", f"`z_loss = {Z_LOSS}`", f"z_loss = {Z_LOSS};"))
    out.append(("shared", "`shared_experts = 2`", "shared_experts = 2;"))
    if float(f) > 0:
        out.append(("ec", "`routing = expert_choice`", "routing = expert_choice;"))
    else:
        notes.append(f"f = {f}: expert choice needs a fixed capacity (capacity_factor > 0); skipped")
    v3 = f"gate = sigmoid; bias_update = {BIAS_UPDATE}; {g} shared_experts = 1; route_scale = {ROUTE_SCALE};"
    out.append(("v3", "DeepSeek-V3's together: `" + " ".join(v3.split())[:-1] + "`", " ".join(v3.split())))
    out.append(("base2", "the base again (the run's drift)", ""))
    return out, notes


def cmd_config(a):
    try:
        T, M, H, E, k, f, act = parse(a[0])
    except ValueError as e:
        print(f"router_bench: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{T},{M},{H},{E},{k},{f} {act}")


def cmd_variants(a):
    out, notes = variants(a[0])
    for v in out:
        print("|".join(v))
    for n in notes:
        print("note|" + n)


def cmd_row(a):
    vid, option, config, dtype, warm, stem = a[0], a[1], a[2], a[3], int(a[4]), a[5]
    T, M, H, E, k, f, act = parse(config)
    c6 = f"{T},{M},{H},{E},{k},{f}"
    plan = stem + ".plan.json"
    run = layer_bench.row_figures(c6, dtype, stem + ".log", stem + ".jsonl", warm, plan, act)
    traced = layer_bench.row_figures(c6, dtype, stem + ".trace.log", stem + ".trace.jsonl", warm, plan, act)
    spans = layer_bench.span_medians(stem + ".trace.json", warm, GATE_FWD + GATE_BWD)
    fwd, bwd = sum(spans[:len(GATE_FWD)]), sum(spans[len(GATE_FWD):])
    print(json.dumps({"id": vid, "option": option, "config": config, "activation": act, "dtype_asked": dtype,
                      "dtype": run["dtype"], "steps": run["steps"], "layer_ms": run["layer_ms"],
                      "layer_ms_min": run["layer_ms_min"], "layer_ms_max": run["layer_ms_max"],
                      "step_ms": run["step_ms"], "dropped": run["dropped"], "gate_fwd_ms": fwd,
                      "gate_bwd_ms": bwd, "traced_layer_ms": traced["layer_ms"]}))


def cmd_failed(a):
    print(json.dumps({"id": a[0], "option": a[1], "config": a[2], "failed": a[3]}))


def cmd_table(a):
    rows = [json.loads(l) for l in open(a[0]) if l.strip()]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    for c in configs:
        T, M, H, E, k, f, act = parse(c)
        rs = [r for r in rows if r["config"] == c]
        base = next((r for r in rs if r["id"] == "base" and "failed" not in r), None)
        ran = sorted({r["dtype"] for r in rs if "dtype" in r})
        print(f"**T = {T}, M = {M}, H = {H}, E = {E}, k = {k}, capacity_factor = {f}, {act}** "
              f"(computed in {', '.join(ran) or '?'})")
        print()
        print("| option (moe keys on the base) | layer ms | / base | gate ms (fwd + bwd) | gate share of the layer "
              "| dropped | step ms |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in rs:
            if "failed" in r:
                print(f"| {r['option']} | failed: {r['failed']} | - | - | - | - | - |")
                continue
            ratio = "-" if not base else "%.3f" % (r["layer_ms"] / base["layer_ms"])
            gate = r["gate_fwd_ms"] + r["gate_bwd_ms"]
            share = 100 * gate / r["traced_layer_ms"] if r["traced_layer_ms"] > 0 else float("nan")
            print(f"| {r['option']} | **{r['layer_ms']:.3f}** | {ratio} | {gate:.3f} ({r['gate_fwd_ms']:.3f} + "
                  f"{r['gate_bwd_ms']:.3f}) | {share:.1f}% | {100 * r['dropped']:.1f}% | {r['step_ms']:.2f} |")
        print()
        for line in open(a[1]) if len(a) > 1 else []:
            if line.startswith(c + "|"):
                print("- " + line.split("|", 1)[1].rstrip("\n"))
        print()
    n = next((r["steps"] for r in rows if "steps" in r), "?")
    print(f"Each row is its own spec (the base plus the row's keys), built by moec and run twice with select = fixed: "
          f"untraced, for the layer ms (the median over the {n} measured steps of the metrics' layer_ms + update_ms: "
          "the layer's forward and backward and the optimizer's update, which includes the sigmoid gate's bias "
          "update) and the whole step ms; then traced (--trace; on cuda, CUDA graphs off), for the gate: the medians "
          "of its spans, forward \"gate\" + \"gate and capacity\" (the aux loss included where it is on), backward "
          "\"bwd gate\". The gate's share is against the layer ms of the same traced steps. / base: the row's layer "
          "ms over the base's, measured in the same run; the base's repeat at the end shows the drift. "
          "`gate = sigmoid` and `routing = expert_choice` turn the aux loss off by default (the base has "
          "aux_loss = 0.01), as a spec that sets them does; the dropped column is the share of routed tokens "
          "past the capacity.")


def cmd_check(a):
    text = open(a[0]).read()
    bad, n = [], 0
    for c in a[1:]:
        T, M, H, E, k, f, act = parse(c)
        head = f"**T = {T}, M = {M}, H = {H}, E = {E}, k = {k}, capacity_factor = {f}, {act}**"
        if head not in text:
            bad.append(f"no table for {c}")
            continue
        table = text.split(head, 1)[1].split("\n\n", 2)[1]  # the lines after the heading's blank line
        for vid, option, _ in variants(c)[0]:
            cells = next((l.split(" | ")[1:] for l in table.splitlines() if l.startswith(f"| {option} |")), None)
            try:
                layer, ratio, share = float(cells[0].strip("*")), float(cells[1]), float(cells[3].rstrip("%"))
                ok = layer > 0 and ratio > 0 and 0 <= share <= 100 and (vid != "base" or ratio == 1)
            except (TypeError, ValueError, IndexError):
                ok = False
            if not ok:
                bad.append(f"{c}: no row with a layer ms, a ratio and a gate share for {option}")
            n += ok
    if bad:
        sys.exit("router_bench check: FAIL\n  " + "\n  ".join(bad))
    print(f"router_bench check: ok, {n} rows")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    {"config": cmd_config, "variants": cmd_variants, "row": cmd_row, "failed": cmd_failed,
     "table": cmd_table, "check": cmd_check}[cmd](args)


if __name__ == "__main__":
    main()
