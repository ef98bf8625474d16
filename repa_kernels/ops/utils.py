"""Shared helpers of the Triton kernels: interpreter detection, dtype mapping, launch (block) sizes.

Block sizes come from here only. Under the Triton interpreter (CPU tensors, tests) blocks are large so
that few programs run (each program is interpreted op by op); on a GPU they are fixed defaults chosen
from each kernel's register budget (not yet timed on a GPU: no device was available when they were
written). `small_blocks()` forces tiny blocks so that tests make the loops over tokens and channels
iterate several times. There is no autotuning: the defaults are fixed, so runs are reproducible.
Two ways past the defaults, neither used unless asked for: `forced_launch` (a region, e.g. the GPU
check's sweep of launch configurations) and `tuned_launch.TUNED` (per kernel and dtype, written back
from a GPU sweep; empty until one found a faster configuration).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import triton
import triton.language as tl

from ..options import EPS, compute_dtype
from . import tuned_launch
from .availability import triton_interpreter_enabled

# Above this product of block sides the interpreter's numpy temporaries get large for little gain.
_INTERPRETER_MAX_TILE = 1 << 14

_force_small_blocks = False
_forced_launch: dict[str, object] = {}

# A token with ||x|| < EPS is normalised to 0 (docs/contract.md §2).
ZERO_TOKEN_NORM = tl.constexpr(EPS)


# triton.jit decides interpreted or compiled when the kernel modules are imported, so the flag is read
# once, here, and stays true to the kernels even if the environment changes later.
_INTERPRETER = triton_interpreter_enabled()


def is_interpreter() -> bool:
    """True when the imported kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETER


@contextlib.contextmanager
def small_blocks() -> Iterator[None]:
    """Force 16-wide blocks everywhere (tests: loops over tokens and channels run several times)."""
    global _force_small_blocks
    previous, _force_small_blocks = _force_small_blocks, True
    try:
        yield
    finally:
        _force_small_blocks = previous


@contextlib.contextmanager
def forced_launch(**configs) -> Iterator[None]:
    """Launch with these configurations inside the region, also under the interpreter: token=TokenBlocks
    (CREPA and inverse norms), manifold_forward= / manifold_backward=ManifoldBlocks. Used by the GPU
    check's sweep; the kernels' defaults are untouched outside the region."""
    kinds = {"token": TokenBlocks, "manifold_forward": ManifoldBlocks, "manifold_backward": ManifoldBlocks}
    for kind, config in configs.items():
        if kind not in kinds:
            raise ValueError(f"forced_launch: unknown kernel {kind!r}; valid: {', '.join(kinds)}")
        if not isinstance(config, kinds[kind]):
            raise TypeError(f"forced_launch: {kind}={config!r} is not a {kinds[kind].__name__}")
    previous = dict(_forced_launch)
    _forced_launch.update(configs)
    try:
        yield
    finally:
        _forced_launch.clear()
        _forced_launch.update(previous)


def _tuned(kind: str, dtype: torch.dtype) -> dict | None:
    return tuned_launch.TUNED.get((kind, str(dtype).removeprefix("torch.")))


def accumulator_dtype(dtype: torch.dtype) -> tl.dtype:
    """Triton compute dtype for inputs of `dtype`: float64 for float64, float32 otherwise."""
    return triton_dtype(compute_dtype(dtype))


def triton_dtype(dtype: torch.dtype) -> tl.dtype:
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


def strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Element strides of a 4-D tensor (kernels take strides instead of requiring contiguity)."""
    if t.dim() != 4:
        raise ValueError(f"expected a 4-D tensor, got shape {tuple(t.shape)}")
    return tuple(t.stride())  # type: ignore[return-value]


@triton.jit
def store_cast(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Cast a float32/float64 tile to the output dtype, rounding to nearest even.

    The interpreter (Triton 3.9) truncates float32 -> bfloat16 (its "rtne" mode rounds half up and
    drops the carry), so there the rounding is done on the bits first and the cast is then exact.
    """
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(DTYPE)


# Per-token power-of-two scaling (docs/contract.md §2: norms must not overflow; |x| ~ 1e30 squares to inf in
# float32). A token x is summed as x·2^-e with 2^e <= max|x| < 2^(e+1), so its squares stay in [1, 4)
# and below; multiplying by a power of two is exact, hence for ordinary magnitudes every scaled sum,
# square root and cosine is bitwise what the unscaled math gives. Exponents live as int32 and are
# clamped to the normal range of the accumulator, so 2^e and 2^-e are always normal numbers.


