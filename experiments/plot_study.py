"""Tables and plots of the reproduction study (experiments/study.py), every number read from its records.

    python experiments/plot_study.py          # experiments/results/tables.md, docs/img/repro_*.png, and the
                                              # tables docs/reproduction.md quotes (between its markers)
    python experiments/plot_study.py --results DIR --img DIR --out FILE --doc FILE
    python experiments/check_tables.py        # recomputes every number of both, with code of its own

Reads <stage>.jsonl and <stage>-<tag>.jsonl from --results; records whose status is not "done" are
ignored, and a run recorded twice counts once (its last "done" record). Final runs count only at the
rate the study now picks for them (a run made before a sweep moved is listed as left out). The per-task
study's accuracies come from the per-problem files (study.problems_file); the qkvo study's, which
kept only counts, from those (stats.count_interval, unpaired).

Statistics (experiments/stats.py): held-out loss and other per-seed measures as the mean with a
Student t 95 % interval over seeds, differences with Welch's interval; accuracy with a bootstrap
interval over problems and seeds, differences paired over problems, with McNemar's exact test. The
verdict for Δ = SoKA − other is "better" or "worse" only where the interval excludes 0, else "tie".
Losses are in nats per answer token; gradient norms are the global L2 norm over the trainable
parameters before clipping, "after warmup" meaning past the first ceil(0.03 · steps) steps.

docs/reproduction.md quotes tables between `<!-- tables.md: <heading> -->` and `<!-- end -->`;
this script replaces each such block with that heading's table from tables.md.
"""
import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments import spectra, stats, study          # noqa: E402  (study.read: the records, one reader)
from train import EVAL_SPLIT                            # noqa: E402

RESULTS = study.RESULTS
IMG = ROOT / "docs" / "img"
DOC = ROOT / "docs" / "reproduction.md"
SMOOTH = 21                 # steps in the moving average (curves and roughness); no value where it does not fit
EARLY = 0.25                # share of the steps whose mean training loss measures convergence speed
GNORM_LINE = 1.5            # the paper: gradient norms "rarely above 1.5"
RARELY = 0.05               # "rarely": on under 5 % of the steps after warmup
WARMUP = study.COMMON["warmup"]
METHODS = ("soka", "lora", "pissa")
NAMES = dict(soka="SoKA", lora="LoRA", pissa="PiSSA")
COLORS = dict(soka="C0", lora="C1", pissa="C2")
TASK_NAMES = dict(gsm8k="GSM8K", math="MATH-500", mbpp="MBPP")
LOSS = "nats per token"
GNORM = "gradient norm (global L2 norm, before clipping)"
BAND = "band: min–max over seeds"
NOT_RUN = "Not run."
PAPER = dict(params="0.99 M vs 1.33 M: 25.6 % fewer", acc="matches or exceeds (abstract)",
             loss="–", faster="faster convergence", smoother="smoother loss, more stable gradients",
             gnorm="rarely above 1.5")
SETTING_TITLES = dict(qv="Setting qv (the paper's: wq wv)", all7="Setting all7 (all seven linear types)",
                      rule="Rule ablation (wq wv)")


# ----------------------------------------------------------------------------- records

def finished(results_dir, stage):
    """A stage's finished runs, one per id (its last "done" record), in the order the ids first appear."""
    return list({r["id"]: r for r in study.read(results_dir, stage) if r.get("status") == "done"}.values())


def load(results_dir, stage, *, superseded=False):
    """The finished runs of a qkvo stage, one per id (the last "done" record), in file order. For
    the final, matched, ablate and shapes stages only the runs at the rate the study now picks count
    (study.planned_lr): a run made before a sweep moved past its rate is superseded (superseded=True
    returns those instead)."""
    runs = finished(results_dir, stage)
    if stage not in ("final", "matched", "ablate", "shapes"):
        return [] if superseded else runs
    sweep, shapes_sweep = study.read(results_dir, "sweep"), study.read(results_dir, "shapes_sweep")

    def at_best(r):
        b = study.planned_lr(r, sweep, shapes_sweep)
        return b is None or r["lr"] == b                       # nothing to judge by yet
    return [r for r in runs if at_best(r) != superseded]


def read_settings(results_dir):
    path = Path(results_dir) / "per_task_settings.json"
    return json.loads(path.read_text()) if path.is_file() else None


def swept_best(settings, sweeps, setting, arm, task):
    """The rate of an arm's finished sweep run with the lowest final held-out loss (an arm that is
    another's, same_as, takes that arm's); None before any finished."""
    a = settings[setting]["arms"][arm]
    if a.get("same_as"):
        return swept_best(settings, sweeps, *a["same_as"].split("/"), task)
    return study.best_of([r for r in sweeps[setting] if r["arm"] == arm and r["task"] == task])


def load_per_task(results_dir, stage, settings):
    """The finished runs of a per-task stage (last record per id); final and wgrad runs only at their
    arm's best swept rate (such a run starts once its sweep is finished, so that is the rate it ran at)."""
    runs = finished(results_dir, stage)
    if not (stage.endswith("_final") or stage == "wgrad") or settings is None:
        return runs
    sweeps = {s: study.read(results_dir, f"{s}_sweep") for s in ("qv", "all7", "rule")}
    return [r for r in runs if swept_best(settings, sweeps, r["setting"], r["arm"], r["task"]) == r["lr"]]


def group(runs, key):
    out = {}
    for r in runs:
        out.setdefault(key(r), []).append(r)
    return out


ORDER = {x: i for i, x in enumerate((*study.TASKS, *METHODS, *NAMES.values()))}


def ordered(groups):
    """A group dict's items with tasks and methods in their usual order (others as they came)."""
    return sorted(groups.items(), key=lambda kv: [ORDER.get(x, len(ORDER)) for x in kv[0]])


def matrix(results_dir, runs):
    """(ids, V, seeds): the runs' per-problem verdicts, one row per run in seed order, columns by id."""
    runs = sorted(runs, key=lambda r: r["seed"])
    rows = [{p["id"]: p["v"] for p in study.read_problems(Path(results_dir) / r["problems"])} for r in runs]
    ids = sorted(rows[0])
    if any(sorted(x) != ids for x in rows):
        raise ValueError(f"plot_study.py: runs {[r['id'] for r in runs]} were evaluated on different problems")
    return ids, np.array([[x[i] for i in ids] for x in rows], dtype=np.int8), [r["seed"] for r in runs]


# ----------------------------------------------------------------------------- per-run measures

def moving_average(x, w=SMOOTH):
    """Centered w-step mean where the whole window fits: len(x) − w + 1 values, for steps
    w//2 + 1 … len(x) − w//2 (1-based). Fewer than w values: none."""
    x = np.asarray(x, dtype=float)
    if len(x) < w:
        return np.array([])
    c = np.concatenate([[0.0], np.cumsum(x)])
    return (c[w:] - c[:-w]) / w


