"""``python -m bilevel ...`` is the ``bilevel`` command."""

from ._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
