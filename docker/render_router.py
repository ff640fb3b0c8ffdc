"""Render the nginx router config from docker/nginx/router.conf.template.

    python docker/render_router.py --listen 8080 --upstream server-1:8000 --upstream server-2:8000 \
        --out docker/nginx/router.conf

The compose stack uses the committed docker/nginx/router.conf (two replicas); tests render their own
copy for loopback ports from the same template.
"""
from __future__ import annotations

import argparse
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "nginx" / "router.conf.template"


def render(upstreams: list[str], listen: str) -> str:
    if not upstreams:
        raise ValueError("at least one upstream replica is needed")
    lines = "\n".join(f"    server {u} max_fails=1 fail_timeout=10s;" for u in upstreams)
    return TEMPLATE.read_text().replace("@UPSTREAMS@", lines).replace("@LISTEN@", listen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", action="append", required=True, help="HOST:PORT of a replica (repeat)")
    parser.add_argument("--listen", default="8080")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    Path(args.out).write_text(render(args.upstream, args.listen))


if __name__ == "__main__":
    main()
