"""Model search (``node.model_search``, issue 6 item 5): the signature index, every relation of
"mergeable with", BM25 ranking checked against the formula, pagination with cursors, query
checks, ``ns_searchModels``' params and JSON, and the service indexing registrations block by
block from a real ``ChainService`` (state at start, then each committed block, bounded rounds).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest

from node.consensus.txs import verify_transaction
from node.economy.api import Role
from node.economy.models import ModelRecord, ModelRegister, model_id
from node.economy.roles import RoleRegister
from node.model_search import (
    BadSearchCursor,
    Bm25,
    InvalidSearch,
    ModelIndex,
    ModelProfile,
    ModelSearchService,
    SearchQuery,
    SearchSettings,
    SearchUnavailable,
    UnknownSearchModel,
    compare,
    profile_of,
    tokenize,
)
from node.models.safetensors_header import encode_header
from node.models.specs import parameter_count, parse_spec, spec_header, spec_json, spec_signature
from node.storage import MemoryKV
from node.storage.unixfs import cid_of_file
from node.types import Amount, Hash32
from rpc.errors import InvalidParams
from rpc.methods import Context
from rpc.methods.search import ns_search_models
from tests.economy.econ import ECONOMY, build_artifact, economy_genesis, tx
from tests.helpers import addr, commit_next, open_chain

DIGITS = {"family": "mlp", "input_dim": 64, "hidden": [32, 32], "num_classes": 5}


def spec_of(**changes: Any) -> dict[str, Any]:
    return {**DIGITS, **changes}


def record(
    name: str,
    spec: dict[str, Any],
    *,
    seed: int,
    height: int = 1,
    description: str = "",
    base: bytes | None = None,
) -> ModelRecord:
    """A registry record as the chain would store it (the root is a real CID of some bytes)."""
    parsed = parse_spec(spec)
    root = bytes(cid_of_file(io.BytesIO(f"model {seed}".encode())))
    return ModelRecord(
        id=model_id(root),
        root=root,
        header=b"",
        spec=spec_json(parsed),
        signature=Hash32(spec_signature(parsed)),
        owner=addr(1),
        name=name,
        description=description,
        license="MIT",
        price=Amount(0),
        royalties=(),
        base=None if base is None else Hash32(base),
        parents=(),
        recipe=None,
        datasets=(),
        metrics=(),
        depth=0,
        height=height,
        family=parsed.family,
        parameters=parameter_count(parsed),
        data_size=0,
        salt=None,
        key_check=None,
        plain_data_hash=None,
    )


def profile(*args: Any, **kw: Any) -> ModelProfile:
    p = profile_of(record(*args, **kw))
    assert p is not None
    return p


def index_of(*profiles: ModelProfile) -> ModelIndex:
    index = ModelIndex()
    index.add(profiles, max(p.height for p in profiles))
    return index


def names(page: Any) -> list[str]:
    return [h.profile.name for h in page.hits]


# --- signature ------------------------------------------------------------------------------------


def test_signature_search_finds_exactly_that_layout_newest_first() -> None:
    a = profile("a", DIGITS, seed=1, height=3)
    b = profile("b", DIGITS, seed=2, height=7)
    wide = profile("wide", spec_of(hidden=[64, 32]), seed=3)
    f16 = profile("f16", spec_of(dtype="F16"), seed=4)  # same shapes, another dtype
    index = index_of(a, b, wide, f16)
    page = index.search(SearchQuery(signature=a.signature))
    assert names(page) == ["b", "a"] and page.total == 2 and page.next_cursor is None
    assert {h.relation for h in page.hits} == {"same_signature"}
    assert "linear" in page.hits[0].methods and "slerp" in page.hits[0].methods
    assert names(index.search(SearchQuery(signature=f16.signature))) == ["f16"]
    assert index.search(SearchQuery(signature=b"\x00" * 32)).hits == ()
    assert index.search(SearchQuery(signature=a.signature, family="cnn")).hits == ()


# --- mergeable with -------------------------------------------------------------------------------


BASE = b"\xbb" * 32


@pytest.fixture
def zoo() -> dict[str, ModelProfile]:
    """A digits MLP ``x`` and one model per relation to it (plus two it cannot be merged with)."""
    return {
        "x": profile("x", DIGITS, seed=1, height=1, base=BASE),
        "twin": profile("twin", DIGITS, seed=2, height=2),  # independently trained, same spec
        "sibling": profile("sibling", DIGITS, seed=3, height=3, base=BASE),  # same base
        "gelu": profile("gelu", spec_of(activation="gelu"), seed=4, height=4),
        "tenway": profile("tenway", spec_of(num_classes=10), seed=5, height=5),
        "wider": profile("wider", spec_of(hidden=[64, 16]), seed=6, height=6),
        "shallow": profile("shallow", spec_of(hidden=[32]), seed=7, height=7),
        "other_input": profile("other_input", spec_of(input_dim=10), seed=8),
        "cnn": profile(
            "cnn",
            {"family": "cnn", "in_channels": 1, "image_size": 8, "channels": [8], "num_classes": 5},
            seed=9,
        ),
    }


def test_each_relation_and_its_methods(zoo: dict[str, ModelProfile]) -> None:
    x = zoo["x"]
    rel = {n: compare(x, p) for n, p in zoo.items() if n != "x"}
    assert rel["other_input"] is None and rel["cnn"] is None  # no shared input: not comparable
    twin, sibling, gelu = rel["twin"], rel["sibling"], rel["gelu"]
    assert twin is not None and sibling is not None and gelu is not None
    # equal specs of an alignable family: elementwise, weight matching, ZipIt!, union
    assert twin.relation == "same_signature"
    assert twin.methods == (
        "linear", "slerp", "weight_matching", "zipit", "feature_union", "distill",
    )  # fmt: skip
    # a recorded base in common adds the task-vector methods
    assert sibling.relation == "same_signature" and sibling.shared_base == BASE
    assert {"task_arithmetic", "ties", "dare"} <= set(sibling.methods)
    assert "ties" not in twin.methods
    # same tensors, another activation: elementwise only (units do not correspond)
    assert gelu.relation == "same_signature" and gelu.methods == ("linear", "slerp", "distill")
    tenway, wider, shallow = rel["tenway"], rel["wider"], rel["shallow"]
    assert tenway is not None and wider is not None and shallow is not None
    assert tenway.relation == "same_widths"
    assert tenway.methods == ("zipit", "feature_union", "distill")
    assert "5 vs 10 classes" in tenway.reason
    assert wider.relation == "same_depth" and wider.methods == ("feature_union", "distill")
    assert shallow.relation == "same_input" and shallow.methods == ("distill",)


def test_transformers_of_one_signature_merge_elementwise_only() -> None:
    tf = {
        "family": "transformer", "vocab_size": 100, "max_len": 16, "d_model": 8, "n_heads": 2,
        "n_layers": 1, "d_ff": 16, "num_classes": 2,
    }  # fmt: skip
    a, b = profile("a", tf, seed=1), profile("b", tf, seed=2)
    c = profile("c", {**tf, "num_classes": 3}, seed=3)
    ab, ac = compare(a, b), compare(a, c)
    assert ab is not None and ab.methods == ("linear", "slerp", "distill")
    assert ac is not None and ac.relation == "same_input"  # no permutable units to zip


def test_mergeable_ranking_and_family_filter(zoo: dict[str, ModelProfile]) -> None:
    index = index_of(*zoo.values())
    page = index.search(SearchQuery(mergeable_with=zoo["x"].id), zoo["x"])
    # relation first, then a shared base, then the newest registration
    assert names(page) == ["sibling", "gelu", "twin", "tenway", "wider", "shallow"]
    assert [h.relation for h in page.hits] == [
        "same_signature", "same_signature", "same_signature", "same_widths", "same_depth",
        "same_input",
    ]  # fmt: skip
    scores = [h.score for h in page.hits]
    assert scores == sorted(scores, reverse=True)
    assert page.reference == zoo["x"]
    cnn = index.search(SearchQuery(mergeable_with=zoo["x"].id, family="cnn"), zoo["x"])
    assert cnn.hits == ()
    with pytest.raises(UnknownSearchModel):
        index.search(SearchQuery(mergeable_with=b"\x01" * 32), zoo["x"])


# --- text (BM25) ----------------------------------------------------------------------------------


def test_bm25_matches_the_formula() -> None:
    bm = Bm25()
    docs = {b"a": ["digits", "digits", "mlp"], b"b": ["digits", "cnn", "image", "net"]}
    for d, toks in docs.items():
        bm.add(d, toks)
    n, avg = 2, 3.5

    def expected(doc: bytes, term: str) -> float:
        df = sum(term in t for t in docs.values())
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        tf = docs[doc].count(term)
        norm = 1.2 * (1 - 0.75 + 0.75 * len(docs[doc]) / avg)
        return idf * tf * 2.2 / (tf + norm)

    got = bm.scores(["digits", "cnn"])
    assert got[b"a"] == pytest.approx(expected(b"a", "digits"))
    assert got[b"b"] == pytest.approx(expected(b"b", "digits") + expected(b"b", "cnn"))
    assert bm.scores(["absent"]) == {}


def test_text_ranking_name_description_and_spec() -> None:
    named = profile("Digits classifier", DIGITS, seed=1, description="a small MLP")
    described = profile(
        "mlp-7", DIGITS, seed=2,
        description="trained on handwritten digits among many other things in a long text",
    )  # fmt: skip
    unrelated = profile("speech", DIGITS, seed=3, description="keyword spotting")
    conv = profile(
        "vision",
        {"family": "cnn", "in_channels": 1, "image_size": 8, "channels": [8], "num_classes": 5},
        seed=4,
    )
    index = index_of(named, described, unrelated, conv)
    page = index.search(SearchQuery(text="digits"))
    assert names(page) == ["Digits classifier", "mlp-7"]  # the name counts more
    assert page.hits[0].score > page.hits[1].score > 0
    assert "'digits'" in page.hits[0].reason
    # the spec summary is searchable: layer types and family words
    assert names(index.search(SearchQuery(text="conv2d"))) == ["vision"]
    assert len(index.search(SearchQuery(text="MLP perceptron")).hits) == 3
    assert names(index.search(SearchQuery(text="digits", family="cnn"))) == []
    assert tokenize("Hello, wörld_2!") == ["hello", "wörld", "2"]


# --- pagination and query checks -------------------------------------------------------------------


def test_pages_cover_everything_once_even_while_models_arrive() -> None:
    index = index_of(*(profile(f"m{i}", DIGITS, seed=i, height=i) for i in range(1, 26)))
    sig = index.get(next(iter(index._models))).signature  # type: ignore[union-attr]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = index.search(SearchQuery(signature=sig, limit=10, cursor=cursor))
        assert page.total == 25 + (1 if pages else 0)
        seen += names(page)
        pages += 1
        if pages == 1:  # a newer model arrives between pages: it ranks first, not in page 2
            index.add([profile("late", DIGITS, seed=99, height=100)], 100)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert pages == 3 and len(seen) == len(set(seen)) == 25
    assert seen == [f"m{i}" for i in range(25, 0, -1)]


@pytest.mark.parametrize(
    ("query", "error"),
    [
        (SearchQuery(), InvalidSearch),
        (SearchQuery(signature=b"\x00" * 32, text="x"), InvalidSearch),
        (SearchQuery(signature=b"\x00" * 31), InvalidSearch),
        (SearchQuery(text="!!! ..."), InvalidSearch),
        (SearchQuery(text="x" * 600), InvalidSearch),
        (SearchQuery(text="x", limit=0), InvalidSearch),
        (SearchQuery(text="x", limit=101), InvalidSearch),
        (SearchQuery(text="x", cursor="12:zz"), BadSearchCursor),
        (SearchQuery(text="x", cursor="1:" + "00" * 31), BadSearchCursor),
    ],
)
def test_bad_queries(query: SearchQuery, error: type[Exception]) -> None:
    with pytest.raises(error):
        ModelIndex().search(query)


# --- ns_searchModels ----------------------------------------------------------------------------


class _View:
    """Just what the search method reads: state for a model the index has not seen."""

    def __init__(self, records: Sequence[ModelRecord] = ()) -> None:
        from node.economy.models import model_key

        self._state = {model_key(r.id): r.encode() for r in records}

    def get_state(self, key: bytes) -> bytes | None:
        return self._state.get(key)


class _Node:
    def __init__(self, service: ModelSearchService | None, view: _View) -> None:
        self.model_search = service
        self._view = view

    def read_view(self) -> _View:
        return self._view


def _call(node: _Node, query: Any) -> Any:
    return ns_search_models(Context(node, None), [query])  # type: ignore[arg-type]


def test_rpc_method_params_and_json(zoo: dict[str, ModelProfile]) -> None:
    late = record("late", spec_of(num_classes=10), seed=50, height=9)
    view = _View([late])
    service = ModelSearchService(lambda: view)
    service.index.add(list(zoo.values()), 8)
    node = _Node(service, view)
    x = zoo["x"]
    by_id = _call(node, {"mergeableWith": "0x" + x.id.hex(), "limit": 2})
    from rpc.methods.artifacts import cid_text

    by_root = _call(node, {"mergeableWith": cid_text(x.root), "limit": 2})
    assert by_id == by_root
    assert [m["name"] for m in by_id["models"]] == ["sibling", "gelu"]
    first = by_id["models"][0]
    assert first["relation"] == "same_signature" and "ties" in first["methods"]
    assert first["spec"]["hidden"] == [32, 32] and first["inputShape"] == [64]
    assert by_id["total"] == 6 and by_id["indexedHeight"] == 8 and by_id["nextCursor"]
    assert by_id["reference"]["name"] == "x"
    # a model registered after the index's height is compared from state
    fresh = _call(node, {"mergeableWith": "0x" + late.id.hex()})
    assert fresh["reference"]["name"] == "late"
    assert {m["name"]: m["relation"] for m in fresh["models"]}["x"] == "same_widths"
    text = _call(node, {"text": "wider", "family": "mlp"})
    assert [m["name"] for m in text["models"]] == ["wider"]
    with pytest.raises(InvalidParams):
        _call(node, {"text": "x", "colour": "red"})
    with pytest.raises(InvalidParams):
        _call(node, {"text": "x", "limit": 1000})
    with pytest.raises(InvalidSearch):
        _call(node, {})
    with pytest.raises(UnknownSearchModel):
        _call(node, {"mergeableWith": "0x" + "01" * 32})
    with pytest.raises(SearchUnavailable):
        _call(_Node(None, view), {"text": "x"})


# --- the service, block by block from a real chain ---------------------------------------------------

DEV = 5


def _model_tx(spec: dict[str, Any], seed: int, nonce: int, name: str) -> Any:
    parsed = parse_spec(spec)
    header = spec_header(parsed)
    data = bytes((seed * 31 + i * 7) % 251 for i in range(header.data_size))
    a = build_artifact(encode_header(header.tensors, None), data)
    body = ModelRegister(
        root=a.root,
        proof=a.proof,
        spec=spec_json(parsed),
        name=name,
        description=f"{name} for the search test",
        license="",
        price=Amount(0),
    )
    return verify_transaction(tx(DEV, body, nonce=nonce)), model_id(a.root)


async def test_service_indexes_state_then_each_block() -> None:
    small = {"family": "mlp", "input_dim": 4, "hidden": [3], "num_classes": 2}
    chain = open_chain(MemoryKV(), economy_genesis(replace(ECONOMY)))
    commit_next(
        chain,
        candidates=[verify_transaction(tx(DEV, RoleRegister(int(Role.MODEL_DEVELOPER)), nonce=0))],
    )
    nonce = 1
    ids = {}
    for name, seed in (("a", 1), ("b", 2)):
        vtx, ids[name] = _model_tx(small, seed, nonce, name)
        nonce += 1
        commit_next(chain, candidates=[vtx])
    service = ModelSearchService(chain.read_view, SearchSettings(blocks_per_round=1))
    await service.load()
    assert len(service.index) == 2 and service.index.height == chain.head_height
    assert await service.step() == 0  # nothing new
    # two more blocks: one with two registrations, one with a failed duplicate
    vc, ids["c"] = _model_tx(small, 3, nonce, "c")
    vd, ids["d"] = _model_tx({**small, "hidden": [5]}, 4, nonce + 1, "d")
    commit_next(chain, candidates=[vc, vd])
    dup, _ = _model_tx(small, 1, nonce + 2, "a again")
    _, result = commit_next(chain, candidates=[dup])
    assert not result.receipts or not result.receipts[0].success
    view = chain.read_view()
    # before the index catches up, a new model is compared from state
    page = service.search(SearchQuery(mergeable_with=ids["c"]), view)
    assert page.reference is not None and page.reference.name == "c"
    assert service.index.get(ids["c"]) is None
    assert await service.step() == 2  # one block per round: the block of c and d
    assert service.index.height == chain.head_height - 1
    assert await service.step() == 0  # the duplicate's block adds nothing
    assert service.index.height == chain.head_height and len(service.index) == 4
    sig = service.index.get(ids["a"])
    assert sig is not None
    same = service.search(SearchQuery(signature=sig.signature), view)
    assert sorted(h.profile.name for h in same.hits) == ["a", "b", "c"]
    page = service.search(SearchQuery(mergeable_with=ids["a"]), view)
    assert {h.profile.name: h.relation for h in page.hits} == {
        "b": "same_signature", "c": "same_signature", "d": "same_depth",
    }  # fmt: skip
    assert names(service.search(SearchQuery(text="search test c"), view))[0] == "c"
    # far behind (a syncing node): one state scan catches up instead of reading each block
    vf, ids["f"] = _model_tx(small, 6, chain.read_view().get_account(addr(DEV)).nonce, "f")
    commit_next(chain, candidates=[vf])
    commit_next(chain)
    behind = ModelSearchService(
        chain.read_view, SearchSettings(blocks_per_round=1, rescan_after_blocks=2)
    )
    behind.index.add([], 1)  # as if it had read block 1 only
    assert await behind.step() == 5 and behind.index.height == chain.head_height
    assert behind.index.get(ids["f"]) is not None
