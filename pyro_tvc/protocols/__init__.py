"""The standard protocols of task-vector composition, each a small registered module:

* ``target`` (target composition, aTLAS / VTVC): compose the *other* tasks' vectors for one target, learn on its
  train split (optionally k shots per class), select on val, report test accuracy;
* ``addition`` (task addition): one composed model for all tasks, learned on the union of the val splits with each
  input's own head; absolute and normalised accuracy (accuracy / fine-tuned accuracy);
* ``negation`` (task negation, aTLAS's protocol): lower a target task's accuracy while a control task keeps
  >= 95 % of its zero-shot accuracy.

A protocol turns ``(workspace, target, seed, config)`` into :class:`~pyro_tvc.methods.MethodContext` objects and
tidy records ``{protocol, method, prediction, task, seed, metric, value}``.
"""
from __future__ import annotations

from pyro_tvc.protocols import addition, negation, target

PROTOCOLS = {"target": target, "addition": addition, "negation": negation}


def get_protocol(name: str):
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
