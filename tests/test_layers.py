"""The layers of the package (docs/layers.md): which part may import which, read from the source with `ast`, so that
a forbidden import fails here by name instead of being noticed in review."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mini_safediff"
SCRIPTS = {path.stem for path in ROOT.glob("*.py")}  # train, attack, evaluate
GROUND = {"io", "lines", "distributed", "argtypes"}
# part -> the parts of the package it may import (besides itself). A part is a folder or a top-level module.
ALLOWED = {
    **{name: set() for name in GROUND},
    "models": GROUND,
    "training": GROUND | {"models"},
    "methods": GROUND | {"models", "training"},
    "attacks": GROUND | {"models", "training"},
    "images": GROUND,
    "evaluation": GROUND | {"images", "models", "methods"},  # methods: sampling-time defences (SLD)
    "miniature": GROUND | {"images", "models", "training", "methods", "evaluation"},
    "cli": GROUND | {"models", "methods", "miniature"},  # the scripts' shared options: presets and SLD settings
    "sample": GROUND | {"cli", "images", "models", "methods", "evaluation"},  # evaluation: the broken-model check
    "__init__": {"models"},
}


def part_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file (or in `source`, read as that file)."""
    module = list(path.relative_to(ROOT).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from ..io import x: node.level - 1 packages up from the file's own
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            names += [(node.lineno, base if node.module else f"{base}.{alias.name}") for alias in node.names]
    return names


def package_parts(name: str) -> str | None:
    """The part of the package a module name points into (None: not the package)."""
    parts = name.split(".")
    if parts[0] != "mini_safediff" or len(parts) == 1:
        return None
    return parts[1]


def violations(files, sources: dict | None = None) -> list[str]:
    found = []
    for path in files:
        own = part_of(path)
        for line, name in imported(path, (sources or {}).get(path)):
            target = package_parts(name)
            where = f"{path.relative_to(ROOT)}:{line} imports {name}"
            if name.split(".")[0] in SCRIPTS:
                found.append(f"{where}: the package never imports a script")
            elif target is not None and target != own and target not in ALLOWED[own]:
                found.append(f"{where}: {own} may import only {', '.join(sorted(ALLOWED[own])) or 'nothing of the package'}")
    return found


def package_files():
    return sorted(PACKAGE.rglob("*.py"))


def test_every_part_of_the_package_has_a_rule():
    assert {part_of(path) for path in package_files()} == set(ALLOWED)


def test_the_layers_point_one_way():
    assert violations(package_files()) == []


def test_a_model_that_imports_a_method_is_caught():
    """The rule bites: models/pipeline.py as it would read with SLD imported back into it."""
    pipeline = PACKAGE / "models" / "pipeline.py"
    source = pipeline.read_text().replace("from ..io import", "from ..methods.sld import sld_config\nfrom ..io import")
    found = violations([pipeline], {pipeline: source})
    assert len(found) == 1 and "models/pipeline.py" in found[0] and "mini_safediff.methods.sld" in found[0]


@pytest.mark.parametrize("path", package_files(), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_no_module_is_imported_by_string_or_by_path(path):
    """Every edge of the import graph is an import statement a reader (and this test) can follow."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            assert node.id != "__import__", f"{path}:{node.lineno}: __import__"
        if isinstance(node, ast.Attribute):
            assert node.attr != "import_module", f"{path}:{node.lineno}: importlib.import_module"
            assert not (node.attr == "path" and isinstance(node.value, ast.Name) and node.value.id == "sys"), \
                f"{path}:{node.lineno}: sys.path"


def test_nothing_outside_models_calls_a_private_member_of_the_pipeline():
    pipeline = ast.parse((PACKAGE / "models" / "pipeline.py").read_text())
    private = {node.name for node in ast.walk(pipeline) if isinstance(node, ast.FunctionDef)
               and node.name.startswith("_") and not node.name.startswith("__")}
    assert private  # the rule has something to guard
    outside = [path for path in [*package_files(), *ROOT.glob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
                                 *(ROOT / "tests").glob("*.py")] if "models" not in path.relative_to(ROOT).parts[:2]]
    for path in outside:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                assert node.attr not in private, f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr} is private"


def test_train_loop_names_no_method():
    """train.py's loop asks the method for its batch and loss: no method's name or module inside train()."""
    tree = ast.parse((ROOT / "train.py").read_text())
    train = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "train")
    names = {node.id for node in ast.walk(train) if isinstance(node, ast.Name)} | {
        node.attr for node in ast.walk(train) if isinstance(node, ast.Attribute)}
    strings = {node.value for node in ast.walk(train) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    from mini_safediff.methods.registry import METHODS
    method_words = {"esd", "immunize", "lt", "ng", "naive", "sld", "centres", "concept", "contrastive",
                    *METHODS, *(method.__name__ for method in METHODS.values())}
    assert not names & method_words
    assert not {word for text in strings for word in text.replace("-", " ").split() if word in method_words}
    imports = {name for _, name in imported(ROOT / "train.py")}
    assert not {name for name in imports if name.startswith("mini_safediff.methods.")} - {
        "mini_safediff.methods.registry"}


def test_the_readme_layout_and_the_layers_page_name_every_folder_and_file():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):readme.index("## Documentation")]
    layers = (ROOT / "docs" / "layers.md").read_text()
    folders = sorted({path.parent for path in package_files()} - {PACKAGE})
    for folder in folders:
        assert f"`mini_safediff/{folder.name}/`" in layout, f"README's layout table: no row for {folder.name}/"
        assert f"`{folder.name}/`" in layers, f"docs/layers.md: no row for {folder.name}/"
    for path in package_files():
        if path.name != "__init__.py":
            assert f"`{path.name}`" in layout, f"README's layout table does not name {path.relative_to(ROOT)}"
    for path in PACKAGE.glob("*.py"):
        if path.name not in ("__init__.py",):
            assert f"`{path.name}`" in layers, f"docs/layers.md does not name {path.name}"
