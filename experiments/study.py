"""The reproduction study: which of the SoKA paper's claims hold on SmolLM2-135M-Instruct.

    python experiments/study.py --stage per-task --plan   # list the runs and what is done, with an
                                                     #   estimate of the GPU time left; train nothing
    python experiments/study.py --stage per-task     # the per-task study, every stage in order; resumes
    python experiments/study.py --stage qkvo         # the qkvo study, every stage in order
    python experiments/study.py --stage sweep        # one stage (or a comma-separated list of them)
    python experiments/study.py --stage final --budget 540    # start no run after 540 s
    python experiments/study.py --stage qv_sweep,qv_final,base --ckpt M.gguf --data-dir D
    for i in 0 1 2; do OMP_NUM_THREADS=4 python experiments/study.py --stage matched --claims /tmp/c1 --tag w$i & done; wait
                                                     # three processes side by side on one GPU (a small
                                                     # model leaves most of it idle)
    python experiments/plot_study.py                 # tables and PNGs for docs/reproduction.md

The paper (Chong & Qu, arXiv 2506.15251) claims, on LLaMA-2-7B: ~25 % fewer trainable parameters
than LoRA / PiSSA while matching or beating them on GSM8K, MATH and MBPP, faster convergence with a
smoother loss, and gradient norms rarely above 1.5. Two studies check them on the demo model.

The qkvo study (targets wq wk wv wo, rates swept on GSM8K only; QKVO below):

  spectra   Kronecker spectra, ranks at τ ∈ {0.8, 0.9, 0.95, 0.99}, parameter counts (experiments/spectra.py)
  sweep     a learning-rate sweep on GSM8K for each method in each setting; the rate with the lowest
            final held-out loss wins; a winner at the edge of the grid extends it by one rate (×3 / ÷3), up to EXTEND times
  final     the "paper" setting: each method at its best rate, seeds 0, 1, 2, on GSM8K, MATH and MBPP,
            each run ending with the task's evaluation on its test split (GSM8K 1,319, MATH-500, MBPP 500)
  ablate    SoKA on GSM8K at its best rate: τ ∈ {0.8, 0.95, 0.99}, random init (σ = 0); two other
            factor shapes, and the rule at about each one's parameter count (FACTOR_RANKS),
            each at its own best rate from shapes_sweep (SoKA's before that has run); seeds 0, 1, 2
  matched   the "matched" setting, as `final`
  shapes_sweep  a learning-rate sweep (GSM8K, seed 0) of every factor shape of ablate and shapes,
            grown at an edge as the sweep is
  shapes    SoKA on GSM8K at one fixed rank (SHAPES_RANK) for three factor shapes with the same
            parameter count per term (the default rule, a tall U, a wide U), each at its own best rate from
            shapes_sweep (SoKA's best rate before that has run); seeds 0, 1, 2

Settings (SETTINGS below; the ranks are computed from the model, printed by --plan):
  paper     SoKA with its selected ranks (τ = 0.9, r ≤ 16 per layer) against LoRA / PiSSA at the one
            rank whose count is closest to 4/3 of SoKA's (the paper's 0.99 M against 1.33 M)
  matched   SoKA at the one fixed rank whose count is closest to LoRA / PiSSA r = 8's, against r = 8

The per-task study (the paper's targets, rates swept per task and method, per-problem results; PER_TASK below):
  base        the base model on every task: its test-split evaluation (train.py --eval-only) and its
              held-out loss (one LoRA step at lr BASE_LR from B = 0: the model stays the base model)
  qv_sweep    setting "qv", the paper's: SoKA on wq wv with the rule's ranks, against LoRA / PiSSA at the
              rank whose count is nearest the paper's 1.33 M transferred to this model (PEFT LoKr r = 8
              on all seven types) and at the rank nearest SoKA's own count; a learning-rate sweep per task
              (GRIDS, seed 0), grown at an edge as the qkvo study's sweep is
  qv_final    each arm at its task's best rate, SEEDS, with evaluation and per-problem results
  all7_sweep, all7_final   setting "all7": SoKA on all seven linear types against LoRA / PiSSA at the
              rank nearest its count
  rule_sweep, rule_final   setting "rule", the rank rule isolated on wq wv: energy alone (at the τ
              whose count is nearest the rule's), elbow alone, one uniform rank nearest the rule's count;
              the rule itself is qv's SoKA. An arm with the rule's ranks in every layer takes the rule's
              rate (no sweep of its own)
  wgrad       qv's arms at their final rates, seed 0, training only, with train.py --log-weight-grad:
              ‖∂L/∂W‖ of the adapted weights per step, the gradient measure that is the same for every
              method (the logged gradient norm is of each method's own factors)
  The settings are computed once from the model's spectra (per_task_settings) and kept in
  experiments/results/per_task_settings.json. Each evaluated run's per-problem results are kept compactly
  (id, extracted answer, verdict) in experiments/results/problems/<stage>/<run id>.jsonl.gz; the
  full completions stay in the run folder's eval.jsonl.

Every run is `python train.py ...` in a fresh process (nothing one run leaves on the GPU can
crowd the next), with its own --out under experiments/runs/ (not committed). Its summary (options, trainable parameters,
per-step loss and gradient norm, held-out losses, accuracy, times) is appended to
experiments/results/<stage>.jsonl; a run whose id is there already is skipped. Every number in
docs/reproduction.md comes from those files through plot_study.py.
"""
import argparse
import collections
import copy
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments import spectra                 # noqa: E402
from model import load_checkpoint               # noqa: E402
from rank_select import R_MAX, R_MIN, TAU, explain_rank   # noqa: E402
from soka import adapters                       # noqa: E402
from soka.checkpoints import demo_checkpoint    # noqa: E402
from soka.tasks import DATA_DIR, file_sha256    # noqa: E402

