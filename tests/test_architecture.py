"""The one-way house: stages import libraries only, dvc.yaml names every module a stage runs, DVC reruns exactly
the stages that import an edited library, light stages stay light, and the dataclass defaults are conf/'s."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mintbuild"
#: May call several stages: the CLI dispatches to one by name, sweep composes allocate/pack/evaluate/report.
COMPOSERS = {"cli", "sweep"}
#: Verbs with no DVC stage of their own (they read artifacts, or write params.yaml / a sweep folder).
NO_STAGE = {"compose", "predict", "diff", "sweep"}
LIGHT = ("allocate", "report", "predict", "diff", "sweep")


def module_file(name: str) -> Path:
    """mintbuild.a.b -> mintbuild/a/b.py or mintbuild/a/b/__init__.py."""
    base = ROOT / Path(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def direct_imports(name: str) -> set[str]:
    """mintbuild modules `name` imports anywhere (module level or inside functions: both run), except under
    `if TYPE_CHECKING:`; `from pkg import mod` counts the submodule."""
    file = module_file(name)
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(file.read_text(encoding="utf-8"))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
            for n in ast.walk(node) if n is not node}  # fmt: skip
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mintbuild"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if not mod.startswith("mintbuild"):
                continue
            found.add(mod)
            for a in node.names:
                if module_file(f"{mod}.{a.name}").is_file():
                    found.add(f"{mod}.{a.name}")
    return found


def closure(name: str) -> set[str]:
    """Every mintbuild module that runs when `name` is imported: its imports, transitively, and the packages
    (__init__.py) that Python executes on the way."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(direct_imports(m))
    return seen


def files_of(modules: set[str]) -> set[str]:
    return {module_file(m).relative_to(ROOT).as_posix() for m in modules}


def dvc_stages() -> dict[str, dict]:
    """stage name -> its definition (foreach stages by their template)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: s.get("do", s) for name, s in stages.items()}


def stage_verb(stage: dict) -> str:
    """The stage's verb as its module is named (`pack-gguf` runs mintbuild/stages/pack_gguf.py)."""
    return stage["cmd"].split()[1].replace("-", "_")


def stage_code_deps(stage: dict) -> set[str]:
    listed = {d for d in stage.get("deps", []) if isinstance(d, str) and d.startswith("mintbuild")}
    covered = set()
    for d in listed:
        p = ROOT / d
        covered |= {f.relative_to(ROOT).as_posix() for f in p.rglob("*.py")} if p.is_dir() else {d}
    return covered


STAGE_MODULES = sorted(
    p.stem for p in (PKG / "stages").glob("*.py") if (p.read_text().find("def configure_parser") >= 0)
)


def test_every_verb_module_is_a_stage_or_says_why_not() -> None:
    from mintbuild.cli import VERBS

    assert sorted(v.replace("-", "_") for v in VERBS) == sorted(STAGE_MODULES)
    verbs_with_stages = {stage_verb(s) for s in dvc_stages().values()}
    assert verbs_with_stages == {v.replace("-", "_") for v in VERBS} - NO_STAGE


@pytest.mark.parametrize("verb", [v for v in STAGE_MODULES if v not in COMPOSERS])
def test_a_stage_imports_libraries_only(verb: str) -> None:
    stages = set(STAGE_MODULES)
    bad = sorted(
        m
        for m in closure(f"mintbuild.stages.{verb}")
        if m.rpartition(".")[2] in stages and m.startswith("mintbuild.stages.")
    )
    bad = [m for m in bad if m != f"mintbuild.stages.{verb}"]
    assert not bad, (
        f"mintbuild/stages/{verb}.py runs other stage module(s) {bad}: move the helper into a library"
    )


