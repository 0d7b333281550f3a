"""known_hosts files, read as OpenSSH reads them (paramiko's HostKeys.load skips bad lines silently and stops with
an exception on a `@revoked` or `@cert-authority` line): hashed names (`|1|...`) work; `@cert-authority` lines
are accepted and ignored (paramiko cannot check host certificates); `@revoked` keys are never trusted and are
refused by name; a line of a key type paramiko does not speak is skipped; a line that is not a known_hosts entry
at all, or a file that cannot be read, is a UsageError naming the file and line (checked before anything runs).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import HostKeyError, UsageError

_KEY_TYPE = ("ssh-", "ecdsa-", "sk-", "rsa-", "x509v3-")


@dataclass
class KnownHosts:
    files: tuple[str, ...]
    entries: list[tuple[list[str], object]] = field(default_factory=list)   # (host names/hashes, PKey)
    revoked: dict[bytes, str] = field(default_factory=dict)                 # key blob -> "file:line"
    cert_authorities: int = 0

    def into(self, host_keys) -> None:
        """Add the trusted (not revoked) entries to a paramiko HostKeys."""
        for names, key in self.entries:
            if key.asbytes() not in self.revoked:
                for name in names:
                    host_keys.add(name, key.get_name(), key)

    def refuse_if_revoked(self, hostname: str, key) -> None:
        where = self.revoked.get(key.asbytes())
        if where:
            raise HostKeyError(f"{hostname}: host key {key.get_name()} {fingerprint(key)} is REVOKED ({where}); "
                               "refusing")


def _blob_type(blob: bytes) -> str:
    """The type string an SSH public key blob starts with (uint32 length + name)."""
    if len(blob) < 4:
        return ""
    (n,) = struct.unpack(">I", blob[:4])
    return blob[4:4 + n].decode("ascii", "replace") if n <= len(blob) - 4 else ""


def _parse_line(line: str) -> tuple[str, list[str], str, bytes] | None:
    """(marker, names, key type, blob), or None when the line is not a key line."""
    fields = line.split()
    marker = fields.pop(0) if fields and fields[0].startswith("@") else ""
    if marker not in ("", "@revoked", "@cert-authority") or len(fields) < 3:
        return None
    names, key_type, data = fields[0], fields[1], fields[2]
    if not key_type.startswith(_KEY_TYPE):
        return None
    try:
        blob = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None
    if _blob_type(blob) != key_type:
        return None
    return marker, names.split(","), key_type, blob


def load_known_hosts(paths: tuple[str, ...]) -> KnownHosts:
    """Read every existing file of `paths`. A file that cannot be read, is not text, or holds a line that is not
    a known_hosts entry is a UsageError naming it (OpenSSH would skip such lines; a garbage file is a mistake)."""
    from paramiko.pkey import PKey, UnknownKeyType
    from paramiko.ssh_exception import SSHException

    known = KnownHosts(files=paths)
    for path in paths:
        p = Path(path)
        if not p.exists():
            continue
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"known_hosts {path}: not a text file") from None
        except OSError as e:
            raise UsageError(f"known_hosts {path}: cannot read ({e.strerror})") from None
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parsed = _parse_line(line)
            if parsed is None:
                raise UsageError(f"known_hosts {path}: line {n}: not a known_hosts entry ({line[:60]!r})")
            marker, names, key_type, blob = parsed
            if marker == "@revoked":
                known.revoked[blob] = f"{path}:{n}"
            elif marker == "@cert-authority":
                known.cert_authorities += 1
            else:
                try:
                    key = PKey.from_type_string(key_type, blob)
                except (UnknownKeyType, SSHException, ValueError):
                    continue           # a valid line of a key type paramiko does not speak: not ours to use
                known.entries.append(([x for x in names if not x.startswith("!")], key))
    return known


def fingerprint(key) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
