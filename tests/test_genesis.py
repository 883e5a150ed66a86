"""Genesis: the devnet file, strict validation, the initial state and the genesis hash."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from eth_utils.address import to_checksum_address
from hypothesis import given
from hypothesis import strategies as st

from node.consensus.params import VotableParams
from node.consensus.state import (
    AUTHORITY_PARAMS_KEY,
    PARAMS_KEY,
    SUPPLY_KEY,
    VALIDATOR_SET_KEY,
    Account,
    DictView,
    Supply,
    account_key,
    get_account,
    validator_key,
)
from node.consensus.validators import ValidatorSet, genesis_validator_state
from node.devkeys import dev_address
from node.economy.api import ECONOMY_PARAMS_KEY, EconomyKind, EconomyParams, economy_params
from node.errors import ConfigError
from node.genesis import (
    Genesis,
    ValidatorBond,
    build_genesis_state,
    format_timestamp,
    genesis_from_json,
    genesis_hash,
    genesis_to_json,
    load_genesis,
    parse_address,
    parse_genesis,
    to_checksum,
)
from node.types import NSD, UINT256_MAX, Address

REPO_GENESIS = Path(__file__).resolve().parent.parent / "genesis.json"


def _doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(REPO_GENESIS.read_text())
    return doc


@pytest.fixture
def devnet() -> Genesis:
    return load_genesis(REPO_GENESIS)


# --- the devnet genesis ------------------------------------------------------------------------


def test_devnet_genesis_shape(devnet: Genesis) -> None:
    assert devnet.chain_id == 7310
    assert devnet.genesis_time == 1_735_689_600_000  # 2025-01-01T00:00:00Z
    assert [v.address for v in devnet.validators] == [dev_address(0)]
    assert devnet.validators[0].power == 1
    funded = {a.address for a in devnet.balances}
    assert funded == {dev_address(i) for i in range(1, 11)}
    assert all(a.balance == 1_000_000 * NSD for a in devnet.balances)
    vp = devnet.votable_params
    assert vp.timeout_commit_ms == 1000  # 1 s block interval
    assert vp.max_block_bytes == 4 << 20
    assert vp.max_block_txs == 5000
    assert vp.max_tx_bytes == 64 << 10
    fee = vp.fee_schedule(1)
    assert fee is not None
    assert (fee.base, fee.per_byte, fee.per_signature, fee.per_new_account) == (
        NSD // 100_000,
        NSD // 100_000_000,
        2 * NSD // 100_000,
        NSD // 10_000,
    )
    assert devnet.chain_params.validator_floor == 1
    # Every kind has a fee schedule, the economy's included (DESIGN §4).
    assert {f.kind for f in vp.fees} >= {int(k) for k in EconomyKind}
    ep = devnet.economy_params
    # The devnet's windows are short, so a demo sees keys refunded and deals challenged quickly.
    assert ep.deal_epoch_heights == 10
    assert ep.key_post_heights <= 100 and ep.dispute_window_heights <= 100
    assert ep.key_dispute_slash <= ep.supplier_bond


def test_devnet_genesis_file_is_canonical(devnet: Genesis) -> None:
    # The committed file is exactly what genesis_to_json writes (sorted, checksummed, strings).
    assert genesis_to_json(devnet) == REPO_GENESIS.read_text()


def test_devnet_genesis_state(devnet: Genesis) -> None:
    state = build_genesis_state(devnet)
    view = DictView(state)
    for i in range(1, 11):
        assert get_account(view, dev_address(i)) == Account(0, 1_000_000 * NSD)  # type: ignore[arg-type]
    assert VotableParams.decode(state[PARAMS_KEY]) == devnet.votable_params
    vset = ValidatorSet.decode(state[VALIDATOR_SET_KEY])
    assert vset.addresses == (dev_address(0),)
    assert vset == devnet.validator_set()
    bond = ValidatorBond.decode(state[validator_key(dev_address(0))])
    assert bond.amount == devnet.validators[0].bond
    supply = Supply.decode(state[SUPPLY_KEY])
    # The bond is locked out of the total supply: issued = balances + bonds, none burned yet.
    assert supply.issued == 10 * 1_000_000 * NSD + devnet.validators[0].bond
    assert supply.burned == 0
    assert account_key(dev_address(0)) not in state  # the validator holds only its bond
    expected_keys = {account_key(dev_address(i)) for i in range(1, 11)} | {
        PARAMS_KEY,
        VALIDATOR_SET_KEY,
        SUPPLY_KEY,
        validator_key(dev_address(0)),
        # The authority rules and the validator-set history (sets of heights 1 and 2, epoch 0).
        *genesis_validator_state(devnet.validator_set()),
        AUTHORITY_PARAMS_KEY,
        ECONOMY_PARAMS_KEY,
    }
    assert set(state) == expected_keys
    assert EconomyParams.decode(state[ECONOMY_PARAMS_KEY]) == devnet.economy_params
    assert economy_params(view) == devnet.economy_params


def test_genesis_hash_is_stable_and_sensitive(devnet: Genesis) -> None:
    h = genesis_hash(devnet)
    assert len(h) == 32
    assert genesis_hash(load_genesis(REPO_GENESIS)) == h
    # Formatting and key order of the JSON do not matter; content does.
    doc = _doc()
    reordered = json.dumps(dict(reversed(list(doc.items()))))
    assert genesis_hash(genesis_from_json(reordered)) == h
    mutations: list[Callable[[dict[str, Any]], None]] = [
        lambda d: d.__setitem__("chain_id", 7311),
        lambda d: d.__setitem__("genesis_time", "2025-01-01T00:00:00.001Z"),
        lambda d: d["chain_params"].__setitem__("evidence_max_age", 99_999),
        lambda d: d["votable_params"].__setitem__("timeout_commit_ms", 999),
        lambda d: d["validators"][0].__setitem__("bond", "1"),
        lambda d: d["validators"][0].__setitem__("power", 2),
        lambda d: d["economy_params"].__setitem__("key_post_heights", 31),
        lambda d: d["economy_params"].__setitem__("supplier_bond", str(60 * NSD)),
        lambda d: d["balances"].__setitem__(to_checksum(dev_address(50)), "1"),
    ]
    for mutate in mutations:
        changed = copy.deepcopy(doc)
        mutate(changed)
        assert genesis_hash(parse_genesis(changed)) != h


def test_lowercase_and_checksummed_addresses_are_the_same_genesis(devnet: Genesis) -> None:
    doc = _doc()
    doc["balances"] = {k.lower(): v for k, v in doc["balances"].items()}
    doc["validators"][0]["address"] = doc["validators"][0]["address"].upper().replace("0X", "0x")
    assert genesis_hash(parse_genesis(doc)) == genesis_hash(devnet)


def test_validators_and_fees_are_sorted() -> None:
    doc = _doc()
    doc["validators"] = [
        {"address": to_checksum(dev_address(i)), "power": 1, "bond": "5"} for i in (3, 1, 2)
    ]
    g = parse_genesis(doc)
    addresses = [v.address for v in g.validators]
    assert addresses == sorted(addresses)
    assert g.validator_set().addresses == tuple(addresses)


def test_genesis_time_forms() -> None:
    doc = _doc()
    for value, ms in (
        ("2025-01-01T00:00:00Z", 1_735_689_600_000),
        ("2025-01-01T00:00:00+00:00", 1_735_689_600_000),
        ("2025-01-01T00:00:00.5Z", 1_735_689_600_500),
        ("2025-01-01T00:00:00.123Z", 1_735_689_600_123),
        (1_735_689_600_123, 1_735_689_600_123),
    ):
        doc["genesis_time"] = value
        assert parse_genesis(doc).genesis_time == ms


@given(st.integers(1, 253_402_300_799_999))
def test_format_timestamp_roundtrip(ms: int) -> None:
    doc = _doc()
    doc["genesis_time"] = format_timestamp(ms)
    assert parse_genesis(doc).genesis_time == ms


def test_json_roundtrip(devnet: Genesis) -> None:
    assert genesis_from_json(genesis_to_json(devnet)) == devnet


# --- addresses ---------------------------------------------------------------------------------


@given(st.binary(min_size=20, max_size=20))
def test_checksum_matches_eth_account(raw: bytes) -> None:
    assert to_checksum(raw) == to_checksum_address(raw)
    assert parse_address(to_checksum(raw), "x") == raw
    assert parse_address(to_checksum(raw).lower(), "x") == raw


def test_bad_checksum_rejected() -> None:
    good = to_checksum(dev_address(1))
    # Flip the case of one letter: still mixed case, wrong checksum.
    i = next(i for i, c in enumerate(good[2:], 2) if c.isalpha())
    bad = good[:i] + good[i].swapcase() + good[i + 1 :]
    with pytest.raises(ConfigError, match="checksum"):
        parse_address(bad, "field")


@pytest.mark.parametrize(
    "value", ["", "0x", "0x" + "1" * 39, "0x" + "1" * 41, "1" * 40, "0xzz" + "1" * 38, 5, None]
)
def test_bad_addresses(value: Any) -> None:
    with pytest.raises(ConfigError):
        parse_address(value, "field")


# --- strict validation -------------------------------------------------------------------------

_ADDR = to_checksum(dev_address(0))


def _set(path: str, value: Any) -> Any:
    def edit(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = d
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return edit


def _delete(path: str) -> Any:
    def edit(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = d
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        del node[last]

    return edit


BAD_CASES: list[tuple[str, Any, str]] = [
    ("chain_id_zero", _set("chain_id", 0), "chain_id"),
    ("chain_id_negative", _set("chain_id", -1), "chain_id"),
    ("chain_id_too_big", _set("chain_id", 2**64), "chain_id"),
    ("chain_id_string", _set("chain_id", "7310"), "chain_id"),
    ("chain_id_float", _set("chain_id", 7310.0), "chain_id"),
    ("chain_id_bool", _set("chain_id", True), "chain_id"),
    ("time_local_offset", _set("genesis_time", "2025-01-01T00:00:00+01:00"), "genesis_time"),
    ("time_naive", _set("genesis_time", "2025-01-01T00:00:00"), "genesis_time"),
    ("time_date_only", _set("genesis_time", "2025-01-01"), "genesis_time"),
    ("time_sub_ms", _set("genesis_time", "2025-01-01T00:00:00.0001Z"), "genesis_time"),
    ("time_bad_date", _set("genesis_time", "2025-02-30T00:00:00Z"), "genesis_time"),
    ("time_zero", _set("genesis_time", 0), "genesis_time"),
    ("time_before_epoch", _set("genesis_time", "1969-12-31T23:59:59Z"), "genesis_time"),
    ("missing_field", _delete("balances"), "balances"),
    ("unknown_field", _set("extra", 1), "extra"),
    ("unknown_param", _set("chain_params.foo", 1), "foo"),
    ("history_zero", _set("chain_params.state_history_blocks", 0), "state_history_blocks"),
    ("floor_zero", _set("chain_params.validator_floor", 0), "validator_floor"),
    ("floor_above_set", _set("chain_params.validator_floor", 2), "validator_floor"),
    ("timeout_zero", _set("votable_params.timeout_propose_ms", 0), "timeout_propose_ms"),
    ("timeout_huge", _set("votable_params.timeout_prevote_ms", 10**9), "timeout_prevote_ms"),
    ("timeout_negative", _set("votable_params.timeout_commit_ms", -1), "timeout_commit_ms"),
    (
        "missing_timeout",
        _delete("votable_params.timeout_precommit_delta_ms"),
        "timeout_precommit_delta_ms",
    ),
    ("tx_bytes_tiny", _set("votable_params.max_tx_bytes", 10), "max_tx_bytes"),
    ("tx_bytes_over_hard_cap", _set("votable_params.max_tx_bytes", 2 << 20), "max_tx_bytes"),
    ("block_smaller_than_tx", _set("votable_params.max_block_bytes", 4096), "max_block_bytes"),
    ("block_txs_zero", _set("votable_params.max_block_txs", 0), "max_block_txs"),
    ("block_txs_over_hard_cap", _set("votable_params.max_block_txs", 10**6), "max_block_txs"),
    ("fees_not_list", _set("votable_params.fees", {}), "fees"),
    ("fees_empty", _set("votable_params.fees", []), "fees"),
    ("fee_unknown_kind", _set("votable_params.fees.0.kind", 99), "kind"),
    ("fee_as_number", _set("votable_params.fees.0.base", 10**13), "base"),
    ("fee_negative", _set("votable_params.fees.0.per_byte", "-1"), "per_byte"),
    ("fee_leading_zero", _set("votable_params.fees.0.per_byte", "010"), "per_byte"),
    ("fee_decimal_point", _set("votable_params.fees.0.base", "0.00001"), "base"),
    ("fee_hex", _set("votable_params.fees.0.base", "0x10"), "base"),
    ("fee_over_uint256", _set("votable_params.fees.0.base", str(2**256)), "base"),
    ("fee_missing", _delete("votable_params.fees.0.per_signature"), "per_signature"),
    ("validators_empty", _set("validators", []), "validators"),
    ("validator_bad_address", _set("validators.0.address", "0x1234"), "address"),
    ("validator_power_zero", _set("validators.0.power", 0), "power"),
    ("validator_power_huge", _set("validators.0.power", 2**33), "power"),
    ("validator_bond_number", _set("validators.0.bond", 5), "bond"),
    ("validator_extra_field", _set("validators.0.name", "v"), "name"),
    ("balances_list", _set("balances", []), "balances"),
    ("balance_zero", _set(f"balances.{_ADDR}", "0"), "balance"),
    ("balance_bad_key", _set("balances.alice", "5"), "alice"),
    ("balance_number", _set(f"balances.{_ADDR}", 5), _ADDR),
    ("balance_empty_string", _set(f"balances.{_ADDR}", ""), _ADDR),
    ("balance_whitespace", _set(f"balances.{_ADDR}", " 5"), _ADDR),
    ("economy_missing", _delete("economy_params"), "economy_params"),
    ("economy_unknown_field", _set("economy_params.foo", 1), "foo"),
    ("economy_missing_field", _delete("economy_params.key_post_heights"), "key_post_heights"),
    ("economy_bond_number", _set("economy_params.supplier_bond", 5), "supplier_bond"),
    ("economy_depth_zero", _set("economy_params.max_composite_depth", 0), "max_composite_depth"),
    ("economy_depth_huge", _set("economy_params.max_composite_depth", 17), "max_composite_depth"),
    (
        "economy_ranges_huge",
        _set("economy_params.max_composite_ranges", 5000),
        "max_composite_ranges",
    ),
    ("economy_key_window_zero", _set("economy_params.key_post_heights", 0), "key_post_heights"),
    (
        "economy_challenge_window_long",
        _set("economy_params.deal_challenge_window", 6),
        "deal_challenge_window",
    ),
    (
        "economy_percent_over",
        _set("economy_params.deal_challenge_percent", 101),
        "deal_challenge_percent",
    ),
    (
        "economy_slash_above_bond",
        _set("economy_params.key_dispute_slash", str(10**30)),
        "key_dispute_slash",
    ),
    ("fee_missing_economy_kind", lambda d: d["votable_params"]["fees"].pop(), "[69]"),
]


@pytest.mark.parametrize(("name", "edit", "field"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_invalid_genesis_names_the_field(name: str, edit: Any, field: str) -> None:
    doc = _doc()
    edit(doc)
    with pytest.raises(ConfigError) as info:
        parse_genesis(doc)
    assert field in str(info.value), str(info.value)


def test_duplicate_validator() -> None:
    doc = _doc()
    doc["validators"].append(dict(doc["validators"][0]))
    with pytest.raises(ConfigError, match="duplicate validator"):
        parse_genesis(doc)


def test_duplicate_fee_kind() -> None:
    doc = _doc()
    doc["votable_params"]["fees"].append(dict(doc["votable_params"]["fees"][0]))
    with pytest.raises(ConfigError, match="duplicate fee schedule"):
        parse_genesis(doc)


def test_duplicate_balance_differing_in_case() -> None:
    doc = _doc()
    first = next(iter(doc["balances"]))
    doc["balances"][first.lower()] = "7"
    with pytest.raises(ConfigError, match="duplicate account"):
        parse_genesis(doc)


def test_duplicate_json_key_rejected() -> None:
    text = REPO_GENESIS.read_text().replace('"chain_id": 7310,', '"chain_id": 7310, "chain_id": 1,')
    with pytest.raises(ConfigError, match="duplicate key"):
        genesis_from_json(text)


@pytest.mark.parametrize(
    "text", ["", "{", "[]", "null", '{"chain_id": NaN}', b"\xff\xfe", "[" * 5000 + "]" * 5000]
)
def test_malformed_json(text: str | bytes) -> None:
    with pytest.raises(ConfigError):
        genesis_from_json(text)


def test_supply_overflow_rejected() -> None:
    doc = _doc()
    doc["balances"] = {
        to_checksum(dev_address(1)): str(UINT256_MAX),
        to_checksum(dev_address(2)): "1",
    }
    with pytest.raises(ConfigError, match="uint256"):
        parse_genesis(doc)


def test_load_genesis_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_genesis(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="missing field"):
        load_genesis(bad)


def test_zero_fee_schedule_allowed() -> None:
    doc = _doc()
    for f in ("base", "per_byte", "per_signature", "per_new_account"):
        doc["votable_params"]["fees"][0][f] = "0"
    assert parse_genesis(doc).votable_params.fees[0].base == 0


def test_balance_of(devnet: Genesis) -> None:
    assert devnet.balance_of(dev_address(1)) == 1_000_000 * NSD
    assert devnet.balance_of(Address(b"\x00" * 20)) == 0
