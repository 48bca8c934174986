"""Bad input to the kernel ops, called the public way and directly as `torch.ops.segcft.*`
(public too: torch.compile and users call them): every inconsistent argument raises a clear
OpValueError / OpTypeError (or ValueError from the raw bindings) naming the argument, never a
crash, out-of-bounds memory or garbage values. Each case is one parametrised test whose id and
comment say what is expected."""

from __future__ import annotations

import pytest
import torch

from segcft import ops
from segcft.ops import _backend
from segcft.ops import reference as ref
from segcft.ops._validate import MAX_REGIONS, OpTypeError, OpValueError

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_thread")]

ISAS = ["scalar", "avx2", "avx512"]
B, C, H, W, R = 2, 3, 6, 20, 5  # W = 20: full vectors and a tail on every instruction set
NEEDS_C = pytest.mark.skipif(_backend.cpu_backend().module is None, reason="segcft._C is not built")


def _logits(dtype=torch.float32):
    return torch.randn((B, C, H, W), generator=torch.Generator().manual_seed(0)).to(dtype)


def _regions(num_regions=R):
    return torch.randint(0, num_regions, (B, H, W), generator=torch.Generator().manual_seed(1))


def _loss_args(**kw):
    """Consistent arguments of segcft::area_loss (regional), updated with kw."""
    args = {
        "logits": _logits(),
        "targets": torch.zeros(B, 2),
        "weights": torch.ones(B, 2),
        "index": torch.tensor([[1, 0], [2, -1]]),
        "scale": torch.ones(2),
        "penalty": "l1",
        "voxel_volume": 0.5,
        "activation": "softmax",
        "regions": _regions(4),
        "num_regions": 4,
        "huber_delta": 1.0,
    }
    args.update(kw)
    return args


def _loss_backward_args(**kw):
    """Consistent arguments of segcft::area_loss_backward, updated with kw."""
    la = _loss_args()
    args = {
        "logits": la["logits"], "regions": la["regions"], "num_regions": 4, "activation": "softmax",
        "voxel_volume": 0.5, "areas": torch.ones(B, C, 4), "targets": la["targets"], "weights": la["weights"],
        "index": la["index"], "scale": la["scale"], "penalty": "l1", "huber_delta": 1.0,
        "grad_loss": torch.tensor(1.0), "grad_areas": None,
    }
    args.update(kw)
    return args


def _call_loss(args):
    a = args
    return torch.ops.segcft.area_loss(a["logits"], a["targets"], a["weights"], a["index"], a["scale"], a["penalty"],
                                      a["voxel_volume"], a["activation"], a["regions"], a["num_regions"],
                                      a["huber_delta"])


def _call_loss_backward(args):
    return torch.ops.segcft.area_loss_backward(*args.values())


# ---- segcft::soft_area called directly ----------------------------------------------------------

