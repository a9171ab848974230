"""`chatsft chat --model DIR`: talk to a saved model through its saved chat template.

Interactive by default: each line read from the terminal (or piped into stdin) is a user turn, answered with
the conversation so far; `/reset` starts a new conversation, `/exit` or end of input ends. `--prompts FILE`
answers each line of FILE as a conversation of its own, one-shot. Replies stop at the folder's saved stop ids
(`generation_config.json`); sampling follows the saved generation config unless `--temperature` is given
(0: greedy). A LoRA adapter folder works too: it names its base model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chatsft.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="a model folder saved by `chatsft train` (or any chat model)"
    )
    parser.add_argument(
        "--prompts", help="a text file, one prompt per line: answer each on its own, then exit"
    )
    parser.add_argument("--system", help="a system prompt for every conversation")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="longest reply (default 256)")
    parser.add_argument(
        "--temperature", type=float, help="0 for greedy; default: the model's generation config"
    )
    parser.add_argument("--top_p", type=float, help="nucleus sampling (with --temperature above 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling (default 0)")


def read_prompts(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"--prompts {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"--prompts {path}: not UTF-8 (byte {err.start})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"--prompts {path}: no prompts (one per line)")
    return prompts


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    prompts = read_prompts(args.prompts) if args.prompts else None

    import transformers

    from chatsft.training.generate import load_chat_model, reply, saved_stop_ids

    transformers.logging.set_verbosity_error()  # loading bars and generation notes are not the conversation
    transformers.utils.logging.disable_progress_bar()
    transformers.set_seed(args.seed)
    model, tokenizer = load_chat_model(args.model)
    start = [{"role": "system", "content": args.system}] if args.system else []

    def answer(messages: list[dict]) -> str:
        return reply(
            model,
            tokenizer,
            messages,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
        )

    if prompts is not None:
        for prompt in prompts:
            print(f"USER: {prompt}\nASSISTANT: {answer([*start, {'role': 'user', 'content': prompt}])}\n")
        return 0

    interactive = sys.stdin.isatty()
    stops = [tokenizer.convert_ids_to_tokens(i) for i in saved_stop_ids(model, tokenizer)]
    print(
        f"[chatsft] chatting with {args.model} (its saved chat template; replies stop at "
        f"{', '.join(stops)}). /reset starts over, /exit or Ctrl-D ends."
    )
    messages = list(start)
    while True:
        if interactive:
            print("USER: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            messages = list(start)
            print("[chatsft] new conversation")
            continue
        if not interactive:
            print(f"USER: {text}")
        messages.append({"role": "user", "content": text})
        response = answer(messages)
        messages.append({"role": "assistant", "content": response})
        print(f"ASSISTANT: {response}\n", flush=True)
    return 0
