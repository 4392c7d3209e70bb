"""The linear layers' input Hessians on calibration windows, and GPTQ's held-out gain on each tensor: what
`mintbuild importance` measures so that `mintbuild pack` can round a tensor by GPTQ (gptq.py) and the allocator
can price it as it will be stored.

For every linear layer whose weight is a checkpoint tensor (every nn.Linear of the decoder blocks and the output
head, or with `importance.hessians: head` the head only), H = sum over the tokens of `hessian_windows`
forward-only windows of x x^T, x the layer's input. Layers that read one tensor (a block's q/k/v, gate/up) share
one H, stored once under the first reader's weight name. Each window's product is taken in float32 and summed in
float64; H is stored in float32 (GPTQ factors it in float64).

The model is streamed (streaming.forward_hidden): every window goes through block l before block l+1 is read. When
a block's windows are done, GPTQ's gain on each of its tensors is measured (`gptq.rounding_gain`: GPTQ fitted on
the even-numbered windows' H, output error on the odd ones' over round-to-nearest's, from their H or, for an
input wider than their token count, from their inputs), and only the float32 sum is
kept (`HessianStore`), in a spill folder on disk when the stage gives one: memory is then one block in float32
and its Hessians in float64, not every Hessian of the model (0.4 GB for a 135M model, ~33 GB for an 8B).

One job: the Hessians and gains of the GPTQ rounding.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mintbuild.calibration.windows import Window, calibration_windows, torch_settings
from mintbuild.cluster import Executor, Resources, executor
from mintbuild.config import ImportanceConfig, PackConfig
from mintbuild.errors import MintError
from mintbuild.formats import OPTION_SETS
from mintbuild.hf.checkpoint import open_checkpoint, tied_lm_head
from mintbuild.hf.streaming import CheckpointSource, StreamedModel, check_fits, forward_hidden

log = logging.getLogger(__name__)

#: Rows of a tensor GPTQ's held-out gain is measured on (a seeded sample: GPTQ rounds each row alone).
GAIN_ROWS = 256
#: How far below the allocator's SQNR veto a sampled round-to-nearest SQNR must be for `pickable_options` to skip
#: the option (3 dB: twice the veto's error; the row sample's SQNR is within a few tenths of a dB of the tensor's).
VETO_MARGIN_DB = 3.0
#: Spilled Hessians waiting for their cluster gain tasks, at most (bytes on the shared filesystem).
PENDING_BYTES = 64 << 30
#: importance.hessians: every linear layer, or the output head only (an 8B's per-layer Hessians are ~33 GB).
SCOPES = ("all", "head")

#: done(weight names sharing the input, H over the even-numbered windows (float64), the held-out tokens: H over
#: the odd-numbered windows (float64; done may overwrite it) or their inputs as gptq.HeldOutInputs)
Done = Callable[[list[str], Any, Any], None]


class _HeadInputSeen(Exception):
    """Ends a forward pass at the output head's input, once it is recorded."""


