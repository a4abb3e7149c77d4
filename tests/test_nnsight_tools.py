"""nnsight helpers against independent references: the hook path's logits (``reft(...)``),
``ReftModel.collect``, hook-based activation patching, hand-made hooks — plus the import contract
(importing reftkit patches nothing) and the remote request, built and run offline."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from conftest import pad_batch, patching_case, tiny_gpt2, tiny_llama, tiny_tokenizer

import reftkit
from reftkit.analysis import nnsight_interventions as ni
from reftkit.analysis import nnsight_tools as nt
from reftkit.analysis.nnsight_plan import STAGES, static_order
from reftkit.analysis.patching import activation_patching
from reftkit.structure import StructureError, resolve_site

SEQS = [[1, 5, 6, 7, 8, 9], [1, 8, 9], [1, 4]]
ROOT = Path(__file__).resolve().parents[1]


def randomized(reft, seed=1):
    """Non-trivial weights: every intervention parameter drawn at random (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in reft.interventions.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return reft.eval()


def hook_logits(reft, ids, mask, **kwargs):
    with torch.no_grad():
        return reft(input_ids=ids, attention_mask=mask, **kwargs).logits


CONFIG = [
    {"layer": [0, 2], "component": "block_output", "positions": "f1+l2", "intervention": "loreft",
     "low_rank_dimension": 2},
    {"layer": 1, "component": "mlp_output", "positions": "l1", "intervention": "noreft", "low_rank_dimension": 3},
    {"layer": 1, "component": "query_output", "positions": "l2", "intervention": "direft", "low_rank_dimension": 2,
     "act_fn": "relu"},
    {"layer": 2, "component": "block_input", "positions": "f3+l3", "intervention": "loreft",
     "low_rank_dimension": 2, "share_weights": False},
    {"layer": 0, "component": "head_value_output", "heads": [1], "positions": "l1", "intervention": "consreft",
     "low_rank_dimension": 2},
    {"layer": 2, "component": "attention_value_output", "positions": "l1", "intervention": "nodireft",
     "low_rank_dimension": 2},
]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_trace_with_interventions_equals_the_hook_path(make, side):
    model = make()
    reft = randomized(reftkit.get_reft_model(model, CONFIG))
    ids, mask = pad_batch(SEQS, side)
    ref = hook_logits(reft, ids, mask)
    bare = model(input_ids=ids, attention_mask=mask).logits.detach()
    got = ni.trace_with_interventions(model, reft, ids, mask)
    real = mask.bool()
    assert (bare - ref)[real].abs().max() > 1e-2  # the interventions do change the logits
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)
    # explicit locations, one row per intervention, with empty (-1) slots
    locs = torch.full((3, len(reft.interventions), 2), -1)
    locs[:, :, 0] = torch.tensor([0, 3, 4])[:, None]
    locs[0, :, 1] = 5
    ref = hook_logits(reft, ids, mask, intervention_locations=locs)
    got = ni.trace_with_interventions(nt.wrap(model), reft, ids, mask, intervention_locations=locs)
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)


def test_subspaces_select_the_same_rank_coordinates():
    model = tiny_llama()
    cfg = [{"layer": [0, 2], "positions": "f1+l2", "intervention": "loreft", "low_rank_dimension": 4},
           {"layer": 1, "component": "head_query_output", "heads": [0, 2], "positions": "l1",
            "intervention": "lobireft", "low_rank_dimension": 4},
           {"layer": 1, "positions": "l2", "intervention": "noreft", "low_rank_dimension": 4}]
    reft = randomized(reftkit.get_reft_model(model, cfg))
    ids, mask = pad_batch(SEQS, "left")
    real = mask.bool()
    for subspaces in ([[0, 1], [2], [1, 3]], torch.tensor([[True, False, False, True]] * 3)):
        ref = hook_logits(reft, ids, mask, subspaces=subspaces)
        assert (ref - hook_logits(reft, ids, mask))[real].abs().max() > 1e-3
        got = ni.trace_with_interventions(model, reft, ids, mask, subspaces=subspaces)
        torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)


