"""Smoke tests: bench_dora.py and bench_pissa.py run end to end on a tiny random LLaMA (no model package).

They check structure and the size-independent invariants (equal step-0 losses of LoRA,
DoRA and full fine-tuning; DoRA costs more FLOPs than LoRA; the exact PiSSA init is the
Eckart-Young optimum and no fast init beats it), not the measured ratios, which only
mean something at the benchmarks' default sizes.
"""

import json

import numpy as np
import pytest
from test_benchmarks import load


@pytest.fixture(scope="module")
def bench_dora():
    return load("bench_dora")


@pytest.fixture(scope="module")
def bench_pissa():
    return load("bench_pissa")


def test_bench_dora_tiny(bench_dora, tmp_path, capsys):
    out = tmp_path / "dora.json"
    args = ["--tiny", "--batch", "2", "--seq", "16", "--runs", "1", "--warmup", "0", "--out", str(out)]
    assert bench_dora.main(args) == 0
    printed = capsys.readouterr().out
    assert "| variant" in printed and "step-0 loss" in printed

    result = json.loads(out.read_text())
    assert result["command"].startswith("python benchmarks/bench_dora.py --tiny")
    assert result["config"]["tokens"] == 32 and result["config"]["num_hidden_layers"] == 3
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"LoRA (factored)", "DoRA (detach_norm=True)", "DoRA (detach_norm=False)",
                         "full fine-tuning"}
    lora, dora, full = rows["LoRA (factored)"], rows["DoRA (detach_norm=True)"], rows["full fine-tuning"]
    for r in rows.values():
        assert r["flops"] > 0 and r["temp_bytes"] >= 0 and r["argument_bytes"] > 0 and r["time_s"] > 0
        assert len(r["times_s"]) == 1 and np.isfinite(r["loss_step0"])
        # the unscanned twin counts all 3 blocks; the scanned program counts its loop body once
        assert r["flops_unrolled"] > r["flops"]
        assert {"flops_x_lora", "total_x_lora", "time_x_lora", "flops_x_full", "time_x_full"} <= set(r)
    assert lora["flops_x_lora"] == 1.0 and full["flops_x_full"] == 1.0
    # DoRA = LoRA + one magnitude per output unit of each of the 7 x 3 kernels
    outputs = 3 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    assert dora["trainable_params"] == lora["trainable_params"] + outputs
    assert dora["flops_unrolled"] > lora["flops_unrolled"]
    assert rows["DoRA (detach_norm=False)"]["flops_unrolled"] >= dora["flops_unrolled"]
    # b = 0 at init: LoRA and DoRA (g = m / ||W|| = 1) compute the base model's loss
    for r in rows.values():
        np.testing.assert_allclose(r["loss_step0"], lora["loss_step0"], rtol=1e-5)
    assert result["loss_check"]["max_abs_difference_adapters"] <= 1e-5 * abs(lora["loss_step0"])


def test_bench_pissa_tiny(bench_pissa, tmp_path, capsys):
    out = tmp_path / "pissa.json"
    assert bench_pissa.main(["--tiny", "--niters", "2", "--runs", "1", "--out", str(out)]) == 0
    assert "| rank" in capsys.readouterr().out

    result = json.loads(out.read_text())
    assert result["config"]["matrices"] == 7 * 3
    rows = {r["init"]: r for r in result["rows"]}
    assert set(rows) == {"pissa", "pissa_niter_2"}
    exact, fast = rows["pissa"], rows["pissa_niter_2"]
    for r in rows.values():
        assert r["rank"] == 8 and r["eager"]["time_s"] > 0 and r["eager"]["first_call_s"] > 0
        assert len(r["per_target_error"]) == 7
        assert all(len(v) == 3 for v in r["per_target_error"].values())
    assert exact["eager"]["time_ratio"] == 1.0
    # exact SVD: the Eckart-Young optimum, matrix by matrix (float32 factors)
    assert abs(exact["excess_over_optimal"]["max"]) < 1e-4
    # no init beats the optimum, and the fast one is no better than the exact one
    assert fast["excess_over_optimal"]["min"] > -1e-4
    for path, errs in fast["per_target_error"].items():
        assert np.all(np.asarray(errs) >= np.asarray(exact["per_target_error"][path]) - 1e-5), path
