"""Graphs of stages: the user's declaration, validated once when a pipeline is built.

A :class:`Graph` has one input, stages added on earlier nodes, and one or more outputs::

    g = Graph()
    x = g.input()
    a = g.add(Stage(embed), x)
    b = g.add(Stage(left), a)             # fan-out: b and c both receive a's result
    c = g.add(Stage(right), a)
    d = g.add(Stage(join), b, c)          # fan-in: join(b_out, c_out) for the same request
    g.output(d)                           # g.output(b, c) makes send() return a tuple

``validate()`` (called by ``Pipeline``) checks the structure and gives every stage a unique name.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import GraphError
from .stage import Stage

__all__ = ["Graph", "Node", "Plan", "PlanNode", "to_dot", "to_mermaid"]


class Node:
    """A handle on a point of a graph: its input, or the output of one stage."""

    __slots__ = ("graph", "index", "parents", "stage")

    def __init__(self, graph: Graph, index: int, stage: Stage | None, parents: tuple[Node, ...]):
        self.graph = graph
        self.index = index
        self.stage = stage
        self.parents = parents

    @property
    def label(self) -> str:
        return "input" if self.stage is None else f"stage {self.stage.name!r}"

    def __repr__(self) -> str:
        return f"<Node {self.index}: {self.label}>"


@dataclass(frozen=True)
class PlanNode:
    """A validated stage: its unique-named Stage and the plan indices of its inputs (-1 = input)."""

    stage: Stage
    inputs: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    """A validated graph in topological order; what the runtime runs."""

    nodes: tuple[PlanNode, ...]
    outputs: tuple[int, ...]  # plan indices, -1 for the graph input

    @property
    def stages(self) -> tuple[Stage, ...]:
        return tuple(n.stage for n in self.nodes)

    def consumers(self, index: int) -> list[tuple[int, int]]:
        """(node, port) pairs that read node ``index``'s output (-1 = the graph input)."""
        return [
            (j, port)
            for j, n in enumerate(self.nodes)
            for port, src in enumerate(n.inputs)
            if src == index
        ]


