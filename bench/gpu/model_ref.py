#!/usr/bin/env python3
"""model_ref.py — a moec model's twin in plain PyTorch, built from the plan
(`moec plan --json SPEC`), which says the model's whole function: its layers
in order (residual blocks as `residual` ... `end` pairs), each parameter's
name and shape, and each layer's options (docs/PLAN.md).

The twin is the model as a PyTorch user would write it: the n-gram token
embedding, layernorm and rmsnorm, attention through
F.scaled_dot_product_attention (rotary positions, the causal mask,
grouped-query heads), dense FFNs, and MoE layers built as current trainers
build them (bench/gpu/grouped_ref.py: an fp32 gate, the choices sorted by
expert, torch._grouped_mm for both expert GEMMs on CUDA, index_add_ back),
and the cross-entropy head. Supported gates: softmax and sigmoid (with its
frozen bias, groups and route_scale), token choice, shared experts, and moec's
capacities (fixed, dynamic, dropless; the claims past an expert's capacity are
dropped in moec's order: all tokens' first choices, then their second, ...;
batch-prioritized by the first choice's score where the spec says so). Cosine
gates, expert choice and gate noise are refused with a message.

Precision schemes: fp32 (everything in fp32: the cpu backend's numbers) and
moec (fp32 master parameters and gradients, every GEMM but the gate's on a bf16
copy made in the forward, norms, softmax and the loss in fp32: the scheme of
moec's bf16 models).

Commands:
  check PLAN --ckpt DIR --data FILE --eval-loss X [--tol R] [--device D]
             [--scheme fp32|moec]
      load moec's checkpoint DIR (model.safetensors), compute the held-out loss
      on the same windows of FILE as moec's evaluation (runtime/data.c), in
      fp32 on the cpu by default, and compare with X (moec's eval_loss at the
      checkpoint's step): exit 1 when the relative difference exceeds R
      (default 1e-6; a correct twin agrees to about 1e-7 with moec's cpu
      backend). --device cuda --scheme moec checks moec's bf16 model on the
      GPU against the twin's (bf16 GEMMs on both sides, in other orders: give
      a tolerance such as 1e-2).
  bench PLAN --data FILE [--device cuda] [--steps N] [--warmup W]
             [--modes eager,compile] [--lr LR] [--clip C] [--json OUT]
      train the twin (AdamW, fused where it can be, the moec scheme on CUDA,
      fp32 on the cpu) on random windows of FILE for N steps, and report the
      median step time after W, and the model TFLOP/s with the plan's FLOPs
      (the FLOP count moec's metrics use, so the two compare as speeds).
"""
import argparse
import json
import math
import os
import struct
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from grouped_ref import expert_gemm, grouped_mm_ok, grouped_mm_why_not  # noqa: E402

LN_EPS, RMS_EPS = 1e-5, 1e-6  # runtime/cpu_ops.h


class Unsupported(Exception):
    pass


