"""A small in-memory chain driven by the pure functions, whose validator sets and parameters come
from its own state (``validator_context_at``, ``PARAMS_KEY``), as a node's would.

Each block is built with ``build_block``, re-applied with ``apply_block`` (the result must be the
same) and committed with precommits of every validator of its height (dev keys).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from node.consensus.blocks import Block, Commit, DuplicateVoteEvidence, Header
from node.consensus.params import AuthorityParams, FeeSchedule, VotableParams
from node.consensus.state import (
    NEXT_VALIDATOR_SET_KEY,
    PARAMS_KEY,
    SUPPLY_KEY,
    VALIDATOR_SET_KEY,
    Account,
    DictView,
    Supply,
    account_key,
    get_account,
)
from node.consensus.transition import (
    BlockResult,
    BuiltBlock,
    ValidatorContext,
    apply_block,
    build_block,
    validator_context_at,
)
from node.consensus.txs import KNOWN_KINDS, VerifiedTransaction, verify_transaction
from node.consensus.validators import ValidatorSet
from node.genesis import Genesis, build_genesis_state
from node.storage.smt import compute_root
from node.types import Address, Amount, Hash32
from tests.helpers import (
    ALL_FEES,
    key,
    make_authority,
    make_commit,
    make_genesis,
    total_balances,
    total_bonds,
)

# Dev keys searched for validators' signing keys.
_KEY_RANGE = 64


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


class AuthorityChain:
    def __init__(self, genesis: Genesis) -> None:
        self.genesis = genesis
        self.chain = genesis.chain_params
        self.state: dict[bytes, bytes] = dict(build_genesis_state(genesis))
        self.head: Header | None = None
        self.last_commit: Commit | None = None
        self.headers: dict[int, Header] = {}
        self._keys = {key(i).address: key(i) for i in range(_KEY_RANGE)}

    # --- reading ---------------------------------------------------------------------------------

    @property
    def height(self) -> int:
        """The height of the next block."""
        return 1 if self.head is None else self.head.height + 1

    def view(self) -> DictView:
        return DictView(self.state)

    @property
    def params(self) -> VotableParams:
        """The votable parameters in force for the next block."""
        return VotableParams.decode(self.state[PARAMS_KEY])

    def vctx(self) -> ValidatorContext:
        return validator_context_at(self.view(), self.height)

    def current_set(self) -> ValidatorSet:
        """set(next block's height) as ``VALIDATOR_SET_KEY`` holds it."""
        return ValidatorSet.decode(self.state[VALIDATOR_SET_KEY])

    def next_set(self) -> ValidatorSet:
        """The set of height + 1 (``NEXT_VALIDATOR_SET_KEY``)."""
        return ValidatorSet.decode(self.state[NEXT_VALIDATOR_SET_KEY])

    def balance(self, who: int | Address) -> int:
        address = key(who).address if isinstance(who, int) else who
        return get_account(self.view(), address).balance

    def nonce(self, who: int) -> int:
        return get_account(self.view(), key(who).address).nonce

    def supply(self) -> Supply:
        return Supply.decode(self.state[SUPPLY_KEY])

    def check_supply(self) -> None:
        """balances + bonds + burned == issued (DESIGN §4), slashing included."""
        supply = self.supply()
        assert supply.issued == self.genesis.total_supply
        assert total_balances(self.state) + total_bonds(self.state) + supply.burned == (
            supply.issued
        )

    def has_account(self, who: int) -> bool:
        return account_key(key(who).address) in self.state

    # --- blocks ----------------------------------------------------------------------------------

    def root_fn(self, changes: Mapping[bytes, bytes | None]) -> Hash32:
        return compute_root(merged(self.state, changes))

    def build(
        self,
        txs: Sequence[bytes | VerifiedTransaction] = (),
        *,
        evidence: Sequence[DuplicateVoteEvidence] = (),
        round_: int = 0,
    ) -> BuiltBlock:
        vctx = self.vctx()
        candidates = [
            t if isinstance(t, VerifiedTransaction) else verify_transaction(t) for t in txs
        ]
        return build_block(
            self.view(),
            self.chain,
            self.params,
            self.head,
            round_,
            vctx.current.proposer(self.height, round_),
            self.last_commit,
            vctx,
            candidates,
            self.root_fn,
            evidence,
        )

    def apply(self, block: Block) -> BlockResult:
        return apply_block(
            self.view(), self.chain, self.params, self.head, block, self.vctx(), self.root_fn
        )

    def commit(self, block: Block, result: BlockResult) -> None:
        signers = [self._keys[a] for a in self.vctx().current.addresses]
        self.state = merged(self.state, result.changes)
        self.head = block.header
        self.headers[block.header.height] = block.header
        self.last_commit = make_commit(
            block.hash(),
            block.header.height,
            block.header.round,
            signers,
            time_ms=block.header.time + 1_000,
        )

    def step(
        self,
        txs: Sequence[bytes | VerifiedTransaction] = (),
        *,
        evidence: Sequence[DuplicateVoteEvidence] = (),
        strict: bool = True,
    ) -> BuiltBlock:
        """Build, re-apply and commit the next block; ``strict``: every tx/evidence got in."""
        built = self.build(txs, evidence=evidence)
        if strict:
            assert not built.rejected, [e.message for _, e in built.rejected]
            assert not built.rejected_evidence, [e.message for _, e in built.rejected_evidence]
        result = self.apply(built.block)
        assert result == built.result
        self.commit(built.block, result)
        return built

    def advance_to(self, height: int) -> None:
        """Commit empty blocks until the next block is ``height``."""
        while self.height < height:
            self.step()


def fund(amount: int) -> dict[int | Address, int]:
    """Balances for the validator dev keys 0, 5..8 (genesis funds only 1..N by default)."""
    return dict.fromkeys((0, 5, 6, 7, 8), amount)


MIN_BOND = 1_000_000
# Short periods so tests see votes expire and bonds come back within a few blocks.
AUTH: AuthorityParams = make_authority(
    min_validator_bond=Amount(MIN_BOND),
    vote_expiry_heights=3,
    unbonding_heights=6,
    max_queue_work_per_block=64,
    max_block_evidence=4,
)
def complete_fees(fees: tuple[FeeSchedule, ...]) -> tuple[FeeSchedule, ...]:
    """``fees`` plus a schedule (priced like the first) for every known kind it lacks, sorted:
    a parameter proposal must price every kind, the economy's included."""
    by_kind = {f.kind: f for f in fees}
    for kind in KNOWN_KINDS - by_kind.keys():
        by_kind[kind] = replace(fees[0], kind=kind)
    return tuple(by_kind[k] for k in sorted(by_kind))


EVERY_KIND_FEES = complete_fees(ALL_FEES)
EVIDENCE_MAX_AGE = 4  # < unbonding_heights, as genesis.json requires
VALIDATORS4 = (0, 5, 6, 7)
CANDIDATE = 8


def genesis4(**overrides: object) -> Genesis:
    """Validators 0, 5, 6, 7 (power 1), dev keys 0..8 funded, a fee schedule for every kind,
    short authority periods."""
    kw: dict[str, object] = {
        "funded": 4,
        "validators": VALIDATORS4,
        "balances": fund(10**21),
        "fees": EVERY_KIND_FEES,
        "evidence_max_age": EVIDENCE_MAX_AGE,
        # A parameter proposal carries the whole fee table (one schedule per kind).
        "max_tx_bytes": 8_192,
        "authority": AUTH,
    }
    kw.update(overrides)
    return make_genesis(**kw)  # type: ignore[arg-type]


def genesis1(**overrides: object) -> Genesis:
    """``genesis4`` with dev key 0 the only validator."""
    return genesis4(validators=(0,), **overrides)


def account_of(state: Mapping[bytes, bytes], who: int) -> Account:
    raw = state.get(account_key(key(who).address))
    return Account.decode(raw) if raw is not None else Account(0, 0)  # type: ignore[arg-type]


__all__ = [
    "AUTH",
    "CANDIDATE",
    "EVIDENCE_MAX_AGE",
    "MIN_BOND",
    "VALIDATORS4",
    "AuthorityChain",
    "account_of",
    "fund",
    "genesis1",
    "genesis4",
    "merged",
]
