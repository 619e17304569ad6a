"""train.py used as a demanding user would: no data, an offline hub, absurd numbers, hostile manifests, outputs that
are inputs, resuming with other flags or on another base, a corrupt checkpoint, writes that fail, videos that never
decode, and the whole recipe from a folder of videos. Each case checks the exit code, a single `error:` line, that
nothing was left behind and that existing files are byte-identical."""
import errno, hashlib, json, os, subprocess, sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import model as M
import train
from adapter import base_facts
from adapter import run_cli
from conftest import train_args, write_learnable_base, write_square_clip
from hypernet import load_hypernet
from toy import world
from toy.world import COLORS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    base, other = write_learnable_base(d / "base"), write_learnable_base(d / "other", seed=1)
    weights = load_file(other / "model.safetensors")  # same shapes, other weights (norms too, which any
    for k in weights:                                   # fingerprint of the weights sees)
        weights[k] = weights[k] + 0.01 * torch.randn_like(weights[k])
    save_file(weights, other / "model.safetensors")
    rows = []
    for i, (color, direction) in enumerate([("red", "left"), ("green", "right"), ("blue", "left")]):
        write_square_clip(d / f"c{i}.mp4", COLORS[color], direction)
        rows.append({"id": f"c{i}", "video_path": f"c{i}.mp4", "prompt": "Describe the video.",
                     "target_text": f"A {color} square moves {direction}."})
    (d / "broken.mp4").write_bytes((d / "c0.mp4").read_bytes()[:300])  # exists, but does not decode
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"dir": d, "base": base, "other": other, "rows": rows}


args = train_args


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under folder -> sha256 of its bytes (what "byte-identical" compares)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error(e) -> str:
    """The SystemExit's message: one line, starting with `error: `."""
    text = str(e.value)
    assert text.startswith("error: ") and "\n" not in text, text
    return text


def log(run: Path, key="ce") -> list:
    return [r[key] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if key in r]


