"""Generate pyreft 0.1.0 golden files for reftkit's ``ReftModel.from_pyreft`` tests.

Run ONLY inside the throwaway venv created by ``make_pyreft_goldens.sh`` (pyreft==0.1.0,
pyvene==0.1.8, transformers==4.45.1, torch==2.13.0 CPU). Nothing is downloaded from the
Hugging Face Hub: the tiny base models are built from configs with fixed seeds.

Output layout (all under tests/goldens/pyreft/):

    <arch>/base/config.json, model.safetensors     tiny base model (save_pretrained, safetensors)
    <arch>/<Intervention>/config.json               pyreft/pyvene save folder (reft_model.save)
    <arch>/<Intervention>/intkey_<key>.bin          one torch.save'd state dict per intervention
    <arch>/<Intervention>/golden.safetensors        inputs, masks, unit locations, logits
    <arch>/<Intervention>/weights.safetensors       materialised weights used by the forward
    <arch>/<Intervention>/state_dict_keys.json      keys/shapes/dtypes of every intkey_*.bin
    manifest.json                                   summary + reload-verification results
    styles/<case>/...                               saves in the forms of pyreft's examples (no flat rank,
                                                    a script-defined subclass, pyvene bracket paths):
                                                    make_pyreft_style_goldens.py

``--cases styles`` writes only ``styles/`` (from the existing ``llama/base``), leaving the per-class
goldens untouched: regenerating those on another CPU can move their logits by ~1e-6 (torch's QR
and orthogonal maps differ slightly across CPUs), which the tests tolerate but git would show.

See tests/goldens/pyreft/README.md for the format description.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import OrderedDict

import torch

try:
    import pyreft
    import pyvene
    import transformers
    from make_pyreft_style_goldens import make_style_goldens  # beside this file (the script's sys.path[0])
    from safetensors.torch import save_file
except ImportError as exc:  # pragma: no cover - guidance only
    sys.exit(
        f"import failed ({exc}); run via `bash tests/goldens/make_pyreft_goldens.sh`, "
        "which builds the throwaway venv with pyreft==0.1.0."
    )

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "pyreft")

SEED = 1234
LOW_RANK = 4
VOCAB = 128
PAD_ID = 0
SEQ_LENS = [7, 5, 3]  # three examples of different lengths -> padded to 7
N_POS = 2  # positions per example per intervention

INTERVENTIONS = [
    "LoreftIntervention",
    "NoreftIntervention",
    "DireftIntervention",
    "NodireftIntervention",
    "ConsreftIntervention",
    "LobireftIntervention",
]

# add_bias is a required constructor kwarg for the two proj_layer classes; we use both
# variants so an importer must infer it from the presence of "proj_layer.bias".
ADD_BIAS = {"NoreftIntervention": True, "NodireftIntervention": False}

# (layer, component) per representation, in ReftConfig order == reft_model.interventions
# order == unit_locations second dimension.  For llama the mlp_output on layer 1 is listed
# AFTER layer 1's block_output although it executes before it: the order is list order.
ARCHS = {
    "llama": [(0, "block_output"), (1, "block_output"), (1, "mlp_output")],
    "gpt2": [(0, "block_output"), (2, "block_output")],
}


def build_base(arch: str):
    torch.manual_seed(SEED)
    if arch == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            hidden_act="silu",
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            initializer_range=0.2,
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
            pad_token_id=PAD_ID,
            bos_token_id=1,
            eos_token_id=2,
            torch_dtype="float32",
            attn_implementation="eager",
        )
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_positions=64,
            n_embd=32,
            n_layer=3,
            n_head=4,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=1e-5,
            initializer_range=0.2,
            tie_word_embeddings=True,
            pad_token_id=PAD_ID,
            bos_token_id=1,
            eos_token_id=2,
            torch_dtype="float32",
            attn_implementation="eager",
        )
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    # make norm weights/biases non-trivial (deterministic)
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model = model.float().eval()
    return model


def make_inputs(padding_side: str, num_interventions: int):
    g = torch.Generator().manual_seed(SEED + 2)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g) for n in SEQ_LENS]
    B, T = len(seqs), max(SEQ_LENS)
    ids = torch.full((B, T), PAD_ID, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    locs = torch.zeros((B, num_interventions, N_POS), dtype=torch.long)
    for b, s in enumerate(seqs):
        n = len(s)
        start = T - n if padding_side == "left" else 0
        ids[b, start:start + n] = s
        mask[b, start:start + n] = 1
        real = list(range(start, start + n))
        patterns = [
            real[-2:],                 # intervention 0: last two real tokens
            real[:2],                  # intervention 1: first two real tokens
            [real[-1], real[0]],       # intervention 2: last + first (unsorted on purpose)
        ]
        for i in range(num_interventions):
            locs[b, i] = torch.tensor(patterns[i % len(patterns)])
    return ids, mask, locs


def make_intervention(name: str, d: int):
    cls = getattr(pyreft, name)
    kwargs = dict(embed_dim=d, low_rank_dimension=LOW_RANK, dtype=torch.float32, dropout=0.0)
    if name in ADD_BIAS:
        kwargs["add_bias"] = ADD_BIAS[name]
    # act_fn left at default (None -> ACT2FN["linear"], i.e. identity)
    return cls(**kwargs)


def random_orthonormal(d: int, r: int, g: torch.Generator) -> torch.Tensor:
    q, rr = torch.linalg.qr(torch.randn(d, r, generator=g))
    return q * torch.sign(torch.diagonal(rr)).unsqueeze(0)


@torch.no_grad()
def randomise(intv, g: torch.Generator):
    d = int(intv.embed_dim)
    if hasattr(intv, "rotate_layer"):
        q = random_orthonormal(d, LOW_RANK, g)
        # goes through torch's orthogonal parametrization right_inverse
        intv.rotate_layer.weight = q
        assert torch.allclose(intv.rotate_layer.weight, q, atol=1e-5)
    ls = intv.learned_source
    if isinstance(ls, torch.nn.Linear):
        ls.weight.copy_(0.3 * torch.randn(ls.weight.shape, generator=g))
        ls.bias.copy_(0.5 * torch.randn(ls.bias.shape, generator=g))
    else:  # Consreft / Lobireft: bare Parameter of shape [r]
        ls.copy_(0.5 * torch.randn(ls.shape, generator=g))
    if hasattr(intv, "proj_layer"):
        pl = intv.proj_layer
        pl.weight.copy_(0.3 * torch.randn(pl.weight.shape, generator=g))
        if pl.bias is not None:
            pl.bias.copy_(0.5 * torch.randn(pl.bias.shape, generator=g))


def materialised_weights(intv) -> dict:
    """The tensors the pyreft forward actually uses, with readable names."""
    out = {}
    if hasattr(intv, "rotate_layer"):
        out["R"] = intv.rotate_layer.weight.detach().clone()  # [d, r]; forward uses h @ R, x @ R.T
    ls = intv.learned_source
    if isinstance(ls, torch.nn.Linear):
        out["W"] = ls.weight.detach().clone()  # [r, d]
        out["b"] = ls.bias.detach().clone()  # [r]
    else:
        out["b"] = ls.detach().clone()  # [r]
    if hasattr(intv, "proj_layer"):
        out["W2"] = intv.proj_layer.weight.detach().clone()  # [r, d]
        if intv.proj_layer.bias is not None:
            out["b2"] = intv.proj_layer.bias.detach().clone()  # [r]
    return out


def build_reft(model, arch: str, name: str, d: int):
    reps = []
    for layer, comp in ARCHS[arch]:
        reps.append({
            "layer": layer,
            "component": comp,
            "low_rank_dimension": LOW_RANK,
            "intervention": make_intervention(name, d),
        })
    cfg = pyreft.ReftConfig(representations=reps)
    reft_model = pyreft.get_reft_model(model, cfg, set_device=False)
    return reft_model


def set_eval(reft_model):
    reft_model.eval()  # NB: pyvene's eval() only touches reft_model.model ...
    for v in reft_model.interventions.values():
        v.eval()  # ... so interventions (dropout) must be switched explicitly


@torch.no_grad()
def reft_logits(reft_model, ids, mask, locs):
    _, out = reft_model(
        {"input_ids": ids, "attention_mask": mask},
        unit_locations={"sources->base": (None, locs.permute(1, 0, 2).tolist())},
    )
    return out.logits.float()


def st_meta(d: dict) -> dict:
    # one key only: safetensors 0.8 writes multi-key metadata in hash order (not byte-stable)
    return {"meta": json.dumps(d, sort_keys=True)}


def rotation_from_state_dict(sd) -> torch.Tensor:
    """R [d, r] as pyreft's forward sees it, rebuilt from an intkey_*.bin state dict.

    LoReFT stores the materialised R under "rotate_layer".  Direft/Consreft/Lobireft use the
    default nn.Module.state_dict, i.e. torch's orthogonal parametrization internals
    (householder map because d != r, use_trivialization=True):
        X = original [d, r]; A = X.tril(-1); tau = 2 / (1 + (A*A).sum(-2))
        Q = householder_product(A, tau) * X.diagonal().int()      # [d, r]
        R = base [d, d] @ Q
    """
    if "rotate_layer" in sd:
        return sd["rotate_layer"]
    X = sd["rotate_layer.parametrizations.weight.original"]
    base = sd["rotate_layer.parametrizations.weight.0.base"]
    A = X.tril(diagonal=-1)
    tau = 2.0 / (1.0 + (A * A).sum(dim=-2))
    Q = torch.linalg.householder_product(A, tau)
    Q = Q * X.diagonal(dim1=-2, dim2=-1).int().unsqueeze(-2)
    return base @ Q


def handwritten_delta_fn(name, w):
    """Pyreft forward formulas (eval mode, act_fn = identity) from weights.safetensors tensors."""
    if name == "LoreftIntervention":
        return lambda h: h + (h @ w["W"].T + w["b"] - h @ w["R"]) @ w["R"].T
    if name == "NoreftIntervention":
        b2 = w.get("b2", 0.0)
        return lambda h: h + (h @ w["W"].T + w["b"] - (h @ w["W2"].T + b2)) @ w["W2"]
    if name == "DireftIntervention":
        return lambda h: h + (h @ w["W"].T + w["b"]) @ w["R"].T
    if name == "NodireftIntervention":
        return lambda h: h + (h @ w["W"].T + w["b"]) @ w["W2"]
    if name == "ConsreftIntervention":
        return lambda h: h + (w["b"] - h @ w["R"]) @ w["R"].T
    if name == "LobireftIntervention":
        return lambda h: h + w["b"] @ w["R"].T
    raise ValueError(name)


MODULE_PATHS = {  # pyvene's mapping for the *ForCausalLM classes (all forward hooks = outputs)
    ("llama", "block_output"): "model.layers.{}",
    ("llama", "mlp_output"): "model.layers.{}.mlp",
    ("gpt2", "block_output"): "transformer.h.{}",
}


@torch.no_grad()
def handwritten_logits(model, arch, name, weights, ids, mask, locs):
    """Independent re-implementation with plain torch hooks (no pyvene)."""
    handles = []
    for i, (layer, comp) in enumerate(ARCHS[arch]):
        w = {k.split(".", 1)[1]: v for k, v in weights.items() if k.startswith(f"{i}.")}
        fn = handwritten_delta_fn(name, w)
        module = model.get_submodule(MODULE_PATHS[(arch, comp)].format(layer))
        pos = locs[:, i, :]  # [B, P]

        def hook(mod, args, output, fn=fn, pos=pos):
            h = output[0] if isinstance(output, tuple) else output
            bidx = torch.arange(h.shape[0]).unsqueeze(1)
            h[bidx, pos] = fn(h[bidx, pos])  # in place, like pyvene's scatter_neurons

        handles.append(module.register_forward_hook(hook))
    try:
        return model(input_ids=ids, attention_mask=mask).logits.float()
    finally:
        for hd in handles:
            hd.remove()


def state_dict_summary(path: str) -> dict:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return OrderedDict(
        (k, {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")})
        for k, v in sd.items()
    )


def verify_reload(arch, name, base_dir, save_dir, batches, d):
    """Reload with pyreft's own ReftModel.load and compare logits; also a manual reload."""
    res = {}
    # (a) plain pyreft.ReftModel.load
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()
    try:
        loaded = pyreft.ReftModel.load(save_dir, model)
        set_eval(loaded)
        dtypes = sorted({str(p.dtype) for v in loaded.interventions.values() for p in v.parameters()})
        try:
            diffs = [
                (reft_logits(loaded, ids, mask, locs) - ref).abs().max().item()
                for ids, mask, locs, ref in batches
            ]
            res["pyreft_load_plain"] = {"ok": True, "param_dtypes": dtypes, "max_abs_diff": max(diffs)}
        except Exception as exc:  # noqa: BLE001
            res["pyreft_load_plain"] = {"ok": False, "param_dtypes": dtypes,
                                        "forward_error": f"{type(exc).__name__}: {exc}"}
        # (b) same object, fixed up: cast interventions to fp32, re-load the .bin state dicts
        for k, v in loaded.interventions.items():
            v.to(torch.float32)
            v.load_state_dict(torch.load(os.path.join(save_dir, f"intkey_{k}.bin"), weights_only=True))
        set_eval(loaded)
        diffs = [
            (reft_logits(loaded, ids, mask, locs) - ref).abs().max().item()
            for ids, mask, locs, ref in batches
        ]
        res["pyreft_load_fp32_fixup"] = {"ok": max(diffs) <= 1e-5, "max_abs_diff": max(diffs)}
    except Exception as exc:  # noqa: BLE001
        res["pyreft_load_plain"] = {"ok": False, "load_error": f"{type(exc).__name__}: {exc}"}
    # (c) manual: fresh fp32 instances (different random init) + state dicts from the .bin files
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()
    torch.manual_seed(SEED + 999)
    fresh = build_reft(model, arch, name, d)
    for k, v in fresh.interventions.items():
        v.load_state_dict(torch.load(os.path.join(save_dir, f"intkey_{k}.bin"), weights_only=True))
    set_eval(fresh)
    diffs = [
        (reft_logits(fresh, ids, mask, locs) - ref).abs().max().item()
        for ids, mask, locs, ref in batches
    ]
    res["manual_fp32_instances_plus_bins"] = {"ok": max(diffs) <= 1e-5, "max_abs_diff": max(diffs)}
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--cases", choices=("all", "classes", "styles"), default="all",
                    help="classes: <arch>/<Intervention>/ and manifest.json; styles: styles/ only")
    args = ap.parse_args()
    t0 = time.time()
    torch.set_num_threads(1)  # bitwise-stable CPU matmuls run to run
    torch.use_deterministic_algorithms(True)

    out_root = args.out
    if args.cases == "styles":
        make_style_goldens(out_root, sys.modules[__name__])
        print(f"done in {time.time() - t0:.1f}s -> {out_root}/styles")
        return
    for arch in ARCHS:
        shutil.rmtree(os.path.join(out_root, arch), ignore_errors=True)
    os.makedirs(out_root, exist_ok=True)

    manifest = OrderedDict(
        versions=OrderedDict(
            python=sys.version.split()[0],
            torch=torch.__version__,
            transformers=transformers.__version__,
            pyreft=getattr(pyreft, "__version__", "0.1.0"),
            pyvene=getattr(pyvene, "__version__", "0.1.8"),
        ),
        seed=SEED,
        low_rank_dimension=LOW_RANK,
        seq_lens=SEQ_LENS,
        pad_token_id=PAD_ID,
        archs=OrderedDict(),
    )
    try:
        from importlib.metadata import version
        manifest["versions"]["pyreft"] = version("pyreft")
        manifest["versions"]["pyvene"] = version("pyvene")
        manifest["versions"]["safetensors"] = version("safetensors")
    except Exception:  # noqa: BLE001
        pass

    for arch, reps in ARCHS.items():
        base = build_base(arch)
        d = base.config.hidden_size
        base_dir = os.path.join(out_root, arch, "base")
        base.save_pretrained(base_dir, safe_serialization=True)
        # save_pretrained drops values equal to the class default (gpt2: tie_word_embeddings=True);
        # write it explicitly so no reader has to rely on a default.
        cfg_path = os.path.join(base_dir, "config.json")
        with open(cfg_path) as f:
            cfg_json = json.load(f)
        cfg_json["tie_word_embeddings"] = bool(base.config.tie_word_embeddings)
        with open(cfg_path, "w") as f:
            json.dump(dict(sorted(cfg_json.items())), f, indent=2)
            f.write("\n")
        n_int = len(reps)
        inputs = {side: make_inputs(side, n_int) for side in ("left", "right")}
        with torch.no_grad():
            base_logits = {
                side: base(input_ids=ids, attention_mask=mask).logits.float()
                for side, (ids, mask, _) in inputs.items()
            }
            # HF 4.45 llama/gpt2 derive position ids from arange(seq_len), NOT from the mask
            position_ids = torch.arange(max(SEQ_LENS)).unsqueeze(0).expand(len(SEQ_LENS), -1).contiguous()
            for side, (ids, mask, _) in inputs.items():
                explicit = base(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
                assert torch.equal(explicit, base_logits[side]), "implicit position ids are not arange"
        base_golden = {}
        for side, (ids, mask, _) in inputs.items():
            base_golden[f"{side}.input_ids"] = ids
            base_golden[f"{side}.attention_mask"] = mask
            base_golden[f"{side}.position_ids"] = position_ids.clone()
            base_golden[f"{side}.logits"] = base_logits[side].contiguous()
        save_file(base_golden, os.path.join(out_root, arch, "base_logits.safetensors"),
                  metadata=st_meta({"arch": arch, "note": "plain base model forward, no interventions"}))
        arch_info = OrderedDict(
            base_class=type(base).__name__,
            representations=[{"layer": layer, "component": c} for layer, c in reps],
            interventions=OrderedDict(),
        )
        for idx, name in enumerate(INTERVENTIONS):
            torch.manual_seed(SEED + 10 * idx)
            reft_model = build_reft(base, arch, name, d)
            g = torch.Generator().manual_seed(SEED + 100 + idx)
            for v in reft_model.interventions.values():
                randomise(v, g)
            set_eval(reft_model)

            save_dir = os.path.join(out_root, arch, name)
            reft_model.save(save_directory=save_dir)

            keys = list(reft_model.interventions.keys())
            assert keys == list(reft_model.sorted_keys)
            golden = {}
            batches = []
            for side, (ids, mask, locs) in inputs.items():
                logits = reft_logits(reft_model, ids, mask, locs)
                # determinism check
                assert torch.equal(logits, reft_logits(reft_model, ids, mask, locs))
                # interventions must actually change the output at the intervened rows
                assert (logits - base_logits[side]).abs().max() > 1e-2, (arch, name, side)
                golden[f"{side}.input_ids"] = ids
                golden[f"{side}.attention_mask"] = mask
                golden[f"{side}.position_ids"] = position_ids.clone()  # implicit in the pyreft call
                golden[f"{side}.unit_locations"] = locs  # [batch, num_interventions, positions]
                golden[f"{side}.logits"] = logits.contiguous()
                batches.append((ids, mask, locs, logits))
            meta = {
                "arch": arch,
                "intervention": name,
                "intervention_keys": keys,
                "unit_locations_layout": "[batch, num_interventions, positions]; pass to pyreft as "
                                         "{'sources->base': (None, locs.permute(1,0,2).tolist())}",
                "dtype": "float32",
            }
            save_file(golden, os.path.join(save_dir, "golden.safetensors"), metadata=st_meta(meta))

            weights = {}
            wmeta = {"arch": arch, "intervention": name, "intervention_keys": keys}
            for i, (k, v) in enumerate(reft_model.interventions.items()):
                layer, comp = reps[i]
                wmeta[f"{i}.key"] = k
                wmeta[f"{i}.layer"] = str(layer)
                wmeta[f"{i}.component"] = comp
                for wn, t in materialised_weights(v).items():
                    weights[f"{i}.{wn}"] = t.contiguous()
            save_file(weights, os.path.join(save_dir, "weights.safetensors"), metadata=st_meta(wmeta))

            for i, k in enumerate(keys):
                sd = torch.load(os.path.join(save_dir, f"intkey_{k}.bin"), weights_only=True)
                if f"{i}.R" in weights:
                    assert torch.equal(rotation_from_state_dict(sd), weights[f"{i}.R"]), (arch, name, k)

            for side, (ids, mask, locs) in inputs.items():
                hw = handwritten_logits(base, arch, name, weights, ids, mask, locs)
                diff = (hw - golden[f"{side}.logits"]).abs().max().item()
                assert diff <= 1e-5, (arch, name, side, diff)

            sd_summary = OrderedDict(
                (f"intkey_{k}.bin", state_dict_summary(os.path.join(save_dir, f"intkey_{k}.bin")))
                for k in keys
            )
            with open(os.path.join(save_dir, "state_dict_keys.json"), "w") as f:
                json.dump(sd_summary, f, indent=2)
                f.write("\n")

            verification = verify_reload(arch, name, base_dir, save_dir, batches, d)
            arch_info["interventions"][name] = OrderedDict(
                keys=keys,
                add_bias=ADD_BIAS.get(name),
                verification=verification,
            )
            status = {k: v.get("ok") for k, v in verification.items()}
            print(f"[{arch}] {name}: saved {len(keys)} interventions; reload: {status}", flush=True)
            if not verification["manual_fp32_instances_plus_bins"]["ok"]:
                raise SystemExit(f"reload mismatch for {arch}/{name}: {verification}")
            if "pyreft_load_fp32_fixup" in verification and not verification["pyreft_load_fp32_fixup"]["ok"]:
                raise SystemExit(f"reload mismatch for {arch}/{name}: {verification}")
        manifest["archs"][arch] = arch_info

    with open(os.path.join(out_root, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    if args.cases == "all":
        make_style_goldens(out_root, sys.modules[__name__])
    print(f"done in {time.time() - t0:.1f}s -> {out_root}")


if __name__ == "__main__":
    main()
