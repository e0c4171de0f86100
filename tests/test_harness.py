"""Every adapter (``adapter_harness.CASES``) through the same checks (``adapter_harness.CHECKS``)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

import adapter_harness as harness

WORKER = pathlib.Path(__file__).parent / "harness_devices.py"


def cases(check: str):
    """The cases as pytest params, a case's ``xfail[check]`` as a strict xfail."""
    return [pytest.param(c, id=c.name, marks=[pytest.mark.xfail(strict=True, reason=c.xfail[check])] if check in c.xfail else [])
            for c in harness.CASES]


@pytest.mark.parametrize("case", cases("jit"))
def test_jit_equals_eager(case):
    harness.check_jit(case)


@pytest.mark.parametrize("case", cases("nnx"))
def test_linen_equals_nnx(case):
    if case.models.nnx is None:
        pytest.skip("the case has no NNX model")
    harness.check_nnx(case)


@pytest.mark.parametrize("case", cases("scan"))
def test_scan_remat_equals_unrolled(case):
    if case.models.scanned is None:
        pytest.skip("the case has no scanned model")
    harness.check_scan(case)


@pytest.mark.parametrize("case", cases("merge"))
def test_factored_equals_merged_and_unmerge_round_trips(case):
    harness.check_merge(case)


@pytest.mark.parametrize("case", cases("split"))
def test_split_join_gradients_and_frozen_leaves(case):
    harness.check_split(case)


@pytest.mark.parametrize("case", cases("dropout"))
def test_dropout(case):
    harness.check_dropout(case)


@pytest.mark.parametrize("case", cases("checkpoint"))
def test_checkpoint_round_trip(case, tmp_path):
    harness.check_checkpoint(case, tmp_path / "ckpt")


MESHES = ("explicit", "auto")


@pytest.fixture(scope="module", autouse=True)
def device_worker(request):
    """Starts the one 8-device subprocess (every case, both meshes) before the first test of this module, so
    it runs beside the in-process checks; ``None`` when no selected test needs it."""
    if not any("device_report" in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield None
        return
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.Popen([sys.executable, str(WORKER)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    yield proc
    if proc.poll() is None:  # the module's tests ended before the worker (e.g. a failure with -x)
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def device_report(device_worker):
    out, err = device_worker.communicate(timeout=600)
    assert device_worker.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("case,mesh", [
    pytest.param(p.values[0], mesh, id=f"{p.id}-{mesh}", marks=p.marks)
    for mesh in MESHES for p in cases(f"devices-{mesh}")
])
def test_eight_devices_equal_one(case, mesh, device_report):
    """8 simulated devices on a ("data", "model") mesh give one device's loss and gradients."""
    if case.models.specs is None:
        pytest.skip("the case has no partition specs")
    r = device_report[case.name][mesh]
    assert "error" not in r, r.get("traceback", r.get("error"))
    assert r["devices"] == 8
    assert any("model" in spec for spec in jax.tree.leaves(r["lp_specs"])), r["lp_specs"]  # really sharded
    assert r["loss"] <= case.tol and r["grads"] <= case.tol, r
