"""benchmarks/adapter_layer.py on CPU: each method's row, and the ceilings table's arithmetic."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from kpsvd import factor_shape

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))                   # adapter_layer imports train_step from there
spec = importlib.util.spec_from_file_location("adapter_layer", ROOT / "benchmarks" / "adapter_layer.py")
al = importlib.util.module_from_spec(spec)
spec.loader.exec_module(al)


def test_runs_on_cpu_and_writes_the_ceilings(tmp_path):
    out = tmp_path / "a.json"
    rows, ceilings = al.main(["--device=cpu", "--dtype=float32", "--tokens=32", "--shapes=64x64,96x64",
                              "--ranks=1,2", "--methods=frozen,soka_ref,lora", "--warmup=1", "--repeat=2",
                              "--gemm-size=64", f"--out={out}"])
    saved = json.loads(out.read_text())
    assert [(r["d_out"], r["method"], r["r"]) for r in saved["results"]] == [
        (d, meth, None if meth == "frozen" else r) for d in (64, 96)
        for r, meths in ((1, ("frozen", "soka_ref", "lora")), (2, ("soka_ref", "lora"))) for meth in meths]
    assert saved["ceilings"] == ceilings and len(ceilings) == 4
    for r in rows:
        if r["method"] == "soka_ref":                 # SoKALinear's reference path, autograd through kron_apply
            m, n, p, q = factor_shape(r["d_out"], r["d_in"])
            assert r["factors"] == [m, n, p, q] and r["trainable"] == r["r"] * (m * n + p * q + 1)
            assert r["flop_ratio"] == pytest.approx(1 + 3 * r["r"] * n * p * (q + m) / (2 * r["d_out"] * r["d_in"]))
            assert r["saved_mib"] > 0                   # it keeps Z = X Vᵀ for backward
    for c in ceilings:
        assert c["frozen_ms"] > 0 and 0 < c["gflop_added"]["least"] < c["gflop_added"]["fused"]
        # the bound meets the target exactly when the needed GEMM rate is at most the measured one
        assert (c["least_x_frozen"] <= 1.10) == (c["needs_pct_gemm"]["least"] <= 100)


def test_ceilings_at_the_7b_shape():
    # 4096², r = 8, 4096 tokens: LEAST adds 8·3·(64·64·128) multiply-adds per token
    (c,) = al.ceiling_rows({(4096, 4096): 0.35}, [8], 4096, rate=800e12, target=1.10)
    added = 2 * 4096 * 8 * 3 * 64 * 64 * 128
    assert c["gflop_added"]["least"] == pytest.approx(added / 1e9)
    assert c["least_x_frozen"] == pytest.approx(1 + added / 800e12 / 0.35e-3)
    assert c["needs_pct_gemm"]["least"] == pytest.approx(100 * added / (0.10 * 0.35e-3) / 800e12)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="a CUDA device is here: the fused kernels compile, not run under Triton's interpreter")
def test_fused_method_runs_under_the_interpreter(tmp_path):
    rows, _ = al.main(["--device=cpu", "--dtype=float32", "--tokens=8", "--shapes=32x32", "--ranks=1",
                       "--methods=frozen,soka_fused,soka_ref", "--warmup=0", "--repeat=1", "--gemm-size=32",
                       f"--out={tmp_path / 'a.json'}"])
    by = {r["method"]: r for r in rows}
    assert set(by) == {"frozen", "soka_fused", "soka_ref"}
    assert by["soka_fused"]["trainable"] == by["soka_ref"]["trainable"] > 0
    assert by["soka_fused"]["flop_ratio"] > by["soka_ref"]["flop_ratio"] > 1     # 8 small products against 6


def test_unknown_methods_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        al.main(["--device=cpu", "--methods=frozen,soka_v2", f"--out={tmp_path / 'a.json'}"])
