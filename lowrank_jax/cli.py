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


def _default_text(field) -> str:
    """The default ``--help`` shows for a :class:`FinetuneConfig` field, per method where it depends on it."""
    from lowrank_jax import run_config as rc

    if "default_text" in field.metadata:
        return field.metadata["default_text"]
    if field.default is not None:
        return f"default {field.default}"
    if field.name not in rc.COMMON_DEFAULTS:
        return ""
    special = [f"{m} {d[field.name]}" for m, d in rc.METHOD_DEFAULTS.items() if field.name in d]
    return f"default {rc.COMMON_DEFAULTS[field.name]}" + (f"; {', '.join(special)}" if special else "")


def _finetune_parser(sub) -> argparse.ArgumentParser:
    """``finetune``'s flags, one per :class:`FinetuneConfig` field, with its help and default, the methods
    listed one per line, and ``--config FILE`` (no jax import)."""
    from lowrank_jax.run_config import METHOD_HELP, FinetuneConfig

    width = max(map(len, METHOD_HELP))
    methods = "\n".join(f"  {name:<{width}}  {text}" for name, text in METHOD_HELP.items())
    p = sub.add_parser("finetune", help="fine-tune SmolLM2-135M-Instruct on CPU (defaults: LoRA r=8 on all linear layers)",
                       description="Fine-tune SmolLM2-135M-Instruct on CPU. Every option is checked before the model loads.",
                       epilog=f"methods (--method):\n{methods}", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="a TOML or JSON file of options (keys: the flags' names, e.g. "
                                                   "seq_len or seq-len); flags given on the command line win")
    for field in dataclasses.fields(FinetuneConfig):
        meta = field.metadata
        if field.name == "progress":
            p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
            continue
        flag = "--" + field.name.replace("_", "-")
        shown = _default_text(field)
        help_text = meta["help"] + (f" ({shown})" if shown and "default" not in meta["help"] else "")
        if field.type in ("bool", bool):
            p.add_argument(flag, action="store_true", help=meta["help"])
        else:
            kind = meta.get("type", type(field.default))
            p.add_argument(flag, type=kind, default=field.default, help=help_text)
    return p


def config_file_options(path: str) -> dict:
    """The options of a ``--config`` file (TOML by default, JSON for ``.json``), checked against
    :class:`FinetuneConfig`'s fields and types; :class:`UserError` naming the file and the bad key."""
    import tomllib

    from lowrank_jax.run_config import FinetuneConfig, UserError

    file = pathlib.Path(path)
    if not file.is_file():
        raise UserError(f"--config {path!r} {'is a directory' if file.is_dir() else 'does not exist'}")
    try:
        text = file.read_text(encoding="utf-8")
        values = json.loads(text) if file.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise UserError(f"--config {path!r} is not valid {'JSON' if file.suffix.lower() == '.json' else 'TOML'}: {e}") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path!r} must hold a table of options, not {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
    options = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise UserError(f"--config {path!r}: unknown option {key!r}; options: {', '.join(fields)}")
        kind = fields[name].metadata.get("type", type(fields[name].default))  # as the flag's argparse type
        want = {bool: (bool,), int: (int,), float: (int, float)}.get(kind, (str,))
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, want):
            raise UserError(f"--config {path!r}: {key} = {value!r} must be {' or '.join(t.__name__ for t in want)}")
        options[name] = float(value) if kind is float else value
    return options


def _cmd_finetune(args) -> int:
    from lowrank_jax.run_config import FinetuneConfig, check_run_dir

    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    cfg = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in fields})
    cfg.validate()  # every check that needs no model, before jax is imported and the model loads
    check_run_dir(cfg)
    from lowrank_jax.finetune import finetune

    summary = finetune(cfg)
    shown = {k: summary[k] for k in ("trainable_params", "trainable_percent", "perplexity_before", "perplexity_after",
                                      "loss_first", "loss_last", "step_time_median_s", "tokens_per_s")}
    print(json.dumps(shown, indent=2))
    return 0


def _chat(tokenizer, prompt: str) -> str:
    """``prompt`` as one user turn under the model's own chat template, ready for the assistant's answer."""
    from lowrank_jax import instruct
    from lowrank_jax.run_config import UserError

    try:
        return instruct.render_chat(tokenizer.chat_template, [{"role": "user", "content": prompt}],
                                    add_generation_prompt=True, bos_token=tokenizer.bos_token or "",
                                    eos_token=tokenizer.eos_token or "")
    except ValueError as e:
        raise UserError(f"--chat: {e}") from None


