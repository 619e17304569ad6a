"""toy/video_share.py: the share of the pooled hidden states that changes from clip to clip."""
from __future__ import annotations

import pytest
import torch

import data
from toy import world
from conftest import toy_random_base

from toy import video_share


def test_video_share_is_zero_for_one_clip_repeated_and_positive_across_clips(tmp_path):
    _, config, _ = toy_random_base(tmp_path / "m")
    rows, _ = data.read_manifest(world.write_split("heldout", 3, tmp_path / "clips", progress=False))
    paths = list(dict.fromkeys(r["video_path"] for r in rows))
    same = video_share.video_share(str(tmp_path / "m"), [paths[0]] * 3)
    across = video_share.video_share(str(tmp_path / "m"), paths)
    L = config.text.num_hidden_layers
    assert all(len(v) == L for v in (*same.values(), *across.values()))
    assert max(max(v) for v in same.values()) == pytest.approx(0.0, abs=1e-9)
    assert min(across["image tokens"]) > 0 and across["text after the video"][0] == pytest.approx(0.0, abs=1e-9)
    assert max(across["text after the video"][1:]) > 0  # layer 0 is the embeddings: text is the same for every clip


def test_linear_probe_reads_a_signal_tiny_beside_a_shared_part_and_not_noise():
    """The probe standardises its features: a label carried by 0.1 % of a feature's size is read perfectly; labels
    unrelated to the features score about chance."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (300,), generator=g)
    x = 1000.0 + torch.randn(300, 6, generator=g)  # a large part every sample shares, and noise
    x[:, 0] += 5.0 * (2 * y - 1)                   # the label, small beside the shared part
    labels = ["a" if v else "b" for v in y.tolist()]
    assert video_share.linear_probe(x[:200], labels[:200], x[200:], labels[200:]) == 1.0
    noise = [("a", "b")[int(v)] for v in torch.randint(0, 2, (300,), generator=g).tolist()]
    assert video_share.linear_probe(x[:200, 1:], noise[:200], x[200:, 1:], noise[200:]) < 0.7


def test_probe_runs_per_layer_on_one_object_clips(tmp_path):
    _, config, _ = toy_random_base(tmp_path / "m")
    train = world.write_split("train", 12, tmp_path / "train", progress=False)
    test = world.write_split("heldout", 12, tmp_path / "test", progress=False)
    acc = video_share.probe(str(tmp_path / "m"), str(train), str(test), 100, 100)
    assert set(acc) == {"color", "shape", "direction"}
    assert all(len(v) == config.text.num_hidden_layers and all(0 <= a <= 1 for a in v) for v in acc.values())
