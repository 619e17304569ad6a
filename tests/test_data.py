"""data.py against transformers 5.23 (the oracle) on clips written here with PyAV.

Clip notes: libx264 in yuv420p needs even sides, so odd sizes (17x900) are written as libx264 yuv444p in Matroska,
which also exercises a container that stores no frame count. Rotation is written as a display matrix
(`set_display_rotation`), variable frame rate as explicit millisecond pts.
"""
import json, types

import av
import numpy as np
import pytest
import torch
from num2words import num2words
from PIL import Image
from transformers import PreTrainedTokenizerFast
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE, SmolVLMProcessor
from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor
from transformers.video_utils import VideoMetadata, default_sample_indices_fn, read_video_pyav

import data
from conftest import write_clip
from toy import world

SEQ = 4  # tokens per frame of the tiny test config: (32 // 8)**2 // 2**2


def smolvlm_sampler(max_frames, fps=1):
    this = types.SimpleNamespace(num_frames=max_frames, fps=fps)
    return lambda metadata, **kw: SmolVLMVideoProcessor.sample_frames(this, metadata, num_frames=max_frames, fps=fps)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    corpus = ["Internalize this video for later captioning.", "What is the capital of France? Paris.",
              "You are provided the following series of frames from a video. Frame from",
              "Describe what is happening in this scene. A red square moves left."] * 20
    world.build_tokenizer(corpus, 400).save(str(d / "tokenizer.json"))
    (d / "config.json").write_text(json.dumps({"vision_config": {"image_size": 32, "patch_size": 8}, "scale_factor": 2}))
    (d / "preprocessor_config.json").write_text(json.dumps(
        {"max_image_size": {"longest_edge": 32}, "video_sampling": {"fps": 1, "max_frames": 12, "video_size": {"longest_edge": 48}}}))
    return d


@pytest.fixture(scope="module")
def hf(model_dir):
    """transformers' tokenizer and SmolVLMProcessor over the same tokenizer.json. The processor is built without
    its video processor (that needs torchvision, absent here); we call its prompt helper directly."""
    tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), bos_token="<|im_start|>",
                                  eos_token="<end_of_utterance>", pad_token="<|im_end|>", unk_token="<|endoftext|>")
    proc = object.__new__(SmolVLMProcessor)
    proc.image_seq_len, proc.image_token, proc.global_image_token = SEQ, "<image>", "<global-img>"
    proc.fake_image_token = "<fake_token_around_image>"
    return tok, proc


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return {
        "cfr": write_clip(d / "cfr.mp4", n=45, rate=15),                      # 3 s, keyframe every 8 frames
        "long": write_clip(d / "long.mp4", w=32, h=24, n=160, rate=10, gop=25),  # 16 s: triggers the 1 s skip at 12
        "odd": write_clip(d / "odd.mkv", w=17, h=900, n=4, rate=2, pix="yuv444p"),
        "rot0": write_clip(d / "rot0.mp4", n=5),
        "rot90": write_clip(d / "rot90.mp4", n=5, rotation=90),
        "rotm90": write_clip(d / "rotm90.mp4", n=5, rotation=-90),
        "one": write_clip(d / "one.mp4", n=1),
        "vfr": write_clip(d / "vfr.mp4", n=6, pts_ms=[0, 100, 150, 700, 720, 1500]),
    }


# --------------------------------------------------------------------------------------------------- sampling
def test_sampler_equals_transformers_over_a_sweep():
    for fps in (1.0, 7.5, 23.976, 25.0, 30.0, 59.94):
        for seconds in (0.04, 0.5, 1, 1.49, 1.5, 2.5, 9, 13.9, 14.1, 30, 65, 66.5, 67, 200, 3600):
            total = max(1, int(seconds * fps))
            for max_frames in (1, 8, 12, 64):
                meta = VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps)
                ref = smolvlm_sampler(max_frames)(meta).tolist()
                assert data.smolvlm_indices(total, fps, max_frames) == ref, (fps, seconds, max_frames)
            for n in (1, 5, 12):
                if n <= total:
                    ref = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=fps), num_frames=n)
                    assert data.uniform_indices(total, n) == ref.tolist()


# --------------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("max_frames", [64, 2])
def test_decode_equals_transformers_pyav_reader(clips, max_frames):
    ref, meta = read_video_pyav(str(clips["cfr"]), smolvlm_sampler(max_frames))
    clip = data.decode_video(clips["cfr"], max_frames=max_frames)
    assert (clip.total_frames, clip.fps, clip.duration) == (meta.total_num_frames, meta.fps, meta.duration)
    assert clip.indices == list(meta.frames_indices) and clip.timestamps == meta.timestamps
    assert np.array_equal(np.stack(clip.frames), ref)                       # same pixels, frame for frame


