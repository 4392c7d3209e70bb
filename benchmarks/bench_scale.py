"""Benchmark the default pipeline at scale: every stage's wall time and peak RSS on a random Llama-shaped bf16
checkpoint (1.24B, Llama-3.2-3B or Llama-3-8B shapes), against the stated memory bound.

    .venv/bin/python benchmarks/bench_scale.py --size 1b                 # cached in /work/.cache_scale
    .venv/bin/python benchmarks/bench_scale.py --size 3b --stages model,corpus,profile,importance

The checkpoint is written once (shard by shard, in a child process) outside the repository: random weights at a
realistic scale, the config of the chosen shape, and the embedded SmolLM2's tokenizer (its 49,152 ids fit the
128,256-row embedding, so nothing needs padding; the vocabulary is the model's). A params.yaml for the run is
derived from the repository's (two targets, 4.5 and 6 bits per weight; window counts reduced: see
`--windows` / `--window`) and every stage runs as its own `mintbuild` subprocess; its peak RSS is read from
the OS (wait4's ru_maxrss of that child). Printed per stage: wall seconds, peak RSS, and the bound

    two largest tensors (fp32) + one decoder block (fp32) + the windows' activations + 1.5 GB

where the activations are those of the stage's windows (every block boundary of the importance windows for the
Fisher backward; in and out of one block for the others).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GB = 1 << 30

#: name -> (hidden, intermediate, layers, heads, kv heads, vocab, tied)
SHAPES: dict[str, tuple[int, int, int, int, int, int, bool]] = {
    "1b": (2048, 8192, 16, 32, 8, 128256, True),
    "3b": (3072, 8192, 28, 24, 8, 128256, True),  # Llama-3.2-3B
    "8b": (4096, 14336, 32, 32, 8, 128256, False),  # Llama-3-8B
}
STAGES = ("model", "corpus", "equalize", "profile", "importance", "allocate", "pack", "baseline", "evaluate")
TARGETS = {"bpw4p5": 4.5, "bpw6": 6.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SHAPES), default="1b")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder blocks (default: the shape's); a few blocks measure the per-block time and memory, "
                   "and the whole model is extrapolated from them (see --per-block)")  # fmt: skip
    p.add_argument("--per-block", action="store_true",
                   help="run the stages with 1 and with 2 decoder blocks (a run whose results.json in its run folder "
                   "has the same params and stages is read, not rerun) and extrapolate every stage to the shape's "
                   "block count: whole = t(1) + (blocks - 1) x (t(2) - t(1)), in CPU and wall seconds")  # fmt: skip
    p.add_argument(
        "--dir", type=Path, default=Path("/work/.cache_scale"), help="cache folder (outside the repo)"
    )
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--default", action="store_true",
                   help="the default configuration: params.yaml's windows, hessian windows and equalize search for "
                   "every stage, every linear layer's Hessian (--windows, --window, --hessian-windows, --hessians, "
                   "--grid and --search-rows are ignored)")  # fmt: skip
    p.add_argument("--windows", type=int, default=1, help="windows per calibration / evaluation stage")
    p.add_argument("--equalize-method", default=None, choices=["awq", "none"],
                   help="equalize.method (none: a manifest naming the model, for runs of the later stages alone)")  # fmt: skip
    p.add_argument("--window", type=int, default=128, help="tokens per window")
    p.add_argument("--hessian-windows", type=int, default=2)
    p.add_argument("--hessians", default="head", choices=["head", "all"],
                   help="importance.hessians (default head: the per-layer Hessians of an 8B are ~33 GB on disk)")  # fmt: skip
    p.add_argument("--grid", type=int, default=None, help="equalize.grid (default: params.yaml's)")
    p.add_argument(
        "--search-rows", type=int, default=None, help="equalize.search_rows (default: params.yaml's)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-dtype", default=None, help="eval.dtype: float32 (params.yaml's) or bfloat16")
    p.add_argument("--gptq-everywhere", action="store_true",
                   help=f"before allocate, mark every measured GPTQ gain {FORCED_GAIN} (importance.json) so that pack rounds "
                   "every tensor with a Hessian by GPTQ: random weights give GPTQ no held-out gain, so pack would "
                   "round them to nearest and skip the factors a real model's pack makes; the codes are meaningless, "
                   "the work is a real model's")  # fmt: skip
    p.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- the checkpoint


def shape(size: str, layers: int | None = None) -> tuple[int, int, int, int, int, int, bool]:
    """SHAPES[size], with `layers` decoder blocks when given."""
    h, inter, n, heads, kv_heads, vocab, tied = SHAPES[size]
    return h, inter, layers or n, heads, kv_heads, vocab, tied


def shapes_of(size: str, n_layers: int | None = None) -> dict[str, tuple[int, ...]]:
    h, inter, layers, heads, kv_heads, vocab, tied = shape(size, n_layers)
    kv = kv_heads * (h // heads)
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
    out["model.norm.weight"] = (h,)
    if not tied:
        out["lm_head.weight"] = (vocab, h)
    return out


def config_of(size: str, n_layers: int | None = None) -> dict:
    h, inter, layers, heads, kv_heads, vocab, tied = shape(size, n_layers)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": h // heads,
        "vocab_size": vocab,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


def checkpoint_folder(a: argparse.Namespace) -> Path:
    return a.dir / (f"llama-{a.size}" + (f"-L{a.layers}" if a.layers else ""))


def tokenizer_source(a: argparse.Namespace) -> Path:
    """The embedded SmolLM2 imported once (its tokenizer files are copied next to the random weights)."""
    folder = a.dir / "smollm2"
    if not (folder / "tokenizer.json").is_file():
        from mintbuild.config import ModelConfig
        from mintbuild.stages.model import import_model

        import_model(ModelConfig(), folder)
    return folder


def generate(a: argparse.Namespace) -> None:
    """Write the shards (about 2 GB each, one in memory at a time), the index, the tokenizer, config.json last."""
    import torch
    from safetensors.torch import save_file

    folder = checkpoint_folder(a)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = shapes_of(a.size, a.layers)
    gen = torch.Generator().manual_seed(0)
    shards: list[list[str]] = [[]]
    filled = 0
    for name, shape in shapes.items():
        if filled > 1e9:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += math.prod(shape)
    weight_map = {}
    for s, names in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for n in names:
            shape = shapes[n]
            if len(shape) == 1:
                tensors[n] = (1.0 + 0.1 * torch.randn(shape, generator=gen)).bfloat16()
            else:
                tensors[n] = torch.randn(shape, generator=gen).mul_(0.02).bfloat16()
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
        print(f"wrote {fname} ({len(names)} tensors)", flush=True)
    total = 2 * sum(math.prod(s) for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    src = tokenizer_source(a)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy2(f, folder / f.name)
    (folder / "config.json").write_text(json.dumps(config_of(a.size, a.layers), indent=1))


def ensure_checkpoint(a: argparse.Namespace) -> Path:
    folder = checkpoint_folder(a)
    if not (folder / "config.json").is_file():
        print(f"generating {folder} (once) ...", flush=True)
        argv = ["--size", a.size, "--dir", str(a.dir), "--generate-only"]
        argv += ["--layers", str(a.layers)] if a.layers else []
        subprocess.run([sys.executable, __file__, *argv], check=True, cwd=ROOT)
    return folder


# ---------------------------------------------------------------- the run


def write_params(a: argparse.Namespace, model: Path, work: Path) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"] |= {"source": "local", "path": str(model), "name": f"random-llama-{a.size}",
                        "out": str(work / "model")}  # fmt: skip
    params["corpus"]["out"] = str(a.dir / "corpus")
    for stage in ("equalize", "importance"):
        params[stage] |= {"threads": a.threads, "out": str(work / stage)}
        if not a.default:
            params[stage] |= {"n_windows": a.windows, "window": a.window}
    params["eval"] |= {"threads": a.threads}
    if a.equalize_method:
        params["equalize"]["method"] = a.equalize_method
    if a.default:
        params["importance"]["hessians"] = "all"
    else:
        params["importance"] |= {"hessian_windows": a.hessian_windows, "hessians": a.hessians}
        for key, value in (("grid", a.grid), ("search_rows", a.search_rows)):
            if value is not None:
                params["equalize"][key] = value
        params["eval"] |= {"n_windows": a.windows, "window": a.window}
    if a.eval_dtype:
        params["eval"]["dtype"] = a.eval_dtype
    params["profile"]["out"] = str(work / "profile")
    params["solver"]["importance"] = str(work / "importance" / "importance.json")
    for key in ("allocate_out", "pack_out", "eval_out"):
        params[key] = str(work / key.removesuffix("_out"))
    params["targets"] = {
        k: {"bits_per_weight": v, "description": f"{v} bits per weight"} for k, v in TARGETS.items()
    }
    params["by_format"] = {"mlx": sorted(TARGETS), "gguf": []}  # what `mintbuild compose` derives
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=True))
    return path


def commands(stage: str, params: Path) -> list[list[str]]:
    """Each stage's subprocesses; pack's tensor cache is the run's own (`<run>/pack-cache`, emptied before the
    run), so a run measures a cold build, not one warmed by another run's identical first block."""
    base = [sys.executable, "-m", "mintbuild.cli"]
    p = ["--params", str(params)]
    if stage == "pack":
        p += ["--cache", str(params.parent / "pack-cache")]
    if stage in ("allocate", "pack", "evaluate"):
        return [[*base, stage, *p, "--target", t, *(["--no-progress"] if stage != "allocate" else [])]
                for t in TARGETS]  # fmt: skip
    if stage == "baseline":
        return [[*base, "evaluate", *p, "--baseline", "--no-progress"]]
    extra = ["--no-progress"] if stage in ("equalize", "profile", "importance") else []
    return [[*base, stage, *p, *extra]]


