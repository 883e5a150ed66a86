"""The compute market's recipe allow-list and parameter schemas (DESIGN §10, issue 7 item 2).

A task names one recipe of :data:`RECIPES` and carries its parameters as canonical JSON bytes
(compact, sorted keys, ASCII, no NaN; :func:`canonical_params`). Nothing in a task is code: the
parameters are numbers, strings, ids (hex) and, for ``train``, a declarative architecture spec
from the torch-free registry (``node/models/specs.py``). Unknown keys are refused; every error
names the field. The chain validates a TASK_SUBMIT with :func:`validate_task_params`; the worker
parses the same bytes again before it runs anything.

Also here (torch-free, the chain needs it): the checkpoint hash chain of common7 —
``link_0 = sha256(TAG ‖ task_id)``, ``link_i = sha256(TAG ‖ link_{i-1} ‖ cid_i)``.

Error codes 3150–3159.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from node.errors import InvalidTransaction

# --- errors (3150–3159) ------------------------------------------------------------------------


class UnknownRecipe(InvalidTransaction):
    code = 3150
    reason = "the recipe is not in the allow-list"


class InvalidTaskParams(InvalidTransaction):
    """Parameters outside the recipe's schema; ``field`` names the offending key."""

    code = 3151
    reason = "invalid task parameters"

    def __init__(self, message: str = "", *, field: str = "") -> None:
        super().__init__(message, data={"field": field} if field else None)
        self.field = field


# --- constants ---------------------------------------------------------------------------------

RECIPES = ("train", "finetune", "merge", "evaluate")
TRAINING_RECIPES = frozenset({"train", "finetune"})
OPTIMIZERS = ("adam", "sgd")
EVAL_SPLITS = ("all", "holdout")
MAX_PARAMS_BYTES = 16 * 1024
MAX_ID_BYTES = 64
MAX_STEPS = 100_000_000
MAX_BATCH = 1 << 16
MAX_DEVICES = 16
MAX_SEED = (1 << 63) - 1
MAX_TENSOR_NAME = 128
CKPT_TAG = b"NeuroSeed/ckpt/v1"
"""Domain tag of the checkpoint link chain (common7)."""


# --- canonical JSON ----------------------------------------------------------------------------


def canonical_params(params: Mapping[str, Any]) -> bytes:
    """The one canonical JSON encoding of a parameter object."""
    try:
        return json.dumps(
            params, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        ).encode("ascii")
    except (TypeError, ValueError) as exc:
        raise InvalidTaskParams(f"parameters are not JSON-encodable: {exc}") from exc


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise InvalidTaskParams(f"the key {k!r} appears twice", field=k)
        out[k] = v
    return out


def _refuse_constant(name: str) -> Any:
    raise InvalidTaskParams(f"{name} is not a number")


