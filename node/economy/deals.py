"""Storage offers, deals, per-epoch challenges and slashing (DESIGN §9; docs/storage-deals.md).

A deal is a paid backup: the artifact's owner pays a storage provider, per epoch, to keep a
*per-deal replica* of the file (erasure-coded ×2 and masked with a key only the owner knows,
``node.storage.replica``) whose Merkle root over 256-byte segments is part of the deal. What the
chain checks is *timely retrievability of that unique replica*, not physical storage.

Transactions (kinds 40–43, ``EconomyKind``):

* ``StorageOffer`` — a STORAGE_PROVIDER publishes (or replaces) its one offer: capacity, price
  per GiB per epoch, collateral per GiB, longest deal. ``OfferWithdraw`` removes it; live deals
  keep the terms they were made on.
* ``DealCreate`` — sent by the owner, carrying ``DealTerms`` and the provider's signature over
  them (``sha256(TAG_DEAL ‖ chain_id ‖ terms)``, so both parties signed: the owner signs the
  transaction). Checks: the terms are consistent (replica size and segment count follow from the
  file size), name the sender as owner, the provider holds the role and an offer, the signature
  recovers the provider and has not expired, the deal id (``sha256(terms)``) is unused, and the
  terms are within the offer (price ≥ offer price for the replica size, collateral ≥ the offer's
  and ≥ ``min_collateral_percent`` of the total price, epochs ≤ offer's and chain's maximum,
  replica within the offer's free capacity). Effects: ``epochs × price_per_epoch`` from the
  owner into the deal's escrow, ``collateral`` from the provider's balance into the deal (it
  consented by signing), one more open obligation for the provider, its first epoch queued.
* ``DealProof`` — the provider answers the open challenge of an epoch with one ``SegmentProof``
  per challenged index, in order, by the due height (inclusive). A wrong answer makes the
  transaction invalid; the provider may still answer correctly until the due height.

Epochs (``deal_epoch_heights`` = E). A deal created at height s has epochs k = 0 … epochs−1;
epoch k ends at its boundary s + (k+1)·E. At a boundary (``end_block``, from ``QUEUE_DEAL``,
at most ``max_challenges_per_block`` entries per block, the rest roll to the next block — DESIGN
§4) the deal is challenged iff ``sha256(parent_hash ‖ deal_id)`` (first 8 bytes, mod 100) is
below ``deal_challenge_percent``, where ``parent_hash`` is the hash of the previous block. An
unchallenged epoch is paid at once. A challenge stores
``challenge_indexes(parent_hash, deal_id, segment_count, deal_segments_per_challenge)`` and a
due height h + ``deal_challenge_window``; a valid ``DealProof`` pays the epoch. If the challenge
is still open when its deadline entry is taken (at the end of the due height or, capped, later),
the collateral is burned, the remaining escrow refunded to the owner and the deal ends
(SLASHED). After the last epoch is paid the collateral returns to the provider (COMPLETED).

Ended deals stay in state with their final state, so a deal id can never be reused (the
provider's signature cannot be replayed) and RPC can show how a deal ended. Escrow and collateral
held by live deals are part of the issued supply but of no account's balance, like validator
bonds: balances + bonds + deal escrow + deal collateral + burned = issued.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import TYPE_CHECKING

from node import crypto
from node.consensus.receipts import Attribute, Event
from node.consensus.state import HeightQueue, Overlay, StateView, get_account, put_account
from node.economy.api import (
    NS_DEAL,
    NS_DEAL_AUX,
    NS_OFFER,
    QUEUE_DEAL,
    EconomyError,
    EconomyKind,
    EconomyParams,
    KindHandler,
    Role,
    burn,
    charge,
    credit,
    economy_params,
    u64,
    u256,
)
from node.economy.roles import adjust_obligations, require_role
from node.encoding import Record, limit
from node.errors import DecodeError, InsufficientFunds, InvalidBody, InvalidSignature
from node.storage.replica import (
    SegmentProof,
    challenge_indexes,
    replica_size,
    segment_count,
    verify_segment,
)
from node.storage.unixfs import DAG_PB_CODEC, RAW_CODEC, parse_cid
from node.types import Address, Amount, ChainId, Hash32, Signature

if TYPE_CHECKING:
    from node.consensus.transition import BlockContext
    from node.consensus.txs import VerifiedTransaction

# The provider's signature over the deal terms (one fixed tag per signed record type, DESIGN §3).
TAG_DEAL = b"NeuroSeed/deal/v1"
GIB = 1 << 30
MAX_CID_BYTES = 64
# Upper bound on the segments one challenge asks for (and one DealProof carries): genesis should
# keep ``deal_segments_per_challenge`` at or below it; the chain clamps to it regardless.
MAX_CHALLENGE_SEGMENTS = 64
_SHA2_256 = 0x12

# Queue entries: deal id (32) ‖ what (1) ‖ epoch (8, big endian).
_BOUNDARY = 0  # the epoch ends: challenge it or pay it
_DEADLINE = 1  # the epoch's challenge is due: slash if still open
_LOAD_PREFIX = NS_DEAL_AUX + b"\x01"  # + provider -> ProviderLoad

DEAL_QUEUE = HeightQueue(QUEUE_DEAL)


# --- errors (codes 2250–2269) -----------------------------------------------------------------


class InvalidOffer(InvalidBody):
    code = 2250
    reason = "invalid storage offer"


class OfferNotFound(EconomyError):
    code = 2251
    reason = "the provider has no storage offer"


class InvalidDealTerms(InvalidBody):
    code = 2252
    reason = "inconsistent deal terms"


class DealOwnerMismatch(EconomyError):
    code = 2253
    reason = "the deal terms name another owner"


class DealSignatureInvalid(EconomyError):
    code = 2254
    reason = "the provider's signature over the deal terms is invalid"


class DealSignatureExpired(EconomyError):
    code = 2255
    reason = "the provider's signature over the deal terms has expired"


class DealPriceTooLow(EconomyError):
    code = 2256
    reason = "deal price below the provider's offer"


class DealCollateralTooLow(EconomyError):
    code = 2257
    reason = "deal collateral below the offer or the chain's minimum"


class DealTooLong(EconomyError):
    code = 2258
    reason = "deal longer than the offer or the chain allows"


class OfferCapacityExceeded(EconomyError):
    code = 2259
    reason = "the replica does not fit the provider's free capacity"


class DealExists(EconomyError):
    code = 2260
    reason = "a deal with these terms exists"


class OwnerCannotPay(InsufficientFunds):
    code = 2261
    reason = "the owner's balance cannot pay the deal's escrow and the fee"


class ProviderCannotCoverCollateral(InsufficientFunds):
    code = 2262
    reason = "the provider's balance cannot cover the deal's collateral"


class DealNotFound(EconomyError):
    code = 2263
    reason = "no such deal"


class NotDealProvider(EconomyError):
    code = 2264
    reason = "only the deal's provider answers its challenges"


class NoOpenChallenge(EconomyError):
    code = 2265
    reason = "the deal has no open challenge"


class WrongChallengeEpoch(EconomyError):
    code = 2266
    reason = "the proof is for another epoch than the open challenge"


class ChallengeExpired(EconomyError):
    code = 2267
    reason = "the challenge's due height has passed"


class WrongChallengeIndexes(EconomyError):
    code = 2268
    reason = "the proof does not answer exactly the challenged segments"


class InvalidStorageProof(EconomyError):
    code = 2269
    reason = "a segment proof does not verify against the deal's replica root"


# --- records ---------------------------------------------------------------------------------


class DealState(IntEnum):
    ACTIVE = 1
    COMPLETED = 2  # every epoch paid, collateral returned
    SLASHED = 3  # a challenge missed: collateral burned, the rest of the escrow refunded


@dataclass(frozen=True, slots=True)
class StorageOffer(Record):
    """Transaction body: the sender's (one, replaceable) offer as a storage provider."""

    capacity_bytes: int  # replica bytes it accepts across its live deals
    price_per_gib_epoch: Amount  # least price per GiB of replica per epoch
    collateral_per_gib: Amount  # least collateral per GiB of replica
    max_epochs: int  # longest deal it accepts


