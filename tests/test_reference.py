"""The reference path against docs/contract.md §2: golden values, hand-computed cases, an independent float64
transcription (tests/spec_math.py), gradcheck, zero tokens and dtypes."""

import itertools
import math

import pytest
import torch

import repa_kernels as rk
from repa_kernels import reference
from repa_kernels.options import CrepaOptions

import spec_math

MODES = [dict(distance=d, tau=tau, cumulative=c, normalize_by_frames=nf, normalize_neighbour_sum=nn)
         for d, tau, c, nf, nn in itertools.product([0, 1, 2, 7], [0.5, 1.0], [False, True],
                                                    [True, False], [False, True])]


def crepa_ref(z, y, **kwargs):
    return rk.crepa_loss(z, y, impl="reference", **kwargs)


def same_unit_vector(batch, frames, tokens, dim, seed=0):
    v = torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (v / v.norm()).expand(batch, frames, tokens, dim).clone()


def test_golden_value():
    z = same_unit_vector(2, 4, 3, 8)
    result = crepa_ref(z.float(), z.float(), distance=1, tau=1.0)
    expected = 1 + 1.5 * math.exp(-1)
    assert result.alignment_score.item() == pytest.approx(expected, abs=1e-6)
    assert result.loss.item() == pytest.approx(-expected, abs=1e-6)
    assert result.similarity_self.item() == pytest.approx(1.0, abs=1e-6)
    normalised = crepa_ref(z.float(), z.float(), distance=1, tau=1.0, normalize_neighbour_sum=True)
    assert normalised.alignment_score.item() == pytest.approx(1.0, abs=1e-6)
    assert normalised.loss.item() == pytest.approx(-1.0, abs=1e-6)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{k[:6]}{int(v) if isinstance(v, bool) else v}" for k, v in m.items()))
def test_matches_independent_float64_transcription(mode):
    g = torch.Generator().manual_seed(MODES.index(mode))
    z = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64)
    y = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64)
    z[0, 2, 1] = 0.0  # a zero token
    ours = crepa_ref(z, y, **mode)
    truth = spec_math.crepa(z.numpy(), y.numpy(), **mode)
    for value, expected in zip(ours, truth):
        assert value.dtype == torch.float64
        assert abs(value.item() - expected) < 1e-10


def test_manifold_matches_independent_float64_transcription():
    g = torch.Generator().manual_seed(3)
    for shape_z, shape_y in [((3, 7, 5), (3, 7, 9)), ((2, 3, 6, 4), (2, 3, 6, 4))]:
        z = torch.randn(shape_z, generator=g, dtype=torch.float64)
        y = torch.randn(shape_y, generator=g, dtype=torch.float64)
        z[0, ..., 1, :] = 0.0
        assert abs(rk.manifold_loss(z, y, impl="reference").item() - spec_math.manifold(z.numpy(), y.numpy())) < 1e-10


def test_manifold_chunking_is_exact(monkeypatch):
    z, y = torch.randn(5, 9, 4, dtype=torch.float64), torch.randn(5, 9, 3, dtype=torch.float64)
    whole = rk.manifold_loss(z, y, impl="reference")
    monkeypatch.setattr(reference, "_GRAM_CHUNK_ELEMENTS", 81 * 2)  # two slices per chunk, 3 chunks
    assert torch.allclose(rk.manifold_loss(z, y, impl="reference"), whole, rtol=1e-14, atol=0)


def test_urepa_is_alignment_plus_weighted_manifold():
    z, y = torch.randn(2, 6, 5, dtype=torch.float64), torch.randn(2, 6, 5, dtype=torch.float64)
    r = rk.urepa_loss(z, y, manifold_weight=2.5, impl="reference")
    zn = z / z.norm(dim=-1, keepdim=True)
    yn = y / y.norm(dim=-1, keepdim=True)
    cosine = (zn * yn).sum(-1).mean()
    assert abs(r.alignment.item() + cosine.item()) < 1e-12
    assert abs(r.similarity.item() - cosine.item()) < 1e-12
    assert abs(r.manifold.item() - spec_math.manifold(z.numpy(), y.numpy())) < 1e-12
    assert abs(r.loss.item() - (r.alignment + 2.5 * r.manifold).item()) < 1e-12


# Hand-computed cases: each frame's tokens are one direction, so s(f, g) is a cosine we choose.

def frames_with_angles(angles):
    """(1, T, 1, 2) unit vectors at the given angles: s(f, g) = cos(angle_g - angle_f)."""
    a = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([a.cos(), a.sin()], -1)[None, :, None, :]


def test_single_frame_is_plain_repa():
    z = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)  # (1, 2, 2)
    y = torch.tensor([[[1.0, 1.0], [0.0, -1.0]]], dtype=torch.float64)
    result = crepa_ref(z, y, distance=3)
    expected = (math.cos(math.pi / 4) + -1.0) / 2
    assert result.loss.item() == pytest.approx(-expected, abs=1e-12)


