"""eval.py: each reader on a file in its benchmark's published format (clips written here), the metrics and the
statistics against hand-computed cases and the code they replace, the LLM judge against a local HTTP server, and the
resumable, sharded answers file end to end on the shipped tiny checkpoints."""
import csv
import http.server
import json
import threading

import numpy as np
import pytest

import eval as ev
from conftest import write_clip
from toy import world


def clips(folder, *names):
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        write_clip(folder / name, n=30, rate=10)  # 3 s
    return folder


# ------------------------------------------------------------------------------------------------ readers
def test_activitynet_captions_one_item_per_timestamped_sentence_each_its_own_segment(tmp_path):
    # captions.zip val_1.json: {video_id: {duration, timestamps, sentences}}; sentences keep their leading space
    ann = {"v_AAA": {"duration": 3.0, "timestamps": [[0.0, 1.5], [1.0, 9.0]], "sentences": ["A man runs.", "  He stops."]},
           "v_BBB": {"duration": 3.0, "timestamps": [[2.0, 2.0]], "sentences": ["Nothing."]},
           "v_CCC": {"duration": 3.0, "timestamps": [[0.5, 2.5]], "sentences": ["A dog sits."]}}
    (tmp_path / "val_1.json").write_text(json.dumps(ann))
    clips(tmp_path, "v_AAA.mp4", "CCC.mkv")                       # found with or without the "v_" prefix
    items = ev.read_items("activitynet-captions", [tmp_path / "val_1.json"])
    assert [(it.id, it.start, it.end, it.references) for it in items] == [
        ("v_AAA#0", 0.0, 1.5, ("A man runs.",)), ("v_AAA#1", 1.0, 3.0, ("He stops.",)),  # end clamped to duration
        ("v_CCC#0", 0.5, 2.5, ("A dog sits.",))]                                       # zero-length span dropped
    kept, missing = ev.resolve(items, tmp_path)
    assert [k.video for k in kept] == [str(tmp_path / "v_AAA.mp4")] * 2 + [str(tmp_path / "CCC.mkv")] and missing == []


def test_activitynet_qa_reads_the_question_and_answer_files(tmp_path):
    # MILVLG/activitynet-qa dataset/val_q.json and val_a.json
    q = [{"video_name": "TIEzvhv6xaI", "question": "is the athlete playing indoor", "question_id": "v_TIEzvhv6xaI_2"},
         {"video_name": "7X3wPRKuAsU", "question": "what color is the ball", "question_id": "v_7X3wPRKuAsU_3"}]
    a = [{"answer": "white", "type": 4, "question_id": "v_7X3wPRKuAsU_3"},
         {"answer": "yes", "type": 3, "question_id": "v_TIEzvhv6xaI_2"}]
    (tmp_path / "val_q.json").write_text(json.dumps(q))
    (tmp_path / "val_a.json").write_text(json.dumps(a))
    clips(tmp_path / "videos", "v_TIEzvhv6xaI.mp4")
    items = ev.read_items("activitynet-qa", [tmp_path / "val_q.json"])   # the _a file is found beside it
    assert [(it.id, it.prompt, it.references, it.kind) for it in items] == [
        ("v_TIEzvhv6xaI_2", "is the athlete playing indoor", ("yes",), "yes/no"),
        ("v_7X3wPRKuAsU_3", "what color is the ball", ("white",), "color")]
    kept, missing = ev.resolve(items, tmp_path / "videos")
    assert [k.id for k in kept] == ["v_TIEzvhv6xaI_2"] and missing == ["v_7X3wPRKuAsU"]


