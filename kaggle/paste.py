"""The paste file: ``ModelEMA``, ``evaluate`` and ``LiveLog`` as one notebook cell, cut from the package.

``paste_file(sources, version)`` follows the names these need through the package, definition by
definition (a function, a class, a constant), and writes what it reached as one flat module: the
package's own imports between its modules dropped (``_checks.check_int`` becomes ``_check_int``), the
imports of other libraries gathered at the top, docstrings cut to their first paragraph. Every name it
defines besides the roots (and ``LeftOut``) gains a leading underscore, so that the names of the notebook
it is pasted into cannot replace its parts. It works from the modules' syntax trees, not from line
numbers, so a change to the package shows up in the next build; what it cannot flatten (two kept
definitions of one name, a renamed internal import, an internal import inside a function) stops the
build with the name and the place.

To stay one readable cell, it leaves out the features ``LEFT_OUT`` names: the definition where each
one's code starts becomes a one-line stub of the same name that raises ``LeftOut``, naming the feature
and the fix, and what only that definition needed is not followed. A stub sits where its feature is first
asked for (building the EMA, loading its state, saving), so everything else runs the package's own code.
Past those refusals some conditions are False for every EMA the cell builds (``KNOWN_FALSE``: the model
is not sharded): the branches they guard, and what follows a return or a stub's call, are left out too.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
from collections.abc import Iterable

# What the paste file defines for the user: (module, name). Everything they use comes along.
ROOTS = (
    ("ema_kit.ema", "ModelEMA"),
    ("ema_kit.ema", "decay_from_half_life"),
    ("ema_kit.training.evaluate", "evaluate"),
    ("ema_kit.training.evaluate", "whole_set"),
    ("ema_kit.training.livelog", "LiveLog"),
    ("ema_kit.training.plot", "plot_history"),
)
# The features the paste cell leaves out, each with the definitions (module, name or Class.method) where
# its code starts: reached only when a user asks for the feature, they become stubs that refuse it.
LEFT_OUT = {
    "an EMA of a model sharded by FSDP2 (fully_shard)": [
        ("ema_kit._shadows", "_check_shardable"),  # Shadows.__init__, as soon as the model is sharded
    ],
    'dtype="bfloat16-stochastic" (bfloat16 shadows with stochastic rounding)': [
        ("ema_kit._lowp", "new_generator"),  # Shadows binding stochastic shadows: building the EMA
        ("ema_kit._lowp", "lerp_stochastic_"),
        ("ema_kit._lowp", "reseeded"),
    ],
    "resuming an EMA (ModelEMA.state_dict, load_state_dict)": [
        ("ema_kit.ema", "ModelEMA.state_dict"),
        ("ema_kit.ema", "ModelEMA.load_state_dict"),
    ],
    "ModelEMA.recompute_bn (BatchNorm statistics measured afresh)": [
        ("ema_kit.ema", "ModelEMA.recompute_bn"),
    ],
    'an EMA kept on another device than the model (device="cpu" for a GPU model)': [
        ("ema_kit._shadows", "_Stage"),  # Shadows planning its update: building the EMA, or moving the model
    ],
    "saving the EMA weights as .safetensors": [
        ("ema_kit.files", "_import_safetensors"),
        ("ema_kit.files", "_crc32"),
    ],
    "LiveLog as a callback of fit": [
        ("ema_kit.training.livelog", f"LiveLog.{hook}")
        for hook in ("on_fit_start", "on_epoch_start", "on_batch_end", "on_row_added", "on_fit_end")
    ],
}
# Conditions False for every EMA the paste cell builds, by module: {condition as the package writes it: why}.
# The code they guard is left out: `if C:` keeps only its else branch, `x if C else y` keeps y (`not C`,
# `C and ...` follow), a loop `for x in C:` (an empty list) goes, and so does what follows a return there.
# A branch that calls a stub stays: it is where the cell refuses the feature (and what follows a stub's call
# in its block is left out: the stub raises).
_SHARDED = "a sharded model is refused where Shadows.__init__ finds it (the _check_shardable stub)"
_STOCHASTIC = "stochastic shadows are refused as the EMA is built (the _new_generator stub, binding them)"
_SPEED_ONLY = (
    "speed only: small CPU tensors are blended by the plain foreach ops, not gathered into one flat tensor "
    "(the same values bit for bit; a CPU-only speed path, and Kaggle trains on GPUs)"
)
_GATHERED = "no group is gathered once _small(source) is False"
KNOWN_FALSE = {
    "ema_kit._shadows": {
        "self.sharded": _SHARDED,
        "self.stochastic": _STOCHASTIC,
        "_small(source)": _SPEED_ONLY,
        "kind.startswith('gather')": _GATHERED,
        "self._gathers": _GATHERED,
    },
    "ema_kit.ema": {
        "self.sharded": _SHARDED,
        "self._shadows.sharded": _SHARDED,
        "self._shadows.stochastic": _STOCHASTIC,
    },
    "ema_kit.training.livelog": {
        "self._state is not None": "only fit's callbacks set it (on_fit_start), and those are left out",
    },
}
# What the stubs call, written once into the paste file before the package's definitions.
REFUSAL = '''\
class LeftOut(NotImplementedError):
    """A feature of ema_kit that this paste cell leaves out; the package (its wheel) has it."""

def _left_out(feature: str):
    """A stand-in for the definition where ``feature``'s code starts: it refuses, naming the fix."""

    def refuse(*args, **kwargs):
        raise LeftOut(
            f"{feature} is left out of the ema_kit paste cell, to keep it one readable cell. For it, attach "
            "the ema-kit dataset and import its wheel (docs/kaggle.md), then `from ema_kit import ...` in "
            "place of the pasted cell."
        )

    return refuse
