"""Under bf16 autocast (what ``TrainingArguments(bf16=True)`` turns on) the base model runs in bf16,
but an intervention keeps its own float32 arithmetic: its output must equal the intervention applied
in float32, outside autocast, to the rows it received."""
import torch
from conftest import tiny_llama

import reftkit


def _edited_model():
    model = tiny_llama(seed=3).float().eval()
    reft = reftkit.get_reft_model(model, {"layer": [0, 1], "component": "block_output", "positions": "f2+l2",
                                          "intervention": "loreft", "low_rank_dimension": 4})
    torch.manual_seed(1)
    with torch.no_grad():
        for iv in reft.interventions.values():
            iv.source.weight.normal_(0.0, 0.5)
            iv.source.bias.normal_(0.0, 0.5)
    return reft


def _seen(reft, ids, mask, autocast: bool):
    seen = []
    handles = [iv.register_forward_hook(lambda m, args, out: seen.append((m, args[0].detach(), out.detach())))
               for iv in reft.interventions.values()]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.no_grad():
            logits = reft(input_ids=ids, attention_mask=mask).logits
    finally:
        for h in handles:
            h.remove()
    return seen, logits


def test_interventions_compute_in_float32_under_autocast():
    reft = _edited_model()
    ids = torch.randint(3, 100, (3, 12))
    mask = torch.ones_like(ids)
    seen, logits = _seen(reft, ids, mask, autocast=True)
    assert len(seen) == 2 and logits.dtype in (torch.bfloat16, torch.float32)
    for iv, rows, out in seen:
        with torch.no_grad():
            reference = iv(rows)  # float32, autocast off
            with torch.autocast("cpu", dtype=torch.bfloat16):
                half = iv(rows)  # what autocast alone would have computed
        assert torch.equal(out, reference.to(out.dtype))
        # the check can fail: autocast would have changed the edit
        assert not torch.equal(half.to(out.dtype), reference.to(out.dtype))


def test_autocast_switch_is_scoped_to_the_intervention():
    """The base model still runs under autocast: bf16 logits differ from the float32 run's."""
    reft = _edited_model()
    ids = torch.randint(3, 100, (2, 10))
    mask = torch.ones_like(ids)
    _, half = _seen(reft, ids, mask, autocast=True)
    _, full = _seen(reft, ids, mask, autocast=False)
    assert half.dtype == torch.bfloat16 or not torch.equal(half, full)
    torch.testing.assert_close(half.float(), full, atol=0.5, rtol=0.1)
    assert not torch.is_autocast_enabled("cpu")
