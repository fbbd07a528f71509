"""Model-family seams: one module per family (load, encode, rotary embeddings, save LoRA)."""
