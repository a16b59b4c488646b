"""The text shipped with the package (``data/corpus.txt``): the tokenizer is
trained on it, the tiny models learn it (``train.py``), the MTP layer is
fitted on its lines (``mtp.py``) and W8A8 static scales are calibrated on it
(``w8a8.py``). A module of its own, so that none of those imports another."""

from __future__ import annotations

from importlib import resources


def corpus_text() -> str:
    return resources.files(__package__).joinpath("data/corpus.txt").read_text()


def corpus_lines() -> list[str]:
    """The corpus' non-empty lines."""
    return [ln for ln in corpus_text().splitlines() if ln.strip()]
