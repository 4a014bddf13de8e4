"""Recompute every number of the study's tables from the committed records, with code of its own.

    python experiments/check_tables.py          # experiments/results/tables.md and docs/reproduction.md
    python experiments/check_tables.py --results DIR --tables FILE --doc FILE

Reads the records (<stage>.jsonl, <stage>-<tag>.jsonl, per_task_settings.json, the per-problem files under
problems/) and the markdown, and checks, table by table and cell by cell, that each printed number
is what the records give, to the digits printed; that every table the records call for is there and
no other; and that each table docs/reproduction.md quotes (between `<!-- tables.md: <heading> -->`
and `<!-- end -->`) is the one in tables.md. Exits 1 with the differences, 0 when there are none.

It shares no code with experiments/plot_study.py or experiments/stats.py: the same definitions
(stats.py's docstring states them), written again. Student t quantiles come from integrating the
density (Simpson's rule), not from the incomplete beta function; the bootstrap indexes the resampled
problems directly instead of counting them. The bootstrap's draws are fixed by stats.py's recipe
(seed from sha256 of the number's label, then problems, seeds of A, seeds of B), so they are the same
draws. The qkvo records hold no per-problem results: their accuracies are checked from counts,
as tables.md computes them.
"""
import argparse
import functools
import gzip
import hashlib
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
DOC = ROOT / "docs" / "reproduction.md"
TASKS = ("gsm8k", "math", "mbpp")
SPLIT = dict(gsm8k="test", math="math500", mbpp="test")
TASK_NAMES = dict(gsm8k="GSM8K", math="MATH-500", mbpp="MBPP")
NAMES = dict(soka="SoKA", lora="LoRA", pissa="PiSSA")
METHODS = ("soka", "lora", "pissa")
B, WINDOW, EARLY, LINE, RARELY, WARMUP = 2000, 21, 0.25, 1.5, 0.05, 0.03
NOT_RUN = "Not run."
TITLES = dict(qv="Setting qv (the paper's: wq wv)", all7="Setting all7 (all seven linear types)",
              rule="Rule ablation (wq wv)")
LOSS = "nats per token"
FACTOR_NAMES = {"small_U": "(8, 8, 72, 72) / (8, 8, 24, 72)", "large_U": "(72, 72, 8, 8) / (24, 72, 8, 8)",
                "rule_r23": "default rule", "rule_r37": "default rule", "rule": "default rule",
                "tall_U": "(48, 12, 12, 48) / (24, 12, 8, 48)", "wide_U": "(12, 48, 48, 12) / (8, 48, 24, 12)"}


# ----------------------------------------------------------------------------- records

class Records:
    def __init__(self, folder):
        self.folder = Path(folder)
        self.cache = {}

    def all(self, stage):
        """Every record of a stage, in file order (the untagged file first, then tagged ones by name)."""
        if stage not in self.cache:
            files = sorted(self.folder.glob(f"{stage}.jsonl")) + sorted(self.folder.glob(f"{stage}-*.jsonl"))
            self.cache[stage] = [json.loads(l) for f in files for l in f.read_text().splitlines() if l.strip()]
        return self.cache[stage]

    def done(self, stage):
        """The last "done" record of each run id, in the order the ids first finished."""
        out = {}
        for r in self.all(stage):
            if r.get("status") == "done":
                out[r["id"]] = r
        return list(out.values())

    def verdicts(self, r):
        with gzip.open(self.folder / r["problems"], "rt", encoding="utf-8") as f:
            rows = [json.loads(l) for l in f if l.strip()]
        return {x["id"]: x["v"] for x in rows}


def argmin_lr(rs):
    return min(rs, key=lambda r: r["heldout_final"])["lr"] if rs else None


# ----------------------------------------------------------------------------- statistics, again

