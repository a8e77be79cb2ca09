"""The paste file (kaggle/paste.py, kaggle/ema_kit_paste.py): ModelEMA, evaluate and LiveLog as one cell."""

import ast
import doctest
import importlib.util
import re
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch
from nbclient import NotebookClient
from test_docs import blocks
from test_notebooks import kernel_without_ema_kit  # noqa: F401  (a fixture: a kernel without ema_kit)
from test_sharded import one_process, sharded_model  # noqa: F401  (one_process: a process group of one)

from ema_kit import ModelEMA

REPO = Path(__file__).resolve().parents[1]
PASTE = REPO / "kaggle" / "ema_kit_paste.py"
sys.path.insert(0, str(REPO / "kaggle"))
_spec = importlib.util.spec_from_file_location("kaggle_build", REPO / "kaggle" / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)
import paste  # noqa: E402
from paste import PasteError  # noqa: E402

# The issue asked for at most ~1,500 lines. The closure of ModelEMA, evaluate and LiveLog was ~2,050 lines at
# the first build (2026-12-04), 2,468 with issue 22's live log and issue 27's sharded EMA; with the features
# of paste.LEFT_OUT left out, 2,031 (2026-12-04); with the branches paste.KNOWN_FALSE rules out, 1,920
# (2026-12-04); 1,957 with the change check comparing the state dict's keys and ties; 1,975 with the display
# hooks kept and the imports renamed too (2026-12-04); 1,988 with the change check comparing each module's
# dicts whole, no tensor by value (2026-12-04); 2,078 with whole_set, which evaluate's warning names, and the
# checks and fixes of three adversarial passes (2026-12-05). This bound says when it grows further.
MAX_LINES = 2_078


def paste_file(sources: dict[str, str], version: str, **options):
    """``paste.paste_file`` for a stand-in package, which has none of the conditions of ``KNOWN_FALSE``."""
    return paste.paste_file(sources, version, **{"known_false": {}, **options})


def package(**modules: str) -> dict[str, str]:
    """A stand-in package: ``package(a="X = 1\\n")`` is {"ema_kit/__init__.py": "", "ema_kit/a.py": ...}."""
    return {
        "ema_kit/__init__.py": "",
        **{f"ema_kit/{name.replace('__', '/')}.py": s for name, s in modules.items()},
    }


def names_defined(text: str) -> set[str]:
    tree = ast.parse(text)
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef)} | {
        target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets
    }


# -- the committed file ----------------------------------------------------------------------------


def test_committed_paste_file_is_a_fresh_build_of_the_package():
    fresh = build.paste(build.read_package(), build.package_version())
    assert PASTE.read_text(encoding="utf-8") == fresh, (
        "kaggle/ema_kit_paste.py is stale (it is generated from ema_kit/, never edited by hand): run "
        "`python kaggle/build.py` and commit kaggle/ema_kit_paste.py"
    )


def test_paste_file_defines_what_the_readme_loops_use_and_stays_one_readable_cell():
    text = PASTE.read_text(encoding="utf-8")
    assert {"ModelEMA", "LiveLog", "evaluate", "plot_history", "decay_from_half_life"} <= names_defined(text)
    assert len(text.splitlines()) <= MAX_LINES
    nodes = list(ast.walk(ast.parse(text)))
    imported = [node.module if not node.level else "." for node in nodes if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if name == "." or name.split(".")[0] == "ema_kit"]
    assert "sys.meta_path" not in text  # no import hook: plain definitions


def test_paste_file_defines_no_public_name_beyond_its_api_and_left_out():
    text = PASTE.read_text(encoding="utf-8")
    public = {name for name in names_defined(text) if not name.startswith("_")}
    assert public == {root for _, root in paste.ROOTS} | {"LeftOut"}
    imports = [node for node in ast.parse(text).body if isinstance(node, ast.Import | ast.ImportFrom)]
    imported = {alias.asname or alias.name for node in imports for alias in node.names}
    public_imports = {name for name in imported if not name.startswith("_")}
    assert public_imports == paste.SHARED_IMPORTS & imported | {"annotations"}  # from __future__