RESULTS = ROOT / "experiments" / "results"
RUNS = ROOT / "experiments" / "runs"
TARGETS = ("wq", "wk", "wv", "wo")
SEEDS = (0, 1, 2)
TASKS = ("gsm8k", "math", "mbpp")
# one setting of the training loop for every run (train.py options)
COMMON = dict(batch_size=32, max_len=512, heldout=256, eval_every=45, warmup=0.03, save_every=10**6)
EPOCHS = {"gsm8k": 1, "math": 1, "mbpp": 5}      # MBPP has 374 training problems: 11 steps an epoch
# MBPP's prompts (with their tests) are long: with train.py's automatic eval batch the prefill's
# attention ran out of memory on the H100 (generate now prefills in chunks: model.PREFILL_TOKENS);
# the recorded runs used 128 prompts per call, kept so that they reproduce.
EVAL_BATCH = {"mbpp": 128}
TRIES = 2      # a run that failed this often is not started again
EXTEND = 3     # a grid whose best rate sits at its edge grows by one rate (×3 / ÷3), at most this often
LR_GRID = {"soka": (1e-4, 3e-4, 1e-3, 3e-3), "lora": (1e-4, 3e-4, 1e-3, 3e-3), "pissa": (3e-5, 1e-4, 3e-4, 1e-3)}
TAUS = (0.8, 0.95, 0.99)                          # the ablation; 0.9 is the final runs'
# Other Kronecker factor shapes for the ablation: (m, n, p, q) per target (SmolLM2: wq wo 576 × 576,
# wk wv 192 × 576). The default rule (kpsvd.factor_shape) gives (24, 24, 24, 24) and (12, 24, 16, 24).
FACTORS = {"small_U": {"wq": (8, 8, 72, 72), "wo": (8, 8, 72, 72), "wk": (8, 8, 24, 72), "wv": (8, 8, 24, 72)},
           "large_U": {"wq": (72, 72, 8, 8), "wo": (72, 72, 8, 8), "wk": (24, 72, 8, 8), "wv": (24, 72, 8, 8)},
           "rule_r23": None, "rule_r37": None}
# The ablation's shapes train at the rule's selected ranks, except these, at one fixed rank in every
# layer, to tell what an unbalanced shape gains from its shape from what it gains from its count:
# the default rule at rank 23 trains 2.52 M parameters, about large_U's 2.47 M (rank 22: 2.41 M); at
# rank 37, 4.05 M, about small_U's 4.01 M (rank 36: 3.94 M).
FACTOR_RANKS = {"rule_r23": 23, "rule_r37": 37}
# Factor shapes with the same parameters per term as the default rule (m·n + p·q: 1,152 for wq wo, 672 for
# wk wv), so that at one fixed rank every run trains the same count: U tall (m > n) or wide (m < n).
SHAPES = {"rule": None,
          "tall_U": {"wq": (48, 12, 12, 48), "wo": (48, 12, 12, 48), "wk": (24, 12, 8, 48), "wv": (24, 12, 8, 48)},
          "wide_U": {"wq": (12, 48, 48, 12), "wo": (12, 48, 48, 12), "wk": (8, 48, 24, 12), "wv": (8, 48, 24, 12)}}
SHAPES_RANK = 3    # every layer; the rank rule selected 312 terms over the 120 layers (2.6 a layer)
# The shapes sweep: every shape above, at the rank its stage trains it (shape_variants), over these
# rates, so that no shape is judged at another shape's best rate.
SHAPES_LR_GRID = (1e-3, 3e-3, 9e-3)
LORA_MATCHED = 8


# ----------------------------------------------------------------------------- settings

def qkvo_settings(base):
    """{"paper": {method: rank}, "matched": {...}, "counts": {...}} from the model's shapes and SoKA's
    selected ranks (rank None = SoKA's rule)."""
    soka = adapters.inject(copy.deepcopy(base), "soka", TARGETS, verbose=False)["totals"]["trainable"]
    shapes = [base.args.linear_shapes()[t] for t in TARGETS]
    soka_per_rank = base.args.n_layers * sum(spectra.soka_per_rank(*s) for s in shapes)
    lora_per_rank = base.args.n_layers * sum(d_out + d_in for d_out, d_in in shapes)
    r_paper = min(range(1, 65), key=lambda r: abs(r * lora_per_rank - 4 / 3 * soka))
    r_soka = min(range(1, 65), key=lambda r: abs(r * soka_per_rank - LORA_MATCHED * lora_per_rank))
    return dict(paper=dict(soka=None, lora=r_paper, pissa=r_paper),
                matched=dict(soka=r_soka, lora=LORA_MATCHED, pissa=LORA_MATCHED),
                counts=dict(soka_selected=soka, soka_per_rank=soka_per_rank, lora_per_rank=lora_per_rank,
                            paper=dict(soka=soka, lora=r_paper * lora_per_rank),
                            matched=dict(soka=r_soka * soka_per_rank, lora=LORA_MATCHED * lora_per_rank)))


def run_id(r):
    parts = [r["stage"], r["task"], r["setting"], r["method"]]
    parts += [f"{k}{r[k]}" for k in ("tau", "init", "factors") if r.get(k) is not None]
    return "/".join(parts + [f"lr{r['lr']:g}", f"s{r['seed']}"])


def spec(stage, task, setting, method, rank, lr, seed, **extra):
    r = dict(stage=stage, task=task, setting=setting, method=method, rank=rank, lr=lr, seed=seed, **extra)
    r["id"] = run_id(r)
    return r


# ----------------------------------------------------------------------------- the plan

def read(results, stage):
    """Every record of a stage in folder `results`, in file order: <stage>.jsonl and
    <stage>-<tag>.jsonl (processes run side by side)."""
    results = Path(results)
    files = sorted(results.glob(f"{stage}.jsonl")) + sorted(results.glob(f"{stage}-*.jsonl"))
    return [json.loads(l) for f in files for l in f.read_text().splitlines() if l.strip()]