class HessianStore(Mapping[str, Any]):
    """float32 Hessians by key: in memory, or with a `folder` one raw file each, read back on access (so that
    holding them costs disk, not memory)."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._memory: dict[str, Any] = {}
        self._files: dict[str, Path] = {}

    def put(self, key: str, h: Any) -> None:
        h = h.float().contiguous()
        if self.folder is None:
            self._memory[key] = h
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            # named by order of arrival: keys are weight names, which need not make good file names
            self._files[key] = self.folder / f"{len(self._files):05d}.f32"
            h.numpy().tofile(self._files[key])
        self.shapes[key] = tuple(h.shape)

    def __getitem__(self, key: str) -> Any:
        import numpy as np
        import torch

        if self.folder is None:
            return self._memory[key]
        return torch.from_numpy(np.fromfile(self._files[key], dtype=np.float32).reshape(self.shapes[key]))

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


#: Rows of x^T x computed at once while the windows run (see InputHessians._accumulate).
PRODUCT_ROWS = 2048


def held_out(window: int) -> bool:
    """Whether calibration window `window` (0-based) is held out of GPTQ's fit to measure its gain on: the odd
    ones. The fit H sums the even windows; the kept H sums them all."""
    return window % 2 == 1


class InputHessians:
    """Per distinct input of the linear layers: H over all windows and over the even-numbered ones (float64)
    while its block runs, then only float32 H is kept (`kept`, by key, in the folder `spill` when given;
    `key_of` maps every weight name to its key) and `done` sees the even windows' H and the held-out (odd)
    windows' tokens: their Hessian, or, for an input wider than the `held_tokens` odd-window tokens
    (`gptq.held_out_rule`), their inputs themselves, kept while the block runs (4 held_tokens k bytes, less than
    one float32 H)."""

    def __init__(self, wanted: set[str], done: Done, spill: Path | None = None, held_tokens: int = 0) -> None:
        self.wanted, self.done, self.held_tokens = wanted, done, held_tokens
        self.kept = HessianStore(spill)
        self.key_of: dict[str, str] = {}
        self._acc: dict[str, list[Any]] = {}
        self._held: dict[str, list[Any]] = {}
        self._last: tuple[Any, str] | None = None
        self.in_held_out = False  # the current window is held out of the fit

    def add(self, name: str, x: Any) -> None:
        """Record one window's input `x` of the layer whose weight is `name`."""
        if name not in self.wanted:
            return
        if self._last is not None and x is self._last[0]:  # read by the layer before: one H for both
            key = self._last[1]
        else:
            key = self.key_of.get(name, name)
            self._last = (x, key)
            self._accumulate(key, x.detach().reshape(-1, x.shape[-1]).float())
        if self.key_of.setdefault(name, key) != key:
            raise MintError(f"{name}: reads another input than in the first window; cannot share its Hessian")

    def _accumulate(self, key: str, flat: Any) -> None:
        """Add one window's x^T x (float32 products, float64 sums) to the input's accumulators, PRODUCT_ROWS rows
        of it at a time and only the columns up to the row block's end (the rest is its mirror image, copied
        by `_mirror` at the end: half the products): a window's temporaries are 12 k min(k, PRODUCT_ROWS)
        bytes, not 12 k^2. Each row block is the same BLAS dot products over the window's tokens as the whole
        product, and the whole product is symmetric, bit for bit (tests/test_importance.py checks both)."""
        import torch

        from mintbuild.mlx.gptq import held_out_rule

        k = flat.shape[1]
        if key not in self._acc:
            self._acc[key] = [torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, k, dtype=torch.float64)]
            if held_out_rule(self.held_tokens, k):
                self._held[key] = []
        full, even = self._acc[key]
        for r in range(0, k, PRODUCT_ROWS):
            end = min(r + PRODUCT_ROWS, k)
            h = (flat[:, r:end].T @ flat[:, :end]).double()
            full[r:end, :end] += h
            if not self.in_held_out:
                even[r:end, :end] += h
        if self.in_held_out and key in self._held:
            self._held[key].append(flat.clone())

    @staticmethod
    def _mirror(acc: Any) -> None:
        """Fill the upper triangle above the diagonal row blocks with the transpose of the lower (in place)."""
        for r in range(PRODUCT_ROWS, acc.shape[0], PRODUCT_ROWS):
            end = min(r + PRODUCT_ROWS, acc.shape[0])
            acc[:r, r:end] = acc[r:end, :r].T

    def window(self, index: int) -> None:
        self.in_held_out, self._last = held_out(index), None

    def finish(self) -> None:
        """Keep every open Hessian in float32, then hand the even windows' H and the held-out tokens to `done`,
        narrowest input first, freeing each input's accumulators before the next input's gains: the widest
        input's gains run with no other accumulator alive (the order changes no output: the artifact is
        written by key)."""
        import torch

        from mintbuild.mlx.gptq import HeldOutInputs

        for key in sorted(self._acc, key=lambda k: (self._acc[k][0].shape[0], k)):
            full, even = self._acc.pop(key)
            with torch.inference_mode():  # the accumulators may be inference tensors (the head's pass)
                self._mirror(full)
                self._mirror(even)
            self.kept.put(key, full)
            names = sorted(n for n, k in self.key_of.items() if k == key)
            if key in self._held:
                held: Any = HeldOutInputs(torch.cat(self._held.pop(key)))
            else:
                with torch.inference_mode():
                    held = full.sub_(even)  # `full` is kept already: the held-out tokens' H takes its place
            del full
            self.done(names, even, held)
            del even, held
        self._last = None

    @contextlib.contextmanager
    def watch(self, block: Any, prefix: str) -> Iterator[Callable[[int], None]]:
        """Hooks on every nn.Linear in `block` (weights named `prefix` + path + `.weight`) while its windows run;
        yields the per-window callback; the block's Hessians are finished on exit."""
        import torch

        handles = [
            mod.register_forward_pre_hook(lambda _m, inp, n=f"{prefix}.{path}.weight": self.add(n, inp[0]))
            for path, mod in block.named_modules()
            if isinstance(mod, torch.nn.Linear)
        ]
        try:
            yield self.window
        finally:
            for h in handles:
                h.remove()
        self.finish()


