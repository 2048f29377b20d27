#!/usr/bin/env python3
"""torch_ref.py — the references moec's GPU figures are measured against, on
the GPU at hand, in the same run: the bf16 GEMM peak (an 8192^3 cuBLAS product
through torch.matmul), the device copy bandwidth (bytes read + written), and a
plain PyTorch MoE layer (softmax top-k gate, per-expert gather, two matmuls,
index_add), bf16, forward + backward + SGD, median of repeated steps.

usage: torch_ref.py [--configs T,M,H,E,k,f[,act] ...|issue18] [--dtypes bf16[,fp32]]
                    [--optimizers sgd[,adam]] [--grouped] [--modes eager,compile] [--json FILE]
Prints a table; --json writes the numbers for bench/RESULTS.md (and for
bench/gpu/layer_bench.sh, which runs it beside moec's layer). --dtypes picks
the GEMM peaks and the layers measured: bf16 (the default), fp32 (no TF32, as
moec's fp32 GEMMs), or both. --optimizers measures every layer with each
(sgd, adam: AdamW). --grouped adds issue 18's grouped-GEMM layer
(grouped_ref.py) in moec's precision scheme and in pure bf16, eager and under
torch.compile (the faster of the two is its best_ms; --compile-until stops new
compiles late in a run); its rows name the kernel that ran (torch._grouped_mm,
or the loop fallback where that is missing). --configs issue18: issue 18's
seven configurations. --device cpu runs everything tiny on the cpu: a test of
this script, not a figure.
"""
import argparse, json, statistics, sys, time

sys.dont_write_bytecode = True  # no __pycache__ left in the source tree by the imports beside it
import torch
import torch.nn.functional as F


def median_ms(fn, warmup=5, reps=30, device="cuda"):
    """Median ms of fn over reps calls after warmup: CUDA events around each
    call, synchronized at its end; on the cpu (device "cpu": tests), perf_counter."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if not cuda:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def activation(z, act):
    """The experts' activation; swiglu takes z = [gate | up] (fc1 is M -> 2H)."""
    if act == "relu":
        return F.relu(z)
    if act == "gelu":
        return F.gelu(z)
    if act == "silu":
        return F.silu(z)
    if act == "swiglu":
        g, u = z.chunk(2, dim=-1)
        return F.silu(g) * u
    raise ValueError(f"unknown activation {act}")


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def gemm_peak(n=8192, dtype=torch.bfloat16, device="cuda", reps=40):
    # fresh random inputs (never zeros), several sets rotated so caches do not flatter
    xs = [torch.randn(n, n, device=device, dtype=dtype) for _ in range(3)]
    ws = [torch.randn(n, n, device=device, dtype=dtype) for _ in range(3)]
    i = [0]

    def f():
        j = i[0] % 3
        i[0] += 1
        torch.matmul(xs[j], ws[j])

    ms = median_ms(f, min(5, reps), reps, device)
    return 2 * n ** 3 / (ms / 1e3) / 1e12


def copy_bandwidth(nbytes=2 << 30, device="cuda", reps=30):
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), min(5, reps), reps, device)
    return 2 * nbytes / (ms / 1e3) / 1e9  # GB/s, read + write


class TorchMoE(torch.nn.Module):
    """The plain layer: what a PyTorch user writes without Tutel (a loop over
    the experts; swiglu's fc1 is M -> 2H)."""

    def __init__(self, M, H, E, k, f, act="relu"):
        super().__init__()
        self.E, self.k, self.f, self.act = E, k, f, act
        H1 = 2 * H if act == "swiglu" else H
        self.gate = torch.nn.Linear(M, E, bias=False)
        self.w1 = torch.nn.Parameter(torch.randn(E, M, H1) / M ** 0.5)
        self.b1 = torch.nn.Parameter(torch.zeros(E, H1))
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
            h = activation(x[tok] @ self.w1[e] + self.b1[e], self.act)
            y = (h @ self.w2[e] + self.b2[e]) * topv[tok, slot].unsqueeze(1).to(x.dtype)
            out.index_add_(0, tok, y)
        return out


def torch_layer_ms(T, M, H, E, k, f, dtype=torch.bfloat16, act="relu", opt="sgd", device="cuda",
                   warmup=3, reps=20):
    torch.manual_seed(0)
    layer = TorchMoE(M, H, E, k, f, act).to(device).to(dtype)
    if opt == "sgd":
        o = torch.optim.SGD(layer.parameters(), lr=1e-3)
    else:
        from grouped_ref import make_optimizer
        o = make_optimizer(layer.parameters(), opt)[0]
    x = torch.randn(T, M, device=device, dtype=dtype)

    def step():
        o.zero_grad(set_to_none=True)
        layer(x).float().square().mean().backward()
        o.step()

    return median_ms(step, warmup, reps, device)


