"""The compute agent with a priced (encrypted) dataset input (``node.input_purchases``;
docs/compute-market.md "Priced inputs"), over a real ``ChainService`` whose blocks the test
commits, with real worker child processes (the world of ``tests/compute_world.py``).

The dataset's owner posts the keys with a real ``node.key_agent.KeyAgent`` (its content key in a
``ContentKeyStore``, as after an upload). The provider and the drawn verifier each buy the
dataset with their own purchase, wait for the key, "fetch" with the purchase as the grant — the
agents share one blob store, so the fetch callable only checks the signed access request against
the owner's ``ChainPolicy`` on chain, as the owner's chunk server would — decrypt it and run
the task; it ends paid, every buyer is reimbursed, and the owner is paid one purchase per read.
A second verifier without the CUSTOMER role cannot buy: it abstains (no commitment, no fee).
An agent without the CUSTOMER role (or the balance) does not claim such a task.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

try:  # the shared harness (older trees keep it in tests/test_compute_agent.py)
    from tests import compute_world as cw
except ImportError:  # pragma: no cover
    from tests import test_compute_agent as cw  # type: ignore[no-redef]

from node import crypto
from node.artifact_service import ChainPolicy, ContentKey, ContentKeyStore
from node.compute_agent import ComputeAgent, ComputeSettings, PricedInputRefused
from node.consensus.txs import Transfer
from node.economy import tasks as tk
from node.economy.api import Role
from node.economy.datasets import DatasetRegister, dataset_id
from node.economy.roles import RoleRegister
from node.key_agent import KeyAgent, KeyAgentSettings
from node.p2p.chunks import verify_access
from node.storage import MemoryKV, encryption
from node.storage.blobstore import BlobStore
from node.storage.format_v1 import LEAF0_BYTES, make_proof
from node.storage.importer import import_file, verify_cid_block
from node.types import NSD, Amount, Hash32
from tests.helpers import key, make_genesis, open_chain, signed_tx

SUPPLIER, REQ, P, V1, V2 = cw.SUPPLIER, cw.REQ, cw.P, cw.V1, cw.V2
DPRICE = 2 * NSD
# A verifier buys once drawn: the purchase and the owner's key take two blocks before its
# re-run, so the commit window is longer than the plain tests'.
ECONOMY = replace(
    cw.ECONOMY, verify_commit_heights=6, key_post_heights=10, dispute_window_heights=3
)


def _genesis():  # type: ignore[no-untyped-def]
    g = make_genesis(
        funded=6,
        validators=(0,),
        balance=10_000 * NSD,
        fees=cw.ALL_KIND_FEES,
        max_tx_bytes=1 << 20,
    )
    return replace(g, economy_params=ECONOMY)


class Grants:
    """The agents' ``fetch_granted``: checks each access request as the owner's chunk server
    would (signature, peer, expiry; the grant on chain through ``ChainPolicy``)."""

    def __init__(self, chain: Any) -> None:
        self.policy = ChainPolicy(chain.read_view)
        self.granted: list[tuple[bytes, bytes]] = []  # (address, purchase)

    def for_peer(self, peer: bytes) -> Any:
        async def fetch(root: bytes, access: Any) -> None:
            assert access is not None, "a priced input is fetched with an access request"
            address = verify_access(access, peer, int(time.time() * 1000))  # type: ignore[arg-type]
            grant = bytes(access.terms.grant_id)
            assert self.policy.is_restricted(root)
            assert self.policy.grant_covers(grant, bytes(address), root), "no purchase grant"
            self.granted.append((bytes(address), grant))

        return fetch


async def _priced_world(tmp_path: Path, nursery: trio.Nursery) -> tuple[Any, Grants, KeyAgent]:
    chain = open_chain(MemoryKV(), _genesis())
    pool = cw.Pool(chain)
    blobs = BlobStore(tmp_path / "blobs", MemoryKV(), verify=verify_cid_block, quota_bytes=1 << 30)
    plain = cw._digits_v1()
    leaf0, data = plain[:LEAF0_BYTES], plain[LEAF0_BYTES:]
    content, salt = encryption.generate_content_key(), encryption.generate_salt()
    cipher = io.BytesIO()
    encryption.encrypt_stream(content, salt, io.BytesIO(data), cipher, len(data))
    root = bytes(import_file(blobs, io.BytesIO(leaf0 + cipher.getvalue())).root)
    keys = ContentKeyStore(tmp_path / "owner-keys")
    keys.put(ContentKey(root, content, salt, len(data), crypto.sha256(data)))
    cls = cw._platform_class()
    settings = ComputeSettings(
        memory_bytes=2 << 30,
        wall_seconds=cw.WALL,
        price_per_device_second=cw.PRICE_PER_DEVICE_SECOND,
        platform_class=cls,
        poll_interval_s=0.1,
    )
    grants = Grants(chain)
    agents = {
        i: ComputeAgent(
            chain,
            pool.submit_for(i),
            key(i),
            tmp_path / f"node{i}",
            settings if i == P else replace(settings, provide=False),
            blobs=blobs,
            pending_nonce=pool.pending_nonce_for(i),
            run_job=cw._sync_run_job,
            fetch_granted=grants.for_peer(b"peer-%d" % i),
            peer_id=b"peer-%d" % i,
        )
        for i in (P, V1, V2)
    }
    w = cw.World(chain=chain, pool=pool, agents=agents, dataset=dataset_id(root), cls=cls)

    async def owner_send(body: Any) -> Hash32:
        raw = signed_tx(SUPPLIER, body, nonce=await pool.pending_nonce(key(SUPPLIER).address))
        return await pool.submit(raw)

    owner = KeyAgent(
        chain, owner_send, key(SUPPLIER).address, keys, KeyAgentSettings(poll_interval_s=0.1)
    )
    await w.tx(SUPPLIER, RoleRegister(int(Role.DATA_SUPPLIER)))
    for i in agents:
        await w.tx(i, RoleRegister(int(Role.COMPUTE_PROVIDER)))
        if i != V2:  # V2 cannot buy data: drawn as a verifier, it abstains
            await w.tx(i, RoleRegister(int(Role.CUSTOMER)))
    await w.block()
    proof = make_proof(lambda c: blobs.get(c), root)
    await w.tx(
        SUPPLIER,
        DatasetRegister(
            root,
            proof,
            "digits",
            "8x8 digits, priced",
            "CC0",
            Amount(DPRICE),
            salt,
            Hash32(encryption.key_check(salt, content)),
            crypto.sha256(data),
        ),
    )
    for i in agents:
        await w.tx(
            i,
            tk.ProviderRegister(
                device_kind="cpu",
                device_name="test cpu",
                devices=1,
                memory_bytes=4 << 30,
                compute_capability="",
                cpu_cores=os.cpu_count() or 1,
                platform_class=cls,
                price_per_device_second=Amount(cw.PRICE_PER_DEVICE_SECOND),
                max_concurrent=1,
            ),
        )
    await w.block()
    assert not w.rejected, w.rejected
    await nursery.start(owner.run)
    for agent in agents.values():
        await nursery.start(agent.run)
    return w, grants, owner


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


@pytest.mark.slow
async def test_priced_input_is_bought_by_each_reader_and_reimbursed(
    tmp_path: Path, nursery: trio.Nursery, threads: Any
) -> None:
    w, grants, owner = await _priced_world(tmp_path, nursery)
    before = {i: w.net(i) for i in (SUPPLIER, REQ, P, V1, V2)}
    tid = await w.submit(w.submit_body(w.params(), verifiers=2))
    t = w.task(tid)
    assert t.input_allowance == DPRICE
    await w.blocks_until(lambda: w.task(tid).state == tk.TaskState.ENDED, limit=120)
    t = w.task(tid)
    assert t.outcome == tk.Outcome.PAID, t
    assert [b.address for b in t.input_buys] == [key(P).address, key(V1).address]
    # V2, drawn too, could not buy (no CUSTOMER role): it committed nothing rather than a
    # mismatch it never computed, and nothing of its was refused on chain.
    slots = {bytes(s.address): s for s in t.verifier_slots}
    assert set(slots) == {bytes(key(V1).address), bytes(key(V2).address)}
    assert slots[bytes(key(V2).address)].commitment is None
    assert not w.rejected, w.rejected
    assert w.agents[V2].task_progress(tid)["stage"] == "abstained"  # type: ignore[index]
    # Both readers fetched under their own purchase; the owner's key agent posted both keys.
    assert {a for a, _ in grants.granted} == {bytes(key(P).address), bytes(key(V1).address)}
    assert owner.posted == 2
    # Each one-off key is kept 0600 under data_dir/compute/purchases.
    for i in (P, V1):
        files = list((tmp_path / f"node{i}" / "compute" / "purchases").glob("*.json"))
        assert len(files) == 1 and files[0].stat().st_mode & 0o777 == 0o600
    # Past the purchases' dispute windows the owner holds the two prices.
    end = w.chain.head_height + ECONOMY.key_post_heights + ECONOMY.dispute_window_heights + 2
    await w.blocks_until(lambda: w.chain.head_height >= end, limit=40)
    price = cw.PRICE_PER_DEVICE_SECOND * cw.WALL
    royalty = price * ECONOMY.royalty_percent // 100
    assert w.net(P) - before[P] == price  # its purchase came back from the allowance
    assert w.net(V1) - before[V1] == cw.VERIFIER_FEE
    assert w.net(V2) - before[V2] == 0  # abstained: no fee, nothing bought
    assert w.net(SUPPLIER) - before[SUPPLIER] == royalty + 2 * DPRICE
    # V2's fee and the two unused allowance parts (V2's, the referee's) came back
    assert w.net(REQ) - before[REQ] == -(price + royalty + cw.VERIFIER_FEE + 2 * DPRICE)


async def test_an_agent_that_cannot_buy_refuses_the_task(tmp_path: Path) -> None:
    """``check_task`` (what ``_maybe_claim`` asks before claiming): no CUSTOMER role, or a
    balance short of the price and the bond, is ``PricedInputRefused``."""
    chain = open_chain(MemoryKV(), _genesis())
    pool = cw.Pool(chain)
    blobs = BlobStore(tmp_path / "blobs", MemoryKV(), verify=verify_cid_block, quota_bytes=1 << 30)
    plain = cw._digits_v1()
    leaf0, data = plain[:LEAF0_BYTES], plain[LEAF0_BYTES:]
    content, salt = encryption.generate_content_key(), encryption.generate_salt()
    cipher = io.BytesIO()
    encryption.encrypt_stream(content, salt, io.BytesIO(data), cipher, len(data))
    root = bytes(import_file(blobs, io.BytesIO(leaf0 + cipher.getvalue())).root)
    w = cw.World(chain=chain, pool=pool, agents={}, dataset=dataset_id(root), cls="cpu-test")
    await w.tx(SUPPLIER, RoleRegister(int(Role.DATA_SUPPLIER)))
    await w.tx(P, RoleRegister(int(Role.COMPUTE_PROVIDER)))
    await w.block()
    await w.tx(
        SUPPLIER,
        DatasetRegister(
            root,
            make_proof(lambda c: blobs.get(c), root),
            "digits",
            "priced",
            "CC0",
            Amount(3_000 * NSD),
            salt,
            Hash32(encryption.key_check(salt, content)),
            crypto.sha256(data),
        ),
    )
    await w.tx(
        P,
        tk.ProviderRegister("cpu", "cpu", 1, 4 << 30, "", 1, "cpu-test", Amount(1), 1),
    )
    await w.block()
    tid = await w.submit(w.submit_body(w.params(), verifiers=1))
    assert not w.rejected, w.rejected
    agent = ComputeAgent(chain, pool.submit, key(P), tmp_path / "p", blobs=blobs)
    state = cw._State(chain.read_view())
    record = tk.get_provider(state, key(P).address)
    assert record is not None
    with pytest.raises(PricedInputRefused, match="CUSTOMER"):
        agent.check_task(state, w.task(tid), record)
    await w.tx(P, RoleRegister(int(Role.CUSTOMER)))
    await w.block()
    agent.check_task(cw._State(chain.read_view()), w.task(tid), record)  # can buy: no error
    await w.tx(P, Transfer(key(REQ).address, Amount(8_000 * NSD)))
    await w.block()
    assert not w.rejected, w.rejected
    state = cw._State(chain.read_view())
    with pytest.raises(PricedInputRefused, match="balance"):  # < 3000 NSD left
        agent.check_task(state, w.task(tid), record)
