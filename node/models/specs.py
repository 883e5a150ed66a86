"""Architecture specs as data: the torch-free registry of model families (DESIGN §8 "Model").

A model artifact is a safetensors file plus a declarative spec — never code. A spec is a small
JSON object naming a family and its sizes; from it this module derives, without torch, the
tensors the safetensors file must hold (names, shapes, dtypes), the parameter count, the
per-sample input and output shapes and a forward-pass FLOP estimate. ``node/compute/
architectures.py`` builds the matching torch module in a child process; its ``state_dict`` has
exactly the names and shapes given here (tested).

Families (all classifiers):

* ``mlp``: ``input_dim`` → ``hidden`` widths (Linear + activation) → ``head`` Linear.
  Tensors ``layers.{i}.weight`` ``(out, in)``, ``layers.{i}.bias``, ``head.weight``,
  ``head.bias``.
* ``cnn``: square images ``(in_channels, image_size, image_size)`` → per ``channels`` entry a
  ``kernel_size`` convolution (same padding), the activation and, if ``pool``, a 2×2 max-pool →
  global average pool → ``head``. Tensors ``convs.{i}.weight`` ``(out, in, k, k)``,
  ``convs.{i}.bias``, ``head.*``.
* ``transformer``: token ids ``(max_len,)`` → token + position embeddings → ``n_layers``
  pre-norm blocks (``ln1``, ``attn.qkv``, ``attn.proj``, ``ln2``, ``mlp.fc``, ``mlp.out``) →
  ``ln_f`` → mean over positions → ``head``.

Canonical JSON (``spec_json``) is compact with sorted keys, so one spec has one byte form.
Error codes 3000–3009.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from node.errors import NeuroSeedError
from node.models.safetensors_header import DTYPE_SIZES, SafetensorsHeader, TensorInfo
from node.models.signature import model_signature

# --- limits ------------------------------------------------------------------------------------

MAX_SPEC_BYTES = 4096
"""Largest spec JSON accepted (a spec is a handful of integers)."""
MAX_WIDTH = 1 << 16
"""Largest layer width, channel count, input or class count."""
MAX_LAYERS = 64
MAX_VOCAB = 1 << 20
MAX_SEQ_LEN = 1 << 14
MAX_IMAGE_SIZE = 1 << 12
MAX_KERNEL = 15
PARAM_DTYPES = ("F32", "F16", "BF16", "F64")
"""Floating dtypes a model's parameters may be stored in."""
ACTIVATIONS = ("relu", "gelu", "tanh")


# --- errors (3000–3009) ------------------------------------------------------------------------


class SpecError(NeuroSeedError):
    """A model spec that is not valid JSON of a known family with valid sizes."""

    code = 3000
    reason = "invalid model spec"


class UnknownFamily(SpecError):
    code = 3001
    reason = "model family not in the registry"


class InvalidSpecField(SpecError):
    """A field that is missing, unknown, of the wrong type or out of range."""

    code = 3002
    reason = "invalid field in a model spec"


class SpecHeaderMismatch(SpecError):
    """A safetensors header whose tensors are not exactly those the spec implies."""

    code = 3003
    reason = "the model file does not match its spec"


# --- records -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor a model file of a spec must hold."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, slots=True)
class MLPSpec:
    input_dim: int
    hidden: tuple[int, ...]
    num_classes: int
    activation: str = "relu"
    dtype: str = "F32"

    family: ClassVar[str] = "mlp"


@dataclass(frozen=True, slots=True)
class CNNSpec:
    in_channels: int
    image_size: int
    channels: tuple[int, ...]
    num_classes: int
    kernel_size: int = 3
    pool: bool = True
    activation: str = "relu"
    dtype: str = "F32"

    family: ClassVar[str] = "cnn"


@dataclass(frozen=True, slots=True)
class TransformerSpec:
    vocab_size: int
    max_len: int
    d_model: int
    n_heads: int
    n_layers: int
    d_ff: int
    num_classes: int
    activation: str = "gelu"
    dtype: str = "F32"

    family: ClassVar[str] = "transformer"


