"""Issue 6's "Done means" on a devnet of real processes (loopback only, every wait bounded):

two developers train tiny MLPs on scikit-learn's digits 0–4 and 5–9 (each in a worker child
process) and register them with their training datasets, one on each node; the first developer
merges them on the full node with ZipIt! — the second parent fetched from the validator over
the chunk exchange — transfer-learns the child on all ten digits, registers it with its lineage
(parents, recipe, dataset, held-out metrics), finds it with ``model search`` (mergeable with a
parent, and by text), and ``model lineage --verify`` shows both parents with valid state proofs.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from node.compute.worker import run_job
from tests.integration.procs import (
    REPO,
    NodeRpc,
    Procs,
    cli_env,
    fast_genesis,
    init_devnet,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

WAIT_S = 60.0
DEV_A = 103  # funded dev keys of the devnet genesis: two model developers
DEV_B = 104
SPEC = {"family": "mlp", "input_dim": 64, "hidden": [32, 32], "num_classes": 5}


def run_cli(*args: str, timeout: float = WAIT_S + 60) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "node", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        cwd=REPO,
    )
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def digits_file(path: Path, low: int | None) -> Path:
    """Digits as a dataset file: ``x`` F32 (n, 64) in [0, 1] and ``y`` I64. ``low`` = 0 or 5
    keeps those five digits, labelled 0–4; None keeps all ten, labelled 0–9."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.data / 16.0).astype("<f4"), d.target.astype("<i8")
    if low is not None:
        keep = (y >= low) & (y < low + 5)
        x, y = x[keep], y[keep] - low
    xb, yb = np.ascontiguousarray(x).tobytes(), np.ascontiguousarray(y).tobytes()
    header = json.dumps(
        {
            "x": {"dtype": "F32", "shape": list(x.shape), "data_offsets": [0, len(xb)]},
            "y": {"dtype": "I64", "shape": [len(y)], "data_offsets": [len(xb), len(xb) + len(yb)]},
        },
        separators=(",", ":"),
    ).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + xb + yb)
    return path


def train_parent(data: Path, out: Path, seed: int) -> dict[str, Any]:
    """A digits MLP trained in a worker child process (the test process stays torch-free)."""
    job = {
        "kind": "finetune",
        "spec": SPEC,
        "data": str(data),
        "val_fraction": 0.2,
        "config": {"steps": 300, "lr": 0.01, "seed": seed},
        "output": str(out),
    }
    return run_job(job, time_limit_s=120)


def test_models_on_a_devnet(tmp_path: Path) -> None:
    template = fast_genesis(tmp_path / "template.json")
    summary = init_devnet(tmp_path / "devnet", 1, 1, template)
    logs = tmp_path / "logs"
    logs.mkdir()
    with Procs(logs) as procs:
        try:
            _scenario(procs, summary, tmp_path)
        except BaseException:
            for p in procs.started:
                print(f"--- {p.name} (log tail) ---\n{p.log_tail(40)}")
            raise


