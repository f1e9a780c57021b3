"""HybridLM: embedding -> N x Block -> RMSNorm -> LM head, built from a resolved `Layout`.

Block = pre-norm residual: h += mixer(norm(h)); h += mlp(norm(h)). The mixer (Mamba1, Mamba2, Attention,
or none for an MLP-only layer) and the MLP (SwiGLU or a mixture of experts) are picked by the small tables MIXERS
and MLPS. In training, the loss of a layout with MoE layers includes their weighted router losses
(hybrid/moe.py), and `moe_stats` holds what the training loop logs of them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from kernels import ops

from .attention import Attention
from .cache import HybridCache
from .mamba1 import Mamba1
from .mamba2 import Mamba2
from .mlp import SwiGLU
from .moe import MoE
from .norm import ResidualRMSNorm
from .projections import norm_project
from .spec import LayerSpec, Layout

MIXERS = {"mamba1": Mamba1, "mamba2": Mamba2, "attention": Attention}
MLPS = {"swiglu": SwiGLU, "moe": MoE}


class LMHead(nn.Linear):
    """The output projection (vocab_size x d_model, no bias). Called with targets it returns the mean
    next-token loss straight from the hidden states (`ops.linear_cross_entropy`: on the GPU no (tokens, vocab)
    logits are kept). A module call either way, so DeepSpeed ZeRO-3 gathers its weight for it."""

    def forward(self, h: torch.Tensor, targets: Optional[torch.Tensor] = None, ignore_index: int = -100):
        if targets is None:
            return super().forward(h)
        return ops.linear_cross_entropy(h, self.weight, targets, ignore_index=ignore_index)


class Block(nn.Module):
    """h += mixer(norm(h)); h += mlp(norm(h)), with each add deferred into the norm that follows it: the block
    maps (residual, delta) -> (residual, delta) where the stream is residual + delta (delta None: residual)."""

    def __init__(self, spec: LayerSpec, norm_eps: float):
        super().__init__()
        self.spec = spec
        if spec.mixer != "none":
            self.mixer_norm = ResidualRMSNorm(spec.mixer_spec.d_model, norm_eps)
            self.mixer = MIXERS[spec.mixer](spec.mixer_spec, spec.index, norm_eps)
        if spec.mlp is not None:
            self.mlp_norm = ResidualRMSNorm(spec.mlp.d_model, norm_eps)
            self.mlp = MLPS[spec.mlp.kind](spec.mlp)

    def forward(self, residual, delta=None, cache: Optional[HybridCache] = None, seq_idx=None):
        # norm_project: in a decode step the norm and the module's first projections are one launch
        if self.spec.mixer != "none":
            x, residual, pre = norm_project(self.mixer_norm, self.mixer, residual, delta)
            delta = self.mixer(x, cache=cache, seq_idx=seq_idx, **({} if pre is None else {"projected": pre}))
        if self.spec.mlp is not None:
            x, residual, pre = norm_project(self.mlp_norm, self.mlp, residual, delta)
            delta = self.mlp(x, **({} if pre is None else {"projected": pre}))
        return residual, delta


def seq_idx_from_attention_mask(attention_mask: torch.Tensor) -> Optional[torch.Tensor]:
    """Left padding as a packed row: the pad tokens form document 0 and the real tokens document 1, so every
    layer keeps them apart (state resets, attention masks, positions restart at 0 on the first real token).
    attention_mask: (batch, seqlen) 1 = token, 0 = left pad. Returns None when there is no padding."""
    mask = attention_mask.to(torch.bool)
    if bool(mask.all()):
        return None
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask: only left padding is supported (zeros, then ones, in every row)")
    if not bool(mask[:, -1].all()):
        raise ValueError("attention_mask: every row needs at least one real token (a 1 in its last position)")
    return mask.to(torch.int32)


class HybridLM(nn.Module):
    def __init__(self, layout: Layout):
        super().__init__()
        self.layout = layout
        m = layout.model
        self.embed = nn.Embedding(m.vocab_size, m.d_model)
        self.blocks = nn.ModuleList(Block(spec, m.norm_eps) for spec in layout.layers)
        self.norm = ResidualRMSNorm(m.d_model, m.norm_eps)
        self.lm_head = LMHead(m.d_model, m.vocab_size, bias=False)
        if m.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.activation_checkpointing = False  # per block, in training (set by train.py's train.activation_checkpointing)
        # after a training forward with targets, when the layout has MoE layers: (moe_aux, moe_z, moe_dropped, the
        # weighted loss added), fp32 and detached; aux and z are means over the MoE layers, dropped too
        self.moe_stats: Optional[torch.Tensor] = None
        self.reset_parameters()

    def keep_fp32_ssm_params(self, keep: bool) -> None:
        """Whether A_log / D / dt_bias stay fp32 when the model is cast (default True). DeepSpeed ZeRO-3 needs one
        dtype for all parameters: there they are stored in bf16 (fp32 master copies live in the optimizer) and
        still upcast to fp32 for every SSM computation."""
        for mod in self.modules():
            if hasattr(mod, "keep_fp32"):
                mod.keep_fp32 = keep

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for embeddings and projections; the projections that write into the residual
        stream (out_proj, o_proj, down_proj) are scaled by 1/sqrt(2 * n_layers) as in GPT-2. Mamba's own
        parameters (A_log, D, dt_bias, conv) keep the initialization their modules give them."""
        std = self.layout.model.init_std
        nn.init.normal_(self.embed.weight, std=std)
        residual_std = std / math.sqrt(2 * max(1, self.layout.n_layers))
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear) and mod is not self.lm_head:
                writes_residual = name.endswith(("out_proj", "o_proj", "down_proj"))
                nn.init.normal_(mod.weight, std=residual_std if writes_residual else std)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, MoE):  # the stacked expert weights (its router and shared experts are Linear)
                mod.reset_parameters(std, residual_std)
        if not self.layout.model.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)

    def allocate_cache(self, batch: int, max_len: int, dtype=None, device=None) -> HybridCache:
        """A cache for `batch` sequences of up to `max_len` tokens, in the model's dtype and device."""
        p = self.embed.weight
        return HybridCache.allocate(self.layout, batch, max_len, dtype or p.dtype, device or p.device)

    def forward(self, input_ids: torch.Tensor, *, cache: Optional[HybridCache] = None,
                seq_idx: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                last_only: bool = False, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits for every token (or only the last one); with `targets`, the training loss instead.

        input_ids: (batch, seqlen) int64. seq_idx: (batch, seqlen) non-decreasing document ids of packed rows.
        attention_mask: (batch, seqlen) 1/0 for left-padded rows (turned into seq_idx). With a cache, the call
        continues each row's cached sequence (prefill when the cache is empty, one token = a decode step) and
        leaves the cache holding the state at the end of each row's last document.
        targets: (batch, seqlen) next-token ids, -100 where no loss is taken: returns the fp32 mean cross entropy
        (`lm_loss` of the logits, computed without keeping them on the GPU); in training mode plus the MoE layers'
        weighted router losses (see `moe_stats`).
        Returns (batch, seqlen or 1, vocab_size) logits, or the loss.
        """
        if targets is not None and (cache is not None or last_only):
            raise ValueError("targets (the training loss) cannot be combined with a cache or last_only")
        if attention_mask is not None:
            if seq_idx is not None:
                raise ValueError("pass either seq_idx (packed documents) or attention_mask (left padding), not both")
            seq_idx = seq_idx_from_attention_mask(attention_mask)
        b, t = input_ids.shape
        if cache is not None:
            if cache.batch != b:
                raise ValueError(f"cache holds {cache.batch} sequences, input has {b}")
            cache.fresh = False
            if t > 1:  # a prefill: one host read of the longest cached row (decode steps read nothing)
                longest = int(cache.seqlens.max())
                if longest + t > cache.max_len:
                    raise ValueError(f"{t} tokens after {longest} cached exceed max_len={cache.max_len}")
                cache.fresh = longest == 0
        residual, delta = self.embed(input_ids), None  # the residual stream is residual + delta
        recompute = self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        if cache is not None:
            cache.call = {}  # this call's scratch, shared by its layers
        try:
            for block in self.blocks:
                if recompute:  # keep only each block's inputs; its activations are recomputed in backward
                    residual, delta = torch.utils.checkpoint.checkpoint(block, residual, delta, seq_idx=seq_idx,
                                                                        use_reentrant=False)
                else:
                    residual, delta = block(residual, delta, cache=cache, seq_idx=seq_idx)
        finally:
            if cache is not None:
                cache.call = None
        if cache is not None:
            self._advance(cache, seq_idx, t)
        if last_only:
            residual, delta = residual[:, -1:], None if delta is None else delta[:, -1:]
        h, _ = self.norm(residual, delta)
        if targets is None:
            return self.lm_head(h)
        loss = self.lm_head(h, targets)
        return self._add_moe_losses(loss) if self.training else loss

    def _add_moe_losses(self, loss: torch.Tensor) -> torch.Tensor:
        """loss + sum over MoE layers of aux_loss_weight * aux + z_loss_weight * z; records `moe_stats`."""
        layers = [m for m in self.modules() if isinstance(m, MoE) and m.stats is not None]
        if not layers:
            self.moe_stats = None
            return loss
        added = sum(m.spec.aux_loss_weight * m.stats.aux + m.spec.z_loss_weight * m.stats.z for m in layers)
        mean = lambda values: torch.stack(values).float().mean()
        self.moe_stats = torch.stack([mean([m.stats.aux for m in layers]), mean([m.stats.z for m in layers]),
                                      mean([m.stats.dropped for m in layers]), added.float()]).detach()
        return loss + added

    @staticmethod
    def _advance(cache: HybridCache, seq_idx: Optional[torch.Tensor], t: int) -> None:
        if seq_idx is None:
            cache.seqlens += t
            return
        last_doc_len = (seq_idx == seq_idx[:, -1:]).sum(dim=1)
        single_doc = seq_idx[:, 0] == seq_idx[:, -1]
        cache.seqlens.copy_(torch.where(single_doc, cache.seqlens + t, last_doc_len))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross entropy. logits (batch, seqlen, vocab); targets (batch, seqlen), ignore_index
    where no loss is taken (e.g. the last token of each document in a packed row)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)
