"""--fsdp on the CPU: gloo processes, a tiny model in Meta's and Hugging Face's layouts split into
several files. Sharded loading and the KPSVD initialization against one process (spawned workers),
then train.py end to end under torchrun: the same losses and adapter file as one process, and a
resume on another number of processes."""
import faulthandler
import gc
import inspect
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import fsdp_step  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402
from model import ModelArgs, Transformer, load_checkpoint, read_config  # noqa: E402
from soka import adapters, fsdp, runs  # noqa: E402
from soka.checkpoints import meta_to_hf_key, permute_rotary, unpermute_rotary, write_meta_shards  # noqa: E402
from soka.export import hf_config, write_safetensors  # noqa: E402
from soka.steps import all_reduce_grads, loss_sum  # noqa: E402

ALL7 = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1001, multiple_of=32, max_seq_len=256)
INJECT = dict(rank=None, tau=0.9, r_min=1, r_max=4, seed=3)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_meta(folder, state_dict, args, n_files=2):
    """Meta's layout, each split tensor cut along its dimension into n_files consolidated.NN.pth."""
    write_meta_shards(folder, state_dict.items(), args, n_files)


def write_hf(folder, state_dict, args):
    """Hugging Face's layout in two safetensors files and an index, wq/wk rows in HF's order."""
    folder.mkdir(parents=True)
    tensors = {}
    for k, t in state_dict.items():
        heads = args.n_heads if k.endswith("wq.weight") else args.n_kv_heads if k.endswith("wk.weight") else 0
        tensors[meta_to_hf_key(k)] = permute_rotary(t, heads) if heads else t
    names = sorted(tensors)
    files = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, part in files.items():
        write_safetensors(folder / f, {n: tensors[n] for n in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: f for f, part in files.items() for n in part}}))
    (folder / "config.json").write_text(json.dumps(hf_config(args, torch.float32)))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, small_data):
    """The same random tiny model as a two-file Meta folder and a two-file HF folder, with a tokenizer."""
    d = tmp_path_factory.mktemp("fsdp")
    torch.manual_seed(0)
    sd = Transformer(ARGS).state_dict()
    write_meta(d / "meta", sd, ARGS)
    write_hf(d / "hf", sd, ARGS)
    for f in ("meta", "hf"):
        shutil.copy(small_data / "llama2-tokenizer" / "tokenizer.model", d / f / "tokenizer.model")
    return d


# ----------------------------------------------------------------------------- no processes

def test_rows_read_joins_meta_parts_and_puts_hf_rows_in_meta_order():
    full = torch.arange(7 * 6, dtype=torch.float32).reshape(7, 6)
    by_rows = fsdp.Rows(list(full.split([3, 2, 2])), dim=0)      # parts of 3, 2, 2 rows
    by_cols = fsdp.Rows(list(full.split([4, 2], dim=1)), dim=1)
    for a, b in [(0, 7), (2, 5), (3, 3), (5, 7), (6, 7)]:
        for rows in (by_rows, by_cols):
            got = rows.read(a, b, device="cpu", dtype=torch.float64)
            assert got.dtype == torch.float64 and torch.equal(got, full[a:b].double()), (a, b)
    w = torch.randn(16, 3)
    hf = fsdp.Rows([permute_rotary(w, 2)], index=unpermute_rotary(torch.arange(16)[:, None], 2)[:, 0])
    assert torch.equal(hf.read(5, 13, device="cpu", dtype=w.dtype), w[5:13])
    out = by_rows.read(0, 3, device="cpu", dtype=torch.float32)
    out += 1                                                      # a copy, never the file's memory
    assert torch.equal(by_rows.parts[0], full[:3])


def test_the_shard_table_is_model_py_s_and_loading_a_gguf_is_refused(tmp_path):
    assert fsdp.SHARD_DIM is model.SHARD_DIM          # one table: soka/checkpoints.py
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="reads a Meta or Hugging Face folder, not a GGUF file"):
        read_config(tmp_path / "m.gguf")
    for argv, message in ((["--fsdp"], "--fsdp trains a model read from a Meta or Hugging Face folder"),
                          (["--fsdp", "--ckpt", "x", "--eval-only"], "--eval-only and the demo model")):
        with pytest.raises(SystemExit, match=message):
            runs.check_options(train.make_parser().parse_args(argv), train.given_options(argv))


