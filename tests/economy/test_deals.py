"""Storage offers, deals, per-epoch challenges and slashing (node/economy/deals.py, DESIGN §9).

Pure transition tests: a genesis state in an ``Overlay``, signed transactions decoded by
``verify_transaction`` and applied through the kinds' handlers (each in a child overlay, so a
rejected one must leave nothing written), and ``deals.end_block`` run at the end of every block
with a deterministic parent hash. Replicas are real: built with
``node.storage.replica.build_replica`` and answered from a ``ReplicaStore`` the way a provider's
node would, reading ``deal_status``. The last test runs deals through blocks built and committed
by a ``ChainService`` (the wired transition, fees, the real parent hash as seed).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from node import crypto
from node.consensus.state import (
    NS_ACCOUNT,
    NS_VALIDATOR,
    SUPPLY_KEY,
    Account,
    DictView,
    Overlay,
    StateView,
    Supply,
    ValidatorBond,
    get_account,
)
from node.consensus.transition import BlockContext
from node.consensus.txs import VerifiedTransaction, verify_transaction
from node.economy import deals
from node.economy.api import (
    DEFAULT_ECONOMY_PARAMS,
    NS_DEAL,
    NS_ROLES,
    EconomyKind,
    EconomyParams,
    Role,
)
from node.economy.deals import (
    ChallengeExpired,
    DealCollateralTooLow,
    DealCreate,
    DealExists,
    DealNotFound,
    DealOwnerMismatch,
    DealPriceTooLow,
    DealProof,
    DealSignatureExpired,
    DealSignatureInvalid,
    DealState,
    DealTerms,
    DealTooLong,
    InvalidDealTerms,
    InvalidOffer,
    InvalidStorageProof,
    NoOpenChallenge,
    NotDealProvider,
    OfferCapacityExceeded,
    OfferNotFound,
    OfferWithdraw,
    OwnerCannotPay,
    ProviderCannotCoverCollateral,
    StorageOffer,
    WrongChallengeEpoch,
    WrongChallengeIndexes,
)
from node.economy.roles import (
    HANDLERS as ROLE_HANDLERS,
)
from node.economy.roles import (
    MissingRole,
    RoleHasObligations,
    RoleRegister,
    RoleResign,
    RoleSet,
    get_role,
)
from node.encoding import Record
from node.errors import InvalidBody, NeuroSeedError
from node.genesis import build_genesis_state
from node.storage.memory import MemoryKV
from node.storage.replica import (
    ReplicaStore,
    SegmentProof,
    build_replica,
    challenge_indexes,
    deal_mask_key,
    replica_size,
    segment_count,
)
from node.storage.unixfs import cid_of_chunks
from node.types import Amount, Hash32, Signature
from tests.helpers import (
    ALL_FEES,
    CHAIN_ID,
    FEES,
    addr,
    commit_next,
    key,
    make_genesis,
    open_chain,
    signed_tx,
)

OWNER, PROVIDER, OTHER, OWNER2 = 1, 2, 3, 4
POOR_OWNER, POOR_PROVIDER = 5, 6
PROVIDER_BOND = 1_000
GIB = 1 << 30
FILE = bytes((i * 7 + 3) % 251 for i in range(3_000))  # 2 stripes: 8 KiB replica, 32 segments
OWNER_SECRET = b"owner secret of dev key 1 ......"

# Every kind this module and roles.py handle.
HANDLERS = {h.kind: h for h in (*deals.HANDLERS, *ROLE_HANDLERS)}

PARAMS = replace(
    DEFAULT_ECONOMY_PARAMS,
    provider_bond=Amount(PROVIDER_BOND),
    deal_epoch_heights=10,
    deal_challenge_window=3,
    deal_challenge_percent=100,
    deal_segments_per_challenge=4,
    max_deal_epochs=50,
    min_collateral_percent=100,
    max_challenges_per_block=64,
)
# Offer: 1 unit per replica byte per epoch, 4 units of collateral per replica byte.
OFFER = StorageOffer(
    capacity_bytes=64 * 1024,
    price_per_gib_epoch=Amount(GIB),
    collateral_per_gib=Amount(4 * GIB),
    max_epochs=20,
)
PRICE = 10_000  # ≥ 8 192 (the offer's price for 8 KiB of replica)
COLLATERAL = 40_000  # ≥ 32 768 (offer) and ≥ 100 % of 3 epochs × PRICE

FEE = 100_000  # covers any transaction here (a DealProof of 4 segments costs 41 903)
GEN = make_genesis(
    funded=4,
    validators=(0,),
    fees=(*ALL_FEES, *(replace(FEES, kind=int(k), base=Amount(3_000 + k)) for k in EconomyKind)),
    balances={
        POOR_OWNER: FEE + 3 * PRICE - 1,
        POOR_PROVIDER: PROVIDER_BOND + 2 * FEE + COLLATERAL - 1,
    },
)
PARENT_DOMAIN = b"test parent hash"


def parent_hash_of(height: int) -> Hash32:
    """The (made-up, deterministic) hash of the block before ``height``."""
    return crypto.sha256(PARENT_DOMAIN + height.to_bytes(8, "big"))


def make_ctx(height: int) -> BlockContext:
    return BlockContext(
        chain=GEN.chain_params,
        params=GEN.votable_params,
        height=height,
        time_ms=GEN.chain_params.genesis_time + 1_000 * height,
        proposer=addr(0),
        parent_hash=parent_hash_of(height),
    )


# --- the harness ---------------------------------------------------------------------------------


@dataclass
class Chain:
    """A state after genesis, the height of the block being built, and the fees charged so far."""

    params: EconomyParams = PARAMS
    base: dict[bytes, bytes] = field(init=False)
    view: Overlay = field(init=False)
    height: int = 1
    nonces: dict[int, int] = field(default_factory=dict)
    fees: int = 0

    def __post_init__(self) -> None:
        self.base = build_genesis_state(replace(GEN, economy_params=self.params))
        self.view = Overlay(DictView(self.base))

    def vtx(self, sender: int, body: Record) -> VerifiedTransaction:
        """The signed transaction, decoded and checked as a node receives it."""
        nonce = self.nonces.get(sender, 0)
        return verify_transaction(signed_tx(sender, body, nonce=nonce, fee=FEE))

    def send(self, sender: int, body: Record) -> None:
        """Apply a transaction in the current block; a rejection must write nothing."""
        vtx = self.vtx(sender, body)
        handler = HANDLERS[vtx.tx.kind]
        child = self.view.child()
        try:
            handler.apply(child, vtx, make_ctx(self.height))
        except NeuroSeedError:
            assert dict(child.changes) == {}, "a rejected transaction wrote state"
            raise
        child.merge_into_parent()
        self.nonces[sender] = self.nonces.get(sender, 0) + 1
        self.fees += vtx.tx.fee

    def end(self) -> None:
        """End the current block (the deal queue) and start the next."""
        deals.end_block(self.view, make_ctx(self.height))
        self.height += 1

    def run_until(self, height: int) -> None:
        """End blocks until ``height`` is the block being built."""
        while self.height < height:
            self.end()

    def balance(self, who: int) -> int:
        return get_account(self.view, addr(who)).balance

    def obligations(self, who: int) -> int:
        entry = get_role(self.view, addr(who), Role.STORAGE_PROVIDER)
        assert entry is not None
        return entry.obligations

    def deal(self, deal_id: Hash32) -> deals.Deal:
        deal = deals.get_deal(self.view, deal_id)
        assert deal is not None
        return deal

    def state(self) -> dict[bytes, bytes]:
        full = dict(self.base)
        for k, v in self.view.changes.items():
            if v is None:
                full.pop(k, None)
            else:
                full[k] = v
        return full


def total_value(chain: Chain) -> int:
    """Every unit of the issued supply, wherever it sits now: balances, validator bonds, role
    bonds, deal escrow and collateral, burned, and the fees charged (which the transition would
    burn or tip)."""
    state = chain.state()
    total = 0
    for k, v in state.items():
        if k.startswith(NS_ACCOUNT):
            total += Account.decode(v).balance
        elif k.startswith(NS_VALIDATOR):
            total += ValidatorBond.decode(v).amount
        elif k.startswith(NS_ROLES):
            total += sum(e.bond for e in RoleSet.decode(v).entries)
        elif k.startswith(NS_DEAL):
            deal = deals.Deal.decode(v)
            total += deal.escrow + deal.collateral
    return total + Supply.decode(state[SUPPLY_KEY]).burned + chain.fees


def issued(chain: Chain) -> int:
    return Supply.decode(chain.base[SUPPLY_KEY]).issued


@dataclass
class Replica:
    """An owner-built replica of ``FILE`` for one deal nonce."""

    nonce: Hash32
    data: bytes
    root: Hash32


def make_replica(nonce: bytes, data: bytes = FILE) -> Replica:
    out = io.BytesIO()
    info = build_replica(io.BytesIO(data), len(data), deal_mask_key(OWNER_SECRET, nonce), out)
    return Replica(Hash32(nonce), out.getvalue(), info.root)


ROOT_CID = bytes(cid_of_chunks([FILE]))


def make_terms(
    replica: Replica,
    *,
    owner: int = OWNER,
    provider: int = PROVIDER,
    epochs: int = 3,
    price: int = PRICE,
    collateral: int = COLLATERAL,
    expiry: int = 100,
) -> DealTerms:
    size = replica_size(len(FILE))
    return DealTerms(
        root=ROOT_CID,
        owner=addr(owner),
        provider=addr(provider),
        replica_root=replica.root,
        replica_size=size,
        segment_count=segment_count(size),
        file_size=len(FILE),
        epochs=epochs,
        price_per_epoch=Amount(price),
        collateral=Amount(collateral),
        deal_nonce=replica.nonce,
        sig_expiry_height=expiry,
    )


def signed_deal(terms: DealTerms, signer: int | None = None) -> DealCreate:
    k = key(PROVIDER if signer is None else signer)
    return DealCreate(terms, deals.sign_deal_terms(k, CHAIN_ID, terms))


class ProviderNode:
    """The provider's side: stores replicas after checking their roots, answers challenges."""

    def __init__(self, root: Path) -> None:
        self.store = ReplicaStore(root)

    def accept(self, terms: DealTerms, replica: Replica) -> Hash32:
        deal_id = deals.compute_deal_id(terms)
        self.store.put_replica(
            deal_id, io.BytesIO(replica.data), terms.replica_size, terms.replica_root
        ).close()
        return deal_id

    def answer(self, chain: Chain, deal_id: Hash32, *, as_deal: Hash32 | None = None) -> DealProof:
        return self.answer_from(chain.view, deal_id, as_deal=as_deal)

    def answer_from(
        self, view: StateView, deal_id: Hash32, *, as_deal: Hash32 | None = None
    ) -> DealProof:
        """The proof for ``deal_id``'s open challenge, made from the replica stored for
        ``as_deal`` (default: the deal's own)."""
        status = deals.deal_status(view, deal_id)
        assert status is not None and status.challenge_epoch is not None
        with self.store.get_proof_tree(deal_id if as_deal is None else as_deal) as tree:
            proofs = tree.prove_many(status.challenge_indexes)
        return DealProof(deal_id, status.challenge_epoch, proofs)


