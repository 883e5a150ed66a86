"""The compute agents' test world (``tests/test_compute_agent.py``,
``tests/test_compute_agent_scenarios.py``): a real ``ChainService`` whose blocks the test commits
from what the agents submit, several ``ComputeAgent``s (each another node's operator) with real
worker child processes (torch) running a tiny MLP on digits, one shared blob store, a dataset
registered by ``SUPPLIER`` and models registered by ``DEV`` (``World.register_model``), and the
cheat hook ``random_weights``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import trio

from node.chain import ChainService
from node.compute import recipes
from node.compute.worker import run_job
from node.compute_agent import ComputeAgent, ComputeSettings
from node.consensus.mempool import Mempool
from node.consensus.txs import KNOWN_KINDS, VerifiedTransaction, verify_transaction
from node.economy import tasks as tk
from node.economy.api import DEFAULT_ECONOMY_PARAMS, Role
from node.economy.datasets import DatasetRegister, dataset_id
from node.economy.models import ModelRegister, model_id
from node.economy.roles import RoleRegister
from node.errors import InvalidTransaction, NeuroSeedError
from node.storage import MemoryKV
from node.storage.blobstore import BlobStore
from node.storage.format_v1 import make_leaf0, make_proof
from node.storage.importer import import_file, verify_cid_block
from node.types import NSD, Address, Amount, Hash32
from tests.helpers import FEES, key, make_commit, make_genesis, open_chain, signed_tx

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

SUPPLIER, REQ, P, V1, V2, DEV = 1, 2, 3, 4, 5, 6  # DEV: a model developer
PROVIDERS = (P, V1, V2)
ECONOMY = replace(
    DEFAULT_ECONOMY_PARAMS,
    provider_bond=Amount(10 * NSD),
    task_min_bond=Amount(NSD),
    challenge_slash=Amount(5 * NSD),
    verify_commit_heights=3,
    verify_reveal_heights=3,
    task_challenge_heights=3,
    bisect_step_heights=3,
    royalty_percent=5,
)
ALL_KIND_FEES = tuple(replace(FEES, kind=k) for k in sorted(KNOWN_KINDS))
PRICE_PER_DEVICE_SECOND = 1000
WALL = 120
MAX_PRICE = 200 * NSD
VERIFIER_FEE = 3 * NSD
SPEC = {"family": "mlp", "input_dim": 64, "hidden": [16], "num_classes": 10}


def _genesis():  # type: ignore[no-untyped-def]
    g = make_genesis(
        funded=6, validators=(0,), balance=10_000 * NSD, fees=ALL_KIND_FEES, max_tx_bytes=1 << 20
    )
    return replace(g, economy_params=ECONOMY)


def _digits_v1() -> bytes:
    """The digits dataset as a format-v1 file (a safetensors file with a padded leaf 0)."""
    from safetensors.torch import save
    from sklearn.datasets import load_digits

    d = load_digits()
    raw = save(
        {
            "x": torch.tensor(d.data / 16.0, dtype=torch.float32).contiguous(),
            "y": torch.tensor(d.target, dtype=torch.int64).contiguous(),
        }
    )
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n].rstrip(b" ")
    return make_leaf0(header) + raw[8 + n :]


def _platform_class() -> str:
    """This machine's class with one thread (``node.compute.platform.platform_class``)."""
    from node.compute.platform import platform_class

    return platform_class("cpu", 1)


async def _sync_run_job(
    job: dict[str, Any], *, time_limit_s: float, on_progress: Any = None
) -> dict[str, Any]:
    """The worker run blocking on the loop: the mock clock cannot jump while the child runs."""
    return run_job(job, time_limit_s=time_limit_s, on_progress=on_progress)


