"""The model registry on chain, with verifiable lineage (DESIGN §8 "Model"; issue 6 item 2).

``ModelRegister`` (by a MODEL_DEVELOPER) carries a format-v1 safetensors artifact — its root CID
and an ``ArtifactProof`` (the unpadded header and the dag-pb path to leaf 0), checked exactly
like a dataset's (``format_v1.verify_registration``; encrypted iff ``price > 0``) — plus the
declarative architecture spec (canonical JSON of ``node.models.specs``), the metadata (name,
description, license, price, royalty shares), and the lineage: ``base`` (the model a fine-tune
was tuned from), ``parents`` with the ``MergeRecipe`` that made it, the training datasets and
the declared metrics.

The transition checks what the transaction carries, nothing else: the header proves leaf 0 of
the root, parses, and holds exactly the tensors the spec implies (so the recorded signature,
``model_signature(header)``, is the spec's); the spec is of a family in the registry; the
parameter count is within ``max_step_parameters``; parents (at most ``max_merge_parents``,
distinct), base and datasets exist; the recipe is valid and names the same parents and base, and
its method fits them (elementwise and weight-matching children keep their parents' signature,
data-based ones have the recipe's child spec). Availability of the blocks is checked at mempool
admission by the node, never here.

State (one record per model, and the lineage as keys, so every edge has a state proof):

* ``NS_MODEL + id`` → ``ModelRecord``, ``id = model_id(root) = sha256(b"NeuroSeed/model/v1" ‖
  root)`` (one artifact is registered at most once);
* ``NS_MODEL_CHILD + ancestor id + child id`` → one byte, the ``Relation`` bits (PARENT: a merge
  parent, BASE: the base of a fine-tune or of a same-base merge): descendants are a prefix scan of
  ``children_prefix(id)``; ancestors follow the records (``parents``, ``base``);
* ``NS_MODEL_SIG + signature + id`` → ``b""``: the models of one signature are a prefix scan.

Error codes 3050–3079.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import IntFlag
from typing import TYPE_CHECKING

from node import crypto
from node.consensus.receipts import Attribute, Event
from node.consensus.state import Overlay, StateView
from node.economy.api import (
    MAX_MERGE_PARENTS_HARD,
    NS_MODEL,
    NS_MODEL_CHILD,
    NS_MODEL_SIG,
    EconomyError,
    EconomyKind,
    KindHandler,
    Role,
    charge,
    economy_params,
    u64,
    u256,
)
from node.economy.datasets import SALT_BYTES, check_root_cid, get_dataset
from node.economy.roles import require_role
from node.encoding import Record, limit
from node.errors import DecodeError, InvalidBody, NeuroSeedError
from node.merge.recipe import (
    DATA_METHODS,
    ELEMENTWISE_METHODS,
    SAME_BASE_METHODS,
    MergeError,
    MergeRecipe,
    validate_recipe,
)
from node.models.safetensors_header import MAX_HEADER_BYTES, ArtifactFormatError
from node.models.signature import model_signature
from node.models.specs import (
    ModelSpec,
    SpecError,
    UnknownFamily,
    check_header,
    is_alignable,
    parameter_count,
    parse_spec,
    spec_json,
)
from node.storage.format_v1 import (
    ArtifactProof,
    ArtifactProofError,
    FileSizeMismatch,
    HeaderMismatch,
    verify_registration,
)
from node.storage.unixfs import parse_cid
from node.types import Address, Amount, Hash32

if TYPE_CHECKING:
    from node.consensus.transition import BlockContext
    from node.consensus.txs import VerifiedTransaction

MODEL_ID_TAG = b"NeuroSeed/model/v1"
MAX_CID_BYTES = 64
MAX_NAME = 128  # UTF-8 bytes, also the license
MAX_DESCRIPTION = 4096
MAX_SPEC_BYTES = 16 << 10  # the record's cap; parse_spec accepts at most specs.MAX_SPEC_BYTES
MAX_ROYALTIES = 16
BASIS_POINTS = 10_000  # 100 %
MAX_METRICS = 16
MAX_METRIC_NAME = 32  # characters
MAX_METRIC_NAME_BYTES = 4 * MAX_METRIC_NAME
MAX_METRIC_MAGNITUDE = 1 << 63  # a signed 64-bit value in millionths
MAX_TRAINING_DATASETS = 32
MAX_PARENTS_ENCODED = MAX_MERGE_PARENTS_HARD  # the chain's max_merge_parents is at most this
SIGNATURE_BYTES = 32
MAX_LINEAGE_EDGES = 1024  # one lineage walk answers at most this many edges


# --- errors (3050–3079) --------------------------------------------------------------------------


class ModelError(EconomyError):
    """A model registration the chain refuses (the reason is in the message)."""

    code = 3050
    reason = "invalid model registration"


class ModelExists(ModelError):
    code = 3051
    reason = "a model with this root is already registered"


class UnknownModel(ModelError):
    code = 3052
    reason = "unknown model"


class NotSafetensorsModel(ModelError):
    """The registration's header is not a safetensors header (a pickle, random bytes, ...)."""

    code = 3053
    reason = "the header is not a valid safetensors header"


