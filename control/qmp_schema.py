"""Declarative argument schemas for QMP commands.

A command declares its arguments as a sequence of :class:`Arg`; the server validates the
``arguments`` member of each request against it before the handler runs, so handlers receive
a checked dict (optional arguments that have a default are filled in). Error messages follow
QEMU's QAPI input visitor so clients see the same text they would from QEMU::

    Parameter 'uri' is missing
    Parameter 'foo' is unexpected
    Invalid parameter type for 'capabilities[0].state', expected: boolean
    Parameter 'capability' does not accept value 'bogus'

Types are given as Python types (``str``, ``int``, ``float``, ``bool``, ``dict``, ``list``,
``object`` for anything) or as :class:`Enum`, :class:`ListOf` and :class:`Struct`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Final


class QmpError(Exception):
    """Raised by a command handler (or the validator): becomes the QMP error reply.

    ``cls`` is a QAPI ErrorClass: GenericError (almost always), CommandNotFound,
    DeviceNotActive, DeviceNotFound or KVMMissingCap.
    """

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls

    def to_json(self) -> dict[str, str]:
        return {"class": self.cls, "desc": self.desc}


class _Missing:
    """Sentinel type: "no default" (None is a legitimate default)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()


class ArgType:
    """Base of all argument types: ``check`` returns the (possibly normalised) value."""

    #: QAPI's name of the JSON type, used in "expected: ..." messages.
    expected: str

    def check(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def _type_error(self, path: str) -> QmpError:
        return QmpError(f"Invalid parameter type for '{path}', expected: {self.expected}")


@dataclass(frozen=True)
class Scalar(ArgType):
    """A JSON scalar or container checked by Python type only."""

    expected: str
    accept: tuple[type, ...]
    # bool is an int subclass in Python but a distinct type in JSON/QAPI
    reject_bool: bool = False

    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, self.accept) or (self.reject_bool and isinstance(value, bool)):
            raise self._type_error(path)
        return value


@dataclass(frozen=True)
class AnyType(ArgType):
    expected: ClassVar[str] = "any"

    def check(self, value: Any, path: str) -> Any:
        return value


STRING: Final = Scalar("string", (str,))
INTEGER: Final = Scalar("integer", (int,), reject_bool=True)
NUMBER: Final = Scalar("number", (int, float), reject_bool=True)
BOOLEAN: Final = Scalar("boolean", (bool,))
OBJECT: Final = Scalar("object", (dict,))
ARRAY: Final = Scalar("array", (list,))
ANY: Final = AnyType()

_PY_TYPES: Final[Mapping[Any, ArgType]] = MappingProxyType(
    {
        str: STRING,
        int: INTEGER,
        float: NUMBER,
        bool: BOOLEAN,
        dict: OBJECT,
        list: ARRAY,
        object: ANY,
        Any: ANY,
    }
)

TypeSpec = ArgType | type | Any


def as_type(spec: TypeSpec) -> ArgType:
    """Turn a Python type (``str``, ``int``...) or an :class:`ArgType` into an ArgType."""
    if isinstance(spec, ArgType):
        return spec
    try:
        return _PY_TYPES[spec]
    except (KeyError, TypeError):
        raise TypeError(f"unsupported QMP argument type {spec!r}") from None


@dataclass(frozen=True, init=False)
class Enum(ArgType):
    """A string restricted to a set of values (a QAPI enum)."""

    values: tuple[str, ...]
    expected: ClassVar[str] = "string"

    def __init__(self, *values: str) -> None:
        object.__setattr__(self, "values", tuple(values))

    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, str):
            raise self._type_error(path)
        if value not in self.values:
            raise QmpError(f"Parameter '{path}' does not accept value '{value}'")
        return value


@dataclass(frozen=True)
class ListOf(ArgType):
    """A JSON array whose items all have one type."""

    item: TypeSpec
    expected: ClassVar[str] = "array"

    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, list):
            raise self._type_error(path)
        item = as_type(self.item)
        return [item.check(v, f"{path}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class Arg:
    """One named argument. It is optional when it has a default or ``required=False``.

    ``Arg("uri", str)`` is required; ``Arg("resume", bool, default=False)`` is optional and
    filled in with False; ``Arg("blk", bool, required=False)`` is optional and left absent.
    """

    name: str
    type: TypeSpec = object
    default: Any = MISSING
    required: bool | None = None
    doc: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        as_type(self.type)  # fail at registration time, not on the first request
        if self.required is None:
            object.__setattr__(self, "required", self.default is MISSING)
        elif self.required and self.default is not MISSING:
            raise ValueError(f"argument {self.name!r}: a required argument cannot have a default")


def validate_members(args: Iterable[Arg], value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Check a JSON object against ``args``; return the validated dict with defaults filled."""
    out: dict[str, Any] = {}
    known: set[str] = set()
    for arg in args:
        known.add(arg.name)
        path = f"{prefix}.{arg.name}" if prefix else arg.name
        if arg.name in value:
            out[arg.name] = as_type(arg.type).check(value[arg.name], path)
        elif arg.required:
            raise QmpError(f"Parameter '{path}' is missing")
        elif arg.default is not MISSING:
            out[arg.name] = arg.default
    # QEMU's visitor reports missing members before unexpected ones; do the same
    for key in value:
        if key not in known:
            path = f"{prefix}.{key}" if prefix else key
            raise QmpError(f"Parameter '{path}' is unexpected")
    return out


@dataclass(frozen=True, init=False)
class Struct(ArgType):
    """A nested JSON object with declared members (a QAPI struct)."""

    members: tuple[Arg, ...]
    expected: ClassVar[str] = "object"

    def __init__(self, *members: Arg) -> None:
        object.__setattr__(self, "members", tuple(members))

    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise self._type_error(path)
        return validate_members(self.members, value, path)
