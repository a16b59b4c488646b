"""Placeholder (see torchvision/__init__.py): every function raises when called."""

from torchvision import placeholder
from torchvision.transforms import InterpolationMode  # noqa: F401


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return placeholder(f"transforms.v2.functional.{name}")
