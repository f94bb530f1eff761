"""
The clients file: the client ids (secrets) that may use the API, one per line.

A client is known inside mmgun only by a label derived from its id (a hash
prefix), so that the secret itself is never stored in the queue or logged.
"""

from __future__ import annotations

import hashlib

import attrs


class ClientsFileError(Exception):
    """The clients file cannot be used; the message is one line for the operator."""


def client_label(client_id: str) -> str:
    """The stable, non-secret name of a client: what the database and the logs hold."""
    return "c-" + hashlib.sha256(client_id.encode("utf-8")).hexdigest()[:16]


@attrs.frozen
class Clients:
    """An immutable set of accepted client ids, matched by digest."""

    _digests: frozenset[bytes]

    @classmethod
    def from_ids(cls, ids: list[str]) -> Clients:
        return cls(frozenset(_digest(i) for i in ids))

    def __len__(self) -> int:
        return len(self._digests)

    def authenticate(self, client_id: object) -> str | None:
        """The client's label if ``client_id`` is accepted, else None."""
        if not isinstance(client_id, str) or not client_id:
            return None
        digest = _digest(client_id)
        # Looking up a SHA-256 digest leaks nothing useful about the secret by timing.
        return client_label(client_id) if digest in self._digests else None


def _digest(client_id: str) -> bytes:
    return hashlib.sha256(client_id.encode("utf-8")).digest()


def parse_clients(text: str, source: str = "clients file") -> list[str]:
    """Client ids from the file's text: one per line, blank lines and ``#`` comments ignored."""
    ids = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if any(c.isspace() or not c.isprintable() or not c.isascii() for c in line):
            raise ClientsFileError(f"{source} line {number}: a client id is printable ASCII without spaces")
        if len(line) < 16:
            raise ClientsFileError(f"{source} line {number}: a client id must be at least 16 characters")
        ids.append(line)
    return ids


def load_clients(path: str) -> Clients:
    """Read and check the clients file; raise ClientsFileError with one clear line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ClientsFileError(f"clients file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ClientsFileError(f"cannot read clients file {path}: {e}") from None
    # An empty file is fine: API keys (in the database) may be the only credentials.
    return Clients.from_ids(parse_clients(text, path))