def test_sharded_loading_checks_the_layer_count_before_building_the_model(ckpts, tmp_path):
    # a params.json asking for 20,000 layers of a 2-layer checkpoint: refused before the meta model is built
    folder = tmp_path / "meta"
    shutil.copytree(ckpts / "meta", folder)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "n_layers": 20000}))
    args, _ = read_config(folder)
    built = []
    with pytest.raises(ValueError, match=rf"the config says 20000 layers, the checkpoint holds {ARGS.n_layers} "):
        fsdp.load_sharded(lambda a: built.append(a), args, fsdp.checkpoint_weights(folder, args), mesh=None,
                          device=torch.device("cpu"), dtype=torch.float32, source=str(folder), **INJECT)
    assert built == []


def test_a_resume_on_another_number_of_processes_keeps_the_micro_batches(tmp_path, monkeypatch):
    saved = vars(train.make_parser().parse_args(["--batch-size", "2", "--grad-accum", "2"]))
    (tmp_path / "config.json").write_text(json.dumps({**saved, "out": str(tmp_path), "world": 2, "fsdp": True}))
    defaults, kinds = vars(train.make_parser().parse_args([])), train.option_kinds()
    for world, accum in ((1, 4), (4, 1)):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        cfg = runs.resumed_config(tmp_path, {}, defaults, kinds)
        assert cfg.grad_accum * world * cfg.batch_size == 8 and cfg.grad_accum == accum
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match="4 micro-batches per step do not split over 3 processes"):
        runs.resumed_config(tmp_path, {}, defaults, kinds)
    (tmp_path / "config.json").write_text(json.dumps({**saved, "out": str(tmp_path), "world": 2, "fsdp": False}))
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit, match="the run had 2 processes, this one has 1"):   # data parallel: as before
        runs.resumed_config(tmp_path, {}, defaults, kinds)
    assert runs.resumed_config(tmp_path, {"fsdp": True}, defaults, kinds).grad_accum == 4


def test_modelled_memory_is_the_parameter_arithmetic():
    """benchmarks/fsdp_step.py --model-memory: the counts and the per-GPU split it prints."""
    p7 = fsdp_step.param_counts(fsdp_step.SHAPES["7b"])
    assert p7["total"] == 6_738_415_616                      # LLaMA-2-7B's published count
    assert fsdp_step.param_counts(fsdp_step.SHAPES["70b"])["total"] == 68_976_648_192
    one, eight = (fsdp_step.model_memory("70b", w, "fsdp") for w in (1, 8))
    assert eight["base"] == pytest.approx(one["base"] / 8) and one["base"] == pytest.approx(68_976_648_192 * 2 / 2**30)
    assert fsdp_step.model_memory("70b", 8, "ddp")["base"] == one["base"]     # DDP: the whole base on each
    assert not fsdp_step.model_memory("70b", 1, "fsdp")["fits"] and fsdp_step.model_memory("70b", 4, "fsdp")["fits"]


def test_end_distributed_frees_the_group_a_dropped_sharded_model_held(ckpts):
    def build():                          # the model dies with this frame, but in reference cycles
        net, _ = fsdp.load_sharded(Transformer, ARGS, fsdp.checkpoint_weights(ckpts / "meta", ARGS),
                                   mesh=fsdp.device_mesh(torch.device("cpu")), device=torch.device("cpu"),
                                   dtype=torch.float32, method="lora", targets=("wq",), rank=2)
        return dist.group.WORLD
    group = build()
    assert "FSDPMeshInfo" in {type(r).__name__ for r in gc.get_referrers(group)}
    runs.end_distributed()
    assert not dist.is_initialized()
    assert all(inspect.isframe(r) for r in gc.get_referrers(group)), gc.get_referrers(group)


# ----------------------------------------------------------------------------- spawned processes

class Logged(fsdp.Rows):
    """A Rows that notes which rows are read."""

    def __init__(self, rows, key, log):
        self.__dict__.update(rows.__dict__)
        self.key, self.log = key, log

    def read(self, a, b, **kw):
        self.log.add((self.key, a, b))
        return super().read(a, b, **kw)


