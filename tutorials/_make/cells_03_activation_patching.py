"""Section 1 of tutorial 03 (make_03.py): activation patching on the Eiffel Tower / Colosseum pair, and
collecting the last-token residual stream with a ``collect`` intervention.

The cells rely on the setup cell of make_03 (``model``, ``tokenizer``, ``n_layers``, ``show``, ...);
the DAS section sweeps the ``layers`` defined here again."""
import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell

PATCHING_CELLS = [
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
]
