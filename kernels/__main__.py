"""`python -m kernels`: which backend each op uses on this machine (exit 2 on an unknown HYBRID_KERNELS)."""
import sys

import torch

from .registry import BACKEND_ENV, KernelBackendError, backends, requested


def main() -> int:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    try:
        table = {d: backends(d) for d in devices}
    except KernelBackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{BACKEND_ENV}={requested()}  torch {torch.__version__}"
          + (f"  GPU: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "  (no GPU)"))
    width = max(len(op) for op in table["cpu"])
    print(f"{'op':<{width}}  " + "  ".join(f"{d:<10}" for d in devices))
    for op in table["cpu"]:
        print(f"{op:<{width}}  " + "  ".join(f"{table[d][op]:<10}" for d in devices))
    from .attention import flash
    print(flash.describe())
    return 0


sys.exit(main())
