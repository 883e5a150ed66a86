"""``neuroseed model …`` (``node.cli_models``): input errors refused before anything is sent,
then register / show / search / lineage ``--verify`` and merge errors against a real node run
in this process (``node.service.run_node``: chain, consensus, mempool with the availability
check, artifact service, model search index, JSON-RPC), and — marked slow, since the merge
runs in a child process — ``model merge --register`` with transfer learning on a dataset.
The multi-process story with trained parents is ``tests/integration/test_models_devnet.py``."""

from __future__ import annotations

import dataclasses
import json
import pickle
import struct
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from node import cli, cli_models, service
from node.config import NodeConfig
from node.devkeys import dev_key
from node.economy.models import edge_key
from node.genesis import genesis_to_json, load_genesis
from node.merge.recipe import MergeRecipe
from node.models.safetensors_header import TensorInfo, encode_header
from node.models.specs import parse_spec, spec_header, spec_json
from node.service import NodeHandle, run_node

REPO = Path(__file__).resolve().parents[1]
DEV = 3  # a funded dev key: model developer and data supplier
SPEC = {"family": "mlp", "input_dim": 4, "hidden": [8], "num_classes": 2}
UNREACHABLE = ("--rpc", "http://127.0.0.1:9/")


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.ENV_DATADIR, raising=False)


