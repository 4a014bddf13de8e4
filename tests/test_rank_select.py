"""Rank selection on hand-built spectra (docs/method.md, "Rank selection")."""
import math

import pytest
import torch

from rank_select import RULES, elbow_rank, energy_rank, explain_rank, select_rank


def sq(*energies):
    """A spectrum with the given squared values (energies), so thresholds are exact in float64."""
    return torch.tensor([math.sqrt(e) for e in energies], dtype=torch.float64)


# ----------------------------------------------------------------------------- energy

def test_energy_exactly_at_the_threshold_counts():
    s = sq(9.0, 0.5, 0.25, 0.25)                  # E = 10; 0.9·E = 9 is reached at k = 1 exactly
    assert energy_rank(s, 0.9) == 1
    assert energy_rank(s, 0.95) == 2              # 9.5 ≥ 9.5
    assert energy_rank(s, 0.951) == 3
    assert energy_rank(s, 1.0) == 4


def test_energy_just_above_the_threshold_needs_one_more():
    s = sq(8.999, 0.601, 0.4)
    assert energy_rank(s, 0.9) == 2


def test_energy_with_float32_spectrum_is_compared_in_float64():
    s = torch.tensor([3.0, 1.0], dtype=torch.float32)   # energies 9 and 1
    assert energy_rank(s, 0.9) == 1


def test_truncated_spectrum_with_total():
    s = sq(4.0, 2.0, 1.0)                          # top 3 values of a matrix with ‖W‖² = 10
    assert energy_rank(s, 0.7, total=10.0) == 3   # 7 ≥ 7
    assert energy_rank(s, 0.5) == 1               # without total, E = 7 and 4 ≥ 3.5
    assert energy_rank(s, 0.5, total=10.0) == 2
    assert energy_rank(s, 0.9, total=10.0) == 4   # never reached: K + 1
    choice = explain_rank(s, tau=0.9, total=10.0, r_max=16)
    assert choice.r_energy == 4 and choice.n_values == 3
    assert choice.energy_kept == pytest.approx(4.0 / 10.0)   # r = r_elbow = 1


def test_total_smaller_than_spectrum_is_an_error():
    with pytest.raises(ValueError, match="total energy"):
        energy_rank(sq(4.0, 2.0), 0.9, total=5.0)


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.0001, 2.0, "0.9", None, True])
def test_tau_outside_unit_interval(tau):
    with pytest.raises(ValueError, match="tau"):
        energy_rank(sq(1.0), tau)
    with pytest.raises(ValueError, match="tau"):
        select_rank(sq(1.0), tau=tau)


# ----------------------------------------------------------------------------- elbow

def test_elbow_picks_the_largest_gap():
    assert elbow_rank(torch.tensor([10.0, 9.0, 3.0, 2.5, 2.4])) == 2   # gaps 1, 6, 0.5, 0.1


def test_elbow_ties_take_the_first():
    assert elbow_rank(torch.tensor([4.0, 3.0, 2.0, 1.0])) == 1
    assert elbow_rank(torch.tensor([10.0, 9.0, 5.0, 4.0, 0.0])) == 2   # gaps 1, 4, 1, 4


def test_flat_spectrum():
    s = torch.ones(6)
    assert elbow_rank(s) == 1                    # every gap is 0: the first
    assert energy_rank(s, 0.5) == 3
    assert select_rank(s, tau=0.5) == 1


def test_single_value():
    s = torch.tensor([2.0])
    assert elbow_rank(s) == 1 and energy_rank(s, 0.9) == 1 and select_rank(s) == 1


def test_zero_tail():
    assert elbow_rank(torch.tensor([5.0, 5.0, 5.0, 0.0, 0.0])) == 3


def test_zero_spectrum():
    """A zero weight: every rule gives 1 and nothing is lost (explain_rank once raised here)."""
    c = explain_rank(torch.zeros(4), r_min=2)
    assert (c.r_energy, c.r_elbow, c.r, c.energy_kept) == (1, 1, 2, 1.0)


# ----------------------------------------------------------------------------- combined rule