@functools.lru_cache(maxsize=None)
def t_quantile(p, dof):
    """Student t quantile by integrating the density from 0 (Simpson, 4,000 panels) and bisecting."""
    c = math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)) / math.sqrt(dof * math.pi)

    def cdf(t):
        xs = np.linspace(0, t, 4001)
        f = c * (1 + xs * xs / dof) ** (-(dof + 1) / 2)
        return 0.5 + (t / 4000 / 3) * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_t(xs):
    x = np.array(xs, dtype=float)
    if len(x) < 2:
        return float(x.mean()), math.nan, math.nan
    h = t_quantile(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(x.mean() - h), float(x.mean() + h)


def welch_diff(a, b):
    a, b = np.array(a, dtype=float), np.array(b, dtype=float)
    d = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return d, math.nan, math.nan
    ua, ub = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if ua + ub == 0:
        return d, d, d
    nu = (ua + ub) ** 2 / (ua ** 2 / (len(a) - 1) + ub ** 2 / (len(b) - 1))
    h = t_quantile(0.975, nu) * math.sqrt(ua + ub)
    return d, d - h, d + h


class Draws:
    """stats.py's draws: integers mod n from the raw 64-bit outputs of PCG64 seeded by sha256(label)."""

    def __init__(self, label):
        self.bits = np.random.PCG64(int.from_bytes(hashlib.sha256(label.encode()).digest()[:8], "little"))

    def __call__(self, n, *shape):
        return (self.bits.random_raw(math.prod(shape)) % np.uint64(n)).astype(np.int64).reshape(shape)


def rng_for(label):
    return Draws(label)


def bounds(values):
    v = np.sort(values)
    return float(v[int(math.floor(0.025 * B))]), float(v[int(math.ceil(0.975 * B)) - 1])


def resampled_means(V, S, P):
    """mean(V[S[b]][:, P[b]]) for every replicate b: V indexed by both resamples at once, (B, s, n)."""
    return V[S[:, :, None], P[:, None, :]].mean(axis=(1, 2))


def boot_acc(V, label):
    g = rng_for(label)
    P = g(V.shape[1], B, V.shape[1])
    S = g(V.shape[0], B, V.shape[0])
    return (float(V.mean()), *bounds(resampled_means(V, S, P)))


def boot_diff(A, Bv, label):
    g = rng_for(label)
    P = g(A.shape[1], B, A.shape[1])
    SA = g(A.shape[0], B, A.shape[0])
    SB = g(Bv.shape[0], B, Bv.shape[0])
    reps = resampled_means(A, SA, P) - resampled_means(Bv, SB, P)
    d = float(A.mean() - Bv.mean())
    k = int(np.sum(reps <= 0)) if d > 0 else int(np.sum(reps >= 0))
    return d, *bounds(reps), min(1.0, 2 * (k + 1) / (B + 1))


def counts_draw(g, correct, n):
    """Seeds resampled, then each resampled run's count from Binomial(n, c/n) by inverting its CDF
    (the pmf by the ratio recurrence in logs, not from log-gammas)."""
    c = list(correct)
    S = g(len(c), B, len(c))
    u = (g.bits.random_raw(B * len(c)) >> np.uint64(11)).astype(float).reshape(B, len(c)) / 2.0 ** 53
    out = np.zeros((B, len(c)))
    for j, cj in enumerate(c):
        p = cj / n
        if p in (0, 1):
            cdf = np.full(n + 1, 1.0) if p == 0 else np.r_[np.zeros(n), 1.0]
        else:
            logs = [n * math.log1p(-p)]
            for k in range(n):
                logs.append(logs[-1] + math.log((n - k) / (k + 1)) + math.log(p / (1 - p)))
            cdf = np.cumsum(np.exp(logs))
        mine = S == j
        out[mine] = np.minimum((cdf[None, :] <= u[mine][:, None]).sum(axis=1), n)
    return out.sum(axis=1) / (len(c) * n)


def counts_acc(correct, n, label):
    return (float(np.mean(correct) / n), *bounds(counts_draw(rng_for(label), correct, n)))


def counts_diff(ca, cb, n, label):
    g = rng_for(label)
    reps = counts_draw(g, ca, n) - counts_draw(g, cb, n)
    return (float(np.mean(ca) / n - np.mean(cb) / n), *bounds(reps))


def mcnemar(b, c):
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n)


def verdict(lo, hi, lower_better):
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    if hi < 0:
        return "better" if lower_better else "worse"
    if lo > 0:
        return "worse" if lower_better else "better"
    return "tie"


def smooth(x):
    return np.convolve(np.array(x, dtype=float), np.full(WINDOW, 1 / WINDOW), mode="valid")


def rough(loss):
    if len(loss) < WINDOW:
        return math.nan
    h = WINDOW // 2
    return float(np.sqrt(np.mean((np.array(loss[h:len(loss) - h]) - smooth(loss)) ** 2)))


def early(loss):
    k = max(1, round(EARLY * len(loss)))
    return float(np.mean(loss[:k]))


def post_warmup(r):
    return r["grad_norm"][math.ceil(WARMUP * len(r["grad_norm"])):]


# ----------------------------------------------------------------------------- cells