def test_the_notebooks_own_names_do_not_replace_the_paste_cells_parts(tmp_path):
    namespace = {"__name__": "__main__", "out_dir": tmp_path}
    exec(compile(PASTE.read_text(encoding="utf-8"), str(PASTE), "exec"), namespace)
    exec(  # in the cell's own namespace, as the notebook's next cells run
        "from copy import copy\n"
        "from glob import glob\n"
        "from time import time\n"
        "io = math = os = re = signal = sys = tempfile = threading = warnings = Path = Tensor = 'mine'\n"
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))), batch_size=4)\n"
        "model = torch.nn.Linear(4, 3)\n"
        "ema = ModelEMA(model)\n"
        "live_log = LiveLog(progress='text', out_dir=out_dir)\n"
        "for epoch in (1, 2):\n"
        "    for x, y in live_log.track(loader):\n"
        "        ema.update(model)\n"
        "    accuracy = evaluate(model, loader)['accuracy']\n"  # names a notebook often uses
        "    size, split, display, forward, direction = 224, 'val', print, None, 'min'\n"
        "    live_log.add(live=evaluate(model, loader), ema=evaluate(ema.module, loader))\n"
        "ema.save(out_dir / 'ema.pth')\n",
        namespace,
    )
    assert {path.name for path in tmp_path.iterdir()} == {"history.csv", "history.png", "ema.pth"}


def test_the_paste_cell_keeps_the_notebooks_own_names():
    namespace = {"__name__": "__main__", "time": "mine", "glob": "mine", "Path": "mine", "copy": "mine"}
    exec(compile(PASTE.read_text(encoding="utf-8"), str(PASTE), "exec"), namespace)
    assert all(namespace[name] == "mine" for name in ("time", "glob", "Path", "copy"))


def test_the_paste_cells_figures_and_tables_show_in_a_notebook(pasted):
    history = pd.DataFrame({"epoch": [1, 2], "live_loss": [1.0, 0.5], "ema_loss": [1.1, 0.6]})
    assert pasted["plot_history"](history)._repr_png_().startswith(b"\x89PNG")


# -- what it leaves out ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pasted() -> dict:
    """The names the committed paste file defines, run as one cell (in this process)."""
    namespace = {"__name__": "__main__"}
    exec(compile(PASTE.read_text(encoding="utf-8"), str(PASTE), "exec"), namespace)
    return namespace


def _left_out_places():
    return [(feature, module, name) for feature, places in paste.LEFT_OUT.items() for module, name in places]


def pasted_name(name: str) -> str:
    """A package name as the paste file spells it: the API's own, every other one with a leading _."""
    return name if name.startswith("_") or name in {root for _, root in paste.ROOTS} else f"_{name}"


@pytest.mark.parametrize("feature, module, name", _left_out_places(), ids=lambda v: str(v)[:40])
def test_each_left_out_definition_is_a_stub_that_refuses_naming_its_feature_and_the_fix(
    pasted, feature, module, name
):
    owner, _, method = name.rpartition(".")
    stub = getattr(pasted[pasted_name(owner)], method) if owner else pasted[pasted_name(name)]
    with pytest.raises(pasted["LeftOut"]) as refused:
        stub(object(), 1, key=2)
    assert str(refused.value).startswith(f"{feature} is left out of the ema_kit paste cell")
    assert "attach the ema-kit dataset and import its wheel (docs/kaggle.md)" in str(refused.value)
    assert isinstance(refused.value, NotImplementedError)


def _ask_stochastic(ns, model, tmp_path):
    ns["ModelEMA"](model, dtype="bfloat16-stochastic")


def _ask_resume_save(ns, model, tmp_path):
    ns["ModelEMA"](model).state_dict()


def _ask_resume_load(ns, model, tmp_path):
    ns["ModelEMA"](model).load_state_dict({})


def _ask_recompute_bn(ns, model, tmp_path):
    ns["ModelEMA"](model).recompute_bn([(torch.randn(4, 3), torch.zeros(4))])


def _ask_safetensors(ns, model, tmp_path):
    ns["ModelEMA"](model).save(tmp_path / "model_ema.safetensors")


