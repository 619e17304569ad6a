"""internalize.py -> ask.py, segments -> compose.py -> ask.py, the PEFT export, and every user-error path, end to end
on a tiny random base model (HF layout, toy tokenizer) and a tiny random hypernetwork whose LoRA is not zero."""
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adapter
import ask
import compose
import data
import internalize
import model as M
from toy import world
from conftest import assert_one_line_error, write_random_base, write_random_hypernet
from hypernet import internalize as reference_internalize, load_hypernet

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    cfg = write_random_base(d / "base", hidden=48, seed=0)
    other = write_random_base(d / "other", hidden=36, seed=1)
    write_random_hypernet(d / "hyper", cfg, 0)
    write_random_hypernet(d / "hyper2", cfg, 1)            # same base, different hypernetwork
    write_random_hypernet(d / "other_hyper", other, 2)     # built for the other base model
    # A small 4 s clip (64x48, 8 fps) keeps the Lanczos resize cheap; two objects, one per half.
    spec = dataclasses.replace(world.clip_spec("train", 3, two_part=True), width=64, height=48, fps=8, n_frames=32)
    world.write_clip(spec, d / "clip.mp4")
    (d / "notvideo.mp4").write_text("this is not a video\n")
    return d


def run_internalize(w, *extra):
    internalize.main([str(w / "clip.mp4"), "--model", str(w / "base"), "--hypernet", str(w / "hyper"), *extra])


def ask_json(capsys, *argv, base=None) -> list[dict]:
    """ask.py --json; `base`: the --model folder (adapters of a local base model need it named)."""
    capsys.readouterr()
    ask.main([*map(str, argv), "--json", "--max-new-tokens", "6", *(["--model", str(base)] if base else [])])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


# ------------------------------------------------------------------------------------------------ happy paths
def test_internalize_then_ask(w, capsys):
    out = w / "a.safetensors"
    run_internalize(w, "-o", str(out))
    ad = adapter.load_adapter(out)
    m = ad.meta
    assert (m["format"], m["format_version"], m["video"], m["rank"], m["generated_rank"]) == \
        (adapter.FORMAT, adapter.VERSION, "clip.mp4", 4, 4)
    assert m["video_sha256"] == adapter.sha256_file(w / "clip.mp4") and m["start"] == 0 and m["end"] == pytest.approx(4.0)
    assert m["hypernet_sha256"] == adapter.sha256_file(w / "hyper" / "hypernet.safetensors") and m["alpha"] == 128.0
    assert (m["frames"], m["video_size"], m["frame_side"], m["targets"]) == (12, 32, 32, [["down_proj", 96, 48]])
    assert [s["frames"] for s in m["segments"]] == [4]  # 4 s at 1 fps

    # The file holds exactly what the hypernetwork makes of [video + instruction] (hypernet.internalize).
    vlm, proc = M.load_model(w / "base"), data.Processor(w / "base", max_frames=12)
    hyper = load_hypernet(w / "hyper", vlm.config)
    ids, pixels = proc.internalization_inputs(w / "clip.mp4")
    want = reference_internalize(vlm, hyper, ids, torch.ones_like(ids), pixels)
    torch.testing.assert_close(ad.lora()["down_proj"][0], want["down_proj"][0])
    torch.testing.assert_close(ad.lora()["down_proj"][1], want["down_proj"][1])

    # ask.py: zero visual tokens, and the answer is greedy generation with the adapter as the LoRA argument.
    q_ids, _ = proc.question_inputs("What color is the square?")
    (r,) = ask_json(capsys, out, "What color is the square?", base=w / "base")
    assert (r["mode"], r["visual_tokens"], r["input_tokens"]) == ("adapter", 0, q_ids.shape[1])
    gen = M.generate(vlm, q_ids, lora=ad.lora(), lora_alpha=128.0, max_new_tokens=6, eos_token_id=proc.eou_id)[0]
    assert r["answer"] == proc.decode(gen).strip() and r["new_tokens"] == len(gen)
    assert r["ttft_s"] > 0
    with_lora = vlm(q_ids, lora=ad.lora(), lora_alpha=128.0).logits
    assert not torch.allclose(with_lora, vlm(q_ids).logits, atol=1e-3)  # the adapter really changes the model

    # Several questions and stdin lines: one load, one answer each; streaming text mode prints the same answer.
    rs = ask_json(capsys, out, "What color is the square?", "Where does it move?", base=w / "base")
    assert [x["question"] for x in rs] == ["What color is the square?", "Where does it move?"]
    assert rs[0]["answer"] == r["answer"]
    ask.main([str(out), "What color is the square?", "--max-new-tokens", "6", "--timing", "--model", str(w / "base")])
    cap = capsys.readouterr()
    assert cap.out.strip() == r["answer"] and "TTFT" in cap.err and "(0 visual)" in cap.err