def test_two_frames_with_hand_computed_neighbour_term():
    z = frames_with_angles([0.0, 0.0])
    y = frames_with_angles([0.0, math.pi / 3])  # s(0,0)=1, s(0,1)=cos60=0.5, s(1,1)=0.5, s(1,0)=1
    w = math.exp(-1 / 2.0)
    result = crepa_ref(z, y, distance=1, tau=2.0)
    totals = [1 + w * 0.5, 0.5 + w * 1.0]
    assert result.alignment_score.item() == pytest.approx(sum(totals) / 2, abs=1e-12)
    assert result.similarity_self.item() == pytest.approx(0.75, abs=1e-12)
    assert result.loss.item() == pytest.approx(-sum(totals) / 2, abs=1e-12)
    unnormalised = crepa_ref(z, y, distance=1, tau=2.0, normalize_by_frames=False)
    assert unnormalised.loss.item() == pytest.approx(-sum(totals), abs=1e-12)


def test_distance_beyond_clip_pairs_only_the_end_frames():
    # T = 3, distance 5 -> d' = 2: 0<->2 only, frame 1 has no neighbour (docs/contract.md §2.1).
    z = frames_with_angles([0.0, 0.0, 0.0])
    y = frames_with_angles([0.0, math.pi / 2, math.pi / 3])
    w = math.exp(-2.0)
    result = crepa_ref(z, y, distance=5)
    totals = [1 + w * 0.5, 0.0, 0.5 + w * 1.0]
    assert result.alignment_score.item() == pytest.approx(sum(totals) / 3, abs=1e-12)


def test_cumulative_adds_every_offset_adjacent_only_the_last():
    angles = [0.0, 0.4, 1.1, 1.5]
    z, y = frames_with_angles(angles), frames_with_angles([a + 0.2 for a in angles])

    def s(f, g):
        return math.cos(angles[g] + 0.2 - angles[f])

    tau = 0.7
    adjacent = [s(f, f) + sum(math.exp(-2 / tau) * s(f, g) for g in (f - 2, f + 2) if 0 <= g < 4) for f in range(4)]
    cumulative = [s(f, f) + sum(math.exp(-abs(g - f) / tau) * s(f, g)
                                for g in (f - 2, f - 1, f + 1, f + 2) if 0 <= g < 4) for f in range(4)]
    assert crepa_ref(z, y, distance=2, tau=tau).alignment_score.item() == pytest.approx(sum(adjacent) / 4, abs=1e-12)
    assert crepa_ref(z, y, distance=2, tau=tau, cumulative=True).alignment_score.item() == pytest.approx(
        sum(cumulative) / 4, abs=1e-12)


def test_frame_weights_matrix():
    w = CrepaOptions(distance=1, tau=1.0, normalize_neighbour_sum=True).frame_weights(3)
    e = math.exp(-1)
    expected = torch.tensor([[1, e, 0], [e, 1, e], [0, e, 1]], dtype=torch.float64)
    expected /= expected.sum(1, keepdim=True)
    assert torch.allclose(w, expected)
    assert CrepaOptions(distance=0).offsets(5) == []
    assert CrepaOptions(distance=3).offsets(1) == []
    assert CrepaOptions(distance=3, cumulative=True).offsets(3) == [1, 2]


@pytest.mark.parametrize("mode", [MODES[i] for i in (0, 9, 13, 22, 31, 44, 63)])
def test_gradcheck_float64(mode):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: crepa_ref(a, b, **mode).loss, (z, y))


def test_gradcheck_manifold_float64():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rk.manifold_loss(a, b, impl="reference"), (z, y))


def test_manifold_gradient_formula():
    # docs/contract.md §2.2: dManifold/dẐ = 4 (G_z − G_y) Ẑ / (B·T·N²) on unit-norm inputs, before the normalisation.
    z = torch.nn.functional.normalize(torch.randn(2, 6, 3, dtype=torch.float64), dim=-1).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(2, 6, 4, dtype=torch.float64), dim=-1)
    rk.manifold_loss(z, y, impl="reference").backward()
    zd = z.detach()
    diff = zd @ zd.transpose(1, 2) - y @ y.transpose(1, 2)
    d_zhat = 4 * diff @ zd / (2 * 36)
    expected = d_zhat - zd * (zd * d_zhat).sum(-1, keepdim=True)
    assert torch.allclose(z.grad, expected, atol=1e-12)


