"""`--report_to`: a short training run as a user starts it, and what lands where people look.

TensorBoard: the run's event file under `output_dir/runs/`, read back record by record (the TFRecord framing:
length, its masked CRC-32C, the payload, its CRC), holds the eval loss and the `--eval_generations` table at
the evaluation's step, with exactly the completions of `generations.jsonl`. It runs on `tensorboardX` (the
`test` extra), which transformers' TensorBoardCallback uses when `tensorboard` is absent.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from chatsft.commands.train import main
from chatsft.templates import get_template, render_text
from chatsft.training.tiny import build_model, build_tokenizer

pytestmark = pytest.mark.slow

RECORDS = [
    {
        "id": f"c{i}",
        "conversations": [
            {"from": "human", "value": f"What is the capital of {country}?"},
            {"from": "gpt", "value": f"The capital of {country} is {city}."},
        ],
    }
    for i, (country, city) in enumerate([("France", "Paris"), ("Spain", "Madrid"), ("Peru", "Lima")] * 4)
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("reporting")
    template, _ = get_template("vicuna_v1.1")
    from chatsft.records import read_conversations

    data = root / "data.json"
    data.write_text(json.dumps(RECORDS))
    convs, _ = read_conversations([data])
    tokenizer = build_tokenizer(
        [render_text(template, c.messages, bos="<s>", eos="</s>") for c in convs], vocab_size=300
    )
    model = root / "base"
    build_model(tokenizer, hidden_size=32, layers=1, heads=2, max_positions=256).save_pretrained(model)
    tokenizer.save_pretrained(model)
    return model, data


def read_events(path: Path) -> list:
    """Every `Event` of a TensorBoard event file, each record's framing and CRCs checked."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    events, blob, at = [], path.read_bytes(), 0
    while at < len(blob):
        header = blob[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", blob[at + 8 : at + 12])
        payload = blob[at + 12 : at + 12 + length]
        (payload_crc,) = struct.unpack("<I", blob[at + 12 + length : at + 16 + length])
        assert (header_crc, payload_crc) == (masked_crc32c(header), masked_crc32c(payload))
        events.append(Event.FromString(payload))
        at += 16 + length
    return events


def test_tensorboard_gets_the_eval_loss_and_the_generations(base, tmp_path):
    model, data = base
    out = tmp_path / "run"
    argv = [
        *("--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(out)),
        *("--conv_template", "vicuna_v1.1", "--model_max_length", "256", "--train_ratio", "0.75"),
        *("--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2"),
        *("--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "no"),
        *("--eval_generations", "2", "--eval_generation_max_new_tokens", "5", "--seed", "0"),
        *("--report_to", "tensorboard", "--cache_dir", str(tmp_path / "cache"), "--disable_tqdm", "True"),
    ]
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 2]
    state = json.loads((out / "trainer_state.json").read_text())
    eval_loss = next(e["eval_loss"] for e in state["log_history"] if "eval_loss" in e)

    (events_file,) = (out / "runs").glob("*/events.out.tfevents.*")
    values = [(e.step, v) for e in read_events(events_file) if e.HasField("summary") for v in e.summary.value]
    scalars = {(step, v.tag): v.simple_value for step, v in values if v.WhichOneof("value") == "simple_value"}
    assert scalars[(2, "eval/loss")] == pytest.approx(eval_loss, rel=1e-6)  # stored as a float32
    assert {(1, "train/loss"), (2, "train/loss")} <= set(scalars)
    (table,) = [(step, v) for step, v in values if v.tag == "eval/generations/text_summary"]
    step, value = table
    assert step == 2 and value.metadata.plugin_data.plugin_name == "text"
    header, rule, *lines = value.tensor.string_val[0].decode("utf-8").splitlines()
    assert (header, rule) == ("| prompt | completion | reference |", "|---|---|---|")

    def cells(line: str) -> list[str]:  # a markdown row; `|` inside a cell is `\|`, a newline `<br>`
        inner = re.split(r"(?<!\\)\|", line)[1:-1]
        return [c.strip().replace("\\|", "|").replace("<br>", "\n") for c in inner]

    shown = [cells(line) for line in lines]
    assert [c[1] for c in shown] == [r["completion"] for r in rows]
    assert [c[2] for c in shown] == [r["reference"] for r in rows]
    assert [c[0] for c in shown] == [r["prompt"].strip() for r in rows]
