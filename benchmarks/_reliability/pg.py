"""A private PostgreSQL server for the reliability soak: ``initdb`` in a temporary directory, ``pg_ctl`` on a free port.

The server listens on ``127.0.0.1`` only, keeps its Unix socket inside its own directory and never touches the
machine's shared server (port 5432). Authentication is ``trust`` for the local superuser ``postgres``; the
benchmark's database is ``soak``. When the benchmark runs as root (``initdb`` refuses root) the server binaries
run as the ``postgres`` user through ``runuser`` and the data directory belongs to it.

Usage::

    with private_postgres(work) as pg:
        run_campaign(storage=pg.url)        # postgresql://postgres@127.0.0.1:PORT/soak
        pg.stop("immediate")               # a crash of the server
        pg.start()                         # crash recovery, same port and data

The server is always stopped when the block ends (an exception and ``KeyboardInterrupt`` included); its data
directory is removed and its log is copied to ``<tmp>/postgres.log``. Without PostgreSQL binaries
:func:`private_postgres` raises :class:`PostgresUnavailable` (``skipped: no initdb ...``) before anything starts.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

#: The database the benchmark's campaigns use (created by :func:`private_postgres`).
DATABASE = "soak"
#: The superuser of the private cluster.
USER = "postgres"
_BINARIES = ("initdb", "pg_ctl", "postgres")


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot run here (no binaries, no ``postgres`` user to run them as root, no driver)."""


def find_bin_dir() -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``: ``PATH`` first, then the newest
    ``/usr/lib/postgresql/*/bin``.

    Raises:
        PostgresUnavailable: When no directory holds all three.
    """
    candidates: list[Path] = []
    found = shutil.which("initdb")
    if found:
        candidates.append(Path(os.path.realpath(found)).parent)
        candidates.append(Path(found).parent)
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    candidates += [Path(v) for v in versions]
    for d in candidates:
        if all(os.access(d / b, os.X_OK) for b in _BINARIES):
            return d
    raise PostgresUnavailable("skipped: no initdb (PostgreSQL server binaries initdb/pg_ctl/postgres are not on PATH "
                              "nor in /usr/lib/postgresql/*/bin)")


def _version_key(path: str) -> tuple[int, ...]:
    """``/usr/lib/postgresql/15/bin`` → ``(15,)`` (newest first when sorted in reverse)."""
    parts = Path(path).parent.name.split(".")
    return tuple(int(p) for p in parts if p.isdigit())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now (never 5432)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != 5432:
            return port


def _driver() -> str:
    """The PostgreSQL driver module the benchmark process uses for its own checks."""
    for module in ("psycopg", "psycopg2"):
        with contextlib.suppress(ImportError):
            __import__(module)
            return module
    raise PostgresUnavailable("skipped: no PostgreSQL driver (psycopg or psycopg2) in this Python environment")


