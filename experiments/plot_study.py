"""Tables and plots of the reproduction study (experiments/study.py), every number read from its records.

    python experiments/plot_study.py                 # experiments/results/tables.md, docs/img/repro_*.png
    python experiments/plot_study.py --results DIR --img DIR --out FILE

Reads <stage>.jsonl and <stage>-<tag>.jsonl from --results (sweep, final, and, once they exist,
ablate, matched, shapes_sweep and shapes); records whose status is not "done" are ignored, and a
run recorded twice counts once (its last "done" record). Prints and writes tables.md: the sweep,
the final runs, the paper's claims checked against them, the matched setting, the factor shapes'
sweep, the ablation and the factor shapes; draws the training loss, the held-out loss, the gradient
norms and the sweep, and redraws the spectra (experiments/spectra.py).

Seed statistics: mean ± spread, where spread = half the range (max − min) over the seeds. A claim
"holds" when SoKA's mean is better by more than the larger of the two spreads, is a "tie" within it,
and "fails" when worse beyond it.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments import spectra, study          # noqa: E402  (study.read: the records, one reader)

RESULTS = study.RESULTS
IMG = ROOT / "docs" / "img"
SMOOTH = 21                 # steps in the centered moving average (curves and roughness)
EARLY = 0.25                # share of the steps whose mean training loss measures convergence speed
GNORM_LINE = 1.5            # the paper: gradient norms "rarely above 1.5"
RARELY = 0.05               # "rarely": on under 5 % of the steps
METHODS = ("soka", "lora", "pissa")
NAMES = dict(soka="SoKA", lora="LoRA", pissa="PiSSA")
COLORS = dict(soka="C0", lora="C1", pissa="C2")


# ----------------------------------------------------------------------------- records and statistics

def load(results_dir, stage, *, superseded=False):
    """The finished runs of a stage, one per id (the last "done" record), in file order. For the final,
    matched, ablate and shapes stages only the runs at the rate the study now picks count
    (study.planned_lr): a run made before a sweep moved past its rate is superseded (superseded=True
    returns those instead)."""
    runs = list({r["id"]: r for r in study.read(results_dir, stage) if r.get("status") == "done"}.values())
    if stage not in ("final", "matched", "ablate", "shapes"):
        return [] if superseded else runs
    sweep, shapes_sweep = study.read(results_dir, "sweep"), study.read(results_dir, "shapes_sweep")
    def at_best(r):
        b = study.planned_lr(r, sweep, shapes_sweep)
        return b is None or r["lr"] == b                       # nothing to judge by yet
    return [r for r in runs if at_best(r) != superseded]


def variant(r):
    """What an ablation run changed ("" for the default SoKA run)."""
    return ", ".join(f"{k} {r[k]}" for k in ("tau", "init", "factors") if r.get(k) is not None)


def spread(xs):
    """Half the range over seeds: the ± of every table."""
    return (max(xs) - min(xs)) / 2 if xs else float("nan")


def stat(xs):
    return (float(np.mean(xs)), spread(xs)) if xs else (float("nan"), float("nan"))


def moving_average(x, w=SMOOTH):
    """Centered w-step mean; near the ends the window shrinks symmetrically (so a straight line is
    its own average, and the ends add no roughness of their own)."""
    x = np.asarray(x, dtype=float)
    i = np.arange(len(x))
    h = np.minimum(w // 2, np.minimum(i, len(x) - 1 - i))          # half-width at each step
    c = np.concatenate([[0.0], np.cumsum(x)])
    return (c[i + h + 1] - c[i - h]) / (2 * h + 1)


def roughness(loss):
    """RMS of (loss − its centered moving average): step-to-step noise, not the downward trend."""
    x = np.asarray(loss, dtype=float)
    return float(np.sqrt(np.mean((x - moving_average(x)) ** 2)))


def early_loss(loss):
    n = max(1, round(EARLY * len(loss)))
    return float(np.mean(loss[:n]))


def first_heldout(r):
    """(step, loss) of the run's first held-out evaluation."""
    return tuple(r["heldout"][0]) if r.get("heldout") else (None, float("nan"))


