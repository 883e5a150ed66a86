"""The buyer's dispute planner (node/dispute_client.py) against a real chain in-process
(``tests/economy/econ.Market``: blocks built and re-applied by the economy transition): each plan
is sent as the buyer's transactions and must be judged as the planner predicted. A garbage key
is one ``KeyDispute``; a full 1 MiB leaf that does not decrypt goes in an open and 32 parts; a
short last leaf rides in one ``KeyDispute``; an honest seller gets no dispute at all. Both
readers of the stored artifact (blocks by CID, byte ranges of the file) give the same plans."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest

from node.dispute_client import (
    BlockArtifact,
    DisputeTooLarge,
    LeafOutOfRange,
    NoFaultFound,
    NotDisputable,
    RangeArtifact,
    StoredDataMismatch,
    WrongPrivateKey,
    body_kind,
    plan_dispute,
    plan_resume,
    require_disputable,
    select_share,
    signed_size_bound,
    total_leaf_bytes,
)
from node.economy.composite import CompositeDefine, CompositePartSpec, composite_id
from node.economy.datasets import DatasetRecord, get_dataset
from node.economy.purchases import (
    DISPUTE_PART_BYTES,
    KeyDispute,
    LeafDisputeOpen,
    LeafDisputePart,
    PurchaseRecord,
    ShareState,
    get_leaf_dispute,
    get_purchase,
)
from node.storage import encryption
from node.storage.encryption import DisputeVerdict
from node.storage.format_v1 import make_leaf0, make_proof
from node.storage.importer import export_file
from node.storage.unixfs import (
    CHUNK_SIZE,
    Link,
    UnixfsBuilder,
    dag_pb_cid,
    encode_file_node,
    raw_cid,
)
from node.types import Amount, Hash32
from tests.economy.econ import (
    BUYER,
    BUYER_PRIV,
    DISPUTE_WINDOW,
    DISTRIBUTOR,
    PRICE,
    SLASH,
    SUPPLIER,
    SUPPLIER2,
    SUPPLIER_BOND,
    Artifact,
    Market,
    addr,
    build_artifact,
    header_json,
    priced_dataset,
    register_body,
)

DEVNET_MAX_TX = 64 << 10
KEY, SALT = b"\x31" * 32, b"\x32" * 7
# 1.5 MiB of data: leaf 1 a full 1 MiB chunk, leaf 2 the short last one (512 KiB + 16).
HEADER = header_json({"x": ("U8", (1536, 1024))})
DATA = bytes(i % 251 for i in range(1536 * 1024))


def stored_artifact(tamper: Callable[[bytes], bytes] | None = None) -> Artifact:
    """The 1.5 MiB dataset honestly encrypted under KEY, its ciphertext passed through
    ``tamper`` before it is chunked (the registration commits to what is stored)."""
    out = io.BytesIO()
    encryption.encrypt_stream(KEY, SALT, io.BytesIO(DATA), out, len(DATA))
    stored = out.getvalue() if tamper is None else tamper(out.getvalue())
    builder = UnixfsBuilder()
    blocks: dict[bytes, bytes] = {}
    for piece in (make_leaf0(HEADER), stored):
        for b in builder.feed(piece):
            blocks[bytes(b.cid)] = b.data
    root_cid, rest = builder.finish_blocks()
    blocks.update((bytes(b.cid), b.data) for b in rest)
    root = bytes(root_cid)
    return Artifact(root, HEADER, make_proof(lambda c: blocks[c], root), blocks, DATA, KEY, SALT)


def flip_last_byte(stored: bytes) -> bytes:
    return stored[:-1] + bytes([stored[-1] ^ 1])


HONEST = stored_artifact()
GARBAGE = build_artifact(HEADER, DATA, key=KEY, salt=SALT, encrypt_with=b"\x33" * 32)
BAD_TAIL = stored_artifact(flip_last_byte)  # leaf 1 decrypts, the short last leaf does not


def file_reader(a: Artifact) -> RangeArtifact:
    """The artifact as byte ranges of its file (what the node's GET /artifacts/<cid> serves)."""

    class Store:
        def get(self, cid: bytes) -> bytes | None:
            return a.blocks.get(cid)

    whole = io.BytesIO()
    export_file(Store(), a.root, whole)  # type: ignore[arg-type]
    data = whole.getvalue()
    return RangeArtifact(a.root, len(data), lambda s, e: data[s:e])


def opened(
    p: Artifact, *, max_tx: int = DEVNET_MAX_TX, wrapped: bytes | None = None
) -> tuple[Market, Hash32]:
    m = Market(p=p, max_tx_bytes=max_tx)
    pid = m.buy(BUYER, p.id)
    m.post(pid, p, wrapped)
    return m, pid


def records(m: Market, pid: bytes, p: Artifact) -> tuple[PurchaseRecord, DatasetRecord]:
    purchase = get_purchase(m.c.view(), pid)
    source = get_dataset(m.c.view(), p.id)
    assert purchase is not None and source is not None
    return purchase, source


def send(m: Market, bodies: tuple[object, ...]) -> None:
    m.c.run(*(m.c.tx(BUYER, b) for b in bodies))  # type: ignore[arg-type]


def assert_refunded(m: Market, pid: bytes, buyer_before: int, fees: int) -> None:
    assert m.share(pid) == (ShareState.OWNER_FAULT, PRICE)
    assert m.c.balance(BUYER) == buyer_before + PRICE - fees
    assert m.bond(SUPPLIER) == SUPPLIER_BOND - SLASH
    assert m.obligations(SUPPLIER) == 0


# --- key-level faults ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wrapped_of", "verdict"),
    [
        (lambda m, pid: m.wrapped(pid, HONEST, key=b"\x99" * 32), DisputeVerdict.OWNER_FAULT_CHECK),
        (lambda m, pid: b"\x02" + b"\x55" * 80, DisputeVerdict.OWNER_FAULT_UNWRAP),
    ],
)
def test_a_garbage_key_is_one_key_dispute_and_refunds(
    wrapped_of: Callable[[Market, bytes], bytes], verdict: DisputeVerdict
) -> None:
    m = Market(p=HONEST, max_tx_bytes=DEVNET_MAX_TX)
    pid = m.buy(BUYER, HONEST.id)
    m.post(pid, HONEST, wrapped_of(m, pid))
    purchase, source = records(m, pid, HONEST)

    class NoReads:
        def leaf(self, index: int) -> bytes:
            raise AssertionError("a key-level fault needs no data")

        def path(self, index: int) -> tuple[bytes, ...]:
            raise AssertionError("a key-level fault needs no path")

    plan = plan_dispute(purchase, 0, source, BUYER_PRIV, NoReads(), max_tx_bytes=DEVNET_MAX_TX)
    assert plan.verdict == verdict and plan.leaf_index is None and plan.refund == PRICE
    assert plan.bodies == (KeyDispute(pid, HONEST.id, BUYER_PRIV, None),)
    assert total_leaf_bytes(plan.bodies) == 0 and body_kind(plan.bodies[0]) == "key_dispute"
    before = m.c.balance(BUYER)
    send(m, plan.bodies)
    assert_refunded(m, pid, before, 10**8)


