"""Model search, the whitepaper's "universal classifier" (issue 6 item 5, DESIGN §8): which
registered models can be merged with which, and by what method.

The node keeps an in-memory index of every registered model (``ModelRecord``), built from state
at start and then from each committed block's ``ModelRegister`` transactions (bounded work per
wake-up). Everything is derived from the record's spec and signature — no artifact is downloaded
and torch is never imported. Three queries:

* ``signature``: the models with exactly this signature (same tensor names, shapes and dtypes).
* ``mergeable_with`` a model X: every model Y that shares X's input (shape and dtype), with the
  strongest relation that holds and the merge methods (``node.merge.recipe`` names) the engine
  can run on the pair:

  - ``same_signature``: equal signatures → ``linear``, ``slerp``; ``task_arithmetic``,
    ``ties``, ``dare`` when both record the same base; ``weight_matching``, ``zipit``,
    ``feature_union`` when the family is alignable (mlp, cnn) and the specs are equal;
    ``distill``.
  - ``same_widths``: alignable family, same input, activation, kernel, pooling and hidden
    widths, another head (classes) or dtype — parents trained on different tasks →
    ``zipit``, ``feature_union``, ``distill``.
  - ``same_depth``: as above with other widths but as many hidden layers →
    ``feature_union``, ``distill``.
  - ``same_input``: only the input is shared (another family or body) → ``distill``.

* ``text``: BM25 (Robertson–Zaragoza; k1 = 1.2, b = 0.75, idf = ln(1 + (N − n + ½)/(n + ½)))
  over the model's name (counted twice: a light name boost), description and a spec summary
  (family, layer types, input, widths, classes, activation, dtype). Tokens are the case-folded
  alphanumeric runs of the text; nothing is downloaded (no embedding model).

``family`` filters every query. **Ranking** (each result carries an integer ``score``; results
are ordered by score, highest first, then by model id): for ``mergeable_with``, the relation
(same_signature 4 > same_widths 3 > same_depth 2 > same_input 1), then a shared recorded base,
then the newest registration; for ``signature``, the newest registration; for ``text``, the BM25
score in millionths. A page's ``next_cursor`` (``"<score>:<id hex>"``) resumes after its last
result. The index can only answer for what it has read: ``indexed_height`` says up to which
block. Error codes 3080–3099.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from node.api import ViewState
from node.economy.api import NS_MODEL, EconomyKind
from node.economy.models import ModelRecord, ModelRegister, get_model, model_id
from node.errors import NeuroSeedError
from node.models.specs import (
    CNNSpec,
    MLPSpec,
    ModelSpec,
    SpecError,
    TransformerSpec,
    input_dtype,
    input_shape,
    is_alignable,
    parse_spec,
    spec_json,
)

log = logging.getLogger(__name__)

MAX_LIMIT = 100
DEFAULT_LIMIT = 20
MAX_QUERY_TERMS = 32
MAX_TOKEN_CHARS = 64
MAX_DOC_TOKENS = 4096
MAX_TEXT_QUERY = 512
BM25_K1 = 1.2
BM25_B = 0.75
NAME_BOOST = 2
"""The name's tokens count this many times in a document (a light field boost)."""

RELATIONS = ("same_signature", "same_widths", "same_depth", "same_input")
_RANK = {"same_signature": 4, "same_widths": 3, "same_depth": 2, "same_input": 1}
_HEIGHT_BITS = 40
ELEMENTWISE_ALWAYS = ("linear", "slerp")
SAME_BASE = ("task_arithmetic", "ties", "dare")
ALIGNED = ("weight_matching", "zipit", "feature_union")

_TOKEN = re.compile(r"[^\W_]+")
_CURSOR = re.compile(r"(-?[0-9]{1,30}):([0-9a-f]{64})")


# --- errors (3080–3099) ------------------------------------------------------------------------


class SearchError(NeuroSeedError):
    """Base of the model search's errors."""

    code = 3080
    reason = "model search failed"