def test_nextqa_open_ended_csv_with_the_video_map_and_the_added_references(tmp_path):
    # NExT-OE dataset/nextqa/test.csv, NExT-QA map_vid_vidorID.json, NExT-OE add_reference_answer_test.json
    with open(tmp_path / "test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "frame_count", "width", "height", "question", "answer", "qid", "type"])
        w.writerow(["4924794333", "1058", "640", "360", "is the baby old enough to converse", "no", "4", "DB"])
        w.writerow(["3747890905", "1152", "640", "360", "how does the adult get rid of the food", "uses the spoon", "8", "CH"])
    (tmp_path / "map_vid_vidorID.json").write_text(json.dumps({"4924794333": "0000/4924794333",
                                                               "3747890905": "1101/3747890905"}))
    (tmp_path / "add_reference_answer_test.json").write_text(json.dumps({"3747890905": {"8": "wipe with spoon"}}))
    clips(tmp_path / "NExTVideo", "0000/4924794333.mp4", "1101/3747890905.mp4")
    items = ev.read_items("nextqa", [tmp_path / "test.csv"])
    assert [(it.id, it.references, it.kind) for it in items] == [
        ("4924794333_4", ("no",), "DB"), ("3747890905_8", ("uses the spoon", "wipe with spoon"), "CH")]
    kept, _ = ev.resolve(items, tmp_path / "NExTVideo")
    assert kept[1].video == str(tmp_path / "NExTVideo" / "1101" / "3747890905.mp4")
    assert ev.token_f1("He wipes it with the spoon", kept[1].references) == pytest.approx(2 * 2 / (5 + 3))


def test_vdc_gives_one_item_per_caption_style(tmp_path):
    # VDC_1k.jsonl as AuroraCap's post_eval reads it: {"video_id", "captions": {"<style>_caption": ...}}
    caps = {f"{s}_caption": f"the {s} caption" for s in ("short", "detailed", "background", "main_object", "camera")}
    (tmp_path / "VDC_1k.jsonl").write_text(json.dumps({"video_id": "abc123", "captions": caps}) + "\n")
    items = ev.read_items("vdc", [tmp_path / "VDC_1k.jsonl"])
    assert {it.kind: it.references for it in items} == {s: (f"the {s} caption",) for s in ev.VDC_PROMPTS}
    assert len({it.prompt for it in items}) == 5 and {it.video for it in items} == {"abc123"}


def test_generic_jsonl_and_its_errors(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text('{"video": "a.mp4", "prompt": "What?", "references": ["x", "y"], "start": 1, "end": 2.5}\n\n'
                 '{"video": "b.mp4", "prompt": "Who?", "references": ["z"], "id": "q7", "kind": "who"}\n')
    a, b = ev.read_items("jsonl", [f])
    assert (a.id, a.start, a.end, a.references) == ("line1", 1.0, 2.5, ("x", "y"))
    assert (b.id, b.kind, b.start) == ("q7", "who", None)
    f.write_text('{"video": "a.mp4", "prompt": "What?", "references": "x"}\n')
    with pytest.raises(ev.EvalError, match=r"mine.jsonl:1: needs .* a list of strings"):
        ev.read_items("jsonl", [f])
    f.write_text('{"video": "a.mp4",\n')
    with pytest.raises(ev.EvalError, match=r"mine.jsonl:1: not JSON"):
        ev.read_items("jsonl", [f])


def test_bad_annotations_are_one_line_errors(tmp_path):
    (tmp_path / "q.json").write_text("[1, 2")
    (tmp_path / "wrong.json").write_text(json.dumps({"v_A": {"duration": 3}}))
    for bench, path, msg in [("activitynet-qa", tmp_path / "q.json", "unreadable annotation file"),
                             ("activitynet-captions", tmp_path / "nope.json", "unreadable annotation file"),
                             ("activitynet-captions", tmp_path / "wrong.json", "not in activitynet-captions's format"),
                             ("kinetics", tmp_path / "q.json", "unknown benchmark 'kinetics'")]:
        with pytest.raises(ev.EvalError, match=msg) as e:
            ev.read_items(bench, [path])
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ metrics
def test_squad_token_f1_and_exact_match_by_hand():
    # "The cat sat on the mat." -> "cat sat on mat" (4 tokens) vs "cat sat": 2 shared, P 1/2, R 1 -> F1 2/3
    assert ev.token_f1("The cat sat on the mat.", ["a cat sat"]) == pytest.approx(2 / 3)
    assert ev.token_f1("yes yes no", ["yes"]) == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))  # bag of words
    assert ev.token_f1("blue", ["red", "Blue!"]) == 1.0 and ev.token_f1("blue", ["red"]) == 0.0  # max over refs
    assert ev.token_f1("", ["the"]) == 1.0 and ev.token_f1("", ["red"]) == 0.0   # empty after normalising
    assert ev.exact_match("The  Cat!", ["cat"]) == 1.0 and ev.exact_match("a cat sat", ["cat"]) == 0.0
    assert ev.normalize("An apple, the pear; a-b") == "apple pear ab"


def test_first_word_is_the_toy_worlds_rule():
    spec = world.clip_spec("heldout", 0)
    answers = ["Red.", "red circle", "a red", "RED!", "", "circle", world.caption(spec), world.caption(spec) + " more"]
    for _, _, expected in world.questions(spec):
        for a in answers + [expected, expected.upper()]:
            assert ev.first_word(a, [expected]) == float(world.score(a, expected)), (a, expected)


