"""Configuration study of the offline default on Magnetic Tile Defects (issue 5).

MTD has no validation split, so the test set is split once (seed 0, stratified by defect type)
into halves A and B: every setting is chosen on A, and the chosen configuration is reported on
B and on the whole test set beside the current default.

To stay affordable on 2 CPU cores the features are extracted once per (image size,
preprocessing), and the matching is run once per (image size, preprocessing, template set) with
the widest window (9 x 9): the per-offset best cosines it produces give the forward (Eq. 4) and
backward (Eq. 5) distances of every smaller window, so every window, alpha, layer subset, layer
weight and blur of the sweep is a cheap recombination of cached per-layer distance maps. The
recombination uses the library's own matching internals, and ``check`` compares it with
:func:`hetmm_jax.matching.anomaly_map` on a few images.

Preprocessing variants (no labels used, applied identically to train and test images):
  square     resize to S x S (the current behaviour; elongated tiles are squashed);
  landscape  rotate portrait images (H > W) by 90 degrees, then resize to S x S;
  pad        pad to a square with edge replication, then resize to S x S.
Pixel metrics are computed in one reference frame for every variant: the image squashed to
256 x 256 (what ``hetmm evaluate`` uses at image_size 256); maps of the other variants are
rotated back / cropped and resized into it.

Usage (results go to /tmp/study/):
    python benchmarks/study_mtd.py cache --size 256 --prep square --templates r200 --images A
    python benchmarks/study_mtd.py sweep --size 256 --prep square --templates r200 --stage 1
    python benchmarks/study_mtd.py cache --size 256 --prep square --templates all --images all
    python benchmarks/study_mtd.py eval --templates all --images all --subset B --pixel \
        --config '{}' --config '{"layers": [2, 3, 4], "fw": [7, 3, 9], "bw": [1, 1, 1],
        "alpha": 0.7, "lw": [1, 4, 1], "sigma": 16}'
    python benchmarks/study_mtd.py check
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hetmm_jax import data as data_lib
from hetmm_jax import matching, metrics, postprocess
from hetmm_jax.features import FeatureExtractor, resize_image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mtd" / "magnetic_tile"
OUT = Path("/tmp/study")
LAYERS = ("layer1", "layer2", "layer3", "layer4")
WINDOWS = (1, 3, 5, 7, 9)
REFERENCE = 256
SEED = 0
DEFAULT = {"layers": (1, 2, 3), "fw": (9, 7, 5), "bw": (3, 3, 3), "alpha": 0.8,
           "lw": (1.0, 1.0, 1.0), "sigma": 6.8}


# -- data and split ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def category():
    return data_lib.load_category(DATA)


def halves() -> dict[str, np.ndarray]:
    """Test indices of halves A and B: per defect type, a seeded permutation cut in two."""
    path = OUT / "split.json"
    if path.exists():
        saved = json.loads(path.read_text())
        return {k: np.array(v) for k, v in saved.items()}
    defects = np.array([s.defect for s in category().test])
    rng = np.random.default_rng(SEED)
    a, b = [], []
    for defect in sorted(set(defects)):
        members = rng.permutation(np.flatnonzero(defects == defect))
        cut = (len(members) + 1) // 2
        a += members[:cut].tolist()
        b += members[cut:].tolist()
    split = {"A": np.sort(a), "B": np.sort(b), "all": np.arange(len(defects))}
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: v.tolist() for k, v in split.items()}))
    return split


def template_subset(name: str, n_train: int) -> np.ndarray:
    if name == "all":
        return np.arange(n_train)
    count = int(name.lstrip("r"))
    return np.sort(np.random.default_rng(SEED).choice(n_train, count, replace=False))


# -- preprocessing ----------------------------------------------------------------------------

def prepare(image: np.ndarray, prep: str, size: int) -> np.ndarray:
    """One uint8 (H, W, 3) image -> uint8 (size, size, 3) under a label-free rule."""
    if prep == "landscape" and image.shape[0] > image.shape[1]:
        image = np.ascontiguousarray(np.rot90(image))
    elif prep == "pad":
        h, w = image.shape[:2]
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        image = np.pad(image, ((top, side - h - top), (left, side - w - left), (0, 0)),
                       mode="edge")
    elif prep not in ("square", "landscape"):
        raise SystemExit(f"unknown preprocessing {prep!r}")
    return resize_image(image, size)


def to_reference(maps: np.ndarray, shapes: list[tuple[int, int]], prep: str) -> np.ndarray:
    """(B, S, S) maps of prepared images -> (B, 256, 256) in the squashed-original frame."""
    out = np.empty((len(maps), REFERENCE, REFERENCE), np.float32)
    size = maps.shape[-1]
    for i, (m, (h, w)) in enumerate(zip(maps, shapes)):
        if prep == "landscape" and h > w:
            m = np.rot90(m, k=-1)
        elif prep == "pad":
            side = max(h, w)
            top, left = (side - h) // 2, (side - w) // 2
            scale = size / side
            y0, y1 = round(top * scale), round((top + h) * scale)
            x0, x1 = round(left * scale), round((left + w) * scale)
            m = m[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
        out[i] = np.asarray(jax.image.resize(jnp.asarray(np.ascontiguousarray(m)),
                                             (REFERENCE, REFERENCE), "bilinear"))
    return out


# -- features and distance maps ---------------------------------------------------------------

def features(size: int, prep: str, part: str) -> dict[str, np.ndarray]:
    """layer -> (N, h, w, C) float32 features of train/good ("train") or test ("test")."""
    paths = {name: OUT / f"feat_{prep}_{size}_{part}_{name}.npy" for name in LAYERS}
    if all(p.exists() for p in paths.values()):
        return {name: np.load(p, mmap_mode="r") for name, p in paths.items()}
    cat = category()
    files = cat.train if part == "train" else [s.path for s in cat.test]
    extractor = FeatureExtractor("efficientnet_lite2", layers=LAYERS, image_size=size)
    start = time.perf_counter()
    images = (prepare(data_lib.read_image(p), prep, size) for p in files)
    feats = extractor.extract(list(images), batch_size=16, progress=False)
    print(f"features {prep} {size} {part}: {len(files)} images in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    for name, value in feats.items():
        np.save(paths[name], value.astype(np.float32))
    return feats


@functools.partial(jax.jit, static_argnames=("half", "rows", "chunk"))
def _distances(query, templates, *, half, rows, chunk):
    """Per window w of WINDOWS: forward and backward distance maps (B, h, w) of one layer."""
    win = matching._Window(half, half)
    reducer = matching._Reducer(None)
    best = matching._best_cosines(matching.l2_normalize(query), templates, win, reducer, rows,
                                  chunk, jnp.float32, "NHWC")
    out = {}
    for w in WINDOWS:
        sub = matching._Window(min(w // 2, half), min(w // 2, half))
        out[f"F{w}"] = matching._forward_from_best(best, win, sub, reducer)
        out[f"B{w}"] = matching._backward_from_best(best, win, sub, reducer)
    return out


def distances(size: int, prep: str, templates: str, images: str) -> dict[str, np.ndarray]:
    """Cached "layerL/F{w}" and "layerL/B{w}" -> (n_images, h, w) distance maps."""
    path = OUT / f"dist_{prep}_{size}_{templates}_{images}.npz"
    if path.exists():
        return dict(np.load(path))
    index = halves()[images]
    train, test = features(size, prep, "train"), features(size, prep, "test")
    chosen = template_subset(templates, train["layer1"].shape[0])
    out, batch = {}, 8
    for name in LAYERS:
        start = time.perf_counter()
        t = np.asarray(train[name][chosen], np.float32)
        t = jnp.asarray(t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12))
        n, h, w, c = t.shape
        half = min(max(WINDOWS) // 2, h - 1)
        area = (2 * half + 1) ** 2
        rows, chunk = matching._plan(batch, h, w, c, n, area, 4,
                                     matching.DEFAULT_MAX_CHUNK_BYTES, None, None)
        parts: dict[str, list] = {}
        for s in range(0, len(index), batch):
            q = np.asarray(test[name][index[s:s + batch]], np.float32)
            count = len(q)
            if count < batch:
                q = np.concatenate([q, np.zeros((batch - count, *q.shape[1:]), q.dtype)])
            res = _distances(jnp.asarray(q), t, half=half, rows=rows, chunk=chunk)
            for key, value in res.items():
                parts.setdefault(key, []).append(np.asarray(value)[:count])
        for key, value in parts.items():
            out[f"{name}/{key}"] = np.concatenate(value)
        print(f"matching {prep} {size} {templates} {images} {name}: "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    np.savez(path, **out)
    return out


# -- scoring a configuration ------------------------------------------------------------------

def combine(dist: dict[str, np.ndarray], cfg: dict, size: int, rows: np.ndarray) -> jax.Array:
    """(n, size, size) anomaly maps (Eq. 10) of a configuration from cached distances."""
    total = None
    for layer, f, b, w in zip(cfg["layers"], cfg["fw"], cfg["bw"], cfg["lw"]):
        alpha = cfg["alpha"]
        m = (alpha * dist[f"layer{layer}/F{f}"][rows]
             + (1 - alpha) * dist[f"layer{layer}/B{b}"][rows])
        m = w * postprocess.resize_maps(jnp.asarray(m), (size, size))
        total = m if total is None else total + m
    return total


def score(dist, cfg, size, prep, images: str, subset: str, pixel: bool) -> dict:
    """Metrics of ``cfg`` on the test indices ``subset`` (within the cached ``images``)."""
    split = halves()
    cached = split[images]
    wanted = split[subset]
    rows = np.searchsorted(cached, wanted)
    assert np.array_equal(cached[rows], wanted)
    samples = [category().test[i] for i in wanted]
    labels = np.array([s.label for s in samples])
    defects = [s.defect for s in samples]
    maps = combine(dist, cfg, size, rows)
    scores = np.asarray(postprocess.image_score(maps, cfg["sigma"]))
    if not pixel:
        return {"image_auroc": metrics.image_auroc(labels, scores)}
    shapes = [data_lib.image_size(s.path) for s in samples]
    ref = to_reference(np.asarray(maps), shapes, prep)
    masks = data_lib.load_masks(samples, (REFERENCE, REFERENCE))
    res = metrics.evaluate_scores(labels, scores, defects, masks=masks, maps=ref)
    return {k: res[k] for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max")} | {
        "per_defect": {d: round(v["image_auroc"], 4) for d, v in res["per_defect"].items()}}


def cfg_name(cfg: dict) -> str:
    return (f"L{''.join(map(str, cfg['layers']))} fw{'/'.join(map(str, cfg['fw']))} "
            f"bw{'/'.join(map(str, cfg['bw']))} a{cfg['alpha']} "
            f"lw{'/'.join(f'{w:g}' for w in cfg['lw'])} s{cfg['sigma']}")


def log_result(tag: str, cfg: dict, res: dict) -> None:
    line = {"tag": tag, "config": cfg_name(cfg), "cfg": cfg, **res}
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def stage_grid(stage: int, base: dict) -> list[dict]:
    """Stage 1: layer subsets x forward windows. Stage 2: backward windows, alpha, weights,
    sigma around ``base``."""
    grid = []
    if stage == 1:
        for layers in [(1, 2), (1, 2, 3), (2, 3), (1, 3), (1, 2, 3, 4), (2, 3, 4)]:
            options = [(3, 5, 7, 9)] * len(layers)
            for fw in itertools.product(*options):
                if 4 in layers and fw[-1] != 9:
                    continue  # layer 4 is 8 x 8 at 256: windows above 7 see all of it
                grid.append(dict(base, layers=layers, fw=fw, bw=(3,) * len(layers),
                                 lw=(1.0,) * len(layers)))
    else:
        n = len(base["layers"])
        for bw in [(1,) * n, (3,) * n, (5,) * n, (7,) * n]:
            for alpha in (0.6, 0.7, 0.8, 0.9, 1.0):
                grid.append(dict(base, bw=bw, alpha=alpha))
        weights = {(1.0,) * n}
        for i in range(n):
            for w in (0.5, 2.0):
                lw = [1.0] * n
                lw[i] = w
                weights.add(tuple(lw))
        for lw in sorted(weights):
            for sigma in (4.0, 6.8, 8.0):
                grid.append(dict(base, lw=lw, sigma=sigma))
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["cache", "sweep", "eval", "check"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--prep", default="square", choices=["square", "landscape", "pad"])
    parser.add_argument("--templates", default="r200", help="'all' or rN (N random sheets)")
    parser.add_argument("--images", default="A", choices=["A", "B", "all"],
                        help="test images whose distances are cached")
    parser.add_argument("--subset", default="A", choices=["A", "B", "all"],
                        help="test images the metrics are computed on")
    parser.add_argument("--stage", type=int, default=1)
    parser.add_argument("--config", action="append", default=[],
                        help="JSON dict overriding the default configuration (repeatable)")
    parser.add_argument("--pixel", action="store_true", help="also pixel AUROC / AUPRO")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    halves()
    tag = f"{args.prep} {args.size} {args.templates}"

    if args.mode == "check":
        check()
        return
    dist = distances(args.size, args.prep, args.templates, args.images)
    if args.mode == "cache":
        return
    configs = [dict(DEFAULT, **json.loads(c)) for c in args.config]
    if args.mode == "sweep":
        base = configs[0] if configs else DEFAULT
        configs = stage_grid(args.stage, base)
    results = []
    start = time.perf_counter()
    for cfg in configs:
        res = score(dist, cfg, args.size, args.prep, args.images, args.subset, args.pixel)
        log_result(f"{tag} {args.mode}{args.stage if args.mode == 'sweep' else ''} "
                   f"on {args.subset}", cfg, res)
        results.append((res["image_auroc"], cfg_name(cfg), res))
        if args.mode == "eval":
            print(f"{tag} on {args.subset} | {cfg_name(cfg)} | {json.dumps(res)}", flush=True)
    print(f"{len(configs)} configurations in {time.perf_counter() - start:.0f} s")
    for auroc, name, res in sorted(results, key=lambda r: -r[0])[:args.top]:
        print(f"{auroc:.4f}  {name}")


def check() -> None:
    """The cached recombination equals matching.anomaly_map on 8 test images (r200, 256)."""
    dist = distances(256, "square", "r200", "A")
    rows = np.arange(8)
    index = halves()["A"][rows]
    train, test = features(256, "square", "train"), features(256, "square", "test")
    chosen = template_subset("r200", train["layer1"].shape[0])
    cfg = dict(DEFAULT, fw=(7, 5, 3), bw=(1, 5, 3), alpha=0.7, lw=(1.0, 0.5, 2.0))
    ours = np.asarray(combine(dist, cfg, 256, rows))
    names = [f"layer{i}" for i in cfg["layers"]]
    ref = matching.anomaly_map([np.asarray(test[n][index]) for n in names],
                               [np.asarray(train[n][chosen]) for n in names], cfg["fw"],
                               cfg["bw"], cfg["alpha"], cfg["lw"], out_size=(256, 256))
    print("max |cached - anomaly_map| =", float(np.abs(ours - np.asarray(ref)).max()))


if __name__ == "__main__":
    main()