def head_name(model: StreamedModel) -> str:
    """The parameter name of the output head's weight (the embedding's when tied)."""
    import torch

    head = model.model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise MintError(f"{type(model.model).__name__}: no linear output head to measure a Hessian for")
    return next(n for n, p in model.model.named_parameters(remove_duplicate=True) if p is head.weight)


def measure(
    model: StreamedModel, windows: list[Window], hessians: InputHessians, blocks: bool, progress: bool
) -> None:
    """Feed `hessians` the inputs of the decoder blocks' linear layers (if `blocks`) and of the output head on
    `windows`, layer-streamed; each window's forward stops at the head's input."""
    import torch

    head = model.model.get_output_embeddings()
    name = head_name(model)
    k = head.weight.shape[1]
    length = max(len(w.ids) for w in windows)
    check_fits(model, 2 * len(windows) * length * model.config.hidden_size * 4, "hessians")

    def watch(i: int, blk: Any) -> Any:
        return hessians.watch(blk, f"{model.prefix}.{i}")

    def hook(_module: Any, inputs: tuple[Any, ...]) -> None:
        hessians.add(name, inputs[0].reshape(-1, k))
        raise _HeadInputSeen  # the head's own product is not needed (nor read: the model is built headless)

    top, _ = forward_hidden(model, [w.ids for w in windows], progress, "hessians: blocks",
                            watch=watch if blocks else None)  # fmt: skip
    log.info("hessians: the output head %s (%d x %d): its Hessian, then its GPTQ gains", name,
             head.weight.shape[0], k)  # fmt: skip
    handle = head.register_forward_pre_hook(hook)
    try:
        with torch.inference_mode():
            for i, (w, h) in enumerate(zip(windows, top, strict=True)):
                hessians.window(i)
                with contextlib.suppress(_HeadInputSeen):
                    model.head(torch.tensor(w.ids, dtype=torch.long)[None], h)
    finally:
        handle.remove()
    hessians.finish()


def pickable_options(
    w: Any, options: list[Any], veto_sqnr_db: float | None, rows: int = GAIN_ROWS, seed: int = 0
) -> list[Any]:
    """The options whose GPTQ gain is worth measuring for `w`: all of them without a veto; with the allocator's
    SQNR veto (dB), those whose round-to-nearest SQNR on the gain's seeded row sample is at least
    `veto_sqnr_db - VETO_MARGIN_DB`. The others the allocator vetoes (their SQNR over the whole tensor is below
    the veto, the margin being far wider than the sample's error), so it never picks them and their gain is
    never read; they are recorded as 1.0 (round to nearest, priced as such) by `compute_hessians`."""
    import torch

    from mintbuild.mlx.quant.reference import quantize_dequantize
    from mintbuild.reproducible import sum_squares64

    if veto_sqnr_db is None:
        return list(options)
    if w.shape[0] > rows:
        pick = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(seed))[:rows]
        w = w[pick.sort().values]
    w32 = w.to(torch.bfloat16).float()
    norm = sum_squares64(w32)
    keep = []
    for o in options:
        sse = sum_squares64(w32 - quantize_dequantize(w, o).float())
        if sse <= 0 or 10 * math.log10(norm / sse) >= veto_sqnr_db - VETO_MARGIN_DB:
            keep.append(o)
    return keep


