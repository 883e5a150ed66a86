"""ZipIt!-style merge and feature union: exact identities that pin the construction, the greedy
matching by hand, calibration, and the digits 0–4 + 5–9 → 0–9 case end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from node.compute.architectures import build_model, load_model, load_state
from node.compute.finetune import FinetuneConfig, train
from node.merge.recipe import (
    InvalidMergeData,
    InvalidRecipe,
    MergeRecipe,
    ParameterCapExceeded,
    SpecMismatch,
    UnsupportedFamily,
)
from node.merge.safetensors_writer import write_state_dict
from node.merge.union import (
    child_spec_for,
    feature_union,
    merge_matrices,
    union_files,
    zip_groups,
    zipit_merge,
)
from node.models.specs import ModelSpec, parse_spec, spec_json
from tests.merge.helpers import digit_halves, digits, loss_and_accuracy, mlp

CNN5 = parse_spec(
    {"family": "cnn", "in_channels": 1, "image_size": 8, "channels": [6, 5], "num_classes": 3}
)
MAPS = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def _logits(spec: ModelSpec, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    model = build_model(spec)
    load_state(model, state)
    model.eval()
    with torch.no_grad():
        logits: torch.Tensor = model(x).double()
    return logits


def test_zip_groups_by_hand() -> None:
    corr = np.array(
        [
            [1.0, 0.1, 0.9, 0.2],
            [0.1, 1.0, 0.3, 0.8],
            [0.9, 0.3, 1.0, 0.0],
            [0.2, 0.8, 0.0, 1.0],
        ]
    )
    assert zip_groups(corr, 2, 2) == [[0, 2], [1, 3]]
    # within-model pairs are allowed: units 0 and 1 of the same parent
    corr2 = np.array(
        [
            [1.0, 0.95, 0.1, 0.2],
            [0.95, 1.0, 0.1, 0.1],
            [0.1, 0.1, 1.0, 0.5],
            [0.2, 0.1, 0.5, 1.0],
        ]
    )
    assert zip_groups(corr2, 2, 2) == [[0, 1], [2, 3]]
    # ties go to the lowest index pair
    assert zip_groups(np.ones((4, 4)), 2, 2) == [[0, 1], [2, 3]]
    merge, unmerge = merge_matrices([[0, 2], [1, 3]], 4)
    assert merge.tolist() == [[0.5, 0, 0.5, 0], [0, 0.5, 0, 0.5]]
    assert unmerge.tolist() == [[1, 0], [0, 1], [1, 0], [0, 1]]
    with pytest.raises(InvalidMergeData):
        zip_groups(corr, 5, 2)


@pytest.mark.parametrize("spec", [mlp([9, 7], 3), CNN5], ids=["mlp", "cnn"])
def test_feature_union_computes_exactly_the_stacked_parents(spec: ModelSpec) -> None:
    a = build_model(spec, seed=1).state_dict()
    b = build_model(spec, seed=2).state_dict()
    maps = [[0, 2, 4], [1, 3, 4]]  # class 4 is fed by both parents: logits add
    result = feature_union([spec, spec], [a, b], maps, 5)
    assert result.spec == child_spec_for("feature_union", [spec, spec], 5)
    x = torch.rand(6, 64)
    got = _logits(result.spec, result.state, x)
    la, lb = _logits(spec, a, x), _logits(spec, b, x)
    want = torch.zeros(6, 5, dtype=torch.float64)
    for j in range(3):
        want[:, maps[0][j]] += la[:, j]
        want[:, maps[1][j]] += lb[:, j]
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("spec", [mlp([9, 7], 3), CNN5], ids=["mlp", "cnn"])
def test_zipit_of_a_model_with_itself_is_that_model(spec: ModelSpec) -> None:
    """Copies correlate perfectly unit by unit, so each unit merges with its copy and the child
    computes the parent's function (on both parents' class slots)."""
    a = build_model(spec, seed=1).state_dict()
    x = torch.rand(40, 64)
    result = zipit_merge([spec, spec], [a, a], x, [[0, 1, 2], [3, 4, 5]], 6)
    assert result.spec == child_spec_for("zipit", [spec, spec], 6)
    got = _logits(result.spec, result.state, x)
    la = _logits(spec, a, x)
    assert torch.allclose(got[:, :3], la, atol=1e-5)
    assert torch.allclose(got[:, 3:], la, atol=1e-5)


def test_digits_halves_merge_then_transfer_learn() -> None:
    spec, a, b = digit_halves()
    xt, yt, xv, yv = digits()
    slice_ = (xt[:100], yt[:100])
    zipped = zipit_merge([spec, spec], [a, b], xt[:100], MAPS, 10, calibration_data=slice_)
    union = feature_union([spec, spec], [a, b], MAPS, 10, calibration_data=slice_)
    assert zipped.spec == mlp([32, 32], 10)
    assert union.spec == mlp([64, 64], 10)
    for result in (zipped, union):
        assert result.calibration is not None
        assert all(s > 0 for s in result.calibration.scales)
        assert result.metrics["slice_accuracy"] >= result.metrics["slice_accuracy_uncalibrated"]
        before = loss_and_accuracy(result.spec, result.state, xv, yv)[1]
        assert before > 0.75  # the parents' features already separate most of the 10 digits
        model = build_model(result.spec)
        load_state(model, result.state)
        tuned = train(model, xt, yt, xv, yv, FinetuneConfig(steps=150, lr=3e-3, seed=0))
        assert tuned.metrics["val_accuracy"] > max(before, 0.93)
    # a child from untrained parents starts near chance (the protocol's control)
    fresh = [build_model(spec, seed=s).state_dict() for s in (7, 8)]
    control = zipit_merge([spec, spec], fresh, xt[:100], MAPS, 10, calibration_data=slice_)
    assert loss_and_accuracy(control.spec, control.state, xv, yv)[1] < 0.5


def test_incompatible_parents_and_data_are_refused() -> None:
    spec = mlp([9, 7], 3)
    a = build_model(spec, seed=1).state_dict()
    x = torch.rand(10, 64)
    with pytest.raises(SpecMismatch, match="equal widths"):
        zipit_merge([spec, mlp([9, 8], 3)], [a, a], x, [[0, 1, 2]] * 2, 3)
    with pytest.raises(SpecMismatch, match="hidden layers"):
        feature_union([spec, mlp([9], 3)], [a, a], [[0, 1, 2]] * 2, 3)
    with pytest.raises(SpecMismatch, match="architecture"):
        feature_union([spec, CNN5], [a, a], [[0, 1, 2]] * 2, 3)
    tr = parse_spec(
        {
            "family": "transformer",
            "vocab_size": 20,
            "max_len": 8,
            "d_model": 8,
            "n_heads": 2,
            "n_layers": 1,
            "d_ff": 16,
            "num_classes": 3,
        }
    )
    with pytest.raises(UnsupportedFamily):
        zipit_merge([tr, tr], [a, a], x, [[0, 1, 2]] * 2, 3)
    with pytest.raises(InvalidRecipe, match="class map"):
        feature_union([spec, spec], [a, a], [[0, 1], [0, 1, 2]], 3)
    with pytest.raises(InvalidRecipe, match="leaves"):
        feature_union([spec, spec], [a, a], [[0, 1, 2], [0, 1, 3]], 3)
    with pytest.raises(InvalidMergeData, match="labels"):
        feature_union(
            [spec, spec], [a, a], [[0, 1, 2]] * 2, 3, calibration_data=(x, torch.full((10,), 7))
        )


def test_union_files_checks_the_recipe_child_spec_and_cap(tmp_path: Path) -> None:
    spec, a, b = digit_halves()
    xt, yt, _, _ = digits()
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_state_dict(pa, a)
    write_state_dict(pb, b)
    data = tmp_path / "slice.safetensors"
    save_file({"x": xt[:100].contiguous(), "y": yt[:100].contiguous()}, str(data))
    child = mlp([32, 32], 10)
    recipe = MergeRecipe.create("zipit", [b"a", b"b"], child_spec=spec_json(child), class_maps=MAPS)
    out = union_files(recipe, [spec, spec], [pa, pb], data, tmp_path / "child.safetensors")
    assert out.spec == child
    assert out.metrics["slice_accuracy"] > 0.8
    load_model(child, out.file.path)
    wrong = MergeRecipe.create(
        "zipit", [b"a", b"b"], child_spec=spec_json(mlp([64, 64], 10)), class_maps=MAPS
    )
    with pytest.raises(SpecMismatch, match="child spec"):
        union_files(wrong, [spec, spec], [pa, pb], data, tmp_path / "w.safetensors")
    union = MergeRecipe.create(
        "feature_union", [b"a", b"b"], child_spec=spec_json(mlp([64, 64], 10)), class_maps=MAPS
    )
    with pytest.raises(ParameterCapExceeded):
        union_files(
            union,
            [spec, spec],
            [pa, pb],
            data,
            tmp_path / "u.safetensors",
            max_step_parameters=5000,
        )
    assert not (tmp_path / "w.safetensors").exists()
    assert not (tmp_path / "u.safetensors").exists()
