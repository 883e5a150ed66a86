"""The pure state transition (DESIGN §4, §5): every rejection of a transaction and of a block
with its specific error, the effects of valid transfers, fees, ``build_block`` and the supply
invariant.

Blocks are built with ``build_block`` on a small in-memory chain (``PureChain``) whose state root
is the real sparse-Merkle root of the whole state (``smt.compute_root``); rejection tests take a
valid block and change one thing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node import crypto
from node.consensus.blocks import (
    Block,
    Commit,
    DuplicateVoteEvidence,
    Header,
    SignedVote,
    VoteType,
    compute_evidence_root,
    compute_last_commit_hash,
    compute_tx_root,
)
from node.consensus.fees import compute_cost
from node.consensus.params import ChainParams, VotableParams
from node.consensus.receipts import Attribute, Event, Receipt, ReceiptStatus
from node.consensus.state import (
    SUPPLY_KEY,
    Account,
    DictView,
    Overlay,
    Supply,
    get_account,
)
from node.consensus.transition import (
    BlockContext,
    BlockResult,
    BuiltBlock,
    ValidatorContext,
    apply_block,
    apply_transaction,
    build_block,
    check_commit,
    settle_fees,
)
from node.consensus.txs import (
    SignedTransaction,
    Transfer,
    TxKind,
    VerifiedTransaction,
    verify_transaction,
)
from node.consensus.validators import ValidatorSet
from node.errors import (
    FeeTooLow,
    InsufficientFunds,
    InvalidBlock,
    InvalidBody,
    InvalidCommit,
    InvalidTransaction,
    MalformedTransaction,
    MalleableTransactionSignature,
    NonCanonicalEncoding,
    NonceGap,
    NonceTooLow,
    TransactionSignatureError,
    TransactionTooLarge,
    UnknownKind,
    WrongChain,
)
from node.genesis import Genesis, build_genesis_state
from node.storage.smt import compute_root
from node.types import ZERO_HASH, Address, Amount, Hash32, Nonce
from tests.helpers import (
    CHAIN_ID,
    DEFAULT_FEE,
    FEES,
    GENESIS_TIME,
    addr,
    make_commit,
    make_genesis,
    make_params,
    make_vote,
    sign_raw_tx,
    total_balances,
    total_bonds,
    transfer,
    vtransfer,
)

TRANSFER = int(TxKind.TRANSFER)
GEN = make_genesis(funded=4, validators=(0,))
CHAIN: ChainParams = GEN.chain_params
PARAMS: VotableParams = GEN.votable_params
PROPOSER = addr(0)
# Four validators of power 1 (dev keys 0, 5, 6, 7): quorum is 3 of 4.
VALIDATORS4 = (0, 5, 6, 7)
GEN4 = make_genesis(funded=4, validators=VALIDATORS4)
OUTSIDER = 9  # a dev key that is no validator


def amount_bytes(n: int) -> bytes:
    return n.to_bytes(32, "big")


def tx_cost(
    vtx: VerifiedTransaction, *, new_account: bool = False, params: VotableParams = PARAMS
) -> int:
    return compute_cost(params, TRANSFER, vtx.size, new_accounts=1 if new_account else 0)


def genesis_overlay(genesis: Genesis = GEN) -> Overlay:
    return Overlay(DictView(build_genesis_state(genesis)))


def block_ctx(params: VotableParams = PARAMS, proposer: Address = PROPOSER) -> BlockContext:
    return BlockContext(CHAIN, params, 1, GENESIS_TIME, proposer)


def account(view: Overlay | DictView, i: int | Address) -> Account:
    return get_account(view, addr(i) if isinstance(i, int) else i)


# --- a small pure chain --------------------------------------------------------------------------


class PureChain:
    """Genesis state, head and last commit, advanced block by block with the pure functions."""

    def __init__(self, genesis: Genesis, signers: Sequence[int] | None = None) -> None:
        self.genesis = genesis
        self.chain = genesis.chain_params
        self.params = genesis.votable_params
        self.state: dict[bytes, bytes] = dict(build_genesis_state(genesis))
        self.head: Header | None = None
        self.last_commit: Commit | None = None
        self.validators = genesis.validator_set()
        self.signers = list(signers) if signers is not None else [0]

    @property
    def height(self) -> int:
        return 1 if self.head is None else self.head.height + 1

    def view(self) -> DictView:
        return DictView(self.state)

    def vctx(self, next_set: ValidatorSet | None = None) -> ValidatorContext:
        vs = self.validators
        return ValidatorContext(vs, next_set or vs, vs if self.head is not None else None)

    def root_fn(self, changes: Mapping[bytes, bytes | None]) -> Hash32:
        return compute_root(merged(self.state, changes))

    def build(
        self,
        candidates: Sequence[VerifiedTransaction] = (),
        *,
        round_: int = 0,
        params: VotableParams | None = None,
        last_commit: Commit | str | None = "default",
    ) -> BuiltBlock:
        lc = self.last_commit if last_commit == "default" else last_commit
        assert not isinstance(lc, str)
        return build_block(
            self.view(),
            self.chain,
            params or self.params,
            self.head,
            round_,
            self.validators.proposer(self.height, round_),
            lc,
            self.vctx(),
            list(candidates),
            self.root_fn,
        )

    def apply(
        self,
        block: Block,
        *,
        params: VotableParams | None = None,
        vctx: ValidatorContext | None = None,
        verified_txs: Sequence[VerifiedTransaction] | None = None,
    ) -> BlockResult:
        return apply_block(
            self.view(),
            self.chain,
            params or self.params,
            self.head,
            block,
            vctx or self.vctx(),
            self.root_fn,
            verified_txs,
        )

    def advance(self, block: Block, result: BlockResult, commit_after_ms: int = 1_000) -> None:
        self.state = merged(self.state, result.changes)
        self.head = block.header
        self.last_commit = make_commit(
            block.hash(),
            block.header.height,
            block.header.round,
            self.signers,
            time_ms=block.header.time + commit_after_ms,
        )

    def step(self, candidates: Sequence[VerifiedTransaction] = ()) -> BuiltBlock:
        built = self.build(candidates)
        result = self.apply(built.block)
        self.advance(built.block, result)
        return built


def merged(
    state: Mapping[bytes, bytes], changes: Mapping[bytes, bytes | None]
) -> dict[bytes, bytes]:
    out = dict(state)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def reheader(block: Block, **fields: object) -> Block:
    return Block(replace(block.header, **fields), block.txs, block.evidence, block.last_commit)  # type: ignore[arg-type]


def with_last_commit(block: Block, commit: Commit | None) -> Block:
    """The block with another last commit and a header whose last commit hash matches it."""
    header = replace(block.header, last_commit_hash=compute_last_commit_hash(commit))
    return Block(header, block.txs, block.evidence, commit)


def with_txs(block: Block, txs: Sequence[bytes]) -> Block:
    header = replace(block.header, tx_root=compute_tx_root(tuple(txs)))
    return Block(header, tuple(txs), block.evidence, block.last_commit)


@pytest.fixture
def chain4() -> PureChain:
    """A four-validator chain with block 1 committed by all four: the next block is height 2."""
    c = PureChain(GEN4, signers=VALIDATORS4)
    c.step([vtransfer(1, 2, 100, nonce=0)])
    return c


# === transactions: stateless rejections (verify_transaction) =====================================


def _with_signature(raw: bytes, signature: bytes) -> bytes:
    return SignedTransaction(SignedTransaction.decode(raw).tx, signature).encode()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("r", "s", "message"),
    [
        (0, 1, "r or s out of range"),
        (crypto.SECP256K1_N, 1, "r or s out of range"),
        (1, 0, "r or s out of range"),
        (5, 1, "does not recover a public key"),  # x = 5 is not on the curve
    ],
)
def test_garbage_signature_is_rejected(r: int, s: int, message: str) -> None:
    raw = _with_signature(
        transfer(1, 2, 5, nonce=0), r.to_bytes(32, "big") + s.to_bytes(32, "big") + b"\x00"
    )
    with pytest.raises(TransactionSignatureError, match=message) as info:
        verify_transaction(raw)
    assert type(info.value) is TransactionSignatureError
    assert info.value.code == 1209


def test_tampered_transaction_recovers_another_sender() -> None:
    """A valid-looking signature over other bytes names someone else, who has no funds."""
    raw = transfer(1, 2, 5, nonce=0)
    signed = SignedTransaction.decode(raw)
    tampered = SignedTransaction(replace(signed.tx, fee=Amount(DEFAULT_FEE + 1)), signed.signature)
    vtx = verify_transaction(tampered.encode())
    assert vtx.sender != addr(1)
    with pytest.raises(InsufficientFunds, match="cannot pay the fee"):
        apply_transaction(genesis_overlay(), vtx, block_ctx())


def test_malleable_high_s_signature_is_rejected() -> None:
    raw = transfer(1, 2, 5, nonce=0)
    twin = _with_signature(raw, crypto.malleate(SignedTransaction.decode(raw).signature))
    with pytest.raises(MalleableTransactionSignature, match="high-S") as info:
        verify_transaction(twin)
    assert info.value.code == 1210
    # The original is fine and keeps its one id.
    assert verify_transaction(raw).tx_id == crypto.sha256(raw)


@pytest.mark.parametrize("v", [2, 3, 27, 255])
def test_recovery_id_other_than_0_or_1_is_rejected(v: int) -> None:
    raw = transfer(1, 2, 5, nonce=0)
    sig = SignedTransaction.decode(raw).signature
    with pytest.raises(MalleableTransactionSignature, match=f"recovery id {v}"):
        verify_transaction(_with_signature(raw, sig[:64] + bytes([v])))


@pytest.mark.parametrize("kind", [0, 2, 99, 2**32])
def test_unknown_kind_is_rejected(kind: int) -> None:
    raw = sign_raw_tx(1, kind=kind, body=Transfer(addr(2), Amount(5)))
    with pytest.raises(UnknownKind, match=f"unknown transaction kind {kind}"):
        verify_transaction(raw)


def test_kind_without_fee_schedule_is_rejected_by_the_transition() -> None:
    vtx = vtransfer(1, 2, 5, nonce=0)
    with pytest.raises(UnknownKind, match="no fee schedule"):
        apply_transaction(genesis_overlay(), vtx, block_ctx(make_params(fees=())))


_TRANSFER_WIRE = Transfer(addr(2), Amount(5)).encode()


@pytest.mark.parametrize(
    ("body", "message", "cause"),
    [
        (b"\xc1", "malformed msgpack", None),
        (b"", "empty input", None),
        (
            msgpack.packb([addr(2), amount_bytes(5)], use_bin_type=True),
            "expected 3 fields, got 2",
            None,
        ),
        (
            msgpack.packb([addr(2)[:19], amount_bytes(5), b""], use_bin_type=True),
            "Transfer.to: expected 20 bytes",
            None,
        ),
        (
            msgpack.packb([addr(2), (5).to_bytes(31, "big"), b""], use_bin_type=True),
            "uint256",
            None,
        ),
        (
            msgpack.packb([addr(2), amount_bytes(5), b"x" * 257], use_bin_type=True),
            "memo: 257 bytes exceed",
            None,
        ),
        (_TRANSFER_WIRE + b"\x00", "trailing bytes", None),
        # Non-minimal forms msgpack accepts: array16 for a 3-item array, bin16 for a 20-byte bin.
        (b"\xdc\x00\x03" + _TRANSFER_WIRE[1:], "not the canonical", NonCanonicalEncoding),
        (b"\x93\xc5\x00\x14" + _TRANSFER_WIRE[3:], "not the canonical", NonCanonicalEncoding),
    ],
)
def test_malformed_or_non_canonical_body_is_rejected(
    body: bytes, message: str, cause: type[Exception] | None
) -> None:
    raw = sign_raw_tx(1, kind=TRANSFER, body=body)
    with pytest.raises(InvalidBody, match=message) as info:
        verify_transaction(raw)
    assert info.value.message.startswith("Transfer: ")
    if cause is not None:
        assert isinstance(info.value.__cause__, cause)


def test_non_canonical_envelope_is_rejected() -> None:
    raw = transfer(1, 2, 5, nonce=0)
    assert raw[0] == 0x92  # fixarray of 2: [tx, signature]
    for bad, message in [
        (b"\xdc\x00\x02" + raw[1:], "not the canonical"),  # array16 header
        (raw + b"\x00", "trailing bytes"),
        (raw[:-1], "malformed msgpack"),
        (b"\x93" + raw[1:] + b"\xc0", "expected 2 fields, got 3"),
    ]:
        with pytest.raises(MalformedTransaction, match=message):
            verify_transaction(bad)
    # The transaction inside is non-minimal too: nonce 0 as a uint8 instead of a positive fixint.
    signed = SignedTransaction.decode(raw)
    tx_wire = signed.tx.encode()
    prefix = b"\x95" + msgpack.packb(CHAIN_ID) + b"\x00"  # fixarray(5), chain id, nonce 0
    assert tx_wire.startswith(prefix)
    widened = prefix[:-1] + b"\xcc\x00" + tx_wire[len(prefix) :]
    sig_wire = msgpack.packb(signed.signature, use_bin_type=True)
    assert verify_transaction(b"\x92" + tx_wire + sig_wire).tx_id == crypto.sha256(raw)
    with pytest.raises(MalformedTransaction, match="not the canonical"):
        verify_transaction(b"\x92" + widened + sig_wire)


def test_oversize_transaction_is_rejected_before_decoding() -> None:
    raw = transfer(1, 2, 5, nonce=0, memo=b"m" * 200)
    with pytest.raises(
        TransactionTooLarge, match=f"transaction of {len(raw)} bytes exceeds {len(raw) - 1}"
    ):
        verify_transaction(raw, len(raw) - 1)
    assert verify_transaction(raw, len(raw)).size == len(raw)


def test_oversize_transaction_is_rejected_against_max_tx_bytes() -> None:
    vtx = vtransfer(1, 2, 5, nonce=0, memo=b"m" * 200)
    small = make_params(max_tx_bytes=vtx.size - 1)
    with pytest.raises(
        TransactionTooLarge, match=f"{vtx.size} bytes exceeds max_tx_bytes {vtx.size - 1}"
    ):
        apply_transaction(genesis_overlay(), vtx, block_ctx(small))
    # Exactly at the limit is fine.
    apply_transaction(genesis_overlay(), vtx, block_ctx(make_params(max_tx_bytes=vtx.size)))


# === transactions: stateful rejections (apply_transaction) =======================================


def test_rejections_write_nothing() -> None:
    overlay = genesis_overlay()
    ctx = block_ctx()
    for vtx in [
        vtransfer(1, 2, 5, nonce=1),  # gap
        vtransfer(1, 2, 5, nonce=0, chain_id=CHAIN_ID + 1),
        vtransfer(1, 2, GEN.balance_of(addr(1)) + 1, nonce=0),
        vtransfer(1, 2, 5, nonce=0, fee=1),
    ]:
        with pytest.raises(InvalidTransaction):
            apply_transaction(overlay, vtx, ctx)
    assert dict(overlay.changes) == {}
    assert (ctx.burned, ctx.tips) == (0, 0)


def test_wrong_chain_is_rejected() -> None:
    vtx = vtransfer(1, 2, 5, nonce=0, chain_id=CHAIN_ID + 1)
    with pytest.raises(
        WrongChain, match=f"transaction for chain {CHAIN_ID + 1}, this chain is {CHAIN_ID}"
    ):
        apply_transaction(genesis_overlay(), vtx, block_ctx())


def test_nonce_too_low_is_rejected() -> None:
    overlay = genesis_overlay()
    ctx = block_ctx()
    apply_transaction(overlay, vtransfer(1, 2, 5, nonce=0), ctx)
    replay = vtransfer(1, 2, 5, nonce=0)
    with pytest.raises(NonceTooLow, match="nonce 0 is below the account nonce 1"):
        apply_transaction(overlay, replay, ctx)


def test_nonce_gap_is_rejected() -> None:
    with pytest.raises(NonceGap, match="nonce 2 leaves a gap: the account nonce is 0"):
        apply_transaction(genesis_overlay(), vtransfer(1, 2, 5, nonce=2), block_ctx())


def test_insufficient_funds_for_the_fee() -> None:
    genesis = make_genesis(balances={1: 1_000})
    overlay = genesis_overlay(genesis)
    with pytest.raises(InsufficientFunds, match=f"balance 1000 cannot pay the fee {DEFAULT_FEE}"):
        apply_transaction(overlay, vtransfer(1, 2, 0, nonce=0), block_ctx())
    # An address that never received anything has a zero balance.
    with pytest.raises(InsufficientFunds, match="balance 0 cannot pay the fee"):
        apply_transaction(overlay, vtransfer(8, 2, 0, nonce=0), block_ctx())


def test_insufficient_funds_for_amount_plus_fee() -> None:
    balance = 100_000
    genesis = make_genesis(balances={1: balance})
    overlay = genesis_overlay(genesis)
    amount = balance - DEFAULT_FEE + 1  # the amount alone and the fee alone are both affordable
    with pytest.raises(
        InsufficientFunds,
        match=f"balance {balance} cannot pay amount {amount} \\+ fee {DEFAULT_FEE}",
    ):
        apply_transaction(overlay, vtransfer(1, 2, amount, nonce=0), block_ctx())
    assert dict(overlay.changes) == {}
    # One unit less is exactly affordable and empties the account.
    apply_transaction(overlay, vtransfer(1, 2, amount - 1, nonce=0), block_ctx())
    assert account(overlay, 1) == Account(Nonce(1), Amount(0))


def test_fee_below_cost_is_rejected() -> None:
    probe = vtransfer(1, 2, 5, nonce=0)
    cost = tx_cost(probe)
    # The fee field is a fixed 32-byte uint256, so the size and cost do not depend on the fee.
    assert cost == FEES.base + FEES.per_byte * probe.size + FEES.per_signature
    low = vtransfer(1, 2, 5, nonce=0, fee=cost - 1)
    assert low.size == probe.size
    with pytest.raises(FeeTooLow, match=f"fee {cost - 1} is below the cost {cost}"):
        apply_transaction(genesis_overlay(), low, block_ctx())
    receipt = apply_transaction(
        genesis_overlay(), vtransfer(1, 2, 5, nonce=0, fee=cost), block_ctx()
    )
    assert (receipt.fee_paid, receipt.burned) == (cost, cost)


def test_fee_must_cover_the_new_account_part() -> None:
    to_existing = vtransfer(1, 2, 5, nonce=0)
    cost_existing = tx_cost(to_existing)
    cost_new = tx_cost(to_existing, new_account=True)
    assert cost_new == cost_existing + FEES.per_new_account
    # The same fee that pays a transfer to an existing account is too low for a new one.
    enough_for_existing = vtransfer(1, 2, 5, nonce=0, fee=cost_existing)
    apply_transaction(genesis_overlay(), enough_for_existing, block_ctx())
    to_new = vtransfer(1, 50, 5, nonce=0, fee=cost_existing)
    assert to_new.size == to_existing.size
    with pytest.raises(FeeTooLow, match=f"below the cost {cost_new}"):
        apply_transaction(genesis_overlay(), to_new, block_ctx())
    overlay = genesis_overlay()
    receipt = apply_transaction(overlay, vtransfer(1, 50, 5, nonce=0, fee=cost_new), block_ctx())
    assert receipt.burned == cost_new
    assert account(overlay, 50) == Account(Nonce(0), Amount(5))


def test_per_byte_cost_grows_with_the_memo() -> None:
    short = vtransfer(1, 2, 5, nonce=0)
    long = vtransfer(1, 2, 5, nonce=0, memo=b"x" * 100)
    assert tx_cost(long) - tx_cost(short) == FEES.per_byte * (long.size - short.size)
    with pytest.raises(FeeTooLow):
        apply_transaction(
            genesis_overlay(),
            vtransfer(1, 2, 5, nonce=0, memo=b"x" * 100, fee=tx_cost(short)),
            block_ctx(),
        )


# === transactions: effects =======================================================================


def test_transfer_moves_amount_charges_fee_and_bumps_nonce() -> None:
    overlay = genesis_overlay()
    ctx = block_ctx()
    amount, fee = 12_345, 30_000
    vtx = vtransfer(1, 2, amount, nonce=0, fee=fee)
    receipt = apply_transaction(overlay, vtx, ctx)
    start = GEN.balance_of(addr(1))
    assert account(overlay, 1) == Account(Nonce(1), Amount(start - amount - fee))
    assert account(overlay, 2) == Account(Nonce(0), Amount(start + amount))
    cost = tx_cost(vtx)
    assert receipt == Receipt(
        vtx.tx_id,
        int(ReceiptStatus.SUCCESS),
        Amount(fee),
        Amount(cost),
        (
            Event(
                "transfer",
                (
                    Attribute("from", addr(1)),
                    Attribute("to", addr(2)),
                    Attribute("amount", amount_bytes(amount)),
                ),
            ),
            Event(
                "fee",
                (
                    Attribute("payer", addr(1)),
                    Attribute("burned", amount_bytes(cost)),
                    Attribute("tip", amount_bytes(fee - cost)),
                ),
            ),
        ),
    )
    # Fees accumulate in the context; the proposer is paid once per block by settle_fees.
    assert (ctx.burned, ctx.tips) == (cost, fee - cost)
    assert account(overlay, PROPOSER) == Account(Nonce(0), Amount(0))


def test_consecutive_nonces_apply_in_one_block() -> None:
    overlay = genesis_overlay()
    ctx = block_ctx()
    for n in range(3):
        apply_transaction(overlay, vtransfer(1, 2, 1, nonce=n), ctx)
    assert account(overlay, 1).nonce == 3


def test_self_transfer_costs_only_the_fee() -> None:
    overlay = genesis_overlay()
    ctx = block_ctx()
    start = GEN.balance_of(addr(1))
    vtx = vtransfer(1, 1, 777, nonce=0)
    receipt = apply_transaction(overlay, vtx, ctx)
    assert account(overlay, 1) == Account(Nonce(1), Amount(start - DEFAULT_FEE))
    assert receipt.burned == tx_cost(vtx)  # the sender exists: no new-account part
    # A self-transfer of the whole balance minus the fee is affordable; one unit more is not.
    rest = start - DEFAULT_FEE
    apply_transaction(overlay, vtransfer(1, 1, rest - DEFAULT_FEE, nonce=1), ctx)
    with pytest.raises(InsufficientFunds):
        apply_transaction(overlay, vtransfer(1, 1, rest - DEFAULT_FEE + 1, nonce=2), ctx)


def test_settle_fees_pays_the_tips_once_and_burns_the_cost() -> None:
    overlay = genesis_overlay()
    ctx = block_ctx()
    receipts = [
        apply_transaction(overlay, vtransfer(1, 2, 1, nonce=0, fee=10_000), ctx),
        apply_transaction(overlay, vtransfer(3, 60, 1, nonce=0, fee=50_000), ctx),
        apply_transaction(overlay, vtransfer(1, 4, 1, nonce=1, fee=3_000), ctx),
    ]
    burned = sum(r.burned for r in receipts)
    tips = sum(r.fee_paid - r.burned for r in receipts)
    assert (ctx.burned, ctx.tips) == (burned, tips)
    supply_before = Supply.decode(overlay.get(SUPPLY_KEY) or b"")
    settle_fees(overlay, ctx)
    assert account(overlay, PROPOSER) == Account(Nonce(0), Amount(tips))
    supply = Supply.decode(overlay.get(SUPPLY_KEY) or b"")
    assert supply == Supply(supply_before.issued, Amount(supply_before.burned + burned))
    assert supply_before.issued == GEN.total_supply


def test_proposer_pays_the_cost_of_its_own_transactions() -> None:
    """The cost part is burned even for the proposer's own transactions (DESIGN §4)."""
    genesis = make_genesis(funded=[1], balances={0: 1_000_000})
    overlay = genesis_overlay(genesis)
    ctx = block_ctx(genesis.votable_params, proposer=addr(0))
    vtx = vtransfer(0, 1, 0, nonce=0, fee=50_000)
    apply_transaction(overlay, vtx, ctx)
    settle_fees(overlay, ctx)
    assert account(overlay, 0).balance == 1_000_000 - tx_cost(vtx)