ModelSpec = MLPSpec | CNNSpec | TransformerSpec

FAMILIES: dict[str, type[MLPSpec] | type[CNNSpec] | type[TransformerSpec]] = {
    "mlp": MLPSpec,
    "cnn": CNNSpec,
    "transformer": TransformerSpec,
}
"""The registry: family name → spec class."""

ALIGNABLE_FAMILIES = frozenset({"mlp", "cnn"})
"""Families whose hidden units can be permuted (weight matching, ZipIt!, feature union)."""


# --- parsing and validation --------------------------------------------------------------------

# Each field: (kind, minimum, maximum) with kind "int", "ints" (a non-empty list), "bool" or a
# tuple of allowed strings. Optional fields take the dataclass default.
_Rule = tuple[str | tuple[str, ...], int, int]
_FIELDS: dict[str, dict[str, _Rule]] = {
    "mlp": {
        "input_dim": ("int", 1, MAX_WIDTH),
        "hidden": ("ints", 1, MAX_WIDTH),
        "num_classes": ("int", 1, MAX_WIDTH),
        "activation": (ACTIVATIONS, 0, 0),
        "dtype": (PARAM_DTYPES, 0, 0),
    },
    "cnn": {
        "in_channels": ("int", 1, MAX_WIDTH),
        "image_size": ("int", 1, MAX_IMAGE_SIZE),
        "channels": ("ints", 1, MAX_WIDTH),
        "num_classes": ("int", 1, MAX_WIDTH),
        "kernel_size": ("int", 1, MAX_KERNEL),
        "pool": ("bool", 0, 0),
        "activation": (ACTIVATIONS, 0, 0),
        "dtype": (PARAM_DTYPES, 0, 0),
    },
    "transformer": {
        "vocab_size": ("int", 2, MAX_VOCAB),
        "max_len": ("int", 1, MAX_SEQ_LEN),
        "d_model": ("int", 1, MAX_WIDTH),
        "n_heads": ("int", 1, 1024),
        "n_layers": ("int", 1, MAX_LAYERS),
        "d_ff": ("int", 1, MAX_WIDTH),
        "num_classes": ("int", 1, MAX_WIDTH),
        "activation": (ACTIVATIONS, 0, 0),
        "dtype": (PARAM_DTYPES, 0, 0),
    },
}
_OPTIONAL = frozenset({"activation", "dtype", "kernel_size", "pool"})


def _check_field(family: str, name: str, value: object, rule: _Rule) -> object:
    kind, lo, hi = rule
    where = f"{family} spec: {name}"
    if isinstance(kind, tuple):
        if type(value) is not str or value not in kind:
            raise InvalidSpecField(f"{where} must be one of {', '.join(kind)}, not {value!r}")
        return value
    if kind == "bool":
        if type(value) is not bool:
            raise InvalidSpecField(f"{where} must be true or false")
        return value
    if kind == "int":
        if type(value) is not int or not lo <= value <= hi:
            raise InvalidSpecField(f"{where} must be an integer in [{lo}, {hi}], not {value!r}")
        return value
    if type(value) not in (list, tuple):
        raise InvalidSpecField(f"{where} must be a list of integers")
    items: tuple[object, ...] = tuple(value)  # type: ignore[arg-type]
    if not 1 <= len(items) <= MAX_LAYERS:
        raise InvalidSpecField(f"{where} must list 1 to {MAX_LAYERS} layers")
    for item in items:
        if type(item) is not int or not lo <= item <= hi:
            raise InvalidSpecField(f"{where} entries must be integers in [{lo}, {hi}]")
    return items


