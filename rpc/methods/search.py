"""``ns_searchModels``: the node's model search (``node.model_search``, docs/rpc.md "Models").

``ns_searchModels({signature? | mergeableWith? | text?, family?, limit?, cursor?})`` takes
exactly one criterion: a signature (``0x`` + 32 bytes), a model to merge with (its id or root
CID), or free text (BM25). Each result is a model with its ``relation`` to the query, the
``reason`` in words, the applicable merge ``methods`` (``node.merge.recipe`` names) and its
ranking ``score``; ``nextCursor`` continues (null at the end), ``total`` counts every result and
``indexedHeight`` says up to which block the index has read. The index is the node's own
in-memory structure (thread-safe), so the query runs in the RPC thread without crossing the
bridge, like the chain reads.
"""

from __future__ import annotations

from typing import Any

from node.economy.models import model_id
from node.model_search import (
    MAX_LIMIT,
    ModelProfile,
    SearchHit,
    SearchPage,
    SearchQuery,
    SearchUnavailable,
)
from node.models.specs import input_shape, spec_to_dict
from node.types import UINT64_MAX
from rpc.methods import Context, MethodTable
from rpc.methods.artifacts import cid_text, parse_root
from rpc.schema import Params, bad_param, parse_hash, parse_quantity, parse_str, to_hex

MAX_FAMILY = 32
MAX_TEXT = 512
MAX_CURSOR = 100
_FIELDS = frozenset({"signature", "mergeableWith", "text", "family", "limit", "cursor"})


def parse_model_ref(value: Any, name: str) -> bytes:
    """A model id (``0x`` + 32 bytes) or a root CID (string or ``0x`` hex), as the model id."""
    if isinstance(value, str) and value.startswith(("0x", "0X")) and len(value) == 66:
        return bytes(parse_hash(value, name))
    return bytes(model_id(parse_root(value, name)))


def parse_query(raw: Any) -> SearchQuery:
    if not isinstance(raw, dict):
        raise bad_param("query", "expected an object {signature | mergeableWith | text, ...}")
    unknown = set(raw) - _FIELDS
    if unknown:
        raise bad_param(f"query.{sorted(unknown)[0]}", "unknown field")

    def text_field(key: str, cap: int) -> str | None:
        if raw.get(key) is None:
            return None
        value = parse_str(raw[key], f"query.{key}")
        if len(value) > cap:
            raise bad_param(f"query.{key}", f"at most {cap} characters")
        return value

    signature = raw.get("signature")
    mergeable = raw.get("mergeableWith")
    return SearchQuery(
        signature=None if signature is None else bytes(parse_hash(signature, "query.signature")),
        mergeable_with=None
        if mergeable is None
        else parse_model_ref(mergeable, "query.mergeableWith"),
        text=text_field("text", MAX_TEXT),
        family=text_field("family", MAX_FAMILY),
        limit=parse_quantity(raw.get("limit", 20), "query.limit", maximum=UINT64_MAX),
        cursor=text_field("cursor", MAX_CURSOR),
    )


def profile_to_json(p: ModelProfile) -> dict[str, Any]:
    return {
        "id": to_hex(p.id),
        "rootCid": cid_text(p.root),
        "name": p.name,
        "description": p.description,
        "owner": to_hex(p.owner),
        "family": p.family,
        "spec": spec_to_dict(p.spec),
        "signature": to_hex(p.signature),
        "parameters": p.parameters,
        "inputShape": list(input_shape(p.spec)),
        "numClasses": p.spec.num_classes,
        "base": None if p.base is None else to_hex(p.base),
        "parents": [to_hex(x) for x in p.parents],
        "height": p.height,
        "price": str(p.price),
    }


def hit_to_json(hit: SearchHit) -> dict[str, Any]:
    out = profile_to_json(hit.profile)
    out["relation"] = hit.relation
    out["methods"] = list(hit.methods)
    out["reason"] = hit.reason
    out["score"] = hit.score
    return out


def page_to_json(page: SearchPage) -> dict[str, Any]:
    return {
        "models": [hit_to_json(h) for h in page.hits],
        "nextCursor": page.next_cursor,
        "total": page.total,
        "indexedHeight": page.indexed_height,
        "reference": None if page.reference is None else profile_to_json(page.reference),
    }


def ns_search_models(ctx: Context, params: Any) -> dict[str, Any]:
    """Search the registered models (see the module docstring); at most 100 per page."""
    p = Params(params, ("query",))
    query = parse_query(p[0])
    if not 1 <= query.limit <= MAX_LIMIT:
        raise bad_param("query.limit", f"expected 1 to {MAX_LIMIT}")
    service = getattr(ctx.node, "model_search", None)
    if service is None:
        raise SearchUnavailable("this node runs no model search index")
    return page_to_json(service.search(query, ctx.node.read_view()))


def register(table: MethodTable) -> None:
    table.add("ns_searchModels", ns_search_models)
