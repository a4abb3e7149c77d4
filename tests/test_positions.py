"""pyreft's position grammar and its resolution against padded batches."""
from __future__ import annotations

import pytest
import torch

from reftkit.positions import (
    PositionError,
    PositionSpec,
    check_locations,
    locate,
    parse_positions,
    sequence_extent,
    split_untied,
)


@pytest.mark.parametrize("text, spec", [
    ("f7+l7", PositionSpec(7, 7)), ("l1", PositionSpec(0, 1)), ("f3", PositionSpec(3, 0)),
    ("l2+f1", PositionSpec(1, 2)), (" F2 + L5 ", PositionSpec(2, 5)), ("all", PositionSpec(every=True)),
])
def test_parse(text, spec):
    assert parse_positions(text) == spec
    assert parse_positions(str(spec)) == spec


@pytest.mark.parametrize("text, fragment", [
    ("", "must be a string"), ("x3", "term 'x3'"), ("f0", "f0 selects no token"), ("f1+f2", "'f' appears twice"),
    ("l", "term 'l'"), ("f-1", "term 'f-1'"), (3, "must be a string"), ("f2+", "term ''"),
])
def test_parse_errors_name_the_value(text, fragment):
    with pytest.raises(PositionError, match="positions="):
        parse_positions(text)
    with pytest.raises(PositionError) as err:
        parse_positions(text)
    assert fragment in str(err.value)


def test_untied_split():
    assert split_untied(PositionSpec(5, 5)) == (PositionSpec(5, 0), PositionSpec(0, 5))
    assert split_untied(PositionSpec(0, 5)) is None
    assert split_untied(PositionSpec(every=True)) is None


def _locate(text, mask):
    start, lengths = sequence_extent(mask, mask.shape[0], mask.shape[1], mask.device)
    return locate(parse_positions(text), start, lengths, mask.shape[1])


def test_left_and_right_padding_select_the_same_tokens():
    lengths = [6, 3, 1]
    right = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    left = right.flip(1)
    for text in ("l1", "f2+l2", "f3", "all"):
        r, lft = _locate(text, right), _locate(text, left)
        offset = torch.tensor([6 - n for n in lengths])[:, None]
        assert torch.equal(torch.where(r >= 0, r + offset, -1), lft), text


def test_short_sequences_never_overlap_and_keep_the_last_token():
    mask = torch.tensor([[1] * 10, [1] * 5 + [0] * 5, [1] + [0] * 9])
    got = _locate("f7+l7", mask).tolist()
    assert got[0] == [0, 1, 2, 3, 4, -1, -1, 5, 6, 7, 8, 9, -1, -1]
    assert got[1] == [0, 1, -1, -1, -1, -1, -1, 2, 3, 4, -1, -1, -1, -1]
    assert got[2] == [-1] * 7 + [0] + [-1] * 6
    assert _locate("l1", mask).tolist() == [[9], [4], [0]]
    assert _locate("f2", mask).tolist() == [[0, 1], [0, 1], [0, -1]]


def test_explicit_locations_validation():
    assert check_locations(torch.tensor([[1, 2]]), 1, 4, 3).shape == (1, 3, 2)
    with pytest.raises(PositionError, match=r"intervention_locations\[0, 1, 0\] = 9 is outside"):
        check_locations(torch.tensor([[[1], [9]]]), 1, 4, 2)
    with pytest.raises(PositionError, match="-3 is outside"):
        check_locations(torch.tensor([[-3]]), 1, 4, 1)
    with pytest.raises(PositionError, match="3 intervention rows; this model has 2"):
        check_locations(torch.zeros(1, 3, 1, dtype=torch.long), 1, 4, 2)
    with pytest.raises(PositionError, match="batch size 2, the inputs 1"):
        check_locations(torch.zeros(2, 1, dtype=torch.long), 1, 4, 1)
    with pytest.raises(PositionError, match="dtype torch.float32"):
        check_locations(torch.zeros(1, 1), 1, 4, 1)
    with pytest.raises(PositionError, match=r"intervention_locations\[0, 0\] lists token 2 twice"):
        check_locations(torch.tensor([[2, 1, 2]]), 1, 4, 1)
