"""The Python SDK against a real `meridian dev` deployment."""

import json
import threading
import time
import uuid

import pytest

import meridian
from meridian import MeridianError

WAIT = 30


def fresh_id(prefix: str) -> str:
    return f"py/{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def client(dev):
    client = meridian.Client.from_config(dev.config)
    yield client
    client.close()


def test_edits_by_path_become_durable_and_reach_a_second_client(dev, client):
    doc_id = fresh_id("edits")
    doc = client.open(doc_id)
    doc.wait_synced(WAIT)
    doc.put(["title"], "Groceries")
    doc.put(["meta", "tags"], ["a", 1, 2.5, True, None, {"deep": {"er": "x"}}])
    doc.put(["meta", "tags", 6], "appended")
    doc.put(["meta", "tags", 0], "first")
    doc.put_text(["body"], "milk, eggs")
    doc.splice_text(["body"], 0, 0, "bread, ")
    doc.splice_text(["body"], 0, 5, "Toast")
    doc.put_counter(["count"], 5)
    doc.increment(["count"], -2)
    doc.put(["gone"], 1)
    doc.delete(["gone"])
    doc.wait_durable(WAIT)
    expected = {
        "title": "Groceries",
        "meta": {"tags": ["first", 1, 2.5, True, None, {"deep": {"er": "x"}}, "appended"]},
        "body": "Toast, milk, eggs",
        "count": 3,
    }
    assert json.loads(doc.to_json()) == expected
    heads = doc.heads()
    assert len(heads) == 1 and len(heads[0]) == 64

    with meridian.Client.from_config(dev.config) as other:
        copy = other.open(doc_id)
        copy.wait_synced(WAIT)
        deadline = time.monotonic() + WAIT
        while copy.heads() != heads and time.monotonic() < deadline:
            time.sleep(0.05)
        assert copy.to_dict() == expected
        assert copy.heads() == heads


def test_a_listener_sees_a_change_made_by_the_rust_cli(dev, client):
    doc_id = fresh_id("listen")
    doc = client.open(doc_id)
    doc.wait_synced(WAIT)
    seen = []
    arrived = threading.Event()

    def on_change(heads):
        if "from-cli" in doc.to_json():
            seen.append((time.monotonic(), heads))
            arrived.set()

    subscription = doc.on_change(on_change)
    started = time.monotonic()
    out = dev.cli("doc", "set", "--config", dev.config, doc_id, "from-cli", "hello")
    assert arrived.wait(WAIT), "no change reported within the timeout"
    at, heads = seen[0]
    assert heads == out.split()
    assert doc.to_dict() == {"from-cli": "hello"}
    # Reported, not asserted: the machines are shared.
    print(f"CLI command start to Python listener: {(at - started) * 1000:.0f} ms")
    subscription.cancel()


def test_python_and_the_cli_edit_one_text_concurrently_and_converge(dev, client):
    doc_id = fresh_id("text")
    doc = client.open(doc_id)
    doc.wait_synced(WAIT)
    doc.put_text(["text"], "hello world")
    doc.wait_durable(WAIT)

    # The CLI inserts at the front while Python appends at the end, at the same time.
    cli = threading.Thread(
        target=lambda: [
            dev.cli("doc", "splice", "--config", dev.config, doc_id, "text", "0", "0", f"cli{i} ")
            for i in range(3)
        ]
    )
    cli.start()
    for i in range(20):
        length = len(doc.to_dict()["text"])
        doc.splice_text(["text"], length, 0, f" py{i}")
    cli.join()
    doc.wait_durable(WAIT)

    from_cli = json.loads(dev.cli("doc", "get", "--config", dev.config, doc_id))
    deadline = time.monotonic() + WAIT
    while doc.to_dict() != from_cli and time.monotonic() < deadline:
        time.sleep(0.1)
        from_cli = json.loads(dev.cli("doc", "get", "--config", dev.config, doc_id))
    text = doc.to_dict()["text"]
    assert doc.to_dict() == from_cli
    for i in range(3):
        assert f"cli{i} " in text
    for i in range(20):
        assert f" py{i}" in text
    assert "hello world" in text


