"""experiments/study.py end to end on a tiny random LLaMA (two short train.py runs on the CPU), its
plan (sweep extension, best rate, resume) on hand-made records, and experiments/plot_study.py's
tables, claim rule and PNGs on hand-made records.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_study.py
"""
import json
import math
import shutil
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import pytest
import torch

from experiments import check_tables as C
from kpsvd import factor_shape
from experiments import plot_study as P
from experiments import stats, study
from model import ModelArgs, Transformer, load_checkpoint
from soka.tokenizer import SentencePieceTokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = None   # conftest.py's data directory (the shipped GSM8K, a small tokenizer.model): set by `_data`
PNG = b"\x89PNG\r\n\x1a\n"


def lines(path):
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def write(path, records):
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


# ----------------------------------------------------------------------------- study.py

@pytest.fixture(scope="module", autouse=True)
def _data(small_data):
    global DATA
    DATA = small_data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer random model in Meta's layout, with a SentencePiece tokenizer.model beside it."""
    d = tmp_path_factory.mktemp("tiny")
    vocab = SentencePieceTokenizer(DATA / "llama2-tokenizer" / "tokenizer.model").vocab_size   # the model's ids all decode
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=32, max_seq_len=512)
    torch.manual_seed(0)
    torch.save(Transformer(args).state_dict(), d / "consolidated.00.pth")
    (d / "params.json").write_text(json.dumps({k: v for k, v in vars(args).items() if v is not None}))
    shutil.copy(DATA / "llama2-tokenizer" / "tokenizer.model", d / "tokenizer.model")
    return d


def small_study(monkeypatch, runs, **options):
    """study.py made cheap: GSM8K only, a few CPU steps of batch 2, run folders under `runs`."""
    monkeypatch.setattr(study, "COMMON", dict(batch_size=2, max_len=192, heldout=4, eval_every=2, warmup=0.03,
                                              save_every=10**6, device="cpu", **options))
    monkeypatch.setattr(study, "TASKS", ("gsm8k",))
    monkeypatch.setattr(study, "RUNS", runs)


def test_study_sweeps_resumes_reruns_failures_and_finals_at_the_best_rate(tiny, tmp_path, monkeypatch):
    results, runs = tmp_path / "results", tmp_path / "runs"
    results.mkdir()
    small_study(monkeypatch, runs, max_steps=3, eval_limit=2, max_new_tokens=4)
    monkeypatch.setattr(study, "LR_GRID", {m: (1e-3, 3e-3, 1e-2) for m in ("soka", "lora", "pissa")})
    monkeypatch.setattr(study, "SEEDS", (0,))
    real_settings = study.qkvo_settings                         # SoKA alone: one training run per stage
    monkeypatch.setattr(study, "qkvo_settings", lambda base: {**real_settings(base), "paper": {"soka": None}})
    argv = ["--setting", "paper", "--results", str(results), "--ckpt", str(tiny), "--data-dir", str(DATA)]

    # Two rates are finished by hand, the middle one with a held-out loss no random model reaches (so
    # it stays the best and the grid does not grow); the top rate failed once, so it runs again.
    spec = lambda lr, **kw: study.spec("sweep", "gsm8k", "paper", "soka", None, lr, 0, eval=False) | kw  # noqa: E731
    write(results / "sweep.jsonl", [spec(1e-3, status="done", heldout_final=99.0),
                                    spec(3e-3, status="done", heldout_final=0.01), spec(1e-2, status="exit 1")])
    assert study.main(["--stage", "sweep", *argv]) == 0
    recs = lines(results / "sweep.jsonl")
    assert len(recs) == 4
    r = recs[-1]
    assert r["id"] == "sweep/gsm8k/paper/soka/lr0.01/s0" and r["status"] == "done" and r["steps"] == 3
    assert "accuracy" not in r and 0.01 < r["heldout_final"] < 99 and r["side_by_side"] is False

    # summarize: every number is what train.py's metrics.jsonl says
    m = lines(runs / r["id"] / "metrics.jsonl")
    loss, gn = [x["loss"] for x in m], [x["grad_norm"] for x in m]
    assert r["loss"] == pytest.approx(loss, abs=1e-5) and r["grad_norm"] == pytest.approx(gn, abs=1e-4)
    assert r["heldout"] == [[x["step"], x["heldout_loss"]] for x in m if x["heldout_loss"] is not None]
    assert r["heldout_final"] == r["heldout"][-1][1] and [s for s, _ in r["heldout"]] == [2, 3]
    assert r["loss_first"] == pytest.approx(loss[0]) and r["loss_last"] == pytest.approx(loss[-1])
    assert r["gnorm_max"] == max(gn) and r["gnorm_above_1_5"] == pytest.approx(sum(g > 1.5 for g in gn) / 3)
    assert r["tokens"] == sum(x["tokens"] for x in m) and r["train_s"] == pytest.approx(sum(x["time_s"] for x in m), abs=0.01)
    report = json.loads((runs / r["id"] / "ranks.json").read_text())
    assert r["trainable"] == report["totals"]["trainable"] > 0 and len(r["ranks"]) == 2 * 4

    # a second call finds everything done and appends nothing
    assert study.main(["--stage", "sweep", *argv]) == 0
    assert len(lines(results / "sweep.jsonl")) == 4

    # the final stage trains at the sweep's best rate (the lowest final held-out loss) and evaluates
    assert study.main(["--stage", "final", *argv]) == 0
    (f,) = lines(results / "final.jsonl")
    assert f["id"] == "final/gsm8k/paper/soka/lr0.003/s0" and f["status"] == "done"
    assert f["n_eval"] == 2 and 0 <= f["accuracy"] <= 1 and f["correct"] == round(2 * f["accuracy"])
    # its per-problem results: the full lines beside eval.json, a compact copy with the records
    full = lines(runs / f["id"] / "eval.jsonl")
    compact = study.read_problems(results / f["problems"])
    assert [x["id"] for x in compact] == [x["id"] for x in full] and sum(x["v"] for x in compact) == f["correct"]


