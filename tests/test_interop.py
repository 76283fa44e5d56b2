"""`nag export` and `nag eval` through the real command, on checkpoints of real (tiny) runs; no network."""

import json
import math
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import nag

transformers = pytest.importorskip("transformers")

PROMPT = "import json\ndef "


@pytest.fixture(autouse=True)
def _own_remote_code_cache(tmp_path, monkeypatch):
    """Remote code loads from a modules cache: the test's own, not the user's ~/.cache."""
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))


def package_model(ckpt):
    from nag_lightning.interop.export import load_checkpoint

    return load_checkpoint(str(ckpt))


def with_thresholds(ckpt, folder, rate=0.3):
    """A copy of ``ckpt`` whose NAG thresholds skip about ``rate`` of a forward over real text."""
    model, tokenizer = package_model(ckpt)
    tokens = torch.tensor([tokenizer.encode(textwrap.dedent(json.__doc__ or "") * 4).ids[:32]])
    with torch.no_grad():
        out = model(tokens, return_record=True, calibrate=rate)
    model.skip_policy.calibrate_from(out.record, rate)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    checkpoint["state_dict"]["model.skip_policy.thresholds"] = model.skip_policy.thresholds.clone()
    path = folder / f"skipping-{ckpt.name}"
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def skipping_checkpoint(tiny_checkpoints, tmp_path_factory):
    return with_thresholds(tiny_checkpoints["nag"], tmp_path_factory.mktemp("skipping"))


def export(ckpt, output, *extra):
    code, out, err = nag("export", "--ckpt_path", str(ckpt), "--output", str(output), *extra)
    assert code == 0, err
    return output