def _scenario(procs: Procs, summary: dict[str, Any], tmp: Path) -> None:
    dirs = {n["node"]: Path(n["datadir"]) for n in summary["nodes"]}
    # Train the parents while the nodes start (two children, one each).
    data = {k: digits_file(tmp / f"digits_{k}.safetensors", low) for k, low in
            (("low", 0), ("high", 5), ("all", None))}  # fmt: skip
    trained: dict[str, dict[str, Any]] = {}

    def train(name: str, seed: int) -> None:
        trained[name] = train_parent(data[name], tmp / f"{name}.safetensors", seed)

    threads = [threading.Thread(target=train, args=a) for a in (("low", 1), ("high", 2))]
    for t in threads:
        t.start()
    validator = procs.node("node0", dirs[0])
    full = procs.node("node1", dirs[1])
    val_url, url = validator.wait_for_rpc_url(), full.wait_for_rpc_url()
    rpc = NodeRpc(url)
    try:
        wait_until(
            lambda: rpc.height() >= 2 and rpc.status()["peers"] >= 1,
            WAIT_S,
            "the full node syncing from the validator",
            interval=0.3,
        )
    finally:
        rpc.close()
    for t in threads:
        t.join(timeout=WAIT_S)
    assert set(trained) == {"low", "high"}
    for name in ("low", "high"):
        assert trained[name]["metrics"]["val_accuracy"] > 0.9

    on_full = ("--rpc", url, "--datadir", str(dirs[1]))
    on_validator = ("--rpc", val_url, "--datadir", str(dirs[0]))
    for key, where in ((DEV_A, on_full), (DEV_B, on_validator)):
        for role in ("model_developer", "data_supplier"):
            run_cli("role", "register", role, "--dev-key", str(key), *where)
    sets = {}
    for name, key, where in (("low", DEV_A, on_full), ("high", DEV_B, on_validator),
                             ("all", DEV_A, on_full)):  # fmt: skip
        sets[name] = run_cli(
            "dataset", "add", str(data[name]), "--name", f"digits {name}", "--price", "0",
            "--dev-key", str(key), *where,
        )["id"]  # fmt: skip
    spec_file = tmp / "spec.json"
    spec_file.write_text(json.dumps(SPEC))
    parents = {}
    for name, key, where, title in (
        ("low", DEV_A, on_full, "digits 0-4"),
        ("high", DEV_B, on_validator, "digits 5-9"),
    ):
        acc = round(trained[name]["metrics"]["val_accuracy"], 6)
        parents[name] = run_cli(
            "model", "register", trained[name]["output"], "--spec", str(spec_file),
            "--name", title, "--description", f"MLP classifying handwritten {title}",
            "--datasets", sets[name], "--metric", f"val_accuracy={acc}",
            "--dev-key", str(key), *where,
        )  # fmt: skip
        assert parents[name]["receipt"]["success"]
    low, high = parents["low"], parents["high"]
    assert low["signature"] == high["signature"]

    # Merge on the full node: the "high" parent is fetched from the validator.
    child_file = tmp / "child" / "digits-0-9.safetensors"
    merged = run_cli(
        "model", "merge", "--parents", low["id"], high["id"], "--method", "zipit",
        "--target-dataset", sets["all"], "--steps", "150", "-o", str(child_file),
        "--register", "--name", "digits 0-9", "--dev-key", str(DEV_A), *on_full,
        timeout=WAIT_S + 120,
    )  # fmt: skip
    assert child_file.exists() and merged["childSpec"]["num_classes"] == 10
    assert merged["metrics"]["val_accuracy"] > 0.9, merged["metrics"]
    assert merged["registration"]["receipt"]["success"]
    child = merged["id"]
    shown = run_cli("model", "show", child, *on_full)
    assert shown["parents"] == [low["id"], high["id"]]
    assert shown["recipe"]["method"] == "zipit" and shown["datasets"] == [sets["all"]]
    assert shown["depth"] == 1
    assert any(m["name"] == "val_accuracy" for m in shown["metrics"])

    # Search finds it: mergeable with a parent (same widths, another head) and by text.
    def found() -> dict[str, Any] | None:
        page = run_cli("model", "search", "--mergeable-with", low["id"], *on_full)
        hits = {m["id"]: m for m in page["models"]}
        return page if child in hits and high["id"] in hits else None

    page = wait_until(found, WAIT_S, "the child in the full node's search index", interval=0.5)
    hits = {m["id"]: m for m in page["models"]}
    assert hits[high["id"]]["relation"] == "same_signature"
    assert "zipit" in hits[high["id"]]["methods"]
    assert hits[child]["relation"] == "same_widths" and "zipit" in hits[child]["methods"]
    text = run_cli("model", "search", "--text", "digits 0-9", *on_full)
    assert text["models"][0]["id"] == child
    # The validator's own index finds it too.
    wait_until(
        lambda: child in {m["id"] for m in run_cli(
            "model", "search", "--signature", shown["signature"], *on_validator)["models"]},
        WAIT_S,
        "the child in the validator's search index",
        interval=0.5,
    )  # fmt: skip

    # Lineage with proofs: both parents, every edge and record verified against the state root.
    lineage = run_cli("model", "lineage", child, "--verify", *on_full)
    assert {e["ancestor"] for e in lineage["edges"]} == {low["id"], high["id"]}
    assert lineage["verified"] == {"edges": 2, "models": 3}
    down = run_cli("model", "lineage", high["id"], "--descendants", "--verify", *on_validator)
    assert [e["child"] for e in down["edges"]] == [child]
