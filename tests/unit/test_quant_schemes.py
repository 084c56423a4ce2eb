"""Quantisation accuracy: min-max bounds, nesting, and the MSE ratios ALGORITHMS.md section 4 quotes."""

from __future__ import annotations

import pytest
import torch

from quant.groups import check_group, minmax_roundtrip, quantize
from quant.schemes import scheme, scheme_names

pytestmark = pytest.mark.cpu


def synthetic(kind: str, n: int = 256, k: int = 1024, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(n, k, generator=g)
    if kind == "laplace":
        return torch.sign(torch.randn(n, k, generator=g)) * torch.empty(n, k).exponential_(generator=g)
    chi2_3 = (torch.randn(3, n, k, generator=g) ** 2).sum(dim=0)
    return torch.randn(n, k, generator=g) / torch.sqrt(chi2_3 / 3)  # Student-t, 3 degrees of freedom


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


@pytest.mark.parametrize("group", [32, 64, 128])
def test_8_bit_error_is_at_most_half_a_step(group):
    w = synthetic("normal")
    q = quantize(w, 8, group)
    step = q.scale.float().repeat_interleave(group, dim=1)
    assert ((q.dequantize() - w).abs() <= step / 2 * (1 + 1e-3) + 1e-6).all()


# (r, low, high): MSE of the r-bit view / MSE of direct min-max rounding, per ALGORITHMS.md section 4
MSB_RATIOS = [(6, 0.97, 1.03), (4, 0.86, 0.96), (3, 0.75, 0.83), (2, 0.52, 0.62)]


@pytest.mark.parametrize("kind", ["normal", "laplace", "t3"])
@pytest.mark.parametrize("r,low,high", MSB_RATIOS)
def test_msb_view_mse_ratio_matches_the_design(kind, r, low, high):
    w = synthetic(kind)
    ratio = mse(scheme("msb").roundtrip(w, 128, r), w) / mse(minmax_roundtrip(w, r, 128), w)
    assert low <= ratio <= high, ratio


@pytest.mark.parametrize("name", ["msb", "residual"])
def test_more_planes_never_hurt(name):
    w = synthetic("laplace", seed=3)
    s = scheme(name)
    enc = s.encode(w, 64)
    errs = [mse(s.view(enc, r).dequantize(), w) for r in range(1, 9)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs


def test_residual_scheme_is_a_2_bit_base_plus_binary_planes():
    w = synthetic("normal", n=16, k=256)
    s = scheme("residual")
    enc = s.encode(w, 128)
    assert [t.bits for t in s.view(enc, 5).terms] == [2, 1, 1, 1]
    assert [p.shape[0] for p in enc.plane_params] == [0, 0, 1, 1, 1, 1, 1, 1]
    # each residual plane only adds +-scale per group
    v3, v4 = s.view(enc, 3).dequantize(), s.view(enc, 4).dequantize()
    s4 = enc.plane_params[3][0].float().repeat_interleave(128, dim=1)
    assert torch.allclose((v4 - v3).abs(), s4, atol=1e-5)


def test_residual_beats_msb_at_3_bits_on_heavy_tails():
    w = synthetic("t3")
    err = {n: mse(scheme(n).roundtrip(w, 128, 3), w) for n in ("msb", "residual")}
    assert err["residual"] < err["msb"], err


def test_schemes_are_registered_by_name():
    assert set(scheme_names()) >= {"msb", "residual"}
    with pytest.raises(ValueError, match="unknown quantisation scheme"):
        scheme("nope")


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="do not split"):
        check_group(100, 32)
    with pytest.raises(ValueError, match="not supported"):
        check_group(256, 48)
    with pytest.raises(ValueError, match="NaN"):
        quantize(torch.tensor([[float("nan")] * 32]), 8, 32)
    with pytest.raises(ValueError, match="float16"):
        quantize(torch.full((1, 32), 1e6), 8, 32)
