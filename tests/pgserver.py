"""A throw-away PostgreSQL server for the tests that need a real one (tests/test_postgres.py).

``pg_server`` (session-scoped) runs ``initdb`` and ``pg_ctl`` from the machine's PostgreSQL (Debian's
``postgresql`` package: ``/usr/lib/postgresql/<version>/bin``) in a fresh folder under /tmp, on a free
loopback port with trust authentication, and removes it all at the end. PostgreSQL refuses to run as root
(CI runs as root), so as root the server runs as the unprivileged ``postgres`` user the package creates.
Without the binaries the tests skip, saying how to get them.
"""

from __future__ import annotations

import glob
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ENABLE = "install the PostgreSQL server to run them (Debian/Ubuntu: apt-get install postgresql; .ci/run does)"
DRIVER = "psycopg"  # what a plain postgresql:// URL needs (SQLAlchemy >= 2.1): pip install 'prunebench[scale]'
SUPERUSER = "postgres"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_bindir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: Debian's newest version, ``pg_config --bindir``, or PATH."""
    candidates = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    candidates.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).parent)
    return next((d for d in candidates if (d / "initdb").is_file() and (d / "pg_ctl").is_file()), None)


@dataclass
class PgServer:
    """A running server: ``url(db)`` is the SQLAlchemy URL of database ``db`` (created by :meth:`create`)."""

    bindir: Path
    port: int
    host: str = "127.0.0.1"
    user: str = SUPERUSER

    def url(self, db: str, scheme: str = "postgresql") -> str:
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{db}"

    def create(self, db: str) -> str:
        """Create database ``db`` (over TCP, as the trusted superuser); return its URL."""
        cmd = [str(self.bindir / "createdb"), "-h", self.host, "-p", str(self.port), "-U", self.user, db]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)
        return self.url(db)


def _as_server_user(cmd: list[str]) -> list[str]:
    """``cmd`` as the ``postgres`` user when running as root (initdb and postgres refuse root), else as is."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser"):
        return ["runuser", "-u", SUPERUSER, "--", *cmd]
    return ["su", SUPERUSER, "-s", "/bin/sh", "-c", shlex.join(cmd)]


def _run(cmd: list[str], cwd: Path, timeout: float = 120) -> None:
    out = subprocess.run(_as_server_user(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server for the session; skips (saying how to enable it) without the binaries or driver."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip(f"PostgreSQL server binaries (initdb, pg_ctl) not found: {ENABLE}")
    pytest.importorskip(DRIVER, reason=f"no PostgreSQL driver: pip install 'prunebench[scale]' ({DRIVER})")
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(SUPERUSER)
        except KeyError:
            pytest.skip(
                f"running as root and there is no unprivileged {SUPERUSER!r} user to run PostgreSQL as: {ENABLE}"
            )
    # /tmp, not pytest's tmp_path: the server user must be able to reach the folder (pytest's are 0700 root)
    base = Path(tempfile.mkdtemp(prefix="prunebench-pg-", dir="/tmp"))
    base.chmod(0o755)
    if owner is not None:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    data, sock, log = base / "data", base / "sock", base / "server.log"
    started = False
    try:
        _run(
            [str(bindir / "initdb"), "-D", str(data), "--auth=trust", "-U", SUPERUSER, "-E", "UTF8", "--no-sync"], base
        )
        _run(["mkdir", "-p", str(sock)], base)
        for attempt in range(3):  # the free port may be taken by someone else before the server binds it
            port = free_port()
            opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off -c synchronous_commit=off"
            try:
                _run(
                    [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", opts, "start"],
                    base,
                )
                started = True
                break
            except RuntimeError:
                if attempt == 2:
                    raise RuntimeError(f"PostgreSQL did not start; its log:\n{_read(log)}") from None
        yield PgServer(bindir=bindir, port=port)
    finally:
        if started:
            _run([str(bindir / "pg_ctl"), "-D", str(data), "stop", "-m", "immediate"], base, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else "(no log)"