def best_of(records):
    """The rate of the finished record with the lowest final held-out loss (None if none finished)."""
    done = [r for r in records if r["status"] == "done"]
    return min(done, key=lambda r: r["heldout_final"])["lr"] if done else None


def best_lr(setting, method, sweep):
    """A method's best swept rate in a setting (None until the sweep has a finished run)."""
    return best_of([r for r in sweep if r["setting"] == setting and r["method"] == method])


def rates(grid, records):
    """The rates to run for one swept group: the grid, every rate already tried, and one rate beyond
    the edge where the best finished run sits at an edge of a finished grid (up to EXTEND times)."""
    lrs = sorted({*grid, *(r["lr"] for r in records)})
    done = {r["lr"] for r in records if r["status"] == "done"}
    if set(grid) <= done and len(lrs) < len(grid) + EXTEND:
        best = best_of(records)
        if best == lrs[0]:
            lrs.insert(0, float(f"{best / 3:.1g}"))
        elif best == lrs[-1]:
            lrs.append(float(f"{best * 3:.1g}"))
    return lrs


def sweep_runs(st, sweep, settings_=("paper", "matched")):
    """Each method's grid in each setting, grown at an edge by `rates`."""
    runs = []
    for setting in settings_:
        for method, rank in st[setting].items():
            mine = [r for r in sweep if r["setting"] == setting and r["method"] == method]
            runs += [spec("sweep", "gsm8k", setting, method, rank, lr, 0, eval=False)
                     for lr in rates(LR_GRID[method], mine)]
    return runs


def final_runs(st, sweep, setting, stage):
    runs = []
    for seed in SEEDS:                  # seed-major: a cut-short stage still has whole seeds
        for task in TASKS:
            for method, rank in st[setting].items():
                lr = best_lr(setting, method, sweep)
                if lr is not None:
                    runs.append(spec(stage, task, setting, method, rank, lr, seed, eval=True))
    return runs


def ablate_runs(st, sweep, shapes_sweep=()):
    """τ and the random initialization at SoKA's best rate; each other factor shape at its own
    (shape_lr: SoKA's until the shapes sweep has run)."""
    lr = best_lr("paper", "soka", sweep)
    if lr is None:
        return []
    runs = []
    for seed in SEEDS:
        runs += [spec("ablate", "gsm8k", "paper", "soka", None, lr, seed, tau=t, eval=True) for t in TAUS]
        runs.append(spec("ablate", "gsm8k", "paper", "soka", None, lr, seed, init="random", eval=True))
        for name in FACTORS:
            if (rate := shape_lr(name, sweep, shapes_sweep)) is not None:
                runs.append(spec("ablate", "gsm8k", "paper", "soka", FACTOR_RANKS.get(name), rate, seed,
                                 factors=name, eval=True))
    return runs


def planned_lr(r, sweep, shapes_sweep):
    """The rate the study now picks for a run like r: its factor shape's (shape_lr) or its method's
    best in its setting (best_lr). A finished run at another rate was made before a sweep moved."""
    if r.get("factors") is not None:
        return shape_lr(r["factors"], sweep, shapes_sweep)
    return best_lr(r["setting"], r["method"], sweep)


def shape_variants():
    """{factors name: rank} of every swept factor shape, as its stage runs it: the shapes stage's at
    SHAPES_RANK, the ablation's at FACTOR_RANKS or the rule's selected ranks (rank None)."""
    return {**{name: SHAPES_RANK for name in SHAPES}, **{name: FACTOR_RANKS.get(name) for name in FACTORS}}


def shapes_sweep_runs(shapes_sweep):
    """A learning-rate sweep (GSM8K, seed 0) of each factor shape, grown at an edge by `rates`."""
    runs = []
    for name, rank in shape_variants().items():
        mine = [r for r in shapes_sweep if r.get("factors") == name]
        runs += [spec("shapes_sweep", "gsm8k", "paper", "soka", rank, lr, 0, factors=name, eval=False)
                 for lr in rates(SHAPES_LR_GRID, mine)]
    return runs


def shape_lr(name, sweep, shapes_sweep):
    """A factor shape's rate: its own best once its shapes sweep is finished (every rate `rates`
    plans is done); SoKA's best in the main sweep if the shape has no shapes-sweep record (the
    stage's first runs came before the shapes sweep); None while its sweep is under way."""
    mine = [r for r in shapes_sweep if r.get("factors") == name]
    if not mine:
        return best_lr("paper", "soka", sweep)
    done = {r["lr"] for r in mine if r["status"] == "done"}
    return best_of(mine) if set(rates(SHAPES_LR_GRID, mine)) <= done else None


def shapes_runs(sweep, shapes_sweep=()):
    """Each shape of SHAPES at SHAPES_RANK and its own rate (shape_lr), seeds SEEDS."""
    runs = []
    for seed in SEEDS:
        for name in SHAPES:
            lr = shape_lr(name, sweep, shapes_sweep)
            if lr is not None:
                runs.append(spec("shapes", "gsm8k", "paper", "soka", SHAPES_RANK, lr, seed, factors=name, eval=True))
    return runs


def plan(results, stage, st, setting=None):
    sweep = read(results, "sweep")
    if stage == "sweep":
        return sweep_runs(st, sweep, (setting,) if setting else ("paper", "matched"))
    if stage == "final":
        return final_runs(st, sweep, "paper", "final")
    if stage == "matched":
        return final_runs(st, sweep, "matched", "matched")
    if stage == "ablate":
        return ablate_runs(st, sweep, read(results, "shapes_sweep"))
    if stage == "shapes_sweep":
        return shapes_sweep_runs(read(results, "shapes_sweep"))
    if stage == "shapes":
        return shapes_runs(sweep, read(results, "shapes_sweep"))
    raise ValueError(stage)



# ----------------------------------------------------------------------------- the per-task study

QV = ("wq", "wv")                                             # the paper's targets
ALL7 = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
PER_TASK = ("qv_sweep", "qv_final", "base", "rule_sweep", "rule_final", "all7_sweep", "all7_final",
          "wgrad")                                             # in priority order
