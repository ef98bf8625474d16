"""Every model family of the user docs (and the peer trainer's video/image families) through the regularizer,
each tiny model fed what its diffusers pipeline feeds it.

For each family and each list of blocks, in the encoder-free modes (backbone; teacher features on a grid
exactly 2x the student's in rows and columns): the loss is finite; every image/video token of the captured
block's output gets a nonzero gradient and no other token of that output (text, registers, padding, reference
images, audio) gets one; the model's prediction is the same with the hooks on; and a one-hot teacher (zero
tokens carry no direction) sends its gradient to the student token that covers it, in its frame and the CREPA
neighbour frames. Latents are non-square and the batch holds captions of different lengths. The UNets of the
U-REPA docs (SD1.5, SDXL, Kolors) are checked with teacher features only.

Where the image tokens sit in each captured output is written here from the diffusers 0.42 model code
(`IMAGE_AT`), independently of the package's family table, so a wrong table entry fails these tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import tiny_families as tf
import tiny_models as tm
from repa_kernels.regularizer import CrepaRegularizer, UrepaRegularizer
from repa_kernels.regularizer.capture import HiddenStateCapture
from repa_kernels.regularizer.grids import resample_grid

CAPTIONS = [2, 5]                 # unpadded caption lengths of the two samples of a batch
TEACHER_WIDTH = 16                # tiny_dinov2's width


@dataclass(frozen=True)
class Family:
    build: Callable
    forward: Callable              # (model, latents, caption lengths) -> prediction
    video: bool
    patch: tuple[int, int, int]    # latents per token (frames, rows, columns), from the pipeline
    lists: tuple[int, ...]         # blocks per block list, in index order
    channels: int = 4

    def grid(self, latents):
        size = latents.shape[2:] if self.video else (1,) + tuple(latents.shape[2:])
        return tuple(n // p for n, p in zip(size, self.patch))


def _fixed_captions(model, latents, text_lengths):
    return tm.tiny_forward(model, latents)   # tiny_models' forwards: one 3-token caption per sample


def _new(name, patch, lists):
    case = tf.CASES[name]
    return Family(case.build, case.forward, case.video, patch, lists, case.latent_channels)


FAMILIES = {
    "wan": Family(tm.tiny_wan, _fixed_captions, True, (1, 2, 2), (3,)),
    "ltx_video": Family(tm.tiny_ltx, _fixed_captions, True, (1, 1, 1), (3,)),
    "sana_video": Family(tm.tiny_sana_video, _fixed_captions, True, (1, 2, 2), (3,)),
    "kandinsky5": Family(tm.tiny_kandinsky5, _fixed_captions, True, (1, 2, 2), (3,)),
    "flux": Family(tm.tiny_flux, _fixed_captions, False, (1, 2, 2), (2, 2)),
    "sd3": Family(tm.tiny_sd3, _fixed_captions, False, (1, 2, 2), (3,)),
    "pixart": Family(tm.tiny_pixart, _fixed_captions, False, (1, 2, 2), (3,)),
    "sana": Family(tm.tiny_sana, _fixed_captions, False, (1, 1, 1), (3,)),
    "flux2": _new("flux2", (1, 1, 1), (2, 2)),
    "chroma": _new("chroma", (1, 2, 2), (2, 2)),
    "hidream": _new("hidream", (1, 2, 2), (2, 2)),
    "auraflow": _new("auraflow", (1, 2, 2), (2, 2)),
    "lumina2": _new("lumina2", (1, 2, 2), (3,)),
    "ltx2": _new("ltx2", (1, 1, 1), (3,)),
    "qwen_image": _new("qwen_image", (1, 2, 2), (3,)),
    "hunyuan_video15": _new("hunyuan_video15", (1, 1, 1), (3,)),
    "hunyuan_video": _new("hunyuan_video", (1, 2, 2), (2, 2)),
    "cosmos": _new("cosmos", (1, 2, 2), (3,)),
}


# Where the image tokens sit in a captured block's raw output, per family and block list:
# (tuple item or None for a plain tensor, first image position of each sample given the caption lengths).
def _at(item, start=lambda lengths: [0] * len(lengths)):
    return item, start


IMAGE_AT = {
    "flux": [_at(1), _at(1)],
    "sd3": [_at(1)],
    "flux2": [_at(1), _at(None, lambda n: [max(n)] * len(n))],          # text padded to the longest caption
    "chroma": [_at(1), _at(None, lambda n: [max(n)] * len(n))],
    "hidream": [_at(0), _at(None)],                                      # image first, then padding and text
    "auraflow": [_at(1), _at(None, lambda n: [8 + max(n)] * len(n))],   # 8 register tokens, then the caption
    "lumina2": [_at(None, lambda n: list(n))],                           # each sample's own caption length
    "ltx2": [_at(0)],                                                    # (video, audio)
    "qwen_image": [_at(1)],
    "hunyuan_video15": [_at(0)],
    "hunyuan_video": [_at(0), _at(0)],
}
PARAMS = [(family, list_index) for family, spec in FAMILIES.items() for list_index in range(len(spec.lists))]


def _latents(family, batch=2, frames=3, rows=8, cols=12, seed=3):
    spec = FAMILIES[family]
    shape = (batch, spec.channels, frames, rows, cols) if spec.video else (batch, spec.channels, rows, cols)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class _KeepOutput:
    """Forward hook that keeps a block's first output of a forward, with gradients retained."""

    def __init__(self, block):
        self.outputs = None
        self.handle = block.register_forward_hook(self)

    def __call__(self, module, args, output):
        if self.outputs is None:
            items = tuple(output) if isinstance(output, (tuple, list)) else (output,)
            for item in items:
                if isinstance(item, torch.Tensor) and item.requires_grad:
                    item.retain_grad()
            self.outputs = items


