"""soka/adapters.py: step 0 equals the base, only adapters train, merge/unmerge, the adapter file,
trainable counts, compress, the rank report, and the Kronecker apply's gradients.

    python -m pytest -q tests/test_adapters.py
"""

import pytest
import torch
import torch.nn.functional as F

from kpsvd import factor_shape, kpsvd, kron_apply, kron_sum
from model import ModelArgs, Transformer, load_checkpoint
from rank_select import explain_rank, select_rank
from soka import inject, load_adapter, merge, save_adapter, unmerge
from soka import adapters
from soka.adapters import (IMPLS, KronFused, LoRALinear, PiSSALinear, SoKALinear, adapter_layers, compress,
                           fingerprint, uses_fused)
from soka.export import export_meta

ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96, max_seq_len=64)
ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
TOKENS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))

# (method, inject options): SoKA by KPSVD with rank chosen per layer, randomized with a fixed rank,
# random init; PiSSA; LoRA with α ≠ r so the scale is not 1. Targets: all seven unless given.
CASES = [("soka", {}), ("soka", {"rank": 2, "randomized": True, "targets": ("wq", "wk", "w2")}),
         ("soka", {"init": "random"}),
         ("pissa", {"rank": 4}), ("lora", {"rank": 4, "alpha": 8})]
IDS = ["soka", "soka-randomized", "soka-random-init", "pissa", "lora"]


def tiny(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**ARGS)).to(dtype)


def factor_keys(model):
    return {f"{name}.{k}" for name, layer in adapter_layers(model) for k in layer.factor_names}