def _ask_fit_callback(ns, model, tmp_path):
    ns["LiveLog"](progress="off").on_fit_start(None)


@pytest.mark.parametrize(
    "ask, feature",
    [
        (_ask_stochastic, 'dtype="bfloat16-stochastic"'),
        (_ask_resume_save, "resuming an EMA"),
        (_ask_resume_load, "resuming an EMA"),
        (_ask_recompute_bn, "ModelEMA.recompute_bn"),
        (_ask_safetensors, ".safetensors"),
        (_ask_fit_callback, "LiveLog as a callback of fit"),
    ],
)
def test_asking_the_paste_cell_for_a_left_out_feature_raises_left_out_and_changes_nothing(
    pasted, tmp_path, ask, feature
):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(pasted["LeftOut"], match=f"{re.escape(feature)}.* is left out of the ema_kit paste"):
        ask(pasted, model, tmp_path)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert list(tmp_path.iterdir()) == []  # no file, not even a temporary one


@pytest.mark.usefixtures("one_process")
def test_the_paste_cell_refuses_a_sharded_model_where_it_builds_the_ema(pasted):
    # paste.KNOWN_FALSE leaves out every later branch on a sharded model: this refusal is what makes it so.
    model = sharded_model()
    with pytest.raises(pasted["LeftOut"], match="sharded by FSDP2"):
        pasted["ModelEMA"](model)


@pytest.mark.cuda
def test_the_paste_cell_refuses_an_ema_kept_on_the_cpu_for_a_gpu_model(pasted):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    with pytest.raises(pasted["LeftOut"], match="another device than the model"):
        pasted["ModelEMA"](torch.nn.Linear(3, 4).cuda(), device="cpu")


def test_the_pasted_model_ema_averages_and_saves_as_the_package_does(pasted, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 2))
    package_ema, pasted_ema = ModelEMA(model, decay=0.9), pasted["ModelEMA"](model, decay=0.9)
    # On the CPU the package gathers these small tensors into one flat tensor per set; the cell leaves that
    # speed path out (paste.KNOWN_FALSE) and blends them with the plain foreach ops: the same bits.
    assert package_ema._shadows._gathers and not pasted_ema._shadows._gathers
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        model(torch.randn(8, 3)).square().mean().backward()
        optimizer.step()
        package_ema.update(model)
        pasted_ema.update(model)
    package_ema.save(tmp_path / "package.pth")
    pasted_ema.save(tmp_path / "pasted.pth")
    expected = torch.load(tmp_path / "package.pth", weights_only=True)
    got = torch.load(tmp_path / "pasted.pth", weights_only=True)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)


# -- how it is cut ---------------------------------------------------------------------------------


def test_paste_docstring_examples_run():
    result = doctest.testmod(paste)
    assert result.attempted > 0 and result.failed == 0


def test_only_what_the_roots_reach_is_kept_across_modules():
    text = paste_file(
        package(
            a="import math\nimport os\n\nX = math.pi\nUNUSED = os.sep\n\n\ndef helper():\n    return X\n",
            b="from . import a\nfrom .a import helper\n\n\ndef root():\n    return helper() + a.X\n\n\n"
            "def other():\n    pass\n",
        ),
        "0.0",
        roots=[("ema_kit.b", "root")],
        left_out={},
    )
    assert names_defined(text) == {"_X", "_helper", "root"}  # what is not the API starts with _
    assert "import math as _math\n" in text and "import os" not in text  # the notebook's `math` is its own
    assert "return _helper() + _X" in text  # `a.X`, with the module gone, is `_X`
    namespace = {}
    exec(compile(text, "paste", "exec"), namespace)
    assert namespace["root"]() == 2 * 3.141592653589793


