"""``tabpfn-infer`` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from importlib import metadata

from tabpfn_infer import __version__

#: Distributions of this project whose versions ``--version`` reports when installed.
TABATTN_DISTRIBUTIONS = ("tabattn-core", "tabattn-triton", "tabattn-fp8", "tabpfn-infer")


def installed_versions() -> dict[str, str | None]:
    """Version of each tabattn distribution, ``None`` where it is not installed."""
    versions: dict[str, str | None] = {}
    for dist in TABATTN_DISTRIBUTIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _version_text() -> str:
    lines = []
    for dist, version in installed_versions().items():
        lines.append(f"{dist} {version if version is not None else '(not installed)'}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tabpfn-infer",
        description=(
            f"tabpfn-infer {__version__}: autoregressive predictor for TabPFN-style models. "
            "This release only reports versions; model commands (fit, joint sampling, "
            "joint density) arrive in a later release."
        ),
    )
    parser.add_argument(
        "--version",
        action="store_true",
        help="print the versions of the installed tabattn packages and exit",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(_version_text())
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
