"""The serving engine in-process: rows of different adapters in one batch each generate what they generate alone
(token for token against ``ReftModel.generate``), finished rows leave the batch, a cancelled row is dropped, SVF
experts batch apart, sampling is seeded and top-p is a nucleus, and adapter folders are checked at load."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from serve_case import PROMPTS, build, offline

import reftkit
from reftkit.serve import AdapterError, AdapterSet, Engine, GenerationRequest, QueueFull


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return build(tmp_path_factory.mktemp("serve_engine"))


@pytest.fixture
def served(folders):
    model, tokenizer = reftkit.load_model(str(folders["base"]))
    adapters = AdapterSet(model)
    for name in ("a", "b", "ia3", "svf", "a2", "svf2", "houlsby"):
        adapters.load(name, folders[name])
    engine = Engine(adapters, tokenizer, window_ms=200, max_batch=16)
    yield engine, tokenizer
    engine.stop(timeout=30)


class Collector:
    """A request's sink: text pieces, the done payload, and when it came."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.done: dict | None = None
        self.error: str | None = None
        self.finished_at = 0.0
        self.event = threading.Event()

    def __call__(self, event: str, payload) -> None:
        if event == "text":
            self.pieces.append(payload)
            return
        self.done, self.error = (payload, None) if event == "done" else (None, payload)
        self.finished_at = time.monotonic()
        self.event.set()

    def wait(self) -> "Collector":
        assert self.event.wait(60), "the engine never answered"
        assert self.error is None, self.error
        return self


def submit_all(engine: Engine, tokenizer, routes, max_tokens, **kw) -> list[Collector]:
    sinks = []
    for prompt, route, n in zip(PROMPTS, routes, max_tokens):
        sink = Collector()
        engine.submit(GenerationRequest(prompt_ids=tokenizer(prompt)["input_ids"], route=route, max_tokens=n,
                                        sink=sink, temperature=0.0, **kw))
        sinks.append(sink)
    return [s.wait() for s in sinks]


def test_mixed_batch_rows_equal_each_adapter_alone(served, folders):
    engine, tokenizer = served
    routes, lengths = ["ia3", "b", "a", None, "houlsby", "b"], [10, 12, 9, 7, 16, 3]
    results = submit_all(engine, tokenizer, routes, lengths)
    assert engine.stats["batches"] == 1 and engine.stats["mixed_batches"] == 1
    assert engine.stats["max_batch_rows"] == 6
    for prompt, route, n, got in zip(PROMPTS, routes, lengths, results):
        want = offline(folders, route, tokenizer(prompt)["input_ids"], n)
        assert got.done["tokens"] == want, (route, prompt)
        assert "".join(got.pieces) == tokenizer.decode(want, skip_special_tokens=True)
        assert got.done["finish_reason"] == "length" and got.done["completion_tokens"] == n
    # the routing is visible: the same prompt under another adapter (or none) generates something else ...
    ids = tokenizer(PROMPTS[2])["input_ids"]
    assert len({tuple(offline(folders, route, ids, 9)) for route in ("a", "b", None)}) == 3
    # ... and IA3 edits the new tokens too: its row would differ with the prompt edited alone
    model, _ = reftkit.load_model(str(folders["base"]))
    ia3 = reftkit.ReftModel.from_pretrained(model, folders["ia3"])
    prompt = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
    prefill_only = ia3.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                                do_sample=False, edit_new_tokens=False)[0, prompt.shape[1]:].tolist()
    assert results[0].done["tokens"] != prefill_only


def test_finished_rows_leave_the_batch(served):
    engine, tokenizer = served
    lengths = [2, 40, 6]
    results = submit_all(engine, tokenizer, ["a", "ia3", None], lengths)
    # each row runs one decode step per token after its first, so a row that ended costs nothing more
    assert engine.stats["row_steps"] == sum(n - 1 for n in lengths)
    assert engine.stats["decode_steps"] == max(lengths) - 1
    assert results[0].finished_at < results[2].finished_at < results[1].finished_at


