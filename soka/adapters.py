"""SoKA, LoRA and PiSSA layers, and the calls that put them into a model, save them and load them.

    report = inject(model, "soka", ("wq", "wk", "wv", "wo"))   # KPSVD init, rank per layer by the rule
    ... train the factors ...
    save_adapter(model, "adapter.pt");  load_adapter(fresh_base_model, "adapter.pt")
    merge(model)                                                # inference at the base model's cost

Every adapted linear layer keeps a frozen residual weight W_res (d_out, d_in) in the model's dtype and
adds a trainable update ΔW, applied to the activations and never formed as a dense matrix while
training: y = x W_resᵀ + x ΔWᵀ for a row of activations x, with

    SoKA   ΔW = Σ_k σ_k U_k ⊗ V_k    U (r, m, n), V (r, p, q), σ (r,)
    LoRA   ΔW = (α/r) · B A          A (r, d_in), B (d_out, r), W_res = W
    PiSSA  ΔW = B A                  A = √S_r V_rᵀ, B = U_r √S_r, W_res = W − B A

The factors are float32 Parameters (float64 for a float64 model) cast to x's dtype inside forward,
so a bfloat16 model trains without autocast. A KPSVD (or SVD) initialization moves the principal
part of W into the factors, so W_res depends on the *initial* factors: the adapter file keeps them,
with a sha256 fingerprint of each base weight, so that `load_adapter` rebuilds W_res bit for bit
from the original checkpoint. docs/method.md states the conventions and the file format.

    python -m pytest -q tests/test_adapters.py tests/test_peft_parity.py
"""
import hashlib
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from kpsvd import factor_shape, kpsvd, kron_apply, kron_sum, work_dtype
from rank_select import R_MAX, R_MIN, RULES, TAU, check_rule, explain_rank
from soka.checkpoints import check_stored, first_line
from soka.files import replace_files

try:
    from soka.kron_fused import INTERPRETED, KronFused   # the fast path: Triton kernels (CUDA torch ships triton)
except ImportError:
    KronFused, INTERPRETED = None, False

DEFAULT_TARGETS = ("wq", "wk", "wv", "wo")
LORA_RANK = 8             # rank for LoRA / PiSSA when inject gets rank=None
RANDOMIZED_ABOVE = 1024   # exact SVD while min side of the rearranged matrix ≤ this (SmolLM2: all
                          # layers); above it (LLaMA-2-7B: 4096) a seeded randomized top-(r_max+1) SVD
FORMAT = "soka-adapter"
VERSION = 1
# How a SoKA layer computes its forward (and backward), chosen per layer:
#   "reference"  F.linear(x, W_res) + kron_apply(x, σ, U, V): the equation, differentiated by autograd
#   "fused"      soka/kron_fused.py: the same function, the Kronecker part in two Triton kernels that
#                keep each token's small matrices on chip (CUDA; on CPU only under TRITON_INTERPRET=1)
#   "auto"       "fused" for CUDA tensors where triton imports, else "reference"
# float64 on a GPU always runs the reference (uses_fused)
IMPLS = ("auto", "fused", "reference")


def fingerprint(weight):
    """sha256 of the tensor's bytes as stored, with its shape and dtype: identifies a base weight."""
    raw = weight.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return {"sha256": hashlib.sha256(raw).hexdigest(), "shape": list(weight.shape),
            "dtype": str(weight.dtype).removeprefix("torch.")}