def parse_params(params: bytes) -> dict[str, Any]:
    """Decode canonical parameter bytes (``InvalidTaskParams`` if not exactly canonical)."""
    if not isinstance(params, bytes | bytearray):
        raise InvalidTaskParams("parameters are bytes of canonical JSON")
    raw = bytes(params)
    if len(raw) > MAX_PARAMS_BYTES:
        raise InvalidTaskParams(f"parameters of {len(raw)} bytes exceed {MAX_PARAMS_BYTES}")
    try:
        tree = json.loads(
            raw.decode("ascii"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_refuse_constant,
        )
    except (UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, InvalidTaskParams):
            raise
        raise InvalidTaskParams(f"parameters are not ASCII JSON: {exc}") from exc
    if not isinstance(tree, dict):
        raise InvalidTaskParams("parameters are a JSON object")
    if canonical_params(tree) != raw:
        raise InvalidTaskParams("parameters are not in canonical JSON (compact, sorted keys)")
    return tree


# --- field rules -------------------------------------------------------------------------------

Rule = Callable[[str, Any], Any]


def _int(lo: int, hi: int) -> Rule:
    def check(name: str, v: Any) -> Any:
        if type(v) is not int or not lo <= v <= hi:
            raise InvalidTaskParams(f"{name} must be an integer in [{lo}, {hi}]", field=name)
        return v

    return check


def _num(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Rule:
    def check(name: str, v: Any) -> Any:
        ok = type(v) in (int, float) and math.isfinite(v)
        ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            raise InvalidTaskParams(
                f"{name} must be a number in {left}{lo}, {hi}{right}", field=name
            )
        return float(v)

    return check


def _choice(options: Sequence[str]) -> Rule:
    def check(name: str, v: Any) -> Any:
        if v not in options or type(v) is not str:
            raise InvalidTaskParams(f"{name} must be one of {', '.join(options)}", field=name)
        return v

    return check


def _bool(name: str, v: Any) -> Any:
    if type(v) is not bool:
        raise InvalidTaskParams(f"{name} must be true or false", field=name)
    return v


def _hex_id(name: str, v: Any, size: int | None = None) -> bytes:
    if type(v) is not str or v != v.lower():
        raise InvalidTaskParams(f"{name} must be lowercase hex", field=name)
    try:
        b = bytes.fromhex(v)
    except ValueError as exc:
        raise InvalidTaskParams(f"{name} must be lowercase hex", field=name) from exc
    if size is not None and len(b) != size:
        raise InvalidTaskParams(f"{name} must be {size} bytes", field=name)
    if not 1 <= len(b) <= MAX_ID_BYTES:
        raise InvalidTaskParams(f"{name} must be 1 to {MAX_ID_BYTES} bytes", field=name)
    return b


def _id(name: str, v: Any) -> Any:
    _hex_id(name, v)
    return v


def _tensor_name(name: str, v: Any) -> Any:
    if type(v) is not str or not 1 <= len(v) <= MAX_TENSOR_NAME:
        raise InvalidTaskParams(f"{name} must be a tensor name", field=name)
    return v


def _spec(name: str, v: Any) -> Any:
    from node.errors import NeuroSeedError
    from node.models.specs import parse_spec, spec_to_dict

    if not isinstance(v, dict):
        raise InvalidTaskParams(f"{name} must be an architecture spec object", field=name)
    try:
        return spec_to_dict(parse_spec(v))
    except NeuroSeedError as exc:
        raise InvalidTaskParams(f"{name}: {exc.message}", field=name) from exc


_TRAINING: dict[str, Rule] = {
    "dataset": _id,
    "steps": _int(1, MAX_STEPS),
    "lr": _num(0.0, 10.0, lo_open=True),
    "batch_size": _int(1, MAX_BATCH),
    "optimizer": _choice(OPTIMIZERS),
    "seed": _int(0, MAX_SEED),
    "checkpoint_every": _int(1, MAX_STEPS),
    # optional
    "momentum": _num(0.0, 1.0, hi_open=True),
    "weight_decay": _num(0.0, 1.0),
    "val_fraction": _num(0.0, 1.0, lo_open=True, hi_open=True),
    "split_seed": _int(0, MAX_SEED),
    "val_dataset": _id,
    "x_name": _tensor_name,
    "y_name": _tensor_name,
    "devices": _int(1, MAX_DEVICES),
}
_TRAINING_OPTIONAL = frozenset(
    {
        "momentum",
        "weight_decay",
        "val_fraction",
        "split_seed",
        "val_dataset",
        "x_name",
        "y_name",
        "devices",
    }
)
_TRAINING_DEFAULTS: dict[str, Any] = {
    "momentum": 0.9,
    "weight_decay": 0.0,
    "split_seed": 0,
    "x_name": "x",
    "y_name": "y",
    "devices": 1,
}

SCHEMAS: dict[str, tuple[dict[str, Rule], frozenset[str]]] = {
    "train": ({"spec": _spec, **_TRAINING}, _TRAINING_OPTIONAL),
    "finetune": (
        {"model": _id, "train_head_only": _bool, **_TRAINING},
        _TRAINING_OPTIONAL | {"train_head_only"},
    ),
    "evaluate": (
        {
            "model": _id,
            "dataset": _id,
            "split": _choice(EVAL_SPLITS),
            "val_fraction": _num(0.0, 1.0, lo_open=True, hi_open=True),
            "split_seed": _int(0, MAX_SEED),
            "x_name": _tensor_name,
            "y_name": _tensor_name,
        },
        frozenset({"val_fraction", "split_seed", "x_name", "y_name"}),
    ),
    "merge": (
        {
            "method": lambda n, v: v,  # checked by the merge engine's validate_recipe
            "parents": lambda n, v: v,
            "base": lambda n, v: v,
            "coefficients": lambda n, v: v,
            "params": lambda n, v: v,
            "seed": lambda n, v: v,
            "child_spec": _spec,
            "class_maps": lambda n, v: v,
            "datasets": lambda n, v: v,
            "out_dtype": _choice(("F32", "F16", "BF16", "F64")),
        },
        frozenset(
            {
                "base",
                "coefficients",
                "params",
                "seed",
                "child_spec",
                "class_maps",
                "datasets",
                "out_dtype",
            }
        ),
    ),
}
"""Per recipe: field → rule, and which fields may be absent. Anything else is refused."""


def _check_fields(recipe: str, tree: Mapping[str, Any]) -> dict[str, Any]:
    rules, optional = SCHEMAS[recipe]
    unknown = sorted(set(tree) - set(rules))
    if unknown:
        raise InvalidTaskParams(f"{recipe} takes no parameter {unknown[0]!r}", field=unknown[0])
    out: dict[str, Any] = {}
    for name, rule in rules.items():
        if name not in tree:
            if name in optional:
                continue
            raise InvalidTaskParams(f"{recipe} needs the parameter {name!r}", field=name)
        out[name] = rule(name, tree[name])
    return out


def _check_training(recipe: str, p: dict[str, Any]) -> dict[str, Any]:
    if p["checkpoint_every"] > p["steps"]:
        raise InvalidTaskParams("checkpoint_every must be <= steps", field="checkpoint_every")
    if "val_dataset" in p and "val_fraction" in p:
        raise InvalidTaskParams(
            "a held-out split is either val_dataset or val_fraction, not both", field="val_fraction"
        )
    for key, value in _TRAINING_DEFAULTS.items():
        p.setdefault(key, value)
    if "val_dataset" not in p:
        p.setdefault("val_fraction", 0.2)
    if recipe == "finetune":
        p.setdefault("train_head_only", False)
    if p["batch_size"] % p["devices"] != 0:
        raise InvalidTaskParams(
            "batch_size must be a multiple of devices (equal shards per device)", field="devices"
        )
    return p


def _check_merge(p: dict[str, Any]) -> dict[str, Any]:
    from node.errors import NeuroSeedError
    from node.merge.recipe import validate_recipe

    try:
        recipe = merge_recipe(p)
        validate_recipe(recipe)
    except InvalidTaskParams:
        raise
    except NeuroSeedError as exc:
        raise InvalidTaskParams(f"merge recipe: {exc.message}", field="method") from exc
    return p


def validate_task_params(recipe: str, params: bytes) -> dict[str, Any]:
    """Check a task's parameters against its recipe's schema and return them parsed, with the
    optional fields' defaults filled in. ``UnknownRecipe`` or ``InvalidTaskParams`` (naming the
    field) on the first rule broken."""
    if recipe not in RECIPES:
        raise UnknownRecipe(f"recipe {recipe!r} is not in the allow-list ({', '.join(RECIPES)})")
    p = _check_fields(recipe, parse_params(params))
    if recipe in TRAINING_RECIPES:
        return _check_training(recipe, p)
    if recipe == "merge":
        return _check_merge(p)
    if p["split"] == "holdout":
        p.setdefault("val_fraction", 0.2)
        p.setdefault("split_seed", 0)
    elif "val_fraction" in p or "split_seed" in p:
        raise InvalidTaskParams("split 'all' takes no val_fraction or split_seed", field="split")
    p.setdefault("x_name", "x")
    p.setdefault("y_name", "y")
    return p


def merge_recipe(p: Mapping[str, Any]) -> Any:
    """The ``MergeRecipe`` a merge task's parameters describe (ids and the seed as hex,
    numbers as JSON numbers, encoded exactly as float64)."""
    from node.merge.recipe import MergeRecipe
    from node.models.specs import parse_spec, spec_json

    method = p.get("method")
    if type(method) is not str:
        raise InvalidTaskParams("method must be a string", field="method")
    parents = p.get("parents")
    if not isinstance(parents, list) or not parents:
        raise InvalidTaskParams("parents must be a non-empty list of model ids", field="parents")
    parent_ids = [_hex_id("parents", v) for v in parents]
    base = p.get("base")
    base_id = None if base is None else _hex_id("base", base)
    coefficients = p.get("coefficients", [])
    if not isinstance(coefficients, list):
        raise InvalidTaskParams("coefficients must be a list of numbers", field="coefficients")
    coefs = [_num(-1e6, 1e6)("coefficients", c) for c in coefficients]
    named = p.get("params", {})
    if not isinstance(named, dict):
        raise InvalidTaskParams("params must be an object of numbers", field="params")
    values = {k: _num(-1e9, 1e9)("params", v) for k, v in named.items()}
    seed = p.get("seed", "00" * 32)
    seed_bytes = _hex_id("seed", seed, 32)
    child_spec = p.get("child_spec")
    spec_bytes = b"" if child_spec is None else spec_json(parse_spec(child_spec))
    maps = p.get("class_maps", [])
    if not isinstance(maps, list) or not all(
        isinstance(m, list) and all(type(c) is int and 0 <= c < 1 << 16 for c in m) for m in maps
    ):
        raise InvalidTaskParams("class_maps must be lists of class indices", field="class_maps")
    datasets = p.get("datasets", [])
    if not isinstance(datasets, list):
        raise InvalidTaskParams("datasets must be a list of dataset ids", field="datasets")
    try:
        return MergeRecipe.create(
            method,
            parent_ids,
            base=base_id,
            coefficients=coefs,
            params=values,
            seed=seed_bytes,
            child_spec=spec_bytes,
            class_maps=maps,
            datasets=[_hex_id("datasets", d) for d in datasets],
        )
    except (TypeError, ValueError) as exc:
        raise InvalidTaskParams(f"merge recipe: {exc}", field="method") from exc


# --- derived facts -----------------------------------------------------------------------------


def task_steps(recipe: str, params: bytes | Mapping[str, Any]) -> int:
    """Total optimizer steps of a task (0 for merge and evaluate)."""
    p = validate_task_params(recipe, params) if isinstance(params, bytes | bytearray) else params
    return int(p["steps"]) if recipe in TRAINING_RECIPES else 0


def checkpoint_steps(recipe: str, params: bytes | Mapping[str, Any]) -> list[int]:
    """The steps after which a checkpoint is written: every ``checkpoint_every`` and the last."""
    p = validate_task_params(recipe, params) if isinstance(params, bytes | bytearray) else params
    if recipe not in TRAINING_RECIPES:
        return [0]
    steps, every = int(p["steps"]), int(p["checkpoint_every"])
    out = list(range(every, steps + 1, every))
    if not out or out[-1] != steps:
        out.append(steps)
    return out


def checkpoint_count(recipe: str, params: bytes | Mapping[str, Any]) -> int:
    """ceil(steps / checkpoint_every) for train and finetune, 1 for merge and evaluate."""
    p = validate_task_params(recipe, params) if isinstance(params, bytes | bytearray) else params
    if recipe not in TRAINING_RECIPES:
        return 1
    return -(-int(p["steps"]) // int(p["checkpoint_every"]))


def is_elementwise_merge(params: bytes | Mapping[str, Any]) -> bool:
    """Whether a merge task is elementwise (re-run whole, byte-exact on any CPU)."""
    from node.merge.recipe import ELEMENTWISE_METHODS

    p = validate_task_params("merge", params) if isinstance(params, bytes | bytearray) else params
    return p.get("method") in ELEMENTWISE_METHODS


def task_devices(recipe: str, params: Mapping[str, Any]) -> int:
    """How many devices of one provider the task runs on (DDP when > 1)."""
    return int(params.get("devices", 1)) if recipe in TRAINING_RECIPES else 1


# --- checkpoint hash chain ---------------------------------------------------------------------


def chain_start(task_id: bytes) -> bytes:
    """link_0 = sha256(TAG ‖ task_id)."""
    return hashlib.sha256(CKPT_TAG + bytes(task_id)).digest()


def chain_link(previous: bytes, cid: bytes) -> bytes:
    """link_i = sha256(TAG ‖ link_{i-1} ‖ cid_i)."""
    return hashlib.sha256(CKPT_TAG + bytes(previous) + bytes(cid)).digest()


def chain_links(task_id: bytes, cids: Sequence[bytes]) -> list[bytes]:
    """[link_1, …, link_k] of the checkpoints' root CIDs in order (the last is the head)."""
    out: list[bytes] = []
    link = chain_start(task_id)
    for cid in cids:
        link = chain_link(link, cid)
        out.append(link)
    return out