class ModelHeaderMismatch(ModelError):
    code = 3054
    reason = "the header is not leaf 0 of the root CID"


class ModelPathMismatch(ModelError):
    code = 3055
    reason = "the proof path does not lead from the root CID to leaf 0"


class ModelSizeMismatch(ModelError):
    code = 3056
    reason = "the file size under the root CID does not match the header"


class InvalidModelSpec(ModelError):
    """A spec that is not canonical JSON of a family with valid sizes."""

    code = 3057
    reason = "invalid model spec"


class UnknownModelFamily(InvalidModelSpec):
    code = 3058
    reason = "the spec's family is not in the registry"


class ModelSpecMismatch(ModelError):
    """The header's tensors are not exactly those the spec implies."""

    code = 3059
    reason = "the model file does not match its spec"


class UnknownParent(UnknownModel):
    code = 3060
    reason = "a parent is not a registered model"


class UnknownBase(UnknownModel):
    code = 3061
    reason = "the base is not a registered model"


class UnknownTrainingDataset(ModelError):
    code = 3062
    reason = "a dataset is not registered"


class TooManyMergeParents(ModelError):
    code = 3063
    reason = "more parents than max_merge_parents"


class StepParameterCapExceeded(ModelError):
    code = 3064
    reason = "the model exceeds max_step_parameters"


class BadRoyalties(InvalidBody):
    code = 3065
    reason = "invalid royalty shares"


class BadMetrics(InvalidBody):
    code = 3066
    reason = "invalid declared metrics"


class ModelPriceTermsMismatch(InvalidBody):
    """A priced model lacks salt / key check / plaintext hash, or a free one carries them."""

    code = 3067
    reason = "salt, key check and plaintext hash go with a price, and only with one"


class EmptyModelName(InvalidBody):
    code = 3068
    reason = "a model needs a name"


class BadLineage(InvalidBody):
    """Parents, base, recipe or datasets that contradict each other or repeat."""

    code = 3069
    reason = "inconsistent lineage"


class InvalidMergeRecipe(ModelError):
    """The recipe breaks a rule of ``node.merge.recipe.validate_recipe`` (``data.merge_code``)."""

    code = 3070
    reason = "invalid merge recipe"


class IncompatibleLineage(ModelError):
    """The recipe's method does not fit the parents, base and child it names."""

    code = 3071
    reason = "the merge method does not fit the parents and the child"


# --- records -------------------------------------------------------------------------------------


class Relation(IntFlag):
    """How an ancestor relates to a child (the value byte of a lineage edge)."""

    PARENT = 1  # a merge parent
    BASE = 2  # the base of a fine-tune, or of a same-base merge


@dataclass(frozen=True, slots=True)
class RoyaltyShare(Record):
    """``bps`` basis points (1/100 %) of what the model earns go to ``address``."""

    address: Address
    bps: int


@dataclass(frozen=True, slots=True)
class Metric(Record):
    """A declared metric, a signed value in millionths (``accuracy`` 0.9731 → 973_100); the
    encoding has unsigned integers only, so the sign is a flag (never set on zero)."""

    name: str = field(metadata=limit(MAX_METRIC_NAME_BYTES))
    negative: bool
    millionths: int  # magnitude

    @property
    def value(self) -> int:
        """The signed value in millionths."""
        return -self.millionths if self.negative else self.millionths

    @classmethod
    def of(cls, name: str, millionths: int) -> Metric:
        return cls(name, millionths < 0, abs(millionths))


