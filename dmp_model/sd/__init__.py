"""Stable Diffusion 1.x through diffusers, peft and transformers: DMPModel, loading, LoRA, denoiser, text, tiny models.

The only part of dmp_model that imports those model libraries."""
