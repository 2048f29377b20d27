#!/usr/bin/env python3
"""scale.py — the tables of docs/SCALE.md, from `moec plan --json`.

  bench/scale.py [--moec build/compiler/moec] [--gpu CAL] [--net SPEC]

For bench/scale_swin.moe and bench/scale_gpt.moe at 16, 64, 256 and 2,048
ranks, 8 a node: the predicted best variant per scale and the term that makes
it best; the gain of adaptive selection (the best variant at each scale) over
the best fixed variant (the one variant, present at every scale, whose worst
slowdown over the four scales is least) and over plain expert parallelism
(r=1,d=1,a2a=linear); and what each dimension buys alone: 2dh (the best
variant over the best linear one), r (over the best with r = 1), d (over the
best with d = 1); the all-to-all alone, linear against 2dh; and the steps
select = auto spends exploring with and without the prediction, were the runs
to take the predicted times. Prints markdown.
"""
import argparse
import json
import subprocess

SCALES = [16, 64, 256, 2048]
SPECS = [("SwinV2-MoE-like", "bench/scale_swin.moe"), ("GPT-MoE-like", "bench/scale_gpt.moe")]


def plan(a, spec, w):
    cmd = [a.moec, "plan", "--json", "--ranks", str(w), "--ranks-per-node", "8", spec, "--net", a.net]
    if a.gpu:
        cmd += ["--gpu", a.gpu]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def best_of(t, pred):
    c = [n for n in t if pred(n)]
    return min(c, key=t.get) if c else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moec", default="build/compiler/moec")
    ap.add_argument("--gpu", default=None)
    ap.add_argument("--net", default="nvlink=450GB/s,ib=8x400Gb/s,alpha_intra=3us,alpha_inter=10us")
    a = ap.parse_args()
    for title, spec in SPECS:
        times, info, a2a = {}, {}, {}
        for w in SCALES:
            p = plan(a, spec, w)
            l = p["prediction"]["layers"][0]
            times[w] = {v["name"]: v["total_ns"] / 1e6 for v in l["variants"]}
            a2a[w] = {v["name"]: v for v in l["variants"]}
            info[w] = (l, p["prediction"]["calibration"], [x for x in p["layers"] if x["kind"] == "moe"][0])
        common = set.intersection(*(set(times[w]) for w in SCALES))
        fixed = min(common, key=lambda n: max(times[w][n] / min(times[w].values()) for w in SCALES))
        cal = info[SCALES[0]][1]
        print("### %s (%s)\n" % (title, spec))
        print("calibration: %s (%s, %s); network: %s\n" % (cal["device"], cal["backend"], cal["source"], a.net))
        print("| GPUs | S | C | predicted best | ms | dominant term (vs runner-up) | over best fixed (%s) | "
              "over plain EP (r=1,d=1,linear) | 2dh alone | r alone | d alone |" % fixed)
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for w in SCALES:
            t = times[w]
            l, _, ml = info[w]
            b = l["best"]
            dom = l["dominant"]
            domtxt = "%s, %.2f ms less than %s" % (dom["term"], dom["gain_ns"] / 1e6, dom["vs"]) if dom else "-"
            ep = t.get("r=1,d=1,a2a=linear")
            lin = best_of(t, lambda n: n.endswith("linear"))
            r1 = best_of(t, lambda n: n.startswith("r=1,"))
            d1 = best_of(t, lambda n: ",d=1," in n)
            g = lambda x: "%.2fx" % (t[x] / t[b]) if x else "-"
            print("| %d | %d | %d | %s | %.2f | %s | %.2fx | %s | %s | %s | %s |" % (
                w, ml["shards"], l["capacity"], b, t[b], domtxt, t[fixed] / t[b],
                "%.2fx" % (ep / t[b]) if ep else "-", g(lin), g(r1), g(d1)))
        print("\nThe all-to-all alone (plain expert parallelism, r=1,d=1: one step's 4 all-to-alls, ms), the network's "
              "part of the prediction:\n")
        print("| GPUs | linear | (intra / inter) | 2dh | (intra / inter) | 2dh's gain | a2a share of the best |")
        print("|---|---|---|---|---|---|---|")
        for w in SCALES:
            lv, hv = a2a[w].get("r=1,d=1,a2a=linear"), a2a[w].get("r=1,d=1,a2a=2dh")
            b = a2a[w][info[w][0]["best"]]
            f = lambda v, k: v[k] / 1e6
            print("| %d | %.3f | %.3f / %.3f | %s | %s | %s | %.1f%% |" % (
                w, f(lv, "a2a_ns"), f(lv, "a2a_intra_ns"), f(lv, "a2a_inter_ns"),
                "%.3f" % f(hv, "a2a_ns") if hv else "-",
                "%.3f / %.3f" % (f(hv, "a2a_intra_ns"), f(hv, "a2a_inter_ns")) if hv else "-",
                "%.2fx" % (lv["a2a_ns"] / hv["a2a_ns"]) if hv else "-", 100.0 * b["a2a_ns"] / b["total_ns"]))
        # select = auto's exploring (explore_steps = 3: a warm-up and 3 measured runs a
        # candidate), if the runs took what the model predicts: every candidate without the
        # prediction; with it, those before the first one predicted 1.5x the best (select.h)
        print("\nExploring under `select = auto` (explore_steps = 3), if runs took the predicted times: steps "
              "spent before the layer settles\n")
        print("| GPUs | candidates | without the prediction | with it | candidates pruned |")
        print("|---|---|---|---|---|")
        for w in SCALES:
            order = sorted(times[w], key=times[w].get)
            best, k = times[w][order[0]], 1
            while k < len(order) and times[w][order[k]] <= 1.5 * best:
                k += 1
            print("| %d | %d | %d | %d | %d |" % (w, len(order), 4 * len(order), 4 * k, len(order) - k))
        print()


if __name__ == "__main__":
    main()
