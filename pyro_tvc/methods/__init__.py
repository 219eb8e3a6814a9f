"""Every way to get a predictor from a pool of task vectors, behind one registry (docs/methods.md cites each
method's paper and public code).

A method is ``fit(ctx: MethodContext) -> FitResult`` registered under a name with the protocols it serves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pyro_tvc.methods.base import (FitResult, MethodConfig, MethodContext, Predictor, TaskData)  # noqa: F401

PROTOCOLS = ("target", "addition", "negation")


@dataclass(frozen=True)
class Method:
    """``name``: registry key; ``label``: table label; ``fit``; ``protocols``: which protocols it serves;
    ``learned``: whether it learns anything (zero-shot and fine-tuned do not)."""

    name: str
    label: str
    fit: Callable[[MethodContext], FitResult]
    protocols: tuple[str, ...] = PROTOCOLS
    learned: bool = True
    description: str = ""


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def _load() -> None:
    if _METHODS:
        return
    from pyro_tvc.methods import adamerging, atlas, finetuned, task_arithmetic, ties, vtvc, zero_shot

    for module in (zero_shot, finetuned, task_arithmetic, ties, atlas, adamerging, vtvc):
        module.register_all(register)


def get_method(name: str) -> Method:
    _load()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(_METHODS)}")
    return _METHODS[name]


def method_names(protocol: str | None = None) -> list[str]:
    _load()
    return [n for n, m in _METHODS.items() if protocol is None or protocol in m.protocols]
