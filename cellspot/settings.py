"""The one place that reads the environment: ``CELLSPOT_*`` variables with working defaults."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, PrivateAttr, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Runtime settings.

    Every field can be set with an environment variable ``CELLSPOT_<FIELD>``, e.g.
    ``CELLSPOT_HOME=/data/cellspot`` or
    ``CELLSPOT_DATABASE_URL=postgresql+psycopg://user@host/db``.
    """

    model_config = SettingsConfigDict(env_prefix="CELLSPOT_", extra="ignore")

    home: Path = Field(default=Path("cellspot_data"), description="Images, exports and models live here.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default is a SQLite file inside `home`."
    )
    default_project: str = Field(default="demo", description="Project used when a command names none.")
    sqlite_busy_timeout_ms: int = Field(default=30_000, ge=0)
    queue_url: str | None = Field(
        default=None,
        description="Job queue: None = a SQLite huey queue at `home`/queue.db; "
        "'redis://host:6379/0' = a Redis queue shared by workers on several machines.",
    )
    queue_name: str | None = Field(
        default=None,
        description="Name of the job queue; None = 'cellspot-' and a short hash of the database, so that "
        "stores sharing one Redis database keep their jobs apart ('cellspot' drains jobs queued by "
        "versions before that).",
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="CPU threads torch may use per job; None = the CPUs this process may use."
    )
    researcher_password: SecretStr | None = Field(
        default=None,
        description="Plain researcher password (CELLSPOT_RESEARCHER_PASSWORD); hashed once in memory.",
    )
    researcher_password_hash: str | None = Field(
        default=None,
        repr=False,
        description="Researcher password hash from `cellspot.auth.hash_password` "
        "(CELLSPOT_RESEARCHER_PASSWORD_HASH); wins over the plain password.",
    )

    _password_hash_cache: str | None = PrivateAttr(default=None)

    @field_validator("default_project")
    @classmethod
    def _a_project_name(cls, value: str) -> str:
        from cellspot.store.queries import check_project_name

        return check_project_name(value)

    def researcher_password_hash_value(self) -> str | None:
        """The researcher password hash: the configured hash, else the plain password hashed
        once (salted scrypt, cached on this object), else ``None`` (no password configured).

        The plain password is never logged or returned.
        """
        if self.researcher_password_hash:
            return self.researcher_password_hash.strip()
        if self.researcher_password is None or not self.researcher_password.get_secret_value():
            return None
        if self._password_hash_cache is None:
            from cellspot.auth import hash_password

            self._password_hash_cache = hash_password(self.researcher_password.get_secret_value())
        return self._password_hash_cache

    @property
    def resolved_database_url(self) -> str:
        """The database URL to use: the explicit one, or ``sqlite:///<home>/cellspot.db``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'cellspot.db').resolve()}"

    @property
    def resolved_queue_url(self) -> str:
        """The job queue URL: the explicit one, or ``sqlite:///<home>/queue.db``."""
        if self.queue_url:
            return self.queue_url
        return f"sqlite:///{(self.home / 'queue.db').resolve()}"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def images_dir(self) -> Path:
        return self.home / "images"

    @property
    def rejects_dir(self) -> Path:
        return self.home / "rejects"

    @property
    def exports_dir(self) -> Path:
        return self.home / "exports"


def get_settings(**overrides: object) -> Settings:
    """Read the settings from the environment now (no import-time caching)."""
    return Settings(**overrides)  # type: ignore[arg-type]
