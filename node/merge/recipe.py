"""The merge recipe record and its validation, plus the merge engine's errors (DESIGN §8).

A ``MergeRecipe`` says exactly how a child model was made from its parents: the method, the
parents (model ids, in order), the recorded base for methods that need task vectors, one float64
coefficient per parent, named float64 parameters (``density``, ``scale``, ``t``), a 32-byte seed
(DARE's masks, training), the platform of training-based steps, and for data-based merges the
child spec, the class map of each parent and the datasets used. It is a canonical msgpack
record, so a model registration can carry it and anyone can re-run it. Floats travel as 8-byte
big-endian IEEE-754 (the encoding has no floats; bytes keep them exact).

This module is torch-free: the node validates recipes without importing torch. Error codes
3010–3029.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from node.encoding import Record, limit
from node.errors import NeuroSeedError
from node.types import ZERO_HASH, Hash32

# --- errors (3010–3029) ------------------------------------------------------------------------


class MergeError(NeuroSeedError):
    """Base of the merge engine's errors."""

    code = 3010
    reason = "merge failed"


class InvalidRecipe(MergeError):
    code = 3011
    reason = "invalid merge recipe"


class UnknownMethod(InvalidRecipe):
    code = 3012
    reason = "unknown merge method"


class TooManyParents(InvalidRecipe):
    code = 3013
    reason = "more parents than max_merge_parents"


class MissingBase(InvalidRecipe):
    code = 3014
    reason = "this merge method needs the parents' recorded base"


class ParameterCapExceeded(InvalidRecipe):
    code = 3015
    reason = "the merge step exceeds the parameter cap"


class BadCoefficients(InvalidRecipe):
    """Coefficients or parameters missing, repeated, not finite or out of range."""

    code = 3016
    reason = "invalid merge coefficients"


class ParentMismatch(MergeError):
    """Parents (or the base) whose tensors differ in names, shapes or dtypes."""

    code = 3017
    reason = "the parents do not have the same tensors"


class InvalidModelFile(MergeError):
    """An input that is not a readable safetensors model (a pickle, a truncated file, ...)."""

    code = 3018
    reason = "not a safetensors model file"


class UnsupportedFamily(MergeError):
    code = 3019
    reason = "this merge method does not support the model family"


class InvalidMergeData(MergeError):
    """A data slice for a data-based merge (ZipIt!, calibration, distillation) that is unusable."""

    code = 3020
    reason = "invalid data for the merge"


class SpecMismatch(MergeError):
    """Parents whose specs cannot be merged by the chosen method."""

    code = 3021
    reason = "the parents' specs are not compatible"


# --- constants ---------------------------------------------------------------------------------

MAX_MERGE_PARENTS = 4
"""Default ``max_merge_parents``: at most this many parents per step (the inverted tree)."""
MAX_STEP_PARAMETERS = 1_000_000_000
"""Default parameter cap of a merge step's child (a chain parameter overrides it)."""
MAX_ID_BYTES = 64
"""A parent or base id is a model id (a binary CID) of at most this many bytes."""

ELEMENTWISE_METHODS = frozenset({"linear", "task_arithmetic", "ties", "dare", "slerp"})
"""Methods computed elementwise in float64 (byte-reproducible across threads and CPUs)."""
SAME_BASE_METHODS = frozenset({"task_arithmetic", "ties", "dare"})
"""Methods that subtract the recorded base (task vectors): a base is required."""
DATA_METHODS = frozenset({"zipit", "feature_union", "distill"})
"""Methods that look at data and produce a child of a new spec."""
METHODS = ELEMENTWISE_METHODS | DATA_METHODS | {"weight_matching"}

