"""The merge engine (DESIGN §8 "Merging"): elementwise merges of models sharing a base, weight
matching for independently trained MLP/CNN, ZipIt!-style merges and feature union for parents
trained on different tasks, multi-teacher distillation, and the streaming safetensors writer.

Importing this package does not import torch: the recipe record and the errors are torch-free
(the node validates recipes), and the torch-side functions load on first access (PEP 562), in
the child process that runs a merge (``node/compute/worker.py``).
"""

from __future__ import annotations

import importlib
from typing import Any

from node.merge.recipe import (
    DATA_METHODS,
    ELEMENTWISE_METHODS,
    MAX_MERGE_PARENTS,
    MAX_STEP_PARAMETERS,
    METHODS,
    SAME_BASE_METHODS,
    BadCoefficients,
    InvalidMergeData,
    InvalidModelFile,
    InvalidRecipe,
    MergeError,
    MergeRecipe,
    MissingBase,
    ParameterCapExceeded,
    ParentMismatch,
    RecipeParam,
    SpecMismatch,
    TooManyParents,
    UnknownMethod,
    UnsupportedFamily,
    check_step_parameters,
    decode_f64,
    encode_f64,
    validate_recipe,
)

_LAZY = {
    **dict.fromkeys(
        (
            "merge_files",
            "merge_tensor",
            "weighted_into",
            "linear",
            "task_arithmetic",
            "ties",
            "trim_top_k",
            "dare",
            "dare_mask",
            "slerp",
            "fixed_sum",
        ),
        "node.merge.methods",
    ),
    **dict.fromkeys(
        (
            "feature_groups",
            "weight_matching",
            "apply_permutations",
            "align_and_merge",
            "align_files",
        ),
        "node.merge.align",
    ),
    **dict.fromkeys(
        ("zipit_merge", "feature_union", "fit_calibration", "union_files"), "node.merge.union"
    ),
    **dict.fromkeys(("distill", "distill_files"), "node.merge.distill"),
    **dict.fromkeys(
        ("write_v1", "write_state_dict", "open_model", "read_header"),
        "node.merge.safetensors_writer",
    ),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'node.merge' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "DATA_METHODS",
    "ELEMENTWISE_METHODS",
    "MAX_MERGE_PARENTS",
    "MAX_STEP_PARAMETERS",
    "METHODS",
    "SAME_BASE_METHODS",
    "BadCoefficients",
    "InvalidMergeData",
    "InvalidModelFile",
    "InvalidRecipe",
    "MergeError",
    "MergeRecipe",
    "MissingBase",
    "ParameterCapExceeded",
    "ParentMismatch",
    "RecipeParam",
    "SpecMismatch",
    "TooManyParents",
    "UnknownMethod",
    "UnsupportedFamily",
    "check_step_parameters",
    "decode_f64",
    "encode_f64",
    "validate_recipe",
    *_LAZY,
]
