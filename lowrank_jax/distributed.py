"""Multi-process training with JAX's multi-controller runtime (``jax.distributed``), also on CPU.

One Python process per host (or, on this machine, per CPU device), all running the same
program; XLA SPMD does the rest. On CPU the collectives go through gloo
(``jax_cpu_collectives_implementation = "gloo"``), so a 2-process run on 127.0.0.1 is a
real distributed run. Nothing here launches processes: start them yourself (a shell loop,
``srun``, a TPU pod's runtime) with the same coordinator address and distinct ids.

* :func:`initialize` checks the ids, waits for the coordinator within a bounded time (a
  clear ``TimeoutError`` instead of a hang) and calls ``jax.distributed.initialize``.
* :func:`process_rows` / :func:`global_batch` give each process its contiguous rows of the
  global batch and assemble them into one global ``jax.Array``
  (``jax.make_array_from_process_local_data``), so every process feeds only its shard.

Reference: https://docs.jax.dev/en/latest/multi_process.html
"""

from __future__ import annotations

import socket
import time

import jax
import numpy as np
from jax.sharding import NamedSharding

from lowrank_jax.run_config import parse_address  # re-exported: checked with the options, without jax

__all__ = ["global_batch", "initialize", "parse_address", "process_rows"]


def _wait_for(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(1.0, timeout_s)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"coordinator {host}:{port} unreachable after {timeout_s:g} s ({e}); is process 0 "
                                   f"running with the same --coordinator?") from None
            time.sleep(0.2)


def initialize(coordinator: str, num_processes: int, process_id: int, *, timeout_s: float = 60.0,
               cpu_collectives: str = "gloo") -> None:
    """``jax.distributed.initialize`` with checked arguments and a bounded wait.

    Args:
      coordinator: ``"HOST:PORT"`` of process 0 (which serves it).
      num_processes: the number of processes, ``>= 1``.
      process_id: this process's id in ``[0, num_processes)``.
      timeout_s: how long a process other than 0 waits for the coordinator to accept a
        connection, and the runtime's initialisation timeout.
      cpu_collectives: ``jax_cpu_collectives_implementation`` for CPU devices (``"gloo"``).

    Raises:
      ValueError: a malformed address, ``num_processes < 1``, or ``process_id`` out of range.
      TimeoutError: the coordinator did not answer within ``timeout_s``.
    """
    host, port = parse_address(coordinator)
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"`num_processes` must be a positive integer, got {num_processes!r}")
    if isinstance(process_id, bool) or not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"`process_id` must be in [0, {num_processes}), got {process_id!r}")
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if process_id != 0:
        _wait_for(host, port, timeout_s)
    jax.distributed.initialize(coordinator_address=f"{host}:{port}", num_processes=num_processes,
                               process_id=process_id, initialization_timeout=max(1, int(timeout_s)))


def process_rows(batch_size: int, process_index: int | None = None, process_count: int | None = None) -> slice:
    """The contiguous rows ``[i B / P, (i + 1) B / P)`` of a global batch of ``B`` rows for process ``i`` of ``P``.

    Raises:
      ValueError: ``P`` does not divide ``B``.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if batch_size % count:
        raise ValueError(f"global batch {batch_size} is not divisible by the {count} processes")
    per = batch_size // count
    return slice(index * per, (index + 1) * per)


def global_batch(local_rows, sharding: NamedSharding, global_rows: int) -> jax.Array:
    """One global ``jax.Array`` of ``global_rows`` rows from this process's rows (``process_rows``).

    ``sharding`` shards axis 0 over the batch mesh axes; every process passes only its rows,
    in process order (the mesh from ``jax.make_mesh`` orders devices by process).
    """
    local = np.asarray(local_rows)
    return jax.make_array_from_process_local_data(sharding, local, (global_rows,) + local.shape[1:])
