"""FlashComm2 / o_shared settings: where they come from and whether they fit.

Six settings (``parallel_size``, ``oshared``, ``prefetch_step``,
``int8_all_to_all``, ``adaptive_tokens``, ``oshared_storage``), each read from vLLM's
``additional_config`` first and from an environment variable second
(``additional_config`` wins when both are given; the overridden environment
value is then not even parsed). Their names, accepted values and defaults are
in one table, docs/user_guide.md ("Flags").
:func:`parse_flashcomm2_config` only turns raw values into typed ones;
:func:`validate_flashcomm2_config` checks them against the engine's
``VllmConfig``; :func:`get_flashcomm2_config` does both and logs the result.
Every error is a :class:`FlashComm2ConfigError` whose message names the
source (environment variable or ``additional_config["key"]``), the offending
value and the rule it breaks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vllm_ascend_ext.models import MODEL_CLASSES
from vllm_ascend_ext.oshared_storage import AUTO, STORAGES
from vllm_ascend_ext.pipeline_stages import smallest_stage_layers

__all__ = [
    "ADDITIONAL_CONFIG_LAYER_SHARDING",
    "ADDITIONAL_CONFIG_PARALLEL_SIZE",
    "ADDITIONAL_CONFIG_PREFETCH_STEP",
    "ADDITIONAL_CONFIG_ADAPTIVE_TOKENS",
    "ADDITIONAL_CONFIG_INT8_ALL_TO_ALL",
    "ADDITIONAL_CONFIG_OSHARED_STORAGE",
    "DEFAULT_ADAPTIVE_TOKENS",
    "DEFAULT_INT8_ALL_TO_ALL",
    "DEFAULT_OSHARED",
    "DEFAULT_OSHARED_STORAGE",
    "DEFAULT_PARALLEL_SIZE",
    "DEFAULT_PREFETCH_STEP",
    "ENV_ADAPTIVE_TOKENS",
    "ENV_INT8_ALL_TO_ALL",
    "ENV_OSHARED",
    "ENV_OSHARED_STORAGE",
    "ENV_PARALLEL_SIZE",
    "ENV_PREFETCH_STEP",
    "FlashComm2Config",
    "FlashComm2ConfigError",
    "SETTINGS",
    "Setting",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_LAYER_SHARDING",
    "get_flashcomm2_config",
    "parse_flashcomm2_config",
    "validate_flashcomm2_config",
]

ENV_PARALLEL_SIZE = "VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE"
ENV_OSHARED = "VLLM_ASCEND_ENABLE_FLASHCOMM2_OSHARED"
ENV_PREFETCH_STEP = "VLLM_ASCEND_FLASHCOMM2_OSHARED_PREFETCH_STEP"
ENV_INT8_ALL_TO_ALL = "VLLM_ASCEND_FLASHCOMM2_INT8_ALL_TO_ALL"
ENV_ADAPTIVE_TOKENS = "VLLM_ASCEND_FLASHCOMM2_ADAPTIVE_TOKENS"
ENV_OSHARED_STORAGE = "VLLM_ASCEND_FLASHCOMM2_OSHARED_STORAGE"

ADDITIONAL_CONFIG_PARALLEL_SIZE = "enable_flashcomm2_parallel_size"
ADDITIONAL_CONFIG_LAYER_SHARDING = "layer_sharding"
ADDITIONAL_CONFIG_PREFETCH_STEP = "flashcomm2_oshared_prefetch_step"
ADDITIONAL_CONFIG_INT8_ALL_TO_ALL = "flashcomm2_int8_all_to_all"
ADDITIONAL_CONFIG_ADAPTIVE_TOKENS = "flashcomm2_adaptive_tokens"
ADDITIONAL_CONFIG_OSHARED_STORAGE = "flashcomm2_oshared_storage"

#: Model classes whose attention output projection this project replaces:
#: those the plugin registers (models/__init__.py holds only their names).
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(MODEL_CLASSES)

#: Layer names ``additional_config["layer_sharding"]`` may list.
SUPPORTED_LAYER_SHARDING: tuple[str, ...] = ("o_proj",)

DEFAULT_PARALLEL_SIZE = 0
DEFAULT_OSHARED = False
DEFAULT_PREFETCH_STEP = 1
DEFAULT_INT8_ALL_TO_ALL = True
#: Adaptive FlashComm2's token threshold: see docs/flashcomm2.md "Adaptive
#: FlashComm2" for the measurement it comes from.
DEFAULT_ADAPTIVE_TOKENS = 1024
#: o_shared's storage: chosen from the layout (oshared_storage.choose_storage).
DEFAULT_OSHARED_STORAGE = AUTO

_TRUE_WORDS = ("1", "true")
_FALSE_WORDS = ("0", "false")


class FlashComm2ConfigError(ValueError):
    """A FlashComm2 / o_shared setting is malformed or does not fit the engine."""


# --------------------------------------------------------------------------
# parsers: (source label, raw value) -> typed value (pure)
# --------------------------------------------------------------------------

Parser = Callable[[str, Any], Any]


def _ac(key: str) -> str:
    return f'additional_config["{key}"]'


def _bad(source: str, value: Any, rule: str) -> FlashComm2ConfigError:
    return FlashComm2ConfigError(f"{source}={value!r} is invalid: {rule}")


def _non_negative_int(rule: str) -> Parser:
    """A non-negative integer from an int or a decimal string (bools refused)."""

    def parse(source: str, value: Any) -> int:
        if isinstance(value, bool):
            raise _bad(source, value, rule)
        if isinstance(value, int):
            result = value
        elif isinstance(value, str):
            try:
                result = int(value.strip(), 10)
            except ValueError:
                raise _bad(source, value, rule) from None
        else:
            raise _bad(source, value, rule)
        if result < 0:
            raise _bad(source, value, rule)
        return result

    return parse


def _parse_bool(source: str, value: str) -> bool:
    text = value.strip().lower()
    if text in _TRUE_WORDS:
        return True
    if text in _FALSE_WORDS:
        return False
    raise _bad(source, value, "expected one of 0, 1, true, false (case-insensitive)")


def _parse_switch(source: str, value: Any) -> bool:
    """A bool from ``additional_config`` (JSON true/false) or a 0/1/true/false string."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _parse_bool(source, value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _bad(source, value, "expected true or false (or 0 / 1)")