@dataclass(frozen=True, slots=True)
class OfferWithdraw(Record):
    """Transaction body: remove the sender's offer (live deals keep their terms)."""


@dataclass(frozen=True, slots=True)
class Offer(Record):
    """A provider's offer in state (``NS_OFFER + provider``)."""

    provider: Address
    capacity_bytes: int
    price_per_gib_epoch: Amount
    collateral_per_gib: Amount
    max_epochs: int
    height: int  # of the transaction that set it


@dataclass(frozen=True, slots=True)
class DealTerms(Record):
    """What both parties sign: the provider by ``provider_signature``, the owner by the
    transaction. The deal id is ``sha256(terms.encode())``; ``deal_nonce`` makes it unique."""

    root: bytes = field(metadata=limit(MAX_CID_BYTES))  # binary CID of the artifact
    owner: Address  # pays, gets refunds; the only one who can unmask the replica
    provider: Address
    replica_root: Hash32  # Merkle root over the replica's 256-byte segments
    replica_size: int
    segment_count: int
    file_size: int
    epochs: int
    price_per_epoch: Amount
    collateral: Amount
    deal_nonce: Hash32
    sig_expiry_height: int  # the signature is valid in blocks up to this height


@dataclass(frozen=True, slots=True)
class DealCreate(Record):
    """Transaction body, sent by the owner."""

    terms: DealTerms
    provider_signature: Signature


