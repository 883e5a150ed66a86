"""The pure state transition (DESIGN §1, §4, §5): ``apply_transaction`` and ``apply_block``.

No I/O, no clock, no randomness: everything comes in as arguments (the parent header, the block,
the state view, the validator sets, the function that computes a state root). Each check raises a
specific typed error; a block is valid only if every transaction in it is.

Shape follows the consensus specs' ``process_*`` functions: preconditions at the top, then effects
written into an ``Overlay`` that the caller commits or drops.

A block runs in three phases on one overlay:

1. **evidence** (``process_evidence``): each item checked (``node.consensus.evidence``) and its
   offender slashed and taken out of the set being built for h+2;
2. **transactions** in order (``apply_transaction``; transfers take a fast path);
3. **end of block** (``end_block``): fees settled; the height-indexed queues (bond releases, vote
   expiry, evidence keys ageing out) each advanced by at most ``max_queue_work_per_block``; then
   the economy's end-of-block work (``node.economy.registry.END_BLOCK``: purchase deadlines,
   deal epochs, each capped the same way); parameters voted in at h−1 put in force for h+1; the
   validator sets rotated (``validators.rotate_validator_sets``).

The economy's transaction kinds (roles, datasets, purchases, deals: ``node.economy``) are
dispatched to their ``KindHandler`` after the checks common to every kind, and their fee is split
like any other's.

**Authority** (DESIGN §5). State holds set(h+1) (``VALIDATOR_SET_KEY``, the set of the next
block) and set(h+2) (``NEXT_VALIDATOR_SET_KEY``), plus the sets of recent heights as epochs. The
votes, exits and evidence of block h edit ``NEXT_VALIDATOR_SET_KEY``, which starts the block as
set(h+1) and ends it as set(h+2): so block h's ``validators_hash`` is set(h), its
``next_validators_hash`` set(h+1), and a change made in block h shows first in
``next_validators_hash`` of block h+1 and ``validators_hash`` of block h+2. Voters must be in
set(h); a vote passes when its voters hold more than half of set(h)'s power; the floor is checked
against the set being built. Validators added by vote get power 1 (equal power in PoA).
Parameters passed in block h are written under ``params_at_key(h+2)`` and become
``PARAMS_KEY`` at the end of block h+1, so the caller's ``params`` for block h+2 are the new ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from node.consensus.blocks import (
    MAX_BLOCK_TXS_HARD,
    Block,
    Commit,
    DuplicateVoteEvidence,
    Header,
    VoteType,
    compute_evidence_root,
    compute_last_commit_hash,
    compute_tx_root,
    vote_signer,
)
from node.consensus.engine import block_time_from_commit
from node.consensus.evidence import (
    check_evidence,
    evidence_height,
    evidence_key,
    evidence_validator,
)
from node.consensus.fees import compute_cost, cost_of, split_fee
from node.consensus.params import (
    AuthorityParams,
    ChainParams,
    VotableParams,
    votable_params_problem,
)
from node.consensus.receipts import Attribute, Event, Receipt, ReceiptStatus
from node.consensus.state import (
    AUTHORITY_PARAMS_KEY,
    EVIDENCE_EXPIRY_QUEUE,
    NEXT_VALIDATOR_SET_KEY,
    NS_ACCOUNT,
    NS_PARAM_TALLY,
    NS_VALIDATOR_TALLY,
    PARAMS_KEY,
    SUPPLY_KEY,
    UNBONDING_QUEUE,
    VALIDATOR_SET_KEY,
    VOTE_EXPIRY_QUEUE,
    Account,
    EvidenceSeen,
    Overlay,
    ParamTally,
    StateView,
    Supply,
    Unbonding,
    ValidatorBond,
    VoterEntry,
    VoteTally,
    account_fields,
    encode_account,
    evidence_seen_key,
    get_account,
    param_tally_key,
    params_at_key,
    put_account,
    unbonding_key,
    validator_key,
    validator_tally_key,
)
from node.consensus.txs import (
    KNOWN_KINDS,
    MAX_TX_BYTES_HARD,
    Bond,
    ParamVote,
    Transfer,
    TxKind,
    ValidatorVote,
    VerifiedTransaction,
    VoteAction,
    verify_transaction,
)
from node.consensus.validators import (
    MAX_VALIDATORS,
    ValidatorHistoryError,
    ValidatorSet,
    rotate_validator_sets,
    validator_set_at,
)
from node.economy.registry import END_BLOCK as ECONOMY_END_BLOCK
from node.economy.registry import HANDLERS as ECONOMY_HANDLERS
from node.encoding import pack
from node.errors import (
    BelowValidatorFloor,
    BondTooSmall,
    BondUnbonding,
    DuplicateValidatorVote,
    FeeTooLow,
    InsufficientFunds,
    InvalidBlock,
    InvalidCommit,
    InvalidEvidence,
    InvalidParams,
    InvalidSignature,
    InvalidTransaction,
    InvalidVoteSubject,
    NonceGap,
    NonceTooLow,
    NotAValidator,
    NotBonded,
    TransactionTooLarge,
    UnknownKind,
    WrongChain,
)
from node.merkle import merkle_root
from node.types import ZERO_HASH, Address, Amount, Hash32, Nonce, TimestampMs

StateRootFn = Callable[[Mapping[bytes, bytes | None]], Hash32]


@dataclass(slots=True)
class BlockContext:
    """What a transaction may know about the block it is in; fees accumulate here."""

    chain: ChainParams
    params: VotableParams
    height: int
    time_ms: int
    proposer: Address
    burned: int = 0
    tips: int = 0
    # Read from the state on first use when not given (they do not change during a block).
    authority: AuthorityParams | None = None
    validators: ValidatorSet | None = None  # the set of ``height`` (voters, tallies)
    # The hash of block height−1 (the header's parent hash; zero at height 1): the seed of the
    # storage-deal challenges of this block.
    parent_hash: Hash32 = ZERO_HASH


@dataclass(frozen=True, slots=True)
class BlockResult:
    changes: Mapping[bytes, bytes | None]
    receipts: tuple[Receipt, ...]
    receipts_root: Hash32
    state_root: Hash32
    # ``r.encode()`` of each receipt, made once for the receipts root and reused by the commit.
    receipt_encodings: tuple[bytes, ...] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ValidatorContext:
    """The validator sets a block at ``height`` is checked against (DESIGN §5: changes at h+2)."""

    current: ValidatorSet  # signs blocks at this height; its hash is the header's validators_hash
    next: ValidatorSet  # signs at height + 1; the header's next_validators_hash
    previous: ValidatorSet | None  # signed the parent (checks the last commit); None at height 1


# --- transactions ------------------------------------------------------------------------------


def check_transaction(view: StateView, vtx: VerifiedTransaction, ctx: BlockContext) -> Amount:
    """Stateful preconditions common to every kind; returns the consensus cost."""
    tx = vtx.tx
    if tx.chain_id != ctx.chain.chain_id:
        raise WrongChain(f"transaction for chain {tx.chain_id}, this chain is {ctx.chain.chain_id}")
    if vtx.size > ctx.params.max_tx_bytes:
        raise TransactionTooLarge(
            f"transaction of {vtx.size} bytes exceeds max_tx_bytes {ctx.params.max_tx_bytes}"
        )
    account = get_account(view, vtx.sender)
    if tx.nonce < account.nonce:
        raise NonceTooLow(f"nonce {tx.nonce} is below the account nonce {account.nonce}")
    if tx.nonce > account.nonce:
        raise NonceGap(f"nonce {tx.nonce} leaves a gap: the account nonce is {account.nonce}")
    cost = cost_of(ctx.params, view, vtx)
    if tx.fee < cost:
        raise FeeTooLow(f"fee {tx.fee} is below the cost {cost} of this transaction")
    if account.balance < tx.fee:
        raise InsufficientFunds(f"balance {account.balance} cannot pay the fee {tx.fee}")
    return cost


def apply_transaction(view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext) -> Receipt:
    """Check and apply one verified transaction to ``view``; raise on any invalidity.

    On error nothing has been written to ``view``. The fee's cost part and tip accumulate in
    ``ctx`` and are settled once per block by ``settle_fees``.
    """
    return _apply(view, vtx, ctx)[0]


def _apply(view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext) -> tuple[Receipt, bytes]:
    """``apply_transaction``, also returning the receipt's encoding."""
    tx = vtx.tx
    if tx.kind == TxKind.TRANSFER and type(vtx.body) is Transfer:
        return _apply_transfer_tx(view, vtx, ctx)
    cost = check_transaction(view, vtx, ctx)
    kind = tx.kind
    if kind == TxKind.TRANSFER:  # pragma: no cover - the fast path above takes transfers
        events = _apply_transfer(view, vtx, cost)
    elif kind == TxKind.BOND:
        events = _apply_bond(view, vtx, ctx)
    elif kind == TxKind.UNBOND:
        events = _apply_unbond(view, vtx, ctx)
    elif kind == TxKind.VALIDATOR_VOTE:
        events = _apply_validator_vote(view, vtx, ctx)
    elif kind == TxKind.PARAM_VOTE:
        events = _apply_param_vote(view, vtx, ctx)
    else:
        handler = ECONOMY_HANDLERS.get(kind)
        if handler is None:  # pragma: no cover - verify_transaction already rejects them
            raise UnknownKind(f"unknown transaction kind {tx.kind}")
        events = handler.apply(view, vtx, ctx)
    split = split_fee(tx.fee, cost)
    ctx.burned += split.cost
    ctx.tips += split.tip
    fee_event = Event(
        "fee",
        (
            Attribute("payer", vtx.sender),
            Attribute("burned", split.cost.to_bytes(32, "big")),
            Attribute("tip", split.tip.to_bytes(32, "big")),
        ),
    )
    receipt = Receipt(
        vtx.tx_id, int(ReceiptStatus.SUCCESS), tx.fee, split.cost, (*events, fee_event)
    )
    return receipt, receipt.encode()