def verdict(soka, other, *, lower_is_better):
    """holds / tie / fails from per-seed values: a tie when the means differ by no more than the
    larger of the two spreads, else holds when SoKA's mean is the better one."""
    (ms, ss), (mo, so) = stat(soka), stat(other)
    d = mo - ms if lower_is_better else ms - mo      # > 0: SoKA better
    if not (np.isfinite(d)):
        return "n/a"
    if abs(d) <= max(ss, so):
        return "tie"
    return "holds" if d > 0 else "fails"


def fmt(m, s, digits=4):
    return "–" if not np.isfinite(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


# ----------------------------------------------------------------------------- tables

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
    """planned: settings.json's {setting: {method: rank}}, to name what has no finished sweep run."""
    lines = ["## Learning-rate sweep (GSM8K, seed 0): final held-out loss per rate", ""]
    rows = []
    for setting in sorted({r["setting"] for r in sweep}, key=lambda s: (s != "paper", s)):
        for method in METHODS:
            rs = [r for r in sweep if r["setting"] == setting and r["method"] == method]
            if rs:
                best, cells, best_lr = rate_cells(rs)
                rows.append([setting, NAMES[method], "rule" if best["rank"] is None else best["rank"],
                             f"{best['trainable']:,}", cells, best_lr])
    lines += table(["setting", "method", "rank", "trainable", "lr: held-out loss (best in bold)", "best lr"], rows)
    lines += ["", EDGE_NOTE]
    absent = [f"{setting} {NAMES[m]}" for setting, methods in (planned or {}).items() for m in methods
              if not any(r["setting"] == setting and r["method"] == m for r in sweep)]
    return lines + ([f"Not swept yet: {', '.join(absent)}."] if absent else []) + [""]


def shape_name(name):
    """A factor shape as the tables print it: "(m, n, p, q) / (m, n, p, q)" for wq wo / wk wv."""
    f = {**study.FACTORS, **study.SHAPES}[name]
    return "default rule" if f is None else f"{tuple(f['wq'])} / {tuple(f['wk'])}"


def shapes_sweep_table(shapes_sweep):
    lines = ["## Learning-rate sweep of the factor shapes (SoKA, GSM8K, seed 0): final held-out loss per rate", ""]
    rows = []
    for name in study.shape_variants():
        rs = [r for r in shapes_sweep if r["factors"] == name]
        if rs:
            best, cells, best_lr = rate_cells(rs)
            rows.append([name, shape_name(name), "rule" if best["rank"] is None else best["rank"],
                         f"{best['trainable']:,}", f"{best['gnorm_max']:.2f}", cells, best_lr])
    lines += table(["factors", "(m, n, p, q): wq wo / wk wv", "rank", "trainable", "max grad norm at the best rate",
                    "lr: held-out loss (best in bold)", "best lr"], rows)
    return lines + ["", EDGE_NOTE, ""]


def group(runs, key):
    out = {}
    for r in runs:
        out.setdefault(key(r), []).append(r)
    return out


def missing_runs(runs):
    """Task × method × variant × seed combinations that some other group has and this one lacks."""
    seeds = sorted({r["seed"] for r in runs})
    miss = []
    for (task, method, var), rs in group(runs, lambda r: (r["task"], r["method"], variant(r))).items():
        have = {r["seed"] for r in rs}
        miss += [f"{task} {NAMES[method]}{' ' + var if var else ''} seed {s}" for s in seeds if s not in have]
    return miss


def runs_table(runs, title, key=lambda r: (r["task"], NAMES[r["method"]]), key_names=("task", "method")):
    """One row per group of seeds (default task × method)."""
    rows = []
    for k, rs in group(runs, key).items():
        rs = sorted(rs, key=lambda r: r["seed"])
        acc = [100 * r["accuracy"] for r in rs if r.get("accuracy") is not None]
        n = sorted({r["n_eval"] for r in rs if r.get("n_eval") is not None})
        rows.append([*k, ",".join(str(r["seed"]) for r in rs), f"{rs[0]['trainable']:,}", f"{rs[0]['lr']:g}",
                     fmt(*stat([r["heldout_final"] for r in rs])),
                     (fmt(*stat(acc), 2) + f" (n={'/'.join(map(str, n))})") if acc else "–",
                     fmt(*stat([r["loss_first"] for r in rs])), fmt(*stat([r["loss_last"] for r in rs])),
                     f"{max(r['gnorm_max'] for r in rs):.2f}", f"{100 * np.mean([r['gnorm_above_1_5'] for r in rs]):.1f} %",
                     f"{np.mean([r['train_s'] for r in rs]):.1f}" + (" ‡" if any(r.get("side_by_side") for r in rs) else "")])
    header = [*key_names, "seeds", "trainable",
              "lr", "held-out loss", "accuracy %", "loss first 10 %", "loss last 10 %", "max grad norm",
              "steps > 1.5", "train s / run"]
    lines = [f"## {title}", ""] + table(header, rows)
    miss = missing_runs(runs)
    lines += ["", f"Missing runs: {', '.join(miss)}." if miss else "No run is missing."]
    if any(r.get("side_by_side") for r in runs):
        lines += ["‡ some of these runs shared the GPU with other runs (study.py --claims): their times are "
                  "not comparable with the others'."]
    return lines + ["Mean ± spread over seeds (spread = half the max − min range); max grad norm is the "
                    "largest over seeds (before clipping at 1.0), steps > 1.5 the mean share over seeds.", ""]


def claims(runs):
    """Rows (claim, task, measure, SoKA, other, Δ, verdict) of the paper's claims on these runs."""
    by = group(runs, lambda r: (r["task"], r["method"]))
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    others = [m for m in METHODS[1:] if any(k[1] == m for k in by)]
    rows = []
    count = {m: by[k][0]["trainable"] for k in by for m in METHODS if k[1] == m}
    if "soka" in count:
        for m in others:
            ratio = count["soka"] / count[m]
            rows.append(["(1) ~25 % fewer trainable parameters", "all", "trainable", f"{count['soka']:,}",
                         f"{NAMES[m]} {count[m]:,}", f"ratio {ratio:.3f} ({100 * (1 - ratio):.1f} % fewer)",
                         "holds" if ratio < 1 else "fails"])
    measures = [("(2) matches or beats", "accuracy %", lambda r: 100 * r["accuracy"] if r.get("accuracy") is not None else None, False, 2),
                ("(2) matches or beats", "held-out loss (final)", lambda r: r["heldout_final"], True, 4),
                ("(3) faster convergence", "held-out loss, first eval", lambda r: first_heldout(r)[1], True, 4),
                ("(3) faster convergence", f"train loss, first {100 * EARLY:.0f} % of steps", lambda r: early_loss(r["loss"]), True, 4),
                ("(4) smoother loss", f"roughness (RMS − {SMOOTH}-step mean)", lambda r: roughness(r["loss"]), True, 4)]
    for task in tasks:
        if (task, "soka") not in by:
            continue
        for claim, measure, f, lower, digits in measures:
            s = [v for v in map(f, by[task, "soka"]) if v is not None]
            if not s:
                continue
            if "first eval" in measure:
                measure += f" (step {first_heldout(by[task, 'soka'][0])[0]})"
            for m in others:
                o = [v for v in map(f, by.get((task, m), [])) if v is not None]
                if not o:
                    continue
                d = np.mean(o) - np.mean(s)
                rows.append([claim, task, measure, fmt(*stat(s), digits), f"{NAMES[m]} {fmt(*stat(o), digits)}", f"{d:+.{digits}f}",
                             verdict(s, o, lower_is_better=lower)])
        share = {m: [r["gnorm_above_1_5"] for r in by[task, m]] for m in METHODS if (task, m) in by}
        top = {m: max(r["gnorm_max"] for r in by[task, m]) for m in share}
        last = {m: max((i + 1 for r in by[task, m] for i, g in enumerate(r["grad_norm"]) if g > GNORM_LINE), default=None)
                for m in share}
        cell = lambda m: (f"{100 * np.mean(share[m]):.1f} % (max {top[m]:.2f}, "                            # noqa: E731
                          + (f"last > {GNORM_LINE} at step {last[m]})" if last[m] else f"never > {GNORM_LINE})"))
        rows.append([f"(5) grad norm rarely > {GNORM_LINE}", task, "share of steps > 1.5 (max norm, last step above)",
                     cell("soka"), " · ".join(f"{NAMES[m]} {cell(m)}" for m in others if m in share),
                     "", "holds" if np.mean(share["soka"]) < RARELY else "fails"])
    return rows


def claims_table(runs, title):
    lines = [f"## {title}", ""]
    lines += table(["claim", "task", "measure", "SoKA", "other", "Δ (other − SoKA)", "verdict"], claims(runs))
    return lines + ["", "Rule: mean ± spread over seeds (spread = half the max − min range). (2)-(4): \"tie\" when the "
                    "means differ by no more than the larger of the two spreads, else \"holds\" when SoKA's mean is "
                    "better (higher accuracy, lower loss, lower roughness) and \"fails\" when worse. (1) holds when "
                    "SoKA's count is lower; the LoRA / PiSSA rank was chosen as the one whose count is closest to "
                    f"4/3 of SoKA's, so the ratio is set by design. (5) holds when SoKA's mean share of steps with "
                    f"gradient norm > {GNORM_LINE} is under {100 * RARELY:.0f} %; norms are before clipping at 1.0. "
                    f"Roughness = RMS of (loss − its centered {SMOOTH}-step moving average).", ""]


def left_out(results_dir, stage, where, name):
    """A line naming a stage's superseded runs (load(superseded=True)), or nothing."""
    old = load(results_dir, stage, superseded=True)
    if not old:
        return []
    which = ", ".join(sorted({f"{name(r)} lr {r['lr']:g}" for r in old}))
    return [f"Left out of {where}: {len(old)} runs at a rate its sweep no longer picks ({which}; run before "
            f"the sweep moved past it).", ""]


def tables(results_dir):
    """The markdown of tables.md."""
    stages = {s: load(results_dir, s) for s in ("sweep", "final", "ablate", "matched", "shapes_sweep", "shapes")}
    lines = ["# Reproduction study: tables", "",
             f"Generated by `python experiments/plot_study.py` from {', '.join(f'{s}.jsonl ({len(r)} runs)' for s, r in stages.items() if r) or 'no records'}.", ""]
    st = Path(results_dir) / "settings.json"
    planned = {k: v for k, v in json.loads(st.read_text()).items() if k != "counts"} if st.is_file() else None
    if stages["sweep"]:
        lines += sweep_table(stages["sweep"], planned)
    for stage, setting in (("final", "paper"), ("matched", "matched")):
        if stages[stage]:
            lines += runs_table(stages[stage], f"Final runs, {setting} setting (each method at its best swept rate)")
            lines += claims_table(stages[stage], f"The paper's claims, {setting} setting")
        lines += left_out(results_dir, stage, f"the {setting} setting", lambda r: NAMES[r["method"]])
    if stages["shapes_sweep"]:
        lines += shapes_sweep_table(stages["shapes_sweep"])
    if stages["ablate"]:
        base = [r for r in stages["final"] if r["task"] == "gsm8k" and r["method"] == "soka"]
        rows = stages["ablate"] + [dict(r, tau=0.9) for r in base]     # the final runs use τ = 0.9
        lines += runs_table(rows, "Ablation: SoKA on GSM8K (τ = 0.9 is the final runs'; each factor shape at its "
                            "best rate)", key=lambda r: (variant(r),), key_names=("variant",))
        lines += left_out(results_dir, "ablate", "the ablation", variant)
    if stages["shapes"]:
        lines += runs_table(stages["shapes"], "Factor shapes at one parameter count: SoKA on GSM8K, rank "
                            f"{study.SHAPES_RANK} in every layer, each shape at its best rate",
                            key=lambda r: (r["factors"], shape_name(r["factors"])),
                            key_names=("factors", "(m, n, p, q): wq wo / wk wv"))
        lines += left_out(results_dir, "shapes", "the factor shapes", lambda r: r["factors"])
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots

def curves(ax, rs, color, label, field, *, smooth=True):
    """Mean over seeds, light band min..max over seeds."""
    n = min(len(r[field]) for r in rs)
    ys = np.array([moving_average(r[field][:n]) if smooth else r[field][:n] for r in rs])
    x = np.arange(1, n + 1)
    ax.plot(x, ys.mean(0), color=color, lw=1.4, label=f"{label} ({len(rs)} seeds)")
    ax.fill_between(x, ys.min(0), ys.max(0), color=color, alpha=0.2, lw=0)


def plot_runs(runs, img_dir, prefix, title):
    """repro_<prefix>loss.png, _heldout.png, _gradnorm.png: one panel per task, one line per method."""
    import matplotlib.pyplot as plt
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    by = group(runs, lambda r: (r["task"], r["method"]))
    paths = []
    for name, ylabel in (("loss", f"training loss ({SMOOTH}-step mean)"), ("heldout", "held-out loss"),
                         ("gradnorm", "gradient norm (before clipping)")):
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for m in METHODS:
                rs = by.get((task, m))
                if not rs:
                    continue
                if name == "loss":
                    curves(ax, rs, COLORS[m], NAMES[m], "loss")
                elif name == "gradnorm":
                    for i, r in enumerate(rs):
                        ax.plot(np.arange(1, len(r["grad_norm"]) + 1), r["grad_norm"], color=COLORS[m], lw=0.7,
                                alpha=0.6, label=f"{NAMES[m]} ({len(rs)} seeds)" if i == 0 else None)
                else:
                    steps = [s for s, _ in rs[0]["heldout"]]
                    ys = np.array([[v for _, v in r["heldout"]][:len(steps)] for r in rs if len(r["heldout"]) >= len(steps)])
                    ax.plot(steps, ys.mean(0), "o-", color=COLORS[m], ms=3, lw=1.4, label=f"{NAMES[m]} ({len(ys)} seeds)")
                    ax.fill_between(steps, ys.min(0), ys.max(0), color=COLORS[m], alpha=0.2, lw=0)
            if name == "gradnorm":
                ax.axhline(GNORM_LINE, color="k", ls="--", lw=0.8, label=f"{GNORM_LINE}")
                ax.set_yscale("log")
            ax.set_title(f"{task}: {title}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(Path(img_dir) / f"repro_{prefix}{name}.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths


def plot_sweep(sweep, img_dir):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for (setting, m), rs in group(sweep, lambda r: (r["setting"], r["method"])).items():
        rs = sorted(rs, key=lambda r: r["lr"])
        ax.plot([r["lr"] for r in rs], [r["heldout_final"] for r in rs], "o-" if setting == "paper" else "s--",
                color=COLORS[m], label=f"{NAMES[m]}, {setting} ({rs[0]['trainable']:,})")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final held-out loss (GSM8K)")
    ax.set_title("learning-rate sweep, seed 0", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(img_dir) / "repro_sweep.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def plot_all(results_dir, img_dir):
    import matplotlib
    matplotlib.use("Agg")
    Path(img_dir).mkdir(parents=True, exist_ok=True)
    paths = []
    if sweep := load(results_dir, "sweep"):
        paths += plot_sweep(sweep, img_dir)
    if final := load(results_dir, "final"):
        paths += plot_runs(final, img_dir, "", "paper setting")
    if matched := load(results_dir, "matched"):
        paths += plot_runs(matched, img_dir, "matched_", "matched setting")
    if ablate := load(results_dir, "ablate"):     # one panel (GSM8K), one line per variant
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for i, (var, rs) in enumerate(group(ablate, variant).items()):
            curves(ax, rs, f"C{i}", var, "loss")
        ax.set(xlabel="step", ylabel=f"training loss ({SMOOTH}-step mean)", title="ablation: SoKA on GSM8K")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(Path(img_dir) / "repro_ablate_loss.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(RESULTS), help="folder of the study's <stage>.jsonl records")
    ap.add_argument("--img", default=str(IMG), help="where the PNGs go")
    ap.add_argument("--out", default=None, help="markdown tables (default: <results>/tables.md)")
    args = ap.parse_args(argv)
    results = Path(args.results)
    if not results.is_dir():
        raise SystemExit(f"experiments/plot_study.py: --results {results} is not a folder")
    md = tables(results)
    print(md)
    out = Path(args.out) if args.out else results / "tables.md"
    out.write_text(md)
    print(f"wrote {out}")
    paths = plot_all(results, args.img)
    if (results / "spectra.json").is_file():
        paths += spectra.plot_spectra(results / "spectra.json", args.img)
    for p in paths:
        print(f"wrote {p} ({Path(p).stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
