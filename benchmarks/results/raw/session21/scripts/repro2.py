import os, sys, traceback
import torch, torch.nn.functional as F
import torch._inductor.scheduler as sch
orig = sch.Scheduler.compute_ancestors
def patched(self):
    try:
        return orig(self)
    except KeyError as e:
        print("KeyError", e)
        for node in self.nodes:
            print("NODE", node.get_name(), type(node.node).__name__ if getattr(node, "node", None) is not None else type(node).__name__,
                  "outputs", [b.get_name() for b in node.get_outputs()])
            for dep in node.unmet_dependencies:
                buf = self.name_to_buf.get(dep.name)
                print("    dep", type(dep).__name__, dep.name, "->", buf.defining_op_name() if buf is not None else None)
            if hasattr(node.node, "kernel_args"):
                print("    kwargs", {k: (v.get_name() if hasattr(v, "get_name") else v) for k, v in node.node.kernel_args.items() if hasattr(v, "get_name")})
            if hasattr(node.node, "mutable_args"):
                print("    mutable", [m.get_name() for m in node.node.mutable_args])
        raise
sch.Scheduler.compute_ancestors = patched
import sparsedrop_compile
shape = tuple(int(v) for v in sys.argv[1].split("x"))
p = float(sys.argv[2])
rows, n, k = shape
x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = (torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5).requires_grad_()
dy = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
f = torch.compile(lambda x, w: F.linear(F.dropout(x, p, True), w), backend="sparsedrop", dynamic=False)
try:
    y = f(x, w)
    print("forward ok", flush=True)
    torch.autograd.grad(y, (x, w), dy)
    print("backward ok", flush=True)
except Exception as e:
    print("FAILED", type(e).__name__)
