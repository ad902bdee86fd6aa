"""The protocol's one error type: every malformed input ends here, never in a traceback."""

from __future__ import annotations


class ProtocolError(Exception):
    """A stream violated QEMU 7.2's migration wire format.

    ``offset`` is the absolute byte offset in the channel where the offending item starts
    (counted from the first byte ever fed to the decoder), ``section`` names the section being
    parsed when known (``"ram"``, ``"timer"``, ``"command PACKAGED"``...), ``channel`` says which
    byte stream ("main", "return-path", "multifd", "colo").
    """

    def __init__(
        self,
        reason: str,
        *,
        offset: int | None = None,
        section: str | None = None,
        channel: str = "main",
    ) -> None:
        self.reason = reason
        self.offset = offset
        self.section = section
        self.channel = channel
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.channel} stream"
        if self.offset is not None:
            where += f" at byte {self.offset}"
        if self.section is not None:
            where += f" (section {self.section})"
        return f"{where}: {self.reason}"

    def to_dict(self) -> dict[str, object]:
        return {
            "channel": self.channel,
            "offset": self.offset,
            "section": self.section,
            "reason": self.reason,
        }