def _check_run(directory: str, flag: str = "--adapter") -> dict:
    """The run config of the finetune output ``directory``, read without jax; one ``error:`` line otherwise."""
    from lowrank_jax import run_config as rc

    path = pathlib.Path(directory)
    if not (path / "checkpoints").is_dir():
        raise rc.UserError(f"{directory} is not a finetune output directory (no checkpoints/ inside)")
    stored = rc.stored_run(path)
    if stored is None:
        raise rc.UserError(f"no checkpoint in {path / 'checkpoints'}")
    return stored[1]


def _prompts(args) -> list[str]:
    from lowrank_jax.run_config import UserError

    if (args.prompt is None) == (args.prompts is None):
        raise UserError("give --prompt TEXT (repeatable) or --prompts FILE (one prompt per line), not both")
    if args.prompts is not None:
        path = pathlib.Path(args.prompts)
        if not path.is_file():
            raise UserError(f"--prompts {args.prompts!r} is not a file")
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"--prompts {args.prompts!r} holds no prompt (one per line)")
        return prompts
    for prompt in args.prompt:
        if not prompt.strip():
            raise UserError("--prompt is empty: give the text to continue")
    return list(args.prompt)


def _cmd_generate(args) -> int:
    """One prompt, or many; with no adapter, one, or several run directories in one mixed batch
    (a bank of LoRA adapters, :func:`lrj.multi_lora`): every prompt under every adapter."""
    from lowrank_jax.run_config import UserError

    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    prompts = _prompts(args)
    runs = list(dict.fromkeys(args.adapter or []))
    configs = [_check_run(run) for run in runs]
    if len(runs) > 1:
        for run, config in zip(runs, configs):
            method = config.get("finetune", {}).get("method")
            if method not in ("lora", "rslora"):
                raise UserError(f"several --adapter run in one batch as a bank of LoRA adapters (lora, rslora runs); "
                                f"{run} is a {method} run: generate with it alone")
        models = {config.get("model") for config in configs}
        if len(models) > 1:
            raise UserError(f"several --adapter share one base model; these runs fine-tuned {sorted(map(str, models))}")
    from lowrank_jax.finetune import FinetuneConfig, load_model, restore_adapter
    from lowrank_jax.models.llama import generate

    loaded, restored = None, []
    for run in runs:
        recipe, trainable, _, loaded = restore_adapter(run, loaded=loaded)
        restored.append((recipe, trainable))
    model, _, params, tok = loaded if loaded is not None else load_model(FinetuneConfig())
    columns = ([None] if args.with_base or not runs else []) + list(range(len(runs)))
    rows = [(p, k) for p in prompts for k in columns]
    ids = [tok.encode(_chat(tok, p) if args.chat else p, add_special_tokens=False) for p, _ in rows]
    options = dict(max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id, temperature=args.temperature,
                   top_k=args.top_k)
    if len(runs) == 1 and not args.with_base:
        recipe, trainable = restored[0]
        from lowrank_jax.finetune import evaluation_inputs

        params, adapter_options = evaluation_inputs(recipe, trainable)
        out = generate(recipe.eval_model, params, ids, **options, **adapter_options)
    elif runs:
        import jax
        import numpy as np

        from lowrank_jax.adapters.multi import multi_lora

        bank = multi_lora([recipe.adapter for recipe, _ in restored])
        bank_params = bank.stack([trainable for _, trainable in restored])
        index = np.asarray([-1 if k is None else k for _, k in rows], np.int32)
        out = generate(model, params, ids, adapter=bank, adapter_params=jax.device_put(bank_params),
                       adapter_index=index, **options)
    else:
        out = generate(model, params, ids, **options)
    texts = [tok.decode([int(t) for t in row if t != tok.eos_token_id], skip_special_tokens=True) for row in out]
    if len(rows) == 1:
        print(texts[0])
        return 0
    for (prompt, k), text in zip(rows, texts):
        print(json.dumps({"adapter": None if k is None else runs[k], "prompt": prompt, "text": text}))
    return 0


