"""Worker for tests/test_harness.py: every harness case on 8 simulated devices vs one, on an Explicit and an Auto mesh.

Usage: ``python tests/harness_devices.py [case ...]`` (default: all of ``adapter_harness.CASES``); prints one JSON line
``{case: {"explicit": {...}, "auto": {...}}}`` of ``adapter_harness.device_diffs``, or ``{"error": ...}`` per failed run.
Runs in its own process: the device count must be set before jax is imported.
"""

import json
import os
import pathlib
import sys
import traceback

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, str(pathlib.Path(__file__).parent))

import jax  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

import adapter_harness as harness  # noqa: E402

MESHES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def main():
    names = sys.argv[1:] or [c.name for c in harness.CASES if c.models.specs is not None]
    report = {}
    for name in names:
        case = harness.CASES_BY_NAME[name]
        report[name] = {}
        for kind, axis_type in MESHES.items():
            mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type, axis_type))
            try:
                report[name][kind] = harness.device_diffs(case, mesh)
            except Exception as e:  # one failing case must not hide the others' results
                report[name][kind] = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