def test_settle_fees_with_no_fees_writes_nothing() -> None:
    overlay = genesis_overlay()
    settle_fees(overlay, block_ctx())
    assert dict(overlay.changes) == {}


# === blocks: valid blocks ========================================================================


def test_first_block_builds_and_applies() -> None:
    c = PureChain(GEN)
    txs = [vtransfer(1, 2, 10, nonce=0), vtransfer(1, 3, 20, nonce=1), vtransfer(2, 70, 5, nonce=0)]
    built = c.build(txs)
    block = built.block
    assert built.rejected == []
    h = block.header
    assert (h.chain_id, h.height, h.round, h.parent_hash) == (CHAIN_ID, 1, 0, ZERO_HASH)
    assert h.time == GENESIS_TIME
    assert h.proposer == PROPOSER
    assert h.validators_hash == h.next_validators_hash == GEN.validator_set().hash()
    assert h.last_commit_hash == ZERO_HASH and block.last_commit is None
    assert block.txs == tuple(v.raw for v in txs)
    result = c.apply(block)
    assert result == built.result
    assert [r.tx_id for r in result.receipts] == [v.tx_id for v in txs]
    state = merged(c.state, result.changes)
    assert compute_root(state) == h.state_root
    # Handing over the already verified transactions gives the same result.
    assert c.apply(block, verified_txs=txs) == result


