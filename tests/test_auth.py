"""Researcher password: scrypt hashes, verification, throttling, settings/secrets sources."""

from __future__ import annotations

import logging

import pytest

from cellspot import auth
from cellspot.settings import Settings

FAST = {"n": 2**4}  # tiny scrypt cost for speed; the format and code path are the same


@pytest.mark.parametrize(
    ("password", "attempt", "ok"),
    [
        ("s3cret", "s3cret", True),
        ("s3cret", "S3cret", False),
        ("s3cret", "s3cret ", False),
        ("s3cret", "", False),
        ("pässwörd ✓", "pässwörd ✓", True),
        ("x" * 1024, "x" * 1024, True),
        ("x" * 1024, "x" * 1025, False),
    ],
)
def test_hash_and_verify(password, attempt, ok) -> None:
    hashed = auth.hash_password(password, **FAST)
    assert hashed.startswith("scrypt$16$8$1$")
    assert password not in hashed
    assert auth.verify_password(attempt, hashed) is ok


def test_default_cost_and_salting() -> None:
    one, two = auth.hash_password("pw"), auth.hash_password("pw")
    assert one != two  # random salt
    assert one.split("$")[1] == str(auth.DEFAULT_N)
    assert auth.verify_password("pw", one) and auth.verify_password("pw", two)
    assert auth.hash_password("pw", salt=b"0123456789abcdef", **FAST) == auth.hash_password(
        "pw", salt=b"0123456789abcdef", **FAST)


@pytest.mark.parametrize(
    ("password", "kwargs", "error"),
    [("", {}, ValueError), (b"bytes", {}, TypeError), ("pw", {"n": 3}, ValueError), ("y" * 1025, {}, ValueError)],
)
def test_hash_password_refuses(password, kwargs, error) -> None:
    with pytest.raises(error):
        auth.hash_password(password, **kwargs)


@pytest.mark.parametrize(
    "hashed",
    ["", "plain", "bcrypt$16$8$1$abc$def", "scrypt$16$8$1$abc", "scrypt$x$8$1$abc$def", "scrypt$15$8$1$abc$def",
     "scrypt$16$8$1$$def"],
)
def test_malformed_hash_is_a_configuration_error(hashed) -> None:
    with pytest.raises(auth.InvalidPasswordHashError, match="hash"):
        auth.verify_password("pw", hashed)


@pytest.mark.parametrize(
    ("failures", "delay"),
    [(-1, 0.0), (0, 0.0), (1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, 30.0), (1000, 30.0)],
)
def test_delay_for(failures, delay) -> None:
    assert auth.delay_for(failures) == delay


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _auth(password: str = "right") -> tuple[auth.ResearcherAuth, FakeClock]:
    clock = FakeClock()
    return auth.ResearcherAuth(auth.hash_password(password, **FAST), auth.LoginThrottle(clock=clock)), clock


def test_login_throttles_wrong_passwords() -> None:
    gate, clock = _auth()
    first = gate.login("wrong")
    assert not first.ok and first.retry_after == 0.5
    # during the delay even the right password is refused without being checked
    blocked = gate.login("right")
    assert not blocked.ok and blocked.retry_after == pytest.approx(0.5) and "try again" in blocked.message
    clock.now += 0.5
    second = gate.login("wrong")
    assert not second.ok and second.retry_after == 1.0 and gate.throttle.failures() == 2
    clock.now += 0.25  # still refused: the wait is rounded up, never "0 s"
    assert "try again in 1 s." in gate.login("right").message
    clock.now += 0.75
    assert gate.login("right").ok
    assert gate.throttle.failures() == 0 and gate.throttle.wait_seconds() == 0.0


def test_an_empty_password_is_asked_for_and_not_counted() -> None:
    gate, _clock = _auth()
    result = gate.login("")
    assert not result.ok and result.message == "Enter the password." and gate.throttle.failures() == 0
    assert gate.login("right").ok


def test_throttle_keys_are_independent() -> None:
    throttle = auth.LoginThrottle(clock=FakeClock())
    throttle.record_failure("a")
    assert throttle.wait_seconds("a") > 0 and throttle.wait_seconds("b") == 0


def test_not_configured_refuses_everything() -> None:
    gate = auth.ResearcherAuth(None)
    result = gate.login("")
    assert not gate.configured and not result.ok and "CELLSPOT_RESEARCHER_PASSWORD" in result.message


def test_password_never_logged_or_echoed(caplog) -> None:
    gate, clock = _auth("hunter22")
    with caplog.at_level(logging.DEBUG, logger="cellspot"):
        results = [gate.login("guess-one")]
        clock.now += 10
        results.append(gate.login("hunter22"))
    text = caplog.text + " ".join(r.message for r in results) + repr(gate)
    assert "hunter22" not in text and "guess-one" not in text
    assert results[1].ok


# --------------------------------------------------------------------------- settings / secrets


def test_settings_plain_password_hashed_once(monkeypatch) -> None:
    monkeypatch.setenv("CELLSPOT_RESEARCHER_PASSWORD", "from-env")
    monkeypatch.delenv("CELLSPOT_RESEARCHER_PASSWORD_HASH", raising=False)
    settings = Settings()
    first = settings.researcher_password_hash_value()
    assert first == settings.researcher_password_hash_value()  # cached: hashed once
    assert auth.verify_password("from-env", first)
    assert "from-env" not in repr(settings) and "from-env" not in str(settings)


def test_settings_hash_wins_over_plain(monkeypatch) -> None:
    hashed = auth.hash_password("hashed-one", **FAST)
    monkeypatch.setenv("CELLSPOT_RESEARCHER_PASSWORD", "plain-one")
    monkeypatch.setenv("CELLSPOT_RESEARCHER_PASSWORD_HASH", f"  {hashed}\n")
    gate = auth.ResearcherAuth.from_settings(Settings())
    assert gate.login("hashed-one").ok
    assert not auth.ResearcherAuth.from_settings(Settings()).login("plain-one").ok


@pytest.mark.parametrize(
    ("secrets", "password", "configured"),
    [
        ({"researcher_password": "from-secrets"}, "from-secrets", True),
        ({"researcher_password_hash": auth.hash_password("h", **FAST)}, "h", True),
        ({}, "anything", False),
        (None, "anything", False),
    ],
)
def test_from_settings_falls_back_to_secrets(monkeypatch, secrets, password, configured) -> None:
    monkeypatch.delenv("CELLSPOT_RESEARCHER_PASSWORD", raising=False)
    monkeypatch.delenv("CELLSPOT_RESEARCHER_PASSWORD_HASH", raising=False)
    gate = auth.ResearcherAuth.from_settings(Settings(), secrets)
    assert gate.configured is configured
    assert gate.login(password).ok is configured


def test_secrets_that_raise_are_treated_as_absent(monkeypatch) -> None:
    class NoSecrets:
        def get(self, key):
            raise FileNotFoundError("no secrets.toml")

    monkeypatch.delenv("CELLSPOT_RESEARCHER_PASSWORD", raising=False)
    monkeypatch.delenv("CELLSPOT_RESEARCHER_PASSWORD_HASH", raising=False)
    assert not auth.ResearcherAuth.from_settings(Settings(), NoSecrets()).configured


def test_malformed_configured_hash_fails_at_startup(monkeypatch) -> None:
    monkeypatch.setenv("CELLSPOT_RESEARCHER_PASSWORD_HASH", "not-a-hash")
    with pytest.raises(auth.InvalidPasswordHashError):
        auth.ResearcherAuth.from_settings(Settings())
