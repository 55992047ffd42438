"""``cupola curate --ray-address``: the driver joins a Ray cluster started apart from it (``ray start
--head``, as on a cluster's head node) and curates on it, with the same results as a local run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from cupola.collections.world.curation import ray_session, write_curation_corpus
from cupola.toolkit.testing import free_port, kill_marked_processes

AUTH_MODE = "disabled"  # the test cluster's RAY_AUTH_MODE, and so its drivers'
PORT_FLAGS = (
    "node-manager-port",
    "object-manager-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)


@dataclass(frozen=True)
class Cluster:
    address: str
    logs: Path  # the head's session logs: what a stalled run is diagnosed from
    marker: str  # CURATION_TEST_CLUSTER in the environment of each of its processes


@pytest.fixture
def cluster():
    """A Ray head started by ``ray start`` (its own processes, as on a cluster), stopped by killing
    exactly its processes (``ray stop`` would stop every Ray instance on the machine). Every port it
    listens on is a free one: fixed defaults (the client server's 10001, the agent's 52365) would
    collide with another Ray instance on the machine, such as one a killed run left behind."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    port, marker, since = free_port(), uuid.uuid4().hex, time.time()
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": AUTH_MODE,
        "CURATION_TEST_CLUSTER": marker,
    }
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    start = [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2"]
    start += ["--include-dashboard=false", f"--temp-dir={temp}"]
    for flag in PORT_FLAGS:
        start.append(f"--{flag}={free_port()}")
    try:
        subprocess.run(start, check=True, env=env, capture_output=True, timeout=300)
        yield Cluster(f"127.0.0.1:{port}", Path(temp) / "session_latest" / "logs", marker)
    finally:
        kill_marked_processes("CURATION_TEST_CLUSTER", marker, since)
        shutil.rmtree(temp, ignore_errors=True)


# the raylet's worker pool and lease queues, and error lines in the other logs
STATE = r"process_failed|PYTHON|idle workers|registration_timeout|[Qq]ueue length|[Ii]nfeasible|[Ll]eases?\b"
ERRORS = r"Error|Traceback|\bE\d{4}|FATAL|failed"


def _diagnosis(cluster: Cluster) -> str:
    """What a stalled run on ``cluster`` leaves to go on: the head's worker pool and leases, error
    lines from its logs, where its task workers' Python stacks are (py-spy), and any other Ray
    instance running on the machine."""
    logs = cluster.logs
    lines = []
    dump = [ln for ln in _read(logs / "raylet.out").splitlines() if "[state-dump]" in ln]
    lines += [ln for ln in dump[-400:] if re.search(STATE, ln) and "Execution time" not in ln][-24:]
    for f in sorted(logs.glob("*")):
        if f.is_file() and f.suffix in (".err", ".log", ".out") and f.name != "raylet.out":
            bad = [ln for ln in _read(f).splitlines() if re.search(ERRORS, ln) and not ln.endswith(": 0")]
            lines += [f"{f.name}: {ln[:300]}" for ln in bad[-5:]]
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    others = []
    for proc in psutil.process_iter(["name", "cmdline", "environ"], ad_value=None):
        command = " ".join(proc.info["cmdline"] or [])
        ours = (proc.info["environ"] or {}).get("CURATION_TEST_CLUSTER") == cluster.marker
        if py_spy and ours and command.startswith("ray::"):
            dump = subprocess.run([py_spy, "dump", "--pid", str(proc.pid)], capture_output=True, text=True)
            lines.append(
                f"py-spy dump of {command[:80].strip()} (pid {proc.pid}):\n{(dump.stdout + dump.stderr)[-2000:]}"
            )
        elif proc.info["name"] in ("raylet", "gcs_server") and str(logs.parent.parent) not in command:
            others.append(f"pid {proc.pid} ({command[:120]})")
    lines.append(f"other Ray instances' processes on this machine: {others or 'none'}")
    return "\n".join(lines)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _curate(*args: str, cluster: Cluster | None = None) -> subprocess.CompletedProcess:
    """A ``cupola curate`` run. Idle, one takes ~15 s; on a 2-core machine busy with other tests ~80 s,
    and 130 s beside four CPU-bound processes. A run past the limit has stalled: it fails with where
    it had got to and what the cluster's logs say."""
    cmd = [sys.executable, "-m", "cupola", "curate", *args, "dedup.enabled=false"]
    env = {**os.environ, "RAY_AUTH_MODE": AUTH_MODE}  # as the cluster's: a token-mode driver stalls on it
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        pytest.fail(
            f"cupola curate {' '.join(args)} ran past {e.timeout} s; its stderr began:\n{err[:1500]}\n"
            f"...and ended:\n{err[-1500:]}" + (f"\nthe cluster:\n{_diagnosis(cluster)}" if cluster else "")
        )


def test_curate_on_a_running_cluster_matches_a_local_run(cluster, tmp_path):
    corpus = write_curation_corpus(
        tmp_path / "in", num_videos=2, shots_per_video=2, degraded=False, broken=False
    )
    remote = _curate(
        "--input",
        str(corpus.root),
        "--output",
        str(tmp_path / "remote"),
        "--ray-address",
        cluster.address,
        cluster=cluster,
    )
    assert remote.returncode == 0, remote.stderr[-3000:]
    local = _curate("--input", str(corpus.root), "--output", str(tmp_path / "local"), "--num-cpus", "2")
    assert local.returncode == 0, local.stderr[-3000:]
    for name in ("manifest.parquet", "summary.json"):
        assert (tmp_path / "remote" / name).is_file()
    remote_rows = pq.read_table(tmp_path / "remote" / "manifest.parquet").to_pylist()
    assert remote_rows == pq.read_table(tmp_path / "local" / "manifest.parquet").to_pylist()
    assert sum(r["decision"] == "kept" for r in remote_rows) == 4
    tars = sorted(p.relative_to(tmp_path / "remote") for p in (tmp_path / "remote" / "shards").rglob("*.tar"))
    assert tars and all(
        (tmp_path / "remote" / t).read_bytes() == (tmp_path / "local" / t).read_bytes() for t in tars
    )


def test_an_address_without_a_cluster_is_a_clear_error(tmp_path):
    corpus = write_curation_corpus(
        tmp_path / "in", num_videos=1, shots_per_video=1, degraded=False, broken=False
    )
    address = f"127.0.0.1:{free_port()}"
    failed = _curate("--input", str(corpus.root), "--output", str(tmp_path / "out"), "--ray-address", address)
    assert failed.returncode == 2
    assert f"--ray-address {address}: no Ray cluster could be joined there" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_a_local_session_leaves_the_ray_auth_mode_of_the_process_as_it_was(monkeypatch):
    """Ray's local start switches its process to token auth (RAY_AUTH_MODE=token, inherited by every
    process started after): a later ``cupola curate --ray-address`` subprocess would then stall on a
    cluster without auth (CI did, for 900 s). ``ray_session`` puts the variable back."""
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with ray_session(num_cpus=1):
        import ray

        assert ray.is_initialized()
    assert "RAY_AUTH_MODE" not in os.environ
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with ray_session(num_cpus=1):
        pass
    assert os.environ["RAY_AUTH_MODE"] == "disabled"