class Graph:
    """A directed acyclic graph of stages with one input and one or more outputs."""

    def __init__(self) -> None:
        self._nodes: list[Node] = []
        self._input: Node | None = None
        self._outputs: tuple[Node, ...] = ()

    def input(self) -> Node:
        """The graph's input (every request enters here); calling it again returns the same node."""
        if self._input is None:
            self._input = Node(self, -1, None, ())
        return self._input

    def add(self, stage: Stage, *inputs: Node) -> Node:
        """Add ``stage`` fed by ``inputs`` (several inputs: it is called with one result of each,
        for the same request, in this order) and return the node of its output."""
        if not isinstance(stage, Stage):
            if callable(stage):
                stage = Stage(stage)
            else:
                raise TypeError(f"Graph.add: expected a Stage, got {type(stage).__name__}")
        for node in inputs:
            if not isinstance(node, Node):
                raise TypeError(
                    f"Graph.add(stage {stage.name!r}): inputs must be nodes returned by "
                    f"g.input() or g.add(...), got {type(node).__name__}"
                )
        node = Node(self, len(self._nodes), stage, tuple(inputs))
        self._nodes.append(node)
        return node

    def output(self, *nodes: Node) -> None:
        """Declare what a request returns: one node, or several (a tuple in this order)."""
        for node in nodes:
            if not isinstance(node, Node):
                raise TypeError(f"Graph.output: expected nodes, got {type(node).__name__}")
        self._outputs = tuple(nodes)

    @classmethod
    def chain(cls, stages: Iterable[Stage]) -> Graph:
        """A graph that runs ``stages`` one after another."""
        g = cls()
        node = g.input()
        for s in stages:
            node = g.add(s, node)
        g.output(node)
        return g

    def validate(self) -> Plan:
        """Check the structure and return the plan the runtime runs.

        Raises:
            GraphError: no input, no output, no stages, a stage with no inputs, a node from another
                graph or not added yet, a cycle, or a stage whose result reaches no output.
        """
        if self._input is None:
            raise GraphError("graph has no input: start with `x = g.input()` and add stages on x")
        if not self._outputs:
            raise GraphError("graph has no output: finish with `g.output(node)`")
        if not self._nodes:
            raise GraphError("graph has no stages: add one with `g.add(Stage(fn), x)`")
        known = {id(n) for n in self._nodes} | {id(self._input)}
        for node in self._nodes:
            assert node.stage is not None
            if not node.parents:
                raise GraphError(
                    f"stage {node.stage.name!r} has no inputs: add it with `g.add(stage, x)` "
                    "where x is g.input() or an earlier node"
                )
            for p in node.parents:
                self._check_known(p, known, f"stage {node.stage.name!r}")
        for p in self._outputs:
            self._check_known(p, known, "g.output(...)")
        order = self._topological_order()
        reach = self._reaching_outputs()
        for node in self._nodes:
            if id(node) not in reach:
                assert node.stage is not None
                raise GraphError(
                    f"stage {node.stage.name!r} has no path to an output: its results would be "
                    "thrown away; pass it (or a stage after it) to g.output(...), or remove it"
                )
        for node in self._nodes:
            assert node.stage is not None
            _check_arity(node.stage, node.parents)
        names = _unique_names([n.stage.name for n in order if n.stage is not None])
        pos = {id(n): i for i, n in enumerate(order)}
        pos[id(self._input)] = -1
        plan_nodes = tuple(
            PlanNode(
                stage=dataclasses.replace(n.stage, name=name) if n.stage.name != name else n.stage,
                inputs=tuple(pos[id(p)] for p in n.parents),
            )
            for n, name in zip(order, names, strict=True)
            if n.stage is not None
        )
        plan = Plan(nodes=plan_nodes, outputs=tuple(pos[id(p)] for p in self._outputs))
        _check_streams(plan)
        return plan

    def _check_known(self, node: Node, known: set[int], where: str) -> None:
        if node.graph is not self:
            raise GraphError(f"{where} uses {node.label} from another graph: add it to this graph")
        if id(node) not in known:
            raise GraphError(f"{where} uses {node.label} before it was added to the graph")

    def _topological_order(self) -> list[Node]:
        # Kahn's algorithm; the builder API cannot make a cycle, but hand-made nodes can.
        indegree = {id(n): len(n.parents) for n in self._nodes}
        children: dict[int, list[Node]] = {id(n): [] for n in self._nodes}
        children[id(self._input)] = []
        for n in self._nodes:
            for p in n.parents:
                children.setdefault(id(p), []).append(n)
        ready: list[Node] = [self._input] if self._input is not None else []
        order: list[Node] = []
        while ready:
            n = ready.pop(0)
            order.append(n)
            for c in children.get(id(n), []):
                indegree[id(c)] -= 1
                if indegree[id(c)] == 0:
                    ready.append(c)
        if len(order) != len(self._nodes) + 1:
            stuck = [n.stage.name for n in self._nodes if indegree[id(n)] > 0 and n.stage]
            raise GraphError(
                f"graph has a cycle through stage(s) {', '.join(map(repr, stuck))}: "
                "a request must flow from the input to the outputs without coming back"
            )
        return order[1:] if order and order[0] is self._input else order

    def _reaching_outputs(self) -> set[int]:
        seen: set[int] = set()
        todo: list[Node] = list(self._outputs)
        while todo:
            n = todo.pop()
            if id(n) not in seen:
                seen.add(id(n))
                todo.extend(n.parents)
        return seen

    def __repr__(self) -> str:
        return f"<Graph of {len(self._nodes)} stage(s), {len(self._outputs)} output(s)>"


