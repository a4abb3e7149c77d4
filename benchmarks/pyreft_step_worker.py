#!/usr/bin/env python
"""pyreft's side of the step benchmark (``bench_core.py``): a worker process in pyreft's own venv,
driven one timed call at a time over a pipe, so that its measurements interleave with the parent's.

The parent (``PyreftWorker``) writes ``setup.pt`` into a folder: the model saved for transformers 4.45,
the LoReFT weights, the batches and their positions. The worker (``worker_main``, run as
``python pyreft_step_worker.py DIR`` with the pyreft venv's python) builds pyreft's model from it,
writes reference outputs for the parent's correctness check, then times what the parent asks for:

  pyreft      pyreft's training step / ``reft_model.generate(intervene_on_prompt=True)``
  hook@4.45   the minimal hook applying pyreft's LoreftIntervention modules (train only)
  bare@4.45   ``model.generate`` in transformers 4.45.1 (generate only)

Protocol: one JSON command per stdin line, one JSON reply per line on the worker's original stdout.
The worker side imports only torch, transformers, pyreft and this folder's torch-only helpers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import timing
import torch
from minimal_hook import gather_index, make_minimal_hook
from pyreft_venv import PYREFT_PYTHON


# ===================================================================================== worker side
def worker_main(setup_dir: str) -> None:
    """Runs inside the pyreft venv. Everything anyone else prints goes to stderr: stdout is the protocol."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    setup = torch.load(Path(setup_dir) / "setup.pt", weights_only=False)
    torch.set_num_threads(setup["threads"])
    torch.manual_seed(0)
    import pyreft
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(
        Path(setup_dir) / "model", torch_dtype=torch.float32, attn_implementation="sdpa").eval()
    d = model.config.hidden_size
    layers, rank = setup["layers"], setup["rank"]
    reps = [{"layer": layer, "component": "block_output", "low_rank_dimension": rank,
             "intervention": pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=rank,
                                                       dtype=torch.float32, dropout=0.0)}
            for layer in layers]
    reft_model = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps), set_device=False)
    ivs = list(reft_model.interventions.values())
    with torch.no_grad():
        for iv, w in zip(ivs, setup["weights"]):
            iv.rotate_layer.weight = w["R"]              # through torch's orthogonal parametrization
            iv.learned_source.weight.copy_(w["W"])
            iv.learned_source.bias.copy_(w["b"])
            assert torch.allclose(iv.rotate_layer.weight, w["R"], atol=1e-5)

    def set_mode(train: bool) -> None:
        reft_model.model.train(train)                     # pyvene's train()/eval() skip interventions
        for iv in ivs:
            iv.train(train)

    tr, ge = setup["train"], setup["gen"]
    ids, mask, labels, locs = tr["input_ids"], tr["attention_mask"], tr["labels"], tr["locs"]
    gidx = gather_index(locs, d)
    blocks = [model.model.layers[layer] for layer in layers]

    def pyreft_forward(with_labels: bool):
        # exactly what pyreft's ReftTrainer.compute_loss does per step
        unit_locations = {"sources->base": (None, locs.permute(1, 0, 2).tolist())}
        _, cf = reft_model({"input_ids": ids, "attention_mask": mask}, unit_locations=unit_locations,
                           labels=labels if with_labels else None)
        return cf

    class Hooks:  # pyvene removes every forward hook of the model at each call: register per use
        def __enter__(self):
            self.handles = [b.register_forward_hook(make_minimal_hook(iv, gidx, k))
                            for k, (b, iv) in enumerate(zip(blocks, ivs))]

        def __exit__(self, *exc):
            for h in self.handles:
                h.remove()

    gen_kwargs = dict(max_new_tokens=setup["new_tokens"], min_new_tokens=setup["new_tokens"],
                      do_sample=False, pad_token_id=setup["pad_token_id"])

    def pyreft_generate():
        _, out = reft_model.generate(
            {"input_ids": ge["input_ids"], "attention_mask": ge["attention_mask"]},
            unit_locations={"sources->base": (None, ge["locs"].permute(1, 0, 2).tolist())},
            intervene_on_prompt=True, **gen_kwargs)
        return out

    def bare_generate():
        return model.generate(input_ids=ge["input_ids"], attention_mask=ge["attention_mask"], **gen_kwargs)

    # ---- reference outputs for the parent's correctness check
    set_mode(False)
    with torch.no_grad():
        ref = {"pyreft_logits": pyreft_forward(False).logits.clone()}
        reft_model._cleanup_states()
        with Hooks():
            ref["hook445_logits"] = model(input_ids=ids, attention_mask=mask).logits.clone()
        ref["bare445_logits"] = model(input_ids=ids, attention_mask=mask).logits.clone()
        ref["pyreft_loss"] = float(pyreft_forward(True).loss)
        ref["pyreft_generate"] = pyreft_generate().clone()
        ref["bare445_generate"] = bare_generate().clone()
    torch.save(ref, Path(setup_dir) / "pyreft_ref.pt")

    # ---- timed steps
    params = [p for iv in ivs for p in iv.parameters() if p.requires_grad]
    opts = {"pyreft": torch.optim.AdamW(params, lr=1e-4), "hook@4.45": torch.optim.AdamW(params, lr=1e-4)}

    def step_pyreft():
        opts["pyreft"].zero_grad(set_to_none=True)
        pyreft_forward(True).loss.backward()
        opts["pyreft"].step()

    def step_hook():
        opts["hook@4.45"].zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opts["hook@4.45"].step()

    def run(cmd: dict) -> float:
        phase, variant = cmd["phase"], cmd["variant"]
        if phase == "train":
            set_mode(True)
            if variant == "pyreft":
                return timing.timed_ms(step_pyreft)
            with Hooks():
                return timing.timed_ms(step_hook)
        set_mode(False)
        with torch.no_grad():
            return timing.timed_ms(pyreft_generate if variant == "pyreft" else bare_generate)

    from importlib.metadata import version
    proto.write(json.dumps({"ready": True, "transformers": transformers.__version__, "pyreft": version("pyreft"),
                            "pyvene": version("pyvene"), "torch": torch.__version__}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        try:
            proto.write(json.dumps({"ms": run(cmd)}) + "\n")
        except Exception as err:  # report, let the parent decide
            proto.write(json.dumps({"error": f"{type(err).__name__}: {err}"}) + "\n")


# ===================================================================================== parent side
class PyreftWorker:
    """The parent's handle on a running worker: start it on a prepared folder, ask for timed calls, close."""

    def __init__(self, workdir: Path):
        self.log = open(workdir / "worker.log", "w")
        self.proc = subprocess.Popen([PYREFT_PYTHON, str(Path(__file__).resolve()), str(workdir)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     bufsize=1, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        self.workdir = workdir
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = (self.workdir / "worker.log").read_text()[-4000:]
            raise RuntimeError(f"pyreft worker died (rc={self.proc.returncode}); its log ends with:\n{tail}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"pyreft worker: {reply['error']}")
        return reply

    def timed(self, phase: str, variant: str) -> float:
        time.sleep(timing.GAP_S)  # this process goes idle before the worker starts its clock
        self.proc.stdin.write(json.dumps({"phase": phase, "variant": variant}) + "\n")
        return self._read()["ms"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
        self.log.close()


if __name__ == "__main__":
    worker_main(sys.argv[1])