# Per method and task, 3-4 rates around the qkvo study's GSM8K best (sweep.jsonl: SoKA 3e-3 with
# 9e-3 within 0.0003, LoRA 9e-3, PiSSA 9e-3 at r = 3 and 3e-3 at r = 8). MBPP trains 5 epochs of 374
# problems and overfits at those rates, so its grid reaches one step lower; `rates` grows any grid
# whose best sits at an edge, as in the qkvo study.
GRIDS = {"soka": {"gsm8k": (1e-3, 3e-3, 9e-3), "math": (1e-3, 3e-3, 9e-3), "mbpp": (3e-4, 1e-3, 3e-3, 9e-3)},
         "lora": {"gsm8k": (3e-3, 9e-3, 3e-2), "math": (3e-3, 9e-3, 3e-2), "mbpp": (1e-3, 3e-3, 9e-3, 3e-2)},
         "pissa": {"gsm8k": (3e-3, 9e-3, 3e-2), "math": (3e-3, 9e-3, 3e-2), "mbpp": (1e-3, 3e-3, 9e-3, 3e-2)}}
LOKR_R = 8             # the paper's 1.33 M is PEFT LoKr r = 8 on LLaMA-2-7B's seven linear types
BASE_LR = 1e-12        # the base model's held-out loss: one step this small from B = 0 leaves W as it is
TAU_STEP = 1e-3        # the energy-only arm's τ: the multiple of this whose count is nearest the rule's


def _rule_ranks(rows, rule="both", tau=TAU):
    return [explain_rank(L["sigma"], tau=tau, r_min=min(R_MIN, L["sigma"].numel()),
                         r_max=min(R_MAX, L["sigma"].numel()), rule=rule).r for L in rows]


def _soka_count(rows, ranks):
    return sum(r * spectra.soka_per_rank(L["d_out"], L["d_in"]) for r, L in zip(ranks, rows))


def energy_tau(rows, target):
    """The τ (a multiple of TAU_STEP) whose energy-only ranks give the SoKA count nearest `target`
    (ties: the smaller τ). The count grows with τ, so a bisection finds the crossing."""
    count = lambda k: _soka_count(rows, _rule_ranks(rows, "energy", k * TAU_STEP))   # noqa: E731
    lo, hi = 1, round(1 / TAU_STEP)
    while lo < hi:                              # the smallest k whose count reaches the target
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(mid) < target else (lo, mid)
    k = min((k for k in (lo - 1, lo) if k >= 1), key=lambda k: (abs(count(k) - target), k))
    return round(k * TAU_STEP, 6)


def per_task_settings(layers):
    """The per-task study's settings from spectra.layer_spectra rows (exact float32 KPSVD of every
    linear layer): {setting: {"targets", "arms": {arm: {method, rank, rule, tau, role, same_as}}},
    "arithmetic": the counts the ranks come from}. rank None: the rule's ranks (rule, tau)."""
    qv = [L for L in layers if L["type"] in QV]
    lora_unit = lambda rows: sum(L["d_out"] + L["d_in"] for L in rows)   # noqa: E731
    n_blocks = len({L["block"] for L in layers})
    # The paper's 1.33 M is PEFT LoKr r = 8 on all seven types of LLaMA-2-7B: 32 × (4·5,120 + 3·7,040)
    # = 1,331,200. The same construction on this model is its "1.33 M-equivalent".
    lokr = sum(spectra.lokr_params(L["d_out"], L["d_in"], LOKR_R) for L in layers)
    rule_qv, rule_all = _rule_ranks(qv), _rule_ranks(layers)
    soka_qv, soka_all = _soka_count(qv, rule_qv), _soka_count(layers, rule_all)
    r_lokr, r_count = spectra.closest_rank(lokr, lora_unit(qv)), spectra.closest_rank(soka_qv, lora_unit(qv))
    r_all = spectra.closest_rank(soka_all, lora_unit(layers))
    tau_e = energy_tau(qv, soka_qv)
    energy_ranks = _rule_ranks(qv, "energy", tau_e)
    per_rank_qv = _soka_count(qv, [1] * len(qv))
    r_uniform = spectra.closest_rank(soka_qv, per_rank_qv)

    def baselines(rank, role):
        return {f"{m}_r{rank}": dict(method=m, rank=rank, role=role) for m in ("lora", "pissa")}
    qv_arms = {"soka": dict(method="soka", rank=None, role="the rule's ranks")}
    qv_arms.update(baselines(r_lokr, "1.33 M-equivalent" + (" and SoKA's count" if r_lokr == r_count else "")))
    qv_arms.update(baselines(r_count, "SoKA's count") if r_count != r_lokr else {})
    rule_arms = {"soka_energy": dict(method="soka", rank=None, rule="energy", tau=tau_e, role=f"energy alone, τ = {tau_e:g}"),
                 "soka_elbow": dict(method="soka", rank=None, rule="elbow", role="elbow alone"),
                 f"soka_r{r_uniform}": dict(method="soka", rank=r_uniform, role=f"uniform rank {r_uniform}")}
    for arm in ("soka_energy", "soka_elbow"):
        a = rule_arms[arm]
        if _rule_ranks(qv, a["rule"], a.get("tau", TAU)) == rule_qv:
            a["same_as"] = "qv/soka"            # the rule's ranks in every layer: the rule's rate, no sweep
    return dict(
        qv=dict(targets=list(QV), arms=qv_arms),
        all7=dict(targets=list(ALL7), arms={"soka": dict(method="soka", rank=None, role="the rule's ranks"),
                                            **baselines(r_all, "SoKA's count")}),
        rule=dict(targets=list(QV), arms=rule_arms, rule_arm="qv/soka"),
        arithmetic=dict(
            blocks=n_blocks, lokr_r8_all7=lokr, lokr_per_block={L["type"]: spectra.lokr_params(L["d_out"], L["d_in"], LOKR_R)
                                                               for L in layers if L["block"] == layers[0]["block"]},
            soka_qv=soka_qv, soka_all7=soka_all, lora_per_rank_qv=lora_unit(qv), lora_per_rank_all7=lora_unit(layers),
            soka_per_rank_qv=per_rank_qv, rule_ranks_qv=rule_qv, energy_tau=tau_e, energy_ranks_qv=energy_ranks,
            energy_count_qv=_soka_count(qv, energy_ranks), elbow_equals_rule_qv=_rule_ranks(qv, "elbow") == rule_qv,
            elbow_equals_rule_all7=_rule_ranks(layers, "elbow") == rule_all,
            min_r_energy_at_tau=min(explain_rank(L["sigma"], tau=TAU).r_energy for L in layers), tau=TAU, r_max=R_MAX,
            uniform_rank_qv=r_uniform, uniform_count_qv=r_uniform * per_rank_qv,
            lora_rank_lokr=r_lokr, lora_rank_count_qv=r_count, lora_rank_count_all7=r_all))


