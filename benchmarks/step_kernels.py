"""GPU time of one LLaMA-2-7B-shaped training step, by kind of kernel, for train_step.py's configs.

    python benchmarks/step_kernels.py --configs ours_frozen+compile,soka_r1+compile --layers 8 --ops 25 \\
        --out benchmarks/results/step_kernels_7b.json

Needs a GPU. Each config (train_step.py's names, `@impl` and `+options` included) is built as
benchmarks/train_step.py builds it (random bf16 weights, batch 4 × 1024 tokens, AdamW), with --layers
of the 32 layers (every layer costs the same). Three eager steps warm up, then one step runs under
torch.profiler, and its kernels' GPU time is summed by kind: cuBLAS GEMMs, the fused Kronecker
kernels (sum, gradients), attention, compiled pointwise kernels, the optimizer, reductions, and other
kernels by name. `--ops N` also lists the N largest (launching op, kernel) pairs outside the GEMMs.
Prints a table per config; --out writes JSON.
"""
import argparse
import collections
import json
import re
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402
from model import ModelArgs  # noqa: E402


def kind(name):
    n = name.lower()
    # step_kernels_7b.json and step_kernels_7b_eager_loss.json list _kron_apply_kernel as _kron_sum_kernel
    for key, words in (("kron_apply", ("kron_apply", "kron_sum")), ("kron_grad", ("kron_grad",)),
                       ("gemm", ("nvjet", "gemm", "cutlass", "xmma")), ("attention", ("flash", "fmha", "attention")),
                       ("compiled pointwise", ("triton",)), ("optimizer", ("adam", "multi_tensor")),
                       ("reduction", ("reduce",))):
        if any(w in n for w in words):
            return key
    return "other: " + re.sub(r"<.*", "", name)[:60]


def launchers(prof, n):
    """The n largest (torch op, kernel) pairs by GPU time, GEMMs left out: which op launched what."""
    time = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU:
            for k in e.kernels:
                if kind(k.name) != "gemm":
                    t = time[(e.name, re.sub(r"<.*", "", k.name))]
                    t[0] += 1
                    t[1] += k.duration / 1e3
    top = sorted(time.items(), key=lambda kv: -kv[1][1])[:n]
    return [dict(op=op, kernel=kernel, kernels=c, ms=ms) for (op, kernel), (c, ms) in top]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="ours_frozen+compile,soka_r1+compile")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ops", type=int, default=0,
                    help="also list the N largest (launching torch op, kernel) pairs outside the GEMMs")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("step_kernels.py: needs a CUDA GPU")
    args = ModelArgs(dim=4096, n_layers=a.layers, n_heads=32, vocab_size=32000, hidden_dim=11008)
    dev = torch.device("cuda")
    results = {}
    for name in a.configs.split(","):
        s = train_step.setup(name, args, device=dev, dtype=torch.bfloat16, graphed=False)
        ids = torch.randint(0, args.vocab_size, (4, 1024), device=dev)
        n_tok = torch.tensor(4.0 * 1023, device=dev)

        def step():
            s["step"](ids, ids, n_tok)
            if s["opt"] is not None:
                s["opt"].step()
                s["opt"].zero_grad(set_to_none=s["kind"] == "hf")

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        activities = [ProfilerActivity.CUDA] + [ProfilerActivity.CPU] * bool(a.ops)   # CPU ops name the launcher
        with profile(activities=activities) as prof:
            step()
            torch.cuda.synchronize()
        time = collections.defaultdict(lambda: [0, 0.0])                    # kind -> [kernels, ms]
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                k = time[kind(e.name)]
                k[0] += 1
                k[1] += e.device_time_total / 1e3
        total = sum(ms for _, ms in time.values())
        print(f"== {name}: {sum(n for n, _ in time.values())} kernels, {total:.2f} ms of GPU time ({a.layers} layers)")
        for k, (n, ms) in sorted(time.items(), key=lambda kv: -kv[1][1]):
            print(f"  {k:64s} {n:6d} {ms:8.3f} ms")
        results[name] = dict(total_ms=total, kinds={k: dict(kernels=n, ms=ms) for k, (n, ms) in time.items()})
        if a.ops:
            results[name]["ops"] = launchers(prof, a.ops)
            print("  largest outside the GEMMs, by launching op:")
            for r in results[name]["ops"]:
                print(f"  {r['ms']:8.3f} ms {r['kernels']:6d}  {r['op'][:40]:40s} {r['kernel'][:60]}")
        del s
        torch.cuda.empty_cache()
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                               layers=a.layers, results=results), indent=1))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