def run_measured(cmd: list[str]) -> tuple[float, float, int, int]:
    """(wall seconds, CPU seconds (user + system, all threads), peak RSS bytes from the OS, exit code) of one
    child process. CPU seconds are what a shared machine's load does not inflate (wall = CPU / threads on an
    idle machine when the stage keeps its threads busy)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True, bufsize=1)
    peak = {"rss": 0, "at": 0.0, "after": ""}
    last = {"line": "(start)"}

    def sample() -> None:  # the RSS every 0.2 s: where in the stage the peak falls
        while proc.poll() is None:
            rss = _vm_rss(proc.pid)
            if rss > peak["rss"]:
                peak.update(rss=rss, at=time.perf_counter() - t0, after=last["line"])
            time.sleep(0.2)

    def relay() -> None:  # the child's log, each line with its time and the RSS then
        assert proc.stderr is not None
        for line in proc.stderr:
            last["line"] = line.strip()[:120]
            sys.stderr.write(f"[{time.perf_counter() - t0:7.1f} s {_vm_rss(proc.pid) / GB:5.2f} GB] {line}")

    threads = [threading.Thread(target=f, daemon=True) for f in (sample, relay)]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    for t in threads:
        t.join(timeout=5)
    print(
        f"  sampled peak {peak['rss'] / GB:.2f} GB at {peak['at']:.1f} s, after: {peak['after']}", flush=True
    )
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return time.perf_counter() - t0, cpu, usage.ru_maxrss * 1024, proc.returncode


def _vm_rss(pid: int) -> int:
    """The resident set of process `pid` now, bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def bound(a: argparse.Namespace, stage: str, params: dict) -> int:
    """The stated bound of a stage's peak RSS, bytes (`params`: the run's params.yaml)."""
    h, inter, layers, _, _, _, _ = shape(a.size, a.layers)
    shapes = shapes_of(a.size, a.layers)
    sizes = sorted((math.prod(s) for s in shapes.values()), reverse=True)
    block = sum(math.prod(s) for n, s in shapes.items() if n.startswith("model.layers.0."))
    cal = params["importance" if stage == "importance" else "equalize" if stage == "equalize" else "eval"]
    tokens = cal["n_windows"] * cal["window"]
    boundaries = layers + 2 if stage == "importance" else 2
    acts = boundaries * tokens * h * 4
    base = 4 * (sizes[0] + sizes[1]) + 4 * block + acts + int(1.5 * GB)
    imp = params["importance"]
    if stage != "importance" or not imp["hessian_windows"] or imp["hessians"] != "all":
        return base
    # The Hessian pass is headless and drops the embedding while the blocks run: one block, the Hessian
    # windows' activations in and out of it, and the block's Hessians and gains (a Llama block's distinct
    # inputs: q/k/v, o, gate/up read h-wide inputs, down the intermediate).
    hessian_pass = 4 * block + 2 * imp["hessian_windows"] * imp["window"] * h * 4 + int(1.5 * GB)
    held = imp["hessian_windows"] // 2 * imp["window"]  # the odd windows' tokens
    return max(base, hessian_pass + hessian_bytes([h, h, h, inter], held))