def iv(m, lo, hi, d=4, k=1.0, plus=False):
    f = ("{:+." if plus else "{:.") + f"{d}f}}"
    if not math.isfinite(m):
        return "–"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f.format(k * m)
    return f"{f.format(k * m)} [{f.format(k * lo)}, {f.format(k * hi)}]"


def pval(p):
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def gnorms(rs):
    g = np.concatenate([np.array(post_warmup(r), dtype=float) for r in rs])
    q = np.percentile(g, [50, 90, 99])
    return [f"{len(g):,}", f"{q[0]:.3f}", f"{q[1]:.3f}", f"{q[2]:.3f}", f"{g.max():.3f}", f"{100 * np.mean(g > LINE):.1f} %"]


def by_order(keys):
    order = {x: i for i, x in enumerate((*TASKS, *METHODS, *NAMES.values()))}
    return sorted(keys, key=lambda k: [order.get(x, len(order)) for x in k])


def groups(runs, key):
    out = {}
    for r in runs:
        out.setdefault(key(r), []).append(r)
    return out


# ----------------------------------------------------------------------------- the qkvo study

def variant_of(r):
    return ", ".join(f"{k} {r[k]}" for k in ("tau", "init", "factors") if r.get(k) is not None)


def qkvo_study(rec):
    """{heading: expected rows} of the qkvo study's tables."""
    out = {}
    sweep = rec.done("sweep")
    if sweep:
        rows = []
        for setting in sorted({r["setting"] for r in sweep}, key=lambda s: (s != "paper", s)):
            for m in METHODS:
                rs = sorted((r for r in sweep if r["setting"] == setting and r["method"] == m), key=lambda r: r["lr"])
                if rs:
                    rows.append([setting, NAMES[m], *sweep_cells(rs, rank=True)])
        out["qkvo study: learning-rate sweep (GSM8K, seed 0): final held-out loss per rate"] = rows
    best = {(s, m): argmin_lr([r for r in sweep if r["setting"] == s and r["method"] == m])
            for s in ("paper", "matched") for m in METHODS}
    shapes_sweep = rec.done("shapes_sweep")

    def shape_rate(name):
        mine = [r for r in shapes_sweep if r.get("factors") == name]
        return argmin_lr(mine) if mine else best["paper", "soka"]
    for stage, setting in (("final", "paper"), ("matched", "matched")):
        runs = [r for r in rec.done(stage) if best[setting, r["method"]] in (None, r["lr"])]
        if not runs:
            continue
        g = groups(runs, lambda r: (r["task"], NAMES[r["method"]]))
        out[f"qkvo study: final runs, {setting} setting (wq wk wv wo)"] = [runs_row(stage, k, g[k]) for k in by_order(g)]
        out[f"qkvo study: the paper's claims, {setting} setting"] = claims_rows(runs, stage)
        out[f"qkvo study: gradient norms after warmup, {setting} setting"] = [[*k, *gnorms(g[k])] for k in by_order(g)]
    if shapes_sweep:
        rows = []
        for name in ("rule", "tall_U", "wide_U", "small_U", "large_U", "rule_r23", "rule_r37"):
            rs = sorted((r for r in shapes_sweep if r.get("factors") == name), key=lambda r: r["lr"])
            if rs:
                b = min(rs, key=lambda r: r["heldout_final"])
                rows.append([name, FACTOR_NAMES[name], "rule" if b["rank"] is None else b["rank"], f"{b['trainable']:,}",
                             f"{b['gnorm_max']:.2f}", *sweep_cells(rs)])
        out["qkvo study: learning-rate sweep of the factor shapes (SoKA, GSM8K, seed 0)"] = rows
    ablate = [r for r in rec.done("ablate")
              if r["lr"] == (shape_rate(r["factors"]) if r.get("factors") else best["paper", "soka"])]
    if ablate:
        final = [r for r in rec.done("final") if r["lr"] == best["paper", "soka"]]
        ablate = [dict(r, tau=0.9) for r in final if r["task"] == "gsm8k" and r["method"] == "soka"] + ablate
        g = groups(ablate, lambda r: (variant_of(r),))
        out["qkvo study: ablation, SoKA on GSM8K (τ = 0.9 is the final runs'; each factor shape at its best rate)"] = \
            [runs_row("ablate", k, g[k]) for k in by_order(g)]
    shapes = [r for r in rec.done("shapes") if r["lr"] == shape_rate(r["factors"])]
    if shapes:
        g = groups(shapes, lambda r: (r["factors"], FACTOR_NAMES[r["factors"]]))
        out["qkvo study: factor shapes at one parameter count, SoKA on GSM8K, rank 3 in every layer"] = \
            [runs_row("shapes", k, g[k]) for k in by_order(g)]
    return out


