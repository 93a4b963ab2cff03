"""polydiff: a domain-agnostic diffusion toolkit (audio, molecules, images and your own data)."""

from .conditioning import NULL_LABEL, drop_condition, is_null, null_condition
from .domain import Batch, Domain
from .registry import get_domain, list_domains, register_domain
from .space import DenseSpace, RaggedSpace, Space

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "DenseSpace",
    "Domain",
    "NULL_LABEL",
    "RaggedSpace",
    "Space",
    "drop_condition",
    "get_domain",
    "is_null",
    "list_domains",
    "load_run",
    "null_condition",
    "register_domain",
]


def __getattr__(name: str):
    """``polydiff.load_run`` (see :func:`polydiff.build.load_run`), imported on first use: ``import polydiff`` stays light."""
    if name == "load_run":
        from .build import load_run

        return load_run
    raise AttributeError(f"module 'polydiff' has no attribute {name!r}")
