"""Property test: any valid layout gives the same logits by full forward, by prefill + decode, and packed."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid import HybridLM, load_layout
from tests.strategies import random_layouts


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=random_layouts(vocab_size=31), prefix=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_random_layout_decode_and_packing_parity(cfg, prefix, seed):
    torch.manual_seed(seed)
    model = HybridLM(load_layout(cfg)).double().eval()
    for name, p in model.named_parameters():
        if name.endswith(("dt_bias", ".D")):
            p.data.normal_(0, 1)  # let every random model exercise strong decays and skips
    ids = torch.randint(0, 31, (2, 21))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(2, 21)
        outs = [model(ids[:, :prefix], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(prefix, 21)]
        assert (torch.cat(outs, 1) - full).abs().max().item() <= 1e-6
        seq_idx = torch.zeros(2, 21, dtype=torch.int32)
        seq_idx[:, prefix:] = 1
        packed = model(ids, seq_idx=seq_idx)
        alone = torch.cat([model(ids[:, :prefix]), model(ids[:, prefix:])], dim=1)
        assert (packed - alone).abs().max().item() <= 1e-6