def gain_rows(cfg: ImportanceConfig) -> int:
    """Rows each gain is measured on: importance.gain_rows, 0 meaning every row (of any tensor)."""
    if cfg.gain_rows < 0:
        raise MintError(f"importance.gain_rows {cfg.gain_rows}: a row count, or 0 for every row")
    return cfg.gain_rows or sys.maxsize


def compute_hessians(
    model_dir: Path,
    corpus_dir: Path,
    cfg: ImportanceConfig,
    pack: PackConfig,
    progress: bool = True,
    spill: Path | None = None,
) -> tuple[dict[str, Any], HessianStore, dict[str, dict[str, float]]]:
    """(record for importance.json, {key: float32 H}, {weight name: {option: GPTQ's held-out gain}}) from
    `hessian_windows` forward-only windows of the train split (seeded like the Fisher windows, possibly
    overlapping them). With `spill` (a folder), the Hessians are kept there, not in memory. With
    importance.gain_veto_sqnr_db set, gains are measured only for `pickable_options` by it. Gains are
    measured on `gain_rows(cfg)` sampled rows of each tensor."""
    import torch

    from mintbuild.mlx.gptq import factor, rounding_gain

    if cfg.hessians not in SCOPES:
        raise MintError(f"importance.hessians {cfg.hessians!r}: choose {' or '.join(SCOPES)}")
    rows = gain_rows(cfg)
    ckpt, windows, _ = calibration_windows(model_dir, corpus_dir, cfg.hessian_windows, cfg.window, cfg.seed)
    skip = tied_lm_head(ckpt)
    wanted = {n for n, t in ckpt.tensors.items() if len(t.shape) == 2 and n != skip}
    gains: dict[str, dict[str, float]] = {}

    ex = executor()
    # on a cluster each input's gains are a task reading the spilled Hessians; the walk goes on meanwhile
    remote = RemoteGains(ex, model_dir, pack, spill, 2 * ex.slots, rows) if ex.remote and spill else None

    def done(names: list[str], even: Any, held: Any) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        measured: dict[str, list[Any]] = {}
        for n in names:
            shape = tuple(ckpt.tensors[n].shape)
            options = [
                o for o in OPTION_SETS["default"] if not o.passthrough and not o.unavailable_reason(shape)
            ]
            measured[n] = pickable_options(ckpt.read(n), options, cfg.gain_veto_sqnr_db, rows)
            gains[n] = {o.name: 1.0 for o in options}  # not measured: rounded to nearest, priced as such
        if remote:
            remote.submit(measured, even, held)
        else:
            # factored once for every tensor and option reading this input, and freed with it (no cache: an
            # input's even-window H is its own, and an 8B's widest factor held on would cost 0.8 GB in the next walk)
            fac = factor(even, pack.damp)
            for n, opts in measured.items():
                w = ckpt.read(n)
                gains[n].update(rounding_gain(w, even, held, opts, pack.damp, pack.block, rows, fac=fac))
        log.info("hessians: GPTQ gains of %s (input %d wide) in %.1f s (%.1f CPU s)", ", ".join(names),
                 even.shape[0], time.perf_counter() - t0, time.process_time() - c0)  # fmt: skip

    held_tokens = sum(len(w.ids) for i, w in enumerate(windows) if held_out(i))
    hessians = InputHessians(wanted, done, spill, held_tokens)
    with torch_settings(cfg.threads, cfg.seed):
        t0 = time.perf_counter()
        # headless: only the head's input is measured (an untied 8B's head is 2.1 GB in fp32)
        model = StreamedModel(CheckpointSource(model_dir), torch.float32, head=False)
        name = head_name(model)
        if name not in wanted:
            raise MintError(f"{model_dir}: the output head's weight {name!r} is not a checkpoint tensor")
        measure(model, windows, hessians, cfg.hessians == "all", progress)
    for n, g in (remote.collect() if remote else {}).items():
        gains[n].update(g)
    tokens = sum(len(w.ids) for w in windows)
    log.info("input Hessians of %d tensors (%d distinct inputs) and their GPTQ gains: %d windows, %d tokens "
             "in %.1f s", len(hessians.key_of), len(hessians.kept), len(windows), tokens,
             time.perf_counter() - t0)  # fmt: skip
    record = {
        "what": "H = sum_tokens x x^T of each linear layer's input x (float32), for GPTQ rounding in pack; "
        "layers reading one input share the key of the first",
        "scope": cfg.hessians,
        "head": name,
        "tensors": {
            n: {"key": k, "inputs": int(hessians.kept.shapes[k][0])}
            for n, k in sorted(hessians.key_of.items())
        },
        "tokens": tokens,
        "windows": [
            {"char_start": w.char_start, "char_end": w.char_end, "tokens": len(w.ids)} for w in windows
        ],
    }
    return record, hessians.kept, gains