def _check_arity(stage: Stage, parents: tuple[Node, ...]) -> None:
    """A stage is called with one positional argument per input: its function must take them."""
    if stage.executor == "ray":
        return  # fn may be a factory that builds the callable on each replica
    try:
        sig = inspect.signature(stage.fn)
    except (TypeError, ValueError):
        return  # no signature to read (some builtins): the call decides
    n = len(parents)
    fn_name = getattr(stage.fn, "__name__", type(stage.fn).__name__)
    try:
        sig.bind(*([None] * n))
    except TypeError as exc:
        feeds = ", ".join(p.label for p in parents)
        raise GraphError(
            f"stage {stage.name!r} is fed by {n} input(s) ({feeds}) and is called with one "
            f"result of each, but {fn_name}{sig} cannot take {n} positional argument(s) "
            f"({exc}): give it {n} parameter(s), one per input in order"
        ) from None


def _unique_names(names: Sequence[str]) -> list[str]:
    taken: set[str] = set()
    out: list[str] = []
    for name in names:
        candidate, k = name, 2
        while candidate in taken:
            candidate, k = f"{name}_{k}", k + 1
        taken.add(candidate)
        out.append(candidate)
    return out


def _label(stage: Stage) -> str:
    parts = [stage.name, stage.runs_on + (f" x{stage.workers}" if stage.workers != 1 else "")]
    if stage.device is not None:
        parts.append(str(stage.device))
    if stage.batch is not None:
        d = stage.batch.max_delay
        delay = "auto" if isinstance(d, str) else f"{d * 1e3:g} ms"
        parts.append(f"batch {stage.batch.max_size} / {delay}")
    return "\n".join(parts)


def _edges(plan: Plan) -> list[tuple[str, str]]:
    ids = {-1: "input"}
    ids.update({i: f"s{i}" for i in range(len(plan.nodes))})
    edges = [(ids[src], ids[i]) for i, n in enumerate(plan.nodes) for src in n.inputs]
    edges += [(ids[src], "output") for src in plan.outputs]
    return edges


def to_mermaid(plan: Plan, queue_size: int) -> str:
    """A Mermaid flowchart of the plan: stages with where they run, queues on the edges."""
    lines = ["flowchart LR", "    input([input])"]
    for i, n in enumerate(plan.nodes):
        text = _label(n.stage).replace("\n", "<br/>").replace('"', "'")
        lines.append(f'    s{i}["{text}"]')
    lines.append("    output([output])")
    lines += [f"    {a} -->|q{queue_size}| {b}" for a, b in _edges(plan)]
    return "\n".join(lines) + "\n"


def to_dot(plan: Plan, queue_size: int) -> str:
    """The same diagram in Graphviz DOT."""
    lines = ["digraph asyncnn {", "    rankdir=LR;", '    input [shape=oval, label="input"];']
    for i, n in enumerate(plan.nodes):
        text = _label(n.stage).replace('"', "'")
        lines.append(f'    s{i} [shape=box, label="{text}"];')
    lines.append('    output [shape=oval, label="output"];')
    lines += [f'    {a} -> {b} [label="q{queue_size}"];' for a, b in _edges(plan)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _check_streams(plan: Plan) -> None:
    """Generator stages: at most one on any path, and whatever meets again (a join's inputs,
    the outputs) comes from the same one, since parts of a request are matched by part."""
    source: dict[int, str | None] = {-1: None}  # node -> the generator stage it comes after
    for i, node in enumerate(plan.nodes):
        before = {source[j] for j in node.inputs}
        if len(before) > 1:
            raise GraphError(
                f"stage {node.stage.name!r} joins a branch after generator stage "
                f"{sorted(str(b) for b in before if b)[0]!r} with one that is not: parts of a "
                "request can only meet parts; join before the generator, or in both branches after"
            )
        (came_after,) = before
        if node.stage.yields and came_after is not None:
            raise GraphError(
                f"stage {node.stage.name!r} is a generator after generator stage "
                f"{came_after!r}: one generator per path; yield what both would from one stage"
            )
        source[i] = node.stage.name if node.stage.yields else came_after
    outs = {source[j] for j in plan.outputs}
    if len(outs) > 1:
        raise GraphError(
            "the outputs mix a branch after a generator stage with one that is not: every output "
            "must come after the same generator stage (or none)"
        )