class PrivateServer:
    """One private PostgreSQL cluster (see the module docstring).

    Args:
        root: An empty directory for the cluster (``data/``, ``sock/``, ``server.log``); must be usable by the
            ``postgres`` user when running as root.
        port: TCP port on 127.0.0.1.
        bin_dir: Directory of the server binaries (default: :func:`find_bin_dir`).

    Attributes:
        url: ``postgresql://postgres@127.0.0.1:PORT/soak`` (no driver pinned: the product pins its own).
        starts: Successful starts (the first one included).
        stops: Stops requested (``stop``/``restart``), whatever the mode.
    """

    def __init__(self, root: Path, port: int, bin_dir: Path | None = None) -> None:
        self.root = Path(root)
        self.port = int(port)
        self.bin_dir = bin_dir or find_bin_dir()
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.logfile = self.root / "server.log"
        self.as_postgres = os.geteuid() == 0
        self.starts = 0
        self.stops = 0

    @property
    def url(self) -> str:
        """The database URL of the ``soak`` database."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    def url_for(self, database: str) -> str:
        """The URL of another database of this cluster."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    # -- processes ----------------------------------------------------------------------------------
    def _cmd(self, binary: str, *args: str) -> list[str]:
        cmd = [str(self.bin_dir / binary), *args]
        return ["runuser", "-u", USER, "--", *cmd] if self.as_postgres else cmd

    def _run(self, binary: str, *args: str, timeout: float = 120, check: bool = True
             ) -> subprocess.CompletedProcess[str]:
        """Run a server binary (as ``postgres`` under root) in its own session, so Ctrl-C on the benchmark's
        terminal reaches only the benchmark, which then stops the server itself."""
        p = subprocess.run(self._cmd(binary, *args), cwd=self.root, capture_output=True, text=True, timeout=timeout,
                           start_new_session=True, env={**os.environ, "LC_ALL": "C", "LANG": "C"})
        if check and p.returncode != 0:
            raise RuntimeError(f"{binary} {' '.join(args[:3])} exited {p.returncode}: "
                               f"{(p.stderr or p.stdout).strip()[-600:]}")
        return p

    def init(self) -> None:
        """``initdb`` the cluster (trust authentication, UTF-8)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.sock.mkdir(exist_ok=True)
        if self.as_postgres:
            try:
                user = pwd.getpwnam(USER)
            except KeyError:
                raise PostgresUnavailable("skipped: running as root and there is no `postgres` user to run "
                                          "initdb as") from None
            for path in (self.root, self.sock):
                os.chown(path, user.pw_uid, user.pw_gid)
            os.chmod(self.root, 0o700)
        self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-instructions",
                  timeout=300)

    def _options(self) -> str:
        return (f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c max_connections=200 "
                "-c shared_buffers=32MB")

    def running(self) -> bool:
        """Whether the postmaster runs (``pg_ctl status``)."""
        return self._run("pg_ctl", "status", "-D", str(self.data), check=False, timeout=30).returncode == 0

    def start(self, timeout: float = 120) -> None:
        """Start the server and wait until it accepts connections (crash recovery included)."""
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.logfile), "-o", self._options(), "-w",
                  "-t", str(int(timeout)), timeout=timeout + 30)
        self.starts += 1

    def stop(self, mode: str = "fast", timeout: float = 120) -> None:
        """Stop the server: ``fast`` (sessions are ended, clean shutdown) or ``immediate`` (no shutdown
        checkpoint: the next start runs crash recovery), or ``smart``."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown shutdown mode {mode!r}")
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", str(int(timeout)),
                  timeout=timeout + 30)
        self.stops += 1

    def restart(self, mode: str = "fast") -> None:
        """Stop (``mode``) and start again, same port and data."""
        self.stop(mode)
        self.start()

    def create_database(self, name: str = DATABASE) -> None:
        """``CREATE DATABASE name`` through the driver (connected to the ``postgres`` database)."""
        execute(self.url_for("postgres"), [f'CREATE DATABASE "{name}"'])

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server log (for failure reports)."""
        with contextlib.suppress(OSError):
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        return ""


def execute(url: str, statements: Sequence[str], *, timeout: float = 10) -> list[tuple[object, ...]]:
    """Run ``statements`` in autocommit mode on ``url``; return the rows of the last one (if it returns any)."""
    driver = _driver()
    rest = url.split("://", 1)[1]
    userhost, database = rest.rsplit("/", 1)
    user, hostport = userhost.split("@", 1)
    host, port = hostport.rsplit(":", 1)
    kwargs = {"host": host, "port": int(port), "user": user, "dbname": database, "connect_timeout": int(timeout)}
    mod = __import__(driver)
    con = mod.connect(**kwargs)
    try:
        con.autocommit = True
        rows: list[tuple[object, ...]] = []
        with con.cursor() as cur:
            for sql in statements:
                cur.execute(sql)
                rows = list(cur.fetchall()) if cur.description else []
        return rows
    finally:
        con.close()


def _cluster_root(tmp: Path) -> tuple[Path, bool]:
    """A fresh directory for the cluster: under ``tmp`` when the ``postgres`` user can reach it, else in the
    system temporary directory (``True``: remove it afterwards, having copied the log into ``tmp``)."""
    tmp.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or _reachable_by_postgres(tmp):
        return Path(tempfile.mkdtemp(prefix="pg-", dir=tmp)), False
    return Path(tempfile.mkdtemp(prefix="autoprune-soak-pg-")), True


def _reachable_by_postgres(path: Path) -> bool:
    """Whether every directory above ``path`` lets others through (the ``postgres`` user needs ``x``)."""
    p = path.resolve()
    return all(os.stat(d).st_mode & 0o001 for d in [p, *p.parents])


@contextlib.contextmanager
def private_postgres(tmp: Path, *, attempts: int = 3) -> Iterator[PrivateServer]:
    """A started private server with the ``soak`` database; stopped (and its data removed) when the block ends.

    Args:
        tmp: A scratch directory of the caller (the cluster lives under it when possible; its log is copied there
            as ``postgres.log``).
        attempts: Ports tried when another process takes the free port between choosing and binding it.

    Raises:
        PostgresUnavailable: No server binaries, no ``postgres`` user under root, or no driver.
    """
    bin_dir = find_bin_dir()
    _driver()
    root, remove_root = _cluster_root(Path(tmp))
    server = PrivateServer(root, free_port(), bin_dir)
    try:
        server.init()
        for attempt in range(attempts):
            try:
                server.start()
                break
            except RuntimeError:
                if attempt + 1 == attempts or "could not bind" not in server.log_tail(50).lower():
                    raise
                server.port = free_port()
        server.create_database()
        yield server
    finally:
        _shutdown(server)
        with contextlib.suppress(OSError):
            shutil.copyfile(server.logfile, Path(tmp) / "postgres.log")
        shutil.rmtree(root / "data" if not remove_root else root, ignore_errors=True)


def _shutdown(server: PrivateServer) -> None:
    """Stop the server however it is (fast, then immediate); never raises."""
    if not (server.data / "postmaster.pid").exists():
        return
    for mode in ("fast", "immediate"):
        with contextlib.suppress(Exception):
            server.stop(mode, timeout=60)
            return
    with contextlib.suppress(Exception):  # last resort: the postmaster's own pid
        pid = int((server.data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, 9)
        time.sleep(0.5)
