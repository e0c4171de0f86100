"""A jitted LoRA train step on an 8-device mesh equals the one-device step (Explicit and Auto meshes).

Each run happens in its own process, since the simulated device count must be
set before jax is imported.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).parent / "sharded_step.py"


@pytest.fixture(scope="module", params=["explicit", "auto"])
def report(request):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(SCRIPT), request.param], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_sharded_step_equals_single_device(report, framework):
    assert report["devices"] == 8
    r = report[framework]
    assert r["adapter_max_abs_diff"] < 1e-6
    assert r["opt_state_max_abs_diff"] < 1e-6
    assert abs(r["loss_1"] - r["loss_8"]) < 1e-5


def test_adapter_shardings_follow_the_kernels(report):
    # column-parallel kernel P(None, 'model'): a replicated, b follows the output axis
    linen = report["linen"]["lp"]["params"]["up"]["kernel"]
    assert linen == {"a": "P(None, None)", "b": "P(None, 'model')"}
    # row-parallel kernel P('model', None): a follows the input axis, b replicated
    nnx = report["nnx"]["lp"]["down"]["kernel"]
    assert nnx == {"a": "P('model', None)", "b": "P(None, None)"}
    for framework in ("linen", "nnx"):
        assert report[framework]["lp"] == report[framework]["lp_in"]  # unchanged by the update
        assert report[framework]["state_stable"]
