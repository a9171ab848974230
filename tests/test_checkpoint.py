"""Checkpoints and the final save, on a tiny Llama trained for real by the HF Trainer on CPU."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from chatsft.errors import ConfigError
from chatsft.training import checkpoint as ck
from chatsft.training import final as fin
from chatsft.training.plot import plot_loss

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
MESSAGES = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]
TEXT = "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _tokenizer():
    from chatsft.training.tiny import build_tokenizer

    return build_tokenizer(["hello there, how are you? user assistant system"] * 10, vocab_size=300)


def _trainer(tok, out: Path, max_steps: int = 10, model=None, callbacks=(), save_total_limit=None, **extra):
    import torch
    from transformers import Trainer, TrainingArguments

    from chatsft.training.tiny import build_model

    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(8):
        ids = torch.randint(10, len(tok), (12,), generator=g)
        data.append({"input_ids": ids, "labels": ids.clone()})
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=2,
        max_steps=max_steps,
        save_steps=2,
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        save_total_limit=save_total_limit,
        **{"learning_rate": 1e-3, **extra},
    )
    marker = ck.CheckpointMarker()
    model = model if model is not None else build_model(tok, hidden_size=32, layers=1, heads=2)
    evaluation = data[:4] if args.eval_strategy != "no" else None
    return Trainer(
        model=model, args=args, train_dataset=data, eval_dataset=evaluation, callbacks=[marker, *callbacks]
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 10-step run with a checkpoint every 2 steps: checkpoint-2 ... checkpoint-10, all marked."""
    tok = _tokenizer()
    out = tmp_path_factory.mktemp("run") / "out"
    trainer = _trainer(tok, out)
    trainer.train()
    return out, trainer, tok


@pytest.fixture()
def run_copy(trained, tmp_path):
    out, _, _ = trained
    dest = tmp_path / "out"
    shutil.copytree(out, dest)
    return dest


def _complete_folder(path: Path, step: int) -> None:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({"w": torch.zeros(3)}, str(path / "model.safetensors"))
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    ck.write_marker(path, step)


# ---- which checkpoint to resume from -----------------------------------------------------------------------


def test_every_checkpoint_is_marked_and_the_newest_is_chosen_in_numeric_order(trained):
    out, _, _ = trained
    names = sorted(p.name for p in out.glob("checkpoint-*"))
    assert names == ["checkpoint-10", "checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]
    for name in names:
        assert (out / name / ck.MARKER_NAME).is_file()
        assert ck.checkpoint_problem(out / name) is None
    assert ck.find_resume_checkpoint(out) == (out / "checkpoint-10", [])  # lexically, checkpoint-8 is last
    listed = json.loads((out / "checkpoint-10" / ck.MARKER_NAME).read_text())["files"]
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert name in listed


def test_the_safetensors_check_reads_only_the_header(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(4), "b": torch.zeros(2, 3)}, str(path))
    assert ck.safetensors_problem(path) is None
    whole = path.read_bytes()
    for damaged, reason in [
        (whole[:-1], "but its header describes"),
        (whole[:20], "cut off inside its header"),
        (whole[:4], "shorter than a safetensors header"),
        (whole[:8] + b"x" * (len(whole) - 8), "unreadable header"),
    ]:
        path.write_bytes(damaged)
        assert reason in ck.safetensors_problem(path)


def test_checkpoint_10_comes_after_checkpoint_9(tmp_path):
    for step in (1, 9, 10):
        _complete_folder(tmp_path / f"checkpoint-{step}", step)
    assert ck.find_resume_checkpoint(tmp_path) == (tmp_path / "checkpoint-10", [])


