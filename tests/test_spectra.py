"""experiments/spectra.py: the parameter totals equal inject's report, the ranks equal rank_select on
the stored spectrum, the LLaMA-2-7B per-rank counts (and PEFT LoKr's 1.33 M), main and the plots.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_spectra.py
"""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments import spectra as S
from kpsvd import factor_shape, unrearrange
from model import ModelArgs, Transformer, load_checkpoint
from rank_select import elbow_rank, energy_rank, select_rank
from soka import inject

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "spectra.json"
ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96, max_seq_len=64)


def shaped_model(seed=0):
    """A tiny Transformer whose targeted weights have a chosen Kronecker spectrum: a slow decline
    over the first d values (d random in 2..8), then a drop to a tail of small values. The energy
    rule then decides at low τ and the elbow (at d) at high τ, so the ranks depend on τ."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**ARGS))
    g = torch.Generator().manual_seed(seed)
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in S.ALL_TARGETS:
            m, n, p, q = factor_shape(*mod.weight.shape)
            K = min(m * n, p * q)
            d = int(torch.randint(2, 9, (1,), generator=g))
            tail = 0.15 * torch.rand(K - d, generator=g).sort(descending=True).values
            s = torch.cat([torch.linspace(1.0, 0.8, d), tail])
            Qu = torch.linalg.qr(torch.randn(m * n, K, generator=g)).Q
            Qv = torch.linalg.qr(torch.randn(p * q, K, generator=g)).Q
            with torch.no_grad():
                mod.weight.copy_(unrearrange((Qu * s) @ Qv.T, m, n, p, q))
    return model


@pytest.fixture(scope="module")
def tiny():
    model = shaped_model()
    return model, json.loads(S.dumps(S.spectra_results(model)))      # through the JSON writer, as stored


def test_totals_equal_inject(tiny):
    model, res = tiny
    ranks = {tau: [L["ranks"][S.tau_key(tau)]["r"] for L in res["layers"]] for tau in S.TAUS}
    assert ranks[0.8] != ranks[0.99], "the fixture should make τ matter"
    for tau in S.TAUS:
        for set_name, targets in S.TARGET_SETS.items():
            rep = inject(copy.deepcopy(model), "soka", targets, tau=tau, verbose=False)
            mine = res["params"][S.tau_key(tau)][set_name]
            assert mine["soka"] == rep["totals"]["trainable"]
            assert mine["lora_same_ranks"] == rep["totals"]["lora_trainable"]
            assert mine["layers"] == rep["totals"]["layers"]
            stored = {L["name"]: L["ranks"][S.tau_key(tau)] for L in res["layers"]}
            for row in rep["layers"]:
                got = stored[row["name"]]
                assert (got["r"], got["r_energy"], got["r_elbow"]) == (row["r"], row["r_energy"], row["r_elbow"])
                assert got["energy_kept"] == pytest.approx(row["energy_kept"], rel=1e-5)


def test_lora_columns(tiny):
    _, res = tiny
    for totals in res["params"].values():
        for set_name, p in totals.items():
            rows = [L for L in res["layers"] if L["type"] in S.TARGET_SETS[set_name]]
            unit = sum(L["d_in"] + L["d_out"] for L in rows)
            assert p["lora"] == {str(r): r * unit for r in S.LORA_RANKS}
            for key, target in (("lora_rank_closest", p["soka"]), ("lora_rank_closest_4_3", 4 / 3 * p["soka"])):
                best = min(range(1, 200), key=lambda r: (abs(r * unit - target), r))
                assert p[key] == best


def check_layer(L, taus):
    """What the stored values of one JSON layer say about its ranks, exactly where they determine them."""
    top, E = L["sigma_top"], L["energy"]
    total = None if len(top) == L["kron_rank"] else E        # complete: Σσ², as inject (E agrees to rounding)
    grid = dict(zip(L["grid_k"], L["sigma_grid"]))
    cum = dict(zip(L["grid_k"], L["energy_grid"]))
    sig = lambda k: top[k - 1] if k <= len(top) else grid[k]                         # noqa: E731
    for tau in taus:
        rk = L["ranks"][S.tau_key(tau)]
        if rk["r_elbow"] < len(top) or len(top) == L["kron_rank"]:
            assert select_rank(top, tau, S.R_MIN, S.R_MAX, total=total) == rk["r"]
            assert elbow_rank(top) == rk["r_elbow"]
        else:   # the largest gap lies past the stored top values: read it from the grid
            gap = sig(rk["r_elbow"]) - sig(rk["r_elbow"] + 1)
            assert gap > max(a - b for a, b in zip(top, top[1:]))
            assert rk["r"] == S.R_MAX                                                  # both candidates > r_max
        if rk["r_energy"] <= len(top):
            assert energy_rank(top, tau, total=total) == rk["r_energy"]
        else:
            assert sum(v * v for v in top) / E < tau and cum[rk["r_energy"]] >= tau * (1 - 1e-5)
            assert cum[rk["r_energy"] - 1] < tau * (1 + 1e-5)
        assert rk["r"] == min(max(min(rk["r_energy"], rk["r_elbow"]), S.R_MIN), S.R_MAX)
        kept = sum(v * v for v in top[:rk["r"]]) / (total or sum(v * v for v in top))
        assert rk["energy_kept"] == pytest.approx(kept, rel=1e-4)


def test_ranks_from_stored_spectrum(tiny):
    _, res = tiny
    for L in res["layers"]:
        assert len(L["sigma_top"]) == L["kron_rank"] <= S.TOP_K                 # complete: every check is exact
        check_layer(L, S.TAUS)


def test_committed_results_are_consistent():
    res = json.loads(RESULTS.read_text())
    taus = res["settings"]["taus"]
    assert len(res["layers"]) == res["model"]["n_layers"] * len(S.ALL_TARGETS)
    for L in res["layers"]:
        assert len(L["sigma_top"]) == min(S.TOP_K, L["kron_rank"])
        assert tuple(L["factors"]) == factor_shape(L["d_out"], L["d_in"])
        check_layer(L, taus)
    assert S.param_accounting(res["layers"], taus) == res["params"]
    assert res["llama2_7b"] == json.loads(json.dumps(S.llama2_7b_accounting()))


def test_llama2_7b_per_rank():
    acc = S.llama2_7b_accounting()
    per = acc["per_type"]
    args = ModelArgs()
    assert (args.n_layers, args.dim, args.ffn_dim, args.n_kv_heads) == (32, 4096, 11008, 32)
    # the default balanced splits (docs/method.md): 4096 → 64 × 64, 11008 → 86 × 128
    spec_split = {4096: (64, 64), 11008: (86, 128)}
    for t, v in per.items():
        d_out, d_in = v["shape"]
        (m, p), (n, q) = spec_split[d_out], spec_split[d_in]
        assert tuple(v["factors"]) == factor_shape(d_out, d_in) == (m, n, p, q)
        assert v["soka_per_rank"] == m * n + p * q + 1
        assert v["lora_per_rank"] == d_out + d_in
    assert per["wq"]["soka_per_rank"] == 8193
    for r, u in acc["uniform"].items():
        assert u["soka_attention"] == 32 * int(r) * sum(per[t]["soka_per_rank"] for t in S.ATTENTION)
        assert u["soka_all"] == 32 * int(r) * sum(per[t]["soka_per_rank"] for t in S.ALL_TARGETS)
        assert u["lora_pissa_all"] == 32 * int(r) * sum(per[t]["lora_per_rank"] for t in S.ALL_TARGETS)
    # r = 1 on every attention projection is the least SoKA can train there: above the paper's 0.99 M
    assert acc["soka_attention_floor"] == acc["uniform"]["1"]["soka_attention"] > S.PAPER["soka"]
    assert acc["soka_attention_floor_any_split"] == acc["soka_attention_floor"]
    assert {"method": "lokr", "targets": "all", "r": 8, "total": acc["uniform"]["8"]["lokr_all"]} \
        in acc["paper_matches"]["lora_pissa"]
    assert not [m for m in acc["paper_matches"]["soka"] if m["method"] == "soka"]


def test_lokr_and_lora_counts_match_peft():
    """PEFT itself, on one LLaMA-2-7B block built on the meta device (no memory), times 32."""
    import peft
    import transformers
    names = dict(wq="self_attn.q_proj", wk="self_attn.k_proj", wv="self_attn.v_proj", wo="self_attn.o_proj",
                 w1="mlp.gate_proj", w2="mlp.down_proj", w3="mlp.up_proj")
    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                                   num_attention_heads=32, vocab_size=8)
    acc = S.llama2_7b_accounting()

    def trainable(config):
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(cfg)
        model = peft.get_peft_model(model, config)
        return 32 * sum(p.numel() for p in model.parameters() if p.requires_grad)

    all_mods = [names[t].split(".")[1] for t in S.ALL_TARGETS]
    assert trainable(peft.LoKrConfig(r=8, target_modules=all_mods)) == acc["uniform"]["8"]["lokr_all"]
    assert round(acc["uniform"]["8"]["lokr_all"] / 1e4) == 133                 # the paper's "1.33 M"
    att = [names[t].split(".")[1] for t in S.ATTENTION]
    assert trainable(peft.LoraConfig(r=4, target_modules=att)) == acc["uniform"]["4"]["lora_pissa_attention"]


def test_main_and_plots(tmp_path):
    """`python experiments/spectra.py --ckpt DIR` from the repo root on a tiny Meta checkpoint: the JSON
    equals spectra_results of the loaded model, and plot_spectra drew the PNGs from that file."""
    model = shaped_model(seed=1)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "params.json").write_text(json.dumps(ARGS))
    torch.save(model.state_dict(), ckpt / "consolidated.00.pth")
    out, img = tmp_path / "spectra.json", tmp_path / "img"
    done = subprocess.run([sys.executable, "experiments/spectra.py", "--ckpt", str(ckpt), "--out", str(out),
                           "--img-dir", str(img)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "LoRA rank closest to SoKA" in done.stdout
    res = json.loads(out.read_text())
    assert res["layers"] == json.loads(S.dumps(S.spectra_results(model)))["layers"]
    for name in ("repro_spectra.png", "repro_spectra_ranks.png", "repro_spectra_energy.png"):
        data = (img / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < 300_000


def test_demo_model_totals_equal_inject(demo_gguf):
    """The committed SmolLM2 numbers at τ = 0.9 (attention) against inject on the real model."""
    res = json.loads(RESULTS.read_text())
    model, _ = load_checkpoint(demo_gguf)
    rep = inject(model, "soka", S.ATTENTION, tau=0.9, verbose=False)
    mine = res["params"]["0.9"]["attention"]
    assert (mine["soka"], mine["lora_same_ranks"]) == (rep["totals"]["trainable"], rep["totals"]["lora_trainable"])
    stored = {L["name"]: L["ranks"]["0.9"]["r"] for L in res["layers"]}
    assert all(stored[row["name"]] == row["r"] for row in rep["layers"])