class InvalidSearch(SearchError):
    """A query that names no criterion or several, or has a bad field."""

    code = 3081
    reason = "invalid model search"


class UnknownSearchModel(SearchError):
    code = 3082
    reason = "the model to compare with is not registered"


class SearchUnavailable(SearchError):
    code = 3083
    reason = "this node runs no model search index"


class BadSearchCursor(InvalidSearch):
    code = 3084
    reason = "malformed search cursor"


# --- what the index knows of a model -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """One registered model as the index sees it (derived from its ``ModelRecord``)."""

    id: bytes
    root: bytes
    name: str
    description: str
    owner: bytes
    signature: bytes
    spec: ModelSpec
    base: bytes | None
    parents: tuple[bytes, ...]
    height: int
    parameters: int
    price: int

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def input_key(self) -> tuple[tuple[int, ...], str]:
        """What two models must share to be compared at all: the input shape and dtype."""
        return input_shape(self.spec), input_dtype(self.spec)

    @property
    def widths(self) -> tuple[int, ...]:
        """Hidden widths of an alignable family (MLP units, CNN channels); () otherwise."""
        if isinstance(self.spec, MLPSpec):
            return self.spec.hidden
        if isinstance(self.spec, CNNSpec):
            return self.spec.channels
        return ()

    @property
    def body(self) -> tuple[tuple[str, object], ...]:
        """The spec fields that must agree for ZipIt! and feature union (all but the widths,
        the classes and the dtype: ``node.merge.union``)."""
        fields = dataclasses.asdict(self.spec)
        for key in ("hidden", "channels", "num_classes", "dtype"):
            fields.pop(key, None)
        return (("family", self.family), *sorted(fields.items()))


def profile_of(record: ModelRecord) -> ModelProfile | None:
    """The profile of a record, or None if its spec does not parse (never for a record the
    chain accepted; logged and skipped rather than failing the index)."""
    try:
        spec = parse_spec(record.spec)
    except SpecError as exc:
        log.warning("model 0x%s: unreadable spec (%s); not indexed", record.id.hex(), exc.message)
        return None
    return ModelProfile(
        id=bytes(record.id),
        root=bytes(record.root),
        name=record.name,
        description=record.description,
        owner=bytes(record.owner),
        signature=bytes(record.signature),
        spec=spec,
        base=None if record.base is None else bytes(record.base),
        parents=tuple(bytes(p) for p in record.parents),
        height=int(record.height),
        parameters=int(record.parameters),
        price=int(record.price),
    )


def spec_summary(spec: ModelSpec) -> str:
    """Words describing a spec for text search: family, layer types, sizes."""
    if isinstance(spec, MLPSpec):
        words = [
            "mlp multilayer perceptron dense linear",
            f"input {spec.input_dim}",
            "hidden " + " ".join(str(w) for w in spec.hidden),
            f"layers {len(spec.hidden)}",
        ]
    elif isinstance(spec, CNNSpec):
        size = f"{spec.in_channels}x{spec.image_size}x{spec.image_size}"
        words = [
            "cnn convolutional conv conv2d image",
            f"input {size} channels " + " ".join(str(c) for c in spec.channels),
            f"kernel {spec.kernel_size}",
            "pool maxpool" if spec.pool else "nopool",
            f"layers {len(spec.channels)}",
        ]
    else:
        assert isinstance(spec, TransformerSpec)
        words = [
            "transformer encoder attention embedding layernorm text tokens sequence",
            f"vocab {spec.vocab_size} length {spec.max_len} dmodel {spec.d_model}",
            f"heads {spec.n_heads} layers {spec.n_layers} ff {spec.d_ff}",
        ]
    words += [f"classes {spec.num_classes}", spec.activation, spec.dtype]
    return " ".join(words)


def tokenize(text: str) -> list[str]:
    """Case-folded alphanumeric runs, each at most ``MAX_TOKEN_CHARS`` characters."""
    return [t[:MAX_TOKEN_CHARS] for t in _TOKEN.findall(text.casefold())]


