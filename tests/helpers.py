"""Shared test builders: genesis with funded dev keys and a chosen validator set, signed
transfers, commits signed by validator keys, and a chain service that commits blocks.

Everything is deterministic: keys are the public dev keys (``node.devkeys``), times are fixed.

* ``make_genesis(funded=4, validators=(0,))`` — dev keys 1..4 funded, dev key 0 the validator;
* ``transfer(1, 2, 5, nonce=0)`` — the raw bytes of a signed transfer from dev key 1 to dev key 2;
  ``verified(raw)`` / ``vtransfer(...)`` give the ``VerifiedTransaction``;
* ``make_commit(block_hash, height, round, signers, time_ms=...)`` — a commit of precommits;
* ``open_chain(kv, genesis)`` and ``commit_next(chain, signers)`` — a ``ChainService`` that
  builds and commits blocks with commits signed by the given validator keys;
* validator-set kinds: ``ALL_FEES`` (a schedule per kind), ``bond_tx``, ``unbond_tx``,
  ``validator_vote_tx``, ``param_vote_tx``; ``make_evidence`` (a signed equivocation).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from node import crypto
from node.chain import ChainService
from node.consensus.blocks import (
    Block,
    Commit,
    DuplicateVoteEvidence,
    SignedVote,
    Vote,
    VoteType,
    sign_vote,
)
from node.consensus.params import AuthorityParams, ChainParams, FeeSchedule, VotableParams
from node.consensus.state import (
    NS_ACCOUNT,
    NS_VALIDATOR,
    SUPPLY_KEY,
    Account,
    DictView,
    StateView,
    Supply,
)
from node.consensus.transition import BlockResult
from node.consensus.txs import (
    Bond,
    ParamVote,
    SignedTransaction,
    Transaction,
    Transfer,
    TxKind,
    Unbond,
    ValidatorVote,
    VerifiedTransaction,
    VoteAction,
    hash_params,
    make_transaction,
    verify_transaction,
)
from node.consensus.validators import ValidatorSet
from node.devkeys import dev_key
from node.economy.api import EconomyKind
from node.encoding import Record
from node.genesis import (
    DEFAULT_AUTHORITY_PARAMS,
    Genesis,
    GenesisAccount,
    GenesisValidator,
    ValidatorBond,
    build_genesis_state,
)
from node.storage.api import KVStore
from node.types import Address, Amount, ChainId, Hash32, Height, Nonce, Round, TimestampMs

CHAIN_ID = ChainId(4242)
GENESIS_TIME = TimestampMs(1_700_000_000_000)
DEFAULT_BALANCE = 10**21  # 1000 NSD
DEFAULT_BOND = 10**22
# Small, distinct costs so each part of the fee formula is visible in a test.
FEES = FeeSchedule(
    kind=int(TxKind.TRANSFER),
    base=Amount(1_000),
    per_byte=Amount(10),
    per_signature=Amount(100),
    per_new_account=Amount(5_000),
)
# A schedule for every kind (the validator-set kinds priced like transfers, with a distinct base
# so a wrong kind's schedule shows in a test).
ALL_FEES = (
    FEES,
    *(
        replace(FEES, kind=int(k), base=Amount(2_000 + int(k)))
        for k in (TxKind.BOND, TxKind.UNBOND, TxKind.VALIDATOR_VOTE, TxKind.PARAM_VOTE)
    ),
    *(replace(FEES, kind=int(k), base=Amount(3_000 + int(k))) for k in EconomyKind),
)
# Covers any transfer's cost (a transfer is < 500 bytes) with a tip left over.
DEFAULT_FEE = 20_000
BLOCK_INTERVAL_MS = 1_000


@functools.cache
def key(i: int) -> crypto.PrivateKey:
    """Dev key ``i`` (0 is the default validator, 1..N the funded accounts)."""
    return dev_key(i)


def addr(i: int) -> Address:
    return key(i).address


def _as_key(k: int | crypto.PrivateKey) -> crypto.PrivateKey:
    return key(k) if isinstance(k, int) else k


def _as_address(a: int | Address | bytes) -> Address:
    return addr(a) if isinstance(a, int) else Address(bytes(a))


# --- parameters and genesis ----------------------------------------------------------------------


def make_params(**overrides: object) -> VotableParams:
    """Votable parameters for tests; any field can be overridden."""
    params = VotableParams(
        timeout_propose_ms=3_000,
        timeout_propose_delta_ms=500,
        timeout_prevote_ms=1_000,
        timeout_prevote_delta_ms=500,
        timeout_precommit_ms=1_000,
        timeout_precommit_delta_ms=500,
        timeout_commit_ms=BLOCK_INTERVAL_MS,
        max_block_bytes=1 << 20,
        max_block_txs=1_000,
        max_tx_bytes=4_096,
        fees=(FEES,),
    )
    return replace(params, **overrides)  # type: ignore[arg-type]


def make_genesis(
    *,
    funded: int | Iterable[int] = 4,
    validators: Sequence[int] = (0,),
    balance: int = DEFAULT_BALANCE,
    balances: Mapping[int | Address, int] | None = None,
    bond: int = DEFAULT_BOND,
    power: int = 1,
    chain_id: int = CHAIN_ID,
    genesis_time: int = GENESIS_TIME,
    state_history_blocks: int = 10_000,
    evidence_max_age: int = 100_000,
    validator_floor: int = 1,
    authority: AuthorityParams | None = None,
    **param_overrides: object,
) -> Genesis:
    """A genesis where dev keys ``1..funded`` (or the given indexes) hold ``balance`` each.

    ``balances`` adds or overrides accounts (dev key index or address -> amount); ``validators``
    are dev key indexes with ``power`` and ``bond`` each. ``authority`` defaults to
    ``DEFAULT_AUTHORITY_PARAMS`` (see ``make_authority`` for overrides).
    """
    indexes = range(1, funded + 1) if isinstance(funded, int) else funded
    amounts: dict[Address, int] = {addr(i): balance for i in indexes}
    for who, amount in (balances or {}).items():
        amounts[_as_address(who)] = amount
    chain = ChainParams(
        chain_id=ChainId(chain_id),
        genesis_time=TimestampMs(genesis_time),
        state_history_blocks=state_history_blocks,
        evidence_max_age=evidence_max_age,
        validator_floor=validator_floor,
    )
    vals = sorted(
        (GenesisValidator(addr(i), power, Amount(bond)) for i in validators),
        key=lambda v: v.address,
    )
    accounts = tuple(
        GenesisAccount(a, Amount(amounts[a])) for a in sorted(amounts) if amounts[a] > 0
    )
    return Genesis(
        chain,
        make_params(**param_overrides),
        tuple(vals),
        accounts,
        DEFAULT_AUTHORITY_PARAMS if authority is None else authority,
    )


def make_authority(**overrides: object) -> AuthorityParams:
    """``DEFAULT_AUTHORITY_PARAMS`` with any field overridden."""
    return replace(DEFAULT_AUTHORITY_PARAMS, **overrides)  # type: ignore[arg-type]


def genesis_view(genesis: Genesis) -> DictView:
    return DictView(build_genesis_state(genesis))


def validator_keys(genesis: Genesis) -> list[crypto.PrivateKey]:
    """The dev keys of the genesis validators (searched among dev keys 0..63)."""
    wanted = {v.address for v in genesis.validators}
    found = [key(i) for i in range(64) if addr(i) in wanted]
    assert len(found) == len(wanted), "validators must be dev keys 0..63"
    return found


# --- transactions --------------------------------------------------------------------------------


def transfer(
    sender: int | crypto.PrivateKey,
    to: int | Address | bytes,
    amount: int,
    *,
    nonce: int,
    fee: int = DEFAULT_FEE,
    chain_id: int = CHAIN_ID,
    memo: bytes = b"",
) -> bytes:
    """The encoded signed transfer (what travels and what a block holds)."""
    body = Transfer(_as_address(to), Amount(amount), memo)
    return make_transaction(_as_key(sender), chain_id, nonce, fee, body).encode()


def verified(raw: bytes, max_bytes: int | None = None) -> VerifiedTransaction:
    return verify_transaction(raw) if max_bytes is None else verify_transaction(raw, max_bytes)


def vtransfer(
    sender: int | crypto.PrivateKey,
    to: int | Address | bytes,
    amount: int,
    *,
    nonce: int,
    fee: int = DEFAULT_FEE,
    chain_id: int = CHAIN_ID,
    memo: bytes = b"",
) -> VerifiedTransaction:
    return verified(
        transfer(sender, to, amount, nonce=nonce, fee=fee, chain_id=chain_id, memo=memo)
    )


def sign_raw_tx(
    sender: int | crypto.PrivateKey,
    *,
    kind: int,
    body: bytes | Record,
    nonce: int = 0,
    fee: int = DEFAULT_FEE,
    chain_id: int = CHAIN_ID,
) -> bytes:
    """A signed transaction with any kind and body bytes (for rejection tests)."""
    body_bytes = body.encode() if isinstance(body, Record) else body
    tx = Transaction(ChainId(chain_id), Nonce(nonce), Amount(fee), kind, body_bytes)
    sig = _as_key(sender).sign(crypto.TAG_TX, chain_id, tx.encode())
    return SignedTransaction(tx, sig).encode()


def signed_tx(
    sender: int | crypto.PrivateKey,
    body: Record,
    *,
    nonce: int,
    fee: int = DEFAULT_FEE,
    chain_id: int = CHAIN_ID,
) -> bytes:
    """The encoded signed transaction of any kind (chosen by the body's type)."""
    return make_transaction(_as_key(sender), chain_id, nonce, fee, body).encode()


def bond_tx(sender: int | crypto.PrivateKey, amount: int, *, nonce: int, **kw: int) -> bytes:
    return signed_tx(sender, Bond(Amount(amount)), nonce=nonce, **kw)


def unbond_tx(sender: int | crypto.PrivateKey, *, nonce: int, **kw: int) -> bytes:
    return signed_tx(sender, Unbond(), nonce=nonce, **kw)


def validator_vote_tx(
    voter: int | crypto.PrivateKey,
    subject: int | Address | bytes,
    action: int = VoteAction.ADD,
    *,
    nonce: int,
    **kw: int,
) -> bytes:
    return signed_tx(voter, ValidatorVote(_as_address(subject), int(action)), nonce=nonce, **kw)


def param_vote_tx(
    voter: int | crypto.PrivateKey,
    params: VotableParams,
    *,
    nonce: int,
    carry: bool = True,
    **kw: int,
) -> bytes:
    """A vote for ``params``; ``carry=False`` names them by hash only."""
    body = ParamVote(hash_params(params), params if carry else None)
    # A proposal carries the whole fee table (one schedule per kind): pay for its bytes.
    kw.setdefault("fee", 100_000)
    return signed_tx(voter, body, nonce=nonce, **kw)


# --- votes and commits ---------------------------------------------------------------------------


def make_vote(
    signer: int | crypto.PrivateKey,
    block_hash: bytes | None,
    height: int,
    round_: int = 0,
    *,
    time_ms: int,
    vote_type: int = VoteType.PRECOMMIT,
    chain_id: int = CHAIN_ID,
    validator: Address | None = None,
) -> SignedVote:
    k = _as_key(signer)
    vote = Vote(
        vote_type,
        Height(height),
        Round(round_),
        None if block_hash is None else Hash32(bytes(block_hash)),
        TimestampMs(time_ms),
        k.address if validator is None else validator,
    )
    return sign_vote(k, chain_id, vote)


def make_evidence(
    signer: int | crypto.PrivateKey,
    height: int,
    round_: int = 0,
    *,
    vote_type: int = VoteType.PREVOTE,
    hashes: tuple[bytes | None, bytes | None] = (b"\x0a" * 32, b"\x0b" * 32),
    time_ms: int = GENESIS_TIME + 1,
    chain_id: int = CHAIN_ID,
) -> DuplicateVoteEvidence:
    """Two votes of ``signer`` for (height, round, type) with different block hashes, in the
    canonical (encoding) order."""
    a, b = (
        make_vote(
            signer, h, height, round_, time_ms=time_ms, vote_type=vote_type, chain_id=chain_id
        )
        for h in hashes
    )
    first, second = sorted((a, b), key=lambda v: v.encode())
    return DuplicateVoteEvidence(first, second)


def make_commit(
    block_hash: bytes,
    height: int,
    round_: int,
    signers: Iterable[int | crypto.PrivateKey],
    *,
    time_ms: int | Sequence[int],
    chain_id: int = CHAIN_ID,
) -> Commit:
    """Precommits for ``block_hash`` by ``signers`` (ordered by address, as the engine does)."""
    keys = sorted((_as_key(s) for s in signers), key=lambda k: k.address)
    times = [time_ms] * len(keys) if isinstance(time_ms, int) else list(time_ms)
    votes = tuple(
        make_vote(k, block_hash, height, round_, time_ms=t, chain_id=chain_id)
        for k, t in zip(keys, times, strict=True)
    )
    return Commit(Height(height), Round(round_), Hash32(bytes(block_hash)), votes)


# --- chain service -------------------------------------------------------------------------------


def open_chain(kv: KVStore, genesis: Genesis) -> ChainService:
    chain = ChainService(kv, genesis)
    chain.open()
    return chain


def commit_next(
    chain: ChainService,
    signers: Sequence[int | crypto.PrivateKey] = (0,),
    candidates: Sequence[VerifiedTransaction] = (),
    *,
    round_: int = 0,
    commit_after_ms: int = BLOCK_INTERVAL_MS,
) -> tuple[Block, BlockResult]:
    """Build the next block on ``chain`` (proposer by rotation) and commit it, the commit signed
    by ``signers`` with precommit time = block time + ``commit_after_ms``."""
    height = chain.head_height + 1
    proposer = chain.validator_set().proposer(height, round_)
    last_commit = None if chain.head is None else chain.store.get_commit(chain.head_height)
    built = chain.build(round_, proposer, last_commit, list(candidates))
    block = built.block
    commit = make_commit(
        block.hash(),
        height,
        round_,
        signers,
        time_ms=block.header.time + commit_after_ms,
        chain_id=chain.chain.chain_id,
    )
    result = chain.commit(block, commit)
    return block, result


# --- invariants ----------------------------------------------------------------------------------


def supply_of(view: StateView) -> Supply:
    raw = view.get(SUPPLY_KEY)
    assert raw is not None
    return Supply.decode(raw)


def total_balances(state: Mapping[bytes, bytes]) -> int:
    """Sum of every account balance in a full state map."""
    return sum(Account.decode(v).balance for k, v in state.items() if k.startswith(NS_ACCOUNT))


def total_bonds(state: Mapping[bytes, bytes]) -> int:
    return sum(
        ValidatorBond.decode(v).amount for k, v in state.items() if k.startswith(NS_VALIDATOR)
    )


def validator_set_of(genesis: Genesis) -> ValidatorSet:
    return genesis.validator_set()