def _apply_transfer_tx(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Receipt, bytes]:
    """``check_transaction`` + ``_apply_transfer`` + the receipt, for a transfer, in one pass.

    The same checks in the same order with the same errors, and the same writes, as the general
    path; each account is read (and decoded) once.
    """
    tx = vtx.tx
    chain_id = ctx.chain.chain_id
    if tx.chain_id != chain_id:
        raise WrongChain(f"transaction for chain {tx.chain_id}, this chain is {chain_id}")
    params = ctx.params
    size = len(vtx.raw)
    if size > params.max_tx_bytes:
        raise TransactionTooLarge(
            f"transaction of {size} bytes exceeds max_tx_bytes {params.max_tx_bytes}"
        )
    sender = vtx.sender
    sender_key = NS_ACCOUNT + sender
    raw_sender = view.get(sender_key)
    nonce, balance = (0, 0) if raw_sender is None else account_fields(raw_sender)
    if tx.nonce < nonce:
        raise NonceTooLow(f"nonce {tx.nonce} is below the account nonce {nonce}")
    if tx.nonce > nonce:
        raise NonceGap(f"nonce {tx.nonce} leaves a gap: the account nonce is {nonce}")
    body = vtx.body
    assert isinstance(body, Transfer)  # the caller checked
    to = body.to
    to_key = NS_ACCOUNT + to
    # The fee table counts a new account if the recipient does not exist before this transfer.
    raw_to = view.get(to_key)
    cost = compute_cost(params, tx.kind, size, new_accounts=0 if raw_to is not None else 1)
    fee = tx.fee
    if fee < cost:
        raise FeeTooLow(f"fee {fee} is below the cost {cost} of this transaction")
    if balance < fee:
        raise InsufficientFunds(f"balance {balance} cannot pay the fee {fee}")
    amount = body.amount
    total = fee + amount
    if balance < total:
        raise InsufficientFunds(f"balance {balance} cannot pay amount {amount} + fee {fee}")
    view.put(sender_key, encode_account(nonce + 1, balance - total))
    # The recipient as it is after the sender's write, so a transfer to oneself is right.
    if to_key == sender_key:
        to_nonce, to_balance = nonce + 1, balance - total
    elif raw_to is None:
        to_nonce, to_balance = 0, 0
    else:
        to_nonce, to_balance = account_fields(raw_to)
    view.put(to_key, encode_account(to_nonce, to_balance + amount))
    tip = fee - cost
    ctx.burned += cost
    ctx.tips += tip
    amount_b = amount.to_bytes(32, "big")
    cost_b = cost.to_bytes(32, "big")
    tip_b = tip.to_bytes(32, "big")
    receipt = Receipt(
        vtx.tx_id,
        _SUCCESS,
        fee,
        Amount(cost),
        (
            Event(
                "transfer",
                (Attribute("from", sender), Attribute("to", to), Attribute("amount", amount_b)),
            ),
            Event(
                "fee",
                (Attribute("payer", sender), Attribute("burned", cost_b), Attribute("tip", tip_b)),
            ),
        ),
    )
    if not (len(vtx.tx_id) == 32 and len(sender) == 20 and len(to) == 20):
        return receipt, receipt.encode()  # pragma: no cover - not from verify_transaction
    # The receipt's wire tree, written out: what Receipt.to_wire() gives for these values.
    encoded = pack(
        (
            vtx.tx_id,
            _SUCCESS,
            fee.to_bytes(32, "big"),
            cost_b,
            (
                ("transfer", (("from", sender), ("to", to), ("amount", amount_b))),
                ("fee", (("payer", sender), ("burned", cost_b), ("tip", tip_b))),
            ),
            "",
        )
    )
    return receipt, encoded