def test_processes_side_by_side_run_only_what_they_claim(tiny, tmp_path, monkeypatch):
    """--claims DIR: a run claimed by another process (a file in DIR) is left to it; the rest runs."""
    results, claims = tmp_path / "results", tmp_path / "claims"
    results.mkdir()
    small_study(monkeypatch, tmp_path / "runs", max_steps=2, eval_limit=1, max_new_tokens=2)
    write(results / "sweep.jsonl", [study.spec("sweep", "gsm8k", "paper", m, None, 1e-3, 0, eval=False)
                                    | dict(status="done", heldout_final=1.0) for m in ("soka", "lora", "pissa")])
    argv = ["--stage", "final", "--results", str(results), "--ckpt", str(tiny), "--data-dir", str(DATA),
            "--claims", str(claims), "--tag", "w1"]
    planned = [r["id"] for r in study.final_runs(study.qkvo_settings(load_checkpoint(tiny)[0]), study.read(results, "sweep"),
                                                  "paper", "final")]
    assert len(planned) == 3 * 3                            # seeds × methods
    free = planned[4]
    for run_id in planned:
        if run_id != free:
            assert study.claim(claims, run_id)               # another process's claims
    assert not study.claim(claims, planned[0])               # a claim is taken once
    assert study.main(argv) == 0
    recs = lines(results / "final-w1.jsonl")
    assert [r["id"] for r in recs] == [free] and recs[0]["status"] == "done" and recs[0]["side_by_side"] is True
    assert [r["id"] for r in study.read(results, "final")] == [free]   # read() joins the tagged files
    assert study.main(argv) == 0                             # everything claimed: nothing runs again
    assert len(lines(results / "final-w1.jsonl")) == 1


def test_a_failing_run_is_tried_twice_then_left(tiny, tmp_path, monkeypatch, capsys):
    """A run whose train.py exits non-zero is recorded as failed and not started again by the same
    process; the next invocation tries it once more, and after TRIES failures it stays undone."""
    results = tmp_path / "results"
    results.mkdir()
    small_study(monkeypatch, tmp_path / "runs", max_steps=2, eval_limit=1, max_new_tokens=2)
    monkeypatch.setattr(study, "SEEDS", (0,))
    real_settings = study.qkvo_settings
    monkeypatch.setattr(study, "qkvo_settings", lambda base: {**real_settings(base), "paper": {"soka": None}})
    write(results / "sweep.jsonl", [study.spec("sweep", "gsm8k", "paper", "soka", None, 1e-3, 0, eval=False)
                                    | dict(status="done", heldout_final=1.0)])
    calls = []

    def failing_train(cmd, **kw):
        calls.append(cmd)
        return study.subprocess.CompletedProcess(cmd, 1)
    monkeypatch.setattr(study.subprocess, "run", failing_train)
    argv = ["--stage", "final", "--results", str(results), "--ckpt", str(tiny), "--data-dir", str(DATA)]
    assert study.TRIES == 2
    assert study.main(argv) == 0 and len(calls) == 1
    assert study.main(argv) == 0 and len(calls) == 2
    assert study.main(argv) == 0 and len(calls) == 2
    assert [r["status"] for r in lines(results / "final.jsonl")] == ["exit 1", "exit 1"]
    capsys.readouterr()
    assert study.main([*argv, "--plan"]) == 0
    out = capsys.readouterr().out
    assert "stage final: 0 runs done, 0 to do" in out
    assert "final/gsm8k/paper/soka/lr0.001/s0  failed 2 times, not started again (last: exit 1)" in out

    # running out of GPU memory beside other processes (--claims) is not the run's failure: every
    # invocation tries it once more; alone, it counts as any failure
    (results / "final.jsonl").unlink()

    def out_of_memory(cmd, **kw):
        calls.append(cmd)
        kw["stdout"].write("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 12.00 MiB.\n")
        return study.subprocess.CompletedProcess(cmd, 1)
    monkeypatch.setattr(study.subprocess, "run", out_of_memory)
    for i in range(3):
        assert study.main([*argv, "--claims", str(tmp_path / f"claims{i}"), "--tag", "w0"]) == 0
    assert len(calls) == 2 + 3
    assert [r["status"] for r in lines(results / "final-w0.jsonl")] == ["out of memory"] * 3
    for _ in range(3):
        assert study.main(argv) == 0
    assert len(calls) == 2 + 3 + 2


