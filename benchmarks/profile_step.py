"""Where one training step of the demo model spends its time: a torch.profiler table per method.

    python benchmarks/profile_step.py                                # frozen, lora, soka on the demo model
    python benchmarks/profile_step.py --methods lora,soka --out benchmarks/results/profile_step_smollm2.json
    python benchmarks/profile_step.py --methods soka --batch 16 --seq 256 --rows 30 --ckpt PATH

Needs a GPU. Per method (frozen: backward to the embedding output only; lora, pissa, soka: inject's
defaults), forward + backward + AdamW on random tokens (batch × seq) run eagerly under torch.profiler
after a warm-up: operator calls on the CPU, kernels launched, GPU busy time against wall time, and
the kernels that take the most GPU time; then the same step replayed as a CUDA graph
(soka.steps.GraphedStep), as train.py runs it. --ckpt: any load_checkpoint input, default the demo
model (soka.checkpoints.demo_checkpoint). Writes JSON (default benchmarks/results/profile_step.json).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model import load_checkpoint  # noqa: E402
from soka import adapters  # noqa: E402
from soka.checkpoints import demo_checkpoint  # noqa: E402
from soka.steps import GraphedStep, eager_step  # noqa: E402


def build(ckpt, method, device):
    model, _ = load_checkpoint(ckpt, device=device)
    if method == "frozen":                   # the floor: backward to the embeddings' output only
        for p in model.parameters():
            p.requires_grad_(False)
        model.tok_embeddings.register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
    else:
        adapters.inject(model, method, rank=None if method == "soka" else 8, verbose=False)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    return model, params


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default=None, help="Meta folder, HF folder or .gguf file (default: the demo model)")
    ap.add_argument("--methods", default="frozen,lora,soka")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20, help="timed graph replays")
    ap.add_argument("--rows", type=int, default=15, help="kernels listed per method")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "profile_step.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py: needs a CUDA GPU")
    if args.ckpt is None:
        try:
            args.ckpt = demo_checkpoint()
        except OSError as e:
            raise SystemExit(f"profile_step.py: {e}")
    device = torch.device("cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    results = []
    for method in args.methods.split(","):
        model, params = build(args.ckpt, method, device)
        V = model.args.vocab_size
        ids = torch.randint(0, V, (args.batch, args.seq), device=device)
        labels = ids.clone()
        n_tok = torch.tensor(float(args.batch * (args.seq - 1)), device=device)
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True) if params else None

        fwd_bwd = eager_step(model, amp)

        def eager():
            fwd_bwd(ids, labels, n_tok)
            if opt:
                opt.step()
                opt.zero_grad(set_to_none=False)

        for _ in range(3):
            eager()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            eager()
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        ev = prof.key_averages()
        cpu_ops = sum(e.count for e in ev if e.device_type == torch.autograd.DeviceType.CPU)
        kernels = [e for e in ev if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6
        n_kernels = sum(e.count for e in kernels)
        top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:args.rows]

        graph_ms = None
        if params:                                         # the same step as train.py replays it
            step = GraphedStep(model, params, amp=amp, pad_id=0)
            step(ids, labels, n_tok)
            opt.step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(ids, labels, n_tok)
                opt.step()
                opt.zero_grad(set_to_none=False)
            torch.cuda.synchronize()
            graph_ms = 1e3 * (time.perf_counter() - t0) / args.steps

        print(f"\n== {method}: {sum(p.numel() for p in params):,} trainable; eager step {1e3 * wall:.1f} ms wall "
              f"(profiled), GPU busy {1e3 * busy:.1f} ms, {cpu_ops:,} CPU operator calls, {n_kernels:,} kernels"
              + (f"; CUDA-graph step {graph_ms:.1f} ms" if graph_ms else ""))
        print(f"{'kernel':<90} {'calls':>6} {'GPU ms':>8}")
        for e in top:
            print(f"{e.key[:90]:<90} {e.count:>6} {e.self_device_time_total / 1e3:>8.2f}")
        results.append(dict(method=method, trainable=sum(p.numel() for p in params), eager_wall_ms=1e3 * wall,
                            gpu_busy_ms=1e3 * busy, cpu_ops=cpu_ops, kernels=n_kernels, graph_step_ms=graph_ms,
                            top=[dict(kernel=e.key, calls=e.count, gpu_ms=e.self_device_time_total / 1e3) for e in top]))
        del model, params, opt
        torch.cuda.empty_cache()
    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, batch=args.batch, seq=args.seq,
                ckpt=str(args.ckpt))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(info=info, results=results), indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
