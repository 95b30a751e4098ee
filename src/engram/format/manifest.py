"""Backup manifests, archive headers and sidecars (docs/FORMAT.md). Codecs only, no I/O."""

from __future__ import annotations

import json
import re
import struct
from typing import Any

from engram.errors import BadArchive
from engram.format.record import crc32c

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


def encode_sidecar(sha256_hex: str, name: str) -> bytes:
    """The sidecar of the file ``name`` in ``sha256sum`` format: the hex digest, two spaces, the
    file's base name and a newline, so that ``sha256sum -c NAME.sha256`` run in the directory
    holding both checks the file. A name holding a backslash or a line break is escaped as GNU
    ``sha256sum`` writes it (the line then starts with a backslash)."""
    base = name.rsplit("/", 1)[-1]
    if any(c in base for c in "\\\n\r"):
        escaped = base.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        return f"\\{sha256_hex}  {escaped}\n".encode()
    return f"{sha256_hex}  {base}\n".encode()


def decode_sidecar(data: bytes, name: str) -> str:
    """The sha256 (lowercase hex) a sidecar holds: ``sha256sum`` format (``HEX  NAME``, ``HEX
    *NAME``, or escaped with a leading backslash) or the bare hex sidecars written before."""
    text = data.decode("ascii", "replace").strip()
    first = text.split()[0].lower() if text.split() else ""
    first = first.removeprefix("\\")
    if not HEX64.match(first):
        raise BadArchive(f"{name} does not hold a sha256 hex digest; regenerate it or remove it")
    return first


# -- the archive header ------------------------------------------------------------------------
#
# A few hundred bytes at the start of every full archive (docs/FORMAT.md "Archive header"): the
# manifest's key fields, so that a reader learns what an archive holds without decompressing it
# (the manifest is its last member). The sidecar's hash covers it; it carries its own CRC32C so
# that it can be trusted on its own when read without hashing the whole archive.

ARCHIVE_HEADER_MAGIC = b"ENGRAMAH"
ARCHIVE_HEADER_VERSION = 1
# The manifest fields the header repeats; a header that differs from its manifest is damage.
HEADER_FIELDS = (
    "kind",
    "database_id",
    "snapshot_lsn",
    "snapshot_time",
    "snapshot_time_ns",
    "warm_lsn",
    "digest",
    "counts",
)
# Repeated when the manifest has them (archives written before histories have none).
OPTIONAL_HEADER_FIELDS = ("history",)
MAX_ARCHIVE_HEADER = 16 << 10
_HEAD = struct.Struct("<8sHI")


def archive_header(manifest: dict[str, Any]) -> dict[str, Any]:
    """The header fields of ``manifest`` (a manifest, or a header already)."""
    missing = [k for k in HEADER_FIELDS if k not in manifest]
    if missing:
        raise ValueError(f"an archive header needs {', '.join(missing)}")
    out = {k: manifest[k] for k in HEADER_FIELDS}
    out.update({k: manifest[k] for k in OPTIONAL_HEADER_FIELDS if k in manifest})
    return out


def encode_archive_header(fields: dict[str, Any]) -> bytes:
    """magic | u16 version | u32 JSON length | JSON (sorted keys) | u32 CRC32C of all before."""
    body = json.dumps(archive_header(fields), sort_keys=True, separators=(",", ":")).encode()
    head = _HEAD.pack(ARCHIVE_HEADER_MAGIC, ARCHIVE_HEADER_VERSION, len(body)) + body
    if len(head) + 4 > MAX_ARCHIVE_HEADER:
        raise ValueError("the archive header is too large")
    return head + struct.pack("<I", crc32c(head))


def decode_archive_header(data: bytes, name: str) -> dict[str, Any]:
    """The fields of an encoded archive header; BadArchive naming ``name`` if it is damaged."""
    damaged = f"{name}: the archive header is damaged"
    if len(data) < _HEAD.size + 4:
        raise BadArchive(f"{damaged} (too short); use another backup")
    magic, version, n = _HEAD.unpack_from(data)
    if magic != ARCHIVE_HEADER_MAGIC or len(data) != _HEAD.size + n + 4:
        raise BadArchive(f"{damaged} (bad magic or length); use another backup")
    (crc,) = struct.unpack_from("<I", data, _HEAD.size + n)
    if crc != crc32c(data[: _HEAD.size + n]):
        raise BadArchive(f"{damaged} (CRC mismatch); use another backup")
    if version != ARCHIVE_HEADER_VERSION:
        raise BadArchive(
            f"{name}: archive header version {version} is not supported (this engram reads "
            f"{ARCHIVE_HEADER_VERSION}); use a matching engram version"
        )
    try:
        fields = json.loads(data[_HEAD.size : _HEAD.size + n])
        return archive_header(fields)
    except (ValueError, TypeError, UnicodeDecodeError):
        raise BadArchive(f"{damaged} (its JSON is invalid); use another backup") from None


def header_disagreements(header: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """The header fields whose value differs from the manifest's, as ``field (a vs b)``."""
    return [
        f"{k} ({header.get(k)!r} vs {manifest.get(k)!r})"
        for k in (*HEADER_FIELDS, *OPTIONAL_HEADER_FIELDS)
        if header.get(k) != manifest.get(k)
    ]
