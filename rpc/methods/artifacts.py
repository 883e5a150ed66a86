"""``ns_*`` methods of artifacts, datasets, roles and purchases (docs/rpc.md "Artifacts").

Chain reads (``ns_getDataset``, ``ns_listDatasets``, ``ns_getRoles``, ``ns_getPurchase``) answer
from the read view in the RPC thread. Local presence and downloads (``ns_getArtifact``,
``ns_fetchArtifact``, ``ns_fetchStatus``) cross into the node's ``ArtifactService``; the fetch
methods make this node do work, so they are local-only. A root is given as a CID string
(``bafk…``/``bafy…``) or the ``0x`` hex of the binary CID; results show both.
"""

from __future__ import annotations

import json
from typing import Any

from node.api import ViewState
from node.artifact_service import ArtifactInfo, ArtifactsDisabled, FetchJob, UploadResult
from node.economy.api import NS_DATASET, Role
from node.economy.datasets import DatasetRecord, dataset_key, get_dataset, get_dataset_by_root
from node.economy.roles import get_roles
from node.errors import DecodeError
from node.storage.unixfs import DAG_PB_CODEC, RAW_CODEC, parse_cid
from node.types import UINT64_MAX
from rpc.methods import Context, MethodTable
from rpc.methods.ns import record_to_json
from rpc.schema import (
    Params,
    bad_param,
    parse_address,
    parse_bool,
    parse_hash,
    parse_hex_bytes,
    parse_quantity,
    parse_str,
    to_hex,
)

MAX_LIST_LIMIT = 100
DEFAULT_LIST_LIMIT = 20
# Records one ns_listDatasets call may look at: a filter that matches little returns fewer results
# and a cursor to go on from, rather than scanning the whole state in one call.
MAX_LIST_SCAN = 10_000
MAX_ACCESS_BYTES = 1024
MAX_FETCH_LEAVES = 1 << 20
MAX_TEXT_FILTER = 256


# --- params -----------------------------------------------------------------------------------------


def parse_root(value: Any, name: str) -> bytes:
    """A root CID: a CID string or ``0x`` hex of the binary CID (CIDv1, raw or dag-pb)."""
    if not isinstance(value, str) or not value:
        raise bad_param(name, "expected a CID string or the 0x hex of a binary CID")
    if value.startswith(("0x", "0X")):
        raw = parse_hex_bytes(value, name, max_length=128)
        try:
            cid = parse_cid(raw)
        except DecodeError:
            raise bad_param(name, "not a binary CID") from None
    else:
        if len(value) > 256:
            raise bad_param(name, "too long for a CID")
        try:
            cid = parse_cid(value)
        except DecodeError:
            raise bad_param(name, f"{value[:80]!r} is not a CID") from None
    if cid.version != 1 or cid.codec.code not in (RAW_CODEC, DAG_PB_CODEC):
        raise bad_param(name, "expected a CIDv1 of a raw leaf or a dag-pb node")
    return bytes(cid)


def cid_text(root: bytes) -> str | None:
    try:
        return str(parse_cid(root))
    except DecodeError:
        return None


def _artifacts(ctx: Context) -> Any:
    service = getattr(ctx.node, "artifacts", None)
    if service is None:
        raise ArtifactsDisabled("this node has no artifact service")
    return service


# --- JSON shapes ------------------------------------------------------------------------------------


def _header_json(header: bytes) -> Any:
    try:
        return json.loads(header) if header else None
    except ValueError:
        return None


def dataset_to_json(record: DatasetRecord) -> dict[str, Any]:
    """A dataset record: its fields, the root as a CID string, the header as JSON."""
    out = record_to_json(record)
    out["rootCid"] = cid_text(record.root) if record.root else None
    out["headerJson"] = _header_json(record.header)
    out["isComposite"] = record.is_composite
    out["isPriced"] = record.is_priced
    out["isEncrypted"] = record.is_encrypted
    return out


def upload_to_json(result: UploadResult) -> dict[str, Any]:
    """The answer of ``POST /artifacts``: what a ``DatasetRegister`` needs."""
    return {
        "root": cid_text(result.root),
        "rootHex": to_hex(result.root),
        "size": result.size,
        "blocks": result.blocks,
        "proof": to_hex(result.proof.encode()),
        "header": _header_json(result.header_json),
        "headerHex": to_hex(result.header_json),
        "dataSize": result.data_size,
        "rows": result.rows,
        "encrypted": result.encrypted,
        "salt": None if result.salt is None else to_hex(result.salt),
        "keyCheck": None if result.key_check is None else to_hex(result.key_check),
        "plainDataHash": to_hex(result.plain_data_hash),
    }