def load_per_task_settings(results, ckpt):
    """per_task_settings.json if it was computed from a file with these bytes (size and sha256), else computed
    now (the model on the CPU, float32, exact KPSVD of all 210 layers: half a minute on 16 cores)
    and saved."""
    path, ckpt = Path(results) / "per_task_settings.json", Path(ckpt)
    source = dict(checkpoint=ckpt.name, bytes=ckpt.stat().st_size if ckpt.is_file() else None,
                  sha256=file_sha256(ckpt) if ckpt.is_file() else None)
    if path.is_file():
        st = json.loads(path.read_text())
        same = {k: st.get("source", {}).get(k) for k in ("bytes", "sha256")} == {k: source[k] for k in ("bytes", "sha256")}
        if same and source["sha256"] is not None:
            return st
    base, _ = load_checkpoint(ckpt)
    st = dict(per_task_settings(spectra.layer_spectra(base, ALL7)), source=source)
    Path(results).mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.part-{os.getpid()}")     # processes side by side may all write it
    tmp.write_text(json.dumps(st, indent=1) + "\n")
    os.replace(tmp, path)
    return st


def run_id_per_task(r):
    return f"{r['stage']}/{r['task']}/{r['setting']}/{r['arm']}/lr{r['lr']:g}/s{r['seed']}"


def spec_per_task(settings, stage, task, setting, arm, lr, seed, **extra):
    a = settings[setting]["arms"][arm]
    r = dict(stage=stage, task=task, setting=setting, arm=arm, method=a["method"], rank=a.get("rank"),
             rule=a.get("rule"), tau=a.get("tau"), targets=settings[setting]["targets"], lr=lr, seed=seed, **extra)
    r["id"] = run_id_per_task(r)
    return r


def arm_best(settings, setting, arm, task, sweeps):
    """(rates its sweep runs, best rate or None while that sweep is unfinished). An arm that is
    another's (same_as) takes that arm's best and runs no sweep (rates ())."""
    a = settings[setting]["arms"][arm]
    if a.get("same_as"):
        other_setting, other = a["same_as"].split("/")
        return (), arm_best(settings, other_setting, other, task, sweeps)[1]
    mine = [r for r in sweeps.get(setting, []) if r["arm"] == arm and r["task"] == task]
    lrs = rates(GRIDS[a["method"]][task], mine)
    done = {r["lr"] for r in mine if r["status"] == "done"}
    return lrs, (best_of(mine) if set(lrs) <= done else None)


def plan_per_task(results, stage, settings, seeds=None):
    """The runs of a per-task stage now known: a sweep's rates (grown at an edge), a final
    stage's runs whose arm's sweep has finished, the base model's six runs."""
    if stage == "base":
        return [dict(stage="base", task=t, setting="base", arm=kind, method="base" if kind == "eval" else "lora",
                     rank=None if kind == "eval" else 1, targets=["wq"], lr=BASE_LR if kind == "heldout" else 0.0,
                     seed=0, eval=kind == "eval", base=kind, id=f"base/{t}/{kind}") for t in TASKS
                for kind in ("eval", "heldout")]
    sweeps = {s: read(results, f"{s}_sweep") for s in ("qv", "all7", "rule")}
    if stage == "wgrad":                # qv's arms at their final rates, seed 0, ‖∂L/∂W‖ logged
        return [spec_per_task(settings, "wgrad", task, "qv", arm, lr, 0, eval=False, weight_grad=True)
                for task in TASKS for arm in settings["qv"]["arms"]
                for lr in [arm_best(settings, "qv", arm, task, sweeps)[1]] if lr is not None]
    setting, kind = stage.split("_")
    runs = []
    if kind == "sweep":
        for task in TASKS:
            for arm in settings[setting]["arms"]:
                lrs, _ = arm_best(settings, setting, arm, task, sweeps)
                runs += [spec_per_task(settings, stage, task, setting, arm, lr, 0, eval=False) for lr in lrs]
        return runs
    for seed in seeds or SEEDS:         # seed-major: a cut-short stage still has whole seeds
        for task in TASKS:
            for arm in settings[setting]["arms"]:
                _, lr = arm_best(settings, setting, arm, task, sweeps)
                if lr is not None:
                    runs.append(spec_per_task(settings, stage, task, setting, arm, lr, seed, eval=True))
    return runs


def expected_per_task(stage, settings, seeds=None):
    """How many runs a per-task stage will have once its sweeps are done (extensions of a sweep
    not counted)."""
    if stage == "base":
        return 2 * len(TASKS)
    if stage == "wgrad":
        return len(TASKS) * len(settings["qv"]["arms"])
    setting, kind = stage.split("_")
    arms = settings[setting]["arms"]
    if kind == "sweep":
        return sum(len(GRIDS[a["method"]][t]) for t in TASKS for a in arms.values() if not a.get("same_as"))
    return len(seeds or SEEDS) * len(TASKS) * len(arms)


