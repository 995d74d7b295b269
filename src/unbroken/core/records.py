"""A faster `__init__` for frozen slotted dataclasses; pure.

Imports the standard library only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

__all__ = ["quick_init"]

T = TypeVar("T")


def quick_init(cls: type[T]) -> type[T]:
    """Give the frozen, slotted dataclass `cls` an `__init__` that sets each field through
    its slot's own descriptor: the same signature (names, defaults, annotations) and the
    same instances, ~4x faster to make (a frozen dataclass's own `__init__` sets each field
    through `object.__setattr__`, ~0.25 us a field; an answer makes several such records).

    Apply it above `@dataclass(frozen=True, slots=True)`. Only for plain fields: each set
    by `__init__`, positional, without a default factory, and no `__post_init__`.

    Raises:
        TypeError: `cls` is not such a dataclass.
    """
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} is not a frozen dataclass with slots")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} has a __post_init__")
    names: dict[str, Any] = {}
    args: list[str] = []
    lines: list[str] = []
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]  # a dataclass, checked above
        name = field.name
        if not field.init or field.kw_only or field.default_factory is not dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{name} is not a plain field")
        # The slot's descriptor (a member descriptor): setting through it skips the frozen
        # class's __setattr__, as `object.__setattr__` does, without its lookup.
        names[f"_set_{name}"] = cls.__dict__[name].__set__
        if field.default is dataclasses.MISSING:
            args.append(name)
        else:
            names[f"_dflt_{name}"] = field.default
            args.append(f"{name}=_dflt_{name}")
        lines.append(f"    _set_{name}(self, {name})")
    # The setters and defaults as a closure's cells: read with one LOAD_DEREF each.
    source = "def make({}):\n  def __init__(self, {}):\n{}\n  return __init__\n".format(
        ", ".join(names), ", ".join(args), "\n".join(lines or ["    pass"])
    )
    made: dict[str, Any] = {}
    exec(source, {}, made)  # noqa: S102 - source built from the dataclass's own field names
    init = made["make"](**names)
    old = cls.__init__  # the dataclass's generated __init__
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__annotations__ = dict(old.__annotations__)
    init.__doc__ = old.__doc__
    setattr(cls, "__init__", init)  # noqa: B010 - mypy rejects assigning to a method
    return cls