def test_later_blocks_carry_the_last_commit_and_bft_time(chain4: PureChain) -> None:
    parent = chain4.head
    assert parent is not None
    built = chain4.build([vtransfer(1, 3, 1, nonce=1)])
    h = built.block.header
    assert h.height == 2 and h.parent_hash == parent.hash()
    assert built.block.last_commit == chain4.last_commit
    assert h.last_commit_hash == chain4.last_commit.hash()  # type: ignore[union-attr]
    assert h.time == parent.time + 1_000  # the median of the precommit times
    assert h.proposer == GEN4.validator_set().proposer(2, 0)
    chain4.apply(built.block)


def test_block_time_is_the_power_weighted_median_of_the_commit(chain4: PureChain) -> None:
    parent = chain4.head
    assert parent is not None
    base = parent.time
    commit = make_commit(
        parent.hash(), 1, 0, [0, 5, 6, 7], time_ms=[base + 50, base + 10, base + 40, base + 20]
    )
    built = chain4.build(last_commit=commit)
    # Sorted times 10, 20, 40, 50 (power 1 each): the first with more than half of the power is 40.
    assert built.block.header.time == base + 40
    chain4.apply(built.block)


def test_build_block_skips_invalid_candidates() -> None:
    genesis = make_genesis(funded=3, balances={3: 30_000})
    c = PureChain(genesis)
    good1 = vtransfer(1, 2, 10, nonce=0)
    gap = vtransfer(1, 2, 10, nonce=5)
    good2 = vtransfer(1, 2, 10, nonce=1)
    replay = vtransfer(1, 2, 10, nonce=0, fee=DEFAULT_FEE + 1)  # nonce 0 is used by now
    wrong_chain = vtransfer(2, 1, 10, nonce=0, chain_id=CHAIN_ID + 1)
    cheap = vtransfer(2, 1, 10, nonce=0, fee=1)
    poor = vtransfer(3, 1, 30_000, nonce=0)
    good3 = vtransfer(2, 1, 10, nonce=0)
    candidates = [good1, gap, good2, replay, wrong_chain, cheap, poor, good3]
    built = c.build(candidates)
    assert built.block.txs == (good1.raw, good2.raw, good3.raw)
    assert [(raw, type(exc)) for raw, exc in built.rejected] == [
        (gap.raw, NonceGap),
        (replay.raw, NonceTooLow),
        (wrong_chain.raw, WrongChain),
        (cheap.raw, FeeTooLow),
        (poor.raw, InsufficientFunds),
    ]
    # Its output is a valid block with exactly the built result.
    assert c.apply(built.block) == built.result


