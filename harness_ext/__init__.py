"""lm-eval-needles: everything that extends lm-eval, in layers that import downwards only.

core < data < tasklib, plugin < finetune | heads | reporting < workflow < experiment | study | scorecard < cli
(enforced by ``lint-imports``, see pyproject.toml). kv_tasks/ (the lm-eval task folders) sits beside this
package and only glues tasklib to lm-eval; nothing here imports it.
"""