def test_combined_is_min_of_the_two():
    s = torch.tensor([10.0, 9.5, 9.0, 1.0, 0.9, 0.8])   # elbow 3, energy at 0.9 is 3
    assert elbow_rank(s) == 3 and energy_rank(s, 0.9) == 3
    assert select_rank(s, tau=0.9) == 3
    assert select_rank(s, tau=0.5) == energy_rank(s, 0.5) == 2


def test_clipping_to_r_min_and_r_max():
    s = torch.tensor([100.0] + [1.0] * 30)                 # elbow 1
    assert select_rank(s) == 1
    assert select_rank(s, r_min=4) == 4
    ramp = torch.linspace(30, 1, 30)                       # flat gaps → elbow 1; energy needs many
    assert select_rank(ramp, r_min=1, r_max=16) == 1
    heavy = torch.cat([torch.linspace(30, 10, 25), torch.tensor([0.0])])   # largest gap last: elbow 25
    assert elbow_rank(heavy) == 25
    assert select_rank(heavy, tau=1.0, r_max=16) == 16
    assert select_rank(heavy, tau=1.0, r_max=8) == 8
    c = explain_rank(heavy, tau=1.0, r_min=2, r_max=8)
    assert (c.r, c.r_elbow, c.r_min, c.r_max) == (8, 25, 2, 8)


def test_explain_rank_records_why():
    s = sq(50.0, 30.0, 10.0, 5.0, 5.0)
    c = explain_rank(s, tau=0.8)
    assert c.r_energy == energy_rank(s, 0.8) == 2
    assert c.r_elbow == elbow_rank(s)
    assert c.r == select_rank(s, tau=0.8)
    assert c.energy_kept == pytest.approx(sum([50.0, 30.0, 10.0, 5.0, 5.0][:c.r]) / 100.0)
    assert set(c.as_dict()) >= {"r", "r_energy", "r_elbow", "energy_kept"}


# ----------------------------------------------------------------------------- one rule alone

def test_rule_takes_one_candidate_alone():
    """rule "energy" / "elbow" keep that candidate (clipped); "both" the smaller. The record names the rule."""
    s = torch.tensor([10.0, 9.5, 9.0, 3.0, 2.9, 2.8])   # elbow 3; energy 2 at τ = 0.5, 5 at τ = 0.95
    assert (elbow_rank(s), energy_rank(s, 0.5), energy_rank(s, 0.95)) == (3, 2, 5)
    assert [select_rank(s, tau=0.5, rule=r) for r in RULES] == [2, 2, 3]
    assert [select_rank(s, tau=0.95, rule=r) for r in RULES] == [3, 5, 3]
    assert select_rank(s, tau=0.95, rule="energy", r_max=4) == 4          # clipped as the rule is
    c = explain_rank(s, tau=0.95, rule="energy")
    assert (c.r, c.r_energy, c.r_elbow, c.rule) == (5, 5, 3, "energy")
    assert c.energy_kept == pytest.approx(float((s[:5].double() ** 2).sum() / (s.double() ** 2).sum()))
    assert explain_rank(s).rule == "both"


def test_energy_alone_on_a_flat_spectrum_is_set_by_tau():
    """On a flat spectrum (SmolLM2's are nearly flat) the elbow is 1 whatever τ, and the energy rule
    alone grows with τ: rule "energy" is the only one of the three that τ moves."""
    s = torch.linspace(10, 9, 40)
    assert {select_rank(s, tau=t, rule="elbow") for t in (0.05, 0.5, 0.9)} == {elbow_rank(s)}
    assert [select_rank(s, tau=t, rule="energy", r_max=64) for t in (0.05, 0.5, 0.9)] == \
        [energy_rank(s, t) for t in (0.05, 0.5, 0.9)] == [2, 19, 36]
    assert [select_rank(s, tau=t) for t in (0.05, 0.5, 0.9)] == [1, 1, 1]


