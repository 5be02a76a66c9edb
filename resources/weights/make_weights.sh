#!/usr/bin/env bash
# Reproduces the shipped pretrained denoisers (Gaussian denoising on procedural phantoms; no third-party data).
# The shipped configs use norm = "none" (provably contractive); the GroupNorm weights are for model.norm = "group".
# The two norm = "none" files were re-made after spectral normalisation moved to 10 power iterations per weight
# change plus a final 300-iteration refresh (engine/pretrain.py); the GroupNorm file predates that and is kept
# as is because benchmarks/deq_step.py's published numbers were measured with it.
set -euo pipefail
cd "$(dirname "$0")/../.."
EQ=${EQ:-.venv/bin/equideq}
$EQ pretrain --config ct_phantom_quick --output resources/weights/resunet_c16_d2_none_sn_in1.pt --steps 1500 --size 64
$EQ pretrain --config ct_phantom_quick --set physics.modality=mri --output resources/weights/resunet_c16_d2_none_sn_in2.pt --steps 1500 --size 64
$EQ pretrain --config ct_phantom_quick --set model.norm=group --set model.lipschitz=0.95 --output resources/weights/resunet_c16_d2_group_sn_in1.pt --steps 1500 --size 64
