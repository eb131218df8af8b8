"""The project's structural rules, read from the source with `ast` alone (no module of the package is imported):

- no function or method longer than MAX_FUNCTION_LINES lines, and the training loop within MAX_TRAIN_LINES;
- no import cycle between the package's modules;
- no comparison against a distributed engine's name outside the distributed strategies (training/distributed.py):
  the rest of the code asks the strategy object, it does not branch on which engine runs;
- models/ is the bottom layer (beside errors.py and files.py): it imports nothing from the layers above it.

Each rule is a function over a package folder, so the self-tests at the end plant a violation in a tiny package
under tmp_path and check that it is caught, and that the same package without it passes.
"""

from __future__ import annotations

import ast
import re
from collections import deque
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "happyhorse_train"
MAX_FUNCTION_LINES = 100
MAX_TRAIN_LINES = 80
TRAIN_LOOP = ("training/trainer.py", "train")
# The only files allowed to branch on the engine: the strategies themselves.
ENGINE_FILES = {"training/distributed.py"}
# The subpackages models/ must not import (the layers above it).
ABOVE_MODELS = ("training", "memory", "planner", "data", "rendering", "demo")

# A string naming an engine (or an accelerate config that picks one): "deepspeed", "deepspeed_zero3", "fsdp",
# "FSDP", "ddp", "multi_gpu", "megatron", "zero3", ...
ENGINE_WORDS = re.compile(r"deepspeed|fsdp|fully.?sharded|megatron|multi.?gpu|(?<![a-z])ddp(?![a-z])|zero.?[123]", re.I)
# Attributes that tell which engine runs: accelerate's enum, its state's plugins.
ENGINE_ATTRIBUTES = {"DistributedType", "distributed_type", "deepspeed_plugin", "fsdp_plugin", "megatron_lm_plugin"}


# ---------------------------------------------------------------------------------------------------------------
# Reading the package


def modules_of(package: Path) -> dict[str, Path]:
    """Dotted module name -> file for every .py under `package` (a package's __init__.py under its own name)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _where(package: Path, path: Path, line: int) -> str:
    return f"{path.relative_to(package.parent).as_posix()}:{line}"


# ---------------------------------------------------------------------------------------------------------------
# Rule: short functions


def function_lengths(tree: ast.Module) -> list[tuple[str, int, int]]:
    """(qualified name, def line, length) of every function and method, nested ones included. The length
    counts from the `def` line to the last line of the body; decorators are not counted."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                found.append((name, child.lineno, child.end_lineno - child.lineno + 1))
                visit(child, f"{name}.<locals>.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def long_functions(package: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    offenders = []
    for path in modules_of(package).values():
        for name, line, length in function_lengths(_tree(path)):
            if length > limit:
                offenders.append((length, f"{_where(package, path, line)} {name}: {length} lines"))
    return [text for _, text in sorted(offenders, reverse=True)]


def length_of(path: Path, name: str) -> int | None:
    """The length of the top-level function `name` in `path` (None when there is none)."""
    for node in _tree(path).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node.end_lineno - node.lineno + 1
    return None


# ---------------------------------------------------------------------------------------------------------------
# Rule: no import cycles


def _imported(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: dict) -> list[str]:
    """The package's modules that one import statement imports. `import a.b.c` and `from a.b import c` (c a
    submodule) import a.b.c only: the __init__ of a and a.b that Python runs on the way are not edges.
    `from a.b import name` (name not a submodule) imports a.b."""
    if isinstance(node, ast.Import):
        targets = []
        for alias in node.names:
            parts = alias.name.split(".")
            prefixes = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
            targets += [next((p for p in prefixes if p in modules), None)]
        return [t for t in targets if t]
    if node.level:  # relative: from the importer's package, up level - 1
        package = importer if is_package else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    targets = []
    for alias in node.names:
        if f"{base}.{alias.name}" in modules:
            targets.append(f"{base}.{alias.name}")
        elif base in modules:
            targets.append(base)
    return targets


def imports_of(package: Path) -> list[tuple[str, str, int]]:
    """(importer, imported module, line) for every import statement of the package's modules (those inside
    functions and `if TYPE_CHECKING:` included), sorted by importer and line."""
    modules = modules_of(package)
    found = []
    for name, path in modules.items():
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _imported(node, name, path.name == "__init__.py", modules):
                    if target != name:
                        found.append((name, target, node.lineno))
    return sorted(found, key=lambda edge: (edge[0], edge[2], edge[1]))


def import_graph(package: Path) -> dict[str, dict[str, int]]:
    """module -> {module it imports: line of the first such import}."""
    graph: dict[str, dict[str, int]] = {name: {} for name in modules_of(package)}
    for importer, target, line in imports_of(package):
        graph[importer].setdefault(target, line)
    return graph


def _strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), those of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def import_cycle(package: Path) -> list[str] | None:
    """One shortest import cycle (start module repeated at the end), or None when there is none."""
    graph = import_graph(package)
    components = _strongly_connected(graph)
    if not components:
        return None
    members = set(components[0])
    start = components[0][0]
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:  # breadth-first inside the component, back to start
        node = queue.popleft()
        for child in sorted(graph[node]):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if child in members and child not in came_from:
                came_from[child] = node
                queue.append(child)
    raise AssertionError("a strongly connected component without a cycle")


