"""benchmarks/train_step.py on a tiny model on CPU: every config runs and reports sane numbers, and the
FLOP model matches torch's FlopCounterMode on one real forward + backward of each config, on one
SoKA layer's reference path, and on LEAST run as real products."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
spec = importlib.util.spec_from_file_location("train_step", ROOT / "benchmarks" / "train_step.py")
ts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ts)

from kpsvd import factor_shape, kron_apply  # noqa: E402
from model import ModelArgs  # noqa: E402
from soka.adapters import SoKALinear, uses_fused  # noqa: E402
from soka.steps import CE_CHUNK  # noqa: E402

TINY = dict(layers=2, dim=64, heads=4, ffn=128, vocab=256, batch=2, seq=32)
HAVE_HF = ts.hf_available()


def tiny_args():
    return ModelArgs(dim=TINY["dim"], n_layers=TINY["layers"], n_heads=TINY["heads"], vocab_size=TINY["vocab"],
                     hidden_dim=TINY["ffn"])


def test_every_config_runs(tmp_path):
    configs = list(ts.CONFIGS) + ["soka_r8@reference", "soka_r8+glu", "peft_lokr_r8+noamp"]
    argv = [f"--{k}={v}" for k, v in TINY.items()] + ["--steps=1", "--warmup=1", "--device=cpu",
                                                      "--gemm-size=64", f"--configs={','.join(configs)}",
                                                      f"--out={tmp_path / 'r.json'}"]
    rows = ts.main(argv)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [r["config"] for r in saved["results"]] == configs
    by = {r["config"]: r for r in rows}
    a = tiny_args()
    shapes = [(t, do, di) for t, (do, di) in a.linear_shapes().items()]
    for name in configs:
        r = by[name]
        if ts.CONFIGS[ts.parse_config(name)[0]][0] == "hf" and not HAVE_HF:
            assert r["status"].startswith("skipped")
            continue
        assert r["status"] == "ok", (name, r["status"])
        assert r["tokens_per_s"] > 0 and r["flops_per_token"] > 0 and r["tflops"] > 0
        # random init with std 0.02: logits near 0, so the loss sits near ln(vocab)
        assert abs(r["loss"] - math.log(a.vocab_size)) < 0.5, (name, r["loss"])
        _, method, rank, targets = ts.CONFIGS[ts.parse_config(name)[0]]
        if method is None:
            want = 0
        elif method == "soka":
            want = a.n_layers * sum(rank * (m * n + p * q + 1) for t, do, di in shapes if t in targets
                                    for m, n, p, q in [factor_shape(do, di)])
        elif method in ("lora", "pissa"):
            want = a.n_layers * sum(rank * (do + di) for t, do, di in shapes if t in targets)
        else:
            want = None                         # PEFT LoKr: its own factorization
        if want is not None:
            assert r["trainable"] == want, (name, r["trainable"], want)
    assert by["ours_frozen"]["x_our_floor"] == 1.0
    assert by["soka_r8@reference"]["impl"] == "reference"
    # "auto" on CPU tensors runs the reference path, and the row says so
    assert not uses_fused("auto", torch.empty(0)) and by["soka_r8"]["impl"] == "reference"
    assert by["soka_r8@reference"]["flops_per_token"] == by["soka_r8"]["flops_per_token"]
    # the adapters add work on top of the floor, more with rank
    f = {n: by[n]["flops_per_token"] for n in ("ours_frozen", "soka_r1", "soka_r4", "soka_r8")}
    assert f["ours_frozen"] < f["soka_r1"] < f["soka_r4"] < f["soka_r8"]
    if HAVE_HF:
        # HF computes logits on all T positions, ours on the T - 1 that have a next token
        assert by["hf_frozen"]["flops_per_token"] >= by["ours_frozen"]["flops_per_token"]
        assert by["peft_lora_r16"]["trainable"] == by["lora_r16"]["trainable"]
        assert by["ours_frozen"]["x_hf_floor"] == pytest.approx(
            by["ours_frozen"]["tokens_per_s"] / by["hf_frozen"]["tokens_per_s"])


def math_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Attention as two explicit matmuls, which FlopCounterMode counts (it does not count CPU SDPA)."""
    if k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
    s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return torch.softmax(s, -1) @ v


CASES = ["ours_frozen", "soka_r4", "soka_r4@reference", "soka_attn_r8", "lora_r16", "pissa_r16",
         "hf_frozen", "peft_lora_r16", "peft_lokr_r8"]


