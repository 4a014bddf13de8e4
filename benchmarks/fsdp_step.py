"""A training step with the frozen base sharded over the GPUs (--mode fsdp, soka/fsdp.py, train.py --fsdp)
or whole on each (--mode ddp, train.py's data parallel): tokens/s and peak GiB per GPU, LLaMA-2 7B /
13B / 70B shapes, random weights; and the per-GPU memory those runs need, modelled from parameter counts.

    python benchmarks/fsdp_step.py --shape 7b --modes fsdp,ddp                      # one GPU, both modes
    torchrun --nproc_per_node=8 benchmarks/fsdp_step.py --shape 70b --modes fsdp     # eight GPUs
    python benchmarks/fsdp_step.py --model-memory                                   # modelled; no GPU needed
    python benchmarks/fsdp_step.py --host-memory --procs 2                          # host RSS of sharded loading (CPU)
    python benchmarks/fsdp_step.py --shape tiny --device cpu --steps 2 --warmup 1 --out /tmp/f.json   # logic check

The step is train.py's: bf16 base under autocast, eager forward + backward of the chunked loss, the
factors' gradients summed over processes in float32, clipping, fused AdamW. The adapters are SoKA at a
fixed rank (--rank, --targets) from a seeded randomized KPSVD of the random weights, made by the same
code as a run's (fsdp.load_sharded / adapters.inject); their set-up time is reported, not timed in the
step. Each process makes --batch sequences of --seq tokens per step; tokens/s counts all processes.
Peak GiB is torch.cuda.max_memory_allocated (and reserved) over the timed steps, the largest of any
process. Each mode is built, timed and freed before the next. Prints a table and writes JSON (default
benchmarks/results/fsdp_step_<shape>_<world>gpu.json); docs/multi_gpu.md has the commands and numbers.
"""
import argparse
import contextlib
import gc
import json
import os
import platform
import socket
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kpsvd import factor_shape                                  # noqa: E402
from model import ModelArgs, Transformer, load_checkpoint       # noqa: E402
from soka import adapters, fsdp, runs                           # noqa: E402
from soka.checkpoints import write_meta_shards                   # noqa: E402
from soka.steps import all_reduce_grads, ce_chunk, eager_step  # noqa: E402

GiB = 2**30
ATTN = ("wq", "wk", "wv", "wo")
SHAPES = {   # LLaMA-2's params.json (vocab 32000); tiny: a CPU check
    "7b": ModelArgs(dim=4096, n_layers=32, n_heads=32),
    "13b": ModelArgs(dim=5120, n_layers=40, n_heads=40),
    "70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
    "tiny": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32),
}


# ----------------------------------------------------------------------------- the memory model

def param_counts(a):
    """Parameters of the base: per block (seven linear layers, two norms), the root (embeddings, output, final norm)."""
    block = sum(d_out * d_in for d_out, d_in in a.linear_shapes().values()) + 2 * a.dim
    root = a.vocab_size * a.dim * (1 if a.tie_embeddings else 2) + a.dim
    return dict(block=block, root=root, total=a.n_layers * block + root)


def soka_params(a, targets, rank):
    """SoKA's trainable parameters at one rank on every targeted layer: r·(m·n + p·q + 1) each."""
    shapes = a.linear_shapes()
    per_block = sum(rank * (m * n + p * q + 1) for t in targets for m, n, p, q in [factor_shape(*shapes[t])])
    return a.n_layers * per_block


# Activations per token of one micro-batch, measured at the 7B shape (docs/performance.md,
# benchmarks/results/train_step_7b_methods.json): soka_attn_r8 peaks at 31.31 GiB for 4 × 1,024 tokens,
# 12.55 GiB of which are the bf16 base and 0.19 GiB the adapters' state: 18.57 GiB / 4,096 tokens. With
# checkpointing, each 4,096-token sequence adds 1.68 GiB (train_step_7b_4096tok_ckpt_*.json).
ACT_7B = (31.31 - 12.55 - 0.19) * GiB / 4096           # bytes per token, no checkpointing
ACT_7B_CKPT = 1.68 * GiB / 4096                         # bytes per token kept across blocks, checkpointing
BUDGET_GIB = 70.0   # of an 80 GB H100's 79.2 GiB: the rest for the CUDA context, NCCL and the allocator's cache


