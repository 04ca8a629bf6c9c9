"""The README's quick start, runnable: python examples/quickstart.py"""

import asyncio

import torch

import asyncnn

model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()


async def decode(raw: list[float]) -> torch.Tensor:  # async: runs on the event loop
    return torch.tensor(raw).unsqueeze(0)


def top1(logits: torch.Tensor) -> int:  # sync: runs on its own thread
    return int(logits.argmax())


async def main() -> None:
    pipe = asyncnn.Pipeline(
        [asyncnn.Stage(decode), asyncnn.Stage(model, workers=2), asyncnn.Stage(top1)],
        queue_size=8,
    )
    async with pipe:  # starts every stage; exit drains
        print(await pipe.send([0.5] * 16))  # one request -> its result
        async for y in pipe.stream([[0.1 * i] * 16 for i in range(5)]):
            print(y)  # results in input order
        print(pipe.stats()["Sequential"].items)


if __name__ == "__main__":
    asyncio.run(main())