SOFT_AREA_BAD = {
    # A region map smaller than (B, *S) was read past its end: now a shape error.
    "regions_undersized": (lambda: (_logits(), torch.zeros(1, 4, 4, dtype=torch.long), R, "softmax", 1.0),
                           OpValueError, r"regions must have shape \(B, \*S\) = \(2, 6, 20\)"),
    # The spatial axes swapped (same number of elements): a shape error, not a silent misread.
    "regions_transposed_shape": (lambda: (_logits(), torch.zeros(B, W, H, dtype=torch.long), R, "softmax", 1.0),
                                 OpValueError, "regions must have shape"),
    # One region axis too many.
    "regions_wrong_rank": (lambda: (_logits(), torch.zeros(B, 1, H, W, dtype=torch.long), R, "softmax", 1.0),
                           OpValueError, "regions must have shape"),
    # Floating-point and boolean maps are not region ids.
    "regions_float": (lambda: (_logits(), _regions().float(), R, "softmax", 1.0), OpTypeError, "integer tensor"),
    "regions_bool": (lambda: (_logits(), _regions() > 0, R, "softmax", 1.0), OpTypeError, "integer tensor"),
    # Ids outside [0, R): negative, equal to R, and beyond 2^32 (the AVX2 lanes keep 32 bits).
    "regions_negative_id": (lambda: (_logits(), _regions().index_fill_(0, torch.tensor([1]), -1), R, "softmax", 1.0),
                            OpValueError, r"ids in \[0, num_regions=5\), found values in \[-1, "),
    "regions_id_equal_R": (lambda: (_logits(), _regions().index_fill_(0, torch.tensor([0]), R), R, "softmax", 1.0),
                           OpValueError, r"found values in \[\d+, 5\]"),
    "regions_id_2pow32": (lambda: (_logits(), _regions() + 2**32, R, "softmax", 1.0), OpValueError, "4294967296"),
    # num_regions out of [1, MAX_REGIONS] with a map, or set without one.
    "num_regions_zero_with_map": (lambda: (_logits(), _regions(), 0, "softmax", 1.0), OpValueError,
                                  r"num_regions must be in \[1, 4096\]"),
    "num_regions_negative": (lambda: (_logits(), None, -3, "softmax", 1.0), OpValueError,
                             r"num_regions must be an int in \[0, 4096\], got -3"),
    "num_regions_huge": (lambda: (_logits(), _regions(), 2_000_000_000, "softmax", 1.0), OpValueError,
                         r"num_regions must be an int in \[0, 4096\], got 2000000000"),
    "num_regions_just_over_bound": (lambda: (_logits(), _regions(), MAX_REGIONS + 1, "softmax", 1.0), OpValueError,
                                    "num_regions"),
    "num_regions_without_map": (lambda: (_logits(), None, 3, "softmax", 1.0), OpValueError, "needs a region map"),
    # voxel_volume multiplies the sums: finite and > 0.
    "voxel_volume_nan": (lambda: (_logits(), None, 0, "softmax", float("nan")), OpValueError, "voxel_volume"),
    "voxel_volume_inf": (lambda: (_logits(), None, 0, "softmax", float("inf")), OpValueError, "voxel_volume"),
    "voxel_volume_zero": (lambda: (_logits(), None, 0, "softmax", 0.0), OpValueError, "voxel_volume"),
    "voxel_volume_negative": (lambda: (_logits(), None, 0, "softmax", -1.0), OpValueError, "voxel_volume"),
    # Unknown activation names were a KeyError.
    "activation_unknown": (lambda: (_logits(), None, 0, "relu", 1.0), OpValueError, "activation must be one of"),
    # Logits: floating point, 1 to 3 spatial axes.
    "logits_int": (lambda: (_logits().long(), None, 0, "softmax", 1.0), OpTypeError, "logits must be float32"),
    "logits_complex": (lambda: (_logits().to(torch.complex64), None, 0, "softmax", 1.0), OpTypeError, "logits"),
    "logits_rank2": (lambda: (_logits()[:, :, 0, 0], None, 0, "softmax", 1.0), OpValueError, "1 to 3 spatial axes"),
    "logits_rank6": (lambda: (_logits()[:, :, None, None, :, :], None, 0, "softmax", 1.0), OpValueError,
                     "1 to 3 spatial axes"),
    # A map on another device (meta stands in for a GPU here).
    "regions_other_device": (lambda: (_logits(), _regions().to("meta"), R, "softmax", 1.0), OpValueError,
                             "regions is on device meta"),
}


@NEEDS_C
@pytest.mark.parametrize("case", list(SOFT_AREA_BAD))
def test_soft_area_op_rejects(case):
    make, exc, match = SOFT_AREA_BAD[case]
    with pytest.raises(exc, match=match):
        torch.ops.segcft.soft_area(*make())


@NEEDS_C
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["contiguous", "strided_regions", "strided_logits", "many_regions"])
def test_soft_area_op_bad_region_id_on_every_kernel_path(isa, layout, monkeypatch):
    """An id outside [0, R) anywhere in the map raises, whichever kernel path reads it."""
    monkeypatch.setenv("SEGCFT_CPU_ISA", isa)
    num_regions = 12 if layout == "many_regions" else R  # > 8: the scalar-scatter path
    logits, regions = _logits(), _regions(num_regions)
    if layout == "strided_regions":
        regions = torch.randint(0, num_regions, (B, H, 2 * W), generator=torch.Generator().manual_seed(3))[..., ::2]
    if layout == "strided_logits":
        logits = torch.randn(B, C, H, 2 * W)[..., ::2]
    regions[1, H - 1, W - 1] = num_regions + 7
    with pytest.raises(OpValueError, match=f"found values in \\[0, {num_regions + 7}\\]"):
        torch.ops.segcft.soft_area(logits, regions, num_regions, "softmax", 1.0)


