"""Compiled rotary embeddings: the form model.apply_rotary_real compiles against the one it replaced.

    python benchmarks/rotary_forms.py --out benchmarks/results/rotary_forms.json
    python benchmarks/rotary_forms.py --batch 4 --seq 4096 --iters 20

Needs a GPU. Both forms compute Meta's interleaved rotation of each pair (a, b) by (cos, sin), in
float32, on a (batch, seq, heads, head_dim) bf16 tensor shaped like LLaMA-2-7B's queries:
`unbind` (a, b = pairs.unbind(-1); stack((a·c − b·s, a·s + b·c), -1), the form it replaced) and
`flip` (pairs · (c, c) + pairs.flip(-1) · (−s, s): model.apply_rotary_real). Each is
torch.compile'd; the table gives the GPU time of the forward's and of the forward + backward's
kernels per call (the profiler's sum over --iters calls), the forward's bandwidth (bytes read and
written once), and the largest difference from `flip`.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402


def rotary_unbind(x, rope):
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)       # (B, T, H, head_dim/2) each
    c, s = rope.unbind(-1)                                    # (B, T, 1, head_dim/2) each
    return torch.stack((a * c - b * s, a * s + b * c), -1).flatten(-2).type_as(x)


FORMS = {"unbind": rotary_unbind, "flip": M.apply_rotary_real}


def kernel_time(fn, iters):
    """GPU time of the kernels one call launches, µs: summed by the profiler over `iters` calls, after 5
    warm-up calls. (CUDA events around the calls also count the gaps that autograd's CPU work leaves.)"""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / iters


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("rotary_forms.py: needs a CUDA GPU (it times compiled kernels)")
    torch.manual_seed(0)
    B, T, H, D = a.batch, a.seq, a.heads, a.head_dim
    x = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    rope = M.rotary(torch.arange(T, device="cuda").expand(B, T), D, 10000.0)
    g = torch.randn_like(x)
    moved = 2 * x.numel() * x.element_size()                  # read x, write the result
    outs, rows = {}, {}
    for name, form in FORMS.items():
        f = torch.compile(form)
        xr = x.clone().requires_grad_(True)

        def forward():
            with torch.no_grad():
                return f(x, rope)

        def forward_backward():
            xr.grad = None                                    # no accumulation kernel in the timing
            f(xr, rope).backward(g)

        outs[name] = forward()
        fwd, both = kernel_time(forward, a.iters), kernel_time(forward_backward, a.iters)
        rows[name] = dict(forward_us=fwd, forward_backward_us=both, forward_tb_s=moved / fwd / 1e6)
    for name in FORMS:
        rows[name]["max_diff_vs_flip"] = (outs[name].float() - outs["flip"].float()).abs().max().item()
    print(f"rotary on ({B}, {T}, {H}, {D}) bf16, compiled, {torch.cuda.get_device_name()}")
    print(f"{'form':8s} {'forward µs':>11s} {'fwd+bwd µs':>11s} {'fwd TB/s':>9s} {'max |diff|':>11s}")
    for name, r in rows.items():
        print(f"{name:8s} {r['forward_us']:11.1f} {r['forward_backward_us']:11.1f} {r['forward_tb_s']:9.2f} "
              f"{r['max_diff_vs_flip']:11.3g}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                               shape=[B, T, H, D], results=rows), indent=1))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
