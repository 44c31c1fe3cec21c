"""lm-eval mechanics: task registration, the length guard, the task base class, vLLM-on-CPU glue, the lm_eval runner."""