def _cmd_merge(args) -> int:
    from safetensors.numpy import save_file

    from lowrank_jax import run_config as rc
    from lowrank_jax.run_config import UserError, check_writable

    if args.format == "hf":
        _check_run(args.adapter)
        from lowrank_jax.export import merge_hf

        merge_hf(args.adapter, args.output, dtype=args.dtype)
        return 0
    output = pathlib.Path(args.output)
    if output.suffix != ".safetensors":
        raise UserError(f"--output must end in .safetensors, got {output}")
    if output.is_dir():
        raise UserError(f"--output {str(output)!r} is a directory; give a file name ending in .safetensors")
    check_writable(output.parent, f"--output {str(output)!r}: its directory")
    method = _check_run(args.adapter).get("finetune", {}).get("method")
    if method in rc.MIXTURES:
        raise UserError(f"{args.adapter} holds a {method} run: a mixture routes each token to its experts, so it has no "
                        f"merged weights; use `lowrank-jax generate --adapter {args.adapter}`")
    from lowrank_jax.finetune import restore_adapter

    recipe, trainable, _, _ = restore_adapter(args.adapter)
    from lowrank_jax.io.hf_checkpoint import hf_state_dict

    tensors = hf_state_dict(recipe.eval_params(trainable))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "source": "lowrank-jax merge"})
    os.replace(tmp, output)
    total = sum(v.size for v in tensors.values())
    print(f"wrote {output}: {len(tensors)} tensors, {total:,d} parameters (transformers LlamaForCausalLM names)")
    return 0


def _cmd_export(args) -> int:
    from lowrank_jax.export import check_peft_method, export_peft

    check_peft_method(_check_run(args.run_dir, "RUN_DIR").get("finetune", {}).get("method"))
    export_peft(args.run_dir, args.output)
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
    from lowrank_jax.run_config import UserError

    _check_run(args.adapter)
    from lowrank_jax import checkpoint

    ck_dir = pathlib.Path(args.adapter) / "checkpoints"
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
    kernels = config.get("adapted_kernels", targets)  # per layer, as peft counts modules (older runs: per stack)
    if "targets" in a or kernels:
        print(f"targets: {a.get('targets', config['finetune'].get('targets'))}  ({kernels} adapted kernels)")
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
    finetune_parser = _finetune_parser(sub)
    g = sub.add_parser("generate", help="generate text with SmolLM2 (optionally with a fine-tuned adapter)")
    g.add_argument("--prompt", action="append", help="text to continue (repeatable)")
    g.add_argument("--prompts", help="a text file, one prompt per line (instead of --prompt)")
    g.add_argument("--adapter", action="append", help="a finetune output directory (repeatable: several LoRA runs "
                                                     "serve every prompt in one mixed batch, a JSON line per answer)")
    g.add_argument("--with-base", action="store_true", help="also answer with the base model (no adapter)")
    g.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate per prompt (default 48)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default 0.0)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template (one user turn)")
    m = sub.add_parser("merge", help="write base + adapter merged weights (one safetensors file, or a transformers "
                                     "directory)")
    m.add_argument("--adapter", required=True, help="a finetune output directory")
    m.add_argument("--output", required=True, help="the .safetensors file (--format safetensors) or the new "
                                                   "directory (--format hf) to write")
    m.add_argument("--format", choices=("safetensors", "hf"), default="safetensors",
                   help="safetensors: the merged weights under transformers' names; hf: a directory "
                        "AutoModelForCausalLM.from_pretrained loads (config.json, model.safetensors, tokenizer "
                        "files) (default safetensors)")
    m.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="--format hf: the dtype of the written weights (default float32)")
    e = sub.add_parser("export", help="write a run's adapter in peft's format (PeftModel.from_pretrained loads it)")
    e.add_argument("run_dir", metavar="RUN_DIR", help="a finetune output directory")
    e.add_argument("--format", choices=("peft",), default="peft", help="the adapter format (default peft)")
    e.add_argument("--output", required=True, help="the new directory to write")
    i = sub.add_parser("info", help="summarise an adapter (like peft's print_trainable_parameters)")
    i.add_argument("adapter", help="a finetune output directory")
    i.add_argument("-v", "--verbose", action="store_true", help="list every adapter leaf and its shape")
    sub.add_parser("plan", help="per-device memory and FLOPs of a train step for N fake devices (see plan --help)")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from lowrank_jax.run_config import UserError

    if args.command == "finetune" and args.config is not None:  # the file's options become defaults: flags win
        try:
            finetune_parser.set_defaults(**config_file_options(args.config))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        args = parser.parse_args(argv)
    commands = {"finetune": _cmd_finetune, "generate": _cmd_generate, "merge": _cmd_merge, "export": _cmd_export,
                "info": _cmd_info}
    try:
        return commands[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