def test_build_block_respects_block_limits() -> None:
    c = PureChain(GEN)
    small = [vtransfer(1, 2, 1, nonce=n) for n in range(3)]
    big = vtransfer(2, 3, 1, nonce=0, memo=b"b" * 250)
    later = vtransfer(3, 4, 1, nonce=0)
    by_count = c.build([*small, later], params=make_params(max_block_txs=2))
    assert by_count.block.txs == (small[0].raw, small[1].raw)
    budget = small[0].size + small[1].size + later.size
    by_bytes = c.build([small[0], small[1], big, later], params=make_params(max_block_bytes=budget))
    # The big one does not fit; the smaller one after it still does.
    assert by_bytes.block.txs == (small[0].raw, small[1].raw, later.raw)
    assert c.apply(by_bytes.block, params=make_params(max_block_bytes=budget)) == by_bytes.result


def test_empty_block_changes_nothing() -> None:
    c = PureChain(GEN)
    built = c.build()
    assert built.block.txs == () and built.result.receipts == ()
    assert built.result.changes == {}
    assert built.block.header.state_root == compute_root(c.state)
    c.apply(built.block)


# === blocks: header rejections ===================================================================


def _expect_invalid(c: PureChain, block: Block, message: str, **kwargs: object) -> InvalidBlock:
    with pytest.raises(InvalidBlock, match=message) as info:
        c.apply(block, **kwargs)  # type: ignore[arg-type]
    return info.value


