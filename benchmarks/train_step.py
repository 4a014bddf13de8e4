"""One training step of a LLaMA-2-7B-shaped model: tokens/s, peak memory and achieved TFLOP/s, per method.

    python benchmarks/train_step.py                     # the H100 run: 7B shape, bf16, 4 × 1024 tokens, all configs
    python benchmarks/train_step.py --configs ours_frozen,soka_r8,soka_r8@dense,hf_frozen   # a subset
    python benchmarks/train_step.py --layers 2 --dim 64 --heads 4 --ffn 128 --vocab 256 --batch 2 \\
        --seq 32 --steps 2 --warmup 1 --out /tmp/train_step.json                      # CPU logic check

Every ratio comes from one run (one process, one GPU, one torch). Each config is built on its own,
measured, and freed (del, gc, empty_cache) before the next. The GPU's own speed drifts within a run
(the start and end GEMM rates differ by up to 2.5 %) and between machines, so `--rounds 3` runs the
list three times in turn: each config's row is its median round, and a second table gives × HF
floor in every round, each against the same round's hf_frozen. The configs:
    ours_frozen      model.py's Transformer, nothing trainable, backward to the embedding output
                     only (a hook makes it require grad): the floor every adapter adds to
    soka_r1/_r4/_r8  + SoKA on wq wk wv wo w1 w2 w3, inject(rank=r, randomized=True)
    soka_attn_r8     + SoKA on wq wk wv wo, r = 8
    lora_r16         + LoRA r = 16 on all seven
    pissa_r16        + PiSSA r = 16 on all seven (randomized SVD init)
    hf_frozen        transformers' LlamaForCausalLM, same shape, SDPA, backward to inputs_embeds only
    peft_lora_r16    + PEFT LoRA r = 16 on q k v o gate up down
    peft_lokr_r8     + PEFT LoKr r = 8 on the same (forms the dense update: ~72 GiB; 'OOM' if it fails)
A SoKA config may name an implementation, `soka_r8@dense` (adapters.IMPLS); plain `soka_r8` uses
adapters' default ($SOKA_IMPL, else "auto": "fused" on a GPU with triton, else "kron_v2"). HF configs are skipped when transformers/peft do not import.
Our model's configs take options after '+': `+compile` runs model.compile_pointwise() and
train.compile_loss() (norms, residual adds, rotary, SwiGLU and the loss's softmax as compiled
kernels; off again for configs without it), `+ckpt` sets
model.checkpointing (each block recomputed in backward), `+glu` model.recompute_swiglu (each SwiGLU
output recomputed in backward, not kept for w2's adapter). `ours_frozen+compile,soka_r8+ckpt`. HF's
configs take `+noamp`: no autocast, PEFT's own precision (its adapter weights float32, so its LoKr
forms and applies ΔW in float32), as ../shared/GPU.md measured PEFT: `peft_lokr_r8+noamp`.
With +ckpt the FLOP model still counts one forward: % GEMM is useful work, not work done.

Setup. Weights: random, built on the meta device and materialized on the target device with to_empty
(never a CPU copy), N(0, 0.02) for matrices and 1 for norms; bfloat16 on CUDA, float32 on CPU. Batch:
random ids, labels = ids. Our model: train.py's loss_sum under train.py's autocast, forward + backward
replayed as one CUDA graph by train.py's GraphedStep (--eager: plain autograd). HF: eager, autocast
bf16, loss from `labels=` (use_cache off). One fused AdamW step per iteration on the trainable
parameters (the frozen floors have none, so no optimizer). Time: synchronize + perf_counter around
each iteration, median of --steps after --warmup (the first warmup step holds graph capture).
Memory: torch.cuda.max_memory_allocated from just before the first step (so CUDA graph capture and
the optimizer state are in it) to the end, in GiB.

FLOPs per token (flops_per_token; multiply-add = 2 FLOPs): forward 2·(linear weights) + causal
attention 2·2·d·(T+1)/2 per layer; backward to the input the same for the linear layers and twice
the forward for attention (dQ, dK, dV, dP: the usual 3× of forward, as in 12·L·d·T); no weight
gradients for the frozen base; plus each adapter's own, docs/adapters.md's per-layer model:
SoKA kron / kron_v2 r·n·p·(4q + 3m) multiply-adds, fused 2·r·(npq + mnp + mpq + mnq), dense d_out·d_in + 4·r·d_out·d_in / tokens,
LoRA / PiSSA 3·r·(d_in + d_out), PEFT LoKr 3·d_out·d_in (its second dense GEMM, its dx and dW).
Where a layer's input needs no gradient (layer 0's wq wk wv in the adapter configs) its dx is not
counted, as autograd does not compute it. Achieved TFLOP/s = FLOPs per token × tokens/s; % GEMM
is that over the same run's bf16 GEMM rate (an --gemm-size³ matmul, measured at the start and at the
end; the higher counts).
LEAST (impl "least", no implementation runs it): the fewest multiply-adds we know for one SoKA term
and token among schedules of pairwise products that never form U ⊗ V. The forward's chain U (X Vᵀ)
or (U X) Vᵀ in its cheaper order (n·p·(q + m) or m·q·(n + p)), dx's chain in the order that leaves
the other intermediate (Usᵀ G, or G V), and each factor gradient one more product on the intermediate
it shares (dU = (G V) Xᵀ, dV = Gᵀ (U X); or dU = G (X Vᵀ)ᵀ, dV = (Usᵀ G)ᵀ X): 3 × the forward, keeping
r·m·q (or r·n·p) values per token and layer alive for backward, which no implementation here does
(the memory target). Forming the dense update is not such a schedule: issue 4 rules it out in training.
CEILINGS: for each SoKA row, the step if the floor of the same options ran as measured and LEAST's
added FLOPs ran after it at the run's GEMM rate, nothing else costing anything, against --target × HF's
floor; and the GEMM rate (% of the measured one) at which the adapter's FLOPs, the implementation's
own and LEAST's, would have to run, all else free, to reach the target (over 100 %: out of reach).
`--report JSON` prints a saved run's tables and ceilings again, measuring nothing.
Prints a table and writes JSON (default benchmarks/results/train_step.json).
"""
import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as model_py                                        # noqa: E402
from kpsvd import factor_shape                                  # noqa: E402
from model import ModelArgs, Transformer                        # noqa: E402
from soka import adapters                                       # noqa: E402
import train                                                   # noqa: E402