def parse_spec(data: bytes | str | Mapping[str, Any]) -> ModelSpec:
    """Validate a spec given as JSON (bytes or text) or an already decoded mapping."""
    if isinstance(data, bytes | bytearray | str):
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        if len(raw) > MAX_SPEC_BYTES:
            raise SpecError(f"a spec of {len(raw)} bytes exceeds {MAX_SPEC_BYTES}")
        try:
            tree = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise SpecError(f"the spec is not valid JSON: {exc}") from exc
    else:
        tree = data
    if not isinstance(tree, Mapping):
        raise SpecError("a spec is a JSON object")
    family = tree.get("family")
    if type(family) is not str:
        raise SpecError("a spec names its family (a string)")
    if family not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise UnknownFamily(f"model family {family!r} is not in the registry ({known})")
    rules = _FIELDS[family]
    unknown = set(tree) - set(rules) - {"family"}
    if unknown:
        raise InvalidSpecField(f"{family} spec: unknown field(s) {', '.join(sorted(unknown))}")
    values: dict[str, object] = {}
    for name, rule in rules.items():
        if name not in tree:
            if name in _OPTIONAL:
                continue
            raise InvalidSpecField(f"{family} spec: missing field {name!r}")
        values[name] = _check_field(family, name, tree[name], rule)
    spec: ModelSpec = FAMILIES[family](**values)  # type: ignore[arg-type]
    _check_consistency(spec)
    return spec


def _check_consistency(spec: ModelSpec) -> None:
    if isinstance(spec, CNNSpec):
        if spec.kernel_size % 2 == 0:
            raise InvalidSpecField("cnn spec: kernel_size must be odd (same padding)")
        if spec.pool and spec.image_size % (1 << len(spec.channels)) != 0:
            raise InvalidSpecField(
                f"cnn spec: image_size {spec.image_size} is not divisible by "
                f"2**{len(spec.channels)} (one 2x2 pool per layer)"
            )
    elif isinstance(spec, TransformerSpec) and spec.d_model % spec.n_heads != 0:
        raise InvalidSpecField(
            f"transformer spec: d_model {spec.d_model} is not a multiple of n_heads {spec.n_heads}"
        )