# Seconds per run on one H100 alone, from the qkvo study's records (wall time: load, KPSVD, training,
# held-out loss, evaluation), for 120 adapted layers; SCALE for the per-task study's targets. Side by
# side, three processes took about twice as long each: 1.5 times the throughput (SIDE_BY_SIDE).
SECONDS = {("sweep", "gsm8k"): dict(soka=42, lora=29, pissa=31), ("sweep", "math"): dict(soka=56, lora=38, pissa=41),
           ("sweep", "mbpp"): dict(soka=27, lora=22, pissa=25), ("final", "gsm8k"): dict(soka=60, lora=40, pissa=42),
           ("final", "math"): dict(soka=71, lora=52, pissa=55), ("final", "mbpp"): dict(soka=52, lora=41, pissa=48)}
SCALE = {"qv": dict(soka=0.8, lora=0.95, pissa=0.95), "rule": dict(soka=0.8), "all7": dict(soka=1.6, lora=1.15, pissa=1.15)}
BASE_SECONDS = {"eval": dict(gsm8k=25, math=30, mbpp=35), "heldout": dict(gsm8k=20, math=22, mbpp=15)}
SIDE_BY_SIDE = 1.5
EAGER = 2.0     # a wgrad run's steps run eagerly (--log-weight-grad): assumed twice as long (an estimate)


def seconds_per_task(r):
    """Estimated seconds of one per-task run alone on an H100."""
    if r["stage"] == "base":
        return BASE_SECONDS[r["arm"]][r["task"]]
    kind = "final" if r["eval"] else "sweep"
    return SECONDS[kind, r["task"]][r["method"]] * SCALE[r["setting"]][r["method"]] * (EAGER if r.get("weight_grad") else 1)


def compact_problems(src, dest, task):
    """The per-problem lines of an evaluation (soka/evaluate.py's eval.jsonl) as a small gzip JSONL:
    {"id", "x": the extracted answer (≤ 64 characters; MBPP: "sha256:" and 12 hex digits of the
    program), "v": 1 or 0}. Deterministic bytes (mtime 0)."""
    rows = []
    for line in Path(src).read_text(encoding="utf-8").splitlines():
        p = json.loads(line)
        x = p["extracted"]
        if x is not None and task == "mbpp":
            x = "sha256:" + hashlib.sha256(x.encode()).hexdigest()[:12]
        elif x is not None:
            x = x[:64]
        rows.append({"id": p["id"], "x": x, "v": int(bool(p["verdict"]))})
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    return rows


def problems_file(results, r):
    """Where a run's compact per-problem results go: <results>/problems/<stage>/<run id, / as __>.jsonl.gz."""
    return Path(results) / "problems" / r["stage"] / (r["id"].replace("/", "__") + ".jsonl.gz")


