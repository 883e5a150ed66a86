"""The node process: ``run_node(config)`` opens one root nursery and starts each service.

DESIGN §1: one OS process per node, one ``trio.run``; the chain service is the single writer, the
consensus service drives the engine, the RPC server runs aiohttp in its own thread and reaches the
node through the non-blocking bridge. ``Node`` is the facade (``node.api.NodeAPI``) the RPC methods
call.

Artifacts (DESIGN §7–§9): every node has a blob store (``<datadir>/blobs``) and an
``ArtifactService`` (chunk server with the chain policy, DHT announcements, uploads, fetch jobs).
With an **operator account** (``[operator]`` in config.toml; a funded dev key per devnet node) the
node also runs the owner key agent (``node.key_agent``: posts the wrapped content key for each
purchase of its priced datasets) and the storage agent (``node.storage_agent``); without one those
agents are off. A ``DatasetRegister`` or ``ModelRegister`` is admitted only if this node holds
(or can fetch) its artifact. Every node runs the model search index (``node.model_search``).
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from node import crypto
from node.api import NodeStatus
from node.artifact_service import ArtifactService
from node.chain import ChainService, ReadView
from node.config import NodeConfig
from node.consensus.mempool import Mempool, MempoolLimits
from node.consensus.txs import verify_transaction
from node.consensus_service import ConsensusService
from node.economy.api import EconomyKind
from node.errors import ConfigError, StorageError
from node.genesis import Genesis, load_genesis
from node.model_search import ModelSearchService
from node.storage.leveldb import LevelDB
from node.types import Address, Hash32
from rpc.server import ArtifactHttpSettings, RpcLimits, RpcServer

log = logging.getLogger(__name__)

# Registrations whose artifact must be available from this node before they are admitted.
_REGISTERS_ARTIFACT = frozenset({EconomyKind.DATASET_REGISTER, EconomyKind.MODEL_REGISTER})

NODE_VERSION = "neuroseed/0.1.0"

# The cyclic collector's thresholds while the node runs: a block allocates tens of thousands of
# short-lived container objects (records, tuples), which at the default 700 would start ~40
# young-generation passes per 1,000-transfer block. Reference counting frees them anyway; the
# collector only has to find cycles, which this still does, 28 times less often.
GC_THRESHOLDS = (20_000, 10, 10)
_gc_tuned = False


def tune_gc() -> None:
    """After start-up: move everything alive now (modules, genesis, caches) out of the cyclic
    collector's reach with ``gc.freeze()``, so its full passes do not walk them again and
    again, and raise the young-generation threshold (``GC_THRESHOLDS``). Once per process."""
    global _gc_tuned
    if _gc_tuned:
        return
    _gc_tuned = True
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class Node:
    """The live node behind JSON-RPC (implements ``node.api.NodeAPI``)."""

    def __init__(
        self,
        chain: ChainService,
        mempool: Mempool,
        consensus: ConsensusService,
        key: crypto.PrivateKey | None,
        *,
        network: Any = None,
        p2p: Any = None,
        sync: Any = None,
        artifacts: ArtifactService | None = None,
        operator: crypto.PrivateKey | None = None,
    ) -> None:
        self.chain = chain
        self.mempool = mempool
        self.consensus = consensus
        self.key = key
        self.network = network
        self.p2p = p2p
        self.sync = sync
        self.artifacts = artifacts
        self.operator = operator  # the account that signs this node's own transactions
        self.storage_agent: Any = None
        self.key_agent: Any = None
        self.compute_agent: Any = None  # node.compute_agent.ComputeAgent with [compute] enabled
        self.model_search: ModelSearchService | None = None  # ns_searchModels' index

    def read_view(self) -> ReadView:
        return self.chain.read_view()

    async def submit_transaction(self, raw: bytes) -> Hash32:
        params = self.chain.params
        # Signature recovery is CPU work: keep it off the event loop (DESIGN §1).
        vtx = await trio.to_thread.run_sync(verify_transaction, raw, params.max_tx_bytes)
        if vtx.tx.kind in _REGISTERS_ARTIFACT and self.artifacts is not None:
            # DESIGN §8: availability is checked at admission (here), never in consensus.
            await self.artifacts.check_available(bytes(vtx.body.root))  # type: ignore[attr-defined]
        # The kind's state rules, now, so the submitter gets the rule it breaks (DESIGN §4).
        self.chain.check_admission(vtx)
        self.mempool.add(vtx, self.chain.state_view(), params)
        if self.p2p is not None:
            self.p2p.gossip.broadcast_transaction(raw)
        return vtx.tx_id

    async def status(self) -> NodeStatus:
        head = self.chain.head
        validators = self.chain.validator_set()
        address = self.key.address if self.key is not None else None
        return NodeStatus(
            chain_id=self.chain.chain.chain_id,
            node_version=NODE_VERSION,
            head_height=self.chain.head_height,
            head_hash=head.hash() if head is not None else Hash32(b"\x00" * 32),
            head_time_ms=head.time if head is not None else self.chain.chain.genesis_time,
            validator_address=address,
            is_validator=address is not None and validators.is_member(address),
            mempool_size=len(self.mempool),
            mempool_bytes=self.mempool.size_bytes,
            peers=0
            if self.network is None
            else sum(1 for p in self.network.peers() if p.connected),
            syncing=False if self.sync is None else bool(self.sync.status().syncing),
            finalized_height=self.chain.head_height,
            consensus_height=int(self.consensus.state.height),
            round=int(self.consensus.state.round),
            validators=tuple((v.address, v.power) for v in validators.validators),
        )

    async def pending_nonce(self, address: Address) -> int:
        return self.mempool.pending_nonce(address, self.chain.state_view())

    def drop_transaction(self, tx_id: Hash32) -> bool:
        """Remove one of this node's own transactions that can no longer execute (a lost
        ``TaskClaim``) from the local pool, so that its nonce is free again; False if not held."""
        return self.mempool.remove(tx_id)


@dataclass(frozen=True, slots=True)
class NodeHandle:
    """What ``run_node`` reports once it is serving."""

    rpc_url: str
    node: Node
    p2p_addrs: tuple[str, ...] = ()  # listen multiaddrs with /p2p/<peer id>; () without p2p


def make_network(config: NodeConfig) -> Any:
    """The libp2p host for this node, or None when p2p is off (no listen address) or the
    ``p2p`` extra is not installed (a single-validator devnet needs no peers)."""
    if not config.p2p_listen_addrs:
        return None
    try:
        from node.p2p.libp2p_host import Libp2pHost
    except ImportError:
        log.warning("py-libp2p is not installed (the `p2p` extra): running without peers")
        return None
    from node.p2p.identity import load_or_create_node_key

    return Libp2pHost(
        load_or_create_node_key(config.data_dir),
        config.p2p_listen_addrs,
        config.p2p_bootstrap_peers,
    )


@contextmanager
def data_dir_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<data dir>/node.lock`` so two nodes never share a data dir."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise StorageError(
                "the data directory is in use by another neuroseed process; stop it first"
            ) from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


async def run_node(
    config: NodeConfig,
    *,
    key: crypto.PrivateKey | None = None,
    genesis: Genesis | None = None,
    operator: crypto.PrivateKey | None = None,
    task_status: trio.TaskStatus[NodeHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a node until cancelled (or SIGTERM/SIGINT). ``operator``: the unlocked operator
    account (its address must be the config's ``operator.address`` when that is set)."""
    layout = config.layout
    if genesis is None:
        if not layout.genesis.exists():
            raise ConfigError(
                f"no genesis.json in the data directory {config.data_dir}; run `neuroseed init`"
            )
        genesis = load_genesis(layout.genesis)
    if (
        key is not None
        and config.validator_address is not None
        and key.address != config.validator_address
    ):
        raise ConfigError("the validator key does not match validator_address in the config")
    if (
        operator is not None
        and config.operator_address is not None
        and operator.address != config.operator_address
    ):
        raise ConfigError("the operator key does not match operator.address in the config")
    with data_dir_lock(layout.lock):
        kv = LevelDB(layout.chain)
        chain: ChainService | None = None
        artifacts: ArtifactService | None = None
        try:
            chain = ChainService(kv, genesis)
            chain.open()
            tune_gc()
            mempool = Mempool(
                genesis.chain_id,
                MempoolLimits(
                    max_txs=config.mempool_max_txs,
                    max_bytes=config.mempool_max_bytes,
                    max_future_per_sender=config.mempool_max_future_per_sender,
                ),
            )
            consensus = ConsensusService(chain, mempool, key, layout.consensus_wal)
            network = make_network(config)
            p2p = sync = None
            if network is not None:
                from node.p2p.catchup import CatchupSettings, ConsensusP2P
                from node.p2p.sync import SyncService, SyncSettings

                # Range sync is the SyncService's; catch-up keeps votes, commits and pulls.
                p2p = ConsensusP2P(
                    network,
                    chain,
                    mempool,
                    consensus,
                    catchup_settings=CatchupSettings(serve_sync=False),
                )
                # With bootstrap peers, wait a little for one so a restarted or new node syncs
                # before it starts voting.
                sync = SyncService(
                    network,
                    chain,
                    consensus,
                    SyncSettings(initial_peer_wait_s=5.0 if config.p2p_bootstrap_peers else 0.0),
                )
            artifacts = ArtifactService.open(
                layout, network, chain.read_view, quota_bytes=config.blob_quota_bytes
            )
            node = Node(
                chain,
                mempool,
                consensus,
                key,
                network=network,
                p2p=p2p,
                sync=sync,
                artifacts=artifacts,
                operator=operator,
            )
            server = RpcServer(
                node,
                config.rpc_host,
                config.rpc_port,
                RpcLimits(
                    max_body_bytes=config.rpc_max_body_bytes,
                    max_batch_size=config.rpc_max_batch,
                ),
                artifacts=ArtifactHttpSettings(
                    max_upload_bytes=config.upload_max_bytes,
                    allow_remote=config.upload_remote,
                ),
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signals, nursery.cancel_scope)
                p2p_addrs: tuple[str, ...] = ()
                if network is not None and p2p is not None:
                    p2p_addrs = await nursery.start(network.run)
                    log.info("p2p listening on %s", ", ".join(p2p_addrs))
                    # Topics and handlers first, so the first signed proposal has somewhere to go.
                    await nursery.start(p2p.run)
                await nursery.start(artifacts.run)
                node.model_search = ModelSearchService(chain.read_view)
                await nursery.start(node.model_search.run)
                if operator is not None:
                    await _start_agents(nursery, node, config, network, artifacts, operator)
                # RPC before the initial sync, so ns_status can show that the node is syncing.
                url = await nursery.start(server.serve)
                if sync is not None:
                    await nursery.start(sync.run)  # returns once the initial sync is done
                await nursery.start(consensus.run)
                task_status.started(NodeHandle(url, node, p2p_addrs))
        finally:
            if artifacts is not None:
                artifacts.close()
            if chain is not None:
                chain.close()
            kv.close()


