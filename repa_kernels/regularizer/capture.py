"""Capture a block's hidden states from a diffusers denoiser by forward hooks (docs/contract.md §7).

What to capture in each model family (block lists, where the image tokens sit in a block's output, the
grid rules) is in families.py; this module is the hooks' lifecycle.

Rules: the hook keeps the first capture of a forward; calls made while autograd runs a backward pass
(non-reentrant gradient checkpointing recomputes blocks there) are ignored. A block output without
grad seen while the model's forward ran with grad enabled means reentrant checkpointing, which is an
error. `HiddenStateCapture.consume()` hands the captured tensors over and drops every reference.
Hooks sit on the underlying module, so a `torch.compile`d model (whole-model or per-block) captures the
same tensors (tested with the aot_eager backend). A wrapper that calls `model.forward(...)` directly
(PEFT's tuner wrappers) bypasses the model-level hook: the blocks still capture (the latest call wins)
and the token grid then comes from the latents passed to the regularizer.

Copies of a hooked model: every hook is a `_CaptureHook`, which a `copy.deepcopy` (trainers' EMA copies)
or a pickle (`torch.save(model)`) turns into `inert_hook`, so the copy runs as a plain model and captures
nothing (a deep-copied bound method would have copied the whole capture, keyed by the original model's
id: `KeyError` at the copy's first forward). A model-level hook that meets a model it was not registered
on (a shallow `copy.copy`, which shares the hook dicts) ignores it.

One capture per model: a second capture on a model whose hooks are still attached is refused, naming
its owner and `detach()` (both would capture every forward, the first one unseen).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .families import BlockOutput, CaptureError, ModelFamily, SequenceLayout, detect_family, unwrap_model
from ..checks import is_integer
from .grids import TokenGrid


def inert_hook(*args, **kwargs) -> None:
    """What a capture hook becomes in a deep copy or a pickle of the model: does nothing."""
    return None


def _inert_hook() -> Any:   # unpickling target (a module-level callable that pickle can name)
    return inert_hook


class _CaptureHook:
    """A hook registered by a HiddenStateCapture: calls `function`; inert in copies and pickles of the
    model (see the module docstring). `capture` is its owner (read by the one-capture-per-model check)."""

    def __init__(self, capture: "HiddenStateCapture", function) -> None:
        self.capture = capture
        self.function = function

    def __call__(self, *args, **kwargs):
        return self.function(*args, **kwargs)

    def __deepcopy__(self, memo) -> Any:
        return inert_hook

    def __reduce__(self):
        return (_inert_hook, ())


def attached_capture(model: nn.Module) -> "HiddenStateCapture | None":
    """The capture whose hooks are attached to `model` (itself, not a copy), or None."""
    for hook in list(getattr(model, "_forward_pre_hooks", {}).values()):
        if isinstance(hook, _CaptureHook) and hook.capture.attached and any(m is model for m in hook.capture.models):
            return hook.capture
    return None


def _in_backward() -> bool:
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


@dataclass
class Captured:
    """What one forward left behind: student tokens (B, S, C) with grad, teacher tokens (B, S, C) detached
    (backbone mode) or None, the token grid when the forward's inputs gave it, and the family."""

    student: torch.Tensor
    teacher: torch.Tensor | None
    grid: TokenGrid | None
    family: ModelFamily
    model: nn.Module
    captured_without_grad_mode: bool


class _ForwardState:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.open = False            # inside a forward whose model-level hook fired
        self.grad_enabled = None     # grad mode at that forward's start
        self.grid: TokenGrid | None = None
        self.layout = SequenceLayout()   # text length, caption lengths, ... from the forward's inputs
        self.model: nn.Module | None = None
        self.slots: dict[str, torch.Tensor | None] = {"student": None, "teacher": None}
        self.filled: set[str] = set()
        self.no_grad_mode = False