def test_stdin_questions(w, capsys, monkeypatch):
    out = w / "a.safetensors"
    if not out.exists():
        run_internalize(w, "-o", str(out))
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("first question\n\nsecond question\n"))
    rs = ask_json(capsys, out, "-", base=w / "base")
    assert [r["question"] for r in rs] == ["first question", "second question"]


def test_segments_compose_and_weights(w, capsys):
    run_internalize(w, "--segments", "2", "-o", str(w / "seg.safetensors"))
    run_internalize(w, "--end", "2", "-o", str(w / "p1.safetensors"))
    run_internalize(w, "--start", "2", "-o", str(w / "p2.safetensors"))
    seg, p1, p2 = (adapter.load_adapter(w / f"{n}.safetensors") for n in ("seg", "p1", "p2"))
    assert [(s["start"], s["end"]) for s in seg.meta["segments"]] == [(0, 2), (2, pytest.approx(4))]
    assert seg.meta["generated_rank"] == 8 and seg.ab["down_proj"][0].shape == (2, 12, 96)

    compose.main([str(w / "p1.safetensors"), str(w / "p2.safetensors"), "-o", str(w / "ab.safetensors")])
    ab = adapter.load_adapter(w / "ab.safetensors")
    for x, y in zip(ab.ab["down_proj"], seg.ab["down_proj"]):  # compose(p1, p2) == --segments 2, row for row
        torch.testing.assert_close(x, y)

    # dW of the composition = the parts' generated dW summed + the static dW once (method.md §7), with weights.
    compose.main([str(w / "p1.safetensors"), str(w / "p2.safetensors"), "-o", str(w / "wab.safetensors"),
                  "--weights", "1,0.5", "--bias-weight", "0.25"])
    wab = adapter.load_adapter(w / "wab.safetensors")
    r = 4

    def parts(x, layer):  # (generated dW, static dW) of a one-segment adapter
        a, b = x.ab["down_proj"][0][layer], x.ab["down_proj"][1][layer]
        return 128.0 * b[:r].T @ a[:r], 128.0 * b[r:].T @ a[r:]

    for layer in range(2):
        (g1, s1), (g2, s2) = parts(p1, layer), parts(p2, layer)
        torch.testing.assert_close(s1, s2)  # same hypernetwork, same static part
        torch.testing.assert_close(ab.delta_weight("down_proj", layer), g1 + g2 + s1, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(wab.delta_weight("down_proj", layer), g1 + 0.5 * g2 + 0.25 * s1,
                                   atol=1e-5, rtol=1e-4)
    assert [s["weight"] for s in wab.meta["segments"]] == [1.0, 0.5] and wab.meta["bias_weight"] == 0.25

    # A weighting rule: every segment scaled alike, by compose.py or by internalize.py --segments itself.
    compose.main([str(w / "p1.safetensors"), str(w / "p2.safetensors"), "-o", str(w / "sab.safetensors"),
                  "--weights", "1/sqrt(n)"])
    run_internalize(w, "--segments", "2", "--segment-weights", "1/sqrt(n)", "-o", str(w / "sseg.safetensors"))
    sab, sseg = adapter.load_adapter(w / "sab.safetensors"), adapter.load_adapter(w / "sseg.safetensors")
    assert [s["weight"] for s in sab.meta["segments"]] == [s["weight"] for s in sseg.meta["segments"]] == [2 ** -0.5] * 2
    for layer in range(2):
        (g1, s1), (g2, _) = parts(p1, layer), parts(p2, layer)
        for x in (sab, sseg):
            torch.testing.assert_close(x.delta_weight("down_proj", layer), (g1 + g2) / 2 ** 0.5 + s1,
                                       atol=1e-5, rtol=1e-4)

    (res,) = ask_json(capsys, w / "ab.safetensors", "What happens?", base=w / "base")
    assert res["mode"] == "adapter" and res["visual_tokens"] == 0 and res["new_tokens"] > 0


def test_several_videos_one_call(w, tmp_path):
    shutil.copy(w / "clip.mp4", tmp_path / "two.mp4")
    internalize.main([str(w / "clip.mp4"), str(tmp_path / "two.mp4"), "-o", str(tmp_path / "out"),
                      "--model", str(w / "base"), "--hypernet", str(w / "hyper"), "--save-dtype", "bf16"])
    a, b = adapter.load_adapter(tmp_path / "out" / "clip.adapter.safetensors"), adapter.load_adapter(tmp_path / "out" / "two.adapter.safetensors")
    assert a.ab["down_proj"][0].dtype == torch.bfloat16
    assert torch.equal(a.ab["down_proj"][0], b.ab["down_proj"][0])  # same content, same adapter


def test_baseline_and_text_modes(w, capsys):
    vlm, proc = M.load_model(w / "base"), data.Processor(w / "base", max_frames=12)
    (v,) = ask_json(capsys, "--video", w / "clip.mp4", "--model", w / "base", "What color is the square?")
    ids, pixels = proc.question_inputs("What color is the square?", w / "clip.mp4")
    gen = M.generate(vlm, ids, pixel_values=pixels, max_new_tokens=6, eos_token_id=proc.eou_id)[0]
    assert (v["mode"], v["visual_tokens"], v["input_tokens"]) == ("video", 4 * 4, ids.shape[1])
    assert v["answer"] == proc.decode(gen).strip()

    (t,) = ask_json(capsys, "--no-adapter", "--model", w / "base", "What color is the square?")
    ids, _ = proc.question_inputs("What color is the square?")
    gen = M.generate(vlm, ids, max_new_tokens=6, eos_token_id=proc.eou_id)[0]
    assert (t["mode"], t["visual_tokens"], t["answer"]) == ("text", 0, proc.decode(gen).strip())


def test_python_api_loads_once_and_equals_the_cli(w, capsys):
    """From Python, no argparse: the models load once, a video given as a path or as its decoded frames makes the
    same adapter the CLI writes, and answers come from any number of adapters without reloading the base."""
    import av
    import numpy as np

    models = internalize.load_models(model=w / "base", hypernet=w / "hyper")
    from_path = internalize.internalize(models, w / "clip.mp4")
    run_internalize(w, "-o", str(w / "api.safetensors"))
    from_cli = adapter.load_adapter(w / "api.safetensors")
    assert all(torch.equal(from_path.ab[t][i], from_cli.ab[t][i]) for t in from_cli.ab for i in (0, 1))
    with av.open(str(w / "clip.mp4")) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    from_frames = internalize.internalize(models, frames, fps=8)
    assert all(torch.equal(from_path.ab[t][i], from_frames.ab[t][i]) for t in from_cli.ab for i in (0, 1))
    halves = [internalize.internalize(models, w / "clip.mp4", start=s, end=e) for s, e in ((0, 2), (2, 4))]
    composed = adapter.concat_adapters(halves)
    assert composed.meta["generated_rank"] == 2 * composed.meta["rank"]
    answers = [ask.answer(models, "What color is the square?", a, max_new_tokens=6) for a in (from_path, composed)]
    (cli,) = ask_json(capsys, w / "api.safetensors", "What color is the square?", base=w / "base")
    assert answers[0]["answer"] == cli["answer"] and all(a["visual_tokens"] == 0 for a in answers)


def test_peft_export_gives_the_same_logits_and_answers(w, capsys):
    """compose.py --to-peft names the base folder it was given; transformers + PEFT load the export onto that base
    and give our logits and ask.py's greedy answer, token for token."""
    from peft import PeftModel
    from transformers import SmolVLMForConditionalGeneration

    src = w / "seg.safetensors"
    if not src.exists():
        run_internalize(w, "--segments", "2", "-o", str(src))
    compose.main([str(src), "--to-peft", str(w / "peft"), "--model", str(w / "base")])
    cfg = json.loads((w / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 12 and cfg["base_model_name_or_path"] == str(w / "base")
    ad, vlm = adapter.load_adapter(src), M.load_model(w / "base")
    proc = data.Processor(w / "base")
    question = "What happens after the square moves?"
    ids, _ = proc.question_inputs(question)
    ours = vlm(ids, lora=ad.lora(), lora_alpha=ad.alpha).logits
    hf = SmolVLMForConditionalGeneration.from_pretrained(cfg["base_model_name_or_path"]).eval()
    base = hf(input_ids=ids).logits
    peft = PeftModel.from_pretrained(hf, w / "peft").eval()
    n_lora = sum(1 for n, _ in peft.named_parameters() if "lora_A" in n)
    assert n_lora == 2  # one per decoder layer's down_proj, nothing else
    with torch.no_grad():
        theirs = peft(input_ids=ids).logits
        gen = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                            eos_token_id=proc.eou_id, pad_token_id=proc.pad_id)[0, ids.shape[1]:].tolist()
    assert not torch.allclose(theirs, base, atol=1e-3)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    gen = gen[: gen.index(proc.eou_id)] if proc.eou_id in gen else gen
    want = M.generate(vlm, ids, lora=ad.lora(), lora_alpha=ad.alpha, max_new_tokens=6, eos_token_id=proc.eou_id)[0]
    (r,) = ask_json(capsys, src, question, base=w / "base")
    assert gen == want and proc.decode(gen).strip() == r["answer"] and r["new_tokens"] == len(gen)


# ------------------------------------------------------------------------------------------------ user errors
@pytest.fixture(scope="module")
def bad(w):
    """Adapters that must be refused: another base model, same architecture with other weights, another
    hypernetwork, a flipped byte, a truncated file, a safetensors file that is not an adapter."""
    good = w / "a.safetensors"
    if not good.exists():
        run_internalize(w, "-o", str(good))
    internalize.main([str(w / "clip.mp4"), "--model", str(w / "other"), "--hypernet", str(w / "other_hyper"),
                      "-o", str(w / "bad_other.safetensors")])
    run_internalize(w, "--hypernet", str(w / "hyper2"), "-o", str(w / "bad_hyper2.safetensors"))
    write_random_base(w / "twin", hidden=48, seed=5)  # same config as base, different weights
    raw = bytearray(good.read_bytes())
    raw[-3] ^= 0x40
    (w / "bad_flipped.safetensors").write_bytes(bytes(raw))
    (w / "bad_truncated.safetensors").write_bytes(good.read_bytes()[:200])
    return w


def test_internalize_errors(bad, capsys, tmp_path):
    w, out = bad, tmp_path / "x.safetensors"
    common = ["--model", w / "base", "--hypernet", w / "hyper", "-o", out]
    assert_one_line_error(capsys, internalize.main, [w / "missing.mp4", *common], "no such file", out)
    assert_one_line_error(capsys, internalize.main, [w / "notvideo.mp4", *common], "not a readable media file", out)
    assert_one_line_error(capsys, internalize.main, [w / "clip.mp4", *common, "--start", "9"], "past the clip's end", out)
    assert_one_line_error(capsys, internalize.main, [w / "clip.mp4", "--model", w / "base", "--hypernet",
                                                     w / "other_hyper", "-o", out], "was built for", out)
    assert_one_line_error(capsys, internalize.main, [w / "clip.mp4", "--model", w / "base", "--hypernet",
                                                     w / "nowhere", "-o", out], "no hypernetwork", out)
    assert_one_line_error(capsys, internalize.main, [w / "clip.mp4", "--model", w / "base", "-o", out],
                          "--model needs --hypernet", out)


@pytest.mark.parametrize("argv,match", [
    (["missing.safetensors", "q"], "no such adapter file"),
    (["bad_flipped.safetensors", "q"], "corrupted adapter"),
    (["bad_truncated.safetensors", "q"], "not a readable safetensors file"),
    (["hyper/hypernet.safetensors", "q"], "not a Video2LoRA adapter"),
    (["a.safetensors", "q", "--model", "other"], "was made for base model"),
    (["a.safetensors", "q", "--model", "twin"], "different weights"),
    (["--video", "notvideo.mp4", "--model", "base", "q"], "not a readable media file"),
])
def test_ask_errors(bad, capsys, argv, match):
    argv = [str(bad / a) if a.endswith((".safetensors", ".mp4")) or a in ("other", "twin", "base") else a
            for a in argv]
    assert_one_line_error(capsys, ask.main, argv, match)


def test_compose_errors(bad, capsys, tmp_path):
    w, out = bad, tmp_path / "c.safetensors"
    assert_one_line_error(capsys, compose.main, [w / "a.safetensors", w / "bad_other.safetensors", "-o", out],
                          "different base models", out)
    assert_one_line_error(capsys, compose.main, [w / "a.safetensors", w / "bad_hyper2.safetensors", "-o", out],
                          "different hypernetworks", out)
    assert_one_line_error(capsys, compose.main, [w / "a.safetensors", w / "bad_flipped.safetensors", "-o", out],
                          "corrupted adapter", out)
    assert_one_line_error(capsys, compose.main, [w / "a.safetensors", w / "a.safetensors", "--weights", "1", "-o",
                                                 out], "--weights has 1 values for 2", out)


def test_cli_error_is_one_line_on_stderr(tmp_path):
    """As a real process: exit status 1, exactly one stderr line, no traceback, no file."""
    out = tmp_path / "x.safetensors"
    p = subprocess.run([sys.executable, str(REPO / "internalize.py"), str(tmp_path / "nope.mp4"), "-o", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.splitlines() == [f"error: {tmp_path / 'nope.mp4'}: no such file"]
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ issue 30: first hour
def _doc_blocks(name: str) -> list[tuple[str, str]]:
    import re
    return re.findall(r"```(\w*)\n(.*?)\n```", (REPO / "docs" / name).read_text(), re.S)


def test_api_doc_runs_and_prints_what_it_says(tmp_path, monkeypatch, capsys):
    """docs/api.md: load once, internalize a path and a frames array, compose, save and reload, ask many questions
    of many adapters and with the video in context; its printed output is the one pasted in the doc."""
    blocks = _doc_blocks("api.md")
    code, expected = blocks[0][1], blocks[1][1]
    assert blocks[0][0] == "python"
    (tmp_path / "examples").symlink_to(REPO / "examples")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(compile(code, "docs/api.md", "exec"), {"__name__": "api_doc"})
    assert capsys.readouterr().out.strip().splitlines() == expected.splitlines()


def test_peft_doc_runs_and_answers_as_ask(tmp_path, monkeypatch, capsys):
    """docs/peft.md on the shipped toy base: its export command, then its transformers + PEFT snippet, from the
    repository's layout; the answer equals ask.py's, and the export names checkpoints/tiny/base."""
    import shlex
    (bash, commands), (py, code) = _doc_blocks("peft.md")[:2]
    assert (bash, py) == ("bash", "python")
    for name in ("examples", "checkpoints"):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    scripts = {"internalize.py": internalize.main, "compose.py": compose.main}
    for cmd in commands.split("&&"):
        argv = shlex.split(cmd)
        assert argv[0] == "python"
        scripts[argv[1]](argv[2:])
    assert json.loads(Path("adapter-peft/adapter_config.json").read_text())["base_model_name_or_path"] == \
        "checkpoints/tiny/base"
    capsys.readouterr()
    exec(compile(code, "docs/peft.md", "exec"), {"__name__": "peft_doc"})
    theirs = capsys.readouterr().out.strip()
    (r,) = ask_json(capsys, "adapter.safetensors", "What color is the square?")
    assert theirs == r["answer"] == "red"


def test_several_adapters_and_folders_in_one_call(w, capsys, tmp_path):
    """One base load for many adapters; each --json row names the adapter file and the video span it answers
    about, and equals asking that adapter alone; a folder is read as its adapters; mixed bases are refused."""
    for name, extra in (("p1", ["--end", "2"]), ("p2", ["--start", "2"])):
        if not (w / f"{name}.safetensors").exists():
            run_internalize(w, *extra, "-o", str(w / f"{name}.safetensors"))
    a, p1, p2 = (w / f"{n}.safetensors" for n in ("a", "p1", "p2"))
    if not a.exists():
        run_internalize(w, "-o", str(a))
    rows = ask_json(capsys, a, p1, p2, "What color is the square?", "Where does it move?", base=w / "base")
    assert [(r["adapter"], r["question"]) for r in rows] == [(str(x), q) for q in ("What color is the square?",
                                                                                    "Where does it move?")
                                                             for x in (a, p1, p2)]
    assert [(r["video"], r["start"], r["end"]) for r in rows[:3]] == [("clip.mp4", 0, pytest.approx(4.0)),
                                                                      ("clip.mp4", 0, 2), ("clip.mp4", 2, 4)]
    (alone,) = ask_json(capsys, p2, "What color is the square?", base=w / "base")
    assert alone == {**rows[2], "ttft_s": alone["ttft_s"], "tokens_per_s": alone["tokens_per_s"],
                     "total_s": alone["total_s"]}
    folder = tmp_path / "adapters"
    folder.mkdir()
    for x in (p1, p2):
        shutil.copy(x, folder / x.name)
    shutil.copy(w / "hyper" / "hypernet.safetensors", folder)   # not an adapter: skipped, with a note
    rows = ask_json(capsys, folder, "What color is the square?", base=w / "base")
    assert [Path(r["adapter"]).name for r in rows] == ["p1.safetensors", "p2.safetensors"]
    capsys.readouterr()
    ask.main([str(p1), str(p2), "What color is the square?", "--model", str(w / "base"), "--max-new-tokens", "4"])
    out = capsys.readouterr()
    assert out.out.splitlines()[0] == "Q: What color is the square?" and out.out.splitlines()[1].startswith(f"[{p1}] ")
    other = w / "bad_other.safetensors"
    if not other.exists():
        internalize.main([str(w / "clip.mp4"), "--model", str(w / "other"), "--hypernet", str(w / "other_hyper"),
                          "-o", str(other)])
    assert_one_line_error(capsys, ask.main, [a, other, "q", "--model", w / "base"], "different base models")


def test_hints_about_segments_and_the_toy_world(tmp_path, capsys):
    """On the shipped toy base: a 40 s clip read as 12 frames gets one hint naming --segments, and a clip that is
    not from the toy world (sky and skin tones) one note that the base only knows coloured shapes; the quick
    start's toy clip gets neither."""
    import av
    import numpy as np
    path = tmp_path / "walk.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=2)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        for i in range(80):
            a = np.full((64, 64, 3), (135, 180, 235), np.uint8)
            a[32:, :] = (200, 150, 120)
            a[:, i % 64] = 90
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    capsys.readouterr()
    internalize.main([str(path), "-o", str(tmp_path / "walk.safetensors")])
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith(("note:", "hint:"))]
    assert len(err) == 2 and "only knows coloured shapes" in err[0], err
    assert err[1] == "hint: walk.mp4 was read as one frame per 3 s; --segments 4 (or --segment-seconds 12) reads " \
                     "it at 1 frame/s", err
    internalize.main([str(REPO / "examples" / "clip.mp4"), "-o", str(tmp_path / "clip.safetensors")])
    assert not [x for x in capsys.readouterr().err.splitlines() if x.startswith(("note:", "hint:"))]
