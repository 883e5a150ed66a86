"""N = 4 engines (f = 1) over a lossy in-memory network: agreement always, termination after GST.

The simulator (``tests/consensus/sim.py``) delays, drops, duplicates and reorders messages with a
seeded scheduler until the global stabilization time; one validator may be byzantine (silent,
double-proposing and double-voting, or proposing invalid blocks). Every run checks AGREEMENT (no
two honest nodes decide different blocks at one height) and, since the network is fair after GST,
TERMINATION (every honest node decides every height asked for).
"""

from __future__ import annotations

import pytest

from node.consensus.blocks import vote_signer
from tests.consensus.sim import CHAIN_ID, NetworkConfig, Simulation

HEIGHTS = 5
SEEDS = range(6)
HARSH = NetworkConfig(gst_ms=12_000, drop=0.3, duplicate=0.2, max_delay_ms=2_500)
BEHAVIOURS = {
    "all-honest": {},
    "silent": {0: "silent"},
    "equivocating": {1: "equivocate"},
    "invalid-proposer": {2: "invalid"},
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_agreement_and_termination(behaviour: str, seed: int) -> None:
    sim = Simulation(seed, byzantine=BEHAVIOURS[behaviour], network=HARSH)
    sim.run(HEIGHTS)
    sim.check_agreement()
    sim.check_termination(HEIGHTS)


@pytest.mark.parametrize("seed", SEEDS)
def test_agreement_when_the_network_never_stabilizes(seed: int) -> None:
    never = NetworkConfig(gst_ms=10**9, drop=0.5, duplicate=0.3, max_delay_ms=4_000)
    sim = Simulation(seed, byzantine={3: "equivocate"}, network=never)
    sim.run(HEIGHTS, max_ms=60_000)
    sim.check_agreement()


def test_equivocation_is_recorded_as_valid_evidence() -> None:
    byzantine = 1
    sim = Simulation(0, byzantine={byzantine: "equivocate"}, network=HARSH)
    sim.run(HEIGHTS)
    sim.check_agreement()
    evidence = [e.evidence for n in sim.honest for e in n.evidence]
    assert evidence
    culprit = sim.nodes[byzantine].key.address
    for ev in evidence:
        a, b = ev.vote_a.vote, ev.vote_b.vote
        assert (a.height, a.round, a.vote_type, a.validator) == (
            b.height,
            b.round,
            b.vote_type,
            b.validator,
        )
        assert a.block_hash != b.block_hash
        assert vote_signer(CHAIN_ID, ev.vote_a) == vote_signer(CHAIN_ID, ev.vote_b) == culprit


def test_the_simulation_is_deterministic() -> None:
    runs = []
    for _ in range(2):
        sim = Simulation(3, byzantine={1: "equivocate"}, network=HARSH)
        sim.run(HEIGHTS)
        runs.append((sim.time, sim.decisions))
    assert runs[0] == runs[1]
