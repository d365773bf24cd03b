"""``dataclass`` at a fraction of the standard decorator's declaration cost.

``dataclasses.dataclass`` compiles ``__init__``, ``__repr__``, ``__eq__``, ``__hash__``
and, frozen, ``__setattr__``/``__delattr__`` from source text for every class: about
0.8 ms a class, most of a command line's start-up when it declares dozens of protocol
messages.  Here the standard module still collects the fields (so ``fields``,
``replace``, ``asdict``, ``is_dataclass``, ``__match_args__`` and the class defaults are
its own), and the methods are shared closures with the standard behaviour (Python
library reference, :mod:`dataclasses`): the same frozen checks and
``FrozenInstanceError``, equality on the compared fields for the same class, hash of
those fields, repr of the ``repr=True`` fields.  ``order``, ``unsafe_hash``, ``slots``,
``weakref_slot`` and ``InitVar`` fields go to the standard decorator unchanged.
"""

from __future__ import annotations

import _thread
import dataclasses
from collections.abc import Callable
from operator import attrgetter
from typing import Any, TypeVar, cast, dataclass_transform, overload
from weakref import WeakSet

__all__ = ["dataclass"]

_C = TypeVar("_C", bound=type)
_MISSING: Any = dataclasses.MISSING
_FrozenInstanceError = dataclasses.FrozenInstanceError
_STANDARD_ONLY = ("order", "unsafe_hash", "slots", "weakref_slot")
_LOCK = _thread.RLock()     # a frozen base's flag is lowered while the fields are collected
_set = object.__setattr__
_repr_running: set[tuple[int, int]] = set()
_DONE: WeakSet[type] = WeakSet()  # classes declared here (so no InitVar pseudo-fields)
_NEED: Any = object()        # __init__: a value the caller or a default_factory must give
_HOT = 32                    # calls of a class's generic __init__ before it is compiled


@overload
def dataclass(cls: _C, /) -> _C: ...


@overload
def dataclass(*, init: bool = True, repr: bool = True, eq: bool = True, order: bool = False,
              unsafe_hash: bool = False, frozen: bool = False, match_args: bool = True,
              kw_only: bool = False, slots: bool = False, weakref_slot: bool = False,
              ) -> Callable[[_C], _C]: ...


@dataclass_transform(field_specifiers=(dataclasses.field, dataclasses.Field))
def dataclass(cls: Any = None, /, **params: Any) -> Any:
    """``dataclasses.dataclass``, same parameters and behaviour, cheaper to declare."""
    def wrap(c: _C) -> _C:
        if any(params.get(k) for k in _STANDARD_ONLY) or _has_initvar(c):
            return cast(_C, dataclasses.dataclass(c, **params))
        return _process(c, **params)
    return wrap if cls is None else wrap(cls)


def _is_initvar(annotation: Any) -> bool:
    return (annotation is dataclasses.InitVar or isinstance(annotation, dataclasses.InitVar)
            or (isinstance(annotation, str) and "InitVar" in annotation))


def _has_initvar(cls: type) -> bool:
    own = cls.__dict__.get("__annotations__", {}).values()
    inherited = (f.type for b in cls.__mro__[1:] if b not in _DONE
                 for f in b.__dict__.get("__dataclass_fields__", {}).values())
    return any(_is_initvar(a) for a in own) or any(_is_initvar(a) for a in inherited)


