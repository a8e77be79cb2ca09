"""ema_kit in one file, for Kaggle kernels without internet: after this file runs, ``import ema_kit`` works.

Either paste the whole file into a notebook cell and run it, or import it from the folder it sits in::

    import sys
    sys.path.append("/kaggle/input/ema-kit")  # the attached ema_kit dataset
    import ema_kit_single  # noqa: F401  (it makes ema_kit importable)
    from ema_kit import ModelEMA

Each module of the package is kept below as its own, unchanged source and served by an import hook, so
the modules import one another as the files of an installed package do: relative imports work, equal
private names in different modules stay apart, and ``python ema_kit_single.py ARGS`` runs the package's
``__main__`` like ``python -m ema_kit ARGS``. Tracebacks and ``inspect.getsource`` show the real lines.

If another ema_kit is installed, this file takes precedence (you ran it on purpose) and warns, naming the
installed one; to use the installed one instead, don't run this file. If ema_kit was already imported in
this process from somewhere else, this file raises ImportError instead of mixing two versions: restart
the kernel. Running the file again (the same version) changes nothing.

Worker processes started with "spawn" (not the default on Linux, where Kaggle's fork is used) don't see
the package; install the wheel from the same dataset for those.
"""


def _install_ema_kit(sources: dict[str, str], *, version: str, digest: str, location: str) -> None:
    """Serve ``sources`` ({"ema_kit/ema.py": source, ...}) as the package ``ema_kit``, then import it.

    ``digest`` identifies the sources (a re-run of the same file is a no-op); ``location`` is the path
    of this file, shown in tracebacks as ``<location>/ema_kit/ema.py`` (zipimport's convention).
    """
    # Imports live in here so that pasting the file into a cell leaves no names behind.
    import importlib.abc
    import importlib.machinery
    import importlib.util
    import linecache
    import sys
    import warnings

    modules = {path.removesuffix(".py").removesuffix("/__init__").replace("/", "."): path for path in sources}
    package = min(modules, key=len)
    bundle = f"{package} {version} (single file {location}, sources sha256 {digest})"

    def digest_of(finder) -> str | None:
        return getattr(finder, "ema_kit_digest", None)

    loaded = sys.modules.get(package)
    if loaded is not None:
        loader = getattr(loaded, "__loader__", None)
        if digest_of(loader) == digest:
            return  # this very file already ran here: its modules are in use, nothing to do
        raise ImportError(
            f"{package} is already imported in this process (from "
            f"{getattr(loader, 'ema_kit_bundle', None) or getattr(loaded, '__file__', None)}), so "
            f"{bundle} cannot replace it without mixing two versions. Restart the kernel and run this "
            f"file before anything imports {package}, or skip this file and keep the {package} imported."
        )
    # Drop a finder left by an earlier run of another version of this file (nothing was imported from it).
    sys.meta_path[:] = [finder for finder in sys.meta_path if digest_of(finder) is None]
    installed = importlib.util.find_spec(package)
    if installed is not None:
        warnings.warn(
            f"`import {package}` now loads {bundle}, not the installed {package} at {installed.origin}. "
            f"To use the installed one, don't run or import this file.",
            UserWarning,
            stacklevel=2,
        )

    class BundleLoader(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
        """Finds the bundled modules by name and executes their sources, as the path finder does files."""

        ema_kit_bundle = bundle
        ema_kit_digest = digest

        def find_spec(self, fullname, path=None, target=None):
            if fullname not in modules:
                return None
            spec = importlib.machinery.ModuleSpec(
                fullname, self, origin=self.get_filename(fullname), is_package=self.is_package(fullname)
            )
            spec.has_location = True  # sets __file__: inspect and tracebacks look the lines up by it
            return spec

        def get_filename(self, fullname):
            return f"{location}/{modules[fullname]}"

        def is_package(self, fullname):
            return modules[fullname].endswith("/__init__.py")

        def get_source(self, fullname):
            if fullname not in modules:
                raise ImportError(f"{fullname} is not in {bundle}", name=fullname)
            return sources[modules[fullname]]

        def get_code(self, fullname):
            return compile(self.get_source(fullname), self.get_filename(fullname), "exec", dont_inherit=True)

        def exec_module(self, module):
            source, filename = self.get_source(module.__name__), self.get_filename(module.__name__)
            # mtime None: linecache.checkcache keeps the entry although no such file exists on disk.
            linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
            exec(self.get_code(module.__name__), module.__dict__)

    finder = BundleLoader()
    sys.meta_path.insert(0, finder)
    try:
        importlib.import_module(package)
    except BaseException:
        # Leave the process as it was: no half-imported package, no finder.
        for name, module in list(sys.modules.items()):
            if getattr(module, "__loader__", None) is finder:
                del sys.modules[name]
        sys.meta_path.remove(finder)
        raise
