"""Property-based fuzzing (issue 17): random configs, call inputs and corrupted save folders on tiny models.

Every input either works, and then matches an independent reference (hand-written forward hooks applying each
intervention's documented formula at positions computed by a hand-written position function), or raises one of
reftkit's errors whose message names the offending field, argument or file. In every case the base model is left
as it was: parameters bitwise, ``requires_grad`` flags, train/eval flags, and no hooks.

Run long: ``pytest tests/test_fuzz.py --hypothesis-profile=long``; the outcome counts are printed at the end of
the session and written to ``$REFTKIT_FUZZ_REPORT`` (JSON) when that is set (see tests/conftest.py).
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from conftest import FUZZ_OUTCOMES, tiny_gpt2, tiny_llama
from hypothesis import assume, event, given, note, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.activations import ACT2FN

import reftkit
from reftkit.interventions import InterventionError

#: reftkit's own error classes (all ValueError subclasses); a TypeError/ValueError raised from reftkit's code counts
REFTKIT_ERRORS = (reftkit.ConfigError, reftkit.LoadError, reftkit.PositionError, reftkit.StructureError,
                  InterventionError)
PACKAGE_DIRS = tuple(str(Path(m.__file__).resolve().parent) for m in (reftkit, reftkit.interventions))
LAYERS = 3
WIDTH = 32
MAX_POSITIONS = 128  # max_position_embeddings / n_positions of the tiny models
ARCHS = ("llama", "gpt2")
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
PREFIX = {"llama": "model.layers", "gpt2": "transformer.h"}
GOLDENS = Path(__file__).parent / "goldens" / "pyreft"
#: the slow properties (a fresh model per example) run a third of the profile's examples
FEWER = settings(max_examples=max(5, settings.default.max_examples // 3))

# an outcome: "works" (matched the reference), "clear error" (a reftkit error naming the field), "crash" (any other
# exception, or a reftkit error that names none of the culprits), "silent change" (a wrong output or a changed base)


def record(family: str, outcome: str, detail: str = "") -> None:
    FUZZ_OUTCOMES[f"{family}/{outcome}"] += 1
    event(f"{family}: {outcome}" + (f" ({detail})" if detail else ""))


class Crash(AssertionError):
    pass


class SilentChange(AssertionError):
    pass


_ACCEPTED: dict[str, type[SilentChange]] = {}


def accepted(fields: set[str]) -> SilentChange:
    """"Accepted although invalid", as one exception class per field, so that hypothesis reports each field's
    failure apart (it tells failures apart by exception type and place)."""
    name = sorted(fields)[0]
    cls = _ACCEPTED.setdefault(name, type(f"Accepted_{name}", (SilentChange,), {}))
    return cls(f"accepted although {sorted(fields)} are invalid")


# -- the base model's state -------------------------------------------------------------------------------------

def snapshot(model: torch.nn.Module) -> dict[str, Any]:
    """Everything a failed (or detached) attach must leave as it was."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: tuple(len(getattr(m, attr)) for attr in ("_forward_hooks", "_forward_pre_hooks",
                                                            "_forward_hooks_with_kwargs", "_backward_hooks",
                                                            "_backward_pre_hooks"))
                  for n, m in model.named_modules()},
        "global": (len(torch.nn.modules.module._global_forward_hooks),
                   len(torch.nn.modules.module._global_forward_pre_hooks)),
    }


def assert_unchanged(before: dict[str, Any], model: torch.nn.Module, what: str) -> None:
    now = snapshot(model)
    for name, value in before["params"].items():
        after = now["params"].get(name)
        if after is None or after.dtype != value.dtype or not torch.equal(after, value):
            raise SilentChange(f"{what}: parameter {name} changed")
    for name, value in before["buffers"].items():
        after = now["buffers"].get(name)
        if after is None or not torch.equal(after, value):
            raise SilentChange(f"{what}: buffer {name} changed")
    for key in ("grad", "training", "hooks"):
        diff = sorted(n for n in set(before[key]) | set(now[key]) if before[key].get(n) != now[key].get(n))
        if diff:
            raise SilentChange(f"{what}: {key} differs at {diff[:4]} (before {[before[key].get(n) for n in diff[:2]]}, "
                               f"after {[now[key].get(n) for n in diff[:2]]})")
    if before["global"] != now["global"]:
        raise SilentChange(f"{what}: global module hooks changed {before['global']} -> {now['global']}")


# -- errors -----------------------------------------------------------------------------------------------------

