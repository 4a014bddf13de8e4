"""Statistics of the reproduction study: 95 % intervals, paired tests and the verdict rule.

    from experiments import stats
    stats.acc_interval(V, "acc|qv|gsm8k|soka")            # V: seeds × problems, 0/1 -> (mean, lo, hi)
    stats.acc_difference(A, B, "diff|qv|gsm8k|soka|lora_r4", seeds_a, seeds_b)   # paired: same problems
    stats.t_interval([0.87, 0.88, 0.86]); stats.welch(a, b)   # held-out loss over seeds
    stats.verdict(lo, hi, lower_is_better=True)              # "better" / "worse" / "tie" for Δ = SoKA − other

Accuracy. A group of runs (one arm on one task, seeds s = 1 … S) is a 0/1 matrix V (S, N), its columns
the N test problems in one order (by id). Its accuracy is V's mean. The interval is a percentile
bootstrap over problems and seeds, B = 2,000 replicates, drawn as follows so that
experiments/check_tables.py can reproduce every number with its own code, on any NumPy version:

    g       = numpy.random.PCG64(seed_of(label))            seed_of: sha256(label)'s first 8 bytes, little-endian
    draw(n, shape) = g.random_raw(prod(shape)) mod n, reshaped (PCG64's raw 64-bit outputs: a fixed stream)
    P       = draw(N, (B, N))                               problems, one resample per replicate
    SA      = draw(S_A, (B, S_A))                           seeds of the first group
    SB      = draw(S_B, (B, S_B))                           seeds of the second (differences only)
    stat[b] = mean(A[SA[b]][:, P[b]])  (− mean(B[SB[b]][:, P[b]]) for a difference)
    interval: sorted(stat)[floor(0.025·B)] and sorted(stat)[ceil(0.975·B) − 1]

A difference between two arms resamples the problems once for both (paired: the same problems), the
seeds of each arm apart (a seed of SoKA and a seed of LoRA share nothing). Its two-sided bootstrap
p is min(1, 2·(k + 1)/(B + 1)), k the replicates on the far side of 0 (≤ 0 for Δ > 0, ≥ 0 else).
McNemar's exact test pairs runs of equal seed: b = problems right in A and wrong in B, c the
reverse, summed over the common seeds; p = min(1, 2·P(Bin(b + c, ½) ≤ min(b, c))). Summing over
seeds treats the seed pairs as independent draws of each problem, so this p reads optimistic; the
verdict uses the bootstrap interval.

Records without per-problem results (the qkvo study's) give only counts: count_interval and
count_difference resample seeds (draw(S, (B, S))) and give each resampled run of n problems with c
correct a count from Binomial(n, c/n), the problem bootstrap of that run alone, by inversion: the
smallest k whose CDF exceeds u, u = (raw >> 11)·2⁻⁵³ from the next B·S raw outputs. First group,
then second. Unpaired, so wider than the paired interval when two arms agree on most problems.

Held-out loss: one value per seed; t_interval is mean ± t(0.975, S − 1)·sd/√S, welch the
difference of means with Welch's interval (Welch–Satterthwaite degrees of freedom).

Verdict (Δ = SoKA − other): "better" only where the 95 % interval excludes 0 on SoKA's side
(above 0 for accuracy, below for a loss), "worse" where it excludes 0 on the other side, "tie" else.
"""
import hashlib
import math

import numpy as np

B = 2000            # bootstrap replicates
LEVEL = 0.95


def seed_of(label):
    """The bootstrap's seed for one number: the first 8 bytes of sha256(label), little-endian."""
    return int.from_bytes(hashlib.sha256(label.encode()).digest()[:8], "little")


def draw(g, n, shape):
    """Integers in [0, n) from a PCG64 bit generator's raw outputs (mod n: a bias below n / 2^64)."""
    return (g.random_raw(int(np.prod(shape))) % np.uint64(n)).astype(np.int64).reshape(shape)


def _order_bounds(stat):
    s = np.sort(stat)
    return float(s[math.floor((1 - LEVEL) / 2 * len(s))]), float(s[math.ceil((1 + LEVEL) / 2 * len(s)) - 1])


def _group_means(V, seeds, P):
    """Per replicate: the mean of V over its resampled seeds and problems, as one division of an
    integer count (so equal counts give equal numbers, and a Δ of 0 is exactly 0)."""
    per_seed = np.take(np.asarray(V, dtype=np.int8), P, axis=1).sum(2, dtype=np.int64)        # (S, B) counts
    total = per_seed[seeds, np.arange(len(seeds))[:, None]].sum(1)                            # (B,)
    return total / (seeds.shape[1] * P.shape[1])


def _draws(g, n, *sizes):
    return draw(g, n, (B, n)), [draw(g, s, (B, s)) for s in sizes]


def acc_interval(V, label):
    """(accuracy, lo, hi) of a seeds × problems 0/1 matrix, as fractions."""
    V = np.atleast_2d(np.asarray(V))
    P, (seeds,) = _draws(np.random.PCG64(seed_of(label)), V.shape[1], V.shape[0])
    return (float(V.mean()), *_order_bounds(_group_means(V, seeds, P)))


