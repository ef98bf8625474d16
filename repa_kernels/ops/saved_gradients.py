"""Autograd of the kernel ops that form their gradient in the forward pass (the C++ crepa and manifold
ops, the Triton crepa op): one place registers their fake kernels and autograd and runs them eagerly.

The losses are scalars, so these kernels write d loss / d z and d loss / d y (for an upstream gradient
of 1) in the pass that computes the loss, and z and y are read once; the backward only scales them by
the upstream gradient. Every such op has the schema

    op(Tensor z, Tensor y, <hyper-parameters>, bool need_dz, bool need_dy, ...)
        -> (Tensor loss, <metrics>, Tensor dz, Tensor dy)

with the loss and metrics 0-d in the compute dtype, dz / dy in the input dtype, and dz / dy of shape
(0,) when not requested. `register(qualname, backend)` gives such an op its fake kernel (torch.compile
sees one opaque node) and its autograd, both read off the schema.

Two autograd paths, chosen per call by `run`:
- eager (real tensors, no tracing): `_PrivateGradients` keeps dz / dy where nobody else can reach them.
  The first backward scales them in place and hands them to autograd, which adopts them as .grad: no
  copy and no second gradient-sized tensor. On CPU reading the upstream gradient is free, and a factor
  of 1 (the usual `loss.backward()`) skips the pass over dz; on a GPU the scale is unconditional, since
  reading the factor would wait for the device. The first backward uses the buffers up, so a further
  backward through a retained graph (retain_graph=True) recomputes them from the inputs, which are kept
  for that. save_for_backward refuses inference tensors (made under torch.inference_mode(), e.g. a
  frozen teacher's features): those are kept by reference instead, which is safe because an inference
  tensor cannot be modified outside inference mode.
- tracing (torch.compile, make_fx, fake or dispatch modes, tensor subclasses): the registered autograd,
  out of place, since a functional graph must not mutate a saved tensor.

The saved gradient does not depend on z and y differentiably, so derivatives beyond it would be
silently zero. They are errors that name the backend and impl='reference' as the way out:
- second order: with create_graph=True the first derivative is still given, and a backward through it
  (hessian, hvp, a gradient penalty) raises (`first_order_only`);
- forward mode (torch.autograd.forward_ad dual tensors) and torch.func transforms (grad, vjp, jvp,
  jacrev, vmap, hessian), whose wrapped tensors the kernels cannot see: checked when a kernel backend
  is called (`check_derivative_mode`, used by every op of ops/, also the Triton manifold op).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.autograd import forward_ad
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ..options import compute_dtype

WAY_OUT = "use impl='reference' (plain PyTorch, every kind of derivative) for this loss"


def second_order_message(backend: str) -> str:
    return (f"second-order derivatives through impl='{backend}' are not available (a backward through a "
            f"gradient made with create_graph=True: hessian, hvp, gradient penalties): its kernels form the "
            f"first derivative only; {WAY_OUT}")


def check_derivative_mode(backend: str, *tensors: torch.Tensor) -> None:
    """Raise when the kernels of `backend` are called on tensors that carry forward-mode tangents or
    under a torch.func transform: they would silently give zero (or torch's generic error)."""
    if torch.compiler.is_compiling():  # the traced graph holds the op; the transforms apply outside it
        return
    transform = torch._C._functorch.peek_interpreter_stack()
    if transform is not None and transform.key() != torch._C._functorch.TransformType.Functionalize:
        raise RuntimeError(
            f"torch.func transforms (grad, vjp, jvp, jacrev, jacfwd, hessian, vmap) cannot differentiate or "
            f"batch through impl='{backend}': its kernels are opaque ops; {WAY_OUT}")
    if forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(
            f"forward-mode derivatives (torch.autograd.forward_ad, torch.func.jvp) through impl='{backend}' "
            f"are not available: its kernels form reverse-mode gradients only; {WAY_OUT}")


class _FirstOrderOnly(torch.autograd.Function):
    """`gradient * grad_loss`, tied to what it depends on (`connected`) through a node whose backward (a
    second-order derivative) raises, instead of a constant whose second derivative would read as 0."""

    @staticmethod
    def forward(ctx, backend, gradient, grad_loss, *connected):
        ctx.backend = backend
        return gradient * grad_loss

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(second_order_message(ctx.backend))


def first_order_only(backend: str, gradient: torch.Tensor, grad_loss: torch.Tensor,
                     *connected: torch.Tensor) -> torch.Tensor:
    """The scaled gradient of a backward made with create_graph=True."""
    connected = tuple(t for t in (grad_loss, *connected) if t.requires_grad)
    if not connected:
        return gradient * grad_loss
    return _FirstOrderOnly.apply(backend, gradient, grad_loss, *connected)


def check_formed(op: object, name: str, gradient: torch.Tensor) -> None:
    if gradient.numel() == 0:  # inputs are never empty, so an empty gradient was not asked for
        raise RuntimeError(f"{op} was called with need_d{name}=False, but {name} needs a gradient: pass "
                           f"need_d{name}=True when {name}.requires_grad (the backend entries of "
                           f"repa_kernels.ops do)")


def _needs_scaling(grad_loss: torch.Tensor) -> bool:
    """Whether the saved gradient must be multiplied by `grad_loss`: always on a GPU (reading the value
    would sync the device); on CPU unless it is exactly 1 (then the multiply is a wasted pass)."""
    return grad_loss.device.type != "cpu" or float(grad_loss) != 1.0


def _plain_eager(*tensors: torch.Tensor) -> bool:
    """Real tensors outside any tracing (torch.compile, make_fx, fake or functional modes)."""
    return (all(type(t) is torch.Tensor for t in tensors) and not torch.compiler.is_compiling()
            and not is_in_torch_dispatch_mode())


class _PrivateGradients(torch.autograd.Function):
    """Eager path of `run` (see the module docstring): the op's dz / dy stay private to the backward."""

    @staticmethod
    def forward(ctx, op, backend, z, y, *arguments):
        *outputs, dz, dy = op(z, y, *arguments)
        ctx.op, ctx.backend, ctx.arguments, ctx.gradients = op, backend, arguments, (dz, dy)
        # Kept for a backward through a retained graph; inference tensors cannot be saved (see above).
        ctx.inference_inputs = tuple(t if t.is_inference() else None for t in (z, y))
        ctx.save_for_backward(*(None if t.is_inference() else t for t in (z, y)))
        ctx.mark_non_differentiable(*outputs[1:])
        ctx.set_materialize_grads(False)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_loss, *_metric_grads):
        wanted = ctx.needs_input_grad[2:4]
        if grad_loss is None or not any(wanted):
            return (None,) * (4 + len(ctx.arguments))
        inputs = tuple(kept if saved is None else saved
                       for saved, kept in zip(ctx.saved_tensors, ctx.inference_inputs))
        gradients, ctx.gradients = ctx.gradients, None
        if gradients is None:  # the first backward used them up
            with torch.no_grad():
                gradients = ctx.op(*inputs, *ctx.arguments)[-2:]
        create_graph = torch.is_grad_enabled()  # autograd runs a backward in grad mode iff create_graph
        scale = not create_graph and _needs_scaling(grad_loss)
        result = []
        for name, needed, gradient in zip(("z", "y"), wanted, gradients):
            if not needed:
                result.append(None)
                continue
            check_formed(ctx.op, name, gradient)
            if create_graph:
                gradient = first_order_only(ctx.backend, gradient, grad_loss, *inputs)
            elif scale:
                gradient.mul_(grad_loss)  # a 0-d fp32 factor keeps the gradient's dtype
            result.append(gradient)
        return (None, None, *result, *(None,) * len(ctx.arguments))


