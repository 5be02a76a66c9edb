"""Denoising PSNR and Jacobian norm of the shipped pretrained denoisers, next to their unconstrained twins.

For every shipped weights file of the configs' denoiser (``resources/weights``)
and, where present, its twin trained the same way without the Jacobian
penalty (``runs/weights/unconstrained_in{1,2}.pt``, made by
``resources/weights/make_weights.sh``), prints

* the denoising PSNR at sigma 0.02 / 0.05 / 0.1 on the held-out test slices of
  the task (head CT for one channel, Colin27 for two), and
* ``||J_D||_2`` of the denoiser at those noisy test images (median and largest
  over images, sigma 0.05), estimated by power iteration on ``J^T J``.

The table goes into ``resources/weights/README.md``::

    .venv/bin/python benchmarks/denoisers.py            # ~1 min
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import builtin_config  # noqa: E402
from engine.denoisers import build_denoiser  # noqa: E402
from engine.pretrain import REPORT_SIGMAS, denoising_table, denoising_test_images  # noqa: E402
from engine.linalg import differentiable_jacobian_norm  # noqa: E402

WEIGHTS = ROOT / "resources" / "weights"
TWINS = ROOT / "runs" / "weights"
#: (config the file is for, channels, shipped file, twin file)
ENTRIES = (
    ("ct_head", 1, WEIGHTS / "resunet_c16_d2_none_nosn_in1.pt", TWINS / "unconstrained_in1.pt"),
    ("mri_brain", 2, WEIGHTS / "resunet_c16_d2_none_nosn_in2.pt", TWINS / "unconstrained_in2.pt"),
)
JACOBIAN_SIGMA = 0.05


def jacobian_norms(denoiser: torch.nn.Module, clean: torch.Tensor, sigma: float, iters: int) -> torch.Tensor:
    """``||J_D(x_b + noise)||_2`` per test image (power iteration, no graph kept)."""
    generator = torch.Generator().manual_seed(4321)
    noisy = clean + sigma * torch.randn(clean.shape, generator=generator)
    norms = [differentiable_jacobian_norm(lambda x: denoiser(x, sigma), noisy[i:i + 1], iters=iters, tol=1e-4,
                                          generator=generator).detach() for i in range(len(noisy))]
    return torch.cat(norms)


def measure(config: str, channels: int, path: Path, size: int, iters: int) -> dict:
    cfg = builtin_config(config)
    cfg.model.weights = str(path)
    denoiser = build_denoiser(cfg.model, channels, load_weights=True).eval()
    for p in denoiser.parameters():
        p.requires_grad_(False)
    test_images = denoising_test_images(channels, size)  # read once for both measurements
    table = denoising_table(denoiser, channels, test_images=test_images)
    _, clean = test_images
    norms = jacobian_norms(denoiser, clean, JACOBIAN_SIGMA, iters)
    return {"images": table["images"], "sigma": table["sigma"],
            "jacobian_median": float(norms.median()), "jacobian_max": float(norms.max())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128, help="test image side (default 128)")
    p.add_argument("--iters", type=int, default=30, help="power iterations for ||J|| (default 30)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    header = ("| file | test images | " + " | ".join(f"sigma {s}: noisy -> denoised (dB)" for s in REPORT_SIGMAS)
              + f" | Jacobian norm of D at sigma {JACOBIAN_SIGMA} (median / max) |")
    print(header)
    print("|" + "---|" * (2 + len(REPORT_SIGMAS) + 1))
    for config, channels, shipped, twin in ENTRIES:
        for label, path in (("shipped", shipped), ("unconstrained twin", twin)):
            if not path.is_file():
                print(f"| {path.name} ({label}) | not present: run resources/weights/make_weights.sh |")
                continue
            r = measure(config, channels, path, args.size, args.iters)
            cells = " | ".join(f"{r['sigma'][s][0]:.2f} -> **{r['sigma'][s][1]:.2f}**" for s in REPORT_SIGMAS)
            print(f"| `{path.name}` ({label}) | {r['images']} | {cells} | "
                  f"{r['jacobian_median']:.3f} / {r['jacobian_max']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