def test_energy_alone_with_a_truncated_spectrum_stays_within_r_max():
    s = sq(4.0, 2.0, 1.0)                          # top 3 of ‖W‖² = 10: τ = 0.9 is never reached
    c = explain_rank(s, tau=0.9, total=10.0, r_max=2, rule="energy")
    assert (c.r_energy, c.r) == (4, 2)


@pytest.mark.parametrize("rule", ["min", "", None, "Energy"])
def test_unknown_rule(rule):
    with pytest.raises(ValueError, match="rule must be one of"):
        select_rank(sq(1.0), rule=rule)


# ----------------------------------------------------------------------------- bad input

def test_bad_spectra():
    with pytest.raises(ValueError, match="^rank_select.py: .*descending"):
        select_rank(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="≥ 0"):
        select_rank(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        select_rank(torch.tensor([]))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        select_rank(torch.ones(2, 2))
    with pytest.raises(ValueError, match="NaN"):
        select_rank(torch.tensor([float("nan"), 1.0]))
    with pytest.raises(ValueError, match="r_min"):
        select_rank(torch.ones(3), r_min=5, r_max=4)
    with pytest.raises(ValueError, match="r_min"):
        select_rank(torch.ones(3), r_min=0)


def test_matches_kpsvd_spectrum_of_a_planted_rank():
    """End to end with kpsvd: three orthonormal Kronecker terms plus small noise select rank 3."""
    from kpsvd import kpsvd, unrearrange
    g = torch.Generator().manual_seed(0)
    Qu, _ = torch.linalg.qr(torch.randn(64, 3, generator=g, dtype=torch.float64))
    Qv, _ = torch.linalg.qr(torch.randn(64, 3, generator=g, dtype=torch.float64))
    W = unrearrange(Qu @ torch.diag(torch.tensor([10.0, 9.5, 9.0], dtype=torch.float64)) @ Qv.T, 8, 8, 8, 8)
    W = W + 1e-3 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    sigma, _, _ = kpsvd(W, 8, 8, 8, 8)
    assert elbow_rank(sigma) == 3
    assert select_rank(sigma, tau=0.999) == 3


# ----------------------------------------------------------------------------- through inject and train.py

def test_inject_and_train_pass_the_rule_on():
    """adapters.inject(rule=...) picks each layer's rank by that rule from the layer's own spectrum,
    records it in the report's options, and refuses it for LoRA / PiSSA; train.py's --rank-rule
    parses to it (default "both")."""
    import copy
    from kpsvd import factor_shape, kpsvd
    from model import ModelArgs, Transformer
    from soka import adapters
    import train
    torch.manual_seed(0)
    base = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=32))
    tau = 0.3                                     # random weights: flat spectra, energy ranks of a few terms
    rs = {}
    for rule in RULES:
        report = adapters.inject(copy.deepcopy(base), "soka", ("wq", "wv"), tau=tau, rule=rule, verbose=False)
        assert report["options"]["rule"] == rule
        rs[rule] = [row["r"] for row in report["layers"]]
        for row in report["layers"]:
            W = dict(base.named_modules())[row["name"]].weight.detach()
            sigma, _, _ = kpsvd(W.float(), *factor_shape(*W.shape))
            assert row["r"] == select_rank(sigma, tau=tau, rule=rule)
            assert (row["r_energy"], row["r_elbow"]) == (energy_rank(sigma, tau), elbow_rank(sigma))
    assert rs["both"] == [min(a, b) for a, b in zip(rs["energy"], rs["elbow"])] and rs["energy"] != rs["elbow"]
    with pytest.raises(ValueError, match="rule must be one of"):
        adapters.inject(copy.deepcopy(base), "lora", ("wq",), rank=2, rule="energy", verbose=False)
    with pytest.raises(ValueError, match="rule must be one of"):
        adapters.inject(copy.deepcopy(base), "soka", ("wq",), rule="largest", verbose=False)
    assert train.make_parser().parse_args([]).rank_rule == "both"
    assert train.make_parser().parse_args(["--rank-rule", "energy"]).rank_rule == "energy"
    with pytest.raises(SystemExit):
        train.make_parser().parse_args(["--rank-rule", "min"])
