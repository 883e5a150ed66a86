"""The storage agent (``node.storage_agent``) on a ``MemoryNetwork`` and trio's mock clock, over a
real ``ChainService`` whose blocks the test commits (``chain.build`` + ``chain.commit``) from
the transactions the agents submit.

Checked: the provider refuses a replica whose root differs from the terms (and terms outside its
offer, and a node with no offer) with specific errors and keeps nothing; an upload resumes at the
offset the provider holds; an honest provider answers every challenge and is paid each epoch,
then deletes the replica; a provider whose replica was deleted is slashed and the owner refunded;
one replica cannot answer for two deals (the proofs of one fail on the other on chain); a signed
deal that never reaches the chain is forgotten after its signature expires.

Worker-thread work runs inline (the ``threads`` fixture) so the mock clock stays deterministic.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from node import crypto
from node.chain import ChainService
from node.consensus.txs import KNOWN_KINDS, VerifiedTransaction, verify_transaction
from node.economy import deals as dl
from node.economy.api import DEFAULT_ECONOMY_PARAMS, Role
from node.economy.roles import RoleRegister
from node.errors import InvalidTransaction, NeuroSeedError
from node.p2p.api import PeerId
from node.p2p.memory import MemoryHost, MemoryNetwork
from node.storage import MemoryKV
from node.storage import replica as rp
from node.storage.blobstore import BlobStore
from node.storage.importer import import_file, verify_cid_block
from node.storage_agent import (
    PROTOCOL_DEAL,
    UPLOAD_CHUNK_BYTES,
    DealAccepted,
    DealMessageKind,
    DealProposal,
    DealRequest,
    DealResponse,
    MalformedDealMessage,
    SignatureWindowRefused,
    StorageAgent,
    StorageSettings,
    UploadChunk,
    UploadQuery,
    UploadSessionError,
    UploadState,
    _decode_response,
    decode_request,
    encode_request,
)
from node.types import NSD, Address, Amount, Hash32
from rpc.methods.storage import list_deals
from tests.helpers import FEES, key, make_commit, make_genesis, open_chain, signed_tx
from tests.threads import InlineThreads

OWNER, PROVIDER, STRANGER = 1, 2, 3
EPOCH = 4  # heights per deal epoch
WINDOW = 3  # heights to answer a challenge
ECONOMY = replace(
    DEFAULT_ECONOMY_PARAMS,
    provider_bond=Amount(10 * NSD),
    deal_epoch_heights=EPOCH,
    deal_challenge_window=WINDOW,
    deal_challenge_percent=100,  # every epoch is challenged
    deal_segments_per_challenge=4,
    min_collateral_percent=100,
)
# One schedule per kind, cheap enough for any test transaction.
ALL_KIND_FEES = tuple(replace(FEES, kind=k) for k in sorted(KNOWN_KINDS))
FILE_BYTES = 700 << 10  # a replica of 1.4 MiB: two upload requests
PRICE_PER_GIB_EPOCH = 50 * NSD
COLLATERAL_PER_GIB = 100 * NSD


def _genesis():  # type: ignore[no-untyped-def]
    g = make_genesis(
        funded=4, validators=(0,), balance=10_000 * NSD, fees=ALL_KIND_FEES, max_tx_bytes=1 << 20
    )
    return replace(g, economy_params=ECONOMY)


def _artifact(n: int = FILE_BYTES, seed: int = 7) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += crypto.sha256(seed.to_bytes(8, "big") + counter.to_bytes(8, "big"))
        counter += 1
    return bytes(out[:n])


# --- the test world ------------------------------------------------------------------------------


@dataclass
class Pool:
    """A minimal mempool: what the agents submit, in order, until a block takes it."""

    chain: ChainService
    txs: list[VerifiedTransaction] = field(default_factory=list)

    async def submit(self, raw: bytes) -> Hash32:
        vtx = verify_transaction(raw)
        self.txs.append(vtx)
        return vtx.tx_id

    async def pending_nonce(self, address: Address) -> int:
        base = self.chain.read_view().get_account(address).nonce
        return base + sum(1 for v in self.txs if v.sender == address)


@dataclass
class World:
    chain: ChainService
    pool: Pool
    net: MemoryNetwork
    agents: dict[int, StorageAgent]
    hosts: dict[int, MemoryHost]
    blobs: BlobStore
    root: bytes
    rejected: list[tuple[bytes, InvalidTransaction]] = field(default_factory=list)

    async def block(self, extra: list[bytes] | None = None) -> int:
        """Commit a block with the pooled transactions (plus ``extra``), let the agents see it."""
        chain = self.chain
        height = chain.head_height + 1
        proposer = chain.validator_set().proposer(height, 0)
        last = None if chain.head is None else chain.store.get_commit(chain.head_height)
        candidates = [*self.pool.txs, *(verify_transaction(r) for r in extra or [])]
        self.pool.txs.clear()
        built = chain.build(0, proposer, last, candidates)
        self.rejected.extend(built.rejected)
        block = built.block
        commit = make_commit(block.hash(), height, 0, (0,), time_ms=block.header.time + 1000)
        chain.commit(block, commit)
        for agent in self.agents.values():
            agent.notify_block()
        await trio.sleep(0.2)  # the agents' loops run (mock time)
        return height

    async def blocks_until(self, done: Callable[[], bool], limit: int = 100) -> None:
        for _ in range(limit):
            if done():
                return
            await self.block()
        raise AssertionError("condition not reached")

    def state(self) -> _State:
        return _State(self.chain.read_view())

    def deal(self, deal_id: Hash32) -> dl.Deal:
        deal = dl.get_deal(self.state(), deal_id)
        assert deal is not None
        return deal

    def balance(self, who: int) -> int:
        return int(self.chain.read_view().get_account(key(who).address).balance)

    def nonce(self, who: int) -> int:
        return int(self.chain.read_view().get_account(key(who).address).nonce)

    async def tx(self, who: int, body: object) -> None:
        raw = signed_tx(who, body, nonce=await self.pool.pending_nonce(key(who).address))  # type: ignore[arg-type]
        await self.pool.submit(raw)


class _State:
    def __init__(self, view: object) -> None:
        self._view = view

    def get(self, k: bytes) -> bytes | None:
        return self._view.get_state(k)  # type: ignore[attr-defined,no-any-return]


SETTINGS = StorageSettings(poll_interval_s=0.1, sig_expiry_heights=20, request_timeout_s=5.0)


@pytest.fixture
async def world(tmp_path: Path, threads: InlineThreads) -> AsyncIterator[World]:
    chain = open_chain(MemoryKV(), _genesis())
    pool = Pool(chain)
    net = MemoryNetwork(seed=3, delay_ms=(1, 5))
    hosts = {i: net.add_host(f"n{i}") for i in (OWNER, PROVIDER, STRANGER)}
    blobs = BlobStore(tmp_path / "blobs", MemoryKV(), verify=verify_cid_block, quota_bytes=1 << 30)
    root = import_file(blobs, io.BytesIO(_artifact())).root
    agents = {
        i: StorageAgent(
            chain,
            hosts[i],
            pool.submit,
            key(i),
            tmp_path / f"node{i}",
            SETTINGS,
            blobs=blobs if i == OWNER else None,
            pending_nonce=pool.pending_nonce,
        )
        for i in (OWNER, PROVIDER, STRANGER)
    }
    w = World(chain, pool, net, agents, hosts, blobs, root)
    async with net, trio.open_nursery() as nursery:
        for agent in agents.values():
            await nursery.start(agent.run)
        # The provider registers its role and publishes an offer.
        await w.tx(PROVIDER, RoleRegister(int(Role.STORAGE_PROVIDER), b""))
        await w.tx(
            PROVIDER,
            dl.StorageOffer(1 << 30, Amount(PRICE_PER_GIB_EPOCH), Amount(COLLATERAL_PER_GIB), 100),
        )
        await w.block()
        assert dl.get_offer(w.state(), key(PROVIDER).address) is not None
        yield w
        nursery.cancel_scope.cancel()


def peer(w: World, who: int) -> PeerId:
    return w.hosts[who].peer_id


async def _terms_and_replica(
    w: World, tmp_path: Path, *, nonce: bytes = b"\x01" * 32, **changes: object
) -> tuple[dl.DealTerms, bytes]:
    """Terms the provider's offer accepts for the test artifact, and the replica's bytes."""
    data = _artifact()
    mask = rp.deal_mask_key(key(OWNER).secret, nonce)
    out = io.BytesIO()
    info = rp.build_replica(io.BytesIO(data), len(data), mask, out)
    offer = dl.get_offer(w.state(), key(PROVIDER).address)
    assert offer is not None
    price = dl.compute_min_price_per_epoch(offer, info.replica_size)
    terms = dl.DealTerms(
        root=w.root,
        owner=key(OWNER).address,
        provider=key(PROVIDER).address,
        replica_root=info.root,
        replica_size=info.replica_size,
        segment_count=info.segments,
        file_size=len(data),
        epochs=2,
        price_per_epoch=Amount(price),
        collateral=Amount(0),
        deal_nonce=Hash32(nonce),
        sig_expiry_height=w.chain.head_height + 20,
    )
    terms = replace(terms, collateral=Amount(dl.compute_min_collateral(offer, terms, 100)))
    return replace(terms, **changes), out.getvalue()  # type: ignore[arg-type]


async def _ask(w: World, kind: DealMessageKind, body: object) -> bytes:
    return await w.hosts[OWNER].request(
        peer(w, PROVIDER),
        PROTOCOL_DEAL,
        encode_request(kind, body),  # type: ignore[arg-type]
    )


async def _upload(w: World, terms: dl.DealTerms, replica: bytes, start: int = 0) -> int:
    deal_id = dl.compute_deal_id(terms)
    at = start
    while at < len(replica):
        piece = replica[at : at + UPLOAD_CHUNK_BYTES]
        got = _decode_response(
            await _ask(w, DealMessageKind.UPLOAD, UploadChunk(deal_id, at, piece)), UploadState
        )
        at = got.received
    return at


# --- negotiation -----------------------------------------------------------------------------------


async def test_provider_refuses_a_replica_whose_root_differs_from_the_terms(
    autojump_clock: MockClock, world: World, tmp_path: Path
) -> None:
    w = world
    good, replica = await _terms_and_replica(w, tmp_path)
    # Terms that commit to another root than the bytes sent (one bit flipped).
    bad_root = Hash32(bytes([good.replica_root[0] ^ 1]) + good.replica_root[1:])
    terms = replace(good, replica_root=bad_root)
    deal_id = dl.compute_deal_id(terms)
    state = _decode_response(
        await _ask(w, DealMessageKind.PROPOSE, DealProposal(terms)), UploadState
    )
    assert (state.received, state.total) == (0, len(replica))
    assert await _upload(w, terms, replica) == len(replica)
    with pytest.raises(rp.ReplicaRootMismatch):
        _decode_response(await _ask(w, DealMessageKind.FINISH, UploadQuery(deal_id)), DealAccepted)
    provider = w.agents[PROVIDER]
    assert provider.local_deals() == {}
    assert provider.upload_count() == 0
    assert provider.replicas is not None and provider.replicas.deal_ids() == []
    assert not any((tmp_path / f"node{PROVIDER}" / "replicas" / "uploads").iterdir())
    # The session is gone: finishing again is an upload error, not a signature.
    with pytest.raises(UploadSessionError):
        _decode_response(await _ask(w, DealMessageKind.FINISH, UploadQuery(deal_id)), DealAccepted)


async def test_provider_refuses_terms_outside_its_offer_before_any_upload(
    autojump_clock: MockClock, world: World, tmp_path: Path
) -> None:
    w = world
    good, _ = await _terms_and_replica(w, tmp_path)
    cases: list[tuple[dl.DealTerms, type[NeuroSeedError]]] = [
        (replace(good, price_per_epoch=Amount(good.price_per_epoch - 1)), dl.DealPriceTooLow),
        (replace(good, collateral=Amount(good.collateral - 1)), dl.DealCollateralTooLow),
        (replace(good, epochs=101), dl.DealTooLong),
        (replace(good, provider=key(STRANGER).address), dl.InvalidDealTerms),
        (replace(good, replica_size=good.replica_size + 4096), dl.InvalidDealTerms),
        (replace(good, sig_expiry_height=w.chain.head_height + 1), SignatureWindowRefused),
    ]
    for terms, error in cases:
        with pytest.raises(error):
            _decode_response(
                await _ask(w, DealMessageKind.PROPOSE, DealProposal(terms)), UploadState
            )
    assert w.agents[PROVIDER].upload_count() == 0


async def test_node_without_an_offer_refuses_deals(
    autojump_clock: MockClock, world: World, tmp_path: Path
) -> None:
    w = world
    terms, _ = await _terms_and_replica(w, tmp_path, provider=key(STRANGER).address)
    answer = await w.hosts[OWNER].request(
        peer(w, STRANGER),
        PROTOCOL_DEAL,
        encode_request(DealMessageKind.PROPOSE, DealProposal(terms)),
    )
    with pytest.raises(dl.OfferNotFound):
        _decode_response(answer, UploadState)
    # The owner side checks the chain first: no offer, no replica built, nothing sent.
    with pytest.raises(dl.OfferNotFound):
        await w.agents[OWNER].propose_deal(
            w.root, key(STRANGER).address, 2, provider_peer=peer(w, STRANGER)
        )
    assert w.pool.txs == []


async def test_malformed_requests_get_a_typed_error(
    autojump_clock: MockClock, world: World
) -> None:
    w = world
    for payload in (b"\x00", DealRequest(99, b"").encode(), DealRequest(2, b"\xc0").encode()):
        answer = await w.hosts[OWNER].request(peer(w, PROVIDER), PROTOCOL_DEAL, payload)
        response = DealResponse.decode(answer)
        assert response.code == MalformedDealMessage.code


async def test_upload_resumes_at_the_offset_the_provider_holds(
    autojump_clock: MockClock, world: World, tmp_path: Path
) -> None:
    w = world
    terms, replica = await _terms_and_replica(w, tmp_path)
    deal_id = dl.compute_deal_id(terms)
    _decode_response(await _ask(w, DealMessageKind.PROPOSE, DealProposal(terms)), UploadState)
    first = replica[:UPLOAD_CHUNK_BYTES]
    _decode_response(
        await _ask(w, DealMessageKind.UPLOAD, UploadChunk(deal_id, 0, first)), UploadState
    )
    # The owner lost track (say, a reconnect): proposing again tells it where to go on.
    again = _decode_response(
        await _ask(w, DealMessageKind.PROPOSE, DealProposal(terms)), UploadState
    )
    assert again.received == len(first)
    # A chunk at the wrong offset is refused with the expected offset.
    with pytest.raises(UploadSessionError) as info:
        _decode_response(
            await _ask(w, DealMessageKind.UPLOAD, UploadChunk(deal_id, 0, first)), UploadState
        )
    assert info.value.data == {"remote_code": UploadSessionError.code}
    # Finishing early is refused; finishing after the rest gives a valid signature.
    with pytest.raises(UploadSessionError):
        _decode_response(await _ask(w, DealMessageKind.FINISH, UploadQuery(deal_id)), DealAccepted)
    await _upload(w, terms, replica, start=again.received)
    accepted = _decode_response(
        await _ask(w, DealMessageKind.FINISH, UploadQuery(deal_id)), DealAccepted
    )
    chain_id = w.chain.chain.chain_id
    assert dl.deal_terms_signer(chain_id, terms, accepted.signature) == key(PROVIDER).address
    # A lost answer: FINISH again returns the signature, without a second upload.
    repeat = _decode_response(
        await _ask(w, DealMessageKind.FINISH, UploadQuery(deal_id)), DealAccepted
    )
    assert repeat.signature == accepted.signature
    assert list(w.agents[PROVIDER].local_deals()) == [deal_id]


# --- challenges on chain -------------------------------------------------------------------------


async def _make_deal(w: World, epochs: int) -> dl.DealOutcome:
    outcome = await w.agents[OWNER].propose_deal(
        w.root, key(PROVIDER).address, epochs, provider_peer=peer(w, PROVIDER)
    )
    await w.block()  # the DealCreate
    assert dl.get_deal(w.state(), outcome.deal_id) is not None, w.rejected
    return outcome


async def test_honest_provider_answers_every_challenge_and_is_paid_each_epoch(
    autojump_clock: MockClock,
    world: World,
) -> None:
    w = world
    provider_before = w.balance(PROVIDER)
    owner_before = w.balance(OWNER)
    outcome = await _make_deal(w, epochs=3)
    deal_id, terms = outcome.deal_id, outcome.terms
    assert terms.file_size == FILE_BYTES and terms.owner == key(OWNER).address
    # The owner paid the escrow, the provider locked the collateral.
    assert owner_before - w.balance(OWNER) > 3 * terms.price_per_epoch
    paid_seen: list[int] = []
    challenged_epochs: set[int] = set()

    def done() -> bool:
        deal = w.deal(deal_id)
        if deal.challenge is not None:
            challenged_epochs.add(deal.challenge.epoch)
        if not paid_seen or paid_seen[-1] != deal.epochs_paid:
            paid_seen.append(deal.epochs_paid)
        return deal.state != dl.DealState.ACTIVE

    await w.blocks_until(done, limit=3 * EPOCH + 10)
    deal = w.deal(deal_id)
    assert deal.state == dl.DealState.COMPLETED
    assert deal.epochs_paid == 3
    assert paid_seen == [0, 1, 2, 3]  # one epoch at a time
    assert challenged_epochs == {0, 1, 2}  # every epoch was challenged, and answered
    assert not [r for r in w.rejected if "DealProof" in str(r)]
    # Paid 3 epochs and the collateral back, less the fees of its three proofs.
    fees = provider_before + 3 * terms.price_per_epoch - w.balance(PROVIDER)
    assert 0 < fees < 3 * 10**8
    # The ended deal's replica is deleted.
    await w.block()
    assert w.agents[PROVIDER].local_deals() == {}
    assert w.agents[PROVIDER].replicas is not None
    assert w.agents[PROVIDER].replicas.deal_ids() == []


async def test_provider_that_deleted_its_replica_is_slashed(
    autojump_clock: MockClock, world: World, tmp_path: Path
) -> None:
    w = world
    outcome = await _make_deal(w, epochs=3)
    deal_id, terms = outcome.deal_id, outcome.terms
    owner_after_create = w.balance(OWNER)
    provider_after_create = w.balance(PROVIDER)
    # The provider deletes its replica (it keeps running and keeps its terms).
    shutil.rmtree(tmp_path / f"node{PROVIDER}" / "replicas" / "deals" / deal_id.hex())
    await w.blocks_until(lambda: w.deal(deal_id).state != dl.DealState.ACTIVE, limit=EPOCH + 10)
    deal = w.deal(deal_id)
    assert deal.state == dl.DealState.SLASHED
    assert deal.epochs_paid == 0 and deal.collateral == 0 and deal.escrow == 0
    # The owner got the whole escrow back; the provider got nothing and lost its collateral.
    assert w.balance(OWNER) - owner_after_create == 3 * terms.price_per_epoch
    assert w.balance(PROVIDER) == provider_after_create
    await w.block()
    assert w.agents[PROVIDER].local_deals() == {}


async def test_one_replica_cannot_answer_for_two_deals(
    autojump_clock: MockClock, world: World, tmp_path: Path
) -> None:
    w = world
    a = await _make_deal(w, epochs=2)
    b = await _make_deal(w, epochs=2)
    assert a.terms.root == b.terms.root and a.terms.replica_root != b.terms.replica_root
    store = tmp_path / f"node{PROVIDER}" / "replicas" / "deals"
    # A cheating provider keeps one copy: deal B's directory now holds deal A's replica.
    shutil.rmtree(store / b.deal_id.hex())
    shutil.copytree(store / a.deal_id.hex(), store / b.deal_id.hex())
    # Proofs from A's replica do not verify against B's root, whatever the segment.
    with rp.ProofTree(store / b.deal_id.hex() / "replica", store / b.deal_id.hex() / "tree") as t:
        for index in (0, 1, t.segments // 2, t.segments - 1):
            assert not rp.verify_segment(
                b.terms.replica_root, b.terms.segment_count, t.prove(index)
            )
    await w.blocks_until(
        lambda: (
            w.deal(b.deal_id).state != dl.DealState.ACTIVE
            and w.deal(a.deal_id).state != dl.DealState.ACTIVE
        ),
        limit=2 * EPOCH + 10,
    )
    assert w.deal(a.deal_id).state == dl.DealState.COMPLETED
    assert w.deal(b.deal_id).state == dl.DealState.SLASHED
    # The agent did answer B with A's segments; the chain refused that proof.
    assert any(isinstance(exc, dl.InvalidStorageProof) for _, exc in w.rejected)


async def test_signed_deal_that_never_reaches_the_chain_is_forgotten(
    autojump_clock: MockClock, world: World, tmp_path: Path
) -> None:
    w = world
    terms, replica = await _terms_and_replica(w, tmp_path)
    deal_id = dl.compute_deal_id(terms)
    _decode_response(await _ask(w, DealMessageKind.PROPOSE, DealProposal(terms)), UploadState)
    await _upload(w, terms, replica)
    _decode_response(await _ask(w, DealMessageKind.FINISH, UploadQuery(deal_id)), DealAccepted)
    assert deal_id in w.agents[PROVIDER].local_deals()
    await w.blocks_until(lambda: w.chain.head_height > terms.sig_expiry_height + 1, limit=40)
    assert w.agents[PROVIDER].local_deals() == {}
    assert w.agents[PROVIDER].replicas is not None
    assert not w.agents[PROVIDER].replicas.has_replica(deal_id)


async def test_idle_upload_sessions_are_dropped(
    autojump_clock: MockClock, world: World, tmp_path: Path
) -> None:
    w = world
    terms, replica = await _terms_and_replica(w, tmp_path)
    deal_id = dl.compute_deal_id(terms)
    _decode_response(await _ask(w, DealMessageKind.PROPOSE, DealProposal(terms)), UploadState)
    _decode_response(
        await _ask(
            w, DealMessageKind.UPLOAD, UploadChunk(deal_id, 0, replica[:UPLOAD_CHUNK_BYTES])
        ),
        UploadState,
    )
    assert w.agents[PROVIDER].upload_count() == 1
    await trio.sleep(SETTINGS.upload_idle_s * 1.5)
    assert w.agents[PROVIDER].upload_count() == 0
    assert not any((tmp_path / f"node{PROVIDER}" / "replicas" / "uploads").iterdir())


async def test_owner_agent_resumes_an_interrupted_upload(
    autojump_clock: MockClock, world: World
) -> None:
    w = world
    provider = w.agents[PROVIDER]
    seen: list[tuple[DealMessageKind, int]] = []
    dropped: list[int] = []

    async def lossy(peer_id: PeerId, payload: bytes) -> bytes:
        kind, body = decode_request(payload)
        offset = body.offset if isinstance(body, UploadChunk) else -1
        seen.append((kind, offset))
        if kind == DealMessageKind.UPLOAD and offset > 0 and not dropped:
            # The second chunk is lost on the way: the owner times out, asks where the
            # provider is (PROPOSE) and sends it again.
            dropped.append(offset)
            await trio.sleep(SETTINGS.request_timeout_s * 2)
            return b"late"
        return await provider._on_request(peer_id, payload)

    w.hosts[PROVIDER].set_handler(PROTOCOL_DEAL, lossy)
    outcome = await _make_deal(w, epochs=1)
    assert dropped == [UPLOAD_CHUNK_BYTES]
    uploads = [offset for kind, offset in seen if kind == DealMessageKind.UPLOAD]
    assert uploads == [0, UPLOAD_CHUNK_BYTES, UPLOAD_CHUNK_BYTES]
    assert [k for k, _ in seen].count(DealMessageKind.PROPOSE) == 2
    assert w.deal(outcome.deal_id).state == dl.DealState.ACTIVE


async def test_list_deals_filters_and_pages(autojump_clock: MockClock, world: World) -> None:
    w = world
    a = await _make_deal(w, epochs=2)
    b = await _make_deal(w, epochs=2)
    view = w.chain.read_view()
    ids = sorted([a.deal_id, b.deal_id])
    found, cursor = list_deals(view, provider=key(PROVIDER).address, limit=1)
    assert [d for d, _ in found] == ids[:1] and cursor == ids[0]
    found, cursor = list_deals(view, provider=key(PROVIDER).address, cursor=cursor, limit=1)
    assert [d for d, _ in found] == ids[1:] and cursor == ids[1]
    found, cursor = list_deals(view, provider=key(PROVIDER).address, cursor=cursor, limit=1)
    assert found == [] and cursor is None
    assert list_deals(view, owner=key(STRANGER).address)[0] == []
    assert len(list_deals(view, owner=key(OWNER).address, state="active")[0]) == 2
    # A scan bound: one entry read per call still makes progress through the cursor.
    found, cursor = list_deals(view, owner=key(STRANGER).address, max_scan=1)
    assert found == [] and cursor == ids[0]


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_storage_commands_parse_and_build_the_offer(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from node import cli, cli_storage

    assert cli_storage.parse_size("10GiB", what="x") == 10 << 30
    assert cli_storage.parse_size("2 TB", what="x") == 2 * 10**12
    assert cli_storage.parse_size("4096", what="x") == 4096
    for bad in ("", "0", "-1", "1.5GiB", "10 parsecs"):
        with pytest.raises(cli.CliError):
            cli_storage.parse_size(bad, what="--capacity")

    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    cli_storage.register(commands)
    sent: list[tuple[object, list[tuple[str, str, object, object]]]] = []
    monkeypatch.setattr(
        cli, "_sign_send_wait", lambda args, body, fields, **kw: sent.append((body, fields)) or 0
    )
    args = parser.parse_args(
        [
            "storage",
            "offer",
            "--capacity",
            "1GiB",
            "--price-per-gib-epoch",
            "0.5",
            "--collateral-per-gib",
            "2",
            "--max-epochs",
            "7",
            "--dev-key",
            "2",
        ]
    )
    assert args.handler(args) == 0
    body, fields = sent[0]
    assert body == dl.StorageOffer(1 << 30, Amount(NSD // 2), Amount(2 * NSD), 7)
    assert ("capacityBytes", str(1 << 30)) in [(f[0], f[1]) for f in fields]
    args = parser.parse_args(["storage", "withdraw", "--dev-key", "2"])
    assert args.handler(args) == 0 and sent[1][0] == dl.OfferWithdraw()
    args = parser.parse_args(
        ["storage", "deal", "bafkqaaa", "--provider", "0x" + "11" * 20, "--epochs", "0"]
    )
    with pytest.raises(cli.CliError):
        args.handler(args)  # checked before the node is called
    args = parser.parse_args(["storage", "status", "0x" + "22" * 32])
    assert args.deal_id == "0x" + "22" * 32


async def test_a_restarted_provider_keeps_its_signed_deals(
    autojump_clock: MockClock, world: World, tmp_path: Path
) -> None:
    w = world
    outcome = await _make_deal(w, epochs=2)
    data_dir = tmp_path / f"node{PROVIDER}"
    (data_dir / "replicas" / "terms" / ("ab" * 32)).write_bytes(b"orphan")  # no replica
    again = StorageAgent(w.chain, None, w.pool.submit, key(PROVIDER), data_dir, SETTINGS)
    again.open()
    assert again.local_deals() == {outcome.deal_id: outcome.terms}
    assert sorted(p.name for p in (data_dir / "replicas" / "terms").iterdir()) == [
        outcome.deal_id.hex()
    ]


def test_rpc_peer_id_parsing() -> None:
    from rpc.errors import InvalidParams
    from rpc.methods.storage import _parse_peer

    assert _parse_peer("116sBRWytUdB9gwT") == b"\x00\x00hello peer"  # base58, leading zeros
    assert _parse_peer("0x0102") == b"\x01\x02"
    for bad in ("0OIl", "", 5, "1" * 300):
        with pytest.raises(InvalidParams):
            _parse_peer(bad)
