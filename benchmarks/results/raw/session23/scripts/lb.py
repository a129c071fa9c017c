import runpy, sys
from sparsedrop_compile.kernels import runtime
runtime.LAUNCH_BOUND_WORK = 2 ** int(sys.argv[1])
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
