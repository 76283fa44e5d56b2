"""``nag eval``: lm-eval-harness tasks on a checkpoint or an exported folder.

The model goes to lm-eval as its Hugging Face form (``nag export``'s modeling file, built in
memory from a checkpoint, or loaded from an exported folder) through lm-eval's ``HFLM``, which
implements lm-eval's ``LM`` interface (log-likelihood, rolling log-likelihood, generation). With
``--skip`` the model skips by its thresholds (threshold mode); the realized skip rate over every
token the evaluation ran is reported beside the scores. Results go to a JSON file and a Markdown
table next to the checkpoint (or inside the exported folder).

Tasks whose data is local need no network: a task YAML with ``dataset_path: json`` and
``dataset_kwargs: {data_files: {test: /path/data.jsonl}}`` in a folder given as
``--include_path``; set ``HF_DATASETS_OFFLINE=1`` so that ``datasets`` does not look online.
"""

from __future__ import annotations

import json
from pathlib import Path

from nag_lightning.commands.typed import TypedCommand
from nag_lightning.errors import NagError
from nag_lightning.interop.export import HF_EXTRA, check_strategy, hf_tokenizer, load_checkpoint, require
from nag_lightning.model.skip_policy import skip_capability_error
from nag_lightning.reporting import write_atomically

EVAL_EXTRA = 'pip install "nag-lightning[eval]"'


class SkipRateMeter:
    """The share of (token, sub-layer) pairs skipped over every forward of the model: a forward
    hook reads the rate each forward leaves on the model (``last_skip_rate``) and weights it by
    the forward's tokens (padding included: lm-eval pads batches, and those rows run too)."""

    def __init__(self, model) -> None:
        self.skipped = self.tokens = 0.0
        self.handle = model.register_forward_hook(self.count, with_kwargs=True)

    def count(self, model, args, kwargs, output) -> None:
        tokens = (args[0] if args else kwargs["input_ids"]).numel()
        rate = getattr(model, "last_skip_rate", None)
        if rate is not None:
            self.skipped += rate * tokens
        self.tokens += tokens

    @property
    def rate(self) -> float | None:
        return self.skipped / self.tokens if self.tokens else None


def load_model(ckpt_path: str | None, hf: str | None, skip: bool, data_dir: str | None):
    """(Hugging Face model, tokenizer, a line naming the source) from a checkpoint or an exported folder."""
    require("transformers", HF_EXTRA)
    if ckpt_path is not None:
        from nag_lightning.interop.hf import to_hf

        transformer, tokenizer = load_checkpoint(ckpt_path, data_dir)
        check_strategy(transformer)
        if skip:
            transformer.require_skipping("nag eval --skip")
        return to_hf(transformer, skip_enabled=skip), hf_tokenizer(tokenizer), f"checkpoint {ckpt_path}"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(hf)
    if not (folder / "config.json").is_file():
        raise NagError(f"--hf {hf} is not a model folder (no config.json); write one with `nag export --ckpt_path CKPT "
                       f"--output {hf}`.")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).float().eval()
    if skip and model.model.skip_policy is None:
        raise skip_capability_error(model.model.residual, f"nag eval --skip ({hf})")
    model.config.skip_enabled = skip
    return model, AutoTokenizer.from_pretrained(folder), f"exported folder {hf}"


def default_output(ckpt_path: str | None, hf: str | None, tasks: list[str]) -> Path:
    name = "eval-" + "-".join(tasks)
    if ckpt_path is not None:
        return Path(ckpt_path).with_name(f"{Path(ckpt_path).stem}.{name}.json")
    return Path(hf) / f"{name}.json"


def evaluate(tasks: list[str], ckpt_path: str | None = None, hf: str | None = None, limit: float | None = None,
             batch_size: int = 8, num_fewshot: int | None = None, skip: bool = False, include_path: str | None = None,
             output: str | None = None, device: str = "cpu", data_dir: str | None = None) -> dict:
    """Score a checkpoint or an exported folder on lm-eval-harness tasks.

    Args:
        tasks: lm-eval task names: T1,T2 or T1 T2.
        ckpt_path: a checkpoint of `nag fit`.
        hf: a folder written by `nag export` (instead of --ckpt_path).
        limit: at most this many documents per task (a fraction below 1: that share).
        batch_size: documents scored together.
        num_fewshot: examples put before each document (default: the task's).
        skip: skip by the model's thresholds (NAG; threshold mode) and report the realized skip rate.
        include_path: a folder of task YAML files (local tasks).
        output: the JSON results file (default: next to the checkpoint, or inside --hf); the Markdown
            table goes beside it with the suffix .md.
        device: where to run (cpu, cuda).
        data_dir: where the run's dataset is, if the checkpoint predates carrying its tokenizer.
    """
    if (ckpt_path is None) == (hf is None):
        raise NagError("nag eval: give exactly one of --ckpt_path CKPT (a `nag fit` checkpoint) and --hf DIR "
                       "(a `nag export` folder).")
    names = [name.strip() for item in tasks for name in item.split(",") if name.strip()]
    if not names:
        raise NagError("nag eval --tasks: name at least one lm-eval task, e.g. --tasks lambada_openai,hellaswag.")
    if batch_size < 1:
        raise NagError(f"nag eval --batch_size must be >= 1, got {batch_size}.")
    require("lm_eval", EVAL_EXTRA)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table

    if include_path is not None and not Path(include_path).is_dir():
        raise NagError(f"nag eval --include_path {include_path} is not a folder of task YAML files.")
    task_manager = TaskManager(include_path=include_path)
    unknown = [name for name in names if name not in task_manager.all_tasks]
    if unknown:
        raise NagError(f"nag eval --tasks: unknown task(s) {', '.join(unknown)}; `lm-eval ls tasks` lists them, and "
                       "--include_path DIR adds local task YAML files.")
    model, tokenizer, source = load_model(ckpt_path, hf, skip, data_dir)
    model.to(device)
    meter = SkipRateMeter(model)
    lm = HFLM(pretrained=model, backend="causal", tokenizer=tokenizer, batch_size=batch_size,
              max_length=model.config.max_position_embeddings)
    results = simple_evaluate(model=lm, tasks=names, limit=limit, num_fewshot=num_fewshot,
                              task_manager=task_manager, log_samples=False)
    meter.handle.remove()
    summary = {"source": source, "skip": skip, "realized_skip_rate": meter.rate if skip else 0.0,
               "tokens_run": int(meter.tokens)}
    report = {"nag": summary, "results": results["results"], "versions": results.get("versions"),
              "n-samples": results.get("n-samples"), "config": results.get("config")}
    path = Path(output) if output is not None else default_output(ckpt_path, hf, names)
    write_atomically(path, json.dumps(report, indent=2, default=handle_non_serializable))
    skip_line = f"realized skip rate {summary['realized_skip_rate']:.3f}" if skip else "skipping off"
    table = f"{source}, {skip_line}, {summary['tokens_run']:,} tokens run\n\n{make_table(results)}"
    write_atomically(path.with_suffix(".md"), table)
    print(table)
    print(f"nag eval: wrote {path} and {path.with_suffix('.md')}")
    return report


COMMAND = TypedCommand(evaluate)
add_arguments, normalise = COMMAND.add_to, COMMAND.normalise


def run(args) -> None:
    COMMAND(args)
