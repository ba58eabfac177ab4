"""A throwaway PostgreSQL server for tests and benchmarks of distributed search workers.

Binaries come from $SLIMLINE_TEST_POSTGRES_BIN (set by .ci/run, which installs PostgreSQL when
missing), else the newest /usr/lib/postgresql/*/bin, else pg_ctl on PATH.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def postgres_bin() -> Path | None:
    """The directory holding initdb and pg_ctl, or None."""
    candidates = []
    if os.environ.get("SLIMLINE_TEST_POSTGRES_BIN"):
        candidates.append(Path(os.environ["SLIMLINE_TEST_POSTGRES_BIN"]))
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    candidates += versions[::-1]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).parent)
    return next((c for c in candidates if (c / "initdb").exists() and (c / "pg_ctl").exists()),
                None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def throwaway_postgres(bin_dir: Path, database: str = "slimline_test") -> Iterator[str]:
    """Start a server (trust auth, loopback, free port) in a temp dir; yield its URL; remove it.

    PostgreSQL refuses to run as root, so as root it runs as the 'postgres' user (which the
    Debian package creates). Durability is off (fsync, synchronous_commit): it is thrown away.
    """
    as_user: list[str] = []
    home = Path(tempfile.mkdtemp(prefix="slimline-pg-"))
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError as exc:
            shutil.rmtree(home)
            raise RuntimeError("running as root and there is no 'postgres' user") from exc
        os.chown(home, owner.pw_uid, owner.pw_gid)
        # sbin is often off a non-login PATH (CI shells, env -i): look there too
        runuser = shutil.which("runuser") or next(
            (p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.path.exists(p)), None)
        if runuser is None:
            shutil.rmtree(home)
            raise RuntimeError("running as root needs 'runuser' (util-linux) to start postgres")
        as_user = [runuser, "-u", "postgres", "--"]
    data, port = home / "data", _free_port()

    def run(*args: str) -> None:
        done = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{done.stdout}{done.stderr}")

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
            "--no-sync", "-E", "UTF8")
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {home} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(home / "log"),
            "-w", "-t", "60", "start")
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
            database)
        yield f"postgresql://postgres@127.0.0.1:{port}/{database}"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m",
                            "immediate", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(home, ignore_errors=True)
