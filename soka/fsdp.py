"""Fully sharded data parallel training (PyTorch FSDP2, `fully_shard`): the frozen base split over the
processes, the adapters replicated. train.py --fsdp builds its model here; docs/multi_gpu.md has the
reasons and the memory.

    mesh = device_mesh(device)                          # torchrun's processes, or a group of one
    weights = checkpoint_weights(ckpt, args)            # {Meta key: Rows}, memory-mapped: nothing read yet
    model, report = load_sharded(Transformer, args, weights, mesh=mesh, device=device, dtype=torch.bfloat16,
                                 method="soka", targets=("wq", "wk", "wv", "wo"))   # or adapter="adapter.pt"

What each process does in load_sharded:

1. Builds the model on the meta device (shapes, no memory), in the model's dtype.
2. Makes the adapters. Adapted layer i belongs to process i mod world, which reads that one whole weight
   from the checkpoint and adapts it exactly as a one-process `adapters.inject` does: inject itself, on
   a module holding that layer, seeded seed + i (the KPSVD, the rank rule, the fingerprint). Resuming,
   it checks the saved layer's fingerprint against that weight instead. One all_gather_object gives
   every process every layer's record, in the adapter file's format (the factors: small).
3. Shards: `fully_shard` on each transformer block, then on the root (embeddings, final norm, output).
   The factors are `ignored_params`: replicated on every process, float32, never sharded.
4. Allocates only its shards (`to_empty`) and fills them: rows [a, b) of each parameter (FSDP2 splits
   dim 0 as torch.chunk does), copied out of the memory-mapped files, so only those bytes are read. An
   adapted layer's rows are W[a:b] − ΔW₀[a:b] in float32, rounded once: the one-process arithmetic (11).

Training is then data parallel: each process runs its micro-batches, one all_reduce sums the factors'
gradients in float32 (soka/steps.py all_reduce_grads), and every process takes the same AdamW step.
Rank 0 saves the adapter file and the optimizer state as one process does (both hold only the
replicated factors), so a run resumes on any number of processes.
"""
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from kpsvd import work_dtype
from soka import adapters
from soka.checkpoints import (SHARD_DIM, check_keys_and_shapes, check_layer_count, hf_tensors,
                              meta_shards, unpermute_rotary)


# ----------------------------------------------------------------------------- reading by rows

