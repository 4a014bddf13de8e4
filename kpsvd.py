"""Kronecker-product SVD (KPSVD): the math under SoKA, in one file that imports only torch.

A linear layer computes y = x Wᵀ with W of shape (d_out, d_in) = (m·p, n·q). One Kronecker term
has U of shape (m, n) and V of shape (p, q), and follows torch.kron:

    (U ⊗ V)[a·p + b, i·q + j] = U[a, i] · V[b, j]                                        (1)

The Van Loan–Pitsianis rearrangement R moves the entries of W into an (m·n, p·q) matrix

    R(W)[a·n + i, b·q + j] = W[a·p + b, i·q + j]                                          (2)

so that a Kronecker product becomes an outer product of row-major vectorizations,

    R(U ⊗ V) = vec(U) vec(V)ᵀ                                                              (3)

R only moves entries, so it is linear and ‖R(W)‖_F = ‖W‖_F. Hence the SVD
R(W) = Σ_k σ_k u_k v_kᵀ gives W = Σ_k σ_k U_k ⊗ V_k with U_k = u_k.reshape(m, n),
V_k = v_k.reshape(p, q), orthonormal factors, and (Eckart–Young applied to R(W)) the first r terms
are the best Frobenius approximation of W by r Kronecker products, with squared error Σ_{k>r} σ_k².
The Kronecker rank is at most min(m·n, p·q).

Applying a term never needs the (d_out, d_in) matrix: with row-major vec and X = x.reshape(n, q),

    (U ⊗ V) vec(X) = vec(U X Vᵀ)                                                           (4)

which costs n·p·(q + m) multiply-adds per token instead of d_out·d_in.

Reference: C. Van Loan and N. Pitsianis, "Approximation with Kronecker Products", 1993.
"""
import math
import warnings

import torch


# -----------------------------------------------------------------------------
# input checks: every public function says what is wrong, in its own words

def _check_weight(W, m, n, p, q):
    if not isinstance(W, torch.Tensor):
        raise ValueError(f"kpsvd.py: expected a torch.Tensor weight, got {type(W).__name__}")
    if W.ndim != 2:
        raise ValueError(f"kpsvd.py: expected a 2-D weight (d_out, d_in), got shape {tuple(W.shape)}")
    for name, v in (("m", m), ("n", n), ("p", p), ("q", q)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"kpsvd.py: factor size {name} must be a positive int, got {v!r}")
    d_out, d_in = W.shape
    if m * p != d_out:
        raise ValueError(f"kpsvd.py: d_out = {d_out} does not factor as m·p = {m}·{p} = {m * p}")
    if n * q != d_in:
        raise ValueError(f"kpsvd.py: d_in = {d_in} does not factor as n·q = {n}·{q} = {n * q}")


def _check_finite(W):
    if not torch.isfinite(W).all():
        n_nan, n_inf = int(torch.isnan(W).sum()), int(torch.isinf(W).sum())
        raise ValueError(f"kpsvd.py: weight has {n_nan} NaN and {n_inf} Inf entries; KPSVD needs finite values")


