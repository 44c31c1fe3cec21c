"""Workflows that chain the layers below: score -> finetune -> score -> paired comparison."""
