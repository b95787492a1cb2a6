"""Training a built run: the `Trainer` and its step, optimizers and schedules, the objective,
evaluation, and what training measures on the way (the curvature probe)."""