def model_memory(shape, world, mode, *, targets=ATTN, rank=16, tokens=4 * 512, checkpointing=True):
    """Modelled GiB per GPU of one training step (docs/multi_gpu.md states the arithmetic):
    base: the bf16 base, 2 bytes a parameter, divided by world under FSDP;
    gathered (FSDP): the root's weights (kept from forward to backward) and two blocks' (the one
      computing and the next, prefetched), all-gathered in bf16;
    adapters: the factors replicated, 24 bytes a parameter: float32 values, gradients, two AdamW
      moments, the initial factors and all_reduce's flat copy of the gradients;
    activations: `tokens` per micro-batch at the 7B measurement per token, scaled by the shape:
      without checkpointing by n_layers·(dim + ffn_dim), with it by n_layers·dim (the blocks' inputs)
      plus one block recomputed."""
    a = SHAPES[shape]
    c = param_counts(a)
    base = 2 * c["total"] / (world if mode == "fsdp" else 1)
    gathered = 2 * (c["root"] + 2 * c["block"]) if mode == "fsdp" else 0
    adapters_b = 24 * soka_params(a, targets, rank)
    ref = SHAPES["7b"]
    size = a.n_layers * (a.dim + a.ffn_dim) / (ref.n_layers * (ref.dim + ref.ffn_dim))
    if checkpointing:
        act = tokens * (ACT_7B_CKPT * a.n_layers * a.dim / (ref.n_layers * ref.dim) + ACT_7B * size / a.n_layers)
    else:
        act = tokens * ACT_7B * size
    parts = dict(base=base / GiB, gathered=gathered / GiB, adapters=adapters_b / GiB, activations=act / GiB)
    total = sum(parts.values())
    return dict(shape=shape, world=world, mode=mode, checkpointing=checkpointing, **parts, total=total,
                fits=total <= BUDGET_GIB)


def print_model_memory(path):
    """The modelled table for 7B / 13B / 70B at 1, 2, 4, 8 GPUs, FSDP and DDP, with and without checkpointing."""
    rows = [model_memory(s, w, m, checkpointing=ck) for ck in (True, False) for s in ("7b", "13b", "70b")
            for m in ("fsdp", "ddp") for w in (1, 2, 4, 8)]
    print(f"modelled GiB per GPU: SoKA on {','.join(ATTN)} at r = 16, micro-batch 4 × 512 tokens per GPU; "
          f"'fits' means ≤ {BUDGET_GIB:.0f} GiB")
    print(f"{'shape':>5} {'mode':>4} {'GPUs':>4} {'ckpt':>4} {'base':>7} {'gathered':>8} {'adapters':>8} "
          f"{'activ.':>7} {'total':>7} fits")
    for r in rows:
        print(f"{r['shape']:>5} {r['mode']:>4} {r['world']:>4} {'yes' if r['checkpointing'] else 'no':>4} "
              f"{r['base']:7.2f} {r['gathered']:8.2f} {r['adapters']:8.2f} {r['activations']:7.2f} "
              f"{r['total']:7.2f} {'yes' if r['fits'] else 'no'}")
    for ck in (True, False):
        largest = {(m, w): [r["shape"] for r in rows if (r["mode"], r["world"], r["checkpointing"]) == (m, w, ck)
                            and r["fits"]] for m in ("fsdp", "ddp") for w in (1, 2, 4, 8)}
        print(f"largest shape that fits, {'with' if ck else 'without'} checkpointing: "
              + ", ".join(f"{m} × {w}: {s[-1] if s else 'none'}" for (m, w), s in largest.items()))
    counts = {s: dict(param_counts(SHAPES[s]), soka_r16_attn=soka_params(SHAPES[s], ATTN, 16))
              for s in ("7b", "13b", "70b")}
    if path:
        write(path, dict(kind="modelled", budget_gib=BUDGET_GIB, act_7b_bytes_per_token=ACT_7B,
                         act_7b_ckpt_bytes_per_token=ACT_7B_CKPT, params=counts, rows=rows))


