"""One training step of a LLaMA-2-7B-shaped model: tokens/s, peak memory and achieved TFLOP/s, per config.

    python benchmarks/train_step.py                     # every config: 7B shape, bf16, batch 4 × 1024 tokens
    python benchmarks/train_step.py --configs ours_frozen,soka_r1,soka_r4,soka_r8,hf_frozen
    python benchmarks/train_step.py --configs hf_frozen,ours_frozen+compile,soka_r8+compile --rounds 3
    python benchmarks/train_step.py --configs ours_frozen,soka_r8@fused,soka_r8@reference   # the two SoKA paths
    python benchmarks/train_step.py --report benchmarks/results/train_step_7b.json     # reprint a saved run
    python benchmarks/train_step.py --layers 2 --dim 64 --heads 4 --ffn 128 --vocab 256 --batch 2 \\
        --seq 32 --steps 2 --warmup 1 --out /tmp/train_step.json                      # CPU logic check

Configs (CONFIGS): ours_frozen, soka_r1, soka_r4, soka_r8, soka_attn_r8, lora_r16, pissa_r16 on
model.py's Transformer; hf_frozen, peft_lora_r16, peft_lokr_r8 on transformers' LlamaForCausalLM
(skipped when transformers / peft do not import). A SoKA config may name its path, `soka_r8@fused` or
`soka_r8@reference` (adapters.IMPLS; plain `soka_r8` is "auto": fused on a GPU with triton). Options
after '+': ours `+compile` (Transformer.compile_pointwise and a compiled ce_chunk, as train.py
--compile), `+ckpt` (checkpointing), `+glu` (recompute_swiglu); HF's `+noamp` (no autocast). Each
config is built, timed and freed before the next, and every ratio is taken within one run. Prints a
table with the ceilings and writes JSON (default benchmarks/results/train_step.json); `--report JSON`
prints a saved run again. docs/performance.md describes the setup, the FLOP model, LEAST and the ceilings.
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
from kpsvd import factor_shape                                  # noqa: E402
from model import ModelArgs, Transformer                        # noqa: E402
from soka import adapters                                       # noqa: E402
from soka.steps import CE_CHUNK, GraphedStep, ce_chunk, eager_step   # noqa: E402

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


# config suffixes. Our model: +compile (Transformer.compile_pointwise and a compiled ce_chunk, as
# train.py --compile), +ckpt (checkpointing), +glu (recompute_swiglu). HF: +noamp (no autocast:
# PEFT's own precision, the bf16 base with float32 adapter weights as get_peft_model makes them, so
# PEFT runs the adapter's GEMMs, and LoKr forms and applies its ΔW, in float32)
OPTIONS = {"ours": ("compile", "ckpt", "glu"), "hf": ("noamp",)}


def split_config(name):
    """'soka_r8@reference+ckpt' -> ('soka_r8', 'reference', {'ckpt'}), checking nothing (a saved run
    may name an implementation this code does not have)."""
    head, *opts = name.split("+")
    base, _, impl = head.partition("@")
    return base, impl or None, set(opts)


def parse_config(name):
    """split_config, checked: a known config, the implementation only for SoKA configs and one of
    adapters.IMPLS, the options those of the config's model (OPTIONS)."""
    base, impl, opts = split_config(name)
    if base not in CONFIGS:
        raise ValueError(f"train_step.py: unknown config {name!r}; known: {', '.join(CONFIGS)}")
    impls = adapters.IMPLS
    if impl and (CONFIGS[base][1] != "soka" or impl not in impls):
        raise ValueError(f"train_step.py: {name!r}: '@impl' needs a SoKA config and one of {impls}")
    allowed = OPTIONS[CONFIGS[base][0]]
    if any(o not in allowed for o in opts):
        raise ValueError(f"train_step.py: {name!r}: this model's options are {allowed}")
    return base, impl, opts


# ----------------------------------------------------------------------------- FLOP model

