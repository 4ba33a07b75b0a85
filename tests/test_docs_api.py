"""The docs stay in step with the code: every public name is in docs/api.md, every name there
exists, every status is in docs/design.md, and the quickstart's code runs as written."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import bilevel
import bilevel as bl

DOCS = Path(__file__).resolve().parent.parent / "docs"
API = DOCS / "api.md"
# Implementation subpackages: their public names are re-exported by ``bilevel`` and documented there.
REEXPORTED = {"estimators", "inner", "linear"}
_DIRECTIVE = re.compile(r"^\s*\.\. (?:auto(?:class|function|data|module|exception)|py:data)::\s+([\w.]+)", re.M)


def _documented() -> set[str]:
    return set(_DIRECTIVE.findall(API.read_text(encoding="utf-8")))


def _public_modules() -> list:
    """``bilevel``, its public subpackages but the re-exported ones, and their public modules with ``__all__``."""
    modules = [bilevel]
    for info in pkgutil.iter_modules(bilevel.__path__):
        if info.name.startswith("_") or not info.ispkg or info.name in REEXPORTED:
            continue
        package = importlib.import_module(f"bilevel.{info.name}")
        modules.append(package)
        for sub in pkgutil.iter_modules(package.__path__):
            if not sub.name.startswith("_"):
                module = importlib.import_module(f"{package.__name__}.{sub.name}")
                if hasattr(module, "__all__"):
                    modules.append(module)
    return modules


def _ancestors(module) -> list:
    parts = module.__name__.split(".")
    return [importlib.import_module(".".join(parts[:i])) for i in range(1, len(parts))]


def _expected_names() -> set[str]:
    """Dotted names api.md must document. A name that an enclosing package re-exports in its
    ``__all__`` is documented there (e.g. ``bilevel.datasets.Sinusoid``, ``bilevel.Compiled``)."""
    names = set()
    for module in _public_modules():
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if any(name in getattr(a, "__all__", ()) and getattr(a, name, None) is obj for a in _ancestors(module)):
                continue
            names.add(f"{module.__name__}.{name}")
    return names


def test_every_public_name_is_in_api_md():
    missing = sorted(_expected_names() - _documented())
    assert not missing, f"public names missing from docs/api.md (add an autodoc entry for each): {missing}"


def test_top_level_all_is_covered_by_the_check():
    expected = _expected_names()
    assert {f"bilevel.{name}" for name in bilevel.__all__} <= expected
    assert "bilevel.testing.ridge_problem" in expected and "bilevel.datasets.Sinusoid" in expected


def test_every_name_in_api_md_exists():
    for dotted in sorted(_documented()):
        module_name, _, attr = dotted.rpartition(".")
        try:
            obj = importlib.import_module(dotted)
        except ImportError:
            obj = getattr(importlib.import_module(module_name), attr, None)
        assert obj is not None, f"docs/api.md documents {dotted}, which does not exist"


def test_values_written_into_api_md_are_current():
    text = API.read_text(encoding="utf-8")
    pairs = re.findall(r"\.\. py:data:: ([\w.]+)\n(?:   :type:[^\n]*\n)?   :value: ([^\n]+)\n", text)
    assert pairs, "expected py:data entries with :value: in docs/api.md"
    for dotted, value in pairs:
        module_name, _, attr = dotted.rpartition(".")
        assert repr(getattr(importlib.import_module(module_name), attr)) == value, dotted


def test_every_status_is_in_the_design_table():
    design = (DOCS / "design.md").read_text(encoding="utf-8")
    for member in bl.RESULTS:
        assert re.search(rf"^\| `{member.name}` \| {member.code} \|", design, re.M), member.name


def test_index_toctree_lists_exactly_the_pages():
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    pages = set(re.findall(r"^([a-z_]+)$", index, re.M))
    assert {"quickstart", "choosing", "api", "design"} <= pages
    on_disk = {p.stem for p in DOCS.glob("*.md")} - {"index"}
    assert pages == on_disk, (f"pages not in the index.md toctree: {sorted(on_disk - pages)}; "
                              f"toctree entries without a page: {sorted(pages - on_disk)}")


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), re.M | re.S)


@pytest.mark.parametrize("page", ["quickstart.md", "index.md"])
def test_doc_code_runs_as_written(page, capsys):
    blocks = _python_blocks(DOCS / page)
    assert blocks
    namespace: dict = {"__name__": f"docs_{page}"}
    for block in blocks:
        exec(compile(block, f"docs/{page}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "successful" in out


def test_readme_example_runs_as_written(capsys):
    readme = DOCS.parent / "README.md"
    blocks = _python_blocks(readme)
    assert blocks, "README.md should hold a runnable python example"
    namespace: dict = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