# ----------------------------------------------------------------------------- random weights, by rows

class RandomRows:
    """A checkpoint tensor of random values (norms: ones) made on the device, read by rows like
    fsdp.Rows: each read makes the whole tensor from its own seed and returns rows a..b-1."""

    def __init__(self, key, shape, seed):
        self.key, self.shape, self.seed = key, tuple(shape), seed + zlib.crc32(key.encode())

    def read(self, a, b, *, device, dtype):
        if len(self.shape) == 1:
            return torch.ones(b - a, device=device, dtype=dtype)
        g = torch.Generator(device=device).manual_seed(self.seed)
        full = torch.randn(self.shape, generator=g, device=device, dtype=torch.float32) * 0.02
        return full[a:b].to(dtype)


def random_weights(a, seed=0):
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in Transformer(a).state_dict().items()}
    return {k: RandomRows(k, s, seed) for k, s in shapes.items()}


# ----------------------------------------------------------------------------- the timed step

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(mode, a, *, mesh, device, dtype, targets, rank, impl):
    """(model, report): FSDP through fsdp.load_sharded, DDP whole on this process + adapters.inject."""
    weights = random_weights(a)
    opts = dict(method="soka", targets=targets, rank=rank, randomized=True, impl=impl)
    if mode == "fsdp":
        return fsdp.load_sharded(Transformer, a, weights, mesh=mesh, device=device, dtype=dtype, **opts)
    with torch.device("meta"):
        model = Transformer(a).to(dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name].read(0, p.shape[0], device=device, dtype=dtype))
    return model, adapters.inject(model, verbose=False, **opts)


