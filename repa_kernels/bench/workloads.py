"""The docs/contract.md §8 benchmark workloads as data, with the work each one must do (bytes and FLOPs).

A workload is one loss call on student tokens z (B, T, N, Dz) and teacher tokens y (B, T, N, Dy),
z requiring grad and y not (the teacher is frozen in training), in one dtype.

Bytes that must move (E_z = B·T·N·Dz·itemsize, E_y likewise; docs/contract.md §8):
  forward            reads Z and Y                         E_z + E_y
  backward           reads Z and Y again, writes dZ        2·E_z + E_y          (+ E_y for dY if y needs grad)
  forward+backward   the sum: the five-pass goal           3·E_z + 2·E_y        (5 passes when Dz = Dy)
  stretch, fwd+bwd   one pass that also produces dZ        2·E_z + E_y          (3 passes)

FLOPs counted against the matmul peak (manifold and U-REPA; S = B·T slices, K = Dz + Dy): the least
dense-matmul work of two known forms of the loss, whichever is smaller for the shape,
  Gram form      (E = Ẑ·Ẑᵀ − Ŷ·Ŷᵀ, N x N)   forward S·N²·K        backward dZ ∝ E·Ẑ: 2·S·N²·Dz
  identity form  (M = Aᵀ·A, A = [Ẑ | Ŷ], K x K, since ||E||² = Σ ± M_ij²)
                                            forward S·N·K²        backward dZ ∝ A·(S·M·S): 2·S·N·K·Dz
(+ the same again for dY when y needs grad; the workloads keep y frozen). forward+backward is the sum.
The forwards count half the products of a full matmul: E and M are symmetric, so only their upper
triangle needs computing. This is a lower bound: no recomputation is charged (a backward that
rebuilds E does the forward's work again). The cosine
terms are element-wise (a few FLOPs per element): CREPA is bound by bytes alone, and U-REPA's cosine
adds only bytes. The time bound of a row is max(bytes / copy bandwidth, FLOPs / matmul throughput).

`backward` alone has no bound: a design that produces dZ during the forward (the three-pass one)
leaves its backward only a scale, so the split between the two modes says nothing about the limit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..options import CrepaOptions

OPS = ("crepa", "urepa", "manifold")
DEVICE_CLASSES = ("gpu", "cpu")
MODES = ("forward", "backward", "forward+backward")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64}


@dataclass(frozen=True)
class Workload:
    """One benchmark case. `options` holds the CREPA cosine options (crepa and the U-REPA cosine)."""

    name: str
    op: str
    batch: int
    frames: int
    tokens: int
    width_z: int
    width_y: int
    dtype: str
    device_class: str
    options: CrepaOptions = field(default_factory=lambda: CrepaOptions(distance=1))
    manifold_weight: float = 3.0
    ci: bool = False  # a reduced-size variant for CI; not in the default selection
    description: str = ""

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"workload {self.name!r}: op={self.op!r} is not valid; valid: {', '.join(OPS)}")
        if self.device_class not in DEVICE_CLASSES:
            raise ValueError(f"workload {self.name!r}: device_class={self.device_class!r} is not valid; "
                             f"valid: {', '.join(DEVICE_CLASSES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"workload {self.name!r}: dtype={self.dtype!r} is not valid; valid: {', '.join(DTYPES)}")
        for name in ("batch", "frames", "tokens", "width_z", "width_y"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"workload {self.name!r}: {name} must be an integer >= 1, got {value!r}")
        if self.op != "manifold" and self.width_z != self.width_y:
            raise ValueError(f"workload {self.name!r}: op={self.op} needs width_z == width_y, "
                             f"got {self.width_z} and {self.width_y}")

    # --- shapes and inputs -------------------------------------------------------------------
    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def z_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.frames, self.tokens, self.width_z)

    @property
    def y_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.frames, self.tokens, self.width_y)

    def shape_text(self) -> str:
        text = f"B={self.batch} T={self.frames} N={self.tokens} D={self.width_z}"
        if self.width_y != self.width_z:
            text += f" Dy={self.width_y}"
        if self.op == "crepa":
            text += f" d={self.options.distance}" + (" cumulative" if self.options.cumulative else "")
        return text

    def make_inputs(self, device: torch.device | str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """z (requires grad) and y (frozen teacher), random normal, on `device` in the workload dtype."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        z = torch.randn(self.z_shape, generator=generator, dtype=torch.float32).to(device, self.torch_dtype)
        y = torch.randn(self.y_shape, generator=generator, dtype=torch.float32).to(device, self.torch_dtype)
        return z.requires_grad_(True), y

    # --- work that must be done --------------------------------------------------------------
    def tensor_bytes(self) -> tuple[int, int]:
        itemsize = self.torch_dtype.itemsize
        elements = self.batch * self.frames * self.tokens
        return elements * self.width_z * itemsize, elements * self.width_y * itemsize

    def bytes_moved(self, mode: str) -> int:
        """Bytes of the separate forward/backward scheme (five passes for forward+backward)."""
        z_bytes, y_bytes = self.tensor_bytes()
        forward = z_bytes + y_bytes
        backward = z_bytes + y_bytes + z_bytes
        return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[_mode(mode)]

    def bytes_moved_stretch(self, mode: str) -> int | None:
        """Three passes (read Z, Y, write dZ) for forward+backward; None for the other modes."""
        if _mode(mode) != "forward+backward":
            return None
        z_bytes, y_bytes = self.tensor_bytes()
        return 2 * z_bytes + y_bytes

    def flops(self, mode: str) -> int:
        """Matrix-product FLOPs of the cheaper form (0 for CREPA, whose cosine is element-wise)."""
        return self._flops_by_form(mode)[self.flops_form()]

    def flops_form(self) -> str:
        """"gram" or "identity": the form with less matrix work for this shape (see the module doc)."""
        if self.op == "crepa":
            return "none"
        return "gram" if self.tokens <= self.width_z + self.width_y else "identity"

    def _flops_by_form(self, mode: str) -> dict[str, int]:
        mode = _mode(mode)
        if self.op == "crepa":
            return {"none": 0}
        slices, n, width = self.batch * self.frames, self.tokens, self.width_z + self.width_y
        forms = {"gram": (slices * n * n * width, 2 * slices * n * n * self.width_z),  # forwards: symmetric
                 "identity": (slices * n * width * width, 2 * slices * n * width * self.width_z)}
        pick = {"forward": lambda f, b: f, "backward": lambda f, b: b, "forward+backward": lambda f, b: f + b}[mode]
        return {name: pick(*counts) for name, counts in forms.items()}

    # --- serialisation (the CPU worker subprocess receives workloads as JSON) ----------------
    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["options"] = dataclasses.asdict(self.options)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Workload":
        data = dict(data)
        data["options"] = CrepaOptions(**data["options"])
        return cls(**data)