def _raised_in_reftkit(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(PACKAGE_DIRS)


def judge_error(err: BaseException, names: set[str], family: str) -> None:
    """An error is clear when reftkit raised it (its own class, or a TypeError/ValueError from its code) and the
    message names one of ``names`` (the fields, arguments or files at fault); anything else is a crash."""
    if isinstance(err, AssertionError):
        raise err
    text = str(err)
    ours = isinstance(err, REFTKIT_ERRORS) or (isinstance(err, (TypeError, ValueError)) and _raised_in_reftkit(err))
    if not ours:
        record(family, "crash", type(err).__name__)
        raise Crash(f"not a reftkit error: {type(err).__name__}: {text[:400]}") from err
    if names and not any(n in text for n in names):
        record(family, "crash", "unnamed")
        raise Crash(f"{type(err).__name__} names none of {sorted(names)}: {text[:400]}") from err
    record(family, "clear error", type(err).__name__)


@contextlib.contextmanager
def rebuild_on_failure(cache: dict, key: Any):
    """A failed property may leave hooks or flags behind: drop the cached model so the next example is clean."""
    try:
        yield
    except BaseException:
        cache.pop(key, None)
        raise


# -- the independent reference ----------------------------------------------------------------------------------

def hand_positions(mask_row: list[int], first: int, last: int, every: bool) -> list[int]:
    """Token indices of one row for ``f<first>+l<last>`` / ``all``, over the row's real tokens: when the row is
    shorter than first + last, ``first`` keeps min(first, L // 2) and ``last`` takes what remains (reftkit's
    documented rule); the two ranges never overlap."""
    real = [i for i, m in enumerate(mask_row) if m]
    n = len(real)
    if every:
        return real
    if n >= first + last:
        n_first, n_last = first, last
    else:
        n_first = min(first, n // 2) if last else min(first, n)
        n_last = min(n - n_first, last)
    return real[:n_first] + (real[n - n_last:] if n_last else [])


def parse_spec(text: str) -> tuple[int, int, bool]:
    text = text.strip().lower()
    if text == "all":
        return 0, 0, True
    counts = {"f": 0, "l": 0}
    for term in text.split("+"):
        term = term.strip()
        counts[term[0]] = int(term[1:])
    return counts["f"], counts["l"], False


def rotation(raw: torch.Tensor) -> torch.Tensor:
    q, r = torch.linalg.qr(raw.detach().float())
    return q * torch.where(r.diagonal() < 0, -1.0, 1.0)


def reference_edit(kind: str, iv: torch.nn.Module, act_fn: str | None, h: torch.Tensor) -> torch.Tensor:
    """reftkit/interventions/reft.py's documented formulas, rows h [n, d], eval mode (no dropout)."""
    p = {n: t.detach().float() for n, t in iv.named_parameters()}
    act = (lambda x: x) if act_fn in (None, "linear") else ACT2FN[act_fn]

    def lin() -> torch.Tensor:
        return act(h @ p["source.weight"].T + p["source.bias"])

    if kind == "loreft":
        R = rotation(p["rotation.raw"])
        return h + (lin() - h @ R) @ R.T
    if kind == "direft":
        return h + lin() @ rotation(p["rotation.raw"]).T
    if kind == "noreft":
        P = p["projection.weight"]
        return h + (lin() - (h @ P.T + p.get("projection.bias", 0.0))) @ P
    if kind == "nodireft":
        return h + lin() @ p["projection.weight"]
    if kind == "consreft":
        R = rotation(p["rotation.raw"])
        return h + (p["bias"] - h @ R) @ R.T
    if kind == "lobireft":
        return h + (p["bias"] @ rotation(p["rotation.raw"]).T).expand_as(h)
    raise AssertionError(kind)


def reference_logits(model: torch.nn.Module, plan: list[tuple[str, Callable, list[list[int]]]],
                     ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The bare model with plain forward hooks: ``plan`` is (module path, rows -> rows, positions per row), applied
    in order at each module's output."""
    handles = []
    by_module: dict[str, list] = {}
    for path, fn, rows in plan:
        by_module.setdefault(path, []).append((fn, rows))
    for path, edits in by_module.items():
        def hook(module, args, output, edits=edits):
            h = output[0] if isinstance(output, tuple) else output
            h = h.clone()
            for fn, rows in edits:
                for b, positions in enumerate(rows):
                    if positions:
                        idx = torch.tensor(positions)
                        h[b, idx] = fn(h[b, idx].float()).to(h.dtype)
            return (h, *output[1:]) if isinstance(output, tuple) else h
        handles.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits
    finally:
        for handle in handles:
            handle.remove()


def assert_matches(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor | None, what: str) -> None:
    real = torch.ones(got.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    if got.shape != want.shape or not torch.allclose(got[real], want[real], atol=2e-5, rtol=1e-4):
        diff = (got - want).abs().max().item() if got.shape == want.shape else "shape"
        raise SilentChange(f"{what}: output differs from the reference (max abs diff {diff})")


# -- family 1: random configs -----------------------------------------------------------------------------------

KINDS = ("loreft", "noreft", "direft", "nodireft", "consreft", "lobireft")
KIND_NAMES = {**{k: k for k in KINDS}, "LoReFT": "loreft", "NoReFT": "noreft", "LoreftIntervention": "loreft",
              "DireftIntervention": "direft", "NodireftIntervention": "nodireft", "LobiReFT": "lobireft"}
CLASS_NAMES = {"loreft": "LoReFT", "noreft": "NoReFT", "direft": "DiReFT", "nodireft": "NodiReFT",
               "consreft": "ConsReFT", "lobireft": "LobiReFT"}
ABSENT = object()

garbage = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                    st.text(max_size=6), st.lists(st.integers(-3, 3), max_size=3),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def mostly(good: st.SearchStrategy, bad: st.SearchStrategy, absent: bool = False) -> st.SearchStrategy:
    """A field's value: mostly well-formed, one time in six from the bad pool, and (``absent``) sometimes left
    out; shrinking goes towards the well-formed value, so a minimal failing example shows the one bad field."""
    def pick(i: int) -> st.SearchStrategy:
        if i == 5:
            return bad
        return st.just(ABSENT) if absent and i >= 3 else good
    return st.integers(0, 5).flatmap(pick)


layers_st = mostly(
    st.one_of(st.integers(0, LAYERS - 1), st.just("all"), st.integers(-LAYERS, -1),
              st.lists(st.integers(0, LAYERS - 1), min_size=1, max_size=3, unique=True)),
    st.one_of(st.integers(-6, 6), st.lists(st.integers(-4, 4), max_size=4),  # [2, -1]: one layer twice (item 7)
              st.sampled_from(["ALL", "1", "", "-1", "all ", "first", (1,), ()]), garbage))
components_st = mostly(
    st.sampled_from(["block_output", "mlp_output", "{own}.{{layer}}.mlp:output", "block_output", "block_input",
                     "mlp_input"]),
    st.one_of(
        st.sampled_from(reftkit.COMPONENTS),
        st.sampled_from(["{own}", "{own}.{{layer}}.mlp", "{own}.{{layer}}:output", "{other}.{{layer}}.mlp:output",
                         "model.norm:output", "transformer.ln_f:output", "lm_head:output", "model.layers[1].output",
                         "{own}.{{layer}}.output", "head_query_output", "block_outputs", "",
                         "{own}.{{layer}}.nothing:output", "{own}.{{layer}}.mlp:sideways"]),  # item 5/6 among them
        garbage))
positions_st = mostly(
    st.sampled_from(["l1", "f1", "f2+l2", "l3+f1", "all", "f1+l1", "f3", "l5", "f7+l7", None]),
    st.one_of(st.sampled_from(["f0", "x3", "f1+f2", "l-1", "f1000000", "l" + "9" * 20, "f129", "l100000", "f1++l1",
                               "", "all+f1", "f1 + l1", " L2 "]),  # item 8 among them
              st.builds(lambda k, n: f"{k}{n}", st.sampled_from("fl"), st.integers(0, 10**7)), garbage),
    absent=True)
interventions_st = mostly(st.sampled_from(sorted(KIND_NAMES)),
                          st.one_of(st.sampled_from(["nope", "LOREFT", "lora", ""]), garbage), absent=True)
rank_st = mostly(st.integers(1, 8), st.one_of(st.sampled_from([0, -1, 33, 64, 10**9, 2.0, "4", True, None]), garbage),
                 absent=True)
dropout_st = mostly(st.sampled_from([0.0, 0, 0.05, 0.5]),
                    st.one_of(st.floats(-1, 2), st.sampled_from(["0.1", None, 1.0, float("nan"), float("inf"), True,
                                                                 False]), garbage),  # item 9
                    absent=True)
bias_st = mostly(st.booleans(), st.one_of(st.sampled_from(["false", "true", 1, 0, None]), garbage),  # item 9
                 absent=True)
act_st = mostly(st.sampled_from([None, "linear", "relu", "gelu", "tanh"]),
                st.one_of(st.sampled_from(["nope", "", 3, "RELU"]), garbage), absent=True)
share_st = mostly(st.sampled_from([True, True, False]), st.one_of(st.sampled_from(["false", 0, 1, None]), garbage),
                  absent=True)


def entry_st(arch: str) -> st.SearchStrategy[dict]:
    def paths(value: Any) -> Any:
        if isinstance(value, str) and "{own}" in value or isinstance(value, str) and "{other}" in value:
            other = PREFIX["gpt2" if arch == "llama" else "llama"]
            return value.format(own=PREFIX[arch], other=other)
        return value

    def add_bias_only_where_taken(entry: dict) -> dict:
        # add_bias is NoReFT's / NodiReFT's; elsewhere keep it only now and then (an argument the class lacks)
        kind = KIND_NAMES.get(entry.get("intervention", "loreft")) if isinstance(entry.get("intervention", "loreft"),
                                                                                 str) else None
        if "add_bias" in entry and kind not in ("noreft", "nodireft") and entry.pop("_keep_bias") is False:
            del entry["add_bias"]
        entry.pop("_keep_bias", None)
        if kind in ("consreft", "lobireft") and entry.get("act_fn", None) is None:
            entry.pop("act_fn", None)  # theirs has no activation; None is the common case, keep it out
        return entry

    return st.fixed_dictionaries({
        "layer": layers_st, "component": components_st.map(paths), "positions": positions_st,
        "intervention": interventions_st, "low_rank_dimension": rank_st, "dropout": dropout_st,
        "add_bias": bias_st, "act_fn": act_st, "share_weights": share_st,
        "_keep_bias": st.integers(0, 5).map(lambda i: i == 5),
    }).map(lambda d: add_bias_only_where_taken({k: v for k, v in d.items() if v is not ABSENT}))


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def judge_entry(entry: dict, arch: str) -> tuple[set[str], set[str]]:
    """The contract's view of one entry: (fields that must be refused, fields where either outcome is allowed)."""
    bad, either = set(), set()
    layer, comp = entry["layer"], entry["component"]
    if layer == "all":
        layers = list(range(LAYERS))
    elif is_int(layer) and -LAYERS <= layer < LAYERS:
        layers = [layer % LAYERS]
    elif (isinstance(layer, (list, tuple)) and layer and all(is_int(x) and -LAYERS <= x < LAYERS for x in layer)
          and len({x % LAYERS for x in layer}) == len(layer)):  # [3, -1] on 4 layers: the same layer twice (item 7)
        layers = [x % LAYERS for x in layer]
        if isinstance(layer, tuple):
            either.add("layer")
    else:
        layers = []
        bad.add("layer")
    own = PREFIX[arch]
    singles = ("lm_head:output", own.split(".")[0] + ".norm:output" if arch == "llama" else "transformer.ln_f:output")
    if comp in ("block_output", "block_input", "mlp_output", "mlp_input", own + ".{layer}.mlp:output",
                own + ".{layer}.mlp", own + ".{layer}:output"):
        pass
    elif isinstance(comp, str) and comp in reftkit.COMPONENTS:
        either.add("component")  # the structure decides (gpt2's fused attention)
    elif comp in singles:
        if layer == "all" or isinstance(layer, (list, tuple)):
            bad.update(("component", "layer"))  # one module hooked once per layer (item 6)
    else:
        bad.add("component")  # a ModuleList (item 5), the other model's path, pyvene syntax, garbage
    pos = entry.get("positions", "l1")
    spec = None
    if pos is None:
        pass
    elif isinstance(pos, str) and pos.strip().lower() == "all":
        spec = (0, 0, True)
    elif isinstance(pos, str):
        terms = [t for t in pos.strip().lower().split("+")]
        counts: dict[str, int] = {}
        ok = True
        for term in terms:
            term = term.strip()
            if len(term) < 2 or term[0] not in "fl" or not term[1:].isdigit() or term[0] in counts:
                ok = False
                break
            counts[term[0]] = int(term[1:])
        if not ok or any(n <= 0 for n in counts.values()) or any(n > 2**16 for n in counts.values()):
            bad.add("positions")  # item 8 for the huge counts
        else:
            if any(n > MAX_POSITIONS for n in counts.values()):
                either.add("positions")  # beyond max_position_embeddings: refused (item 8), or under a documented cap
            if pos != pos.strip().lower() or " " in pos:
                either.add("positions")
            spec = (counts.get("f", 0), counts.get("l", 0), False)
    else:
        bad.add("positions")
    name = entry.get("intervention", "loreft")
    kind = KIND_NAMES.get(name) if isinstance(name, str) else None
    if kind is None:
        if isinstance(name, str) and name.lower() in KINDS:
            kind = name.lower()
            either.add("intervention")
        else:
            bad.add("intervention")
    if "low_rank_dimension" in entry:
        r = entry["low_rank_dimension"]
        if not (is_int(r) and 1 <= r <= WIDTH):
            bad.add("low_rank_dimension")
    if "dropout" in entry:
        d = entry["dropout"]
        if isinstance(d, bool):
            (either if d is False else bad).add("dropout")
        elif not (isinstance(d, (int, float)) and 0.0 <= d < 1.0):
            bad.add("dropout")
    if "add_bias" in entry:
        if kind not in ("noreft", "nodireft") or not isinstance(entry["add_bias"], bool):
            bad.add("add_bias")  # item 9 for the non-bool values; an argument the class lacks otherwise
    if "act_fn" in entry:
        a = entry["act_fn"]
        known = a is None or (isinstance(a, str) and (a == "linear" or a in ACT2FN))
        if kind in ("consreft", "lobireft") or not known:
            bad.add("act_fn")
        elif isinstance(a, str) and a not in (None, "linear", "relu", "gelu", "tanh"):
            either.add("act_fn")
    if "share_weights" in entry:
        s = entry["share_weights"]
        if not isinstance(s, bool):
            bad.add("share_weights")
        elif s is False and not (spec and spec[0] and spec[1]):
            either.add("share_weights")  # item 10: refuse or warn
    if not layers and "layer" not in bad:
        bad.add("layer")
    return bad, either


_CONFIG_MODELS: dict[str, tuple[torch.nn.Module, dict, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
IDS = torch.tensor([[5, 9, 14, 22, 7, 30], [0, 0, 6, 10, 15, 23], [0, 0, 0, 0, 0, 40]])
MASK = (IDS != 0).long()  # left padded: lengths 6, 4, 1


def config_model(arch: str):
    if arch not in _CONFIG_MODELS:
        model = BUILDERS[arch](layers=LAYERS)
        with torch.no_grad():
            bare = model(input_ids=IDS, attention_mask=MASK).logits
        _CONFIG_MODELS[arch] = (model, snapshot(model), bare)
    return _CONFIG_MODELS[arch]


def plan_for(entries: list[dict], arch: str, reft: Any, locations: list[list[int]] | None
             ) -> list[tuple[str, Callable, list[list[int]]]] | None:
    """The reference plan (module, formula, positions per row) for an attached model, or None where the
    reference does not cover a component; checks the interventions' order and classes on the way."""
    plan, ivs = [], list(reft.interventions.values())
    order = []
    for entry in entries:
        layer = entry["layer"]
        layers = list(range(LAYERS)) if layer == "all" else [layer % LAYERS] if is_int(layer) else \
            [x % LAYERS for x in layer]
        pos = entry.get("positions", "l1")
        first, last, every = parse_spec(pos) if pos is not None else (0, 1, False)
        parts = [(first, last, every)]
        if entry.get("share_weights", True) is False and first and last:
            parts = [(first, 0, False), (0, last, False)]  # pyreft's untied layout: first, then last
        kind = KIND_NAMES.get(entry.get("intervention", "loreft")) or entry["intervention"].lower()
        for li in layers:
            for part in parts:
                order.append((entry, li, part, kind))
    if len(order) != len(ivs):
        raise SilentChange(f"{len(ivs)} interventions built, the config asks for {len(order)}")
    covered = True
    for (entry, li, part, kind), iv in zip(order, ivs):
        if type(iv).__name__ != CLASS_NAMES[kind]:
            raise SilentChange(f"built {type(iv).__name__}, the config asks for {kind}")
        comp = entry["component"]
        if comp in ("block_output", PREFIX[arch] + ".{layer}:output"):
            path = f"{PREFIX[arch]}.{li}"
        elif comp in ("mlp_output", PREFIX[arch] + ".{layer}.mlp:output", PREFIX[arch] + ".{layer}.mlp"):
            path = f"{PREFIX[arch]}.{li}.mlp"
        else:
            covered = False
            continue
        rows = locations if locations is not None else [hand_positions(m, *part) for m in MASK.tolist()]
        act = entry.get("act_fn")
        plan.append((path, (lambda h, kind=kind, iv=iv, act=act: reference_edit(kind, iv, act, h)), rows))
    return plan if covered else None


@st.composite
def configs(draw):
    arch = draw(st.sampled_from(ARCHS))
    return arch, draw(mostly(st.lists(entry_st(arch), min_size=1, max_size=1),
                             st.lists(entry_st(arch), min_size=2, max_size=3)))


@given(case=configs(), train_before_detach=st.booleans())
def test_random_configs_work_or_are_refused_by_name(case, train_before_detach):
    arch, entries = case
    model, before, bare = config_model(arch)
    judged = [judge_entry(e, arch) for e in entries]
    bad = set().union(*(b for b, _ in judged))
    either = set().union(*(e for _, e in judged))
    note(f"bad fields {sorted(bad)}, either {sorted(either)}")
    event(f"config fields refused by contract: {sorted(bad) or 'none'}; either way: {sorted(either) or 'none'}")
    with rebuild_on_failure(_CONFIG_MODELS, arch):
        reft = None
        try:
            reft = reftkit.get_reft_model(model, reftkit.ReftConfig(representations=entries))
        except Exception as err:  # noqa: BLE001 - judged below
            assert_unchanged(before, model, "a refused config")
            if not bad and not either:
                record("config", "crash", "valid refused")
                raise Crash(f"a valid config was refused: {type(err).__name__}: {err}") from err
            judge_error(err, bad | either, "config")
            return
        try:
            if bad:
                raise accepted(bad)
            reft.eval()
            locations = None
            if any(e.get("positions", "l1") is None for e in entries):
                locations = [hand_positions(m, 0, 1, False) for m in MASK.tolist()]
            call = {} if locations is None else {"intervention_locations": torch.tensor(locations)}
            with torch.no_grad():
                got = reft(input_ids=IDS, attention_mask=MASK, **call).logits
            plan = plan_for(entries, arch, reft, locations)
            if plan is not None:
                assert_matches(got, reference_logits(model, plan, IDS, MASK), MASK, "config")
            # bare calls while attached pass through
            with torch.no_grad():
                if not torch.equal(model(input_ids=IDS, attention_mask=MASK).logits, bare):
                    raise SilentChange("a bare call while attached is edited")
            if train_before_detach:
                reft.train()  # detach restores the base's own mode (item 3)
        except SilentChange:
            record("config", "silent change")
            raise
        except Exception as err:
            record("config", "crash", type(err).__name__)
            raise Crash(f"an accepted config fails at call: {type(err).__name__}: {err}") from err
        finally:
            if reft is not None and not reft._detached:
                reft.detach()
        assert_unchanged(before, model, "after detach")
        record("config", "works", "reference" if plan is not None else "unreferenced component")


simple_entry = st.fixed_dictionaries({
    "layer": st.integers(0, LAYERS - 1), "component": st.sampled_from(["block_output", "mlp_output"]),
    "positions": st.sampled_from(["l1", "f1+l1", "all"]), "intervention": st.sampled_from(KINDS)})


@FEWER
@given(arch=st.sampled_from(ARCHS), first=simple_entry, second=simple_entry, detach_first_first=st.booleans(),
       trainable=st.sets(st.sampled_from(["lm_head.weight", "model.norm.weight", "transformer.ln_f.weight"])))
def test_two_reft_models_on_one_base(arch, first, second, detach_first_first, trainable):
    """Item 2: a second attach is refused clearly, or detaching both (either order) restores the base's own flags."""
    model = BUILDERS[arch](seed=4, layers=LAYERS)
    for name, param in model.named_parameters():  # a base with its own mix of trainable and frozen parameters
        param.requires_grad_(name in trainable or name.endswith("bias"))
    before = snapshot(model)
    one = reftkit.get_reft_model(model, reftkit.ReftConfig(representations=[first]))
    try:
        two = reftkit.get_reft_model(model, reftkit.ReftConfig(representations=[second]))
    except Exception as err:  # noqa: BLE001 - judged below
        one.detach()
        assert_unchanged(before, model, "a refused second attach and a detach")
        judge_error(err, set(), "two models")
        return
    order = (one, two) if detach_first_first else (two, one)
    for reft in order:
        reft.detach()
    try:
        order_text = "first, second" if detach_first_first else "second, first"
        assert_unchanged(before, model, f"two ReftModels detached {order_text}")
    except SilentChange:
        record("two models", "silent change")
        raise
    record("two models", "works")


# -- family 2: random call inputs -------------------------------------------------------------------------------

CALL_ENTRIES = [
    {"layer": 1, "component": "block_output", "positions": "f1+l2", "intervention": "loreft", "low_rank_dimension": 2},
    {"layer": 2, "component": "mlp_output", "positions": "l1", "intervention": "noreft", "low_rank_dimension": 3},
    {"layer": 0, "component": "block_output", "positions": "f2+l1", "intervention": "direft", "low_rank_dimension": 1},
]
K = len(CALL_ENTRIES)
_CALL_MODELS: dict[str, tuple] = {}


def call_model(arch: str):
    if arch not in _CALL_MODELS:
        model = BUILDERS[arch](seed=1, layers=LAYERS)
        with torch.no_grad():
            bare = model(input_ids=IDS, attention_mask=MASK).logits  # before any hook is attached
        reft = reftkit.get_reft_model(model, reftkit.ReftConfig(representations=CALL_ENTRIES)).eval()
        _CALL_MODELS[arch] = (model, reft, snapshot(model), bare)
    return _CALL_MODELS[arch]


@st.composite
def call_inputs(draw):
    batch = draw(st.integers(1, 3))
    length = draw(mostly(st.integers(1, 7), st.just(0)))  # an empty sequence now and then (item 14)
    ids = torch.tensor(draw(st.lists(st.lists(st.integers(3, 100), min_size=length, max_size=length),
                                     min_size=batch, max_size=batch)), dtype=torch.long).view(batch, length)
    culprits: set[str] = set()   # arguments that must be refused
    either: set[str] = set()     # arguments the contract lets work or be refused
    if length == 0:
        culprits.add("input_ids")
    mask_kind = draw(mostly(st.sampled_from(["left", "right", "none", "hole"]),
                            st.sampled_from(["wrong_shape", "empty_row", "bool", "float"])))
    lengths = [draw(st.integers(1, max(length, 1))) for _ in range(batch)]
    mask = None
    if mask_kind in ("left", "right", "bool", "float", "empty_row") and length:
        rows = [[0] * (length - n) + [1] * n if mask_kind != "right" else [1] * n + [0] * (length - n)
                for n in lengths]
        if mask_kind == "empty_row":
            rows[0] = [0] * length
            either.add("attention_mask")
        mask = torch.tensor(rows)
        if mask_kind == "bool":
            mask, _ = mask.bool(), either.add("attention_mask")
        if mask_kind == "float":
            mask, _ = mask.float(), either.add("attention_mask")
    elif mask_kind == "hole" and length:
        mask = torch.tensor(draw(st.lists(st.lists(st.sampled_from([0, 1]), min_size=length, max_size=length),
                                          min_size=batch, max_size=batch))).view(batch, length)
        assume(bool((mask.sum(1) > 0).all()))
        either.add("attention_mask")  # item 11: refused, or positions over the real tokens
    elif mask_kind == "wrong_shape":
        shape = draw(st.sampled_from([(batch, length + 1), (batch, max(length - 1, 0)), (batch + 1, length),
                                      (length,), (batch, length, 1)]))
        mask = torch.ones(shape, dtype=torch.long)
        culprits.add("attention_mask")  # item 12
    locations = None
    loc_kind = draw(mostly(st.sampled_from(["none", "2d", "3d", "b1p"]),
                           st.sampled_from(["list", "ragged", "string", "float", "bool", "int32", "1d", "4d",
                                            "wrong_batch", "wrong_k", "out_of_range", "duplicate"])))
    width = draw(st.integers(1, 3))
    real_len = max(length, 1)
    picks = [sorted(draw(st.lists(st.integers(0, real_len - 1), min_size=0, max_size=min(width, real_len),
                                  unique=True))) for _ in range(batch * K)]
    table = [[(p + [-1] * width)[:width] for p in picks[b * K:(b + 1) * K]] for b in range(batch)]
    if loc_kind != "none":
        if length == 0:
            culprits.add("input_ids")
        if loc_kind == "2d":
            locations = torch.tensor([row[0] for row in table])
        elif loc_kind == "3d":
            locations = torch.tensor(table)
        elif loc_kind == "b1p":
            locations = torch.tensor([row[:1] for row in table])  # item 15: broadcasts like [B, P]
        elif loc_kind == "list":
            locations, _ = table, either.add("intervention_locations")
        elif loc_kind == "ragged":
            locations = [[list(r) for r in row] for row in table]
            locations[0][0].append(-1)  # one list longer than the others
            culprits.add("intervention_locations")
        elif loc_kind == "string":
            locations = draw(st.sampled_from(["l1", "0,1", ""]))
            culprits.add("intervention_locations")
        elif loc_kind in ("float", "bool"):
            locations = torch.tensor(table).to(torch.float32 if loc_kind == "float" else torch.bool)
            culprits.add("intervention_locations")
        elif loc_kind == "int32":
            locations, _ = torch.tensor(table, dtype=torch.int32), either.add("intervention_locations")
        elif loc_kind == "1d":
            locations = torch.tensor([row[0][0] for row in table])
            culprits.add("intervention_locations")
        elif loc_kind == "4d":
            locations = torch.tensor(table)[..., None]
            culprits.add("intervention_locations")
        elif loc_kind == "wrong_batch":
            locations = torch.tensor(table + table[:1])
            culprits.add("intervention_locations")
        elif loc_kind == "wrong_k":
            locations = torch.tensor([row + row[:1] for row in table])
            culprits.add("intervention_locations")
        elif loc_kind == "out_of_range":
            locations = torch.tensor(table)
            locations[0, 0, 0] = draw(st.sampled_from([length, length + 5, -2, 10**6]))
            culprits.add("intervention_locations")
        elif loc_kind == "duplicate":
            locations = torch.tensor(table)
            locations[0, 0, :] = 0
            locations[0, 0, 1:2] = 0 if width > 1 else -1
            if width > 1:
                culprits.add("intervention_locations")
            elif length == 0:
                pass
    extra: dict[str, Any] = {}
    misc = draw(mostly(st.just("none"), st.sampled_from(["misspelt", "sources_tensor"])))
    if misc == "misspelt":
        name = draw(st.sampled_from(["intervention_location", "interventions_locations", "attention_masks",
                                     "source", "subspace", "task"]))
        extra[name] = torch.zeros(batch, 1, dtype=torch.long)
        culprits.add(name)  # item 13
    elif misc == "sources_tensor":
        extra["sources"] = ids.clone()
        culprits.add("sources")  # item 14
    return ids, mask, locations, extra, culprits, either, (mask_kind, loc_kind, misc)


def expected_rows(ids: torch.Tensor, mask: torch.Tensor | None, locations: Any) -> list[list[list[int]]]:
    """[K][B] positions by hand: explicit locations (broadcast [B, P] and [B, 1, P] to every intervention), or
    each entry's spec over the real tokens of each row."""
    batch, length = ids.shape
    if locations is not None:
        t = torch.as_tensor(locations).long()
        if t.dim() == 2:
            t = t[:, None, :]
        t = t.expand(batch, K, t.shape[-1])
        return [[[int(x) for x in t[b, k] if x >= 0] for b in range(batch)] for k in range(K)]
    rows = [[1] * length] * batch if mask is None else mask.long().tolist()
    return [[hand_positions(r, *parse_spec(e["positions"])) for r in rows] for e in CALL_ENTRIES]


@given(arch=st.sampled_from(ARCHS), inputs=call_inputs())
def test_random_call_inputs_match_the_reference_or_are_refused_by_name(arch, inputs):
    ids, mask, locations, extra, culprits, either, kinds = inputs
    note(f"kinds {kinds}, culprits {sorted(culprits)}, either {sorted(either)}")
    event(f"call kinds: mask={kinds[0]} locations={kinds[1]} misc={kinds[2]}")
    model, reft, before, bare = call_model(arch)
    with rebuild_on_failure(_CALL_MODELS, arch):
        call = dict(extra)
        if locations is not None:
            call["intervention_locations"] = locations
        try:
            with torch.no_grad():
                got = reft(input_ids=ids, attention_mask=mask, **call).logits
        except Exception as err:  # noqa: BLE001 - judged below
            assert_unchanged(before, model, "a refused call")
            if not culprits and not either:
                record("call", "crash", "valid refused")
                raise Crash(f"a valid call was refused: {type(err).__name__}: {err}") from err
            judge_error(err, culprits | either, "call")
        else:
            try:
                if culprits:
                    raise accepted(culprits)
                plan = [(f"{PREFIX[arch]}.{e['layer']}" + (".mlp" if e["component"] == "mlp_output" else ""),
                         (lambda h, e=e, iv=iv: reference_edit(e["intervention"], iv, None, h)), rows)
                        for e, iv, rows in zip(CALL_ENTRIES, reft.interventions.values(),
                                               expected_rows(ids, mask, locations))]
                # the reference runs on the bare model (the reft's hooks pass through outside its calls)
                assert_matches(got, reference_logits(model, plan, ids, mask), mask, "call")
            except SilentChange:
                record("call", "silent change")
                raise
            assert_unchanged(before, model, "after a call")
            record("call", "works")
        # bare calls after the call are not edited (the call state does not outlive the call, item 4)
        with torch.no_grad():
            got = model(input_ids=IDS, attention_mask=MASK).logits
        if not torch.equal(got, bare):
            record("call", "silent change", "bare call edited")
            raise SilentChange("a bare call after the ReftModel call is edited")


@FEWER
@given(batches=st.lists(st.integers(1, 3), min_size=2, max_size=3), arch=st.sampled_from(ARCHS))
def test_training_calls_with_checkpointing_leave_no_state(batches, arch):
    """Item 4: after training calls with gradient checkpointing, bare calls are not edited and another batch
    size works; the reference is a second copy of the base model that never had interventions."""
    model, reference = BUILDERS[arch](seed=2, layers=LAYERS), BUILDERS[arch](seed=2, layers=LAYERS)
    before = snapshot(model)
    reft = reftkit.get_reft_model(model, reftkit.ReftConfig(representations=CALL_ENTRIES[:2]))
    try:
        reft.gradient_checkpointing_enable()
        reft.train()
        for b in batches:
            ids = IDS[:b, :5].clamp(min=3)
            try:
                reft(input_ids=ids, labels=ids).loss.backward()
            except Exception as err:
                record("checkpointing", "crash", type(err).__name__)
                raise Crash(f"training call with batch {b} after {batches}: {type(err).__name__}: {err}") from err
            model.eval()
            with torch.no_grad():
                got, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
            model.train()
            if not torch.equal(got, want):
                record("checkpointing", "silent change", "bare call edited")
                raise SilentChange(f"a bare call after a checkpointed training call (batch {b}) is edited")
    finally:
        reft.detach()
    # checkpointing was enabled through the ReftModel, so detach turns it off, with the requires-grad hook on the
    # input embeddings that transformers adds with it (its own disable keeps that hook)
    flag = getattr(model, "is_activation_checkpointing", None)  # the later 5.x name
    assert not (model.is_gradient_checkpointing if flag is None else flag)
    model.eval()  # detach restoring the mode is checked in family 1 (item 3); here the rest
    assert_unchanged(before, model, "after checkpointed training and detach")
    record("checkpointing", "works")


# -- family 3: corrupted save folders ---------------------------------------------------------------------------

SAVE_ENTRIES = [
    {"layer": 1, "component": "block_output", "positions": "l1", "intervention": "loreft", "low_rank_dimension": 2},
    {"layer": 2, "component": "block_output", "positions": "f1+l1", "intervention": "noreft",
     "low_rank_dimension": 2, "share_weights": False},
]
_SAVES: dict[str, tuple] = {}
_TMP: list[Path] = []  # one scratch folder for the module, made on first use


def scratch() -> Path:
    if not _TMP:
        _TMP.append(Path(tempfile.mkdtemp(prefix="reftkit-fuzz-")))
    return _TMP[0]


@pytest.fixture(scope="module", autouse=True)
def _cleanup_scratch():
    yield
    while _TMP:
        shutil.rmtree(_TMP.pop(), ignore_errors=True)


def saved(arch: str):
    """A trained-looking save folder (weights moved off their initialisation), its outputs, and a base to load
    into (the same seed: identical weights)."""
    if arch not in _SAVES:
        model = BUILDERS[arch](seed=3, layers=LAYERS)
        reft = reftkit.get_reft_model(model, reftkit.ReftConfig(representations=SAVE_ENTRIES)).eval()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in reft.interventions.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
            want = reft(input_ids=IDS, attention_mask=MASK).logits
        folder = scratch() / f"save-{arch}"
        reft.save_pretrained(folder)
        reft.detach()
        base = BUILDERS[arch](seed=3, layers=LAYERS)
        _SAVES[arch] = (folder, want, base, snapshot(base))
    return _SAVES[arch]


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False),
                                     st.text(max_size=4)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=3), inner, max_size=3)),
                           max_leaves=6)
FILE_NAMES = ("config.json", "interventions.safetensors")


def rewrite_tensors(folder: Path, change: Callable[[dict], None]) -> None:
    """Rewrite the weights with safetensors and record the new hash, so only the content check can refuse it."""
    tensors = load_file(folder / "interventions.safetensors")
    change(tensors)
    save_file(tensors, str(folder / "interventions.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["weights_sha256"] = reftkit.serialization.file_sha256(folder / "interventions.safetensors")
    (folder / "config.json").write_text(json.dumps(config))


@st.composite
def reftkit_mutations(draw):
    """(description, function(folder) -> (names the error must mention, whether a load must fail))."""
    kind = draw(st.sampled_from(["config_field", "config_delete", "interventions", "representation_field",
                                 "representation_delete", "truncate", "flip", "append", "empty", "drop_hash",
                                 "bad_hash", "nan", "no_weights", "not_json", "resave"]))
    seed = draw(st.integers(0, 2**16))
    value = draw(json_values)
    rng = random.Random(seed)

    def apply(folder: Path) -> tuple[set[str], bool | None]:
        config_file, weights = folder / "config.json", folder / "interventions.safetensors"
        config = json.loads(config_file.read_text())
        if kind == "config_field":
            key = rng.choice(sorted(config))
            config[key] = value
            config_file.write_text(json.dumps(config))
            return {"config.json", key}, None
        if kind == "config_delete":
            key = rng.choice(sorted(config))
            del config[key]
            config_file.write_text(json.dumps(config))
            return {"config.json", key}, None
        if kind == "interventions":  # item 1
            config["interventions"] = rng.choice([[{}], 5, [[1, 2]], "x", [], [{"key": 3}], None, value])
            config_file.write_text(json.dumps(config))
            return {"config.json", "interventions"}, None
        if kind in ("representation_field", "representation_delete"):
            rep = rng.choice(config["representations"])
            key = rng.choice(sorted(rep))
            if kind == "representation_delete":
                del rep[key]
            else:
                rep[key] = value
            config_file.write_text(json.dumps(config))
            return {"config.json", key}, None
        if kind == "truncate":
            data = weights.read_bytes()
            weights.write_bytes(data[: rng.randrange(len(data))])
            return {"interventions.safetensors"}, True
        if kind == "flip":
            data = bytearray(weights.read_bytes())
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
            weights.write_bytes(bytes(data))
            return {"interventions.safetensors"}, True
        if kind == "append":
            weights.write_bytes(weights.read_bytes() + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9))))
            return {"interventions.safetensors"}, True
        if kind == "empty":
            weights.write_bytes(b"")
            return {"interventions.safetensors"}, True
        if kind == "no_weights":
            weights.unlink()
            return {"interventions.safetensors"}, True
        if kind == "not_json":
            config_file.write_bytes(config_file.read_bytes()[: rng.randrange(1, 40)])
            return {"config.json"}, True
        if kind == "drop_hash":  # item 16: refused unless the caller opts out
            del config["weights_sha256"]
            config_file.write_text(json.dumps(config))
            return {"config.json", "weights_sha256", "interventions.safetensors"}, True
        if kind == "bad_hash":
            config["weights_sha256"] = rng.choice(["0" * 64, "", "abc", 5, None])
            config_file.write_text(json.dumps(config))
            return {"config.json", "weights_sha256", "interventions.safetensors"}, True
        if kind == "nan":  # item 16: NaN/inf refused at load with the tensor's name
            tensors = load_file(weights)
            name = rng.choice(sorted(tensors))
            bad = rng.choice([math.nan, math.inf, -math.inf])

            def poison(t: dict) -> None:
                flat = t[name].flatten().clone()
                flat[rng.randrange(flat.numel())] = bad
                t[name] = flat.view(t[name].shape)
            rewrite_tensors(folder, poison)
            return {name}, True
        if kind == "resave":  # a control: the same tensors rewritten load and match
            rewrite_tensors(folder, lambda t: None)
            return set(), False
        raise AssertionError(kind)

    return kind, apply


