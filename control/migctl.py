"""migctl: drive mig-source / mig-dest (or QEMU itself) over their QMP socket.

    migctl --qmp /run/mig-source.qmp migrate tcp:10.0.0.2:4444 --watch
    MIGCTL_QMP=/run/mig-source.qmp migctl status --json

Exit status: 0 success; 1 command error, failed or cancelled migration, connection problem;
2 usage error. ``--json`` prints exactly one JSON object on stdout: the command's result
(query-migrate's reply for status/watch/migrate --watch) or ``{"error": {"class", "desc"}}``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Any, Final, TextIO

import trio

from . import format as fmt
from .client import QmpClient, QmpClientError, QmpCommandError

ENV_QMP: Final = "MIGCTL_QMP"
DEFAULT_INTERVAL: Final = 0.2
# without a TTY, a progress line at most this often (plus one per status or pass change)
PLAIN_LINE_PERIOD: Final = 1.0
# after `migrate`, how long query-migrate may still say "none" before we give up
START_GRACE: Final = 5.0
PROGRESS_EVENTS: Final = frozenset({"MIGRATION", "MIGRATION_PASS"})

_SIZE = re.compile(r"(?i)(\d+)([kmgtp])i?b?")
_SIZE_SHIFT: Final = MappingProxyType({"k": 10, "m": 20, "g": 30, "t": 40, "p": 50})
_ON: Final = frozenset({"on", "true", "yes", "1"})
_OFF: Final = frozenset({"off", "false", "no", "0"})


class UsageError(Exception):
    """Bad command-line input detected after argparse (exit status 2)."""


class _Out:
    """Where and how results go: human text or one JSON object, TTY progress or plain lines."""

    def __init__(self, stdout: TextIO, stderr: TextIO, as_json: bool) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.json = as_json
        self.tty = bool(getattr(stdout, "isatty", lambda: False)())
        self._bar_shown = False

    def line(self, text: str = "") -> None:
        self.end_bar()
        print(text, file=self.stdout, flush=True)

    def lines(self, texts: Sequence[str]) -> None:
        for t in texts:
            self.line(t)

    def emit_json(self, obj: Any, *, pretty: bool = False) -> None:
        # --json output is one object on one line, easy to pipe into jq or a log
        text = json.dumps(obj, indent=2) if pretty else json.dumps(obj)
        print(text, file=self.stdout, flush=True)

    def error(self, cls: str, desc: str) -> None:
        self.end_bar()
        if self.json:
            self.emit_json({"error": {"class": cls, "desc": desc}})
        else:
            print(f"migctl: error: {desc}", file=self.stderr, flush=True)

    def bar(self, text: str) -> None:
        """Redraw the single progress line in place (TTY only)."""
        width = shutil.get_terminal_size((120, 24)).columns
        # never wrap: a wrapped line cannot be redrawn with a bare \r
        self.stdout.write("\r" + text[: max(10, width - 1)] + "\x1b[K")
        self.stdout.flush()
        self._bar_shown = True

    def end_bar(self) -> None:
        if self._bar_shown:
            self.stdout.write("\n")
            self.stdout.flush()
            self._bar_shown = False


# ---- argument parsing ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="migctl",
        description="Control mig-source / mig-dest live migration daemons over QMP.",
    )
    parser.add_argument(
        "--qmp",
        metavar="PATH",
        default=os.environ.get(ENV_QMP),
        help=f"QMP UNIX socket of the daemon (default: ${ENV_QMP})",
    )
    parser.add_argument("--json", action="store_true", default=False, help="machine-readable output")
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECS",
        help="give up on connecting or on a single command after SECS (default 30)",
    )
    # --json is accepted after the subcommand too; SUPPRESS keeps it from resetting the global
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON output")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, parents=[common])

    def add_interval(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--interval",
            type=float,
            default=DEFAULT_INTERVAL,
            metavar="SECS",
            help=f"query-migrate polling period (default {DEFAULT_INTERVAL})",
        )

    p = add("migrate", "start an outgoing migration to URI (source)")
    p.add_argument("uri")
    p.add_argument("--resume", action="store_true", help="resume a paused postcopy migration")
    p.add_argument("--watch", "-w", action="store_true", help="show progress until it ends")
    add_interval(p)
    p = add("watch", "show the progress of the current migration until it ends")
    add_interval(p)
    add("status", "show query-migrate")
    add("cancel", "cancel the current migration")
    add("start-postcopy", "switch the running migration to postcopy now (source)")
    p = add("recover", "listen on URI for the source of a paused postcopy migration (destination)")
    p.add_argument("uri")
    p = add("set-capability", "enable or disable a migration capability")
    p.add_argument("name")
    p.add_argument("state", metavar="on|off")
    p = add("set-parameter", "set a migration parameter (integers and k/M/G/T sizes are numbers)")
    p.add_argument("name")
    p.add_argument("value")
    add("capabilities", "list migration capabilities")
    add("parameters", "list migration parameters")
    p = add("incoming", "listen for an incoming migration on URI (destination)")
    p.add_argument("uri")
    add("stop", "pause the guest")
    add("cont", "resume the guest")
    add("query-status", "show the VM run state")
    add("digest", "show the guest memory digest (query-guest-digest)")
    add("check", "run the guest consistency check (query-guest-check)")
    p = add("raw", "execute any QMP command; prints its JSON result")
    p.add_argument("command")
    p.add_argument("arguments", nargs="?", default=None, metavar="JSON-ARGS")
    return parser


def parse_state(text: str) -> bool:
    t = text.lower()
    if t in _ON:
        return True
    if t in _OFF:
        return False
    raise UsageError(f"state must be on or off, not {text!r}")


def parse_value(text: str) -> Any:
    """set-parameter values: integers (with optional k/M/G/T binary suffix), booleans, strings."""
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if m := _SIZE.fullmatch(text):
        return int(m.group(1)) << _SIZE_SHIFT[m.group(2).lower()]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_json_args(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UsageError(f"JSON-ARGS is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise UsageError("JSON-ARGS must be a JSON object")
    return value


# ---- commands -------------------------------------------------------------------------------------


async def _watch(qmp: QmpClient, out: _Out, interval: float, timeout: float, *, just_started: bool) -> int:
    """Follow query-migrate until a terminal status; print progress and the final stats."""
    last_plain = -math.inf
    last_key: tuple[Any, ...] | None = None
    none_deadline = trio.current_time() + START_GRACE
    with qmp.events() as events:
        while True:
            with trio.fail_after(timeout):
                info = await qmp.execute("query-migrate")
            status = info.get("status", "none")
            if status == "none" and (not just_started or trio.current_time() > none_deadline):
                if just_started:
                    out.error("GenericError", "migration did not start (status is still 'none')")
                    return 1
                if out.json:
                    out.emit_json(info)
                else:
                    out.line("no migration")
                return 0
            if status in fmt.TERMINAL_STATUSES:
                break
            if not out.json and status != "none":
                line = fmt.progress_line(info)
                now = trio.current_time()
                key = (status, (info.get("ram") or {}).get("dirty-sync-count"))
                if out.tty:
                    out.bar(line)
                elif key != last_key or now - last_plain >= PLAIN_LINE_PERIOD:
                    out.line(line)
                    last_plain, last_key = now, key
            # poll, but react at once to a status change or a new pass announced by event
            with trio.move_on_after(interval):
                async for ev in events:
                    if ev.get("event") in PROGRESS_EVENTS:
                        break
    if out.json:
        out.emit_json(info)
    else:
        if out.tty:
            out.bar(fmt.progress_line(info))
        out.end_bar()
        lines = fmt.final_stats_lines(info)
        if status == "completed":
            out.lines(lines)
        else:
            print("\n".join(lines), file=out.stderr, flush=True)
    return 0 if status == "completed" else 1


def _result_object(result: Any) -> dict[str, Any]:
    return result if isinstance(result, dict) else {"return": result}


async def _simple(
    qmp: QmpClient,
    out: _Out,
    timeout: float,
    name: str,
    arguments: dict[str, Any] | None,
    human: Callable[[Any], Sequence[str]],
    to_json: Callable[[Any], dict[str, Any]] = _result_object,
) -> Any:
    with trio.fail_after(timeout):
        result = await qmp.execute(name, arguments)
    if out.json:
        out.emit_json(to_json(result))
    else:
        out.lines(human(result))
    return result


def _caps_human(result: Any) -> list[str]:
    return [f"{c['capability']}: {'on' if c['state'] else 'off'}" for c in result]


def _caps_json(result: Any) -> dict[str, Any]:
    # a name -> bool object is what scripts want (jq .xbzrle)
    return {c["capability"]: c["state"] for c in result}


async def _dispatch(args: argparse.Namespace, qmp: QmpClient, out: _Out) -> int:
    t = args.timeout
    cmd = args.cmd
    if cmd == "migrate":
        margs: dict[str, Any] = {"uri": args.uri}
        if args.resume:
            margs["resume"] = True
        with trio.fail_after(t):
            result = await qmp.execute("migrate", margs)
        if args.watch:
            return await _watch(qmp, out, args.interval, t, just_started=True)
        if out.json:
            out.emit_json(_result_object(result))
        else:
            out.line(f"migration to {args.uri} {'resumed' if args.resume else 'started'}")
        return 0
    if cmd == "watch":
        return await _watch(qmp, out, args.interval, t, just_started=False)
    if cmd == "status":
        info = await _simple(qmp, out, t, "query-migrate", None, fmt.status_lines)
        return 1 if info.get("status") == "failed" else 0
    if cmd == "cancel":
        await _simple(qmp, out, t, "migrate_cancel", None, lambda _: ["migration cancel requested"])
        return 0
    if cmd == "set-capability":
        state = parse_state(args.state)
        capability = {"capability": args.name, "state": state}
        await _simple(
            qmp,
            out,
            t,
            "migrate-set-capabilities",
            {"capabilities": [capability]},
            lambda _: [f"capability {args.name}: {'on' if state else 'off'}"],
        )
        return 0
    if cmd == "set-parameter":
        value = parse_value(args.value)
        await _simple(
            qmp,
            out,
            t,
            "migrate-set-parameters",
            {args.name: value},
            lambda _: [f"parameter {args.name} = {value}"],
        )
        return 0
    if cmd == "capabilities":
        await _simple(qmp, out, t, "query-migrate-capabilities", None, _caps_human, _caps_json)
        return 0
    if cmd == "parameters":
        await _simple(qmp, out, t, "query-migrate-parameters", None, fmt.mapping_lines)
        return 0
    if cmd == "incoming":
        await _simple(
            qmp,
            out,
            t,
            "migrate-incoming",
            {"uri": args.uri},
            lambda _: [f"waiting for an incoming migration on {args.uri}"],
        )
        return 0
    if cmd == "start-postcopy":
        await _simple(qmp, out, t, "migrate-start-postcopy", None, lambda _: ["switch to postcopy requested"])
        return 0
    if cmd == "recover":
        await _simple(
            qmp,
            out,
            t,
            "migrate-recover",
            {"uri": args.uri},
            lambda _: [f"waiting on {args.uri} for the source to resume (migrate --resume there)"],
        )
        return 0
    if cmd == "stop":
        await _simple(qmp, out, t, "stop", None, lambda _: ["VM stopped"])
        return 0
    if cmd == "cont":
        await _simple(qmp, out, t, "cont", None, lambda _: ["VM resumed"])
        return 0
    if cmd == "query-status":
        await _simple(qmp, out, t, "query-status", None, fmt.mapping_lines)
        return 0
    if cmd == "digest":
        await _simple(qmp, out, t, "query-guest-digest", None, fmt.mapping_lines)
        return 0
    if cmd == "check":
        result = await _simple(qmp, out, t, "query-guest-check", None, fmt.mapping_lines)
        # a check that reports {"ok": false} fails the command, so scripts can test $?
        return 1 if isinstance(result, dict) and result.get("ok") is False else 0
    if cmd == "raw":
        raw_args = parse_json_args(args.arguments)
        with trio.fail_after(t):
            result = await qmp.execute(args.command, raw_args)
        if out.json:
            out.emit_json(_result_object(result))
        else:
            out.emit_json(result, pretty=True)
        return 0
    raise AssertionError(f"unhandled command {cmd!r}")


async def run(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """migctl as a coroutine (for tests and embedding); returns the exit status."""
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    parser = build_parser()
    try:
        # argparse prints help and usage errors to sys.stdout / sys.stderr
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    out = _Out(stdout, stderr, args.json)
    if not args.qmp:
        print(f"migctl: error: no QMP socket: use --qmp PATH or set ${ENV_QMP}", file=stderr)
        return 2
    try:
        # validate local input before touching the daemon
        if args.cmd == "set-capability":
            parse_state(args.state)
        elif args.cmd == "raw":
            parse_json_args(args.arguments)
    except UsageError as e:
        print(f"migctl: error: {e}", file=stderr)
        return 2
    try:
        async with QmpClient.connect(args.qmp, timeout=args.timeout) as qmp:
            return await _dispatch(args, qmp, out)
    except QmpCommandError as e:
        out.error(e.error_class, e.desc)
        return 1
    except QmpClientError as e:
        out.error("ConnectionError", str(e))
        return 1
    except trio.TooSlowError:
        out.error("Timeout", f"no answer from {args.qmp} within {args.timeout:g} s")
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    try:
        return trio.run(functools.partial(run, argv))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
