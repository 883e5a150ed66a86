"""``neuroseed model …``: register, inspect, search and merge models (issue 6, DESIGN §8).

* ``model register FILE --spec SPEC.json --name N [--base ID] [--parents A B --recipe R.json]
  [--datasets D …] [--metric name=value …] [--price NSD] [--royalty ADDR=BPS …]`` — checks the
  file against its spec here, uploads it to the local node (converted to artifact format v1;
  encrypted when priced) and signs a ``ModelRegister`` (the sender needs the model-developer
  role), then waits for it like ``dataset add``;
* ``model show ID`` — one model (id or root CID);
* ``model lineage ID [--descendants] [--depth N] [--verify]`` — ancestors (or descendants);
  ``--verify`` checks every edge and every model record against the state root of the answered
  height with ``node.lightclient`` and that root against the block header the node serves;
* ``model search --signature HEX | --mergeable-with ID | --text "…" [--family F]`` —
  ``ns_searchModels``: each result with its relation, the reason and the merge methods;
* ``model merge --parents A B --method M [--base ID] [--coefficients …] [--target-dataset D]
  [--steps N] [-o FILE] [--register --name …]`` — fetches the parents (and the base and the
  target dataset) through the local node, runs the merge — and, with a target dataset, transfer
  learning evaluated on a held-out split — in a child process (``node.compute.worker.run_job``:
  this process never imports torch), writes the format-v1 child and its recipe
  (``FILE.recipe.json``), and with ``--register`` uploads and registers the child with its
  lineage (parents, recipe, datasets, metrics measured on the held-out split);
* ``model merge … --remote --max-price NSD [--verifiers N] [--platform CLASS] …`` — the same
  merge submitted as a paid "merge" task (``merge_task_params``: the recipe as the task
  recipe's parameters; inputs the parents, the base and the target dataset), followed like
  ``task watch`` (``node.cli_compute``) and, once paid, downloaded to ``-o`` (checked against
  the result's hash) and with ``--register`` registered like a local merge's child.

Methods: ``linear``, ``task_arithmetic``, ``ties``, ``dare``, ``slerp``, ``rebasin`` (weight
matching), ``zipit``, ``union`` (feature union), ``distill``; recipe names are accepted too.
Progress bars go to stderr on a terminal; ``--json`` prints one JSON object on stdout.
Registered by ``node.cli.build_parser`` through ``register(commands)``; the shared plumbing
(client, keys, ``_sign_send_wait``, fetches) is ``node.cli``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import re
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node import cli as _cli
from node.genesis import to_checksum
from node.types import Address, Amount, Hash32

if TYPE_CHECKING:
    from node.economy.models import Metric, RoyaltyShare
    from node.merge.recipe import MergeRecipe
    from node.models.safetensors_header import SafetensorsHeader
    from node.models.specs import ModelSpec
    from rpc.client import Client

CliError = _cli.CliError

METHOD_ALIASES = {"rebasin": "weight_matching", "union": "feature_union"}
METHOD_NAMES = {v: k for k, v in METHOD_ALIASES.items()}
CLI_METHODS = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare",
    "slerp",
    "rebasin",
    "zipit",
    "union",
    "distill",
)
DEFAULT_PARAMS: dict[str, dict[str, float]] = {
    "ties": {"density": 0.2},
    "dare": {"density": 0.5},
    "slerp": {"t": 0.5},
}
DEFAULT_STEPS = 200
DEFAULT_LR = 0.003
DEFAULT_BATCH = 64
DEFAULT_SLICE_ROWS = 512
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_TIME_LIMIT = 3600.0
DEFAULT_FETCH_TIMEOUT = 3600.0
DEFAULT_OUTPUT = "merged.safetensors"
DEFAULT_DEVICE = "cpu"
DEFAULT_THREADS = 1
# model merge: the options only a merge on this machine takes (flag, default), those of a
# training step (distill takes them remotely too) and those only --remote takes
_LOCAL_ONLY = {
    "val_fraction": ("--val-fraction", DEFAULT_VAL_FRACTION),
    "slice_rows": ("--slice-rows", DEFAULT_SLICE_ROWS),
    "threads": ("--threads", DEFAULT_THREADS),
    "device": ("--device", DEFAULT_DEVICE),
    "time_limit": ("--time-limit", DEFAULT_TIME_LIMIT),
}
_TRAINING = {
    "steps": ("--steps", DEFAULT_STEPS),
    "lr": ("--lr", DEFAULT_LR),
    "batch_size": ("--batch-size", DEFAULT_BATCH),
}
_REMOTE_ONLY = {
    "max_price": "--max-price",
    "verifiers": "--verifiers",
    "verifier_fee": "--verifier-fee",
    "platform": "--platform",
    "deadline": "--deadline",
    "wall_seconds": "--wall-seconds",
    "memory": "--memory",
    "watch_timeout": "--watch-timeout",
}
MILLIONTHS = 1_000_000
_METRIC_RE = re.compile(r"([^=]+)=(.+)")
_ID_RE = re.compile(r"0x[0-9a-fA-F]{64}")


# --- small parsers -------------------------------------------------------------------------------


def parse_metric(text: str) -> Metric:
    """``name=value`` with a decimal value of at most 6 decimals → a ``Metric`` in millionths."""
    from node.economy.models import MAX_METRIC_NAME, Metric

    m = _METRIC_RE.fullmatch(text.strip())
    if m is None:
        raise CliError(f"--metric {text!r}: expected name=value (accuracy=0.973)")
    name, raw = m.group(1).strip(), m.group(2).strip()
    if not name or len(name) > MAX_METRIC_NAME:
        raise CliError(f"--metric {text!r}: a name is 1 to {MAX_METRIC_NAME} characters")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise CliError(f"--metric {text!r}: {raw!r} is not a number") from None
    if not value.is_finite():
        raise CliError(f"--metric {text!r}: the value must be finite")
    scaled = value * MILLIONTHS
    if scaled != scaled.to_integral_value():
        raise CliError(f"--metric {text!r}: at most 6 decimals (values are kept in millionths)")
    millionths = int(scaled)
    if not -(1 << 63) <= millionths < (1 << 63):
        raise CliError(f"--metric {text!r}: out of range")
    return Metric.of(name, millionths)


def metric_of(name: str, value: float) -> Metric:
    from node.economy.models import Metric

    return Metric.of(name, round(value * MILLIONTHS))


def parse_royalty(text: str) -> RoyaltyShare:
    from node.economy.models import RoyaltyShare

    address, sep, bps = text.strip().partition("=")
    if not sep or not bps.strip().isdigit():
        raise CliError(f"--royalty {text!r}: expected ADDRESS=BASIS_POINTS (0x…=250 is 2.5 %)")
    return RoyaltyShare(_cli._address_arg(address.strip(), "--royalty"), int(bps))


def canonical_method(name: str) -> str:
    from node.merge.recipe import METHODS

    method = METHOD_ALIASES.get(name, name)
    if method not in METHODS:
        known = ", ".join(CLI_METHODS)
        raise CliError(f"--method {name!r}: unknown merge method (one of {known})")
    return method


def _model_ref(text: str, what: str = "model") -> str:
    """A model id (0x + 64 hex digits) or a root CID, as the node takes it."""
    s = text.strip()
    if _ID_RE.fullmatch(s):
        return s.lower()
    from node.errors import DecodeError
    from node.storage.unixfs import parse_cid

    try:
        parse_cid(s)
    except DecodeError:
        raise CliError(
            f"{what} {text!r} is neither a model id (0x + 64 hex digits) nor a CID"
        ) from None
    return s


def _require_model(client: Client, ref: str, what: str = "model") -> dict[str, Any]:
    record = client.get_model(_model_ref(ref, what))
    if record is None:
        raise CliError(f"no {what} {ref} on chain (see `neuroseed model search`)")
    return record


def _model_id(record: dict[str, Any]) -> Hash32:
    return Hash32(_cli._unhex(record["id"], "model id"))


def _spec_of(record: dict[str, Any]) -> ModelSpec:
    from node.models.specs import parse_spec

    return parse_spec(_cli._unhex(record["spec"], "spec"))


def _read_spec_file(path_text: str) -> ModelSpec:
    from node.models.specs import MAX_SPEC_BYTES, parse_spec

    path = Path(path_text).expanduser()
    try:
        raw = path.read_bytes()[: MAX_SPEC_BYTES + 1]
    except OSError as exc:
        raise CliError(f"--spec {path}: {exc.strerror}") from None
    return parse_spec(raw)  # typed SpecError on bad JSON, unknown family, bad fields


def local_model_header(path: Path) -> SafetensorsHeader:
    """The safetensors header of a local model file (a pickle or any other format is refused
    by the strict parser before anything is uploaded)."""
    from node.models.safetensors_header import MAX_HEADER_BYTES, parse_header

    try:
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) != 8:
                raise CliError(f"{path} is not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise CliError(
                    f"{path} is not a safetensors model: its header length {n} exceeds "
                    f"{MAX_HEADER_BYTES} bytes (a pickle or zip checkpoint?)"
                )
            raw = fh.read(n)
            size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    header = parse_header(raw.rstrip(b" "))
    if size != 8 + n + header.data_size:
        raise CliError(
            f"{path} is {size} bytes but its header implies {8 + n + header.data_size} "
            "(truncated or padded file)"
        )
    return header


# --- recipes as JSON -----------------------------------------------------------------------------


def recipe_to_json(recipe: MergeRecipe) -> dict[str, Any]:
    """A recipe as JSON: floats exact (Python's shortest round-trip repr), bytes as 0x hex."""
    return {
        "method": recipe.method,
        "parents": [_cli._hex(p) for p in recipe.parents],
        "base": None if recipe.base is None else _cli._hex(recipe.base),
        "coefficients": list(recipe.weights),
        "params": {p.name: recipe.param(p.name) for p in recipe.params},
        "seed": _cli._hex(recipe.seed),
        "platform": recipe.platform,
        "childSpec": json.loads(recipe.child_spec) if recipe.child_spec else None,
        "classMaps": [list(m) for m in recipe.class_maps],
        "datasets": [_cli._hex(d) for d in recipe.datasets],
    }


def recipe_from_json(obj: Any, where: str) -> MergeRecipe:
    """The ``MergeRecipe`` of a recipe JSON file (``recipe_to_json``'s shape), validated on its
    own (``node.merge.recipe.validate_recipe``)."""
    from node.merge.recipe import MergeRecipe, validate_recipe
    from node.models.specs import parse_spec, spec_json

    if not isinstance(obj, dict):
        raise CliError(f"{where}: a recipe is a JSON object")
    known = {
        "method", "parents", "base", "coefficients", "params", "seed", "platform",
        "childSpec", "classMaps", "datasets",
    }  # fmt: skip
    unknown = set(obj) - known
    if unknown:
        raise CliError(f"{where}: unknown recipe field(s) {', '.join(sorted(unknown))}")

    def hex_bytes(value: Any, what: str) -> bytes:
        if not isinstance(value, str) or not re.fullmatch(r"0x([0-9a-fA-F]{2})*", value):
            raise CliError(f"{where}: {what} must be 0x hex")
        return bytes.fromhex(value[2:])

    try:
        method = obj["method"]
        parents = [hex_bytes(p, "parents[]") for p in obj.get("parents") or []]
        base = None if obj.get("base") is None else hex_bytes(obj["base"], "base")
        coefficients = [float(c) for c in obj.get("coefficients") or []]
        params = {str(k): float(v) for k, v in (obj.get("params") or {}).items()}
        seed = hex_bytes(obj.get("seed") or "0x" + "00" * 32, "seed")
        child = obj.get("childSpec")
        recipe = MergeRecipe.create(
            str(method),
            parents,
            base=base,
            coefficients=coefficients,
            params=params,
            seed=seed,
            platform=str(obj.get("platform") or ""),
            child_spec=b"" if child is None else spec_json(parse_spec(child)),
            class_maps=[[int(c) for c in m] for m in obj.get("classMaps") or []],
            datasets=[hex_bytes(d, "datasets[]") for d in obj.get("datasets") or []],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CliError(f"{where}: not a recipe ({exc})") from None
    if len(recipe.seed) != 32:
        raise CliError(f"{where}: the seed is 32 bytes")
    validate_recipe(recipe, max_merge_parents=16)
    return recipe


def _read_recipe_file(path_text: str) -> MergeRecipe:
    path = Path(path_text).expanduser()
    try:
        obj = json.loads(path.read_text())
    except OSError as exc:
        raise CliError(f"--recipe {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise CliError(f"--recipe {path}: not JSON ({exc})") from None
    return recipe_from_json(obj, f"--recipe {path}")


# --- register --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Registration:
    """What a ``ModelRegister`` carries besides the uploaded artifact."""

    spec: ModelSpec
    name: str
    description: str = ""
    license: str = ""
    price: int = 0
    royalties: tuple[RoyaltyShare, ...] = ()
    base: Hash32 | None = None
    parents: tuple[Hash32, ...] = ()
    recipe: MergeRecipe | None = None
    datasets: tuple[Hash32, ...] = ()
    metrics: tuple[Metric, ...] = ()


def _check_metrics_unique(metrics: Sequence[Metric]) -> None:
    names = [m.name for m in metrics]
    for n in names:
        if names.count(n) > 1:
            raise CliError(f"--metric {n!r} is given twice")


def upload_and_register(
    args: argparse.Namespace, client: Client, path: Path, reg: Registration
) -> tuple[Any, list[tuple[str, str, object, object]]]:
    """Check ``path`` against the spec, upload it to the node and build the ``ModelRegister``;
    returns (body, fields for ``_sign_send_wait``)."""
    from node.economy.models import ModelRegister, model_id
    from node.models.signature import model_signature
    from node.models.specs import check_header, parameter_count, spec_json
    from node.storage.format_v1 import ArtifactProof

    header = local_model_header(path)
    check_header(reg.spec, header)  # SpecHeaderMismatch: the file is not what the spec says
    if reg.price > 0:
        operator = _cli._node_operator(client)
        sender = _cli._sender_address(args)
        if operator is None or operator != sender:
            raise CliError(
                "a priced model is registered by the node's operator account (its key agent "
                "holds the content key); sign with that account (--from / --dev-key)"
            )
    bar = _cli._ProgressBar("upload", path.stat().st_size)
    try:
        up = client.upload_artifact(path, price=reg.price, progress=bar)
    finally:
        bar.close()
    root = _cli._unhex(up["rootHex"], "root")
    body = ModelRegister(
        root=root,
        proof=ArtifactProof.decode(_cli._unhex(up["proof"], "proof")),
        spec=spec_json(reg.spec),
        name=reg.name,
        description=reg.description,
        license=reg.license,
        price=Amount(reg.price),
        royalties=reg.royalties,
        base=reg.base,
        parents=reg.parents,
        recipe=reg.recipe,
        datasets=reg.datasets,
        metrics=reg.metrics,
        salt=None if up.get("salt") is None else _cli._unhex(up["salt"], "salt"),
        key_check=None if up.get("keyCheck") is None else Hash32(_cli._unhex(up["keyCheck"])),
        plain_data_hash=Hash32(_cli._unhex(up["plainDataHash"])) if reg.price > 0 else None,
    )
    mid = _cli._hex(model_id(root))
    if client.get_model(mid) is not None:
        raise CliError(f"this file (CID {up['root']}) is already registered as model {mid}")
    signature = _cli._hex(model_signature(header))
    if not args.json:
        print(
            f"uploaded {path.name}: CID {up['root']}, {up['size']} bytes stored; model id {mid}",
            file=sys.stderr,
        )
    fields: list[tuple[str, str, object, object]] = [
        ("id", mid, "model id", mid),
        ("cid", str(up["root"]), "CID", up["root"]),
        ("family", reg.spec.family, "family", reg.spec.family),
        ("signature", signature, "signature", signature),
        ("parameters", str(parameter_count(reg.spec)), "parameters", parameter_count(reg.spec)),
    ]
    return body, fields


def _resolve_ids(client: Client, refs: Sequence[str], what: str) -> tuple[Hash32, ...]:
    return tuple(_model_id(_require_model(client, r, what)) for r in refs)


def cmd_model_register(args: argparse.Namespace) -> int:
    path = Path(args.file).expanduser()
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    name = args.name.strip()
    if not name:
        raise CliError("--name: must not be empty")
    price = _cli.parse_nsd(args.price, what="--price", allow_zero=True)
    spec = _read_spec_file(args.spec)
    metrics = tuple(parse_metric(m) for m in args.metric)
    _check_metrics_unique(metrics)
    royalties = tuple(parse_royalty(r) for r in args.royalty)
    recipe = _read_recipe_file(args.recipe) if args.recipe else None
    if args.parents and recipe is None:
        raise CliError("--parents: a merged model is registered with the --recipe that made it")
    _cli._fee_option(args)
    from node.models.specs import check_header

    # refused here, before any connection: not safetensors, or not what the spec says
    check_header(spec, local_model_header(path))
    with _cli._client(args) as client:
        client.chain_id()  # fails fast (exit 3) before anything is uploaded
        base = _resolve_ids(client, [args.base], "base")[0] if args.base else None
        if args.parents:
            parents = _resolve_ids(client, args.parents, "parent")
        else:
            parents = tuple(Hash32(p) for p in recipe.parents) if recipe is not None else ()
        if recipe is not None:
            if tuple(recipe.parents) != tuple(bytes(p) for p in parents):
                raise CliError("--parents differ from the recipe's parents (same order needed)")
            if base is None and recipe.base is not None:
                base = Hash32(recipe.base)
            if recipe.base != (None if base is None else bytes(base)):
                raise CliError("--base differs from the recipe's base")
        datasets = tuple(
            Hash32(_cli._unhex(_cli._require_dataset(client, d)["id"], "dataset id"))
            for d in args.datasets
        )
        reg = Registration(
            spec=spec,
            name=name,
            description=args.description or "",
            license=args.license or "",
            price=price,
            royalties=royalties,
            base=base,
            parents=parents,
            recipe=recipe,
            datasets=datasets,
            metrics=metrics,
        )
        body, fields = upload_and_register(args, client, path, reg)
    return _cli._sign_send_wait(args, body, fields)


# --- show ------------------------------------------------------------------------------------------


def _millionths(value: int) -> str:
    sign = "-" if value < 0 else ""
    text = f"{abs(value) // MILLIONTHS}.{abs(value) % MILLIONTHS:06d}".rstrip("0").rstrip(".")
    return sign + text


def _spec_text(spec: Any) -> str:
    if not isinstance(spec, dict):
        return "-"
    return ", ".join(f"{k}={v}" for k, v in spec.items())


def _model_rows(record: dict[str, Any]) -> list[tuple[str, object]]:
    price = int(record["price"])
    rows: list[tuple[str, object]] = [
        ("id", record["id"]),
        ("name", record["name"]),
        ("family", record.get("family")),
        ("spec", _spec_text(record.get("specJson"))),
        ("parameters", record.get("parameters")),
        ("signature", record["signature"]),
        ("owner", to_checksum(Address(_cli._unhex(record["owner"], "owner")))),
        ("CID", record.get("rootCid")),
        ("price", f"{_cli.format_nsd(price)} NSD" if price else "free"),
    ]
    if record.get("license"):
        rows.append(("license", record["license"]))
    if record.get("description"):
        rows.append(("description", record["description"]))
    if record.get("base"):
        rows.append(("base", record["base"]))
    for i, p in enumerate(record.get("parents") or []):
        rows.append((f"parent {i}", p))
    recipe = record.get("recipe")
    if recipe:
        rows.append(("recipe", f"{recipe.get('method')} {recipe.get('paramValues') or ''}".strip()))
    for d in record.get("datasets") or []:
        rows.append(("trained on", d))
    for m in record.get("metrics") or []:
        rows.append((f"metric {m['name']}", _millionths(int(m["millionths"]))))
    rows.append(("depth", record.get("depth")))
    rows.append(("registered at", record.get("height")))
    return rows


def cmd_model_show(args: argparse.Namespace) -> int:
    with _cli._client(args) as client:
        record = _require_model(client, args.model)
    if args.json:
        _cli._print_json(record)
    else:
        print(_cli._rows(_model_rows(record)))
    return _cli.EXIT_OK


# --- lineage ---------------------------------------------------------------------------------------


def verify_lineage(client: Client, answer: dict[str, Any]) -> dict[str, Any]:
    """Check a ``ns_getLineage`` answer with proofs: each edge's key and value are the ones its
    ancestor, child and relation imply, and are included under the answer's state root; each
    model named is proven (its record under the same root, consistent with the edges); the root
    is the state root of the block header the node serves at that height. Returns the proven
    records by id; ``CliError`` on the first failure."""
    from node import lightclient
    from node.economy.models import ModelRecord, Relation, edge_key, model_key

    height = int(answer["height"])
    root_hex = answer.get("stateRoot")
    if root_hex is None:
        raise CliError("the node answered the lineage without a state root")
    root = _cli._unhex(root_hex, "state root")
    block = client.get_block(height)
    if block is None or block.get("stateRoot") != root_hex:
        raise CliError(f"the state root {root_hex} is not the one of block {height}'s header")
    records: dict[str, ModelRecord] = {}
    for mid in sorted(answer.get("models") or {}):
        proof = client.get_proof(model_key(_cli._unhex(mid, "model id")), height)
        if proof.value is None or proof.state_root != root:
            raise CliError(f"model {mid}: no record proven at height {height}")
        try:
            lightclient.verify_inclusion(root, proof.key, proof.value, proof.proof)
        except lightclient.ProofError as exc:
            raise CliError(f"model {mid}: its record's proof does not verify: {exc}") from None
        record = ModelRecord.decode(proof.value)
        if _cli._hex(record.id) != mid:
            raise CliError(f"model {mid}: the proven record is another model's")
        records[mid] = record
    for edge in answer.get("edges") or []:
        ancestor = _cli._unhex(edge["ancestor"], "ancestor")
        child = _cli._unhex(edge["child"], "child")
        relation = int(edge["relationCode"])
        key = edge_key(ancestor, child)
        value = bytes([relation])
        p = edge.get("proof")
        if p is None:
            raise CliError("the node answered without proofs")
        if _cli._unhex(p["key"], "key") != key or p.get("value") != _cli._hex(value):
            raise CliError(
                f"edge {edge['ancestor']} → {edge['child']}: the proof is for another key"
            )
        if p["stateRoot"] != root_hex:
            raise CliError(f"edge {edge['ancestor']} → {edge['child']}: proven under another root")
        try:
            lightclient.verify_inclusion(root, key, value, _cli._unhex(p["proof"], "proof"))
        except lightclient.ProofError as exc:
            raise CliError(
                f"edge {edge['ancestor']} → {edge['child']}: its proof does not verify: {exc}"
            ) from None
        proven = records.get(edge["child"])
        if proven is not None:
            want = Relation(0)
            if ancestor in proven.parents:
                want |= Relation.PARENT
            if proven.base is not None and ancestor == proven.base:
                want |= Relation.BASE
            if int(want) != relation:
                raise CliError(
                    f"edge {edge['ancestor']} → {edge['child']}: the child's proven record does "
                    "not list that ancestor with that relation"
                )
    return records


def cmd_model_lineage(args: argparse.Namespace) -> int:
    from node.economy.models import ModelRecord

    if args.depth is not None and not 1 <= args.depth <= 16:
        raise CliError("--depth: expected 1 to 16")
    direction = "descendants" if args.descendants else "ancestors"
    proven: dict[str, ModelRecord] = {}
    with _cli._client(args) as client:
        ref = _model_ref(args.model)
        answer = client.get_lineage(ref, direction=direction, depth=args.depth, proofs=args.verify)
        if args.verify:
            proven = verify_lineage(client, answer)
    if args.verify:
        answer["verified"] = {"edges": len(answer.get("edges") or []), "models": len(proven)}
    if args.json:
        _cli._print_json(answer)
        return _cli.EXIT_OK
    names = {mid: m.get("name", "?") for mid, m in (answer.get("models") or {}).items()}
    start = answer["model"]
    arrow = "←" if direction == "ancestors" else "→"
    print(f"{direction} of {names.get(start, '?')} {start} at height {answer['height']}")
    edges = answer.get("edges") or []
    if not edges:
        print(f"  no {direction}")
    for e in edges:
        near, far = (
            (e["child"], e["ancestor"]) if direction == "ancestors" else (e["ancestor"], e["child"])
        )
        rel = "+".join(e.get("relation") or [])
        ok = "  [proof ok]" if args.verify else ""
        # ancestors: "child ← parent A"; descendants: "A → child (as parent)"
        far_text = (
            f"{rel} {names.get(far, '?')} {far}"
            if direction == "ancestors"
            else f"{names.get(far, '?')} {far} (as {rel})"
        )
        indent = "  " * (int(e["distance"]) - 1)
        print(f"  {indent}{names.get(near, '?')} {near[:18]}… {arrow} {far_text}{ok}")
    if answer.get("truncated"):
        print("  (truncated: more edges than one answer holds)")
    if args.verify:
        print(
            f"verified: {len(edges)} edges and {len(proven)} model records against state root "
            f"{answer['stateRoot']} (block {answer['height']})"
        )
    return _cli.EXIT_OK


# --- search ----------------------------------------------------------------------------------------


def cmd_model_search(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 100:
        raise CliError("--limit: expected 1 to 100")
    query: dict[str, Any] = {"limit": args.limit}
    if args.signature is not None:
        sig = args.signature.strip()
        if not _ID_RE.fullmatch(sig):
            raise CliError("--signature: expected 0x and 64 hex digits")
        query["signature"] = sig.lower()
    elif args.mergeable_with is not None:
        query["mergeable_with"] = _model_ref(args.mergeable_with, "--mergeable-with")
    else:
        if not args.text.strip():
            raise CliError("--text: must not be empty")
        query["text"] = args.text
    if args.family:
        query["family"] = args.family
    if args.cursor:
        query["cursor"] = args.cursor
    with _cli._client(args) as client:
        page = client.search_models(**query)
    if args.json:
        _cli._print_json(page)
        return _cli.EXIT_OK
    models = page.get("models", [])
    ref = page.get("reference")
    if ref is not None:
        print(f"mergeable with {ref['name']} {ref['id']} ({ref['family']}):", file=sys.stderr)
    if not models:
        print("no models found", file=sys.stderr)
    for m in models:
        methods = ", ".join(METHOD_NAMES.get(x, x) for x in m.get("methods") or []) or "-"
        print(f"{m['id']}  {m['family']:11}  {m['relation']:14}  {m['name']}")
        print(f"    methods: {methods}")
        print(f"    {m['reason']}")
    if page.get("nextCursor"):
        print(f"more: --cursor {page['nextCursor']}", file=sys.stderr)
    return _cli.EXIT_OK


# --- merge -----------------------------------------------------------------------------------------


class _StageBar:
    """Progress of a merge job on stderr: a bar per stage on a terminal, one line per stage
    otherwise (unless --json)."""

    def __init__(self, *, quiet: bool) -> None:
        self.tty = sys.stderr.isatty()
        self.quiet = quiet
        self.stage: str | None = None
        self._last = 0.0

    def __call__(self, progress: dict[str, Any]) -> None:
        stage = str(progress.get("stage", ""))
        if stage == "start":
            return
        done, total = int(progress.get("done", 0)), int(progress.get("total", 0))
        if stage != self.stage:
            self._end()
            self.stage = stage
            if not self.tty and not self.quiet:
                label = "transfer learning" if stage == "finetune" else stage
                print(f"{label}…", file=sys.stderr, flush=True)
        if not self.tty:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and done < total:
            return
        self._last = now
        frac = min(1.0, done / total) if total > 0 else 1.0
        note = ""
        if "val_accuracy" in progress:
            note = f" val acc {float(progress['val_accuracy']):.4f}"
        sys.stderr.write(f"\r{stage:9} [{'#' * int(frac * 30):<30}] {done}/{total}{note}   ")
        sys.stderr.flush()

    def _end(self) -> None:
        if self.tty and self.stage is not None:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def close(self) -> None:
        self._end()
        self.stage = None


def _class_maps(args: argparse.Namespace, specs: Sequence[ModelSpec]) -> list[list[int]]:
    """``--class-map`` per parent, else the parents' classes one after another (disjoint
    tasks: digits 0–4 and 5–9 give a 10-class child)."""
    if args.class_map:
        if len(args.class_map) != len(specs):
            raise CliError(f"--class-map: one per parent ({len(specs)}), got {len(args.class_map)}")
        maps = []
        for text, spec in zip(args.class_map, specs, strict=True):
            try:
                m = [int(c) for c in text.split(",")]
            except ValueError:
                raise CliError(f"--class-map {text!r}: comma-separated class numbers") from None
            if len(m) != spec.num_classes or min(m) < 0:
                raise CliError(
                    f"--class-map {text!r}: the parent has {spec.num_classes} classes, one "
                    "non-negative child class each"
                )
            maps.append(m)
        return maps
    maps, offset = [], 0
    for spec in specs:
        maps.append(list(range(offset, offset + spec.num_classes)))
        offset += spec.num_classes
    return maps


def child_spec_for(
    method: str, specs: Sequence[ModelSpec], num_classes: int, child_file: str | None
) -> ModelSpec:
    """The child's spec of a data-based merge, torch-free (``node.merge.union`` checks it
    again): ZipIt! keeps parent 0's widths, feature union sums them, distillation trains
    ``--child-spec`` (default: parent 0's architecture) — each with ``num_classes``."""
    from node.models.specs import CNNSpec, MLPSpec

    first = specs[0]
    if method == "distill":
        if child_file is not None:
            return _read_spec_file(child_file)
        return dataclasses.replace(first, num_classes=num_classes)
    if not isinstance(first, MLPSpec | CNNSpec):
        raise CliError(f"{method} merges mlp and cnn models, not {first.family}")

    def widths(s: ModelSpec) -> tuple[int, ...]:
        if isinstance(s, MLPSpec):
            return s.hidden
        if isinstance(s, CNNSpec):
            return s.channels
        raise CliError(f"{method} merges mlp and cnn models, not {s.family}")

    for i, s in enumerate(specs[1:], 1):
        if type(s) is not type(first) or len(widths(s)) != len(widths(first)):
            raise CliError(f"{method}: parent {i}'s architecture differs from parent 0's")
    if method == "zipit":
        if any(widths(s) != widths(first) for s in specs):
            raise CliError("zipit merges parents of equal widths (use union for other widths)")
        w = widths(first)
    else:
        w = tuple(sum(widths(s)[g] for s in specs) for g in range(len(widths(first))))
    if isinstance(first, MLPSpec):
        return dataclasses.replace(first, hidden=w, num_classes=num_classes)
    return dataclasses.replace(first, channels=w, num_classes=num_classes)


def _coefficients(args: argparse.Namespace, method: str, n: int) -> list[float]:
    from node.merge.recipe import ELEMENTWISE_METHODS

    takes = method in (ELEMENTWISE_METHODS - {"slerp"}) | {"weight_matching"}
    if args.coefficients:
        if not takes:
            raise CliError(f"--coefficients: {method} takes no per-parent coefficients")
        if len(args.coefficients) != n:
            raise CliError(f"--coefficients: one per parent ({n}), got {len(args.coefficients)}")
        if not all(math.isfinite(c) for c in args.coefficients):
            raise CliError("--coefficients: finite numbers")
        return list(args.coefficients)
    if not takes:
        return []
    if method in ("linear", "weight_matching"):
        return [1.0 / n] * n
    return [1.0] * n  # task vectors added at full weight (scale λ via --param scale=…)


def _params(args: argparse.Namespace, method: str) -> dict[str, float]:
    out = dict(DEFAULT_PARAMS.get(method, {}))
    for text in args.param:
        name, sep, raw = text.partition("=")
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not sep or not name.strip() or not math.isfinite(value):
            raise CliError(f"--param {text!r}: expected name=number (density=0.3)")
        out[name.strip()] = value
    return out


def _economy_limits(client: Client) -> tuple[int, int]:
    """The chain's max_merge_parents and max_step_parameters."""
    from node.economy.api import DEFAULT_ECONOMY_PARAMS, ECONOMY_PARAMS_KEY, EconomyParams

    proof = client.get_proof(ECONOMY_PARAMS_KEY)
    params = DEFAULT_ECONOMY_PARAMS if proof.value is None else EconomyParams.decode(proof.value)
    return params.max_merge_parents, params.max_step_parameters


def _fetch_model(
    client: Client, record: dict[str, Any], out: Path, timeout: float, label: str
) -> None:
    """A model's file through the local node (fetched from its providers, then downloaded)."""
    from node.models.safetensors_header import parse_header

    if record.get("isEncrypted"):
        raise CliError(
            f"model {record['id']} is priced (encrypted): merging paid models on this machine "
            "is not supported yet"
        )
    src = _cli._Source(
        record,
        _cli._unhex(record["root"], "root"),
        parse_header(_cli._unhex(record["header"], "header")),
        False,
    )
    if not _held_locally(client, src.root):
        _cli._run_fetch(client, src, timeout, label)
    _cli._download_whole(client, src, out)


def _held_locally(client: Client, root: bytes) -> bool:
    """Whether the local node already holds every block of ``root`` (no fetch job needed)."""
    return bool(client.get_artifact(root).get("complete"))


def _fetch_dataset(
    args: argparse.Namespace, client: Client, record: dict[str, Any], out: Path
) -> dict[str, Any]:
    """A dataset through the local node, exactly as ``dataset get`` writes it (composites and
    priced datasets included); its JSON summary. A free dataset the node holds whole is simply
    downloaded."""
    if not record.get("isComposite") and not record.get("isPriced"):
        src = _cli._source_of(record)
        if _held_locally(client, src.root):
            size = _cli._download_whole(client, src, out)
            return {"file": str(out), "bytes": size, "dataset": record["id"]}
    sub = argparse.Namespace(**vars(args))
    sub.dataset, sub.output, sub.json = record["id"], str(out), True
    sub.timeout = args.fetch_timeout
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        _cli.cmd_dataset_get(sub)
    lines = captured.getvalue().strip().splitlines()
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def write_slice(src: Path, out: Path, rows: int) -> int:
    """The first ``rows`` rows of a local dataset file as a new v1 file (torch-free); returns
    the rows written."""
    from node.storage.format_v1 import CompositePart, dataset_rows, write_composite

    header = local_model_header(src)
    n = min(rows, dataset_rows(header))
    with open(src, "rb") as fh:
        (hlen,) = struct.unpack("<Q", fh.read(8))
    data_start = 8 + hlen
    names = tuple(t.name for t in header.tensors)

    def read(_: int, begin: int, end: int) -> Any:
        with open(src, "rb") as fh:
            fh.seek(data_start + begin)
            left = end - begin
            while left:
                piece = fh.read(min(left, 1 << 20))
                if not piece:
                    raise CliError(f"{src} ended early")
                left -= len(piece)
                yield piece

    parts = [CompositePart(header, 0, n, names)]

    def write(fh: Any) -> None:
        write_composite(fh, parts, read)

    _cli._write_atomically(out, write)
    return n


def _check_dataset_schema(record: dict[str, Any], spec: ModelSpec) -> None:
    """The target dataset has inputs ``x`` of the child's input shape and labels ``y``."""
    from node.models.specs import input_shape

    schema = {s["name"]: s for s in record.get("schema") or []}
    if "x" not in schema or "y" not in schema:
        raise CliError(
            f"dataset {record['id']} needs tensors 'x' (inputs) and 'y' (integer labels); it has "
            f"{', '.join(sorted(schema)) or 'none'}"
        )
    row = tuple(int(d) for d in schema["x"]["rowShape"])
    if row != input_shape(spec):
        raise CliError(
            f"dataset {record['id']}: inputs of shape {list(row)}, the model takes "
            f"{list(input_shape(spec))}"
        )
    if schema["y"]["rowShape"]:
        raise CliError(f"dataset {record['id']}: labels 'y' must be one integer per row")


@dataclasses.dataclass
class MergePlan:
    """What a merge is, resolved against the chain: the parents' records and specs, the base,
    the target dataset, the child's spec and the recipe (validated with the chain's caps)."""

    parents: list[dict[str, Any]]
    specs: list[ModelSpec]
    parent_ids: list[Hash32]
    base: dict[str, Any] | None
    target: dict[str, Any] | None
    target_id: Hash32 | None
    child_spec: ModelSpec
    recipe: MergeRecipe
    max_parents: int
    max_params: int


def plan_merge(
    args: argparse.Namespace, client: Client, method: str, params: dict[str, float]
) -> MergePlan:
    """Resolve the merge options against the chain (the same for a local and a remote merge)."""
    from node.merge.recipe import DATA_METHODS, SAME_BASE_METHODS, MergeRecipe, validate_recipe
    from node.models.specs import parameter_count, spec_json

    parents = [_require_model(client, p, "parent") for p in args.parents]
    specs = [_spec_of(r) for r in parents]
    parent_ids = [_model_id(r) for r in parents]
    base_record = _require_model(client, args.base, "base") if args.base else None
    if base_record is None and method in SAME_BASE_METHODS:
        bases = {r.get("base") for r in parents}
        if len(bases) != 1 or None in bases:
            raise CliError(
                f"{method} merges task vectors over a base the parents share: they record "
                "none in common, so name one with --base ID"
            )
        base_record = _require_model(client, str(bases.pop()), "base")
    if method not in DATA_METHODS:  # elementwise and weight matching: one layout in and out
        layouts = {r["signature"] for r in parents}
        if base_record is not None:
            layouts.add(base_record["signature"])
        if len(layouts) != 1:
            raise CliError(
                f"{method} merges models of one signature (same tensors); these differ. "
                f"See `neuroseed model search --mergeable-with {parents[0]['id']}`"
            )
    target = _cli._require_dataset(client, args.target_dataset) if args.target_dataset else None
    if method in DATA_METHODS and target is None:
        raise CliError(f"{method} looks at data: give the --target-dataset it merges for")
    max_parents, max_params = _economy_limits(client)
    class_maps: list[list[int]] = []
    child_spec = specs[0]
    if method in DATA_METHODS:
        class_maps = _class_maps(args, specs)
        num_classes = max(max(m) for m in class_maps) + 1
        child_spec = child_spec_for(method, specs, num_classes, args.child_spec)
    elif args.class_map or args.child_spec:
        raise CliError(f"--class-map/--child-spec go with zipit, union and distill, not {method}")
    if target is not None:
        _check_dataset_schema(target, child_spec)
    target_id = None if target is None else Hash32(_cli._unhex(target["id"], "dataset id"))
    recipe = MergeRecipe.create(
        method,
        parent_ids,
        base=None if base_record is None else _model_id(base_record),
        coefficients=_coefficients(args, method, len(parents)),
        params=params,
        seed=args.seed.to_bytes(32, "big"),
        child_spec=spec_json(child_spec) if method in DATA_METHODS else b"",
        class_maps=class_maps,
        datasets=[target_id] if method in DATA_METHODS and target_id is not None else [],
    )
    validate_recipe(
        recipe,
        child_parameters=parameter_count(child_spec),
        max_merge_parents=max_parents,
        max_step_parameters=max_params,
    )
    return MergePlan(
        parents=parents,
        specs=specs,
        parent_ids=parent_ids,
        base=base_record,
        target=target,
        target_id=target_id,
        child_spec=child_spec,
        recipe=recipe,
        max_parents=max_parents,
        max_params=max_params,
    )


def _merge_option_defaults(args: argparse.Namespace, method: str) -> None:
    """Refuse the options the other kind of merge takes (``--remote`` or on this machine) and
    fill in the defaults of those left out."""
    from node import cli_compute
    from node.merge.recipe import DATA_METHODS

    given = [flag for dest, flag in _REMOTE_ONLY.items() if getattr(args, dest) is not None]
    if not args.remote:
        if given:
            raise CliError(f"{given[0]} goes with --remote (a merge submitted as a paid task)")
        for dest, (_flag, default) in {**_LOCAL_ONLY, **_TRAINING}.items():
            if getattr(args, dest) is None:
                setattr(args, dest, default)
        return
    local = [flag for dest, (flag, _d) in _LOCAL_ONLY.items() if getattr(args, dest) is not None]
    if method != "distill":  # a merge task trains only when it distills
        local += [flag for dest, (flag, _d) in _TRAINING.items() if getattr(args, dest) is not None]
    if local:
        raise CliError(
            f"{local[0]} goes with a merge on this machine, not with --remote (a merge task "
            "runs the recipe only)"
        )
    if args.target_dataset and method not in DATA_METHODS:
        raise CliError(
            f"--target-dataset: transfer learning after a {method} merge runs on this machine "
            "only; with --remote, merge here first or submit a finetune task "
            "(neuroseed task submit --recipe finetune)"
        )
    if args.register and args.no_wait:
        raise CliError("--register needs the task's result: leave out --no-wait")
    if args.max_price is None:
        raise CliError("--remote needs --max-price (the most the provider is paid, NSD)")
    for dest, default in (
        ("verifiers", 1),
        ("deadline", cli_compute.DEFAULT_DEADLINE_HEIGHTS),
        ("wall_seconds", cli_compute.DEFAULT_WALL_SECONDS),
        ("memory", cli_compute.DEFAULT_MEMORY),
        ("watch_timeout", cli_compute.DEFAULT_WATCH_TIMEOUT),
    ):
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    if args.watch_timeout <= 0:
        raise CliError("--watch-timeout: expected positive seconds")
    for dest, (_flag, default) in _TRAINING.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    if args.register and args.output is None:
        args.output = DEFAULT_OUTPUT  # registering uploads the file: it is downloaded first


def merge_task_params(recipe: MergeRecipe) -> dict[str, Any]:
    """A merge recipe as the "merge" task recipe's parameters (``node.compute.recipes``: ids
    and the seed as lowercase hex, the child spec as an object); ``recipes.merge_recipe`` of
    them gives ``recipe`` back (its platform aside: the provider's class)."""
    tree: dict[str, Any] = {
        "method": recipe.method,
        "parents": [bytes(p).hex() for p in recipe.parents],
        "seed": bytes(recipe.seed).hex(),
    }
    if recipe.base is not None:
        tree["base"] = bytes(recipe.base).hex()
    if recipe.weights:
        tree["coefficients"] = list(recipe.weights)
    if recipe.params:
        tree["params"] = {p.name: recipe.param(p.name) for p in recipe.params}
    if recipe.child_spec:
        tree["child_spec"] = json.loads(recipe.child_spec)
    if recipe.class_maps:
        tree["class_maps"] = [list(m) for m in recipe.class_maps]
    if recipe.datasets:
        tree["datasets"] = [bytes(d).hex() for d in recipe.datasets]
    return tree


def default_platform(client: Client) -> str:
    """The platform class of the providers registered on chain when they share one
    (``cli_compute.default_platform``, from ``ns_listProviders``); else ``--platform`` must
    name it."""
    from node.cli_compute import default_platform as from_providers

    return from_providers(client, what="merge task")


def _captured_json(run: Callable[[], int]) -> tuple[int, Any]:
    """Run a command part that prints one JSON object (``--json``); its exit code and object."""
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        code = run()
    lines = captured.getvalue().strip().splitlines()
    return code, json.loads(lines[-1]) if lines else None


def _sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def merge_remote(
    args: argparse.Namespace,
    method: str,
    params: dict[str, float],
    out: Path | None,
    extra: tuple[int, tuple[RoyaltyShare, ...], tuple[Metric, ...]],
) -> int:
    """``model merge --remote``: the merge as a paid "merge" task (inputs: the parents, the base
    and the target dataset), followed like ``task watch``; once PAID, the output downloaded to
    ``-o`` (checked against the result's hash) and with ``--register`` registered with its
    lineage, as a local merge's child is."""
    from node.cli_compute import (
        _Bar,
        _economy,
        build_submit,
        canonical_task_params,
        ended_rows,
        follow_task,
        send_submit,
        submit_options,
        task_payments,
    )
    from node.economy.models import model_id
    from node.merge.recipe import DATA_METHODS
    from node.models.specs import spec_to_dict

    price, royalties, extra_metrics = extra
    opts = submit_options(args)
    quiet = bool(args.json)
    _cli._fee_option(args)
    with _cli._client(args) as client:
        client.chain_id()  # fails fast (exit 3)
        plan = plan_merge(args, client, method, params)
        for r in [*plan.parents, *([] if plan.base is None else [plan.base])]:
            if r.get("isEncrypted"):
                raise CliError(
                    f"model {r['id']} is priced (encrypted): a merge task's provider cannot read it"
                )
        raw, parsed = canonical_task_params("merge", merge_task_params(plan.recipe))
        platform = args.platform or default_platform(client)
        body, escrow = build_submit(client, "merge", raw, parsed, opts, platform, [], 0)
    if quiet:
        code, submitted = _captured_json(lambda: send_submit(args, body, escrow, 0)[0])
        tid = str(submitted["taskId"])
    else:
        code, tid = send_submit(args, body, escrow, 0)
    summary: dict[str, Any] = {
        "taskId": tid,
        "method": method,
        "parents": [r["id"] for r in plan.parents],
        "base": None if plan.base is None else plan.base["id"],
        "targetDataset": None if plan.target is None else plan.target["id"],
        "childSpec": spec_to_dict(plan.child_spec),
        "task": None,
        "payments": None,
        "output": None,
        "sha256": None,
        "recipe": None,
        "recipeFile": None,
        "registration": None,
    }
    if args.no_wait:
        if quiet:
            _cli._print_json({**summary, "submission": submitted})
        return code
    if not quiet:
        print(f"following task {tid} (neuroseed task watch {tid})", file=sys.stderr)
    bar = _Bar(enabled=not quiet and sys.stderr.isatty())
    with _cli._client(args) as client:
        task = follow_task(client, tid, args.watch_timeout, bar)
        payments = task_payments(task, _economy(client).royalty_percent)
        summary.update(task=task, payments=payments)
        if not quiet:
            print(_cli._rows(ended_rows(task, payments)))
        result = task.get("result")
        if task["outcome"] != "paid" or result is None or result.get("failReason"):
            if quiet:
                _cli._print_json(summary)
            raise CliError(
                f"task {tid} ended {task['outcome']}: no merged model (neuroseed task show {tid})"
            )
        recipe = plan.recipe
        if method in DATA_METHODS:  # trained on the provider: its platform class is recorded
            recipe = dataclasses.replace(recipe, platform=task["platformClass"])
        summary["recipe"] = recipe_to_json(recipe)
        metrics: dict[str, float] = {}
        if method == "distill":  # measured on the distillation's held-out split
            got = result.get("metrics") or {}
            metrics = {k: float(got[k]) for k in ("val_accuracy", "val_loss") if k in got}
        summary["metrics"] = metrics
        if out is None:
            if quiet:
                _cli._print_json(summary)
            else:
                print(f"output: {result['output']} (download it with -o FILE)", file=sys.stderr)
            return _cli.EXIT_OK
        root = _cli._unhex(result["output"], "output")
        src = _cli._Source({"id": tid, "rootCid": result["output"]}, root, None, False)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not _held_locally(client, root):
            _cli._run_fetch(client, src, args.fetch_timeout, "output")
        _cli._download_whole(client, src, out)
        digest = _sha256_file(out)
        expected = str(result["checkpoints"][0]["stateHash"]).removeprefix("0x")
        if digest != expected:
            out.unlink()
            raise CliError(
                f"the downloaded output hashes to {digest}, the task's result says {expected}"
            )
        recipe_path = out.with_name(out.name.removesuffix(".safetensors") + ".recipe.json")
        _cli._write_atomically(
            recipe_path, lambda fh: fh.write(json.dumps(recipe_to_json(recipe), indent=1).encode())
        )
        summary.update(output=str(out), sha256=digest, recipeFile=str(recipe_path))
        if not args.register:
            if quiet:
                _cli._print_json(summary)
            else:
                print(
                    _cli._rows(
                        [("file", str(out)), ("sha256", digest), ("recipe", str(recipe_path))]
                    )
                )
            return _cli.EXIT_OK
        names = " and ".join(r["name"] for r in plan.parents)
        reg = Registration(
            spec=plan.child_spec,
            name=args.name.strip(),
            description=args.description or f"{METHOD_NAMES.get(method, method)} merge of {names}",
            license=args.license or "",
            price=price,
            royalties=royalties,
            base=None if recipe.base is None else Hash32(recipe.base),
            parents=tuple(plan.parent_ids),
            recipe=recipe,
            datasets=() if plan.target_id is None else (plan.target_id,),
            metrics=tuple(metric_of(k, v) for k, v in sorted(metrics.items())) + extra_metrics,
        )
        _check_metrics_unique(reg.metrics)
        reg_body, fields = upload_and_register(args, client, out, reg)
    summary["id"] = _cli._hex(model_id(reg_body.root))
    if not quiet:
        print(_cli._rows([("file", str(out)), ("sha256", digest), ("recipe", str(recipe_path))]))
        return _cli._sign_send_wait(args, reg_body, fields)
    try:
        code, summary["registration"] = _captured_json(
            lambda: _cli._sign_send_wait(args, reg_body, fields)
        )
    finally:
        _cli._print_json(summary)
    return code


def cmd_model_merge(args: argparse.Namespace) -> int:
    from node.economy.models import model_id
    from node.merge.recipe import (
        DATA_METHODS,
        SAME_BASE_METHODS,
    )
    from node.models.specs import spec_to_dict

    method = canonical_method(args.method)
    _merge_option_defaults(args, method)
    if args.steps < 0:
        raise CliError("--steps: expected 0 or more")
    if args.fetch_timeout <= 0:
        raise CliError("--fetch-timeout: expected positive seconds")
    if not args.remote:
        if not 0.0 < args.val_fraction < 1.0:
            raise CliError("--val-fraction: expected a number in (0, 1)")
        if args.time_limit <= 0:
            raise CliError("--time-limit: expected positive seconds")
        if args.slice_rows < 2:
            raise CliError("--slice-rows: expected at least 2")
        if not 1 <= args.threads <= 256:
            raise CliError("--threads: expected 1 to 256")
    out = None if args.output is None else Path(args.output).expanduser().absolute()
    if out is not None and out.is_dir():
        raise CliError(f"-o {out}: is a directory")
    if args.register:
        if not (args.name or "").strip():
            raise CliError("--register needs --name")
        _cli._fee_option(args)
    extra_metrics = tuple(parse_metric(m) for m in args.metric)
    _check_metrics_unique(extra_metrics)
    measured = {"val_accuracy", "val_loss"} if args.target_dataset else set()
    for m in extra_metrics:
        if m.name in measured:
            raise CliError(f"--metric {m.name}: measured on the held-out split, not declared")
    royalties = tuple(parse_royalty(r) for r in args.royalty)
    price = _cli.parse_nsd(args.price, what="--price", allow_zero=True)
    params = _params(args, method)
    if method == "distill":
        # Distillation is the training on the target dataset: the student learns from the
        # teachers on its training rows and is measured on distill_files' held-out 20 %.
        if not args.remote and args.val_fraction != DEFAULT_VAL_FRACTION:
            raise CliError("--val-fraction: distillation holds out a fixed 20 %")
        for name, value in (
            ("steps", args.steps),
            ("lr", args.lr),
            ("batch_size", args.batch_size),
        ):
            params.setdefault(name, float(value))
    if len(set(args.parents)) != len(args.parents):
        raise CliError("--parents: a parent is listed twice")
    if args.remote:
        return merge_remote(args, method, params, out, (price, royalties, extra_metrics))
    if out is None:
        out = Path(DEFAULT_OUTPUT).absolute()
    recipe_path = out.with_name(out.name.removesuffix(".safetensors") + ".recipe.json")
    quiet = bool(args.json)

    def say(text: str) -> None:
        if not quiet:
            print(text, file=sys.stderr, flush=True)

    with _cli._client(args) as client:
        client.chain_id()  # fails fast (exit 3)
        plan = plan_merge(args, client, method, params)
        parents, specs, parent_ids = plan.parents, plan.specs, plan.parent_ids
        base_record, target, target_id = plan.base, plan.target, plan.target_id
        child_spec, recipe = plan.child_spec, plan.recipe
        max_parents, max_params = plan.max_parents, plan.max_params
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".neuroseed-merge-", dir=out.parent) as tmp:
            work = Path(tmp)
            paths = []
            for i, r in enumerate(parents):
                path = work / f"parent{i}.safetensors"
                say(f"fetching parent {i} {r['name']} ({r['id']})")
                _fetch_model(client, r, path, args.fetch_timeout, f"parent {i}")
                paths.append(str(path))
            base_path = None
            if base_record is not None and method in SAME_BASE_METHODS:
                base_path = work / "base.safetensors"
                say(f"fetching the base {base_record['name']} ({base_record['id']})")
                _fetch_model(client, base_record, base_path, args.fetch_timeout, "base")
            data_path = merge_data = None
            if target is not None:
                data_path = work / "target.safetensors"
                say(f"fetching the target dataset {target['name']} ({target['id']})")
                _fetch_dataset(args, client, target, data_path)
                if method == "distill":  # the student learns from the teachers on all of it
                    merge_data = data_path
                elif method in DATA_METHODS:  # ZipIt! and calibration look at a small slice
                    merge_data = work / "slice.safetensors"
                    write_slice(data_path, merge_data, args.slice_rows)
            tune = target is not None and method != "distill"
            merged_path = work / "merged.safetensors" if tune else out
            job: dict[str, Any] = {
                "kind": "merge",
                "recipe": recipe.encode().hex(),
                "parents": paths,
                "base": None if base_path is None else str(base_path),
                "specs": [spec_to_dict(s) for s in specs],
                "data": None if merge_data is None else str(merge_data),
                "output": str(merged_path),
                "threads": args.threads,
                "device": args.device,
                "max_merge_parents": max_parents,
                "max_step_parameters": max_params,
            }
            if tune:
                job["finetune"] = {
                    "data": str(data_path),
                    "val_fraction": args.val_fraction,
                    "split_seed": args.seed,
                    "config": {
                        "steps": args.steps,
                        "lr": args.lr,
                        "batch_size": args.batch_size,
                        "seed": args.seed,
                        "eval_every": max(1, args.steps // 10) if args.steps else 0,
                    },
                    "output": str(out),
                }
            from node.compute.worker import run_job

            bar = _StageBar(quiet=quiet)
            try:
                result = run_job(job, time_limit_s=args.time_limit, on_progress=bar)
            finally:
                bar.close()
        tuned = result.get("finetune")
        final = tuned if tuned is not None else result
        metrics: dict[str, float] = {}
        held_out = tuned if tuned is not None else result if method == "distill" else None
        if held_out is not None:
            m = held_out["metrics"]
            metrics = {"val_accuracy": m["val_accuracy"], "val_loss": m["val_loss"]}
        trained = tuned is not None or method in DATA_METHODS
        platform = (tuned or result).get("platform", "") if trained else ""
        recipe = dataclasses.replace(recipe, platform=platform)
        _cli._write_atomically(
            recipe_path, lambda fh: fh.write(json.dumps(recipe_to_json(recipe), indent=1).encode())
        )
        summary: dict[str, Any] = {
            "output": str(out),
            "sha256": final["sha256"],
            "fileSize": final["file_size"],
            "method": method,
            "parents": [r["id"] for r in parents],
            "base": None if base_record is None else base_record["id"],
            "targetDataset": None if target is None else target["id"],
            "childSpec": spec_to_dict(child_spec),
            "recipe": recipe_to_json(recipe),
            "recipeFile": str(recipe_path),
            "metrics": metrics,
            "mergeMetrics": result.get("metrics") or {},
            "platform": (tuned or result).get("platform"),
            "registration": None,
        }
        if not args.register:
            _print_merge(args, summary)
            return _cli.EXIT_OK
        names = " and ".join(r["name"] for r in parents)
        reg = Registration(
            spec=child_spec,
            name=args.name.strip(),
            description=args.description or f"{METHOD_NAMES.get(method, method)} merge of {names}",
            license=args.license or "",
            price=price,
            royalties=royalties,
            base=None if recipe.base is None else Hash32(recipe.base),
            parents=tuple(parent_ids),
            recipe=recipe,
            datasets=() if target_id is None else (target_id,),
            metrics=tuple(metric_of(k, v) for k, v in sorted(metrics.items())) + extra_metrics,
        )
        _check_metrics_unique(reg.metrics)
        body, fields = upload_and_register(args, client, out, reg)
    summary["id"] = _cli._hex(model_id(body.root))
    if not args.json:
        _print_merge(args, summary)
        return _cli._sign_send_wait(args, body, fields)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            code = _cli._sign_send_wait(args, body, fields)
    finally:
        lines = captured.getvalue().strip().splitlines()
        summary["registration"] = json.loads(lines[-1]) if lines else None
        _print_merge(args, summary)
    return code


def _print_merge(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    if args.json:
        _cli._print_json(summary)
        return
    rows: list[tuple[str, object]] = [
        ("file", summary["output"]),
        ("sha256", summary["sha256"]),
        ("method", METHOD_NAMES.get(summary["method"], summary["method"])),
        ("recipe", summary["recipeFile"]),
        ("child spec", _spec_text(summary["childSpec"])),
    ]
    for k, v in sorted(summary["metrics"].items()):
        rows.append((f"held-out {k}", f"{v:.4f}"))
    for k, v in sorted(summary["mergeMetrics"].items()):
        rows.append((f"merge {k}", f"{v:.4f}"))
    if summary.get("platform"):
        rows.append(("platform", summary["platform"]))
    print(_cli._rows(rows))


# --- argument parsing ------------------------------------------------------------------------------


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """What a registration carries besides the file, its spec and its lineage."""
    p.add_argument("--description", default="", help="free text (at most 4 KiB)")
    p.add_argument("--license", default="", help="license name (at most 128 bytes)")
    p.add_argument(
        "--price", metavar="NSD", default="0", help="price in NSD (default 0: free; priced "
        "models are stored encrypted and registered by the node's operator account)"
    )  # fmt: skip
    p.add_argument(
        "--metric", metavar="NAME=VALUE", action="append", default=[],
        help="a declared metric (at most 6 decimals), repeatable",
    )  # fmt: skip
    p.add_argument(
        "--royalty", metavar="ADDR=BPS", action="append", default=[],
        help="a royalty share in basis points (250 = 2.5 %%), repeatable",
    )  # fmt: skip


def register(commands: Any) -> None:
    """Add ``model …`` to the top-level subcommands of ``node.cli.build_parser``."""
    model = commands.add_parser("model", help="register, inspect, search and merge models")
    _cli._add_global_options(model, top=False)
    sub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    def command(name: str, handler: Callable[[argparse.Namespace], int], help_: str) -> Any:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_)
        _cli._add_global_options(p, top=False)
        p.set_defaults(handler=handler)
        return p

    p = command(
        "register",
        cmd_model_register,
        "upload a safetensors model to the local node (format v1; encrypted when priced) and "
        "register it with its spec and lineage",
    )
    p.add_argument("file", metavar="FILE", help="the model's safetensors file")
    p.add_argument("--spec", metavar="SPEC.json", required=True, help="its architecture spec")
    p.add_argument("--name", required=True, help="the model's name (at most 128 bytes)")
    p.add_argument("--base", metavar="ID", help="the model it was fine-tuned from")
    p.add_argument("--parents", metavar="ID", nargs="+", default=[], help="merge parents")
    p.add_argument("--recipe", metavar="R.json", help="the merge recipe (model merge writes it)")
    p.add_argument(
        "--datasets", metavar="ID", nargs="+", default=[], help="datasets it was trained on"
    )
    _add_model_options(p)
    _cli._add_sender_options(p)

    p = command("show", cmd_model_show, "show one model")
    p.add_argument("model", metavar="ID|CID", help="model id (0x…) or root CID")

    p = command(
        "lineage",
        cmd_model_lineage,
        "a model's ancestors (or descendants), optionally verified against the state root",
    )
    p.add_argument("model", metavar="ID|CID", help="model id (0x…) or root CID")
    p.add_argument("--descendants", action="store_true", help="descendants instead of ancestors")
    p.add_argument("--depth", metavar="N", type=int, help="at most N edges away (1–16)")
    p.add_argument(
        "--verify",
        action="store_true",
        help="check every edge and model record with its state proof (node.lightclient)",
    )

    p = command("search", cmd_model_search, "find models by signature, mergeability or text")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--signature", metavar="HEX", help="exactly this signature")
    what.add_argument(
        "--mergeable-with", metavar="ID", help="models mergeable with this one, and how"
    )
    what.add_argument("--text", metavar="TEXT", help="words in name, description or spec (BM25)")
    p.add_argument("--family", metavar="F", help="only this family (mlp, cnn, transformer)")
    p.add_argument("--limit", metavar="N", type=int, default=20, help="at most N (max 100)")
    p.add_argument("--cursor", metavar="C", help="continue after a previous page")

    p = command(
        "merge",
        cmd_model_merge,
        "merge models on this machine (a child process), transfer-learn the child on a target "
        "dataset and optionally register it with its lineage; or, with --remote, submit the "
        "merge as a paid compute task",
    )
    p.add_argument("--parents", metavar="ID", nargs="+", required=True, help="the parents")
    p.add_argument("--method", required=True, metavar="M", help=f"one of {', '.join(CLI_METHODS)}")
    p.add_argument("--base", metavar="ID", help="the shared base (task_arithmetic, ties, dare)")
    p.add_argument(
        "--coefficients", metavar="W", type=float, nargs="+", help="one weight per parent"
    )
    p.add_argument(
        "--param", metavar="NAME=VALUE", action="append", default=[],
        help="a method parameter: density (ties 0.2, dare 0.5), scale, t (slerp 0.5), …",
    )  # fmt: skip
    p.add_argument(
        "--class-map", metavar="C,C,…", action="append",
        help="zipit/union/distill: the child class of each of a parent's classes, once per "
        "parent (default: the parents' classes one after another)",
    )  # fmt: skip
    p.add_argument("--child-spec", metavar="SPEC.json", help="distill: the student's spec")
    p.add_argument(
        "--target-dataset", metavar="ID",
        help="transfer-learn (and slice) on it; data-based merges match on it",
    )  # fmt: skip
    p.add_argument(
        "--steps", metavar="N", type=int, help=f"training steps (default {DEFAULT_STEPS})"
    )
    p.add_argument("--lr", type=float, help=f"learning rate (default {DEFAULT_LR})")
    p.add_argument("--batch-size", type=int, help=f"batch size (default {DEFAULT_BATCH})")
    p.add_argument(
        "--val-fraction", type=float,
        help="held-out share of the target dataset the metrics are measured on "
        f"(default {DEFAULT_VAL_FRACTION})",
    )  # fmt: skip
    p.add_argument(
        "--slice-rows", type=int,
        help="rows of the target dataset a data-based merge matches and calibrates on "
        f"(default {DEFAULT_SLICE_ROWS})",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the recipe and of training")
    p.add_argument("--threads", type=int, help="torch threads (reproducibility; default 1)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), help="default cpu")
    p.add_argument(
        "-o", "--output", metavar="FILE",
        help=f"the child's file (default {DEFAULT_OUTPUT}; with --remote: download the output "
        "there, as --register does)",
    )  # fmt: skip
    p.add_argument(
        "--time-limit", metavar="S", type=float,
        help=f"kill the merge job after S seconds (default {DEFAULT_TIME_LIMIT:g})",
    )  # fmt: skip
    p.add_argument(
        "--fetch-timeout", metavar="S", type=float, default=DEFAULT_FETCH_TIMEOUT,
        help="seconds to wait for each fetch",
    )  # fmt: skip
    remote = p.add_argument_group("a paid merge task (--remote)")
    remote.add_argument(
        "--remote", action="store_true",
        help="submit the merge as a paid compute task instead of running it here, follow it "
        "and, once paid, download (-o) and register (--register) its output",
    )  # fmt: skip
    remote.add_argument("--max-price", metavar="NSD", help="most the provider is paid")
    remote.add_argument(
        "--verifier-fee", metavar="NSD", help="fee per verifier (default: 1%% of --max-price)"
    )
    remote.add_argument("--verifiers", metavar="N", type=int, help="verifiers (default 1)")
    remote.add_argument(
        "--platform", metavar="CLASS",
        help="the platform class it runs on (default: the providers' on chain when they share one)",
    )  # fmt: skip
    remote.add_argument(
        "--deadline", metavar="H", type=int,
        help="heights from now by which the result must be in (default 200)",
    )  # fmt: skip
    remote.add_argument("--wall-seconds", metavar="S", type=int, help="wall-time limit (3600)")
    remote.add_argument("--memory", metavar="SIZE", help="memory limit per device (1GiB)")
    remote.add_argument(
        "--watch-timeout", metavar="S", type=float,
        help="seconds to follow the task before giving up (it goes on; default 3600)",
    )  # fmt: skip
    p.add_argument("--register", action="store_true", help="upload and register the child")
    p.add_argument("--name", help="with --register: the child's name")
    _add_model_options(p)
    _cli._add_sender_options(p)


__all__ = [
    "CLI_METHODS",
    "METHOD_ALIASES",
    "Registration",
    "canonical_method",
    "child_spec_for",
    "cmd_model_lineage",
    "cmd_model_merge",
    "cmd_model_register",
    "cmd_model_search",
    "cmd_model_show",
    "local_model_header",
    "parse_metric",
    "parse_royalty",
    "recipe_from_json",
    "recipe_to_json",
    "register",
    "upload_and_register",
    "verify_lineage",
    "write_slice",
]
