#!/usr/bin/env python3
"""plot_run.py — a run's metrics, and its routing trace, as one PNG.

    python3 tools/plot_run.py METRICS.jsonl [--routing TRACE.jsonl] -o OUT.png

METRICS is what a moec-built binary writes with --metrics, TRACE what it
writes with --routing-trace (docs/RUNNING.md). The panels share the step axis,
one above the other:
  - the training loss, and the held-out eval_loss where the run evaluated;
  - the learning rate;
  - the variant each MoE layer ran (a categorical axis);
  - with --routing, per MoE layer a heatmap of its expert load (experts by
    steps), each step's column as shares of that step's claims, so an even
    colour is a balanced layer (every expert at 1/E).
Bad input (a file missing, empty, or a malformed line) is said in one line
naming the file and the line, with exit status 1; a bad command line exits 2.
No display is needed: matplotlib draws with its Agg backend.
"""
import argparse
import json
import math
import os
import sys

PROG = "plot_run.py"
# At most this many heatmaps (one per MoE layer): past it, evenly spaced
# layers are shown, and a note says so; a figure of 60 heatmaps is unreadable.
MAX_HEATMAPS = 12


class InputError(Exception):
    """Bad input: the message names the file (and line) and what is wrong."""


def read_jsonl(path):
    """The JSON objects of a JSON-lines file, as (line number, object), each
    with an integer "step". A last line cut short (a run killed while writing
    it) is left out with a warning; any other bad line is an InputError."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not a text file of JSON lines ({e.reason} at byte {e.start})")
    lines = text.split("\n")
    torn = lines[-1] != ""  # a file of whole lines ends with a newline
    rows = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            if torn and no == len(lines):
                print(f"{PROG}: warning: {path}:{no}: the last line is cut short (a run killed while "
                      "writing it?); left out", file=sys.stderr)
                break
            msg = getattr(e, "msg", str(e))
            col = getattr(e, "colno", None)
            raise InputError(f"{path}:{no}: not valid JSON: {msg}" + (f" at column {col}" if col else ""))
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{no}: not a JSON object (a line is {{\"step\": N, ...}})")
        step = obj.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise InputError(f"{path}:{no}: no integer \"step\" (a line is {{\"step\": N, ...}})")
        rows.append((no, obj))
    if not rows:
        raise InputError(f"{path} is empty: no JSON lines in it")
    return rows


def number(path, no, obj, key):
    """obj[key] as a float: null (a non-finite value) is NaN; another type is
    an InputError naming the line."""
    v = obj.get(key)
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(f"{path}:{no}: \"{key}\" is {json.dumps(v)[:40]}, not a number")
    return float(v)


def read_metrics(path):
    """The curves of a metrics file: steps with loss, lr and variants; the
    evaluations (a resume's marker line among them)."""
    run = {"steps": [], "loss": [], "lr": [], "eval_steps": [], "eval_loss": [], "variants": {}}
    for no, obj in read_jsonl(path):
        if "eval_loss" in obj:
            run["eval_steps"].append(obj["step"])
            run["eval_loss"].append(number(path, no, obj, "eval_loss"))
        if obj.get("resumed") is True:
            continue
        if "loss" not in obj:
            raise InputError(f"{path}:{no}: a step's line without \"loss\" (is this a metrics file? "
                             "a routing trace goes after --routing)")
        run["steps"].append(obj["step"])
        run["loss"].append(number(path, no, obj, "loss"))
        run["lr"].append(number(path, no, obj, "lr"))
        variants = obj.get("variants", {})
        if not isinstance(variants, dict) or not all(isinstance(v, str) for v in variants.values()):
            raise InputError(f"{path}:{no}: \"variants\" is not {{\"LAYER\": \"VARIANT\", ...}}")
        for layer, name in variants.items():
            run["variants"].setdefault(layer, ([], []))
            run["variants"][layer][0].append(obj["step"])
            run["variants"][layer][1].append(name)
    if not run["steps"]:
        raise InputError(f"{path}: no step's line in it (only resume markers)")
    return run


def read_routing(path):
    """Each MoE layer's load per step from a routing trace: {layer: {step: [E
    counts]}}, layers in the order they first appear."""
    layers = {}
    for no, obj in read_jsonl(path):
        layer, load = obj.get("layer"), obj.get("load")
        if not isinstance(layer, str):
            raise InputError(f"{path}:{no}: no \"layer\" name (is this a routing trace? "
                             "a metrics file goes first, without --routing)")
        if (not isinstance(load, list) or not load or
                not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in load)):
            raise InputError(f"{path}:{no}: \"load\" is not a list of numbers, one per expert")
        steps = layers.setdefault(layer, {})
        if steps:
            e = len(next(iter(steps.values())))
            if len(load) != e:
                raise InputError(f"{path}:{no}: layer {layer} has {len(load)} experts here, {e} on its "
                                 "earlier lines")
        steps[obj["step"]] = [float(x) for x in load]
    return layers


