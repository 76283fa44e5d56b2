"""``nag generate``: text in, text out, from a checkpoint, with a KV cache.

The prompt is encoded with the run's tokenizer (stored in the checkpoint; else its dataset's
``tokenizer.json``), run once, then one new token per step; a single prompt's text is streamed to
stdout as it is produced. Timings and the realized skip rate go to stderr.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from nag_lightning.commands.runs import load_run, single_device_fabric
from nag_lightning.commands.typed import TypedCommand
from nag_lightning.data.preparation import EOT_TOKEN
from nag_lightning.errors import NagError
from nag_lightning.model.generation import padded_prompts, sample_tokens
from nag_lightning.model.kv_cache import KVCache


def timed(tokens: Iterator[torch.Tensor], device: torch.device) -> Iterator[tuple[torch.Tensor, float]]:
    """Each token with the seconds it took since the previous one (the first: since the start,
    i.e. the prefill), the device synchronised so that the time is the work's."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    started = time.perf_counter()
    for token in tokens:
        sync()
        now = time.perf_counter()
        yield token, now - started
        started = time.perf_counter()  # the consumer's own time is not the model's


def decode_skip_rate(record) -> float | None:
    """Skip rate of a forward's ``SkipRecord`` (a decode step) when it skipped; None otherwise."""
    return record.stats().skip_rate.item() if record.skipped_any else None


def calibrate_on_prompts(model, prompts: list[list[int]], rate: float, source: str = "the checkpoint") -> None:
    """Thresholds that skip ``rate`` of the (token, sub-layer) pairs of one forward over the
    prompts (rate 0: none); ``source`` names the model in an error."""
    if model.skip_policy is None:
        if rate > 0:
            model.require_skipping(f"skip rate {rate} for {source}")
        return
    output = model(padded_prompts(prompts, model.head.weight.device), return_record=True, calibrate=rate)
    model.skip_policy.calibrate_from(output.record, rate)


