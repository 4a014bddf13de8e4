"""The reproduction study: which of the SoKA paper's claims hold on SmolLM2-135M-Instruct.

    python experiments/study.py                      # every stage in order; resumes where it stopped
    python experiments/study.py --stage sweep        # one stage: spectra, sweep, final, shapes_sweep,
                                                     #   ablate, matched, shapes
    python experiments/study.py --stage final --budget 540    # start no run after 540 s
    python experiments/study.py --plan               # list the runs and what is done, train nothing
    for i in 0 1 2; do OMP_NUM_THREADS=4 python experiments/study.py --stage matched --claims /tmp/c1 --tag w$i & done; wait
                                                     # three processes side by side on one GPU (a small
                                                     # model leaves most of it idle)
    python experiments/plot_study.py                 # tables and PNGs for docs/reproduction.md

The paper (Chong & Qu, arXiv 2506.15251) claims, on LLaMA-2-7B: ~25 % fewer trainable parameters
than LoRA / PiSSA while matching or beating them on GSM8K, MATH and MBPP, faster convergence with a
smoother loss, and gradient norms rarely above 1.5. Here, on the demo model (targets wq wk wv wo):

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

Every run is `python train.py ...` in a fresh process (nothing one run leaves on the GPU can
crowd the next), with its own --out under experiments/runs/ (not committed). Its summary (options, trainable parameters,
per-step loss and gradient norm, held-out losses, accuracy, times) is appended to
experiments/results/<stage>.jsonl; a run whose id is there already is skipped. Every number in
docs/reproduction.md comes from those files through plot_study.py.
"""
import argparse
import copy
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
from soka import adapters                       # noqa: E402
from soka.checkpoints import demo_checkpoint    # noqa: E402
from soka.tasks import DATA_DIR                 # noqa: E402

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

def settings(base):
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


# ----------------------------------------------------------------------------- one run

def argv_for(r, ckpt, data_dir, out):
    o = dict(COMMON, task=r["task"], method=r["method"], lr=r["lr"], seed=r["seed"], epochs=EPOCHS[r["task"]],
             targets=",".join(TARGETS), out=out, data_dir=data_dir, ckpt=ckpt)
    if r["rank"] is not None:
        o["rank"] = r["rank"]
    if r.get("tau") is not None:
        o["tau"] = r["tau"]
    if r.get("init") is not None:
        o["init"] = r["init"]
    factors = {**FACTORS, **SHAPES}.get(r.get("factors"))
    if factors is not None:
        o["factors"] = json.dumps(factors)
    if not r["eval"]:
        o["eval_limit"] = 0
    elif r["task"] in EVAL_BATCH:
        o["eval_batch_size"] = EVAL_BATCH[r["task"]]
    return [f"--{k.replace('_', '-')}={v}" for k, v in o.items() if v is not None]