class Rows:
    """One tensor of a checkpoint, read by rows: `parts` are memory-mapped tensors joined along `dim`
    (Meta's model-parallel shards); `index`, where given, re-orders the rows (HF's wq and wk).
    read(a, b) copies rows a..b-1 of the joined tensor to the device: only their bytes are read."""

    def __init__(self, parts, dim=0, index=None):
        self.parts, self.dim, self.index = parts, dim, index
        shape = list(parts[0].shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        self.shape, self.dtype = tuple(shape), parts[0].dtype

    def read(self, a, b, *, device, dtype):
        def get(t):
            return t.to(device=device, dtype=dtype, copy=True)
        if self.index is not None:
            return get(self.parts[0][self.index[a:b]])
        if self.dim == 1:
            return torch.cat([get(p[a:b]) for p in self.parts], dim=1)
        pieces, start = [], 0
        for p in self.parts:                    # the parts are consecutive row blocks
            lo, hi = max(a - start, 0), min(b - start, p.shape[0])
            if lo < hi:
                pieces.append(get(p[lo:hi]))
            start += p.shape[0]
        if not pieces:                          # an empty shard: more processes than rows
            return torch.empty((0, *self.shape[1:]), device=device, dtype=dtype)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def meta_weights(folder):
    """{key: Rows} of Meta's consolidated.*.pth shards, memory-mapped, the model-parallel parts not joined."""
    folder = Path(folder)
    _, shards = meta_shards(folder)
    out = {}
    for k in sorted(set(shards[0]) - {"rope.freqs"}):    # Meta's rotary table: recomputed from rope_theta
        parts = [shard[k] for shard in shards]
        name = k.split(".")[-2] if k.endswith(".weight") else k
        if len(parts) == 1 or name not in SHARD_DIM:     # norms are replicated in every shard
            out[k] = Rows(parts[:1])
            continue
        dim = SHARD_DIM[name]
        if any(p.ndim != 2 or p.shape[1 - dim] != parts[0].shape[1 - dim] for p in parts):
            raise ValueError(f"{folder}: shards of {k} do not join along dim {dim}: "
                             f"{[tuple(p.shape) for p in parts]}")
        out[k] = Rows(parts, dim)
    return out


def hf_weights(folder, *, n_heads, n_kv_heads, tied):
    """{Meta key: Rows} of an HF folder's safetensors files, memory-mapped; wq and wk read through a row
    index that puts HF's rows back in Meta's order (checkpoints.unpermute_rotary, applied to row numbers)."""
    folder = Path(folder)
    out = {}
    for _, meta_key, t in hf_tensors(folder, tied=tied):
        heads = n_heads if meta_key.endswith("wq.weight") else n_kv_heads if meta_key.endswith("wk.weight") else 0
        order = unpermute_rotary(torch.arange(t.shape[0])[:, None], heads)[:, 0] if heads else None
        out[meta_key] = Rows([t], index=order)
    return out


def checkpoint_weights(path, args):
    """{Meta key: Rows} of a Meta or Hugging Face folder; nothing is read until Rows.read."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "params.json").is_file():
        return meta_weights(path)
    if path.is_dir() and (path / "config.json").is_file():
        return hf_weights(path, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, tied=args.tie_embeddings)
    raise ValueError(f"{path}: sharded loading reads a Meta or Hugging Face folder")


# ----------------------------------------------------------------------------- processes and shards

def device_mesh(device):
    """A 1-D mesh of all processes; one process without torchrun gets a process group of its own."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
    return init_device_mesh(device.type, (dist.get_world_size(),))


def local_rows(p):
    """(a, b): the rows of the whole parameter p (a DTensor sharded on dim 0) that this process holds.
    FSDP2 splits dim 0 as torch.chunk does: ceil(n / world) rows each, the last ones fewer or none."""
    n, world, rank = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
    size = -(-n // world)
    a = min(rank * size, n)
    b = min(a + size, n)
    if p.to_local().shape[0] != b - a:
        raise RuntimeError(f"fsdp.py: this process holds {p.to_local().shape[0]} rows of a {n}-row parameter, "
                           f"torch.chunk would give it {b - a}")
    return a, b


def shard(model, mesh, ignored=()):
    """fully_shard each transformer block, then the root (embeddings, final norm, output head).
    Blocks free their gathered weights after forward (gathered again for backward); the root keeps
    them until backward, since the loss applies the output head after the model's forward returns
    (steps.loss_sum). `ignored` parameters stay whole on every process."""
    mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)   # the stored dtype; float32 sums
    ignored = set(ignored)
    for block in model.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=True, mp_policy=mp, ignored_params=ignored)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp, ignored_params=ignored)


def _gather(mine, error):
    """Every process's (dict, error) -> the union of the dicts; an error anywhere is raised everywhere."""
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, (mine, error))
    errors = [e for _, e in got if e]
    if errors:
        raise ValueError(errors[0])
    return {k: v for part, _ in got for k, v in part.items()}


# ----------------------------------------------------------------------------- the model

def load_sharded(model_cls, args, weights, *, mesh, device, dtype, adapter=None, method="soka",
                 targets=adapters.DEFAULT_TARGETS, impl="auto", source="checkpoint", **options):
    """model_cls(args) with its frozen base sharded over `mesh` and its adapters replicated, each process
    reading only its rows of `weights` (checkpoint_weights) -> (model, report).

    adapter None: new adapters, those `adapters.inject(model, method, targets, impl=impl, **options)`
    makes in one process, bit for bit. Else the path of an adapter file to continue, checked as
    adapters.load_adapter checks it. `source` names the checkpoint in error messages."""
    check_layer_count(args.n_layers, weights, source)
    with torch.device("meta"):
        model = model_cls(args).to(dtype)
    check_keys_and_shapes({k: v.shape for k, v in model.state_dict().items()}, weights, source)
    for p in model.parameters():
        p.requires_grad_(False)
    if adapter is None:
        records = _new_records(model, weights, method, targets, impl, options, device, dtype)
        blob = dict(method=method, layers=records,
                    options=next(iter(records.values()))["info"]["options"])
    else:
        blob = _saved_records(model, weights, adapter, device, dtype)
    for name, rec in blob["layers"].items():
        _place(model, name, rec, impl)
    layers = adapters.adapter_layers(model)
    shard(model, mesh, ignored=[getattr(layer, k) for _, layer in layers for k in layer.factor_names])
    model.to_empty(device=device)
    _fill(model, weights, blob["layers"], device, dtype)
    rows = [{k: v for k, v in rec["info"].items() if k not in ("base", "options")} for rec in blob["layers"].values()]
    return model, adapters._report(blob["method"], blob["options"], rows, verbose=False)


