"""The package's shape: what ``import ema_kit`` loads, and which way its parts import one another."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ema_kit"
# Each part may import the parts before it, never one after it: core <- training <- kaggle <- examples.
PARTS = ["core", "training", "kaggle", "examples"]


def _part(module: str) -> str:
    """``ema_kit.training.loop`` -> ``training``; a module directly in ema_kit/ is the core."""
    names = module.split(".")
    return names[1] if len(names) > 2 and names[1] in PARTS else "core"


def _imports(path: Path) -> list[tuple[str, str, int]]:
    """``(module, name, line)`` for each ``from X import name`` in ``path``, X resolved to a full module."""
    module = "ema_kit." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("ema_kit")):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            source = f"{base}.{node.module}" if node.level and node.module else node.module or base
            found += [(source, alias.name, node.lineno) for alias in node.names]
    return found


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_import_ema_kit_loads_torch_but_not_pandas_or_matplotlib():
    code = "import sys, ema_kit; print(sorted(m for m in ('pandas', 'matplotlib') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_training_names_load_from_the_top_package_on_first_use():
    code = "import sys, ema_kit; from ema_kit import fit, plot_history; print('pandas' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"


def test_a_misspelled_top_level_name_is_an_attribute_error():
    import ema_kit

    with pytest.raises(AttributeError, match="fitt"):
        ema_kit.fitt  # noqa: B018


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_one_way_core_training_kaggle_examples(path):
    module = "ema_kit." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    if path.parent == PACKAGE and path.name in ("__init__.py", "__main__.py"):
        return  # the package's front door serves every part
    own = PARTS.index(_part(module))
    later = [(source, line) for source, _, line in _imports(path) if PARTS.index(_part(source)) > own]
    assert not later, f"{module} imports from a later part: {later}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_another_modules_private_names(path):
    private = [
        (source, name, line)
        for source, name, line in _imports(path)
        if name.startswith("_") and not (PACKAGE.parent / (source.replace(".", "/") + f"/{name}.py")).exists()
    ]
    assert not private, f"{path.relative_to(PACKAGE)} imports private names: {private}"