_PARAMS: dict[str, frozenset[str]] = {
    "linear": frozenset(),
    "task_arithmetic": frozenset({"scale"}),
    "ties": frozenset({"density", "scale"}),
    "dare": frozenset({"density", "scale"}),
    "slerp": frozenset({"t"}),
    "weight_matching": frozenset(),
    "zipit": frozenset(),
    "feature_union": frozenset(),
    "distill": frozenset({"temperature", "steps", "lr", "batch_size"}),
}
_REQUIRED_PARAMS: dict[str, frozenset[str]] = {
    "ties": frozenset({"density"}),
    "dare": frozenset({"density"}),
    "slerp": frozenset({"t"}),
}
_PARENT_RANGE: dict[str, tuple[int, int | None]] = {
    "linear": (2, None),
    "task_arithmetic": (1, None),
    "ties": (1, None),
    "dare": (1, None),
    "slerp": (2, 2),
    "weight_matching": (2, None),
    "zipit": (2, None),
    "feature_union": (2, None),
    "distill": (1, None),
}
_WITH_COEFFICIENTS = frozenset({"linear", "task_arithmetic", "ties", "dare", "weight_matching"})

_F64 = struct.Struct(">d")


def encode_f64(value: float) -> bytes:
    """A finite float as its 8 big-endian IEEE-754 bytes."""
    x = float(value)
    if not math.isfinite(x):
        raise BadCoefficients(f"{value!r} is not a finite number")
    return _F64.pack(x)


def decode_f64(data: bytes) -> float:
    if type(data) is not bytes or len(data) != 8:
        raise BadCoefficients("a float64 is 8 bytes")
    (x,) = _F64.unpack(data)
    if not math.isfinite(x):
        raise BadCoefficients("a coefficient is not a finite number")
    return float(x)


# --- records -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecipeParam(Record):
    """A named float64 parameter of a method (``density``, ``scale``, ``t``, ...)."""

    name: str = field(metadata=limit(32))
    value: bytes = field(metadata=limit(8))


@dataclass(frozen=True, slots=True)
class MergeRecipe(Record):
    """How a child model was made from its parents (see the module docstring)."""

    method: str = field(metadata=limit(32))
    parents: tuple[bytes, ...] = field(metadata=limit(16))
    base: bytes | None = field(metadata=limit(MAX_ID_BYTES))
    coefficients: tuple[bytes, ...] = field(metadata=limit(16))
    params: tuple[RecipeParam, ...] = field(metadata=limit(8))
    seed: Hash32
    platform: str = field(metadata=limit(256))
    child_spec: bytes = field(metadata=limit(4096))
    """Canonical spec JSON of the child for data-based methods; empty: the parents' spec."""
    class_maps: tuple[tuple[int, ...], ...] = field(metadata=limit(16))
    """Per parent, the child class of each of its classes (data-based methods); else empty."""
    datasets: tuple[bytes, ...] = field(metadata=limit(8))
    """Ids of the data a data-based method looked at (slice, calibration, distillation)."""

    @classmethod
    def create(
        cls,
        method: str,
        parents: Sequence[bytes],
        *,
        base: bytes | None = None,
        coefficients: Iterable[float] = (),
        params: Mapping[str, float] | None = None,
        seed: bytes = ZERO_HASH,
        platform: str = "",
        child_spec: bytes = b"",
        class_maps: Sequence[Sequence[int]] = (),
        datasets: Sequence[bytes] = (),
    ) -> MergeRecipe:
        """Build a recipe from Python floats (encoded exactly as float64)."""
        items = sorted((params or {}).items())
        return cls(
            method,
            tuple(bytes(p) for p in parents),
            None if base is None else bytes(base),
            tuple(encode_f64(c) for c in coefficients),
            tuple(RecipeParam(k, encode_f64(v)) for k, v in items),
            Hash32(bytes(seed)),
            platform,
            bytes(child_spec),
            tuple(tuple(m) for m in class_maps),
            tuple(bytes(d) for d in datasets),
        )

    @property
    def weights(self) -> tuple[float, ...]:
        """The per-parent coefficients as floats."""
        return tuple(decode_f64(c) for c in self.coefficients)

    def param(self, name: str, default: float | None = None) -> float:
        """A named parameter; ``default`` if absent (``BadCoefficients`` if there is none)."""
        for p in self.params:
            if p.name == name:
                return decode_f64(p.value)
        if default is None:
            raise BadCoefficients(f"the {self.method} recipe needs the parameter {name!r}")
        return default


# --- validation --------------------------------------------------------------------------------