def test_a_method_no_kept_code_names_is_dropped_and_dunders_and_public_root_methods_stay():
    text = paste_file(
        package(
            a="class Helper:\n    def __init__(self):\n        self.used()\n\n"
            "    def used(self):\n        pass\n\n    def unused(self):\n        pass\n\n"
            "    def _repr_html_(self):\n        pass\n\n\n"
            "class Root:\n    def public(self):\n        Helper()\n\n    def _private(self):\n        pass\n"
        ),
        "0.0",
        roots=[("ema_kit.a", "Root")],
        left_out={},
    )
    assert "def used" in text and "def __init__" in text and "def public" in text
    assert "def _repr_html_" in text  # IPython calls its display hooks by name, as Python calls dunders

    assert "def unused" not in text and "def _private" not in text


def test_docstrings_are_cut_to_their_first_paragraph():
    source = 'def f():\n    """One line.\n\n    Example:\n        >>> f()\n    """\n    return 1\n'
    text = paste_file(package(a=source), "0.0", roots=[("ema_kit.a", "f")], left_out={})
    assert 'def f():\n    """One line."""\n    return 1\n' in text


def test_a_left_out_function_or_method_is_a_stub_and_what_only_it_used_is_not_kept():
    text = paste_file(
        package(
            a="def helper():\n    return 1\n\n\ndef extra():\n    return helper()\n\n\n"
            "class Root:\n    def run(self, fancy=False):\n        return extra() if fancy else 0\n\n"
            "    def fancy_method(self):\n        return helper()\n"
        ),
        "0.0",
        roots=[("ema_kit.a", "Root")],
        left_out={"a fancy feature": [("ema_kit.a", "extra"), ("ema_kit.a", "Root.fancy_method")]},
    )
    assert '_extra = _left_out("a fancy feature")' in text
    assert '    fancy_method = _left_out("a fancy feature")' in text
    assert "def helper" not in text and "  - a fancy feature" in text
    namespace = {}
    exec(compile(text, "paste", "exec"), namespace)
    assert namespace["Root"]().run() == 0
    for ask in (lambda: namespace["Root"]().run(fancy=True), namespace["Root"]().fancy_method):
        with pytest.raises(namespace["LeftOut"], match="^a fancy feature is left out of the ema_kit paste"):
            ask()


def test_names_besides_the_roots_gain_a_leading_underscore_where_defined_and_read_but_not_locals():
    text = paste_file(
        package(
            a="SIZE = 2\n\n\ndef size(x):\n    return x * SIZE\n\n\n"
            "def count(values):\n    size = len(values)\n    return size\n\n\n"
            "def root(values):\n    return size(count(values))\n"
        ),
        "0.0",
        roots=[("ema_kit.a", "root")],
        left_out={},
    )
    assert "_SIZE = 2\n" in text and "def _size(x):\n    return x * _SIZE\n" in text
    assert "def _count(values):\n    size = len(values)\n    return size\n" in text  # a local stays
    assert "return _size(_count(values))" in text
    namespace = {}
    exec(compile(text, "paste", "exec"), namespace)
    assert namespace["root"]([1, 2, 3]) == 6


def test_a_class_attribute_named_as_a_renamed_definition_stops_the_build():
    source = "def helper():\n    return 1\n\n\nclass Root:\n    helper = staticmethod(helper)\n"
    with pytest.raises(PasteError, match="class Root sets an attribute helper"):
        paste_file(package(a=source), "0.0", roots=[("ema_kit.a", "Root")], left_out={})


@pytest.mark.parametrize(
    "left_out, complaint",
    [
        ({"f": [("ema_kit.a", "gone")]}, "LEFT_OUT lists ema_kit.a.gone, which the paste file does not"),
        ({"f": [("ema_kit.a", "Root.gone")]}, "LEFT_OUT lists ema_kit.a.Root.gone, which the paste file"),
        ({"f": [("ema_kit.a", "X")]}, "LEFT_OUT: ema_kit.a.X is not a function or a class"),
    ],
)
def test_a_left_out_entry_that_names_nothing_reached_or_no_definition_stops_the_build(left_out, complaint):
    source = "X = 1\n\n\nclass Root:\n    def run(self):\n        return X\n"
    with pytest.raises(PasteError, match=re.escape(complaint)):
        paste_file(package(a=source), "0.0", roots=[("ema_kit.a", "Root")], left_out=left_out)