def document_tokens(profile: ModelProfile) -> list[str]:
    name = tokenize(profile.name)
    tokens = (
        name * NAME_BOOST + tokenize(profile.description) + tokenize(spec_summary(profile.spec))
    )
    return tokens[:MAX_DOC_TOKENS]


# --- relations ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Match:
    """How a candidate relates to the model a query compares with."""

    relation: str
    methods: tuple[str, ...]
    reason: str
    shared_base: bytes | None = None


def compare(x: ModelProfile, y: ModelProfile) -> Match | None:
    """The strongest relation between models ``x`` and ``y`` (see the module docstring), or None
    when they do not even share an input."""
    if x.input_key != y.input_key:
        return None
    shared = x.base if x.base is not None and x.base == y.base else None
    aligned = is_alignable(x.spec) and x.family == y.family and x.body == y.body
    if x.signature == y.signature:
        methods = list(ELEMENTWISE_ALWAYS)
        notes = ["same tensor names, shapes and dtypes: elementwise merges apply"]
        if shared is not None:
            methods += SAME_BASE
            notes.append(f"both record base 0x{shared.hex()[:16]}…: task-vector merges apply")
        if aligned and spec_json(x.spec) == spec_json(y.spec):
            methods += ALIGNED
            notes.append(f"{x.family} units can be permuted: weight matching and ZipIt! apply")
        return Match("same_signature", (*methods, "distill"), "; ".join(notes), shared)
    if aligned and x.widths == y.widths:
        what = []
        if x.spec.num_classes != y.spec.num_classes:
            what.append(f"{x.spec.num_classes} vs {y.spec.num_classes} classes")
        if x.spec.dtype != y.spec.dtype:
            what.append(f"{x.spec.dtype} vs {y.spec.dtype}")
        return Match(
            "same_widths",
            ("zipit", "feature_union", "distill"),
            f"same {x.family} body and hidden widths {list(x.widths)}, another head "
            f"({', '.join(what)}): a different task, merged by ZipIt! or feature union",
        )
    if aligned and len(x.widths) == len(y.widths):
        return Match(
            "same_depth",
            ("feature_union", "distill"),
            f"same {x.family} body with {len(x.widths)} hidden layers of other widths "
            f"({list(x.widths)} vs {list(y.widths)}): feature union stacks them side by side",
        )
    shape, dtype = x.input_key
    return Match(
        "same_input",
        ("distill",),
        f"only the input ({dtype} {list(shape)}) is shared: distillation into a fresh student",
    )


def _match_score(match: Match, profile: ModelProfile) -> int:
    shared = 1 if match.shared_base is not None else 0
    height = min(profile.height, (1 << _HEIGHT_BITS) - 1)
    return (_RANK[match.relation] << (_HEIGHT_BITS + 1)) | (shared << _HEIGHT_BITS) | height


# --- BM25 ------------------------------------------------------------------------------------------


class Bm25:
    """An incremental BM25 inverted index over documents keyed by id."""

    def __init__(self, k1: float = BM25_K1, b: float = BM25_B) -> None:
        self.k1 = k1
        self.b = b
        self._postings: dict[str, dict[bytes, int]] = {}
        self._lengths: dict[bytes, int] = {}
        self._total = 0

    def __len__(self) -> int:
        return len(self._lengths)

    def add(self, doc: bytes, tokens: Sequence[str]) -> None:
        if doc in self._lengths:
            return
        counts: dict[str, int] = {}
        for t in tokens:
            counts[t] = counts.get(t, 0) + 1
        for t, n in counts.items():
            self._postings.setdefault(t, {})[doc] = n
        self._lengths[doc] = len(tokens)
        self._total += len(tokens)

    def idf(self, term: str) -> float:
        n = len(self._postings.get(term, ()))
        big_n = len(self._lengths)
        return math.log(1.0 + (big_n - n + 0.5) / (n + 0.5))

    def scores(self, terms: Iterable[str]) -> dict[bytes, float]:
        """BM25 score of every document holding at least one of ``terms`` (each counted once)."""
        if not self._lengths:
            return {}
        avg = self._total / len(self._lengths) or 1.0
        out: dict[bytes, float] = {}
        for term in sorted(set(terms)):
            postings = self._postings.get(term)
            if not postings:
                continue
            idf = self.idf(term)
            for doc, tf in postings.items():
                norm = self.k1 * (1.0 - self.b + self.b * self._lengths[doc] / avg)
                out[doc] = out.get(doc, 0.0) + idf * tf * (self.k1 + 1.0) / (tf + norm)
        return out


