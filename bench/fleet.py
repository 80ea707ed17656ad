"""Jobs worked on by several ``embedfill worker`` processes, run as an operator runs them.

The workers are started first and wait for work (``embedfill worker``); then
``embedfill backfill --enqueue`` creates the job, and the job's own record in
``embedfill.runs`` (created → finished) times it, so the workers' start-up (importing
Python, connecting) is not counted and 1, 2 or 4 workers are compared on the work alone.
Once the job is no longer ``running`` every worker gets SIGTERM (finish the chunks in
flight, exit 0). ``backfill --processes N`` (which starts its N-1 children after creating
the job, so their start-up is in the job's time) is measured too, as one operator-visible
figure (``processes_job``).

While the job runs, :class:`CpuMeter` counts the CPU time (user + system) of each party on
this machine: the worker processes, this process (which runs the test server's threads),
and the PostgreSQL server (the postmaster, its live backends, and those that ended).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg

from bench.common import TABLE, missing, target_config

ROOT = Path(__file__).resolve().parents[1]
BENCH_KEY = "sk-bench-0000000000"
READY_LINE = "serving jobs of"
POLL_S = 0.1


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string (JSON escapes are valid TOML)


def config_toml(provider: dict[str, Any], engine: dict[str, Any] | None = None) -> str:
    """The TOML an operator would write for the bench table (the same settings as
    ``common.target_config``, which checks them first)."""
    target_config(provider, engine)  # a mistake here fails now, not in 4 workers
    lines = ["[providers.p]", *(f"{k} = {toml_value(v)}" for k, v in provider.items())]
    lines += [
        "",
        "[[targets]]",
        'name = "docs"',
        f"table = {toml_value(TABLE)}",
        'id_column = "id"',
        'text = "{body}"',
        'embedding_column = "embedding"',
        'tenant_column = "tenant"',
        'provider = "p"',
    ]
    if engine:
        lines += ["", "[engine]", *(f"{k} = {toml_value(v)}" for k, v in engine.items())]
    return "\n".join(lines) + "\n"


def cli_env(url: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "EMBEDFILL_CONFIG", "EMBEDFILL_MASTER_KEY")
    }
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, str(ROOT), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env |= {"DATABASE_URL": url, "BENCH_KEY": BENCH_KEY, "PYTHONUNBUFFERED": "1"}
    return env


def embedfill(args: list[str], env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "embedfill", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"embedfill {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc.stdout


# ------------------------------------------------------------------------- CPU


def _cpu(proc: psutil.Process, *, reaped: bool = False) -> float:
    t = proc.cpu_times()
    own = float(t.user + t.system)
    return own + (float(t.children_user + t.children_system) if reaped else 0.0)


def postmaster_of(url: str) -> psutil.Process | None:
    """The PostgreSQL server's main process when it runs on this machine, else None."""
    try:
        with psycopg.connect(url) as conn:  # while the backend lives
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            parent = psutil.Process(int(row[0])).parent()
    except (psutil.Error, psycopg.Error):
        return None
    return parent if parent is not None and "postgres" in parent.name() else None


def _busy_s() -> float:
    """CPU seconds the whole machine has spent not idle (every process, anyone's)."""
    t = psutil.cpu_times()  # (guest time is counted in user time already)
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


@dataclass
class CpuMeter:
    """CPU seconds spent by each party between :meth:`start` and :meth:`stop`."""

    workers: list[psutil.Process]
    postmaster: psutil.Process | None
    me: psutil.Process = field(default_factory=psutil.Process)
    _start: dict[str, float] = field(default_factory=dict)
    result: dict[str, float] = field(default_factory=dict)

    def _sample(self) -> dict[str, float]:
        out = {
            "wall": time.perf_counter(),
            "workers": sum(_cpu(p) for p in self.workers),
            "test_server": _cpu(self.me),  # this process: the test server's threads
            "machine": _busy_s(),
        }
        if self.postmaster is not None:
            pg = _cpu(self.postmaster, reaped=True)
            for child in self.postmaster.children():
                # one that just ended is counted in the postmaster's reaped children
                with contextlib.suppress(psutil.Error):
                    pg += _cpu(child)
            out["postgres"] = pg
        return out

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        end = self._sample()
        self.result = {k: end[k] - self._start[k] for k in end}
        return self.result


def cores(cpu: dict[str, float]) -> dict[str, float]:
    """CPU seconds as cores kept busy over the wall time measured (2.0 = both cores of a
    2-core machine)."""
    out = {k: round(v / cpu["wall"], 2) for k, v in cpu.items() if k != "wall"}
    out["others"] = round(
        out["machine"] - out["workers"] - out["test_server"] - out.get("postgres", 0.0), 2
    )
    return out


# ----------------------------------------------------------------------- the job


