"""The equalization search, exhaustive against screened, on the same statistics: CPU seconds and error ratio per
group kind, on the first blocks of a model (default: the embedded SmolLM2 folder of `mintbuild model`).

    .venv/bin/python benchmarks/bench_equalize.py --model artifacts/model --corpus artifacts/corpus --blocks 4

Each group is searched twice in one process, exhaustively (`screen_rows: 0`, every exponent on the search rows)
and screened (the params' screen_rows / skip_below), interleaved, from the same statistics and weights; the folds
are then applied as the stage does (the exhaustive answer), so later groups see what the stage would show them.
CPU seconds (time.process_time, all threads) are what a shared machine's load does not inflate.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections import defaultdict
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    import torch

    from mintbuild.calibration.equalize import (
        _fold,
        _streamed,
        block_groups,
        block_stats,
        dtype_of,
        offset_restriction,
        screened_search,
    )
    from mintbuild.calibration.windows import calibration_windows, torch_settings
    from mintbuild.config import EqualizeConfig
    from mintbuild.formats import Option

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("artifacts/model"))
    p.add_argument("--corpus", type=Path, default=Path("artifacts/corpus"))
    p.add_argument("--blocks", type=int, default=4, help="first blocks measured")
    p.add_argument("--windows", type=int, default=1)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    screened = EqualizeConfig(n_windows=a.windows, window=a.window, threads=a.threads)
    exhaustive = dataclasses.replace(screened, screen_rows=0)
    ckpt, windows, _ = calibration_windows(a.model, a.corpus, a.windows, a.window, 0)
    cpu: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    ratios: dict[str, list[tuple[float, float, bool]]] = defaultdict(list)
    option = Option(screened.bits, screened.group)
    with torch_settings(a.threads), torch.no_grad():
        model = _streamed(a.model)
        n_tokens = sum(len(w.ids) for w in windows)
        step = max(1, math.ceil(n_tokens / screened.samples))
        entered = [model.enter(torch.tensor(w.ids, dtype=torch.long)[None]) for w in windows]
        hidden, calls = [h for h, _ in entered], [c for _, c in entered]
        model.drop_outer()
        dtypes = {n: dtype_of(ckpt, n) for n in ckpt.tensors}
        for i in range(min(a.blocks, model.n_blocks)):
            with model.block(i) as blk:
                modules = {f"{model.prefix}.{i}.{n}".rstrip("."): m for n, m in blk.named_modules()}
                groups, _ = block_groups(i, blk, model.config)
                stats, hidden = block_stats(
                    blk, modules, groups, hidden, [c[i] for c in calls], step, n_tokens
                )
                for g in groups:
                    weights = [modules[n].weight for n in g.linears]
                    restrict = None
                    if g.fold_kind == "offset":
                        restrict = offset_restriction(
                            modules[g.fold].weight.detach(), dtypes[f"{g.fold}.weight"]
                        )
                    got = []
                    for k, cfg in enumerate((exhaustive, screened)):
                        c0 = time.process_time()
                        got.append(
                            screened_search(weights, stats[(g.layer, g.kind)], g, option, cfg, restrict)
                        )
                        cpu[g.kind][k] += time.process_time() - c0
                    ratios[g.kind].append((got[0][2], got[1][2], got[1][4]))
                    for w in weights:
                        w.mul_(got[0][1])
                    _fold(modules[g.fold], got[0][1], g, dtypes.get(f"{g.fold}.weight"))
    print(f"# {a.model}: {min(a.blocks, model.n_blocks)} blocks, {a.windows} x {a.window} tokens, "
          f"screen_rows {screened.screen_rows}, skip_below {screened.skip_below}, threads {a.threads}")  # fmt: skip
    print(
        "| group | exhaustive CPU s | screened CPU s | speed-up | ratio exhaustive | ratio screened | skipped |"
    )
    print("|---|---|---|---|---|---|---|")
    tot = [0.0, 0.0]
    allr: list[tuple[float, float, bool]] = []
    for kind, (e, s) in cpu.items():
        r = ratios[kind]
        allr += r
        tot[0], tot[1] = tot[0] + e, tot[1] + s
        print(f"| {kind} | {e:.1f} | {s:.1f} | {e / max(s, 1e-9):.2f}x | {sum(x[0] for x in r) / len(r):.4f} | "
              f"{sum(x[1] for x in r) / len(r):.4f} | {sum(x[2] for x in r)}/{len(r)} |")  # fmt: skip
    print(f"| all | {tot[0]:.1f} | {tot[1]:.1f} | {tot[0] / max(tot[1], 1e-9):.2f}x | "
          f"{sum(x[0] for x in allr) / len(allr):.4f} | {sum(x[1] for x in allr) / len(allr):.4f} | "
          f"{sum(x[2] for x in allr)}/{len(allr)} |")  # fmt: skip


if __name__ == "__main__":
    main()
