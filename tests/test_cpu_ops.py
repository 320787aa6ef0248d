"""The C layer ops (kernels/cpu_ops.py) against their torch definitions, on one and many threads."""
import pytest
import torch
import torch.nn.functional as F

from engine.rope import RotaryEmbedding, apply_rope
from kernels import cpu_build, cpu_ops, write_kv

pytestmark = pytest.mark.skipif(cpu_ops._library() is None, reason="no C compiler: the torch paths are used")

ROWS = [1, 7, 300]  # 300 x 576 crosses the threshold for a parallel call


@pytest.mark.parametrize("t", ROWS)
def test_rms_norm_and_add_rms_norm(t):
    gen = torch.Generator().manual_seed(t)
    x, d = torch.randn(t, 576, generator=gen) * 3, torch.randn(t, 576, generator=gen)
    w = torch.rand(576, generator=gen) + 0.5
    torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-5), F.rms_norm(x, (576,), w, 1e-5))
    s, y = cpu_ops.add_rms_norm(x, d, w, 1e-5)
    torch.testing.assert_close(s, x + d)
    torch.testing.assert_close(y, F.rms_norm(x + d, (576,), w, 1e-5))


def test_rms_norm_reads_a_strided_view():
    x = torch.randn(5, 1000)[:, 100:676]  # rows 1000 apart
    w = torch.rand(576)
    torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-6), F.rms_norm(x, (576,), w, 1e-6))


@pytest.mark.parametrize("t", ROWS)
def test_silu_and_mul(t):
    gu = torch.randn(t, 2 * 1536, generator=torch.Generator().manual_seed(t)) * 4
    gate, up = gu.split(1536, dim=-1)
    torch.testing.assert_close(cpu_ops.silu_and_mul(gu), F.silu(gate) * up)


def test_silu_and_mul_far_out_and_in_a_ragged_tail():
    # exp's clamped range, and 13 columns: one full eight-lane chunk, then five lanes
    gate = torch.tensor([[-200.0, -90.0, -87.5, -20.0, -1e-3, 0.0, 1e-3, 0.5, 20.0, 87.5, 90.0, 200.0, 3.0]])
    gu = torch.cat([gate, torch.full_like(gate, 1.5)], dim=1)
    torch.testing.assert_close(cpu_ops.silu_and_mul(gu), F.silu(gate) * 1.5)


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_rope_write_kv_matches_rope_then_write(t, cache_dtype):
    h, kvh, d, bs, nb = 9, 3, 64, 16, 40
    gen = torch.Generator().manual_seed(t)
    qkv = torch.randn(t, (h + 2 * kvh) * d, generator=gen)
    positions = torch.randint(0, 2048, (t,), generator=gen)
    slots = torch.randperm(nb * bs, generator=gen)[:t]
    cos, sin = RotaryEmbedding(d, 2048, 10000.0, None).lookup(positions, torch.float32)
    caches = [torch.zeros(nb, bs, kvh, d, dtype=cache_dtype) for _ in range(4)]

    qk = apply_rope(qkv[:, :(h + kvh) * d].view(t, h + kvh, d), cos, sin)
    write_kv(qk[:, h:], qkv[:, (h + kvh) * d:].view(t, kvh, d), caches[0], caches[1], slots)
    if not cpu_ops.rope_write_kv_supported(qkv, caches[2], cos, slots):
        assert cache_dtype == torch.float16, "fp32 caches are always supported"
        pytest.skip("the compiler has no _Float16")
    cpu_ops.rope_write_kv(qkv, cos, sin, caches[2], caches[3], slots, h, kvh)

    torch.testing.assert_close(qkv[:, :h * d].view(t, h, d), qk[:, :h])  # q rotated in place
    torch.testing.assert_close(caches[2], caches[0])
    torch.testing.assert_close(caches[3], caches[1])


def test_torch_paths_for_other_dtypes_and_layouts():
    x = torch.randn(3, 64, dtype=torch.float64)
    w = torch.rand(64, dtype=torch.float64)
    torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-5), F.rms_norm(x, (64,), w, 1e-5))
    gu = torch.randn(2, 24).half()
    torch.testing.assert_close(cpu_ops.silu_and_mul(gu), F.silu(gu[:, :12]) * gu[:, 12:])
    cos = torch.zeros(3, 1, 4)
    assert not cpu_ops.rope_write_kv_supported(torch.zeros(3, 40).t(), torch.zeros(2, 4, 1, 8), cos,
                                               torch.zeros(3, dtype=torch.int64))


