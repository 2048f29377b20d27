#!/usr/bin/env python3
"""torch_ref.py — the references moec's GPU figures are measured against, on
the GPU at hand, in the same run: the bf16 GEMM peak (an 8192^3 cuBLAS product
through torch.matmul), the device copy bandwidth (bytes read + written), and a
plain PyTorch MoE layer (softmax top-k gate, per-expert gather, two matmuls,
index_add), bf16, forward + backward + SGD, median of repeated steps.

usage: torch_ref.py [--configs T,M,H,E,k,f ...] [--dtypes bf16[,fp32]] [--json FILE]
Prints a table; --json writes the numbers for bench/RESULTS.md (and for
bench/gpu/layer_bench.sh, which runs it beside moec's layer). --dtypes picks
the GEMM peaks and the layers measured: bf16 (the default), fp32 (no TF32, as
moec's fp32 GEMMs), or both.
"""
import argparse, json, statistics, sys, time

import torch
import torch.nn.functional as F


def median_ms(fn, warmup=5, reps=30):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def gemm_peak(n=8192, dtype=torch.bfloat16):
    # fresh random inputs (never zeros), several sets rotated so caches do not flatter
    xs = [torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(3)]
    ws = [torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(3)]
    i = [0]

    def f():
        j = i[0] % 3
        i[0] += 1
        torch.matmul(xs[j], ws[j])

    ms = median_ms(f, 5, 40)
    return 2 * n ** 3 / (ms / 1e3) / 1e12


def copy_bandwidth(nbytes=2 << 30):
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 5, 30)
    return 2 * nbytes / (ms / 1e3) / 1e9  # GB/s, read + write


class TorchMoE(torch.nn.Module):
    """The plain layer: what a PyTorch user writes without Tutel."""

    def __init__(self, M, H, E, k, f):
        super().__init__()
        self.E, self.k, self.f = E, k, f
        self.gate = torch.nn.Linear(M, E, bias=False)
        self.w1 = torch.nn.Parameter(torch.randn(E, M, H) / M ** 0.5)
        self.b1 = torch.nn.Parameter(torch.zeros(E, H))
        self.w2 = torch.nn.Parameter(torch.randn(E, H, M) / H ** 0.5)
        self.b2 = torch.nn.Parameter(torch.zeros(E, M))

    def forward(self, x):
        T = x.shape[0]
        scores = F.softmax(self.gate(x).float(), dim=1)
        topv, topi = scores.topk(self.k, dim=1)
        topv = topv / topv.sum(dim=1, keepdim=True)
        cap = self.k * int(self.f * ((T + self.E - 1) // self.E)) if self.f > 0 else T
        out = torch.zeros_like(x)
        for e in range(self.E):
            tok, slot = (topi == e).nonzero(as_tuple=True)
            tok, slot = tok[:cap], slot[:cap]  # first come, first served
            if tok.numel() == 0:
                continue
            h = F.relu(x[tok] @ self.w1[e] + self.b1[e])
            y = (h @ self.w2[e] + self.b2[e]) * topv[tok, slot].unsqueeze(1).to(x.dtype)
            out.index_add_(0, tok, y)
        return out


def torch_layer_ms(T, M, H, E, k, f, dtype=torch.bfloat16):
    torch.manual_seed(0)
    layer = TorchMoE(M, H, E, k, f).cuda().to(dtype)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
    x = torch.randn(T, M, device="cuda", dtype=dtype)

    def step():
        opt.zero_grad(set_to_none=True)
        layer(x).float().square().mean().backward()
        opt.step()

    return median_ms(step, 3, 20)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=["16384,2048,2048,8,2,1.0",
                                                     "4096,1024,4096,64,2,1.0",
                                                     "16384,2048,2048,8,2,0"])
    ap.add_argument("--dtypes", default="bf16", help="bf16, fp32 or bf16,fp32")
    ap.add_argument("--json")
    a = ap.parse_args()
    dtypes = a.dtypes.split(",")
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"unknown dtype {d} (bf16 or fp32)")
    if not torch.cuda.is_available():
        sys.exit("torch_ref.py: no CUDA device is visible to PyTorch")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 is fp32, as moec's cuBLAS calls
    dev = torch.cuda.get_device_name()
    peaks = {d: gemm_peak(dtype=DTYPES[d]) for d in dtypes}
    bw = copy_bandwidth()
    rows = []
    for d in dtypes:
        for c in a.configs:
            T, M, H, E, k = (int(v) for v in c.split(",")[:5])
            f = float(c.split(",")[5])
            ms = torch_layer_ms(T, M, H, E, k, f, DTYPES[d])
            useful = 12.0 * T * k * M * H  # fwd + bwd GEMM FLOPs on the routed tokens
            rows.append({"T": T, "M": M, "H": H, "E": E, "k": k, "f": f, "dtype": d, "torch_ms": ms,
                         "torch_tflops": useful / (ms / 1e3) / 1e12})
    print(f"device: {dev}; torch {torch.__version__}")
    for d in dtypes:
        print(f"{d} GEMM peak (8192^3, median of 40): {peaks[d]:.1f} TFLOP/s")
    print(f"copy bandwidth (2 GiB, read+write): {bw:.0f} GB/s")
    print(f"{'T':>6} {'M':>5} {'H':>5} {'E':>3} {'k':>2} {'f':>4} {'dtype':>5} {'torch ms':>9} {'TFLOP/s':>8} {'% peak':>7}")
    for r in rows:
        print(f"{r['T']:>6} {r['M']:>5} {r['H']:>5} {r['E']:>3} {r['k']:>2} {r['f']:>4} {r['dtype']:>5} "
              f"{r['torch_ms']:>9.2f} {r['torch_tflops']:>8.1f} {100 * r['torch_tflops'] / peaks[r['dtype']]:>6.1f}%")
    if a.json:
        json.dump({"device": dev, "torch": torch.__version__,
                   "gemm_peak_tflops": peaks.get("bf16", next(iter(peaks.values()))),
                   "gemm_peak_tflops_by_dtype": peaks, "copy_gbps": bw, "layers": rows},
                  open(a.json, "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
