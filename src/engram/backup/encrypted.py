"""Encrypted backups: the age format (X25519 recipients) through ``pyrage``, behind the
``BackupStore`` seam (docs/DESIGN.md "Encryption", docs/FORMAT.md "An encrypted backup").

``EncryptedStore(inner, recipients=…)`` encrypts every archive or incremental written through it
into one standard age file under the same name, streaming in bounded memory; ``EncryptedStore(
inner, identities=…)`` decrypts what it reads. Everything else passes through unchanged, so every
backup path that takes a store works through it.

Guarantees:

- The stored object is one age file (``age -d -i KEY NAME`` decrypts it); pyrage does the
  cryptography, nothing here does. Memory is bounded by ``PIPE_LIMIT`` plus pyrage's buffers.
- The sidecar beside an encrypted object holds the sha256 of the stored (encrypted) bytes, so
  ``sha256sum -c NAME.sha256`` and engram check its integrity without the identity. The catalog
  entry stays readable: its ``sha256`` and ``size`` are the stored bytes', and ``encryption``
  says the format, the recipients and the plaintext's sha256 and size.
- Nothing decrypted is handed on before the last age chunk authenticated (age finds a
  truncation only there): ``open`` decrypts the whole object into an unlinked temp file (in
  ``spool_dir``) and returns it only then; ``decrypt_backup`` writes a temp file and publishes
  it only then. Only ``open_head`` streams: a header read gets the first chunks, each of which
  authenticated on its own (the catalog's check of an entry against its file).
- A wrong identity is one ``WrongIdentity`` line naming the backup. No identity is ever put into
  an error, a repr, a log line or an entry: only recipients (public keys) are recorded.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import pyrage
from pyrage import x25519

from engram.backup.catalog import check_entry, encode_entry, read_info
from engram.errors import BadArchive, EngramError, UsageError
from engram.format.manifest import decode_sidecar, encode_sidecar
from engram.fsutil import ensure_private_dir
from engram.storage import BackupStore, LocalBackupStore, Ref, TempObject, info_name, sidecar_name
from engram.storage.base import INFO_SUFFIX, SIDECAR_SUFFIX, Forwarding

AGE_MAGIC = b"age-encryption.org/v1\n"
FORMAT = "age"
# Bytes held between the thread that produces and the thread that consumes a stream.
PIPE_LIMIT = 4 << 20


class EncryptionError(EngramError):
    """An encrypted backup cannot be read."""

    code = "encryption"


class WrongIdentity(EncryptionError):
    """The identity does not match the backup's recipients."""

    code = "wrong_identity"


class NeedsIdentity(UsageError):
    """The backup is encrypted; give --identity."""

    code = "needs_identity"


# -- keys --------------------------------------------------------------------------------------


def _key_lines(text: str) -> Iterable[tuple[int, str]]:
    """The lines of an age recipients or identity file that hold a key: '#' comments and blank
    lines are skipped, as the age CLI does."""
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s and not s.startswith("#"):
            yield n, s


def parse_recipients(values: Iterable[str], where: str = "--encrypt-to") -> list[str]:
    """The age X25519 recipients (``age1…``) in ``values``, checked; UsageError naming the bad one
    (a recipient is a public key: naming it reveals nothing)."""
    out: list[str] = []
    for v in values:
        try:
            x25519.Recipient.from_str(v)
        except Exception:
            raise UsageError(
                f"{where}: {v[:24]!r} is not an age X25519 recipient (age1…, as age-keygen -y "
                "prints); give the public key"
            ) from None
        if v not in out:
            out.append(v)
    return out


def read_recipients_file(path: Path) -> list[str]:
    """The recipients of an age recipients file (one ``age1…`` a line, '#' comments)."""
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the recipients file {path} ({e}); check the path") from None
    out: list[str] = []
    for n, line in _key_lines(text):
        out += [r for r in parse_recipients([line], f"{path} line {n}") if r not in out]
    if not out:
        raise UsageError(f"{path} holds no age recipient (age1…); add one a line")
    return out


def read_identities(path: Path) -> list[x25519.Identity]:
    """The identities of an age identity file (``AGE-SECRET-KEY-1…`` lines, '#' comments, as
    age-keygen writes it). Errors name the file and line, never the key."""
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        what = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise UsageError(f"cannot read the identity file {path} ({what}); check the path") from None
    out: list[x25519.Identity] = []
    for n, line in _key_lines(text):
        try:
            out.append(x25519.Identity.from_str(line))
        except Exception:
            raise UsageError(
                f"{path} line {n} is not an age X25519 identity (AGE-SECRET-KEY-1…, as "
                "age-keygen writes it)"
            ) from None
    if not out:
        raise UsageError(f"{path} holds no age identity (AGE-SECRET-KEY-1…)")
    return out


