"""Section 3 of tutorial 03 (make_03.py): distributed alignment search (DAS) for the gender a name
carries into the he/she choice: whole-vector interchange sweep, rank-1 DAS against a random and a
mean-difference direction, and reading the trained direction.

The cells rely on the setup cell of make_03 (``model``, ``tokenizer``, ``show``, ...) and on ``layers``
from the activation-patching section."""
import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell

DAS_CELLS = [
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
          "Charlotte", "Claire", "Diana", "Dorothy", "Elizabeth", "Ella", "Ellen", "Emily", "Emma", "Eva", "Eve",
          "Grace", "Hannah", "Heather", "Helen", "Holly", "Isabella", "Jane", "Jean", "Jennifer", "Jessica", "Joan",
          "Judy", "Julia", "Julie", "Karen", "Kate", "Kelly", "Laura", "Lily", "Linda", "Lisa", "Lucy", "Margaret",
          "Maria", "Martha", "Mary", "Mia", "Michelle", "Molly", "Nancy", "Nicole", "Olivia", "Patricia", "Rachel",
          "Rebecca", "Rose", "Ruby", "Ruth", "Sandra", "Sara", "Sarah", "Sharon", "Sophia", "Sophie", "Susan",
          "Victoria"]
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
    return losses""", metadata={"tags": ["silent"]}),
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
print(f"threshold at the midpoint: {hits / (len(proj['male']) + len(proj['female'])):.1%} "
      "of test prompts on their side")
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
  reaches 0.42 — a one-dimensional swap can beat the full one when the rest of the vector pulls the other
  way — and at layer 26 nothing at the name token works (≤ 0.06): the decision has moved to the last
  token, as the sweep showed.
* Train IIA is 1.00 at layers 2–24; at layer 2 the test IIA (0.94) is lower: there the direction fits the
  training names better than new ones.
* Caveats: one small model, a binary variable, ten templates shared by train and test (only the names
  are held out), 40 steps on about 250 pairs. This shows that a direction exists which swaps the model's
  gender decision and generalises to new names — not that it is the only, or the "true", representation
  of gender in the model."""),
]