def plot(run, routing, out, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.gridspec import GridSpec

    shown = list(routing) if routing else []
    if len(shown) > MAX_HEATMAPS:
        pick = [round(i * (len(shown) - 1) / (MAX_HEATMAPS - 1)) for i in range(MAX_HEATMAPS)]
        print(f"{PROG}: note: {len(shown)} MoE layers in the routing trace; the heatmaps show "
              f"{MAX_HEATMAPS} of them, evenly spaced", file=sys.stderr)
        shown = [shown[i] for i in pick]
    nrows = 3 + len(shown)
    heights = [3, 1.6, 1.2 + 0.25 * len(run["variants"])] + [1.4] * len(shown)
    fig = plt.figure(figsize=(10, sum(heights) * 0.95 + 0.8))
    # a narrow second column holds the heatmaps' colour bars, so every
    # panel's step axis has the same width and lines up
    gs = GridSpec(nrows, 2, figure=fig, width_ratios=[50, 1], height_ratios=heights, hspace=0.45, wspace=0.02)
    first = fig.add_subplot(gs[0, 0])
    axes = [first] + [fig.add_subplot(gs[i, 0], sharex=first) for i in range(1, nrows)]
    for i in range(nrows - len(shown)):
        fig.add_subplot(gs[i, 1]).axis("off")
    lo, hi = min(run["steps"]), max(run["steps"])
    if routing:
        for layer in shown:
            lo, hi = min(lo, min(routing[layer])), max(hi, max(routing[layer]))

    ax = axes[0]
    ax.plot(run["steps"], run["loss"], lw=1, label="loss (training batch)")
    if run["eval_steps"]:
        ax.plot(run["eval_steps"], run["eval_loss"], "o-", ms=3, lw=1, label="eval_loss (held out)")
    finite = [v for v in run["loss"] + run["eval_loss"] if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)

    ax = axes[1]
    ax.plot(run["steps"], run["lr"], lw=1, color="tab:green")
    ax.set_ylabel("lr")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.grid(alpha=0.3)

    ax = axes[2]
    names = sorted({n for _, vs in run["variants"].values() for n in vs})
    index = {n: i for i, n in enumerate(names)}
    nl = len(run["variants"])
    for k, (layer, (steps, vs)) in enumerate(run["variants"].items()):
        off = (k - (nl - 1) / 2) * (0.5 / max(nl, 1))  # layers side by side within a variant's row
        ax.plot(steps, [index[v] + off for v in vs], ".-", ms=2, lw=0.8, drawstyle="steps-mid", label=layer)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=7)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.set_ylabel("variant")
    if 0 < nl <= 8:
        ax.legend(loc="upper right", fontsize=7, ncol=min(nl, 4))
    if not names:
        ax.text(0.5, 0.5, "no MoE layer", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3, axis="x")

    for k, layer in enumerate(shown):
        ax = axes[3 + k]
        loads = routing[layer]
        e = len(next(iter(loads.values())))
        first_step = min(loads)
        cols = max(loads) - first_step + 1
        grid = [[math.nan] * cols for _ in range(e)]  # steps missing from the trace stay blank
        for step, load in loads.items():
            total = sum(load)
            for j in range(e):
                grid[j][step - first_step] = load[j] / total if total > 0 else 0.0
        # white at an even share (1/E), red above it, blue below
        top = max([v for row in grid for v in row if math.isfinite(v)] + [2 / e])
        norm = TwoSlopeNorm(vmin=0, vcenter=1 / e, vmax=max(top, 1.01 / e))
        im = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", cmap="RdBu_r", norm=norm,
                       extent=(first_step - 0.5, first_step + cols - 0.5, -0.5, e - 0.5))
        ax.set_ylabel("expert", fontsize=8)
        if e <= 16:
            ax.set_yticks(range(e))
            ax.tick_params(axis="y", labelsize=7)
        ax.set_title(f"{layer}: expert load, share of each step's claims (white: even, 1/{e} = {1 / e:.3g}; "
                     "red: more, blue: less)",
                     fontsize=8, loc="left")
        cb = fig.colorbar(im, cax=fig.add_subplot(gs[3 + k, 1]))
        cb.ax.tick_params(labelsize=7)
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
    axes[-1].set_xlabel("step")
    axes[0].set_xlim(lo - 0.5, hi + 0.5)
    try:
        fig.savefig(out, dpi=100, bbox_inches="tight")
    except OSError as e:
        raise InputError(f"cannot write {out}: {e.strerror or e}")
    finally:
        plt.close(fig)


def main(argv):
    ap = argparse.ArgumentParser(
        prog=PROG, description="Plot a moec run's metrics (--metrics) and routing trace (--routing-trace) "
        "into one PNG: loss and eval_loss, learning rate, each MoE layer's variant, and expert-load heatmaps.")
    ap.add_argument("metrics", metavar="METRICS.jsonl", help="the run's --metrics file")
    ap.add_argument("--routing", metavar="TRACE.jsonl", help="the run's --routing-trace file: adds a heatmap "
                    "of expert load per MoE layer")
    ap.add_argument("-o", "--output", metavar="OUT.png", required=True, help="the PNG to write")
    args = ap.parse_args(argv)
    try:
        run = read_metrics(args.metrics)
        routing = read_routing(args.routing) if args.routing else None
        try:
            import matplotlib  # noqa: F401  (said here, before any drawing)
        except ImportError:
            raise InputError(f"matplotlib is not installed for {sys.executable}; install Debian's "
                             "python3-matplotlib (tools/install-deps.sh does) or `pip install matplotlib`")
        title = f"{os.path.basename(args.metrics)}: steps {min(run['steps'])} to {max(run['steps'])}"
        plot(run, routing, args.output, title)
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
