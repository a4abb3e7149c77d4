"""Per-call inputs of a ReftModel call — source runs, subspaces, task routing, collection, head-level
sites and "all"-position interventions at decode — each checked against a hand-written hook."""
from __future__ import annotations

import pytest
import torch
from conftest import pad_batch, tiny_gpt2, tiny_llama
from torch import nn

import reftkit
from reftkit.interventions import Intervention
from reftkit.structure import StructureError, resolve_site

SEQS = [[5, 9, 14, 22, 7], [11, 3, 8], [30, 31, 32, 33, 34, 35, 36]]
SRC = [[40, 41, 42, 43], [50, 51, 52, 53, 54, 55], [60, 61, 62]]


# -- test-local interventions: the smallest members of each protocol ---------------------------
class Swap(Intervention):
    """h' = source (pure interchange)."""
    name = "_test_swap"
    uses_source = True

    def __init__(self, embed_dim: int | None = None) -> None:
        Intervention.__init__(self, embed_dim)

    def build(self, embed_dim: int) -> None:
        pass

    def forward(self, h, source):
        return source.to(h.dtype)


class Shift(Intervention):
    """h' = h + scale * v (v fixed by seed)."""
    name = "_test_shift"

    def __init__(self, embed_dim: int | None = None, seed: int = 0, scale: float = 1.0) -> None:
        Intervention.__init__(self, embed_dim, seed=seed, scale=scale)

    def build(self, embed_dim: int) -> None:
        g = torch.Generator().manual_seed(self.hparams["seed"])
        self.v = nn.Parameter(torch.randn(embed_dim, generator=g))

    def forward(self, h):
        return h + self.hparams["scale"] * self.v.to(h.dtype)


class Scale(Intervention):
    """h' = l * h (an IA3-like every-position edit)."""
    name = "_test_scale"

    def __init__(self, embed_dim: int | None = None, seed: int = 0) -> None:
        Intervention.__init__(self, embed_dim, seed=seed)

    def build(self, embed_dim: int) -> None:
        g = torch.Generator().manual_seed(self.hparams["seed"])
        self.l = nn.Parameter(1 + 0.5 * torch.randn(embed_dim, generator=g))

    def forward(self, h):
        return h * self.l.to(h.dtype)


class Coords(Intervention):
    """h' = h + sum of the rows of V selected by the subspace mask (all rows without one)."""
    name = "_test_coords"
    uses_subspaces = True

    def __init__(self, embed_dim: int | None = None, low_rank_dimension: int = 4) -> None:
        Intervention.__init__(self, embed_dim, low_rank_dimension=low_rank_dimension)

    @property
    def rank(self) -> int:
        return self.hparams["low_rank_dimension"]

    def build(self, embed_dim: int) -> None:
        self.V = nn.Parameter(torch.randn(self.rank, embed_dim))

    def forward(self, h, subspaces=None):
        m = torch.ones(self.rank) if subspaces is None else subspaces.float()
        return h + (m @ self.V).to(h.dtype)


class Record(Intervention):
    name = "_test_record"
    collects = True

    def __init__(self, embed_dim: int | None = None) -> None:
        Intervention.__init__(self, embed_dim)

    def build(self, embed_dim: int) -> None:
        pass

    def forward(self, h):
        return h


def hooked(model, module_path, fn):
    """Reference: a plain forward hook on one module; fn(output_tensor) -> new tensor."""
    module = model.get_submodule(module_path)

    def hook(mod, args, out):
        if isinstance(out, tuple):
            return (fn(out[0]), *out[1:])
        return fn(out)
    return module.register_forward_hook(hook)


def block_path(model, layer):
    return resolve_site(model, layer, "block_output").module_path