def test_wrong_types_and_bad_input_raise_typed_errors(client):
    doc = client.open(fresh_id("errors"))
    bad_values = [object(), {1, 2}, float("nan"), float("inf"), 2**64, -(2**63) - 1, {1: "x"}, b"x"]
    for value in bad_values:
        with pytest.raises(MeridianError.InvalidValue):
            doc.put(["k"], value)
    for path in ["k", None, [True], [1.5], [-1], [b"k"]]:
        with pytest.raises(MeridianError.InvalidPath):
            doc.put(path, 1)
    with pytest.raises(MeridianError.InvalidPath):
        doc.put([], 1)
    doc.put(["n"], 1)
    with pytest.raises(MeridianError.InvalidPath):
        doc.put(["n", "below"], 1)  # a value in the way is not overwritten
    with pytest.raises(MeridianError.InvalidPath):
        doc.splice_text(["n"], 0, 0, "x")
    with pytest.raises(MeridianError.InvalidPath):
        doc.increment(["n"], 1)
    with pytest.raises(MeridianError.InvalidPath):
        doc.delete(["missing"])
    with pytest.raises(MeridianError.InvalidValue):
        doc.splice_text(["n"], -1, 0, "x")
    with pytest.raises(MeridianError.InvalidValue):
        doc.wait_synced("soon")
    with pytest.raises(MeridianError.InvalidValue):
        doc.wait_synced(-1)
    with pytest.raises(MeridianError.InvalidValue):
        doc.apply_changes([b"not a change"])
    with pytest.raises(MeridianError.InvalidValue):
        doc.load(b"not a document")
    with pytest.raises(MeridianError.InvalidValue):
        doc.to_json_at(["zz"])
    with pytest.raises(MeridianError.InvalidValue):
        doc.to_json_at(["00" * 32])
    for doc_id in ["bad id!", "", "x" * 1000, 42]:
        with pytest.raises(MeridianError.InvalidDocument):
            client.open(doc_id)
    # Nothing was stored by the refused edits.
    assert doc.to_dict() == {"n": 1}


def test_configuration_and_token_errors_are_typed(dev, tmp_path):
    with pytest.raises(MeridianError.Config):
        meridian.Client.from_config(str(tmp_path / "missing.toml"))
    broken = tmp_path / "client.toml"
    broken.write_text('endpoint = "127.0.0.1:1"\n')
    with pytest.raises(MeridianError.Config):
        meridian.Client.from_config(str(broken))
    text = open(dev.config).read()
    token = text.split('token = "')[1].split('"')[0]
    ca_path = text.split('ca_cert = "')[1].split('"')[0]
    endpoint = text.split('endpoint = "')[1].split('"')[0]
    with pytest.raises(MeridianError.Unauthorized):
        meridian.Client.connect(endpoint, token[:-4] + "AAAA", ca_pem=open(ca_path).read())
    # Explicit settings work as the file does.
    with meridian.Client.connect(endpoint, token, ca_pem=open(ca_path).read()) as client:
        client.wait_connected(WAIT)
        assert isinstance(client.state(), meridian.ConnectionState.CONNECTED)


def test_calls_after_close_raise_closed(dev):
    client = meridian.Client.from_config(dev.config)
    doc = client.open(fresh_id("closed"))
    client.close()
    client.close()  # harmless
    with pytest.raises(MeridianError.Closed):
        client.open(fresh_id("after"))
    with pytest.raises(MeridianError.Closed):
        doc.put(["k"], 1)
    with pytest.raises(MeridianError.Closed):
        doc.to_json()
    with pytest.raises(MeridianError.Closed):
        doc.wait_synced(1)
    with pytest.raises(MeridianError.Closed):
        client.pause()