@NEEDS_C
def test_soft_area_op_strided_and_int32_maps_match_contiguous():
    """Non-contiguous logits and regions and int32 maps are valid input: the same areas as
    contiguous int64 ones (a strided map was reported to crash)."""
    big_x = torch.randn(B, C, H, 2 * W)
    big_r = torch.randint(0, R, (B, H, 2 * W))
    x, r = big_x[..., ::2], big_r[..., ::2]
    expected = torch.ops.segcft.soft_area(x.contiguous(), r.contiguous(), R, "softmax", 0.5)
    torch.testing.assert_close(torch.ops.segcft.soft_area(x, r, R, "softmax", 0.5), expected)
    torch.testing.assert_close(torch.ops.segcft.soft_area(x, r.int(), R, "softmax", 0.5), expected)
    torch.testing.assert_close(torch.ops.segcft.soft_area(x, r.transpose(1, 2).contiguous().transpose(1, 2), R,
                                                          "softmax", 0.5), expected)


# ---- segcft::soft_area_backward called directly -------------------------------------------------

BACKWARD_BAD = {
    # A grad smaller than (B, C, max(R, 1)) was read past its end (gradients of 1e37).
    "grad_undersized": (lambda: (_logits(), _regions(), R, "softmax", torch.ones(B, C, 1)), OpValueError,
                        r"grad must have shape \(2, 3, 5\), got \(2, 3, 1\)"),
    "grad_wrong_batch": (lambda: (_logits(), _regions(), R, "softmax", torch.ones(B + 1, C, R)), OpValueError,
                         "grad must have shape"),
    "grad_flat": (lambda: (_logits(), _regions(), R, "softmax", torch.ones(B * C * R)), OpValueError,
                  "grad must have shape"),
    "grad_int": (lambda: (_logits(), _regions(), R, "softmax", torch.ones(B, C, R, dtype=torch.long)), OpTypeError,
                 "grad must be a floating-point tensor"),
    "grad_other_device": (lambda: (_logits(), _regions(), R, "softmax", torch.ones(B, C, R, device="meta")),
                          OpValueError, "grad is on device meta"),
    # The same map checks as the forward.
    "regions_undersized": (lambda: (_logits(), torch.zeros(1, 4, 4, dtype=torch.long), R, "softmax",
                                    torch.ones(B, C, R)), OpValueError, "regions must have shape"),
    "regions_id_out_of_range": (lambda: (_logits(), _regions() * 3, R, "softmax", torch.ones(B, C, R)),
                                OpValueError, r"ids in \[0, num_regions=5\)"),
    "regions_id_2pow32": (lambda: (_logits(), _regions() + 2**32, R, "softmax", torch.ones(B, C, R)),
                          OpValueError, "4294967296"),
    "num_regions_huge": (lambda: (_logits(), _regions(), 2**31, "softmax", torch.ones(B, C, 1)), OpValueError,
                         "num_regions"),
    "activation_unknown": (lambda: (_logits(), None, 0, "tanh", torch.ones(B, C, 1)), OpValueError, "activation"),
    "logits_int": (lambda: (_logits().int(), None, 0, "softmax", torch.ones(B, C, 1)), OpTypeError, "logits"),
}


@NEEDS_C
@pytest.mark.parametrize("case", list(BACKWARD_BAD))
def test_soft_area_backward_op_rejects(case):
    make, exc, match = BACKWARD_BAD[case]
    with pytest.raises(exc, match=match):
        torch.ops.segcft.soft_area_backward(*make())