# -- sources ---------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("side", ["left", "right"])
def test_interchange_from_a_source_run_matches_manual_patching(build, side):
    model = build()
    ids, mask = pad_batch(SEQS, side)
    src_ids, src_mask = pad_batch(SRC, side)
    reft = reftkit.get_reft_model(model, [{"layer": 1, "component": "block_output", "positions": "l2",
                                           "intervention": Swap()}])
    out = reft(input_ids=ids, attention_mask=mask, sources={"input_ids": src_ids, "attention_mask": src_mask}).logits

    # reference: hidden states of the source run, written by hand into the last two real tokens
    base = reft.detach()
    with torch.no_grad():
        src_h = base(input_ids=src_ids, attention_mask=src_mask, output_hidden_states=True).hidden_states[2]

    def last_two(m):
        n = m.sum(1)
        start = m.argmax(1)
        return torch.stack([start + n - 2, start + n - 1], 1)
    b_pos, s_pos = last_two(mask), last_two(src_mask)

    def patch(h):
        h = h.clone()
        for b in range(h.shape[0]):
            h[b, b_pos[b]] = src_h[b, s_pos[b]]
        return h
    handle = hooked(base, block_path(base, 1), patch)
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    handle.remove()
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)


def test_interchange_is_batch_invariant():
    model = tiny_llama()
    reft = reftkit.get_reft_model(model, [{"layer": [0, 2], "component": "block_output", "positions": "f1+l1",
                                           "intervention": Swap()}])
    ids, mask = pad_batch(SEQS, "left")
    src_ids, src_mask = pad_batch(SRC, "left")
    source = {"input_ids": src_ids, "attention_mask": src_mask}
    together = reft(input_ids=ids, attention_mask=mask, sources=source).logits
    for b in range(len(SEQS)):
        one_ids, one_mask = pad_batch([SEQS[b]], "left")
        s_ids, s_mask = pad_batch([SRC[b]], "left")
        alone = reft(input_ids=one_ids, attention_mask=one_mask,
                     sources={"input_ids": s_ids, "attention_mask": s_mask}).logits[0]
        n = len(SEQS[b])
        torch.testing.assert_close(together[b, -n:], alone[-n:], atol=1e-5, rtol=1e-5)


def test_explicit_source_locations_and_two_sources():
    model = tiny_llama(layers=4)  # hidden_states[-1] has the final norm applied: keep layer 2 inside
    reft = reftkit.get_reft_model(model, [
        {"layer": 0, "component": "block_output", "positions": "l1", "intervention": Swap()},
        {"layer": 2, "component": "block_output", "positions": "l1", "intervention": Swap(), "source": 1}])
    ids, mask = pad_batch(SEQS, "right")
    s0, m0 = pad_batch(SRC, "right")
    s1 = torch.full_like(s0, 17)
    locs0 = torch.tensor([[0], [1], [2]])
    out = reft(input_ids=ids, attention_mask=mask, sources=[{"input_ids": s0, "attention_mask": m0},
                                                             {"input_ids": s1, "attention_mask": m0}],
               source_locations=[locs0, None]).logits
    base = reft.detach()
    with torch.no_grad():
        h0 = base(input_ids=s0, attention_mask=m0, output_hidden_states=True).hidden_states[1]
        h1 = base(input_ids=s1, attention_mask=m0, output_hidden_states=True).hidden_states[3]
    last = mask.sum(1) - 1
    last_src = m0.sum(1) - 1
    rows = torch.arange(3)

    def at0(h):
        h = h.clone()
        h[rows, last] = h0[rows, locs0[:, 0]]
        return h

    def at2(h):
        h = h.clone()
        h[rows, last] = h1[rows, last_src]
        return h
    handles = [hooked(base, block_path(base, 0), at0), hooked(base, block_path(base, 2), at2)]
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    for h in handles:
        h.remove()
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)


