#!/usr/bin/env bash
# Rebuild the shipped toy world from nothing: clips, the tiny base VLM, teacher targets, the tiny hypernetwork,
# then score it. About 45 min on a 2-core CPU (the two trainings are capped at ~20 min each). Resumable: the clip
# writer and the teacher step skip finished work; rerun after an interruption.
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread avoids OpenMP stalls when anything else shares the CPU

python toyworld.py clips --split train --n 1500 --out data/toy/train
python toyworld.py clips --split heldout --n 300 --out data/toy/heldout
python toyworld.py example --out examples/clip.mp4

python toy_base.py --train data/toy/train/manifest.jsonl --val data/toy/heldout/manifest.jsonl   # -> checkpoints/tiny/base

python train.py teacher --size tiny --manifest data/toy/train/manifest.jsonl --out data/toy/train/teacher.jsonl \
    --batch 32 --max-new-tokens 24
python train.py --size tiny --train data/toy/train/teacher.jsonl --val data/toy/heldout/manifest.jsonl \
    --out runs/toy --latent-size 128 --n-latents 8 --num-blocks 2 --n-heads 4 --head-dim 32 --n-kv-heads 2 \
    --rank 8 --lr 1e-3 --batch 16 --accum 1 --steps 1000 --val-every 250 --val-rows 300 --workers 0 --init lora
mkdir -p checkpoints/tiny/hypernet
cp runs/toy/best/hypernet.safetensors runs/toy/best/hypernet.json checkpoints/tiny/hypernet/

python benchmarks/fidelity.py