def provider_ready(chain: Chain, who: int = PROVIDER, offer: StorageOffer = OFFER) -> None:
    chain.send(who, RoleRegister(int(Role.STORAGE_PROVIDER)))
    chain.send(who, offer)


@pytest.fixture
def node(tmp_path: Path) -> ProviderNode:
    return ProviderNode(tmp_path / "provider")


def open_deal(
    chain: Chain, node: ProviderNode, nonce: bytes = b"\x01" * 32, **terms_kw: int
) -> tuple[Hash32, Replica]:
    replica = make_replica(nonce)
    terms = make_terms(replica, **terms_kw)
    deal_id = node.accept(terms, replica)
    chain.send(terms_kw.get("owner", OWNER), signed_deal(terms))
    return deal_id, replica


def answer_open_challenges(chain: Chain, node: ProviderNode, deal_ids: list[Hash32]) -> int:
    """Answer every open challenge of ``deal_ids`` in the current block; returns how many."""
    answered = 0
    for deal_id in deal_ids:
        status = deals.deal_status(chain.view, deal_id)
        assert status is not None
        if status.challenge_epoch is not None:
            chain.send(PROVIDER, node.answer(chain, deal_id))
            answered += 1
    return answered


# --- honest provider -----------------------------------------------------------------------------


def test_honest_provider_is_paid_every_epoch_and_gets_its_collateral_back(
    node: ProviderNode,
) -> None:
    chain = Chain()
    start_total = total_value(chain)
    provider_ready(chain)
    owner_before, provider_before = chain.balance(OWNER), chain.balance(PROVIDER)
    deal_id, _ = open_deal(chain, node)
    start = chain.height
    assert chain.balance(OWNER) == owner_before - 3 * PRICE - FEE
    assert chain.balance(PROVIDER) == provider_before - COLLATERAL
    assert chain.obligations(PROVIDER) == 1
    assert deals.get_provider_load(chain.view, addr(PROVIDER)) == deals.ProviderLoad(1, 8192)

    proofs_sent = 0
    for epoch in range(3):
        boundary = start + (epoch + 1) * PARAMS.deal_epoch_heights
        assert chain.deal(deal_id).next_boundary == boundary
        chain.run_until(boundary)
        chain.end()  # the boundary block challenges (percent = 100)
        status = deals.deal_status(chain.view, deal_id)
        assert status is not None
        assert status.challenge_epoch == epoch
        assert status.challenge_due_height == boundary + PARAMS.deal_challenge_window
        assert len(status.challenge_indexes) == PARAMS.deal_segments_per_challenge
        assert status.epochs_paid == epoch
        proofs_sent += answer_open_challenges(chain, node, [deal_id])
        assert chain.deal(deal_id).epochs_paid == epoch + 1
        assert total_value(chain) == start_total
    assert proofs_sent == 3

    deal = chain.deal(deal_id)
    assert deal.state == DealState.COMPLETED
    assert (deal.escrow, deal.collateral, deal.challenge) == (0, 0, None)
    assert chain.balance(PROVIDER) == provider_before + 3 * PRICE - 3 * FEE
    assert chain.balance(OWNER) == owner_before - 3 * PRICE - FEE
    assert chain.obligations(PROVIDER) == 0
    assert deals.get_provider_load(chain.view, addr(PROVIDER)) == deals.ProviderLoad(0, 0)
    # Nothing left in the queue for this deal: many more blocks change nothing.
    settled = chain.state()
    chain.run_until(chain.height + 40)
    assert {k: v for k, v in chain.state().items() if k.startswith(NS_DEAL)} == {
        k: v for k, v in settled.items() if k.startswith(NS_DEAL)
    }
    # The provider may now resign and get its bond back.
    chain.send(PROVIDER, RoleResign(int(Role.STORAGE_PROVIDER)))
    assert total_value(chain) == start_total == issued(chain)


