"""``neuroseed task …`` and ``neuroseed compute …``: the compute market from the command line
(DESIGN §10; docs/compute-market.md).

* ``task submit --recipe R --params FILE.json --max-price NSD [--inputs ID …] …`` — canonicalise
  the parameters (``recipes.canonical_params``), check them against the recipe's schema here
  first (the chain checks them again), resolve the inputs (dataset / model ids, CIDs; the ids
  the parameters name are added) and send a ``TaskSubmit`` (the escrow shown is what the chain
  locks, input allowance included; ``--platform`` defaults to the class of the providers on
  chain when they share one; a training task without ``checkpoint_every`` gets
  ``with_default_checkpoints``); prints the task id;
* ``task list [--mine] [--state S]``, ``task show ID`` — the chain's tasks (``ns_listTasks``,
  ``ns_getTask``);
* ``task watch ID`` — a progress bar on stderr until the task has ended (the node's own progress
  when it runs the task, else the chain's stages), then the outcome and who was paid what;
* ``task cancel ID`` — ``TaskCancel`` (the requester, while unclaimed);
* ``compute offer [--price-per-device-second NSD] [--max-concurrent N]`` — make the local node's
  compute agent send its ``ProviderRegister`` (``ns_computeOffer``);
* ``compute status`` — the local agent's settings, offer on chain and tasks;
* ``compute providers [--platform CLASS] [--limit N]`` — the providers registered on chain
  (``ns_listProviders``): class, address, device, price, reputation and load.

Registered by ``node.cli.build_parser`` through ``register(commands)``; the shared plumbing
(client, sender key, ``_sign_send_wait``, output, errors) is ``node.cli``'s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node import cli as _cli
from node.cli_storage import format_size, parse_size
from node.compute import recipes
from node.economy import tasks as tk
from node.economy.api import DEFAULT_ECONOMY_PARAMS, ECONOMY_PARAMS_KEY, EconomyParams
from node.errors import DecodeError
from node.storage.unixfs import parse_cid
from node.types import UINT64_MAX, Address, Amount, Hash32

POLL_INTERVAL_S = 0.5
DEFAULT_WATCH_TIMEOUT = 3600.0
DEFAULT_DEADLINE_HEIGHTS = 200
DEFAULT_WALL_SECONDS = 3600
DEFAULT_MEMORY = "1GiB"
OFFER_TIMEOUT_S = 120.0  # the RPC timeout of ns_computeOffer (see cmd_compute_offer)
DEFAULT_CHECKPOINTS = 32
"""A training task whose parameters name no ``checkpoint_every`` gets
``ceil(steps / DEFAULT_CHECKPOINTS)``, i.e. at most 32 checkpoints (the chain allows 64). A
verifier re-runs one segment, 1/k of the training, plus a fixed cost of its own (worker start-up,
torch import, data and checkpoint load: ~2.9 s of CPU on the reference machine): with one
verifier that is 0.08 of the provider's compute for a task of ~65 s of training (measured),
under the issue's 0.1, where 16 checkpoints give ~0.10; each checkpoint costs the provider a
write and a hash of its state (12 bytes a parameter with Adam, 250–400 MB/s here: 4 ms for 85k
parameters), so very large models may want fewer (docs/benchmarks.md, "Compute market")."""
STATES = tuple(s.name.lower() for s in tk.TaskState)
_STAGES = {
    "open": "waiting for a provider",
    "claimed": "running on the provider",
    "drawing": "result posted; drawing verifiers",
    "verifying": "verifiers re-running a segment",
    "challenge": "challenge window",
    "dispute": "dispute: bisecting",
    "referee_draw": "dispute: drawing the referee",
    "referee": "dispute: the referee re-runs one step",
    "ended": "ended",
}


# --- parsing helpers -----------------------------------------------------------------------------


def _task_id_arg(text: str) -> str:
    s = text.strip()
    body = s[2:] if s[:2] in ("0x", "0X") else s
    try:
        raw = bytes.fromhex(body)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise _cli.CliError(f"expected a task id (0x + 64 hex digits), not {text!r}")
    return "0x" + raw.hex()


def _load_params(path: str) -> dict[str, Any]:
    """The parameter file as a JSON object (duplicate keys and NaN refused)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise _cli.CliError(f"--params: the key {k!r} appears twice in {path}")
            out[k] = v
        return out

    def constant(name: str) -> Any:
        raise _cli.CliError(f"--params: {name} is not a number (in {path})")

    file = Path(path).expanduser()
    if file.stat().st_size > 4 * recipes.MAX_PARAMS_BYTES:
        raise _cli.CliError(f"--params: {path} is larger than a task's parameters may be")
    try:
        tree = json.loads(
            file.read_text(encoding="utf-8"), object_pairs_hook=pairs, parse_constant=constant
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _cli.CliError(f"--params: {path} is not JSON: {exc}") from None
    if not isinstance(tree, dict):
        raise _cli.CliError(f"--params: {path} must hold a JSON object")
    return tree


def with_default_checkpoints(recipe: str, tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with ``checkpoint_every = ceil(steps / DEFAULT_CHECKPOINTS)`` added when a
    training recipe's parameters name none (a missing or bad ``steps`` is left to the schema
    check, which names it)."""
    if recipe not in recipes.TRAINING_RECIPES or "checkpoint_every" in tree:
        return tree
    steps = tree.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        return tree
    return {**tree, "checkpoint_every": -(-steps // DEFAULT_CHECKPOINTS)}


_ID_FIELDS = ("dataset", "val_dataset", "model", "base")  # one id each
_ID_LIST_FIELDS = ("parents", "datasets")  # lists of ids


def _plain_id(value: Any) -> Any:
    """An id as the schema wants it (lowercase hex, no ``0x``): the CLI prints ids with the
    prefix, so a parameters file may hold them either way."""
    if isinstance(value, str) and value[:2] in ("0x", "0X"):
        return value[2:].lower()
    return value


def normalize_ids(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with its dataset and model ids written as the schema wants them."""
    out = dict(tree)
    for name in _ID_FIELDS:
        if name in out:
            out[name] = _plain_id(out[name])
    for name in _ID_LIST_FIELDS:
        if isinstance(out.get(name), list):
            out[name] = [_plain_id(v) for v in out[name]]
    return out


def canonical_task_params(recipe: str, tree: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """The canonical parameter bytes and their parsed, checked form (``CliError`` naming the
    field on the first schema rule broken). Ids may be written with ``0x``, as the CLI prints
    them."""
    try:
        raw = recipes.canonical_params(normalize_ids(tree))
        parsed = recipes.validate_task_params(recipe, raw)
    except recipes.UnknownRecipe as exc:
        raise _cli.CliError(f"--recipe: {exc.message}") from None
    except recipes.InvalidTaskParams as exc:
        where = f" (field {exc.field!r})" if exc.field else ""
        raise _cli.CliError(f"--params: {exc.message}{where}") from None
    return raw, parsed


def _named_ids(recipe: str, p: dict[str, Any]) -> list[tuple[int, bytes]]:
    """The (kind, id) inputs the parameters name (the chain wants each among the inputs)."""
    out: list[tuple[int, bytes]] = []
    for name in ("dataset", "val_dataset"):
        if isinstance(p.get(name), str):
            out.append((int(tk.InputKind.DATASET), bytes.fromhex(p[name])))
    if recipe == "merge":
        for d in p.get("datasets") or []:
            out.append((int(tk.InputKind.DATASET), bytes.fromhex(d)))
        for m in [*(p.get("parents") or []), p.get("base")]:
            if isinstance(m, str):
                out.append((int(tk.InputKind.MODEL), bytes.fromhex(m)))
    elif isinstance(p.get("model"), str):
        out.append((int(tk.InputKind.MODEL), bytes.fromhex(p["model"])))
    return out


def resolve_input(client: Any, text: str) -> tuple[int, bytes]:
    """``dataset:ID``, ``model:ID``, ``cid:CID``, a bare 32-byte id (looked up: dataset, then
    model) or a bare CID."""
    s = text.strip()
    kind_name, _, ref = s.partition(":") if ":" in s else ("", "", s)
    kind_name = kind_name.lower()
    if kind_name not in ("", "dataset", "model", "cid"):
        raise _cli.CliError(f"--inputs: unknown kind {kind_name!r} in {text!r} (dataset|model|cid)")
    if kind_name == "cid" or (kind_name == "" and not ref.lower().startswith("0x")):
        try:
            cid = parse_cid(ref)
        except Exception:
            raise _cli.CliError(f"--inputs: {text!r} is neither an id (0x…) nor a CID") from None
        return int(tk.InputKind.CID), bytes(cid)
    try:
        raw = bytes.fromhex(ref[2:] if ref[:2] in ("0x", "0X") else ref)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise _cli.CliError(f"--inputs: {text!r} is not a 32-byte id (0x + 64 hex digits)")
    if kind_name in ("", "dataset") and client.get_dataset(raw) is not None:
        return int(tk.InputKind.DATASET), raw
    if kind_name in ("", "model") and client.get_model(raw) is not None:
        return int(tk.InputKind.MODEL), raw
    what = kind_name or "dataset or model"
    raise _cli.CliError(f"--inputs: no {what} 0x{raw.hex()} on chain")


def _economy(client: Any) -> EconomyParams:
    raw = _cli._state_value(client, ECONOMY_PARAMS_KEY)
    if raw is None:
        return DEFAULT_ECONOMY_PARAMS
    try:
        return EconomyParams.decode(raw)
    except DecodeError:
        return DEFAULT_ECONOMY_PARAMS


# --- task submit / cancel ------------------------------------------------------------------------


@dataclass(frozen=True)
class SubmitOptions:
    """The market terms of a submission (``task submit``, ``model merge --remote``), checked
    before the node is asked anything or a key unlocked."""

    max_price: Amount
    verifier_fee: Amount
    verifiers: int
    memory: int
    wall_seconds: int
    deadline: int  # heights from the head
    min_reputation: int


def submit_options(args: argparse.Namespace) -> SubmitOptions:
    """``--max-price``, ``--verifier-fee`` (default 1 % of the maximum price), ``--verifiers``,
    ``--memory``, ``--wall-seconds``, ``--deadline``, ``--min-reputation`` (0 when the command
    has none)."""
    if args.max_price is None:
        raise _cli.CliError("--max-price: the most the provider is paid (NSD) is required")
    max_price = _cli.parse_nsd(args.max_price, what="--max-price")
    if not 1 <= args.verifiers <= tk.MAX_VERIFIERS:
        raise _cli.CliError(f"--verifiers: expected 1 to {tk.MAX_VERIFIERS}")
    verifier_fee = (
        _cli.parse_nsd(args.verifier_fee, what="--verifier-fee", allow_zero=True)
        if args.verifier_fee is not None
        else Amount(max_price // 100)
    )
    memory = parse_size(args.memory, what="--memory")
    if not 0 < args.wall_seconds <= UINT64_MAX:
        raise _cli.CliError("--wall-seconds: expected a positive number of seconds")
    if args.deadline <= 0:
        raise _cli.CliError("--deadline: expected a positive number of heights")
    min_reputation = getattr(args, "min_reputation", 0)
    if min_reputation < 0:
        raise _cli.CliError("--min-reputation: expected 0 or more")
    return SubmitOptions(
        max_price=max_price,
        verifier_fee=verifier_fee,
        verifiers=args.verifiers,
        memory=memory,
        wall_seconds=args.wall_seconds,
        deadline=args.deadline,
        min_reputation=min_reputation,
    )


def build_submit(
    client: Any,
    recipe: str,
    raw: bytes,
    parsed: dict[str, Any],
    opts: SubmitOptions,
    platform: str,
    inputs: list[tuple[int, bytes]],
    limit_steps: int,
) -> tuple[tk.TaskSubmit, int]:
    """The ``TaskSubmit`` (the ids the parameters name added to ``inputs``; the deadline from
    the head) and the escrow it locks."""
    inputs = list(inputs)
    for item in _named_ids(recipe, parsed):
        if item not in inputs:
            inputs.append(item)
    if len(inputs) > tk.MAX_TASK_INPUTS:
        raise _cli.CliError(f"--inputs: at most {tk.MAX_TASK_INPUTS} inputs")
    head = client.block_number()
    economy = _economy(client)
    body = tk.TaskSubmit(
        recipe=recipe,
        params=raw,
        inputs=tuple(tk.TaskInput(k, r) for k, r in inputs),
        limits=tk.TaskLimits(opts.memory, opts.wall_seconds, limit_steps),
        deadline=head + opts.deadline,
        max_price=opts.max_price,
        verifier_fee=opts.verifier_fee,
        verifiers=opts.verifiers,
        min_reputation=opts.min_reputation,
        platform_class=platform,
    )
    try:
        tk.check_submit_body(body)
    except tk.InvalidTaskBody as exc:
        raise _cli.CliError(exc.message) from None
    return body, tk.escrow_for(economy, body, input_allowance(client, body.inputs))


def input_allowance(client: Any, inputs: tuple[tk.TaskInput, ...]) -> int:
    """``tasks.input_allowance`` over RPC: the prices of the priced dataset inputs
    (``ns_getDataset``), summed as the chain sums them (what one party pays to read the data)."""
    prices: dict[bytes, int] = {}
    total = 0
    for item in inputs:
        if item.kind != tk.InputKind.DATASET:
            continue
        ref = bytes(item.ref)
        if ref not in prices:
            ds = client.get_dataset(ref)
            prices[ref] = 0 if ds is None else int(str(ds.get("price") or 0))
        total += prices[ref]
    return total


def send_submit(
    args: argparse.Namespace, body: tk.TaskSubmit, escrow: int, steps: int
) -> tuple[int, str]:
    """Sign and send ``body`` (``_sign_send_wait``: printed, waited for unless ``--no-wait``);
    the exit code and the task id."""
    made: list[str] = []

    def on_nonce(sender: Address, nonce: int) -> list[tuple[str, str, object, object]]:
        tid = "0x" + tk.task_id(sender, nonce).hex()
        made.append(tid)
        return [("taskId", tid, "task id", tid)]

    platform = body.platform_class
    fields: list[tuple[str, str, object, object]] = [
        ("recipe", body.recipe, "recipe", body.recipe),
        ("steps", str(steps), "steps", steps),
    ]
    if body.recipe in recipes.TRAINING_RECIPES:
        count = recipes.checkpoint_count(body.recipe, body.params)
        fields.append(("checkpoints", str(count), "checkpoints", count))
    fields += [
        ("platformClass", platform, "platform class", platform),
        ("deadline", str(body.deadline), "deadline", f"height {body.deadline}"),
        ("escrow", str(escrow), "escrow", f"{_cli.format_nsd(escrow)} NSD"),
    ]
    code = _cli._sign_send_wait(args, body, fields, spend=escrow, on_nonce=on_nonce)
    return code, made[-1]


def cmd_task_submit(args: argparse.Namespace) -> int:
    # Everything local is checked before the node is asked anything or a key unlocked.
    tree = with_default_checkpoints(args.recipe, _load_params(args.params))
    raw, parsed = canonical_task_params(args.recipe, tree)
    opts = submit_options(args)
    steps = recipes.task_steps(args.recipe, parsed)
    limit_steps = steps if args.steps is None else args.steps
    if not 0 <= limit_steps <= UINT64_MAX or limit_steps < steps:
        raise _cli.CliError(
            f"--steps: the {args.recipe} recipe runs {steps} steps; allow that many"
        )
    _cli._fee_option(args)
    with _cli._client(args) as client:
        platform = args.platform
        if platform is None:
            platform = default_platform(client)
        inputs: list[tuple[int, bytes]] = [resolve_input(client, t) for t in args.inputs or []]
        body, escrow = build_submit(
            client, args.recipe, raw, parsed, opts, platform, inputs, limit_steps
        )
    return send_submit(args, body, escrow, steps)[0]


def cmd_task_cancel(args: argparse.Namespace) -> int:
    tid = _task_id_arg(args.task_id)
    _cli._fee_option(args)
    with _cli._client(args) as client:
        task = client.get_task(tid)
    if task is None:
        raise _cli.CliError(f"no task {tid} on chain")
    if task["state"] != "open":
        raise _cli.CliError(
            f"task {tid} is {task['state']}: only an unclaimed task can be cancelled"
        )
    body = tk.TaskCancel(Hash32(bytes.fromhex(tid[2:])))
    fields: list[tuple[str, str, object, object]] = [
        ("taskId", tid, "task id", tid),
        ("refund", task["escrow"], "refund", f"{_cli.format_nsd(int(task['escrow']))} NSD"),
    ]
    return _cli._sign_send_wait(args, body, fields)


# --- task list / show ----------------------------------------------------------------------------


def _nsd(units: object) -> str:
    return "?" if units is None else f"{_cli.format_nsd(int(str(units)))} NSD"


def task_rows(t: dict[str, Any]) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = [
        ("task id", t["id"]),
        ("recipe", t["recipe"]),
        ("state", t["state"] + ("" if t["state"] != "ended" else f" ({t['outcome']})")),
        ("requester", t["requester"]),
        ("platform class", t["platformClass"]),
        ("steps", f"{t['steps']} (checkpoints at {t['checkpointSteps']})"),
        ("max price", _nsd(t["maxPrice"])),
        ("verifiers", f"{t['verifiers']} at {_nsd(t['verifierFee'])} each"),
        ("deadline", f"height {t['deadline']}"),
        ("escrow held", _nsd(t["escrow"])),
    ]
    if t.get("provider"):
        rows += [("provider", t["provider"]), ("price", _nsd(t["price"]))]
    r = t.get("result")
    if r is not None:
        rows += [
            ("output", r["output"] or "-"),
            ("checkpoints", len(r["checkpoints"])),
            ("device seconds", r["deviceSeconds"]),
        ]
        if r["metrics"]:
            rows.append(("metrics", ", ".join(f"{k}={v:g}" for k, v in r["metrics"].items())))
        if r.get("failReason"):
            rows.append(("failure", r["failReason"]))
    if t.get("dispute"):
        d = t["dispute"]
        rows.append(("dispute", f"steps {d['low']}..{d['high']}, round {d['round']}"))
    if t.get("endHeight"):
        rows.append(("ended at", f"height {t['endHeight']}"))
    prog = t.get("progress")
    if prog:
        rows.append(
            ("this node", f"{prog['role']}: {prog['stage']} {prog['done']}/{prog['total']}")
        )
    return rows


def cmd_task_show(args: argparse.Namespace) -> int:
    tid = _task_id_arg(args.task_id)
    with _cli._client(args) as client:
        task = client.get_task(tid)
    if task is None:
        raise _cli.CliError(f"no task {tid} on chain")
    if args.json:
        _cli._print_json(task)
    else:
        print(_cli._rows(task_rows(task)))
    return _cli.EXIT_OK


def cmd_task_list(args: argparse.Namespace) -> int:
    if args.state is not None and args.state not in STATES:
        raise _cli.CliError(f"--state: expected one of {', '.join(STATES)}")
    if not 1 <= args.limit <= 100:
        raise _cli.CliError("--limit: expected 1 to 100")
    filters: dict[str, Any] = {"limit": args.limit}
    if args.mine:
        filters["requester"] = _cli._hex(_cli._sender_address(args))
    elif args.requester:
        filters["requester"] = _cli._hex(_cli._address_arg(args.requester, "--requester"))
    if args.provider:
        filters["provider"] = _cli._hex(_cli._address_arg(args.provider, "--provider"))
    if args.state:
        filters["state"] = args.state
    if args.cursor:
        filters["cursor"] = _task_id_arg(args.cursor)
    with _cli._client(args) as client:
        page = client.list_tasks(**filters)
    if args.json:
        _cli._print_json(page)
        return _cli.EXIT_OK
    tasks = page["tasks"]
    if not tasks:
        print("no tasks")
    for t in tasks:
        state = t["state"] if t["state"] != "ended" else f"ended/{t['outcome']}"
        print(f"{t['id']}  {t['recipe']:<8} {state:<22} max {_nsd(t['maxPrice'])}")
    if page.get("cursor"):
        print(f"more: --cursor {page['cursor']}")
    return _cli.EXIT_OK


# --- task watch ----------------------------------------------------------------------------------


class _Bar:
    """One line on stderr, rewritten in place (only on a terminal, or when forced)."""

    def __init__(self, *, enabled: bool) -> None:
        self._enabled = enabled
        self._last = ""

    def update(self, frac: float, note: str) -> None:
        if not self._enabled:
            return
        width = 30
        frac = min(1.0, max(0.0, frac))
        filled = int(frac * width)
        line = f"\r[{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}% {note}"
        if line != self._last:
            print(line.ljust(len(self._last)), end="", file=sys.stderr, flush=True)
            self._last = line

    def close(self) -> None:
        if self._enabled and self._last:
            print(file=sys.stderr, flush=True)


_ORDER = ("open", "claimed", "drawing", "verifying", "challenge", "dispute", "referee_draw",
          "referee", "ended")  # fmt: skip


def watch_progress(t: dict[str, Any]) -> tuple[float, str]:
    """A fraction and a note for a task: the node's own progress while it runs the task, else
    how far along the chain's stages it is."""
    state = t["state"]
    prog = t.get("progress")
    if state == "claimed" and prog and prog.get("total"):
        frac = 0.1 + 0.5 * prog["done"] / prog["total"]
        return frac, f"{prog['stage']} step {prog['done']}/{prog['total']}"
    if state == "claimed" and prog:
        return 0.1, str(prog["stage"])
    stage = _ORDER.index(state) if state in _ORDER else 0
    return stage / (len(_ORDER) - 1), _STAGES.get(state, state)


def task_payments(t: dict[str, Any], royalty_percent: int) -> dict[str, Any]:
    """Who an ended task paid what (base units, decimal strings), from its record: the provider,
    each verifier paid, the input owners' royalties and what the requester spent in all."""
    outcome = t["outcome"]
    r = t.get("result")
    verifiers: dict[str, int] = {}
    provider = royalty = 0
    if outcome in ("paid", "partial", "provider_slashed") and r is not None:
        claimed = r["checkpoints"][t["segment"]]["stateHash"] if r["checkpoints"] else None
        agree = outcome != "provider_slashed"
        for slot in t["verifierSlots"]:
            if slot and slot["stateHash"] is not None and (slot["stateHash"] == claimed) == agree:
                verifiers[slot["address"]] = verifiers.get(slot["address"], 0) + int(
                    t["verifierFee"]
                )
    if outcome in ("paid", "partial") and r is not None:
        provider = int(r["price"])
        if r.get("failReason"):
            n = len(r["checkpoints"])
            proven = t["checkpointSteps"][n - 1] if n else 0
            provider = provider * proven // t["steps"] if t["steps"] else 0
        if any(i["kind"] in ("dataset", "model") for i in t["inputs"]):
            royalty = provider * royalty_percent // 100
    spent = provider + royalty + sum(verifiers.values())
    return {
        "outcome": outcome,
        "provider": t.get("provider"),
        "providerPaid": str(provider),
        "verifiersPaid": {a: str(v) for a, v in verifiers.items()},
        "royalties": str(royalty),
        "requesterSpent": str(spent),
    }


def follow_task(client: Any, tid: str, timeout: float, bar: _Bar) -> dict[str, Any]:
    """Poll ``tid`` until it has ended (``CliError`` after ``timeout`` seconds: the task goes
    on), drawing ``bar``; the ended task."""
    deadline = time.monotonic() + timeout
    try:
        task = client.get_task(tid)
        if task is None:
            raise _cli.CliError(f"no task {tid} on chain")
        while task["state"] != "ended":
            if time.monotonic() > deadline:
                raise _cli.CliError(
                    f"task {tid} is still {task['state']} after {timeout:g} s "
                    "(it goes on; watch it again later)"
                )
            bar.update(*watch_progress(task))
            time.sleep(POLL_INTERVAL_S)
            task = client.get_task(tid)
            if task is None:
                raise _cli.CliError(f"task {tid} is gone from the chain")
        bar.update(1.0, f"ended: {task['outcome']}")
    finally:
        bar.close()
    ended: dict[str, Any] = task
    return ended


def ended_rows(task: dict[str, Any], payments: dict[str, Any]) -> list[tuple[str, object]]:
    """``task_rows`` and who was paid what (``task_payments``)."""
    rows = task_rows(task)
    rows.append(("provider paid", _nsd(payments["providerPaid"])))
    for address, amount in payments["verifiersPaid"].items():
        rows.append(("verifier paid", f"{address} {_nsd(amount)}"))
    rows.append(("royalties", _nsd(payments["royalties"])))
    rows.append(("requester spent", _nsd(payments["requesterSpent"])))
    return rows


def cmd_task_watch(args: argparse.Namespace) -> int:
    tid = _task_id_arg(args.task_id)
    if args.timeout <= 0:
        raise _cli.CliError("--timeout: expected a positive number of seconds")
    bar = _Bar(enabled=not args.json and (args.progress or sys.stderr.isatty()))
    with _cli._client(args) as client:
        task = follow_task(client, tid, args.timeout, bar)
        payments = task_payments(task, _economy(client).royalty_percent)
    if args.json:
        _cli._print_json({"task": task, "payments": payments})
    else:
        print(_cli._rows(ended_rows(task, payments)))
    return _cli.EXIT_OK


# --- providers ----------------------------------------------------------------------------------

DEFAULT_PLATFORM_PAGES = 5  # pages of 100 providers read to find the default platform class


def list_providers(
    client: Any,
    *,
    platform: str | None = None,
    cursor: str | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """One page of ``ns_listProviders``: ``{"providers": [...], "cursor": address | None}``."""
    filters: dict[str, Any] = {}
    if platform is not None:
        filters["platformClass"] = platform
    if cursor is not None:
        filters["cursor"] = cursor
    if limit is not None:
        filters["limit"] = limit
    page: dict[str, Any] = dict(client.call("ns_listProviders", [filters]))
    return page


def default_platform(
    client: Any, *, what: str = "task", pages: int = DEFAULT_PLATFORM_PAGES
) -> str:
    """The default of ``--platform``: the platform class of the providers registered on chain
    when they all share one (``ns_listProviders``, at most ``pages`` pages of 100 read); else a
    ``CliError`` listing the classes and asking for ``--platform``."""
    classes: set[str] = set()
    cursor = None
    for _ in range(pages):
        page = list_providers(client, cursor=cursor, limit=100)
        classes.update(str(p["platformClass"]) for p in page["providers"])
        cursor = page.get("cursor")
        if cursor is None:
            break
    if len(classes) == 1 and cursor is None:
        return classes.pop()
    if not classes:
        found = "no compute provider is registered on chain"
    elif len(classes) == 1:
        found = f"the first {pages * 100} providers run {classes.pop()}; there are more"
    else:
        found = f"the registered providers run {', '.join(sorted(classes))}"
    raise _cli.CliError(
        f"--platform: name the platform class the {what} must run on ({found}; see "
        "`neuroseed compute providers`)"
    )


def _device(p: dict[str, Any]) -> str:
    if p["deviceKind"] == "cuda":
        return (
            f"{p['devices']}x {p['deviceName']} (sm {p['computeCapability']}, "
            f"{format_size(p['memoryBytes'])})"
        )
    return f"{p['deviceName']} ({p['cpuCores']} cores, {format_size(p['memoryBytes'])})"


def provider_row(p: dict[str, Any]) -> tuple[str, str, str, str, str, str]:
    """A provider as the columns of ``compute providers``: class, address, device, price per
    device-second, reputation (tasks ok / slashed), load (active / most at once)."""
    return (
        str(p["platformClass"]),
        str(p["address"]),
        _device(p),
        _nsd(p["pricePerDeviceSecond"]),
        f"{p['reputation']} ({p['settledOk']} ok, {p['slashed']} slashed)",
        f"{p['activeTasks']}/{p['maxConcurrent']}",
    )


_PROVIDER_COLUMNS = ("CLASS", "ADDRESS", "DEVICE", "PRICE/DEVICE-S", "REPUTATION", "LOAD")


def cmd_compute_providers(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 100:
        raise _cli.CliError("--limit: expected 1 to 100")
    platform = args.platform
    if platform is not None and not 0 < len(platform.encode()) <= tk.MAX_CLASS_BYTES:
        raise _cli.CliError(f"--platform: expected 1 to {tk.MAX_CLASS_BYTES} characters")
    cursor = None if args.cursor is None else _cli._hex(_cli._address_arg(args.cursor, "--cursor"))
    with _cli._client(args) as client:
        page = list_providers(client, platform=platform, cursor=cursor, limit=args.limit)
    if args.json:
        _cli._print_json(page)
        return _cli.EXIT_OK
    rows = [provider_row(p) for p in page["providers"]]
    if not rows:
        print("no providers" + ("" if platform is None else f" of class {platform}"))
    else:
        table = [_PROVIDER_COLUMNS, *rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(_PROVIDER_COLUMNS) - 1)]
        for r in table:
            print("  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]))
    if page.get("cursor"):
        print(f"more: --cursor {page['cursor']}")
    return _cli.EXIT_OK


# --- compute offer / status ----------------------------------------------------------------------


def cmd_compute_offer(args: argparse.Namespace) -> int:
    price = (
        None
        if args.price_per_device_second is None
        else _cli.parse_nsd(args.price_per_device_second, what="--price-per-device-second")
    )
    if price is not None and price > UINT64_MAX:
        raise _cli.CliError("--price-per-device-second: too large (at most 2^64-1 base units)")
    if args.max_concurrent is not None and not 0 < args.max_concurrent <= UINT64_MAX:
        raise _cli.CliError("--max-concurrent: expected a positive number of tasks")
    from rpc.client import Client

    # The node's first offer probes its platform in a child process that imports torch:
    # seconds, longer than the client's default 10 s on a loaded machine.
    with Client(_cli._rpc_url(args), timeout=OFFER_TIMEOUT_S) as client:
        tx_id = client.compute_offer(
            price_per_device_second=price, max_concurrent=args.max_concurrent
        )
        receipt = None
        if not args.no_wait:
            if not args.json:
                print(f"ProviderRegister {_cli._hex(tx_id)} sent; waiting", file=sys.stderr)
            receipt = client.wait_for_receipt(tx_id, timeout=args.timeout)
        status = client.compute_status() if receipt is not None else None
    provider = None if status is None else status.get("provider")
    if args.json:
        _cli._print_json({"txId": _cli._hex(tx_id), "receipt": receipt, "provider": provider})
    else:
        rows: list[tuple[str, object]] = [("tx id", _cli._hex(tx_id))]
        if provider is not None:
            rows += [
                ("platform class", provider["platformClass"]),
                ("price", f"{_nsd(provider['pricePerDeviceSecond'])} per device-second"),
                ("max concurrent", provider["maxConcurrent"]),
            ]
        if receipt is not None:
            rows.append(("status", "final" if receipt.get("success") else "failed"))
        print(_cli._rows(rows))
    if receipt is not None and not receipt.get("success"):
        raise _cli.CliError(
            f"the ProviderRegister {_cli._hex(tx_id)} failed: {receipt.get('error') or 'no reason'}"
        )
    return _cli.EXIT_OK


def cmd_compute_status(args: argparse.Namespace) -> int:
    with _cli._client(args) as client:
        status = client.compute_status()
    if args.json:
        _cli._print_json(status)
        return _cli.EXIT_OK
    s = status["settings"]
    rows: list[tuple[str, object]] = [
        ("operator", status["address"]),
        ("platform class", status.get("platform_class") or "(not yet known)"),
        ("device", f"{s['device']} ({s['threads']} threads)"),
        (
            "limits",
            f"{format_size(s['memory_bytes'])}, {s['wall_seconds']} s, "
            f"{s['max_concurrent']} at once",
        ),
        ("provides", "yes" if s["provide"] else "no (verifies only)"),
        ("running", status["running"]),
        ("watched tasks", status["watched"]),
    ]
    p = status.get("provider")
    if p is None:
        rows.append(("offer", "none on chain (neuroseed compute offer)"))
    else:
        rows += [
            ("offer", f"{_nsd(p['pricePerDeviceSecond'])} per device-second"),
            ("reputation", f"{p['reputation']} ({p['settledOk']} ok, {p['slashed']} slashed)"),
            ("active tasks", f"{p['activeTasks']} of {p['maxConcurrent']}"),
        ]
    print(_cli._rows(rows))
    for tid, prog in status["tasks"].items():
        print(f"  {tid}  {prog['role']:<9} {prog['stage']:<10} {prog['done']}/{prog['total']}")
    return _cli.EXIT_OK


# --- registration --------------------------------------------------------------------------------


def register(commands: Any) -> None:
    """Add ``task …`` and ``compute …`` to the top-level subcommands of ``node.cli``."""
    task = commands.add_parser("task", help="compute-market tasks: submit, list, watch, cancel")
    _cli._add_global_options(task, top=False)
    sub = task.add_subparsers(dest="task_command", metavar="ACTION", required=True)

    def command(group: Any, name: str, handler: Any, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(name, help=help_, description=help_)
        _cli._add_global_options(p, top=False)
        p.set_defaults(handler=handler)
        return p

    p = command(sub, "submit", cmd_task_submit, "submit a paid compute task (prints its id)")
    p.add_argument("--recipe", required=True, choices=recipes.RECIPES, help="the recipe to run")
    p.add_argument(
        "--params", metavar="FILE", required=True, help="the recipe's parameters (a JSON file)"
    )
    p.add_argument(
        "--inputs",
        metavar="ID",
        nargs="+",
        help="input datasets / models (0x ids, or dataset:ID, model:ID, cid:CID); the ids the "
        "parameters name are added",
    )
    p.add_argument("--max-price", metavar="NSD", required=True, help="most the provider is paid")
    p.add_argument(
        "--verifier-fee", metavar="NSD", help="fee per verifier (default: 1%% of --max-price)"
    )
    p.add_argument("--verifiers", metavar="N", type=int, default=1, help="verifiers (default 1)")
    p.add_argument(
        "--deadline",
        metavar="H",
        type=int,
        default=DEFAULT_DEADLINE_HEIGHTS,
        help=f"heights from now by which the result must be in (default {DEFAULT_DEADLINE_HEIGHTS})",
    )
    p.add_argument(
        "--platform",
        metavar="CLASS",
        help="required platform class (default: the registered providers' when they share one)",
    )
    p.add_argument(
        "--min-reputation", metavar="R", type=int, default=0, help="least provider reputation"
    )
    p.add_argument(
        "--memory",
        metavar="SIZE",
        default=DEFAULT_MEMORY,
        help=f"device memory limit per device (default {DEFAULT_MEMORY})",
    )
    p.add_argument(
        "--wall-seconds",
        metavar="S",
        type=int,
        default=DEFAULT_WALL_SECONDS,
        help=f"wall-time limit (default {DEFAULT_WALL_SECONDS})",
    )
    p.add_argument("--steps", metavar="N", type=int, help="step limit (default: the recipe's)")
    _cli._add_sender_options(p)

    p = command(sub, "list", cmd_task_list, "list tasks on chain")
    p.add_argument("--mine", action="store_true", help="only the tasks the sender submitted")
    p.add_argument("--requester", metavar="ADDRESS", help="only this requester's tasks")
    p.add_argument("--provider", metavar="ADDRESS", help="only the tasks this provider claimed")
    p.add_argument(
        "--state", metavar="STATE", help=f"only tasks in this state ({', '.join(STATES)})"
    )
    p.add_argument("--cursor", metavar="ID", help="go on after this task id")
    p.add_argument("--limit", metavar="N", type=int, default=20, help="tasks per page (max 100)")
    sender = p.add_mutually_exclusive_group()
    sender.add_argument("--from", dest="sender", metavar="ADDRESS", help="who --mine means")
    sender.add_argument("--dev-key", metavar="N", type=int, help="DEVNET ONLY: --mine as dev key N")

    p = command(sub, "show", cmd_task_show, "show a task")
    p.add_argument("task_id", metavar="ID", help="a task id (0x…)")

    p = command(sub, "watch", cmd_task_watch, "follow a task until it has ended; print payments")
    p.add_argument("task_id", metavar="ID", help="a task id (0x…)")
    p.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        default=DEFAULT_WATCH_TIMEOUT,
        help=f"seconds to wait in all (default {DEFAULT_WATCH_TIMEOUT:g})",
    )
    p.add_argument(
        "--progress", action="store_true", help="draw the progress bar even when not a terminal"
    )

    p = command(sub, "cancel", cmd_task_cancel, "cancel your unclaimed task (escrow refunded)")
    p.add_argument("task_id", metavar="ID", help="a task id (0x…)")
    _cli._add_sender_options(p)

    compute = commands.add_parser("compute", help="this node as a compute provider")
    _cli._add_global_options(compute, top=False)
    csub = compute.add_subparsers(dest="compute_command", metavar="ACTION", required=True)
    p = command(
        csub,
        "offer",
        cmd_compute_offer,
        "make the local node's compute agent publish (or replace) its offer",
    )
    p.add_argument(
        "--price-per-device-second",
        metavar="NSD",
        help="price per device-second (default: the node's [compute] setting)",
    )
    p.add_argument(
        "--max-concurrent", metavar="N", type=int, help="tasks claimed at once (default: config)"
    )
    p.add_argument(
        "--no-wait", action="store_true", help="return once sent, without waiting for finality"
    )
    p.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        default=_cli.DEFAULT_TX_TIMEOUT,
        help=f"seconds to wait for finality (default {_cli.DEFAULT_TX_TIMEOUT:g})",
    )
    command(csub, "status", cmd_compute_status, "the local compute agent: offer, limits, tasks")
    p = command(
        csub, "providers", cmd_compute_providers, "list the compute providers registered on chain"
    )
    p.add_argument("--platform", metavar="CLASS", help="only the providers of this platform class")
    p.add_argument(
        "--limit", metavar="N", type=int, default=20, help="providers per page (max 100)"
    )
    p.add_argument("--cursor", metavar="ADDRESS", help="go on after this provider address")