def roughness(loss, w=SMOOTH):
    """RMS of (loss − its centered w-step mean) over the steps where the window fits: step-to-step
    noise, not the downward trend."""
    x, ma = np.asarray(loss, dtype=float), moving_average(loss, w)
    if not len(ma):
        return float("nan")
    return float(np.sqrt(np.mean((x[w // 2:len(x) - w // 2] - ma) ** 2)))


def early_loss(loss):
    n = max(1, round(EARLY * len(loss)))
    return float(np.mean(loss[:n]))


def first_heldout(r):
    """(step, loss) of the run's first held-out evaluation."""
    return tuple(r["heldout"][0]) if r.get("heldout") else (None, float("nan"))


def warmup_steps(steps):
    return math.ceil(WARMUP * steps)


def after_warmup(r):
    return r["grad_norm"][warmup_steps(len(r["grad_norm"])):]


# ----------------------------------------------------------------------------- cells

def fmt(m, s, digits=4):
    return "–" if not np.isfinite(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def ci(m, lo, hi, digits=4, scale=1.0, sign=False):
    """"m [lo, hi]"; "m" alone where there is no interval (one seed)."""
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    if not np.isfinite(m):
        return "–"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f.format(scale * m)
    return f"{f.format(scale * m)} [{f.format(scale * lo)}, {f.format(scale * hi)}]"


def fmt_p(p):
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def spread(xs):
    """Half the range over seeds (the qkvo study's descriptive ±)."""
    return (max(xs) - min(xs)) / 2 if xs else float("nan")


def stat(xs):
    return (float(np.mean(xs)), spread(xs)) if xs else (float("nan"), float("nan"))


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def heldout_ci(rs, f=lambda r: r["heldout_final"]):
    return stats.t_interval([f(r) for r in rs])


def gnorm_cells(rs):
    """Post-warmup gradient norms pooled over the runs: steps, p50, p90, p99, max, share > 1.5."""
    g = np.concatenate([after_warmup(r) for r in rs])
    p50, p90, p99 = np.percentile(g, [50, 90, 99])
    return [f"{len(g):,}", f"{p50:.3f}", f"{p90:.3f}", f"{p99:.3f}", f"{g.max():.3f}",
            f"{100 * float(np.mean(g > GNORM_LINE)):.1f} %"]


GNORM_HEADER = ["steps after warmup", "p50", "p90", "p99", "max", f"share > {GNORM_LINE}"]
GNORM_NOTE = (f"Gradient norm: the global L2 norm of the trainable parameters' gradient before clipping at 1.0, "
              f"pooled over the seeds' steps after warmup (the first ceil({WARMUP} · steps) steps left out). "
              "Each method's norm is taken in its own parametrisation (SoKA's σ, U, V; LoRA's and PiSSA's A, B), "
              "so norms compare a method's steps with each other, not one method with another; the like-for-like "
              "measure, ‖∂L/∂W‖ over the adapted weights W, is in \"Setting qv: like-for-like gradient norms\".")
WGRAD_TITLE = "Setting qv: like-for-like gradient norms (seed 0)"
WGRAD_NOTE = ("‖∂L/∂W‖: the global L2 norm of the loss's gradient with respect to the adapted weights W = W_res + ΔW "
              "(train.py --log-weight-grad), the gradient full fine-tuning would take, so the same quantity for every "
              "method; steps after warmup of one run per arm (stage wgrad: qv's final rate, seed 0, training only). "
              "Own gradient norm: the same runs' logged norm of each method's factors, for contrast.")


def wgrad_table(results_dir, settings):
    runs = load_per_task(results_dir, "wgrad", settings)
    rows = []
    for task in study.TASKS:
        for arm in settings["qv"]["arms"]:
            r = next((r for r in runs if r["task"] == task and r["arm"] == arm), None)
            if r is None:
                continue
            k = warmup_steps(len(r["grad_norm"]))
            w, g = np.asarray(r["weight_grad_norm"][k:]), np.asarray(r["grad_norm"][k:])
            rows.append([task, arm, f"{r['lr']:g}", f"{len(w):,}", *(f"{x:.3f}" for x in np.percentile(w, [50, 90, 99])),
                         f"{w.max():.3f}", f"{np.percentile(g, 50):.3f}"])
    lines = [f"## {WGRAD_TITLE}", ""]
    if not rows:
        return lines + [NOT_RUN, ""]
    return lines + table(["task", "arm", "lr", "steps after warmup", "‖∂L/∂W‖ p50", "p90", "p99", "max",
                          "own gradient norm p50"], rows) + ["", WGRAD_NOTE, ""]


# ----------------------------------------------------------------------------- qkvo study

def rate_cells(rs):
    """One swept group's cells: "lr: held-out loss" per rate (the best in bold), and its best rate,
    marked where it sits at an edge of the swept rates."""
    rs = sorted(rs, key=lambda r: r["lr"])
    best = min(rs, key=lambda r: r["heldout_final"])
    edge = " (grid edge)" if best["lr"] in (rs[0]["lr"], rs[-1]["lr"]) and len(rs) > 1 else ""
    cells = [f"**{r['lr']:g}: {r['heldout_final']:.4f}**" if r is best else f"{r['lr']:g}: {r['heldout_final']:.4f}"
             for r in rs]
    return best, " · ".join(cells), f"{best['lr']:g}{edge}"


EDGE_NOTE = "A best rate at the edge of the swept rates was not bracketed: a rate beyond it may be better."


def sweep_table(sweep, planned=None):
    """planned: qkvo_settings.json's {setting: {method: rank}}, to name what has no finished sweep run."""
    lines = ["## qkvo study: learning-rate sweep (GSM8K, seed 0): final held-out loss per rate", ""]
    rows = []
    for setting in sorted({r["setting"] for r in sweep}, key=lambda s: (s != "paper", s)):
        for method in METHODS:
            rs = [r for r in sweep if r["setting"] == setting and r["method"] == method]
            if rs:
                best, cells, best_lr = rate_cells(rs)
                rows.append([setting, NAMES[method], "rule" if best["rank"] is None else best["rank"],
                             f"{best['trainable']:,}", cells, best_lr])
    lines += table(["setting", "method", "rank", "trainable", f"lr: held-out loss, {LOSS} (best in bold)", "best lr"], rows)
    lines += ["", EDGE_NOTE]
    absent = [f"{setting} {NAMES[m]}" for setting, methods in (planned or {}).items() for m in methods
              if not any(r["setting"] == setting and r["method"] == m for r in sweep)]
    return lines + ([f"Not swept yet: {', '.join(absent)}."] if absent else []) + [""]


def shape_name(name):
    """A factor shape as the tables print it: "(m, n, p, q) / (m, n, p, q)" for wq wo / wk wv."""
    f = {**study.FACTORS, **study.SHAPES}[name]
    return "default rule" if f is None else f"{tuple(f['wq'])} / {tuple(f['wk'])}"


def shapes_sweep_table(shapes_sweep):
    lines = ["## qkvo study: learning-rate sweep of the factor shapes (SoKA, GSM8K, seed 0)", ""]
    rows = []
    for name in study.shape_variants():
        rs = [r for r in shapes_sweep if r["factors"] == name]
        if rs:
            best, cells, best_lr = rate_cells(rs)
            rows.append([name, shape_name(name), "rule" if best["rank"] is None else best["rank"],
                         f"{best['trainable']:,}", f"{best['gnorm_max']:.2f}", cells, best_lr])
    lines += table(["factors", "(m, n, p, q): wq wo / wk wv", "rank", "trainable", "max grad norm at the best rate",
                    f"lr: held-out loss, {LOSS} (best in bold)", "best lr"], rows)
    return lines + ["", EDGE_NOTE, ""]


def variant(r):
    """What an ablation run changed ("" for the default SoKA run)."""
    return ", ".join(f"{k} {r[k]}" for k in ("tau", "init", "factors") if r.get(k) is not None)


def missing_runs(runs):
    """Task × method × variant × seed combinations that some other group has and this one lacks."""
    seeds = sorted({r["seed"] for r in runs})
    miss = []
    for (task, method, var), rs in group(runs, lambda r: (r["task"], r["method"], variant(r))).items():
        have = {r["seed"] for r in rs}
        miss += [f"{task} {NAMES[method]}{' ' + var if var else ''} seed {s}" for s in seeds if s not in have]
    return miss


def qkvo_label(stage, key):
    return f"acc|{stage}|{'|'.join(map(str, key))}"


def runs_table(runs, title, stage, key=lambda r: (r["task"], NAMES[r["method"]]), key_names=("task", "method")):
    """One row per group of seeds (default task × method): held-out loss and accuracy with their 95 %
    intervals (accuracy from counts: unpaired), max grad norm, steps above 1.5, time."""
    rows = []
    for k, rs in ordered(group(runs, key)):
        rs = sorted(rs, key=lambda r: r["seed"])
        ev = [r for r in rs if r.get("accuracy") is not None]
        n = sorted({r["n_eval"] for r in ev})
        acc = (ci(*stats.count_interval([r["correct"] for r in ev], n[0], qkvo_label(stage, k)), 2, 100)
               + f" (n={n[0]})") if ev and len(n) == 1 else "–"
        rows.append([*k, ",".join(str(r["seed"]) for r in rs), f"{rs[0]['trainable']:,}", f"{rs[0]['lr']:g}",
                     ci(*heldout_ci(rs)), acc, f"{max(r['gnorm_max'] for r in rs):.2f}",
                     f"{100 * np.mean([r['gnorm_above_1_5'] for r in rs]):.1f} %",
                     f"{np.mean([r['train_s'] for r in rs]):.1f}" + (" ‡" if any(r.get("side_by_side") for r in rs) else "")])
    header = [*key_names, "seeds", "trainable", "lr", f"held-out loss, {LOSS} [95 % CI]", "accuracy % [95 % CI]",
              "max grad norm", "steps > 1.5", "train s / run"]
    lines = [f"## {title}", ""] + table(header, rows)
    miss = missing_runs(runs)
    lines += ["", f"Missing runs: {', '.join(miss)}." if miss else "No run is missing."]
    if any(r.get("side_by_side") for r in runs):
        lines += ["‡ some of these runs shared the GPU with other runs (study.py --claims): their times are "
                  "not comparable with the others'."]
    return lines + ["Held-out loss: mean over seeds [Student t 95 % interval]. Accuracy: mean over seeds [95 % "
                    "bootstrap interval over seeds and problems, from each run's count: these runs kept no "
                    "per-problem results]. Max grad norm: the largest over seeds, before clipping at 1.0; steps > "
                    "1.5: the mean share over seeds.", ""]


def qkvo_measures():
    """(claim, measure, value of a run, lower is better, digits): the per-seed measures compared."""
    return [("(2) matches or beats", "held-out loss (final)", lambda r: r["heldout_final"], True, 4),
            ("(3) faster convergence", "held-out loss, first eval", lambda r: first_heldout(r)[1], True, 4),
            ("(3) faster convergence", f"train loss, first {100 * EARLY:.0f} % of steps", lambda r: early_loss(r["loss"]), True, 4),
            ("(4) smoother loss", f"roughness (RMS − {SMOOTH}-step mean)", lambda r: roughness(r["loss"]), True, 4)]


def claims(runs, stage):
    """Rows (claim, task, measure, SoKA, other, Δ = SoKA − other [95 % CI], verdict) on these runs."""
    by = group(runs, lambda r: (r["task"], r["method"]))
    tasks = [t for t in study.TASKS if any(k[0] == t for k in by)]
    others = [m for m in METHODS[1:] if any(k[1] == m for k in by)]
    rows = []
    count = {m: by[k][0]["trainable"] for k in by for m in METHODS if k[1] == m}
    if "soka" in count:
        for m in others:
            ratio = count["soka"] / count[m]
            rows.append(["(1) fewer trainable parameters", "all", "trainable", f"{count['soka']:,}",
                         f"{NAMES[m]} {count[m]:,}", f"ratio {ratio:.3f} ({100 * (1 - ratio):.1f} % fewer)",
                         "fewer" if ratio < 1 else "more"])
    for task in tasks:
        if (task, "soka") not in by:
            continue
        for m in others:
            s, o = by[task, "soka"], by.get((task, m), [])
            if not o or not all(r.get("accuracy") is not None for r in s + o):
                continue
            n = s[0]["n_eval"]
            d = stats.count_difference([r["correct"] for r in s], [r["correct"] for r in o], n,
                                       f"diff|{stage}|{task}|soka|{m}")
            rows.append(["(2) matches or beats", task, "accuracy % (unpaired)",
                         f"{100 * np.mean([r['accuracy'] for r in s]):.2f}",
                         f"{NAMES[m]} {100 * np.mean([r['accuracy'] for r in o]):.2f}",
                         ci(d["diff"], d["lo"], d["hi"], 2, 100, sign=True), stats.verdict(d["lo"], d["hi"], lower_is_better=False)])
        for claim, measure, f, lower, digits in qkvo_measures():
            if "first eval" in measure:
                measure += f" (step {first_heldout(by[task, 'soka'][0])[0]})"
            for m in others:
                s, o = [f(r) for r in by[task, "soka"]], [f(r) for r in by.get((task, m), [])]
                if not o:
                    continue
                w = stats.welch(s, o)
                rows.append([claim, task, measure, f"{np.mean(s):.{digits}f}", f"{NAMES[m]} {np.mean(o):.{digits}f}",
                             ci(w["diff"], w["lo"], w["hi"], digits, sign=True), stats.verdict(w["lo"], w["hi"], lower_is_better=lower)])
        share = {m: float(np.mean(np.concatenate([np.asarray(after_warmup(r)) > GNORM_LINE for r in by[task, m]])))
                 for m in METHODS if (task, m) in by}
        rows.append([f"(5) grad norm rarely > {GNORM_LINE}", task, "share of steps > 1.5 after warmup",
                     f"{100 * share['soka']:.1f} %", " · ".join(f"{NAMES[m]} {100 * share[m]:.1f} %" for m in others if m in share),
                     "", "rarely" if share["soka"] < RARELY else "not rarely"])
    return rows


def claims_table(runs, title, stage):
    lines = [f"## {title}", ""]
    lines += table(["claim", "task", "measure", "SoKA", "other", "Δ = SoKA − other [95 % CI]", "verdict"], claims(runs, stage))
    return lines + ["", "Means over seeds. Δ intervals: Welch's for the per-seed measures, the unpaired count bootstrap "
                    "for accuracy (experiments/stats.py). Verdict: \"better\" or \"worse\" only where the interval "
                    "excludes 0, else \"tie\". (1) compares exact counts. (5): \"rarely\" when SoKA's share of steps "
                    f"after warmup with gradient norm > {GNORM_LINE} is under {100 * RARELY:.0f} %. Roughness = RMS of "
                    f"(loss − its centered {SMOOTH}-step moving average) where the window fits.", ""]


def gnorm_table(runs, title, key, key_names):
    rows = [[*k, *gnorm_cells(rs)] for k, rs in ordered(group(runs, key))]
    return [f"## {title}", ""] + table([*key_names, *GNORM_HEADER], rows) + ["", GNORM_NOTE, ""]


def left_out(results_dir, stage, where, name):
    """A line naming a stage's superseded runs (load(superseded=True)), or nothing."""
    old = load(results_dir, stage, superseded=True)
    if not old:
        return []
    which = ", ".join(sorted({f"{name(r)} lr {r['lr']:g}" for r in old}))
    return [f"Left out of {where}: {len(old)} runs at a rate its sweep no longer picks ({which}; run before "
            f"the sweep moved past it).", ""]


def qkvo_study(results_dir):
    stages = {s: load(results_dir, s) for s in ("sweep", "final", "ablate", "matched", "shapes_sweep", "shapes")}
    lines = []
    st = Path(results_dir) / "qkvo_settings.json"
    planned = {k: v for k, v in json.loads(st.read_text()).items() if k != "counts"} if st.is_file() else None
    if stages["sweep"]:
        lines += sweep_table(stages["sweep"], planned)
    for stage, setting in (("final", "paper"), ("matched", "matched")):
        if stages[stage]:
            lines += runs_table(stages[stage], f"qkvo study: final runs, {setting} setting (wq wk wv wo)", stage)
            lines += claims_table(stages[stage], f"qkvo study: the paper's claims, {setting} setting", stage)
            lines += gnorm_table(stages[stage], f"qkvo study: gradient norms after warmup, {setting} setting",
                                 lambda r: (r["task"], NAMES[r["method"]]), ("task", "method"))
        lines += left_out(results_dir, stage, f"the {setting} setting", lambda r: NAMES[r["method"]])
    if stages["shapes_sweep"]:
        lines += shapes_sweep_table(stages["shapes_sweep"])
    if stages["ablate"]:
        base = [r for r in stages["final"] if r["task"] == "gsm8k" and r["method"] == "soka"]
        rows = [dict(r, tau=0.9) for r in base] + stages["ablate"]     # the final runs use τ = 0.9
        lines += runs_table(rows, "qkvo study: ablation, SoKA on GSM8K (τ = 0.9 is the final runs'; each factor "
                            "shape at its best rate)", "ablate", key=lambda r: (variant(r),), key_names=("variant",))
        lines += left_out(results_dir, "ablate", "the ablation", variant)
    if stages["shapes"]:
        lines += runs_table(stages["shapes"], "qkvo study: factor shapes at one parameter count, SoKA on GSM8K, "
                            f"rank {study.SHAPES_RANK} in every layer", "shapes",
                            key=lambda r: (r["factors"], shape_name(r["factors"])),
                            key_names=("factors", "(m, n, p, q): wq wo / wk wv"))
        lines += left_out(results_dir, "shapes", "the factor shapes", lambda r: r["factors"])
    return lines


# ----------------------------------------------------------------------------- per-task study

def arm_label(settings, setting, arm):
    a = settings[setting]["arms"][arm]
    if a["method"] != "soka":
        return f"{NAMES[a['method']]} r={a['rank']} ({a['role']})"
    return f"SoKA, {a['role']}"


def finals_per_task(results_dir, settings):
    """{(setting, arm): runs} of the per-task study's final stages; setting "rule" also holds the rule's
    own arm, "qv/soka", from qv_final."""
    out = {}
    for setting in ("qv", "all7", "rule"):
        for r in load_per_task(results_dir, f"{setting}_final", settings):
            out.setdefault((setting, r["arm"]), []).append(r)
    for (setting, arm), rs in list(out.items()):
        if (setting, arm) == ("qv", "soka"):
            out["rule", "qv/soka"] = rs
    return out


def acc_label(r):
    return f"acc|{r['stage']}|{r['task']}|{r['arm']}"


def diff_label(a, b, task):
    return f"diff|{task}|{a['stage']}/{a['arm']}|{b['stage']}/{b['arm']}"


def arms_of(settings, setting):
    arms = list(settings[setting]["arms"])
    return (["qv/soka"] + arms) if setting == "rule" else arms


def base_table(results_dir):
    runs = study.read(results_dir, "base")
    done = {r["id"]: r for r in runs if r.get("status") == "done"}
    lines = ["## Base model (SmolLM2-135M-Instruct as it is)", ""]
    rows = []
    for task in study.TASKS:
        ev, held = done.get(f"base/{task}/eval"), done.get(f"base/{task}/heldout")
        if ev is None and held is None:
            continue
        acc = "not run"
        if ev is not None:
            _, V, _ = matrix(results_dir, [ev])
            acc = ci(*stats.acc_interval(V, acc_label(ev)), 2, 100)
        rows.append([task, EVAL_SPLIT[task],
                     f"{ev['n_eval']:,}" if ev else "–", acc,
                     f"{held['heldout_final']:.4f}" if held else "not run"])
    if not rows:
        return lines + [NOT_RUN, ""]
    return lines + table(["task", "split", "problems", "accuracy % [95 % CI]", f"held-out loss, {LOSS}"], rows) + [
        "", "Accuracy: greedy generation through train.py --eval-only, 95 % bootstrap interval over problems. Held-out "
        "loss: train.py's held-out code on the runs' held-out examples, after one LoRA step at learning rate 1e-12 from "
        "B = 0 (an update of about 1e-13, below bfloat16's resolution of the weights: the base model).", ""]


def sweep_table_per_task(results_dir, settings, setting):
    lines = [f"## {SETTING_TITLES[setting]}: learning-rate sweeps (seed 0)", ""]
    sweep = [r for r in study.read(results_dir, f"{setting}_sweep") if r.get("status") == "done"]
    sweep = list({r["id"]: r for r in sweep}.values())
    rows = []
    for task in study.TASKS:
        for arm in settings[setting]["arms"]:
            rs = [r for r in sweep if r["task"] == task and r["arm"] == arm]
            if rs:
                best, cells, best_lr = rate_cells(rs)
                rows.append([task, arm, f"{best['trainable']:,}", cells, best_lr])
    if not rows:
        return lines + [NOT_RUN, ""]
    shared = [f"{arm} takes {a['same_as']}'s rates (the same ranks in every layer)"
              for arm, a in settings[setting]["arms"].items() if a.get("same_as")]
    return lines + table(["task", "arm", "trainable", f"lr: final held-out loss, {LOSS} (best in bold)", "best lr"], rows) + \
        ["", EDGE_NOTE + (" " + "; ".join(shared) + "." if shared else ""), ""]


def finals_table_per_task(results_dir, settings, setting, finals):
    lines = [f"## {SETTING_TITLES[setting]}: final runs", ""]
    rows = []
    for task in study.TASKS:
        for arm in arms_of(settings, setting):
            rs = sorted(finals.get((setting, arm), []), key=lambda r: r["seed"])
            rs = [r for r in rs if r["task"] == task]
            if not rs:
                continue
            _, V, _ = matrix(results_dir, rs)
            rows.append([task, arm, f"{rs[0]['trainable']:,}", f"{rs[0]['lr']:g}", ",".join(str(r["seed"]) for r in rs),
                         ci(*heldout_ci(rs)), ci(*stats.acc_interval(V, acc_label(rs[0])), 2, 100)])
    if not rows:
        return lines + [NOT_RUN, ""]
    return lines + table(["task", "arm", "trainable", "lr", "seeds", f"held-out loss, {LOSS} [95 % CI]",
                          "accuracy % [95 % CI]"], rows) + [
        "", "Held-out loss: mean over seeds [Student t 95 % interval]. Accuracy: mean over seeds and problems [95 % "
        "bootstrap interval over problems and seeds].", ""]


_COMPARED = {}


def compare(results_dir, a_runs, b_runs, task):
    """Δ = A − B on one task: held-out loss (Welch) and accuracy (paired bootstrap, McNemar);
    remembered by the runs' ids (the claims table asks again for the comparisons of the settings')."""
    key = (str(results_dir), task, tuple(r["id"] for r in a_runs), tuple(r["id"] for r in b_runs),
           tuple(r.get("problems") for r in a_runs + b_runs))
    if key not in _COMPARED:
        _COMPARED[key] = _compare(results_dir, a_runs, b_runs, task)
    return _COMPARED[key]


def _compare(results_dir, a_runs, b_runs, task):
    a = sorted((r for r in a_runs if r["task"] == task), key=lambda r: r["seed"])
    b = sorted((r for r in b_runs if r["task"] == task), key=lambda r: r["seed"])
    if not a or not b:
        return None
    ia, VA, sa = matrix(results_dir, a)
    ib, VB, sb = matrix(results_dir, b)
    if ia != ib:
        raise ValueError(f"plot_study.py: {task}: two arms evaluated on different problems")
    return dict(loss=stats.welch([r["heldout_final"] for r in a], [r["heldout_final"] for r in b]),
                acc=stats.acc_difference(VA, VB, diff_label(a[0], b[0], task), sa, sb),
                first=stats.welch([first_heldout(r)[1] for r in a], [first_heldout(r)[1] for r in b]),
                rough=stats.welch([roughness(r["loss"]) for r in a], [roughness(r["loss"]) for r in b]),
                step=first_heldout(a[0])[0])


def compare_table_per_task(results_dir, settings, setting, finals):
    ref = "qv/soka" if setting == "rule" else "soka"
    lines = [f"## {SETTING_TITLES[setting]}: {ref} against each arm (Δ = {ref} − arm)", ""]
    rows = []
    for task in study.TASKS:
        for arm in arms_of(settings, setting):
            if arm == ref:
                continue
            c = compare(results_dir, finals.get((setting, ref), []), finals.get((setting, arm), []), task)
            if c is None:
                continue
            L, A = c["loss"], c["acc"]
            rows.append([task, arm, ci(L["diff"], L["lo"], L["hi"], 4, sign=True),
                         stats.verdict(L["lo"], L["hi"], lower_is_better=True),
                         ci(A["diff"], A["lo"], A["hi"], 2, 100, sign=True), fmt_p(A["p_boot"]),
                         f"{A['mcnemar_b']} / {A['mcnemar_c']}, {fmt_p(A['p_mcnemar'])}",
                         stats.verdict(A["lo"], A["hi"], lower_is_better=False)])
    if not rows:
        return lines + [NOT_RUN, ""]
    return lines + table(["task", "arm", f"Δ held-out loss, {LOSS} [95 % CI]", "verdict", "Δ accuracy, points [95 % CI]",
                          "p (paired bootstrap)", "McNemar b / c, p", "verdict"], rows) + [
        "", "Held-out loss: Welch's interval over seeds. Accuracy: paired bootstrap over problems (the same problems "
        "for both arms) and seeds; McNemar's exact test on the runs of equal seed (b: right only for the first, c: "
        "right only for the arm). Verdict: \"better\" or \"worse\" only where the interval excludes 0, else \"tie\".", ""]


def gnorm_table_per_task(settings, setting, finals):
    rows = []
    for task in study.TASKS:
        for arm in arms_of(settings, setting):
            rs = [r for r in finals.get((setting, arm), []) if r["task"] == task]
            if rs:
                rows.append([task, arm, *gnorm_cells(rs)])
    lines = [f"## {SETTING_TITLES[setting]}: gradient norms after warmup", ""]
    if not rows:
        return lines + [NOT_RUN, ""]
    return lines + table(["task", "arm", *GNORM_HEADER], rows) + ["", GNORM_NOTE, ""]


def tasks_cell(parts):
    """One cell for all tasks: each task's value, or "not run" for a task whose runs are missing."""
    got = dict(parts)
    return " · ".join(f"{TASK_NAMES[t]} {got.get(t, 'not run')}" for t in study.TASKS) if got else "not run"


def claims_per_task(results_dir, settings, finals):
    """The claims table's rows: claim, setting, ours [95 % CI], the paper's, verdict."""
    if settings is None:
        return []
    rows = []
    a = settings["arithmetic"]

    def count(setting, arm, planned):
        rs = finals.get((setting, arm))
        return (rs[0]["trainable"], "") if rs else (planned, " (from the spectra; not run)")
    big = next(arm for arm, x in settings["qv"]["arms"].items() if x["method"] == "lora" and x["role"].startswith("1.33"))
    for setting, arm, planned_s, planned_o in (("qv", big, a["soka_qv"], a["lora_rank_lokr"] * a["lora_per_rank_qv"]),
                                               ("all7", f"lora_r{a['lora_rank_count_all7']}", a["soka_all7"],
                                                a["lora_rank_count_all7"] * a["lora_per_rank_all7"])):
        (s, note), (o, _) = count(setting, "soka", planned_s), count(setting, arm, planned_o)
        rows.append(["25 % fewer trainable parameters than LoRA / PiSSA", f"{setting}: SoKA vs r={settings[setting]['arms'][arm]['rank']}",
                     f"{s:,} vs {o:,}: {100 * abs(1 - s / o):.1f} % {'fewer' if s < o else 'more'}{note}",
                     PAPER["params"], "fewer" if s < o else "more"])
    baselines = [(setting, arm) for setting in ("qv", "all7") for arm, x in settings[setting]["arms"].items() if x["method"] != "soka"]
    for measure in ("acc", "loss"):
        for setting, arm in sorted(baselines, key=lambda x: (x[1].split("_")[0] != "lora", x[0] != "qv")):
            parts, verdicts = [], []
            for task in study.TASKS:
                c = compare(results_dir, finals.get((setting, "soka"), []), finals.get((setting, arm), []), task)
                if c is None:
                    continue
                d = c[measure]
                if measure == "acc":
                    parts.append((task, ci(d["diff"], d["lo"], d["hi"], 2, 100, sign=True)))
                    verdicts.append((task, stats.verdict(d["lo"], d["hi"], lower_is_better=False)))
                else:
                    parts.append((task, ci(d["diff"], d["lo"], d["hi"], 4, sign=True)))
                    verdicts.append((task, stats.verdict(d["lo"], d["hi"], lower_is_better=True)))
            x = settings[setting]["arms"][arm]
            claim = (f"matches or beats {NAMES[x['method']]}: accuracy, Δ points" if measure == "acc"
                     else f"(ours) held-out loss against {NAMES[x['method']]}, Δ {LOSS}")
            rows.append([claim, f"{setting}: r={x['rank']}, {x['role']}", tasks_cell(parts),
                         PAPER["acc"] if measure == "acc" else PAPER["loss"], tasks_cell(verdicts)])
    qv_base = [arm for arm, x in settings["qv"]["arms"].items() if x["method"] != "soka" and x["role"].startswith("1.33")]
    for what, claim in (("first", "faster convergence: held-out loss at the first evaluation, Δ"),
                        ("rough", f"smoother loss: roughness (RMS − {SMOOTH}-step mean), Δ")):
        for arm in qv_base:
            parts, verdicts = [], []
            for task in study.TASKS:
                c = compare(results_dir, finals.get(("qv", "soka"), []), finals.get(("qv", arm), []), task)
                if c is None:
                    continue
                d = c[what]
                parts.append((task, ci(d["diff"], d["lo"], d["hi"], 4, sign=True)
                              + (f" (step {c['step']})" if what == "first" else "")))
                verdicts.append((task, stats.verdict(d["lo"], d["hi"], lower_is_better=True)))
            x = settings["qv"]["arms"][arm]
            rows.append([claim, f"qv: vs {NAMES[x['method']]} r={x['rank']}", tasks_cell(parts),
                         PAPER["faster" if what == "first" else "smoother"], tasks_cell(verdicts)])
    parts, verdicts = [], []
    for task in study.TASKS:
        rs = [r for r in finals.get(("qv", "soka"), []) if r["task"] == task]
        if rs:
            g = np.concatenate([after_warmup(r) for r in rs])
            share = float(np.mean(g > GNORM_LINE))
            parts.append((task, f"{100 * share:.1f} % of steps (max {g.max():.2f})"))
            verdicts.append((task, "rarely" if share < RARELY else "not rarely"))
    rows.append([f"gradient norms rarely above {GNORM_LINE}", "qv: SoKA, steps after warmup", tasks_cell(parts),
                 PAPER["gnorm"], tasks_cell(verdicts)])
    return rows


def claims_table_per_task(results_dir, settings, finals):
    lines = ["## Claims", ""]
    rows = claims_per_task(results_dir, settings, finals)
    if not rows:
        return lines + [NOT_RUN, ""]
    return lines + table(["claim", "setting", "ours [95 % CI], per task", "paper (LLaMA-2-7B)", "verdict"], rows) + [
        "", "Δ = SoKA − the other arm, each at its task's best swept rate, over seeds 0-2 (more where listed in the final "
        "runs' table). Accuracy: paired bootstrap over problems and seeds; held-out loss, first held-out loss and "
        "roughness: Welch's interval over seeds. Verdict: \"better\" or \"worse\" only where the 95 % interval "
        f"excludes 0, else \"tie\"; gradient norms: \"rarely\" when under {100 * RARELY:.0f} % of the steps after "
        "warmup are above 1.5, in each method's own parametrisation.", ""]


def planned_count(settings, setting, arm):
    """An arm's trainable parameters as the spectra (float32, CPU) give them: read_settings's arithmetic."""
    a, x = settings["arithmetic"], settings[setting]["arms"][arm]
    if x["method"] != "soka":
        return x["rank"] * a["lora_per_rank_qv" if setting != "all7" else "lora_per_rank_all7"]
    if x.get("rank"):
        return x["rank"] * a["soka_per_rank_qv"]
    if x.get("rule") == "energy":
        return a["energy_count_qv"]
    return a["soka_all7"] if setting == "all7" else a["soka_qv"]


def settings_table_per_task(settings):
    fixed = lambda x: x["method"] != "soka" or x.get("rank") is not None     # noqa: E731  (no rank rule)
    rows = [[setting, arm, NAMES[x["method"]], "rule" if x.get("rank") is None else x["rank"],
             "–" if fixed(x) else x.get("rule") or "both", "–" if fixed(x) else f"{x.get('tau', 0.9):g}",
             f"{planned_count(settings, setting, arm):,}", x["role"] + (f"; the rule's rate ({x['same_as']})" if x.get("same_as") else "")]
            for setting in ("qv", "all7", "rule") for arm, x in settings[setting]["arms"].items()]
    return ["## Per-task study: the arms and their parameter counts", ""] + table(
        ["setting", "arm", "method", "rank", "rank rule", "τ", "trainable (from the spectra)", "role"], rows) + [
        "", "Counts from the float32 spectra on the CPU (per_task_settings.json); a run selects its ranks from the bfloat16 "
        "weights on the GPU and records its own count, which the final-run tables show.", ""]


def quant_table(results_dir):
    path = Path(results_dir) / "quant_noise.json"
    if not path.is_file():
        return []
    q = json.loads(path.read_text())
    rows = []
    for t in spectra.ALL_TARGETS:
        ls = [x for x in q["layers"] if x["type"] == t]
        if ls:
            rows.append([t, f"{len(ls)}", ", ".join(sorted({x['gguf_type'] for x in ls})),
                         f"{100 * max(x['noise_energy_share'] for x in ls):.2f} %", f"{np.mean([x['noise_sigma1'] for x in ls]):.3f}",
                         f"{min(x['ratio_r'] for x in ls):.1f}", f"{min(x['ratio_16'] for x in ls):.1f}",
                         f"{min(x['ratio_64'] for x in ls):.1f}", f"{min(x['gap_ratio'] for x in ls):.1f}"])
    return ["## Quantization noise (Q4_1) against the Kronecker spectra", ""] + table(
        ["type", "layers", "GGUF type", "noise energy / ‖W‖² (max)", "σ₁ of the noise (mean)", "σ_r / σ₁(noise), min",
         "σ_16 / σ₁(noise), min", "σ_64 / σ₁(noise), min", "elbow gap / noise RMS, min"], rows) + [
        "", f"One draw (seed {q['seed']}) of rounding noise, uniform on ±d/2 per weight with d its Q4_1 block's step, "
        "rearranged as the weight's KPSVD rearranges it; r is the rule's rank at τ = 0.9 (experiments/spectra.py "
        "--quant-noise, quant_noise.json).", ""]


def per_task_study(results_dir):
    settings = read_settings(results_dir)
    finals = finals_per_task(results_dir, settings) if settings else {}
    lines = claims_table_per_task(results_dir, settings, finals) + quant_table(results_dir)
    lines += (settings_table_per_task(settings) if settings else []) + base_table(results_dir)
    if settings is None:
        return lines
    for setting in ("qv", "all7", "rule"):
        lines += sweep_table_per_task(results_dir, settings, setting)
        lines += finals_table_per_task(results_dir, settings, setting, finals)
        lines += compare_table_per_task(results_dir, settings, setting, finals)
        lines += gnorm_table_per_task(settings, setting, finals)
    return lines + wgrad_table(results_dir, settings)


def tables(results_dir):
    """The markdown of tables.md."""
    _COMPARED.clear()                       # the records may have changed since the last call
    stages = [s for s in (*study.QKVO[1:], *study.PER_TASK) if study.read(results_dir, s)]
    lines = ["# Reproduction study: tables", "",
             f"Generated by `python experiments/plot_study.py` from the records of {', '.join(stages) or 'no stage'}; "
             "checked by `python experiments/check_tables.py`.", ""]
    return "\n".join(lines + per_task_study(results_dir) + qkvo_study(results_dir)) + "\n"


# ----------------------------------------------------------------------------- the doc's quoted tables

QUOTE = re.compile(r"(<!-- tables\.md: (.+?) -->\n)(.*?)(<!-- end -->)", re.S)


def section(md, heading):
    """The body of `## heading` in tables.md: its table (or "Not run.") lines, without the notes."""
    lines = md.splitlines()
    try:
        i = lines.index(f"## {heading}")
    except ValueError:
        return None
    body = []
    for line in lines[i + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("|") or line == NOT_RUN:
            body.append(line)
    return "\n".join(body) + "\n"


def quote_tables(doc, md):
    """The doc with each quoted block replaced by its heading's table from tables.md ("Not run." where
    tables.md has no such heading)."""
    return QUOTE.sub(lambda m: m.group(1) + (section(md, m.group(2)) or NOT_RUN + "\n") + m.group(4), doc)


# ----------------------------------------------------------------------------- plots

def band_handle(plt):
    return plt.matplotlib.patches.Patch(color="gray", alpha=0.25, label=BAND)


def curves(ax, rs, color, label, field):
    """Mean over seeds of the 21-step moving average where the window fits, band min..max over seeds."""
    n = min(len(r[field]) for r in rs)
    ys = np.array([moving_average(r[field][:n]) for r in rs])
    if not ys.shape[1]:
        return
    x = np.arange(SMOOTH // 2 + 1, SMOOTH // 2 + 1 + ys.shape[1])
    ax.plot(x, ys.mean(0), color=color, lw=1.4, label=f"{label} ({len(rs)} seeds)")
    ax.fill_between(x, ys.min(0), ys.max(0), color=color, alpha=0.2, lw=0)


def heldout_curves(ax, rs, color, label):
    steps = [s for s, _ in rs[0]["heldout"]]
    ys = np.array([[v for _, v in r["heldout"]][:len(steps)] for r in rs if len(r["heldout"]) >= len(steps)])
    ax.plot(steps, ys.mean(0), "o-", color=color, ms=3, lw=1.4, label=f"{label} ({len(ys)} seeds)")
    ax.fill_between(steps, ys.min(0), ys.max(0), color=color, alpha=0.2, lw=0)


def clip_axis(ax, values, *, above=0.25):
    """Clip the y axis to [min − a little, min + above] where some value lies beyond (a diverged run),
    and mark those values at the top edge with an arrow and their number, in their line's color.
    values: (x, y, color) triples."""
    v = np.asarray([y for _, y, _ in values], dtype=float)
    top = v.min() + above
    if v.max() <= top:
        return False
    ax.set_ylim(v.min() - 0.1 * above, top)
    off = {}
    for x, y, c in values:
        if y > top:
            off.setdefault(x, []).append((y, c))
    for x, ys in off.items():                  # runs off the scale at one rate share one arrow
        for j, (y, c) in enumerate(sorted(ys)):
            ax.annotate(f"{y:.2f}", (x, top), xytext=(0, -22 - 8 * j), textcoords="offset points", ha="center",
                        fontsize=7, color=c, arrowprops=dict(arrowstyle="->", lw=0.8, color=c) if j == 0 else None)
    return True


def save(fig, path, rect=(0, 0, 1, 1)):
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return Path(path)


def plot_runs(runs, img_dir, prefix, title, key=lambda r: r["method"], label=lambda k: NAMES[k],
              color=lambda k: COLORS[k]):
    """repro_<prefix>loss.png, _heldout.png, _gradnorm.png: one panel per task, one line per group."""
    import matplotlib.pyplot as plt
    tasks = sorted(dict.fromkeys(r["task"] for r in runs), key=lambda t: ORDER.get(t, len(ORDER)))   # GSM8K first
    by = group(runs, lambda r: (r["task"], key(r)))
    keys = sorted(dict.fromkeys(key(r) for r in runs), key=lambda k: ORDER.get(k, len(ORDER)))   # methods in order
    paths = []
    for name, ylabel in (("loss", f"training loss, {LOSS}\n({SMOOTH}-step moving mean)"),
                         ("heldout", f"held-out loss, {LOSS}"), ("gradnorm", GNORM + "\n(log scale)")):
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.8 * len(tasks), 4.8), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for k in keys:
                rs = by.get((task, k))
                if not rs:
                    continue
                if name == "loss":
                    curves(ax, rs, color(k), label(k), "loss")
                elif name == "gradnorm":
                    for i, r in enumerate(rs):
                        ax.plot(np.arange(1, len(r["grad_norm"]) + 1), r["grad_norm"], color=color(k), lw=0.7,
                                alpha=0.6, label=f"{label(k)} ({len(rs)} seeds, one line each)" if i == 0 else None)
                else:
                    heldout_curves(ax, rs, color(k), label(k))
            if name == "gradnorm":
                ax.axhline(GNORM_LINE, color="k", ls="--", lw=0.8, label=f"{GNORM_LINE}: the paper's threshold")
                ax.axvline(warmup_steps(len(by[next(k for k in by if k[0] == task)][0]["grad_norm"])) + 0.5,
                           color="gray", ls=":", lw=0.8, label="end of warmup")
                ax.set_yscale("log")
            ax.set_title(f"{TASK_NAMES.get(task, task)}: {title}", fontsize=9)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.grid(alpha=0.3)
            handles, _ = ax.get_legend_handles_labels()       # under the panel: the curves stay clear
            ax.legend(handles=handles + ([] if name == "gradnorm" else [band_handle(plt)]), fontsize=6.5,
                      loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
        paths.append(save(fig, Path(img_dir) / f"repro_{prefix}{name}.png"))
    return paths


def plot_sweep(sweep, img_dir):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.2))
    points = []
    for (setting, m), rs in group(sweep, lambda r: (r["setting"], r["method"])).items():
        rs = sorted(rs, key=lambda r: r["lr"])
        ax.plot([r["lr"] for r in rs], [r["heldout_final"] for r in rs], "o-" if setting == "paper" else "s--",
                color=COLORS[m], label=f"{NAMES[m]}, {setting} setting ({rs[0]['trainable']:,} trainable)")
        points += [(r["lr"], r["heldout_final"], COLORS[m]) for r in rs]
    clipped = clip_axis(ax, points)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate (log scale)")
    ax.set_ylabel(f"final held-out loss, {LOSS}")
    ax.set_title("qkvo study: learning-rate sweep, GSM8K, seed 0" + ("\n(y axis clipped: arrows mark runs off the "
                 "scale, with their loss)" if clipped else ""), fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return [save(fig, Path(img_dir) / "repro_sweep.png")]


def arm_colors(settings, setting):
    """One color per arm of a setting, the same in its sweep and final-run plots (the rule ablation's own
    rule, qv's SoKA, is "qv/soka")."""
    arms = [*(["qv/soka"] if setting == "rule" else []), *settings[setting]["arms"]]
    return {arm: f"C{i}" for i, arm in enumerate(arms)}


def plot_sweep_per_task(sweep, settings, setting, img_dir):
    import matplotlib.pyplot as plt
    colors = arm_colors(settings, setting)
    tasks = [t for t in study.TASKS if any(r["task"] == t for r in sweep)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.8 * len(tasks), 4.0), squeeze=False)
    labels = {}
    for ax, task in zip(axes[0], tasks):
        points = []
        by_arm = group([r for r in sweep if r["task"] == task], lambda r: r["arm"])
        for arm in (a for a in colors if a in by_arm):
            rs = sorted(by_arm[arm], key=lambda r: r["lr"])
            labels[arm] = f"{arm} ({rs[0]['trainable']:,} trainable)"
            ax.plot([r["lr"] for r in rs], [r["heldout_final"] for r in rs], "o-", color=colors[arm], ms=4)
            points += [(r["lr"], r["heldout_final"], colors[arm]) for r in rs]
        clipped = clip_axis(ax, points)
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate (log scale)")
        ax.set_ylabel(f"final held-out loss, {LOSS}", fontsize=8)
        ax.set_title(f"{TASK_NAMES[task]}: {setting} sweep, seed 0" + ("\n(y clipped: arrows mark runs off the "
                     "scale, in their line's color)" if clipped else ""), fontsize=9)
        ax.grid(alpha=0.3, which="both")
    handles = [plt.Line2D([], [], color=colors[a], marker="o", ms=4, label=labels[a]) for a in colors if a in labels]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=7, frameon=False)
    return [save(fig, Path(img_dir) / f"repro_{setting}_sweep.png", rect=(0, 0.08, 1, 1))]


def plot_ablation(ablate, img_dir):
    """repro_ablate.png: the qkvo study's ablation on GSM8K, training loss and held-out loss per variant."""
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (var, rs) in enumerate(group(ablate, lambda r: variant(r) or "default").items()):
        curves(a1, rs, f"C{i}", f"{var}, lr {rs[0]['lr']:g}", "loss")
        heldout_curves(a2, rs, f"C{i}", f"{var}, lr {rs[0]['lr']:g}")
    a1.set(xlabel="optimizer step", ylabel=f"training loss, {LOSS} ({SMOOTH}-step moving mean)")
    a2.set(xlabel="optimizer step", ylabel=f"held-out loss, {LOSS}")
    for ax, what in ((a1, "training loss"), (a2, "held-out loss")):
        ax.set_title(f"qkvo study ablation, SoKA on GSM8K: {what}", fontsize=9)
        ax.grid(alpha=0.3)
    handles, _ = a2.get_legend_handles_labels()
    a2.legend(handles=handles + [band_handle(plt)], fontsize=6.5)
    return [save(fig, Path(img_dir) / "repro_ablate.png")]


def param_points(results_dir):
    """(task, short label, trainable, held-out mean, lo, hi, color, marker) of every final group of both
    studies (the qkvo study's τ and random-init rows left out: the rule's count, or σ = 0)."""
    pts = []
    for stage, name in (("final", "p"), ("matched", "m")):
        for (task, m), rs in ordered(group(load(results_dir, stage), lambda r: (r["task"], r["method"]))):
            pts.append((task, f"{NAMES[m]} {name}", rs[0]["trainable"], *heldout_ci(rs), COLORS[m], "o"))
    for name, rs in group([r for r in load(results_dir, "ablate") if r.get("factors")], lambda r: r["factors"]).items():
        pts.append(("gsm8k", name.replace("rule_r", "r="), rs[0]["trainable"], *heldout_ci(rs), "C0", "^"))
    for name, rs in group(load(results_dir, "shapes"), lambda r: r["factors"]).items():
        pts.append(("gsm8k", f"{name} r=3" if name == "rule" else "", rs[0]["trainable"], *heldout_ci(rs), "C0", "P"))
    for setting, arm, task, trs in final_groups_per_task(results_dir):
        pts.append((task, f"{setting} {arm}", trs[0]["trainable"], *heldout_ci(trs),
                    COLORS[trs[0]["method"]], {"qv": "s", "all7": "D", "rule": "v"}[setting]))
    return pts


def final_groups_per_task(results_dir):
    """(setting, arm, task, runs) of the per-task study's final runs; the rule ablation's own rule,
    qv's SoKA, once (under qv)."""
    settings = read_settings(results_dir)
    for (setting, arm), rs in (finals_per_task(results_dir, settings) if settings else {}).items():
        if not (setting == "rule" and arm == "qv/soka"):
            for task, trs in group(rs, lambda r: r["task"]).items():
                yield setting, arm, task, trs


def place_labels(fig, labels):
    """Each point's label beside it (LoRA's to the left), moved up or down where it would cover a label
    already placed, bottom to top; where every place is taken, the first."""
    renderer = fig.canvas.get_renderer()
    for ax, rows in labels.items():
        placed = []
        for lab, n, m, left in sorted(rows, key=lambda row: row[2]):
            for dy in (2, 10, -6, 18, -14, 26, -22, None):
                a = ax.annotate(lab, (n, m), xytext=(-4 if left else 4, dy or 2), textcoords="offset points",
                                fontsize=6, ha="right" if left else "left")
                box = a.get_window_extent(renderer)
                if dy is None or not any(box.overlaps(b) for b in placed):
                    break
                a.remove()
            placed.append(box)


def plot_params(results_dir, img_dir):
    """repro_params.png: final held-out loss against trainable parameters, every setting, per task."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter
    pts = param_points(results_dir)
    tasks = [t for t in study.TASKS if any(p[0] == t for p in pts)]
    if not tasks:
        return []
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.6), squeeze=False)
    labels = {}
    for ax, task in zip(axes[0], tasks):
        for _, lab, n, m, lo, hi, color, marker in (p for p in pts if p[0] == task):
            err = None if not np.isfinite(lo) else [[m - lo], [hi - m]]
            ax.errorbar(n, m, yerr=err, fmt=marker, color=color, ms=5, capsize=2, lw=0.8)
            if lab:
                labels.setdefault(ax, []).append((lab, n, m, color == COLORS["lora"]))
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e6:g} M" if x >= 1e6 else f"{x / 1e3:g} k"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks([t for t in (1e5, 2e5, 3e5, 5e5, 1e6, 2e6, 4e6) if min(p[2] for p in pts if p[0] == task) / 1.5 < t
                       < max(p[2] for p in pts if p[0] == task) * 1.5])
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel(f"final held-out loss, {LOSS}", fontsize=8)
        ax.set_title(f"{TASK_NAMES[task]}: held-out loss vs trainable parameters", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    handles = [plt.Line2D([], [], ls="", marker=mk, color="gray", label=lab) for mk, lab in
               (("o", "qkvo study (wq wk wv wo): p paper setting, m matched"), ("^", "qkvo study ablation: factor shapes"),
                ("P", "qkvo study: three factor shapes at rank 3"), ("s", "qv (wq wv)"), ("D", "all7"), ("v", "rule ablation"))]
    handles += [plt.Line2D([], [], color=COLORS[m], lw=3, label=NAMES[m]) for m in METHODS]
    handles += [plt.Line2D([], [], color="k", lw=0.8, label="bar: 95 % t interval over seeds")]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    place_labels(fig, labels)
    fig.savefig(Path(img_dir) / "repro_params.png", dpi=90)
    plt.close(fig)
    return [Path(img_dir) / "repro_params.png"]


def accuracy_points(results_dir):
    """(task, label, mean, lo, hi, kind) in percent: the base model, the qkvo study (count intervals),
    the per-task study (per-problem intervals)."""
    pts = []
    for r in study.read(results_dir, "base"):
        if r.get("status") == "done" and r["arm"] == "eval":
            _, V, _ = matrix(results_dir, [r])
            pts.append((r["task"], "base model", *(100 * x for x in stats.acc_interval(V, acc_label(r))), "base"))
    for stage, name in (("final", "qkvo paper"), ("matched", "qkvo matched")):
        for (task, m), rs in ordered(group(load(results_dir, stage), lambda r: (r["task"], NAMES[r["method"]]))):
            pts.append((task, f"{name}: {m}", *(100 * x for x in stats.count_interval(
                [r["correct"] for r in rs], rs[0]["n_eval"], qkvo_label(stage, (task, m)))), "counts"))
    for setting, arm, task, trs in final_groups_per_task(results_dir):
        _, V, _ = matrix(results_dir, trs)
        pts.append((task, f"{setting}: {arm}", *(100 * x for x in stats.acc_interval(V, acc_label(trs[0]))),
                    "problems"))
    return pts


def plot_accuracy(results_dir, img_dir):
    """repro_accuracy.png: test accuracy with 95 % intervals, per task, every group."""
    import matplotlib.pyplot as plt
    pts = accuracy_points(results_dir)
    tasks = [t for t in study.TASKS if any(p[0] == t for p in pts)]
    if not tasks:
        return []
    n = max(sum(p[0] == t for p in pts) for t in tasks)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 1.2 + 0.28 * n), squeeze=False)
    style = dict(base=("k", "D"), counts=("C7", "o"), problems=("C0", "s"))
    for ax, task in zip(axes[0], tasks):
        mine = [p for p in pts if p[0] == task]
        for i, (_, lab, m, lo, hi, kind) in enumerate(mine):
            color, marker = style[kind]
            ax.errorbar(m, i, xerr=[[m - lo], [hi - m]], fmt=marker, color=color, ms=4, capsize=2, lw=0.9)
            if kind == "base":
                ax.axvspan(lo, hi, color="k", alpha=0.07, lw=0)
        ax.set_yticks(range(len(mine)), [p[1] for p in mine], fontsize=6.5)
        ax.invert_yaxis()
        ax.set_xlabel("test accuracy, % of problems")
        ax.set_title(f"{TASK_NAMES[task]}, {EVAL_SPLIT[task]} split", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    kinds = {p[-1] for p in pts}
    handles = [plt.Line2D([], [], ls="", marker=style[k][1], color=style[k][0], label=lab) for k, lab in
               (("base", "base model: 95 % bootstrap interval over problems (shaded)"),
                ("counts", "qkvo study: 95 % interval over seeds and problems, from counts"),
                ("problems", "per-task study: 95 % interval over seeds and problems")) if k in kinds]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(Path(img_dir) / "repro_accuracy.png", dpi=90)
    plt.close(fig)
    return [Path(img_dir) / "repro_accuracy.png"]


def plot_all(results_dir, img_dir):
    import matplotlib
    matplotlib.use("Agg")
    Path(img_dir).mkdir(parents=True, exist_ok=True)
    paths = []
    if sweep := load(results_dir, "sweep"):
        paths += plot_sweep(sweep, img_dir)
    if final := load(results_dir, "final"):
        paths += plot_runs(final, img_dir, "", "qkvo study, paper setting")
    if matched := load(results_dir, "matched"):
        paths += plot_runs(matched, img_dir, "matched_", "qkvo study, matched setting")
    if ablate := load(results_dir, "ablate"):
        paths += plot_ablation(ablate, img_dir)
    settings = read_settings(results_dir)
    if settings:
        finals = finals_per_task(results_dir, settings)
        for setting in ("qv", "all7", "rule"):
            if sweep_runs := load_per_task(results_dir, f"{setting}_sweep", settings):
                paths += plot_sweep_per_task(sweep_runs, settings, setting, img_dir)
            runs = [dict(r, arm_of_setting=arm) for (s, arm), rs in finals.items() if s == setting for r in rs]
            if {r["arm_of_setting"] for r in runs} - {"qv/soka"}:   # the rule ablation's own rule is qv's SoKA
                colors = arm_colors(settings, setting)
                paths += plot_runs(runs, img_dir, f"{setting}_", setting, key=lambda r: r["arm_of_setting"],
                                   label=lambda k: k, color=colors.get)
    paths += plot_params(results_dir, img_dir)
    paths += plot_accuracy(results_dir, img_dir)
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(RESULTS), help="folder of the study's <stage>.jsonl records")
    ap.add_argument("--img", default=str(IMG), help="where the PNGs go")
    ap.add_argument("--out", default=None, help="markdown tables (default: <results>/tables.md)")
    ap.add_argument("--doc", default=str(DOC), help="a markdown file whose quoted tables are updated ('' for none)")
    args = ap.parse_args(argv)
    results = Path(args.results)
    if not results.is_dir():
        raise SystemExit(f"experiments/plot_study.py: --results {results} is not a folder")
    md = tables(results)
    print(md)
    out = Path(args.out) if args.out else results / "tables.md"
    out.write_text(md)
    print(f"wrote {out}")
    if args.doc and Path(args.doc).is_file():
        doc = Path(args.doc).read_text()
        new = quote_tables(doc, md)
        if new != doc:
            Path(args.doc).write_text(new)
            print(f"updated the quoted tables of {args.doc}")
    paths = plot_all(results, args.img)
    if (results / "spectra.json").is_file():
        paths += spectra.plot_spectra(results / "spectra.json", args.img)
    for p in paths:
        print(f"wrote {p} ({Path(p).stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