def test_seeking_long_clip_gets_the_same_frames_as_streaming(clips):
    ref, meta = read_video_pyav(str(clips["long"]), smolvlm_sampler(12))
    clip = data.decode_video(clips["long"], max_frames=12)
    assert clip.indices == list(meta.frames_indices) and clip.indices[0] == 10  # first second skipped
    assert np.array_equal(np.stack(clip.frames), ref)
    uni = data.decode_video(clips["long"], num_frames=7)
    assert uni.indices == [0, 22, 45, 68, 91, 114, 137]


def test_odd_size_matroska_without_frame_count(clips):
    assert av.open(str(clips["odd"])).streams.video[0].frames == 0             # the container stores no count
    clip = data.decode_video(clips["odd"])
    assert clip.total_frames == 4 and clip.duration == 2.0 and clip.frames[0].shape == (900, 17, 3)
    assert clip.indices == [0, 3]                                               # round(2 s * 1 fps) = 2 frames


@pytest.mark.parametrize("name,k", [("rot90", 1), ("rotm90", -1)])
def test_rotation_is_applied(clips, name, k):
    plain = data.decode_video(clips["rot0"], num_frames=5).frames
    turned = data.decode_video(clips[name], num_frames=5).frames
    assert turned[0].shape == (64, 48, 3)
    for a, b in zip(plain, turned):
        assert np.array_equal(np.rot90(a, k), b)


def test_single_frame_clip(clips, model_dir):
    clip = data.decode_video(clips["one"])
    assert (clip.indices, clip.total_frames, clip.duration) == ([0], 1, 0.1)
    text = data.video_prompt(clip, SEQ)
    assert text.startswith("You are provided the following series of one frames from a 0:00:00 [H:MM:SS] video.\n")


def test_variable_frame_rate_uses_presentation_times(clips):
    c = av.open(str(clips["vfr"]))
    clip = data.decode_video(clips["vfr"], num_frames=6)
    assert clip.total_frames == 6 and clip.fps == float(c.streams.video[0].average_rate)
    assert clip.pts == pytest.approx([0, 0.1, 0.15, 0.7, 0.72, 1.5], abs=1e-3)
    assert clip.timestamps == [k / clip.fps for k in range(6)]                 # the prompt keeps SmolVLM2's k/fps


def test_start_end_range_acts_like_a_cut_clip(clips):
    every = data.decode_video(clips["long"], num_frames=160)
    seg = data.decode_video(clips["long"], start=3.0, end=8.0, num_frames=50)
    assert seg.total_frames == 50 and seg.duration == 5.0 and seg.indices == list(range(50))
    assert seg.pts == pytest.approx([k / 10 for k in range(50)])
    for k in range(50):
        assert np.array_equal(seg.frames[k], every.frames[30 + k])
    assert data.decode_video(clips["long"], start=3.0, end=8.0).indices == [0, 12, 24, 36, 49]  # 5 at 1 fps


def test_errors_are_decode_errors(tmp_path):
    (tmp_path / "notes.mp4").write_text("this is not a video\n" * 50)
    with av.open(str(tmp_path / "audio.m4a"), "w") as c:
        s = c.add_stream("aac", rate=16000)
        for i in range(10):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 16000, i * 1024
            for p in s.encode(f):
                c.mux(p)
    for name, msg in [("absent.mp4", "no such file"), ("notes.mp4", "not a readable"), ("audio.m4a", "no video")]:
        with pytest.raises(data.DecodeError, match=msg):
            data.decode_video(tmp_path / name)
    with pytest.raises(data.DecodeError, match="no frames in"):
        data.decode_video(write_clip(tmp_path / "c.mp4", n=5), start=9.0)


# ----------------------------------------------------------------------------------------------------- pixels
def test_lanczos_is_bit_identical_to_pillow():
    g = np.random.default_rng(0)
    # Pillow >= 13 (python-pillow/Pillow#9549) runs the vertical pass first when the height shrinks much more than
    # the width; SmolVLM2 was trained with older Pillow (horizontal first, always), which we keep. So the cases here
    # are ones where both Pillow orders agree; the tall-frame case is bounded in the next test.
    for (h, w), (oh, ow) in [((48, 64), (384, 512)), ((17, 900), (8, 384)), ((37, 53), (37, 20)),
                             ((720, 1280), (216, 384)), ((216, 384), (512, 512)), ((3, 5), (7, 1))]:
        a = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = np.asarray(Image.fromarray(a).resize((ow, oh), Image.LANCZOS))
        ours = data.lanczos_resize(torch.from_numpy(a).permute(2, 0, 1).long(), oh, ow).permute(1, 2, 0)
        assert np.array_equal(ours.numpy(), ref), ((h, w), (oh, ow))