def _mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not valid; valid: {', '.join(MODES)}")
    return mode


_ADJACENT = CrepaOptions(distance=1)
_CUMULATIVE = CrepaOptions(distance=4, cumulative=True)
_SELF_ONLY = CrepaOptions(distance=0)

WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    # docs/contract.md §8, GPU (bf16: the training dtype)
    Workload("crepa-wan480p", "crepa", 1, 21, 1560, 1536, 1536, "bfloat16", "gpu", _ADJACENT,
             description="Wan 480p latent tokens, adjacent neighbours; memory bandwidth"),
    Workload("crepa-cumulative", "crepa", 1, 21, 1560, 1536, 1536, "bfloat16", "gpu", _CUMULATIVE,
             description="as crepa-wan480p with d=4 cumulative; memory bandwidth"),
    Workload("repa-sit", "crepa", 256, 1, 256, 768, 768, "bfloat16", "gpu", _SELF_ONLY,
             description="image REPA on SiT-XL/2 at 256px; memory bandwidth"),
    Workload("urepa-sdxl", "urepa", 8, 1, 1024, 1536, 1536, "bfloat16", "gpu", _SELF_ONLY,
             description="U-REPA (cosine + 3 x manifold) on an SDXL-sized UNet; matrix throughput"),
    Workload("manifold-video", "manifold", 2, 1, 3600, 768, 768, "bfloat16", "gpu",
             description="manifold loss over a video's tokens; matrix throughput"),
    Workload("manifold-16k", "manifold", 1, 1, 16384, 1024, 1024, "bfloat16", "gpu",
             description="manifold loss, 16k tokens; the reference needs > 3 GB for the Grams"),
    # docs/contract.md §8, CPU (fp32)
    Workload("crepa-cpu", "crepa", 1, 13, 1024, 768, 768, "float32", "cpu", _ADJACENT,
             description="CREPA on CPU, adjacent neighbours"),
    Workload("urepa-cpu", "urepa", 4, 1, 1024, 768, 768, "float32", "cpu", _SELF_ONLY,
             description="U-REPA on CPU"),
    # the CPU memory goal's shape: a manifold loss whose Grams dominate memory
    Workload("manifold-4k-cpu", "manifold", 1, 1, 4096, 384, 384, "float32", "cpu",
             description="manifold loss on CPU, 4k tokens (64 MB per Gram)"),
    # reduced sizes for CI (pytest-benchmark suite and the CLI tests); never in the default selection
    Workload("crepa-cpu-ci", "crepa", 1, 5, 128, 96, 96, "float32", "cpu", _ADJACENT, ci=True,
             description="reduced crepa-cpu for CI"),
    Workload("urepa-cpu-ci", "urepa", 2, 1, 128, 96, 96, "float32", "cpu", _SELF_ONLY, ci=True,
             description="reduced urepa-cpu for CI"),
    Workload("manifold-cpu-ci", "manifold", 1, 1, 256, 64, 64, "float32", "cpu", ci=True,
             description="reduced manifold-4k-cpu for CI"),
)}


def default_workloads(device_type: str) -> list[Workload]:
    """The full-size workloads of the device's class: gpu for cuda, cpu otherwise."""
    device_class = "gpu" if device_type == "cuda" else "cpu"
    return [w for w in WORKLOADS.values() if w.device_class == device_class and not w.ci]


def get_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; valid: {', '.join(WORKLOADS)}")
    return WORKLOADS[name]