def test_requests_join_a_running_batch(served, folders):
    engine, tokenizer = served
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    long, short = Collector(), Collector()
    joined = threading.Event()

    def long_sink(event, payload):  # once the long row is generating, a short request arrives
        if event == "text" and not joined.is_set():
            joined.set()
            engine.submit(GenerationRequest(prompt_ids=ids[1], route="b", max_tokens=5, sink=short, temperature=0.0))
        long(event, payload)
    engine.submit(GenerationRequest(prompt_ids=ids[0], route="ia3", max_tokens=60, sink=long_sink,
                                    temperature=0.0))
    long.wait(), short.wait()
    assert engine.stats["batches"] == 1 and engine.stats["joined"] == 1 and engine.stats["mixed_batches"] == 1
    assert short.finished_at < long.finished_at
    # the joined row took part in 4 decode steps (its first token came from its own prefill)
    assert engine.stats["row_steps"] == 59 + 4
    assert long.done["tokens"] == offline(folders, "ia3", ids[0], 60)
    assert short.done["tokens"] == offline(folders, "b", ids[1], 5)


def test_an_older_request_of_another_class_is_not_overtaken(served):
    engine, tokenizer = served
    ids = tokenizer(PROMPTS[0])["input_ids"]
    long, svf, late = Collector(), Collector(), Collector()
    started = threading.Event()

    def long_sink(event, payload):
        if event == "text" and not started.is_set():
            started.set()  # while the ReFT batch runs: an SVF request, then a ReFT one that could join
            engine.submit(GenerationRequest(prompt_ids=ids, route="svf", max_tokens=3, sink=svf, temperature=0.0))
            engine.submit(GenerationRequest(prompt_ids=ids, route="a", max_tokens=3, sink=late, temperature=0.0))
        long(event, payload)
    engine.submit(GenerationRequest(prompt_ids=ids, route="b", max_tokens=40, sink=long_sink, temperature=0.0))
    long.wait(), svf.wait(), late.wait()
    assert engine.stats["joined"] == 0 and engine.stats["batches"] == 3
    assert long.finished_at < svf.finished_at < late.finished_at


def test_svf_experts_batch_apart_and_match(served, folders):
    engine, tokenizer = served
    routes, lengths = ["svf", "a", None, "svf"], [6, 6, 6, 4]
    results = submit_all(engine, tokenizer, routes, lengths)
    assert engine.stats["batches"] == 2  # the SVF rows together, the ReFT and bare rows together
    for prompt, route, n, got in zip(PROMPTS, routes, lengths, results):
        assert got.done["tokens"] == offline(folders, route, tokenizer(prompt)["input_ids"], n), route


def test_a_cancelled_row_is_dropped_and_the_others_go_on(served, folders):
    engine, tokenizer = served
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    keep = Collector()
    leaving = GenerationRequest(prompt_ids=ids[0], route="a", max_tokens=500, sink=lambda e, p: None,
                                temperature=0.0)

    def sink(event, payload):  # the client leaves once its first text arrives
        leaving.cancelled.set()
    leaving.sink = sink
    engine.submit(leaving)
    engine.submit(GenerationRequest(prompt_ids=ids[1], route="b", max_tokens=30, sink=keep, temperature=0.0))
    keep.wait()
    assert engine.stats["cancelled"] == 1
    assert engine.stats["row_steps"] < 60  # the 500-token row did not run on
    assert keep.done["tokens"] == offline(folders, "b", ids[1], 30)


def test_sampling_is_seeded_and_top_p_is_a_nucleus(served):
    engine, tokenizer = served
    ids = tokenizer(PROMPTS[2])["input_ids"]

    def run(**kw) -> list[int]:
        sink = Collector()
        engine.submit(GenerationRequest(prompt_ids=ids, route="a", max_tokens=12, sink=sink, **kw))
        return sink.wait().done["tokens"]
    greedy = run(temperature=0.0)
    assert run(temperature=1.5, seed=3) == run(temperature=1.5, seed=3)
    assert run(temperature=1.5, seed=3) != greedy  # a hot sampler leaves the greedy path on 12 tokens
    assert run(temperature=1.5, top_p=1e-6, seed=5) == greedy  # the nucleus of the top token alone


