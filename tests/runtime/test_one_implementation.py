"""Issue 12 item 4: one Histogram, one v2 dtype map, one fixed-batch helper, shared by every user."""

from __future__ import annotations

import numpy as np
import pytest

import edgeml.compiler.evaluate as evaluate
import edgeml.runtime.dtypes as dtypes
import edgeml.runtime.server.metrics as metrics
import edgeml.runtime.server.protocol as protocol
import edgeml.stats as stats
from edgeml.runtime.model import TensorSpec, fixed_batch


def test_server_metrics_use_the_project_histogram_and_render_its_buckets():
    assert metrics.Histogram is stats.Histogram
    st = metrics.ModelStats()
    for ms in (0.05, 0.3, 0.3, 7.0, 9000.0):
        st.record(200, ms)
    assert isinstance(st.latency_ms, stats.Histogram) and st.latency_ms.count == 5
    text = metrics.render_prometheus([("m", "1", True, st)], {}, 0).decode()
    lab = 'model="m",version="1"'
    assert f'edgeml_request_duration_seconds_bucket{{{lab},le="0.0001"}} 1' in text
    assert f'edgeml_request_duration_seconds_bucket{{{lab},le="0.0005"}} 3' in text
    assert f'edgeml_request_duration_seconds_bucket{{{lab},le="5"}} 4' in text
    assert f'edgeml_request_duration_seconds_bucket{{{lab},le="+Inf"}} 5' in text
    assert f'edgeml_request_duration_seconds_count{{{lab}}} 5' in text
    d = st.to_dict()
    assert d["latency_buckets_ms"]["0.5"] == 3 and d["latency_count"] == 5
    assert stats.Histogram.from_cumulative(d["latency_buckets_ms"]).percentile(50) == 0.5


def test_v2_decoder_uses_the_shared_dtype_map():
    assert protocol.DATATYPE_TO_DTYPE is dtypes.DATATYPE_TO_DTYPE
    assert protocol.DTYPE_TO_DATATYPE is dtypes.DTYPE_TO_DATATYPE
    for datatype, name in dtypes.DATATYPE_TO_DTYPE.items():
        assert protocol.datatype_of(name) == datatype == dtypes.datatype_of(np.dtype(name))
        assert protocol.DATATYPE_OF_DTYPE[np.dtype(name)] == datatype     # the encoder's dtype-keyed copy
    assert len(protocol.DATATYPE_OF_DTYPE) == len(dtypes.DATATYPE_TO_DTYPE)
    # behaviour kept for metadata of tensors v2 JSON cannot carry as numbers
    assert protocol.datatype_of("object") == "BYTES" and protocol.datatype_of("str") == "BYTES"
    assert protocol.datatype_of("complex64") == "COMPLEX64"


@pytest.mark.parametrize("shapes, want", [
    ([(None, 3)], None), ([(8, 3)], 8), ([(None, 3), (4, 2)], 4), ([()], None), ([], None)])
def test_one_fixed_batch_helper_for_compiler_and_backends(shapes, want):
    specs = [TensorSpec(f"x{i}", "float32", s) for i, s in enumerate(shapes)]
    assert fixed_batch(specs) == want
    assert evaluate.fixed_batch is fixed_batch


def test_backends_build_sides_have_no_private_copy():
    import edgeml.backends.onnxruntime.build as ort_build
    import edgeml.backends.openvino.build as ov_build

    for mod in (ort_build, ov_build):
        assert not hasattr(mod, "_fixed_batch"), mod.__name__
        assert mod.fixed_batch is fixed_batch
