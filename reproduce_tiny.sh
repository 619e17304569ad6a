#!/usr/bin/env bash
# Rebuild the shipped toy world from nothing: clips, the tiny base VLM, teacher targets, the tiny hypernetwork,
# then score it. About 45 min on a 2-core CPU: clips ~1 min, base ~19 min, teacher ~5 min, hypernetwork ~18 min,
# fidelity 1 min. Resumable: the clip writer and the teacher step skip finished work, and the hypernetwork
# continues from its last checkpoint (every 250 steps) when rerun with --resume; rerun after an interruption.
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}   # the times above: 2 threads on an idle 2-core machine

python toyworld.py clips --split train --n 1500 --out data/toy/train
python toyworld.py clips --split heldout --n 300 --out data/toy/heldout
python toyworld.py example --out examples/clip.mp4

# -> checkpoints/tiny/base. The defaults are the shipped recipe: questions as branches after the video plus a gist
# branch (--chat branched --gist), dense motion and shape objectives, every answer weighted alike (--loss-per answer),
# each step in 4 length-sorted chunks (--chunks 4). All 2400 steps took 18.8 min on the machine the shipped base was
# trained on; the default --minutes 19.5 guard stops stage 2 early on a slower one.
python toy_base.py --train data/toy/train/manifest.jsonl --val data/toy/heldout/manifest.jsonl

python train.py teacher --size tiny --manifest data/toy/train/manifest.jsonl --out data/toy/train/teacher.jsonl \
    --batch 32 --max-new-tokens 24
# A 6000-step cosine schedule cut at step 3500 (best/ keeps the lowest validation CE: step 3000 for the shipped one); the perceiver's output is
# standardised over each batch (--out-norm batch); from step 2000 the two-part clips' rows train through the
# composition of their two halves' adapters (README).
resume=(); [ -d runs/toy/latest ] && resume=(--resume)   # an interrupted run goes on from its last checkpoint
python train.py --size tiny --train data/toy/train/teacher.jsonl --val data/toy/heldout/manifest.jsonl \
    --out runs/toy --latent-size 128 --n-latents 16 --num-blocks 2 --n-heads 4 --head-dim 32 --n-kv-heads 2 \
    --rank 16 --proj-mult 2 --lr 5e-4 --batch 16 --accum 1 --steps 6000 --stop-at 3500 --val-every 250 --save-every 250 \
    --val-rows 300 --workers 0 --init lora --kl-weight 1 --cache-mb 6000 --cache-hidden-mb 6000 --compose-prob 1 \
    --compose-where spec.two_part --compose-from 2000 --out-norm batch ${resume[@]+"${resume[@]}"}
mkdir -p checkpoints/tiny/hypernet
cp runs/toy/best/hypernet.safetensors runs/toy/best/hypernet.json checkpoints/tiny/hypernet/

python benchmarks/fidelity.py