class RemoteGains:
    """The GPTQ gains of each distinct input as one cluster task, submitted while the walk goes on: the task
    factors the fit Hessian and measures every (tensor, option) of that input exactly as the in-process code
    does (the same float64 fit and float32 held-out Hessians, read from the spill folder, a filesystem every
    node sees), so the gains are equal wherever they ran. At most `window` inputs, and PENDING_BYTES of their
    spilled Hessians (12 k^2 bytes each, less with held-out inputs), wait at once: past that the walk waits for
    the oldest; `collect` gives every gain."""

    def __init__(
        self, ex: Executor, model_dir: Path, pack: PackConfig, spill: Path, window: int, rows: int = GAIN_ROWS
    ) -> None:
        self.ex, self.model_dir, self.pack, self.rows = ex, Path(model_dir).resolve(), pack, rows
        self.work = spill / "gains"
        self.window = max(1, window)
        self.pending: list[tuple[Path, int, Callable[[], list[Any]]]] = []
        self.gains: dict[str, dict[str, float]] = {}
        self.submitted = 0

    def submit(self, measured: dict[str, list[Any]], even: Any, held: Any) -> None:
        import numpy as np

        from mintbuild.mlx.gptq import HeldOutInputs

        folder = self.work / f"{self.submitted:05d}"
        self.submitted += 1
        folder.mkdir(parents=True, exist_ok=True)
        np.ascontiguousarray(even.double().numpy()).tofile(folder / "fit.f64")
        inputs = isinstance(held, HeldOutInputs)
        np.ascontiguousarray((held.x if inputs else held.float()).numpy()).tofile(folder / "held.f32")
        k = int(even.shape[0])
        held_rows = int(held.x.shape[0]) if inputs else 0  # 0: the held-out Hessian (k rows)
        pack = self.pack
        task = (self.model_dir, measured, folder.resolve(), k, pack.damp, pack.block, self.rows, held_rows)
        # the fit H, the held-out H or inputs, the factor and the clip search's float32 copy of H, the weights,
        # plus the process
        res = Resources(memory=20 * k * k + 4 * k * (held_rows or k) + (1 << 30))
        label = f"gains {next(iter(measured), '')}"
        wait = self.ex.submit(_gains_task, [task], res, label, progress=False)
        self.pending.append((folder, 8 * k * k + 4 * k * (held_rows or k), wait))
        while len(self.pending) > self.window or (
            len(self.pending) > 1 and sum(b for _, b, _ in self.pending) > PENDING_BYTES
        ):
            self._collect_one()

    def _collect_one(self) -> None:
        folder, _, wait = self.pending.pop(0)
        self.gains.update(wait()[0])
        shutil.rmtree(folder)

    def collect(self) -> dict[str, dict[str, float]]:
        while self.pending:
            self._collect_one()
        return self.gains


def _gains_task(task: tuple) -> dict[str, dict[str, float]]:
    """One cluster task: the gains of every (tensor, option) reading one input, from its spilled Hessians."""
    import numpy as np
    import torch

    from mintbuild.mlx.gptq import HeldOutInputs, factor, rounding_gain

    folder, measured, spill, k, damp, block, rows, held_rows = task
    fit = torch.from_numpy(np.fromfile(spill / "fit.f64", dtype=np.float64).reshape(k, k))
    stored = torch.from_numpy(np.fromfile(spill / "held.f32", dtype=np.float32).reshape(held_rows or k, k))
    held: Any = HeldOutInputs(stored) if held_rows else stored
    fac = factor(fit, damp)
    ckpt = open_checkpoint(folder)
    return {
        n: rounding_gain(ckpt.read(n), fit, held, opts, damp, block, rows, fac=fac)
        for n, opts in measured.items()
    }
