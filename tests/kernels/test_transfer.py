import numpy as np
import torch

from brorl.kernels.transfer import upload


def test_upload_keeps_each_arrays_values_dtype_and_shape():
    arrays = [np.float32(2.5), np.int64(-7), np.arange(5, dtype=np.int32),
              np.zeros((0, 1), dtype=np.int64), np.array([[1, 2, 3], [4, 5, 6]]).T,
              np.array([True, False, True]), np.linspace(0, 1, 3), [1, 2, 3]]
    got = upload(arrays, "cpu")
    assert len(got) == len(arrays)
    for a, t in zip(arrays, got):
        want = torch.from_numpy(np.array(a))
        assert t.dtype == want.dtype and t.shape == want.shape, (a, t)
        assert torch.equal(t, want)
        assert t.is_contiguous() and t.data_ptr() % 16 == 0


def test_upload_of_nothing():
    assert upload([], "cpu") == []