'''
HEADER = """\
# ema_kit_paste.py: ema_kit {version}'s ModelEMA, evaluate and LiveLog in one cell ({count} definitions
# from {modules} modules). Paste this whole file into a notebook cell and run it; then use ModelEMA,
# LiveLog, evaluate (whole_set for its metrics), plot_history and decay_from_half_life as the README
# shows, without the `from ema_kit import ...` line. Needs torch, numpy, pandas and matplotlib (a Kaggle
# image has them).
{left_out}# For those, and for fit, MultiEMA, PostHocEMA and the Kaggle helpers, attach the ema-kit dataset
# and import its wheel (docs/kaggle.md).
{known_false}# GENERATED by kaggle/build.py from ema_kit/: do not edit; change ema_kit/, then run
#     python kaggle/build.py
# Every name it defines or imports starts with _, besides those above, LeftOut and {shared}, so
# that the notebook's names (accuracy = ..., from time import time) and the cell's cannot replace each
# other. Its `from __future__ import annotations` holds in the notebook's later cells too, as any cell's
# would. Annotations stay strings and may name classes of ema_kit that this cell leaves out (FitState); a
# renamed name may push a line past 110 characters:
# ruff: noqa: F821, E501
"""


LINE_LENGTH = 110  # pyproject.toml's [tool.ruff]
# Imports that keep their names in the cell: a notebook gives these names to the same modules.
SHARED_IMPORTS = {"torch", "nn", "F", "np", "pd"}


class PasteError(Exception):
    """The package holds something the paste file cannot flatten; the message names it."""


def module_name(path: str) -> str:
    """``"ema_kit/training/plot.py"`` -> ``"ema_kit.training.plot"``."""
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


class _Module:
    """One module's top-level statements, what each defines and reads, and where its names come from."""

    def __init__(self, name: str, path: str, source: str, is_package: bool):
        self.name, self.path, self.source = name, path, source
        self.lines = source.splitlines()
        self.tree = ast.parse(source, path)
        self.package = name if is_package else name.rpartition(".")[0]
        # name -> ("external", the import line) | ("from", module, name): `from .module import name`
        self.imports: dict[str, tuple] = {}
        self.defined: dict[str, int] = {}  # name -> index of the statement that defines it
        self.statements: list[ast.stmt] = []
        for node in self.tree.body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                self._add_import(node)
            elif not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):  # docstring
                index = len(self.statements)
                self.statements.append(node)
                for name in _defines(node):
                    self.defined[name] = index

    def _add_import(self, node: ast.Import | ast.ImportFrom) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ema_kit":
                    raise PasteError(
                        f"{self.path}:{node.lineno}: write `from . import ...`, not `import {alias.name}`."
                    )
                line = f"import {alias.name}" + (f" as {alias.asname}" if alias.asname else "")
                self.imports[alias.asname or alias.name.split(".")[0]] = ("external", line)
            return
        if node.module == "__future__":
            return
        if node.level == 0 and (node.module or "").split(".")[0] != "ema_kit":
            for alias in node.names:
                line = f"from {node.module} import {alias.name}"
                line += f" as {alias.asname}" if alias.asname else ""
                self.imports[alias.asname or alias.name] = ("external", line)
            return
        base = self._absolute(node)
        for alias in node.names:
            if alias.asname and alias.asname != alias.name:
                raise PasteError(
                    f"{self.path}:{node.lineno}: `{alias.name} as {alias.asname}`: the paste file keeps one "
                    f"name per definition; import it under its own name."
                )
            self.imports[alias.name] = ("from", base, alias.name)

    def _absolute(self, node: ast.ImportFrom) -> str:
        if node.level == 0:
            return node.module
        parts = self.package.split(".")
        parts = parts[: len(parts) - (node.level - 1)]
        return ".".join(parts + ([node.module] if node.module else []))

    def segment(self, index: int) -> tuple[int, int]:
        """The 0-based line range of statement ``index``, with its decorators and the comments right above."""
        node = self.statements[index]
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        while start > 0 and self.lines[start - 1].lstrip().startswith("#"):
            start -= 1
        return start, node.end_lineno


def _defines(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return [node.name]
    targets = []
    for child in ast.walk(node):
        if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
            targets.append(child.id)
        if isinstance(child, ast.FunctionDef | ast.ClassDef | ast.Lambda) and child is not node:
            break
    return targets


def _walk(node: ast.AST, skip=()) -> Iterable[ast.AST]:
    """``ast.walk`` that does not enter the nodes in ``skip`` (a class's methods)."""
    todo = [node]
    while todo:
        current = todo.pop()
        yield current
        todo.extend(child for child in ast.iter_child_nodes(current) if child not in skip)


def _annotations(node: ast.AST, skip) -> list[ast.AST]:
    found = []
    for child in _walk(node, set(skip)):
        if isinstance(child, ast.arg) and child.annotation is not None:
            found.append(child.annotation)
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) and child.returns is not None:
            found.append(child.returns)
        elif isinstance(child, ast.AnnAssign):
            found.append(child.annotation)
    return found


def _methods(node: ast.stmt) -> list[ast.FunctionDef]:
    if not isinstance(node, ast.ClassDef):
        return []
    return [child for child in node.body if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)]


def _reads(node: ast.AST, skip=()) -> tuple[list[ast.AST], set[str]]:
    """The names a piece of code reads, those in annotations apart, and the attribute names (and identifier
    strings) it mentions."""
    names, attributes = [], set()
    in_annotations = {id(n) for a in _annotations(node, skip) for n in ast.walk(a)}
    for child in _walk(node, set(skip)):
        if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Load):
            names.append((child, id(child) in in_annotations))
        elif isinstance(child, ast.Attribute):
            attributes.add(child.attr)
            if isinstance(child.value, ast.Name):
                names.append((child, id(child) in in_annotations))
        elif isinstance(child, ast.Constant) and isinstance(child.value, str) and child.value.isidentifier():
            attributes.add(child.value)  # getattr(obj, "name") and hook tables
        elif isinstance(child, ast.ImportFrom) and (child.level or child.module.startswith("ema_kit")):
            raise PasteError(f"line {child.lineno}: an import of ema_kit in a function cannot be flattened.")
    return names, attributes


def paste_file(
    sources: dict[str, str],
    version: str,
    roots: Iterable[tuple[str, str]] = ROOTS,
    left_out: dict[str, list[tuple[str, str]]] = LEFT_OUT,
    known_false: dict[str, dict[str, str]] = KNOWN_FALSE,
) -> str:
    """The text of ema_kit_paste.py for the package ``sources`` ({"ema_kit/ema.py": source, ...}).

    It keeps what ``roots`` need (``_Reach`` says what that is) as stubs where ``left_out`` lists a place
    ({feature: [(module, name or "Class.method")]}), and drops what ``known_false`` rules out.

    Example:
        >>> package = {"ema_kit/__init__.py": "", "ema_kit/a.py": "import math\\nX = math.pi\\nY = 2\\n",
        ...            "ema_kit/b.py": "from .a import X\\n\\ndef f():\\n    return X\\n"}
        >>> text = paste_file(package, "0.0", roots=[("ema_kit.b", "f")], left_out={}, known_false={})
        >>> print(text[text.index("\\nfrom __future__") + 1 :])
        from __future__ import annotations
        <BLANKLINE>
        import math as _math
        <BLANKLINE>
        <BLANKLINE>
        # -- ema_kit/a.py
        _X = _math.pi
        <BLANKLINE>
        <BLANKLINE>
        # -- ema_kit/b.py
        def f():
            return _X
        <BLANKLINE>
    """
    roots = list(roots)
    modules = {}
    for path, source in sources.items():
        modules[module_name(path)] = _Module(module_name(path), path, source, path.endswith("__init__.py"))
    stubs = {place: feature for feature, places in left_out.items() for place in places}
    pruners = {}
    for module, mod in modules.items():
        stub_names = {name for (m, name) in stubs if m == module}
        stub_names |= {name for name, b in mod.imports.items() if b[0] == "from" and (b[1], b[2]) in stubs}
        pruners[module] = _Pruner(mod, known_false.get(module, {}), stub_names)
    reach = _Reach(modules, roots, stubs, {module: pruner.skip for module, pruner in pruners.items()})
    unreached = sorted(stubs.keys() - reach.reached)
    if unreached:
        raise PasteError(
            f"LEFT_OUT lists {'.'.join(unreached[0])}, which the paste file does not reach (renamed, moved, "
            "or no longer used?): update the table."
        )
    unused = sorted(
        (m, c) for m, cs in known_false.items() for c in cs if m not in pruners or c not in pruners[m].used
    )
    if unused:
        raise PasteError(
            f"KNOWN_FALSE lists {unused[0][1]} in {unused[0][0]}, which decides nothing there (renamed, "
            "moved, or no longer used?): update the table."
        )
    # In a notebook the cell's names share the namespace of the user's code: a later `accuracy = 0.9`,
    # `size = 224` or `from time import time` must not break evaluate, nor the cell a name of the user's.
    # So every name the cell defines or imports, besides its API and SHARED_IMPORTS, starts with _.
    api = {name for _, name in roots}
    defined = reach.owner.keys() | reach.external.keys()
    renamed = {name: f"_{name}" for name in defined - api - SHARED_IMPORTS if not name.startswith("_")}
    clashes = sorted(set(renamed.values()) & defined)
    if clashes:
        raise PasteError(f"{clashes[0][1:]} becomes {clashes[0]} in the paste file, which also defines that.")
    local_names = _local_names(modules)
    parts = []
    for module in _module_order(modules):
        if reach.kept[module]:
            text = _module_text(modules[module], reach, pruners[module], renamed, local_names)
            parts.append(f"# -- {modules[module].path}\n{text}")
    stubs_written = len(reach.stubbed) + len(reach.stubbed_methods)
    head = HEADER.format(
        version=version,
        count=sum(len(kept) for kept in reach.kept.values()) - len(reach.stubbed),
        modules=sum(bool(kept) for kept in reach.kept.values()),
        left_out=_left_out_note(left_out, stubs_written),
        known_false=_speed_note(known_false),
        shared=", ".join(sorted(SHARED_IMPORTS & reach.external.keys(), key=str.lower)),
    )
    if stubs_written:
        parts.insert(0, "# -- what the stubs of left-out features call (kaggle/paste.py)\n" + REFUSAL.strip())
    imports = {_imported_as(line, renamed.get(name, name)) for name, line in reach.external.items()}
    top = ["from __future__ import annotations", _sorted_imports(imports)]
    return head + "\n\n".join(filter(None, top)) + "\n\n\n" + "\n\n\n".join(parts) + "\n"


class _Reach:
    """What the roots need, followed definition by definition through the package's modules.

    A definition is kept when kept code reads its name; a method of a kept class when kept code names it
    (``obj.name``, or a string such as a hook's name), when it is a dunder, or when it is public on a root.
    A place that ``stubs`` lists is kept as a stub, and what only it needed is not followed. ``skip`` holds,
    per module, the nodes that pruning drops.
    """

    def __init__(self, modules: dict[str, _Module], roots: list, stubs: dict, skip: dict[str, set]):
        self.modules, self.roots, self.stubs, self.skip = modules, roots, stubs, skip
        self.kept: dict[str, set[int]] = {name: set() for name in modules}  # indexes of top-level statements
        self.kept_methods: set[int] = set()  # id() of the method nodes kept
        self.external: dict[str, str] = {}  # a name imported from another library -> its import line
        self.rewrites: dict[str, list[ast.Attribute]] = {name: [] for name in modules}  # `_checks.x` -> `x`
        self.owner: dict[str, tuple[str, int]] = {}  # a kept top-level name -> where it is defined
        self.stubbed: dict[tuple[str, int], str] = {}  # (module, index of a statement) -> its feature
        self.stubbed_methods: dict[int, str] = {}  # id() of a method node -> its feature
        self.reached: set[tuple[str, str]] = set()  # the places of ``stubs`` the roots reach
        self._method_names: dict[int, str] = {}  # id() of a method node of a kept class -> "Class.method"
        self._waiting: dict[str, list] = {}  # attribute name -> [(module, method node)] kept once it is read
        self._attributes: set[str] = set()
        self._todo: list[tuple[str, str]] = list(roots)
        seen = set()
        while self._todo:
            place = self._todo.pop()
            if place not in seen:
                seen.add(place)
                self._follow(*place)

    def _follow(self, module: str, name: str) -> None:
        if module not in self.modules:
            raise PasteError(f"{module} is not a module of the package (looking for {name}).")
        mod = self.modules[module]
        if name in mod.defined:
            self._keep(module, name, mod.defined[name])
        elif name in mod.imports:
            binding = mod.imports[name]
            if binding[0] == "external":
                self._import(name, binding[1])
            elif f"{binding[1]}.{binding[2]}" not in self.modules:  # `from .x import name`
                self._todo.append((binding[1], binding[2]))
        # else: a builtin, or a name local to a function

    def _keep(self, module: str, name: str, index: int) -> None:
        if index in self.kept[module]:
            return
        self.kept[module].add(index)
        statement = self.modules[module].statements[index]
        for defined in _defines(statement):
            other = self.owner.setdefault(defined, (module, index))
            if other != (module, index):
                raise PasteError(
                    f"{defined} is defined in both {other[0]} and {module}, and the paste file needs "
                    f"both: give one of them another name."
                )
        if (module, name) in self.stubs:
            if not isinstance(statement, ast.FunctionDef | ast.ClassDef):
                raise PasteError(f"LEFT_OUT: {module}.{name} is not a function or a class.")
            self.stubbed[module, index] = self.stubs[module, name]
            self.reached.add((module, name))
            return
        methods = _methods(statement)
        self._read(module, statement, skip=methods)
        for method in methods:
            self._method_names[id(method)] = f"{name}.{method.name}"
            # IPython calls its display hooks (_repr_png_, _repr_html_) by name, as Python calls dunders.
            dunder = method.name.endswith("_") and method.name.startswith(("__", "_repr_", "_ipython_"))
            public_on_root = (module, name) in self.roots and not method.name.startswith("_")
            if dunder or public_on_root or method.name in self._attributes:
                self._keep_method(module, method)
            else:
                self._waiting.setdefault(method.name, []).append((module, method))

    def _read(self, module: str, node: ast.AST, skip=()) -> None:
        names, mentioned = _reads(node, set(skip) | self.skip[module])
        imports = self.modules[module].imports
        for name, annotation in names:
            if annotation:  # kept as a string: only the imports of other libraries come along for it
                read = getattr(name, "id", None) or name.value.id
                binding = imports.get(read)
                if binding and binding[0] == "external":
                    self._import(read, binding[1])
                continue
            if isinstance(name, ast.Attribute):
                binding = imports.get(name.value.id)
                if binding and binding[0] == "from" and f"{binding[1]}.{binding[2]}" in self.modules:
                    self.rewrites[module].append(name)
                    self._todo.append((f"{binding[1]}.{binding[2]}", name.attr))
                    continue
                self._todo.append((module, name.value.id))
            else:
                self._todo.append((module, name.id))
        for name in mentioned - self._attributes:
            self._attributes.add(name)
            for waiting_module, method in self._waiting.pop(name, []):
                self._keep_method(waiting_module, method)

    def _import(self, name: str, line: str) -> None:
        if self.external.setdefault(name, line) != line:
            raise PasteError(f"{name} is imported as `{self.external[name]}` and as `{line}`: one name each.")

    def _keep_method(self, module: str, method: ast.FunctionDef) -> None:
        if id(method) in self.kept_methods:
            return
        self.kept_methods.add(id(method))
        place = (module, self._method_names[id(method)])
        if place in self.stubs:
            self.stubbed_methods[id(method)] = self.stubs[place]
            self.reached.add(place)
        else:
            self._read(module, method)


def _local_names(modules: dict[str, _Module]) -> dict[int, set[str]]:
    """id() of each node inside a function -> the names local to that function (and those around it)."""
    local_names: dict[int, set[str]] = {}
    for mod in modules.values():
        for function in ast.walk(mod.tree):
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                names = {a.arg for a in ast.walk(function.args) if isinstance(a, ast.arg)}
                stored = (
                    n for n in ast.walk(function) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
                )
                names |= {n.id for n in stored}
                for node in ast.walk(function):
                    local_names[id(node)] = local_names.get(id(node), set()) | names
    return local_names


def _module_text(mod: _Module, reach: _Reach, pruner: _Pruner, renamed: dict, local_names: dict) -> str:
    """What the paste file keeps of one module: its kept definitions, edited, stubs in their places."""
    kept = reach.kept[mod.name]
    edits = _docstring_edits(mod, kept)
    for a in reach.rewrites[mod.name]:  # `_checks.check_int` -> `_check_int`
        new = renamed.get(a.attr, a.attr)
        _check_not_local(mod, a, f"{a.value.id}.{a.attr}", new, local_names)
        edits.append((a.lineno, a.col_offset, a.end_col_offset, new))
    for index in kept:
        edits += _renames(mod, mod.statements[index], renamed, local_names)
    edits += pruner.edits
    lines = pruner.apply(_apply(mod.lines, _outside_deletions(edits)))
    for index in kept:
        for method in _methods(mod.statements[index]):
            start, end = _span(mod.lines, method)
            if id(method) in reach.stubbed_methods:
                stub = _stub(method.name, reach.stubbed_methods[id(method)], " " * method.col_offset)
                replaced = [stub] + [_DROPPED] * (end - start - 1)
                if end > method.end_lineno:  # the blank line after it stays
                    replaced[-1] = lines[end - 1]
                lines[start:end] = replaced
            elif id(method) not in reach.kept_methods:
                lines[start:end] = [_DROPPED] * (end - start)
    chunks, previous_stub = [], False
    for index in sorted(kept):
        start, end = mod.segment(index)
        if (mod.name, index) in reach.stubbed:
            name = mod.statements[index].name
            stub = _stub(renamed.get(name, name), reach.stubbed[mod.name, index])
            if previous_stub:  # a run of stubs reads as one block
                chunks[-1] += "\n" + stub
            else:
                chunks.append(stub)
            previous_stub = True
            continue
        text = "\n".join(row for row in lines[start:end] if row is not _DROPPED).rstrip()
        chunks.append(_without_empty_sections(text))
        previous_stub = False
    return "\n\n".join(chunks)


def _renames(mod: _Module, statement: ast.stmt, renamed: dict[str, str], local_names: dict) -> list[tuple]:
    """Edits that give the names in ``renamed`` their new names in one top-level statement: where it
    defines them, and wherever its code reads them (not a function's locals of the same name)."""
    edits = []
    for node in ast.walk(statement):
        if isinstance(node, ast.ClassDef):
            for child in _walk(node, set(_methods(node))):
                if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store) and child.id in renamed:
                    raise PasteError(
                        f"{mod.path}:{child.lineno}: class {node.name} sets an attribute {child.id}, the "
                        "name of a module-level definition the paste file renames: give one another name."
                    )
    if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and (
        statement.name in renamed
    ):
        line = mod.lines[statement.lineno - 1]
        start = line.index(f" {statement.name}", statement.col_offset) + 1
        edits.append((statement.lineno, start, start + len(statement.name), renamed[statement.name]))
    for node in ast.walk(statement):
        if not isinstance(node, ast.Name) or node.id not in renamed:
            continue
        if node.id in local_names.get(id(node), ()):  # a function's own variable of that name
            continue
        _check_not_local(mod, node, node.id, renamed[node.id], local_names)
        if mod.lines[node.lineno - 1][node.col_offset : node.end_col_offset] != node.id:
            raise PasteError(f"{mod.path}:{node.lineno}: cannot place the name {node.id} to rename it.")
        edits.append((node.lineno, node.col_offset, node.end_col_offset, renamed[node.id]))
    return edits


def _check_not_local(mod: _Module, node: ast.AST, old: str, new: str, local_names: dict) -> None:
    """Refuse a rewrite of the global ``old`` to ``new`` where a function has a local variable ``new``."""
    if new in local_names.get(id(node), ()):
        raise PasteError(
            f"{mod.path}:{node.lineno}: {old} becomes {new}, which the function also names a local: rename "
            "the local."
        )


def _left_out_note(left_out: dict, stubs: int) -> str:
    """The header's lines on what the cell leaves out."""
    if not left_out:
        return ""
    lines = [
        "# Left out to keep it one readable cell; asking for one raises LeftOut, which names it and the fix",
        f"# ({stubs} one-line stubs stand in for the package's definitions where these features start):",
    ]
    return "\n".join(lines + [f"#   - {feature}" for feature in left_out]) + "\n"


def _speed_note(known_false: dict) -> str:
    """The header's lines on the speed paths left out: the reasons in ``known_false`` saying "speed only"."""
    reasons = sorted({why for conditions in known_false.values() for why in conditions.values()})
    notes = [why.removeprefix("speed only: ") for why in reasons if why.startswith("speed only: ")]
    wrapped = [textwrap.wrap(f"Speed only: {note}.", 104) for note in notes]
    return "".join(f"# {line}\n" for lines in wrapped for line in lines)


def _stub(name: str, feature: str, pad: str = "") -> str:
    """The line that stands in for a left-out definition (three when it is long)."""
    quoted = f"'{feature}'" if '"' in feature else f'"{feature}"'
    line = f"{pad}{name} = _left_out({quoted})"
    return line if len(line) <= LINE_LENGTH else f"{pad}{name} = _left_out(\n{pad}    {quoted}\n{pad})"


def _without_empty_sections(text: str) -> str:
    """A class's text without the section comments (``# -- ...``) whose methods were all dropped."""
    lines = text.split("\n")
    kept = []
    for i, line in enumerate(lines):
        if line.lstrip().startswith("# -- "):
            following = next((row for row in lines[i + 1 :] if row.strip()), "")
            if not following or following.lstrip().startswith("# -- "):
                continue
        if not line.strip() and kept and not kept[-1].strip():
            continue  # the blank line of a dropped section
        kept.append(line)
    return "\n".join(kept)


def _span(lines: list[str], node: ast.stmt) -> tuple[int, int]:
    """The 0-based lines of a method: decorators, the comments right above, the blank line after."""
    start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    while start > 0 and lines[start - 1].lstrip().startswith("#"):
        start -= 1
    end = node.end_lineno
    if end < len(lines) and not lines[end].strip():
        end += 1
    return start, end


def _module_order(modules: dict[str, _Module]) -> list[str]:
    """Modules with what they import first (as Python imports them), so class bases exist when used."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order or name in visiting:
            return
        visiting.add(name)
        for binding in modules[name].imports.values():
            if binding[0] == "from":
                target = f"{binding[1]}.{binding[2]}"
                visit(target if target in modules else binding[1])
        visiting.discard(name)
        order.append(name)

    for name in sorted(modules):
        visit(name)
    return order


def _docstring_edits(mod: _Module, kept: set[int]) -> list[tuple]:
    """Edits that cut each kept class's and function's docstring to its first paragraph."""
    edits = []
    for index in kept:
        for node in ast.walk(mod.statements[index]):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            first = node.body[0]
            if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)):
                continue
            if not isinstance(first.value.value, str):
                continue
            summary = inspect.cleandoc(first.value.value).split("\n\n")[0].strip()
            if summary == inspect.cleandoc(first.value.value).strip():
                continue
            pad = " " * first.col_offset
            text = textwrap.indent(summary, pad).lstrip()
            one_line = "\n" not in text and len(pad) + len(text) + 6 <= LINE_LENGTH
            text = f'"""{text}"""' if one_line else f'"""{text}\n{pad}"""'
            # the whole docstring, lines lineno..end_lineno, becomes `text`
            edits.append((first.lineno, first.col_offset, None, text, first.end_lineno))
    return edits


def _apply(lines: list[str], edits: list[tuple]) -> list[str]:
    """Apply edits (line, start column, end column or None, replacement[, last line]) from the bottom up.

    A docstring edit replaces lines line..last with the replacement and blank placeholders, so that
    the line numbers of everything else stay put.
    """
    lines = list(lines)
    for edit in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        line, start, end, text = edit[:4]
        row = lines[line - 1]
        if end is None:
            last = edit[4]
            lines[line - 1] = row[:start] + text
            for extra in range(line, last):
                lines[extra] = None
        else:
            lines[line - 1] = row[:start] + text + row[end:]
    return [_DROPPED if row is None else row for row in lines]  # dropped when the segments are cut


_DROPPED = "\0"  # a line cut from a docstring


class _Pruner:
    """What ``known`` (conditions known False) and the stubs leave out of one module: the nodes the traversal
    skips, the line ranges dropped or dedented, and the column edits (``elif`` -> ``if``, ``x if C else y``
    -> ``y``)."""

    def __init__(self, mod: _Module, known: dict[str, str], stubs: set[str]):
        self.mod, self.known, self.stubs = mod, known, stubs
        self.skip: set[ast.AST] = set()
        self.drops: list[tuple[int, int]] = []  # 1-based, inclusive
        self.dedents: list[tuple[int, int, int]] = []  # first line, last line, columns
        self.edits: list[tuple] = []
        self.used: set[str] = set()  # the conditions of ``known`` that decided something
        self._block(mod.tree.body, mod.tree)
        in_strings = {id(n) for s in ast.walk(mod.tree) if isinstance(s, ast.JoinedStr) for n in ast.walk(s)}
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.IfExp) and id(node) not in in_strings:
                self._if_expression(node)

    def value(self, test: ast.expr) -> bool | None:
        """False or True when ``known`` decides ``test`` (``C``, ``not C``, ``C and ...``), else None."""
        text = ast.unparse(test)
        if text in self.known:
            self.used.add(text)
            return False
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            inner = self.value(test.operand)
            return None if inner is None else not inner
        if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
            if any(self.value(operand) is False for operand in test.values):
                return False
        return None

    def _calls_stub(self, statements: list[ast.stmt]) -> bool:
        calls = (n for s in statements for n in ast.walk(s) if isinstance(n, ast.Call))
        return any(isinstance(call.func, ast.Name) and call.func.id in self.stubs for call in calls)

    def _drop(self, statement: ast.stmt) -> str:
        """Leave out a whole statement, with the comment lines right above it (they are about it)."""
        start = statement.lineno
        while start > 1 and self.mod.lines[start - 2].lstrip().startswith("#"):
            start -= 1
        self.drops.append((start, statement.end_lineno))
        self.skip.add(statement)
        return "dropped"

    def _refuses(self, statement: ast.stmt) -> bool:
        """Whether ``statement`` calls a stub (``stub(...)``): it raises LeftOut."""
        call = statement.value if isinstance(statement, ast.Expr) else None
        return isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in self.stubs

    def _ends(self, statement: ast.stmt) -> bool:
        """Whether nothing after ``statement`` in its block runs: it returns, raises, or calls a stub."""
        return isinstance(statement, ast.Return | ast.Raise) or self._refuses(statement)

    def _block(self, statements: list[ast.stmt], parent: ast.AST) -> bool:
        """Prune one block; whether any of its statements stays."""
        stays = False
        for i, statement in enumerate(statements):
            outcome = self._statement(statement)
            stays |= outcome != "dropped"
            rest = statements[i + 1 :]
            if outcome == "ends" and rest and not isinstance(parent, ast.Module):
                self.drops.append((statement.end_lineno + 1, rest[-1].end_lineno))
                self.skip.update(rest)
                break
        return stays

    def _statement(self, statement: ast.stmt) -> str:
        """Prune one statement: "dropped", "ends" (nothing after it runs) or "kept"."""
        if isinstance(statement, ast.If):
            return self._if(statement)
        if self._ends(statement):
            return "ends"
        if isinstance(statement, ast.For) and not statement.orelse and self.value(statement.iter) is False:
            if not self._calls_stub(statement.body):  # a loop over an empty list
                return self._drop(statement)
        blocks = [getattr(statement, field, None) for field in ("body", "orelse", "finalbody")]
        blocks += [handler.body for handler in getattr(statement, "handlers", [])]
        for block in filter(None, blocks):
            if not self._block(block, statement):
                if isinstance(statement, ast.For) and block is statement.body and not statement.orelse:
                    return self._drop(statement)  # a loop left with nothing to do
                self._refuse(statement, "would leave an empty block")
        return "kept"

    def _if(self, node: ast.If, elif_: bool | None = None) -> str:
        """Prune an ``if`` (an ``elif`` when ``elif_``, by default as the source reads)."""
        elif_ = self._is_elif(node) if elif_ is None else elif_
        value = self.value(node.test)
        dropped = node.orelse if value else node.body
        if value is None or self._calls_stub(dropped):
            # A branch that calls a stub stays: where the cell refuses (a sharded model, at build) is left in.
            if not self._block(node.body, node):
                self._refuse(node, "would leave an empty block")
            if (
                node.orelse
                and not self._block(node.orelse, node)
                and not (isinstance(node.orelse[0], ast.If) and self._is_elif(node.orelse[0]))
            ):
                self._refuse(node, "would leave an empty else")  # (an elif dropped whole leaves none)
            return "kept"
        self.skip.add(node.test)
        kept = node.body if value else node.orelse
        self.skip.update(dropped)
        if not kept:  # `if C:` alone, or `elif C:` ending its chain
            if elif_:
                self.drops.append((node.lineno, node.end_lineno))
                self.skip.add(node)
                return "dropped"
            return self._drop(node)
        if elif_:  # its kept branch would need an `else:` of its own
            self._refuse(node, "is an elif whose other branch would stay")
        if not value and len(kept) == 1 and isinstance(kept[0], ast.If) and self._is_elif(kept[0]):
            inner = kept[0]  # `if C: ... elif D: ...` -> `if D: ...`
            self.drops.append((node.lineno, inner.lineno - 1))
            self.edits.append((inner.lineno, inner.col_offset, inner.col_offset + 4, "if"))
            return self._if(inner, elif_=False)
        if value:  # the header goes, the body moves left, any else goes
            header_end = node.test.end_lineno
            self.drops.append((node.lineno, header_end))
            if node.orelse:
                self.drops.append((node.body[-1].end_lineno + 1, node.end_lineno))
        else:  # the header, the body and `else:` go, the else branch moves left
            header_end = next(
                n
                for n in range(node.body[-1].end_lineno + 1, kept[0].lineno)
                if self.mod.lines[n - 1].strip().startswith("else")
            )
            self.drops.append((node.lineno, header_end))
        self._dedent(header_end + 1, kept[-1].end_lineno, kept[0].col_offset - node.col_offset, node)
        self._block(kept, node)
        return "ends" if self._ends(kept[-1]) else "kept"

    def _if_expression(self, node: ast.IfExp) -> None:
        value = self.value(node.test)
        if value is None:
            return
        if node.lineno != node.end_lineno:
            self._refuse(node, "spans several lines")
        self.skip.update((node.test, node.orelse if value else node.body))
        if value:  # `x if C else y` -> `x`
            self.edits.append((node.lineno, node.body.end_col_offset, node.end_col_offset, ""))
        else:  # -> `y`
            self.edits.append((node.lineno, node.col_offset, node.orelse.col_offset, ""))

    def _is_elif(self, node: ast.If) -> bool:
        return self.mod.lines[node.lineno - 1][node.col_offset :].startswith("elif")

    def _dedent(self, first: int, last: int, columns: int, node: ast.AST) -> None:
        for string in ast.walk(node):
            if isinstance(string, ast.Constant | ast.JoinedStr) and first <= string.lineno <= last:
                source = ast.get_source_segment(self.mod.source, string) or ""
                if string.lineno != string.end_lineno and ('"""' in source or "'''" in source):
                    self._refuse(node, "would move a string of several lines")
        self.dedents.append((first, last, columns))

    def _refuse(self, node: ast.AST, why: str) -> None:
        raise PasteError(
            f"{self.mod.path}:{node.lineno}: what KNOWN_FALSE decides here {why}; write it otherwise, or "
            "take the condition out of KNOWN_FALSE."
        )

    def apply(self, lines: list[str]) -> list[str]:
        """``lines`` (column edits made) with the dropped lines marked and the kept branches moved left."""
        lines = list(lines)
        for first, last, columns in self.dedents:
            for n in range(first - 1, last):
                row = lines[n]
                if row == _DROPPED or not row.strip():
                    continue
                if row[:columns].strip():
                    raise PasteError(f"{self.mod.path}:{n + 1}: cannot move this line {columns} columns left")
                lines[n] = row[columns:]
        for first, last in self.drops:
            lines[first - 1 : last] = [_DROPPED] * (last - first + 1)
        return lines


