"""train.py on a tiny random base model and a tiny hypernetwork, with 32x32 clips written here by PyAV.

The clips are already at the encoder's 32-px side, so decoding does no resizing and a step takes ~0.1 s on CPU.
"""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
import model as M
from conftest import train_args, write_learnable_base, write_square_clip
from toy.world import COLORS
import train
from hypernet import HyperNet, load_hypernet

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Base model, four clips with distinct captions (m.jsonl) and the same plus one broken video (mb.jsonl)."""
    d = tmp_path_factory.mktemp("train")
    base = write_learnable_base(d / "base")
    rows = []
    for i, (color, direction) in enumerate([("red", "left"), ("green", "right"), ("blue", "left"),
                                            ("yellow", "right")]):
        write_square_clip(d / f"c{i}.mp4", COLORS[color], direction)
        rows.append({"id": f"c{i}", "video_path": f"c{i}.mp4", "prompt": "Describe the video.",
                     "target_text": f"A {color} square moves {direction}."})
    (d / "broken.mp4").write_bytes((d / "c0.mp4").read_bytes()[:300])  # exists, but does not decode
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad = {"id": "bad", "video_path": "broken.mp4", "prompt": "Describe the video.", "target_text": "A."}
    (d / "mb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2] + [bad] + rows[2:]))
    return {"dir": d, "base": base, "rows": rows}


run_args = train_args


def log(run: Path, key="ce") -> list[float]:
    return [r[key] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if key in r]


def answers(w, hyper: HyperNet) -> list[str]:
    """Greedy text-only answers with the adapter each clip's hidden states make (method.md §5)."""
    proc, vlm = data.Processor(w["base"], max_frames=12), M.load_model(w["base"])
    out = []
    for row in w["rows"]:
        ids, px = proc.internalization_inputs(w["dir"] / row["video_path"])
        with torch.no_grad():
            H = torch.stack(vlm(ids, px, output_hidden_states=True, logits="none").hidden_states, 1)  # (1, L, T, D)
            lora = hyper.eval()(H)
        q, _ = proc.question_inputs(row["prompt"])
        new = M.generate(vlm, q, lora=lora, lora_alpha=hyper.config.alpha, max_new_tokens=10, eos_token_id=proc.eou_id)
        out.append(proc.decode(new[0]).strip())
    return out


def test_it_learns_video_specific_answers(case, tmp_path):
    run = tmp_path / "run"
    state = train.main(run_args(case, run, "--val", case["dir"] / "m.jsonl", "--steps", 80, "--batch", 4,
                                "--accum", 1, "--lr", 1e-3, "--val-every", 40))
    ce = log(run)
    assert len(ce) == 80 and sum(ce[-5:]) / 5 < 0.1 * sum(ce[:5]) / 5, ce
    assert state["best_val_ce"] == min(log(run, "val_ce")) < 1.0
    targets = [r["target_text"] for r in case["rows"]]
    trained = answers(case, load_hypernet(run / "best"))
    zero = answers(case, HyperNet(load_hypernet(run / "best").config))  # fresh: scaler_B = bias_B = 0, dW = 0
    # Four different captions: one shared (static) answer can match at most one, so >= 3 needs the video.
    assert sum(a == t for a, t in zip(trained, targets)) >= 3, trained
    assert not any(word in a.split() for a in zero for word in ("square", "moves")), zero


