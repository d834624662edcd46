"""The fingerprint of the code that shapes an artefact: a changed line there gives a new id, anything else does not."""

from __future__ import annotations

import hashlib
import importlib.util
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _module_files(name: str) -> list[tuple[str, Path]]:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"code_version: no module {name!r}")
    if spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
        return [(f"{name}/{f.relative_to(root).as_posix()}", f) for f in sorted(root.rglob("*.py"))]
    return [(name, Path(spec.origin))]


def code_version(*modules: str) -> str:
    """Package version plus a hash of the source of the given modules and packages (dotted names, recursively).

    Each artefact names exactly the code that shapes its content: a dataset's stages and its job, a checkpoint's
    model code. Hashing by module name (not by location) gives the same fingerprint in any checkout.
    """
    if not modules:
        raise ValueError("code_version needs the modules that shape the artefact")
    try:
        package_version = version("ultraclean-factory")
    except PackageNotFoundError:
        package_version = "0+unknown"
    digest = hashlib.sha256()
    for name, path in sorted({entry for module in modules for entry in _module_files(module)}):
        digest.update(name.encode())
        digest.update(path.read_bytes())
    return f"{package_version}+{digest.hexdigest()[:12]}"