ALL7 = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
ATTN = ("wq", "wk", "wv", "wo")
HF_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
            "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
# name -> (model, method, rank, targets); method None = the frozen floor
CONFIGS = {
    "ours_frozen": ("ours", None, None, ()),
    "soka_r1": ("ours", "soka", 1, ALL7),
    "soka_r4": ("ours", "soka", 4, ALL7),
    "soka_r8": ("ours", "soka", 8, ALL7),
    "soka_attn_r8": ("ours", "soka", 8, ATTN),
    "lora_r16": ("ours", "lora", 16, ALL7),
    "pissa_r16": ("ours", "pissa", 16, ALL7),
    "hf_frozen": ("hf", None, None, ()),
    "peft_lora_r16": ("hf", "lora", 16, ALL7),
    "peft_lokr_r8": ("hf", "lokr", 8, ALL7),
}
GiB = 2**30


# config suffixes. Our model: +compile (model.compile_pointwise, train.compile_loss), +ckpt (checkpointing), +glu
# (recompute_swiglu). HF: +noamp
# (no autocast: PEFT's own precision, the bf16 base with float32 adapter weights as get_peft_model
# makes them, so PEFT runs the adapter's GEMMs in float32; how ../shared/GPU.md's PEFT rows were taken)
OPTIONS = {"ours": ("compile", "ckpt", "glu"), "hf": ("noamp",)}