def test_other_interventions_run_locally_through_their_own_module():
    model = tiny_llama()
    cfg = [{"layer": 1, "positions": "all", "intervention": "ia3"},
           {"layer": 0, "positions": "l2", "intervention": "lobireft", "low_rank_dimension": 2},
           {"layer": 2, "positions": "l1", "intervention": "addition", "scale": 2.0},
           {"layer": 2, "component": "mlp_output", "positions": "l1", "intervention": "collect"}]
    reft = randomized(reftkit.get_reft_model(model, cfg))
    ids, mask = pad_batch(SEQS, "left")
    real = mask.bool()
    ref = hook_logits(reft, ids, mask)
    torch.testing.assert_close(ni.trace_with_interventions(model, reft, ids, mask)[real], ref[real], atol=1e-5, rtol=0)


def test_apply_interventions_inside_your_own_trace():
    model = tiny_gpt2()
    reft = randomized(reftkit.get_reft_model(model, CONFIG))
    ids, mask = pad_batch(SEQS, "left")
    ref = hook_logits(reft, ids, mask)
    wrapped = nt.wrap(model)
    with wrapped.trace(input_ids=ids, attention_mask=mask):
        ni.apply_interventions(wrapped, reft, ids, mask)
        logits = wrapped.output.logits.save()
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_static_order_is_the_order_the_model_runs(make):
    """apply_interventions visits sites in STAGES order; check it against the hooks' firing order."""
    model = make()
    seen, handles = [], []
    for component in STAGES:
        site = resolve_site(model, 1, component)
        mod = model.get_submodule(site.module_path)
        if site.hook == "input":
            handles.append(mod.register_forward_pre_hook(lambda m, a, c=component: seen.append(c)))
        else:
            handles.append(mod.register_forward_hook(lambda m, a, o, c=component: seen.append(c)))
    model(input_ids=torch.tensor([[1, 5, 6]]))
    for h in handles:
        h.remove()
    fired = list(dict.fromkeys(seen))  # a fused q/k/v projection fires once for all three
    wanted = sorted(STAGES, key=STAGES.get)
    assert [c for c in wanted if c in fired] == fired
    sites = [[resolve_site(model, layer, c)] for layer in (2, 0) for c in ("mlp_output", "block_input")]
    groups = [{"path": s[0].module_path} for s in sites]
    assert [g["path"] for g in static_order(model, groups, sites)] == [
        sites[3][0].module_path, sites[2][0].module_path, sites[1][0].module_path, sites[0][0].module_path]


def test_capture_equals_collect_and_hidden_states():
    model = tiny_gpt2()
    ids, mask = pad_batch(SEQS, "left")
    sites = [("block_output", 1), (0, "query_output"), ("head_value_output", 2, [0, 3])]
    got = nt.capture(model, sites, ids, mask, positions="f1+l2")
    reft = reftkit.get_reft_model(model, [
        {"layer": 1, "positions": "f1+l2", "intervention": "collect"},
        {"layer": 0, "component": "query_output", "positions": "f1+l2", "intervention": "collect"},
        {"layer": 2, "component": "head_value_output", "heads": [0, 3], "positions": "f1+l2",
         "intervention": "collect"}])
    want = reft.collect(input_ids=ids, attention_mask=mask).activations
    reft.detach()
    assert set(got) == {"layer1_block_output", "layer0_query_output", "layer2_head_value_output_heads0_3"}
    torch.testing.assert_close(got["layer1_block_output"], want["layer1_block_output"], atol=0, rtol=0)
    torch.testing.assert_close(got["layer0_query_output"], want["layer0_query_output"], atol=0, rtol=0)
    torch.testing.assert_close(got["layer2_head_value_output_heads0_3"], want["layer2_head_value_output"],
                               atol=0, rtol=0)
    full = nt.capture(model, ("block_output", -1), ids, mask)["layer2_block_output"]
    hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    # GPT-2's last hidden state has ln_f applied; the block output of the last layer does not
    assert full.shape == (3, 6, 32)
    torch.testing.assert_close(model.transformer.ln_f(full), hidden[3].detach(), atol=1e-6, rtol=0)


