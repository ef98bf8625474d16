"""numpy integers are accepted wherever the regularizer takes an int (token_grid, hidden_size), as the
kernel options and the config value rules accept them; bools and non-integers stay refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models as tm
from repa_kernels.regularizer import CrepaRegularizer
from repa_kernels.regularizer.grids import TokenGrid, parse_token_grid

BASE = {"crepa_enabled": True, "crepa_block_index": 1, "crepa_encoder_image_size": 16}


def test_token_grid_takes_numpy_integers_and_refuses_the_rest():
    grid = parse_token_grid(np.array([3, 2, 3]))
    assert grid == TokenGrid(3, 2, 3) and all(type(v) is int for v in grid)
    for bad in ((3, 2, True), (3, 2, 3.0), (3, 2, np.float32(3)), (3, 2), (3, 0, 3)):
        with pytest.raises(ValueError, match="token_grid must be"):
            parse_token_grid(bad)


def test_hidden_size_takes_a_numpy_integer():
    model = tm.tiny_wan().train()
    reg = CrepaRegularizer.from_config(BASE, transformer=model, encoder=tm.tiny_dinov2(),
                                       hidden_size=np.int64(model.config.num_attention_heads
                                                            * model.config.attention_head_dim))
    tm.tiny_forward(model, torch.randn(2, 4, 3, 4, 6))
    loss, _ = reg(teacher_features=torch.randn(2, 3, 15, 16), step=0, token_grid=np.array([3, 2, 3]))
    assert torch.isfinite(loss)
    reg.detach()
    with pytest.raises(TypeError, match="hidden_size must be a positive integer"):
        CrepaRegularizer.from_config(BASE, transformer=model, encoder=tm.tiny_dinov2(), hidden_size=True)
