"""``ns_*`` reads of the model registry (``docs/models.md``): ``ns_getModel``, ``ns_listModels``,
``ns_getLineage``.

All three answer from the committed read view in the RPC thread (DESIGN §1: reads never cross
the bridge). ``ns_getLineage`` walks ancestors through the records and descendants by prefix
scans of the lineage edge keys (``node.economy.models``), and with ``proofs`` attaches each
edge's state proof against the state root of the answered height (the head of the view), which
``node.lightclient.verify_inclusion`` checks. Shapes follow ``rpc.methods.ns``: hex bytes,
decimal-string amounts, camelCase fields.
"""

from __future__ import annotations

import json
from typing import Any

from node.api import ChainReadView, ViewState
from node.economy import models as mdl
from node.economy.api import NS_MODEL
from node.types import UINT64_MAX, Address, Hash32
from rpc.methods import Context, MethodTable
from rpc.methods.artifacts import cid_text, parse_root
from rpc.methods.ns import head_height, proof_to_json, record_to_json
from rpc.schema import (
    Params,
    bad_param,
    parse_address,
    parse_bool,
    parse_hash,
    parse_quantity,
    parse_str,
    to_hex,
)

MAX_LIST_LIMIT = 100
DEFAULT_LIST_LIMIT = 20
# Entries one ns_listModels call may look at: a filter that matches little returns fewer results
# and a cursor to go on from, rather than scanning the whole registry in one call.
MAX_LIST_SCAN = 10_000
MAX_LINEAGE_DEPTH = 16
MAX_FAMILY_FILTER = 32
DIRECTIONS = ("ancestors", "descendants")


# --- JSON shapes ---------------------------------------------------------------------------------


def _json_or_none(data: bytes) -> Any:
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None


def relation_names(relation: int) -> list[str]:
    """``Relation`` bits as names: ``["parent"]``, ``["base"]`` or both."""
    return [r.name.lower() for r in mdl.Relation if r.name is not None and relation & r]


def model_to_json(record: mdl.ModelRecord, *, header: bool = True) -> dict[str, Any]:
    """A model record: its fields, the root as a CID string, spec and header as JSON, metrics as
    signed millionths and the recipe's float64 values decoded. ``header=False`` (listings) leaves
    the header out."""
    out = record_to_json(record)
    out["rootCid"] = cid_text(record.root)
    out["specJson"] = _json_or_none(record.spec)
    if header:
        out["headerJson"] = _json_or_none(record.header)
    else:
        del out["header"]
    out["metrics"] = [
        {"name": m.name, "millionths": m.value, "value": _millionths_text(m.value)}
        for m in record.metrics
    ]
    if record.recipe is not None:
        recipe = out["recipe"]
        recipe["weights"] = list(record.recipe.weights)
        recipe["paramValues"] = {p.name: record.recipe.param(p.name) for p in record.recipe.params}
        recipe["childSpecJson"] = _json_or_none(record.recipe.child_spec)
    out["isPriced"] = record.is_priced
    out["isEncrypted"] = record.is_encrypted
    return out


def _millionths_text(value: int) -> str:
    """Signed millionths as an exact decimal string (``-1500000`` → ``"-1.500000"``)."""
    sign = "-" if value < 0 else ""
    return f"{sign}{abs(value) // 1_000_000}.{abs(value) % 1_000_000:06d}"


def _summary(record: mdl.ModelRecord) -> dict[str, Any]:
    return {
        "id": to_hex(record.id),
        "name": record.name,
        "rootCid": cid_text(record.root),
        "owner": to_hex(record.owner),
        "family": record.family,
        "signature": to_hex(record.signature),
        "depth": record.depth,
        "height": record.height,
    }


# --- handlers ------------------------------------------------------------------------------------


def _lookup(view: ChainReadView, value: Any, name: str) -> mdl.ModelRecord | None:
    """A model by id (``0x`` + 32 bytes) or by root CID (string or ``0x`` hex of the CID)."""
    state = ViewState(view)
    if isinstance(value, str) and value.startswith(("0x", "0X")) and len(value) == 66:
        return mdl.get_model(state, parse_hash(value, name))
    return mdl.get_model_by_root(state, parse_root(value, name))


def ns_get_model(ctx: Context, params: Any) -> dict[str, Any] | None:
    """A model by id or root CID; null if unknown."""
    p = Params(params, ("model",))
    record = _lookup(ctx.node.read_view(), p[0], "model")
    return None if record is None else model_to_json(record)


