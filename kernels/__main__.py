"""`python -m kernels`: which backend each op uses on this machine."""
import torch

from . import BACKEND_ENV, _requested, backends

devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
table = {d: backends(d) for d in devices}
print(f"{BACKEND_ENV}={_requested()}  torch {torch.__version__}"
      + (f"  GPU: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "  (no GPU)"))
width = max(len(op) for op in table["cpu"])
print(f"{'op':<{width}}  " + "  ".join(f"{d:<10}" for d in devices))
for op in table["cpu"]:
    print(f"{op:<{width}}  " + "  ".join(f"{table[d][op]:<10}" for d in devices))