def saved_config(folder: Path) -> Any:
    return reftkit.ReftConfig.from_dict(json.loads((folder / "config.json").read_text()))


def _loaded_config_honours(reft: Any, folder: Path) -> bool:
    """A valid edit of config.json that the loaded model reflects (positions, act_fn...) is not a silent change."""
    try:
        written = reftkit.ReftConfig.from_dict(json.loads((folder / "config.json").read_text()))
    except Exception:  # noqa: BLE001
        return False
    return written == reft.reft_config


@given(arch=st.sampled_from(ARCHS), mutation=reftkit_mutations())
def test_corrupted_save_folders_load_exactly_or_are_refused_naming_the_file(arch, mutation):
    kind, apply = mutation
    source, want, base, before = saved(arch)
    event(f"save mutation: {kind}")
    with rebuild_on_failure(_SAVES, arch), tempfile.TemporaryDirectory(dir=scratch()) as tmp:
        folder = Path(tmp) / "save"
        shutil.copytree(source, folder)
        names, must_fail = apply(folder)
        note(f"mutation {kind}: must name {sorted(names)}, must fail {must_fail}")
        try:
            reft = reftkit.ReftModel.from_pretrained(base, folder)
        except Exception as err:  # noqa: BLE001 - judged below
            assert_unchanged(before, base, "a refused load")
            if must_fail is False:
                record("save", "crash", "valid refused")
                raise Crash(f"an intact folder was refused: {type(err).__name__}: {err}") from err
            if not isinstance(err, reftkit.LoadError):
                record("save", "crash", type(err).__name__)
                raise Crash(f"not a LoadError: {type(err).__name__}: {err}") from err
            # where config.json and the weights disagree, naming either file is right
            judge_error(err, set(FILE_NAMES) if names & set(FILE_NAMES) else names, "save")
            return
        try:
            if must_fail:
                raise SilentChange(f"the {kind} folder loaded")
            # a valid edit of config.json (positions, act_fn...) that the loaded model reflects changes the outputs
            # legitimately; anything else must reproduce the saved model bitwise
            edited = _loaded_config_honours(reft, folder) and reft.reft_config != saved_config(source)
            if edited and all(r.positions is not None for r in reft.reft_config.representations):
                # the edit must be honoured, not ignored: the same config attached afresh, with the saved weights
                fresh = reftkit.get_reft_model(BUILDERS[arch](seed=3, layers=LAYERS), reft.reft_config).eval()
                fresh.interventions.load_state_dict(load_file(folder / "interventions.safetensors"))
                with torch.no_grad():
                    if not torch.equal(reft.eval()(input_ids=IDS, attention_mask=MASK).logits,
                                       fresh(input_ids=IDS, attention_mask=MASK).logits):
                        raise SilentChange(f"loaded after {kind}, but the edited config.json is not what runs")
            if not edited:
                reft.eval()
                with torch.no_grad():
                    got = reft(input_ids=IDS, attention_mask=MASK).logits
                if not torch.equal(got, want):
                    raise SilentChange(f"loaded after {kind}, but the outputs differ from the saved model's "
                                       f"(max abs diff {(got - want).abs().max().item():.3g})")
        except SilentChange:
            record("save", "silent change", kind)
            raise
        finally:
            reft.detach()
        assert_unchanged(before, base, "after load and detach")
        record("save", "works", f"{kind}, a valid edit honoured" if edited else kind)


