"""Model signatures: sha256 over the tag and the canonical msgpack of (name, shape, dtype)."""

from __future__ import annotations

import hashlib
import json

from node.models import SIGNATURE_TAG, TensorInfo, encode_header, model_signature, parse_header
from node.models.signature import signature_payload


def header(tree: dict[str, object]) -> bytes:
    return json.dumps(tree).encode()


TWO = parse_header(
    header(
        {
            "b": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},
            "a": {"dtype": "F32", "shape": [3, 4], "data_offsets": [4, 52]},
        }
    )
)


def test_vector_bytes_built_by_hand() -> None:
    # msgpack, written out: array(2) of [str name, array of uint dims, str dtype], sorted by name.
    payload = bytes.fromhex(
        "92"  # two entries
        "93" "a161" "92" "03" "04" "a3" + b"F32".hex()  # ["a", [3, 4], "F32"]
        + "93" "a162" "91" "02" "a3" + b"F16".hex()  # ["b", [2], "F16"]
    )  # fmt: skip
    assert signature_payload(TWO) == payload
    assert SIGNATURE_TAG == b"NeuroSeed/signature/v1"
    digest = hashlib.sha256(b"NeuroSeed/signature/v1" + payload).digest()
    assert model_signature(TWO) == digest
    assert digest.hex() == "9d63096d1270d48fabf24191dd0d29bac02014ae5dc7335e4f7c8c214af6be2a"


def test_vector_empty_model() -> None:
    empty = parse_header(b"{}")
    assert signature_payload(empty) == b"\x90"
    assert model_signature(empty) == hashlib.sha256(SIGNATURE_TAG + b"\x90").digest()
    assert len(model_signature(empty)) == 32


def test_ignores_offsets_order_and_metadata() -> None:
    swapped = parse_header(
        encode_header(
            [TensorInfo("a", "F32", (3, 4), 0, 48), TensorInfo("b", "F16", (2,), 48, 52)],
            {"format": "pt"},
        )
    )
    assert swapped.tensors[0].name == "a" and TWO.tensors[0].name == "b"
    assert model_signature(swapped) == model_signature(TWO)


def test_changes_with_name_shape_and_dtype() -> None:
    base = model_signature(TWO)
    variants = [
        [TensorInfo("a", "F32", (4, 3), 0, 48), TensorInfo("b", "F16", (2,), 48, 52)],
        [TensorInfo("a", "I32", (3, 4), 0, 48), TensorInfo("b", "F16", (2,), 48, 52)],
        [TensorInfo("c", "F32", (3, 4), 0, 48), TensorInfo("b", "F16", (2,), 48, 52)],
        [TensorInfo("a", "F32", (3, 4), 0, 48), TensorInfo("b", "F16", (2, 1), 48, 52)],
        [TensorInfo("a", "F32", (12,), 0, 48), TensorInfo("b", "F16", (2,), 48, 52)],
    ]
    sigs = {model_signature(parse_header(encode_header(v, None))) for v in variants}
    assert len(sigs) == len(variants) and base not in sigs


def test_names_sort_by_code_point() -> None:
    # "Z" < "a" < "é" by code point (and UTF-8 bytes), not by locale or case.
    h = parse_header(
        encode_header(
            [
                TensorInfo("é", "U8", (1,), 0, 1),
                TensorInfo("a", "U8", (1,), 1, 2),
                TensorInfo("Z", "U8", (1,), 2, 3),
            ],
            None,
        )
    )
    payload = signature_payload(h)
    assert payload.index(b"\xa1Z") < payload.index(b"\xa1a") < payload.index(b"\xa2\xc3\xa9")
