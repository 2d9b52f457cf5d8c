"""A two-node Ray cluster on one machine whose worker node does not share the driver's disk.

The layout of ``cluster.yaml``, as far as one machine allows: a head with no CPUs for tasks (the driver
joins it), and a worker raylet started inside a private mount namespace (``unshare -m``) with an empty
tmpfs over ``private``: the folder that holds the sweep's storage, stores and MLflow database on the
driver's side. Everything a task on the worker writes there stays on the worker's "disk" and vanishes
with it; everything the driver wrote there is invisible to the worker. (A test on
``ray.cluster_utils.Cluster`` alone cannot catch node-local paths: its nodes share one filesystem.)

Only the processes started here are stopped (their process groups), never ``ray stop``. Needs root and
``unshare``; :func:`unavailable` says why not when either is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def unavailable() -> str | None:
    """Why this machine cannot run the cluster (None: it can)."""
    if sys.platform != "linux":
        return "needs Linux mount namespaces"
    if os.geteuid() != 0:
        return "needs root to mount a private tmpfs in a new mount namespace (unshare -m)"
    if shutil.which("unshare") is None or shutil.which("ray") is None:
        return "needs the unshare and ray commands on PATH"
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "true"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        return f"unshare -m is not permitted here ({probe.stderr.strip()})"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PrivateCluster:
    address: str
    head: subprocess.Popen
    worker: subprocess.Popen
    log_dir: Path
    dashboard: str | None = None  # http://127.0.0.1:<port> when the head runs the dashboard (job server)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.log_dir.glob("*.log")))

    def stop_worker(self) -> None:
        """Take the worker node away (its raylet, object store and worker processes), as a node that an
        autoscaler terminates or a spot reclaim takes."""
        _stop(self.worker)


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(p: subprocess.Popen) -> None:
    """SIGTERM the process group of ``p`` (``ray start --block`` and the raylet it started), then KILL.
    A worker's group exits within a second of SIGTERM; a head's ``ray start --block`` does not exit on
    SIGTERM at all (measured: it waited out 20 s every time), so the KILL comes after 3 s."""
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, sig)
        try:
            p.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def _wait_nodes(address: str, n: int, env: dict[str, str], timeout_s: float = 90.0) -> None:
    """Wait until ``n`` alive nodes are registered (asked from a separate process, so this one stays
    free to ``ray.init`` later)."""
    code = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR'); print(sum(x['Alive'] for x in ray.nodes()))"
    )
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(2)
    raise TimeoutError(f"the cluster at {address} did not reach {n} nodes in {timeout_s:.0f} s")


def job_server_available() -> bool:
    """Whether Ray's dashboard (the job server of ``ray job submit``) can run: ``ray[default]``."""
    try:
        import aiohttp_cors  # noqa: F401
        import ray.dashboard.modules.job.sdk  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def private_disk_cluster(
    private: Path, log_dir: Path, worker_cpus: int = 2, dashboard: bool = False
) -> Iterator[PrivateCluster]:
    """A head with ``CPU: 0`` and one worker with ``worker_cpus`` CPUs whose view of ``private`` is an
    empty tmpfs of its own; ``dashboard``: the head also runs Ray's job server. Set
    ``RAY_AUTH_MODE=disabled`` in the caller's environment before joining."""
    private.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--block", "--disable-usage-stats"]
    dash_port = free_port() if dashboard else None
    dash = (
        ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}"]
        if dashboard
        else ["--include-dashboard=false"]
    )
    head = _start(
        [
            "ray", "start", "--head", f"--port={port}", "--num-cpus=0", "--num-gpus=0", *dash,
            f"--dashboard-agent-listen-port={free_port()}", "--node-ip-address=127.0.0.1", *common,
        ],
        log_dir / "head.log",
        env,
    )  # fmt: skip
    worker = None
    try:
        time.sleep(3)
        ray_start = " ".join(
            [
                "exec ray start", f"--address={address}", f"--num-cpus={worker_cpus}", "--num-gpus=0",
                f"--dashboard-agent-listen-port={free_port()}", "--node-ip-address=127.0.0.1", *common,
            ]
        )  # fmt: skip
        script = f"mount -t tmpfs tmpfs '{private}' && {ray_start}"
        worker = _start(["unshare", "-m", "--propagation", "private", "sh", "-c", script], log_dir / "worker.log", env)
        _wait_nodes(address, 2, env)
        yield PrivateCluster(address, head, worker, log_dir, f"http://127.0.0.1:{dash_port}" if dashboard else None)
    finally:
        if worker is not None:
            _stop(worker)
        _stop(head)