# --- leaf faults -----------------------------------------------------------------------------------


def test_a_full_garbage_leaf_goes_in_parts_and_refunds_and_slashes() -> None:
    m, pid = opened(GARBAGE)
    purchase, source = records(m, pid, GARBAGE)
    plan = plan_dispute(
        purchase,
        0,
        source,
        BUYER_PRIV,
        BlockArtifact(GARBAGE.root, GARBAGE.blocks.get),
        max_tx_bytes=DEVNET_MAX_TX,
    )
    assert plan.verdict == DisputeVerdict.OWNER_FAULT_DECRYPT and plan.leaf_index == 1
    opening, *parts = plan.bodies
    assert isinstance(opening, LeafDisputeOpen) and opening.path == GARBAGE.leaf(1)[1]
    assert len(parts) == 32 and all(isinstance(p, LeafDisputePart) for p in parts)
    assert b"".join(p.data for p in parts) == GARBAGE.leaf(1)[0]  # type: ignore[union-attr]
    assert total_leaf_bytes(plan.bodies) == CHUNK_SIZE
    # Every transaction fits the devnet's limit, and the size bound holds.
    raws = [m.c.tx(BUYER, b) for b in plan.bodies]
    for raw, body in zip(raws, plan.bodies, strict=True):
        assert len(raw) <= signed_size_bound(body) <= DEVNET_MAX_TX
    # The file reader finds the same leaf and rebuilds the same path.
    again = plan_dispute(
        purchase, 0, source, BUYER_PRIV, file_reader(GARBAGE), max_tx_bytes=DEVNET_MAX_TX
    )
    assert again == plan
    before = m.c.balance(BUYER)
    m.c.run(*raws)
    assert_refunded(m, pid, before, 33 * 10**8)


