"""PostgreSQL on loopback for tests and ``meterops up --profile scaled``.

Uses Debian's server binaries (``/usr/lib/postgresql/<version>/bin``),
installing the ``postgresql`` package with apt the first time if they are
missing. The cluster (``pgdata`` in ``data_dir``) has ``trust`` auth,
listens only on 127.0.0.1 (and a Unix socket in ``run`` beside it) and uses the
C locale, so text sorts byte by byte as in SQLite. PostgreSQL refuses to run
as root: as root the server tools run as the ``postgres`` system user through
``runuser`` and the cluster lives in a private directory of that user under
the system temp dir, named after ``data_dir`` (see ``server_dir``), since the
server cannot reach into root's private directories.

``copy_ceiling`` measures the raw rate of a bare binary ``COPY`` into a keyed
table, the ceiling printed beside the store's ingest rate by the benchmarks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from meterops.errors import BackendError, ConfigError, MissingDependency
from meterops.services.base import Service, free_port, wait_for_port

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["PostgresService", "copy_ceiling", "find_binaries"]

_BIN_GLOB = "/usr/lib/postgresql/*/bin"
_APT_INSTALL = ["apt-get", "install", "-y", "postgresql"]
_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes, minus "/.s.PGSQL.NNNNN"


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    return tuple(int(d) for d in bin_dir.parent.name.split(".") if d.isdigit())


def find_binaries() -> Path | None:
    """The ``bin`` directory of the newest Debian PostgreSQL server, if installed."""
    found = [
        p
        for p in Path("/").glob(_BIN_GLOB.lstrip("/"))
        if (p / "initdb").is_file() and (p / "pg_ctl").is_file()
    ]
    return max(found, key=_version_key) if found else None


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(  # noqa: S603 - fixed argv, no shell
            cmd, capture_output=True, text=True, check=False, env=env, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendError(f"{what} failed: {' '.join(cmd)}: {exc}") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-2000:]
        raise BackendError(f"{what} failed ({done.returncode}): {' '.join(cmd)}\n{tail}")
    return done.stdout


def _is_root() -> bool:
    return os.geteuid() == 0


def _postgres_user() -> Any:
    import pwd

    try:
        return pwd.getpwnam("postgres")
    except KeyError as exc:
        raise BackendError(
            "there is no 'postgres' system user (the postgresql package creates it)"
        ) from exc


class PostgresService(Service):
    """A PostgreSQL cluster in ``data_dir`` on 127.0.0.1 (see the module docstring).

    ``fast=True`` turns off ``fsync``, ``full_page_writes`` and
    ``synchronous_commit``: a crash of the machine may lose or corrupt the
    data, which is fine for tests and benchmarks of throwaway clusters.
    """

    name = "postgres"

    def __init__(self, data_dir: Path, port: int | None = None, fast: bool = True) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.fast = fast
        self._bin: Path | None = None

    # -- paths ---------------------------------------------------------------
    @property
    def server_dir(self) -> Path:
        """Where the cluster, its log and its socket live.

        ``data_dir`` itself, except as root: then a directory of the
        ``postgres`` user under the system temp dir, named after ``data_dir``
        (the server could not reach ``data_dir`` behind private parents such
        as pytest's ``/tmp/pytest-of-root``, mode 0700 and reset by pytest).
        """
        if not _is_root():
            return self.data_dir
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"meterops-postgres-{digest}"

    @property
    def pgdata(self) -> Path:
        return self.server_dir / "pgdata"

    @property
    def socket_dir(self) -> Path:
        return self.server_dir / "run"

    @property
    def log_file(self) -> Path:
        return self.server_dir / "postgres.log"

    @property
    def url(self) -> str:
        return self._url("meterops")

    def _url(self, database: str) -> str:
        if self.port is None:
            raise BackendError("PostgreSQL is not started: call start() first")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    # -- install -------------------------------------------------------------
    def install(self) -> None:
        """Find the server binaries; as root install Debian's ``postgresql`` if missing."""
        self._bin = find_binaries()
        if self._bin is not None:
            return
        if not _is_root():
            raise BackendError(
                "PostgreSQL server binaries not found under /usr/lib/postgresql; "
                "install them with: sudo apt-get install -y postgresql"
            )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        known = subprocess.run(
            ["apt-cache", "show", "postgresql"],  # noqa: S607 - apt is found on PATH
            capture_output=True,
            check=False,
            env=env,
        )
        if known.returncode != 0:
            _run(["apt-get", "update"], "updating the apt package lists", env)
        _run(_APT_INSTALL, "installing PostgreSQL", env)
        self._bin = find_binaries()
        if self._bin is None:
            raise BackendError(
                f"{' '.join(_APT_INSTALL)} succeeded but no initdb/pg_ctl was found in {_BIN_GLOB}"
            )

    def _tool(self, name: str) -> str:
        if self._bin is None:
            self._bin = find_binaries()
        if self._bin is None:
            raise BackendError("PostgreSQL is not installed: call install() first")
        return str(self._bin / name)

    def _as_owner(self, cmd: list[str]) -> list[str]:
        """Run server tools as ``postgres`` when we are root (they refuse to run as root)."""
        if not _is_root():
            return cmd
        runuser = shutil.which("runuser")
        if runuser is None:
            raise BackendError("running PostgreSQL as root needs runuser (util-linux)")
        return [runuser, "-u", "postgres", "--", *cmd]

    def _prepare_dirs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not _is_root():
            return
        owner = _postgres_user()
        server = self.server_dir
        try:
            server.mkdir(mode=0o700)
            os.chown(server, owner.pw_uid, owner.pw_gid)
        except FileExistsError:
            info = server.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != owner.pw_uid:
                raise BackendError(
                    f"{server} exists but is not a directory of the postgres user; remove it"
                ) from None
        # A pointer for humans: where this data_dir's cluster lives.
        (self.data_dir / "SERVER_DIR").write_text(f"{server}\n")

    def _initdb(self) -> None:
        if (self.pgdata / "PG_VERSION").is_file():
            return
        cmd = [
            self._tool("initdb"),
            "-D",
            str(self.pgdata),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        ]
        if self.fast:
            cmd.append("--no-sync")
        _run(self._as_owner(cmd), "initdb")
        settings = [
            "include_if_exists = 'meterops.conf'",
            "max_wal_size = '4GB'",
            "checkpoint_timeout = '15min'",
            "shared_buffers = '256MB'",
            "max_connections = 200",
        ]
        if self.fast:
            settings += ["fsync = off", "full_page_writes = off", "synchronous_commit = off"]
        with (self.pgdata / "postgresql.conf").open("a") as conf:
            conf.write("\n# meterops\n" + "\n".join(settings) + "\n")

    def _write_runtime_conf(self) -> None:
        sockets = str(self.socket_dir) if len(str(self.socket_dir)) <= _SOCKET_PATH_MAX else ""
        conf = (
            f"port = {self.port}\n"
            "listen_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '{sockets}'\n"
        )
        (self.pgdata / "meterops.conf").write_text(conf)
        self.socket_dir.mkdir(exist_ok=True)
        if _is_root():
            owner = _postgres_user()
            for path in (self.pgdata / "meterops.conf", self.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)

    # -- lifecycle -----------------------------------------------------------
    def _running(self) -> bool:
        if not (self.pgdata / "postmaster.pid").exists():
            return False
        done = subprocess.run(  # noqa: S603 - fixed argv
            self._as_owner([self._tool("pg_ctl"), "-D", str(self.pgdata), "status"]),
            capture_output=True,
            check=False,
        )
        return done.returncode == 0

    def start(self) -> Self:
        """Create the cluster (once), start it, and create the ``meterops`` database."""
        if self.port is None:
            self.port = self._running_port() or free_port()
        self._prepare_dirs()
        self._initdb()
        self._write_runtime_conf()
        if not self._running():
            cmd = [
                self._tool("pg_ctl"),
                "-D",
                str(self.pgdata),
                "-l",
                str(self.log_file),
                "-w",
                "-t",
                "120",
                "start",
            ]
            try:
                _run(self._as_owner(cmd), "starting PostgreSQL")
            except BackendError as exc:
                log = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
                raise BackendError(f"{exc}\nserver log:\n{log}") from exc
        wait_for_port(self.port, 60, "PostgreSQL")
        self._ensure_database("meterops")
        return self

    def _running_port(self) -> int | None:
        """The port of a server already running on this cluster (line 4 of its pid file)."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
            return int(lines[3]) if self._running() else None
        except (OSError, IndexError, ValueError):
            return None

    def stop(self) -> None:
        if not self._running():
            return
        cmd = [self._tool("pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-w", "stop"]
        _run(self._as_owner(cmd), "stopping PostgreSQL")

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.server_dir, ignore_errors=True)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    # -- databases -----------------------------------------------------------
    def _admin(self) -> Any:
        psycopg = _psycopg()
        try:
            return psycopg.connect(self._url("postgres"), autocommit=True, connect_timeout=30)
        except psycopg.Error as exc:
            raise BackendError(f"cannot connect to PostgreSQL on port {self.port}: {exc}") from exc

    def _ensure_database(self, name: str) -> None:
        with self._admin() as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if found.fetchone() is None:
                self._create(conn, name)

    @staticmethod
    def _create(conn: Any, name: str) -> None:
        sql = _psycopg().sql
        strategy = " STRATEGY = FILE_COPY" if conn.info.server_version >= 150000 else ""
        conn.execute(sql.SQL("CREATE DATABASE {}" + strategy).format(sql.Identifier(name)))

    def create_database(self, name: str) -> str:
        """Create an empty database ``name`` (lower-case identifier); return its URL."""
        if not name.replace("_", "").isalnum() or not name[:1].isalpha() or len(name) > 63:
            raise ConfigError(f"database name {name!r}: use letters, digits and _ (max 63)")
        with self._admin() as conn:
            self._create(conn, name)
        return self._url(name)


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependency("psycopg", "postgres") from exc
    return psycopg


def copy_ceiling(url: str, frame: pd.DataFrame, batch_rows: int) -> float:
    """Rows/s of a bare binary ``COPY`` of ``frame`` into a table keyed by (meter_id, ts).

    The same encoding and order the PostgreSQL store uses (meter_id text, ts
    int8 microseconds, value float8; each transaction of ``batch_rows`` rows
    sorted by key); the frame is sorted and encoded before the clock starts,
    so this is the server's ceiling.
    """
    import pyarrow.compute as pc

    from meterops.store.postgres import copy_binary
    from meterops.types import ReadingBatch

    psycopg = _psycopg()
    table = f"ceiling_{uuid.uuid4().hex[:12]}"
    batch = ReadingBatch.from_pandas(frame[["meter_id", "ts", "value"]])
    keys = [("meter_id", "ascending"), ("ts", "ascending")]
    chunks = []
    for i in range(0, len(batch), batch_rows):
        part = batch.table.slice(i, batch_rows)
        chunks.append(copy_binary(part.take(pc.sort_indices(part, keys)).columns))
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                f'CREATE TABLE {table} (meter_id TEXT COLLATE "C" NOT NULL, '
                "ts BIGINT NOT NULL, value DOUBLE PRECISION, PRIMARY KEY (meter_id, ts))"
            )
            try:
                started = time.perf_counter()
                for chunk in chunks:
                    with conn.transaction(), conn.cursor() as cur:
                        copy_sql = f"COPY {table} FROM STDIN (FORMAT binary)"
                        with cur.copy(copy_sql) as copy:
                            copy.write(chunk)
                seconds = time.perf_counter() - started
            finally:
                conn.execute(f"DROP TABLE {table}")
    except psycopg.Error as exc:
        raise BackendError(f"PostgreSQL copy ceiling failed: {exc}") from exc
    return len(batch) / seconds
