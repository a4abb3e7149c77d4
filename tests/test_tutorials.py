"""Every tutorial notebook runs top to bottom with the small parameters given here."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
SMALL = {
    "01_quickstart.ipynb": "STEPS = 3\nMAX_NEW_TOKENS = 6\nRANK = 2\n",
    "02_instruction_tuning_1k.ipynb": "N_TRAIN = 16\nN_EVAL = 4\nEPOCHS = 1\nMAX_NEW_TOKENS = 6\n"
                                      "OUTPUT_DIR = 'run'\n",
    "03_interpretability.ipynb": "PATCH_LAYER_STRIDE = 15\nMAX_NEW_TOKENS = 6\nDAS_LAYERS = [10]\nDAS_STEPS = 3\n"
                                 "DAS_TRAIN_PAIRS = 32\nDAS_TEST_PAIRS = 16\nTHREADS = 1\n",
    "04_representation_changes.ipynb": "N_TRAIN = 8\nEPOCHS = 1\nN_PROMPTS = 4\nPCA_LAYER = 16\nTHREADS = 1\n",
    "05_reft_vs_lora.ipynb": "N_TRAIN = 8\nN_EVAL = 2\nEPOCHS = 1\nMAX_NEW_TOKENS = 4\nTHREADS = 1\n"
                             "METHODS = ['base', 'loreft', 'direft', 'lora', 'ia3', 'svf', 'prompt_tuning', "
                             "'p_tuning_v2', 'prefix_tuning', 'p_tuning', 'fpft']\n",
    "06_experts_and_dispatch.ipynb": "N_TRAIN = 8\nN_EVAL = 2\nN_OTHER = 4\nEPOCHS = 1\nSHOTS = 2\n"
                                     "POPULATION = 5\nITERATIONS = 1\nTHREADS = 1\n",
    "07_tfew_and_policy_gradient.ipynb": "N_TRAIN = 1\nN_EVAL = 2\nMAX_WORDS = 8\nEPOCHS = 1\nBATCH_SIZE = 4\n"
                                         "NUM_VIRTUAL_TOKENS = 1\nPG_STEPS = 1\nPG_BATCH = 2\nKL_COEF = 1.0\n"
                                         "SVF_TARGETS = ['layers.29.mlp.down_proj']\nMAX_NEW_TOKENS = 2\nTHREADS = 1\n",
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