def test_wrong_chain_id(chain4: PureChain) -> None:
    block = chain4.build().block
    bad = reheader(block, chain_id=CHAIN_ID + 1)
    _expect_invalid(chain4, bad, f"block for chain {CHAIN_ID + 1}, this chain is {CHAIN_ID}")


@pytest.mark.parametrize("height", [1, 3, 100])
def test_wrong_height(chain4: PureChain, height: int) -> None:
    bad = reheader(chain4.build().block, height=height)
    _expect_invalid(chain4, bad, f"block height {height}, expected 2")


def test_wrong_height_for_the_first_block() -> None:
    c = PureChain(GEN)
    _expect_invalid(c, reheader(c.build().block, height=2), "block height 2, expected 1")


def test_wrong_parent(chain4: PureChain) -> None:
    bad = reheader(chain4.build().block, parent_hash=crypto.sha256(b"another parent"))
    _expect_invalid(chain4, bad, "wrong parent hash")
    first = PureChain(GEN)
    _expect_invalid(
        first, reheader(first.build().block, parent_hash=crypto.sha256(b"x")), "wrong parent hash"
    )


def test_wrong_proposer(chain4: PureChain) -> None:
    block = chain4.build().block
    vs = GEN4.validator_set()
    expected = vs.proposer(2, 0)
    other = next(a for a in vs.addresses if a != expected)
    _expect_invalid(
        chain4,
        reheader(block, proposer=other),
        f"wrong proposer for height 2 round 0: expected 0x{expected.hex()}",
    )
    # The proposer rotates with the round: round 1's block from round 0's proposer is wrong too.
    assert vs.proposer(2, 1) != expected
    _expect_invalid(chain4, reheader(block, round=1), "wrong proposer for height 2 round 1")
    # A non-validator is never the proposer.
    _expect_invalid(chain4, reheader(block, proposer=addr(OUTSIDER)), "wrong proposer")


def test_block_of_a_later_round_from_its_proposer_is_valid(chain4: PureChain) -> None:
    built = chain4.build(round_=3)
    assert built.block.header.round == 3
    assert built.block.header.proposer == GEN4.validator_set().proposer(2, 3)
    chain4.apply(built.block)


def test_wrong_validators_hash(chain4: PureChain) -> None:
    block = chain4.build().block
    _expect_invalid(
        chain4,
        reheader(block, validators_hash=crypto.sha256(b"x")),
        "validators hash does not match the validator set",
    )


def test_wrong_next_validators_hash(chain4: PureChain) -> None:
    block = chain4.build().block
    _expect_invalid(
        chain4,
        reheader(block, next_validators_hash=crypto.sha256(b"x")),
        "next validators hash does not match",
    )
    # Checked against the next set the caller knows: a block naming the current set as next is
    # invalid when the set changes at the next height.
    next_set = ValidatorSet.of({addr(0): 1, addr(5): 1})
    _expect_invalid(chain4, block, "next validators hash", vctx=chain4.vctx(next_set))


