"""A training run's bookkeeping, so that train.py reads as the loop: option checks, resume, the run
folder's checkpoint, distributed set-up, Ctrl-C, the curves.

A run folder holds config.json, metrics.jsonl, ranks.txt / ranks.json, checkpoint/ (adapter.pt and
state.pt, replaced as a whole every --save-every steps), and at the end adapter.pt, eval.json and
curves.png. A folder that holds a run is never written over: --resume continues it, and refuses
options that would make it another run.
"""
import argparse
import datetime
import gc
import json
import math
import os
import random
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from soka.adapters import IMPLS, LORA_RANK, check_impl, save_adapter
from soka.checkpoints import first_line
from soka.tokenizer import json_object

# What makes a run the run it is: a resume that changed one of these would continue another run
# (other data, model, adapters or batches). --epochs, --max-steps, --lr and the evaluation options may
# change (the schedule follows the new total).
FIXED_ON_RESUME = ("task", "ckpt", "method", "targets", "rank", "factors", "tau", "r_min", "r_max", "rank_rule",
                   "init", "alpha", "batch_size", "grad_accum", "max_len", "heldout", "seed")
SOKA_ONLY = ("tau", "r_min", "r_max", "rank_rule", "factors", "init", "soka_impl")  # LoRA / PiSSA: one fixed --rank