def check_impl(impl, device=None):
    """impl, if it names a path that runs here (on `device`, where given)."""
    if impl not in IMPLS:
        raise ValueError(f"adapters.py: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "fused" and KronFused is None:
        raise ValueError("adapters.py: impl 'fused' needs triton (it ships with CUDA builds of torch)")
    if impl == "fused" and device is not None and torch.device(device).type != "cuda" and not INTERPRETED:
        raise ValueError("adapters.py: impl 'fused' runs Triton kernels on a CUDA device (on a CPU only "
                         "under Triton's interpreter, TRITON_INTERPRET=1)")
    return impl


def uses_fused(impl, x):
    """Whether a SoKA layer with `impl` runs the fused kernels on input x. Never for float64 on a GPU:
    its tiles outgrow shared memory."""
    if impl == "reference" or (x.is_cuda and x.dtype == torch.float64):
        return False
    return impl == "fused" or (KronFused is not None and x.is_cuda)


# -----------------------------------------------------------------------------
# the layers

class AdapterLinear(nn.Module):
    """What SoKA, LoRA and PiSSA share: a frozen `weight` (the residual), merge/unmerge, and the
    forward y = x W_resᵀ + adapter(x), each method's update applied to the activations."""
    method = ""
    factor_names = ()

    def __init__(self, weight, delta0=None):
        super().__init__()
        self.d_out, self.d_in = weight.shape
        acc = work_dtype(weight.dtype)
        w = weight.detach() if delta0 is None else (weight.detach().to(acc) - delta0).to(weight.dtype)
        self.weight = nn.Parameter(w.clone(), requires_grad=False)   # W_res, model dtype, frozen
        self.merged = False
        self.info = {}                                        # the inject report row, base fingerprint

    def delta(self):
        """The dense update in float32 (float64), for merging and export, never for training."""
        raise NotImplementedError

    def adapter(self, x):
        raise NotImplementedError

    def forward(self, x):
        if x.shape[-1] != self.d_in:
            raise ValueError(f"adapters.py: x has {x.shape[-1]} features, the {self.method} layer expects {self.d_in}")
        y = F.linear(x, self.weight)
        if self.merged:
            if self.training and torch.is_grad_enabled():
                raise RuntimeError(f"{self.method} layer is merged, its factors would get no gradient; "
                                   "unmerge() before training")
            return y
        return y + self.adapter(x)

    def merged_weight(self):
        if self.merged:
            return self.weight.detach()
        acc = work_dtype(self.weight.dtype)
        return (self.weight.detach().to(acc) + self.delta()).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self):
        """W ← W_res + ΔW (sum in float32, one rounding to the model's dtype); a no-op when merged."""
        if not self.merged:
            self.weight.copy_(self.merged_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W ← W − ΔW with the same float32 ΔW. Floating point does not undo the merge's rounding:
        W_res comes back within about one ulp of |W_res| + |ΔW| per entry, not bit for bit."""
        if self.merged:
            acc = work_dtype(self.weight.dtype)
            self.weight.copy_((self.weight.to(acc) - self.delta()).to(self.weight.dtype))
            self.merged = False

    def trainable(self):
        return sum(getattr(self, k).numel() for k in self.factor_names)


class SoKALinear(AdapterLinear):
    """The SoKA layer: y = x (W_res + Σ_k σ_k U_k ⊗ V_k)ᵀ. The `weight` argument is the base weight W;
    the `self.weight` it leaves is W_res (frozen), the weight the factors are added to.
    subtract=True (the KPSVD init): W_res = W − Σ_k σ_k U_k ⊗ V_k in float32, and the initial factors
    stay as buffers sigma0, U0, V0 (not in the state dict; save_adapter writes them). subtract=False
    (random init, compress): W_res = W. `impl` picks how forward runs (IMPLS above); the paths compute
    the same function and agree up to rounding (bf16: the reference rounds σ·U once more)."""
    method = "soka"
    factor_names = ("sigma", "U", "V")

    def __init__(self, weight, sigma, U, V, *, subtract, impl="auto"):
        r, m, n = U.shape
        _, p, q = V.shape
        if (m * p, n * q) != tuple(weight.shape):
            raise ValueError(f"adapters.py: factors (m, n, p, q) = {(m, n, p, q)} give a {m * p}×{n * q} "
                             f"update, the weight is {tuple(weight.shape)}")
        acc = work_dtype(weight.dtype)
        sigma, U, V = (t.detach().to(weight.device, acc) for t in (sigma, U, V))
        super().__init__(weight, kron_sum(sigma, U, V) if subtract else None)
        self.sigma = nn.Parameter(sigma.clone())             # (r,)
        self.U = nn.Parameter(U.clone())                     # (r, m, n)
        self.V = nn.Parameter(V.clone())                     # (r, p, q)
        self.subtract, self.impl = subtract, check_impl(impl)
        if subtract:
            for k, t in (("sigma0", sigma), ("U0", U), ("V0", V)):
                self.register_buffer(k, t.clone(), persistent=False)

    def delta(self):
        return kron_sum(self.sigma, self.U, self.V).detach()

    def adapter(self, x):
        """x (Σ_k σ_k U_k ⊗ V_k)ᵀ, on the activations, never forming the update (kpsvd.py eq. 4)."""
        return kron_apply(x, *(t.to(x.dtype) for t in (self.sigma, self.U, self.V)))

    def forward(self, x):
        if not self.merged and uses_fused(self.impl, x):
            # the same function, its Kronecker part in two Triton kernels (soka/kron_fused.py)
            return KronFused.apply(x, self.weight, self.sigma, self.U, self.V)
        return super().forward(x)            # the reference: F.linear(x, W_res) + self.adapter(x)

    def extra_repr(self):
        r, m, n = self.U.shape
        _, p, q = self.V.shape
        return (f"d_out={self.d_out}, d_in={self.d_in}, (m, n, p, q)=({m}, {n}, {p}, {q}), r={r}, "
                f"trainable={self.trainable()}, merged={self.merged}, impl={self.impl}")


class LoRALinear(AdapterLinear):
    """LoRA: W_res = W untouched, update scale · B A with A (r, d_in), B (d_out, r)."""
    method = "lora"
    factor_names = ("A", "B")

    def __init__(self, weight, A, B, *, scale=1.0, subtract=False):
        if A.shape[1] != weight.shape[1] or B.shape[0] != weight.shape[0] or A.shape[0] != B.shape[1]:
            raise ValueError(f"adapters.py: A {tuple(A.shape)} and B {tuple(B.shape)} do not fit a weight "
                             f"{tuple(weight.shape)}: need A (r, d_in), B (d_out, r)")
        acc = work_dtype(weight.dtype)
        A, B = (t.detach().to(weight.device, acc) for t in (A, B))
        super().__init__(weight, scale * (B @ A) if subtract else None)
        self.A = nn.Parameter(A.clone())                     # (r, d_in)
        self.B = nn.Parameter(B.clone())                     # (d_out, r)
        self.scale, self.subtract = float(scale), subtract
        if subtract:
            self.register_buffer("A0", A.clone(), persistent=False)
            self.register_buffer("B0", B.clone(), persistent=False)

    def delta(self):
        return (self.scale * (self.B @ self.A)).detach()

    def adapter(self, x):
        return F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype)) * self.scale

    def extra_repr(self):
        return (f"d_out={self.d_out}, d_in={self.d_in}, r={self.A.shape[0]}, scale={self.scale:g}, "
                f"trainable={self.trainable()}, merged={self.merged}")


class PiSSALinear(LoRALinear):
    """PiSSA: LoRA whose factors start at the top-r SVD of W, removed from the frozen residual."""
    method = "pissa"

    def __init__(self, weight, A, B):
        super().__init__(weight, A, B, scale=1.0, subtract=True)


def adapter_layers(model):
    """[(name, layer)] for every adapter layer in the model, in module order."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, AdapterLinear)]


def merge(model):
    for _, layer in adapter_layers(model):
        layer.merge()


def unmerge(model):
    for _, layer in adapter_layers(model):
        layer.unmerge()


# -----------------------------------------------------------------------------
# initializations: the math, one function each

def soka_factors(M, shape, *, rank=None, tau=TAU, r_min=R_MIN, r_max=R_MAX, randomized=None, seed=0,
                 rule="both"):
    """KPSVD of M (a weight, or an update for compress) in float32 and the rank choice (rule:
    rank_select.RULES): (sigma, U, V) truncated to r, and the RankChoice fields for the report."""
    m, n, p, q = shape
    full = min(m * n, p * q)
    if rank is not None and not 1 <= rank <= full:
        raise ValueError(f"adapters.py: rank {rank} must lie in 1..min(m·n, p·q) = {full} for factors {shape}")
    Mf = M.detach().to(work_dtype(M.dtype))
    if randomized is None:
        randomized = full > RANDOMIZED_ABOVE
    if randomized:
        # Top-K values only, K ≥ r_max + 1 as rank_select asks, with the whole energy as total.
        K = min(full, max(rank or 0, r_max) + 1)
        sigma, U, V = kpsvd(Mf, m, n, p, q, rank=K, randomized=True, seed=seed)
        total = float(Mf.double().square().sum())
    else:
        sigma, U, V = kpsvd(Mf, m, n, p, q)
        total = None
    if float(sigma[0]) == 0:
        raise ValueError("adapters.py: the matrix is all zeros; its Kronecker spectrum cannot choose a rank")
    c = explain_rank(sigma, tau=tau, r_min=min(r_min, full), r_max=min(r_max, full), total=total, rule=rule)
    r = min(c.r if rank is None else rank, sigma.numel())
    E = total if total is not None else float(sigma.double().square().sum())
    kept = float(sigma[:r].double().square().sum()) / E
    return sigma[:r], U[:r], V[:r], dict(r_energy=c.r_energy, r_elbow=c.r_elbow, r=r, energy_kept=kept)


def random_soka_factors(r, shape, *, seed):
    """σ = 0 and U, V with orthonormal (so unit-Frobenius) columns: step 0 is the base model exactly.
    U and V get no gradient until σ moves away from 0 (as LoRA's A with B = 0)."""
    m, n, p, q = shape
    if r > min(m * n, p * q):
        raise ValueError(f"adapters.py: rank {r} exceeds min(m·n, p·q) = {min(m * n, p * q)} for factors {shape}")
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m * n, r, generator=g, dtype=torch.float64)).Q.T.reshape(r, m, n)
    V = torch.linalg.qr(torch.randn(p * q, r, generator=g, dtype=torch.float64)).Q.T.reshape(r, p, q)
    return torch.zeros(r), U.float(), V.float()


