"""The import graph of `mirror/`: no cycles, and every layer imports only the layers below it.

Read from the source with `ast` (every `import` and `from ... import`, those under
`TYPE_CHECKING` included), so a cycle cannot hide behind a late or conditional import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mirror"

# Each top-level part of mirror and the parts it may import. A part not listed here is a leaf
# module that may import only the leaf modules (errors, config grammar, oci, ranges, ...).
LEAVES = {
    "errors",
    "oci",
    "ranges",
    "request",
    "clusterkey",
    "bodies",
    "ports",
    "metrics",
    "config",
}
MAY_IMPORT: dict[str, set[str]] = {
    # The typed configuration names the objects it carries (a bootstrap source, a cluster key).
    "config": LEAVES | {"routing"},
    "stores": LEAVES,
    "upstream": LEAVES,
    "routing": LEAVES,
    "peers": LEAVES | {"routing"},
    "content": LEAVES | {"stores", "routing", "peers", "upstream"},
    # Pins and workload watches: fetched through content, put into the runtime's own store;
    # the workload watches reach Kubernetes and Nomad with the bootstrap's HTTP clients.
    "prefetch": LEAVES | {"content", "stores", "upstream", "routing"},
    "registry": LEAVES | {"content", "peers", "stores", "prefetch"},
    "runtime": LEAVES | {"upstream"},
    # What a node shows of itself (the status report, page and measure): it reads every part
    # through small protocols and serves its routes through the registry front; no part
    # imports it, node.py wires it and cli.py runs its client (`mirror status`).
    "status": LEAVES
    | {"content", "stores", "routing", "peers", "upstream", "prefetch", "registry"},
    "node": LEAVES
    | {"stores", "routing", "peers", "content", "upstream", "registry", "prefetch", "status"},
    "cli": LEAVES | {"node", "runtime", "routing", "stores", "upstream", "prefetch", "status"},
    "__main__": {"cli"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> Iterator[str]:
    """Every mirror module `path` imports (a `from X import name` counts X.name if a module)."""
    tree = ast.parse(path.read_text(), str(path))
    package = (
        module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    )
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            for alias in node.names:
                yield f"{base}.{alias.name}"


def graph() -> dict[str, set[str]]:
    sources = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {
        name: {target for target in imports_of(path) if target in sources and target != name}
        for name, path in sources.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_no_module_imports_itself_back() -> None:
    assert cycles(graph()) == []


def test_each_layer_imports_only_the_layers_below_it() -> None:
    wrong = []
    for source, targets in graph().items():
        allowed = MAY_IMPORT.get(part(source), LEAVES)
        for target in targets:
            if part(target) != part(source) and part(target) not in allowed and part(target):
                wrong.append(f"{source} -> {target}")
    assert sorted(wrong) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