def parse_config(name):
    """'soka_r8@dense+ckpt' -> ('soka_r8', 'dense', {'ckpt'}); the implementation only for SoKA
    configs, the options those of the config's model (OPTIONS)."""
    head, *opts = name.split("+")
    base, _, impl = head.partition("@")
    if base not in CONFIGS:
        raise ValueError(f"train_step.py: unknown config {name!r}; known: {', '.join(CONFIGS)}")
    impls = adapters.IMPLS
    if impl and (CONFIGS[base][1] != "soka" or impl not in impls):
        raise ValueError(f"train_step.py: {name!r}: '@impl' needs a SoKA config and one of {impls}")
    allowed = OPTIONS[CONFIGS[base][0]]
    if any(o not in allowed for o in opts):
        raise ValueError(f"train_step.py: {name!r}: this model's options are {allowed}")
    return base, impl or None, set(opts)


# ----------------------------------------------------------------------------- FLOP model

def adapter_macs(method, d_out, d_in, r, *, impl, tokens, dx):
    """The adapter's own multiply-adds per token, forward + backward (docs/adapters.md), without the
    input-gradient part when dx is False."""
    if method == "soka":
        m, n, p, q = factor_shape(d_out, d_in)
        if impl == "dense":     # dW = Gᵀ X per token; ΔW formed in forward (and backward for dx), 2 projections
            return d_out * d_in + (3 + dx) * r * d_out * d_in / tokens
        if impl == "fused":     # 8 small products per token and term, 2 of them for dx (kron_fused.py)
            return 2 * r * (n * p * q + m * n * p + m * p * q + m * n * q) - (0 if dx else r * (m * n * p + n * p * q))
        if impl == "least":     # the cheapest schedule of small products we know (LEAST in the docstring)
            a, b = m * q * (n + p), n * p * (q + m)             # the forward's chain, U X first / X Vᵀ first
            return r * (min(3 * a, 3 * b) if dx else min(2 * a + m * p * q, 2 * b + m * n * p))
        return r * n * p * ((4 if dx else 3) * q + 3 * m)           # kron, kron_v2
    if method in ("lora", "pissa"):
        return 3 * r * (d_in + d_out) - (0 if dx else r * d_in)
    if method == "lokr":        # y += x ΔWᵀ: a second dense GEMM, its dx and its weight gradient
        return (3 if dx else 2) * d_out * d_in
    raise ValueError(f"train_step.py: no FLOP model for {method!r}")


def flops_per_token(a, seq, *, method=None, rank=None, targets=(), impl="kron", tokens=1, causal=True,
                    head_rows=1.0):
    """Model FLOPs per token of one forward + backward (see the module docstring)."""
    ctx = (seq + 1) / 2 if causal else seq                    # mean keys per query
    attn_fwd = 2 * 2 * a.n_heads * a.head_dim * ctx           # Q Kᵀ and P V
    total = 0.0
    for layer in range(a.n_layers):
        total += 3 * attn_fwd
        for name, (d_out, d_in) in a.linear_shapes().items():
            # layer 0's q/k/v read the embedding output, which requires grad only in the frozen floor
            dx = method is None or layer > 0 or name not in ("wq", "wk", "wv")
            total += 2 * d_out * d_in * (1 + dx)
            if name in targets:
                total += 2 * adapter_macs(method, d_out, d_in, rank, impl=impl, tokens=tokens, dx=dx)
    # the output head, forward and dx, on the rows that get logits: HF all T, ours T - 1 (train.loss_sum)
    return total + 2 * 2 * a.vocab_size * a.dim * head_rows


# ----------------------------------------------------------------------------- models

def build_ours(a, *, device, dtype):
    """model.py's Transformer on the meta device, materialized on `device` (no CPU copy), random."""
    with torch.device("meta"):
        model = Transformer(a).to(dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)                        # RMSNorm weights
            else:
                p.normal_(0.0, 0.02)
    return model


def build_hf(a, *, device, dtype):
    """transformers' LlamaForCausalLM of the same shape, SDPA attention, built on `device` (HF's own init)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.ffn_dim,
                      num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
                      num_key_value_heads=a.n_kv_heads, max_position_embeddings=a.max_seq_len,
                      rms_norm_eps=a.norm_eps, tie_word_embeddings=False, use_cache=False)
    with torch.device(device):
        return LlamaForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="sdpa")


def require_input_grad(embedding):
    """The floor: make the embedding output a leaf that requires grad, so backward runs through every
    layer to the input (PEFT's enable_input_require_grads does the same)."""
    return embedding.register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))