def _image_token_grads(kept: _KeepOutput, family, list_index, tokens, captions, image_at=None):
    """Gradient norms (B, tokens) of the image tokens of the captured output; asserts that nothing else in
    that output got a gradient."""
    item, starts = (image_at or IMAGE_AT.get(family, [_at(None)]))[list_index]
    starts = starts(captions)
    image = None
    for k, output in enumerate(kept.outputs):
        if not isinstance(output, torch.Tensor):
            continue
        grad = output.grad if output.grad is not None else torch.zeros_like(output)
        if k != (item or 0):
            assert grad.abs().max() == 0, f"{family}: output item {k}, not the image tokens, got a gradient"
            continue
        norms = grad.norm(dim=-1)                                                  # (B, S)
        image = torch.stack([norms[b, s:s + tokens] for b, s in enumerate(starts)])
        rest = norms.clone()
        for b, s in enumerate(starts):
            rest[b, s:s + tokens] = 0
        assert rest.max() == 0, f"{family}: a token outside the image tokens got a gradient"
    return image


def _student_index(family, list_index):
    lists = FAMILIES[family].lists
    return sum(lists[:list_index]) + (1 if lists[list_index] > 1 else 0)


def _covering_tokens(grid, row, col):
    """(rows, columns) mask of the student tokens that see teacher token (row, col) of the 2x grid: the token
    covering it, and its neighbour the 2x antialiased downsampling (the package's teacher-to-student
    alignment, tested on its own in test_grids.py) blends it into."""
    one_hot = torch.zeros(1, 1, 2 * grid[1], 2 * grid[2], 1)
    one_hot[0, 0, row, col] = 1.0
    mask = resample_grid(one_hot, (grid[1], grid[2]))[0, 0, ..., 0] > 0
    assert mask[row // 2, col // 2] and mask.sum() <= 4
    return mask


def _one_hot_teacher(grid, frame, row, col):
    """Teacher features on the grid 2x the student's in rows and columns, zero but at (frame, row, col)."""
    features = torch.zeros(2, grid[0], 4 * grid[1] * grid[2], TEACHER_WIDTH)
    features[:, frame, row * 2 * grid[2] + col] = 1.0
    return features


def _check_encoder_free_modes(family, list_index, forward, latents, captions=CAPTIONS, backbone_too=True,
                              image_at=None):
    spec = FAMILIES[family]
    model = spec.build().train()
    grid = spec.grid(latents)
    tokens = grid[0] * grid[1] * grid[2]
    with torch.no_grad():
        reference = forward(model, latents, captions)
    block, last = _student_index(family, list_index), sum(spec.lists) - 1
    backbone = {"crepa_enabled": True, "crepa_block_index": block, "crepa_use_backbone_features": True,
                "crepa_teacher_block_index": last}
    features = {"crepa_enabled": True, "crepa_block_index": block}
    random_teacher = torch.randn(2, grid[0], 4 * tokens // grid[0], TEACHER_WIDTH,
                                 generator=torch.Generator().manual_seed(5))
    row, col = 2 * grid[1] - 3, 2 * grid[2] - 2            # a teacher token in the last rows / columns
    covering = _covering_tokens(grid, row, col)
    runs = [(features, dict(teacher_features=random_teacher, token_grid=grid)),
            (features, dict(teacher_features=_one_hot_teacher(grid, 0, row, col), token_grid=grid))]
    if block < last and backbone_too:
        runs.insert(0, (backbone, dict(latents=latents)))
    for keys, call in runs:
        reg = CrepaRegularizer.from_config(keys, transformer=model, impl="reference",
                                           encoder=None if "latents" in call else tm.tiny_dinov2())
        assert reg.family.name == family
        kept = _KeepOutput(reg.family.blocks(model)[block])
        prediction = forward(model, latents, captions)
        assert torch.allclose(prediction, reference, atol=1e-6, rtol=0), f"{family}: the hooks changed the prediction"
        loss, _ = reg(step=0, **call)
        assert torch.isfinite(loss)
        loss.backward()
        kept.handle.remove()
        reg.detach()
        grads = _image_token_grads(kept, family, list_index, tokens, captions, image_at)
        if call.get("teacher_features") is random_teacher or "latents" in call:
            assert (grads > 0).all(), f"{family}: an image token got no gradient"
        else:   # one-hot: its frame and the neighbour frame (crepa_adjacent_distance 1), at the tokens covering it
            hit = grads.view(2, grid[0], grid[1], grid[2]) > 0
            frames_hit = hit.any(dim=3).any(dim=2).any(dim=0).nonzero().flatten().tolist()
            assert frames_hit == ([0, 1] if spec.video else [0]), (family, frames_hit)
            for f in frames_hit:
                assert torch.equal(hit[:, f], covering.expand(2, -1, -1)), (family, f, hit[:, f].nonzero().tolist())
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family,list_index", PARAMS)
def test_each_block_list_in_encoder_free_modes(family, list_index):
    _check_encoder_free_modes(family, list_index, FAMILIES[family].forward, _latents(family))


@pytest.mark.parametrize("family,list_index", [("flux2", 0), ("flux2", 1), ("qwen_image", 0)])
def test_edit_variants_keep_the_reference_image_tokens_out_of_the_student(family, list_index):
    """Flux2Pipeline / QwenImageEditPipeline append a reference image's tokens after the target's (Qwen's
    img_shapes lists both); those get no gradient (_image_token_grads asserts it)."""
    _check_encoder_free_modes(family, list_index, tf.CASES[family].edit_forward, _latents(family),
                              backbone_too=False)


@pytest.mark.parametrize("list_index", [0, 1])
def test_flux2_kv_cache_extract_pass_keeps_its_leading_reference_tokens_out(list_index):
    """Flux2KleinKVPipeline's first step puts the reference tokens before the target's and says how many
    (num_ref_tokens); the image tokens start after them (after the caption too in single blocks)."""
    refs = 2 * 12                                              # a (B, 16, 2, 12) reference image

    def forward(model, latents, text_lengths):
        b = latents.shape[0]
        text, _ = tf.text_and_mask(text_lengths)
        reference = torch.randn(b, 16, 2, 12, generator=torch.Generator().manual_seed(7))
        tokens = torch.cat([reference.flatten(2).transpose(1, 2), latents.flatten(2).transpose(1, 2)], dim=1)
        ids = torch.cat([tf._flux2_ids(reference, t=10), tf._flux2_ids(latents)], dim=1)
        text_ids = torch.zeros(b, text.shape[1], 4)
        text_ids[..., 3] = torch.arange(text.shape[1])
        out, _ = model(hidden_states=tokens, timestep=torch.full((b,), 0.5), guidance=torch.full((b,), 4.0),
                       encoder_hidden_states=text, txt_ids=text_ids, img_ids=ids, return_dict=False,
                       kv_cache_mode="extract", num_ref_tokens=refs)
        return out[:, refs:]

    image_at = [_at(1, lambda n: [refs] * len(n)), _at(None, lambda n: [max(n) + refs] * len(n))]
    _check_encoder_free_modes("flux2", list_index, forward, _latents("flux2"), backbone_too=False,
                              image_at=image_at)


def test_hidream_square_latents_are_not_padded():
    """HiDream pads non-square latents to max_seq tokens (the main test); square ones are not padded."""
    _check_encoder_free_modes("hidream", 1, FAMILIES["hidream"].forward, _latents("hidream", cols=8),
                              backbone_too=False)


def test_captions_of_one_length_and_one_sample():
    _check_encoder_free_modes("lumina2", 0, FAMILIES["lumina2"].forward, _latents("lumina2"), captions=[4, 4])


@pytest.mark.parametrize("family", [name for name, spec in FAMILIES.items() if name in tf.CASES])
def test_token_order_perturbing_one_latent_moves_its_token_most(family):
    """The positions IMAGE_AT gives really are the image tokens, row-major: moving one latent pixel moves
    the captured token at its grid position most (first block of the last block list)."""
    spec = FAMILIES[family]
    model = spec.build()
    base = _latents(family, batch=1)
    grid = spec.grid(base)
    block = sum(spec.lists[:-1])

    def captured(latents):
        capture = HiddenStateCapture([model], block)
        try:
            with torch.no_grad():
                spec.forward(model, latents, [3])
            return capture.consume().student
        finally:
            capture.detach()

    reference = captured(base)
    for frame, row, col in ((2, 5, 7), (1, 7, 11), (0, 2, 1)):
        frame = frame if spec.video else 0
        moved = base.clone()
        moved[(0, 1, frame, row, col) if spec.video else (0, 1, row, col)] += 20.0
        change = (captured(moved) - reference)[0, : grid[0] * grid[1] * grid[2]].norm(dim=-1).view(grid)
        where = (change == change.max()).nonzero()[0].tolist()
        assert where == [frame // spec.patch[0], row // spec.patch[1], col // spec.patch[2]], (family, frame, row, col)


# ---- U-REPA UNets (SD1.5, SDXL, Kolors): teacher features only ---------------------------------------

UNETS = {"sd15": tm.tiny_unet, "sdxl": tf.tiny_sdxl_unet, "kolors": tf.tiny_kolors_unet}


@pytest.mark.parametrize("name", list(UNETS))
def test_unet_teacher_features_reach_every_mid_block_token_in_order(name):
    """The mid-block output (B, C, h, w) is (1, h, w) tokens; teacher features on the grid 2x that one. The
    one-hot teacher runs without the manifold term (its Gram matrix ties every token to every other)."""
    unet = UNETS[name]().train()
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    h, w = 4, 6                                                        # mid-block at half the latent size
    row, col = 2 * h - 3, 2 * w - 2
    one_hot = torch.zeros(2, 4 * h * w, TEACHER_WIDTH)
    one_hot[:, row * 2 * w + col] = 1.0
    student = torch.zeros(1, 1, h, w, 1, requires_grad=True)           # which student tokens the teacher token sees
    resample_grid(student, (2 * h, 2 * w))[0, 0, row, col, 0].backward()
    covering = student.grad[0, 0, ..., 0] != 0
    assert covering[row // 2, col // 2]
    with torch.no_grad():
        reference = tf.unet_forward(unet, latents)
    for teacher, manifold in ((torch.randn(2, 4 * h * w, TEACHER_WIDTH), 3.0), (one_hot, 0.0)):
        reg = UrepaRegularizer.from_config({"urepa_enabled": True, "urepa_manifold_weight": manifold}, unet=unet,
                                           encoder=tm.tiny_dinov2(), impl="reference")
        kept = _KeepOutput(unet.mid_block)
        assert torch.allclose(tf.unet_forward(unet, latents), reference, atol=1e-6, rtol=0)
        loss, _ = reg(teacher_features=teacher, step=0)
        assert torch.isfinite(loss)
        loss.backward()
        kept.handle.remove()
        reg.detach()
        hit = kept.outputs[0].grad.norm(dim=1) > 0                      # (B, h, w)
        if manifold:
            assert hit.all(), name
        else:
            assert torch.equal(hit, covering.expand(2, -1, -1)), (name, hit.nonzero().tolist())
        unet.zero_grad(set_to_none=True)


# ---- any other DiT: video grids, width attributes, refusals that say what was tried -----------------------

class TinyVideoDiT(torch.nn.Module):
    """A plain video DiT (no diffusers config): (B, C, F, H, W) patchified (1, 2, 2), `blocks`, its width
    only in a `hidden_size` attribute."""

    def __init__(self, width: int = 16, num_layers: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.hidden_size = width
        self.patch_size = (1, 2, 2)
        self.embed = torch.nn.Conv3d(4, width, (1, 2, 2), stride=(1, 2, 2))
        self.blocks = torch.nn.ModuleList(torch.nn.TransformerEncoderLayer(width, 2, 32, 0.0, batch_first=True)
                                          for _ in range(num_layers))
        self.head = torch.nn.Linear(width, 4 * 4)

    def forward(self, hidden_states, timestep):
        b, c, f, h, w = hidden_states.shape
        tokens = self.embed(hidden_states).flatten(2).transpose(1, 2) + timestep.view(-1, 1, 1) / 1000.0
        for block in self.blocks:
            tokens = block(tokens)
        out = self.head(tokens).view(b, f, h // 2, w // 2, 4, 2, 2)
        return out.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, 4, f, h, w)


def test_a_video_dit_of_no_known_family_with_its_width_in_an_attribute():
    model = TinyVideoDiT().train()
    latents = torch.randn(2, 4, 3, 8, 12, generator=torch.Generator().manual_seed(3))
    t = torch.full((2,), 500.0)
    reg = CrepaRegularizer.from_config({"crepa_enabled": True, "crepa_block_index": 1,
                                        "crepa_use_backbone_features": True, "crepa_teacher_block_index": 2},
                                       transformer=model, impl="reference")
    assert reg.family.name == "dit" and reg.projector.in_features == 16        # width from model.hidden_size
    model(latents, t)
    loss, _ = reg(step=0)                                                      # grid from the 5-D input
    assert torch.isfinite(loss)
    model(latents, t)
    assert torch.isfinite(reg(latents=latents, step=0)[0])                     # or from 5-D latents
    reg.detach()
    reg = CrepaRegularizer.from_config({"crepa_enabled": True, "crepa_block_index": 1}, transformer=model,
                                       impl="reference", encoder=tm.tiny_dinov2())
    model.forward(latents, t)        # a wrapper calling forward directly: the grid comes from token_grid
    loss, _ = reg(teacher_features=torch.randn(2, 3, 96, TEACHER_WIDTH), token_grid=(3, 4, 6), step=0)
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[1].linear1.weight.grad.abs().sum() > 0


def test_a_dit_whose_tokens_do_not_fit_the_grid_is_refused_naming_the_class_and_what_was_tried():
    model = tm.TinySiT(block_output="cls").train()       # a class token before the 16 image tokens
    reg = CrepaRegularizer.from_config({"crepa_enabled": True, "crepa_block_index": 1}, transformer=model,
                                       impl="reference", encoder=tm.tiny_dinov2(), hidden_size=16)
    tm.tiny_forward(model, torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError) as info:
        reg(teacher_features=torch.randn(1, 1, 16, TEACHER_WIDTH), step=0)
    message = str(info.value)
    assert "TinySiT" in message and "read as the dit family (`blocks`: one (B, S, C) tensor of image tokens)" in message
    assert "has 17 tokens but the token grid (1, 4, 4)" in message and "token_grid=(frames, rows, columns)" in message


# ---- latents= through each new family's own VAE -------------------------------------------------------------

LATENT_VAES = {
    "flux2": tf.tiny_flux2_vae, "qwen_image": tf.tiny_qwen_image_vae, "ltx2": tf.tiny_ltx2_vae,
    "hunyuan_video15": tf.tiny_hunyuan_video15_vae, "hunyuan_video": tm.tiny_hunyuan_vae,
    "cosmos": tm.tiny_wan_vae,           # Cosmos 2's pipelines decode with AutoencoderKLWan
    "chroma": tm.tiny_image_vae, "hidream": tm.tiny_image_vae, "auraflow": tm.tiny_image_vae,
    "lumina2": tm.tiny_image_vae,
}


@pytest.mark.parametrize("family", list(LATENT_VAES))
def test_latents_decode_with_the_pipeline_vae(family):
    spec = FAMILIES[family]
    model = spec.build().train()
    frames = 5 if family == "hunyuan_video" else 3       # HunyuanVideo's tiny VAE: 4x temporal ratio, causal
    latents = _latents(family, frames=frames, rows=4, cols=6)
    reg = CrepaRegularizer.from_config({"crepa_enabled": True, "crepa_block_index": 1,
                                        "crepa_encoder_image_size": 16}, transformer=model,
                                       vae=LATENT_VAES[family](), encoder=tm.tiny_dinov2(), impl="reference")
    spec.forward(model, latents, CAPTIONS)
    loss, _ = reg(latents=latents, step=0)
    loss.backward()
    assert torch.isfinite(loss) and reg.projector.linear.weight.grad.abs().sum() > 0
    assert reg.frames_encoded == 2 * spec.grid(latents)[0]
