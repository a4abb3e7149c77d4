"""pyreft 0.1.0 programs run on reftkit with one changed import.

Each script under ``scripts/`` follows one usage pattern of pyreft's README and examples on a tiny random
model, and asserts its own outcome (the loss falls, memorisation recalls its target, save -> load generates
the same tokens, positions follow pyreft's rules, LoRA and ReFT both train, ...). All of them pass unchanged
in pyreft 0.1.0's venv. Here each is run with its single ``import pyreft`` line rewritten to
``import reftkit.pyreft as pyreft``; the script's own assertions are the test.
"""
from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

import pytest
from pyreft_compat.swap_import import SCRIPTS, run_script, swap_import

PATTERNS = sorted(SCRIPTS.glob("pattern_*.py"))


def test_there_are_eight_patterns_each_a_pyreft_program():
    assert [p.name.split("_")[1] for p in PATTERNS] == [str(i) for i in range(1, 9)]
    for script in PATTERNS:
        text = script.read_text()
        assert "reftkit" not in text, f"{script.name} must be plain pyreft code"
        changed = [d for d in difflib.ndiff(text.splitlines(), swap_import(text).splitlines()) if d[:2] in ("- ", "+ ")]
        assert changed == ["- import pyreft", "+ import reftkit.pyreft as pyreft"], (script.name, changed)


def test_swap_import_refuses_zero_or_two_imports_and_rewrites_from_imports():
    with pytest.raises(ValueError, match="exactly one"):
        swap_import("import torch\n")
    with pytest.raises(ValueError, match="exactly one"):
        swap_import("import pyreft\nfrom pyreft import ReftConfig\n")
    with pytest.raises(ValueError, match="plain `import pyreft`"):
        swap_import("import pyreft as p\n")
    text = "import torch\nfrom pyreft import (\n    ReftConfig,\n)\n"
    assert swap_import(text) == "import torch\nfrom reftkit.pyreft import (\n    ReftConfig,\n)\n"


@pytest.mark.slow
@pytest.mark.parametrize("script", PATTERNS, ids=[p.stem for p in PATTERNS])
def test_pattern_runs_with_reftkit_pyreft(script: Path, tmp_path: Path):
    result = tmp_path / "result.json"
    done = run_script(script, tmp_path, result=result)
    number = re.match(r"pattern_(\d+)_", script.name).group(1)
    log = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, f"{script.name} failed under reftkit.pyreft:\n{log}"
    assert f"pattern {number} OK" in done.stdout, log
    assert json.loads(result.read_text())  # the script's small result was written