def test_source_errors_are_clear():
    model = tiny_llama()
    reft = reftkit.get_reft_model(model, [{"layer": 1, "component": "block_output", "positions": "l1",
                                           "intervention": Swap()}])
    ids, mask = pad_batch(SEQS, "right")
    with pytest.raises(ValueError, match="read a source run: pass sources"):
        reft(input_ids=ids, attention_mask=mask)
    s, m = pad_batch(SRC[:2], "right")
    with pytest.raises(ValueError, match="sources\\[0\\] has batch size 2, the base inputs 3"):
        reft(input_ids=ids, attention_mask=mask, sources={"input_ids": s, "attention_mask": m})
    s, m = pad_batch(SRC, "right")
    with pytest.raises(ValueError, match="example 0: .* acts on 1 positions of the base but its source run has 0"):
        reft(input_ids=ids, attention_mask=mask, sources={"input_ids": s, "attention_mask": m},
             source_locations=torch.tensor([[-1], [0], [0]]))
    second = reftkit.get_reft_model(tiny_llama(),
                                    [{"layer": 1, "positions": "l1", "intervention": Swap(), "source": 1}])
    with pytest.raises(ValueError, match=r"read source batches \[1\], but only 1 source batch"):
        second(input_ids=ids, attention_mask=mask, sources={"input_ids": s, "attention_mask": m})
    plain = reftkit.get_reft_model(tiny_llama(), [{"layer": 1, "intervention": Shift()}])
    with pytest.raises(ValueError, match="no intervention of this model reads a source run"):
        plain(input_ids=ids, attention_mask=mask, sources={"input_ids": s, "attention_mask": m})


def test_source_run_stops_after_the_last_recorded_layer():
    model = tiny_llama(layers=3)
    reft = reftkit.get_reft_model(model, [{"layer": 0, "component": "block_output", "positions": "l1",
                                           "intervention": Swap()}])
    calls = []
    handle = model.model.layers[2].register_forward_hook(lambda *a: calls.append(1))
    ids, mask = pad_batch(SEQS, "right")
    s, m = pad_batch(SRC, "right")
    reft(input_ids=ids, attention_mask=mask, sources={"input_ids": s, "attention_mask": m})
    handle.remove()
    assert len(calls) == 1  # the base run only: the source run stopped after layer 0


# -- subspaces -------------------------------------------------------------------------------
def test_subspaces_select_rank_rows_per_example():
    model = tiny_llama()
    torch.manual_seed(3)
    reft = reftkit.get_reft_model(model, [{"layer": 1, "component": "block_output", "positions": "l1",
                                           "intervention": Coords(low_rank_dimension=4)}])
    V = next(iter(reft.interventions.values())).V.detach()
    ids, mask = pad_batch(SEQS, "right")
    chosen = [[0, 1], [2], [3, 0, 1]]
    out = reft(input_ids=ids, attention_mask=mask, subspaces=chosen).logits
    as_mask = torch.zeros(3, 4, dtype=torch.bool)
    for b, c in enumerate(chosen):
        as_mask[b, c] = True
    out_mask = reft(input_ids=ids, attention_mask=mask, subspaces=as_mask).logits
    base = reft.detach()
    last = mask.sum(1) - 1

    def add(h):
        h = h.clone()
        for b, c in enumerate(chosen):
            h[b, last[b]] += V[c].sum(0)
        return h
    handle = hooked(base, block_path(base, 1), add)
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    handle.remove()
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_mask, out)


def test_subspace_outside_the_rank_is_refused():
    reft = reftkit.get_reft_model(tiny_llama(), [{"layer": 1, "intervention": Coords(low_rank_dimension=4)}])
    ids, mask = pad_batch(SEQS, "right")
    with pytest.raises(ValueError,
                       match=r"subspaces\[1\] index 4 is outside the rank 4 of intervention 'layer1_block_output'"):
        reft(input_ids=ids, attention_mask=mask, subspaces=[[0], [4], [1]])
    plain = reftkit.get_reft_model(tiny_llama(), [{"layer": 1, "intervention": Shift()}])
    with pytest.raises(ValueError, match="no intervention of this model uses subspaces"):
        plain(input_ids=ids, attention_mask=mask, subspaces=[[0], [0], [0]])


# -- mixed-task batches ----------------------------------------------------------------------
def mixed_config():
    return [{"layer": 1, "component": "block_output", "positions": "l2", "intervention": Shift(seed=1), "task": "a"},
            {"layer": 1, "component": "block_output", "positions": "l2", "intervention": Shift(seed=2), "task": "b"},
            {"layer": 2, "component": "block_output", "positions": "all", "intervention": Shift(seed=3), "task": "b"},
            {"layer": 2, "component": "block_output", "positions": "all", "intervention": Shift(seed=5, scale=0.7),
             "task": "a"},
            {"layer": 0, "component": "block_output", "positions": "f1", "intervention": Shift(seed=4, scale=0.3)}]