def sweep_cells(rs, rank=False):
    rs = sorted(rs, key=lambda r: r["lr"])
    b = min(rs, key=lambda r: r["heldout_final"])
    cells = " · ".join((f"**{r['lr']:g}: {r['heldout_final']:.4f}**" if r is b else f"{r['lr']:g}: {r['heldout_final']:.4f}")
                       for r in rs)
    edge = " (grid edge)" if len(rs) > 1 and b["lr"] in (rs[0]["lr"], rs[-1]["lr"]) else ""
    lead = ["rule" if b["rank"] is None else b["rank"], f"{b['trainable']:,}"] if rank else []
    return [*lead, cells, f"{b['lr']:g}{edge}"]


def runs_row(stage, key, rs):
    rs = sorted(rs, key=lambda r: r["seed"])
    ev = [r for r in rs if r.get("accuracy") is not None]
    ns = {r["n_eval"] for r in ev}
    acc = "–"
    if ev and len(ns) == 1:
        n = ns.pop()
        acc = iv(*counts_acc([r["correct"] for r in ev], n, f"acc|{stage}|{'|'.join(map(str, key))}"), 2, 100) + f" (n={n})"
    t = np.mean([r["train_s"] for r in rs])
    return [*key, ",".join(str(r["seed"]) for r in rs), f"{rs[0]['trainable']:,}", f"{rs[0]['lr']:g}",
            iv(*mean_t([r["heldout_final"] for r in rs])), acc, f"{max(r['gnorm_max'] for r in rs):.2f}",
            f"{100 * np.mean([r['gnorm_above_1_5'] for r in rs]):.1f} %",
            f"{t:.1f}" + (" ‡" if any(r.get("side_by_side") for r in rs) else "")]


def claims_rows(runs, stage):
    g = groups(runs, lambda r: (r["task"], r["method"]))
    tasks = [t for t in TASKS if any(k[0] == t for k in g)]
    others = [m for m in METHODS[1:] if any(k[1] == m for k in g)]
    count = {k[1]: v[0]["trainable"] for k, v in g.items()}
    rows = []
    if "soka" in count:
        for m in others:
            q = count["soka"] / count[m]
            rows.append(["(1) fewer trainable parameters", "all", "trainable", f"{count['soka']:,}", f"{NAMES[m]} {count[m]:,}",
                         f"ratio {q:.3f} ({100 * (1 - q):.1f} % fewer)", "fewer" if q < 1 else "more"])
    measures = [("(2) matches or beats", "held-out loss (final)", lambda r: r["heldout_final"]),
                ("(3) faster convergence", "held-out loss, first eval", lambda r: r["heldout"][0][1]),
                ("(3) faster convergence", f"train loss, first {100 * EARLY:.0f} % of steps", lambda r: early(r["loss"])),
                ("(4) smoother loss", f"roughness (RMS − {WINDOW}-step mean)", lambda r: rough(r["loss"]))]
    for task in tasks:
        if (task, "soka") not in g:
            continue
        for m in others:
            s, o = g[task, "soka"], g.get((task, m), [])
            if not o or any(r.get("accuracy") is None for r in s + o):
                continue
            d = counts_diff([r["correct"] for r in s], [r["correct"] for r in o], s[0]["n_eval"], f"diff|{stage}|{task}|soka|{m}")
            rows.append(["(2) matches or beats", task, "accuracy % (unpaired)", f"{100 * np.mean([r['accuracy'] for r in s]):.2f}",
                         f"{NAMES[m]} {100 * np.mean([r['accuracy'] for r in o]):.2f}", iv(*d, 2, 100, True),
                         verdict(d[1], d[2], False)])
        for claim, measure, f in measures:
            if "first eval" in measure:
                measure += f" (step {g[task, 'soka'][0]['heldout'][0][0]})"
            for m in others:
                s, o = [f(r) for r in g[task, "soka"]], [f(r) for r in g.get((task, m), [])]
                if o:
                    d = welch_diff(s, o)
                    rows.append([claim, task, measure, f"{np.mean(s):.4f}", f"{NAMES[m]} {np.mean(o):.4f}", iv(*d, 4, 1, True),
                                 verdict(d[1], d[2], True)])
        share = {m: float(np.mean(np.concatenate([np.array(post_warmup(r)) > LINE for r in g[task, m]])))
                 for m in METHODS if (task, m) in g}
        rows.append([f"(5) grad norm rarely > {LINE}", task, "share of steps > 1.5 after warmup", f"{100 * share['soka']:.1f} %",
                     " · ".join(f"{NAMES[m]} {100 * share[m]:.1f} %" for m in others if m in share), "",
                     "rarely" if share["soka"] < RARELY else "not rarely"])
    return rows


