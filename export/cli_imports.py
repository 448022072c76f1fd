"""Our packages and a user's, under the same top-level names, in one process.

Our top-level packages have common names (``models``, ``service``, ``export``) and so do
users' projects: a PyTorch project very often has its own ``models/``. ``python -m export``
puts the current directory first on ``sys.path``, so without care the user's ``models``
shadows ours (our CLI fails to import) or ours shadows theirs (their module's
``from models.blocks import Block`` fails). Both orders are handled here:

- ours first: importing this module imports our packages from where ``export`` itself was
  installed (``ROOT``), whatever ``sys.path`` says, before the CLI imports anything that needs
  them. Once a package is in ``sys.modules``, its submodules resolve through its own
  ``__path__``, so our later imports (lazy ones too) stay ours.
- theirs while their code runs: ``user_code`` moves our modules out of ``sys.modules`` for
  every top-level name the user's search path also provides, so their imports (at load, in
  the factory, in ``forward`` while the exporter traces it) resolve to theirs; ours are put
  back afterwards and theirs set aside. Our code that runs inside (export_onnx) was imported
  before and must import nothing of ours lazily: tests/export/test_cli_any_folder.py exports
  with user packages named export, models and service first on the path, and fails if it does.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

# Where our top-level packages live: the project root (editable install) or site-packages.
ROOT = Path(__file__).resolve().parent.parent
# Every top-level package this distribution installs (pyproject's packages.find).
OUR_PACKAGES = ("export", "models", "service", "benchmarks")
# The ones the export CLI imports, claimed when this module is imported.
CLAIMED = ("models", "service")


class UserModelError(ValueError):
    """``--model`` names nothing usable; the message says what was found instead."""


def is_ours(module: ModuleType) -> bool:
    origin = getattr(module, "__file__", None)
    return origin is not None and Path(origin).resolve().is_relative_to(ROOT)


def claim_our_packages(names: tuple[str, ...] = CLAIMED) -> None:
    """Import our ``names`` from ``ROOT`` unless ours are already imported.

    A same-named module of someone else's already in ``sys.modules`` is replaced: the CLI
    cannot run without ours, and the user's comes back inside ``user_code``.
    """
    for name in names:
        loaded = sys.modules.get(name)
        if loaded is not None and is_ours(loaded):
            continue
        _drop(name)
        init = ROOT / name / "__init__.py"
        spec = importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=[str(init.parent)]
        )
        if spec is None or spec.loader is None:
            raise ImportError(f"our package '{name}' is missing from {ROOT}")
        try:
            _execute(name, spec)
        except BaseException:
            _drop(name)  # and whatever of its submodules got imported
            raise


@contextlib.contextmanager
def user_code(first_on_path: str) -> Iterator[None]:
    """Run the user's code with ``first_on_path`` first on ``sys.path`` and their packages
    visible under names ours also use; ours are restored when it ends."""
    saved_path = list(sys.path)
    sys.path.insert(0, first_on_path)
    conflicts = [name for name in OUR_PACKAGES if _theirs_on_path(name)]
    ours = {key: sys.modules.pop(key) for key in _under(conflicts)}
    importlib.invalidate_caches()
    try:
        yield
    finally:
        for key in _under(conflicts):
            del sys.modules[key]
        sys.modules.update(ours)
        sys.path[:] = saved_path


def load_factory(target: str) -> Callable[[], Any]:
    """The callable named by ``pkg.module:factory`` or ``path/to/file.py:factory``.

    Call it inside the same ``user_code`` block: a dotted module resolves against the
    current directory first, a file against its own folder.
    """
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise UserModelError(
            f"--model must look like pkg.module:factory or path/to/file.py:factory, not '{target}'"
        )
    module = _load_file(Path(module_name)) if module_name.endswith(".py") else None
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not f"{module_name}.".startswith(f"{exc.name}."):
                raise  # the user's module exists and one of its own imports failed
            raise UserModelError(
                f"--model: no module '{module_name}' in the current directory ({os.getcwd()}) "
                "or the installed packages; give pkg.module as imported from here, or "
                "path/to/file.py:factory"
            ) from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise UserModelError(f"'{attr}' in {module_name} is missing or not callable")
    return factory  # type: ignore[no-any-return]


def user_folder(target: str) -> str:
    """The folder that goes first on ``sys.path`` for ``target``: a file's own folder, else
    the current directory (as ``python -c`` would have it)."""
    module_name = target.rpartition(":")[0]
    if module_name.endswith(".py"):
        return str(Path(module_name).resolve().parent)
    return os.getcwd()


def _load_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise UserModelError(f"--model: {path} is not a file")
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) != str(path.resolve()):
        raise UserModelError(
            f"--model: {path} would be imported as '{name}', which names a module already "
            f"imported ({getattr(loaded, '__file__', None) or 'built in'}); rename the file"
        )
    spec = importlib.util.spec_from_file_location(name, path.resolve())
    if spec is None or spec.loader is None:
        raise UserModelError(f"--model: {path} cannot be imported")
    return _execute(name, spec)


def _execute(name: str, spec: importlib.machinery.ModuleSpec) -> ModuleType:
    """Import ``spec`` as ``name``, registered in ``sys.modules`` as an import would (so
    dataclasses and pickle find its classes); nothing is left registered if it fails."""
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _theirs_on_path(name: str) -> bool:
    spec = importlib.machinery.PathFinder.find_spec(name, sys.path)
    if spec is None:
        return False
    # A package by its folder(s): a namespace package has no file of its own.
    places = list(spec.submodule_search_locations or []) or [spec.origin or ""]
    return not any(Path(p).resolve().is_relative_to(ROOT / name) for p in places if p)


def _under(names: list[str]) -> list[str]:
    return [key for key in sys.modules if key.partition(".")[0] in names]


def _drop(name: str) -> None:
    for key in _under([name]):
        del sys.modules[key]


claim_our_packages()
