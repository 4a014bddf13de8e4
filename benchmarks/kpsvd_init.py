"""KPSVD + rank selection over every linear layer of a LLaMA-2-7B-shaped model: exact vs randomized.

    python benchmarks/kpsvd_init.py                      # on the GPU: all 224 layers, randomized
    python benchmarks/kpsvd_init.py --exact-per-shape 3  # exact SVD on 3 matrices of each shape
    python benchmarks/kpsvd_init.py --exact-all          # exact SVD on all 224
    python benchmarks/kpsvd_init.py --layers 2 --device cpu --dim-scale 8   # a quick CPU smoke run

The weights are random bfloat16 matrices whose Kronecker spectrum follows a power law,
σ_k = k^(-alpha): random orthonormal vec(U_k), vec(V_k) (one QR per shape, then a fresh random
permutation and sign flip of the columns per layer), unrearranged into W. Only KPSVD and rank
selection are timed, not the matrix generation. Accuracy is checked where the exact SVD ran: the
relative reconstruction error ‖W − W_r‖_F / ‖W‖_F of the randomized top-r terms against the
exact top-r, for r in 1, 2, 4, 8, 16. Prints a table; saves benchmarks/results/kpsvd_init.json.
"""
import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kpsvd import factor_shape, kpsvd, kron_sum, unrearrange  # noqa: E402
from rank_select import explain_rank  # noqa: E402

# LLaMA-2-7B: 32 layers × (wq wk wv wo: 4096×4096; w1 w3: 11008×4096; w2: 4096×11008)
LINEARS = {"wq": (4096, 4096), "wk": (4096, 4096), "wv": (4096, 4096), "wo": (4096, 4096),
           "w1": (11008, 4096), "w3": (11008, 4096), "w2": (4096, 11008)}
R_CHECK = (1, 2, 4, 8, 16)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class PowerLawWeights:
    """Random bf16 weights with Kronecker spectrum k^-alpha, one orthonormal basis pair per shape."""

    def __init__(self, alpha, device, seed):
        self.alpha, self.device = alpha, device
        self.g = torch.Generator(device=device).manual_seed(seed)
        self.bases = {}

    def __call__(self, d_out, d_in):
        m, n, p, q = factor_shape(d_out, d_in)
        K = min(m * n, p * q)
        if (d_out, d_in) not in self.bases:
            Qu = torch.linalg.qr(torch.randn(m * n, K, generator=self.g, device=self.device)).Q
            Qv = torch.linalg.qr(torch.randn(p * q, K, generator=self.g, device=self.device)).Q
            self.bases[(d_out, d_in)] = (Qu, Qv)
        Qu, Qv = self.bases[(d_out, d_in)]
        perm = torch.randperm(K, generator=self.g, device=self.device)
        signs = torch.randint(0, 2, (K,), generator=self.g, device=self.device) * 2 - 1
        s = torch.arange(1, K + 1, device=self.device, dtype=torch.float32) ** -self.alpha
        R = (Qu[:, perm] * (s * signs)) @ Qv.T                    # (m·n, p·q) = Σ σ_k u_k v_kᵀ
        W = unrearrange(R, m, n, p, q)
        return (W * (0.02 * (d_out * d_in) ** 0.5 / W.norm())).to(torch.bfloat16)   # typical scale


