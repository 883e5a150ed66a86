"""The compute market over JSON-RPC (DESIGN §10; ``docs/compute-market.md``).

Reads answer from the committed read view in the RPC thread: ``ns_getTask`` (with this node's
progress when its compute agent runs, verifies or disputes the task), ``ns_listTasks`` (filters
and a cursor, bounded scan), ``ns_getProvider``, ``ns_listProviders`` (a platform class filter
and a cursor, at most a page of records read). ``ns_computeStatus`` (local only) shows the
agent's settings and the tasks it works on; ``ns_computeOffer`` (local only) makes it send its
``ProviderRegister``. The node exposes its agent as ``node.compute_agent`` (None when it runs
none). Shapes follow ``rpc.methods.ns``: hex bytes, decimal-string amounts, camelCase fields.
"""

from __future__ import annotations

from typing import Any

from node.api import ViewState
from node.compute_agent import ComputeAgent, ComputeAgentDisabled
from node.economy import tasks as tk
from node.types import Address, Hash32
from rpc.methods import Context, MethodTable
from rpc.schema import (
    Params,
    bad_param,
    parse_address,
    parse_amount,
    parse_hash,
    parse_quantity,
    parse_str,
    to_hex,
)

MAX_LIST_LIMIT = 100
DEFAULT_LIST_LIMIT = 20
MAX_LIST_SCAN = 10_000


def _opt(b: bytes | None) -> str | None:
    return None if b is None else to_hex(bytes(b))


def _slot(s: tk.VerifierSlot | None) -> dict[str, Any] | None:
    if s is None:
        return None
    return {
        "address": to_hex(s.address),
        "committed": s.commitment is not None,
        "stateHash": _opt(s.state_hash),
    }


def task_to_json(t: tk.Task, progress: dict[str, Any] | None = None) -> dict[str, Any]:
    r = t.result
    d = t.dispute
    return {
        "id": to_hex(t.id),
        "requester": to_hex(t.requester),
        "recipe": t.recipe,
        "params": t.params.decode("utf-8", "replace"),
        "inputs": [
            {"kind": tk.InputKind(i.kind).name.lower(), "ref": to_hex(i.ref)} for i in t.inputs
        ],
        "limits": {
            "deviceMemory": t.limits.device_memory,
            "wallSeconds": t.limits.wall_seconds,
            "steps": t.limits.steps,
        },
        "deadline": t.deadline,
        "maxPrice": str(t.max_price),
        "verifierFee": str(t.verifier_fee),
        "verifiers": t.verifiers,
        "minReputation": t.min_reputation,
        "platformClass": t.platform_class,
        "steps": t.steps,
        "checkpointSteps": list(t.checkpoint_steps),
        "devices": t.devices,
        "submitHeight": t.submit_height,
        "claimHeight": t.claim_height or None,  # the current claim's block; null: unclaimed
        "resultHeight": None if r is None else r.height,
        "state": tk.TaskState(t.state).name.lower(),
        "outcome": tk.Outcome(t.outcome).name.lower(),
        "escrow": str(t.escrow),
        "provider": _opt(t.provider),
        "price": str(t.price),
        "bond": str(t.bond),
        "result": None
        if r is None
        else {
            "output": to_hex(r.output),
            "metrics": {m.name: m.value / 1_000_000 for m in r.metrics},
            "checkpoints": [
                {"cid": to_hex(c.cid), "stateHash": to_hex(c.state_hash)} for c in r.checkpoints
            ],
            "finalLink": to_hex(r.final_link),
            "deviceSeconds": r.device_seconds,
            "price": str(r.price),
            "height": r.height,
            "failReason": None if not r.fail_reason else tk.FailReason(r.fail_reason).name.lower(),
        },
        "segment": t.segment,
        "verifierSlots": [_slot(s) for s in t.verifier_slots],
        "commitEnd": t.commit_end,
        "revealEnd": t.reveal_end,
        "windowEnd": t.window_end,
        "dispute": None
        if d is None
        else {
            "challenger": to_hex(d.challenger),
            "segment": d.segment,
            "low": d.low,
            "high": d.high,
            "round": d.round,
            "referee": _slot(d.referee),
        },
        "endHeight": t.end_height,
        "inputAllowance": str(t.input_allowance),
        "inputBuys": [
            {"address": to_hex(b.address), "purchases": [to_hex(x) for x in b.purchases]}
            for b in t.input_buys
        ],
        "progress": progress,
    }