def bench(mode, a, args, *, mesh, device, dtype, world):
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start_gib = torch.cuda.memory_allocated(device) / GiB if cuda else None    # what an earlier mode left
    t0 = time.perf_counter()
    model, report = build(mode, a, mesh=mesh, device=device, dtype=dtype, targets=args.targets.split(","),
                          rank=args.rank, impl=args.impl)
    sync(device)
    setup_s = time.perf_counter() - t0
    model.train()
    model.checkpointing = args.checkpointing
    model.compile_pointwise(args.compile)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if cuda else contextlib.nullcontext()
    step = eager_step(model, amp, torch.compile(ce_chunk) if args.compile else None)
    g = torch.Generator().manual_seed(1 + dist.get_rank())
    ids = torch.randint(0, a.vocab_size, (args.batch, args.seq), generator=g).to(device)
    n_tok = float(args.batch * (args.seq - 1) * world)

    def one():
        loss = step(ids, ids, n_tok).detach().double()
        if world > 1:
            all_reduce_grads(trainable, loss)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss
    for _ in range(args.warmup):
        one()
    sync(device)
    after_warmup = torch.cuda.memory_allocated(device) / GiB if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = one()
        sync(device)
        times.append(time.perf_counter() - t)
    mine = dict(peak_gib=torch.cuda.max_memory_allocated(device) / GiB if cuda else None,
                reserved_gib=torch.cuda.max_memory_reserved(device) / GiB if cuda else None,
                held_gib=after_warmup, step_s=sorted(times)[len(times) // 2])
    got = [None] * world
    dist.all_gather_object(got, mine)
    step_s = max(r["step_s"] for r in got)
    row = dict(mode=mode, world=world, setup_s=setup_s, step_s=step_s, loss=float(loss), start_gib=start_gib,
               tokens_per_s=args.batch * args.seq * world / step_s,
               tokens_per_s_per_gpu=args.batch * args.seq / step_s,
               peak_gib=max((r["peak_gib"] or 0) for r in got) if cuda else None,
               reserved_gib=max((r["reserved_gib"] or 0) for r in got) if cuda else None,
               held_gib=max((r["held_gib"] or 0) for r in got) if cuda else None,
               trainable=report["totals"]["trainable"], base_params=param_counts(a)["total"],
               modelled_gib=model_memory(args.shape, world, mode, targets=args.targets.split(","), rank=args.rank,
                                         tokens=args.batch * args.seq, checkpointing=args.checkpointing)["total"]
               if args.shape in ("7b", "13b", "70b") else None)
    del model, opt, trainable, step
    gc.collect()
    return row


def write(path, blob):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(blob, indent=1) + "\n")
    print(f"wrote {path}")


def run_step(args):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    mesh = fsdp.device_mesh(device)                       # a group of one without torchrun
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = SHAPES[args.shape]
    rows = []
    for mode in args.modes.split(","):
        try:
            rows.append(bench(mode, a, args, mesh=mesh, device=device, dtype=dtype, world=world))
        except torch.OutOfMemoryError as e:
            rows.append(dict(mode=mode, world=world, error=f"out of memory: {str(e).splitlines()[0][:160]}"))
            gc.collect()
            torch.cuda.empty_cache()
    if rank == 0:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
        print(f"{args.shape} shape ({param_counts(a)['total'] / 1e9:.2f} B parameters), SoKA on {args.targets} "
              f"at r = {args.rank}, {args.batch} × {args.seq} tokens per process, {world} × {name}"
              + (", checkpointing" if args.checkpointing else "") + (", compiled" if args.compile else ""))
        print(f"{'mode':>5} {'GPUs':>4} {'tokens/s':>9} {'per GPU':>8} {'step s':>7} {'peak GiB':>8} "
              f"{'reserved':>8} {'modelled':>8} {'set-up s':>8}")
        for r in rows:
            if "error" in r:
                print(f"{r['mode']:>5} {r['world']:>4}  {r['error']}")
                continue
            f = (lambda v: f"{v:8.2f}" if v is not None else f"{'-':>8}")
            print(f"{r['mode']:>5} {r['world']:>4} {r['tokens_per_s']:9,.0f} {r['tokens_per_s_per_gpu']:8,.0f} "
                  f"{r['step_s']:7.3f} {f(r['peak_gib'])} {f(r['reserved_gib'])} {f(r['modelled_gib'])} "
                  f"{r['setup_s']:8.1f}")
        out = args.out or f"benchmarks/results/fsdp_step_{args.shape}_{world}gpu.json"
        write(out, dict(kind="measured", shape=args.shape, device=name, torch=torch.__version__, world=world,
                        batch=args.batch, seq=args.seq, rank=args.rank, targets=args.targets, impl=args.impl,
                        checkpointing=args.checkpointing, compile=args.compile, steps=args.steps,
                        warmup=args.warmup, rows=rows))
    runs.end_distributed()


# ----------------------------------------------------------------------------- host memory of loading

def status_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def write_meta_checkpoint(folder, a, n_files, dtype):
    """A random Meta checkpoint of shape `a` in n_files consolidated.NN.pth, made one tensor at a time."""
    tensors = ((key, rows.read(0, rows.shape[0], device="cpu", dtype=dtype)) for key, rows in random_weights(a).items())
    write_meta_shards(folder, tensors, a, n_files)


def _load_worker(rank, world, port, folder, a, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    before = status_kib("VmHWM")
    weights = fsdp.checkpoint_weights(folder, a)
    t = time.perf_counter()
    model, _ = fsdp.load_sharded(Transformer, a, weights, mesh=fsdp.device_mesh(torch.device("cpu")),
                                 device=torch.device("cpu"), dtype=torch.bfloat16, method="soka", targets=ATTN,
                                 rank=8, randomized=True)
    queue.put(dict(rank=rank, seconds=time.perf_counter() - t, rss_before_gib=before / 2**20,
                   peak_rss_gib=status_kib("VmHWM") / 2**20, anon_gib=status_kib("RssAnon") / 2**20,
                   file_gib=status_kib("RssFile") / 2**20))
    del model
    runs.end_distributed()


def _whole_worker(folder, queue):
    torch.set_num_threads(1)
    before = status_kib("VmHWM")
    model, _ = load_checkpoint(folder, dtype=torch.bfloat16)
    adapters.inject(model, "soka", ATTN, rank=8, randomized=True, verbose=False)
    queue.put(dict(rank="one process, load_checkpoint + inject", rss_before_gib=before / 2**20,
                   peak_rss_gib=status_kib("VmHWM") / 2**20, anon_gib=status_kib("RssAnon") / 2**20,
                   file_gib=status_kib("RssFile") / 2**20))


def host_memory(args):
    """Peak resident memory of each process while it loads its shard of a random bf16 Meta checkpoint
    (`--host-shape`, --files consolidated files) on the CPU, against one process loading all of it."""
    a = ModelArgs(**json.loads(args.host_shape))
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp) / "ckpt"
        write_meta_checkpoint(folder, a, args.files, torch.bfloat16)
        size = sum(f.stat().st_size for f in folder.glob("*.pth")) / GiB
        queue = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=_load_worker, args=(r, args.procs, port, folder, a, queue)) for r in range(args.procs)]
        for p in procs:
            p.start()
        rows = [queue.get() for _ in procs]
        for p in procs:
            p.join()
        whole = ctx.Process(target=_whole_worker, args=(folder, queue))
        whole.start()
        rows.append(queue.get())
        whole.join()
    print(f"checkpoint: {param_counts(a)['total'] / 1e6:.0f} M parameters, bf16, {size:.2f} GiB in {args.files} files; "
          f"{args.procs} processes on the CPU (gloo)")
    print(f"{'process':>40} {'RSS before':>10} {'peak RSS':>9} {'anon':>6} {'file':>6}  GiB")
    for r in sorted(rows, key=lambda r: str(r["rank"])):
        print(f"{str(r['rank']):>40} {r['rss_before_gib']:10.2f} {r['peak_rss_gib']:9.2f} {r['anon_gib']:6.2f} "
              f"{r['file_gib']:6.2f}")
    write(args.out or f"benchmarks/results/fsdp_host_memory_{args.procs}proc.json",
          dict(kind="measured", what="host memory of sharded loading, CPU", shape=json.loads(args.host_shape),
               params=param_counts(a)["total"], checkpoint_gib=size, files=args.files, procs=args.procs,
               torch=torch.__version__, rows=rows))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def json_shape(text):
    """--host-shape: a JSON object of ModelArgs fields, checked here so a typo is one line."""
    try:
        ModelArgs(**json.loads(text))
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"not a JSON object of ModelArgs fields ({e})")
    return text


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="7b")
    p.add_argument("--modes", default="fsdp,ddp", help="comma-separated: fsdp, ddp")
    p.add_argument("--targets", default=",".join(ATTN))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--impl", choices=adapters.IMPLS, default="auto")
    p.add_argument("--batch", type=int, default=4, help="sequences per process per step")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--model-memory", action="store_true", help="print (and with --out save) the modelled memory")
    p.add_argument("--host-memory", action="store_true", help="measure host RSS of sharded loading on the CPU")
    p.add_argument("--host-shape", default='{"dim": 2048, "n_layers": 8, "n_heads": 16, "vocab_size": 32000}',
                   type=json_shape, help="--host-memory: the checkpoint's ModelArgs as JSON")
    p.add_argument("--files", type=int, default=2, help="--host-memory: consolidated.NN.pth files")
    p.add_argument("--procs", type=int, default=2, help="--host-memory: processes")
    p.add_argument("--tmp", default=None, help="--host-memory: where to write the checkpoint")
    args = p.parse_args()
    if args.model_memory:
        return print_model_memory(args.out)
    if args.host_memory:
        return host_memory(args)
    run_step(args)


if __name__ == "__main__":
    main()
