"""The model registry on chain (node/economy/models.py, DESIGN §8 "Model", issue 6 item 2): the
record a registration derives, every rejection with its specific error and nothing written, and
an inverted tree of merges whose ancestors and descendants are walked and each edge proven
against the state root by the light-client verifier (``node.lightclient``).

Artifacts are real format-v1 files (``tests/economy/econ.build_artifact``) whose header is the one
``node.models.specs`` derives from an MLP spec; the lineage test runs through committed blocks of
a ``ChainService`` so the proofs are the node's own."""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import pytest

from node import lightclient
from node.chain import ChainService
from node.consensus.fees import compute_cost
from node.consensus.txs import verify_transaction
from node.economy.api import (
    NS_MODEL_CHILD,
    EconomyKind,
    EconomyParams,
    Role,
    economy_params,
)
from node.economy.datasets import InvalidRootCid, dataset_id
from node.economy.models import (
    BadLineage,
    BadMetrics,
    BadRoyalties,
    EmptyModelName,
    IncompatibleLineage,
    InvalidMergeRecipe,
    InvalidModelSpec,
    Metric,
    ModelExists,
    ModelHeaderMismatch,
    ModelPathMismatch,
    ModelPriceTermsMismatch,
    ModelRecord,
    ModelRegister,
    ModelSizeMismatch,
    ModelSpecMismatch,
    NotSafetensorsModel,
    Relation,
    RoyaltyShare,
    StepParameterCapExceeded,
    TooManyMergeParents,
    UnknownBase,
    UnknownModel,
    UnknownModelFamily,
    UnknownParent,
    UnknownTrainingDataset,
    ancestors,
    children_prefix,
    descendants,
    edge_key,
    get_model,
    get_model_by_root,
    get_relation,
    model_id,
    model_key,
    parse_edge_key,
    signature_key,
    signature_prefix,
)
from node.economy.roles import MissingRole, RoleRegister
from node.encoding import Record
from node.errors import InvalidTransaction
from node.merge.recipe import MergeRecipe
from node.models.safetensors_header import encode_header
from node.models.specs import parameter_count, parse_spec, spec_header, spec_json, spec_signature
from node.storage import MemoryKV
from node.storage.format_v1 import ArtifactProof
from node.storage.unixfs import UnixfsBuilder
from node.types import Amount, Hash32
from tests.economy.econ import (
    ECONOMY,
    SUPPLIER,
    Artifact,
    EconomyChain,
    addr,
    build_artifact,
    economy_genesis,
    register_body,
    rows_dataset,
    tx,
)
from tests.helpers import commit_next, open_chain

DEV = 5  # a model developer
DEV2 = 6  # another one
NOBODY = 7  # no role


# --- builders -------------------------------------------------------------------------------------


def mlp(input_dim: int = 4, hidden: Sequence[int] = (3,), classes: int = 2, **kw: Any) -> bytes:
    """Canonical spec JSON of an MLP."""
    tree = {"family": "mlp", "input_dim": input_dim, "hidden": list(hidden), "num_classes": classes}
    tree.update(kw)
    return spec_json(parse_spec(tree))


SPEC = mlp()  # 4 -> 3 -> 2: 23 parameters
WIDE = mlp(hidden=(5,))  # another signature


def model_artifact(spec: bytes = SPEC, seed: int = 0, **kw: Any) -> Artifact:
    """A format-v1 model file of ``spec`` (tensors in sorted-name order, bytes from ``seed``)."""
    header = spec_header(parse_spec(spec))
    data = bytes((seed * 31 + i * 7) % 251 for i in range(header.data_size))
    return build_artifact(encode_header(header.tensors, None), data, **kw)


def priced_model(spec: bytes = SPEC, seed: int = 9) -> Artifact:
    return model_artifact(spec, seed, key=bytes([seed]) * 32, salt=bytes([seed + 1]) * 7)


def model_body(a: Artifact, spec: bytes = SPEC, **kw: Any) -> ModelRegister:
    fields: dict[str, Any] = {
        "root": a.root,
        "proof": a.proof,
        "spec": spec,
        "name": "model",
        "description": "a test model",
        "license": "MIT",
        "price": Amount(0),
    }
    if kw.get("price"):
        fields.update(salt=a.salt, key_check=a.key_check, plain_data_hash=a.plain_hash)
    fields.update(kw)
    return ModelRegister(**fields)