def _new_records(model, weights, method, targets, impl, options, device, dtype):
    """{layer name: adapter record} of the layers inject would adapt, in its order; each made once, by
    its owner, from the whole weight."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    found = adapters._find(model, targets)
    adapters._check_factor_shapes(options.get("factors"), [name.rsplit(".", 1)[-1] for name, _ in found])
    rank, world = dist.get_rank(), dist.get_world_size()
    mine, error = {}, None
    try:
        for i, (name, lin) in enumerate(found):
            if i % world == rank:
                W = weights[name + ".weight"].read(0, lin.weight.shape[0], device=device, dtype=dtype)
                mine[name] = _adapt_one(name, W, i, method, targets, impl, options)
                del W
    except (ValueError, OSError) as e:
        error = str(e)
    records = _gather(mine, error)
    return {name: records[name] for name, _ in found}


def _adapt_one(name, W, i, method, targets, impl, options):
    """Layer i's adapter record as a one-process inject makes it: inject itself, on a module holding this
    one layer (weight W) under its name, seeded seed + i; the record keeps the run's options."""
    holder = parent = nn.Module()
    *path, leaf = name.split(".")
    for part in path:
        parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(W, requires_grad=False)
    parent.add_module(leaf, lin)
    factors, seed = options.get("factors"), options.get("seed", 0)
    own = {leaf: factors[leaf]} if isinstance(factors, dict) and leaf in factors else \
        None if isinstance(factors, dict) else factors
    adapters.inject(holder, method, (leaf,), **{**options, "factors": own, "seed": seed + i}, impl=impl,
                    verbose=False)
    layer = holder.get_submodule(name)
    layer.info["options"] = {**layer.info["options"], "targets": list(targets), "factors": factors, "seed": seed}
    return adapters._record(layer)


def _saved_records(model, weights, path, device, dtype):
    """The adapter file at `path`, checked: every process checks names and shapes, the owner of each
    layer its base weight's fingerprint."""
    blob = adapters.read_adapter(path)
    named = dict(model.named_modules())
    for name, rec in blob["layers"].items():
        if not isinstance(named.get(name), nn.Linear):
            raise ValueError(f"{path}: the model has no linear layer {name}")
        adapters._check_record(path, name, rec, named[name].weight)
    rank, world = dist.get_rank(), dist.get_world_size()
    error = None
    for i, (name, rec) in enumerate(blob["layers"].items()):
        if i % world != rank or error:
            continue
        try:
            W = weights[name + ".weight"].read(0, named[name].weight.shape[0], device=device, dtype=dtype)
        except (ValueError, OSError) as e:
            error = str(e)
            continue
        want, got = rec["info"]["base"], adapters.fingerprint(W)
        for k in ("shape", "dtype", "sha256"):
            if want[k] != got[k] and not error:
                error = (f"{path}: base weight {name} differs from the one this adapter was made from ({k}: "
                         f"file {want[k]}, model {got[k]}); load the original base checkpoint")
    _gather({}, error)
    return blob


def _place(model, name, rec, impl):
    """The record's adapter layer in place of the linear layer `name`, on the meta device (shapes only)."""
    W = model.get_submodule(name).weight
    start = {k: t.to("meta") for k, t in (rec["init"] if rec["subtract"] else rec["params"]).items()}
    if rec["method"] == "soka":
        layer = adapters.SoKALinear(W, start["sigma"], start["U"], start["V"], subtract=rec["subtract"], impl=impl)
    elif rec["method"] == "pissa":
        layer = adapters.PiSSALinear(W, start["A"], start["B"])
    else:
        layer = adapters.LoRALinear(W, start["A"], start["B"], scale=rec["scale"])
    layer.info = rec["info"]
    adapters._place(model, name, layer)


@torch.no_grad()
def _fill(model, weights, records, device, dtype):
    """Each parameter's local rows from the checkpoint (an adapted layer's: minus its initial update),
    then the replicated factors and initial factors from the records."""
    layers = dict(adapters.adapter_layers(model))
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if owner in layers and leaf != "weight":
            continue                            # a factor: below
        a, b = local_rows(p)
        rows = weights[name].read(a, b, device=device, dtype=dtype)
        if owner in layers and records[owner]["subtract"]:
            layer = layers[owner]
            for k, t in records[owner]["init"].items():     # delta() of the initial factors: ΔW₀
                getattr(layer, k).copy_(t)
            rows = (rows.to(work_dtype(dtype)) - layer.delta()[a:b]).to(dtype)
        p.to_local().copy_(rows)
    for name, layer in layers.items():
        rec = records[name]
        for k in layer.factor_names:
            getattr(layer, k).copy_(rec["params"][k])
            if rec["subtract"]:
                getattr(layer, k + "0").copy_(rec["init"][k])