async def _start_agents(
    nursery: trio.Nursery,
    node: Node,
    config: NodeConfig,
    network: Any,
    artifacts: ArtifactService,
    operator: crypto.PrivateKey,
) -> None:
    """The agents that sign with the operator account: key posts and storage deals."""
    from node.key_agent import KeyAgent
    from node.storage_agent import StorageAgent

    node.storage_agent = StorageAgent(
        node,
        network,
        node.submit_transaction,
        operator,
        config.data_dir,
        blobs=artifacts.store,
        pending_nonce=node.pending_nonce,
    )
    await nursery.start(node.storage_agent.run)
    # The storage agent's send_transaction: one lock orders every operator transaction's nonce.
    node.key_agent = KeyAgent(
        node, node.storage_agent.send_transaction, operator.address, artifacts.keys
    )
    await nursery.start(node.key_agent.run)
    log.info("operator account %s: key and storage agents running", operator.address.hex())
    if config.compute_enabled:
        await _start_compute(nursery, node, config, artifacts, operator)


async def _start_compute(
    nursery: trio.Nursery,
    node: Node,
    config: NodeConfig,
    artifacts: ArtifactService,
    operator: crypto.PrivateKey,
) -> None:
    """The compute agent (``neuroseed run --provide-compute`` / ``[compute] enabled``)."""
    from node.compute_agent import ComputeAgent, ComputeSettings, InputUnavailable

    async def fetch(root: bytes, access: Any = None) -> None:
        job = artifacts.start_fetch(root, access=access)
        await job.done.wait()
        if job.state != "done":
            raise InputUnavailable(job.error or "the fetch failed")

    settings = ComputeSettings(
        max_concurrent=config.compute_max_concurrent,
        memory_bytes=config.compute_memory_bytes,
        wall_seconds=config.compute_wall_seconds,
        device=config.compute_device,
        threads=config.compute_threads,
        price_per_device_second=config.compute_price_per_device_second,
        claim_margin_heights=config.compute_claim_margin_heights,
        tasks_per_block=config.compute_tasks_per_block,
    )
    agent = ComputeAgent(
        node,
        node.submit_transaction,  # nonces from the mempool (pending_nonce)
        operator,
        config.data_dir,
        settings,
        blobs=artifacts.store,
        fetch=fetch,
        provide=artifacts.provide,
        pending_nonce=node.pending_nonce,
        drop=node.drop_transaction,
        fetch_granted=fetch,  # priced inputs: with a purchase's access request
        peer_id=None if artifacts.network is None else bytes(artifacts.network.peer_id),
    )
    node.compute_agent = agent
    await nursery.start(agent.run)
    log.info("compute agent running (device %s)", config.compute_device)


async def _stop_on_signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            scope.cancel()
            return