def test_unchallenged_epochs_are_paid_at_their_boundary(node: ProviderNode) -> None:
    chain = Chain(params=replace(PARAMS, deal_challenge_percent=0))
    provider_ready(chain)
    deal_id, _ = open_deal(chain, node, epochs=2)
    start = chain.height
    before = chain.balance(PROVIDER)
    chain.run_until(start + 10)
    assert chain.balance(PROVIDER) == before  # epoch 0 ends in block start + 10
    chain.end()
    assert chain.balance(PROVIDER) == before + PRICE
    assert chain.deal(deal_id).challenge is None
    chain.run_until(start + 21)
    assert chain.balance(PROVIDER) == before + 2 * PRICE + COLLATERAL
    assert chain.deal(deal_id).state == DealState.COMPLETED
    assert chain.deal(deal_id).end_height == start + 20


def test_challenges_follow_the_previous_block_hash(node: ProviderNode) -> None:
    """At 50 %, which deals are challenged is sha256(parent_hash ‖ deal_id), and the indexes
    are challenge_indexes(parent_hash, deal_id, …)."""
    chain = Chain(params=replace(PARAMS, deal_challenge_percent=50))
    provider_ready(chain, offer=replace(OFFER, capacity_bytes=1 << 20))
    ids = [open_deal(chain, node, bytes([i]) * 32, epochs=1)[0] for i in range(12)]
    boundary = chain.height + 10
    chain.run_until(boundary)
    chain.end()
    seed = parent_hash_of(boundary)
    challenged = [d for d in ids if deals.is_challenged(seed, d, 50)]
    assert 0 < len(challenged) < len(ids)  # this seed splits them
    for d in ids:
        status = deals.deal_status(chain.view, d)
        assert status is not None
        if d in challenged:
            assert status.challenge_indexes == challenge_indexes(seed, d, 32, 4)
            assert status.state == DealState.ACTIVE
        else:
            assert status.challenge_epoch is None
            assert status.state == DealState.COMPLETED  # its only epoch was paid at once


