"""Expert libraries, mixing, routing, CEM and dispatch (Transformer²-style), against hand references."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

import reftkit
from reftkit.analysis.svf import apply_svf, remove_svf, svf_modules
from reftkit.experts import (
    ExpertError,
    ExpertLibrary,
    ExpertRouter,
    cem,
    expert_dispatch,
    few_shot_weights,
    mix_parameters,
    prompt_dispatch,
    train_dispatch_expert,
    two_pass_generate,
)
from reftkit.interventions import LoReFT, Mixture
from reftkit.interventions.scaling import ia3_representations

NAMES = ["a", "b", "c"]
LOREFT = {"layer": [0, 2], "component": "block_output", "positions": "f1+l1", "intervention": "loreft",
          "low_rank_dimension": 2}


def _perturbed(model, config, seed):
    torch.manual_seed(seed)
    reft = reftkit.get_reft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in reft.interventions.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return reft


def _library(model, config=LOREFT):
    library = ExpertLibrary()
    for i, name in enumerate(NAMES):
        reft = _perturbed(model, config, seed=i + 1)
        library.add(name, reft)
        reft.detach()
    return library


def _svf_library(model):
    library = ExpertLibrary()
    for i, name in enumerate(NAMES):
        modules = apply_svf(model)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for m in modules.values():
                m.z.mul_(1 + 0.5 * torch.rand(m.z.shape, generator=g))
        library.add(name, model)
        remove_svf(model)
    return library


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 60, (4, 7), generator=g)
    return ids, torch.ones_like(ids)


def _logits(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def test_library_round_trip_and_single_expert(tmp_path):
    model = tiny_llama()
    ids, mask = _batch()
    reference = _perturbed(model, LOREFT, seed=2)
    expected = _logits(reference, ids, mask)
    reference.detach()
    library = _library(model)
    library.save(tmp_path / "lib")
    loaded = ExpertLibrary.load(tmp_path / "lib")
    assert loaded.names == NAMES and loaded.kind == "reft"
    for name in NAMES:
        for key, tensor in library[name].items():
            assert torch.equal(loaded[name][key], tensor)
    expert = loaded.load_into(model, "b")  # seed 2 = "b"
    assert torch.equal(_logits(expert, ids, mask), expected)
    expert.detach()
    # a tampered weights file is refused with its name
    data = (tmp_path / "lib" / "experts.safetensors").read_bytes()
    (tmp_path / "lib" / "experts.safetensors").write_bytes(data[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(ExpertError, match="SHA-256"):
        ExpertLibrary.load(tmp_path / "lib")


def test_one_hot_mixture_reproduces_each_loreft_expert_exactly():
    model = tiny_llama()
    ids, mask = _batch()
    library = _library(model)
    routes = {f"mix{k}": [float(j == k) for j in range(3)] for k in range(3)}
    router = ExpertRouter(model, library, {**routes, "zero": [0.0, 0.0, 0.0]})
    base = _logits(model, ids, mask)
    for k, name in enumerate(NAMES):
        expert = library.load_into(model, name)
        alone = _logits(expert, ids, mask)
        expert.detach()
        mixed = _logits(router.reft, ids, mask, tasks=[f"mix{k}"] * 4)
        assert torch.equal(mixed, alone), name
    assert torch.allclose(_logits(router.reft, ids, mask, tasks=["zero"] * 4), base, atol=1e-6)
    router.detach()


def test_output_mixture_is_the_weighted_sum_of_edits():
    torch.manual_seed(0)
    members = [LoReFT(16, low_rank_dimension=2) for _ in range(3)]
    with torch.no_grad():
        for m in members:
            for p in m.parameters():
                p.add_(0.3 * torch.randn_like(p))
    alpha = [0.3, -0.5, 1.2]
    mixture = Mixture(16, members=[{"intervention": "loreft", "low_rank_dimension": 2}] * 3, weights=alpha)
    for k, m in enumerate(members):
        mixture.members[k].load_state_dict(m.state_dict())
    h = torch.randn(5, 16)
    hand = h + sum(a * (m(h) - h) for a, m in zip(alpha, members))
    assert torch.allclose(mixture(h), hand, atol=1e-5)


def test_ia3_and_svf_mix_parameters():
    model = tiny_llama()
    ids, mask = _batch()
    config = [{**r, "init_ia3_weights": True} for r in ia3_representations(model)]
    library = _library(model, config)
    assert set(library.mixing.values()) == {"parameters"}
    alpha = [0.2, 0.5, 0.3]
    mixed = mix_parameters(library, alpha)
    for key in mixed:
        hand = sum(a * library[n][key] for a, n in zip(alpha, NAMES))
        assert torch.allclose(mixed[key], hand, atol=1e-7)
    assert all(torch.equal(mix_parameters(library, [0.0, 1.0, 0.0])[k], library["b"][k]) for k in mixed)
    # the routed mixture computes what a ReftModel holding the mixed scales computes
    router = ExpertRouter(model, library, {"mix": alpha})
    routed = _logits(router.reft, ids, mask, tasks=["mix"] * 4)
    router.detach()
    library.add_tensors("mixed", mixed)
    holder = library.load_into(model, "mixed")
    assert torch.allclose(routed, _logits(holder, ids, mask), atol=1e-6)
    holder.detach()

    svf = _svf_library(tiny_llama())
    one_hot = mix_parameters(svf, {"c": 1.0})
    assert all(torch.equal(one_hot[k], svf["c"][k]) for k in one_hot)
    with pytest.raises(ExpertError, match="cannot be averaged"):
        mix_parameters(_library(tiny_llama()), alpha)


def test_per_site_weights_take_each_site_from_its_expert():
    model = tiny_llama()
    ids, mask = _batch()
    library = _library(model)
    # site 0 (layer 0) from "a", site 1 (layer 2) from "c"
    router = ExpertRouter(model, library, {"mix": torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])})
    routed = _logits(router.reft, ids, mask, tasks=["mix"] * 4)
    router.detach()
    library.add_tensors("spliced", {**{k: v for k, v in library["a"].items() if k.startswith("layer0")},
                                    **{k: v for k, v in library["c"].items() if k.startswith("layer2")}})
    spliced = library.load_into(model, "spliced")
    assert torch.equal(routed, _logits(spliced, ids, mask))
    spliced.detach()


@pytest.mark.parametrize("kind", ["reft", "svf"])
def test_one_batch_routes_each_row_to_its_own_expert(kind):
    model = tiny_llama()
    tok = tiny_tokenizer()
    library = _library(model) if kind == "reft" else _svf_library(model)
    prompts = ["what is the capital of france", "define word dog", "how many legs spider", "tell me about it",
               "sky colour", "good movie"]
    routes = ["a", "c", None, "b", "mix", "a"]
    router = ExpertRouter(model, library, {"a": "a", "b": "b", "c": "c", "mix": [0.2, 0.3, 0.5]})
    together = router.generate(tok, prompts, routes, max_new_tokens=5, batch_size=6)
    for route in set(routes):
        rows = [i for i, r in enumerate(routes) if r == route]
        alone = router.generate(tok, [prompts[i] for i in rows], [route] * len(rows), max_new_tokens=5,
                                batch_size=1)
        assert [together[i] for i in rows] == alone, route
    # route None is the bare model
    base_model = router.detach()
    from reftkit.analysis.text_metrics import generate_predictions
    assert generate_predictions(base_model, tok, [prompts[2]], max_new_tokens=5, progress=False) == [together[2]]
    assert not svf_modules(base_model)


def test_bad_input_is_named():
    model = tiny_llama()
    library = _library(model)
    other = _perturbed(model, {**LOREFT, "low_rank_dimension": 3}, seed=9)
    with pytest.raises(ExpertError, match=r"reft_config.representations\[0\].low_rank_dimension: 3 vs 2"):
        library.add("wide", other)
    other.detach()
    with pytest.raises(ExpertError, match="shape"):
        library.add_tensors("odd", {**library["a"], "layer0_block_output.source.bias": torch.zeros(3)})
    with pytest.raises(ExpertError, match="'nope' does not exist"):
        ExpertRouter(model, library, {"x": "nope"})
    with pytest.raises(ExpertError, match="'nope' does not exist"):
        ExpertRouter(model, library, {"x": {"nope": 1.0}})
    with pytest.raises(ExpertError, match=r"give 3 weights"):
        ExpertRouter(model, library, {"x": [0.5, 0.5]})
    router = ExpertRouter(model, library)
    with pytest.raises(ExpertError, match="route 'zzz' does not exist"):
        router.generate(tiny_tokenizer(), ["dog"], ["zzz"])
    with pytest.raises(ExpertError, match="not a mixture"):
        router.set_weights("a", [1.0, 0.0, 0.0])
    router.detach()
    svf = _svf_library(tiny_llama())
    with pytest.raises(ExpertError, match="'svf' experts"):
        svf.add("loreft", reftkit.get_reft_model(tiny_llama(), LOREFT))


def test_cem_finds_a_known_optimum():
    target = torch.tensor([0.2, 0.7, 0.5, 0.9])
    result = cem(lambda x: -float(((x - target) ** 2).sum()), torch.full((4,), 0.5), seed=1, progress=False)
    assert torch.allclose(result.best, target, atol=0.02), result.best
    assert list(result.history.columns)[:2] == ["iteration", "best_score"] and len(result.history) == 50
    assert result.history.best_score.is_monotonic_increasing
    # a tuple score breaks ties of the first entry with the second
    tie = cem(lambda x: (0.0, -abs(float(x[0]) - 0.3)), [0.5], iterations=20, seed=0, progress=False)
    assert abs(float(tie.best[0]) - 0.3) < 0.02
    with pytest.raises(ValueError, match="elite_ratio"):
        cem(lambda x: 0.0, [0.5], population=4, elite_ratio=0.1)


class KeywordModel(torch.nn.Module):
    """A causal stand-in for a model that has learned to classify: at each position it predicts the
    first keyword of the request — the tokens before the first ``stop`` — or ``fallback``."""

    def __init__(self, keywords: list[int], fallback: int, vocab: int, stop: int) -> None:
        super().__init__()
        self.keywords, self.fallback, self.vocab, self.stop = keywords, fallback, vocab, stop
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives model_device a parameter

    def forward(self, input_ids, attention_mask=None, **kw):
        batch, width = input_ids.shape
        logits = torch.zeros(batch, width, self.vocab)
        for b in range(batch):
            seen, request = self.fallback, True
            for t in range(width):
                token = int(input_ids[b, t])
                request = request and token != self.stop
                if request and seen == self.fallback and token in self.keywords:
                    seen = token
                logits[b, t, seen] = 10.0
        return type("Out", (), {"logits": logits})()


def test_prompt_dispatch_routes_a_labelled_batch():
    tok = tiny_tokenizer()
    names, other = ["dog", "cat", "movie"], "no"
    ids = {w: tok.convert_tokens_to_ids(w) for w in [*names, other]}
    model = KeywordModel([ids[n] for n in names], ids[other], len(tok), tok.convert_tokens_to_ids("."))
    prompts = ["tell me about dog", "cat that meows", "what is the capital of france", "great movie", "dog that barks",
               "how many legs spider"]
    gold = ["dog", "cat", None, "movie", "dog", None]
    # the category list follows the request's "." and the stand-in reads the request alone
    routes = prompt_dispatch(model, tok, prompts, names, method="rank", other=other,
                             template="{prompt} . {categories} ?")
    assert routes == gold and routes.method == "rank" and routes.generations is None


def test_classification_expert_and_few_shot_and_two_pass():
    model = tiny_llama()
    tok = tiny_tokenizer()
    model.resize_token_embeddings(len(tok))  # every generated id decodes to a word
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # a random tiny model's logits are too flat to rank anything
    names = ["dog", "cat"]
    prompts = ["tell me about dog", "dog that barks", "a dog", "cat that meows", "tell me about cat", "the cat",
               "what is the capital of france", "how many legs spider"]
    labels = ["dog", "dog", "dog", "cat", "cat", "cat", None, None]
    template = "{prompt} . {categories} ?"
    config = {"layer": 2, "component": "block_output", "positions": "l1", "intervention": "loreft",
              "low_rank_dimension": 8}
    untrained = prompt_dispatch(model, tok, prompts, names, method="rank", other="no", template=template)
    assert untrained != labels
    expert = train_dispatch_expert(model, tok, prompts, labels, names, config, kind="reft", other="no",
                                   template=template, epochs=100, learning_rate=2e-2, batch_size=8, progress=False)
    assert expert_dispatch(expert, tok, prompts, names, method="rank", other="no", template=template) == labels
    # trained on " <category>", the ReFT dispatcher also generates it
    assert expert_dispatch(expert, tok, prompts, names, other="no", template=template, max_new_tokens=1) == labels
    expert.detach()

    # few-shot: the shots are answered by expert "b" only; CEM must find weights that reproduce its answers
    library = _library(model)
    router = ExpertRouter(model, library, {"b": "b", "even": [1 / 3] * 3})
    shots = ["define word dog", "sky colour", "good movie", "tell me about it"]
    answers = [" " + t for t in router.generate(tok, shots, ["b"] * 4, max_new_tokens=1)]
    start, _ = router.answer_scores(tok, shots, answers, ["even"] * 4)
    assert not bool(start.all())  # the search's starting point does not already answer them all
    router.detach()
    result = few_shot_weights(library, model, tok, shots, answers, population=16, iterations=10, seed=0,
                              progress=False)
    assert result.best_score[0] == 1.0 and result.best.shape == (3,)
    assert result.history.best_score.iloc[-1] == 1.0
    router = ExpertRouter(model, library, {"a": "a", "b": "b", "c": "c", "shots": result.best})
    table = two_pass_generate(router, tok, shots, lambda p: ["shots"] * len(p), max_new_tokens=1)
    assert [" " + t for t in table.completion] == answers and list(table.route) == ["shots"] * 4
    router.detach()


# Dispatch on prompts the dispatcher never saw: "dog" and "cat" requests go to those experts, anything else to the
# base model ("no"). Training and held-out prompts share the nouns but not a single context.
DISPATCH_OTHER_NOUNS = ["spider", "movie", "sky", "paris"]
DISPATCH_TRAIN_CONTEXTS = ["tell me about {}", "what is a {}", "the {} is good", "{} that is great", "a {}"]
DISPATCH_HELD_OUT_CONTEXTS = ["define word {}", "how many legs {}", "{} animal", "a bad {}", "is it a {}",
                              "what about the {} ?"]


def _dispatch_set(contexts, others_per_context):
    rows = []
    for i, context in enumerate(contexts):
        rows += [(context.format("dog"), "dog"), (context.format("cat"), "cat")]
        rows += [(context.format(DISPATCH_OTHER_NOUNS[(i * others_per_context + j) % 4]), None)
                 for j in range(others_per_context)]
    return [p for p, _ in rows], [label for _, label in rows]


def test_classification_expert_routes_held_out_prompts():
    """Strategy (b) scored on held-out prompts: three balanced classes, so chance — and any constant dispatcher —
    gets 1/3. The trained dispatcher must beat that by a wide margin in every class; trained on the same prompts
    with the dog/cat labels swapped (the negative control) it must route the held-out dog/cat prompts wrongly."""
    train_prompts, train_labels = _dispatch_set(DISPATCH_TRAIN_CONTEXTS, 2)       # 5 dog, 5 cat, 10 other
    held_prompts, held_labels = _dispatch_set(DISPATCH_HELD_OUT_CONTEXTS, 1)      # 6 dog, 6 cat, 6 other
    assert not set(held_prompts) & set(train_prompts)
    names = ["dog", "cat"]
    # the order of DISPATCH_TEMPLATE: the category list, then the request, then a short cue
    template = "{categories} ? {prompt} ."
    config = {"layer": 1, "component": "block_output", "positions": "l1", "intervention": "loreft",
              "low_rank_dimension": 8}

    def accuracy(routes, gold, only=None):
        pairs = [(r, g) for r, g in zip(routes, gold) if only is None or g in only]
        return sum(r == g for r, g in pairs) / len(pairs)

    def held_out_routes(labels):
        model, tok = tiny_llama(), tiny_tokenizer()
        model.resize_token_embeddings(len(tok))
        with torch.no_grad():
            model.lm_head.weight.mul_(30.0)  # a random tiny model's logits are too flat to rank anything
        untrained = prompt_dispatch(model, tok, held_prompts, names, method="rank", other="no", template=template)
        expert = train_dispatch_expert(model, tok, train_prompts, labels, names, config, kind="reft", other="no",
                                       template=template, epochs=100, learning_rate=2e-2,
                                       batch_size=len(train_prompts), progress=False)
        routes = expert_dispatch(expert, tok, held_prompts, names, method="rank", other="no", template=template)
        expert.detach()
        return list(untrained), list(routes)

    untrained, routes = held_out_routes(train_labels)
    assert accuracy(untrained, held_labels) <= 0.5
    assert accuracy(routes, held_labels) >= 0.7, routes  # 13 of 18 or more, against 6 of 18 by chance
    for label in ("dog", "cat", None):
        assert accuracy(routes, held_labels, only=[label]) >= 4 / 6, (label, routes)
    swap = {"dog": "cat", "cat": "dog", None: None}
    _, swapped = held_out_routes([swap[label] for label in train_labels])
    assert accuracy(swapped, held_labels, only=["dog", "cat"]) <= 2 / 12, swapped
    assert accuracy(swapped, [swap[label] for label in held_labels]) >= 0.7, swapped  # it learnt the swapped rule


def test_mixture_saves_with_its_weights_and_refuses_bad_members(tmp_path):
    model = tiny_llama()
    ids, mask = _batch()
    router = ExpertRouter(model, _library(model), {"mix": torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.0, 0.4]])})
    expected = _logits(router.reft, ids, mask, tasks=["mix"] * 4)
    router.reft.save_pretrained(tmp_path / "routed")
    router.detach()
    again = reftkit.ReftModel.from_pretrained(tiny_llama(), tmp_path / "routed")
    assert torch.equal(_logits(again, ids, mask, tasks=["mix"] * 4), expected)
    assert [iv.config()["weights"] for iv in again.interventions.values()] == [
        pytest.approx([0.2, 0.3, 0.5]), pytest.approx([0.6, 0.0, 0.4])]
    from reftkit.interventions import InterventionError
    with pytest.raises(InterventionError, match="reads a source run"):
        Mixture(members=[{"intervention": "interchange"}])
    with pytest.raises(InterventionError, match="2 finite numbers"):
        Mixture(members=[{"intervention": "loreft"}] * 2, weights=[1.0, float("nan")])
