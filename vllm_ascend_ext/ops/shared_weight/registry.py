"""Name -> series map: how the custom ops find a series from plain arguments."""

from __future__ import annotations

from typing import Any, Protocol

from vllm_ascend_ext.ops.shared_weight.errors import SharedWeightError

__all__ = ["RegisteredSeries", "SharedWeightRegistry", "shared_weight_registry"]


class RegisteredSeries(Protocol):
    """What the registry and the ops need of a series (``series.SharedWeightSeries``;
    a protocol, so this module does not import the series that imports it)."""

    name: str

    def ring_for(self, position: int) -> Any: ...

    def close(self) -> None: ...


class SharedWeightRegistry:
    """Name -> series map the custom ops use to find a series from plain args."""

    def __init__(self) -> None:
        self._series: dict[str, RegisteredSeries] = {}

    def register(self, series: RegisteredSeries) -> None:
        if series.name in self._series:
            raise SharedWeightError(
                f"a shared-weight series named {series.name!r} is already "
                "registered; series names must be unique"
            )
        self._series[series.name] = series

    def unregister(self, name: str) -> None:
        self._series.pop(name, None)

    def get(self, name: str) -> RegisteredSeries:
        try:
            return self._series[name]
        except KeyError:
            raise SharedWeightError(
                f"no shared-weight series named {name!r} is registered "
                "(closed, or never created)"
            ) from None

    def find(self, name: str) -> RegisteredSeries | None:
        return self._series.get(name)

    def clear(self) -> None:
        for series in list(self._series.values()):
            series.close()
        self._series.clear()

    def names(self) -> list[str]:
        return list(self._series)

    def __contains__(self, name: object) -> bool:
        return name in self._series

    def __len__(self) -> int:
        return len(self._series)


#: The one registry the custom ops consult.
shared_weight_registry = SharedWeightRegistry()
