"""Built-in stages; importing this package registers them (see slimline.stage)."""

from slimline.stages import evaluate, export, profile, prune, train  # noqa: F401
