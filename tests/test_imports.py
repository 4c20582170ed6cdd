"""The package's import graph has no circles (DESIGN.md: imports flow down; the registry is a leaf)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vit"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the vit modules it imports anywhere in its body (lazy imports inside functions count too)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                for alias in node.names:  # `from . import x` names a submodule
                    found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vit"):
                found.add(node.module if node.module in modules else node.module.rpartition(".")[0])
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circles():
    graph = _imports()
    assert "vit.registry" in graph and "vit.data.images" in graph
    cycle = _cycle({k: {m for m in v if not k.startswith(m + ".")} for k, v in graph.items()})
    assert cycle is None, " -> ".join(cycle)


def test_registry_and_image_decoding_are_leaves():
    graph = _imports()
    assert graph["vit.registry"] <= {"vit.config"}
    assert graph["vit.config"] == set() and graph["vit.data.images"] == set()
