"""benchmarks/video_share.py: the share of the pooled hidden states that changes from clip to clip."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import data
import toyworld as T
from test_toy_base import random_base

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import video_share  # noqa: E402


def test_video_share_is_zero_for_one_clip_repeated_and_positive_across_clips(tmp_path):
    _, config, _ = random_base(tmp_path / "m")
    rows, _ = data.read_manifest(T.write_split("heldout", 3, tmp_path / "clips", progress=False))
    paths = list(dict.fromkeys(r["video_path"] for r in rows))
    same = video_share.video_share(str(tmp_path / "m"), [paths[0]] * 3)
    across = video_share.video_share(str(tmp_path / "m"), paths)
    L = config.text.num_hidden_layers
    assert all(len(v) == L for v in (*same.values(), *across.values()))
    assert max(max(v) for v in same.values()) == pytest.approx(0.0, abs=1e-9)
    assert min(across["image tokens"]) > 0 and across["text after the video"][0] == pytest.approx(0.0, abs=1e-9)
    assert max(across["text after the video"][1:]) > 0  # layer 0 is the embeddings: text is the same for every clip