def test_sweep_extends_a_grid_whose_best_rate_is_at_an_edge():
    st = {"paper": {"soka": None, "lora": 3, "pissa": 3}}
    rec = lambda m, lr, h, status="done": dict(  # noqa: E731
        study.spec("sweep", "gsm8k", "paper", m, st["paper"][m], lr, 0, eval=False), status=status, heldout_final=h)
    g = study.LR_GRID
    sweep = ([rec("soka", lr, 2 - i / 10) for i, lr in enumerate(g["soka"])]               # best: the top rate
             + [rec("lora", lr, 1 + i / 10) for i, lr in enumerate(g["lora"])]             # best: the bottom rate
             + [rec("pissa", lr, abs(i - 1) + 1) for i, lr in enumerate(g["pissa"])]       # best: inside
             + [rec("pissa", 1e-9, None, status="exit 1")])                                # failed: no best
    rates = lambda runs, m: sorted(r["lr"] for r in runs if r["method"] == m)  # noqa: E731
    runs = study.sweep_runs(st, sweep, ("paper",))
    assert rates(runs, "soka") == sorted([*g["soka"], float(f"{g['soka'][-1] * 3:.1g}")])
    assert rates(runs, "lora") == sorted([*g["lora"], float(f"{g['lora'][0] / 3:.1g}")])
    assert rates(runs, "pissa") == sorted([1e-9, *g["pissa"]])
    assert all(r["id"] == study.run_id(r) and r["stage"] == "sweep" and not r["eval"] for r in runs)
    # an unfinished grid does not grow yet
    assert rates(study.sweep_runs(st, sweep[1:], ("paper",)), "soka") == sorted(g["soka"])
    # it grows at most EXTEND times
    top = g["soka"][-1]
    more = sweep + [rec("soka", float(f"{top * 3 ** (i + 1):.1g}"), 0.5 - i / 10) for i in range(study.EXTEND - 1)]
    assert len(rates(study.sweep_runs(st, more, ("paper",)), "soka")) == len(g["soka"]) + study.EXTEND
    more.append(rec("soka", float(f"{top * 3 ** study.EXTEND:.1g}"), 0.1))
    assert len(rates(study.sweep_runs(st, more, ("paper",)), "soka")) == len(g["soka"]) + study.EXTEND
    # the final runs take each method's lowest final held-out loss
    final = study.final_runs(st, sweep, "paper", "final")
    best = {m: min((r for r in sweep if r["method"] == m and r["status"] == "done"), key=lambda r: r["heldout_final"])["lr"]
            for m in st["paper"]}
    assert {(r["method"], r["lr"]) for r in final} == set(best.items())
    assert best == {"soka": g["soka"][-1], "lora": g["lora"][0], "pissa": g["pissa"][1]}


def test_factor_shapes_stage_trains_one_parameter_count():
    """The shapes stage before any shapes sweep: each shape at the fixed rank and SoKA's best rate, the
    shapes' factors valid for SmolLM2's layers and with the rule's parameters per term, passed to
    train.py as JSON."""
    from kpsvd import factor_shape
    sweep = [dict(study.spec("sweep", "gsm8k", "paper", "soka", None, lr, 0, eval=False), status="done",
                  heldout_final=h) for lr, h in ((1e-3, 0.9), (3e-3, 0.8))]
    runs = study.shapes_runs(sweep)
    assert [(r["seed"], r["factors"]) for r in runs] == [(s, f) for s in study.SEEDS for f in study.SHAPES]
    assert {(r["rank"], r["lr"], r["task"], r["eval"]) for r in runs} == {(study.SHAPES_RANK, 3e-3, "gsm8k", True)}
    assert len({r["id"] for r in runs}) == len(runs)
    sizes = {"wq": (576, 576), "wo": (576, 576), "wk": (192, 576), "wv": (192, 576)}
    for r in runs:
        argv = study.argv_for(r, "m.gguf", "data", "out")
        assert f"--rank={study.SHAPES_RANK}" in argv
        given = [a for a in argv if a.startswith("--factors=")]
        if study.SHAPES[r["factors"]] is None:
            assert given == []                                   # the default rule
            continue
        factors = json.loads(given[0].removeprefix("--factors="))
        for t, (m, n, p, q) in factors.items():
            rule = factor_shape(*sizes[t])
            assert (m * p, n * q) == sizes[t] and m * n + p * q == rule[0] * rule[1] + rule[2] * rule[3]
    assert study.shapes_runs([]) == []                           # no sweep yet: nothing to run