def test_frame_pixels_equal_transformers_image_processor(clips):
    """Tolerance: exact for ordinary frames. SmolVLM2 was trained with PIL LANCZOS (transformers 4.50, §5.5) and we
    reproduce Pillow's integer resampler, so against transformers' PIL backend the difference is 0. The one
    exception is a very tall frame (17x900 -> 8x384), where Pillow >= 13 does the vertical pass first (see above):
    about 0.2 % of values move at 512 px (2 % at the tiny 32 px test size), by at most 12 uint8 levels (sharp synthetic edges clip differently between
    passes). transformers 5.x's torchvision backend (bicubic + antialias; not installed) is a different resampler."""
    frames = data.decode_video(clips["odd"]).frames + data.decode_video(clips["cfr"], num_frames=3).frames
    for video_size, side in [(384, 512), (48, 32), (512, 512)]:
        ip = SmolVLMImageProcessorPil(do_image_splitting=False, size={"longest_edge": video_size},
                                      max_image_size={"longest_edge": side})
        ref = ip(images=[[f] for f in frames], return_tensors="np")["pixel_values"][:, 0]   # (F, 3, S, S)
        ours = torch.stack([data.frame_pixels(f, video_size, side) for f in frames])
        assert ours.dtype == torch.float32 and ours.shape == (len(frames), 3, side, side)
        assert np.array_equal(ours[2:].numpy(), ref[2:])                    # 64x48 frames: bit-identical
        diff = np.abs(ours[:2].numpy() - ref[:2]) * 127.5                     # tall frames, in uint8 levels
        assert (diff > 0).mean() < 0.025 and diff.max() <= 12.5


# --------------------------------------------------------------------------------------------- prompts, tokens
def test_number_words_equal_num2words():
    for n in list(range(0, 2100)) + [9999, 10001, 12345, 100000, 101000, 999999]:
        assert data.number_words(n) == num2words(n), n


def hf_video_prompt(hf, path, max_frames):
    """transformers' own video expansion: its PyAV reader + SmolVLM sampler, then SmolVLMProcessor's helper."""
    frames, meta = read_video_pyav(str(path), smolvlm_sampler(max_frames))
    return hf[1].replace_video_token({"pixel_values": torch.zeros(1, len(frames)), "video_metadata": [meta]}, 0)


def test_internalization_and_in_context_prompts_equal_transformers(model_dir, hf, clips):
    proc = data.Processor(model_dir)
    assert (proc.image_seq_len, proc.side, proc.video_size, proc.max_frames) == (SEQ, 32, 48, 12)
    for question, gen in [(data.INSTRUCTION, False), ("What is the capital of France?", True)]:
        conv = [{"role": "user", "content": [{"type": "video", "path": "x"}, {"type": "text", "text": question}]}]
        ref = hf[0].apply_chat_template(conv, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False,
                                        add_generation_prompt=gen)
        ref = ref.replace("<video>", hf_video_prompt(hf, clips["long"], 12))
        clip = proc.load_video(clips["long"])
        ours = data.render_chat([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}],
                                gen, data.video_prompt(clip, proc.image_seq_len))
        assert ours == ref
        ids, pixels = (proc.question_inputs(question, clip) if gen else proc.internalization_inputs(clip))
        assert ids[0].tolist() == hf[0](ref)["input_ids"]
        assert pixels.shape == (12, 3, 32, 32) and (ids == proc.image_token_id).sum() == 12 * SEQ
    assert "twelve frames from a 0:00:16" in ours and "\nFrame from 00:01:" in ours and "\nFrame from 00:15:" in ours


def test_text_only_and_training_pair_equal_transformers(model_dir, hf):
    proc = data.Processor(model_dir)
    q, a = "What is the capital of France?", "Paris, a city."
    ids, pix = proc.question_inputs(q)
    assert pix is None and proc.decode(ids[0], skip_special_tokens=False) == \
        "<|im_start|>User: What is the capital of France?<end_of_utterance>\nAssistant:"
    user = {"role": "user", "content": [{"type": "text", "text": q}]}
    assert ids[0].tolist() == hf[0].apply_chat_template([user], chat_template=DEFAULT_CHAT_TEMPLATE,
                                                        add_generation_prompt=True, tokenize=True, return_dict=False)
    full = hf[0].apply_chat_template([user, {"role": "assistant", "content": [{"type": "text", "text": a}]}],
                                     chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=True, return_dict=False)
    ids, labels = proc.training_pair(q, a)
    assert ids.tolist() == full[:-1]                                          # all but the final "\n"
    n_prompt = len(proc.question_inputs(q)[0][0])
    assert (labels[:n_prompt] == -100).all() and labels[n_prompt:].tolist() == ids[n_prompt:].tolist()
    assert labels[-1] == proc.eou_id and proc.decode(labels[n_prompt:]) == " " + a


