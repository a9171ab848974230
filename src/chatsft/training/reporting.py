"""Where a run's numbers go: the reporting integrations (`--report_to`), the printed logs, the summary.

`check_report_to` runs while the arguments are parsed, so that a missing `tensorboard` or `wandb` package is
one line naming the pip extra (`pip install 'chatsft[wandb]'`) instead of a traceback after the data and the
model have loaded. `install_log_printer` replaces the Trainer's log printers, which print every value as a
quoted string (`'loss': '6.927'`), by ones that print numbers, written through tqdm so that a line never lands
inside the progress bar. `run_summary` names both losses at the end (the run's average, HF's `training_loss`,
and the last logged one) and evaluates at the end only when the Trainer has not just done so at the last step.
"""

from __future__ import annotations

import importlib.util

from transformers.trainer_callback import PrinterCallback, ProgressCallback

from chatsft.errors import ConfigError

# --report_to name -> (importable modules, any of which will do; what to pip install)
INTEGRATIONS = {
    "tensorboard": (("tensorboard", "tensorboardX"), "'chatsft[tensorboard]'"),
    "wandb": (("wandb",), "'chatsft[wandb]'"),
    "mlflow": (("mlflow",), "'chatsft[mlflow]'"),
    "trackio": (("trackio",), "trackio"),
    "comet_ml": (("comet_ml",), "comet_ml"),
    "clearml": (("clearml",), "clearml"),
    "neptune": (("neptune",), "neptune"),
    "dvclive": (("dvclive",), "dvclive"),
    "codecarbon": (("codecarbon",), "codecarbon"),
    "swanlab": (("swanlab",), "swanlab"),
    "azure_ml": (("azureml",), "azureml-core"),
}


def check_report_to(report_to) -> None:
    """Raise `ConfigError` naming the pip package of every `--report_to` integration that is not installed."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    missing = []
    for name in names:
        if name in ("none", "all") or name not in INTEGRATIONS:
            continue  # transformers itself rejects unknown names; "all" means the installed ones
        modules, package = INTEGRATIONS[name]
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            missing.append((name, package))
    if missing:
        raise ConfigError(
            "--report_to "
            + ", ".join(name for name, _ in missing)
            + " needs a package that is not installed: pip install "
            + " ".join(package for _, package in missing)
            + " (or --report_to none)"
        )


def format_logs(logs: dict) -> str:
    """The logged dict with floats at 4 significant digits, as numbers: `{'loss': 6.927, 'epoch': 0.4}`."""
    shown = {}
    for key, value in logs.items():
        if key == "total_flos":
            continue
        if isinstance(value, float):
            value = float(f"{value:.4g}")
            value = int(value) if value.is_integer() and abs(value) < 1e15 else value
        shown[key] = value
    return str(shown)


class NumberProgressCallback(ProgressCallback):
    """The progress bar, with logs printed as numbers above it (through `tqdm.write`)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(format_logs(logs))


class NumberPrinterCallback(PrinterCallback):
    """Logs printed as numbers, one line each (`--disable_tqdm True`)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs:
            print(format_logs(logs), flush=True)


def install_log_printer(trainer) -> None:
    """Swap the Trainer's log printer (progress bar or plain printer) for one printing numbers, in place."""
    callbacks = trainer.callback_handler.callbacks
    for i, callback in enumerate(callbacks):
        if type(callback) is ProgressCallback:
            callbacks[i] = NumberProgressCallback(max_str_len=callback.max_str_len)
        elif type(callback) is PrinterCallback:
            callbacks[i] = NumberPrinterCallback()


def run_summary(trainer, result, evaluate: bool) -> list[str]:
    """What a finished run says: the average and the last logged train loss, named; the final eval loss.

    HF's `training_loss` is the average over the steps of this launch (0.94 in the demo while the last logged
    loss was 0.07), so a resumed launch says how many steps that is.
    With an eval set, the final eval loss is the one logged at the last step when the Trainer evaluated there
    (`--eval_strategy steps` landing on it, or `epoch`), else one evaluation now.
    """
    history = trainer.state.log_history
    step = trainer.state.global_step
    last = next((e for e in reversed(history) if "loss" in e), None)
    # HF averages over the steps of this launch: after a resume that is not the run's average, and a launch
    # resumed at the last step trains none (its "average" would be 0.0)
    trained = step - getattr(trainer, "_initial_global_step", 0)
    line = f"training done: {step} steps"
    if trained == 0:
        line += f", none left to train in this launch (resumed at step {step})"
    elif trained < step:
        line += f" ({trained} in this launch), average train loss {result.training_loss:.4f} over them"
    else:
        line += f", average train loss {result.training_loss:.4f}"
    if last is not None:
        line += f", last logged train loss {last['loss']:.4f} (step {last.get('step', step)})"
    lines = [line]
    if evaluate:
        logged = next((e for e in reversed(history) if "eval_loss" in e), None)
        if logged is None or logged.get("step") != step:
            logged = trainer.evaluate()
        lines.append(f"eval loss {logged.get('eval_loss', float('nan')):.4f} (step {step})")
    return lines
