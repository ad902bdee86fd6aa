"""Sans-I/O splitter of a byte stream into JSON texts, the way QEMU's json-streamer does it.

QMP is not line-framed: QEMU accepts several objects on one line and one object spread over
several lines (people type pretty-printed JSON into socat). QEMU splits the stream by counting
braces and brackets outside string literals; a top-level scalar is a message of its own. We do
the same, scanning with a regex so a big message costs C-speed searching, not a Python loop per
byte. Parsing the split text is left to ``json.loads``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

# QEMU's limits (qobject/json-streamer.c): MAX_TOKEN_SIZE is 64 MiB, we stay far smaller since
# nothing in our QMP vocabulary needs more than a few KiB.
DEFAULT_MAX_MESSAGE: Final = 1 << 20
MAX_NESTING: Final = 1024

_STRUCTURAL: Final = re.compile(rb'["{}\[\]]')
_IN_STRING: Final = re.compile(rb'["\\]')
_NON_SPACE: Final = re.compile(rb"[^ \t\r\n]")
_SCALAR_END: Final = re.compile(rb'[ \t\r\n"{}\[\]]')


@dataclass(frozen=True)
class SplitError:
    """A framing error; the splitter has already resynchronised after it."""

    desc: str


class JsonSplitter:
    """Feed bytes, get back complete JSON texts (bytes) and framing errors, in stream order."""

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self._max = max_message
        self._buf = bytearray()
        self._pos = 0  # scan position in _buf
        self._start = -1  # start of the current message in _buf, -1 = between messages
        self._depth = 0
        self._in_string = False
        self._discarding = False  # after an oversize message: drop input up to the next newline

    def feed(self, data: bytes) -> list[bytes | SplitError]:
        out: list[bytes | SplitError] = []
        if self._discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return out
            data = data[nl + 1 :]
            self._discarding = False
        self._buf += data
        self._scan(out)
        # drop consumed bytes so the buffer only holds the current partial message
        cut = self._start if self._start >= 0 else self._pos
        if cut:
            del self._buf[:cut]
            self._pos -= cut
            if self._start >= 0:
                self._start = 0
        if self._start >= 0 and len(self._buf) > self._max:
            out.append(SplitError("JSON token size limit exceeded"))
            self._reset()
            self._discarding = True
        return out

    def _reset(self) -> None:
        self._buf.clear()
        self._pos = 0
        self._start = -1
        self._depth = 0
        self._in_string = False

    def _emit(self, out: list[bytes | SplitError], end: int) -> None:
        out.append(bytes(self._buf[self._start : end]))
        self._start = -1
        self._pos = end

    def _scan(self, out: list[bytes | SplitError]) -> None:
        buf = self._buf
        n = len(buf)
        while self._pos < n:
            if self._in_string:
                m = _IN_STRING.search(buf, self._pos)
                if m is None:
                    self._pos = n
                    return
                i = m.start()
                if buf[i] == 0x5C:  # backslash: skip the escaped byte (may still be unread)
                    if i + 1 >= n:
                        self._pos = i  # rescan the backslash once the next byte arrives
                        return
                    self._pos = i + 2
                    continue
                self._in_string = False
                self._pos = i + 1
                if self._depth == 0:  # a top-level string literal is a message of its own
                    self._emit(out, i + 1)
                continue
            if self._depth == 0 and self._start >= 0:  # inside a top-level scalar
                m = _SCALAR_END.search(buf, self._pos)
                if m is None:
                    self._pos = n
                    return
                self._emit(out, m.start())
                continue
            if self._depth == 0:
                m = _NON_SPACE.search(buf, self._pos)
                if m is None:
                    self._pos = n
                    return
                i = m.start()
                c = buf[i]
                if c in b"}]":
                    out.append(SplitError(f"JSON parse error, stray '{chr(c)}'"))
                    self._pos = i + 1
                    continue
                self._start = i
                if c == 0x22:
                    self._in_string = True
                    self._pos = i + 1
                elif c in b"{[":
                    self._depth = 1
                    self._pos = i + 1
                else:
                    self._pos = i + 1  # a scalar: ends at whitespace or a structural byte
                continue
            m = _STRUCTURAL.search(buf, self._pos)
            if m is None:
                self._pos = n
                return
            i = m.start()
            c = buf[i]
            self._pos = i + 1
            if c == 0x22:
                self._in_string = True
            elif c in b"{[":
                self._depth += 1
                if self._depth > MAX_NESTING:
                    out.append(SplitError("JSON nesting depth limit exceeded"))
                    # resynchronise at the next newline, which may already be buffered
                    nl = buf.find(b"\n", i)
                    if nl < 0:
                        self._reset()
                        self._discarding = True
                        return
                    self._start = -1
                    self._depth = 0
                    self._pos = nl + 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    self._emit(out, i + 1)
