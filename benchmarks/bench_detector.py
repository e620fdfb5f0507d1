"""Detector speed and memory against the number of templates N, with a baseline in the same run.

For N in --sheets (default 10, 60, 200 and all), on Magnetic Tile Defects with the default preset:

- ours, end to end: ``Detector.predict`` on test images (reading, resizing, features, matching,
  blur, image scores), images per second after a warm-up batch;
- ours, matching only: ``matching.anomaly_map`` on precomputed features, ms per image;
- baseline, matching only: the authors' formulation in plain torch on the CPU (for every window
  offset, the cosine of every query pixel with the shifted pixel of every sheet, a dense
  (B, N, H, W) tensor, then the minimum), on the same features; ms per image and the ratio;
- template memory (float32) and the process's peak resident memory.

Run: ``python benchmarks/bench_detector.py [--data DIR] [--images 32] [--sheets 10,60,200,0]``
(0 means all templates). Needs torch for the baseline (``pip install torch``); about 5 minutes
on 2 cores.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import jax
import numpy as np

from hetmm_jax import Detector, data, matching

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mtd" / "magnetic_tile"


def torch_baseline(queries, templates, config, out_size):
    """The authors' dense matching, per layer, in torch: returns (B, H, W) maps and seconds."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(2)
    start = time.perf_counter()
    total = None
    for q, t, fwd, bwd, alpha, weight in zip(queries, templates, config["forward_patches"],
                                             config["backward_patches"], config["alphas"],
                                             config["layer_weights"]):
        q = F.normalize(torch.from_numpy(np.asarray(q)).permute(0, 3, 1, 2), dim=1)
        t = F.normalize(torch.from_numpy(np.asarray(t, np.float32)).permute(0, 3, 1, 2), dim=1)
        b, c, h, w = q.shape
        forward = torch.full((b, h, w), 2.0)
        backward = torch.full((b, h, w), 2.0)
        for half, out, direction in ((fwd // 2, forward, "f"), (bwd // 2, backward, "b")):
            for dy in range(-half, half + 1):
                for dx in range(-half, half + 1):
                    # Shift so that position (y, x) meets (y + dy, x + dx) of the other side.
                    ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
                    xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
                    if direction == "f":  # query (y, x) against templates (y + dy, x + dx)
                        cos = torch.einsum("bchw,nchw->bnhw", q[:, :, yd, xd], t[:, :, ys, xs])
                        best = 1 - cos.max(dim=1).values
                        out[:, yd, xd] = torch.minimum(out[:, yd, xd], best)
                    else:  # templates (y, x) against query (y + dy, x + dx)
                        cos = torch.einsum("bchw,nchw->bnhw", q[:, :, ys, xs], t[:, :, yd, xd])
                        best = 1 - cos.max(dim=1).values
                        out[:, yd, xd] = torch.minimum(out[:, yd, xd], best)
        layer = alpha * forward + (1 - alpha) * backward
        layer = F.interpolate(layer[:, None], size=out_size, mode="bilinear",
                              align_corners=False)[:, 0]
        total = weight * layer if total is None else total + weight * layer
    return total.numpy(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--images", type=int, default=32, help="test images to score")
    parser.add_argument("--sheets", default="10,60,200,0", help="template counts, 0 = all")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()

    category = data.load_category(args.data)
    rng = np.random.default_rng(0)
    test = [str(s.path) for s in rng.permutation(np.array(category.test, dtype=object))]
    test = test[: args.images]
    full = Detector(progress=True, batch_size=8).fit([str(p) for p in category.train])
    config = full.config_
    size = int(full.image_size)
    feats = full.feature_extractor().extract([data.read_image(p) for p in test], batch_size=8,
                                      progress=False)
    queries = [feats[name] for name in config["layers"]]

    print(f"MTD, {len(test)} test images, default preset ({full.backbone}, layers "
          f"{', '.join(config['layers'])}), {jax.devices()[0].platform}, "
          f"{jax.device_count()} device(s)")
    header = (f"{'N':>5} {'MB tmpl':>8} {'e2e img/s':>10} {'ours ms':>8} {'torch ms':>9} "
              f"{'ratio':>6} {'max |diff|':>10}")
    print(header)
    for n in [int(v) for v in args.sheets.split(",")]:
        n = full.n_templates_ if n <= 0 else min(n, full.n_templates_)
        pick = np.sort(rng.choice(full.n_templates_, n, replace=False))
        detector = Detector(progress=False, batch_size=8)
        detector.config_ = config
        detector.templates_ = {k: v[pick] for k, v in full.templates_.items()}
        detector.n_templates_ = n
        detector.threshold_ = None
        detector._device_cache = None
        detector._extractor_cache = full.feature_extractor()
        mbytes = sum(v.nbytes for v in detector.templates_.values()) / 2**20

        detector.predict(test[:8])
        start = time.perf_counter()
        detector.predict(test)
        e2e = len(test) / (time.perf_counter() - start)

        def ours():
            return np.asarray(detector._maps({k: feats[k][:8] for k in config["layers"]}))

        ours()
        start = time.perf_counter()
        maps = ours()
        ours_ms = 1000 * (time.perf_counter() - start) / 8

        row = f"{n:>5} {mbytes:>8.0f} {e2e:>10.2f} {ours_ms:>8.1f}"
        if not args.no_baseline:
            templates = [detector.templates_[k] for k in config["layers"]]
            ref, seconds = torch_baseline([q[:8] for q in queries], templates, config,
                                          (size, size))
            torch_ms = 1000 * seconds / 8
            row += (f" {torch_ms:>9.1f} {torch_ms / ours_ms:>6.1f} "
                    f"{np.abs(ref - maps).max():>10.2e}")
        print(row, flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak resident memory of this process: {peak:.2f} GiB")
    print("ratio = baseline ms / ours ms for the matching alone (same features, same config)")


if __name__ == "__main__":
    main()