@dataclass(frozen=True, slots=True)
class DealProof(Record):
    """Transaction body, sent by the provider: the answer to the open challenge of ``epoch``."""

    deal_id: Hash32
    epoch: int
    proofs: tuple[SegmentProof, ...] = field(metadata=limit(MAX_CHALLENGE_SEGMENTS))


@dataclass(frozen=True, slots=True)
class Challenge(Record):
    epoch: int
    indexes: tuple[int, ...] = field(metadata=limit(MAX_CHALLENGE_SEGMENTS))  # sorted, distinct
    issued_height: int
    due_height: int  # the last height whose block may carry the answer


@dataclass(frozen=True, slots=True)
class Deal(Record):
    """A deal in state (``NS_DEAL + deal_id``), kept after it ends."""

    terms: DealTerms
    start_height: int
    state: int  # DealState
    epochs_paid: int  # epochs 0 … epochs_paid−1 are paid; the current epoch is epochs_paid
    escrow: Amount  # still held for unpaid epochs
    collateral: Amount  # still locked
    next_boundary: int  # height the current epoch ends; 0 once the deal has ended
    challenge: Challenge | None  # the open challenge (or, once SLASHED, the one missed)
    end_height: int  # 0 while active


@dataclass(frozen=True, slots=True)
class ProviderLoad(Record):
    """A provider's live deals and their replica bytes (``NS_DEAL_AUX + 0x01 + provider``);
    counted against its offer's capacity. Deleted when it drops to zero."""

    live_deals: int
    bytes_in_use: int


@dataclass(frozen=True, slots=True)
class DealStatus:
    """What RPC shows of a deal, and what the provider's node polls to find its challenges."""

    deal_id: Hash32
    state: DealState
    owner: Address
    provider: Address
    start_height: int
    epochs: int
    epochs_paid: int
    next_boundary: int
    escrow: int
    collateral: int
    end_height: int
    challenge_epoch: int | None
    challenge_indexes: tuple[int, ...]
    challenge_due_height: int | None


# --- keys, ids, signatures, reads --------------------------------------------------------------


def offer_key(provider: Address) -> bytes:
    return NS_OFFER + provider


def deal_key(deal_id: Hash32) -> bytes:
    return NS_DEAL + deal_id


def load_key(provider: Address) -> bytes:
    return _LOAD_PREFIX + provider


def compute_deal_id(terms: DealTerms) -> Hash32:
    return crypto.sha256(terms.encode())


def sign_deal_terms(key: crypto.PrivateKey, chain_id: ChainId | int, terms: DealTerms) -> Signature:
    """The provider's signature over ``terms`` (what it gives the owner after checking the
    replica root against the replica bytes)."""
    return key.sign(TAG_DEAL, chain_id, terms.encode())