def test_no_output_dir_or_no_checkpoint_means_start_fresh(tmp_path):
    assert ck.find_resume_checkpoint(tmp_path / "missing") == (None, [])
    assert ck.find_resume_checkpoint(tmp_path) == (None, [])
    assert ck.choose_resume(tmp_path) == (None, [])


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGES = {
    "marker missing": (lambda c: (c / ck.MARKER_NAME).unlink(), "chatsft-complete.json"),
    "weights truncated": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors"),
    "trainer state missing": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "optimizer truncated": (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_is_skipped_with_a_notice(run_copy, damage):
    harm, reason = DAMAGES[damage]
    harm(run_copy / "checkpoint-10")
    path, notices = ck.find_resume_checkpoint(run_copy)
    assert path == run_copy / "checkpoint-8"
    assert len(notices) == 1 and "checkpoint-10" in notices[0] and reason in notices[0]
    assert ck.choose_resume(run_copy) == (str(run_copy / "checkpoint-8"), notices)
    if damage == "marker missing":  # asked for by name, a whole checkpoint without a marker is adopted
        path, notices = ck.choose_resume(run_copy, str(run_copy / "checkpoint-10"))
        assert path == str(run_copy / "checkpoint-10") and "chatsft did not mark complete" in notices[0]
        return
    with pytest.raises(ConfigError, match=reason.replace(".", r"\.")):
        ck.choose_resume(run_copy, str(run_copy / "checkpoint-10"))


def test_a_marker_whose_step_disagrees_with_trainer_state_voids_the_checkpoint(run_copy):
    state = json.loads((run_copy / "checkpoint-10" / "trainer_state.json").read_text())
    state["global_step"] = 9
    (run_copy / "checkpoint-10" / "trainer_state.json").write_text(json.dumps(state))
    assert "step 9" in ck.checkpoint_problem(run_copy / "checkpoint-10")


def test_explicit_and_overwrite_choices(run_copy):
    assert ck.choose_resume(run_copy, str(run_copy / "checkpoint-4")) == (str(run_copy / "checkpoint-4"), [])
    assert ck.choose_resume(run_copy, overwrite_output_dir=True) == (None, [])
    assert ck.choose_resume(run_copy, resume_from_checkpoint=False) == (None, [])
    with pytest.raises(ConfigError, match="not a folder"):
        ck.validate_checkpoint(run_copy / "checkpoint-99")


def test_unmarked_whole_checkpoints_stop_a_fresh_start_and_can_be_adopted(run_copy):
    """A FastChat (or any HF Trainer) run continued with chatsft: its checkpoints have no marker."""
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8", "checkpoint-10"):
        (run_copy / name / ck.MARKER_NAME).unlink()
    with pytest.raises(ConfigError) as err:
        ck.choose_resume(run_copy)
    assert str(err.value) == (
        f"{run_copy} holds checkpoint-10, which chatsft did not mark complete (FastChat or another HF "
        "Trainer tool wrote it, or a chatsft save was cut off at its very end), and its files look whole. "
        f"To continue from it: --resume_from_checkpoint {run_copy / 'checkpoint-10'}. To start over (new "
        "checkpoints will replace it): --overwrite_output_dir."
    )
    assert ck.choose_resume(run_copy, overwrite_output_dir=True) == (None, [])
    resume, notices = ck.choose_resume(run_copy, str(run_copy / "checkpoint-10"))
    assert resume == str(run_copy / "checkpoint-10") and len(notices) == 1
    # cut off ones are not whole: skipped, and with none whole left training starts from the beginning
    _truncate(run_copy / "checkpoint-10" / "optimizer.pt")
    assert ck.unmarked_checkpoint_problem(run_copy / "checkpoint-10") == (
        "optimizer.pt is not a whole torch file (cut off?)"
    )
    with pytest.raises(
        ConfigError, match="it has no chatsft-complete.json and optimizer.pt is not a whole torch"
    ):
        ck.choose_resume(run_copy, str(run_copy / "checkpoint-10"))
    with pytest.raises(ConfigError, match="holds checkpoint-8,"):
        ck.choose_resume(run_copy)
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"):
        (run_copy / name / "trainer_state.json").unlink()
    assert ck.unmarked_checkpoint_problem(run_copy / "checkpoint-8") == "trainer_state.json is missing"
    path, notices = ck.choose_resume(run_copy)
    assert path is None and len(notices) == 6 and "from the beginning" in notices[-1]


def test_training_resumes_from_an_adopted_checkpoint_and_marks_the_next_ones(run_copy):
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8", "checkpoint-10"):
        (run_copy / name / ck.MARKER_NAME).unlink()
    shutil.rmtree(run_copy / "checkpoint-10")
    from transformers import TrainerCallback

    steps = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    resume, _ = ck.choose_resume(run_copy, str(run_copy / "checkpoint-6"))
    trainer = _trainer(_tokenizer(), run_copy, callbacks=[Steps()])
    trainer.train(resume_from_checkpoint=resume)
    assert steps == [7, 8, 9, 10]  # it went on from step 6
    assert ck.find_resume_checkpoint(run_copy)[0] == run_copy / "checkpoint-10"
    assert ck.checkpoint_problem(run_copy / "checkpoint-8") is None  # re-saved by chatsft, so marked


def test_resume_from_the_chosen_checkpoint_reaches_the_final_step_and_rotates(run_copy):
    _truncate(run_copy / "checkpoint-10" / "model.safetensors")
    resume, notices = ck.choose_resume(run_copy)
    assert resume == str(run_copy / "checkpoint-8") and len(notices) == 1
    trainer = _trainer(_tokenizer(), run_copy, save_total_limit=2)
    trainer.train(resume_from_checkpoint=resume)
    assert trainer.state.global_step == 10
    assert trainer.args.save_total_limit is None  # rotation taken over by CheckpointMarker
    assert sorted(p.name for p in run_copy.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-8"]
    assert ck.find_resume_checkpoint(run_copy) == (run_copy / "checkpoint-10", [])  # re-written and re-marked
    assert json.loads((run_copy / "checkpoint-10" / "trainer_state.json").read_text())["global_step"] == 10


def test_a_folder_about_to_be_overwritten_loses_its_marker_first(run_copy):
    from transformers import TrainerCallback

    seen = {}

    class Probe(TrainerCallback):  # runs after CheckpointMarker, before the Trainer re-saves checkpoint-8
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 8:
                seen["marker"] = (run_copy / "checkpoint-8" / ck.MARKER_NAME).exists()

    resume, _ = ck.choose_resume(run_copy, str(run_copy / "checkpoint-6"))
    trainer = _trainer(_tokenizer(), run_copy, max_steps=8, callbacks=[Probe()])
    trainer.train(resume_from_checkpoint=resume)
    assert seen == {"marker": False}
    assert ck.find_resume_checkpoint(run_copy) == (run_copy / "checkpoint-10", [])
    assert ck.checkpoint_problem(run_copy / "checkpoint-8") is None


def test_the_run_manifest_comes_before_anything_the_trainer_saves(tmp_path):
    """So a save cut off at any point, even right after the Trainer's last file, is this run's own: skipped
    and written again, never refused as another tool's."""
    from transformers import TrainerCallback

    seen = []

    class Probe(TrainerCallback):  # runs after CheckpointMarker, before the Trainer saves checkpoint-2
        def on_step_end(self, args, state, control, **kwargs):
            folder = tmp_path / "out" / f"checkpoint-{state.global_step}"
            seen.append(
                (state.global_step, sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None)
            )

    trainer = _trainer(_tokenizer(), tmp_path / "out", max_steps=3, callbacks=[Probe()])
    marker = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ck.CheckpointMarker))
    marker.manifest = {"run": "this one"}
    trainer.train()
    assert seen == [(1, None), (2, [ck.RUN_FILE]), (3, [ck.RUN_FILE])]  # the last step saves too
    assert json.loads((tmp_path / "out" / "checkpoint-2" / ck.RUN_FILE).read_text()) == {"run": "this one"}
    for name in ("checkpoint-2", "checkpoint-3"):  # cut off after the Trainer's files, before the marker
        (tmp_path / "out" / name / ck.MARKER_NAME).unlink()
    resume, notices = ck.choose_resume(tmp_path / "out")
    assert (
        resume is None and notices[-1] == "no complete checkpoint found: training starts from the beginning"
    )
    (
        tmp_path / "out" / "checkpoint-3" / ck.RUN_FILE
    ).unlink()  # what another tool's whole checkpoint looks like
    with pytest.raises(ConfigError, match="which chatsft did not mark complete"):
        ck.choose_resume(tmp_path / "out")


def test_a_best_checkpoint_gets_the_run_manifest_before_the_trainer_saves_it(tmp_path):
    """save_strategy "best": the save is decided after each evaluation; the manifest is there before the
    Trainer writes, for exactly the evaluations that save."""
    from transformers import TrainerCallback

    seen, losses = {}, []

    class Probe(TrainerCallback):  # runs after CheckpointMarker, before the Trainer decides and saves
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            folder = tmp_path / "out" / f"checkpoint-{state.global_step}"
            seen[state.global_step] = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
            losses.append(metrics["eval_loss"])

    # evaluated after every step at a learning rate of 1, the loss jumps about: new bests at steps 1, 6, 7, 8
    trainer = _trainer(
        _tokenizer(), tmp_path / "out", max_steps=8, callbacks=[Probe()], learning_rate=1.0,
        eval_strategy="steps", eval_steps=1, save_strategy="best", metric_for_best_model="loss",
    )  # fmt: skip
    marker = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ck.CheckpointMarker))
    marker.manifest = {"run": "this one"}
    trainer.train()
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "out").glob("checkpoint-*"))
    best = [step for step, loss in enumerate(losses, 1) if loss < min(losses[: step - 1], default=math.inf)]
    assert saved == best and 1 < len(best) < 8, losses
    assert seen == {step: [ck.RUN_FILE] if step in best else None for step in range(1, 9)}
    for step in best:
        folder = tmp_path / "out" / f"checkpoint-{step}"
        assert json.loads((folder / ck.RUN_FILE).read_text()) == {"run": "this one"}
        assert (folder / ck.MARKER_NAME).is_file()
    trainer.evaluate()  # outside training: nothing is written
    assert sorted(int(p.name.split("-")[1]) for p in (tmp_path / "out").glob("checkpoint-*")) == saved


