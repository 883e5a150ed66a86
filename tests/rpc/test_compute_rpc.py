"""The compute market over JSON-RPC (rpc/methods/compute.py) on a real ``RpcServer`` whose node is
a ``ChainService`` that committed a registered dataset and a priced one, three compute providers'
offers in two platform classes, three task submissions from two requesters and one cancellation:
``ns_getTask`` by id (the input allowance and buys of a task on a priced input, the claim and
result heights), ``ns_listTasks``
filters (requester, state) and the cursor, ``ns_getProvider``, ``ns_listProviders`` (class filter,
cursor, bounded reads), the local-only methods refused to remote callers and answering
``ComputeAgentDisabled`` on a node without an agent, bad params; an offer's single platform
probe; and the SDK helpers
(``rpc.client``) over the same server.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import trio

from node.api import ViewState
from node.chain import ChainService, ReadView
from node.compute import recipes
from node.compute_agent import ComputeAgent, ComputeSettings
from node.consensus.txs import KNOWN_KINDS, decode_body, verify_transaction
from node.economy import tasks as tk
from node.economy.api import DEFAULT_ECONOMY_PARAMS, Role
from node.economy.datasets import DatasetRegister, dataset_id
from node.economy.roles import RoleRegister
from node.models.safetensors_header import TensorInfo, encode_header
from node.storage import MemoryKV
from node.storage.blobstore import BlobStore
from node.storage.format_v1 import make_leaf0, make_proof
from node.storage.importer import import_file, verify_cid_block
from node.types import NSD, Address, Amount, Hash32
from rpc import server as rpc_server
from rpc.client import Client
from rpc.methods.compute import list_providers, task_to_json
from rpc.server import RpcServer
from tests.economy.econ import priced_dataset, register_body
from tests.helpers import FEES, addr, commit_next, key, make_genesis, open_chain, signed_tx
from tests.rpc.conftest import LIMITS, call

SUPPLIER, REQ_A, REQ_B, PROV, PROV2, GPU = 1, 2, 3, 4, 5, 6
CLS = "cpu-test-class"
GPU_CLS = "cuda-test-class"
PRICED = 3 * NSD  # the priced dataset's price
SPEC = {"family": "mlp", "input_dim": 4, "hidden": [3], "num_classes": 2}


@dataclass
class Market:
    chain: ChainService
    dataset: Hash32
    priced: Hash32  # a priced dataset
    tasks: dict[str, Hash32] = field(default_factory=dict)
    nonces: dict[int, int] = field(default_factory=dict)

    def read_view(self) -> ReadView:
        return self.chain.read_view()

    def block(self, *txs: tuple[int, Any]) -> None:
        raws = []
        for who, body in txs:
            n = self.nonces.get(who, 0)
            self.nonces[who] = n + 1
            raws.append(verify_transaction(signed_tx(who, body, nonce=n)))
        _, result = commit_next(self.chain, candidates=raws)
        assert all(r.status == 0 for r in result.receipts), result.receipts

    def submit(self, who: int, name: str, data: Hash32 | None = None, **over: Any) -> None:
        self.tasks[name] = tk.task_id(addr(who), self.nonces.get(who, 0))
        data = self.dataset if data is None else data
        params = {
            "spec": SPEC,
            "dataset": data.hex(),
            "steps": 20,
            "lr": 0.01,
            "batch_size": 8,
            "optimizer": "adam",
            "seed": 1,
            "checkpoint_every": 10,
            **over,
        }
        body = tk.TaskSubmit(
            recipe="train",
            params=recipes.canonical_params(params),
            inputs=(tk.TaskInput(tk.InputKind.DATASET, data),),
            limits=tk.TaskLimits(1 << 30, 60, 100),
            deadline=self.chain.head_height + 50,
            max_price=Amount(2 * NSD),
            verifier_fee=Amount(NSD // 10),
            verifiers=1,
            min_reputation=0,
            platform_class=CLS,
        )
        self.block((who, body))


def offer(cls: str = CLS, price: int = 1000, *, cuda: bool = False) -> tk.ProviderRegister:
    return tk.ProviderRegister(
        device_kind="cuda" if cuda else "cpu",
        device_name="test gpu" if cuda else "test cpu",
        devices=2 if cuda else 1,
        memory_bytes=(80 if cuda else 4) << 30,
        compute_capability="9.0" if cuda else "",
        cpu_cores=4,
        platform_class=cls,
        price_per_device_second=Amount(price),
        max_concurrent=2,
    )


def _dataset_file(rows: int = 16) -> bytes:
    x = b"".join(hashlib.sha256(f"row {i}".encode()).digest()[:16] for i in range(rows))
    header = encode_header([TensorInfo("x", "F32", (rows, 4), 0, len(x))], None)
    return make_leaf0(header) + x


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> Market:
    fees = tuple(replace(FEES, kind=k) for k in sorted(KNOWN_KINDS))
    genesis = make_genesis(
        funded=6, validators=(0,), balance=10_000 * NSD, fees=fees, max_tx_bytes=1 << 20
    )
    economy = replace(DEFAULT_ECONOMY_PARAMS, provider_bond=Amount(10 * NSD))
    chain = open_chain(MemoryKV(), replace(genesis, economy_params=economy))
    tmp: Path = tmp_path_factory.mktemp("blobs")
    blobs = BlobStore(tmp, MemoryKV(), verify=verify_cid_block, quota_bytes=1 << 24)
    root = bytes(import_file(blobs, io.BytesIO(_dataset_file())).root)
    priced = priced_dataset(16)
    m = Market(chain, dataset_id(root), priced.id)
    m.block(
        (SUPPLIER, RoleRegister(int(Role.DATA_SUPPLIER))),
        *((p, RoleRegister(int(Role.COMPUTE_PROVIDER))) for p in (PROV, PROV2, GPU)),
    )
    proof = make_proof(lambda c: blobs.get(c), root)
    m.block(
        (SUPPLIER, DatasetRegister(root, proof, "rows", "test rows", "CC0", Amount(0))),
        (SUPPLIER, register_body(priced, price=PRICED, name="priced rows")),
        (PROV, offer()),
        (PROV2, offer(price=2000)),
        (GPU, offer(GPU_CLS, 50_000, cuda=True)),
    )
    m.submit(REQ_A, "a1")
    m.submit(REQ_A, "a2", seed=2)
    m.submit(REQ_B, "b1", seed=3)
    m.submit(REQ_B, "b2", m.priced, seed=4)
    m.block((REQ_A, tk.TaskCancel(m.tasks["a2"])))
    return m


@pytest.fixture
async def url(nursery: trio.Nursery, market: Market) -> AsyncIterator[str]:
    server = RpcServer(market, "127.0.0.1", 0, LIMITS)  # type: ignore[arg-type]
    yield await nursery.start(server.serve)
    nursery.cancel_scope.cancel()


async def ok(url: str, method: str, *params: Any) -> Any:
    answer = await call(url, method, list(params))
    assert "error" not in answer, answer
    return answer["result"]


async def error(url: str, method: str, *params: Any) -> dict[str, Any]:
    answer = await call(url, method, list(params))
    assert "error" in answer, answer
    err: dict[str, Any] = answer["error"]
    return err


def hx(b: bytes) -> str:
    return "0x" + bytes(b).hex()


async def test_get_task(url: str, market: Market) -> None:
    t = await ok(url, "ns_getTask", hx(market.tasks["a1"]))
    assert t["id"] == hx(market.tasks["a1"]) and t["requester"] == hx(addr(REQ_A))
    assert t["recipe"] == "train" and t["state"] == "open" and t["outcome"] == "pending"
    assert t["steps"] == 20 and t["checkpointSteps"] == [10, 20]
    assert t["inputs"] == [{"kind": "dataset", "ref": hx(market.dataset)}]
    assert t["limits"] == {"deviceMemory": 1 << 30, "wallSeconds": 60, "steps": 100}
    assert t["maxPrice"] == str(2 * NSD) and t["platformClass"] == CLS
    assert t["provider"] is None and t["result"] is None and t["progress"] is None
    assert t["claimHeight"] is None and t["resultHeight"] is None  # unclaimed
    assert t["inputAllowance"] == "0" and t["inputBuys"] == []
    assert recipes.parse_params(t["params"].encode())["seed"] == 1
    cancelled = await ok(url, "ns_getTask", hx(market.tasks["a2"]))
    assert cancelled["state"] == "ended" and cancelled["outcome"] == "cancelled"
    assert cancelled["escrow"] == "0"
    assert await ok(url, "ns_getTask", hx(b"\x00" * 32)) is None
    for bad in ("0x12", 5, "task"):
        assert (await error(url, "ns_getTask", bad))["code"] == -32602


async def test_list_tasks_filters_and_cursor(url: str, market: Market) -> None:
    ids = sorted(hx(t) for t in market.tasks.values())
    everything = await ok(url, "ns_listTasks", {})
    assert [t["id"] for t in everything["tasks"]] == ids and everything["cursor"] is None
    assert all(t["progress"] is None for t in everything["tasks"])
    first = await ok(url, "ns_listTasks", {"limit": 2})
    assert [t["id"] for t in first["tasks"]] == ids[:2] and first["cursor"] == ids[1]
    rest = await ok(url, "ns_listTasks", {"limit": 3, "cursor": first["cursor"]})
    assert [t["id"] for t in rest["tasks"]] == ids[2:] and rest["cursor"] is None
    mine = await ok(url, "ns_listTasks", {"requester": hx(addr(REQ_A))})
    assert {t["id"] for t in mine["tasks"]} == {hx(market.tasks["a1"]), hx(market.tasks["a2"])}
    open_ = await ok(url, "ns_listTasks", {"state": "open"})
    assert {t["id"] for t in open_["tasks"]} == {hx(market.tasks[n]) for n in ("a1", "b1", "b2")}
    ended = await ok(url, "ns_listTasks", {"state": "ended", "requester": hx(addr(REQ_A))})
    assert [t["id"] for t in ended["tasks"]] == [hx(market.tasks["a2"])]
    assert (await ok(url, "ns_listTasks", {"provider": hx(addr(PROV))}))["tasks"] == []
    assert len((await ok(url, "ns_listTasks"))["tasks"]) == 4
    for bad in (
        {"limit": 0},
        {"limit": 101},
        {"state": "running"},
        {"colour": "red"},
        {"requester": "0x12"},
        {"cursor": "0x12"},
        "not an object",
    ):
        assert (await error(url, "ns_listTasks", bad))["code"] == -32602


async def test_get_provider(url: str) -> None:
    p = await ok(url, "ns_getProvider", hx(addr(PROV)))
    assert p["address"] == hx(addr(PROV)) and p["deviceKind"] == "cpu"
    assert p["platformClass"] == CLS and p["pricePerDeviceSecond"] == "1000"
    assert p["maxConcurrent"] == 2 and p["activeTasks"] == 0 and p["reputation"] == 0
    assert await ok(url, "ns_getProvider", hx(addr(REQ_A))) is None
    assert (await error(url, "ns_getProvider", "0x12"))["code"] == -32602


async def test_task_input_allowance_and_buys(url: str, market: Market) -> None:
    """A task on a priced dataset shows the allowance the chain escrows per party (the price)
    and, once parties read the data, the purchases each used (``task_to_json``)."""
    t = await ok(url, "ns_getTask", hx(market.tasks["b2"]))
    assert t["inputs"] == [{"kind": "dataset", "ref": hx(market.priced)}]
    assert t["inputAllowance"] == str(PRICED) and t["inputBuys"] == []
    task = tk.get_task(ViewState(market.read_view()), market.tasks["b2"])
    assert task is not None and int(t["escrow"]) == task.escrow
    assert task.escrow == 2 * NSD + 2 * NSD * DEFAULT_ECONOMY_PARAMS.royalty_percent // 100 + (
        NSD // 10
    ) + PRICED * tk.input_parties(1)
    p1, p2 = Hash32(b"\x11" * 32), Hash32(b"\x22" * 32)
    bought = replace(
        task, input_buys=(tk.InputBuy(addr(PROV), (p1,)), tk.InputBuy(addr(GPU), (p2,)))
    )
    assert task_to_json(bought)["inputBuys"] == [
        {"address": hx(addr(PROV)), "purchases": [hx(p1)]},
        {"address": hx(addr(GPU)), "purchases": [hx(p2)]},
    ]


def test_claim_and_result_heights(market: Market) -> None:
    """``claimHeight`` is the current claim's block (null while unclaimed, again once a claim
    has been dropped), ``resultHeight`` the block of the result (``result.height``)."""
    task = tk.get_task(ViewState(market.read_view()), market.tasks["a1"])
    assert task is not None and task.claim_height == 0
    claimed = replace(task, state=tk.TaskState.CLAIMED, provider=addr(PROV), claim_height=17)
    shown = task_to_json(claimed)
    assert shown["claimHeight"] == 17 and shown["resultHeight"] is None
    record = tk.ResultRecord(
        output=b"", metrics=(), checkpoints=(), final_link=Hash32(b"\x01" * 32),
        device_seconds=30, price=Amount(1000), height=52, fail_reason=0,
    )  # fmt: skip
    done = task_to_json(replace(claimed, state=tk.TaskState.DRAWING, result=record))
    assert done["claimHeight"] == 17 and done["resultHeight"] == 52 == done["result"]["height"]
    reopened = replace(claimed, state=tk.TaskState.OPEN, provider=None, claim_height=0)
    assert task_to_json(reopened)["claimHeight"] is None


def _by_address(*who: int) -> list[str]:
    return sorted(hx(addr(w)) for w in who)


async def test_list_providers_class_filter_and_cursor(url: str, market: Market) -> None:
    everyone = await ok(url, "ns_listProviders", {})
    assert [p["address"] for p in everyone["providers"]] == _by_address(PROV, PROV2, GPU)
    assert everyone["cursor"] is None
    assert everyone["providers"] == [
        await ok(url, "ns_getProvider", a) for a in _by_address(PROV, PROV2, GPU)
    ]  # each as ns_getProvider answers it
    gpu = next(p for p in everyone["providers"] if p["address"] == hx(addr(GPU)))
    assert gpu["platformClass"] == GPU_CLS and gpu["deviceKind"] == "cuda"
    assert gpu["devices"] == 2 and gpu["pricePerDeviceSecond"] == "50000"
    assert len((await ok(url, "ns_listProviders"))["providers"]) == 3
    # Paging over all providers, then over one class (its list, address order).
    seen: list[str] = []
    cursor = None
    for _ in range(4):
        page = await ok(
            url, "ns_listProviders", {"limit": 1, **({"cursor": cursor} if cursor else {})}
        )
        seen += [p["address"] for p in page["providers"]]
        cursor = page["cursor"]
        if cursor is None:
            break
    assert seen == _by_address(PROV, PROV2, GPU)
    cpu = await ok(url, "ns_listProviders", {"platformClass": CLS})
    assert [p["address"] for p in cpu["providers"]] == _by_address(PROV, PROV2)
    assert {p["platformClass"] for p in cpu["providers"]} == {CLS} and cpu["cursor"] is None
    first = await ok(url, "ns_listProviders", {"platformClass": CLS, "limit": 1})
    assert [p["address"] for p in first["providers"]] == _by_address(PROV, PROV2)[:1]
    assert first["cursor"] == first["providers"][0]["address"]
    rest = await ok(url, "ns_listProviders", {"platformClass": CLS, "cursor": first["cursor"]})
    assert [p["address"] for p in rest["providers"]] == _by_address(PROV, PROV2)[1:]
    assert rest["cursor"] is None
    none = await ok(url, "ns_listProviders", {"platformClass": "no-such-class"})
    assert none == {"providers": [], "cursor": None}
    for bad in (
        {"limit": 0},
        {"limit": 101},
        {"platformClass": ""},
        {"platformClass": "x" * (tk.MAX_CLASS_BYTES + 1)},
        {"platformClass": 7},
        {"cursor": "0x12"},
        {"class": CLS},
        "not an object",
    ):
        assert (await error(url, "ns_listProviders", bad))["code"] == -32602, bad


class _CountingView:
    """A read view that counts the provider records read."""

    def __init__(self, view: ReadView) -> None:
        self._view = view
        self.reads = 0

    def get_state(self, key: bytes) -> bytes | None:
        self.reads += key.startswith(tk.provider_key(Address(b"")))
        return self._view.get_state(key)

    def iter_state(
        self, prefix: bytes, *, after: bytes | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        for item in self._view.iter_state(prefix, after=after):
            self.reads += 1
            yield item


@pytest.mark.parametrize("cls", [None, CLS])
def test_list_providers_reads_at_most_a_page(market: Market, cls: str | None) -> None:
    view = _CountingView(market.read_view())
    found, cursor = list_providers(view, platform_class=cls, limit=1)
    assert len(found) == 1 and cursor == found[0].address and view.reads == 1
    found, cursor = list_providers(view, platform_class=cls, cursor=cursor, limit=100)
    assert len(found) == (2 if cls is None else 1) and cursor is None


async def test_local_methods_without_an_agent_and_for_remote_callers(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for method, params in (("ns_computeStatus", []), ("ns_computeOffer", [{}])):
        assert (await error(url, method, *params))["code"] == 3181  # ComputeAgentDisabled
    assert (await error(url, "ns_computeOffer", "no"))["code"] == -32602
    bad_price = {"pricePerDeviceSecond": "ten"}
    assert (await error(url, "ns_computeOffer", bad_price))["code"] == -32602
    monkeypatch.setattr(rpc_server, "is_loopback_caller", lambda request: False)
    for method in ("ns_computeStatus", "ns_computeOffer"):
        assert (await error(url, method))["code"] == 2273  # LocalCallersOnly
    # The reads stay open to everyone.
    assert (await ok(url, "ns_listTasks", {"limit": 1}))["tasks"]


async def test_sdk_helpers(url: str, market: Market) -> None:
    def use() -> None:
        with Client(url) as client:
            t = client.get_task(market.tasks["b1"])
            assert t is not None and t["requester"] == hx(addr(REQ_B))
            assert client.get_task(hx(market.tasks["a1"])) is not None
            page = client.list_tasks(requester=addr(REQ_A), state="open", limit=5)
            assert [x["id"] for x in page["tasks"]] == [hx(market.tasks["a1"])]
            p = client.get_provider(addr(PROV))
            assert p is not None and p["platformClass"] == CLS
            assert client.get_provider(key(SUPPLIER).address) is None
            listed = client.list_providers(platform_class=CLS, limit=100)["providers"]
            assert hx(addr(PROV)) in [x["address"] for x in listed]
            assert all(x["platformClass"] == CLS for x in listed)

    await trio.to_thread.run_sync(use)


class _Agent(ComputeAgent):
    """The real agent; only the hardware probe (a child process importing torch) answers a
    fixed CPU, so that the offer it sends is the RPC's parameters and its settings."""

    async def platform_info(self) -> dict[str, Any]:
        return {"class": CLS, "hw": {"machine": "x86_64", "cpu_cores": 4, "memory_bytes": 8 << 30}}


