"""Sphinx configuration for the bilevel documentation.

Build with warnings as errors, as CI does:

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys

# Document the checkout this file lives in, whether or not it is installed.
sys.path.insert(0, os.path.abspath(".."))

import bilevel  # noqa: E402

project = "bilevel"
author = "The bilevel developers"
copyright = "2026, The bilevel developers"
release = bilevel.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: $...$ and $$...$$ maths, ::: fences, and heading anchors for [links](page.md#anchor).
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# autodoc + napoleon: Google-style docstrings ("Args:", "Returns:", "Example:").
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True          # "Attributes:" as a field list: no duplicate object entries
napoleon_use_rtype = False
nitpicky = False

html_theme = "alabaster"
html_title = f"bilevel {release}"
html_static_path: list[str] = []
html_theme_options = {"description": "Hypergradients for bilevel optimization and meta-learning",
                      "fixed_sidebar": True}
