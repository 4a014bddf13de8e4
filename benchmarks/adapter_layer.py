"""Forward + backward time and memory of one adapted linear layer at LLaMA-2-7B shapes.

    python benchmarks/adapter_layer.py                          # a GPU: bf16, 4,096 tokens, r = 1, 4, 8
    python benchmarks/adapter_layer.py --methods frozen,soka_fused,lora --out /tmp/adapter_layer.json
    python benchmarks/adapter_layer.py --shapes 576x576,192x576 --tokens 3440 --ranks 1,4,8,16   # SmolLM2's layers
    python benchmarks/adapter_layer.py --device cpu --dtype float32 --tokens 64 \\
        --shapes 256x256,384x256 --ranks 1,2 --warmup 1 --repeat 3 --out /tmp/adapter_layer.json   # CPU logic check
    TRITON_INTERPRET=1 python benchmarks/adapter_layer.py --device cpu --dtype float32 --tokens 16 \\
        --shapes 64x64 --ranks 1,2 --methods frozen,soka_fused,soka_ref --warmup 1 --repeat 2 \\
        --out /tmp/adapter_layer.json          # soka_fused on CPU, under Triton's interpreter

One step is y = layer(x); y.backward(g), x requiring grad. Methods: frozen (the plain frozen layer,
the floor), soka_fused and soka_ref (SoKALinear with impl "fused" and "reference"), lora (LoRALinear;
PiSSA costs the same), lokr (PEFT's LoKr, when peft imports). Printed per row: eager ms (median of
--repeat after --warmup), graph ms on CUDA (the step replayed as a CUDA graph), × frozen, the FLOP
ratio (train_step.adapter_macs), peak extra memory and the bytes autograd saves for backward; then
the per-layer ceilings against --target × the frozen layer. Compare methods only within one run.
Writes JSON (default benchmarks/results/adapter_layer.json); docs/performance.md explains the columns
and the ceilings.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kpsvd import factor_shape                                  # noqa: E402
from soka.adapters import KronFused, LoRALinear, SoKALinear    # noqa: E402
from train_step import adapter_macs, gemm_tflops               # noqa: E402  (this folder)

SOKA_IMPLS = {"soka_fused": "fused", "soka_ref": "reference"}   # method -> SoKALinear's impl
METHODS = ("frozen", *SOKA_IMPLS, "lora", "lokr")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


def build(method, W, r):
    """(callable x -> y, trainable parameter count) for one method on base weight W (d_out, d_in)."""
    d_out, d_in = W.shape
    g = torch.Generator().manual_seed(0)
    if method == "frozen":
        return (lambda x: F.linear(x, W)), 0
    if method in SOKA_IMPLS:
        m, n, p, q = factor_shape(d_out, d_in)
        sigma, U, V = torch.rand(r, generator=g), torch.randn(r, m, n, generator=g), torch.randn(r, p, q, generator=g)
        layer = SoKALinear(W, sigma, U, V, subtract=False, impl=SOKA_IMPLS[method]).to(W.device)
        return layer, layer.trainable()
    if method == "lora":
        layer = LoRALinear(W, torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)).to(W.device)
        return layer, layer.trainable()
    if method == "lokr":
        import peft
        lin = nn.Linear(d_in, d_out, bias=False, device=W.device, dtype=W.dtype)
        lin.weight.data.copy_(W)
        wrapped = peft.get_peft_model(nn.Sequential(lin), peft.LoKrConfig(r=r, alpha=r, target_modules=["0"]))
        wrapped.to(W.device)
        return wrapped, sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    raise ValueError(f"adapter_layer.py: unknown method {method!r}")


def saved_bytes(fn, x, g, exclude):
    """Bytes autograd saves for backward in one step, counting each storage once, beyond `exclude`."""
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    y.backward(g)
    return sum(seen.values())


def measure(fn, x, g, *, warmup, repeat, cuda):
    def step():
        x.grad = None
        fn(x).backward(g)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeat):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - t0))
    peak = graph_ms = None
    if cuda:
        graph_ms = graph_time(step, replays=repeat)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    return statistics.median(times), graph_ms, peak


def graph_time(step, *, replays, per_timing=10):
    """Milliseconds of one step replayed as a CUDA graph (Python's launch cost out, as in train.py):
    median over `replays` timings of `per_timing` replays each. None where the step cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()                                   # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    except RuntimeError as e:
        print(f"  (no CUDA graph: {str(e).splitlines()[0][:80]})")
        return None
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(per_timing):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / per_timing)
    return statistics.median(times)


