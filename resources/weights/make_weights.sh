#!/usr/bin/env bash
# Reproduces the shipped pretrained denoisers. Each file is a blind Gaussian denoiser (noise sigma ~ U(0, 0.2))
# trained on what this machine has offline: procedural phantoms and the *training* slices of the Debian scans
# (head CT slices 0-79, Colin27 slices 60-129; test slices are never read). No third-party data is shipped,
# only weights. Needs: apt-get install invesalius-examples mricron-data. See README.md beside this file.
set -euo pipefail
cd "$(dirname "$0")/../.."
EQ=${EQ:-.venv/bin/equideq}
TWINS=${TWINS:-runs/weights}   # the unconstrained twins (same recipe, no Jacobian penalty) are not shipped
mkdir -p "$TWINS"

# The shipped configs' denoiser: unconstrained residual U-Net (16 channels, depth 2, no normalisation),
# with a mild Jacobian spectral-norm penalty (weight 1e-3, target 1.0, every second step).
PEN="--jacobian-weight 1e-3 --jacobian-target 1.0 --jacobian-every 2"
$EQ --threads 2 pretrain --config ct_head --sources head_ct,phantoms --steps 2000 --size 64 $PEN --overwrite \
    --output resources/weights/resunet_c16_d2_none_nosn_in1.pt
$EQ --threads 2 pretrain --config mri_brain --sources colin27,phantoms --steps 2000 --size 64 $PEN --overwrite \
    --output resources/weights/resunet_c16_d2_none_nosn_in2.pt
$EQ --threads 2 pretrain --config ct_head --sources head_ct,phantoms --steps 2000 --size 64 --overwrite \
    --output "$TWINS/unconstrained_in1.pt"
$EQ --threads 2 pretrain --config mri_brain --sources colin27,phantoms --steps 2000 --size 64 --overwrite \
    --output "$TWINS/unconstrained_in2.pt"

# The provably contractive denoisers (per-layer spectral normalisation, averaged form, L = 0.99), still
# selectable with model.spectral_norm = true, lipschitz = 0.99, and the GroupNorm file (kept because
# benchmarks/deq_step.py's published numbers were measured with it) were made by the pre-training of commit
# d812327 (phantoms only, 10 power iterations per weight change, a final 300-iteration refresh):
#   git checkout d812327 -- engine && $EQ pretrain --config ct_phantom_quick --steps 1500 --size 64 \
#       --output resources/weights/resunet_c16_d2_none_sn_in1.pt
#   (+ --set physics.modality=mri for ..._none_sn_in2.pt; + --set model.norm=group --set model.lipschitz=0.95
#   for resunet_c16_d2_group_sn_in1.pt). Today's `equideq pretrain` would not reproduce them bit for bit.
