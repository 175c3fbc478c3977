"""The pattern parser: what it accepts (as data), what it refuses (with the pattern quoted)."""
from __future__ import annotations

import einops
import pytest
import torch

from relayout.errors import RelayoutError
from relayout.patterns import Pattern, Side, _parse_side, parse

# pattern -> (left dims, right dims)
GOOD = {
    "e r h -> e r h": ((("e",), ("r",), ("h",)), (("e",), ("r",), ("h",))),
    "(e r) h -> e r h": ((("e", "r"), ("h",)), (("e",), ("r",), ("h",))),
    "h (r e) -> e h r": ((("h",), ("r", "e")), (("e",), ("h",), ("r",))),
    "(two i) (r e) -> two e i r": ((("two", "i"), ("r", "e")), (("two",), ("e",), ("i",), ("r",))),
    "(i two) (r e) -> two e i r": ((("i", "two"), ("r", "e")), (("two",), ("e",), ("i",), ("r",))),
    "1 r h -> e r h": ((("1",), ("r",), ("h",)), (("e",), ("r",), ("h",))),
    "  (e  two r)   h->two e r h ": ((("e", "two", "r"), ("h",)), (("two",), ("e",), ("r",), ("h",))),
    "x_1 y2 -> y2 x_1": ((("x_1",), ("y2",)), (("y2",), ("x_1",))),
}

# pattern -> words the error must contain
BAD = {
    "e r h": "exactly one '->'",
    "e -> r -> h": "exactly one '->'",
    "((e r)) h -> e r h": "nested parentheses",
    "e r) h -> e r h": "')' without '('",
    "(e r h -> e r h": "never closed",
    "() e -> e": "empty group",
    " -> e": "no dimensions",
    "e -> ": "no dimensions",
    "e e -> e": "axis 'e' appears twice",
    "(e r) -> (r e) r": "axis 'r' appears twice",
    "E r -> E r": "'E' is not an axis name",
    "e r... -> e r": "is not an axis name",
    "2 e -> e": "'2' is not an axis name",
    "e-r -> e": "'e-r' is not an axis name",
}


@pytest.mark.parametrize("text", sorted(GOOD))
def test_parse_good(text):
    lhs, rhs = GOOD[text]
    p = parse(text)
    assert p == Pattern(Side(lhs), Side(rhs))
    assert parse(p.text()) == p  # text() round-trips
    assert p.reverse().reverse() == p and p.reverse().lhs == p.rhs


@pytest.mark.parametrize("text", sorted(BAD))
def test_parse_bad(text):
    with pytest.raises(RelayoutError) as info:
        parse(text)
    message = str(info.value)
    assert BAD[text] in message
    assert repr(text) in message  # the offending pattern is quoted


def test_errors_say_which_side():
    with pytest.raises(RelayoutError, match=r"\(left side\)"):
        parse("e e -> e")
    with pytest.raises(RelayoutError, match=r"\(right side\)"):
        parse("e -> e e")


def test_axes_skip_unit_dims_and_keep_order():
    p = parse("1 (e r) h -> e r h")
    assert p.lhs.axes == ("e", "r", "h")
    assert p.lhs.text() == "1 (e r) h"


def test_parse_is_cached_and_uncached_stays_callable():
    assert parse("(e r) h -> e r h") is parse("(e r) h -> e r h")
    assert _parse_side("(e r) h", "here") == parse("(e r) h -> e r h").lhs
    with pytest.raises(RelayoutError, match="here: empty group"):
        _parse_side("()", "here")


@pytest.mark.parametrize("text", [t for t in sorted(GOOD) if "1" not in GOOD[t][0][0]])
def test_text_is_a_valid_einops_pattern_that_round_trips(text):
    # the parsed text is what execute.py hands to einops: rearrange then reverse restores the input
    p = parse(text)
    sizes = {a: n for a, n in zip(sorted(set(p.lhs.axes)), (2, 3, 5, 7))}
    shape = [1] * len(p.lhs.dims)
    for n, dim in enumerate(p.lhs.dims):
        for a in dim:
            shape[n] *= sizes[a]
    x = torch.arange(1, 1 + int(torch.tensor(shape).prod())).reshape(shape)
    y = einops.rearrange(x, p.text(), **sizes)
    assert torch.equal(einops.rearrange(y, p.reverse().text(), **sizes), x)