@NEEDS_C
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("num_regions", [2, 12])
@pytest.mark.parametrize("column", [3, W - 1], ids=["full_vector", "tail"])
def test_soft_area_backward_op_bad_region_id_on_every_kernel_path(isa, dtype, num_regions, column, monkeypatch):
    """The backward kernels report the ids they read: one id outside [0, R), in a full vector or
    in the tail of a row, raises with the exact range on the vector (R <= lanes), gather
    (R > lanes) and float64 paths alike."""
    monkeypatch.setenv("SEGCFT_CPU_ISA", isa)
    regions = _regions(num_regions)
    regions[0, 0, column] = -2
    with pytest.raises(OpValueError, match=rf"found values in \[-2, {num_regions - 1}\]"):
        torch.ops.segcft.soft_area_backward(_logits(dtype), regions, num_regions, "sigmoid",
                                            torch.ones(B, C, num_regions))


@NEEDS_C
def test_soft_area_backward_op_strided_grad_matches_contiguous():
    """A non-contiguous grad of the right shape is valid input."""
    logits, regions = _logits(), _regions()
    g = torch.randn(B, R, C).transpose(1, 2)
    expected = torch.ops.segcft.soft_area_backward(logits, regions, R, "softmax", g.contiguous())
    torch.testing.assert_close(torch.ops.segcft.soft_area_backward(logits, regions, R, "softmax", g), expected)


# ---- segcft::area_loss called directly ----------------------------------------------------------

LOSS_BAD = {
    # (B, K) and (K,) inputs of the wrong size were read past their end.
    "targets_undersized": ({"targets": torch.zeros(1)}, OpValueError, r"targets must have shape \(B, K\) = \(2, 2\)"),
    "weights_wrong_batch": ({"weights": torch.ones(B + 1, 2)}, OpValueError, "weights must have shape"),
    "scale_undersized": ({"scale": torch.ones(1)}, OpValueError, r"scale must have shape \(K,\)"),
    "targets_int": ({"targets": torch.zeros(B, 2, dtype=torch.long)}, OpTypeError, "targets must be a floating"),
    "index_rank1": ({"index": torch.tensor([1, 0])}, OpValueError, r"index must have shape \(K, 2\)"),
    "index_three_columns": ({"index": torch.tensor([[1, 0, 0], [2, -1, 0]])}, OpValueError, r"\(K, 2\)"),
    "index_float": ({"index": torch.tensor([[1.0, 0.0], [2.0, -1.0]])}, OpTypeError, "index must be an int64"),
    # Index rows: class in [0, C), region in [-1, R).
    "index_class_too_big": ({"index": torch.tensor([[3, 0], [2, -1]])}, OpValueError,
                            r"index\[:, 0\] must hold class ids in \[0, C=3\)"),
    "index_class_negative": ({"index": torch.tensor([[-1, 0], [2, -1]])}, OpValueError, r"index\[:, 0\]"),
    "index_region_too_big": ({"index": torch.tensor([[1, 4], [2, -1]])}, OpValueError,
                             r"index\[:, 1\] must hold region ids in \[-1, 4\)"),
    "index_region_below_minus_one": ({"index": torch.tensor([[1, -2], [2, -1]])}, OpValueError, r"index\[:, 1\]"),
    "index_region_without_map": ({"regions": None, "num_regions": 0}, OpValueError, "no region map"),
    # scale divides A - t: finite and > 0.
    "scale_zero": ({"scale": torch.tensor([1.0, 0.0])}, OpValueError, r"found scale\[1\] = 0.0"),
    "scale_negative": ({"scale": torch.tensor([-1.0, 1.0])}, OpValueError, r"found scale\[0\] = -1.0"),
    "scale_nan": ({"scale": torch.tensor([1.0, float("nan")])}, OpValueError, r"scale\[1\] = nan"),
    # Scalars and names.
    "penalty_unknown": ({"penalty": "l3"}, OpValueError, "penalty must be one of"),
    "huber_delta_zero": ({"huber_delta": 0.0}, OpValueError, "huber_delta must be a finite number > 0"),
    "huber_delta_inf": ({"huber_delta": float("inf")}, OpValueError, "huber_delta"),
    "voxel_volume_zero": ({"voxel_volume": 0.0}, OpValueError, "voxel_volume"),
    "num_regions_huge": ({"num_regions": 2_000_000_000}, OpValueError, "num_regions"),
    "regions_bad_id": ({"regions": _regions(4) - 1}, OpValueError, r"found values in \[-1, 2\]"),
    "regions_undersized": ({"regions": torch.zeros(B, 2, dtype=torch.long)}, OpValueError, "regions must have shape"),
    "targets_other_device": ({"targets": torch.zeros(B, 2, device="meta")}, OpValueError, "targets is on device"),
}


