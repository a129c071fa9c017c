import sys, re, collections, torch, triton
sys.path.insert(0, "tests")
import test_gpu_compile as t
exec(t._RECORD.split("def matmuls")[0])
runtime.LAUNCH_BOUND_WORK = 0
M, N, K = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
dtype = torch.bfloat16
block = (128, 128)
a, g = torch.randn(1, M, K, dtype=dtype), torch.randn(1, M, N, dtype=dtype)
w = torch.randn(N, K, dtype=dtype)
keep = torch.rand(1, cdiv(M, 128), cdiv(K, 128)) > 0.3
wt = w.t().unsqueeze(0)
bsm.dsd(a, wt, keep, 1.25, block, _supported=True)
bsm.sdd(g, wt, keep, 1.25, block, _supported=True)
bsm.dsd_tn(a, g, keep, 1.25, block, False, _supported=True)
for (name, _), (kernel, named) in recorded.items():
    if "list" in name: continue
    args = {k: (torch.empty(16, dtype=v.dtype) if isinstance(v, torch.Tensor) else v) for k, v in named.items()}
    ck = kernel.warmup(grid=(1,), **args)
    ptx = ck.asm["ptx"]
    loads = collections.Counter(re.findall(r"(ld\.global[\w.]*|cp\.async[\w.]*)", ptx))
    print(name, {k: v for k, v in named.items() if k.startswith(("MASK", "USE_TMA", "TILE", "BALANCE", "WALK"))}, dict(loads.most_common(8)))
