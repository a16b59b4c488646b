"""Placeholder (see torchvision/__init__.py)."""
