"""Kronecker spectra, selected ranks and trainable-parameter counts: the reproduction study's first stage.

    python experiments/spectra.py                  # the SmolLM2 demo model, on the CPU:
                                                   # experiments/results/spectra.json + docs/img/repro_spectra*.png
    python experiments/spectra.py --ckpt PATH --out /tmp/s.json --img-dir /tmp   # any load_checkpoint input
                                                   # (LLaMA-2-7B: 27 GB of float32 and long exact SVDs)
    python experiments/spectra.py --plot-only      # redraw the PNGs from the JSON
    python experiments/spectra.py --quant-noise    # Q4_1 rounding noise against the spectra:
                                                   # experiments/results/quant_noise.json

For every targeted linear layer W (d_out, d_in) = (m·p, n·q) it takes the exact KPSVD spectrum
σ_1 ≥ … ≥ σ_K, K = min(m·n, p·q), in float32 (kpsvd.kpsvd, the same call inject makes), and at each
τ in TAUS the rank rule of rank_select.explain_rank: r = clip(min(r_energy, r_elbow), 1, 16). The
energy threshold uses E = Σ_k σ_k² of the full spectrum, as inject does (it equals ‖W‖_F² up to
float32 rounding; the JSON stores ‖W‖_F² in float64).

Trainable parameters (docs/method.md): SoKA Σ_layers r_ℓ·(m·n + p·q + 1); LoRA/PiSSA r·(d_in + d_out).
The paper sets LoRA/PiSSA about a third above SoKA ("25 % fewer"); we report the integer LoRA rank
closest to SoKA's count and to 4/3 of it. The same accounting for LLaMA-2-7B's shapes, where no
spectra are at hand, is a formula of the ranks (llama2_7b_accounting), checked against the
paper's 0.99 M / 1.33 M.

The JSON keeps per layer the top TOP_K singular values and ‖W‖_F², GRID log-spaced values past them
(with every cut the ranks depend on) and the cumulative energy there, the ranks at each τ, the
ordinary SVD's top-r energy (what PiSSA starts from, at nearly SoKA's parameters per rank), all to 6
significant digits, then the parameter totals; plot_spectra draws the figures from it alone.
"""
import argparse
import itertools
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kpsvd import factor_shape, kpsvd, rearrange  # noqa: E402
from model import ModelArgs, load_checkpoint  # noqa: E402
from rank_select import explain_rank  # noqa: E402
from soka.checkpoints import demo_checkpoint  # noqa: E402
from soka.gguf import meta_key, read_gguf  # noqa: E402

# The study's settings, in one place.
TAUS = (0.80, 0.90, 0.95, 0.99)                     # energy thresholds
R_MIN, R_MAX = 1, 16                                 # rank_select's clip
ATTENTION = ("wq", "wk", "wv", "wo")                 # inject's default targets
ALL_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
TARGET_SETS = {"attention": ATTENTION, "all": ALL_TARGETS}
LORA_RANKS = (1, 2, 4, 8, 16)                        # the uniform LoRA/PiSSA ranks shown beside SoKA
TOP_K = 64                                           # singular values kept per layer in the JSON
GRID = 16                                            # and this many log-spaced ones past them, for the plots
PAPER = {"soka": 0.99e6, "lora_pissa": 1.33e6}       # trainable parameters on LLaMA-2-7B, as the paper states
OUT = ROOT / "experiments" / "results" / "spectra.json"
QUANT_OUT = ROOT / "experiments" / "results" / "quant_noise.json"
Q4_1, Q4_1_BLOCK, Q4_1_BYTES = 3, 32, 20             # ggml type id; values and bytes per block
IMG_DIR = ROOT / "docs" / "img"


def sig6(x):
    return float(f"{x:.6g}")


def tau_key(tau):
    return f"{tau:g}"                                # 0.9 -> "0.9": the JSON's key for a threshold


# -----------------------------------------------------------------------------
# spectra and ranks

