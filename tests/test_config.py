"""FlashComm2 flags: parsing, precedence, validation and the exact error texts."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from vllm_ascend_ext.config import (
    ENV_ADAPTIVE_TOKENS as ENV_ADAPTIVE,
    ENV_OSHARED,
    ENV_OSHARED_STORAGE as ENV_STORAGE,
    ENV_PARALLEL_SIZE,
    ENV_PREFETCH_STEP,
    SUPPORTED_ARCHITECTURES,
    FlashComm2Config,
    FlashComm2ConfigError,
    get_flashcomm2_config,
    parse_flashcomm2_config,
    validate_flashcomm2_config,
)

SIZE_RULE = "the FlashComm2 o_proj TP size must be a non-negative integer (0 = off)"
STEP_RULE = "the o_shared prefetch step must be a non-negative integer"
BOOL_RULE = "expected one of 0, 1, true, false (case-insensitive)"
AC_SIZE = 'additional_config["enable_flashcomm2_parallel_size"]'
AC_SHARD = 'additional_config["layer_sharding"]'
AC_STEP = 'additional_config["flashcomm2_oshared_prefetch_step"]'


# --------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------

PARSE_OK = [
    # id, env, additional_config, (size, oshared, step), sources subset
    ("defaults", {}, None, (0, False, 1),
     {"parallel_size": "default", "oshared": "default", "prefetch_step": "default"}),
    ("env-all", {ENV_PARALLEL_SIZE: "2", ENV_OSHARED: "TRUE", ENV_PREFETCH_STEP: "0"},
     {}, (2, True, 0),
     {"parallel_size": ENV_PARALLEL_SIZE, "oshared": ENV_OSHARED,
      "prefetch_step": ENV_PREFETCH_STEP}),
    ("env-bool-words", {ENV_OSHARED: "False"}, None, (0, False, 1), {}),
    ("env-bool-1", {ENV_OSHARED: "1", ENV_PARALLEL_SIZE: " 4 "}, None, (4, True, 1), {}),
    ("ac-all", {}, {"enable_flashcomm2_parallel_size": 2, "layer_sharding": ["o_proj"],
                    "flashcomm2_oshared_prefetch_step": 3}, (2, True, 3),
     {"parallel_size": AC_SIZE, "oshared": AC_SHARD, "prefetch_step": AC_STEP}),
    ("ac-string-int", {}, {"enable_flashcomm2_parallel_size": "2"}, (2, False, 1), {}),
    ("ac-over-env", {ENV_PARALLEL_SIZE: "4", ENV_OSHARED: "1", ENV_PREFETCH_STEP: "5"},
     {"enable_flashcomm2_parallel_size": 2, "layer_sharding": [],
      "flashcomm2_oshared_prefetch_step": 0}, (2, False, 0),
     {"parallel_size": f"{AC_SIZE} (overrides {ENV_PARALLEL_SIZE}='4')",
      "oshared": f"{AC_SHARD} (overrides {ENV_OSHARED}='1')"}),
    # The overridden env value is not parsed at all.
    ("ac-hides-bad-env", {ENV_PARALLEL_SIZE: "abc"},
     {"enable_flashcomm2_parallel_size": 1}, (1, False, 1), {}),
    ("ac-tuple-sharding", {}, {"layer_sharding": ("o_proj",)}, (0, True, 1), {}),
]


@pytest.mark.parametrize("env,ac,expected,sources", [c[1:] for c in PARSE_OK],
                         ids=[c[0] for c in PARSE_OK])
def test_parse_ok(env, ac, expected, sources):
    cfg = parse_flashcomm2_config(env, ac)
    assert (cfg.parallel_size, cfg.oshared, cfg.prefetch_step) == expected
    assert cfg.enabled == (expected[0] > 0)
    for key, src in sources.items():
        assert cfg.sources[key] == src


PARSE_ERRORS = [
    ("env-storage-word", {ENV_STORAGE: "sharded"}, None,
     f"{ENV_STORAGE}='sharded' is invalid: expected one of auto, tp_shard, round_robin"),
    ("ac-storage-type", {}, {"flashcomm2_oshared_storage": 1},
     'additional_config["flashcomm2_oshared_storage"]=1 is invalid: expected one of auto, '
     "tp_shard, round_robin"),
    ("env-size-word", {ENV_PARALLEL_SIZE: "abc"}, None,
     f"{ENV_PARALLEL_SIZE}='abc' is invalid: {SIZE_RULE}"),
    ("env-size-negative", {ENV_PARALLEL_SIZE: "-1"}, None,
     f"{ENV_PARALLEL_SIZE}='-1' is invalid: {SIZE_RULE}"),
    ("env-size-float", {ENV_PARALLEL_SIZE: "1.5"}, None,
     f"{ENV_PARALLEL_SIZE}='1.5' is invalid: {SIZE_RULE}"),
    ("env-size-empty", {ENV_PARALLEL_SIZE: ""}, None,
     f"{ENV_PARALLEL_SIZE}='' is invalid: {SIZE_RULE}"),
    ("ac-size-negative", {}, {"enable_flashcomm2_parallel_size": -2},
     f"{AC_SIZE}=-2 is invalid: {SIZE_RULE}"),
    ("ac-size-bool", {}, {"enable_flashcomm2_parallel_size": True},
     f"{AC_SIZE}=True is invalid: {SIZE_RULE}"),
    ("ac-size-float", {}, {"enable_flashcomm2_parallel_size": 2.0},
     f"{AC_SIZE}=2.0 is invalid: {SIZE_RULE}"),
    ("ac-size-word", {}, {"enable_flashcomm2_parallel_size": "two"},
     f"{AC_SIZE}='two' is invalid: {SIZE_RULE}"),
    ("env-bool-yes", {ENV_OSHARED: "yes"}, None,
     f"{ENV_OSHARED}='yes' is invalid: {BOOL_RULE}"),
    ("env-bool-2", {ENV_OSHARED: "2"}, None, f"{ENV_OSHARED}='2' is invalid: {BOOL_RULE}"),
    ("ac-sharding-not-list", {}, {"layer_sharding": "o_proj"},
     f"{AC_SHARD}='o_proj' is invalid: expected a list of layer names, e.g. ['o_proj']"),
    ("ac-sharding-unknown", {}, {"layer_sharding": ["o_proj", "q_proj"]},
     f"{AC_SHARD}=['o_proj', 'q_proj'] is invalid: unsupported entries ['q_proj']; "
     "only ['o_proj'] can be sharded"),
    ("env-step-negative", {ENV_PREFETCH_STEP: "-1"}, None,
     f"{ENV_PREFETCH_STEP}='-1' is invalid: {STEP_RULE}"),
    ("ac-step-word", {}, {"flashcomm2_oshared_prefetch_step": "abc"},
     f"{AC_STEP}='abc' is invalid: {STEP_RULE}"),
]


@pytest.mark.parametrize("env,ac,message", [c[1:] for c in PARSE_ERRORS],
                         ids=[c[0] for c in PARSE_ERRORS])
def test_parse_errors(env, ac, message):
    with pytest.raises(FlashComm2ConfigError) as info:
        parse_flashcomm2_config(env, ac)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


def test_parse_is_pure_and_frozen(monkeypatch):
    monkeypatch.setenv(ENV_PARALLEL_SIZE, "2")
    cfg = parse_flashcomm2_config({}, None)
    assert cfg.parallel_size == 0  # os.environ is not read
    with pytest.raises(AttributeError):
        cfg.parallel_size = 3  # type: ignore[misc]
    assert cfg == FlashComm2Config(0, False, 1)
    assert hash(cfg) == hash(FlashComm2Config(0, False, 1))


# --------------------------------------------------------------------------
# validation against the engine configuration
# --------------------------------------------------------------------------


def _vllm_config(tp=4, pp=1, dp=1, arch="DeepseekV3ForCausalLM", layers=8,
                 additional=None, graphs=None, eager=False, sp_pass=False, ep=False,
                 capture=None):
    """A real ParallelConfig, HF config and CompilationConfig, in a minimal
    VllmConfig stand-in (a real ModelConfig needs a checkpoint directory; see
    test_real_vllm_config). ``graphs``: a CUDAGraphMode name to capture with;
    ``capture``: the batch sizes it captures."""
    from transformers import PretrainedConfig
    from vllm.config import CompilationConfig, CUDAGraphMode, ParallelConfig

    hf = PretrainedConfig(architectures=[arch], num_hidden_layers=layers)
    compilation = CompilationConfig(cudagraph_mode=CUDAGraphMode[graphs or "NONE"],
                                    **({} if capture is None else
                                       {"cudagraph_capture_sizes": capture}))
    if sp_pass:  # vLLM's sequence-parallel pass (pass_config.enable_sp up to 0.27.x)
        compilation = SimpleNamespace(cudagraph_mode=compilation.cudagraph_mode,
                                      pass_config=SimpleNamespace(enable_sp=True))
    return SimpleNamespace(
        parallel_config=ParallelConfig(
            tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp,
            enable_expert_parallel=ep,
        ),
        model_config=SimpleNamespace(hf_config=hf, enforce_eager=eager),
        compilation_config=compilation,
        additional_config=additional or {},
    )


SUPPORTED_TEXT = ", ".join(SUPPORTED_ARCHITECTURES)
SHARDED_RULE = ("FlashComm2 returns full (not token-sharded) hidden states, but "
                "VLLM_ASCEND_ENABLE_FLASHCOMM1=%s makes the layers around o_proj expect "
                "token-sharded ones (FlashComm1 / sequence parallelism); turn that setting "
                "off or FlashComm2 off")

VALIDATE_ERRORS = [
    ("tp1", {ENV_PARALLEL_SIZE: "1"}, None, dict(tp=1),
     f"{ENV_PARALLEL_SIZE}='1' is invalid: FlashComm2 needs tensor parallelism, "
     "but tensor_parallel_size=1"),
    ("size-eq-tp", {ENV_PARALLEL_SIZE: "4"}, None, dict(tp=4),
     f"{ENV_PARALLEL_SIZE}='4' is invalid: the o_proj TP size must be smaller than "
     "tensor_parallel_size=4"),
    ("size-gt-tp", {}, {"enable_flashcomm2_parallel_size": 8}, dict(tp=4),
     f"{AC_SIZE}=8 is invalid: the o_proj TP size must be smaller than "
     "tensor_parallel_size=4"),
    ("size-not-divisor", {ENV_PARALLEL_SIZE: "4"}, None, dict(tp=6),
     f"{ENV_PARALLEL_SIZE}='4' is invalid: the o_proj TP size must divide "
     "tensor_parallel_size=6"),
    ("oshared-without-fc2-env", {ENV_OSHARED: "1"}, None, dict(),
     f"{ENV_OSHARED}='1' is invalid: o_shared needs FlashComm2, but FlashComm2 is off "
     f"({ENV_PARALLEL_SIZE} (unset; default)=0); set {ENV_PARALLEL_SIZE} or {AC_SIZE} "
     "to an o_proj TP size >= 1"),
    ("oshared-without-fc2-ac", {ENV_PARALLEL_SIZE: "0"}, {"layer_sharding": ["o_proj"]},
     dict(),
     f"{AC_SHARD}=['o_proj'] is invalid: o_shared needs FlashComm2, but FlashComm2 is "
     f"off ({ENV_PARALLEL_SIZE}='0'); set {ENV_PARALLEL_SIZE} or {AC_SIZE} to an "
     "o_proj TP size >= 1"),
    ("step-too-large", {ENV_PARALLEL_SIZE: "1", ENV_OSHARED: "1", ENV_PREFETCH_STEP: "4"},
     None, dict(tp=4, pp=2, layers=8),
     f"{ENV_PREFETCH_STEP}='4' is invalid: the o_shared prefetch step must be in "
     "[0, 3] (layers on the smallest pipeline stage - 1: num_hidden_layers=8 // "
     "pipeline_parallel_size=2 = 4)"),
    ("step-default-one-layer-stage", {ENV_PARALLEL_SIZE: "2", ENV_OSHARED: "true"}, None,
     dict(tp=4, pp=2, layers=3),
     f"{ENV_PREFETCH_STEP} (unset; default)=1 is invalid: the o_shared prefetch step "
     "must be in [0, 0] (layers on the smallest pipeline stage - 1: "
     "num_hidden_layers=3 // pipeline_parallel_size=2 = 1)"),
    ("step-ac", {}, {"enable_flashcomm2_parallel_size": 1, "layer_sharding": ["o_proj"],
                     "flashcomm2_oshared_prefetch_step": 61}, dict(tp=16, layers=61),
     f"{AC_STEP}=61 is invalid: the o_shared prefetch step must be in [0, 60] "
     "(layers on the smallest pipeline stage - 1: num_hidden_layers=61 // "
     "pipeline_parallel_size=1 = 61)"),
    ("unsupported-arch", {ENV_PARALLEL_SIZE: "1"}, None, dict(arch="LlamaForCausalLM"),
     f"{ENV_PARALLEL_SIZE}='1' is invalid: FlashComm2 does not support architecture "
     f"['LlamaForCausalLM']; supported: {SUPPORTED_TEXT}"),
    # Token-sharded hidden states around o_proj (docs/ascend.md, contract 3).
    ("flashcomm1-env", {ENV_PARALLEL_SIZE: "1", "VLLM_ASCEND_ENABLE_FLASHCOMM1": "1"}, None,
     dict(), f"{ENV_PARALLEL_SIZE}='1' is invalid: " + SHARDED_RULE % repr("1")),
    ("shared-expert-dp", {ENV_PARALLEL_SIZE: "1"}, None,
     dict(additional={"enable_shared_expert_dp": True}, ep=True),
     f"{ENV_PARALLEL_SIZE}='1' is invalid: FlashComm2 returns full (not token-sharded) "
     'hidden states, but additional_config["enable_shared_expert_dp"]=True makes the layers '
     "around o_proj expect token-sharded ones (FlashComm1 / sequence parallelism); turn that "
     "setting off or FlashComm2 off"),
    ("sp-pass-and-flashcomm1", {ENV_PARALLEL_SIZE: "2"}, None,
     dict(additional={"enable_flashcomm1": True}, sp_pass=True),
     f"{ENV_PARALLEL_SIZE}='2' is invalid: FlashComm2 returns full (not token-sharded) "
     'hidden states, but additional_config["enable_flashcomm1"]=True, '
     "compilation_config.pass_config.enable_sp=True makes the layers around o_proj expect "
     "token-sharded ones (FlashComm1 / sequence parallelism); turn that setting off or "
     "FlashComm2 off"),
    # Graph capture with o_shared (contract 5): only sizes that run plain TP.
    ("oshared-graphs-above-threshold", {ENV_PARALLEL_SIZE: "1", ENV_OSHARED: "1"}, None,
     dict(graphs="PIECEWISE", capture=[1, 2, 4, 512, 2048, 4096]),
     f"{ENV_OSHARED}='1' is invalid: with o_shared, graph capture "
     "(compilation_config.cudagraph_mode=PIECEWISE) is allowed only for batch sizes at or "
     "below the adaptive threshold, which run plain TP and no o_shared operation; capture "
     f"sizes [2048, 4096] exceed the adaptive threshold {ENV_ADAPTIVE} (unset; default)=1024. "
     "Cap the captured sizes at 1024 (compilation_config.max_cudagraph_capture_size), raise "
     "the threshold, run eagerly (--enforce-eager), or turn o_shared off"),
    ("oshared-graphs-threshold-0", {ENV_PARALLEL_SIZE: "1", ENV_OSHARED: "1",
                                    ENV_ADAPTIVE: "0"}, None,
     dict(graphs="FULL", capture=[1, 2]),
     f"{ENV_OSHARED}='1' is invalid: with o_shared, graph capture "
     "(compilation_config.cudagraph_mode=FULL) is allowed only for batch sizes at or "
     "below the adaptive threshold, which run plain TP and no o_shared operation; capture "
     f"sizes [1, 2] exceed the adaptive threshold {ENV_ADAPTIVE}='0'. "
     "Cap the captured sizes at 0 (compilation_config.max_cudagraph_capture_size), raise "
     "the threshold, run eagerly (--enforce-eager), or turn o_shared off"),
    ("oshared-graphs-sizes-unknown", {ENV_PARALLEL_SIZE: "1", ENV_OSHARED: "1"}, None,
     dict(graphs="PIECEWISE"),
     f"{ENV_OSHARED}='1' is invalid: with o_shared, graph capture "
     "(compilation_config.cudagraph_mode=PIECEWISE) is allowed only for batch sizes at or "
     "below the adaptive threshold, which run plain TP and no o_shared operation; vLLM does "
     "not say which sizes it captures. Cap the captured sizes at 1024 "
     "(compilation_config.max_cudagraph_capture_size), raise the threshold, run eagerly "
     "(--enforce-eager), or turn o_shared off"),
    # The storage setting.
    ("storage-without-oshared", {ENV_PARALLEL_SIZE: "1"},
     {"flashcomm2_oshared_storage": "round_robin"}, dict(),
     f'additional_config["flashcomm2_oshared_storage"]=\'round_robin\' is invalid: the '
     "o_shared storage only applies with o_shared on, and o_shared is off "
     f"({ENV_OSHARED} (unset; default)=False); turn o_shared on or drop this setting"),
]


@pytest.mark.parametrize("env,ac,vc,message", [c[1:] for c in VALIDATE_ERRORS],
                         ids=[c[0] for c in VALIDATE_ERRORS])
def test_validate_errors(env, ac, vc, message):
    cfg = parse_flashcomm2_config(env, ac)
    with pytest.raises(FlashComm2ConfigError) as info:
        validate_flashcomm2_config(cfg, _vllm_config(**vc), env)
    assert str(info.value) == message


VALIDATE_OK = [
    ("off-any-arch", {}, None, dict(tp=1, arch="LlamaForCausalLM")),
    ("off-ignores-step", {ENV_PREFETCH_STEP: "99"}, None, dict(layers=2)),
    ("k1-tp2", {ENV_PARALLEL_SIZE: "1"}, None, dict(tp=2, arch="Qwen3ForCausalLM")),
    ("k2-tp8-oshared", {ENV_PARALLEL_SIZE: "2", ENV_OSHARED: "1", ENV_PREFETCH_STEP: "3"},
     None, dict(tp=8, pp=2, dp=2, layers=8, arch="Qwen3MoeForCausalLM")),
    ("step0", {}, {"enable_flashcomm2_parallel_size": 4, "layer_sharding": ["o_proj"],
                   "flashcomm2_oshared_prefetch_step": 0},
     dict(tp=16, layers=1, arch="DeepseekV2ForCausalLM")),
    ("fc2-without-oshared-ignores-step", {ENV_PARALLEL_SIZE: "2", ENV_PREFETCH_STEP: "50"},
     None, dict(tp=4, layers=4, arch="Qwen2ForCausalLM")),
    # FlashComm2 alone runs inside captured graphs; o_shared needs eager.
    ("fc2-graphs", {ENV_PARALLEL_SIZE: "1"}, None, dict(graphs="FULL_AND_PIECEWISE")),
    ("oshared-enforce-eager", {ENV_PARALLEL_SIZE: "1", ENV_OSHARED: "1"}, None,
     dict(graphs="PIECEWISE", eager=True)),
    # Decode-size graphs: every captured size runs plain TP from the shard.
    ("oshared-graphs-at-threshold", {ENV_PARALLEL_SIZE: "1", ENV_OSHARED: "1"}, None,
     dict(graphs="FULL_AND_PIECEWISE", capture=[1, 2, 4, 8, 512, 1024])),
    ("storage-round-robin", {ENV_PARALLEL_SIZE: "1", ENV_OSHARED: "1",
                             ENV_STORAGE: "Round_Robin"}, None, dict()),
    ("storage-auto-without-oshared", {ENV_PARALLEL_SIZE: "1", ENV_STORAGE: "auto"}, None,
     dict()),
    ("flashcomm1-off-words", {ENV_PARALLEL_SIZE: "1", "VLLM_ASCEND_ENABLE_FLASHCOMM1": "0"},
     None, dict(additional={"enable_shared_expert_dp": False}, ep=True)),
    # vllm-ascend ignores shared_expert_dp without expert parallelism.
    ("shared-expert-dp-without-ep", {ENV_PARALLEL_SIZE: "1"}, None,
     dict(additional={"enable_shared_expert_dp": True})),
]


@pytest.mark.parametrize("env,ac,vc", [c[1:] for c in VALIDATE_OK],
                         ids=[c[0] for c in VALIDATE_OK])
def test_validate_ok(env, ac, vc):
    validate_flashcomm2_config(parse_flashcomm2_config(env, ac), _vllm_config(**vc), env)


def test_every_supported_architecture_accepted():
    cfg = parse_flashcomm2_config({ENV_PARALLEL_SIZE: "1"}, None)
    for arch in SUPPORTED_ARCHITECTURES:
        validate_flashcomm2_config(cfg, _vllm_config(arch=arch))


# --------------------------------------------------------------------------
# the engine entry point, on a real VllmConfig
# --------------------------------------------------------------------------


def test_real_vllm_config(tiny_model, monkeypatch, caplog):
    from vllm.config import ModelConfig, ParallelConfig, VllmConfig

    model = ModelConfig(model=str(tiny_model("DeepseekV3ForCausalLM")))
    vllm_config = VllmConfig(
        model_config=model,
        parallel_config=ParallelConfig(tensor_parallel_size=4),
        additional_config={"enable_flashcomm2_parallel_size": 2,
                           "layer_sharding": ["o_proj"]},
    )
    monkeypatch.setenv(ENV_PARALLEL_SIZE, "1")  # overridden by additional_config
    monkeypatch.setenv(ENV_PREFETCH_STEP, "2")
    monkeypatch.delenv(ENV_OSHARED, raising=False)

    # Our loggers live under vLLM's namespace (vllm_ascend_ext/logger.py);
    # vLLM's top logger does not propagate to the root logger caplog uses.
    vllm_logger = logging.getLogger("vllm")
    old_propagate = vllm_logger.propagate
    vllm_logger.propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="vllm.ext.vllm_ascend_ext.config"):
            cfg = get_flashcomm2_config(vllm_config)
            again = get_flashcomm2_config(vllm_config)
    finally:
        vllm_logger.propagate = old_propagate
    assert (cfg.parallel_size, cfg.oshared, cfg.prefetch_step) == (2, True, 2)
    assert again == cfg
    assert cfg.sources["prefetch_step"] == ENV_PREFETCH_STEP
    # One record (caplog may list the same record object twice when vLLM's
    # logging config attaches it to two handlers, as 0.27.1's does).
    records = {id(r): r for r in caplog.records if "FlashComm2 on" in r.getMessage()}
    lines = [r.getMessage() for r in records.values()]
    assert len(lines) == 1, lines  # logged once
    assert "o_proj TP size=2" in lines[0] and "tensor_parallel_size=4" in lines[0]

    n = model.hf_config.num_hidden_layers
    monkeypatch.setenv(ENV_PREFETCH_STEP, str(n))
    with pytest.raises(FlashComm2ConfigError, match=rf"must be in \[0, {n - 1}\]"):
        get_flashcomm2_config(vllm_config)


@pytest.mark.parametrize("role,refused", [("kv_consumer", True), ("kv_producer", False),
                                          ("kv_both", False)])
def test_oshared_on_a_decode_only_instance_is_refused(role, refused):
    """A real KVTransferConfig: o_shared on a kv_consumer (decode) instance only
    adds memory (every step is small), so start-up stops naming kv_role."""
    from vllm.config import KVTransferConfig

    vcfg = _vllm_config(tp=2, eager=True)
    vcfg.kv_transfer_config = KVTransferConfig(kv_connector="ExampleConnector", kv_role=role)
    cfg = parse_flashcomm2_config({ENV_PARALLEL_SIZE: "1", ENV_OSHARED: "1"}, {})
    if refused:
        with pytest.raises(FlashComm2ConfigError,
                           match=r"VLLM_ASCEND_ENABLE_FLASHCOMM2_OSHARED='1' is invalid: .*"
                                 r"kv_role='kv_consumer'"):
            validate_flashcomm2_config(cfg, vcfg, env={})
    else:
        validate_flashcomm2_config(cfg, vcfg, env={})
    # FlashComm2 alone (with its switch) stays allowed on a decode instance.
    validate_flashcomm2_config(parse_flashcomm2_config({ENV_PARALLEL_SIZE: "1"}, {}), vcfg,
                               env={})
