"""``hetmm fit | predict | update | compress | calibrate | evaluate``."""

from __future__ import annotations

import argparse
import csv
import io
import logging
from pathlib import Path

from hetmm_jax import data as data_lib
from hetmm_jax import model_io, visualize
from hetmm_jax.detector import PRESETS, Detector
from hetmm_jax.errors import DataError

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars, warnings only")

    config = argparse.ArgumentParser(add_help=False)
    group = config.add_argument_group("detector configuration")
    group.add_argument("--preset", choices=sorted(PRESETS), default="default",
                       help="base configuration (default: %(default)s, runs offline)")
    group.add_argument("--backbone", help="backbone architecture, e.g. efficientnet_lite2")
    group.add_argument("--weights", help="checkpoint file or registry name for the backbone")
    group.add_argument("--image-size", type=int, help="square input side, pixels")
    group.add_argument("--layers", type=_str_list, help="comma-separated, e.g. layer1,layer2")
    group.add_argument("--forward-patches", type=_int_list, help="e.g. 9,7,5")
    group.add_argument("--backward-patches", type=_int_list, help="e.g. 3,3,3")
    group.add_argument("--alpha", type=float, dest="alphas", help="Eq. 6 forward weight")
    group.add_argument("--sigma", type=float, help="image-score blur, pixels")
    group.add_argument("--batch-size", type=int, help="images per batch")
    group.add_argument("--bf16", action="store_true", help="store templates as bfloat16")

    p = subparsers.add_parser("fit", parents=[common, config],
                              help="build a model from defect-free images")
    p.add_argument("data", help="a category folder (uses train/good) or a folder of images")
    p.add_argument("--out", required=True, help="model file to write (.npz)")
    p.add_argument("-k", type=int, help="compress to K sheets after fitting")
    p.add_argument("--strategy", default="pts", choices=("pts", "random", "random_image", "kmeans"))
    p.set_defaults(func=_fit)

    p = subparsers.add_parser("predict", parents=[common],
                              help="score images: CSV, heat-map overlays, masks")
    p.add_argument("model", help="model file from `hetmm fit`")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threshold", type=float, help="override the model's threshold")
    p.set_defaults(func=_predict)

    p = subparsers.add_parser("update", parents=[common],
                              help="add defect-free images to a model (hot update)")
    p.add_argument("model")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--out", help="write here instead of replacing MODEL")
    p.set_defaults(func=_update)

    p = subparsers.add_parser("compress", parents=[common],
                              help="shrink a model's template set to K sheets (PTS)")
    p.add_argument("model")
    p.add_argument("-k", type=int, required=True)
    p.add_argument("--strategy", default="pts", choices=("pts", "random", "random_image", "kmeans"))
    p.add_argument("--out", help="write here instead of replacing MODEL")
    p.set_defaults(func=_compress)

    p = subparsers.add_parser("calibrate", parents=[common],
                              help="set a model's threshold on held-out images")
    p.add_argument("model")
    p.add_argument("--good", nargs="+", required=True, help="defect-free images or folders")
    p.add_argument("--defective", nargs="*", default=(), help="defective images or folders")
    p.add_argument("--max-fpr", type=float, default=0.01,
                   help="target false-positive rate without defective images")
    p.add_argument("--out", help="write here instead of replacing MODEL")
    p.set_defaults(func=_calibrate)

    p = subparsers.add_parser("evaluate", parents=[common, config],
                              help="fit on train/good, score test/, write metrics and report")
    p.add_argument("data", help="category folder in the MVTec AD layout")
    p.add_argument("--out", required=True, help="output folder for metrics.json and report")
    p.add_argument("-k", type=int, help="compress to K sheets before scoring")
    p.add_argument("--strategy", default="pts", choices=("pts", "random", "random_image", "kmeans"))
    p.set_defaults(func=_evaluate)