def run_one(engine: Engine, ids: list[int], route: str, n: int = 8) -> list[int]:
    sink = Collector()
    engine.submit(GenerationRequest(prompt_ids=ids, route=route, max_tokens=n, sink=sink, temperature=0.0))
    return sink.wait().done["tokens"]


def test_mixtures_follow_the_experts_rules(served, folders):
    from reftkit.experts import ExpertLibrary, ExpertRouter

    engine, tokenizer = served
    adapters = engine.adapters
    ids = tokenizer(PROMPTS[1])["input_ids"]
    alone = {name: offline(folders, name, ids, 8) for name in ("a", "a2", "svf", "svf2")}
    assert alone["a"] != alone["a2"] and alone["svf"] != alone["svf2"]
    # a weight-one term is that adapter; weights (1, 0) and (0, 1) pick one expert exactly
    for spec, want in (("1*a", "a"), ("1*a+0*a2", "a"), ("0*a+1*a2", "a2"), ("1*svf", "svf"),
                       ("0*svf+1*svf2", "svf2")):
        route = engine.call_between_batches(lambda spec=spec: adapters.mixture(spec)).result(30)
        assert run_one(engine, ids, route) == alone[want], spec
    # an even mixture is neither, and is what the experts module's router generates
    ids = tokenizer(PROMPTS[3])["input_ids"]
    route = engine.call_between_batches(lambda: adapters.mixture("0.5*a+0.5*a2")).result(30)
    mixed = run_one(engine, ids, route)
    assert mixed not in (offline(folders, "a", ids, 8), offline(folders, "a2", ids, 8))
    model, _ = reftkit.load_model(str(folders["base"]))
    library = ExpertLibrary()
    for name in ("a", "a2"):
        own = reftkit.ReftModel.from_pretrained(model, folders[name])
        library.add(name, own)
        own.detach()
    router = ExpertRouter(model, library, routes={"m": {"a": 0.5, "a2": 0.5}})
    prompt = torch.tensor([ids])
    want = router.reft.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                do_sample=False, tasks=["m"])[0, len(ids):].tolist()
    assert mixed == want
    for spec, match in (("0.5*a+0.5*b", "a|b"), ("0.5*a+0.5*svf", "one kind"), ("1*zzz", "is not loaded"),
                        ("a+b", "weight\\*adapter"), ("1*a+2*a", "twice")):
        with pytest.raises(AdapterError, match=match):
            engine.call_between_batches(lambda spec=spec: adapters.mixture(spec)).result(30)
    adapters.unload("a2")
    assert not [k for k in adapters.mixtures if "a2" in k]


def test_expert_libraries_load_as_one_adapter_per_expert(folders):
    model, tokenizer = reftkit.load_model(str(folders["base"]))
    adapters = AdapterSet(model)
    loaded = adapters.load("lib", folders["lib"]) + adapters.load("svflib", folders["svflib"])
    assert [(a.name, a.kind) for a in loaded] == [("lib.a", "reft"), ("lib.a2", "reft"), ("svflib.svf", "svf"),
                                                  ("svflib.svf2", "svf")]
    engine = Engine(adapters, tokenizer, window_ms=100)
    try:
        ids = tokenizer(PROMPTS[1])["input_ids"]
        for route, same in (("lib.a2", "a2"), ("svflib.svf2", "svf2"), ("lib.a", "a")):
            assert run_one(engine, ids, route) == offline(folders, same, ids, 8), route
    finally:
        engine.stop(timeout=30)
    with pytest.raises(AdapterError, match="already loaded"):
        adapters.load("lib", folders["lib"])


