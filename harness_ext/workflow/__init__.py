"""What every workflow (experiment, study, scorecard) builds on: the resumable step runner, the suite spec, the
data step, the finetune config of a suite, cost estimates, MDE planning and the paired per-task statistics."""