def linear(*parents: bytes, base: bytes | None = None, **kw: Any) -> MergeRecipe:
    return MergeRecipe.create(
        "linear", parents, base=base, coefficients=[1.0 / len(parents)] * len(parents), **kw
    )


def merged(a: Artifact, parents: Sequence[bytes], spec: bytes = SPEC, **kw: Any) -> ModelRegister:
    """A registration of ``a`` as the linear merge of ``parents``."""
    ids = tuple(Hash32(bytes(p)) for p in parents)
    recipe = kw.pop("recipe", None) or linear(*ids, base=kw.get("base"))
    return model_body(a, spec, parents=ids, recipe=recipe, **kw)


def models_genesis(**economy: Any) -> Any:
    return economy_genesis(replace(ECONOMY, **economy))


@pytest.fixture
def chain() -> EconomyChain:
    c = EconomyChain(models_genesis())
    c.register_roles(
        (DEV, Role.MODEL_DEVELOPER), (DEV2, Role.MODEL_DEVELOPER), (SUPPLIER, Role.DATA_SUPPLIER)
    )
    return c


def register(c: EconomyChain, who: int, body: ModelRegister) -> ModelRecord:
    c.run(c.tx(who, body))
    record = get_model(c.view(), model_id(body.root))
    assert record is not None
    return record


# --- the record -----------------------------------------------------------------------------------


def test_root_model_record_and_indexes(chain: EconomyChain) -> None:
    a = model_artifact()
    body = model_body(
        a,
        name="digits-mlp",
        royalties=(RoyaltyShare(addr(DEV2), 2500),),
        metrics=(Metric.of("accuracy", 973_100), Metric.of("loss_delta", -1_500_000)),
    )
    raw = chain.tx(DEV, body)
    built = chain.run(raw)
    record = get_model(chain.view(), model_id(a.root))
    spec = parse_spec(SPEC)
    assert record == ModelRecord(
        id=model_id(a.root),
        root=a.root,
        header=a.header,
        spec=SPEC,
        signature=Hash32(spec_signature(spec)),
        owner=addr(DEV),
        name="digits-mlp",
        description="a test model",
        license="MIT",
        price=Amount(0),
        royalties=(RoyaltyShare(addr(DEV2), 2500),),
        base=None,
        parents=(),
        recipe=None,
        datasets=(),
        metrics=(Metric("accuracy", False, 973_100), Metric("loss_delta", True, 1_500_000)),
        depth=0,
        height=2,
        family="mlp",
        parameters=23,
        data_size=23 * 4,
        salt=None,
        key_check=None,
        plain_data_hash=None,
    )
    assert record.metrics[1].value == -1_500_000 and parameter_count(spec) == 23
    assert get_model_by_root(chain.view(), a.root) == record
    # The signature index holds it; no lineage edge for a root model.
    assert chain.state[signature_key(record.signature, record.id)] == b""
    assert not any(k.startswith(NS_MODEL_CHILD) for k in chain.state)
    receipt = built.result.receipts[0]
    assert [e.name for e in receipt.events] == ["model_register", "fee"]
    # Records created: the model and its signature entry.
    assert receipt.burned == compute_cost(
        chain.params, EconomyKind.MODEL_REGISTER, len(raw), new_accounts=2
    )


