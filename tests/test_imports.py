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
    assert "vit.models.registry" in graph and "vit.data.images" in graph
    cycle = _cycle({k: {m for m in v if not k.startswith(m + ".")} for k, v in graph.items()})
    assert cycle is None, " -> ".join(cycle)


def test_registry_and_image_decoding_are_leaves():
    graph = _imports()
    assert graph["vit.models.registry"] <= {"vit.models.config"}
    assert graph["vit.models.config"] == set() and graph["vit.data.images"] == set()


# DESIGN.md's layers, lowest first: a module may import from its own layer or the ones below, never above.
LAYERS = [
    ("utils", ("vit.utils",)),
    ("models", ("vit.models",)),
    ("data, checkpoints", ("vit.data", "vit.checkpoints")),
    ("tasks, features, deploy, training", ("vit.tasks", "vit.features", "vit.deploy", "vit.training")),
    ("entry points", ("vit.commands", "vit.training.cli", "vit.__main__", "vit")),
]


def _layer(module: str) -> int:
    """The layer of a module: the longest matching prefix wins (vit.training.cli is an entry point)."""
    best, level = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), index
    assert level is not None, f"{module} is in no layer; add it to LAYERS"
    return level


def test_imports_flow_down_the_layers():
    graph = _imports()
    upward = [f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
              for m, targets in sorted(graph.items()) for t in sorted(targets)
              if _layer(t) > _layer(m) and not m.startswith(t + ".")]
    assert not upward, "imports that reach up a layer:\n  " + "\n  ".join(upward)


def test_tasks_do_not_import_each_other_and_models_stay_plain():
    graph = _imports()
    # a task module is one that defines a LightningModule; the other modules of vit/tasks (the Backbone description,
    # a task's own parts such as detection's pyramid) may be imported by the tasks
    tasks = {name for name, path in {_module_name(p): p for p in (PACKAGE / "tasks").glob("*.py")}.items()
             if any(isinstance(node, ast.ClassDef) and any("LightningModule" in ast.unparse(base) for base in node.bases)
                    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))))}
    assert "vit.tasks.classification" in tasks and "vit.tasks.backbone" not in tasks
    crossing = [f"{m} imports {t}" for m in sorted(tasks) for t in sorted(graph[m]) if t in tasks]
    assert not crossing, crossing
    for name, path in {_module_name(p): p for p in PACKAGE.rglob("*.py")}.items():
        if name.startswith("vit.models"):
            text = path.read_text(encoding="utf-8")
            assert "lightning" not in text and "open(" not in text, f"{name}: models are plain nn.Modules, no I/O"


def test_layer_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The check itself can fail: a models module that imports a task is reported."""
    graph = _imports()
    graph["vit.models.vision"] = graph["vit.models.vision"] | {"vit.tasks.classification"}
    monkeypatch.setattr(__import__(__name__), "_imports", lambda: graph)
    try:
        test_imports_flow_down_the_layers()
    except AssertionError as error:
        assert "vit.models.vision (models) imports vit.tasks.classification" in str(error)
    else:
        raise AssertionError("an upward import went unnoticed")


def test_public_api_names_stay_at_the_top_level():
    import vit
    from vit.deploy.runners import create_runner
    from vit.tasks.backbone import Backbone
    from vit.tasks.classification import ImageClassifier
    for name in vit.__all__:
        assert getattr(vit, name) is not None, name
    assert vit.create_runner is create_runner and vit.Backbone is Backbone and vit.ImageClassifier is ImageClassifier
    assert {"create_model", "list_models", "load_pretrained", "save_pretrained", "ViTConfig", "VisionTransformer",
            "ImageDataModule", "create_runner", "Backbone", "ImageClassifier"} <= set(vit.__all__)
