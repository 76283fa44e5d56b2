"""Datasets in object storage, against a real S3-compatible server on 127.0.0.1 (moto's server
mode, credentials enforced): `nag prepare --output s3://...`, training that streams from the
bucket (one process: the same blocks as the local copy, exact resume; two processes: disjoint
ranks), and one clear error for a missing bucket, refused credentials and an unreachable endpoint."""

import json
import os
import socket

import pytest
import torch

from conftest import REPO, TINY_CORPUS, TINY_VOCAB
from nag_lightning.data import PrepareSettings, TokenShardDataModule, prepare
from nag_lightning.errors import NagError
from test_cli import TINY, run_main
from test_distributed import DDP, nag, recorded

URL = "s3://nag-data/tiny"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto server with an IAM user allowed everything on S3; every request after setup must be
    signed with that user's key."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                            "AWS_ACCESS_KEY_ID": "setup", "AWS_SECRET_ACCESS_KEY": "setup",
                            "NAG_CACHE": str(tmp_path_factory.mktemp("cache"))}.items():
            patch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            patch.delenv(name, raising=False)
        iam = boto3.session.Session().client("iam")
        iam.create_user(UserName="trainer")
        iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        # From here on every request is authenticated against IAM (the server runs in this process;
        # the same switch as moto's /moto-api/reset-auth).
        from moto import settings
        from moto.core.responses import ActionAuthenticatorMixin

        patch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
        patch.setattr(ActionAuthenticatorMixin, "request_count", 0)
        patch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        patch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        boto3.session.Session().client("s3").create_bucket(Bucket="nag-data")
        messages = []
        prepare(URL, PrepareSettings(TINY_CORPUS, vocab_size=TINY_VOCAB, val_fraction=0.2), log=messages.append)
        yield endpoint, messages
    server.stop()


def test_prepare_uploads_a_self_describing_dataset_and_reruns_are_a_noop(s3, tiny_data):
    import boto3

    _, messages = s3
    assert messages[-1] == f"Uploaded to {URL}."
    keys = {o["Key"] for o in boto3.session.Session().client("s3").list_objects_v2(Bucket="nag-data")["Contents"]}
    assert {"tiny/meta.json", "tiny/tokenizer.json", "tiny/train/index.json", "tiny/val/index.json"} <= keys
    again = []
    prepare(URL, PrepareSettings(TINY_CORPUS, vocab_size=TINY_VOCAB, val_fraction=0.2), log=again.append)
    assert again[-1].endswith("up to date (same corpus and settings); nothing to upload.")
    with pytest.raises(NagError, match="already holds a dataset built from other inputs"):
        prepare(URL, PrepareSettings(TINY_CORPUS, vocab_size=TINY_VOCAB, val_fraction=0.3), log=again.append)
    local = json.loads((tiny_data / "meta.json").read_text())
    remote = TokenShardDataModule(URL, context_length=32, batch_size=4)
    remote.setup("fit")
    assert remote.meta["corpus"]["fingerprint"] == local["corpus"]["fingerprint"]  # the same inputs, the same dataset
    assert remote.tokenizer_path.read_text() == (tiny_data / "tokenizer.json").read_text()


def fit_in_process(capsys, data_dir, save_dir, steps, *extra):
    code, printed, err = run_main(["fit", "--config", TINY, "--data.init_args.data_dir", str(data_dir),
                                   "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.max_steps",
                                   str(steps), "--trainer.val_check_interval", str(steps),
                                   "--trainer.enable_progress_bar", "false", *extra], capsys)
    assert code == 0, err
    return printed


def test_training_streams_the_same_blocks_from_the_bucket_and_resumes_exactly(s3, tiny_data, tmp_path, capsys):
    def record(folder):
        return ["--trainer.callbacks+=recorders.BatchRecorder", f"--trainer.callbacks.folder={tmp_path / folder}"]

    fit_in_process(capsys, tiny_data, tmp_path / "local", 6, *record("local"))
    fit_in_process(capsys, URL, tmp_path / "remote", 6, *record("remote"))
    local_losses, local_batches = recorded(tmp_path / "local", 0)
    remote_losses, remote_batches = recorded(tmp_path / "remote", 0)
    assert all(torch.equal(a, b) for a, b in zip(local_batches, remote_batches)) and len(remote_batches) == 6
    assert [e["loss"] for e in remote_losses] == [e["loss"] for e in local_losses]

    fit_in_process(capsys, URL, tmp_path / "half", 3, "--trainer.logger.init_args.version", "half")
    ckpt = tmp_path / "half/tiny/half/checkpoints/last.ckpt"
    fit_in_process(capsys, URL, tmp_path / "resumed", 6, "--ckpt_path", str(ckpt), *record("resumed"))
    resumed_losses, resumed_batches = recorded(tmp_path / "resumed", 0)
    assert [e["step"] for e in resumed_losses] == [4, 5, 6]
    assert all(torch.equal(a, b) for a, b in zip(resumed_batches, remote_batches[3:]))
    assert [e["loss"] for e in resumed_losses] == pytest.approx([e["loss"] for e in remote_losses[3:]], rel=1e-6)


def test_loader_workers_stream_from_a_plain_http_endpoint(s3, tmp_path, capsys):
    """Worker processes (forked for training, from a fork server for validation) download chunks
    from the http:// endpoint too: obstore's ``allow_http`` is set in each of them."""
    printed = fit_in_process(capsys, URL, tmp_path / "workers", 3, "--data.init_args.num_workers", "1",
                             "--trainer.limit_val_batches", "2")
    assert "nag fit done: val_loss" in printed


def test_two_processes_stream_disjoint_blocks_from_the_bucket(s3, tmp_path):
    result = nag("fit", "--config", TINY, "--config", DDP, "--trainer.devices", "2", "--data.init_args.data_dir", URL,
                 "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1",
                 "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=recorders.BatchRecorder",
                 f"--trainer.callbacks.folder={tmp_path / 'rec'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    seen = [{tuple(row.tolist()) for batch in recorded(tmp_path / "rec", rank)[1] for row in batch} for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 4 * 4
    assert not seen[0] & seen[1]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_missing_bucket_refused_credentials_and_no_endpoint_are_one_clear_error(s3, capsys, monkeypatch):
    endpoint, _ = s3
    cases = [({}, "s3://no-such-bucket/tiny", "the bucket of s3://no-such-bucket/tiny does not exist"),
             ({}, "s3://nag-data/nothing", "holds no complete dataset (no meta.json)"),
             ({"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1"}, URL, "refused the credentials"),
             ({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port()}"}, URL, "cannot reach the object store")]
    for env, url, message in cases:
        with monkeypatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            code, _, err = run_main(["fit", "--config", TINY, "--data.init_args.data_dir", url,
                                     "--trainer.logger=false"], capsys)
            assert code == 2 and err.count("nag: error:") == 1 and message in err, (url, err)
            if "nothing" not in url:  # `nag prepare --output` checks the bucket before it tokenizes anything
                with pytest.raises(NagError, match=message):
                    prepare(url, PrepareSettings(TINY_CORPUS, vocab_size=TINY_VOCAB), log=lambda *_: None)
