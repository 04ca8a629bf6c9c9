"""Which channel feeds which consumer: a pure function of the validated plan.

``wire(plan, ...)`` describes the running graph without building anything: per stage its input
ports, whether it is a join, where its output goes (and whether each consumer takes a merged
batch as it is or one envelope per request), whether a placed stage copies its output to the
host; whether admission needs an input task (fan-out of the input, or micro-batching); and how
many requests the graph can hold. The runtime turns the description into channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..graph import Plan

__all__ = ["SINK", "NodeWiring", "Target", "Wiring", "wire"]

SINK = -2  # Target.node of a pipeline output


@dataclass(frozen=True)
class Target:
    """One consumer of an output: input ``port`` of plan node ``node`` (or ``SINK``)."""

    node: int
    port: int
    merged: bool  # the consumer takes a merged batch as it is (a batching stage, the sink)


@dataclass(frozen=True)
class NodeWiring:
    ports: int  # input ports (one per input of the stage)
    join: bool  # several inputs: collectors match the parts of each request
    outs: tuple[Target, ...]
    to_host: bool  # a placed stage copies its output to the host for a consumer elsewhere


@dataclass(frozen=True)
class Wiring:
    nodes: tuple[NodeWiring, ...]
    input_outs: tuple[Target, ...]  # consumers of the graph input
    outputs: int  # sink ports
    input_task: bool  # admission has its own channel and a task that fans out or splits
    capacity: int  # requests the graph can hold at once: every buffer plus running calls


def wire(
    plan: Plan, queue_size: int, output_device: Any = "cpu", microbatch: int | None = None
) -> Wiring:
    outs: dict[int, list[Target]] = {i: [] for i in range(-1, len(plan.nodes))}
    for j, node in enumerate(plan.nodes):
        spec = node.stage.batch
        takes_merged = spec is not None and spec.collate is None and len(node.inputs) == 1
        for port, src in enumerate(node.inputs):
            outs[src].append(Target(j, port, takes_merged and not _padded(plan, src)))
    for port, src in enumerate(plan.outputs):
        outs[src].append(Target(SINK, port, not _padded(plan, src)))
    nodes = tuple(
        NodeWiring(
            ports=len(n.inputs),
            join=len(n.inputs) > 1,
            outs=tuple(outs[i]),
            to_host=_to_host(plan, i, output_device),
        )
        for i, n in enumerate(plan.nodes)
    )
    chans = 1 + sum(n.ports + n.join for n in nodes)  # a sink buffers nothing
    return Wiring(
        nodes=nodes,
        input_outs=tuple(outs[-1]),
        outputs=len(plan.outputs),
        # Admission is the first stage's port unless the input fans out, is split, or goes
        # straight to an output (a sink is no channel to wait on).
        input_task=len(outs[-1]) != 1 or microbatch is not None or outs[-1][0].node == SINK,
        capacity=chans * queue_size + sum(int(n.stage.workers) for n in plan.nodes),
    )


def _padded(plan: Plan, src: int) -> bool:
    # A padded batch is split (and trimmed) per request before anyone else sees it; so is the
    # output of collate/split hooks, which has no rows to slice.
    if src < 0:
        return False
    spec = plan.nodes[src].stage.batch
    return spec is not None and (spec.pad is not None or spec.split is not None)


def _to_host(plan: Plan, index: int, output_device: Any) -> bool:
    here = plan.nodes[index].stage.device
    if here is None or str(here).startswith("cpu"):
        return False
    users: list[Any] = [plan.nodes[j].stage.device for j, _ in plan.consumers(index)]
    if index in plan.outputs and output_device is not None:
        users.append(output_device)
    return any(u is None or _same(u) != _same(here) for u in users)


def _same(device: Any) -> str:
    import torch

    return str(torch.device(device))