def detector_from_args(args: argparse.Namespace) -> Detector:
    """A detector from ``--preset`` and the explicit overrides."""
    overrides = {}
    for name in ("backbone", "weights", "image_size", "layers", "forward_patches",
                 "backward_patches", "alphas", "sigma", "batch_size"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "bf16", False):
        overrides["template_dtype"] = "bfloat16"
    overrides["progress"] = not getattr(args, "quiet", False)
    return Detector.from_preset(args.preset, **overrides)


def _training_images(path: str) -> list[str]:
    root = Path(path)
    if (root / "train" / "good").is_dir():
        root = root / "train" / "good"
    return [str(p) for p in data_lib.list_images(root)]


def _expand(items) -> list[str]:
    paths: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths += [str(p) for p in data_lib.list_images(path)]
        elif path.is_file():
            paths.append(str(path))
        else:
            raise DataError(f"{item}: no such file or folder")
    return paths


def _load(args: argparse.Namespace) -> Detector:
    detector = Detector.load(args.model)
    detector.progress = not getattr(args, "quiet", False)
    return detector


def _fit(args: argparse.Namespace) -> int:
    detector = detector_from_args(args)
    images = _training_images(args.data)
    detector.fit(images)
    if args.k is not None:
        detector.compress(args.k, strategy=args.strategy)
    detector.save(args.out)
    print(f"fitted on {len(images)} images, {detector.n_templates_} templates -> {args.out}")
    return 0


def _update(args: argparse.Namespace) -> int:
    detector = _load(args)
    before = detector.n_templates_
    detector.update(_expand(args.images))
    out = args.out or args.model
    detector.save(out)
    print(f"{before} -> {detector.n_templates_} templates -> {out}")
    return 0


def _compress(args: argparse.Namespace) -> int:
    detector = _load(args)
    before = detector.n_templates_
    detector.compress(args.k, strategy=args.strategy)
    out = args.out or args.model
    detector.save(out)
    print(f"{before} -> {detector.n_templates_} templates ({args.strategy}) -> {out}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    detector = _load(args)
    good = _expand(args.good)
    bad = _expand(args.defective)
    labels = [0] * len(good) + [1] * len(bad)
    detector.calibrate(good + bad, labels, max_fpr=args.max_fpr)
    out = args.out or args.model
    detector.save(out)
    print(f"threshold {detector.threshold_:.5f} -> {out}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    detector = _load(args)
    if args.threshold is not None:
        detector.threshold_ = float(args.threshold)
    paths = _expand(args.images)
    out = Path(args.out)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    prediction = detector.predict(paths)
    vmin = float(min(m.min() for m in prediction.maps))
    vmax = float(max(m.max() for m in prediction.maps))

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "score", "label"])
    names = _unique_stems(paths)
    for i, path in enumerate(paths):
        label = "" if prediction.labels is None else int(prediction.labels[i])
        writer.writerow([path, f"{prediction.scores[i]:.6f}", label])
        image = data_lib.read_image(path)
        mask = None if prediction.masks is None else prediction.masks[i]
        visualize.save_png(out / "overlays" / f"{names[i]}.png",
                           visualize.overlay(image, prediction.maps[i], vmin=vmin, vmax=vmax,
                                             mask=mask))
        if mask is not None:
            (out / "masks").mkdir(exist_ok=True)
            visualize.save_mask(out / "masks" / f"{names[i]}.png", mask)
    text = buffer.getvalue()
    model_io.atomic_write(out / "scores.csv", lambda h: h.write(text.encode("utf-8")))
    print(text, end="")
    if prediction.labels is None:
        log.warning("the model has no threshold (run `hetmm calibrate`): no labels or masks")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from hetmm_jax.evaluation import evaluate_category, format_table

    detector = detector_from_args(args)
    results = evaluate_category(detector, args.data, args.out, k=args.k, strategy=args.strategy)
    print(format_table(results))
    print(f"wrote {Path(args.out) / 'metrics.json'} and report.md")
    return 0


def _unique_stems(paths: list[str]) -> list[str]:
    """File stems, made unique with a numeric suffix where two inputs share one."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        stem = Path(path).stem
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        names.append(stem if count == 0 else f"{stem}_{count}")
    return names


def _str_list(text: str) -> tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in _str_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")

