"""The shipped toy world: checkpoints load in ours and in transformers alike, and the README quick start runs."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

import data
from hypernet import load_hypernet
import model as M

ROOT = Path(__file__).resolve().parent.parent
CLIP = ROOT / "examples" / "clip.mp4"


def test_shipped_base_loads_in_transformers_with_equal_logits():
    from transformers import SmolVLMForConditionalGeneration

    ours = M.load_model(M.TINY_DIR)
    hf = SmolVLMForConditionalGeneration.from_pretrained(M.TINY_DIR).eval()
    proc = data.Processor(M.TINY_DIR)
    ids, pixels = proc.question_inputs("What color is the square?", video=CLIP)
    assert int((ids == proc.image_token_id).sum()) == pixels.shape[0] * proc.image_seq_len > 0
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels[None]).logits
    torch.testing.assert_close(ours(ids, pixels).logits, ref, atol=1e-5, rtol=0)


def test_shipped_hypernet_fits_the_shipped_base():
    base = M.load_model(M.TINY_DIR)
    hyper = load_hypernet(M.TINY_DIR.parent / "hypernet", base.config)
    assert hyper.config.targets == ("down_proj",) and hyper.config.num_layers == base.config.text.num_hidden_layers


def _quick_start_blocks() -> tuple[str, str]:
    """The quick start's command block and the expected-output block that follows it, in README order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w*)\n(.*?)\n```", section, re.S)
    assert len(blocks) >= 2 and blocks[0][0] == "bash", "README's quick start needs a bash block, then its output"
    return blocks[0][1], blocks[1][1]


def test_readme_quick_start_runs_and_prints_what_it_says(tmp_path):
    """Run the quick start's python commands exactly as written (install steps aside) from a scratch folder and
    compare every Q:/A: line with the expected output pasted in the README: the README cannot drift."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    block, output = _quick_start_blocks()
    commands = [c.strip() for c in block.split("&&")]
    stdout = ""
    for cmd in commands:
        argv = shlex.split(cmd)
        if argv[0] != "python" or argv[1] == "-m" or argv[1] == "pip":
            continue  # the venv and pip steps: CI has already installed the same requirements
        run = subprocess.run([sys.executable, str(ROOT / argv[1]), *argv[2:]], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        stdout += run.stdout
    expected = [line for line in output.splitlines() if line.startswith(("Q: ", "A: "))]
    assert expected, "the README's expected output lists no Q:/A: lines"
    assert [line for line in stdout.splitlines() if line.startswith(("Q: ", "A: "))] == expected