def test_wrong_tx_root(chain4: PureChain) -> None:
    block = chain4.build([vtransfer(1, 2, 1, nonce=1)]).block
    _expect_invalid(chain4, reheader(block, tx_root=compute_tx_root(())), "tx root does not match")
    # Dropping a transaction without fixing the root is caught the same way.
    dropped = Block(block.header, (), block.evidence, block.last_commit)
    _expect_invalid(chain4, dropped, "tx root does not match")


def test_wrong_receipts_root(chain4: PureChain) -> None:
    block = chain4.build([vtransfer(1, 2, 1, nonce=1)]).block
    _expect_invalid(
        chain4, reheader(block, receipts_root=crypto.sha256(b"r")), "receipts root does not match"
    )


def test_wrong_state_root(chain4: PureChain) -> None:
    block = chain4.build([vtransfer(1, 2, 1, nonce=1)]).block
    _expect_invalid(
        chain4, reheader(block, state_root=crypto.sha256(b"s")), "state root does not match"
    )
    # Also when the root is the parent's (as if the transactions had no effect).
    _expect_invalid(chain4, reheader(block, state_root=chain4.head.state_root), "state root")  # type: ignore[union-attr]


@pytest.mark.parametrize("delta", [-1, 1, 1_000])
def test_wrong_time(chain4: PureChain, delta: int) -> None:
    block = chain4.build().block
    expected = block.header.time
    _expect_invalid(
        chain4,
        reheader(block, time=expected + delta),
        f"block time {expected + delta}, expected {expected} \\(BFT time\\)",
    )


def test_first_block_time_is_the_genesis_time() -> None:
    c = PureChain(GEN)
    block = c.build().block
    _expect_invalid(c, reheader(block, time=GENESIS_TIME + 1), f"expected {GENESIS_TIME}")


def test_block_time_must_follow_the_parent() -> None:
    """A precommit whose time is not after its block's is invalid (DESIGN §5 "Time"), so a commit
    whose median would not move the time forward is refused, to build on and to apply."""
    c = PureChain(GEN)
    c.step()
    parent = _parent(c)
    stale = make_commit(parent.hash(), 1, 0, [0], time_ms=parent.time)
    message = f"precommit time {parent.time} is not after the block's time {parent.time}"
    with pytest.raises(InvalidCommit, match=message):
        c.build(last_commit=stale)
    block = reheader(with_last_commit(c.build().block, stale), time=parent.time)
    with pytest.raises(InvalidCommit, match=message):
        c.apply(block)
    # One millisecond later is fine.
    ok = make_commit(parent.hash(), 1, 0, [0], time_ms=parent.time + 1)
    built = c.build(last_commit=ok)
    assert built.block.header.time == parent.time + 1
    c.apply(built.block)


def test_too_many_transactions() -> None:
    c = PureChain(GEN)
    block = c.build([vtransfer(1, 2, 1, nonce=n) for n in range(3)]).block
    _expect_invalid(
        c, block, "3 transactions exceed max_block_txs", params=make_params(max_block_txs=2)
    )
    c.apply(block, params=make_params(max_block_txs=3))


def test_too_many_bytes() -> None:
    c = PureChain(GEN)
    block = c.build([vtransfer(1, 2, 1, nonce=n) for n in range(3)]).block
    size = sum(len(t) for t in block.txs)
    _expect_invalid(
        c,
        block,
        f"{size} bytes of transactions exceed max_block_bytes",
        params=make_params(max_block_bytes=size - 1),
    )
    c.apply(block, params=make_params(max_block_bytes=size))


def test_evidence_counts_in_the_state_root_and_the_evidence_root(chain4: PureChain) -> None:
    """Valid evidence is executed (tests/consensus/test_evidence.py); a block whose header was
    built without it fails on the state root, one whose evidence root omits it on the root."""
    block = chain4.build().block
    a = make_vote(5, crypto.sha256(b"a"), 1, time_ms=GENESIS_TIME + 1, vote_type=VoteType.PREVOTE)
    b = make_vote(5, crypto.sha256(b"b"), 1, time_ms=GENESIS_TIME + 1, vote_type=VoteType.PREVOTE)
    evidence = (DuplicateVoteEvidence(*sorted((a, b), key=lambda v: v.encode())),)
    with_root = Block(
        replace(block.header, evidence_root=compute_evidence_root(evidence)),
        block.txs,
        evidence,
        block.last_commit,
    )
    _expect_invalid(chain4, with_root, "state root does not match")
    without_root = Block(block.header, block.txs, evidence, block.last_commit)
    _expect_invalid(chain4, without_root, "evidence root does not match")


def test_verified_transactions_must_match_the_block() -> None:
    c = PureChain(GEN)
    txs = [vtransfer(1, 2, 1, nonce=0), vtransfer(1, 2, 1, nonce=1)]
    block = c.build(txs).block
    _expect_invalid(c, block, "verified transactions do not match", verified_txs=txs[:1])
    _expect_invalid(c, block, "verified transactions do not match", verified_txs=txs[::-1])


# === blocks: invalid transactions inside =========================================================


def test_block_with_a_nonce_gap_is_invalid_and_names_the_index() -> None:
    c = PureChain(GEN)
    first = vtransfer(1, 2, 1, nonce=0)
    gap = vtransfer(1, 2, 1, nonce=2)
    block = with_txs(c.build([first]).block, [first.raw, gap.raw])
    err = _expect_invalid(c, block, f"transaction 1 \\({gap.tx_id.hex()}\\): nonce 2 leaves a gap")
    assert err.data == {"index": 1, "code": NonceGap.code}
    assert isinstance(err.__cause__, NonceGap)


def test_block_with_a_replayed_transaction_is_invalid() -> None:
    c = PureChain(GEN)
    tx = vtransfer(1, 2, 1, nonce=0)
    block = with_txs(c.build([tx]).block, [tx.raw, tx.raw])
    err = _expect_invalid(c, block, "transaction 1 .*nonce 0 is below the account nonce 1")
    assert err.data == {"index": 1, "code": NonceTooLow.code}


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: vtransfer(1, 2, 1, nonce=0, chain_id=CHAIN_ID + 1), WrongChain),
        (lambda: vtransfer(1, 2, 10**30, nonce=0), InsufficientFunds),
        (lambda: vtransfer(1, 2, 1, nonce=0, fee=1), FeeTooLow),
    ],
)
def test_block_with_an_invalid_transaction_is_invalid(
    make: object, error: type[InvalidTransaction]
) -> None:
    c = PureChain(GEN)
    ok = vtransfer(2, 3, 1, nonce=0)
    bad = make()  # type: ignore[operator]
    block = with_txs(c.build([ok]).block, [ok.raw, bad.raw])
    err = _expect_invalid(c, block, "transaction 1")
    assert err.data == {"index": 1, "code": error.code}
    assert type(err.__cause__) is error


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"\x00garbage", MalformedTransaction),
        (sign_raw_tx(1, kind=99, body=b""), UnknownKind),
        (sign_raw_tx(1, kind=TRANSFER, body=b"\xc1"), InvalidBody),
    ],
)
def test_block_with_an_undecodable_transaction_is_invalid(
    raw: bytes, error: type[Exception]
) -> None:
    c = PureChain(GEN)
    ok = vtransfer(2, 3, 1, nonce=0)
    block = with_txs(c.build([ok]).block, [ok.raw, raw])
    err = _expect_invalid(c, block, "transaction 1: ")
    assert isinstance(err.data, dict) and err.data["index"] == 1
    assert type(err.__cause__) is error


