"""interventions/, analysis/ and experts/ install as reftkit.interventions / .analysis / .experts, never top level."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import importlib.util, reftkit, reftkit.interventions, reftkit.analysis, reftkit.experts;"
         "print(reftkit.interventions.__file__);print(reftkit.analysis.__file__);print(reftkit.experts.__file__);"
         "print(importlib.util.find_spec('interventions'), importlib.util.find_spec('analysis'), "
         "importlib.util.find_spec('experts'))")


def _probe(cwd: Path, env: dict | None = None) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return out.stdout.split("\n")


def test_installed_package_maps_the_namespace(tmp_path):
    # run outside the repo so the source folders are not on sys.path by accident
    iv_file, an_file, ex_file, top = _probe(tmp_path)[:4]
    assert Path(iv_file).parent.name == "interventions" and Path(an_file).parent.name == "analysis"
    assert Path(ex_file).parent.name == "experts"
    assert top == "None None None"


def test_built_wheel_contains_only_the_reftkit_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("reftkit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"reftkit", next(t for t in tops if t.endswith(".dist-info"))}
    assert "reftkit/interventions/reft.py" in names and "reftkit/analysis/__init__.py" in names
    assert "reftkit/experts/__init__.py" in names
    rooms = sorted(p.parent.name for p in (ROOT / "reftkit").glob("*/__init__.py"))   # the core's sub-packages
    assert {"data", "training", "models", "cli", "pyreft"} <= set(rooms)
    for room in rooms:
        assert f"reftkit/{room}/__init__.py" in names, f"reftkit.{room} is missing from the wheel: list it in " \
                                                       f"pyproject.toml's packages"
    assert "reftkit/training/trainer.py" in names and "reftkit/models/embedded.py" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    iv_file, an_file, ex_file, top = _probe(tmp_path, env)[:4]
    assert iv_file.startswith(str(site)) and an_file.startswith(str(site)) and ex_file.startswith(str(site))
    assert top == "None None None"


def test_import_has_no_side_effects(tmp_path):
    code = ("import sys, reftkit, reftkit.interventions, reftkit.analysis, reftkit.experts;"
            "print('nnsight' in sys.modules)")
    env = {**os.environ, "HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
    assert not (tmp_path / "home").exists() and not (tmp_path / "cache").exists()
