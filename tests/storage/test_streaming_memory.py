"""Import and export stream: a 256 MiB file goes into the blob store and back out while the
process's peak memory grows by far less than the file (DESIGN §7: files are never loaded whole).

The work runs in a child process so that its ``ru_maxrss`` (peak resident set) measures only
this: Python, the imports, then generating, importing and exporting the file.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SIZE = 256 << 20
MAX_GROWTH_BYTES = 64 << 20

CHILD = r"""
import hashlib, json, random, resource, sys
from pathlib import Path

from node.storage import MemoryKV
from node.storage.blobstore import BlobStore
from node.storage.importer import export_file, import_file, verify_cid_block

def peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

tmp, size = Path(sys.argv[1]), int(sys.argv[2])
before = peak_bytes()
rng = random.Random(20260101)
src_hash = hashlib.sha256()
with open(tmp / "src.bin", "wb") as f:
    for _ in range(size // 65536):
        piece = rng.randbytes(65536)
        src_hash.update(piece)
        f.write(piece)
store = BlobStore(tmp / "blobs", MemoryKV(), verify=verify_cid_block, quota_bytes=2 * size)
with open(tmp / "src.bin", "rb") as f:
    result = import_file(store, f)
with open(tmp / "out.bin", "wb") as f:
    written = export_file(store, result.root, f)
after = peak_bytes()
out_hash = hashlib.sha256()
with open(tmp / "out.bin", "rb") as f:
    while piece := f.read(65536):
        out_hash.update(piece)
print(json.dumps({
    "before": before, "after": after, "size": result.size, "written": written,
    "blocks": result.blocks, "src": src_hash.hexdigest(), "out": out_hash.hexdigest(),
}))
"""


def test_import_export_256_mib_in_bounded_memory(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), str(SIZE)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["size"] == report["written"] == SIZE
    assert report["blocks"] == 256 + 2 + 1  # 256 leaves, nodes of 174 and 82 links, the root
    assert report["out"] == report["src"]
    with open(tmp_path / "src.bin", "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == report["src"]
    growth = report["after"] - report["before"]
    assert growth < MAX_GROWTH_BYTES, f"peak memory grew by {growth >> 20} MiB"
    print(f"peak memory growth: {growth / (1 << 20):.1f} MiB")
