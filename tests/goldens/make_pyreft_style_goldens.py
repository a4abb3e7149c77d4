"""pyreft 0.1.0 saves written the way pyreft's own examples write them (run by make_pyreft_goldens.py).

The per-class goldens (``<arch>/<Intervention>/``) give every representation a flat
``low_rank_dimension`` and a pyvene component name. Real saves also come in these forms, each a
folder under ``tests/goldens/pyreft/styles/`` on the llama base of ``llama/base``:

    memorisation_consreft_r1      examples/memorisation: one dict (not a list), ConsReFT whose rank 1
                                  is given only to the instance, so config.json's low_rank_dimension is null
    composition_two_loreft        two LoReFTs of ranks 2 and 3 (instance-only) on the same module, acting
                                  on overlapping positions: they compose in list order
    composition_subloreft         examples/composition: a LoReFT subclass defined in the script
                                  (SubloreftIntervention, saved as __main__.SubloreftIntervention), rank 8,
                                  called with per-row subspaces
    bracket_paths                 pyvene module paths as components: "model.layers[1].output" without a
                                  layer key (flat rank given) and "model.layers[0].mlp.output" with one
                                  (rank only on a DiReFT instance)

Each folder holds pyreft's save (config.json, intkey_*.bin) and golden.safetensors: right-padded
``input_ids``, ``attention_mask``, ``unit_locations`` ``[B, K, P]``, ``subspaces`` ``[B, K, s]`` where
used, and pyreft's ``logits``. ``styles/manifest.json`` summarises them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict

import pyreft
import torch
import transformers
from safetensors.torch import save_file

SUBSPACES = [[0, 1, 2, 3], [4, 5, 6, 7], [2, 3, 4, 5]]  # per row; the notebook's two halves of a rank-8 LoReFT


class SubloreftIntervention(pyreft.LoreftIntervention):
    """pyreft's examples/composition/compreft.ipynb, verbatim in substance: a LoReFT whose edit uses only
    the rank coordinates ``subspaces[b]`` of row b."""

    def forward(self, base, source=None, subspaces=None):
        assert subspaces is not None
        rotated_base = self.rotate_layer(base)
        diff = self.act_fn(self.learned_source(base)) - rotated_base
        lhs = torch.stack([diff[b, :, subspaces[b]] for b in range(len(subspaces))], dim=0)
        rhs = torch.stack([self.rotate_layer.weight[..., subspaces[b]].T for b in range(len(subspaces))], dim=0)
        output = base + torch.bmm(lhs, rhs)
        return self.dropout(output.to(base.dtype))


SubloreftIntervention.__module__ = "__main__"  # as the notebook's class is saved: <class '__main__.Sub...'>


def _cases(d: int) -> dict:
    """name -> (pyreft representations, a function of the real positions of one row -> its [K][P] positions)."""
    f32 = torch.float32
    return OrderedDict(
        memorisation_consreft_r1=(
            {"layer": 1, "component": "block_output",
             "intervention": pyreft.ConsreftIntervention(embed_dim=d, low_rank_dimension=1)},
            lambda real: [[real[-1]]]),
        composition_two_loreft=(
            [{"layer": 1, "component": "block_output",
              "intervention": pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=2, dtype=f32)},
             {"layer": 1, "component": "block_output",
              "intervention": pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=3, dtype=f32)}],
            lambda real: [real[-2:], [real[-1], real[0]]]),
        composition_subloreft=(
            {"layer": 1, "component": "block_output",
             "intervention": SubloreftIntervention(embed_dim=d, low_rank_dimension=8, dtype=f32)},
            lambda real: [real[-2:]]),
        bracket_paths=(
            [{"component": "model.layers[1].output", "low_rank_dimension": 4,
              "intervention": pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=4, dtype=f32)},
             {"layer": 0, "component": "model.layers[0].mlp.output",
              "intervention": pyreft.DireftIntervention(embed_dim=d, low_rank_dimension=2, dtype=f32)}],
            lambda real: [real[-2:], [real[-1], real[0]]]),
    )


#: the pyvene component names the bracket paths stand for (an independent check of pyreft's output)
_NAMED = {"model.layers[1].output": (1, "block_output"), "model.layers[0].mlp.output": (0, "mlp_output")}


def _locations(mask: torch.Tensor, per_row) -> torch.Tensor:
    rows = [per_row(torch.nonzero(m).flatten().tolist()) for m in mask]
    return torch.tensor(rows, dtype=torch.long)  # [B, K, P]


@torch.no_grad()
def _logits(reft_model, ids, mask, locs, subspaces=None):
    extra = {} if subspaces is None else {"subspaces": subspaces.permute(1, 0, 2).tolist()}  # pyvene: [K][B][s]
    _, out = reft_model({"input_ids": ids, "attention_mask": mask},
                        unit_locations={"sources->base": (None, locs.permute(1, 0, 2).tolist())}, **extra)
    return out.logits.float()


def _named_twin(base_dir: str, reps: list, save_dir: str, keys: list) -> transformers.PreTrainedModel:
    """The bracket-path save's interventions, re-attached with pyvene's component names."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()
    named = []
    for rep in reps:
        layer, component = _NAMED[rep["component"]]
        iv = rep["intervention"]
        twin = type(iv)(embed_dim=iv.embed_dim, low_rank_dimension=iv.learned_source.weight.shape[0],
                        dtype=torch.float32)
        named.append({"layer": layer, "component": component, "intervention": twin})
    twin_model = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=named), set_device=False)
    for key, twin_key in zip(keys, twin_model.interventions):
        state = torch.load(os.path.join(save_dir, f"intkey_{key}.bin"), weights_only=True)
        twin_model.interventions[twin_key].load_state_dict(state)
        twin_model.interventions[twin_key].eval()
    return twin_model


