"""The package's layout: no import circles among its modules (lazy, function-level imports
counted too), and a top level that holds a dozen modules at most beside its packages."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `converters/` installs as caffe_compat.converters.
PACKAGES = {"caffe_compat": ROOT / "caffe_compat", "caffe_compat.converters": ROOT / "converters"}
MAX_TOP_LEVEL_MODULES = 12


def _modules(packages):
    """{dotted name: path} of every module; a package is named by its __init__.py."""
    found = {}
    for prefix, folder in packages.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


def _imported(name: str, path: Path, modules) -> set:
    """The project's modules that `name` imports anywhere in its file, function bodies
    included. An import of one of its own enclosing packages is left out: Python runs
    every enclosing package before the module, so that import never starts one."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1] + [node.module or ""]) if node.level else node.module
            base = base.strip(".")
            # `from package import module` imports that module; `from module import name`, the module.
            targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names)
    return {target for target in targets
            if target in modules and target != name and not name.startswith(target + ".")}


def import_graph(packages=PACKAGES):
    modules = _modules(packages)
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def find_cycle(graph):
    """One import circle as [a, b, ..., a], or None."""
    state = {}  # name -> "open" while on the current path, "done" once all it reaches is explored
    path = []

    def visit(name):
        state[name] = "open"
        path.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[name] = "done"
        path.pop()
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name)
            if cycle:
                return cycle
    return None


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_top_level_holds_a_dozen_modules_at_most():
    top_level = sorted(path.name for path in PACKAGES["caffe_compat"].glob("*.py"))
    assert len(top_level) <= MAX_TOP_LEVEL_MODULES, f"{len(top_level)} modules at the top level: {top_level}"


def test_a_lazy_import_closing_a_circle_is_found(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..a import g\n")
    assert find_cycle(import_graph({"pkg": package})) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    (package / "sub" / "b.py").write_text("from .. import __version__\n")  # its own package: no circle
    assert find_cycle(import_graph({"pkg": package})) is None
