#!/usr/bin/env python3
"""attn_bench.py — moec's attention kernels (templates/attention.cu, through
the cuda backend: build/bench/attn_bench) against PyTorch's
torch.nn.functional.scaled_dot_product_attention on the same shapes, bf16,
forward and backward of the core (no projections), causal by default.

usage: attn_bench.py [--bench build/bench/attn_bench] [--configs B,S,H,D[,KV] ...]
                     [--causal 0|1] [--iters N] [--warmup N] [--json FILE]

The configs default to attn_bench's: seq 1024 and 4096, head dims 64 and 128,
16384 tokens and 2048 query dims in all. Both sides: random inputs, the
median of `iters` timed runs (CUDA events) after `warmup`; the backward
timed apart from the forward (PyTorch: out.backward(dout) on a kept graph;
moec: attn_bwd_t from the forward's o and lse). Prints a markdown table with
both times, moec / torch (above 1: moec slower) and moec's TFLOP/s
(FlashAttention's count: 4 S^2 H D B forward, 2.5x backward, halved when
causal); --json writes the rows for bench/RESULTS.md.
"""
import argparse, json, os, subprocess, sys, tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_ref import median_ms  # noqa: E402  (the same timing as the other references)


def torch_times(B, S, H, D, KV, causal, warmup, iters):
    dev = "cuda"
    q = torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, KV, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, KV, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    gqa = {"enable_gqa": True} if KV != H else {}
    fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)
    with torch.no_grad():
        f = median_ms(fwd, warmup, iters)
    out = fwd()
    dout = torch.randn_like(out)
    bwd = lambda: out.backward(dout, retain_graph=True)
    g = median_ms(bwd, warmup, iters)
    return f, g


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--bench", default=os.path.join(here, "..", "..", "build", "bench", "attn_bench"))
    ap.add_argument("--configs", nargs="*", default=None)
    ap.add_argument("--causal", type=int, default=1)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attn_bench.py: PyTorch sees no GPU")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "moec.json")
        cmd = [a.bench, "--dtype", "bf16", "--causal", str(a.causal), "--iters", str(a.iters),
               "--warmup", str(a.warmup), "--json", path]
        if a.configs:
            cmd += ["--configs"] + a.configs
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        with open(path) as f:
            moec = json.load(f)
    rows = []
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, "
          f"{'causal' if a.causal else 'bidirectional'}; median of {a.iters} runs, ms\n")
    print("| B | S | H | KV | D | fwd moec | fwd torch | fwd ratio | bwd moec | bwd torch | bwd ratio | "
          "moec fwd TFLOP/s | moec bwd TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in moec["rows"]:
        B, S, H, D, KV = r["batch"], r["seq"], r["heads"], r["head_dim"], r["kv_heads"]
        tf, tb = torch_times(B, S, H, D, KV, bool(a.causal), a.warmup, a.iters)
        mf, mb, fl = r["fwd_ms"], r["bwd_ms"], r["fwd_flops"]
        rows.append(dict(r, torch_fwd_ms=tf, torch_bwd_ms=tb))
        print(f"| {B} | {S} | {H} | {KV} | {D} | {mf:.3f} | {tf:.3f} | {mf / tf:.2f} | {mb:.3f} | {tb:.3f} | "
              f"{mb / tb:.2f} | {fl / mf * 1e-9:.0f} | {2.5 * fl / mb * 1e-9:.0f} |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": moec["device"], "torch": torch.__version__, "causal": bool(a.causal),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