def test_merged_model_records_its_lineage_and_pays_per_edge(chain: EconomyChain) -> None:
    a, b, c = (model_artifact(seed=s) for s in (1, 2, 3))
    data = rows_dataset(6)
    chain.run(chain.tx(SUPPLIER, register_body(data)))
    base = register(chain, DEV, model_body(a))
    tuned = register(chain, DEV2, model_body(b, base=base.id, datasets=(data.id,)))
    assert tuned.depth == 1 and tuned.base == base.id and tuned.datasets == (data.id,)
    recipe = MergeRecipe.create(
        "ties",
        (base.id, tuned.id),
        base=base.id,
        coefficients=(0.5, 0.5),
        params={"density": 0.2},
        datasets=(data.id,),
    )
    body = merged(c, (base.id, tuned.id), base=base.id, recipe=recipe)
    raw = chain.tx(DEV, body)
    built = chain.run(raw)
    child = get_model(chain.view(), model_id(c.root))
    assert child is not None and child.depth == 2 and child.recipe == recipe
    # The base is also a parent: one edge with both relations.
    view = chain.view()
    assert get_relation(view, base.id, child.id) == Relation.PARENT | Relation.BASE
    assert get_relation(view, tuned.id, child.id) == Relation.PARENT
    assert get_relation(view, base.id, tuned.id) == Relation.BASE
    assert child.ancestors == (
        (base.id, Relation.PARENT | Relation.BASE),
        (tuned.id, Relation.PARENT),
    )
    assert parse_edge_key(edge_key(base.id, child.id)) == (base.id, child.id)
    # Records created: the model, its signature entry, two edges.
    assert built.result.receipts[0].burned == compute_cost(
        chain.params, EconomyKind.MODEL_REGISTER, len(raw), new_accounts=4
    )
    same_sig = sorted(k for k in chain.state if k.startswith(signature_prefix(base.signature)))
    assert len(same_sig) == 3


def test_priced_model_is_verified_encrypted(chain: EconomyChain) -> None:
    p = priced_model()
    record = register(chain, DEV, model_body(p, price=Amount(700)))
    assert record.is_priced and record.is_encrypted and record.salt == p.salt
    assert record.key_check == p.key_check and record.plain_data_hash == p.plain_hash
    # The same ciphertext file registered as free: its size is not the plaintext's.
    other = EconomyChain(models_genesis())
    other.register_roles((DEV, Role.MODEL_DEVELOPER))
    other.reject(other.tx(DEV, model_body(p)), ModelSizeMismatch)


def test_economy_params_carry_the_model_caps() -> None:
    c = EconomyChain(models_genesis(max_merge_parents=3, max_step_parameters=500))
    params = economy_params(c.view())
    assert (params.max_merge_parents, params.max_step_parameters) == (3, 500)
    assert EconomyParams.decode(params.encode()) == params


# --- rejections -----------------------------------------------------------------------------------