KNOWN = {"ema_kit.a": {"self.fancy": "fancy roots are refused when built", "self.extras": "always empty"}}
FANCY = """\
def helper():
    return "fancy"


class Root:
    def __init__(self, fancy=False):
        self.fancy, self.extras = fancy, []

    def each(self):
        # what the extras add
        for extra in self.extras:
            helper()
        return "plain"

    def run(self):
        if self.fancy:
            return helper()
        return "plain"

    def kind(self):
        if self.fancy:
            kind = helper()
        else:
            # the plain kind
            kind = "plain"
        return kind

    def negated(self):
        if not self.fancy:
            return "plain"
        return helper()

    def chained(self, n):
        if n > 1 and self.fancy:
            return helper()
        elif n > 0:
            return "plain"
        return "none"

    def loop(self):
        for _ in range(3):
            if self.fancy:
                helper()
        return "plain"

    def label(self):
        return helper() if self.fancy else "plain"
"""


def test_a_condition_known_false_leaves_out_what_it_guards_and_keeps_the_rest_runnable():
    text = paste_file(package(a=FANCY), "0.0", roots=[("ema_kit.a", "Root")], left_out={}, known_false=KNOWN)
    assert "def _helper" not in text and text.count("self.fancy") == 1  # set in __init__, read nowhere
    assert "        if n > 0:\n            return 'plain'" in text.replace('"', "'")  # elif -> if
    assert "        # the plain kind\n        kind = 'plain'\n" in text.replace('"', "'")  # else, moved left
    assert "for _ in range(3)" not in text  # a loop left with nothing to do goes too
    assert "extra" not in text.replace("self.extras = ", "")  # a loop over an empty list, and its comment
    namespace = {}
    exec(compile(text, "paste", "exec"), namespace)
    root = namespace["Root"]()
    answers = [
        root.run(),
        root.kind(),
        root.negated(),
        root.chained(2),
        root.label(),
        root.loop(),
        root.each(),
    ]
    assert answers == ["plain"] * 7
    assert root.chained(0) == "none"


def test_a_branch_calling_a_left_out_stub_stays_and_what_follows_the_call_is_left_out():
    source = (
        "def refuse():\n    pass\n\n\ndef after():\n    return 1\n\n\nclass Root:\n"
        "    def __init__(self, fancy=False):\n        self.fancy = fancy\n        if self.fancy:\n"
        "            refuse()\n            after()\n\n    def run(self):\n        if self.fancy:\n"
        "            return after()\n        return 0\n"
    )
    text = paste_file(
        package(a=source),
        "0.0",
        roots=[("ema_kit.a", "Root")],
        left_out={"a fancy root": [("ema_kit.a", "refuse")]},
        known_false={"ema_kit.a": {"self.fancy": "fancy roots are refused when built"}},
    )
    assert "after" not in text  # after the stub's call, and in run's branch the refusal rules out
    namespace = {}
    exec(compile(text, "paste", "exec"), namespace)
    assert namespace["Root"]().run() == 0
    with pytest.raises(namespace["LeftOut"], match="^a fancy root is left out"):
        namespace["Root"](fancy=True)


@pytest.mark.parametrize(
    "known_false, complaint",
    [
        ({"ema_kit.a": {"self.gone": ""}}, "KNOWN_FALSE lists self.gone in ema_kit.a, which decides nothing"),
        (
            {"ema_kit.a": {"self.fancy": ""}},
            "ema_kit/a.py:3: what KNOWN_FALSE decides here would leave an empty block",
        ),
        ({"ema_kit.a": {"self.odd": ""}}, "ema_kit/a.py:10: what KNOWN_FALSE decides here is an elif whose"),
    ],
)
def test_a_known_false_condition_that_decides_nothing_empties_a_block_or_splits_an_elif_stops_the_build(
    known_false, complaint
):
    source = "class Root:\n    def run(self):\n        while True:  # nothing left to loop on\n"
    source += "            if self.fancy:\n                pass\n\n"
    source += "    def pick(self, n):\n        if n:\n            return 1\n        elif self.odd:\n"
    source += "            return 2\n        else:\n            return 3\n"
    with pytest.raises(PasteError, match=re.escape(complaint)):
        paste_file(
            package(a=source), "0.0", roots=[("ema_kit.a", "Root")], left_out={}, known_false=known_false
        )