def work_dtype(dtype):
    """The dtype KPSVD (and the adapters' merges) compute in: float64 for float64, else float32
    (there is no half-precision SVD)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# -----------------------------------------------------------------------------
# the rearrangement, eq. (2), and its inverse

def rearrange(W, m, n, p, q):
    """(m·p, n·q) → (m·n, p·q) by eq. (2). A pure permutation of entries (a view where possible)."""
    _check_weight(W, m, n, p, q)
    # W[a·p + b, i·q + j] viewed as (a, b, i, j) → (a, i, b, j)
    return W.reshape(m, p, n, q).permute(0, 2, 1, 3).reshape(m * n, p * q)


def unrearrange(R, m, n, p, q):
    """(m·n, p·q) → (m·p, n·q): the exact inverse of rearrange."""
    if not isinstance(R, torch.Tensor) or R.ndim != 2 or tuple(R.shape) != (m * n, p * q):
        shape = tuple(R.shape) if isinstance(R, torch.Tensor) else type(R).__name__
        raise ValueError(f"kpsvd.py: expected a rearranged matrix of shape (m·n, p·q) = ({m * n}, {p * q}), "
                         f"got {shape}")
    return R.reshape(m, n, p, q).permute(0, 2, 1, 3).reshape(m * p, n * q)


# -----------------------------------------------------------------------------
# the default factor shapes

def _balanced_divisor(d):
    """The divisor of d closest to √d from below, i.e. the largest m with m ≤ d / m."""
    return max(k for k in range(1, math.isqrt(d) + 1) if d % k == 0)


def factor_shape(d_out, d_in):
    """(m, n, p, q) with d_out = m·p, d_in = n·q, each split as close to square as the divisors allow.
    The order is the factors' shapes, U (m, n) and V (p, q): each takes a part of d_out and a part of d_in.

    LLaMA-2-7B: 4096 → 64 × 64, 11008 → 86 × 128. SmolLM2-135M: 576 → 24 × 24, 192 → 12 × 16,
    1536 → 32 × 48. A prime dimension can only split as 1 × d, which makes U a vector: warned.
    """
    for name, d in (("d_out", d_out), ("d_in", d_in)):
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise ValueError(f"kpsvd.py: {name} must be a positive int, got {d!r}")
    m, n = _balanced_divisor(d_out), _balanced_divisor(d_in)
    for name, d, f in (("d_out", d_out, m), ("d_in", d_in, n)):
        if f == 1 and d > 1:                               # d prime: no divisor in 2..√d
            warnings.warn(f"{name} = {d} is prime: the only split is 1 × {d}, so the Kronecker "
                          f"factors degenerate; pass m, n, p, q explicitly to choose another shape")
    return m, n, d_out // m, d_in // n


# -----------------------------------------------------------------------------
# KPSVD

def _fix_signs(u, v):
    """Make each singular pair unique up to ties: the largest-magnitude entry of u_k is positive."""
    idx = u.abs().argmax(dim=0, keepdim=True)               # (1, r)
    s = torch.sign(torch.gather(u, 0, idx))
    s[s == 0] = 1
    return u * s, v * s


def _randomized_svd(R, k, *, oversample, n_iter, seed):
    """Top-k SVD of R by a seeded range finder with power iterations (Halko, Martinsson, Tropp 2011,
    Alg. 4.4). Its error depends on how fast the spectrum decays past k; n_iter subspace iterations
    sharpen that decay to (σ_j / σ_k)^(2·n_iter + 1)."""
    ell = min(k + oversample, min(R.shape))
    gen = torch.Generator(device=R.device).manual_seed(seed)
    omega = torch.randn(R.shape[1], ell, generator=gen, device=R.device, dtype=R.dtype)
    Q = torch.linalg.qr(R @ omega).Q                         # (rows, ell)
    for _ in range(n_iter):
        Q = torch.linalg.qr(R.T @ Q).Q                       # re-orthonormalize each half step:
        Q = torch.linalg.qr(R @ Q).Q                         # plain powers lose the small directions
    Ub, S, Vh = torch.linalg.svd(Q.T @ R, full_matrices=False)   # (ell, cols): small
    return Q @ Ub[:, :k], S[:k], Vh[:k]


def kpsvd(W, m, n, p, q, rank=None, *, randomized=False, oversample=16, n_iter=4, seed=0):
    """W ≈ Σ_k sigma[k] · U[k] ⊗ V[k]: the SVD of R(W), eq. (2)-(3), reshaped into factors.

    Returns sigma (r,) in descending order, U (r, m, n), V (r, p, q), each ‖U[k]‖_F = ‖V[k]‖_F = 1
    and orthonormal across k. rank=None keeps all min(m·n, p·q) terms. Computed in float64 for
    float64 input and in float32 otherwise (bfloat16 and float16 too: there is no half-precision
    SVD), on W's device. Signs are fixed so that the largest-magnitude entry of each U[k] is positive.

    randomized=True (needs rank) is the opt-in path for large layers: a seeded randomized SVD
    that only computes the top `rank` terms. On LLaMA-2-7B shapes with a power-law spectrum its
    reconstruction error is within 1e-3 (relative) of the exact top-r error for r ≤ 16 at the
    defaults (benchmarks/kpsvd_init.py measures this); it is deterministic for a fixed seed on
    one device.
    """
    _check_weight(W, m, n, p, q)
    _check_finite(W)
    full_rank = min(m * n, p * q)
    if rank is not None:
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"kpsvd.py: rank must be a positive int or None, got {rank!r}")
        if rank > full_rank:
            raise ValueError(f"kpsvd.py: rank {rank} is larger than the Kronecker rank bound "
                             f"min(m·n, p·q) = min({m * n}, {p * q}) = {full_rank}")
    R = rearrange(W.to(work_dtype(W.dtype)), m, n, p, q)     # (m·n, p·q)
    if randomized:
        if rank is None:
            raise ValueError("kpsvd.py: randomized KPSVD computes only the top terms: give rank")
        if not (isinstance(oversample, int) and oversample >= 0 and isinstance(n_iter, int) and n_iter >= 0):
            raise ValueError(f"kpsvd.py: oversample and n_iter must be ints ≥ 0, got {oversample!r}, {n_iter!r}")
        u, s, vh = _randomized_svd(R, rank, oversample=oversample, n_iter=n_iter, seed=seed)
    else:
        u, s, vh = torch.linalg.svd(R, full_matrices=False)  # (m·n, K), (K,), (K, p·q)
        r = full_rank if rank is None else rank
        u, s, vh = u[:, :r], s[:r], vh[:r]
    u, v = _fix_signs(u, vh.T)
    r = s.shape[0]
    return s.contiguous(), u.T.reshape(r, m, n).contiguous(), v.T.reshape(r, p, q).contiguous()


# -----------------------------------------------------------------------------
# using the factors

def _check_factors(sigma, U, V):
    if sigma.ndim != 1 or U.ndim != 3 or V.ndim != 3 or not (sigma.shape[0] == U.shape[0] == V.shape[0]):
        raise ValueError(f"kpsvd.py: expected sigma (r,), U (r, m, n), V (r, p, q) with one r, got "
                         f"{tuple(sigma.shape)}, {tuple(U.shape)}, {tuple(V.shape)}")


def kron_sum(sigma, U, V):
    """Σ_k sigma[k] · U[k] ⊗ V[k] as a dense (m·p, n·q) matrix, by eq. (1)."""
    _check_factors(sigma, U, V)
    r, m, n = U.shape
    _, p, q = V.shape
    T = torch.einsum("k,kai,kbj->abij", sigma, U, V)          # (m, p, n, q): rows (a, b), cols (i, j)
    return T.reshape(m * p, n * q)


def kron_apply(x, sigma, U, V):
    """x (..., n·q) → (..., m·p), equal to x @ kron_sum(sigma, U, V).T, by eq. (4), batched over
    tokens and terms: y = vec(Σ_k sigma[k] U[k] X V[k]ᵀ) with X = x.reshape(n, q). Costs
    r·n·p·(q + m) multiply-adds per token; the dense update would cost m·p·n·q. The same as
    torch.einsum("k,kai,Nij,kbj->Nab", sigma, U, X, V), as two matrix products instead.
    """
    _check_factors(sigma, U, V)
    r, m, n = U.shape
    _, p, q = V.shape
    if x.shape[-1] != n * q:
        raise ValueError(f"kpsvd.py: x has {x.shape[-1]} features, the factors expect n·q = {n}·{q} = {n * q}")
    lead = x.shape[:-1]
    X = x.reshape(-1, n, q)                                   # (N, n, q)
    N = X.shape[0]
    Z = X @ V.reshape(r * p, q).T                             # (N, n, r·p): Z[., i, k·p+b] = (X V_kᵀ)[i, b]
    Z = Z.reshape(N, n, r, p).transpose(1, 2).reshape(N, r * n, p)      # (N, r·n, p), rows k·n + i
    Us = (sigma[:, None, None] * U).transpose(0, 1).reshape(m, r * n)   # (m, r·n): [σ_1U_1 … σ_rU_r]
    Y = Us @ Z                                                # (N, m, p) = Σ_k σ_k U_k X V_kᵀ
    return Y.reshape(*lead, m * p)
