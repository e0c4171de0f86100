"""The library core does not import the application (the models, ``finetune``, the command line)."""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lowrank_jax"
APPLICATION = ("lowrank_jax.models", "lowrank_jax.finetune", "lowrank_jax.cli")
CORE = ("adapters", "linen.py", "nnx.py", "optim", "quant", "tree.py", "sharding.py", "training.py",
        "checkpoint.py", "io/peft.py", "io/hf_names.py", "linalg.py", "grads.py", "attention")
# Imports of the application inside a core function, as {(file, module): reason}. None today; an entry
# here needs a reason (the import runs only when that function is called, never on `import lowrank_jax`).
ALLOWED_IN_FUNCTIONS: dict[tuple[str, str], str] = {}


def _core_files() -> list[pathlib.Path]:
    files = []
    for entry in CORE:
        path = PACKAGE / entry
        assert path.exists(), f"core entry {entry} does not exist"
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return files


def _module_of(file: pathlib.Path) -> str:
    parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(file: pathlib.Path) -> str:
    """The package relative imports in ``file`` are resolved against."""
    module = _module_of(file)
    return module if file.name == "__init__.py" else module.rpartition(".")[0]


def _imports(source: str, package: str):
    """``(module, in_function)`` for every import in ``source``, relative imports resolved against ``package``."""
    tree = ast.parse(source)

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, inner
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                yield base, inner
                for alias in child.names:  # `from lowrank_jax import models`
                    yield f"{base}.{alias.name}", inner
            yield from visit(child, inner)

    yield from visit(tree, False)


def _is_application(name: str) -> bool:
    return any(name == app or name.startswith(app + ".") for app in APPLICATION)


def test_import_lowrank_jax_does_not_import_the_application():
    code = (
        "import sys\n"
        "import lowrank_jax\n"
        f"loaded = sorted(m for m in sys.modules if any(m == a or m.startswith(a + '.') for a in {APPLICATION!r}))\n"
        "assert not loaded, loaded\n"
        "assert 'longlora' in lowrank_jax.__all__\n"
        "assert lowrank_jax.longlora.interpolation_factor(32768, 4096) == 8\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr


def test_every_public_module_is_an_attribute_of_a_fresh_import():
    """``lrj.tree`` was missing from the lazy modules: ``lrj.tree.num_params`` worked only after something
    else had imported ``lowrank_jax.tree`` (the MiniLM example failed run on its own)."""
    import lowrank_jax

    modules = ("attention", "distributed", "grads", "linalg", "linen", "longlora", "multi_train", "nnx", "optim",
               "plan", "quant", "tree")
    code = "import lowrank_jax as lrj\n" + "".join(f"assert lrj.{m}.__name__ == 'lowrank_jax.{m}'\n" for m in modules)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr
    assert set(modules) <= set(lowrank_jax.__all__)


@pytest.mark.parametrize("file", _core_files(), ids=lambda f: str(f.relative_to(PACKAGE)))
def test_core_module_does_not_import_the_application(file):
    rel = str(file.relative_to(PACKAGE))
    top_level = sorted({name for name, in_function in _imports(file.read_text(), _package_of(file)) if not in_function and _is_application(name)})
    assert not top_level, f"lowrank_jax/{rel} imports the application at module level: {top_level}"
    in_functions = sorted({name for name, in_function in _imports(file.read_text(), _package_of(file)) if in_function and _is_application(name)})
    unlisted = [name for name in in_functions if (rel, name) not in ALLOWED_IN_FUNCTIONS]
    assert not unlisted, f"lowrank_jax/{rel} imports the application inside a function: {unlisted}"


def test_the_import_scan_sees_application_imports():
    source = ("from lowrank_jax import models\nimport lowrank_jax.cli\nfrom ..finetune import x\n"
              "from . import hf_names\nimport numpy\ndef f():\n    from lowrank_jax.models import llama\n")
    found = {(name, f) for name, f in _imports(source, "lowrank_jax.io") if _is_application(name)}
    assert found == {("lowrank_jax.models", False), ("lowrank_jax.cli", False), ("lowrank_jax.finetune", False),
                     ("lowrank_jax.finetune.x", False), ("lowrank_jax.models", True), ("lowrank_jax.models.llama", True)}
