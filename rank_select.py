"""Choosing the Kronecker rank of each layer from its spectrum σ_1 ≥ σ_2 ≥ … ≥ σ_K.

Two rules and their combination, as docs/method.md states them (the paper leaves the details open):

    energy:  r_energy = min { k : Σ_{i≤k} σ_i² ≥ τ·E },  E = ‖W‖_F²  (K + 1 if no k ≤ K reaches it)
    elbow:   r_elbow  = first i with the largest gap δ_i = σ_i − σ_{i+1}, i = 1 … K−1  (1 if K = 1)
    rank:    r = clip(min(r_energy, r_elbow), r_min, r_max)     rule "both" (the method's)

`rule` picks one of the candidates instead, to tell the two apart: "energy" r = clip(r_energy),
"elbow" r = clip(r_elbow). Both candidates are still computed and recorded.

E is the whole energy of W. When only the top K values were computed (randomized KPSVD), pass
E as `total`: Σ_{i≤K} σ_i² < E then, and the energy rule must not pretend the tail is empty.
Energies are compared in float64, with a relative slack of 1e-12 so that a spectrum built to sit
exactly on the threshold is not pushed past it by rounding.

On heavy-tailed spectra (most pretrained weights) the largest gap is often the first one, so
r_elbow = 1 decides; `explain_rank` keeps both candidates so the per-layer log can show that.
"""
import numbers
from dataclasses import dataclass, asdict

import torch

# The defaults, the one place they are written: inject, soka_factors and train.py use these.
TAU = 0.9        # energy threshold τ
R_MIN = 1        # rank bounds per layer
R_MAX = 16
RULES = ("both", "energy", "elbow")   # which candidates the rank takes: min of both, or one alone
_SLACK = 1e-12   # relative tolerance on the energy comparison, see above
# A given total may fall short of the values' own Σσ² by rounding: a float32 SVD's σ² summed against a
# ‖W‖² summed in float64 differ by ~1e-7 relative. Short by more than this, the total is wrong.
_TOTAL_ROUNDING = 1e-6


def _as_spectrum(sigma):
    s = torch.as_tensor(sigma).detach().to("cpu", torch.float64)
    if s.ndim != 1 or s.numel() == 0:
        raise ValueError(f"rank_select.py: expected a non-empty 1-D spectrum, got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all():
        raise ValueError("rank_select.py: spectrum has NaN or Inf values")
    if (s < 0).any():
        raise ValueError(f"rank_select.py: singular values must be ≥ 0, got min {s.min().item():.3g}")
    if (s[1:] > s[:-1]).any():
        raise ValueError("rank_select.py: singular values must be sorted in descending order")
    return s


def _total_energy(s, total):
    captured = float((s * s).sum())
    if total is None:
        return captured
    total = float(total)
    if not total > 0 or total < captured * (1 - _TOTAL_ROUNDING):
        raise ValueError(f"rank_select.py: total energy {total:.6g} must be positive and at least the "
                         f"spectrum's own energy Σσ² = {captured:.6g}")
    return total


def _check_rule(rule):
    if rule not in RULES:
        raise ValueError(f"rank_select.py: rule must be one of {RULES}, got {rule!r}")


def _check_tau(tau):
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0 < tau <= 1:
        raise ValueError(f"rank_select.py: energy threshold tau must lie in (0, 1], got {tau!r}")


def energy_rank(sigma, tau, total=None):
    """Smallest k with Σ_{i≤k} σ_i² ≥ τ·total; K + 1 if the given K values never reach it."""
    _check_tau(tau)
    s = _as_spectrum(sigma)
    E = _total_energy(s, total)
    cum = torch.cumsum(s * s, 0)                                       # float64
    reached = (cum >= tau * E * (1 - _SLACK)).nonzero()
    return int(reached[0]) + 1 if len(reached) else s.numel() + 1


def elbow_rank(sigma):
    """First i (1-based) with the largest gap σ_i − σ_{i+1}; 1 for a single value."""
    s = _as_spectrum(sigma)
    if s.numel() == 1:
        return 1
    gaps = s[:-1] - s[1:]
    return int(torch.nonzero(gaps == gaps.max())[0]) + 1             # ties: the first


@dataclass(frozen=True)
class RankChoice:
    """Why a layer got its rank: both candidates, the clipped result, and the energy it keeps."""
    r: int
    r_energy: int
    r_elbow: int
    energy_kept: float     # Σ_{i≤r} σ_i² / E, in [0, 1]
    tau: float
    r_min: int
    r_max: int
    n_values: int          # K, how many singular values the choice saw
    rule: str = "both"     # RULES: which candidates r was taken from

    def as_dict(self):
        return asdict(self)


def check_rule(tau=TAU, r_min=R_MIN, r_max=R_MAX, rule="both"):
    """Raise ValueError unless 0 < τ ≤ 1, r_min and r_max are integers with 1 ≤ r_min ≤ r_max, and
    rule is one of RULES."""
    _check_tau(tau)
    _check_rule(rule)
    if not all(isinstance(r, int) and not isinstance(r, bool) for r in (r_min, r_max)) or not 1 <= r_min <= r_max:
        raise ValueError(f"rank_select.py: need integers 1 ≤ r_min ≤ r_max, got r_min={r_min!r}, r_max={r_max!r}")


def explain_rank(sigma, tau=TAU, r_min=R_MIN, r_max=R_MAX, total=None, rule="both"):
    """select_rank with its reasons: a RankChoice."""
    check_rule(tau, r_min, r_max, rule)
    s = _as_spectrum(sigma)
    E = _total_energy(s, total)
    r_e, r_b = energy_rank(s, tau, total=total), elbow_rank(s)
    r = min(max({"both": min(r_e, r_b), "energy": r_e, "elbow": r_b}[rule], r_min), r_max)
    kept = float((s[:r] ** 2).sum()) / E if E > 0 else 1.0         # a zero spectrum loses nothing
    return RankChoice(r=r, r_energy=r_e, r_elbow=r_b, energy_kept=kept, tau=float(tau),
                      r_min=r_min, r_max=r_max, n_values=s.numel(), rule=rule)


def select_rank(sigma, tau=TAU, r_min=R_MIN, r_max=R_MAX, total=None, rule="both"):
    """r = clip(min(r_energy, r_elbow), r_min, r_max) (rule "both"; "energy" or "elbow" take that
    candidate alone). With a truncated spectrum, give at least r_max + 1 values and the full energy
    as `total`."""
    return explain_rank(sigma, tau=tau, r_min=r_min, r_max=r_max, total=total, rule=rule).r