def deal_terms_signer(chain_id: ChainId | int, terms: DealTerms, signature: bytes) -> Address:
    """The address that signed ``terms``; raises ``DealSignatureInvalid``."""
    try:
        return crypto.recover_signer(TAG_DEAL, chain_id, terms.encode(), signature)
    except InvalidSignature as exc:
        raise DealSignatureInvalid(f"provider signature: {exc.message}") from exc


def get_offer(view: StateView, provider: Address) -> Offer | None:
    raw = view.get(offer_key(provider))
    return None if raw is None else Offer.decode(raw)


def get_deal(view: StateView, deal_id: Hash32) -> Deal | None:
    raw = view.get(deal_key(deal_id))
    return None if raw is None else Deal.decode(raw)


def get_provider_load(view: StateView, provider: Address) -> ProviderLoad:
    raw = view.get(load_key(provider))
    return ProviderLoad(0, 0) if raw is None else ProviderLoad.decode(raw)


def deal_status(view: StateView, deal_id: Hash32) -> DealStatus | None:
    deal = get_deal(view, deal_id)
    if deal is None:
        return None
    ch = deal.challenge
    open_ch = ch if deal.state == DealState.ACTIVE else None
    return DealStatus(
        deal_id=deal_id,
        state=DealState(deal.state),
        owner=deal.terms.owner,
        provider=deal.terms.provider,
        start_height=deal.start_height,
        epochs=deal.terms.epochs,
        epochs_paid=deal.epochs_paid,
        next_boundary=deal.next_boundary,
        escrow=deal.escrow,
        collateral=deal.collateral,
        end_height=deal.end_height,
        challenge_epoch=None if open_ch is None else open_ch.epoch,
        challenge_indexes=() if open_ch is None else open_ch.indexes,
        challenge_due_height=None if open_ch is None else open_ch.due_height,
    )


# --- pure rules --------------------------------------------------------------------------------


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def compute_min_price_per_epoch(offer: Offer, replica_bytes: int) -> int:
    """The offer's price for a replica of ``replica_bytes`` for one epoch (rounded up)."""
    return _ceil_div(offer.price_per_gib_epoch * replica_bytes, GIB)


def compute_min_collateral(offer: Offer, terms: DealTerms, min_collateral_percent: int) -> int:
    """The least collateral: the offer's per-GiB collateral for the replica, and
    ``min_collateral_percent`` of the deal's total price (both rounded up)."""
    by_offer = _ceil_div(offer.collateral_per_gib * terms.replica_size, GIB)
    by_chain = _ceil_div(terms.epochs * terms.price_per_epoch * min_collateral_percent, 100)
    return max(by_offer, by_chain)


def deal_spend(body: DealCreate) -> int:
    """What a ``DealCreate`` takes from the owner's balance besides the fee (the escrow), for
    the mempool's balance check."""
    return body.terms.epochs * body.terms.price_per_epoch


def is_challenged(seed: bytes, deal_id: bytes, percent: int) -> bool:
    """Whether an epoch ending in a block whose parent hash is ``seed`` is challenged.

    The first 8 bytes of ``sha256(seed ‖ deal_id)`` mod 100 (a bias of < 2^-57) against the
    percentage; the seed is the previous block's hash, unknown before that block is made.
    """
    draw = int.from_bytes(hashlib.sha256(seed + deal_id).digest()[:8], "big") % 100
    return draw < percent


def check_offer_body(body: StorageOffer) -> None:
    if body.capacity_bytes == 0:
        raise InvalidOffer("StorageOffer: capacity_bytes must be positive")
    if body.max_epochs == 0:
        raise InvalidOffer("StorageOffer: max_epochs must be positive")


