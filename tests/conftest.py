import os
import tempfile

import torch

# Triton's interpreter must be chosen before any @triton.jit module is imported, and only when no
# CUDA device exists, so that a GPU run tests the compiled kernels.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A fresh inductor cache per run: a cache left by an earlier checkout can hold code compiled against an
# older fake (meta) shape of a custom op, which inductor's cache key does not see.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="repa-inductor-"))
# The tests choose backends explicitly; a user's override would silently change what they test.
os.environ.pop("REPA_KERNELS_IMPL", None)

import pytest  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