# --- a provider that lost its replica ------------------------------------------------------------


def test_deleted_replica_is_slashed_and_the_owner_refunded(node: ProviderNode) -> None:
    chain = Chain()
    start_total = total_value(chain)
    provider_ready(chain)
    deal_id, _ = open_deal(chain, node, epochs=3)
    start = chain.height
    owner_after_deal = chain.balance(OWNER)
    burned_before = Supply.decode(chain.view.get(SUPPLY_KEY) or b"").burned

    chain.run_until(start + 10)
    chain.end()
    answer_open_challenges(chain, node, [deal_id])  # epoch 0 answered and paid
    provider_paid = chain.balance(PROVIDER)

    node.store.remove_replica(deal_id)  # the provider deletes the replica
    chain.run_until(start + 20)
    chain.end()
    challenge = chain.deal(deal_id).challenge
    assert challenge is not None and challenge.epoch == 1
    with pytest.raises(Exception, match="no replica"):
        node.answer(chain, deal_id)  # it cannot produce the segments
    chain.run_until(challenge.due_height)
    assert chain.deal(deal_id).state == DealState.ACTIVE  # the due block may still carry it
    chain.end()

    deal = chain.deal(deal_id)
    assert deal.state == DealState.SLASHED
    assert deal.end_height == challenge.due_height
    assert (deal.escrow, deal.collateral) == (0, 0)
    assert Supply.decode(chain.view.get(SUPPLY_KEY) or b"").burned == burned_before + COLLATERAL
    assert chain.balance(OWNER) == owner_after_deal + 2 * PRICE  # epochs 1 and 2 refunded
    assert chain.balance(PROVIDER) == provider_paid  # no collateral back
    assert chain.obligations(PROVIDER) == 0
    assert deals.get_provider_load(chain.view, addr(PROVIDER)) == deals.ProviderLoad(0, 0)
    status = deals.deal_status(chain.view, deal_id)
    assert status is not None and status.challenge_epoch is None
    assert total_value(chain) == start_total


def test_a_wrong_answer_is_rejected_and_a_right_one_still_accepted_in_time(
    node: ProviderNode,
) -> None:
    chain = Chain()
    provider_ready(chain)
    deal_id, _ = open_deal(chain, node)
    chain.run_until(chain.height + 10)
    chain.end()
    good = node.answer(chain, deal_id)
    flipped = SegmentProof(
        good.proofs[0].index,
        bytes([good.proofs[0].segment[0] ^ 1]) + good.proofs[0].segment[1:],
        good.proofs[0].path,
    )
    with pytest.raises(InvalidStorageProof):
        chain.send(PROVIDER, replace(good, proofs=(flipped, *good.proofs[1:])))
    bad_path = replace(good.proofs[-1], path=(*good.proofs[-1].path[:-1], Hash32(bytes(32))))
    with pytest.raises(InvalidStorageProof):
        chain.send(PROVIDER, replace(good, proofs=(*good.proofs[:-1], bad_path)))
    chain.end()
    chain.send(PROVIDER, good)
    assert chain.deal(deal_id).epochs_paid == 1


# --- one replica, two deals ----------------------------------------------------------------------


