"""Hugging Face side of the export (hybrid/export.py).

configuration_braid.py, modeling_braid.py and tokenization_braid.py are copied into every exported model
directory and loaded there by transformers with trust_remote_code: they must never import `hybrid` (and only
optionally `kernels`). native.py maps layouts onto transformers' own architectures (Llama, Mamba2, Bamba).
"""