def setup(name, a, *, device, dtype, graphed):
    """Build one config: dict(model, step (ids, labels, n_tok) -> loss, opt, trainable, timings, ...).
    step is one forward + backward of loss_sum / n_tok (HF: its own mean loss), no optimizer."""
    base, impl, opts = parse_config(name)
    kind, method, rank, targets = CONFIGS[base]
    cuda = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if cuda else nullcontext()
    t0 = time.perf_counter()
    model_py.compile_pointwise("compile" in opts)          # compiled norm / rotary / SwiGLU, or eager
    train.compile_loss("compile" in opts)                  # and the loss's softmax
    model = (build_ours if kind == "ours" else build_hf)(a, device=device, dtype=dtype)
    if kind == "ours":
        model.checkpointing = "ckpt" in opts
        model.recompute_swiglu = "glu" in opts
    model.train()
    sync(device)
    t1 = time.perf_counter()
    hook = None
    if method is None:
        for p in model.parameters():
            p.requires_grad_(False)
        hook = require_input_grad(model.tok_embeddings if kind == "ours" else model.get_input_embeddings())
    elif kind == "ours":
        opts = dict(randomized=True) if method in ("soka", "pissa") else {}
        adapters.inject(model, method, targets, rank=rank, verbose=False, **opts)
        if impl:
            for _, layer in adapters.adapter_layers(model):
                layer.impl = impl
    else:
        import peft
        hf_targets = [HF_NAMES[t] for t in targets]
        if method == "lora":
            pcfg = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=hf_targets)
        else:
            pcfg = peft.LoKrConfig(r=rank, alpha=rank, target_modules=hf_targets)
        model = peft.get_peft_model(model, pcfg)
    sync(device)
    t2 = time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if method == "soka":
        impl = impl or adapters.adapter_layers(model)[0][1].impl
        impl = adapters.resolve_impl(impl, cuda=cuda, dtype=dtype)    # what SoKALinear runs here
    opt = torch.optim.AdamW(trainable, lr=1e-5, fused=cuda) if trainable else None
    if kind == "ours":
        for p in trainable:                     # allocated once, as train.py does: graphs write into them
            p.grad = torch.zeros_like(p)
        if graphed:
            # GraphedStep takes its device from params[0] and restores their gradients after capture;
            # the floor has none, so it gets a one-element stand-in that nothing reads.
            anchor = [torch.zeros(1, device=device, requires_grad=True)]
            anchor[0].grad = torch.zeros_like(anchor[0])
            step = train.GraphedStep(model, trainable or anchor, amp=amp, pad_id=0)
        else:
            step = train.eager_step(model, amp)
    else:
        hf_amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and "noamp" not in opts else nullcontext()

        def step(ids, labels, n_tok):
            with hf_amp:
                loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            return loss
    return dict(model=model, step=step, opt=opt, hook=hook, kind=kind, method=method, rank=rank,
                targets=targets, impl=impl, n_trainable=sum(p.numel() for p in trainable),
                trainable_dtype=str(trainable[0].dtype).removeprefix("torch.") if trainable else None,
                build_s=t1 - t0, init_s=t2 - t1)