def job_record(url: str, job_id: int) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT status, embedded, failed, requests, tokens,"
            " extract(epoch FROM finished_at - started_at)::float8"
            " FROM embedfill.runs WHERE id = %s",
            (job_id,),
        ).fetchone()
        workers = conn.execute(
            "SELECT pid, chunks, (report->>'embedded')::int FROM embedfill.workers"
            " WHERE run_id = %s ORDER BY pid",
            (job_id,),
        ).fetchall()
    assert row is not None
    status, embedded, failed, requests, tokens, seconds = row
    return {
        "job_id": job_id,
        "status": status,
        "embedded": embedded,
        "failed": failed,
        "requests": requests,
        "tokens": tokens,
        "seconds": seconds,
        "rows_per_s": embedded / seconds if seconds else 0.0,
        "workers": [{"pid": p, "chunks": c, "embedded": e} for p, c, e in workers],
    }


def job_status(conn: psycopg.Connection[Any], job_id: int) -> str | None:
    row = conn.execute("SELECT status FROM embedfill.runs WHERE id = %s", (job_id,)).fetchone()
    return None if row is None else str(row[0])


def workers_job(
    url: str,
    provider: dict[str, Any],
    workers: int,
    engine: dict[str, Any] | None = None,
    timeout: float = 600,
) -> dict[str, Any]:
    """``workers`` ``embedfill worker`` processes, started and waiting, then one job
    (``backfill --enqueue``) that they share; timed by the job's record."""
    with tempfile.TemporaryDirectory(prefix="embedfill-bench-") as tmp:
        cfg = Path(tmp) / "embedfill.toml"
        cfg.write_text(config_toml(provider, engine))
        env = cli_env(url)
        embedfill(["--config", str(cfg), "migrate"], env)
        logs = [Path(tmp) / f"worker{i}.log" for i in range(workers)]
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for log in logs:
                with log.open("wb") as stderr:
                    procs.append(
                        subprocess.Popen(
                            [sys.executable, "-m", "embedfill", "--config", str(cfg), "worker"],
                            env=env,
                            stdout=subprocess.DEVNULL,
                            stderr=stderr,
                        )
                    )
            _wait_ready(procs, logs)
            meter = CpuMeter([psutil.Process(p.pid) for p in procs], postmaster_of(url))
            argv = ["--config", str(cfg), "backfill", "--enqueue", "--json"]
            enqueue = subprocess.Popen(
                [sys.executable, "-m", "embedfill", *argv],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + timeout
            with psycopg.connect(url, autocommit=True) as conn:  # one connection polls
                # the meter starts when the job exists (not while `backfill --enqueue` starts)
                while conn.execute("SELECT 1 FROM embedfill.runs").fetchone() is None:
                    if enqueue.poll() is not None:
                        break
                    time.sleep(0.01)
                meter.start()
                visible = time.monotonic()  # the test server's clock (Request.at)
                out, err = enqueue.communicate(timeout=120)
                if enqueue.returncode != 0:
                    raise RuntimeError(f"backfill --enqueue exited {enqueue.returncode}:\n{err}")
                job_id = int(json.loads(out)["job_id"])
                while job_status(conn, job_id) == "running":
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"job {job_id} still running after {timeout:.0f} s")
                    if any(p.poll() is not None for p in procs):
                        raise RuntimeError("a worker exited during the job:\n" + _tails(logs))
                    time.sleep(POLL_S)
                cpu = meter.stop()
        finally:
            codes = _stop(procs)
        if any(codes):
            raise RuntimeError(f"workers exited {codes} after SIGTERM:\n{_tails(logs)}")
        result = job_record(url, job_id)
    result["created_at"] = visible
    result["cpu_s"] = {k: round(v, 2) for k, v in cpu.items()}
    result["cores"] = cores(cpu)
    result["missing_after"] = missing(url)
    return result


def processes_job(
    url: str, provider: dict[str, Any], processes: int, engine: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``embedfill backfill --processes N`` as one command: its report, and its wall time."""
    with tempfile.TemporaryDirectory(prefix="embedfill-bench-") as tmp:
        cfg = Path(tmp) / "embedfill.toml"
        cfg.write_text(config_toml(provider, engine))
        env = cli_env(url)
        embedfill(["--config", str(cfg), "migrate"], env)
        started = time.perf_counter()
        out = embedfill(
            ["--config", str(cfg), "backfill", "--processes", str(processes), "--json"], env
        )
        wall = time.perf_counter() - started
    report = json.loads(out)
    result = job_record(url, int(report["run_id"]))
    result["command_s"] = wall
    result["missing_after"] = missing(url)
    return result


def _wait_ready(
    procs: list[subprocess.Popen[bytes]], logs: list[Path], timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while not all(READY_LINE in log.read_text(errors="replace") for log in logs):
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a worker exited before it was ready:\n" + _tails(logs))
        if time.monotonic() > deadline:
            raise RuntimeError("workers not ready in time:\n" + _tails(logs))
        time.sleep(POLL_S)
    time.sleep(0.5)  # the line comes just before the worker opens procrastinate's queue


def _stop(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(60))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def _tails(logs: list[Path]) -> str:
    return "\n".join(
        f"--- {log.name}\n{log.read_text(errors='replace')[-1500:]}" for log in logs if log.exists()
    )