@pytest.mark.parametrize("stage", sorted(dvc_stages()))
def test_dvc_deps_name_every_module_the_stage_runs(stage: str) -> None:
    definition = dvc_stages()[stage]
    if definition.get("always_changed"):
        pytest.skip(f"{stage} runs on every repro (always_changed): code deps would change nothing")
    verb = stage_verb(definition)
    # cli.py only parses arguments and dispatches to the verb's module; it never touches an artifact.
    want = files_of(closure(f"mintbuild.stages.{verb}"))
    got = stage_code_deps(definition)
    assert not want - got, (
        f"dvc.yaml stage {stage!r} misses {sorted(want - got)} (imported by mintbuild/stages/{verb}.py)"
    )
    assert not got - want, f"dvc.yaml stage {stage!r} lists {sorted(got - want)}, which it never imports"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _status(repo: Path) -> dict[str, set[str]]:
    """stage -> code files DVC says changed (`dvc status --json`): what `dvc repro` would rerun them for."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    changed: dict[str, set[str]] = {}
    for stage, entries in json.loads(out.stdout or "{}").items():
        for entry in entries:
            if isinstance(entry, dict):
                deps = entry.get("changed deps", {})
                changed.setdefault(stage, set()).update(d for d in deps if d.startswith("mintbuild"))
    return {k: v for k, v in changed.items() if v}


def locked_repo(tmp_path: Path) -> Path:
    """A real DVC repo holding this checkout's mintbuild/, dvc.yaml and params.yaml, with a lock whose code
    hashes are current (nothing built)."""
    repo = tmp_path / "repo"
    shutil.copytree(PKG, repo / "mintbuild", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / f, repo / f)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=repo, check=True,
                   env={**os.environ, "DVC_NO_ANALYTICS": "1"})  # fmt: skip
    (repo / "dvc.lock").write_text(yaml.safe_dump(built_lock(repo), sort_keys=False))
    return repo


@pytest.mark.e2e
@pytest.mark.parametrize("library", ["mintbuild/calibration/windows.py", "mintbuild/artifacts/profile.py"])
def test_editing_a_library_reruns_exactly_the_stages_that_import_it(tmp_path: Path, library: str) -> None:
    """A real DVC repo holding this dvc.yaml and a lock whose code hashes are current: editing `library`
    makes `dvc status` (what `dvc repro` acts on) flag exactly the stages whose code imports it."""
    repo = locked_repo(tmp_path)
    assert _status(repo) == {}
    with open(repo / library, "a") as f:
        f.write("\n# edited\n")
    want = {
        name
        for name, verb in expanded_stages().items()
        if library in files_of(closure(f"mintbuild.stages.{verb}"))
    }
    assert want, f"no stage imports {library}"
    assert set(_status(repo)) == want


def foreach_items(stage: dict) -> list[str]:
    """The targets a foreach stage iterates over: `${by_format.<format>}` of params.yaml."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    key = stage["foreach"].strip("${}").split(".")
    return list(params[key[0]][key[1]])


#: Per-format DVC stages: a backend's code must reach only its own format's targets.
FORMAT_STAGES = {
    "mlx": ("allocate", "pack", "evaluate"),
    "gguf": ("allocate_gguf", "pack_gguf", "evaluate_gguf"),
}


@pytest.mark.parametrize(
    ("library", "other"), [("mintbuild/llamacpp/pack.py", "mlx"), ("mintbuild/llamacpp/ggml.py", "mlx"),
                           ("mintbuild/mlx/folder.py", "gguf"), ("mintbuild/mlx/quant/pack_kernel.py", "gguf")]
)  # fmt: skip
def test_a_backend_edit_reruns_no_target_of_the_other_format(
    tmp_path: Path, library: str, other: str
) -> None:
    """Real `dvc status` on this dvc.yaml and params.yaml (the default build: MLX targets and a GGUF target):
    editing a module of one backend flags stages of its own format (and the shared ones that import it), never
    an allocate, pack or evaluate of the other format's targets."""
    repo = locked_repo(tmp_path)
    with open(repo / library, "a") as f:
        f.write("\n# edited\n")
    flagged = set(_status(repo))
    own = {s for s in flagged if s.partition("@")[0] in FORMAT_STAGES[{"mlx": "gguf", "gguf": "mlx"}[other]]}
    assert own, f"editing {library} flags none of its own format's stages: {sorted(flagged)}"
    crossed = sorted(s for s in flagged if s.partition("@")[0] in FORMAT_STAGES[other])
    assert not crossed, f"editing {library} reruns {other} stages {crossed}"


def expanded_stages() -> dict[str, str]:
    """DVC stage name (foreach stages as name@target) -> its verb."""
    out = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        verb = stage_verb(stage.get("do", stage))
        out.update(
            {f"{name}@{t}": verb for t in foreach_items(stage)} if "foreach" in stage else {name: verb}
        )
    return out


