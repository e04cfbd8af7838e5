"""Fixtures of the model tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cellspot.ml import predict, project_predictions

from .predict_fakes import FakeClassifier, FakeDetector


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch thread for the test, restored after: the models under test are tiny (fastest on
    one thread) and the test machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fake_loaders(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Model loading returns fakes named after the folder; the folders asked for are recorded."""
    loaded: list[Path] = []

    def detector(model_dir):
        loaded.append(Path(model_dir))
        return FakeDetector(version=Path(model_dir).name)

    def classifier(model_dir):
        loaded.append(Path(model_dir))
        return FakeClassifier(version=Path(model_dir).name)

    for module in (predict, project_predictions):  # the CLI loads through predict, projects through the other
        monkeypatch.setattr(module, "load_detector_dir", detector)
        monkeypatch.setattr(module, "load_classifier_dir", classifier)
    return loaded