def test_a_short_last_leaf_rides_in_one_key_dispute() -> None:
    m, pid = opened(BAD_TAIL, max_tx=1 << 20)
    purchase, source = records(m, pid, BAD_TAIL)
    for artifact in (BlockArtifact(BAD_TAIL.root, BAD_TAIL.blocks.get), file_reader(BAD_TAIL)):
        plan = plan_dispute(purchase, 0, source, BUYER_PRIV, artifact, max_tx_bytes=1 << 20)
        (body,) = plan.bodies
        assert isinstance(body, KeyDispute) and body.chunk is not None
        assert body.chunk.leaf_index == 2 and len(body.chunk.leaf) == (512 << 10) + 32
        assert plan.leaf_index == 2 and "does not decrypt" in plan.reason
    # Under the devnet's 64 KiB limit the same leaf goes in parts (16 full ones and 32 bytes).
    parts_plan = plan_dispute(
        purchase, 0, source, BUYER_PRIV, file_reader(BAD_TAIL), max_tx_bytes=DEVNET_MAX_TX
    )
    assert [body_kind(b) for b in parts_plan.bodies[:2]] == [
        "leaf_dispute_open",
        "leaf_dispute_part",
    ] and len(parts_plan.bodies) == 1 + 17
    # Checking leaf 1 alone finds nothing: it decrypts.
    with pytest.raises(NoFaultFound, match="leaf 1"):
        plan_dispute(
            purchase, 0, source, BUYER_PRIV, file_reader(BAD_TAIL), max_tx_bytes=1 << 20, leaf=1
        )
    with pytest.raises(LeafOutOfRange, match="1 to 2"):
        plan_dispute(
            purchase, 0, source, BUYER_PRIV, file_reader(BAD_TAIL), max_tx_bytes=1 << 20, leaf=3
        )
    before = m.c.balance(BUYER)
    send(m, plan.bodies)  # the file reader's single KeyDispute
    assert_refunded(m, pid, before, 10**8)


def test_the_market_limit_decides_between_one_transaction_and_parts() -> None:
    """With a 1 MiB ``max_tx_bytes`` a short last leaf goes whole on chain (see above); a full
    leaf never can (the body limit is below 1 MiB), and a limit too small for even the open is a
    typed refusal before anything is sent."""
    m, pid = opened(GARBAGE, max_tx=1 << 20)
    purchase, source = records(m, pid, GARBAGE)
    artifact = BlockArtifact(GARBAGE.root, GARBAGE.blocks.get)
    plan = plan_dispute(purchase, 0, source, BUYER_PRIV, artifact, max_tx_bytes=1 << 20)
    assert len(plan.bodies) == 33
    with pytest.raises(DisputeTooLarge, match="max_tx_bytes is 1024"):
        plan_dispute(purchase, 0, source, BUYER_PRIV, artifact, max_tx_bytes=1024)
    with pytest.raises(DisputeTooLarge, match="part"):
        plan_dispute(purchase, 0, source, BUYER_PRIV, artifact, max_tx_bytes=DISPUTE_PART_BYTES)


def test_an_honest_seller_gets_no_dispute() -> None:
    m, pid = opened(HONEST)
    purchase, source = records(m, pid, HONEST)
    state = dict(m.c.state)
    for artifact in (BlockArtifact(HONEST.root, HONEST.blocks.get), file_reader(HONEST)):
        with pytest.raises(NoFaultFound, match="all 2 data leaves"):
            plan_dispute(purchase, 0, source, BUYER_PRIV, artifact, max_tx_bytes=DEVNET_MAX_TX)
    assert m.c.state == state  # nothing was sent
    # The chain agrees: a key dispute with leaf 1 would be rejected as invalid.
    from node.economy.purchases import DisputeRejected

    m.c.reject(m.c.tx(BUYER, m.dispute(pid, HONEST)), DisputeRejected)


def test_a_leaf_of_the_wrong_size_is_settled_by_the_open_alone() -> None:
    """A DAG whose leaf 1 is 8 bytes short: the block reader disputes it with the open alone (the
    path proves a size no chunk there can have, which the chain judges an owner fault). Read as a
    file the same bytes decrypt (the file reader finds no fault), and that DAG cannot be rebuilt
    from the file, so a path from it would be refused rather than sent wrong."""
    out = io.BytesIO()
    encryption.encrypt_stream(KEY, SALT, io.BytesIO(DATA), out, len(DATA))
    stored = out.getvalue()
    leaves = [make_leaf0(HEADER), stored[: CHUNK_SIZE - 8], stored[CHUNK_SIZE - 8 :]]
    node = encode_file_node([Link(raw_cid(x), len(x)) for x in leaves], [len(x) for x in leaves])
    root = bytes(dag_pb_cid(node))
    blocks = {bytes(raw_cid(x)): x for x in leaves} | {root: node}
    p = Artifact(root, HEADER, make_proof(lambda c: blocks[c], root), blocks, DATA, KEY, SALT)
    m, pid = opened(p)
    purchase, source = records(m, pid, p)
    plan = plan_dispute(
        purchase, 0, source, BUYER_PRIV, BlockArtifact(root, blocks.get), max_tx_bytes=DEVNET_MAX_TX
    )
    (body,) = plan.bodies
    assert isinstance(body, LeafDisputeOpen) and "needs" in plan.reason
    with pytest.raises(NoFaultFound):
        plan_dispute(purchase, 0, source, BUYER_PRIV, file_reader(p), max_tx_bytes=DEVNET_MAX_TX)
    with pytest.raises(StoredDataMismatch, match="does not rebuild"):
        file_reader(p).path(1)
    before = m.c.balance(BUYER)
    send(m, plan.bodies)
    assert_refunded(m, pid, before, 10**8)