@dataclass(frozen=True, slots=True)
class ModelRegister(Record):
    root: bytes = field(metadata=limit(MAX_CID_BYTES))
    proof: ArtifactProof
    spec: bytes = field(metadata=limit(MAX_SPEC_BYTES))  # canonical JSON (specs.spec_json)
    name: str = field(metadata=limit(MAX_NAME))
    description: str = field(metadata=limit(MAX_DESCRIPTION))
    license: str = field(metadata=limit(MAX_NAME))
    price: Amount
    royalties: tuple[RoyaltyShare, ...] = field(default=(), metadata=limit(MAX_ROYALTIES))
    base: Hash32 | None = None
    parents: tuple[Hash32, ...] = field(default=(), metadata=limit(MAX_PARENTS_ENCODED))
    recipe: MergeRecipe | None = None  # with parents, and only with them
    datasets: tuple[Hash32, ...] = field(default=(), metadata=limit(MAX_TRAINING_DATASETS))
    metrics: tuple[Metric, ...] = field(default=(), metadata=limit(MAX_METRICS))
    salt: bytes | None = field(default=None, metadata=limit(SALT_BYTES))
    key_check: Hash32 | None = None
    plain_data_hash: Hash32 | None = None


@dataclass(frozen=True, slots=True)
class ModelRecord(Record):
    """A registered model."""

    id: Hash32
    root: bytes = field(metadata=limit(MAX_CID_BYTES))
    header: bytes = field(metadata=limit(MAX_HEADER_BYTES))  # unpadded
    spec: bytes = field(metadata=limit(MAX_SPEC_BYTES))  # canonical JSON
    signature: Hash32  # model_signature(header)
    owner: Address
    name: str = field(metadata=limit(MAX_NAME))
    description: str = field(metadata=limit(MAX_DESCRIPTION))
    license: str = field(metadata=limit(MAX_NAME))
    price: Amount
    royalties: tuple[RoyaltyShare, ...] = field(metadata=limit(MAX_ROYALTIES))
    base: Hash32 | None
    parents: tuple[Hash32, ...] = field(metadata=limit(MAX_PARENTS_ENCODED))
    recipe: MergeRecipe | None
    datasets: tuple[Hash32, ...] = field(metadata=limit(MAX_TRAINING_DATASETS))
    metrics: tuple[Metric, ...] = field(metadata=limit(MAX_METRICS))
    depth: int  # 0 without parents or base, else 1 + the deepest of them
    height: int  # registered at
    family: str = field(metadata=limit(32))
    parameters: int  # parameter_count(spec)
    data_size: int  # plaintext bytes of the tensor data (after leaf 0)
    salt: bytes | None = field(metadata=limit(SALT_BYTES))
    key_check: Hash32 | None
    plain_data_hash: Hash32 | None

    @property
    def is_priced(self) -> bool:
        return self.price > 0

    @property
    def is_encrypted(self) -> bool:
        return self.salt is not None

    @property
    def ancestors(self) -> tuple[tuple[Hash32, Relation], ...]:
        """Direct ancestors with their relation: parents in order, then the base (merged into a
        parent's entry if the base is also a parent)."""
        return direct_ancestors(self.parents, self.base)


# --- keys and reads ------------------------------------------------------------------------------


def model_id(root: bytes) -> Hash32:
    return crypto.sha256(MODEL_ID_TAG + bytes(root))


def model_key(id_: bytes) -> bytes:
    return NS_MODEL + bytes(id_)


def edge_key(ancestor: bytes, child: bytes) -> bytes:
    """The lineage edge ``ancestor → child`` (value: one ``Relation`` byte)."""
    return NS_MODEL_CHILD + bytes(ancestor) + bytes(child)


def children_prefix(id_: bytes) -> bytes:
    """Prefix of every edge from ``id_`` to a child (a prefix scan lists its children)."""
    return NS_MODEL_CHILD + bytes(id_)


def parse_edge_key(key: bytes) -> tuple[Hash32, Hash32]:
    """(ancestor, child) of an edge key."""
    if not key.startswith(NS_MODEL_CHILD) or len(key) != len(NS_MODEL_CHILD) + 64:
        raise ValueError("not a lineage edge key")
    body = key[len(NS_MODEL_CHILD) :]
    return Hash32(body[:32]), Hash32(body[32:])


def signature_prefix(signature: bytes) -> bytes:
    """Prefix of the index entries of every model with ``signature``."""
    return NS_MODEL_SIG + bytes(signature)


