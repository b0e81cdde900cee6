"""Test-session fixtures. Offline by default: no test reaches a model hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import ROOT

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("PROJECT_ROOT", str(ROOT))


@pytest.fixture(scope="session")
def emoji_root(tmp_path_factory) -> Path:
    """A small emoji dataset (shards) prepared once per test session."""
    from unclip_pl.data.emoji import prepare_emoji

    root = tmp_path_factory.mktemp("emoji")
    prepare_emoji(root, limit=96, val_fraction=0.25, progress=False)
    return root
