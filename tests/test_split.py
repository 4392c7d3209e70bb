"""Split budgets (a gpu and a cpu memory): the budgets, the placement rules, the solver against brute force, and a
tiny random qwen2_moe end to end (convert, imatrix, GGUF profile, allocate, llama-quantize) whose -ot rules real
llama.cpp obeys: its load log overrides to the CPU exactly the tensors the plan puts there."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mintbuild.artifacts.model import write_local_manifest
from mintbuild.budget import ModelFacts, format_size, resolve_budget, resolve_split_budget
from mintbuild.config import (
    ConvertConfig,
    ImportanceConfig,
    PlacementRule,
    ProfileConfig,
    TargetConfig,
    load_params,
)
from mintbuild.errors import InfeasibleBudget, MintError
from mintbuild.llamacpp.build import run_tool
from mintbuild.llamacpp.placement import PLACEMENT_FILE, override_rules
from mintbuild.placement import CPU, EITHER, GPU, split_diff_rows, split_table, where_for
from mintbuild.solve.split import solve_split
from mintbuild.stages import allocate, importance, pack_gguf, profile_gguf, report
from mintbuild.stages.convert import convert
from tests.dvcrepo import write_text
from tests.gguf_synth import SMOLLM2_VOCAB, TOKENIZER_FILES, smollm2_tokenizer

FACTS = ModelFacts(parameters=1000, bytes_16bit=2000, layers=2, kv_heads=2, head_dim=64)
GiB = 2**30


# ---------------------------------------------------------------- budgets


def test_split_budget_charges_the_kv_cache_to_the_gpu() -> None:
    t = TargetConfig(
        memory={"gpu": "24GiB", "cpu": "64GiB"},
        reserve={"gpu": "1GiB", "cpu": "4GiB"},
        kv_context=4096,
        kv_batch=2,
    )
    b = resolve_split_budget(t, FACTS, "t")
    kv = 2 * 2 * 2 * 64 * 4096 * 2 * 2
    assert (b.gpu, b.cpu, b.kv_bytes) == (23 * GiB - kv, 60 * GiB, kv)
    assert "KV cache" in b.gpu_why and "KV" not in b.cpu_why


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"memory": {"gpu": "8GiB"}}, "missing: \\['cpu'\\]"),
        ({"memory": {"gpu": "8GiB", "cpu": "8GiB", "npu": "1GiB"}}, "unknown: \\['npu'\\]"),
        ({"memory": {"gpu": "8GiB", "cpu": "8GiB"}, "reserve": "1GiB"}, "reserve per side"),
        ({"memory": {"gpu": "8GiB", "cpu": "8GiB"}, "size": "1GB"}, "drop size"),
        ({"memory": {"gpu": "1MiB", "cpu": "8GiB"}, "kv_context": 4096}, "no gpu memory left"),
    ],
)
def test_split_budget_refusals_are_one_line(kw: dict, msg: str) -> None:
    with pytest.raises(MintError, match=msg) as e:
        resolve_split_budget(TargetConfig(**kw), FACTS, "t")
    assert len(str(e.value).splitlines()) == 1


def test_one_budget_targets_are_unchanged_and_refuse_a_pair() -> None:
    assert resolve_budget(TargetConfig(memory="1GiB", reserve="100MiB"), FACTS, "t")[0] == GiB - 100 * 2**20
    with pytest.raises(MintError, match="split target"):
        resolve_budget(TargetConfig(memory={"gpu": "1GiB", "cpu": "1GiB"}), FACTS, "t")


def test_placement_presets_rules_and_runtime_pins() -> None:
    decisions = [
        {"name": "token_embd.weight", "role": "embedding"},
        {"name": "blk.0.attn_q.weight", "role": "attn_q"},
        {"name": "blk.0.ffn_up_exps.weight", "role": "moe_experts"},
        {"name": "output.weight", "role": "lm_head"},
    ]
    t = TargetConfig(memory={"gpu": "1GiB", "cpu": "1GiB"}, placement="experts_on_cpu")
    assert where_for(decisions, t, "t", "gguf").tolist() == [CPU, EITHER, CPU, EITHER]
    assert where_for(decisions, TargetConfig(memory={"gpu": "1GiB", "cpu": "1GiB"}), "t", "gguf").tolist() == [
        CPU, EITHER, EITHER, EITHER,
    ]  # fmt: skip
    t.placement_rules = [PlacementRule(pattern=r"^output\.", side="gpu")]
    assert where_for(decisions, t, "t", "gguf").tolist() == [CPU, EITHER, CPU, GPU]
    t.placement_rules = [PlacementRule(pattern="nothing", side="gpu")]
    with pytest.raises(MintError, match="matches no tensor"):
        where_for(decisions, t, "t", "gguf")
    with pytest.raises(MintError, match="experts_on_cpu"):
        where_for(decisions, TargetConfig(placement="gpu_first"), "t", "gguf")


# ---------------------------------------------------------------- the solver against brute force


def _brute(sizes, costs, where, bg, bc, price) -> float:
    n, k = costs.shape
    best = math.inf
    for combo in itertools.product(range(2 * k), repeat=n):
        g = c = 0
        v = 0.0
        for i, j in enumerate(combo):
            o, s = divmod(j, 2)
            if not np.isfinite(costs[i, o]) or (where[i] != EITHER and where[i] != s):
                break
            g, c = (g + sizes[i, o], c) if s == GPU else (g, c + sizes[i, o])
            v += costs[i, o] + (price * sizes[i, o] if s == CPU else 0.0)
        else:
            if g <= bg and c <= bc:
                best = min(best, v)
    return best


@pytest.mark.parametrize("seed", range(3))
def test_split_solver_matches_brute_force(seed: int) -> None:
    """Oracle: every (option, side) of every row enumerated. The answer fits both budgets, its bound never
    exceeds the optimum, and it is proven optimal and equal to it; infeasible pairs are refused."""
    rng = np.random.default_rng(seed)
    refused = 0
    for _ in range(120):
        n, k = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        sizes = rng.integers(1, 100, (n, k))
        costs = rng.random((n, k)) * 10
        costs[rng.random((n, k)) < 0.2] = np.inf
        costs[:, 0] = np.where(np.isfinite(costs[:, 0]), costs[:, 0], 5.0)
        where = rng.choice([GPU, CPU, EITHER, EITHER, EITHER], n)
        bg, bc = (int(x) for x in rng.integers(0, sizes.sum() + 1, 2))
        price = float(rng.random() * 0.05)
        want = _brute(sizes, costs, where, bg, bc, price)
        if math.isinf(want):
            with pytest.raises(InfeasibleBudget):
                solve_split(sizes, costs, where, bg, bc, cpu_price=price)
            refused += 1
            continue
        r = solve_split(sizes, costs, where, bg, bc, cpu_price=price)
        rows = np.arange(n)
        assert r.gpu_bytes == sizes[rows, r.option][r.side == GPU].sum() <= bg
        assert r.cpu_bytes == sizes[rows, r.option][r.side == CPU].sum() <= bc
        assert ((where == EITHER) | (r.side == where)).all()
        assert r.bound <= want + 1e-9 and r.optimal
        assert r.objective == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert 0 < refused < 120


def test_infeasible_pair_names_each_sides_floor() -> None:
    sizes = np.array([[10, 20], [30, 60], [5, 9]])
    costs = np.array([[2.0, 1.0], [2.0, 1.0], [2.0, 1.0]])
    where = np.array([GPU, CPU, EITHER])
    with pytest.raises(InfeasibleBudget, match="gpu 10 B, cpu 30 B, both together 45 B"):
        solve_split(sizes, costs, where, 9, 100)
    r = solve_split(sizes, costs, where, 10, 35, cpu_price=0.001)
    assert (r.gpu_bytes, r.cpu_bytes) == (10, 35) and r.optimal


def test_price_moves_bytes_to_the_gpu_and_trades_quality_when_high() -> None:
    """A low price keeps the best options and fills the gpu first; a price above the loss a bigger option saves
    shrinks tensors until they all fit the gpu (2 x 50 B there: loss 2 < 100 B x 0.03 on the cpu)."""
    sizes = np.array([[50, 100], [50, 100]])
    costs = np.array([[1.0, 0.0], [1.0, 0.0]])
    where = np.full(2, EITHER)
    r = solve_split(sizes, costs, where, 100, 200, cpu_price=1e-6)
    assert (r.gpu_bytes, r.cpu_bytes, r.loss) == (100, 100, 0.0) and r.optimal
    r = solve_split(sizes, costs, where, 100, 200, cpu_price=0.03)
    assert (r.gpu_bytes, r.cpu_bytes, r.loss) == (100, 0, 2.0) and r.optimal


# ---------------------------------------------------------------- a tiny MoE through the GGUF build

#: Types the tiny MoE's profile measures (BF16 is added as the passthrough).
OPTIONS = ["Q3_K", "Q4_K", "Q5_0", "Q8_0"]


def _tiny_qwen2_moe(out: Path, tokenizer: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "qwen2_moe",
        vocab_size=SMOLLM2_VOCAB,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=256,
        shared_expert_intermediate_size=256,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copyfile(tokenizer / name, out / name)
    return out


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    model = _tiny_qwen2_moe(root / "model", smollm2_tokenizer(root / "tokenizer"))
    corpus = root / "corpus"
    corpus.mkdir()
    write_text(corpus / "train.txt", docs=12, words=400)
    convert(model, ConvertConfig(), root / "convert")
    cal = ImportanceConfig(n_windows=2, window=64, seed=0, threads=1, hessian_windows=0)
    importance.run(model, corpus, cal, root / "importance", progress=False)
    cfg = ProfileConfig(gguf_option_list=OPTIONS)
    profile_gguf.run(root / "convert", model, root / "importance", cfg, root / "profile_gguf", progress=False)
    write_local_manifest(model, root / "equalize")
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    params.equalize.out, params.convert.out = str(root / "equalize"), str(root / "convert")
    params.profile.gguf_out, params.importance.out = str(root / "profile_gguf"), str(root / "importance")
    params.solver.importance = str(root / "importance" / "importance.json")
    params.allocate_out, params.pack_out = str(root / "allocate"), str(root / "pack")
    return {"root": root, "model": model, "params": params}


def _split_target(gpu: int, cpu: int, **kw) -> TargetConfig:
    return TargetConfig(memory={"gpu": f"{gpu}B", "cpu": f"{cpu}B"}, kv_context=256, formats=["gguf"], **kw)


def _loaded_overrides(gguf_path: Path, rules: list[str]) -> tuple[set[str], set[str]]:
    """(tensors llama.cpp loaded, tensors it overrode to CPU) from its debug load log."""
    args = ["-m", gguf_path, "-ngl", "99", "-n", "1", "-p", "hi", "-lv", "5", "--no-warmup", "-no-cnv"]
    if rules:
        args += ["-ot", ",".join(rules)]
    log = run_tool("llama-completion", args, cwd=gguf_path.parent)
    text = (log.stdout or "") + (log.stderr or "")
    loaded = set(re.findall(r"loading tensor (\S+)", text))
    over = set(re.findall(r"tensor (\S+) \([^)]*\) buffer type overridden to CPU", text))
    return loaded, over


@pytest.mark.parametrize("placement", ["experts_on_cpu", "any"])
def test_tiny_moe_split_target_builds_and_llama_cpp_places_every_tensor(
    moe: dict[str, Path], placement: str
) -> None:
    params = moe["params"]
    probe = TargetConfig(bits_per_weight=16.0, formats=["gguf"])
    params.targets = {"probe": probe}
    full = allocate.run(params, None, moe["root"] / "x", Path(params.allocate_out), moe["model"])["probe"]
    total = full["totals"]["bytes"]
    # Both sides a fraction of the 16-bit model, so that bits and sides are both decided.
    gpu, cpu = int(total * 0.25), int(total * 0.45)
    kv = 2 * 2 * 2 * 64 * 256 * 2
    params.targets = {"s": _split_target(gpu + kv, cpu, placement=placement)}
    alloc = allocate.run(params, None, moe["root"] / "x", Path(params.allocate_out), moe["model"])["s"]
    split = alloc["split"]
    assert split["gpu"]["budget"] == gpu and split["cpu"]["budget"] == cpu
    on = {s: [d for d in alloc["decisions"] if d["side"] == s] for s in ("gpu", "cpu")}
    assert split["gpu"]["bytes"] == sum(d["bytes"] for d in on["gpu"]) <= gpu
    assert (
        split["cpu"]["bytes"]
        == sum(d["bytes"] for d in on["cpu"]) + alloc["totals"]["header_allowance"]
        <= cpu
    )
    assert on["gpu"] and on["cpu"] and split["rel_gap"] < 1e-6
    assert all(d["side"] == "cpu" for d in alloc["decisions"] if d["role"] == "embedding")
    if placement == "experts_on_cpu":
        assert all(d["side"] == "cpu" for d in alloc["decisions"] if d["role"] == "moe_experts")
    assert len({d["option"] for d in alloc["decisions"] if d["quantizable"]}) > 1

    # The report and `mintbuild diff` show both sides' bytes.
    row = report.row_of("s", alloc, None)
    assert row["split"]["gpu"] == {"bytes": split["gpu"]["bytes"], "budget": gpu}
    table = "\n".join(split_table([row]))
    assert f"| s | {format_size(split['gpu']['bytes'])} | {format_size(gpu)} |" in table
    assert (
        split_diff_rows({}, alloc)[1]
        == f"| cpu bytes | - | {format_size(split['cpu']['bytes'])} of {format_size(cpu)} |"
    )

    out = Path(params.pack_out) / "s"
    pack_gguf.run(params, ["s"])
    record = json.loads((out / PLACEMENT_FILE).read_text())
    cpu_names = {m for d in on["cpu"] for m in d["members"]}
    gpu_names = {m for d in on["gpu"] for m in d["members"]}
    assert set(record["cpu_tensors"]) == cpu_names and set(record["gpu_tensors"]) == gpu_names
    assert (out / "llama-server.sh").read_text().count("-ot") == 1
    loaded, over = _loaded_overrides(out / "model.gguf", record["override_tensor"])
    assert cpu_names | gpu_names <= loaded
    assert over == cpu_names  # every planned cpu tensor, and nothing planned for the gpu
    # Control: without the rules llama.cpp overrides nothing (the check above can fail).
    assert _loaded_overrides(out / "model.gguf", [])[1] == set()
    # A pair that cannot hold the model is refused before any work, naming each side's floor.
    params.targets = {"tight": _split_target(gpu + kv, total // 20, placement=placement)}
    with pytest.raises(
        InfeasibleBudget, match=r"cpu floor .* > cpu budget .*gpu floor [0-9,]+ B, cpu floor"
    ) as e:
        allocate.run(params, None, moe["root"] / "x", Path(params.allocate_out), moe["model"])
    assert len(str(e.value).splitlines()) == 1 and not (Path(params.allocate_out) / "tight").exists()


def test_override_rules_match_exactly_the_names() -> None:
    names = [f"blk.{i}.ffn_{p}_exps.weight" for i in range(12) for p in ("up", "down")] + [
        "token_embd.weight"
    ]
    cpu = [n for n in names if n.startswith(("blk.1.", "blk.10.", "token"))]
    rules = override_rules(cpu)
    assert {n for n in names if any(re.search(r, n) for r in rules)} == set(cpu)
    assert rules[0] == r"^token_embd\.weight$"


def test_mlx_split_target_is_refused_in_one_line() -> None:
    from mintbuild.placement import solve_placement

    t = TargetConfig(memory={"gpu": "1GiB", "cpu": "1GiB"})
    with pytest.raises(MintError, match="unified memory") as e:
        solve_placement(None, t, "m", "mlx")
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.e2e
def test_a_split_target_builds_through_dvc_repro(tmp_path: Path) -> None:
    """The user's path: a split target in params, `dvc repro` (convert, imatrix, GGUF profile, split allocate,
    pack with its -ot rules, evaluate). Held to the byte on the file itself: the GGUF's tensors planned for the
    GPU fit the GPU's weight budget, and everything else in the file (RAM-resident through the mmap: CPU
    tensors, header, padding) fits the CPU's; llama.cpp places exactly the plan; the target is scored; a second
    repro runs nothing."""
    import gguf
    from safetensors import safe_open

    from .dvcrepo import make_repo, ran, sh, tiny_params

    model = _tiny_qwen2_moe(tmp_path / "model", smollm2_tokenizer(tmp_path / "tokenizer"))
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        names = list(f.keys())  # a safetensors handle is not iterable
        total = sum(2 * math.prod(f.get_slice(k).get_shape()) for k in names)
    gpu, cpu, kv = int(total * 0.25), int(total * 0.45), 2 * 2 * 2 * 64 * 256 * 2
    target = {"memory": {"gpu": f"{gpu + kv}B", "cpu": f"{cpu}B"}, "kv_context": 256,
              "placement": "experts_on_cpu", "formats": ["gguf"]}  # fmt: skip
    params = tiny_params(model, write_text(tmp_path / "text.txt", docs=12, words=400), {"s": target})
    params["convert"]["enabled"] = True
    params["equalize"]["method"] = "none"  # the GGUF path is under test: the cheapest MLX-side calibration
    params["profile"]["option_list"] = ["q8g64"]
    params["importance"]["hessian_windows"] = 0
    repo = make_repo(tmp_path / "repo", params)

    first = ran(sh(repo, "dvc", "repro"))
    assert {"convert", "profile_gguf", "allocate_gguf@s", "pack_gguf@s", "evaluate_gguf@s"} <= first
    alloc = json.loads((repo / "artifacts/allocate/s/allocation.json").read_text())
    assert alloc["split"]["gpu"]["budget"] == gpu and alloc["split"]["cpu"]["budget"] == cpu
    out = repo / "artifacts/pack/s"
    record = json.loads((out / PLACEMENT_FILE).read_text())
    sizes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    on_gpu = sum(sizes[n] for n in record["gpu_tensors"])
    assert set(record["gpu_tensors"]) | set(record["cpu_tensors"]) == set(sizes)
    assert 0 < on_gpu == alloc["split"]["gpu"]["bytes"] <= gpu
    assert 0 < (out / "model.gguf").stat().st_size - on_gpu <= cpu
    assert {n for n in sizes if "_exps" in n} <= set(record["cpu_tensors"])
    loaded, over = _loaded_overrides(out / "model.gguf", record["override_tensor"])
    assert set(sizes) <= loaded and over == set(record["cpu_tensors"])
    metrics = json.loads((repo / "artifacts/evaluate/s/metrics.json").read_text())
    assert math.isfinite(metrics["ppl_mean"]) and math.isfinite(metrics["llama_perplexity"]["ppl"])
    assert "gpu" in (repo / "artifacts/report/report.md").read_text()
    assert ran(sh(repo, "dvc", "repro")) == set()


@pytest.mark.e2e
def test_a_tied_head_stays_on_the_cpu_with_the_embedding(tmp_path: Path) -> None:
    """A tied model's GGUF has no output.weight: llama.cpp loads token_embd a second time as the output head,
    under the same name. The cpu rule the plan writes for token_embd (a runtime pin) overrides both loads, so no
    copy of it reaches the GPU side (nothing to charge there) and the cpu side holds the one mmap'd tensor.
    Control: without the rule neither load is overridden."""
    import gguf

    from mintbuild.artifacts.convert import GGUF_FILE
    from mintbuild.llamacpp.placement import override_rules

    from .gguf_synth import tiny_convertible

    model = tiny_convertible(tmp_path / "model", smollm2_tokenizer(tmp_path / "tokenizer"))
    convert(model, ConvertConfig(), tmp_path / "convert")
    path = tmp_path / "convert" / GGUF_FILE
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names

    def loads(rules: list[str]) -> tuple[int, int]:
        """(loads of token_embd, of them overridden to CPU); llama-completion may load the model more than once."""
        args = ["-m", path, "-ngl", "99", "-n", "1", "-p", "hi", "-lv", "5", "--no-warmup", "-no-cnv"]
        log = run_tool("llama-completion", args + (["-ot", ",".join(rules)] if rules else []))
        text = (log.stdout or "") + (log.stderr or "")
        heads = text.count("loading tensor output.weight")  # asked for, then token_embd loaded in its place
        embd = text.count("loading tensor token_embd.weight")
        assert heads >= 1 and embd == 2 * heads
        over = re.findall(r"tensor (\S+) \([^)]*\) buffer type overridden to CPU", text)
        assert set(over) <= {"token_embd.weight"}
        return embd, len(over)

    embd, over = loads([f"{r}=CPU" for r in override_rules(["token_embd.weight"])])
    assert over == embd  # both copies, every load
    assert loads([])[1] == 0
