"""What every economy module shares: kind numbers, roles, the genesis-fixed ``EconomyParams``,
state key prefixes, the ``KindHandler`` a module registers, and balance helpers.

A module's ``apply`` follows the transition's rules (``node.consensus.transition``): every check
first, each failure a specific ``NeuroSeedError``; then writes into the overlay. It must take the
fee and bump the nonce with ``charge`` (after its checks); the fee's split (burned cost, tip) is
done by the transition around it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from node.consensus.receipts import Event
from node.consensus.state import (
    SUPPLY_KEY,
    Account,
    Overlay,
    StateView,
    Supply,
    get_account,
    put_account,
)
from node.encoding import Record
from node.errors import InsufficientFunds, InvalidTransaction
from node.types import Address, Amount, Nonce

if TYPE_CHECKING:
    from node.consensus.transition import BlockContext
    from node.consensus.txs import VerifiedTransaction


class EconomyKind(IntEnum):
    """Transaction kinds of the economy (``node.consensus.txs.TxKind`` holds 1–19)."""

    # roles, datasets (node/economy/roles.py, datasets.py, composite.py)
    ROLE_REGISTER = 20
    ROLE_RESIGN = 21
    DATASET_REGISTER = 22
    COMPOSITE_DEFINE = 23
    # paid access with fair-exchange key delivery (node/economy/purchases.py)
    PURCHASE = 30
    KEY_POST = 31
    KEY_DISPUTE = 32
    LEAF_DISPUTE_OPEN = 33  # a dispute over one full ciphertext leaf, posted in parts
    LEAF_DISPUTE_PART = 34
    # storage providers and deals (node/economy/deals.py)
    STORAGE_OFFER = 40
    OFFER_WITHDRAW = 41
    DEAL_CREATE = 42
    DEAL_PROOF = 43
    # the model registry with its lineage (node/economy/models.py)
    MODEL_REGISTER = 50
    # the compute market (node/economy/tasks.py)
    PROVIDER_REGISTER = 60
    TASK_SUBMIT = 61
    TASK_CLAIM = 62
    TASK_RESULT = 63
    VERIFY_COMMIT = 64
    VERIFY_REVEAL = 65
    TASK_CHALLENGE = 66
    BISECT_STEP = 67
    TASK_CANCEL = 68
    TASK_FAIL = 69


class Role(IntEnum):
    """The whitepaper's roles (DESIGN §10). ATTESTER is the paper's 'validator', distinct from the
    consensus validators of ``node.consensus``."""

    DATA_SUPPLIER = 1
    STORAGE_PROVIDER = 2
    COMPUTE_PROVIDER = 3
    MODEL_DEVELOPER = 4
    ATTESTER = 5
    DISTRIBUTOR = 6
    CUSTOMER = 7


# State key prefixes of the economy: namespace byte || version byte (see node/consensus/state.py,
# which uses 0x01–0x12). Each module keeps its own keys under its namespace(s).
ECONOMY_PARAMS_KEY = b"\x20\x01"  # -> EconomyParams (fixed at genesis)
NS_ROLES = b"\x21\x01"  # roles.py
NS_DATASET = b"\x22\x01"  # datasets.py / composite.py
NS_DATASET_AUX = b"\x23\x01"  # datasets.py / composite.py (indexes, if any)
NS_PURCHASE = b"\x24\x01"  # purchases.py
QUEUE_PURCHASE = b"\x25\x01"  # purchases.py: key deadlines and dispute windows
NS_OFFER = b"\x26\x01"  # deals.py
NS_DEAL = b"\x27\x01"  # deals.py
QUEUE_DEAL = b"\x28\x01"  # deals.py: epochs, challenge windows
NS_DEAL_AUX = b"\x29\x01"  # deals.py
NS_LEAF_DISPUTE = b"\x2a\x01"  # purchases.py: open leaf disputes and their posted parts
NS_MODEL = b"\x2b\x01"  # models.py: + model id -> ModelRecord
NS_MODEL_CHILD = b"\x2c\x01"  # models.py: + ancestor id + child id -> relation (lineage edges)
NS_MODEL_SIG = b"\x2d\x01"  # models.py: + signature + model id -> b"" (models by signature)
NS_COMPUTE_PROVIDER = b"\x2e\x01"  # tasks.py: + provider -> ComputeProvider
NS_PROVIDER_CLASS = b"\x2f\x01"  # tasks.py: + sha256(platform class) -> ClassProviders
NS_TASK = b"\x30\x01"  # tasks.py: + task id -> Task
QUEUE_TASK = b"\x31\x01"  # tasks.py: deadlines, verifier draws, windows, dispute rounds
NS_OPEN_PURCHASES = b"\x32\x01"  # purchases.py: + buyer + dataset -> OpenPurchases (tasks.py)


DEFAULT_TASK_MIN_BOND = Amount(10**18)
DEFAULT_CHALLENGE_SLASH = Amount(10 * 10**18)


@dataclass(frozen=True, slots=True)
class EconomyParams(Record):
    """Economy rules fixed at genesis (``genesis.json`` "economy_params"), kept in state under
    ``ECONOMY_PARAMS_KEY`` like ``AuthorityParams`` (docs/adr/0004)."""

    # roles
    supplier_bond: Amount  # locked by DATA_SUPPLIER registration; slashed by a lost key dispute
    provider_bond: Amount  # locked by STORAGE_PROVIDER / COMPUTE_PROVIDER registration
    # datasets and composites
    max_composite_depth: int  # nesting of composites of composites
    max_composite_ranges: int  # (source, range) entries after flattening
    # purchases / fair exchange
    key_post_heights: int  # the owner must post the wrapped key within this many heights
    dispute_window_heights: int  # after the key is posted the buyer may dispute this long
    key_dispute_slash: Amount  # taken from the owner's supplier bond on a lost dispute
    # storage deals
    deal_epoch_heights: int  # one payment / challenge epoch
    deal_challenge_window: int  # heights to answer a challenge (≤ 5, DESIGN §9)
    deal_challenge_percent: int  # share of live deals challenged per epoch (1–100)
    deal_segments_per_challenge: int
    max_deal_epochs: int
    min_collateral_percent: int  # collateral ≥ this % of the deal's total price
    max_challenges_per_block: int  # per-block cap on the deal queue work (DESIGN §4)
    # an open leaf dispute takes its parts until the dispute window's end + this many heights
    leaf_dispute_heights: int
    # models: at most this many parents per merge step, and a parameter cap per registered model
    # (DESIGN §8: the inverted tree; feature union would otherwise grow 4x per level)
    max_merge_parents: int = 4
    max_step_parameters: int = 1_000_000_000
    # the compute market (tasks.py; docs/compute-market.md)
    task_bond_percent: int = 10  # a claim locks this % of its price as the task bond ...
    task_min_bond: Amount = DEFAULT_TASK_MIN_BOND  # ... and at least this much
    task_miss_slash_percent: int = 50  # of the bond burned when a claimed task misses its deadline
    task_reopen_heights: int = 100  # a reopened task's deadline is extended (once) by this much
    max_task_deadline_heights: int = 100_000  # a deadline at most this far above the submission
    verify_commit_heights: int = 10  # verifiers commit within this many heights of the draw
    verify_reveal_heights: int = 10  # then reveal within this many
    task_challenge_heights: int = 20  # the challenge window after the verification
    bisect_step_heights: int = 10  # each bisection round is answered within this many heights
    challenge_slash: Amount = DEFAULT_CHALLENGE_SLASH  # from a losing challenger's provider bond
    dispute_reward_percent: int = 50  # of the loser's slashed stake to the winner (rest burned)
    royalty_percent: int = 5  # of the price, to the owners of the task's input datasets / models
    max_providers_per_class: int = 256  # providers listed per platform class (verifier draws)
    max_task_work_per_block: int = 64  # per-block cap on the task queue work (DESIGN §4)


# Hard ceilings of the genesis-fixed composite caps (genesis.json cannot go above them): a
# composite's flattened entries live in one state record.
MAX_COMPOSITE_DEPTH_HARD = 16
MAX_COMPOSITE_RANGES_HARD = 1024
# A registration lists its parents in one record (node.merge.recipe caps a recipe at 16).
MAX_MERGE_PARENTS_HARD = 16
# The per-class provider list is one state record read by every verifier draw.
MAX_PROVIDERS_PER_CLASS_HARD = 256


class EconomyError(InvalidTransaction):
    """Base of the economy's transaction errors (codes 2200–2299, one range per module)."""

    code = 2200
    reason = "invalid economy transaction"


