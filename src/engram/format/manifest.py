"""Backup manifests, sidecars and catalog entries (docs/FORMAT.md). Codecs only, no I/O."""

from __future__ import annotations

import json
import re
from typing import Any

from engram.errors import BadArchive

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
HEX64 = re.compile(r"^[0-9a-f]{64}$")

# Every member a full backup may hold; anything else in an archive is refused.
MEMBER_PATTERNS = (
    re.compile(r"^identity\.json$"),
    re.compile(r"^manifest\.json$"),
    re.compile(r"^warm/engram\.db$"),
    re.compile(r"^warm/engram\.db-wal$"),
    re.compile(r"^oplog/[0-9a-f]{16}\.log$"),
    re.compile(r"^fast/hot\.json$"),
    re.compile(r"^cold/[0-9a-f]{64}\.seg$"),
)

COMPRESSIONS = {".tar.zst": "zstd", ".tar.gz": "gzip", ".tgz": "gzip"}


def compression_for(name: str) -> str | None:
    for ext, comp in COMPRESSIONS.items():
        if name.endswith(ext):
            return comp
    return None


def allowed_member(name: str) -> bool:
    return any(p.match(name) for p in MEMBER_PATTERNS)


def encode_manifest(m: dict[str, Any]) -> bytes:
    return (json.dumps(m, indent=2, sort_keys=True) + "\n").encode()


def decode_manifest(data: bytes) -> dict[str, Any]:
    """Parse and check the structure of a manifest (validation level 1)."""
    try:
        m = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadArchive(f"manifest.json is not valid JSON ({e}); the archive is damaged") from None
    if not isinstance(m, dict):
        raise BadArchive("manifest.json is not a JSON object; the archive is damaged")
    if m.get("format_version") != MANIFEST_VERSION:
        raise BadArchive(
            f"manifest format_version {m.get('format_version')!r} is not supported (this engram "
            f"reads {MANIFEST_VERSION}); use a matching engram version"
        )
    required = {
        "database_id": str,
        "engram_version": str,
        "created_at": str,
        "snapshot_lsn": int,
        "snapshot_time": str,
        "snapshot_time_ns": int,
        "warm_lsn": int,
        "digest": str,
        "counts": dict,
        "files": dict,
        "tiers": dict,
    }
    for key, typ in required.items():
        if not isinstance(m.get(key), typ) or isinstance(m.get(key), bool):
            raise BadArchive(f"manifest.json: field {key!r} is missing or not a {typ.__name__}")
    if not HEX64.match(m["digest"]):
        raise BadArchive("manifest.json: digest is not 64 hex digits")
    for name, info in m["files"].items():
        if not allowed_member(name):
            raise BadArchive(f"manifest.json names an unexpected file {name!r}")
        if (
            not isinstance(info, dict)
            or not isinstance(info.get("size"), int)
            or not isinstance(info.get("sha256"), str)
            or not HEX64.match(info["sha256"])
        ):
            raise BadArchive(f"manifest.json: entry for {name!r} lacks size or sha256")
    for name in ("identity.json", "warm/engram.db"):
        if name not in m["files"]:
            raise BadArchive(f"manifest.json does not list {name}; the archive is incomplete")
    return m


def encode_sidecar(sha256_hex: str) -> bytes:
    return (sha256_hex + "\n").encode()


def decode_sidecar(data: bytes, name: str) -> str:
    """The bare hex sha256 of a sidecar; `sha256sum` output (hash, two spaces, name) works too."""
    text = data.decode("ascii", "replace").strip()
    first = text.split()[0].lower() if text.split() else ""
    if not HEX64.match(first):
        raise BadArchive(f"{name} does not hold a sha256 hex digest; regenerate it or remove it")
    return first
