"""The genesis file: parsed strictly, turned into the first state, and hashed (DESIGN §4, §5, §11).

``genesis.json`` gives the chain id, the genesis time, the fixed ``ChainParams``, the initial
votable parameters (timeouts, block limits, fee table: one schedule per transaction kind, the
economy's included), the fixed validator-set rules (``AuthorityParams``: minimum bond, vote
expiry, unbonding period, per-block caps), the fixed economy rules (``EconomyParams``: role
bonds, composite caps, key-delivery and dispute windows, storage-deal epochs, the model
registry's parents-per-merge and parameter caps), the validators with
their bonds, and the initial balances. Amounts are decimal strings of base units (1 NSD = 10**18): JSON numbers lose
precision above 2**53 in most tools. Every field is checked, and an error names the field.

``build_genesis_state`` is the state map at height 0; ``genesis_hash`` commits to everything
(fixed parameters and the whole initial state), so two nodes agree on a chain only if they agree
on its genesis bit for bit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from node import crypto
from node.consensus.blocks import MAX_BLOCK_TXS_HARD
from node.consensus.params import (
    MAX_BLOCK_BYTES,
    MAX_TIMEOUT_MS,
    MIN_TX_BYTES,
    AuthorityParams,
    ChainParams,
    FeeSchedule,
    VotableParams,
)
from node.consensus.params import POSITIVE_TIMEOUTS as _POSITIVE_TIMEOUTS
from node.consensus.params import TIMEOUT_FIELDS as _TIMEOUT_FIELDS
from node.consensus.state import (
    AUTHORITY_PARAMS_KEY,
    PARAMS_KEY,
    SUPPLY_KEY,
    Account,
    Supply,
    account_key,
    validator_key,
)
from node.consensus.state import ValidatorBond as ValidatorBond  # re-exported (moved there)
from node.consensus.txs import KNOWN_KINDS, MAX_TX_BYTES_HARD
from node.consensus.validators import (
    MAX_POWER,
    MAX_VALIDATORS,
    Validator,
    ValidatorSet,
    genesis_validator_state,
)
from node.economy.api import (
    DEFAULT_ECONOMY_PARAMS,
    ECONOMY_PARAMS_KEY,
    MAX_COMPOSITE_DEPTH_HARD,
    MAX_COMPOSITE_RANGES_HARD,
    MAX_MERGE_PARENTS_HARD,
    MAX_PROVIDERS_PER_CLASS_HARD,
    EconomyParams,
)
from node.encoding import pack
from node.errors import ConfigError
from node.types import (
    UINT64_MAX,
    UINT256_MAX,
    Address,
    Amount,
    ChainId,
    Hash32,
    Nonce,
    TimestampMs,
)

MAX_GENESIS_FILE_BYTES = 64 << 20
# MAX_TIMEOUT_MS, MIN_TX_BYTES and MAX_BLOCK_BYTES (node.consensus.params) are sanity ceilings
# that catch unit mistakes (seconds vs ms, bits vs bytes) here and in parameter votes.

_FIXED_FIELDS = ("state_history_blocks", "evidence_max_age", "validator_floor")
_AUTHORITY_COUNTS = (
    "vote_expiry_heights",
    "unbonding_heights",
    "max_queue_work_per_block",
    "max_block_evidence",
)
_AUTHORITY_FIELDS = ("min_validator_bond", *_AUTHORITY_COUNTS)
MAX_BLOCK_EVIDENCE_HARD = 1_000  # blocks.MAX_EVIDENCE
# Defaults for a Genesis built in code (tests, benchmarks); genesis.json always states them.
DEFAULT_AUTHORITY_PARAMS = AuthorityParams(
    min_validator_bond=Amount(10**18),
    vote_expiry_heights=1_000,
    unbonding_heights=200_000,
    max_queue_work_per_block=64,
    max_block_evidence=50,
)
# "economy_params": the amounts, then the counts with their [lo, hi] ranges.
_ECONOMY_AMOUNTS = (
    "supplier_bond",
    "provider_bond",
    "key_dispute_slash",
    "task_min_bond",
    "challenge_slash",
)
_ECONOMY_COUNTS: dict[str, tuple[int, int]] = {
    "max_composite_depth": (1, MAX_COMPOSITE_DEPTH_HARD),
    "max_composite_ranges": (1, MAX_COMPOSITE_RANGES_HARD),
    "key_post_heights": (1, UINT64_MAX // 4),
    "dispute_window_heights": (1, UINT64_MAX // 4),
    "deal_epoch_heights": (1, UINT64_MAX // 4),
    "deal_challenge_window": (1, 5),  # DESIGN §9: answered within a short window (≤ 5 blocks)
    "deal_challenge_percent": (1, 100),
    "deal_segments_per_challenge": (1, 64),
    "max_deal_epochs": (1, 1 << 32),
    "min_collateral_percent": (0, 10_000),
    "max_challenges_per_block": (1, 10_000),
    "leaf_dispute_heights": (1, UINT64_MAX // 4),
    "max_merge_parents": (1, MAX_MERGE_PARENTS_HARD),
    "max_step_parameters": (1, UINT64_MAX),
    # the compute market (node/economy/tasks.py)
    "task_bond_percent": (0, 10_000),
    "task_miss_slash_percent": (0, 100),
    "task_reopen_heights": (1, UINT64_MAX // 4),
    "max_task_deadline_heights": (1, UINT64_MAX // 4),
    "verify_commit_heights": (1, UINT64_MAX // 4),
    "verify_reveal_heights": (1, UINT64_MAX // 4),
    "task_challenge_heights": (1, UINT64_MAX // 4),
    "bisect_step_heights": (1, UINT64_MAX // 4),
    "dispute_reward_percent": (0, 100),
    "royalty_percent": (0, 100),
    "max_providers_per_class": (1, MAX_PROVIDERS_PER_CLASS_HARD),
    "max_task_work_per_block": (1, 10_000),
}
_LIMIT_FIELDS = ("max_block_bytes", "max_block_txs", "max_tx_bytes")
_FEE_FIELDS = ("base", "per_byte", "per_signature", "per_new_account")

_AMOUNT_RE = re.compile(r"^(0|[1-9][0-9]*)$")
_ADDRESS_RE = re.compile(r"^0x[0-9a-fA-F]{40}$")
# ISO-8601 in its one common spelling, UTC only, at most millisecond precision (the chain's unit).
_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,3})?(Z|\+00:00)$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
MAX_GENESIS_TIME_MS = (datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC) - _EPOCH) // _ONE_MS


# ``ValidatorBond`` (the bond locked under ``state.validator_key``) lives in node.consensus.state;
# it is imported here for the genesis state and for existing importers.


@dataclass(frozen=True, slots=True)
class GenesisValidator:
    address: Address
    power: int
    bond: Amount  # locked: counted in the issued supply, in no account's balance


@dataclass(frozen=True, slots=True)
class GenesisAccount:
    address: Address
    balance: Amount


@dataclass(frozen=True, slots=True)
class Genesis:
    """A validated genesis; validators, balances and fee schedules are sorted (canonical order)."""

    chain_params: ChainParams
    votable_params: VotableParams
    validators: tuple[GenesisValidator, ...]
    balances: tuple[GenesisAccount, ...]
    authority_params: AuthorityParams = DEFAULT_AUTHORITY_PARAMS
    economy_params: EconomyParams = DEFAULT_ECONOMY_PARAMS

    @property
    def chain_id(self) -> ChainId:
        return self.chain_params.chain_id

    @property
    def genesis_time(self) -> TimestampMs:
        return self.chain_params.genesis_time

    @property
    def total_bonded(self) -> Amount:
        return Amount(sum(v.bond for v in self.validators))

    @property
    def total_supply(self) -> Amount:
        """Everything issued at genesis: the balances plus the locked bonds."""
        return Amount(sum(a.balance for a in self.balances) + self.total_bonded)

    def balance_of(self, address: Address) -> Amount:
        for a in self.balances:
            if a.address == address:
                return a.balance
        return Amount(0)

    def validator_set(self) -> ValidatorSet:
        return ValidatorSet(tuple(Validator(v.address, v.power) for v in self.validators))


# --- loading -----------------------------------------------------------------------------------


def load_genesis(path: Path | str) -> Genesis:
    """Read and validate a genesis file; ConfigError names the file and the bad field."""
    return read_genesis(path)[0]


def read_genesis(path: Path | str) -> tuple[Genesis, bytes]:
    """The validated genesis and the exact bytes it was parsed from (to copy them verbatim)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_GENESIS_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read genesis file {path}: {exc.strerror}") from None
    if len(raw) > MAX_GENESIS_FILE_BYTES:
        raise ConfigError(f"genesis file {path} exceeds {MAX_GENESIS_FILE_BYTES} bytes")
    try:
        return genesis_from_json(raw), raw
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}") from None