def provider_to_json(p: tk.ComputeProvider) -> dict[str, Any]:
    return {
        "address": to_hex(p.address),
        "deviceKind": p.device_kind,
        "deviceName": p.device_name,
        "devices": p.devices,
        "memoryBytes": p.memory_bytes,
        "computeCapability": p.compute_capability,
        "cpuCores": p.cpu_cores,
        "platformClass": p.platform_class,
        "pricePerDeviceSecond": str(p.price_per_device_second),
        "maxConcurrent": p.max_concurrent,
        "activeTasks": p.active_tasks,
        "settledOk": p.settled_ok,
        "slashed": p.slashed,
        "reputation": tk.reputation(p),
        "height": p.height,
    }


def _agent_or_none(ctx: Context) -> ComputeAgent | None:
    agent = getattr(ctx.node, "compute_agent", None)
    return agent if isinstance(agent, ComputeAgent) else None


def ns_get_task(ctx: Context, params: Any) -> dict[str, Any] | None:
    p = Params(params, ("taskId",))
    tid = parse_hash(p[0], "taskId")
    t = tk.get_task(ViewState(ctx.node.read_view()), tid)
    if t is None:
        return None
    agent = _agent_or_none(ctx)
    return task_to_json(t, None if agent is None else agent.task_progress(tid))


def list_tasks(
    view: Any,
    *,
    requester: Address | None = None,
    provider: Address | None = None,
    state: str | None = None,
    cursor: Hash32 | None = None,
    limit: int = DEFAULT_LIST_LIMIT,
    max_scan: int = MAX_LIST_SCAN,
) -> tuple[list[tk.Task], Hash32 | None]:
    """Tasks after ``cursor`` (id order) matching the filters, at most ``limit``, reading at
    most ``max_scan`` entries; and the cursor to go on from (None at the end)."""
    iterate = getattr(view, "iter_state", None)
    if iterate is None:
        raise ComputeAgentDisabled("this node's read view cannot list state (no iter_state)")
    prefix = tk.task_key(b"")
    after = None if cursor is None else tk.task_key(cursor)
    found: list[tk.Task] = []
    last: Hash32 | None = None
    for scanned, (_key, value) in enumerate(iterate(prefix, after=after), 1):
        t = tk.Task.decode(value)
        last = t.id
        if (
            (requester is None or t.requester == requester)
            and (provider is None or t.provider == provider)
            and (state is None or tk.TaskState(t.state).name.lower() == state)
        ):
            found.append(t)
            if len(found) == limit:
                return found, t.id
        if scanned >= max_scan:
            return found, last
    return found, None


def ns_list_tasks(ctx: Context, params: Any) -> dict[str, Any]:
    """``{requester?, provider?, state?, cursor?, limit?}`` -> ``{tasks, cursor}``."""
    p = Params(params, ("filter",), required=0)
    raw = p.get(0, {})
    if not isinstance(raw, dict):
        raise bad_param(
            "filter", "expected an object {requester?, provider?, state?, cursor?, limit?}"
        )
    unknown = set(raw) - {"requester", "provider", "state", "cursor", "limit"}
    if unknown:
        raise bad_param("filter", f"unknown field {sorted(unknown)[0]!r}")
    requester = parse_address(raw["requester"], "filter.requester") if "requester" in raw else None
    provider = parse_address(raw["provider"], "filter.provider") if "provider" in raw else None
    state = None
    if "state" in raw:
        state = parse_str(
            raw["state"], "filter.state", choices=[s.name.lower() for s in tk.TaskState]
        )
    cursor = parse_hash(raw["cursor"], "filter.cursor") if "cursor" in raw else None
    limit = parse_quantity(raw.get("limit", DEFAULT_LIST_LIMIT), "filter.limit")
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise bad_param("filter.limit", f"expected 1..{MAX_LIST_LIMIT}")
    found, next_cursor = list_tasks(
        ctx.node.read_view(),
        requester=requester,
        provider=provider,
        state=state,
        cursor=cursor,
        limit=limit,
    )
    return {
        "tasks": [task_to_json(t) for t in found],
        "cursor": None if next_cursor is None else to_hex(next_cursor),
    }


def list_providers(
    view: Any,
    *,
    platform_class: str | None = None,
    cursor: Address | None = None,
    limit: int = DEFAULT_LIST_LIMIT,
) -> tuple[list[tk.ComputeProvider], Address | None]:
    """Providers after ``cursor`` (address order), of ``platform_class`` when given, at most
    ``limit``, reading at most ``limit`` provider records (and, with a class, its list); and the
    cursor to go on from (None at the end)."""
    state = ViewState(view)
    if platform_class is not None:
        listed = sorted(bytes(a) for a in tk.class_providers(state, platform_class))
        after = [a for a in listed if cursor is None or a > bytes(cursor)]
        found: list[tk.ComputeProvider] = []
        for a in after[:limit]:
            record = tk.get_provider(state, Address(a))
            if record is not None:
                found.append(record)
        more = len(after) > limit
        return found, Address(after[limit - 1]) if more else None
    iterate = getattr(view, "iter_state", None)
    if iterate is None:
        raise ComputeAgentDisabled("this node's read view cannot list state (no iter_state)")
    prefix = tk.provider_key(Address(b""))
    start = None if cursor is None else tk.provider_key(cursor)
    records: list[tk.ComputeProvider] = []
    for _key, value in iterate(prefix, after=start):
        records.append(tk.ComputeProvider.decode(value))
        if len(records) == limit:
            return records, records[-1].address
    return records, None