def hessian_bytes(inputs: list[int], held: int = 0) -> int:
    """What the Hessians and gains of one block add to the importance stage's peak (every linear layer's
    Hessian), bytes, with `held` held-out (odd-window) tokens. While the block's windows run: two float64
    accumulators per distinct input of width k (all windows and the even ones, 16 k^2 each), the held-out
    tokens' inputs of every input wider than their count (gptq.held_out_rule: 4 held k each), and one
    window's product x^T x in float32 and float64, a block of PRODUCT_ROWS rows at a time (12 k min(k,
    PRODUCT_ROWS), the widest input's at most). Then the inputs are finished narrowest first, each one's
    accumulators freed before the next: input i's gains run with what the inputs after it hold plus its own
    working set: with the held-out H (taken in place of the full one), 32 k^2 (the even and held-out
    accumulators, the held-out float32 copy 4 k^2, the factor's float64 buffer 8 k^2 and its float32 result
    4 k^2); with the held-out inputs, 20 k^2 + 4 held k (the full accumulator freed, no copy)."""
    from mintbuild.calibration.hessians import PRODUCT_ROWS
    from mintbuild.mlx.gptq import held_out_rule

    ks = sorted(inputs)

    def kept(k: int) -> int:  # an unfinished input's accumulators and held-out inputs
        return 16 * k * k + (4 * held * k if held_out_rule(held, k) else 0)

    def working(k: int) -> int:  # a finishing input's
        return 20 * k * k + 4 * held * k if held_out_rule(held, k) else 32 * k * k

    walk = sum(kept(k) for k in ks) + 12 * ks[-1] * min(ks[-1], PRODUCT_ROWS)
    return max(walk, *(sum(kept(k) for k in ks[i + 1 :]) + working(ks[i]) for i in range(len(ks))))


