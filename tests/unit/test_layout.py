"""The package map in docs/DESIGN.md is the code's: every package and top-level module is on
it, floors are respected, no module imports in a circle — lazy imports, ``TYPE_CHECKING``
imports and a package's lazy re-exports all counted — every subpackage has a lazy face, and
bench/ imports nothing from tests/."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "agiasi"


def _module_of(path: Path) -> str:
    """``train/loop.py`` → ``train.loop``; ``train/__init__.py`` → ``train``."""
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


MODULES = {_module_of(p): p for p in SRC.rglob("*.py")}


def _lazy_exports(path: Path) -> dict[str, str]:
    """A package ``__init__``'s ``_EXPORTS`` (name → submodule), {} where it has none."""
    from agiasi._lazy import lazy_names

    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_EXPORTS":
            assert isinstance(node.value, ast.Call) and node.value.func.id == "lazy_names"
            return lazy_names(ast.literal_eval(node.value.args[0]))
    return {}


def _edges(path: Path) -> set[str]:
    """Every agiasi module a file imports, anywhere in it (functions, ``TYPE_CHECKING``); a
    package's lazy re-exports are edges from the package to the modules they name."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        targets: list[tuple[str, list[str]]] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [(node.module, [a.name for a in node.names])]
        elif isinstance(node, ast.Import):
            targets = [(a.name, []) for a in node.names]
        for module, names in targets:
            if module != "agiasi" and not module.startswith("agiasi."):
                continue
            base = module.removeprefix("agiasi").removeprefix(".")
            for name in names or [""]:
                sub = f"{base}.{name}" if base else name
                found.add(sub if sub in MODULES else base or "__init__")
    if path.name == "__init__.py":
        pkg = _module_of(path)
        found |= {f"{pkg}.{m}" for m in _lazy_exports(path).values()}
    return found - {"", _module_of(path)}


def _graph() -> dict[str, set[str]]:
    return {m: {d if d in MODULES else "__init__" for d in _edges(p)} for m, p in MODULES.items()}


def _top(module: str) -> str:
    return module.split(".")[0] if module else "__init__"


def _floors() -> dict[str, int]:
    text = (ROOT / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    block = text.split("## 0. The package map", 1)[1].split("```", 2)[1]
    floors = {}
    for line in block.strip().splitlines():
        m = re.match(r"floor (\d+)\s+\S+(?: \S+)?\s{2,}(.*)", line)
        assert m, line
        for mod in m.group(2).split():
            mod = mod.removesuffix("/")
            assert mod not in floors, f"{mod} is on two floors"
            floors[mod] = int(m.group(1))
    return floors


def test_every_package_and_module_is_on_the_map_and_imports_only_downwards():
    graph, floors = _graph(), _floors()
    tops = {_top(m) for m in graph} | {"__init__"}
    assert tops == set(floors), tops ^ set(floors)
    upward = sorted(
        f"{m} (floor {floors[_top(m)]}) imports {d} (floor {floors[_top(d)]})"
        for m, deps in graph.items()
        for d in deps
        if floors[_top(d)] > floors[_top(m)]
    )
    assert not upward, upward


def test_no_module_imports_in_a_circle():
    graph = _graph()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for d in graph.get(todo.pop(), ()):
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    assert [m for m in graph if m in reach(m)] == []


def test_every_subpackage_has_a_lazy_face_that_names_real_definitions():
    """PEP 562 re-exports only: importing a package runs no submodule (``agiasi --help`` stays
    fast), and each exported name is defined in the module the face names."""
    packages = sorted(p.parent for p in SRC.glob("*/__init__.py"))
    assert {p.name for p in packages} >= {"model", "checkpoint", "data", "train", "gguf", "eval",
                                          "export", "testing"}  # fmt: skip
    for pkg in packages:
        init = pkg / "__init__.py"
        tree = ast.parse(init.read_text(encoding="utf-8"))
        runtime = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert [ast.unparse(n) for n in runtime] == [
            "from agiasi._lazy import lazy_exports, lazy_names"
        ], pkg.name
        exports = _lazy_exports(init)
        assert exports, pkg.name
        for name, module in exports.items():
            defs = ast.parse((pkg / f"{module}.py").read_text(encoding="utf-8")).body
            defined = {
                getattr(n, "name", None) or getattr(getattr(n, "target", None), "id", None)
                for n in defs
            } | {t.id for n in defs if isinstance(n, ast.Assign) for t in n.targets
                 if isinstance(t, ast.Name)}  # fmt: skip
            assert name in defined, f"agiasi.{pkg.name}.{name} is not defined in {module}.py"


def test_no_submodule_shadows_what_its_package_exports():
    for init in SRC.glob("*/__init__.py"):
        subs = {p.stem for p in init.parent.glob("*.py")}
        assert not subs & set(_lazy_exports(init)), init.parent.name


def test_bench_and_scripts_import_nothing_from_tests():
    offenders = [
        f.name
        for d in ("bench", "scripts")
        for f in (ROOT / d).rglob("*.py")
        if "from tests" in f.read_text(encoding="utf-8")
        or "import tests" in f.read_text(encoding="utf-8")
    ]
    assert offenders == []
