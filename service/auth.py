"""Bearer tokens per caller: a token file read again when it changes, checked in constant time.

The file holds one token per line, optionally `name:token` (the name is what logs and metrics may
show; a token never appears in either). Blank lines and lines starting with `#` are skipped. The
file is looked at again at most every RELOAD_CHECK_S, and re-read when its size, mtime or inode
changed, so tokens are added or revoked without a restart; an unreadable or empty new version
keeps the last good set (and logs why) rather than locking every caller out or letting all in.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("attnserve")
TOKENS_ENV = "ATTNSERVE_AUTH_TOKENS"  # the token file, for the replicas, the plain server and images
RELOAD_CHECK_S = 1.0
MAX_TOKEN_BYTES = 4096  # longer is refused unread: nothing a client sends is hashed unbounded
BEARER = "bearer "
# Why a call was refused; the metric's `reason` label (a closed set, never client text).
MISSING, MALFORMED, UNKNOWN = "missing", "malformed", "unknown"


class TokenFileError(ValueError):
    """The token file is unreadable, empty or holds a malformed line."""


@dataclass(frozen=True)
class Verdict:
    """A call's authentication: the caller's name, or why it was refused."""

    caller: str | None
    reason: str | None = None

    @property
    def message(self) -> str:
        """The plain message an UNAUTHENTICATED status carries."""
        return {
            MISSING: "this server needs a token: send 'authorization: Bearer <token>' metadata",
            MALFORMED: "the authorization metadata must be 'Bearer <token>'",
            UNKNOWN: "the token is not valid",
        }.get(self.reason or "", "")


def parse_tokens(text: str, source: str = "token file") -> dict[bytes, str]:
    """SHA-256 of each token -> its caller's name (`name:token` lines, or a bare token).

    Raises:
        TokenFileError: for a line with an empty name or token, a duplicate token, or no tokens.
    """
    tokens: dict[bytes, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        if not sep:
            name, token = f"line-{number}", name
        name, token = name.strip(), token.strip()
        if not name or not token or len(token.encode()) > MAX_TOKEN_BYTES or any(c.isspace() for c in token):
            raise TokenFileError(f"{source} line {number}: expected 'name:token' or 'token' (no spaces)")
        digest = hashlib.sha256(token.encode()).digest()
        if digest in tokens:
            raise TokenFileError(f"{source} line {number}: the token of {name!r} is already listed")
        tokens[digest] = name
    if not tokens:
        raise TokenFileError(f"{source} holds no tokens")
    return tokens


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> tuple[str | None, str | None]:
    """The token of the call's `authorization` metadata, or None and why it is missing or malformed."""
    values = [v for k, v in metadata if k.lower() == "authorization"]
    if not values:
        return None, MISSING
    value = values[0]
    if isinstance(value, bytes) or len(values) > 1 or len(value) > MAX_TOKEN_BYTES + len(BEARER):
        return None, MALFORMED
    scheme, token = value[: len(BEARER)], value[len(BEARER) :].strip()
    if scheme.lower() != BEARER or not token:
        return None, MALFORMED
    return token, None


class TokenStore:
    """The tokens of one file, re-read when the file changes."""

    def __init__(self, path: Path):
        """Reads the file once.

        Raises:
            TokenFileError: if the file is unreadable or invalid.
        """
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        self._tokens = self._read()
        self._checked = time.monotonic()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _read(self) -> dict[bytes, str]:
        try:
            text = self.path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenFileError(f"cannot read token file {self.path}: {type(e).__name__}") from None
        return parse_tokens(text, str(self.path))

    def _refresh(self) -> None:
        """Re-reads the file if it changed since the last look (at most every RELOAD_CHECK_S)."""
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return
        with self._lock:
            self._checked = now
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                self._tokens = self._read()
            except TokenFileError as e:
                log.error("keeping the previous tokens: %s", e)
                return
            log.info("token file %s reloaded: %d callers", self.path, len(self._tokens))

    def check(self, metadata: Iterable[tuple[str, str | bytes]]) -> Verdict:
        """Authenticates one call by its metadata; compares the token's digest with every known
        one in constant time."""
        self._refresh()
        token, reason = bearer_token(metadata)
        if token is None:
            return Verdict(None, reason)
        digest = hashlib.sha256(token.encode()).digest()
        caller = None
        for known, name in self._tokens.items():
            if hmac.compare_digest(digest, known):
                caller = name
        return Verdict(caller) if caller else Verdict(None, UNKNOWN)


def token_store_from_env() -> TokenStore | None:
    """The TokenStore of $ATTNSERVE_AUTH_TOKENS; None when it is not set (no authentication).

    Raises:
        TokenFileError: if the file is unreadable or invalid.
    """
    path = os.environ.get(TOKENS_ENV)
    return TokenStore(Path(path)) if path else None
