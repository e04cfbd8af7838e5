"""Researcher password: salted scrypt hashes, constant-time checks, throttled logins.

Pure standard library. Passwords are never logged, echoed or stored in plain text: the
settings hold either a hash made by :func:`hash_password` or a plain password that is hashed
once in memory (:meth:`cellspot.settings.Settings.researcher_password_hash_value`).

Hash format (one ASCII string)::

    scrypt$<n>$<r>$<p>$<salt, urlsafe base64>$<key, urlsafe base64>

Wrong passwords are slowed down by :class:`LoginThrottle`: after ``k`` consecutive failures
of one key (the app uses one key for the whole researcher login, so parallel guessing from
many browser tabs is slowed down as well) the next attempt is refused until
:func:`delay_for` ``(k)`` seconds have passed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

SCHEME = "scrypt"
DEFAULT_N = 2**14
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
MAX_PASSWORD_CHARS = 1024
DELAY_BASE_S = 0.5
DELAY_CAP_S = 30.0
SECRET_KEYS = ("researcher_password_hash", "researcher_password")  # accepted in st.secrets


class InvalidPasswordHashError(ValueError):
    """A stored password hash is not in the ``scrypt$n$r$p$salt$key`` format."""


class PasswordNotConfiguredError(RuntimeError):
    """No researcher password is configured, so researcher pages stay closed."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _check_password_type(password: object) -> str:
    if not isinstance(password, str):
        raise TypeError(f"a password must be a str, got {type(password).__name__}")
    if len(password) > MAX_PASSWORD_CHARS:
        raise ValueError(f"a password may have at most {MAX_PASSWORD_CHARS} characters")
    return password


def hash_password(
    password: str, *, salt: bytes | None = None, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P
) -> str:
    """Salted scrypt hash of ``password`` as one string (see the module docstring).

    ``salt`` defaults to 16 random bytes (pass one only in tests). ``n`` must be a power of
    two > 1. An empty password is refused (:class:`ValueError`).
    """
    password = _check_password_type(password)
    if not password:
        raise ValueError("an empty password cannot be hashed; set a non-empty researcher password")
    if n < 2 or n & (n - 1):
        raise ValueError(f"scrypt n must be a power of two > 1, got {n}")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                         maxmem=256 * n * r + (1 << 20), dklen=KEY_BYTES)
    return f"{SCHEME}${n}${r}${p}${_b64(salt)}${_b64(key)}"


def parse_hash(hashed: str) -> tuple[int, int, int, bytes, bytes]:
    """``(n, r, p, salt, key)`` of a :func:`hash_password` string; :class:`InvalidPasswordHashError`."""
    parts = hashed.strip().split("$") if isinstance(hashed, str) else []
    if len(parts) != 6 or parts[0] != SCHEME:
        raise InvalidPasswordHashError(
            "the researcher password hash is not in the format "
            "'scrypt$<n>$<r>$<p>$<salt>$<key>' made by `cellspot.auth.hash_password`"
        )
    try:
        n, r, p = (int(v) for v in parts[1:4])
        salt, key = _unb64(parts[4]), _unb64(parts[5])
    except (ValueError, TypeError) as exc:
        raise InvalidPasswordHashError(f"the researcher password hash has a malformed field: {exc}") from exc
    if n < 2 or n & (n - 1) or r < 1 or p < 1 or not salt or not key:
        raise InvalidPasswordHashError("the researcher password hash has out-of-range scrypt parameters")
    return n, r, p, salt, key


def verify_password(password: str, hashed: str) -> bool:
    """True when ``password`` matches ``hashed`` (constant-time comparison of the keys).

    A malformed ``hashed`` raises :class:`InvalidPasswordHashError` (a configuration error,
    not a wrong password); a non-str or empty ``password`` is simply wrong.
    """
    n, r, p, salt, key = parse_hash(hashed)
    if not isinstance(password, str) or not password or len(password) > MAX_PASSWORD_CHARS:
        return False
    candidate = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                               maxmem=256 * n * r + (1 << 20), dklen=len(key))
    return hmac.compare_digest(candidate, key)


def delay_for(failures: int, base: float = DELAY_BASE_S, cap: float = DELAY_CAP_S) -> float:
    """Seconds to refuse further attempts after ``failures`` consecutive wrong passwords.

    0 for no failure, then ``base * 2 ** (failures - 1)`` capped at ``cap``:
    0.5, 1, 2, 4, ... 30 s with the defaults.
    """
    if failures <= 0:
        return 0.0
    return float(min(cap, base * 2.0 ** min(failures - 1, 64)))