def test_block_with_a_badly_signed_transaction_is_invalid() -> None:
    c = PureChain(GEN)
    raw = transfer(1, 2, 1, nonce=0)
    high_s = _with_signature(raw, crypto.malleate(SignedTransaction.decode(raw).signature))
    block = with_txs(c.build().block, [high_s])
    err = _expect_invalid(c, block, "transaction 0: high-S")
    assert isinstance(err.__cause__, MalleableTransactionSignature)


def test_block_with_an_oversize_transaction_is_invalid() -> None:
    c = PureChain(GEN)
    big = vtransfer(1, 2, 1, nonce=0, memo=b"m" * 200)
    block = c.build([big]).block
    small = make_params(max_tx_bytes=big.size - 1)
    err = _expect_invalid(c, block, "transaction 0: transaction of", params=small)
    assert isinstance(err.__cause__, TransactionTooLarge)


# === blocks: the last commit =====================================================================


def _parent(c: PureChain) -> Header:
    assert c.head is not None
    return c.head


def test_missing_last_commit_after_the_first_block(chain4: PureChain) -> None:
    block = with_last_commit(chain4.build().block, None)
    _expect_invalid(chain4, block, "a block after the first must carry the last commit")


def test_last_commit_in_the_first_block() -> None:
    c = PureChain(GEN)
    block = c.build().block
    commit = make_commit(crypto.sha256(b"nothing"), 0, 0, [0], time_ms=GENESIS_TIME)
    _expect_invalid(c, with_last_commit(block, commit), "the first block carries no last commit")


def test_last_commit_hash_must_match(chain4: PureChain) -> None:
    block = chain4.build().block
    parent = _parent(chain4)
    other = make_commit(parent.hash(), 1, 0, [0, 5, 6], time_ms=parent.time + 1_000)
    swapped = Block(block.header, block.txs, block.evidence, other)
    _expect_invalid(chain4, swapped, "last commit hash does not match")


def _commit_case(chain4: PureChain, commit: Commit, message: str) -> None:
    block = with_last_commit(chain4.build().block, commit)
    with pytest.raises(InvalidCommit, match=message):
        chain4.apply(block)


def test_last_commit_for_another_block(chain4: PureChain) -> None:
    parent = _parent(chain4)
    other = crypto.sha256(b"another block")
    commit = make_commit(other, 1, 0, [0, 5, 6, 7], time_ms=parent.time + 1_000)
    _commit_case(chain4, commit, "commit is for another block")


def test_last_commit_for_another_height(chain4: PureChain) -> None:
    parent = _parent(chain4)
    commit = make_commit(parent.hash(), 2, 0, [0, 5, 6, 7], time_ms=parent.time + 1_000)
    _commit_case(chain4, commit, "commit is for height 2, expected 1")


@pytest.mark.parametrize("signers", [(), (0,), (0, 5)])
def test_last_commit_without_quorum(chain4: PureChain, signers: tuple[int, ...]) -> None:
    parent = _parent(chain4)
    commit = make_commit(parent.hash(), 1, 0, signers, time_ms=parent.time + 1_000)
    block = with_last_commit(chain4.build().block, commit)
    with pytest.raises(InvalidCommit, match=r"lacks more than two thirds|no precommit"):
        chain4.apply(block)


def test_last_commit_quorum_is_strictly_more_than_two_thirds() -> None:
    # Three validators of power 1: two of three is exactly 2/3, which is not enough.
    genesis = make_genesis(validators=(0, 5, 6))
    c = PureChain(genesis, signers=(0, 5, 6))
    c.step()
    parent = _parent(c)
    block = c.build().block
    two = make_commit(parent.hash(), 1, 0, [0, 5], time_ms=parent.time + 1_000)
    with pytest.raises(InvalidCommit, match="lacks more than two thirds"):
        c.apply(with_last_commit(block, two))
    vs = genesis.validator_set()
    check_commit(
        CHAIN_ID,
        make_commit(parent.hash(), 1, 0, [0, 5, 6], time_ms=parent.time + 1_000),
        1,
        parent.hash(),
        vs,
        parent.time,
    )


def test_last_commit_with_a_non_validator(chain4: PureChain) -> None:
    parent = _parent(chain4)
    commit = make_commit(parent.hash(), 1, 0, [0, 5, 6, OUTSIDER], time_ms=parent.time + 1_000)
    _commit_case(chain4, commit, "precommit of a non-validator")


def _replace_vote(commit: Commit, index: int, vote: SignedVote) -> Commit:
    votes = list(commit.precommits)
    votes[index] = vote
    return replace(commit, precommits=tuple(votes))


def test_last_commit_with_a_garbage_signature(chain4: PureChain) -> None:
    parent = _parent(chain4)
    commit = make_commit(parent.hash(), 1, 0, [0, 5, 6, 7], time_ms=parent.time + 1_000)
    garbage = SignedVote(commit.precommits[0].vote, bytes(64) + b"\x00")  # type: ignore[arg-type]
    _commit_case(
        chain4,
        _replace_vote(commit, 0, garbage),
        "badly signed precommit: signature r or s out of range",
    )
    high_s = SignedVote(commit.precommits[1].vote, crypto.malleate(commit.precommits[1].signature))  # type: ignore[arg-type]
    _commit_case(chain4, _replace_vote(commit, 1, high_s), "badly signed precommit: high-S")


def test_last_commit_with_a_precommit_signed_by_another_key(chain4: PureChain) -> None:
    parent = _parent(chain4)
    commit = make_commit(parent.hash(), 1, 0, [0, 5, 6, 7], time_ms=parent.time + 1_000)
    index = next(i for i, v in enumerate(commit.precommits) if v.vote.validator != addr(7))
    victim = commit.precommits[index].vote
    # Validator 7's key signs a precommit that names another validator.
    forged = make_vote(7, parent.hash(), 1, time_ms=parent.time + 1_000, validator=victim.validator)
    _commit_case(
        chain4, _replace_vote(commit, index, forged), "signature does not match its validator"
    )