def test_shapes_sweep_plans_each_shape_and_picks_its_own_rate():
    """shapes_sweep: every factor shape over SHAPES_LR_GRID (seed 0, no evaluation), grown at an edge;
    the shapes stage then runs each shape at its own best rate, and none while its sweep is under way."""
    grid = study.SHAPES_LR_GRID
    runs = study.shapes_sweep_runs([])
    variants = study.shape_variants()
    assert set(variants) == {*study.SHAPES, *study.FACTORS}
    assert sorted((r["factors"], r["lr"]) for r in runs) == sorted((f, lr) for f in variants for lr in grid)
    assert all(r["rank"] == variants[r["factors"]] and r["seed"] == 0 and not r["eval"]
               and r["stage"] == "shapes_sweep" and r["id"] == study.run_id(r) for r in runs)
    assert {r["rank"] for r in runs if r["factors"] in study.FACTORS} == {None, *study.FACTOR_RANKS.values()}
    assert all(r["rank"] == study.FACTOR_RANKS.get(r["factors"]) for r in runs if r["factors"] in study.FACTORS)
    assert len({r["id"] for r in runs}) == len(runs)

    rec = lambda f, lr, h, status="done": dict(  # noqa: E731
        study.spec("shapes_sweep", "gsm8k", "paper", "soka", variants[f], lr, 0, factors=f, eval=False),
        status=status, heldout_final=h)
    main = [dict(study.spec("sweep", "gsm8k", "paper", "soka", None, 3e-3, 0, eval=False), status="done",
                 heldout_final=0.8)]
    lr = lambda f, records: study.shape_lr(f, main, records)  # noqa: E731
    inside = [rec("tall_U", g, abs(i - 1) + 1) for i, g in enumerate(grid)]             # best: the middle rate
    top = [rec("wide_U", g, 2 - i / 10) for i, g in enumerate(grid)]                     # best: the top rate
    half = [rec("small_U", grid[0], 1.0), rec("small_U", grid[1], None, status="exit 1")]
    recs = inside + top + half
    assert lr("rule", recs) == 3e-3                          # not swept: SoKA's best rate
    assert lr("tall_U", recs) == grid[1]
    assert lr("small_U", recs) is None                       # under way (one rate failed, one not run)
    assert lr("wide_U", recs) is None                        # its grid grows past the top first
    grown = float(f"{grid[-1] * 3:.1g}")
    wide = sorted(r["lr"] for r in study.shapes_sweep_runs(recs) if r["factors"] == "wide_U")
    assert wide == sorted([*grid, grown])
    assert lr("wide_U", recs + [rec("wide_U", grown, 5.0)]) == grid[-1]       # the edge was the best
    assert lr("wide_U", recs + [rec("wide_U", grown, 0.1)]) is None           # a new edge: it grows again

    shapes = study.shapes_runs(main, recs)
    assert {(r["factors"], r["lr"]) for r in shapes} == {("rule", 3e-3), ("tall_U", grid[1])}
    assert len(shapes) == 2 * len(study.SEEDS)

    # the ablation: τ and random init at SoKA's rate, each unbalanced shape at its own once swept
    done = recs + [rec("small_U", g, 1 + i) for i, g in enumerate(grid)] + [rec("small_U", grid[0] / 3, 3.0)]
    assert study.shape_lr("small_U", main, done) == grid[0]
    abl = study.ablate_runs({}, main, done)
    assert {(r.get("factors"), r["lr"]) for r in abl} == {(None, 3e-3), ("small_U", grid[0]), ("large_U", 3e-3),
                                                          *((name, 3e-3) for name in study.FACTOR_RANKS)}
    for name, rank in study.FACTOR_RANKS.items():
        assert {r["rank"] for r in abl if r.get("factors") == name} == {rank}
    assert all(study.planned_lr(r, main, done) == r["lr"] for r in abl + shapes)


# ----------------------------------------------------------------------------- plot_study.py

def record(stage, task, method, seed, *, acc, held, lr=1e-3, noise=0.02, steps=60, **extra):
    """A finished run as study.summarize writes it: a falling loss with alternating noise."""
    rng = np.random.default_rng(seed)
    loss = list(np.linspace(1.5, 1.0, steps) + noise * (-1) ** np.arange(steps) + 1e-3 * rng.standard_normal(steps))
    gn = [3.0 if method == "soka" and i == 0 else 0.5 for i in range(steps)]
    r = dict(stage=stage, task=task, setting="paper", method=method, rank=None if method == "soka" else 3, lr=lr,
             seed=seed, eval=not stage.endswith("sweep"), **extra)
    r.update(id=f"{stage}/{task}/{method}/{'/'.join(map(str, extra.values()))}/lr{lr:g}/s{seed}", status="done",
             trainable=75 if method == "soka" else 100, ranks=[2], steps=steps, wall_s=1.0, train_s=2.0 + seed,
             tokens=1000, loss=loss, grad_norm=gn, heldout=[[20, held + 0.1], [40, held + 0.05], [60, held]],
             loss_first=float(np.mean(loss[:6])), loss_last=float(np.mean(loss[-6:])), heldout_final=held,
             gnorm_max=max(gn), gnorm_above_1_5=sum(g > 1.5 for g in gn) / steps)
    if r["eval"]:
        r.update(accuracy=acc, correct=round(acc * 200), n_eval=200, eval_s=1.0)
    return r