_SUCCESS = int(ReceiptStatus.SUCCESS)


def _apply_transfer(view: Overlay, vtx: VerifiedTransaction, cost: int) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, Transfer)  # kind dispatch guarantees it
    tx = vtx.tx
    sender = get_account(view, vtx.sender)
    total = tx.fee + body.amount
    if sender.balance < total:
        raise InsufficientFunds(
            f"balance {sender.balance} cannot pay amount {body.amount} + fee {tx.fee}"
        )
    put_account(view, vtx.sender, Account(Nonce(sender.nonce + 1), Amount(sender.balance - total)))
    # Read the recipient after writing the sender, so a transfer to oneself is right.
    recipient = get_account(view, body.to)
    put_account(view, body.to, Account(recipient.nonce, Amount(recipient.balance + body.amount)))
    return (
        Event(
            "transfer",
            (
                Attribute("from", vtx.sender),
                Attribute("to", body.to),
                Attribute("amount", body.amount.to_bytes(32, "big")),
            ),
        ),
    )


# --- the validator set and the parameters (DESIGN §5 "Authority") -------------------------------

_KNOWN_KINDS = KNOWN_KINDS
_ACTION_NAMES = {VoteAction.ADD: "add", VoteAction.REMOVE: "remove"}


def _authority(view: StateView, ctx: BlockContext) -> AuthorityParams:
    if ctx.authority is None:
        raw = view.get(AUTHORITY_PARAMS_KEY)
        if raw is None:
            raise InvalidBlock("the authority parameters are missing from state")
        ctx.authority = AuthorityParams.decode(raw)
    return ctx.authority


def _current_set(view: StateView, ctx: BlockContext) -> ValidatorSet:
    """set(h): before the block's end ``VALIDATOR_SET_KEY`` still holds it."""
    if ctx.validators is None:
        raw = view.get(VALIDATOR_SET_KEY)
        if raw is None:
            raise InvalidBlock("the validator set is missing from state")
        ctx.validators = ValidatorSet.decode(raw)
    return ctx.validators


def _building_set(view: StateView) -> ValidatorSet:
    """The set being built for h+2 (``NEXT_VALIDATOR_SET_KEY`` during block h)."""
    raw = view.get(NEXT_VALIDATOR_SET_KEY)
    if raw is None:
        raise InvalidBlock("the next validator set is missing from state")
    return ValidatorSet.decode(raw)


def _floor(ctx: BlockContext) -> int:
    """Votes and exits keep at least this many validators (never 0: a set cannot be empty)."""
    return max(1, ctx.chain.validator_floor)


def _bond_of(view: StateView, address: Address) -> int | None:
    raw = view.get(validator_key(address))
    return None if raw is None else ValidatorBond.decode(raw).amount


def _unbonding_of(view: StateView, address: Address) -> Unbonding | None:
    raw = view.get(unbonding_key(address))
    return None if raw is None else Unbonding.decode(raw)


def _charge(view: Overlay, vtx: VerifiedTransaction, amount: int = 0) -> None:
    """Take fee + ``amount`` from the sender and bump its nonce (after every check passed)."""
    fee = vtx.tx.fee
    account = get_account(view, vtx.sender)
    if account.balance < fee + amount:
        raise InsufficientFunds(
            f"balance {account.balance} cannot pay amount {amount} + fee {fee}"
        )
    put_account(
        view, vtx.sender, Account(Nonce(account.nonce + 1), Amount(account.balance - fee - amount))
    )


