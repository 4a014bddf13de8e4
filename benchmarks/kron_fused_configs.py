"""Launch settings of the fused Kronecker kernels (soka/kron_fused.py), timed one kernel call at a time.

    python benchmarks/kron_fused_configs.py --out benchmarks/results/kron_fused_configs.json
    python benchmarks/kron_fused_configs.py --rule-only --out benchmarks/results/kron_fused_rule.json

Needs a GPU. For each factor shape (LLaMA-2-7B's and SmolLM2's, SHAPES) and rank (--ranks), bf16 at
--tokens tokens, it times the kernel calls of one SoKA layer step: the forward sum, the dx sum (the
same kernel on the transposed factors, read in place; dx_copies: as contiguous copies) and the
factor gradients, over a grid of launch settings (SUM_GRID, GRAD_GRID), each as a CUDA graph of 20
calls (median of 5 replays); --rule-only times the module's own settings only. Prints the best
setting per call beside the module's and writes every time as JSON; kron_fused.py's TOKENS_PER_PROGRAM,
WARPS, GRAD_PROGRAMS and _stages come from it (docs/performance.md).
"""
import argparse
import itertools
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from soka import kron_fused                                              # noqa: E402

# (m, n, p, q): LLaMA-2-7B's 4096², 11008×4096, 4096×11008; SmolLM2's 576², 192×576
SHAPES = [(64, 64, 64, 64), (86, 64, 128, 64), (64, 86, 64, 128), (24, 24, 24, 24), (12, 24, 16, 24)]
SUM_GRID = dict(tokens=(1, 4, 16), warps=(4, 8), stages=(2, 3))
GRAD_GRID = dict(programs=(256, 512, 1024, 2048), warps=(4, 8), stages=(2, 3))


def graph_time(fn, calls=20, replays=5):
    """Milliseconds per call of fn, replayed as a CUDA graph of `calls` calls (median of `replays`)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()                                                     # compiles the kernel outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def settings(grid):
    return [dict(zip(grid, v)) for v in itertools.product(*grid.values())]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ranks", default="1,8")
    ap.add_argument("--rule-only", action="store_true", help="time the module's launch settings only, no grid")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "kron_fused_configs.json"))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kron_fused_configs.py: needs a CUDA GPU (it times compiled Triton kernels)")
    dt, dev = torch.bfloat16, "cuda"
    rows = []
    for (m, n, p, q), r in itertools.product(SHAPES, [int(v) for v in a.ranks.split(",")]):
        g = torch.Generator(device=dev).manual_seed(0)
        X = torch.randn(a.tokens, n * q, device=dev, generator=g).to(dt)
        G = torch.randn(a.tokens, m * p, device=dev, generator=g).to(dt)
        U = torch.randn(r, m, n, device=dev, generator=g) / (m * n) ** 0.5
        sigma = torch.ones(r, device=dev)
        Us = kron_fused.factor_buffer(r, m, n, dtype=dt, device=dev).copy_(U)     # as KronFused stores them
        V = kron_fused.factor_buffer(r, p, q, dtype=dt, device=dev).copy_(torch.randn(r, p, q, device=dev, generator=g) / (p * q) ** 0.5)
        Ust, Vt = Us.transpose(1, 2).contiguous(), V.transpose(1, 2).contiguous()
        y, dx = torch.zeros(a.tokens, m * p, device=dev, dtype=dt), torch.zeros(a.tokens, n * q, device=dev, dtype=dt)
        calls = dict(forward=(SUM_GRID, lambda **o: kron_fused.kron_apply_(y, X, Us, V, accumulate=False, **o)),
                     dx=(SUM_GRID, lambda **o: kron_fused.kron_apply_(dx, G, Us.transpose(1, 2), V.transpose(1, 2), accumulate=False, **o)),
                     dx_copies=(SUM_GRID, lambda **o: kron_fused.kron_apply_(dx, G, Ust, Vt, **o)),
                     grads=(GRAD_GRID, lambda **o: kron_fused.kron_grads(X, G, Us, V, sigma, U, **o)))
        for call, (grid, fn) in calls.items():
            default = graph_time(fn)
            times = [] if a.rule_only else [dict(s, ms=graph_time(lambda: fn(**s))) for s in settings(grid)]
            if not times:
                rows.append(dict(shape=(m, n, p, q), r=r, call=call, default_ms=default))
                print(f"{str((m, n, p, q)):>18} r={r:<2} {call:>9}: rule {default * 1e3:7.1f} µs", flush=True)
                continue
            best = min(times, key=lambda t: t["ms"])
            rows.append(dict(shape=(m, n, p, q), r=r, call=call, default_ms=default, best=best, times=times))
            print(f"{str((m, n, p, q)):>18} r={r:<2} {call:>9}: rule {default * 1e3:7.1f} µs, best "
                  f"{best['ms'] * 1e3:7.1f} µs with {({k: v for k, v in best.items() if k != 'ms'})}", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=kron_fused.triton.__version__,
        python=platform.python_version(), tokens=a.tokens, dtype="bfloat16", rows=rows), indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