def signature_key(signature: bytes, id_: bytes) -> bytes:
    return NS_MODEL_SIG + bytes(signature) + bytes(id_)


def get_model(view: StateView, id_: bytes) -> ModelRecord | None:
    raw = view.get(model_key(id_))
    return None if raw is None else ModelRecord.decode(raw)


def get_model_by_root(view: StateView, root: bytes) -> ModelRecord | None:
    return get_model(view, model_id(root))


def require_model(view: StateView, id_: bytes) -> ModelRecord:
    record = get_model(view, id_)
    if record is None:
        raise UnknownModel(f"no model 0x{bytes(id_).hex()}")
    return record


def get_relation(view: StateView, ancestor: bytes, child: bytes) -> Relation | None:
    raw = view.get(edge_key(ancestor, child))
    return None if raw is None else Relation(raw[0])


def direct_ancestors(
    parents: Iterable[Hash32], base: Hash32 | None
) -> tuple[tuple[Hash32, Relation], ...]:
    out: dict[Hash32, Relation] = {}
    for p in parents:
        out[p] = out.get(p, Relation(0)) | Relation.PARENT
    if base is not None:
        out[base] = out.get(base, Relation(0)) | Relation.BASE
    return tuple(out.items())


# --- lineage walks -------------------------------------------------------------------------------

PrefixScan = Callable[[bytes], Iterable[tuple[bytes, bytes]]]
"""``prefix -> (key, value)`` in key order: ``ChainReadView.iter_state`` (latest state)."""


@dataclass(frozen=True, slots=True)
class Edge:
    """One lineage edge found by a walk: ``ancestor → child``, ``distance`` edges away from the
    model the walk started at (1 = adjacent)."""

    ancestor: Hash32
    child: Hash32
    relation: Relation
    distance: int

    @property
    def key(self) -> bytes:
        """The state key proving the edge (``edge_key``)."""
        return edge_key(self.ancestor, self.child)


@dataclass(frozen=True, slots=True)
class LineageWalk:
    """The edges of a breadth-first walk, in visiting order; ``truncated`` if the edge cap cut it
    short (``max_depth`` is not a truncation)."""

    edges: tuple[Edge, ...]
    truncated: bool

    @property
    def models(self) -> tuple[Hash32, ...]:
        """Every model the walk reached (without the start), in first-seen order."""
        seen: dict[Hash32, None] = {}
        for e in self.edges:
            for m in (e.ancestor, e.child):
                seen.setdefault(m, None)
        return tuple(seen)


def ancestors(
    view: StateView, id_: bytes, *, max_depth: int, max_edges: int = MAX_LINEAGE_EDGES
) -> LineageWalk:
    """The ancestors of model ``id_`` up to ``max_depth`` edges away, following the records
    (``UnknownModel`` if ``id_`` is not registered)."""
    start = require_model(view, id_)
    edges: list[Edge] = []
    queue: deque[tuple[ModelRecord, int]] = deque([(start, 0)])
    expanded = {start.id}
    while queue:
        record, dist = queue.popleft()
        if dist >= max_depth:
            continue
        for ancestor, relation in record.ancestors:
            if len(edges) >= max_edges:
                return LineageWalk(tuple(edges), True)
            edges.append(Edge(ancestor, record.id, relation, dist + 1))
            if ancestor not in expanded:
                expanded.add(ancestor)
                queue.append((require_model(view, ancestor), dist + 1))
    return LineageWalk(tuple(edges), False)


def iter_children(scan: PrefixScan, id_: bytes) -> Iterator[tuple[Hash32, Relation]]:
    """The children of ``id_`` in id order, from the edge keys."""
    prefix = children_prefix(id_)
    for key, value in scan(prefix):
        if not key.startswith(prefix):
            break
        yield Hash32(key[len(prefix) :]), Relation(value[0])


def descendants(
    scan: PrefixScan, id_: bytes, *, max_depth: int, max_edges: int = MAX_LINEAGE_EDGES
) -> LineageWalk:
    """The descendants of model ``id_`` up to ``max_depth`` edges away, by prefix scans of the
    edge keys (no record is read)."""
    edges: list[Edge] = []
    queue: deque[tuple[Hash32, int]] = deque([(Hash32(bytes(id_)), 0)])
    expanded = {bytes(id_)}
    while queue:
        node, dist = queue.popleft()
        if dist >= max_depth:
            continue
        for child, relation in iter_children(scan, node):
            if len(edges) >= max_edges:
                return LineageWalk(tuple(edges), True)
            edges.append(Edge(node, child, relation, dist + 1))
            if child not in expanded:
                expanded.add(child)
                queue.append((child, dist + 1))
    return LineageWalk(tuple(edges), False)