def pissa_factors(W, r, *, randomized=None, seed=0):
    """A = √S_r V_rᵀ (r, d_in), B = U_r √S_r (d_out, r) from the SVD of W in float32, and the energy
    fraction they hold. The split (d_out, 1, 1, d_in) makes kpsvd's rearrangement the identity, so
    this is kpsvd's plain SVD, with its sign convention and its seeded randomized path."""
    d_out, d_in = W.shape
    if not 1 <= r <= min(d_out, d_in):
        raise ValueError(f"adapters.py: PiSSA rank {r} must lie in 1..{min(d_out, d_in)} for a {d_out}×{d_in} weight")
    Wf = W.detach().to(work_dtype(W.dtype))
    rand = randomized if randomized is not None else min(d_out, d_in) > RANDOMIZED_ABOVE
    S, Uw, Vw = kpsvd(Wf, d_out, 1, 1, d_in, rank=r, randomized=rand, seed=seed)  # (r,), (r, d_out, 1), (r, 1, d_in)
    sq = S.sqrt()
    A = sq[:, None] * Vw.reshape(r, d_in)
    B = Uw.reshape(r, d_out).T * sq
    return A, B, float(S.double().square().sum() / Wf.double().square().sum())


def lora_factors(d_out, d_in, r, *, seed):
    """A Kaiming-uniform with a = √5 as nn.Linear and PEFT draw it, U(−1/√d_in, 1/√d_in); B = 0."""
    g = torch.Generator().manual_seed(seed)
    A = (torch.rand(r, d_in, generator=g) * 2 - 1) / math.sqrt(d_in)
    return A, torch.zeros(d_out, r)