def _outside_deletions(edits: list[tuple]) -> list[tuple]:
    """``edits`` less those inside a stretch another edit deletes (a renamed name in a dropped ``x if C``)."""
    deletions = [e for e in edits if len(e) == 4 and e[3] == ""]
    return [
        e
        for e in edits
        if not any(
            e is not d and len(e) == 4 and e[0] == d[0] and d[1] <= e[1] and e[2] <= d[2] for d in deletions
        )
    ]


def _imported_as(line: str, name: str) -> str:
    """``line`` binding ``name``: ``import time`` -> ``import time as _time``."""
    bound = line.rsplit(" as ", 1)[1] if " as " in line else line.rsplit(" ", 1)[1]
    if bound == name:
        return line
    if line.startswith("import ") and "." in bound:
        raise PasteError(f"`{line}` binds {bound.split('.')[0]}, not {bound}: write `from ... import ...`.")
    return f"{line.rsplit(' as ', 1)[0]} as {name}"


def _from_import(module: str, names: list[str]) -> str:
    """One module's ``from`` imports as ruff's isort writes them: constants, classes, then the rest, and a
    line of its own for each renamed name."""
    lines, plain = [], sorted((name for name in names if " as " not in name), key=_by_type)
    for name in sorted(names, key=_by_type):
        if " as " in name:
            lines.append(f"from {module} import {name}")
        elif name == plain[0]:
            lines.append(f"from {module} import {', '.join(plain)}")
    return "\n".join(lines)


def _by_type(name: str) -> tuple:
    return not name.isupper(), not name[0].isupper(), name


def _sorted_imports(lines: set[str]) -> str:
    """The imports as ruff's isort writes them: standard library, then the others; ``import`` lines first."""
    sections = []
    for stdlib in (True, False):
        plain, grouped = [], {}
        for line in lines:
            module = line.split()[1]
            if (module.split(".")[0] in sys.stdlib_module_names) != stdlib:
                continue
            if line.startswith("import "):
                plain.append(line)
            else:
                grouped.setdefault(module, []).append(line.split(" import ")[1])
        froms = [_from_import(module, names) for module, names in sorted(grouped.items())]
        sections.append("\n".join(sorted(plain) + froms))
    return "\n\n".join(section for section in sections if section)