# ----------------------------------------------------------------------------- the per-task study

def grown(grid, lrs_tried, best, extend=3):
    """The study's grid growth (study.rates): the grid, every tried rate, and one rate past an edge
    where the best finished run sits there, up to `extend` rates more."""
    lrs = sorted({*grid, *lrs_tried})
    if set(grid) <= set(lrs_tried) and len(lrs) < len(grid) + extend and best is not None:
        if best == lrs[0]:
            lrs.insert(0, float(f"{best / 3:.1g}"))
        elif best == lrs[-1]:
            lrs.append(float(f"{best * 3:.1g}"))
    return lrs


def base_model(rec):
    """The base model's table rows (None: not run)."""
    runs = {r["id"]: r for r in rec.done("base")}
    rows = []
    for task in TASKS:
        ev, held = runs.get(f"base/{task}/eval"), runs.get(f"base/{task}/heldout")
        if ev is None and held is None:
            continue
        acc = "not run"
        if ev:
            m = rec.verdicts(ev)
            V = np.array([[m[i] for i in sorted(m)]], dtype=np.int8)
            acc = iv(*boot_acc(V, f"acc|base|{task}|eval"), 2, 100)
        rows.append([task, SPLIT[task], f"{ev['n_eval']:,}" if ev else "–", acc, f"{held['heldout_final']:.4f}" if held else "not run"])
    return rows or None


def quantization(folder):
    path = Path(folder) / "quant_noise.json"
    if not path.is_file():
        return {}
    q = json.loads(path.read_text())
    rows = []
    for t in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
        ls = [x for x in q["layers"] if x["type"] == t]
        if ls:
            rows.append([t, str(len(ls)), ", ".join(sorted({x["gguf_type"] for x in ls})),
                         f"{100 * max(x['noise_energy_share'] for x in ls):.2f} %",
                         f"{sum(x['noise_sigma1'] for x in ls) / len(ls):.3f}",
                         *(f"{min(x[k] for x in ls):.1f}" for k in ("ratio_r", "ratio_16", "ratio_64", "gap_ratio"))])
    return {"Quantization noise (Q4_1) against the Kronecker spectra": rows}


def arms_table(settings):
    a = settings["arithmetic"]
    rows = []
    for setting in ("qv", "all7", "rule"):
        for arm, x in settings[setting]["arms"].items():
            if x["method"] != "soka":
                n = x["rank"] * (a["lora_per_rank_all7"] if setting == "all7" else a["lora_per_rank_qv"])
            elif x.get("rank"):
                n = x["rank"] * a["soka_per_rank_qv"]
            elif x.get("rule") == "energy":
                n = a["energy_count_qv"]
            else:
                n = a["soka_all7"] if setting == "all7" else a["soka_qv"]
            role = x["role"] + (f"; the rule's rate ({x['same_as']})" if x.get("same_as") else "")
            rule = x["method"] == "soka" and x.get("rank") is None
            rows.append([setting, arm, NAMES[x["method"]], "rule" if rule else x["rank"], (x.get("rule") or "both") if rule else "–",
                         f"{x.get('tau', 0.9):g}" if rule else "–", f"{n:,}", role])
    return {"Per-task study: the arms and their parameter counts": rows}


