"""TLP sizing arithmetic (teeio.tlp.sizing; PCIe 6.x §2.2.7, §2.3.1.1): requests split by
MPS / MRRS never cross 4 KiB, completions end on the RCB and fit MPS, and the O(1) counts
agree with the splits."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from teeio.tlp import (
    RCB,
    TLP_SIZES,
    completion_spans,
    count_completions,
    count_pieces,
    count_read_tlps,
    split,
)

addresses = st.integers(0, 1 << 20)
lengths = st.integers(1, 3 * 4096 + 17)
tlp_sizes = st.sampled_from(TLP_SIZES)


@given(addresses, lengths, tlp_sizes)
def test_split_pieces_are_bounded_and_never_cross_4k(a: int, n: int, size: int) -> None:
    pieces = split(a, n, size)
    assert pieces[0][0] == a and sum(k for _, k in pieces) == n
    for (pa, pn), (qa, _) in zip(pieces, pieces[1:], strict=False):
        assert pa + pn == qa
    for pa, pn in pieces:
        assert 0 < pn <= size
        assert pa // 4096 == (pa + pn - 1) // 4096
    assert count_pieces(a, n, size) == len(pieces)


@given(addresses, st.integers(1, 4096), tlp_sizes)
def test_completions_end_on_rcb_and_fit_mps(a: int, n: int, mps: int) -> None:
    spans = completion_spans(a, n, mps)
    assert sum(k for _, k in spans) == n
    for i, (pa, pn) in enumerate(spans):
        assert 0 < pn <= mps
        if i < len(spans) - 1:
            assert (pa + pn) % RCB == 0          # §2.3.1.1
    assert count_completions(a, n, mps) == len(spans)


@given(addresses, lengths, tlp_sizes, tlp_sizes)
def test_read_tlp_count_closed_form(a: int, n: int, mrrs: int, mps: int) -> None:
    pieces = split(a, n, mrrs)
    want = (len(pieces), sum(len(completion_spans(pa, pn, mps)) for pa, pn in pieces))
    assert count_read_tlps(a, n, mrrs, mps) == want
