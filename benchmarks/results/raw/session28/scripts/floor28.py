"""Session 28, call 3: what a Gluon kernel costs before any work. Micro-kernels on 132 programs
(one per SM), CUDA-graph replays, torch.profiler kernel durations and do_bench_cudagraph:
  V0  an empty @triton.jit kernel (the launch)
  V2  a Gluon kernel with the matmul's shared memory (5 stages of 128x64 + 64x128 bf16 tiles and
      an output tile: 192 KB) and warp specialisation (a producer warp), three TMA descriptors built
      on the device (as _listed_wgmma_kernel does), one step's loads by the producer, one output
      tile stored by the consumer
  V3  V2 with the descriptors built on the host (kernel parameters)
  V4  V2 with 1 stage (64 KB of shared memory); V1 V3 with 1 stage"""
import statistics, sys
import torch, triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from sparsedrop_compile.kernels.gluon_hopper import staged, tma_load, tma_store
from sparsedrop_compile.kernels import runtime


@triton.jit
def _empty(x_ptr):
    pass


@gluon.jit
def _consumer(x_smem, y_smem, out_smem, ready, out_desc, WORK: gl.constexpr, num_warps: gl.constexpr):
    if WORK:
        mbarrier.wait(ready.index(0), 0)
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        out_smem.store(gl.zeros([128, 128], gl.bfloat16, layout=layout))
        fence_async_shared()
        tma_store(out_desc, [gl.program_id(0) * 128, 0], out_smem)
        tma.store_wait(pendings=0)


@gluon.jit
def _producer(x_desc, y_desc, x_smem, y_smem, ready, WORK: gl.constexpr):
    if WORK:
        bar = ready.index(0)
        mbarrier.expect(bar, x_desc.block_type.nbytes + y_desc.block_type.nbytes)
        tma_load(x_desc, [gl.program_id(0) * 128, 0], bar, x_smem.index(0))
        tma_load(y_desc, [0, 0], bar, y_smem.index(0))


@gluon.jit
def _body(x_desc, y_desc, out_desc, STAGES: gl.constexpr, WORK: gl.constexpr, num_warps: gl.constexpr):
    dtype: gl.constexpr = gl.bfloat16
    x_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([128, 64], dtype)
    y_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, 128], dtype)
    out_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([128, 128], dtype)
    x_smem = gl.allocate_shared_memory(dtype, staged(STAGES, [128, 64]), x_layout)
    y_smem = gl.allocate_shared_memory(dtype, staged(STAGES, [64, 128]), y_layout)
    out_smem = gl.allocate_shared_memory(dtype, [128, 128], out_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    gl.warp_specialize([
        (_consumer, (x_smem, y_smem, out_smem, ready, out_desc, WORK, num_warps)),
        (_producer, (x_desc, y_desc, x_smem, y_smem, ready, WORK)),
    ], [1], [40])
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))


@gluon.jit
def _device_descs(x_ptr, y_ptr, out_ptr, M, N, K, STAGES: gl.constexpr, WORK: gl.constexpr, num_warps: gl.constexpr):
    dtype: gl.constexpr = gl.bfloat16
    x_desc = tma.make_tensor_descriptor(x_ptr, [M, K], [K, 1], [128, 64],
                                        gl.NVMMASharedLayout.get_default_for([128, 64], dtype))
    y_desc = tma.make_tensor_descriptor(y_ptr, [K, N], [N, 1], [64, 128],
                                        gl.NVMMASharedLayout.get_default_for([64, 128], dtype))
    out_desc = tma.make_tensor_descriptor(out_ptr, [M, N], [N, 1], [128, 128],
                                          gl.NVMMASharedLayout.get_default_for([128, 128], dtype))
    _body(x_desc, y_desc, out_desc, STAGES, WORK, num_warps)


@gluon.jit
def _host_descs(x_desc, y_desc, out_desc, STAGES: gl.constexpr, WORK: gl.constexpr, num_warps: gl.constexpr):
    _body(x_desc, y_desc, out_desc, STAGES, WORK, num_warps)


def main():
    P = 132
    M, N, K = P * 128, 128, 3072
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    L = gl.NVMMASharedLayout.get_default_for
    xd = TensorDescriptor.from_tensor(x, [128, 64], L([128, 64], gl.bfloat16))
    yd = TensorDescriptor.from_tensor(y, [64, 128], L([64, 128], gl.bfloat16))
    od = TensorDescriptor.from_tensor(out, [128, 128], L([128, 128], gl.bfloat16))
    runtime.set_scratch_allocator()
    variants = {
        "V0 empty triton": lambda: _empty[(P,)](x),
        "V1 host descs, 1 stage": lambda: _host_descs[(P,)](xd, yd, od, STAGES=1, WORK=True, num_warps=8),
        "V2 device descs": lambda: _device_descs[(P,)](x, y, out, M, N, K, STAGES=5, WORK=True, num_warps=8),
        "V3 host descs": lambda: _host_descs[(P,)](xd, yd, od, STAGES=5, WORK=True, num_warps=8),
        "V4 device descs, 1 stage": lambda: _device_descs[(P,)](x, y, out, M, N, K, STAGES=1, WORK=True, num_warps=8),
    }
    from torch.profiler import profile, ProfilerActivity
    for name, fn in variants.items():
        fn(); torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(10):
                fn()
        g.replay(); torch.cuda.synchronize()
        t = triton.testing.do_bench_cudagraph(fn, rep=50) * 1000
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                g.replay()
            torch.cuda.synchronize()
        evs = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
        durs = [e.time_range.elapsed_us() for e in evs]
        gaps = [b.time_range.start - a.time_range.end for a, b in zip(evs, evs[1:])]
        print(f"{name:28s} do_bench_cudagraph {t:6.2f} us/launch; profiler: kernel {statistics.median(durs):5.2f} us, "
              f"gap {statistics.median(gaps):5.2f} us (n={len(durs)})", flush=True)
    assert torch.equal(out, torch.zeros_like(out))


if __name__ == "__main__":
    print("GPU", torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    main()
