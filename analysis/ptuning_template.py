"""P-tuning's template and prompt encoder — Liu et al. 2021, "GPT Understands, Too".

A template ``T = {[P_0:i], x, [P_i+1:j], y}`` interleaves trainable pseudo tokens ``[P]`` with the input
``x``, frozen *anchor* tokens (real vocabulary, e.g. RTE's ``?``) and the output slot ``y``. The pseudo
tokens' embeddings come from a prompt encoder run over all of them, in template order:
``h = MLP([LSTM→(h_0:i); LSTM←(h_i:m)])``.

Template syntax (string form), exact:

* ``[P]`` one pseudo token; ``[P*n]`` n of them (``n`` ≥ 1, decimal).
* ``{input}`` where the input goes (exactly once); ``{output}`` where the output goes (at most once; the
  end of the template when absent). Nothing may follow ``{output}``: a causal LM never sees it.
* Any other text is an anchor: each run of text between markers, stripped of surrounding whitespace, is
  tokenized on its own with ``add_special_tokens=False``; whitespace-only runs are separators.
* Any other ``{...}``, a ``[P...]`` not of the two forms, a stray ``{`` or ``}``, no ``{input}`` or no
  pseudo token raises ``ValueError`` naming ``template`` and the offending part.

Structured form (spacing exact): a list whose items are an int ``n`` (n pseudo tokens), ``"{input}"``,
``"{output}"``, or any other string: an anchor tokenized verbatim (not stripped). ``"[P][P][P] {input}
[P][P] ? [P] {output}"`` is ``[3, "{input}", 2, "?", 1, "{output}"]``.

A leading BOS that the tokenizer puts on the input stays the first token of the built sequence.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["parse_template", "TemplateLayout", "PromptEncoder", "ENCODERS"]

ENCODERS = ("lstm", "mlp", "none")
PLACEHOLDERS = ("{input}", "{output}")
_MARKER = re.compile(r"\[P[^\]]*\]|\{[^{}]*\}")
_PSEUDO = re.compile(r"\[P(?:\*([1-9][0-9]*))?\]")


def _bad(template: Any, why: str) -> ValueError:
    return ValueError(f"template={template!r}: {why}")


def parse_template(template: str | Sequence[Any]) -> list[tuple[str, Any]]:
    """Parts ``("prompt", n)``, ``("anchor", text)``, ``("input", None)``, ``("output", None)`` in order;
    the output part is always present (appended when the template has none). Raises on a malformed template."""
    parts: list[tuple[str, Any]] = []
    if isinstance(template, str):
        at = 0
        for match in list(_MARKER.finditer(template)) + [None]:
            text = template[at:match.start() if match else len(template)]
            if "{" in text or "}" in text:
                raise _bad(template, f"stray brace in {text.strip()!r}; placeholders are {{input}} and {{output}}")
            if text.strip():
                parts.append(("anchor", text.strip()))
            if match is None:
                break
            at, token = match.end(), match.group(0)
            if token in PLACEHOLDERS:
                parts.append((token[1:-1], None))
            elif token.startswith("{"):
                raise _bad(template, f"unknown placeholder {token!r}; the placeholders are {{input}} and {{output}}")
            elif (pseudo := _PSEUDO.fullmatch(token)) is not None:
                parts.append(("prompt", int(pseudo.group(1) or 1)))
            else:
                raise _bad(template, f"malformed pseudo-token marker {token!r}; write [P] or [P*n] with n >= 1")
    elif isinstance(template, (list, tuple)):
        for item in template:
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise _bad(template, f"item {item!r} is neither a pseudo-token count (int) nor a string")
            if isinstance(item, int):
                if item < 1:
                    raise _bad(template, f"pseudo-token count {item!r} must be >= 1")
                parts.append(("prompt", item))
            elif item in PLACEHOLDERS:
                parts.append((item[1:-1], None))
            elif "{" in item or "}" in item:
                raise _bad(template, f"unknown placeholder {item!r}; the placeholders are {{input}} and {{output}}")
            elif item == "":
                raise _bad(template, "an empty anchor string")
            else:
                parts.append(("anchor", item))
    else:
        raise _bad(template, "give a template string or a list of parts")
    kinds = [kind for kind, _ in parts]
    for slot in ("input", "output"):
        if kinds.count(slot) > 1:
            raise _bad(template, f"{{{slot}}} appears {kinds.count(slot)} times; it must appear once")
    if "input" not in kinds:
        raise _bad(template, "no {input} placeholder; the template must say where the input goes")
    if "output" not in kinds:
        parts.append(("output", None))
        kinds.append("output")
    if kinds.index("output") < kinds.index("input"):
        raise _bad(template, "{output} comes before {input}; a causal LM reads the input first")
    if kinds[-1] != "output":
        raise _bad(template, f"{parts[kinds.index('output') + 1]} follows {{output}}; a causal LM never sees "
                             "tokens after the output, so nothing there could be trained or used")
    if "prompt" not in kinds:
        raise _bad(template, "zero pseudo tokens; put at least one [P] in the template")
    return parts


@dataclass(frozen=True)
class TemplateLayout:
    """The template as token slots: ``fixed`` lists the slots before ``{input}`` (the first ``before``
    of them) and then those between ``{input}`` and ``{output}``; each is an anchor's token id, or -1 for
    a pseudo token (numbered 0, 1, ... in template order). ``bos_token_id``: a leading input token with
    this id is moved to the front; ``pad_token_id`` fills padding and the pseudo slots of ``input_ids``."""

    fixed: tuple[int, ...]
    before: int
    bos_token_id: int | None = None
    pad_token_id: int = 0

    @classmethod
    def from_template(cls, template: str | Sequence[Any], tokenizer: Any, *, bos_token_id: int | None = None,
                      pad_token_id: int = 0) -> "TemplateLayout":
        fixed: list[int] = []
        before = 0
        for kind, value in parse_template(template):
            if kind == "prompt":
                fixed += [-1] * value
            elif kind == "anchor":
                ids = list(tokenizer(value, add_special_tokens=False)["input_ids"])
                if not ids:
                    raise _bad(template, f"anchor {value!r} tokenizes to no tokens")
                fixed += ids
            elif kind == "input":
                before = len(fixed)
        return cls(tuple(fixed), before, bos_token_id, pad_token_id)

    @property
    def num_pseudo_tokens(self) -> int:
        return sum(1 for i in self.fixed if i < 0)

    def build(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              labels: torch.Tensor | None = None, side: str = "right") -> dict[str, torch.Tensor]:
        """The template around each row, padded on ``side``; no Python loop over rows.

        A row's input ``x`` is its real tokens (``attention_mask``, one contiguous run, either padding)
        before its first labelled one (``labels`` != -100), its output ``y`` the rest. Returns
        ``input_ids`` (pad id at pseudo slots), ``attention_mask``, ``pseudo_index`` ([B, L]: the pseudo
        token at each position, -1 elsewhere) and, with ``labels``, ``labels`` (y's labels, -100 elsewhere)."""
        if side not in ("left", "right"):
            raise ValueError(f"side={side!r} must be 'left' or 'right'")
        batch, width = input_ids.shape
        device = input_ids.device
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        count = mask.sum(1)
        first = torch.where(count > 0, mask.long().argmax(1), torch.zeros_like(count))
        column = torch.arange(width, device=device)[None]
        if not torch.equal((column >= first[:, None]) & (column < (first + count)[:, None]), mask):
            raise ValueError("attention_mask: each row's real tokens must be one contiguous run (left or right "
                             "padding)")
        head = input_ids.gather(1, first[:, None]).squeeze(1)
        bos = ((count > 0) & (head == self.bos_token_id)).long() if self.bos_token_id is not None \
            else torch.zeros_like(count)
        end = first + count
        if labels is not None:
            labelled = (labels != -100) & mask
            start = torch.where(labelled.any(1), labelled.long().argmax(1), end)
            if bool((start < first + bos).any()):
                raise ValueError("labels: a BOS token carries a label; the output must follow the input")
        else:
            start = end
        n_x, n_y = start - first - bos, end - start
        fixed = torch.tensor(self.fixed, device=device)
        pseudo_of = torch.where(fixed < 0, (fixed < 0).long().cumsum(0) - 1, -1)
        mid = len(self.fixed) - self.before
        length = bos + len(self.fixed) + n_x + n_y
        total = int(length.max()) if batch else 0
        t = torch.arange(total, device=device)[None]
        r = t - ((total - length)[:, None] if side == "left" else 0)   # position within the row's own sequence
        a0 = bos[:, None]
        a1 = a0 + self.before
        a2 = a1 + n_x[:, None]
        a3 = a2 + mid
        a4 = a3 + n_y[:, None]
        valid = (r >= 0) & (r < a4)
        in_bos, in_pre = valid & (r < a0), (r >= a0) & (r < a1)
        in_x, in_mid, in_y = (r >= a1) & (r < a2), (r >= a2) & (r < a3), (r >= a3) & valid
        in_fixed = in_pre | in_mid
        slot = torch.where(in_pre, r - a0, torch.where(in_mid, self.before + r - a2, 0)).clamp(0, len(self.fixed) - 1)
        source = torch.where(in_x, first[:, None] + a0 + r - a1,
                             torch.where(in_y, start[:, None] + r - a3, first[:, None])).clamp(0, max(width - 1, 0))
        real = in_bos | in_x | in_y
        ids = torch.where(real, input_ids.gather(1, source), torch.where(in_fixed, fixed[slot], -1))
        ids = torch.where(ids < 0, self.pad_token_id, ids)
        out = {"input_ids": ids, "attention_mask": valid.long(),
               "pseudo_index": torch.where(in_fixed, pseudo_of[slot], -1)}
        if labels is not None:
            out["labels"] = torch.where(in_y, labels.gather(1, source), -100)
        return out


class PromptEncoder(nn.Module):
    """The pseudo tokens' embeddings: a trainable table ``embedding`` [n, d] run, as one sequence in template
    order, through

    * ``"lstm"`` (published): a bidirectional ``nn.LSTM`` (``num_layers``, ``hidden_size`` per direction,
      default d // 2 as in the authors' code) then ``Linear(2h, 2h) → ReLU → Linear(2h, d)``;
    * ``"mlp"``: ``Linear(d, h) → ReLU → Linear(h, d)`` (h default d);
    * ``"none"``: the table itself (plain trainable embeddings).

    ``forward()`` returns ``[n, d]`` in float32."""

    def __init__(self, num_tokens: int, dim: int, encoder: str = "lstm", *, hidden_size: int | None = None,
                 num_layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"encoder={encoder!r}; choose one of {ENCODERS}")
        for name, value in (("hidden_size", hidden_size), ("num_layers", num_layers)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"encoder_{name}={value!r} must be a positive int")
        self.kind = encoder
        self.embedding = nn.Embedding(num_tokens, dim)
        self.lstm: nn.LSTM | None = None
        self.mlp: nn.Sequential | None = None
        if encoder == "lstm":
            h = hidden_size or max(dim // 2, 1)
            self.lstm = nn.LSTM(dim, h, num_layers=num_layers, dropout=dropout if num_layers > 1 else 0.0,
                                bidirectional=True, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, dim))
        elif encoder == "mlp":
            h = hidden_size or dim
            self.mlp = nn.Sequential(nn.Linear(dim, h), nn.ReLU(), nn.Linear(h, dim))

    def forward(self) -> torch.Tensor:
        hidden = self.embedding.weight[None]
        if self.lstm is not None:
            hidden = self.lstm(hidden)[0]
        if self.mlp is not None:
            hidden = self.mlp(hidden)
        return hidden[0]
