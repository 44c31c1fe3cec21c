"""Finetuning on synthetic data: config, training data, the LoRA/full recipe, OpenAI export."""