def test_crepa_gradient_formula_to_z_and_y():
    # docs/contract.md §2.1 backward: dL/dẑ[b,f] = −c(f)·ỹ[b,f]/(N·B'), dL/dŷ[b,g] = −Σ_f W[f,g]·ẑ[b,f]/(N·B').
    opts = CrepaOptions(distance=2, tau=0.8, cumulative=True, normalize_neighbour_sum=True)
    z = torch.nn.functional.normalize(torch.randn(2, 4, 3, 5, dtype=torch.float64), dim=-1).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(2, 4, 3, 5, dtype=torch.float64), dim=-1).requires_grad_()
    rk.crepa_loss_with_options(z, y, opts, impl="reference").loss.backward()
    weights = opts.frame_weights(4)
    scale = 3 * 2 * 4
    d_zhat = -torch.einsum("fg,bgnd->bfnd", weights, y.detach()) / scale
    d_yhat = -torch.einsum("fg,bfnd->bgnd", weights, z.detach()) / scale
    for grad, unit, d_hat in ((z.grad, z.detach(), d_zhat), (y.grad, y.detach(), d_yhat)):
        assert torch.allclose(grad, d_hat - unit * (unit * d_hat).sum(-1, keepdim=True), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_zero_tokens_have_zero_gradient_and_no_inf(dtype):
    z = torch.randn(1, 3, 4, 8).to(dtype)
    y = torch.randn(1, 3, 4, 8).to(dtype)
    z[0, 1, 2] = 0
    y[0, 0, 3] = 0
    z[0, 2, 0] = 1e-13  # below EPS: no direction either
    z.requires_grad_()
    y.requires_grad_()
    for loss in (crepa_ref(z, y, distance=1).loss, rk.manifold_loss(z, y, impl="reference")):
        z.grad = y.grad = None
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(z.grad).all() and torch.isfinite(y.grad).all()
        assert (z.grad[0, 1, 2] == 0).all() and (y.grad[0, 0, 3] == 0).all()
        if dtype != torch.float16:  # 1e-13 underflows to 0 in float16 anyway
            assert (z.grad[0, 2, 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_of_loss_and_gradients(dtype):
    z = torch.randn(2, 3, 5, 4).to(dtype).requires_grad_()
    y = torch.randn(2, 3, 5, 4).to(dtype).requires_grad_()
    result = crepa_ref(z, y)
    manifold = rk.manifold_loss(z, y, impl="reference")
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert result.loss.dtype == loss_dtype and manifold.dtype == loss_dtype
    assert result.alignment_score.dtype == loss_dtype and not result.alignment_score.requires_grad
    (result.loss + manifold).backward()
    assert z.grad.dtype == dtype and y.grad.dtype == dtype


def test_three_d_input_equals_single_frame():
    z, y = torch.randn(3, 7, 6), torch.randn(3, 7, 6)
    a = crepa_ref(z, y, distance=2)
    b = crepa_ref(z[:, None], y[:, None], distance=2)
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(rk.manifold_loss(z, y, impl="reference"), rk.manifold_loss(z[:, None], y[:, None], impl="reference"))


def test_no_gradient_to_teacher_without_requires_grad():
    z = torch.randn(1, 2, 3, 4, requires_grad=True)
    y = torch.randn(1, 2, 3, 4)
    crepa_ref(z, y).loss.backward()
    assert z.grad is not None and y.grad is None


def test_nan_in_input_propagates_to_loss():
    z, y = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    z[0, 0, 0, 0] = float("nan")
    assert torch.isnan(crepa_ref(z, y).loss)
    assert torch.isnan(rk.manifold_loss(z, y, impl="reference"))


@pytest.mark.parametrize("magnitude", [1e30, 1e-6, 1e-11])
def test_huge_and_small_magnitudes_match_float64(magnitude):
    # Norms are taken after scaling by max|x|, so squares of 1e30 do not overflow float32.
    g = torch.Generator().manual_seed(5)
    z = torch.randn(1, 3, 4, 8, generator=g) * magnitude
    y = torch.randn(1, 3, 4, 8, generator=g) * magnitude
    ours = crepa_ref(z, y, distance=1)
    truth = spec_math.crepa(z.double().numpy(), y.double().numpy(), distance=1)
    assert abs(ours.loss.item() - truth[0]) < 1e-6
    assert abs(rk.manifold_loss(z, y, impl="reference").item() - spec_math.manifold(z.double().numpy(), y.double().numpy())) < 1e-6


@pytest.mark.parametrize("dtype, tiny", [(torch.float32, 1e-40), (torch.float64, 1e-310)])
def test_subnormal_tokens_have_zero_gradient(dtype, tiny):
    z = torch.randn(1, 2, 3, 4, dtype=dtype)
    z[0, 1, 2] = tiny
    z.requires_grad_()
    y = torch.randn(1, 2, 3, 4, dtype=dtype)
    (crepa_ref(z, y).loss + rk.manifold_loss(z, y, impl="reference")).backward()
    assert torch.isfinite(z.grad).all()
    assert (z.grad[0, 1, 2] == 0).all()
