"""`chatsft demo`: fine-tune a tiny model on the bundled sample conversations, then show it answering.

No arguments and no network: a byte-level BPE tokenizer is trained on the sample data and a small Llama is
built in-process, saved as an ordinary model folder, and trained with the same `chatsft train` a user runs.
The answers before and after training come from the saved folder through its saved chat template.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

DEMO_PROMPTS = [
    "Hello there!",
    "Who are you?",
    "What is the capital of Italy?",
    "What is 2 plus 3?",
    "Count to 5.",
]
TEMPLATE = "vicuna_v1.1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output_dir", default="chatsft-demo", help="where the model folders go (default ./chatsft-demo)"
    )
    parser.add_argument(
        "--epochs", type=float, default=16, help="training epochs over the sample data (default 16)"
    )
    parser.add_argument("--hidden_size", type=int, default=128, help="model width (default 128)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")


def sample_data_path() -> Path:
    return Path(str(resources.files("chatsft") / "assets" / "sample_conversations.json"))


def thread_env() -> dict[str, str]:
    """The demo's threads: one torch thread per process unless OMP_NUM_THREADS says otherwise.

    The model is tiny (1.3M parameters, batches of about 1,300 tokens); on a busy machine a second intra-op
    thread mostly waits for a core. On the 2-core development machine under load, 25 demo steps trained in
    44 s with one thread and 209 s with torch's default (one per core; 50 steps: 267 s and 907 s); quiet, the
    whole demo took 362 s with one thread and 227 s with two, a smaller loss than the busy case's gain. The
    395 sample conversations encode in a fraction of a second, so one preprocessing process, without the
    tokenizer's thread pool, is enough too.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run(args: argparse.Namespace) -> int:
    from chatsft.records import read_conversations
    from chatsft.templates import get_template, render_text
    from chatsft.training.generate import answers
    from chatsft.training.tiny import build_model, build_tokenizer

    start = time.perf_counter()
    env = thread_env()
    import torch

    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))  # this process answers the prompts before and after
    os.environ["TOKENIZERS_PARALLELISM"] = env["TOKENIZERS_PARALLELISM"]
    out = Path(args.output_dir)
    base, trained = out / "base-model", out / "chat-model"
    data = sample_data_path()
    conversations, _ = read_conversations([data])
    template, _ = get_template(TEMPLATE)
    texts = [render_text(template, c.messages, bos="<s>", eos="</s>") for c in conversations]
    tokenizer = build_tokenizer(texts, vocab_size=1024)
    tokenizer.chat_template = template.jinja()
    model = build_model(tokenizer, hidden_size=args.hidden_size, layers=args.layers, max_positions=1024)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"[demo] built a {params / 1e6:.1f}M-parameter Llama and a {len(tokenizer)}-token BPE tokenizer "
        f"trained on {len(conversations)} sample conversations ({data}); {env['OMP_NUM_THREADS']} torch "
        "thread(s) per process (set OMP_NUM_THREADS to change)"
    )

    before = answers(base, DEMO_PROMPTS)
    sys.stdout.flush()  # the child writes to the same stdout
    # the same program a user runs, as its own process (commands do not import each other)
    code = subprocess.call(
        [
            sys.executable,
            "-m",
            "chatsft.train",
            "--model_name_or_path",
            str(base),
            "--data_path",
            str(data),
            "--output_dir",
            str(trained),
            "--conv_template",
            TEMPLATE,
            "--model_max_length",
            "512",
            "--num_train_epochs",
            str(args.epochs),
            "--per_device_train_batch_size",
            "16",
            "--learning_rate",
            "3e-3",
            "--warmup_steps",
            "0.05",
            "--lr_scheduler_type",
            "cosine",
            "--weight_decay",
            "0.0",
            "--logging_steps",
            "10",
            "--save_strategy",
            "no",
            "--use_cpu",
            "True",
            "--overwrite_output_dir",
            "True",
            "--report_to",
            "none",
            "--seed",
            "0",
            "--cache_dir",
            str(out / "cache"),
            "--disable_tqdm",
            "False",
            "--preprocessing_num_workers",
            "1",
        ],
        env=env,
    )
    if code != 0:
        return code
    after = answers(trained, DEMO_PROMPTS)
    print("\n[demo] the same prompts, through the saved chat template, before and after fine-tuning:\n")
    for prompt, old, new in zip(DEMO_PROMPTS, before, after):
        print(f"  USER: {prompt}\n    before: {old!r}\n    after:  {new!r}\n")
    print(
        f"[demo] done in {time.perf_counter() - start:.0f}s. The chat model is in {trained} "
        f"(loss curve: {trained / 'loss.png'}); load it with AutoModelForCausalLM.from_pretrained."
    )
    return 0