# -----------------------------------------------------------------------------
# inject, compress

def _find(model, targets):
    """[(name, nn.Linear)] whose last name component is in targets; refuses layers already adapted
    and target names that match no linear layer (a typo would otherwise adapt less, silently)."""
    found, adapted, linear = [], [], {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, AdapterLinear)):
            linear[name.rsplit(".", 1)[-1]] = None           # an ordered set of the linear layers' names
        if name.rsplit(".", 1)[-1] in targets:
            if isinstance(mod, AdapterLinear):
                adapted.append(name)
            elif isinstance(mod, nn.Linear):
                if mod.bias is not None:
                    raise ValueError(f"adapters.py: {name} has a bias; LLaMA's linear layers have none")
                found.append((name, mod))
    if adapted:
        raise ValueError(f"adapters.py: {adapted[0]} already has an adapter; start from a freshly loaded base")
    missing = [t for t in targets if t not in linear]
    if missing:
        raise ValueError(f"adapters.py: no nn.Linear named {' '.join(missing)} in the model; its linear layers "
                         f"are named {' '.join(linear)}")
    if not found:
        raise ValueError(f"adapters.py: no nn.Linear named {targets} in the model "
                         f"(Meta names: wq wk wv wo w1 w2 w3)")
    return found


def _place(model, name, layer):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, layer)


def _freeze(model):
    for prm in model.parameters():
        prm.requires_grad_(False)


def _check_factor_shapes(factors, names):
    """factors as inject and compress take it: None, (m, n, p, q) of positive ints, or a dict of those
    whose keys are names of the layers this call adapts (a typo would fall back to the default split)."""
    if factors is None:
        return
    for f in factors.values() if isinstance(factors, dict) else [factors]:
        ok = isinstance(f, (tuple, list)) and len(f) == 4
        if not ok or not all(isinstance(v, numbers.Integral) and v >= 1 for v in f):
            raise ValueError(f"adapters.py: factors (m, n, p, q) must be four positive ints, got {f!r}")
    unknown = [k for k in factors if k not in names] if isinstance(factors, dict) else []
    if unknown:
        raise ValueError(f"adapters.py: factors key(s) {' '.join(map(str, unknown))} name no layer this "
                         f"call adapts; its layers are named {' '.join(dict.fromkeys(names))}")