@pytest.mark.parametrize(
    "modules, complaint",
    [
        (
            {
                "a": "def f():\n    return 1\n",
                "b": "from .a import f as g\n\n\ndef root():\n    return g()\n",
            },
            "`f as g`",
        ),
        (
            {"a": "X = 1\n", "b": "from . import a\n\nX = 2\n\n\ndef root():\n    return X + a.X\n"},
            "X is defined in both ema_kit.",
        ),
        (
            {
                "a": "def size():\n    return 1\n",
                "b": "from . import a\n\n\ndef root():\n    _size = a.size()\n",
            },
            "a.size becomes _size, which the function also names a local",
        ),
        (
            {"b": "def size():\n    return 1\n\n\ndef root():\n    _size = size()\n"},
            "size becomes _size, which the function also names a local",
        ),
        ({"b": "def root():\n    from . import a\n"}, "an import of ema_kit in a function"),
        (
            {
                "b": "def size():\n    return 1\n\n\ndef _size():\n    return 2\n\n\n"
                "def root():\n    return size() + _size()\n"
            },
            "size becomes _size in the paste file, which also defines that",
        ),
    ],
)
def test_what_cannot_be_flattened_stops_the_build_naming_it(modules, complaint):
    with pytest.raises(PasteError, match=complaint.replace("(", r"\(")):
        paste_file(package(**modules), "0.0", roots=[("ema_kit.b", "root")], left_out={})


# -- as a user pastes it ---------------------------------------------------------------------------

# The data and model cell a user has before the README's loops (scikit-learn's digits, plain torch).
SETUP = """\
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

digits = load_digits()
images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
labels = torch.tensor(digits.target)
train_loader = DataLoader(TensorDataset(images[:1400], labels[:1400]), batch_size=64, shuffle=True)
val_loader = DataLoader(TensorDataset(images[1400:], labels[1400:]), batch_size=256)
model = torch.nn.Sequential(
    torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
    torch.nn.Flatten(), torch.nn.Linear(16 * 8 * 8, 10),
)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
loss_fn = torch.nn.CrossEntropyLoss()
"""
CHECK = """\
import os, sys
assert "ema_kit" not in sys.modules
print(list(live_log.history.columns), len(live_log.history))
print(os.path.getsize("runs/loop/history.png") > 10_000)
"""


def readme_loops(defined: set[str]) -> list[str]:
    """The README's "EMA in your own loop" snippets after its setup, without their `from ema_kit import`."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## EMA in your own loop\n", 1)[1].split("\n## ", 1)[0]
    snippets = [block["code"] for block in blocks(section) if block["language"] == "python"]
    assert "ema_kit.examples" in snippets[0], "the section's first snippet is its setup"
    cells = []
    for code in snippets[1:]:
        lines = code.splitlines(keepends=True)
        imports = [line for line in lines if line.startswith("from ema_kit import ")]
        imported = {name.strip() for line in imports for name in line.split(" import ")[1].split(",")}
        assert imported <= defined, f"the README imports {imported - defined}, which the paste file lacks"
        cells.append("".join(line for line in lines if line not in imports))
    return cells


@pytest.mark.slow
def test_pasted_into_one_cell_of_a_fresh_kernel_it_runs_the_readme_loops(
    tmp_path,
    kernel_without_ema_kit,  # noqa: F811
    monkeypatch,
):
    text = PASTE.read_text(encoding="utf-8")
    loops = readme_loops(names_defined(text))
    assert len(loops) == 2  # ModelEMA with evaluate, then the loop with LiveLog
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(code) for code in [text, SETUP, *loops, CHECK]]
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_without_ema_kit))
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    printed = "".join(output.get("text", "") for output in notebook.cells[-1].outputs)
    columns = ["epoch", "train_loss", "live_loss", "ema_loss", "live_accuracy", "ema_accuracy", "seconds"]
    assert printed == f"{columns} 3\nTrue\n"
    assert (tmp_path / "model_ema.pth").is_file()