# ------------------------------------------------------------------------------------------------ statistics
def test_paired_bootstrap_on_a_case_computed_by_hand():
    # d = adapter - in context = [0, 0, 0, -1]: a resample's mean is -k/4 with k ~ Binomial(4, 1/4):
    # P(k=0) .316, P(k<=2) .949, P(k<=3) .996 -> the 2.5 % point is 0 and the 97.5 % point -0.75.
    d, lo, hi = ev.paired_bootstrap([1, 1, 1, 0], [1, 1, 1, 1])
    assert (d, lo, hi) == (-0.25, -0.75, 0.0)
    assert ev.verdicts(lo, hi, 0.8) == {"NI": True, "Eq": True}
    assert ev.verdicts(lo, hi, 0.75) == {"NI": False, "Eq": False}      # strict: CI_low must exceed -delta
    assert ev.verdicts(0.01, 0.3, 0.3) == {"NI": True, "Eq": False}      # non-inferior, not equivalent
    assert ev.paired_bootstrap([1, 0], [0, 0]) == (0.5, 0.0, 1.0)          # means 0, .5, 1 w.p. 1/4, 1/2, 1/4


def one_shot_paired_ci(a, b, n_boot=4000, seed=0):
    """The toy fidelity benchmark's original bootstrap (every resample drawn at once), whose numbers the toy README
    quotes: eval.paired_bootstrap, which draws 256 resamples at a time to bound memory, must give the same."""
    rng = np.random.default_rng(seed)
    d = np.asarray(a, float) - np.asarray(b, float)
    boots = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    return float(d.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def test_paired_bootstrap_is_the_one_the_toy_fidelity_benchmark_used():
    rng = np.random.default_rng(3)
    for n in (7, 301, 1128):  # odd and even sizes: drawing 256 resamples at a time keeps numpy's stream
        a, b = rng.random(n) < 0.9, rng.random(n) < 0.95
        assert ev.paired_bootstrap(a, b) == one_shot_paired_ci(a, b)
        assert ev.paired_bootstrap(a, b, 1001, 5) == one_shot_paired_ci(a, b, 1001, 5)


def test_pairing_narrows_the_interval():
    rng = np.random.default_rng(1)
    b = rng.random(2000) < 0.8
    assert ev.paired_bootstrap(b, b) == (0.0, 0.0, 0.0)          # the same answers: no difference, no spread
    a = b.copy()
    a[np.flatnonzero(b)[:100]] = False                          # 100 of 2000 answers lost: exactly -0.05
    d, lo, hi = ev.paired_bootstrap(a, b)
    assert d == -0.05 and lo < d < hi and hi <= 0 and lo > -0.07
    _, lo2, hi2 = ev.paired_bootstrap(rng.permutation(a), b)    # same marginal accuracies, unpaired noise
    assert hi2 - lo2 > 2 * (hi - lo)


def test_cluster_bootstrap_resamples_whole_videos():
    rng = np.random.default_rng(0)
    a, b = rng.random(50), rng.random(50)
    twice = ev.paired_bootstrap(np.repeat(a, 2), np.repeat(b, 2), groups=np.repeat(np.arange(50), 2))
    assert twice == pytest.approx(ev.paired_bootstrap(a, b))     # two identical questions per video = one
    items = ev.paired_bootstrap(np.repeat(a, 2), np.repeat(b, 2))
    assert items[2] - items[1] < twice[2] - twice[1]              # treating them as independent understates the CI


def test_statistics_rows_with_a_relative_margin():
    recs = [{"id": str(i), "kind": "k" if i % 2 else "j", "video": f"v{i}", "condition": c, "scores": {"f1": s}}
            for i, (x, y) in enumerate([(0.5, 0.4), (0.3, 0.3), (0.6, 0.7), (0.2, 0.1)])
            for c, s in (("video", x), ("adapter", y), ("text", 0.0))]
    args = ev.parse_args(["jsonl", "--margin-rel", "0.5"])
    rows = ev.statistics(recs, ["f1"], args)
    assert [(r["kind"], r["n"]) for r in rows] == [("all", 4), ("j", 2), ("k", 2)]
    top = rows[0]
    assert top["video"] == pytest.approx(0.4) and top["adapter"] == pytest.approx(0.375) and top["text"] == 0.0
    assert top["diff"] == pytest.approx(-0.025) and top["delta"] == pytest.approx(0.2)   # 0.5 x in-context mean
    assert top["NI"] == (top["ci"][0] > -0.2) and "| f1 | all | 4 | 0.400 | 0.375 | 0.000 | -0.025 |" in ev.table(rows)
    # Without a text-only answer the column is left empty; by video: the questions of one video move together.
    recs = [dict(r, video="v0" if r["id"] in "01" else "v1") for r in recs if r["condition"] != "text"]
    top = ev.statistics(recs, ["f1"], ev.parse_args(["jsonl", "--bootstrap-unit", "video"]))[0]
    assert "text" not in top and top["diff"] == pytest.approx(-0.025)
    d = [-0.1, 0.0, 0.1, -0.1]
    assert top["ci"] == pytest.approx(ev.paired_bootstrap(d, [0] * 4, groups=["v0", "v0", "v1", "v1"])[1:])


# ------------------------------------------------------------------------------------------------ judge
class Judge:
    """A local OpenAI-compatible endpoint: replies[i] is (status, content) for the i-th request (the last repeats)."""

    def __init__(self, replies, delay=0.0):
        self.replies, self.requests = replies, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, self.headers.get("Authorization"), body))
                status, content = outer.replies[min(len(outer.requests), len(outer.replies)) - 1]
                threading.Event().wait(delay)
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True      # close() does not wait for a handler still sleeping
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def no_backoff(monkeypatch):
    monkeypatch.setattr(ev, "JUDGE_BACKOFF_S", 0.0)


