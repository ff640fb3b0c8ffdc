"""The scale-out stack on loopback, as CI can run it without Docker: two `customllm serve` replicas
(the tiny random model, the built-in tokenizer) behind nginx started from the project's own configs
(docker/nginx/nginx.conf and router.conf.template rendered by docker/render_router.py), and Debian's
Prometheus with the project's scrape job.

The replicas listen on 127.0.0.2 and 127.0.0.3 where the system allows it (else on 127.0.0.1). The
same pair also serves the test of the compose/Kubernetes rendering (`server NAME:PORT resolve`,
nginx 1.27.3+, with a stub DNS server standing in for Docker's or the cluster's).

nginx: $CUSTOMLLM_TEST_NGINX, else `nginx` on PATH or /usr/sbin/nginx (apt-get install nginx-light).
"""
from __future__ import annotations

import collections
import contextlib
import http.server
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.api_server import ROOT, TEST_KV_CACHE_GIB, free_port, make_tiny_checkpoint, tokenizer_dir

sys.path.insert(0, str(ROOT / "docker"))
import render_router  # noqa: E402

NGINX = os.environ.get("CUSTOMLLM_TEST_NGINX") or shutil.which("nginx") or (
    "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")

# responses the tests have received from each router URL: nginx writes a request's access-log line
# after the response has gone out, so a reader of the log waits until it holds this many lines
ANSWERED: collections.Counter[str] = collections.Counter()


def wait_until(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll `condition` until it returns something truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


# ---- replicas ---------------------------------------------------------------------------------------
def loopback_addresses() -> list[tuple[str, int]]:
    """Two replica addresses: 127.0.0.2 and 127.0.0.3 where the system allows it (as replicas on
    two hosts), else two ports of 127.0.0.1."""
    addresses = []
    try:
        for host in ("127.0.0.2", "127.0.0.3"):
            with socket.socket() as s:
                s.bind((host, 0))
                addresses.append((host, s.getsockname()[1]))
        return addresses
    except OSError:
        return [("127.0.0.1", free_port()), ("127.0.0.1", free_port())]


@dataclass
class Replica:
    host: str
    port: int
    process: subprocess.Popen
    log: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def sessions(self) -> set[str]:
        return {s["id"] for s in httpx.get(f"{self.url}/v1/sessions", timeout=10).json()["data"]}

    def healthy(self) -> bool:
        assert self.process.poll() is None, f"replica {self.address} exited:\n{self.log.read_text()[-3000:]}"
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False


def start_replica(model_dir: Path, host: str, port: int, log: Path) -> Replica:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--tokenizer",
           str(tokenizer_dir()), "--host", host, "--port", str(port), "--kv-cache-memory",
           str(TEST_KV_CACHE_GIB), "--block-size", "16", "--dtype", "float32"]
    # one thread each: two replicas (and nginx, and Prometheus) share a small CI machine, and OpenMP
    # teams that outnumber the cores stall one another
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Replica(host, port, process, log)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    model_dir = make_tiny_checkpoint(tmp_path_factory.mktemp("router-model"))
    logs = tmp_path_factory.mktemp("replica-logs")
    pair = [start_replica(model_dir, host, port, logs / f"replica-{i}.log")
            for i, (host, port) in enumerate(loopback_addresses())]
    try:
        for replica in pair:
            wait_until(replica.healthy, 180, f"replica {replica.address} to be healthy")
        yield pair
    finally:
        for replica in pair:
            if replica.process.poll() is None:
                replica.process.kill()
            replica.process.wait(timeout=30)