# -- streams -----------------------------------------------------------------------------------


class _Closed(Exception):
    """The other end of a pipe went away."""


class _Pipe:
    """Bytes from one thread to another, at most ``limit`` held: ``put`` waits for room."""

    def __init__(self, limit: int = PIPE_LIMIT) -> None:
        self._chunks: deque[bytes] = deque()
        self._held = 0
        self._limit = limit
        self._eof = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()

    def put(self, data: bytes) -> None:
        with self._cond:
            while self._held >= self._limit and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise _Closed()
            self._chunks.append(data)
            self._held += len(data)
            self._cond.notify_all()

    def get(self, n: int) -> bytes:
        """Up to ``n`` bytes; b"" at the end; what ``fail`` was given once the bytes put
        before it are taken."""
        with self._cond:
            while not self._chunks and not self._eof and self._error is None:
                self._cond.wait()
            if not self._chunks:
                if self._error is not None:
                    raise self._error
                return b""
            first = self._chunks[0]
            if len(first) <= n:
                self._chunks.popleft()
                out = first
            else:
                out, self._chunks[0] = first[:n], first[n:]
            self._held -= len(out)
            self._cond.notify_all()
            return out

    def close(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = error
            self._cond.notify_all()


class _PipeReader:
    """What pyrage reads from: the pipe's bytes."""

    def __init__(self, pipe: _Pipe) -> None:
        self.pipe = pipe

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self.pipe.get(n if n > 0 else PIPE_LIMIT)


class _Sink:
    """What pyrage writes the ciphertext to: a temp object, counted and hashed. The first error
    is kept, because pyrage drops an error of its final flush."""

    def __init__(self, temp: TempObject) -> None:
        self.temp = temp
        self.sha = hashlib.sha256()
        self.size = 0
        self.error: BaseException | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        try:
            self.temp.write(data)
        except BaseException as e:
            self.error = e
            raise
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


class EncryptingTemp:
    """A temp object whose plaintext is encrypted into ``inner`` (one age file), on a thread of
    its own that pyrage's ``encrypt_io`` runs in; ``write`` waits while the pipe is full."""

    def __init__(self, inner: TempObject, recipients: Sequence[x25519.Recipient]) -> None:
        self.inner = inner
        self.name = inner.name
        self.plain_size = 0
        self._pipe = _Pipe()
        self._sink = _Sink(inner)
        self._failure: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(list(recipients),), name="age-encrypt", daemon=True
        )
        self._thread.start()

    def _run(self, recipients: list[x25519.Recipient]) -> None:
        try:
            pyrage.encrypt_io(_PipeReader(self._pipe), self._sink, recipients)
        except BaseException as e:
            self._failure = e
            self._pipe.fail(_Closed())

    def _error(self) -> BaseException | None:
        if self._sink.error is not None:  # the medium's own error (ENOSPC, EIO, …)
            return self._sink.error
        if self._failure is not None:
            return EncryptionError(
                f"encrypting {self.name} failed ({self._failure}); nothing was published"
            )
        return None

    @property
    def sha256(self) -> str:
        return self._sink.sha.hexdigest()

    @property
    def size(self) -> int:
        return self._sink.size

    def write(self, data: bytes | memoryview) -> int:
        try:
            self._pipe.put(bytes(data))
        except _Closed:
            self._thread.join()
            raise self._error() or EncryptionError(f"encrypting {self.name} stopped") from None
        self.plain_size += len(data)
        return len(data)

    def sync_close(self) -> None:
        self._pipe.close()
        self._thread.join()
        err = self._error()
        if err is not None:
            self.inner.close()
            raise err
        self.inner.sync_close()

    def close(self) -> None:
        self._pipe.fail(_Closed())
        self._thread.join()
        self.inner.close()