def single_config(task):
    return [{k: v for k, v in e.items() if k != "task"} for e in mixed_config() if e.get("task") in (task, None)]


@pytest.mark.parametrize("side", ["left", "right"])
def test_mixed_task_rows_equal_each_task_alone(side):
    tasks = ["a", "b", None, "b"]
    seqs = SEQS + [[12, 13, 14, 15]]
    ids, mask = pad_batch(seqs, side)
    mixed = reftkit.get_reft_model(tiny_llama(), mixed_config())
    out = mixed(input_ids=ids, attention_mask=mask, tasks=tasks).logits
    for task in ("a", "b", None):
        alone = reftkit.get_reft_model(tiny_llama(), single_config(task))
        ref = alone(input_ids=ids, attention_mask=mask).logits
        for b, t in enumerate(tasks):
            if t == task:
                real = mask[b].bool()
                torch.testing.assert_close(out[b, real], ref[b, real], atol=1e-5, rtol=1e-5)
    # task indices work as well as names (what a data collator can put in a tensor)
    ids_t = torch.tensor([mixed.task_names.index(t) if t else -1 for t in tasks])
    torch.testing.assert_close(mixed(input_ids=ids, attention_mask=mask, tasks=ids_t).logits, out)


def test_mixed_task_generate_equals_each_task_alone():
    tasks = ["b", "a", None]
    ids, mask = pad_batch(SEQS, "left")
    mixed = reftkit.get_reft_model(tiny_llama(), mixed_config())
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = mixed.generate(input_ids=ids, attention_mask=mask, tasks=tasks, **kw)
    for b, task in enumerate(tasks):
        alone = reftkit.get_reft_model(tiny_llama(), single_config(task))
        one_ids, one_mask = pad_batch([SEQS[b]], "left")
        ref = alone.generate(input_ids=one_ids, attention_mask=one_mask, **kw)
        assert out[b, -6:].tolist() == ref[0, -6:].tolist()


def test_task_errors_are_clear():
    mixed = reftkit.get_reft_model(tiny_llama(), mixed_config())
    ids, mask = pad_batch(SEQS, "right")
    with pytest.raises(ValueError, match=r"tasks\[1\] = 'c' is not a task of this model; its tasks are \['a', 'b'\]"):
        mixed(input_ids=ids, attention_mask=mask, tasks=["a", "c", None])
    with pytest.raises(ValueError, match="routes rows by task"):
        mixed(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="tasks has 2 entries, the batch has 3 rows"):
        mixed(input_ids=ids, attention_mask=mask, tasks=["a", "b"])
    plain = reftkit.get_reft_model(tiny_llama(), single_config("a"))
    with pytest.raises(ValueError, match="no intervention of this model belongs to a task"):
        plain(input_ids=ids, attention_mask=mask, tasks=["a", "a", "a"])


def test_tasks_survive_save_and_load(tmp_path):
    mixed = reftkit.get_reft_model(tiny_llama(), [
        {"layer": 1, "intervention": "loreft", "task": "x"}, {"layer": 1, "intervention": "loreft", "task": "y"}])
    mixed.save_pretrained(tmp_path)
    loaded = reftkit.ReftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.task_names == ["x", "y"]
    ids, mask = pad_batch(SEQS, "right")
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask, tasks=["y", "x", None]).logits,
                               mixed(input_ids=ids, attention_mask=mask, tasks=["y", "x", None]).logits)


# -- composition at one site -----------------------------------------------------------------
def test_interventions_at_one_site_apply_in_config_order():
    first, second = Scale(seed=5), Shift(seed=6)
    reft = reftkit.get_reft_model(tiny_llama(), [
        {"layer": 1, "positions": "l1", "intervention": first},
        {"layer": 1, "positions": "l1", "intervention": second}])
    scale, shift = [iv for iv in reft.interventions.values()]
    ids, mask = pad_batch(SEQS, "right")
    out = reft(input_ids=ids, attention_mask=mask).logits
    base = reft.detach()
    last = mask.sum(1) - 1
    rows = torch.arange(3)

    def both(h):
        h = h.clone()
        h[rows, last] = h[rows, last] * scale.l.detach() + shift.v.detach()  # scale first, then shift
        return h
    handle = hooked(base, block_path(base, 1), both)
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    handle.remove()
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)


