"""What the parent process needs to run code in pyreft's throwaway venv (pyreft 0.1.0, pyvene 0.1.8,
transformers 4.45.1): where its python is, and a model folder that transformers 4.45 can read.

The venv is made by ``bash tests/goldens/make_pyreft_goldens.sh``; ``PYREFT_PYTHON`` points elsewhere.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

PYREFT_PYTHON = os.environ.get("PYREFT_PYTHON", "/tmp/pyreft_golden_venv/bin/python")


def save_for_445(model: torch.nn.Module, folder: Path) -> None:
    """save_pretrained with transformers 5, then make config.json readable by 4.45.1."""
    model.save_pretrained(folder, safe_serialization=True)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise RuntimeError(f"rope {rope} not handled for transformers 4.45")
    cfg["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = "float32"
    cfg.pop("rope_parameters", None)
    cfg.pop("dtype", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))
