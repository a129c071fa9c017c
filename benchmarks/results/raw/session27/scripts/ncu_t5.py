"""One T5-shaped (8192x768x3072) forward + backward, ours at p = 0.1 and dense F.linear, for ncu."""
import math, torch, torch.nn.functional as F
import sparsedrop_compile  # noqa
from sparsedrop_compile.kernels.block_mask import dropout_scale, sample_block_keep
import sys
M, N, K = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "8192x768x3072").split("x")]
torch.manual_seed(0)
x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16).requires_grad_()
w = (torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / math.sqrt(K)).requires_grad_()
dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
for i in range(3):
    keep = sample_block_keep(x, 0.1, 128, 128, batched=False)
    torch.autograd.grad(torch.ops.sparsedrop.linear(x, w, None, keep, dropout_scale(0.1), 128, 128, "triton"), (x, w), dy)
    torch.autograd.grad(F.linear(x, w), (x, w), dy)
torch.cuda.synchronize()