# -- collection ------------------------------------------------------------------------------
def test_collect_returns_the_rows_at_the_positions():
    model = tiny_llama()
    reft = reftkit.get_reft_model(model, [{"layer": 1, "component": "block_output", "positions": "f1+l2",
                                           "intervention": Record()}])
    ids, mask = pad_batch(SEQS, "left")
    got = reft.collect(input_ids=ids, attention_mask=mask)
    acts, valid = got.activations["layer1_block_output"], got.valid["layer1_block_output"]
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
    assert acts.shape == (3, 3, 32) and bool(valid.all())
    for b, seq in enumerate(SEQS):
        start = ids.shape[1] - len(seq)
        for p, pos in enumerate([start, ids.shape[1] - 2, ids.shape[1] - 1]):
            torch.testing.assert_close(acts[b, p], hidden[b, pos])
    torch.testing.assert_close(got.output.logits, model(input_ids=ids, attention_mask=mask).logits)


# -- head-level components -------------------------------------------------------------------
@pytest.mark.parametrize("component, module, n_heads", [
    ("head_value_output", "v_proj", 2), ("head_key_output", "k_proj", 2), ("head_query_output", "q_proj", 4)])
def test_head_level_sites_edit_only_their_heads(component, module, n_heads):
    model = tiny_llama()  # 4 query heads, 2 key/value heads (GQA), head_dim 8
    site = resolve_site(model, 1, component, [1])
    assert (site.width, site.num_heads, site.heads) == (8, n_heads, (1,))
    reft = reftkit.get_reft_model(model, [{"layer": 1, "component": component, "heads": [1],
                                           "positions": "l1", "intervention": Shift(seed=7)}])
    v = next(iter(reft.interventions.values())).v.detach()
    ids, mask = pad_batch(SEQS, "right")
    out = reft(input_ids=ids, attention_mask=mask).logits
    base = reft.detach()
    last = mask.sum(1) - 1

    def edit(h):
        h = h.clone()
        h[torch.arange(3), last, 8:16] += v  # head 1 = columns 8..15
        return h
    handle = hooked(base, f"model.layers.1.self_attn.{module}", edit)
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    handle.remove()
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)


def test_head_level_on_fused_gpt2_attention():
    model = tiny_gpt2()  # c_attn = [q | k | v], 4 heads of 8
    reft = reftkit.get_reft_model(model, [{"layer": 0, "component": "head_value_output", "heads": [0, 3],
                                           "positions": "l1", "intervention": Shift(seed=8)}])
    v = next(iter(reft.interventions.values())).v.detach()
    ids, mask = pad_batch(SEQS, "right")
    out = reft(input_ids=ids, attention_mask=mask).logits
    base = reft.detach()
    last = mask.sum(1) - 1

    def edit(h):
        h = h.clone()
        for head in (0, 3):
            h[torch.arange(3), last, 64 + 8 * head:64 + 8 * (head + 1)] += v
        return h
    handle = hooked(base, "transformer.h.0.attn.c_attn", edit)
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    handle.remove()
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)


def test_head_index_out_of_range_is_refused_at_attach():
    with pytest.raises(reftkit.ConfigError, match=r"heads=\[2\]: head 2 is out of range; head_value_output of "
                                                  r"LlamaForCausalLM has 2 key/value heads \(0..1\)"):
        reftkit.get_reft_model(tiny_llama(), [{"layer": 0, "component": "head_value_output", "heads": [2],
                                               "intervention": "loreft", "low_rank_dimension": 2}])
    with pytest.raises(reftkit.ConfigError, match="is head-level: give heads"):
        reftkit.ReftConfig([{"layer": 0, "component": "head_query_output"}])
    with pytest.raises(reftkit.ConfigError, match="needs a head-level component"):
        reftkit.ReftConfig([{"layer": 0, "component": "block_output", "heads": [0]}])
    with pytest.raises(StructureError, match="needs heads"):
        resolve_site(tiny_llama(), 0, "head_query_output")


