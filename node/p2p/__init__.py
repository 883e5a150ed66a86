"""Peer-to-peer networking (DESIGN §6): the ``Network`` interface (``api``), wire messages
(``messages``), block parts (``parts``), stream framing (``framing``) and the in-memory network
for tests (``memory``). Only ``libp2p_host`` imports libp2p; nothing here imports it."""
