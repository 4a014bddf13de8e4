"""Variants of the fused Kronecker kernels that were measured and not kept (soka/kron_fused.py).

    python benchmarks/kron_fused_variants.py --out benchmarks/results/kron_fused_variants.json   # a GPU
    TRITON_INTERPRET=1 python benchmarks/kron_fused_variants.py    # CPU: small shapes, correctness only

Each variant is checked against the module's kernels (max |difference|, `err`) and timed next to them
as a CUDA graph of 20 calls (benchmarks/kron_fused_configs.py's graph_time), bf16, 4,096 tokens, at
LLaMA-2-7B's three factor shapes, r = 1, 4, 8:

- apply kernel, `prefetchT`: T tokens a program, the next token's X loaded while this one computes;
- apply kernel, `stackedT`: T tokens a program as one taller product, [X_t] (T·n, q) @ V_kᵀ, the
  intermediate permuted in registers for the second product;
- apply kernel, `split`: a padded output side of 86 computed as blocks of 64 + 32 instead of 128;
- gradient kernel, `splitP`: the programs for dUs_k and for dV_k apart (2·r·chunks programs);
- gradient kernel at r = 1: a launch grid (programs, warps, stages).

The numbers and what was kept: docs/performance.md ("Kernel variants not kept").
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kron_fused_configs import graph_time                                  # noqa: E402  (this folder)
from soka import kron_fused as kf                                          # noqa: E402

@triton.jit(do_not_specialize=["n_tokens", "R"])
def sum_prefetch(out_ptr, x_ptr, a_ptr, b_ptr, n_tokens, R, TOKENS: tl.constexpr,
                 M: tl.constexpr, N: tl.constexpr, P: tl.constexpr, Q: tl.constexpr,
                 A_T: tl.constexpr, SA: tl.constexpr, LDA: tl.constexpr,
                 B_T: tl.constexpr, SB: tl.constexpr, LDB: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr):
    i_m, i_n, i_p, i_q = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BP), tl.arange(0, BQ)
    a_off, a_msk = kf._factor_tile(i_m, i_n, M, N, A_T, LDA)
    x_off = i_n[:, None] * Q + i_q[None, :]
    x_msk = (i_n[:, None] < N) & (i_q[None, :] < Q)
    b_off, b_msk = kf._factor_tile(i_p, i_q, P, Q, B_T, LDB)
    o_off = i_p[:, None] + i_m[None, :] * P
    o_msk = (i_p[:, None] < P) & (i_m[None, :] < M)
    t0 = tl.program_id(0).to(tl.int64) * TOKENS
    X = tl.load(x_ptr + t0 * (N * Q) + x_off, mask=x_msk & (t0 < n_tokens), other=0.0)
    for i in range(TOKENS):
        t = t0 + i
        Xn = tl.load(x_ptr + (t + 1) * (N * Q) + x_off, mask=x_msk & (t + 1 < n_tokens) & (i + 1 < TOKENS), other=0.0)
        acc = tl.zeros((BP, BM), dtype=tl.float32)
        for k in range(R):
            A = tl.load(a_ptr + k * SA + a_off, mask=a_msk, other=0.0)
            B = tl.load(b_ptr + k * SB + b_off, mask=b_msk, other=0.0)
            Zt = tl.dot(B, tl.trans(X), out_dtype=tl.float32)
            acc = tl.dot(Zt.to(X.dtype), tl.trans(A), acc, out_dtype=tl.float32)
        tl.store(out_ptr + t * (M * P) + o_off, acc.to(out_ptr.dtype.element_ty), mask=o_msk & (t < n_tokens))
        X = Xn


@triton.jit(do_not_specialize=["n_tokens", "R"])
def sum_stacked(out_ptr, x_ptr, a_ptr, b_ptr, n_tokens, R, T: tl.constexpr,
                M: tl.constexpr, N: tl.constexpr, P: tl.constexpr, Q: tl.constexpr,
                A_T: tl.constexpr, SA: tl.constexpr, LDA: tl.constexpr,
                B_T: tl.constexpr, SB: tl.constexpr, LDB: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr):
    # T tokens at once: Z = [X_t] (T·BN, BQ) @ B_kᵀ -> (T·BN, BP), permuted to [Z_tᵀ] (T·BP, BN), @ A_kᵀ
    i_t = tl.arange(0, T)
    i_m, i_n, i_p, i_q = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BP), tl.arange(0, BQ)
    a_off, a_msk = kf._factor_tile(i_m, i_n, M, N, A_T, LDA)
    b_off, b_msk = kf._factor_tile(i_p, i_q, P, Q, B_T, LDB)
    t = tl.program_id(0).to(tl.int64) * T + i_t                                  # (T,)
    live = t < n_tokens
    x_off = t[:, None, None] * (N * Q) + i_n[None, :, None] * Q + i_q[None, None, :]
    x_msk = live[:, None, None] & (i_n[None, :, None] < N) & (i_q[None, None, :] < Q)
    X = tl.reshape(tl.load(x_ptr + x_off, mask=x_msk, other=0.0), (T * BN, BQ))
    acc = tl.zeros((T * BP, BM), dtype=tl.float32)
    for k in range(R):
        A = tl.load(a_ptr + k * SA + a_off, mask=a_msk, other=0.0)
        B = tl.load(b_ptr + k * SB + b_off, mask=b_msk, other=0.0)
        Z = tl.dot(X, tl.trans(B), out_dtype=tl.float32)                        # (T·BN, BP)
        Zt = tl.reshape(tl.permute(tl.reshape(Z.to(X.dtype), (T, BN, BP)), (0, 2, 1)), (T * BP, BN))
        acc = tl.dot(Zt, tl.trans(A), acc, out_dtype=tl.float32)                # (T·BP, BM)
    o_off = t[:, None, None] * (M * P) + i_p[None, :, None] + i_m[None, None, :] * P
    o_msk = live[:, None, None] & (i_p[None, :, None] < P) & (i_m[None, None, :] < M)
    tl.store(out_ptr + o_off, tl.reshape(acc, (T, BP, BM)).to(out_ptr.dtype.element_ty), mask=o_msk)


@triton.jit(do_not_specialize=["n_tokens", "CHUNK"])
def grad_split(part_ptr, x_ptr, g_ptr, us_ptr, v_ptr, sigma_ptr, u_ptr, n_tokens, CHUNK,
               M: tl.constexpr, N: tl.constexpr, P: tl.constexpr, Q: tl.constexpr,
               US_T: tl.constexpr, SU: tl.constexpr, LDU: tl.constexpr,
               V_T: tl.constexpr, SV: tl.constexpr, LDV: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr):
    # program (2k + half, c): half 0 sums dUs_k (and writes dσ_k, dU_k), half 1 sums dV_k
    j, c = tl.program_id(0), tl.program_id(1)
    k = j // 2
    R = tl.num_programs(0) // 2
    i_m, i_n, i_p, i_q = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BP), tl.arange(0, BQ)
    mn_off = i_m[:, None] * N + i_n[None, :]
    mn_msk = (i_m[:, None] < M) & (i_n[None, :] < N)
    pq_off = i_p[:, None] * Q + i_q[None, :]
    pq_msk = (i_p[:, None] < P) & (i_q[None, :] < Q)
    x_off = i_n[:, None] * Q + i_q[None, :]
    x_msk = (i_n[:, None] < N) & (i_q[None, :] < Q)
    g_off = i_m[:, None] * P + i_p[None, :]
    g_msk = (i_m[:, None] < M) & (i_p[None, :] < P)
    row = part_ptr + c.to(tl.int64) * (R * (1 + M * N + P * Q))
    if j % 2 == 0:
        v_off, _ = kf._factor_tile(i_p, i_q, P, Q, V_T, LDV)
        V = tl.load(v_ptr + k * SV + v_off, mask=pq_msk, other=0.0)
        dUs = tl.zeros((BM, BN), dtype=tl.float32)
        for i in range(CHUNK):
            t = c.to(tl.int64) * CHUNK + i
            X = tl.load(x_ptr + t * (N * Q) + x_off, mask=x_msk & (t < n_tokens), other=0.0)
            G = tl.load(g_ptr + t * (M * P) + g_off, mask=g_msk & (t < n_tokens), other=0.0)
            H = tl.dot(G, V, out_dtype=tl.float32)
            dUs = tl.dot(H.to(X.dtype), tl.trans(X), dUs, out_dtype=tl.float32)
        U = tl.load(u_ptr + k * (M * N) + mn_off, mask=mn_msk, other=0.0).to(tl.float32)
        sigma = tl.load(sigma_ptr + k).to(tl.float32)
        tl.store(row + k, tl.sum(tl.sum(dUs * U, axis=1), axis=0))
        tl.store(row + R + k * (M * N) + mn_off, sigma * dUs, mask=mn_msk)
    else:
        us_off, _ = kf._factor_tile(i_m, i_n, M, N, US_T, LDU)
        Us = tl.load(us_ptr + k * SU + us_off, mask=mn_msk, other=0.0)
        dV = tl.zeros((BP, BQ), dtype=tl.float32)
        for i in range(CHUNK):
            t = c.to(tl.int64) * CHUNK + i
            X = tl.load(x_ptr + t * (N * Q) + x_off, mask=x_msk & (t < n_tokens), other=0.0)
            G = tl.load(g_ptr + t * (M * P) + g_off, mask=g_msk & (t < n_tokens), other=0.0)
            W = tl.dot(tl.trans(G), Us, out_dtype=tl.float32)
            dV = tl.dot(W.to(X.dtype), X, dV, out_dtype=tl.float32)
        tl.store(row + R + R * (M * N) + k * (P * Q) + pq_off, dV, mask=pq_msk)


def run_sum(kernel, out, X, A, B, T, warps=4, stages=2):
    r, M, N = A.shape
    _, P, Q = B.shape
    n_tok = X.shape[0]
    X, A, B = kf._operands(X, A, B)
    (A, a_t, sa, lda), (B, b_t, sb, ldb) = kf._layout(A), kf._layout(B)
    BM, BN, BP, BQ = kf._side(M), kf._side(N), kf._side(P), kf._side(Q)
    kernel[(triton.cdiv(n_tok, T),)](out, X, A, B, n_tok, r, T, M, N, P, Q, a_t, sa, lda, b_t, sb, ldb,
                                     BM, BN, BP, BQ, num_warps=warps, num_stages=stages)
    return out


def run_grads(X, G, Us, V, sigma, U, programs, warps=4, stages=None):
    r, m, n = Us.shape
    _, p, q = V.shape
    n_tok = X.shape[0]
    side = max(kf._side(d) for d in (m, n, p, q))
    chunk = max(1, triton.cdiv(n_tok, max(1, programs // r)))
    chunks = triton.cdiv(n_tok, chunk)
    X, G, Us, V = kf._operands(X, G, Us, V)
    (Us, us_t, su, ldu), (V, v_t, sv, ldv) = kf._layout(Us), kf._layout(V)
    part = torch.empty(chunks, r * (1 + m * n + p * q), dtype=torch.float32, device=X.device)
    grad_split[(2 * r, chunks)](part, X, G, Us, V, sigma, U, n_tok, chunk, m, n, p, q, us_t, su, ldu, v_t, sv, ldv,
                                kf._side(m), kf._side(n), kf._side(p), kf._side(q), num_warps=warps,
                                num_stages=stages or kf._stages(X.dtype, side, grads=True))
    ds, dU, dV = part.sum(0).split([r, r * m * n, r * p * q])
    return ds, dU.view(r, m, n), dV.view(r, p, q)




@triton.jit(do_not_specialize=["n_tokens", "R"])
def sum_split(out_ptr, x_ptr, a_ptr, b_ptr, n_tokens, R,
              M: tl.constexpr, N: tl.constexpr, P: tl.constexpr, Q: tl.constexpr,
              A_T: tl.constexpr, SA: tl.constexpr, LDA: tl.constexpr,
              B_T: tl.constexpr, SB: tl.constexpr, LDB: tl.constexpr,
              BM1: tl.constexpr, BM2: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr):
    i_n, i_p, i_q = tl.arange(0, BN), tl.arange(0, BP), tl.arange(0, BQ)
    i_m1 = tl.arange(0, BM1)
    i_m2 = BM1 + tl.arange(0, BM2)
    a_off1, a_msk1 = kf._factor_tile(i_m1, i_n, M, N, A_T, LDA)
    a_off2, a_msk2 = kf._factor_tile(i_m2, i_n, M, N, A_T, LDA)
    x_off = i_n[:, None] * Q + i_q[None, :]
    x_msk = (i_n[:, None] < N) & (i_q[None, :] < Q)
    b_off, b_msk = kf._factor_tile(i_p, i_q, P, Q, B_T, LDB)
    t = tl.program_id(0).to(tl.int64)
    X = tl.load(x_ptr + t * (N * Q) + x_off, mask=x_msk, other=0.0)
    acc1 = tl.zeros((BP, BM1), dtype=tl.float32)
    acc2 = tl.zeros((BP, BM2), dtype=tl.float32)
    for k in range(R):
        B = tl.load(b_ptr + k * SB + b_off, mask=b_msk, other=0.0)
        Zt = tl.dot(B, tl.trans(X), out_dtype=tl.float32).to(X.dtype)
        A1 = tl.load(a_ptr + k * SA + a_off1, mask=a_msk1, other=0.0)
        acc1 = tl.dot(Zt, tl.trans(A1), acc1, out_dtype=tl.float32)
        A2 = tl.load(a_ptr + k * SA + a_off2, mask=a_msk2, other=0.0)
        acc2 = tl.dot(Zt, tl.trans(A2), acc2, out_dtype=tl.float32)
    out = out_ptr + t * (M * P)
    tl.store(out + i_p[:, None] + i_m1[None, :] * P, acc1.to(out_ptr.dtype.element_ty),
             mask=(i_p[:, None] < P) & (i_m1[None, :] < M))
    tl.store(out + i_p[:, None] + i_m2[None, :] * P, acc2.to(out_ptr.dtype.element_ty),
             mask=(i_p[:, None] < P) & (i_m2[None, :] < M))


def run_split(out, X, A, B, warps=4, stages=2):
    r, M, N = A.shape
    _, P, Q = B.shape
    X, A, B = kf._operands(X, A, B)
    (A, a_t, sa, lda), (B, b_t, sb, ldb) = kf._layout(A), kf._layout(B)
    BM1 = 1 << (M.bit_length() - 1)
    BM2 = max(16, triton.next_power_of_2(M - BM1)) if M > BM1 else 16
    sum_split[(X.shape[0],)](out, X, A, B, X.shape[0], r, M, N, P, Q, a_t, sa, lda, b_t, sb, ldb,
                             BM1, BM2, kf._side(N), kf._side(P), kf._side(Q), num_warps=warps, num_stages=stages)
    return out

def inputs(m, n, p, q, r, tokens, dev, dt):
    g = torch.Generator(device=dev).manual_seed(0)
    X = torch.randn(tokens, n * q, device=dev, generator=g).to(dt)
    G = torch.randn(tokens, m * p, device=dev, generator=g).to(dt)
    U = torch.randn(r, m, n, device=dev, generator=g) / (m * n) ** 0.5
    sigma = torch.rand(r, device=dev, generator=g) + 0.5
    Us = kf.factor_buffer(r, m, n, dtype=dt, device=dev).copy_(U * sigma[:, None, None])   # as KronFused keeps them
    V = kf.factor_buffer(r, p, q, dtype=dt, device=dev).copy_(torch.randn(r, p, q, device=dev, generator=g) / (p * q) ** 0.5)
    return X, G, U, sigma, Us, V


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON of every time (default: print only)")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not kf.INTERPRETED
    if not cuda and not kf.INTERPRETED:
        raise SystemExit("kron_fused_variants.py: needs a CUDA GPU, or TRITON_INTERPRET=1 for a correctness run")
    dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    tokens = 4096 if cuda else 3
    if cuda:
        timer = graph_time
    else:
        def timer(fn):
            fn()
            return 0.0
    shapes = [(64, 64, 64, 64), (86, 64, 128, 64), (64, 86, 64, 128)] if cuda else [(16, 16, 16, 16), (22, 8, 16, 8), (8, 22, 8, 16)]
    rows = []

    def rec(shape, r, call, variant, ms, err=None):
        rows.append(dict(shape=shape, r=r, call=call, variant=variant, ms=ms, err=err))
        print(f"{str(shape):>18} r={r} {call:>7} {variant:>14}: {ms * 1e3:7.1f} µs" + ("" if err is None else f"  err {err:.1e}"),
              flush=True)

    for shape, r in itertools.product(shapes, (1, 4, 8)):
        m, n, p, q = shape
        X, G, U, sigma, Us, V = inputs(m, n, p, q, r, tokens, dev, dt)
        y0, y1 = torch.empty(tokens, m * p, device=dev, dtype=dt), torch.empty(tokens, m * p, device=dev, dtype=dt)
        d0, d1 = torch.empty(tokens, n * q, device=dev, dtype=dt), torch.empty(tokens, n * q, device=dev, dtype=dt)
        Ust, Vt = Us.transpose(1, 2), V.transpose(1, 2)
        sums = dict(forward=((y0, X, Us, V), (y1, X, Us, V)), dx=((d0, G, Ust, Vt), (d1, G, Ust, Vt)))
        for call, (cur, new) in sums.items():
            ref = kf.kron_apply_(*cur, accumulate=False).float()
            rec(shape, r, call, "module", timer(lambda: kf.kron_apply_(*cur, accumulate=False)))
            variants = [(f"prefetch{T}", lambda T=T: run_sum(sum_prefetch, *new, T)) for T in (2, 4, 8)]
            variants += [(f"stacked{T} w{w}", lambda T=T, w=w: run_sum(sum_stacked, *new, T, w)) for T in (2, 4) for w in (4, 8)]
            if new[2].shape[1] % 16:                        # a padded output side (86): split it
                variants += [(f"split w{w} s{s}", lambda w=w, s=s: run_split(*new, warps=w, stages=s))
                             for w, s in itertools.product((4, 8), (2, 3))]
            for name, fn in variants:
                try:
                    err = (fn().float() - ref).abs().max().item()
                except triton.runtime.errors.OutOfResources as ex:
                    print(f"{str(shape):>18} r={r} {call:>7} {name:>14}: does not fit ({ex})", flush=True)
                    continue
                rec(shape, r, call, name, timer(fn), err)
        want = kf.kron_grads(X, G, Us, V, sigma, U)
        rec(shape, r, "grads", "module", timer(lambda: kf.kron_grads(X, G, Us, V, sigma, U)))
        for programs in (256, 512, 1024):
            got = run_grads(X, G, Us, V, sigma, U, programs)
            err = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() for a, b in zip(got, want))
            rec(shape, r, "grads", f"split{programs}", timer(lambda: run_grads(X, G, Us, V, sigma, U, programs)), err)
        if r == 1 and cuda:
            for programs, warps, stages in itertools.product((132, 256, 264, 396, 512), (4, 8), (2, 3, 4)):
                rec(shape, r, "grads", f"p{programs} w{warps} s{stages}",
                    timer(lambda: kf.kron_grads(X, G, Us, V, sigma, U, programs=programs, warps=warps, stages=stages)))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name() if cuda else "cpu (interpreter)",
                                               torch=torch.__version__, triton=triton.__version__, tokens=tokens,
                                               rows=rows), indent=1))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