def test_moving_average_keeps_a_fixed_window():
    """The 21-step mean exists only where the whole window fits: no shrinking window at the ends, so
    a run's last points are not a mean of fewer steps."""
    x = np.arange(30, dtype=float) ** 2
    ma = P.moving_average(x)
    assert len(ma) == 30 - P.SMOOTH + 1
    assert ma[0] == pytest.approx(np.mean(x[:P.SMOOTH])) and ma[-1] == pytest.approx(np.mean(x[-P.SMOOTH:]))
    assert len(P.moving_average(x[:P.SMOOTH - 1])) == 0 and math.isnan(P.roughness(x[:5]))
    line = np.linspace(2, 1, 100)
    assert P.roughness(line) < 1e-12                                  # a trend is not roughness
    assert 0.09 < P.roughness(line + 0.1 * (-1) ** np.arange(100)) < 0.11
    assert P.moving_average(line) == pytest.approx(line[P.SMOOTH // 2:100 - P.SMOOTH // 2])


def tables_checked(res):
    """plot_study's tables of `res`, written to res/tables.md and checked by check_tables."""
    md = P.tables(res)
    (res / "tables.md").write_text(md)
    assert C.check(res, res / "tables.md") == []
    return md


def test_plot_study_tables_and_pngs(tmp_path):
    res, img = tmp_path / "results", tmp_path / "img"
    res.mkdir()
    # gsm8k: SoKA's accuracy beats LoRA's, ties PiSSA's; math: its held-out loss is worse than LoRA's.
    # math PiSSA seed 2 is missing; a failed run is ignored.
    acc = dict(gsm8k=dict(soka=(0.50, 0.52, 0.54), lora=(0.10, 0.12, 0.11), pissa=(0.51, 0.53, 0.50)),
               math=dict(soka=(0.2, 0.2, 0.2), lora=(0.2, 0.2, 0.2), pissa=(0.2, 0.2)))
    held = dict(gsm8k=dict(soka=0.8, lora=0.9, pissa=0.9), math=dict(soka=1.3, lora=1.0, pissa=1.3))
    final = [record("final", t, m, s, acc=a, held=held[t][m] + s / 1000, noise=0.01 if m == "soka" else 0.05)
             for t in acc for m in acc[t] for s, a in enumerate(acc[t][m])]
    stale = dict(record("final", "gsm8k", "soka", 3, acc=0.99, held=0.1), lr=1e-4, id="stale")   # off the best rate
    write(res / "final.jsonl", final + [dict(final[0], id="x", status="exit 1", accuracy=0.99), stale])
    write(res / "sweep.jsonl", [record("sweep", "gsm8k", m, 0, acc=None, held=h, lr=lr)
                                for m in ("soka", "lora") for lr, h in ((1e-4, 1.2), (1e-3, 1.1), (1e-2, 1.3))])
    assert P.main(["--results", str(res), "--img", str(img), "--out", str(tmp_path / "tables.md"), "--doc", ""]) == 0
    md = (tmp_path / "tables.md").read_text()
    assert md == tables_checked(res)
    rows = {tuple(c.strip() for c in l.strip("|").split("|")) for l in md.splitlines() if l.startswith("| ")}

    # the sweep marks the best rate; the final table's numbers are the records'
    assert "0.0001: 1.2000 · **0.001: 1.1000** · 0.01: 1.3000" in md
    g = [r for r in final if r["task"] == "gsm8k" and r["method"] == "soka"]
    h = [r["heldout_final"] for r in g]
    row = next(r for r in rows if r[:2] == ("gsm8k", "SoKA") and len(r) == 10)
    assert row[2:5] == ("0,1,2", "75", "0.001")
    m, lo, hi = stats.t_interval(h)
    assert row[5] == f"{m:.4f} [{lo:.4f}, {hi:.4f}]" and lo < m < hi
    m, lo, hi = stats.count_interval([100, 104, 108], 200, "acc|final|gsm8k|SoKA")
    assert row[6] == f"52.00 [{100 * lo:.2f}, {100 * hi:.2f}] (n=200)" and row[7] == "3.00" and row[8] == f"{100 / 60:.1f} %"
    assert next(r for r in rows if r[:2] == ("math", "PiSSA") and len(r) == 10)[2] == "0,1"
    assert "Missing runs: math PiSSA seed 2." in md and "ablation" not in md and "99.00" not in md
    assert "‡" not in md
    assert "Left out of the paper setting: 1 runs at a rate its sweep no longer picks (SoKA lr 0.0001;" in md

    # the claims: "better" / "worse" only where the 95 % interval excludes 0
    verdicts = {(r[1], r[2], r[4].split()[0]): r[-1] for r in rows if r[0].startswith("(")}
    assert verdicts["all", "trainable", "LoRA"] == "fewer"
    assert "ratio 0.750 (25.0 % fewer)" in md
    assert verdicts["gsm8k", "accuracy % (unpaired)", "LoRA"] == "better"
    assert verdicts["gsm8k", "accuracy % (unpaired)", "PiSSA"] == "tie"
    assert verdicts["math", "held-out loss (final)", "LoRA"] == "worse"
    assert verdicts["math", "held-out loss (final)", "PiSSA"] == "tie"
    assert verdicts["gsm8k", "held-out loss, first eval (step 20)", "LoRA"] == "better"
    assert verdicts["gsm8k", f"roughness (RMS − {P.SMOOTH}-step mean)", "LoRA"] == "better"   # noise 0.01 vs 0.05
    assert verdicts["gsm8k", "share of steps > 1.5 after warmup", "LoRA"] == "rarely"         # only step 1, in warmup

    for name in ("sweep", "loss", "heldout", "gradnorm", "params", "accuracy"):
        p = img / f"repro_{name}.png"
        assert p.read_bytes()[:8] == PNG and p.stat().st_size < 300_000
    assert not (img / "repro_ablate.png").exists()

    # an ablation file adds its table (beside the final τ = 0.9 runs) and its plot
    write(res / "ablate-a.jsonl", [record("ablate", "gsm8k", "soka", s, acc=0.3, held=0.95, tau=0.8,
                                          **({"side_by_side": True} if s == 1 else {})) for s in range(3)])
    md = tables_checked(res)
    assert "## qkvo study: ablation" in md
    tau8 = next(l for l in md.splitlines() if l.startswith("| tau 0.8 | 0,1,2 | 75 |"))
    assert tau8.endswith(" ‡ |") and "their times are not comparable" in md      # a run that shared the GPU
    assert any(l.startswith("| tau 0.9 | 0,1,2 | 75 |") for l in md.splitlines())
    import matplotlib
    matplotlib.use("Agg")
    assert P.plot_ablation(P.load(res, "ablate"), img)[0].read_bytes()[:8] == PNG
    assert math.isfinite(P.roughness(final[0]["loss"]))

    # a shapes file adds its table: one row per shape, its factors named
    write(res / "shapes.jsonl", [record("shapes", "gsm8k", "soka", s, acc=0.3, held=0.9 + i / 100, factors=f)
                                 for s in range(3) for i, f in enumerate(study.SHAPES)])
    md = tables_checked(res)
    assert f"## qkvo study: factor shapes at one parameter count, SoKA on GSM8K, rank {study.SHAPES_RANK}" in md
    assert any(l.startswith("| rule | default rule | 0,1,2 | 75 |") for l in md.splitlines())
    assert any(l.startswith("| tall_U | (48, 12, 12, 48) / (24, 12, 8, 48) | 0,1,2 |") for l in md.splitlines())

    # a shapes sweep adds its table; a shape whose best rate moved leaves its old runs out
    write(res / "shapes_sweep.jsonl", [dict(record("shapes_sweep", "gsm8k", "soka", 0, acc=None, held=h, lr=lr, factors=f),
                                            rank=study.shape_variants()[f])
                                       for f in ("tall_U", "small_U") for lr, h in zip(study.SHAPES_LR_GRID, (1.2, 1.1, 1.3))])
    md = tables_checked(res)
    g = study.SHAPES_LR_GRID
    assert "## qkvo study: learning-rate sweep of the factor shapes" in md
    assert f"| tall_U | (48, 12, 12, 48) / (24, 12, 8, 48) | 3 | 75 | 3.00 | {g[0]:g}: 1.2000 · **{g[1]:g}: 1.1000** · {g[2]:g}: 1.3000 | {g[1]:g} |" in md
    assert "| small_U | (8, 8, 72, 72) / (8, 8, 24, 72) | rule | 75 |" in md
    assert not any(l.startswith("| tall_U | (48, 12, 12, 48) / (24, 12, 8, 48) | 0,1,2 |") for l in md.splitlines())
    assert any(l.startswith("| wide_U | (12, 48, 48, 12) / (8, 48, 24, 12) | 0,1,2 |") for l in md.splitlines())
    assert "Left out of the factor shapes: 3 runs at a rate its sweep no longer picks (tall_U lr 0.001;" in md

    # so does an ablation run of a shape swept since: small_U's best is now 3e-3
    write(res / "ablate-b.jsonl", [record("ablate", "gsm8k", "soka", s, acc=0.3, held=0.9, lr=lr, factors="small_U")
                                   for s in range(3) for lr in (1e-3, study.SHAPES_LR_GRID[1])])
    md = tables_checked(res)
    assert "Left out of the ablation: 3 runs at a rate its sweep no longer picks (factors small_U lr 0.001;" in md
    assert any(l.startswith(f"| factors small_U | 0,1,2 | 75 | {study.SHAPES_LR_GRID[1]:g} |") for l in md.splitlines())


# ----------------------------------------------------------------------------- the per-task study

def fake_layers(blocks=2, seed=0):
    """spectra.layer_spectra-like rows for all seven types of a small model (dim 64, FFN 128): nearly
    flat spectra with a gap after term 1-3, so the elbow decides and the energy rule needs many terms."""
    g = torch.Generator().manual_seed(seed)
    shapes = dict(wq=(64, 64), wk=(32, 64), wv=(32, 64), wo=(64, 64), w1=(128, 64), w2=(64, 128), w3=(128, 64))
    rows = []
    for b in range(blocks):
        for t, (d_out, d_in) in shapes.items():
            m, n, p, q = factor_shape(d_out, d_in)
            K = min(m * n, p * q)
            e = 1 + (b + len(rows)) % 3                               # the elbow: 1, 2 or 3
            s = torch.cat([10 + torch.rand(e, generator=g), 5 + 0.1 * torch.rand(K - e, generator=g)])
            rows.append(dict(name=f"layers.{b}.{t}", type=t, block=b, d_out=d_out, d_in=d_in,
                             sigma=s.sort(descending=True).values.double()))
    return rows


def test_per_task_settings_from_spectra():
    from experiments import spectra
    from rank_select import explain_rank
    layers = fake_layers()
    settings = study.per_task_settings(layers)
    a = settings["arithmetic"]
    qv = [L for L in layers if L["type"] in study.QV]
    rule = [explain_rank(L["sigma"]).r for L in qv]
    assert a["rule_ranks_qv"] == rule and a["soka_qv"] == sum(r * spectra.soka_per_rank(L["d_out"], L["d_in"])
                                                              for r, L in zip(rule, qv))
    assert a["lokr_r8_all7"] == sum(spectra.lokr_params(L["d_out"], L["d_in"], 8) for L in layers)
    unit = sum(L["d_out"] + L["d_in"] for L in qv)
    assert a["lora_rank_lokr"] == spectra.closest_rank(a["lokr_r8_all7"], unit)
    assert a["lora_rank_count_qv"] == spectra.closest_rank(a["soka_qv"], unit)
    r4, r3 = a["lora_rank_lokr"], a["lora_rank_count_qv"]
    assert set(settings["qv"]["arms"]) == {"soka", f"lora_r{r4}", f"pissa_r{r4}", f"lora_r{r3}", f"pissa_r{r3}"}
    assert settings["qv"]["targets"] == ["wq", "wv"] and settings["all7"]["targets"] == list(study.ALL7)
    # the rule ablation: elbow alone gives the rule's ranks here (r_energy far above the elbow), so it
    # shares the rule's rate; energy alone at the τ whose count is nearest the rule's
    arms = settings["rule"]["arms"]
    assert arms["soka_elbow"].get("same_as") == "qv/soka" and a["elbow_equals_rule_qv"]
    assert "same_as" not in arms["soka_energy"] and arms["soka_energy"]["rule"] == "energy"
    tau = arms["soka_energy"]["tau"]
    count = lambda t: sum(explain_rank(L["sigma"], tau=t, rule="energy").r * spectra.soka_per_rank(L["d_out"], L["d_in"])  # noqa: E731
                          for L in qv)
    best = min((abs(count(k / 1000) - a["soka_qv"]), k / 1000) for k in range(1, 1001))
    assert abs(count(tau) - a["soka_qv"]) == best[0] and a["energy_count_qv"] == count(tau)
    assert f"soka_r{a['uniform_rank_qv']}" in arms
    assert a["uniform_rank_qv"] == spectra.closest_rank(a["soka_qv"], a["soka_per_rank_qv"])


def test_per_task_plan_sweeps_per_task_then_finals_at_each_best_rate():
    settings = study.per_task_settings(fake_layers())
    arms = settings["qv"]["arms"]
    sweep = study.plan_per_task("/nonexistent", "qv_sweep", settings)
    for task in study.TASKS:
        for arm, a in arms.items():
            assert sorted(r["lr"] for r in sweep if r["task"] == task and r["arm"] == arm) == sorted(study.GRIDS[a["method"]][task])
    assert all(r["seed"] == 0 and not r["eval"] and r["id"] == study.run_id_per_task(r) and r["targets"] == ["wq", "wv"] for r in sweep)
    assert study.expected_per_task("qv_sweep", settings) == len(sweep)
    assert study.plan_per_task("/nonexistent", "qv_final", settings) == []          # no sweep finished: nothing to run yet
    assert not any(r["arm"] == "soka_elbow" for r in study.plan_per_task("/nonexistent", "rule_sweep", settings))  # shares qv's rate

    def done(stage, recs, best):
        return [dict(r, status="done", heldout_final=1.0 - (r["lr"] == best(r)) / 10) for r in recs if r["stage"] == stage]
    middle = lambda r: study.GRIDS[r["method"]][r["task"]][1]          # noqa: E731
    records = done("qv_sweep", sweep, middle)
    with TemporaryDirectory() as d:
        write(Path(d) / "qv_sweep-w0.jsonl", records[:-1])             # one sweep run still missing
        final = study.plan_per_task(d, "qv_final", settings)
        last = records[-1]
        assert not any(r["task"] == last["task"] and r["arm"] == last["arm"] for r in final)
        assert len(final) == len(study.SEEDS) * (len(study.TASKS) * len(arms) - 1)
        write(Path(d) / "qv_sweep-w1.jsonl", [last])
        final = study.plan_per_task(d, "qv_final", settings, seeds=(0, 1, 2, 3))
        assert len(final) == 4 * len(study.TASKS) * len(arms) == study.expected_per_task("qv_final", settings, (0, 1, 2, 3))
        assert all(r["lr"] == middle(r) and r["eval"] for r in final)
        wgrad = study.plan_per_task(d, "wgrad", settings)                           # seed 0 at the same rates, training only
        assert [(r["task"], r["arm"], r["lr"]) for r in wgrad] == [(r["task"], r["arm"], r["lr"]) for r in final
                                                                   if r["seed"] == 0]
        assert len(wgrad) == study.expected_per_task("wgrad", settings) and all(r["weight_grad"] and not r["eval"] for r in wgrad)
        rule = study.plan_per_task(d, "rule_final", settings)                       # elbow: the rule's rate, without a sweep
        assert {r["lr"] for r in rule if r["arm"] == "soka_elbow" and r["task"] == "mbpp"} == {study.GRIDS["soka"]["mbpp"][1]}
        assert not any(r["arm"] != "soka_elbow" for r in rule)         # the others wait for their sweeps
        # a best rate at the grid's edge grows the grid, and its finals wait
        edge = [dict(r, heldout_final=1.0 - r["lr"]) for r in records]   # the highest rate is best
        (Path(d) / "qv_sweep-w1.jsonl").unlink()
        (Path(d) / "qv_sweep-w0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in edge))
        grown = study.plan_per_task(d, "qv_sweep", settings)
        assert len(grown) == len(sweep) + len(study.TASKS) * len(arms)
        assert study.plan_per_task(d, "qv_final", settings) == []
    base = study.plan_per_task("/nonexistent", "base", settings)
    assert [r["id"] for r in base] == [f"base/{t}/{k}" for t in study.TASKS for k in ("eval", "heldout")]
    assert all(study.seconds_per_task(r) > 0 for r in base + sweep + final)


def test_per_task_runs_are_options_train_py_accepts():
    """Each kind of per-task run becomes options train.py parses and accepts: the targets, the
    rank rule and its τ, a fixed rank, the base model's evaluation and held-out loss."""
    import train
    settings = study.per_task_settings(fake_layers())
    specs = [study.spec_per_task(settings, "rule_final", "math", "rule", "soka_energy", 1e-3, 1, eval=True),
             study.spec_per_task(settings, "qv_sweep", "mbpp", "qv", f"pissa_r{settings['arithmetic']['lora_rank_lokr']}", 3e-3, 0, eval=False),
             study.spec_per_task(settings, "all7_final", "gsm8k", "all7", "soka", 3e-3, 2, eval=True),
             study.spec_per_task(settings, "wgrad", "gsm8k", "qv", "soka", 9e-3, 0, eval=False, weight_grad=True),
             *study.plan_per_task("/nonexistent", "base", settings)[4:]]
    for r in specs:
        argv = study.argv_for(r, "m.gguf", "data", "out/x")
        cfg = train.parse_options(argv)
        if r.get("base") == "eval":
            assert cfg.eval_only and cfg.task == "mbpp" and cfg.eval_batch_size == study.EVAL_BATCH["mbpp"]
            continue
        if r.get("base") == "heldout":
            assert (cfg.method, cfg.rank, cfg.lr, cfg.max_steps, cfg.eval_limit) == ("lora", 1, study.BASE_LR, 1, 0)
            continue
        assert cfg.targets == ",".join(r["targets"]) and cfg.lr == r["lr"] and cfg.seed == r["seed"]
        assert cfg.rank_rule == (r["rule"] or "both") and (cfg.tau == r["tau"] if r["tau"] else True)
        assert (cfg.eval_limit == 0) == (not r["eval"])
        assert cfg.log_weight_grad == bool(r.get("weight_grad"))
    assert "--rank-rule=energy" in study.argv_for(specs[0], "m", "d", "o")


def test_summarize_keeps_the_per_problem_results_compact(tmp_path):
    """An evaluated run's eval.jsonl becomes <results>/problems/<stage>/<id>.jsonl.gz: id, a short
    extracted answer (MBPP: a hash of the program), the verdict; its counts must match eval.json."""
    settings = study.per_task_settings(fake_layers())
    out, results = tmp_path / "run", tmp_path / "results"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps(dict(step=i + 1, loss=1.0, grad_norm=0.5, tokens=10, time_s=0.1,
                                                                heldout_loss=0.9 if i == 1 else None)) + "\n" for i in range(2)))
    (out / "ranks.json").write_text(json.dumps(dict(totals=dict(trainable=7), layers=[dict(r=1)])))
    (out / "adapter.pt").write_bytes(b"x")
    rows = [dict(id=str(11 + i), prediction="...", extracted="def f():\n    return %d" % i, gold=None, verdict=i % 3 == 0,
                 error=None) for i in range(10)]
    (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "eval.json").write_text(json.dumps(dict(accuracy=0.4, correct=4, n=10, seconds=dict(generate=1, score=1))))
    r = study.spec_per_task(settings, "qv_final", "mbpp", "qv", "soka", 1e-3, 0, eval=True)
    rec = study.summarize(r, out, 1.0, results)
    assert rec["status"] == "done" and rec["problems"] == f"problems/qv_final/{r['id'].replace('/', '__')}.jsonl.gz"
    got = study.read_problems(results / rec["problems"])
    assert [x["id"] for x in got] == [x["id"] for x in rows] and [x["v"] for x in got] == [int(x["verdict"]) for x in rows]
    assert all(x["x"].startswith("sha256:") and len(x["x"]) == 19 for x in got)
    first = (results / rec["problems"]).read_bytes()
    study.summarize(r, out, 1.0, results)
    assert (results / rec["problems"]).read_bytes() == first            # the same bytes again (mtime 0)
    (out / "eval.json").write_text(json.dumps(dict(accuracy=0.5, correct=5, n=10, seconds={})))
    with pytest.raises(ValueError, match="eval.json says 10, 5"):
        study.summarize(r, out, 1.0, results)


def test_claims_mark_runs_in_progress_until_released(tmp_path):
    runs = [dict(id="a/b/1"), dict(id="a/b/2")]
    assert study.claim(tmp_path, "a/b/1") and not study.claim(tmp_path, "a/b/1")
    assert study.in_progress(tmp_path, runs) == [runs[0]] and study.in_progress(None, runs) == []
    study.release(tmp_path, "a/b/1")
    assert study.in_progress(tmp_path, runs) == []