def run(op: Callable, backend: str, z: torch.Tensor, y: torch.Tensor, *arguments) -> tuple[torch.Tensor, ...]:
    """The outputs of `op(z, y, *arguments)` without dz / dy, differentiable to z and y: through
    `_PrivateGradients` in eager mode, through the registered autograd under tracing."""
    if torch.is_grad_enabled() and (z.requires_grad or y.requires_grad) and _plain_eager(z, y):
        return _PrivateGradients.apply(op, backend, z, y, *arguments)
    return tuple(op(z, y, *arguments)[:-2])


def register(qualname: str, backend: str) -> None:
    """Register the fake kernel and the (traced-path) autograd of the op `qualname`, which has the schema
    of the module docstring. Call once, after the op is defined."""
    namespace, name = qualname.split("::")
    schema = getattr(getattr(torch.ops, namespace), name).default._schema
    arguments = [argument.name for argument in schema.arguments]
    need_dz_at, need_dy_at = arguments.index("need_dz"), arguments.index("need_dy")
    num_scalars = len(schema.returns) - 2

    def fake(z, y, *rest, **_keyword_arguments):
        flags = (z, y, *rest)
        dtype = compute_dtype(z.dtype)
        scalars = tuple(z.new_empty((), dtype=dtype) for _ in range(num_scalars))
        return (*scalars, z.new_empty(z.shape) if flags[need_dz_at] else z.new_empty((0,)),
                y.new_empty(y.shape) if flags[need_dy_at] else y.new_empty((0,)))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[-2], output[-1])
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss, *_other_grads):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # create_graph=True on this path (dispatch modes, subclasses): the inputs are not saved here
            # to tie the gradient to, so refuse rather than give a gradient whose derivative reads as 0.
            raise RuntimeError(second_order_message(backend))
        result = []
        for index, (tensor_name, gradient) in enumerate(zip(("z", "y"), ctx.saved_tensors)):
            if grad_loss is None or not ctx.needs_input_grad[index]:
                result.append(None)
                continue
            check_formed(qualname, tensor_name, gradient)
            result.append(gradient * grad_loss)
        return (*result, *(None,) * (len(ctx.needs_input_grad) - 2))

    torch.library.register_fake(qualname)(fake)
    torch.library.register_autograd(qualname, backward, setup_context=setup_context)
