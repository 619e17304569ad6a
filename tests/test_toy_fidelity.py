"""toy/fidelity.py: the paired bootstrap and its verdicts, and one small run of the whole protocol on the
shipped toy checkpoints (clips written on the fly, every condition and the composition table reported)."""
import json

import numpy as np

from toy import fidelity as F


def test_fidelity_runs_the_protocol_end_to_end(tmp_path, capsys):
    F.main(["--clips", "6", "--two-part-clips", "2", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    report = capsys.readouterr().out
    assert (tmp_path / "out" / "fidelity.md").read_text() == report[:-1]    # print adds the last newline
    result = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    conditions = {"in context", "adapter", "text only", "other clip's adapter"}
    assert set(result["accuracy"]) == conditions
    for acc in result["accuracy"].values():
        assert set(acc) == {"color", "shape", "direction", "count", "caption", "caption_token_f1", "overall"}
        assert all(0 <= v <= 1 for v in acc.values())
    v = result["verdict"]
    assert v["ci"][0] <= v["delta"] <= v["ci"][1] and v["equivalent"] <= v["non_inferior"]
    comp = {"in context", "whole-clip adapter", "composed halves", "own half's adapter"}
    assert set(result["composition"]) == comp | {"per_kind"} and set(result["composition"]["per_kind"]) == comp
    assert "| **overall (QA kinds)** |" in report and "| two-part clips |" in report
    assert "| caption (token F1) | 6 |" in report
    assert "6 held-out clips" in report and "2 two-part clips" in report
    assert "| direction | 4 |" in report  # one direction question per object: 2 clips x 2 objects
    assert "| clips by | bin | questions | in context | adapter |" in report and set(result["by_range"]) == set(F.RANGES)


def test_subject_is_the_object_a_question_names():
    spec = F.world.clip_spec("heldout", 0, two_part=True)
    for kind, prompt, answer in F.world.questions(spec):
        if kind in ("color", "shape", "direction"):
            o = spec.objects[F.subject(spec, prompt)]
            assert answer == {"color": o.color, "shape": o.shape, "direction": o.direction}[kind]


def test_by_range_bins_partition_every_spec_range_and_score_each_bin():
    from toy import world
    specs = [world.sample_clip(seed) for seed in range(300)]
    rng = np.random.default_rng(0)
    hits = {"in context": rng.random(300) < 0.9, "adapter": rng.random(300) < 0.5}
    table, result = F.by_range(specs, hits)
    assert set(result) == set(F.RANGES)
    for label, (value, _) in F.RANGES.items():
        assert sum(b["questions"] for b in result[label].values()) == 300  # every clip in exactly one bin
    side = np.array([min(s.width, s.height) for s in specs])
    low = (side >= 32) & (side < 96)
    assert result["shorter side (px)"]["32–96"]["adapter"] == hits["adapter"][low].mean()
    assert set(result["objects"]) == {"1", "2"} and set(result["fps"]) == {"4–10", "10–20", "20–30"}
    assert "| duration (s) | 6–8 |" in table