def layer_spectra(model, targets=ALL_TARGETS):
    """One dict per targeted nn.Linear, in module order: name, type (wq … w3), block, d_out, d_in,
    factors (m, n, p, q) by kpsvd.factor_shape, sigma (K,) the full float32 KPSVD spectrum,
    energy = ‖W‖_F² in float64, and svd_sigma, W's ordinary singular values (for comparison)."""
    out = []
    for name, mod in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind not in targets or not isinstance(mod, nn.Linear):
            continue
        W = mod.weight.detach().float()                              # (d_out, d_in)
        d_out, d_in = W.shape
        m, n, p, q = factor_shape(d_out, d_in)
        sigma, _, _ = kpsvd(W, m, n, p, q)                           # exact, all K = min(m·n, p·q) terms
        block = int(name.split("layers.")[1].split(".")[0]) if "layers." in name else -1
        out.append(dict(name=name, type=kind, block=block, d_out=d_out, d_in=d_in, factors=(m, n, p, q),
                        sigma=sigma, energy=float(W.double().square().sum()),
                        svd_sigma=torch.linalg.svdvals(W)))          # ordinary SVD: what PiSSA keeps
    if not out:
        raise ValueError(f"experiments/spectra.py: no nn.Linear named {tuple(targets)} in the model "
                         f"(Meta names: {' '.join(ALL_TARGETS)}); adapters already injected?")
    return out


def layer_ranks(sigma, taus=TAUS, *, r_min=R_MIN, r_max=R_MAX):
    """{tau key: {r, r_energy, r_elbow, energy_kept}} for one spectrum, clipped as inject clips:
    r_min and r_max never above K."""
    K = sigma.numel()
    out = {}
    for tau in taus:
        c = explain_rank(sigma, tau=tau, r_min=min(r_min, K), r_max=min(r_max, K))
        out[tau_key(tau)] = dict(r=c.r, r_energy=c.r_energy, r_elbow=c.r_elbow, energy_kept=c.energy_kept)
    return out


def soka_per_rank(d_out, d_in):
    """SoKA trainable parameters per Kronecker term: m·n + p·q + 1 (U_k, V_k, σ_k)."""
    m, n, p, q = factor_shape(d_out, d_in)
    return m * n + p * q + 1


def lokr_params(d_out, d_in, r):
    """PEFT LoKr (defaults): w1 (m, n) full, w2 = w2_a (p, r) · w2_b (r, q) when r < max(p, q)/2,
    else w2 (p, q) full. Its factorization splits 4096 and 11008 as factor_shape does."""
    m, n, p, q = factor_shape(d_out, d_in)
    return m * n + (r * (p + q) if r < max(p, q) / 2 else p * q)


def closest_rank(count, per_rank):
    """The integer rank ≥ 1 whose count r·per_rank is closest to `count` (ties: the smaller)."""
    lo = max(1, math.floor(count / per_rank))
    return min((lo, lo + 1), key=lambda r: (abs(r * per_rank - count), r))


def param_accounting(layers, taus=TAUS, target_sets=TARGET_SETS):
    """Per τ and target set: SoKA's trainable count at the selected ranks, LoRA/PiSSA at the same
    ranks (what inject reports as lora_trainable), LoRA at uniform ranks, and the LoRA ranks closest
    to SoKA's count and to 4/3 of it. `layers` are rows with type, d_out, d_in, ranks."""
    out = {}
    for tau in taus:
        k = tau_key(tau)
        out[k] = {}
        for set_name, types in target_sets.items():
            rows = [L for L in layers if L["type"] in types]
            rs = [L["ranks"][k]["r"] for L in rows]
            soka = sum(r * soka_per_rank(L["d_out"], L["d_in"]) for r, L in zip(rs, rows))
            lora_unit = sum(L["d_out"] + L["d_in"] for L in rows)   # LoRA parameters per unit rank
            out[k][set_name] = dict(
                layers=len(rows), rank_sum=sum(rs), mean_r=sum(rs) / max(len(rs), 1), soka=soka,
                lora_same_ranks=sum(r * (L["d_out"] + L["d_in"]) for r, L in zip(rs, rows)),
                lora_per_rank=lora_unit, lora={str(r): r * lora_unit for r in LORA_RANKS},
                lora_rank_closest=closest_rank(soka, lora_unit),
                lora_rank_closest_4_3=closest_rank(4 / 3 * soka, lora_unit),
                lora_rank_equivalent=soka / lora_unit)             # the fractional rank LoRA would need
    return out