def test_last_commit_with_a_duplicate_validator(chain4: PureChain) -> None:
    parent = _parent(chain4)
    commit = make_commit(parent.hash(), 1, 0, [0, 5], time_ms=parent.time + 1_000)
    doubled = replace(commit, precommits=(*commit.precommits, commit.precommits[0]))
    _commit_case(chain4, doubled, "two precommits of one validator")
    # Also when the second precommit of that validator differs (another time).
    first_signer = 0 if commit.precommits[0].vote.validator == addr(0) else 5
    again = make_vote(first_signer, parent.hash(), 1, time_ms=parent.time + 2)
    _commit_case(
        chain4,
        replace(commit, precommits=(*commit.precommits, again)),
        "two precommits of one validator",
    )


@pytest.mark.parametrize("what", ["prevote", "nil", "round", "height"])
def test_last_commit_with_a_vote_that_is_not_a_precommit_for_the_parent(
    chain4: PureChain, what: str
) -> None:
    parent = _parent(chain4)
    commit = make_commit(parent.hash(), 1, 0, [0, 5, 6, 7], time_ms=parent.time + 1_000)
    kwargs: dict[str, object] = {"time_ms": parent.time + 1_000}
    block_hash: bytes | None = parent.hash()
    height, round_ = 1, 0
    if what == "prevote":
        kwargs["vote_type"] = VoteType.PREVOTE
    elif what == "nil":
        block_hash = None
    elif what == "round":
        round_ = 1
    else:
        height = 2
    odd = make_vote(6, block_hash, height, round_, **kwargs)  # type: ignore[arg-type]
    index = next(i for i, v in enumerate(commit.precommits) if v.vote.validator == addr(6))
    _commit_case(chain4, _replace_vote(commit, index, odd), "not a precommit for this block")


def test_last_commit_signed_for_another_chain(chain4: PureChain) -> None:
    parent = _parent(chain4)
    commit = make_commit(
        parent.hash(), 1, 0, [0, 5, 6, 7], time_ms=parent.time + 1_000, chain_id=CHAIN_ID + 1
    )
    # Signed over another chain id, each signature recovers some other address.
    _commit_case(chain4, commit, "does not match its validator")


def test_last_commit_with_a_precommit_not_after_the_parent_time(chain4: PureChain) -> None:
    """DESIGN §5: a precommit for B carries time >= B.time + 1 ms, and one violating that is
    invalid — even when the median (the next block's time) is still after the parent's."""
    parent = _parent(chain4)
    t = parent.time
    commit = make_commit(parent.hash(), 1, 0, [0, 5, 6], time_ms=[t, t + 10, t + 20])
    message = f"precommit time {t} is not after the block's time {t}"
    with pytest.raises(InvalidCommit, match=message):
        chain4.build(last_commit=commit)
    block = reheader(with_last_commit(chain4.build().block, commit), time=t + 10)  # the median
    with pytest.raises(InvalidCommit, match=message):
        chain4.apply(block)


# === the supply invariant ========================================================================


SENDERS = (0, 1, 2, 3)
RECIPIENTS = (0, 1, 2, 3, 4, 20, 21)
SUPPLY_GEN = make_genesis(funded=[1, 2, 3], balances={1: 60_000, 2: 200_000, 3: 10**18})

_op = st.tuples(
    st.sampled_from(SENDERS),
    st.sampled_from(RECIPIENTS),
    st.integers(0, 250_000),
    st.sampled_from([0, 2_000, 3_000, 8_000, 25_000]),
    st.booleans(),  # reuse the last nonce (a replay) instead of the next one
)


@settings(max_examples=40, deadline=None)
@given(blocks=st.lists(st.lists(_op, max_size=6), min_size=1, max_size=4))
def test_supply_invariant_over_random_transfers(
    blocks: list[list[tuple[int, int, int, int, bool]]],
) -> None:
    """balances + bonds + burned == issued after every block, whatever was rejected."""
    c = PureChain(SUPPLY_GEN)
    issued = SUPPLY_GEN.total_supply
    nonces = dict.fromkeys(SENDERS, 0)
    burned = 0
    for ops in blocks:
        candidates = []
        for sender, to, amount, fee, replay in ops:
            nonce = max(0, nonces[sender] - 1) if replay else nonces[sender]
            candidates.append(vtransfer(sender, to, amount, nonce=nonce, fee=fee))
            if not replay:
                nonces[sender] += 1  # optimistic: a rejection leaves a gap for the rest
        built = c.build(candidates)
        assert len(built.block.txs) + len(built.rejected) == len(candidates)
        result = c.apply(built.block)
        assert result == built.result
        c.advance(built.block, result)
        supply = Supply.decode(c.state[SUPPLY_KEY])
        assert supply.issued == issued
        assert total_balances(c.state) + total_bonds(c.state) + supply.burned == issued
        burned += sum(r.burned for r in result.receipts)
        assert supply.burned == burned
        # Account nonces only count included transactions.
        for s in SENDERS:
            nonces[s] = get_account(c.view(), addr(s)).nonce


def test_genesis_supply_counts_balances_and_bonds() -> None:
    state = build_genesis_state(GEN4)
    supply = Supply.decode(state[SUPPLY_KEY])
    assert supply.burned == 0
    assert supply.issued == total_balances(state) + total_bonds(state) == GEN4.total_supply
    assert total_bonds(state) == 4 * GEN4.validators[0].bond


def test_build_block_refuses_an_invalid_last_commit(chain4: PureChain) -> None:
    """build_block's output always passes apply_block, so it refuses a last commit that does
    not finalize the parent rather than build a block every validator would reject."""
    parent = _parent(chain4)
    weak = make_commit(parent.hash(), 1, 0, [0, 5], time_ms=parent.time + 1_000)
    with pytest.raises(InvalidCommit, match="lacks more than two thirds"):
        chain4.build(last_commit=weak)
    other = make_commit(crypto.sha256(b"x"), 1, 0, VALIDATORS4, time_ms=parent.time + 1_000)
    with pytest.raises(InvalidCommit, match="another block"):
        chain4.build(last_commit=other)
    with pytest.raises(InvalidBlock, match="must carry the last commit"):
        chain4.build(last_commit=None)
    first = PureChain(GEN)
    stray = make_commit(crypto.sha256(b"x"), 0, 0, [0], time_ms=GENESIS_TIME)
    with pytest.raises(InvalidBlock, match="the first block carries no last commit"):
        first.build(last_commit=stray)