def check_options(cfg, given):
    """Refuse option values that would crash later or silently mean something else; `given` names the
    options on the command line."""
    if cfg.method != "soka" and (soka_only := [o for o in SOKA_ONLY if o in given]):
        raise SystemExit(f"train.py: --{soka_only[0].replace('_', '-')} is a SoKA option; {cfg.method} "
                         f"trains one fixed --rank (default {LORA_RANK})")
    if cfg.re_evaluate and not cfg.resume:
        raise SystemExit("train.py: --re-evaluate evaluates a finished run again: give it with --resume FOLDER")
    if cfg.fsdp and (cfg.eval_only or not cfg.ckpt):
        raise SystemExit("train.py: --fsdp trains a model read from a Meta or Hugging Face folder (--ckpt); "
                         "--eval-only and the demo model (a GGUF file) run in one process without it")
    if cfg.eval_only and (cfg.resume or cfg.eval_limit == 0):
        raise SystemExit("train.py: --eval-only evaluates --ckpt as it is: it takes neither --resume (the "
                         "run's evaluation is in its eval.json) nor --eval-limit 0")

    def need(ok, option, rule):
        if not ok:
            raise SystemExit(f"train.py: --{option.replace('_', '-')} must be {rule}, got {getattr(cfg, option)!r}")
    for o in ("batch_size", "grad_accum", "max_len", "save_every"):
        need(getattr(cfg, o) >= 1, o, "≥ 1")
    for o in ("eval_every", "heldout", "warmup", "clip", "weight_decay", "eval_batch_size"):
        need(getattr(cfg, o) >= 0, o, "≥ 0")
    for o in ("max_steps", "max_new_tokens", "stop_after"):
        need(getattr(cfg, o) is None or getattr(cfg, o) >= 1, o, "≥ 1")
    need(cfg.eval_limit is None or cfg.eval_limit >= 0, "eval_limit", "≥ 0 (0: no evaluation)")
    need(cfg.epochs > 0, "epochs", "> 0")
    need(cfg.lr > 0, "lr", "> 0")
    need(0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
    for o in ("lr", "epochs", "warmup", "clip", "weight_decay", "tau", "alpha"):
        need(getattr(cfg, o) is None or math.isfinite(getattr(cfg, o)), o, "a finite number")
    need(cfg.warmup < 1 or float(cfg.warmup).is_integer(), "warmup",
         "a whole number of steps, or a fraction (< 1) of them")
    # the adapters' options, here rather than after minutes of loading the model
    need(cfg.rank is None or cfg.rank >= 1, "rank", "≥ 1")
    need(0 < cfg.tau <= 1, "tau", "in (0, 1]")
    need(cfg.r_min >= 1, "r_min", "≥ 1")
    need(cfg.r_max >= cfg.r_min, "r_max", f"≥ --r-min ({cfg.r_min})")


def check_setup(cfg, world, device):
    """Refuse what the processes and the device cannot run."""
    if cfg.eval_only and world > 1:
        raise SystemExit("train.py: --eval-only runs in one process (python train.py, not torchrun)")
    if cfg.log_weight_grad and world > 1:
        raise SystemExit("train.py: --log-weight-grad runs in one process (python train.py, not torchrun)")
    if cfg.log_weight_grad and cfg.fsdp:
        raise SystemExit("train.py: --log-weight-grad runs without --fsdp (the whole model in one process)")
    if cfg.method == "soka" and cfg.soka_impl == "fused":
        try:
            check_impl("fused", device)
        except ValueError as e:
            raise SystemExit(f"train.py: --soka-impl fused: {e}") from None


def refuse_existing(out):
    """A new run never writes into a folder that holds one."""
    if out and any((Path(out) / f).exists() for f in ("config.json", "checkpoint", "checkpoint.old")):
        raise SystemExit(f"--out {out} holds a run already; continue it with --resume {out}, "
                         f"or give another --out (nothing was written)")


def target_list(targets):
    """--targets "wq, wv," -> ["wq", "wv"]."""
    return [t.strip() for t in targets.split(",") if t.strip()]


def resumed_config(folder, given, defaults, kinds):
    """The saved config of the run in `folder`, over the parser's `defaults`, with the options `given`
    on the command line on top; refuses a changed FIXED_ON_RESUME option or process count, and a saved
    value of the wrong kind (`kinds`: option -> (type, choices), as the parser takes it)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise SystemExit(f"--resume {folder}: no config.json there (not a train.py output folder)")
    try:
        saved = json_object(path)
    except ValueError as e:                 # names the file: not valid JSON, or not an object
        raise SystemExit(f"--resume {folder}: {e}") from None
    if saved.get("soka_impl") not in IMPLS:     # a name this code does not have (or none): the default
        saved["soka_impl"] = "auto"
    for k, v in saved.items():              # an edited file: "lr": "2e-4" would fail deep in the run
        if k not in kinds or v is None and defaults.get(k) is None:
            continue
        kind, choices = kinds[k]
        if not _fits(v, kind, choices):
            want = f"one of {', '.join(map(str, choices))}" if choices else f"a {kind.__name__}"
            raise SystemExit(f"--resume {folder}: {path.name} has {k} = {v!r}, not {want}")

    def same(k, a, b):
        if k == "ckpt" and a and b:
            return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
        if k == "targets" and isinstance(a, str) and isinstance(b, str):
            return target_list(a) == target_list(b)
        return a == b
    for k in FIXED_ON_RESUME:               # a key the saved config lacks had the parser's default
        if k in given and not same(k, given[k], saved_k := saved.get(k, defaults.get(k))):
            raise SystemExit(f"--resume {folder}: --{k.replace('_', '-')} {given[k]!r} differs from the run's "
                             f"{saved_k!r}; a resumed run keeps its task, model, adapters, data and batch "
                             f"(start a new run with another --out)")
    world, was = int(os.environ.get("WORLD_SIZE", "1")), saved.get("world")
    if was is not None and was != world:    # every step's sequences are split over the processes
        if not (saved.get("fsdp") or given.get("fsdp")):
            raise SystemExit(f"--resume {folder}: the run had {was} processes, this one has {world}; "
                             f"resume it with {was} (torchrun --nproc_per_node={was})")
        # An FSDP run's state is the replicated adapters' (soka/fsdp.py): it continues on another number
        # of processes, each step the same micro-batches (grad_accum × processes stays).
        micro = saved.get("grad_accum", 1) * was
        if micro % world:
            raise SystemExit(f"--resume {folder}: the run's {micro} micro-batches per step do not split over "
                             f"{world} processes; resume it on a number of processes that divides {micro}")
        saved["grad_accum"] = micro // world
    return argparse.Namespace(**{**defaults, **saved, **given, "out": folder})


def _fits(value, kind, choices):
    """Whether a value read from config.json is one the parser could have given: of its type (an int
    passes for a float: a config edited by hand may say 3 for 3.0), and among its choices."""
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind in (int, bool):
        ok = type(value) is kind
    else:
        ok = isinstance(value, str)
    return ok and (not choices or value in choices)


def parse_factors(text):
    """--factors: None, "m,n,p,q" -> a tuple, or a JSON object -> {target: (m, n, p, q)}."""
    if not text:
        return None
    try:
        v = json.loads(text) if text.lstrip().startswith("{") else [int(f) for f in text.split(",")]
        v = {k: tuple(int(f) for f in s) for k, s in v.items()} if isinstance(v, dict) else tuple(v)
        if not all(len(s) == 4 for s in (v.values() if isinstance(v, dict) else [v])):
            raise ValueError("four numbers each")
    except (ValueError, TypeError, AttributeError) as e:
        raise SystemExit(f"--factors {text!r}: expected \"m,n,p,q\" or {{\"wq\": [m, n, p, q], ...}} ({e})")
    return v


@contextmanager
def input_errors():
    """Turn the errors of reading the user's files and options (OSError: missing, unreadable or not
    downloadable; ValueError: malformed or inconsistent) into an exit with their message."""
    try:
        yield
    except (OSError, ValueError) as e:
        raise SystemExit(f"train.py: {first_line(e, limit=2000)}") from e


def setup_distributed(device_arg):
    """(rank, world, device). torchrun sets RANK/WORLD_SIZE; NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if (device_arg or "").startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device_arg}: torch {torch.__version__} sees no CUDA device here "
                         f"(--device cpu, or leave --device out)")
    cuda = torch.cuda.is_available() and (device_arg or "cuda").startswith("cuda")
    if world == 1:
        return 0, 1, torch.device(device_arg or ("cuda" if cuda else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))  # rank 0 evaluates alone
    return rank, world, torch.device(f"cuda:{local}" if cuda else "cpu")


