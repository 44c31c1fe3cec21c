"""``needles study``: finetune variants side by side, each scored against the base model, with head analyses."""