def _agent(market: Market, tmp_path: Path, sent: list[bytes], price: int = 7) -> ComputeAgent:
    async def submit(raw: bytes) -> Hash32:
        sent.append(raw)
        return verify_transaction(raw).tx_id

    settings = ComputeSettings(price_per_device_second=price, platform_class=CLS)
    return _Agent(market.chain, submit, key(PROV), tmp_path, settings)


async def test_offer_prices_are_amounts_in_base_units(
    url: str, market: Market, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[bytes] = []
    monkeypatch.setattr(market, "compute_agent", _agent(market, tmp_path, sent), raising=False)
    big = 10**24  # more than a uint64: amounts are uint256
    for given, price in (("1500", 1500), ("0x5dc", 1500), (1500, 1500), (str(big), big)):
        answer = await ok(url, "ns_computeOffer", {"pricePerDeviceSecond": given})
        body = decode_body(verify_transaction(sent[-1]).tx)
        assert isinstance(body, tk.ProviderRegister) and body.price_per_device_second == price
        assert answer["txId"] == hx(verify_transaction(sent[-1]).tx_id)
    await ok(url, "ns_computeOffer", {"maxConcurrent": 3})
    body = decode_body(verify_transaction(sent[-1]).tx)
    assert isinstance(body, tk.ProviderRegister)
    assert body.price_per_device_second == 7 and body.max_concurrent == 3  # the settings' price
    for bad in ("1.5", "1.5 NSD", "-3", -3, 1.5, "0x", str(2**256), {"x": 1}):
        err = await error(url, "ns_computeOffer", {"pricePerDeviceSecond": bad})
        assert err["code"] == -32602, (bad, err)
    assert (await error(url, "ns_computeOffer", {"price": "1"}))["code"] == -32602
    assert len(sent) == 5  # nothing sent for a refused request


class _ProbedAgent(ComputeAgent):
    """The real agent with no platform class in its settings; its hardware probe (a torch child
    process in the node) is counted and can be made to fail."""

    probes = 0
    fail = False

    async def platform_info(self) -> dict[str, Any]:
        self.probes += 1
        if self.fail:
            raise RuntimeError("the probe failed")
        return {"class": CLS, "hw": {"machine": "x86_64", "cpu_cores": 4, "memory_bytes": 8 << 30}}


async def test_an_offer_probes_the_platform_once(market: Market, tmp_path: Path) -> None:
    """One probe per offer gives both the hardware and the class (cached from the first);
    without a class a failed probe sends nothing, with one the offer goes out on the settings."""
    sent: list[bytes] = []

    async def submit(raw: bytes) -> Hash32:
        sent.append(raw)
        return verify_transaction(raw).tx_id

    settings = ComputeSettings(price_per_device_second=7)
    agent = _ProbedAgent(market.chain, submit, key(PROV), tmp_path, settings)
    agent.fail = True
    with pytest.raises(RuntimeError, match="the probe failed"):
        await agent.offer()
    assert agent.probes == 1 and sent == []
    agent.fail = False
    await agent.offer()
    assert agent.probes == 2 and await agent.platform_class() == CLS and agent.probes == 2
    body = decode_body(verify_transaction(sent[-1]).tx)
    assert isinstance(body, tk.ProviderRegister)
    assert body.platform_class == CLS and body.cpu_cores == 4 and body.device_name == "x86_64-"
    agent.fail = True
    await agent.offer(max_concurrent=5)  # the class is known: sent without the hardware
    assert agent.probes == 3 and len(sent) == 2
    body = decode_body(verify_transaction(sent[-1]).tx)
    assert isinstance(body, tk.ProviderRegister)
    assert body.platform_class == CLS and body.cpu_cores == 1 and body.max_concurrent == 5


def test_the_ask_uses_the_price_of_the_offer_on_chain(market: Market, tmp_path: Path) -> None:
    """The provider's offer on chain says 1000 per device-second: that is the ask, whatever the
    node's setting; without an offer on chain, the setting."""
    view = market.read_view()
    task = tk.get_task(ViewState(view), market.tasks["a1"])
    assert task is not None
    agent = _agent(market, tmp_path, [], price=7)
    record = agent.provider_record()
    assert record is not None and record.price_per_device_second == 1000
    assert agent.ask_price(task) == 1000 * task.devices * task.limits.wall_seconds
    assert agent.ask_price(task, record) == agent.ask_price(task)
    settings = ComputeSettings(price_per_device_second=7)
    no_offer = ComputeAgent(market.chain, agent._submit, key(SUPPLIER), tmp_path, settings)
    assert no_offer.provider_record() is None
    assert no_offer.ask_price(task) == 7 * task.devices * task.limits.wall_seconds