@NEEDS_C
@pytest.mark.parametrize("case", list(LOSS_BAD))
def test_area_loss_op_rejects(case):
    kw, exc, match = LOSS_BAD[case]
    with pytest.raises(exc, match=match):
        _call_loss(_loss_args(**kw))


# ---- segcft::area_loss_backward called directly -------------------------------------------------

LOSS_BACKWARD_BAD = {
    # A class id >= C wrote the gradient out of bounds.
    "index_class_too_big": ({"index": torch.tensor([[50, 0], [2, -1]])}, OpValueError,
                            r"class ids in \[0, C=3\), found values in \[2, 50\]"),
    "index_region_too_big": ({"index": torch.tensor([[1, 9], [2, -1]])}, OpValueError, r"index\[:, 1\]"),
    # areas smaller than (B, C, max(R, 1)) were read past their end.
    "areas_undersized": ({"areas": torch.ones(1)}, OpValueError, r"areas must have shape \(2, 3, 4\), got \(1,\)"),
    "areas_wrong_regions": ({"areas": torch.ones(B, C, 1)}, OpValueError, "areas must have shape"),
    "grad_loss_not_scalar": ({"grad_loss": torch.ones(2)}, OpValueError, r"grad_loss must have shape \(\)"),
    "grad_loss_int": ({"grad_loss": torch.tensor(1)}, OpTypeError, "grad_loss must be a floating"),
    "grad_areas_undersized": ({"grad_areas": torch.ones(B, C)}, OpValueError, "grad_areas must have shape"),
    "targets_undersized": ({"targets": torch.zeros(B, 1)}, OpValueError, "targets must have shape"),
    "scale_zero": ({"scale": torch.tensor([0.0, 1.0])}, OpValueError, r"scale\[0\] = 0.0"),
    "regions_bad_id": ({"regions": _regions(4) + 1}, OpValueError, r"found values in \[1, 4\]"),
    "penalty_unknown": ({"penalty": "huber2"}, OpValueError, "penalty"),
    "voxel_volume_nan": ({"voxel_volume": float("nan")}, OpValueError, "voxel_volume"),
}


@NEEDS_C
@pytest.mark.parametrize("case", list(LOSS_BACKWARD_BAD))
def test_area_loss_backward_op_rejects(case):
    kw, exc, match = LOSS_BACKWARD_BAD[case]
    with pytest.raises(exc, match=match):
        _call_loss_backward(_loss_backward_args(**kw))


@NEEDS_C
def test_area_loss_backward_op_float64_areas_match_float32():
    """Areas in another float type than the accumulation type are converted, not reinterpreted."""
    args = _loss_backward_args(areas=torch.rand(B, C, 4, generator=torch.Generator().manual_seed(2)))
    expected = _call_loss_backward(args)
    args["areas"] = args["areas"].double()
    torch.testing.assert_close(_call_loss_backward(args), expected)


# ---- torch route (no CPU kernels) and the reference: the same errors ----------------------------


@pytest.mark.parametrize(
    "case", ["index_class_too_big", "index_region_too_big", "scale_zero", "scale_nan", "regions_bad_id"]
)
def test_area_loss_op_torch_route_rejects_alike(case, monkeypatch):
    """Without the compiled kernels the op raises the same error as with them."""
    from segcft.ops import _custom

    monkeypatch.setattr(_custom, "_cpu_module", lambda logits: None)
    monkeypatch.setattr(_custom, "_kernel_module", lambda logits: None)
    kw, exc, match = LOSS_BAD[case]
    with pytest.raises(exc, match=match):
        _call_loss(_loss_args(**kw))