def per_task_study(rec, settings):
    """{heading: expected rows} of the per-task study's tables."""
    out = {}
    sweeps = {s: rec.done(f"{s}_sweep") for s in ("qv", "all7", "rule")}

    def best(setting, arm, task):
        a = settings[setting]["arms"][arm]
        if a.get("same_as"):
            s2, a2 = a["same_as"].split("/")
            return best(s2, a2, task)
        mine = [r for r in sweeps[setting] if r["arm"] == arm and r["task"] == task]
        return argmin_lr(mine)
    finals = {}
    for setting in ("qv", "all7", "rule"):
        for r in rec.done(f"{setting}_final"):
            if r["lr"] == best(setting, r["arm"], r["task"]):
                finals.setdefault((setting, r["arm"]), []).append(r)
    if ("qv", "soka") in finals:
        finals["rule", "qv/soka"] = finals["qv", "soka"]

    def runs_of(setting, arm, task):
        return sorted((r for r in finals.get((setting, arm), []) if r["task"] == task), key=lambda r: r["seed"])

    def problems(rs):
        maps = [rec.verdicts(r) for r in rs]
        ids = sorted(maps[0])
        return ids, np.array([[m[i] for i in ids] for m in maps], dtype=np.int8)

    def arms(setting):
        return (["qv/soka"] if setting == "rule" else []) + list(settings[setting]["arms"])

    memo = {}

    def compare(sa, aa, sb, ab, task):
        if (sa, aa, sb, ab, task) not in memo:
            memo[sa, aa, sb, ab, task] = compare_once(sa, aa, sb, ab, task)
        return memo[sa, aa, sb, ab, task]

    def compare_once(sa, aa, sb, ab, task):
        a, b = runs_of(sa, aa, task), runs_of(sb, ab, task)
        if not a or not b:
            return None
        (ia, VA), (ib, VB) = problems(a), problems(b)
        assert ia == ib, f"{task}: {aa} and {ab} were evaluated on different problems"
        d, lo, hi, p = boot_diff(VA, VB, f"diff|{task}|{a[0]['stage']}/{a[0]['arm']}|{b[0]['stage']}/{b[0]['arm']}")
        pa, pb = dict(zip((r["seed"] for r in a), VA)), dict(zip((r["seed"] for r in b), VB))
        common = sorted(set(pa) & set(pb))
        nb = int(sum(((pa[s] == 1) & (pb[s] == 0)).sum() for s in common))
        nc = int(sum(((pa[s] == 0) & (pb[s] == 1)).sum() for s in common))
        return dict(acc=(d, lo, hi), p=p, b=nb, c=nc, pm=mcnemar(nb, nc),
                    loss=welch_diff([r["heldout_final"] for r in a], [r["heldout_final"] for r in b]),
                    first=welch_diff([r["heldout"][0][1] for r in a], [r["heldout"][0][1] for r in b]),
                    rough=welch_diff([rough(r["loss"]) for r in a], [rough(r["loss"]) for r in b]), step=a[0]["heldout"][0][0])

    # claims
    ar = settings["arithmetic"]
    rows = []
    big = next(k for k, x in settings["qv"]["arms"].items() if x["method"] == "lora" and x["role"].startswith("1.33"))
    for setting, arm, s_plan, o_plan in (("qv", big, ar["soka_qv"], ar["lora_rank_lokr"] * ar["lora_per_rank_qv"]),
                                         ("all7", f"lora_r{ar['lora_rank_count_all7']}", ar["soka_all7"],
                                          ar["lora_rank_count_all7"] * ar["lora_per_rank_all7"])):
        s = finals[setting, "soka"][0]["trainable"] if (setting, "soka") in finals else s_plan
        o = finals[setting, arm][0]["trainable"] if (setting, arm) in finals else o_plan
        note = "" if (setting, "soka") in finals else " (from the spectra; not run)"
        rows.append(["25 % fewer trainable parameters than LoRA / PiSSA", f"{setting}: SoKA vs r={settings[setting]['arms'][arm]['rank']}",
                     f"{s:,} vs {o:,}: {100 * abs(1 - s / o):.1f} % {'fewer' if s < o else 'more'}{note}",
                     "0.99 M vs 1.33 M: 25.6 % fewer", "fewer" if s < o else "more"])

    def per_task(parts):
        got = dict(parts)
        return " · ".join(f"{TASK_NAMES[t]} {got.get(t, 'not run')}" for t in TASKS) if got else "not run"
    base = [(s, a) for s in ("qv", "all7") for a, x in settings[s]["arms"].items() if x["method"] != "soka"]
    base.sort(key=lambda x: (x[1].split("_")[0] != "lora", x[0] != "qv"))
    for what in ("acc", "loss"):
        for setting, arm in base:
            parts, vs = [], []
            for task in TASKS:
                c = compare(setting, "soka", setting, arm, task)
                if c:
                    d = c[what]
                    parts.append((task, iv(*d, 2, 100, True) if what == "acc" else iv(*d, 4, 1, True)))
                    vs.append((task, verdict(d[1], d[2], what == "loss")))
            x = settings[setting]["arms"][arm]
            rows.append([f"matches or beats {NAMES[x['method']]}: accuracy, Δ points" if what == "acc" else
                         f"(ours) held-out loss against {NAMES[x['method']]}, Δ {LOSS}",
                         f"{setting}: r={x['rank']}, {x['role']}", per_task(parts),
                         "matches or exceeds (abstract)" if what == "acc" else "–", per_task(vs)])
    qv_big = [a for a, x in settings["qv"]["arms"].items() if x["method"] != "soka" and x["role"].startswith("1.33")]
    for what, claim, paper in (("first", "faster convergence: held-out loss at the first evaluation, Δ", "faster convergence"),
                               ("rough", f"smoother loss: roughness (RMS − {WINDOW}-step mean), Δ",
                                "smoother loss, more stable gradients")):
        for arm in qv_big:
            parts, vs = [], []
            for task in TASKS:
                c = compare("qv", "soka", "qv", arm, task)
                if c:
                    parts.append((task, iv(*c[what], 4, 1, True) + (f" (step {c['step']})" if what == "first" else "")))
                    vs.append((task, verdict(c[what][1], c[what][2], True)))
            x = settings["qv"]["arms"][arm]
            rows.append([claim, f"qv: vs {NAMES[x['method']]} r={x['rank']}", per_task(parts), paper, per_task(vs)])
    parts, vs = [], []
    for task in TASKS:
        rs = runs_of("qv", "soka", task)
        if rs:
            g = np.concatenate([np.array(post_warmup(r), dtype=float) for r in rs])
            parts.append((task, f"{100 * np.mean(g > LINE):.1f} % of steps (max {g.max():.2f})"))
            vs.append((task, "rarely" if np.mean(g > LINE) < RARELY else "not rarely"))
    rows.append([f"gradient norms rarely above {LINE}", "qv: SoKA, steps after warmup", per_task(parts), "rarely above 1.5",
                 per_task(vs)])
    out["Claims"] = rows

    for setting in ("qv", "all7", "rule"):
        title = TITLES[setting]
        rows = []
        for task in TASKS:
            for arm in settings[setting]["arms"]:
                rs = [r for r in sweeps[setting] if r["task"] == task and r["arm"] == arm]
                if rs:
                    b = min(rs, key=lambda r: r["heldout_final"])
                    rows.append([task, arm, f"{b['trainable']:,}", *sweep_cells(rs)])
        out[f"{title}: learning-rate sweeps (seed 0)"] = rows or None
        rows = []
        for task in TASKS:
            for arm in arms(setting):
                rs = runs_of(setting, arm, task)
                if rs:
                    _, V = problems(rs)
                    rows.append([task, arm, f"{rs[0]['trainable']:,}", f"{rs[0]['lr']:g}", ",".join(str(r["seed"]) for r in rs),
                                 iv(*mean_t([r["heldout_final"] for r in rs])),
                                 iv(*boot_acc(V, f"acc|{rs[0]['stage']}|{task}|{rs[0]['arm']}"), 2, 100)])
        out[f"{title}: final runs"] = rows or None
        ref = "qv/soka" if setting == "rule" else "soka"
        rows = []
        for task in TASKS:
            for arm in arms(setting):
                if arm == ref:
                    continue
                c = compare(setting, ref, setting, arm, task)
                if c:
                    rows.append([task, arm, iv(*c["loss"], 4, 1, True), verdict(c["loss"][1], c["loss"][2], True),
                                 iv(*c["acc"], 2, 100, True), pval(c["p"]), f"{c['b']} / {c['c']}, {pval(c['pm'])}",
                                 verdict(c["acc"][1], c["acc"][2], False)])
        out[f"{title}: {ref} against each arm (Δ = {ref} − arm)"] = rows or None
        rows = [[task, arm, *gnorms(runs_of(setting, arm, task))] for task in TASKS for arm in arms(setting)
                if runs_of(setting, arm, task)]
        out[f"{title}: gradient norms after warmup"] = rows or None
    rows = []
    for task in TASKS:
        for arm in settings["qv"]["arms"]:
            rs = [r for r in rec.done("wgrad") if r["task"] == task and r["arm"] == arm
                  and r["lr"] == best("qv", arm, task)]
            if rs:
                k = math.ceil(WARMUP * len(rs[0]["grad_norm"]))
                w = np.array(rs[0]["weight_grad_norm"][k:], dtype=float)
                g = np.array(rs[0]["grad_norm"][k:], dtype=float)
                rows.append([task, arm, f"{rs[0]['lr']:g}", f"{len(w):,}",
                             *(f"{np.percentile(w, q):.3f}" for q in (50, 90, 99)), f"{w.max():.3f}",
                             f"{np.percentile(g, 50):.3f}"])
    out["Setting qv: like-for-like gradient norms (seed 0)"] = rows or None
    return out