def test_backpressure_and_bad_arguments(folders):
    model, tokenizer = reftkit.load_model(str(folders["base"]))
    engine = Engine(AdapterSet(model), tokenizer, window_ms=2000, max_queue=2)
    try:
        sinks = [Collector() for _ in range(3)]
        for sink in sinks[:2]:
            engine.submit(GenerationRequest(prompt_ids=[5, 6], route=None, max_tokens=2, sink=sink))
        with pytest.raises(QueueFull, match="max_queue=2"):
            engine.submit(GenerationRequest(prompt_ids=[5, 6], route=None, max_tokens=2, sink=sinks[2]))
    finally:
        assert engine.stop(timeout=30)
    assert all(s.done is not None for s in sinks[:2])  # stop() drained what was queued
    for kw, field in (({"max_batch": 0}, "max_batch"), ({"window_ms": -1}, "window_ms"),
                      ({"max_queue": True}, "max_queue")):
        with pytest.raises(ValueError, match=field):
            Engine(AdapterSet(model), tokenizer, **kw)


def test_adapter_folders_are_checked_at_load(folders, tmp_path):
    model, _ = reftkit.load_model(str(folders["base"]))
    adapters = AdapterSet(model)
    adapters.load("a", folders["a"])
    before = {n: p.clone() for n, p in adapters.reft.interventions.named_parameters()}
    with pytest.raises(AdapterError, match="already loaded"):
        adapters.load("a", folders["b"])
    with pytest.raises(AdapterError, match="use 1-64 letters"):
        adapters.load("bad:name", folders["b"])
    with pytest.raises(AdapterError, match="is not a folder"):
        adapters.load("c", tmp_path / "missing")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")
    with pytest.raises(AdapterError, match="never unpickles"):
        adapters.load("c", pickled)
    edited = tmp_path / "edited"
    edited.mkdir()
    for f in folders["b"].iterdir():
        (edited / f.name).write_bytes(f.read_bytes())
    weights = edited / "interventions.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(AdapterError, match="SHA-256|sha256"):
        adapters.load("c", edited)
    assert adapters.names() == ["a"]  # failed loads changed nothing
    after = dict(adapters.reft.interventions.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    adapters.load("b", folders["b"])
    assert adapters.reft.task_names == ["a", "b"]
    adapters.unload("a")
    assert adapters.reft.task_names == ["b"]
    with pytest.raises(AdapterError, match="is not loaded"):
        adapters.unload("a")
    base = adapters.detach()
    assert not any(True for _ in base.modules() if type(_).__name__ == "SVFLinear")


def test_encoder_decoder_bases_are_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                                d_kv=8))
    with pytest.raises(AdapterError, match="encoder-decoder"):
        AdapterSet(model)


def test_gpt2_rows_equal_each_prompt_alone(tmp_path):
    """Another architecture (learned absolute positions, its own cache handling): left-padded rows still
    generate what each prompt does alone."""
    from conftest import tiny_gpt2, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    spec = [{"layer": 1, "component": "block_output", "positions": "f1+l1", "intervention": "loreft",
             "low_rank_dimension": 2}]
    reft = reftkit.get_reft_model(tiny_gpt2(seed=3), spec)
    with torch.no_grad():
        for p in reft.interventions.parameters():
            p.add_(torch.randn_like(p) * 3.0)
    reft.save_pretrained(tmp_path / "g")
    adapters = AdapterSet(tiny_gpt2(seed=3))
    adapters.load("g", tmp_path / "g")
    engine = Engine(adapters, tokenizer, window_ms=200)
    try:
        sinks = []
        for prompt, route in zip(PROMPTS[:4], ["g", None, "g", "g"]):
            sinks.append(Collector())
            engine.submit(GenerationRequest(prompt_ids=tokenizer(prompt)["input_ids"], route=route, max_tokens=7,
                                            sink=sinks[-1], temperature=0.0))
        got = [s.wait().done["tokens"] for s in sinks]
    finally:
        engine.stop(timeout=30)
    assert engine.stats["batches"] == 1
    for prompt, route, tokens in zip(PROMPTS[:4], ["g", None, "g", "g"], got):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        runner = reft if route else reft.model  # the bare model: hooks without a call state pass through
        out = runner.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=7, do_sample=False,
                              pad_token_id=0)
        want = out[0, ids.shape[1]:].tolist()
        want = want[:want.index(2)] if 2 in want else want
        assert tokens == want, (route, prompt)
