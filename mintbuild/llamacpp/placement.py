"""llama.cpp's side of a split target: `--override-tensor` rules and ready command lines beside the GGUF.

A split allocation (mintbuild.placement) records each tensor's side. llama.cpp offloads every layer with
`-ngl 99` and keeps a tensor in host memory when an `-ot <regex>=CPU` rule matches its name (std::regex_search,
first matching rule wins; the loader logs "tensor <name> (...) buffer type overridden to CPU" at debug verbosity).
So the rules name exactly the cpu-side tensors: one anchored regex per tensor-name template with its block
numbers as an alternation (`^blk\\.(0|1|7)\\.ffn_up_exps\\.weight$`); `check_rules` proves on the file's tensor
list that they match the cpu tensors and nothing else. Files written (`write_placement`): placement.json (sides,
bytes, rules, argv), llama-server.sh and llama-cli.sh (run from anywhere; the model path is the script's folder).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from mintbuild.errors import MintError
from mintbuild.io import atomic_write_json, atomic_write_text

PLACEMENT_FILE = "placement.json"
SCRIPTS = {"llama-server": "llama-server.sh", "llama-cli": "llama-cli.sh"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def cpu_tensors(alloc: dict[str, Any]) -> list[str]:
    """The GGUF tensors a split allocation puts in cpu memory (sorted)."""
    return sorted(m for d in alloc["decisions"] if d.get("side") == "cpu" for m in d["members"])


def override_rules(names: list[str]) -> list[str]:
    """Anchored regexes (llama.cpp's ECMAScript flavour and Python's agree on these) matching exactly `names`:
    per template (the name with its block number taken out), the block numbers as an alternation."""
    by_template: dict[str, list[int]] = {}
    plain: list[str] = []
    for n in sorted(set(names)):
        m = _BLOCK.match(n)
        if m:
            by_template.setdefault(m.group(2), []).append(int(m.group(1)))
        else:
            plain.append(n)
    rules = [f"^{re.escape(n)}$" for n in plain]
    for rest, blocks in sorted(by_template.items()):
        alt = "|".join(str(b) for b in sorted(blocks))
        rules.append(f"^blk\\.({alt})\\.{re.escape(rest)}$")
    return rules


def check_rules(rules: list[str], cpu: list[str], all_names: list[str]) -> None:
    """Refuse rules that miss a cpu tensor or catch another one (a one-line error naming it)."""
    hit = {n for n in all_names if any(re.search(r, n) for r in rules)}
    missed = sorted(set(cpu) - hit)
    extra = sorted(hit - set(cpu))
    if missed or extra:
        raise MintError(f"override rules: miss {missed[:3]} / catch {extra[:3]} (a bug in override_rules)")


def command(tool: str, rules: list[str], target_config: dict[str, Any], model: str) -> list[str]:
    """argv for `tool` (llama-server or llama-cli): every layer offloaded, the cpu tensors overridden, the
    context the budget reserved for the KV cache (kv_context tokens x kv_batch sequences = parallel slots)."""
    ctx = int(target_config.get("kv_context") or 0)
    batch = int(target_config.get("kv_batch") or 1)
    argv = [tool, "-m", model, "-ngl", "99"]
    if rules:
        argv += ["-ot", ",".join(f"{r}=CPU" for r in rules)]
    if ctx:
        argv += ["-c", str(ctx * batch)]
        if tool == "llama-server" and batch > 1:
            argv += ["--parallel", str(batch)]
    if int(target_config.get("kv_bytes") or 2) == 1:
        argv += ["-ctk", "q8_0", "-ctv", "q8_0"]
    return argv


def placement_record(alloc: dict[str, Any], all_names: list[str]) -> dict[str, Any]:
    """placement.json's content for a split allocation (checked rules included)."""
    cpu = cpu_tensors(alloc)
    rules = override_rules(cpu)
    check_rules(rules, cpu, all_names)
    split = alloc["split"]
    tc = alloc.get("target_config", {})
    return {
        "target": alloc["target"],
        "gpu_bytes": split["gpu"]["bytes"],
        "cpu_bytes": split["cpu"]["bytes"],
        "gpu_budget": split["gpu"]["budget"],
        "cpu_budget": split["cpu"]["budget"],
        "cpu_tensors": cpu,
        "gpu_tensors": sorted(set(all_names) - set(cpu)),
        "override_tensor": [f"{r}=CPU" for r in rules],
        "commands": {tool: command(tool, rules, tc, "model.gguf") for tool in SCRIPTS},
    }


def write_placement(alloc: dict[str, Any], folder: Path, gguf_file: str, all_names: list[str]) -> None:
    """For a split allocation, write placement.json and the two launch scripts into `folder` (nothing for a
    one-budget allocation)."""
    if "split" not in alloc:
        return
    record = placement_record(alloc, all_names)
    atomic_write_json(folder / PLACEMENT_FILE, record)
    for tool, script in SCRIPTS.items():
        argv = command(tool, override_rules(record["cpu_tensors"]), alloc.get("target_config", {}), "MODEL")
        line = shlex.join(argv).replace("MODEL", '"$(dirname "$0")/' + gguf_file + '"')
        text = (
            "#!/bin/sh\n"
            f"# {alloc['target']}: gpu {record['gpu_bytes']:,} B of {record['gpu_budget']:,} B, cpu "
            f"{record['cpu_bytes']:,} B of {record['cpu_budget']:,} B (mintbuild placement)\n"
            f'exec {line} "$@"\n'
        )
        atomic_write_text(folder / script, text)
        (folder / script).chmod(0o755)