def test_sigterm_to_the_process_group_saves_and_the_resume_matches_an_uninterrupted_run(case, tmp_path):
    """`timeout`, schedulers and `kill -TERM -PGID` signal the whole process group, DataLoader workers included: the
    workers keep going, the main process finishes its step, saves latest/ and exits 143 (128 + SIGTERM) so a calling
    script stops; --resume then continues exactly."""
    common = ("--steps", 12, "--batch", 2, "--accum", 2, "--lr", 1e-3, "--save-every", 100)
    full = tmp_path / "full"
    train.main(run_args(case, full, *common, manifest="mb.jsonl"))
    part = tmp_path / "part"
    # The same thread count as this process: float sums split differently over threads differ in the last bits.
    environ = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *run_args(case, part, *common, "--workers", 2,
                             manifest="mb.jsonl")], cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            env=environ, start_new_session=True, text=True)  # its own process group
    while proc.poll() is None and not ((part / "log.jsonl").is_file() and log(part)):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    stopped = json.loads((part / "latest" / "state.json").read_text())["step"]
    assert 1 <= stopped < 12 and len(log(part)) == stopped
    with pytest.raises(SystemExit, match="--resume"):  # an existing run is never silently overwritten
        train.main(run_args(case, part, *common, manifest="mb.jsonl"))
    train.main(["--out", str(part), "--resume", "--workers", "0"])  # the rest comes from the saved arguments
    assert log(part) == log(full)
    assert sum(log(full, "skipped")) > 0  # the broken video was met and skipped
    a, b = load_file(part / "latest" / "hypernet.safetensors"), load_file(full / "latest" / "hypernet.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(part.glob("*.tmp")) and not (part / "best").exists()  # no temp folder; no --val: no best/


def test_two_gloo_processes_match_one_process(case, tmp_path):
    """Global batch 4 per step: 1 process x 2 x accum 2, or 2 processes x 1 x accum 2; one video is broken."""
    common = ("--steps", 4, "--accum", 2, "--lr", 1e-3)
    one, two = tmp_path / "one", tmp_path / "two"
    train.main(run_args(case, one, *common, "--batch", 2, manifest="mb.jsonl"))
    environ = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(ROOT / "train.py"), *run_args(case, two, *common, "--batch", 1, manifest="mb.jsonl")],
                   cwd=ROOT, env=environ, check=True, capture_output=True)
    assert log(one, "skipped") == log(two, "skipped") and sum(log(one, "skipped")) > 0
    assert log(one) == pytest.approx(log(two), rel=1e-5)
    a, b = load_file(one / "latest" / "hypernet.safetensors"), load_file(two / "latest" / "hypernet.safetensors")
    # Tolerance: 1 % of one step's learning rate (measured: ~2e-7); the sums are only reordered across ranks.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_teacher_answers_resume_without_rewriting(case, tmp_path):
    out = tmp_path / "teacher.jsonl"
    args = ["teacher", "--model", str(case["base"]), "--manifest", str(case["dir"] / "mb.jsonl"), "--out",
            str(out), "--batch", "2", "--max-new-tokens", "6"]
    train.main(args)
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["c0", "c1", "c2", "c3"]  # the broken video is skipped
    # Batched, left-padded answers equal one-at-a-time greedy decoding with the video in context.
    proc, vlm = data.Processor(case["base"], max_frames=12), M.load_model(case["base"])
    for r in rows:
        ids, px = proc.question_inputs(r["prompt"], video=case["dir"] / f"{r['id']}.mp4")
        alone = proc.decode(M.generate(vlm, ids, pixel_values=px, max_new_tokens=6, eos_token_id=proc.eou_id)[0])
        assert r["target_text"] == (alone.strip() or train.UNABLE)
        assert r["source_target_text"].startswith("A ")
    assert Path(data.read_manifest(out)[0][0]["video_path"]).resolve() == (case["dir"] / "c0.mp4").resolve()
    # Simulate a crash after two rows and half a line: the rerun keeps those bytes and finishes the rest.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:20])
    train.main(args)
    text = out.read_text()
    assert text.startswith("".join(lines[:2])) and sorted(text.splitlines()) == sorted(ln.rstrip("\n") for ln in lines)


def test_kl_term_and_cli_errors(case, tmp_path):
    """The optional KL to the video-in-context teacher runs and is logged; user mistakes are one-line errors."""
    run = tmp_path / "kl"
    train.main(run_args(case, run, "--steps", 2, "--batch", 2, "--accum", 1, "--kl-weight", 0.05))
    rows = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert all(r["kl"] > 0 and r["loss"] == pytest.approx(r["ce"] + 0.05 * r["kl"]) for r in rows)
    with pytest.raises(SystemExit, match="error: --train manifest .* not found"):
        train.main(run_args(case, tmp_path / "x", manifest="nope.jsonl"))
    with pytest.raises(SystemExit, match="error: nothing to resume"):
        train.main(["--out", str(tmp_path / "y"), "--resume"])