def parse_config(c, default_act="relu"):
    v = c.split(",")
    if len(v) not in (6, 7):
        raise ValueError(f"a config is T,M,H,E,k,f[,activation], not {c}")
    return (int(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4]), float(v[5]),
            v[6] if len(v) == 7 else default_act)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=["16384,2048,2048,8,2,1.0",
                                                     "4096,1024,4096,64,2,1.0",
                                                     "16384,2048,2048,8,2,0"],
                    help="T,M,H,E,k,f[,activation] each, or the one word issue18 (its seven)")
    ap.add_argument("--dtypes", default="bf16", help="bf16, fp32 or bf16,fp32")
    ap.add_argument("--activation", default="relu", help="of the configs that name none")
    ap.add_argument("--optimizers", default="sgd", help="sgd, adam or sgd,adam: every layer with each")
    ap.add_argument("--grouped", action="store_true",
                    help="also the grouped-GEMM layer (grouped_ref.py), schemes moec and bf16")
    ap.add_argument("--modes", default="eager,compile", help="of the grouped layer: eager, compile or both")
    ap.add_argument("--compile-until", type=float, default=0,
                    help="seconds from the start after which no new torch.compile starts (0: no limit); "
                         "later configs are eager only, and their rows say so")
    ap.add_argument("--warmup", type=int, default=3, help="layer steps not timed")
    ap.add_argument("--reps", type=int, default=20, help="layer steps timed (the median)")
    ap.add_argument("--no-loop", action="store_true", help="skip the per-expert loop layer")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu (tests: tiny peaks and shapes)")
    ap.add_argument("--json")
    a = ap.parse_args()
    t_start = time.time()
    from layer_bench import PRESETS  # torch-free, beside this file
    configs = PRESETS[a.configs[0]] if len(a.configs) == 1 and a.configs[0] in PRESETS else a.configs
    dtypes = a.dtypes.split(",")
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"unknown dtype {d} (bf16 or fp32)")
    opts = a.optimizers.split(",")
    for o in opts:
        if o not in ("sgd", "adam"):
            ap.error(f"unknown optimizer {o} (sgd or adam)")
    modes = a.modes.split(",")
    if not set(modes) <= {"eager", "compile"}:
        ap.error("--modes is eager, compile or eager,compile")
    try:
        parsed = [parse_config(c, a.activation) for c in configs]
    except ValueError as e:
        ap.error(str(e))
    cpu = a.device == "cpu"
    if not cpu and not torch.cuda.is_available():
        sys.exit("torch_ref.py: no CUDA device is visible to PyTorch")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 is fp32, as moec's cuBLAS calls
    dev = "cpu" if cpu else torch.cuda.get_device_name()
    # on the cpu (a test of this script, not a figure): small and few
    peaks = {d: gemm_peak(n=256 if cpu else 8192, dtype=DTYPES[d], device=a.device, reps=2 if cpu else 40)
             for d in dtypes}
    bw = copy_bandwidth(nbytes=1 << 22 if cpu else 2 << 30, device=a.device, reps=2 if cpu else 30)
    rows = []
    for d in ([] if a.no_loop else dtypes):
        for (T, M, H, E, k, f, act) in parsed:
            for o in opts:
                ms = torch_layer_ms(T, M, H, E, k, f, DTYPES[d], act, o, a.device, a.warmup, a.reps)
                useful = (18.0 if act == "swiglu" else 12.0) * T * k * M * H  # fwd + bwd GEMM FLOPs, routed tokens
                rows.append({"T": T, "M": M, "H": H, "E": E, "k": k, "f": f, "activation": act, "dtype": d,
                             "optimizer": o, "torch_ms": ms, "torch_tflops": useful / (ms / 1e3) / 1e12})
    grouped = []
    if a.grouped:
        import grouped_ref
        for (T, M, H, E, k, f, act) in parsed:
            late = a.compile_until > 0 and time.time() - t_start > a.compile_until
            ms_modes = tuple(m for m in modes if not (late and m == "compile")) or ("eager",)
            for scheme in ("moec", "bf16"):
                r = grouped_ref.layer_step_ms(T, M, H, E, k, f, act, scheme, tuple(opts), ms_modes, a.device,
                                              a.warmup, a.reps)
                for o in opts:
                    g = {"T": T, "M": M, "H": H, "E": E, "k": k, "f": f, "activation": act, "scheme": scheme,
                         "optimizer": o, "kernel": r["kernel"], **r[o]}
                    if "why_not_grouped" in r:
                        g["why_not_grouped"] = r["why_not_grouped"]
                    if late and "compile" in modes:
                        g["compile"] = "skipped: past --compile-until"
                    grouped.append(g)
    print(f"device: {dev}; torch {torch.__version__}")
    for d in dtypes:
        print(f"{d} GEMM peak ({256 if cpu else 8192}^3): {peaks[d]:.1f} TFLOP/s")
    print(f"copy bandwidth (read+write): {bw:.0f} GB/s")
    if rows:
        print(f"{'T':>6} {'M':>5} {'H':>5} {'E':>3} {'k':>2} {'f':>4} {'act':>6} {'dtype':>5} {'opt':>4} "
              f"{'loop ms':>9} {'TFLOP/s':>8} {'% peak':>7}")
    for r in rows:
        print(f"{r['T']:>6} {r['M']:>5} {r['H']:>5} {r['E']:>3} {r['k']:>2} {r['f']:>4} {r['activation']:>6} "
              f"{r['dtype']:>5} {r['optimizer']:>4} {r['torch_ms']:>9.2f} {r['torch_tflops']:>8.1f} "
              f"{100 * r['torch_tflops'] / peaks[r['dtype']]:>6.1f}%")
    for g in grouped:
        modes_s = ", ".join(f"{m} {g[m]:.2f} ms" if isinstance(g.get(m), float) else f"{m} {g.get(m)}"
                            for m in ("eager", "compile") if m in g)
        print(f"grouped {g['T']},{g['M']},{g['H']},{g['E']},{g['k']},{g['f']},{g['activation']} {g['scheme']} "
              f"{g['optimizer']} [{g['kernel']}; {g['optimizer_impl']}]: {modes_s}; best "
              + (f"{g['best_ms']:.2f} ms ({g['best_mode']})" if "best_ms" in g else "none"))
    if a.json:
        json.dump({"device": dev, "torch": torch.__version__,
                   "gemm_peak_tflops": peaks.get("bf16", next(iter(peaks.values()))),
                   "gemm_peak_tflops_by_dtype": peaks, "gemm_n": 256 if cpu else 8192, "copy_gbps": bw, "layers": rows, "grouped": grouped,
                   "optimizers": opts, "seconds": time.time() - t_start},
                  open(a.json, "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
