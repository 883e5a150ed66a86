"""Multi-teacher distillation into a fresh student (Hinton, Vinyals, Dean 2015; multi-teacher as
in "Knowledge Amalgamation", Shen et al. 2019).

Each teacher's logits are placed in the child's classes by its class map and, when labels are
given, calibrated per teacher (scale and shift, as for stacked heads in ``union.py``) so teachers
that never saw each other's classes become comparable. The student — any spec of the registry,
freshly initialized from the recipe's seed — is trained on the temperature-softened combined
predictions, optionally plus the cross-entropy on the true labels, with the deterministic loop of
``node/compute/finetune.py`` (so its cost is counted the same way as every other training).
Teacher inference counts too: ``teacher_flops`` in the metrics.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from node.compute.architectures import build_model, load_state, state_for_spec
from node.compute.finetune import (
    FinetuneConfig,
    FinetuneResult,
    load_dataset,
    predict,
    split_holdout,
    train,
)
from node.errors import NeuroSeedError
from node.merge.recipe import (
    MAX_MERGE_PARENTS,
    MAX_STEP_PARAMETERS,
    InvalidMergeData,
    InvalidRecipe,
    MergeRecipe,
    validate_recipe,
)
from node.merge.safetensors_writer import WrittenFile, open_model, write_state_dict
from node.merge.union import Calibration, check_class_maps, fit_calibration
from node.models.specs import (
    ModelSpec,
    check_header,
    forward_flops,
    input_shape,
    parameter_count,
    parse_spec,
)

F64 = torch.float64


@dataclass(frozen=True, slots=True)
class DistillFileResult:
    file: WrittenFile
    spec: ModelSpec
    metrics: dict[str, float]


def teacher_logits(
    specs: Sequence[ModelSpec],
    states: Sequence[Mapping[str, torch.Tensor]],
    class_maps: Sequence[Sequence[int]],
    num_classes: int,
    x: torch.Tensor,
) -> list[torch.Tensor]:
    """Per teacher, its logits on ``x`` placed in the child's classes (float64, zero where the
    teacher has no class)."""
    out = []
    for spec, state, cmap in zip(specs, states, class_maps, strict=True):
        model = build_model(spec)
        load_state(model, state)
        z = predict(model, x).to(F64)
        placed = torch.zeros(x.shape[0], num_classes, dtype=F64)
        for j, c in enumerate(cmap):
            placed[:, c] = torch.add(placed[:, c], z[:, j])
        out.append(placed)
    return out


def combine(
    logits: Sequence[torch.Tensor],
    class_maps: Sequence[Sequence[int]],
    num_classes: int,
    calibration: Calibration | None,
) -> torch.Tensor:
    """Σ scaleᵢ·logitsᵢ + shiftᵢ·coverᵢ (identity calibration when none)."""
    total = torch.zeros_like(logits[0])
    for i, (z, cmap) in enumerate(zip(logits, class_maps, strict=True)):
        cover = _cover(cmap, num_classes)
        scale = calibration.scales[i] if calibration else 1.0
        shift = calibration.shifts[i] if calibration else 0.0
        total = torch.add(total, torch.add(torch.mul(z, scale), torch.mul(cover, shift)))
    return total


def distill(
    teacher_specs: Sequence[ModelSpec],
    teacher_states: Sequence[Mapping[str, torch.Tensor]],
    class_maps: Sequence[Sequence[int]],
    student_spec: ModelSpec,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    config: FinetuneConfig,
    *,
    calibration_rows: int = 100,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> tuple[FinetuneResult, dict[str, float]]:
    """Train a fresh ``student_spec`` model on the teachers' combined soft predictions.

    The first ``calibration_rows`` training rows (0: none) fit the per-teacher calibration.
    Returns the training result and extra metrics (teacher accuracy, teacher FLOPs).
    """
    if not teacher_specs:
        raise InvalidRecipe("distillation needs at least one teacher")
    n_classes = student_spec.num_classes
    check_class_maps(teacher_specs, class_maps, n_classes)
    if x_train.shape[0] != y_train.shape[0] or x_train.shape[0] < 2:
        raise InvalidMergeData("distillation needs at least two labelled training rows")
    if student_spec.family != "transformer" and tuple(x_train.shape[1:]) != input_shape(
        student_spec
    ):
        raise InvalidMergeData(
            f"inputs of shape {list(x_train.shape[1:])} do not fit the student's "
            f"{list(input_shape(student_spec))}"
        )
    logits = teacher_logits(teacher_specs, teacher_states, class_maps, n_classes, x_train)
    calibration = None
    rows = min(calibration_rows, x_train.shape[0])
    if rows > 0:
        calibration = fit_calibration(
            [z[:rows] for z in logits],
            [_cover(cm, n_classes).expand(rows, -1) for cm in class_maps],
            y_train[:rows],
        )
    combined = combine(logits, class_maps, n_classes, calibration)
    soft = torch.softmax(combined / config.temperature, dim=1).to(torch.float32)
    teacher_acc = float((combined.argmax(1) == y_train).double().mean())
    student = build_model(student_spec, seed=config.seed)
    result = train(
        student,
        x_train,
        y_train,
        x_val,
        y_val,
        config,
        soft_targets=soft,
        flops_per_example=forward_flops(student_spec),
        progress=progress,
    )
    extra = {
        "teacher_train_accuracy": teacher_acc,
        "teacher_flops": float(sum(forward_flops(s) for s in teacher_specs) * x_train.shape[0]),
    }
    result.metrics.update(extra)
    return result, extra


def _cover(cmap: Sequence[int], num_classes: int) -> torch.Tensor:
    cover = torch.zeros(num_classes, dtype=F64)
    cover[list(cmap)] = 1.0
    return cover


def _seed_int(seed: bytes) -> int:
    return int.from_bytes(hashlib.sha256(b"NeuroSeed/distill/v1" + seed).digest()[:8], "big") >> 1


def distill_files(
    recipe: MergeRecipe,
    specs: Sequence[ModelSpec],
    parent_paths: Sequence[str | os.PathLike[str]],
    data_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    threads: int = 1,
    device: str = "cpu",
    val_fraction: float = 0.2,
    max_merge_parents: int = MAX_MERGE_PARENTS,
    max_step_parameters: int = MAX_STEP_PARAMETERS,
    progress: Callable[[int, int], None] | None = None,
) -> DistillFileResult:
    """Run a ``distill`` recipe on files: the student is the recipe's child spec, the data file
    (``x``, ``y``) is split into training and held-out rows; ``steps``, ``lr``, ``batch_size``
    and ``temperature`` come from the recipe's parameters."""
    if recipe.method != "distill":
        raise InvalidRecipe(f"distill_files runs distill recipes, not {recipe.method}")
    if len(specs) != len(parent_paths) or len(parent_paths) != len(recipe.parents):
        raise InvalidRecipe("one spec and one file per teacher of the recipe are needed")
    student_spec = parse_spec(recipe.child_spec)
    validate_recipe(
        recipe,
        child_parameters=parameter_count(student_spec),
        max_merge_parents=max_merge_parents,
        max_step_parameters=max_step_parameters,
    )
    states = []
    for spec, path in zip(specs, parent_paths, strict=True):
        with open_model(path) as f:
            check_header(spec, f.header)
            states.append(f.state_dict())
    try:
        x, y = load_dataset(data_path)
    except NeuroSeedError as exc:
        raise InvalidMergeData(f"cannot use the distillation data: {exc.message}") from exc
    seed = _seed_int(recipe.seed)
    tr, va = split_holdout(x.shape[0], val_fraction, seed)
    config = FinetuneConfig(
        steps=int(recipe.param("steps", 500.0)),
        lr=recipe.param("lr", 1e-3),
        batch_size=int(recipe.param("batch_size", 64.0)),
        temperature=recipe.param("temperature", 2.0),
        seed=seed,
        threads=threads,
        device=device,
    )
    tr_t, va_t = torch.from_numpy(tr), torch.from_numpy(va)
    result, _ = distill(
        specs,
        states,
        [list(m) for m in recipe.class_maps],
        student_spec,
        x[tr_t],
        y[tr_t],
        x[va_t],
        y[va_t],
        config,
        progress=None if progress is None else (lambda d, t, m: progress(d, t)),
    )
    model = build_model(student_spec)
    load_state(model, result.state)
    written = write_state_dict(output_path, state_for_spec(model, student_spec))
    return DistillFileResult(written, student_spec, result.metrics)
