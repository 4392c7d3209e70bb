"""Layer-streamed execution of a transformers decoder: one decoder block's weights in memory at a time.

The model is built from its config by transformers itself (so every family transformers supports works), with
its parameters on the meta device: no weight memory. The parameters outside the decoder blocks (embedding,
final norm, output head) are read once; the blocks are read, converted to the compute dtype, run, and dropped
one at a time, so every window passes block l before block l+1 is read. The model's own forward supplies each
block's arguments (rotary position embeddings, causal / sliding-window masks, per-layer types): it is run once
per window with every block replaced by a recorder that keeps its arguments and passes the hidden state
through; the model's own head (final norm, lm_head, logit soft-capping) runs on the streamed output the same
way, with the last block replaced by a replay of the streamed hidden state. Nothing of a family's forward is
re-implemented here.

Weights come from a `WeightSource`: a safetensors checkpoint (`CheckpointSource`, mintbuild.hf.checkpoint,
memory-mapped), or the evaluator's packed MLX folder (evaluate.PackedSource, dequantized one block at a time).

Memory bound (stated, not measured here): the non-block parameters in the compute dtype, plus one block in the
compute dtype (plus its gradients in the backward pass), plus the hidden states of the windows (one set for
the forward; one per block boundary for the Fisher backward), plus one window's logits.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from mintbuild.errors import MintError
from mintbuild.hf.checkpoint import expert_parts, stack_experts

log = logging.getLogger(__name__)

GB = 1 << 30


class NoDecoderBlocks(MintError):
    """The model has no list of decoder blocks to stream (an architecture this module does not know)."""


# ---------------------------------------------------------------- weight sources


class WeightSource(Protocol):
    """Named model weights, read a few at a time."""

    config: dict[str, Any]

    def has(self, name: str) -> bool: ...

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]: ...


class CheckpointSource:
    """A safetensors checkpoint (the model stage's folder or the equalized one), tensors as stored."""

    def __init__(self, folder: Path) -> None:
        from mintbuild.hf.checkpoint import open_checkpoint

        self.folder = Path(folder)  # what a cluster task reopens
        self.ckpt = open_checkpoint(folder)
        self.config = self.ckpt.config

    def has(self, name: str) -> bool:
        return name in self.ckpt.tensors

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return {n: self.ckpt.read(n) for n in names}


# ---------------------------------------------------------------- the streamed model


def _hf_config(config: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    cfg = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise MintError("config.json has no model_type")
    return AutoConfig.for_model(model_type, **cfg)


def _to_meta(module: torch.nn.Module) -> None:
    """Drop a module's parameter storage (buffers, e.g. rotary frequencies, stay)."""
    for m in module.modules():
        for k, p in list(m._parameters.items()):
            if p is not None and p.device.type != "meta":
                m._parameters[k] = torch.nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)


class _Recorder(torch.nn.Module):
    """Stands in for a decoder block: records the call's arguments and returns the hidden state unchanged.
    Attribute reads it lacks (a block's `attention_type`, read by some models' forward) go to the block."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: its parameters stay out of the way
        self.calls: list[tuple[torch.Tensor, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls.append((hidden_states, args, kwargs))
        return hidden_states


class _Replay(_Recorder):
    """Stands in for the last decoder block: returns a given hidden state (the streamed output)."""

    def __init__(self, block: torch.nn.Module, value: torch.Tensor) -> None:
        super().__init__(block)
        object.__setattr__(self, "_value", value)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return object.__getattribute__(self, "_value")


@dataclass
class BlockCall:
    """What the model's own forward passes one block for one window: positional and keyword arguments after
    the hidden state (rotary embeddings, mask, position ids)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class StreamedModel:
    """A transformers causal LM whose decoder blocks are materialized one at a time from `source`.

    `dtype` is the compute dtype (float32 for calibration; float32 or bfloat16 for evaluation). The non-block
    parameters (embedding, final norm, head) are read at construction and stay; `grad` makes them (and each
    materialized block) require gradients.
    """

    def __init__(
        self, source: WeightSource, dtype: torch.dtype = torch.float32, grad: bool = False, head: bool = True
    ) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        self.source, self.dtype, self.grad = source, dtype, grad
        #: False: an untied output head is never read (a stage that needs only the blocks and their inputs)
        self.with_head = head
        self.hf_config = _hf_config(source.config)
        with no_init_weights(), init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(self.hf_config, dtype=dtype)
        self.model = model.eval()
        self.decoder = model.get_decoder()
        layers = getattr(self.decoder, "layers", None)
        if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
            raise NoDecoderBlocks(f"{type(model).__name__}: no decoder block list (model.layers) to stream")
        self.blocks: torch.nn.ModuleList = layers
        self.prefix = next(n for n, m in model.named_modules() if m is layers)
        self._materialize_outer()

    # ------------------------------------------------------------ weights

    @property
    def config(self) -> Any:
        """The transformers config (as `model.config` of a whole model)."""
        return self.hf_config

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def block_names(self, i: int) -> list[str]:
        return [f"{self.prefix}.{i}.{n}" for n, _ in self.blocks[i].named_parameters()]

    def _load(self, module: torch.nn.Module, module_prefix: str, names: list[str]) -> None:
        # values are None only for names refused just below
        stacked: dict[str, Any] = {
            n: expert_parts(n, self.source.has) for n in names if not self.source.has(n)
        }
        missing = [n for n, parts in stacked.items() if parts is None]
        if missing:
            raise MintError(
                f"weights do not match the {self.hf_config.model_type} architecture: missing {missing[:3]}"
            )
        plain = [n for n in names if n not in stacked]
        tensors = self.source.read(plain)
        # MoE experts stored one tensor per expert: stacked as transformers stacks them on load.
        for n, groups in stacked.items():
            flat = [m for g in groups for m in g]
            parts = self.source.read(flat)
            tensors[n] = stack_experts(groups, parts.__getitem__)
        # one tensor converted at a time, its stored (memory-mapped) copy released before the next: all of an
        # untied 8B's outer tensors stored and converted at once peaked 1 GB over the stage's bound
        state = {n.removeprefix(module_prefix): tensors.pop(n).to(self.dtype) for n in list(tensors)}
        module.load_state_dict(state, strict=False, assign=True)
        for p in module.parameters():
            p.requires_grad_(self.grad)

    def _materialize_outer(self) -> None:
        """Read every parameter outside the blocks; tie the head to the embedding when the config says so."""
        tied = bool(getattr(self.hf_config, "tie_word_embeddings", False))
        head = self.model.get_output_embeddings()
        head_names = {n for n, p in self.model.named_parameters(remove_duplicate=False) if head is not None
                      and p is head.weight}  # fmt: skip
        skip_head = tied or not self.with_head  # tied: the embedding's read is the head's
        names = [
            n
            for n, _ in self.model.named_parameters(remove_duplicate=False)
            if not n.startswith(self.prefix + ".") and not (skip_head and n in head_names)
        ]
        self._load(self.model, "", names)
        if tied:
            self.model.tie_weights()
        meta = [n for n, p in self.model.named_parameters() if p.device.type == "meta"
                and not n.startswith(self.prefix + ".") and (self.with_head or n not in head_names)]  # fmt: skip
        if meta:
            raise MintError(f"parameters {meta[:3]} were not loaded")

    def drop_outer(self) -> None:
        """Free the embedding, final norm and head (a block walk needs none of them once every window has
        entered block 0: an untied 8B's embedding and head are 4.2 GB in float32, more than its largest block
        with gradients); `reload_outer` reads them again."""
        # every name of a tied weight (the head is the embedding), so no reference keeps the storage alive;
        # untied on the meta device as at construction, and tied again by `reload_outer`
        for name, p in list(self.model.named_parameters(remove_duplicate=False)):
            if not name.startswith(self.prefix + ".") and p.device.type != "meta":
                owner, _, attr = name.rpartition(".")
                meta = torch.nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
                self.model.get_submodule(owner)._parameters[attr] = meta
        release_freed_memory()

    def reload_outer(self) -> None:
        """Read the parameters `drop_outer` freed from the source again (the same values)."""
        self._materialize_outer()

    @contextlib.contextmanager
    def block(self, i: int) -> Iterator[torch.nn.Module]:
        """Block i with its weights read and converted to the compute dtype; dropped on exit."""
        blk = self.blocks[i]
        try:
            self._load(blk, f"{self.prefix}.{i}.", self.block_names(i))
            yield blk
        finally:
            _to_meta(blk)
            release_freed_memory()

    def outer_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if not n.startswith(self.prefix + ".")]

    # ------------------------------------------------------------ running the model's own forward around us

    @contextlib.contextmanager
    def _swapped(self, stand_ins: Sequence[torch.nn.Module]) -> Iterator[None]:
        original = self.decoder.layers
        self.decoder.layers = torch.nn.ModuleList(stand_ins)
        try:
            yield
        finally:
            self.decoder.layers = original

    def enter(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[BlockCall]]:
        """(the first block's input for `ids` [1, T], the arguments the model passes every block). Runs the
        model's decoder forward with recorders in place of the blocks; under grad mode the returned input keeps
        its graph back to the embedding."""
        recorders = [_Recorder(b) for b in self.blocks]
        with self._swapped(recorders):
            self.decoder(input_ids=ids, use_cache=False)
        if any(len(r.calls) != 1 for r in recorders):
            raise MintError(f"{type(self.model).__name__}: the model's forward did not call every block once")
        calls = [BlockCall(r.calls[0][1], r.calls[0][2]) for r in recorders]
        return recorders[0].calls[0][0], calls

    def head(self, ids: torch.Tensor, hidden: torch.Tensor, **kw: Any) -> Any:
        """The model's own output (final norm, head, soft-capping; a loss when `labels` is given) for `ids`,
        with `hidden` as the last block's output."""
        stand_ins = [_Recorder(b) for b in self.blocks[:-1]] + [_Replay(self.blocks[-1], hidden)]
        with self._swapped(stand_ins):
            return self.model(input_ids=ids, use_cache=False, **kw)


