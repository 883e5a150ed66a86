"""``node.storage`` loads its names on first use: a pure submodule (CIDs, the artifact format,
encryption) imports without the chain store, its crypto or plyvel — a compute worker's child
computes checkpoint CIDs with ``node.storage.unixfs`` alone — and every exported name still
resolves to its home module's object."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import node.storage as storage


def test_every_exported_name_resolves_to_its_home() -> None:
    assert sorted(storage.__all__) == sorted(storage._HOME_OF)
    for name in storage.__all__:
        home = importlib.import_module(storage._HOME_OF[name])
        assert getattr(storage, name) is getattr(home, name)
    assert set(storage.__all__) <= set(dir(storage))


def test_unknown_names_are_attribute_errors() -> None:
    try:
        storage.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("an unknown name resolved")


def test_a_pure_submodule_does_not_load_the_chain_store() -> None:
    code = (
        "import json, sys; import node.storage.unixfs; "
        "print(json.dumps([m in sys.modules for m in "
        "('node.storage.chain_store', 'node.storage.leveldb', 'plyvel', 'coincurve')]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [False, False, False, False]
