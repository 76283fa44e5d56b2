"""``nag export``: a checkpoint as a Hugging Face model folder, or as plain safetensors.

``--format hf`` writes a folder that ``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)`` and ``AutoTokenizer.from_pretrained(DIR)`` load on a machine without
this package: ``config.json`` (the model's ``ModelConfig`` and ``skip_enabled``, off unless
``--skip``), ``model.safetensors``, ``modeling_nag.py`` (torch and transformers only) and the
run's tokenizer. ``--format safetensors`` writes the plain state dict, a JSON config and the
tokenizer, for code that does not use transformers. The folder is written next to its final
place and renamed into it, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

from nag_lightning.commands.generate import load_tokenizer
from nag_lightning.commands.runs import load_run
from nag_lightning.commands.typed import TypedCommand
from nag_lightning.data.preparation import EOT_TOKEN
from nag_lightning.errors import NagError
from nag_lightning.model import ModelConfig, Transformer
from nag_lightning.version import __version__

HF_EXTRA = 'pip install "nag-lightning[hf]"'
# Format tag of `--format safetensors`'s config.json, for readers to check what they hold.
SAFETENSORS_FORMAT = "nag-lightning-safetensors/1"


def require(module: str, extra: str):
    """Import an optional dependency, or fail with the install line that brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise NagError(f"{module} is not installed ({error}); install it with: {extra}") from None


@contextmanager
def folder_in_place(output: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside ``output`` to write into; renamed to ``output`` when the block
    succeeds (replacing it only with ``overwrite``), removed when it fails."""
    if output.exists() and not overwrite:
        raise NagError(f"--output {output} already exists; choose a new folder or pass --overwrite to replace it.")
    if output.exists() and not output.is_dir():
        raise NagError(f"--output {output} is a file, not a folder; choose a folder path.")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        yield staging
        # mkdtemp's folder (and some writers' files) are private to the user; an export is for sharing.
        umask = os.umask(0)
        os.umask(umask)
        for path in (staging, *staging.rglob("*")):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if output.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
            os.replace(output, retired / output.name)
            os.replace(staging, output)
            shutil.rmtree(retired)
        else:
            os.replace(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def hf_tokenizer(tokenizer):
    """The run's ``tokenizers.Tokenizer`` as a transformers fast tokenizer, its end-of-text token
    marked as both ends (documents in the training data are separated by it)."""
    from transformers import PreTrainedTokenizerFast


    special = {"eos_token": EOT_TOKEN, "bos_token": EOT_TOKEN} if tokenizer.token_to_id(EOT_TOKEN) is not None else {}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)


def load_checkpoint(ckpt_path: str, data_dir: str | None = None):
    """(Transformer in float32 and eval mode, tokenizer) of a `nag fit` checkpoint."""
    loaded = load_run(ckpt_path, data_dir=data_dir)
    return loaded.model.model.float().eval(), load_tokenizer(loaded, Path(ckpt_path), None)


def check_strategy(transformer) -> None:
    """A residual strategy the exported modeling file does not implement fails here, not when loading."""
    from nag_lightning.interop.modeling_nag import STRATEGIES

    strategy = type(transformer.residual)
    if not strategy.__module__.startswith("nag_lightning.model.residual") or strategy.__name__ not in STRATEGIES:
        raise NagError(f"nag export: the checkpoint's residual strategy {strategy.__module__}.{strategy.__name__} is "
                       f"not one the exported model implements ({', '.join(sorted(STRATEGIES))}); export a model "
                       "trained with one of those, or use --format safetensors (weights and config only).")


def export(ckpt_path: str, output: str, format: Literal["hf", "safetensors"] = "hf", skip: bool = False,
           overwrite: bool = False, data_dir: str | None = None) -> Path:
    """Write a checkpoint as a Hugging Face model folder or as plain safetensors.

    Args:
        ckpt_path: a checkpoint of `nag fit` (RUN/checkpoints/last.ckpt).
        output: the folder to create.
        format: hf (a transformers model folder, loaded with trust_remote_code=True) or safetensors
            (state dict, config.json and tokenizer.json only).
        skip: hf: turn skipping on in the exported config (threshold mode, with the checkpoint's
            thresholds); off by default, and switchable later with config.skip_enabled.
        overwrite: replace --output when it exists.
        data_dir: where the run's dataset is, if the checkpoint predates carrying its tokenizer.
    """
    require("safetensors", HF_EXTRA)
    if format == "hf":
        require("transformers", HF_EXTRA)
    output = Path(output)
    transformer, tokenizer = load_checkpoint(ckpt_path, data_dir)
    if format == "hf":
        check_strategy(transformer)
        if skip:
            transformer.require_skipping("nag export --skip")
    elif skip:
        raise NagError("nag export --skip applies to --format hf only: a safetensors export holds the thresholds "
                       "(skip_policy.thresholds) and the skip settings (model_config.skip) as they are.")
    with folder_in_place(output, overwrite) as staging:
        if format == "hf":
            from transformers.utils import logging as transformers_logging

            from nag_lightning.interop.hf import save_hf_folder

            transformers_logging.disable_progress_bar()  # one shard of a small model: the bar says nothing

            save_hf_folder(transformer, staging, skip_enabled=skip)
            hf_tokenizer(tokenizer).save_pretrained(staging)
        else:
            save_plain(transformer, staging)
            tokenizer.save(str(staging / "tokenizer.json"))
    print(f"nag export: wrote {output} ({format}, {transformer.num_parameters():,} parameters, "
          f"{transformer.config.residual.__class__.__name__})")
    return output


def save_plain(transformer, folder: Path) -> None:
    """``model.safetensors`` (the Transformer's state dict; a tied head is stored once, as the
    embedding) and ``config.json`` (the ModelConfig as plain data)."""
    from safetensors.torch import save_file

    state = transformer.state_dict()
    tied = transformer.config.tie_embeddings
    if tied:
        state.pop("head.weight")
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": SAFETENSORS_FORMAT})
    config = {"format": SAFETENSORS_FORMAT, "nag_lightning_version": __version__,
              "model_config": transformer.config.to_dict(),
              "tied_weights": {"head.weight": "embed.weight"} if tied else {}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def load_plain(folder: str | Path):
    """The ``Transformer`` of a ``--format safetensors`` folder (this package needed)."""
    from safetensors.torch import load_file


    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if config.get("format") != SAFETENSORS_FORMAT:
        raise NagError(f"{folder}/config.json is not a `nag export --format safetensors` config "
                       f"(format {config.get('format')!r}, expected {SAFETENSORS_FORMAT!r}).")
    model = Transformer(ModelConfig.from_dict(config["model_config"]))
    state = load_file(str(folder / "model.safetensors"))
    for name, source in config["tied_weights"].items():
        state[name] = state[source]
    model.load_state_dict(state)
    return model.eval()


COMMAND = TypedCommand(export)
add_arguments, normalise = COMMAND.add_to, COMMAND.normalise


def run(args) -> None:
    COMMAND(args)