class HiddenStateCapture:
    """Forward hooks on one block (and a teacher block in backbone mode) of one or several models.

    models: the denoisers (all of one family; several share one capture, e.g. Wan 2.2's two experts).
    block_index: student block; teacher_block_index: backbone-mode teacher block or None. owner: what
    holds this capture, named when another capture on the same model is refused.
    """

    def __init__(self, models: list[nn.Module], block_index: int, *, teacher_block_index: int | None = None,
                 family: ModelFamily | None = None, hidden_size: int | None = None,
                 block_key: str = "crepa_block_index", teacher_key: str = "crepa_teacher_block_index",
                 owner: str = "a HiddenStateCapture") -> None:
        if not models:
            raise ValueError("at least one model is needed")
        if hidden_size is not None:
            if not is_integer(hidden_size):   # numpy integers too
                raise TypeError(f"hidden_size must be a positive integer (the width of the block outputs), got "
                                f"{hidden_size!r}")
            hidden_size = int(hidden_size)
            if hidden_size <= 0:
                raise ValueError(f"hidden_size must be a positive integer (the width of the block outputs), got "
                                 f"{hidden_size}")
        self.models = [unwrap_model(m) for m in models]
        self.owner = owner
        for model in self.models:
            existing = attached_capture(model)
            if existing is not None:
                raise CaptureError(
                    f"{type(model).__name__} already has {existing.owner} attached (its hooks capture every forward "
                    f"of the model): call detach() on that regularizer (reg.detach()) before building another on "
                    "the same model, or keep using the one you have")
        families = {detect_family(m).name for m in self.models}
        if len(families) > 1:
            raise CaptureError(f"models sharing one regularizer must be of one family, got {sorted(families)}")
        self.family = family or detect_family(self.models[0])
        self.block_index = block_index
        self.teacher_block_index = teacher_block_index
        sizes = {hidden_size or self.family.hidden_size(m) for m in self.models}
        if len(sizes) > 1:
            raise CaptureError(f"models sharing one regularizer must have one hidden size, got {sorted(sizes)}")
        self.hidden_size = sizes.pop()
        for model in self.models:
            self.family.check_block_index(model, block_index, block_key)
            if teacher_block_index is not None:
                self.family.check_block_index(model, teacher_block_index, teacher_key)
        self._signatures = {id(m): inspect.signature(m.forward) for m in self.models}
        self._state = _ForwardState()
        self._handles: list[Any] = []
        for model in self.models:
            self._handles.append(model.register_forward_pre_hook(self._hook(self._model_pre_hook), with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._hook(self._model_post_hook), always_call=True))
            blocks = self.family.blocks(model)
            self._handles.append(blocks[block_index].register_forward_hook(self._hook(
                self._block_hook("student", model, self.family.block_output_of(model, block_index))),
                with_kwargs=True))
            if teacher_block_index is not None:
                self._handles.append(blocks[teacher_block_index].register_forward_hook(self._hook(
                    self._block_hook("teacher", model, self.family.block_output_of(model, teacher_block_index))),
                    with_kwargs=True))

    # ------------------------------------------------------------------ hooks

    def _hook(self, function) -> _CaptureHook:
        return _CaptureHook(self, function)

    def _model_pre_hook(self, model, args, kwargs):
        signature = self._signatures.get(id(model))
        if signature is None or _in_backward():
            return None      # a shallow copy of a hooked model (shares the hook dicts), or a recomputation
        state = self._state
        state.reset()
        state.open = True
        state.grad_enabled = torch.is_grad_enabled()
        state.model = model
        try:
            bound = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = dict(kwargs)
            if args:
                bound.setdefault("hidden_states", args[0])
        state.grid = self.family.grid_from_inputs(model, bound)
        state.layout = self.family.layout_from_inputs(model, bound)
        return None

    def _model_post_hook(self, model, args, output):
        if not _in_backward():
            self._state.open = False
        return None

    def _block_hook(self, slot: str, model: nn.Module, rule: BlockOutput):
        def hook(block, args, kwargs, output):
            if _in_backward():
                return None          # recomputation by non-reentrant gradient checkpointing
            state = self._state
            if state.open and slot in state.filled:
                return None          # keep the first capture of a forward
            if not state.open:
                state.model = model
                state.grid = None
                state.layout = SequenceLayout()
            tokens, grid = self.family.block_output_tokens(rule, output, args, kwargs, state.grid, state.layout,
                                                            self.hidden_size, self.models[0])
            if state.grid is None and grid is not None:
                state.grid = grid
            without_grad = slot == "student" and not tokens.requires_grad and not torch.is_grad_enabled()
            if without_grad:
                if state.open and state.grad_enabled:
                    raise CaptureError(
                        f"the output of block {self.block_index} of {type(model).__name__} carries no gradient "
                        "although the model's forward runs with gradients enabled: reentrant gradient "
                        "checkpointing (use_reentrant=True) hides it. Use non-reentrant checkpointing (diffusers' "
                        "default: model.enable_gradient_checkpointing(), or torch.utils.checkpoint.checkpoint(..., "
                        "use_reentrant=False))")
            if slot == "student":  # set for every capture: a wrapper's forwards never reset the state
                state.no_grad_mode = without_grad
            state.slots[slot] = tokens.detach() if slot == "teacher" else tokens
            state.filled.add(slot)
            return None
        return hook

    # ------------------------------------------------------------------ use

    @property
    def last_model(self) -> nn.Module:
        """The model whose forward ran last (the first model before any forward)."""
        return self._state.model if self._state.model is not None else self.models[0]

    @property
    def has_capture(self) -> bool:
        return self._state.slots["student"] is not None

    def consume(self) -> Captured:
        """The tensors captured by the last forward; the capture forgets them (nothing stays alive)."""
        state = self._state
        student, teacher = state.slots["student"], state.slots["teacher"]
        if student is None:
            raise CaptureError(
                f"no hidden states captured from block {self.block_index} of {type(self.models[0]).__name__}: run "
                "the model's forward (model(...)) before calling the regularizer, once per regularizer call "
                "(the capture is used up by each call). A block skipped in the forward (e.g. SD3 skip_layers) "
                "captures nothing")
        if self.teacher_block_index is not None and teacher is None:
            raise CaptureError(f"the forward captured the student block {self.block_index} but not the teacher "
                               f"block {self.teacher_block_index}")
        captured = Captured(student, teacher, state.grid, self.family, state.model, state.no_grad_mode)
        state.slots = {"student": None, "teacher": None}
        return captured

    def clear(self) -> None:
        """Drop any captured tensors (e.g. after a forward whose regularizer call is skipped)."""
        self._state.slots = {"student": None, "teacher": None}

    def detach(self) -> None:
        """Remove every hook; the models run exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._state.reset()

    @property
    def attached(self) -> bool:
        return bool(self._handles)