def check_deal_terms(terms: DealTerms) -> None:
    """Stateless consistency of the terms (``InvalidDealTerms``)."""
    try:
        cid = parse_cid(terms.root)
    except DecodeError as exc:
        raise InvalidDealTerms(f"DealTerms.root is not a binary CID: {exc}") from exc
    if (
        cid.version != 1
        or cid.hashfun.code != _SHA2_256
        or cid.codec.code not in (RAW_CODEC, DAG_PB_CODEC)
        or bytes(cid) != terms.root
    ):
        raise InvalidDealTerms("DealTerms.root must be a binary CIDv1 (sha2-256, raw or dag-pb)")
    expected_size = replica_size(terms.file_size)
    if terms.replica_size != expected_size:
        raise InvalidDealTerms(
            f"DealTerms.replica_size {terms.replica_size} is not the replica size "
            f"{expected_size} of a {terms.file_size}-byte file"
        )
    expected_segments = segment_count(terms.replica_size)
    if terms.segment_count != expected_segments:
        raise InvalidDealTerms(
            f"DealTerms.segment_count {terms.segment_count} is not {expected_segments}, the "
            f"segments of a {terms.replica_size}-byte replica"
        )
    if terms.epochs == 0:
        raise InvalidDealTerms("DealTerms.epochs must be positive")
    if terms.price_per_epoch == 0:
        raise InvalidDealTerms("DealTerms.price_per_epoch must be positive")
    if terms.owner == terms.provider:
        raise InvalidDealTerms("a provider cannot make a deal with itself")


def check_deal_create_body(body: DealCreate) -> None:
    check_deal_terms(body.terms)


def check_deal_proof_body(body: DealProof) -> None:
    if not body.proofs:
        raise InvalidBody("DealProof: at least one segment proof is needed")


# --- transactions ------------------------------------------------------------------------------


def _hex(b: bytes) -> str:
    return "0x" + b.hex()


def apply_storage_offer(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, StorageOffer)  # kind dispatch guarantees it
    check_offer_body(body)
    require_role(view, vtx.sender, Role.STORAGE_PROVIDER, "a storage offer")
    params = economy_params(view)
    if body.max_epochs > params.max_deal_epochs:
        raise InvalidOffer(
            f"StorageOffer: max_epochs {body.max_epochs} exceeds the chain's max_deal_epochs "
            f"{params.max_deal_epochs}"
        )
    charge(view, vtx)
    offer = Offer(
        vtx.sender,
        body.capacity_bytes,
        body.price_per_gib_epoch,
        body.collateral_per_gib,
        body.max_epochs,
        ctx.height,
    )
    view.put(offer_key(vtx.sender), offer.encode())
    return (
        Event(
            "storage_offer",
            (
                Attribute("provider", vtx.sender),
                Attribute("capacity_bytes", u64(body.capacity_bytes)),
                Attribute("price_per_gib_epoch", u256(body.price_per_gib_epoch)),
                Attribute("collateral_per_gib", u256(body.collateral_per_gib)),
                Attribute("max_epochs", u64(body.max_epochs)),
            ),
        ),
    )