class _PipeWriter:
    """What pyrage writes the plaintext to: the pipe a reader takes it from."""

    def __init__(self, pipe: _Pipe) -> None:
        self.pipe = pipe

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        self.pipe.put(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


class _HashingReader:
    """``src`` hashed as pyrage reads it (the stored bytes, for the sidecar check)."""

    def __init__(self, src: BinaryIO) -> None:
        self.src = src
        self.sha = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data


def decrypt_failure(e: BaseException, what: str) -> EncryptionError:
    """pyrage's error decrypting ``what`` as one line saying what to do (never the identity)."""
    text = str(e)
    if isinstance(e, pyrage.DecryptError) and "No matching keys" in text:
        return WrongIdentity(
            f"{what}: the identity does not match any of its recipients; give the identity of "
            "a key it was encrypted to (its entry lists them)"
        )
    if "truncated" in text:
        return EncryptionError(
            f"{what} is truncated (its last age chunk is missing); nothing of it was used — "
            "use another copy"
        )
    if isinstance(e, pyrage.DecryptError):
        return EncryptionError(f"{what} is not a readable age file ({text}); use another copy")
    return EncryptionError(
        f"{what} is damaged: an age chunk failed authentication ({text}); nothing of it was "
        "used — use another copy"
    )


class DecryptingReader(io.RawIOBase):
    """The plaintext of the age file ``src``, decrypted by pyrage's ``decrypt_io`` on a thread
    of its own. Every byte it returns belongs to a chunk that authenticated; a read at the end
    raises ``EncryptionError`` when the file was cut or altered, ``WrongIdentity`` when no
    identity matches."""

    def __init__(self, src: BinaryIO, identities: Sequence[x25519.Identity], what: str) -> None:
        super().__init__()
        self.src = _HashingReader(src)
        self.what = what
        self._pipe = _Pipe()
        self._thread = threading.Thread(
            target=self._run, args=(list(identities),), name="age-decrypt", daemon=True
        )
        self._thread.start()

    def _run(self, identities: list[x25519.Identity]) -> None:
        try:
            pyrage.decrypt_io(self.src, _PipeWriter(self._pipe), identities)
        except BaseException as e:
            self._pipe.fail(decrypt_failure(e, self.what))
        else:
            self._pipe.close()

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._pipe.get(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._pipe.fail(EncryptionError(f"{self.what}: the reader was closed"))
            self._thread.join()
            self.src.src.close()
        super().close()


# -- the catalog entry -------------------------------------------------------------------------


def encryption_of(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``encryption`` of a catalog entry, or None for a plaintext backup's."""
    enc = info.get("encryption") if isinstance(info, dict) else None
    return enc if isinstance(enc, dict) else None


def sealed_entry(info: dict[str, Any], sha256: str, size: int, recipients: list[str]) -> bytes:
    """The entry stored beside an encrypted backup: ``sha256`` and ``size`` of the stored bytes,
    and ``encryption`` with the plaintext's (what the backup computed while writing it)."""
    out = dict(info)
    out["encryption"] = {
        "format": FORMAT,
        "recipients": recipients,
        "plaintext": {"sha256": info.get("sha256"), "size": info.get("size")},
    }
    out["sha256"], out["size"] = sha256, size
    return encode_entry(out)


def plain_entry(info: dict[str, Any]) -> dict[str, Any]:
    """An encrypted backup's entry as its decrypted copy's: the plaintext's sha256 and size."""
    enc = encryption_of(info) or {}
    plain = enc.get("plaintext") or {}
    out = {k: v for k, v in info.items() if k != "encryption"}
    out["sha256"], out["size"] = plain.get("sha256"), plain.get("size")
    return out


def _resealed(store: BackupStore, name: str, data: bytes) -> bytes:
    """``data``, a new entry for ``name``, with the stored facts of the entry it replaces when
    that one describes an encrypted backup and ``data`` does not."""
    try:
        had = json.loads(store.read(name))
        new = json.loads(data)
    except (OSError, ValueError):
        return data
    enc = encryption_of(had)
    if enc is None or not isinstance(new, dict) or encryption_of(new) is not None:
        return data
    new.update(sha256=had.get("sha256"), size=had.get("size"), encryption=enc)
    return encode_entry(new)


def plaintext_of(store: BackupStore, name: str) -> tuple[str, int] | None:
    """The (sha256, size) of the plaintext of the backup ``name`` in ``store`` when its entry
    says it is encrypted, else None: what makes an encrypted copy the same backup as a
    plaintext one."""
    inner = store.inner if isinstance(store, EncryptedStore) else store
    try:
        info = json.loads(inner.read(info_name(name)))
    except (OSError, ValueError):
        return None
    plain = (encryption_of(info) or {}).get("plaintext") or {}
    sha, size = plain.get("sha256"), plain.get("size")
    return (sha, size) if isinstance(sha, str) and isinstance(size, int) else None


def _is_meta(name: str) -> bool:
    """Objects that are never encrypted: sidecars, catalog entries, history files."""
    return name.endswith((SIDECAR_SUFFIX, INFO_SUFFIX)) or name.startswith("histories/")


def is_encrypted(store: BackupStore, name: str) -> bool:
    """Whether the stored object ``name`` is an age file (its first bytes)."""
    with store.open(name) as f:
        return f.read(len(AGE_MAGIC)) == AGE_MAGIC


# -- the seam ----------------------------------------------------------------------------------


def _inner(temp: TempObject) -> TempObject:
    return temp.inner if isinstance(temp, EncryptingTemp) else temp


class EncryptedStore(Forwarding):
    """``inner`` with archives and incrementals encrypted to ``recipients`` when written, and
    decrypted with ``identities`` when read (module docstring). With recipients only, a read
    of an encrypted object is ``NeedsIdentity``; a plaintext object reads as it is."""

    def __init__(
        self,
        inner: BackupStore,
        recipients: Sequence[str] = (),
        identities: Sequence[x25519.Identity] = (),
        spool_dir: Path | None = None,
    ) -> None:
        self.inner = inner
        self.spool_dir = spool_dir
        self.recipients = parse_recipients(recipients)
        self._recipients = [x25519.Recipient.from_str(r) for r in self.recipients]
        self._identities = list(identities)
        # The catalog checks an encrypted entry against its file's header only when it can.
        self.decrypts = bool(self._identities)

    def __repr__(self) -> str:  # never the identities
        return f"EncryptedStore({self.inner!r}, recipients={self.recipients!r})"

    def _decrypting(self, name: str) -> DecryptingReader | None:
        """A reader of the plaintext of ``name``, or None when it is not encrypted."""
        if _is_meta(name) or not is_encrypted(self.inner, name):
            return None
        if not self._identities:
            raise NeedsIdentity(
                f"{self.describe(name)} is encrypted (age); give --identity FILE with a key of "
                "one of its recipients"
            )
        return DecryptingReader(self.inner.open(name), self._identities, self.describe(name))

    def open(self, name: str) -> BinaryIO:
        """``name`` from its start; an encrypted object only once all of it decrypted and
        authenticated (spooled to an unlinked temp file), else EncryptionError."""
        reader = self._decrypting(name)
        if reader is None:
            return self.inner.open(name)
        spool = tempfile.TemporaryFile(dir=self.spool_dir)
        try:
            with reader:
                shutil.copyfileobj(reader, spool, 1 << 20)
            spool.seek(0)
        except BaseException:
            spool.close()
            raise
        return spool  # type: ignore[return-value]

    def open_head(self, name: str) -> BinaryIO:
        """``name`` streamed: for reading its first bytes (a header). Every byte returned
        authenticated with its chunk, but a cut-off end shows only at the end: never use this
        for what is restored or copied (``open``)."""
        reader = self._decrypting(name)
        if reader is None:
            return self.inner.open(name)
        return io.BufferedReader(reader, 1 << 16)  # type: ignore[return-value]

    def read(self, name: str) -> bytes:
        if _is_meta(name):
            return self.inner.read(name)
        with self.open(name) as f:
            return f.read()

    def create_temp(self, name: str) -> TempObject:
        temp = self.inner.create_temp(name)
        if not self._recipients:
            return temp
        return EncryptingTemp(temp, self._recipients)

    def publish(self, temp: TempObject) -> None:
        self.inner.publish(_inner(temp))

    def create(self, name: str, data: bytes, temp: TempObject | None = None) -> None:
        """Create ``name``; the sidecar and entry of an object encrypted here describe the
        stored bytes (the module docstring), also when they are created after it was published
        by an earlier run (a copy resumed after a cut: the stored bytes are hashed then)."""
        owner = name.removesuffix(SIDECAR_SUFFIX).removesuffix(INFO_SUFFIX)
        if isinstance(temp, EncryptingTemp) and owner == temp.name:
            sha, size = temp.sha256, temp.size
        elif temp is None and owner != name and self._recipients and self._stored_age(owner):
            sha, size = self._stored_hash(owner)
        else:
            self.inner.create(name, data, None if temp is None else _inner(temp))
            return
        if name.endswith(SIDECAR_SUFFIX):
            data = encode_sidecar(sha, owner)
        else:
            data = sealed_entry(json.loads(data), sha, size, self.recipients)
        self.inner.create(name, data, None if temp is None else _inner(temp))

    def _stored_age(self, name: str) -> bool:
        try:
            return is_encrypted(self.inner, name)
        except FileNotFoundError:
            return False

    def _stored_hash(self, name: str) -> tuple[str, int]:
        h, n = hashlib.sha256(), 0
        with self.inner.open(name) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
        return h.hexdigest(), n

    def replace(self, name: str, data: bytes) -> None:
        """Replace an entry; one replacing an encrypted backup's entry keeps what describes the
        stored bytes (``sha256``, ``size``, ``encryption``) whatever view ``data`` was made in
        (a verdict carried over from a plaintext copy)."""
        if name.endswith(INFO_SUFFIX):
            data = _resealed(self.inner, name, data)
        self.inner.replace(name, data)

    def commit(self, temp: TempObject) -> None:
        self.inner.commit(_inner(temp))

    def discard(self, temp: TempObject) -> None:
        if isinstance(temp, EncryptingTemp):
            temp.close()
        self.inner.discard(_inner(temp))


def check_ciphertext(ref: Ref) -> tuple[dict[str, Any] | None, list[str]]:
    """What can be checked of the encrypted backup ``ref`` without its identity: the stored
    bytes' sha256 against its sidecar (one full read) and its catalog entry (checksum, sha256,
    size). Returns the entry (None if missing) and the problems found."""
    base = ref.name.rsplit("/", 1)[-1]
    problems: list[str] = []
    try:
        expected: str | None = decode_sidecar(
            ref.store.read(sidecar_name(ref.name)), sidecar_name(base)
        )
    except FileNotFoundError:
        expected = None
        problems.append(f"{sidecar_name(base)} is missing, so the ciphertext cannot be checked")
    except EngramError as e:
        expected = None
        problems.append(e.message)
    sha = hashlib.sha256()
    with ref.store.open(ref.name) as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    if expected is not None and sha.hexdigest() != expected:
        problems.append(
            f"checksum mismatch: {sidecar_name(base)} says {expected[:16]}…, the stored bytes "
            f"hash to {sha.hexdigest()[:16]}…; the backup or its sidecar is damaged"
        )
    info = read_info(ref)
    if info is not None:
        problems += [f"{base}.info.json: {p}" for p in check_entry(ref, info, None)]
    return info, problems


# -- decrypting a backup into a directory ------------------------------------------------------


def decrypt_backup(
    src: Ref, identities: Sequence[x25519.Identity], into: Path, durable: bool = True
) -> Path:
    """Decrypt the backup ``src`` into the directory ``into`` as its plaintext self: NAME, its
    sidecar (the plaintext's sha256) and its catalog entry (``plain_entry``), for the commands
    that read a local file. The plaintext goes to a temp file published only once the last age
    chunk authenticated and the stored bytes hashed to their sidecar's sha256; else nothing is
    left under NAME. The plaintext's sha256 is the entry's when it has one (whoever reads the
    copy checks it against that sidecar, as restore and validation do), else computed here.
    ``durable=False``: a working copy, not fsynced. Returns the path of NAME in ``into``."""
    what = src.describe()
    base = src.name.rsplit("/", 1)[-1]
    info: dict[str, Any] | None
    try:
        info = json.loads(src.store.read(info_name(src.name)))
    except (OSError, ValueError):
        info = None
    try:
        stored_sha: str | None = decode_sidecar(
            src.store.read(sidecar_name(src.name)), sidecar_name(base)
        )
    except FileNotFoundError:
        stored_sha = None
    want = ((encryption_of(info) or {}).get("plaintext") or {}).get("sha256")
    plain = hashlib.sha256() if not isinstance(want, str) else None
    ensure_private_dir(into)
    out = LocalBackupStore(into)
    temp = out.create_temp(base)
    try:
        if not is_encrypted(src.store, src.name):
            raise BadArchive(f"{what} is not an age file; it needs no --identity")
        reader = DecryptingReader(src.store.open(src.name), identities, what)
        try:
            while chunk := reader.read(1 << 20):
                if plain is not None:
                    plain.update(chunk)
                temp.write(chunk)
        finally:
            reader.close()
        if stored_sha is not None and reader.src.sha.hexdigest() != stored_sha:
            raise BadArchive(
                f"checksum mismatch: {sidecar_name(base)} says {stored_sha[:16]}…, {what} hashes "
                f"to {reader.src.sha.hexdigest()[:16]}…; it is damaged — use another copy"
            )
        if durable:
            temp.sync_close()
        else:
            temp.close()
        out.publish(temp)
        sha = plain.hexdigest() if plain is not None else str(want)
        if stored_sha is not None:
            out.create(sidecar_name(base), encode_sidecar(sha, base), temp)
        if info is not None:
            out.create(info_name(base), encode_entry(plain_entry(info)), temp)
        out.commit(temp)
    except BaseException:
        out.discard(temp)
        raise
    return out.path(base)
