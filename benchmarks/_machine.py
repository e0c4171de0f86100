"""What every benchmark records about the machine and the library versions it ran on."""

from __future__ import annotations

import os
import platform

import jax


def machine() -> dict:
    """CPU model, usable cores, Python, jax (and its backend), flax and optax versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import flax
    import optax

    return {
        "cpu": cpu,
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "flax": flax.__version__,
        "optax": optax.__version__,
    }