# --- stateless checks ----------------------------------------------------------------------------


def _check_price_terms(body: ModelRegister) -> None:
    terms = (body.salt, body.key_check, body.plain_data_hash)
    if body.price > 0:
        if any(t is None for t in terms):
            raise ModelPriceTermsMismatch(
                "a priced model is encrypted: it must carry salt, key_check and plain_data_hash"
            )
        if body.salt is not None and len(body.salt) != SALT_BYTES:
            raise ModelPriceTermsMismatch(
                f"salt: expected {SALT_BYTES} bytes, got {len(body.salt)}"
            )
    elif any(t is not None for t in terms):
        raise ModelPriceTermsMismatch(
            "a free model is not encrypted: leave salt, key_check and plain_data_hash out"
        )


def check_royalties(royalties: tuple[RoyaltyShare, ...]) -> None:
    """Distinct addresses, each 1–10000 basis points, 10000 in all at most (``BadRoyalties``)."""
    seen: set[bytes] = set()
    total = 0
    for i, share in enumerate(royalties):
        if share.address in seen:
            raise BadRoyalties(f"royalties[{i}]: 0x{share.address.hex()} is listed twice")
        seen.add(share.address)
        if not 1 <= share.bps <= BASIS_POINTS:
            raise BadRoyalties(f"royalties[{i}]: {share.bps} basis points is not in [1, 10000]")
        total += share.bps
    if total > BASIS_POINTS:
        raise BadRoyalties(f"royalty shares sum to {total} basis points, above 10000 (100 %)")


def check_metrics(metrics: tuple[Metric, ...]) -> None:
    """Distinct non-blank names of at most 32 characters, values within a signed 64-bit range,
    no negative zero (``BadMetrics``)."""
    seen: set[str] = set()
    for i, m in enumerate(metrics):
        if not m.name.strip() or len(m.name) > MAX_METRIC_NAME:
            raise BadMetrics(f"metrics[{i}]: a name is 1 to {MAX_METRIC_NAME} characters")
        if not m.name.isprintable():
            raise BadMetrics(f"metrics[{i}]: the name has control characters")
        if m.name in seen:
            raise BadMetrics(f"metrics[{i}]: {m.name!r} is declared twice")
        seen.add(m.name)
        if m.negative and m.millionths == 0:
            raise BadMetrics(f"metrics[{i}]: zero has no sign")
        if m.millionths > MAX_METRIC_MAGNITUDE - (0 if m.negative else 1):
            raise BadMetrics(f"metrics[{i}]: the value is outside a signed 64-bit range")


def check_lineage_shape(body: ModelRegister) -> None:
    """Parents distinct, the recipe present exactly with parents and naming the same parents
    (in order) and base, datasets distinct (``BadLineage``)."""
    if len(set(body.parents)) != len(body.parents):
        raise BadLineage("a parent is listed twice")
    if len(set(body.datasets)) != len(body.datasets):
        raise BadLineage("a training dataset is listed twice")
    recipe = body.recipe
    if not body.parents:
        if recipe is not None:
            raise BadLineage("a recipe goes with parents: a model without parents has none")
        return
    if recipe is None:
        raise BadLineage("a merged model carries the recipe that made it from its parents")
    if tuple(recipe.parents) != tuple(bytes(p) for p in body.parents):
        raise BadLineage("the recipe's parents are not the listed parents (same order)")
    listed_base = None if body.base is None else bytes(body.base)
    if recipe.base != listed_base:
        raise BadLineage("the recipe's base is not the listed base")


def _check_register_body(body: object) -> None:
    assert isinstance(body, ModelRegister)  # the handler's body type
    check_root_cid(body.root)
    if not body.name.strip():
        raise EmptyModelName("name: a model needs a non-blank name")
    _check_price_terms(body)
    check_royalties(body.royalties)
    check_metrics(body.metrics)
    check_lineage_shape(body)


# --- stateful checks -----------------------------------------------------------------------------


