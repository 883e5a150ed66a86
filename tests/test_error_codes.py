"""Every typed error has its own code: RPC clients map codes back to classes."""

from __future__ import annotations

import importlib
import pkgutil

import node
import rpc
from node.errors import NeuroSeedError
from rpc.errors import RpcError


def _all_error_classes() -> list[type[NeuroSeedError]]:
    for package in (node, rpc):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith("__main__"):
                continue  # runs the CLI
            importlib.import_module(info.name)
    seen: list[type[NeuroSeedError]] = []
    todo: list[type[NeuroSeedError]] = [NeuroSeedError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


def test_error_codes_are_unique() -> None:
    by_code: dict[int, list[str]] = {}
    for cls in _all_error_classes():
        if "code" not in vars(cls):
            continue  # inherits its parent's code on purpose
        if issubclass(cls, RpcError):
            continue  # the SDK's mirror of a node error carries the node error's code
        by_code.setdefault(cls.code, []).append(f"{cls.__module__}.{cls.__qualname__}")
    clashes = {code: names for code, names in by_code.items() if len(set(names)) > 1}
    assert clashes == {}
