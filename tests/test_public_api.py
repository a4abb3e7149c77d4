"""The public API imports: every name ``reftkit`` and its packages export, every documented path (in the
README, the docs pages and the docstrings' cross-references), and one set of ``parameter_counts()`` keys
for every kind of adapted model."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from conftest import tiny_llama

import reftkit

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("reftkit", "interventions", "analysis", "experts")

#: the top-level names (the design card's contract plus what later issues added); a removal fails here
TOP_LEVEL = {
    "ReftConfig", "RepresentationConfig", "ReftModel", "get_reft_model", "ConfigError", "LoadError",
    "PositionError", "StructureError", "COMPONENTS", "Site", "resolve_site", "parse_positions",
    "load_model", "smollm2_path", "minilm_path", "DataError", "ReftDataCollator",
    "make_last_position_supervised_data_module", "make_multiple_position_supervised_data_module",
    "make_classification_data_module", "make_multiple_choice_data_module", "ReftTrainer",
    "ReftForSequenceClassification",
}
PACKAGES = ("reftkit.data", "reftkit.training", "reftkit.models", "reftkit.cli", "reftkit.interventions",
            "reftkit.analysis", "reftkit.experts", "reftkit.pyreft", "reftkit.serve")
#: documented submodule paths that code in the wild imports
DOCUMENTED = (
    "reftkit.training.ReftTrainer", "reftkit.training.causal_lm_loss", "reftkit.training.FrozenPrefixCache",
    "reftkit.training.ReftForSequenceClassification", "reftkit.training.distributed.check_fsdp_plugin",
    "reftkit.training.objectives.multiple_choice_loss", "reftkit.data.supervised.length_grouped_order",
    "reftkit.data.multiple_choice.MultipleChoiceDataCollator", "reftkit.data.datasets.define_word_dataset",
    "reftkit.data.datasets.task_families", "reftkit.models.embedded.load_model", "reftkit.cli.main",
    "reftkit.cli.recipe.run_train", "reftkit.cli.demo.run", "reftkit.structure.resolve_site",
    "reftkit.anatomy.find_backbone_and_head", "reftkit.hooks.HookManager", "reftkit.pyreft_import.load_pyreft",
    "reftkit.interventions.scaling.ia3_representations",
    "reftkit.interventions.adapter_placement.houlsby_representations",
    "reftkit.interventions.AdapterFusion", "reftkit.interventions.LoreftIntervention",
    "reftkit.analysis.nnsight_tools.capture", "reftkit.analysis.nnsight_interventions.trace_with_interventions",
    "reftkit.analysis.text_metrics.bleu4", "reftkit.analysis.multiple_choice.rank_classify",
    "reftkit.experts.ExpertLibrary", "reftkit.pyreft.get_reft_model", "reftkit.pyreft.ReftTrainerForCausalLM",
    "reftkit.pyreft.make_last_position_supervised_data_module", "reftkit.pyreft_import.pyvene_component",
    "reftkit.call_inputs.PYVENE_CALL_ARGUMENTS", "reftkit.serve.serve", "reftkit.serve.engine.Engine",
)
_REFERENCE = re.compile(r"\breftkit(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def resolve(path: str):
    """Import the longest module prefix of a dotted ``path``, then read the rest as attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(path)


def test_top_level_names_import():
    assert set(reftkit.__all__) == TOP_LEVEL
    namespace: dict = {}
    exec("from reftkit import *", namespace)
    assert TOP_LEVEL <= set(namespace)
    assert set(dir(reftkit)) >= TOP_LEVEL


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_of_a_package_imports(package):
    module = importlib.import_module(package)
    assert module.__all__, package
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"


@pytest.mark.parametrize("path", DOCUMENTED)
def test_documented_paths_import(path):
    resolve(path)


def _references() -> list[tuple[str, str]]:
    found = set()
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    texts += [p for folder in SOURCES for p in sorted((ROOT / folder).rglob("*.py"))]
    for file in texts:
        for match in _REFERENCE.finditer(file.read_text()):
            found.add((match.group(0).rstrip("."), str(file.relative_to(ROOT))))
    return sorted(found)


def test_every_reference_in_docs_and_docstrings_resolves():
    broken = []
    for path, where in _references():
        try:
            resolve(path)
        except (ImportError, AttributeError) as err:
            broken.append(f"{where}: {path} ({type(err).__name__}: {err})")
    assert broken == []


def test_the_reference_check_can_fail():
    with pytest.raises(AttributeError):
        resolve("reftkit.training.find_backbone_and_head")  # moved to reftkit.anatomy
    with pytest.raises(AttributeError):
        resolve("reftkit.embedded.load_model")  # moved to reftkit.models.embedded


def test_every_adapted_model_counts_parameters_with_the_same_keys():
    from reftkit.analysis import get_prompt_ensemble, get_weight_space_model

    model = tiny_llama(layers=2)
    base = sum(p.numel() for p in model.parameters())
    reft = reftkit.get_reft_model(model, {"layer": 0, "component": "block_output", "positions": "l1",
                                          "low_rank_dimension": 2})
    assert reft.parameter_counts() == {"trainable": 2 * (32 * 2) + 2, "model": base}
    reft.detach()
    lora = get_weight_space_model(tiny_llama(layers=2), "lora", r=2, target_modules=["q_proj"])
    ensemble = get_prompt_ensemble(tiny_llama(layers=2), num_prompts=2, num_virtual_tokens=3)
    for adapted in (lora, ensemble):
        counts = adapted.parameter_counts()
        assert set(counts) == {"trainable", "model"} and counts["model"] == base
        assert counts["trainable"] == sum(p.numel() for p in adapted.parameters() if p.requires_grad)