def adapter_macs(method, d_out, d_in, r, *, impl, tokens, dx):
    """The adapter's own multiply-adds per token, forward + backward (docs/adapters.md), without the
    input-gradient part when dx is False. SoKA's impl: "fused", "reference", or "least" (LEAST,
    docs/performance.md: a schedule no implementation runs, for the ceilings)."""
    if method == "soka":
        m, n, p, q = factor_shape(d_out, d_in)
        if impl == "fused":     # 8 small products per token and term, 2 of them for dx (kron_fused.py)
            return 2 * r * (n * p * q + m * n * p + m * p * q + m * n * q) - (0 if dx else r * (m * n * p + n * p * q))
        if impl == "reference":  # autograd through kpsvd.kron_apply: Z = X Vᵀ, Y = Us Z, and each one's two
            return r * n * p * (3 * (q + m) - (0 if dx else q))   # gradients (dX of Z only when dx)
        if impl == "least":     # the cheapest schedule of small products we know
            a, b = m * q * (n + p), n * p * (q + m)             # the forward's chain, U X first / X Vᵀ first
            return r * (min(3 * a, 3 * b) if dx else min(2 * a + m * p * q, 2 * b + m * n * p))
        raise ValueError(f"train_step.py: no FLOP model for SoKA impl {impl!r}")
    if method in ("lora", "pissa"):
        return 3 * r * (d_in + d_out) - (0 if dx else r * d_in)
    if method == "lokr":        # y += x ΔWᵀ: a second dense GEMM, its dx and its weight gradient
        return (3 if dx else 2) * d_out * d_in
    raise ValueError(f"train_step.py: no FLOP model for {method!r}")


def flops_per_token(a, seq, *, method=None, rank=None, targets=(), impl="reference", tokens=1, causal=True,
                    head_rows=1.0):
    """Model FLOPs per token of one forward + backward (docs/performance.md): the linear layers' forward
    and dx, causal attention 3 × its forward, the output head's forward and dx on `head_rows` of the
    tokens, and each adapter's own (adapter_macs); no dx where a layer's input needs no gradient."""
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
    # the output head, forward and dx, on the rows that get logits: HF all T, ours T - 1 (soka.steps.loss_sum)
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
    model = (build_ours if kind == "ours" else build_hf)(a, device=device, dtype=dtype)
    ce = None
    if kind == "ours":
        model.compile_pointwise("compile" in opts)         # compiled norms / rotary / SwiGLU, or eager
        ce = torch.compile(ce_chunk) if "compile" in opts else None   # and the loss's softmax
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
        extra = dict(randomized=True) if method in ("soka", "pissa") else {}
        if method == "soka":
            extra["impl"] = impl or "auto"
        adapters.inject(model, method, targets, rank=rank, verbose=False, **extra)
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
    if method == "soka":                        # what SoKALinear runs on this model's activations
        probe = torch.empty(0, device=device, dtype=dtype)
        impl = "fused" if adapters.uses_fused(adapters.adapter_layers(model)[0][1].impl, probe) else "reference"
    opt = torch.optim.AdamW(trainable, lr=1e-5, fused=cuda) if trainable else None
    if kind == "ours":
        for p in trainable:                     # allocated once, as train.py does: graphs write into them
            p.grad = torch.zeros_like(p)
        if graphed:
            # GraphedStep takes its device from params[0] and restores their gradients after capture;
            # the floor has none, so it gets a one-element stand-in that nothing reads.
            anchor = [torch.zeros(1, device=device, requires_grad=True)]
            anchor[0].grad = torch.zeros_like(anchor[0])
            step = GraphedStep(model, trainable or anchor, amp=amp, pad_id=0, ce=ce)
        else:
            step = eager_step(model, amp, ce=ce)
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
    kind, method, rank, targets = CONFIGS[split_config(row["config"])[0]]
    return flops_per_token(a, seq, method=method, rank=rank, targets=targets, impl=impl, tokens=tokens,
                           head_rows=1.0 if kind == "hf" or not CE_CHUNK else (seq - 1) / seq)


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
    opts = split_config(name)[2]
    floors = [(split_config(k)[2], r) for k, r in by.items() if split_config(k)[0] == "ours_frozen"]
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
    """The ceilings (docs/performance.md) for each ok SoKA row that has its floor and HF's in the same
    list: the step if the floor of the same options ran as measured and LEAST's added FLOPs ran after
    it at the GEMM rate, nothing else costing anything; and the GEMM rate (% of the measured one) at
    which the added FLOPs, the implementation's own and LEAST's, would have to run, all else free, to
    reach `target` × HF's floor (over 100 %: out of reach)."""
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
        if (r["status"] == "ok" and r["method"] == "soka" and "flops_per_token_least" not in r
                and split_config(r["config"])[0] in CONFIGS):
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
                    help="the tokens/s asked of SoKA, × HF's floor, for the ceilings table")
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
                our_forward_backward="CUDA graph (soka.steps.GraphedStep)" if graphed else "eager",
                hf_forward_backward="eager, autocast bf16" if cuda else "eager",
                soka_default_impl="auto", optimizer="AdamW fused" if cuda else "AdamW",
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
