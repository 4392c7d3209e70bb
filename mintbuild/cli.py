"""`mintbuild <verb>`: one verb = one module = one DVC stage.

Each verb module exposes `HELP` (one line), `configure_parser(parser)` and `main(args)`; `main` only parses
params and calls the module's library function. Expected errors (MintError) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .errors import MintError

#: Verb -> module. Order is the pipeline order shown in --help.
VERBS: dict[str, str] = {
    "model": "mintbuild.model",
    "corpus": "mintbuild.corpus",
    "profile": "mintbuild.profile",
    "allocate": "mintbuild.allocate",
}

log = logging.getLogger("mintbuild")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mintbuild",
        description="Model compression as a build: profile a checkpoint once on the CPU, then pick bits and "
        "group size per tensor so each hardware target gets the best model that fits its byte budget.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>", required=True)
    for verb, modname in VERBS.items():
        mod = importlib.import_module(modname)
        p = sub.add_parser(verb, help=mod.HELP, description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.configure_parser(p)
        p.set_defaults(func=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        args.func(args)
    except MintError as e:
        print(f"mintbuild {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mintbuild {args.verb}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