# -- every-position interventions during decoding ----------------------------------------------
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_all_position_interventions_also_edit_decoded_tokens(build):
    model = build()
    reft = reftkit.get_reft_model(model, [{"layer": 1, "component": "mlp_output", "positions": "all",
                                           "intervention": Scale(seed=9)},
                                          {"layer": 1, "component": "block_output", "positions": "all",
                                           "intervention": Shift(seed=11)},
                                          {"layer": 0, "positions": "l1", "intervention": Shift(seed=10)}])
    scale, every, shift = [iv.l.detach() if hasattr(iv, "l") else iv.v.detach() for iv in reft.interventions.values()]
    ids, mask = pad_batch(SEQS, "left")
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    out = reft.generate(input_ids=ids, attention_mask=mask, **kw)
    base = reft.detach()
    # reference: a greedy loop without cache; the scale hits every token, the shift the last prompt token
    seq, m = ids.clone(), mask.clone()
    prompt_last = ids.shape[1] - 1
    mlp = resolve_site(base, 1, "mlp_output").module_path
    handles = [hooked(base, mlp, lambda h: h * scale), hooked(base, block_path(base, 1), lambda h: h + every),
               hooked(base, block_path(base, 0), lambda h: torch.cat(
                   [h[:, :prompt_last], h[:, prompt_last:prompt_last + 1] + shift, h[:, prompt_last + 1:]], 1))]
    with torch.no_grad():
        for _ in range(8):
            # generate derives positions from the mask under left padding; the reference does too
            positions = (m.cumsum(-1) - 1).clamp_min(0)
            logits = base(input_ids=seq, attention_mask=m, position_ids=positions, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
            m = torch.cat([m, torch.ones(3, 1, dtype=m.dtype)], 1)
    for h in handles:
        h.remove()
    assert out.tolist() == seq.tolist()


def test_loreft_subspaces_compose_tasks_in_one_intervention():
    """pyreft's subspace composition: rows 0-3 of a rank-8 LoReFT serve one example, rows 4-7 another;
    each equals a rank-4 LoReFT built from those rows of R, W and b."""
    torch.manual_seed(4)
    reft = reftkit.get_reft_model(tiny_llama(), [{"layer": 1, "positions": "l1", "low_rank_dimension": 8}])
    big = reft.interventions["layer1_block_output"]
    with torch.no_grad():
        big.source.weight.normal_()
        big.source.bias.normal_()
    ids, mask = pad_batch(SEQS[:2], "right")
    out = reft(input_ids=ids, attention_mask=mask, subspaces=[[0, 1, 2, 3], [4, 5, 6, 7]]).logits
    basis = big.rotation().detach()
    for row, part in ((0, slice(0, 4)), (1, slice(4, 8))):
        small = reftkit.get_reft_model(tiny_llama(), [{"layer": 1, "positions": "l1", "low_rank_dimension": 4}])
        iv = small.interventions["layer1_block_output"]
        with torch.no_grad():
            iv.rotation.assign(basis[:, part])
            iv.source.weight.copy_(big.source.weight[part])
            iv.source.bias.copy_(big.source.bias[part])
        one_ids, one_mask = pad_batch([SEQS[row]], "right")
        ref = small(input_ids=one_ids, attention_mask=one_mask).logits[0]
        n = len(SEQS[row])
        torch.testing.assert_close(out[row, :n], ref[:n], atol=1e-5, rtol=1e-5)


def test_mixed_task_beam_search_keeps_each_row_on_its_task():
    ids, mask = pad_batch(SEQS, "left")
    mixed = reftkit.get_reft_model(tiny_llama(), mixed_config())
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=2, pad_token_id=0)
    out = mixed.generate(input_ids=ids, attention_mask=mask, tasks=["a", "b", None], **kw)
    for b, task in enumerate(["a", "b", None]):
        alone = reftkit.get_reft_model(tiny_llama(), single_config(task))
        one_ids, one_mask = pad_batch([SEQS[b]], "left")
        assert out[b, -5:].tolist() == alone.generate(input_ids=one_ids, attention_mask=one_mask, **kw)[0, -5:].tolist()
