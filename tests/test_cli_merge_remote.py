"""``neuroseed model merge --remote`` (``node.cli_models.merge_remote``): the merge options as the
"merge" task recipe's parameters (``merge_task_params``, read back by ``recipes.merge_recipe`` to
the same recipe), the option errors refused before anything is asked of a node, and against a
real node run in this process (``tests/test_cli_models.py``'s ``devnode``): no provider on chain,
a submission whose task on chain carries the recipe and the parents as inputs, and a watch
that gives up while no provider claims it. The paid end to end run (a provider merging, a
verifier, the download and the registration) is ``tests/integration/test_merge_remote_devnet.py``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from node import cli_models
from node.compute import recipes
from node.merge.recipe import MergeRecipe
from node.models.specs import parse_spec, spec_json
from tests.test_cli_models import (  # noqa: F401  (devnode: the fixture)
    SPEC,
    UNREACHABLE,
    Devnode,
    arun,
    devnode,
    no_env,
    register,
    run,
)

A, B, BASE, DATA = (bytes([i]) * 32 for i in (1, 2, 3, 4))
CHILD = {"family": "mlp", "input_dim": 4, "hidden": [16], "num_classes": 4}


@pytest.mark.parametrize(
    "recipe",
    [
        MergeRecipe.create("linear", [A, B], coefficients=[0.25, 0.75]),
        MergeRecipe.create("ties", [A, B], base=BASE, coefficients=[1.0, 1.0],
                           params={"density": 0.2, "scale": 0.5}, seed=b"\x07" * 32),
        MergeRecipe.create("slerp", [A, B], params={"t": 0.3}),
        MergeRecipe.create("weight_matching", [A, B], coefficients=[0.5, 0.5]),
        MergeRecipe.create("zipit", [A, B], child_spec=spec_json(parse_spec(CHILD)),
                           class_maps=[[0, 1], [2, 3]], datasets=[DATA]),
    ],
    ids=lambda r: r.method,
)  # fmt: skip
def test_the_task_params_read_back_to_the_same_recipe(recipe: MergeRecipe) -> None:
    tree = cli_models.merge_task_params(recipe)
    parsed = recipes.validate_task_params("merge", recipes.canonical_params(tree))
    assert recipes.merge_recipe(parsed).encode() == recipe.encode()
    assert tree["parents"] == [A.hex(), B.hex()]  # lowercase hex, no 0x (the schema's ids)
    assert ("base" in tree) == (recipe.base is not None)
    assert ("child_spec" in tree) == bool(recipe.child_spec)


MERGE = ["model", "merge", "--parents", "0x" + A.hex(), "0x" + B.hex(), "--method", "linear"]
REMOTE = [*MERGE, "--remote", "--max-price", "1"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-price", "1"], "--max-price goes with --remote"),
        (["--platform", "cpu-x"], "--platform goes with --remote"),
        (["--remote"], "--remote needs --max-price"),
        (["--remote", "--max-price", "1", "--threads", "2"], "--threads goes with a merge on"),
        (["--remote", "--max-price", "1", "--device", "cuda"], "--device goes with a merge on"),
        (["--remote", "--max-price", "1", "--time-limit", "9"], "--time-limit goes with"),
        (["--remote", "--max-price", "1", "--slice-rows", "9"], "--slice-rows goes with"),
        (["--remote", "--max-price", "1", "--steps", "9"], "--steps goes with a merge on"),
        (["--remote", "--max-price", "1", "--target-dataset", "0x" + DATA.hex()],
         "transfer learning after a linear merge runs on this machine"),
        (["--remote", "--max-price", "1", "--register", "--name", "c", "--no-wait"],
         "--register needs the task's result"),
        (["--remote", "--max-price", "0"], "--max-price"),
        (["--remote", "--max-price", "lots"], "--max-price"),
        (["--remote", "--max-price", "1", "--verifiers", "0"], "--verifiers: expected 1 to"),
        (["--remote", "--max-price", "1", "--memory", "much"], "--memory"),
        (["--remote", "--max-price", "1", "--deadline", "0"], "--deadline: expected a positive"),
        (["--remote", "--max-price", "1", "--wall-seconds", "0"], "--wall-seconds: expected"),
        (["--remote", "--max-price", "1", "--watch-timeout", "0"], "--watch-timeout: expected"),
        (["--remote", "--max-price", "1", "--register"], "--register needs --name"),
    ],
)  # fmt: skip
def test_option_errors_are_refused_before_any_connection(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run([*MERGE, *extra, *UNREACHABLE], capsys)
    assert code == 1 and message in err, err  # 3 would mean it tried the node
    assert out == ""


def test_distill_takes_its_training_options_remotely(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["model", "merge", "--parents", "0x" + A.hex(), "0x" + B.hex(), "--method", "distill"]
    code, _, err = run(
        [*argv, "--remote", "--max-price", "1", "--steps", "9", *UNREACHABLE], capsys
    )
    assert code == 3, err  # accepted: it went on to the (unreachable) node


async def test_against_a_node_platform_submission_and_watch(
    devnode: Devnode,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    node = devnode
    a = await register(node, capsys, "alpha", 1)
    b = await register(node, capsys, "beta", 2)
    argv = ["model", "merge", "--parents", a["id"], b["id"], "--method", "linear"]
    remote = [*argv, "--remote", "--max-price", "2", "--dev-key", "3", *node.rpc]
    # No compute provider is registered on chain: --platform must name the class.
    code, _, err = await arun(remote, capsys)
    assert code == 1 and "--platform: name the platform class the merge task" in err, err
    assert "no compute provider is registered on chain" in err

    code, out, err = await arun(
        [*remote, "--platform", "cpu-test", "--coefficients", "0.3", "0.7", "--verifiers", "2",
         "--verifier-fee", "0.01", "--deadline", "50", "--memory", "256MiB", "--no-wait",
         "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    sent: dict[str, Any] = json.loads(out)
    tid = sent["taskId"]
    assert sent["submission"]["taskId"] == tid and sent["task"] is None
    with trio.fail_after(20):  # --no-wait: in a block soon
        while True:
            code, out, err = await arun(["task", "show", tid, "--json", *node.rpc], capsys)
            if code == 0:
                break
            assert "no task" in err, err
            await trio.sleep(0.2)
    task = json.loads(out)
    assert task["recipe"] == "merge" and task["platformClass"] == "cpu-test"
    assert task["verifiers"] == 2 and task["verifierFee"] == str(10**16)
    assert task["maxPrice"] == str(2 * 10**18) and task["limits"]["deviceMemory"] == 256 << 20
    assert task["limits"]["wallSeconds"] == 3600 and task["limits"]["steps"] == 0
    assert {(i["kind"], i["ref"]) for i in task["inputs"]} == {
        ("model", a["id"]),
        ("model", b["id"]),
    }
    recipe = recipes.merge_recipe(recipes.validate_task_params("merge", task["params"].encode()))
    expected = MergeRecipe.create(
        "linear",
        [bytes.fromhex(a["id"][2:]), bytes.fromhex(b["id"][2:])],
        coefficients=[0.3, 0.7],
    )
    assert recipe.encode() == expected.encode()

    # Followed like `task watch`: nobody claims it here, so the watch gives up (exit 1); the
    # task goes on.
    code, _, err = await arun(
        [*remote, "--platform", "cpu-test", "--watch-timeout", "0.5", "--seed", "1"], capsys
    )
    assert code == 1 and "is still open after 0.5 s" in err, err