def summarize(r, out, wall_s):
    """The run's record: what it was, and what it measured (from the files train.py wrote)."""
    m = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    report = json.loads((out / "ranks.json").read_text())
    loss, gn = [x["loss"] for x in m], [x["grad_norm"] for x in m]
    held = [[x["step"], x["heldout_loss"]] for x in m if x["heldout_loss"] is not None]
    done = len(m) > 0 and (out / "adapter.pt").exists()
    k = max(1, len(loss) // 10)
    rec = dict(r, status="done" if done else "failed", trainable=report["totals"]["trainable"],
               ranks=[row["r"] for row in report["layers"]], steps=len(m), wall_s=round(wall_s, 1),
               train_s=round(sum(x["time_s"] for x in m), 2), tokens=sum(x["tokens"] for x in m),
               loss=[round(v, 5) for v in loss], grad_norm=[round(v, 4) for v in gn], heldout=held,
               loss_first=sum(loss[:k]) / k, loss_last=sum(loss[-k:]) / k,
               heldout_final=held[-1][1] if held else None, gnorm_max=max(gn) if gn else None,
               gnorm_above_1_5=sum(g > 1.5 for g in gn) / max(len(gn), 1))
    ev = out / "eval.json"
    if r["eval"] and ev.exists():
        e = json.loads(ev.read_text())
        rec.update(accuracy=e["accuracy"], correct=e["correct"], n_eval=e["n"],
                   eval_s=round(sum(e["seconds"].values()), 2))
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", default="all",
                    help="all, or a comma-separated list of: spectra, sweep, final, shapes_sweep, ablate, matched, "
                         "shapes")
    ap.add_argument("--results", default=None, help="folder of the <stage>.jsonl records (default experiments/results)")
    ap.add_argument("--ckpt", default=None, help="model (default: the demo model, as train.py finds it)")
    ap.add_argument("--data-dir", default=None, help="GSM8K / MATH / MBPP folder (default: train.py's)")
    ap.add_argument("--budget", type=float, default=None, help="start no run after this many seconds")
    ap.add_argument("--plan", action="store_true", help="print the runs and what is done; train nothing")
    ap.add_argument("--setting", choices=("paper", "matched"), default=None, help="sweep only this setting")
    ap.add_argument("--tag", default="", help="write to <stage>-<tag>.jsonl (for processes side by side)")
    ap.add_argument("--claims", default=None, metavar="DIR",
                    help="processes side by side (each with its own --tag) share the plan: a process runs a run "
                         "only if it creates DIR/<run id> first. Use a fresh DIR for each batch of processes, and "
                         "set OMP_NUM_THREADS to cores / processes. Their records say side_by_side: their times "
                         "shared the GPU")
    args = ap.parse_args(argv)
    results = Path(args.results) if args.results else RESULTS
    claims = Path(args.claims) if args.claims else None
    known = ("spectra", "sweep", "final", "shapes_sweep", "ablate", "matched", "shapes")
    stages = known if args.stage == "all" else tuple(args.stage.split(","))
    if not set(stages) <= set(known):
        ap.error(f"--stage {args.stage!r}: choose from all, {', '.join(known)}")
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

    base, _ = load_checkpoint(ckpt)             # float32 on the CPU, for the parameter counts
    st = settings(base)
    print(f"settings: {json.dumps({k: st[k] for k in ('paper', 'matched')})}; counts {json.dumps(st['counts'])}")
    results.mkdir(parents=True, exist_ok=True)
    (results / "settings.json").write_text(json.dumps(st, indent=1) + "\n")
    for stage in stages:
        while True:                             # the sweep grows once its grid is done
            done = {r["id"] for r in read(results, stage) if r["status"] == "done"}   # failed runs run again
            todo = [r for r in plan(results, stage, st, args.setting) if r["id"] not in done]
            print(f"stage {stage}: {len(done)} runs done, {len(todo)} to do")
            if args.plan:
                for r in todo:
                    print(f"  {r['id']}  rank {r['rank']}")
                break
            if not todo:
                break
            started = 0
            for r in todo:
                if args.budget is not None and time.perf_counter() - t_start > args.budget:
                    print(f"budget of {args.budget:.0f} s spent; run again to continue")
                    return 0
                if not claim(claims, r["id"]):
                    continue                    # another process runs it (or ran it in this batch)
                started += 1
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
                    rec = summarize(r, out, time.perf_counter() - t0) if rc == 0 else dict(r, status=f"exit {rc}")
                    rec["side_by_side"] = claims is not None     # its times shared the GPU with other runs
                except (OSError, ValueError, KeyError) as e:
                    rec = dict(r, status=f"error: {type(e).__name__}: {e}")
                if rc != 0:
                    print((out / "log.txt").read_text()[-2000:])
                with open(results / f"{stage}{'-' + args.tag if args.tag else ''}.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"=== {r['id']}: {rec['status']}, held-out {rec.get('heldout_final')}, "
                      f"accuracy {rec.get('accuracy')}, {time.perf_counter() - t0:.1f} s", flush=True)
            if stage not in ("sweep", "shapes_sweep") or not started:
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