def _shape_for(name, W, factors):
    if factors is None:
        return factor_shape(*W.shape)
    if isinstance(factors, dict):
        key = name.rsplit(".", 1)[-1]
        if key not in factors:
            return factor_shape(*W.shape)
        factors = factors[key]
    m, n, p, q = (int(f) for f in factors)
    if (m * p, n * q) != tuple(W.shape):
        raise ValueError(f"adapters.py: {name} is {tuple(W.shape)}, factors (m, n, p, q) = {(m, n, p, q)} "
                         f"give {m * p}×{n * q}")
    return m, n, p, q


def inject(model, method="soka", targets=DEFAULT_TARGETS, *, rank=None, tau=TAU, r_min=R_MIN, r_max=R_MAX,
           init="kpsvd", alpha=None, factors=None, randomized=None, seed=0, impl="auto", verbose=True,
           rule="both"):
    """Replace the targeted nn.Linear layers by adapter layers in place, freeze everything else, and
    return the report {"method", "options", "layers": [row per layer], "totals"} (printed if verbose).

    method "soka": factor shapes by kpsvd.factor_shape, or `factors` = (m, n, p, q), or a dict
    {target name: (m, n, p, q)}; rank fixed by `rank` or chosen per layer by rank_select on the
    layer's Kronecker spectrum (tau, r_min, r_max; rule "both", or "energy" / "elbow" alone: the
    rule isolated, rank_select.RULES); init "kpsvd" (docs/method.md) or "random" (σ = 0,
    same rank rule, W_res = W). randomized None: exact SVD up to RANDOMIZED_ABOVE, True/False forces.
    method "lora" (scale alpha / r, alpha None = r) and "pissa" take `rank`, default LORA_RANK.
    Layer i draws its random numbers from seed + i. impl: how SoKA layers run (IMPLS; same results).
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if method not in ("soka", "lora", "pissa"):
        raise ValueError(f"adapters.py: method must be 'soka', 'lora' or 'pissa', got {method!r}")
    if init not in ("kpsvd", "random"):
        raise ValueError(f"adapters.py: init must be 'kpsvd' or 'random', got {init!r}")
    check_impl(impl)
    if method != "soka" and (init != "kpsvd" or factors is not None):
        raise ValueError(f"adapters.py: init= and factors= are SoKA options; {method} has its own init")
    if rule not in RULES or (method != "soka" and rule != "both"):
        raise ValueError(f"adapters.py: rule must be one of {RULES} (a SoKA option), got {rule!r} for {method}")
    if method != "lora" and alpha is not None:
        raise ValueError("adapters.py: alpha is LoRA's scale (alpha / r); SoKA and PiSSA have none")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"adapters.py: alpha must be > 0 (LoRA's scale is alpha / r), got {alpha!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"adapters.py: rank must be a positive int or None, got {rank!r}")
    if method != "soka" and rank is None:
        rank = LORA_RANK
    if method == "soka":
        check_rule(tau, r_min, r_max, rule)                 # before any layer changes
    options = dict(method=method, targets=list(targets), rank=rank, tau=tau, r_min=r_min, r_max=r_max,
                   init=init, alpha=alpha, factors=factors, randomized=randomized, seed=seed, rule=rule)
    found = _find(model, targets)
    _check_factor_shapes(factors, [name.rsplit(".", 1)[-1] for name, _ in found])
    if method != "soka":          # beyond min(d_out, d_in), B A gains parameters but no rank
        for name, lin in found:
            d_out, d_in = lin.weight.shape
            if rank > min(d_out, d_in):
                raise ValueError(f"adapters.py: {method} rank {rank} exceeds min(d_out, d_in) = {min(d_out, d_in)} "
                                 f"of {name} ({d_out}×{d_in})")
    _freeze(model)
    rows = []
    for i, (name, lin) in enumerate(found):
        W = lin.weight.detach()
        row = dict(name=name, shape=list(W.shape), factors=None, r_energy=None, r_elbow=None,
                   r=rank, energy_kept=None)
        if method == "soka":
            shape = _shape_for(name, W, factors)
            row["factors"] = list(shape)
            if init == "kpsvd" or rank is None:
                sigma, U, V, choice = soka_factors(W, shape, rank=rank, tau=tau, r_min=r_min, r_max=r_max,
                                                   randomized=randomized, seed=seed + i, rule=rule)
                row.update(choice)
            if init == "random":
                sigma, U, V = random_soka_factors(row["r"], shape, seed=seed + i)
                row["energy_kept"] = 0.0                      # σ = 0: the factors hold nothing yet
            layer = SoKALinear(W, sigma, U, V, subtract=init == "kpsvd", impl=impl)
        elif method == "pissa":
            A, B, row["energy_kept"] = pissa_factors(W, rank, randomized=randomized, seed=seed + i)
            layer = PiSSALinear(W, A, B)
        else:
            A, B = lora_factors(*W.shape, rank, seed=seed + i)
            layer = LoRALinear(W, A, B, scale=(rank if alpha is None else alpha) / rank)
        rows.append(_finish(model, name, layer, row, W, options))
    return _report(method, options, rows, verbose)


def compress(model, updates, *, rank=None, tau=TAU, r_min=R_MIN, r_max=R_MAX, factors=None, randomized=None,
             seed=0, impl="auto", verbose=True):
    """SoKA adapters from given weight updates (docs/method.md, "Compress"): the KPSVD of ΔW gives the factors
    and W_res = W_base, so the model starts at W_base + (ΔW's top-r Kronecker part).

    updates: {module name ("layers.0.attention.wq", ".weight" allowed): ΔW (d_out, d_in), or a LoRA
    pair (B, A) with ΔW = B A (fold LoRA's α/r into B)}. A fine-tuned checkpoint gives
    {k: tuned[k] - base[k] for k in targeted keys}. Rank and factor options as in inject."""
    check_impl(impl)
    check_rule(tau, r_min, r_max)
    options = dict(method="soka", targets=sorted(updates), rank=rank, tau=tau, r_min=r_min, r_max=r_max,
                   init="compress", alpha=None, factors=factors, randomized=randomized, seed=seed)
    named = dict(model.named_modules())
    jobs = []
    for key, upd in updates.items():
        name = key.removesuffix(".weight")
        if name in (job[0] for job in jobs):
            raise ValueError(f"adapters.py: compress: two updates for {name} (keys with and without .weight)")
        lin = named.get(name)
        if isinstance(lin, AdapterLinear):
            raise ValueError(f"adapters.py: {name} already has an adapter; start from a freshly loaded base")
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"adapters.py: compress: {name!r} is not an nn.Linear of this model")
        dW = upd[0].float() @ upd[1].float() if isinstance(upd, (tuple, list)) else upd
        if tuple(dW.shape) != tuple(lin.weight.shape):
            raise ValueError(f"adapters.py: compress: update for {name} is {tuple(dW.shape)}, "
                             f"the weight is {tuple(lin.weight.shape)}")
        jobs.append((name, lin, dW.to(lin.weight.device)))
    _check_factor_shapes(factors, [name.rsplit(".", 1)[-1] for name, _, _ in jobs])
    _freeze(model)
    rows = []
    for i, (name, lin, dW) in enumerate(jobs):
        W = lin.weight.detach()
        shape = _shape_for(name, W, factors)
        sigma, U, V, choice = soka_factors(dW, shape, rank=rank, tau=tau, r_min=r_min, r_max=r_max,
                                           randomized=randomized, seed=seed + i)
        row = dict(name=name, shape=list(W.shape), factors=list(shape), **choice)
        rows.append(_finish(model, name, SoKALinear(W, sigma, U, V, subtract=False, impl=impl), row, W,
                                    options))
    return _report("soka", options, rows, verbose)


def _finish(model, name, layer, row, W, options):
    r = row["r"]
    row.update(trainable=layer.trainable(), lora_trainable=r * (W.shape[0] + W.shape[1]))
    layer.info = dict(row, base=fingerprint(W), options=options)
    _place(model, name, layer)
    return row


def _report(method, options, rows, verbose):
    totals = dict(layers=len(rows), trainable=sum(r["trainable"] for r in rows),
                  lora_trainable=sum(r["lora_trainable"] for r in rows))
    report = dict(method=method, options=options, layers=rows, totals=totals)
    if verbose:
        print(format_report(report))
    return report


def format_report(report):
    """The per-layer table: what each layer got and why, and what LoRA/PiSSA would train instead."""
    def f(v, fmt="{}"):
        return "-" if v is None else fmt.format(v)
    lines = [f"{'layer':<28} {'shape':>11} {'(m, n, p, q)':>17} {'r_energy':>8} {'r_elbow':>7} {'r':>3} "
             f"{'energy kept':>11} {'trainable':>10}"]
    for row in report["layers"]:
        fac = "-" if row["factors"] is None else "(" + ", ".join(map(str, row["factors"])) + ")"
        lines.append(f"{row['name']:<28} {'×'.join(map(str, row['shape'])):>11} {fac:>17} "
                     f"{f(row['r_energy']):>8} {f(row['r_elbow']):>7} {row['r']:>3} "
                     f"{f(row['energy_kept'], '{:.4f}'):>11} {row['trainable']:>10,}")
    t = report["totals"]
    lines.append(f"{report['method']}: {t['layers']} layers, {t['trainable']:,} trainable parameters; "
                 f"LoRA/PiSSA at the same ranks would train {t['lora_trainable']:,} "
                 f"({t['trainable'] / max(t['lora_trainable'], 1):.3f}×)")
    return "\n".join(lines)


def format_summary(report):
    """A few lines for the screen: per target, its layers' ranks and trainable parameters; then the
    totals line of format_report (whose per-layer table a run writes to ranks.txt)."""
    by_target = {}
    for row in report["layers"]:
        by_target.setdefault(row["name"].rsplit(".", 1)[-1], []).append(row)
    lines = [f"{t}: {len(rows)} layers, rank {min(r['r'] for r in rows)}-{max(r['r'] for r in rows)} "
             f"(mean {sum(r['r'] for r in rows) / len(rows):.2f}), {sum(r['trainable'] for r in rows):,} trainable"
             for t, rows in by_target.items()]
    return "\n".join(lines + format_report(report).splitlines()[-1:])


# -----------------------------------------------------------------------------
# the adapter file

def _record(layer):
    rec = dict(method=layer.method, info=_plain(layer.info), subtract=layer.subtract,
               params={k: getattr(layer, k).detach().cpu().clone() for k in layer.factor_names})
    if layer.method != "soka":
        rec["scale"] = layer.scale
    if layer.subtract:   # W_res = W_base − init(...): the initial factors rebuild it exactly
        rec["init"] = {k: getattr(layer, k + "0").detach().cpu().clone() for k in layer.factor_names}
    return rec


def _plain(v):
    """Report rows as torch.load(weights_only=True) accepts them: dict, list, str, int, float, None."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def save_adapter(model, path):
    """Write the adapter layers to `path`: a torch file of plain types (loads with weights_only=True),
    whole or not at all (soka/files.py). Its size is the trainable parameters, twice
    for a KPSVD or PiSSA init (the initial factors), plus a small header."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("adapters.py: the model has no adapter layers to save")
    blob = dict(format=FORMAT, version=VERSION, method=layers[0][1].method,
                options=_plain(layers[0][1].info.get("options", {})),
                layers={name: _record(layer) for name, layer in layers})
    replace_files({path: lambda p: torch.save(blob, p)})


# W_res = W − the initial update (subtract=True) or W: PiSSA always subtracts, LoRA never, SoKA for a
# KPSVD init only. A flipped flag in a file would rebuild the wrong W_res.
SUBTRACT = {"soka": (True, False), "lora": (False,), "pissa": (True,)}


def _check_record(path, name, rec, weight):
    """A layer's record holds what load_adapter reads, with the shapes its report row and the base
    weight imply: copy_ would broadcast a (r, 1, n) U into (r, m, n) without a word."""
    def corrupt(what):
        return ValueError(f"{path}: corrupt adapter file: {name} {what}")
    if not isinstance(rec, dict) or not isinstance(rec.get("info"), dict):
        raise corrupt("lacks its 'info' (the report row)")
    method = rec.get("method")
    if method not in ("soka", "lora", "pissa"):
        raise corrupt(f"has method {method!r}")
    needed = [("params", rec), ("subtract", rec), ("base", rec["info"]), ("r", rec["info"])]
    needed += [("init", rec)] if rec.get("subtract") else []
    needed += [("factors", rec["info"])] if method == "soka" else [("scale", rec)]
    for key, where in needed:
        if key not in where:
            raise corrupt(f"lacks the key {key!r}")
    if type(rec["subtract"]) is not bool or rec["subtract"] not in SUBTRACT[method]:
        raise corrupt(f"has subtract = {rec['subtract']!r}, which a {method} layer cannot have")
    if method != "soka" and not (type(rec["scale"]) in (int, float) and math.isfinite(rec["scale"])
                                 and rec["scale"] > 0):
        raise corrupt(f"has scale = {rec['scale']!r}, not a positive number")
    base = rec["info"]["base"]
    if not isinstance(base, dict) or not {"shape", "dtype", "sha256"} <= base.keys():
        raise corrupt("has no base-weight fingerprint {shape, dtype, sha256}")
    r, (d_out, d_in) = rec["info"]["r"], weight.shape
    if method == "soka":
        factors = rec["info"]["factors"]
        if not (isinstance(factors, (list, tuple)) and len(factors) == 4
                and all(type(f) is int and f > 0 for f in factors)):
            raise corrupt(f"has factors {factors!r}, not four positive integers (m, n, p, q)")
        m, n, p, q = factors
        if (m * p, n * q) != (d_out, d_in):
            raise corrupt(f"has factors (m, n, p, q) = {(m, n, p, q)}, which do not split its {d_out}×{d_in} weight")
        want, r_max = {"sigma": (r,), "U": (r, m, n), "V": (r, p, q)}, min(m * n, p * q)
    else:
        want, r_max = {"A": (r, d_in), "B": (d_out, r)}, min(d_out, d_in)
    if type(r) is not int or not 1 <= r <= r_max:       # the rank of a real update, so the factors stay small
        raise corrupt(f"has rank {r!r}, outside 1 .. {r_max}")
    for group in ("params", "init") if rec["subtract"] else ("params",):
        tensors = rec[group]
        if not isinstance(tensors, dict) or set(tensors) != set(want):
            raise corrupt(f"{group} should hold the tensors {sorted(want)}")
        for k, shape in want.items():
            got = tuple(tensors[k].shape) if isinstance(tensors[k], torch.Tensor) else tensors[k]
            if got != shape:
                raise corrupt(f"{group} {k} has shape {got}, expected {shape} (r = {r})")
            check_stored(tensors[k], f"{path}: corrupt adapter file", f"{name} {group} {k}")


def read_adapter(path):
    """An adapter file's contents (torch.load with weights_only=True: no code runs), its header checked;
    each layer's record is checked against the model by _check_record."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable adapter file ({first_line(e)})") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    if blob.get("version") != VERSION:
        raise ValueError(f"{path}: adapter file version {blob.get('version')}, this code reads {VERSION}")
    for key, kind in (("method", str), ("options", dict), ("layers", dict)):
        if not isinstance(blob.get(key), kind):
            raise ValueError(f"{path}: corrupt adapter file: {key!r} should be a {kind.__name__}, got "
                             f"{type(blob.get(key)).__name__}")
    return blob


def load_adapter(model, path, *, impl="auto"):
    """Rebuild the fine-tuned model from a base model as loaded from its checkpoint (no adapters):
    check each targeted weight's fingerprint, re-create W_res from the stored initial factors (no
    SVD), set the trained factors, freeze the rest. Returns the saved report. impl as in inject."""
    check_impl(impl)
    blob = read_adapter(path)
    named = dict(model.named_modules())
    for name, rec in blob["layers"].items():   # check everything before changing the model
        mod = named.get(name)
        if isinstance(mod, AdapterLinear):
            raise ValueError(f"{path}: {name} already has an adapter; load into a freshly loaded base model")
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"{path}: the model has no linear layer {name}")
        _check_record(path, name, rec, mod.weight)
        want, got = rec["info"]["base"], fingerprint(mod.weight)
        for k in ("shape", "dtype", "sha256"):
            if want[k] != got[k]:
                raise ValueError(f"{path}: base weight {name} differs from the one this adapter was made "
                                 f"from ({k}: file {want[k]}, model {got[k]}); load the original base checkpoint")
    _freeze(model)
    rows = []
    for name, rec in blob["layers"].items():
        W = named[name].weight.detach()
        start = {k: t.to(W.device) for k, t in (rec["init"] if rec["subtract"] else rec["params"]).items()}
        if rec["method"] == "soka":
            layer = SoKALinear(W, start["sigma"], start["U"], start["V"], subtract=rec["subtract"], impl=impl)
        elif rec["method"] == "pissa":
            layer = PiSSALinear(W, start["A"], start["B"])
        else:
            layer = LoRALinear(W, start["A"], start["B"], scale=rec["scale"])
        with torch.no_grad():
            for k, t in rec["params"].items():
                getattr(layer, k).copy_(t)
        layer.info = rec["info"]
        _place(model, name, layer)
        rows.append({k: v for k, v in rec["info"].items() if k not in ("base", "options")})
    return _report(blob["method"], blob["options"], rows, verbose=False)
