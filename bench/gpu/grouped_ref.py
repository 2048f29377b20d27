#!/usr/bin/env python3
"""grouped_ref.py — issue 18's strongest reference: the MoE layer current
trainers build (TorchTitan, DeepSpeed's AutoEP), imported by torch_ref.py.

  fp32 softmax top-k gate (a Linear M->E in fp32), the T*k choices sorted by
  expert (a stable argsort of the flattened top-k indices, so each expert's
  tokens stay in token order), torch._grouped_mm for both expert GEMMs with
  per-expert offsets (int32 cumulative counts), the activation between (relu,
  gelu, silu, or swiglu with fc1 M->2H), the outputs weighted by the gate and
  scattered back with index_add_. No expert biases (TorchTitan's experts have
  none). Capacity factor f > 0: each expert keeps the first
  C = k*floor(f*ceil(T/E)) of its tokens in token order (what torch_ref's loop
  layer keeps) and drops the rest before the GEMMs; f = 0 is dropless.

Two precision schemes:
  moec  fp32 master weights and fp32 gradients; the GEMMs on a bf16 copy made
        in the forward (explicit casts: the gradient flows through the cast
        into the fp32 master); the optimizer on the masters.
  bf16  pure bf16 parameters and gradients (the gate still computes in fp32).
  fp32  (tests only) everything in fp32.

torch._grouped_mm exists only on CUDA (sm90 and later) in recent PyTorch. Where
it is missing, or fails a probe, or the device is the cpu, the layer runs a
per-expert loop over the same sorted layout and the same offsets (so the
layout, offsets, scatter and gradients are testable on the cpu): such a
measurement is labeled "loop fallback", never grouped-GEMM (see kernel_name).
"""
import torch
import torch.nn.functional as F

from torch_ref import activation, median_ms

ACTIVATIONS = ("relu", "gelu", "silu", "swiglu")
SCHEMES = ("moec", "bf16", "fp32")


_probe = {}


def grouped_mm_ok(device):
    """Whether torch._grouped_mm runs here: CUDA only, and a tiny bf16 problem
    with unaligned group sizes (3 and 13 rows) matches the per-group matmuls.
    The answer (and why not) is cached per device."""
    device = torch.device(device)
    key = str(device)
    if key in _probe:
        return _probe[key][0]
    why = None
    if device.type != "cuda":
        why = "the device is the cpu"
    elif not hasattr(torch, "_grouped_mm"):
        why = f"torch {torch.__version__} has no torch._grouped_mm"
    else:
        try:
            a = torch.randn(16, 64, device=device, dtype=torch.bfloat16)
            b = torch.randn(2, 32, 64, device=device, dtype=torch.bfloat16).transpose(-2, -1)
            offs = torch.tensor([3, 16], device=device, dtype=torch.int32)
            y = torch._grouped_mm(a, b, offs=offs)
            ref = torch.cat([a[:3] @ b[0], a[3:] @ b[1]])
            torch.cuda.synchronize(device)
            if not torch.allclose(y.float(), ref.float(), rtol=2e-2, atol=2e-1):
                why = "torch._grouped_mm disagrees with matmul on the probe"
        except Exception as e:  # sm < 90, an old build, ...
            why = f"torch._grouped_mm fails here: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    _probe[key] = (why is None, why)
    return why is None


def grouped_mm_why_not(device):
    grouped_mm_ok(device)
    return _probe[str(torch.device(device))][1]