@pytest.mark.parametrize("name", CASES)
def test_flop_model_matches_counted(name, monkeypatch):
    base, _, _ = ts.parse_config(name)
    kind, method, rank, targets = ts.CONFIGS[base]
    assert kind != "hf" or HAVE_HF, "transformers and peft (requirements-dev.txt) do not import"
    monkeypatch.setattr(F, "scaled_dot_product_attention", math_sdpa)
    a, B, T = tiny_args(), TINY["batch"], TINY["seq"]
    torch.manual_seed(0)
    s = ts.setup(name, a, device=torch.device("cpu"), dtype=torch.float32, graphed=False)
    ids = torch.randint(0, a.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter:
        s["step"](ids, ids.clone(), float(B * (T - 1)))
    counted = counter.get_total_flops()
    rows = 1.0 if kind == "hf" or not CE_CHUNK else (T - 1) / T     # rows that get logits
    model = ts.flops_per_token(a, T, method=method, rank=rank, targets=targets, impl=s["impl"], tokens=B * T,
                               causal=False, head_rows=rows) * B * T
    # HF computes its rotary angles with a (B, head_dim/2, 1) @ (B, 1, T) matmul; LoKr forms w2 = w2_a @ w2_b
    tol = {"ours": 1e-9, "hf": 1e-3}[kind] if method != "lokr" else 2e-2
    assert counted == pytest.approx(model, rel=tol), (name, counted, model)
    # the causal count is smaller by the masked half of the attention matmuls
    causal = ts.flops_per_token(a, T, method=method, rank=rank, targets=targets, impl=s["impl"], tokens=B * T,
                                head_rows=rows)
    attn = 3 * 2 * 2 * a.n_layers * a.dim * (T - (T + 1) / 2)
    assert causal == pytest.approx(model / (B * T) - attn)


def test_rounds_keep_each_configs_median_round(tmp_path):
    configs = ["ours_frozen", "soka_r1"]
    argv = [f"--{k}={v}" for k, v in TINY.items()] + ["--steps=1", "--warmup=1", "--device=cpu", "--rounds=3",
                                                      "--gemm-size=64", f"--configs={','.join(configs)}",
                                                      f"--out={tmp_path / 'r.json'}"]
    rows = ts.main(argv)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["config"]["rounds"] == 3 and [r["config"] for r in saved["results"]] == configs
    for r in rows:
        speeds = [q["tokens_per_s"] for q in r["rounds"]]
        assert len(speeds) == 3 and r["tokens_per_s"] == sorted(speeds)[1]
        # each round's ratio is against that round's floor
        assert r["rounds"][0]["x_our_floor"] == pytest.approx(speeds[0] / rows[0]["rounds"][0]["tokens_per_s"])
    assert rows[1]["x_our_floor"] == pytest.approx(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"])


def least_schedule(x, gy, sigma, U, V, *, u_x_first, dx):
    """LEAST (docs/performance.md, train_step.adapter_macs) run for real: y, dx (or None), dσ, dU, dV of one SoKA layer's
    Kronecker part from the small products it counts, one term at a time; x (N, n·q), gy (N, m·p)."""
    r, m, n = U.shape
    _, p, q = V.shape
    N = x.shape[0]
    X, G = x.reshape(N, n, q), gy.reshape(N, m, p)
    y, dX = torch.zeros_like(gy).reshape(N, m, p), torch.zeros_like(X) if dx else None
    dsigma, dU, dV = torch.zeros_like(sigma), torch.zeros_like(U), torch.zeros_like(V)
    for k in range(r):
        Us = sigma[k] * U[k]
        if u_x_first:                                    # intermediates U X and G V, both (N, m, q)
            UX = Us @ X
            y += UX @ V[k].T
            GV = G @ V[k]
            if dx:
                dX += Us.T @ GV
            dUs = GV.transpose(0, 1).reshape(m, N * q) @ X.transpose(1, 2).reshape(N * q, n)     # Σ_t (G V) Xᵀ
            dV[k] = G.permute(2, 0, 1).reshape(p, N * m) @ UX.reshape(N * m, q)                # Σ_t Gᵀ (U X)
        else:                                            # intermediates X Vᵀ and Usᵀ G, both (N, n, p)
            XV = X @ V[k].T
            y += Us @ XV
            UG = Us.T @ G
            if dx:
                dX += UG @ V[k]
            dUs = G.transpose(0, 1).reshape(m, N * p) @ XV.permute(0, 2, 1).reshape(N * p, n)  # Σ_t G (X Vᵀ)ᵀ
            dV[k] = UG.permute(2, 0, 1).reshape(p, N * n) @ X.reshape(N * n, q)                # Σ_t (Usᵀ G)ᵀ X
        dsigma[k], dU[k] = (dUs * U[k]).sum(), sigma[k] * dUs
    return y.reshape(N, m * p), None if dX is None else dX.reshape(N, n * q), dsigma, dU, dV


@pytest.mark.parametrize("dx", [True, False])
@pytest.mark.parametrize("d_out,d_in", [(20, 6), (12, 42), (48, 32), (86 * 2, 24)])
def test_least_schedule_computes_the_gradients_with_the_counted_flops(d_out, d_in, dx):
    m, n, p, q = factor_shape(d_out, d_in)                      # the shapes the FLOP model assumes
    r, N = 3, 5
    g = torch.Generator().manual_seed(m * n + p * q)
    x = torch.randn(N, n * q, generator=g, dtype=torch.float64)
    gy = torch.randn(N, m * p, generator=g, dtype=torch.float64)
    sigma, U, V = (torch.randn(s, generator=g, dtype=torch.float64) for s in [(r,), (r, m, n), (r, p, q)])
    leaves = [t.clone().requires_grad_(True) for t in (x, sigma, U, V)]
    y_ref = kron_apply(*leaves)
    y_ref.backward(gy)
    ref = [y_ref.detach()] + [t.grad for t in leaves]
    counts = {}
    for u_x_first in (True, False):
        with FlopCounterMode(display=False) as counter:
            y, dX, dsigma, dU, dV = least_schedule(x, gy, sigma, U, V, u_x_first=u_x_first, dx=dx)
        counts[u_x_first] = counter.get_total_flops()
        for got, want in zip((y, dX, dsigma, dU, dV), ref):
            if got is not None:
                assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)
    # the cheaper of the two orders is what the FLOP model counts, per token, as multiply-adds
    want = ts.adapter_macs("soka", d_out, d_in, r, impl="least", tokens=N, dx=dx)
    assert min(counts.values()) == 2 * N * want, (counts, want)
    assert want <= ts.adapter_macs("soka", d_out, d_in, r, impl="reference", tokens=N, dx=dx)
    assert want < ts.adapter_macs("soka", d_out, d_in, r, impl="fused", tokens=N, dx=dx)


@pytest.mark.parametrize("dx", [True, False])
@pytest.mark.parametrize("d_out,d_in", [(20, 6), (12, 42), (48, 32), (86 * 2, 24)])
def test_reference_path_flops_are_counted(d_out, d_in, dx):
    """SoKALinear(impl="reference"), forward + backward through autograd, costs what adapter_macs
    says for "reference" on top of the frozen layer's 2·d_out·d_in (d_out·d_in without dx)."""
    m, n, p, q = factor_shape(d_out, d_in)
    r, N = 3, 5
    g = torch.Generator().manual_seed(d_out + d_in)
    W = torch.randn(d_out, d_in, generator=g)
    layer = SoKALinear(W, torch.rand(r, generator=g), torch.randn(r, m, n, generator=g),
                       torch.randn(r, p, q, generator=g), subtract=False, impl="reference")
    x = torch.randn(2, N, d_in, generator=g).requires_grad_(dx)
    with FlopCounterMode(display=False) as counter:
        layer(x).backward(torch.randn(2, N, d_out, generator=g))
    want = ts.adapter_macs("soka", d_out, d_in, r, impl="reference", tokens=2 * N, dx=dx)
    assert counter.get_total_flops() == 2 * 2 * N * (want + d_out * d_in * (1 + dx))
    assert layer.sigma.grad is not None and (x.grad is not None) == dx
    # kpsvd.kron_apply alone: r·n·p·(q + m) multiply-adds per token forward, a third of the whole with dx
    with FlopCounterMode(display=False) as counter:
        kron_apply(x.detach(), layer.sigma, layer.U, layer.V)
    assert counter.get_total_flops() == 2 * 2 * N * r * n * p * (q + m)
    if dx:
        assert 3 * r * n * p * (q + m) == want


def test_compiled_rows_are_compared_with_the_compiled_floor():
    def row(name, tps):
        return dict(config=name, status="ok", tokens_per_s=tps, peak_gib=1.0, flops_per_token=1.0)

    rows = [row("hf_frozen", 10.0), row("ours_frozen", 12.0), row("ours_frozen+compile", 15.0),
            row("soka_r1", 9.0), row("soka_r1+compile+glu", 13.5)]
    ts.add_ratios(rows, gemm_rate=1.0, cuda=True)
    x = {r["config"]: r["x_our_floor"] for r in rows}
    assert x == {"hf_frozen": 10 / 12, "ours_frozen": 1.0, "ours_frozen+compile": 1.0, "soka_r1": 0.75,
                 "soka_r1+compile+glu": 0.9}


@pytest.mark.parametrize("least_gflop", [0.5, 2.0, 4.0, 8.0])
def test_ceilings_reach_the_target_exactly_when_the_needed_gemm_rate_is_at_most_the_measured(least_gflop):
    gemm = 800.0                                                     # TFLOP/s
    rows = [dict(config="hf_frozen", status="ok", method="frozen", tokens_per_s=14_000.0, flops_per_token=27e9),
            dict(config="ours_frozen+compile", status="ok", method="frozen", tokens_per_s=20_000.0,
                 flops_per_token=27e9),
            dict(config="soka_r8+compile", status="ok", method="soka", tokens_per_s=13_000.0,
                 flops_per_token=27e9 + 1.5 * least_gflop * 1e9, flops_per_token_least=27e9 + least_gflop * 1e9)]
    ts.add_ceilings(rows, gemm, target=1.2)
    r = rows[2]
    assert r["ceiling_tokens_per_s"] == pytest.approx(1 / (1 / 20_000 + least_gflop * 1e9 / (gemm * 1e12)))
    assert r["target_needs_pct_gemm"]["impl"] == pytest.approx(1.5 * r["target_needs_pct_gemm"]["least"])
    assert (r["ceiling_x_hf_floor"] >= 1.2) == (r["target_needs_pct_gemm"]["least"] <= 100)
    assert "ceiling_tokens_per_s" not in rows[0] and "ceiling_tokens_per_s" not in rows[1]


def test_report_prints_a_saved_run_again_with_its_ceilings(tmp_path, capsys):
    configs = ["hf_frozen", "ours_frozen", "soka_r1"] if HAVE_HF else ["ours_frozen", "soka_r1"]
    out = tmp_path / "r.json"
    argv = [f"--{k}={v}" for k, v in TINY.items()] + ["--steps=1", "--warmup=1", "--device=cpu", "--gemm-size=64",
                                                      f"--configs={','.join(configs)}", f"--out={out}"]
    measured = ts.main(argv)
    saved = json.loads(out.read_text())
    for r in saved["results"]:                        # as a run from before LEAST was counted
        r.pop("flops_per_token_least", None)
    out.write_text(json.dumps(saved))
    capsys.readouterr()
    again = ts.main(["--report", str(out), "--target", "0.5"])
    printed = capsys.readouterr().out
    assert [r["tokens_per_s"] for r in again] == [r["tokens_per_s"] for r in measured]
    assert again[-1]["flops_per_token_least"] == measured[-1]["flops_per_token_least"]
    if HAVE_HF:
        assert "Ceilings" in printed and "target 0.5" in printed
        floor, soka, rate = again[1], again[2], saved["config"]["gemm_tflops_used"] * 1e12
        added = soka["flops_per_token_least"] - floor["flops_per_token"]
        assert soka["ceiling_tokens_per_s"] == pytest.approx(1 / (1 / floor["tokens_per_s"] + added / rate))
    # rows naming an implementation this code does not have (kron_v2, dense) are printed, not refused
    old = dict(saved["results"][-1], config="soka_r1@kron_v2", impl="kron_v2")
    saved["results"] += [old, dict(old, config="soka_r1@dense+compile", impl="dense")]
    out.write_text(json.dumps(saved))
    capsys.readouterr()
    again = ts.main(["--report", str(out)])
    printed = capsys.readouterr().out
    assert "soka_r1@kron_v2" in printed and "soka_r1@dense+compile" in printed
    assert again[-2]["flops_per_token_least"] == measured[-1]["flops_per_token_least"]
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="not a train_step.py results file"):
        ts.main(["--report", str(bad)])
