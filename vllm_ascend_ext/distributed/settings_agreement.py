"""Every rank of an engine runs the same FlashComm2 settings, or none starts.

Each host of a multi-node launch builds its configuration from its own
environment and command line (a headless node never sees the head's
``--additional-config``).  A host with other FlashComm2 flags would create
other process groups and then wait forever in a collective its peers never
enter.  So before the first FlashComm2 collective, every rank -- also one
whose own flags say FlashComm2 is off -- publishes its effective settings
and the plugin version, and reads everyone else's.

The exchange goes through the torch.distributed store, not a collective:
a store read has a timeout, and a rank that never publishes (a host without
this plugin, or one that died before) cannot make a peer wait in a
collective.  Every rank reads the same records, so every rank reaches the
same verdict and raises the same :class:`FlashComm2ConfigError`.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from vllm_ascend_ext.config import SETTINGS, FlashComm2Config, FlashComm2ConfigError

__all__ = [
    "AGREEMENT_TIMEOUT_S",
    "AGREED_FIELDS",
    "RankSettings",
    "agree_on_settings",
    "compare_rank_settings",
]

#: How long a rank waits for every other rank's record. Ranks reach the
#: check within seconds of each other (it runs right after vLLM's own group
#: set-up, which is itself collective), so this bounds only the case of a
#: rank that never publishes.
AGREEMENT_TIMEOUT_S = 60.0

#: (field, how the user sets it) for the five settings that must agree.
AGREED_FIELDS: tuple[tuple[str, str], ...] = tuple(
    (s.name, f'{s.env} / additional_config["{s.key}"]') for s in SETTINGS
)

_KEY_PREFIX = "vllm_ascend_ext/flashcomm2-settings"
# One exchange per model build; every rank builds its model(s) in the same order.
_exchange_ids = itertools.count()

_FIX = ("Give every node the same FLASHCOMM2 environment variables and the same "
        "--additional-config: each node of a multi-node launch (also a --headless one) "
        "builds its settings from its own environment and command line.")


@dataclass(frozen=True)
class RankSettings:
    """What one rank publishes: who it is, and what it runs (or why it cannot)."""

    rank: int
    address: str
    hostname: str
    plugin_version: str
    values: Mapping[str, Any] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)
    #: The rank's own configuration error, if its flags did not even parse.
    error: str | None = None

    @classmethod
    def of(cls, rank: int, cfg: FlashComm2Config | None, error: str | None = None
           ) -> "RankSettings":
        from vllm_ascend_ext import __version__

        values, sources = {}, {}
        if cfg is not None:
            values = {name: getattr(cfg, name) for name, _ in AGREED_FIELDS}
            sources = {name: cfg.sources.get(name, "default") for name, _ in AGREED_FIELDS}
        return cls(rank=rank, address=_host_address(), hostname=socket.gethostname(),
                   plugin_version=__version__, values=values, sources=sources, error=error)

    def where(self) -> str:
        return f"rank {self.rank} on {self.address} ({self.hostname})"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "RankSettings":
        return cls(**json.loads(text))


def _host_address() -> str:
    try:
        from vllm.utils.network_utils import get_ip  # vLLM 0.27.1 and 0.32.0

        return get_ip()
    except Exception:  # noqa: BLE001 - an address is only for the message
        return os.environ.get("VLLM_HOST_IP", "unknown address")


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return repr(value)


def compare_rank_settings(records: Sequence[RankSettings]) -> str | None:
    """The disagreement between ``records`` as a readable report, or None."""
    problems: list[str] = []
    broken = [r for r in records if r.error is not None]
    for r in broken:
        problems.append(f"{r.where()} rejected its own FlashComm2 settings: {r.error}")
    versions = {r.plugin_version for r in records}
    if len(versions) > 1:
        lines = [f"    {r.where()}: {r.plugin_version}" for r in records]
        problems.append("vllm-ascend-ext versions differ:\n" + "\n".join(lines))
    good = [r for r in records if r.error is None]
    for name, how in AGREED_FIELDS:
        if len({json.dumps(r.values.get(name)) for r in good}) <= 1:
            continue
        lines = [f"    {r.where()}: {_show(r.values.get(name))} [{r.sources.get(name)}]"
                 for r in good]
        problems.append(f"{name} ({how}) differs:\n" + "\n".join(lines))
    if not problems:
        return None
    return "\n  ".join(problems)


def _default_store():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    # torch's own handle on the store the default group was built from
    # (the same in torch 2.10, which torch_npu pins, and 2.13).
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def agree_on_settings(cfg: FlashComm2Config | None, error: str | None = None, *,
                      timeout_s: float = AGREEMENT_TIMEOUT_S) -> None:
    """Publish this rank's settings (or its own configuration ``error``),
    read every rank's, and raise :class:`FlashComm2ConfigError` on every rank
    when they differ or a rank does not publish within ``timeout_s``.

    A no-op outside torch.distributed or in a one-rank world."""
    import torch.distributed as dist

    store = _default_store()
    if store is None or dist.get_world_size() == 1:
        if error is not None:
            raise FlashComm2ConfigError(error)
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    prefix = f"{_KEY_PREFIX}/{next(_exchange_ids)}"
    mine = RankSettings.of(rank, cfg, error)
    store.set(f"{prefix}/{rank}", mine.to_json())
    keys = [f"{prefix}/{r}" for r in range(world)]
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except Exception as e:  # noqa: BLE001 - torch raises DistStoreError / RuntimeError
        missing = [r for r, k in enumerate(keys) if not store.check([k])]
        raise FlashComm2ConfigError(
            f"FlashComm2 settings check: rank(s) {missing} of {world} did not report their "
            f"FlashComm2 settings within {timeout_s:.0f} s ({type(e).__name__}). A node "
            f"without vllm-ascend-ext {mine.plugin_version}, or one that failed earlier "
            f"(see its log), cannot take part. This is {mine.where()}. Install the same "
            f"vllm-ascend-ext on every node. {_FIX}") from None
    records = [RankSettings.from_json(store.get(k)) for k in keys]
    report = compare_rank_settings(records)
    if report is not None:
        raise FlashComm2ConfigError(
            "FlashComm2 settings differ between the ranks of this engine, which would "
            f"hang the first FlashComm2 collective:\n  {report}\n{_FIX}")
    from vllm_ascend_ext.logger import init_logger

    hosts = sorted({r.address for r in records})
    init_logger(__name__).info(
        "[vllm_ascend_ext] FlashComm2 settings agreed by all %d ranks on %d host(s) %s "
        "(vllm-ascend-ext %s)", world, len(hosts), ", ".join(hosts), mine.plugin_version)
