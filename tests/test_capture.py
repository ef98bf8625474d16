"""Hidden-state capture by forward hooks on every supported diffusers family (docs/contract.md §3, §7)."""

import copy
import functools
import gc
import io
import weakref

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

import tiny_models as tm
from repa_kernels.regularizer.capture import HiddenStateCapture, attached_capture
from repa_kernels.regularizer.families import FAMILIES, CaptureError, detect_family, grid_from_latents, unwrap_model
from repa_kernels.regularizer.grids import tokens_to_grid

ALL_BUILDERS = {**tm.VIDEO_BUILDERS, **tm.IMAGE_BUILDERS, "unet": tm.tiny_unet}


def _latents(video: bool, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (1, 4, 3, 8, 12) if video else (1, 4, 8, 12)
    return torch.randn(shape, generator=generator)


def _capture_once(model, latents, block=0, hidden_size=None):
    capture = HiddenStateCapture([model], block, hidden_size=hidden_size)
    try:
        with torch.no_grad():
            tm.tiny_forward(model, latents)
        return capture.consume()
    finally:
        capture.detach()


@pytest.mark.parametrize("family", list(ALL_BUILDERS))
def test_token_order_perturbing_one_latent_voxel_moves_its_token_most(family):
    model = ALL_BUILDERS[family]()
    video = family in tm.VIDEO_BUILDERS
    base = _latents(video)
    reference = _capture_once(model, base)
    grid = reference.grid or grid_from_latents(reference.family, model, base)
    patch = (1, 2, 2) if family == "unet" else reference.family.latent_patch_size(model)
    assert reference.student.shape == (1, grid.tokens, reference.student.shape[-1])
    # a stride-2 convolution sees latent column 2k+1 from two cells, so the UNet gets even positions
    positions = ((0, 4, 6), (0, 6, 10), (0, 2, 2)) if family == "unet" else ((2, 5, 7), (1, 7, 11), (0, 2, 1))
    for frame, row, col in positions:
        if not video:
            frame = 0
        moved = base.clone()
        moved[(0, 1, frame, row, col) if video else (0, 1, row, col)] += 20.0
        change = (_capture_once(model, moved).student - reference.student).norm(dim=-1)
        change = tokens_to_grid(change.unsqueeze(-1), grid)[0, ..., 0]
        where = (change == change.max()).nonzero()[0].tolist()
        assert where == [frame // patch[0], row // patch[1], col // patch[2]], (family, frame, row, col)


@pytest.mark.parametrize("family,hidden", [("wan", 16), ("ltx_video", 16), ("sana_video", 16), ("kandinsky5", 24),
                                           ("flux", 16), ("sd3", 16), ("pixart", 16), ("sana", 16), ("unet", 16)])
def test_hidden_size_is_read_from_the_config(family, hidden):
    model = ALL_BUILDERS[family]()
    capture = HiddenStateCapture([model], 0)
    assert capture.hidden_size == hidden and capture.family.name == family
    capture.detach()


def test_missing_hidden_size_names_the_attributes_tried_and_the_argument():
    model = tm.tiny_wan()
    model.register_to_config(attention_head_dim=None)
    with pytest.raises(CaptureError) as info:
        HiddenStateCapture([model], 0)
    message = str(info.value)
    assert "num_attention_heads*attention_head_dim" in message and "hidden_size=" in message
    capture = HiddenStateCapture([model], 0, hidden_size=16)
    assert capture.hidden_size == 16
    capture.detach()


def test_wrong_explicit_hidden_size_is_caught_at_capture():
    model = tm.tiny_wan()
    capture = HiddenStateCapture([model], 0, hidden_size=32)
    with pytest.raises(CaptureError, match="width 16 but the hidden size is 32"):
        tm.tiny_forward(model, _latents(True))
    capture.detach()


def test_flux_indices_run_through_double_then_single_blocks_and_drop_text_tokens():
    model = tm.tiny_flux()
    assert len(model.transformer_blocks) == 2 and len(model.single_transformer_blocks) == 2
    seen = {}

    def remember(module, args, out):
        seen["image"] = out[1]

    handle = model.single_transformer_blocks[0].register_forward_hook(remember)
    latents = _latents(False)
    got = _capture_once(model, latents, block=2)
    handle.remove()
    assert torch.equal(got.student, seen["image"])
    assert got.student.shape == (1, (8 // 2) * (12 // 2), 16)     # text tokens removed, 2x2 packing
    assert got.grid is None and grid_from_latents(got.family, model, latents) == (1, 4, 6)
    with pytest.raises(CaptureError, match="hidden states not returned"):
        HiddenStateCapture([model], 4)


def test_sd3_last_block_returns_none_text_and_the_image_is_captured():
    model = tm.tiny_sd3()
    assert model.transformer_blocks[-1].context_pre_only
    got = _capture_once(model, _latents(False), block=2)
    assert got.student.shape == (1, 24, 16) and got.grid == (1, 4, 6)


def test_block_index_past_the_end_names_model_index_and_count():
    with pytest.raises(CaptureError) as info:
        HiddenStateCapture([tm.tiny_wan()], 3)
    message = str(info.value)
    for part in ("WanTransformer3DModel", "crepa_block_index=3", "3 blocks", "hidden states not returned"):
        assert part in message


def test_unsupported_family_lists_the_supported_ones():
    class NotADiT(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList([nn.Linear(4, 4)])   # no transformer_blocks / blocks / layers
            self.blocks = nn.ModuleList()                      # an empty list is no list of blocks

    with pytest.raises(CaptureError) as info:
        HiddenStateCapture([NotADiT()], 0)
    message = str(info.value)
    assert "NotADiT is not a supported model family" in message
    for family in FAMILIES:
        assert family.name in message
    assert "dit: any other DiT whose blocks sit in an nn.ModuleList named transformer_blocks / blocks / " \
           "layers" in message
    assert "tried its class hierarchy (Module, NotADiT, object)" in message


# ---- the generic `dit` family: any other image DiT with a list of blocks (docs/contract.md §7) --------------------

def _square_latents(seed: int = 3) -> torch.Tensor:
    return torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


GENERIC_BUILDERS = {"diffusers-dit": tm.tiny_dit, "hunyuan-dit": tm.tiny_hunyuan_dit, "plain-sit": tm.TinySiT}


@pytest.mark.parametrize("builder", list(GENERIC_BUILDERS))
def test_generic_dit_token_order_perturbing_one_latent_pixel_moves_its_token_most(builder):
    model = GENERIC_BUILDERS[builder]()
    hidden_size = 16 if builder == "plain-sit" else None
    base = _square_latents()
    reference = _capture_once(model, base, block=1, hidden_size=hidden_size)
    assert reference.family.name == "dit" and reference.family.kind == "image"
    assert reference.grid == (1, 4, 4) == grid_from_latents(reference.family, model, base)
    for row, col in ((5, 7), (0, 2), (7, 1)):
        moved = base.clone()
        moved[0, 1, row, col] += 20.0
        change = (_capture_once(model, moved, block=1, hidden_size=hidden_size).student
                  - reference.student).norm(dim=-1)
        change = tokens_to_grid(change.unsqueeze(-1), reference.grid)[0, 0, ..., 0]
        where = (change == change.max()).nonzero()[0].tolist()
        assert where == [row // 2, col // 2], (builder, row, col)


def test_generic_dit_reads_blocks_hidden_size_and_patch_from_the_diffusers_config():
    model = tm.tiny_dit()
    family = detect_family(model)
    assert family.name == "dit" and family.block_lists == ("transformer_blocks",)
    capture = HiddenStateCapture([model], 2)
    assert capture.hidden_size == 16 and family.latent_patch_size(model) == (1, 2, 2)
    capture.detach()
    with pytest.raises(CaptureError, match="crepa_block_index=3 is out of range for DiTTransformer2DModel, which "
                                           "has 3 blocks \\(3 transformer_blocks"):
        HiddenStateCapture([model], 3)


def test_generic_dit_without_a_config_asks_for_hidden_size_and_uses_its_patch_size_attribute():
    model = tm.TinySiT()
    with pytest.raises(CaptureError) as info:
        HiddenStateCapture([model], 0)
    message = str(info.value)
    assert "cannot read the hidden size of TinySiT" in message and "hidden_size=" in message
    assert "config.hidden_size" in message
    assert detect_family(model).latent_patch_size(model) == (1, 2, 2)
    del model.patch_size
    with pytest.raises(CaptureError, match="cannot read the patch size of TinySiT .*pass token_grid="):
        detect_family(model).latent_patch_size(model)


def test_video_latents_for_a_generic_dit_give_a_frames_rows_columns_grid():
    model = tm.tiny_dit()
    assert grid_from_latents(detect_family(model), model, torch.zeros(1, 4, 3, 8, 6)) == (3, 4, 3)


def test_generic_dit_blocks_returning_tuples_are_refused_with_what_is_supported():
    model = tm.TinySiT(block_output="tuple")
    capture = HiddenStateCapture([model], 0, hidden_size=16)
    with pytest.raises(CaptureError, match="returned tuple, not a tensor .*TinySiT here.* one \\(B, S, C\\) tensor"):
        tm.tiny_forward(model, _square_latents())
    capture.detach()


def test_kandinsky5_sparse_attention_token_order_is_unpermuted():
    model = tm.tiny_kandinsky5()

    class DenseProcessor:  # runs the real model in its 8x8-window token order without flex attention
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, rotary_emb=None, sparse_params=None):
            return self.inner(attn, hidden_states, encoder_hidden_states, rotary_emb, None)

    for block in model.visual_transformer_blocks:
        block.self_attention.processor = DenseProcessor(block.self_attention.processor)
    latents = torch.randn(1, 4, 2, 16, 32, generator=torch.Generator().manual_seed(0))
    rope = [torch.arange(2), torch.arange(8), torch.arange(16)]

    def run(x, sparse):
        capture = HiddenStateCapture([model], 0)
        with torch.no_grad():
            out = model(x.permute(0, 2, 3, 4, 1), tm._text(1), torch.tensor([500.0]), tm._text(1, 8, 1)[:, 0], rope,
                        torch.arange(tm.TEXT_TOKENS), sparse_params=sparse, return_dict=False)
        got = capture.consume()
        capture.detach()
        return got, out

    dense, dense_out = run(latents, None)
    sparse, sparse_out = run(latents, {"to_fractal": True})
    # Same model output either way. The two token orders sum attention in different orders: in float32 that
    # alone measured 2.0e-5 at an output magnitude of 2.5 on one CPU (and < 1e-5 on another), while a
    # token-order error moves outputs by O(1); 1e-4 separates the two.
    assert torch.allclose(dense_out, sparse_out, atol=1e-4)
    assert torch.allclose(sparse.student, dense.student, atol=1e-5)  # and the capture is in raster order


@pytest.mark.parametrize("early_stop", [True, False])
def test_non_reentrant_checkpointing_keeps_the_first_capture_and_its_gradient(early_stop):
    latents = _latents(True)
    grads = []
    for checkpointing in (False, True):
        model = tm.tiny_wan().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        capture = HiddenStateCapture([model], 1)
        calls = []
        model.blocks[1].register_forward_pre_hook(lambda *a: calls.append(1))
        with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
            tm.tiny_forward(model, latents)
            got = capture.consume()
            assert got.student.requires_grad
            (got.student.square().mean()).backward()
        assert not capture.has_capture                 # the recomputation in backward captured nothing
        assert len(calls) == (2 if checkpointing else 1)
        grads.append(model.blocks[0].ffn.net[0].proj.weight.grad.clone())
        capture.detach()
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_reentrant_checkpointing_is_an_error_that_says_use_non_reentrant():
    model = tm.tiny_wan().train()
    model.enable_gradient_checkpointing(
        gradient_checkpointing_func=functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=True))
    capture = HiddenStateCapture([model], 1)
    with pytest.raises(CaptureError, match="non-reentrant"):
        tm.tiny_forward(model, _latents(True).requires_grad_())
    capture.detach()


def test_detach_restores_the_forward_and_removes_every_hook():
    model = tm.tiny_wan()
    latents = _latents(True)
    before = tm.tiny_forward(model, latents)
    hooks_before = [dict(m._forward_hooks) for m in model.modules()]
    capture = HiddenStateCapture([model], 1, teacher_block_index=2)
    assert torch.equal(tm.tiny_forward(model, latents), before)
    capture.detach()
    assert not capture.attached and not capture.has_capture
    assert [dict(m._forward_hooks) for m in model.modules()] == hooks_before
    assert not model._forward_pre_hooks
    assert torch.equal(tm.tiny_forward(model, latents), before)


def test_no_captured_tensor_stays_alive_after_the_loss():
    model = tm.tiny_wan().train()
    refs = []
    model.blocks[1].register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out)))
    capture = HiddenStateCapture([model], 1, teacher_block_index=2)
    pred = tm.tiny_forward(model, _latents(True))
    got = capture.consume()
    loss = got.student.square().mean() + pred.mean()
    del got
    loss.backward()
    del loss, pred
    gc.collect()
    assert refs and refs[0]() is None
    assert not capture.has_capture


def test_consume_without_a_forward_says_to_run_the_model_first():
    capture = HiddenStateCapture([tm.tiny_wan()], 0)
    with pytest.raises(CaptureError, match="run the model's forward"):
        capture.consume()


def test_backbone_teacher_block_is_detached_and_student_keeps_grad():
    model = tm.tiny_wan().train()
    capture = HiddenStateCapture([model], 0, teacher_block_index=2)
    tm.tiny_forward(model, _latents(True))
    got = capture.consume()
    assert got.student.requires_grad and got.teacher is not None and not got.teacher.requires_grad
    assert got.teacher.shape == got.student.shape


def test_several_models_share_one_capture_and_the_latest_forward_wins():
    high, low = tm.tiny_wan(), tm.tiny_wan()
    with torch.no_grad():
        for p in low.parameters():
            p.mul_(0.5)
    capture = HiddenStateCapture([high, low], 1)
    latents = _latents(True)
    tm.tiny_forward(high, latents)
    tm.tiny_forward(low, latents)
    got = capture.consume()
    assert got.model is low
    capture.detach()     # one capture per model at a time
    alone = _capture_once(low, latents, block=1)
    assert torch.allclose(got.student, alone.student)
    with pytest.raises(CaptureError, match="one family"):
        HiddenStateCapture([tm.tiny_wan(), tm.tiny_sd3()], 0)


def test_a_wrapper_that_calls_forward_directly_still_captures():
    model = tm.tiny_sana()

    class CallsForward(nn.Module):       # what PEFT's tuner wrappers do
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return self.inner.forward(*args, **kwargs)

    capture = HiddenStateCapture([model], 1)
    latents = _latents(False)
    wrapper = CallsForward(model)
    with torch.no_grad():
        wrapper(latents, tm._text(1), torch.tensor([500.0]), return_dict=False)
    got = capture.consume()
    assert got.grid is None and got.student.shape == (1, 96, 16)   # grid then comes from the latents
    assert got.captured_without_grad_mode
    # a later training forward through the same wrapper is not taken for a no-grad one (no model-level
    # hook runs to reset the state between the two)
    wrapper(latents, tm._text(1), torch.tensor([500.0]), return_dict=False)
    got = capture.consume()
    assert got.student.requires_grad and not got.captured_without_grad_mode
    capture.detach()


def test_unwrap_and_detect_through_torch_compile():
    model = tm.tiny_wan()
    compiled = torch.compile(model, backend="eager")
    assert unwrap_model(compiled) is model
    assert detect_family(unwrap_model(compiled)).name == "wan"


@pytest.mark.slow
def test_capture_works_on_a_torch_compiled_model():
    model = tm.tiny_wan(num_layers=2).train()
    capture = HiddenStateCapture([torch.compile(model, backend="aot_eager")], 0)
    compiled = torch.compile(model, backend="aot_eager")
    latents = _latents(True)[:, :, :2, :4, :4]
    out = tm.tiny_forward(compiled, latents)
    got = capture.consume()
    assert got.student.shape == (1, 8, 16) and got.student.requires_grad and got.grid == (2, 2, 2)
    (got.student.square().mean() + 0 * out.sum()).backward()
    assert model.blocks[0].ffn.net[0].proj.weight.grad.abs().sum() > 0
    capture.detach()     # one capture per model at a time
    eager = _capture_once(model, latents)
    assert torch.allclose(eager.student, got.student, atol=1e-5)


@pytest.mark.parametrize("family", ["wan", "unet"])
def test_a_deep_copy_of_a_hooked_model_runs_as_a_plain_model(family):
    model = ALL_BUILDERS[family]()
    capture = HiddenStateCapture([model], 0)
    latents = _latents(family != "unet")
    ema = copy.deepcopy(model)           # how trainers make EMA copies
    with torch.no_grad():
        out_copy = tm.tiny_forward(ema, latents)
        assert not capture.has_capture   # the copy's hooks capture nothing, into nothing
        out = tm.tiny_forward(model, latents)
    assert torch.equal(out_copy, out) and capture.consume().model is model
    shallow = copy.copy(model)           # shares the hook dicts: the model-level hook ignores it
    with torch.no_grad():
        tm.tiny_forward(shallow, latents)
    capture.detach()
    assert attached_capture(ema) is None
    HiddenStateCapture([ema], 0).detach()   # the copy takes a capture of its own


def test_saving_a_hooked_model_whole_gives_a_plain_model():
    model = tm.tiny_unet()
    capture = HiddenStateCapture([model], 0)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    latents = _latents(False)
    with torch.no_grad():
        assert torch.equal(tm.tiny_forward(loaded, latents), tm.tiny_forward(model, latents))
    assert capture.consume().model is model
    capture.detach()


def test_a_second_capture_on_a_model_is_refused_until_the_first_detaches():
    model = tm.tiny_wan()
    first = HiddenStateCapture([model], 1, owner="a CrepaRegularizer (block 1)")
    with pytest.raises(CaptureError, match=r"already has a CrepaRegularizer \(block 1\) attached.*detach\(\)"):
        HiddenStateCapture([tm.tiny_wan(), model], 0)
    first.detach()
    second = HiddenStateCapture([model], 0)
    with torch.no_grad():
        tm.tiny_forward(model, _latents(True))
    assert second.has_capture and not first.has_capture
    second.detach()
