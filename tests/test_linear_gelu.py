"""The feed-forward up-projection kernel: gelu(x w^T + b) on the AMX tile unit."""

import pytest
import torch

from eventcoder.cpu_kernels import amx_available, linear_gelu, load_kernel, pack_linear_weight


@pytest.fixture(scope="module", autouse=True)
def kernel():
    reason = load_kernel()
    assert reason is None, reason
    if not amx_available():
        pytest.skip("linear_gelu runs on the AMX tile unit, which this CPU lacks")


def _operands(rows: int, inputs: int, outputs: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, inputs, generator=generator).to(torch.bfloat16)
    weight = (torch.randn(outputs, inputs, generator=generator) * inputs**-0.5 * 2).to(torch.bfloat16)
    bias = torch.randn(outputs, generator=generator)
    return x, weight, bias


def _reference(x, weight, bias):
    return torch.nn.functional.gelu(x.double() @ weight.double().T + bias.double())


@pytest.mark.parametrize("rows", [1, 32, 70, 256])  # a partial block alone, whole blocks, a partial last block
@pytest.mark.parametrize(("inputs", "outputs"), [(32, 32), (64, 96), (384, 1536)])
def test_matches_the_exact_gelu_of_the_product_within_bf16_rounding(rows, inputs, outputs):
    x, weight, bias = _operands(rows, inputs, outputs)
    out = linear_gelu(x, pack_linear_weight(weight), bias)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, outputs)
    expected = _reference(x, weight, bias)
    # bf16 output: half a unit in the last place is 2^-9 relative; the GELU's own error is far below.
    error = (out.double() - expected).abs()
    assert (error <= expected.abs() * 2**-8 + 1e-3).all(), error.max()


def test_gelu_holds_from_far_below_zero_to_far_above():
    """Through an identity weight: x from -30 to 10, including where exact GELU is tiny but not
    zero (around -3) and where it is all but zero (far below)."""
    x = torch.linspace(-30, 10, 32 * 128).view(128, 32).to(torch.bfloat16)
    out = linear_gelu(x, pack_linear_weight(torch.eye(32, dtype=torch.bfloat16)), torch.zeros(32))
    expected = torch.nn.functional.gelu(x.double())
    error = (out.double() - expected).abs()
    assert (error <= expected.abs() * 2**-8 + 1e-4).all(), (x.flatten()[error.argmax()], error.max())


def test_results_do_not_depend_on_the_thread_count():
    x, weight, bias = _operands(200, 64, 64, seed=3)
    packed = pack_linear_weight(weight)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear_gelu(x, packed, bias)
        torch.set_num_threads(2)
        two = linear_gelu(x, packed, bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_bad_operands_are_refused_in_one_line():
    x, weight, bias = _operands(8, 64, 64)
    with pytest.raises(RuntimeError, match="multiples of 32, not 48 x 64"):
        pack_linear_weight(torch.zeros(48, 64, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="x has 32 columns, the weight 64 inputs"):
        linear_gelu(x[:, :32].contiguous(), pack_linear_weight(weight), bias)
    with pytest.raises(RuntimeError, match="fp32 with one value per output"):
        linear_gelu(x, pack_linear_weight(weight), bias.to(torch.bfloat16))
