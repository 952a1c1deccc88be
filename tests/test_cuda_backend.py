"""The CUDA backend on a machine without a GPU: present, unavailable, with a reason."""

import torch

import kbit


def test_cuda_backend_reports_why_it_is_unavailable():
    record = {r.name: r for r in kbit.backends.list()}["cuda"]
    assert record.distribution == "kbit" and record.device_types == ("cuda",)
    if not torch.cuda.is_available():
        assert record.state == "unavailable"
        assert record.reason.startswith(("cupy is not installed", "no CUDA device"))