def validate_recipe(
    recipe: MergeRecipe,
    *,
    child_parameters: int | None = None,
    max_merge_parents: int = MAX_MERGE_PARENTS,
    max_step_parameters: int = MAX_STEP_PARAMETERS,
) -> None:
    """Check a recipe on its own (no parents needed); raise the specific error of the first
    rule it breaks. ``child_parameters``, when known, is checked against the step cap."""
    method = recipe.method
    if method not in METHODS:
        raise UnknownMethod(
            f"unknown merge method {method!r} (known: {', '.join(sorted(METHODS))})"
        )
    n = len(recipe.parents)
    if n > max_merge_parents:
        raise TooManyParents(f"{n} parents exceed max_merge_parents = {max_merge_parents}")
    lo, hi = _PARENT_RANGE[method]
    if n < lo or (hi is not None and n > hi):
        want = f"exactly {lo}" if lo == hi else f"at least {lo}"
        raise InvalidRecipe(f"{method} takes {want} parent(s), the recipe has {n}")
    for p in (*recipe.parents, *(() if recipe.base is None else (recipe.base,))):
        if not 1 <= len(p) <= MAX_ID_BYTES:
            raise InvalidRecipe(f"a model id is 1 to {MAX_ID_BYTES} bytes")
    if len(set(recipe.parents)) != n:
        raise InvalidRecipe("a parent is listed twice")
    if method in SAME_BASE_METHODS and recipe.base is None:
        raise MissingBase(f"{method} merges task vectors: the recipe must name the parents' base")
    _check_coefficients(recipe)
    _check_params(recipe)
    if method in DATA_METHODS:
        if not recipe.child_spec:
            raise InvalidRecipe(f"{method} needs the child spec")
        if len(recipe.class_maps) != n:
            raise InvalidRecipe(f"{method} needs one class map per parent")
    elif recipe.class_maps:
        raise InvalidRecipe(f"{method} takes no class maps")
    if child_parameters is not None:
        check_step_parameters(child_parameters, max_step_parameters)


def _check_coefficients(recipe: MergeRecipe) -> None:
    method, n = recipe.method, len(recipe.parents)
    if method not in _WITH_COEFFICIENTS:
        if recipe.coefficients:
            raise BadCoefficients(f"{method} takes no per-parent coefficients")
        return
    if len(recipe.coefficients) != n:
        raise BadCoefficients(
            f"{method} needs one coefficient per parent: {n} parents, "
            f"{len(recipe.coefficients)} coefficients"
        )
    weights = recipe.weights
    if method == "weight_matching" and any(w < 0 for w in weights):
        raise BadCoefficients("weight matching averages with non-negative weights")
    if method == "weight_matching" and math.fsum(weights) <= 0:
        raise BadCoefficients("weight matching needs a positive total weight")


def _check_params(recipe: MergeRecipe) -> None:
    method = recipe.method
    names = [p.name for p in recipe.params]
    if names != sorted(set(names)):
        raise BadCoefficients("recipe parameters must be sorted by name, each named once")
    allowed = _PARAMS[method]
    for name in names:
        if name not in allowed:
            raise BadCoefficients(f"{method} takes no parameter {name!r}")
    for name in _REQUIRED_PARAMS.get(method, frozenset()):
        if name not in names:
            raise BadCoefficients(f"{method} needs the parameter {name!r}")
    values = {p.name: decode_f64(p.value) for p in recipe.params}
    if "density" in values and not 0.0 < values["density"] <= 1.0:
        raise BadCoefficients(f"density must be in (0, 1], not {values['density']}")
    if "t" in values and not 0.0 <= values["t"] <= 1.0:
        raise BadCoefficients(f"t must be in [0, 1], not {values['t']}")
    for name in ("temperature", "lr"):
        if name in values and values[name] <= 0.0:
            raise BadCoefficients(f"{name} must be positive")
    for name in ("steps", "batch_size"):
        if name in values and (values[name] < 1 or values[name] != int(values[name])):
            raise BadCoefficients(f"{name} must be a positive integer")


def check_step_parameters(child_parameters: int, max_step_parameters: int) -> None:
    """``ParameterCapExceeded`` if a step's child is above the cap."""
    if child_parameters > max_step_parameters:
        raise ParameterCapExceeded(
            f"the child has {child_parameters} parameters, above the cap of "
            f"{max_step_parameters} per merge step"
        )
