"""Adapter + optimizer checkpoints with orbax: round trip, fresh-process restore, killed saves."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax
import pytest

import lowrank_jax as lrj
from lowrank_jax import checkpoint

WORKER = pathlib.Path(__file__).parent / "checkpoint_worker.py"


def worker(*args, timeout=300):
    proc = subprocess.run([sys.executable, str(WORKER), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_restore_in_a_fresh_process_against_abstract_targets(tmp_path):
    saved = worker("save", tmp_path)
    assert saved["steps"] == [1, 2]  # max_to_keep=2
    restored = worker("restore", tmp_path)
    assert restored["step"] == 2
    assert restored["sums"] == pytest.approx(saved["sums"]["2"], rel=1e-7)
    assert restored["config"]["method"] == "lora" and restored["config"]["rank"] == 4


def test_killed_save_leaves_previous_step_restorable(tmp_path):
    for leaves in (256, 1024):  # enlarge the second save until the kill lands inside it
        directory = tmp_path / f"run{leaves}"
        proc = subprocess.Popen([sys.executable, str(WORKER), "save-then-big", str(directory), str(leaves)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "saved 1"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if any(p.name.startswith("2") and "tmp" in p.name for p in directory.iterdir()):
                break
            time.sleep(0.005)
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        if not (directory / "2").exists():
            break
    else:
        pytest.fail("the second save always finished before the kill")
    restored = worker("restore", directory)
    assert restored["step"] == 1
    mngr = checkpoint.manager(directory)
    assert mngr.all_steps() == [1]


def test_restore_errors_name_the_problem(tmp_path):
    params = {"params": {"q": {"kernel": jnp.ones((8, 4))}}}
    adapter = lrj.lora(rank=2, targets=".*")
    lp = adapter.init(jax.random.key(0), params)
    mngr = checkpoint.manager(tmp_path / "ck")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        checkpoint.restore(mngr, checkpoint.abstract(lp))
    checkpoint.save(mngr, 5, lp)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 3 .* steps: \[5\]"):
        checkpoint.restore(mngr, checkpoint.abstract(lp), step=3)
    with pytest.raises(ValueError, match="has no optimizer state"):
        checkpoint.restore(mngr, checkpoint.abstract(lp), jax.eval_shape(optax.adam(1e-3).init, lp))
    other = adapter.init(jax.random.key(0), {"params": {"k": {"kernel": jnp.ones((8, 4))}}})
    with pytest.raises(ValueError, match="does not fit the restore target"):
        checkpoint.restore(mngr, checkpoint.abstract(other))
    step, back, _, _ = checkpoint.restore(mngr, checkpoint.abstract(lp))
    assert step == 5
    jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)) or pytest.fail("mismatch"), back, lp)
    with pytest.raises(ValueError, match="`max_to_keep` must be >= 1"):
        checkpoint.manager(tmp_path / "x", max_to_keep=0)