def _process(cls: _C, *, init: bool = True, repr: bool = True, eq: bool = True,
             frozen: bool = False, match_args: bool = True, kw_only: bool = False,
             **standard: Any) -> _C:
    bases = [b for b in cls.__mro__[-1:0:-1] if "__dataclass_fields__" in b.__dict__]
    frozen_bases = [b.__dict__["__dataclass_params__"] for b in bases
                    if b.__dict__["__dataclass_params__"].frozen]
    if bases and frozen_bases and not frozen:
        raise TypeError("cannot inherit non-frozen dataclass from a frozen one")
    if bases and not frozen_bases and frozen:
        raise TypeError("cannot inherit frozen dataclass from a non-frozen one")
    class_hash = cls.__dict__.get("__hash__", _MISSING)
    explicit_hash = not (class_hash is _MISSING
                         or (class_hash is None and "__eq__" in cls.__dict__))
    needs_doc = not cls.__dict__.get("__doc__")
    if needs_doc:
        cls.__doc__ = "-"               # the standard signature text is made on demand
    with _LOCK:
        for p in frozen_bases:
            p.frozen = False            # the standard checks were made above
        try:
            dataclasses.dataclass(cls, init=False, repr=False, eq=False, frozen=False,
                                  match_args=match_args, kw_only=kw_only)
        finally:
            for p in frozen_bases:
                p.frozen = True
    params = cls.__dict__["__dataclass_params__"]
    params.init, params.repr, params.eq, params.frozen = init, repr, eq, frozen
    fields = dataclasses.fields(cls)
    if init:
        _install(cls, "__init__", _init_fn(cls, fields, frozen))
    if repr:
        _install(cls, "__repr__", _repr_fn(tuple(f.name for f in fields if f.repr)))
    if eq:
        _install(cls, "__eq__", _eq_fn(tuple(f.name for f in fields if f.compare)))
    if frozen:
        names = frozenset(f.name for f in fields)
        for fn in (_setattr_fn(cls, names), _delattr_fn(cls, names)):
            if _install(cls, fn.__name__, fn):
                raise TypeError(f"Cannot overwrite attribute {fn.__name__} "
                                f"in class {cls.__name__}")
    if eq and not explicit_hash:
        if frozen:
            hashed = tuple(f.name for f in fields if (f.compare if f.hash is None else f.hash))
            type.__setattr__(cls, "__hash__", _qualify(cls, _hash_fn(hashed)))
        else:
            type.__setattr__(cls, "__hash__", None)
    if init and "__signature__" not in cls.__dict__:
        type.__setattr__(cls, "__signature__", _LazySignature(cls))
    if needs_doc:
        type.__setattr__(cls, "__doc__", _LazyDoc(cls))
    _DONE.add(cls)
    return cls


def _qualify(cls: type, fn: Callable[..., Any]) -> Callable[..., Any]:
    fn.__qualname__ = f"{cls.__qualname__}.{fn.__name__}"
    return fn


def _install(cls: type, name: str, fn: Callable[..., Any]) -> bool:
    """Set ``cls.name`` unless the class defines it (True then), as the standard does."""
    if name in cls.__dict__:
        return True
    setattr(cls, name, _qualify(cls, fn))
    return False


# -- the generic methods ---------------------------------------------------------------------

