"""Child process of the thread-count test: ``python -m tests.merge.thread_merge_child THREADS
PARENT_DIR OUT_DIR`` merges the parents in PARENT_DIR with every elementwise method using
THREADS torch threads and writes one file per method (and the thread count it ran with)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from node.merge.methods import merge_files
from node.merge.recipe import MergeRecipe

SEED = bytes(range(32))
PARENTS = [b"parent-a", b"parent-b", b"parent-c"]
RECIPES = {
    "linear": MergeRecipe.create("linear", PARENTS, coefficients=[0.2, 0.3, 0.5]),
    "task_arithmetic": MergeRecipe.create(
        "task_arithmetic",
        PARENTS,
        base=b"base",
        coefficients=[1.0, 0.7, 0.3],
        params={"scale": 0.9},
    ),
    "ties": MergeRecipe.create(
        "ties", PARENTS, base=b"base", coefficients=[1.0, 1.0, 0.5], params={"density": 0.3}
    ),
    "dare": MergeRecipe.create(
        "dare",
        PARENTS,
        base=b"base",
        coefficients=[0.5, 0.25, 0.25],
        params={"density": 0.4, "scale": 1.0},
        seed=SEED,
    ),
    "slerp": MergeRecipe.create("slerp", PARENTS[:2], params={"t": 0.3}),
}


def main() -> None:
    threads, parents, out = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(threads)
    files = [parents / f"p{i}.safetensors" for i in range(3)]
    for method, recipe in RECIPES.items():
        merge_files(
            recipe,
            files[: len(recipe.parents)],
            out / f"{method}.safetensors",
            base_path=parents / "base.safetensors",
        )
    (out / "threads").write_text(str(torch.get_num_threads()))


if __name__ == "__main__":
    main()