# ----------------------------------------------------------------------------- measuring

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_tflops(n, *, device, dtype, rounds=5, per_round=10):
    """Rate of an n×n×n matmul of random `dtype` matrices, TFLOP/s: the best of `rounds` rounds of
    `per_round` back-to-back matmuls between two synchronizations, after a warm-up round."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    y = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    best = math.inf
    for i in range(rounds + 1):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(per_round):
            x @ y
        sync(device)
        if i > 0:
            best = min(best, (time.perf_counter() - t0) / per_round)
    return 2 * n**3 / best / 1e12


def run_config(name, a, *, device, dtype, graphed, batch, seq, steps, warmup):
    """Build, warm up, time and measure one config; returns its result row. Frees nothing itself:
    everything it built dies with its frame."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    s = setup(name, a, device=device, dtype=dtype, graphed=graphed)
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, a.vocab_size, (batch, seq), device=device, generator=g)
    labels = ids.clone()
    n_tok = torch.tensor(float(batch * (seq - 1)), device=device)     # loss tokens: position i predicts i + 1
    if cuda:
        sync(device)
        init_peak = torch.cuda.max_memory_allocated(device) / GiB
        resident = torch.cuda.memory_allocated(device) / GiB
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        loss = s["step"](ids, labels, n_tok)
        if s["opt"] is not None:
            s["opt"].step()
            s["opt"].zero_grad(set_to_none=s["kind"] == "hf")   # ours: graphs hold the .grad tensors
        sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[warmup:])
    row = dict(config=name, status="ok", model=s["kind"], method=s["method"] or "frozen", rank=s["rank"],
               targets=list(s["targets"]), impl=s["impl"], trainable=s["n_trainable"],
               trainable_dtype=s["trainable_dtype"], build_s=s["build_s"], init_s=s["init_s"],
               first_step_s=times[0], step_s=step_s, step_s_all=times[warmup:],
               tokens_per_s=batch * seq / step_s, loss=float(loss.detach()))
    if cuda:
        row.update(resident_gib=resident, init_peak_gib=init_peak,
                   peak_gib=torch.cuda.max_memory_allocated(device) / GiB,
                   peak_reserved_gib=torch.cuda.max_memory_reserved(device) / GiB)
    if not math.isfinite(row["loss"]):
        row["status"] = f"non-finite loss {row['loss']}"
    return row


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def hf_available():
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
        return True
    except ImportError:
        return False


# ----------------------------------------------------------------------------- main

def row_flops(row, a, seq, tokens, impl):
    """flops_per_token of a measured row's config, its adapters counted as `impl` does them."""
    kind, method, rank, targets = CONFIGS[parse_config(row["config"])[0]]
    return flops_per_token(a, seq, method=method, rank=rank, targets=targets, impl=impl, tokens=tokens,
                           head_rows=1.0 if kind == "hf" or not train.CE_CHUNK else (seq - 1) / seq)


def measure(name, a, args, *, device, dtype, graphed, have_hf):
    """One config's row: its timings, or a status saying why there are none."""
    base, _, _ = parse_config(name)
    if CONFIGS[base][0] == "hf" and not have_hf:
        print(f"{name}: skipped (transformers / peft do not import)")
        return dict(config=name, status="skipped: transformers / peft not importable")
    try:
        row = run_config(name, a, device=device, dtype=dtype, graphed=graphed, batch=args.batch,
                         seq=args.seq, steps=args.steps, warmup=args.warmup)
    except torch.OutOfMemoryError:
        row = dict(config=name, status="OOM")
    except Exception as e:                  # one broken config must not lose the others' numbers
        traceback.print_exc()
        row = dict(config=name, status=f"error: {type(e).__name__}: {e}")
    free(device)
    if row["status"] == "ok":
        row["flops_per_token"] = row_flops(row, a, args.seq, args.batch * args.seq, row["impl"])
        if row["method"] == "soka":
            row["flops_per_token_least"] = row_flops(row, a, args.seq, args.batch * args.seq, "least")
    print(f"{name}: " + (f"{row['tokens_per_s']:,.0f} tokens/s, step {1e3 * row['step_s']:.1f} ms, "
                         f"first step {row['first_step_s']:.1f} s, init {row['init_s']:.1f} s, loss {row['loss']:.3f}"
                         + (f", peak {row['peak_gib']:.2f} GiB" if device.type == "cuda" else "")
                         if row["status"] == "ok" else row["status"]), flush=True)
    return row


def our_floor(name, by):
    """The row of our floor that `name` is compared with: ours_frozen with the same options, else with the
    same +compile setting (a compiled SoKA row against the compiled floor), else None."""
    opts = parse_config(name)[2]
    floors = [(parse_config(k)[2], r) for k, r in by.items() if parse_config(k)[0] == "ours_frozen"]
    same = [r for o, r in floors if o == opts] or [r for o, r in floors if ("compile" in o) == ("compile" in opts)]
    return same[0] if same else None


