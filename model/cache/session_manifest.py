"""A session as a small file beside the disk tier's blocks: which tenant, which session, how many
tokens its last turn had and the chained hashes of its full blocks, in order.

It lets a restarted server, or another replica sharing the directory, list and describe the session
(`GET /v1/sessions`) and delete its blocks (`DELETE`) before any turn of it was served there. The
file is named by a digest of (tenant, session id); it holds a digest of the tenant, never the tenant
itself (an API key's digest), and is written like a block file (temporary name, rename, 0600).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("customllm.kv_disk")
FORMAT = 1
MAX_BYTES = 1 << 22          # a manifest larger than this is not read


@dataclass(frozen=True)
class SessionManifest:
    session_id: str
    num_tokens: int
    block_hashes: tuple[bytes, ...]
    last_used: float          # wall clock


def tenant_tag(tenant: str) -> str:
    return hashlib.blake2b(tenant.encode(), digest_size=8, person=b"customllm-tnt").hexdigest()


def manifest_name(tenant: str, session_id: str) -> str:
    key = tenant.encode() + b"\0" + session_id.encode()
    return hashlib.blake2b(key, digest_size=16, person=b"customllm-ses").hexdigest()


def encode(tag: str, manifest: SessionManifest) -> bytes:
    return json.dumps({"format": FORMAT, "tenant": tag, "session_id": manifest.session_id,
                       "num_tokens": manifest.num_tokens, "blocks": [h.hex() for h in manifest.block_hashes],
                       "last_used": manifest.last_used}).encode()


def load(path: Path) -> tuple[str, SessionManifest] | None:
    """(tenant tag, manifest) of a manifest file; None if it is missing, empty or unreadable (logged)."""
    try:
        data = json.loads(path.read_bytes()[:MAX_BYTES])
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, this server reads {FORMAT}")
        manifest = SessionManifest(str(data["session_id"]), int(data["num_tokens"]),
                                   tuple(bytes.fromhex(h) for h in data["blocks"]), float(data["last_used"]))
        return (str(data["tenant"]), manifest) if manifest.block_hashes else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("disk tier: skipping session file %s (%s)", path, exc)
        return None