def end_distributed():
    """Wait for every process, then destroy the process group, if there is one. Call it once the
    sharded model is out of scope: FSDP's state holds the group, in reference cycles, and
    destroy_process_group only drops torch's own reference. A group still held then is freed at
    interpreter exit, where tearing down gloo's threads can abort the finished process (SIGABRT)."""
    if dist.is_initialized():
        gc.collect()                        # the model's reference cycles, and with them its hold on the group
        dist.barrier()
        dist.destroy_process_group()


def count_params(model):
    """(all parameters, trainable ones). Buffers are left out: the adapters' only buffers are copies
    of their initial factors (kept for save_adapter), not weights the model computes with."""
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- the checkpoint

def save_checkpoint(out, model, opt, step, n_metrics):
    """out/checkpoint/{adapter.pt, state.pt}, replaced as a whole: written to checkpoint.tmp, then
    renamed; a crash in between leaves checkpoint.old, which resume also accepts."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_adapter(model, tmp / "adapter.pt")
    key, mt, pos, has_gauss, gauss = np.random.get_state()   # tensors and plain values only (weights_only)
    rng = dict(python=random.getstate(), torch=torch.get_rng_state(),
               numpy=dict(key=key, state=torch.from_numpy(mt.astype(np.int64)), pos=pos, has_gauss=has_gauss,
                          cached_gaussian=gauss),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    torch.save(dict(step=step, n_metrics=n_metrics, optimizer=opt.state_dict(), rng=rng), tmp / "state.pt")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


# What unpickling a plain NumPy array needs, and nothing else (weights_only=True refuses the rest)
NUMPY_ARRAY = [np.zeros(1).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]  # [0]: _reconstruct


def find_checkpoint(out):
    """(folder, its state.pt loaded): checkpoint/, or checkpoint.old/ where a crash during a save left
    checkpoint/ missing or unreadable. state.pt is read with weights_only=True: tensors and plain
    containers, so a planted file runs no code, it only fails to load."""
    problems = []
    for name in ("checkpoint", "checkpoint.old"):
        d = out / name
        if not ((d / "state.pt").is_file() and (d / "adapter.pt").is_file()):
            problems.append(f"{d}: no adapter.pt and state.pt")
            continue
        try:
            # a state.pt whose NumPy RNG state is an array, not a tensor, loads too: that class is allowed by name
            with torch.serialization.safe_globals(NUMPY_ARRAY):
                state = torch.load(d / "state.pt", map_location="cpu", weights_only=True)
            if not _is_state(state):
                raise ValueError("not a train.py state (step and n_metrics counts, optimizer and rng dicts)")
        except Exception as e:                # a truncated, foreign or planted file: torch raises many kinds
            problems.append(f"{d / 'state.pt'}: unreadable ({first_line(e)})")
            continue
        if problems:
            print(f"warning: {'; '.join(problems)}; using {d}")
        return d, state
    raise SystemExit(f"{out}: no checkpoint to resume from: {'; '.join(problems)}")


def _is_state(state):
    """What save_checkpoint writes: {step, n_metrics (counts), optimizer, rng (dicts)}."""
    return (isinstance(state, dict) and {"step", "n_metrics", "optimizer", "rng"} <= state.keys()
            and all(type(state[k]) is int and state[k] >= 0 for k in ("step", "n_metrics"))
            and all(isinstance(state[k], dict) for k in ("optimizer", "rng")))


def restore_state(opt, state, out, state_dir):
    """The optimizer, the random states and the metrics lines where the checkpoint in `state_dir` left
    them; -> (step, metrics). A state that does not fit this run is one line naming its file."""
    try:
        opt.load_state_dict(state["optimizer"])
        for group in opt.param_groups:      # load_state_dict checks the groups' sizes, not the tensors'
            for i, p in enumerate(group["params"]):
                for k, t in opt.state[p].items():
                    if k != "step" and (not isinstance(t, torch.Tensor) or t.shape != p.shape):
                        raise ValueError(f"optimizer state {k} of parameter {i} is not of its shape {tuple(p.shape)}")
        restore_rng(state["rng"])
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        raise SystemExit(f"{state_dir / 'state.pt'}: does not fit this run ({first_line(e)})") from None
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines()[:state["n_metrics"]] if path.exists() else []
    metrics = []
    for i, line in enumerate(lines, 1):
        try:
            metrics.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{i}: not valid JSON ({e})") from None
        if not isinstance(metrics[-1], dict) or type(metrics[-1].get("step")) is not int:
            raise SystemExit(f"{path}:{i}: not a metrics line {{\"step\": N, ...}}")
    return state["step"], metrics


def restore_rng(rng):
    """The random states save_checkpoint stored, so a resumed run draws what the run would have."""
    random.setstate(rng["python"])
    n = rng["numpy"]
    if isinstance(n, dict):
        n = (n["key"], n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


class StopRequest:
    """Ctrl-C during training: the first asks the loop to stop after the current step (which is then
    checkpointed); the second stops at once with one line naming the last checkpoint, `saved`, the
    step the loop last wrote."""

    def __init__(self, say, out, saved):
        self.requested, self.say, self.out, self.saved = False, say, out, saved
        signal.signal(signal.SIGINT, self._handler)

    def _handler(self, *_):
        if self.requested:
            self.say(f"\nstopped now; the last checkpoint is step {self.saved}: python train.py --resume {self.out}")
            raise SystemExit(130)
        self.requested = True
        self.say("\nCtrl-C: stopping after this step (again to stop now)")

    def close(self):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def finished(folder, cfg):
    """None while the run in `folder` has training or its evaluation to do; else the line that says
    it is complete (adapter.pt is written once training ends, eval.json once it is evaluated)."""
    folder = Path(folder)
    if not (folder / "adapter.pt").is_file():
        return None
    if cfg.eval_limit == 0:
        result = "evaluation off (--eval-limit 0)"
    elif (folder / "eval.json").is_file():
        try:
            r = json_object(folder / "eval.json")
            result = f"eval.json: {r['correct']}/{r['n']} correct on {r['task']}"
        except (ValueError, KeyError, TypeError):
            return None                     # unreadable: evaluate again
    else:
        return None
    return (f"--resume {folder}: the run is complete (adapter.pt, {result}); nothing to do. "
            f"Add --re-evaluate to evaluate its adapter again")


# ----------------------------------------------------------------------------- outputs

def summary(metrics):
    """The closing line's numbers: loss at the start and end, the largest gradient norm, tokens/s."""
    losses = [m["loss"] for m in metrics]
    k = max(1, min(50, len(losses) // 4))
    timed = metrics[1:] or metrics      # the first step includes compiling and graph capture
    secs = sum(m["time_s"] for m in timed)
    return (f"loss {np.mean(losses[:k]):.4f} → {np.mean(losses[-k:]):.4f} (mean of first/last {k}), "
            f"largest gradient norm {max(m['grad_norm'] for m in metrics):.3f}, "
            f"{sum(m['tokens'] for m in timed) / secs:,.0f} tokens/s "
            f"({secs:.1f} s{' past the first step' if len(metrics) > 1 else ''})")


def plot_curves(metrics, path):
    """Training loss, held-out loss and gradient norm against the step, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [m["step"] for m in metrics]
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a.plot(steps, [m["loss"] for m in metrics], lw=0.8, label="train")
    held = [(m["step"], m["heldout_loss"]) for m in metrics if m.get("heldout_loss") is not None]
    if held:
        a.plot(*zip(*held), "o-", label="held-out")
    a.set_ylabel("loss (nats / answer token)")
    a.legend()
    b.plot(steps, [m["grad_norm"] for m in metrics], lw=0.8, color="C2", label="global L2 norm")
    b.axhline(1.5, ls="--", color="gray", lw=0.8, label="1.5: steps above it count as spikes")
    b.set_ylabel("gradient norm (before clipping)")
    b.legend()
    b.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def auto_eval_batch(model, n, max_tokens, device):
    """As many rows as fit their bf16 KV cache (max_tokens each) in a third of the free GPU memory:
    SmolLM2 with 832 tokens needs 19 MiB a row, LLaMA-2-7B 416 MiB. (generate's prefill runs
    model.PREFILL_TOKENS prompt tokens at a time, so the cache is what grows with the rows.)"""
    if device.type != "cuda":
        return min(n, 32)
    a = model.args
    per_row = 2 * a.n_layers * a.n_kv_heads * a.head_dim * max_tokens * 2      # keys + values, bytes
    return max(1, min(n, int(torch.cuda.mem_get_info(device)[0] / 3 / per_row)))
