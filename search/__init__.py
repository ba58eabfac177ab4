"""search: training-free architecture search and distillation (see the search issue)."""