DEFAULT_ECONOMY_PARAMS = EconomyParams(
    supplier_bond=Amount(100 * 10**18),
    provider_bond=Amount(100 * 10**18),
    max_composite_depth=4,
    max_composite_ranges=64,
    key_post_heights=100,
    dispute_window_heights=100,
    key_dispute_slash=Amount(50 * 10**18),
    deal_epoch_heights=20,
    deal_challenge_window=5,
    deal_challenge_percent=100,
    deal_segments_per_challenge=4,
    max_deal_epochs=100_000,
    min_collateral_percent=100,
    max_challenges_per_block=64,
    leaf_dispute_heights=100,
    max_merge_parents=4,
    max_step_parameters=1_000_000_000,
)


def economy_params(view: StateView) -> EconomyParams:
    raw = view.get(ECONOMY_PARAMS_KEY)
    return DEFAULT_ECONOMY_PARAMS if raw is None else EconomyParams.decode(raw)


ApplyFn = Callable[[Overlay, "VerifiedTransaction", "BlockContext"], tuple[Event, ...]]
RecordsFn = Callable[[StateView, "VerifiedTransaction"], int]
EndBlockFn = Callable[[Overlay, "BlockContext"], None]


@dataclass(frozen=True, slots=True)
class KindHandler:
    """One transaction kind of an economy module."""

    kind: int
    body: type[Record]
    apply: ApplyFn
    # State records the transaction adds (the fee table's per-record unit), read before it.
    new_records: RecordsFn
    # Stateless checks of a decoded body beyond its encoding; raise InvalidBody.
    check_body: Callable[[Any], None] | None = None


# --- balances ----------------------------------------------------------------------------------


def charge(view: Overlay, vtx: VerifiedTransaction, amount: int = 0) -> None:
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


def credit(view: Overlay, address: Address, amount: int) -> None:
    if amount:
        account = get_account(view, address)
        put_account(view, address, Account(account.nonce, Amount(account.balance + amount)))


def burn(view: Overlay, amount: int) -> None:
    """Record ``amount`` (already taken from an account, bond or escrow) as burned supply."""
    if amount:
        raw = view.get(SUPPLY_KEY)
        supply = Supply(Amount(0), Amount(0)) if raw is None else Supply.decode(raw)
        view.put(SUPPLY_KEY, Supply(supply.issued, Amount(supply.burned + amount)).encode())


def u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def u256(n: int) -> bytes:
    return n.to_bytes(32, "big")
