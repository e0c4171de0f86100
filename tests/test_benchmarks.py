"""Smoke tests: the benchmark scripts run end to end at tiny sizes, so they never rot.

They check structure and the size-independent invariants (no ``d x d`` dot in the
factored LoRA steps, equal losses at step 0), not the performance bounds, which
only hold at the benchmark's default sizes. torch is never needed.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name):
    if str(BENCHMARKS) not in sys.path:  # the scripts import their shared benchmarks/_machine.py
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load("bench_lora")


# d=64 with 2 x 48 = 96 tokens (not 64, so a [tokens, d] activation never looks like a d x d matrix)
TINY = ["--d", "64", "--layers", "2", "--batch", "2", "--seq", "48", "--rank", "4", "--runs", "1", "--warmup", "0"]


def test_bench_lora_tiny(bench, tmp_path, capsys):
    out = tmp_path / "lora.json"
    assert bench.main([*TINY, "--no-torch", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| family" in printed and "lowrank_jax LoRA (factored)" in printed

    result = json.loads(out.read_text())
    assert result["config"]["d"] == 64 and result["config"]["tokens"] == 96
    assert result["command"].startswith("python benchmarks/bench_lora.py")
    rows = {(r["family"], r["variant"]): r for r in result["rows"]}
    assert set(rows) == {
        ("linen", "full FT"), ("linen", "lowrank_jax LoRA (factored)"), ("linen", "merge W + sAB, then call"),
        ("linen-scan", "full FT"), ("linen-scan", "lowrank_jax LoRA (factored)"),
        ("nnx", "full FT"), ("nnx", "flax nnx.LoRALinear"), ("nnx", "lowrank_jax LoRA (lrj.nnx)"),
    }
    for r in rows.values():
        assert r["flops"] > 0 and r["temp_bytes"] >= 0 and r["time_s"] > 0
        assert np.isfinite(r["loss"])
        assert {"flops_ratio", "mem_ratio", "total_mem_ratio", "time_ratio"} <= set(r)
    for family in ("linen", "linen-scan", "nnx"):
        base = rows[(family, "full FT")]
        assert base["flops_ratio"] == 1.0 and base["square_dots"] > 0
    # the factored steps never form a d x d matrix (no full weight gradient); the merge step does
    for key in [("linen", "lowrank_jax LoRA (factored)"), ("linen-scan", "lowrank_jax LoRA (factored)"),
                ("nnx", "flax nnx.LoRALinear"), ("nnx", "lowrank_jax LoRA (lrj.nnx)")]:
        assert rows[key]["square_dots"] == 0, key
        assert rows[key]["flops_ratio"] < 1.0, key
        assert rows[key]["trainable_params"] == 2 * 2 * 64 * 4, key
    assert rows[("linen", "merge W + sAB, then call")]["square_dots"] >= 2 * 2
    # the loop-unrolled twin of the scanned steps counts every layer
    assert rows[("linen-scan", "full FT")]["flops_unrolled"] > rows[("linen-scan", "full FT")]["flops"]
    # b = 0 at init: every LoRA variant computes the base model's loss
    for family, variant in [("linen", "lowrank_jax LoRA (factored)"), ("linen", "merge W + sAB, then call"),
                            ("linen-scan", "lowrank_jax LoRA (factored)"), ("nnx", "lowrank_jax LoRA (lrj.nnx)")]:
        np.testing.assert_allclose(rows[(family, variant)]["loss"], rows[(family, "full FT")]["loss"], rtol=1e-5)
    assert result["checks"][0].startswith("checks skipped")


def test_bench_lora_checks_and_table(bench):
    def row(family, variant, flops, temp=10, out=5, baseline=False, **extra):
        return {"family": family, "variant": variant, "baseline": baseline, "flops": flops, "temp_bytes": temp,
                "output_bytes": out, "argument_bytes": 1, "alias_bytes": 0, "square_dots": 0,
                "time_s": flops / 100, "times_s": [flops / 100], "trainable_params": 1, **extra}

    rows = bench.add_ratios([
        row("linen", "full FT", 100.0, baseline=True, square_dots=6),
        row("linen", "lowrank_jax LoRA (factored)", 68.0),
        row("linen", "merge W + sAB, then call", 101.0, square_dots=12),
        row("linen-scan", "full FT", 20.0, baseline=True, flops_unrolled=100.0),
        row("linen-scan", "lowrank_jax LoRA (factored)", 16.0, flops_unrolled=85.0),
        {"family": "torch", "variant": "full FT", "baseline": True, "time_s": 2.0, "times_s": [2.0]},
        {"family": "torch", "variant": "peft LoRA", "baseline": False, "time_s": 1.0, "times_s": [1.0]},
    ])
    checks = bench.check_expectations(rows)
    assert "PASS: linen / lowrank_jax LoRA (factored): flops_ratio = 0.680 <= 0.7" in checks
    assert "FAIL: linen-scan / lowrank_jax LoRA (factored): flops_unrolled_ratio = 0.850 <= 0.8" in checks
    assert rows[-1]["time_ratio"] == 0.5
    table = bench.format_table(rows)
    assert "20.00" not in table and "0.00 (0.00)" in table and "0.800 (0.850)" in table


def test_bench_lora_without_torch(bench, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    monkeypatch.setitem(sys.modules, "peft", None)
    rows, note = bench.run_torch(bench.Config(d=8, batch=1, seq=4, rank=2, runs=1, warmup=0))
    assert rows == [] and "skipped" in note


def test_bench_lora_square_dots(bench):
    hlo = """
  %dot.1 = f32[64,64]{1,0} dot(%a, %b), lhs_contracting_dims={0}, rhs_contracting_dims={0}
  %dot.2 = f32[96,64]{1,0} dot(%a, %c), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %fusion = f32[6,64,64]{2,1,0} fusion(%x), kind=kLoop
  %dot.3 = f32[64,4]{1,0} dot(%a, %d), lhs_contracting_dims={0}, rhs_contracting_dims={0}