def artifact_to_json(info: ArtifactInfo) -> dict[str, Any]:
    return {
        "root": cid_text(info.root),
        "rootHex": to_hex(info.root),
        "size": info.size,
        "pinned": info.pinned,
        "blocksPresent": info.blocks_present,
        "blocksMissing": info.blocks_missing,
        "complete": info.complete,
        "providers": list(info.providers),
        "contentKeyHeld": info.priced_key_held,
    }


def job_to_json(job: FetchJob) -> dict[str, Any]:
    return {
        "job": job.id,
        "root": cid_text(job.root),
        "rootHex": to_hex(job.root),
        "leaves": None if job.leaves is None else list(job.leaves),
        "state": job.state,
        "blocksFetched": job.blocks_fetched,
        "bytesFetched": job.bytes_fetched,
        "providers": job.providers,
        "missing": job.missing,
        "error": job.error,
        "errorCode": job.error_code,
        "startedMs": job.started_ms,
        "finishedMs": job.finished_ms,
    }


def _role_name(role: int) -> str | None:
    try:
        return Role(role).name.lower()
    except ValueError:
        return None


# --- chain reads ------------------------------------------------------------------------------------


def _lookup_dataset(ctx: Context, value: Any, name: str) -> DatasetRecord | None:
    view = ctx.node.read_view()
    state = ViewState(view)
    if isinstance(value, str) and value.startswith(("0x", "0X")) and len(value) == 66:
        return get_dataset(state, parse_hash(value, name))
    return get_dataset_by_root(state, parse_root(value, name))


def ns_get_dataset(ctx: Context, params: Any) -> dict[str, Any] | None:
    """A dataset (or composite) by id (0x + 32 bytes) or by root CID; null if unknown."""
    p = Params(params, ("dataset",))
    record = _lookup_dataset(ctx, p[0], "dataset")
    return None if record is None else dataset_to_json(record)


def ns_list_datasets(ctx: Context, params: Any) -> dict[str, Any]:
    """Datasets in id order, filtered; ``nextCursor`` continues (null at the end)."""
    p = Params(params, ("filter",), required=0)
    f = p.get(0, {})
    if f is None:
        f = {}
    if not isinstance(f, dict):
        raise bad_param("filter", "expected an object")
    known = {"owner", "priced", "composite", "text", "cursor", "limit"}
    unknown = set(f) - known
    if unknown:
        raise bad_param(f"filter.{sorted(unknown)[0]}", "unknown field")
    owner = parse_address(f["owner"], "filter.owner") if f.get("owner") is not None else None
    priced = parse_bool(f["priced"], "filter.priced") if f.get("priced") is not None else None
    composite = (
        parse_bool(f["composite"], "filter.composite") if f.get("composite") is not None else None
    )
    text = parse_str(f["text"], "filter.text").casefold() if f.get("text") is not None else None
    if text is not None and len(text) > MAX_TEXT_FILTER:
        raise bad_param("filter.text", f"at most {MAX_TEXT_FILTER} characters")
    cursor = parse_hash(f["cursor"], "filter.cursor") if f.get("cursor") is not None else None
    limit = parse_quantity(f.get("limit", DEFAULT_LIST_LIMIT), "filter.limit", maximum=UINT64_MAX)
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise bad_param("filter.limit", f"expected 1 to {MAX_LIST_LIMIT}")
    view = ctx.node.read_view()
    after = None if cursor is None else dataset_key(cursor)
    out: list[dict[str, Any]] = []
    scanned = 0
    last: bytes | None = None
    exhausted = True
    for key, value in view.iter_state(NS_DATASET, after=after):
        if len(out) >= limit or scanned >= MAX_LIST_SCAN:
            exhausted = False
            break
        scanned += 1
        last = key[len(NS_DATASET) :]
        record = DatasetRecord.decode(value)
        if owner is not None and record.owner != owner:
            continue
        if priced is not None and record.is_priced != priced:
            continue
        if composite is not None and record.is_composite != composite:
            continue
        if text is not None and text not in (
            record.name.casefold() + "\n" + record.description.casefold()
        ):
            continue
        out.append(dataset_to_json(record))
    return {
        "datasets": out,
        "nextCursor": None if exhausted or last is None else to_hex(last),
        "scanned": scanned,
    }