def built_lock(repo: Path) -> dict:
    """A dvc.lock as a build of this tree would record it, for the code deps: every stage's listed mintbuild
    files with their current md5 (the artifacts are absent; only code changes are looked at)."""
    stages = {}
    for name in expanded_stages():
        base, _, target = name.partition("@")
        definition = dvc_stages()[base]
        deps = []
        for d in sorted(stage_code_deps(definition)):
            f = repo / d
            deps.append({"path": d, "hash": "md5", "md5": _md5(f), "size": f.stat().st_size})
        stages[name] = {"cmd": definition["cmd"].replace("${item}", target), "deps": deps}
    return {"schema": "2.0", "stages": stages}


@pytest.mark.parametrize("verb", LIGHT)
def test_light_stages_import_neither_torch_nor_numba(verb: str) -> None:
    code = (
        f"import sys, mintbuild.stages.{verb}; "
        "heavy = sorted(m for m in ('torch', 'numba', 'transformers', 'llvmlite') if m in sys.modules); "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"mintbuild.stages.{verb} imports {out.stdout.strip()}"


def test_dataclass_defaults_are_the_composed_conf() -> None:
    """Every key conf/ sets has the same value as the schema's default, so code that builds a config in
    Python (tests, benchmarks, a library user) gets the build's behaviour."""
    from omegaconf import OmegaConf

    from mintbuild.config import Params
    from mintbuild.stages.compose import compose_text

    conf = yaml.safe_load(compose_text(ROOT / "conf"))
    defaults = OmegaConf.to_container(OmegaConf.structured(Params))
    diffs = []

    def walk(a: object, b: object, path: str) -> None:
        if isinstance(a, dict):
            for k, v in a.items():
                walk(v, b.get(k) if isinstance(b, dict) else None, f"{path}.{k}")
        elif a != b:
            diffs.append(f"{path}: conf {a!r}, dataclass {b!r}")

    for key, value in conf.items():
        if key not in ("targets", "by_format"):  # the build's own; by_format is derived from targets
            walk(value, defaults.get(key), key)
    assert not diffs, diffs


def test_no_file_holds_two_jobs() -> None:
    """Over ~450 lines a module must say in its docstring that it holds one job."""
    for f in sorted(PKG.rglob("*.py")):
        lines = f.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(f.read_text())) or ""
        assert lines <= 450 or "one job" in doc.lower(), f"{f.relative_to(ROOT)}: {lines} lines"


def rewrite_dvc_deps() -> list[str]:
    """Rewrite each dvc.yaml stage's `mintbuild/...` deps to the modules it imports (comments and every other
    line kept); the stages changed. `python -m tests.test_architecture` runs it after an import changes."""
    lines = (ROOT / "dvc.yaml").read_text().splitlines(keepends=True)
    stages, out, changed, stage = dvc_stages(), [], [], None
    for line in lines:
        m = re.match(r"^  (\w+):\s*$", line)
        if m and m.group(1) in stages:
            stage = m.group(1)
        dep = re.match(r"^(\s+)- (mintbuild/\S+)\s*$", line)
        if not dep or stage is None:
            out.append(line)
            continue
        want = sorted(files_of(closure(f"mintbuild.stages.{stage_verb(stages[stage])}")))
        if out[-1].strip() != "deps:" and re.match(r"^\s+- mintbuild/", out[-1]):
            continue  # the stage's module block was already written
        out.extend(f"{dep.group(1)}- {f}\n" for f in want)
        if set(want) != stage_code_deps(stages[stage]):
            changed.append(stage)
    (ROOT / "dvc.yaml").write_text("".join(out))
    return changed


if __name__ == "__main__":
    print("rewrote the deps of:", ", ".join(rewrite_dvc_deps()) or "nothing")


def test_readme_lists_every_verb_with_its_help() -> None:
    """The README's verb table is cli.VERBS, row for row (regenerate it from VERBS after a change)."""
    from mintbuild.cli import VERBS

    rows = re.findall(r"^\| `([a-z-]+)` \| (.+) \|$", (ROOT / "README.md").read_text(), re.M)
    assert rows == list(VERBS.items())


def test_the_default_llamacpp_cache_is_the_checkouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without $MINTBUILD_CACHE llama.cpp is built once into the checkout's .cache/mintbuild (the Makefile's
    default too), wherever the backend's module sits in the package."""
    from mintbuild.llamacpp.build import cache_root

    monkeypatch.delenv("MINTBUILD_CACHE", raising=False)
    assert cache_root() == ROOT / ".cache" / "mintbuild"