# ---- the router -------------------------------------------------------------------------------------
class Router:
    """nginx in the foreground under `prefix`, from the committed main config with `router_conf`
    included; paths that the container config points at /etc and /dev are moved into `prefix`."""

    def __init__(self, router_conf: str, port: int, prefix: Path):
        self.prefix = prefix
        prefix.chmod(0o755)        # nginx workers run as an unprivileged user when the master is root
        self.url = f"http://127.0.0.1:{port}"
        (prefix / "router.conf").write_text(router_conf)
        main = (ROOT / "docker" / "nginx" / "nginx.conf").read_text()
        temp = "".join(f"    {kind}_temp_path {prefix / kind};\n" for kind in ("client_body", "proxy", "fastcgi",
                                                                                   "uwsgi", "scgi"))
        for old, new in (("/etc/nginx/conf.d/router.conf", str(prefix / "router.conf")),
                         ("/dev/stdout", str(prefix / "access.log")), ("/dev/stderr", str(prefix / "error.log")),
                         ("http {\n", "http {\n" + temp)):
            assert old in main, f"docker/nginx/nginx.conf has no {old!r}"
            main = main.replace(old, new)
        (prefix / "nginx.conf").write_text(f"pid {prefix / 'nginx.pid'};\n{main}")
        with open(prefix / "stderr.log", "w") as stderr:
            self.process = subprocess.Popen(
                [NGINX, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(prefix / "nginx.conf"),
                 "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            wait_until(self.up, 30, "nginx to answer /router/health")
        except BaseException:
            self.close()
            raise

    def up(self) -> bool:
        assert self.process.poll() is None, "nginx exited: " + "".join(
            (self.prefix / name).read_text() for name in ("stderr.log", "error.log") if (self.prefix / name).exists())
        try:
            return httpx.get(f"{self.url}/router/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)

    def logged_lines(self) -> list[str]:
        """The access log once it holds a line for every response the tests have received."""
        deadline = time.monotonic() + 10
        while True:
            lines = (self.prefix / "access.log").read_text().splitlines()
            if len(lines) >= ANSWERED[self.url]:
                return lines
            assert time.monotonic() < deadline, f"nginx logged {len(lines)} of {ANSWERED[self.url]} answered requests"
            time.sleep(0.01)

    def served_by(self) -> list[tuple[str, str]]:
        """(session, replica address) of every proxied request so far, from the access log; the
        address is the last one nginx tried (the one that answered)."""
        entries = []
        for line in self.logged_lines():
            found = re.search(r'session="([^"]*)" upstream=(\S+(?:, \S+)*) upstream_status', line)
            if found and found.group(2) != "-":
                entries.append((found.group(1), found.group(2).split(", ")[-1]))
        return entries


@contextlib.contextmanager
def running_router(upstreams: list[str], prefix: Path, **resolver):
    """nginx on a free loopback port over `upstreams`, rendered from the project's template."""
    port = free_port()
    router = Router(render_router.render(upstreams, f"127.0.0.1:{port}", **resolver), port, prefix)
    try:
        yield router
    finally:
        router.close()


@pytest.fixture(scope="module")
def router(replicas, tmp_path_factory):
    """The router over the two replicas' fixed addresses."""
    with running_router([r.address for r in replicas], tmp_path_factory.mktemp("nginx")) as r:
        yield r


# ---- requests ---------------------------------------------------------------------------------------
def chat(base: str, session: str | None, messages: list[dict], body_session: str | None = None,
         **extra) -> httpx.Response:
    headers = {"X-Session-ID": session} if session else {}
    body = {"messages": messages, "max_tokens": 6, "temperature": 0, **extra}
    if body_session is not None:
        body["session_id"] = body_session
    response = httpx.post(f"{base}/v1/chat/completions", headers=headers, json=body, timeout=60)
    ANSWERED[base] += 1
    return response


def cached_tokens(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def opening(name: str) -> list[dict]:
    """A first user turn unique to `name`, so that no other session's cache holds it."""
    return [{"role": "user", "content": f"{name}: remember the number forty-two, please. " * 3}]


def converse(base: str, session: str, turns: int, header: bool = True, body: bool = False) -> list[int]:
    messages = opening(session)
    cached = []
    for turn in range(turns):
        reply = chat(base, session if header else None, messages, body_session=session if body else None)
        cached.append(cached_tokens(reply))
        messages += [{"role": "assistant", "content": reply.json()["choices"][0]["message"]["content"]},
                     {"role": "user", "content": f"And on day {turn}?"}]
    return cached


def replica_of(router: Router, session: str) -> set[str]:
    return {address for name, address in router.served_by() if name == session}


# ---- the router over fixed addresses ----------------------------------------------------------------
def test_session_turns_stick_to_one_replica(router):
    cached = converse(router.url, "sticky", 3)
    assert cached[0] == 0 and 0 < cached[1] < cached[2], cached
    assert len(replica_of(router, "sticky")) == 1


def test_session_in_the_body_and_the_header(router, replicas):
    # both, agreeing: the header routes, the body names the same session on the replica
    cached = converse(router.url, "both-ways", 2, header=True, body=True)
    assert cached[1] > 0, cached
    (address,) = replica_of(router, "both-ways")
    assert "both-ways" in next(r for r in replicas if r.address == address).sessions()
    # disagreeing: refused by the replica (400 is not passed on to another replica)
    refused = chat(router.url, "one-name", opening("x"), body_session="another-name")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "session_id"
    # the body alone works too, without affinity (nginx cannot read it): answered, maybe cold
    assert chat(router.url, None, opening("body-only"), body_session="body-only").status_code == 200


def test_sessions_spread_over_both_replicas(router, replicas):
    names = [f"spread-{i}" for i in range(20)]
    for name in names:
        assert chat(router.url, name, opening(name)).status_code == 200
    placed = [replica.sessions() & set(names) for replica in replicas]
    assert all(placed) and placed[0].isdisjoint(placed[1]) and len(placed[0] | placed[1]) == 20, placed
    # a second turn of each goes where its first went
    for name in names:
        messages = opening(name) + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "and?"}]
        assert cached_tokens(chat(router.url, name, messages)) > 0, name
        assert len(replica_of(router, name)) == 1, name


def test_requests_without_a_session_use_both_replicas(router, replicas):
    before = len(router.served_by())
    for i in range(8):
        assert chat(router.url, None, [{"role": "user", "content": f"hello {i}"}]).status_code == 200
    used = {address for _, address in router.served_by()[before:]}
    assert used == {r.address for r in replicas}, used


def test_sse_passes_through_unbuffered(router):
    """The first chunk comes long before the last, and chunks come one at a time, not in a burst."""
    started = time.monotonic()
    arrivals = []
    body = {"prompt": "Tell me", "max_tokens": 64, "stream": True, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", f"{router.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                arrivals.append(time.monotonic() - started)
                json.loads(line[6:])
    ANSWERED[router.url] += 1
    total = time.monotonic() - started
    assert len(arrivals) >= 32, len(arrivals)
    assert arrivals[0] < 0.5 * total, (arrivals[0], total)
    apart = sum(1 for a, b in zip(arrivals, arrivals[1:]) if b - a > 0.0005)
    assert apart >= len(arrivals) // 2, f"chunks arrived in bursts: {arrivals}"


def test_a_replica_answering_503_is_passed_over(replicas, tmp_path):
    """A replica that fails its health (503: loading, draining, engine stopped) is skipped: the
    request, a POST, is passed to the next replica and answered; the client never sees the 503."""
    hits = []

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def answer(self):
            hits.append(self.path)
            length = int(self.headers.get("content-length") or 0)
            self.rfile.read(length)
            body = json.dumps({"error": {"message": "loading", "type": "unavailable", "param": None,
                                         "code": "model_loading"}}).encode()
            self.send_response(503)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = answer

        def log_message(self, *args):
            pass

    stub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    try:
        upstreams = [f"127.0.0.1:{stub.server_address[1]}", replicas[0].address]
        with running_router(upstreams, tmp_path) as router:
            for i in range(6):
                assert chat(router.url, None, [{"role": "user", "content": f"hi {i}"}]).status_code == 200
            for i in range(12):
                reply = chat(router.url, f"s503-{i}", opening(f"s503-{i}"))
                assert reply.status_code == 200, reply.text
            assert hits, "the failing replica was never tried"
    finally:
        stub.shutdown()
        stub.server_close()


def test_prometheus_scrapes_both_replicas(replicas, tmp_path):
    """Debian's Prometheus with the project's scrape job pointed at the loopback replicas; every
    dashboard expression evaluates there."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    config = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s")
    job = config["scrape_configs"][0]
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": [r.address for r in replicas]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    with open(tmp_path / "prometheus.log", "w") as log:
        process = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                    f"--storage.tsdb.path={tmp_path / 'data'}",
                                    f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)

    def targets_up():
        assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
        try:
            targets = httpx.get(f"{api}/targets", timeout=2).json()["data"]["activeTargets"]
        except (httpx.HTTPError, ValueError, KeyError):
            return None
        health = {t["labels"]["instance"]: t["health"] for t in targets if t["labels"]["job"] == "customllm"}
        return health if health == {r.address: "up" for r in replicas} else None

    def query(expr: str):
        reply = httpx.get(f"{api}/query", params={"query": expr}, timeout=5).json()
        assert reply["status"] == "success", (expr, reply)
        return reply["data"]["result"]

    try:
        wait_until(targets_up, 60, "both replicas to be scraped", interval=0.2)
        wait_until(lambda: query("sum(customllm_engine_alive)"), 30, "the first samples")
        assert float(query("sum(customllm_engine_alive)")[0]["value"][1]) == 2
        from tests.deploy.test_stack_static import dashboard_expressions, grafana_to_promql
        for expr in dashboard_expressions():
            query(grafana_to_promql(expr))
    finally:
        process.terminate()
        process.wait(timeout=30)


# ---- the router over re-resolved names (the compose and Kubernetes rendering) -----------------------
class DnsStub:
    """A DNS server on 127.0.0.1 answering A queries from a table the test changes, as Docker's DNS
    or a headless Service changes when a replica comes and goes; unknown names are NXDOMAIN."""

    def __init__(self):
        self.table: dict[str, list[str]] = {}
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.closed.is_set():
            try:
                query, peer = self.socket.recvfrom(512)
                self.socket.sendto(self.answer(query), peer)
            except (socket.timeout, OSError, IndexError, struct.error):
                continue

    def answer(self, query: bytes) -> bytes:
        ident, flags = struct.unpack(">HH", query[:4])
        labels, i = [], 12
        while query[i]:
            labels.append(query[i + 1:i + 1 + query[i]].decode("ascii", "replace"))
            i += 1 + query[i]
        qtype = struct.unpack(">H", query[i + 1:i + 3])[0]
        question = query[12:i + 5]                  # name, type, class
        addresses = self.table.get(".".join(labels).lower())
        answers = addresses if addresses and qtype == 1 else []
        rcode = 0 if addresses else 3
        header = struct.pack(">HHHHHH", ident, 0x8400 | (flags & 0x0100) | rcode, 1, len(answers), 0, 0)
        records = b"".join(struct.pack(">HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(a) for a in answers)
        return header + question + records

    def close(self) -> None:
        self.closed.set()
        self.thread.join(timeout=5)
        self.socket.close()


def nginx_version() -> tuple[int, ...]:
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr)
    return tuple(int(x) for x in found.groups()) if found else (0, 0, 0)


def test_router_over_resolved_names_follows_the_replicas(replicas, tmp_path):
    """The compose/Kubernetes rendering: each replica under its own name, re-resolved while nginx
    runs. Sessions stick and spread; a replica whose name stops resolving (a pod that is not ready)
    gets nothing more and its sessions continue on the other; when it is back, exactly its own
    sessions return to it."""
    if nginx_version() < (1, 27, 3):
        pytest.skip(f"nginx {'.'.join(map(str, nginx_version()))} cannot re-resolve upstreams (`server ... "
                    "resolve` needs 1.27.3+; set CUSTOMLLM_TEST_NGINX to one)")
    dns = DnsStub()
    names = [f"replica-{i}.customllm.test" for i in range(2)]
    dns.table = {name: [replica.host] for name, replica in zip(names, replicas)}
    upstreams = [f"{name}:{replica.port}" for name, replica in zip(names, replicas)]
    try:
        with running_router(upstreams, tmp_path, resolver=f"127.0.0.1:{dns.port}", resolver_valid="1s") as router:
            wait_until(lambda: chat(router.url, None, opening("first")).status_code == 200, 30, "names resolved")
            sessions = [f"dns-{i}" for i in range(12)]
            for session in sessions:
                assert chat(router.url, session, opening(session)).status_code == 200
            homes = {}
            for session in sessions:
                (homes[session],) = replica_of(router, session)
            on_second = [n for n in sessions if homes[n] == replicas[1].address]
            assert on_second and len(on_second) < len(sessions), homes

            def lands_on(session: str, replica: Replica) -> bool:
                """Six turns in a row land there (each nginx worker re-resolves on its own)."""
                for _ in range(6):
                    assert chat(router.url, session, opening(session)).status_code == 200
                    if router.served_by()[-1] != (session, replica.address):
                        return False
                return True

            # the second replica's name stops resolving: once nginx has seen that, nothing goes there
            del dns.table[names[1]]
            wait_until(lambda: lands_on(on_second[0], replicas[0]), 30, "the router to drop the second replica", 0.2)
            before = len(router.served_by())
            for i in range(6):
                assert chat(router.url, None, opening(f"after-{i}")).status_code == 200
            for session in sessions:
                assert chat(router.url, session, opening(session)).status_code == 200
            assert {a for _, a in router.served_by()[before:]} == {replicas[0].address}
            # back again: every session returns to where it was (the ring is made of the names)
            dns.table[names[1]] = [replicas[1].host]
            wait_until(lambda: lands_on(on_second[0], replicas[1]), 30, "the router to take the second replica back", 0.2)
            before = len(router.served_by())
            for session in sessions:
                assert chat(router.url, session, opening(session)).status_code == 200
            assert dict(router.served_by()[before:]) == homes
    finally:
        dns.close()


# ---- last: a replica dies ---------------------------------------------------------------------------
def test_killed_replica_requests_move_on_and_sessions_continue_cold(router, replicas):
    victim, survivor = replicas
    session = next((n for n in (f"doomed-{i}" for i in range(40))
                    if chat(router.url, n, opening(n)).status_code == 200 and replica_of(router, n) == {victim.address}),
                   None)
    assert session is not None, "no session landed on the first replica"
    messages = opening(session) + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more?"}]
    warm = cached_tokens(chat(router.url, session, messages))
    assert warm > 0
    victim.process.kill()
    victim.process.wait(timeout=30)
    for i in range(10):
        reply = chat(router.url, None, [{"role": "user", "content": f"still there {i}?"}])
        assert reply.status_code == 200, reply.text
    before = len(router.served_by())
    cold = cached_tokens(chat(router.url, session, messages))
    # computed cold on the survivor: the session's own history is not there (only a prefix that
    # every conversation shares, the chat template's system block, may be in its prefix cache)
    assert cold < warm, (cold, warm)
    assert [a for _, a in router.served_by()[before:]] == [survivor.address]
    assert session in survivor.sessions()
    # and warm again from the next turn: the dead replica's sessions all fall to the same survivor
    messages += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "and then?"}]
    assert cached_tokens(chat(router.url, session, messages)) > cold
