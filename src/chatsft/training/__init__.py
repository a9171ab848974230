"""The training floor: everything that needs a model (loading, LoRA, loss, the Trainer, checkpoints, the final
save, distributed set-up, pre-flight checks, plots). Imports the pipeline library below it, never the
commands."""
