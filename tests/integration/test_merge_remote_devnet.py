"""``neuroseed model merge --remote`` on a devnet of real processes (loopback only, every wait
bounded): node1 and node2 run ``--provide-compute`` (offers on chain); a requester registers two
tiny MLP parents and, through node1's JSON-RPC (whose compute agent gives the default platform
class), runs ``model merge --parents A B --method linear --remote … -o FILE --register``: the
merge task is claimed and run by one provider, re-run by the other as its verifier, ends PAID;
the output is downloaded (its SHA-256 is the result's state hash) and registered as a model
whose lineage names both parents and the recipe the task ran.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from node.merge.recipe import MergeRecipe
from tests.integration.procs import NodeRpc, Procs, cli_json, init_devnet, wait_until
from tests.integration.test_compute_devnet import WAIT_S, _enable_compute, _template

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

REQUESTER = 103  # a funded dev key of the devnet genesis
SPEC = {"family": "mlp", "input_dim": 4, "hidden": [8], "num_classes": 2}


def test_a_remote_merge_is_run_verified_paid_downloaded_and_registered(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    summary = init_devnet(tmp_path / "devnet", 1, 2, _template(tmp_path / "template.json"))
    logs = tmp_path / "logs"
    logs.mkdir()
    with Procs(logs) as procs:
        try:
            _scenario(procs, summary, tmp_path)
        except BaseException:
            for p in procs.started:
                print(f"--- {p.name} (log tail) ---\n{p.log_tail(60)}")
            raise


def _scenario(procs: Procs, summary: dict[str, Any], tmp: Path) -> None:
    from node.devnet import operator_dev_key
    from tests.test_cli_models import write_model, write_spec

    dirs = {n["node"]: Path(n["datadir"]) for n in summary["nodes"]}
    for i in (1, 2):
        _enable_compute(dirs[i])
    nodes = [
        procs.node(f"node{i}", dirs[i], *(("--provide-compute",) if i else ())) for i in range(3)
    ]
    rpcs = [NodeRpc(p.wait_for_rpc_url(), timeout=30.0) for p in nodes]
    try:
        wait_until(
            lambda: rpcs[0].status()["peers"] >= 2 and min(r.height() for r in rpcs) >= 2,
            WAIT_S,
            "the full nodes connected and syncing",
            interval=0.3,
        )
        on = {i: ("--rpc", rpcs[i].url, "--datadir", str(dirs[i])) for i in range(3)}
        for i in (1, 2):
            op = str(operator_dev_key(i))
            cli_json("role", "register", "compute_provider", "--dev-key", op, *on[i])
            offer = cli_json("compute", "offer", "--timeout", str(WAIT_S), *on[i])
            assert offer["receipt"]["success"] and offer["provider"] is not None
        req = str(REQUESTER)
        cli_json("role", "register", "model_developer", "--dev-key", req, *on[1])
        spec = write_spec(tmp / "spec.json", SPEC)
        parents = [
            cli_json(
                "model", "register", str(write_model(tmp / f"p{s}.safetensors", SPEC, s)),
                "--spec", str(spec), "--name", f"parent {s}", "--dev-key", req, *on[1],
            )["id"]
            for s in (1, 2)
        ]  # fmt: skip
        out = tmp / "child.safetensors"
        merged = cli_json(
            "model", "merge", "--parents", *parents, "--method", "linear",
            "--coefficients", "0.25", "0.75", "--remote", "--max-price", "5",
            "--verifier-fee", "0.5", "--verifiers", "1", "--wall-seconds", "120",
            "--memory", "1GiB", "--deadline", "150", "--watch-timeout", "90",
            "--fetch-timeout", "30", "-o", str(out), "--register", "--name", "child",
            "--dev-key", req, *on[1],
            timeout=150,
        )  # fmt: skip
        task = merged["task"]
        assert task["state"] == "ended" and task["outcome"] == "paid", task
        assert task["recipe"] == "merge" and task["provider"] is not None
        verifier = task["verifierSlots"][0]["address"]
        assert verifier != task["provider"]
        assert merged["payments"]["verifiersPaid"] == {verifier: str(10**18 // 2)}
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
        assert merged["sha256"] == digest
        assert "0x" + digest == task["result"]["checkpoints"][0]["stateHash"]
        registration = merged["registration"]
        assert registration["receipt"]["success"], registration
        child = cli_json("model", "show", merged["id"], *on[1])
        assert child["name"] == "child" and child["parents"] == parents
        expected = MergeRecipe.create(
            "linear",
            [bytes.fromhex(p[2:]) for p in parents],
            coefficients=[0.25, 0.75],
        )
        recipe = json.loads(Path(merged["recipeFile"]).read_text())
        assert recipe["coefficients"] == [0.25, 0.75] and recipe["parents"] == parents
        assert merged["recipe"]["method"] == expected.method
    finally:
        for rpc in rpcs:
            rpc.close()
