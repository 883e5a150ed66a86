"""Multi-teacher distillation: two teachers on digits 0–4 and 5–9 teach a fresh, smaller
student all ten digits; the run is reproducible and its cost is reported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from node.compute.architectures import load_model
from node.compute.finetune import FinetuneConfig, evaluate
from node.merge.distill import distill, distill_files
from node.merge.recipe import InvalidMergeData, InvalidRecipe, MergeRecipe
from node.merge.safetensors_writer import write_state_dict
from node.models.specs import forward_flops, spec_json
from tests.merge.helpers import digit_halves, digits, mlp

MAPS = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def test_two_teachers_teach_a_fresh_student_reproducibly() -> None:
    spec, a, b = digit_halves()
    xt, yt, xv, yv = digits()
    student = mlp([32], 10)
    config = FinetuneConfig(steps=300, lr=0.01, temperature=2.0, seed=3)
    result, extra = distill([spec, spec], [a, b], MAPS, student, xt, yt, xv, yv, config)
    assert result.metrics["val_accuracy"] > 0.85
    assert extra["teacher_train_accuracy"] > 0.85
    assert extra["teacher_flops"] == 2 * forward_flops(spec) * xt.shape[0]
    assert result.metrics["train_flops"] == 3 * forward_flops(student) * 64 * 300
    again, _ = distill([spec, spec], [a, b], MAPS, student, xt, yt, xv, yv, config)
    assert all(torch.equal(result.state[k], again.state[k]) for k in result.state)


def test_distill_input_checks() -> None:
    spec, a, b = digit_halves()
    xt, yt, xv, yv = digits()
    config = FinetuneConfig(steps=1, lr=0.01)
    with pytest.raises(InvalidRecipe, match="class map"):
        distill([spec, spec], [a, b], [[0, 1]], mlp([8], 10), xt, yt, xv, yv, config)
    with pytest.raises(InvalidMergeData, match="do not fit"):
        distill([spec], [a], MAPS[:1], mlp([8], 10), xt[:, :10], yt, xv, yv, config)


def test_distill_files(tmp_path: Path) -> None:
    spec, a, b = digit_halves()
    xt, yt, _, _ = digits()
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    write_state_dict(paths[0], a)
    write_state_dict(paths[1], b)
    data = tmp_path / "data.safetensors"
    save_file({"x": xt.contiguous(), "y": yt.contiguous()}, str(data))
    student = mlp([16], 10)
    recipe = MergeRecipe.create(
        "distill",
        [b"a", b"b"],
        params={"steps": 200, "lr": 0.01, "temperature": 2.0},
        seed=b"\x01" * 32,
        child_spec=spec_json(student),
        class_maps=MAPS,
    )
    out = distill_files(recipe, [spec, spec], paths, data, tmp_path / "student.safetensors")
    assert out.spec == student
    assert out.metrics["val_accuracy"] > 0.8
    model = load_model(student, out.file.path)
    assert evaluate(model, xt, yt)[1] > 0.8
