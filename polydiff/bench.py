"""``polydiff bench``: runs the benchmark suite in ``benchmarks/`` (see benchmarks/README.md)."""

from __future__ import annotations

from typing import Optional


def main(argv: Optional[list[str]] = None) -> None:
    try:
        from benchmarks.suite import main as suite_main
    except ImportError as err:
        raise SystemExit(
            f"polydiff: error: the benchmark suite could not be imported ({err}); install the peers with "
            "pip install 'polydiff[bench]', and run from another folder if this one has a benchmarks/ package "
            "of its own"
        ) from err
    suite_main(argv)
