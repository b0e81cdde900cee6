"""Fixtures for the data tests (helpers live in ``data_testutils.py``)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
_HERE = str(Path(__file__).resolve().parent)  # make ``data_testutils`` importable (pytest --import-mode=importlib)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from data_testutils import FakeCLIP, make_samples  # noqa: E402


@pytest.fixture
def shard_dir(tmp_path):
    """8 shards x 5 samples (40 total), keys s00000..s00039, 40x48 noise PNGs."""
    from unclip_pl.data.writer import write_shards

    d = tmp_path / "shards"
    urls = write_shards(make_samples(40), d, prefix="part", maxcount=5)
    assert len(urls) == 8
    return d


@pytest.fixture
def fake_clip():
    return FakeCLIP()