def test_bert_modules_nnsight_renames_and_an_output_without_logits():
    """BERT's ``attention.output`` / ``output`` submodules are re-exposed by nnsight as ``E_output``;
    the helpers find envoys by module identity. BertModel returns no logits: its first output is used."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=50)).eval()
    ids, mask = pad_batch([[1, 5, 6, 7], [1, 8, 9]], "right")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nnsight announces the E_output renames
        wrapped = nt.wrap(model)
    got = nt.capture(wrapped, [("attention_output", 1), ("mlp_output", 0)], ids, mask, positions="all")
    reft = reftkit.get_reft_model(model, [
        {"layer": 1, "component": "attention_output", "positions": "all", "intervention": "collect"},
        {"layer": 0, "component": "mlp_output", "positions": "all", "intervention": "collect"}])
    want = reft.collect(input_ids=ids, attention_mask=mask).activations
    reft.detach()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)
    reft = randomized(reftkit.get_reft_model(model, [
        {"layer": 1, "component": "attention_output", "positions": "l1", "intervention": "loreft",
         "low_rank_dimension": 2},
        {"layer": 0, "component": "mlp_output", "positions": "f1", "intervention": "direft", "low_rank_dimension": 2}]))
    with torch.no_grad():
        ref = reft(input_ids=ids, attention_mask=mask).last_hidden_state
    got = ni.trace_with_interventions(wrapped, reft, ids, mask)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_patching_equals_the_hook_version_and_a_hand_patch():
    model, clean, corrupt, metric = patching_case()

    want = activation_patching(model, clean, corrupt, metric, progress=False)
    got = nt.patching_grid(model, clean, corrupt, metric)
    assert list(got.columns) == list(want.columns)
    for column in ("layer", "position"):
        assert got[column].tolist() == want[column].tolist()
    for column in ("score", "clean_score", "corrupt_score", "recovered"):
        assert got[column].tolist() == pytest.approx(want[column].tolist(), abs=1e-5)
    # one entry by hand: layer 1, position 1
    with torch.no_grad():
        src = model(**clean, output_hidden_states=True).hidden_states[2]

    def hand(m, a, o):
        h = o.clone()
        h[:, 1] = src[:, 1]
        return h
    handle = model.model.layers[1].register_forward_hook(hand)
    with torch.no_grad():
        manual = model(**corrupt).logits
    handle.remove()
    torch.testing.assert_close(nt.patch(model, clean, corrupt, layer=1, position=1), manual, atol=1e-5, rtol=0)
    assert float(nt.patch(model, clean, corrupt, 1, 1, metric=metric).mean()) == pytest.approx(
        float(metric(type("O", (), {"logits": manual})).mean()), abs=1e-5)
    # a head: only head 1's columns (8:16) of the attention output projection's input, at position 2
    o_proj, seen = model.model.layers[1].self_attn.o_proj, {}
    handle = o_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach().clone()))
    with torch.no_grad():
        model(**clean)
    handle.remove()

    def hand_head(m, a):
        x = a[0].clone()
        x[:, 2, 8:16] = seen["x"][:, 2, 8:16]
        return (x,) + a[1:]
    handle = o_proj.register_forward_pre_hook(hand_head)
    with torch.no_grad():
        manual = model(**corrupt).logits
    handle.remove()
    got = nt.patch(model, clean, corrupt, 1, 2, component="head_attention_value_output", heads=[1])
    torch.testing.assert_close(got, manual, atol=1e-5, rtol=0)


def test_errors_name_the_wrong_value():
    model = tiny_llama()
    ids, mask = pad_batch(SEQS, "right")
    with pytest.raises(StructureError, match="component='mlp_out' is not known"):
        nt.capture(model, [("mlp_out", 1)], ids, mask)
    with pytest.raises(StructureError, match="layer=7 is out of range"):
        nt.capture(model, [("block_output", 7)], ids, mask)
    reft = reftkit.get_reft_model(model, [{"layer": 2, "intervention": "loreft", "low_rank_dimension": 2}])
    with pytest.raises(ValueError, match="model mismatch: the ReftModel's base is a LlamaForCausalLM.*GPT2LMHeadModel"):
        ni.trace_with_interventions(tiny_gpt2(), reft, ids, mask)
    with pytest.raises(ValueError,
                       match="model mismatch: intervention 'layer2_block_output' does not resolve.*layer=2"):
        ni.trace_with_interventions(tiny_llama(layers=2), reft, ids, mask)
    with pytest.raises(ValueError, match="model mismatch: model is the ReftModel itself"):
        ni.trace_with_interventions(reft, reft, ids, mask)
    with pytest.raises(ValueError, match="remote=True needs a remote-capable nnsight model.*NNsight"):
        ni.trace_with_interventions(model, reft, ids, mask, remote=True)
    ia3 = reftkit.get_reft_model(tiny_llama(), [{"layer": 1, "positions": "all", "intervention": "ia3"}])
    with pytest.raises(NotImplementedError, match="'layer1_block_output' \\(IA3\\) cannot run remotely"):
        ni.trace_with_interventions(nt.wrap(ia3.model, tiny_tokenizer("left")), ia3, ids, mask, remote=True)
    swap = reftkit.get_reft_model(tiny_llama(), [{"layer": 1, "positions": "l1", "intervention": "interchange"}])
    with pytest.raises(NotImplementedError, match="read a source run"):
        ni.trace_with_interventions(swap.model, swap, ids, mask)
    raw = reftkit.get_reft_model(tiny_llama(), [
        {"layer": 1, "component": "model.layers.{layer}.mlp.down_proj:input", "intervention": "loreft",
         "low_rank_dimension": 2},
        {"layer": 1, "component": "block_output", "intervention": "loreft", "low_rank_dimension": 2}])
    with pytest.raises(NotImplementedError, match="raw module path.*shares block 1"):
        ni.intervention_editor(raw.model, raw, ids, mask)
    # ...which trace_with_interventions runs, one invoke per module
    ref = hook_logits(randomized(raw), ids, mask)
    got = ni.trace_with_interventions(raw.model, raw, ids, mask)
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)


def test_importing_reftkit_patches_nothing_and_loads_no_nnsight():
    """A fresh interpreter imports reftkit and every submodule, sub-packages included (nnsight_tools too,
    no helper called): torch.Tensor.backward, object.save and glibc's backtrace() stay as they were, nnsight
    is not loaded. Then a helper's first use imports nnsight, and the same checks see its patches (the control)."""
    code = textwrap.dedent("""
        import ctypes, importlib, json, pkgutil, sys
        import torch
        libc = ctypes.CDLL(None)
        addr = ctypes.cast(libc.backtrace, ctypes.c_void_p).value if hasattr(libc, "backtrace") else None
        code = lambda: ctypes.string_at(addr, 3) if addr else b""
        before = (torch.Tensor.backward, torch.Tensor.__dict__.get("grad"), code())
        import reftkit, reftkit.analysis, reftkit.experts, reftkit.interventions
        names = [m.name for pkg in (reftkit, reftkit.analysis, reftkit.interventions, reftkit.experts)
                 for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".") if not m.name.endswith("__main__")]
        for name in names:
            importlib.import_module(name)
        after = (torch.Tensor.backward, torch.Tensor.__dict__.get("grad"), code())
        report = {"modules": names, "same": [a is b or a == b for a, b in zip(before, after)],
                  "save": hasattr(object, "save"), "nnsight": "nnsight" in sys.modules}
        from reftkit.analysis import nnsight_tools
        nnsight_tools._nnsight()  # a helper's first call: now nnsight is imported and patches
        report["control"] = [torch.Tensor.backward is before[0], hasattr(object, "save"), code() == before[2]]
        print(json.dumps(report))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert {"reftkit.analysis.nnsight_tools", "reftkit.analysis.nnsight_interventions", "reftkit.training.trainer",
            "reftkit.cli.demo", "reftkit.experts.routing"} <= set(report["modules"])
    assert report["same"] == [True, True, True]  # backward, the grad descriptor, backtrace() bytes
    assert report["save"] is False and report["nnsight"] is False
    # control: the checks would have seen nnsight's patches (backward replaced, .save mounted)
    assert report["control"][:2] == [False, True]


class _Capture:
    """An nnsight backend that builds the request body exactly as RemoteBackend does
    (``RequestModel.serialize``), keeps it, and runs the trace locally instead of sending it."""

    def __call__(self, tracer):
        from nnsight.schema.request import RequestModel

        self.blob = RequestModel.serialize(tracer, compress=False)
        tracer.execute(tracer.info.code)


SERVER = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):  # the server has no reftkit (nor our tests)
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("reftkit", "analysis", "interventions", "conftest"):
                raise ModuleNotFoundError(f"{name} is not installed on this server")
    sys.meta_path.insert(0, Block())
    import torch
    from nnsight.modeling.transformers import TransformersModel
    from nnsight.schema.request import RequestModel
    from nnsight.tracing.tracer import dec, inc
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    folder = sys.argv[1]  # the deployed checkpoint: the client's model, config and weights
    model = GPT2LMHeadModel(GPT2Config.from_json_file(f"{folder}/config.json")).eval()
    model.load_state_dict(torch.load(f"{folder}/weights.pt"))
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, "<unk>")),
                                  pad_token="<pad>", padding_side="left")
    served = TransformersModel(model, tokenizer=tok)
    tracer = RequestModel.deserialize(open(f"{folder}/body.bin", "rb").read(), served._remoteable_persistent_objects())
    inc()
    try:
        tracer.execute(tracer.info.code)
    finally:
        dec()
    torch.save(tracer.info.frame.f_locals["logits"], f"{folder}/logits.pt")
    print("reftkit" in sys.modules)
""")


