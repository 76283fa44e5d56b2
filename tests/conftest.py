import os
import sysconfig
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run on CPU tensors only under the interpreter, which must be chosen before
# `import triton`; on a machine with a GPU, unset it to test the compiled kernels.
if not os.environ.get("NAG_TEST_TRITON_ON_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# A small slice of real text, present on every machine: a few standard-library packages.
TINY_CORPUS = [str(STDLIB / "json"), str(STDLIB / "email" / "*.py"), str(STDLIB / "argparse.py")]
TINY_VOCAB = 512
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A dataset folder built once per session by the real `prepare`."""
    from nag_lightning.data import PrepareSettings, prepare

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(out, PrepareSettings(TINY_CORPUS, vocab_size=TINY_VOCAB, val_fraction=0.2), log=lambda *_: None)
    return out


def tiny_model_config(**overrides):
    from nag_lightning.model import ModelConfig

    values = dict(vocab_size=TINY_VOCAB, context_length=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
    values.update(overrides)
    return ModelConfig(**values)