@triton.jit
def lowest_exponent(ACC: tl.constexpr):
    """The exponent of zero (and subnormal) tokens: the smallest normal exponent of ACC."""
    if ACC == tl.float64:
        return -1022
    else:
        return -126


@triton.jit
def scale_exponent(peak, ACC: tl.constexpr):
    """int32 e with 2^e <= peak < 2^(e+1) for a normal peak >= 0 of dtype ACC, clamped to
    [lowest_exponent, -lowest_exponent] (a zero or subnormal peak gives the lowest)."""
    if ACC == tl.float64:
        biased = ((peak.to(tl.int64, bitcast=True) >> 52) & 0x7FF).to(tl.int32)
        return tl.minimum(tl.maximum(biased - 1023, -1022), 1022)
    else:
        biased = (peak.to(tl.int32, bitcast=True) >> 23) & 0xFF
        return tl.minimum(tl.maximum(biased - 127, -126), 126)


@triton.jit
def power_of_two(exponent, ACC: tl.constexpr):
    """2^exponent in ACC for an int32 exponent <= -lowest_exponent, built from its bits (exact);
    0 below the normal range (the terms it rescales are then negligible, under 2^-126 relative)."""
    if ACC == tl.float64:
        bits = (tl.maximum(exponent, -1022) + 1023).to(tl.int64) << 52
        return tl.where(exponent >= -1022, bits.to(tl.float64, bitcast=True), 0.0)
    else:
        bits = (tl.maximum(exponent, -126) + 127) << 23
        return tl.where(exponent >= -126, bits.to(tl.float32, bitcast=True), 0.0)


@triton.jit
def running_exponent(exponent, tile, ACC: tl.constexpr):
    """Per-row exponent after one more (rows, channels) tile: max(exponent, scale_exponent(max|tile|))."""
    return tl.maximum(exponent, scale_exponent(tl.max(tl.abs(tile), 1), ACC))


@triton.jit
def inverse_norm(scaled_squared_norm, exponent, ACC: tl.constexpr):
    """1/||x·2^-e|| from ||x·2^-e||² (float32 or float64), or 0 for a zero token (||x|| < 1e-12,
    docs/contract.md §2); ||x|| = ||x·2^-e||·2^e may overflow to inf here, which the comparison tolerates."""
    if ACC == tl.float64:
        root = tl.sqrt(scaled_squared_norm)
    else:
        root = tl.sqrt_rn(scaled_squared_norm)
    keep = root * power_of_two(exponent, ACC) >= ZERO_TOKEN_NORM
    return tl.where(keep, 1.0 / tl.where(keep, root, 1.0), 0.0)


@dataclass(frozen=True)
class TokenBlocks:
    """Launch of the token-streaming kernels (CREPA, inverse norms): BLOCK_N tokens per program,
    channels in chunks of BLOCK_D."""

    block_n: int
    block_d: int
    num_warps: int