def _u256(n: int) -> bytes:
    return n.to_bytes(32, "big")


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def _hex(address: bytes) -> str:
    return "0x" + address.hex()


def _apply_bond(view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, Bond)  # kind dispatch guarantees it
    sender = vtx.sender
    authority = _authority(view, ctx)
    unbonding = _unbonding_of(view, sender)
    if unbonding is not None:
        raise BondUnbonding(
            f"the bond of {_hex(sender)} is unbonding until height {unbonding.release_height}; "
            "bond again after it is released"
        )
    total = (_bond_of(view, sender) or 0) + body.amount
    if total < authority.min_validator_bond:
        raise BondTooSmall(
            f"a bond of {total} is below min_validator_bond {authority.min_validator_bond}"
        )
    balance = get_account(view, sender).balance
    if balance < vtx.tx.fee + body.amount:
        raise InsufficientFunds(
            f"balance {balance} cannot pay bond {body.amount} + fee {vtx.tx.fee}"
        )
    _charge(view, vtx, body.amount)
    view.put(validator_key(sender), ValidatorBond(Amount(total)).encode())
    return (
        Event("bond", (Attribute("address", sender), Attribute("amount", _u256(body.amount)))),
    )


def _apply_unbond(view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext) -> tuple[Event, ...]:
    sender = vtx.sender
    authority = _authority(view, ctx)
    bond = _bond_of(view, sender)
    if bond is None:
        raise NotBonded(f"{_hex(sender)} has no bond to unbond")
    unbonding = _unbonding_of(view, sender)
    if unbonding is not None:
        raise BondUnbonding(
            f"{_hex(sender)} is already unbonding until height {unbonding.release_height}"
        )
    building = _building_set(view)
    leaves = building.is_member(sender)
    floor = _floor(ctx)
    if leaves and len(building) - 1 < floor:
        raise BelowValidatorFloor(
            f"{_hex(sender)} leaving would take the validator set to {len(building) - 1}, below "
            f"the floor of {floor}"
        )
    _charge(view, vtx)
    events = []
    if leaves:
        view.put(NEXT_VALIDATOR_SET_KEY, building.without_validator(sender).encode())
        events.append(_set_change_event(sender, VoteAction.REMOVE, ctx.height + 2))
    # The last height it may sign is h+1; its votes can be evidence until h+1+evidence_max_age,
    # and unbonding_heights > evidence_max_age keeps the bond slashable until then.
    release = ctx.height + 2 + authority.unbonding_heights
    view.put(unbonding_key(sender), Unbonding(release).encode())
    UNBONDING_QUEUE.push(view, release, sender)
    events.insert(
        0,
        Event(
            "unbond",
            (
                Attribute("address", sender),
                Attribute("amount", _u256(bond)),
                Attribute("release_height", _u64(release)),
            ),
        ),
    )
    return tuple(events)


def _set_change_event(subject: Address, action: int, height: int) -> Event:
    return Event(
        "validator_set_change",
        (
            Attribute("subject", subject),
            Attribute("action", _ACTION_NAMES[VoteAction(action)].encode()),
            Attribute("effective_height", _u64(height)),
        ),
    )


def _live_voters(
    voters: tuple[VoterEntry, ...], voter: Address, height: int, what: str, current: ValidatorSet
) -> list[VoterEntry]:
    """The votes still counting at ``height`` (unexpired, of members of the current set: so a
    tally never outgrows the set); refuses a second vote of ``voter``."""
    live = [e for e in voters if e.expires_at > height and current.is_member(e.voter)]
    for e in live:
        if e.voter == voter:
            raise DuplicateValidatorVote(
                f"{_hex(voter)} already voted {what}; the vote counts until height {e.expires_at}"
            )
    return live


def _tally_power(current: ValidatorSet, voters: list[VoterEntry]) -> int:
    return sum(current.power_of(e.voter) for e in voters)


def _require_voter(view: StateView, vtx: VerifiedTransaction, ctx: BlockContext) -> ValidatorSet:
    current = _current_set(view, ctx)
    if not current.is_member(vtx.sender):
        raise NotAValidator(f"{_hex(vtx.sender)} is not a validator of height {ctx.height}")
    return current


def _apply_validator_vote(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, ValidatorVote)  # kind dispatch guarantees it
    current = _require_voter(view, vtx, ctx)
    authority = _authority(view, ctx)
    subject, action = body.subject, VoteAction(body.action)
    building = _building_set(view)
    if action == VoteAction.ADD:
        if building.is_member(subject):
            raise InvalidVoteSubject(f"{_hex(subject)} is already a validator")
        bond = _bond_of(view, subject)
        if bond is None:
            raise InvalidVoteSubject(
                f"{_hex(subject)} has no bond: a candidate posts one (BOND) before it is voted in"
            )
        if _unbonding_of(view, subject) is not None:
            raise InvalidVoteSubject(f"{_hex(subject)} is unbonding")
        if bond < authority.min_validator_bond:
            raise InvalidVoteSubject(
                f"the bond {bond} of {_hex(subject)} is below min_validator_bond "
                f"{authority.min_validator_bond}"
            )
        if len(building) >= MAX_VALIDATORS:
            raise InvalidVoteSubject(f"the validator set is full ({MAX_VALIDATORS})")
    else:
        if not building.is_member(subject):
            raise InvalidVoteSubject(f"{_hex(subject)} is not a validator")
        floor = _floor(ctx)
        if len(building) - 1 < floor:
            raise BelowValidatorFloor(
                f"removing {_hex(subject)} would take the validator set to {len(building) - 1}, "
                f"below the floor of {floor}"
            )
    key = validator_tally_key(subject, action)
    raw = view.get(key)
    voters = () if raw is None else VoteTally.decode(raw).voters
    name = _ACTION_NAMES[action]
    live = _live_voters(voters, vtx.sender, ctx.height, f"to {name} {_hex(subject)}", current)
    _charge(view, vtx)
    expires = ctx.height + authority.vote_expiry_heights
    live.append(VoterEntry(vtx.sender, expires))
    power = _tally_power(current, live)
    events = [
        Event(
            "validator_vote",
            (
                Attribute("voter", vtx.sender),
                Attribute("subject", subject),
                Attribute("action", name.encode()),
                Attribute("power", _u64(power)),
                Attribute("total_power", _u64(current.total_power)),
            ),
        )
    ]
    if current.has_majority(power):
        changed = (
            building.with_validator(subject)
            if action == VoteAction.ADD
            else building.without_validator(subject)
        )
        view.put(NEXT_VALIDATOR_SET_KEY, changed.encode())
        if raw is not None:
            view.delete(key)
        events.append(_set_change_event(subject, action, ctx.height + 2))
    else:
        view.put(key, VoteTally(tuple(live)).encode())
        VOTE_EXPIRY_QUEUE.push(view, expires, key)
    return tuple(events)


