"""Pictures of a graph before and after the passes (`archc show`).

Nodes are collapsed into boxes by the first `depth` components of their qualified name (`s1.b1`
for `s1.b1.f.a.conv` at depth 2; functions and methods by the module that called them, from the
tracer's `nn_module_stack`). A box lists what it executes (`Conv2d x3, BatchNorm2d x3, ReLU x2`),
an arrow joins two boxes when a tensor flows between them. Boxes are placed in layers of the
longest path from the input (networkx), so parallel branches sit side by side. A box whose
contents differ between the two graphs, or that exists in one only, is highlighted in both panels.
Drawn with matplotlib's Agg backend (.svg or .png).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import networkx as nx
from torch.fx import GraphModule, Node

from archc.common.fileio import atomic_output

CHANGED, KEPT = "#f4a261", "#e9f1f7"


def node_group(gm: GraphModule, node: Node, depth: int) -> str | None:
    """The box a node belongs to, or None for the input/output and constants."""
    if node.op in ("placeholder", "output", "get_attr"):
        return None
    if node.op == "call_module":
        path = str(node.target)
    else:
        stack = node.meta.get("nn_module_stack") or {}
        paths = [value[0] for value in stack.values() if value and value[0]]
        path = paths[-1] if paths else ""
    parts = path.split(".") if path else []
    return ".".join(parts[:depth]) if parts else "(top level)"


def _op_name(gm: GraphModule, node: Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return getattr(node.target, "__name__", str(node.target))


def collapse(gm: GraphModule, depth: int) -> tuple[nx.DiGraph, dict[str, Counter]]:
    """(box graph, box -> op counts); the input and output are boxes of their own."""
    graph, contents = nx.DiGraph(), {}
    box_of: dict[Node, str] = {}
    for node in gm.graph.nodes:
        box = {"placeholder": "input", "output": "output"}.get(node.op) or node_group(
            gm, node, depth)
        if box is None:
            continue
        box_of[node] = box
        graph.add_node(box)
        if node.op not in ("placeholder", "output"):
            contents.setdefault(box, Counter())[_op_name(gm, node)] += 1
        for source in node.all_input_nodes:
            if source in box_of and box_of[source] != box:
                graph.add_edge(box_of[source], box)
    return graph, contents


def _layout(graph: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """Layers of the longest path from the sources (cycles from collapsing are condensed)."""
    dag = nx.condensation(graph)
    level: dict[int, int] = {}
    for component in nx.topological_sort(dag):
        level[component] = max((level[p] + 1 for p in dag.predecessors(component)), default=0)
    rows: dict[int, list[str]] = {}
    for component, members in dag.nodes(data="members"):
        rows.setdefault(level[component], []).extend(sorted(members))
    return {box: (column - (len(boxes) - 1) / 2, -row)
            for row, boxes in rows.items() for column, box in enumerate(boxes)}


def _summary(counts: Counter | None) -> str:
    if not counts:
        return ""
    items = [f"{name} x{count}" if count > 1 else name for name, count in counts.most_common(3)]
    rest = len(counts) - 3
    return ", ".join(items) + (f", +{rest} more" if rest > 0 else "")


def draw(before: GraphModule, after: GraphModule, path: str | Path, *, title: str,
         depth: int = 2, after_label: str = "after the pipeline") -> str:
    """Draw both graphs side by side into `path` (.svg / .png); returns a one-line summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"{title}: as given", *collapse(before, depth)),
              (f"{title}: {after_label}", *collapse(after, depth))]
    (_, _, old), (_, _, new) = panels
    changed = {box for box in old.keys() | new.keys() if old.get(box) != new.get(box)}
    layouts = [_layout(graph) for _, graph, _ in panels]
    rows = max(1 - min(y for _, y in layout.values()) for layout in layouts)
    columns = max(max(x for x, _ in layout.values()) - min(x for x, _ in layout.values()) + 1
                  for layout in layouts)
    figure, axes = plt.subplots(1, 2, figsize=(min(4 + 3.2 * columns, 60) * 2 / 2,
                                               min(1 + 0.9 * rows, 200)))
    for axis, (label, graph, contents), layout in zip(axes, panels, layouts):
        for source, target in graph.edges:
            (x0, y0), (x1, y1) = layout[source], layout[target]
            axis.annotate("", xy=(x1, y1 + 0.2), xytext=(x0, y0 - 0.2),
                          arrowprops={"arrowstyle": "->", "color": "#555", "lw": 0.8})
        for box, (x, y) in layout.items():
            text = box if box in ("input", "output") else f"{box}\n{_summary(contents.get(box))}"
            axis.text(x, y, text, ha="center", va="center", fontsize=7,
                      bbox={"boxstyle": "round", "fc": CHANGED if box in changed else KEPT,
                            "ec": "#333", "lw": 0.6})
        xs = [x for x, _ in layout.values()]
        axis.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
        axis.set_ylim(-rows, 1)
        axis.set_title(label, fontsize=10)
        axis.axis("off")
    figure.tight_layout()
    path = Path(path)
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format=path.suffix.lstrip(".").lower(), dpi=110)
    plt.close(figure)
    boxes_changed = len(changed - {"input", "output"})
    return (f"{len(old)} -> {len(new)} boxes at depth {depth}, {boxes_changed} changed "
            f"(highlighted)")