def genesis_from_json(text: str | bytes) -> Genesis:
    try:
        doc = json.loads(
            text,
            object_pairs_hook=_reject_duplicate_keys,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"genesis: not valid JSON: {exc}") from None
    except RecursionError:
        raise ConfigError("genesis: JSON nested too deeply") from None
    return parse_genesis(doc)


def parse_genesis(doc: object) -> Genesis:
    """Validate a decoded genesis document (see ``genesis_to_json`` for its shape)."""
    top = _object(
        doc,
        "genesis",
        (
            "chain_id",
            "genesis_time",
            "chain_params",
            "votable_params",
            "authority_params",
            "economy_params",
            "validators",
            "balances",
        ),
    )
    chain_id = _uint(top["chain_id"], "chain_id", lo=1)
    genesis_time = _timestamp(top["genesis_time"], "genesis_time")

    fixed = _object(top["chain_params"], "chain_params", _FIXED_FIELDS)
    fixed_values = {f: _uint(fixed[f], f"chain_params.{f}", lo=1) for f in _FIXED_FIELDS}
    chain_params = ChainParams(
        chain_id=ChainId(chain_id),
        genesis_time=TimestampMs(genesis_time),
        state_history_blocks=fixed_values["state_history_blocks"],
        evidence_max_age=fixed_values["evidence_max_age"],
        validator_floor=fixed_values["validator_floor"],
    )
    votable_params = _parse_votable(top["votable_params"])
    authority_params = _parse_authority(top["authority_params"], chain_params)
    economy = _parse_economy(top["economy_params"])
    validators = _parse_validators(top["validators"])
    if len(validators) < chain_params.validator_floor:
        raise ConfigError(
            f"genesis: chain_params.validator_floor: {chain_params.validator_floor} exceeds the "
            f"{len(validators)} genesis validator(s)"
        )
    balances = _parse_balances(top["balances"])
    genesis = Genesis(
        chain_params, votable_params, validators, balances, authority_params, economy
    )
    if genesis.total_supply > UINT256_MAX:
        raise ConfigError("genesis: balances + bonds exceed the uint256 range of the supply")
    return genesis