class TextStream:
    """Writes the text of a growing token sequence as it grows. Byte-level BPE tokens can end in
    the middle of a UTF-8 character, so text ending in an incomplete one is held back."""

    def __init__(self, tokenizer, write: Callable[[str], Any]) -> None:
        self.tokenizer, self.write, self.tokens, self.shown = tokenizer, write, [], 0

    def add(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if not text.endswith("\ufffd"):
            self.write(text[self.shown:])
            self.shown = len(text)


def load_tokenizer(loaded, ckpt_path: Path, tokenizer_file: str | None):
    """The run's tokenizer: ``--tokenizer``, else the one stored in the checkpoint, else its dataset's file."""
    from tokenizers import Tokenizer

    if tokenizer_file is not None:
        if not Path(tokenizer_file).is_file():
            raise NagError(f"--tokenizer {tokenizer_file} does not exist.")
        return Tokenizer.from_file(tokenizer_file)
    if loaded.tokenizer is not None:
        return Tokenizer.from_str(loaded.tokenizer)
    data_dir = Path(loaded.datamodule.hparams["data_dir"])
    try:
        path = loaded.datamodule.tokenizer_path
    except NagError:
        path = data_dir / "tokenizer.json"
    if not path.is_file():
        raise NagError(f"{ckpt_path} does not hold its tokenizer (it was saved before checkpoints carried one) and its "
                       f"dataset's {path} is not here. Pass --tokenizer DATA_DIR/tokenizer.json, or --data_dir DIR "
                       "where the run's dataset is.")
    return Tokenizer.from_file(str(path))


def read_prompts(prompts: list[str]) -> list[str]:
    return [sys.stdin.read() if prompt == "-" else prompt for prompt in prompts]


def generate(ckpt_path: str, prompt: list[str] = [""], max_new_tokens: int = 128,  # noqa: B006
             temperature: float = 0.8, top_k: int | None = 50, seed: int = 0, skip_rate: float | None = None,
             precision: str | None = None, config: str | None = None, data_dir: str | None = None,
             tokenizer: str | None = None) -> None:
    """Text in, text out, from a checkpoint, with a KV cache.

    Args:
        ckpt_path: a checkpoint of `nag fit` (RUN/checkpoints/last.ckpt).
        prompt: one or more prompts, batched ("-" reads one from stdin); empty: start a new document.
        max_new_tokens: tokens to add to each prompt at most.
        temperature: sampling temperature; 0 is greedy.
        top_k: sample among the k most likely tokens (null: all).
        seed: sampling seed: the same command gives the same text.
        skip_rate: NAG: calibrate the skip thresholds to skip this fraction of (token, sub-layer)
            pairs of a forward over the prompts (0: dense); default: the checkpoint's thresholds.
        precision: Lightning precision to run at (e.g. 32-true, bf16-mixed); default: the run's.
        config: the run's config.yaml (for old checkpoints).
        data_dir: where the run's dataset is, if it moved.
        tokenizer: a tokenizer.json to use instead of the run's.
    """
    check_arguments(max_new_tokens, temperature, top_k, skip_rate)
    loaded = load_run(ckpt_path, config, data_dir)
    text_tokenizer = load_tokenizer(loaded, Path(ckpt_path), tokenizer)
    generate_from(loaded, text_tokenizer, read_prompts(prompt), max_new_tokens, temperature, top_k, seed, skip_rate,
                  precision or loaded.precision)


COMMAND = TypedCommand(generate)
add_arguments, normalise = COMMAND.add_to, COMMAND.normalise


def run(args) -> None:
    COMMAND(args)


def check_arguments(max_new_tokens: int, temperature: float, top_k: int | None, skip_rate: float | None) -> None:
    if max_new_tokens < 1:
        raise NagError(f"--max_new_tokens must be >= 1, got {max_new_tokens}.")
    if temperature < 0:
        raise NagError(f"--temperature must be >= 0 (0 is greedy), got {temperature}.")
    if top_k is not None and top_k < 1:
        raise NagError(f"--top_k must be >= 1, got {top_k}.")
    if skip_rate is not None and not 0.0 <= skip_rate < 1.0:
        raise NagError(f"--skip_rate must be in [0, 1), got {skip_rate}.")


def generate_from(loaded, tokenizer, texts: list[str], max_new_tokens: int, temperature: float, top_k: int | None,
                  seed: int, skip_rate: float | None, precision: str) -> None:
    """Continue each of ``texts`` with the loaded run's model, streaming a single one to stdout."""
    lightning_module = loaded.model
    model = lightning_module.model
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise NagError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
                       f"{model.config.vocab_size}: pass the run's own tokenizer.")
    eot = tokenizer.token_to_id(EOT_TOKEN)
    prompts = [tokenizer.encode(text).ids or ([eot] if eot is not None else []) for text in texts]
    if any(not prompt for prompt in prompts):
        raise NagError("an empty prompt, and the tokenizer has no end-of-text token to start from: give some text.")
    context = model.config.context_length
    if (longest := max(len(p) for p in prompts)) > context:
        raise NagError(f"a prompt of {longest} tokens is longer than the model's context_length={context}: shorten it.")

    fabric = single_device_fabric(precision)
    lightning_module = fabric.setup_module(lightning_module)
    lightning_module.eval()
    generator = torch.Generator(device=fabric.device).manual_seed(seed)
    single = len(prompts) == 1
    streams = [TextStream(tokenizer, (lambda text: print(text, end="", flush=True)) if single else (lambda _: None))
               for _ in prompts]
    if single:
        print(texts[0], end="", flush=True)
    cache = KVCache(model.config, len(prompts))
    with torch.no_grad(), fabric.autocast():
        if skip_rate is not None:
            calibrate_on_prompts(model, prompts, skip_rate)
        records = []
        tokens = sample_tokens(model, prompts, max_new_tokens, temperature, top_k, generator,
                               stop_token=eot, cache=cache, records=records)
        done = [False] * len(prompts)
        prefill_s, decode_s, steps, skipped = 0.0, 0.0, 0, []
        for step, (token, seconds) in enumerate(timed(tokens, fabric.device)):
            if step == 0:
                prefill_s = seconds
            else:
                decode_s += seconds
                if (rate := decode_skip_rate(records[-1])) is not None:
                    skipped.append(rate)
            steps += 1
            for row, value in enumerate(token.tolist()):
                done[row] = done[row] or value == eot
                if not done[row]:
                    streams[row].add(value)
    if single:
        print(flush=True)
    else:
        for index, (text, stream) in enumerate(zip(texts, streams)):
            print(f"=== sample {index + 1} ===\n{text}{tokenizer.decode(stream.tokens)}", flush=True)
    report(max_new_tokens, prompts, steps, prefill_s, decode_s, skipped, cache, all(done))


def report(max_new_tokens, prompts, steps, prefill_s, decode_s, skipped, cache, stopped) -> None:
    """One line on stderr: what ran and how fast; and why generation ended early, if it did."""
    batch, prompt_tokens = len(prompts), sum(len(p) for p in prompts)
    parts = [f"{batch} prompt(s), {prompt_tokens} prompt tokens, {steps} new tokens each",
             f"prefill {prefill_s * 1e3:.1f} ms ({prompt_tokens / max(prefill_s, 1e-9):,.0f} tokens/s)"]
    if steps > 1:
        parts.append(f"decode {(steps - 1) * batch / max(decode_s, 1e-9):,.1f} tokens/s")
    if skipped:
        parts.append(f"skip rate {sum(skipped) / len(skipped):.3f} while decoding")
    parts.append(f"KV cache {cache.nbytes / 2**20:.2f} MB")
    print("nag generate: " + " | ".join(parts), file=sys.stderr)
    if steps < max_new_tokens and not stopped:
        print(f"nag generate: stopped after {steps} new tokens: the model's context of {cache.capacity} tokens is "
              "full (generation does not slide past it).", file=sys.stderr)
