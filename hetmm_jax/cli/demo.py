"""``hetmm demo``: fit and evaluate offline on solar-cell images that the install ships."""

from __future__ import annotations

import argparse

from hetmm_jax.cli.detect import detector_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="offline demo on the elpv solar-cell images")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS)
    p.add_argument("--out", default="hetmm-demo", help="folder for overlays (%(default)s)")
    p.add_argument("--n-train", type=int, default=100, help="good training cells")
    p.add_argument("--n-test", type=int, default=100, help="held-out cells of each class")
    p.add_argument("-k", type=int, help="compress the templates to K sheets with PTS")
    p.set_defaults(func=_demo, preset="default")


def _demo(args: argparse.Namespace) -> int:
    from hetmm_jax.demo import run_demo

    detector = detector_from_args(args)
    results = run_demo(detector, args.out, n_train=args.n_train, n_test_good=args.n_test,
                       n_test_defective=args.n_test, k=args.k)
    print(f"HETMM demo: {results['data']}")
    print(f"  backbone {results['backbone']}, {results['n_templates']} templates "
          f"(fit {results['fit_seconds']} s)")
    print(f"  test: {results['n_test']} cells, {results['n_defective']} defective")
    print(f"  image AUROC {100 * results['image_auroc']:.1f}   "
          f"F1-max {100 * results['f1_max']:.1f}   {results['images_per_second']} images/s")
    print(f"  overlays in {results['out_dir']}/")
    return 0
