"""CURVE between learner and actors, with real keys (o2o-keys), real sockets and a real store:
who gets in, who is refused, what reaches the store, and what travels in clear."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
from replay_peers import ACT_DIM, OBS_DIM, make_chunk

from o2o.actor.config import ActorConfig, validate
from o2o.actor.seams import PolicyBuilder
from o2o.datasets.replay_store import ReplayStore
from o2o.transport import wire
from o2o.transport.config import LinkConfig
from o2o.transport.ingest import IngestServer
from o2o.transport.keys_cli import main as o2o_keys
from o2o.transport.link import Link
from o2o.transport.security import ActorKeys, LearnerKeys, SecurityError, is_loopback
from o2o.transport.spool import Spool

OBS, ACT = OBS_DIM, ACT_DIM  # replay_peers' chunks
ROWS = 40  # per chunk (make_chunk's default)


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout  # a hang guard, not a timing assertion
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def keys(tmp_path):
    """A key folder made by the real CLI, with actors robot-1 and robot-2 allowed."""
    folder = tmp_path / "keys"
    assert o2o_keys(["init", str(folder)]) == 0
    assert o2o_keys(["add", str(folder), "robot-1", "robot-2"]) == 0
    return folder


def serve(tmp_path, keys_folder, **kwargs) -> IngestServer:
    store = ReplayStore.create(tmp_path / "replay", OBS, ACT, chunk_rows=256, task="test-task")
    learner_keys = LearnerKeys(keys_folder) if keys_folder is not None else None
    return IngestServer(store, free_endpoint(), keys=learner_keys, commit_interval_s=0.01, **kwargs).start()


def link(endpoint, actor_id, tmp_path, keys_folder=None, key_owner=None, **cfg) -> Link:
    """The actor's real link; ``keys_folder`` holds ``actors/<key_owner or actor_id>``."""
    actor_keys = None
    if keys_folder is not None:
        owner = key_owner or actor_id
        actor_keys = ActorKeys(keys_folder / "actors" / owner, owner)
    spool = Spool(64, str(tmp_path / f"spool-{actor_id}-{time.monotonic_ns()}"), 2**24, 2**20)
    settings = dict(heartbeat_s=0.1, timeout_s=1.0, drain_s=5.0, id_in_use_timeout_s=3.0)
    link = Link(endpoint, actor_id, "test-task", OBS, ACT, spool, PolicyBuilder(None),
                cfg=LinkConfig(**{**settings, **cfg}), keys=actor_keys)  # fmt: skip
    return link.start()


def send(link: Link, n_chunks: int) -> None:
    for _ in range(n_chunks):
        link.add(make_chunk(link.actor_id, link.status().next_seq))


def rows_of(server: IngestServer, actor_id: str) -> int:
    return server.stats()["actors"].get(actor_id, {}).get("rows", 0)


def stored_actors(path) -> list[str]:
    store = ReplayStore.open(path, "r")
    return [a for a in store.actor_ids if store.committed_seq(a) >= 0]


# ---------------------------------------------------------------- o2o-keys