def _init_fn(cls: type, fields: tuple[dataclasses.Field[Any], ...],
             frozen: bool) -> Callable[..., None]:
    positional = tuple(f.name for f in fields if f.init and not f.kw_only)
    keyword_only = frozenset(f.name for f in fields if f.init and f.kw_only)
    accepted = frozenset(positional) | keyword_only
    seen_default = False
    for f in fields:
        if f.init and not f.kw_only:
            has_default = f.default is not _MISSING or f.default_factory is not _MISSING
            if seen_default and not has_default:
                raise TypeError(f"non-default argument {f.name!r} follows default argument")
            seen_default = seen_default or has_default
    required_order = tuple(f.name for f in fields if f.init and f.default is _MISSING
                           and f.default_factory is _MISSING)
    required = frozenset(required_order)
    n_required = len(required - keyword_only)
    takes = (f"{n_required + 1} positional argument{'s' if n_required else ''}"
             if n_required == len(positional)
             else f"from {n_required + 1} to {len(positional) + 1} positional arguments")
    where = f"{cls.__qualname__}.__init__()"
    # what __init__ assigns, in field order: the init fields (given, or their default) and
    # the others with a default_factory; _NEED marks a required or factory-made value
    template = {f.name: f.default if f.init and f.default is not _MISSING else _NEED
                for f in fields if f.init or f.default_factory is not _MISSING}
    factories = tuple((f.name, cast(Callable[[], Any], f.default_factory)) for f in fields
                      if f.default_factory is not _MISSING)
    post_init = hasattr(cls, "__post_init__")
    # frozen: the standard writes with object.__setattr__, i.e. into __dict__ (unless a
    # class attribute of that name is a data descriptor)
    direct = frozen and cls.__dictoffset__ != 0 and not any(
        hasattr(type(getattr(cls, n, None)), "__set__") for n in template)
    assign = _set if frozen else setattr
    calls = 0

    def __init__(self: Any, /, *args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == _HOT and cls.__dict__.get("__init__") is __init__:
            type.__setattr__(cls, "__init__", _compiled_init(cls, fields, direct, frozen))
        values = template.copy()
        if args:
            if len(args) > len(positional):
                raise TypeError(f"{where} takes {takes} but {len(args) + 1} were given")
            values.update(zip(positional, args, strict=False))
        if kwargs:
            if not accepted.issuperset(kwargs):
                key = next(k for k in kwargs if k not in accepted)
                raise TypeError(f"{where} got an unexpected keyword argument {key!r}")
            if args and not kwargs.keys().isdisjoint(positional[:len(args)]):
                key = next(k for k in positional[:len(args)] if k in kwargs)
                raise TypeError(f"{where} got multiple values for argument {key!r}")
            values.update(kwargs)
        if required and _NEED in values.values():
            missing = [n for n in required_order if values[n] is _NEED]
            if missing:
                raise TypeError(_missing(where, missing, keyword_only))
        for name, factory in factories:
            if values[name] is _NEED:
                values[name] = factory()
        if direct:
            self.__dict__.update(values)
        else:
            for name, value in values.items():
                assign(self, name, value)
        if post_init:
            self.__post_init__()
    return __init__


def _compiled_init(cls: type, fields: tuple[dataclasses.Field[Any], ...], direct: bool,
                   frozen: bool) -> Callable[..., None]:
    """The ``__init__`` the standard decorator would compile, for a class built often: the
    same parameters, assignments in field order and ``__post_init__`` call."""
    me = "__dataclass_self__" if any(f.name == "self" for f in fields) else "self"
    ns: dict[str, Any] = {"_NEED": _NEED, "_set": _set}
    params: list[str] = [me]
    kw_only: list[str] = []
    body = ["_d = " + me + ".__dict__"] if direct else []
    for f in fields:
        n = f.name
        if f.default_factory is not _MISSING:
            ns["_fact_" + n] = f.default_factory
            value = f"_fact_{n}() if {n} is _NEED else {n}" if f.init else f"_fact_{n}()"
        elif f.init:
            value = n
        else:
            continue                      # the class attribute is its default
        if f.init:
            if f.default is not _MISSING:
                ns["_dflt_" + n] = f.default
            default = ("=_NEED" if f.default_factory is not _MISSING
                       else f"=_dflt_{n}" if f.default is not _MISSING else "")
            (kw_only if f.kw_only else params).append(n + default)
        body.append(f"_d[{n!r}] = {value}" if direct else
                    f"_set({me}, {n!r}, {value})" if frozen else f"{me}.{n} = {value}")
    if hasattr(cls, "__post_init__"):
        body.append(me + ".__post_init__()")
    signature = ", ".join(params + (["*", *kw_only] if kw_only else []))
    exec(f"def __init__({signature}):\n    " + "\n    ".join(body or ["pass"]), ns)
    fn = ns["__init__"]
    fn.__code__ = fn.__code__.replace(co_qualname=f"{cls.__qualname__}.__init__")
    fn.__qualname__ = f"{cls.__qualname__}.__init__"
    return fn  # type: ignore[no-any-return]


def _missing(where: str, missing: list[str], keyword_only: frozenset[str]) -> str:
    """Python's own wording for missing arguments (positional ones first)."""
    for kind, names in (("positional", [m for m in missing if m not in keyword_only]),
                        ("keyword-only", [m for m in missing if m in keyword_only])):
        if names:
            quoted = [repr(n) for n in names]
            listed = (quoted[0] if len(quoted) == 1 else
                      f"{quoted[0]} and {quoted[1]}" if len(quoted) == 2 else
                      ", ".join(quoted[:-1]) + f", and {quoted[-1]}")
            plural = "s" if len(names) > 1 else ""
            return f"{where} missing {len(names)} required {kind} argument{plural}: {listed}"
    return where


def _repr_fn(names: tuple[str, ...]) -> Callable[[Any], str]:
    def __repr__(self: Any) -> str:
        key = (id(self), _thread.get_ident())
        if key in _repr_running:
            return "..."
        _repr_running.add(key)
        try:
            body = ", ".join(f"{n}={getattr(self, n)!r}" for n in names)
        finally:
            _repr_running.discard(key)
        return f"{self.__class__.__qualname__}({body})"
    return __repr__


def _values_fn(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """obj -> the tuple of its *names* attributes."""
    if len(names) >= 2:
        return attrgetter(*names)
    if names:
        one = attrgetter(names[0])
        return lambda obj: (one(obj),)
    return lambda obj: ()


def _eq_fn(names: tuple[str, ...]) -> Callable[[Any, Any], Any]:
    values = _values_fn(names)

    def __eq__(self: Any, other: Any) -> Any:
        if other.__class__ is self.__class__:
            return values(self) == values(other)
        return NotImplemented
    return __eq__


def _hash_fn(names: tuple[str, ...]) -> Callable[[Any], int]:
    values = _values_fn(names)

    def __hash__(self: Any) -> int:
        return hash(values(self))
    return __hash__


def _setattr_fn(cls: type[Any], names: frozenset[str]) -> Callable[[Any, str, Any], None]:
    def __setattr__(self: Any, name: str, value: Any) -> None:
        if type(self) is cls or name in names:
            raise _FrozenInstanceError(f"cannot assign to field {name!r}")
        super(cls, self).__setattr__(name, value)
    return __setattr__


def _delattr_fn(cls: type[Any], names: frozenset[str]) -> Callable[[Any, str], None]:
    def __delattr__(self: Any, name: str) -> None:
        if type(self) is cls or name in names:
            raise _FrozenInstanceError(f"cannot delete field {name!r}")
        super(cls, self).__delattr__(name)
    return __delattr__


# -- what inspect and help see ---------------------------------------------------------------

def _signature(cls: type) -> Any:
    """The signature the standard ``__init__`` would have (``self`` left out)."""
    import inspect
    kinds = inspect.Parameter
    params = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = (f.default if f.default is not _MISSING
                   else _FACTORY if f.default_factory is not _MISSING else kinds.empty)
        kind = kinds.KEYWORD_ONLY if f.kw_only else kinds.POSITIONAL_OR_KEYWORD
        params.append(kinds(f.name, kind, default=default, annotation=f.type))
    return inspect.Signature(params, return_annotation=None)


class _Factory:
    def __repr__(self) -> str:
        return "<factory>"


_FACTORY = _Factory()


class _LazySignature:
    """``cls.__signature__`` for ``inspect.signature(cls)``, built when first asked (and
    only for *cls*: a subclass's own ``__init__`` speaks for the subclass)."""

    __slots__ = ("home", "sig")

    def __init__(self, home: type) -> None:
        self.home, self.sig = home, None

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is not None or owner is not self.home:
            raise AttributeError("__signature__")
        if self.sig is None:
            self.sig = _signature(self.home)
        return self.sig


class _LazyDoc:
    """The standard docstring of an undocumented dataclass, ``Name(signature)``."""

    __slots__ = ("home",)

    def __init__(self, home: type) -> None:
        self.home = home

    def __get__(self, obj: object, owner: type | None = None) -> str:
        import inspect
        try:
            text = str(inspect.signature(self.home)).replace(" -> None", "")
        except (TypeError, ValueError):
            text = ""
        doc = self.home.__name__ + text
        type.__setattr__(self.home, "__doc__", doc)
        return doc