# ----------------------------------------------------------------------------- comparing

NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")


def same_cell(shown, want):
    """Equal text, and every number equal to the digits shown (half a unit in its last place)."""
    if shown == want:
        return True
    a, b = NUMBER.findall(shown), NUMBER.findall(want)
    if NUMBER.sub("#", shown) != NUMBER.sub("#", want) or len(a) != len(b):
        return False
    for x, y in zip(a, b):
        xs, ys = x.rstrip(","), y.rstrip(",")
        digits = len(xs.split(".")[1].split("e")[0]) if "." in xs else 0
        if "e" in xs:                            # a p-value printed as 1.2e-05: two significant digits
            if abs(float(xs) - float(ys)) > 0.05 * 10 ** math.floor(math.log10(abs(float(xs)))):
                return False
            continue
        if abs(float(xs.replace(",", "")) - float(ys.replace(",", ""))) > 0.5 * 10 ** -digits + 1e-9:
            return False
    return True


def parse(md):
    """{heading: rows of its table, or None for "Not run."}."""
    out, heading, rows, state = {}, None, [], None
    for line in md.splitlines() + ["## "]:
        if line.startswith("## "):
            if heading is not None:
                out[heading] = rows if state == "table" else None if state == "not run" else []
            heading, rows, state = line[3:], [], None
        elif line == NOT_RUN:
            state = "not run"
        elif line.startswith("|"):
            if state != "table":
                state = "table"
                continue
            if set(line.replace("|", "").strip()) <= {"-"}:
                continue
            rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return out


