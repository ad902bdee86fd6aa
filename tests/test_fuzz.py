"""Hostile input: mutated captures through every decoder end only in ProtocolError.

A short hypothesis campaign runs in CI; ``python -m tests.fuzz_decoders`` runs the long ones.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .fuzz_decoders import mutate, run_one, seeds

POOL = seeds()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(POOL) - 1), st.integers(0, 2**32 - 1), st.sampled_from([1 << 20, 4096, 97, 5]))
def test_mutated_captures_raise_only_protocol_error(which: int, seed: int, chunk: int) -> None:
    kind, base = POOL[which]
    data = mutate(base, random.Random(seed))
    run_one(kind, data, chunk)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.sampled_from(["main", "resume", "rp", "multifd"]))
def test_random_bytes_raise_only_protocol_error(data: bytes, kind: str) -> None:
    run_one(kind, data, 64)
