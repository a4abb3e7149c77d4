"""A servable tiny world for the server tests: a base folder (tiny Llama + word-level tokenizer with a chat
template) and adapter folders of every kind the server loads (LoReFT, IA3 at every position, SVF)."""
from __future__ import annotations

from pathlib import Path

import torch
from conftest import tiny_llama, tiny_tokenizer

import reftkit
from reftkit.analysis.svf import apply_svf, load_svf, save_svf
from reftkit.experts import ExpertLibrary
from reftkit.interventions.adapter_placement import houlsby_representations

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")
PROMPTS = ["what is the capital of france ?", "define dog", "tell me about it", "how many legs spider",
           "the sky is blue", "a cat that meows"]


def base_model(context: int = 4096) -> torch.nn.Module:
    """Words only: the LM head rows of <pad>, <s>, </s> and <unk> are zero, so their logit is 0 while some word's
    is almost surely positive (greedy never ends early; texts are made of words)."""
    tok = tiny_tokenizer()
    model = tiny_llama(seed=7)
    model.resize_token_embeddings(len(tok))
    model.config.max_position_embeddings = context
    with torch.no_grad():
        model.lm_head.weight[:4] = 0
    return model


def build(root: Path) -> dict[str, Path]:
    """``{"base": folder, "a": ..., "a2", "b", "ia3", "houlsby", "svf", "svf2", "lib", "svflib"}`` under ``root``
    (``lib`` / ``svflib``: expert libraries of a + a2 and svf + svf2)."""
    root.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(padding_side="left")
    tok.chat_template = CHAT_TEMPLATE
    model = base_model()
    folders = {"base": root / "tinychat"}
    model.save_pretrained(folders["base"])
    tok.save_pretrained(folders["base"])
    specs = {
        "a": [{"layer": 1, "component": "block_output", "positions": "f1+l1", "intervention": "loreft",
               "low_rank_dimension": 2}],
        "b": [{"layer": [0, 2], "component": "block_output", "positions": "l2", "intervention": "noreft",
               "low_rank_dimension": 3}],
        "ia3": [{"layer": 1, "component": "mlp_activation", "positions": "all", "intervention": "ia3"}],
    }
    specs["a2"] = specs["a"]  # the same sites as "a", other weights: the two can be mixed
    specs["houlsby"] = houlsby_representations(base_model(), reduction_factor=4)  # at every token, after both blocks
    for i, (name, spec) in enumerate(specs.items()):
        reft = reftkit.get_reft_model(base_model(), spec)
        torch.manual_seed(100 + i)
        with torch.no_grad():  # large edits, so each adapter's generations differ from the others'
            for p in reft.interventions.parameters():
                p.add_(torch.randn_like(p) * 3.0)
        folders[name] = root / name
        reft.save_pretrained(folders[name])
        reft.detach()
    for i, name in enumerate(("svf", "svf2")):
        svf_base = base_model()
        modules = apply_svf(svf_base, "mlp")
        torch.manual_seed(200 + i)
        with torch.no_grad():
            for m in modules.values():
                m.z.mul_(torch.rand_like(m.z) * 3)
        folders[name] = root / name
        save_svf(svf_base, folders[name])
    for library_name, members in (("lib", ("a", "a2")), ("svflib", ("svf", "svf2"))):  # expert libraries
        library = ExpertLibrary()
        for member in members:
            model = base_model()
            if member.startswith("svf"):
                load_svf(model, folders[member])
                library.add(member, model)
            else:
                reft = reftkit.ReftModel.from_pretrained(model, folders[member])
                library.add(member, reft)
                reft.detach()
        folders[library_name] = library.save(root / library_name)
    return folders


def offline(folders: dict[str, Path], route: str | None, ids: list[int], max_new_tokens: int) -> list[int]:
    """The reference: ``ReftModel.generate`` (or the bare / SVF model's) on this prompt alone, greedy."""
    model, _ = reftkit.load_model(str(folders["base"]))
    runner = model
    if route in ("svf", "svf2"):
        load_svf(model, folders[route])
    elif route is not None:
        runner = reftkit.ReftModel.from_pretrained(model, folders[route])
    prompt = torch.tensor([ids])
    out = runner.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                          do_sample=False)
    return out[0, prompt.shape[1]:].tolist()
