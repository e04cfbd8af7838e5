"""Cached resources: settings, the engine, the researcher auth, display images.

``st.cache_resource`` holds one engine per database URL and one :class:`ResearcherAuth` per
server process (so the login throttle is shared by every browser tab); ``st.cache_data``
holds decoded display images (keyed by file path and modification time).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import streamlit as st
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from cellspot.auth import InvalidPasswordHashError, ResearcherAuth
from cellspot.imaging import ImageReadError
from cellspot.render import ImageUnavailableError, image_file, read_display_rgb
from cellspot.settings import Settings, get_settings
from cellspot.store.db import make_engine, transaction
from cellspot.store.models import Image

log = logging.getLogger(__name__)


def settings() -> Settings:
    """The settings from the environment (cheap; read on every rerun so tests can change them)."""
    return get_settings()


@st.cache_resource(show_spinner=False)
def _engine(url: str) -> Engine:
    return make_engine(url, settings=get_settings())


def engine() -> Engine:
    """The engine of the configured store (one per URL and server process)."""
    return _engine(settings().resolved_database_url)


@contextmanager
def session() -> Iterator[Session]:
    """A session in one transaction: committed when the block ends, rolled back on error.

    Call no ``st.*`` function inside the block: a rerun raised there would roll it back.
    """
    with transaction(engine()) as sess:
        yield sess


@st.cache_resource(show_spinner=False)
def _auth(_settings: Settings, fingerprint: str) -> ResearcherAuth | None:
    """One auth object per configuration (``fingerprint`` keys the cache, not the password)."""
    try:
        secrets = st.secrets
    except Exception:  # noqa: BLE001 - no secrets file: environment only
        secrets = None
    try:
        return ResearcherAuth.from_settings(_settings, secrets)
    except InvalidPasswordHashError as exc:
        log.error("researcher login disabled: %s", exc)
        return None


def researcher_auth() -> ResearcherAuth | None:
    """The researcher auth (``None`` when the configured hash is malformed)."""
    current = settings()
    fingerprint = "|".join((
        current.researcher_password_hash or "",
        str(hash(current.researcher_password.get_secret_value())) if current.researcher_password else "",
    ))
    return _auth(current, fingerprint)


@st.cache_data(show_spinner=False, max_entries=64)
def _display_rgb(path: str, mtime: float, bit_depth: int) -> np.ndarray:
    return read_display_rgb(path, bit_depth)


def display_rgb(image: Image) -> np.ndarray:
    """``image``'s pixels as (H, W, 3) uint8 RGB, decoded once per file version.

    Raises :class:`cellspot.render.ImageUnavailableError` when it has no stored pixels or its
    file cannot be decoded (every page then shows the image's other data or moves on).
    """
    path = image_file(settings(), image)
    try:
        return _display_rgb(str(path), Path(path).stat().st_mtime, int(image.bit_depth or 8))
    except ImageReadError as exc:
        log.warning("image %s cannot be shown: %s", image.name, exc)
        raise ImageUnavailableError(f"the file of image {image.name!r} cannot be read ({exc.reason}): "
                                    f"{exc.path}") from exc
