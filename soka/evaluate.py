"""Evaluation: batched generation over a split, scoring, and a results file.

    python train.py --eval-only --task gsm8k --eval-limit 100        # a checkpoint, without training

    from model import generate
    result = evaluate(model, tokenizer, "math", load_examples("math", "math500"), generate_fn=generate,
                      batch_size=32, max_new_tokens=512, out_path="out/math500.json")
    result["accuracy"], result["examples"][0]   # {id, prompt, completion, extracted, gold, verdict, error}
    # out/math500.jsonl beside it: one line per problem {id, prediction, extracted, gold, verdict, error}

Prompts come from soka.tasks (the same format as fine-tuning), are sorted by token length (longest
first, so an out-of-memory shows up in the first batch) and generated `batch_size` at a time with
`generate_fn` (model.generate's signature). GSM8K and MATH are scored in one child process, each
example under a time limit (MATH's sympy step has a child of its own); MBPP programs run in parallel
sandboxed processes. With out_path, the per-problem results go beside the results file as JSON
lines (problems_path: eval.json -> eval.jsonl), in the examples' order, so that per-problem
statistics (paired tests between runs) need no parsing of the whole file. This module receives a
model and its generate function; it imports neither model.py nor the adapters.
"""
import time
from pathlib import Path

from tqdm import tqdm

from soka.files import json_lines, json_text, replace_files
from soka.sandbox import run_many
from soka.scorers import mbpp_extract_code, score_answers
from soka.tasks import TASKS, format_prompt


def score(task, examples, completions, *, timeout=10.0, workers=None, progress=False, time_limit=60.0):
    """[(extracted, verdict, error)] per completion; `error` is None, or why that example could not
    be scored (its verdict is then False). GSM8K and MATH: scorers.score_answers, each example in a
    child process with `time_limit` seconds, so one hostile completion (an exception, a hang) costs
    only its own verdict. MBPP: the program is the first fenced block (else the whole completion),
    run against the task's asserts with `timeout` seconds each."""
    if task in ("gsm8k", "math"):
        return score_answers(task, completions, [ex["gold"] for ex in examples], time_limit=time_limit)
    if task == "mbpp":
        programs = [mbpp_extract_code(c) for c in completions]
        runs = run_many([(p, ex["tests"], ex["setup_code"]) for p, ex in zip(programs, examples)],
                        timeout=timeout, workers=workers, progress=progress)
        return [(p, r.passed, None) for p, r in zip(programs, runs)]
    raise ValueError(f"soka/evaluate.py: unknown task {task!r}; choose one of {TASKS}")


