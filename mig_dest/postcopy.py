"""Destination side of postcopy (WIRE.md §6.3, §6.4): the state machine and the received map.

Sans-I/O: :class:`PostcopyStateMachine` checks that each postcopy command arrives in a state
that allows it; :class:`ReceivedMap` keeps one bool per page and block ("received" in QEMU's
terms) and builds the page requests (RP REQ_PAGES_ID / REQ_PAGES) for the pages still missing.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

import numpy as np

from protocol.events import RpReqPages

PAGE = 4096


class PostcopyState(enum.Enum):
    """QEMU's PostcopyState, with its numeric values (they appear in QEMU's error messages)."""

    NONE = 0
    ADVISE = 1
    DISCARD = 2
    LISTENING = 3
    RUNNING = 4
    END = 5


# command -> (states it is allowed in, state it moves to)
TRANSITIONS: dict[str, tuple[frozenset[PostcopyState], PostcopyState]] = {
    "POSTCOPY_ADVISE": (frozenset({PostcopyState.NONE}), PostcopyState.ADVISE),
    "POSTCOPY_RAM_DISCARD": (frozenset({PostcopyState.ADVISE, PostcopyState.DISCARD}), PostcopyState.DISCARD),
    "POSTCOPY_LISTEN": (frozenset({PostcopyState.ADVISE, PostcopyState.DISCARD}), PostcopyState.LISTENING),
    "POSTCOPY_RUN": (frozenset({PostcopyState.LISTENING}), PostcopyState.RUNNING),
    "EOF": (frozenset({PostcopyState.RUNNING}), PostcopyState.END),
}


class PostcopyStateError(Exception):
    """A postcopy command arrived in a state that does not allow it."""


class PostcopyStateMachine:
    def __init__(self) -> None:
        self.state = PostcopyState.NONE

    def allowed(self, command: str) -> frozenset[PostcopyState]:
        return TRANSITIONS[command][0]

    def to(self, new: PostcopyState, command: str) -> None:
        """Apply ``command`` (a key of TRANSITIONS), which must lead to ``new``."""
        try:
            allowed, target = TRANSITIONS[command]
        except KeyError:
            raise ValueError(f"unknown postcopy command {command!r}") from None
        if target is not new:
            raise ValueError(f"{command} leads to {target.name}, not {new.name}")
        if self.state not in allowed:
            names = " or ".join(s.name for s in sorted(allowed, key=lambda s: s.value))
            raise PostcopyStateError(
                f"{command} in postcopy state {self.state.name} ({self.state.value}); "
                f"it is only allowed in {names}"
            )
        self.state = new

    @property
    def listening(self) -> bool:
        """Pages are loaded with postcopy semantics (placed once) from LISTENING on."""
        return self.state in (PostcopyState.LISTENING, PostcopyState.RUNNING, PostcopyState.END)


class ReceivedMap:
    """Per block, which pages the destination holds and which it requested."""

    def __init__(self, blocks: Mapping[str, int]) -> None:
        """``blocks``: name -> used length in bytes (a multiple of the page size)."""
        self.received: dict[str, np.ndarray] = {}
        self.requested: dict[str, np.ndarray] = {}
        for name, size in blocks.items():
            if size % PAGE:
                raise ValueError(f"block {name!r} length 0x{size:x} is not a multiple of {PAGE}")
            self.received[name] = np.zeros(size // PAGE, dtype=bool)
            self.requested[name] = np.zeros(size // PAGE, dtype=bool)
        self._last_block: str | None = None  # block of the last REQ_PAGES_ID sent
        self.requests_sent = 0

    # ---- arrivals

    def mark_received(self, block: str, idx: np.ndarray | int) -> None:
        self.received[block][idx] = True

    def not_received(self, block: str, idx: np.ndarray) -> np.ndarray:
        """The page indexes of ``idx`` that are not received yet (those to place)."""
        return idx[~self.received[block][idx]]

    def discard(self, block: str, ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """Clear the pages of byte ranges (start, length); returns them as page slices."""
        rec = self.received[block]
        out = []
        for start, length in ranges:
            if start % PAGE or length % PAGE or start + length > len(rec) * PAGE:
                raise ValueError(
                    f"discard range 0x{start:x}+0x{length:x} is not page aligned inside block {block!r}"
                )
            first, last = start // PAGE, (start + length) // PAGE
            rec[first:last] = False
            self.requested[block][first:last] = False
            out.append((first, last))
        return out

    # ---- what is missing

    def missing_count(self) -> int:
        return int(sum(int((~r).sum()) for r in self.received.values()))

    def missing(self) -> dict[str, np.ndarray]:
        """Page indexes not received, per block (blocks with none left out)."""
        out = {}
        for name, rec in self.received.items():
            idx = np.flatnonzero(~rec)
            if len(idx):
                out[name] = idx
        return out

    def outstanding(self) -> int:
        """Pages requested but not received yet."""
        return int(sum(int((self.requested[n] & ~r).sum()) for n, r in self.received.items()))

    def next_missing(self, limit: int) -> dict[str, np.ndarray]:
        """Up to ``limit`` missing pages never requested, per block (in address order)."""
        out: dict[str, np.ndarray] = {}
        n = 0
        for name, rec in self.received.items():
            if n >= limit:
                break
            idx = np.flatnonzero(~(rec | self.requested[name]))[: limit - n]
            if len(idx):
                out[name] = idx
                n += len(idx)
        return out

    def forget_last_block(self) -> None:
        """A new connection: the next request names its block (REQ_PAGES_ID)."""
        self._last_block = None

    def requests_for(self, block: str, pages: np.ndarray) -> list[RpReqPages]:
        """One 4096-byte request per page, with the block name (REQ_PAGES_ID) whenever it
        differs from the last request's; marks them requested."""
        self.requested[block][pages] = True
        out: list[RpReqPages] = []
        for i in pages.tolist():
            out.append(RpReqPages(i * PAGE, PAGE, None if block == self._last_block else block))
            self._last_block = block
        self.requests_sent += len(out)
        return out

    def build_requests(self, limit: int) -> list[RpReqPages]:
        """Requests for up to ``limit`` missing pages never requested (see requests_for)."""
        out: list[RpReqPages] = []
        for name, idx in self.next_missing(limit).items():
            out += self.requests_for(name, idx)
        return out