#: The gain `--gptq-everywhere` writes for every tensor and option (below 1: rounding.gptq_helps).
FORCED_GAIN = 0.99


def force_gptq(run_params: dict) -> None:
    """Mark every gain in the run's importance.json FORCED_GAIN (idempotent)."""
    path = Path(run_params["solver"]["importance"])
    doc = json.loads(path.read_text())
    for gains in doc["rounding_gain"]["tensors"].values():
        gains.update(dict.fromkeys(gains, FORCED_GAIN))
    path.write_text(json.dumps(doc, indent=1))


def run(a: argparse.Namespace) -> list[tuple]:
    """Run the stages on a.layers blocks; print and return (label, wall, CPU, peak RSS, bound, exit code) per
    stage command, also written to the run folder's results.json (with the params and stages they used)."""
    env_note = {k: os.environ.get(k) for k in ("MINTBUILD_CACHE", "NUMBA_CACHE_DIR")}
    a.dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = ensure_checkpoint(a)
    gen_s = time.perf_counter() - t0
    n_params = sum(math.prod(s) for s in shapes_of(a.size, a.layers).values())
    work = a.dir / ("run-" + checkpoint_folder(a).name.removeprefix("llama-"))
    work.mkdir(exist_ok=True)
    params = write_params(a, model, work)
    run_params = yaml.safe_load(params.read_text())
    record = work / "results.json"
    if a.per_block and record.is_file():
        saved = json.loads(record.read_text())
        if (
            saved["params"] == run_params
            and saved["stages"] == a.stages
            and saved.get("gptq_everywhere", False) == a.gptq_everywhere
            and all(r[-1] == 0 for r in saved["rows"])
        ):
            print(f"# {a.size}, {a.layers} block(s): read {record}")
            return [tuple(r) for r in saved["rows"]]
    print(f"# {a.size}: {n_params / 1e9:.2f}B parameters, {model} (ready in {gen_s:.0f} s); params {params}")
    eq, imp, ev = run_params["equalize"], run_params["importance"], run_params["eval"]
    print(f"# windows (n x tokens): equalize {eq['n_windows']} x {eq['window']}, importance {imp['n_windows']} x "
          f"{imp['window']} + {imp['hessian_windows']} Hessian windows ({imp['hessians']}), eval {ev['n_windows']} "
          f"x {ev['window']}; equalize grid {eq['grid']}, search_rows {eq['search_rows']}, screen_rows "
          f"{eq.get('screen_rows', 'default')}; pack.rounding {run_params['pack']['rounding']}; targets {TARGETS}; "
          f"threads {a.threads}; eval.dtype {ev.get('dtype')}; env {env_note}"
          + (f"; every GPTQ gain marked {FORCED_GAIN} before allocate" if a.gptq_everywhere else ""))  # fmt: skip
    shutil.rmtree(work / "pack-cache", ignore_errors=True)
    rows: list[tuple] = []
    for stage in [s for s in a.stages.split(",") if s]:
        if stage not in STAGES:
            raise SystemExit(f"unknown stage {stage!r}; choose from {STAGES}")
        if stage == "allocate" and a.gptq_everywhere:
            force_gptq(run_params)
        for cmd in commands(stage, params):
            label = stage + (f" {cmd[cmd.index('--target') + 1]}" if "--target" in cmd else "")
            wall, cpu, rss, rc = run_measured(cmd)
            b = bound(a, stage, run_params)
            rows.append((label, wall, cpu, rss, b, rc))
            print(f"{label:20s} wall {wall:8.1f} s  CPU {cpu:8.1f} s  peak RSS {rss / GB:6.2f} GB  bound {b / GB:6.2f} GB  "
                  f"{'OK' if rss <= b else 'OVER'}{'' if rc == 0 else f'  FAILED (exit {rc})'}", flush=True)  # fmt: skip
            if rc:
                break
        if rows and rows[-1][-1]:
            break  # a later stage needs this one's output
    record.write_text(json.dumps({"params": run_params, "stages": a.stages, "gptq_everywhere": a.gptq_everywhere,
                                  "rows": rows}, indent=1))  # fmt: skip
    print("\n| stage | wall (s) | CPU (s) | peak RSS (GB) | bound (GB) |\n|---|---|---|---|---|")
    for label, wall, cpu, rss, b, rc in rows:
        print(
            f"| {label} | {wall:.0f} | {cpu:.0f} | {rss / GB:.2f} | {b / GB:.2f} |"
            + ("" if rc == 0 else " failed |")
        )
    return rows


