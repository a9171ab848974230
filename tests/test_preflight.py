"""Preflight: each problem found before the model loads, in one line; checkpoint sizes from the headers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from chatsft_runs import make_setup, train_flags

from chatsft.errors import ConfigError, DataError
from chatsft.training.preflight import (
    check_data_files,
    check_output_dir,
    check_template_tokens,
    checkpoint_bytes,
    count_parameters,
    human_bytes,
    run_preflight,
)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


class _Vocab:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 3

    def __len__(self):
        return 256


@pytest.fixture(scope="module")
def tiny_model():
    from chatsft.training.tiny import build_model

    return build_model(_Vocab(), hidden_size=32, layers=2, heads=4, max_positions=64)


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    tiny_model.save_pretrained(folder)
    return folder


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def _disk(monkeypatch, free: int):
    import chatsft.training.preflight as preflight

    monkeypatch.setattr(
        preflight.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**15, 0, free)
    )


# ---- output folder -----------------------------------------------------------------------------------------


def test_output_dir_is_created_and_probe_removed(tmp_path):
    out = check_output_dir(tmp_path / "a" / "b")
    assert out.is_dir() and list(out.iterdir()) == []


def test_output_dir_under_a_file_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError) as err:
        check_output_dir(tmp_path / "file" / "out")
    assert _one_line(err) == f"--output_dir {tmp_path / 'file' / 'out'}: cannot create it: Not a directory"
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "file")


@pytest.mark.skipif(IS_ROOT, reason="root writes into a chmod 555 folder anyway; see the /proc test")
def test_output_dir_read_only(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="not writable: Permission denied"):
            check_output_dir(folder)
    finally:
        folder.chmod(0o755)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux procfs")
def test_output_dir_existing_but_not_writable_even_for_root():
    # procfs refuses new files to every user, root included: the probe write itself fails.
    with pytest.raises(ConfigError) as err:
        check_output_dir("/proc/self")
    assert _one_line(err).startswith("--output_dir /proc/self: not writable: ")


# ---- parameters and disk -----------------------------------------------------------------------------------


def test_count_parameters_from_safetensors_headers(tiny_model, model_dir):
    params, stored, how = count_parameters(model_dir)
    assert params == sum(p.numel() for p in tiny_model.parameters())
    assert stored == 4 * params and how == "from the safetensors headers"


def test_count_parameters_sharded_and_bf16(tiny_model, tmp_path):
    import torch

    tiny = tiny_model.to(torch.bfloat16)
    try:
        tiny.save_pretrained(tmp_path, max_shard_size="20KB")
    finally:
        tiny_model.to(torch.float32)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    params, stored, _ = count_parameters(tmp_path)
    assert params == sum(p.numel() for p in tiny_model.parameters()) and stored == 2 * params


def test_count_parameters_config_estimate_is_exact_for_llama(tiny_model, model_dir, tmp_path):
    shutil.copy(model_dir / "config.json", tmp_path / "config.json")
    params, stored, how = count_parameters(tmp_path)
    assert (params, stored, how) == (
        sum(p.numel() for p in tiny_model.parameters()),
        None,
        "estimated from config.json",
    )
    with pytest.raises(ValueError, match="not a local folder"):
        count_parameters(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x"}))
    with pytest.raises(ValueError, match="lacks vocab_size"):
        count_parameters(tmp_path)


def test_checkpoint_bytes():
    assert checkpoint_bytes(1000) == 12_000  # fp32 weights + two fp32 Adam moments
    assert checkpoint_bytes(1000, dtype="bf16") == 10_000
    assert checkpoint_bytes(1000, dtype="bf16", save_only_model=True) == 2_000
    assert checkpoint_bytes(1000, dtype="auto", stored_bytes=4000) == 12_000
    with pytest.raises(ConfigError, match="unknown dtype"):
        checkpoint_bytes(1000, dtype="int4")
    assert human_bytes(999) == "999 B" and human_bytes(168e9) == "168.0 GB"


def test_not_enough_disk(monkeypatch, model_dir, tmp_path, write_file):
    data = write_file("d.json", [{"conversations": []}])
    params = count_parameters(model_dir)[0]
    _disk(monkeypatch, free=2 * 12 * params - 1)
    with pytest.raises(ConfigError) as err:
        run_preflight(output_dir=tmp_path / "out", data_paths=[data], model_path=model_dir)
    message = _one_line(err)
    assert message.startswith(f"--output_dir {tmp_path / 'out'}: ")
    assert (
        f"about {human_bytes(2 * 12 * params)} needed for 2 checkpoints of {human_bytes(12 * params)} "
        in message
    )
    assert f"({params:,} parameters from the safetensors headers, weights + Adam states)" in message
    assert "--save_only_model" in message

    # the same disk holds two weights-only checkpoints
    notices = run_preflight(
        output_dir=tmp_path / "out", data_paths=[data], model_path=model_dir, save_only_model=True
    )
    assert notices == [
        f"disk: {human_bytes(2 * 12 * params - 1)} free in {tmp_path / 'out'}, 2 checkpoints of "
        f"{human_bytes(4 * params)} ({params:,} parameters from the safetensors headers, weights)"
    ]


def test_disk_check_skipped_when_it_cannot_apply(monkeypatch, tmp_path, write_file):
    data = write_file("d.json", [{"conversations": []}])
    _disk(monkeypatch, free=0)
    assert run_preflight(output_dir=tmp_path / "o", data_paths=[data], model_path="org/model") == [
        f"disk check skipped: cannot count the model's parameters ({Path('org/model')} is not a local folder)"
    ]
    assert run_preflight(output_dir=tmp_path / "o", data_paths=[data], model_path="org/model", lora=True) == [
        "disk check skipped: LoRA checkpoints hold only the adapter"
    ]
    assert run_preflight(output_dir=tmp_path / "o", data_paths=[data]) == []


# ---- data files --------------------------------------------------------------------------------------------


def test_data_files(tmp_path, write_file):
    good = write_file("good.jsonl", '{"messages": []}\n')
    check_data_files([good, tmp_path])  # a folder of shards
    (tmp_path / "empty_folder").mkdir()
    cases = [
        (tmp_path / "missing.json", "no such file"),
        (tmp_path / "empty_folder", "the folder holds no .json, .jsonl, .parquet files"),
        (write_file("data.csv", "a,b\n"), "expected .json, .jsonl or .parquet, got '.csv'"),
        (write_file("empty.json", b""), "the file is empty"),
    ]
    for path, problem in cases:
        with pytest.raises(DataError) as err:
            check_data_files([good, path], flag="--eval_data_path")
        assert _one_line(err) == f"--eval_data_path {path}: {problem}"


@pytest.mark.skipif(IS_ROOT, reason="root reads a chmod 000 file anyway")
def test_data_file_unreadable(write_file):
    path = write_file("secret.json", "[]")
    path.chmod(0)
    try:
        with pytest.raises(DataError, match="cannot be read: Permission denied"):
            check_data_files([path])
    finally:
        path.chmod(0o644)


def test_missing_data_fails_before_the_output_folder_is_made(tmp_path):
    with pytest.raises(DataError, match="--data_path .*missing.json: no such file"):
        run_preflight(output_dir=tmp_path / "out", data_paths=[tmp_path / "missing.json"])
    assert not (tmp_path / "out").exists()


# ---- template and tokenizer --------------------------------------------------------------------------------


def test_template_tokens_with_a_tokenizer(bpe_tokenizer):
    check_template_tokens(["<|im_start|>", "<|im_end|>"], bpe_tokenizer, template="chatml")
    check_template_tokens(["{bos}", "{eos}"], bpe_tokenizer, template="vicuna_v1.1")
    llama3 = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    with pytest.raises(ConfigError) as err:
        check_template_tokens(llama3, bpe_tokenizer, template="llama-3")
    message = _one_line(err)
    assert message.startswith(
        "llama-3 uses the control token '<|begin_of_text|>', which is not in its vocabulary (it would be "
    )
    assert "--add_special_tokens <|begin_of_text|>" in message
    check_template_tokens(
        llama3, bpe_tokenizer, to_add=set(llama3), template="llama-3"
    )  # will be added: fine


def test_template_token_in_vocab_but_not_special(bpe_tokenizer):
    vocab = bpe_tokenizer.get_vocab()
    # a byte-level piece of " word"; get_vocab's order differs between processes, so choose deterministically
    piece = min((t for t in vocab if t.startswith("Ġ") and len(t) > 2), key=lambda t: (len(t), t))
    with pytest.raises(ConfigError, match=r"is in its vocabulary but text encodes it as \d+ tokens"):
        check_template_tokens([piece], bpe_tokenizer)


def test_template_tokens_without_bos(bpe_tokenizer):
    import copy

    tok = copy.deepcopy(bpe_tokenizer)
    tok.bos_token = None
    with pytest.raises(ConfigError, match="vicuna_v1.1 writes the BOS token, but the tokenizer has none"):
        check_template_tokens(["{bos}", "{eos}"], tok, template="vicuna_v1.1")


def test_template_tokens_with_a_plain_vocab():
    check_template_tokens(["<sep>", "<eod>"], vocab={"<sep>", "<eod>", "a"}, template="yuan2")
    check_template_tokens(["<sep>", "<eod>"], vocab={"a"}, to_add=["<sep>", "<eod>"], template="yuan2")
    with pytest.raises(
        ConfigError, match="yuan2 uses the control token '<eod>', which is not in its vocabulary"
    ):
        check_template_tokens(["<sep>", "<eod>"], vocab={"<sep>"}, template="yuan2")
    with pytest.raises(ValueError):
        check_template_tokens(["<sep>"])


def test_run_preflight_all_checks_pass(monkeypatch, model_dir, tmp_path, write_file, bpe_tokenizer):
    data = write_file("d.json", [{"conversations": []}])
    _disk(monkeypatch, free=10**12)
    notices = run_preflight(
        output_dir=tmp_path / "out",
        data_paths=[data],
        eval_data_paths=[data],
        model_path=model_dir,
        dtype="bf16",
        markers=["<|im_start|>", "<|im_end|>"],
        tokenizer=bpe_tokenizer,
        template="chatml",
    )
    assert len(notices) == 1 and notices[0].startswith("disk: 1.0 TB free in ")
    with pytest.raises(ConfigError, match="chatml uses the control token '<x>'"):
        run_preflight(
            output_dir=tmp_path / "out",
            data_paths=[data],
            markers=["<x>"],
            tokenizer=bpe_tokenizer,
            template="chatml",
        )


# ---- what a user meets before any data is encoded (the train command, in this process) ---------------


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("preflight-train"), dropout=0.0, n=4)


def _train(setup, out, *extra, model=None):
    from chatsft.commands.train import cli

    argv = train_flags(setup, out, cache=setup.root / "cache", max_steps=1, accumulation=1, save_steps=1)
    if model is not None:
        argv[argv.index("--model_name_or_path") + 1] = str(model)
    return cli([*argv, *extra])


def _last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("cut", ["empty", "truncated"])
def test_a_cut_off_model_download_fails_before_the_data_is_encoded(train_setup, tmp_path, capsys, cut):
    model = tmp_path / "model"
    shutil.copytree(train_setup.base, model)
    weights = model / "model.safetensors"
    weights.write_bytes(b"" if cut == "empty" else weights.read_bytes()[:-100])
    size = weights.stat().st_size
    assert _train(train_setup, tmp_path / "out", model=model) == 2
    problem = (
        "model.safetensors is 0 bytes, shorter than a safetensors header"
        if cut == "empty"
        else f"model.safetensors is {size} bytes but its header describes {size + 100}"
    )
    assert _last_error(capsys) == (
        f"chatsft train: error: --model_name_or_path {model}: {problem}; download or save the model again"
    )
    assert not (tmp_path / "out").exists() and not (train_setup.root / "cache").exists()


@pytest.mark.parametrize(
    "flag, value, line",
    [
        ("--per_device_train_batch_size", "0", "--per_device_train_batch_size must be at least 1, got 0"),
        ("--gradient_accumulation_steps", "0", "--gradient_accumulation_steps must be at least 1, got 0"),
        ("--learning_rate", "nan", "--learning_rate must be a finite number >= 0, got nan"),
        ("--max_invalid_ratio", "-1", "--max_invalid_ratio must be between 0 and 1, got -1.0"),
        (
            "--model_max_length",
            "-5",
            "--model_max_length must be at least 2 tokens (a reply and its end-of-turn marker), got -5",
        ),
    ],
)
def test_impossible_numbers_are_one_line_before_anything_loads(
    train_setup, tmp_path, capsys, flag, value, line
):
    assert _train(train_setup, tmp_path / "out", flag, value) == 2
    assert _last_error(capsys) == f"chatsft train: error: {line}"
    assert not (tmp_path / "out").exists()


def test_a_fifo_as_data_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "data.json"
    os.mkfifo(fifo)
    with pytest.raises(DataError) as err:
        check_data_files([fifo])
    assert str(err.value) == (
        f"--data_path {fifo}: not a regular file (a pipe or a device); give a .json, .jsonl or .parquet file"
    )
