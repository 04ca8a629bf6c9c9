"""An in-memory dataset as tutorials write it: a ``TensorDataset``, ``random_split`` into train
and validation sets, the validation batches streamed through a model by a pipeline.

AsyncLoader does not index a ``TensorDataset`` (or a ``Subset`` of one) sample by sample: each
batch is one indexing per tensor, ``t[indices]``, the same tensors ``default_collate`` would
stack, gathered on the loop when the batch is small (``BENCHMARKS.md``: 4.9-7.7x a plain
``DataLoader`` at batches of 64 rows of 32 floats).

    python examples/in_memory_split.py
"""

from __future__ import annotations

import asyncio

import torch
from torch.utils.data import TensorDataset, random_split

import asyncnn

FEATURES = 16


def dataset(n: int, seed: int = 0) -> tuple[TensorDataset, torch.Tensor]:
    """``n`` rows of features labelled by a hidden linear rule, 5% of the labels flipped;
    (the dataset, the rule)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    rule = torch.randn(FEATURES, generator=g)
    noise = torch.rand(n, generator=g) < 0.05
    return TensorDataset(x, (x @ rule > 0).long() ^ noise.long()), rule


def classifier(rule: torch.Tensor) -> torch.nn.Module:
    """Logits for the two classes, from the rule (standing in for a trained model)."""
    model = torch.nn.Linear(FEATURES, 2)
    with torch.no_grad():
        model.weight.copy_(torch.stack([-rule, rule]))
        model.bias.zero_()
    return model.eval()


async def main(n: int = 10_000, batch_size: int = 64) -> tuple[float, list[torch.Tensor]]:
    """Accuracy on the validation split, and the logits of each batch (in order)."""
    data, rule = dataset(n)
    _, val = random_split(data, [0.8, 0.2], generator=torch.Generator().manual_seed(1))
    loader = asyncnn.AsyncLoader(val, batch_size=batch_size)  # batches of [features, labels]
    model = classifier(rule)
    # The stage gets a whole batch and passes its labels on with the logits.
    score = asyncnn.Stage(lambda batch: (model(batch[0]), batch[1]), name="model")
    right, seen, logits = 0, 0, []
    async with asyncnn.Pipeline([score]) as pipe:
        async for out, labels in pipe.stream(loader):
            right += int((out.argmax(dim=1) == labels).sum())
            seen += len(labels)
            logits.append(out)
    return right / seen, logits


if __name__ == "__main__":
    accuracy, _ = asyncio.run(main())
    print(f"validation accuracy {accuracy:.3f}")
