"""Run-time checks of the package's jaxtyping shape annotations, for the test suite.

``conftest.py`` calls :func:`install` before any test imports ``auto_circuit`` (turn it off
with ``pytest --no-shape-checks``). From then on every function and dataclass of the package
whose signature holds a jaxtyping array type (``Float[Tensor, "batch seq d_model"]``, also
inside ``| None``, ``list[...]``, or an alias such as ``BatchPromptTensor``) runs inside
``jaxtyping.jaxtyped(typechecker=check_shapes)``: each call checks the dtypes, ranks and fixed
sizes of those parameters and of the result, and that each axis name binds one size across
them (the names are documented in ``auto_circuit/vocabulary/axes.py``).

Tests of the package's own error for a wrongly shaped input run it inside :func:`off`.

Only shape-annotated parameters are checked (:func:`check_shapes`): the other annotations
(protocols that test doubles stand in for, ``float`` given an ``int``) are pyright's
business. This is jaxtyping's import hook (``pytest --jaxtyping-packages=...``) narrowed to
what it is for: that hook wraps every function in ``jaxtyped``, which rebuilds the signature
each time a nested function is defined and binds it on every call, and made the suite about
twice as slow; here a function decides once, at its first call, whether it needs checking.

A function or class marked ``@typing.no_type_check`` is left alone.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.abc
import importlib.machinery
import re
import sys
import typing
from collections.abc import Callable, Iterator, Sequence
from types import CodeType, ModuleType
from typing import Any, TypeVar

import jaxtyping
from beartype import beartype
from jaxtyping import AbstractArray, jaxtyped

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

_SHAPED = re.compile(r"\b(Float|Int|Bool|Num|Shaped|Integer|Real|UInt|Inexact)\[")
"""A jaxtyping array type in an annotation that could not be evaluated."""


def _is_shaped(hint: object) -> bool:
    if isinstance(hint, str):
        return bool(_SHAPED.search(hint))
    if isinstance(hint, type) and issubclass(hint, AbstractArray):
        return True
    return any(_is_shaped(arg) for arg in typing.get_args(hint))


def _evaluate(hint: object, namespace: dict[str, Any]) -> object:
    if not isinstance(hint, str):
        return hint
    try:
        return eval(hint, namespace)
    except Exception:
        return hint


def _has_shaped_annotation(annotations: dict[str, Any], namespace: dict[str, Any]) -> bool:
    return any(_is_shaped(_evaluate(hint, namespace)) for hint in annotations.values())


def check_shapes(fn: F) -> F:
    """Beartype jaxtyping's stand-in for a function on its shape-annotated parameters only."""
    hints = getattr(fn, "__annotations__", {})
    shaped = {name: hint for name, hint in hints.items() if _is_shaped(hint)}
    if not shaped:
        return fn
    # ``fn`` is the stand-in jaxtyping builds from the signature, so this edits nothing else.
    fn.__annotations__ = shaped
    return beartype(fn)


def checked(obj: T) -> T:
    """Check ``obj``'s shape annotations at run time (the decorator the hook adds)."""
    if getattr(obj, "__no_type_check__", False):
        return obj
    if isinstance(obj, type):
        return _checked_class(obj)
    if callable(obj):
        return _checked_function(obj)
    return obj


def _checked_class(cls: T) -> T:
    import dataclasses

    assert isinstance(cls, type)
    namespace = vars(sys.modules[cls.__module__])
    annotations = cls.__dict__.get("__annotations__", {})
    if dataclasses.is_dataclass(cls) and _has_shaped_annotation(annotations, namespace):
        cls.__init__ = jaxtyped(cls.__init__, typechecker=check_shapes)  # type: ignore[method-assign]
    return cls  # type: ignore[return-value]


def _checked_function(fn: Callable[..., Any]) -> Any:
    target: Callable[..., Any] | None = None

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        nonlocal target
        if target is None:
            # Decided at the first call, when every name the annotations use is defined.
            shaped = _has_shaped_annotation(getattr(fn, "__annotations__", {}), fn.__globals__)
            target = jaxtyped(fn, typechecker=check_shapes) if shaped else fn
        return target(*args, **kwargs)

    return call


_DECORATOR = "__import__('shape_checks').checked"


class _Decorate(ast.NodeTransformer):
    """Adds :func:`checked` innermost on functions (below ``@staticmethod``, ``@property``)
    and outermost on classes (above ``@dataclass``, so it sees the generated ``__init__``)."""

    def _decorator(self, node: ast.AST) -> ast.expr:
        return ast.copy_location(ast.parse(_DECORATOR, mode="eval").body, node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        self.generic_visit(node)
        node.decorator_list.append(self._decorator(node))
        return node

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> ast.AST:
        self.generic_visit(node)
        node.decorator_list.append(self._decorator(node))
        return node

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        self.generic_visit(node)
        node.decorator_list.insert(0, self._decorator(node))
        return node


class _Loader(importlib.machinery.SourceFileLoader):
    def source_to_code(self, data: Any, path: Any, *, _optimize: int = -1) -> CodeType:
        tree = _Decorate().visit(ast.parse(data, filename=path))
        ast.fix_missing_locations(tree)
        return compile(tree, path, "exec", dont_inherit=True, optimize=_optimize)

    def get_code(self, fullname: str) -> CodeType:
        # Compiled afresh each session: the instrumented code must not go into, nor come
        # from, the __pycache__ that ordinary imports use.
        path = self.get_filename(fullname)
        return self.source_to_code(self.get_data(path), path)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, package: str) -> None:
        self.package = package

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.package and not fullname.startswith(self.package + "."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec
        spec.loader = _Loader(spec.loader.name, spec.loader.path)
        return spec


def install(package: str) -> None:
    """Check the shape annotations of ``package``'s modules as they are imported."""
    if package in sys.modules:
        raise RuntimeError(
            f"{package} was imported before its shape checks were installed, so none of it "
            "would be checked: install them first (conftest.py, before importing it)."
        )
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder(package))


@contextlib.contextmanager
def off() -> Iterator[None]:
    """Turn the checks off, for a test of the package's own error for a wrongly shaped input."""
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", before)


def installed() -> bool:
    """Whether :func:`install` has run in this process."""
    return any(isinstance(finder, _Finder) for finder in sys.meta_path)