def test_chat_template_image_and_multi_turn(hf):
    conv = [{"role": "user", "content": [{"type": "text", "text": "What do these images show?"},
                                         {"type": "image"}, {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "The first image shows a cat."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And who is that?"}]}]
    ref = hf[0].apply_chat_template(conv, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True)
    assert data.render_chat(conv, add_generation_prompt=True) == ref
    assert "User:<image>And who" in ref                                      # image first: no space after ':'


# --------------------------------------------------------------------------------------------------- datasets
def test_manifest_dataset_and_collate(model_dir, clips, tmp_path, monkeypatch, capsys):
    (tmp_path / "bad.mp4").write_text("not a video")
    rows = [{"id": "a", "video_path": clips["cfr"].name, "prompt": "Summarize this video.", "target_text": "A bar."},
            {"id": "b", "video_path": "missing.mp4", "prompt": "p", "target_text": "t"},
            {"id": "c", "video_path": str(tmp_path / "bad.mp4"), "prompt": "p", "target_text": "t"},
            {"id": "d", "video_path": clips["long"].name, "prompt": "Describe what is happening in this scene.",
             "target_text": "A red square moves left and the colour changes."}]
    lines = [json.dumps(r) for r in rows[:2]] + ['{"id": "x", "video_path": ', json.dumps({"id": "y"})]
    lines += [json.dumps(r) for r in rows[2:]]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("V2L_DATA_ROOT", str(clips["cfr"].parent))               # relative paths resolve here
    ds = data.VideoTextDataset(tmp_path / "m.jsonl", data.Processor(model_dir))
    err = capsys.readouterr().err
    assert "m.jsonl:3: malformed" in err and "m.jsonl:4: malformed" in err
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=ds.collate)
    batch = next(iter(loader))
    assert batch["row_ids"] == ["a", "d"] and batch["skipped"] == 1
    assert ds.summary() == "m.jsonl: 2 usable rows; skipped 2 malformed lines, 1 missing videos, 1 undecodable videos"
    assert batch["n_frames"].tolist() == [3, 12] and batch["pixel_values"].shape == (15, 3, 32, 32)
    ctx, cm = batch["ctx_ids"], batch["ctx_mask"]
    assert cm[0, 0] == 0 and cm[:, -1].all() and (ctx[cm == 0] == ds.proc.pad_id).all()   # left padding
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert am[:, 0].all() and am[0, -1] == 0 and (labels[am == 0] == -100).all()           # right padding
    for b, row in enumerate([rows[0], rows[3]]):
        one, lab = ds.proc.training_pair(row["prompt"], row["target_text"])
        assert ids[b, : len(one)].tolist() == one.tolist() and labels[b, : len(one)].tolist() == lab.tolist()


def test_dataset_clip_cache(model_dir, clips, tmp_path, monkeypatch):
    """--cache-mb: a clip asked about in several rows is decoded once and gives the same tensors; the budget is
    respected (a cache too small for a clip holds nothing)."""
    rows = [{"id": str(i), "video_path": str(clips["cfr"]), "prompt": f"Question {i}?", "target_text": "A bar."}
            for i in range(3)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = data.VideoTextDataset(tmp_path / "m.jsonl", data.Processor(model_dir))
    cached = data.VideoTextDataset(tmp_path / "m.jsonl", data.Processor(model_dir), cache_mb=16)
    tiny = data.VideoTextDataset(tmp_path / "m.jsonl", data.Processor(model_dir), cache_mb=0.001)
    decodes = []
    for ds in (cached, tiny):
        real = ds.proc.load_video
        monkeypatch.setattr(ds.proc, "load_video", lambda p, real=real: decodes.append(p) or real(p))
    for i in range(3):
        want = plain[i]
        for got in (cached[i], tiny[i]):
            assert got["id"] == want["id"] and torch.equal(got["pixel_values"], want["pixel_values"])
            assert torch.equal(got["ctx_ids"], want["ctx_ids"]) and torch.equal(got["ids"], want["ids"])
    assert len(decodes) == 1 + 3 and len(cached.cache) == 1 and not tiny.cache
