"""Find the shared real data sets for tests, and skip cleanly when they are absent.

The data lives outside the repository (it is not redistributed with the code). Tests look
in ``$BILEVEL_DATA`` or, if that variable is unset, in ``<repo root>/../shared/data``; a
test that needs a data set that is not there is skipped, not failed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ENV_VAR = "BILEVEL_DATA"
_DEFAULT_ROOT = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def data_dir(name: str) -> Path:
    """Folder of the data set ``name`` (e.g. ``"a9a"``, ``"mnist"``), or skip the test.

    Example:
        >>> def test_a9a_shape():  # doctest: +SKIP
        ...     X, y = load_a9a(data_dir("a9a"))
    """
    hint = (f"Set {ENV_VAR} to the folder holding a9a/, mnist/, omniglot/ (see README) "
            "to run the real-data tests.")
    if os.environ.get(ENV_VAR):
        root = Path(os.environ[ENV_VAR]).expanduser()
        source = f"{ENV_VAR}={root}"
    else:
        root = _DEFAULT_ROOT
        source = f"{ENV_VAR} unset, default {root}"
    folder = root / name
    if not folder.is_dir():
        pytest.skip(f"real data set {name!r} not found at {folder} ({source}). {hint}")
    return folder
