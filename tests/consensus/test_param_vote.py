"""Parameter votes (DESIGN §4 "Parameters"): validators vote new votable parameters in by hash
and record; more than half passes; the new values are in force from h+2."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from node.consensus.params import VotableParams
from node.consensus.state import (
    PARAMS_KEY,
    DictView,
    Overlay,
    param_tally_key,
    params_at_key,
)
from node.consensus.transition import BlockContext, apply_transaction
from node.consensus.txs import (
    ParamVote,
    TxKind,
    hash_params,
    verify_transaction,
)
from node.errors import (
    DuplicateValidatorVote,
    FeeTooLow,
    InvalidBody,
    InvalidParams,
    NotAValidator,
)
from node.genesis import Genesis, build_genesis_state
from node.storage.memory import MemoryKV
from node.types import Amount
from tests.consensus.authority_chain import EVERY_KIND_FEES, AuthorityChain, genesis1, genesis4
from tests.helpers import (
    ALL_FEES,
    GENESIS_TIME,
    addr,
    commit_next,
    open_chain,
    sign_raw_tx,
    transfer,
)
from tests.helpers import (
    param_vote_tx as _param_vote_tx,
)


def param_vote_tx(voter: int, params: VotableParams, **kw: Any) -> bytes:
    """A parameter vote with a fee that covers a proposal pricing every kind (16 schedules)."""
    kw.setdefault("fee", 200_000)
    return _param_vote_tx(voter, params, **kw)


def proposal(params: VotableParams) -> VotableParams:
    """New timeouts and a transfer base fee 10x higher."""
    transfer_fee = replace(params.fees[0], base=Amount(params.fees[0].base * 10))
    return replace(params, timeout_commit_ms=2_500, fees=(transfer_fee, *params.fees[1:]))


def ctx_for(genesis: Genesis) -> BlockContext:
    return BlockContext(genesis.chain_params, genesis.votable_params, 1, GENESIS_TIME, addr(0))


def reject(genesis: Genesis, raw: bytes) -> None:
    apply_transaction(
        Overlay(DictView(build_genesis_state(genesis))), verify_transaction(raw), ctx_for(genesis)
    )


def test_a_passed_vote_changes_timeouts_and_fees_at_h_plus_2() -> None:
    c = AuthorityChain(genesis4())
    old = c.params
    new = proposal(old)
    c.step([param_vote_tx(0, new, nonce=0)])
    # Later votes may name the proposal by its hash alone.
    c.step([param_vote_tx(5, new, nonce=0, carry=False)])
    h = c.height
    built = c.step([param_vote_tx(6, new, nonce=0, carry=False)])  # 3 of 4: passes in h
    assert [e.name for e in built.result.receipts[0].events] == [
        "param_vote",
        "params_change",
        "fee",
    ]
    assert param_tally_key(hash_params(new)) not in c.state
    assert c.params == old and params_at_key(h + 2) in c.state  # not yet for h+1
    # A transfer whose fee covers only the old cost goes into h+1 ...
    cheap = old.fees[0].base + 10 * 200 + 100 + 1_000
    c.step([transfer(1, 2, 5, nonce=0, fee=cheap)])
    assert c.params == new and params_at_key(h + 2) not in c.state
    assert c.params.timeout_commit_ms == 2_500
    # ... but not into h+2, which the new fee table prices.
    built = c.build([transfer(1, 2, 5, nonce=1, fee=cheap)])
    ((_, error),) = built.rejected
    assert isinstance(error, FeeTooLow)


def test_chain_service_params_follow_the_vote() -> None:
    g = genesis1()
    chain = open_chain(MemoryKV(), g)
    new = proposal(g.votable_params)
    commit_next(chain, [0], [verify_transaction(param_vote_tx(0, new, nonce=0))])
    assert chain.params == g.votable_params
    commit_next(chain, [0])  # block h+1 puts them in force for h+2
    assert chain.params == new
    assert chain.read_view().params == new


def test_the_first_vote_must_carry_the_record() -> None:
    g = genesis4()
    with pytest.raises(InvalidParams, match="its first vote must carry the parameters"):
        reject(g, param_vote_tx(0, proposal(g.votable_params), nonce=0, carry=False))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"timeout_propose_ms": 0}, "timeout_propose_ms 0 is outside"),
        ({"timeout_commit_ms": 10**8}, "timeout_commit_ms 100000000 is outside"),
        ({"max_tx_bytes": 10}, "max_tx_bytes 10 is outside"),
        ({"max_block_bytes": 2_000}, "max_block_bytes 2000 is outside"),
        ({"max_block_txs": 0}, "max_block_txs 0 is outside"),
        ({"fees": ALL_FEES[:1]}, r"no fee schedule for transaction kind\(s\) \[10, 11, 12, 13, 20,"),
        ({"fees": EVERY_KIND_FEES[::-1]}, "sorted by kind"),
        (
            {"fees": (*EVERY_KIND_FEES, replace(ALL_FEES[0], kind=99))},
            r"unknown transaction kind\(s\)",
        ),
    ],
)
def test_invalid_parameters_are_rejected(change: dict[str, object], message: str) -> None:
    g = genesis4()
    bad = replace(g.votable_params, **change)  # type: ignore[arg-type]
    with pytest.raises(InvalidParams, match=message):
        reject(g, param_vote_tx(0, bad, nonce=0))


def test_the_parameters_in_force_are_no_proposal() -> None:
    g = genesis4()
    with pytest.raises(InvalidParams, match="are the ones in force"):
        reject(g, param_vote_tx(0, g.votable_params, nonce=0))


def test_a_hash_that_does_not_match_the_record_is_an_invalid_body() -> None:
    g = genesis4()
    new = proposal(g.votable_params)
    body = ParamVote(hash_params(g.votable_params), new)
    with pytest.raises(InvalidBody, match="params_hash is not the hash"):
        verify_transaction(sign_raw_tx(0, kind=TxKind.PARAM_VOTE, body=body, nonce=0))


def test_only_validators_vote_on_parameters() -> None:
    g = genesis4()
    with pytest.raises(NotAValidator):
        reject(g, param_vote_tx(1, proposal(g.votable_params), nonce=0))


def test_one_vote_per_validator_and_proposal_and_expiry() -> None:
    c = AuthorityChain(genesis4())
    new = proposal(c.params)
    h = c.height
    c.step([param_vote_tx(0, new, nonce=0)])
    built = c.build([param_vote_tx(0, new, nonce=1, carry=False)])
    ((_, error),) = built.rejected
    assert isinstance(error, DuplicateValidatorVote)
    key = param_tally_key(hash_params(new))
    c.advance_to(h + 4)  # vote_expiry_heights = 3: gone at the end of block h+3
    assert key not in c.state
    # The proposal must be carried again, and counts from scratch.
    c.step([param_vote_tx(0, new, nonce=1), param_vote_tx(5, new, nonce=0)])
    assert key in c.state and c.params != new
    assert PARAMS_KEY in c.state
