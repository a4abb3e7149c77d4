"""Writes tutorials/03_interpretability.ipynb; with ``--execute`` also runs it with the full parameters
(about 13 minutes on one CPU thread) and stores the outputs, as committed."""
import nbformat as nbf
from notebook_writer import write

nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
nb["cells"] = [
md("""# 03 — Interpretability: activation patching, steering vectors, DAS

reftkit's hooks are not only for training. The same machinery runs the standard interventions of
interpretability research on a real model — here the embedded **SmolLM2-135M-Instruct** (30 layers,
width 576), offline:

1. **Activation patching** (causal tracing): where, across layers and token positions, does the model
   keep the fact that decides its answer? Plus **collecting** activations with a `collect` intervention.
2. **Steering** with a contrastive activation-addition vector: one vector added at one layer changes
   the tone of what the model writes.
3. **Distributed alignment search (DAS)**: train a single direction (a rank-1 rotated subspace) so that
   swapping it between two inputs swaps one causal variable — and test it on held-out inputs.

Every number quoted in the text comes from the run stored in this notebook: the full parameters below,
about 13 minutes on one CPU thread (the test suite runs a tiny version in well under a minute)."""),
code("""# Parameters: full size as below; the test suite runs a tiny version
PATCH_LAYER_STRIDE = 1      # patch every layer (the last layer is always included)
MAX_NEW_TOKENS = 40         # length of the steered generations
DAS_LAYERS = [2, 8, 14, 20, 24, 25, 26]
DAS_STEPS = 40              # Adam steps per layer, batches of 32 pairs
DAS_TRAIN_PAIRS = 256
DAS_TEST_PAIRS = 128
THREADS = 1                 # torch CPU threads; None = torch's default (all cores: faster on an idle machine,
                            # but many times slower than 1 when other jobs share the cores)""", metadata={"tags": ["parameters"]}),
code("""import random
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a kernel without ipywidgets
import matplotlib.pyplot as plt
import pandas as pd
import torch
from transformers.utils import logging as hf_logging

import reftkit
from reftkit.analysis.patching import activation_patching, plot_patching, steering_vector
from reftkit.analysis.text_metrics import generate_predictions

hf_logging.disable_progress_bar()
plt.rcParams["figure.dpi"] = 80
if THREADS:
    torch.set_num_threads(THREADS)
torch.manual_seed(0)
started = time.time()
model, tokenizer = reftkit.load_model("smollm2")
n_layers = model.config.num_hidden_layers
print(f"{n_layers} layers, width {model.config.hidden_size}, tokenizer pads on the {tokenizer.padding_side}")


def show(fig):
    \"\"\"Display a figure once (pyplot would show it again at the end of the cell).\"\"\"
    plt.close(fig)
    return fig"""),
md("""## 1. Activation patching

Two prompts of the **same token length** that differ only in the subject, so position *t* of one
lines up with position *t* of the other:

* clean: *The Eiffel Tower is in the city of* → the model says **Paris**
* corrupted: *The Colosseum is in the city of* → the model says **Rome**

The score is the logit difference `logit(" Paris") − logit(" Rome")` at the last position. For each
(layer, position), `activation_patching` runs the *corrupted* prompt with that single residual-stream
vector (the layer's `block_output`) replaced by its value from the *clean* run, and records how much of the
clean score comes back: `recovered = (patched − corrupted) / (clean − corrupted)`
(1 = fully restored, 0 = no effect)."""),
code("""clean_text, corrupt_text = "The Eiffel Tower is in the city of", "The Colosseum is in the city of"
clean = tokenizer(clean_text, return_tensors="pt")
corrupt = tokenizer(corrupt_text, return_tensors="pt")
assert clean["input_ids"].shape == corrupt["input_ids"].shape, "patching pairs positions: equal lengths needed"
paris, rome = (tokenizer(w, add_special_tokens=False)["input_ids"] for w in (" Paris", " Rome"))
assert len(paris) == len(rome) == 1
paris, rome = paris[0], rome[0]

with torch.no_grad():
    for name, enc in (("clean", clean), ("corrupted", corrupt)):
        probs = model(**enc).logits[0, -1].softmax(-1)
        top = probs.topk(3)
        print(f"{name:9}", [f"{tokenizer.decode(int(i))!r} {float(p):.2f}" for p, i in zip(top.values, top.indices)])


def logit_diff(output):
    \"\"\"logit(Paris) - logit(Rome) at the last position, one number per batch row.\"\"\"
    return output.logits[:, -1, paris] - output.logits[:, -1, rome]


# axis labels: the clean token, and the corrupted one where they differ
c_tok = [tokenizer.decode(int(i)) for i in clean["input_ids"][0]]
x_tok = [tokenizer.decode(int(i)) for i in corrupt["input_ids"][0]]
labels = [a if a == b else f"{a}/{b}" for a, b in zip(c_tok, x_tok)]
print(labels)"""),
code("""layers = sorted(set(range(0, n_layers, PATCH_LAYER_STRIDE)) | {n_layers - 1})
t0 = time.time()
frame = activation_patching(model, dict(clean), dict(corrupt), logit_diff, layers=layers, progress=False)
print(f"{len(frame)} patched runs in {time.time() - t0:.0f} s")
print(f"clean score {frame.clean_score[0]:.2f}, corrupted score {frame.corrupt_score[0]:.2f}")
show(plot_patching(frame, tokens=labels, title="share of logit(Paris) − logit(Rome) restored"))"""),
code("""grid = frame.pivot(index="layer", columns="position", values="recovered")
grid.columns = labels
# sanity check: the last layer's block output at the last position *is* what the logits are computed
# from (through the final norm and the unembedding), so patching it restores the clean score exactly
last = frame[(frame.layer == n_layers - 1) & (frame.position == len(labels) - 1)].iloc[0]
assert abs(last.score - last.clean_score) < 1e-3, last
print(f"last layer, last position: score {last.score:.4f} vs clean {last.clean_score:.4f}")
grid.round(2)"""),
md("""**What the picture says.** With every layer patched one at a time (the stored run):

* Patching the subject tokens restores most of the answer, from layer 0 up to layer 22: the token
  `iffel` alone gives back 0.78–1.00 of the clean logit difference, ` Tower` 0.31–0.48, ` E` a
  quarter at layer 0 and almost nothing after. Everything the model needs to say *Paris* is in the
  subject's residual stream for the first 23 of its 30 layers.
* From layer 23 on, the subject positions stop mattering (≈ 0) and the **last position** (` of`)
  takes over (0.75–0.81, then exactly 1 at the last layer). So the information is moved from the subject
  to the final token between about layer 20 and layer 23 — attention in those layers reads the
  subject (patches at ` of` in layers 20–22 already restore 0.08, 0.17 and 0.23).
* The other positions (` is`, ` the`, ` city`) matter little; ` in` carries a small share (≈ 0.15) in
  layers 23–28.
* The last layer at the last position restores the clean score **exactly** (checked above): that
  vector determines the logits. A useful check that the patching is wired correctly.

This is the "early site / late site" picture of causal tracing (Meng et al. 2022), on one prompt pair;
a claim about the model in general would average over many pairs.

### Collecting activations

A `collect` intervention records what it sees and changes nothing. One `collect` per layer at the last
position (`"layer": "all"`, `"positions": "l1"`) returns the whole residual stream of the final token
in one forward pass. Comparing the clean and corrupted runs shows *when* the subject's identity reaches
the last position: the relative distance between the two last-token vectors stays below 0.2 up to layer
22 and jumps to about 0.5 at layer 23 — the layer where the patching map moves from the subject to the
last token."""),
code("""collector = reftkit.get_reft_model(model, [{"layer": "all", "component": "block_output", "positions": "l1",
                                             "intervention": "collect"}])
runs = {name: collector.collect(**enc) for name, enc in (("clean", clean), ("corrupt", corrupt))}
collector.detach()
keys = list(runs["clean"].activations)
print(keys[:3], "...", tuple(runs["clean"].activations[keys[0]].shape), "= [batch, positions, width]")

# the collected rows are the hidden states: block output of layer 5 == hidden_states[6] at the last token
with torch.no_grad():
    hidden = model(**clean, output_hidden_states=True).hidden_states
torch.testing.assert_close(runs["clean"].activations["layer5_block_output"][0, 0], hidden[6][0, -1])

distance = [float((runs["clean"].activations[k][0, 0] - runs["corrupt"].activations[k][0, 0]).norm()
                  / runs["clean"].activations[k][0, 0].norm()) for k in keys]
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(range(n_layers), distance, marker="o", ms=3)
ax.set_xlabel("layer"); ax.set_ylabel("‖clean − corrupted‖ / ‖clean‖")
ax.set_title("last-token residual stream: Eiffel Tower vs Colosseum")
fig.tight_layout()
show(fig)"""),
md("""## 2. A steering vector

Contrastive activation addition (Rimsky et al. 2024; Turner et al. 2023): average the residual stream at
the last token of some positive sentences, subtract the average over negative ones
(`steering_vector`), and add `scale ×` that vector at one layer while the model writes. With
`"positions": "all"` the `addition` intervention edits every prompt token at prefill **and** every
generated token (each decoding step), so the push lasts through the whole continuation.

The layer and scale below were chosen by trying layers 6–18 and scales from ±1 to ±8 on these prompts:
at layers 10–14, |scale| = 1 changes the tone while the text stays fluent; scale 2 already degrades the
text at several layers, and 4–8 collapses it into repeated words. Note the vector's norm relative to the
residual stream (printed below): scale 1 is already a sizeable push, about a third of a typical
activation's norm."""),
code("""STEER_LAYER, STEER_SCALE = 12, 1.0
positive = ["I love this. It is wonderful", "What a fantastic, delightful day", "This is the best thing ever, I am so happy",
            "Absolutely amazing and beautiful", "I feel great and grateful", "The movie was excellent and inspiring",
            "Such a lovely, joyful experience", "Everything went perfectly, I adore it"]
negative = ["I hate this. It is terrible", "What an awful, miserable day", "This is the worst thing ever, I am so sad",
            "Absolutely horrible and ugly", "I feel awful and resentful", "The movie was dreadful and boring",
            "Such a nasty, painful experience", "Everything went wrong, I despise it"]
vector = steering_vector(model, tokenizer, positive, negative, layer=STEER_LAYER)
enc = tokenizer(positive + negative, return_tensors="pt", padding=True)
with torch.no_grad():
    h = model(**enc, output_hidden_states=True).hidden_states[STEER_LAYER + 1]
# position 0 is an outlier (an "attention sink" with a huge norm); padding is left out too
typical = h[:, 1:][enc["attention_mask"][:, 1:].bool()].norm(dim=-1).median()
print(f"steering vector norm {vector.norm():.1f}; median residual norm at layer {STEER_LAYER}: {typical:.1f}")


def steered(scale):
    \"\"\"The model with `scale * vector` added at STEER_LAYER, at every position.\"\"\"
    reft = reftkit.get_reft_model(model, [{"layer": STEER_LAYER, "component": "block_output", "positions": "all",
                                           "intervention": "addition", "scale": float(scale)}])
    next(iter(reft.interventions.values())).set_vector(vector)
    return reft"""),
code("""prompts = ["I think the new restaurant downtown is", "When I woke up this morning, I felt",
           "My neighbour's dog", "The weather this weekend"]
outputs = {"no steering": generate_predictions(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, progress=False)}
for scale in (-STEER_SCALE, STEER_SCALE):
    reft = steered(scale)
    outputs[f"scale {scale:+g}"] = generate_predictions(reft, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS,
                                                        progress=False)
    reft.detach()
for i, prompt in enumerate(prompts):
    print(prompt)
    for name, texts in outputs.items():
        print(f"  [{name:>11}] {texts[i]!r}")
    print()"""),
md("""A cheaper, quantitative look: for prompts that end right before an adjective (*The food at that place
was*), the log-odds of the next word being positive (*great, amazing, wonderful, excellent,
fantastic, good*) rather than negative (*terrible, awful, horrible, bad, disappointing, poor*), as the
scale varies. One forward pass per scale, no sampling."""),
code("""probe = ["The food at that place was", "Overall, my trip to the city was", "The service at the hotel was",
         "The concert last night was", "My new phone is", "The book I just finished was"]
good = [" great", " amazing", " wonderful", " excellent", " fantastic", " good"]
bad = [" terrible", " awful", " horrible", " bad", " disappointing", " poor"]
ids = {w: tokenizer(w, add_special_tokens=False)["input_ids"] for w in good + bad}
assert all(len(v) == 1 for v in ids.values())
good_ids, bad_ids = torch.tensor([ids[w][0] for w in good]), torch.tensor([ids[w][0] for w in bad])
enc = tokenizer(probe, return_tensors="pt", padding=True, padding_side="left")


@torch.no_grad()
def log_odds(m):
    logp = m(**enc).logits[:, -1].log_softmax(-1)
    return float((logp[:, good_ids].logsumexp(-1) - logp[:, bad_ids].logsumexp(-1)).mean())


scales = [-2, -1, -0.5, 0, 0.5, 1, 2]
odds = []
for scale in scales:
    reft = steered(scale)
    odds.append(log_odds(reft))
    reft.detach()
print(pd.Series(odds, index=pd.Index(scales, name="scale"), name="log-odds positive vs negative").round(2).to_string())
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(scales, odds, marker="o")
ax.axhline(0, color="grey", lw=0.5)
ax.set_xlabel(f"steering scale (layer {STEER_LAYER})"); ax.set_ylabel("log P(positive) − log P(negative)")
fig.tight_layout()
show(fig)"""),
md("""**Reading it.** Unsteered, the model already leans positive (log-odds +2.96 on the probe prompts,
mostly cheerful continuations). Scale −1 turns the continuations negative — *"going to be a disaster"*
(restaurant, weather), *"I'm not sure what I'm doing wrong"* — and brings the log-odds down to −0.75
(−1.84 at scale −2); scale +1 makes the text effusive (*"the warmth of the sun on my skin"*, *"a
perfect example of the beauty and resilience of the Pacific Northwest"*). The effect is clear but not
clean: the negative continuations are also repetitive (so is one unsteered one), the positive direction
has less room to move because the model is already upbeat, and the log-odds are not monotonic (+4.77 at
scale 0.5, +4.30 at 1, +2.64 at 2, as the text starts to degrade). Steering changes the *tone* of the
continuation; it is a blunt instrument, not an edit of a specific fact."""),
md("""## 3. Distributed alignment search (DAS)

Patching whole vectors says *where* information is; DAS asks whether a **single direction** carries
one causal variable (Geiger et al. 2024). The task: SmolLM2 picks the right pronoun after a name —

*When Mary got home,* → **she** &nbsp;&nbsp; *When John got home,* → **he**

The variable is the gender the model assigns to the name. An **interchange intervention** takes a
*base* prompt and a *source* prompt with a name of the other gender, and at one layer replaces the
base's representation of the name with the source's. If the intervention swaps exactly the variable,
the model should now say the pronoun it would say for the source name in the base sentence — the
**counterfactual label**, here taken from the model itself (run the base template with the source's
name). **Interchange-intervention accuracy (IIA)** is how often the intervened model's choice between
*he* and *she* matches that label, on pairs it was not trained on.

A `lowrank_rotated_space` intervention with rank 1 swaps only the component along one learned unit
vector `r`: `h' = h + r rᵀ (s − h)`. We train `r` (the base model stays frozen) with Adam on the
cross-entropy of the counterfactual he/she choice. The intervention acts at the **name token** of the
base and the name token of the source (`intervention_locations` / `source_locations`), which sit at
different positions when the two templates differ.

Names are single tokens; train and test pairs use **disjoint names** (the templates are shared)."""),
code("""male = ["Adam", "Alex", "Andrew", "Arthur", "Ben", "Bill", "Bob", "Brian", "Carl", "Charles", "Daniel", "David",
        "Edward", "Eric", "Frank", "Fred", "George", "Greg", "Harry", "Henry", "Jack", "James", "Jason", "Jim", "Joe",
        "John", "Kevin", "Louis", "Luke", "Mark", "Matthew", "Max", "Michael", "Oliver", "Patrick", "Paul", "Peter",
        "Philip", "Richard", "Robert", "Ryan", "Sam", "Scott", "Simon", "Steven", "Thomas", "Tim", "Tom", "Tony",
        "Victor", "William"]
female = ["Alice", "Amanda", "Amelia", "Amy", "Ann", "Anna", "Anne", "Barbara", "Betty", "Carol", "Catherine",
          "Charlotte", "Claire", "Diana", "Dorothy", "Elizabeth", "Ella", "Ellen", "Emily", "Emma", "Eva", "Eve", "Grace",
          "Hannah", "Heather", "Helen", "Holly", "Isabella", "Jane", "Jean", "Jennifer", "Jessica", "Joan", "Judy",
          "Julia", "Julie", "Karen", "Kate", "Kelly", "Laura", "Lily", "Linda", "Lisa", "Lucy", "Margaret", "Maria",
          "Martha", "Mary", "Mia", "Michelle", "Molly", "Nancy", "Nicole", "Olivia", "Patricia", "Rachel", "Rebecca",
          "Rose", "Ruby", "Ruth", "Sandra", "Sara", "Sarah", "Sharon", "Sophia", "Sophie", "Susan", "Victoria"]
templates = ["After dinner, {} said that", "When {} got home,", "Yesterday {} told me that", "As soon as {} arrived,",
             "Last night {} dreamed that", "At the party, {} said that", "In the morning, {} decided that",
             "On Monday, {} wrote that", "Before {} left the house,", "When {} woke up,"]
assert all(len(tokenizer(" " + n, add_special_tokens=False)["input_ids"]) == 1 for n in male + female)
# where the name sits in each template (the tokens before it are the same whatever the name)
name_at = {t: len(tokenizer(t.split("{}")[0].rstrip(), add_special_tokens=False)["input_ids"]) for t in templates}
for t in templates:
    assert tokenizer(t.format("Mary"))["input_ids"][name_at[t]] == tokenizer(" Mary")["input_ids"][0], t
he, she = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" he", " she"))
PRONOUNS = torch.tensor([he, she])


def batch(texts):
    return tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="right")


def last_logits(output, enc):
    \"\"\"Logits at each row's last real token (right padding).\"\"\"
    return output.logits[torch.arange(len(enc["input_ids"])), enc["attention_mask"].sum(1) - 1]


@torch.no_grad()
def pronoun(texts):
    \"\"\"The model's choice between ' he' (0) and ' she' (1) after each text.\"\"\"
    enc = batch(texts)
    return last_logits(model(**enc), enc)[:, PRONOUNS].argmax(-1)


rng = random.Random(0)
m_names, f_names = rng.sample(male, len(male)), rng.sample(female, len(female))
split = {"train": (m_names[:30], f_names[:40]), "test": (m_names[30:], f_names[40:])}
# how well the model itself does on the task, on the test names
for group, names, want in (("male", split["test"][0], 0), ("female", split["test"][1], 1)):
    texts = [t.format(n) for t in templates for n in names]
    print(f"{group} test names: model picks the right pronoun in {float((pronoun(texts) == want).float().mean()):.1%} "
          f"of {len(texts)} prompts")"""),
code("""def make_pairs(n, names):
    \"\"\"n base/source pairs with names of opposite gender and random templates, labelled by the model.\"\"\"
    males, females = names
    rows = []
    for _ in range(n):
        tb, ts = rng.choice(templates), rng.choice(templates)
        a, b = rng.choice(males), rng.choice(females)
        if rng.random() < 0.5:
            a, b = b, a
        rows.append((tb.format(a), ts.format(b), tb.format(b), name_at[tb], name_at[ts], tb.split("{}")[0] + a))
    base, source, counterfactual, at_base, at_source, prefix = map(list, zip(*rows))
    label, unchanged = pronoun(counterfactual), pronoun(base)
    keep = [i for i in range(n) if label[i] != unchanged[i]]   # pairs where swapping the name flips the answer
    return {"base": [base[i] for i in keep], "source": [source[i] for i in keep], "label": label[keep],
            "at_base": torch.tensor(at_base)[keep], "at_source": torch.tensor(at_source)[keep],
            "prefix": [prefix[i] for i in keep],   # the base prompt up to its name: "When Mary"
            "last_base": batch(base)["attention_mask"].sum(1)[keep] - 1,
            "last_source": batch(source)["attention_mask"].sum(1)[keep] - 1}


train_pairs, test_pairs = make_pairs(DAS_TRAIN_PAIRS, split["train"]), make_pairs(DAS_TEST_PAIRS, split["test"])
print(f"{len(train_pairs['base'])} train pairs, {len(test_pairs['base'])} test pairs, e.g.")
for i in range(3):
    print(f"  base {train_pairs['base'][i]!r:38} source {train_pairs['source'][i]!r:38} "
          f"-> counterfactual {['he', 'she'][int(train_pairs['label'][i])]!r}")"""),
code("""def intervened(reft, pairs, rows, at="name"):
    \"\"\"he/she logits of the base prompts with the source's representation at the name token (or at the
    last token, `at="last"`) swapped in.\"\"\"
    base, source = batch(pairs["base"][i] for i in rows), batch(pairs["source"][i] for i in rows)
    where_base, where_source = ("at_base", "at_source") if at == "name" else ("last_base", "last_source")
    out = reft(**base, intervention_locations=pairs[where_base][rows][:, None],
               sources=dict(source), source_locations=pairs[where_source][rows][:, None])
    return last_logits(out, base)[:, PRONOUNS]


@torch.no_grad()
def iia(reft, pairs, at="name", size=64):
    n, hits = len(pairs["base"]), 0
    for start in range(0, n, size):
        rows = list(range(start, min(n, start + size)))
        hits += int((intervened(reft, pairs, rows, at).argmax(-1) == pairs["label"][rows]).sum())
    return hits / n


def das(layer):
    \"\"\"A rank-1 DAS intervention at `layer`, on explicitly given positions.\"\"\"
    return reftkit.get_reft_model(model, [{"layer": layer, "component": "block_output", "positions": None,
                                           "intervention": "lowrank_rotated_space", "low_rank_dimension": 1}])


def train(reft, pairs, steps, size=32, lr=1e-2):
    opt = torch.optim.Adam(reft.interventions.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        rows = [rng.randrange(len(pairs["base"])) for _ in range(size)]
        loss = torch.nn.functional.cross_entropy(intervened(reft, pairs, rows), pairs["label"][rows])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses"""),
md("""### Where is the variable? Whole-vector interchange first

Before training anything: swap the **entire** vector (`interchange`) at the name token, and, for
contrast, at the last token, layer by layer. This is activation patching again, now scored as IIA over
the test pairs."""),
code("""t0 = time.time()
moves = []
for layer in layers:   # the layers of section 1
    full = reftkit.get_reft_model(model, [{"layer": layer, "component": "block_output", "positions": None,
                                           "intervention": "interchange"}])
    moves.append({"layer": layer, "name token": iia(full, test_pairs), "last token": iia(full, test_pairs, at="last")})
    full.detach()
moves = pd.DataFrame(moves).set_index("layer")
print(f"{2 * len(layers)} sweeps over {len(test_pairs['base'])} test pairs in {time.time() - t0:.0f} s")
print(moves.round(2).T.to_string())
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(moves.index, moves["name token"], "o-", ms=3, label="swap the name token")
ax.plot(moves.index, moves["last token"], "^-", ms=3, label="swap the last token")
ax.set_xlabel("layer"); ax.set_ylabel("IIA on held-out pairs"); ax.legend(fontsize=8)
ax.set_title("whole-vector interchange, he/she task")
fig.tight_layout()
show(fig)"""),
md("""**Reading it.** Up to layer 24, swapping the name token's vector flips the pronoun in 98–100% of the test
pairs, and swapping the last token's vector does nothing (≤ 3%). At layer 25 each gives about a quarter
(0.24 and 0.26), and from layer 26 on only the last token matters (0.97–1.00). The name's gender is read
into the final position in layers 25–26 — late in the network, as in the Eiffel Tower example (layer 23).
So at the name token there is something to find up to layer ~25, and nothing after.

### DAS: one direction

For each layer in `DAS_LAYERS` we compare, on the held-out test pairs:

* **full interchange** — swap the entire name vector (from the sweep above): the reference; it moves
  everything about the name, not just gender;
* **random direction** — a rank-1 DAS intervention with its initial random direction, i.e. before
  training (mean over 3 seeds);
* **mean difference** — a direction that needs no training: the mean name-token representation of the
  train pairs' female base names minus that of the male ones (`steering_vector` on the base prompts cut
  after the name — in a causal model the name token does not see what comes after it);
* **trained DAS** — the rank-1 direction after training.

Without any intervention the IIA is 0 by construction (only pairs where the swap changes the answer are
kept)."""),
code("""# the train pairs' base prompts cut after the name, by the gender the model gives them (label = the other one)
female_prefixes = [p for p, y in zip(train_pairs["prefix"], train_pairs["label"]) if y == 0]
male_prefixes = [p for p, y in zip(train_pairs["prefix"], train_pairs["label"]) if y == 1]
results, curves, directions = [], {}, {}
for layer in DAS_LAYERS:
    t0 = time.time()
    if layer in moves.index:
        row = {"layer": layer, "full interchange": moves.loc[layer, "name token"]}
    else:
        full = reftkit.get_reft_model(model, [{"layer": layer, "component": "block_output", "positions": None,
                                               "intervention": "interchange"}])
        row = {"layer": layer, "full interchange": iia(full, test_pairs)}
        full.detach()
    scores = []
    for seed in range(3):
        torch.manual_seed(seed)
        reft = das(layer)
        scores.append(iia(reft, test_pairs))
        reft.detach()
    row["random direction"] = sum(scores) / len(scores)
    diff = steering_vector(model, tokenizer, female_prefixes, male_prefixes, layer=layer, batch_size=64)
    reft = das(layer)
    next(iter(reft.interventions.values())).rotation.assign((diff / diff.norm())[:, None])
    row["mean difference"] = iia(reft, test_pairs)
    reft.detach()
    torch.manual_seed(0)
    reft = das(layer)
    curves[layer] = train(reft, train_pairs, DAS_STEPS)
    row["trained DAS"], row["trained DAS (train pairs)"] = iia(reft, test_pairs), iia(reft, train_pairs)
    directions[layer] = next(iter(reft.interventions.values())).rotation().detach()[:, 0]
    reft.detach()
    results.append(row)
    print(f"layer {layer:2}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k != "layer")
          + f"  ({time.time() - t0:.0f} s)")
table = pd.DataFrame(results).set_index("layer")
table.round(2)"""),
code("""fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
for name, style in (("full interchange", "k--"), ("trained DAS", "o-"), ("mean difference", "s-"),
                    ("random direction", "x:")):
    ax.plot(table.index, table[name], style, label=name)
ax.set_xlabel("layer (name token)"); ax.set_ylabel("IIA on held-out pairs"); ax.set_ylim(-0.05, 1.05)
ax.legend(fontsize=8); ax.set_title("rank-1 DAS: he/she interchange accuracy")
for layer, losses in curves.items():
    ax2.plot(losses, label=f"layer {layer}")
ax2.set_xlabel("step"); ax2.set_ylabel("training loss"); ax2.set_yscale("log"); ax2.legend(fontsize=7)
fig.tight_layout()
show(fig)"""),
md("""The trained direction can also be read: project the name-token representations of the **test names**
(collected with a `collect` intervention at the last token of *"When Mary"*-style prefixes) on it. A
direction that carries gender should separate the two groups — on names it never saw in training."""),
code("""best = int(table["trained DAS"].idxmax())
collector = reftkit.get_reft_model(model, [{"layer": best, "component": "block_output", "positions": "l1",
                                             "intervention": "collect"}])
proj = {}
for group, names in (("male", split["test"][0]), ("female", split["test"][1])):
    enc = batch([t.split("{}")[0] + n for t in templates for n in names])
    rows = collector.collect(**enc).activations[f"layer{best}_block_output"][:, 0]
    proj[group] = (rows @ directions[best]).numpy()
collector.detach()
fig, ax = plt.subplots(figsize=(6, 3))
for group, values in proj.items():
    ax.hist(values, bins=30, alpha=0.6, label=f"{group} test names")
ax.set_xlabel(f"projection on the trained DAS direction (layer {best})"); ax.set_ylabel("prompts")
ax.legend(); fig.tight_layout()
# how well one threshold (midway between the two group means) separates the test names
cut = (proj["male"].mean() + proj["female"].mean()) / 2
female_side = proj["female"].mean() > cut
hits = ((proj["female"] > cut) == female_side).sum() + ((proj["male"] > cut) != female_side).sum()
print(f"threshold at the midpoint: {hits / (len(proj['male']) + len(proj['female'])):.1%} of test prompts on their side")
show(fig)"""),
md("""**What the numbers say** (stored run; the test pairs use names never seen in training):

* Up to layer 24, a single trained direction at the name token carries the he/she decision: IIA 0.94
  at layer 2 and 0.98–1.00 at layers 8–24, as high as swapping the whole 576-dimensional vector
  (0.98–0.99). A random direction does nothing (≤ 0.01), so this is not something any rank-1 swap does.
* The untrained **mean-difference** direction is a strong baseline (0.77 at layer 2, 0.89–0.98 at layers
  8–24): here gender is largely a mean-separable direction. DAS gets there (and a little further) from
  the counterfactual behaviour alone, without being told which names are which. The histogram shows the
  trained direction splitting held-out male and female names: 99% of the test prompts fall on their
  group's side of the midpoint between the two group means (the direction's sign is arbitrary).
* At layer 25, where the whole-vector swap has mostly stopped working (0.24), the trained direction still
  reaches 0.41 — a one-dimensional swap can beat the full one when the rest of the vector pulls the other
  way — and at layer 26 nothing at the name token works (≤ 0.06): the decision has moved to the last
  token, as the sweep showed.
* Train IIA is 1.00 at layers 2–24; at layer 2 the test IIA (0.94) is lower: there the direction fits the
  training names better than new ones.
* Caveats: one small model, a binary variable, ten templates shared by train and test (only the names
  are held out), 40 steps on about 250 pairs. This shows that a direction exists which swaps the model's
  gender decision and generalises to new names — not that it is the only, or the "true", representation
  of gender in the model."""),
code("""print(f"notebook ran in {time.time() - started:.0f} s")"""),
]
write(nb, "03_interpretability.ipynb")