def test_one_replica_cannot_answer_for_two_deals(node: ProviderNode) -> None:
    """Two deals of the same file, each with its own mask: proofs made from deal A's replica do
    not verify for deal B, whose own replica answers fine."""
    chain = Chain()
    provider_ready(chain)
    a_id, a_replica = open_deal(chain, node, b"\x0a" * 32)
    b_id, b_replica = open_deal(chain, node, b"\x0b" * 32)
    assert a_replica.root != b_replica.root
    assert a_replica.data != b_replica.data
    chain.run_until(chain.height + 10)
    chain.end()
    challenge_b = chain.deal(b_id).challenge
    assert challenge_b is not None
    from_a = node.answer(chain, b_id, as_deal=a_id)
    assert tuple(p.index for p in from_a.proofs) == challenge_b.indexes
    with pytest.raises(InvalidStorageProof):
        chain.send(PROVIDER, from_a)
    chain.send(PROVIDER, node.answer(chain, b_id))
    chain.send(PROVIDER, node.answer(chain, a_id))
    assert chain.deal(a_id).epochs_paid == chain.deal(b_id).epochs_paid == 1


# --- the per-block cap ---------------------------------------------------------------------------


def test_due_entries_beyond_the_cap_roll_over_to_the_next_blocks(node: ProviderNode) -> None:
    chain = Chain(params=replace(PARAMS, deal_challenge_percent=0, max_challenges_per_block=2))
    provider_ready(chain, offer=replace(OFFER, capacity_bytes=1 << 20))
    ids = [open_deal(chain, node, bytes([i]) * 32, epochs=1)[0] for i in range(5)]
    boundary = chain.height + 10
    chain.run_until(boundary)
    paid_after = []
    for _ in range(4):
        chain.end()
        paid_after.append(sum(chain.deal(d).state == DealState.COMPLETED for d in ids))
    assert paid_after == [2, 4, 5, 5]
    assert [chain.deal(d).end_height for d in ids] == [
        boundary,
        boundary,
        boundary + 1,
        boundary + 1,
        boundary + 2,
    ]


def test_a_capped_deadline_still_refuses_a_late_answer(node: ProviderNode) -> None:
    """With a cap of one entry per block, two deals due together are challenged in successive
    blocks and their deadlines are taken late; an answer after the due height is refused even
    before the deadline entry is taken, and the deal is slashed when it is."""
    chain = Chain(params=replace(PARAMS, max_challenges_per_block=1))
    provider_ready(chain)
    a_id, _ = open_deal(chain, node, b"\x0a" * 32)
    b_id, _ = open_deal(chain, node, b"\x0b" * 32)
    boundary = chain.height + 10
    chain.run_until(boundary + 2)
    a_ch, b_ch = chain.deal(a_id).challenge, chain.deal(b_id).challenge
    assert a_ch is not None and b_ch is not None
    assert (a_ch.issued_height, b_ch.issued_height) == (boundary, boundary + 1)
    chain.run_until(a_ch.due_height + 1)
    assert chain.deal(a_id).state == DealState.ACTIVE  # its deadline entry is not taken yet
    late = node.answer(chain, a_id)
    with pytest.raises(ChallengeExpired):
        chain.send(PROVIDER, late)
    while chain.deal(a_id).state == DealState.ACTIVE:
        chain.end()
    assert chain.deal(a_id).state == DealState.SLASHED
    assert chain.deal(a_id).end_height > a_ch.due_height


# --- offers --------------------------------------------------------------------------------------


def test_offers_need_the_role_are_replaceable_and_withdrawable(node: ProviderNode) -> None:
    chain = Chain()
    with pytest.raises(MissingRole):
        chain.send(PROVIDER, OFFER)
    chain.send(PROVIDER, RoleRegister(int(Role.STORAGE_PROVIDER)))
    with pytest.raises(InvalidOffer):
        deals.check_offer_body(replace(OFFER, capacity_bytes=0))
    with pytest.raises(InvalidOffer):
        chain.send(PROVIDER, replace(OFFER, max_epochs=0))
    with pytest.raises(InvalidOffer):
        chain.send(PROVIDER, replace(OFFER, max_epochs=PARAMS.max_deal_epochs + 1))
    chain.send(PROVIDER, OFFER)
    offer = deals.get_offer(chain.view, addr(PROVIDER))
    assert offer is not None and offer.capacity_bytes == OFFER.capacity_bytes
    chain.send(PROVIDER, replace(OFFER, max_epochs=7))
    offer = deals.get_offer(chain.view, addr(PROVIDER))
    assert offer is not None and offer.max_epochs == 7
    with pytest.raises(DealTooLong):
        open_deal(chain, node, epochs=8)
    deal_id, _ = open_deal(chain, node, epochs=1)

    chain.send(PROVIDER, OfferWithdraw())
    assert deals.get_offer(chain.view, addr(PROVIDER)) is None
    with pytest.raises(OfferNotFound):
        chain.send(PROVIDER, OfferWithdraw())
    with pytest.raises(OfferNotFound):
        open_deal(chain, node, b"\x02" * 32)
    # The live deal keeps its terms: answered and paid without an offer.
    chain.run_until(chain.height + 10)
    chain.end()
    answer_open_challenges(chain, node, [deal_id])
    assert chain.deal(deal_id).state == DealState.COMPLETED


