"""The task families as a library: generators, token budgets, datasets, prompts and scorers (kv_tasks/ holds only the lm-eval glue)."""