def evaluate(model, tokenizer, task, examples, *, generate_fn, batch_size=16, max_new_tokens=512,
             temperature=0.0, top_p=1.0, seed=0, out_path=None, timeout=10.0,
             workers=None, progress=True, info=None, generate_options=None):
    """Generate for every example, score, and return (and write to `out_path`, atomically):
    {task, n, correct, accuracy, settings, seconds, examples: [{id, prompt, completion, extracted,
    gold, verdict, error}]}, error being None or why that example could not be scored (score()).
    With out_path, also problems_path(out_path): one JSON line per example {id, prediction (the
    completion), extracted, gold, verdict, error}; the two files are replaced together (soka/files.py).
    `generate_fn` is model.generate or a function of its signature, and `generate_options` go to it
    as extra keywords (e.g. cuda_graph=True); `info` is any extra JSON-able dict stored under
    settings (checkpoint, split, adapter ...).

    A prompt too long for max_new_tokens within the model's context (model.args.max_seq_len) gets
    what room is left, in a batch of its own (one MBPP test prompt is 3,752 LLaMA 2 tokens: 344 of
    its 384 fit in 4,096); one that fills the context gets an empty completion. Both are listed
    under settings["context_capped"] as {id: new tokens it got}."""
    if out_path is not None and Path(out_path).suffix.lower() != ".json":   # its .jsonl sibling is written too
        raise ValueError(f"soka/evaluate.py: out_path {out_path} should end in .json (eval.json beside eval.jsonl)")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"soka/evaluate.py: batch_size ({batch_size}) and max_new_tokens "
                         f"({max_new_tokens}) must be >= 1")
    prompts = [format_prompt(task, ex, tokenizer) for ex in examples]
    ids = [tokenizer.encode(p) for p in prompts]
    context = getattr(getattr(model, "args", None), "max_seq_len", None)
    budget = [max_new_tokens if context is None else min(max_new_tokens, context - len(x)) for x in ids]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    batches = []                            # runs of `order` with one budget, at most batch_size long
    for b0, i in enumerate(order):
        if not batches or len(batches[-1][1]) == batch_size or budget[batches[-1][1][0]] != budget[i]:
            batches.append((b0, []))
        batches[-1][1].append(i)
    stop = (tokenizer.end_of_turn,) if tokenizer.end_of_turn else ()
    completions = [""] * len(examples)
    t0 = time.perf_counter()
    with tqdm(total=len(examples), desc=f"{task}: generate", unit="ex", disable=not progress) as bar:
        for b0, rows in batches:
            if budget[rows[0]] < 1:                              # the prompt fills the context
                bar.update(len(rows))
                continue
            outs = generate_fn(model, tokenizer, [ids[i] for i in rows], max_new_tokens=budget[rows[0]],
                               temperature=temperature, top_p=top_p, stop=stop,
                               seed=None if seed is None else seed + b0, **(generate_options or {}))
            for i, out in zip(rows, outs):
                out = list(out)
                out = out[:out.index(tokenizer.eos_id)] if tokenizer.eos_id in out else out
                completions[i] = _trim(tokenizer.decode(out), stop)
            bar.update(len(rows))
    t1 = time.perf_counter()
    scored = score(task, examples, completions, timeout=timeout, workers=workers, progress=progress)
    t2 = time.perf_counter()
    correct = sum(bool(v) for _, v, _ in scored)
    result = {
        "task": task, "n": len(examples), "correct": correct,
        "accuracy": correct / len(examples) if examples else 0.0,
        "settings": {"batch_size": batch_size, "max_new_tokens": max_new_tokens,
                     "temperature": temperature, "top_p": top_p, "seed": seed, "stop": list(stop),
                     "mbpp_timeout_s": timeout, **(info or {}),
                     "context_capped": {examples[i]["id"]: max(0, n) for i, n in enumerate(budget)
                                        if n < max_new_tokens}},
        "seconds": {"generate": round(t1 - t0, 3), "score": round(t2 - t1, 3)},
        "examples": [{"id": ex["id"], "prompt": p, "completion": c, "extracted": x,
                      "gold": ex["gold"], "verdict": bool(v), "error": e}
                     for ex, p, c, (x, v, e) in zip(examples, prompts, completions, scored)],
    }
    if out_path is not None:               # the pair replaced together: an interruption leaves the old pair
        lines = json_lines({"id": r["id"], "prediction": r["completion"], "extracted": r["extracted"],
                            "gold": r["gold"], "verdict": r["verdict"], "error": r["error"]}
                           for r in result["examples"])
        replace_files({problems_path(out_path): lambda p: p.write_text(lines, encoding="utf-8"),
                       out_path: lambda p: p.write_text(json_text(result), encoding="utf-8")})
    return result


def problems_path(out_path):
    """Where evaluate writes the per-problem JSON lines beside the results file: eval.json -> eval.jsonl."""
    return Path(out_path).with_suffix(".jsonl")


def _trim(text, stop):
    """Cut the completion at the first stop string (generate returns the ids that complete it).
    An EOS inside the ids was cut before decoding: decode() drops it, so its text cannot be found."""
    for s in stop:
        k = text.find(s)
        if k >= 0:
            text = text[:k]
    return text
