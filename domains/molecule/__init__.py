"""3-D molecule generation with equivariant diffusion (EDM, Hoogeboom et al. 2022)."""

from .domain import MoleculeDomain
from .egnn import EGNN

__all__ = ["MoleculeDomain", "EGNN"]
