"""`quick_init` (core/records.py): a frozen slotted dataclass keeps its signature, its
values, its immutability and its dataclass behaviour with the faster `__init__`; anything
it cannot make that way is refused."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

import pytest

from unbroken.core.flow import AttemptOutcome, AttemptPlan
from unbroken.core.pricing import Cost
from unbroken.core.records import quick_init
from unbroken.core.routes import Route
from unbroken.instrumentation import AnswerRecord, AttemptRecord


def _twin(cls: type[Any]) -> type[Any]:
    """The same dataclass made again, with dataclasses' own `__init__`."""
    fields = [(f.name, f.type, f) for f in dataclasses.fields(cls)]
    copies = [
        (name, kind, field(default=f.default) if f.default is not dataclasses.MISSING else field())
        for name, kind, f in fields
    ]
    return dataclasses.make_dataclass(cls.__name__, copies, frozen=True, slots=True)


ROUTE = Route(name="r", base_url="http://127.0.0.1:9/v1")
CASES: list[tuple[type[Any], tuple[Any, ...], dict[str, Any]]] = [
    (AttemptPlan, (ROUTE, {"model": "m"}), {"kind": "retry", "number": 2, "waited_s": 0.5}),
    (AttemptOutcome, (None, None, 1.5), {}),
    (Cost, (), {"output_usd": 0.25, "known": False}),
    (AttemptRecord, ("r", "m", "first", 200, "complete", 0.1, 3), {"completion_tokens": 4}),
    (AnswerRecord, ("r", "m", "complete", 1, 0, 0, None, 0.2, 3, 4, 0.001), {}),
]


@pytest.mark.parametrize(("cls", "args", "kwargs"), CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_a_record_is_made_as_the_dataclass_makes_it(
    cls: type[Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    assert cls.__init__.__qualname__ == f"{cls.__qualname__}.__init__"
    twin = _twin(cls)
    assert inspect.signature(cls) == inspect.signature(twin)
    ours, theirs = cls(*args, **kwargs), twin(*args, **kwargs)
    assert dataclasses.astuple(ours) == dataclasses.astuple(theirs)
    assert repr(ours).partition("(")[2] == repr(theirs).partition("(")[2]
    assert ours == cls(*args, **kwargs)
    try:
        expected: object = hash(theirs)
    except TypeError as exc:  # a dict among the fields
        expected = str(exc)
    try:
        got: object = hash(ours)
    except TypeError as exc:
        got = str(exc)
    assert got == expected
    name = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(ours, name, None)
    changed = dataclasses.replace(ours, **{name: getattr(ours, name)})
    assert changed == ours
    assert changed is not ours
    if args:
        with pytest.raises(TypeError):
            cls()  # its required fields are required
    else:
        assert dataclasses.astuple(cls()) == dataclasses.astuple(twin())


def test_a_record_without_fields() -> None:
    @quick_init
    @dataclass(frozen=True, slots=True)
    class Empty:
        pass

    assert Empty() == Empty()
    assert inspect.signature(Empty).parameters == {}


def test_what_it_cannot_make_is_refused() -> None:
    @dataclass(slots=True)
    class Plain:
        a: int

    @dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclass(frozen=True, slots=True)
    class After:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclass(frozen=True, slots=True)
    class Factory:
        a: list[int] = field(default_factory=list)

    @dataclass(frozen=True, slots=True, kw_only=True)
    class KeywordOnly:
        a: int

    @dataclass(frozen=True, slots=True)
    class NotInit:
        a: int = field(default=0, init=False)

    for cls in (int, Plain, NoSlots, After, Factory, KeywordOnly, NotInit):
        with pytest.raises(TypeError):
            quick_init(cls)
