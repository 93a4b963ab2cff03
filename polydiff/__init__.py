"""polydiff: a domain-agnostic diffusion toolkit (audio, molecules, images and your own data)."""

import importlib

from .conditioning import NULL_LABEL, drop_condition, is_null, null_condition
from .domain import Domain

# Eager, unlike the names below: the submodule polydiff.generate, once imported, would hide a lazy name.
from .generate import generate
from .registry import get_domain, list_domains, register_domain
from .space import DenseSpace, RaggedSpace, Space
from .state import Batch, Known

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
    "Known",
    "generate",
    "make_schedule",
    "register_objective",
    "register_sampler",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
]

# Imported on first use (``polydiff.load_run`` needs Hydra's config machinery): ``import polydiff`` stays light.
_LAZY = {
    "load_run": "build",
    "make_schedule": "schedules",
    "register_objective": "objectives",
    "register_sampler": "samplers",
    "sample": "samplers",
    "sample_ddim": "samplers",
    "sample_ddpm": "samplers",
    "sample_dpmpp_2m": "samplers",
}


def __getattr__(name: str):
    """The names of :data:`_LAZY` (``polydiff.load_run`` is :func:`polydiff.build.load_run`), imported on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'polydiff' has no attribute {name!r}")
