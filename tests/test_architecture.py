"""The package's structure: data flows one way (no import cycle, lazy imports included) and no
module reaches into another's private names."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "imperative_ptq"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (never imported at run
    time)."""
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            test = getattr(child, "test", None)
            if isinstance(child, ast.If) and (
                isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
                or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
            ):
                pending.extend(child.orelse)
                continue
            pending.append(child)


def _imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(imported package module, imported names) for every ``from .x import ...`` in ``path``,
    at any depth (function-level imports count: they only hide a cycle)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            found.append((target, [alias.name for alias in node.names]))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, names in _imports(path):
            for imported in names:  # ``from . import x`` imports a module
                if f"{target}.{imported}" in modules:
                    graph[name].add(f"{target}.{imported}")
            if target in modules and not target.endswith("imperative_ptq"):
                graph[name].add(target)
    return graph


def test_no_import_cycle() -> None:
    graph = _graph()
    # Package __init__ files only re-export: an edge into one is not a dependency on its siblings.
    inits = {name for name in graph if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()}
    state: dict[str, int] = {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name] - inits):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, stack + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_private_name_imported_across_modules() -> None:
    offenders = [
        f"{_module_name(path)} imports {name} from {target}"
        for path in PACKAGE.rglob("*.py")
        for target, names in _imports(path)
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not offenders, offenders


def test_levels_have_one_home() -> None:
    """``2**(bits-1) - 1`` / ``2**bits - 1`` live in quantizers/qparams.py (a 1-bit symmetric
    grid got 0 levels where one copy lacked the guard)."""
    import re

    from imperative_ptq.quant_layers import fake_quantize_symmetric
    from imperative_ptq.quantizers.qparams import symmetric_levels

    # 2**(bits-1) - 1 and 2**bits - 1 (TensorRT's 2**(bits-1) is another rule, not these).
    pattern = re.compile(r"2 ?\*\* ?(\(\w*bits\w* ?- ?1\)|[\w.]*bits\w*) ?- ?1\b")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "qparams.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if pattern.search(code) and "``" not in code:
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, offenders
    assert symmetric_levels(1) == 1
    import paddle

    one_bit = fake_quantize_symmetric(paddle.to_tensor([0.3, -0.7]), paddle.to_tensor([1.0]), 1)
    assert one_bit.numpy().tolist() == [0.0, -1.0]  # was a division by zero (0 levels)


def test_state_on_a_model_is_touched_only_by_its_owner() -> None:
    """The attributes a calibration session and a converted model keep on the user's layers
    are named only in session.py and converted.py; every other module, tests included, asks
    through their functions (``hooked_states``, ``calibrating_session``, ``converted_table``)."""
    import re

    owners = {"session.py", "converted.py"}
    pattern = re.compile(r"""\b_ptq_\w+""")
    offenders = []
    for root in (PACKAGE, pathlib.Path(__file__).parent):
        for path in root.rglob("*.py"):
            if path.name in owners or path.name == "test_architecture.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, offenders
