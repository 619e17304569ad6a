#!/usr/bin/env bash
# Rebuild the shipped toy world from nothing: clips, the tiny base VLM, teacher targets, the tiny hypernetwork,
# then score it. About 45 min on a 2-core CPU: clips ~1 min, base ~19 min, teacher ~5 min, hypernetwork ~18 min,
# fidelity 1 min. Every hyper-parameter is in toy/recipes/*.toml, each with its reason.
# Resumable: rerun after an interruption. The clip writer and the teacher skip finished work; the base (every 200
# stage-2 steps) and the hypernetwork (every 250 steps) continue from their last save. Every stage exits non-zero
# when it fails or is stopped (128 + signal after Ctrl-C or SIGTERM), and the script stops there: the shipped
# checkpoints are replaced only at the very end, both at once, from runs that finished.
# The teacher targets and the hypernetwork are kept under runs/toy/<base fingerprint>/, so a rebuilt base never
# meets the teacher answers or the hypernetwork of another one.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}   # the times above: 2 threads on an idle 2-core machine
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'rm -rf checkpoints/tiny.tmp' EXIT                # a copy cut short never stays beside the shipped pair
# A swap cut short between its two renames: put the shipped pair back first.
if [ -d checkpoints/tiny.old.tmp ] && [ ! -d checkpoints/tiny ]; then mv checkpoints/tiny.old.tmp checkpoints/tiny; fi
rm -rf checkpoints/tiny.old.tmp

python -m toy.world clips --split train --n 1500 --out data/toy/train
python -m toy.world clips --split heldout --n 300 --out data/toy/heldout
python -m toy.world example --out examples/clip.mp4

# The base: toy/recipes/base.toml. All 2400 steps took 18.8 min on the machine the shipped base was trained on;
# the recipe's 19.5-min guard stops stage 2 early on a slower one. training.json appears only with a finished model.
if [ ! -f runs/toy/base/training.json ]; then
    resume=(); [ -f runs/toy/base/resume/state.json ] && resume=(--resume)
    python -m toy.base --out runs/toy/base ${resume[@]+"${resume[@]}"}
fi
base_id=$(cat runs/toy/base/config.json runs/toy/base/model.safetensors | sha256sum | cut -c1-12)
keyed=runs/toy/base-$base_id
echo "base fingerprint $base_id: teacher targets and hypernetwork in $keyed"

python train.py teacher --model runs/toy/base --manifest data/toy/train/manifest.jsonl \
    --out "$keyed/teacher.jsonl" --batch 32 --max-new-tokens 24

# The hypernetwork: toy/recipes/hypernet.toml (the defaults of --size tiny). Its 6000-step cosine schedule is cut at
# step 3500; best/ keeps the lowest validation CE (step 3000 for the shipped one).
resume=(); [ -d "$keyed/hypernet/latest" ] && resume=(--resume)   # an interrupted run goes on from its checkpoint
python train.py --recipe toy/recipes/hypernet.toml --model runs/toy/base --train "$keyed/teacher.jsonl" \
    --val data/toy/heldout/manifest.jsonl --out "$keyed/hypernet" --stop-at 3500 ${resume[@]+"${resume[@]}"}

# Ship the pair: staged beside the shipped one, then swapped in with two renames.
rm -rf checkpoints/tiny.tmp
mkdir -p checkpoints/tiny.tmp/hypernet
cp -r runs/toy/base checkpoints/tiny.tmp/base
cp "$keyed/hypernet/best/hypernet.safetensors" "$keyed/hypernet/best/hypernet.json" checkpoints/tiny.tmp/hypernet/
if [ -d checkpoints/tiny ]; then mv checkpoints/tiny checkpoints/tiny.old.tmp; fi
mv checkpoints/tiny.tmp checkpoints/tiny
rm -rf checkpoints/tiny.old.tmp

python -m toy.fidelity
