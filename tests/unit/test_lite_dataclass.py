"""teeio.lite_dataclass: the same behaviour as dataclasses.dataclass, class by class."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import FrozenInstanceError, field
from typing import Any, ClassVar

import pytest

from teeio.lite_dataclass import dataclass as lite

PARAMS = [{"frozen": True}, {}, {"eq": False}, {"frozen": True, "repr": False}]


def declare(deco: Callable[..., Any], **params: Any) -> tuple[type, type]:
    @deco(**params)
    class A:
        KIND: ClassVar[int] = 7
        x: int
        y: int = 3
        z: tuple[int, ...] = field(default_factory=tuple)
        secret: bytes = field(default=b"k", repr=False)
        n: int = field(default=0, init=False, compare=False)

    @deco(**params)
    class B(A):
        """Documented."""

        w: int = 9
        late: list[int] = field(default_factory=list, init=False, compare=False)

    return A, B


def pairs(params: dict[str, Any]) -> list[tuple[type, type]]:
    return list(zip(declare(dataclasses.dataclass, **params), declare(lite, **params),
                    strict=True))


CALLS = [((1,), {}), ((1, 2), {"z": (1,)}), ((), {"x": 5, "secret": b"q"})]
BAD_CALLS = [((), {}), ((1, 2, 3, 4, 5, 6), {}), ((1,), {"q": 1}), ((1,), {"x": 1}),
             ((), {"y": 1})]


def outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return ("ok", fn(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - the exception is the outcome compared
        return (type(exc), str(exc).replace("declare.<locals>.", ""))


@pytest.mark.parametrize("params", PARAMS)
def test_instances_behave_alike(params: dict[str, Any]) -> None:
    for std, ours in pairs(params):
        for args, kwargs in CALLS:
            a, b = std(*args, **kwargs), ours(*args, **kwargs)
            if params.get("repr", True):
                assert repr(a).replace("declare.<locals>.", "") == \
                    repr(b).replace("declare.<locals>.", "")
            else:
                assert " at 0x" in repr(b)          # object's own
            assert (a == std(*args, **kwargs)) == (b == ours(*args, **kwargs))
            assert (a == std(99)) == (b == ours(99))
            assert (a.__eq__(object()) is NotImplemented) == (b.__eq__(object()) is NotImplemented)
            assert dataclasses.asdict(a) == dataclasses.asdict(b)
            assert vars(a) == vars(b) and list(vars(a)) == list(vars(b))
            hashes = outcome(lambda o=a: hash(o)), outcome(lambda o=b: hash(o))
            if params.get("frozen"):
                assert hashes[0] == hashes[1]       # of the fields
            else:
                assert hashes[0][0] == hashes[1][0]  # unhashable, or object identity
            assert outcome(lambda o=a: setattr(o, "x", 4)) == \
                outcome(lambda o=b: setattr(o, "x", 4))
            assert outcome(lambda o=a: delattr(o, "y")) == outcome(lambda o=b: delattr(o, "y"))
            assert outcome(lambda o=a: dataclasses.replace(o, y=42).y) == \
                outcome(lambda o=b: dataclasses.replace(o, y=42).y)
        for args, kwargs in BAD_CALLS:
            assert outcome(std, *args, **kwargs) == outcome(ours, *args, **kwargs)


@pytest.mark.parametrize("params", PARAMS)
def test_classes_look_alike(params: dict[str, Any]) -> None:
    for std, ours in pairs(params):
        assert std.__doc__ == ours.__doc__
        assert str(inspect.signature(std)) == str(inspect.signature(ours))
        assert std.__match_args__ == ours.__match_args__  # type: ignore[attr-defined]
        assert [(f.name, f.init, f.repr, f.compare) for f in dataclasses.fields(std)] == \
            [(f.name, f.init, f.repr, f.compare) for f in dataclasses.fields(ours)]
        assert repr(std.__dataclass_params__) == repr(ours.__dataclass_params__)  # type: ignore[attr-defined]
        assert (std.__hash__ is None) == (ours.__hash__ is None)
        assert std.y == ours.y == 3      # type: ignore[attr-defined]
        assert dataclasses.is_dataclass(ours)


def test_recursive_repr_and_standard_subclasses() -> None:
    @lite(frozen=True)
    class Node:
        link: Any = None

    node = Node()
    object.__setattr__(node, "link", node)
    assert repr(node).endswith("Node(link=...)")
    base = pairs({"frozen": True})[0][1]

    @dataclasses.dataclass(frozen=True)
    class Sub(base):  # type: ignore[valid-type,misc]
        extra: int = 1

    assert repr(Sub(1)).endswith("Sub(x=1, y=3, z=(), n=0, extra=1)")
    with pytest.raises(FrozenInstanceError):
        Sub(1).extra = 2  # type: ignore[misc]
    with pytest.raises(TypeError, match="non-frozen dataclass from a frozen one"):
        lite(type("Thawed", (base,), {}))
    with pytest.raises(TypeError, match="non-default argument 'b' follows default"):
        @lite
        class Bad:
            a: int = 1
            b: int


def test_explicit_methods_are_kept() -> None:
    @lite(frozen=True)
    class Own:
        a: int = 0

        def __repr__(self) -> str:
            return "own"

        def __hash__(self) -> int:
            return 5

    assert repr(Own()) == "own" and hash(Own(3)) == 5 and Own(1) == Own(1) != Own(2)
    with pytest.raises(TypeError, match="Cannot overwrite attribute __setattr__"):
        @lite(frozen=True)
        class Clash:
            a: int = 0

            def __setattr__(self, name: str, value: Any) -> None:
                pass


def test_post_init_kw_only_and_standard_fallback() -> None:
    seen = []

    @lite(frozen=True, kw_only=True)
    class K:
        a: int
        b: int = 2

        def __post_init__(self) -> None:
            seen.append((self.a, self.b))

    K(a=1)
    assert seen == [(1, 2)]
    with pytest.raises(TypeError, match="takes 1 positional argument but 2 were given"):
        K(1)  # type: ignore[misc]
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'a'"):
        K()  # type: ignore[call-arg]

    @lite(order=True)
    class Ordered:
        a: int = 0

    assert Ordered(1) < Ordered(2)    # order= goes to the standard decorator


@pytest.mark.parametrize("params", PARAMS)
def test_a_class_built_often_gets_a_compiled_init_that_behaves_alike(
        params: dict[str, Any]) -> None:
    for std, ours in pairs(params):
        generic = ours.__init__
        for _ in range(40):
            ours(1)
        assert ours.__init__ is not generic
        for args, kwargs in CALLS:
            a, b = std(*args, **kwargs), ours(*args, **kwargs)
            assert dataclasses.asdict(a) == dataclasses.asdict(b)
            assert list(vars(a)) == list(vars(b))
            assert (a == std(*args, **kwargs)) == (b == ours(*args, **kwargs))
        for args, kwargs in BAD_CALLS:
            assert outcome(std, *args, **kwargs) == outcome(ours, *args, **kwargs)
        assert str(inspect.signature(std)) == str(inspect.signature(ours))
