# ruff: noqa: E401, E702, I001
# Verbatim copy of ../shared/vectors/unixfs_test_files.py; only these two lines were added.
"""Deterministic test files for UnixFS CID vectors: byte i of a file is the stream
sha256(b"neuroseed-unixfs" + k.to_bytes(8, "big")) for k = 0, 1, 2, ... concatenated, cut to size."""
import hashlib, sys

def stream_bytes(size: int) -> bytes:
    out = bytearray(); k = 0
    while len(out) < size:
        out += hashlib.sha256(b"neuroseed-unixfs" + k.to_bytes(8, "big")).digest(); k += 1
    return bytes(out[:size])

def write(path: str, size: int) -> None:
    with open(path, "wb") as f:
        k = 0; left = size
        while left > 0:
            blk = b"".join(hashlib.sha256(b"neuroseed-unixfs" + (k + j).to_bytes(8, "big")).digest() for j in range(2048))
            k += 2048
            f.write(blk[:left]); left -= min(left, len(blk))

if __name__ == "__main__":
    for arg in sys.argv[1:]:
        name, size = arg.split("=")
        write(name, int(size))