def test_the_provider_cannot_resign_while_a_deal_is_live(node: ProviderNode) -> None:
    chain = Chain(params=replace(PARAMS, deal_challenge_percent=0))
    provider_ready(chain)
    open_deal(chain, node, epochs=1)
    with pytest.raises(RoleHasObligations):
        chain.send(PROVIDER, RoleResign(int(Role.STORAGE_PROVIDER)))
    chain.run_until(chain.height + 11)
    chain.send(PROVIDER, RoleResign(int(Role.STORAGE_PROVIDER)))


# --- DealCreate rejections -----------------------------------------------------------------------


def test_a_deal_with_a_non_provider_is_refused(node: ProviderNode) -> None:
    chain = Chain()
    replica = make_replica(b"\x01" * 32)
    terms = make_terms(replica, provider=OTHER)
    with pytest.raises(MissingRole, match="STORAGE_PROVIDER"):
        chain.send(OWNER, signed_deal(terms, OTHER))
    chain.send(OTHER, RoleRegister(int(Role.STORAGE_PROVIDER)))
    with pytest.raises(OfferNotFound):
        chain.send(OWNER, signed_deal(terms, OTHER))


@pytest.fixture
def ready() -> Chain:
    chain = Chain()
    provider_ready(chain)
    return chain


REPLICA = make_replica(b"\x01" * 32)
TERMS = make_terms(REPLICA)


def test_bad_provider_signatures_are_refused(ready: Chain) -> None:
    with pytest.raises(DealSignatureInvalid, match="not by the provider"):
        ready.send(OWNER, signed_deal(TERMS, OTHER))
    other_terms = replace(TERMS, price_per_epoch=Amount(PRICE + 1))
    with pytest.raises(DealSignatureInvalid):  # signed terms differ from those sent
        ready.send(OWNER, DealCreate(TERMS, signed_deal(other_terms).provider_signature))
    sig = signed_deal(TERMS).provider_signature
    with pytest.raises(DealSignatureInvalid, match="high-S"):
        ready.send(OWNER, DealCreate(TERMS, Signature(crypto.malleate(sig))))
    with pytest.raises(DealSignatureInvalid):  # another chain's signature
        ready.send(OWNER, DealCreate(TERMS, deals.sign_deal_terms(key(PROVIDER), 1, TERMS)))
    ready.send(OWNER, signed_deal(TERMS))


def test_an_expired_signature_is_refused(ready: Chain) -> None:
    terms = replace(TERMS, sig_expiry_height=ready.height + 2)
    ready.run_until(terms.sig_expiry_height + 1)
    with pytest.raises(DealSignatureExpired):
        ready.send(OWNER, signed_deal(terms))
    ready2 = Chain()
    provider_ready(ready2)
    ready2.run_until(terms.sig_expiry_height)
    ready2.send(OWNER, signed_deal(terms))  # its last valid height


def test_terms_outside_the_offer_are_refused(ready: Chain) -> None:
    def refused(exc: type[Exception], **kw: int) -> None:
        with pytest.raises(exc):
            ready.send(OWNER, signed_deal(make_terms(REPLICA, **kw)))

    refused(DealPriceTooLow, price=8_191)  # the offer asks 8 192 for 8 KiB of replica
    refused(DealCollateralTooLow, price=8_192, collateral=32_767, epochs=1)  # offer: 32 768
    refused(DealCollateralTooLow, collateral=3 * PRICE - 1)  # chain: 100 % of 30 000
    refused(DealTooLong, epochs=OFFER.max_epochs + 1)
    small = Chain()
    provider_ready(small, offer=replace(OFFER, capacity_bytes=12 * 1024, max_epochs=50))
    small.send(OWNER, signed_deal(TERMS))
    with pytest.raises(OfferCapacityExceeded):
        small.send(OWNER, signed_deal(make_terms(make_replica(b"\x02" * 32))))
    with pytest.raises(DealTooLong):  # above the chain's max_deal_epochs
        small.send(OWNER, signed_deal(make_terms(REPLICA, epochs=51, collateral=51 * PRICE)))
    ready.send(OWNER, signed_deal(make_terms(REPLICA, price=8_192, collateral=32_768, epochs=1)))


def test_inconsistent_terms_are_refused() -> None:
    chain = Chain()
    provider_ready(chain)
    cases = {
        "replica_size": replace(TERMS, replica_size=4096),
        "segment_count": replace(TERMS, segment_count=31),
        "not a CID": replace(TERMS, root=b"\x01\x55\x12"),
        "sha2-256": replace(TERMS, root=b"\x01\x55\x13\x20" + bytes(32)),
        "epochs": replace(TERMS, epochs=0),
        "price": replace(TERMS, price_per_epoch=Amount(0)),
        "itself": replace(TERMS, owner=addr(PROVIDER)),
    }
    for what, terms in cases.items():
        with pytest.raises(InvalidDealTerms):
            deals.check_deal_terms(terms)
        with pytest.raises(InvalidDealTerms):
            chain.send(OWNER if what != "itself" else PROVIDER, signed_deal(terms))
    with pytest.raises(DealOwnerMismatch):
        chain.send(OWNER2, signed_deal(TERMS))