def _parse_votable(value: object) -> VotableParams:
    where = "votable_params"
    obj = _object(value, where, (*_TIMEOUT_FIELDS, *_LIMIT_FIELDS, "fees"))
    timeouts = {
        f: _uint(obj[f], f"{where}.{f}", lo=1 if f in _POSITIVE_TIMEOUTS else 0, hi=MAX_TIMEOUT_MS)
        for f in _TIMEOUT_FIELDS
    }
    max_tx_bytes = _uint(
        obj["max_tx_bytes"], f"{where}.max_tx_bytes", lo=MIN_TX_BYTES, hi=MAX_TX_BYTES_HARD
    )
    # A block must be able to hold at least one transaction of the largest allowed size.
    max_block_bytes = _uint(
        obj["max_block_bytes"], f"{where}.max_block_bytes", lo=max_tx_bytes, hi=MAX_BLOCK_BYTES
    )
    max_block_txs = _uint(
        obj["max_block_txs"], f"{where}.max_block_txs", lo=1, hi=MAX_BLOCK_TXS_HARD
    )
    fees = _parse_fees(obj["fees"], f"{where}.fees")
    return VotableParams(
        **timeouts,
        max_block_bytes=max_block_bytes,
        max_block_txs=max_block_txs,
        max_tx_bytes=max_tx_bytes,
        fees=fees,
    )


