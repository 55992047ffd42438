"""``cupola curate --ray-address``: the driver joins a Ray cluster started apart from it (``ray start
--head``, as on a cluster's head node) and curates on it, with the same results as a local run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cupola.collections.world.curation import write_curation_corpus
from cupola.toolkit.testing import free_port, kill_marked_processes


@pytest.fixture
def cluster():
    """A Ray head started by ``ray start`` (its own processes, as on a cluster), stopped by killing
    exactly its processes (``ray stop`` would stop every Ray instance on the machine)."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    port, marker, since = free_port(), uuid.uuid4().hex, time.time()
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "CURATION_TEST_CLUSTER": marker,
    }
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    start = [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2"]
    start += ["--include-dashboard=false"]
    try:
        subprocess.run([*start, f"--temp-dir={temp}"], check=True, env=env, capture_output=True, timeout=300)
        yield f"127.0.0.1:{port}"
    finally:
        kill_marked_processes("CURATION_TEST_CLUSTER", marker, since)
        shutil.rmtree(temp, ignore_errors=True)


def _curate(*args: str) -> subprocess.CompletedProcess:
    """A ``cupola curate`` run. Idle, one takes ~15 s; on a 2-core machine busy with other tests Ray's
    dozen processes get little of it (a run took 100 s beside two CPU-bound processes, and once over
    300 s in CI), hence the long limit; a run past it fails with where it had got to."""
    cmd = [sys.executable, "-m", "cupola", "curate", *args, "dedup.enabled=false"]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        pytest.fail(
            f"cupola curate {' '.join(args)} ran past {e.timeout} s; its stderr ended:\n{err[-3000:]}"
        )


def test_curate_on_a_running_cluster_matches_a_local_run(cluster, tmp_path):
    corpus = write_curation_corpus(
        tmp_path / "in", num_videos=2, shots_per_video=2, degraded=False, broken=False
    )
    remote = _curate(
        "--input", str(corpus.root), "--output", str(tmp_path / "remote"), "--ray-address", cluster
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