def _parse_storage(source: str, value: Any) -> str:
    text = value.strip().lower() if isinstance(value, str) else value
    if text not in STORAGES:
        raise _bad(source, value, f"expected one of {', '.join(STORAGES)}")
    return text


def _parse_layer_sharding(source: str, value: Any) -> bool:
    if not isinstance(value, (list, tuple)):
        raise _bad(
            source, value,
            f"expected a list of layer names, e.g. {list(SUPPORTED_LAYER_SHARDING)}",
        )
    unknown = [v for v in value if v not in SUPPORTED_LAYER_SHARDING]
    if unknown:
        raise _bad(
            source, value,
            f"unsupported entries {unknown}; only {list(SUPPORTED_LAYER_SHARDING)} "
            "can be sharded",
        )
    return "o_proj" in value


# --------------------------------------------------------------------------
# the settings, one row each
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One setting: where it is read, how it is parsed, what it is unset."""

    name: str  # the FlashComm2Config field
    env: str
    key: str  # additional_config key
    parse: Parser
    default: Any
    # When the environment spells the value differently from additional_config
    # (o_shared: a 0/1 switch there, a list of layer names here).
    parse_env: Parser | None = None

    def default_label(self) -> str:
        """How error messages name the setting when nobody set it."""
        return f"{self.env} (unset; default)"


SETTINGS: tuple[Setting, ...] = (
    Setting("parallel_size", ENV_PARALLEL_SIZE, ADDITIONAL_CONFIG_PARALLEL_SIZE,
            _non_negative_int("the FlashComm2 o_proj TP size must be a non-negative "
                              "integer (0 = off)"), DEFAULT_PARALLEL_SIZE),
    Setting("oshared", ENV_OSHARED, ADDITIONAL_CONFIG_LAYER_SHARDING,
            _parse_layer_sharding, DEFAULT_OSHARED, parse_env=_parse_bool),
    Setting("prefetch_step", ENV_PREFETCH_STEP, ADDITIONAL_CONFIG_PREFETCH_STEP,
            _non_negative_int("the o_shared prefetch step must be a non-negative integer"),
            DEFAULT_PREFETCH_STEP),
    Setting("int8_all_to_all", ENV_INT8_ALL_TO_ALL, ADDITIONAL_CONFIG_INT8_ALL_TO_ALL,
            _parse_switch, DEFAULT_INT8_ALL_TO_ALL),
    Setting("adaptive_tokens", ENV_ADAPTIVE_TOKENS, ADDITIONAL_CONFIG_ADAPTIVE_TOKENS,
            _non_negative_int("the adaptive FlashComm2 threshold must be a non-negative "
                              "integer number of tokens (0 = always FlashComm2)"),
            DEFAULT_ADAPTIVE_TOKENS),
    Setting("oshared_storage", ENV_OSHARED_STORAGE, ADDITIONAL_CONFIG_OSHARED_STORAGE,
            _parse_storage, DEFAULT_OSHARED_STORAGE),
)


@dataclass(frozen=True)
class FlashComm2Config:
    """Effective FlashComm2 settings.

    ``parallel_size``: o_proj TP size ``k`` (0 = FlashComm2 off).
    ``oshared``: o_proj weights stored round-robin over the o_shared group.
    ``prefetch_step``: how many layers ahead o_shared broadcasts a weight.
    ``int8_all_to_all``: send int8 activations where the o_proj takes them.
    ``adaptive_tokens``: at most this many tokens -> plain row-parallel o_proj
    (0 = always FlashComm2).
    ``oshared_storage``: ``auto``, ``tp_shard`` or ``round_robin``
    (``oshared_storage.py``).
    ``sources``: for each of those six field names, a human-readable
    description of where the value came from (``"default"``, an environment
    variable, or an ``additional_config`` key, with the environment value it
    overrode).
    """

    parallel_size: int = DEFAULT_PARALLEL_SIZE
    oshared: bool = DEFAULT_OSHARED
    prefetch_step: int = DEFAULT_PREFETCH_STEP
    int8_all_to_all: bool = DEFAULT_INT8_ALL_TO_ALL
    adaptive_tokens: int = DEFAULT_ADAPTIVE_TOKENS
    oshared_storage: str = DEFAULT_OSHARED_STORAGE
    sources: Mapping[str, str] = field(
        default_factory=lambda: {s.name: "default" for s in SETTINGS},
        compare=False,
        hash=False,
    )
    #: The raw values as given (for error messages); empty for defaults.
    raw_values: Mapping[str, Any] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )
    #: What error messages call each setting: the env var or additional_config
    #: key that gave it, or the env var marked unset.
    labels: Mapping[str, str] = field(
        default_factory=lambda: {s.name: s.default_label() for s in SETTINGS},
        compare=False, hash=False, repr=False,
    )

    @property
    def enabled(self) -> bool:
        """FlashComm2 is on."""
        return self.parallel_size > 0

    @property
    def otp_size(self) -> int:
        """Size of an o_proj TP (OTP) group; 1 when FlashComm2 is off."""
        return max(self.parallel_size, 1)

    def describe(self) -> str:
        """One line with every effective value and its source."""
        return (
            f"FlashComm2 {'on' if self.enabled else 'off'}: "
            f"o_proj TP size={self.parallel_size} [{self.sources['parallel_size']}], "
            f"o_shared={'on' if self.oshared else 'off'} [{self.sources['oshared']}], "
            f"o_shared prefetch step={self.prefetch_step} "
            f"[{self.sources['prefetch_step']}], "
            f"int8 all-to-all={'on' if self.int8_all_to_all else 'off'} "
            f"[{self.sources.get('int8_all_to_all', 'default')}], "
            f"adaptive threshold={self.adaptive_tokens} tokens "
            f"[{self.sources.get('adaptive_tokens', 'default')}], "
            f"o_shared storage={self.oshared_storage} "
            f"[{self.sources.get('oshared_storage', 'default')}]"
        )


# --------------------------------------------------------------------------
# parsing (pure)
# --------------------------------------------------------------------------


def parse_flashcomm2_config(
    env: Mapping[str, str], additional_config: Mapping[str, Any] | None
) -> FlashComm2Config:
    """Typed settings from an environment mapping and ``additional_config``.

    Pure: reads only its arguments.  Raises :class:`FlashComm2ConfigError` for
    values of the wrong type or sign; rules that need the engine configuration
    live in :func:`validate_flashcomm2_config`.
    """
    if additional_config is None:
        additional_config = {}
    if not isinstance(additional_config, Mapping):
        raise FlashComm2ConfigError(
            f"additional_config={additional_config!r} is invalid: expected a mapping"
        )

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    labels: dict[str, str] = {}
    raw_values: dict[str, Any] = {}
    for s in SETTINGS:
        if s.key in additional_config:  # additional_config wins; the env is not parsed
            label, raw, parse = _ac(s.key), additional_config[s.key], s.parse
            source = label
            if s.env in env:
                source += f" (overrides {s.env}={env[s.env]!r})"
        elif s.env in env:
            label, raw, parse = s.env, env[s.env], s.parse_env or s.parse
            source = label
        else:
            values[s.name], sources[s.name], labels[s.name] = (
                s.default, "default", s.default_label())
            continue
        values[s.name] = parse(label, raw)
        sources[s.name], labels[s.name], raw_values[s.name] = source, label, raw
    return FlashComm2Config(**values, sources=sources, raw_values=raw_values, labels=labels)


# --------------------------------------------------------------------------
# validation against the engine configuration
# --------------------------------------------------------------------------


def _raw(cfg: FlashComm2Config, name: str) -> Any:
    """The value as the user wrote it (the typed default when unset)."""
    if name in cfg.raw_values:
        return cfg.raw_values[name]
    return getattr(cfg, name)


#: Settings under which the code around o_proj expects token-sharded hidden
#: states (sequence parallelism). FlashComm2's output is the full [T, h].
#: vllm-ascend v0.25.1rc1 / v0.26: ``ascend_config.py`` (enable_flashcomm1,
#: also forced by enable_shared_expert_dp through ``utils.enable_sp``); vLLM:
#: the sequence-parallel compile pass.
ENV_ASCEND_FLASHCOMM1 = "VLLM_ASCEND_ENABLE_FLASHCOMM1"
TOKEN_SHARDED_ADDITIONAL_CONFIG = ("enable_flashcomm1", "enable_shared_expert_dp")


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "off")
    return bool(value)


def token_sharded_settings(env: Mapping[str, str], vllm_config: Any) -> list[str]:
    """``name=value`` of every setting that asks for token-sharded hidden
    states around o_proj."""
    found = []
    if _truthy(env.get(ENV_ASCEND_FLASHCOMM1, "")):
        found.append(f"{ENV_ASCEND_FLASHCOMM1}={env[ENV_ASCEND_FLASHCOMM1]!r}")
    additional = getattr(vllm_config, "additional_config", None) or {}
    # vllm-ascend honours shared_expert_dp only with expert parallelism (and TP > 1).
    ep = bool(getattr(getattr(vllm_config, "parallel_config", None),
                      "enable_expert_parallel", False))
    for key in TOKEN_SHARDED_ADDITIONAL_CONFIG:
        if key == "enable_shared_expert_dp" and not ep:
            continue
        if isinstance(additional, Mapping) and _truthy(additional.get(key, False)):
            found.append(f"{_ac(key)}={additional[key]!r}")
    from vllm_ascend_ext.compat import sequence_parallel_pass_setting

    sp_pass = sequence_parallel_pass_setting(getattr(vllm_config, "compilation_config", None))
    if sp_pass:
        found.append(sp_pass)
    return found


def graph_capture_mode(vllm_config: Any) -> str | None:
    """The graph-capture mode the engine will replay (None when it runs eagerly).

    ACL graphs on Ascend and CUDA graphs on GPU both follow vLLM's
    ``compilation_config.cudagraph_mode``; ``enforce_eager`` turns it off."""
    model_config = getattr(vllm_config, "model_config", None)
    if getattr(model_config, "enforce_eager", False):
        return None
    mode = getattr(getattr(vllm_config, "compilation_config", None), "cudagraph_mode", None)
    if mode is None:
        return None
    name = getattr(mode, "name", str(mode))
    return None if name.upper() == "NONE" else name


def graph_capture_sizes(vllm_config: Any) -> list[int] | None:
    """The batch sizes vLLM captures graphs for (None when it does not say)."""
    compilation = getattr(vllm_config, "compilation_config", None)
    sizes = getattr(compilation, "cudagraph_capture_sizes", None)
    if sizes:
        return sorted(int(s) for s in sizes)
    largest = getattr(compilation, "max_cudagraph_capture_size", None)
    return None if largest is None else [int(largest)]


def _check_graph_capture(cfg: FlashComm2Config, vllm_config: Any) -> None:
    """o_shared's ring is driven from Python, so a replayed graph must never
    contain a ring operation: every captured size must be a small step, which
    runs plain TP from the shard and touches no o_shared state."""
    mode = graph_capture_mode(vllm_config)
    if mode is None:
        return
    sizes = graph_capture_sizes(vllm_config)
    threshold = cfg.adaptive_tokens
    too_big = [s for s in sizes if s > threshold] if sizes is not None else None
    if too_big == []:
        return
    what = ("vLLM does not say which sizes it captures" if too_big is None else
            f"capture sizes {too_big} exceed the adaptive threshold "
            f"{cfg.labels['adaptive_tokens']}={_raw(cfg, 'adaptive_tokens')!r}")
    raise _bad(
        cfg.labels["oshared"], _raw(cfg, "oshared"),
        f"with o_shared, graph capture (compilation_config.cudagraph_mode={mode}) is "
        f"allowed only for batch sizes at or below the adaptive threshold, which run plain "
        f"TP and no o_shared operation; {what}. Cap the captured sizes at {threshold} "
        f"(compilation_config.max_cudagraph_capture_size), raise the threshold, run "
        "eagerly (--enforce-eager), or turn o_shared off",
    )


def validate_flashcomm2_config(cfg: FlashComm2Config, vllm_config: Any,
                               env: Mapping[str, str] | None = None) -> None:
    """Check ``cfg`` against the engine's ``VllmConfig``.

    Reads ``parallel_config.{tensor,pipeline,data}_parallel_size``,
    ``model_config.hf_config.{num_hidden_layers,architectures}``, the
    sequence-parallel settings and the graph-capture mode.  Nothing is
    checked when FlashComm2 and o_shared are both off.
    """
    env = os.environ if env is None else env
    size_src = cfg.labels["parallel_size"]
    oshared_src = cfg.labels["oshared"]
    step_src = cfg.labels["prefetch_step"]

    if not cfg.oshared and cfg.oshared_storage != AUTO and "oshared_storage" in cfg.raw_values:
        raise _bad(
            cfg.labels["oshared_storage"], _raw(cfg, "oshared_storage"),
            f"the o_shared storage only applies with o_shared on, and o_shared is off "
            f"({oshared_src}={_raw(cfg, 'oshared')!r}); turn o_shared on or drop this setting",
        )
    if cfg.oshared and not cfg.enabled:
        raise _bad(
            oshared_src, _raw(cfg, "oshared"),
            f"o_shared needs FlashComm2, but FlashComm2 is off "
            f"({size_src}={_raw(cfg, 'parallel_size')!r}); set {ENV_PARALLEL_SIZE} "
            f"or {_ac(ADDITIONAL_CONFIG_PARALLEL_SIZE)} to an o_proj TP size >= 1",
        )
    # FlashComm2-only settings given explicitly (and "on") while it is off.
    for name, what in (
        ("int8_all_to_all", "the int8 all-to-all is part of FlashComm2"),
        ("adaptive_tokens", "adaptive FlashComm2 switches between FlashComm2 and plain TP"),
    ):
        if not cfg.enabled and getattr(cfg, name) and name in cfg.raw_values:
            raise _bad(
                cfg.labels[name], _raw(cfg, name),
                f"{what}, but FlashComm2 is off ({size_src}="
                f"{_raw(cfg, 'parallel_size')!r}); set an o_proj TP size >= 1 or drop "
                "this setting",
            )
    if not cfg.enabled:
        return

    parallel = vllm_config.parallel_config
    tp = int(parallel.tensor_parallel_size)
    pp = int(getattr(parallel, "pipeline_parallel_size", 1) or 1)
    k = cfg.parallel_size

    k_raw = _raw(cfg, "parallel_size")
    if tp == 1:
        raise _bad(
            size_src, k_raw,
            "FlashComm2 needs tensor parallelism, but tensor_parallel_size=1",
        )
    if k >= tp:
        raise _bad(
            size_src, k_raw,
            f"the o_proj TP size must be smaller than tensor_parallel_size={tp}",
        )
    if tp % k != 0:
        raise _bad(
            size_src, k_raw,
            f"the o_proj TP size must divide tensor_parallel_size={tp}",
        )

    model_config = getattr(vllm_config, "model_config", None)
    hf_config = getattr(model_config, "hf_config", None)
    if hf_config is None:
        raise FlashComm2ConfigError(
            f"{size_src}={k_raw!r} is invalid: FlashComm2 needs a model configuration to check the "
            "architecture, but vllm_config.model_config is not set"
        )
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise _bad(
            size_src, k_raw,
            f"FlashComm2 does not support architecture {archs or None}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}",
        )

    sharded = token_sharded_settings(env, vllm_config)
    if sharded:
        raise _bad(
            size_src, k_raw,
            f"FlashComm2 returns full (not token-sharded) hidden states, but "
            f"{', '.join(sharded)} makes the layers around o_proj expect token-sharded "
            "ones (FlashComm1 / sequence parallelism); turn that setting off or FlashComm2 off",
        )

    if cfg.oshared:
        kv_role = getattr(getattr(vllm_config, "kv_transfer_config", None), "kv_role", None)
        if kv_role == "kv_consumer":
            raise _bad(
                oshared_src, _raw(cfg, "oshared"),
                "o_shared is for instances that prefill: on a decode-only instance "
                "(kv_transfer_config.kv_role='kv_consumer') every step is small, runs "
                "plain TP's resident slice and never uses the shared o_proj, so o_shared "
                "only adds memory; turn it off on the decode nodes (FlashComm2 and its "
                "adaptive switch may stay on) and keep it on the prefill nodes",
            )
        _check_graph_capture(cfg, vllm_config)
        layers = int(hf_config.num_hidden_layers)
        stage = smallest_stage_layers(layers, pp)
        if stage < 1:
            raise _bad(
                oshared_src, _raw(cfg, "oshared"),
                f"o_shared needs at least one hidden layer per pipeline stage, but "
                f"num_hidden_layers={layers} and pipeline_parallel_size={pp}",
            )
        if not 0 <= cfg.prefetch_step <= stage - 1:
            raise _bad(
                step_src, _raw(cfg, "prefetch_step"),
                f"the o_shared prefetch step must be in [0, {stage - 1}] "
                f"(layers on the smallest pipeline stage - 1: num_hidden_layers="
                f"{layers} // pipeline_parallel_size={pp} = {stage})",
            )


# --------------------------------------------------------------------------
# the engine entry point
# --------------------------------------------------------------------------


def get_flashcomm2_config(
    vllm_config: Any,
    agree: Callable[[FlashComm2Config | None, str | None], None] | None = None,
) -> FlashComm2Config:
    """Parse (``os.environ`` + ``vllm_config.additional_config``), validate, log once.

    ``agree(cfg, error)``, when given, runs between parsing and validation
    with the parsed settings (or the parse error's message): the engine's
    ranks compare their settings there, before anything acts on them
    (``distributed/settings_agreement.py``)."""
    from vllm_ascend_ext.logger import init_logger

    try:
        cfg = parse_flashcomm2_config(
            os.environ, getattr(vllm_config, "additional_config", None) or {}
        )
    except FlashComm2ConfigError as e:
        if agree is not None:
            agree(None, str(e))  # raises, naming every rank's problem
        raise
    if agree is not None:
        agree(cfg, None)
    validate_flashcomm2_config(cfg, vllm_config)
    logger = init_logger(__name__)
    parallel = vllm_config.parallel_config
    logger.info_once(
        "%s (tensor_parallel_size=%d, pipeline_parallel_size=%d, "
        "data_parallel_size=%d)",
        cfg.describe(),
        parallel.tensor_parallel_size,
        getattr(parallel, "pipeline_parallel_size", 1),
        getattr(parallel, "data_parallel_size", 1),
    )
    return cfg