# --- resuming a leaf dispute -----------------------------------------------------------------------


def test_an_interrupted_leaf_dispute_is_finished_from_what_the_chain_holds() -> None:
    m, pid = opened(GARBAGE)
    purchase, source = records(m, pid, GARBAGE)
    plan = plan_dispute(
        purchase, 0, source, BUYER_PRIV, file_reader(GARBAGE), max_tx_bytes=DEVNET_MAX_TX
    )
    before = m.c.balance(BUYER)
    send(m, plan.bodies[:11])  # the open and 10 parts, then the buyer's CLI died
    purchase, _ = records(m, pid, GARBAGE)
    dispute = get_leaf_dispute(m.c.view(), pid, GARBAGE.id)
    assert dispute is not None and dispute.received == 10 * DISPUTE_PART_BYTES
    require_disputable(purchase.shares[0], m.c.height)
    assert select_share(purchase) == 0
    with pytest.raises(NotDisputable, match="leaf_dispute"):
        plan_dispute(purchase, 0, source, BUYER_PRIV, file_reader(GARBAGE), max_tx_bytes=1 << 20)
    rest = plan_resume(
        purchase, 0, source, dispute, file_reader(GARBAGE), max_tx_bytes=DEVNET_MAX_TX
    )
    assert rest.resumed and rest.bodies == plan.bodies[11:]
    # A stored copy that is not the disputed leaf is refused before anything is sent.
    with pytest.raises(StoredDataMismatch, match="not the one the open dispute names"):
        plan_resume(purchase, 0, source, dispute, file_reader(HONEST), max_tx_bytes=DEVNET_MAX_TX)
    send(m, rest.bodies)
    assert_refunded(m, pid, before, 33 * 10**8)


def test_resuming_over_a_leaf_that_decrypts_is_refused() -> None:
    """A buyer who opened a dispute over an honest leaf would only pay to lose: no parts."""
    m, pid = opened(HONEST)
    _, path = HONEST.leaf(1)
    m.c.run(m.c.tx(BUYER, LeafDisputeOpen(pid, HONEST.id, BUYER_PRIV, 1, path)))
    purchase, source = records(m, pid, HONEST)
    dispute = get_leaf_dispute(m.c.view(), pid, HONEST.id)
    assert dispute is not None
    with pytest.raises(NoFaultFound, match="decrypts"):
        plan_resume(purchase, 0, source, dispute, file_reader(HONEST), max_tx_bytes=DEVNET_MAX_TX)


# --- what cannot be disputed -----------------------------------------------------------------------


def test_shares_that_cannot_be_disputed_and_wrong_keys() -> None:
    m = Market(p=GARBAGE, max_tx_bytes=DEVNET_MAX_TX)
    pid = m.buy(BUYER, GARBAGE.id)
    purchase, source = records(m, pid, GARBAGE)
    share = purchase.shares[0]
    with pytest.raises(NotDisputable, match="not posted the key yet"):
        require_disputable(share, m.c.height)
    assert select_share(purchase) == 0  # the only share: require_disputable says why not
    with pytest.raises(NotDisputable, match="pays no source"):
        select_share(purchase, b"\x00" * 32)
    assert select_share(purchase, GARBAGE.id) == 0
    m.post(pid, GARBAGE)
    purchase, _ = records(m, pid, GARBAGE)
    share = purchase.shares[0]
    require_disputable(share, share.deadline)
    with pytest.raises(NotDisputable, match="too late"):
        require_disputable(share, share.deadline + 1)
    # Another buyer's one-off key is not this purchase's.
    from node.storage.encryption import generate_wrap_keypair
    from tests.economy.econ import fixed_rng

    other, _ = generate_wrap_keypair(fixed_rng(11))
    with pytest.raises(WrongPrivateKey):
        plan_dispute(purchase, 0, source, other, file_reader(GARBAGE), max_tx_bytes=DEVNET_MAX_TX)
    # After the window the share is paid: settled.
    m.c.advance_to(m.c.height + DISPUTE_WINDOW + 1)
    purchase, _ = records(m, pid, GARBAGE)
    with pytest.raises(NotDisputable, match="settled \\(paid\\)"):
        require_disputable(purchase.shares[0], m.c.height)


