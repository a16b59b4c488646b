"""Placeholder (see torchvision/__init__.py): every function raises when called."""

from torchvision import placeholder


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return placeholder(f"io.{name}")