# -----------------------------------------------------------------------------
# LLaMA-2-7B: the same accounting as a formula of the ranks

def min_per_rank(d_out, d_in):
    """The fewest SoKA parameters per term over every factor split d_out = m·p, d_in = n·q."""
    divs = lambda d: [k for k in range(1, d + 1) if d % k == 0]             # noqa: E731
    return min(m * n + (d_out // m) * (d_in // n) + 1 for m in divs(d_out) for n in divs(d_in))


def llama2_7b_accounting(args=None):
    """Per-rank counts of each linear of LLaMA-2-7B (ModelArgs() defaults: 32 blocks, 4096 / 11008,
    MHA), the per-block formulas, what uniform ranks give, and which settings reproduce the
    paper's 0.99 M (SoKA) and 1.33 M (LoRA/PiSSA)."""
    args = args or ModelArgs()
    shapes = args.linear_shapes()
    L = args.n_layers
    per = {t: dict(shape=list(s), factors=list(factor_shape(*s)), soka_per_rank=soka_per_rank(*s),
                   min_soka_per_rank=min_per_rank(*s), lora_per_rank=s[0] + s[1], lokr_r8=lokr_params(*s, 8))
           for t, s in shapes.items()}
    sets = {"qv": ("wq", "wv"), "attention": ATTENTION, "mlp": ("w1", "w2", "w3"), "all": ALL_TARGETS}
    counts = {"soka": lambda t, r: r * per[t]["soka_per_rank"], "lora_pissa": lambda t, r: r * per[t]["lora_per_rank"],
              "lokr": lambda t, r: lokr_params(*shapes[t], r)}
    total = lambda method, types, r: L * sum(counts[method](t, r) for t in types)   # noqa: E731
    uniform = {str(r): {f"{meth}_{s}": total(meth, types, r) for meth in counts for s, types in sets.items()}
               for r in range(1, R_MAX + 1)}
    # Every uniform setting (method, target set, r ≤ 64) that rounds to a claimed count in units of 0.01 M.
    matches = {claim: [dict(method=meth, targets=s, r=r, total=total(meth, types, r))
                       for meth, (s, types), r in itertools.product(counts, sets.items(), range(1, 65))
                       if round(total(meth, types, r) / 1e4) == round(value / 1e4)]
               for claim, value in PAPER.items()}
    att = per["wq"]["soka_per_rank"]
    formula = ("SoKA = Σ_blocks [{a}·(r_q + r_k + r_v + r_o) + {f1}·r_1 + {f2}·r_2 + {f3}·r_3];  "
               "LoRA/PiSSA = Σ_blocks [{la}·(r_q + r_k + r_v + r_o) + {lf}·(r_1 + r_2 + r_3)]").format(
        a=att, f1=per["w1"]["soka_per_rank"], f2=per["w2"]["soka_per_rank"], f3=per["w3"]["soka_per_rank"],
        la=per["wq"]["lora_per_rank"], lf=per["w1"]["lora_per_rank"])
    return dict(
        n_layers=L, per_type=per, formula=formula, uniform=uniform, paper=PAPER, paper_matches=matches,
        # Floors at r ≥ 1 everywhere: what no rank choice (and, with min_soka_per_rank, no factor split) undercuts.
        soka_attention_floor=L * sum(per[t]["soka_per_rank"] for t in ATTENTION),
        soka_attention_floor_any_split=L * sum(per[t]["min_soka_per_rank"] for t in ATTENTION),
        soka_all_floor=L * sum(per[t]["soka_per_rank"] for t in ALL_TARGETS),
        # Σ r over the 2·L wq/wv layers that lands SoKA on 0.99 M (±0.005 M), if ranks vary per layer.
        soka_qv_rank_sums_for_claim=[R for R in range(2 * L, 16 * 2 * L + 1)
                                     if round(R * att / 1e4) == round(PAPER["soka"] / 1e4)])


# -----------------------------------------------------------------------------
# the study

def _grid(K, must):
    """Indices past the top TOP_K that the JSON keeps: GRID log-spaced ones, K, and `must` (the cuts)."""
    ks = {round(TOP_K * (K / TOP_K) ** (i / (GRID - 1))) for i in range(GRID)} | {K} | set(must)
    return sorted(k for k in ks if TOP_K < k <= K)


def layer_record(s, taus=TAUS):
    """The JSON row of one layer_spectra entry: sigma_top (the first TOP_K values), a coarse view of
    the rest at grid_k (1-based; it holds every τ's r_energy - 1, r_energy, r_elbow and r_elbow + 1,
    so the ranks can be checked from the file) with the cumulative energy there, the ranks, and
    svd_energy[r-1], the ordinary SVD's top-r energy fraction for r = 1 … R_MAX (PiSSA's
    counterpart). Values to 6 significant digits."""
    sigma, K = s["sigma"], s["sigma"].numel()
    ranks = layer_ranks(sigma, taus)
    cum = torch.cumsum(sigma.double() ** 2, 0) / (sigma.double() ** 2).sum()     # (K,), as the ranks use
    cuts = [c for v in ranks.values() for c in (v["r_energy"] - 1, v["r_energy"], v["r_elbow"], v["r_elbow"] + 1)]
    grid = _grid(K, cuts)
    svd = torch.cumsum(s["svd_sigma"].double() ** 2, 0) / s["energy"]
    for v in ranks.values():
        v["energy_kept"] = sig6(v["energy_kept"])
    return dict(name=s["name"], type=s["type"], block=s["block"], d_out=s["d_out"], d_in=s["d_in"],
                factors=list(s["factors"]), kron_rank=K, energy=sig6(s["energy"]),
                sigma_top=[sig6(v) for v in sigma[:TOP_K].tolist()],
                grid_k=grid, sigma_grid=[sig6(float(sigma[k - 1])) for k in grid],
                energy_grid=[sig6(float(cum[k - 1])) for k in grid],
                ranks=ranks, svd_energy=[sig6(v) for v in svd[:R_MAX].tolist()])


def spectra_results(model, *, taus=TAUS, targets=ALL_TARGETS, source=None):
    """Everything the JSON holds, from a model: per-layer spectra and ranks (layer_record), the
    parameter totals, and the LLaMA-2-7B accounting."""
    t0 = time.time()
    layers = [layer_record(s, taus) for s in layer_spectra(model, targets)]
    sets = {k: v for k, v in TARGET_SETS.items() if set(v) <= set(targets)} or {"targets": tuple(targets)}
    return dict(source=source or {}, settings=dict(taus=list(taus), r_min=R_MIN, r_max=R_MAX, top_k=TOP_K,
                                                  targets=list(targets), lora_ranks=list(LORA_RANKS),
                                                  target_sets={k: list(v) for k, v in sets.items()}),
                model=dict(vars(model.args)), layers=layers, params=param_accounting(layers, taus, sets),
                llama2_7b=llama2_7b_accounting(), seconds=round(time.time() - t0, 1), torch=torch.__version__)


def dumps(res):
    """JSON with each list of numbers and each flat record on one line: readable, and compact."""
    text = json.dumps(res, indent=1, ensure_ascii=False)
    scalar = r'(?:-?[0-9.e+-]+|"[^"\[\]{}]*"|null|true|false)'
    flat_list = rf"\[\s*{scalar}(?:\s*,\s*{scalar})*\s*\]"
    flat_dict = rf'\{{\s*"[^"]*":\s*{scalar}(?:\s*,\s*"[^"]*":\s*{scalar})*\s*\}}'
    one_line = lambda m: json.dumps(json.loads(m.group(0)), ensure_ascii=False)   # noqa: E731
    return re.sub(flat_dict, one_line, re.sub(flat_list, one_line, text)) + "\n"


def format_table(res):
    """The printed summary: per τ and layer type the rank distributions, then the parameter totals."""
    lines = []
    for k, totals in res["params"].items():
        lines.append(f"\nτ = {k}   (r = clip(min(r_energy, r_elbow), {res['settings']['r_min']}, "
                     f"{res['settings']['r_max']}))")
        lines.append(f"{'type':<5}{'layers':>7}{'r mean':>8}{'min':>5}{'max':>5}  {'r_energy mean':>13}"
                     f"{'median':>7}{'min':>5}{'max':>5}  {'r_elbow=1':>9}{'elbow max':>10}  "
                     f"{'kept mean':>10}{'SVD kept':>10}")
        for t in dict.fromkeys(L["type"] for L in res["layers"]):
            rows = [L for L in res["layers"] if L["type"] == t]
            rk = [L["ranks"][k] for L in rows]
            r, re_, rb = ([x[f] for x in rk] for f in ("r", "r_energy", "r_elbow"))
            svd = sum(L["svd_energy"][x["r"] - 1] for L, x in zip(rows, rk)) / len(rows)
            lines.append(f"{t:<5}{len(rk):>7}{sum(r) / len(r):>8.2f}{min(r):>5}{max(r):>5}  "
                         f"{sum(re_) / len(re_):>13.1f}{sorted(re_)[len(re_) // 2]:>7}{min(re_):>5}{max(re_):>5}  "
                         f"{sum(b == 1 for b in rb):>5}/{len(rb):<3}{max(rb):>10}  "
                         f"{sum(x['energy_kept'] for x in rk) / len(rk):>10.4f}{svd:>10.4f}")
        rk = [L["ranks"][k] for L in res["layers"]]
        lines.append(f"  the elbow is the smaller candidate in {sum(x['r_elbow'] < x['r_energy'] for x in rk)}/{len(rk)} layers; "
                     f"clipped to r_max: {sum(min(x['r_elbow'], x['r_energy']) > x['r'] for x in rk)}. "
                     f"kept: Kronecker energy at r; SVD kept: the ordinary SVD's top-r energy (PiSSA's start)")
        for s, p in totals.items():
            lora = ", ".join(f"r={r}: {v:,}" for r, v in p["lora"].items())
            lines.append(f"  {s:<9} SoKA {p['soka']:>9,} (mean r {p['mean_r']:.2f}); LoRA/PiSSA at the same "
                         f"ranks {p['lora_same_ranks']:,}; LoRA {lora}")
            lines.append(f"  {'':<9} LoRA rank closest to SoKA: {p['lora_rank_closest']} (exact "
                         f"{p['lora_rank_equivalent']:.2f}); to 4/3·SoKA: {p['lora_rank_closest_4_3']}")
    b = res["llama2_7b"]
    lines.append("\nLLaMA-2-7B: " + b["formula"])
    for t, v in b["per_type"].items():
        lines.append(f"  {t} {v['shape'][0]}×{v['shape'][1]} factors {tuple(v['factors'])}: SoKA "
                     f"{v['soka_per_rank']:,}/rank (fewest over all splits {v['min_soka_per_rank']:,}), "
                     f"LoRA {v['lora_per_rank']:,}/rank, PEFT LoKr r=8 {v['lokr_r8']:,}")
    for r in ("1", "2", "4", "8", "16"):
        u = b["uniform"][r]
        lines.append(f"  uniform r={r:>2}: SoKA attention {u['soka_attention']:>10,} all {u['soka_all']:>11,} | "
                     f"LoRA attention {u['lora_pissa_attention']:>10,} all {u['lora_pissa_all']:>11,} | "
                     f"LoKr all {u['lokr_all']:>10,}")
    for claim, ms in b["paper_matches"].items():
        found = "; ".join(f"{m['method']} {m['targets']} r={m['r']} → {m['total']:,}" for m in ms) or "none"
        lines.append(f"  paper {claim} {b['paper'][claim] / 1e6:.2f} M, uniform settings that give it: {found}")
    lines.append(f"  SoKA floor at r ≥ 1 on wq wk wv wo: {b['soka_attention_floor']:,} "
                 f"(any factor split: {b['soka_attention_floor_any_split']:,}); all seven: {b['soka_all_floor']:,}")
    sums = b["soka_qv_rank_sums_for_claim"]
    if sums:
        lines.append(f"  SoKA on wq wv only reaches 0.99 M with Σ r = {', '.join(map(str, sums))} over their "
                     f"{2 * b['n_layers']} layers (mean r {sums[0] / (2 * b['n_layers']):.2f})")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# quantization noise: the demo model's attention and FFN weights are Q4_1

def q4_1_scales(gf, name):
    """The per-weight rounding step of a Q4_1 tensor, shaped like the weight: each block of 32 weights
    along a row is x = d·q + m with q ∈ {0, …, 15}, so its step is the block's fp16 d."""
    info = gf.tensor_info[name]
    if info.ggml_type != Q4_1:
        raise ValueError(f"{gf.path}: {name} is {info.type_name}, not Q4_1")
    raw = np.asarray(gf._map[info.offset:info.offset + info.nbytes]).reshape(-1, Q4_1_BYTES)
    d = raw[:, :2].copy().view("<f2").astype(np.float64).ravel()
    return np.repeat(d, Q4_1_BLOCK).reshape(info.shape)


def quant_noise(gguf_path, taus=(0.9,), seed=0):
    """For every attention / FFN tensor of a GGUF file: its type, the rounding step d per block, and
    one draw of rounding noise (each weight's error uniform on [−d/2, d/2], variance d²/12, as
    round-to-nearest on a grid of step d gives) rearranged as the weight's KPSVD rearranges it. The
    noise's largest Kronecker singular value σ₁(N) is set against the weight's σ_k at the rule's rank,
    at r_max = 16 and at k = 64, and its energy against the weight's. The elbow's gap σ_e − σ_{e+1} is
    set against the noise per weight (RMS): to first order a singular value moves by uᵀNv, whose
    spread is that RMS, so a gap many times larger keeps the elbow where it is."""
    gf = read_gguf(gguf_path)
    g = np.random.default_rng(seed)
    types, rows = {}, []
    for name, info in gf.tensor_info.items():
        key = meta_key(name)
        types[info.type_name] = types.get(info.type_name, 0) + 1
        kind = key.rsplit(".", 2)[-2] if key else None
        if kind not in ALL_TARGETS:
            continue
        W = torch.from_numpy(gf.tensor(name)).double()
        D = q4_1_scales(gf, name)
        N = torch.from_numpy((g.random(D.shape) - 0.5) * D)
        m, n, p, q = factor_shape(*W.shape)
        sw = torch.linalg.svdvals(rearrange(W, m, n, p, q))
        sn = torch.linalg.svdvals(rearrange(N, m, n, p, q))
        c = explain_rank(sw, tau=taus[0], r_min=R_MIN, r_max=min(R_MAX, sw.numel()))
        r, gap = c.r, float(sw[c.r_elbow - 1] - sw[c.r_elbow])
        std = math.sqrt(float((D ** 2).mean()) / 12)       # one weight's rounding error, root mean square
        rows.append(dict(name=key.removesuffix(".weight"), type=kind, gguf_type=info.type_name,
                         noise_std=sig6(std), elbow_gap=sig6(gap), gap_ratio=sig6(gap / std),
                         step_mean=sig6(float(D.mean())), noise_energy_share=sig6(float((D ** 2).sum() / 12 / W.square().sum())),
                         noise_sigma1=sig6(float(sn[0])), r=r, sigma_r=sig6(float(sw[r - 1])),
                         sigma_16=sig6(float(sw[15])), sigma_64=sig6(float(sw[63])),
                         ratio_r=sig6(float(sw[r - 1] / sn[0])), ratio_16=sig6(float(sw[15] / sn[0])),
                         ratio_64=sig6(float(sw[63] / sn[0]))))
    worst = {k: min(rows, key=lambda x: x[k]) for k in ("ratio_r", "ratio_16", "ratio_64", "gap_ratio")}
    return dict(source=dict(checkpoint=Path(gguf_path).name), tensor_types=types, seed=seed, tau=taus[0],
                layers=rows, min_ratio={k: dict(value=v[k], layer=v["name"]) for k, v in worst.items()},
                max_noise_energy_share=max(x["noise_energy_share"] for x in rows))


# -----------------------------------------------------------------------------
# plots

def _curve(L):
    """(k, σ_k, Σ_{i≤k} σ_i² / E) at the stored indices of one JSON layer: 1 … TOP_K, then grid_k."""
    ks = list(range(1, len(L["sigma_top"]) + 1)) + L["grid_k"]
    cum = list(itertools.accumulate(v * v / L["energy"] for v in L["sigma_top"])) + L["energy_grid"]
    return ks, L["sigma_top"] + L["sigma_grid"], cum


def plot_spectra(results_json, img_dir):
    """Three PNGs from a results file (path or loaded dict) into img_dir; returns their paths:
    repro_spectra.png (σ_k/σ_1 of each type at a few depths, r_energy per τ marked, the chosen r at
    τ = 0.9 starred), repro_spectra_ranks.png (r, r_energy, r_elbow per block at τ = 0.9) and
    repro_spectra_energy.png (cumulative energy of every layer, the τ lines, and the ordinary
    SVD's top-r energy that PiSSA starts from)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = results_json if isinstance(results_json, dict) else json.loads(Path(results_json).read_text())
    img_dir = Path(img_dir)
    img_dir.mkdir(parents=True, exist_ok=True)
    layers, taus = res["layers"], [tau_key(t) for t in res["settings"]["taus"]]
    k90 = tau_key(0.9) if tau_key(0.9) in taus else taus[len(taus) // 2]
    types = list(dict.fromkeys(L["type"] for L in layers))
    blocks = sorted({L["block"] for L in layers})
    depths = sorted({blocks[round(i * (len(blocks) - 1) / 3)] for i in range(4)})
    shade = lambda b: plt.cm.viridis(0.85 * (b - blocks[0]) / max(blocks[-1] - blocks[0], 1))   # noqa: E731
    markers = dict(zip(taus, "ovsD^<>p"))
    cols = min(4, len(types))
    nrows = math.ceil(len(types) / cols)
    paths = []

    def grid_of_axes():
        fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
        for ax in axes.flat[len(types):]:
            ax.axis("off")
        return fig, axes

    def title(ax, t):
        L0 = next(L for L in layers if L["type"] == t)
        ax.set_title(f"{t}  {L0['d_out']}×{L0['d_in']}  (m, n, p, q) = {tuple(L0['factors'])}", fontsize=9)
        ax.set_xlabel("k, Kronecker term (log scale)")
        ax.grid(alpha=0.3, which="both", lw=0.4)

    def save(fig, name):
        fig.tight_layout()
        paths.append(img_dir / name)
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)

    # 1. normalized spectra with the cuts
    fig, axes = grid_of_axes()
    for ax, t in zip(axes.flat, types):
        for L in (L for L in layers if L["type"] == t and L["block"] in depths):
            ks, sig, _ = _curve(L)
            at = dict(zip(ks, (v / sig[0] for v in sig)))
            ax.loglog(ks, list(at.values()), color=shade(L["block"]), lw=1.2)
            for k in taus:
                re_ = L["ranks"][k]["r_energy"]
                if re_ in at:
                    ax.plot(re_, at[re_], markers[k], color=shade(L["block"]), ms=5)
            r = L["ranks"][k90]["r"]
            ax.plot(r, at[r], "*", color="red", ms=10, mec="k", mew=0.5)
        title(ax, t)
    axes[0, 0].set_ylabel("σ_k / σ_1 (log scale)")
    handles = [plt.Line2D([], [], color=shade(d), label=f"block {d}") for d in depths]
    handles += [plt.Line2D([], [], ls="", marker=markers[k], color="gray", label=f"r_energy at τ = {k}") for k in taus]
    handles += [plt.Line2D([], [], ls="", marker="*", color="red", mec="k", ms=10, label=f"chosen r at τ = {k90}")]
    spare = len(types) % cols
    fig.legend(handles=handles, loc="lower right" if spare else "upper center", ncol=1 if spare else 5,
               fontsize=8, frameon=False, bbox_to_anchor=(0.97, 0.08) if spare else None)
    fig.suptitle("Kronecker spectra σ_k/σ_1 of representative layers, with the energy cuts and the chosen rank",
                 fontsize=10)
    save(fig, "repro_spectra.png")

    # 2. ranks per block at τ = 0.9
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for t in types:
        rows = sorted((L for L in layers if L["type"] == t), key=lambda L: L["block"])
        for ax, f in zip(axes, ("r", "r_energy", "r_elbow")):
            ax.plot([L["block"] for L in rows], [L["ranks"][k90][f] for L in rows], ".-", label=t, lw=1)
    for ax, f in zip(axes, ("chosen r = clip(min(r_energy, r_elbow))", "r_energy", "r_elbow")):
        ax.set_title(f"{f}, τ = {k90}", fontsize=10)
        ax.set_xlabel("block (layer index)")
        ax.set_ylabel("Kronecker terms" + ("" if ax is axes[0] else " (log scale)"))
        ax.grid(alpha=0.3, which="both", lw=0.4)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8, ncol=2)
    save(fig, "repro_spectra_ranks.png")

    # 3. cumulative energy, τ lines, the ordinary SVD at the same r
    fig, axes = grid_of_axes()
    for ax, t in zip(axes.flat, types):
        rows = [L for L in layers if L["type"] == t]
        for L in rows:
            ks, _, cum = _curve(L)
            ax.semilogx(ks, cum, color=shade(L["block"]), lw=0.8, alpha=0.8)
        n = min(len(L["svd_energy"]) for L in rows)
        svd = [sum(L["svd_energy"][i] for L in rows) / len(rows) for i in range(n)]
        ax.semilogx(range(1, n + 1), svd, "k--", lw=1.2, label="ordinary SVD (PiSSA), mean")
        for k in taus:
            ax.axhline(float(k), color="gray", ls=":", lw=0.8)
        title(ax, t)
        ax.set_ylim(0, 1.02)
    axes[0, 0].set_ylabel("Σ_{i≤k} σ_i² / ‖W‖_F²\n(share of the weight's energy)")
    axes[0, 0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Cumulative Kronecker energy of every layer (color: block {blocks[0]} → {blocks[-1]}); "
                 f"dotted: τ = {', '.join(taus)}", fontsize=10)
    save(fig, "repro_spectra_energy.png")
    return paths


# -----------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default=None,
                    help="Meta folder, HF folder or .gguf file (default: the SmolLM2 demo model)")
    ap.add_argument("--out", default=str(OUT), help="results JSON")
    ap.add_argument("--img-dir", default=str(IMG_DIR), help="where the PNGs go")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNGs from --out, compute nothing")
    ap.add_argument("--quant-noise", action="store_true",
                    help="only the Q4_1 rounding noise of a GGUF --ckpt against its spectra, to " + str(QUANT_OUT.name))
    a = ap.parse_args(argv)
    if a.quant_noise:
        ckpt = Path(a.ckpt).expanduser() if a.ckpt else demo_checkpoint()
        res = quant_noise(ckpt)
        QUANT_OUT.write_text(dumps(res))
        print(f"{ckpt.name}: tensor types {res['tensor_types']}; noise energy ≤ {100 * res['max_noise_energy_share']:.2f} % "
              f"of a weight's; σ_r / σ₁(noise) ≥ {res['min_ratio']['ratio_r']['value']:.1f}, σ_16 / σ₁(noise) ≥ "
              f"{res['min_ratio']['ratio_16']['value']:.1f}, σ_64 / σ₁(noise) ≥ {res['min_ratio']['ratio_64']['value']:.1f}; "
              f"wrote {QUANT_OUT}")
        return
    out = Path(a.out)
    if not a.plot_only:
        if a.ckpt is None:
            try:
                a.ckpt = demo_checkpoint()
            except OSError as e:
                raise SystemExit(f"spectra.py: {e}")
        ckpt = Path(a.ckpt).expanduser()
        model, _ = load_checkpoint(ckpt, device="cpu", dtype=torch.float32)
        print(f"{ckpt.name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{model.args.n_layers} blocks; KPSVD of every linear ({', '.join(ALL_TARGETS)}) in float32 on CPU")
        res = spectra_results(model, source=dict(checkpoint=ckpt.name,
                                                 bytes=ckpt.stat().st_size if ckpt.is_file() else None))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(dumps(res))
        print(f"{len(res['layers'])} layers in {res['seconds']} s; wrote {out}")
    print(format_table(json.loads(out.read_text())))
    for p in plot_spectra(out, a.img_dir):
        print(f"wrote {p} ({p.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
