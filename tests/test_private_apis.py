"""The libraries' private names this package relies on: each used in exactly one place, listed
here, and checked to still behave as that place needs, so an upgrade that changes one fails here
first rather than in a user's run. A new private name anywhere in the package fails the inventory."""

from __future__ import annotations

import re
import tokenize
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[1] / "nag_lightning"
KERNELS = Path(__file__).resolve().parents[1] / "kernels"

# Each private name found (as ``private_uses`` spells it) -> the one file allowed to use it, and
# why there is no public way.
ALLOWED = {
    "_get_file_writer": ("nag_lightning/lightning/dashboard.py",
                         "SummaryWriter's events file, where the HPARAMS session must go (Lightning's logger does the same)"),
    "_OBSTORE_CLIENT_OPTIONS": ("nag_lightning/data/remote.py", "litdata has no option for plain-http S3 endpoints"),
    "_dynamo.maybe_mark_dynamic": ("nag_lightning/model/packing.py", "torch has no public spelling of it"),
    "_dynamo": ("nag_lightning/model/parallelize.py", "imported for its config, next"),
    "_dynamo.config": ("nag_lightning/model/parallelize.py", "the recompile limit has no public setting"),
    "_dynamo.utils": ("nag_lightning/commands/bench.py", "graph-break counts: torch has no public counter"),
    "torch._dynamo.utils:counters": ("nag_lightning/commands/bench.py", "the same counters, imported"),
    "_version": ("nag_lightning/model/residual/nag.py", "in-place updates of a weight, to refresh a cache"),
}
# The exported modeling file travels alone and cannot import the package: it keeps its own copy.
COPIES = {"nag_lightning/interop/modeling_nag.py": {"_version"}}

DOCUMENTED = {"_replace", "_fields", "_asdict", "_make"}  # named tuples' public API


def dotted_chains(path: Path) -> list[list[str]]:
    """Every ``a.b.c`` in a file's code (not in strings or comments), as its names."""
    chains, chain, after_dot = [], [], False
    with path.open("rb") as source:
        for token in tokenize.tokenize(source.readline):
            if token.type == tokenize.NAME and (after_dot or not chain):
                chain.append(token.string)
                after_dot = False
            elif token.type == tokenize.OP and token.string == "." and chain and not after_dot:
                after_dot = True
            else:
                if len(chain) > 1:
                    chains.append(chain)
                chain, after_dot = ([token.string] if token.type == tokenize.NAME else []), False
    return chains


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in DOCUMENTED


def private_uses() -> dict[str, set[str]]:
    """Private names of other libraries the package reaches, each with the files that do."""
    root = PACKAGE.parent
    files = [*PACKAGE.rglob("*.py"), *KERNELS.rglob("*.py")]
    ours = set()  # private names the package defines itself (methods, helpers): not a library's
    for path in files:
        ours |= {name for pair in re.findall(r"^\s*(?:def|class)\s+(_\w+)|^\s*(?:self\.)?(_\w+)\s*[:=]",
                                              path.read_text(), re.M) for name in pair if name}
    ours |= {path.stem for path in files}  # the package's own private modules (kernels/_triton.py)
    found: dict[str, set[str]] = {}
    for path in files:
        place = path.relative_to(root).as_posix()
        for chain in dotted_chains(path):
            own = chain[0] in ("self", "cls")  # self._x is the object's own; self.x._y is x's
            for index, name in enumerate(chain[2 if own else 1:], start=2 if own else 1):
                if is_private(name) and name not in ours:
                    found.setdefault(".".join(chain[index:index + 2]), set()).add(place)
                    break
        for name in re.findall(r"getattr\(\s*(?!self\b)[\w.]+\s*,\s*[\"'](_[A-Za-z]\w*)", path.read_text()):
            if is_private(name) and name not in ours:
                found.setdefault(name, set()).add(place)
        for module, names in re.findall(r"^\s*from\s+([\w.]+)\s+import\s+([^\n]+)", path.read_text(), re.M):
            if module.startswith(("nag_lightning", ".")) or module == "__future__":
                continue
            if any(is_private(part) for part in module.split(".")) or any(
                    is_private(name.strip(" ()")) for name in names.split(",")):
                found.setdefault(f"{module}:{names.strip()}", set()).add(place)
    return found


def test_every_private_name_the_package_uses_is_listed_and_used_in_one_place():
    found = private_uses()
    unlisted = {name: places for name, places in found.items() if name not in ALLOWED}
    assert not unlisted, f"private library names used but not listed in ALLOWED (find a public API or list it): {unlisted}"
    for key, (place, _why) in ALLOWED.items():
        places = found.get(key, set())
        copies = {p for p, names in COPIES.items() if key in names}
        assert places - copies == {place}, f"{key} is used in {sorted(places)}; it belongs in {place} only"


def test_the_inventory_sees_a_private_attribute_and_a_private_import(tmp_path, monkeypatch):
    probe = PACKAGE / "lightning" / "_probe_private_use.py"
    probe.write_text("from lightning.fabric.utilities.logger import _flatten_dict\nx = trainer._results\n")
    try:
        found = private_uses()
    finally:
        probe.unlink()
    assert "_results" in found
    assert any(name.startswith("lightning.fabric.utilities.logger:") for name in found)


def test_summary_writer_still_hands_out_its_events_file_writer(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    try:
        assert callable(writer._get_file_writer().add_summary)
        assert writer._get_file_writer().get_logdir() == str(tmp_path)
    finally:
        writer.close()


def test_litdata_still_keeps_its_obstore_client_options_as_a_dict():
    from litdata.streaming import downloader

    assert isinstance(downloader._OBSTORE_CLIENT_OPTIONS, dict)


def test_dynamo_still_offers_maybe_mark_dynamic_the_recompile_limit_and_its_counters():
    import torch._dynamo
    from torch._dynamo.utils import counters

    tensor = torch.zeros(4, 3)
    torch._dynamo.maybe_mark_dynamic(tensor, 0)  # marks; raises if the name or signature changed
    assert isinstance(torch._dynamo.config.recompile_limit, int)
    assert hasattr(counters, "__getitem__") and isinstance(counters["graph_break"], dict)


def test_a_tensor_version_counter_moves_on_in_place_updates():
    weight = torch.zeros(3)
    before = weight._version
    weight.add_(1)
    assert weight._version > before
    with torch.no_grad():
        weight.copy_(torch.ones(3))
    assert weight._version > before + 1


@pytest.mark.parametrize("hook", ["parse_arguments", "before_instantiate_classes", "instantiate_trainer"])
def test_nag_cli_overrides_public_lightning_cli_hooks_only(hook):
    """NagCLI uses LightningCLI's public hooks only; each still exists under the name it overrides."""
    from lightning.pytorch.cli import LightningCLI

    from nag_lightning.lightning.cli import NagCLI

    assert hasattr(LightningCLI, hook) and getattr(NagCLI, hook) is not getattr(LightningCLI, hook)
    overridden = {name for name in vars(NagCLI) if name.startswith("_") and not name.startswith("__")}
    assert overridden == set(), f"NagCLI overrides private LightningCLI methods: {overridden}"