# pyreft 0.1.0 folders written by pyreft itself (tests/goldens/pyreft), loaded with positions="l1"
_PYREFT: dict[str, tuple] = {}
PYREFT_CLASSES = ("LoreftIntervention", "NoreftIntervention", "ConsreftIntervention")


def pyreft_case(arch: str, cls_name: str):
    key = (arch, cls_name)
    if key not in _PYREFT:
        base = AutoModelForCausalLM.from_pretrained(GOLDENS / arch / "base", dtype=torch.float32).eval()
        before = snapshot(base)
        reft = reftkit.ReftModel.from_pyreft(base, GOLDENS / arch / cls_name, positions="l1").eval()
        with torch.no_grad():
            want = reft(input_ids=IDS, attention_mask=MASK).logits
        reft.detach()
        assert_unchanged(before, base, "a clean pyreft load and detach")
        _PYREFT[key] = (base, before, want)
    return _PYREFT[key]


@st.composite
def pyreft_mutations(draw):
    kind = draw(st.sampled_from(["sorted_keys_path", "sorted_keys_garbage", "missing_tensor", "bare_tensor",
                                 "other_container", "wrong_shape", "truncate", "nan", "representations",
                                 "intervention_types", "delete_field", "not_json", "top_level", "intact"]))
    seed = draw(st.integers(0, 2**16))
    value = draw(json_values)
    rng = random.Random(seed)

    def apply(folder: Path) -> tuple[set[str], bool]:
        config_file = folder / "config.json"
        config = json.loads(config_file.read_text())
        keys = config["sorted_keys"]
        i = rng.randrange(len(keys))
        bin_file = folder / f"intkey_{keys[i]}.bin"
        if kind == "sorted_keys_path":  # item 17: a path is refused, nothing outside the folder is opened
            outside = folder.parent / "outside"
            outside.mkdir(exist_ok=True)
            shutil.copy(bin_file, outside / f"intkey_{keys[i]}.bin")  # a readable file, should the loader go there
            config["sorted_keys"][i] = rng.choice([f"sub/../../outside/{keys[i]}", f"../outside/{keys[i]}",
                                                   f"/{outside}/{keys[i]}", f"a/{keys[i]}", "..", "."])
            config_file.write_text(json.dumps(config))
            return {"config.json", "sorted_keys"}, True
        if kind == "sorted_keys_garbage":
            config["sorted_keys"][i] = rng.choice([5, None, "", [keys[i]], {"k": 1}, value])
            config_file.write_text(json.dumps(config))
            return {"config.json", "sorted_keys"}, True
        state = torch.load(bin_file, weights_only=True)
        if kind == "missing_tensor":  # item 1
            # the weights only: embed_dim / interchange_dim are pyvene's bookkeeping, and a NoReFT without
            # proj_layer.bias is a valid add_bias=False save
            tensors = [k for k, v in state.items() if isinstance(v, torch.Tensor)
                       and k not in ("embed_dim", "interchange_dim", "proj_layer.bias")]
            del state[rng.choice(sorted(tensors))]
            torch.save(state, bin_file)
            return {bin_file.name}, True
        if kind == "bare_tensor":  # item 1
            torch.save(next(v for v in state.values() if isinstance(v, torch.Tensor)), bin_file)
            return {bin_file.name}, True
        if kind == "other_container":
            torch.save(rng.choice([[], {}, [1, 2], 5, "x", {"weight": 3}]), bin_file)
            return {bin_file.name}, True
        if kind == "wrong_shape":
            name = rng.choice(sorted(k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() >= 1))
            state[name] = torch.cat([state[name], state[name][:1]])
            torch.save(state, bin_file)
            return {bin_file.name}, True
        if kind == "truncate":
            data = bin_file.read_bytes()
            bin_file.write_bytes(data[: rng.randrange(len(data))])
            return {bin_file.name}, True
        if kind == "nan":  # item 16's check, for pyreft weights too (new if refused only for reftkit folders)
            name = rng.choice(sorted(k for k, v in state.items() if isinstance(v, torch.Tensor)
                                     and v.is_floating_point() and v.numel() > 1 and not k.endswith(".base")))
            flat = state[name].flatten().clone()
            flat[rng.randrange(flat.numel())] = rng.choice([math.nan, math.inf])
            state[name] = flat.view(state[name].shape)
            torch.save(state, bin_file)
            return {bin_file.name, name}, True
        if kind == "representations":  # item 1: [{}], 5, lists
            config["representations"] = rng.choice([[{}], 5, [[]], [[1]], "x", [None] * len(keys), value])
            config_file.write_text(json.dumps(config))
            return {"config.json", "representations"}, True
        if kind == "intervention_types":
            config["intervention_types"][i] = rng.choice([5, None, "", "<class 'os.system'>", "LoreftIntervention ",
                                                          value])
            config_file.write_text(json.dumps(config))
            return {"config.json", "intervention_types"}, True
        if kind == "delete_field":
            field = rng.choice(["representations", "intervention_types", "sorted_keys"])
            del config[field]
            config_file.write_text(json.dumps(config))
            return {"config.json", field}, True
        if kind == "not_json":
            config_file.write_bytes(config_file.read_bytes()[: rng.randrange(1, 60)])
            return {"config.json"}, True
        if kind == "top_level":
            config_file.write_text(json.dumps(rng.choice([[], 5, None, "x", [config]])))
            return {"config.json"}, True
        if kind == "intact":
            return set(), False
        raise AssertionError(kind)

    return kind, apply


