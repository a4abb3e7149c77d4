#!/usr/bin/env python
"""pyreft's side of ``bench_dynamics.py``: runs in pyreft's own venv (pyreft 0.1.0, pyvene 0.1.8,
transformers 4.45.1) and imports only torch, transformers, pyreft and ``dynamics_loop`` (torch only).

    python dynamics_pyreft_worker.py SETUP_DIR

reads ``SETUP_DIR/setup.pt`` (written by the parent: model folder, layers, rank, the jobs with their
batches, initial weights and optimiser settings) and writes ``SETUP_DIR/result_pyreft.pt``: per job,
the loss at every step, ``|R_t - R_0|_F`` and the final orthonormality error. Every step is pyreft's
own: ``LoreftIntervention`` (R through ``torch.nn.utils.parametrizations.orthogonal``) called the way
``ReftTrainer.compute_loss`` calls it, the model's own loss over all positions.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from dynamics_loop import run_job


def _layer_of(key: str) -> int:
    """pyvene's intervention key, e.g. ``layer_8_comp_block_output_unit_pos_nunit_1#0`` -> 8."""
    match = re.match(r"layer_(\d+)_", key)
    if match is None:
        raise RuntimeError(f"cannot read the layer from pyvene's intervention key {key!r}")
    return int(match.group(1))


def main(setup_dir: str) -> None:
    import pyreft
    import transformers

    folder = Path(setup_dir)
    setup = torch.load(folder / "setup.pt", weights_only=False)
    torch.set_num_threads(setup["threads"])
    models: dict = {}
    results = {}
    for job in setup["jobs"]:
        if job["model"] not in models:
            models[job["model"]] = transformers.AutoModelForCausalLM.from_pretrained(
                folder / job["model"], torch_dtype=torch.float32, attn_implementation="sdpa").eval()
            for p in models[job["model"]].parameters():
                p.requires_grad_(False)
        model = models[job["model"]]
        d = model.config.hidden_size
        torch.manual_seed(job["seed"])
        reps = [{"layer": layer, "component": "block_output", "low_rank_dimension": setup["rank"],
                 "intervention": pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=setup["rank"],
                                                           dropout=0.0, dtype=torch.float32)}
                for layer in job["layers"]]
        reft_model = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps), set_device=False)
        ivs = {}
        with torch.no_grad():
            for key, iv in reft_model.interventions.items():
                iv = iv[0] if isinstance(iv, (list, tuple)) else iv
                w = job["init"][job["layers"].index(_layer_of(key))]
                iv.rotate_layer.weight = w["R"]          # torch's orthogonal parametrization: right_inverse
                iv.learned_source.weight.copy_(w["W"])
                iv.learned_source.bias.copy_(w["b"])
                ivs[_layer_of(key)] = iv
        ordered = [ivs[layer] for layer in job["layers"]]
        named = [(f"{layer}.{n}", p) for layer, iv in zip(job["layers"], ordered)
                 for n, p in iv.named_parameters() if p.requires_grad]

        def loss_of(batch: dict) -> torch.Tensor:
            # what pyreft's ReftTrainer.compute_loss does: one location list per intervention
            locs = batch["locs"].unsqueeze(0).expand(len(ordered), -1, -1).tolist()
            _, out = reft_model({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                                unit_locations={"sources->base": (None, locs)}, labels=batch["labels"])
            return out.loss

        def rotations() -> list[torch.Tensor]:
            return [iv.rotate_layer.weight.detach().clone() for iv in ordered]

        results[job["name"]] = run_job(job, named, loss_of, rotations)
        print(f"pyreft {job['name']}: loss {results[job['name']]['loss'][0]:.4f} -> "
              f"{results[job['name']]['loss'][-1]:.4f}", file=sys.stderr, flush=True)
    from importlib.metadata import version
    software = (f"pyreft {version('pyreft')}, pyvene {version('pyvene')}, transformers {transformers.__version__}, "
                f"torch {torch.__version__}")
    torch.save({"results": results, "software": software}, folder / "result_pyreft.pt")


if __name__ == "__main__":
    main(sys.argv[1])
