"""BraidConfig: the Hugging Face config of an exported braidlm hybrid. Self-contained (copied into every
exported model directory): `layout` holds the full explicit layout (`hybrid.layout.layout_to_dict`), the
single source of truth; the usual transformers fields are derived from it."""
try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as PreTrainedConfig

LAYER_KINDS = ("mamba1", "mamba2", "attention", "none")
MLP_KINDS = ("swiglu", "moe", "none")
ROUTERS = ("softmax", "sigmoid")


class BraidConfig(PreTrainedConfig):
    model_type = "braidlm"

    def __init__(self, layout=None, pad_token_id=0, bos_token_id=2, eos_token_id=3, use_cache=True, **kwargs):
        layout = layout or {"name": "empty", "model": {"d_model": 1, "vocab_size": 1, "norm_eps": 1e-5,
                                                        "tie_embeddings": True}, "layers": []}
        for i, layer in enumerate(layout.get("layers", [])):
            if layer.get("mixer") not in LAYER_KINDS:
                raise ValueError(f"config.json: layout.layers.{i}.mixer: unknown block kind {layer.get('mixer')!r} "
                                 f"(allowed: {', '.join(LAYER_KINDS)})")
            if layer.get("mlp", "swiglu") not in MLP_KINDS:
                raise ValueError(f"config.json: layout.layers.{i}.mlp: unknown MLP kind {layer.get('mlp')!r} "
                                 f"(allowed: {', '.join(MLP_KINDS)})")
            if layer.get("mlp") == "moe" and layer.get("router", "softmax") not in ROUTERS:
                raise ValueError(f"config.json: layout.layers.{i}.router: unknown router {layer.get('router')!r} "
                                 f"(allowed: {', '.join(ROUTERS)})")
        self.layout = layout
        model = layout["model"]
        self.hidden_size = model["d_model"]
        self.vocab_size = model["vocab_size"]
        self.num_hidden_layers = len(layout["layers"])
        self.rms_norm_eps = model["norm_eps"]
        self.use_cache = use_cache
        kwargs["tie_word_embeddings"] = bool(model.get("tie_embeddings", True))
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