def test_composed_rows_train_the_adapter_that_internalize_segments_makes(case, tmp_path):
    """--compose-prob: a composed row's loss is the CE of exactly the adapter `internalize.py --segments 2` and
    compose.py make (each half decoded and internalized alone, ranks concatenated, the static part once); the other
    rows in the same batch keep their whole-clip adapter. Then the flag trains end to end and bad values are errors."""
    from adapter import adapter_from_lora, concat_adapters
    from hypernet import HyperConfig
    from data import plan_segments
    proc, vlm = data.Processor(case["base"], max_frames=12), M.load_model(case["base"])
    torch.manual_seed(0)
    hyper = HyperNet(HyperConfig.for_model(vlm.config, latent_size=32, n_latents=4, num_blocks=1, n_heads=2,
                                         head_dim=16, n_kv_heads=1, rank=4))
    for p in (*hyper.scaler_B.values(), *hyper.bias_B.values()):  # a non-zero dW, as after training
        torch.nn.init.normal_(p, std=0.3)
    rows = data.VideoTextDataset(case["dir"] / "m.jsonl", proc, compose_prob=0.5, seed=3)
    composed = [rows.composed(r) for r in rows.rows]
    assert any(composed) and not all(composed), composed  # the seed mixes both kinds in one batch
    batch = rows.collate([rows[i] for i in range(len(rows))])
    assert batch["composed"] == sum(composed) and len(batch["owner"]) == len(rows) + sum(composed)
    with torch.no_grad():
        ce, _ = train.sample_losses(vlm, hyper, batch)
    meta = {"alpha": hyper.config.alpha, "base_config_sha256": "", "base_weights_sha256": "", "hypernet_sha256": "",
            "targets": list(hyper.config.targets)}
    for i, row in enumerate(rows.rows):
        path = rows.rows[i]["video_path"]
        spans = plan_segments(0.0, proc.load_video(path).duration, 2, None) if composed[i] else [(None, None)]
        parts = []
        for s, e in spans:  # internalize.encode_segment, one segment at a time, no padding
            ids, px = proc.internalization_inputs(proc.load_video(path, start=s, end=e))
            with torch.no_grad():
                H = torch.stack(vlm(ids, px, output_hidden_states=True, logits="none").hidden_states, 1)
                parts.append(adapter_from_lora(hyper(H), hyper.config.rank, {**meta, "segments": [
                    {"video": path, "video_sha256": "", "start": s, "end": e}]}))
        lora = {t: (a[None], b[None]) for t, (a, b) in concat_adapters(parts).ab.items()}
        ids, labels = proc.training_pair(row["prompt"], row["target_text"])
        with torch.no_grad():
            logits = vlm(ids[None], lora=lora, lora_alpha=hyper.config.alpha).logits[0, :-1]
        want = F_ce(logits, labels[1:])
        assert ce[i].item() == pytest.approx(want, rel=1e-4), (i, composed[i])
    run = tmp_path / "composed"
    train.main(run_args(case, run, "--steps", 3, "--batch", 4, "--accum", 1, "--compose-prob", 0.5))
    assert len(log(run)) == 3 and all(np.isfinite(log(run)))
    with pytest.raises(SystemExit, match="error: --compose-prob must be in"):
        train.main(run_args(case, tmp_path / "bad", "--compose-prob", 1.5))


def test_compose_from_trains_whole_clips_first_and_resumes_on_the_same_schedule(case, tmp_path):
    """--compose-from S: steps before S train whole clips only, steps from S on compose the rows --compose-prob
    picks; the step's composed-row count is logged, and an interrupted run resumes on the same schedule."""
    flags = ("--steps", 4, "--batch", 4, "--accum", 1, "--compose-prob", 1.0, "--compose-from", 3)
    run = tmp_path / "warm"
    train.main(run_args(case, run, *flags))
    assert log(run, "composed") == [0, 0, 4, 4]
    cut = tmp_path / "cut"
    train.main(run_args(case, cut, *flags, "--save-every", 1, "--stop-at", 2))
    train.main(run_args(case, cut, "--resume"))
    assert log(cut, "composed") == [0, 0, 4, 4] and log(cut) == pytest.approx(log(run), rel=1e-5)


def test_compose_where_composes_only_the_rows_whose_field_is_true(case, tmp_path):
    """--compose-where spec.two_part: of the rows --compose-prob picks, only those whose (nested) manifest field is
    true compose; a missing or false field trains the whole clip. The logged counts follow."""
    marked = [{**r, "spec": {"two_part": i % 2 == 0}} for i, r in enumerate(case["rows"])]
    marked[3].pop("spec")  # no field at all: never composed
    (case["dir"] / "marked.jsonl").write_text("".join(json.dumps(r) + "\n" for r in marked))
    proc = data.Processor(case["base"], max_frames=12)
    rows = data.VideoTextDataset(case["dir"] / "marked.jsonl", proc, compose_prob=1.0, compose_where="spec.two_part")
    assert [rows.composed(r) for r in rows.rows] == [True, False, True, False]
    every = data.VideoTextDataset(case["dir"] / "marked.jsonl", proc, compose_prob=1.0)
    assert [every.composed(r) for r in every.rows] == [True] * 4
    run = tmp_path / "where"
    train.main(run_args(case, run, "--steps", 2, "--batch", 4, "--accum", 1, "--compose-prob", 1.0,
                        "--compose-where", "spec.two_part", manifest="marked.jsonl"))
    assert log(run, "composed") == [2, 2]


