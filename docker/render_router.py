"""Render the nginx router config from docker/nginx/router.conf.template.

    python docker/render_router.py --committed       # re-render the copies compose and Kubernetes use
    python docker/render_router.py --check           # exit 1 when a committed copy is stale
    python docker/render_router.py --listen 127.0.0.1:8080 --upstream 127.0.0.1:8001 \
        --upstream 127.0.0.1:8002 --out router.conf  # fixed addresses (tests, hand-made set-ups)

One `server` line per replica, each replica under a name of its own (nginx puts a server on the hash
ring by that name). Without --resolver the names are resolved once, at start-up, and any nginx reads
the result (the tests run Debian's nginx 1.22 on it). With --resolver every name is re-resolved while
nginx runs (`server NAME:PORT resolve`, nginx 1.27.3+): a replica recreated at another address is
followed, and one whose name stops resolving (a pod that is not ready) leaves the ring until it is back.

The committed copies follow the replica counts written elsewhere: the `server-N` services of
docker/compose.yaml and the StatefulSet's `replicas` in docker/k8s/server.yaml. After changing either,
run `--committed`.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

DOCKER = Path(__file__).resolve().parent
TEMPLATE = DOCKER / "nginx" / "router.conf.template"
MAIN_CONF = DOCKER / "nginx" / "nginx.conf"
FAIL = "max_fails=1 fail_timeout=10s"
_ADDRESS = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$")
_LISTEN = re.compile(r"^([A-Za-z0-9.\-\[\]:]+:)?[0-9]{1,5}$")


@dataclass(frozen=True)
class Target:
    """A committed rendering: where it goes and what it routes to."""
    out: Path
    upstreams: tuple[str, ...]
    listen: str
    resolver: str | None


COMPOSE_FILE = DOCKER / "compose.yaml"
K8S_SERVER_FILE = DOCKER / "k8s" / "server.yaml"
K8S_MAIN_CONF = DOCKER / "k8s" / "nginx.conf"
K8S_NAMESPACE = "default"


def compose_replicas() -> int:
    """How many `server-N` services docker/compose.yaml defines (per profile)."""
    numbers = {int(n) for n in re.findall(r"^  server-(\d+):\s*$", COMPOSE_FILE.read_text(), re.M)}
    assert numbers == set(range(1, len(numbers) + 1)), f"{COMPOSE_FILE}: server-N services must be 1..N"
    return len(numbers)


def k8s_replicas() -> int:
    """The StatefulSet's `replicas` in docker/k8s/server.yaml."""
    found = re.findall(r"^  replicas: (\d+)\s*$", K8S_SERVER_FILE.read_text(), re.M)
    assert len(found) == 1, f"{K8S_SERVER_FILE}: expected one `replicas:`"
    return int(found[0])


def targets() -> list[Target]:
    # compose: Docker's DNS (127.0.0.11) resolves each service name; the GPU profile's services carry
    # the same names as network aliases
    compose = Target(DOCKER / "nginx" / "router.conf",
                     tuple(f"server-{i}:8000" for i in range(1, compose_replicas() + 1)), "8080", "127.0.0.11")
    # Kubernetes: the StatefulSet's pods have stable names under the headless Service `customllm`,
    # published while the pod is ready
    k8s = Target(DOCKER / "k8s" / "router.conf",
                 tuple(f"customllm-{i}.customllm.{K8S_NAMESPACE}.svc.cluster.local:8000" for i in range(k8s_replicas())),
                 "8080", "kube-dns.kube-system.svc.cluster.local")
    return [compose, k8s]


def render(upstreams: list[str] | tuple[str, ...], listen: str, resolver: str | None = None,
           resolver_valid: str = "5s") -> str:
    """The router config for these replica addresses; with `resolver`, each address is a DNS name
    re-resolved every `resolver_valid`."""
    if not upstreams:
        raise ValueError("at least one upstream replica is needed")
    for address in upstreams:
        if not _ADDRESS.match(address):
            raise ValueError(f"upstream {address!r} is not HOST:PORT")
    if not _LISTEN.match(listen):
        raise ValueError(f"listen {listen!r} is not PORT or ADDRESS:PORT")
    if resolver is not None and not re.match(r"^[A-Za-z0-9.\-\[\]:]+$", resolver):
        raise ValueError(f"resolver {resolver!r} is not a host name or address")
    if not re.match(r"^[0-9]+(ms|s|m)?$", resolver_valid):
        raise ValueError(f"resolver_valid {resolver_valid!r} is not an nginx time")
    resolve = " resolve" if resolver else ""
    servers = "\n".join(f"    server {address}{resolve} {FAIL};" for address in upstreams)
    if resolver:
        resolver_lines = f"resolver {resolver} valid={resolver_valid} ipv6=off;\nresolver_timeout 2s;"
    else:
        resolver_lines = "# fixed replica addresses: resolved once, when nginx starts"
    text = TEMPLATE.read_text()
    for placeholder, value in (("@RESOLVER@", resolver_lines), ("@UPSTREAMS@", servers), ("@LISTEN@", listen)):
        assert placeholder in text, f"{TEMPLATE} has no {placeholder}"
        text = text.replace(placeholder, value)
    return text


def committed() -> dict[Path, str]:
    """Every committed rendering and what it should contain."""
    files = {t.out: render(t.upstreams, t.listen, t.resolver) for t in targets()}
    files[K8S_MAIN_CONF] = MAIN_CONF.read_text()
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--committed", action="store_true", help="re-render the compose and Kubernetes copies")
    parser.add_argument("--check", action="store_true", help="exit 1 when a committed copy is stale")
    parser.add_argument("--upstream", action="append", help="HOST:PORT of a replica, or NAME:PORT (repeat)")
    parser.add_argument("--listen", default="8080", help="PORT or ADDRESS:PORT")
    parser.add_argument("--resolver", help="DNS server re-resolving the upstream names (nginx >= 1.27.3)")
    parser.add_argument("--out", help="file to write (default: standard output)")
    args = parser.parse_args(argv)
    if args.committed or args.check:
        stale = [path for path, text in committed().items() if not path.is_file() or path.read_text() != text]
        if args.check:
            for path in stale:
                print(f"{path} is stale: run python docker/render_router.py --committed", file=sys.stderr)
            return 1 if stale else 0
        for path, text in committed().items():
            path.write_text(text)
        return 0
    if not args.upstream:
        parser.error("--upstream is required (or --committed / --check)")
    try:
        text = render(args.upstream, args.listen, args.resolver)
    except ValueError as exc:
        parser.error(str(exc))
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
