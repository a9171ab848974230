"""Sampled replies to eval prompts at each evaluation (`--eval_generations N`): what people look at to judge a
chat model, beside the eval loss.

The prompts are the first N eval examples cut where their first trained token starts (the context of the
first trained reply, exactly as the model sees it), and the reference is that reply. Every rank generates
(under FSDP the forward is a collective), inside a forked RNG seeded by the step, so that sampling neither
changes the training's random stream (a resumed run stays identical) nor differs between ranks. The main
process prints each sample, appends it to `output_dir/generations.jsonl`, and hands the table to the reporting
integrations that take text: TensorBoard (`add_text`), Weights & Biases (`wandb.Table`), MLflow (`log_text`).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from chatsft.collate import IGNORE_INDEX
from chatsft.training.generate import generate_ids

TEMPERATURE = 0.7  # a sample as a chat user would get it, not the greedy reply


def prompt_and_reference(example: dict) -> tuple[list[int], list[int]] | None:
    """The ids before the first trained token, and the trained run that follows; None if nothing trains."""
    labels = list(example["labels"])
    ids = list(example["input_ids"])
    start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if start is None or start == 0:
        return None
    end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
    return ids[:start], ids[start:end]


class EvalGenerations(TrainerCallback):
    def __init__(self, trainer, tokenizer, dataset, *, count: int, stop_ids, max_new_tokens: int):
        self.handler = trainer.callback_handler
        self.tokenizer = tokenizer
        self.stop_ids = list(stop_ids)
        self.max_new_tokens = max_new_tokens
        self.prompts = []
        for i in range(len(dataset)):
            if len(self.prompts) == count:
                break
            pair = prompt_and_reference(dataset[i])
            if pair is not None:
                self.prompts.append(pair)

    @classmethod
    def install(cls, trainer, tokenizer, dataset, **kwargs) -> EvalGenerations:
        callback = cls(trainer, tokenizer, dataset, **kwargs)
        trainer.add_callback(callback)
        return callback

    def sample(self, model, seed: int) -> list[dict]:
        import torch

        training = model.training
        model.eval()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        rows = []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                for prompt, reference in self.prompts:
                    new = generate_ids(
                        model,
                        prompt,
                        stop_ids=self.stop_ids,
                        pad_id=self.tokenizer.pad_token_id,
                        max_new_tokens=self.max_new_tokens,
                        temperature=TEMPERATURE,
                    )
                    decode = self.tokenizer.decode
                    rows.append(
                        {
                            "prompt": decode(prompt, skip_special_tokens=False),
                            "completion": decode(new, skip_special_tokens=True).strip(),
                            "reference": decode(reference, skip_special_tokens=True).strip(),
                        }
                    )
        finally:
            model.train(training)
        return rows

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if model is None or not self.prompts:
            return
        step = state.global_step
        rows = [{"step": step, **row} for row in self.sample(model, args.seed + step)]
        if not state.is_world_process_zero:
            return
        from tqdm.auto import tqdm

        for i, row in enumerate(rows, 1):
            tail = row["prompt"][-60:].replace("\n", "\\n")
            head = f"[chatsft] eval generation {i}/{len(rows)} at step {step}"
            tqdm.write(f"{head}: ...{tail!r} -> {row['completion']!r}")
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "generations.jsonl", "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.report(rows, step)

    def report(self, rows: list[dict], step: int) -> None:
        """Send the table to the active integrations that take text (the others keep generations.jsonl)."""
        names = {type(c).__name__: c for c in self.handler.callbacks}
        columns = ["step", "prompt", "completion", "reference"]
        tensorboard = names.get("TensorBoardCallback")
        if tensorboard is not None and getattr(tensorboard, "tb_writer", None) is not None:
            table = "| prompt | completion | reference |\n|---|---|---|\n" + "\n".join(
                "| " + " | ".join(r[c].replace("|", "\\|").replace("\n", "<br>") for c in columns[1:]) + " |"
                for r in rows
            )
            tensorboard.tb_writer.add_text("eval/generations", table, step)
        wandb = names.get("WandbCallback")
        if wandb is not None and getattr(wandb, "_wandb", None) is not None and wandb._wandb.run is not None:
            table = wandb._wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
            wandb._wandb.log({"eval/generations": table, "train/global_step": step})
        mlflow = names.get("MLflowCallback")
        if mlflow is not None and getattr(mlflow, "_initialized", False):
            mlflow._ml_flow.log_text(
                "\n".join(json.dumps(r, ensure_ascii=False) for r in rows), f"generations/step_{step}.jsonl"
            )