def test_judge_prompt_rescaling_and_key(no_backoff):
    j = Judge([(200, '{"score": 4}')])
    try:
        assert ev.judge("What color?", ["red", "crimson"], "It is red.", j.url, "m1", "sk-test", 5, 0) == 0.8
        path, auth, body = j.requests[0]
        assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and body["model"] == "m1"
        assert body["temperature"] == 0 and "- red\n- crimson" in body["messages"][0]["content"]
        assert "Answer to grade: It is red." in body["messages"][0]["content"]
    finally:
        j.close()


def test_judge_retries_then_fails_in_one_line(no_backoff):
    j = Judge([(503, ""), (200, "I'd say 5 out of 5")])     # a server error is retried; a bare number is read
    try:
        assert ev.judge("q", ["a"], "a", j.url, "m", None, 5, 2) == 1.0 and len(j.requests) == 2
        assert j.requests[0][1] is None                      # no key: no Authorization header
    finally:
        j.close()
    for replies, msg in [([(401, "")], "HTTP 401"), ([(200, "no idea")], "reply without a 0-5 score"),
                         ([(200, '{"score": 9}')], "reply without a 0-5 score")]:
        j = Judge(replies)
        try:
            with pytest.raises(ev.EvalError, match=msg) as e:
                ev.judge("q", ["a"], "a", j.url, "m", None, 5, 2)
            assert "\n" not in str(e.value) and len(j.requests) == (1 if "401" in msg else 3)
        finally:
            j.close()
    j = Judge([(200, '{"score": 3}')], delay=0.5)
    try:
        with pytest.raises(ev.EvalError, match=r"timed out \(after 2 tries\)"):
            ev.judge("q", ["a"], "a", j.url, "m", None, 0.2, 1)
    finally:
        j.close()


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Three clips, one missing video, one segment item; the generic JSONL format."""
    d = tmp_path_factory.mktemp("bench")
    clips(d, "a.mp4", "b.mp4", "c.mp4")
    rows = [{"video": "a.mp4", "prompt": "What color is the square?", "references": ["red"], "kind": "color"},
            {"video": "a.mp4", "prompt": "What shape is it?", "references": ["square"], "kind": "shape"},
            {"video": "b.mp4", "prompt": "What color is the square?", "references": ["blue"], "kind": "color",
             "start": 1.0, "end": 2.5},
            {"video": "c.mp4", "prompt": "Describe the video.", "references": ["a grey frame"], "kind": "caption"},
            {"video": "gone.mp4", "prompt": "What?", "references": ["x"]}]
    (d / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def run_eval(bench, out, *extra):
    ev.main(["jsonl", "--annotations", str(bench / "bench.jsonl"), "--out", str(out), "--max-new-tokens", "6",
             "--batch", "2", *extra])


def test_answers_are_appended_resumed_and_reported(bench, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    run_eval(bench, out)
    cap = capsys.readouterr()
    assert "1 of 4 videos not found" in cap.err and "gone" in cap.err
    assert (out / "missing_videos.txt").read_text() == "gone.mp4\n"
    recs = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["condition"]) for r in recs) == sorted(
        (f"line{i}", c) for i in range(1, 5) for c in ("video", "adapter", "text"))
    assert all(isinstance(r["answer"], str) and r["new_tokens"] <= 6 for r in recs)
    assert len(list((out / "adapters").glob("*.safetensors"))) == 3          # one per (video, span): a, b[1,2.5), c
    assert "| f1 | all | 4 |" in cap.out and (out / "report.md").read_text() == cap.out
    # A rerun answers nothing and internalizes nothing; a cut-short last line is answered again, alone.
    calls = []
    monkeypatch.setattr(ev, "internalize", lambda *a, **k: calls.append("internalize"))
    real = ev.generate
    monkeypatch.setattr(ev, "generate", lambda m, jobs, n: calls.append(len(jobs)) or real(m, jobs, n))
    run_eval(bench, out)
    assert calls == []
    raw = (out / "answers.jsonl").read_bytes()
    (out / "answers.jsonl").write_bytes(raw[:-9])
    run_eval(bench, out)
    assert calls == [1] and (out / "answers.jsonl").read_bytes().count(b"\n") == 12
    assert [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()][-1]["id"] == recs[-1]["id"]
    # Other settings in the same folder are refused before anything is written.
    with pytest.raises(SystemExit, match=r"error: .* holds answers made with other settings \(max_new_tokens 6 vs 9\)"):
        ev.main(["jsonl", "--annotations", str(bench / "bench.jsonl"), "--out", str(out), "--max-new-tokens", "9"])


def test_ranks_split_the_videos_and_whichever_completes_the_set_prints_the_table(bench, tmp_path, monkeypatch,
                                                                                 capsys):
    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")                # rank 1 first (or alone, after a crash): it cannot print the table
    run_eval(bench, out)
    cap = capsys.readouterr()
    assert "rank 1 done; 9 answers of other ranks to come" in cap.err and "| f1 |" not in cap.out
    monkeypatch.setenv("RANK", "0")
    run_eval(bench, out)
    assert "| f1 | all | 4 |" in capsys.readouterr().out
    videos = [{r["video"] for r in ev.read_records(out / f"answers.rank{k}.jsonl")} for k in (0, 1)]
    assert videos == [{str(bench / "a.mp4"), str(bench / "c.mp4")}, {str(bench / "b.mp4")}]   # every 2nd video
    assert not (out / "answers.jsonl").exists() and len(ev.answer_records(out)) == 12


def test_the_judge_grades_each_answer_once(bench, tmp_path, capsys, monkeypatch, no_backoff):
    out = tmp_path / "out"
    out.mkdir()
    with ev.open_append(out / "answers.jsonl") as f:
        for i, c in [(i, c) for i in range(3) for c in ev.CONDITIONS]:
            ev.append(f, {"id": f"q{i}", "condition": c, "kind": "", "video": "v", "prompt": "p",
                          "references": ["red"], "answer": f"{c} {i}"})
    monkeypatch.setenv("MY_KEY", "k")
    j = Judge([(200, '{"score": 5}')])
    try:
        for _ in range(2):
            ev.main(["jsonl", "--out", str(out), "--report", "--judge-url", j.url, "--judge-model", "m",
                     "--judge-key-env", "MY_KEY"])
        assert len(j.requests) == 9 and {r[1] for r in j.requests} == {"Bearer k"}     # the rerun used the cache
        assert "| judge | all | 3 | 1.000 | 1.000 | 1.000 | +0.000 |" in capsys.readouterr().out
    finally:
        j.close()


def test_user_errors_are_one_line_and_write_nothing(bench, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "none.jsonl").write_text(json.dumps({"video": "gone.mp4", "prompt": "p", "references": ["x"]}) + "\n")
    cases = [(["kinetics", "--annotations", str(bench / "bench.jsonl")], "unknown benchmark 'kinetics'"),
             (["jsonl"], "jsonl needs --annotations FILE"),
             (["jsonl", "--annotations", str(tmp_path / "nope.jsonl")], "unreadable annotation file"),
             (["jsonl", "--annotations", str(tmp_path / "none.jsonl")], "none of the 1 videos found"),
             (["jsonl", "--annotations", str(bench / "bench.jsonl"), "--videos", str(tmp_path / "x")], "no such folder"),
             (["jsonl", "--annotations", str(bench / "bench.jsonl"), "--metrics", "bleu"], "unknown metric"),
             (["jsonl", "--report"], "no answers yet")]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            ev.main([*argv, "--out", str(out)])
        assert str(e.value).startswith("error: ") and msg in str(e.value) and "\n" not in str(e.value), argv
    assert not out.exists()
