"""P-tuning as published (Liu et al. 2021, "GPT Understands, Too"): pseudo tokens placed in a template
around the input, anchor tokens, and the bidirectional-LSTM + MLP prompt encoder, on a frozen causal LM.

peft's ``PromptEncoder`` (the ``p_tuning`` baseline of :mod:`reftkit.analysis.baselines`) only prepends
its virtual tokens; here a template such as ``"[P*3] {input} [P*2] ? [P] {output}"`` says where each goes
(syntax: :mod:`reftkit.analysis.ptuning_template`). The number of pseudo tokens follows from the template;
anchors are literal text, tokenized with the model's tokenizer and embedded by the frozen base like any
real token. A forward builds the template around each row's input (its unlabelled tokens) and output (its
labelled ones), embeds it with the base's input embeddings, puts the encoder's outputs at the pseudo
positions (``inputs_embeds``) and runs the frozen base: ``labels`` stay on the output only, and the logits
are in the template's layout. ``generate`` builds the template up to ``{output}`` and decodes greedily (or
as ``generate``'s options say) from there.

:func:`get_ptuning_model` returns a :class:`PTuningModel`, which trains with :class:`reftkit.ReftTrainer`
and the LM data modules and is the ``p_tuning_template`` method of :func:`reftkit.analysis.compare`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .common import PromptModelSurface
from .ptuning_template import PromptEncoder, TemplateLayout

__all__ = ["PTuningModel", "TemplatePrompt", "get_ptuning_model"]

WEIGHTS_NAME = "ptuning_encoder.safetensors"
CONFIG_NAME = "ptuning_config.json"
_UNSUPPORTED = ("inputs_embeds", "position_ids", "past_key_values", "cache")


class TemplatePrompt(nn.Module):
    """The module a :class:`PTuningModel` runs: the frozen ``base``, the ``encoder`` and the ``layout``."""

    def __init__(self, base: nn.Module, encoder: PromptEncoder, layout: TemplateLayout) -> None:
        super().__init__()
        self.base = base
        self.encoder = encoder
        self.layout = layout
        self.enabled = True

    @property
    def config(self) -> Any:
        return self.base.config

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def template_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        labels: torch.Tensor | None = None, side: str = "right") -> dict[str, torch.Tensor]:
        """:meth:`TemplateLayout.build` plus ``inputs_embeds``: the base's embeddings of the real and anchor
        tokens, the encoder's outputs at the pseudo positions."""
        built = self.layout.build(input_ids, attention_mask, labels, side)
        pseudo = built.pop("pseudo_index")
        embeds = self.get_input_embeddings()(built.pop("input_ids"))
        prompts = self.encoder().to(embeds.dtype)
        built["inputs_embeds"] = torch.where((pseudo >= 0)[..., None], prompts[pseudo.clamp_min(0)], embeds)
        return built

    @staticmethod
    def _check(kwargs: dict[str, Any]) -> None:
        taken = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
        if taken:
            raise ValueError(f"{taken[0]}= is not supported by template P-tuning: it builds the embeddings and "
                             "positions from input_ids and attention_mask")

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        loss_kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        if not self.enabled:
            return self.base(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **loss_kwargs,
                             **kwargs)
        self._check(kwargs)
        if input_ids is None:
            raise ValueError("template P-tuning needs input_ids= (the template is built around the tokens)")
        return self.base(**self.template_inputs(input_ids, attention_mask, labels), **loss_kwargs, **kwargs)


