"""Safe-by-default parts of the service (issue 15), without Ray: tokens, binding, rate limit, scrubbing,
caller-scoped datastore ids and per-caller session quotas."""

from __future__ import annotations

import os
import time

import pytest

from trainer.serve.errors import ApiError

GOOD = "a" * 32


def test_tokens_shorter_than_32_chars_refused(monkeypatch, tmp_path):
    from trainer.serve.settings import ServeArgs

    monkeypatch.setenv("T_SHORT", "short-token")
    with pytest.raises(ValueError, match="fewer than 32"):
        ServeArgs(checkpoint="x.pt", auth_token_env="T_SHORT").auth_token()
    monkeypatch.setenv("T_OK", GOOD + "\n")
    assert ServeArgs(checkpoint="x.pt", auth_token_env="T_OK").auth_token() == GOOD
    f = tmp_path / "token"
    f.write_text(GOOD + "\n")
    assert ServeArgs(checkpoint="x.pt", auth_token_file=str(f)).auth_token() == GOOD
    with pytest.raises(ValueError, match="cannot be read"):
        ServeArgs(checkpoint="x.pt", auth_token_file=str(tmp_path / "missing")).auth_token()
    with pytest.raises(ValueError, match="not both"):
        ServeArgs(checkpoint="x.pt", auth_token_env="T_OK", auth_token_file=str(f))


def test_token_file_is_reread_when_it_changes(tmp_path, monkeypatch):
    from trainer.serve import ingress
    from trainer.serve.settings import read_token_file

    monkeypatch.setattr(ingress, "TOKEN_RECHECK_S", 0.0)
    f = tmp_path / "token"
    f.write_text(GOOD)
    source = ingress.TokenSource(read_token_file(str(f)), str(f), read_token_file)
    assert source.get() == GOOD
    new = "b" * 40
    f.write_text(new)
    os.utime(f, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert source.get() == new  # rotated without a restart
    f.write_text("short")  # a bad rotation keeps the previous token
    os.utime(f, ns=(time.time_ns() + 2 * 10**9, time.time_ns() + 2 * 10**9))
    assert source.get() == new


def test_non_loopback_bind_needs_a_token_or_insecure(monkeypatch):
    from trainer.serve.cli import check_bind
    from trainer.serve.settings import ServeArgs

    open_args = ServeArgs(checkpoint="x.pt")
    check_bind("127.0.0.1", open_args, insecure=False)
    with pytest.raises(ValueError, match="--insecure"):
        check_bind("0.0.0.0", open_args, insecure=False)
    check_bind("0.0.0.0", open_args, insecure=True)
    monkeypatch.setenv("T_OK", GOOD)
    check_bind("0.0.0.0", ServeArgs(checkpoint="x.pt", auth_token_env="T_OK"), insecure=False)


def test_cli_serve_refuses_public_bind_without_token(tmp_path, capsys):
    from trainer.cli import main

    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"x")  # only its existence is checked before the bind check
    assert main(["serve", "--checkpoint", str(ckpt), "--host", "0.0.0.0", "--port", "8999"]) == 2
    assert "--insecure" in capsys.readouterr().err


def test_rate_limiter_window():
    from trainer.serve.ingress import RateLimiter

    limiter = RateLimiter(3, max_keys=2)
    assert [limiter.allow("a", now=t) for t in (0, 1, 2, 3)] == [True, True, True, False]
    assert limiter.allow("b", now=3) and limiter.allow("a", now=61)  # the window slides
    limiter.allow("c", now=62)
    assert len(limiter._log) <= 2  # bounded memory


def test_scrub_removes_paths_uris_endpoints():
    from trainer.serve.errors import scrub

    text = (
        "CheckpointError: checkpoint '/srv/runs/x/best.pt' does not exist; s3://bucket/key/best.pt at "
        "http://minio.internal:9000/ (10.0.0.5:9000, seaweed.local:8333)"
    )
    out = scrub(text)
    for secret in ("/srv/runs", "bucket/key", "minio.internal", "10.0.0.5", "seaweed.local"):
        assert secret not in out
    assert out.startswith("CheckpointError: checkpoint '<redacted>' does not exist")


def test_datastore_ids_scoped_to_caller_and_never_overwritten():
    from trainer.serve.sessions import SessionStore

    store = SessionStore(ttl_s=100, max_bytes=1000)
    store.put_image("case_001", "A", 10, {}, owner="alice", digest="da")
    store.put_image("case_001", "B", 10, {}, owner="bob", digest="db")  # another caller: its own id
    assert store.get_image("case_001", "alice").value == "A" and store.get_image("case_001", "bob").value == "B"
    with pytest.raises(ApiError) as e:
        store.get_image("case_001", "anon")  # anonymous callers never see an authenticated caller's ids
    assert e.value.status == 404
    with pytest.raises(ApiError) as e:
        store.put_image("case_001", "C", 10, {}, owner="alice", digest="dc")
    assert e.value.status == 409 and store.get_image("case_001", "alice").value == "A"
    store.put_image("case_001", "A2", 10, {}, owner="alice", digest="da")  # the same volume again: fine


def test_one_caller_cannot_evict_the_others():
    from trainer.serve.sessions import SessionStore

    store = SessionStore(ttl_s=100, max_bytes=1000, caller_max_entries=3, caller_max_bytes=500)
    victim = store.create("V", 100, {}, owner="victim")
    for _ in range(50):
        store.create("X", 100, {}, owner="greedy")
    assert store.get(victim).value == "V"
    assert store.stats()["bytes"] <= 1000
    mine = [e for e in store._entries.values() if e.owner == "greedy"]
    assert len(mine) == 3  # the greedy caller's own oldest sessions went
    with pytest.raises(ApiError) as e:
        store.create("huge", 501, {}, owner="greedy")
    assert e.value.status == 413 and "caller_max_share" in e.value.detail