def _apply_param_vote(
    view: Overlay, vtx: VerifiedTransaction, ctx: BlockContext
) -> tuple[Event, ...]:
    body = vtx.body
    assert isinstance(body, ParamVote)  # kind dispatch guarantees it
    current = _require_voter(view, vtx, ctx)
    authority = _authority(view, ctx)
    key = param_tally_key(body.params_hash)
    raw = view.get(key)
    if raw is None:
        if body.params is None:
            raise InvalidParams(
                f"no open proposal 0x{body.params_hash.hex()}: its first vote must carry the "
                "parameters"
            )
        problem = votable_params_problem(
            body.params,
            known_kinds=_KNOWN_KINDS,
            max_tx_bytes_hard=MAX_TX_BYTES_HARD,
            max_block_txs_hard=MAX_BLOCK_TXS_HARD,
        )
        if problem is not None:
            raise InvalidParams(f"proposed parameters: {problem}")
        if body.params == ctx.params:
            raise InvalidParams("the proposed parameters are the ones in force")
        params: VotableParams = body.params
        voters: tuple[VoterEntry, ...] = ()
    else:
        tally = ParamTally.decode(raw)
        params, voters = tally.params, tally.voters
    live = _live_voters(
        voters, vtx.sender, ctx.height, f"for 0x{body.params_hash.hex()}", current
    )
    _charge(view, vtx)
    expires = ctx.height + authority.vote_expiry_heights
    live.append(VoterEntry(vtx.sender, expires))
    power = _tally_power(current, live)
    events = [
        Event(
            "param_vote",
            (
                Attribute("voter", vtx.sender),
                Attribute("params_hash", body.params_hash),
                Attribute("power", _u64(power)),
                Attribute("total_power", _u64(current.total_power)),
            ),
        )
    ]
    if current.has_majority(power):
        # Later in the same block, another passing proposal replaces this one.
        view.put(params_at_key(ctx.height + 2), params.encode())
        if raw is not None:
            view.delete(key)
        events.append(
            Event(
                "params_change",
                (
                    Attribute("params_hash", body.params_hash),
                    Attribute("effective_height", _u64(ctx.height + 2)),
                ),
            )
        )
    else:
        view.put(key, ParamTally(params, tuple(live)).encode())
        VOTE_EXPIRY_QUEUE.push(view, expires, key)
    return tuple(events)


# --- evidence ----------------------------------------------------------------------------------


def _set_at(view: StateView, ctx: BlockContext, height: int) -> ValidatorSet:
    if height == ctx.height:
        return _current_set(view, ctx)
    try:
        return validator_set_at(view, height)
    except ValidatorHistoryError as exc:  # pragma: no cover - the age check comes first
        raise InvalidEvidence(str(exc)) from exc


def _burn(view: Overlay, amount: int) -> None:
    if amount:
        raw = view.get(SUPPLY_KEY)
        supply = Supply(Amount(0), Amount(0)) if raw is None else Supply.decode(raw)
        view.put(SUPPLY_KEY, Supply(supply.issued, Amount(supply.burned + amount)).encode())


def apply_evidence(view: Overlay, ev: DuplicateVoteEvidence, ctx: BlockContext) -> None:
    """Check one evidence item for block ``ctx.height`` and punish its validator.

    Raises an ``InvalidEvidence`` (nothing written) if it is not valid here. The bond is burned,
    an unbonding of it cancelled, and the validator taken out of the set being built for h+2
    (unless it is that set's last member: an empty set could never sign again).
    """
    max_age = ctx.chain.evidence_max_age
    check_evidence(
        ctx.chain.chain_id,
        ev,
        height=ctx.height,
        max_age=max_age,
        validators_at=lambda h: _set_at(view, ctx, h),
        seen=lambda k: view.get(evidence_seen_key(k)) is not None,
    )
    key = evidence_key(ev)
    vote_height = evidence_height(ev)
    offender = evidence_validator(ev)
    view.put(evidence_seen_key(key), EvidenceSeen(vote_height).encode())
    EVIDENCE_EXPIRY_QUEUE.push(view, vote_height + max_age + 1, key)
    bond = _bond_of(view, offender)
    if bond is not None:
        view.delete(validator_key(offender))
        _burn(view, bond)
    if view.get(unbonding_key(offender)) is not None:
        view.delete(unbonding_key(offender))
    building = _building_set(view)
    if building.is_member(offender) and len(building) > 1:
        view.put(NEXT_VALIDATOR_SET_KEY, building.without_validator(offender).encode())