"""
    assert bench.square_dots(hlo, 64) == 1


def test_bench_lora_fa_tiny(tmp_path, capsys):
    bench_fa = load("bench_lora_fa")
    out = tmp_path / "lora_fa.json"
    assert bench_fa.main([*TINY, "--no-scan", "--out", str(out)]) == 0
    assert "| family" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["command"].startswith("python benchmarks/bench_lora_fa.py")
    rows = {r["variant"]: r for r in result["rows"] if r["family"] == "linen"}
    base, old, frozen = rows["LoRA + adamw"], rows["LoRA-FA, A trainable"], rows["LoRA-FA, lrj.freeze(a)"]
    # freezing A skips its gradient: fewer FLOPs than LoRA + adamw and than LoRA-FA with A trainable
    assert frozen["flops"] < base["flops"] and frozen["flops"] < old["flops"]
    assert frozen["jaxpr_factor_grad_dots"] == 2 == old["jaxpr_factor_grad_dots"] // 2  # dB only, 2 layers
    assert frozen["trainable_params"] == 2 * 4 * 64 and base["trainable_params"] == 2 * 2 * 4 * 64
    np.testing.assert_allclose(frozen["loss"], base["loss"], rtol=1e-6)  # b = 0 at init: same loss


def test_bench_methods_tiny(tmp_path, capsys):
    bench_m = load("bench_methods")
    out = tmp_path / "methods.json"
    argv = ["--tiny", "--batch", "1", "--seq", "8", "--runs", "1", "--warmup", "0", "--methods", "bitfit,lora_fa"]
    assert bench_m.main([*argv, "--out", str(out)]) == 0
    assert "| method" in capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == ["lora", "bitfit", "lora_fa"]
    lora, fa = rows["lora"], rows["lora_fa"]
    assert rows["bitfit"]["status"] == "n/a (no biases)"  # the tiny LLaMA, like SmolLM2, has no bias
    # attention preset, 3 layers, hidden 64, kv 32: r (in + out) per q, k, v, o
    assert lora["trainable_params"] == 3 * 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64))
    assert fa["trainable_params"] == 3 * 8 * (64 + 32 + 32 + 64) and fa["frozen_adapter_params"] == 3 * 8 * 64 * 4
    assert lora["params_x_lora"] == lora["flops_x_lora"] == lora["time_x_lora"] == 1.0
    for r in (lora, fa):
        assert r["flops"] > r["flops_scanned"] > 0 and r["temp_bytes"] > 0 and r["time_s"] > 0
        np.testing.assert_allclose(r["loss_step0"], lora["loss_step0"], rtol=1e-6)  # all start from the base model
    assert fa["flops"] < lora["flops"]  # no gradient of the frozen a