def F_ce(logits, labels) -> float:
    keep = labels != -100
    return torch.nn.functional.cross_entropy(logits[keep], labels[keep]).item()


def test_hidden_state_cache_skips_the_vlm_and_changes_nothing(case, tmp_path):
    """--cache-hidden-mb: a video's hidden states are computed once, whatever batch (and padding) it comes in,
    composed segments included; training with the cache logs the same losses as without it."""
    proc, vlm = data.Processor(case["base"], max_frames=12), M.load_model(case["base"])
    rows = data.VideoTextDataset(case["dir"] / "m.jsonl", proc, compose_prob=0.5, seed=3)
    cache = train.HiddenCache(100)
    calls = []
    vlm.register_forward_hook(lambda *a: calls.append(1))
    full = rows.collate([rows[i] for i in range(4)])
    cache.encode(vlm, full["ctx_ids"], full["ctx_pixels"], full["ctx_mask"], full["ctx_keys"])
    assert len(cache.store) == len(full["ctx_keys"]) == 4 + sum(map(rows.composed, rows.rows)) and len(calls) == 1
    for order in ([3, 1], [2, 0, 1]):  # other batches, other padding: served from the cache, same states
        b = rows.collate([rows[i] for i in order])
        H = cache.encode(vlm, b["ctx_ids"], b["ctx_pixels"], b["ctx_mask"], b["ctx_keys"])
        with torch.no_grad():
            want = torch.stack(vlm(b["ctx_ids"], b["ctx_pixels"], b["ctx_mask"], output_hidden_states=True,
                                   logits="none").hidden_states, 1)
        keep = b["ctx_mask"].bool()[:, None, :, None].expand_as(H)
        torch.testing.assert_close(H[keep], want[keep], rtol=1e-4, atol=1e-5)
        assert H[~keep].abs().sum() == 0
    assert len(calls) == 3 and cache.hits == 2  # two reference passes above, no new encode by the cache
    runs = []
    for i, extra in enumerate(([], ["--cache-hidden-mb", 50])):
        runs.append(tmp_path / f"r{i}")
        train.main(run_args(case, runs[-1], "--steps", 4, "--batch", 4, "--accum", 1, "--lr", 1e-3,
                            "--compose-prob", 0.5, "--val", case["dir"] / "m.jsonl", "--val-every", 2, *extra))
    assert log(runs[1]) == pytest.approx(log(runs[0]), rel=1e-4)
    assert log(runs[1], "val_ce") == pytest.approx(log(runs[0], "val_ce"), rel=1e-4)


def test_cache_keeps_the_teachers_answer_logits(case, tmp_path):
    """With --kl-weight and --cache-hidden-mb, the in-context teacher's answer logits of a row are computed once,
    whatever batch (and padding) it comes in; training logs the same CE and KL as without the cache."""
    proc, vlm = data.Processor(case["base"], max_frames=12), M.load_model(case["base"])
    rows = data.VideoTextDataset(case["dir"] / "m.jsonl", proc, teacher_view=True)
    cache, calls = train.HiddenCache(100), []
    vlm.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        cache.teacher(vlm, rows.collate([rows[i] for i in range(4)]))
        assert len(calls) == 1 and len(cache.store) == 4
        for order in ([3, 1], [2, 0, 1]):
            b = rows.collate([rows[i] for i in order])
            got = cache.teacher(vlm, b)
            logits = vlm(b["t_ids"], b["pixel_values"], b["t_mask"]).logits[:, :-1]
            want = logits[b["t_labels"][:, 1:] != -100]
            assert got.shape == want.shape and got.shape[0] > len(order)  # every answer token of every row
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert len(calls) == 3 and cache.hits == 2
    runs = []
    for i, extra in enumerate(([], ["--cache-hidden-mb", 50])):
        runs.append(tmp_path / f"r{i}")
        train.main(run_args(case, runs[-1], "--steps", 4, "--batch", 4, "--accum", 1, "--lr", 1e-3,
                            "--kl-weight", 0.5, *extra))
    assert log(runs[1]) == pytest.approx(log(runs[0]), rel=1e-4)
    assert log(runs[1], "kl") == pytest.approx(log(runs[0], "kl"), rel=1e-4)