def describe_cycle(package: Path, cycle: list[str]) -> str:
    graph, modules = import_graph(package), modules_of(package)
    steps = [f"{a} ({_where(package, modules[a], graph[a][b])}) imports {b}" for a, b in zip(cycle, cycle[1:])]
    caught = sorted(set().union(*_strongly_connected(graph)))
    return "import cycle:\n  " + "\n  ".join(steps) + f"\n(all modules caught in cycles: {', '.join(caught)})"


# ---------------------------------------------------------------------------------------------------------------
# Rule: no branching on the engine's name outside the strategies


def strategy_classes(package: Path) -> tuple[set[str], set[str]]:
    """The strategy classes in the engine files (those with a class-level `name`, and their subclasses there)
    and the names they record."""
    classes, names = set(), set()
    for relative in ENGINE_FILES:
        path = package / relative
        if not path.exists():
            continue
        for node in ast.walk(_tree(path)):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {b.id for b in node.bases if isinstance(b, ast.Name)}
            for statement in node.body:
                if isinstance(statement, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "name" for t in statement.targets
                ):
                    classes.add(node.name)
                    if isinstance(statement.value, ast.Constant) and isinstance(statement.value.value, str):
                        names.add(statement.value.value)
            if bases & classes:
                classes.add(node.name)
    return classes, names