def _format_error(exc: NeuroSeedError) -> ModelError:
    """The transaction error for a format / proof error of ``format_v1`` (reason kept)."""
    message = f"{exc.reason}: {exc.message}" if exc.message != exc.reason else exc.message
    data = {"format_code": exc.code}
    cls: type[ModelError]
    if isinstance(exc, HeaderMismatch):
        cls = ModelHeaderMismatch
    elif isinstance(exc, FileSizeMismatch):
        cls = ModelSizeMismatch
    elif isinstance(exc, ArtifactFormatError):
        cls = NotSafetensorsModel
    else:  # ArtifactProofError (path, layout), a malformed dag-pb node (DecodeError)
        cls = ModelPathMismatch
    return cls(message, data=data)


def parse_model_spec(spec: bytes) -> ModelSpec:
    """The spec a registration carries: canonical JSON of a known family, or the model error."""
    try:
        parsed = parse_spec(spec)
    except UnknownFamily as exc:
        raise UnknownModelFamily(exc.message, data={"spec_code": exc.code}) from exc
    except SpecError as exc:
        raise InvalidModelSpec(exc.message, data={"spec_code": exc.code}) from exc
    if spec_json(parsed) != bytes(spec):
        raise InvalidModelSpec(
            "the spec is not in canonical form (compact JSON, sorted keys, every field: "
            "node.models.specs.spec_json)"
        )
    return parsed


def verify_model_artifact(
    root: bytes, proof: ArtifactProof, spec: ModelSpec, *, encrypted: bool
) -> tuple[Hash32, int]:
    """Check that ``proof`` shows leaf 0 of the v1 file under ``root`` and that its header holds
    exactly the spec's tensors; returns (signature, data size)."""
    try:
        verified = verify_registration(root, proof, encrypted=encrypted)
    except (ArtifactFormatError, ArtifactProofError, DecodeError) as exc:
        raise _format_error(exc) from exc
    try:
        check_header(spec, verified.header)
    except SpecError as exc:
        raise ModelSpecMismatch(exc.message, data={"spec_code": exc.code}) from exc
    return Hash32(model_signature(verified.header)), verified.header.data_size


def _check_recipe(
    view: StateView,
    body: ModelRegister,
    spec: ModelSpec,
    signature: bytes,
    parents: list[ModelRecord],
    base: ModelRecord | None,
    max_parents: int,
    max_parameters: int,
) -> None:
    recipe = body.recipe
    if recipe is None:
        return
    try:
        validate_recipe(
            recipe,
            child_parameters=parameter_count(spec),
            max_merge_parents=max_parents,
            max_step_parameters=max_parameters,
        )
    except MergeError as exc:
        raise InvalidMergeRecipe(exc.message, data={"merge_code": exc.code}) from exc
    method = recipe.method
    if method in ELEMENTWISE_METHODS or method == "weight_matching":
        # Same parameter layout in and out: the child keeps its parents' signature.
        for p in parents:
            if p.signature != signature:
                raise IncompatibleLineage(
                    f"{method}: parent 0x{p.id.hex()} has another signature than the child"
                )
        if method in SAME_BASE_METHODS and base is not None and base.signature != signature:
            raise IncompatibleLineage(
                f"{method}: the base 0x{base.id.hex()} has another signature than the child"
            )
        if method == "weight_matching" and not is_alignable(spec):
            raise IncompatibleLineage(
                f"weight matching permutes hidden units: the {spec.family} family has none"
            )
    elif method in DATA_METHODS:
        try:
            child = spec_json(parse_spec(recipe.child_spec))
        except SpecError as exc:
            raise IncompatibleLineage(f"{method}: the recipe's child spec: {exc.message}") from exc
        if child != bytes(body.spec):
            raise IncompatibleLineage(f"{method}: the recipe's child spec is not the model's spec")
    for d in recipe.datasets:
        if get_dataset(view, d) is None:
            raise UnknownTrainingDataset(
                f"the recipe's dataset 0x{bytes(d).hex()} is not registered"
            )