def process_evidence(
    view: Overlay, evidence: Sequence[DuplicateVoteEvidence], ctx: BlockContext
) -> None:
    """The evidence phase of a block: every item must be valid (``InvalidBlock`` otherwise)."""
    if not evidence:
        return
    cap = _authority(view, ctx).max_block_evidence
    if len(evidence) > cap:
        raise InvalidBlock(f"{len(evidence)} evidence items exceed max_block_evidence {cap}")
    for i, ev in enumerate(evidence):
        try:
            apply_evidence(view, ev, ctx)
        except InvalidEvidence as exc:
            raise InvalidBlock(
                f"evidence {i}: {exc.message}", data={"index": i, "code": exc.code}
            ) from exc


# --- end of block ------------------------------------------------------------------------------


def _release_bond(view: Overlay, due: int, address: Address) -> None:
    """An unbonding queue entry: return the bond if it is still the one queued for ``due``."""
    unbonding = _unbonding_of(view, address)
    if unbonding is None or unbonding.release_height != due:
        return  # slashed meanwhile
    bond = _bond_of(view, address) or 0
    view.delete(unbonding_key(address))
    view.delete(validator_key(address))
    account = get_account(view, address)
    put_account(view, address, Account(account.nonce, Amount(account.balance + bond)))


def _expire_votes(view: Overlay, key: bytes, now: int) -> None:
    raw = view.get(key)
    if raw is None:
        return  # passed meanwhile
    if key.startswith(NS_VALIDATOR_TALLY):
        tally = VoteTally.decode(raw)
        live = tuple(e for e in tally.voters if e.expires_at > now)
        updated = None if not live else VoteTally(live).encode()
    else:
        assert key.startswith(NS_PARAM_TALLY)
        ptally = ParamTally.decode(raw)
        live = tuple(e for e in ptally.voters if e.expires_at > now)
        updated = None if not live else ParamTally(ptally.params, live).encode()
    if updated is None:
        view.delete(key)
    elif updated != raw:
        view.put(key, updated)


def end_block(view: Overlay, ctx: BlockContext) -> None:
    """Fees, the protocol's own queued work (each queue capped per block), parameters and sets."""
    settle_fees(view, ctx)
    authority = _authority(view, ctx)
    h = ctx.height
    work = authority.max_queue_work_per_block
    for due, entry in UNBONDING_QUEUE.pop_due(view, h, work):
        _release_bond(view, due, Address(entry))
    for _, tally_key in VOTE_EXPIRY_QUEUE.pop_due(view, h, work):
        _expire_votes(view, tally_key, h)
    for _, key in EVIDENCE_EXPIRY_QUEUE.pop_due(view, h, work):
        seen = evidence_seen_key(Hash32(key))
        if view.get(seen) is not None:
            view.delete(seen)
    for economy_end_block in ECONOMY_END_BLOCK:
        economy_end_block(view, ctx)
    pending_params = params_at_key(h + 1)
    raw = view.get(pending_params)
    if raw is not None:
        view.put(PARAMS_KEY, raw)
        view.delete(pending_params)
    rotate_validator_sets(view, h, ctx.chain.evidence_max_age)


def validator_context_at(view: StateView, height: int) -> ValidatorContext:
    """The sets that check block ``height`` built on the state ``view`` (after block height−1)."""
    return ValidatorContext(
        validator_set_at(view, height),
        validator_set_at(view, height + 1),
        validator_set_at(view, height - 1) if height > 1 else None,
    )


def settle_fees(view: Overlay, ctx: BlockContext) -> None:
    """Credit the block's tips to the proposer and record the burned cost in the supply."""
    if ctx.tips:
        proposer = get_account(view, ctx.proposer)
        put_account(
            view, ctx.proposer, Account(proposer.nonce, Amount(proposer.balance + ctx.tips))
        )
    if ctx.burned:
        raw = view.get(SUPPLY_KEY)
        supply = Supply(Amount(0), Amount(0)) if raw is None else Supply.decode(raw)
        view.put(SUPPLY_KEY, Supply(supply.issued, Amount(supply.burned + ctx.burned)).encode())


# --- blocks ------------------------------------------------------------------------------------


def compute_receipts_root(
    receipts: Sequence[Receipt], encoded: Sequence[bytes] | None = None
) -> Hash32:
    """The Merkle root over the receipts' encodings (``encoded``, if the caller has them)."""
    return merkle_root([r.encode() for r in receipts] if encoded is None else encoded)


def check_commit(
    chain_id: int,
    commit: Commit,
    height: int,
    block_hash: bytes,
    validators: ValidatorSet,
    block_time: int,
) -> list[int]:
    """Check that ``commit`` finalizes ``block_hash`` at ``height``; return the precommit times.

    Every precommit must be a validly signed precommit for that block by a distinct member of
    ``validators``, with a time after the block's own (BFT time: a precommit for B carries
    ``time ≥ B.time + 1``), and together they must hold more than two thirds of the power.
    """
    if commit.height != height:
        raise InvalidCommit(f"commit is for height {commit.height}, expected {height}")
    if commit.block_hash != block_hash:
        raise InvalidCommit("commit is for another block")
    seen: set[bytes] = set()
    power = 0
    times: list[tuple[int, int]] = []
    for signed in commit.precommits:
        vote = signed.vote
        if (
            vote.vote_type != VoteType.PRECOMMIT
            or vote.height != height
            or vote.round != commit.round
            or vote.block_hash != block_hash
        ):
            raise InvalidCommit("commit holds a vote that is not a precommit for this block")
        try:
            signer = vote_signer(chain_id, signed)
        except InvalidSignature as exc:
            raise InvalidCommit(f"commit holds a badly signed precommit: {exc.message}") from exc
        if signer != vote.validator:
            raise InvalidCommit("precommit signature does not match its validator")
        if vote.time <= block_time:
            raise InvalidCommit(
                f"precommit time {vote.time} is not after the block's time {block_time}"
            )
        if signer in seen:
            raise InvalidCommit("commit holds two precommits of one validator")
        validator_power = validators.power_of(Address(signer))
        if validator_power == 0:
            raise InvalidCommit("commit holds a precommit of a non-validator")
        seen.add(signer)
        power += validator_power
        times.append((vote.time, validator_power))
    if not validators.has_quorum(power):
        raise InvalidCommit("commit lacks more than two thirds of the voting power")
    return [t for t, _ in times]


