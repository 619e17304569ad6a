"""benchmarks/bench_ttft.py on a tiny random model: answers from a kept video KV cache equal a full re-read of
[video + question], the merged LoRA answers exactly like the LoRA argument, the storage counts are the tensors' and
the file's bytes, and one frame count's measurements have the shape the tables need."""
import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_ttft  # noqa: E402
import model as M  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ttft")
    vision = M.VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            patch_size=8, image_size=32)
    text = M.TextConfig(vocab_size=611, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=4096)
    cfg = M.SmolVLMConfig(vision, text, scale_factor=2, image_token_id=600)  # not the toy tokenizer's id: remapped
    hyper = bench_ttft.random_hypernet(cfg, 0, **bench_ttft.TINY_HYPER)
    return bench_ttft.Setup(bench_ttft.random_vlm(cfg, 0), hyper, bench_ttft.write_proc_dir(cfg, tmp / "proc"), "test"), tmp


def test_merged_lora_matches_lora_argument_and_restores_weights(setup):
    s, _ = setup
    ids = torch.randint(0, 500, (1, 9))
    hidden = torch.randn(1, 2, 9, 48)
    lora = s.hyper(hidden)
    before = [p.clone() for p in s.vlm.parameters()]
    want = s.vlm(ids, lora=lora, lora_alpha=s.hyper.config.alpha).logits
    base = s.vlm(ids).logits
    merged = bench_ttft.merge_lora(s.vlm, lora, s.hyper.config.alpha)
    with bench_ttft.swapped(merged):
        got = s.vlm(ids).logits
    assert not torch.allclose(want, base, atol=1e-4)  # the LoRA really changes the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(before, s.vlm.parameters()))
    with pytest.raises(ValueError, match="batch-1"):
        bench_ttft.merge_lora(s.vlm, {k: (a.expand(2, -1, -1, -1), b.expand(2, -1, -1, -1)) for k, (a, b) in lora.items()}, 1.0)


def test_bench_frames_and_report(setup):
    s, tmp = setup
    clip = bench_ttft.long_clip(tmp, 48, 32, seconds=6)
    args = argparse.Namespace(repeats=2, budget_s=0.0, sizes=[24, 64], layer_chunk=1, max_frames=64, decode_tokens=2,
                              matmul_n=64)
    rows = [bench_ttft.bench_frames(s, clip, n, args) for n in (2, 4)]
    assert [r["frames"] for r in rows] == [2, 4]
    assert rows[0]["tokens"]["adapter"] == rows[1]["tokens"]["adapter"] == rows[0]["tokens"]["text"]
    assert rows[1]["tokens"]["in_context"] - rows[0]["tokens"]["in_context"] > 2 * s.vlm.config.image_seq_len
    assert all(v > 0 for r in rows for v in r["seconds"].values())
    assert rows[0]["rounds"]["encode"] == 1 and rows[0]["rounds"]["kept_prefill"] == 1  # a zero budget: one round
    for r in rows:  # the kept cache prefills the question only: the in-context prompt is the prefix plus it
        t = r["tokens"]
        assert t["prefix"] + t["kept"] == t["in_context"] and t["kept"] < t["adapter"] + 5
        assert set(r["decode_tok_s"]) == {"kept", "adapter", "text"} and r["bandwidth"] > 0
        assert r["bytes"]["token_kept"] > r["bytes"]["token_text"]  # the video's keys and values are read too
    assert rows[1]["bytes"]["kv"]["fp32"] > rows[0]["bytes"]["kv"]["fp32"]
    assert rows[1]["bytes"]["adapter"] == rows[0]["bytes"]["adapter"]  # the adapter's size ignores the video's length
    text = bench_ttft.markdown(rows, "meta", args.sizes)
    assert "decode 64 px" in text and text.count("PASS") + text.count("FAIL") == 4
    assert "TTFT kept KV" in text and "fit in 80 GB" in text and "of matmul" in text
    a1, c1, k1 = bench_ttft.amortised(rows[0], 1, 24)
    a25, _, k25 = bench_ttft.amortised(rows[0], 25, 24)
    assert a25 < a1 and c1 > rows[0]["seconds"]["in_context"] and k25 < k1


def test_kept_cache_answers_equal_a_full_reread(setup):
    """Prefix caching is exact: the video prefix read once, then question after question (each cutting the cache
    back), gives the tokens and logits of reading [video + question] from scratch every time."""
    s, tmp = setup
    clip_path = bench_ttft.long_clip(tmp, 48, 32, seconds=6)
    proc = s.processor(3, 24)
    clip = proc.load_video(clip_path)
    prompts = [proc.question_inputs(q, clip) for q in (bench_ttft.QUESTION, bench_ttft.OTHER_QUESTION, "Is it moving?")]
    ids = [s.ids(proc, i) for i, _ in prompts]
    pixels = prompts[0][1]
    P = bench_ttft.prefix_length(ids[0], ids[1])
    assert all(torch.equal(i[:, :P], ids[0][:, :P]) for i in ids) and (ids[0][0, :P] == 600).sum() > 0
    n = 6
    cache = bench_ttft.prefill_video(s.vlm, ids[0][:, :P], pixels, room=max(i.shape[1] for i in ids) - P + n)
    for q in (0, 1, 2, 0):  # the first question again after the others: nothing of them is left behind
        tokens, logits = bench_ttft.ask_kept(s.vlm, cache, P, ids[q][:, P:], max_new_tokens=n)
        want = M.generate(s.vlm, ids[q], pixel_values=pixels, max_new_tokens=n)[0]
        full = torch.cat([ids[q], torch.tensor([want[:-1]])], dim=1)  # teacher-forced: every step's logits at once
        want_logits = s.vlm(full, pixels).logits[0, ids[q].shape[1] - 1:]
        assert tokens == want
        torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="no room"):
        bench_ttft.ask_kept(s.vlm, cache, P, ids[0][:, P:], max_new_tokens=cache.k.shape[3])


def test_storage_counts(setup):
    """The KV cache's bytes are 2 L Hkv hd T elements; the adapter file holds its tensors plus a small header."""
    s, _ = setup
    t = s.vlm.config.text
    cache = s.vlm.new_cache(1, 50)
    kv = bench_ttft.kv_bytes(cache, 20)
    assert kv["fp32"] == 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * 20 * 4 == 2 * kv["bf16"]
    lora = s.hyper(torch.randn(1, t.num_hidden_layers, 7, t.hidden_size))
    files = bench_ttft.adapter_file_bytes(lora, s.hyper.config.rank)
    tensors = sum(x.numel() for ab in lora.values() for x in ab)
    for name, size in (("fp32", 4), ("bf16", 2)):
        assert tensors * size < files[name] < tensors * size + 8192
    assert bench_ttft.fits(1, per_video=10**8, base=2 * 10**8) == 8 and bench_ttft.fits(1, 10**8, 2 * 10**9) == 0
