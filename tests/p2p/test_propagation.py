"""The pieces together: a proposal and its block parts gossiped over a lossy in-memory network,
checked by topic validators, and the missing parts pulled with ``GetParts``."""

from __future__ import annotations

import random

import trio
import trio.testing

from node.consensus.blocks import Block
from node.errors import DecodeError
from node.p2p.api import (
    PROTOCOL_PULL,
    GossipMessage,
    PeerId,
    RequestFailed,
    Topic,
    Verdict,
    topic_name,
)
from node.p2p.memory import MemoryHost, MemoryNetwork
from node.p2p.messages import (
    BlockPart,
    GetParts,
    PartsResponse,
    ProposalMessage,
    decode_gossip,
    decode_request,
    decode_response,
    error_response,
)
from node.p2p.parts import DuplicatePart, InvalidPart, PartSetAssembler, make_part_set
from tests.p2p.samples import CHAIN_ID, header, proposal_message

PROPOSALS = topic_name(CHAIN_ID, Topic.PROPOSALS)


class Node:
    def __init__(self, host: MemoryHost) -> None:
        self.host = host
        self.proposal: ProposalMessage | None = None
        self.assembler: PartSetAssembler | None = None
        self.parts: dict[int, BlockPart] = {}  # what the proposer itself serves

    async def validate(self, msg: GossipMessage) -> Verdict:
        try:
            m = decode_gossip(Topic.PROPOSALS, msg.data)
        except DecodeError:
            return Verdict.REJECT
        if isinstance(m, ProposalMessage):
            if self.proposal is not None:
                return Verdict.IGNORE
            self.proposal = m
            p = m.signed_proposal.proposal
            self.assembler = PartSetAssembler(m.part_set, height=p.height, round=p.round)
            return Verdict.ACCEPT
        assert isinstance(m, BlockPart)
        if self.assembler is None or not self.assembler.matches(m):
            return Verdict.IGNORE  # a real node would buffer it (bounded)
        try:
            self.assembler.add(m)
        except DuplicatePart:
            return Verdict.IGNORE
        except InvalidPart:
            return Verdict.REJECT
        return Verdict.ACCEPT

    async def serve(self, peer: PeerId, payload: bytes) -> bytes:
        try:
            req = decode_request(PROTOCOL_PULL, payload)
        except DecodeError as exc:
            return error_response(exc.code, exc.message)
        assert isinstance(req, GetParts)
        found = []
        for i in req.indices:
            part = self.parts.get(i) or (self.assembler.get(i) if self.assembler else None)
            if part is not None and part.root == req.root:
                found.append(part)
        return PartsResponse(tuple(found)).encode()

    async def pull_missing(self) -> None:
        assert self.assembler is not None
        for peer in self.host.peers():
            missing = self.assembler.missing()
            if not missing:
                return
            req = GetParts(
                self.assembler.height,
                self.assembler.round,
                self.assembler.header.root,
                tuple(missing),
            )
            try:
                raw = await self.host.request(peer.peer_id, PROTOCOL_PULL, req.encode())
            except RequestFailed:
                continue
            for part in decode_response(PartsResponse, raw).parts:
                if not self.assembler.has(part.index):
                    self.assembler.add(part)


async def test_proposal_parts_and_pull(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(21, drop=0.35, duplicate=0.2, delay_ms=(5, 80))
    nodes = [Node(net.add_host(n)) for n in "pabcd"]
    hdr = header(5)
    block = Block(hdr, tuple(random.Random(1).randbytes(50_000) for _ in range(30)), (), None)
    data = block.encode()
    part_set, parts = make_part_set(data, height=5, round=0)
    assert part_set.total == 6
    proposal = proposal_message(5, 0)
    proposal = ProposalMessage(proposal.signed_proposal, proposal.header, part_set)
    proposer = nodes[0]
    proposer.parts = {p.index: p for p in parts}
    async with net:
        for node in nodes:
            await node.host.subscribe(PROPOSALS, node.validate)
            node.host.set_handler(PROTOCOL_PULL, node.serve)
        await proposer.host.publish(PROPOSALS, proposal.encode())
        await trio.sleep(0.2)
        for part in parts:
            await proposer.host.publish(PROPOSALS, part.encode())
        await trio.sleep(1)
        assert any(n.assembler is not None and n.assembler.missing() for n in nodes[1:])
        # Anyone who missed the proposal itself asks again (re-gossip); then pull what is missing.
        await proposer.host.publish(PROPOSALS, proposal.encode())
        await trio.sleep(1)
        net.set_faults(drop=0.0)
        await proposer.host.publish(PROPOSALS, proposal.encode())
        await trio.sleep(1)
        for node in nodes[1:]:
            await node.pull_missing()
    for node in nodes[1:]:
        assert node.assembler is not None and node.assembler.is_complete()
        got = Block.decode(node.assembler.block_bytes(), max_size=len(data))
        assert got.hash() == proposal.signed_proposal.proposal.block_hash