def extrapolate(a: argparse.Namespace, one: list[tuple], two: list[tuple]) -> None:
    """Print each stage at the shape's block count from its 1- and 2-block runs: t(1) + (L - 1)(t(2) - t(1))."""
    blocks = SHAPES[a.size][2]
    print(f"\n## {a.size} at {blocks} blocks, extrapolated from 1 and 2 blocks\n")
    print("| stage | CPU s, 1 block | CPU s, 2 blocks | CPU s per block | CPU h, whole | wall h, whole | "
          "peak RSS GB (2 blocks) |\n|---|---|---|---|---|---|---|")  # fmt: skip
    total_cpu = total_wall = 0.0
    for r1, r2 in zip(one, two, strict=True):
        per_cpu, per_wall = r2[2] - r1[2], r2[1] - r1[1]
        cpu, wall = r1[2] + (blocks - 1) * per_cpu, r1[1] + (blocks - 1) * per_wall
        total_cpu, total_wall = total_cpu + cpu, total_wall + wall
        print(f"| {r1[0]} | {r1[2]:.0f} | {r2[2]:.0f} | {per_cpu:.0f} | {cpu / 3600:.2f} | {wall / 3600:.2f} | "
              f"{r2[3] / GB:.2f} |")  # fmt: skip
    print(f"| **all** | | | | **{total_cpu / 3600:.1f}** | **{total_wall / 3600:.1f}** | |")


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.generate_only:
        generate(a)
        return
    if not a.per_block:
        run(a)
        return
    runs = [run(argparse.Namespace(**{**vars(a), "layers": n})) for n in (1, 2)]
    if all(r[-1] == 0 for rows in runs for r in rows) and len(runs[0]) == len(runs[1]):
        extrapolate(a, *runs)


if __name__ == "__main__":
    main()
