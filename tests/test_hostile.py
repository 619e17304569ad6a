"""Hostile use of internalize.py, ask.py and compose.py (issue 25): every command keeps the user's files safe and
fails in one clear line. Each test asserts the exit status, the single `error:` line, that nothing was left behind
(no `.v2l-*.tmp`) and that files that existed are byte-identical. Most run in-process through adapter.run_cli, as
`__main__` does; signals, the offline hub and real full / read-only file systems run as subprocesses."""
from __future__ import annotations

import dataclasses
import errno
import fractions
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import adapter
import ask
import compose
import data
import internalize
import model as M
from conftest import assert_one_line_error, write_random_base, write_random_hypernet
from toy import world

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A random base (context 4096) and hypernetwork, a 4 s toy clip at 8 fps, and one adapter of it."""
    d = tmp_path_factory.mktemp("hostile")
    cfg = write_random_base(d / "base", hidden=48, seed=0)
    write_random_hypernet(d / "hyper", cfg, 0)
    spec = dataclasses.replace(world.clip_spec("train", 3), width=64, height=48, fps=8, n_frames=32)
    world.write_clip(spec, d / "clip.mp4")
    run(internalize.main, d / "clip.mp4", "--model", d / "base", "--hypernet", d / "hyper", "-o", d / "a.safetensors")
    return d


def run(main, *argv):
    """main(argv) exactly as the command line runs it; SystemExit(0) is success."""
    try:
        adapter.run_cli(main, [str(a) for a in argv])
    except SystemExit as e:
        if e.code not in (0, None):
            raise


def fails(capsys, main, *argv, match: str, code: int = 1, keep=(), out: Path | None = None) -> str:
    """A command that must fail in one `error:` line (conftest.assert_one_line_error), the commands' progress
    lines aside."""
    return assert_one_line_error(capsys, main, argv, match, out, code, keep,
                                 ignore=("note:", "hint:", "device ", "models loaded"))


def common(w, out):
    return ["--model", w / "base", "--hypernet", w / "hyper", "-o", out]


# ------------------------------------------------------------------------------------------------ never lose data
def test_output_that_is_an_input_is_refused(w, capsys, tmp_path):
    video = tmp_path / "v.mp4"
    shutil.copy(w / "clip.mp4", video)
    (tmp_path / "link.safetensors").symlink_to(video)
    os.link(video, tmp_path / "hard.safetensors")
    for out in (video, tmp_path / "link.safetensors", tmp_path / "hard.safetensors"):
        fails(capsys, internalize.main, video, *common(w, out), "--force", match="is one of the inputs", keep=[video])
    weights = w / "hyper" / "hypernet.safetensors"   # the hypernetwork is an input too, --force or not
    fails(capsys, internalize.main, video, *common(w, weights), "--force", match="is one of the inputs",
          keep=[weights])
    fails(capsys, compose.main, w / "a.safetensors", w / "a.safetensors", "-o", w / "a.safetensors",
          match="is one of the inputs", keep=[w / "a.safetensors"])
    peft = tmp_path / "peft"
    peft.mkdir()
    shutil.copy(w / "a.safetensors", peft / "adapter_model.safetensors")
    fails(capsys, compose.main, peft / "adapter_model.safetensors", "--to-peft", peft, "--model", w / "base",
          match="is one of the inputs", keep=[peft / "adapter_model.safetensors"])


def test_special_outputs_are_refused(w, capsys, tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)   # opening it to write would block forever: it must only be looked at
    (tmp_path / "dir.safetensors").mkdir()
    for out, match in ((Path("/dev/null"), "not a regular file"), (fifo, "not a regular file"),
                       (tmp_path / "dir.safetensors", "is a folder")):
        fails(capsys, compose.main, w / "a.safetensors", "-o", out, match=match)
    fails(capsys, internalize.main, w / "clip.mp4", *common(w, fifo), match="not a regular file")
    fails(capsys, compose.main, w / "a.safetensors", "--to-peft", w / "a.safetensors", match="is a file")
    name = tmp_path / ("n" * 300 + ".safetensors")
    fails(capsys, compose.main, w / "a.safetensors", "-o", name, match="longer than this file system allows",
          keep=[w / "a.safetensors"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.safetensors", "fifo.safetensors"]
    fails(capsys, compose.main, w / "a.safetensors", "-o", w / "clip.mp4" / "x.safetensors", match="not a folder")


def test_a_file_we_did_not_write_needs_force(w, capsys, tmp_path):
    notes = tmp_path / "notes.safetensors"
    notes.write_text("my notes\n")
    fails(capsys, compose.main, w / "a.safetensors", "-o", notes, match="pass --force", keep=[notes])
    fails(capsys, internalize.main, w / "clip.mp4", *common(w, notes), match="pass --force", keep=[notes])
    run(compose.main, w / "a.safetensors", "-o", notes, "--force")
    assert adapter.load_adapter(notes).meta["video"] == "clip.mp4"
    run(compose.main, w / "a.safetensors", "-o", notes)        # an adapter of ours is replaced without --force
    (tmp_path / "empty.safetensors").touch()                    # `out=$(mktemp)`: nothing in it to lose
    run(compose.main, w / "a.safetensors", "-o", tmp_path / "empty.safetensors")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_umask_permissions(w, tmp_path, umask):
    old = os.umask(umask)
    try:
        run(compose.main, w / "a.safetensors", "-o", tmp_path / "x.safetensors", "--to-peft", tmp_path / "peft",
            "--model", w / "base")
    finally:
        os.umask(old)
    for p in (tmp_path / "x.safetensors", tmp_path / "peft" / "adapter_config.json"):
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask
    assert not list(tmp_path.rglob(".v2l-*"))


def test_temp_files_are_short_and_ignored_by_git(tmp_path):
    import fnmatch
    seen = []
    adapter.write_atomic(tmp_path / ("n" * 250), lambda tmp: seen.append(tmp.name) or tmp.write_bytes(b"x"))
    patterns = [x for x in (REPO / ".gitignore").read_text().splitlines() if x and not x.startswith("#")]
    assert len(seen[0]) <= 20 and any(fnmatch.fnmatch(seen[0], p) for p in patterns)
    assert (tmp_path / ("n" * 250)).read_bytes() == b"x" and len(list(tmp_path.iterdir())) == 1


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(w, capsys, tmp_path, monkeypatch):
    out = tmp_path / "x.safetensors"
    shutil.copy(w / "a.safetensors", out)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(adapter.os, "fsync", full)   # the disk fills while the temp file is written
    fails(capsys, compose.main, w / "a.safetensors", "-o", out, match="No space left on device", keep=[out])
    monkeypatch.undo()
    # A temp name is short whatever the output's name is: a 250-byte name still leaves room for it.
    long = tmp_path / ("n" * 240 + ".safetensors")
    run(compose.main, w / "a.safetensors", "-o", long)
    assert long.is_file() and not list(tmp_path.glob(".v2l-*"))


def _in_namespace(script: str, tmp_path) -> subprocess.CompletedProcess:
    """Run a shell script as root of a private user + mount namespace (tmpfs and read-only mounts without
    touching the host); skip where such namespaces are not allowed."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no unprivileged user namespaces here")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_full_and_read_only_file_systems_are_one_line(w, tmp_path):
    """Real ENOSPC (a 4 KB tmpfs) and EROFS (a read-only bind mount), as a user meets them."""
    full, ro = tmp_path / "full", tmp_path / "ro"
    full.mkdir(), ro.mkdir()
    (ro / "old.safetensors").write_bytes((w / "a.safetensors").read_bytes())
    py, a = sys.executable, w / "a.safetensors"
    p = _in_namespace(f"mount -t tmpfs -o size=4k t {full} && mount --bind {ro} {ro} && "
                      f"mount -o remount,ro,bind {ro} && "
                      f"{py} compose.py {a} -o {full}/x.safetensors; echo rc=$? >&2; "
                      f"{py} compose.py {a} -o {ro}/old.safetensors; echo rc=$? >&2; "
                      f"ls -a {full} >&2", tmp_path)
    err = p.stderr.splitlines()
    assert err[0].startswith("error: ") and "No space left on device" in err[0] and err[1] == "rc=1", err
    assert err[2].startswith("error: ") and "Read-only file system" in err[2] and err[3] == "rc=1", err
    assert err[4:] == [".", ".."], err                          # no temp file left on the full disk
    assert (ro / "old.safetensors").read_bytes() == a.read_bytes()