def test_rotation_keeps_complete_checkpoints_and_newer_incomplete_ones(tmp_path):
    for step in (2, 4, 6):
        _complete_folder(tmp_path / f"checkpoint-{step}", step)
    (tmp_path / "checkpoint-1").mkdir()  # older and incomplete: garbage
    (tmp_path / "checkpoint-8").mkdir()  # newer and incomplete: a save in progress is never touched

    class State:
        best_model_checkpoint = str(tmp_path / "checkpoint-2")

    ck.CheckpointMarker(save_total_limit=1)._rotate(tmp_path, State())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-6", "checkpoint-8"]


# ---- the final save ----------------------------------------------------------------------------------------


def _stop_ids(tok):
    return [tok.convert_tokens_to_ids("<|im_end|>")]


def _save(trainer, tok, out, **kw):
    kw.setdefault("check_text", (MESSAGES, TEXT))
    return fin.save_final(trainer, tok, out, chat_template=TEMPLATE, stop_token_ids=_stop_ids(tok), **kw)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_save_final_writes_a_checked_model_that_transformers_loads(trained, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    _, trainer, tok = trained
    trainer.model.config.use_cache = False  # as gradient checkpointing leaves it
    try:
        out = _save(
            trainer,
            tok,
            tmp_path / "final",
            extra_files={"audit.json": json.dumps({"ok": 1}), "loss.png": PNG_SIGNATURE},
        )
    finally:
        trainer.model.config.use_cache = True
    assert out == tmp_path / "final"
    assert not (out / fin.FINAL_TMP_NAME).exists() and not list(out.glob(".*"))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.use_cache is True
    expected = trainer.model.state_dict()
    assert set(model.state_dict()) == set(expected)
    assert all(torch.equal(t, expected[k]) for k, t in model.state_dict().items())
    eos = GenerationConfig.from_pretrained(out).eos_token_id
    assert isinstance(eos, list) and set(_stop_ids(tok)) <= set(eos) and tok.eos_token_id in eos
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded.apply_chat_template(MESSAGES, tokenize=False) == TEXT
    assert tok.chat_template is None  # the caller's tokenizer is left as it was
    assert json.loads((out / "audit.json").read_text()) == {"ok": 1}
    assert (out / "loss.png").read_bytes() == PNG_SIGNATURE
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 10
    marker = json.loads((out / fin.FINAL_MARKER_NAME).read_text())
    assert "model.safetensors" in marker["files"] and "tokenizer_config.json" in marker["files"]


def test_a_failed_check_leaves_the_previous_final_model_untouched(trained, tmp_path, monkeypatch):
    _, trainer, tok = trained
    out = _save(trainer, tok, tmp_path / "final")
    before = _snapshot(out)
    with pytest.raises(ConfigError, match="renders a sample differently"):
        _save(trainer, tok, out, check_text=(MESSAGES, TEXT.replace("hello", "hullo")))
    assert _snapshot(out) == before

    def broken(*args, **kwargs):
        raise RuntimeError("tensor differs")

    monkeypatch.setattr(fin, "_compare_state_dicts", broken)
    with pytest.raises(RuntimeError, match="tensor differs"):
        _save(trainer, tok, out)
    assert _snapshot(out) == before
    assert not (out / fin.FINAL_TMP_NAME).exists()


def test_a_new_final_model_replaces_the_old_one_and_its_stale_weight_files(trained, tmp_path):
    _, trainer, tok = trained
    out = tmp_path / "final"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    (out / "model.safetensors.index.json").write_text("{}")
    shutil.copytree(trained[0] / "checkpoint-2", out / "checkpoint-2")
    _save(trainer, tok, out, extra_files={"old.txt": "x"})
    _save(trainer, tok, out)
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and "checkpoint-2" in names
    assert not names & {"model-00001-of-00002.safetensors", "model.safetensors.index.json", "old.txt"}
    assert ck.checkpoint_problem(out / "checkpoint-2") is None


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside peft
def test_a_peft_model_saves_its_adapter_and_a_verified_merged_model(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from chatsft.training.tiny import build_model

    tok = _tokenizer()
    peft_model = get_peft_model(
        build_model(tok, hidden_size=32, layers=1, heads=2),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    trainer = _trainer(tok, tmp_path / "run", model=peft_model)
    out = _save(trainer, tok, tmp_path / "final", merge=True)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / fin.MERGED_SUBDIR)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft_model(input_ids=ids).logits, atol=1e-5)
    assert hasattr(trainer.model, "peft_config")  # the trained model keeps its adapter


# ---- the loss curve ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_eval", [False, True])
def test_plot_loss_writes_a_png(tmp_path, with_eval):
    history = [{"loss": 3.0 - 0.1 * s, "step": s} for s in range(1, 11)]
    if with_eval:
        history += [{"eval_loss": 2.5, "step": 5}, {"eval_loss": 2.2, "step": 10}]
    history.append({"train_loss": 2.5, "step": 10})
    path = plot_loss(history, tmp_path / "plots" / "loss.png")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_plot_loss_with_no_points_never_touches_pyplot(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, chatsft.training.plot as p; assert 'matplotlib' not in sys.modules; "
        f"p.plot_loss([], {str(tmp_path / 'empty.png')!r}); assert 'matplotlib.pyplot' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "empty.png").read_bytes().startswith(PNG_SIGNATURE)


# ---- what the final check must not reject, and damage the checkpoint hashes must catch ------------------

REMOTE_CONFIG = """from transformers import LlamaConfig


class RemoteTinyConfig(LlamaConfig):
    model_type = "chatsft_remote_tiny"
"""
REMOTE_MODEL = """from transformers import LlamaForCausalLM

from .configuration_remote_tiny import RemoteTinyConfig


class RemoteTinyForCausalLM(LlamaForCausalLM):
    config_class = RemoteTinyConfig
"""


def _remote_code_model_folder(tok, folder: Path) -> Path:
    """A model whose classes live in its own folder (as Baichuan's and Yuan2's): `auto_map` in config.json."""
    from chatsft.training.tiny import build_model

    build_model(tok, hidden_size=32, layers=1, heads=2).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "configuration_remote_tiny.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_remote_tiny.py").write_text(REMOTE_MODEL)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "chatsft_remote_tiny"
    config["architectures"] = ["RemoteTinyForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "configuration_remote_tiny.RemoteTinyConfig",
        "AutoModelForCausalLM": "modeling_remote_tiny.RemoteTinyForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_remote_code_model_is_saved_and_reloaded_with_trust_remote_code(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    tok = _tokenizer()
    base = _remote_code_model_folder(tok, tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True)
    assert type(model).__name__ == "RemoteTinyForCausalLM"
    trainer = _trainer(tok, tmp_path / "run", max_steps=1, model=model)
    trainer.args.save_strategy = "no"
    trainer.train()
    out = _save(trainer, tok, tmp_path / "final", trust_remote_code=True)
    assert (out / "modeling_remote_tiny.py").is_file()  # the code travels with the weights
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(reloaded).__name__ == "RemoteTinyForCausalLM"
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in reloaded.state_dict().items())


def test_a_nan_in_an_unused_row_is_saved_and_named(trained, tmp_path, caplog):
    import torch

    _, trainer, tok = trained
    embed = trainer.model.get_input_embeddings().weight
    before = embed.data[3].clone()
    embed.data[3, 0] = float("nan")  # a row no example uses: a NaN there must not discard the model
    try:
        with caplog.at_level("WARNING", logger="chatsft"):
            out = _save(trainer, tok, tmp_path / "final")
    finally:
        embed.data[3] = before
    assert (out / fin.FINAL_MARKER_NAME).is_file()
    nan_line = "the final model's tensor model.embed_tokens.weight holds 1 NaN values (saved as trained)"
    assert nan_line in caplog.text
    from safetensors.torch import load_file

    assert torch.isnan(load_file(out / "model.safetensors")["model.embed_tokens.weight"][3, 0])


def test_a_tensor_that_differs_after_reload_is_named_with_its_nans(tmp_path):
    import torch

    want = torch.tensor([1.0, float("nan"), 3.0])
    fin._compare_state_dicts({"w": want.clone()}, {"w": want}, tmp_path)  # NaN == NaN, bit for bit
    with pytest.raises(RuntimeError) as err:
        fin._compare_state_dicts({"w": torch.tensor([1.0, float("nan"), 4.0])}, {"w": want}, tmp_path)
    assert str(err.value) == (
        f"final model in {tmp_path}: tensor w differs from the trained model after reload (the trained "
        "tensor holds 1 NaN values)"
    )


@pytest.mark.parametrize("name", ["optimizer.pt", "model.safetensors", "rng_state.pth", "scheduler.pt"])
def test_a_flipped_byte_anywhere_voids_the_checkpoint(run_copy, name):
    """Same size, same first 64 KiB: only a whole-file hash sees it."""
    path = run_copy / "checkpoint-10" / name
    data = bytearray(path.read_bytes())
    at = len(data) - 5  # past any header
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    assert ck.checkpoint_problem(run_copy / "checkpoint-10") == (
        f"{name} changed after it was saved (its SHA-256 differs)"
    )
    assert ck.find_resume_checkpoint(run_copy)[0] == run_copy / "checkpoint-8"


def test_chatsfts_own_save_cut_off_before_its_marker_is_skipped_not_refused(run_copy):
    """Killed after the run manifest and before the marker of its only checkpoints: the same command starts
    over (the saves are written again) instead of taking them for another tool's."""
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8", "checkpoint-10"):
        (run_copy / name / ck.MARKER_NAME).unlink()
        (run_copy / name / ck.RUN_FILE).write_text("{}")
    resume, notices = ck.choose_resume(run_copy)
    assert resume is None and len(notices) == 6
    assert notices[0].startswith(f"skipping incomplete checkpoint {run_copy / 'checkpoint-10'}: ")
    assert notices[-1] == "no complete checkpoint found: training starts from the beginning"