def test_owner_and_provider_must_afford_escrow_and_collateral(node: ProviderNode) -> None:
    chain = Chain()
    provider_ready(chain)
    with pytest.raises(OwnerCannotPay):
        chain.send(POOR_OWNER, signed_deal(make_terms(REPLICA, owner=POOR_OWNER)))
    provider_ready(chain, POOR_PROVIDER)
    assert chain.balance(POOR_PROVIDER) == COLLATERAL - 1
    with pytest.raises(ProviderCannotCoverCollateral):
        chain.send(OWNER, signed_deal(make_terms(REPLICA, provider=POOR_PROVIDER), POOR_PROVIDER))


def test_a_deal_id_is_used_once(ready: Chain) -> None:
    ready.send(OWNER, signed_deal(TERMS))
    with pytest.raises(DealExists):
        ready.send(OWNER, signed_deal(TERMS))
    ready.send(OWNER, signed_deal(make_terms(make_replica(b"\x02" * 32))))


# --- DealProof rejections ------------------------------------------------------------------------


def test_proofs_for_the_wrong_deal_sender_epoch_or_indexes_are_refused(
    node: ProviderNode,
) -> None:
    chain = Chain()
    provider_ready(chain)
    deal_id, _ = open_deal(chain, node)
    with pytest.raises(InvalidBody):
        chain.send(PROVIDER, DealProof(deal_id, 0, ()))
    with pytest.raises(NoOpenChallenge, match="no open challenge"):
        chain.send(PROVIDER, DealProof(deal_id, 0, (SegmentProof(0, bytes(256), ()),)))
    chain.run_until(chain.height + 10)
    chain.end()
    good = node.answer(chain, deal_id)
    with pytest.raises(DealNotFound):
        chain.send(PROVIDER, replace(good, deal_id=Hash32(bytes(32))))
    with pytest.raises(NotDealProvider):
        chain.send(OWNER, good)
    with pytest.raises(WrongChallengeEpoch):
        chain.send(PROVIDER, replace(good, epoch=1))
    with node.store.get_proof_tree(deal_id) as tree:
        asked = {p.index for p in good.proofs}
        others = tuple(i for i in range(32) if i not in asked)[: len(good.proofs)]
        wrong = tree.prove_many(others)  # valid proofs of segments nobody asked for
    with pytest.raises(WrongChallengeIndexes):
        chain.send(PROVIDER, replace(good, proofs=wrong))
    with pytest.raises(WrongChallengeIndexes):  # the right ones, in the wrong order
        chain.send(PROVIDER, replace(good, proofs=good.proofs[::-1]))
    with pytest.raises(WrongChallengeIndexes):  # one missing
        chain.send(PROVIDER, replace(good, proofs=good.proofs[:-1]))
    chain.send(PROVIDER, good)
    with pytest.raises(NoOpenChallenge):  # answered already
        chain.send(PROVIDER, good)


def test_a_proof_after_the_due_height_or_for_an_ended_deal_is_refused(node: ProviderNode) -> None:
    chain = Chain()
    provider_ready(chain)
    deal_id, _ = open_deal(chain, node)
    chain.run_until(chain.height + 10)
    chain.end()
    challenge = chain.deal(deal_id).challenge
    assert challenge is not None
    proof = node.answer(chain, deal_id)
    chain.run_until(challenge.due_height + 1)
    with pytest.raises(NoOpenChallenge, match="ended"):
        chain.send(PROVIDER, proof)
    assert chain.deal(deal_id).state == DealState.SLASHED


# --- accounting ----------------------------------------------------------------------------------


def test_amounts_are_conserved_across_mixed_outcomes(tmp_path: Path) -> None:
    """Honest, deleted and unchallenged deals side by side: at every block, escrow + collateral
    in = payments + refunds + returned collateral + burned."""
    chain = Chain(params=replace(PARAMS, deal_challenge_percent=60, max_challenges_per_block=3))
    node = ProviderNode(tmp_path / "p")
    start_total = total_value(chain)
    provider_ready(chain, offer=replace(OFFER, capacity_bytes=1 << 20))
    ids = [
        open_deal(chain, node, bytes([i]) * 32, epochs=2 + i % 3, collateral=COLLATERAL + i)[0]
        for i in range(8)
    ]
    node.store.remove_replica(ids[0])
    node.store.remove_replica(ids[5])
    lost = {ids[0], ids[5]}
    for _ in range(60):
        for deal_id in ids:
            if deal_id in lost:
                continue
            status = deals.deal_status(chain.view, deal_id)
            assert status is not None
            if status.challenge_epoch is not None and chain.height % 2:  # answer a block late
                chain.send(PROVIDER, node.answer(chain, deal_id))
        chain.end()
        assert total_value(chain) == start_total
    outcomes = {d: chain.deal(d).state for d in ids}
    assert all(outcomes[d] == DealState.COMPLETED for d in ids if d not in lost)
    assert any(outcomes[d] == DealState.SLASHED for d in lost)
    burned = Supply.decode(chain.view.get(SUPPLY_KEY) or b"").burned
    assert burned == sum(
        COLLATERAL + i for i, d in enumerate(ids) if outcomes[d] == DealState.SLASHED
    )