def train_steps(model, n=2, lr=1e-2):
    """A few AdamW steps on next-token loss, handed *every* parameter: frozen ones must stay put."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    for _ in range(n):
        logits = model(TOKENS[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), TOKENS[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


# ----------------------------------------------------------------------------- step 0

@pytest.mark.parametrize("method,kw", CASES, ids=IDS)
def test_step0_equals_base_float32_and_float64(method, kw):
    for dtype, tol in ((torch.float32, 5e-6), (torch.float64, 1e-12)):
        model = tiny(dtype)
        base = model(TOKENS)
        inject(model, method, **{"targets": ALL, **kw}, verbose=False)
        out = model(TOKENS)
        if method == "lora" or kw.get("init") == "random":   # adapter output is exactly 0, W_res = W
            assert torch.equal(out, base)
        else:
            torch.testing.assert_close(out, base, rtol=0, atol=tol * base.abs().max().item())


@pytest.mark.parametrize("method,kw", CASES, ids=IDS)
def test_step0_bfloat16_within_bf16s_own_rounding(method, kw):
    # Tolerance: the adapted bf16 model is no further from the float32 base than twice the distance
    # of the plain bf16 base from it (bf16 rounding of W_res and of the adapter path, nothing else).
    ref = tiny()(TOKENS)
    model = tiny(torch.bfloat16)
    own = (model(TOKENS) - ref).abs().max().item()
    inject(model, method, **{"targets": ALL, **kw}, verbose=False)
    for _, layer in adapter_layers(model):
        assert layer.weight.dtype == torch.bfloat16
        assert all(getattr(layer, k).dtype == torch.float32 for k in layer.factor_names)
    err = (model(TOKENS) - ref).abs().max().item()
    assert err <= 2 * own, (err, own)


# ----------------------------------------------------------------------------- freezing

@pytest.mark.parametrize("method,kw", CASES, ids=IDS)
def test_only_adapters_train_and_base_stays_bit_identical(method, kw):
    model = tiny()
    inject(model, method, **{"targets": ALL, **kw}, verbose=False)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == factor_keys(model)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k not in trainable}
    factors = {k: v.clone() for k, v in model.state_dict().items() if k in trainable}
    train_steps(model, n=2)
    after = model.state_dict()
    for k, v in frozen.items():
        assert torch.equal(after[k], v), k
    changed = [k for k, v in factors.items() if not torch.equal(after[k], v)]
    assert len(changed) == len(factors), sorted(factors.keys() - set(changed))[:4]   # two steps move all


def test_bfloat16_backward_gives_float32_factor_grads():
    model = tiny(torch.bfloat16)
    inject(model, "soka", ALL, verbose=False)
    model(TOKENS).float().square().mean().backward()
    for _, layer in adapter_layers(model):
        for k in layer.factor_names:
            g = getattr(layer, k).grad
            assert g is not None and g.dtype == torch.float32 and torch.isfinite(g).all()


# ----------------------------------------------------------------------------- merge

@pytest.mark.parametrize("method,kw", CASES, ids=IDS)
def test_merge_unmerge(method, kw):
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        model = tiny(dtype)
        inject(model, method, **{"targets": ALL, **kw}, verbose=False)
        train_steps(model, n=2)
        model.eval()
        with torch.no_grad():
            unmerged = model(TOKENS)
            residual = {n: l.weight.clone() for n, l in adapter_layers(model)}
            deltas = {n: l.delta() for n, l in adapter_layers(model)}
            merge(model)
            merged_w = {n: l.weight.clone() for n, l in adapter_layers(model)}
            merged = model(TOKENS)
            torch.testing.assert_close(merged, unmerged, rtol=0, atol=tol * unmerged.abs().max().item())
            merge(model)                                             # twice: a no-op
            assert all(torch.equal(l.weight, merged_w[n]) for n, l in adapter_layers(model))
            unmerge(model)
            eps = torch.finfo(dtype).eps
            for n, l in adapter_layers(model):
                assert not l.merged
                bound = 2 * eps * (residual[n].abs() + deltas[n].abs()) + 1e-30
                assert ((l.weight - residual[n]).abs() <= bound).all(), n
            unmerge(model)                                           # twice: a no-op
            torch.testing.assert_close(model(TOKENS), unmerged, rtol=0, atol=tol * unmerged.abs().max().item())
    merge(model)
    model.train()
    with pytest.raises(RuntimeError, match="unmerge"):           # a merged layer would silently not train
        model(TOKENS)


# ----------------------------------------------------------------------------- the adapter file

@pytest.mark.parametrize("method,kw", CASES, ids=IDS)
def test_save_load_into_fresh_base_is_exact(method, kw, tmp_path):
    model = tiny()
    inject(model, method, **{"targets": ALL, **kw}, verbose=False)
    train_steps(model, n=3)
    trained = model(TOKENS)
    path = tmp_path / "adapter.pt"
    save_adapter(model, path)
    blob = torch.load(path, weights_only=True)                 # plain types only: runs no code
    assert blob["method"] == method and set(blob["layers"]) == {n for n, _ in adapter_layers(model)}
    n_trainable = sum(l.trainable() for _, l in adapter_layers(model))
    assert path.stat().st_size <= 2 * 4 * n_trainable + 6000 * len(blob["layers"])   # factors (+ init) and a header
    assert not list(tmp_path.glob("*.part"))                  # no temporary file left (soka/files.py)

    fresh = tiny()
    report = load_adapter(fresh, path)
    assert torch.equal(fresh(TOKENS), trained)
    assert [r["r"] for r in report["layers"]] == [l.info["r"] for _, l in adapter_layers(model)]
    assert {k for k, p in fresh.named_parameters() if p.requires_grad} == factor_keys(fresh)


def test_save_load_through_a_meta_checkpoint_and_compress(tmp_path):
    # The real flow: base checkpoint on disk -> load -> compress a fine-tuning update -> train -> save;
    # later: load the same checkpoint again -> load_adapter -> the same logits, bit for bit.
    export_meta(tiny(), tmp_path / "base")
    model, _ = load_checkpoint(tmp_path / "base")
    tuned = tiny(seed=5).state_dict()
    keys = ["layers.0.attention.wq.weight", "layers.1.feed_forward.w2.weight"]
    compress(model, {k: 0.1 * tuned[k] for k in keys}, rank=3, verbose=False)
    train_steps(model, n=2)
    save_adapter(model, tmp_path / "a.pt")
    again, _ = load_checkpoint(tmp_path / "base")
    load_adapter(again, tmp_path / "a.pt")
    assert torch.equal(again(TOKENS), model(TOKENS))


def test_load_into_a_different_base_fails_clearly(tmp_path):
    model = tiny()
    inject(model, "soka", ALL, verbose=False)
    save_adapter(model, tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wq .*sha256"):
        load_adapter(tiny(seed=1), tmp_path / "a.pt")
    other = tiny()
    with torch.no_grad():
        other.layers[1].attention.wv.weight[3, 5] += 1e-3
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"layers\.1\.attention\.wv "):
        load_adapter(other, tmp_path / "a.pt")
    assert not adapter_layers(other)                             # a failed load changes nothing
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="dtype"):
        load_adapter(tiny(torch.bfloat16), tmp_path / "a.pt")
    with pytest.raises(ValueError, match="already has an adapter"):
        load_adapter(model, tmp_path / "a.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt"):
        load_adapter(tiny(), tmp_path / "junk.pt")


def unchanged(model, before):
    return not adapter_layers(model) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("method", ["soka", "lora", "pissa"])
def test_tampered_adapter_file_is_refused_before_the_model_changes(method, tmp_path):
    model = tiny()
    inject(model, method, ALL, rank=3, verbose=False)
    save_adapter(model, tmp_path / "a.pt")
    blob = torch.load(tmp_path / "a.pt", weights_only=True)
    first, last = list(blob["layers"])[0], list(blob["layers"])[-1]
    key, bad = ("U", (3, 1, 8)) if method == "soka" else ("B", (32, 1))   # both broadcast under copy_
    real = {k: tuple(t.shape) for k, t in blob["layers"][first]["params"].items()}
    cases = {
        "shape": (lambda b: b["layers"][first]["params"].__setitem__(key, torch.zeros(bad)),
                  rf"{first} params {key} has shape \({bad[0]}, {bad[1]}.*expected"),
        "no-params": (lambda b: b["layers"][last].pop("params"), rf"corrupt adapter file: {last} .*'params'"),
        # a 4-byte expanded view of the right shape, and an integer tensor: gigabytes, or silently cast
        "view": (lambda b: b["layers"][first]["params"].__setitem__(key, torch.zeros(1).expand(*real[key])),
                 rf"{first} params {key} is a \[.*\] view of 4 stored bytes"),
        "int": (lambda b: b["layers"][first]["params"].__setitem__(key, torch.zeros(real[key], dtype=torch.int64)),
                rf"{first} params {key} holds torch.int64 values"),
        # a rank far past the weight's: with factors of that shape, a 4 KB file loaded as 4 GB
        "rank": (lambda b: b["layers"][first]["info"].__setitem__("r", 10**6), rf"{first} has rank 1000000, outside 1 \.\. "),
        "base": (lambda b: b["layers"][first]["info"].__setitem__("base", "sha"), "no base-weight fingerprint"),
        "layers": (lambda b: b.__setitem__("layers", [first]), "'layers' should be a dict, got list"),
    }
    if method != "soka":    # a NaN scale would turn every output NaN
        cases["scale"] = (lambda b: b["layers"][last].__setitem__("scale", float("nan")),
                          rf"{last} has scale = nan, not a positive number")
    if method != "lora":    # PiSSA's W_res is W minus its initial factors: "subtract": False would rebuild W
        flip = False if method == "pissa" else "yes"
        cases["subtract"] = (lambda b: b["layers"][last].__setitem__("subtract", flip),
                             rf"{last} has subtract = {flip!r}, which a {method} layer cannot have")
    for tamper, match in cases.values():
        t = torch.load(tmp_path / "a.pt", weights_only=True)
        tamper(t)
        torch.save(t, tmp_path / "t.pt")
        fresh = tiny()
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            load_adapter(fresh, tmp_path / "t.pt")
        assert unchanged(fresh, before)                            # a bad file changes nothing


def test_fingerprint_sees_one_bit():
    w = torch.randn(8, 8, dtype=torch.bfloat16)
    v = w.clone()
    v.view(torch.int16)[2, 3] ^= 1
    assert fingerprint(w) == fingerprint(w.clone())
    assert fingerprint(w)["sha256"] != fingerprint(v)["sha256"]
    assert fingerprint(w.float())["dtype"] == "float32" and fingerprint(w)["shape"] == [8, 8]


# ----------------------------------------------------------------------------- counts and ranks

@pytest.mark.parametrize("method,kw", CASES, ids=IDS)
def test_trainable_counts(method, kw):
    model = tiny()
    report = inject(model, method, **{"targets": ALL, **kw}, verbose=False)
    for row, (name, layer) in zip(report["layers"], adapter_layers(model), strict=True):
        assert row["name"] == name
        r, (d_out, d_in) = row["r"], row["shape"]
        actual = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        if method == "soka":
            m, n, p, q = row["factors"]
            assert actual == row["trainable"] == r * (m * n + p * q + 1)
        else:
            assert actual == row["trainable"] == r * (d_in + d_out)
        assert row["lora_trainable"] == r * (d_in + d_out)
    assert report["totals"]["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("tau,r_max", [(0.9, 16), (0.5, 4), (0.99, 64)])
def test_report_ranks_equal_select_rank_on_the_spectrum(tau, r_max):
    base = tiny()
    weights = {k.removesuffix(".weight"): v for k, v in base.state_dict().items()}
    model = tiny()
    report = inject(model, "soka", ALL, tau=tau, r_max=r_max, verbose=False)
    assert len(report["layers"]) == 2 * len(ALL)
    for row in report["layers"]:
        W = weights[row["name"]]
        assert tuple(row["factors"]) == factor_shape(*W.shape)
        sigma, _, _ = kpsvd(W, *row["factors"])
        c = explain_rank(sigma, tau=tau, r_max=r_max)
        assert row["r"] == select_rank(sigma, tau=tau, r_max=r_max) == c.r
        assert (row["r_energy"], row["r_elbow"]) == (c.r_energy, c.r_elbow)
        assert row["energy_kept"] == pytest.approx(c.energy_kept, rel=1e-6)


def test_randomized_report_uses_top_k_and_total_energy():
    base = tiny()
    model = tiny()
    report = inject(model, "soka", ("wq",), randomized=True, r_max=6, verbose=False)
    for row in report["layers"]:
        W = base.get_submodule(row["name"]).weight.detach()
        sigma, _, _ = kpsvd(W, *row["factors"], rank=7, randomized=True, seed=0)
        assert row["r"] == select_rank(sigma, r_max=6, total=float(W.double().square().sum()))


def test_factors_option_and_its_errors():
    model = tiny()
    report = inject(model, "soka", ("wq", "wk"), factors={"wq": (4, 16, 16, 4)}, rank=3, verbose=False)
    rows = {r["name"].rsplit(".", 1)[-1]: r for r in report["layers"]}
    assert rows["wq"]["factors"] == [4, 16, 16, 4] and rows["wk"]["factors"] == list(factor_shape(32, 64))
    assert model.layers[0].attention.wq.U.shape == (3, 4, 16)
    assert len(inject(tiny(), "soka", "wv", rank=1, verbose=False)["layers"]) == 2   # one name as a str
    with pytest.raises(ValueError, match="factors"):
        inject(tiny(), "soka", ("wq",), factors=(4, 4, 16, 4), verbose=False)
    with pytest.raises(ValueError, match="already has an adapter"):
        inject(model, "soka", ("wq",), verbose=False)
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject(tiny(), "soka", ("q_proj",), verbose=False)
    with pytest.raises(ValueError, match="alpha"):
        inject(tiny(), "soka", alpha=16, verbose=False)
    with pytest.raises(ValueError, match="SoKA options"):
        inject(tiny(), "pissa", init="random", verbose=False)
    with pytest.raises(ValueError, match="rank 65"):
        inject(tiny(), "soka", ("wq",), rank=65, verbose=False)      # 8·8 = 64 is the Kronecker bound


def test_unknown_targets_factor_keys_and_bad_options_fail_before_the_model_changes():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = "wq wk wv wo w1 w2 w3"
    with pytest.raises(ValueError, match=rf"no nn.Linear named bogus in the model; .*named {names}"):
        inject(model, "soka", ("wq", "bogus"), verbose=False)
    with pytest.raises(ValueError, match=r"factors key\(s\) qw name no layer .*named wq wk"):
        inject(model, "soka", ("wq", "wk"), factors={"qw": (4, 16, 16, 4)}, verbose=False)
    with pytest.raises(ValueError, match=r"factors key\(s\) w1 "):      # a layer, but not a target here
        inject(model, "soka", ("wq",), factors={"w1": (8, 8, 12, 8)}, verbose=False)
    for f in ((4, 16, 16, 4.0), (8.5, 8, 8, 8), (-4, -16, -16, -4), (4, 16, 16)):
        with pytest.raises(ValueError, match="four positive ints"):
            inject(model, "soka", ("wq",), factors={"wq": f}, verbose=False)
    for method in ("lora", "pissa"):
        with pytest.raises(ValueError, match=rf"{method} rank 33 exceeds .* = 32 of layers.0.attention.wk \(32×64\)"):
            inject(model, method, ("wq", "wk"), rank=33, verbose=False)
    for alpha in (0, -2.0, float("nan")):
        with pytest.raises(ValueError, match="alpha must be > 0"):
            inject(model, "lora", alpha=alpha, verbose=False)
    for bad, match in ((dict(tau=1.5), r"tau must lie in \(0, 1\]"), (dict(r_min=5, r_max=2), "1 ≤ r_min ≤ r_max"),
                       (dict(r_max=4.0), "1 ≤ r_min ≤ r_max"), (dict(rank=True), "rank must be a positive int"),
                       (dict(rank=2, tau=1.5), r"tau must lie in \(0, 1\]")):
        with pytest.raises(ValueError, match=match):
            inject(model, "soka", ("wq",), verbose=False, **bad)
    assert unchanged(model, before) and all(p.requires_grad for p in model.parameters()) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match=r"factors key\(s\) wk "):
        compress(model, {"layers.0.attention.wq": torch.randn(64, 64)}, factors={"wk": (4, 16, 8, 4)}, verbose=False)
    with pytest.raises(ValueError, match="1 ≤ r_min ≤ r_max"):
        compress(model, {"layers.0.attention.wq": torch.randn(64, 64)}, r_min=3, r_max=2, verbose=False)
    assert unchanged(model, before) and all(p.requires_grad for p in model.parameters())


def test_inject_prints_the_table(capsys):
    inject(tiny(), "soka", ("wq", "wv"), verbose=True)
    out = capsys.readouterr().out
    assert "r_energy" in out and "r_elbow" in out and "layers.1.attention.wv" in out
    assert "LoRA/PiSSA at the same ranks would train" in out


# ----------------------------------------------------------------------------- compress

def test_compress_recovers_an_update_of_exact_kronecker_rank():
    base = tiny()
    model = tiny()
    m, n, p, q = factor_shape(64, 64)
    g = torch.Generator().manual_seed(3)
    U = torch.linalg.qr(torch.randn(m * n, 3, generator=g)).Q.T.reshape(3, m, n)
    V = torch.linalg.qr(torch.randn(p * q, 3, generator=g)).Q.T.reshape(3, p, q)
    sigma = torch.tensor([4.0, 3.5, 3.0])            # gaps 0.5, 0.5, 3.0: elbow 3; energy needs all 3
    dW = kron_sum(sigma, U, V)
    B, A = torch.randn(64, 2, generator=g), torch.randn(2, 64, generator=g)   # a LoRA pair for wo
    report = compress(model, {"layers.0.attention.wq.weight": dW}, r_max=64, tau=0.9999, verbose=False)
    assert report["layers"][0]["r"] == 3                      # chosen, not given
    assert report["layers"][0]["energy_kept"] == pytest.approx(1.0, abs=1e-6)
    compress(model, {"layers.1.attention.wo": (B, A)}, rank=64, verbose=False)   # B·A: any Kronecker rank
    wq = model.layers[0].attention.wq
    assert torch.equal(wq.weight, base.layers[0].attention.wq.weight)          # W_res = W_base
    torch.testing.assert_close(wq.sigma.detach(), sigma, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wq.delta(), dW, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.layers[1].attention.wo.delta(), B @ A, rtol=0, atol=1e-4)
    # the compressed model computes base + update
    with torch.no_grad():
        base.layers[0].attention.wq.weight += dW
        base.layers[1].attention.wo.weight += B @ A
    torch.testing.assert_close(model(TOKENS), base(TOKENS), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="not an nn.Linear"):
        compress(tiny(), {"layers.0.attention.wz": dW}, verbose=False)
    with pytest.raises(ValueError, match="update for layers.0.attention.wk"):
        compress(tiny(), {"layers.0.attention.wk": dW}, verbose=False)
    with pytest.raises(ValueError, match="two updates for layers.0.attention.wq"):
        compress(tiny(), {"layers.0.attention.wq": dW, "layers.0.attention.wq.weight": dW}, verbose=False)


# ----------------------------------------------------------------------------- Kronecker apply

SHAPES = [(2, 3, 4, 5, 3), (1, 4, 6, 2, 2), (3, 2, 1, 1, 1), (4, 4, 4, 4, 5)]   # (m, n, p, q, r)


@pytest.mark.parametrize("m,n,p,q,r", SHAPES)
def test_kron_apply_gradients_float64(m, n, p, q, r):
    # The reference forward's Kronecker part: autograd through kpsvd.kron_apply, checked numerically
    # (gradcheck) and against the dense layer x (Σ σ_k U_k ⊗ V_k)ᵀ.
    g = torch.Generator().manual_seed(m * 100 + n * 10 + r)
    x = torch.randn(2, 3, n * q, generator=g, dtype=torch.float64, requires_grad=True)
    sigma = torch.rand(r, generator=g, dtype=torch.float64, requires_grad=True)
    U = torch.randn(r, m, n, generator=g, dtype=torch.float64, requires_grad=True)
    V = torch.randn(r, p, q, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(kron_apply, (x, sigma, U, V))
    gy = torch.randn(2, 3, m * p, generator=g, dtype=torch.float64)
    dense = torch.autograd.grad((x @ kron_sum(sigma, U, V).T * gy).sum(), (x, sigma, U, V))
    y = kron_apply(x, sigma, U, V)
    torch.testing.assert_close(y, x @ kron_sum(sigma, U, V).T, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad((y * gy).sum(), (x, sigma, U, V)), dense):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("m,n,p,q,r", SHAPES)
def test_soka_layer_is_the_equation_float64(m, n, p, q, r):
    # SoKALinear's reference forward is F.linear(x, W_res) + kron_apply(x, σ, U, V): its output and
    # every gradient equal autograd through the dense weight W_res + Σ σ_k U_k ⊗ V_k.
    g = torch.Generator().manual_seed(m * 100 + n * 10 + r)
    W = torch.randn(m * p, n * q, generator=g, dtype=torch.float64)
    sigma, U, V = torch.rand(r, generator=g), torch.randn(r, m, n, generator=g), torch.randn(r, p, q, generator=g)
    layer = SoKALinear(W, sigma, U, V, subtract=False, impl="reference")
    x = torch.randn(2, 3, n * q, generator=g, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 3, m * p, generator=g, dtype=torch.float64)
    y = layer(x)
    got = torch.autograd.grad((y * gy).sum(), (x, layer.sigma, layer.U, layer.V))
    s, Uf, Vf = (t.detach().clone().requires_grad_(True) for t in (layer.sigma, layer.U, layer.V))
    ref = x @ (W + kron_sum(s, Uf, Vf)).T
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, torch.autograd.grad((ref * gy).sum(), (x, s, Uf, Vf))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_reference_in_bfloat16_and_under_autocast():
    # bf16 model, and a float32 model under CPU autocast: outputs, dx and the float32 factor gradients
    # stay within 2 % of the largest float64 value (a few bf16 roundings, eps 2⁻⁸; wrong math is O(1)).
    g = torch.Generator().manual_seed(3)
    W, x = torch.randn(20, 18, generator=g) / 5, torch.randn(7, 2, 18, generator=g)
    factors = torch.rand(3, generator=g), torch.randn(3, 4, 6, generator=g), torch.randn(3, 5, 3, generator=g)

    def run(dtype, amp=False):
        layer = SoKALinear(W.to(dtype), *factors, subtract=False, impl="reference")
        xx = x.to(dtype).detach().clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = layer(xx)
        y.float().square().sum().backward()
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert all(getattr(layer, k).grad.dtype == acc for k in layer.factor_names)
        return [y.double(), xx.grad.double()] + [getattr(layer, k).grad.double() for k in layer.factor_names]

    ref = run(torch.float64)
    for dtype, amp in ((torch.bfloat16, False), (torch.float32, True)):
        got = run(dtype, amp)
        for a, b in zip(got, ref):
            assert (a - b).abs().max() <= 0.02 * b.abs().max(), (dtype, amp)


def test_impl_is_an_argument_and_is_checked():
    # inject(impl=...) reaches every SoKA layer it builds, load_adapter(impl=...) likewise; a name
    # outside IMPLS is refused before any work. On CPU "auto" is the reference forward.
    model = tiny()
    inject(model, "soka", ("wq", "w2"), rank=2, impl="reference", verbose=False)
    assert {layer.impl for _, layer in adapter_layers(model)} == {"reference"}
    with pytest.raises(ValueError, match="impl must be one of"):
        inject(tiny(), "soka", impl="kron_v2", verbose=False)
    with pytest.raises(ValueError, match="impl must be one of"):
        load_adapter(tiny(), "nowhere.pt", impl="dense")
    x = torch.zeros(2, 64)
    assert IMPLS == ("auto", "fused", "reference")
    assert not uses_fused("auto", x) and not uses_fused("reference", x)
    assert uses_fused("fused", x) == (KronFused is not None)


def test_layers_direct_and_extra_repr():
    W = torch.randn(12, 20, dtype=torch.float64)
    sigma, U, V = kpsvd(W, 3, 4, 4, 5, rank=2)
    layer = SoKALinear(W, sigma, U, V, subtract=True)
    torch.testing.assert_close(layer.weight + kron_sum(sigma, U, V), W, rtol=0, atol=1e-13)
    assert "(m, n, p, q)=(3, 4, 4, 5), r=2" in repr(layer)
    A, B = torch.randn(2, 20, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)
    assert torch.equal(LoRALinear(W, A, B, scale=0.5).weight, W)
    torch.testing.assert_close(PiSSALinear(W, A, B).weight, W - B @ A, rtol=0, atol=1e-13)
    x = torch.randn(5, 20, dtype=torch.float64)
    torch.testing.assert_close(LoRALinear(W, A, B, scale=0.5)(x), x @ (W + 0.5 * B @ A).T)
    with pytest.raises(ValueError, match="factors"):
        SoKALinear(W, sigma, U, V[:, :2], subtract=True)
    with pytest.raises(ValueError, match="do not fit"):
        LoRALinear(W, A.T, B)


# ----------------------------------------------------------------------------- the demo model

def test_smollm2_step0_and_report(demo_gguf):
    model, tok = load_checkpoint(demo_gguf)
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        base = model(ids)
        report = inject(model, "soka", verbose=False)
        out = model(ids)
    assert len(report["layers"]) == 4 * model.args.n_layers
    shapes = {tuple(r["factors"]) for r in report["layers"]}
    assert shapes <= {(24, 24, 24, 24), (12, 24, 16, 24), (24, 12, 24, 16)}   # 576², 192×576 (GQA wk, wv)
    assert all(1 <= r["r"] <= 16 for r in report["layers"])
    torch.testing.assert_close(out, base, rtol=0, atol=1e-4 * base.abs().max().item())
    assert out[0, -1].argmax() == base[0, -1].argmax()