class PTuningModel(PromptModelSurface, nn.Module):
    """Template P-tuning on a frozen causal LM, used like a :class:`reftkit.ReftModel` (see the module
    docstring). Build one with :func:`get_ptuning_model`; ``model`` is the :class:`TemplatePrompt` the
    forward runs, ``encoder`` the trained :class:`~reftkit.analysis.ptuning_template.PromptEncoder`."""

    _kind, _builder = "template P-tuning", "get_ptuning_model"

    method = "p_tuning_template"
    #: False: the pseudo tokens enter through this model's own forward, so losses run it whole
    label_only_loss = False

    def __init__(self, base: nn.Module, encoder: PromptEncoder, layout: TemplateLayout,
                 options: dict[str, Any]) -> None:
        super().__init__()
        self._requires_grad = {name: p.requires_grad for name, p in base.named_parameters()}
        base.requires_grad_(False)
        self.model = TemplatePrompt(base, encoder, layout)
        self.options = options
        self._detached = False

    @property
    def encoder(self) -> PromptEncoder:
        return self.model.encoder

    @property
    def layout(self) -> TemplateLayout:
        return self.model.layout

    @property
    def base_model(self) -> nn.Module:
        return self.model.base


    @property
    def device(self) -> torch.device:
        return self.encoder.embedding.weight.device




    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        """:meth:`TemplatePrompt.forward`: the base's output on the built template (right-padded)."""
        self._check_live()
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **self._reft_inputs(kwargs))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        """``base.generate`` from the template up to ``{output}`` (left-padded ``inputs_embeds``): returns
        ``input_ids`` followed by the new tokens, as generating from ``input_ids`` does."""
        self._check_live()
        kwargs = self._reft_inputs(kwargs)
        if not self.model.enabled:
            return self.model.base.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        self.model._check(kwargs)
        call = self.model.template_inputs(input_ids, attention_mask, side="left")
        new = self.model.base.generate(**call, **kwargs)  # from embeddings HF returns only the new tokens
        return torch.cat([input_ids, new.to(input_ids.device)], 1)

    def trained_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        """``trainable``: the encoder's parameters (its embedding table, LSTM and MLP); ``model``: the base's."""
        return {"trainable": sum(p.numel() for p in self.trained_parameters()),
                "model": sum(p.numel() for p in self.model.base.parameters())}

    def print_trainable_parameters(self) -> str:
        counts = self.parameter_counts()
        share = 100.0 * counts["trainable"] / max(counts["model"], 1)
        text = (f"{self.method} ({self.layout.num_pseudo_tokens} pseudo tokens, {self.encoder.kind} encoder): "
                f"trainable params: {counts['trainable']:,} || model params: {counts['model']:,} || "
                f"trainable%: {share:.6f}")
        print(text)
        return text



    # -- saving: safetensors + JSON, never pickle -------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        layout = self.layout
        return {"method": self.method, **self.options, "fixed": list(layout.fixed), "before": layout.before,
                "bos_token_id": layout.bos_token_id, "pad_token_id": layout.pad_token_id}

    def save_pretrained(self, path: str | Path) -> Path:
        """``ptuning_encoder.safetensors`` (the encoder) and ``ptuning_config.json`` (the template, its
        token slots and the encoder's options: loading needs no tokenizer)."""
        from safetensors.torch import save_file

        self._check_live()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()},
                  str(path / WEIGHTS_NAME))
        (path / CONFIG_NAME).write_text(json.dumps(self._config(), indent=2))
        return path

    def load_trained(self, path: str | Path) -> None:
        """Load an encoder saved by :meth:`save_pretrained` of the same template and encoder."""
        from safetensors.torch import load_file

        self._check_live()
        path = Path(path)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} not found: not a template P-tuning save folder")
        saved = json.loads((path / CONFIG_NAME).read_text())
        mine = self._config()
        differ = [k for k in ("fixed", "before", "encoder") if saved.get(k) != mine.get(k)]
        if differ:
            raise ValueError(f"{path / CONFIG_NAME}: {differ[0]}={saved.get(differ[0])!r}, this model's is "
                             f"{mine.get(differ[0])!r}")
        self.encoder.load_state_dict(load_file(str(path / WEIGHTS_NAME)))

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | Path) -> "PTuningModel":
        """A template P-tuning model on ``model`` with the encoder saved in ``path``."""
        config = json.loads((Path(path) / CONFIG_NAME).read_text())
        if config.get("method") != cls.method:
            raise ValueError(f"{path}: method={config.get('method')!r}, expected {cls.method!r}")
        layout = TemplateLayout(tuple(config["fixed"]), config["before"], config["bos_token_id"],
                                config["pad_token_id"])
        adapted = _build(model, layout, {k: config[k] for k in _OPTION_NAMES})
        try:
            adapted.load_trained(path)
        except Exception:
            adapted.detach()   # a failed load leaves the base as it was (its requires_grad flags)
            raise
        return adapted


_OPTION_NAMES = ("template", "encoder", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout", "seed",
                 "sample_from")


def _build(model: nn.Module, layout: TemplateLayout, options: dict[str, Any]) -> PTuningModel:
    weight = model.get_input_embeddings().weight
    vocab, dim = weight.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options["seed"])
        encoder = PromptEncoder(layout.num_pseudo_tokens, dim, options["encoder"],
                                hidden_size=options["encoder_hidden_size"], num_layers=options["encoder_num_layers"],
                                dropout=options["encoder_dropout"])
        if options["encoder"] == "none":
            # plain embeddings start at the embeddings of vocabulary tokens, as in prompt tuning (the encoders'
            # tables start at nn.Embedding's N(0, 1), as in the authors' code)
            ids = torch.randint(0, min(int(options["sample_from"] or vocab), vocab), (layout.num_pseudo_tokens,))
            with torch.no_grad():
                encoder.embedding.weight.copy_(weight.detach()[ids.to(weight.device)].float())
    return PTuningModel(model, encoder.to(weight.device), layout, options)


def get_ptuning_model(model: nn.Module, tokenizer: Any, template: str | Sequence[Any] = "[P*5] {input} [P*5] {output}",
                      *, encoder: str = "lstm", encoder_hidden_size: int | None = None, encoder_num_layers: int = 2,
                      encoder_dropout: float = 0.0, seed: int = 0, sample_from: int | None = 5000) -> PTuningModel:
    """Freeze ``model`` and attach template P-tuning: ``template`` (see
    :mod:`reftkit.analysis.ptuning_template`; anchors tokenized with ``tokenizer``), ``encoder`` ``"lstm"``
    (published: bi-LSTM + two-layer ReLU MLP), ``"mlp"`` or ``"none"``, its hidden size (per LSTM direction;
    default d // 2 for the LSTM, d for the MLP), LSTM layers and dropout. ``seed`` makes the initialisation
    reproducible; ``sample_from`` bounds the vocabulary ids the ``"none"`` table starts from."""
    from .common import check_tokenizer_fits

    check_tokenizer_fits(model, tokenizer)
    bos = tokenizer.bos_token_id
    # the BOS stays first only when the tokenizer puts one on its inputs
    if bos is not None and list(tokenizer("a")["input_ids"][:1]) != [bos]:
        bos = None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (model.config.pad_token_id or 0)
    layout = TemplateLayout.from_template(template, tokenizer, bos_token_id=bos, pad_token_id=int(pad))
    options = {"template": template if isinstance(template, str) else list(template), "encoder": encoder,
               "encoder_hidden_size": encoder_hidden_size, "encoder_num_layers": encoder_num_layers,
               "encoder_dropout": encoder_dropout, "seed": seed, "sample_from": sample_from}
    if encoder not in ("lstm", "mlp", "none"):
        raise ValueError(f"encoder={encoder!r}; choose one of ('lstm', 'mlp', 'none')")
    return _build(model, layout, options)
