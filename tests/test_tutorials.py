"""Every tutorial notebook runs top to bottom with the small parameters given here, and is stored with the
outputs of its maker's full-size run (``bash scripts/tutorials.sh`` regenerates them)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
MAKERS = TUTORIALS / "_make"
sys.path.insert(0, str(MAKERS))
from notebook_writer import code_digest  # noqa: E402

SMALL = {
    "01_quickstart.ipynb": "STEPS = 3\nMAX_NEW_TOKENS = 6\nRANK = 2\n",
    "02_instruction_tuning_1k.ipynb": "N_TRAIN = 16\nN_EVAL = 4\nEPOCHS = 1\nMAX_NEW_TOKENS = 6\n"
                                      "OUTPUT_DIR = 'run'\nTHREADS = 1\n",
    "03_interpretability.ipynb": "PATCH_LAYER_STRIDE = 15\nMAX_NEW_TOKENS = 6\nDAS_LAYERS = [10]\nDAS_STEPS = 3\n"
                                 "DAS_TRAIN_PAIRS = 32\nDAS_TEST_PAIRS = 16\nTHREADS = 1\n",
    "04_representation_changes.ipynb": "N_TRAIN = 8\nEPOCHS = 1\nN_PROMPTS = 4\nPCA_LAYER = 16\nTHREADS = 1\n",
    "05_reft_vs_lora.ipynb": "N_TRAIN = 8\nN_EVAL = 2\nEPOCHS = 1\nMAX_NEW_TOKENS = 4\nTHREADS = 1\n"
                             "METHODS = ['base', 'loreft', 'direft', 'lora', 'ia3', 'svf', 'prompt_tuning', "
                             "'p_tuning_v2', 'prefix_tuning', 'p_tuning', 'fpft']\n",
    "06_experts_and_dispatch.ipynb": "N_TRAIN = 8\nN_EVAL = 2\nN_OTHER = 4\nEPOCHS = 1\nSHOTS = 2\n"
                                     "POPULATION = 5\nITERATIONS = 1\nN_SVF = 1\nSVF_EPOCHS = 1\nRL_EPOCHS = 1\n"
                                     "THREADS = 1\n",
    "07_tfew_and_policy_gradient.ipynb": "N_TRAIN = 1\nN_EVAL = 2\nMAX_WORDS = 8\nEPOCHS = 1\nBATCH_SIZE = 4\n"
                                         "NUM_VIRTUAL_TOKENS = 1\nPG_STEPS = 1\nPG_BATCH = 2\nKL_COEF = 1.0\n"
                                         "SVF_TARGETS = ['layers.29.mlp.down_proj']\nMAX_NEW_TOKENS = 2\nTHREADS = 1\n",
    "08_serving.ipynb": "STEPS = 2\nMAX_NEW_TOKENS = 6\nCLIENTS = 3\n",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_executes(name, tmp_path):
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "each tutorial has exactly one cell tagged 'parameters'"
    tagged[0].source = SMALL[name]
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()


def test_every_tutorial_has_small_parameters():
    assert sorted(p.name for p in TUTORIALS.glob("*.ipynb")) == sorted(SMALL)


def _parameters(source: str) -> dict:
    values: dict = {}
    exec(source, {}, values)   # the parameters cell is plain assignments (the execution test relies on it too)
    return values


def _stored_problems(nb: nbformat.NotebookNode) -> list[str]:
    """What keeps a stored notebook from being a clean, complete run: empty cells, errors, figures as text."""
    problems = []
    if nb.metadata.get("reftkit", {}).get("executed_code") != code_digest(nb):
        problems.append("its outputs were not made by its current code (no or another executed_code digest)")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        tags = cell.get("metadata", {}).get("tags", [])
        # the parameters cell is assignments only; any other cell without output must say so with "silent"
        if not cell.outputs and not {"silent", "parameters"} & set(tags):
            problems.append(f"cell {i} has no output and is not tagged silent")
        for out in cell.outputs:
            if out.output_type == "error":
                problems.append(f"cell {i} stores an error: {out.get('ename')}: {out.get('evalue')}")
            text = out.get("text", "") if out.output_type == "stream" else ""
            if out.get("name") == "stderr" and ("Traceback" in text or "Error" in text):
                problems.append(f"cell {i} stores an error on stderr: {text[:200]!r}")
            data = out.get("data", {})
            if ("<Figure size" in data.get("text/plain", "") or "<Figure size" in text) and "image/png" not in data:
                problems.append(f"cell {i} stores a figure as text, not as an image")
    return problems


@pytest.mark.parametrize("name", sorted(SMALL))
def test_stored_notebook_is_its_makers_full_size_run(name):
    check = subprocess.run([sys.executable, f"make_{name[:2]}.py", "--check"], cwd=MAKERS, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stderr or check.stdout   # stored cells == what the maker builds
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    assert _stored_problems(nb) == []
    stored = _parameters(next(c.source for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])))
    small = _parameters(SMALL[name])
    assert set(stored) == set(small), "the test's small parameters name the same variables as the notebook's"
    assert stored != small, "the stored run is the full-size one, not the test's small one"
    for i, cell in enumerate(nb.cells):
        draws = cell.cell_type == "code" and re.search(r"\bplot_\w+\(|\bFigure\(|\bsubplots\(", cell.source)
        if draws and "def " not in cell.source:
            assert any("image/png" in o.get("data", {}) for o in cell.outputs), f"cell {i} draws but stores no image"


def test_stored_notebook_check_catches_what_it_should():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("fig")]
    nb.cells[1].outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "<Figure size 640x480>"}),
                           nbformat.v4.new_output("error", ename="ValueError", evalue="boom", traceback=[])]
    problems = _stored_problems(nb)
    assert len(problems) == 4, problems   # stale digest, cell 0 empty, the figure as text, the error
    nb.metadata["reftkit"] = {"executed_code": code_digest(nb)}
    nb.cells[0].metadata["tags"] = ["silent"]
    nb.cells[1].outputs = [nbformat.v4.new_output("display_data", data={"text/plain": "<Figure size 640x480>",
                                                                        "image/png": "iVBORw0KGgo="})]
    assert _stored_problems(nb) == []