def flops_ratio(method, d_out, d_in, r, tokens):
    """Predicted (method cost) / (frozen cost), multiply-adds per token, forward + backward: the
    adapters' own from train_step.adapter_macs; None for LoKr (its own factorization)."""
    if method == "frozen":
        extra = 0
    elif method in SOKA_IMPLS or method == "lora":
        extra = adapter_macs("soka" if method in SOKA_IMPLS else "lora", d_out, d_in, r,
                             impl=SOKA_IMPLS.get(method), tokens=tokens, dx=True)
    else:
        return None
    return 1 + extra / (2 * d_out * d_in)


def ceiling_rows(frozen_times, ranks, tokens, rate, target):
    """For every measured shape and rank, the least a SoKA layer could cost: the frozen layer's time
    plus LEAST's added FLOPs (train_step.adapter_macs) at `rate` (FLOP/s) and nothing else, as a
    multiple of the frozen time; and the share of that rate at which the added FLOPs, fused's own and
    LEAST's, would have to run, all else free, to stay within `target` × the frozen time."""
    out = []
    for (d_out, d_in), frozen_ms in frozen_times.items():
        for r in ranks:
            added = {impl: 2 * tokens * adapter_macs("soka", d_out, d_in, r, impl=impl, tokens=tokens, dx=True)
                     for impl in ("fused", "least")}                                 # FLOPs per step
            budget_s = (target - 1) * frozen_ms / 1e3
            out.append(dict(d_out=d_out, d_in=d_in, r=r, frozen_ms=frozen_ms,
                            gflop_added={k: v / 1e9 for k, v in added.items()},
                            least_x_frozen=1 + added["least"] / rate / (frozen_ms / 1e3),
                            needs_pct_gemm={k: 100 * v / budget_s / rate for k, v in added.items()}))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="d_out x d_in, comma-separated")
    ap.add_argument("--ranks", default="1,4,8")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--target", type=float, default=1.10, help="the cost asked of SoKA, × the frozen layer")
    ap.add_argument("--gemm-size", type=int, default=None, help="n of the n³ matmul (default 8192 on CUDA, 512 on CPU)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "adapter_layer.json"))
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cuda = device.type == "cuda"
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if "lokr" in methods:
        try:
            import peft  # noqa: F401
        except ImportError:
            print("peft not importable: skipping lokr")
            methods.remove("lokr")
    if "soka_fused" in methods and (KronFused is None or not cuda and os.environ.get("TRITON_INTERPRET") != "1"):
        print("soka_fused runs Triton kernels: CUDA with triton, or CPU under TRITON_INTERPRET=1; skipping it")
        methods.remove("soka_fused")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]

    gemm_n = args.gemm_size or (8192 if cuda else 512)
    gemm = [gemm_tflops(gemm_n, device=device, dtype=dtype)]
    rows, frozen_times = [], {}
    print(f"{'d_out×d_in':>11} {'r':>2} {'method':>10} {'(m,n,p,q)':>16} {'trainable':>10} {'ms':>8} "
          f"{'×frozen':>8} {'graph ms':>8} {'×frozen':>8} {'FLOP ×':>7} {'peak MiB':>9} {'saved MiB':>9}")
    for d_out, d_in in shapes:
        gen = torch.Generator().manual_seed(1)
        W = (torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5).to(device, dtype)
        x = torch.randn(args.tokens, d_in, generator=gen).to(device, dtype).requires_grad_(True)
        g = torch.randn(args.tokens, d_out, generator=gen).to(device, dtype)
        frozen_ms = frozen_graph_ms = None
        for r in ranks:
            for method in methods:
                if method == "frozen" and r != ranks[0]:
                    continue                   # no rank: measured once per shape
                fn, trainable = build(method, W, r)
                params = {p.untyped_storage().data_ptr() for p in getattr(fn, "parameters", lambda: [])()}
                exclude = params | {x.untyped_storage().data_ptr(), W.untyped_storage().data_ptr()}
                saved = saved_bytes(fn, x, g, exclude) / 2**20
                ms, graph_ms, peak = measure(fn, x, g, warmup=args.warmup, repeat=args.repeat, cuda=cuda)
                if method == "frozen":
                    frozen_ms, frozen_graph_ms = ms, graph_ms
                    frozen_times[d_out, d_in] = graph_ms or ms
                row = dict(d_out=d_out, d_in=d_in, r=None if method == "frozen" else r, method=method,
                           factors=list(factor_shape(d_out, d_in)) if method in SOKA_IMPLS else None,
                           trainable=trainable, ms=ms, ratio_vs_frozen=ms / frozen_ms if frozen_ms else None,
                           graph_ms=graph_ms, graph_ratio_vs_frozen=graph_ms / frozen_graph_ms
                           if graph_ms and frozen_ms and frozen_graph_ms else None,
                           flop_ratio=flops_ratio(method, d_out, d_in, r, args.tokens), peak_extra_mib=peak, saved_mib=saved)
                rows.append(row)
                fac = "-" if row["factors"] is None else "(" + ",".join(map(str, row["factors"])) + ")"
                f = lambda v, fmt: "-" if v is None else fmt.format(v)   # noqa: E731
                print(f"{f'{d_out}×{d_in}':>11} {f(row['r'], '{}'):>2} {method:>10} {fac:>16} {trainable:>10,} "
                      f"{ms:>8.3f} {f(row['ratio_vs_frozen'], '{:.3f}'):>8} {f(graph_ms, '{:.3f}'):>8} "
                      f"{f(row['graph_ratio_vs_frozen'], '{:.3f}'):>8} {f(row['flop_ratio'], '{:.3f}'):>7} "
                      f"{f(peak, '{:.1f}'):>9} {saved:>9.1f}")
                del fn
                if cuda:
                    torch.cuda.empty_cache()

    gemm.append(gemm_tflops(gemm_n, device=device, dtype=dtype))
    ceilings = ceiling_rows(frozen_times, ranks, args.tokens, max(gemm) * 1e12, args.target)
    if ceilings:                                # they need the frozen layer's time
        print(f"\nCeilings: the frozen layer plus the added FLOPs at the {gemm_n}³ GEMM's {max(gemm):.4g} TFLOP/s, "
              f"all else free; target {args.target} × frozen. 'needs': that GEMM rate's share the added "
              "FLOPs must run at")
        print(f"{'d_out×d_in':>11} {'r':>2} {'frozen ms':>9} {'GFLOP added (fused / least)':>27} "
              f"{'least ×frozen':>13} {'needs % GEMM (fused / least)':>28}")
    for c in ceilings:
        shape = f"{c['d_out']}×{c['d_in']}"
        print(f"{shape:>11} {c['r']:>2} {c['frozen_ms']:>9.3f} "
              f"{c['gflop_added']['fused']:>16.2f} / {c['gflop_added']['least']:>6.2f} {c['least_x_frozen']:>13.3f} "
              f"{c['needs_pct_gemm']['fused']:>19.0f} / {c['needs_pct_gemm']['least']:>6.0f}")
    info = dict(device=torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
                torch=torch.__version__, dtype=str(dtype), tokens=args.tokens, warmup=args.warmup,
                repeat=args.repeat, timing="CUDA events, median" if cuda else "perf_counter, median",
                gemm_n=gemm_n, gemm_tflops=gemm, target_x_frozen=args.target)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(config=info, results=rows, ceilings=ceilings), indent=1) + "\n")
    print(f"wrote {out}")
    return rows, ceilings


if __name__ == "__main__":
    main()