def _parse_authority(value: object, chain: ChainParams) -> AuthorityParams:
    where = "authority_params"
    obj = _object(value, where, _AUTHORITY_FIELDS)
    min_bond = _amount(obj["min_validator_bond"], f"{where}.min_validator_bond")
    counts = {f: _uint(obj[f], f"{where}.{f}", lo=1) for f in _AUTHORITY_COUNTS}
    if counts["max_block_evidence"] > MAX_BLOCK_EVIDENCE_HARD:
        raise ConfigError(
            f"genesis: {where}.max_block_evidence: expected an integer in "
            f"[1, {MAX_BLOCK_EVIDENCE_HARD}]"
        )
    # DESIGN §5: bonds leave only after an unbonding period longer than the evidence age.
    if counts["unbonding_heights"] <= chain.evidence_max_age:
        raise ConfigError(
            f"genesis: {where}.unbonding_heights: {counts['unbonding_heights']} must exceed "
            f"chain_params.evidence_max_age ({chain.evidence_max_age}) so a bond stays "
            "slashable until every vote its owner signed is too old to be evidence"
        )
    return AuthorityParams(min_validator_bond=min_bond, **counts)


def _parse_economy(value: object) -> EconomyParams:
    where = "economy_params"
    obj = _object(value, where, (*_ECONOMY_AMOUNTS, *_ECONOMY_COUNTS))
    amounts = {f: _amount(obj[f], f"{where}.{f}") for f in _ECONOMY_AMOUNTS}
    counts = {
        f: _uint(obj[f], f"{where}.{f}", lo=lo, hi=hi) for f, (lo, hi) in _ECONOMY_COUNTS.items()
    }
    # A lost dispute burns the slash from the supplier bond: a slash above the bond could never
    # be taken in full.
    if amounts["key_dispute_slash"] > amounts["supplier_bond"]:
        raise ConfigError(
            f"genesis: {where}.key_dispute_slash: {amounts['key_dispute_slash']} exceeds "
            f"{where}.supplier_bond ({amounts['supplier_bond']}), which it is taken from"
        )
    # A losing challenger's slash is taken from its compute-provider bond.
    if amounts["challenge_slash"] > amounts["provider_bond"]:
        raise ConfigError(
            f"genesis: {where}.challenge_slash: {amounts['challenge_slash']} exceeds "
            f"{where}.provider_bond ({amounts['provider_bond']}), which it is taken from"
        )
    values: dict[str, Any] = {**amounts, **counts}
    return EconomyParams(**values)


def _parse_fees(value: object, where: str) -> tuple[FeeSchedule, ...]:
    items = _list(value, where)
    known = set(KNOWN_KINDS)
    by_kind: dict[int, FeeSchedule] = {}
    for i, item in enumerate(items):
        here = f"{where}[{i}]"
        obj = _object(item, here, ("kind", *_FEE_FIELDS))
        kind = _uint(obj["kind"], f"{here}.kind", lo=0)
        if kind not in known:
            raise ConfigError(f"genesis: {here}.kind: {kind} is not a known transaction kind")
        if kind in by_kind:
            raise ConfigError(f"genesis: {here}.kind: duplicate fee schedule for kind {kind}")
        amounts = {f: _amount(obj[f], f"{here}.{f}") for f in _FEE_FIELDS}
        by_kind[kind] = FeeSchedule(kind=kind, **amounts)
    # Without a schedule every transaction of a kind is rejected, so a missing one is a mistake.
    missing = sorted(known - by_kind.keys())
    if missing:
        raise ConfigError(f"genesis: {where}: no fee schedule for transaction kind(s) {missing}")
    return tuple(by_kind[k] for k in sorted(by_kind))