def test_no_data_prints_what_it_needs_in_one_block(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for size in ("500M", "tiny"):
        with pytest.raises(SystemExit) as e:
            train.main(["--size", size])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [err.splitlines()[0]]
        assert "--videos" in err and "HuggingFaceFV/finevideo" in err and f"the {size} preset expects" in err
        assert "usage:" not in err and "Traceback" not in err and len(err.splitlines()) <= 10
    assert not any(tmp_path.iterdir())  # no run folder made


def test_an_offline_hub_miss_is_one_line_and_writes_nothing(case, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    (tmp_path / "hf").mkdir()
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--size", "500M", "--videos", str(case["dir"]),
                        "--out", str(run)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--model DIR" in lines[0], r.stderr
    assert not run.exists() and not any((tmp_path / "hf").iterdir())


@pytest.mark.parametrize("flags, named", [
    (["--batch", "0"], "--batch"), (["--steps", "0"], "--steps"), (["--accum", "0"], "--accum"),
    (["--val-every", "0"], "--val-every"), (["--val-rows", "0"], "--val-rows"), (["--lr", "nan"], "--lr"),
    (["--lr", "0"], "--lr"), (["--stop-at", "0"], "--stop-at"), (["--steps", "5", "--stop-at", "9"], "--stop-at"),
    (["--workers", "-1"], "--workers"), (["--video-size", "100000"], "--video-size"), (["--frames", "0"], "--frames"),
    (["--kl-weight", "inf"], "--kl-weight"), (["--val-fraction", "1"], "--val-fraction"),
    (["--span-seconds", "0"], "--span-seconds"), (["--rank", "0"], "--rank"), (["--device", "bogus"], "--device")])
def test_numbers_that_would_train_nothing_are_refused_before_any_work(case, tmp_path, flags, named):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(args(case, out, *flags))
    assert named in one_error(e) and not out.exists()


def test_manifest_lines_are_skipped_and_counted_never_mixed_up(case, tmp_path, capsys):
    good = case["rows"]
    lines = [json.dumps(good[0]).encode(),
             json.dumps({**good[1], "id": good[0]["id"], "target_text": "Another row's answer."}).encode(),
             json.dumps({**good[1], "id": 5}).encode(),                      # 5 and "5" would collide
             json.dumps({**good[1], "target_text": None}).encode(),          # str(None) would train "None"
             b'{"id": "latin", "video_path": "c1.mp4", "prompt": "Caf\xe9?", "target_text": "x"}',   # not UTF-8
             json.dumps({**good[1], "id": "span", "start": 2, "end": 1}).encode(),
             json.dumps({**good[2], "prompt": ["a list"]}).encode(),
             json.dumps(good[1]).encode(), json.dumps(good[2]).encode()]
    (tmp_path / "h.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    for clip in ("c0", "c1", "c2"):
        (tmp_path / f"{clip}.mp4").symlink_to(case["dir"] / f"{clip}.mp4")
    rows, skipped = data.read_manifest(tmp_path / "h.jsonl")
    assert [r["id"] for r in rows] == ["c0", "c1", "c2"] and skipped == 6
    assert rows[0]["target_text"] == good[0]["target_text"]  # the first row with an id keeps it
    err = capsys.readouterr().err
    assert "h.jsonl:2: malformed" in err and "3 more malformed lines skipped (6 in all)" in err
    # The dataset's rows, and so every cache keyed by row id (the teacher's logits) or by clip, stay one per row.
    ds = data.VideoTextDataset(tmp_path / "h.jsonl", data.Processor(case["base"], max_frames=12), teacher_view=True)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    assert batch["row_ids"] == ["c0", "c1", "c2"] and len(set(batch["ctx_keys"])) == 3
    # A span row is its own clip: it decodes [start, end) and keys the caches apart from the whole video.
    span = {**good[0], "id": "c0-span", "start": 1.0, "end": 3.0}
    (tmp_path / "s.jsonl").write_text(json.dumps(good[0]) + "\n" + json.dumps(span) + "\n")
    ds = data.VideoTextDataset(tmp_path / "s.jsonl", data.Processor(case["base"], max_frames=12), cache_mb=16)
    whole, part = ds[0], ds[1]
    assert whole["ctx_keys"] != part["ctx_keys"] and len(ds.cache) == 2
    assert len(part["pixel_values"]) == 2 and len(whole["pixel_values"]) == 4  # 2 s and 4 s at 1 frame a second


def test_teacher_refuses_an_output_that_would_destroy_data(case, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({**case["rows"][0], "video_path": str(case["dir"] / "c0.mp4")}) + "\n")
    (tmp_path / "link.jsonl").symlink_to(manifest)
    os.link(manifest, tmp_path / "hard.jsonl")
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "notes.jsonl").write_text('{"my": "notes"}\n')                      # not the teacher's output
    (tmp_path / "other.jsonl").write_text(json.dumps({"teacher": "other@0123", "id": "c9"}) + "\n")
    before = snapshot(tmp_path)
    for out, why in (("m.jsonl", "is the input"), ("link.jsonl", "is the input"), ("hard.jsonl", "is the input"),
                     ("folder", "not a regular file"), ("fifo", "not a regular file"),
                     ("notes.jsonl", "did not write"), ("other.jsonl", "another teacher")):
        with pytest.raises(SystemExit) as e:
            train.main(["teacher", "--model", str(case["base"]), "--manifest", str(manifest),
                        "--out", str(tmp_path / out), "--max-new-tokens", "2"])
        assert why in one_error(e), (out, str(e.value))
    assert snapshot(tmp_path) == before


def test_resume_refuses_other_architecture_flags_and_another_base_and_falls_back_from_a_corrupt_checkpoint(
        case, tmp_path, capsys):
    common = ("--steps", 4, "--batch", 2, "--accum", 1, "--lr", 1e-3, "--save-every", 1)
    full, run = tmp_path / "full", tmp_path / "run"
    train.main(args(case, full, *common))
    train.main(args(case, run, *common, "--stop-at", 3))
    assert json.loads((run / "latest" / "state.json").read_text())["step"] == 3
    assert json.loads((run / "latest.old" / "state.json").read_text())["step"] == 2
    before = snapshot(run)
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(run), "--resume", "--latent-size", "64", "--rank", "8"])
    assert "--latent-size 64 (the run's: 32)" in one_error(e) and "--rank 8" in str(e.value)
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(run), "--resume", "--model", str(case["other"])])
    assert "was trained on base base" in one_error(e)
    assert snapshot(run) == before
    # The checkpoint records its base: loading it onto another one is refused, in one line.
    recorded = json.loads((run / "latest" / "hypernet.json").read_text())["base"]
    assert {k: v for k, v in recorded.items() if k != "base_model"} == base_facts(M.load_model(case["base"]))
    with pytest.raises(ValueError, match="trained on base base"):
        load_hypernet(run / "latest", base=base_facts(M.load_model(case["other"])))
    import internalize
    with pytest.raises(ValueError, match="trained on base base") as e:
        internalize.load_models(model=str(case["other"]), hypernet=str(run / "latest"))
    assert "\n" not in str(e.value)
    # A corrupt latest/ falls back to the save before it, with a warning, and the run ends as the uninterrupted one.
    (run / "latest" / "state.json").write_text('{"step": 3, "ar')
    capsys.readouterr()
    train.main(["--out", str(run), "--resume"])
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "latest" in warnings[0] and "resuming from latest.old/" in warnings[0]
    assert log(run) == pytest.approx(log(full), rel=1e-6)
    # Nothing usable at all: one line.
    for name in ("latest", "latest.old"):
        (run / name / "state.json").write_bytes(b"\xff\xfe")
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(run), "--resume"])
    assert "nothing to resume" in one_error(e)