def make_style_goldens(out_root: str, helpers) -> OrderedDict:
    """Write ``out_root/styles/`` from the llama base in ``out_root/llama/base``; ``helpers`` is the
    main generator module (seeds, inputs, ``randomise``, ``st_meta``)."""
    base_dir = os.path.join(out_root, "llama", "base")
    styles = os.path.join(out_root, "styles")
    shutil.rmtree(styles, ignore_errors=True)
    manifest = OrderedDict()
    torch.manual_seed(helpers.SEED + 500)  # the instances' initial weights (overwritten below, but seeded)
    for idx, (name, (reps, per_row)) in enumerate(_cases(32).items()):
        torch.manual_seed(helpers.SEED + 500 + idx)  # torch's orthogonal right_inverse draws a completion
        model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()
        reps_list = reps if isinstance(reps, list) else [reps]
        reft_model = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps), set_device=False)
        g = torch.Generator().manual_seed(helpers.SEED + 600 + idx)
        for iv in reft_model.interventions.values():
            _randomise(iv, g)
        helpers.set_eval(reft_model)
        save_dir = os.path.join(styles, name)
        reft_model.save(save_directory=save_dir)
        keys = list(reft_model.interventions)
        ids, mask, _ = helpers.make_inputs("right", len(reps_list))
        locs = _locations(mask, per_row)
        subspaces = None
        if name == "composition_subloreft":
            subspaces = torch.tensor(SUBSPACES, dtype=torch.long).unsqueeze(1)  # [B, K=1, s]
        logits = _logits(reft_model, ids, mask, locs, subspaces)
        assert torch.equal(logits, _logits(reft_model, ids, mask, locs, subspaces))
        with torch.no_grad():  # the interventions must change the output
            bare = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()
            assert (logits - bare(input_ids=ids, attention_mask=mask).logits).abs().max() > 1e-2, name
        if name == "bracket_paths":  # pyvene's bracket paths hook the modules its names do
            twin = _named_twin(base_dir, reps_list, save_dir, keys)
            assert torch.equal(logits, _logits(twin, ids, mask, locs)), "bracket paths != named components"
        with open(os.path.join(save_dir, "config.json")) as f:
            saved = json.load(f)
        golden = {"input_ids": ids, "attention_mask": mask, "unit_locations": locs, "logits": logits.contiguous()}
        if subspaces is not None:
            golden["subspaces"] = subspaces
        meta = {"case": name, "intervention_keys": keys,
                "unit_locations_layout": "[batch, num_interventions, positions]; pyreft got "
                                         "{'sources->base': (None, locs.permute(1,0,2).tolist())}",
                "subspaces_layout": "[batch, num_interventions, s]; pyreft got subspaces.permute(1,0,2).tolist()"}
        save_file(golden, os.path.join(save_dir, "golden.safetensors"), metadata=helpers.st_meta(meta))
        manifest[name] = OrderedDict(
            keys=keys,
            intervention_types=saved["intervention_types"],
            components=[r[1] for r in saved["representations"]],
            saved_low_rank_dimension=[r[4] for r in saved["representations"]],
            ranks=[int(iv.rotate_layer.weight.shape[1]) if hasattr(iv, "rotate_layer") else None
                   for iv in reft_model.interventions.values()],
            subspaces=SUBSPACES if subspaces is not None else None,
        )
        print(f"[styles] {name}: saved {len(keys)} interventions {keys}", flush=True)
    with open(os.path.join(styles, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return manifest


@torch.no_grad()
def _randomise(iv, g: torch.Generator) -> None:
    """Weights far from the initialisation, so the interventions change the logits clearly."""
    r = iv.rotate_layer.weight.shape[1]
    q, rr = torch.linalg.qr(torch.randn(int(iv.embed_dim), r, generator=g))
    iv.rotate_layer.weight = q * torch.sign(torch.diagonal(rr)).unsqueeze(0)
    ls = iv.learned_source
    if isinstance(ls, torch.nn.Linear):
        ls.weight.copy_(0.3 * torch.randn(ls.weight.shape, generator=g))
        ls.bias.copy_(0.5 * torch.randn(ls.bias.shape, generator=g))
    else:
        ls.copy_(0.5 * torch.randn(ls.shape, generator=g))
