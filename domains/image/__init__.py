"""Image domain: built-in 8x8 digits, folders of PNG/JPEG images and CIFAR-10 on the shared 2-D U-Net."""

from .domain import ImageDomain

__all__ = ["ImageDomain"]