def token_blocks(num_tokens: int, dim: int, dtype: torch.dtype) -> TokenBlocks:
    if _force_small_blocks:
        return TokenBlocks(block_n=16, block_d=16, num_warps=4)
    if "token" in _forced_launch:
        return _forced_launch["token"]
    if is_interpreter():
        block_d = min(triton.next_power_of_2(dim), _INTERPRETER_MAX_TILE)
        block_n = min(triton.next_power_of_2(num_tokens), max(1, _INTERPRETER_MAX_TILE // block_d))
        return TokenBlocks(block_n=block_n, block_d=block_d, num_warps=1)
    # Memory-bound: a tile of 2048 (half), 1024 (fp32) or 512 (fp64) elements keeps z, y and one
    # neighbour tile in registers with no spills at 4 warps (ptxas for sm_90, CREPA in bf16 at
    # 8 x 256: 102 registers forward, 96 with dz, 165 with dz and dy), so several programs share each SM.
    tuned = _tuned("token", dtype)
    if tuned is not None:  # measured on a GPU; channel chunks no wider than the (padded) width
        return TokenBlocks(tuned["block_n"], max(16, min(triton.next_power_of_2(dim), tuned["block_d"])),
                           tuned["num_warps"])
    tile = {torch.float64: 512, torch.float32: 1024}.get(dtype, 2048)
    block_d = max(16, min(triton.next_power_of_2(dim), tile // 8))
    block_n = min(32, tile // block_d)
    return TokenBlocks(block_n=block_n, block_d=block_d, num_warps=4)


@dataclass(frozen=True)
class ManifoldBlocks:
    """Launch of the manifold kernels: Gram tiles of block_m x block_n tokens, reduced over channels in
    chunks of block_k; the backward writes gradient columns in chunks of block_out."""

    block_m: int
    block_n: int
    block_k: int
    block_out: int
    num_warps: int
    num_stages: int


def manifold_blocks(num_tokens: int, dim_z: int, dim_y: int, dtype: torch.dtype,
                    backward: bool) -> ManifoldBlocks:
    if _force_small_blocks:
        return ManifoldBlocks(16, 16, 16, 16, num_warps=4, num_stages=1)
    kind = "manifold_backward" if backward else "manifold_forward"
    if kind in _forced_launch:
        return _forced_launch[kind]
    widest = max(dim_z, dim_y)
    if is_interpreter():
        rows = min(max(triton.next_power_of_2(num_tokens), 16), 64)
        half = dtype in (torch.float16, torch.bfloat16)
        depth = min(max(triton.next_power_of_2(widest), 16), 128 if half else 32)
        return ManifoldBlocks(rows, rows, depth, depth, num_warps=1, num_stages=1)
    tuned = _tuned(kind, dtype)
    if tuned is not None:  # measured on a GPU
        return ManifoldBlocks(**tuned)
    if dtype in (torch.float32, torch.float64):
        # float64 accumulation with explicit products (no tensor cores): small tiles.
        return ManifoldBlocks(16, 16, 16, 32, num_warps=4, num_stages=1)
    if backward:
        # Two fp32 Gram tiles and a 64 x 128 output accumulator live in registers at once.
        return ManifoldBlocks(64, 64, 64, 128, num_warps=8, num_stages=2)
    return ManifoldBlocks(128, 128, 64, 64, num_warps=8, num_stages=3)


def check_triton_device(t: torch.Tensor) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter only."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and is_interpreter():
        return
    raise RuntimeError(
        f"the Triton kernels run on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got a "
        f"{t.device.type} tensor{' without TRITON_INTERPRET=1' if t.device.type == 'cpu' else ''}")


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make `t`'s CUDA device current while launching (a no-op for CPU tensors)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@dataclass(frozen=True)
class CompiledKernelReport:
    """Static resource use of a kernel compiled for a CUDA architecture (no GPU needed)."""

    name: str
    registers: int
    stack_bytes: int  # per-thread local memory: register spills (and local arrays)
    shared_bytes: int  # shared memory a launch requests
    uses_wgmma: bool


def compile_for_cuda(kernel, pointers: dict, integers: dict, constexprs: dict, num_warps: int,
                     num_stages: int, arch: int = 90) -> CompiledKernelReport:
    """Compile a @triton.jit kernel to a cubin for sm_`arch` on a machine without a GPU.

    A development check of the GPU code path (the interpreter never compiles it): catches compile
    errors and reports registers and local memory from the bundled cuobjdump. `pointers` maps pointer
    arguments to element types ("bf16", "fp32", ...); `integers` gives the values of integer
    arguments, specialised as the launcher would (1 becomes a constant, multiples of 16 are marked
    divisible, values >= 2^31 are int64); the remaining arguments are float32 scalars. Needs
    TRITON_INTERPRET unset when `kernel` was defined.
    """
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if is_interpreter():
        raise RuntimeError("compile_for_cuda needs TRITON_INTERPRET unset (kernels are interpreted)")
    constants = dict(constexprs)
    constants.update({name: 1 for name, value in integers.items() if value == 1})
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = f"*{pointers[name]}"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in integers:
            signature[name] = "i64" if abs(integers[name]) >= 2 ** 31 else "i32"
            if integers[name] % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    source = ASTSource(kernel, signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage for {kernel.__name__}: {usage!r}")
    return CompiledKernelReport(kernel.__name__, int(found.group(1)), int(found.group(2)),
                                max(int(found.group(3)), int(compiled.metadata.shared)), "wgmma" in compiled.asm["ptx"])