def _parse_validators(value: object) -> tuple[GenesisValidator, ...]:
    items = _list(value, "validators")
    if not items:
        raise ConfigError("genesis: validators: at least one validator is required")
    if len(items) > MAX_VALIDATORS:
        raise ConfigError(f"genesis: validators: more than {MAX_VALIDATORS} validators")
    seen: set[bytes] = set()
    out: list[GenesisValidator] = []
    for i, item in enumerate(items):
        here = f"validators[{i}]"
        obj = _object(item, here, ("address", "power", "bond"))
        address = parse_address(obj["address"], f"genesis: {here}.address")
        if address in seen:
            raise ConfigError(
                f"genesis: {here}.address: duplicate validator {to_checksum(address)}"
            )
        seen.add(address)
        power = _uint(obj["power"], f"{here}.power", lo=1, hi=MAX_POWER)
        bond = _amount(obj["bond"], f"{here}.bond")
        out.append(GenesisValidator(address, power, bond))
    # DESIGN §5: the validator set is ordered by address.
    return tuple(sorted(out, key=lambda v: v.address))


def _parse_balances(value: object) -> tuple[GenesisAccount, ...]:
    if not isinstance(value, dict):
        raise ConfigError("genesis: balances: expected an object of address -> amount")
    out: dict[bytes, GenesisAccount] = {}
    for key, amount in value.items():
        here = f"balances.{key}"
        address = parse_address(key, f"genesis: {here}")
        if address in out:
            # Keys differing only in letter case are the same account.
            raise ConfigError(f"genesis: {here}: duplicate account {to_checksum(address)}")
        balance = _amount(amount, here)
        # An account stored with balance 0 and an absent one would give different state roots
        # for the same meaning; keep one form.
        if balance == 0:
            raise ConfigError(f"genesis: {here}: a genesis balance must be positive")
        out[address] = GenesisAccount(address, balance)
    return tuple(out[a] for a in sorted(out))


# --- the first state and the genesis hash -------------------------------------------------------


def build_genesis_state(genesis: Genesis) -> dict[bytes, bytes]:
    """The state map at height 0: accounts, votable, authority and economy parameters, the
    validator set (of heights 1 and 2, with its history record), bonds, supply."""
    state: dict[bytes, bytes] = {}
    for a in genesis.balances:
        state[account_key(a.address)] = Account(Nonce(0), a.balance).encode()
    state[PARAMS_KEY] = genesis.votable_params.encode()
    state[AUTHORITY_PARAMS_KEY] = genesis.authority_params.encode()
    state[ECONOMY_PARAMS_KEY] = genesis.economy_params.encode()
    # The set of heights 1 and 2 (VALIDATOR_SET_KEY, NEXT_VALIDATOR_SET_KEY) and its history.
    state.update(genesis_validator_state(genesis.validator_set()))
    for v in genesis.validators:
        state[validator_key(v.address)] = ValidatorBond(v.bond).encode()
    state[SUPPLY_KEY] = Supply(genesis.total_supply, Amount(0)).encode()
    return state


def genesis_hash(genesis: Genesis) -> Hash32:
    """sha256 of msgpack ``[chain_params, [[key, value], ...]]`` with the state sorted by key."""
    state = build_genesis_state(genesis)
    entries = tuple((k, state[k]) for k in sorted(state))
    return crypto.sha256(pack((genesis.chain_params.to_wire(), entries)))


# --- writing -----------------------------------------------------------------------------------