def engine_comparisons(package: Path) -> list[str]:
    """Source lines outside ENGINE_FILES that branch on which engine runs: a comparison (==, !=, in, is, match
    case) against an engine's name as a literal (`== "deepspeed"`, `in ("fsdp", ...)`) or as a strategy's
    `.name` (`== DeepSpeedZero.name`, `distributed_strategy(a).name == ...`); `.startswith("deepspeed")`; a
    dict keyed by engine names looked up on the spot; `isinstance(x, DeepSpeedZero)`; accelerate's
    `DistributedType` / `distributed_type` / `*_plugin` engine attributes."""
    classes, names = strategy_classes(package)

    def literal(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value in names or bool(ENGINE_WORDS.search(node.value))
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(literal(e) for e in node.elts)
        return False

    def strategy_name(node: ast.AST) -> bool:
        if not (isinstance(node, ast.Attribute) and node.attr == "name"):
            return False
        # A class's name (`DeepSpeedZero.name`), or the running strategy's fetched to branch on it
        # (`distributed_strategy(accelerator).name == ...`). A strategy object's own `.name` compared with what
        # a checkpoint recorded (`writer != strategy.name`) checks for a mismatch, it does not pick an engine.
        owner = node.value
        if isinstance(owner, ast.Call):
            owner = owner.func
            if (owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")) == "distributed_strategy":
                return True
        return (owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")) in classes

    def strategy_class(node: ast.AST) -> bool:
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(strategy_class(e) for e in node.elts)
        return (isinstance(node, ast.Name) and node.id in classes) or (
            isinstance(node, ast.Attribute) and node.attr in classes
        )

    def why(node: ast.AST) -> str | None:
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(literal(o) or strategy_name(o) or strategy_class(o) for o in operands):
                return "compares against an engine's name"
        elif isinstance(node, ast.MatchValue) and literal(node.value):
            return "matches an engine's name"
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in ("startswith", "endswith") and any(
                literal(a) for a in node.args
            ):
                return f"{func.attr} an engine's name"
            if isinstance(func, ast.Attribute) and func.attr == "get" and isinstance(func.value, ast.Dict):
                if any(k is not None and literal(k) for k in func.value.keys):
                    return "looks up a dict keyed by engine names"
            if isinstance(func, ast.Name) and func.id in ("isinstance", "issubclass") and len(node.args) == 2:
                if strategy_class(node.args[1]):
                    return "tests a strategy's class"
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Dict):
            if any(k is not None and literal(k) for k in node.value.keys):
                return "looks up a dict keyed by engine names"
        elif isinstance(node, ast.Attribute) and node.attr in ENGINE_ATTRIBUTES:
            return f"reads {node.attr}"
        elif isinstance(node, ast.Name) and node.id in ENGINE_ATTRIBUTES:
            return f"uses {node.id}"
        elif isinstance(node, ast.ImportFrom) and any(a.name in ENGINE_ATTRIBUTES for a in node.names):
            return "imports an engine attribute"
        return None

    offenders = set()
    for path in modules_of(package).values():
        if path.relative_to(package).as_posix() in ENGINE_FILES:
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(_tree(path)):
            reason = why(node)
            if reason:
                line = node.lineno
                offenders.add((str(path), line, f"{_where(package, path, line)} {reason}: {lines[line - 1].strip()}"))
    return [text for _, _, text in sorted(offenders)]


# ---------------------------------------------------------------------------------------------------------------
# Rule: models/ is the bottom layer


def upward_imports(package: Path, layer: str = "models", above: tuple[str, ...] = ABOVE_MODELS) -> list[str]:
    """Every import statement in `layer` of a module in the layers `above` it."""
    modules = modules_of(package)

    def inside(module: str, names: tuple[str, ...]) -> bool:
        return any(module == f"{package.name}.{n}" or module.startswith(f"{package.name}.{n}.") for n in names)

    return [
        f"{_where(package, modules[importer], line)} {importer} imports {target}"
        for importer, target, line in imports_of(package)
        if inside(importer, (layer,)) and inside(target, above)
    ]


# ---------------------------------------------------------------------------------------------------------------
# The rules on the package


def test_no_function_is_longer_than_100_lines():
    offenders = long_functions(PACKAGE)
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines (longest first):\n  " + "\n  ".join(offenders)


def test_the_training_loop_is_at_most_80_lines():
    relative, name = TRAIN_LOOP
    length = length_of(PACKAGE / relative, name)
    assert length is not None, f"no top-level function {name} in happyhorse_train/{relative}"
    assert length <= MAX_TRAIN_LINES, f"happyhorse_train/{relative} {name}: {length} lines (at most {MAX_TRAIN_LINES})"


def test_no_import_cycle():
    cycle = import_cycle(PACKAGE)
    assert cycle is None, describe_cycle(PACKAGE, cycle)


def test_only_the_distributed_strategies_compare_engine_names():
    offenders = engine_comparisons(PACKAGE)
    allowed = ", ".join(sorted(ENGINE_FILES))
    assert not offenders, f"engine-name branches outside {allowed}:\n  " + "\n  ".join(offenders)


def test_models_import_nothing_from_the_layers_above():
    offenders = upward_imports(PACKAGE)
    assert not offenders, "models/ imports from a layer above it:\n  " + "\n  ".join(offenders)


# ---------------------------------------------------------------------------------------------------------------
# The checks themselves: each catches a planted violation and passes the same package without it


def _write(root: Path, files: dict[str, str]) -> Path:
    package = root / "pkg"
    for relative, text in files.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


_CLEAN = {
    "__init__.py": "",
    "errors.py": "class UserInputError(Exception):\n    pass\n",
    "models/__init__.py": "",
    "models/spec.py": "from pkg.errors import UserInputError\nfrom pkg.models import layout\n",
    "models/layout.py": "import pkg.errors\n",
    "training/__init__.py": "",
    "training/distributed.py": (
        "class Replicated:\n    name = 'replicated'\n\n\nclass DeepSpeedZero(Replicated):\n    name = 'deepspeed'\n\n\n"
        "class Sharded(DeepSpeedZero):\n    pass\n\n\n"
        "def pick(engine):\n    return DeepSpeedZero if engine == 'deepspeed' else Replicated\n"
    ),
    "training/checkpoint.py": (
        "from pkg.training.distributed import DeepSpeedZero, Replicated\n"
        "from . import distributed\n\n\n"
        "def save(strategy, folder):\n"
        "    strategy.save_engine_state(folder / 'deepspeed')  # a folder name, not a comparison\n"
        "    return f'written by {strategy.name}'\n"
    ),
    "training/trainer.py": (
        "import pkg.training.checkpoint\n\n\n@decorator\n@another\ndef train(cfg):\n"
        + "    x = 1\n" * 78
        + "    return x\n"
    ),
}


def test_the_clean_synthetic_package_passes_every_check(tmp_path):
    package = _write(tmp_path, _CLEAN)
    assert long_functions(package) == []
    assert length_of(package / "training/trainer.py", "train") == 80
    assert import_cycle(package) is None
    assert engine_comparisons(package) == []
    assert upward_imports(package) == []
    assert strategy_classes(package) == ({"Replicated", "DeepSpeedZero", "Sharded"}, {"replicated", "deepspeed"})


def test_a_long_function_and_a_long_training_loop_are_caught(tmp_path):
    long_method = "class A:\n    @property\n    def f(self):\n" + "        y = 1\n" * 99 + "        return y\n"
    package = _write(tmp_path, {**_CLEAN, "models/big.py": long_method})
    package_train = _CLEAN["training/trainer.py"].replace("    return x\n", "    x = 2\n    return x\n")
    _write(tmp_path, {"training/trainer.py": package_train})
    assert long_functions(package) == ["pkg/models/big.py:3 A.f: 101 lines"]
    assert length_of(package / "training/trainer.py", "train") == 81


def test_an_import_cycle_is_caught_through_functions_relative_imports_and_submodule_names(tmp_path):
    files = {
        **_CLEAN,
        "data/__init__.py": "",
        "data/a.py": "def f():\n    from pkg.data import b\n",  # inside a function, `from package import module`
        "data/b.py": "from .c import thing\n",  # relative
        "data/c.py": "import pkg.data.a\n",
    }
    package = _write(tmp_path, files)
    assert import_cycle(package) == ["pkg.data.a", "pkg.data.b", "pkg.data.c", "pkg.data.a"]
    message = describe_cycle(package, import_cycle(package))
    assert "pkg.data.a (pkg/data/a.py:2) imports pkg.data.b" in message


def test_importing_a_submodule_is_no_edge_to_its_package_init(tmp_path):
    files = {**_CLEAN, "data/__init__.py": "from pkg.data.a import f\n", "data/a.py": "import pkg.data.b\n",
             "data/b.py": "from pkg.data.a import f\n"}  # a <-> b is a cycle; __init__ -> a is not part of one
    package = _write(tmp_path, files)
    assert import_cycle(package) == ["pkg.data.a", "pkg.data.b", "pkg.data.a"]
    files["data/b.py"] = "from pkg import data\nfrom pkg.data import f\n"  # names the __init__: a real edge
    _write(tmp_path, files)
    assert import_cycle(package) == ["pkg.data", "pkg.data.a", "pkg.data.b", "pkg.data"]


def test_engine_name_branches_are_caught_outside_the_strategies(tmp_path):
    planted = (
        "from accelerate import DistributedType\n"
        "from pkg.training.distributed import DeepSpeedZero, Sharded, distributed_strategy\n\n\n"
        "def f(engine, accelerator, config, strategy):\n"
        "    if engine == DeepSpeedZero.name:\n"  # 6
        "        pass\n"
        "    if engine == 'deepspeed':\n"  # 8
        "        pass\n"
        "    if config in ('fsdp', 'multi_gpu'):\n"  # 10
        "        pass\n"
        "    if config.startswith('deepspeed'):\n"  # 12
        "        pass\n"
        "    if distributed_strategy(accelerator).name != 'x':\n"  # 14
        "        pass\n"
        "    if accelerator.distributed_type == DistributedType.FSDP:\n"  # 16
        "        pass\n"
        "    n = {'fsdp': 4, 'deepspeed_zero3': 2}.get(config, 0)\n"  # 18
        "    if isinstance(strategy, Sharded):\n"  # 19
        "        pass\n"
        "    if strategy.name == 'replicated':\n"  # 21: against a literal
        "        pass\n"
        "    match config:\n"
        "        case 'FSDP':\n"  # 24
        "            pass\n"
        "    save(folder / 'deepspeed')\n"  # 26: a folder name, fine
        "    if config == 'zero':\n"  # 27: not an engine
        "        pass\n"
        "    if writer != strategy.name:\n"  # 29: a mismatch check, fine
        "        pass\n"
        "    if Sharded().name == engine:\n"  # 31
        "        pass\n"
    )
    package = _write(tmp_path, {**_CLEAN, "training/checkpoint.py": planted})
    lines = sorted({int(o.split(":")[1].split()[0]) for o in engine_comparisons(package)})
    assert lines == [1, 6, 8, 10, 12, 14, 16, 18, 19, 21, 24, 31]


def test_an_upward_import_from_models_is_caught(tmp_path):
    files = {**_CLEAN, "models/spec.py": "def f():\n    from pkg.training import checkpoint\n\n\ndef g():\n"
             "    from pkg.training.checkpoint import save\n",
             "models/layout.py": "import pkg.data\n", "data/__init__.py": ""}
    package = _write(tmp_path, files)
    assert upward_imports(package) == [
        "pkg/models/layout.py:1 pkg.models.layout imports pkg.data",
        "pkg/models/spec.py:2 pkg.models.spec imports pkg.training.checkpoint",
        "pkg/models/spec.py:6 pkg.models.spec imports pkg.training.checkpoint",
    ]
