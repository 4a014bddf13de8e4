"""experiments/check_tables.py: it agrees with the committed tables and records, and it fails where a
number, a record, a per-problem verdict or a quoted table is changed; on hand-made per-task records
it agrees with experiments/plot_study.py's tables (intervals, paired tests, verdicts) and catches
their changes. experiments/stats.py: its intervals and tests against independent references.

    python -m pytest -q tests/test_check_tables.py
"""
import gzip
import json
import math
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest

from experiments import check_tables as C
from experiments import plot_study as P
from experiments import stats, study

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
DOC = ROOT / "docs" / "reproduction.md"
PNG = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- the committed records

def test_the_committed_tables_are_the_records():
    """tables.md and the tables docs/reproduction.md quotes hold what the committed records give."""
    assert C.check(RESULTS, RESULTS / "tables.md", DOC) == []


def test_a_changed_number_a_record_or_a_quote_fails(tmp_path):
    res = tmp_path / "results"
    shutil.copytree(RESULTS, res, ignore=shutil.ignore_patterns("spectra.json"))
    md = (res / "tables.md").read_text()
    # one held-out loss in a table, one digit off
    row = next(l for l in md.splitlines() if l.startswith("| gsm8k | SoKA | 0,1,2 |"))
    cell = row.split(" | ")[5]
    bad = cell.replace(cell[:6], f"{float(cell[:6]) + 0.001:.4f}", 1)
    (res / "tables.md").write_text(md.replace(row, row.replace(cell, bad), 1))
    errors = C.check(res, res / "tables.md")
    assert len(errors) == 1 and "gsm8k" in errors[0] and bad in errors[0]
    # the table back, a record changed instead: its accuracy count
    (res / "tables.md").write_text(md)
    assert C.check(res, res / "tables.md") == []
    recs = [json.loads(l) for l in (res / "final.jsonl").read_text().splitlines()]
    recs[0]["correct"] += 5
    (res / "final.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert any("accuracy" in e or "cell 7" in e for e in C.check(res, res / "tables.md"))
    # a doc whose quote differs from tables.md
    doc = tmp_path / "doc.md"
    heading = "qkvo study: final runs, paper setting (wq wk wv wo)"
    quoted = P.section(md, heading)
    doc.write_text(f"<!-- tables.md: {heading} -->\n{quoted.replace('0,1,2', '0,1', 1)}<!-- end -->\n")
    assert any("differs from tables.md" in e for e in C.check(RESULTS, RESULTS / "tables.md", doc))
    doc.write_text(f"<!-- tables.md: {heading} -->\n{quoted}<!-- end -->\n")
    assert C.check(RESULTS, RESULTS / "tables.md", doc) == []


# ----------------------------------------------------------------------------- hand-made per-task records

N = 60                                             # problems per task (the real splits: 1,319 / 500 / 500)


def hand_settings():
    return dict(
        qv=dict(targets=["wq", "wv"], arms={"soka": dict(method="soka", rank=None, role="the rule's ranks"),
                                            "lora_r4": dict(method="lora", rank=4, role="1.33 M-equivalent"),
                                            "pissa_r4": dict(method="pissa", rank=4, role="1.33 M-equivalent")}),
        all7=dict(targets=list(study.ALL7), arms={"soka": dict(method="soka", rank=None, role="the rule's ranks"),
                                                  "lora_r2": dict(method="lora", rank=2, role="SoKA's count")}),
        rule=dict(targets=["wq", "wv"], rule_arm="qv/soka",
                  arms={"soka_elbow": dict(method="soka", rank=None, rule="elbow", role="elbow alone", same_as="qv/soka"),
                        "soka_r3": dict(method="soka", rank=3, role="uniform rank 3")}),
        arithmetic=dict(soka_qv=145798, lora_rank_lokr=4, lora_per_rank_qv=57600, soka_all7=650523,
                        lora_rank_count_all7=2, lora_per_rank_all7=305280, soka_per_rank_qv=54780))


def run(settings, stage, task, setting, arm, lr, seed, *, held, acc=None, results=None, rng=None, steps=40):
    """A finished run as study.summarize writes it, with per-problem results when evaluated."""
    r = study.spec_per_task(settings, stage, task, setting, arm, lr, seed, eval=acc is not None)
    g = np.random.default_rng(zlib.crc32(r["id"].encode()))
    loss = list(np.linspace(1.2, held, steps) + 0.02 * g.standard_normal(steps))
    gn = list(np.abs(0.5 + 0.2 * g.standard_normal(steps)))
    gn[0] = 3.0
    r.update(status="done", trainable={"soka": 145000, "lora": 230400, "pissa": 230400}[r["method"]], steps=steps,
             train_s=1.0, loss=loss, grad_norm=gn, heldout=[[20, held + 0.05], [steps, held]], heldout_final=held,
             gnorm_max=max(gn), gnorm_above_1_5=float(np.mean(np.array(gn) > 1.5)))
    if acc is not None:
        v = (rng.random(N) < acc).astype(int)
        src = results / "tmp.jsonl"
        src.write_text("".join(json.dumps(dict(id=f"test/{i}", extracted=str(i) if v[i] else None, verdict=bool(v[i])))
                               + "\n" for i in range(N)))
        dest = study.problems_file(results, r)
        study.compact_problems(src, dest, task)
        src.unlink()
        r.update(accuracy=float(v.mean()), correct=int(v.sum()), n_eval=N, problems=dest.relative_to(results).as_posix())
    return r


def write(path, records):
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def per_task(results):
    """Sweeps (GSM8K and MBPP: the middle rate best, so no grid grows), finals on seeds 0-2, base rows."""
    settings = hand_settings()
    results.mkdir(parents=True, exist_ok=True)
    (results / "per_task_settings.json").write_text(json.dumps(settings))
    rng = np.random.default_rng(0)
    acc = dict(soka=0.45, lora=0.3, pissa=0.44)
    for setting in ("qv", "all7", "rule"):
        sweep, final = [], []
        for task in ("gsm8k", "mbpp"):
            for arm, a in settings[setting]["arms"].items():
                if a.get("same_as"):
                    continue
                grid = study.GRIDS[a["method"]][task]
                sweep += [run(settings, f"{setting}_sweep", task, setting, arm, lr, 0, held=0.9 + abs(i - 1) / 10)
                          for i, lr in enumerate(grid)]
            for seed in (0, 1, 2):
                for arm, a in settings[setting]["arms"].items():
                    sweeps = {"qv": study.read(results, "qv_sweep"), setting: sweep}
                    lr = study.arm_best(settings, setting, arm, task, sweeps)[1]
                    held = {"soka": 0.85, "lora": 0.9, "pissa": 0.86}[a["method"]] + seed / 1000 + (arm == "soka_r3") / 50
                    final.append(run(settings, f"{setting}_final", task, setting, arm, lr, seed, held=held,
                                     acc=acc[a["method"]], results=results, rng=rng))
        write(results / f"{setting}_sweep.jsonl", sweep)
        write(results / f"{setting}_final-w0.jsonl", final)
    base = [run(settings, "qv_final", "gsm8k", "qv", "soka", 1e-3, 0, held=1.1, acc=0.05, results=results, rng=rng)]
    base[0].update(stage="base", setting="base", arm="eval", id="base/gsm8k/eval", method="base")
    shutil.move(results / base[0]["problems"], results / "problems" / "base.jsonl.gz")
    base[0]["problems"] = "problems/base.jsonl.gz"
    base.append(dict(base[0], arm="heldout", id="base/gsm8k/heldout", eval=False, heldout_final=1.0123))
    write(results / "base.jsonl", base)
    return settings


def test_per_task_tables_check_and_fail_where_changed(tmp_path):
    res = tmp_path / "results"
    per_task(res)
    md = P.tables(res)
    (res / "tables.md").write_text(md)
    assert C.check(res, res / "tables.md") == []
    sec = C.parse(md)
    # every section the records call for is filled, the rest say not run
    assert len(sec["Setting qv (the paper's: wq wv): final runs"]) == 2 * 3          # 2 tasks × 3 arms
    assert sec["Rule ablation (wq wv): final runs"][0][1] == "qv/soka"
    assert [r[1] for r in sec["Rule ablation (wq wv): qv/soka against each arm (Δ = qv/soka − arm)"]] == \
        ["soka_elbow", "soka_r3"] * 2
    base = sec["Base model (SmolLM2-135M-Instruct as it is)"]
    assert base == [["gsm8k", "test", "60", base[0][3], "1.0123"]]
    claims = {(r[0], r[1]): r for r in sec["Claims"]}
    assert claims["25 % fewer trainable parameters than LoRA / PiSSA", "qv: SoKA vs r=4"][2] == \
        "145,000 vs 230,400: 37.1 % fewer"
    assert claims["25 % fewer trainable parameters than LoRA / PiSSA", "all7: SoKA vs r=2"][2] == \
        "145,000 vs 230,400: 37.1 % fewer"
    acc_row = claims["matches or beats LoRA: accuracy, Δ points", "qv: r=4, 1.33 M-equivalent"]
    assert acc_row[2].startswith("GSM8K +") and "MATH-500 not run" in acc_row[2] and acc_row[4].startswith("GSM8K ")
    assert "MATH-500 not run" in acc_row[4]

    # the verdicts follow the rule: "better" / "worse" only where the interval excludes 0
    cmp_rows = sec["Setting qv (the paper's: wq wv): soka against each arm (Δ = soka − arm)"]
    for row in cmp_rows:
        for cell, v, lower in ((row[2], row[3], True), (row[4], row[7], False)):
            d, lo, hi = map(float, cell.replace("[", "").replace("]", "").replace(",", "").split())
            assert lo <= d <= hi
            assert v == ("tie" if lo <= 0 <= hi else ("better" if (hi < 0) == lower else "worse"))
    lora = next(r for r in cmp_rows if r[:2] == ["gsm8k", "lora_r4"])
    assert lora[3] == "better"                     # held-out 0.85 against 0.90, three seeds each

    # a number changed in tables.md, then a verdict
    line = next(l for l in md.splitlines() if l.startswith(f"| gsm8k | lora_r4 | {lora[2]} |"))
    for new in (line.replace(lora[2], lora[2].replace("-0.05", "-0.06", 1), 1), line.replace("| better |", "| tie |", 1)):
        assert new != line
        (res / "tables.md").write_text(md.replace(line, new))
        errors = C.check(res, res / "tables.md")
        assert len(errors) == 1 and "['gsm8k', 'lora_r4']" in errors[0]
    # one per-problem verdict flipped: the accuracy and its interval move
    (res / "tables.md").write_text(md)
    f = res / json.loads((res / "qv_final-w0.jsonl").read_text().splitlines()[0])["problems"]
    rows = [json.loads(l) for l in gzip.open(f, "rt")]
    rows[0]["v"] = 1 - rows[0]["v"]
    with gzip.open(f, "wt") as out:
        out.writelines(json.dumps(r) + "\n" for r in rows)
    assert any("accuracy" not in e and "soka" in e for e in C.check(res, res / "tables.md"))
    # the like-for-like gradient table: not run until wgrad records exist, then their percentiles
    assert sec["Setting qv: like-for-like gradient norms (seed 0)"] is None
    (res / "tables.md").write_text(md)
    w = np.linspace(0.5, 1.5, 100)
    write(res / "wgrad-w0.jsonl", [dict(id="wgrad/gsm8k/qv/soka/lr0.003/s0", stage="wgrad", task="gsm8k", setting="qv",
                                        arm="soka", method="soka", lr=0.003, seed=0, status="done",
                                        grad_norm=[9.0] * 3 + [0.2] * 97, weight_grad_norm=[99.0] * 3 + list(w[3:]))])
    md_new = P.tables(res)
    (res / "tables.md").write_text(md_new)
    assert C.check(res, res / "tables.md") == []
    (row,) = C.parse(md_new)["Setting qv: like-for-like gradient norms (seed 0)"]
    assert row == ["gsm8k", "soka", "0.003", "97", f"{np.percentile(w[3:], 50):.3f}", f"{np.percentile(w[3:], 90):.3f}",
                   f"{np.percentile(w[3:], 99):.3f}", "1.500", "0.200"]
    (res / "tables.md").write_text(md_new.replace("| 1.500 | 0.200 |", "| 1.500 | 0.201 |"))
    assert len(C.check(res, res / "tables.md")) == 1
    (res / "wgrad-w0.jsonl").unlink()
    # a table removed
    (res / "tables.md").write_text(P.tables(res).replace("## Setting all7 (all seven linear types): final runs", "## x"))
    errors = C.check(res, res / "tables.md")
    assert any(e.startswith("missing table: ## Setting all7") for e in errors) and any("unchecked table: ## x" in e for e in errors)


def test_per_task_plots_and_the_doc_quotes(tmp_path):
    res, img = tmp_path / "results", tmp_path / "img"
    per_task(res)
    for f in [*res.glob("all7_*.jsonl"), *res.glob("rule_*.jsonl")]:   # fewer plots: the qv setting alone
        f.unlink()
    doc = tmp_path / "doc.md"
    doc.write_text("# x\n\n<!-- tables.md: Claims -->\nold\n<!-- end -->\n\ntext\n\n"
                   "<!-- tables.md: Setting all7 (all seven linear types): final runs -->\n<!-- end -->\n"
                   "<!-- tables.md: No such table -->\n<!-- end -->\n")
    assert P.main(["--results", str(res), "--img", str(img), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "old" not in text and "| claim | setting |" in text and "text" in text
    assert "<!-- tables.md: No such table -->\nNot run.\n<!-- end -->" in text
    assert C.check(res, res / "tables.md", doc) == []
    assert "<!-- tables.md: Setting all7 (all seven linear types): final runs -->\nNot run.\n<!-- end -->" in text
    for name in ("qv_sweep", "qv_loss", "qv_heldout", "qv_gradnorm", "params", "accuracy"):
        p = img / f"repro_{name}.png"
        assert p.read_bytes()[:8] == PNG and p.stat().st_size < 400_000, name
    assert not (img / "repro_all7_loss.png").exists()


# ----------------------------------------------------------------------------- stats.py

def test_stats_against_references():
    """Student t from two algorithms; Welch and McNemar by hand; the bootstrap's recipe, replayed."""
    for dof in (1, 2, 3.4, 10, 200):
        assert stats.t_ppf(0.975, dof) == pytest.approx(C.t_quantile(0.975, dof), rel=1e-7)
    assert stats.t_ppf(0.975, 2) == pytest.approx(4.302652729911275, rel=1e-9)
    w = stats.welch([1.0, 2.0, 3.0], [2.0, 3.0, 5.0])
    assert w["dof"] == pytest.approx(3.4482758620689653) and w["diff"] == pytest.approx(-4 / 3)
    assert stats.mcnemar_p(3, 10) == pytest.approx(2 * sum(math.comb(13, k) for k in range(4)) / 2 ** 13)
    assert stats.mcnemar_p(0, 0) == 1.0 and stats.mcnemar_p(5, 5) == 1.0
    g = np.random.default_rng(3)
    A, Bm = (g.random((3, 50)) < 0.5).astype(int), (g.random((2, 50)) < 0.3).astype(int)
    d = stats.acc_difference(A, Bm, "x", seeds_a=[0, 1, 2], seeds_b=[0, 2])
    assert (d["diff"], d["lo"], d["hi"], d["p_boot"]) == pytest.approx(C.boot_diff(A, Bm, "x"))
    assert d["mcnemar_b"] == ((A[0] == 1) & (Bm[0] == 0)).sum() + ((A[2] == 1) & (Bm[1] == 0)).sum()
    assert stats.acc_interval(A, "y") == pytest.approx(C.boot_acc(A, "y"))
    assert stats.count_interval([10, 12], 50, "z") == pytest.approx(C.counts_acc([10, 12], 50, "z"))
    lo, hi = stats.acc_interval(A, "y")[1:]
    assert lo < A.mean() < hi and hi - lo < 0.25
    # the verdict rule
    assert stats.verdict(-0.2, -0.1, lower_is_better=True) == "better"
    assert stats.verdict(-0.2, -0.1, lower_is_better=False) == "worse"
    assert stats.verdict(-0.1, 0.1, lower_is_better=True) == "tie"
    assert stats.verdict(float("nan"), 1.0, lower_is_better=True) == "n/a"


def rescored(task, data_dir, split):
    """(records, verdicts that differ) of the committed per-problem files of `task`: each extracted
    answer scored again against its gold by soka/scorers.py."""
    from soka.scorers import score_answers
    from soka.tasks import load_examples
    gold = {e["id"]: e["gold"] for e in load_examples(task, split, data_dir=data_dir)}
    n, differ = 0, []
    for f in sorted((RESULTS / "problems").glob(f"*/*__{task}__*.jsonl.gz")):
        rows = [r for r in map(json.loads, gzip.open(f, "rt")) if r["x"] is not None and len(r["x"]) < 64]
        wrap = "$\\boxed{%s}$" if task == "math" else "#### %s"
        for r, (_, verdict, _) in zip(rows, score_answers(task, [wrap % r["x"] for r in rows],
                                                          [gold[r["id"]] for r in rows])):
            n += 1
            if int(bool(verdict)) != r["v"]:
                differ.append((f.name, r["id"], r["x"], gold[r["id"]], r["v"]))
    return n, differ


def test_the_committed_gsm8k_verdicts_are_what_the_scorer_gives(tmp_path):
    """A change of the scorer that would flip a recorded verdict shows here (answers of 64 characters
    or more are stored cut, and skipped)."""
    n, differ = rescored("gsm8k", tmp_path, "test")     # an empty data folder: the copy soka ships
    assert n > 10_000 and differ == []


@pytest.mark.extended
def test_the_committed_math500_verdicts_are_what_the_scorer_gives(full_data):
    n, differ = rescored("math", full_data, "math500")
    assert n > 3_000 and differ == []