def check(results, tables_path, doc_path=None):
    """The differences between the tables and the records, as lines (none: all agree)."""
    rec = Records(results)
    settings_path = Path(results) / "per_task_settings.json"
    want = {"Claims": None, "Base model (SmolLM2-135M-Instruct as it is)": base_model(rec)}
    if settings_path.is_file():
        settings = json.loads(settings_path.read_text())
        want.update(per_task_study(rec, settings))
        want.update(arms_table(settings))
    want.update(quantization(results))
    want.update(qkvo_study(rec))
    md = Path(tables_path).read_text()
    have = parse(md)
    errors = []
    for heading, rows in want.items():
        if heading not in have:
            errors.append(f"missing table: ## {heading}")
            continue
        got = have[heading]
        if rows is None or got is None:
            if rows != got:
                errors.append(f"## {heading}: the records say {'not run' if rows is None else f'{len(rows)} rows'}, "
                              f"the table {'says not run' if got is None else f'has {len(got)} rows'}")
            continue
        if len(rows) != len(got):
            errors.append(f"## {heading}: {len(got)} rows, the records give {len(rows)}")
        for w, g in zip(rows, got):
            w = [str(c) for c in w]
            if len(w) != len(g):
                errors.append(f"## {heading}: row {g[:2]} has {len(g)} cells, expected {len(w)}")
                continue
            for i, (x, y) in enumerate(zip(g, w)):
                if not same_cell(x, y):
                    errors.append(f"## {heading}: row {g[:2]} cell {i + 1}: table {x!r}, records {y!r}")
    errors += [f"unchecked table: ## {h}" for h in have if h not in want and have[h] not in ([],)]
    if doc_path is not None and Path(doc_path).is_file():
        for m in re.finditer(r"<!-- tables\.md: (.+?) -->\n(.*?)<!-- end -->", Path(doc_path).read_text(), re.S):
            lines = md.splitlines()
            heading = m.group(1)
            if f"## {heading}" not in lines:
                if m.group(2).strip() != NOT_RUN:
                    errors.append(f"{doc_path}: quotes ## {heading}, which tables.md does not have")
                continue
            i = lines.index(f"## {heading}")
            body = []
            for line in lines[i + 1:]:
                if line.startswith("## "):
                    break
                if line.startswith("|") or line == NOT_RUN:
                    body.append(line)
            if m.group(2).strip() != "\n".join(body).strip():
                errors.append(f"{doc_path}: its quote of ## {heading} differs from tables.md (run plot_study.py)")
    return errors


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(RESULTS), help="folder of the records")
    ap.add_argument("--tables", default=None, help="the tables (default <results>/tables.md)")
    ap.add_argument("--doc", default=str(DOC), help="a markdown file quoting the tables ('' for none)")
    args = ap.parse_args(argv)
    tables_path = Path(args.tables) if args.tables else Path(args.results) / "tables.md"
    errors = check(args.results, tables_path, args.doc or None)
    for e in errors:
        print(e)
    n = sum(len(r or []) for r in parse(tables_path.read_text()).values())
    print(f"{'FAILED' if errors else 'ok'}: {n} table rows of {tables_path} checked against the records"
          + (f", {len(errors)} differences" if errors else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
