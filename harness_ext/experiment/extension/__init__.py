"""``needles experiment`` with a context extension: three variants (base, training-free, finetuned) by length."""