def add_ratios(rows, gemm_rate, *, cuda):
    """Each ok row against the floors of the same list: × HF's floor, × ours (speed, memory; our_floor),
    % of the GEMM rate."""
    by = {r["config"]: r for r in rows if r["status"] == "ok"}
    hf_floor = by.get("hf_frozen")
    for r in rows:
        if r["status"] != "ok":
            continue
        floor = our_floor(r["config"], by)
        r["x_hf_floor"] = r["tokens_per_s"] / hf_floor["tokens_per_s"] if hf_floor else None
        r["x_our_floor"] = r["tokens_per_s"] / floor["tokens_per_s"] if floor else None
        r["mem_x_our_floor"] = r["peak_gib"] / floor["peak_gib"] if floor and cuda else None
        r["tflops"] = r["flops_per_token"] * r["tokens_per_s"] / 1e12
        r["pct_gemm"] = 100 * r["tflops"] / gemm_rate


def add_ceilings(rows, gemm_rate, target):
    """CEILINGS (module docstring) for each ok SoKA row that has its floor and HF's in the same list."""
    by = {r["config"]: r for r in rows if r["status"] == "ok"}
    hf_floor, rate = by.get("hf_frozen"), gemm_rate * 1e12                    # FLOP/s
    for r in rows:
        floor = our_floor(r["config"], by) if r["status"] == "ok" and r["method"] == "soka" else None
        if floor is None or hf_floor is None:
            continue
        s_floor = 1 / floor["tokens_per_s"]                                      # seconds per token
        budget = 1 / (target * hf_floor["tokens_per_s"]) - s_floor               # what the target lets it add
        added = {k: r[f] - floor["flops_per_token"] for k, f in (("impl", "flops_per_token"),
                                                                 ("least", "flops_per_token_least"))}
        r["added_flops_per_token"] = added
        r["ceiling_tokens_per_s"] = 1 / (s_floor + added["least"] / rate)
        r["ceiling_x_hf_floor"] = r["ceiling_tokens_per_s"] / hf_floor["tokens_per_s"]
        r["target_needs_pct_gemm"] = {k: 100 * v / budget / rate if budget > 0 else math.inf
                                      for k, v in added.items()}