def genesis_to_json(genesis: Genesis) -> str:
    """The canonical JSON of a genesis (what ``genesis_from_json`` reads back to an equal value)."""
    cp = genesis.chain_params
    vp = genesis.votable_params
    ap = genesis.authority_params
    doc: dict[str, Any] = {
        "chain_id": cp.chain_id,
        "genesis_time": format_timestamp(cp.genesis_time),
        "chain_params": {f: getattr(cp, f) for f in _FIXED_FIELDS},
        "votable_params": {
            **{f: getattr(vp, f) for f in (*_TIMEOUT_FIELDS, *_LIMIT_FIELDS)},
            "fees": [
                {"kind": s.kind, **{f: str(getattr(s, f)) for f in _FEE_FIELDS}} for s in vp.fees
            ],
        },
        "authority_params": {
            "min_validator_bond": str(ap.min_validator_bond),
            **{f: getattr(ap, f) for f in _AUTHORITY_COUNTS},
        },
        "economy_params": {
            **{f: str(getattr(genesis.economy_params, f)) for f in _ECONOMY_AMOUNTS},
            **{f: getattr(genesis.economy_params, f) for f in _ECONOMY_COUNTS},
        },
        "validators": [
            {"address": to_checksum(v.address), "power": v.power, "bond": str(v.bond)}
            for v in genesis.validators
        ],
        "balances": {to_checksum(a.address): str(a.balance) for a in genesis.balances},
    }
    return json.dumps(doc, indent=2) + "\n"


def format_timestamp(ms: int) -> str:
    """Milliseconds since the epoch as ISO-8601 UTC (``2025-01-01T00:00:00Z``, ``…:00.250Z``)."""
    text = (_EPOCH + timedelta(milliseconds=ms)).strftime("%Y-%m-%dT%H:%M:%S")
    return text + (f".{ms % 1000:03d}Z" if ms % 1000 else "Z")


# --- addresses ---------------------------------------------------------------------------------


def parse_address(value: object, where: str) -> Address:
    """``0x`` + 40 hex digits; mixed case must be a valid EIP-55 checksum (catches typos)."""
    if not isinstance(value, str) or not _ADDRESS_RE.match(value):
        raise ConfigError(f"{where}: expected an address (0x followed by 40 hex digits)")
    digits = value[2:]
    address = Address(bytes.fromhex(digits))
    if digits != digits.lower() and digits != digits.upper() and to_checksum(address) != value:
        raise ConfigError(f"{where}: bad EIP-55 checksum in mixed-case address {value}")
    return address


def to_checksum(address: Address | bytes) -> str:
    """EIP-55 mixed-case hex of a 20-byte address."""
    hex_ = bytes(address).hex()
    digest = crypto.keccak256(hex_.encode("ascii")).hex()
    return "0x" + "".join(
        c.upper() if c.isalpha() and int(digest[i], 16) >= 8 else c for i, c in enumerate(hex_)
    )


# --- field readers -----------------------------------------------------------------------------


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ConfigError(f"genesis: duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ConfigError(f"genesis: {name} is not allowed")


def _object(value: object, where: str, fields: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"genesis: {where}: expected an object")
    missing = [f for f in fields if f not in value]
    if missing:
        raise ConfigError(f"genesis: {where}: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ConfigError(f"genesis: {where}: unknown field(s) {', '.join(unknown)}")
    return value


def _list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"genesis: {where}: expected a list")
    return value


def _uint(value: object, where: str, *, lo: int = 0, hi: int = UINT64_MAX) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ConfigError(f"genesis: {where}: expected an integer in [{lo}, {hi}]")
    return value


def _amount(value: object, where: str) -> Amount:
    if not isinstance(value, str) or not _AMOUNT_RE.match(value) or len(value) > 78:
        raise ConfigError(
            f"genesis: {where}: expected a decimal string of base units (1 NSD = 10**18), "
            'e.g. "1000000000000000000"'
        )
    amount = int(value)
    if amount > UINT256_MAX:
        raise ConfigError(f"genesis: {where}: amount exceeds the uint256 range")
    return Amount(amount)


def _timestamp(value: object, where: str) -> int:
    if type(value) is int:
        return _uint(value, where, lo=1, hi=MAX_GENESIS_TIME_MS)
    if not isinstance(value, str) or not _TIME_RE.match(value):
        raise ConfigError(
            f"genesis: {where}: expected milliseconds since the epoch or an ISO-8601 UTC time "
            'such as "2025-01-01T00:00:00Z"'
        )
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"genesis: {where}: {value!r} is not a valid date and time") from None
    ms = (dt - _EPOCH) // _ONE_MS
    if ms < 1:
        raise ConfigError(f"genesis: {where}: must be after the Unix epoch")
    return int(ms)