def read_problems(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


# ----------------------------------------------------------------------------- one run

def argv_for(r, ckpt, data_dir, out):
    if r.get("base") == "eval":                 # the base model as it is, through train.py's evaluation
        o = dict({k: v for k, v in COMMON.items() if k in ("max_len", "device", "eval_limit", "max_new_tokens")},
                 task=r["task"], eval_only=True, out=out, data_dir=data_dir, ckpt=ckpt,
                 eval_batch_size=EVAL_BATCH.get(r["task"]))
        return [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in o.items() if v is not None]
    o = dict(COMMON, task=r["task"], method=r["method"], lr=r["lr"], seed=r["seed"], epochs=EPOCHS[r["task"]],
             targets=",".join(r.get("targets") or TARGETS), out=out, data_dir=data_dir, ckpt=ckpt)
    if r.get("base") == "heldout":
        o.update(max_steps=1, eval_every=0)
    if r["rank"] is not None:
        o["rank"] = r["rank"]
    if r.get("tau") is not None:
        o["tau"] = r["tau"]
    if r.get("rule") not in (None, "both"):
        o["rank_rule"] = r["rule"]
    if r.get("init") is not None:
        o["init"] = r["init"]
    factors = {**FACTORS, **SHAPES}.get(r.get("factors"))
    if factors is not None:
        o["factors"] = json.dumps(factors)
    if not r["eval"]:
        o["eval_limit"] = 0
    elif r["task"] in EVAL_BATCH:
        o["eval_batch_size"] = EVAL_BATCH[r["task"]]
    flags = ["--log-weight-grad"] if r.get("weight_grad") else []
    return [f"--{k.replace('_', '-')}={v}" for k, v in o.items() if v is not None] + flags


def summarize(r, out, wall_s, results=None):
    """The run's record: what it was, and what it measured (from the files train.py wrote). With
    `results`, an evaluated run's per-problem results are kept there too (compact_problems)."""
    rec = dict(r, status="done")
    if r.get("base") != "eval":
        m = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        report = json.loads((out / "ranks.json").read_text())
        loss, gn = [x["loss"] for x in m], [x["grad_norm"] for x in m]
        held = [[x["step"], x["heldout_loss"]] for x in m if x["heldout_loss"] is not None]
        done = len(m) > 0 and (out / "adapter.pt").exists()
        k = max(1, len(loss) // 10)
        rec.update(status="done" if done else "failed", trainable=report["totals"]["trainable"],
                   ranks=[row["r"] for row in report["layers"]], steps=len(m), wall_s=round(wall_s, 1),
                   train_s=round(sum(x["time_s"] for x in m), 2), tokens=sum(x["tokens"] for x in m),
                   loss=[round(v, 5) for v in loss], grad_norm=[round(v, 4) for v in gn], heldout=held,
                   loss_first=sum(loss[:k]) / k, loss_last=sum(loss[-k:]) / k,
                   heldout_final=held[-1][1] if held else None, gnorm_max=max(gn) if gn else None,
                   gnorm_above_1_5=sum(g > 1.5 for g in gn) / max(len(gn), 1))
        if r.get("weight_grad"):
            if not all("weight_grad_norm" in x for x in m):
                rec["status"] = "failed"        # asked for ‖∂L/∂W‖, and it is not logged
            else:
                rec["weight_grad_norm"] = [round(x["weight_grad_norm"], 4) for x in m]
    else:
        rec.update(trainable=0, wall_s=round(wall_s, 1))
    ev = out / "eval.json"
    if r["eval"] and ev.exists():
        e = json.loads(ev.read_text())
        rec.update(accuracy=e["accuracy"], correct=e["correct"], n_eval=e["n"],
                   eval_s=round(sum(e["seconds"].values()), 2))
        if results is not None and (out / "eval.jsonl").exists():
            dest = problems_file(results, r)
            rows = compact_problems(out / "eval.jsonl", dest, r["task"])
            if (len(rows), sum(x["v"] for x in rows)) != (e["n"], e["correct"]):
                raise ValueError(f"{out / 'eval.jsonl'}: {len(rows)} problems, {sum(x['v'] for x in rows)} right; "
                                 f"eval.json says {e['n']}, {e['correct']}")
            rec["problems"] = dest.relative_to(results).as_posix()
    elif r["eval"]:
        rec["status"] = "failed"                # an evaluated run without its evaluation
    return rec


def claim(claims, run_id):
    """True for the one process that creates claims/<run id> (O_EXCL: the file system decides)."""
    if claims is None:
        return True
    claims.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(claims / run_id.replace("/", "__"), os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def release(claims, run_id):
    """Mark a claimed run finished (claims/<run id>.done), recorded or failed."""
    if claims is not None:
        (claims / (run_id.replace("/", "__") + ".done")).touch()


def in_progress(claims, runs):
    """The runs among `runs` that some process of this batch has claimed and not finished."""
    if claims is None:
        return []
    return [r for r in runs if (claims / r["id"].replace("/", "__")).exists()
            and not (claims / (r["id"].replace("/", "__") + ".done")).exists()]


QKVO = ("spectra", "sweep", "final", "shapes_sweep", "ablate", "matched", "shapes")
KNOWN = QKVO + PER_TASK


def print_plan(stages, results, qkvo, per_task, setting, seeds):
    """Each stage's runs: done, to do now, and (per-task study) still to come; estimated GPU time."""
    total = 0.0
    for stage in stages:
        recs, runs = read(results, stage), planned(results, stage, qkvo, per_task, setting, seeds)
        done = {r["id"] for r in recs if r["status"] == "done"}
        todo = runs_left(runs, recs)
        left = {r["id"] for r in todo}
        dropped = [r["id"] for r in runs if r["id"] not in done and r["id"] not in left]
        fails = collections.Counter(r["id"] for r in recs if r["status"] != "done")
        line = f"stage {stage}: {len(done)} runs done, {len(todo)} to do"
        if stage in PER_TASK:
            later = max(0, expected_per_task(stage, per_task, seeds) - len(done) - len(todo))
            est = sum(map(seconds_per_task, todo))
            if later:                                   # not planned yet: a final waits for its sweep
                s = "qv" if stage == "wgrad" else stage.split("_")[0]
                per = [seconds_per_task(dict(stage=stage, task=t, setting=s, method=a["method"], eval=stage.endswith("_final"),
                                     weight_grad=stage == "wgrad"))
                       for t in TASKS for a in per_task[s]["arms"].values()]
                est += later * sum(per) / len(per)
            total += est
            line += (f", {later} more once their sweeps are done" if later else "") + \
                f"; about {est / 60:.0f} min alone on an H100 ({est / 60 / SIDE_BY_SIDE:.0f} min three side by side)"
        print(line)
        for r in todo:
            print(f"  {r['id']}  rank {r['rank']}")
        for run_id in dropped:
            last = [r["status"] for r in recs if r["id"] == run_id][-1]
            print(f"  {run_id}  failed {fails[run_id]} times, not started again (last: {last}); delete its records to retry")
    if any(s in PER_TASK for s in stages):
        print(f"per-task study left: about {total / 60:.0f} min of runs alone on an H100, {total / 60 / SIDE_BY_SIDE:.0f} "
              f"min with three processes side by side; a sweep grown at an edge adds its runs")


OOM = "out of memory"


def failure(rc, out):
    """A failed run's status: OOM where the GPU ran out of memory (processes side by side can crowd
    it; the run itself may be fine), else the exit code."""
    log = (out / "log.txt").read_text(errors="replace")[-4000:] if (out / "log.txt").exists() else ""
    return OOM if "out of memory" in log.lower() else f"exit {rc}"


def planned(results, stage, qkvo, per_task, setting, seeds):
    """The runs a stage has now: the qkvo study's plan or the per-task study's plan_per_task."""
    return plan_per_task(results, stage, per_task, seeds) if stage in PER_TASK else plan(results, stage, qkvo, setting)


def runs_left(runs, recs):
    """The planned `runs` that the stage's records `recs` do not show done, less those that failed
    TRIES times (their records say why; delete those records to try again). Running out of GPU memory
    beside other processes is not counted: the next invocation tries such a run again (one process
    gives up on it for its lifetime)."""
    done = {r["id"] for r in recs if r["status"] == "done"}
    failed = collections.Counter(r["id"] for r in recs if r["status"] != "done"
                                 and not (r["status"] == OOM and r.get("side_by_side")))
    return [r for r in runs if r["id"] not in done and failed[r["id"]] < TRIES]


def run_one(r, ckpt, data_dir, results, stage, tag, claims):
    """Train (and evaluate) one run in a fresh process and append its record; True if it is done."""
    out = RUNS / r["id"]
    if out.exists():                # a run cut short earlier starts again from scratch
        shutil.rmtree(out)
    print(f"\n=== {r['id']} (rank {r['rank']})", flush=True)
    t0 = time.perf_counter()
    out.mkdir(parents=True)
    # A fresh process per run: every run starts from the same GPU state, and nothing one
    # run leaves allocated (CUDA graph pools, the allocator's cache) can crowd the next.
    with open(out / "log.txt", "w") as log:
        rc = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv_for(r, ckpt, data_dir, out)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    try:
        rec = summarize(r, out, time.perf_counter() - t0, results) if rc == 0 else dict(r, status=failure(rc, out))
        rec["side_by_side"] = claims is not None     # its times shared the GPU with other runs
    except (OSError, ValueError, KeyError) as e:
        rec = dict(r, status=f"error: {type(e).__name__}: {e}")
    if rc != 0:
        print((out / "log.txt").read_text()[-2000:])
    with open(results / f"{stage}{'-' + tag if tag else ''}.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"=== {r['id']}: {rec['status']}, held-out {rec.get('heldout_final')}, "
          f"accuracy {rec.get('accuracy')}, {time.perf_counter() - t0:.1f} s", flush=True)
    return rec["status"] == "done"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", default="per-task",
                    help=f"per-task (the default) or qkvo: every stage of that study; or a comma-separated list of: {', '.join(KNOWN)}")
    ap.add_argument("--results", default=None, help="folder of the <stage>.jsonl records (default experiments/results)")
    ap.add_argument("--ckpt", default=os.environ.get("SOKA_CKPT"),
                    help="model (default: $SOKA_CKPT, else the demo model as train.py finds it)")
    ap.add_argument("--data-dir", default=os.environ.get("SOKA_DATA_DIR"),
                    help="GSM8K / MATH / MBPP folder (default: $SOKA_DATA_DIR, else train.py's)")
    ap.add_argument("--budget", type=float, default=None, help="start no run after this many seconds")
    ap.add_argument("--plan", action="store_true", help="print the runs, what is done and the GPU time left; train nothing")
    ap.add_argument("--setting", choices=("paper", "matched"), default=None, help="sweep only this setting")
    ap.add_argument("--seeds", default=None,
                    help="per-task final stages: comma-separated seeds (default 0,1,2; add seeds where a verdict "
                         "hangs on them)")
    ap.add_argument("--tag", default="", help="write to <stage>-<tag>.jsonl (for processes side by side)")
    ap.add_argument("--claims", default=None, metavar="DIR",
                    help="processes side by side (each with its own --tag) share the plan: a process runs a run "
                         "only if it creates DIR/<run id> first. Use a fresh DIR for each batch of processes, and "
                         "set OMP_NUM_THREADS to cores / processes. Their records say side_by_side: their times "
                         "shared the GPU. With --budget, a process with nothing to start waits while another "
                         "runs one of its stages' runs (a finished sweep may unlock runs)")
    args = ap.parse_args(argv)
    results = Path(args.results) if args.results else RESULTS
    claims = Path(args.claims) if args.claims else None
    seeds = tuple(int(x) for x in args.seeds.split(",")) if args.seeds else None
    stages = QKVO if args.stage == "qkvo" else PER_TASK if args.stage == "per-task" else tuple(args.stage.split(","))
    if not set(stages) <= set(KNOWN):
        ap.error(f"--stage {args.stage!r}: choose from qkvo, per-task, {', '.join(KNOWN)}")
    t_start = time.perf_counter()
    try:
        ckpt = str(Path(args.ckpt).expanduser() if args.ckpt else demo_checkpoint())
    except OSError as e:
        raise SystemExit(f"study.py: {e}")
    data_dir = args.data_dir or str(DATA_DIR)
    if "spectra" in stages and not args.plan:
        spectra.main(["--ckpt", ckpt])
    stages = [s for s in stages if s != "spectra"]
    if not stages:
        return 0

    results.mkdir(parents=True, exist_ok=True)
    qkvo = per_task = None
    if any(s in QKVO for s in stages):
        base, _ = load_checkpoint(ckpt)             # float32 on the CPU, for the parameter counts
        qkvo = qkvo_settings(base)
        print(f"qkvo study: {json.dumps({k: qkvo[k] for k in ('paper', 'matched')})}; counts {json.dumps(qkvo['counts'])}")
        (results / "qkvo_settings.json").write_text(json.dumps(qkvo, indent=1) + "\n")
    if any(s in PER_TASK for s in stages):
        per_task = load_per_task_settings(results, ckpt)
        print("per-task study: " + "; ".join(f"{k}: {', '.join(v['arms'])}" for k, v in per_task.items() if "arms" in v))
    if args.plan:
        print_plan(stages, results, qkvo, per_task, args.setting, seeds)
        return 0

    def todo_of(stage):
        runs = planned(results, stage, qkvo, per_task, args.setting, seeds)
        return [r for r in runs_left(runs, read(results, stage)) if r["id"] not in given_up]

    given_up = set()
    while True:                                 # passes over the stages until one starts nothing:
        started, busy = 0, []                   # a finished sweep grows its grid or unlocks final runs
        for stage in stages:
            while True:
                todo = todo_of(stage)
                print(f"stage {stage}: {len(todo)} to do")
                here = 0
                for r in todo:
                    if args.budget is not None and time.perf_counter() - t_start > args.budget:
                        print(f"budget of {args.budget:.0f} s spent; run again to continue")
                        return 0
                    if not claim(claims, r["id"]):
                        continue                # another process runs it (or ran it in this batch)
                    here += 1
                    try:
                        if not run_one(r, ckpt, data_dir, results, stage, args.tag, claims):
                            given_up.add(r["id"])   # not again in this process
                    finally:
                        release(claims, r["id"])
                started += here
                if stage not in ("sweep", "shapes_sweep") or not here:
                    break                       # the qkvo study's sweeps grow before the next stage
            busy += in_progress(claims, todo_of(stage))
        if started:
            continue
        if not busy or args.budget is None or time.perf_counter() - t_start > args.budget:
            return 0
        print(f"waiting: {len(busy)} runs under way in other processes (e.g. {busy[0]['id']})", flush=True)
        time.sleep(15)

if __name__ == "__main__":
    sys.exit(main())