def ns_get_roles(ctx: Context, params: Any) -> dict[str, Any]:
    p = Params(params, ("address",))
    address = parse_address(p[0], "address")
    entries = get_roles(ViewState(ctx.node.read_view()), address)
    roles = []
    for e in entries:
        item = record_to_json(e)
        item["name"] = _role_name(e.role)
        roles.append(item)
    return {"address": to_hex(address), "roles": roles}


def ns_get_purchase(ctx: Context, params: Any) -> dict[str, Any] | None:
    p = Params(params, ("purchase",))
    purchase_id = parse_hash(p[0], "purchase")
    from node.economy.purchases import get_purchase

    record = get_purchase(ViewState(ctx.node.read_view()), purchase_id)
    if record is None:
        return None
    out = record_to_json(record)
    out["id"] = to_hex(purchase_id)
    return out


# --- the local node's artifacts -----------------------------------------------------------------------


async def ns_get_artifact(ctx: Context, params: Any) -> dict[str, Any]:
    """Local presence of an artifact: blocks present/missing, pinned, size, providers known."""
    p = Params(params, ("root",))
    root = parse_root(p[0], "root")
    service = _artifacts(ctx)
    info = await ctx.bridge.call(service.artifact_info, root)
    return artifact_to_json(info)


async def ns_fetch_artifact(ctx: Context, params: Any) -> dict[str, Any]:
    """Start (or join) a download into this node's blob store; returns the job (local only)."""
    p = Params(params, ("request",))
    req = p[0]
    if not isinstance(req, dict):
        raise bad_param("request", "expected an object {root, leaves?, access?}")
    unknown = set(req) - {"root", "leaves", "access"}
    if unknown:
        raise bad_param(f"request.{sorted(unknown)[0]}", "unknown field")
    if "root" not in req:
        raise bad_param("request.root", "missing")
    root = parse_root(req["root"], "request.root")
    leaves = None
    if req.get("leaves") is not None:
        raw = req["leaves"]
        if not isinstance(raw, list) or len(raw) > MAX_FETCH_LEAVES:
            raise bad_param(
                "request.leaves", f"expected a list of at most {MAX_FETCH_LEAVES} leaf indexes"
            )
        leaves = [parse_quantity(v, "request.leaves[]", maximum=UINT64_MAX) for v in raw]
    access = None
    if req.get("access") is not None:
        from node.p2p.chunks import AccessRequest

        encoded = parse_hex_bytes(req["access"], "request.access", max_length=MAX_ACCESS_BYTES)
        try:
            access = AccessRequest.decode(encoded)
        except DecodeError as exc:
            raise bad_param("request.access", f"not an access request: {exc.message}") from None
        if bytes(access.terms.root) != root:
            raise bad_param("request.access", "names another root")
    service = _artifacts(ctx)

    async def start() -> FetchJob:
        job: FetchJob = service.start_fetch(root, leaves=leaves, access=access)
        return job

    return job_to_json(await ctx.bridge.call(start))


async def ns_fetch_status(ctx: Context, params: Any) -> dict[str, Any]:
    p = Params(params, ("job",))
    job_id = parse_str(p[0], "job")
    if len(job_id) > 64:
        raise bad_param("job", "not a job id")
    service = _artifacts(ctx)

    async def status() -> FetchJob:
        job: FetchJob = service.fetch_status(job_id)
        return job

    return job_to_json(await ctx.bridge.call(status))


async def ns_node_info(ctx: Context, params: Any) -> dict[str, Any]:
    """This node's peer id and operator account (what a downloader binds access requests to)."""
    Params(params, ())
    node = ctx.node
    network = getattr(node, "network", None)
    peer_id = None if network is None else getattr(network, "peer_id", None)
    operator = getattr(node, "operator", None)
    service = getattr(node, "artifacts", None)
    return {
        "peerId": None if peer_id is None else to_hex(bytes(peer_id)),
        "operator": None if operator is None else to_hex(operator.address),
        "artifacts": service is not None,
        "local": ctx.local,
    }


def register(table: MethodTable) -> None:
    table.add("ns_getDataset", ns_get_dataset)
    table.add("ns_listDatasets", ns_list_datasets)
    table.add("ns_getRoles", ns_get_roles)
    table.add("ns_getPurchase", ns_get_purchase)
    table.add("ns_getArtifact", ns_get_artifact)
    table.add("ns_nodeInfo", ns_node_info)
    table.add("ns_fetchArtifact", ns_fetch_artifact, local_only=True)
    table.add("ns_fetchStatus", ns_fetch_status, local_only=True)