def acc_difference(A, Bm, label, seeds_a=None, seeds_b=None):
    """Δ = acc(A) − acc(B) for two seeds × problems matrices over the same problems (same order):
    {diff, lo, hi, p_boot, mcnemar_b, mcnemar_c, p_mcnemar}. seeds_a / seeds_b: the seed of each
    row, for McNemar's pairing (default 0, 1, …)."""
    A, Bm = np.atleast_2d(np.asarray(A)), np.atleast_2d(np.asarray(Bm))
    if A.shape[1] != Bm.shape[1]:
        raise ValueError(f"stats.py: {label}: {A.shape[1]} and {Bm.shape[1]} problems; a paired test needs the same")
    P, (sa, sb) = _draws(np.random.PCG64(seed_of(label)), A.shape[1], A.shape[0], Bm.shape[0])
    stat = _group_means(A, sa, P) - _group_means(Bm, sb, P)
    d = float(A.mean() - Bm.mean())
    lo, hi = _order_bounds(stat)
    far = int((stat <= 0).sum()) if d > 0 else int((stat >= 0).sum())
    pa = dict(zip(seeds_a if seeds_a is not None else range(len(A)), A))
    pb = dict(zip(seeds_b if seeds_b is not None else range(len(Bm)), Bm))
    common = sorted(set(pa) & set(pb))
    b = int(sum(((pa[s] == 1) & (pb[s] == 0)).sum() for s in common))
    c = int(sum(((pa[s] == 0) & (pb[s] == 1)).sum() for s in common))
    return dict(diff=d, lo=lo, hi=hi, p_boot=min(1.0, 2 * (far + 1) / (B + 1)),
                mcnemar_b=b, mcnemar_c=c, p_mcnemar=mcnemar_p(b, c), seeds_paired=len(common))


def mcnemar_p(b, c):
    """Exact two-sided McNemar p: 2·P(Bin(b + c, ½) ≤ min(b, c)), at most 1 (1 when b + c = 0)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def count_interval(correct, n, label):
    """(accuracy, lo, hi) from per-seed counts only (no per-problem results): seeds resampled, each
    resampled run's count drawn from Binomial(n, c/n)."""
    p = np.asarray(correct, dtype=np.float64) / n
    stat = _count_draw(np.random.PCG64(seed_of(label)), correct, n)
    return (float(p.mean()), *_order_bounds(stat))


def _binomial_cdf(n, p):
    k = np.arange(n + 1)
    if p in (0.0, 1.0):
        return (k >= (n if p == 1.0 else 0)).astype(float)
    logpmf = np.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in k]) \
        + k * math.log(p) + (n - k) * math.log1p(-p)
    return np.cumsum(np.exp(logpmf))


def _count_draw(g, correct, n):
    """Per replicate: resampled seeds, each resampled run's count drawn from Binomial(n, c/n) by
    inversion; the mean accuracy."""
    c = np.asarray(correct, dtype=np.int64)
    seeds = draw(g, len(c), (B, len(c)))
    u = (g.random_raw(B * len(c)) >> np.uint64(11)).astype(np.float64).reshape(B, len(c)) * 2.0 ** -53
    cdfs = [_binomial_cdf(n, x / n) for x in c]
    right = np.zeros((B, len(c)), dtype=np.int64)
    for s, cdf in enumerate(cdfs):
        mine = seeds == s
        right[mine] = np.minimum(np.searchsorted(cdf, u[mine], side="right"), n)
    return right.sum(1) / (len(c) * n)


def count_difference(correct_a, correct_b, n, label):
    """Unpaired Δ = acc(A) − acc(B) from counts: {diff, lo, hi}."""
    pa, pb = (np.asarray(c, dtype=np.float64) / n for c in (correct_a, correct_b))
    g = np.random.PCG64(seed_of(label))
    stat = _count_draw(g, correct_a, n) - _count_draw(g, correct_b, n)
    lo, hi = _order_bounds(stat)
    return dict(diff=float(pa.mean() - pb.mean()), lo=lo, hi=hi)


# ----------------------------------------------------------------------------- Student t

def _betacf(a, b, x):
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def _ibeta(a, b, x):
    if x <= 0 or x >= 1:
        return float(x >= 1)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def t_cdf(t, dof):
    tail = 0.5 * _ibeta(dof / 2, 0.5, dof / (dof + t * t))
    return 1 - tail if t > 0 else tail


def t_ppf(q, dof):
    """Quantile of Student's t with real dof > 0, by bisection on t_cdf (to 1e-12)."""
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, dof) < q else (lo, mid)
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


def t_interval(xs):
    """(mean, lo, hi): mean ± t(0.975, S − 1)·sd/√S over the seeds; NaN bounds for one seed."""
    x = np.asarray(xs, dtype=np.float64)
    m = float(x.mean())
    if len(x) < 2:
        return m, float("nan"), float("nan")
    h = t_ppf((1 + LEVEL) / 2, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return m, m - h, m + h


def welch(a, b):
    """Δ = mean(a) − mean(b) with Welch's 95 % interval: {diff, lo, hi, dof}."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return dict(diff=d, lo=float("nan"), hi=float("nan"), dof=float("nan"))
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return dict(diff=d, lo=d, hi=d, dof=float("inf"))
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    h = t_ppf((1 + LEVEL) / 2, dof) * se
    return dict(diff=d, lo=d - h, hi=d + h, dof=float(dof))


def verdict(lo, hi, *, lower_is_better):
    """For Δ = SoKA − other with interval [lo, hi]: "better" / "worse" where it excludes 0, else "tie"."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    if lo > 0 or hi < 0:
        return "better" if (hi < 0) == lower_is_better else "worse"
    return "tie"