def spec_to_dict(spec: ModelSpec) -> dict[str, Any]:
    """The JSON-able form of a spec, every field included."""
    out: dict[str, Any] = {"family": spec.family}
    for name in _FIELDS[spec.family]:
        value = getattr(spec, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def spec_json(spec: ModelSpec) -> bytes:
    """Canonical JSON of a spec: compact, sorted keys, every field present."""
    return json.dumps(spec_to_dict(spec), sort_keys=True, separators=(",", ":")).encode("ascii")


# --- derived facts -----------------------------------------------------------------------------


def _layer(prefix: str, out: int, inp: int, dtype: str) -> list[TensorSpec]:
    return [
        TensorSpec(f"{prefix}.weight", (out, inp), dtype),
        TensorSpec(f"{prefix}.bias", (out,), dtype),
    ]


def expected_tensors(spec: ModelSpec) -> tuple[TensorSpec, ...]:
    """Every tensor a model file of ``spec`` holds, sorted by name."""
    dt = spec.dtype
    out: list[TensorSpec] = []
    if isinstance(spec, MLPSpec):
        width = spec.input_dim
        for i, h in enumerate(spec.hidden):
            out += _layer(f"layers.{i}", h, width, dt)
            width = h
        out += _layer("head", spec.num_classes, width, dt)
    elif isinstance(spec, CNNSpec):
        c_in, k = spec.in_channels, spec.kernel_size
        for i, c in enumerate(spec.channels):
            out.append(TensorSpec(f"convs.{i}.weight", (c, c_in, k, k), dt))
            out.append(TensorSpec(f"convs.{i}.bias", (c,), dt))
            c_in = c
        out += _layer("head", spec.num_classes, c_in, dt)
    else:
        d = spec.d_model
        out.append(TensorSpec("embed.weight", (spec.vocab_size, d), dt))
        out.append(TensorSpec("pos.weight", (spec.max_len, d), dt))
        for i in range(spec.n_layers):
            b = f"blocks.{i}"
            out += [TensorSpec(f"{b}.ln1.weight", (d,), dt), TensorSpec(f"{b}.ln1.bias", (d,), dt)]
            out += _layer(f"{b}.attn.qkv", 3 * d, d, dt)
            out += _layer(f"{b}.attn.proj", d, d, dt)
            out += [TensorSpec(f"{b}.ln2.weight", (d,), dt), TensorSpec(f"{b}.ln2.bias", (d,), dt)]
            out += _layer(f"{b}.mlp.fc", spec.d_ff, d, dt)
            out += _layer(f"{b}.mlp.out", d, spec.d_ff, dt)
        out += [TensorSpec("ln_f.weight", (d,), dt), TensorSpec("ln_f.bias", (d,), dt)]
        out += _layer("head", spec.num_classes, d, dt)
    return tuple(sorted(out, key=lambda t: t.name))


def parameter_count(spec: ModelSpec) -> int:
    """Number of parameters, computed from the sizes alone."""
    return sum(t.numel for t in expected_tensors(spec))


def input_shape(spec: ModelSpec) -> tuple[int, ...]:
    """Shape of one input sample (without the batch dimension)."""
    if isinstance(spec, MLPSpec):
        return (spec.input_dim,)
    if isinstance(spec, CNNSpec):
        return (spec.in_channels, spec.image_size, spec.image_size)
    return (spec.max_len,)


def input_dtype(spec: ModelSpec) -> str:
    """Dtype of the input: token ids for transformers, floats otherwise."""
    return "I64" if isinstance(spec, TransformerSpec) else "F32"


def output_shape(spec: ModelSpec) -> tuple[int, ...]:
    """Shape of one output sample: the class logits."""
    return (spec.num_classes,)


def forward_flops(spec: ModelSpec) -> int:
    """Floating-point operations of one forward pass of one sample (2 per multiply-add; a
    training step costs about 3 times this per sample). Used to count time to target in FLOPs."""
    if isinstance(spec, MLPSpec):
        total, width = 0, spec.input_dim
        for h in (*spec.hidden, spec.num_classes):
            total += 2 * width * h
            width = h
        return total
    if isinstance(spec, CNNSpec):
        total, c_in, size = 0, spec.in_channels, spec.image_size
        for c in spec.channels:
            total += 2 * spec.kernel_size**2 * c_in * c * size * size
            c_in = c
            if spec.pool:
                size //= 2
        return total + 2 * c_in * spec.num_classes
    d, n, f = spec.d_model, spec.max_len, spec.d_ff
    per_layer = 2 * n * (4 * d * d + 2 * d * f) + 4 * n * n * d
    return spec.n_layers * per_layer + 2 * d * spec.num_classes


def is_alignable(spec: ModelSpec) -> bool:
    """Whether the family's hidden units can be permuted (weight matching, ZipIt!)."""
    return spec.family in ALIGNABLE_FAMILIES


def spec_header(spec: ModelSpec) -> SafetensorsHeader:
    """The header a model file of ``spec`` has when written in sorted-name order."""
    tensors: list[TensorInfo] = []
    pos = 0
    for t in expected_tensors(spec):
        size = t.numel * DTYPE_SIZES[t.dtype]
        tensors.append(TensorInfo(t.name, t.dtype, t.shape, pos, pos + size))
        pos += size
    return SafetensorsHeader(tuple(tensors), None, pos)


def spec_signature(spec: ModelSpec) -> bytes:
    """The model signature every file of this spec has (``node.models.model_signature``)."""
    return model_signature(spec_header(spec))


def check_header(spec: ModelSpec, header: SafetensorsHeader) -> None:
    """Raise ``SpecHeaderMismatch`` unless the header holds exactly the spec's tensors."""
    want = {t.name: t for t in expected_tensors(spec)}
    have = {t.name: t for t in header.tensors}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:5])}")
        raise SpecHeaderMismatch(f"{spec.family} spec: {'; '.join(parts)}")
    for name, w in want.items():
        h = have[name]
        if h.shape != w.shape or h.dtype != w.dtype:
            raise SpecHeaderMismatch(
                f"tensor {name!r} is {h.dtype} {list(h.shape)}, the spec says "
                f"{w.dtype} {list(w.shape)}"
            )
