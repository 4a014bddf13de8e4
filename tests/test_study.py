"""experiments/study.py end to end on a tiny random LLaMA (two short train.py runs on the CPU), its
plan (sweep extension, best rate, resume) on hand-made records, and experiments/plot_study.py's
tables, claim rule and PNGs on hand-made records.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_study.py
"""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments import plot_study as P
from experiments import study
from model import ModelArgs, Transformer, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PNG = b"\x89PNG\r\n\x1a\n"


def lines(path):
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def write(path, records):
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


# ----------------------------------------------------------------------------- study.py

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer random model in Meta's layout, with LLaMA 2's tokenizer beside it."""
    if not (DATA / "gsm8k" / "train.jsonl").is_file():
        pytest.skip(f"no data in {DATA}")
    d = tmp_path_factory.mktemp("tiny")
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=32, max_seq_len=512)
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
    real_settings = study.settings                         # SoKA alone: one training run per stage
    monkeypatch.setattr(study, "settings", lambda base: {**real_settings(base), "paper": {"soka": None}})
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


def test_processes_side_by_side_run_only_what_they_claim(tiny, tmp_path, monkeypatch):
    """--claims DIR: a run claimed by another process (a file in DIR) is left to it; the rest runs."""
    results, claims = tmp_path / "results", tmp_path / "claims"
    results.mkdir()
    small_study(monkeypatch, tmp_path / "runs", max_steps=2, eval_limit=1, max_new_tokens=2)
    write(results / "sweep.jsonl", [study.spec("sweep", "gsm8k", "paper", m, None, 1e-3, 0, eval=False)
                                    | dict(status="done", heldout_final=1.0) for m in ("soka", "lora", "pissa")])
    argv = ["--stage", "final", "--results", str(results), "--ckpt", str(tiny), "--data-dir", str(DATA),
            "--claims", str(claims), "--tag", "w1"]
    planned = [r["id"] for r in study.final_runs(study.settings(load_checkpoint(tiny)[0]), study.read(results, "sweep"),
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


def test_claim_rule_holds_ties_and_fails():
    assert P.verdict([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], lower_is_better=True) == "holds"
    assert P.verdict([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], lower_is_better=False) == "fails"
    # means 1.1 and 1.15: 0.05 apart, within SoKA's spread of 0.1 -> a tie, whichever way
    assert P.verdict([1.0, 1.2], [1.15, 1.15], lower_is_better=True) == "tie"
    assert P.verdict([1.0, 1.2], [1.15, 1.15], lower_is_better=False) == "tie"
    assert P.verdict([1.0, 1.02], [1.15, 1.15], lower_is_better=True) == "holds"      # beyond both spreads
    assert P.spread([1.0, 1.4, 1.2]) == pytest.approx(0.2)
    line = np.linspace(2, 1, 100)
    assert P.roughness(line) < 1e-12                                  # a trend is not roughness
    assert 0.08 < P.roughness(line + 0.1 * (-1) ** np.arange(100)) < 0.1
    assert P.moving_average(line) == pytest.approx(line)


def test_plot_study_tables_and_pngs(tmp_path):
    res, img = tmp_path / "results", tmp_path / "img"
    res.mkdir()
    # gsm8k: SoKA's accuracy beats LoRA's beyond the spread, ties PiSSA's; math: its held-out loss
    # is worse than LoRA's beyond the spread. math PiSSA seed 2 is missing; a failed run is ignored.
    acc = dict(gsm8k=dict(soka=(0.50, 0.52, 0.54), lora=(0.10, 0.12, 0.11), pissa=(0.51, 0.53, 0.50)),
               math=dict(soka=(0.2, 0.2, 0.2), lora=(0.2, 0.2, 0.2), pissa=(0.2, 0.2)))
    held = dict(gsm8k=dict(soka=0.8, lora=0.9, pissa=0.9), math=dict(soka=1.3, lora=1.0, pissa=1.3))
    final = [record("final", t, m, s, acc=a, held=held[t][m] + s / 1000, noise=0.01 if m == "soka" else 0.05)
             for t in acc for m in acc[t] for s, a in enumerate(acc[t][m])]
    stale = dict(record("final", "gsm8k", "soka", 3, acc=0.99, held=0.1), lr=1e-4, id="stale")   # off the best rate
    write(res / "final.jsonl", final + [dict(final[0], id="x", status="exit 1", accuracy=0.99), stale])
    write(res / "sweep.jsonl", [record("sweep", "gsm8k", m, 0, acc=None, held=h, lr=lr)
                                for m in ("soka", "lora") for lr, h in ((1e-4, 1.2), (1e-3, 1.1), (1e-2, 1.3))])
    assert P.main(["--results", str(res), "--img", str(img), "--out", str(tmp_path / "tables.md")]) == 0
    md = (tmp_path / "tables.md").read_text()
    rows = {tuple(c.strip() for c in l.strip("|").split("|")) for l in md.splitlines() if l.startswith("| ")}

    # the sweep marks the best rate; the final table's numbers are the records'
    assert "0.0001: 1.2000 · **0.001: 1.1000** · 0.01: 1.3000" in md
    g = [r for r in final if r["task"] == "gsm8k" and r["method"] == "soka"]
    h = [r["heldout_final"] for r in g]
    row = next(r for r in rows if r[:2] == ("gsm8k", "SoKA") and len(r) == 12)
    assert row[2:5] == ("0,1,2", "75", "0.001")
    assert row[5] == f"{np.mean(h):.4f} ± {(max(h) - min(h)) / 2:.4f}"
    assert row[6] == "52.00 ± 2.00 (n=200)" and row[9] == "3.00" and row[10] == f"{100 / 60:.1f} %"
    assert next(r for r in rows if r[:2] == ("math", "PiSSA") and len(r) == 12)[2] == "0,1"
    assert "Missing runs: math PiSSA seed 2." in md and "Ablation" not in md and "99.00" not in md
    assert "‡" not in md
    assert "Left out of the paper setting: 1 runs at a rate its sweep no longer picks (SoKA lr 0.0001;" in md

    # the claims
    verdicts = {(r[1], r[2], r[4].split()[0]): r[-1] for r in rows if r[0].startswith("(")}
    assert verdicts["all", "trainable", "LoRA"] == "holds"
    assert "ratio 0.750 (25.0 % fewer)" in md
    assert verdicts["gsm8k", "accuracy %", "LoRA"] == "holds"
    assert verdicts["gsm8k", "accuracy %", "PiSSA"] == "tie"
    assert verdicts["math", "held-out loss (final)", "LoRA"] == "fails"
    assert verdicts["math", "held-out loss (final)", "PiSSA"] == "tie"
    assert verdicts["gsm8k", "held-out loss, first eval (step 20)", "LoRA"] == "holds"
    assert verdicts["gsm8k", f"roughness (RMS − {P.SMOOTH}-step mean)", "LoRA"] == "holds"   # noise 0.01 vs 0.05
    assert verdicts["gsm8k", "share of steps > 1.5 (max norm, last step above)", "LoRA"] == "holds"   # 1 step of 60

    for name in ("sweep", "loss", "heldout", "gradnorm"):
        p = img / f"repro_{name}.png"
        assert p.read_bytes()[:8] == PNG and p.stat().st_size < 300_000
    assert not (img / "repro_ablate_loss.png").exists()

    # an ablation file adds its table (beside the final τ = 0.9 runs) and its plot
    write(res / "ablate-a.jsonl", [record("ablate", "gsm8k", "soka", s, acc=0.3, held=0.95, tau=0.8,
                                          **({"side_by_side": True} if s == 1 else {})) for s in range(3)])
    assert P.main(["--results", str(res), "--img", str(img)]) == 0
    md = (res / "tables.md").read_text()
    assert "## Ablation" in md
    tau8 = next(l for l in md.splitlines() if l.startswith("| tau 0.8 | 0,1,2 | 75 |"))
    assert tau8.endswith(" ‡ |") and "their times are not comparable" in md      # a run that shared the GPU
    assert any(l.startswith("| tau 0.9 | 0,1,2 | 75 |") for l in md.splitlines())
    assert (img / "repro_ablate_loss.png").read_bytes()[:8] == PNG
    assert math.isfinite(P.roughness(final[0]["loss"]))

    # a shapes file adds its table: one row per shape, its factors named
    write(res / "shapes.jsonl", [record("shapes", "gsm8k", "soka", s, acc=0.3, held=0.9 + i / 100, factors=f)
                                 for s in range(3) for i, f in enumerate(study.SHAPES)])
    assert P.main(["--results", str(res), "--img", str(img)]) == 0
    md = (res / "tables.md").read_text()
    assert f"## Factor shapes at one parameter count: SoKA on GSM8K, rank {study.SHAPES_RANK}" in md
    assert any(l.startswith("| rule | default rule | 0,1,2 | 75 |") for l in md.splitlines())
    assert any(l.startswith("| tall_U | (48, 12, 12, 48) / (24, 12, 8, 48) | 0,1,2 |") for l in md.splitlines())

    # a shapes sweep adds its table; a shape whose best rate moved leaves its old runs out
    write(res / "shapes_sweep.jsonl", [dict(record("shapes_sweep", "gsm8k", "soka", 0, acc=None, held=h, lr=lr, factors=f),
                                            rank=study.shape_variants()[f])
                                       for f in ("tall_U", "small_U") for lr, h in zip(study.SHAPES_LR_GRID, (1.2, 1.1, 1.3))])
    assert P.main(["--results", str(res), "--img", str(img)]) == 0
    md = (res / "tables.md").read_text()
    g = study.SHAPES_LR_GRID
    assert "## Learning-rate sweep of the factor shapes" in md
    assert f"| tall_U | (48, 12, 12, 48) / (24, 12, 8, 48) | 3 | 75 | 3.00 | {g[0]:g}: 1.2000 · **{g[1]:g}: 1.1000** · {g[2]:g}: 1.3000 | {g[1]:g} |" in md
    assert "| small_U | (8, 8, 72, 72) / (8, 8, 24, 72) | rule | 75 |" in md
    assert not any(l.startswith("| tall_U | (48, 12, 12, 48) / (24, 12, 8, 48) | 0,1,2 |") for l in md.splitlines())
    assert any(l.startswith("| wide_U | (12, 48, 48, 12) / (8, 48, 24, 12) | 0,1,2 |") for l in md.splitlines())
    assert "Left out of the factor shapes: 3 runs at a rate its sweep no longer picks (tall_U lr 0.001;" in md

    # so does an ablation run of a shape swept since: small_U's best is now 3e-3
    write(res / "ablate-b.jsonl", [record("ablate", "gsm8k", "soka", s, acc=0.3, held=0.9, lr=lr, factors="small_U")
                                   for s in range(3) for lr in (1e-3, study.SHAPES_LR_GRID[1])])
    assert P.main(["--results", str(res), "--img", str(img)]) == 0
    md = (res / "tables.md").read_text()
    assert "Left out of the ablation: 3 runs at a rate its sweep no longer picks (factors small_U lr 0.001;" in md
    assert any(l.startswith(f"| factors small_U | 0,1,2 | 75 | {study.SHAPES_LR_GRID[1]:g} |") for l in md.splitlines())