def test_training_that_would_train_nothing_stops_with_an_error(case, tmp_path):
    bad = {"id": "bad", "video_path": "broken.mp4", "prompt": "p", "target_text": "t"}
    (case["dir"] / "broken.jsonl").write_text(json.dumps(bad) + "\n" + json.dumps({**bad, "id": "bad2"}) + "\n")
    before = snapshot(case["dir"])
    with pytest.raises(SystemExit) as e:
        train.main(args(case, tmp_path / "a", "--steps", 50, "--batch", 2, "--accum", 1, manifest="broken.jsonl"))
    assert "no decodable video" in one_error(e) and not (tmp_path / "a").exists()
    with pytest.raises(SystemExit) as e:
        train.main(args(case, tmp_path / "b", "--steps", 1, "--batch", 2, "--accum", 1, "--val",
                        case["dir"] / "broken.jsonl"))
    assert "no validation row" in one_error(e)
    with pytest.raises(SystemExit) as e:  # a manifest whose videos are all missing
        (case["dir"] / "gone.jsonl").write_text(json.dumps({**bad, "video_path": "gone.mp4"}) + "\n")
        train.main(args(case, tmp_path / "c", manifest="gone.jsonl"))
    assert "nothing to train on" in one_error(e) and not (tmp_path / "c").exists()
    (case["dir"] / "gone.jsonl").unlink()
    assert snapshot(case["dir"]) == {k: v for k, v in before.items()}


def test_a_failed_write_leaves_no_temp_file_and_files_get_the_umask(case, tmp_path, monkeypatch, capsys):
    assert len(train.temp_path(tmp_path / ("x" * 255)).name.encode()) <= 255
    assert train.temp_path(tmp_path / "y").name.endswith(".tmp") and "*.tmp" in (ROOT / ".gitignore").read_text()
    old = os.umask(0o027)
    try:
        train.main(args(case, tmp_path / "ok", "--steps", 1, "--batch", 2, "--accum", 1))
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "ok").rglob("*") if p.is_file()}
    assert modes and set(modes.values()) == {0o640}, modes

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "full" / "latest.tmp" / "trainer.pt"))
    monkeypatch.setattr(train.torch, "save", full_disk)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # as the script runs it: adapter.run_cli turns the OSError into one line
        run_cli(train.main, args(case, tmp_path / "full", "--steps", 1, "--batch", 2, "--accum", 1))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [err.splitlines()[-1]]
    assert err.splitlines()[-1].startswith("error: ") and "No space left on device" in err.splitlines()[-1]
    assert not (tmp_path / "full").exists()  # no latest.tmp, and no half-made run folder


