"""Models and the artifacts they are stored in: torch-free header parsing and signatures.

Everything exported here is pure Python (the consensus state transition imports it); torch code
lives in child processes elsewhere (``node/merge/``).
"""

from node.models.safetensors_header import (
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    ArtifactFormatError,
    BadOffsets,
    HeaderTooLarge,
    MalformedHeader,
    NotSafetensors,
    SafetensorsHeader,
    SubByteDtype,
    TensorInfo,
    UnknownDtype,
    encode_header,
    parse_header,
)
from node.models.signature import SIGNATURE_TAG, model_signature

__all__ = [
    "DTYPE_SIZES",
    "MAX_HEADER_BYTES",
    "SIGNATURE_TAG",
    "ArtifactFormatError",
    "BadOffsets",
    "HeaderTooLarge",
    "MalformedHeader",
    "NotSafetensors",
    "SafetensorsHeader",
    "SubByteDtype",
    "TensorInfo",
    "UnknownDtype",
    "encode_header",
    "model_signature",
    "parse_header",
]