def release_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim) once a block's tensors are gone.

    glibc serves blocks below its mmap threshold (raised up to 32 MB as mapped blocks are freed) from a heap
    it rarely shrinks, so without this a streamed pass keeps the high-water mark of every block's temporaries
    (docs/operations.md, "Memory bounds"). Once per block: free in the hot loops, unlike a lower mmap threshold, which made the
    equalize search ~30% slower."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6")


def run_block(block: torch.nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out


def _unwatched(_i: int, _block: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def forward_hidden(
    model: StreamedModel,
    windows: Sequence[Sequence[int]],
    progress: bool = False,
    desc: str = "blocks",
    keep: Callable[[int, list[torch.Tensor]], None] | None = None,
    watch: Callable[[int, torch.nn.Module], contextlib.AbstractContextManager[Any]] | None = None,
) -> tuple[list[torch.Tensor], list[list[BlockCall]]]:
    """The last block's output for every window ([1, T, hidden] each, compute dtype), all windows through block
    l before block l+1 is read; `keep(l, inputs)` sees every block's inputs (for the Fisher backward);
    `watch(l, block)` is entered around block l's run of every window and may yield a callable that is told
    each window's index before it runs (for hooks on the block's layers). Returns (outputs, per-window block
    calls). No graph is kept."""
    from mintbuild.progress import track

    with torch.no_grad():
        hidden, calls = [], []
        for ids in windows:
            h, c = model.enter(torch.as_tensor(list(ids), dtype=torch.long)[None])
            hidden.append(h)
            calls.append(c)
        model.drop_outer()  # the walk needs no embedding or head: read again for the head after it
        try:
            for i in track(range(model.n_blocks), desc, "block", progress):
                if keep is not None:
                    keep(i, hidden)
                with model.block(i) as blk, (watch or _unwatched)(i, blk) as each:
                    out = []
                    for j, (h, c) in enumerate(zip(hidden, calls, strict=True)):
                        if each is not None:
                            each(j)
                        out.append(run_block(blk, h, c[i]))
                    hidden = out
        finally:
            model.reload_outer()
    return hidden, calls


# ---------------------------------------------------------------- memory: refuse before work


def available_memory() -> int:
    """Bytes the OS can give this process now (MemAvailable), or total memory where that is not known."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def block_bytes(model: StreamedModel, i: int = 0) -> int:
    """Bytes of block i in the compute dtype."""
    size = torch.empty((), dtype=model.dtype).element_size()
    return sum(math.prod(p.shape) for p in model.blocks[i].parameters()) * size


def check_fits(model: StreamedModel, activations: int, what: str, grad_factor: int = 1) -> None:
    """Refuse, before any block is read, a model whose largest block (times `grad_factor`: 2 when its
    gradients are held too) plus `activations` bytes does not fit the memory available now."""
    need = max(block_bytes(model, i) for i in range(model.n_blocks)) * grad_factor
    avail = available_memory()
    if need + activations > avail:
        raise MintError(
            f"{what}: one decoder block needs {need / GB:.2f} GB in {str(model.dtype).removeprefix('torch.')} "
            f"and the windows' activations {activations / GB:.2f} GB, but only {avail / GB:.2f} GB of memory "
            "is available"
        )
    log.info("%s: one block %.2f GB + activations %.2f GB (available %.2f GB)", what, need / GB,
             activations / GB, avail / GB)  # fmt: skip