@dataclass
class LoginThrottle:
    """Consecutive failures per key and the time before which that key is refused.

    Thread-safe; meant to live once per server process (the app keeps it in
    ``st.cache_resource``). ``clock`` is injectable for tests.
    """

    base: float = DELAY_BASE_S
    cap: float = DELAY_CAP_S
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, int] = field(default_factory=dict, repr=False)
    _blocked_until: dict[str, float] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def wait_seconds(self, key: str = "researcher") -> float:
        """Seconds until ``key`` may try again (0 when it may try now)."""
        with self._lock:
            return max(0.0, self._blocked_until.get(key, 0.0) - self.clock())

    def failures(self, key: str = "researcher") -> int:
        """Consecutive failures recorded for ``key``."""
        with self._lock:
            return self._failures.get(key, 0)

    def record_failure(self, key: str = "researcher") -> float:
        """Count one more failure of ``key``; returns the delay now imposed on it (s)."""
        with self._lock:
            count = self._failures.get(key, 0) + 1
            self._failures[key] = count
            delay = delay_for(count, self.base, self.cap)
            self._blocked_until[key] = self.clock() + delay
        return delay

    def record_success(self, key: str = "researcher") -> None:
        """Forget the failures of ``key``."""
        with self._lock:
            self._failures.pop(key, None)
            self._blocked_until.pop(key, None)


@dataclass(frozen=True)
class LoginResult:
    """Outcome of one login attempt.

    ``ok``: the password was right. ``retry_after``: seconds before the next attempt is
    accepted (0 after a success). ``message``: a user-facing sentence (never contains the
    password).
    """

    ok: bool
    retry_after: float
    message: str


@dataclass
class ResearcherAuth:
    """Checks researcher passwords against one stored hash, with throttling.

    ``password_hash``: a :func:`hash_password` string, or ``None`` when no password is
    configured (then every login is refused with a message saying how to configure one).
    """

    password_hash: str | None
    throttle: LoginThrottle = field(default_factory=LoginThrottle)

    @classmethod
    def from_settings(cls, settings: Any, secrets_map: Mapping[str, Any] | None = None,
                      throttle: LoginThrottle | None = None) -> ResearcherAuth:
        """The auth of ``settings`` (environment), else of ``secrets_map`` (e.g. ``st.secrets``).

        Environment first: ``CELLSPOT_RESEARCHER_PASSWORD_HASH``, then
        ``CELLSPOT_RESEARCHER_PASSWORD``; then the secrets keys ``researcher_password_hash``,
        ``researcher_password`` (a plain secret is hashed once here). A malformed hash raises
        :class:`InvalidPasswordHashError` at once.
        """
        hashed = settings.researcher_password_hash_value()
        if hashed is None and secrets_map is not None:
            hashed = _hash_from_secrets(secrets_map)
        if hashed is not None:
            parse_hash(hashed)
        return cls(password_hash=hashed, throttle=throttle or LoginThrottle())

    @property
    def configured(self) -> bool:
        """True when a researcher password is configured."""
        return self.password_hash is not None

    def login(self, password: str, key: str = "researcher") -> LoginResult:
        """Check ``password``; refused without checking while ``key`` is throttled.

        A wrong password records a failure and returns the imposed delay in
        ``retry_after``; a right one clears the failures of ``key``.
        """
        if self.password_hash is None:
            return LoginResult(False, 0.0, "No researcher password is configured: set "
                               "CELLSPOT_RESEARCHER_PASSWORD (or CELLSPOT_RESEARCHER_PASSWORD_HASH, "
                               "or researcher_password in Streamlit secrets) and restart.")
        if not password:  # a slip, not a guess: not counted
            return LoginResult(False, 0.0, "Enter the password.")
        wait = self.throttle.wait_seconds(key)
        if wait > 0:
            # rounded up: "0 s" while still refused read as a broken page
            return LoginResult(False, wait, "Wrong passwords slow the next attempt down: try again in "
                                            f"{max(1, math.ceil(wait))} s.")
        if verify_password(password, self.password_hash):
            self.throttle.record_success(key)
            log.info("researcher login succeeded")
            return LoginResult(True, 0.0, "Logged in.")
        delay = self.throttle.record_failure(key)
        log.warning("researcher login refused (wrong password, %d consecutive)", self.throttle.failures(key))
        return LoginResult(False, delay, f"Wrong password; the next attempt is possible in {math.ceil(delay)} s."
                           if delay >= 1 else "Wrong password.")


def _hash_from_secrets(secrets_map: Mapping[str, Any]) -> str | None:
    try:
        hashed = secrets_map.get("researcher_password_hash")
        plain = secrets_map.get("researcher_password")
    except Exception as exc:  # noqa: BLE001 - st.secrets raises when no secrets file exists
        log.debug("no secrets available: %s", type(exc).__name__)
        return None
    if hashed:
        return str(hashed).strip()
    if plain:
        return hash_password(str(plain))
    return None
