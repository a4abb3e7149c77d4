"""Section 2 of tutorial 03 (make_03.py): a contrastive activation-addition steering vector, its effect
on generations and on the positive/negative log-odds of a probe set.

The cells rely on the setup cell of make_03 (``model``, ``tokenizer``, ``show``, ...)."""
import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell

STEERING_CELLS = [
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
positive = ["I love this. It is wonderful", "What a fantastic, delightful day",
            "This is the best thing ever, I am so happy", "Absolutely amazing and beautiful",
            "I feel great and grateful", "The movie was excellent and inspiring",
            "Such a lovely, joyful experience", "Everything went perfectly, I adore it"]
negative = ["I hate this. It is terrible", "What an awful, miserable day",
            "This is the worst thing ever, I am so sad", "Absolutely horrible and ugly",
            "I feel awful and resentful", "The movie was dreadful and boring",
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
outputs = {"no steering": generate_predictions(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS,
                                               progress=False)}
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
]