def _blocks_of(data: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    builder = UnixfsBuilder()
    blocks = {bytes(b.cid): b.data for b in builder.feed(data)}
    root, rest = builder.finish_blocks()
    blocks.update({bytes(b.cid): b.data for b in rest})
    return bytes(root), blocks


def test_a_pickle_or_other_non_safetensors_artifact_is_refused(chain: EconomyChain) -> None:
    payload = pickle.dumps({"layers.0.weight": [0.0] * 12})
    pickle_root, _ = _blocks_of(payload)
    a = model_artifact()
    # The pickle offered as the header.
    bad = model_body(a, root=pickle_root, proof=ArtifactProof(payload, ()))
    err = chain.reject(chain.tx(DEV, bad), NotSafetensorsModel)
    assert "format_code" in err.data  # type: ignore[operator]
    # A valid safetensors header, but the root is the pickle file's.
    chain.reject(
        chain.tx(DEV, model_body(a, root=pickle_root, proof=ArtifactProof(a.header, ()))),
        ModelHeaderMismatch,
    )
    # A big non-v1 file (a pickle padded past one chunk) under a dag-pb root.
    big_root, _ = _blocks_of(payload * ((2 << 20) // len(payload) + 1))
    chain.reject(chain.tx(DEV, model_body(a, root=big_root)), ModelPathMismatch)


def test_header_path_and_size_that_do_not_match_the_root(chain: EconomyChain) -> None:
    a, b = model_artifact(seed=1), model_artifact(WIDE, seed=2)
    # Another header of the same size class (a's tensors plus metadata) with a's root and path:
    # the leaf 0 it rebuilds is not a's.
    other = encode_header(spec_header(parse_spec(SPEC)).tensors, {"format": "pt"})
    chain.reject(
        chain.tx(DEV, model_body(a, proof=ArtifactProof(other, a.proof.path))),
        ModelHeaderMismatch,
    )
    # a's header with b's path: the path does not hash to a's root.
    chain.reject(
        chain.tx(DEV, model_body(a, proof=ArtifactProof(a.header, b.proof.path))),
        ModelPathMismatch,
    )
    # A truncated upload: the file under the root is shorter than the header implies.
    header = spec_header(parse_spec(SPEC))
    short = build_artifact(encode_header(header.tensors, None), bytes(header.data_size - 4))
    chain.reject(chain.tx(DEV, model_body(short)), ModelSizeMismatch)


def test_spec_not_in_the_registry_not_canonical_or_not_matching(chain: EconomyChain) -> None:
    a = model_artifact()
    resnet = b'{"depth":50,"family":"resnet"}'
    chain.reject(chain.tx(DEV, model_body(a, resnet)), UnknownModelFamily)
    spaced = SPEC.replace(b",", b", ")
    err = chain.reject(chain.tx(DEV, model_body(a, spaced)), InvalidModelSpec)
    assert "canonical" in err.message
    chain.reject(chain.tx(DEV, model_body(a, b"{not json")), InvalidModelSpec)
    bad_width = b'{"family":"mlp","hidden":[0],"input_dim":4,"num_classes":2}'
    chain.reject(chain.tx(DEV, model_body(a, bad_width)), InvalidModelSpec)
    # The header holds the 4-3-2 tensors; the spec says 4-5-2 (and F16 for another one).
    err = chain.reject(chain.tx(DEV, model_body(a, WIDE)), ModelSpecMismatch)
    assert "head.weight" in err.message
    chain.reject(chain.tx(DEV, model_body(a, mlp(dtype="F16"))), ModelSpecMismatch)


def test_unknown_parent_base_and_datasets(chain: EconomyChain) -> None:
    a, b = model_artifact(seed=1), model_artifact(seed=2)
    known = register(chain, DEV, model_body(a))
    ghost = Hash32(b"\x42" * 32)
    chain.reject(chain.tx(DEV, merged(b, (known.id, ghost))), UnknownParent)
    chain.reject(chain.tx(DEV, model_body(b, base=ghost)), UnknownBase)
    chain.reject(chain.tx(DEV, model_body(b, datasets=(ghost,))), UnknownTrainingDataset)
    # A dataset id is not a model id, and a model id is not a dataset id.
    data = rows_dataset(4)
    chain.run(chain.tx(SUPPLIER, register_body(data)))
    chain.reject(chain.tx(DEV, model_body(b, base=data.id)), UnknownBase)
    chain.reject(chain.tx(DEV, model_body(b, datasets=(known.id,))), UnknownTrainingDataset)
    # The recipe's datasets must exist too.
    two = register(chain, DEV2, model_body(model_artifact(seed=3)))
    recipe = linear(known.id, two.id, datasets=(ghost,))
    chain.reject(
        chain.tx(DEV, merged(b, (known.id, two.id), recipe=recipe)), UnknownTrainingDataset
    )


def test_too_many_parents_and_the_parameter_cap() -> None:
    c = EconomyChain(models_genesis(max_merge_parents=2, max_step_parameters=30))
    c.register_roles((DEV, Role.MODEL_DEVELOPER))
    ids = [register(c, DEV, model_body(model_artifact(seed=s))).id for s in (1, 2, 3)]
    child = model_artifact(seed=4)
    err = c.reject(c.tx(DEV, merged(child, ids)), TooManyMergeParents)
    assert "max_merge_parents = 2" in err.message
    register(c, DEV, merged(child, ids[:2]))  # two are fine
    # 4 -> 5 -> 2 has 37 parameters, above the cap of 30 (also without parents).
    c.reject(c.tx(DEV, model_body(model_artifact(WIDE, seed=5), WIDE)), StepParameterCapExceeded)


def test_recipe_rules_and_method_fit(chain: EconomyChain) -> None:
    a, b, w = model_artifact(seed=1), model_artifact(seed=2), model_artifact(WIDE, seed=3)
    pa = register(chain, DEV, model_body(a)).id
    pb = register(chain, DEV, model_body(b)).id
    pw = register(chain, DEV, model_body(w, WIDE)).id
    child = model_artifact(seed=4)
    # SLERP takes exactly two parents with a `t`; TIES needs the recipe to name a base.
    slerp = MergeRecipe.create("slerp", (pa, pb))
    err = chain.reject(chain.tx(DEV, merged(child, (pa, pb), recipe=slerp)), InvalidMergeRecipe)
    assert err.data == {"merge_code": 3016}
    ties = MergeRecipe.create("ties", (pa, pb), coefficients=(1, 1), params={"density": 0.5})
    chain.reject(chain.tx(DEV, merged(child, (pa, pb), recipe=ties)), InvalidMergeRecipe)
    # An elementwise merge keeps the layout: a parent of another signature does not fit.
    chain.reject(chain.tx(DEV, merged(child, (pa, pw))), IncompatibleLineage)
    # A data-based merge names the child's spec: it must be this model's.
    zipit = MergeRecipe.create("zipit", (pa, pw), child_spec=WIDE, class_maps=((0, 1), (2, 3)))
    chain.reject(chain.tx(DEV, merged(child, (pa, pw), recipe=zipit)), IncompatibleLineage)
    zipit = MergeRecipe.create("zipit", (pa, pw), child_spec=SPEC, class_maps=((0, 1), (0, 1)))
    record = register(chain, DEV, merged(child, (pa, pw), recipe=zipit))
    assert record.recipe == zipit and record.depth == 1
    # Weight matching over MLPs (alignable) is accepted.
    wm = MergeRecipe.create("weight_matching", (pa, pb), coefficients=(1, 1))
    register(chain, DEV, merged(model_artifact(seed=6), (pa, pb), recipe=wm))


def test_weight_matching_refuses_a_transformer(chain: EconomyChain) -> None:
    tf = spec_json(
        parse_spec(
            {
                "family": "transformer",
                "vocab_size": 4,
                "max_len": 2,
                "d_model": 2,
                "n_heads": 1,
                "n_layers": 1,
                "d_ff": 2,
                "num_classes": 2,
            }
        )
    )
    x = register(chain, DEV, model_body(model_artifact(tf, seed=1), tf)).id
    y = register(chain, DEV, model_body(model_artifact(tf, seed=2), tf)).id
    wm = MergeRecipe.create("weight_matching", (x, y), coefficients=(1, 1))
    err = chain.reject(
        chain.tx(DEV, merged(model_artifact(tf, seed=3), (x, y), tf, recipe=wm)),
        IncompatibleLineage,
    )
    assert "transformer" in err.message
    register(chain, DEV, merged(model_artifact(tf, seed=3), (x, y), tf))  # linear is fine


def test_duplicate_root_and_missing_role(chain: EconomyChain) -> None:
    a = model_artifact()
    register(chain, DEV, model_body(a))
    chain.reject(chain.tx(DEV2, model_body(a, name="again")), ModelExists)
    err = chain.reject(chain.tx(NOBODY, model_body(model_artifact(seed=8))), MissingRole)
    assert "model_developer" in err.message.lower()
    # A data supplier is not a model developer.
    chain.reject(chain.tx(SUPPLIER, model_body(model_artifact(seed=8))), MissingRole)


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        ({"root": b"\x01\x55garbage"}, InvalidRootCid),
        ({"name": "  "}, EmptyModelName),
        ({"price": Amount(5)}, ModelPriceTermsMismatch),
        ({"salt": b"\x01" * 7}, ModelPriceTermsMismatch),
        ({"royalties": (RoyaltyShare(addr(1), 6000), RoyaltyShare(addr(2), 4001))}, BadRoyalties),
        ({"royalties": (RoyaltyShare(addr(1), 10), RoyaltyShare(addr(1), 10))}, BadRoyalties),
        ({"royalties": (RoyaltyShare(addr(1), 0),)}, BadRoyalties),
        ({"metrics": (Metric.of("x" * 33, 1),)}, BadMetrics),
        ({"metrics": (Metric.of("acc", 1), Metric.of("acc", 2))}, BadMetrics),
        ({"metrics": (Metric("acc", True, 0),)}, BadMetrics),
        ({"metrics": (Metric.of(" ", 1),)}, BadMetrics),
        ({"metrics": (Metric.of("a\nb", 1),)}, BadMetrics),
        ({"metrics": (Metric("acc", False, 1 << 63),)}, BadMetrics),
        ({"parents": (Hash32(b"\x01" * 32),)}, BadLineage),  # parents without a recipe
        ({"recipe": linear(b"\x01" * 32)}, BadLineage),  # a recipe without parents
        (
            {"parents": (Hash32(b"\x01" * 32),) * 2, "recipe": linear(b"\x01" * 32, b"\x02" * 32)},
            BadLineage,
        ),
        (
            {"parents": (Hash32(b"\x01" * 32), Hash32(b"\x02" * 32))}
            | {"recipe": linear(b"\x02" * 32, b"\x01" * 32)},
            BadLineage,
        ),
        (
            {"parents": (Hash32(b"\x01" * 32),), "base": Hash32(b"\x03" * 32)}
            | {"recipe": linear(b"\x01" * 32)},
            BadLineage,
        ),
        ({"datasets": (Hash32(b"\x04" * 32),) * 2}, BadLineage),
    ],
)
def test_stateless_rules(edit: dict[str, Any], error: type[InvalidTransaction]) -> None:
    body = dataclasses.replace(model_body(model_artifact()), **edit)
    with pytest.raises(error):
        verify_transaction(tx(DEV, body, nonce=0))


def test_extreme_metrics_and_full_royalties_are_accepted(chain: EconomyChain) -> None:
    body = model_body(
        model_artifact(),
        metrics=(Metric("min", True, 1 << 63), Metric("max", False, (1 << 63) - 1)),
        royalties=tuple(RoyaltyShare(addr(i), 625) for i in range(16)),
    )
    record = register(chain, DEV, body)
    assert record.metrics[0].value == -(1 << 63) and sum(r.bps for r in record.royalties) == 10_000


# --- the inverted tree through committed blocks, with proofs --------------------------------------


class Tree:
    """A, B → C (linear); C, D → E (linear); E → F (fine-tune, base E). Registered through a
    ``ChainService`` (real state tree, proofs from its read view)."""

    def __init__(self) -> None:
        self.chain: ChainService = open_chain(MemoryKV(), models_genesis())
        self._nonces: dict[int, int] = {}
        self.data = rows_dataset(5, seed=4)
        self.commit(
            (DEV, _role(Role.MODEL_DEVELOPER)),
            (DEV2, _role(Role.MODEL_DEVELOPER)),
            (SUPPLIER, _role(Role.DATA_SUPPLIER)),
        )
        self.commit((SUPPLIER, register_body(self.data)))
        arts = {name: model_artifact(seed=i + 1) for i, name in enumerate("ABCDEF")}
        self.ids = {name: model_id(a.root) for name, a in arts.items()}
        i = self.ids
        self.commit((DEV, model_body(arts["A"], name="A")), (DEV2, model_body(arts["B"], name="B")))
        self.commit(
            (DEV, merged(arts["C"], (i["A"], i["B"]), name="C", datasets=(self.data.id,))),
            (DEV2, model_body(arts["D"], name="D")),
        )
        self.commit((DEV2, merged(arts["E"], (i["C"], i["D"]), name="E")))
        self.commit((DEV, model_body(arts["F"], name="F", base=i["E"])))

    def commit(self, *items: tuple[int, Record]) -> None:
        vtxs = []
        for who, body in items:
            nonce = self._nonces.get(who, 0)
            self._nonces[who] = nonce + 1
            vtxs.append(verify_transaction(tx(who, body, nonce=nonce)))
        block, result = commit_next(self.chain, candidates=vtxs)
        assert len(block.txs) == len(vtxs), [r.status for r in result.receipts]

    def get(self, key: bytes) -> bytes | None:
        return self.chain.read_view().get_state(key)

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        return self.chain.read_view().iter_state(prefix)

    def name(self, id_: bytes) -> str:
        return next(n for n, i in self.ids.items() if i == id_)


def _role(role: Role) -> Record:
    return RoleRegister(int(role))


@pytest.fixture(scope="module")
def tree() -> Tree:
    return Tree()


def test_tree_depths(tree: Tree) -> None:
    depths = {n: get_model(tree, i).depth for n, i in tree.ids.items()}  # type: ignore[union-attr]
    assert depths == {"A": 0, "B": 0, "C": 1, "D": 0, "E": 2, "F": 3}


def test_ancestors_follow_the_records(tree: Tree) -> None:
    walk = ancestors(tree, tree.ids["F"], max_depth=16)
    got = [(tree.name(e.ancestor), tree.name(e.child), e.relation, e.distance) for e in walk.edges]
    assert got == [
        ("E", "F", Relation.BASE, 1),
        ("C", "E", Relation.PARENT, 2),
        ("D", "E", Relation.PARENT, 2),
        ("A", "C", Relation.PARENT, 3),
        ("B", "C", Relation.PARENT, 3),
    ]
    assert not walk.truncated
    assert {tree.name(m) for m in walk.models} == set("ABCDEF")
    near = ancestors(tree, tree.ids["F"], max_depth=2)
    assert [(tree.name(e.ancestor), e.distance) for e in near.edges] == [
        ("E", 1),
        ("C", 2),
        ("D", 2),
    ]
    cut = ancestors(tree, tree.ids["F"], max_depth=16, max_edges=2)
    assert cut.truncated and len(cut.edges) == 2
    assert ancestors(tree, tree.ids["A"], max_depth=16).edges == ()
    with pytest.raises(UnknownModel):
        ancestors(tree, b"\x00" * 32, max_depth=1)


def test_descendants_are_prefix_scans(tree: Tree) -> None:
    walk = descendants(tree.scan, tree.ids["A"], max_depth=16)
    got = [(tree.name(e.ancestor), tree.name(e.child), e.relation, e.distance) for e in walk.edges]
    assert got == [
        ("A", "C", Relation.PARENT, 1),
        ("C", "E", Relation.PARENT, 2),
        ("E", "F", Relation.BASE, 3),
    ]
    d = descendants(tree.scan, tree.ids["D"], max_depth=1)
    assert [(tree.name(e.child), e.distance) for e in d.edges] == [("E", 1)]
    assert descendants(tree.scan, tree.ids["F"], max_depth=16).edges == ()
    # The children of C are exactly the keys under its prefix.
    under = [k for k, _ in tree.scan(children_prefix(tree.ids["C"]))]
    assert under == [edge_key(tree.ids["C"], tree.ids["E"])]


def test_every_edge_is_proven_against_the_state_root(tree: Tree) -> None:
    view = tree.chain.read_view()
    assert view.head is not None
    height, root = int(view.head.height), view.head.state_root
    walks = (
        ancestors(tree, tree.ids["F"], max_depth=16),
        descendants(tree.scan, tree.ids["A"], max_depth=16),
        descendants(tree.scan, tree.ids["B"], max_depth=16),
    )
    edges = {replace(e, distance=0) for w in walks for e in w.edges}
    assert len(edges) == 5  # A→C, B→C, C→E, D→E, E→F
    for e in edges:
        proof = view.get_proof(e.key, height)
        assert proof.state_root == root and proof.value == bytes([e.relation])
        lightclient.verify_inclusion(root, e.key, bytes([e.relation]), proof.proof)
        with pytest.raises(lightclient.ProofError):  # a forged relation fails
            lightclient.verify_inclusion(root, e.key, bytes([e.relation ^ 3]), proof.proof)
    # An edge that does not exist (A is no parent of E) has a non-inclusion proof.
    absent = edge_key(tree.ids["A"], tree.ids["E"])
    proof = view.get_proof(absent, height)
    assert proof.value is None
    lightclient.verify_non_inclusion(root, absent, proof.proof)
    # The records themselves are provable: F's record names E as its base.
    rec = view.get_proof(model_key(tree.ids["F"]), height)
    assert rec.value is not None
    lightclient.verify_inclusion(root, rec.key, rec.value, rec.proof)
    assert ModelRecord.decode(rec.value).base == tree.ids["E"]


def test_records_round_trip() -> None:
    body = model_body(
        model_artifact(),
        metrics=(Metric.of("acc", -3),),
        royalties=(RoyaltyShare(addr(1), 1),),
        parents=(Hash32(b"\x01" * 32), Hash32(b"\x02" * 32)),
        recipe=linear(b"\x01" * 32, b"\x02" * 32),
    )
    assert ModelRegister.decode(body.encode()) == body
    assert body.metrics[0].value == -3
    # The id is tagged: a model and a dataset of the same root have different ids.
    assert model_id(body.root) != dataset_id(body.root)
