"""The chain's economy (DESIGN §8–§10): roles, datasets, composite datasets, purchases with
fair-exchange key delivery, and storage deals. Pure state-transition code, like
``node.consensus.transition``: each module contributes transaction kinds (``api.KindHandler``)
and end-of-block work; ``node.economy.registry`` collects them for the transition."""
