"""benchmarks/host_overhead.py's launch count, on code shaped as Inductor writes it (no GPU)."""
import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "host_overhead.py"
_spec = importlib.util.spec_from_file_location("host_overhead", _PATH)
host_overhead = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host_overhead)

# Lines as in the generated wrapper of a rewritten linear site's forward (H200, session 7), with
# the comment lines Inductor writes around them: those name ATen ops too and must not count.
_WRAPPER = '''
aten = torch.ops.aten
def call(self, args):
    buf0 = empty_strided_cuda((1, ), (1, ), torch.int64)
    # Topologically Sorted Source Nodes: [], Original ATen: []
    aten.randint.low_out(-9223372036854775808, 9223372036854775807, [1], out=buf0)
    # Original ATen: [aten.rand, aten.ge]
    #   %ge : Tensor = call_function[target=torch.ops.aten.ge.Scalar](args = (%rand, 0.1), kwargs = {})
    triton_poi_fused_ge_rand_0.run(buf0, buf2, 0, 119, stream=stream0)
    _dsd_kernel_1.run(reinterpret_tensor(primals_1, (1, 2048, 768), (1572864, 768, 1), 0), buf3, stream=stream0)
    extern_kernels.mm(buf4, primals_2, out=buf5)
    return (buf3, buf2, )
'''


def test_launches_counts_the_wrappers_kernel_calls_and_skips_comments():
    assert host_overhead.launches([_WRAPPER]) == 4  # randint, the sampling kernel, dsd, mm
    assert host_overhead.launches([_WRAPPER, _WRAPPER]) == 8
    assert host_overhead.launches(["# _dsd_kernel_1.run(x)\n    aten = torch.ops.aten\n"]) == 0