def test_fee_units_count_new_records_and_segments(node: ProviderNode) -> None:
    chain = Chain()
    provider_ready(chain)
    handler = {h.kind: h for h in deals.HANDLERS}
    create = chain.vtx(OWNER, signed_deal(TERMS))
    assert handler[create.tx.kind].new_records(chain.view, create) == 2  # deal + provider load
    deal_id, _ = open_deal(chain, node)
    second = chain.vtx(OWNER, signed_deal(make_terms(make_replica(b"\x02" * 32))))
    assert handler[second.tx.kind].new_records(chain.view, second) == 1
    offer = chain.vtx(PROVIDER, OFFER)
    assert handler[offer.tx.kind].new_records(chain.view, offer) == 0  # replaces
    chain.run_until(chain.height + 10)
    chain.end()
    proof = chain.vtx(PROVIDER, node.answer(chain, deal_id))
    assert handler[proof.tx.kind].new_records(chain.view, proof) == 4


def test_records_round_trip() -> None:
    terms = TERMS
    assert DealTerms.decode(terms.encode()) == terms
    body = signed_deal(terms)
    assert DealCreate.decode(body.encode()) == body
    assert deals.deal_terms_signer(CHAIN_ID, terms, body.provider_signature) == addr(PROVIDER)
    assert deals.compute_deal_id(terms) == crypto.sha256(terms.encode())


# --- through real blocks -------------------------------------------------------------------------


def test_deals_through_committed_blocks(tmp_path: Path) -> None:
    """The wired transition: transactions decoded and fee-checked, blocks built and committed by
    a ``ChainService``, challenges seeded by the real parent hash; an honest deal completes, a
    deal whose replica was deleted is slashed, and the supply adds up."""
    genesis = replace(GEN, economy_params=replace(PARAMS, deal_epoch_heights=4))
    chain = open_chain(MemoryKV(), genesis)
    node = ProviderNode(tmp_path / "p")
    nonces: dict[int, int] = {}

    def tx(sender: int, body: Record) -> VerifiedTransaction:
        nonce = nonces.get(sender, 0)
        nonces[sender] = nonce + 1
        return verify_transaction(signed_tx(sender, body, nonce=nonce, fee=FEE))

    commit_next(chain, candidates=[tx(PROVIDER, RoleRegister(int(Role.STORAGE_PROVIDER)))])
    commit_next(chain, candidates=[tx(PROVIDER, OFFER)])
    honest_replica, lost_replica = make_replica(b"\x0a" * 32), make_replica(b"\x0b" * 32)
    honest_terms, lost_terms = make_terms(honest_replica), make_terms(lost_replica)
    honest = node.accept(honest_terms, honest_replica)
    lost = node.accept(lost_terms, lost_replica)
    block, _ = commit_next(
        chain,
        candidates=[tx(OWNER, signed_deal(honest_terms)), tx(OWNER, signed_deal(lost_terms))],
    )
    assert len(block.txs) == 2
    node.store.remove_replica(lost)

    seeds_checked = 0
    for _ in range(30):
        view = chain.state_view()
        candidates = []
        for deal_id in (honest, lost):
            deal = deals.get_deal(view, deal_id)
            assert deal is not None
            ch = deal.challenge
            if deal.state == DealState.ACTIVE and ch is not None:
                if ch.issued_height == chain.head_height:
                    parent = chain.read_view().get_block(ch.issued_height - 1)
                    assert parent is not None
                    seed = parent.hash()
                    assert ch.indexes == challenge_indexes(seed, deal_id, 32, 4)
                    seeds_checked += 1
                if deal_id == honest:
                    candidates.append(tx(PROVIDER, node.answer_from(view, deal_id)))
        block, _ = commit_next(chain, candidates=candidates)
        assert len(block.txs) == len(candidates)
    view = chain.state_view()
    outcomes = [deals.deal_status(view, d) for d in (honest, lost)]
    assert [None if o is None else o.state for o in outcomes] == [
        DealState.COMPLETED,
        DealState.SLASHED,
    ]
    assert seeds_checked >= 4

    read = chain.read_view()
    held: int = sum(Account.decode(v).balance for _, v in read.iter_state(NS_ACCOUNT))
    held += sum(ValidatorBond.decode(v).amount for _, v in read.iter_state(NS_VALIDATOR))
    held += sum(e.bond for _, v in read.iter_state(NS_ROLES) for e in RoleSet.decode(v).entries)
    held += sum(
        d.escrow + d.collateral for d in (deals.Deal.decode(v) for _, v in read.iter_state(NS_DEAL))
    )
    supply = Supply.decode(read.get_state(SUPPLY_KEY) or b"")
    assert held == supply.issued - supply.burned
    assert supply.burned >= COLLATERAL