def expected_block_time(
    chain: ChainParams, parent: Header | None, last_commit: Commit | None,
    previous: ValidatorSet | None,
) -> int:
    if parent is None:
        return chain.genesis_time
    if last_commit is None or previous is None:
        raise InvalidBlock("a block after the first must carry the last commit")
    return block_time_from_commit(last_commit.precommits, previous)


def check_header(
    chain: ChainParams,
    params: VotableParams,
    parent: Header | None,
    block: Block,
    validators: ValidatorContext,
) -> None:
    """Everything about a block that does not need execution."""
    h = block.header
    if h.chain_id != chain.chain_id:
        raise InvalidBlock(f"block for chain {h.chain_id}, this chain is {chain.chain_id}")
    expected_height = 1 if parent is None else parent.height + 1
    if h.height != expected_height:
        raise InvalidBlock(f"block height {h.height}, expected {expected_height}")
    expected_parent = Hash32(b"\x00" * 32) if parent is None else parent.hash()
    if h.parent_hash != expected_parent:
        raise InvalidBlock("wrong parent hash")
    expected_proposer = validators.current.proposer(h.height, h.round)
    if h.proposer != expected_proposer:
        raise InvalidBlock(
            f"wrong proposer for height {h.height} round {h.round}: "
            f"expected 0x{expected_proposer.hex()}"
        )
    if h.validators_hash != validators.current.hash():
        raise InvalidBlock("validators hash does not match the validator set of this height")
    if h.next_validators_hash != validators.next.hash():
        raise InvalidBlock("next validators hash does not match the next validator set")
    if len(block.txs) > params.max_block_txs:
        raise InvalidBlock(f"{len(block.txs)} transactions exceed max_block_txs")
    size = sum(len(t) for t in block.txs)
    if size > params.max_block_bytes:
        raise InvalidBlock(f"{size} bytes of transactions exceed max_block_bytes")
    if h.tx_root != compute_tx_root(block.txs):
        raise InvalidBlock("tx root does not match the transactions")
    if h.evidence_root != compute_evidence_root(block.evidence):
        raise InvalidBlock("evidence root does not match the evidence")
    if h.last_commit_hash != compute_last_commit_hash(block.last_commit):
        raise InvalidBlock("last commit hash does not match the last commit")
    if parent is None:
        if block.last_commit is not None:
            raise InvalidBlock("the first block carries no last commit")
    else:
        if block.last_commit is None or validators.previous is None:
            raise InvalidBlock("a block after the first must carry the last commit")
        check_commit(
            chain.chain_id,
            block.last_commit,
            parent.height,
            parent.hash(),
            validators.previous,
            parent.time,
        )
    expected_time = expected_block_time(chain, parent, block.last_commit, validators.previous)
    if h.time != expected_time:
        raise InvalidBlock(f"block time {h.time}, expected {expected_time} (BFT time)")
    if parent is not None and h.time <= parent.time:
        raise InvalidBlock("block time must be after the parent's")


def verify_block_transactions(
    txs: Sequence[bytes], max_tx_bytes: int
) -> list[VerifiedTransaction]:
    """Decode and recover every transaction (the CPU-heavy part; safe to run in a thread)."""
    out = []
    for i, raw in enumerate(txs):
        try:
            out.append(verify_transaction(raw, max_tx_bytes))
        except InvalidTransaction as exc:
            raise InvalidBlock(f"transaction {i}: {exc.message}", data={"index": i}) from exc
    return out


def execute_block(
    view: StateView,
    chain: ChainParams,
    params: VotableParams,
    header: Header,
    verified: Sequence[VerifiedTransaction],
    encoded: list[bytes] | None = None,
    evidence: Sequence[DuplicateVoteEvidence] = (),
) -> tuple[Overlay, list[Receipt]]:
    """Run a block on a new overlay of ``view``: ``evidence``, then ``verified`` in order, then
    ``end_block`` (fees, queues, parameters, validator sets).

    ``encoded``, if given, receives the encoding of each receipt (in order).
    """
    ctx = BlockContext(
        chain, params, header.height, header.time, header.proposer,
        parent_hash=header.parent_hash,
    )
    overlay = Overlay(view)
    process_evidence(overlay, evidence, ctx)
    receipts = []
    encodings = [] if encoded is None else encoded
    for i, vtx in enumerate(verified):
        try:
            receipt, receipt_bytes = _apply(overlay, vtx, ctx)
        except InvalidTransaction as exc:
            raise InvalidBlock(
                f"transaction {i} ({vtx.tx_id.hex()}): {exc.message}",
                data={"index": i, "code": exc.code},
            ) from exc
        receipts.append(receipt)
        encodings.append(receipt_bytes)
    end_block(overlay, ctx)
    return overlay, receipts