def test_o2o_keys_makes_secret_files_only_the_owner_reads_and_revokes(keys, capsys):
    for secret in [keys / "learner.key_secret", *keys.glob("actors/*/actor.key_secret")]:
        assert os.stat(secret).st_mode & 0o777 == 0o600
    assert sorted(p.name for p in (keys / "actors").iterdir()) == ["robot-1", "robot-2"]
    assert o2o_keys(["revoke", str(keys), "robot-2"]) == 0
    capsys.readouterr()
    assert o2o_keys(["list", str(keys)]) == 0
    assert capsys.readouterr().out.split() == ["robot-1"]
    assert not (keys / "actors" / "robot-2").exists()
    # Clear errors: keys made twice, an actor added twice, keys of another actor.
    assert o2o_keys(["init", str(keys)]) == 2
    assert "already holds learner keys" in capsys.readouterr().err
    assert o2o_keys(["add", str(keys), "robot-1"]) == 2
    assert "exists" in capsys.readouterr().err
    with pytest.raises(SecurityError, match="belong to actor 'robot-1', not to actor_id='robot-9'"):
        ActorKeys(keys / "actors" / "robot-1", "robot-9")
    os.chmod(keys / "learner.key_secret", 0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        LearnerKeys(keys)


def test_o2o_keys_is_an_installed_command(tmp_path):
    done = subprocess.run([shutil.which("o2o-keys") or "o2o-keys", "add", str(tmp_path / "none"), "robot-1"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and "run `o2o-keys init" in done.stderr


def test_open_endpoints_other_machines_reach_need_keys_or_insecure():
    assert is_loopback("tcp://127.0.0.1:5555") and is_loopback("ipc:///tmp/x") and is_loopback("tcp://localhost:1")
    assert not is_loopback("tcp://0.0.0.0:5555") and not is_loopback("tcp://10.0.0.5:5555")
    with pytest.raises(SecurityError, match="o2o-keys init"):
        validate(ActorConfig(task="pusher", actor_id="robot-1", learner="tcp://10.0.0.5:5555"))
    validate(ActorConfig(task="pusher", actor_id="robot-1", learner="tcp://10.0.0.5:5555", insecure=True))
    validate(ActorConfig(task="pusher", actor_id="robot-1", learner="tcp://127.0.0.1:5555"))


def test_learner_refuses_an_open_endpoint_on_all_interfaces_before_any_work(tmp_path):
    from o2o.learner.config import OnlineConfig
    from o2o.learner.online import run_online

    with pytest.raises(SecurityError, match="o2o-keys init KEYS"):  # o2o-learner prints it and exits 2
        run_online(OnlineConfig(task="pusher", endpoint="tcp://0.0.0.0:5555"), tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing pretrained, built or written first


# ---------------------------------------------------------------- who gets in


def test_an_allowed_actor_is_served_and_an_unknown_key_never_reaches_the_store(tmp_path, keys, caplog):
    caplog.set_level(logging.WARNING, logger="o2o.security")
    strangers = tmp_path / "strangers"  # keys the learner never allowed, with its right public key
    assert o2o_keys(["init", str(strangers)]) == 0 and o2o_keys(["add", str(strangers), "robot-9"]) == 0
    shutil.copy(keys / "learner.key", strangers / "actors" / "robot-9" / "learner.key")
    server = serve(tmp_path, keys)
    good = link(server.endpoint, "robot-1", tmp_path, keys)
    stranger = link(server.endpoint, "robot-9", tmp_path, strangers)
    try:
        assert good.wait_welcome(30)
        send(good, 5)
        wait_for(lambda: good.stats.acked_seq == 4, what="robot-1's acks")
        wait_for(lambda: stranger.fatal is not None, what="robot-9 to be refused")
        assert "refused this actor's key" in stranger.fatal
        assert not stranger.wait_welcome(0)
        refused = server.stats()["refused_keys"]
    finally:
        stranger.close(0), good.close(), server.stop()
    assert sum(refused.values()) >= 1  # ZeroMQ retries the handshake: each one is counted
    assert len([r for r in caplog.records if "not in the allow-list" in r.getMessage()]) == 1  # logged once
    assert stored_actors(tmp_path / "replay") == ["robot-1"]
    assert len(ReplayStore.open(tmp_path / "replay", "r")) == 5 * ROWS


def test_an_actor_without_keys_is_refused_by_an_encrypted_learner(tmp_path, keys):
    server = serve(tmp_path, keys)
    plain = link(server.endpoint, "robot-1", tmp_path)
    try:
        wait_for(lambda: plain.fatal is not None, what="the keyless actor to give up")
        assert "pass this actor its key folder" in plain.fatal
        assert not plain.wait_welcome(0)
        assert server.stats()["actors"] == {}
    finally:
        plain.close(0), server.stop()
    assert len(ReplayStore.open(tmp_path / "replay", "r")) == 0


def test_an_actor_cannot_write_as_another(tmp_path, keys):
    server = serve(tmp_path, keys)
    # robot-1's keys, claiming to be robot-2 (whose key is allowed too).
    impostor = link(server.endpoint, "robot-2", tmp_path, keys, key_owner="robot-1")
    try:
        wait_for(lambda: impostor.fatal is not None, what="the impostor to be refused")
        assert "belongs to actor 'robot-1', not 'robot-2'" in impostor.fatal
        stats = server.stats()
    finally:
        impostor.close(0), server.stop()
    assert stats["rejected"] == {wire.KEY_REFUSED: stats["rejected"][wire.KEY_REFUSED]}
    assert "robot-2" not in stats["actors"] and "robot-1" not in stats["actors"]
    assert len(ReplayStore.open(tmp_path / "replay", "r")) == 0


def test_the_allow_list_reloads_without_a_restart_both_ways(tmp_path, keys):
    assert o2o_keys(["revoke", str(keys), "robot-2"]) == 0
    server = serve(tmp_path, keys)
    # robot-3 is made while the learner runs: it gets in without a restart.
    assert o2o_keys(["add", str(keys), "robot-3"]) == 0
    late = link(server.endpoint, "robot-3", tmp_path, keys, id_in_use_timeout_s=30.0)
    try:
        assert late.wait_welcome(30)
        send(late, 3)
        wait_for(lambda: late.stats.acked_seq == 2, what="robot-3's acks")
        # Revoked while connected: its next chunks are refused, none of them stored.
        assert o2o_keys(["revoke", str(keys), "robot-3"]) == 0
        time.sleep(1.1)  # the allow-list is re-read at most once a second (RELOAD_EVERY_S)
        send(late, 3)
        wait_for(lambda: late.fatal is not None, what="robot-3 to be refused after revocation")
        assert "no longer in the learner's allow-list" in late.fatal
        stats = server.stats()
    finally:
        late.close(0), server.stop()
    assert stats["rejected"][wire.KEY_REFUSED] >= 1
    store = ReplayStore.open(tmp_path / "replay", "r")
    assert len(store) == 3 * ROWS and store.committed_seq("robot-3") == 2


def test_an_actor_takes_no_policy_from_a_learner_without_its_secret_key(tmp_path, keys):
    """An impostor learner on the actor's endpoint, with its own keys and the actor's public key
    allowed, publishes a policy: the actor, which knows the real learner's public key, never
    completes the handshake, so never receives it."""
    impostor_keys = tmp_path / "impostor"
    assert o2o_keys(["init", str(impostor_keys)]) == 0
    shutil.copy(keys / "allowed" / "robot-1.key", impostor_keys / "allowed" / "robot-1.key")
    impostor = serve(tmp_path, impostor_keys)
    impostor.publish_policy(1, b"not an onnx model, and never run")
    victim = link(impostor.endpoint, "robot-1", tmp_path, keys)
    try:
        wait_for(lambda: victim.fatal is not None, what="the actor to give up on the impostor")
        assert victim.stats.policies_received == 0 and victim.latest() is None
        assert impostor.stats()["actors"] == {}
    finally:
        victim.close(0), impostor.stop()


# ---------------------------------------------------------------- what travels


class Relay(threading.Thread):
    """A TCP relay between an actor and the learner that keeps a copy of every byte it carries."""

    def __init__(self, target: str):
        super().__init__(daemon=True)
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.seen = bytearray()
        self.lock = threading.Lock()

    def run(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pump, args=(a, b), daemon=True).start()

    def pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self.lock:
                    self.seen += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()


@pytest.mark.parametrize("encrypted", [True, False])
def test_what_travels_is_encrypted_only_with_keys(tmp_path, keys, encrypted):
    server = serve(tmp_path, keys if encrypted else None)
    relay = Relay(server.endpoint)
    relay.start()
    actor = link(relay.endpoint, "robot-1", tmp_path, keys if encrypted else None)
    try:
        assert actor.wait_welcome(30)
        send(actor, 2)
        wait_for(lambda: actor.stats.acked_seq == 1, what="acks through the relay")
    finally:
        actor.close(0), server.stop()
        relay.listener.close()
    with relay.lock:
        seen = bytes(relay.seen)
    observations = make_chunk("robot-1", 0).obs.tobytes()  # the first chunk's observation column
    assert len(seen) > 2 * ROWS * OBS * 4
    assert (b"robot-1" in seen) is not encrypted and (observations in seen) is not encrypted


# ---------------------------------------------------------------- limits


def test_an_actor_over_its_rate_limit_is_slowed_not_dropped(tmp_path):
    server = serve(tmp_path, None, max_rows_per_s=400.0, rate_burst_s=0.5)  # 200-row bursts, 5 chunks
    actor = link(server.endpoint, "robot-1", tmp_path)
    try:
        assert actor.wait_welcome(30)
        send(actor, 20)  # 800 rows: four times the burst
        wait_for(lambda: actor.stats.acked_seq == 19, what="every chunk acked")
        stats = server.stats()
    finally:
        actor.close(), server.stop()
    assert stats["rate_limited"] > 0 and stats["actors"]["robot-1"]["rate_limited"] == stats["rate_limited"]
    rows = ReplayStore.open(tmp_path / "replay", "r").read()
    assert len(rows["obs"]) == 20 * ROWS  # every row once, in order: backpressure, no loss
    want = np.concatenate([make_chunk("robot-1", seq).obs for seq in range(20)])
    np.testing.assert_array_equal(rows["obs"], want.astype(rows["obs"].dtype))


# ---------------------------------------------------------------- the commands


def test_launch_with_keys_runs_the_real_learner_and_actor_encrypted(tmp_path, keys):
    from test_launch import composed, launch, tiny_checkpoint

    from o2o.launch.commands import actor_command
    from o2o.launch.config import check

    assert o2o_keys(["add", str(keys), "robot-0"]) == 0
    run_dir = tmp_path / "run"
    learner = [f"pretrained={tiny_checkpoint(tmp_path / 'pre')}", "online_updates=20", "warmup_rows=40",
               "publish_every=10", "build_episodes=6", "batch_size=32", "eval.episodes=1", f"keys={keys}"]  # fmt: skip
    done = launch(tmp_path, run_dir, "actors=1", "actor.actor_id=robot", "actor.max_episode_steps=20",
                  *(f"learner.{a}" for a in learner))  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert ReplayStore.open(run_dir / "replay", "r").actor_ids == ["robot-0"]
    assert f"keys={keys / 'actors' / 'robot-0'}" in (run_dir / "actor-0.log").read_text().splitlines()[0]
    # Two actors, but keys for one: refused before anything starts, with the command that fixes it.
    cfg, _, explicit = composed("actors=4", "actor.actor_id=robot", f"learner.keys={keys}")  # robot-3 has none
    with pytest.raises(ValueError, match=f"no keys for actor robot-3: run `o2o-keys add {keys} robot-0 robot-1 "):
        check(cfg, explicit)
    assert f"keys={keys / 'actors' / 'robot-0'}" in actor_command(cfg, explicit, run_dir, "tcp://127.0.0.1:1", 0)