def rel_err(W, sigma, U, V, r):
    W = W.float()
    return float(torch.linalg.norm(W - kron_sum(sigma[:r], U[:r], V[:r])) / torch.linalg.norm(W))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=32, help="transformer layers (7 linears each)")
    ap.add_argument("--alpha", type=float, default=0.5, help="power-law exponent of the spectrum")
    ap.add_argument("--tau", type=float, default=0.9)
    ap.add_argument("--r-max", type=int, default=16)
    ap.add_argument("--oversample", type=int, default=16)
    ap.add_argument("--n-iter", type=int, default=4, help="power iterations of the randomized SVD")
    ap.add_argument("--exact-per-shape", type=int, default=2, help="matrices per shape also run exactly")
    ap.add_argument("--exact-all", action="store_true", help="run the exact SVD on every layer")
    ap.add_argument("--dim-scale", type=int, default=1, help="divide every dimension (CPU smoke runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "kpsvd_init.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    make = PowerLawWeights(args.alpha, device, args.seed)
    K = args.r_max + 1                                            # values rank selection needs

    rows, exact_seen = [], {}
    t_rand_total = t_exact_total = 0.0
    for layer in range(args.layers):
        for name, (d_out, d_in) in LINEARS.items():
            d_out, d_in = d_out // args.dim_scale, d_in // args.dim_scale
            m, n, p, q = factor_shape(d_out, d_in)
            W = make(d_out, d_in)
            total = float(W.float().pow(2).sum())

            sync(device); t0 = time.perf_counter()
            s_r, U_r, V_r = kpsvd(W, m, n, p, q, rank=K, randomized=True, seed=args.seed,
                                  oversample=args.oversample, n_iter=args.n_iter)
            choice = explain_rank(s_r, tau=args.tau, r_max=args.r_max, total=total)
            sync(device); t_rand = time.perf_counter() - t0
            t_rand_total += t_rand
            row = dict(layer=layer, name=name, shape=[d_out, d_in], factors=[m, n, p, q],
                       t_randomized_s=t_rand, **choice.as_dict())

            shape_key = (d_out, d_in)
            if args.exact_all or exact_seen.get(shape_key, 0) < args.exact_per_shape:
                exact_seen[shape_key] = exact_seen.get(shape_key, 0) + 1
                sync(device); t0 = time.perf_counter()
                s_e, U_e, V_e = kpsvd(W, m, n, p, q)
                choice_e = explain_rank(s_e[:K], tau=args.tau, r_max=args.r_max, total=total)
                sync(device); t_exact = time.perf_counter() - t0
                t_exact_total += t_exact
                errs = {r: (rel_err(W, s_e, U_e, V_e, r), rel_err(W, s_r, U_r, V_r, r)) for r in R_CHECK}
                row.update(t_exact_s=t_exact, r_exact=choice_e.r,
                           sigma_rel_err=float(((s_r - s_e[:K]).abs() / s_e[:K]).max()),
                           err_exact={r: e for r, (e, _) in errs.items()},
                           err_randomized={r: e for r, (_, e) in errs.items()},
                           err_gap_rel={r: (er - ee) / ee for r, (ee, er) in errs.items()})
            rows.append(row)

    # ---- summary
    by_shape = {}
    for row in rows:
        by_shape.setdefault(tuple(row["shape"]), []).append(row)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}"
          f" | torch {torch.__version__} | {len(rows)} layers | power law alpha = {args.alpha}"
          f" | randomized: top {K}, oversample {args.oversample}, {args.n_iter} power iterations")
    print(f"{'shape':>13} {'factors':>17} {'layers':>6} {'rand ms/layer':>13} {'exact ms/layer':>14}"
          f" {'r (rand/exact)':>14} {'worst err gap, r≤16':>20} {'worst σ rel err':>16}")
    summary = []
    for shape, rs in by_shape.items():
        ex = [r for r in rs if "t_exact_s" in r]
        t_r = 1e3 * sum(r["t_randomized_s"] for r in rs) / len(rs)
        t_e = 1e3 * sum(r["t_exact_s"] for r in ex) / len(ex) if ex else float("nan")
        gap = max((max(r["err_gap_rel"].values()) for r in ex), default=float("nan"))
        sig = max((r["sigma_rel_err"] for r in ex), default=float("nan"))
        ranks = sorted({r["r"] for r in rs})
        ranks_e = sorted({r["r_exact"] for r in ex})
        print(f"{'×'.join(map(str, shape)):>13} {str(tuple(rs[0]['factors'])):>17} {len(rs):>6} {t_r:>13.1f}"
              f" {t_e:>14.1f} {str(ranks) + '/' + str(ranks_e):>14} {gap:>20.2e} {sig:>16.2e}")
        summary.append(dict(shape=list(shape), factors=rs[0]["factors"], layers=len(rs),
                            randomized_ms_per_layer=t_r, exact_ms_per_layer=t_e, exact_layers=len(ex),
                            ranks_randomized=ranks, ranks_exact=ranks_e,
                            worst_rel_err_gap_r_le_16=gap, worst_sigma_rel_err=sig))
    n_ex = sum(1 for r in rows if "t_exact_s" in r)
    exact_model = sum(s["exact_ms_per_layer"] * s["layers"] for s in summary) / 1e3
    print(f"whole model, randomized: {t_rand_total:.2f} s for {len(rows)} layers")
    print(f"whole model, exact: {t_exact_total:.2f} s measured on {n_ex} layers"
          + ("" if n_ex == len(rows) else f"; {exact_model:.1f} s extrapolated to all {len(rows)} per shape")
          + f"; speed-up {exact_model / t_rand_total:.0f}×")
    worst = max((max(r["err_gap_rel"].values()) for r in rows if "err_gap_rel" in r), default=float("nan"))
    print(f"worst (err_randomized − err_exact) / err_exact over r ∈ {list(R_CHECK)}: {worst:.2e}")

    result = dict(args=vars(args), device=str(device),
                  device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__, randomized_total_s=t_rand_total,
                  exact_measured_s=t_exact_total, exact_measured_layers=n_ex,
                  exact_model_s_extrapolated=exact_model, worst_rel_err_gap=worst,
                  by_shape=summary, layers=rows)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
