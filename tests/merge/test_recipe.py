"""The merge recipe record: exact float64 coefficients, canonical encoding, each validation rule
with its own error."""

from __future__ import annotations

import struct

import pytest

from node.encoding import pack
from node.merge.recipe import (
    BadCoefficients,
    InvalidRecipe,
    MergeRecipe,
    MissingBase,
    ParameterCapExceeded,
    TooManyParents,
    UnknownMethod,
    decode_f64,
    encode_f64,
    validate_recipe,
)

A, B, C, D, E = (bytes([i]) * 36 for i in range(1, 6))
BASE = b"\x09" * 36


def test_floats_are_exact_big_endian_float64() -> None:
    assert encode_f64(0.1) == struct.pack(">d", 0.1) == bytes.fromhex("3fb999999999999a")
    assert decode_f64(encode_f64(1 / 3)) == 1 / 3
    for bad in (float("nan"), float("inf")):
        with pytest.raises(BadCoefficients):
            encode_f64(bad)
    with pytest.raises(BadCoefficients):
        decode_f64(struct.pack(">d", float("nan")))


def test_round_trip_and_wire_form() -> None:
    recipe = MergeRecipe.create(
        "ties",
        [A, B],
        base=BASE,
        coefficients=[0.5, 0.5],
        params={"scale": 1.0, "density": 0.2},
        seed=b"\x07" * 32,
        platform="any",
    )
    assert [p.name for p in recipe.params] == ["density", "scale"]
    assert recipe.weights == (0.5, 0.5)
    assert recipe.param("density") == 0.2
    assert recipe.param("missing", 3.0) == 3.0
    data = recipe.encode()
    assert MergeRecipe.decode(data) == recipe
    # fields in declared order, floats as 8-byte bins
    assert data == pack(
        (
            "ties",
            (A, B),
            BASE,
            (encode_f64(0.5), encode_f64(0.5)),
            (("density", encode_f64(0.2)), ("scale", encode_f64(1.0))),
            b"\x07" * 32,
            "any",
            b"",
            (),
            (),
        )
    )
    validate_recipe(recipe)


@pytest.mark.parametrize(
    ("recipe", "error", "words"),
    [
        (MergeRecipe.create("average", [A, B], coefficients=[1, 1]), UnknownMethod, "average"),
        (
            MergeRecipe.create("linear", [A, B, C, D, E], coefficients=[0.2] * 5),
            TooManyParents,
            "max_merge_parents = 4",
        ),
        (MergeRecipe.create("linear", [A], coefficients=[1]), InvalidRecipe, "at least 2"),
        (MergeRecipe.create("slerp", [A, B, C], params={"t": 0.5}), InvalidRecipe, "exactly 2"),
        (MergeRecipe.create("linear", [A, A], coefficients=[1, 1]), InvalidRecipe, "twice"),
        (MergeRecipe.create("ties", [A, B], coefficients=[1, 1], params={"density": 0.5}),
         MissingBase, "base"),
        (MergeRecipe.create("dare", [A], coefficients=[1], params={"density": 0.5}),
         MissingBase, "base"),
        (MergeRecipe.create("task_arithmetic", [A, B], coefficients=[1, 1]), MissingBase, "base"),
        (MergeRecipe.create("linear", [A, B], coefficients=[1]), BadCoefficients, "one coefficient"),
        (MergeRecipe.create("ties", [A, B], base=BASE, coefficients=[1, 1]),
         BadCoefficients, "density"),
        (MergeRecipe.create("ties", [A, B], base=BASE, coefficients=[1, 1], params={"density": 0}),
         BadCoefficients, r"\(0, 1\]"),
        (MergeRecipe.create("slerp", [A, B], params={"t": 1.5}), BadCoefficients, r"\[0, 1\]"),
        (MergeRecipe.create("slerp", [A, B], coefficients=[1, 1], params={"t": 0.5}),
         BadCoefficients, "no per-parent"),
        (MergeRecipe.create("linear", [A, B], coefficients=[1, 1], params={"t": 0.5}),
         BadCoefficients, "no parameter 't'"),
        (MergeRecipe.create("weight_matching", [A, B], coefficients=[1, -1]),
         BadCoefficients, "non-negative"),
        (MergeRecipe.create("zipit", [A, B]), InvalidRecipe, "child spec"),
        (MergeRecipe.create("zipit", [A, B], child_spec=b"{}", class_maps=[[0]]),
         InvalidRecipe, "class map"),
        (MergeRecipe.create("linear", [A, b""], coefficients=[1, 1]), InvalidRecipe, "model id"),
    ],
)  # fmt: skip
def test_each_rule_has_its_error(recipe: MergeRecipe, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        validate_recipe(recipe)


def test_parameter_cap_and_configurable_parent_limit() -> None:
    recipe = MergeRecipe.create("linear", [A, B, C, D, E], coefficients=[0.2] * 5)
    validate_recipe(recipe, max_merge_parents=5)
    small = MergeRecipe.create("linear", [A, B], coefficients=[0.5, 0.5])
    validate_recipe(small, child_parameters=100, max_step_parameters=100)
    with pytest.raises(ParameterCapExceeded, match="101 parameters, above the cap of 100"):
        validate_recipe(small, child_parameters=101, max_step_parameters=100)


def test_unsorted_params_on_the_wire_are_refused() -> None:
    recipe = MergeRecipe.create("ties", [A], base=BASE, coefficients=[1], params={"density": 0.5})
    swapped = MergeRecipe(
        recipe.method,
        recipe.parents,
        recipe.base,
        recipe.coefficients,
        (*recipe.params, recipe.params[0]),
        recipe.seed,
        "",
        b"",
        (),
        (),
    )
    with pytest.raises(BadCoefficients, match="sorted"):
        validate_recipe(swapped)


def test_package_exports_resolve() -> None:
    import node.merge

    for name in node.merge.__all__:
        assert getattr(node.merge, name) is not None, name
    with pytest.raises(AttributeError):
        _ = node.merge.no_such_function