@given(arch=st.sampled_from(ARCHS), cls_name=st.sampled_from(PYREFT_CLASSES), mutation=pyreft_mutations())
def test_corrupted_pyreft_folders_load_exactly_or_are_refused_naming_the_file(arch, cls_name, mutation):
    kind, apply = mutation
    base, before, want = pyreft_case(arch, cls_name)
    event(f"pyreft mutation: {kind}")
    with rebuild_on_failure(_PYREFT, (arch, cls_name)), tempfile.TemporaryDirectory(dir=scratch()) as tmp:
        folder = Path(tmp) / "inner" / cls_name
        shutil.copytree(GOLDENS / arch / cls_name, folder)
        names, must_fail = apply(folder)
        note(f"mutation {kind}: must name {sorted(names)}")
        try:
            reft = reftkit.ReftModel.from_pyreft(base, folder, positions="l1")
        except Exception as err:  # noqa: BLE001 - judged below
            assert_unchanged(before, base, "a refused pyreft load")
            if not must_fail:
                record("pyreft", "crash", "valid refused")
                raise Crash(f"an intact folder was refused: {type(err).__name__}: {err}") from err
            if not isinstance(err, reftkit.LoadError):
                record("pyreft", "crash", type(err).__name__)
                raise Crash(f"not a LoadError: {type(err).__name__}: {err}") from err
            judge_error(err, names, "pyreft")
            return
        try:
            if must_fail:
                raise SilentChange(f"the {kind} folder loaded")
            reft.eval()
            with torch.no_grad():
                got = reft(input_ids=IDS, attention_mask=MASK).logits
            if not torch.equal(got, want):
                raise SilentChange(f"loaded after {kind}, but the outputs differ from the intact folder's")
        except SilentChange:
            record("pyreft", "silent change", kind)
            raise
        finally:
            reft.detach()
        assert_unchanged(before, base, "after a pyreft load and detach")
        record("pyreft", "works", kind)