@dataclass
class Pool:
    chain: ChainService
    txs: list[VerifiedTransaction] = field(default_factory=list)

    async def submit(self, raw: bytes) -> Hash32:
        vtx = verify_transaction(raw)
        self.txs.append(vtx)
        return vtx.tx_id

    async def pending_nonce(self, address: Address) -> int:
        base = self.chain.read_view().get_account(address).nonce
        return base + sum(1 for v in self.txs if v.sender == address)

    def submit_for(self, _who: int) -> Callable[[bytes], Any]:
        return self.submit

    def pending_nonce_for(self, _who: int) -> Callable[[Address], Any]:
        return self.pending_nonce

    def drop_for(self, _who: int) -> Callable[[Hash32], bool] | None:
        return None

    def candidates(self) -> list[VerifiedTransaction]:
        out = list(self.txs)
        self.txs.clear()
        return out

    def built(self, rejected: list[bytes], block_txs: list[bytes]) -> None:
        """Every candidate left the pool when the block was built."""


@dataclass
class NodePools:
    """Each agent's node has its own mempool (the real ``Mempool``, admission as
    ``Node.submit_transaction`` does it) and gossips what it admits to the validator's, which
    builds the blocks and drops what the build rejected; every pool catches up with each
    committed block. So a transaction that fails in a block stays in its sender's own pool."""

    chain: ChainService
    validator: Mempool = field(init=False)
    local: dict[int, Mempool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validator = Mempool(self.chain.chain.chain_id)

    def _add(self, pool: Mempool, vtx: VerifiedTransaction) -> None:
        self.chain.check_admission(vtx)
        pool.add(vtx, self.chain.state_view(), self.chain.params)

    async def submit(self, raw: bytes) -> Hash32:
        vtx = verify_transaction(raw)
        self._add(self.validator, vtx)
        return vtx.tx_id

    async def pending_nonce(self, address: Address) -> int:
        return self.validator.pending_nonce(address, self.chain.state_view())

    def submit_for(self, who: int) -> Callable[[bytes], Any]:
        pool = self.local.setdefault(who, Mempool(self.chain.chain.chain_id))

        async def submit(raw: bytes) -> Hash32:
            vtx = verify_transaction(raw)
            self._add(pool, vtx)
            with contextlib.suppress(NeuroSeedError):  # gossip: the validator may refuse it
                self._add(self.validator, vtx)
            return vtx.tx_id

        return submit

    def pending_nonce_for(self, who: int) -> Callable[[Address], Any]:
        pool = self.local.setdefault(who, Mempool(self.chain.chain.chain_id))

        async def pending_nonce(address: Address) -> int:
            return pool.pending_nonce(address, self.chain.state_view())

        return pending_nonce

    def drop_for(self, who: int) -> Callable[[Hash32], bool] | None:
        return self.local.setdefault(who, Mempool(self.chain.chain.chain_id)).remove

    def candidates(self) -> list[VerifiedTransaction]:
        return self.validator.select(1000, 1 << 24)

    def built(self, rejected: list[bytes], block_txs: list[bytes]) -> None:
        for raw in rejected:
            self.validator.remove(Hash32(hashlib.sha256(raw).digest()))
        ids = [Hash32(hashlib.sha256(raw).digest()) for raw in block_txs]
        senders = [verify_transaction(raw).sender for raw in block_txs]
        view = self.chain.state_view()
        for pool in (self.validator, *self.local.values()):
            pool.on_block_committed(ids, view, senders=senders)


@dataclass
class World:
    chain: ChainService
    pool: Pool | NodePools
    agents: dict[int, ComputeAgent]
    dataset: Hash32
    cls: str
    rejected: list[tuple[bytes, InvalidTransaction]] = field(default_factory=list)
    fees_paid: dict[bytes, int] = field(default_factory=dict)
    blobs: Any = None
    committed: list[VerifiedTransaction] = field(default_factory=list)
    pause: float = 0.05  # seconds, five times after each block

    async def block(self) -> int:
        chain = self.chain
        height = chain.head_height + 1
        proposer = chain.validator_set().proposer(height, 0)
        last = None if chain.head is None else chain.store.get_commit(chain.head_height)
        built = chain.build(0, proposer, last, self.pool.candidates())
        self.rejected.extend(built.rejected)
        block = built.block
        commit = make_commit(block.hash(), height, 0, (0,), time_ms=block.header.time + 1000)
        chain.commit(block, commit)
        self.pool.built([raw for raw, _ in built.rejected], [bytes(raw) for raw in block.txs])
        for raw in block.txs:
            vtx = verify_transaction(bytes(raw))
            self.committed.append(vtx)
            who = bytes(vtx.sender)
            self.fees_paid[who] = self.fees_paid.get(who, 0) + int(vtx.tx.fee)
        for agent in self.agents.values():
            agent.notify_block()
        for _ in range(5):  # the agents react (the workers block the loop while they run)
            await trio.sleep(self.pause)
        return height

    async def blocks_until(self, done: Callable[[], bool], limit: int = 80) -> None:
        for _ in range(limit):
            if done():
                return
            await self.block()
        raise AssertionError("condition not reached")

    def balance(self, who: int) -> int:
        return int(self.chain.read_view().get_account(key(who).address).balance)

    def net(self, who: int) -> int:
        """Balance plus the fees its committed transactions paid."""
        return self.balance(who) + self.fees_paid.get(bytes(key(who).address), 0)

    def task(self, tid: bytes) -> tk.Task:
        t = tk.get_task(_State(self.chain.read_view()), tid)
        assert t is not None
        return t

    async def tx(self, who: int, body: object) -> None:
        raw = signed_tx(who, body, nonce=await self.pool.pending_nonce(key(who).address))  # type: ignore[arg-type]
        await self.pool.submit(raw)

    def params(self, **over: Any) -> bytes:
        p: dict[str, Any] = {
            "spec": SPEC,
            "dataset": self.dataset.hex(),
            "steps": 20,
            "lr": 0.01,
            "batch_size": 32,
            "optimizer": "adam",
            "seed": 1,
            "checkpoint_every": 10,
            **over,
        }
        return recipes.canonical_params(p)

    def submit_body(
        self,
        params: bytes,
        *,
        recipe: str = "train",
        verifiers: int = 2,
        inputs: Sequence[tk.TaskInput] | None = None,
        limits: tk.TaskLimits | None = None,
    ) -> Any:
        """A ``TaskSubmit`` (default inputs: the dataset; default limits: 1 GiB, ``WALL``)."""
        return tk.TaskSubmit(
            recipe=recipe,
            params=params,
            inputs=tuple(inputs or (tk.TaskInput(tk.InputKind.DATASET, self.dataset),)),
            limits=limits or tk.TaskLimits(1 << 30, WALL, 1000),
            deadline=self.chain.head_height + 60,
            max_price=Amount(MAX_PRICE),
            verifier_fee=Amount(VERIFIER_FEE),
            verifiers=verifiers,
            min_reputation=0,
            platform_class=self.cls,
        )

    async def register_model(self, path: Path, seed: int, who: int = DEV) -> Hash32:
        """Register a freshly initialized ``SPEC`` model (weights from ``seed``) owned by
        ``who`` (a MODEL_DEVELOPER): its format-v1 file written at ``path``, imported into the
        shared blob store, registered in the next block. Returns the model id."""
        from node.compute.architectures import build_model, state_for_spec
        from node.merge.safetensors_writer import write_state_dict
        from node.models.specs import parse_spec, spec_json

        spec = parse_spec(SPEC)
        write_state_dict(path, state_for_spec(build_model(spec, seed=seed), spec))
        with open(path, "rb") as f:
            root = bytes(import_file(self.blobs, f).root)
        proof = make_proof(lambda c: self.blobs.get(c), root)
        body = ModelRegister(
            root, proof, spec_json(spec), f"mlp-{seed}", "digits MLP", "MIT", Amount(0)
        )
        await self.tx(who, body)
        await self.block()
        assert not self.rejected, self.rejected
        return model_id(root)

    async def submit_all(self, bodies: Sequence[Any], who: int = REQ) -> list[Hash32]:
        """Submit several tasks in one block; their ids in order."""
        tids = []
        for body in bodies:
            nonce = await self.pool.pending_nonce(key(who).address)
            tids.append(tk.task_id(key(who).address, nonce))
            await self.tx(who, body)
        await self.block()
        return tids

    def bodies(self, kind: type[Any]) -> list[Any]:
        """The bodies of the committed transactions of one type, in block order."""
        return [v.body for v in self.committed if isinstance(v.body, kind)]

    async def submit(self, body: Any, who: int = REQ) -> Hash32:
        tid = tk.task_id(key(who).address, await self.pool.pending_nonce(key(who).address))
        await self.tx(who, body)
        await self.block()
        return tid


class _State:
    def __init__(self, view: object) -> None:
        self._view = view

    def get(self, k: bytes) -> bytes | None:
        return self._view.get_state(k)  # type: ignore[attr-defined,no-any-return]


Cheat = Callable[[tk.Task, dict[str, Any]], dict[str, Any]]


def random_weights(task: tk.Task, result: dict[str, Any]) -> dict[str, Any]:
    """A provider that never trained: every checkpoint and the output replaced by random bytes
    of the same size (the hook returns what the agent then uploads and posts)."""
    rng = hashlib.sha256(b"cheat" + task.id).digest()
    for c in [*result["checkpoints"], {"path": result["output"]}]:
        path = Path(c["path"])
        size = path.stat().st_size
        data = (rng * (size // 32 + 1))[:size]
        path.write_bytes(data)
        if "sha256" in c:
            c["sha256"] = hashlib.sha256(data).hexdigest()
    return result


async def _world(
    tmp_path: Path,
    nursery: trio.Nursery,
    hooks: dict[int, Cheat] | None = None,
    *,
    providers: tuple[int, ...] = PROVIDERS,
    all_provide: bool = False,
    node_pools: bool = False,
    max_concurrent: int = 1,
    developer: bool = False,
    pause: float = 0.05,
    run_jobs: dict[int, Any] | None = None,
    settings_over: dict[int, dict[str, Any]] | None = None,
) -> World:
    """The world after two blocks: roles, the dataset, every provider's offer (and, with
    ``developer``, ``DEV``'s MODEL_DEVELOPER role); the agents running. Only ``P`` claims
    tasks unless ``all_provide``. ``run_jobs`` replaces an agent's worker run, ``settings_over``
    some of its settings."""
    chain = open_chain(MemoryKV(), _genesis())
    pool: Pool | NodePools = NodePools(chain) if node_pools else Pool(chain)
    blobs = BlobStore(tmp_path / "blobs", MemoryKV(), verify=verify_cid_block, quota_bytes=1 << 30)
    v1 = _digits_v1()
    root = bytes(import_file(blobs, io.BytesIO(v1)).root)
    cls = _platform_class()
    settings = ComputeSettings(
        memory_bytes=2 << 30,
        wall_seconds=WALL,
        price_per_device_second=PRICE_PER_DEVICE_SECOND,
        platform_class=cls,
        poll_interval_s=0.1,
        max_concurrent=max_concurrent,
    )
    agents = {
        i: ComputeAgent(
            chain,
            pool.submit_for(i),
            key(i),
            tmp_path / f"node{i}",
            # unless all provide, the others only verify
            replace(
                settings,
                provide=i == P or all_provide,
                **(settings_over or {}).get(i, {}),
            ),
            blobs=blobs,
            pending_nonce=pool.pending_nonce_for(i),
            drop=pool.drop_for(i),
            run_job=(run_jobs or {}).get(i, _sync_run_job),
            result_hook=(hooks or {}).get(i),
        )
        for i in providers
    }
    w = World(chain, pool, agents, dataset_id(root), cls, blobs=blobs, pause=pause)
    await w.tx(SUPPLIER, RoleRegister(int(Role.DATA_SUPPLIER)))
    if developer:
        await w.tx(DEV, RoleRegister(int(Role.MODEL_DEVELOPER)))
    for i in providers:
        await w.tx(i, RoleRegister(int(Role.COMPUTE_PROVIDER)))
    await w.block()
    proof = make_proof(lambda c: blobs.get(c), root)
    await w.tx(SUPPLIER, DatasetRegister(root, proof, "digits", "8x8 digits", "CC0", Amount(0)))
    for i in providers:
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
                price_per_device_second=Amount(PRICE_PER_DEVICE_SECOND),
                max_concurrent=max_concurrent,
            ),
        )
    await w.block()
    assert not w.rejected, w.rejected
    for agent in agents.values():
        await nursery.start(agent.run)
    return w