def test_soft_area_backward_torch_route_rejects_bad_region_id(monkeypatch):
    """The torch route checks the map before torch.gather (which would fault on a GPU)."""
    from segcft.ops import _custom

    monkeypatch.setattr(_custom, "_cpu_module", lambda logits: None)
    monkeypatch.setattr(_custom, "_kernel_module", lambda logits: None)
    with pytest.raises(OpValueError, match=r"ids in \[0, num_regions=5\)"):
        torch.ops.segcft.soft_area_backward(_logits(), _regions() + 1, R, "softmax", torch.ones(B, C, R))


def test_reference_area_loss_rejects_zero_scale():
    """The reference raises the kernels' error for a scale entry of 0."""
    a = _loss_args(scale=torch.tensor([1.0, 0.0]))
    with pytest.raises(OpValueError, match=r"found scale\[1\] = 0.0"):
        ref.area_loss(a["logits"], a["targets"], a["weights"], a["index"], a["scale"], regions=a["regions"],
                      num_regions=4)


# ---- the public functions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spacing": (1e200, 1e200)}, "voxel volume of inf"),  # each finite, the product overflows
        ({"spacing": (1e-200, 1e-200)}, "voxel volume of 0.0"),  # each > 0, the product underflows
        ({"regions": _regions(), "num_regions": MAX_REGIONS + 1}, r"num_regions must be an int in \[0, 4096\]"),
        ({"regions": _regions() + 2**32, "num_regions": R}, "4294967296"),
    ],
    ids=["volume_overflow", "volume_underflow", "num_regions_over_bound", "region_id_2pow32"],
)
@pytest.mark.parametrize("fn", [ops.soft_area, ref.soft_area], ids=["ops", "reference"])
def test_public_soft_area_rejects(fn, kwargs, match):
    with pytest.raises(OpValueError, match=match):
        fn(_logits(), **kwargs)


@pytest.mark.parametrize("fn", [ops.area_loss, ref.area_loss], ids=["ops", "reference"])
@pytest.mark.parametrize(
    "kwargs, match",
    [({"scale": torch.tensor([-2.0, 1.0])}, r"scale\[0\] = -2.0"), ({"huber_delta": float("nan")}, "huber_delta")],
    ids=["scale_negative", "huber_delta_nan"],
)
def test_public_area_loss_rejects(fn, kwargs, match):
    a = _loss_args()
    args = {"targets": a["targets"], "weights": a["weights"], "index": a["index"], "scale": a["scale"]}
    args.update(kwargs)
    with pytest.raises(OpValueError, match=match):
        fn(a["logits"], **args, regions=a["regions"], num_regions=4)


# ---- the raw bindings (segcft._C): what they can check without the tensors ----------------------


@NEEDS_C
@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_regions": MAX_REGIONS + 1}, r"num_regions must be in \[0, 4096\]"),
        ({"scale": float("nan")}, "scale must be finite and > 0"),
        ({"scale": 0.0}, "scale must be finite and > 0"),
        ({"out_ptr": 0}, "out_ptr is null"),
        ({"logits_ptr": 0}, "logits_ptr is null"),
        ({"region_strides": [1, -1, 1]}, "region_strides must be >= 0"),
        ({"strides": [1, 1, -1, 1]}, "strides must be >= 0"),
        ({"shape": [2**40, 2**40, 2**40, 1]}, "2\\^63"),
    ],
    ids=["num_regions", "scale_nan", "scale_zero", "null_out", "null_logits", "negative_region_stride",
         "negative_stride", "numel_overflow"],
)
def test_raw_forward_binding_rejects(change, match):
    module = _backend.cpu_backend().module
    x, r = _logits(), _regions()
    out = torch.empty(B, C, R)
    args = {"logits_ptr": x.data_ptr(), "dtype": 0, "shape": list(x.shape), "strides": list(x.stride()),
            "regions_ptr": r.data_ptr(), "region_strides": list(r.stride()), "num_regions": R, "activation": 0,
            "out_ptr": out.data_ptr(), "num_threads": 1, "scale": 1.0}
    args.update(change)
    with pytest.raises(ValueError, match=match):
        module.soft_area_forward(**args)