def moec_capacity(l, tokens, max_claims):
    """The claims an expert keeps (runtime/placement.c's moert_capacity):
    k floor(f ceil(T / E)) for f > 0; the most claimed for dropless; that,
    capped at k floor(|f| ceil(T / E)), for dynamic (f < 0)."""
    spe = -(-tokens // l["experts"])
    f, k = l["capacity_factor"], l["top_k"]
    if f > 0:
        c = k * math.floor(f * spe)
    else:
        c = max_claims
        if f < 0:
            c = min(c, k * math.floor(-f * spe))
    return max(c, 1)


def kept_claims(l, topi, topv):
    """[T, k] bool: the claims moec keeps. Each expert's claims take slots in
    moec's order (runtime/cpu_ops.c's moert_cpu_gate_locations): the first
    choices of all tokens, then the second choices, ...; tokens in order, or by
    their first choice's score (descending, ties to the lower token) when
    batch_prioritized. A claim whose slot is past the capacity is dropped."""
    T, k = topi.shape
    E = l["experts"]
    counts = torch.zeros(E, dtype=torch.int64, device=topi.device).scatter_add_(
        0, topi.reshape(-1), torch.ones_like(topi.reshape(-1)))
    keep = moec_capacity(l, T, int(counts.max()))
    if keep >= int(counts.max()):
        return None
    perm = torch.arange(T, device=topi.device)
    if l["batch_prioritized"]:
        perm = torch.argsort(-topv[:, 0], stable=True)
    sm = topi[perm].t().reshape(-1)  # claim (choice j, the i-th token of perm) at j T + i
    o = torch.argsort(sm, stable=True)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(sm)
    rank[o] = torch.arange(sm.numel(), device=sm.device) - start[sm[o]]
    kept = torch.empty(T, k, dtype=torch.bool, device=topi.device)
    kept[perm] = (rank < keep).reshape(k, T).t()
    return kept


def route(topi, E, kept):
    """The sorted layout of the kept choices: (order, counts), order [n] the
    flat indices t k + j sorted by expert (each expert's in token order),
    counts [E] the kept choices of each expert."""
    flat = topi.reshape(-1)
    if kept is not None:
        flat = torch.where(kept.reshape(-1), flat, torch.full_like(flat, E))  # E: dropped, sorted last
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E + 1, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    if kept is not None:
        order = order[: int(counts[:E].sum())]  # a host sync, as moec's one read of the counts
    return order, counts[:E]


def act_fn(h, act):
    if act == "relu":
        return F.relu(h)
    if act == "gelu":
        return F.gelu(h, approximate="tanh")
    if act == "silu":
        return F.silu(h)
    if act == "swiglu":  # fc1's first half is the gate, the second the value
        g, u = h.chunk(2, dim=-1)
        return F.silu(g) * u
    raise Unsupported(f"activation {act}")


# ---------------------------------------------------------------- the model


def check_plan(plan):
    """Unsupported, with the reason, for a plan the twin cannot build."""
    if "vocab" not in plan:
        raise Unsupported("the twin needs a model with vocab (a language model); this plan has none")
    if plan.get("world", 1) != 1:
        raise Unsupported("give the plan of one rank (moec plan --json without --ranks)")
    for l in plan["layers"]:
        k = l["kind"]
        if k not in ("embed", "layernorm", "rmsnorm", "ffn", "attention", "moe", "residual", "end", "head"):
            raise Unsupported(f"layer {l['name']}: kind {k} has no twin")
        if k == "moe":
            if l["gate"] not in ("softmax", "sigmoid"):
                raise Unsupported(f"layer {l['name']}: gate = {l['gate']} has no twin (softmax and sigmoid do)")
            if l["routing"] != "token_choice":
                raise Unsupported(f"layer {l['name']}: routing = {l['routing']} has no twin")
            if l["gate_noise"] > 0:
                raise Unsupported(f"layer {l['name']}: gate_noise has no twin")


class Twin(torch.nn.Module):
    """The model of a plan. Parameters are named as moec's tensors (dots as
    "__", since nn.Module names cannot hold dots), with moec's shapes: dense
    weights [in, out], expert weights [E, in, out] as moec stores them, except
    that expert weights are kept [E, out, in] (TorchTitan's layout, the one
    torch._grouped_mm is probed with) and transposed when a checkpoint loads."""

    def __init__(self, plan, scheme="fp32", device="cpu", grouped=None, seed=0):
        super().__init__()
        check_plan(plan)
        self.plan, self.scheme = plan, scheme
        self.M, self.V, self.ctx = plan["dim"], plan["vocab"], plan["context"]
        self.seq = plan.get("seq", 0)
        self.cdt = torch.bfloat16 if scheme == "moec" else torch.float32
        dev = torch.device(device)
        self.grouped = grouped_mm_ok(dev) if grouped is None else grouped
        if self.grouped and self.cdt != torch.bfloat16:
            self.grouped = False  # torch._grouped_mm is bf16: fp32 runs the per-expert loop
        self.layers = plan["layers"]
        g = torch.Generator().manual_seed(seed)
        for l in self.layers:
            for t in l["tensors"]:
                shape = list(t["shape"])
                name = t["name"]
                if l["kind"] == "moe" and self.slot(name) in ("fc1_w", "fc2_w"):
                    shape = [shape[0], shape[2], shape[1]]
                p = self.init(name, shape, g)
                frozen = self.slot(name) == "gate_bias"
                self.register_parameter(self.key(name), torch.nn.Parameter(p.to(dev), requires_grad=not frozen))

    @staticmethod
    def key(name):
        return name.replace(".", "__")

    @staticmethod
    def slot(name):
        return name.rsplit(".", 1)[1]

    def p(self, layer, slot):
        return getattr(self, self.key(layer["name"] + "." + slot), None)

    def init(self, name, shape, g):
        """A fresh parameter: ones for norm weights, zeros for biases, normal
        with std 1/sqrt(fan-in) for the rest (moec's initial values come from
        a checkpoint when they matter)."""
        s = self.slot(name)
        if s == "weight":
            return torch.ones(shape)
        if s in ("bias", "gate_bias") or s.endswith("_b"):
            return torch.zeros(shape)
        fan_in = shape[-1] if s in ("fc1_w", "fc2_w") and len(shape) == 3 else shape[-2] if len(shape) >= 2 else 1
        if s == "table":
            fan_in = 1
        return torch.randn(shape, generator=g) / math.sqrt(fan_in)

    # -- checkpoints

    def load_moec(self, tensors):
        """moec's tensors by name (global shapes, fp32) into the parameters."""
        for l in self.layers:
            for t in l["tensors"]:
                name = t["name"]
                if name not in tensors:
                    raise ValueError(f"the checkpoint has no tensor {name}")
                v = tensors[name]
                if l["kind"] == "moe" and self.slot(name) in ("fc1_w", "fc2_w"):
                    v = v.transpose(1, 2)
                p = getattr(self, self.key(name))
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"{name}: the checkpoint's shape {tuple(v.shape)} is not the plan's {tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(v.to(p.device, p.dtype))

    # -- layers

    def lin(self, x, w, b=None):
        """x [n, in] @ w [in, out] (+ b) with the scheme's GEMM type; fp32 out."""
        y = x.to(self.cdt) @ w.to(self.cdt)
        if b is not None:
            y = y + b.to(self.cdt)
        return y.float()

    def embed(self, l, win):
        table = self.p(l, "table")  # [C, V, M]
        C, V, M = table.shape
        flat = torch.cat([table.reshape(C * V, M), table.new_zeros(1, M)])
        idx = torch.where(win < 0, torch.full_like(win, C * V), win + torch.arange(C, device=win.device) * V)
        return flat[idx].sum(dim=1)

    def attention(self, l, x):
        H, KV, D = l["heads"], l["kv_heads"], l["head_dim"]
        T, S = x.shape[0], self.seq
        qkv = self.lin(x, self.p(l, "qkv_w"), self.p(l, "qkv_b"))
        q, k, v = qkv.split([H * D, KV * D, KV * D], dim=1)
        if l["rope"] > 0:
            q, k = self.rope(q, H, D, l["rope"]), self.rope(k, KV, D, l["rope"])
        n = T // S

        def heads(z, h):
            return z.reshape(n, S, h, D).transpose(1, 2).to(self.cdt)

        q, k, v = heads(q, H), heads(k, KV), heads(v, KV)
        if KV != H:  # grouped-query: query head h reads key/value head h // (H / KV)
            k = k.repeat_interleave(H // KV, dim=1)
            v = v.repeat_interleave(H // KV, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=bool(l["causal"]))
        o = o.transpose(1, 2).reshape(T, H * D)
        return self.lin(o, self.p(l, "out_w"), self.p(l, "out_b"))

    def rope(self, z, h, D, base):
        """Rotary positions on z [T, h*D] (runtime/cpu_ops.c's moert_cpu_rope:
        the halves (i, i + D/2) rotated by pos * base^(-2i/D), positions
        within each sequence), in fp32."""
        key = ("rope", z.shape[0], D, base, z.device)
        cs = getattr(self, "_rope_cache", {}).get(key)
        if cs is None:
            pos = (torch.arange(z.shape[0], dtype=torch.float64) % self.seq).unsqueeze(1)
            inv = base ** (-2.0 * torch.arange(D // 2, dtype=torch.float64) / D)
            ang = pos * inv
            cs = (torch.cos(ang).float().to(z.device), torch.sin(ang).float().to(z.device))
            self._rope_cache = {key: cs}
        c, s = cs
        z = z.reshape(z.shape[0], h, D)
        a, b = z[..., : D // 2], z[..., D // 2:]
        c, s = c.unsqueeze(1), s.unsqueeze(1)
        return torch.cat([a * c - b * s, a * s + b * c], dim=-1).reshape(z.shape[0], h * D)

    def ffn(self, l, x, prefix=""):
        h = self.lin(x, self.p(l, prefix + "fc1_w"), self.p(l, prefix + "fc1_b"))
        return self.lin(act_fn(h, l["activation"]), self.p(l, prefix + "fc2_w"), self.p(l, prefix + "fc2_b"))

    def gate(self, l, x):
        """(combine weights [T, k], topi [T, k], topv [T, k] (the chosen
        scores), scores [T, E], logits) in fp32, as moert_cpu_gate_io
        computes them."""
        E, k = l["experts"], l["top_k"]
        logits = x.float() @ self.p(l, "gate_w").float()
        if l["gate"] == "sigmoid":
            scores = torch.sigmoid(logits)
            key = scores + self.p(l, "gate_bias").float()
        else:
            scores = F.softmax(logits, dim=1)
            key = scores
        G, TG = l["groups"], l["top_groups"]
        if G > 1:  # groups ranked by the sum of their two best keys
            gk = key.reshape(-1, G, E // G)
            two = gk.topk(min(2, E // G), dim=2).values.sum(dim=2)
            keep = torch.zeros_like(two, dtype=torch.bool).scatter_(1, two.topk(TG, dim=1).indices, True)
            key = key.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))
        topi = key.topk(k, dim=1).indices
        topv = scores.gather(1, topi)
        w = topv
        if l["normalize_gate"]:
            w = topv / topv.sum(dim=1, keepdim=True).clamp(min=1e-9)
        rs = l["route_scale"] if l["route_scale"] != 0 else 1.0
        return w * rs, topi, topv, scores, logits

    def moe(self, l, x):
        E, k = l["experts"], l["top_k"]
        w, topi, topv, scores, logits = self.gate(l, x)
        order, counts = route(topi, E, kept_claims(l, topi, topv))
        offs = torch.cumsum(counts, 0).to(torch.int32)
        tok = order // k
        xs = x[tok].to(self.cdt)
        ex = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=order.numel())
        w1, w2 = self.p(l, "fc1_w").to(self.cdt), self.p(l, "fc2_w").to(self.cdt)
        h = expert_gemm(xs, w1, offs, self.grouped)
        if l["bias"]:
            h = h + self.p(l, "fc1_b").to(self.cdt)[ex]
        y = expert_gemm(act_fn(h, l["activation"]), w2, offs, self.grouped)
        if l["bias"]:
            y = y + self.p(l, "fc2_b").to(self.cdt)[ex]
        y = y.float() * w.reshape(-1)[order].unsqueeze(1)
        out = torch.zeros_like(x).index_add_(0, tok, y)
        if l["shared_experts"] > 0:
            out = out + self.ffn(l, x, "shared_")
        aux = x.new_zeros(())
        if l["aux_loss"] > 0:  # GShard's, on the top-1 choice (sigmoid scores normalized per token)
            p = scores / scores.sum(dim=1, keepdim=True).clamp(min=1e-9) if l["gate"] == "sigmoid" else scores
            frac = torch.zeros(E, device=x.device).scatter_add_(0, topi[:, 0], torch.ones_like(topi[:, 0], dtype=x.dtype))
            aux = aux + l["aux_loss"] * E * (p.mean(dim=0) * frac / x.shape[0]).sum()
        if l["z_loss"] > 0:
            aux = aux + l["z_loss"] * torch.logsumexp(logits, dim=1).square().mean()
        return out, aux

    def forward(self, win, nxt, label_smoothing=0.0):
        """(mean cross-entropy, objective): the objective adds the aux and
        z losses and trains on smoothed targets."""
        x, saved, aux = None, [], 0.0
        for l in self.layers:
            k = l["kind"]
            if k == "embed":
                x = self.embed(l, win)
            elif k == "residual":
                saved.append(x)
            elif k == "end":
                x = saved.pop() + x
            elif k == "layernorm":
                x = F.layer_norm(x, (self.M,), self.p(l, "weight"), self.p(l, "bias"), LN_EPS)
            elif k == "rmsnorm":
                x = x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + RMS_EPS) * self.p(l, "weight")
            elif k == "ffn":
                x = self.ffn(l, x)
            elif k == "attention":
                x = self.attention(l, x)
            elif k == "moe":
                x, a = self.moe(l, x)
                aux = aux + a
            elif k == "head":
                logits = self.lin(x, self.p(l, "w"))
                loss = F.cross_entropy(logits, nxt)
                obj = loss if label_smoothing == 0 else F.cross_entropy(logits, nxt, label_smoothing=label_smoothing)
                return loss, obj + aux
        raise Unsupported("the plan has no head")


# ---------------------------------------------------------------- data


class Bytes:
    """The byte file as runtime/data.c reads it: the training part, and the
    held-out tail (a tenth, at least one global batch plus one)."""

    def __init__(self, path, global_tokens, seq, context):
        self.b = open(path, "rb").read()
        n = len(self.b)
        if n < 2 * (global_tokens + 1):
            raise ValueError(f"{path} has {n} bytes; a step of {global_tokens} tokens needs {2 * (global_tokens + 1)}")
        tail = max(n // 10, global_tokens + 1)
        self.ntrain = n - tail
        self.T, self.S, self.C = global_tokens, seq, context
        self.t = torch.frombuffer(bytearray(self.b), dtype=torch.uint8).long()

    def windows(self, starts):
        """win [T, C] (-1 before a window's start) and next [T] of windows of
        S + 1 bytes at starts."""
        S, C = self.S, self.C
        st = torch.as_tensor(starts, dtype=torch.long).unsqueeze(1)
        i = torch.arange(S).unsqueeze(0)
        pos = (st + i).reshape(-1)  # the token's position
        ii = i.expand(len(starts), S).reshape(-1)
        c = torch.arange(C).unsqueeze(0)
        back = pos.unsqueeze(1) - c
        win = torch.where(ii.unsqueeze(1) - c < 0, torch.full_like(back, -1), self.t[back.clamp(min=0)])
        return win, self.t[pos + 1]

    def eval_batch(self):
        """The held-out batch of moec's evaluation (data.c's window_start and
        moert_data_tokens)."""
        if self.S:
            nw = self.T // self.S
            room = len(self.b) - self.ntrain - (self.S + 1)
            return self.windows([self.ntrain + (j * (room // (nw - 1)) if nw > 1 else 0) for j in range(nw)])
        p = torch.arange(self.T) + self.ntrain
        back = p.unsqueeze(1) - torch.arange(self.C).unsqueeze(0)
        win = torch.where(back < self.ntrain, torch.full_like(back, -1), self.t[back.clamp(min=0)])
        return win, self.t[p + 1]

    def train_batch(self, gen):
        """Random windows of the training part (the twin's own draws, not
        moec's: the same kind of batch, not the same bytes)."""
        if self.S:
            starts = torch.randint(0, self.ntrain - self.S, (self.T // self.S,), generator=gen).tolist()
            return self.windows(starts)
        base = int(torch.randint(0, self.ntrain - self.T - 1, (1,), generator=gen))
        p = torch.arange(self.T) + base
        back = p.unsqueeze(1) - torch.arange(self.C).unsqueeze(0)
        win = torch.where(back < 0, torch.full_like(back, -1), self.t[back.clamp(min=0)])
        return win, self.t[p + 1]


# ---------------------------------------------------------------- checkpoints


def read_safetensors(path):
    """name -> fp32 tensor of a safetensors file (moec writes F32)."""
    raw = open(path, "rb").read()
    if len(raw) < 8:
        raise ValueError(f"{path}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8:8 + n])
    base, out = 8 + n, {}
    for name, v in head.items():
        if name == "__metadata__":
            continue
        if v["dtype"] != "F32":
            raise ValueError(f"{path}: tensor {name} is {v['dtype']}, not F32")
        a, b = v["data_offsets"]
        out[name] = torch.frombuffer(bytearray(raw[base + a:base + b]), dtype=torch.float32).reshape(v["shape"])
    return out


# ---------------------------------------------------------------- commands


def load_plan(path):
    with open(path) as f:
        return json.load(f)


def cmd_check(a):
    plan = load_plan(a.plan)
    check_plan(plan)
    dev = torch.device(a.device)
    twin = Twin(plan, a.scheme, dev)
    twin.load_moec(read_safetensors(os.path.join(a.ckpt, "model.safetensors")))
    data = Bytes(a.data, plan["tokens_per_rank"] * plan["world"], plan.get("seq", 0), plan["context"])
    win, nxt = (t.to(dev) for t in data.eval_batch())
    with torch.no_grad():
        loss, _ = twin(win, nxt)
    loss = float(loss)
    rel = abs(loss - a.eval_loss) / max(abs(a.eval_loss), 1e-30)
    print(f"twin eval loss {loss:.9f} ({a.scheme} on {dev.type}), moec {a.eval_loss:.9f}, relative difference "
          f"{rel:.2e} (tolerance {a.tol:g})")
    return 0 if rel <= a.tol else 1


def median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


def cmd_bench(a):
    plan = load_plan(a.plan)
    check_plan(plan)
    dev = torch.device(a.device)
    scheme = "moec" if dev.type == "cuda" else "fp32"
    flops = plan["flops_per_step"]["forward"] + plan["flops_per_step"]["backward"]
    data = Bytes(a.data, plan["tokens_per_rank"], plan.get("seq", 0), plan["context"])
    res = {"model": plan["model"], "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "scheme": scheme, "flops_per_step": flops, "steps": a.steps,
           "warmup": a.warmup, "modes": {}}
    for mode in a.modes.split(","):
        torch.manual_seed(0)
        torch._dynamo.reset()
        twin = Twin(plan, scheme, dev, seed=0)
        res["moe_kernel"] = "torch._grouped_mm" if twin.grouped else "loop (%s)" % (
            grouped_mm_why_not(dev) if dev.type == "cuda" else "the device is the cpu")
        params = [p for p in twin.parameters() if p.requires_grad]
        try:
            opt = torch.optim.AdamW(params, lr=a.lr, fused=dev.type == "cuda")
        except (RuntimeError, TypeError):
            opt = torch.optim.AdamW(params, lr=a.lr)
        fwd = torch.compile(twin) if mode == "compile" else twin
        gen = torch.Generator().manual_seed(1)
        batches = [tuple(t.to(dev) for t in data.train_batch(gen)) for _ in range(min(a.steps, 8))]
        times, losses = [], []
        try:
            for s in range(a.steps):
                win, nxt = batches[s % len(batches)]
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss, obj = fwd(win, nxt)
                obj.backward()
                if a.clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, a.clip, foreach=True)
                opt.step()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                times.append(1e3 * (time.perf_counter() - t0))
                losses.append(float(loss.detach()))
        except Exception as e:  # a compile that fails: say so, keep the other mode
            res["modes"][mode] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            continue
        ms = median(times[a.warmup:]) if a.steps > a.warmup else median(times)
        res["modes"][mode] = {"ms": ms, "tflops": flops / ms / 1e9, "first_loss": losses[0], "last_loss": losses[-1]}
        del twin, opt, fwd
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    ok = {m: r for m, r in res["modes"].items() if "ms" in r}
    if ok:
        best = min(ok, key=lambda m: ok[m]["ms"])
        res["best_mode"], res["best_ms"], res["best_tflops"] = best, ok[best]["ms"], ok[best]["tflops"]
    for m, r in res["modes"].items():
        if "ms" in r:
            print(f"{plan['model']} twin ({m}, {scheme}, MoE by {res['moe_kernel']}): {r['ms']:.2f} ms/step, "
                  f"{r['tflops']:.1f} TFLOP/s, loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}")
        else:
            print(f"{plan['model']} twin ({m}): {r['error']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="the held-out loss of moec's checkpoint, against moec's")
    c.add_argument("plan")
    c.add_argument("--ckpt", required=True)
    c.add_argument("--data", required=True)
    c.add_argument("--eval-loss", type=float, required=True)
    c.add_argument("--tol", type=float, default=1e-6)
    c.add_argument("--device", default="cpu")
    c.add_argument("--scheme", choices=("fp32", "moec"), default="fp32")
    b = sub.add_parser("bench", help="train the twin and time its steps")
    b.add_argument("plan")
    b.add_argument("--data", required=True)
    b.add_argument("--device", default="cuda")
    b.add_argument("--steps", type=int, default=25)
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument("--modes", default="eager,compile")
    b.add_argument("--lr", type=float, default=1e-3)
    b.add_argument("--clip", type=float, default=1.0)
    b.add_argument("--json")
    a = ap.parse_args()
    try:
        return cmd_check(a) if a.cmd == "check" else cmd_bench(a)
    except (Unsupported, ValueError, OSError) as e:
        print(f"model_ref.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
