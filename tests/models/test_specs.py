"""Architecture specs as data: parsing, canonical JSON, derived tensors and counts, errors."""

from __future__ import annotations

import json

import pytest

from node.models import encode_header, model_signature, parse_header
from node.models.safetensors_header import TensorInfo
from node.models.specs import (
    CNNSpec,
    InvalidSpecField,
    MLPSpec,
    SpecError,
    SpecHeaderMismatch,
    TransformerSpec,
    UnknownFamily,
    check_header,
    expected_tensors,
    forward_flops,
    input_dtype,
    input_shape,
    is_alignable,
    output_shape,
    parameter_count,
    parse_spec,
    spec_json,
    spec_signature,
)

MLP = {"family": "mlp", "input_dim": 64, "hidden": [32, 16], "num_classes": 10}
CNN = {"family": "cnn", "in_channels": 1, "image_size": 8, "channels": [4, 8], "num_classes": 10}
TRANSFORMER = {
    "family": "transformer",
    "vocab_size": 50,
    "max_len": 12,
    "d_model": 16,
    "n_heads": 2,
    "n_layers": 2,
    "d_ff": 32,
    "num_classes": 4,
}


def test_parse_fills_defaults_and_canonical_json_round_trips() -> None:
    spec = parse_spec(json.dumps(MLP).encode())
    assert spec == MLPSpec(64, (32, 16), 10, "relu", "F32")
    canonical = spec_json(spec)
    assert canonical == (
        b'{"activation":"relu","dtype":"F32","family":"mlp","hidden":[32,16],'
        b'"input_dim":64,"num_classes":10}'
    )
    assert parse_spec(canonical) == spec
    assert spec_json(parse_spec(canonical)) == canonical
    assert isinstance(parse_spec(CNN), CNNSpec)
    assert isinstance(parse_spec(json.dumps(TRANSFORMER)), TransformerSpec)


def test_mlp_tensors_and_counts_by_hand() -> None:
    spec = parse_spec(MLP)
    assert [(t.name, t.shape, t.dtype) for t in expected_tensors(spec)] == [
        ("head.bias", (10,), "F32"),
        ("head.weight", (10, 16), "F32"),
        ("layers.0.bias", (32,), "F32"),
        ("layers.0.weight", (32, 64), "F32"),
        ("layers.1.bias", (16,), "F32"),
        ("layers.1.weight", (16, 32), "F32"),
    ]
    assert parameter_count(spec) == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    assert forward_flops(spec) == 2 * (64 * 32 + 32 * 16 + 16 * 10)
    assert input_shape(spec) == (64,)
    assert output_shape(spec) == (10,)
    assert input_dtype(spec) == "F32"


def test_cnn_and_transformer_counts_by_hand() -> None:
    cnn = parse_spec(CNN)
    names = {t.name: t.shape for t in expected_tensors(cnn)}
    assert names["convs.0.weight"] == (4, 1, 3, 3)
    assert names["convs.1.weight"] == (8, 4, 3, 3)
    assert names["head.weight"] == (10, 8)
    assert parameter_count(cnn) == (4 * 9 + 4) + (8 * 4 * 9 + 8) + (8 * 10 + 10)
    assert input_shape(cnn) == (1, 8, 8)
    # conv 0 on 8×8, pool, conv 1 on 4×4, head
    assert forward_flops(cnn) == 2 * 9 * 1 * 4 * 64 + 2 * 9 * 4 * 8 * 16 + 2 * 8 * 10

    tr = parse_spec(TRANSFORMER)
    d, f, v, n, c = 16, 32, 50, 12, 4
    per_block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (f * d + f) + (d * f + d)
    assert parameter_count(tr) == v * d + n * d + 2 * per_block + 2 * d + c * d + c
    assert input_shape(tr) == (12,)
    assert input_dtype(tr) == "I64"
    assert "blocks.1.attn.qkv.weight" in {t.name for t in expected_tensors(tr)}
    assert is_alignable(parse_spec(MLP)) and is_alignable(cnn) and not is_alignable(tr)


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        ({"family": "resnet"}, UnknownFamily, "not in the registry"),
        ({"family": 3}, SpecError, "family"),
        ({"hidden": []}, InvalidSpecField, "1 to"),
        ({"hidden": [32, 0]}, InvalidSpecField, "hidden"),
        ({"input_dim": True}, InvalidSpecField, "input_dim"),
        ({"input_dim": 64.0}, InvalidSpecField, "input_dim"),
        ({"num_classes": 1 << 20}, InvalidSpecField, "num_classes"),
        ({"activation": "swish"}, InvalidSpecField, "activation"),
        ({"dtype": "I32"}, InvalidSpecField, "dtype"),
        ({"extra": 1}, InvalidSpecField, "unknown field"),
    ],
)
def test_bad_mlp_specs(change: dict[str, object], error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        parse_spec({**MLP, **change})


def test_bad_specs_of_other_shapes() -> None:
    with pytest.raises(InvalidSpecField, match="missing field 'num_classes'"):
        parse_spec({k: v for k, v in MLP.items() if k != "num_classes"})
    with pytest.raises(InvalidSpecField, match="odd"):
        parse_spec({**CNN, "kernel_size": 4})
    with pytest.raises(InvalidSpecField, match="divisible"):
        parse_spec({**CNN, "image_size": 6})
    with pytest.raises(InvalidSpecField, match="multiple of n_heads"):
        parse_spec({**TRANSFORMER, "n_heads": 3})
    with pytest.raises(SpecError, match="not valid JSON"):
        parse_spec(b"{nope")
    with pytest.raises(SpecError, match="JSON object"):
        parse_spec(b"[1, 2]")
    with pytest.raises(SpecError, match="exceeds"):
        parse_spec(b" " * 5000)


def _header_of(tensors: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
    infos, pos = [], 0
    sizes = {"F32": 4, "F16": 2}
    for name, dtype, shape in tensors:
        n = sizes[dtype]
        for s in shape:
            n *= s
        infos.append(TensorInfo(name, dtype, shape, pos, pos + n))
        pos += n
    return encode_header(infos, None)


def test_check_header_accepts_exactly_the_spec() -> None:
    spec = parse_spec(MLP)
    good = [(t.name, t.dtype, t.shape) for t in expected_tensors(spec)]
    header = parse_header(_header_of(good))
    check_header(spec, header)
    assert spec_signature(spec) == model_signature(header)
    with pytest.raises(SpecHeaderMismatch, match=r"missing head\.bias"):
        check_header(spec, parse_header(_header_of(good[1:])))
    with pytest.raises(SpecHeaderMismatch, match="unexpected extra"):
        check_header(spec, parse_header(_header_of([*good, ("extra", "F32", (1,))])))
    wrong_shape = [(n, d, (10, 17) if n == "head.weight" else s) for n, d, s in good]
    with pytest.raises(SpecHeaderMismatch, match=r"head\.weight"):
        check_header(spec, parse_header(_header_of(wrong_shape)))
    wrong_dtype = [(n, "F16", s) for n, _, s in good]
    with pytest.raises(SpecHeaderMismatch, match="F16"):
        check_header(spec, parse_header(_header_of(wrong_dtype)))