def test_reference_is_not_vacuous():
    """The reference machinery can fail: a wrong formula, wrong positions, or a leftover hook are caught."""
    model, before, bare = config_model("llama")
    entries = [{"layer": 1, "component": "block_output", "positions": "f1+l1", "intervention": "loreft"}]
    reft = reftkit.get_reft_model(model, reftkit.ReftConfig(representations=entries)).eval()
    try:
        with torch.no_grad():
            got = reft(input_ids=IDS, attention_mask=MASK).logits
        plan = plan_for(entries, "llama", reft, None)
        assert_matches(got, reference_logits(model, plan, IDS, MASK), MASK, "sanity")
        wrong_rows = [(path, fn, [[0] for _ in rows]) for path, fn, rows in plan]
        with pytest.raises(SilentChange):
            assert_matches(got, reference_logits(model, wrong_rows, IDS, MASK), MASK, "wrong positions")
        wrong_formula = [(path, (lambda h, fn=fn: fn(h) + 1e-3), rows) for path, fn, rows in plan]
        with pytest.raises(SilentChange):
            assert_matches(got, reference_logits(model, wrong_formula, IDS, MASK), MASK, "wrong formula")
        assert hand_positions([0, 1, 1, 1, 1, 1], 2, 1, False) == [1, 2, 5]
        assert hand_positions([1, 0, 1, 1, 1, 1], 2, 1, False) == [0, 2, 5]  # item 11's example
        assert hand_positions([0, 0, 1], 1, 1, False) == [2]
    finally:
        reft.detach()
    assert_unchanged(before, model, "sanity")
    handle = model.lm_head.register_forward_hook(lambda *a: None)
    try:
        with pytest.raises(SilentChange, match="hooks"):
            assert_unchanged(before, model, "a leftover hook")
    finally:
        handle.remove()
    model.train()
    try:
        with pytest.raises(SilentChange, match="training"):
            assert_unchanged(before, model, "train mode")
    finally:
        model.eval()