# --- queries and answers -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """Exactly one of ``signature``, ``mergeable_with`` (a model id) or ``text``."""

    signature: bytes | None = None
    mergeable_with: bytes | None = None
    text: str | None = None
    family: str | None = None
    limit: int = DEFAULT_LIMIT
    cursor: str | None = None

    def check(self) -> None:
        given = [
            n
            for n, v in (
                ("signature", self.signature),
                ("mergeableWith", self.mergeable_with),
                ("text", self.text),
            )
            if v is not None
        ]
        if len(given) != 1:
            raise InvalidSearch(
                "a search takes exactly one of signature, mergeableWith or text"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.signature is not None and len(self.signature) != 32:
            raise InvalidSearch("a signature is 32 bytes")
        if self.text is not None:
            if len(self.text) > MAX_TEXT_QUERY:
                raise InvalidSearch(f"the text is at most {MAX_TEXT_QUERY} characters")
            if not tokenize(self.text):
                raise InvalidSearch("the text has no word to search for")
        if not 1 <= self.limit <= MAX_LIMIT:
            raise InvalidSearch(f"limit is 1 to {MAX_LIMIT}")
        if self.cursor is not None:
            parse_cursor(self.cursor)


@dataclass(frozen=True, slots=True)
class SearchHit:
    profile: ModelProfile
    score: int
    relation: str
    methods: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class SearchPage:
    hits: tuple[SearchHit, ...]
    next_cursor: str | None
    total: int  # results of the whole query (all pages)
    indexed_height: int
    reference: ModelProfile | None = None  # the model of a mergeable_with query


def parse_cursor(cursor: str) -> tuple[int, bytes]:
    m = _CURSOR.fullmatch(cursor)
    if m is None:
        raise BadSearchCursor(f"cursor {cursor[:80]!r} is not '<score>:<64 hex digits>'")
    return int(m.group(1)), bytes.fromhex(m.group(2))


def make_cursor(score: int, model: bytes) -> str:
    return f"{score}:{model.hex()}"


def _paginate(
    hits: list[SearchHit], query: SearchQuery, height: int, reference: ModelProfile | None
) -> SearchPage:
    hits.sort(key=lambda h: (-h.score, h.profile.id))
    start = 0
    if query.cursor is not None:
        score, last = parse_cursor(query.cursor)
        after = (-score, last)
        while start < len(hits) and (-hits[start].score, hits[start].profile.id) <= after:
            start += 1
    page = hits[start : start + query.limit]
    more = start + query.limit < len(hits)
    cursor = make_cursor(page[-1].score, page[-1].profile.id) if more and page else None
    return SearchPage(tuple(page), cursor, len(hits), height, reference)


# --- the index -----------------------------------------------------------------------------------


class ModelIndex:
    """Every indexed model by id, signature and input, plus the BM25 text index. Thread-safe:
    the search service adds from a worker thread, RPC queries read from the RPC thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[bytes, ModelProfile] = {}
        self._by_signature: dict[bytes, set[bytes]] = {}
        self._by_input: dict[tuple[tuple[int, ...], str], set[bytes]] = {}
        self._text = Bm25()
        self._height = -1

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)

    @property
    def height(self) -> int:
        """The last block whose registrations are indexed (-1: nothing read yet)."""
        with self._lock:
            return self._height

    def get(self, model: bytes) -> ModelProfile | None:
        with self._lock:
            return self._models.get(bytes(model))

    def add(self, profiles: Iterable[ModelProfile], height: int | None = None) -> int:
        """Index ``profiles`` (already indexed ones are skipped) and, if given, record that
        every registration up to ``height`` is in. Returns how many were new."""
        items = list(profiles)  # read (state scans, decoding) before taking the lock
        new = 0
        with self._lock:
            for p in items:
                if p.id in self._models:
                    continue
                self._models[p.id] = p
                self._by_signature.setdefault(p.signature, set()).add(p.id)
                self._by_input.setdefault(p.input_key, set()).add(p.id)
                self._text.add(p.id, document_tokens(p))
                new += 1
            if height is not None and height > self._height:
                self._height = height
        return new

    def search(self, query: SearchQuery, reference: ModelProfile | None = None) -> SearchPage:
        """Answer ``query``; a ``mergeable_with`` query needs the ``reference`` profile of that
        model (the caller reads it from the index or from state)."""
        query.check()
        with self._lock:
            height = self._height
            if query.signature is not None:
                hits = self._signature_hits(query.signature)
            elif query.mergeable_with is not None:
                if reference is None or reference.id != bytes(query.mergeable_with):
                    raise UnknownSearchModel(
                        f"no model 0x{bytes(query.mergeable_with).hex()} to compare with"
                    )
                hits = self._mergeable_hits(reference)
            else:
                assert query.text is not None
                hits = self._text_hits(query.text)
        if query.family is not None:
            hits = [h for h in hits if h.profile.family == query.family]
        page = _paginate(hits, query, height, reference)
        if query.text is not None:  # the matched words, for the page only
            terms = _query_terms(query.text)
            page = dataclasses.replace(page, hits=tuple(_with_terms(h, terms) for h in page.hits))
        return page

    def _signature_hits(self, signature: bytes) -> list[SearchHit]:
        reason = "this signature: elementwise merges apply (task-vector ones with a shared base)"
        methods = (*ELEMENTWISE_ALWAYS, *SAME_BASE)
        return [
            SearchHit(self._models[m], self._models[m].height, "same_signature", methods, reason)
            for m in self._by_signature.get(bytes(signature), ())
        ]

    def _mergeable_hits(self, x: ModelProfile) -> list[SearchHit]:
        out = []
        for m in self._by_input.get(x.input_key, ()):
            if m == x.id:
                continue
            y = self._models[m]
            match = compare(x, y)
            if match is not None:
                out.append(
                    SearchHit(
                        y, _match_score(match, y), match.relation, match.methods, match.reason
                    )
                )
        return out

    def _text_hits(self, text: str) -> list[SearchHit]:
        scores = self._text.scores(_query_terms(text))
        return [
            SearchHit(self._models[m], round(s * 1_000_000), "text", (), "")
            for m, s in scores.items()
        ]


def _query_terms(text: str) -> list[str]:
    return sorted(set(tokenize(text)))[:MAX_QUERY_TERMS]


def _with_terms(hit: SearchHit, terms: Sequence[str]) -> SearchHit:
    words = set(document_tokens(hit.profile))
    found = ", ".join(repr(t) for t in terms if t in words)
    return dataclasses.replace(hit, reason=f"BM25 over name, description and spec: {found}")


# --- keeping the index up to date in the node ------------------------------------------------------


def _head(view: Any) -> int:
    return 0 if view.head is None else int(view.head.height)


def profiles_in_state(view: Any) -> Iterator[ModelProfile]:
    """Every model record in the view's state (the index at start)."""
    for _, value in view.iter_state(NS_MODEL):
        profile = profile_of(ModelRecord.decode(value))
        if profile is not None:
            yield profile


def registered_in_block(view: Any, height: int) -> list[ModelProfile]:
    """The models the ``ModelRegister`` transactions of block ``height`` registered (a failed
    registration wrote nothing: its id has no record, or the one an earlier block made)."""
    from node.consensus.txs import decode_body, decode_transaction

    block = view.get_block(height)
    if block is None:
        return []
    state = ViewState(view)
    out = []
    for raw in block.txs:
        try:
            tx = decode_transaction(raw).tx
            if tx.kind != EconomyKind.MODEL_REGISTER:
                continue
            body = decode_body(tx)
        except NeuroSeedError:
            continue
        assert isinstance(body, ModelRegister)
        record = get_model(state, model_id(body.root))
        if record is not None:
            profile = profile_of(record)
            if profile is not None:
                out.append(profile)
    return out


@dataclass(frozen=True, slots=True)
class SearchSettings:
    poll_interval_s: float = 0.5  # how often the head is checked
    blocks_per_round: int = 64  # blocks read per wake-up (bounded work, DESIGN §4)
    # Further behind than this (a node syncing a long chain), one scan of the models in state
    # catches up instead of reading every block.
    rescan_after_blocks: int = 4096


@dataclass
class ModelSearchService:
    """Keeps a ``ModelIndex`` in step with the chain: run it in the node's nursery. The state
    scan at start and each block's reads run in a worker thread (LevelDB reads, decoding)."""

    read_view: Callable[[], Any]
    settings: SearchSettings = field(default_factory=SearchSettings)
    index: ModelIndex = field(default_factory=ModelIndex)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Started at once: the node serves while the registry is read (``indexed_height`` says
        # how far the index is).
        task_status.started()
        await self.load()
        while True:
            await trio.sleep(self.settings.poll_interval_s)
            await self.step()

    async def load(self) -> None:
        """Index every model in the latest state."""
        view = self.read_view()
        head = _head(view)
        count = await trio.to_thread.run_sync(lambda: self.index.add(profiles_in_state(view), head))
        log.info("model search: %d models indexed at height %d", count, head)

    async def step(self) -> int:
        """Index the registrations of the blocks committed since the last step (at most
        ``blocks_per_round``; far behind, a state scan instead); returns how many were new."""
        view = self.read_view()
        head = _head(view)
        start = self.index.height + 1
        if head - start >= self.settings.rescan_after_blocks:
            return await trio.to_thread.run_sync(
                lambda: self.index.add(profiles_in_state(view), head)
            )
        stop = min(head, start + self.settings.blocks_per_round - 1)
        if stop < start:
            return 0

        def scan() -> int:
            new = 0
            for h in range(start, stop + 1):
                new += self.index.add(registered_in_block(view, h), h)
            return new

        return await trio.to_thread.run_sync(scan)

    def resolve(self, view: Any, model: bytes) -> ModelProfile | None:
        """A model's profile from the index, else from the view's state (the index may lag)."""
        found = self.index.get(model)
        if found is not None:
            return found
        record = get_model(ViewState(view), model)
        return None if record is None else profile_of(record)

    def search(self, query: SearchQuery, view: Any) -> SearchPage:
        reference = None
        if query.mergeable_with is not None:
            reference = self.resolve(view, query.mergeable_with)
            if reference is None:
                raise UnknownSearchModel(f"no model 0x{bytes(query.mergeable_with).hex()}")
        return self.index.search(query, reference)


__all__ = [
    "RELATIONS",
    "BadSearchCursor",
    "Bm25",
    "InvalidSearch",
    "Match",
    "ModelIndex",
    "ModelProfile",
    "ModelSearchService",
    "SearchError",
    "SearchHit",
    "SearchPage",
    "SearchQuery",
    "SearchSettings",
    "SearchUnavailable",
    "UnknownSearchModel",
    "compare",
    "document_tokens",
    "profile_of",
    "profiles_in_state",
    "registered_in_block",
    "spec_summary",
    "tokenize",
]