@pytest.mark.parametrize("name", ["prenorm", "nag", "nag-skipping"])
def test_the_exported_folder_gives_the_checkpoints_logits_and_nag_generates_text(name, tiny_checkpoints,
                                                                                 skipping_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = skipping_checkpoint if name == "nag-skipping" else tiny_checkpoints[name]
    folder = export(ckpt, tmp_path / "hf", *(["--skip"] if name == "nag-skipping" else []))
    assert {"config.json", "model.safetensors", "modeling_nag.py", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference, _ = package_model(ckpt)
    ids = tokenizer(PROMPT * 3, return_tensors="pt").input_ids[:, :32]
    with torch.no_grad():
        expected = reference(ids, return_record=True)
        logits = model(ids).logits
    torch.testing.assert_close(logits, expected.logits, atol=1e-5, rtol=0)
    if name == "nag-skipping":
        realized = expected.record.stats().skip_rate.item()
        assert realized > 0.1 and model.last_skip_rate == pytest.approx(realized, abs=1e-6)

    # Greedy decoding: the exported model's generate() and `nag generate` give the same text.
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    generated = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert generated.shape[1] == prompt.shape[1] + 12
    assert torch.equal(generated, reference.generate(prompt, 12, temperature=0))
    code, out, err = nag("generate", "--ckpt_path", str(ckpt), "--prompt", PROMPT, "--max_new_tokens", "12",
                         "--temperature", "0", "--precision", "32-true")
    assert code == 0, err
    assert out.rstrip("\n") == tokenizer.decode(generated[0]).rstrip("\n")


def test_the_exported_folder_loads_where_the_package_cannot_be_imported(tiny_checkpoints, tmp_path):
    folder = export(tiny_checkpoints["nag"], tmp_path / "hf")
    assert "nag_lightning" not in "".join(line for line in (folder / "modeling_nag.py").read_text().splitlines()
                                          if line.startswith(("import", "from")))
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["nag_lightning"] = None  # any import of the package fails
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).float().eval()
        tokenizer = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
        ids = tokenizer({PROMPT!r}, return_tensors="pt").input_ids
        with torch.no_grad():
            print(json.dumps(model(ids).logits[0, -1].tolist()))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          stdin=subprocess.DEVNULL,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    reference, tokenizer = package_model(tiny_checkpoints["nag"])
    with torch.no_grad():
        expected = reference(torch.tensor([tokenizer.encode(PROMPT).ids]))[0, -1]
    torch.testing.assert_close(torch.tensor(json.loads(done.stdout)), expected, atol=1e-5, rtol=0)


def test_the_safetensors_export_reloads_to_the_same_model(tiny_checkpoints, tmp_path):
    from nag_lightning.interop.export import load_plain

    folder = export(tiny_checkpoints["nag"], tmp_path / "plain", "--format", "safetensors")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    reference, tokenizer = package_model(tiny_checkpoints["nag"])
    ids = torch.tensor([tokenizer.encode(PROMPT).ids])
    with torch.no_grad():
        assert torch.equal(load_plain(folder)(ids), reference(ids))


def test_export_refuses_what_it_cannot_do_in_one_line(tiny_checkpoints, tmp_path, monkeypatch):
    from nag_lightning.errors import NagError
    from nag_lightning.interop.export import check_strategy
    from nag_lightning.model.residual import PreNorm

    ckpt, folder = str(tiny_checkpoints["prenorm"]), export(tiny_checkpoints["prenorm"], tmp_path / "hf")
    before = (folder / "model.safetensors").read_bytes()
    code, _, err = nag("export", "--ckpt_path", ckpt, "--output", str(folder))
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (folder / "model.safetensors").read_bytes() == before  # nothing touched
    code, _, err = nag("export", "--ckpt_path", ckpt, "--output", str(folder), "--skip")
    assert code == 2 and "nag export --skip: PreNorm has no gate" in err
    export(ckpt, folder, "--overwrite")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind

    class OwnStrategy(PreNorm):
        pass

    model, _ = package_model(ckpt)
    model.residual = OwnStrategy()
    with pytest.raises(NagError, match="not one the exported model implements"):
        check_strategy(model)

    monkeypatch.setitem(sys.modules, "transformers", None)
    code, _, err = nag("export", "--ckpt_path", ckpt, "--output", str(tmp_path / "other"))
    assert code == 2 and 'pip install "nag-lightning[hf]"' in err and len(err.strip().splitlines()) == 1


# ---- nag eval: lm-eval-harness on local tasks ----
CHOICES = [
    {"question": "import json\ndef", "choices": [" load", " x = [", " ]"], "answer": 0},
    {"question": "class Parser:\n   ", "choices": [" def", " ==", " import"], "answer": 0},
    {"question": "for key in", "choices": [" range", " self", " ("], "answer": 1},
    {"question": "return", "choices": [" None", " self", " 0"], "answer": 2},
]
TEXTS = [{"text": "import os\nimport sys\n"}, {"text": "def parse(self, text):\n    return text\n"},
         {"text": "class Message:\n    pass\n"}]


def write_tasks(folder):
    """Two local lm-eval tasks: multiple choice and rolling log-likelihood (perplexity)."""
    folder.mkdir()
    for name, rows in (("choice", CHOICES), ("text", TEXTS)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "tiny_choice.yaml").write_text(textwrap.dedent(f"""
        task: tiny_choice
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {folder / 'choice.jsonl'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        target_delimiter: ""
        metric_list:
          - metric: acc
    """))
    (folder / "tiny_text.yaml").write_text(textwrap.dedent(f"""
        task: tiny_text
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {folder / 'text.jsonl'}
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: "{{{{text}}}}"
        doc_to_target: "{{{{text}}}}"
        metric_list:
          - metric: word_perplexity
          - metric: bits_per_byte
    """))
    return folder


def log_likelihood(model, context, continuation):
    """Sum of log p(continuation tokens | everything before them) under the package's model."""
    tokens = context + continuation
    with torch.no_grad():
        logits = model(torch.tensor([tokens]))[0].double().log_softmax(-1)
    return sum(logits[i - 1, tokens[i]].item() for i in range(len(context), len(tokens)))


def test_eval_scores_local_tasks_as_a_hand_computation_does(tiny_checkpoints, skipping_checkpoint, tmp_path,
                                                            monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = write_tasks(tmp_path / "tasks")
    for ckpt, skip in ((tiny_checkpoints["nag"], []), (skipping_checkpoint, ["--skip"])):
        code, out, err = nag("eval", "--ckpt_path", str(ckpt), "--tasks", "tiny_choice,tiny_text",
                             "--include_path", str(tasks), "--output", str(tmp_path / "eval.json"), *skip)
        assert code == 0, err
        report = json.loads((tmp_path / "eval.json").read_text())
        assert "tiny_choice" in (tmp_path / "eval.md").read_text()
        results = report["results"]
        model, tokenizer = package_model(ckpt)
        if skip:  # the scores are the skipping model's, and the rate it realized is beside them
            assert 0.05 < report["nag"]["realized_skip_rate"] < 0.6
        else:
            assert report["nag"]["realized_skip_rate"] == 0.0
        encode = lambda text: tokenizer.encode(text).ids  # noqa: E731
        correct = [max(range(3), key=lambda i: log_likelihood(model, encode(doc["question"]),
                                                              encode(doc["question"] + doc["choices"][i])[
                                                                  len(encode(doc["question"])):]))
                   == doc["answer"] for doc in CHOICES]
        assert results["tiny_choice"]["acc,none"] == pytest.approx(sum(correct) / len(CHOICES))
        end_of_text = tokenizer.token_to_id("<|endoftext|>")
        total = sum(log_likelihood(model, [end_of_text], encode(doc["text"])) for doc in TEXTS)
        n_bytes = sum(len(doc["text"].encode()) for doc in TEXTS)
        n_words = sum(len(re.split(r"\s+", doc["text"])) for doc in TEXTS)  # lm-eval's word count
        assert results["tiny_text"]["bits_per_byte,none"] == pytest.approx(-total / n_bytes / math.log(2), rel=1e-5)
        assert results["tiny_text"]["word_perplexity,none"] == pytest.approx(math.exp(-total / n_words), rel=1e-5)
    # The exported folder of the skipping checkpoint scores the same, skipping the same share.
    folder = export(skipping_checkpoint, tmp_path / "hf", "--skip")
    code, _, err = nag("eval", "--hf", str(folder), "--tasks", "tiny_choice,tiny_text", "--include_path", str(tasks),
                       "--skip")
    assert code == 0, err
    from_folder = json.loads((folder / "eval-tiny_choice-tiny_text.json").read_text())
    assert from_folder["nag"]["realized_skip_rate"] == pytest.approx(report["nag"]["realized_skip_rate"], abs=1e-9)
    for task, metric in (("tiny_choice", "acc,none"), ("tiny_text", "bits_per_byte,none")):
        assert from_folder["results"][task][metric] == pytest.approx(results[task][metric], rel=1e-6)


def test_eval_bad_input_is_one_line(tiny_checkpoints, tmp_path):
    ckpt, tasks = str(tiny_checkpoints["prenorm"]), str(write_tasks(tmp_path / "tasks"))
    for args, expected in ((("--tasks", "tiny_text"), "exactly one of --ckpt_path"),
                           (("--ckpt_path", ckpt, "--tasks", "no_such_task_here"), "unknown task"),
                           (("--ckpt_path", ckpt, "--tasks", "x", "--include_path", str(tmp_path / "missing")),
                            "is not a folder"),
                           (("--ckpt_path", ckpt, "--skip", "--tasks", "tiny_text", "--include_path", tasks),
                            "nag eval --skip: PreNorm has no gate")):
        code, _, err = nag("eval", *args)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