def test_pause_keeps_edits_until_resume_and_waits_time_out(client):
    doc = client.open(fresh_id("pause"))
    doc.wait_synced(WAIT)
    states = []
    subscription = client.on_state(states.append)
    client.pause()
    deadline = time.monotonic() + WAIT
    while not isinstance(client.state(), meridian.ConnectionState.PAUSED):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    doc.put(["offline"], "edit")
    with pytest.raises(MeridianError.Timeout):
        doc.wait_applied(0.3)
    assert doc.status().pending == 1
    client.resume()
    doc.wait_durable(WAIT)
    assert doc.status().pending == 0
    client.wait_connected(WAIT)
    subscription.cancel()
    assert any(isinstance(s, meridian.ConnectionState.PAUSED) for s in states)


def test_network_change_keeps_syncing_and_logs(client):
    records = []

    class Capture:
        def log(self, level, msg, *args):
            records.append(msg % args)

    import logging

    logger = logging.getLogger("meridian.test")
    logger.setLevel(logging.DEBUG)
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    meridian.set_logger(logger, logging.DEBUG)
    doc = client.open(fresh_id("rebind"))
    doc.wait_synced(WAIT)
    client.network_changed()
    doc.put(["after"], "rebind")
    doc.wait_durable(WAIT)
    deadline = time.monotonic() + WAIT
    while not any("fresh socket" in r for r in records) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("fresh socket" in r for r in records), records[-5:]
    meridian.set_logger(logger, logging.ERROR)


def test_raw_changes_save_load_history_and_presence(dev, client):
    first = client.open(fresh_id("raw-a"))
    first.wait_synced(WAIT)
    first.put(["v"], 1)
    old_heads = first.heads()
    first.put(["v"], 2)
    assert json.loads(first.to_json_at(old_heads)) == {"v": 1}
    changes = first.changes_since()
    assert len(changes) == 2 and all(isinstance(c, bytes) for c in changes)
    assert len(first.changes_since(old_heads)) == 1

    # Changes this client made move to another document of the same user.
    second = client.open(fresh_id("raw-b"))
    second.wait_synced(WAIT)
    second.apply_changes(changes)
    assert second.to_dict() == {"v": 2}
    third = client.open(fresh_id("raw-c"))
    third.wait_synced(WAIT)
    third.load(first.save())
    assert third.to_dict() == {"v": 2}
    third.wait_durable(WAIT)

    with meridian.Client.from_config(dev.config) as other:
        peer = other.open(first.id)
        peer.wait_synced(WAIT)
        first.set_presence(b"cursor:3")
        deadline = time.monotonic() + WAIT
        while not any(p.state == b"cursor:3" for p in peer.presence()):
            assert time.monotonic() < deadline, peer.presence()
            time.sleep(0.05)
    with pytest.raises(MeridianError.InvalidValue):
        first.set_presence(b"x" * (1 << 20))