SLOW_WRITE = """
import os, sys, time
import adapter, internalize
def slow(fd):  # the temp file exists now: say so, then wait to be interrupted
    print("writing", file=sys.stderr, flush=True)
    time.sleep(60)
os.fsync = slow
adapter.run_cli(internalize.main, sys.argv[1:])
"""


def _until(proc, text: str, timeout: float = 90) -> list[str]:
    """Read proc's stderr lines until one starts with `text`."""
    lines, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith(text):
            return lines
    raise AssertionError(f"never saw {text!r}: {lines}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_write_exits_128_plus_signal_and_leaves_nothing(w, tmp_path, sig):
    out = tmp_path / "x.safetensors"
    shutil.copy(w / "a.safetensors", out)
    before = out.read_bytes()
    argv = [str(w / "clip.mp4"), *map(str, common(w, out))]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _until(proc, "writing")
    assert len(list(tmp_path.glob(".v2l-*.tmp"))) == 1            # caught in the middle of the write
    os.killpg(proc.pid, sig)                                       # the whole group, as `timeout` or a scheduler
    rest = proc.stderr.read().splitlines()
    assert proc.wait(30) == 128 + sig
    assert rest == [f"error: interrupted ({signal.Signals(sig).name})"], rest
    assert out.read_bytes() == before and not list(tmp_path.glob(".v2l-*"))


def test_ctrl_c_in_ask_is_one_line(w):
    proc = subprocess.Popen([sys.executable, "ask.py", str(w / "a.safetensors"), "--model", str(w / "base")],
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _until(proc, "device ")                                         # loaded; now waiting for questions on stdin
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read().splitlines()
    assert proc.wait(30) == 130 and rest == ["error: interrupted (SIGINT)"], rest
    proc.stdin.close()


# ------------------------------------------------------------------------------------------------ never answer wrong
def _write_vfr(path, codec: str, n: int = 40, step_ms: int = 250):
    """n frames step_ms apart (4 fps, 10 s) in a container whose nominal rate says 30 fps."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=30)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        s.codec_context.time_base = fractions.Fraction(1, 1000)
        for i in range(n):
            f = av.VideoFrame.from_ndarray(np.full((32, 32, 3), (i * 6) % 256, np.uint8), format="rgb24")
            f.pts, f.time_base = i * step_ms, fractions.Fraction(1, 1000)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.mark.parametrize("ext,codec", [("mkv", "libx264"), ("webm", "libvpx-vp9")])
def test_variable_frame_rate_is_internalized_to_its_real_end(w, tmp_path, ext, codec):
    path = _write_vfr(tmp_path / f"vfr.{ext}", codec)
    assert float(av.open(str(path)).streams.video[0].average_rate) == 30   # the container's claim
    tl = data.scan_video(path)
    assert tl.span == pytest.approx(10.0) and tl.fps == pytest.approx(4.0)
    clip = data.decode_video(path, max_frames=12)
    assert clip.duration == pytest.approx(10.0) and len(clip.frames) == 10 and clip.pts[-1] > 9
    models = internalize.load_models(model=w / "base", hypernet=w / "hyper")
    meta = internalize.internalize(models, path, segments=2).meta
    assert (meta["start"], meta["end"]) == (0, pytest.approx(10.0))
    assert [s["end"] for s in meta["segments"]] == [pytest.approx(5.0), pytest.approx(10.0)]
    assert [s["frames"] for s in meta["segments"]] == [5, 5]


def test_ranges_are_clamped_with_a_note_or_refused(w, capsys):
    clip = w / "clip.mp4"   # 32 frames, 4.0 s
    said = []
    p = internalize.plan(clip, end=100.0, say=said.append)
    assert p.parts == [(0.0, 4.0)] and "past the end of clip.mp4 (4.00 s)" in said[0]
    assert internalize.plan(clip, end=float("inf"), say=said.append).parts == [(0.0, 4.0)] and len(said) == 1
    for kwargs, match in [(dict(start=-5.0), "before the clip's start"), (dict(start=float("nan")), "not a number"),
                          (dict(end=float("nan")), "not a number"), (dict(start=4.0), "past the clip's end"),
                          (dict(start=2.0, end=1.0), "is not after --start"),
                          (dict(segments=100), "--segments 100 leaves some segments without a frame"),
                          (dict(segment_seconds=1e-9), "at most 32 segments here"),
                          (dict(start=3.8, segments=2), "at most 1 segments here"),
                          (dict(start=3.9), r"no frame starts in \[3.9, 4\) s")]:
        with pytest.raises(ValueError, match=match):
            internalize.plan(clip, **kwargs)
    t0 = time.time()   # a billion planned segments are refused from the count, not by building them
    with pytest.raises(ValueError, match="at most 32"):
        internalize.plan(clip, segment_seconds=4e-9)
    assert time.time() - t0 < 1
    out = w / "clamped.safetensors"
    run(internalize.main, clip, *common(w, out), "--start", "3", "--end", "1e300", "--segments", "8")
    raw = json.loads(_header(out)["__metadata__"][adapter.META_KEY], parse_constant=lambda c: 1 / 0)
    assert (raw["start"], raw["end"]) == (3.0, 4.0) and [s["frames"] for s in raw["segments"]] == [1] * 8
    fails(capsys, internalize.main, clip, *common(w, w / "x.safetensors"), "--segments", "33",
          match="at most 32 segments here", out=w / "x.safetensors")


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def _rewrite(src: Path, dst: Path, meta_fn=None, tensor_fn=None, raw_meta: str | None = None):
    """A copy of an adapter with its metadata and/or tensors changed, the checksum kept consistent."""
    ad = adapter.load_adapter(src)
    tensors = {f"{t}.{k}": x.clone() for t, ab in ad.ab.items() for k, x in zip("AB", ab)}
    if tensor_fn:
        tensor_fn(tensors)
    meta = dict(ad.meta, tensors_sha256=adapter._sha256_tensors(tensors))
    if meta_fn:
        meta_fn(meta)
    save_file(tensors, str(dst), metadata={"format": "pt", adapter.META_KEY: raw_meta or json.dumps(meta)})
    return dst


@pytest.mark.parametrize("field,value,match", [
    ("alpha", "128", "alpha must be a finite number > 0"), ("alpha", -1.0, "alpha must be"),
    ("rank", 4.5, "rank must be an integer"), ("generated_rank", 8, "generated_rank"),
    ("base_size", "huge", "base_size must be one of"), ("frames", 0, "frames must be an integer >= 1"),
    ("targets", [["down_proj", "96", 48]], "targets must be"), ("segments", [], "segments must be"),
    ("tensors_sha256", "zz", "tensors_sha256 must be"), ("video", 7, "video must be"),
    ("segments.start", "0", "segments[0].start must be"), ("format_version", 1, "from an older version"),
    ("format_version", "2", "format_version must be"), ("bias_weight", None, "bias_weight must be"),
])
def test_adapter_metadata_of_the_wrong_type_is_refused(w, capsys, tmp_path, field, value, match):
    def edit(meta):
        if field == "segments.start":
            meta["segments"] = [dict(meta["segments"][0], start=value)]
        else:
            meta[field] = value

    bad = _rewrite(w / "a.safetensors", tmp_path / "bad.safetensors", edit)
    fails(capsys, ask.main, bad, "q", "--model", w / "base", match=match, keep=[bad])


def test_non_finite_tensors_and_json_are_refused(w, capsys, tmp_path):
    nan = _rewrite(w / "a.safetensors", tmp_path / "nan.safetensors",
                   tensor_fn=lambda t: t["down_proj.A"].view(-1).__setitem__(5, float("nan")))
    fails(capsys, ask.main, nan, "q", "--model", w / "base", match="NaN or infinite values")
    fails(capsys, compose.main, nan, "-o", tmp_path / "c.safetensors", match="NaN or infinite values",
          out=tmp_path / "c.safetensors")
    meta = json.loads(_header(w / "a.safetensors")["__metadata__"][adapter.META_KEY])
    text = json.dumps(meta).replace('"alpha": 128.0', '"alpha": NaN')
    bad = _rewrite(w / "a.safetensors", tmp_path / "j.safetensors", raw_meta=text)
    fails(capsys, ask.main, bad, "q", "--model", w / "base", match="not valid JSON")
    ad = adapter.load_adapter(w / "a.safetensors")
    ad.ab["down_proj"][0][0, 0, 0] = float("inf")   # a hypernetwork that overflowed is not saved
    with pytest.raises(adapter.AdapterError, match="NaN or infinite"):
        adapter.save_adapter(tmp_path / "inf.safetensors", ad)
    assert not list(tmp_path.glob(".v2l-*")) and not (tmp_path / "inf.safetensors").exists()


def test_fingerprint_tells_any_weight_change_apart(w, capsys, tmp_path):
    ref = M.load_model(w / "base")
    assert ref.weights_sha256 == M.load_model(w / "base", dtype=torch.bfloat16).weights_sha256 \
        == M.folder_weights_sha256(w / "base") == M.weights_sha256(ref.state_dict().items())
    twin = tmp_path / "twin"
    shutil.copytree(w / "base", twin)
    from safetensors.torch import load_file
    state = load_file(twin / "model.safetensors")
    name = "model.vision_model.encoder.layers.0.mlp.fc1.weight"   # no norm: one element of the vision tower
    state[name][3, 4] += 1e-3
    save_file(state, str(twin / "model.safetensors"))
    fails(capsys, ask.main, w / "a.safetensors", "q", "--model", twin, match="same architecture, different weights")


def test_ask_loads_no_model_an_adapter_names_without_consent(w, capsys, tmp_path, monkeypatch):
    named = _rewrite(w / "a.safetensors", tmp_path / "n.safetensors",
                     lambda m: m.update(base_size="500M", base_model=M.PRESETS["500M"]))

    def no_hub(*a, **k):
        raise AssertionError("ask.py reached for a model the user did not ask for")

    monkeypatch.setattr(M, "resolve_model_dir", no_hub)
    fails(capsys, ask.main, named, "q", match="pass --size 500M or --trust-adapter-base")
    fails(capsys, ask.main, named, "q", "--size", "256M", match="made on the 500M base model, not --size 256M")
    fails(capsys, ask.main, w / "a.safetensors", "q", match="pass --model DIR")   # a local base: never guessed


def test_adapters_hold_no_absolute_path(w, tmp_path):
    out = tmp_path / "abs.safetensors"
    run(internalize.main, (w / "clip.mp4").resolve(), "--model", (w / "base").resolve(), "--hypernet",
        (w / "hyper").resolve(), "-o", out.resolve())
    text = _header(out)["__metadata__"][adapter.META_KEY]
    assert str(w) not in text and str(tmp_path) not in text and "/root" not in text
    meta = json.loads(text)
    assert (meta["base_model"], meta["base_size"], meta["hypernet"], meta["video"]) == ("base", None, "hyper",
                                                                                       "clip.mp4")


def test_prompts_past_the_context_are_refused_with_the_limit(w, capsys, tmp_path, monkeypatch):
    long_q = "what " * 5000
    fails(capsys, ask.main, w / "a.safetensors", long_q, "--model", w / "base", match="context of 4096 tokens")
    fails(capsys, ask.main, w / "a.safetensors", "q", "--model", w / "base", "--max-new-tokens", "5000",
          match="past the base model's context of 4096")
    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("weights loaded before the check"))
    fails(capsys, internalize.main, w / "clip.mp4", *common(w, tmp_path / "x.safetensors"), "--frames", "2000",
          match="at most", out=tmp_path / "x.safetensors")
    fails(capsys, ask.main, "--video", w / "clip.mp4", "--model", w / "base", "--frames", "900", "q",
          match="context of 4096 tokens")


# ------------------------------------------------------------------------------------------------ one line each
@pytest.mark.parametrize("cli,argv,match", [
    ("ask", ["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ("ask", ["--max-new-tokens", "-5"], "--max-new-tokens must be >= 1"),
    ("ask", ["--temperature", "nan"], "invalid finite number value"),
    ("ask", ["--top-p", "0"], "--top-p must be in (0, 1]"), ("ask", ["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    ("ask", ["--temperature", "-1"], "--temperature must be >= 0"),
    ("ask", ["--video-size", "100000"], "--video-size must be between 1 and 4096"),
    ("ask", ["--frames", "abc"], "invalid int value"),
    ("internalize", ["--segment-seconds", "nan"], "invalid finite number value"),
    ("internalize", ["--segments", "0"], "--segments must be >= 1"),
    ("internalize", ["--video-size", "1000000"], "--video-size must be between"),
    ("compose", ["--weights", "nan"], "--weights must be finite"),
    ("compose", ["--bias-weight", "inf"], "invalid finite number value"),
])
def test_bad_numbers_are_one_line(w, capsys, tmp_path, cli, argv, match):
    main, code = {"ask": (ask.main, 2), "internalize": (internalize.main, 2), "compose": (compose.main, 2)}[cli]
    lead = {"ask": [w / "a.safetensors", "q"], "internalize": [w / "clip.mp4", *common(w, tmp_path / "x")],
            "compose": [w / "a.safetensors", "-o", tmp_path / "x"]}[cli]
    code = 1 if cli == "compose" and argv[0] == "--weights" else code
    fails(capsys, main, *lead, *argv, match=match, code=code)


def test_devices_hypernetworks_and_stdin_are_one_line(w, capsys, tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        fails(capsys, ask.main, w / "a.safetensors", "q", "--model", w / "base", "--device", "cuda",
              match="no CUDA device here")
    fails(capsys, ask.main, w / "a.safetensors", "q", "--model", w / "base", "--device", "gpu",
          match="not a device name")
    fails(capsys, ask.main, w / "a.safetensors", "q", "--model", w / "base", "--device", "cuda:99",
          match="cuda")
    bad = tmp_path / "hyper"
    shutil.copytree(w / "hyper", bad)
    cfg = json.loads((bad / "hypernet.json").read_text())
    cfg["hyper_config"]["rank"] = 8   # the file says 8, the weights are rank 4
    (bad / "hypernet.json").write_text(json.dumps(cfg))
    fails(capsys, internalize.main, w / "clip.mp4", "--model", w / "base", "--hypernet", bad, "-o",
          tmp_path / "x.safetensors", match=f"hypernetwork {bad}", out=tmp_path / "x.safetensors")
    for junk, match in ((b"\xff\xfe\x80 junk\n", "stdin line 1 is not UTF-8"), (b"ok?\n\x00\x01\x02\n", "NUL")):
        monkeypatch.setattr(sys, "stdin", type("In", (), {"buffer": __import__("io").BytesIO(junk),
                                                          "isatty": lambda self: False})())
        fails(capsys, ask.main, w / "a.safetensors", "-", "--model", w / "base", "--max-new-tokens", "2",
              match=match)


def test_offline_hub_miss_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    p = subprocess.run([sys.executable, "ask.py", "--no-adapter", "--size", "500M", "q"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.splitlines() == [f"error: {M.PRESETS['500M']} is not in the Hugging Face cache and the hub is "
                                     "offline (HF_HUB_OFFLINE=1); download it once with network access, or pass "
                                     "--model DIR (a local SmolVLM2 folder)"]


def test_toy_world_cli_help_and_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        world.main(["clips", "--help"])
    assert e.value.code == 0 and "two-part clips" in capsys.readouterr().out
    fails(capsys, world.main, "clips", "--n", "0", "--out", tmp_path, match="--n must be between", code=1)
    fails(capsys, world.main, "clips", "--out", tmp_path, "--bogus", match="unrecognized arguments", code=2)
    (tmp_path / "f").write_text("x")
    fails(capsys, world.main, "clips", "--n", "1", "--out", tmp_path / "f", match="is not a folder")