def apply_model_register(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, ModelRegister)  # kind dispatch guarantees it
    sender = vtx.sender
    require_role(view, sender, Role.MODEL_DEVELOPER, "registering a model")
    id_ = model_id(body.root)
    if view.get(model_key(id_)) is not None:
        raise ModelExists(f"the artifact {parse_cid(body.root)} is already model 0x{id_.hex()}")
    params = economy_params(view)
    spec = parse_model_spec(body.spec)
    signature, data_size = verify_model_artifact(
        body.root, body.proof, spec, encrypted=body.price > 0
    )
    parameters = parameter_count(spec)
    if parameters > params.max_step_parameters:
        raise StepParameterCapExceeded(
            f"the model has {parameters} parameters, above max_step_parameters = "
            f"{params.max_step_parameters}"
        )
    if len(body.parents) > params.max_merge_parents:
        raise TooManyMergeParents(
            f"{len(body.parents)} parents exceed max_merge_parents = {params.max_merge_parents}"
        )
    parents = []
    for p in body.parents:
        record = get_model(view, p)
        if record is None:
            raise UnknownParent(f"parent 0x{p.hex()} is not a registered model")
        parents.append(record)
    base = None
    if body.base is not None:
        base = get_model(view, body.base)
        if base is None:
            raise UnknownBase(f"base 0x{body.base.hex()} is not a registered model")
    for d in body.datasets:
        if get_dataset(view, d) is None:
            raise UnknownTrainingDataset(f"training dataset 0x{d.hex()} is not registered")
    _check_recipe(
        view,
        body,
        spec,
        signature,
        parents,
        base,
        params.max_merge_parents,
        params.max_step_parameters,
    )
    lineage = [*parents, *(() if base is None else (base,))]
    depth = 1 + max(r.depth for r in lineage) if lineage else 0
    record = ModelRecord(
        id=id_,
        root=body.root,
        header=body.proof.header,
        spec=body.spec,
        signature=signature,
        owner=sender,
        name=body.name,
        description=body.description,
        license=body.license,
        price=body.price,
        royalties=body.royalties,
        base=body.base,
        parents=body.parents,
        recipe=body.recipe,
        datasets=body.datasets,
        metrics=body.metrics,
        depth=depth,
        height=ctx.height,
        family=spec.family,
        parameters=parameters,
        data_size=data_size,
        salt=body.salt,
        key_check=body.key_check,
        plain_data_hash=body.plain_data_hash,
    )
    charge(view, vtx)
    view.put(model_key(id_), record.encode())
    view.put(signature_key(signature, id_), b"")
    for ancestor, relation in record.ancestors:
        view.put(edge_key(ancestor, id_), bytes([relation]))
    return (
        Event(
            "model_register",
            (
                Attribute("id", id_),
                Attribute("owner", sender),
                Attribute("root", body.root),
                Attribute("signature", signature),
                Attribute("depth", u64(depth)),
                Attribute("price", u256(body.price)),
            ),
        ),
    )


def _register_records(view: StateView, vtx: VerifiedTransaction) -> int:
    body = vtx.body
    assert isinstance(body, ModelRegister)
    # the record, its signature index entry, one edge per distinct ancestor
    return 2 + len(direct_ancestors(body.parents, body.base))


HANDLERS: tuple[KindHandler, ...] = (
    KindHandler(
        EconomyKind.MODEL_REGISTER,
        ModelRegister,
        apply_model_register,
        _register_records,
        _check_register_body,
    ),
)

__all__ = [
    "HANDLERS",
    "MAX_LINEAGE_EDGES",
    "BadLineage",
    "BadMetrics",
    "BadRoyalties",
    "Edge",
    "EmptyModelName",
    "IncompatibleLineage",
    "InvalidMergeRecipe",
    "InvalidModelSpec",
    "LineageWalk",
    "Metric",
    "ModelError",
    "ModelExists",
    "ModelHeaderMismatch",
    "ModelPathMismatch",
    "ModelPriceTermsMismatch",
    "ModelRecord",
    "ModelRegister",
    "ModelSizeMismatch",
    "ModelSpecMismatch",
    "NotSafetensorsModel",
    "PrefixScan",
    "Relation",
    "RoyaltyShare",
    "StepParameterCapExceeded",
    "TooManyMergeParents",
    "UnknownBase",
    "UnknownModel",
    "UnknownModelFamily",
    "UnknownParent",
    "UnknownTrainingDataset",
    "ancestors",
    "children_prefix",
    "descendants",
    "direct_ancestors",
    "edge_key",
    "get_model",
    "get_model_by_root",
    "get_relation",
    "iter_children",
    "model_id",
    "model_key",
    "parse_edge_key",
    "parse_model_spec",
    "require_model",
    "signature_key",
    "signature_prefix",
    "verify_model_artifact",
]
