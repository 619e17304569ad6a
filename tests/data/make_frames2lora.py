"""Copy what the tests need from the shared Frames2LoRA fixtures into tests/data (run from the repository root):

    python tests/data/make_frames2lora.py [--shared ../shared/fixtures]   # the folder the lead checkout sits beside

frames2lora/         the authors' tiny checkpoint as it is, their reference JSON as it is, and their reference tensors
                     minus lora.down_proj.{A,B}_generated (asserted equal to rows 0..15 of the injected A and B first)
frames2lora-inputs/  the three clips as they are, and per clip the facts the tests compare against (frame indices,
                     timestamps, sha256 of the decoded frames and of the pixels, whole and per frame, the rendered
                     text, the ids), but none of the 29 MB of pixels: the tests prove pixels equal through sha256.
"""
import argparse
import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=str(HERE.parents[1].parent / "shared" / "fixtures"))
    src = Path(p.parse_args().shared)

    out = HERE / "frames2lora"
    out.mkdir(exist_ok=True)
    for name in ("tiny-best-ce.pt", "tiny-reference.json"):
        shutil.copyfile(src / "frames2lora" / name, out / name)
    ref = load_file(src / "frames2lora" / "tiny-reference.safetensors")
    for k in "AB":  # generate_weights' output is the first r rows of what combine_lora injects: keep one copy
        assert torch.equal(ref.pop(f"lora.down_proj.{k}_generated"), ref[f"lora.down_proj.{k}"][:, :, :16])
    save_file(ref, out / "tiny-reference-subset.safetensors",
              metadata={"about": "subset of the Frames2LoRA tiny fixture's tiny-reference.safetensors, see README.md"})

    out = HERE / "frames2lora-inputs"
    (out / "clips").mkdir(parents=True, exist_ok=True)
    tensors = load_file(src / "frames2lora-inputs" / "frames2lora-inputs.safetensors")
    meta = json.loads((src / "frames2lora-inputs" / "frames2lora-inputs.json").read_text())
    clips = {}
    for name, c in meta["clips"].items():
        shutil.copyfile(src / "frames2lora-inputs" / c["clip"]["file"], out / c["clip"]["file"])
        clips[name] = {key: c[key] for key in ("frame_indices", "timestamps_s", "video_metadata", "decoded_sha256",
                                               "decoded_shape", "pixel_values_fp32_sha256", "pixel_values_shape",
                                               "text", "sequence_length", "n_image_tokens")}
        clips[name]["clip"] = {k: c["clip"][k] for k in ("file", "sha256", "width", "height", "fps", "frames")}
        clips[name]["input_ids"] = tensors[f"{name}.input_ids"][0].tolist()
        # Per frame, the sha256 of its float32 pixels (3, 512, 512), by the fixture's exact formula, so a test can
        # check a few frames bit for bit without resizing them all.
        u8 = tensors[f"{name}.frames_uint8"].permute(0, 3, 1, 2).double()
        pixels = (((u8 * (1 / 255)).float() - 0.5) / 0.5).contiguous()
        assert hashlib.sha256(pixels.numpy().tobytes()).hexdigest() == c["pixel_values_fp32_sha256"]
        clips[name]["pixel_values_fp32_sha256_per_frame"] = [hashlib.sha256(f.numpy().tobytes()).hexdigest()
                                                             for f in pixels]
        assert tensors[f"{name}.attention_mask"].all()
    facts = {"about": "subset of the Frames2LoRA inputs fixture (frames2lora-inputs.json), see README.md",
             "authors_commit": meta["authors_commit"], "versions": meta["versions_4_51_3"],
             "recipe": meta["recipe"], "clips": clips}
    (out / "inputs.json").write_text(json.dumps(facts) + "\n")


if __name__ == "__main__":
    main()
