"""benchmarks/bench_ttft.py on a tiny random model: the merged LoRA answers exactly like the LoRA argument, and one
frame count's measurements have the shape the tables need (adapter tokens fixed, in-context tokens per frame)."""
import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_ttft as B  # noqa: E402
import model as M  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ttft")
    vision = M.VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            patch_size=8, image_size=32)
    text = M.TextConfig(vocab_size=611, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=4096)
    cfg = M.SmolVLMConfig(vision, text, scale_factor=2, image_token_id=600)  # not the toy tokenizer's id: remapped
    net = B.random_hypernet(cfg, 0, **B.TINY_HYPER)
    return B.Setup(B.random_vlm(cfg, 0), net, B.write_proc_dir(cfg, tmp / "proc"), "test"), tmp


def test_merged_lora_matches_lora_argument_and_restores_weights(setup):
    s, _ = setup
    ids = torch.randint(0, 500, (1, 9))
    hidden = torch.randn(1, 2, 9, 48)
    lora = s.net(hidden)
    before = [p.clone() for p in s.vlm.parameters()]
    want = s.vlm(ids, lora=lora, lora_alpha=s.net.config.alpha).logits
    base = s.vlm(ids).logits
    merged = B.merge_lora(s.vlm, lora, s.net.config.alpha)
    with B.swapped(merged):
        got = s.vlm(ids).logits
    assert not torch.allclose(want, base, atol=1e-4)  # the LoRA really changes the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(before, s.vlm.parameters()))
    with pytest.raises(ValueError, match="batch-1"):
        B.merge_lora(s.vlm, {k: (a.expand(2, -1, -1, -1), b.expand(2, -1, -1, -1)) for k, (a, b) in lora.items()}, 1.0)


def test_bench_frames_and_report(setup):
    s, tmp = setup
    clip = B.long_clip(tmp, 48, 32, seconds=6)
    args = argparse.Namespace(repeats=2, budget_s=0.0, sizes=[24, 64], layer_chunk=1)
    rows = [B.bench_frames(s, clip, n, args) for n in (2, 4)]
    assert [r["frames"] for r in rows] == [2, 4]
    assert rows[0]["tokens"]["adapter"] == rows[1]["tokens"]["adapter"] == rows[0]["tokens"]["text"]
    assert rows[1]["tokens"]["in_context"] - rows[0]["tokens"]["in_context"] > 2 * s.vlm.config.image_seq_len
    assert all(v > 0 for r in rows for v in r["seconds"].values())
    assert rows[0]["rounds"]["encode"] == 1  # a zero budget stops after the first round
    text = B.markdown(rows, "meta", args.sizes)
    assert "decode 64 px" in text and text.count("PASS") + text.count("FAIL") == 4
    a1, c1 = B.amortised(rows[0], 1, 24)
    a25, _ = B.amortised(rows[0], 25, 24)
    assert a25 < a1 and c1 > rows[0]["seconds"]["in_context"]