def test_remote_request_carries_weights_and_torch_only_code(tmp_path):
    from nnsight.intervention.serialization import CustomCloudUnpickler

    model = tiny_gpt2()
    cfg = [{"layer": [0, 2], "component": "block_output", "positions": "f1+l2", "intervention": "loreft",
            "low_rank_dimension": 2},
           {"layer": 1, "component": "query_output", "positions": "l2", "intervention": "noreft",
            "low_rank_dimension": 2}]
    reft = randomized(reftkit.get_reft_model(model, cfg))
    ids, mask = pad_batch(SEQS, "left")
    # TransformersModel gives a left-padded batch mask-derived position_ids; give them to both paths
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    ref = hook_logits(reft, ids, mask, position_ids=positions)
    served = nt.wrap(model, tiny_tokenizer("left"))
    backend = _Capture()
    got = ni.trace_with_interventions(served, reft, ids, mask, backend=backend, position_ids=positions)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)
    # what the body names: the modules it loads classes/functions from (find_class) or imports (subimport)
    found = set()

    class Recorder(CustomCloudUnpickler):
        def find_class(self, module, name):
            found.add(module)
            got = super().find_class(module, name)
            if name == "subimport":
                return lambda mod: found.add(mod) or got(mod)
            return got
    _, (source, glbls, variables) = Recorder(io.BytesIO(backend.blob), served._remoteable_persistent_objects()).load()
    assert "torch" in found
    assert {m.split(".")[0] for m in found} <= {"torch", "nnsight", "cloudpickle", "collections"}, found
    assert "reftkit" not in source and "nnsight_plan" not in source
    weights = [p["weights"] for g in variables["groups"] for p in g["parts"]]
    iv = reft.interventions["layer0_block_output"]
    torch.testing.assert_close(weights[0]["rot"], iv.rotation().detach(), atol=0, rtol=0)
    torch.testing.assert_close(weights[0]["w"], iv.source.weight.detach(), atol=0, rtol=0)
    # the editor for your own block: the same kernels, shipped by source inside its closure
    edit = ni.intervention_editor(served, reft, ids, mask, portable_only=True)
    user = _Capture()
    with served.trace(input_ids=ids, attention_mask=mask, position_ids=positions, backend=user):
        edit()
        logits = served.output.logits.save()
    torch.testing.assert_close(logits[real], ref[real], atol=1e-5, rtol=0)
    found.clear()
    Recorder(io.BytesIO(user.blob), served._remoteable_persistent_objects()).load()
    allowed = {"torch", "nnsight", "cloudpickle", "collections"}
    assert "torch" in found and {m.split(".")[0] for m in found} <= allowed, found
    # captures: tensors and the same kernels
    reads = _Capture()
    nt.capture(served, [("query_output", 1), ("block_output", 2)], ids, mask, positions="l1", backend=reads)
    found.clear()
    Recorder(io.BytesIO(reads.blob), served._remoteable_persistent_objects()).load()
    assert {m.split(".")[0] for m in found} <= {"torch", "nnsight", "cloudpickle", "collections"}, found
    # ...and run by a process that cannot import reftkit, as a server would
    (tmp_path / "body.bin").write_bytes(backend.blob)
    model.config.to_json_file(tmp_path / "config.json")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", SERVER, str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "False"  # reftkit never imported there
    served_logits = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(served_logits[real], ref[real], atol=1e-5, rtol=0)
