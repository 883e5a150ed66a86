"""The compute market's recipe allow-list: canonical JSON parameters checked against each
recipe's schema (unknown keys, missing keys, types and ranges refused with the field named),
derived step and checkpoint counts, merge parameters as a MergeRecipe, the checkpoint link
chain. Torch-free."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from node.compute.recipes import (
    CKPT_TAG,
    RECIPES,
    InvalidTaskParams,
    UnknownRecipe,
    canonical_params,
    chain_link,
    chain_links,
    chain_start,
    checkpoint_count,
    checkpoint_steps,
    is_elementwise_merge,
    merge_recipe,
    task_steps,
    validate_task_params,
)
from node.errors import InvalidTransaction
from node.merge.recipe import MergeRecipe

SPEC = {"family": "mlp", "input_dim": 64, "hidden": [32], "num_classes": 10}


def train(**over: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "spec": SPEC,
        "dataset": "01" * 34,
        "steps": 100,
        "lr": 0.01,
        "batch_size": 32,
        "optimizer": "adam",
        "seed": 7,
        "checkpoint_every": 30,
    }
    p.update(over)
    return {k: v for k, v in p.items() if v is not None}


def enc(p: dict[str, Any]) -> bytes:
    return canonical_params(p)


def test_allow_list_and_valid_train() -> None:
    assert RECIPES == ("train", "finetune", "merge", "evaluate")
    p = validate_task_params("train", enc(train()))
    assert p["spec"]["activation"] == "relu"  # the spec is parsed and completed
    assert (p["val_fraction"], p["split_seed"], p["devices"], p["momentum"]) == (0.2, 0, 1, 0.9)
    assert task_steps("train", enc(train())) == 100
    assert checkpoint_count("train", enc(train())) == 4
    assert checkpoint_steps("train", enc(train())) == [30, 60, 90, 100]
    assert checkpoint_steps("train", enc(train(checkpoint_every=50))) == [50, 100]
    assert checkpoint_count("train", enc(train(checkpoint_every=50))) == 2


def test_unknown_recipe_is_refused() -> None:
    for name in ("shell", "Train", "exec", ""):
        with pytest.raises(UnknownRecipe):
            validate_task_params(name, enc(train()))
    assert issubclass(UnknownRecipe, InvalidTransaction)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (train(code="import os"), "code"),
        (train(steps=None), "steps"),
        (train(steps=0), "steps"),
        (train(steps=1.5), "steps"),
        (train(steps=True), "steps"),
        (train(lr=0), "lr"),
        (train(lr="0.1"), "lr"),
        (train(batch_size=0), "batch_size"),
        (train(optimizer="lbfgs"), "optimizer"),
        (train(seed=-1), "seed"),
        (train(checkpoint_every=101), "checkpoint_every"),
        (train(dataset="XYZ"), "dataset"),
        (train(dataset="AB"), "dataset"),
        (train(spec={"family": "rnn"}), "spec"),
        (train(spec={**SPEC, "init": "lambda"}), "spec"),
        (train(val_fraction=1.0), "val_fraction"),
        (train(val_fraction=0.1, val_dataset="02"), "val_fraction"),
        (train(devices=3), "devices"),  # 32 rows per step do not split over 3 devices
        (train(devices=0), "devices"),
        (train(momentum=1.0), "momentum"),
    ],
)
def test_train_schema_names_the_field(params: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidTaskParams) as info:
        validate_task_params("train", enc(params))
    assert info.value.field == field
    assert info.value.data == {"field": field}


def test_params_must_be_canonical_json() -> None:
    good = enc(train())
    assert validate_task_params("train", good)
    spaced = json.dumps(train(), sort_keys=True).encode()
    unsorted = json.dumps(dict(reversed(list(train().items()))), separators=(",", ":")).encode()
    for bad in (
        spaced,
        unsorted,
        b"[1,2]",
        b"\x80\x04\x95",  # a pickle
        b'{"lr":NaN}',
        b'{"seed":1,"seed":2}',
        b"{" + b" " * 20000 + b"}",
    ):
        with pytest.raises(InvalidTaskParams):
            validate_task_params("train", bad)
    with pytest.raises(InvalidTaskParams):
        canonical_params({"lr": float("nan")})


def test_finetune_needs_a_model_and_takes_head_only() -> None:
    ft = {k: v for k, v in train().items() if k != "spec"}
    with pytest.raises(InvalidTaskParams) as info:
        validate_task_params("finetune", enc(ft))
    assert info.value.field == "model"
    p = validate_task_params("finetune", enc({**ft, "model": "ab" * 34}))
    assert p["train_head_only"] is False
    with pytest.raises(InvalidTaskParams) as info:
        validate_task_params("finetune", enc({**ft, "model": "ab", "spec": SPEC}))
    assert info.value.field == "spec"  # a finetune's spec is its model's, not a parameter
    with pytest.raises(InvalidTaskParams):
        validate_task_params("finetune", enc({**ft, "model": "ab", "train_head_only": 1}))


def test_evaluate_schema() -> None:
    base = {"model": "aa", "dataset": "bb", "split": "holdout"}
    p = validate_task_params("evaluate", enc(base))
    assert (p["val_fraction"], p["split_seed"], p["x_name"]) == (0.2, 0, "x")
    assert task_steps("evaluate", p) == 0 and checkpoint_count("evaluate", p) == 1
    assert validate_task_params("evaluate", enc({**base, "split": "all"}))["split"] == "all"
    for bad, field in (
        ({**base, "split": "test"}, "split"),
        ({**base, "split": "all", "split_seed": 3}, "split"),
        ({"model": "aa", "split": "all"}, "dataset"),
        ({**base, "steps": 3}, "steps"),
    ):
        with pytest.raises(InvalidTaskParams) as info:
            validate_task_params("evaluate", enc(bad))
        assert info.value.field == field


def test_merge_params_are_a_merge_recipe() -> None:
    p = {
        "method": "ties",
        "parents": ["aa", "bb"],
        "base": "cc",
        "coefficients": [0.5, 0.5],
        "params": {"density": 0.2},
        "seed": "11" * 32,
    }
    parsed = validate_task_params("merge", enc(p))
    assert is_elementwise_merge(parsed) and is_elementwise_merge(enc(p))
    assert task_steps("merge", parsed) == 0 and checkpoint_count("merge", parsed) == 1
    recipe = merge_recipe(parsed)
    assert isinstance(recipe, MergeRecipe)
    assert recipe.parents == (b"\xaa", b"\xbb") and recipe.base == b"\xcc"
    assert recipe.weights == (0.5, 0.5) and recipe.param("density") == 0.2
    assert recipe.seed == b"\x11" * 32
    union = {
        "method": "feature_union",
        "parents": ["aa", "bb"],
        "child_spec": SPEC,
        "class_maps": [[0, 1], [2, 3]],
    }
    assert not is_elementwise_merge(enc(union))
    for bad, field in (
        ({**p, "method": "frankenmerge"}, "method"),
        ({**p, "base": None}, "method"),  # ties needs a base (MissingBase, from the engine)
        ({**p, "params": {"density": 2.0}}, "method"),
        ({**p, "parents": []}, "parents"),
        ({**p, "seed": "11"}, "seed"),
        ({**p, "eval": "x"}, "eval"),
    ):
        bad = {k: v for k, v in bad.items() if v is not None}
        with pytest.raises(InvalidTaskParams) as info:
            validate_task_params("merge", enc(bad))
        assert info.value.field == field


def test_checkpoint_link_chain() -> None:
    task = b"\x07" * 32
    cids = [b"cid-one", b"cid-two", b"cid-three"]
    link0 = hashlib.sha256(CKPT_TAG + task).digest()
    assert chain_start(task) == link0
    links = chain_links(task, cids)
    assert links[0] == hashlib.sha256(CKPT_TAG + link0 + cids[0]).digest()
    assert links[2] == chain_link(chain_link(links[0], cids[1]), cids[2])
    assert chain_links(task, [cids[1], cids[0], cids[2]])[2] != links[2]  # order is bound
    assert chain_links(b"\x08" * 32, cids)[0] != links[0]  # so is the task
    assert chain_links(task, []) == []