def test_autograd_takes_the_torch_path():
    x = torch.randn(4, 64, requires_grad=True)
    w = torch.rand(64, requires_grad=True)
    cpu_ops.silu_and_mul(cpu_ops.rms_norm(x, w, 1e-5)).sum().backward()
    assert x.grad is not None and w.grad is not None


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("k", [0, 3])
def test_int8_prepare_matches_its_torch_path(t, k):
    gen = torch.Generator().manual_seed(t + k)
    x = torch.randn(t, 200, generator=gen)
    outliers = torch.randperm(200, generator=gen)[:k]
    mask = torch.ones(200).index_fill_(0, outliers, 0.0)
    for scale_rows in (False, True):
        y, o, scale = cpu_ops.int8_prepare(x, outliers, mask, scale_rows)
        y_ref = x * mask
        if scale_rows:
            torch.testing.assert_close(scale, y_ref.abs().amax(dim=1, keepdim=True))
            y_ref = y_ref / scale
        else:
            assert scale is None
        torch.testing.assert_close(y, y_ref)
        if k:
            torch.testing.assert_close(o, x[:, outliers])
        else:
            assert o is None


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("k", [0, 3])
def test_int8_quantize_matches_its_torch_path_and_bounds_the_rounding(t, k):
    gen = torch.Generator().manual_seed(t + k)
    x = torch.randn(t, 200, generator=gen) * torch.logspace(-2, 3, t)[:, None]  # rows of very different size
    x[0] = 0.0  # an all-zero row
    outliers = torch.randperm(200, generator=gen)[:k]
    mask = torch.ones(200).index_fill_(0, outliers, 0.0)
    q, o, scale = cpu_ops.int8_quantize(x, outliers, mask)
    with torch.enable_grad():  # the torch path
        q_ref, o_ref, scale_ref = cpu_ops.int8_quantize(x.clone().requires_grad_(True), outliers, mask)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert (q.int() - q_ref.int()).abs().max() <= 1  # rounding of exact halves may differ
    torch.testing.assert_close(scale, scale_ref.detach())
    assert torch.all((q * scale - x * mask).abs() <= scale * 0.5 + 1e-6)  # half a step per value, at most
    if k:
        torch.testing.assert_close(o, x[:, outliers])
    else:
        assert o is None and o_ref is None


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("k", [0, 3])
def test_int8_finish_scales_rows_and_adds_the_outlier_product(t, k):
    gen = torch.Generator().manual_seed(t + k)
    y, scale = torch.randn(t, 300, generator=gen), torch.rand(t, 1, generator=gen) + 0.5
    outliers, weight_t = torch.randn(t, k, generator=gen) * 100, torch.randn(k, 300, generator=gen)
    for row_scale in (scale, None):
        want = (y if row_scale is None else y * row_scale) + outliers @ weight_t
        got = cpu_ops.int8_finish(y.clone(), row_scale, outliers if k else None, weight_t)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
        with torch.enable_grad():  # the torch path
            ref = cpu_ops.int8_finish(y.clone().requires_grad_(True) + 0, row_scale, outliers if k else None, weight_t)
        torch.testing.assert_close(ref.detach(), want, rtol=1e-5, atol=1e-3)


def test_argmax_matches_torch_on_ties_nan_and_strided_rows():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1000, generator=gen)
    x[0, 7] = x[0, 900] = 50.0  # a tie: the first index
    x[1, 17] = x[1, 500] = float("nan")  # torch counts NaN as the maximum
    x[2] = float("-inf")  # every entry masked
    x[3, :10] = float("-inf")
    x[4, 999] = 99.0  # the last entry
    for t in (x, x[:, 3:997], torch.randn(32, 49152, generator=gen), torch.randn(1, 5, generator=gen)):
        assert torch.equal(cpu_ops.argmax(t), t.argmax(dim=-1))


def test_kernel_builds_are_cached_per_cpu(monkeypatch):
    # -march=native: an AVX-512 or AMX build handed to a CPU without it (a cache on a shared home) would fault
    key = cpu_build.cache_key(cpu_ops.C_BODY)
    monkeypatch.setattr(cpu_build, "_cpu_flags", lambda: "flags : fpu sse2 avx2")
    assert cpu_build.cache_key(cpu_ops.C_BODY) != key