def apply_offer_withdraw(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    assert isinstance(vtx.body, OfferWithdraw)  # kind dispatch guarantees it
    key = offer_key(vtx.sender)
    if view.get(key) is None:
        raise OfferNotFound(f"{_hex(vtx.sender)} has no storage offer to withdraw")
    charge(view, vtx)
    view.delete(key)
    return (Event("storage_offer_withdrawn", (Attribute("provider", vtx.sender),)),)


def apply_deal_create(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, DealCreate)  # kind dispatch guarantees it
    terms = body.terms
    check_deal_terms(terms)
    owner, provider = vtx.sender, terms.provider
    if terms.owner != owner:
        raise DealOwnerMismatch(
            f"the terms name owner {_hex(terms.owner)}, the sender is {_hex(owner)}"
        )
    require_role(view, provider, Role.STORAGE_PROVIDER, "a storage deal")
    offer = get_offer(view, provider)
    if offer is None:
        raise OfferNotFound(f"provider {_hex(provider)} has no storage offer")
    signer = deal_terms_signer(ctx.chain.chain_id, terms, body.provider_signature)
    if signer != provider:
        raise DealSignatureInvalid(
            f"the terms are signed by {_hex(signer)}, not by the provider {_hex(provider)}"
        )
    if ctx.height > terms.sig_expiry_height:
        raise DealSignatureExpired(
            f"the provider's signature expired at height {terms.sig_expiry_height}; "
            f"this block is {ctx.height}"
        )
    deal_id = compute_deal_id(terms)
    if view.get(deal_key(deal_id)) is not None:
        raise DealExists(f"deal {_hex(deal_id)} exists (a new deal needs a new deal_nonce)")
    params = economy_params(view)
    max_epochs = min(offer.max_epochs, params.max_deal_epochs)
    if terms.epochs > max_epochs:
        raise DealTooLong(
            f"{terms.epochs} epochs exceed the most allowed, {max_epochs} (offer "
            f"{offer.max_epochs}, chain {params.max_deal_epochs})"
        )
    min_price = compute_min_price_per_epoch(offer, terms.replica_size)
    if terms.price_per_epoch < min_price:
        raise DealPriceTooLow(
            f"price_per_epoch {terms.price_per_epoch} is below the offer's {min_price} for "
            f"{terms.replica_size} replica bytes"
        )
    min_collateral = compute_min_collateral(offer, terms, params.min_collateral_percent)
    if terms.collateral < min_collateral:
        raise DealCollateralTooLow(
            f"collateral {terms.collateral} is below {min_collateral} (offer "
            f"{offer.collateral_per_gib} per GiB; chain {params.min_collateral_percent}% of "
            "the total price)"
        )
    load = get_provider_load(view, provider)
    if load.bytes_in_use + terms.replica_size > offer.capacity_bytes:
        raise OfferCapacityExceeded(
            f"{terms.replica_size} replica bytes do not fit: {load.bytes_in_use} of "
            f"{offer.capacity_bytes} are in use"
        )
    escrow = deal_spend(body)
    owner_balance = get_account(view, owner).balance
    if owner_balance < vtx.tx.fee + escrow:
        raise OwnerCannotPay(
            f"balance {owner_balance} cannot pay the escrow {escrow} + fee {vtx.tx.fee}"
        )
    provider_balance = get_account(view, provider).balance
    if provider_balance < terms.collateral:
        raise ProviderCannotCoverCollateral(
            f"provider {_hex(provider)} holds {provider_balance}, the collateral is "
            f"{terms.collateral}"
        )
    # Effects (every check passed).
    charge(view, vtx, escrow)
    provider_account = get_account(view, provider)
    put_account(
        view,
        provider,
        replace(provider_account, balance=Amount(provider_account.balance - terms.collateral)),
    )
    adjust_obligations(view, provider, Role.STORAGE_PROVIDER, 1)
    view.put(
        load_key(provider),
        ProviderLoad(load.live_deals + 1, load.bytes_in_use + terms.replica_size).encode(),
    )
    boundary = ctx.height + _epoch_heights(params.deal_epoch_heights)
    deal = Deal(
        terms=terms,
        start_height=ctx.height,
        state=int(DealState.ACTIVE),
        epochs_paid=0,
        escrow=Amount(escrow),
        collateral=terms.collateral,
        next_boundary=boundary,
        challenge=None,
        end_height=0,
    )
    view.put(deal_key(deal_id), deal.encode())
    DEAL_QUEUE.push(view, boundary, _entry(deal_id, _BOUNDARY, 0))
    return (
        Event(
            "deal_created",
            (
                Attribute("deal_id", deal_id),
                Attribute("owner", owner),
                Attribute("provider", provider),
                Attribute("escrow", u256(escrow)),
                Attribute("collateral", u256(terms.collateral)),
                Attribute("first_boundary", u64(boundary)),
            ),
        ),
    )


def apply_deal_proof(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, DealProof)  # kind dispatch guarantees it
    check_deal_proof_body(body)
    deal = get_deal(view, body.deal_id)
    if deal is None:
        raise DealNotFound(f"no deal {_hex(body.deal_id)}")
    terms = deal.terms
    if vtx.sender != terms.provider:
        raise NotDealProvider(
            f"{_hex(vtx.sender)} is not the provider {_hex(terms.provider)} of the deal"
        )
    challenge = deal.challenge
    if deal.state != DealState.ACTIVE:
        raise NoOpenChallenge(
            f"deal {_hex(body.deal_id)} ended at height {deal.end_height} "
            f"({DealState(deal.state).name.lower()})"
        )
    if challenge is None:
        raise NoOpenChallenge(
            f"deal {_hex(body.deal_id)} has no open challenge (epoch {deal.epochs_paid} ends at "
            f"height {deal.next_boundary})"
        )
    if body.epoch != challenge.epoch:
        raise WrongChallengeEpoch(
            f"the proof is for epoch {body.epoch}; the open challenge is for epoch "
            f"{challenge.epoch}"
        )
    if ctx.height > challenge.due_height:
        raise ChallengeExpired(
            f"the challenge of epoch {challenge.epoch} was due by height "
            f"{challenge.due_height}; this block is {ctx.height}"
        )
    answered = tuple(p.index for p in body.proofs)
    if answered != challenge.indexes:
        raise WrongChallengeIndexes(
            f"the proof answers segments {list(answered)}; the challenge asks for "
            f"{list(challenge.indexes)}"
        )
    for proof in body.proofs:
        if not verify_segment(terms.replica_root, terms.segment_count, proof):
            raise InvalidStorageProof(
                f"segment {proof.index} does not verify against the replica root "
                f"{_hex(terms.replica_root)}"
            )
    charge(view, vtx)
    params = economy_params(view)
    deal = replace(deal, challenge=None)
    events = [
        Event(
            "deal_proof",
            (
                Attribute("deal_id", body.deal_id),
                Attribute("epoch", u64(challenge.epoch)),
            ),
        )
    ]
    events.extend(_pay_epoch(view, body.deal_id, deal, ctx.height, params.deal_epoch_heights))
    return tuple(events)


# --- end of block: epochs, challenges, deadlines -----------------------------------------------


def end_block(view: Overlay, ctx: BlockContext) -> None:
    """Take the deal queue's due entries (at most ``max_challenges_per_block``): end epochs
    (challenge or pay) and enforce deadlines of unanswered challenges (slash)."""
    params = economy_params(view)
    cap = max(1, params.max_challenges_per_block)
    for _, entry in DEAL_QUEUE.pop_due(view, ctx.height, cap):
        deal_id, what, epoch = _parse_entry(entry)
        deal = get_deal(view, deal_id)
        if deal is None or deal.state != DealState.ACTIVE:
            continue  # a deadline left over after the deal's last epoch was answered and paid
        if what == _BOUNDARY:
            if deal.epochs_paid == epoch and deal.challenge is None:
                _end_epoch(view, ctx, deal_id, deal, params)
        elif deal.challenge is not None and deal.challenge.epoch == epoch:
            _slash(view, deal_id, deal, ctx.height)
        # else: the challenge of that epoch was answered in time (a stale deadline entry)


def _end_epoch(
    view: Overlay, ctx: BlockContext, deal_id: Hash32, deal: Deal, params: EconomyParams
) -> None:
    seed = bytes(ctx.parent_hash)
    if is_challenged(seed, deal_id, params.deal_challenge_percent):
        count = max(1, min(params.deal_segments_per_challenge, MAX_CHALLENGE_SEGMENTS))
        indexes = tuple(challenge_indexes(seed, deal_id, deal.terms.segment_count, count))
        due = ctx.height + max(1, params.deal_challenge_window)
        challenge = Challenge(deal.epochs_paid, indexes, ctx.height, due)
        view.put(deal_key(deal_id), replace(deal, challenge=challenge).encode())
        DEAL_QUEUE.push(view, due, _entry(deal_id, _DEADLINE, deal.epochs_paid))
    else:
        _pay_epoch(view, deal_id, deal, ctx.height, params.deal_epoch_heights)


def _pay_epoch(
    view: Overlay, deal_id: Hash32, deal: Deal, height: int, epoch_heights: int
) -> list[Event]:
    """Pay the current epoch to the provider; queue the next one, or complete the deal."""
    terms = deal.terms
    price = terms.price_per_epoch
    credit(view, terms.provider, price)
    paid = deal.epochs_paid + 1
    escrow = Amount(deal.escrow - price)
    events = [
        Event(
            "deal_epoch_paid",
            (
                Attribute("deal_id", deal_id),
                Attribute("epoch", u64(deal.epochs_paid)),
                Attribute("amount", u256(price)),
            ),
        )
    ]
    if paid == terms.epochs:
        # The escrow is exactly epochs × price, so nothing is left; return the collateral.
        credit(view, terms.provider, deal.collateral)
        _release_provider(view, terms)
        done = replace(
            deal,
            state=int(DealState.COMPLETED),
            epochs_paid=paid,
            escrow=escrow,
            collateral=Amount(0),
            next_boundary=0,
            end_height=height,
        )
        view.put(deal_key(deal_id), done.encode())
        events.append(Event("deal_completed", (Attribute("deal_id", deal_id),)))
        return events
    # Boundaries follow the deal's own schedule; a late answer (or a capped queue) never pushes
    # the next boundary into the past.
    boundary = max(deal.start_height + (paid + 1) * _epoch_heights(epoch_heights), height + 1)
    view.put(
        deal_key(deal_id),
        replace(deal, epochs_paid=paid, escrow=escrow, next_boundary=boundary).encode(),
    )
    DEAL_QUEUE.push(view, boundary, _entry(deal_id, _BOUNDARY, paid))
    return events


def _slash(view: Overlay, deal_id: Hash32, deal: Deal, height: int) -> None:
    """A challenge missed: burn the collateral, refund the rest of the escrow, end the deal."""
    terms = deal.terms
    burn(view, deal.collateral)
    credit(view, terms.owner, deal.escrow)
    _release_provider(view, terms)
    ended = replace(
        deal,
        state=int(DealState.SLASHED),
        escrow=Amount(0),
        collateral=Amount(0),
        next_boundary=0,
        end_height=height,
    )
    view.put(deal_key(deal_id), ended.encode())


def _release_provider(view: Overlay, terms: DealTerms) -> None:
    adjust_obligations(view, terms.provider, Role.STORAGE_PROVIDER, -1)
    load = get_provider_load(view, terms.provider)
    if load.live_deals <= 1:
        view.delete(load_key(terms.provider))
    else:
        view.put(
            load_key(terms.provider),
            ProviderLoad(load.live_deals - 1, load.bytes_in_use - terms.replica_size).encode(),
        )


def _epoch_heights(n: int) -> int:
    return max(1, n)


def _entry(deal_id: Hash32, what: int, epoch: int) -> bytes:
    return deal_id + bytes((what,)) + epoch.to_bytes(8, "big")


def _parse_entry(entry: bytes) -> tuple[Hash32, int, int]:
    return Hash32(entry[:32]), entry[32], int.from_bytes(entry[33:41], "big")


# --- registration ------------------------------------------------------------------------------


def _offer_records(view: StateView, vtx: VerifiedTransaction) -> int:
    return 0 if view.get(offer_key(vtx.sender)) is not None else 1


def _no_records(view: StateView, vtx: VerifiedTransaction) -> int:
    return 0


def _deal_records(view: StateView, vtx: VerifiedTransaction) -> int:
    body = vtx.body
    assert isinstance(body, DealCreate)
    # The deal record, and the provider's load record when it has no live deal yet.
    return 1 + (view.get(load_key(body.terms.provider)) is None)


def _proof_items(view: StateView, vtx: VerifiedTransaction) -> int:
    # The fee table's per-item unit counts the segment proofs verified (DESIGN §4).
    body = vtx.body
    assert isinstance(body, DealProof)
    return len(body.proofs)


HANDLERS: tuple[KindHandler, ...] = (
    KindHandler(
        int(EconomyKind.STORAGE_OFFER),
        StorageOffer,
        apply_storage_offer,
        _offer_records,
        check_offer_body,
    ),
    KindHandler(int(EconomyKind.OFFER_WITHDRAW), OfferWithdraw, apply_offer_withdraw, _no_records),
    KindHandler(
        int(EconomyKind.DEAL_CREATE),
        DealCreate,
        apply_deal_create,
        _deal_records,
        check_deal_create_body,
    ),
    KindHandler(
        int(EconomyKind.DEAL_PROOF),
        DealProof,
        apply_deal_proof,
        _proof_items,
        check_deal_proof_body,
    ),
)