def apply_block(
    view: StateView,
    chain: ChainParams,
    params: VotableParams,
    parent: Header | None,
    block: Block,
    validators: ValidatorContext,
    state_root_fn: StateRootFn,
    verified: Sequence[VerifiedTransaction] | None = None,
) -> BlockResult:
    """Fully validate ``block`` on top of ``parent`` and return its state changes and receipts.

    ``verified`` may carry the already verified transactions (signature recovery done in a worker
    thread); otherwise they are verified here.
    """
    check_header(chain, params, parent, block, validators)
    if verified is None:
        verified = verify_block_transactions(block.txs, params.max_tx_bytes)
    elif [v.raw for v in verified] != list(block.txs):
        raise InvalidBlock("verified transactions do not match the block")
    encoded: list[bytes] = []
    overlay, receipts = execute_block(
        view, chain, params, block.header, verified, encoded, block.evidence
    )
    receipts_root = compute_receipts_root(receipts, encoded)
    if block.header.receipts_root != receipts_root:
        raise InvalidBlock("receipts root does not match the executed transactions")
    state_root = state_root_fn(overlay.changes)
    if block.header.state_root != state_root:
        raise InvalidBlock("state root does not match the state after the block")
    return BlockResult(
        dict(overlay.changes), tuple(receipts), receipts_root, state_root, tuple(encoded)
    )


@dataclass(slots=True)
class BuiltBlock:
    block: Block
    result: BlockResult
    rejected: list[tuple[bytes, InvalidTransaction]] = field(default_factory=list)
    # Evidence offered but left out as invalid here (already processed, too old, ...): the pool
    # can drop it (``EvidencePool.mark_done``).
    rejected_evidence: list[tuple[DuplicateVoteEvidence, InvalidEvidence]] = field(
        default_factory=list
    )


def build_block(
    view: StateView,
    chain: ChainParams,
    params: VotableParams,
    parent: Header | None,
    round_: int,
    proposer: Address,
    last_commit: Commit | None,
    validators: ValidatorContext,
    candidates: Sequence[VerifiedTransaction],
    state_root_fn: StateRootFn,
    evidence: Sequence[DuplicateVoteEvidence] = (),
) -> BuiltBlock:
    """Assemble a valid block from ``evidence`` and ``candidates`` (in order), skipping those
    that fail (evidence up to ``max_block_evidence``).

    The caller passes mempool transactions already verified and pool evidence (oldest first);
    the result's header carries every root, so ``apply_block`` on it succeeds.
    """
    height = 1 if parent is None else parent.height + 1
    if parent is not None:
        # A block is only as good as its last commit: refuse to build on one that does not
        # finalize the parent, rather than produce a block every validator would reject.
        if last_commit is None or validators.previous is None:
            raise InvalidBlock("a block after the first must carry the last commit")
        check_commit(
            chain.chain_id, last_commit, parent.height, parent.hash(), validators.previous,
            parent.time,
        )
    elif last_commit is not None:
        raise InvalidBlock("the first block carries no last commit")
    time_ms = expected_block_time(chain, parent, last_commit, validators.previous)
    parent_hash = ZERO_HASH if parent is None else parent.hash()
    ctx = BlockContext(chain, params, height, time_ms, proposer, parent_hash=parent_hash)
    overlay = Overlay(view)
    included_evidence: list[DuplicateVoteEvidence] = []
    rejected_evidence: list[tuple[DuplicateVoteEvidence, InvalidEvidence]] = []
    if evidence:
        cap = _authority(overlay, ctx).max_block_evidence
        for ev in evidence:
            if len(included_evidence) >= cap:
                break
            ev_child = overlay.child()
            try:
                apply_evidence(ev_child, ev, ctx)
            except InvalidEvidence as exc:
                rejected_evidence.append((ev, exc))
                continue
            ev_child.merge_into_parent()
            included_evidence.append(ev)
    included: list[VerifiedTransaction] = []
    receipts: list[Receipt] = []
    encoded: list[bytes] = []
    rejected: list[tuple[bytes, InvalidTransaction]] = []
    size = 0
    for vtx in candidates:
        if len(included) >= params.max_block_txs:
            break
        if size + vtx.size > params.max_block_bytes:
            continue
        child = overlay.child()
        try:
            receipt, receipt_bytes = _apply(child, vtx, ctx)
        except InvalidTransaction as exc:
            rejected.append((vtx.raw, exc))
            continue
        child.merge_into_parent()
        included.append(vtx)
        receipts.append(receipt)
        encoded.append(receipt_bytes)
        size += vtx.size
    end_block(overlay, ctx)
    txs = tuple(v.raw for v in included)
    evidence_included = tuple(included_evidence)
    receipts_root = compute_receipts_root(receipts, encoded)
    state_root = state_root_fn(overlay.changes)
    header = Header(
        chain_id=chain.chain_id,
        height=height,  # type: ignore[arg-type]
        round=round_,  # type: ignore[arg-type]
        parent_hash=parent_hash,
        time=TimestampMs(time_ms),
        proposer=proposer,
        tx_root=compute_tx_root(txs),
        receipts_root=receipts_root,
        state_root=state_root,
        validators_hash=validators.current.hash(),
        next_validators_hash=validators.next.hash(),
        last_commit_hash=compute_last_commit_hash(last_commit),
        evidence_root=compute_evidence_root(evidence_included),
    )
    block = Block(header, txs, evidence_included, last_commit)
    result = BlockResult(
        dict(overlay.changes), tuple(receipts), receipts_root, state_root, tuple(encoded)
    )
    return BuiltBlock(block, result, rejected, rejected_evidence)


__all__ = [
    "BlockContext",
    "BlockResult",
    "BuiltBlock",
    "ValidatorContext",
    "apply_block",
    "apply_evidence",
    "apply_transaction",
    "build_block",
    "check_commit",
    "check_header",
    "check_transaction",
    "compute_receipts_root",
    "end_block",
    "execute_block",
    "process_evidence",
    "settle_fees",
    "validator_context_at",
    "verify_block_transactions",
]