def test_the_examples_run(dev):
    import subprocess
    import sys

    from conftest import ROOT

    examples = ROOT / "examples" / "python"
    doc_id = fresh_id("example-text")
    done = subprocess.run(
        [sys.executable, str(examples / "text_with_cli.py"), "--config", dev.config,
         "--meridian", dev.bin, "--words", "3", doc_id],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    python_line, cli_line = done.stdout.splitlines()[-2:]
    assert python_line.split(":", 1)[1].strip() == cli_line.split(":", 1)[1].strip()
    for word in ["rust0", "rust2", "py0", "py2"]:
        assert word in python_line

    watched = fresh_id("example-watch")
    watch = subprocess.Popen(
        [sys.executable, str(examples / "watch.py"), "--config", dev.config, "--count", "1", watched],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert watch.stdout.readline().startswith("synced")
        dev.cli("doc", "set", "--config", dev.config, watched, "k", "v")
        out, err = watch.communicate(timeout=60)
        assert watch.returncode == 0, err
        assert out.startswith("change") and '"k":"v"' in out
    finally:
        if watch.poll() is None:
            watch.kill()


def test_a_token_provider_keeps_a_short_lived_token_fresh(dev, tmp_path):
    def mint(ttl: str) -> str:
        return dev.cli(
            "token", "mint", "--tenant", "dev", "--user", "dev-user",
            "--key", str(dev.data_dir / "tenant.key"), "--ttl", ttl,
        ).strip()

    text = open(dev.config).read()
    old = text.split('token = "')[1].split('"')[0]
    config = tmp_path / "client.toml"
    config.write_text(text.replace(old, mint("6s")))
    calls = []

    def provider():
        calls.append(time.monotonic())
        return mint("1h")

    with meridian.Client.from_config(str(config), token_provider=provider) as client:
        doc = client.open(fresh_id("refresh"))
        doc.wait_synced(WAIT)
        time.sleep(8)  # past the first token's expiry
        doc.put(["after"], "expiry")
        doc.wait_durable(WAIT)
        assert calls, "the provider was never asked"
        assert isinstance(client.state(), meridian.ConnectionState.CONNECTED)


def test_history_and_restore_from_the_sdk_and_the_cli(dev, client):
    doc_id = fresh_id("history")
    doc = client.open(doc_id)
    doc.wait_synced(WAIT)
    doc.put(["title"], "draft")
    doc.put_text(["body"], "first words")
    doc.wait_durable(WAIT)
    draft = doc.to_dict()
    doc.put(["title"], "final")
    doc.delete(["body"])
    doc.put(["tags"], ["done"])
    doc.wait_durable(WAIT)
    final = doc.to_dict()

    history = doc.history()
    assert len(history) == 5
    assert [h.seq for h in history] == [1, 2, 3, 4, 5]
    assert history[-1].heads == doc.heads()
    draft_heads = history[1].heads

    listed = json.loads(dev.cli("doc", "history", "--config", dev.config, doc_id, "--json"))
    assert [e["hash"] for e in listed] == [h.hash for h in history]
    assert listed[1]["heads"] == draft_heads
    lines = dev.cli("doc", "history", "--config", dev.config, doc_id).splitlines()
    assert len(lines) == 5 and history[0].hash[:12] in lines[0]
    at = dev.cli("doc", "get", "--config", dev.config, doc_id, "--at", ",".join(draft_heads))
    assert json.loads(at) == draft

    # The CLI restores the draft with one forward change; the SDK's copy merges it.
    restored_heads = dev.cli(
        "doc", "restore", "--config", dev.config, doc_id, "--to", ",".join(draft_heads)
    ).split()
    deadline = time.monotonic() + WAIT
    while doc.heads() != restored_heads:
        assert time.monotonic() < deadline, "the restore never reached the SDK"
        time.sleep(0.05)
    assert doc.to_dict() == draft
    assert len(doc.history()) == 6
    assert json.loads(doc.to_json_at(history[-1].heads)) == final

    # And back again from the SDK.
    doc.restore(history[-1].heads)
    assert doc.to_dict() == final
    doc.wait_durable(WAIT)
    with pytest.raises(MeridianError.InvalidValue):
        doc.restore(["00" * 32])
    with pytest.raises(MeridianError.InvalidValue):
        doc.restore([])
    with pytest.raises(AssertionError):
        dev.cli("doc", "restore", "--config", dev.config, doc_id, "--to", "nothex")


def test_a_purged_document_is_gone_for_the_sdk(dev, client):
    """An operator purges a document through the CLI while the SDK has it open: the SDK
    learns it is gone, and its next edit is refused with the typed relay error `gone`."""
    doc_id = fresh_id("purged")
    doc = client.open(doc_id)
    doc.wait_synced(WAIT)
    doc.put(["secret"], "value")
    doc.wait_durable(WAIT)

    out = dev.cli(
        "doc", "purge", doc_id, "--tenant", "dev", "--config", str(dev.data_dir / "relay.toml"),
        "--operator", "pytest", "--yes",
    )
    assert "1 document(s)" in out
    deadline = time.monotonic() + WAIT
    while not doc.is_gone():
        assert time.monotonic() < deadline, "the SDK never learned the document is gone"
        time.sleep(0.05)
    doc.put(["secret"], "again")
    with pytest.raises(MeridianError.Relay) as refused:
        doc.wait_durable(WAIT)
    assert refused.value.name == "gone" and refused.value.code == 21
    audit = json.loads(dev.cli("audit", "--config", str(dev.data_dir / "relay.toml"), "--json"))
    assert any(r["doc"] == doc_id and r["operator"] == "pytest" for r in audit)