def test_the_whole_recipe_from_a_folder_of_videos_on_the_tiny_preset(tmp_path, capsys):
    """--size tiny --videos DIR: span rows with the paper's prompts, the teacher's answers, a split by video, the toy
    recipe's training; the run prints its preset, its time per step and ETA; a rerun resumes every stage."""
    clips = tmp_path / "clips"
    world.write_split("train", 3, clips, progress=False)
    run = tmp_path / "run"
    cmd = ["--size", "tiny", "--videos", str(clips), "--out", str(run), "--steps", "5", "--stop-at", "4",
           "--val-every", "4", "--save-every", "4", "--batch", "1", "--teacher-tokens", "4", "--span-seconds", "2",
           "--kl-weight", "0", "--cache-hidden-mb", "0", "--compile", "off", "--frames", "4"]
    state = train.main(cmd)
    err = capsys.readouterr().err
    assert state["step"] == 4 and state["best_val_ce"] is not None
    assert "preset --size tiny" in err and "toy/recipes/hypernet.toml" in err and "steps=5" in err
    assert "ETA" in err and "to step 4" in err and "hardware: a CPU" in err and "/4 [" in err  # the bar ends at 4
    rows = [json.loads(ln) for ln in (run / "data" / "manifest.jsonl").read_text().splitlines()]
    assert {r["span"] for r in rows} == {"scene", "adjacent", "full"}
    assert all(r["prompt"] in data.SPAN_PROMPTS[r["span"]] for r in rows)
    teacher = [json.loads(ln) for ln in (run / "data" / "teacher.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in teacher) == sorted(r["id"] for r in rows) and all(r["teacher"] for r in teacher)
    split = [{json.loads(ln)["video_id"] for ln in (run / "data" / f).read_text().splitlines()}
             for f in ("train.jsonl", "val.jsonl")]
    assert split[0] and split[1] and not split[0] & split[1]
    tiny = M.load_model(M.TINY_DIR)
    assert json.loads((run / "best" / "hypernet.json").read_text())["base"]["base_weights_sha256"] == \
        base_facts(tiny)["base_weights_sha256"]
    before = snapshot(run)
    train.main(cmd)  # the same command again: every stage is done, nothing changes
    assert "nothing to do" in capsys.readouterr().err and snapshot(run) == before
    i = cmd.index("--stop-at")
    train.main(cmd[:i] + cmd[i + 2:])  # without --stop-at: resumes to the schedule's end, step 5
    assert [r["step"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "ce" in r] == \
        list(range(1, 6))


def test_ctrl_c_in_the_teacher_keeps_its_finished_rows_and_exits_130(case, tmp_path, monkeypatch):
    import signal
    manifest, out = tmp_path / "m.jsonl", tmp_path / "t.jsonl"
    manifest.write_text("".join(json.dumps({**r, "video_path": str(case["dir"] / r["video_path"])}) + "\n"
                                for r in case["rows"]))
    cmd = ["teacher", "--model", str(case["base"]), "--manifest", str(manifest), "--out", str(out), "--batch", "1",
           "--max-new-tokens", "2"]
    real, calls = M.generate, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the first batch: it finishes, then the command stops
        return real(*a, **k)
    monkeypatch.setattr(M, "generate", interrupted)
    with pytest.raises(SystemExit) as e:
        run_cli(train.main, cmd)
    assert e.value.code == 130 and [json.loads(ln)["id"] for ln in out.read_text().splitlines()] == ["c0"]
    train.main(cmd)  # the rerun finishes the rest
    assert [json.loads(ln)["id"] for ln in out.read_text().splitlines()] == ["c0", "c1", "c2"]
