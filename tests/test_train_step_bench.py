"""benchmarks/train_step.py on a tiny model on CPU: every config runs and reports sane numbers, and the
FLOP model matches torch's FlopCounterMode on one real forward + backward of each config."""
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

from kpsvd import factor_shape  # noqa: E402
from model import ModelArgs  # noqa: E402

TINY = dict(layers=2, dim=64, heads=4, ffn=128, vocab=256, batch=2, seq=32)
HAVE_HF = ts.hf_available()


def tiny_args():
    return ModelArgs(dim=TINY["dim"], n_layers=TINY["layers"], n_heads=TINY["heads"], vocab_size=TINY["vocab"],
                     hidden_dim=TINY["ffn"])


def test_every_config_runs(tmp_path):
    configs = list(ts.CONFIGS) + ["soka_r8@dense", "soka_r8+glu", "peft_lokr_r8+noamp"]
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
    assert by["soka_r8@dense"]["impl"] == "dense"
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


CASES = ["ours_frozen", "soka_r4", "soka_r4@kron_v2", "soka_r4@dense", "soka_attn_r8", "lora_r16", "pissa_r16",
         "hf_frozen", "peft_lora_r16", "peft_lokr_r8"]


@pytest.mark.parametrize("name", CASES)
def test_flop_model_matches_counted(name, monkeypatch):
    base, impl, _ = ts.parse_config(name)
    kind, method, rank, targets = ts.CONFIGS[base]
    if kind == "hf" and not HAVE_HF:
        pytest.skip("transformers / peft do not import")
    if impl and impl not in getattr(ts.adapters, "IMPLS", ()):
        pytest.skip(f"adapters.py has no impl {impl!r}")
    monkeypatch.setattr(F, "scaled_dot_product_attention", math_sdpa)
    a, B, T = tiny_args(), TINY["batch"], TINY["seq"]
    torch.manual_seed(0)
    s = ts.setup(name, a, device=torch.device("cpu"), dtype=torch.float32, graphed=False)
    ids = torch.randint(0, a.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter:
        s["step"](ids, ids.clone(), float(B * (T - 1)))
    counted = counter.get_total_flops()
    rows = 1.0 if kind == "hf" or not ts.train.CE_CHUNK else (T - 1) / T     # rows that get logits
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