def _same_blob(a, b, where="adapter"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same_blob(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, where


def _worker(rank, world, port, folder):
    faulthandler.enable()                 # a crash in torch's C++ prints where Python was
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    _checks(rank, world, folder)
    runs.end_distributed()                # after _checks' sharded models are gone


def _checks(rank, world, folder):
    """Each process: sharded load + KPSVD init against one process's load + inject, bit for bit; which
    rows it read; gradients of half the batch, summed, against the whole batch's; the adapter file;
    loading that file back (and a wrong base refused on every process)."""
    cpu = torch.device("cpu")
    mesh = fsdp.device_mesh(cpu)
    ref, _ = load_checkpoint(folder / "meta")
    ref_report = adapters.inject(ref, "soka", ALL7, impl="reference", verbose=False, **INJECT)
    ref_params = dict(ref.named_parameters())
    log = set()
    weights = {k: Logged(r, k, log) for k, r in fsdp.checkpoint_weights(folder / "meta", ARGS).items()}
    net, report = fsdp.load_sharded(Transformer, ARGS, weights, mesh=mesh, device=cpu, dtype=torch.float32,
                                    method="soka", targets=ALL7, impl="reference", **INJECT)
    assert json.dumps(report, default=list) == json.dumps(ref_report, default=list)

    def check_equal(m, one=ref):
        shards, params = 0, dict(one.named_parameters())
        for name, p in m.named_parameters():
            if isinstance(p, torch.distributed.tensor.DTensor):
                a, b = fsdp.local_rows(p)
                assert torch.equal(p.to_local(), params[name][a:b]), name
                shards += 1
            else:                                              # a factor: replicated, float32
                assert p.requires_grad and p.dtype == torch.float32 and torch.equal(p, params[name]), name
        for name, t in m.named_buffers():
            assert torch.equal(t, dict(one.named_buffers())[name]), name
        return shards
    assert check_equal(net) == len(ARGS.linear_shapes()) * ARGS.n_layers + 2 * ARGS.n_layers + 3

    # this process read its rows of every tensor, and the whole of the adapted weights it owns
    want = set()
    for name, p in net.named_parameters():
        if isinstance(p, torch.distributed.tensor.DTensor):
            want.add((name, *fsdp.local_rows(p)))
    for i, (name, layer) in enumerate(adapters.adapter_layers(net)):
        if i % world == rank:
            want.add((name + ".weight", 0, layer.d_out))
    assert log == want

    # the HF folder's two files give the same shards
    hf_args, _ = read_config(folder / "hf")
    hf, _ = fsdp.load_sharded(Transformer, hf_args, fsdp.checkpoint_weights(folder / "hf", hf_args), mesh=mesh,
                              device=cpu, dtype=torch.float32, method="soka", targets=ALL7, impl="reference", **INJECT)
    check_equal(hf)

    # PiSSA (its SVD made once, W − B A subtracted from each process's rows) and LoRA
    for method in ("pissa", "lora"):
        one, _ = load_checkpoint(folder / "meta")
        want = adapters.inject(one, method, ("wq", "w2"), rank=2, verbose=False)
        got_model, got = fsdp.load_sharded(Transformer, ARGS, fsdp.checkpoint_weights(folder / "meta", ARGS),
                                           mesh=mesh, device=cpu, dtype=torch.float32, method=method,
                                           targets=("wq", "w2"), rank=2)
        assert json.dumps(got, default=list) == json.dumps(want, default=list)
        check_equal(got_model, one)

    # gradients: each process half of the batch, summed, against the whole batch in one process
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ARGS.vocab_size, (4, 24), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    n_tok = float((labels[:, 1:] != -100).sum())
    (loss_sum(ref, ids, labels) / n_tok).backward()
    mine = slice(rank * 4 // world, (rank + 1) * 4 // world)
    loss = loss_sum(net, ids[mine], labels[mine]) / n_tok
    loss.backward()
    loss = loss.detach().double()
    trainable = [p for p in net.parameters() if p.requires_grad]
    all_reduce_grads(trainable, loss)
    torch.testing.assert_close(loss.float(), (loss_sum(ref, ids, labels) / n_tok).detach(), rtol=1e-6, atol=0)
    for name, p in net.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-5, atol=1e-8)

    # the adapter file rank 0 writes is one process's; it loads back into sharded models
    if rank == 0:
        adapters.save_adapter(net, folder / "fsdp.pt")
        adapters.save_adapter(ref, folder / "one.pt")
    dist.barrier()
    _same_blob(torch.load(folder / "fsdp.pt", weights_only=True), torch.load(folder / "one.pt", weights_only=True))
    back, _ = fsdp.load_sharded(Transformer, ARGS, fsdp.checkpoint_weights(folder / "meta", ARGS), mesh=mesh,
                                device=cpu, dtype=torch.float32, adapter=folder / "one.pt", impl="reference")
    check_equal(back)
    if rank == 0:
        blob = torch.load(folder / "one.pt", weights_only=True)
        blob["layers"]["layers.1.attention.wv"]["info"]["base"]["sha256"] = "0" * 64
        torch.save(blob, folder / "wrong.pt")
    dist.barrier()
    try:                                  # only one process owns that layer; every process raises
        fsdp.load_sharded(Transformer, ARGS, fsdp.checkpoint_weights(folder / "meta", ARGS), mesh=mesh, device=cpu,
                          dtype=torch.float32, adapter=folder / "wrong.pt", impl="reference")
        raise AssertionError("a wrong base was accepted")
    except ValueError as e:
        assert "base weight layers.1.attention.wv differs" in str(e), e


def test_sharded_loading_and_kpsvd_init_equal_one_process(ckpts):
    mp.spawn(_worker, args=(2, free_port(), ckpts), nprocs=2, join=True)


# ----------------------------------------------------------------------------- train.py, torchrun

FAST = ["--task", "gsm8k", "--device", "cpu", "--batch-size", "2", "--max-len", "96", "--heldout", "5",
        "--eval-every", "2", "--eval-limit", "0", "--lr", "1e-2", "--targets", "wq,wv,w2", "--max-steps", "3"]


def run(*args, nproc=None):
    cmd = [sys.executable, str(ROOT / "train.py"), *map(str, args)]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
               str(free_port()), *cmd[1:]]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, f"{cmd} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_run(a, b):
    """Two runs' steps and adapter files agree: losses and gradient norms to float32 rounding."""
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [1, 2, 3]
    for ra, rb in zip(ma, mb):
        assert ra["tokens"] == rb["tokens"] and ra["lr"] == rb["lr"]
        for k in ("loss", "grad_norm", "heldout_loss"):
            assert (ra[k] is None) == (rb[k] is None) and (ra[k] is None or math.isclose(ra[k], rb[k], rel_tol=1e-5)), k
    fa, fb = (torch.load(f / "adapter.pt", weights_only=True) for f in (a, b))
    assert fa["options"] == fb["options"] and fa["layers"].keys() == fb["layers"].keys()
    for name, rec in fa["layers"].items():
        assert rec["info"] == fb["layers"][name]["info"], name            # ranks, factors, base fingerprints
        for group in ("params", "init"):
            for k, t in rec[group].items():
                torch.testing.assert_close(t, fb["layers"][name][group][k], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def two_process_fsdp_run(ckpts, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "fsdp2"
    p = run(*FAST, "--data-dir", small_data, "--ckpt", ckpts / "meta", "--out", out, "--fsdp", nproc=2)
    return out, p.stdout


def test_an_fsdp_run_of_two_processes_equals_one_process(ckpts, small_data, tmp_path, two_process_fsdp_run):
    out, stdout = two_process_fsdp_run
    assert "2 processes" in stdout and "FSDP: the frozen base sharded, the adapters replicated" in stdout
    run(*FAST, "--data-dir", small_data, "--ckpt", ckpts / "meta", "--out", tmp_path / "one", "--grad-accum", 2)
    same_run(tmp_path / "one", out)
    assert json.loads((out / "config.json").read_text())["fsdp"] is True


def test_an_fsdp_run_resumes_on_one_process_as_if_uninterrupted(ckpts, small_data, tmp_path, two_process_fsdp_run):
    out = tmp_path / "cut"
    run(*FAST, "--data-dir", small_data, "--ckpt", ckpts / "meta", "--out", out, "--fsdp", "--stop-after", 2, nproc=2)
    assert len(metrics(out)) == 2 and not (out / "adapter.pt").exists()
    p = run("--resume", out)                                      # one process, still --fsdp (saved)
    assert "1 process," in p.stdout and "resumed at step 2" in p.stdout
    same_run(two_process_fsdp_run[0], out)
    config = json.loads((out / "config.json").read_text())
    assert (config["world"], config["grad_accum"], config["fsdp"]) == (1, 2, True)
