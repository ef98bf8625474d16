"""`repa-kernels demo` (also `python -m repa_kernels.demo`): a short, real CREPA fine-tune of a tiny video
transformer on CPU.

- fine_tune.py: the command (options, the training loop, the timing of the fused backend vs the
  reference, the outputs: metrics.csv, curves.png, summary.json);
- data.py: the procedurally generated clips of moving shapes it trains on;
- models.py: the tiny random-init Wan / LTX-Video transformer, its VAE and the DINOv2 teacher.
"""

from .fine_tune import add_arguments, main, run

__all__ = ["add_arguments", "main", "run"]