def test_stored_copies_that_cannot_prove_a_leaf() -> None:
    blocks = dict(GARBAGE.blocks)
    leaf1 = bytes(raw_cid(GARBAGE.leaf(1)[0]))
    missing = BlockArtifact(GARBAGE.root, {k: v for k, v in blocks.items() if k != leaf1}.get)
    with pytest.raises(StoredDataMismatch, match="not stored"):
        missing.leaf(1)
    blocks[leaf1] = b"\x00" * CHUNK_SIZE
    with pytest.raises(StoredDataMismatch, match="damaged"):
        BlockArtifact(GARBAGE.root, blocks.get).leaf(1)
    short = RangeArtifact(GARBAGE.root, 3 * CHUNK_SIZE, lambda s, e: b"\x00" * (e - s - 1))
    with pytest.raises(StoredDataMismatch, match="expected"):
        short.leaf(1)
    with pytest.raises(LeafOutOfRange):
        file_reader(GARBAGE).leaf(9)


def test_a_composite_dispute_picks_its_source() -> None:
    """A composite pays P (priced, SUPPLIER), A (free) and Q (priced, SUPPLIER2): P's owner posts
    a garbage key, Q's the right one. Without --source the choice is ambiguous while both keys
    are disputable; P's dispute refunds P's share alone, and Q's honest key is not disputed."""
    m = Market()
    q = priced_dataset(6, seed=5)
    m.c.run(m.c.tx(SUPPLIER2, register_body(q, name="Q", price=300)))
    cid = composite_id(addr(DISTRIBUTOR), m.c.nonce(DISTRIBUTOR))
    parts = (
        CompositePartSpec(m.p.id, 0, 8, ()),
        CompositePartSpec(m.a.id, 0, 8, ()),
        CompositePartSpec(q.id, 0, 6, ()),
    )
    m.c.run(m.c.tx(DISTRIBUTOR, CompositeDefine("mix", "", "CC0", Amount(5_000), parts)))
    pid = m.buy(BUYER, cid)
    purchase = get_purchase(m.c.view(), pid)
    assert purchase is not None and [s.source for s in purchase.shares] == [m.p.id, m.a.id, q.id]
    with pytest.raises(NotDisputable, match="no share of the purchase has a posted key"):
        select_share(purchase)
    m.post(pid, m.p, m.wrapped(pid, m.p, key=b"\x77" * 32))
    m.post(pid, q, who=SUPPLIER2)
    purchase = get_purchase(m.c.view(), pid)
    assert purchase is not None
    with pytest.raises(NotDisputable, match="choose one with --source") as info:
        select_share(purchase)
    assert m.p.id.hex() in info.value.message and q.id.hex() in info.value.message
    p_record, q_record = get_dataset(m.c.view(), m.p.id), get_dataset(m.c.view(), q.id)
    assert p_record is not None and q_record is not None
    index = select_share(purchase, m.p.id)
    plan = plan_dispute(
        purchase,
        index,
        p_record,
        BUYER_PRIV,
        BlockArtifact(m.p.root, m.p.blocks.get),
        max_tx_bytes=1 << 20,
    )
    assert (
        plan.verdict == DisputeVerdict.OWNER_FAULT_CHECK
        and plan.refund == purchase.shares[0].amount
    )
    with pytest.raises(NotDisputable, match="not the share's encrypted source"):
        plan_dispute(
            purchase,
            index,
            q_record,
            BUYER_PRIV,
            BlockArtifact(q.root, q.blocks.get),
            max_tx_bytes=1 << 20,
        )
    send(m, plan.bodies)
    purchase = get_purchase(m.c.view(), pid)
    assert purchase is not None
    assert [s.state for s in purchase.shares] == [
        ShareState.OWNER_FAULT,
        ShareState.PAID,
        ShareState.KEY_POSTED,
    ]
    assert select_share(purchase) == 2  # now Q is the only one with a posted key
    with pytest.raises(NoFaultFound):
        plan_dispute(
            purchase,
            2,
            q_record,
            BUYER_PRIV,
            BlockArtifact(q.root, q.blocks.get),
            max_tx_bytes=1 << 20,
        )