def run(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def arun(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = await trio.to_thread.run_sync(cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def floats(n: int, seed: int) -> bytes:
    """``n`` small float32 values from a fixed LCG (no NaN, no infinity)."""
    out, state = [], seed * 7919 + 1
    for _ in range(n):
        state = (state * 1103515245 + 12345) % (1 << 31)
        out.append((state / (1 << 31) - 0.5) * 0.5)
    return struct.pack(f"<{n}f", *out)


def write_model(path: Path, spec: dict[str, Any], seed: int) -> Path:
    """A compact safetensors file of ``spec`` (the node converts it to format v1 on upload)."""
    header = spec_header(parse_spec(spec))
    raw = encode_header(header.tensors, None)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + floats(header.data_size // 4, seed))
    return path


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(json.dumps(spec))
    return path


def write_dataset(path: Path, rows: int) -> Path:
    """x: F32 (rows, 4), y: I64 — the label is whether x0 + x1 > 0 (learnable in a few steps)."""
    x = floats(rows * 4, 77)
    vals = struct.unpack(f"<{rows * 4}f", x)
    y = b"".join(struct.pack("<q", int(vals[4 * i] + vals[4 * i + 1] > 0)) for i in range(rows))
    raw = encode_header(
        [
            TensorInfo("x", "F32", (rows, 4), 0, len(x)),
            TensorInfo("y", "I64", (rows,), len(x), len(x) + len(y)),
        ],
        None,
    )
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + x + y)
    return path


# --- refused before any connection ----------------------------------------------------------------


def test_register_refuses_a_pickle_and_a_file_that_is_not_its_spec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(tmp_path / "spec.json", SPEC)
    pkl = tmp_path / "model.pt"
    pkl.write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    base = ["model", "register", "--spec", str(spec), "--name", "m", "--dev-key", "1"]
    code, _, err = run([*base, str(pkl), *UNREACHABLE], capsys)
    assert code == 1 and "not a safetensors" in err
    other = write_model(tmp_path / "wide.safetensors", {**SPEC, "hidden": [9]}, 1)
    code, _, err = run([*base, str(other), *UNREACHABLE], capsys)
    assert code == 1 and "the spec says" in err
    bad_spec = write_spec(tmp_path / "bad.json", {**SPEC, "family": "lstm"})
    good = write_model(tmp_path / "m.safetensors", SPEC, 1)
    code, _, err = run(
        ["model", "register", str(good), "--spec", str(bad_spec), "--name", "m", *UNREACHABLE],
        capsys,
    )
    assert code == 1 and "not in the registry" in err
    code, _, err = run([*base, str(good), "--metric", "acc=0.1234567", *UNREACHABLE], capsys)
    assert code == 1 and "6 decimals" in err
    code, _, err = run([*base, str(good), "--parents", "0x" + "11" * 32, *UNREACHABLE], capsys)
    assert code == 1 and "--recipe" in err


def test_argument_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = run(["model", "search", *UNREACHABLE], capsys)
    assert code == 2  # one criterion is required
    code, _, _ = run(
        ["model", "search", "--text", "a", "--signature", "0x00", *UNREACHABLE], capsys
    )
    assert code == 2
    code, _, err = run(["model", "search", "--signature", "0x12", *UNREACHABLE], capsys)
    assert code == 1 and "64 hex" in err
    code, _, err = run(["model", "lineage", "0x" + "00" * 32, "--depth", "0", *UNREACHABLE], capsys)
    assert code == 1 and "--depth" in err
    code, _, err = run(["model", "show", "nonsense", *UNREACHABLE], capsys)
    assert code == 1 and "neither a model id" in err
    code, _, err = run(
        ["model", "merge", "--parents", "0x" + "00" * 32, "--method", "average", *UNREACHABLE],
        capsys,
    )
    assert code == 1 and "unknown merge method" in err and "rebasin" in err
    code, _, err = run(["model", "show", "0x" + "00" * 32, *UNREACHABLE], capsys)
    assert code == 3


def test_metric_and_recipe_round_trips() -> None:
    m = cli_models.parse_metric("val_accuracy=0.973")
    assert m.name == "val_accuracy" and m.value == 973_000
    assert cli_models.parse_metric("loss=-1.5").value == -1_500_000
    recipe = MergeRecipe.create(
        "zipit",
        [b"\x01" * 32, b"\x02" * 32],
        params={},
        seed=b"\x07" * 32,
        platform="torch x; cpu",
        child_spec=spec_json(parse_spec({**SPEC, "num_classes": 4})),
        class_maps=[[0, 1], [2, 3]],
        datasets=[b"\x09" * 32],
    )
    again = cli_models.recipe_from_json(
        json.loads(json.dumps(cli_models.recipe_to_json(recipe))), "test"
    )
    assert again.encode() == recipe.encode()
    ties = MergeRecipe.create(
        "ties", [b"\x01" * 32], base=b"\x03" * 32, coefficients=[0.1 + 0.2],
        params={"density": 1 / 3},
    )  # fmt: skip
    back = cli_models.recipe_from_json(cli_models.recipe_to_json(ties), "test")
    assert back.encode() == ties.encode()  # floats survive JSON exactly
    with pytest.raises(cli.CliError, match="unknown recipe field"):
        cli_models.recipe_from_json({**cli_models.recipe_to_json(ties), "x": 1}, "test")


def test_child_specs_of_data_merges() -> None:
    a = parse_spec({**SPEC, "hidden": [8, 6]})
    b = parse_spec({**SPEC, "hidden": [8, 6], "num_classes": 3})
    zipped = cli_models.child_spec_for("zipit", [a, b], 5, None)
    assert zipped.hidden == (8, 6) and zipped.num_classes == 5  # type: ignore[union-attr]
    union = cli_models.child_spec_for("feature_union", [a, b], 5, None)
    assert union.hidden == (16, 12)  # type: ignore[union-attr]
    c = parse_spec({**SPEC, "hidden": [4, 6]})
    with pytest.raises(cli.CliError, match="equal widths"):
        cli_models.child_spec_for("zipit", [a, c], 5, None)


# --- against a node in this process -------------------------------------------------------------


@dataclasses.dataclass
class Devnode:
    url: str
    handle: NodeHandle
    tmp: Path

    @property
    def rpc(self) -> tuple[str, str]:
        return ("--rpc", self.url)


@pytest.fixture
async def devnode(
    nursery: trio.Nursery,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Devnode:
    # run_node's once-per-process collector tuning (gc.freeze) is for a node process, not pytest
    monkeypatch.setattr(service, "tune_gc", lambda: None)
    genesis = load_genesis(REPO / "genesis.json")
    fast = dataclasses.replace(
        genesis.votable_params,
        timeout_propose_ms=1000,
        timeout_prevote_ms=300,
        timeout_precommit_ms=300,
        timeout_commit_ms=50,
    )
    genesis = dataclasses.replace(genesis, votable_params=fast)
    datadir = tmp_path / "node"
    datadir.mkdir()
    (datadir / "genesis.json").write_text(genesis_to_json(genesis))
    config = NodeConfig(data_dir=datadir, rpc_port=0, p2p_listen_addrs=())
    handle: NodeHandle = await nursery.start(
        partial(run_node, config, key=dev_key(0), genesis=genesis)
    )
    node = Devnode(handle.rpc_url, handle, tmp_path)
    for role in ("model_developer", "data_supplier"):
        code, _, err = await arun(
            ["role", "register", role, "--dev-key", str(DEV), *node.rpc], capsys
        )
        assert code == 0, err
    return node


async def register(
    node: Devnode, capsys: pytest.CaptureFixture[str], name: str, seed: int, *extra: str,
    spec: dict[str, Any] = SPEC,
) -> dict[str, Any]:  # fmt: skip
    path = write_model(node.tmp / f"{name}.safetensors", spec, seed)
    spec_file = write_spec(node.tmp / f"{name}.spec.json", spec)
    code, out, err = await arun(
        [
            "model",
            "register",
            str(path),
            "--spec",
            str(spec_file),
            "--name",
            name,
            "--description",
            f"{name}: a tiny test MLP",
            "--dev-key",
            str(DEV),
            "--json",
            *extra,
            *node.rpc,
        ],
        capsys,
    )
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    assert result["receipt"]["success"], result
    return result


async def wait_indexed(node: Devnode, capsys: pytest.CaptureFixture[str], model: str) -> None:
    with trio.fail_after(10):
        while True:
            code, out, err = await arun(
                ["model", "search", "--text", "tiny", "--limit", "100", "--json", *node.rpc],
                capsys,
            )
            assert code == 0, err
            if model in {m["id"] for m in json.loads(out)["models"]}:
                return
            await trio.sleep(0.1)


async def test_register_show_search_and_verified_lineage(
    devnode: Devnode, capsys: pytest.CaptureFixture[str]
) -> None:
    node = devnode
    a = await register(node, capsys, "alpha", 1)
    b = await register(node, capsys, "beta", 2, "--metric", "val_accuracy=0.91", "--license", "MIT")
    other = await register(node, capsys, "gamma", 3, spec={**SPEC, "num_classes": 3})
    assert a["family"] == "mlp" and a["signature"] == b["signature"] != other["signature"]

    code, out, err = await arun(["model", "show", b["cid"], *node.rpc], capsys)
    assert code == 0, err
    assert "beta" in out and "metric val_accuracy" in out and "0.91" in out and "MIT" in out
    code, out, _ = await arun(["model", "show", b["id"], "--json", *node.rpc], capsys)
    shown = json.loads(out)
    assert shown["id"] == b["id"] and shown["metrics"][0]["millionths"] == 910_000

    # A child registered as the linear merge of alpha and beta, with the recipe file.
    recipe = MergeRecipe.create(
        "linear",
        [bytes.fromhex(a["id"][2:]), bytes.fromhex(b["id"][2:])],
        coefficients=[0.5, 0.5],
    )
    recipe_file = node.tmp / "r.json"
    recipe_file.write_text(json.dumps(cli_models.recipe_to_json(recipe)))
    child = await register(
        node, capsys, "child", 4, "--parents", a["id"], b["id"], "--recipe", str(recipe_file)
    )
    await wait_indexed(node, capsys, child["id"])

    # search: by signature, mergeable with alpha (and how), by text
    code, out, _ = await arun(
        ["model", "search", "--signature", a["signature"], "--json", *node.rpc], capsys
    )
    assert {m["name"] for m in json.loads(out)["models"]} == {"alpha", "beta", "child"}
    code, out, _ = await arun(
        ["model", "search", "--mergeable-with", a["id"], "--json", *node.rpc], capsys
    )
    page = json.loads(out)
    rel = {m["name"]: m for m in page["models"]}
    assert set(rel) == {"beta", "child", "gamma"} and page["reference"]["name"] == "alpha"
    assert rel["beta"]["relation"] == "same_signature"
    assert {"linear", "weight_matching", "zipit"} <= set(rel["beta"]["methods"])
    assert rel["gamma"]["relation"] == "same_widths" and "zipit" in rel["gamma"]["methods"]
    code, out, _ = await arun(["model", "search", "--mergeable-with", a["cid"], *node.rpc], capsys)
    assert code == 0 and "rebasin" in out and "same_widths" in out
    code, out, _ = await arun(["model", "search", "--text", "gamma", "--json", *node.rpc], capsys)
    assert next(m["name"] for m in json.loads(out)["models"]) == "gamma"

    # lineage --verify: both parents, every edge and record proven against the state root
    code, out, err = await arun(["model", "lineage", child["id"], "--verify", *node.rpc], capsys)
    assert code == 0, err
    assert "alpha" in out and "beta" in out and out.count("[proof ok]") == 2
    assert "verified: 2 edges and 3 model records" in out
    code, out, _ = await arun(
        ["model", "lineage", a["id"], "--descendants", "--verify", "--json", *node.rpc], capsys
    )
    down = json.loads(out)
    assert [e["child"] for e in down["edges"]] == [child["id"]]
    assert down["verified"] == {"edges": 1, "models": 2}

    # A tampered answer is caught: another relation, another proof, another root.
    with cli._client(argparse_ns(node)) as client:
        answer = client.get_lineage(child["id"], proofs=True)
        cli_models.verify_lineage(client, answer)
        edge = answer["edges"][0]
        for broken in (
            {**edge, "relationCode": 2},
            {**edge, "proof": {**edge["proof"], "proof": edge["proof"]["proof"][:-2] + "00"}},
            {**edge, "child": a["id"]},
        ):
            with pytest.raises(cli.CliError):
                cli_models.verify_lineage(client, {**answer, "edges": [broken]})
        with pytest.raises(cli.CliError, match="not the one of block"):
            cli_models.verify_lineage(client, {**answer, "stateRoot": "0x" + "00" * 32})
        key = edge_key(bytes.fromhex(a["id"][2:]), bytes.fromhex(child["id"][2:]))
        assert edge["key"] == "0x" + key.hex()

    # register: the recipe must match the listed parents; a duplicate root is refused on chain
    code, _, err = await arun(
        [
            "model",
            "register",
            str(node.tmp / "child.safetensors"),
            "--spec",
            str(node.tmp / "child.spec.json"),
            "--name",
            "x",
            "--parents",
            b["id"],
            a["id"],
            "--recipe",
            str(recipe_file),
            "--dev-key",
            str(DEV),
            *node.rpc,
        ],
        capsys,
    )
    assert code == 1 and "recipe's parents" in err
    code, _, err = await arun(
        [
            "model",
            "register",
            str(node.tmp / "alpha.safetensors"),
            "--spec",
            str(node.tmp / "alpha.spec.json"),
            "--name",
            "again",
            "--dev-key",
            str(DEV),
            *node.rpc,
        ],
        capsys,
    )
    assert code == 1 and "already" in err

    # merge errors, before any download or child process
    merge = ["model", "merge", "--parents", a["id"], b["id"], *node.rpc]
    code, _, err = await arun([*merge, "--method", "ties"], capsys)
    assert code == 1 and "--base" in err
    code, _, err = await arun([*merge, "--method", "zipit"], capsys)
    assert code == 1 and "--target-dataset" in err
    code, _, err = await arun([*merge, "--method", "slerp", "--coefficients", "1", "2"], capsys)
    assert code == 1 and "coefficients" in err
    code, _, err = await arun(
        ["model", "merge", "--parents", a["id"], other["id"], "--method", "rebasin", *node.rpc],
        capsys,
    )
    assert code == 1 and "one signature" in err and "--mergeable-with" in err
    code, _, err = await arun(
        ["model", "merge", "--parents", a["id"], "0x" + "ee" * 32, "--method", "linear",
         *node.rpc], capsys,
    )  # fmt: skip
    assert code == 1 and "no parent" in err


def argparse_ns(node: Devnode) -> Any:
    import argparse

    return argparse.Namespace(rpc=node.url, datadir=None)


@pytest.mark.slow
async def test_merge_transfer_learn_and_register(
    devnode: Devnode, capsys: pytest.CaptureFixture[str]
) -> None:
    node = devnode
    a = await register(node, capsys, "left", 11)
    b = await register(node, capsys, "right", 12)
    data = write_dataset(node.tmp / "xor.safetensors", 256)
    code, out, err = await arun(
        ["dataset", "add", str(data), "--name", "signs", "--price", "0", "--dev-key", str(DEV),
         "--json", *node.rpc],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    dataset = json.loads(out)["id"]
    child_file = node.tmp / "out" / "child.safetensors"
    code, out, err = await arun(
        [
            "model",
            "merge",
            "--parents",
            a["id"],
            b["id"],
            "--method",
            "linear",
            "--target-dataset",
            dataset,
            "--steps",
            "60",
            "--lr",
            "0.05",
            "-o",
            str(child_file),
            "--register",
            "--name",
            "merged",
            "--dev-key",
            str(DEV),
            "--json",
            *node.rpc,
        ],
        capsys,
    )
    assert code == 0, err
    result = json.loads(out)
    assert child_file.exists() and Path(result["recipeFile"]).exists()
    assert result["metrics"]["val_accuracy"] > 0.75  # learnable in 60 steps from the merge
    assert result["recipe"]["method"] == "linear" and "torch" in result["recipe"]["platform"]
    reg = result["registration"]
    assert reg["receipt"]["success"] and reg["id"] == result["id"]
    code, out, _ = await arun(["model", "show", result["id"], "--json", *node.rpc], capsys)
    shown = json.loads(out)
    assert shown["parents"] == [a["id"], b["id"]] and shown["datasets"] == [dataset]
    assert {m["name"] for m in shown["metrics"]} == {"val_accuracy", "val_loss"}
    assert shown["recipe"]["method"] == "linear"
    code, out, err = await arun(
        ["model", "lineage", result["id"], "--verify", "--json", *node.rpc], capsys
    )
    assert code == 0, err
    assert json.loads(out)["verified"]["edges"] == 2

    # weight matching without a target dataset: no training, the recipe records no platform
    rebased = node.tmp / "rebased.safetensors"
    code, out, err = await arun(
        ["model", "merge", "--parents", a["id"], b["id"], "--method", "rebasin",
         "-o", str(rebased), "--json", *node.rpc],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert rebased.exists() and result["recipe"]["method"] == "weight_matching"
    assert result["recipe"]["platform"] == "" and result["metrics"] == {}
    assert result["recipe"]["coefficients"] == [0.5, 0.5] and result["registration"] is None
    # distillation: the student is trained on the target dataset itself, measured held out
    code, out, err = await arun(
        ["model", "merge", "--parents", a["id"], b["id"], "--method", "distill",
         "--class-map", "0,1", "--class-map", "0,1", "--target-dataset", dataset,
         "--steps", "40", "--lr", "0.05", "-o", str(node.tmp / "student.safetensors"),
         "--json", *node.rpc],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["childSpec"]["num_classes"] == 2 and result["recipe"]["params"]["steps"] == 40
    assert 0.0 <= result["metrics"]["val_accuracy"] <= 1.0