def ns_list_models(ctx: Context, params: Any) -> dict[str, Any]:
    """Models in id order (within a signature when ``signature`` is given), filtered by owner
    and family; ``nextCursor`` (a model id) continues, null at the end."""
    p = Params(params, ("filter",), required=0)
    f = p.get(0, {})
    if f is None:
        f = {}
    if not isinstance(f, dict):
        raise bad_param("filter", "expected an object")
    unknown = set(f) - {"owner", "signature", "family", "cursor", "limit"}
    if unknown:
        raise bad_param(f"filter.{sorted(unknown)[0]}", "unknown field")
    owner: Address | None = (
        parse_address(f["owner"], "filter.owner") if f.get("owner") is not None else None
    )
    signature: Hash32 | None = (
        parse_hash(f["signature"], "filter.signature") if f.get("signature") is not None else None
    )
    family = parse_str(f["family"], "filter.family") if f.get("family") is not None else None
    if family is not None and len(family) > MAX_FAMILY_FILTER:
        raise bad_param("filter.family", f"at most {MAX_FAMILY_FILTER} characters")
    cursor = parse_hash(f["cursor"], "filter.cursor") if f.get("cursor") is not None else None
    limit = parse_quantity(f.get("limit", DEFAULT_LIST_LIMIT), "filter.limit", maximum=UINT64_MAX)
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise bad_param("filter.limit", f"expected 1 to {MAX_LIST_LIMIT}")
    view = ctx.node.read_view()
    state = ViewState(view)
    if signature is None:
        prefix = NS_MODEL
        after = None if cursor is None else mdl.model_key(cursor)
    else:
        prefix = mdl.signature_prefix(signature)
        after = None if cursor is None else mdl.signature_key(signature, cursor)
    out: list[dict[str, Any]] = []
    scanned = 0
    last: bytes | None = None
    exhausted = True
    for key, value in view.iter_state(prefix, after=after):
        if len(out) >= limit or scanned >= MAX_LIST_SCAN:
            exhausted = False
            break
        scanned += 1
        last = key[len(prefix) :]
        if signature is None:
            record: mdl.ModelRecord | None = mdl.ModelRecord.decode(value)
        else:
            record = mdl.get_model(state, last)
        if record is None:  # pragma: no cover - an index entry always has its record
            continue
        if owner is not None and record.owner != owner:
            continue
        if family is not None and record.family != family:
            continue
        out.append(model_to_json(record, header=False))
    return {
        "models": out,
        "nextCursor": None if exhausted or last is None else to_hex(last),
        "scanned": scanned,
    }


def ns_get_lineage(ctx: Context, params: Any) -> dict[str, Any]:
    """Ancestors or descendants of a model up to ``depth`` edges, optionally with each edge's
    state proof against the state root of the answered height (``UnknownModel`` if unknown)."""
    p = Params(params, ("query",))
    q = p[0]
    if not isinstance(q, dict):
        raise bad_param("query", "expected an object {model, direction, depth?, proofs?}")
    unknown = set(q) - {"model", "direction", "depth", "proofs"}
    if unknown:
        raise bad_param(f"query.{sorted(unknown)[0]}", "unknown field")
    if "model" not in q:
        raise bad_param("query.model", "missing")
    direction = parse_str(q.get("direction"), "query.direction", choices=DIRECTIONS)
    depth = parse_quantity(q.get("depth", MAX_LINEAGE_DEPTH), "query.depth", maximum=UINT64_MAX)
    if not 1 <= depth <= MAX_LINEAGE_DEPTH:
        raise bad_param("query.depth", f"expected 1 to {MAX_LINEAGE_DEPTH}")
    proofs = parse_bool(q.get("proofs", False), "query.proofs")
    view = ctx.node.read_view()
    state = ViewState(view)
    start = _lookup(view, q["model"], "query.model")
    if start is None:
        raise mdl.UnknownModel(f"no model {q['model']}")
    if direction == "ancestors":
        walk = mdl.ancestors(state, start.id, max_depth=depth)
    else:
        walk = mdl.descendants(lambda prefix: view.iter_state(prefix), start.id, max_depth=depth)
    height = head_height(view)
    state_root = None if view.head is None else to_hex(view.head.state_root)
    edges = []
    for e in walk.edges:
        item: dict[str, Any] = {
            "ancestor": to_hex(e.ancestor),
            "child": to_hex(e.child),
            "relation": relation_names(e.relation),
            "relationCode": int(e.relation),
            "distance": e.distance,
            "key": to_hex(e.key),
            "value": to_hex(bytes([e.relation])),
        }
        if proofs:
            proof = view.get_proof(e.key, height)
            item["proof"] = proof_to_json(proof)
            state_root = to_hex(proof.state_root)
        edges.append(item)
    summaries = {to_hex(start.id): _summary(start)}
    for m in walk.models:
        record = mdl.get_model(state, m)
        if record is not None:
            summaries[to_hex(m)] = _summary(record)
    return {
        "model": to_hex(start.id),
        "direction": direction,
        "depth": depth,
        "height": height,
        "stateRoot": state_root,
        "edges": edges,
        "models": summaries,
        "truncated": walk.truncated,
    }


def register(table: MethodTable) -> None:
    table.add("ns_getModel", ns_get_model)
    table.add("ns_listModels", ns_list_models)
    table.add("ns_getLineage", ns_get_lineage)
