"""Shared test setup.

Without a GPU the Triton kernels run under Triton's interpreter, which reads TRITON_INTERPRET
when a kernel module is imported: set it before anything imports them.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_interpret = pytest.mark.skip(
        reason="runs the Triton kernels on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, as on CI); "
        "the gpu-marked tests cover the same kernels on CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "interpret" in item.keywords and not interpreting:
            item.add_marker(skip_interpret)


@pytest.fixture
def eager_block_dropout(monkeypatch):
    """``patch(block, batched)``: F.dropout becomes block dropout with blocks of ``block``,
    ``batched(x)`` choosing the layout, each mask drawn with ``sample_block_keep`` as the compiled
    graph draws it; ``restore()`` puts F.dropout back. The reference for whole models."""
    import torch.nn.functional as F
    from sparsedrop_compile.kernels.block_mask import (
        apply_block_keep,
        sample_block_keep,
    )

    original = F.dropout

    class Patch:
        def __call__(self, block, batched):
            def block_dropout(x, p=0.5, training=True, inplace=False):
                if not training or p == 0:
                    return x
                layout = batched(x)
                return apply_block_keep(x, sample_block_keep(x, p, *block, layout), 1 / (1 - p), *block, layout)

            monkeypatch.setattr(torch.nn.functional, "dropout", block_dropout)

        def restore(self):
            monkeypatch.setattr(torch.nn.functional, "dropout", original)

    return Patch()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cached graphs or counters leak between tests."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
