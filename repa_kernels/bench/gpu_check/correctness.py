"""Phase correctness: the Triton kernels at the benchmark workload shapes against float64 on the device.

For each workload: fresh random inputs (a new seed per check; y correlated with z like a real pair),
every buffer the kernels allocate with torch.empty filled with NaN first (`poisoned_empty`), so an
element a kernel never writes shows as NaN; then the loss and dL/dz of impl="triton" against the
reference on the same inputs upcast to float64, as ||out − ref|| / ||ref||. The same-dtype reference's
error is reported beside it (what the dtype itself costs). Limits: float32 inputs 1e-4 on the loss and
1e-3 on the gradient (fp32 arithmetic lands far below); bfloat16/float16 1e-3 and 1e-2 (bf16 operands
land between 1e-3 and 1e-2). Any NaN or inf fails.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

from ..providers import loss_function, reference_loss
from .phases import Budget, PhaseResult

LIMITS = {"float32": (1e-4, 1e-3), "bfloat16": (1e-3, 1e-2), "float16": (1e-3, 1e-2)}


class PoisonCounter:
    def __init__(self) -> None:
        self.buffers = 0


@contextlib.contextmanager
def poisoned_empty() -> Iterator[PoisonCounter]:
    """Inside the region, every floating-point torch.empty comes back filled with NaN (counted)."""
    original = torch.empty
    counter = PoisonCounter()

    def empty(*args, **kwargs):
        tensor = original(*args, **kwargs)
        if tensor.is_floating_point() and tensor.numel():
            tensor.fill_(math.nan)
            counter.buffers += 1
        return tensor

    torch.empty = empty
    try:
        yield counter
    finally:
        torch.empty = original


def relative_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    """||value − truth|| / ||truth|| in float64; inf when value holds a NaN or inf."""
    value = value.detach().double()
    if not bool(torch.isfinite(value).all()):
        return math.inf
    truth = truth.detach().double()
    return float(torch.linalg.vector_norm(value - truth) / torch.linalg.vector_norm(truth).clamp_min(1e-300))


def fresh_inputs(workload, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(workload.z_shape, generator=generator, device=device, dtype=torch.float32)
    y = torch.randn(workload.y_shape, generator=generator, device=device, dtype=torch.float32)
    if workload.width_y == workload.width_z:
        y = y + 0.5 * z
    return z.to(workload.torch_dtype), y.to(workload.torch_dtype)


def loss_and_gradient(fn, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().clone().requires_grad_(True)
    loss = fn(z, y)
    loss.backward()
    return loss.detach(), z.grad


def check(workload, device: torch.device, seed: int) -> dict:
    z, y = fresh_inputs(workload, device, seed)
    triton_fn = loss_function("triton", workload)
    with poisoned_empty() as poison:
        loss, grad = loss_and_gradient(triton_fn, z, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    truth_loss, truth_grad = loss_and_gradient(lambda a, b: reference_loss(workload, a, b), z.double(), y.double())
    same_loss, same_grad = loss_and_gradient(lambda a, b: reference_loss(workload, a, b), z, y)
    loss_limit, grad_limit = LIMITS[workload.dtype]
    row = {"loss_error": relative_error(loss, truth_loss), "grad_error": relative_error(grad, truth_grad),
           "reference_loss_error": relative_error(same_loss, truth_loss),
           "reference_grad_error": relative_error(same_grad, truth_grad),
           "poisoned_buffers": poison.buffers, "loss": float(truth_loss), "seed": seed}
    row["ok"] = (row["loss_error"] <= loss_limit and row["grad_error"] <= grad_limit and poison.buffers > 0)
    row["limits"] = f"loss {loss_limit:g}, grad {grad_limit:g}"
    return row


def run(budget: Budget, result: PhaseResult, *, workloads, device: torch.device, seed: int, log, rows: list) -> None:
    failures = 0
    for index, workload in enumerate(workloads):
        if budget.left() <= 0:
            result.status = "partial"
            result.lines.append(f"budget reached: {len(workloads) - index} workloads not checked "
                                f"({', '.join(w.name for w in workloads[index:])})")
            break
        try:
            found = check(workload, device, seed + index)
        except Exception as exc:  # one workload failing must not hide the others
            failures += 1
            detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            rows.append({"phase": "correctness", "name": workload.name, "status": "error", "detail": detail})
            result.lines.append(f"ERROR {workload.name}: {detail[:150]}")
            log(f"correctness {workload.name}: {detail}")
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        status = "passed" if found["ok"] else "failed"
        failures += not found["ok"]
        detail = (f"loss err {found['loss_error']:.2e} (ref {found['reference_loss_error']:.2e}), grad err "
                  f"{found['grad_error']:.2e} (ref {found['reference_grad_error']:.2e}); limits {found['limits']}; "
                  f"{found['poisoned_buffers']} NaN-poisoned buffers; seed {found['seed']}")
        rows.append({"phase": "correctness", "name": workload.name, "status": status, "detail": detail,
                     "loss_error": found["loss_error"], "grad_error": found["grad_error"],
                     "reference_loss_error": found["reference_loss_error"],
                     "reference_grad_error": found["reference_grad_error"]})
        log(f"correctness {workload.name} ({workload.shape_text()} {workload.dtype}): {status}: {detail}")
        result.lines.append(f"{'ok  ' if found['ok'] else 'FAIL'} {workload.name:24s} loss {found['loss_error']:.1e} "
                            f"grad {found['grad_error']:.1e} (same-dtype ref {found['reference_grad_error']:.1e})")
    if failures:
        result.status = "failed"
        result.error = f"{failures} workload(s) outside the limits or failing"
