"""``needles experiment`` (score -> finetune -> score -> paired verdict), its context-extension form
(:mod:`harness_ext.experiment.extension`) and the finetune loop of ``needles finetune --loop``."""
