"""The upload decoder under hostile input: issue 15's rows at test sizes, and Hypothesis fuzzing.

No Ray here: these call `trainer.serve.codecs` and `trainer.serve.inputs` directly. Every draw must
be a valid volume or a 4xx `ApiError`, in bounded time.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import struct
import threading
import time

import hostile_inputs as hi
import numpy as np
import pytest

from trainer.serve.codecs import VolumeLimits, _inflate, decode_nifti, read_header
from trainer.serve.errors import ApiError
from trainer.serve.inputs import check_clicks, parse_json

LIMITS = VolumeLimits(
    max_voxels=300_000,
    max_dim=128,
    max_volume_bytes=2 * 1024 * 1024,
    max_extension_bytes=64 * 1024,
    max_gzip_members=64,
)


def _status(fn, *args) -> int:
    try:
        fn(*args)
    except ApiError as exc:
        assert exc.detail and "Traceback" not in exc.detail
        return exc.status
    return 200


def test_extension_records_are_capped_and_never_parsed():
    t0 = time.perf_counter()
    assert _status(decode_nifti, hi.extension_records_bomb(400_000), LIMITS) == 413
    assert time.perf_counter() - t0 < 0.5
    # Under the cap, records are skipped (not parsed): the volume decodes.
    image, _ = decode_nifti(hi.extension_records_bomb(1000), LIMITS)
    assert image.shape == (2, 2, 2)
    with pytest.raises(ApiError, match="max_extension_bytes"):
        read_header(hi.extension_records_bomb(8000), LIMITS)


def test_gzip_members_linear_and_capped():
    vol = hi.nifti_bytes(np.arange(64, dtype=np.int16).reshape(4, 4, 4))
    # A few members are fine (and zero padding between members is skipped).
    image, _ = decode_nifti(hi.empty_members_bomb(10, vol), LIMITS)
    assert image.shape == (4, 4, 4)
    t0 = time.perf_counter()
    with pytest.raises(ApiError, match="max_gzip_members") as e:
        decode_nifti(hi.empty_members_bomb(200_000, vol), LIMITS)
    assert e.value.status == 413 and time.perf_counter() - t0 < 0.5
    # Linear: 20 000 members (under a high cap) inflate in well under a second.
    t0 = time.perf_counter()
    assert len(_inflate(hi.empty_members_bomb(20_000, vol), 10**6, 10**6)) > 0
    assert time.perf_counter() - t0 < 1.0


def test_inflate_stops_at_what_the_header_declares():
    vol = gzip.decompress(hi.nifti_bytes(np.ones((4, 4, 4), np.int16)))
    bomb = gzip.compress(vol + b"\0" * (50 * 1024 * 1024), compresslevel=1)  # 50 MB of trailing zeros
    t0 = time.perf_counter()
    image, _ = decode_nifti(bomb, LIMITS)
    assert image.shape == (4, 4, 4) and time.perf_counter() - t0 < 0.2


def test_declared_size_refused_before_inflating():
    t0 = time.perf_counter()
    with pytest.raises(ApiError, match="max_voxels|max_dim"):
        read_header(hi.declared_zeros_bomb(full=False), LIMITS)
    with pytest.raises(ApiError, match="max_volume_bytes"):
        read_header(hi.declared_zeros_bomb((64, 64, 72), full=False), LIMITS)  # float64: 2.25 MiB
    assert time.perf_counter() - t0 < 0.1
    plan = read_header(hi.declared_zeros_bomb((32, 32, 32), datatype=4, itemsize=2, full=True), LIMITS)
    assert plan.work_bytes == plan.file_bytes + 32**3 * 16


@pytest.mark.parametrize(
    "name,body,status",
    [
        ("sheared_sform", hi.sheared_sform_nifti(), 422),
        ("nan_vox_offset", hi.header_with(vox_offset=float("nan")), 400),
        ("negative_vox_offset", hi.header_with(vox_offset=-1e9), 422),
        ("vox_offset_inside_header", hi.header_with(vox_offset=100), 422),
        ("huge_vox_offset", hi.header_with(vox_offset=3e38), 413),
        ("bad_datatype", hi.header_with(datatype=9999), 400),
        ("rgb_datatype", hi.header_with(datatype=128, bitpix=24), 422),
        ("negative_dim", hi.header_with(shape=(8, 8, 8), dim=[3, 8, -8, 8, 1, 1, 1, 1]), 422),
        ("dim0_out_of_range", hi.header_with(dim=[9, 8, 8, 8, 1, 1, 1, 1]), 422),
        ("inf_slope_inter", hi.header_with(scl_slope=1.0, scl_inter=float("inf")), 422),
        ("overflow_slope", hi.header_with(datatype=16, bitpix=32, scl_slope=3e38, data_bytes=2048 * 0), 400),
        ("nan_sform", hi.header_with(srow_x=[float("nan"), 0, 0, 0]), 422),
        ("zero_sform", hi.header_with(srow_x=[0, 0, 0, 0], srow_y=[0, 0, 0, 0], srow_z=[0, 0, 0, 0]), 422),
        ("truncated_voxels", hi.header_with(data_bytes=100), 400),
    ],
)
def test_malformed_headers_are_4xx(name, body, status):
    assert _status(decode_nifti, body, LIMITS) == status, name


def test_json_limits():
    assert parse_json("", "x", 1024) is None
    for text, status in [
        ("[" * 100_000, 413),
        ("[" * 5000, 400),
        ('{"a":' * 20 + "1" + "}" * 20, 400),
        ('{"spleen": [[' + "9" * 5000 + ", 1, 1]]}", 400),
        ('{"spleen": [[1e999, 1, 1]]}', 400),
        ('{"spleen": [[NaN, 1, 1]]}', 400),
        (b"\xff\xfe", 400),
        ("{", 400),
    ]:
        assert _status(parse_json, text, "clicks", 64 * 1024) == status, text[:30]
    assert parse_json('{"spleen": [[1, 2, 3]]}', "clicks", 1024) == {"spleen": [[1, 2, 3]]}


def test_clicks_capped_and_deduplicated():
    shape = (64, 64, 32)
    assert _status(check_clicks, json.loads(hi.many_clicks_body(513)), shape, 512) == 400
    out = check_clicks(json.loads(hi.many_clicks_body(512, duplicate=True)), shape, 512)
    assert out["spleen"] == [(1, 1, 1)] and out["background"] == []
    assert check_clicks({"spleen": [[1, 2, 3], [4, 5, 6], [1, 2, 3]]}, shape, 512)["spleen"] == [(1, 2, 3), (4, 5, 6)]
    assert _status(check_clicks, {"spleen": [[10**40, 1, 1]]}, shape, 512) == 400


def test_finish_work_holds_the_request_until_its_thread_stops():
    from trainer.serve.core import finish_work

    done = threading.Event()

    def work():
        time.sleep(0.3)
        done.set()

    async def request():
        async with asyncio.timeout(0.05):
            await finish_work(asyncio.to_thread(work))

    t0 = time.perf_counter()
    with pytest.raises(TimeoutError):
        asyncio.run(request())
    assert done.is_set() and time.perf_counter() - t0 >= 0.29  # the timeout waited for the work


def test_memory_budget_waits_then_503():
    from trainer.serve.core import MemoryBudget

    budget = MemoryBudget(100, wait_s=0.1, retry_after_s=2)

    async def scenario():
        async with budget.reserve(80):
            with pytest.raises(ApiError) as busy:
                async with budget.reserve(30):
                    pass
            assert busy.value.status == 503 and busy.value.headers == {"Retry-After": "2"}
        async with budget.reserve(100):
            assert budget.in_flight == 100
        with pytest.raises(ApiError) as big:
            async with budget.reserve(101):
                pass
        assert big.value.status == 413 and "memory_budget_bytes" in big.value.detail
        assert budget.in_flight == 0

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- Hypothesis fuzzing

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DATATYPES = [2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280, 1536, 32, 128, 2304, 1, 0, 9999]
finite = st.floats(-1e6, 1e6, allow_nan=False)
anyfloat = st.one_of(
    finite, st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 1e-30, 1e30])
)


@st.composite
def nifti_uploads(draw) -> bytes:
    import nibabel as nib

    hdr = np.zeros((), dtype=nib.nifti1.header_dtype)
    hdr["sizeof_hdr"] = 348
    ndim = draw(st.integers(0, 8))
    dims = [draw(st.integers(-2, 40)) for _ in range(7)]
    hdr["dim"] = [ndim, *dims]
    datatype = draw(st.sampled_from(DATATYPES))
    hdr["datatype"] = datatype
    hdr["bitpix"] = draw(st.sampled_from([8, 16, 32, 64, 128, 0]))
    n_ext = draw(st.integers(0, 40))
    offset = draw(st.one_of(st.just(352 + 16 * n_ext), st.floats(allow_nan=True, allow_infinity=True, width=32)))
    hdr["vox_offset"] = offset
    hdr["scl_slope"] = draw(anyfloat)
    hdr["scl_inter"] = draw(anyfloat)
    hdr["pixdim"] = [1.0] + [draw(anyfloat) for _ in range(7)]
    hdr["qform_code"] = draw(st.integers(-1, 5))
    hdr["sform_code"] = draw(st.integers(-1, 5))
    for field in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z"):
        hdr[field] = draw(anyfloat)
    for row in ("srow_x", "srow_y", "srow_z"):
        hdr[row] = [draw(anyfloat) for _ in range(4)]
    hdr["magic"] = draw(st.sampled_from([b"n+1", b"ni1", b"xyz"]))
    raw = hdr.tobytes() + struct.pack("<i", 1 if n_ext else 0)
    raw += (struct.pack("<ii", 16, 0) + b"\0" * 8) * n_ext
    n_data = draw(st.integers(0, 40_000))
    raw += draw(st.binary(min_size=0, max_size=64)) * (n_data // 64) if n_data else b""
    if draw(st.booleans()):
        raw = raw[: draw(st.integers(0, len(raw)))]  # truncated
    return gzip.compress(raw, compresslevel=1) if draw(st.booleans()) else raw


@settings(
    max_examples=200,
    deadline=2000,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(nifti_uploads())
def test_fuzz_decoder_gives_a_volume_or_a_4xx(data):
    t0 = time.perf_counter()
    try:
        image, affine = decode_nifti(data, LIMITS)
    except ApiError as exc:
        assert 400 <= exc.status < 500 and exc.detail
    else:
        assert image.ndim == 3 and image.dtype == np.float32 and np.isfinite(image).all()
        assert affine.shape == (4, 4) and np.isfinite(affine).all()
    assert time.perf_counter() - t0 < 1.0


@settings(max_examples=200, deadline=1000, database=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=30,
    )
)
def test_fuzz_clicks_give_clicks_or_a_400(value):
    try:
        out = check_clicks(value, (8, 8, 8), 16)
    except ApiError as exc:
        assert exc.status == 400
    else:
        assert set(out) == {"spleen", "background"}