def median_round(runs):
    """One config's rounds -> the row of its median round by tokens/s (the lower middle for an even
    count), with every round's tokens/s and ratios (against that round's floors) under "rounds"."""
    ok = sorted((r for r in runs if r["status"] == "ok"), key=lambda r: r["tokens_per_s"])
    if len(ok) < len(runs):
        return next(r for r in runs if r["status"] != "ok")
    row = dict(ok[(len(ok) - 1) // 2])
    if len(runs) > 1:
        row["rounds"] = [{k: r[k] for k in ("tokens_per_s", "x_hf_floor", "x_our_floor", "peak_gib") if k in r}
                         for r in runs]
    return row


def print_tables(rows, *, gemm_n, gemm, target, rounds):
    """The results table, the ceilings (SoKA rows) and, with several rounds, × HF floor in each."""
    f = lambda v, fmt: "-" if v is None else fmt.format(v)   # noqa: E731
    print(f"\n{'config':<20} {'trainable':>11} {'init s':>7} {'tokens/s':>9} {'×HF floor':>9} {'×our floor':>10} "
          f"{'peak GiB':>8} {'×floor mem':>10} {'GFLOP/tok':>9} {'TFLOP/s':>8} {'% GEMM':>6}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['config']:<20} {r['status']}")
            continue
        print(f"{r['config']:<20} {r['trainable']:>11,} {r['init_s']:>7.1f} {r['tokens_per_s']:>9,.0f} "
              f"{f(r['x_hf_floor'], '{:.3f}'):>9} {f(r['x_our_floor'], '{:.3f}'):>10} "
              f"{f(r.get('peak_gib'), '{:.2f}'):>8} {f(r['mem_x_our_floor'], '{:.3f}'):>10} "
              f"{r['flops_per_token'] / 1e9:>9.4g} {r['tflops']:>8.4g} {r['pct_gemm']:>6.1f}")
    print(f"{gemm_n}³ GEMM: {gemm[0]:.4g} TFLOP/s at the start, {gemm[1]:.4g} at the end; % GEMM uses {max(gemm):.4g}")
    ceil = [r for r in rows if "ceiling_x_hf_floor" in r]
    if ceil:
        print(f"\nCeilings: the floor's step plus the adapter's FLOPs at the GEMM rate, nothing else; target "
              f"{target} × HF's floor. 'needs': the GEMM rate at which the added FLOPs must run, all else free")
        print(f"{'config':<20} {'GFLOP/tok added':>16} {'ceiling tok/s':>13} {'ceiling ×HF':>11} {'measured ×HF':>12} "
              f"{'needs % GEMM':>13}")
        pct = lambda v: "never" if math.isinf(v) else f"{v:.0f}"   # noqa: E731  (never: the floor alone misses)
        for r in ceil:
            added, need = r["added_flops_per_token"], r["target_needs_pct_gemm"]
            print(f"{r['config']:<20} {added['impl'] / 1e9:>7.3f} / {added['least'] / 1e9:>6.3f} "
                  f"{r['ceiling_tokens_per_s']:>13,.0f} {r['ceiling_x_hf_floor']:>11.3f} {r['x_hf_floor']:>12.3f} "
                  f"{pct(need['impl']):>6} / {pct(need['least']):>5}")
        print("(added GFLOP and needs: the implementation's schedule / LEAST's; over 100 % is out of reach)")
    if rounds > 1:
        print(f"\n× HF floor in each of the {rounds} rounds (against that round's hf_frozen); the table above "
              "takes each config's median round")
        for r in rows:
            if r["status"] == "ok" and r.get("rounds") and r["rounds"][0].get("x_hf_floor") is not None:
                x = [q["x_hf_floor"] for q in r["rounds"]]
                print(f"{r['config']:<20} " + " ".join(f"{v:.3f}" for v in x) + f"   min {min(x):.3f}  max {max(x):.3f}")


def report(path, target):
    """Print the tables of a saved run again, with the ceilings against `target` (LEAST's FLOPs counted
    from the saved shape where the run predates them). Returns its rows."""
    try:
        saved = json.loads(Path(path).read_text())
        info, rows = saved["config"], saved["results"]
        shape = info["shape"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"train_step.py: {path} is not a train_step.py results file ({type(e).__name__}: {e})")
    a = ModelArgs(dim=shape["dim"], n_layers=shape["layers"], n_heads=shape["heads"], n_kv_heads=shape["kv_heads"],
                  vocab_size=shape["vocab"], hidden_dim=shape["ffn"], max_seq_len=max(4096, info["seq"]))
    for r in rows:
        if r["status"] == "ok" and r["method"] == "soka" and "flops_per_token_least" not in r:
            r["flops_per_token_least"] = row_flops(r, a, info["seq"], info["tokens_per_step"], "least")
    add_ratios(rows, info["gemm_tflops_used"], cuda=all("peak_gib" in r for r in rows if r["status"] == "ok"))
    add_ceilings(rows, info["gemm_tflops_used"], target)
    print(f"{path}: {info['device']}, {', '.join(f'{k} {v}' for k, v in info['versions'].items())}, "
          f"batch {info['batch']} × {info['seq']}")
    print_tables(rows, gemm_n=info["gemm_n"], gemm=info["gemm_tflops"], target=target, rounds=info.get("rounds", 1))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated; soka configs take @impl")
    ap.add_argument("--steps", type=int, default=10, help="timed iterations")
    ap.add_argument("--warmup", type=int, default=3, help="untimed iterations first (graph capture, optimizer state)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the whole list this many times, in turn; each config's row is its median round")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=ModelArgs.n_layers)
    ap.add_argument("--dim", type=int, default=ModelArgs.dim)
    ap.add_argument("--heads", type=int, default=ModelArgs.n_heads)
    ap.add_argument("--ffn", type=int, default=None, help="FFN size (default: Meta's rule from dim, 11008 at 4096)")
    ap.add_argument("--vocab", type=int, default=ModelArgs.vocab_size)
    ap.add_argument("--eager", action="store_true", help="our model without CUDA graphs (HF is always eager)")
    ap.add_argument("--gemm-size", type=int, default=None, help="n of the n³ matmul (default 8192 on CUDA, 512 on CPU)")
    ap.add_argument("--target", type=float, default=1.2,
                    help="the tokens/s asked of SoKA, × HF's floor (issue 7), for the ceilings table")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "train_step.json"))
    ap.add_argument("--report", metavar="JSON", help="measure nothing: print a saved run's tables and ceilings")
    args = ap.parse_args(argv)
    if args.report:
        return report(args.report, args.target)
    if args.rounds < 1 or args.steps < 1:
        ap.error(f"--rounds and --steps must be at least 1, got {args.rounds} and {args.steps}")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    a = ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads, vocab_size=args.vocab,
                  hidden_dim=args.ffn, max_seq_len=max(4096, args.seq))
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    for n in names:
        parse_config(n)
    have_hf = hf_available()
    graphed = cuda and not args.eager
    tokens = args.batch * args.seq
    gemm_n = args.gemm_size or (8192 if cuda else 512)

    versions = dict(torch=torch.__version__)
    if have_hf:
        import peft
        import transformers
        versions.update(transformers=transformers.__version__, peft=peft.__version__)
    info = dict(device=torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
                versions=versions, dtype=str(dtype).removeprefix("torch."),
                shape=dict(layers=a.n_layers, dim=a.dim, heads=a.n_heads, kv_heads=a.n_kv_heads,
                           ffn=a.ffn_dim, vocab=a.vocab_size),
                batch=args.batch, seq=args.seq, tokens_per_step=tokens, steps=args.steps, warmup=args.warmup,
                our_forward_backward="CUDA graph (train.GraphedStep)" if graphed else "eager",
                hf_forward_backward="eager, autocast bf16" if cuda else "eager",
                soka_default_impl=adapters.IMPL, optimizer="AdamW fused" if cuda else "AdamW",
                timing="synchronize + perf_counter, median of steps after warmup")
    n_params = sum(d_out * d_in for d_out, d_in in a.linear_shapes().values()) * a.n_layers + 2 * a.vocab_size * a.dim
    print(f"device {info['device']}, {', '.join(f'{k} {v}' for k, v in versions.items())}, {info['dtype']}")
    print(f"model: {a.n_layers} layers, dim {a.dim}, {a.n_heads} heads, FFN {a.ffn_dim}, vocab {a.vocab_size}: "
          f"{n_params / 1e9:.3f} B parameters (norms aside); batch {args.batch} × {args.seq} = {tokens:,} tokens "
          f"per step; ours: {info['our_forward_backward']}; {args.warmup} warm-up + {args.steps} timed steps")

    gemm = [gemm_tflops(gemm_n, device=device, dtype=dtype)]
    print(f"{gemm_n}³ {info['dtype']} GEMM: {gemm[0]:.4g} TFLOP/s")
    rounds = []
    for k in range(args.rounds):
        if args.rounds > 1:
            print(f"-- round {k + 1} of {args.rounds}")
        rounds.append([measure(name, a, args, device=device, dtype=dtype, graphed=graphed, have_hf=have_hf)
                       for name in names])
    gemm.append(gemm_tflops(gemm_n, device=device, dtype=dtype))
    gemm_rate = max(gemm)
    for round_rows in rounds:
        add_ratios(round_rows, gemm_rate, cuda=cuda)
    rows = [median_round([rr[i] for rr in rounds]) for i in range(len(names))]
    add_ratios(rows, gemm_rate, cuda=cuda)
    add_ceilings(rows, gemm_rate, args.target)

    print_tables(rows, gemm_n=gemm_n, gemm=gemm, target=args.target, rounds=args.rounds)
    info.update(rounds=args.rounds, target_x_hf_floor=args.target, gemm_n=gemm_n, gemm_tflops=gemm,
                gemm_tflops_used=gemm_rate, params_linear_and_head=n_params)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(config=info, results=rows), indent=1) + "\n")
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
