"""The destination's postcopy state machine and received map (mig_dest/postcopy.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mig_dest.incoming import is_page_run
from mig_dest.postcopy import (
    TRANSITIONS,
    PostcopyState,
    PostcopyStateError,
    PostcopyStateMachine,
    ReceivedMap,
)
from protocol.events import RpReqPages
from protocol.return_path import ReturnPathDecoder, encode_rp

S = PostcopyState

# how to reach each state from NONE
PATHS: dict[PostcopyState, list[tuple[PostcopyState, str]]] = {
    S.NONE: [],
    S.ADVISE: [(S.ADVISE, "POSTCOPY_ADVISE")],
    S.DISCARD: [(S.ADVISE, "POSTCOPY_ADVISE"), (S.DISCARD, "POSTCOPY_RAM_DISCARD")],
    S.LISTENING: [(S.ADVISE, "POSTCOPY_ADVISE"), (S.LISTENING, "POSTCOPY_LISTEN")],
    S.RUNNING: [(S.ADVISE, "POSTCOPY_ADVISE"), (S.LISTENING, "POSTCOPY_LISTEN"), (S.RUNNING, "POSTCOPY_RUN")],
    S.END: [
        (S.ADVISE, "POSTCOPY_ADVISE"),
        (S.LISTENING, "POSTCOPY_LISTEN"),
        (S.RUNNING, "POSTCOPY_RUN"),
        (S.END, "EOF"),
    ],
}


def machine_in(state: PostcopyState) -> PostcopyStateMachine:
    sm = PostcopyStateMachine()
    for new, cmd in PATHS[state]:
        sm.to(new, cmd)
    assert sm.state is state
    return sm


def test_transition_table_matches_wire_md() -> None:
    assert TRANSITIONS["POSTCOPY_ADVISE"] == (frozenset({S.NONE}), S.ADVISE)
    assert TRANSITIONS["POSTCOPY_RAM_DISCARD"] == (frozenset({S.ADVISE, S.DISCARD}), S.DISCARD)
    assert TRANSITIONS["POSTCOPY_LISTEN"] == (frozenset({S.ADVISE, S.DISCARD}), S.LISTENING)
    assert TRANSITIONS["POSTCOPY_RUN"] == (frozenset({S.LISTENING}), S.RUNNING)
    assert TRANSITIONS["EOF"] == (frozenset({S.RUNNING}), S.END)
    assert [s.value for s in S] == [0, 1, 2, 3, 4, 5]


def test_discard_repeats_and_listen_after_discard() -> None:
    sm = machine_in(S.DISCARD)
    sm.to(S.DISCARD, "POSTCOPY_RAM_DISCARD")
    sm.to(S.LISTENING, "POSTCOPY_LISTEN")
    assert sm.listening
    sm.to(S.RUNNING, "POSTCOPY_RUN")
    assert sm.listening


@pytest.mark.parametrize("command", sorted(TRANSITIONS))
@pytest.mark.parametrize("state", list(S), ids=lambda s: s.name)
def test_every_command_in_a_wrong_state_is_rejected(command: str, state: PostcopyState) -> None:
    allowed, target = TRANSITIONS[command]
    sm = machine_in(state)
    if state in allowed:
        sm.to(target, command)
        assert sm.state is target
        return
    with pytest.raises(PostcopyStateError) as exc:
        sm.to(target, command)
    msg = str(exc.value)
    assert command in msg
    assert f"state {state.name} ({state.value})" in msg
    for s in allowed:
        assert s.name in msg
    assert sm.state is state  # unchanged


def test_wrong_target_is_a_bug_not_a_state_error() -> None:
    with pytest.raises(ValueError):
        PostcopyStateMachine().to(S.RUNNING, "POSTCOPY_ADVISE")
    with pytest.raises(ValueError):
        PostcopyStateMachine().to(S.ADVISE, "POSTCOPY_END")


def test_run_before_listen_names_the_state() -> None:
    sm = machine_in(S.ADVISE)
    with pytest.raises(PostcopyStateError, match=r"POSTCOPY_RUN in postcopy state ADVISE \(1\).*LISTENING"):
        sm.to(S.RUNNING, "POSTCOPY_RUN")


# ---------------------------------------------------------------- received map


def test_requests_only_missing_pages_once_with_ids_on_block_change() -> None:
    rm = ReceivedMap({"a": 4 * 4096, "b": 3 * 4096})
    rm.mark_received("a", np.array([0, 2]))
    rm.mark_received("b", 1)
    assert rm.missing_count() == 4
    assert {k: v.tolist() for k, v in rm.missing().items()} == {"a": [1, 3], "b": [0, 2]}
    reqs = rm.build_requests(3)
    assert reqs == [
        RpReqPages(1 * 4096, 4096, "a"),
        RpReqPages(3 * 4096, 4096, None),
        RpReqPages(0, 4096, "b"),
    ]
    assert rm.outstanding() == 3
    # requested pages are not requested again while outstanding
    assert rm.build_requests(10) == [RpReqPages(2 * 4096, 4096, None)]  # still block b
    assert rm.build_requests(10) == []
    rm.mark_received("a", np.array([1, 3]))
    assert rm.outstanding() == 2
    assert rm.build_requests(10) == []
    rm.mark_received("b", np.array([0, 2]))
    assert rm.missing_count() == 0 and rm.outstanding() == 0
    assert rm.requests_sent == 4


def test_request_id_again_when_block_changes_back() -> None:
    rm = ReceivedMap({"a": 2 * 4096, "b": 4096})
    assert rm.build_requests(1) == [RpReqPages(0, 4096, "a")]
    assert rm.build_requests(1) == [RpReqPages(4096, 4096, None)]
    assert rm.build_requests(1) == [RpReqPages(0, 4096, "b")]
    rm.discard("a", [(0, 4096)])  # a discarded page may be requested again
    assert rm.build_requests(5) == [RpReqPages(0, 4096, "a")]


def test_never_request_a_received_page() -> None:
    rm = ReceivedMap({"pc.ram": 64 * 4096})
    rng = np.random.default_rng(1)
    got = rng.random(64) < 0.5
    rm.mark_received("pc.ram", np.flatnonzero(got))
    reqs = rm.build_requests(1000)
    assert sorted(r.start // 4096 for r in reqs) == np.flatnonzero(~got).tolist()
    assert all(r.length == 4096 for r in reqs)
    assert reqs[0].block == "pc.ram" and all(r.block is None for r in reqs[1:])


def test_discard_clears_received_bits() -> None:
    rm = ReceivedMap({"a": 8 * 4096})
    rm.mark_received("a", np.arange(8))
    assert rm.discard("a", [(4096, 2 * 4096), (6 * 4096, 4096)]) == [(1, 3), (6, 7)]
    assert rm.missing()["a"].tolist() == [1, 2, 6]
    assert rm.not_received("a", np.arange(8)).tolist() == [1, 2, 6]
    with pytest.raises(ValueError):
        rm.discard("a", [(100, 4096)])
    with pytest.raises(ValueError):
        rm.discard("a", [(7 * 4096, 2 * 4096)])


def test_requests_decode_on_the_source_side() -> None:
    rm = ReceivedMap({"pc.ram": 4 * 4096, "pc.bios": 2 * 4096})
    data = b"".join(encode_rp(r) for r in rm.build_requests(100))
    dec = ReturnPathDecoder(block_sizes={"pc.ram": 4 * 4096, "pc.bios": 2 * 4096})
    dec.feed(data)
    evs = list(dec.events())
    assert len(evs) == 6
    assert [e.block for e in evs] == ["pc.ram", None, None, None, "pc.bios", None]


@given(st.lists(st.integers(0, 40), min_size=1, max_size=12))
def test_is_page_run_only_for_consecutive_pages(pages: list[int]) -> None:
    idx = np.array(pages, dtype=np.intp)
    expected = pages == list(range(pages[0], pages[0] + len(pages)))
    assert is_page_run(idx) is expected


def test_interleaved_requested_page_is_not_a_run() -> None:
    # a requested page (20) between background pages: the ends (10, 12) look like a run
    assert not is_page_run(np.array([10, 20, 12]))