def capacity(T, E, k, f):
    """C = k*floor(f*ceil(T/E)) tokens an expert for f > 0; None (dropless) for f = 0."""
    if f <= 0:
        return None
    return k * int(f * ((T + E - 1) // E))


def route(topi, E, cap):
    """The sorted layout of the choices topi [T, k]: (order, counts) where
    order [n] are flat indices t*k+s sorted by expert, each expert's in token
    order, without the choices beyond cap an expert (None: none dropped), and
    counts [E] (int64) the kept choices of each expert."""
    flat = topi.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # a scatter of ones, not bincount: a static shape, so torch.compile keeps one graph
    counts = torch.zeros(E, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    if cap is not None:
        start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(flat.numel(), device=flat.device) - start[flat[order]]
        order = order[rank < cap]  # a host sync: the kept count is data-dependent
        counts = counts.clamp(max=cap)
    return order, counts


def expert_gemm(x, w, offs, grouped):
    """x [n, K] in the sorted layout, w [E, N, K] (TorchTitan's layout, passed
    transposed as [E, K, N]), offs [E] int32 cumulative ends: [n, N]."""
    wt = w.transpose(-2, -1)
    if grouped:
        return torch._grouped_mm(x, wt, offs=offs)
    # the loop fallback: the same layout and offsets, one matmul an expert
    ends = offs.tolist()
    outs, s = [], 0
    for e, end in enumerate(ends):
        if end > s:
            outs.append(x[s:end] @ wt[e])
        s = end
    if not outs:
        return x.new_zeros(0, w.shape[1])
    return torch.cat(outs)


class GroupedMoE(torch.nn.Module):
    """The grouped-GEMM layer. scheme (moec, bf16, fp32) sets the parameters'
    dtype (fp32 masters for moec) and the GEMMs' (bf16 for moec and bf16);
    grouped=None picks torch._grouped_mm where grouped_mm_ok says it runs."""

    def __init__(self, M, H, E, k, f, act="relu", scheme="moec", device="cpu", grouped=None):
        super().__init__()
        assert act in ACTIVATIONS and scheme in SCHEMES
        self.M, self.H, self.E, self.k, self.f, self.act, self.scheme = M, H, E, k, f, act, scheme
        pdt = torch.bfloat16 if scheme == "bf16" else torch.float32
        self.cdt = torch.float32 if scheme == "fp32" else torch.bfloat16
        self.grouped = grouped_mm_ok(device) if grouped is None else grouped
        if self.grouped and self.cdt != torch.bfloat16:
            raise ValueError("torch._grouped_mm is bf16 here: scheme fp32 runs the loop fallback")
        H1 = 2 * H if act == "swiglu" else H
        dev = torch.device(device)
        self.gate = torch.nn.Linear(M, E, bias=False, device=dev, dtype=pdt)
        self.w1 = torch.nn.Parameter((torch.randn(E, H1, M, device=dev) / M ** 0.5).to(pdt))
        self.w2 = torch.nn.Parameter((torch.randn(E, M, H, device=dev) / H ** 0.5).to(pdt))

    def kernel_name(self):
        return "torch._grouped_mm" if self.grouped else "loop fallback"

    def expert_params(self):
        return self.w1.numel() + self.w2.numel()

    def forward(self, x):
        T = x.shape[0]
        # the gate in fp32 (a bf16 gate parameter is cast up)
        scores = F.softmax(F.linear(x.float(), self.gate.weight.float()), dim=1)
        topv, topi = scores.topk(self.k, dim=1)
        topv = topv / topv.sum(dim=1, keepdim=True)
        order, counts = route(topi, self.E, capacity(T, self.E, self.k, self.f))
        offs = torch.cumsum(counts, 0).to(torch.int32)
        tok = order // self.k
        xs = x[tok].to(self.cdt)
        w1, w2 = self.w1.to(self.cdt), self.w2.to(self.cdt)  # the bf16 copy (a no-op for bf16)
        h = activation(expert_gemm(xs, w1, offs, self.grouped), self.act)
        y = expert_gemm(h, w2, offs, self.grouped)
        y = y * topv.reshape(-1)[order].unsqueeze(1).to(y.dtype)
        out = torch.zeros(T, self.M, device=x.device, dtype=y.dtype)
        out.index_add_(0, tok, y)
        return out.to(x.dtype)


def make_optimizer(params, opt, lr=1e-4):
    """SGD (no momentum: moec's) or AdamW on params, fused where this torch
    and device have it, else foreach. Returns (optimizer, implementation)."""
    params = list(params)
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.AdamW, "adamw": torch.optim.AdamW}[opt]
    on_cuda = params[0].is_cuda
    for impl in (("fused",) if on_cuda else ()) + ("foreach",):
        try:
            o = cls(params, lr=lr, **{impl: True})
            return o, impl
        except (RuntimeError, TypeError, ValueError):
            continue
    return cls(params, lr=lr), "for-loop"


def layer_step_ms(T, M, H, E, k, f, act, scheme, opts=("sgd",), modes=("eager", "compile"),
                  device="cuda", warmup=3, reps=20, grouped=None, seed=0):
    """Forward + backward + optimizer step of GroupedMoE (loss: the mean square
    of the output, as torch_ref's loop layer), median of reps after warmup, for
    each optimizer in opts and each mode (eager, compile: torch.compile of the
    layer). One layer serves every optimizer, so a mode compiles once.
    Returns a dict: kernel, and per opt {mode: ms or an "error ..." string,
    best_ms, best_mode, optimizer implementation}."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    layer = GroupedMoE(M, H, E, k, f, act, scheme, dev, grouped)
    xdt = torch.float32 if scheme == "fp32" else torch.bfloat16
    x = torch.randn(T, M, device=dev, dtype=xdt)
    out = {"kernel": layer.kernel_name(), "scheme": scheme, "activation": act}
    if not layer.grouped:
        out["why_not_grouped"] = grouped_mm_why_not(dev) if grouped is None else "the caller asked for the loop"
    fwd = {"eager": layer}
    for mode in modes:
        if mode == "compile":
            # a fresh dynamo cache a layer: every config and scheme compiles the same
            # forward, and past its recompile limit (8) dynamo would run it eager unsaid
            torch._dynamo.reset()
            try:
                fwd["compile"] = torch.compile(layer)
            except Exception as e:
                fwd["compile"] = f"error {type(e).__name__}: {str(e).splitlines()[0][:100]}"
    for opt in opts:
        o, impl = make_optimizer(layer.parameters(), opt)
        r = {"optimizer_impl": impl}
        for mode in modes:
            fn = fwd[mode]
            if isinstance(fn, str):
                r[mode] = fn
                continue

            def step():
                o.zero_grad(set_to_none=True)
                fn(x).float().square().mean().backward()
                o.step()

            try:
                r[mode] = median_ms(step, warmup, reps, dev)
            except Exception as e:  # a compile that fails at the first call
                r[mode] = f"error {type(e).__name__}: {str(e).splitlines()[0][:100]}"
        ok = {m: v for m, v in r.items() if m in modes and not isinstance(v, str)}
        if ok:
            r["best_mode"] = min(ok, key=ok.get)
            r["best_ms"] = ok[r["best_mode"]]
        out[opt] = r
        del o
    del layer, fwd
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out