def ns_list_providers(ctx: Context, params: Any) -> dict[str, Any]:
    """``{platformClass?, cursor?, limit?}`` -> ``{providers, cursor}``."""
    p = Params(params, ("filter",), required=0)
    raw = p.get(0, {})
    if not isinstance(raw, dict):
        raise bad_param("filter", "expected an object {platformClass?, cursor?, limit?}")
    unknown = set(raw) - {"platformClass", "cursor", "limit"}
    if unknown:
        raise bad_param("filter", f"unknown field {sorted(unknown)[0]!r}")
    platform_class = None
    if "platformClass" in raw:
        platform_class = parse_str(raw["platformClass"], "filter.platformClass")
        if not 0 < len(platform_class.encode()) <= tk.MAX_CLASS_BYTES:
            raise bad_param("filter.platformClass", f"expected 1..{tk.MAX_CLASS_BYTES} bytes")
    cursor = parse_address(raw["cursor"], "filter.cursor") if "cursor" in raw else None
    limit = parse_quantity(raw.get("limit", DEFAULT_LIST_LIMIT), "filter.limit")
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise bad_param("filter.limit", f"expected 1..{MAX_LIST_LIMIT}")
    found, next_cursor = list_providers(
        ctx.node.read_view(), platform_class=platform_class, cursor=cursor, limit=limit
    )
    return {
        "providers": [provider_to_json(r) for r in found],
        "cursor": None if next_cursor is None else to_hex(next_cursor),
    }


def ns_get_provider(ctx: Context, params: Any) -> dict[str, Any] | None:
    p = Params(params, ("provider",))
    who = parse_address(p[0], "provider")
    rec = tk.get_provider(ViewState(ctx.node.read_view()), who)
    return None if rec is None else provider_to_json(rec)


def _agent(ctx: Context) -> ComputeAgent:
    agent = _agent_or_none(ctx)
    if agent is None:
        raise ComputeAgentDisabled(
            "this node runs no compute agent (neuroseed run --provide-compute, with an operator "
            "account)"
        )
    return agent


async def ns_compute_status(ctx: Context, params: Any) -> dict[str, Any]:
    agent = _agent(ctx)

    async def info() -> dict[str, Any]:
        return agent.status()

    status = await ctx.bridge.call(info)
    rec = agent.provider_record()
    status["provider"] = None if rec is None else provider_to_json(rec)
    return status


async def ns_compute_offer(ctx: Context, params: Any) -> dict[str, Any]:
    """``{pricePerDeviceSecond?, maxConcurrent?}`` -> ``{txId}``: send this node's offer. The
    price is an amount of base units per device-second (a decimal string, a 0x quantity or a
    JSON integer, as ``parse_amount`` reads every amount); absent, the node's setting."""
    p = Params(params, ("offer",), required=0)
    raw = p.get(0, {})
    if not isinstance(raw, dict):
        raise bad_param("offer", "expected an object {pricePerDeviceSecond?, maxConcurrent?}")
    unknown = set(raw) - {"pricePerDeviceSecond", "maxConcurrent"}
    if unknown:
        raise bad_param("offer", f"unknown field {sorted(unknown)[0]!r}")
    price = (  # an amount in base units, like every other amount of the API
        parse_amount(raw["pricePerDeviceSecond"], "offer.pricePerDeviceSecond")
        if "pricePerDeviceSecond" in raw
        else None
    )
    slots = (
        parse_quantity(raw["maxConcurrent"], "offer.maxConcurrent")
        if "maxConcurrent" in raw
        else None
    )
    agent = _agent(ctx)
    tx_id = await ctx.bridge.call(agent.offer, price, slots)
    return {"txId": to_hex(tx_id)}


def register(table: MethodTable) -> None:
    table.add("ns_getTask", ns_get_task)
    table.add("ns_listTasks", ns_list_tasks)
    table.add("ns_getProvider", ns_get_provider)
    table.add("ns_listProviders", ns_list_providers)
    table.add("ns_computeStatus", ns_compute_status, local_only=True)
    table.add("ns_computeOffer", ns_compute_offer, local_only=True)
