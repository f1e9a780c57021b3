"""Resolved, validated layout objects: what every module of the model is built from.

A `Layout` is produced once by `hybrid.layout.load_layout` (YAML/omegaconf -> validation -> resolution) and
flows down unchanged; modules read only their own spec. Every field is concrete here: no `None` meaning
"use the default", no derived quantity left to compute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from .errors import UserError

MIXERS = ("mamba1", "mamba2", "attention", "none")
ATTENTION_KINDS = ("global", "local", "sparse")
MLP_KINDS = ("swiglu", "moe", "none")
ROUTERS = ("softmax", "sigmoid")


class LayoutError(UserError):
    """A layout the user wrote is invalid. The message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class ModelSpec:
    d_model: int
    vocab_size: int
    norm_eps: float
    tie_embeddings: bool
    init_std: float        # std of the normal init of embeddings and linear layers
    max_seq_len: int       # training context; the budget report counts global attention at this length


@dataclass(frozen=True)
class Mamba1Spec:
    d_model: int
    d_inner: int           # expand * d_model
    d_state: int
    d_conv: int
    dt_rank: int
    dt_min: float
    dt_max: float
    dt_init_floor: float
    conv_bias: bool
    bias: bool             # bias of in_proj / out_proj
    dt_bc_norm: bool       # RMSNorm (own weight, eps model.norm_eps) of dt_low, B and C after x_proj (Jamba)


@dataclass(frozen=True)
class Mamba2Spec:
    d_model: int
    d_inner: int           # expand * d_model
    d_state: int
    d_conv: int
    headdim: int
    nheads: int            # d_inner // headdim
    ngroups: int           # B/C groups shared by nheads // ngroups heads each
    chunk_size: int
    dt_min: float
    dt_max: float
    dt_init_floor: float
    dt_limit: tuple        # (lo, hi) clamp of dt after softplus; (0.0, inf) = no clamp
    conv_bias: bool
    bias: bool

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state


@dataclass(frozen=True)
class AttentionSpec:
    """Causal self-attention. Which key j a query i (both positions within one document) may see:
    global: j <= i.  local: 0 <= i - j < window.
    sparse: j <= i and (i - j < window or j < sinks or (stride > 0 and (j + 1) % stride == 0)).
    """
    d_model: int
    kind: str              # global | local | sparse
    n_heads: int
    n_kv_heads: int
    head_dim: int
    window: int            # 0 for global
    sinks: int             # sparse only (0 otherwise)
    stride: int            # sparse only (0 = no strided keys)
    rope: bool
    rope_theta: float
    qkv_bias: bool


@dataclass(frozen=True)
class MlpSpec:
    d_model: int
    kind: str              # swiglu
    d_ff: int


@dataclass(frozen=True)
class MoeSpec:
    """A mixture of SwiGLU experts (hybrid/moe.py): a router picks top_k of n_experts per token, whose outputs are
    summed with the router's weights; n_shared_experts more experts see every token."""
    d_model: int
    kind: str              # moe
    d_ff: int              # of each expert (routed and shared)
    n_experts: int
    top_k: int
    n_shared_experts: int  # 0 = none
    router: str            # softmax: softmax, then top-k (Mixtral, Jamba); sigmoid: sigmoid, then top-k (DeepSeek-V3)
    norm_topk_prob: bool   # renormalize the chosen k weights to sum to 1
    capacity_factor: float   # 0.0 = dropless; > 0: ceil(cf * tokens * top_k / n_experts) per expert, in training
    aux_loss_weight: float   # weight of the load-balancing loss n_experts * sum_e f_e * P_e
    z_loss_weight: float     # weight of the router z-loss mean(logsumexp(logits) ** 2)


MixerSpec = Union[Mamba1Spec, Mamba2Spec, AttentionSpec]


@dataclass(frozen=True)
class LayerSpec:
    index: int
    mixer: str                      # one of MIXERS; "none" = an MLP-only layer
    mamba1: Optional[Mamba1Spec] = None
    mamba2: Optional[Mamba2Spec] = None
    attention: Optional[AttentionSpec] = None
    mlp: Optional[Union[MlpSpec, MoeSpec]] = None   # None = no MLP after the mixer

    @property
    def mixer_spec(self) -> Optional[MixerSpec]:
        return None if self.mixer == "none" else getattr(self, self.mixer)

    @property
    def code(self) -> str:
        """Short name used in tables: M1, M2, Ag, Aw, As, F (MLP-only)."""
        if self.mixer == "attention":
            return {"global": "Ag", "local": "Aw", "sparse": "As"}[self.attention.kind]
        return {"mamba1": "M1", "mamba2": "M2", "none": "F"}[self.mixer]


@dataclass(frozen=True)
class Layout:
    name: str
    model: ModelSpec
    layers: tuple   # tuple[LayerSpec, ...]

    @property
    def n_layers(self) -> int:
        return len(self.layers)
