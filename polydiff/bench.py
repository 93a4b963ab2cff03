"""``polydiff bench``: runs the benchmark suite in ``benchmarks/`` (see benchmarks/README.md)."""

from __future__ import annotations

from typing import Optional


def main(argv: Optional[list[str]] = None) -> None:
    try:
        from benchmarks.suite import main as suite_main
    except ImportError as err:
        raise SystemExit(
            f"polydiff: error: the benchmark suite could not be imported ({err}); install polydiff from a source "
            "checkout with its bench extra: pip install -e '.[bench]'"
        ) from err
    suite_main(argv)
