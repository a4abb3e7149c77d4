"""README's figure and results table are what benchmarks/readme_results.py makes from the stored measurements."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import readme_results  # noqa: E402


def test_readme_table_and_figure_come_from_the_stored_measurements():
    check = subprocess.run([sys.executable, str(BENCHMARKS / "readme_results.py"), "--check"], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stderr
    readme = readme_results.README.read_text()
    assert "](docs/images/compare_1k.png)" in readme.split("## Set up")[0], "the figure is shown near the top"


def test_the_table_follows_its_inputs():
    compare = pd.read_csv(readme_results.COMPARE)
    recipe = json.loads(readme_results.RECIPE.read_text())
    block = readme_results.results_block(compare, recipe)
    loreft = compare[compare["method"] == "loreft"].iloc[0]
    assert f"| LoReFT r4 (reftkit) | {loreft['num_trainable_params']:,} |" in block
    assert f"| ROUGE-L | {recipe['before']['rougeL']:.1f} | **{recipe['after']['rougeL']:.1f}** |" in block
    recipe["after"]["rougeL"] += 1.0
    assert readme_results.results_block(compare, recipe) != block
